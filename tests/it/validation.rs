//! Per-event validation (SPEC "Event"): required fields and their types,
//! byte-length limits (bytes, not characters), the `event_id` alphabet,
//! unknown top-level fields (rejected by default, allowed by config), `ts`
//! range and format, `max_payload_bytes`, and values PostgreSQL would refuse
//! (NUL in text or jsonb) — each rejected with a reason, per event, while the
//! rest of the batch commits.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::support::*;

/// One validation case: a label, the event, and whether it must be accepted.
struct Case {
    label: &'static str,
    event: Value,
    ok: bool,
}

fn base(id: &str) -> Value {
    json!({"event_id": id, "device_id": "dev", "type": "t", "ts": now_ms(), "payload": {"k": 1}})
}

/// A valid event with one field changed (`Value::Null` as `with` removes it).
fn with(id: &str, field: &str, value: Value) -> Value {
    let mut e = base(id);
    if value.is_null() {
        e.as_object_mut().unwrap().remove(field);
    } else {
        e[field] = value;
    }
    e
}

/// Posts every case in one batch and checks exactly the bad ones are
/// rejected (each with a reason) and exactly the good ones are stored.
fn check_cases(s: &Server, cases: &[Case]) {
    let batch: Vec<Value> = cases.iter().map(|c| c.event.clone()).collect();
    let resp = s.post_batch(&batch);
    assert_eq!(resp.status, 200, "{resp:?}");
    let answer = ingest_answer(&resp);
    let got = answer.rejected_indexes();
    let mut problems = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        match (c.ok, got.contains(&i)) {
            (true, true) => {
                let why = answer.rejected.iter().find(|(j, _)| *j == i).map(|(_, e)| e.as_str()).unwrap_or("");
                problems.push(format!("[{i}] {}: wrongly rejected ({why})", c.label))
            }
            (false, false) => problems.push(format!("[{i}] {}: wrongly accepted: {}", c.label, c.event)),
            _ => {}
        }
    }
    assert!(problems.is_empty(), "validation mismatches:\n{}\n\nfull answer:\n{resp:?}", problems.join("\n"));
    let good = cases.iter().filter(|c| c.ok).count();
    assert_eq!(answer.accepted as usize, good, "{resp:?}");
    assert_eq!(answer.rejected.len(), cases.len() - good, "one entry per rejected event:\n{resp:?}");
    assert_eq!(s.count() as usize, good, "stored rows");
    for c in cases.iter().filter(|c| c.ok) {
        if let Some(id) = c.event.get("event_id").and_then(Value::as_str) {
            assert_eq!(s.count_id(id), 1, "{}: accepted but not stored", c.label);
        }
    }
}

#[test]
fn fields_types_and_lengths() {
    let s = Ingestd::new().set("ingest.max_payload_bytes", 100).start();
    let allowed_id: String = "Az09._:-".repeat(16); // exactly 128 bytes
    let c = |label, event, ok| Case { label, event, ok };
    let cases = vec![
        c("good first", base("v-good-0"), true),
        c("missing device_id", with("v-1", "device_id", Value::Null), false),
        c("missing type", with("v-2", "type", Value::Null), false),
        c("missing ts", with("v-3", "ts", Value::Null), false),
        c("device_id is a number", with("v-4", "device_id", json!(42)), false),
        c("device_id is an object", with("v-5", "device_id", json!({"id": "x"})), false),
        c("type is an array", with("v-6", "type", json!(["t"])), false),
        c("ts is a bool", with("v-7", "ts", json!(true)), false),
        c("ts is an object", with("v-8", "ts", json!({"ms": 1})), false),
        c("empty device_id", with("v-9", "device_id", json!("")), false),
        c("empty type", with("v-10", "type", json!("")), false),
        c("device_id 128 bytes", with("v-11", "device_id", json!("d".repeat(128))), true),
        c("device_id 129 bytes", with("v-12", "device_id", json!("d".repeat(129))), false),
        c("device_id 64 x 'é' = 128 bytes", with("v-13", "device_id", json!("é".repeat(64))), true),
        c("device_id 65 x 'é' = 130 bytes, 65 chars", with("v-14", "device_id", json!("é".repeat(65))), false),
        c("type 64 bytes", with("v-15", "type", json!("t".repeat(64))), true),
        c("type 65 bytes", with("v-16", "type", json!("t".repeat(65))), false),
        c("type 33 x 'é' = 66 bytes", with("v-17", "type", json!("é".repeat(33))), false),
        c("event_id 128 bytes of the allowed alphabet", base(&allowed_id), true),
        c("event_id 129 bytes", base(&"e".repeat(129)), false),
        c("event_id with a space", base("has space"), false),
        c("event_id with a slash", base("a/b"), false),
        c("event_id with a non-ASCII letter", base("caf\u{e9}"), false),
        c("event_id with a NUL", base("nul\u{0}id"), false),
        c("empty event_id", base(""), false),
        c("event_id is a number", with("v-unused", "event_id", json!(12345)), false),
        c("unknown top-level field", with("v-18", "extra", json!(1)), false),
        c("device_id with a NUL", with("v-19", "device_id", json!("dev\u{0}x")), false),
        c("type with a NUL", with("v-20", "type", json!("t\u{0}")), false),
        c("payload string with a NUL", with("v-21", "payload", json!({"s": "a\u{0}b"})), false),
        c("payload key with a NUL", with("v-22", "payload", json!({"k\u{0}": 1})), false),
        c("payload nested NUL", with("v-23", "payload", json!(["x", {"deep": ["\u{0}"]}])), false),
        c("payload over max_payload_bytes (100)", with("v-24", "payload", json!({"s": "x".repeat(200)})), false),
        c("payload well under max_payload_bytes", with("v-25", "payload", json!({"s": "x".repeat(40)})), true),
        c("payload absent", with("v-26", "payload", Value::Null), true),
        c("event is a number", json!(5), false),
        c("event is a string", json!("event"), false),
        c("event is null", Value::Null, false),
        c("event is an array", json!([base("v-27")]), false),
        c("good last", base("v-good-1"), true),
    ];
    check_cases(&s, &cases);
}

#[test]
fn ts_range_and_format() {
    let s = Ingestd::new().set("ingest.max_future_skew_ms", 60_000).start();
    let now = now_ms();
    let c = |label, ts: Value, ok| Case { label, event: json!({"device_id": "d", "type": "t", "ts": ts}), ok };
    let mut cases = vec![
        c("now (ms)", json!(now), true),
        c("now (rfc3339)", json!(rfc3339_ms(now)), true),
        c("10 s ahead, skew 60 s (ms)", json!(now + 10_000), true),
        c("just before 2000-01-01 (rfc3339)", json!("1999-12-31T23:59:59Z"), false),
        c("just before 2000-01-01 (ms)", json!(946_684_799_999_i64), false),
        c("2000-01-01 in +01:00 = 1999 UTC", json!("2000-01-01T00:30:00+01:00"), false),
        c("epoch 0", json!(0), false),
        c("negative ms", json!(-1), false),
        c("5 min ahead, skew 60 s (ms)", json!(now + 300_000), false),
        c("5 min ahead, skew 60 s (rfc3339)", json!(rfc3339_ms(now + 300_000)), false),
        c("year 3000", json!("3000-01-01T00:00:00Z"), false),
        c("not a time", json!("yesterday"), false),
        c("empty string", json!(""), false),
        c("month 13", json!("2024-13-01T00:00:00Z"), false),
        c("no offset", json!("2024-05-01T12:00:00"), false),
        c("date only", json!("2024-05-01"), false),
        c("ms as a string", json!(now.to_string()), false),
    ];
    // Give every case an id so stored rows can be matched back.
    for (i, case) in cases.iter_mut().enumerate() {
        case.event["event_id"] = json!(format!("ts-{i}"));
    }
    check_cases(&s, &cases);
}

#[test]
fn unknown_fields_allowed_when_configured() {
    let s = Ingestd::new().set("ingest.allow_unknown_fields", true).start();
    let mut ev = base("uf-1");
    ev["extra"] = json!({"anything": 1});
    let resp = s.post_event(&ev);
    assert_ingest(&resp, 200, 1, &[]);
    let row = s.row("uf-1").expect("stored");
    assert_eq!(row.payload, Some(json!({"k": 1})));
}

#[test]
fn nul_characters_are_rejected_per_event_and_the_rest_commits() {
    // A NUL reaching COPY would fail the whole batch: text and jsonb both
    // refuse it. SPEC: reject it per event, the rest of the request commits.
    let s = Ingestd::new().set("server.shards", 2).set("writer.writers", 2).start();
    let batch = vec![
        base("n-0"),
        with("n-1", "device_id", json!("dev\u{0}")),
        base("n-2"),
        with("n-3", "payload", json!({"s": "before\u{0}after"})),
        base("n-4"),
        with("n-5", "payload", json!({"key\u{0}": true})),
        base("n-6"),
    ];
    let resp = s.post_batch(&batch);
    assert_ingest(&resp, 200, 4, &[1, 3, 5]);
    let want: BTreeSet<String> = ["n-0", "n-2", "n-4", "n-6"].iter().map(|s| s.to_string()).collect();
    let got: BTreeSet<String> = s.rows().into_iter().map(|r| r.event_id).collect();
    assert_eq!(got, want);

    // Alone, it is a 400 with the ingest shape — never a 5xx.
    let resp = s.post_event(&with("n-7", "payload", json!("\u{0}")));
    assert_ingest(&resp, 400, 0, &[0]);

    // And the server still works afterwards.
    assert_ingest(&s.post_event(&base("n-8")), 200, 1, &[]);
    assert_eq!(s.count(), 5);
}

#[test]
fn payload_size_limit_is_per_event() {
    let s = Ingestd::new().set("ingest.max_payload_bytes", 100).start();
    let big = with("big", "payload", json!({"s": "y".repeat(500)}));
    assert_ingest(&s.post_event(&big), 400, 0, &[0]);
    let batch = vec![base("small-0"), big, base("small-1")];
    assert_ingest(&s.post_batch(&batch), 200, 2, &[1]);
    assert_eq!(s.count(), 2);
    assert_eq!(s.count_id("big"), 0);
}
