//! When PostgreSQL stalls, slows down or vanishes (SPEC guarantees 4, 5, 7;
//! issue 11): memory stays within the budget, every answer comes within
//! `ingest.max_wait_ms` (plus its commit) or as a fast 503, and `/health`
//! follows the database with no client traffic at all. Faults are made the
//! way they happen: a held `LOCK TABLE`, a row trigger that sleeps, a
//! PostgreSQL that is stopped and started, a role that may no longer log in.
//! Each test prints its figures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// Samples a process's VmRSS every 50 ms until stopped; keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_kib.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse::<u64>().ok())
                {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                // Pacing of the sampler (its period), not a wait.
                thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler { stop, peak_kib, handle: Some(handle) }
    }

    fn peak_mib(&self) -> u64 {
        self.peak_kib.load(Ordering::Relaxed) / 1024
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn rss_mib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS") / 1024
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn health(server: &Server) -> (u16, Value) {
    let resp = server.get("/health");
    (resp.status, resp.json())
}

/// An NDJSON body of `n` events with ids `{prefix}-{i}` and ~`payload` bytes each.
fn ndjson_body(prefix: &str, n: usize, payload: usize) -> (Vec<u8>, Vec<String>) {
    let filler = "x".repeat(payload);
    let ts = now_ms();
    let mut body = Vec::with_capacity(n * (payload + 120));
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        writeln!(
            body,
            r#"{{"event_id":"{id}","device_id":"d{}","type":"t","ts":{ts},"payload":{{"f":"{filler}"}}}}"#,
            i % 50
        )
        .expect("write to a Vec");
        ids.push(id);
    }
    (body, ids)
}

/// Sends one request head (+ body unless it waits for `100 Continue`) on
/// `conn` and reads the answer; with `expect`, an interim 100 is answered
/// by sending the body.
fn send_body(conn: &mut TcpStream, body: &[u8], expect: bool) -> std::io::Result<(u16, Option<String>, bool)> {
    send_body_seen(conn, body, expect).map(|(status, retry, close, _)| (status, retry, close))
}

/// [`send_body`], also telling whether a `100 Continue` came first.
fn send_body_seen(
    conn: &mut TcpStream,
    body: &[u8],
    expect: bool,
) -> std::io::Result<(u16, Option<String>, bool, bool)> {
    let head = format!(
        "POST /events/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if expect { "Expect: 100-continue\r\n" } else { "" }
    );
    conn.write_all(head.as_bytes())?;
    if !expect {
        conn.write_all(body)?;
    }
    let mut continued = false;
    loop {
        let (status, headers) = read_head(conn)?;
        if status == 100 {
            continued = true;
            conn.write_all(body)?;
            continue;
        }
        let len: usize = header(&headers, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut rest = vec![0u8; len];
        conn.read_exact(&mut rest)?;
        let close = header(&headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        return Ok((status, header(&headers, "retry-after"), close, continued));
    }
}

fn read_head(conn: &mut TcpStream) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn connect(addr: SocketAddr) -> TcpStream {
    let conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(60))).expect("read timeout");
    conn
}

/// The issue's first failure: a table locked for a while (a migration, a
/// VACUUM FULL) and 64 clients sending 8 MB bodies. Before: RSS 22 MiB →
/// 1.7 GiB, no 503, and it stayed there. Now: the default budget holds,
/// the excess gets 503 + Retry-After (never a reset), and RSS comes back.
#[test]
fn a_flood_of_large_bodies_during_a_table_lock_stays_within_the_memory_budget() {
    const CLIENTS: usize = 64;
    const EVENTS: usize = 9_000;
    const LOCK: Duration = Duration::from_secs(8);
    let server = Ingestd::new().set("server.shards", 2).set("writer.writers", 2).start();
    let pid = server.pid();
    // Warm up: the first commit, then the idle figure.
    assert_eq!(server.post_batch(&events(&unique("warm"), 10)).status, 200);
    let idle = rss_mib(pid);
    let mut locker = server.db();
    let mut tx = locker.transaction().expect("begin");
    tx.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", server.table)).expect("lock");
    let sampler = RssSampler::start(pid);
    let locked_at = Instant::now();
    let unlocked = Arc::new(AtomicBool::new(false));
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let unlocked = unlocked.clone();
            thread::spawn(move || {
                let (body, ids) = ndjson_body(&unique(&format!("flood{c}")), EVENTS, 800);
                let expect = c % 2 == 0;
                let mut statuses = Vec::new();
                let mut fast_503 = Vec::new();
                let mut problems = Vec::new();
                let mut conn = connect(addr);
                let deadline = Instant::now() + Duration::from_secs(90);
                loop {
                    let sent = Instant::now();
                    match send_body(&mut conn, &body, expect) {
                        Ok((200, _, _)) => {
                            statuses.push(200);
                            return (ids, statuses, fast_503, problems, body.len());
                        }
                        Ok((503, retry, close)) => {
                            statuses.push(503);
                            if !unlocked.load(Ordering::Relaxed) {
                                fast_503.push(sent.elapsed());
                            }
                            if retry.is_none() {
                                problems.push("503 without Retry-After".to_string());
                            }
                            if close {
                                conn = connect(addr);
                            }
                            // Pacing: a client backs off after a 503 before
                            // it sends its body again.
                            thread::sleep(Duration::from_millis(500));
                        }
                        Ok((other, _, _)) => {
                            problems.push(format!("status {other}"));
                            return (Vec::new(), statuses, fast_503, problems, body.len());
                        }
                        Err(e) => {
                            problems.push(format!("transport error (a reset instead of an answer?): {e}"));
                            conn = connect(addr);
                        }
                    }
                    if Instant::now() > deadline {
                        problems.push("no 200 within 90 s".into());
                        return (Vec::new(), statuses, fast_503, problems, body.len());
                    }
                }
            })
        })
        .collect();
    // Stays a sleep: the fault under test is a lock held for LOCK while the
    // clients push (a duration, not a state to reach).
    thread::sleep(LOCK);
    let peak_during_lock = sampler.peak_mib();
    tx.commit().expect("release the lock");
    unlocked.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut counts = std::collections::BTreeMap::<u16, usize>::new();
    let mut fast = Vec::new();
    let mut problems = Vec::new();
    let mut body_bytes = 0;
    for c in clients {
        let (ids, statuses, f, p, bytes) = c.join().expect("client");
        acked.extend(ids);
        for s in statuses {
            *counts.entry(s).or_default() += 1;
        }
        fast.extend(f);
        problems.extend(p);
        body_bytes = bytes;
    }
    let answered = locked_at.elapsed();
    let peak = sampler.peak_mib();
    drop(sampler);
    let settle = Instant::now();
    let after_1s = {
        // Stays a sleep: a figure for the report (RSS one second after the
        // last answer), asserted on nowhere; the bound is waited for below.
        thread::sleep(Duration::from_secs(1));
        rss_mib(pid)
    };
    // Back down within a bound, by itself (no traffic).
    let back = eventually(Duration::from_secs(30), "RSS back within idle + 128 MiB", || {
        let now = rss_mib(pid);
        (now <= idle + 128).then_some(now)
    });
    let back_after = settle.elapsed();
    fast.sort();
    let shed: Vec<String> = server
        .scrape()
        .series("ingestd_requests_shed_total")
        .filter(|s| s.value != 0.0)
        .map(|s| s.to_string())
        .collect();
    println!(
        "lock {LOCK:?} + {CLIENTS} clients x {} MB NDJSON ({EVENTS} events): RSS idle {idle} MiB, peak during the lock \
         {peak_during_lock} MiB, peak {peak} MiB, 1 s after {after_1s} MiB, {back} MiB {back_after:?} after the last \
         answer; statuses {counts:?}; 503 during the lock: median {:?}, p99 {:?}; all answered {answered:?}; shed {shed:?}",
        body_bytes / 1_000_000,
        percentile(&fast, 0.5),
        percentile(&fast, 0.99),
    );
    assert!(problems.is_empty(), "{problems:?}");
    assert!(counts.get(&503).copied().unwrap_or(0) > 0, "the excess must get 503s: {counts:?}");
    assert!(peak <= idle + 512, "RSS peak {peak} MiB over idle {idle} MiB + 512 MiB");
    assert!(percentile(&fast, 0.5) < Duration::from_secs(2), "503s come fast: {:?}", percentile(&fast, 0.5));
    assert_eq!(server.count_ids(&acked) as usize, acked.len(), "an acknowledged event is missing");
    assert_eq!(acked.len(), CLIENTS * EVENTS, "every client got its 200 after the lock");
}

/// A table whose inserts each sleep `secs` in a row trigger.
fn slow_table(secs: f64) -> String {
    let table = unique("slow");
    let mut db = db_connect(&database_url());
    db.batch_execute(&format!(
        "CREATE TABLE {table} (
           event_id text PRIMARY KEY, device_id text NOT NULL, event_type text NOT NULL,
           ts timestamptz NOT NULL, received_at timestamptz NOT NULL DEFAULT now(), payload jsonb);
         CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep({secs}); RETURN NEW; END $$;
         CREATE TRIGGER {table}_slow BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_slow();"
    ))
    .expect("create slow table");
    table
}

/// The issue's second failure: every insert ~100× slower (0.5 ms of
/// pg_sleep per row) and 160 clients sending 100-event batches. Before: no
/// 503, every answer took the whole slow period (12 s). Now: the answers
/// that are 200 come within max_wait + a commit, the rest are fast 503s.
#[test]
fn a_slow_database_answers_within_the_bound_and_sheds_the_rest_fast() {
    const CLIENTS: usize = 160;
    const RUN: Duration = Duration::from_secs(8);
    let table = slow_table(0.0005);
    let mut server = Ingestd::new().table(&table).set("server.shards", 2).set("writer.writers", 2).start();
    server.set_owns_table(true);
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut ok = Vec::new();
                let mut shed = Vec::new();
                let mut acked = Vec::new();
                let mut other = Vec::new();
                let mut conn: Option<Conn> = None;
                let prefix = unique(&format!("slow{c}"));
                let mut r = 0;
                while !stop.load(Ordering::Relaxed) {
                    let evs = events(&format!("{prefix}-{r}"), 100);
                    r += 1;
                    let c = conn.get_or_insert_with(|| {
                        let mut c = Conn::open(addr);
                        c.set_read_timeout(Duration::from_secs(30));
                        c
                    });
                    let sent = Instant::now();
                    match c.try_roundtrip(&Req::post("/events/batch").json(&Value::Array(evs.clone()))) {
                        Ok(resp) if resp.status == 200 => {
                            ok.push(sent.elapsed());
                            acked.extend(ids_of(&evs));
                        }
                        Ok(resp) if resp.status == 503 => {
                            shed.push(sent.elapsed());
                            assert!(resp.header("retry-after").is_some(), "{resp:?}");
                            if resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                                conn = None;
                            }
                            // A device backs off before retrying.
                            thread::sleep(Duration::from_millis(50));
                        }
                        Ok(resp) => other.push(format!("{} {}", resp.status, resp.text())),
                        Err(e) => {
                            other.push(format!("transport: {e}"));
                            conn = None;
                        }
                    }
                }
                (ok, shed, acked, other)
            })
        })
        .collect();
    // Stays a sleep: the test runs its load for a fixed RUN (the figures
    // are per run), not until a state.
    thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut shed, mut acked, mut other) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for c in clients {
        let (o, s, a, x) = c.join().expect("client");
        ok.extend(o);
        shed.extend(s);
        acked.extend(a);
        other.extend(x);
    }
    ok.sort();
    shed.sort();
    let stats = server.get("/stats").json();
    let costs: Vec<String> =
        server.scrape().series("ingestd_writer_batch_cost_seconds").map(|s| s.to_string()).collect();
    println!("slow database: writers' fitted costs {costs:?}; commits {}", stats["commit_latency_ms"]);
    println!(
        "slow database (0.5 ms per row), {CLIENTS} clients x 100 events, {RUN:?}: {} answered 200 (p50 {:?}, p99 {:?}, \
         max {:?}), {} answered 503 (median {:?}, p99 {:?}), {} events committed, shed {}, batches mean {}",
        ok.len(),
        percentile(&ok, 0.5),
        percentile(&ok, 0.99),
        ok.last().copied().unwrap_or_default(),
        shed.len(),
        percentile(&shed, 0.5),
        percentile(&shed, 0.99),
        acked.len(),
        stats["shed_by_reason"],
        stats["batch_events"]["mean"],
    );
    assert!(other.is_empty(), "only 200 and 503: {:?}", &other[..other.len().min(5)]);
    assert!(ok.len() >= 10, "some requests are served: {}", ok.len());
    assert!(shed.len() > ok.len(), "the excess is shed: {} vs {}", shed.len(), ok.len());
    assert!(percentile(&ok, 0.99) < Duration::from_secs(2), "p99 of 200s {:?}", percentile(&ok, 0.99));
    assert!(percentile(&shed, 0.5) < Duration::from_millis(100), "median 503 {:?}", percentile(&shed, 0.5));
    assert_eq!(server.count_ids(&acked) as usize, acked.len(), "an acknowledged event is missing");
}

/// A request that no writer can start within `ingest.max_wait_ms` (the one
/// writer is stuck behind a lock) gets its 503 at the bound and is never
/// written; once the writer has been stuck past the bound, admission turns
/// requests away at once.
#[test]
fn a_request_no_writer_can_start_in_time_gets_503_at_the_bound_and_is_never_written() {
    let server = Ingestd::new().set("ingest.max_wait_ms", 500).set("database.statement_timeout_ms", 20_000).start();
    let mut locker = server.db();
    let mut tx = locker.transaction().expect("begin");
    tx.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", server.table)).expect("lock");
    let addr = server.addr;
    // The first request is taken by the writer, whose COPY then waits for the lock.
    let first = events(&unique("stuck"), 3);
    let first_thread = {
        let first = first.clone();
        thread::spawn(move || {
            let mut c = Conn::open(addr);
            c.set_read_timeout(Duration::from_secs(30));
            c.roundtrip(&Req::post("/events/batch").json(&Value::Array(first)))
        })
    };
    // The writer has taken it: its COPY waits for the lock in PostgreSQL.
    eventually(Duration::from_secs(5), "the writer's COPY waiting for the table lock", || {
        (server.lock_waiters() > 0).then_some(())
    });
    assert_eq!(server.get("/stats").json()["queued_events"], 0, "the first request left the queue");
    let second = events(&unique("late"), 3);
    let started = Instant::now();
    let resp = server.post_batch(&second);
    let waited = started.elapsed();
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(resp.header("retry-after").is_some());
    // Stuck longer than max_wait by now: the next one is refused at admission.
    let started = Instant::now();
    let third = server.post_batch(&events(&unique("refused"), 3));
    let refused_in = started.elapsed();
    println!(
        "writer stuck behind a lock, max_wait 500 ms: queued request answered 503 after {waited:?} ({}); next \
         refused in {refused_in:?} ({})",
        resp.json()["error"],
        third.json()["error"]
    );
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(third.status, 503);
    assert!(refused_in < Duration::from_millis(200), "{refused_in:?}");
    tx.commit().expect("unlock");
    assert_eq!(first_thread.join().expect("first").status, 200, "the request whose COPY had started commits");
    assert_eq!(server.count_ids(&ids_of(&second)), 0, "a request answered 503 at the bound was never written");
    assert_eq!(server.count_ids(&ids_of(&first)), 3);
}

/// A body that does not fit in the budget is a 503 with Retry-After; its
/// bytes are read and dropped so the connection serves the next request;
/// with `Expect: 100-continue` the 503 goes instead of the 100.
#[test]
fn over_the_memory_budget_is_a_503_and_the_connection_is_kept() {
    // 1 MiB bodies, a 4 MiB budget, requests held by a locked table.
    let server = Ingestd::new()
        .set("server.max_body_bytes", 1 << 20)
        .set("limits.memory_budget_bytes", 4 << 20)
        // Time bounds out of the way: only memory refuses here.
        .set("ingest.max_wait_ms", 600_000)
        .set("database.statement_timeout_ms", 600_000)
        .start();
    let mut locker = server.db();
    let mut tx = locker.transaction().expect("begin");
    tx.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", server.table)).expect("lock");
    let addr = server.addr;
    let held: Arc<Mutex<Vec<thread::JoinHandle<u16>>>> = Arc::default();
    let mut ids = Vec::new();
    // Fill the budget with waiting requests of ~0.25 MB until one is refused.
    let refused = (0..64).find_map(|i| {
        let (body, these) = ndjson_body(&unique(&format!("fill{i}")), 300, 700);
        let mut conn = connect(addr);
        let head = format!(
            "POST /events/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).expect("head");
        conn.write_all(&body).expect("body");
        conn.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        match read_head(&mut conn) {
            Ok((503, headers)) => Some((conn, headers)),
            Ok((status, _)) => panic!("request {i}: unexpected {status} while the table is locked"),
            Err(_) => {
                // Still waiting: it holds its rows. Keep its answer for later.
                ids.extend(these);
                conn.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
                held.lock().unwrap().push(thread::spawn(move || read_head(&mut conn).map_or(0, |(s, _)| s)));
                None
            }
        }
    });
    let (mut conn, headers) = refused.expect("a request over the budget is refused");
    let waiting = held.lock().unwrap().len();
    assert!(header(&headers, "retry-after").is_some(), "{headers:?}");
    let len: usize = header(&headers, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut answer = vec![0u8; len];
    conn.read_exact(&mut answer).expect("body");
    assert!(
        String::from_utf8_lossy(&answer).contains("limits.memory_budget_bytes"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The same connection goes on.
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("next request");
    let (status, _) = read_head(&mut conn).expect("answer on the kept connection");
    assert_eq!(status, 200, "the connection was kept after the 503");
    // Expect: 100-continue: once the body itself does not fit, the 503 goes
    // instead of the 100, then a close (the client has not sent the body).
    // Until then a 100 comes and the request is held like the others.
    let refused_without_100 = (0..16).find_map(|i| {
        // Near server.max_body_bytes: the body alone no longer fits.
        let (body, these) = ndjson_body(&unique(&format!("expect{i}")), 1200, 700);
        assert!(body.len() <= 1 << 20);
        let mut conn = connect(addr);
        conn.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        match send_body_seen(&mut conn, &body, true) {
            Ok((503, retry, close, false)) => Some((retry, close)),
            Ok((503, _, _, true)) => None,
            Ok((status, ..)) => panic!("unexpected {status} while the table is locked"),
            Err(_) => {
                ids.extend(these);
                conn.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
                held.lock().unwrap().push(thread::spawn(move || read_head(&mut conn).map_or(0, |(s, _)| s)));
                None
            }
        }
    });
    let (retry, close) = refused_without_100.expect("a 503 instead of a 100 once the budget is full");
    assert!(retry.is_some() && close, "Retry-After and Connection: close");
    let scrape = server.scrape();
    let shed = scrape.sum("ingestd_requests_shed_total", Some(("reason", "memory_budget")));
    println!("memory budget 4 MiB: {waiting} requests of ~0.25 MB held, then 503; {shed} shed for memory");
    assert!(shed >= 2.0, "counted in ingestd_requests_shed_total:\n{}", scrape.text);
    tx.commit().expect("unlock");
    let answers: Vec<u16> = held.lock().unwrap().drain(..).map(|h| h.join().expect("held")).collect();
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    assert_eq!(server.count_ids(&ids) as usize, ids.len());
}

/// The issue's third failure: `/health` stayed 200 after PostgreSQL stopped,
/// and, once the breaker had opened, 503 after it was back, until a client
/// write got through. Now the probe moves both, with no traffic but /health.
#[test]
fn health_follows_the_database_with_no_client_traffic() {
    let pg = PrivatePg::start();
    let server = Ingestd::new().database_url(&pg.url).start();
    let spooled = Ingestd::new()
        .database_url(&pg.url)
        .set("ingest.ack", "spool")
        .set("spool.dir", std::env::temp_dir().join(unique("spool")).display())
        .start();
    assert_eq!(health(&server).0, 200);
    pg.stop();
    let stopped = Instant::now();
    let down = eventually(Duration::from_secs(15), "/health 503 after PostgreSQL stopped", || {
        let (status, body) = health(&server);
        (status == 503).then_some((stopped.elapsed(), body))
    });
    let breaker_open = eventually(Duration::from_secs(20), "the breaker opens by itself", || {
        (health(&server).1["breaker"] == "open").then(|| stopped.elapsed())
    });
    let (spool_status, spool_body) = health(&spooled);
    pg.start_again();
    let started = Instant::now();
    let up = eventually(Duration::from_secs(15), "/health 200 after PostgreSQL is back", || {
        (health(&server).0 == 200).then(|| started.elapsed())
    });
    let after = health(&server).1;
    println!(
        "no traffic: /health 503 {:?} after PostgreSQL stopped ({}), breaker open after {breaker_open:?}, /health 200 \
         {up:?} after it came back ({}); spool mode during the outage: {spool_status} {}",
        down.0, down.1, after, spool_body
    );
    assert!(down.0 < Duration::from_secs(5), "503 within 5 s: {:?}", down.0);
    assert_eq!(down.1["database"], "unreachable");
    assert!(up < Duration::from_secs(5), "200 within 5 s: {up:?}");
    assert_eq!((spool_status, &spool_body["database"]), (200, &Value::from("unreachable")), "the spool rides it out");
    // And the first client request after that is served.
    let id = unique("after");
    assert_eq!(
        server.post_event(&serde_json::json!({"event_id": id, "device_id": "d", "type": "t", "ts": now_ms()})).status,
        200
    );
}

/// A database that refuses us is a configuration problem, told apart from
/// an outage: at start-up, exit 69 naming it; while running, `/health`
/// says "database_refused" and the log says what to check.
#[test]
fn a_database_that_refuses_us_is_named_as_such() {
    let url = database_url();
    let (base, _db) = url.rsplit_once('/').expect("a URL with a database");
    let no_db = format!("{base}/no_such_database_{}", random_u64() % 100_000);
    let out = run_cli(&["--listen", "127.0.0.1:0", "--database-url", &no_db], &[], Duration::from_secs(20));
    println!("start-up against a missing database: exit {:?}: {}", out.code(), out.stderr.trim());
    assert_eq!(out.code(), Some(69), "{}", out.stderr);
    assert!(out.stderr.contains("refused"), "{}", out.stderr);

    let pg = PrivatePg::start();
    let role = unique("r").to_lowercase();
    db_connect(&pg.url).batch_execute(&format!("CREATE ROLE {role} LOGIN SUPERUSER")).expect("create role");
    let role_url = pg.url.replacen("postgres@", &format!("{role}@"), 1);
    let server = Ingestd::new().database_url(&role_url).start();
    assert_eq!(health(&server).0, 200);
    db_connect(&pg.url).batch_execute(&format!("ALTER ROLE {role} NOLOGIN")).expect("nologin");
    // Existing sessions keep working; the refusal shows when it must log in again.
    pg.stop();
    pg.start_again();
    let refused = eventually(Duration::from_secs(15), "/health says the database refuses us", || {
        let (status, body) = health(&server);
        (status == 503 && body["status"] == "database_refused").then_some(body)
    });
    let log = server.stderr();
    assert!(log.contains("configuration problem"), "{log}");
    db_connect(&pg.url).batch_execute(&format!("ALTER ROLE {role} LOGIN")).expect("login again");
    let back = Instant::now();
    eventually(Duration::from_secs(10), "/health 200 once the role may log in", || {
        (health(&server).0 == 200).then_some(())
    });
    println!("role without LOGIN: /health {refused}; 200 again {:?} after LOGIN was granted", back.elapsed());
}
