//! Test harness shared by every module.
//!
//! - [`Ingestd`] / [`Server`]: spawn the real `ingestd` binary on port 0
//!   against the cluster named by `INGESTD_TEST_DATABASE_URL`, each with a
//!   table of its own, wait for its readiness line, keep draining its stdout
//!   and stderr, and kill it on drop (its stderr is printed when a test fails).
//! - [`Req`] / [`Conn`] / [`Response`]: a tiny raw HTTP/1.1 client over
//!   `std::net::TcpStream`. Requests are exact bytes (so pipelining, chunked
//!   bodies and stalls can be tested); responses are parsed by hand
//!   (Content-Length, chunked, or read-to-close). Every socket has timeouts so
//!   a test can fail but never hang.
//! - Database helpers (sync `postgres` client), event builders, response
//!   assertions, and [`eventually`], a deadline poll used instead of sleeps.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ingestd");
/// How long a server may take to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket read/write timeout: long enough for a COPY on a loaded 2-core box,
/// short enough that a stuck server fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// The readiness line prefix (docs/INTERFACE.md).
pub const READY_PREFIX: &str = "ingestd listening on http://";

// ---------------------------------------------------------------------------
// Environment and unique names
// ---------------------------------------------------------------------------

/// The PostgreSQL URL the suite runs against.
pub fn database_url() -> String {
    match std::env::var("INGESTD_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "INGESTD_TEST_DATABASE_URL is not set. These integration tests need a \
             PostgreSQL cluster: run them with scripts/test.sh, which starts a \
             throwaway cluster and exports INGESTD_TEST_DATABASE_URL \
             (postgres://USER@127.0.0.1:PORT/postgres)."
        ),
    }
}

/// A random-ish u64 without a `rand` dependency.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos());
    h.finish()
}

/// A name unique across tests, processes and runs: lowercase `[a-z0-9_]`,
/// usable unquoted as a PostgreSQL identifier.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{n}_{:08x}", std::process::id(), random_u64() as u32)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// RFC 3339 (UTC, millisecond precision) for an epoch-ms instant.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("timestamp in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Epoch ms of an RFC 3339 string (the test's own reference parser).
pub fn parse_rfc3339_ms(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s).expect("valid RFC 3339 in test").timestamp_millis()
}

// ---------------------------------------------------------------------------
// Deadline polling
// ---------------------------------------------------------------------------

/// Polls `f` until it returns `Some`, with a growing pause (5 ms .. 100 ms),
/// and panics naming `what` once `timeout` has passed.
pub fn eventually<T>(timeout: Duration, what: impl fmt::Display, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Spawning the binary
// ---------------------------------------------------------------------------

/// A command line for `ingestd`, built before spawning.
///
/// Defaults keep tests light: one shard, one writer. Tests that care about
/// concurrency raise them with [`Ingestd::set`].
#[derive(Clone)]
pub struct Ingestd {
    sets: Vec<(String, String)>,
    table: Option<String>,
    database_url: Option<String>,
    config_file: Option<String>,
    env: Vec<(String, String)>,
}

impl Default for Ingestd {
    fn default() -> Self {
        Self::new()
    }
}

impl Ingestd {
    pub fn new() -> Self {
        Ingestd {
            sets: vec![
                ("server.shards".into(), "1".into()),
                ("writer.writers".into(), "1".into()),
                // Never pin: tests run many servers side by side on 2 cores.
                ("server.pin_cores".into(), "false".into()),
            ],
            table: None,
            database_url: None,
            config_file: None,
            env: Vec::new(),
        }
    }

    /// `--config PATH` (flags still win over it).
    pub fn config_file(mut self, path: &str) -> Self {
        self.config_file = Some(path.to_string());
        self
    }

    /// `--set key=value`; a later call for the same key replaces the earlier.
    pub fn set(mut self, key: &str, value: impl fmt::Display) -> Self {
        let value = value.to_string();
        if let Some(slot) = self.sets.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.sets.push((key.to_string(), value));
        }
        self
    }

    /// Use an existing table (e.g. to restart on the same data). The server
    /// then does not drop it when it is dropped.
    pub fn table(mut self, name: &str) -> Self {
        self.table = Some(name.to_string());
        self
    }

    /// An environment variable for the process (e.g. `PGPASSWORD`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Override the database URL (default: `INGESTD_TEST_DATABASE_URL`).
    pub fn database_url(mut self, url: &str) -> Self {
        self.database_url = Some(url.to_string());
        self
    }

    /// Spawns the server and waits for its readiness line.
    pub fn start(self) -> Server {
        let db_url = self.database_url.clone().unwrap_or_else(database_url);
        let (table, owns_table) = match &self.table {
            Some(t) => (t.clone(), false),
            None => (unique("t"), true),
        };
        let mut cmd = command();
        if let Some(path) = &self.config_file {
            cmd.args(["--config", path]);
        }
        cmd.args(["--listen", "127.0.0.1:0", "--database-url", &db_url]);
        cmd.arg("--set").arg(format!("database.table={table}"));
        for (k, v) in &self.sets {
            cmd.arg("--set").arg(format!("{k}={v}"));
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));

        let stderr = Arc::new(Mutex::new(Vec::<u8>::new()));
        let stderr_thread = drain(child.stderr.take().unwrap(), stderr.clone());
        let stdout = Arc::new(Mutex::new(Vec::<u8>::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<String>();
        let stdout_pipe = child.stdout.take().unwrap();
        let stdout_buf = stdout.clone();
        let stdout_thread = thread::spawn(move || {
            let mut reader = BufReader::new(stdout_pipe);
            let mut line = String::new();
            let mut ready_tx = Some(ready_tx);
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        stdout_buf.lock().unwrap().extend_from_slice(line.as_bytes());
                        if let Some(rest) = line.trim_end().strip_prefix(READY_PREFIX)
                            && let Some(tx) = ready_tx.take()
                        {
                            let _ = tx.send(rest.to_string());
                        }
                    }
                }
            }
        });

        let started = Instant::now();
        let addr = match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(rest) => rest.trim_end_matches('/').parse::<SocketAddr>().unwrap_or_else(|e| {
                let _ = child.kill();
                panic!("cannot parse address in readiness line {READY_PREFIX}{rest}: {e}")
            }),
            Err(err) => {
                // Either it never got ready or it exited: give a dead child a
                // moment to be reaped, then report everything we know.
                let status = wait_with_deadline(&mut child, Duration::from_secs(2));
                if status.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let _ = stderr_thread.join();
                panic!(
                    "ingestd did not print its readiness line ({err:?} after {:?}); exit status: \
                     {status:?}\nargs: {args:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    started.elapsed(),
                    String::from_utf8_lossy(&stdout.lock().unwrap()),
                    String::from_utf8_lossy(&stderr.lock().unwrap()),
                );
            }
        };
        Server {
            child,
            addr,
            table,
            owns_table,
            db_url,
            stdout,
            stderr,
            threads: vec![stdout_thread, stderr_thread],
            exit: None,
        }
    }
}

/// A `Command` for the binary with every inherited `INGESTD_*` variable
/// removed, so the developer's environment cannot change a test.
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("INGESTD_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn drain(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(0) | Err(_) => break,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Output of a short-lived CLI run (e.g. `--check-config`).
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs the binary to completion (killing it after `timeout`).
pub fn run_cli(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> CliOutput {
    let mut cmd = command();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let t1 = drain(child.stdout.take().unwrap(), out.clone());
    let t2 = drain(child.stderr.take().unwrap(), err.clone());
    let status = match wait_with_deadline(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = (t1.join(), t2.join());
            panic!(
                "`ingestd {}` did not exit within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.lock().unwrap()),
                String::from_utf8_lossy(&err.lock().unwrap()),
            );
        }
    };
    let _ = (t1.join(), t2.join());
    let stdout = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err.lock().unwrap()).into_owned();
    CliOutput { status, stdout, stderr }
}

/// A running `ingestd`. Killed (SIGKILL) on drop unless it already exited;
/// on a failing test its stderr is printed.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub table: String,
    owns_table: bool,
    db_url: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

impl Server {
    /// A server with the defaults of [`Ingestd::new`].
    pub fn start() -> Server {
        Ingestd::new().start()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether dropping this server drops its table (default: when the
    /// harness made up the table name).
    pub fn set_owns_table(&mut self, owns: bool) {
        self.owns_table = owns;
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// How many bytes of stderr have been read so far: take it before an
    /// action, then [`Server::wait_for_log_since`] sees only what came after.
    pub fn log_mark(&self) -> usize {
        self.stderr.lock().unwrap().len()
    }

    /// Waits for a complete stderr line containing `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_since(0, &[needle], timeout)
    }

    /// Waits for a complete stderr line, written after `mark` (see
    /// [`Server::log_mark`]), that contains one of `needles`; returns the
    /// first such line. Panics on timeout (the stderr tail is printed when
    /// the server is dropped).
    pub fn wait_for_log_since(&self, mark: usize, needles: &[&str], timeout: Duration) -> String {
        eventually(timeout, format_args!("a log line with one of {needles:?}"), || {
            let buf = self.stderr.lock().unwrap();
            let text = String::from_utf8_lossy(&buf[mark.min(buf.len())..]);
            text.split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .find(|l| needles.iter().any(|n| l.contains(n)))
                .map(|l| l.trim_end().to_string())
        })
    }

    /// Sends SIGHUP and waits for the reload's last log line (src/app.rs
    /// `reload`): "SIGHUP: configuration reloaded" when it was applied, or
    /// the refusal ("SIGHUP: reload refused", or "SIGHUP: token table
    /// refused", one line per problem: the first is returned). Once it is
    /// logged, the new configuration and tokens are in force (or the old
    /// ones kept), so a test can check either at once.
    pub fn sighup(&self) -> String {
        let mark = self.log_mark();
        self.signal("HUP");
        self.wait_for_log_since(
            mark,
            &["SIGHUP: configuration reloaded", "SIGHUP: reload refused", "SIGHUP: token table refused"],
            Duration::from_secs(10),
        )
    }

    /// Sends a signal by name ("TERM", "INT", "KILL") with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args([format!("-{name}"), self.pid().to_string()]).status().expect("run kill(1)");
        assert!(status.success(), "kill -{name} {} failed: {status}", self.pid());
    }

    /// Waits for the process to exit; panics (with its stderr) on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exit {
            return s;
        }
        match wait_with_deadline(&mut self.child, timeout) {
            Some(s) => {
                self.exit = Some(s);
                s
            }
            None => panic!(
                "ingestd (pid {}) did not exit within {timeout:?}\n--- stderr tail ---\n{}",
                self.pid(),
                tail(&self.stderr(), 6000)
            ),
        }
    }

    /// Has the process exited (without waiting)?
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.exit = Some(s);
        }
        self.exit
    }

    // -- HTTP --------------------------------------------------------------

    /// A fresh connection.
    pub fn conn(&self) -> Conn {
        Conn::open(self.addr)
    }

    /// One request on a fresh connection.
    pub fn send(&self, req: &Req) -> Response {
        self.conn().roundtrip(req)
    }

    pub fn get(&self, path: &str) -> Response {
        self.send(&Req::get(path))
    }

    /// `POST /events` with one JSON value.
    pub fn post_event(&self, event: &Value) -> Response {
        self.send(&Req::post("/events").json(event))
    }

    /// `POST /events/batch` with a JSON array.
    pub fn post_batch(&self, events: &[Value]) -> Response {
        self.send(&Req::post("/events/batch").json(&Value::Array(events.to_vec())))
    }

    /// `POST /events/batch` with an NDJSON body as given.
    pub fn post_ndjson(&self, body: &str) -> Response {
        self.send(
            &Req::post("/events/batch").header("Content-Type", "application/x-ndjson").body(body.as_bytes().to_vec()),
        )
    }

    // -- Database ----------------------------------------------------------

    pub fn db(&self) -> postgres::Client {
        db_connect(&self.db_url)
    }

    /// Rows in this server's table.
    pub fn count(&self) -> i64 {
        let sql = format!("SELECT count(*) FROM {}", self.table);
        self.db().query_one(sql.as_str(), &[]).expect("count rows").get(0)
    }

    /// How many of `ids` have a row.
    pub fn count_ids(&self, ids: &[String]) -> i64 {
        count_ids(&mut self.db(), &self.table, ids)
    }

    /// Rows with this event_id (0 or 1 with a primary key).
    pub fn count_id(&self, id: &str) -> i64 {
        self.count_ids(&[id.to_string()])
    }

    /// The stored row for `event_id`, decoded without extra postgres features.
    pub fn row(&self, event_id: &str) -> Option<StoredRow> {
        let sql = format!(
            "SELECT event_id, device_id, event_type, \
                    (extract(epoch FROM ts) * 1000)::int8, \
                    payload::text, \
                    extract(epoch FROM (clock_timestamp() - received_at))::float8 \
             FROM {} WHERE event_id = $1",
            self.table
        );
        let rows = self.db().query(sql.as_str(), &[&event_id]).expect("select row");
        assert!(rows.len() <= 1, "{} rows for event_id {event_id}", rows.len());
        rows.first().map(StoredRow::from_row)
    }

    /// Sessions waiting for a lock on this server's table (e.g. a writer's
    /// COPY behind a test's `LOCK TABLE`).
    pub fn lock_waiters(&self) -> i64 {
        let sql = "SELECT count(*) FROM pg_locks WHERE relation = $1::text::regclass AND NOT granted";
        self.db().query_one(sql, &[&self.table]).expect("count lock waiters").get(0)
    }

    /// Every stored row.
    pub fn rows(&self) -> Vec<StoredRow> {
        let sql = format!(
            "SELECT event_id, device_id, event_type, \
                    (extract(epoch FROM ts) * 1000)::int8, \
                    payload::text, \
                    extract(epoch FROM (clock_timestamp() - received_at))::float8 \
             FROM {} ORDER BY event_id",
            self.table
        );
        self.db().query(sql.as_str(), &[]).expect("select rows").iter().map(StoredRow::from_row).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if thread::panicking() {
            eprintln!(
                "--- ingestd (pid {}, {}, table {}) exit {:?}; stderr tail ---\n{}",
                self.child.id(),
                self.addr,
                self.table,
                self.exit,
                tail(&self.stderr(), 8000)
            );
        } else if self.owns_table {
            // Best effort: keep the throwaway cluster small. Kept on failure
            // for inspection.
            if let Ok(mut db) = try_db_connect(&self.db_url) {
                let _ = db.batch_execute(&format!("DROP TABLE IF EXISTS {0}, {0}_dead_letter, {0}_state", self.table));
            }
        }
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn try_db_connect(url: &str) -> Result<postgres::Client, postgres::Error> {
    let mut config: postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(10));
    config.connect(postgres::NoTls)
}

pub fn db_connect(url: &str) -> postgres::Client {
    try_db_connect(url).unwrap_or_else(|e| panic!("connect to test database {url}: {e}"))
}

pub fn count_ids(db: &mut postgres::Client, table: &str, ids: &[String]) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE event_id = ANY($1)");
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    db.query_one(sql.as_str(), &[&ids]).expect("count ids").get(0)
}

/// One row of the events table, as the tests see it.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub event_id: String,
    pub device_id: String,
    pub event_type: String,
    /// `ts` as epoch milliseconds.
    pub ts_ms: i64,
    /// `payload` parsed back from `payload::text` (`None` for SQL NULL).
    pub payload: Option<Value>,
    /// Seconds between `received_at` and the query (None if NULL).
    pub received_age_s: Option<f64>,
}

impl StoredRow {
    fn from_row(row: &postgres::Row) -> StoredRow {
        let payload: Option<String> = row.get(4);
        StoredRow {
            event_id: row.get(0),
            device_id: row.get(1),
            event_type: row.get(2),
            ts_ms: row.get(3),
            payload: payload.map(|p| serde_json::from_str(&p).unwrap_or_else(|e| panic!("payload::text {p:?}: {e}"))),
            received_age_s: row.get(5),
        }
    }
}

// ---------------------------------------------------------------------------
// Events and ingest answers
// ---------------------------------------------------------------------------

/// A valid event with the given id, timestamped now.
pub fn event(id: &str) -> Value {
    json!({
        "event_id": id,
        "device_id": "dev-1",
        "type": "temperature",
        "ts": now_ms(),
        "payload": {"celsius": 21.5, "seq": id},
    })
}

/// `n` valid events with ids `{prefix}-{i}`.
pub fn events(prefix: &str, n: usize) -> Vec<Value> {
    (0..n).map(|i| event(&format!("{prefix}-{i}"))).collect()
}

/// The `event_id`s of a list of events.
pub fn ids_of(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["event_id"].as_str().expect("event_id").to_string()).collect()
}

/// A parsed ingest answer `{"accepted": N, "rejected": [{"index", "error"}]}`.
#[derive(Debug)]
pub struct IngestAnswer {
    pub accepted: u64,
    pub rejected: Vec<(usize, String)>,
}

impl IngestAnswer {
    pub fn rejected_indexes(&self) -> BTreeSet<usize> {
        self.rejected.iter().map(|(i, _)| *i).collect()
    }
}

/// Parses an ingest answer, checking its shape strictly: exactly the keys
/// `accepted` (integer) and `rejected` (array of `{index: integer, error:
/// non-empty string}`).
pub fn ingest_answer(resp: &Response) -> IngestAnswer {
    let v = resp.json();
    let obj = v.as_object().unwrap_or_else(|| panic!("ingest answer is not an object:\n{resp:?}"));
    let accepted = obj
        .get("accepted")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("ingest answer lacks integer \"accepted\":\n{resp:?}"));
    let rejected = obj
        .get("rejected")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("ingest answer lacks array \"rejected\":\n{resp:?}"))
        .iter()
        .map(|r| {
            let index = r
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("rejection {r} lacks integer \"index\":\n{resp:?}"));
            let error = r
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("rejection {r} lacks string \"error\":\n{resp:?}"));
            assert!(!error.trim().is_empty(), "rejection {r} has an empty error:\n{resp:?}");
            (index as usize, error.to_string())
        })
        .collect();
    IngestAnswer { accepted, rejected }
}

/// Asserts status, accepted count and exactly which indexes were rejected.
pub fn assert_ingest(resp: &Response, status: u16, accepted: u64, rejected: &[usize]) -> IngestAnswer {
    assert_eq!(resp.status, status, "unexpected status:\n{resp:?}");
    let answer = ingest_answer(resp);
    let want: BTreeSet<usize> = rejected.iter().copied().collect();
    assert_eq!(answer.rejected_indexes(), want, "rejected indexes differ:\n{resp:?}");
    assert_eq!(answer.rejected.len(), rejected.len(), "duplicate rejection entries:\n{resp:?}");
    assert_eq!(answer.accepted, accepted, "accepted count differs:\n{resp:?}");
    answer
}

/// Asserts an error answer: the status, a JSON object body with a non-empty
/// string `error` (SPEC: "each with a JSON body {"error": "...", ...}").
pub fn assert_error(resp: &Response, status: u16) -> String {
    assert_eq!(resp.status, status, "unexpected status:\n{resp:?}");
    let v: Value =
        serde_json::from_slice(&resp.body).unwrap_or_else(|e| panic!("error body is not JSON ({e}):\n{resp:?}"));
    let msg = v
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("error body lacks string \"error\":\n{resp:?}"));
    assert!(!msg.trim().is_empty(), "empty error message:\n{resp:?}");
    msg.to_string()
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ---------------------------------------------------------------------------

/// An HTTP/1.1 request rendered to exact bytes by [`Req::to_bytes`].
///
/// `Host` is always sent; `Content-Length` is added for POST (or any body)
/// unless a `Content-Length`/`Transfer-Encoding` header was given or
/// [`Req::no_length`] was called.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    auto_length: bool,
}

impl Req {
    pub fn new(method: &str, path: &str) -> Req {
        Req { method: method.into(), path: path.into(), headers: Vec::new(), body: Vec::new(), auto_length: true }
    }
    pub fn get(path: &str) -> Req {
        Req::new("GET", path)
    }
    pub fn post(path: &str) -> Req {
        Req::new("POST", path)
    }
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = body.into();
        self
    }
    /// `Content-Type: application/json` and the serialized value.
    pub fn json(self, v: &Value) -> Req {
        self.header("Content-Type", "application/json").body(serde_json::to_vec(v).unwrap())
    }
    /// Do not add a `Content-Length` header.
    pub fn no_length(mut self) -> Req {
        self.auto_length = false;
        self
    }
    fn has_header(&self, name: &str) -> bool {
        self.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        if !self.has_header("host") {
            out.extend_from_slice(b"Host: 127.0.0.1\r\n");
        }
        for (k, v) in &self.headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        let framed = self.has_header("content-length") || self.has_header("transfer-encoding");
        if self.auto_length && !framed && (self.method == "POST" || !self.body.is_empty()) {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// Encodes `parts` as a chunked body (uppercase hex sizes), with the final
/// zero-length chunk.
pub fn chunked(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts.iter().filter(|p| !p.is_empty()) {
        out.extend_from_slice(format!("{:X}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Gzip-compresses bytes.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use flate2::Compression;
    use flate2::write::GzEncoder;
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A parsed HTTP response.
#[derive(Clone)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON; panics with the whole response if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}):\n{self:?}"))
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} {} {}", self.version, self.status, self.reason)?;
        for (k, v) in &self.headers {
            writeln!(f, "{k}: {v}")?;
        }
        let text = self.text();
        if text.len() > 3000 {
            write!(f, "\n{}... ({} bytes)", &text[..text.floor_char_boundary(3000)], self.body.len())
        } else {
            write!(f, "\n{text}")
        }
    }
}

/// One client connection, with its unread bytes: plain TCP, or TLS
/// ([`TlsConn`]) with the same request and response handling.
pub struct Conn<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        Conn::try_open(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    pub fn try_open(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: Vec::new() })
    }

    pub fn set_read_timeout(&mut self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// Reads until the peer closes; true if it closed cleanly (EOF) with no
    /// further bytes, false on timeout.
    pub fn closed_by_peer(&mut self, timeout: Duration) -> bool {
        self.set_read_timeout(timeout);
        let mut b = [0u8; 256];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return self.buf.is_empty(),
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return self.buf.is_empty(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

impl<S: Read + Write> Conn<S> {
    /// Writes exact bytes; panics on error.
    pub fn write(&mut self, bytes: &[u8]) {
        self.try_write(bytes).unwrap_or_else(|e| panic!("write {} bytes: {e}", bytes.len()));
    }

    pub fn try_write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes a request and reads its response; panics on transport errors.
    pub fn roundtrip(&mut self, req: &Req) -> Response {
        self.write(&req.to_bytes());
        self.read_response()
    }

    pub fn try_roundtrip(&mut self, req: &Req) -> io::Result<Response> {
        self.try_write(&req.to_bytes())?;
        self.try_read_response()
    }

    pub fn read_response(&mut self) -> Response {
        self.try_read_response().unwrap_or_else(|e| panic!("read response: {e}"))
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut b = [0u8; 16384];
        let n = retry_interrupted(|| self.stream.read(&mut b))?;
        self.buf.extend_from_slice(&b[..n]);
        Ok(n)
    }

    fn eof(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed {what}; unread bytes: {:?}", String::from_utf8_lossy(&self.buf)),
        )
    }

    /// Reads one CRLF-terminated line (without the CRLF).
    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..p]).into_owned();
                self.buf.drain(..p + 2);
                return Ok(line);
            }
            if self.fill()? == 0 {
                return Err(self.eof("inside a chunked body"));
            }
        }
    }

    fn read_exact_buf(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(self.eof(&format!("with {} of {n} body bytes", self.buf.len())));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one response (an interim 1xx counts as one).
    pub fn try_read_response(&mut self) -> io::Result<Response> {
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p;
            }
            if self.buf.len() > 1 << 20 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "response head over 1 MiB"));
            }
            if self.fill()? == 0 {
                return Err(self.eof("before a full response head"));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {status_line:?}")))?;
        if !version.starts_with("HTTP/1.") {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {status_line:?}")));
        }
        let reason = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        for line in lines {
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad header line {line:?}")))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let mut resp = Response { version, status, reason, headers, body: Vec::new() };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(resp);
        }
        let chunked = resp.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let line = self.read_line()?;
                let size_hex = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size line {line:?}")))?;
                if size == 0 {
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                let data = self.read_exact_buf(size)?;
                resp.body.extend_from_slice(&data);
                if !self.read_line()?.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk not followed by CRLF"));
                }
            }
        } else if let Some(cl) = resp.header("content-length") {
            let n: usize = cl
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad Content-Length {cl:?}")))?;
            resp.body = self.read_exact_buf(n)?;
        } else {
            // No framing: the body runs to connection close.
            while self.fill()? > 0 {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// JSON helpers for /stats
// ---------------------------------------------------------------------------

/// Sum of every numeric value, at any depth, under a key that contains
/// `needle` (case-insensitive): `{"accepted": 3}` and
/// `{"events": {"accepted_total": {"http": 2, "ws": 1}}}` both count 3.
pub fn sum_numeric_keys(v: &Value, needle: &str) -> f64 {
    fn walk(v: &Value, needle: &str, under: bool) -> f64 {
        match v {
            Value::Number(n) if under => n.as_f64().unwrap_or(0.0),
            Value::Object(m) => {
                m.iter().map(|(k, v)| walk(v, needle, under || k.to_ascii_lowercase().contains(needle))).sum()
            }
            Value::Array(a) => a.iter().map(|v| walk(v, needle, under)).sum(),
            _ => 0.0,
        }
    }
    walk(v, needle, false)
}

// ---------------------------------------------------------------------------
// Prometheus text format (GET /metrics): the one parser of the suite
// ---------------------------------------------------------------------------

/// One sample of a scrape.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

impl fmt::Display for Sample {
    /// `name{k="v",...} value` (label values shown unescaped).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        write!(f, " {}", self.value)
    }
}

/// A scrape read by [`parse_scrape`]: its text, its samples in order, and
/// each family's TYPE.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// A histogram's cumulative bucket counts by `le` (as written), in
    /// order, summed over its series.
    pub fn buckets(&self, family: &str) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = Vec::new();
        for s in self.series(&format!("{family}_bucket")) {
            let le = s.label("le").unwrap_or_default();
            match out.iter_mut().find(|(l, _)| l == le) {
                Some((_, n)) => *n += s.value,
                None => out.push((le.to_string(), s.value)),
            }
        }
        out
    }

    /// The samples named `name` (exactly: a summary's `_sum` is its own name).
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The sum of the samples named `name`, only those with `label` if given.
    pub fn sum(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.series(name).filter(|s| label.is_none_or(|(k, v)| s.label(k) == Some(v))).map(|s| s.value).sum()
    }
}

/// A strict reader of the Prometheus text format 0.0.4: every line is a
/// `# HELP`, `# TYPE`, other comment, blank, or `name{labels} value [ts]`
/// with a float value; names match `^[a-zA-Z_:][a-zA-Z0-9_:]*$`, label names
/// `^[a-zA-Z_][a-zA-Z0-9_]*$`, label values are quoted with only `\\`,
/// `\"` and `\n` escapes; every sample's family has a HELP and a TYPE
/// (of a known type) before it; HELP and TYPE appear at most once per
/// family; a family's lines are one group; no series appears twice; a
/// summary's samples are `{quantile=...}`, `_sum` and `_count`; a
/// histogram's are `_bucket{le=...}` with `le` ascending, counts cumulative
/// and a `+Inf` bucket last, then `_sum` and `_count`, with `_count` equal
/// to the `+Inf` bucket (each series of labels other than `le` on its own);
/// counters end in `_total` and are not negative. Panics naming the first
/// bad line (a histogram left without `_count` is named at the line that
/// ends its family, or at `end of text`).
pub fn parse_scrape(text: &str) -> Scrape {
    try_parse_scrape(text).unwrap_or_else(|e| panic!("{e}\n--- scrape ---\n{text}"))
}

/// [`parse_scrape`], with the first bad line as an error
/// (`"/metrics line N: WHY: LINE"`).
pub fn try_parse_scrape(text: &str) -> Result<Scrape, String> {
    fn metric_name_ok(s: &str) -> bool {
        let mut cs = s.chars();
        matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn label_name_ok(s: &str) -> bool {
        let mut cs = s.chars();
        matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeSet<String> = BTreeSet::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series: BTreeSet<String> = BTreeSet::new();
    let mut samples = Vec::new();
    // The histogram series of the current family (by labels without `le`):
    // last `le` and count seen, the `+Inf` count, whether `_count` came.
    #[derive(Default)]
    struct Buckets {
        last: Option<(f64, f64)>,
        inf: Option<f64>,
        counted: bool,
        summed: bool,
    }
    let mut buckets: BTreeMap<String, Buckets> = BTreeMap::new();
    // Called when a histogram family's group ends.
    let close = |buckets: &mut BTreeMap<String, Buckets>| -> Result<(), &'static str> {
        let unfinished = buckets.values().any(|b| !b.counted);
        buckets.clear();
        if unfinished { Err("histogram series without _count") } else { Ok(()) }
    };
    // A family's group ends when another family's line starts.
    let mut enter = |family: &str, current: &mut Option<String>| -> Result<(), &'static str> {
        if current.as_deref() != Some(family) {
            if finished.contains(family) {
                return Err("lines of this metric family are not grouped together");
            }
            if let Some(prev) = current.take() {
                finished.insert(prev);
            }
            *current = Some(family.to_string());
        }
        Ok(())
    };
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("/metrics line {}: {why}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.trim_start().splitn(3, ' ');
            match words.next() {
                Some("HELP") => {
                    let name = words.next().ok_or_else(|| bad("HELP without a name"))?;
                    if !metric_name_ok(name) {
                        return Err(bad("bad metric name in HELP"));
                    }
                    if words.next().is_none_or(|h| h.trim().is_empty()) {
                        return Err(bad("empty HELP text"));
                    }
                    if current.as_deref() != Some(name) {
                        close(&mut buckets).map_err(bad)?;
                    }
                    enter(name, &mut current).map_err(bad)?;
                    if !helps.insert(name.to_string()) {
                        return Err(bad("second HELP for this family"));
                    }
                }
                Some("TYPE") => {
                    let name = words.next().ok_or_else(|| bad("TYPE without a name"))?;
                    let kind = words.next().ok_or_else(|| bad("TYPE without a type"))?.trim();
                    if !metric_name_ok(name) {
                        return Err(bad("bad metric name in TYPE"));
                    }
                    if !["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind) {
                        return Err(bad("unknown metric type"));
                    }
                    if current.as_deref() != Some(name) {
                        close(&mut buckets).map_err(bad)?;
                    }
                    enter(name, &mut current).map_err(bad)?;
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(bad("second TYPE for this family"));
                    }
                }
                _ => {} // any other comment
            }
            continue;
        }
        // name{labels} value [timestamp]
        let name_end = line.find(['{', ' ']).ok_or_else(|| bad("no value"))?;
        let name = &line[..name_end];
        if !metric_name_ok(name) {
            return Err(bad("metric name does not match ^[a-zA-Z_:][a-zA-Z0-9_:]*$"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let close = loop {
                let start = match chars.peek() {
                    Some(&(i, '}')) => break i,
                    Some(&(i, _)) => i,
                    None => return Err(bad("unclosed label set")),
                };
                let eq =
                    chars.by_ref().find(|&(_, c)| c == '=').map(|(i, _)| i).ok_or_else(|| bad("label without ="))?;
                let lname = &body[start..eq];
                if !label_name_ok(lname) {
                    return Err(bad("bad label name"));
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad("label value not quoted"));
                }
                let mut value = String::new();
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            _ => return Err(bad("bad escape in label value")),
                        },
                        '"' => {
                            closed = true;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                if !closed {
                    return Err(bad("unterminated label value"));
                }
                if labels.insert(lname.to_string(), value).is_some() {
                    return Err(bad("label repeated"));
                }
                match chars.next() {
                    Some((_, ',')) => {}
                    Some((i, '}')) => break i,
                    Some(_) => return Err(bad("expected , or } after a label")),
                    None => return Err(bad("unclosed label set")),
                }
            };
            rest = &body[close + 1..];
        }
        if !rest.starts_with(' ') {
            return Err(bad("no space before the value"));
        }
        let mut fields = rest.split_whitespace();
        let value = match fields.next().ok_or_else(|| bad("no value"))? {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| bad("value is not a float"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| bad("timestamp is not an integer"))?;
        }
        if fields.next().is_some() {
            return Err(bad("trailing fields"));
        }
        // Its family: the name itself, or a summary/histogram's base name.
        let family = if types.contains_key(name) {
            name.to_string()
        } else {
            ["_sum", "_count", "_bucket"]
                .iter()
                .find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    let kind = types.get(base)?;
                    let fits = match *suffix {
                        "_bucket" => kind == "histogram",
                        _ => kind == "summary" || kind == "histogram",
                    };
                    fits.then(|| base.to_string())
                })
                .ok_or_else(|| bad("sample without a TYPE line before it"))?
        };
        if !helps.contains(&family) {
            return Err(bad("sample without a HELP line before it"));
        }
        if current.as_deref() != Some(family.as_str()) {
            close(&mut buckets).map_err(bad)?;
        }
        enter(&family, &mut current).map_err(bad)?;
        match types[&family].as_str() {
            "summary" if name == family && !labels.contains_key("quantile") => {
                return Err(bad("summary sample without a quantile label"));
            }
            "summary" | "histogram" if name != family && labels.contains_key("quantile") => {
                return Err(bad("quantile label on _sum/_count"));
            }
            "histogram" if name == family => {
                return Err(bad("histogram sample without _bucket, _sum or _count"));
            }
            "histogram" if name != family && !name.ends_with("_bucket") && labels.contains_key("le") => {
                return Err(bad("le label on _sum/_count"));
            }
            "histogram" => {
                let mut others = labels.clone();
                let le = others.remove("le");
                let b = buckets.entry(format!("{others:?}")).or_default();
                if name.ends_with("_bucket") {
                    let le = match le.as_deref() {
                        None => return Err(bad("histogram bucket without le")),
                        Some("+Inf") => f64::INFINITY,
                        Some(le) => le.parse::<f64>().map_err(|_| bad("le is not a float"))?,
                    };
                    if b.counted || b.summed {
                        return Err(bad("histogram bucket after _sum/_count"));
                    }
                    if b.inf.is_some() {
                        return Err(bad("histogram bucket after the +Inf bucket"));
                    }
                    if let Some((last_le, last_n)) = b.last {
                        if le <= last_le {
                            return Err(bad("le not ascending"));
                        }
                        if value < last_n {
                            return Err(bad("histogram bucket counts not cumulative"));
                        }
                    }
                    if value.is_nan() || value < 0.0 {
                        return Err(bad("negative or NaN bucket count"));
                    }
                    b.last = Some((le, value));
                    if le == f64::INFINITY {
                        b.inf = Some(value);
                    }
                } else if name.ends_with("_count") {
                    match b.inf {
                        None => return Err(bad("histogram _count without a +Inf bucket before it")),
                        Some(inf) if inf != value => return Err(bad("histogram _count differs from its +Inf bucket")),
                        Some(_) => b.counted = true,
                    }
                } else {
                    b.summed = true;
                }
            }
            "counter" if !name.ends_with("_total") => {
                return Err(bad("counter name does not end in _total"));
            }
            "counter" if value.is_nan() || value < 0.0 => return Err(bad("negative or NaN counter")),
            _ => {}
        }
        if !series.insert(format!("{name}{labels:?}")) {
            return Err(bad("series repeated"));
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    close(&mut buckets).map_err(|why| format!("/metrics end of text: {why}"))?;
    Ok(Scrape { text: text.to_string(), samples, types })
}

impl Server {
    /// `GET /metrics`: a 200 in `text/plain; version=0.0.4`, parsed by
    /// [`parse_scrape`] (panics naming a bad line).
    pub fn scrape(&self) -> Scrape {
        let resp = self.get("/metrics");
        assert_eq!(resp.status, 200, "{resp:?}");
        let ct = resp.header("content-type").unwrap_or_default().replace(' ', "");
        assert!(
            ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
            "/metrics content-type {ct:?}, want text/plain; version=0.0.4"
        );
        parse_scrape(&resp.text())
    }
}

// ---------------------------------------------------------------------------
// A private PostgreSQL cluster, for tests that stop and restart it
// ---------------------------------------------------------------------------

/// A cluster of the test's own (scripts/lib/pg.sh), so that stopping it
/// cannot disturb other tests. Removed on drop.
pub struct PrivatePg {
    dir: std::path::PathBuf,
    port: u16,
    pub url: String,
}

fn pg_script(command: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source scripts/lib/pg.sh && {command}"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    assert!(out.status.success(), "`{command}` failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl PrivatePg {
    pub fn start() -> PrivatePg {
        let dir = std::env::temp_dir().join(unique("ingestd-pg"));
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let url = pg_script(&format!("pg_start '{}' {port}", dir.display()));
        PrivatePg { dir, port, url }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCP only over TLS with this certificate and key (scripts/lib/pg.sh
    /// `pg_tls_only`); with `client` = (CA, user), that user logs in only
    /// with a client certificate the CA signed. The cluster reloads its
    /// configuration.
    pub fn tls_only(&self, cert: &std::path::Path, key: &std::path::Path, client: Option<(&std::path::Path, &str)>) {
        let client = client.map(|(ca, user)| format!(" '{}' '{user}'", ca.display())).unwrap_or_default();
        pg_script(&format!("pg_tls_only '{}' '{}' '{}'{client}", self.dir.display(), cert.display(), key.display()));
    }

    /// A superuser connection over the Unix socket (trust), which stays
    /// open to the test when TCP needs TLS and a password.
    pub fn admin(&self) -> postgres::Client {
        let mut config = postgres::Config::new();
        config.host_path(&self.dir).port(self.port).user("postgres").dbname("postgres");
        config.connect_timeout(Duration::from_secs(10));
        config.connect(postgres::NoTls).expect("admin connection over the Unix socket")
    }

    /// `pg_ctl stop -m fast`: connections are cut, as in a crash or restart.
    pub fn stop(&self) {
        pg_script(&format!("pg_stop '{}'", self.dir.display()));
    }

    pub fn start_again(&self) {
        pg_script(&format!("pg_start '{}' {} >/dev/null", self.dir.display(), self.port));
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg("-c")
            .arg(format!("source scripts/lib/pg.sh && pg_stop '{}'", self.dir.display()))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Background load for fault tests
// ---------------------------------------------------------------------------

/// Client threads posting batches of unique events until stopped, keeping
/// every acknowledged id. They reconnect after transport errors.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<JoinHandle<LoadResult>>,
    /// Answers by status so far, across threads (for waiting on a run).
    seen: Arc<Mutex<std::collections::BTreeMap<u16, usize>>>,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub acked: Vec<String>,
    pub statuses: std::collections::BTreeMap<u16, usize>,
    pub transport_errors: usize,
    /// When each 200 (or `ok` status) arrived, for recovery times.
    pub ok_times: Vec<Instant>,
}

impl Load {
    pub fn start(addr: SocketAddr, threads: usize, batch: usize, ok: u16) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let threads = (0..threads)
            .map(|t| {
                let stop = stop.clone();
                let seen = seen.clone();
                let prefix = unique(&format!("load{t}"));
                thread::spawn(move || {
                    let mut out = LoadResult::default();
                    let mut conn: Option<Conn> = None;
                    let mut r = 0usize;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let evs = events(&format!("{prefix}-{r}"), batch);
                        r += 1;
                        if conn.is_none() {
                            match Conn::try_open(addr) {
                                Ok(mut c) => {
                                    c.set_read_timeout(Duration::from_secs(20));
                                    conn = Some(c);
                                }
                                Err(_) => {
                                    out.transport_errors += 1;
                                    // Pacing: the server is not accepting
                                    // (down, or restarting); retry soon
                                    // without spinning on connect.
                                    thread::sleep(Duration::from_millis(20));
                                    continue;
                                }
                            }
                        }
                        let req = Req::post("/events/batch").json(&Value::Array(evs.clone()));
                        match conn.as_mut().map(|c| c.try_roundtrip(&req)) {
                            Some(Ok(resp)) => {
                                *out.statuses.entry(resp.status).or_default() += 1;
                                if resp.status == ok {
                                    out.acked.extend(ids_of(&evs));
                                    out.ok_times.push(Instant::now());
                                } else {
                                    // Pacing: a client backs off after a
                                    // refusal (503 + Retry-After) instead of
                                    // hammering the server in a tight loop.
                                    thread::sleep(Duration::from_millis(10));
                                }
                                // Counted after `acked`: once `seen` shows
                                // an `ok`, stop() returns its ids.
                                *seen.lock().unwrap().entry(resp.status).or_default() += 1;
                                if resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                                    conn = None;
                                }
                            }
                            _ => {
                                out.transport_errors += 1;
                                conn = None;
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        Load { stop, threads, seen }
    }

    /// How many answers with `status` the clients have had so far.
    pub fn seen(&self, status: u16) -> usize {
        self.seen.lock().unwrap().get(&status).copied().unwrap_or(0)
    }

    /// Waits until the clients have had at least `n` answers with `status`.
    pub fn wait_for(&self, status: u16, n: usize, timeout: Duration) {
        eventually(timeout, format_args!("{n} answers {status} to the load"), || (self.seen(status) >= n).then_some(()))
    }

    pub fn stop(self) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = LoadResult::default();
        for t in self.threads {
            let r = t.join().expect("load thread");
            all.acked.extend(r.acked);
            for (k, v) in r.statuses {
                *all.statuses.entry(k).or_default() += v;
            }
            all.transport_errors += r.transport_errors;
            all.ok_times.extend(r.ok_times);
        }
        all.ok_times.sort();
        all
    }
}

// ---------------------------------------------------------------------------
// Security: bearer tokens, temp files, TLS clients
// ---------------------------------------------------------------------------

impl Req {
    /// `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Req {
        self.header("Authorization", &format!("Bearer {token}"))
    }
}

/// A token unique to this run, 16+ bytes, easy to grep for in logs.
pub fn secret_token(tag: &str) -> String {
    format!("tok-{tag}-{:016x}{:08x}", random_u64(), random_u64() as u32)
}

/// Writes `text` to a fresh file in the temp directory; returns its path.
pub fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("ingestd_sec"));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

/// The TLS readiness line prefix (printed before [`READY_PREFIX`]'s line).
pub const TLS_READY_PREFIX: &str = "ingestd listening on https://";

impl Server {
    /// The address of the TLS listener, from its readiness line on stdout.
    pub fn tls_addr(&self) -> SocketAddr {
        let out = self.stdout();
        let rest = out
            .lines()
            .find_map(|l| l.trim_end().strip_prefix(TLS_READY_PREFIX))
            .unwrap_or_else(|| panic!("no `{TLS_READY_PREFIX}ADDR` line on stdout:\n{out}"));
        rest.trim_end_matches('/').parse().unwrap_or_else(|e| panic!("bad TLS address {rest:?}: {e}"))
    }

    /// A request on a fresh connection with `Authorization: Bearer <token>`.
    pub fn send_as(&self, token: &str, req: Req) -> Response {
        self.send(&req.bearer(token))
    }
}

/// A self-signed certificate for `127.0.0.1` and `localhost` (rcgen), with
/// its PEM chain and PKCS#8 key written to files.
pub struct TestCert {
    pub der: rustls::pki_types::CertificateDer<'static>,
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

impl TestCert {
    pub fn new() -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("rcgen self-signed certificate");
        let cert_file = temp_file("cert.pem", &ck.cert.pem());
        let key_file = cert_file.with_file_name("key.pem");
        std::fs::write(&key_file, ck.signing_key.serialize_pem()).expect("write key");
        TestCert { der: ck.cert.der().clone(), cert_file, key_file }
    }

    /// `[tls]` settings for [`Ingestd::set`]: listen on a free port with this certificate.
    pub fn apply(&self, ingestd: Ingestd) -> Ingestd {
        ingestd
            .set("tls.listen", "127.0.0.1:0")
            .set("tls.cert_file", self.cert_file.display())
            .set("tls.key_file", self.key_file.display())
    }

    /// A rustls client configuration that trusts only this certificate.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("add the test certificate as a root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

impl Default for TestCert {
    fn default() -> Self {
        Self::new()
    }
}

/// A client TLS stream over TCP (blocking; the handshake happens on first use).
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `addr` over TLS, verifying the server as `127.0.0.1`.
pub fn tls_connect(addr: SocketAddr, cert: &TestCert) -> TlsStream {
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(cert.client_config(), name).expect("TLS client");
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    }
    stream
}

/// An HTTP/1.1 connection over TLS.
pub type TlsConn = Conn<TlsStream>;

impl TlsConn {
    pub fn connect(addr: SocketAddr, cert: &TestCert) -> TlsConn {
        Conn { stream: tls_connect(addr, cert), buf: Vec::new() }
    }
}

/// The next text message of a WebSocket as JSON (pings are answered by
/// tungstenite); panics on a close or an error.
pub fn next_json<S: Read + Write>(ws: &mut tungstenite::WebSocket<S>) -> Value {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return serde_json::from_str(t.as_str()).expect("JSON text frame"),
            Ok(tungstenite::Message::Close(c)) => panic!("closed by the server: {c:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read WebSocket message: {e}"),
        }
    }
}

/// `read` again when a signal or a stop/continue of the test process
/// interrupted it (a blocking read with a timeout then fails with EINTR
/// instead of restarting; std's `read_exact` retries the same way).
pub fn retry_interrupted<T>(mut read: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match read() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Text messages of a WebSocket, as JSON, until `quiet` passes without one.
pub fn drain_json(ws: &mut tungstenite::WebSocket<TcpStream>, quiet: Duration) -> Vec<Value> {
    ws.get_mut().set_read_timeout(Some(quiet)).expect("set read timeout");
    let mut out = Vec::new();
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => out.push(serde_json::from_str(t.as_str()).expect("JSON text frame")),
            Ok(tungstenite::Message::Close(c)) => panic!("closed by the server: {c:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                break;
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).expect("set read timeout");
    out
}

/// A field of `/proc/<pid>/status` in KiB (e.g. "VmRSS", "VmHWM").
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}
