//! `GET /health` (200 + JSON when ready), `GET /stats` (JSON counters that
//! move with ingest) and `GET /metrics` (Prometheus text 0.0.4: the whole
//! scrape parses strictly, and a "committed" metric grows; `promtool check
//! metrics` finds nothing to say about it; the ack-latency histogram moves
//! with traffic). Counter names are not pinned: any key containing
//! "accepted" / "committed" counts.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
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
                # HELP c C.\n# TYPE c histogram\nc_bucket{le=\"+Inf\"} +Inf\nc_count +Inf\n\
                # HELP d D.\n# TYPE d untyped\nd NaN\n";
    let samples = parse_scrape(text).samples;
    assert_eq!(samples.len(), 5);
    assert_eq!(samples[1].name, "b");
    assert_eq!(samples[1].label("y"), Some("a,}b\"c"));
    assert_eq!(samples[1].value, 2500.0);
    assert_eq!(samples[2].label("le"), Some("+Inf"));
    assert_eq!(samples[2].value, f64::INFINITY);
    assert!(samples[4].value.is_nan());
}

/// `promtool` (Debian package `prometheus`, installed by scripts/test.sh),
/// or `INGESTD_TEST_PROMTOOL`. Missing is a failure, not a skip: CI must
/// run this test.
fn promtool() -> String {
    let path = std::env::var("INGESTD_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    match Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => path,
        other => panic!(
            "promtool not found ({path}: {other:?}); scripts/test.sh installs it (apt-get install prometheus), \
             or set INGESTD_TEST_PROMTOOL"
        ),
    }
}

#[test]
fn metrics_pass_promtool_and_ack_histogram_moves_with_traffic() {
    let promtool = promtool();
    let s = Server::start();
    let count0 = s.scrape().sum("ingestd_ack_latency_seconds_count", None);
    const REQUESTS: usize = 5;
    for i in 0..REQUESTS {
        assert_ingest(&s.post_batch(&events(&format!("hist{i}"), 10)), 200, 10, &[]);
    }
    // The writer records the latency before it answers, so the five 200s
    // are already counted; eventually() still allows for a scrape racing it.
    let scrape = eventually(Duration::from_secs(10), "the ack-latency histogram to count 5 requests", || {
        let scrape = s.scrape();
        (scrape.sum("ingestd_ack_latency_seconds_count", None) >= count0 + REQUESTS as f64).then_some(scrape)
    });
    let buckets = scrape.buckets("ingestd_ack_latency_seconds");
    let les: Vec<&str> = buckets.iter().map(|(le, _)| le.as_str()).collect();
    assert_eq!(les.first(), Some(&"0.0001"), "{buckets:?}");
    assert_eq!(les.last(), Some(&"+Inf"), "{buckets:?}");
    // The requests landed in finite buckets (each well under 30 s), and at
    // least one bucket below +Inf counts them all.
    let finite = buckets.iter().rev().nth(1).map(|(_, n)| *n).unwrap_or(0.0);
    assert!(finite >= count0 + REQUESTS as f64, "{buckets:?}");
    assert!(scrape.sum("ingestd_ack_latency_seconds_sum", None) > 0.0);
    assert!(scrape.sum("ingestd_batch_events_count", None) >= 1.0);

    // promtool reads the scrape as Prometheus would and lints it (names,
    // units, HELP text): it must print nothing and exit 0.
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(scrape.text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}\n--- scrape ---\n{}",
        out.status,
        scrape.text
    );
}

// ---------------------------------------------------------------------------
// Request ids
// ---------------------------------------------------------------------------

/// The `request_id=` of a logfmt line.
fn logged_id(line: &str) -> &str {
    line.split(' ').find_map(|kv| kv.strip_prefix("request_id=")).unwrap_or_else(|| panic!("no request_id in {line}"))
}

#[test]
fn request_ids_are_in_the_answer_and_in_the_log() {
    let s = Ingestd::new().set("log.slow_request_ms", 50).start();
    // Made when the client sends none: a UUIDv7, a new one per request.
    let a = s.get("/health");
    let b = s.get("/health");
    let (ida, idb) = (a.header("x-request-id").expect("made id"), b.header("x-request-id").expect("made id"));
    assert!(ida.len() == 36 && ida.as_bytes()[14] == b'7', "{ida}");
    assert_ne!(ida, idb);

    // The client's id comes back, and names the log line of a refusal.
    let mark = s.log_mark();
    let bad =
        s.send(&Req::post("/events").header("X-Request-Id", "device-7/req:42").json(&serde_json::json!({"x": 1})));
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.header("x-request-id"), Some("device-7/req:42"));
    let line = s.wait_for_log_since(mark, &["request refused"], Duration::from_secs(5));
    assert_eq!(logged_id(&line), "device-7/req:42", "{line}");
    assert!(line.contains("status=400") && line.contains("route=/events"), "{line}");

    // Too long, or unprintable: 400 naming the header, with an id made for it.
    let long = "a".repeat(129);
    for bad_id in [long.as_str(), "has space"] {
        let resp = s.send(&Req::get("/health").header("X-Request-Id", bad_id));
        let msg = assert_error(&resp, 400);
        assert!(msg.contains("X-Request-Id"), "{msg}");
        assert_eq!(resp.header("x-request-id").map(str::len), Some(36), "{resp:?}");
    }

    // A slow request (its body comes 200 ms after its head) is logged with its id.
    let mark = s.log_mark();
    let id = unique("ev");
    let body = serde_json::to_vec(&event(&id)).unwrap();
    let head = format!(
        "POST /events HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut c = s.conn();
    c.write(head.as_bytes());
    std::thread::sleep(Duration::from_millis(200));
    c.write(&body);
    let resp = c.read_response();
    assert_eq!((resp.status, resp.header("x-request-id")), (200, Some("slow-1")), "{resp:?}");
    let line = s.wait_for_log_since(mark, &["slow request"], Duration::from_secs(5));
    assert_eq!(logged_id(&line), "slow-1", "{line}");
    assert_eq!(s.count_id(&id), 1);
}

#[test]
fn a_websocket_carries_its_request_id_in_the_upgrade_and_its_log_lines() {
    use tungstenite::client::IntoClientRequest as _;
    let s = Ingestd::new().set("websocket.max_message_bytes", 1024).start();
    let stream = std::net::TcpStream::connect(s.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("ws://{}/ws?device_id=x", s.addr).into_client_request().unwrap();
    request.headers_mut().insert("X-Request-Id", "sock-9".parse().unwrap());
    let (mut ws, resp) = tungstenite::client(request, stream).expect("upgrade");
    assert_eq!(resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("sock-9"));
    let mark = s.log_mark();
    // Too large a message: the server closes with 1009 and says so, naming the socket.
    let _ = ws.send(tungstenite::Message::Text("x".repeat(4096).into()));
    let line = s.wait_for_log_since(mark, &["websocket closed by the server"], Duration::from_secs(5));
    assert_eq!(logged_id(&line), "sock-9", "{line}");
    assert!(line.contains("code=1009"), "{line}");
}
