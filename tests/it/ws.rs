//! `GET /ws`: live subscriptions (filters, ordering, only committed events,
//! slow subscribers, coalescing, many subscribers, clean-up) and ingest over
//! a socket (in-order answers, bad frames, close handshake), with a real
//! WebSocket client (`tungstenite`) over real sockets.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use crate::support::*;

type Client = WebSocket<TcpStream>;

fn connect(server: &Server, query: &str) -> Client {
    try_connect(server, query).unwrap_or_else(|e| panic!("WebSocket upgrade {query}: {e}\n{}", server.stderr()))
}

fn try_connect(server: &Server, query: &str) -> Result<Client, tungstenite::Error> {
    let stream = TcpStream::connect(server.addr).expect("tcp connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let url = format!("ws://{}/ws{query}", server.addr);
    tungstenite::client(url.as_str(), stream).map(|(ws, _)| ws).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
    })
}

fn ev(id: &str, device: &str, kind: &str) -> Value {
    json!({"event_id": id, "device_id": device, "type": kind, "ts": now_ms(), "payload": {"n": 1.50, "id": id}})
}

fn stats(server: &Server) -> Value {
    serde_json::from_slice(&server.get("/stats").body).expect("stats JSON")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn filters_select_what_each_subscriber_gets() {
    let server = Ingestd::new().set("server.shards", 2).start();
    let mut all = connect(&server, "");
    let mut by_device = connect(&server, "?device_id=d1");
    let mut by_type = connect(&server, "?type=t2");
    let mut both = connect(&server, "?device_id=d1&type=t2");
    let mut events = Vec::new();
    for (i, (d, t)) in [("d1", "t1"), ("d1", "t2"), ("d2", "t1"), ("d2", "t2")].iter().cycle().take(12).enumerate() {
        events.push(ev(&unique(&format!("f{i}")), d, t));
    }
    assert_eq!(server.post_batch(&events).status, 200);
    let ids = |msgs: &[Value]| msgs.iter().map(|m| m["event_id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let expect = |f: &dyn Fn(&Value) -> bool| ids(&events.iter().filter(|e| f(e)).cloned().collect::<Vec<_>>());
    let quiet = Duration::from_millis(400);
    assert_eq!(ids(&drain_json(&mut all, quiet)), expect(&|_| true));
    assert_eq!(ids(&drain_json(&mut by_device, quiet)), expect(&|e| e["device_id"] == "d1"));
    assert_eq!(ids(&drain_json(&mut by_type, quiet)), expect(&|e| e["type"] == "t2"));
    assert_eq!(ids(&drain_json(&mut both, quiet)), expect(&|e| e["device_id"] == "d1" && e["type"] == "t2"));
}

#[test]
fn pushed_events_carry_the_event_and_arrive_in_order() {
    let server = Ingestd::new().set("server.shards", 2).set("writer.writers", 2).start();
    let mut sub = connect(&server, "?device_id=ordered");
    let mut sent = Vec::new();
    // Sequential requests over both writers: each sent after the previous ack.
    for r in 0..20 {
        let batch: Vec<Value> = (0..10).map(|i| ev(&format!("{}-{r:02}-{i}", unique("o")), "ordered", "t")).collect();
        assert_eq!(server.post_batch(&batch).status, 200);
        sent.extend(batch);
    }
    for expected in &sent {
        let got = next_json(&mut sub);
        assert_eq!(got["event_id"], expected["event_id"], "commit order per device");
        assert_eq!(got["device_id"], "ordered");
        assert_eq!(got["type"], "t");
        assert_eq!(got["payload"], expected["payload"]);
        assert!(got["ts"].is_string(), "ts as RFC 3339: {got}");
    }
}

#[test]
fn only_committed_events_are_pushed_and_only_once() {
    let server = Ingestd::new().start();
    let mut sub = connect(&server, "");
    let first = ev(&unique("c"), "d", "t");
    assert_eq!(server.post_event(&first).status, 200);
    let got = next_json(&mut sub);
    assert_eq!(got["event_id"], first["event_id"]);
    // Every pushed event is already in PostgreSQL when it arrives.
    assert_eq!(server.count_id(first["event_id"].as_str().unwrap()), 1);
    // A re-sent event is not an event anew; a rejected one was never stored.
    let fresh = ev(&unique("c"), "d", "t");
    let bad = json!({"device_id": "d", "type": "t"});
    let resp = server.post_batch(&[first.clone(), bad, fresh.clone()]);
    assert_eq!(resp.status, 200);
    let msgs = drain_json(&mut sub, Duration::from_millis(500));
    let ids: Vec<_> = msgs.iter().map(|m| m["event_id"].clone()).collect();
    assert_eq!(ids, vec![fresh["event_id"].clone()], "duplicate and rejected events are not pushed");
}

#[test]
fn ingest_frames_are_answered_in_order_after_commit() {
    let server = Ingestd::new().start();
    let mut ws = connect(&server, "?device_id=nobody");
    let ids: Vec<String> = (0..6).map(|i| unique(&format!("w{i}"))).collect();
    let frames = [
        ev(&ids[0], "d", "t").to_string(),
        json!([ev(&ids[1], "d", "t"), ev(&ids[2], "d", "t")]).to_string(),
        "{not json".to_string(),
        json!([ev(&ids[3], "d", "t"), {"device_id": "d"}, ev(&ids[4], "d", "t")]).to_string(),
        json!({"type": "t"}).to_string(),
        ev(&ids[5], "d", "t").to_string(),
    ];
    for f in &frames {
        ws.send(Message::Text(f.clone().into())).expect("send");
    }
    let answers: Vec<Value> = (0..frames.len()).map(|_| next_json(&mut ws)).collect();
    let seqs: Vec<_> = answers.iter().map(|a| a["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6], "{answers:?}");
    let accepted: Vec<_> = answers.iter().map(|a| a["accepted"].as_u64().unwrap()).collect();
    assert_eq!(accepted, [1, 2, 0, 2, 0, 1], "{answers:?}");
    assert!(answers[2]["error"].as_str().unwrap().contains("malformed"), "{}", answers[2]);
    assert_eq!(answers[3]["rejected"][0]["index"], 1);
    assert_eq!(server.count_ids(&ids), 6, "an answer means committed");
}

#[test]
fn an_ingest_only_socket_gets_answers_but_no_pushes() {
    let server = Ingestd::new().start();
    let mut ws = connect(&server, "?subscribe=false");
    let mut other = connect(&server, "");
    let id = unique("io");
    ws.send(Message::Text(ev(&id, "d", "t").to_string().into())).expect("send");
    assert_eq!(next_json(&mut ws)["seq"], 1, "the answer comes first and alone");
    assert_eq!(next_json(&mut other)["event_id"], id.as_str(), "subscribers still get it");
    assert!(drain_json(&mut ws, Duration::from_millis(300)).is_empty(), "no pushes on an ingest-only socket");
}

#[test]
fn bad_frames_get_clear_answers_and_the_connection_goes_on() {
    let server = Ingestd::new().set("websocket.max_message_bytes", 4096).start();
    let mut ws = connect(&server, "?device_id=nobody");
    ws.send(Message::Binary(vec![1, 2, 3].into())).expect("send binary");
    let notice = next_json(&mut ws);
    assert!(notice["error"].as_str().unwrap().contains("binary"), "{notice}");
    let id = unique("after-binary");
    ws.send(Message::Text(ev(&id, "d", "t").to_string().into())).expect("send");
    let answer = next_json(&mut ws);
    assert_eq!(answer["accepted"], 1, "{answer}");
    // Oversized: closed with 1009 (message too big).
    ws.send(Message::Text("x".repeat(10_000).into())).expect("send big");
    let code = loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => break frame.code,
            Ok(Message::Close(None)) => panic!("close without a code"),
            Ok(_) => {}
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    };
    assert_eq!(code, CloseCode::Size);
    // The server is unaffected.
    assert_eq!(server.post_event(&ev(&unique("ok"), "d", "t")).status, 200);
}

#[test]
fn close_handshake_is_completed() {
    let server = Ingestd::new().start();
    let mut ws = connect(&server, "");
    ws.close(None).expect("send close");
    // tungstenite reports ConnectionClosed only once the server's close frame
    // has answered ours; a connection dropped without one is an error here.
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake not completed: {e}"),
        }
    }
    eventually(Duration::from_secs(5), "subscriber count back to 0", || {
        (stats(&server)["ws_subscribers"] == 0).then_some(())
    });
}

#[test]
fn a_subscriber_that_never_reads_is_closed_and_memory_stays_bounded() {
    let server = Ingestd::new()
        .set("websocket.queue_bytes", 256 * 1024)
        .set("websocket.queue_messages", 2000)
        .set("writer.writers", 2)
        .set("server.shards", 2)
        .start();
    let stuck = connect(&server, "");
    // Shrink the stuck client's receive buffer so the server feels it quickly.
    let baseline = rss_kib(server.pid());
    let total = 200_000;
    let per_request = 500;
    let mut sent = 0;
    let started = Instant::now();
    let mut peak = baseline;
    while sent < total {
        let batch: Vec<Value> = (0..per_request).map(|i| ev(&format!("{}-{i}", unique("s")), "dev", "t")).collect();
        let resp = server.post_batch(&batch);
        assert!(resp.status == 200 || resp.status == 503, "status {}", resp.status);
        if resp.status == 200 {
            sent += per_request;
        }
        if sent % 20_000 == 0 {
            peak = peak.max(rss_kib(server.pid()));
        }
    }
    peak = peak.max(rss_kib(server.pid()));
    let s = stats(&server);
    println!(
        "slow subscriber: {total} events in {:?}; ingestd RSS {baseline} KiB -> peak {peak} KiB; slow closes {}, dropped {}",
        started.elapsed(),
        s["ws_slow_closes"],
        s["ws_dropped"]
    );
    assert_eq!(s["ws_slow_closes"], 1, "{s}");
    assert!(peak - baseline < 96 * 1024, "RSS grew by {} KiB", peak - baseline);
    // The stuck client finds a 1013 close after what fitted in the buffers.
    let mut ws = stuck;
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let code = loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => break Some(frame.code),
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    assert_eq!(code, Some(CloseCode::Again), "closed with 1013");
    eventually(Duration::from_secs(5), "subscriber released", || (stats(&server)["ws_subscribers"] == 0).then_some(()));
}

#[test]
fn drop_oldest_reports_what_was_dropped() {
    let server = Ingestd::new().set("websocket.overflow", "drop_oldest").set("websocket.queue_messages", 5).start();
    let mut sub = connect(&server, "");
    // Don't read while a burst is committed; the queue (5) overflows once
    // the socket buffers are full, which needs more than they hold.
    let payload = "x".repeat(4000);
    for r in 0..30 {
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"event_id": format!("{}-{r}-{i}", unique("do")), "device_id": "d", "type": "t", "ts": now_ms(), "payload": {"pad": payload}}))
            .collect();
        assert_eq!(server.post_batch(&batch).status, 200);
    }
    let msgs = drain_json(&mut sub, Duration::from_millis(800));
    let dropped: u64 = msgs.iter().filter_map(|m| m["dropped"].as_u64()).sum();
    let events = msgs.iter().filter(|m| m.get("event_id").is_some()).count() as u64;
    println!("drop_oldest: {events} events received, {dropped} reported dropped");
    assert!(dropped > 0, "a notice says how many were dropped");
    assert_eq!(events + dropped, 3000, "every event is either delivered or counted");
}

#[test]
fn coalescing_sends_the_latest_event_per_device() {
    let server = Ingestd::new().start();
    let mut sub = connect(&server, "?coalesce_ms=300");
    let batch: Vec<Value> =
        (0..50).map(|i| ev(&unique(&format!("co{i:02}")), if i % 2 == 0 { "a" } else { "b" }, "t")).collect();
    assert_eq!(server.post_batch(&batch).status, 200);
    let msgs = drain_json(&mut sub, Duration::from_millis(900));
    let last_a = batch.iter().rev().find(|e| e["device_id"] == "a").unwrap();
    let last_b = batch.iter().rev().find(|e| e["device_id"] == "b").unwrap();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(msgs.iter().any(|m| m["event_id"] == last_a["event_id"]));
    assert!(msgs.iter().any(|m| m["event_id"] == last_b["event_id"]));
}

#[test]
fn two_thousand_subscribers_each_get_every_event() {
    let server = Ingestd::new().set("server.shards", 2).start();
    let mut subs: Vec<Client> = (0..2000).map(|_| connect(&server, "?device_id=many")).collect();
    eventually(Duration::from_secs(10), "2000 subscribers", || {
        (stats(&server)["ws_subscribers"] == 2000).then_some(())
    });
    let batch: Vec<Value> = (0..10).map(|i| ev(&unique(&format!("m{i}")), "many", "t")).collect();
    assert_eq!(server.post_batch(&batch).status, 200);
    let started = Instant::now();
    for sub in subs.iter_mut() {
        for expected in &batch {
            assert_eq!(next_json(sub)["event_id"], expected["event_id"]);
        }
    }
    println!("2000 subscribers x 10 events delivered in {:?}", started.elapsed());
}

#[test]
fn abrupt_disconnects_free_everything() {
    let server = Ingestd::new().set("server.shards", 2).start();
    let subs: Vec<Client> = (0..200).map(|_| connect(&server, "")).collect();
    eventually(Duration::from_secs(5), "200 subscribers", || (stats(&server)["ws_subscribers"] == 200).then_some(()));
    for sub in subs {
        let _ = sub.get_ref().shutdown(std::net::Shutdown::Both);
    }
    // Traffic makes every writer task notice its peer is gone.
    assert_eq!(server.post_batch(&events(&unique("ad"), 10)).status, 200);
    eventually(Duration::from_secs(10), "subscribers released", || {
        (stats(&server)["ws_subscribers"] == 0).then_some(())
    });
    // Only the connection asking for /stats is left.
    eventually(Duration::from_secs(10), "connections closed", || {
        (stats(&server)["connections_open"].as_i64() == Some(1)).then_some(())
    });
}

#[test]
fn refused_upgrades_get_clear_statuses() {
    let server = Ingestd::new().set("websocket.max_subscribers", 1).start();
    let _first = connect(&server, "");
    match try_connect(&server, "") {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("second subscriber over the cap: {:?}", other.map(|_| ())),
    }
    match try_connect(&server, "?bogus=1") {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("unknown parameter: {:?}", other.map(|_| ())),
    }
    let plain = server.get("/ws");
    assert_eq!(plain.status, 426, "GET /ws without an upgrade");
    let per_ip = Ingestd::new().set("websocket.max_per_ip", 1).start();
    let _one = connect(&per_ip, "");
    match try_connect(&per_ip, "") {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("over the per-IP cap: {:?}", other.map(|_| ())),
    }
}

#[test]
fn shutdown_closes_subscribers_with_going_away() {
    let mut server = Ingestd::new().start();
    let mut sub = connect(&server, "");
    server.signal("TERM");
    let code = loop {
        match sub.read() {
            Ok(Message::Close(Some(frame))) => break Some(frame.code),
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    assert_eq!(code, Some(CloseCode::Away));
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}
