//! ingestd behind a real PgBouncer (`/usr/sbin/pgbouncer`, Debian's package,
//! installed by `scripts/test.sh`) in `pool_mode = transaction`, in front
//! of the test cluster: ingest, idempotency (in-batch repeats, re-sent
//! events, the staging fallback of a second instance), dead letters, no
//! prepared statement left on a server session, `statement_timeout`
//! enforced per transaction, and the breaker when PgBouncer goes away and
//! comes back on the same port.
//!
//! The tests' own checks go straight to PostgreSQL (`database_url()`), except
//! the look at `pg_prepared_statements`, which must see PgBouncer's server
//! session.

use std::io::Read as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

/// Where Debian's `pgbouncer` package puts the binary.
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// A PgBouncer of the test's own on a free port, killed on drop.
struct Bouncer {
    dir: PathBuf,
    port: u16,
    /// ingestd's `database.url` through this PgBouncer.
    url: String,
    child: Option<Child>,
}

impl Bouncer {
    /// `pool_mode = transaction` with `pool_size` server sessions per
    /// database and user, trusting the test cluster's user.
    fn start(pool_size: u32) -> Bouncer {
        assert!(
            std::path::Path::new(PGBOUNCER).exists(),
            "{PGBOUNCER} is missing: scripts/test.sh installs it (apt-get install pgbouncer); \
             run the suite through it or install the package"
        );
        let upstream: postgres::Config = database_url().parse().expect("INGESTD_TEST_DATABASE_URL parses");
        let host = match upstream.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            other => panic!("the test cluster must be reached over TCP for PgBouncer, not {other:?}"),
        };
        let pg_port = upstream.get_ports().first().copied().unwrap_or(5432);
        let user = upstream.get_user().unwrap_or("postgres").to_string();
        let password = upstream.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
        let dbname = upstream.get_dbname().unwrap_or(&user).to_string();

        let dir = std::env::temp_dir().join(unique("ingestd-pgbouncer"));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"{password}\"\n")).expect("userlist");
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 * = host={host} port={pg_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {userlist}\n\
                 pool_mode = transaction\n\
                 default_pool_size = {pool_size}\n\
                 max_client_conn = 100\n\
                 query_wait_timeout = 5\n\
                 client_login_timeout = 5\n\
                 server_login_retry = 1\n\
                 log_connections = 0\n\
                 log_disconnections = 0\n",
                userlist = dir.join("userlist.txt").display(),
            ),
        )
        .expect("pgbouncer.ini");
        let url = format!("postgres://{user}@127.0.0.1:{port}/{dbname}");
        let mut bouncer = Bouncer { dir, port, url, child: None };
        bouncer.start_again();
        bouncer
    }

    /// Starts PgBouncer (again) on its port and waits until it accepts.
    fn start_again(&mut self) {
        assert!(self.child.is_none(), "pgbouncer already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pgbouncer.log"))
            .expect("pgbouncer log");
        let mut cmd = Command::new(PGBOUNCER);
        // PgBouncer will not run as root: it drops to `nobody` itself.
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        cmd.arg(self.dir.join("pgbouncer.ini")).stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {PGBOUNCER}: {e}"));
        let port = self.port;
        eventually(Duration::from_secs(10), format_args!("pgbouncer listening on 127.0.0.1:{port}"), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("pgbouncer exited with {status}:\n{}", self.log());
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        self.child = Some(child);
    }

    /// SIGKILL: every connection through it is cut at once.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("pgbouncer.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail = &log[log.len().saturating_sub(4000)..];
            eprintln!("--- pgbouncer on 127.0.0.1:{} log tail ---\n{tail}", self.port);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The SPEC's table plus an operator's CHECK constraint, made directly.
fn table_refusing(device: &str) -> String {
    let table = unique("pgb");
    db_connect(&database_url())
        .batch_execute(&format!(
            "CREATE TABLE {table} (
               event_id text PRIMARY KEY,
               device_id text NOT NULL CHECK (device_id <> '{device}'),
               event_type text NOT NULL,
               ts timestamptz NOT NULL,
               received_at timestamptz NOT NULL DEFAULT now(),
               payload jsonb)"
        ))
        .expect("create table");
    table
}

fn ev(id: &str, device: &str) -> Value {
    json!({"event_id": id, "device_id": device, "type": "t", "ts": now_ms(), "payload": {"id": id}})
}

/// Rows with these ids, asked of PostgreSQL directly.
fn stored(table: &str, ids: &[String]) -> i64 {
    count_ids(&mut db_connect(&database_url()), table, ids)
}

fn rows_in(table: &str) -> i64 {
    db_connect(&database_url()).query_one(&format!("SELECT count(*) FROM {table}"), &[]).expect("count").get(0)
}

#[test]
fn ingest_idempotency_and_dead_letters_through_pgbouncer_in_transaction_mode() {
    // One server session: every transaction of both instances, and the
    // check of pg_prepared_statements at the end, run on the same one.
    let bouncer = Bouncer::start(1);
    let table = table_refusing("poison");
    // The dead-letter table is made through PgBouncer at start-up.
    let mut a = Ingestd::new().database_url(&bouncer.url).table(&table).set("writer.writers", 2).start();
    a.set_owns_table(true);

    // One event, then a batch.
    let one = unique("one");
    assert_ingest(&a.post_event(&ev(&one, "d")), 200, 1, &[]);
    assert_eq!(stored(&table, std::slice::from_ref(&one)), 1);
    let batch: Vec<Value> = (0..100).map(|i| ev(&unique(&format!("b{i}")), "d")).collect();
    let batch_ids = ids_of(&batch);
    assert_ingest(&a.post_batch(&batch), 200, 100, &[]);
    assert_eq!(stored(&table, &batch_ids), 100);

    // Repeats inside one batch are stored once.
    let (x, y) = (unique("x"), unique("y"));
    let resp = a.post_batch(&[ev(&x, "d"), ev(&y, "d"), ev(&x, "d")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(stored(&table, std::slice::from_ref(&x)), 1);
    assert_eq!(stored(&table, std::slice::from_ref(&y)), 1);

    // Re-sent to the same instance: its recent ids go through staging in
    // the same transaction.
    assert_eq!(a.post_batch(&batch).status, 200);
    assert_eq!(rows_in(&table), 103);

    // Re-sent to a second instance, which has not seen them: its COPY hits
    // the primary key, rolls back, and the batch is redone through staging.
    let b = Ingestd::new().database_url(&bouncer.url).table(&table).start();
    let fresh = unique("fresh");
    let mut resent = batch[..20].to_vec();
    resent.push(ev(&fresh, "d"));
    let resp = b.post_batch(&resent);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(rows_in(&table), 104);
    assert_eq!(stored(&table, &[fresh]), 1);
    assert!(b.scrape().sum("ingestd_staging_fallbacks_total", None) >= 1.0, "the staging fallback ran");

    // An event the table refuses becomes a dead letter; the rest commit.
    let (good1, bad, good2) = (unique("g"), unique("poison"), unique("g"));
    let resp = a.post_batch(&[ev(&good1, "d"), ev(&bad, "poison"), ev(&good2, "d")]);
    let answer = assert_ingest(&resp, 200, 2, &[1]);
    assert!(format!("{:?}", answer.rejected).contains("PostgreSQL refused"), "{resp:?}");
    assert_eq!(stored(&table, &[good1, good2]), 2);
    let dead: Vec<String> = db_connect(&database_url())
        .query(&format!("SELECT event_id FROM {table}_dead_letter"), &[])
        .expect("dead letters")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(dead, std::slice::from_ref(&bad));

    // `ingestd dead-letter` through the same PgBouncer: listed, still
    // refused while the constraint holds (65), stored once it is gone.
    let dead_letter = |args: &[&str]| {
        let table_key = format!("database.table={table}");
        let mut all = vec!["--database-url", bouncer.url.as_str(), "--set", table_key.as_str(), "dead-letter"];
        all.extend_from_slice(args);
        run_cli(&all, &[], Duration::from_secs(60))
    };
    let out = dead_letter(&["list"]);
    assert!(out.code() == Some(0) && out.stdout.contains("1 dead letters waiting"), "{out:?}");
    let out = dead_letter(&["replay"]);
    assert!(out.code() == Some(65) && out.stdout.contains("still failing 1"), "{out:?}");
    db_connect(&database_url())
        .batch_execute(&format!("ALTER TABLE {table} DROP CONSTRAINT {table}_device_id_check"))
        .expect("drop the constraint");
    let out = dead_letter(&["replay"]);
    assert!(out.code() == Some(0) && out.stdout.contains("replayed 1"), "{out:?}");
    assert_eq!(stored(&table, std::slice::from_ref(&bad)), 1);

    // Every statement ingestd prepared was closed inside its transaction:
    // none is left on the server session that all of them ran on (one left
    // there would collide with another process's statement of that name).
    // A simple query prepares nothing itself.
    let mut through = db_connect(&bouncer.url);
    let left: Vec<String> = through
        .simple_query("SELECT name || ': ' || statement FROM pg_prepared_statements")
        .expect("pg_prepared_statements through pgbouncer")
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert!(left.is_empty(), "prepared statements left on PgBouncer's server session: {left:?}");
    drop(b);
}

#[test]
fn statement_timeout_and_the_breaker_hold_through_pgbouncer() {
    let mut bouncer = Bouncer::start(2);
    let table = table_refusing("poison");
    // Rows from device "slow" sleep far longer than statement_timeout.
    db_connect(&database_url())
        .batch_execute(&format!(
            "CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN IF NEW.device_id = 'slow' THEN PERFORM pg_sleep(30); END IF; RETURN NEW; END $$;
             CREATE TRIGGER {table}_slow BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_slow();"
        ))
        .expect("create slow trigger");
    let mut server = Ingestd::new()
        .database_url(&bouncer.url)
        .table(&table)
        .set("database.statement_timeout_ms", 1000)
        .set("database.connect_timeout_ms", 1000)
        .set("database.probe_interval_ms", 200)
        .set("database.probe_timeout_ms", 1000)
        .set("breaker.failure_threshold", 2)
        .set("breaker.open_ms", 200)
        .start();
    server.set_owns_table(true);

    // statement_timeout holds through PgBouncer: the COPY is cancelled by
    // PostgreSQL after 1 s (not after the trigger's 30 s), and the client is
    // told nothing was stored.
    let slow = unique("slow");
    let started = Instant::now();
    let resp = server.post_event(&ev(&slow, "slow"));
    let took = started.elapsed();
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(resp.text().contains("statement timeout"), "503 names the statement timeout: {}", resp.text());
    assert!(resp.header("retry-after").is_some(), "{resp:?}");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    assert_eq!(stored(&table, &[slow]), 0);
    // The timeout counted against the database; the probe finds it well
    // through PgBouncer and /health is ready again without any ingest.
    eventually(Duration::from_secs(10), "/health 200 after the statement timeout", || {
        (server.get("/health").status == 200).then_some(())
    });
    let after = unique("after");
    assert_ingest(&server.post_event(&ev(&after, "d")), 200, 1, &[]);
    assert_eq!(stored(&table, &[after]), 1);

    // PgBouncer gone: 503 + Retry-After, fast; the breaker opens and
    // /health says not ready.
    bouncer.kill();
    let started = Instant::now();
    for i in 0..4 {
        let resp = server.post_event(&ev(&unique(&format!("gone{i}")), "d"));
        assert_eq!(resp.status, 503, "{resp:?}");
        assert!(resp.header("retry-after").is_some(), "{resp:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "503s are fast: {:?}", started.elapsed());
    let breaker: Vec<f64> = server.scrape().series("ingestd_breaker_state").map(|s| s.value).collect();
    assert!(breaker == [1.0] || breaker == [2.0], "breaker open (1) or half-open (2): {breaker:?}");
    eventually(Duration::from_secs(5), "/health 503 while PgBouncer is gone", || {
        (server.get("/health").status == 503).then_some(())
    });

    // Back on the same port: /health recovers by itself (the probe), then
    // ingest works again.
    bouncer.start_again();
    let back = Instant::now();
    eventually(Duration::from_secs(15), "/health 200 once PgBouncer is back", || {
        (server.get("/health").status == 200).then_some(())
    });
    let recovered = back.elapsed();
    let last = unique("last");
    assert_ingest(&server.post_event(&ev(&last, "d")), 200, 1, &[]);
    assert_eq!(stored(&table, &[last]), 1);
    println!("pgbouncer: statement timeout answered in {took:?}; /health ready {recovered:?} after PgBouncer returned");
    let _ = db_connect(&database_url()).batch_execute(&format!("DROP TABLE {table}; DROP FUNCTION {table}_slow()"));
}
