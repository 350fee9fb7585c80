//! Literal readings of SPEC.md where docs/INTERFACE.md is silent:
//!
//! - "a COPY must never fail because of one bad event" and "no silent
//!   drops": JSON the grammar allows but PostgreSQL refuses (a lone UTF-16
//!   surrogate escape) must not fail the batch or vanish.
//! - The same rule for nesting depth: PostgreSQL's jsonb input refuses a
//!   value nested ~20000 deep ("stack depth limit exceeded" with the default
//!   `max_stack_depth`), which is only 40 KB, under the default
//!   `max_payload_bytes`: validation must reject it per event.
//! - "A request with some bad events still stores the good ones": in NDJSON
//!   each line is an event, so one malformed line is a bad event, not a bad
//!   request.
//! - "Nothing acknowledged is lost ... not when ingestd is killed with
//!   SIGKILL", "table created at start-up if missing" and "retries never make
//!   duplicate rows": a restart on the same table keeps every row, and
//!   re-sending the same events after the restart (when any in-memory dedup
//!   state is gone) still makes no duplicates and is answered 200.

use crate::support::*;

#[test]
fn lone_surrogate_escape_never_fails_the_batch_nor_vanishes() {
    let s = Server::start();
    let good = |id: &str| serde_json::to_string(&event(id)).unwrap();
    let now = now_ms();
    let body = format!(
        "[{},{{\"event_id\":\"ls-1\",\"device_id\":\"d\",\"type\":\"t\",\"ts\":{now},\"payload\":{{\"s\":\"\\ud800\"}}}},{},\
         {{\"event_id\":\"ls-3\",\"device_id\":\"\\udc00\",\"type\":\"t\",\"ts\":{now}}},{}]",
        good("ls-0"),
        good("ls-2"),
        good("ls-4"),
    );
    let resp = s.send(&Req::post("/events/batch").header("Content-Type", "application/json").body(body.clone()));
    eprintln!("request body: {body}\nanswer:\n{resp:?}");
    match resp.status {
        // Treated as malformed JSON: the client is told, nothing is stored.
        400 => {
            assert!(resp.json().get("error").is_some() || resp.json().get("rejected").is_some(), "{resp:?}");
            let answer = resp.json();
            if answer.get("accepted").is_some() {
                assert_eq!(ingest_answer(&resp).accepted, 0, "{resp:?}");
            }
            assert_eq!(s.count(), 0, "400 but rows were stored");
        }
        // Per-event: what is accepted is stored, the rest is listed.
        200 => {
            let answer = ingest_answer(&resp);
            assert_eq!(answer.accepted as usize + answer.rejected.len(), 5, "{resp:?}");
            assert_eq!(s.count() as usize, answer.accepted as usize, "accepted events missing from PostgreSQL");
            for id in ["ls-0", "ls-2", "ls-4"] {
                assert_eq!(s.count_id(id), 1, "good event {id} not stored");
            }
        }
        _ => panic!("want 200 (per-event) or 400 (malformed), got:\n{resp:?}"),
    }
    // The server is still healthy and writing.
    assert_ingest(&s.post_event(&event("ls-after")), 200, 1, &[]);
}

#[test]
fn payload_nested_too_deep_for_postgres_is_rejected_per_event() {
    let s = Server::start(); // default max_payload_bytes = 65536
    let depth = 20_000;
    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert!(deep.len() < 65_536);
    let good = |id: &str| serde_json::to_string(&event(id)).unwrap();
    let body = format!(
        "[{},{{\"event_id\":\"deep\",\"device_id\":\"d\",\"type\":\"t\",\"ts\":{},\"payload\":{deep}}},{}]",
        good("dp-0"),
        now_ms(),
        good("dp-2"),
    );
    let resp = s.send(&Req::post("/events/batch").header("Content-Type", "application/json").body(body));
    assert_ingest(&resp, 200, 2, &[1]);
    assert_eq!(s.count(), 2);
    assert_eq!(s.count_id("deep"), 0);

    // Moderate nesting is an ordinary payload.
    let ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let body = format!(
        "{{\"event_id\":\"nest-100\",\"device_id\":\"d\",\"type\":\"t\",\"ts\":{},\"payload\":{ok}}}",
        now_ms()
    );
    let resp = s.send(&Req::post("/events").header("Content-Type", "application/json").body(body));
    assert_ingest(&resp, 200, 1, &[]);
}

#[test]
fn ndjson_malformed_line_is_one_rejected_event() {
    let s = Server::start();
    let line = |id: &str| serde_json::to_string(&event(id)).unwrap();
    let body = format!("{}\n{{\"device_id\": \"d\", oops\n{}\n{}\n", line("nd-0"), line("nd-2"), line("nd-3"));
    let resp = s.post_ndjson(&body);
    assert_ingest(&resp, 200, 3, &[1]);
    assert_eq!(s.count(), 3);
    assert_eq!(s.count_ids(&["nd-0".into(), "nd-2".into(), "nd-3".into()]), 3);
}

#[test]
fn restart_after_sigkill_keeps_rows_and_retries_make_no_duplicates() {
    let mut first = Server::start();
    first.set_owns_table(false); // the second server takes it over
    let table = first.table.clone();
    let evs = events("rs", 50);
    assert_ingest(&first.post_batch(&evs), 200, 50, &[]);
    first.signal("KILL");
    drop(first); // reaps it

    let mut second = Ingestd::new().table(&table).set("writer.writers", 2).start();
    second.set_owns_table(true);
    assert_eq!(second.count(), 50, "acknowledged rows lost across SIGKILL + restart");

    // Re-send everything (a client retrying after the crash), plus new ones,
    // in one batch and one by one.
    let mut batch = evs.clone();
    batch.extend(events("rs-new", 10));
    let resp = second.post_batch(&batch);
    assert_eq!(resp.status, 200, "{resp:?}");
    let answer = ingest_answer(&resp);
    assert_eq!(answer.accepted as usize + answer.rejected.len(), 60, "{resp:?}");
    let resp = second.post_event(&evs[7]);
    assert_eq!(resp.status, 200, "single retry after restart:\n{resp:?}");
    assert_eq!(second.count(), 60, "duplicates or losses after retries");
    assert_eq!(second.count_ids(&ids_of(&batch)), 60);
    let ids: Vec<String> = second.rows().into_iter().map(|r| r.event_id).collect();
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
}
