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
