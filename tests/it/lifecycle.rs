//! Signals and graceful shutdown (SPEC guarantee 6): SIGTERM and SIGINT on
//! an idle server exit 0 and close the listener; SIGTERM in the middle of a
//! load of batches exits 0 within `shutdown_timeout`, and every event whose
//! request was answered 200 is in PostgreSQL. Clients that see connection
//! errors or 503 during the shutdown are fine: they were not acknowledged.
//! The same with `ack = "queue"`: 202'd events sit in rings, and a graceful
//! shutdown drains them into PostgreSQL before exiting 0.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

fn idle_signal_exits_zero(sig: &str) {
    let mut s = Server::start();
    assert_ingest(&s.post_event(&event("idle-1")), 200, 1, &[]);
    let addr = s.addr;
    s.signal(sig);
    let status = s.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "exit after SIG{sig}: {status}\n{}", s.stderr());
    assert!(Conn::try_open(addr).is_err(), "listener still accepts after exit");
    assert_eq!(s.count_id("idle-1"), 1);
}

#[test]
fn sigterm_on_an_idle_server_exits_zero() {
    idle_signal_exits_zero("TERM");
}

#[test]
fn sigint_on_an_idle_server_exits_zero() {
    idle_signal_exits_zero("INT");
}

#[test]
fn sigterm_under_load_commits_every_acknowledged_event() {
    shutdown_under_load("commit", 200);
}

/// With `ack = "queue"` a 202 only means "in a ring"; a graceful shutdown
/// drains the rings, so every 202'd event must be committed by exit 0.
#[test]
fn sigterm_under_spool_load_commits_every_acknowledged_event() {
    shutdown_under_load("spool", 200);
}

#[test]
fn sigterm_under_queue_load_drains_the_rings() {
    shutdown_under_load("queue", 202);
}

/// 6 clients post batches of 100 unique events on keep-alive connections;
/// SIGTERM arrives mid-load. Asserts exit 0 within `shutdown_timeout`, that
/// every event answered `ok` is stored, and that no status other than `ok`
/// and 503 was seen (connection errors are fine).
fn shutdown_under_load(ack: &str, ok: u16) {
    const THREADS: usize = 6;
    const BATCH: usize = 100;
    const SHUTDOWN_TIMEOUT_MS: u64 = 15_000;
    let mut s = Ingestd::new()
        .set("server.shards", 2)
        .set("writer.writers", 2)
        .set("ingest.ack", ack)
        .set("spool.dir", std::env::temp_dir().join(unique("spool")).display())
        .set("server.shutdown_timeout_ms", SHUTDOWN_TIMEOUT_MS)
        .start();
    let addr = s.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let acked_batches = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let stop = stop.clone();
            let acked_batches = acked_batches.clone();
            thread::spawn(move || {
                let mut acked: Vec<String> = Vec::new();
                let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
                let mut transport_errors = 0usize;
                let mut conn: Option<Conn> = None;
                let mut r = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let evs = events(&format!("sd-{t}-{r}"), BATCH);
                    r += 1;
                    let req = Req::post("/events/batch").json(&Value::Array(evs.clone()));
                    if conn.is_none() {
                        match Conn::try_open(addr) {
                            Ok(c) => conn = Some(c),
                            // The listener is gone: the server is shutting down.
                            Err(_) => break,
                        }
                    }
                    match conn.as_mut().unwrap().try_roundtrip(&req) {
                        Ok(resp) => {
                            *statuses.entry(resp.status).or_default() += 1;
                            if resp.status == ok {
                                let a = ingest_answer(&resp);
                                assert_eq!(a.accepted as usize, BATCH, "{resp:?}");
                                acked.extend(ids_of(&evs));
                                acked_batches.fetch_add(1, Ordering::Relaxed);
                            }
                            if resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                                conn = None;
                            }
                        }
                        Err(_) => {
                            transport_errors += 1;
                            conn = None;
                        }
                    }
                }
                (acked, statuses, transport_errors)
            })
        })
        .collect();

    // Load for at least a second and at least a few acknowledged batches.
    let load_start = Instant::now();
    eventually(Duration::from_secs(30), "load to get going", || {
        (load_start.elapsed() >= Duration::from_millis(1500) && acked_batches.load(Ordering::Relaxed) >= 5)
            .then_some(())
    });
    let term_at = Instant::now();
    s.signal("TERM");
    let status = s.wait_exit(Duration::from_millis(SHUTDOWN_TIMEOUT_MS + 3_000));
    let shutdown_took = term_at.elapsed();
    stop.store(true, Ordering::Relaxed);

    let mut acked = Vec::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut transport_errors = 0;
    for h in handles {
        let (a, st, te) = h.join().expect("client thread panicked");
        acked.extend(a);
        for (k, v) in st {
            *statuses.entry(k).or_default() += v;
        }
        transport_errors += te;
    }
    let present = s.count_ids(&acked);
    let total = s.count();
    eprintln!(
        "shutdown under load (ack = {ack}): acked {} present {present} (table total {total}); statuses {statuses:?}; \
         transport errors {transport_errors}; exit {status} after {shutdown_took:?}",
        acked.len()
    );
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}\n{}", s.stderr());
    assert!(!acked.is_empty(), "no request was acknowledged before SIGTERM");
    assert!(present as usize >= acked.len(), "acknowledged events lost: acked {} present {present}", acked.len());
    assert!(total as usize >= acked.len());
    assert!(
        statuses.keys().all(|c| *c == ok || *c == 503),
        "statuses other than {ok}/503 during shutdown: {statuses:?}"
    );
}
