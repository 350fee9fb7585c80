//! `ingestd dead-letter list|replay|purge` (issue 13): events a CHECK
//! constraint refused are listed, counted by the `ingestd_dead_letters_waiting`
//! gauge, replayed once the constraint is gone (idempotent, already-stored
//! ids counted and not doubled, the latest state upserted by its rules), and
//! purged only when asked explicitly.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// A SPEC table with two CHECK constraints an operator added: payloads
/// with `v` = `bad` or `worse` are refused.
fn table_with_checks() -> String {
    let table = unique("t");
    let mut db = db_connect(&database_url());
    db.batch_execute(&format!(
        "CREATE TABLE {table} (
           event_id text PRIMARY KEY,
           device_id text NOT NULL,
           event_type text NOT NULL,
           ts timestamptz NOT NULL,
           received_at timestamptz NOT NULL DEFAULT now(),
           payload jsonb,
           CONSTRAINT no_bad CHECK (payload->>'v' IS DISTINCT FROM 'bad'),
           CONSTRAINT no_worse CHECK (payload->>'v' IS DISTINCT FROM 'worse'))"
    ))
    .expect("create table");
    table
}

fn ev(id: &str, device: &str, ts_ms: i64, v: &str) -> Value {
    json!({"event_id": id, "device_id": device, "type": "t", "ts": ts_ms, "payload": {"v": v, "id": id}})
}

/// `ingestd --database-url … --set database.table=TABLE [state on] dead-letter ARGS`.
fn dead_letter(table: &str, args: &[&str]) -> CliOutput {
    let url = database_url();
    let table_key = format!("database.table={table}");
    let mut all = vec!["--database-url", url.as_str(), "--set", table_key.as_str(), "--set", "state.enabled=true"];
    all.push("dead-letter");
    all.extend_from_slice(args);
    run_cli(&all, &[], Duration::from_secs(60))
}

fn waiting(db: &mut postgres::Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table}_dead_letter"), &[]).unwrap().get(0)
}

fn json_out(out: &CliOutput) -> Value {
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

/// The gauge as scraped, once present.
fn gauge(s: &Server) -> Option<f64> {
    let scrape = s.scrape();
    scrape.series("ingestd_dead_letters_waiting").next().map(|x| x.value)
}

#[test]
fn refused_events_are_listed_counted_and_replayed_once_the_constraint_is_gone() {
    let table = table_with_checks();
    let mut s = Ingestd::new()
        .table(&table)
        .set("state.enabled", "true")
        .set("database.probe_interval_ms", 100)
        .set("database.dead_letter_count_interval_ms", 200)
        .start();
    s.set_owns_table(true);
    let now = now_ms();
    let id = |name: &str| unique(name);
    let (late, newer, only, good1, good2) = (id("late"), id("newer"), id("only"), id("g1"), id("g2"));
    let (worse1, worse2, bad_present) = (id("w1"), id("w2"), id("present"));
    let batch = vec![
        // dev-a: a good event now; a refused one 10 s older (a late arrival).
        ev(&good1, "dev-a", now, "ok"),
        ev(&late, "dev-a", now - 10_000, "bad"),
        // dev-b: a good event 10 s ago; a refused newer one.
        ev(&good2, "dev-b", now - 10_000, "ok"),
        ev(&newer, "dev-b", now, "bad"),
        // dev-c: only refused events.
        ev(&only, "dev-c", now - 5_000, "bad"),
        ev(&worse1, "dev-c", now - 4_000, "worse"),
        ev(&worse2, "dev-c", now - 3_000, "worse"),
        ev(&bad_present, "dev-d", now, "bad"),
    ];
    let answer = assert_ingest(&s.post_batch(&batch), 200, 2, &[1, 3, 4, 5, 6, 7]);
    assert_eq!(answer.accepted, 2);
    let mut db = s.db();
    assert_eq!(waiting(&mut db, &table), 6);

    // list: the count, every letter, the reasons grouped.
    let out = dead_letter(&table, &["list"]);
    println!("dead-letter list:\n{}", out.stdout);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("6 dead letters waiting"), "{}", out.stdout);
    for i in [&late, &newer, &only, &worse1, &worse2, &bad_present] {
        assert!(out.stdout.contains(i.as_str()), "{i} not listed:\n{}", out.stdout);
    }
    assert!(out.stdout.contains("\"no_bad\"") && out.stdout.contains("\"no_worse\""), "{}", out.stdout);
    let listed = json_out(&dead_letter(&table, &["list", "--json", "--limit", "2"]));
    assert_eq!((listed["total"].as_i64(), listed["shown"].as_i64()), (Some(6), Some(2)), "{listed}");
    let reasons = listed["by_reason"].as_array().unwrap();
    assert_eq!(reasons.iter().map(|r| r["count"].as_i64().unwrap()).sum::<i64>(), 6, "{listed}");

    // The gauge counts them.
    eventually(Duration::from_secs(10), "ingestd_dead_letters_waiting = 6", || (gauge(&s)? == 6.0).then_some(()));
    let stats: Value = s.get("/stats").json();
    assert_eq!(stats["dead_letters_waiting"], 6, "{stats}");

    // Replay while both constraints hold: nothing stored, nothing lost, 65.
    let out = dead_letter(&table, &["replay"]);
    println!("dead-letter replay (constraints in place):\n{}", out.stdout);
    assert_eq!(out.code(), Some(65), "{out:?}");
    assert!(out.stdout.contains("replayed 0") && out.stdout.contains("still failing 6"), "{}", out.stdout);
    assert!(out.stdout.contains("remaining 6"), "{}", out.stdout);
    assert!(out.stdout.contains("no_worse"), "reasons are printed: {}", out.stdout);
    assert_eq!(waiting(&mut db, &table), 6);
    assert_eq!(s.count(), 2);

    // One constraint dropped: the `worse` letters go in, the `bad` ones stay
    // (the page is split, not refused whole), with their error kept current.
    db.batch_execute(&format!("ALTER TABLE {table} DROP CONSTRAINT no_worse")).unwrap();
    let out = dead_letter(&table, &["replay", "--json"]);
    assert_eq!(out.code(), Some(65), "{out:?}");
    let r = json_out(&out);
    assert_eq!(
        (r["replayed"].as_u64(), r["already_present"].as_u64(), r["still_failing"].as_u64(), r["remaining"].as_u64()),
        (Some(2), Some(0), Some(4), Some(4)),
        "{r}"
    );
    assert_eq!(s.count_ids(&[worse1.clone(), worse2.clone()]), 2);
    let errors: Vec<String> = db
        .query(&format!("SELECT error FROM {table}_dead_letter"), &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(errors.iter().all(|e| e.contains("no_bad")), "{errors:?}");

    // A dry run changes nothing.
    db.batch_execute(&format!("ALTER TABLE {table} DROP CONSTRAINT no_bad")).unwrap();
    let out = dead_letter(&table, &["replay", "--dry-run"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("would have replayed 4"), "{}", out.stdout);
    assert_eq!(waiting(&mut db, &table), 4);
    assert_eq!(s.count(), 4);

    // One refused id got stored meanwhile (a client retried after the fix):
    // the replay counts it as present and stores nothing twice.
    db.execute(
        &format!(
            "INSERT INTO {table} (event_id, device_id, event_type, ts, payload) \
             VALUES ($1, 'dev-d', 't', now(), '{{\"v\": \"retried\"}}')"
        ),
        &[&bad_present],
    )
    .unwrap();
    let out = dead_letter(&table, &["replay", "--json"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let r = json_out(&out);
    assert_eq!(
        (r["replayed"].as_u64(), r["already_present"].as_u64(), r["still_failing"].as_u64(), r["remaining"].as_u64()),
        (Some(3), Some(1), Some(0), Some(0)),
        "{r}"
    );
    assert_eq!(waiting(&mut db, &table), 0);
    let all_ids = [&good1, &good2, &late, &newer, &only, &worse1, &worse2, &bad_present];
    for i in all_ids {
        assert_eq!(s.count_id(i), 1, "{i} stored once");
    }
    assert_eq!(s.count(), 8);
    let kept: String = db
        .query_one(&format!("SELECT payload->>'v' FROM {table} WHERE event_id = $1"), &[&bad_present])
        .unwrap()
        .get(0);
    assert_eq!(kept, "retried", "the stored row was not replaced");

    // The latest state: a late replayed event does not overwrite a newer
    // state, a newer one does, and each counts once.
    let state: Vec<(String, String, i64)> = db
        .query(&format!("SELECT device_id, event_id, events FROM {table}_state ORDER BY device_id"), &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        state[..3],
        [
            ("dev-a".to_string(), good1.clone(), 2),
            ("dev-b".to_string(), newer.clone(), 2),
            ("dev-c".to_string(), worse2.clone(), 3),
        ],
        "{state:?}"
    );

    // Idempotent: a second replay finds nothing.
    let out = dead_letter(&table, &["replay"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("replayed 0") && out.stdout.contains("examined 0"), "{}", out.stdout);
    assert_eq!(s.count(), 8);
    eventually(Duration::from_secs(10), "ingestd_dead_letters_waiting = 0", || (gauge(&s)? == 0.0).then_some(()));
}

#[test]
fn purge_needs_an_explicit_scope_and_empties_the_table() {
    let table = table_with_checks();
    let mut s = Ingestd::new().table(&table).start();
    s.set_owns_table(true);
    let ids: Vec<String> = (0..4).map(|i| unique(&format!("p{i}"))).collect();
    let batch: Vec<Value> = ids.iter().map(|i| ev(i, "dev", now_ms(), "bad")).collect();
    assert_eq!(s.post_batch(&batch).status, 400, "all refused");
    let mut db = s.db();
    assert_eq!(waiting(&mut db, &table), 4);

    for args in [&["purge"][..], &["purge", "--all"], &["purge", "--all", "--yes", "--id", "x"], &["list", "--bogus"]] {
        let out = dead_letter(&table, args);
        assert_eq!(out.code(), Some(64), "{args:?}: {out:?}");
    }
    assert!(dead_letter(&table, &["purge", "--all"]).stderr.contains("--yes"));
    assert_eq!(waiting(&mut db, &table), 4, "a refused purge deleted something");

    let out = dead_letter(&table, &["purge", "--before", "1h"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("purged 0"), "{}", out.stdout);
    let out = dead_letter(&table, &["purge", "--id", &ids[0]]);
    assert!(out.stdout.contains("purged 1") && out.stdout.contains("3 remaining"), "{out:?}");
    let out = dead_letter(&table, &["purge", "--all", "--yes", "--json"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(json_out(&out), json!({"table": format!("\"{table}_dead_letter\""), "purged": 3, "remaining": 0}));
    assert_eq!(waiting(&mut db, &table), 0);
    assert_eq!(s.count(), 0, "purge touched only dead letters");
}

#[test]
fn an_unreachable_database_is_exit_69() {
    let out = run_cli(
        &["--database-url", "postgres://nobody@127.0.0.1:1/none", "dead-letter", "list"],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(69), "{out:?}");
    assert!(out.stderr.contains("cannot connect"), "{out:?}");
}
