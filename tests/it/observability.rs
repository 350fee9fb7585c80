//! `GET /health` (200 + JSON when ready), `GET /stats` (JSON counters that
//! move with ingest) and `GET /metrics` (Prometheus text 0.0.4: the whole
//! scrape parses strictly, and a "committed" metric grows). Counter names are not
//! pinned: any key containing "accepted" / "committed" counts.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

#[test]
fn health_is_200_json_when_ready() {
    let s = Server::start();
    let resp = s.get("/health");
    assert_eq!(resp.status, 200, "{resp:?}");
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    assert!(resp.json().is_object(), "health body is not a JSON object:\n{resp:?}");
}

#[test]
fn stats_counters_move_with_ingest() {
    let s = Server::start();
    let before = stats(&s);
    let acc0 = sum_numeric_keys(&before, "accepted");
    let com0 = sum_numeric_keys(&before, "committed");
    assert_ingest(&s.post_batch(&events("st", 25)), 200, 25, &[]);
    let after = eventually(Duration::from_secs(10), "/stats to count 25 accepted and committed events", || {
        let v = stats(&s);
        let moved = sum_numeric_keys(&v, "accepted") >= acc0 + 25.0 && sum_numeric_keys(&v, "committed") >= com0 + 25.0;
        moved.then_some(v)
    });
    eprintln!("stats before: {before}\nstats after: {after}");
}

fn stats(s: &Server) -> Value {
    let resp = s.get("/stats");
    assert_eq!(resp.status, 200, "{resp:?}");
    let v = resp.json();
    assert!(v.is_object(), "/stats is not a JSON object:\n{resp:?}");
    assert!(
        v.to_string().contains("accepted") && v.to_string().contains("committed"),
        "/stats has no accepted/committed counters:\n{resp:?}"
    );
    v
}

fn committed_series(s: &Server) -> BTreeMap<String, f64> {
    // Content type checked and every line parsed strictly (support::parse_scrape).
    let scrape = s.scrape();
    assert!(!scrape.samples.is_empty(), "/metrics has no samples:\n{}", scrape.text);
    scrape
        .samples
        .into_iter()
        .filter(|m| m.name.contains("committed"))
        .map(|m| (format!("{}{:?}", m.name, m.labels), m.value))
        .collect()
}

#[test]
fn metrics_are_prometheus_text_and_committed_grows() {
    let s = Server::start();
    let before = committed_series(&s);
    assert!(!before.is_empty(), "no metric with \"committed\" in its name");
    assert_ingest(&s.post_batch(&events("m", 10)), 200, 10, &[]);
    eventually(Duration::from_secs(10), "a \"committed\" metric to grow", || {
        let after = committed_series(&s);
        after.iter().any(|(k, v)| *v > before.get(k).copied().unwrap_or(0.0)).then_some(())
    });
}

#[test]
fn metrics_parser_accepts_the_format() {
    // Guards the suite's parser (support::parse_scrape) against the format's
    // corner cases: a label value holding `,}` and an escaped quote, an
    // exponent, a timestamp, +Inf as a label value and as a value, NaN.
    let text = "# HELP a_total help text\n# TYPE a_total counter\na_total 3\n\
                # HELP b B.\n# TYPE b gauge\nb{x=\"1\",y=\"a,}b\\\"c\"} 2.5e3 1700000000000\n\
                # HELP c C.\n# TYPE c histogram\nc_bucket{le=\"+Inf\"} +Inf\n\
                # HELP d D.\n# TYPE d untyped\nd NaN\n";
    let samples = parse_scrape(text).samples;
    assert_eq!(samples.len(), 4);
    assert_eq!(samples[1].name, "b");
    assert_eq!(samples[1].label("y"), Some("a,}b\"c"));
    assert_eq!(samples[1].value, 2500.0);
    assert_eq!(samples[2].label("le"), Some("+Inf"));
    assert_eq!(samples[2].value, f64::INFINITY);
    assert!(samples[3].value.is_nan());
}
