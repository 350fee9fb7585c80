//! `GET /health` (200 + JSON when ready), `GET /stats` (JSON counters that
//! move with ingest) and `GET /metrics` (Prometheus text 0.0.4: every sample
//! line parses, and a "committed" metric grows). Counter names are not
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

/// One sample line of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// Parses a text-format 0.0.4 exposition; panics naming any bad line.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| -> ! { panic!("/metrics line {}: {why}: {line:?}", n + 1) };
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad("no value"));
        let name = &line[..name_end];
        let valid_name = name
            .chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()));
        if name.is_empty() || !valid_name {
            bad("bad metric name");
        }
        let mut rest = &line[name_end..];
        let mut labels = String::new();
        if rest.starts_with('{') {
            // Scan to the closing brace, honouring quoted label values.
            let mut in_quotes = false;
            let mut escaped = false;
            let mut close = None;
            for (i, c) in rest.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if in_quotes => escaped = true,
                    '"' => in_quotes = !in_quotes,
                    '}' if !in_quotes => {
                        close = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close.unwrap_or_else(|| bad("unclosed label set"));
            labels = rest[1..close].to_string();
            for pair in split_labels(&labels) {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| bad("label without ="));
                if k.trim().is_empty() || !(v.starts_with('"') && v.ends_with('"') && v.len() >= 2) {
                    bad("bad label pair");
                }
            }
            rest = &rest[close + 1..];
        }
        let mut fields = rest.split_whitespace();
        let value = fields.next().unwrap_or_else(|| bad("no value"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| bad("value is not a number")),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().unwrap_or_else(|_| bad("timestamp is not an integer"));
        }
        if fields.next().is_some() {
            bad("trailing fields");
        }
        out.push(Sample { name: name.to_string(), labels, value });
    }
    out
}

/// Splits `a="x",b="y,z"` on commas outside quotes.
fn split_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut in_quotes, mut escaped) = (false, false);
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

fn committed_series(s: &Server) -> BTreeMap<String, f64> {
    let resp = s.get("/metrics");
    assert_eq!(resp.status, 200, "{resp:?}");
    let ct = resp.header("content-type").unwrap_or_default().replace(' ', "");
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "/metrics content-type {ct:?}, want text/plain; version=0.0.4"
    );
    let samples = parse_metrics(&resp.text());
    assert!(!samples.is_empty(), "/metrics has no samples:\n{resp:?}");
    samples
        .into_iter()
        .filter(|m| m.name.contains("committed"))
        .map(|m| (format!("{}{{{}}}", m.name, m.labels), m.value))
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
    // Guards the test's own parser against the format's corner cases.
    let text = "# HELP a_total help text\n# TYPE a_total counter\na_total 3\n\
                b{x=\"1\",y=\"a,}b\\\"c\"} 2.5e3 1700000000000\nc_bucket{le=\"+Inf\"} +Inf\nd NaN\n";
    let samples = parse_metrics(text);
    assert_eq!(samples.len(), 4);
    assert_eq!(samples[1].name, "b");
    assert_eq!(samples[1].value, 2500.0);
    assert!(samples[3].value.is_nan());
}
