//! The ingest success paths: `POST /events` and `POST /events/batch` (JSON
//! array and NDJSON), what a 200 means with `ack = "commit"` (the row is
//! already committed, with the right columns), assigned UUIDv7 ids, both `ts`
//! forms, partial and total rejection, idempotency on `event_id`, and
//! `ack = "queue"` (202, row arrives later).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

#[test]
fn one_event_is_committed_with_its_columns_when_answered() {
    let s = Server::start();
    let ts = "2024-05-01T12:00:00.123+02:00";
    let payload = json!({
        "celsius": 21.5,
        "tags": ["a", "b"],
        "nested": {"ok": true, "none": null, "n": -3},
        "text": "héllo \"quoted\" \\ \n日本",
    });
    let ev = json!({
        "event_id": "evt-0001",
        "device_id": "dev-é-42",
        "type": "temperature",
        "ts": ts,
        "payload": payload,
    });
    let resp = s.post_event(&ev);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"accepted": 1, "rejected": []}), "{resp:?}");
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}:\n{resp:?}");

    // ack = commit: no polling, the row must already be there.
    let row = s.row("evt-0001").expect("row committed before the 200");
    assert_eq!(row.device_id, "dev-é-42");
    assert_eq!(row.event_type, "temperature");
    assert_eq!(row.ts_ms, parse_rfc3339_ms(ts));
    assert_eq!(row.payload.as_ref(), Some(&payload), "payload stored as jsonb equal to what was sent");
    let age = row.received_age_s.expect("received_at set");
    assert!((-5.0..120.0).contains(&age), "received_at is {age} s before now");
    assert_eq!(s.count(), 1);
}

fn assert_uuid_v7(id: &str) {
    let b = id.as_bytes();
    let shape_ok = b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b.iter().enumerate().all(|(i, c)| [8, 13, 18, 23].contains(&i) || c.is_ascii_hexdigit());
    assert!(shape_ok, "assigned event_id {id:?} is not a 36-char UUID");
    assert_eq!(b[14], b'7', "assigned event_id {id:?} is not version 7");
    assert!(b"89abAB".contains(&b[19]), "assigned event_id {id:?} has a non-RFC variant");
}

#[test]
fn absent_event_id_gets_a_uuidv7() {
    let s = Server::start();
    let resp = s.post_event(&json!({"device_id": "d", "type": "t", "ts": now_ms()}));
    assert_ingest(&resp, 200, 1, &[]);
    let rows = s.rows();
    assert_eq!(rows.len(), 1);
    assert_uuid_v7(&rows[0].event_id);

    let batch: Vec<Value> =
        (0..10).map(|i| json!({"device_id": "d", "type": "t", "ts": now_ms(), "payload": i})).collect();
    assert_ingest(&s.post_batch(&batch), 200, 10, &[]);
    let rows = s.rows();
    assert_eq!(rows.len(), 11, "each id-less event gets its own id");
    let ids: BTreeSet<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(ids.len(), 11);
    for r in &rows {
        assert_uuid_v7(&r.event_id);
    }
}

#[test]
fn ts_accepts_rfc3339_with_offsets_and_epoch_ms() {
    let s = Server::start();
    let soon = now_ms() + 60_000; // within the default 5 min skew
    let cases: Vec<(&str, Value, i64)> = vec![
        ("utc", json!("2024-05-01T12:00:00Z"), parse_rfc3339_ms("2024-05-01T12:00:00Z")),
        (
            "plus offset, fraction",
            json!("2024-05-01T12:00:00.5+05:30"),
            parse_rfc3339_ms("2024-05-01T12:00:00.5+05:30"),
        ),
        ("minus offset", json!("2024-05-01T12:00:00-07:00"), parse_rfc3339_ms("2024-05-01T12:00:00-07:00")),
        ("epoch ms", json!(1_714_557_600_123_i64), 1_714_557_600_123),
        ("exactly 2000-01-01 (rfc3339)", json!("2000-01-01T00:00:00Z"), 946_684_800_000),
        ("exactly 2000-01-01 (ms)", json!(946_684_800_000_i64), 946_684_800_000),
        ("a minute ahead (ms)", json!(soon), soon),
        ("a minute ahead (rfc3339)", json!(rfc3339_ms(soon)), soon),
    ];
    let batch: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, ts, _))| json!({"event_id": format!("ts-{i}"), "device_id": "d", "type": "t", "ts": ts}))
        .collect();
    let resp = s.post_batch(&batch);
    assert_ingest(&resp, 200, cases.len() as u64, &[]);
    for (i, (label, ts, want_ms)) in cases.iter().enumerate() {
        let row = s.row(&format!("ts-{i}")).unwrap_or_else(|| panic!("{label}: no row"));
        assert_eq!(row.ts_ms, *want_ms, "{label}: ts {ts} stored as {} ms", row.ts_ms);
    }
}

#[test]
fn batch_json_array_of_100_is_committed() {
    let s = Ingestd::new().set("server.shards", 2).set("writer.writers", 2).start();
    let evs = events("b", 100);
    let resp = s.post_batch(&evs);
    assert_eq!(resp.json(), json!({"accepted": 100, "rejected": []}), "{resp:?}");
    assert_eq!(resp.status, 200);
    assert_eq!(s.count(), 100);
    assert_eq!(s.count_ids(&ids_of(&evs)), 100);
    let row = s.row("b-57").unwrap();
    assert_eq!(row.payload, Some(evs[57]["payload"].clone()));
    assert_eq!(row.ts_ms, evs[57]["ts"].as_i64().unwrap());
}

#[test]
fn batch_ndjson_with_blank_lines_and_trailing_newline() {
    let s = Server::start();
    let evs = events("nd", 50);
    let mut body = String::new();
    for (i, e) in evs.iter().enumerate() {
        body.push_str(&serde_json::to_string(e).unwrap());
        body.push('\n');
        if i % 10 == 3 {
            body.push('\n'); // blank line
        }
    }
    body.push('\n'); // and a trailing blank line after the trailing newline
    let resp = s.post_ndjson(&body);
    assert_ingest(&resp, 200, 50, &[]);
    assert_eq!(s.count(), 50);
    assert_eq!(s.count_ids(&ids_of(&evs)), 50);
}

#[test]
fn batch_partial_rejection_lists_indexes_and_stores_the_rest() {
    let s = Server::start();
    let mut evs = events("p", 10);
    evs[2].as_object_mut().unwrap().remove("device_id");
    evs[5]["ts"] = json!("not a time");
    evs[9]["type"] = json!(17);
    let resp = s.post_batch(&evs);
    let answer = assert_ingest(&resp, 200, 7, &[2, 5, 9]);
    assert_eq!(answer.rejected.len(), 3);
    assert_eq!(s.count(), 7);
    for (i, id) in ids_of(&evs).iter().enumerate() {
        let want = if [2, 5, 9].contains(&i) { 0 } else { 1 };
        assert_eq!(s.count_id(id), want, "event {i} ({id})");
    }
}

#[test]
fn batch_with_no_good_event_is_400_with_the_same_shape() {
    let s = Server::start();
    let evs = vec![
        json!({"event_id": "x-0", "type": "t", "ts": now_ms()}),
        json!({"event_id": "x-1", "device_id": "d", "ts": now_ms()}),
        json!({"event_id": "x-2", "device_id": "d", "type": "t", "ts": "yesterday"}),
    ];
    assert_ingest(&s.post_batch(&evs), 400, 0, &[0, 1, 2]);
    assert_eq!(s.count(), 0);
}

#[test]
fn single_bad_event_is_400_with_the_same_shape() {
    let s = Server::start();
    let resp = s.post_event(&json!({"event_id": "bad-1", "device_id": "d", "type": "t"}));
    assert_ingest(&resp, 400, 0, &[0]);
    assert_eq!(s.count(), 0);
}

#[test]
fn same_event_id_in_two_requests_makes_one_row() {
    let s = Server::start();
    let mut ev = event("dup-1");
    assert_ingest(&s.post_event(&ev), 200, 1, &[]);
    ev["payload"] = json!({"retry": true});
    let resp = s.post_event(&ev);
    assert_eq!(resp.status, 200, "a retry is answered 200:\n{resp:?}");
    assert_eq!(s.count_id("dup-1"), 1);
    assert_eq!(s.count(), 1);

    // Also when the retry is part of a larger batch.
    let mut batch = events("dup-b", 5);
    batch.push(event("dup-1"));
    let resp = s.post_batch(&batch);
    assert_eq!(resp.status, 200, "{resp:?}");
    let answer = ingest_answer(&resp);
    assert_eq!(answer.accepted as usize + answer.rejected.len(), 6, "{resp:?}");
    assert_eq!(s.count(), 6);
}

#[test]
fn same_event_id_twice_in_one_batch_makes_one_row() {
    let s = Server::start();
    let batch = vec![event("twice"), event("once"), event("twice")];
    let resp = s.post_batch(&batch);
    assert_eq!(resp.status, 200, "{resp:?}");
    let answer = ingest_answer(&resp);
    assert_eq!(answer.accepted as usize + answer.rejected.len(), 3, "{resp:?}");
    assert_eq!(s.count_id("twice"), 1);
    assert_eq!(s.count_id("once"), 1);
    assert_eq!(s.count(), 2);
}

#[test]
fn concurrent_duplicate_batches_make_one_row_each() {
    // Two writers may COPY the same ids at the same time.
    let s = Ingestd::new().set("server.shards", 2).set("writer.writers", 2).start();
    let evs = events("cd", 50);
    let addr = s.addr;
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let req = Req::post("/events/batch").json(&Value::Array(evs.clone()));
            std::thread::spawn(move || Conn::open(addr).roundtrip(&req))
        })
        .collect();
    for h in handles {
        let resp = h.join().unwrap();
        assert_eq!(resp.status, 200, "{resp:?}");
        assert!(ingest_answer(&resp).rejected.is_empty(), "{resp:?}");
    }
    assert_eq!(s.count(), 50);
}

#[test]
fn ack_queue_answers_202_and_the_row_arrives() {
    let s = Ingestd::new().set("ingest.ack", "queue").start();
    let resp = s.post_event(&event("q-1"));
    assert_ingest(&resp, 202, 1, &[]);
    let resp = s.post_batch(&events("qb", 20));
    assert_ingest(&resp, 202, 20, &[]);
    eventually(Duration::from_secs(15), "queued events to be committed", || (s.count() == 21).then_some(()));
    assert!(s.row("q-1").is_some());
}

#[test]
fn payload_may_be_any_json_value() {
    let s = Server::start();
    let payloads = [
        json!(42),
        json!(-1.25),
        json!("just a string"),
        json!(true),
        json!([1, "a", null, {"b": [2]}]),
        json!({"deep": {"x": [1, 2, {"y": "z"}]}, "empty": {}, "list": []}),
        json!({"unicode": "日本語 ✓ ünï", "escapes": "q\" b\\ n\n t\t / \u{1}"}),
    ];
    let batch: Vec<Value> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"event_id": format!("pl-{i}"), "device_id": "d", "type": "t", "ts": now_ms(), "payload": p}))
        .collect();
    assert_ingest(&s.post_batch(&batch), 200, payloads.len() as u64, &[]);
    for (i, p) in payloads.iter().enumerate() {
        let row = s.row(&format!("pl-{i}")).unwrap();
        assert_eq!(row.payload.as_ref(), Some(p), "payload {i}");
    }
}
