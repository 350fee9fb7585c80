//! Writer threads: jobs from a ring, batched, COPYed into PostgreSQL, answered.
//!
//! Each writer is a plain OS thread (`writer-{n}`) that receives from the
//! shared ring and blocks only on it and on PostgreSQL, never on a shard.
//!
//! Batching adapts to load without tuning: a writer takes the first job, then
//! everything already waiting (up to `max_batch_events` / `max_batch_bytes`,
//! and up to what its cost model says commits within `target_commit_ms`, so
//! that a database that slows down gets smaller batches, not longer
//! commits), and only then, if the batch is still below its bounds, lingers for more:
//! at most `max_linger_ms`, and at most an eighth of its previous commit's
//! duration. Under low load a request is its own batch and commits are short,
//! so nobody waits for a linger; under high load jobs pile up while the
//! previous COPY runs, commits are long, and a short linger makes the next
//! batch larger for a few percent of its latency. (A fixed 2 ms linger at half
//! load measured ack p50 13 ms against 3.6 ms without it.)
//!
//! A job that waited past `ingest.max_wait_ms` is answered 503 instead of
//! written, and one its shard gave up on is dropped (see [`crate::pipeline`]).
//!
//! Repeated `event_id`s inside a batch are dropped before the COPY, and rows
//! whose id was committed lately ([`recent`]) are sent through staging, so
//! that re-sent events rarely force a whole batch through the fallback.
//!
//! - [`db`]: pool, table, idempotent COPY of a batch.
//! - [`connect`]: opening a connection: TLS (libpq's `sslmode`), password.
//! - [`recent`]: fingerprints of recently committed ids (a hint).
//! - [`state`]: the latest state per device, upserted in the batch's
//!   transaction (`[state] enabled`).
//! - [`probe`]: the `db-probe` thread that keeps `/health` and the breaker
//!   current while no writer reaches the database.

pub mod connect;
pub mod db;
pub mod probe;
pub mod recent;
pub mod state;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::breaker::{Admission, Breaker};
use crate::broadcast::{Published, Publisher};
use crate::config::WriterConfig;
use crate::health::DbStatus;
use crate::metrics::Metrics;
use crate::pipeline::{CommitOutcome, CostModel, Job, Reply, RingReceiver};
use db::{Committed, Pool, Statements, WriteError};
use recent::RecentIds;

/// A writer lingers for more jobs at most this fraction of its last commit.
const LINGER_SHARE_OF_COMMIT: u32 = 8;

/// A failed batch is retried at once (on a fresh connection) only if it
/// failed within this long: the pooled connection had died while idle.
const RETRY_ONLY_FAILURES_WITHIN: Duration = Duration::from_millis(500);

/// Marks the writer idle in the backlog, with its latest cost model, when a
/// batch is over however it ended.
struct Finished<'a> {
    backlog: &'a crate::pipeline::Backlog,
    writer: usize,
    cost: &'a std::cell::Cell<CostModel>,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.backlog.finished(self.writer, &self.cost.get());
    }
}

/// What a writer needs, handed to its thread.
pub struct Writer {
    pub id: usize,
    pub ring: RingReceiver,
    pub pool: Pool,
    pub sql: Arc<Statements>,
    /// The running configuration; batch bounds are read per batch.
    pub config: Arc<crate::config::LiveConfig>,
    pub metrics: Arc<Metrics>,
    /// The writer keeps retrying `ack = "queue"` batches until shutdown's
    /// deadline and then counts them lost.
    pub shutdown: crate::shutdown::Shutdown,
    /// Where the database's status is kept (for `/health`).
    pub health: Arc<crate::health::Health>,
    /// Recently committed ids, shared by all writers; `None` when off.
    pub recent: Option<Arc<RecentIds>>,
    /// Where committed events go for WebSocket subscribers.
    pub publisher: Publisher,
    /// The breaker around the database, shared by writers (locked once
    /// before and once after each database round trip).
    pub breaker: Arc<parking_lot::Mutex<Breaker>>,
    /// Whether the table is known to exist (it is made on first contact
    /// when PostgreSQL was unreachable at start-up).
    pub table_ready: Arc<std::sync::atomic::AtomicBool>,
    /// How long this writer's last successful commit took (bounds the linger).
    pub last_commit: std::cell::Cell<Duration>,
    /// What this writer's commits cost, learned from each one (sizes batches
    /// by time and feeds the shards' admission through the ring's backlog).
    pub cost: std::cell::Cell<CostModel>,
}

/// What a writer reports when its ring has closed and drained.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterReport {
    /// Events answered as committed (duplicates of stored rows included).
    pub committed: u64,
    /// Events accepted but not committed (answered 503/500, or lost in queue mode).
    pub uncommitted: u64,
    /// Of those, events nobody was told about (`ack = "queue"`).
    pub lost: u64,
}

/// What to do with one row of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowClass {
    /// Expected new: COPY straight into the table.
    Clean,
    /// Its id was committed recently: insert through staging, idempotently.
    Suspect,
    /// Repeats an id earlier in this batch: not written.
    Repeat,
}

/// The jobs of one batch and what to do with each of their rows.
struct Batch {
    jobs: Vec<Job>,
    events: usize,
    bytes: usize,
    /// Per job, per row; `None` while every row is clean.
    classes: Option<Vec<Vec<RowClass>>>,
    /// Fingerprints of the rows, in order (empty when the hint is off).
    fingerprints: Vec<u64>,
    /// Index of each job's first row among all rows of the batch (rows are
    /// moved out when published, so lengths cannot be re-read later).
    first_row: Vec<usize>,
}

impl Batch {
    fn new(first: Job) -> Self {
        let mut b = Batch {
            jobs: Vec::with_capacity(16),
            events: 0,
            bytes: 0,
            classes: None,
            fingerprints: Vec::new(),
            first_row: Vec::with_capacity(16),
        };
        b.push(first);
        b
    }

    fn push(&mut self, job: Job) {
        self.first_row.push(self.events);
        self.events += job.rows.len();
        self.bytes += job.rows.bytes().len();
        self.jobs.push(job);
    }

    /// Whether the batch has reached a bound: `limit` events (the time-based
    /// one, never above `max_batch_events`) or `max_batch_bytes`.
    fn full(&self, config: &WriterConfig, limit: usize) -> bool {
        self.events >= limit || self.bytes >= config.max_batch_bytes
    }

    fn set_class(&mut self, job: usize, row: usize, class: RowClass) {
        let jobs = &self.jobs;
        let classes =
            self.classes.get_or_insert_with(|| jobs.iter().map(|j| vec![RowClass::Clean; j.rows.len()]).collect());
        classes[job][row] = class;
    }

    fn class(&self, job: usize, row: usize) -> RowClass {
        self.classes.as_ref().map_or(RowClass::Clean, |c| c[job][row])
    }

    /// Classifies every row: repeats of an id earlier in the batch, and
    /// (with `recent`) rows whose id was committed lately. Returns the
    /// number of repeats.
    fn classify(&mut self, recent: Option<&RecentIds>, seen: &mut Vec<bool>) -> u64 {
        let mut repeats = Vec::new();
        if self.events > 1 {
            let mut ids: HashSet<&[u8], foldhash::fast::RandomState> =
                HashSet::with_capacity_and_hasher(self.events, foldhash::fast::RandomState::default());
            for (j, job) in self.jobs.iter().enumerate() {
                for r in 0..job.rows.len() {
                    if !ids.insert(job.rows.event_id(r)) {
                        repeats.push((j, r));
                    }
                }
            }
        }
        for &(j, r) in &repeats {
            self.set_class(j, r, RowClass::Repeat);
        }
        if let Some(recent) = recent {
            self.fingerprints.clear();
            for job in &self.jobs {
                self.fingerprints.extend((0..job.rows.len()).map(|r| recent::fingerprint(job.rows.event_id(r))));
            }
            recent.seen(&self.fingerprints, seen);
            let mut at = 0;
            for j in 0..self.jobs.len() {
                for r in 0..self.jobs[j].rows.len() {
                    if seen[at] && self.class(j, r) == RowClass::Clean {
                        self.set_class(j, r, RowClass::Suspect);
                    }
                    at += 1;
                }
            }
        }
        repeats.len() as u64
    }

    /// Streams the rows of class `class` of jobs `first..first+count` into a
    /// COPY, in `event_id` order: two transactions holding some of the same
    /// ids (a request re-sent while the first is still in flight) then take
    /// their index locks in the same order and cannot deadlock.
    fn write_rows(
        &self,
        first: usize,
        count: usize,
        class: RowClass,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        let mut rows: Vec<(&[u8], usize, usize)> = Vec::with_capacity(self.count(first, count, class) as usize);
        for j in first..first + count {
            let buf = &self.jobs[j].rows;
            for r in (0..buf.len()).filter(|&r| self.class(j, r) == class) {
                rows.push((buf.event_id(r), j, r));
            }
        }
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (_, j, r) in rows {
            out.write_all(self.jobs[j].rows.row(r))?;
        }
        Ok(())
    }

    fn count(&self, first: usize, count: usize, class: RowClass) -> u64 {
        (first..first + count)
            .map(|j| match &self.classes {
                None => {
                    if class == RowClass::Clean {
                        self.jobs[j].rows.len() as u64
                    } else {
                        0
                    }
                }
                Some(classes) => classes[j].iter().filter(|c| **c == class).count() as u64,
            })
            .sum()
    }

    /// Which rows of `jobs` were inserted by the commit `done` (`None`: all).
    fn inserted_mask(&self, jobs: std::ops::Range<usize>, done: &Committed) -> Option<Vec<Vec<bool>>> {
        if self.classes.is_none() && !done.via_staging {
            return None;
        }
        let staged = done.staged_set();
        let mask = jobs
            .map(|j| {
                let rows = &self.jobs[j].rows;
                (0..rows.len())
                    .map(|r| match self.class(j, r) {
                        RowClass::Repeat => false,
                        class => done.was_new(&staged, rows.event_id(r), class == RowClass::Clean),
                    })
                    .collect()
            })
            .collect();
        Some(mask)
    }

    /// The latest-state stream of the rows of jobs `first..first+count` that
    /// the commit `done` inserts (see [`state`]); `None` when none is new.
    fn latest_state(&self, first: usize, count: usize, done: &Committed) -> Option<Vec<u8>> {
        let rows = (first..first + count).flat_map(|j| {
            let buf = &self.jobs[j].rows;
            (0..buf.len()).filter_map(move |r| match self.class(j, r) {
                RowClass::Repeat => None,
                class => Some((buf.row(r), buf.event_id(r), class == RowClass::Clean)),
            })
        });
        done.latest_state(rows)
    }

    /// Fingerprints of the written rows of jobs `first..first+count`.
    fn committed_fingerprints(&self, first: usize, count: usize) -> Vec<u64> {
        if self.fingerprints.is_empty() {
            return Vec::new();
        }
        let mut at = self.first_row[first];
        let mut out = Vec::new();
        for j in first..first + count {
            for r in 0..self.jobs[j].rows.len() {
                if self.class(j, r) != RowClass::Repeat {
                    out.push(self.fingerprints[at]);
                }
                at += 1;
            }
        }
        out
    }
}

impl Writer {
    /// Runs until every sender of the ring is gone and the ring is drained.
    pub fn run(self) -> WriterReport {
        let mut report = WriterReport::default();
        let mut seen = Vec::new();
        while let Some(mut batch) = self.next_batch() {
            let repeats = batch.classify(self.recent.as_deref(), &mut seen);
            self.metrics.writers[self.id].events_duplicate.add(repeats);
            self.commit(&mut batch, &mut report);
            // Replies went out in commit(); dropping the batch frees its rows.
        }
        crate::debug!("writer finished", writer = self.id, committed = report.committed);
        report
    }

    fn next_batch(&self) -> Option<Batch> {
        let (config, max_wait) = {
            let c = self.config.load();
            (c.writer.clone(), Duration::from_millis(c.ingest.max_wait_ms))
        };
        let limit = self
            .cost
            .get()
            .batch_limit(Duration::from_millis(config.target_commit_ms))
            .clamp(1, config.max_batch_events.max(1));
        let mut batch = loop {
            let job = self.ring.recv()?;
            if let Some(job) = self.settle(job, max_wait) {
                break Batch::new(job);
            }
        };
        while !batch.full(&config, limit) {
            match self.ring.try_recv() {
                Some(job) => {
                    if let Some(job) = self.settle(job, max_wait) {
                        batch.push(job);
                    }
                }
                None => break,
            }
        }
        let linger = Duration::from_millis(config.max_linger_ms).min(self.last_commit.get() / LINGER_SHARE_OF_COMMIT);
        if !linger.is_zero() && !batch.full(&config, limit) {
            let until = Instant::now() + linger;
            while !batch.full(&config, limit) {
                match self.ring.recv_deadline(until) {
                    Some(job) => {
                        if let Some(job) = self.settle(job, max_wait) {
                            batch.push(job);
                        }
                    }
                    None => break,
                }
            }
        }
        Some(batch)
    }

    /// Decides whether a job taken from the ring is written: a job whose
    /// shard gave up on it is dropped (its client has its 503), and one that
    /// waited past `max_wait` is answered 503 instead of written. Only jobs
    /// a client waits for are timed: spool records and queued (202) events
    /// are already acknowledged.
    fn settle(&self, mut job: Job, max_wait: Duration) -> Option<Job> {
        let Reply::Shard { ticket, .. } = &job.reply else { return Some(job) };
        let stats = &self.metrics.writers[self.id];
        let waited = job.enqueued.elapsed();
        if waited > max_wait {
            if ticket.cancel() {
                stats.jobs_expired.inc();
                job.reply.send(&CommitOutcome::Expired(format!(
                    "waited {} ms for a writer, past ingest.max_wait_ms ({} ms); nothing was stored",
                    waited.as_millis(),
                    max_wait.as_millis()
                )));
            }
            return None;
        }
        if !ticket.claim() {
            // The shard answered 503 already.
            return None;
        }
        Some(job)
    }

    /// Commits a batch and answers every job in it.
    fn commit(&self, batch: &mut Batch, report: &mut WriterReport) {
        let stats = &self.metrics.writers[self.id];
        let backlog = self.ring.backlog();
        backlog.started(self.id, batch.events, Instant::now());
        let _done = Finished { backlog, writer: self.id, cost: &self.cost };
        let all = 0..batch.jobs.len();
        match self.write(batch, all.start, all.len()) {
            Ok(done) => self.answer_committed(batch, all, &done, report),
            Err(e) if !e.is_transient() => {
                // Some rows poison the batch: find them, request by request
                // and then by halving, so that everything else still goes in.
                crate::warn!("batch refused, isolating the refused events", writer = self.id, error = e);
                for j in 0..batch.jobs.len() {
                    let outcome = if batch.jobs.len() > 1 { self.write(batch, j, 1) } else { Err(e.clone()) };
                    match outcome {
                        Ok(done) => self.answer_committed(batch, j..j + 1, &done, report),
                        Err(e) if e.is_transient() => self.fail(batch, j..j + 1, &e, report),
                        Err(_) => match self.isolate(batch, j) {
                            Ok((done, dead)) => {
                                stats.events_dead_lettered.add(dead.len() as u64);
                                self.answer(batch, j..j + 1, &done, dead, report);
                            }
                            Err(e) => self.fail(batch, j..j + 1, &e, report),
                        },
                    }
                }
            }
            Err(e) => self.fail(batch, all, &e, report),
        }
        stats.batch_events.record(batch.events as u64);
    }

    /// One transaction for jobs `first..first+count`, retried on a fresh
    /// connection once after a transient failure (the pooled connection may
    /// have died while idle). With `ack = "queue"` nobody can be told to
    /// retry, so transient failures are retried until shutdown's deadline.
    fn write(&self, batch: &Batch, first: usize, count: usize) -> Result<Committed, WriteError> {
        let stats = &self.metrics.writers[self.id];
        let unacknowledged = batch.jobs[first..first + count].iter().all(|j| j.reply.is_none());
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            let suspects = batch.count(first, count, RowClass::Suspect);
            let result = self.guarded(|conn| {
                let clean = |out: &mut dyn std::io::Write| batch.write_rows(first, count, RowClass::Clean, out);
                let suspect = |out: &mut dyn std::io::Write| batch.write_rows(first, count, RowClass::Suspect, out);
                let state = |done: &Committed| batch.latest_state(first, count, done);
                let suspect = (suspects > 0).then_some(&suspect as db::RowWriter<'_>);
                db::copy_batch(conn, &self.sql, &clean, suspect, Some(&state))
            });
            let took = started.elapsed();
            let written = batch.count(first, count, RowClass::Clean) + suspects;
            match result {
                Ok(done) => {
                    self.health.database.set(DbStatus::Up, Instant::now());
                    self.last_commit.set(took);
                    self.learn(written as usize, took);
                    stats.commit_us.record_duration(took);
                    stats.batches.inc();
                    stats.events_committed.add(done.inserted);
                    stats.events_duplicate.add(written.saturating_sub(done.inserted));
                    stats.dedup_suspects.add(suspects);
                    if done.via_staging {
                        stats.staging_fallbacks.inc();
                    }
                    if let Some(recent) = &self.recent {
                        recent.record(batch.committed_fingerprints(first, count), Instant::now());
                    }
                    return Ok(done);
                }
                Err(WriteError::Conflict(m)) if attempt < 5 => {
                    // A deadlock or serialization failure with another
                    // transaction: the database is fine; go again at once,
                    // after a short jittered pause to break the symmetry.
                    stats.batch_failures.inc();
                    attempt += 1;
                    let jitter = u64::from(started.elapsed().subsec_nanos() % 20);
                    crate::debug!("transaction conflict, retrying", writer = self.id, error = m);
                    std::thread::sleep(Duration::from_millis(1 + jitter));
                }
                Err(e) => {
                    stats.batch_failures.inc();
                    if !e.is_transient() {
                        return Err(e);
                    }
                    if e.counts_against_database() {
                        self.health.database.set(DbStatus::Unreachable, Instant::now());
                    }
                    // A batch that failed after running longer than expected
                    // (a statement timeout in a stall) cost at least that long.
                    if took > self.cost.get().predict(written as usize) {
                        self.learn(written as usize, took);
                    }
                    attempt += 1;
                    let past_deadline = self.shutdown.deadline().is_some_and(|d| Instant::now() >= d);
                    // One retry on a fresh connection is for a pooled one that
                    // died while idle, which fails at once; one that failed
                    // slowly would only make the client wait twice as long.
                    let slow = took > RETRY_ONLY_FAILURES_WITHIN;
                    if ((attempt >= 2 || slow) && !unacknowledged) || past_deadline {
                        return Err(e);
                    }
                    if attempt >= 2 {
                        crate::warn!("database unavailable, retrying queued batch", writer = self.id, error = e);
                        self.shutdown.pause(Duration::from_millis((100u64 << attempt.min(5)).min(2000)));
                    }
                }
            }
        }
    }

    /// Updates the cost model with a batch of `events` that took `took`.
    fn learn(&self, events: usize, took: Duration) {
        let mut model = self.cost.get();
        model.observe(events, took);
        self.cost.set(model);
    }

    /// Runs one database round trip through the breaker: refused at once
    /// while it is open, and its outcome (transient failures only) recorded.
    /// Makes the table first if start-up could not.
    fn guarded<T>(&self, f: impl FnOnce(&mut postgres::Client) -> Result<T, WriteError>) -> Result<T, WriteError> {
        if let Admission::Rejected { retry_after } = self.breaker.lock().allow(Instant::now()) {
            return Err(WriteError::Transient(format!(
                "circuit breaker open after repeated database failures; next probe in {} ms",
                retry_after.as_millis()
            )));
        }
        let result = self.pool.get().map_err(WriteError::from).and_then(|mut conn| {
            if !self.table_ready.load(Ordering::Acquire) {
                db::prepare_table(&mut conn, &self.sql, true)?;
                self.table_ready.store(true, Ordering::Release);
            }
            f(&mut conn)
        });
        let unavailable = result.as_ref().err().is_some_and(WriteError::counts_against_database);
        self.breaker.lock().on_outcome(Instant::now(), unavailable);
        result
    }

    /// Commits the rows of job `j` in parts, halving a part PostgreSQL
    /// refuses until the refused rows stand alone; those go to the
    /// dead-letter table with PostgreSQL's error. Returns what was committed
    /// (every inserted id, as `staged_ids`) and the dead letters by row.
    fn isolate(&self, batch: &Batch, j: usize) -> Result<(Committed, Vec<(usize, String)>), WriteError> {
        let rows = &batch.jobs[j].rows;
        let mut done = Committed { inserted: 0, via_staging: true, staged_ids: Vec::new() };
        let mut dead: Vec<(usize, String)> = Vec::new();
        let mut parts = vec![(0..rows.len()).filter(|&r| batch.class(j, r) != RowClass::Repeat).collect::<Vec<_>>()];
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            let mut sorted = part.clone();
            sorted.sort_unstable_by(|a, b| rows.event_id(*a).cmp(rows.event_id(*b)));
            let write = |out: &mut dyn std::io::Write| sorted.iter().try_for_each(|&r| out.write_all(rows.row(r)));
            let state =
                |done: &Committed| done.latest_state(part.iter().map(|&r| (rows.row(r), rows.event_id(r), true)));
            let result = self.guarded(|conn| db::copy_batch(conn, &self.sql, &write, None, Some(&state)));
            match result {
                Ok(c) => {
                    done.inserted += c.inserted;
                    if c.via_staging {
                        done.staged_ids.extend(c.staged_ids);
                    } else {
                        done.staged_ids
                            .extend(part.iter().map(|&r| String::from_utf8_lossy(rows.event_id(r)).into_owned()));
                    }
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) if part.len() == 1 => dead.push((part[0], e.message().to_string())),
                Err(_) => {
                    let (left, right) = part.split_at(part.len() / 2);
                    parts.push(right.to_vec());
                    parts.push(left.to_vec());
                }
            }
        }
        if !dead.is_empty() {
            let letters: Vec<db::DeadLetter<'_>> =
                dead.iter().filter_map(|(r, error)| rows.view(*r).map(|row| db::DeadLetter { row, error })).collect();
            self.guarded(|conn| db::store_dead_letters(conn, &self.sql, &letters))?;
            self.metrics.dead_letters_added(letters.len() as u64);
            crate::warn!(
                "events refused by PostgreSQL kept as dead letters",
                writer = self.id,
                events = dead.len(),
                table = self.sql.dead_letter_table
            );
        }
        dead.sort_unstable_by_key(|(r, _)| *r);
        Ok((done, dead))
    }

    fn answer_committed(
        &self,
        batch: &mut Batch,
        jobs: std::ops::Range<usize>,
        done: &Committed,
        report: &mut WriterReport,
    ) {
        self.answer(batch, jobs, done, Vec::new(), report);
    }

    /// Publishes the inserted rows of committed jobs to subscribers, then
    /// answers the jobs: publishing first keeps an acknowledged client's next
    /// event behind this one on every subscriber. `dead_letters` (rows of a
    /// single job) go back to its client as rejected events.
    fn answer(
        &self,
        batch: &mut Batch,
        jobs: std::ops::Range<usize>,
        done: &Committed,
        dead_letters: Vec<(usize, String)>,
        report: &mut WriterReport,
    ) {
        let stats = &self.metrics.writers[self.id];
        for job in &batch.jobs[jobs.clone()] {
            stats.ack_us.record_since(job.enqueued);
            report.committed += job.rows.len() as u64;
        }
        if self.publisher.hub.wanted() {
            let mask = batch.inserted_mask(jobs.clone(), done);
            let rows = batch.jobs[jobs.clone()].iter_mut().map(|j| std::mem::take(&mut j.rows)).collect();
            self.publisher.publish(Published::new(rows, mask, Instant::now()));
        }
        let outcome = CommitOutcome::Committed { dead_letters };
        for job in &mut batch.jobs[jobs] {
            job.reply.send(&outcome);
        }
    }

    fn fail(&self, batch: &mut Batch, jobs: std::ops::Range<usize>, e: &WriteError, report: &mut WriterReport) {
        let outcome = if e.is_transient() {
            CommitOutcome::Unavailable(e.message().to_string())
        } else {
            CommitOutcome::Refused(e.message().to_string())
        };
        for job in &mut batch.jobs[jobs] {
            report.uncommitted += job.rows.len() as u64;
            match &job.reply {
                Reply::Shard { .. } | Reply::Spool { .. } => job.reply.send(&outcome),
                Reply::None => {
                    report.lost += job.rows.len() as u64;
                    self.metrics.writers[self.id].events_lost.add(job.rows.len() as u64);
                    crate::error!("queued events lost", writer = self.id, events = job.rows.len(), error = e);
                }
            }
        }
    }
}
