//! `[state]`: the latest state per device, written in the batch's own
//! transaction. Checked against the events table itself (`DISTINCT ON`),
//! after loads with late arrivals, in-batch and re-sent duplicates, and
//! several writers on the same devices.

use std::collections::BTreeMap;
use std::thread;

use serde_json::{Value, json};

use crate::support::*;

fn with_state() -> Ingestd {
    Ingestd::new().set("state.enabled", "true")
}

fn ev(id: &str, device: &str, ts_ms: i64) -> Value {
    json!({"event_id": id, "device_id": device, "type": "gps", "ts": ts_ms, "payload": {"id": id, "ts": ts_ms}})
}

/// One device's state row: (event_id, ts ms, first_seen ms, events, payload id).
type StateRow = (String, i64, i64, i64, String);

fn state_rows(s: &Server) -> BTreeMap<String, StateRow> {
    let mut db = s.db();
    let sql = format!(
        "SELECT device_id, event_id, (extract(epoch from ts) * 1000)::bigint, \
         (extract(epoch from first_seen) * 1000)::bigint, events, payload->>'id' FROM {}_state",
        s.table
    );
    db.query(&sql, &[])
        .expect("state table")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))))
        .collect()
}

/// What the state must be, computed from the events table alone.
fn expected_state(s: &Server) -> BTreeMap<String, StateRow> {
    let mut db = s.db();
    let sql = format!(
        "SELECT l.device_id, l.event_id, (extract(epoch from l.ts) * 1000)::bigint, \
                (extract(epoch from a.first_seen) * 1000)::bigint, a.events, l.payload->>'id' \
         FROM (SELECT DISTINCT ON (device_id) device_id, event_id, ts, payload FROM {0} \
               ORDER BY device_id, ts DESC) l \
         JOIN (SELECT device_id, min(received_at) AS first_seen, count(*) AS events FROM {0} GROUP BY device_id) a \
           USING (device_id)",
        s.table
    );
    db.query(&sql, &[])
        .expect("events table")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))))
        .collect()
}

#[test]
fn a_late_event_never_overwrites_and_a_resent_one_counts_once() {
    let s = with_state().start();
    let now = now_ms();
    let (newer, older, other) = (unique("n"), unique("o"), unique("x"));
    assert_eq!(s.post_event(&ev(&newer, "d1", now - 1_000)).status, 200);
    assert_eq!(s.post_event(&ev(&older, "d1", now - 60_000)).status, 200);
    // Re-sent alone, and again inside a batch with a repeat of itself.
    assert_eq!(s.post_event(&ev(&newer, "d1", now - 1_000)).status, 200);
    let resp = s.post_batch(&[ev(&older, "d1", now - 60_000), ev(&other, "d2", now), ev(&other, "d2", now)]);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let state = state_rows(&s);
    let d1 = &state["d1"];
    assert_eq!((d1.0.as_str(), d1.1, d1.3, d1.4.as_str()), (newer.as_str(), now - 1_000, 2, newer.as_str()));
    assert_eq!(state["d2"].3, 1, "an in-batch repeat counted twice: {state:?}");
    assert_eq!(state, expected_state(&s));
}

#[test]
fn state_equals_the_newest_event_per_device_after_a_concurrent_load() {
    // Two shards and three writers, so that batches of different writers
    // share devices and commit concurrently.
    let s = with_state().set("server.shards", 2).set("writer.writers", 3).start();
    let base = now_ms() - 3_600_000;
    let devices = 60;
    let clients = 6;
    let batches = 25;
    let per_batch = 40;
    thread::scope(|scope| {
        for c in 0..clients {
            let s = &s;
            scope.spawn(move || {
                let mut sent: Vec<Vec<Value>> = Vec::new();
                for b in 0..batches {
                    let mut batch: Vec<Value> = (0..per_batch)
                        .map(|i| {
                            let n = (c * batches + b) * per_batch + i;
                            // A ts unique over the whole load, in an order
                            // unrelated to sending: many events arrive late.
                            let ts = base + ((n * 7_919) % 100_000) as i64 * 10 + c as i64;
                            ev(&format!("s{c}-{b}-{i}-{}", s.table), &format!("dev-{}", (n * 13) % devices), ts)
                        })
                        .collect();
                    // An in-batch repeat.
                    batch.push(batch[0].clone());
                    let resp = s.post_batch(&batch);
                    assert_eq!(resp.status, 200, "{}", resp.text());
                    // Every fifth batch re-sends an earlier one whole.
                    if b % 5 == 4 {
                        let again = &sent[b / 2];
                        assert_eq!(s.post_batch(again).status, 200);
                    }
                    sent.push(batch);
                }
            });
        }
    });
    assert_eq!(s.count(), (clients * batches * per_batch) as i64);
    let state = state_rows(&s);
    assert_eq!(state.len(), devices);
    assert_eq!(state, expected_state(&s), "state differs from the events table");
    let total: i64 = state.values().map(|r| r.3).sum();
    assert_eq!(total, s.count(), "state's event counts do not add up to the stored events");
    // Writers on the same devices never deadlocked: no transaction failed.
    let scrape = s.scrape();
    assert_eq!(scrape.sum("ingestd_batch_failures_total", None), 0.0, "a batch failed (deadlock?)");
}

#[test]
fn refused_events_are_not_in_the_state() {
    let table = unique("t");
    let mut db = db_connect(&database_url());
    db.batch_execute(&format!(
        "CREATE TABLE {table} (event_id text PRIMARY KEY, device_id text NOT NULL, event_type text NOT NULL, \
         ts timestamptz NOT NULL, received_at timestamptz NOT NULL DEFAULT now(), payload jsonb, \
         CHECK (payload->>'bad' IS NULL))"
    ))
    .expect("create table");
    let mut s = with_state().table(&table).start();
    s.set_owns_table(true);
    let now = now_ms();
    let (good, bad) = (unique("g"), unique("b"));
    let mut refused = ev(&bad, "d1", now);
    refused["payload"] = json!({"bad": true});
    let resp = s.post_batch(&[ev(&good, "d1", now - 5_000), refused]);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(ingest_answer(&resp).accepted, 1);
    let state = state_rows(&s);
    assert_eq!((state["d1"].0.as_str(), state["d1"].3), (good.as_str(), 1), "a dead letter reached the state");
}

#[test]
fn check_config_shows_the_state_table() {
    let out = run_cli(
        &["--check-config", "--database-url", "postgres://u@127.0.0.1/db", "--set", "state.enabled=true"],
        &[],
        std::time::Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("[state]") && out.stdout.contains("enabled = true"), "{}", out.stdout);
    let bad = run_cli(
        &["--check-config", "--database-url", "postgres://u@127.0.0.1/db", "--set", "state.table=bad name"],
        &[],
        std::time::Duration::from_secs(10),
    );
    assert_eq!(bad.code(), Some(64));
    assert!(bad.stderr.contains("state.table"), "{}", bad.stderr);
}
