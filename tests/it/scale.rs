//! Scale-out (issue 7): several ingestd instances behind one load balancer,
//! writing the same PostgreSQL table, keep every guarantee, idempotency
//! across instances included. Idempotency lives in the table's primary key
//! on `event_id`, so it holds whichever instance a retry lands on; each
//! instance's in-memory "recently committed" set is only a hint.
//!
//! - two instances, one table: the same batches sent to both (one after the
//!   other, or racing) plus different batches to each; every acked id stored
//!   once, and both instances' committed/duplicate counters add up;
//! - instances started together on a table that does not exist yet;
//! - the same events raced to both in opposite orders (PostgreSQL deadlocks);
//! - WebSocket fan-out across instances (subscribe to each: every event once);
//! - hash- and range-partitioned tables (docs/OPERATIONS.md, section 6);
//! - a strict parse of a `/metrics` scrape taken after some load (the text
//!   format 0.0.4 rules a Prometheus server enforces), printed as a sample.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

/// Events per batch of the dual-sending client.
const BATCH: usize = 40;
/// Rounds per dual-sending client thread.
const ROUNDS: usize = 90;
/// Dual-sending client threads.
const CLIENTS: usize = 4;

/// One instance: two shards and two writers, so that cross-instance and
/// cross-writer races both happen.
fn instance() -> Ingestd {
    Ingestd::new().set("server.shards", 2).set("writer.writers", 2)
}

fn stats(s: &Server) -> Value {
    let resp = s.get("/stats");
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.json()
}

fn stat(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("/stats lacks integer {key:?}: {v}"))
}

/// How a dual-sending round orders its two copies of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// To A, and after A's 200 the same batch to B: B must find every id stored.
    AThenB,
    /// The mirror image: A must find every id stored.
    BThenA,
    /// To both at the same instant: the two COPYs race on the primary key.
    Together,
}

/// What one dual-sending client saw.
#[derive(Default)]
struct DualResult {
    /// Ids of batches both instances answered 200 for.
    acked: Vec<String>,
    /// Events in 200 answers (each batch counts twice: once per instance).
    events_in_ok_answers: u64,
    /// Events B was sent after A had committed them (and vice versa).
    dup_after_a: u64,
    dup_after_b: u64,
    /// Events sent to both at once.
    raced: u64,
}

/// Posts one batch and insists on a full 200: with `ack = "commit"` and no
/// fault injected, anything else (a 503 from a deadlock or a breaker opened
/// by cross-instance conflicts, say) is a finding, not noise.
fn post_ok(s: &Server, name: &str, evs: &[Value]) {
    let resp = s.post_batch(evs);
    assert_eq!(
        resp.status,
        200,
        "instance {name} ({}) did not answer 200 to a batch of {} events:\n{resp:?}",
        s.addr,
        evs.len()
    );
    assert_ingest(&resp, 200, evs.len() as u64, &[]);
}

#[test]
fn two_instances_share_one_table_and_stay_idempotent() {
    let a = instance().start();
    // B writes into A's table (A made it and drops it at the end).
    let b = instance().table(&a.table).start();
    assert_ne!(a.addr, b.addr);
    let before_a = stats(&a);
    let before_b = stats(&b);

    // Background: different batches to each instance, all the time.
    let load_a = Load::start(a.addr, 2, 25, 200);
    let load_b = Load::start(b.addr, 2, 25, 200);

    let started = Instant::now();
    let a = Arc::new(a);
    let b = Arc::new(b);
    let results: Vec<DualResult> = (0..CLIENTS)
        .map(|c| {
            let (a, b) = (a.clone(), b.clone());
            thread::spawn(move || {
                let prefix = unique(&format!("dual{c}"));
                let mut out = DualResult::default();
                for r in 0..ROUNDS {
                    let order = [Order::AThenB, Order::BThenA, Order::Together][r % 3];
                    let evs = events(&format!("{prefix}-{r}"), BATCH);
                    match order {
                        Order::AThenB => {
                            post_ok(&a, "A", &evs);
                            post_ok(&b, "B", &evs);
                            out.dup_after_a += BATCH as u64;
                        }
                        Order::BThenA => {
                            post_ok(&b, "B", &evs);
                            post_ok(&a, "A", &evs);
                            out.dup_after_b += BATCH as u64;
                        }
                        Order::Together => {
                            let barrier = Arc::new(Barrier::new(2));
                            let other = {
                                let (b, evs, barrier) = (b.clone(), evs.clone(), barrier.clone());
                                thread::spawn(move || {
                                    barrier.wait();
                                    post_ok(&b, "B", &evs);
                                })
                            };
                            barrier.wait();
                            post_ok(&a, "A", &evs);
                            other.join().expect("the racing request to B failed");
                            out.raced += BATCH as u64;
                        }
                    }
                    out.events_in_ok_answers += 2 * BATCH as u64;
                    out.acked.extend(ids_of(&evs));
                }
                out
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("a dual-sending client failed (see its panic above)"))
        .collect();
    let elapsed = started.elapsed();
    let bg_a = load_a.stop();
    let bg_b = load_b.stop();
    let (a, b) = (Arc::into_inner(a).expect("no other owner of A"), Arc::into_inner(b).expect("no other owner of B"));

    // The background load must have been served, not refused.
    for (name, bg) in [("A", &bg_a), ("B", &bg_b)] {
        assert!(
            !bg.acked.is_empty(),
            "background load on {name} got no 200: {:?}, {} transport errors",
            bg.statuses,
            bg.transport_errors
        );
        let not_ok: usize = bg.statuses.iter().filter(|(k, _)| **k != 200).map(|(_, v)| v).sum();
        assert_eq!(
            (not_ok, bg.transport_errors),
            (0, 0),
            "background load on {name}: statuses {:?}, transport errors {}",
            bg.statuses,
            bg.transport_errors
        );
    }

    let dual_acked: Vec<String> = results.iter().flat_map(|r| r.acked.iter().cloned()).collect();
    let dual_events_ok: u64 = results.iter().map(|r| r.events_in_ok_answers).sum();
    let dup_after_a: u64 = results.iter().map(|r| r.dup_after_a).sum();
    let dup_after_b: u64 = results.iter().map(|r| r.dup_after_b).sum();
    let raced: u64 = results.iter().map(|r| r.raced).sum();
    let bg_events_ok = (bg_a.acked.len() + bg_b.acked.len()) as u64;

    let mut all_acked: Vec<String> = dual_acked.clone();
    all_acked.extend(bg_a.acked.iter().cloned());
    all_acked.extend(bg_b.acked.iter().cloned());
    let distinct: BTreeSet<&String> = all_acked.iter().collect();
    assert_eq!(distinct.len() as u64, dual_acked.len() as u64 + bg_events_ok, "the test's own ids collide");

    // 1. Every acknowledged id is stored, exactly once, and nothing else is.
    let mut db = a.db();
    let present = count_ids(&mut db, &a.table, &all_acked);
    let row = db
        .query_one(format!("SELECT count(*), count(DISTINCT event_id) FROM {}", a.table).as_str(), &[])
        .expect("count rows");
    let (rows, distinct_rows): (i64, i64) = (row.get(0), row.get(1));
    eprintln!(
        "scale-out: {} dual-sent ids ({} events in 200 answers: {dup_after_a} sent to B after A \
         committed them, {dup_after_b} to A after B, {raced} raced), {} background ids on A, {} on B, \
         in {elapsed:?}; rows in the shared table {rows}, acked ids present {present} of {}",
        dual_acked.len(),
        dual_events_ok,
        bg_a.acked.len(),
        bg_b.acked.len(),
        distinct.len(),
    );
    assert_eq!(present, distinct.len() as i64, "acked ids missing from the shared table");
    assert_eq!(rows, distinct_rows, "duplicate event_id rows in the shared table");
    assert_eq!(
        rows,
        distinct.len() as i64,
        "the shared table holds rows nobody was told were stored (or lacks acked ones)"
    );

    // 2. Both instances count what they did, and the counts add up: every
    //    stored row was inserted by exactly one of them, and every other
    //    event in a 200 answer was reported as a duplicate by the one that
    //    answered it.
    let after_a = stats(&a);
    let after_b = stats(&b);
    let delta = |after: &Value, before: &Value, key: &str| stat(after, key) - stat(before, key);
    let committed_a = delta(&after_a, &before_a, "events_committed");
    let committed_b = delta(&after_b, &before_b, "events_committed");
    let dup_a = delta(&after_a, &before_a, "events_duplicate");
    let dup_b = delta(&after_b, &before_b, "events_duplicate");
    eprintln!(
        "A: committed {committed_a}, duplicate {dup_a}, staging fallbacks {}, dedup suspects {}, failed transactions {}\n\
         B: committed {committed_b}, duplicate {dup_b}, staging fallbacks {}, dedup suspects {}, failed transactions {}",
        stat(&after_a, "staging_fallbacks"),
        stat(&after_a, "dedup_suspects"),
        stat(&after_a, "batch_failures"),
        stat(&after_b, "staging_fallbacks"),
        stat(&after_b, "dedup_suspects"),
        stat(&after_b, "batch_failures"),
    );
    assert!(
        dup_b >= dup_after_a,
        "B re-received {dup_after_a} events A had already committed but reports only {dup_b} duplicates"
    );
    assert!(
        dup_a >= dup_after_b,
        "A re-received {dup_after_b} events B had already committed but reports only {dup_a} duplicates"
    );
    assert_eq!(
        committed_a + committed_b,
        rows as u64,
        "events_committed of A ({committed_a}) + B ({committed_b}) != rows stored"
    );
    assert_eq!(
        dup_a + dup_b,
        dual_events_ok + bg_events_ok - rows as u64,
        "events_duplicate of A ({dup_a}) + B ({dup_b}) != events answered 200 ({}) - rows stored ({rows})",
        dual_events_ok + bg_events_ok
    );
    for (name, s) in [("A", &after_a), ("B", &after_b)] {
        assert_eq!(stat(s, "events_lost"), 0, "{name}: {s}");
        assert_eq!(stat(s, "events_dead_lettered"), 0, "{name}: {s}");
    }
}

/// Instances started at the same moment on a table that does not exist yet
/// (a fleet brought up together by its orchestrator) all create-or-find it
/// and become ready.
#[test]
fn instances_started_together_on_a_new_table_all_get_ready() {
    const N: usize = 3;
    let table = unique("t_fleet");
    let barrier = Arc::new(Barrier::new(N));
    let servers: Vec<Server> = (0..N)
        .map(|_| {
            let (table, barrier) = (table.clone(), barrier.clone());
            thread::spawn(move || {
                let builder = instance().set("writer.writers", 1).table(&table);
                barrier.wait();
                builder.start()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|_| {
            let _ = db_connect(&database_url())
                .batch_execute(&format!("DROP TABLE IF EXISTS {table}, {table}_dead_letter"));
            panic!("an instance started together with others on a new table did not get ready (see above)")
        });
    let mut ids = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let evs = events(&format!("{table}-{i}"), 5);
        assert_ingest(&s.post_batch(&evs), 200, 5, &[]);
        ids.extend(ids_of(&evs));
    }
    assert_eq!(servers[0].count_ids(&ids), ids.len() as i64);
    drop(servers);
    db_connect(&database_url())
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}, {table}_dead_letter"))
        .expect("drop the shared table");
}

// ---------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------

#[test]
fn metrics_scrape_parses_strictly_after_load() {
    let s = instance().start();
    // Load: good batches, a batch with bad events, re-sent duplicates, an
    // unknown route, and a few requests in parallel.
    let load = Load::start(s.addr, 2, 50, 200);
    let mut bad = events(&unique("mix"), 10);
    bad[3]["ts"] = json!("yesterday");
    bad[7]["device_id"] = json!("");
    let resp = s.post_batch(&bad);
    assert_ingest(&resp, 200, 8, &[3, 7]);
    let again = events(&unique("again"), 20);
    assert_ingest(&s.post_batch(&again), 200, 20, &[]);
    assert_ingest(&s.post_batch(&again), 200, 20, &[]);
    assert_eq!(s.get("/nope").status, 404);
    load.wait_for(200, 2, Duration::from_secs(10));
    let bg = load.stop();
    assert!(!bg.acked.is_empty(), "background load: {:?}", bg.statuses);

    let scrape = s.scrape();
    let Scrape { text, samples, types } = &scrape;

    // The families the dashboard and docs/OPERATIONS.md rely on.
    for (family, kind) in [
        ("ingestd_up", "gauge"),
        ("ingestd_database_up", "gauge"),
        ("ingestd_breaker_state", "gauge"),
        ("ingestd_events_accepted_total", "counter"),
        ("ingestd_events_committed_total", "counter"),
        ("ingestd_events_rejected_total", "counter"),
        ("ingestd_events_duplicate_total", "counter"),
        ("ingestd_events_dead_lettered_total", "counter"),
        ("ingestd_overload_rejections_total", "counter"),
        ("ingestd_ring_depth", "gauge"),
        ("ingestd_ring_capacity", "gauge"),
        ("ingestd_ack_latency_seconds", "histogram"),
        ("ingestd_commit_duration_seconds", "histogram"),
        ("ingestd_batch_events", "histogram"),
        ("ingestd_ws_fanout_latency_seconds", "histogram"),
        ("ingestd_shard_loop_lag_seconds", "histogram"),
        ("ingestd_connections_open", "gauge"),
        ("ingestd_ws_subscribers", "gauge"),
        ("ingestd_ws_slow_closes_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
    ] {
        assert_eq!(
            types.get(family).map(String::as_str),
            Some(kind),
            "family {family} missing or not a {kind}\n--- scrape ---\n{text}"
        );
    }

    // The numbers agree with what was sent.
    let acked = (bg.acked.len() + 8 + 20 + 20) as f64;
    let accepted = scrape.sum("ingestd_events_accepted_total", None);
    let committed = scrape.sum("ingestd_events_committed_total", None);
    let duplicate = scrape.sum("ingestd_events_duplicate_total", None);
    assert_eq!(accepted, acked, "accepted_total vs events answered 200");
    assert_eq!(committed + duplicate, acked, "committed + duplicate vs events answered 200");
    assert_eq!(duplicate, 20.0, "the re-sent batch of 20");
    assert_eq!(committed as i64, s.count(), "committed_total vs rows stored");
    assert_eq!(scrape.sum("ingestd_events_rejected_total", None), 2.0, "two events were rejected");
    assert_eq!(
        scrape.sum("ingestd_events_rejected_total", Some(("reason", "ts_out_of_range")))
            + scrape.sum("ingestd_events_rejected_total", Some(("reason", "invalid_value"))),
        2.0
    );
    assert_eq!(scrape.sum("ingestd_up", None), 1.0);
    assert_eq!(scrape.sum("ingestd_database_up", None), 1.0);
    let acks = scrape.sum("ingestd_ack_latency_seconds_count", None);
    assert!(acks >= 4.0, "ack latency count {acks}");
    // Every request acknowledged within 30 s: all in a finite bucket.
    let within_30s = scrape.sum("ingestd_ack_latency_seconds_bucket", Some(("le", "30")));
    assert_eq!(within_30s, acks, "ack latency buckets {:?}", scrape.buckets("ingestd_ack_latency_seconds"));
    assert!(scrape.sum("process_resident_memory_bytes", None) > 1e6);
    assert!(scrape.sum("process_open_fds", None) >= 3.0);

    // A sample of the scrape for docs/OPERATIONS.md: every HELP/TYPE pair,
    // non-zero samples, and summaries whole.
    let mut shown = String::new();
    for line in text.lines() {
        let zero = line.ends_with(" 0") && !line.starts_with('#');
        if !zero {
            shown.push_str(line);
            shown.push('\n');
        }
    }
    eprintln!(
        "/metrics after {} acked events ({} samples, {} families; zero-valued samples left out):\n{shown}",
        acked,
        samples.len(),
        types.len()
    );
}

#[test]
fn scrape_parser_rejects_what_prometheus_rejects() {
    // Guards the suite's parser (support::parse_scrape) both ways: a valid
    // exposition with the format's corner cases is read whole ...
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"a,}b\\\"c\"} 3 1700000000000\n\
                # any other comment\n\n\
                # HELP l_seconds L.\n# TYPE l_seconds summary\nl_seconds{quantile=\"0.5\"} 0.25\nl_seconds_sum 1.5e0\nl_seconds_count 4\n\
                # HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"0.1\"} 1\nh_seconds_bucket{le=\"1\"} 3\n\
                h_seconds_bucket{le=\"+Inf\"} 3\nh_seconds_sum 1.2\nh_seconds_count 3\n\
                h_seconds_bucket{x=\"b\",le=\"1\"} 0\nh_seconds_bucket{x=\"b\",le=\"+Inf\"} 0\nh_seconds_count{x=\"b\"} 0\n\
                # HELP g G.\n# TYPE g gauge\ng NaN\ng{k=\"v\"} -Inf\ng{k=\"w\",l=\"x\\ny\\\\\"} +1\n";
    let Scrape { samples, types, .. } = parse_scrape(good);
    assert_eq!(samples.len(), 15);
    assert_eq!(samples[0].labels["y"], "a,}b\"c");
    assert_eq!(samples[0].value, 3.0);
    assert_eq!(types["l_seconds"], "summary");
    assert_eq!(samples[2].name, "l_seconds_sum");
    assert_eq!(types["h_seconds"], "histogram");
    assert_eq!(samples[14].labels["l"], "x\ny\\");

    // ... and each of these is rejected, at the line and for the reason
    // given (a case rejected for some other reason would prove nothing).
    // Each is well formed but for that one defect.
    const HG: &str = "# HELP a A.\n# TYPE a gauge\n"; // a valid head for family `a`
    const HH: &str = "# HELP h H.\n# TYPE h histogram\n"; // and for histogram `h`
    let cases: Vec<(&str, String, usize, &str)> = vec![
        // HELP and TYPE: missing, late, for another name, unknown, twice.
        ("no HELP or TYPE", "a_total 1\n".into(), 1, "sample without a TYPE line before it"),
        ("HELP but no TYPE", "# HELP a_total A.\na_total 1\n".into(), 2, "sample without a TYPE line before it"),
        ("TYPE but no HELP", "# TYPE a gauge\na 1\n".into(), 2, "sample without a HELP line before it"),
        (
            "a sample before its TYPE",
            "# HELP a A.\na 1\n# TYPE a gauge\n".into(),
            2,
            "sample without a TYPE line before it",
        ),
        ("HELP and TYPE for another name", format!("{HG}b 1\n"), 3, "sample without a TYPE line before it"),
        (
            "TYPE for another name than HELP",
            "# HELP a A.\n# TYPE b gauge\nb 1\n".into(),
            3,
            "sample without a HELP line before it",
        ),
        (
            "HELP for another name than TYPE",
            "# HELP b B.\n# TYPE a gauge\na 1\n".into(),
            3,
            "sample without a HELP line before it",
        ),
        ("unknown type", "# HELP a A.\n# TYPE a gauges\na 1\n".into(), 2, "unknown metric type"),
        ("TYPE without a type", "# HELP a A.\n# TYPE a\na 1\n".into(), 2, "TYPE without a type"),
        ("empty HELP text", "# HELP a\n# TYPE a gauge\na 1\n".into(), 1, "empty HELP text"),
        ("second TYPE", format!("{HG}# TYPE a counter\na 1\n"), 3, "second TYPE for this family"),
        ("second HELP", "# HELP a A.\n# HELP a B.\n# TYPE a gauge\na 1\n".into(), 2, "second HELP for this family"),
        // Families not grouped.
        (
            "a family's sample after another family",
            format!("{HG}a 1\n# HELP b B.\n# TYPE b gauge\nb 1\na{{x=\"1\"}} 2\n"),
            7,
            "lines of this metric family are not grouped together",
        ),
        (
            "a family's HELP after another family",
            format!("{HG}a 1\n# HELP b B.\n# TYPE b gauge\nb 1\n# HELP a A.\n"),
            7,
            "lines of this metric family are not grouped together",
        ),
        // Names.
        (
            "a metric name starting with a digit",
            "# HELP 1a A.\n# TYPE 1a gauge\n1a 1\n".into(),
            1,
            "bad metric name in HELP",
        ),
        (
            "a dash in a sample's name",
            format!("{HG}a-b 1\n"),
            3,
            "metric name does not match ^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        ),
        // Label syntax.
        ("a label name starting with a digit", format!("{HG}a{{1x=\"v\"}} 1\n"), 3, "bad label name"),
        ("an unquoted label value", format!("{HG}a{{x=v}} 1\n"), 3, "label value not quoted"),
        ("a label without =", format!("{HG}a{{x}} 1\n"), 3, "label without ="),
        ("no closing brace before the value", format!("{HG}a{{x=\"1\" 1\n"), 3, "expected , or } after a label"),
        ("no closing brace at the end of the line", format!("{HG}a{{x=\"1\"\n"), 3, "unclosed label set"),
        ("an unterminated label value", format!("{HG}a{{x=\"1}} 1\n"), 3, "unterminated label value"),
        ("a bad escape in a label value", format!("{HG}a{{x=\"\\t\"}} 1\n"), 3, "bad escape in label value"),
        ("a label twice", format!("{HG}a{{x=\"1\",x=\"2\"}} 1\n"), 3, "label repeated"),
        // Values and timestamps.
        ("a word as the value", format!("{HG}a one\n"), 3, "value is not a float"),
        ("a decimal comma", format!("{HG}a 1,5\n"), 3, "value is not a float"),
        ("no value", format!("{HG}a\n"), 3, "no value"),
        ("no value after labels", format!("{HG}a{{x=\"1\"}}\n"), 3, "no space before the value"),
        ("a fractional timestamp", format!("{HG}a 1 1.5\n"), 3, "timestamp is not an integer"),
        ("trailing fields", format!("{HG}a 1 2 3\n"), 3, "trailing fields"),
        // Duplicate series.
        ("a series twice", format!("{HG}a 1\na 2\n"), 4, "series repeated"),
        (
            "a series twice, labels reordered",
            format!("{HG}a{{x=\"1\",y=\"2\"}} 1\na{{y=\"2\",x=\"1\"}} 2\n"),
            4,
            "series repeated",
        ),
        // Counters and summaries.
        (
            "a counter without _total",
            "# HELP c C.\n# TYPE c counter\nc 1\n".into(),
            3,
            "counter name does not end in _total",
        ),
        (
            "a negative counter",
            "# HELP c_total C.\n# TYPE c_total counter\nc_total -1\n".into(),
            3,
            "negative or NaN counter",
        ),
        (
            "a summary sample without quantile",
            "# HELP s S.\n# TYPE s summary\ns 1\n".into(),
            3,
            "summary sample without a quantile label",
        ),
        (
            "a quantile on _sum",
            "# HELP s S.\n# TYPE s summary\ns_sum{quantile=\"0.5\"} 1\n".into(),
            3,
            "quantile label on _sum/_count",
        ),
        ("_sum of a gauge", format!("{HG}a_sum 1\n"), 3, "sample without a TYPE line before it"),
        // Histograms.
        ("a bare histogram sample", format!("{HH}h 1\n"), 3, "histogram sample without _bucket, _sum or _count"),
        ("a bucket without le", format!("{HH}h_bucket 1\n"), 3, "histogram bucket without le"),
        ("a word as le", format!("{HH}h_bucket{{le=\"one\"}} 1\n"), 3, "le is not a float"),
        ("le descending", format!("{HH}h_bucket{{le=\"1\"}} 1\nh_bucket{{le=\"0.5\"}} 1\n"), 4, "le not ascending"),
        (
            "counts not cumulative",
            format!("{HH}h_bucket{{le=\"1\"}} 2\nh_bucket{{le=\"2\"}} 1\n"),
            4,
            "histogram bucket counts not cumulative",
        ),
        (
            "a bucket after +Inf",
            format!("{HH}h_bucket{{le=\"+Inf\"}} 2\nh_bucket{{le=\"2\"}} 2\n"),
            4,
            "histogram bucket after the +Inf bucket",
        ),
        (
            "_count without +Inf",
            format!("{HH}h_bucket{{le=\"1\"}} 2\nh_count 2\n"),
            4,
            "histogram _count without a +Inf bucket before it",
        ),
        (
            "_count not the +Inf bucket",
            format!("{HH}h_bucket{{le=\"+Inf\"}} 2\nh_count 3\n"),
            4,
            "histogram _count differs from its +Inf bucket",
        ),
        (
            "a bucket after _count",
            format!("{HH}h_bucket{{le=\"+Inf\"}} 2\nh_count 2\nh_bucket{{le=\"+Inf\"}} 2\n"),
            5,
            "histogram bucket after _sum/_count",
        ),
        ("le on _sum", format!("{HH}h_sum{{le=\"1\"}} 2\n"), 3, "le label on _sum/_count"),
        (
            "no _count before the next family",
            format!("{HH}h_bucket{{le=\"+Inf\"}} 2\n{HG}"),
            4,
            "histogram series without _count",
        ),
    ];
    let mut problems = Vec::new();
    for (label, text, line, why) in &cases {
        let want = format!("/metrics line {line}: {why}: {:?}", text.lines().nth(line - 1).unwrap());
        match try_parse_scrape(text) {
            Ok(s) => problems.push(format!("{label}: accepted ({} samples):\n{text}", s.samples.len())),
            Err(e) if e != want => problems.push(format!("{label}: want {want:?}, got {e:?}")),
            Err(_) => {}
        }
        // Without its defect, the same text starts out valid: the defect is
        // on the line named, not before it.
        // (A histogram cut short before its _count is refused at the end
        // of the text for that alone.)
        const UNFINISHED: &str = "/metrics end of text: histogram series without _count";
        let before: String = text.lines().take(line - 1).map(|l| format!("{l}\n")).collect();
        match try_parse_scrape(&before) {
            Err(e) if why.starts_with("histogram series without _count") && e == UNFINISHED => {}
            _ if why.starts_with("histogram series without _count") => {
                problems.push(format!("{label}: an unfinished histogram at the end of the text is accepted"));
            }
            Err(e) if e != UNFINISHED => {
                problems.push(format!("{label}: the lines before the defect are already refused: {e}"));
            }
            _ => {}
        }
    }
    assert!(problems.is_empty(), "the scrape parser is not as strict as it claims:\n{}", problems.join("\n"));
}

/// The guarantee the scale-out relies on, stated where it lives: a table
/// created by ingestd has its primary key on `event_id`, so a second
/// instance cannot insert a row the first one already stored.
#[test]
fn created_table_has_event_id_primary_key() {
    let s = instance().start();
    let mut db = s.db();
    let row = db
        .query_one(
            "SELECT array_agg(a.attname::text ORDER BY a.attname) \
             FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
            &[&s.table],
        )
        .expect("primary key of the table");
    let cols: Option<Vec<String>> = row.get(0);
    assert_eq!(cols, Some(vec!["event_id".to_string()]));
}

/// The same events raced to both instances in opposite orders (as when a
/// load balancer retries requests on another instance and the two writers
/// batch them the other way round): each COPY waits on a key the other
/// inserted first, the textbook deadlock. PostgreSQL breaks it after
/// `deadlock_timeout` (1 s by default) by aborting one transaction. Nothing
/// may be lost or doubled whatever happens; and since neither the data nor
/// the database is at fault, the aborted side is expected to redo its batch
/// and answer 200, and the breaker (which guards against an unavailable
/// database) must not open.
#[test]
fn opposite_order_races_across_instances_resolve() {
    let a = instance().start();
    let b = instance().table(&a.table).start();
    const ROUNDS: usize = 10;
    const N: usize = 2000;
    let mut acked = Vec::new();
    let mut sent = 0u64;
    let mut slowest = Duration::ZERO;
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut refusals = Vec::new();
    for r in 0..ROUNDS {
        let evs = events(&unique(&format!("opp{r}")), N);
        let mut rev = evs.clone();
        rev.reverse();
        let barrier = Barrier::new(2);
        let answers = thread::scope(|s| {
            let ta = s.spawn(|| {
                barrier.wait();
                let t = Instant::now();
                (a.post_batch(&evs), t.elapsed())
            });
            let tb = s.spawn(|| {
                barrier.wait();
                let t = Instant::now();
                (b.post_batch(&rev), t.elapsed())
            });
            [("A", ta.join().unwrap()), ("B", tb.join().unwrap())]
        });
        for (name, (resp, took)) in &answers {
            *statuses.entry(resp.status).or_default() += 1;
            slowest = slowest.max(*took);
            match resp.status {
                200 => {
                    assert_ingest(resp, 200, N as u64, &[]);
                    sent += N as u64;
                    acked.extend(ids_of(&evs));
                }
                503 => {
                    // Allowed by the contract (the client retries), so check
                    // it is a proper one, and retry as a client would.
                    assert!(resp.header("retry-after").is_some(), "503 without Retry-After:\n{resp:?}");
                    refusals.push(format!("round {r}, {name}: {}", resp.text()));
                    let s = if *name == "A" { &a } else { &b };
                    assert_ingest(&s.post_batch(&evs), 200, N as u64, &[]);
                    sent += N as u64;
                    acked.extend(ids_of(&evs));
                }
                _ => panic!("round {r}, instance {name}: {resp:?}"),
            }
        }
    }
    let (sa, sb) = (stats(&a), stats(&b));
    let opens = stat(&sa, "breaker_opens") + stat(&sb, "breaker_opens");
    eprintln!(
        "opposite-order races: {ROUNDS} rounds of {N} events, statuses {statuses:?}, slowest answer {slowest:?}; \
         failed transactions A {} B {}, breaker opens A {} B {}\n{}",
        stat(&sa, "batch_failures"),
        stat(&sb, "batch_failures"),
        stat(&sa, "breaker_opens"),
        stat(&sb, "breaker_opens"),
        refusals.join("\n"),
    );
    // The guarantees: every acked id stored exactly once, counters add up.
    let distinct: BTreeSet<&String> = acked.iter().collect();
    assert_eq!(a.count_ids(&acked), distinct.len() as i64);
    assert_eq!(a.count(), distinct.len() as i64);
    let committed = stat(&sa, "events_committed") + stat(&sb, "events_committed");
    let duplicate = stat(&sa, "events_duplicate") + stat(&sb, "events_duplicate");
    assert_eq!(committed, distinct.len() as u64);
    assert_eq!(committed + duplicate, sent);
    // The expectations: a deadlock between two healthy instances is neither
    // a client-visible failure nor a database outage.
    assert!(
        refusals.is_empty(),
        "{} of {} requests were answered 503 because two instances deadlocked on the same \
         event_ids (PostgreSQL 40P01); ingestd should redo the aborted batch (after a short \
         randomised pause, or with rows in event_id order so that instances cannot deadlock):\n{}",
        refusals.len(),
        2 * ROUNDS,
        refusals.join("\n")
    );
    assert_eq!(opens, 0, "the breaker opened on deadlocks between instances, not an outage");
}

/// WebSocket fan-out is per instance: a subscriber sees the events its own
/// instance committed. Since a row is inserted by exactly one instance and a
/// duplicate is never pushed, a client subscribed to every instance gets
/// each event exactly once, wherever it was sent and however often
/// (docs/OPERATIONS.md, "WebSocket subscribers behind a load balancer").
#[test]
fn a_subscriber_on_every_instance_gets_each_event_exactly_once() {
    use tungstenite::Message;
    let a = instance().start();
    let b = instance().table(&a.table).start();
    let device = unique("dev");
    let subscribe = |s: &Server| {
        let stream = std::net::TcpStream::connect(s.addr).expect("tcp connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let url = format!("ws://{}/ws?device_id={device}", s.addr);
        tungstenite::client(url.as_str(), stream)
            .map(|(ws, _)| ws)
            .unwrap_or_else(|e| panic!("WebSocket upgrade on {}: {e:?}", s.addr))
    };
    let mut sub_a = subscribe(&a);
    let mut sub_b = subscribe(&b);
    // Subscriptions are registered on the shard asynchronously to the 101:
    // wait until both instances count them.
    for s in [&a, &b] {
        eventually(Duration::from_secs(10), "the subscriber to be registered", || {
            (stat(&stats(s), "ws_subscribers") >= 1).then_some(())
        });
    }
    let mut acked = BTreeSet::new();
    for r in 0..12 {
        let evs: Vec<Value> = events(&unique(&format!("fan{r}")), 20)
            .into_iter()
            .map(|mut e| {
                e["device_id"] = json!(device);
                e
            })
            .collect();
        match r % 3 {
            0 => post_ok(&a, "A", &evs),
            1 => post_ok(&b, "B", &evs),
            _ => {
                post_ok(&a, "A", &evs);
                post_ok(&b, "B", &evs);
            }
        }
        acked.extend(ids_of(&evs));
    }
    let drain = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>| {
        ws.get_mut().set_read_timeout(Some(Duration::from_millis(700))).expect("timeout");
        let mut ids = Vec::new();
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("JSON text frame");
                    let id = v["event_id"].as_str().unwrap_or_else(|| panic!("pushed frame without event_id: {v}"));
                    ids.push(id.to_string());
                }
                Ok(Message::Close(c)) => panic!("closed by server: {c:?}"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    break;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        ids
    };
    let got_a = drain(&mut sub_a);
    let got_b = drain(&mut sub_b);
    let mut all: Vec<String> = got_a.iter().chain(&got_b).cloned().collect();
    all.sort();
    let distinct: BTreeSet<String> = all.iter().cloned().collect();
    eprintln!(
        "fan-out across instances: {} events acked, subscriber on A got {}, on B {}, together {} ({} distinct)",
        acked.len(),
        got_a.len(),
        got_b.len(),
        all.len(),
        distinct.len()
    );
    assert_eq!(distinct, acked, "the union of both subscriptions is not every stored event");
    assert_eq!(all.len(), acked.len(), "an event was pushed more than once across instances");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "one instance pushed nothing (A {}, B {})",
        got_a.len(),
        got_b.len()
    );
}

/// Drops tables the test made itself, also when it fails.
struct DropTables(Vec<String>);

impl Drop for DropTables {
    fn drop(&mut self) {
        if let Ok(mut db) = std::panic::catch_unwind(|| db_connect(&database_url())) {
            let _ = db.batch_execute(&format!("DROP TABLE IF EXISTS {} CASCADE", self.0.join(", ")));
        }
    }
}

/// Sends a batch twice (the retry after a lost answer) to each of two
/// instances writing `table`, and checks it is stored once and every
/// answer is a plain 200 with nothing rejected.
fn retries_are_idempotent_on(table: &str) {
    let a = instance().table(table).start();
    let b = instance().table(table).start();
    let now = now_ms();
    let mut evs = events(&unique("part"), 30);
    // Two of them far in the past, one at the start of 2000 (the oldest ts
    // ingestd accepts), so that several partitions are written.
    evs[0]["ts"] = json!(946_684_800_000i64);
    evs[1]["ts"] = json!(now - 400 * 24 * 3_600_000);
    for (name, s) in [("A", &a), ("A again", &a), ("B", &b), ("B again", &b)] {
        let resp = s.post_batch(&evs);
        assert_eq!(resp.status, 200, "{name} on {table}:\n{resp:?}");
        assert_ingest(&resp, 200, evs.len() as u64, &[]);
    }
    let mut db = a.db();
    let ids = ids_of(&evs);
    assert_eq!(count_ids(&mut db, table, &ids), ids.len() as i64);
    let rows: i64 = db.query_one(format!("SELECT count(*) FROM {table}").as_str(), &[]).expect("count").get(0);
    assert_eq!(rows, ids.len() as i64, "{table}: duplicates stored");
    let dead: i64 = db
        .query_one(format!("SELECT count(*) FROM {table}_dead_letter").as_str(), &[])
        .expect("count dead letters")
        .get(0);
    assert_eq!(dead, 0, "{table}: retried events went to the dead-letter table");
}

/// Hash partitioning on `event_id` keeps the SPEC's primary key, so nothing
/// about idempotency changes (docs/OPERATIONS.md, "PostgreSQL partitioning").
#[test]
fn hash_partitioned_table_keeps_idempotency() {
    let t = unique("t_hash");
    let _guard = DropTables(vec![t.clone(), format!("{t}_dead_letter")]);
    let mut sql = format!(
        "CREATE TABLE {t} (event_id text PRIMARY KEY, device_id text NOT NULL, event_type text NOT NULL, \
         ts timestamptz NOT NULL, received_at timestamptz NOT NULL DEFAULT now(), payload jsonb) \
         PARTITION BY HASH (event_id);"
    );
    for r in 0..4 {
        sql += &format!("CREATE TABLE {t}_p{r} PARTITION OF {t} FOR VALUES WITH (MODULUS 4, REMAINDER {r});");
    }
    db_connect(&database_url()).batch_execute(&sql).expect("create the hash-partitioned table");
    retries_are_idempotent_on(&t);
}

/// Range partitioning on `ts` (for retention by dropping old partitions)
/// needs `ts` in the primary key: PRIMARY KEY (event_id, ts). A retry sends
/// the same event, so the same (event_id, ts): it must still be a duplicate,
/// answered 200 and stored once — not refused or dead-lettered.
#[test]
fn range_partitioned_table_on_ts_keeps_idempotency() {
    let t = unique("t_range");
    let _guard = DropTables(vec![t.clone(), format!("{t}_dead_letter")]);
    let sql = format!(
        "CREATE TABLE {t} (event_id text NOT NULL, device_id text NOT NULL, event_type text NOT NULL, \
         ts timestamptz NOT NULL, received_at timestamptz NOT NULL DEFAULT now(), payload jsonb, \
         PRIMARY KEY (event_id, ts)) PARTITION BY RANGE (ts);\
         CREATE TABLE {t}_recent PARTITION OF {t} FOR VALUES FROM (now() - interval '30 days') TO (now() + interval '30 days');\
         CREATE TABLE {t}_default PARTITION OF {t} DEFAULT;"
    );
    db_connect(&database_url()).batch_execute(&sql).expect("create the range-partitioned table");
    retries_are_idempotent_on(&t);
}
