//! Browsers as clients (`[cors]`): a page on another origin, in a real
//! headless Chromium (Debian's `chromium`, installed by scripts/test.sh
//! through scripts/lib/chromium.sh), posts events with `fetch`, reads
//! `/stats` and ingests and subscribes over `GET /ws`; a page on an origin
//! not in `cors.allowed_origins` sees its `fetch` fail and its socket
//! refused. The pages are served by the test itself (a tiny HTTP server on
//! its own port: that port makes the page's origin), and each page reports
//! what it saw by POSTing JSON back to that server (same origin, no CORS).
//! The preflight and the headers are also checked on the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// Where Debian's package puts it; INGESTD_TEST_CHROMIUM overrides.
fn chromium_path() -> String {
    std::env::var("INGESTD_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Serves `page` at `/page.html` on `listener` until the page POSTs its
/// report to `/report`, which goes to the returned channel.
fn serve_page(listener: TcpListener, page: String) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let (status, ctype, content) = if request_line.starts_with("GET /page.html ") {
                ("200 OK", "text/html", page.clone())
            } else if request_line.starts_with("POST /report ") {
                ("204 No Content", "text/plain", String::new())
            } else {
                ("404 Not Found", "text/plain", String::new())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{content}",
                content.len()
            );
            if request_line.starts_with("POST /report ") {
                let report = serde_json::from_slice(&body).unwrap_or_else(|e| json!({"unparsable": e.to_string()}));
                let _ = tx.send(report);
                return;
            }
        }
    });
    rx
}

/// The page: POST an event with fetch, GET /stats, then a WebSocket that
/// subscribes to its device and ingests a second event; then the report.
fn page(ingestd: SocketAddr, first: &Value, second: &Value, device: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
const base = "http://{ingestd}";
const out = {{}};
async function run() {{
  try {{
    const r = await fetch(base + "/events", {{method: "POST",
      headers: {{"Content-Type": "application/json", "X-Request-Id": "page-req-1"}}, body: JSON.stringify({first})}});
    out.post = {{status: r.status, request_id: r.headers.get("X-Request-Id"), body: await r.json()}};
  }} catch (e) {{ out.post = {{error: String(e)}}; }}
  try {{
    const r = await fetch(base + "/stats");
    out.stats = {{status: r.status, body: await r.json()}};
  }} catch (e) {{ out.stats = {{error: String(e)}}; }}
  out.ws = await new Promise((resolve) => {{
    const res = {{opened: false}};
    const done = () => {{ clearTimeout(timer); resolve(res); }};
    const timer = setTimeout(() => {{ res.timeout = true; resolve(res); }}, 10000);
    const ws = new WebSocket("ws://{ingestd}/ws?device_id={device}");
    ws.onopen = () => {{ res.opened = true; ws.send(JSON.stringify({second})); }};
    ws.onmessage = (m) => {{
      const v = JSON.parse(m.data);
      if ("seq" in v) res.ack = v; else if (v.event_id) res.event = v;
      if (res.ack && res.event) {{ ws.close(); done(); }}
    }};
    ws.onclose = (e) => {{ res.close_code = e.code; if (!res.opened) done(); }};
  }});
  await fetch("/report", {{method: "POST", body: JSON.stringify(out)}});
}}
run();
</script></body></html>"#
    )
}

/// Runs headless Chromium on `url` until `report` arrives (or 40 s pass),
/// then kills its whole process group.
fn browse(url: &str, report: &mpsc::Receiver<Value>) -> Value {
    let chromium = chromium_path();
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: scripts/test.sh installs it (scripts/lib/chromium.sh), or set INGESTD_TEST_CHROMIUM"
    );
    let profile = std::env::temp_dir().join(unique("chromium-profile"));
    let mut child = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {chromium}: {e}"));
    let got = report.recv_timeout(Duration::from_secs(40));
    let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", child.id())]).status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&profile);
    got.unwrap_or_else(|e| panic!("no report from the page {url} within 40 s: {e}"))
}

fn page_event(id: &str, device: &str) -> Value {
    json!({"event_id": id, "device_id": device, "type": "t", "ts": now_ms(), "payload": {"from": "browser"}})
}

#[test]
fn a_page_on_an_allowed_origin_posts_reads_and_subscribes_and_another_is_refused() {
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_origin = format!("http://127.0.0.1:{}", allowed.local_addr().unwrap().port());
    let s = Ingestd::new().set("cors.allowed_origins", format!("[\"{allowed_origin}\"]")).start();

    let device = unique("browser");
    let (first, second) = (page_event(&unique("page"), &device), page_event(&unique("page"), &device));
    let port = allowed.local_addr().unwrap().port();
    let rx = serve_page(allowed, page(s.addr, &first, &second, &device));
    let report = browse(&format!("http://127.0.0.1:{port}/page.html"), &rx);
    eprintln!("allowed page reported: {report}");
    assert_eq!(report["post"]["status"], 200, "{report}");
    assert_eq!(report["post"]["body"]["accepted"], 1, "{report}");
    assert_eq!(report["post"]["request_id"], "page-req-1", "X-Request-Id is exposed: {report}");
    assert_eq!(report["stats"]["status"], 200, "{report}");
    assert!(report["stats"]["body"].is_object(), "{report}");
    assert_eq!(report["ws"]["opened"], true, "{report}");
    assert_eq!(report["ws"]["ack"]["accepted"], 1, "{report}");
    assert_eq!(report["ws"]["event"]["event_id"], second["event_id"], "{report}");
    let ids = ids_of(&[first, second]);
    assert_eq!(s.count_ids(&ids), 2, "both events are in PostgreSQL");

    // Another origin: the preflight is refused, so fetch fails and nothing is
    // stored; /stats answers without Access-Control-Allow-Origin, so the page
    // cannot read it; the socket is refused before the upgrade.
    let device = unique("browser");
    let (first, second) = (page_event(&unique("page"), &device), page_event(&unique("page"), &device));
    let port = refused.local_addr().unwrap().port();
    let rx = serve_page(refused, page(s.addr, &first, &second, &device));
    let report = browse(&format!("http://127.0.0.1:{port}/page.html"), &rx);
    eprintln!("refused page reported: {report}");
    assert!(report["post"]["error"].as_str().is_some_and(|e| e.contains("Failed to fetch")), "{report}");
    assert!(report["stats"]["error"].as_str().is_some_and(|e| e.contains("Failed to fetch")), "{report}");
    assert_eq!(report["ws"]["opened"], false, "{report}");
    assert_eq!(s.count_ids(&ids_of(&[first, second])), 0);
}

#[test]
fn preflight_and_cors_headers_on_the_wire() {
    let origin = "http://app.example:8080";
    let s = Ingestd::new().set("cors.allowed_origins", format!("[\"{origin}\"]")).set("cors.max_age_s", 120).start();
    for (path, methods) in [
        ("/events", "POST, OPTIONS"),
        ("/events/batch", "POST, OPTIONS"),
        ("/stats", "GET, HEAD, OPTIONS"),
        ("/health", "GET, HEAD, OPTIONS"),
        ("/metrics", "GET, HEAD, OPTIONS"),
    ] {
        let r = s.send(
            &Req::new("OPTIONS", path)
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "POST")
                .header("Access-Control-Request-Headers", "content-type,x-request-id"),
        );
        assert_eq!(r.status, 204, "{path}: {r:?}");
        assert_eq!(r.header("access-control-allow-origin"), Some(origin), "{path}: {r:?}");
        assert_eq!(r.header("access-control-allow-methods"), Some(methods), "{path}: {r:?}");
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("Content-Type, Authorization, Content-Encoding, X-Request-Id")
        );
        assert_eq!(r.header("access-control-max-age"), Some("120"));
        assert_eq!(r.header("vary"), Some("Origin"));
        assert!(r.header("x-request-id").is_some());
    }
    let r = s.send(&Req::new("OPTIONS", "/events").header("Origin", "http://evil.example"));
    let msg = assert_error(&r, 403);
    assert!(msg.contains("cors.allowed_origins"), "{msg}");
    assert_eq!(r.header("access-control-allow-origin"), None);
    // Answers: ACAO for the allowed origin, Vary for everyone.
    let r = s.send(&Req::get("/health").header("Origin", origin));
    assert_eq!((r.header("access-control-allow-origin"), r.header("vary")), (Some(origin), Some("Origin")));
    assert_eq!(r.header("access-control-expose-headers"), Some("X-Request-Id, Retry-After"));
    let r = s.send(&Req::get("/health").header("Origin", "http://evil.example"));
    assert_eq!((r.header("access-control-allow-origin"), r.header("vary")), (None, Some("Origin")));
    // GET /ws: a browser's Origin not in the list is 403; no Origin (not a browser) is served.
    let upgrade = |origin: Option<&str>| {
        let mut req = Req::get("/ws?device_id=x")
            .header("Upgrade", "websocket")
            .header("Connection", "Upgrade")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        let mut c = s.conn();
        c.write(&req.to_bytes());
        c.read_response().status
    };
    assert_eq!(upgrade(Some("http://evil.example")), 403);
    assert_eq!(upgrade(Some(origin)), 101);
    assert_eq!(upgrade(None), 101);

    // CORS off (the default): no CORS headers, OPTIONS is 405, /ws ignores Origin.
    let off = Server::start();
    let r = off.send(&Req::new("OPTIONS", "/events").header("Origin", origin));
    assert_eq!(r.status, 405, "{r:?}");
    let r = off.send(&Req::get("/health").header("Origin", origin));
    assert_eq!((r.header("access-control-allow-origin"), r.header("vary")), (None, None));

    // "*": any origin, as `*`, and nothing varies.
    let any = Ingestd::new().set("cors.allowed_origins", "[\"*\"]").start();
    let r = any.send(&Req::get("/stats").header("Origin", "http://whoever.example"));
    assert_eq!((r.header("access-control-allow-origin"), r.header("vary")), (Some("*"), None));
}
