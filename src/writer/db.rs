//! PostgreSQL access for writers: the connection pool, the table, and the
//! idempotent COPY of one batch.
//!
//! Idempotency costs nothing when there are no duplicates: a batch is COPYed
//! straight into the table. Rows the writer suspects of being re-sent (see
//! [`super::recent`]) go through a temporary staging table and `INSERT …
//! ON CONFLICT (event_id) DO NOTHING` in the same transaction; a batch that
//! still hits a unique violation is redone whole through staging. (FACTS.md:
//! staging every batch runs at 0.73–0.81 × raw COPY.) Repeats inside one batch
//! are removed before the COPY by the writer, so they never force the fallback.
//!
//! # Per transaction, so that a pooler in transaction mode changes nothing
//!
//! ingestd may reach PostgreSQL through PgBouncer with `pool_mode =
//! transaction` (docs/OPERATIONS.md), where consecutive transactions of one
//! client connection may run on different server sessions and nothing set
//! per session can be relied on. So ingestd sets nothing per session:
//!
//! - **`statement_timeout`** is not a startup parameter (PgBouncer refuses
//!   `options`, and with `ignore_startup_parameters = options` it would be
//!   dropped silently). Every transaction starts with [`Tx::begin`], which
//!   sends `BEGIN; SET LOCAL statement_timeout = …` as one simple query: the
//!   limit holds for that transaction on whichever server session runs it,
//!   and costs no round trip over the plain `BEGIN` it replaces. Writer
//!   batches (direct COPY, staging, the redo through staging), dead letters
//!   and table creation all run in such a transaction; the probe's `SELECT
//!   1` too ([`super::probe`]). No statement runs outside one.
//! - **Prepared statements.** `postgres` prepares a *named* statement
//!   (`s0`, `s1`, … from a per-process counter) for every `query`,
//!   `execute` or `copy_in` given SQL text, and closes it when the
//!   `Statement` drops; the Close is sent ahead of the connection's next
//!   request. PgBouncer 1.18 in transaction mode keeps no prepared statement
//!   across transactions, and a statement left open on a server session
//!   would collide with a statement of the same name from another ingestd
//!   process later on that session ("prepared statement s7 already
//!   exists"). So every statement is prepared, used and dropped inside one
//!   transaction, before its `COMMIT`/`ROLLBACK`: the COPYs and the
//!   staging `INSERT` drop theirs as soon as they return, and the
//!   dead-letter `INSERT` is dropped before the commit. Parameters are
//!   built-in types (text, timestamptz), so the client never runs its
//!   (cached, named) type-lookup statement. The other statements are simple
//!   queries, which prepare nothing.
//! - **Temporary staging table.** `CREATE TEMP TABLE IF NOT EXISTS … ON
//!   COMMIT DELETE ROWS` runs in each transaction that stages, so it exists
//!   on whichever session runs it, starts empty, and one left on a session by
//!   an earlier client (of the same table) is the same table.
//!
//! What PgBouncer adds that `statement_timeout` cannot bound is its own
//! queue: a query waiting there for a server connection is not running yet.
//! Its `query_wait_timeout` and `client_login_timeout` bound that wait and
//! should be a few seconds (docs/OPERATIONS.md).

use std::io::Write as _;
use std::time::Duration;

use postgres::Client;
use postgres::error::SqlState;

use super::connect::SharedAccess;
use crate::config::DatabaseConfig;
use crate::row::{COLUMNS, HEADER, TRAILER};

pub type Pool = r2d2::Pool<Manager>;

/// The pool's connection maker: the URL's settings fixed at start-up, the
/// TLS material and password as they are now ([`SharedAccess`] is swapped
/// on SIGHUP), so a connection opened after a reload uses a rotated
/// password or certificate. (`r2d2_postgres`'s manager holds one fixed
/// config, which is why this is not it.)
#[derive(Debug)]
pub struct Manager {
    config: postgres::Config,
    access: SharedAccess,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Client;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Client, postgres::Error> {
        self.access.load().connect(&self.config)
    }

    fn is_valid(&self, conn: &mut Client) -> Result<(), postgres::Error> {
        conn.simple_query("").map(drop)
    }

    fn has_broken(&self, conn: &mut Client) -> bool {
        conn.is_closed()
    }
}

/// A database failure, classified once: transient failures (connection,
/// timeout, resources, shutdown) may succeed on retry; permanent ones are
/// about the data or the schema and will not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The database is unreachable, timing out or going away: the breaker counts these.
    Transient(String),
    /// Two transactions collided (deadlock, serialization failure): retry
    /// at once; the database itself is fine, so the breaker ignores these.
    Conflict(String),
    /// The data or the schema: retrying the same rows will not help.
    Permanent(String),
}

impl WriteError {
    pub fn is_transient(&self) -> bool {
        matches!(self, WriteError::Transient(_) | WriteError::Conflict(_))
    }

    /// Whether this failure says anything about the database's health.
    pub fn counts_against_database(&self) -> bool {
        matches!(self, WriteError::Transient(_))
    }

    pub fn message(&self) -> &str {
        match self {
            WriteError::Transient(m) | WriteError::Conflict(m) | WriteError::Permanent(m) => m,
        }
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

pub use super::connect::describe;

impl From<postgres::Error> for WriteError {
    fn from(e: postgres::Error) -> Self {
        let message = describe(&e);
        match e.code() {
            None => WriteError::Transient(message),
            Some(code) if code.code().starts_with("40") => WriteError::Conflict(message),
            Some(code) if is_transient_state(code) => WriteError::Transient(message),
            Some(_) => WriteError::Permanent(message),
        }
    }
}

impl From<r2d2::Error> for WriteError {
    fn from(e: r2d2::Error) -> Self {
        WriteError::Transient(format!("no database connection: {e}"))
    }
}

/// Whether an error means the database *refused* us (a configuration
/// problem that will not go away by itself: credentials, `pg_hba.conf`, TLS,
/// a missing database, table or privilege) rather than being unreachable
/// for now. The one place that draws that line, for the probe and start-up.
pub fn is_refusal(e: &postgres::Error) -> bool {
    match e.code() {
        // 28 invalid authorization (bad password, no pg_hba.conf entry, TLS
        // required), 3D invalid catalog (no such database), 42P01 undefined
        // table, 42501 insufficient privilege, 3F000 no such schema.
        Some(code) => {
            let c = code.code();
            c.starts_with("28") || c.starts_with("3D") || c == "42P01" || c == "42501" || c == "3F000"
        }
        // The client refusing before any SQL: a bad or incomplete URL
        // (password missing); a certificate that does not verify or an
        // alert from the server (a rustls error), or a server without TLS
        // when TLS is required. The connection dropping during a handshake
        // is an outage like any other.
        None => {
            let m = e.to_string();
            m.starts_with("invalid configuration")
                || super::connect::rustls_error(e).is_some()
                || (super::connect::is_tls_error(e) && m.contains("does not support TLS"))
        }
    }
}

fn is_transient_state(code: &SqlState) -> bool {
    let c = code.code();
    // 08 connection exception, 53 insufficient resources, 57 operator
    // intervention (admin shutdown, statement timeout), 40 transaction
    // rollback (serialization, deadlock), 58 system error.
    ["08", "53", "57", "40", "58"].iter().any(|class| c.starts_with(class))
}

/// `postgres::Config` from the configured URL (without its TLS parameters,
/// which [`super::connect::Access`] applies) with ingestd's session settings.
pub fn pg_config(db: &DatabaseConfig) -> Result<postgres::Config, postgres::Error> {
    // A URL whose TLS parameters do not split (bad quoting or escapes) is
    // parsed whole, for the postgres crate's own error on it.
    let url = crate::config::split_tls_params(&db.url).map_or_else(|_| db.url.clone(), |(url, _)| url);
    let mut config: postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_millis(db.connect_timeout_ms));
    if config.get_application_name().is_none() {
        config.application_name("ingestd");
    }
    // No `options` startup parameter (`-c statement_timeout=…`): PgBouncer
    // refuses it, and in transaction pooling a session setting would not
    // hold. statement_timeout is set per transaction instead ([`Tx::begin`]).
    //
    // statement_timeout is enforced by the server; a server that vanished
    // without a RST cannot enforce it. These make the client notice a dead
    // peer on its own: keepalive probes on an idle connection, and a bound on
    // unacknowledged sends (a COPY into a black hole).
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(2));
    config.keepalives_retries(3);
    config.tcp_user_timeout(Duration::from_millis(db.statement_timeout_ms.max(1000)));
    Ok(config)
}

/// The writer pool. Connections are checked for breakage when returned, not
/// tested with a query on every checkout (that would be a round trip per batch).
pub fn pool(db: &DatabaseConfig, access: &SharedAccess, size: u32) -> Result<Pool, WriteError> {
    let config = pg_config(db)?;
    let manager = Manager { config, access: access.clone() };
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .test_on_check_out(false)
        .connection_timeout(Duration::from_millis(db.connect_timeout_ms))
        .build(manager)
        .map_err(WriteError::from)
}

/// SQL text for one table, built once.
#[derive(Debug, Clone)]
pub struct Statements {
    pub table: String,
    /// Where events PostgreSQL refuses go, with its error.
    pub dead_letter_table: String,
    /// `database.statement_timeout_ms`, set in every transaction ([`Tx::begin`]).
    pub statement_timeout_ms: u64,
    create_table: String,
    create_dead_letter: String,
    insert_dead_letter: String,
    copy_into_table: String,
    create_staging: String,
    copy_into_staging: String,
    insert_from_staging: String,
}

impl Statements {
    /// `table` is validated by the config (`name` or `schema.name`); it is
    /// quoted here all the same.
    pub fn new(table: &str, dead_letter_table: &str, statement_timeout_ms: u64) -> Self {
        let quote = quote_table;
        let quoted = quote(table);
        let dead = quote(dead_letter_table);
        let staging = format!("\"ingestd_staging_{}\"", table.replace('.', "_"));
        Self {
            table: quoted.clone(),
            dead_letter_table: dead.clone(),
            statement_timeout_ms,
            create_dead_letter: format!(
                "CREATE TABLE IF NOT EXISTS {dead} (\n  \
                 event_id    text,\n  \
                 device_id   text,\n  \
                 event_type  text,\n  \
                 ts          timestamptz,\n  \
                 received_at timestamptz,\n  \
                 payload     text,\n  \
                 error       text        NOT NULL,\n  \
                 failed_at   timestamptz NOT NULL DEFAULT now()\n)"
            ),
            insert_dead_letter: format!(
                "INSERT INTO {dead} (event_id, device_id, event_type, ts, received_at, payload, error) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            create_table: create_table_sql(&quoted),
            copy_into_table: format!("COPY {quoted} ({COLUMNS}) FROM STDIN (FORMAT binary)"),
            create_staging: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {quoted} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            ),
            copy_into_staging: format!("COPY {staging} ({COLUMNS}) FROM STDIN (FORMAT binary)"),
            insert_from_staging: format!(
                "INSERT INTO {quoted} ({COLUMNS}) SELECT {COLUMNS} FROM {staging} ORDER BY event_id \
                 ON CONFLICT DO NOTHING RETURNING event_id"
            ),
        }
    }
}

/// `name` or `schema.name`, each part quoted.
pub fn quote_table(table: &str) -> String {
    table.split('.').map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(".")
}

/// The SPEC's table, created if missing.
pub fn create_table_sql(quoted: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {quoted} (\n  \
         event_id    text PRIMARY KEY,\n  \
         device_id   text        NOT NULL,\n  \
         event_type  text        NOT NULL,\n  \
         ts          timestamptz NOT NULL,\n  \
         received_at timestamptz NOT NULL DEFAULT now(),\n  \
         payload     jsonb\n)"
    )
}

/// Creates the table when missing (or checks it exists when creation is off).
pub fn prepare_table(client: &mut Client, sql: &Statements, create: bool) -> Result<(), WriteError> {
    prepare_table_raw(client, sql, create, sql.statement_timeout_ms).map_err(WriteError::from)
}

/// [`prepare_table`] with PostgreSQL's typed error, for callers that sort
/// refusals from outages ([`is_refusal`]), within `statement_timeout_ms`.
/// One transaction, one round trip.
pub fn prepare_table_raw(
    client: &mut Client,
    sql: &Statements,
    create: bool,
    statement_timeout_ms: u64,
) -> Result<(), postgres::Error> {
    let body = if create {
        // Quiet the NOTICE "relation already exists" for these statements.
        format!("SET LOCAL client_min_messages = warning; {}; {}", sql.create_table, sql.create_dead_letter)
    } else {
        format!("SELECT 1 FROM {} LIMIT 0; SELECT 1 FROM {} LIMIT 0", sql.table, sql.dead_letter_table)
    };
    match in_transaction(client, statement_timeout_ms, &body) {
        // Two instances creating the same table at once: PostgreSQL's
        // IF NOT EXISTS is not atomic, and the loser gets a unique
        // violation on its catalog. The table exists now: check again.
        Err(e)
            if create
                && (e.code() == Some(&SqlState::UNIQUE_VIOLATION) || e.code() == Some(&SqlState::DUPLICATE_TABLE)) =>
        {
            in_transaction(client, statement_timeout_ms, &body)
        }
        other => other,
    }
}

/// Runs simple-query `statements` in one transaction within
/// `statement_timeout_ms`, sent as one query (one round trip); rolled back
/// if any fails.
pub fn in_transaction(client: &mut Client, statement_timeout_ms: u64, statements: &str) -> Result<(), postgres::Error> {
    let result = client.batch_execute(&format!("{}; {statements}; COMMIT", begin_sql(statement_timeout_ms)));
    if result.is_err() && !client.is_closed() {
        // A failed statement leaves the transaction open and aborted (the
        // rest of the query string is skipped): end it. Outside a
        // transaction (COMMIT itself failed) this is only a warning.
        let _ended = client.batch_execute("ROLLBACK");
    }
    result
}

fn begin_sql(statement_timeout_ms: u64) -> String {
    // 0 is PostgreSQL's "no limit", as in the configuration.
    format!("BEGIN; SET LOCAL statement_timeout = {statement_timeout_ms}")
}

/// A transaction that carries ingestd's limits on whichever server session
/// runs it (see the module docs). Rolled back when dropped uncommitted, like
/// `postgres::Transaction`, which cannot be started with more than `BEGIN`.
/// Derefs to the client for the statements inside it.
pub struct Tx<'a> {
    client: &'a mut Client,
    open: bool,
}

impl<'a> Tx<'a> {
    /// `BEGIN; SET LOCAL statement_timeout = …` in one round trip.
    pub fn begin(client: &'a mut Client, statement_timeout_ms: u64) -> Result<Self, postgres::Error> {
        let tx = Tx { client, open: true };
        // If this fails halfway (BEGIN ran, SET did not), drop rolls back.
        tx.client.batch_execute(&begin_sql(statement_timeout_ms))?;
        Ok(tx)
    }

    pub fn commit(mut self) -> Result<(), postgres::Error> {
        self.open = false;
        self.client.batch_execute("COMMIT")
    }

    pub fn rollback(mut self) -> Result<(), postgres::Error> {
        self.open = false;
        self.client.batch_execute("ROLLBACK")
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open && !self.client.is_closed() {
            let _rolled_back = self.client.batch_execute("ROLLBACK");
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client
    }
}

impl std::ops::DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
    }
}

/// One event PostgreSQL refused, with its reason.
pub struct DeadLetter<'a> {
    pub row: crate::row::RowView<'a>,
    pub error: &'a str,
}

/// Stores refused events in the dead-letter table, in one transaction. The
/// payload goes in as text: it may be the very value jsonb refused.
pub fn store_dead_letters(client: &mut Client, sql: &Statements, letters: &[DeadLetter<'_>]) -> Result<(), WriteError> {
    use std::time::{Duration, UNIX_EPOCH};
    let time = |pg_us: i64| {
        let unix_us = pg_us.saturating_add(crate::row::PG_EPOCH_UNIX_SECS * 1_000_000);
        UNIX_EPOCH + Duration::from_micros(unix_us.max(0) as u64)
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut tx = Tx::begin(client, sql.statement_timeout_ms)?;
    // Prepared, used and closed inside the transaction (module docs): the
    // statement is dropped before the COMMIT, so its Close goes first.
    let insert = tx.prepare(&sql.insert_dead_letter)?;
    for l in letters {
        let payload = l.row.payload.map(text);
        tx.execute(
            &insert,
            &[
                &text(l.row.event_id),
                &text(l.row.device_id),
                &text(l.row.event_type),
                &time(l.row.ts),
                &time(l.row.received_at),
                &payload,
                &l.error,
            ],
        )?;
    }
    drop(insert);
    tx.commit()?;
    Ok(())
}

/// What a committed batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// New rows.
    pub inserted: u64,
    /// Whether the whole batch was redone through staging after a violation.
    pub via_staging: bool,
    /// Ids inserted through staging (the others there were already stored).
    pub staged_ids: Vec<String>,
}

/// Streams some of a batch's tuples into a COPY (between the header and
/// trailer, which [`copy_batch`] writes). Called again if the batch is redone.
pub type RowWriter<'a> = &'a dyn Fn(&mut dyn std::io::Write) -> std::io::Result<()>;

/// Commits one batch idempotently, in one transaction.
///
/// `clean` rows are expected to be new and are COPYed straight into the
/// table. `suspects` (rows whose id was seen recently) go through staging and
/// `ON CONFLICT DO NOTHING` in the same transaction. If a clean row turns out
/// to be a duplicate after all, the transaction rolls back and everything is
/// redone through staging.
pub fn copy_batch(
    client: &mut Client,
    sql: &Statements,
    clean: RowWriter<'_>,
    suspects: Option<RowWriter<'_>>,
) -> Result<Committed, WriteError> {
    let mut tx = Tx::begin(client, sql.statement_timeout_ms)?;
    match copy(&mut tx, &sql.copy_into_table, clean) {
        Ok(copied) => {
            let staged_ids = match suspects {
                Some(rows) => copy_via_staging(&mut tx, sql, &[rows])?,
                None => Vec::new(),
            };
            tx.commit()?;
            return Ok(Committed { inserted: copied + staged_ids.len() as u64, via_staging: false, staged_ids });
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => tx.rollback()?,
        Err(e) => return Err(e.into()),
    }
    let mut tx = Tx::begin(client, sql.statement_timeout_ms)?;
    let all: Vec<RowWriter<'_>> = std::iter::once(clean).chain(suspects).collect();
    let staged_ids = copy_via_staging(&mut tx, sql, &all)?;
    tx.commit()?;
    Ok(Committed { inserted: staged_ids.len() as u64, via_staging: true, staged_ids })
}

/// COPY into the staging table, then `INSERT … ON CONFLICT DO NOTHING`;
/// returns the ids that were new.
fn copy_via_staging(tx: &mut Tx<'_>, sql: &Statements, rows: &[RowWriter<'_>]) -> Result<Vec<String>, postgres::Error> {
    tx.batch_execute(&sql.create_staging)?;
    let all = |out: &mut dyn std::io::Write| rows.iter().try_for_each(|write| write(out));
    copy(tx, &sql.copy_into_staging, &all)?;
    let inserted = tx.query(&sql.insert_from_staging, &[])?;
    inserted.iter().map(|row| row.try_get::<_, String>(0)).collect()
}

/// Bytes handed to the connection at a time while streaming a COPY.
///
/// `postgres::CopyInWriter` sends a `CopyData` message (and, through its
/// connection, a `send` system call) every 4 KiB it is given; rows are a few
/// hundred bytes each. Gathering them first makes a 5,000-row batch a handful
/// of large sends instead of hundreds of small ones (the writer threads spent
/// about half their CPU in `tcp_sendmsg` before).
const COPY_CHUNK_BYTES: usize = 256 * 1024;

fn copy(tx: &mut Tx<'_>, statement: &str, write_rows: RowWriter<'_>) -> Result<u64, postgres::Error> {
    let mut w = tx.copy_in(statement)?;
    // An I/O error while streaming is the connection failing; `finish` then
    // reports it as a typed `postgres::Error`, which is what callers classify.
    let _streamed = {
        let mut chunks = std::io::BufWriter::with_capacity(COPY_CHUNK_BYTES, &mut w);
        chunks
            .write_all(HEADER)
            .and_then(|()| write_rows(&mut chunks))
            .and_then(|()| chunks.write_all(TRAILER))
            .and_then(|()| chunks.flush())
    };
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_quote_and_name_staging() {
        let s = Statements::new("ingest.events", "ingest.events_dead_letter", 5_000);
        assert_eq!(s.dead_letter_table, "\"ingest\".\"events_dead_letter\"");
        assert_eq!(s.table, "\"ingest\".\"events\"");
        assert!(s.insert_from_staging.contains("\"ingestd_staging_ingest_events\""));
        assert!(s.copy_into_table.ends_with("FROM STDIN (FORMAT binary)"));
    }

    #[test]
    fn sqlstate_classes() {
        assert!(is_transient_state(&SqlState::ADMIN_SHUTDOWN));
        assert!(is_transient_state(&SqlState::CONNECTION_FAILURE));
        assert!(is_transient_state(&SqlState::QUERY_CANCELED));
        assert!(!is_transient_state(&SqlState::UNIQUE_VIOLATION));
        assert!(!is_transient_state(&SqlState::INVALID_TEXT_REPRESENTATION));
    }
}
