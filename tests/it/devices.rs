//! `GET /devices/{device_id}` and `GET /devices?prefix=&since=&limit=&after=`:
//! the latest state of devices (`[state]`), read by the reader threads.
//!
//! Interface, as these tests read it (docs/INTERFACE.md):
//! - One device: 200 with the newest event as the WebSocket feed shapes it
//!   (`event_id`, `device_id`, `type`, `ts`, `received_at`, `payload`) plus
//!   `first_seen` and `events`; 404 with a JSON error for an unknown one.
//! - A page: `{"devices": [...], "next": id|null}` in `device_id` byte
//!   order; `after=next` gives the following page; `next` is null on the
//!   last one. `prefix` and `since` (on `ts`) filter.
//! - A bad parameter (or an unknown or repeated one) is 400 with
//!   `"parameter"` naming it.
//! - Tokens: `read` or `subscribe` may read; a `device_prefix` limits what
//!   is read (403 outside it); an ingest-only token gets 403.
//! - `[state]` off: 404 saying how to turn it on. Database gone, or a read
//!   stuck past `state.read_timeout_ms`: 503 with `Retry-After`. A page
//!   that would pass `state.max_answer_bytes` ends early with `next` set.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

fn with_state() -> Ingestd {
    Ingestd::new().set("state.enabled", "true")
}

/// What the test sent for one device: the newest event's id, ts and
/// payload, and how many events.
struct Sent {
    newest: (String, i64, Value),
    events: i64,
}

/// Three events per device, sent newest first and then two late ones, in
/// batches that mix devices: `fleet-a/NN` (20 devices) and `fleet-b/NN` (16).
fn load(s: &Server) -> BTreeMap<String, Sent> {
    let base = now_ms() - 3_600_000;
    let mut sent = BTreeMap::new();
    let devices: Vec<String> =
        (0..20).map(|i| format!("fleet-a/{i:02}")).chain((0..16).map(|i| format!("fleet-b/{i:02}"))).collect();
    for k in [2i64, 0, 1] {
        let batch: Vec<Value> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let ts = base + i as i64 * 60_000 + k * 1_000;
                let id = unique("e");
                let payload = json!({"k": k, "speed": i, "label": format!("{d} \"quoted\" é")});
                if k == 2 {
                    sent.insert(d.clone(), Sent { newest: (id.clone(), ts, payload.clone()), events: 0 });
                }
                json!({"event_id": id, "device_id": d, "type": if i % 2 == 0 { "gps" } else { "temp" }, "ts": ts, "payload": payload})
            })
            .collect();
        let resp = s.post_batch(&batch);
        assert_eq!(resp.status, 200, "{}", resp.text());
        // Re-sent: must not count twice.
        assert_eq!(s.post_batch(&batch[..3]).status, 200);
    }
    for v in sent.values_mut() {
        v.events = 3;
    }
    sent
}

/// Walks every page of `query` with `limit`; returns the device ids in
/// order and the number of pages.
fn walk(s: &Server, query: &str, limit: usize, token: Option<&str>) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("/devices?limit={limit}{query}");
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", form_urlencoded::byte_serialize(a.as_bytes()).collect::<String>()));
        }
        let req = Req::get(&path);
        let resp = match token {
            Some(t) => s.send_as(t, req),
            None => s.send(&req),
        };
        assert_eq!(resp.status, 200, "{resp:?}");
        let body = resp.json();
        let page = body["devices"].as_array().expect("devices array");
        assert!(page.len() <= limit, "page of {} with limit {limit}", page.len());
        ids.extend(page.iter().map(|d| d["device_id"].as_str().unwrap().to_string()));
        pages += 1;
        assert!(pages < 1000, "pagination does not end");
        match &body["next"] {
            Value::Null => return (ids, pages),
            Value::String(n) => {
                assert_eq!(Some(n), ids.last(), "next is the last device of the page");
                after = Some(n.clone());
            }
            other => panic!("next is {other}"),
        }
    }
}

fn assert_bad(s: &Server, path: &str, parameter: &str) {
    let resp = s.get(path);
    assert_eq!(resp.status, 400, "{path}: {resp:?}");
    let body = resp.json();
    assert_eq!(body["parameter"], parameter, "{path}: {body}");
    assert!(body["error"].as_str().unwrap().contains(parameter), "{path}: {body}");
}

#[test]
fn one_device_unknown_devices_and_every_page() {
    let s = with_state().start();
    let sent = load(&s);

    // One device: the newest event (not the late ones), as the feed shapes it.
    let resp = s.get("/devices/fleet-a%2F07");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let d = resp.json();
    let want = &sent["fleet-a/07"];
    assert_eq!(d["device_id"], "fleet-a/07");
    assert_eq!(d["event_id"], want.newest.0.as_str());
    assert_eq!(d["type"], "temp");
    assert_eq!(parse_rfc3339_ms(d["ts"].as_str().unwrap()), want.newest.1);
    assert!(d["ts"].as_str().unwrap().ends_with('Z'), "UTC like the feed: {d}");
    assert_eq!(d["payload"], want.newest.2);
    assert_eq!(d["events"], want.events);
    let received = parse_rfc3339_ms(d["received_at"].as_str().unwrap());
    let first_seen = parse_rfc3339_ms(d["first_seen"].as_str().unwrap());
    assert!(first_seen <= received && (now_ms() - first_seen).abs() < 600_000, "{d}");
    let keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 8, "{keys:?}");
    // A `/` in the id may also be sent as is.
    assert_eq!(s.get("/devices/fleet-a/07").json(), d);

    // Unknown: 404 with a JSON error naming it.
    let resp = s.get("/devices/fleet-z%2F1");
    assert_eq!(resp.status, 404, "{resp:?}");
    assert!(assert_error(&resp, 404).contains("fleet-z/1"));

    // Every device exactly once, in byte order, over pages of 7.
    let all: Vec<String> = sent.keys().cloned().collect();
    let (ids, pages) = walk(&s, "", 7, None);
    assert_eq!(ids, all);
    assert_eq!(pages, all.len().div_ceil(7));
    // A limit that divides the count exactly still ends with next = null
    // on the last full page (no empty extra page).
    let (ids, pages) = walk(&s, "", 12, None);
    assert_eq!((ids.len(), pages), (36, 3));
    // The default page holds them all; objects are the same as one by one.
    let page = s.get("/devices").json();
    assert_eq!(page["next"], Value::Null);
    assert_eq!(page["devices"].as_array().unwrap().len(), 36);
    assert_eq!(page["devices"][7], d);

    // prefix, since, and both with after.
    let (ids, _) = walk(&s, "&prefix=fleet-b%2F", 5, None);
    assert_eq!(ids, all.iter().filter(|d| d.starts_with("fleet-b/")).cloned().collect::<Vec<_>>());
    let cut = sent["fleet-b/03"].newest.1;
    let newer: Vec<String> = sent.iter().filter(|(_, v)| v.newest.1 >= cut).map(|(k, _)| k.clone()).collect();
    assert!(!newer.is_empty() && newer.len() < 36);
    let (ids, _) = walk(&s, &format!("&since={}", rfc3339_ms(cut)), 4, None);
    assert_eq!(ids, newer);
    let (ids, _) = walk(&s, &format!("&since={cut}"), 50, None);
    assert_eq!(ids, newer, "since in epoch milliseconds");
    let page = s.get("/devices?prefix=fleet-a%2F&after=fleet-a%2F17").json();
    let ids: Vec<&str> = page["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["fleet-a/18", "fleet-a/19"]);
    // LIKE metacharacters in a prefix are plain characters.
    assert_eq!(s.get("/devices?prefix=fleet-%25").json()["devices"], json!([]));
    assert_eq!(s.get("/devices?prefix=fleet_a").json()["devices"], json!([]));
}

#[test]
fn bad_parameters_are_400_naming_them() {
    let s = with_state().set("state.max_page", 500).start();
    assert_bad(&s, "/devices?limit=0", "limit");
    assert_bad(&s, "/devices?limit=501", "limit");
    assert_bad(&s, "/devices?limit=99999999999999999999999", "limit");
    assert_bad(&s, "/devices?limit=ten", "limit");
    assert_bad(&s, "/devices?since=garbage", "since");
    assert_bad(&s, "/devices?since=2026-02-30T00:00:00Z", "since");
    assert_bad(&s, &format!("/devices?after={}", "x".repeat(129)), "after");
    assert_bad(&s, "/devices?after=a%00b", "after");
    assert_bad(&s, &format!("/devices?prefix={}", "p".repeat(129)), "prefix");
    assert_bad(&s, "/devices?device_id=x", "device_id");
    assert_bad(&s, "/devices?limit=5&limit=6", "limit");
    assert_bad(&s, &format!("/devices/{}", "d".repeat(129)), "device_id");
    assert_bad(&s, "/devices/", "device_id");
    assert_bad(&s, "/devices/a%00", "device_id");
    assert_bad(&s, "/devices/a?limit=1", "limit");
    // The limit at its bound is fine; so is an empty value (= absent).
    assert_eq!(s.get("/devices?limit=500").status, 200);
    assert_eq!(s.get("/devices?limit=&prefix=&after=&since=").status, 200);
    // Not a GET: 405 with Allow.
    let resp = s.send(&Req::post("/devices").json(&json!({})));
    assert_eq!(resp.status, 405, "{resp:?}");
}

#[test]
fn the_pages_use_the_primary_key_index() {
    let s = with_state().start();
    assert_eq!(s.post_event(&json!({"device_id": "fleet-a/1", "type": "t", "ts": now_ms()})).status, 200);
    let filter = ingestd::read::DeviceFilter {
        prefixes: vec!["fleet-a/".into()],
        after: Some("fleet-a/0".into()),
        since: Some(std::time::SystemTime::now() - Duration::from_secs(3600)),
        limit: 100,
        ..Default::default()
    };
    let (sql, params) = ingestd::read::page_sql(&format!("\"{}_state\"", s.table), &filter);
    let params: Vec<&(dyn postgres::types::ToSql + Sync)> = params.iter().map(|p| p.as_sql()).collect();
    let mut db = s.db();
    // Byte order whatever the cluster's locale (this test cluster's is C,
    // so the plan below would not tell): the column itself says "C".
    let collation: Option<String> = db
        .query_one(
            "SELECT collation_name::text FROM information_schema.columns WHERE table_name = $1 AND column_name = 'device_id'",
            &[&format!("{}_state", s.table)],
        )
        .unwrap()
        .get(0);
    assert_eq!(collation.as_deref(), Some("C"));
    let mut tx = db.transaction().unwrap();
    // A table this small is read whole unless that is ruled out; what
    // matters is that the index *can* serve the range and the order.
    tx.batch_execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
    let plan: Vec<String> =
        tx.query(&format!("EXPLAIN {sql}"), &params).unwrap().iter().map(|r| r.get::<_, String>(0)).collect();
    let plan = plan.join("\n");
    println!("{sql}\n{plan}");
    assert!(plan.contains(&format!("Index Scan using {}_state_pkey", s.table)), "{plan}");
    assert!(!plan.contains("Sort"), "the index gives the order: {plan}");
    assert!(plan.contains("Index Cond"), "the prefix and cursor bound the scan: {plan}");
}

#[test]
fn tokens_need_read_or_subscribe_and_keep_to_their_prefix() {
    let ingest = secret_token("ingest");
    let reader = secret_token("reader");
    let subscriber = secret_token("subscriber");
    let config = format!(
        "[state]\nenabled = true\n\n[auth]\nmode = \"tokens\"\n\n\
         [[auth.tokens]]\ntoken = \"{ingest}\"\nscopes = [\"ingest\"]\nname = \"writer\"\n\n\
         [[auth.tokens]]\ntoken = \"{reader}\"\nscopes = [\"read\"]\ndevice_prefix = \"fleet-a/\"\nname = \"fleet-a\"\n\n\
         [[auth.tokens]]\ntoken = \"{subscriber}\"\nscopes = [\"subscribe\"]\nname = \"dashboard\"\n"
    );
    let s = Ingestd::new().config_file(&temp_file("devices.toml", &config).display().to_string()).start();
    let events: Vec<Value> = ["fleet-a/1", "fleet-a/2", "fleet-ab/1", "fleet-b/1"]
        .iter()
        .map(|d| json!({"device_id": d, "type": "t", "ts": now_ms()}))
        .collect();
    let resp = s.send_as(&ingest, Req::post("/events/batch").json(&Value::Array(events)));
    assert_eq!(resp.status, 200, "{resp:?}");

    assert_eq!(s.get("/devices").status, 401);
    let resp = s.send_as(&ingest, Req::get("/devices"));
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(assert_error(&resp, 403).contains("read"));
    assert_eq!(s.send_as(&ingest, Req::get("/devices/fleet-a%2F1")).status, 403);

    // The prefixed reader sees its devices only, whatever it asks for.
    let (ids, _) = walk(&s, "", 1, Some(&reader));
    assert_eq!(ids, ["fleet-a/1", "fleet-a/2"]);
    let (ids, _) = walk(&s, "&prefix=fleet", 10, Some(&reader));
    assert_eq!(ids, ["fleet-a/1", "fleet-a/2"], "a wider prefix is narrowed to the token's");
    let (ids, _) = walk(&s, "&prefix=fleet-a%2F2", 10, Some(&reader));
    assert_eq!(ids, ["fleet-a/2"]);
    let resp = s.send_as(&reader, Req::get("/devices?prefix=fleet-b%2F"));
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(s.send_as(&reader, Req::get("/devices/fleet-a%2F1")).status, 200);
    // Outside the prefix: 403 whether the device exists or not.
    for outside in ["/devices/fleet-b%2F1", "/devices/fleet-b%2F999", "/devices/fleet-ab%2F1"] {
        let resp = s.send_as(&reader, Req::get(outside));
        assert_eq!(resp.status, 403, "{outside}: {resp:?}");
        assert!(assert_error(&resp, 403).contains("fleet-a/"));
    }
    // `subscribe` reads too, everything.
    let (ids, _) = walk(&s, "", 3, Some(&subscriber));
    assert_eq!(ids, ["fleet-a/1", "fleet-a/2", "fleet-ab/1", "fleet-b/1"]);
}

#[test]
fn state_off_says_how_to_turn_it_on() {
    let s = Ingestd::new().start();
    for path in ["/devices", "/devices/x"] {
        let resp = s.get(path);
        assert_eq!(resp.status, 404, "{resp:?}");
        assert!(assert_error(&resp, 404).contains("state.enabled"), "{resp:?}");
    }
}

#[test]
fn a_stuck_read_is_503_within_the_read_timeout() {
    let s = with_state().set("state.read_timeout_ms", 300).start();
    assert_eq!(s.post_event(&json!({"device_id": "d", "type": "t", "ts": now_ms()})).status, 200);
    let mut db = s.db();
    let mut lock = db.transaction().unwrap();
    lock.batch_execute(&format!("LOCK TABLE {}_state IN ACCESS EXCLUSIVE MODE", s.table)).unwrap();
    let asked = Instant::now();
    let resp = s.get("/devices/d");
    let took = asked.elapsed();
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(resp.header("retry-after").is_some(), "{resp:?}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    // Either the shard gave up at the deadline, or PostgreSQL cancelled
    // the statement (its statement_timeout is what was left of it) first.
    let why = assert_error(&resp, 503);
    assert!(why.contains("state.read_timeout_ms") || why.contains("statement timeout"), "{why}");
    // The reader is free again as soon as the lock goes.
    lock.rollback().unwrap();
    assert_eq!(s.get("/devices/d").status, 200);
    println!("stuck read answered 503 after {took:?}: {why}");
}

#[test]
fn database_stopped_is_503_with_retry_after_and_reads_come_back() {
    let pg = PrivatePg::start();
    let s = with_state().database_url(&pg.url).start();
    assert_eq!(s.post_event(&json!({"device_id": "d", "type": "t", "ts": now_ms()})).status, 200);
    assert_eq!(s.get("/devices/d").status, 200);
    pg.stop();
    // At once: the pooled connection is dead, or no new one can be made
    // before state.read_timeout_ms (2 s by default).
    for path in ["/devices/d", "/devices"] {
        let asked = Instant::now();
        let resp = s.get(path);
        assert_eq!(resp.status, 503, "{path}: {resp:?}");
        assert!(resp.header("retry-after").is_some(), "{resp:?}");
        assert!(asked.elapsed() < Duration::from_secs(3), "{path} answered after {:?}", asked.elapsed());
        println!("database stopped: {path} answered 503 after {:?}: {}", asked.elapsed(), assert_error(&resp, 503));
    }
    // Once the probe has seen it, without trying: fast.
    let fast = eventually(Duration::from_secs(15), "a fast 503 once the probe saw the database go", || {
        let asked = Instant::now();
        let resp = s.get("/devices/d");
        let took = asked.elapsed();
        (resp.status == 503 && resp.header("retry-after").is_some() && took < Duration::from_millis(100))
            .then(|| (took, assert_error(&resp, 503)))
    });
    println!("database known down: 503 after {:?}: {}", fast.0, fast.1);
    pg.start_again();
    eventually(Duration::from_secs(20), "reads served again after PostgreSQL is back", || {
        (s.get("/devices/d").status == 200).then_some(())
    });
}

#[test]
fn a_page_past_max_answer_bytes_ends_early_and_next_goes_on() {
    let s = with_state().set("state.max_answer_bytes", 65_536).start();
    let big = "x".repeat(20_000);
    let events: Vec<Value> = (0..10)
        .map(|i| json!({"device_id": format!("big/{i:02}"), "type": "t", "ts": now_ms(), "payload": {"blob": big}}))
        .collect();
    assert_eq!(s.post_batch(&events).status, 200);
    let first = s.get("/devices?limit=10");
    assert_eq!(first.status, 200);
    let page = first.json();
    let n = page["devices"].as_array().unwrap().len();
    assert!((1..10).contains(&n) && first.body.len() <= 65_536, "{n} devices in {} bytes", first.body.len());
    assert_eq!(page["next"], page["devices"][n - 1]["device_id"]);
    let (ids, pages) = walk(&s, "", 10, None);
    assert_eq!(ids, (0..10).map(|i| format!("big/{i:02}")).collect::<Vec<_>>());
    println!("10 devices of 20 kB under max_answer_bytes = 64 KiB: {n} in the first page, {pages} pages");
}
