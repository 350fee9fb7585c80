//! The `db-probe` thread: asks PostgreSQL whether it is there while no
//! writer is asking, so that `/health` and the breaker follow the database
//! without client traffic (see [`crate::health`]).
//!
//! Every `database.probe_interval_ms` it looks at the last successful round
//! trip of any writer; if there was none within the interval (or the
//! breaker is not closed), it runs `SELECT 1` on a connection of its own,
//! within `database.probe_timeout_ms` (connect timeout, TCP user timeout and
//! `statement_timeout` all set to it, so a server that vanished without a
//! RST is noticed too). The `SELECT 1` runs in a transaction that sets
//! `statement_timeout` itself, as every statement of ingestd does (see
//! [`super::db`]: nothing is set per session, so a PgBouncer in transaction
//! mode in between changes nothing); it is still one round trip. Its own connection, not the writers' pool: a probe
//! must not wait behind writers stuck in a COPY, and it needs PostgreSQL's
//! typed errors (a pool only reports that it timed out) to tell "cannot
//! reach" from "refused us".
//!
//! While the table is not known to exist (PostgreSQL was unreachable at
//! start-up), the probe makes it (or, with `create_table = false`, checks
//! for it) instead, so that readiness means the table is there.
//!
//! Every `database.dead_letter_count_interval_ms` (10 s) while the database
//! is up, it also counts the dead-letter table on the same connection
//! (`SELECT count(*)`, within `probe_timeout_ms`) for the
//! `ingestd_dead_letters_waiting` gauge: a count is cheap at that interval
//! and stays right when `ingestd dead-letter replay|purge` or an operator
//! removes rows, which the writers' own tallies cannot see. A count that
//! fails leaves the gauge at its last value (the probe's verdict is not
//! touched by it).
//!
//! A refusal is a configuration problem, logged as an error naming the
//! likely keys when it starts and once a minute while it lasts; an outage
//! is a warning when it starts and an info line when it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use postgres::Client;

use super::connect::{Access, SharedAccess};
use super::db::{self, Statements};
use crate::breaker::{Breaker, BreakerState};
use crate::config::{DatabaseConfig, LiveConfig};
use crate::health::DbStatus;
use crate::metrics::Metrics;

/// How often a lasting refusal is logged again.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Up,
    Unreachable(String),
    Refused(String),
}

impl Verdict {
    pub fn status(&self) -> DbStatus {
        match self {
            Verdict::Up => DbStatus::Up,
            Verdict::Unreachable(_) => DbStatus::Unreachable,
            Verdict::Refused(_) => DbStatus::Refused,
        }
    }
}

fn verdict(access: &Access, e: &postgres::Error) -> Verdict {
    let message = access.describe(e);
    if db::is_refusal(e) { Verdict::Refused(message) } else { Verdict::Unreachable(message) }
}

/// A connection for probing, with every timeout set to `timeout`.
fn connect(access: &Access, db: &DatabaseConfig, timeout: Duration) -> Result<Client, postgres::Error> {
    let mut config = db::pg_config(db)?;
    config.connect_timeout(timeout);
    config.tcp_user_timeout(timeout);
    config.application_name("ingestd-probe");
    access.connect(&config)
}

/// Checks the database once on a fresh connection: reachable, accepting us,
/// and (with `create`) the table made. What start-up runs before anything
/// is bound.
pub fn check(access: &Access, db: &DatabaseConfig, sql: &Statements, create: bool) -> Verdict {
    let timeout = Duration::from_millis(db.connect_timeout_ms);
    match connect(access, db, timeout).and_then(|mut c| prepare(&mut c, sql, create, timeout)) {
        Ok(()) => Verdict::Up,
        Err(e) => verdict(access, &e),
    }
}

fn prepare(client: &mut Client, sql: &Statements, create: bool, timeout: Duration) -> Result<(), postgres::Error> {
    db::prepare_table_raw(client, sql, create, millis(timeout))
}

/// A timeout in whole milliseconds, at least 1 (0 would mean none).
fn millis(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The probe thread's state.
pub struct Probe {
    pub config: Arc<LiveConfig>,
    /// TLS material and password, as of the last SIGHUP.
    pub access: SharedAccess,
    pub sql: Arc<Statements>,
    pub table_ready: Arc<AtomicBool>,
    pub breaker: Arc<parking_lot::Mutex<Breaker>>,
    pub metrics: Arc<Metrics>,
    /// Where the database's status goes.
    pub health: Arc<crate::health::Health>,
    /// Closed (its sender dropped) when the probe should stop.
    pub stop: Receiver<()>,
}

impl Probe {
    /// Probes until `stop` closes.
    pub fn run(self) {
        let mut client: Option<Client> = None;
        let mut refusal_logged: Option<Instant> = None;
        let mut last_count: Option<Instant> = None;
        let mut count_failing = false;
        loop {
            let (db, interval, timeout) = {
                let c = self.config.load();
                (
                    c.database.clone(),
                    Duration::from_millis(c.database.probe_interval_ms),
                    Duration::from_millis(c.database.probe_timeout_ms),
                )
            };
            match self.stop.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let now = Instant::now();
            let count_every = Duration::from_millis(db.dead_letter_count_interval_ms);
            if !count_every.is_zero()
                && last_count.is_none_or(|at| now.duration_since(at) >= count_every)
                && self.health.database.is_up()
                && self.table_ready.load(Ordering::Acquire)
            {
                last_count = Some(now);
                match self.count_dead_letters(&mut client, &db, timeout) {
                    Ok(()) => count_failing = false,
                    Err(why) if !count_failing => {
                        count_failing = true;
                        crate::warn!(
                            "cannot count the dead-letter table; ingestd_dead_letters_waiting keeps its last value",
                            error = why
                        );
                    }
                    Err(_) => {}
                }
            }
            let health = &self.health.database;
            let breaker_closed = self.breaker.lock().state() == BreakerState::Closed;
            if breaker_closed
                && health.is_up()
                && health.reached_within(now, interval)
                && self.table_ready.load(Ordering::Acquire)
            {
                // Writers are reaching it: nothing to ask.
                continue;
            }
            let verdict = self.probe_once(&mut client, &db, timeout);
            self.record(&verdict, &mut refusal_logged);
        }
    }

    fn probe_once(&self, client: &mut Option<Client>, db: &DatabaseConfig, timeout: Duration) -> Verdict {
        let started = Instant::now();
        let access = self.access.load();
        if client.as_ref().is_none_or(Client::is_closed) {
            match connect(&access, db, timeout) {
                Ok(c) => *client = Some(c),
                Err(e) => return verdict(&access, &e),
            }
        }
        let Some(c) = client.as_mut() else { return Verdict::Unreachable("no connection".into()) };
        let result = if self.table_ready.load(Ordering::Acquire) {
            db::in_transaction(c, millis(timeout), "SELECT 1")
        } else {
            prepare(c, &self.sql, db.create_table, timeout).map(|()| self.table_ready.store(true, Ordering::Release))
        };
        self.metrics.probe_us.record_since(started);
        match result {
            Ok(()) => Verdict::Up,
            Err(e) => {
                // Start over on a fresh connection next time.
                *client = None;
                verdict(&access, &e)
            }
        }
    }

    /// Sets the dead-letter gauge from a count (see the module docs).
    fn count_dead_letters(
        &self,
        client: &mut Option<Client>,
        db: &DatabaseConfig,
        timeout: Duration,
    ) -> Result<(), String> {
        let access = self.access.load();
        if client.as_ref().is_none_or(Client::is_closed) {
            *client = Some(connect(&access, db, timeout).map_err(|e| access.describe(&e))?);
        }
        let Some(c) = client.as_mut() else { return Err("no connection".into()) };
        match db::count_dead_letters(c, &self.sql, millis(timeout)) {
            Ok(n) => {
                self.metrics.dead_letters_waiting.store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if c.is_closed() {
                    *client = None;
                }
                Err(access.describe(&e))
            }
        }
    }

    /// Moves the health state and the breaker, and logs changes.
    fn record(&self, verdict: &Verdict, refusal_logged: &mut Option<Instant>) {
        let now = Instant::now();
        let before = self.health.database.set(verdict.status(), now);
        self.metrics.probes[verdict.status() as usize].inc();
        self.breaker.lock().on_probe(now, *verdict == Verdict::Up);
        match verdict {
            Verdict::Up => {
                *refusal_logged = None;
                if before != DbStatus::Up {
                    crate::info!("database reachable again (probe)", was = before.as_str());
                }
            }
            Verdict::Unreachable(why) => {
                *refusal_logged = None;
                if before != DbStatus::Unreachable {
                    crate::warn!("database unreachable (probe); /health answers 503 until it is back", error = why);
                }
            }
            Verdict::Refused(why) => {
                if refusal_logged.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_EVERY) {
                    *refusal_logged = Some(now);
                    crate::error!(
                        "database refuses ingestd: a configuration problem, not an outage; check database.url \
                         (user, password, database), the TLS keys (database.tls_mode, ca_file, cert_file, \
                         key_file), pg_hba.conf, and database.table / create_table",
                        error = why
                    );
                }
            }
        }
    }
}
