//! Faults: events PostgreSQL refuses for reasons validation cannot know
//! (dead letters) must not fail the rest of their batch.

use serde_json::{Value, json};

use crate::support::*;

/// A table like the SPEC's, plus a CHECK constraint an operator added.
fn table_with_constraint() -> String {
    let table = unique("t");
    let mut db = db_connect(&database_url());
    db.batch_execute(&format!(
        "CREATE TABLE {table} (
           event_id text PRIMARY KEY,
           device_id text NOT NULL CHECK (device_id <> 'poison'),
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

#[test]
fn refused_events_become_dead_letters_and_the_rest_commit() {
    let table = table_with_constraint();
    let mut server = Ingestd::new().table(&table).set("writer.writers", 2).start();
    server.set_owns_table(true);
    let ids: Vec<String> = (0..6).map(|i| unique(&format!("p{i}"))).collect();
    let batch = vec![
        ev(&ids[0], "good"),
        ev(&ids[1], "poison"),
        ev(&ids[2], "good"),
        json!({"event_id": ids[3], "device_id": "good"}),
        ev(&ids[4], "poison"),
        ev(&ids[5], "good"),
    ];
    let resp = server.post_batch(&batch);
    let answer = ingest_answer(&resp);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(answer.accepted, 3);
    assert_eq!(answer.rejected_indexes(), [1, 3, 4].into_iter().collect());
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    for r in body["rejected"].as_array().unwrap() {
        if r["index"] != 3 {
            assert!(r["error"].as_str().unwrap().contains("PostgreSQL refused"), "{r}");
        }
    }
    assert_eq!(server.count_ids(&[ids[0].clone(), ids[2].clone(), ids[5].clone()]), 3);
    let mut db = server.db();
    let dead = db
        .query(&format!("SELECT event_id, error, payload FROM {table}_dead_letter ORDER BY event_id"), &[])
        .expect("dead letters");
    let dead_ids: Vec<String> = dead.iter().map(|r| r.get(0)).collect();
    let mut expected = vec![ids[1].clone(), ids[4].clone()];
    expected.sort();
    assert_eq!(dead_ids, expected);
    let error: String = dead[0].get(1);
    assert!(error.contains("check constraint"), "{error}");
    // Only refused events in a request: 400, nothing stored, all reported.
    let only = server.post_batch(&[ev(&unique("q"), "poison")]);
    assert_eq!(only.status, 400);
    // And the server keeps serving.
    assert_eq!(server.post_event(&ev(&unique("after"), "good")).status, 200);
}

/// A top-level value of `/stats` (None if absent or not JSON).
fn stat(server: &Server, key: &str) -> Option<Value> {
    let s: Value = serde_json::from_slice(&server.get("/stats").body).ok()?;
    s.get(key).cloned()
}

/// Counts how many of `acked` are in `table` (in chunks, for big runs).
fn present(url: &str, table: &str, acked: &[String]) -> usize {
    let mut db = db_connect(url);
    acked.chunks(10_000).map(|c| count_ids(&mut db, table, c) as usize).sum()
}

#[test]
fn sigkill_mid_load_loses_no_acknowledged_event() {
    let server = Ingestd::new().set("server.shards", 2).set("writer.writers", 2).start();
    let (addr, table) = (server.addr, server.table.clone());
    let load = Load::start(addr, 4, 100, 200);
    eventually(std::time::Duration::from_secs(10), "some acknowledged batches", || {
        let s: Value = serde_json::from_slice(&server.get("/stats").body).ok()?;
        (s["events_committed"].as_u64()? >= 5_000).then_some(())
    });
    server.signal("KILL");
    let mut server = server;
    server.wait_exit(std::time::Duration::from_secs(10));
    let result = load.stop();
    // Restart on the same table: everything acknowledged is there.
    let mut again = Ingestd::new().table(&table).start();
    again.set_owns_table(true);
    let found = present(&database_url(), &table, &result.acked);
    println!(
        "SIGKILL mid-load (ack=commit): acked {} events, present {found}, lost {}; statuses {:?}",
        result.acked.len(),
        result.acked.len() - found,
        result.statuses
    );
    assert!(!result.acked.is_empty());
    assert_eq!(found, result.acked.len(), "acknowledged events lost");
    // Retrying what may have been in flight makes no duplicates.
    assert_eq!(again.post_batch(&events(&unique("after-kill"), 10)).status, 200);
}

#[test]
fn postgres_restart_mid_load_loses_nothing_and_recovers_by_itself() {
    let pg = PrivatePg::start();
    let server = Ingestd::new()
        .database_url(&pg.url)
        .set("server.shards", 2)
        .set("writer.writers", 2)
        .set("database.connect_timeout_ms", 1000)
        .start();
    let load = Load::start(server.addr, 4, 100, 200);
    load.wait_for(200, 10, std::time::Duration::from_secs(10));
    pg.stop();
    let down_at = std::time::Instant::now();
    // The outage lasts until the server says so on /health and the clients
    // have been told (503s), whatever the time that takes.
    let (health_down, health_down_after) =
        eventually(std::time::Duration::from_secs(10), "/health 503 during the outage", || {
            let status = server.get("/health").status;
            (status == 503).then(|| (status, down_at.elapsed()))
        });
    load.wait_for(503, 1, std::time::Duration::from_secs(10));
    pg.start_again();
    let up_at = std::time::Instant::now();
    eventually(std::time::Duration::from_secs(30), "the database up again in /stats", || {
        (stat(&server, "database_up")?.as_bool()?).then_some(())
    });
    // Then 200s again: more of them than before it was back.
    let ok_then = load.seen(200);
    load.wait_for(200, ok_then + 5, std::time::Duration::from_secs(30));
    let result = load.stop();
    let recovered_after = result
        .ok_times
        .iter()
        .find(|t| **t > up_at)
        .map(|t| t.duration_since(up_at))
        .expect("a 200 after PostgreSQL returned");
    let found = present(&pg.url, &server.table, &result.acked);
    println!(
        "PostgreSQL restart mid-load: acked {}, present {found}, lost {}; statuses {:?}; outage {:?}; first 200 {:?} after PostgreSQL was back; /health during outage {health_down} ({health_down_after:?} after the stop)",
        result.acked.len(),
        result.acked.len() - found,
        result.statuses,
        up_at.duration_since(down_at),
        recovered_after
    );
    assert!(!result.acked.is_empty());
    assert_eq!(found, result.acked.len(), "acknowledged events lost");
    assert!(result.statuses.get(&503).copied().unwrap_or(0) > 0, "503s during the outage: {:?}", result.statuses);
    assert!(result.statuses.keys().all(|s| *s == 200 || *s == 503), "{:?}", result.statuses);
    assert_eq!(health_down, 503, "/health says not ready during the outage");
    // The bound of stall::health_follows_the_database_with_no_client_traffic.
    assert!(health_down_after < std::time::Duration::from_secs(5), "/health 503 after {health_down_after:?}");
}

#[test]
fn postgres_unreachable_at_start_up_starts_not_ready_and_recovers() {
    let pg = PrivatePg::start();
    pg.stop();
    let server = Ingestd::new()
        .database_url(&pg.url)
        .set("database.connect_timeout_ms", 1000)
        .set("breaker.failure_threshold", 2)
        .set("breaker.open_ms", 200)
        .start();
    let health = server.get("/health");
    assert_eq!(health.status, 503, "not ready without a database");
    // Ingest fails fast with 503 + Retry-After (after the breaker opens, at once).
    let mut statuses = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..5 {
        let resp = server.post_event(&ev(&unique(&format!("u{i}")), "d"));
        assert!(resp.header("retry-after").is_some(), "{resp:?}");
        statuses.push(resp.status);
    }
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "503s are fast: {:?}", started.elapsed());
    let scrape = server.scrape();
    let breaker: Vec<f64> = scrape.series("ingestd_breaker_state").map(|s| s.value).collect();
    assert!(breaker == [1.0] || breaker == [2.0], "breaker open (1) or half-open (2):\n{}", scrape.text);
    pg.start_again();
    let back = std::time::Instant::now();
    let id = unique("back");
    eventually(std::time::Duration::from_secs(30), "ingest succeeds once PostgreSQL is up", || {
        (server.post_event(&ev(&id, "d")).status == 200).then_some(())
    });
    println!("PostgreSQL unreachable at start-up: 503s {statuses:?}; first 200 {:?} after it came up", back.elapsed());
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(present(&pg.url, &server.table, &[id]), 1, "the table was made on first contact");
}

// ---------------------------------------------------------------------------
// ack = "spool"
// ---------------------------------------------------------------------------

fn spool_dir() -> String {
    std::env::temp_dir().join(unique("spool")).display().to_string()
}

fn spooled(url: &str, dir: &str) -> Ingestd {
    Ingestd::new()
        .database_url(url)
        .set("ingest.ack", "spool")
        .set("spool.dir", dir)
        .set("server.shards", 2)
        .set("writer.writers", 2)
        .set("database.connect_timeout_ms", 1000)
        .set("breaker.open_ms", 200)
}

fn pending(server: &Server) -> Option<u64> {
    stat(server, "spool")?["pending_records"].as_u64()
}

#[test]
fn spool_sigkill_mid_load_loses_no_acknowledged_event() {
    let dir = spool_dir();
    let mut server = spooled(&database_url(), &dir).start();
    let table = server.table.clone();
    server.set_owns_table(false);
    let load = Load::start(server.addr, 4, 100, 200);
    load.wait_for(200, 50, std::time::Duration::from_secs(10));
    server.signal("KILL");
    server.wait_exit(std::time::Duration::from_secs(10));
    let result = load.stop();
    // Restart on the same spool and table: the spool is replayed.
    let mut again = spooled(&database_url(), &dir).table(&table).start();
    again.set_owns_table(true);
    eventually(std::time::Duration::from_secs(30), "spool drained after restart", || {
        (pending(&again)? == 0).then_some(())
    });
    let found = present(&database_url(), &table, &result.acked);
    println!(
        "SIGKILL mid-load (ack=spool): acked {}, present {found}, lost {}; statuses {:?}",
        result.acked.len(),
        result.acked.len() - found,
        result.statuses
    );
    assert!(!result.acked.is_empty());
    assert_eq!(found, result.acked.len(), "acknowledged events lost");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spool_absorbs_a_postgres_outage() {
    let pg = PrivatePg::start();
    let dir = spool_dir();
    let server = spooled(&pg.url, &dir).start();
    let load = Load::start(server.addr, 4, 100, 200);
    load.wait_for(200, 10, std::time::Duration::from_secs(10));
    pg.stop();
    // The server has seen the outage; from then on, clients keep getting
    // 200s (the spool takes them) and records wait in the spool.
    eventually(std::time::Duration::from_secs(15), "the outage seen in /stats", || {
        (!stat(&server, "database_up")?.as_bool()?).then_some(())
    });
    let ok_then = load.seen(200);
    load.wait_for(200, ok_then + 10, std::time::Duration::from_secs(10));
    let during = pending(&server).unwrap_or(0);
    pg.start_again();
    let back = std::time::Instant::now();
    // The load goes on until the server is writing to PostgreSQL again.
    eventually(std::time::Duration::from_secs(30), "the database up again in /stats", || {
        (stat(&server, "database_up")?.as_bool()?).then_some(())
    });
    let result = load.stop();
    eventually(std::time::Duration::from_secs(60), "spool drained", || (pending(&server)? == 0).then_some(()));
    let drained = back.elapsed();
    let found = present(&pg.url, &server.table, &result.acked);
    println!(
        "PostgreSQL outage with ack=spool: acked {}, present {found}, lost {}; statuses {:?}; {during} records waiting during the outage; drained {drained:?} after PostgreSQL returned",
        result.acked.len(),
        result.acked.len() - found,
        result.statuses
    );
    assert!(during > 0, "records waited in the spool during the outage");
    assert_eq!(result.statuses.get(&503), None, "the spool absorbs the outage: {:?}", result.statuses);
    assert_eq!(found, result.acked.len(), "acknowledged events lost");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spool_full_answers_503_and_keeps_what_it_acknowledged() {
    let pg = PrivatePg::start();
    pg.stop();
    let dir = spool_dir();
    let server =
        spooled(&pg.url, &dir).set("spool.segment_bytes", 64 * 1024).set("spool.max_bytes", 256 * 1024).start();
    let mut acked = Vec::new();
    let mut full = None;
    for r in 0..200 {
        let evs = events(&unique(&format!("full{r}")), 50);
        let resp = server.post_batch(&evs);
        match resp.status {
            200 => acked.extend(ids_of(&evs)),
            503 => {
                full = Some(resp);
                break;
            }
            other => panic!("status {other}"),
        }
    }
    let full = full.expect("the spool filled up");
    assert!(full.header("retry-after").is_some());
    assert!(String::from_utf8_lossy(&full.body).contains("spool"), "{full:?}");
    pg.start_again();
    eventually(std::time::Duration::from_secs(60), "spool drained", || (pending(&server)? == 0).then_some(()));
    let found = present(&pg.url, &server.table, &acked);
    println!("spool full: acked {} before 503, present {found}, lost {}", acked.len(), acked.len() - found);
    assert!(!acked.is_empty());
    assert_eq!(found, acked.len());
    // Room again once drained. The spool publishes "committed" (what
    // pending_records counts) before it deletes the segments behind it, so
    // that a reader never meets a deleted segment that is not yet committed:
    // the room follows within moments, not necessarily by the first request.
    let room = events(&unique("room"), 10);
    eventually(std::time::Duration::from_secs(10), "room in the spool again", || {
        (server.post_batch(&room).status == 200).then_some(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_spool_tail_is_cut_and_the_rest_replayed() {
    let pg = PrivatePg::start();
    pg.stop();
    let dir = spool_dir();
    let mut server = spooled(&pg.url, &dir).start();
    let table = server.table.clone();
    let mut acked = Vec::new();
    for r in 0..20 {
        let evs = events(&unique(&format!("tail{r}")), 20);
        assert_eq!(server.post_batch(&evs).status, 200);
        acked.extend(ids_of(&evs));
    }
    server.signal("KILL");
    server.wait_exit(std::time::Duration::from_secs(10));
    // A torn write: garbage after the last record of the last segment.
    let mut segments: Vec<_> = std::fs::read_dir(&dir)
        .expect("spool dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let last = segments.last().unwrap_or_else(|| panic!("no segment files in {dir}"));
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().append(true).open(last).expect("open segment");
        f.write_all(&[0xA5; 37]).expect("garbage");
    }
    pg.start_again();
    let mut again = spooled(&pg.url, &dir).table(&table).start();
    again.set_owns_table(true);
    eventually(std::time::Duration::from_secs(30), "spool drained", || (pending(&again)? == 0).then_some(()));
    let found = present(&pg.url, &table, &acked);
    println!("corrupt spool tail: acked {}, present {found}, lost {}", acked.len(), acked.len() - found);
    assert_eq!(found, acked.len());
    assert!(again.stderr().contains("torn tail"), "the cut is logged:\n{}", again.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_deadline_answers_503_and_exit_code_says_so() {
    let mut server = Ingestd::new().set("server.shutdown_timeout_ms", 2000).start();
    // A commit that cannot finish: the table is locked by someone else.
    let mut locker = server.db();
    let mut tx = locker.transaction().expect("begin");
    tx.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", server.table)).expect("lock");
    let addr = server.addr;
    let waiting = std::thread::spawn(move || {
        let mut conn = Conn::open(addr);
        conn.set_read_timeout(std::time::Duration::from_secs(20));
        conn.roundtrip(&Req::post("/events/batch").json(&Value::Array(events(&unique("stuck"), 5))))
    });
    // TERM once the request is in the writer's COPY, waiting for the lock.
    eventually(std::time::Duration::from_secs(10), "the writer waiting for the table lock", || {
        (server.lock_waiters() > 0).then_some(())
    });
    server.signal("TERM");
    let resp = waiting.join().expect("client");
    let status = server.wait_exit(std::time::Duration::from_secs(10));
    drop(tx);
    println!("shutdown deadline: waiting request answered {}, exit code {:?}", resp.status, status.code());
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(resp.header("retry-after").is_some());
    assert_eq!(status.code(), Some(75), "work left at the deadline");
}
