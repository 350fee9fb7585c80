//! HTTP/1.1 handling, on exact bytes: the error statuses of SPEC "HTTP API"
//! (400 malformed JSON/HTTP, 404, 405, 408, 411, 413, 415), each with a JSON
//! `{"error": ...}` body; gzip bodies and gzip bombs; chunked request bodies;
//! `Expect: 100-continue`; keep-alive, pipelining and `Connection: close`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

fn batch_body(prefix: &str, n: usize) -> (Vec<Value>, Vec<u8>) {
    let evs = events(prefix, n);
    let body = serde_json::to_vec(&Value::Array(evs.clone())).unwrap();
    (evs, body)
}

#[test]
fn malformed_json_is_400_with_an_error() {
    let s = Server::start();
    for (path, body) in [
        ("/events", &b"{\"device_id\": \"d\", "[..]),
        ("/events", b"not json"),
        ("/events/batch", b"[{\"device_id\": \"d\"},"),
        ("/events/batch", b"[1, 2,]"),
    ] {
        let resp = s.send(&Req::post(path).header("Content-Type", "application/json").body(body.to_vec()));
        let msg = assert_error(&resp, 400);
        eprintln!("{path} {:?} -> 400 {msg}", String::from_utf8_lossy(body));
    }
    assert_eq!(s.count(), 0);
}

#[test]
fn malformed_http_is_400() {
    let s = Server::start();
    for bytes in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /health HTTP/1.1\r\nHost: x\r\nheader-without-colon\r\n\r\n",
        b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        // Four tokens: no HTTP-version at all, so 400 (RFC 9112 §3), not 505
        // (which is for a well-formed but unsupported "HTTP/x.y").
        b"THIS IS NOT HTTP\r\n\r\n",
    ] {
        let mut c = s.conn();
        c.write(bytes);
        let resp = c.read_response();
        assert_eq!(resp.status, 400, "request {:?} got:\n{resp:?}", String::from_utf8_lossy(bytes));
        assert_error(&resp, 400);
    }
}

#[test]
fn unknown_route_is_404() {
    let s = Server::start();
    assert_error(&s.get("/nope"), 404);
    assert_error(&s.send(&Req::post("/events/nope").json(&event("x"))), 404);
    assert_error(&s.get("/"), 404);
}

#[test]
fn wrong_method_is_405() {
    let s = Server::start();
    assert_error(&s.get("/events"), 405);
    assert_error(&s.get("/events/batch"), 405);
    assert_error(&s.send(&Req::new("DELETE", "/events/batch")), 405);
    assert_error(&s.send(&Req::post("/health").body(b"{}".to_vec())), 405);
    assert_error(&s.send(&Req::new("PUT", "/events").json(&event("x"))), 405);
    assert_eq!(s.count(), 0);
}

#[test]
fn post_without_length_or_chunked_is_411() {
    let s = Server::start();
    let mut c = s.conn();
    c.write(b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n");
    assert_error(&c.read_response(), 411);
}

#[test]
fn body_over_max_body_bytes_is_413() {
    let s = Ingestd::new().set("server.max_body_bytes", 2000).start();
    let (_, body) = batch_body("big", 30);
    assert!(body.len() > 2000);
    let resp = s.send(&Req::post("/events/batch").header("Content-Type", "application/json").body(body.clone()));
    assert_error(&resp, 413);

    // The same without Content-Length: a chunked body that grows too large.
    let parts: Vec<&[u8]> = body.chunks(500).collect();
    let req = Req::post("/events/batch")
        .header("Content-Type", "application/json")
        .header("Transfer-Encoding", "chunked")
        .body(chunked(&parts));
    assert_error(&s.send(&req), 413);

    // Under the limit still works.
    let (evs, small) = batch_body("ok", 3);
    assert!(small.len() < 2000);
    let resp = s.send(&Req::post("/events/batch").header("Content-Type", "application/json").body(small));
    assert_ingest(&resp, 200, 3, &[]);
    assert_eq!(s.count_ids(&ids_of(&evs)), 3);
    assert_eq!(s.count(), 3);
}

#[test]
fn unsupported_content_type_is_415() {
    let s = Server::start();
    let body = serde_json::to_vec(&event("ct-1")).unwrap();
    for ct in ["text/plain", "application/xml", "application/x-www-form-urlencoded"] {
        let resp = s.send(&Req::post("/events").header("Content-Type", ct).body(body.clone()));
        assert_error(&resp, 415);
    }
    assert_eq!(s.count(), 0);
}

#[test]
fn content_type_parameters_and_header_case_are_accepted() {
    let s = Server::start();
    let body = serde_json::to_vec(&event("ct-2")).unwrap();
    let mut c = s.conn();
    c.write(
        format!(
            "POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    c.write(&body);
    assert_ingest(&c.read_response(), 200, 1, &[]);
    assert_eq!(s.count_id("ct-2"), 1);
}

#[test]
fn unsupported_content_encoding_is_415() {
    let s = Server::start();
    let body = serde_json::to_vec(&event("br-1")).unwrap();
    for enc in ["br", "compress", "zstd"] {
        let req = Req::post("/events")
            .header("Content-Type", "application/json")
            .header("Content-Encoding", enc)
            .body(body.clone());
        assert_error(&s.send(&req), 415);
    }
    assert_eq!(s.count(), 0);
}

#[test]
fn gzip_body_is_accepted() {
    let s = Server::start();
    let (evs, body) = batch_body("gz", 20);
    let req = Req::post("/events/batch")
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(gzip(&body));
    assert_ingest(&s.send(&req), 200, 20, &[]);
    assert_eq!(s.count_ids(&ids_of(&evs)), 20);

    let ev = event("gz-single");
    let req = Req::post("/events")
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(gzip(&serde_json::to_vec(&ev).unwrap()));
    assert_ingest(&s.send(&req), 200, 1, &[]);
    assert_eq!(s.row("gz-single").unwrap().payload, Some(ev["payload"].clone()));
}

#[test]
fn gzip_bomb_is_413() {
    let s = Ingestd::new().set("server.max_decompressed_bytes", 65_536).start();
    // 2 MiB of whitespace inside a valid JSON array (32 x the limit): a few
    // KiB on the wire.
    let mut inflated = Vec::with_capacity(2 << 20);
    inflated.push(b'[');
    inflated.extend(std::iter::repeat_n(b' ', 2 << 20));
    inflated.extend_from_slice(&serde_json::to_vec(&event("bomb")).unwrap());
    inflated.push(b']');
    let wire = gzip(&inflated);
    assert!(wire.len() < 64 * 1024, "bomb is {} bytes on the wire", wire.len());
    let req = Req::post("/events/batch")
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(wire);
    assert_error(&s.send(&req), 413);
    assert_eq!(s.count(), 0);
}

#[test]
fn stalled_request_is_408() {
    let s = Ingestd::new().set("server.request_timeout_ms", 500).start();

    // Headers complete, body stalls after 10 of 100 bytes.
    let mut c = s.conn();
    c.set_read_timeout(Duration::from_secs(10));
    let t0 = Instant::now();
    c.write(
        b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"device_",
    );
    let resp = c.read_response();
    let waited = t0.elapsed();
    assert_error(&resp, 408);
    assert!(waited >= Duration::from_millis(400), "408 after only {waited:?}");
    assert!(waited < Duration::from_secs(5), "408 after {waited:?} with request_timeout_ms = 500");

    // Headers themselves stall (slowloris).
    let mut c = s.conn();
    c.set_read_timeout(Duration::from_secs(10));
    c.write(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Ty");
    assert_error(&c.read_response(), 408);

    assert_eq!(s.count(), 0);
}

#[test]
fn chunked_request_body_is_accepted() {
    let s = Server::start();
    let (evs, body) = batch_body("ch", 10);
    let mut c = s.conn();
    c.write(
        b"POST /events/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    // Uneven chunks, one write each, so the body arrives in pieces.
    let sizes = [1usize, 7, 300, 64, 1000];
    let mut rest = &body[..];
    let mut k = 0;
    while !rest.is_empty() {
        let n = sizes[k % sizes.len()].min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        c.write(format!("{n:X}\r\n").as_bytes());
        c.write(chunk);
        c.write(b"\r\n");
        rest = tail;
        k += 1;
    }
    c.write(b"0\r\n\r\n");
    assert_ingest(&c.read_response(), 200, 10, &[]);
    assert_eq!(s.count_ids(&ids_of(&evs)), 10);

    // Chunked single event, then a second request on the same connection.
    let ev = event("ch-single");
    let req = Req::post("/events")
        .header("Content-Type", "application/json")
        .header("Transfer-Encoding", "chunked")
        .body(chunked(&[&serde_json::to_vec(&ev).unwrap()]));
    assert_ingest(&c.roundtrip(&req), 200, 1, &[]);
    assert_eq!(c.roundtrip(&Req::get("/health")).status, 200);
    assert_eq!(s.count(), 11);
}

#[test]
fn expect_100_continue() {
    let s = Server::start();
    let body = serde_json::to_vec(&event("exp-1")).unwrap();
    let mut c = s.conn();
    c.set_read_timeout(Duration::from_secs(10));
    c.write(
        format!(
            "POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let interim = c.read_response();
    assert_eq!(interim.status, 100, "expected HTTP/1.1 100 Continue before the body:\n{interim:?}");
    c.write(&body);
    assert_ingest(&c.read_response(), 200, 1, &[]);
    assert_eq!(s.count_id("exp-1"), 1);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let s = Server::start();
    let mut c = s.conn();
    for i in 0..5 {
        let resp = c.roundtrip(&Req::post("/events").json(&event(&format!("ka-{i}"))));
        assert_ingest(&resp, 200, 1, &[]);
        let conn_hdr = resp.header("connection").unwrap_or_default().to_ascii_lowercase();
        assert!(!conn_hdr.contains("close"), "server closed a keep-alive connection:\n{resp:?}");
    }
    assert_eq!(c.roundtrip(&Req::get("/health")).status, 200);
    assert_eq!(c.roundtrip(&Req::get("/stats")).status, 200);
    // An error answer does not end the connection either.
    assert_error(&c.roundtrip(&Req::get("/nope")), 404);
    assert_ingest(&c.roundtrip(&Req::post("/events").json(&event("ka-last"))), 200, 1, &[]);
    assert_eq!(s.count(), 6);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let s = Server::start();
    let mut bytes = Req::post("/events").json(&event("pipe-1")).to_bytes();
    bytes.extend(Req::get("/nope").to_bytes());
    bytes.extend(Req::post("/events/batch").json(&json!([event("pipe-2"), event("pipe-3")])).to_bytes());
    bytes.extend(Req::get("/health").to_bytes());
    let mut c = s.conn();
    c.write(&bytes); // one write: all four requests at once
    assert_ingest(&c.read_response(), 200, 1, &[]);
    assert_error(&c.read_response(), 404);
    assert_ingest(&c.read_response(), 200, 2, &[]);
    assert_eq!(c.read_response().status, 200);
    assert_eq!(s.count(), 3);
}

#[test]
fn connection_close_is_honoured() {
    let s = Server::start();
    let mut c = s.conn();
    let resp = c.roundtrip(&Req::get("/health").header("Connection", "close"));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(c.closed_by_peer(Duration::from_secs(5)), "server kept the connection open after Connection: close");
}
