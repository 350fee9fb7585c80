//! Snapshots over `GET /ws` (issue 13): `snapshot=true` in the URL and
//! `"snapshot": true` in a subscribe frame send the rooms' current state
//! (marked `"snapshot": true`), a done marker, then the live feed; under
//! concurrent ingest every device's sequence, snapshot then live, has
//! nothing missing, nothing twice, and keeps its order.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest as _;
use tungstenite::{Message, WebSocket};

use crate::support::*;

type Client = WebSocket<TcpStream>;

fn connect(server: &Server, query: &str) -> Client {
    let stream = TcpStream::connect(server.addr).expect("tcp connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let request = format!("ws://{}/ws{query}", server.addr).into_client_request().expect("request");
    match tungstenite::client(request, stream) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("WebSocket upgrade {query}: {e}\n{}", server.stderr()),
    }
}

fn q(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// An event whose payload carries its place `n` in its device's sequence
/// (its `ts` grows with `n`, so the newest is the state).
fn ev(device: &str, n: i64, base_ms: i64) -> Value {
    json!({"event_id": unique("s"), "device_id": device, "type": "gps", "ts": base_ms + n, "payload": {"n": n}})
}

/// Reads snapshot frames until the done marker: (state objects, marker).
fn snapshot(ws: &mut Client) -> (Vec<Value>, Value) {
    let mut states = Vec::new();
    loop {
        let m = next_json(ws);
        if m["op"] == "snapshot" {
            return (states, m);
        }
        assert_eq!(m["snapshot"], true, "expected a snapshot frame before the done marker, got {m}");
        states.push(m);
    }
}

#[test]
fn the_url_snapshot_is_the_newest_event_per_device_then_live_events() {
    let server = Ingestd::new().set("state.enabled", "true").set("server.shards", 2).start();
    let fleet = format!("{}/", unique("fleet"));
    let base = now_ms();
    let mut newest = BTreeMap::new();
    for n in 0..3 {
        let events: Vec<Value> = (0..20).map(|d| ev(&format!("{fleet}{d:02}"), n, base)).collect();
        for e in &events {
            newest.insert(e["device_id"].as_str().unwrap().to_string(), e["event_id"].clone());
        }
        assert_eq!(server.post_batch(&events).status, 200);
    }
    // Another fleet's device is not in the snapshot.
    assert_eq!(server.post_event(&ev(&unique("other"), 0, base)).status, 200);

    let mut ws = connect(&server, &format!("?device_prefix={}&snapshot=true", q(&fleet)));
    let (states, done) = snapshot(&mut ws);
    assert_eq!(done, json!({"op": "snapshot", "done": true, "devices": 20, "complete": true}));
    let got: BTreeMap<String, Value> =
        states.iter().map(|s| (s["device_id"].as_str().unwrap().to_string(), s["event_id"].clone())).collect();
    assert_eq!(got, newest, "one frame per device, its newest event");
    let ids: Vec<&str> = states.iter().map(|s| s["device_id"].as_str().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in device_id order: {ids:?}");
    for s in &states {
        assert_eq!(
            (s["events"].as_i64(), s["payload"]["n"].as_i64(), s["type"].as_str()),
            (Some(3), Some(2), Some("gps"))
        );
        assert!(s["first_seen"].is_string() && s["received_at"].is_string(), "{s}");
    }
    let live = ev(&format!("{fleet}00"), 3, base);
    assert_eq!(server.post_event(&live).status, 200);
    let m = next_json(&mut ws);
    assert_eq!((m["event_id"].clone(), m.get("snapshot")), (live["event_id"].clone(), None), "then the live feed");

    // The cap: a socket asking for more than websocket.snapshot_max_devices.
    let capped = Ingestd::new()
        .set("state.enabled", "true")
        .set("websocket.snapshot_max_devices", 7)
        .set("state.max_page", 3)
        .table(&server.table)
        .start();
    let mut ws = connect(&capped, &format!("?device_prefix={}&snapshot=true", q(&fleet)));
    let (states, done) = snapshot(&mut ws);
    assert_eq!((states.len(), done["devices"].as_u64(), done["complete"].as_bool()), (7, Some(7), Some(false)));
}

#[test]
fn a_subscribe_frame_snapshots_the_rooms_it_names() {
    let server = Ingestd::new().set("state.enabled", "true").start();
    let (x, a, b, never) = (unique("x"), unique("a"), unique("b"), unique("never"));
    let base = now_ms();
    let events: Vec<Value> = [&x, &a, &b].iter().map(|d| ev(d, 0, base)).collect();
    assert_eq!(server.post_batch(&events).status, 200);
    let mut ws = connect(&server, &format!("?device_id={}", q(&x)));
    ws.send(Message::Text(
        json!({"op": "subscribe", "id": "s1", "devices": [a, b, never], "snapshot": true}).to_string().into(),
    ))
    .expect("send");
    let answer = next_json(&mut ws);
    assert_eq!((answer["ok"].as_bool(), answer["devices"].as_u64()), (Some(true), Some(4)), "{answer}");
    let (states, done) = snapshot(&mut ws);
    assert_eq!(done, json!({"op": "snapshot", "id": "s1", "done": true, "devices": 2, "complete": true}));
    let got: Vec<&str> = states.iter().map(|s| s["event_id"].as_str().unwrap()).collect();
    let mut want: Vec<(&str, &str)> = [(&a, &events[1]), (&b, &events[2])]
        .iter()
        .map(|(d, e)| (d.as_str(), e["event_id"].as_str().unwrap()))
        .collect();
    want.sort();
    assert_eq!(got, want.iter().map(|w| w.1).collect::<Vec<_>>(), "the rooms the frame named, not {x}");

    ws.send(Message::Text(json!({"op": "unsubscribe", "devices": [a], "snapshot": true}).to_string().into()))
        .expect("send");
    let answer = next_json(&mut ws);
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("snapshot goes with subscribe"), "{answer}");

    // An ingest-only socket cannot ask for one.
    let stream = TcpStream::connect(server.addr).expect("tcp connect");
    let request =
        format!("ws://{}/ws?subscribe=false&snapshot=true", server.addr).into_client_request().expect("request");
    match tungstenite::client(request, stream) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status().as_u16(), 400)
        }
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
}

/// What one socket saw of each device: the snapshot's `n` (if any), then
/// the live `n`s in arrival order.
#[derive(Debug, Default)]
struct Seen {
    snapshot: Option<i64>,
    live: Vec<i64>,
}

#[test]
fn under_concurrent_ingest_nothing_is_missing_nothing_twice_and_order_holds() {
    let server = Ingestd::new().set("state.enabled", "true").set("server.shards", 2).set("writer.writers", 2).start();
    let fleet = format!("{}/", unique("fleet"));
    let devices: Vec<String> = (0..40).map(|d| format!("{fleet}{d:02}")).collect();
    let base = now_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = {
        let (addr, devices, stop) = (server.addr, devices.clone(), stop.clone());
        thread::spawn(move || {
            let mut conn = Conn::open(addr);
            let mut post =
                |events: &[Value]| conn.roundtrip(&Req::post("/events/batch").json(&Value::Array(events.to_vec())));
            let mut n = 0i64;
            // Each round one event per device, posted in two halves by two
            // requests so that both writers take part.
            while !stop.load(Ordering::Relaxed) || n < 30 {
                let events: Vec<Value> = devices.iter().map(|d| ev(d, n, base)).collect();
                let (first, second) = events.split_at(events.len() / 2);
                assert_eq!(post(first).status, 200);
                assert_eq!(post(second).status, 200);
                n += 1;
            }
            n
        })
    };
    // Sockets open at different moments of the load: by URL, and by a
    // subscribe frame on a socket that first selected nothing of the fleet.
    let mut sockets = Vec::new();
    let started = Instant::now();
    for i in 0..6 {
        eventually(Duration::from_secs(10), "the load to move on", || {
            (started.elapsed() >= Duration::from_millis(150 * i)).then_some(())
        });
        let mut ws = if i % 2 == 0 {
            connect(&server, &format!("?device_prefix={}&snapshot=true", q(&fleet)))
        } else {
            let mut ws = connect(&server, &format!("?device_id={}", q(&unique("elsewhere"))));
            ws.send(Message::Text(
                json!({"op": "subscribe", "id": i, "prefixes": [fleet], "snapshot": true}).to_string().into(),
            ))
            .expect("send");
            assert_eq!(next_json(&mut ws)["ok"], true);
            ws
        };
        let (states, done) = snapshot(&mut ws);
        assert_eq!(done["complete"], true, "{done}");
        let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
        for s in states {
            let d = s["device_id"].as_str().unwrap().to_string();
            seen.entry(d).or_default().snapshot = s["payload"]["n"].as_i64();
        }
        sockets.push((ws, seen));
    }
    stop.store(true, Ordering::Relaxed);
    let last = rounds.join().expect("poster") - 1;
    let marker = ev(&format!("{fleet}zz-marker"), 0, base);
    assert_eq!(server.post_event(&marker).status, 200);
    for (i, (ws, seen)) in sockets.iter_mut().enumerate() {
        loop {
            let m = next_json(ws);
            assert!(m.get("dropped").is_none(), "socket {i} dropped events: {m}");
            if m["event_id"] == marker["event_id"] {
                break;
            }
            let d = m["device_id"].as_str().unwrap_or_else(|| panic!("expected an event, got {m}")).to_string();
            seen.entry(d).or_default().live.push(m["payload"]["n"].as_i64().unwrap());
        }
        assert_eq!(seen.len(), devices.len(), "socket {i} saw every device");
        for (device, s) in seen.iter() {
            let from = s.snapshot.map_or(0, |n| n + 1);
            let want: Vec<i64> = (from..=last).collect();
            assert_eq!(s.live, want, "socket {i}, {device}: snapshot {:?}, then live", s.snapshot);
        }
    }
}

#[test]
fn a_snapshot_that_cannot_be_read_says_so_and_the_live_feed_goes_on() {
    let pg = PrivatePg::start();
    let server = Ingestd::new().set("state.enabled", "true").database_url(&pg.url).start();
    let device = unique("d");
    assert_eq!(server.post_event(&ev(&device, 0, now_ms())).status, 200);
    pg.stop();
    let mut ws = connect(&server, &format!("?device_id={}&snapshot=true", q(&device)));
    let (states, end) = snapshot(&mut ws);
    assert!(states.is_empty(), "{states:?}");
    assert_eq!((end["ok"].as_bool(), end["devices"].as_u64()), (Some(false), Some(0)), "{end}");
    // Either the probe has seen the database go, or the read timed out first.
    let why = end["error"].as_str().unwrap_or_default();
    assert!(why.contains("database") || why.contains("state.read_timeout_ms"), "says why: {end}");
    pg.start_again();
    // The socket stays subscribed: the next committed event is pushed.
    let live = ev(&device, 1, now_ms());
    eventually(Duration::from_secs(20), "ingest accepted again after PostgreSQL is back", || {
        (server.post_event(&live).status == 200).then_some(())
    });
    let m = next_json(&mut ws);
    assert_eq!(m["event_id"], live["event_id"], "{m}");
}

#[test]
fn live_events_held_during_a_snapshot_follow_the_overflow_policy() {
    let server = Ingestd::new()
        .set("state.enabled", "true")
        .set("websocket.queue_messages", 20)
        .set("websocket.overflow", "drop_oldest")
        .set("state.max_page", 50)
        .start();
    let fleet = format!("{}/", unique("fleet"));
    let blob = "x".repeat(8192);
    // 3,000 devices of ~8.5 kB: a 25 MB snapshot, more than the socket
    // buffers of both ends hold, so it stalls while the client reads nothing.
    for chunk in 0..6 {
        let events: Vec<Value> = (0..500)
            .map(|d| {
                let device = format!("{fleet}{:04}", chunk * 500 + d);
                json!({"event_id": unique("s"), "device_id": device, "type": "gps", "ts": now_ms(), "payload": {"blob": blob}})
            })
            .collect();
        assert_eq!(server.post_batch(&events).status, 200);
    }
    let mut ws = connect(&server, &format!("?device_prefix={}&snapshot=true", q(&fleet)));
    // The snapshot is stuck on the unread socket: these are held, 20 at most.
    let live: Vec<Value> = (0..100).map(|n| ev(&format!("{fleet}live"), n, now_ms())).collect();
    for e in &live {
        assert_eq!(server.post_event(e).status, 200);
    }
    // Read it all: the drops were reported while the snapshot was held, the
    // snapshot shows every device (the live one too, at its newest event,
    // read after those were committed), and the held events it already
    // shows are not sent again.
    let (mut states, mut dropped, mut live_state) = (0, 0u64, None);
    let done = loop {
        let m = next_json(&mut ws);
        if let Some(n) = m.get("dropped") {
            dropped += n.as_u64().unwrap();
        } else if m["op"] == "snapshot" {
            break m;
        } else {
            assert_eq!(m["snapshot"], true, "live events wait for the snapshot: {m}");
            states += 1;
            if m["device_id"] == format!("{fleet}live") {
                live_state = m["payload"]["n"].as_i64();
            }
        }
    };
    assert_eq!((done["devices"].as_u64(), done["complete"].as_bool()), (Some(3001), Some(true)), "{done}");
    assert_eq!((states, live_state), (3001, Some(99)));
    assert_eq!(dropped, 80, "100 held in a queue of 20 (drop_oldest): 80 reported dropped");
    let marker = ev(&format!("{fleet}live"), 100, now_ms());
    assert_eq!(server.post_event(&marker).status, 200);
    let m = next_json(&mut ws);
    assert_eq!(m["event_id"], marker["event_id"], "nothing held is sent twice; then the live feed: {m}");
}
