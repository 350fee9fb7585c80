//! Rooms over `GET /ws` (issue 13): several `device_id`, `device_prefix` and
//! `type` values in the URL, `subscribe`/`unsubscribe` control frames that
//! change what a socket receives without reconnecting, their answers and
//! errors, the per-socket bounds, a token's `device_prefix`, and control
//! frames beside ingest frames on the same socket.
//!
//! Absence is proven without waiting for silence: after the events under
//! test, a marker event the socket does select is committed; everything
//! that arrives before the marker is compared with what the rooms select.

use std::net::TcpStream;

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest as _;
use tungstenite::{Message, WebSocket};

use crate::support::*;

type Client = WebSocket<TcpStream>;

/// The upgrade to `/ws{query}`: the socket, or the refusal's status.
fn try_connect(server: &Server, query: &str) -> Result<Client, u16> {
    let stream = TcpStream::connect(server.addr).expect("tcp connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let request = format!("ws://{}/ws{query}", server.addr).into_client_request().expect("request");
    match tungstenite::client(request, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => Err(resp.status().as_u16()),
        Err(e) => panic!("WebSocket upgrade {query}: {e}\n{}", server.stderr()),
    }
}

fn connect(server: &Server, query: &str) -> Client {
    try_connect(server, query).unwrap_or_else(|status| panic!("upgrade {query} refused: {status}\n{}", server.stderr()))
}

fn ev(device: &str, kind: &str) -> Value {
    json!({"event_id": unique("r"), "device_id": device, "type": kind, "ts": now_ms(), "payload": {"n": 1}})
}

/// Sends a control frame and returns its answer (nothing else may be in flight).
fn control(ws: &mut Client, frame: Value) -> Value {
    ws.send(Message::Text(frame.to_string().into())).expect("send control frame");
    let answer = next_json(ws);
    assert!(answer.get("ok").is_some(), "expected a control answer to {frame}, got {answer}");
    answer
}

fn ok(ws: &mut Client, frame: Value) -> Value {
    let answer = control(ws, frame.clone());
    assert_eq!(answer["ok"], true, "{frame} → {answer}");
    answer
}

/// The error of a refused control frame.
fn refused(ws: &mut Client, frame: &str) -> String {
    ws.send(Message::Text(frame.to_string().into())).expect("send control frame");
    let answer = next_json(ws);
    assert_eq!(answer["ok"], false, "{frame} → {answer}");
    answer["error"].as_str().unwrap_or_else(|| panic!("no error text: {answer}")).to_string()
}

/// Commits `events`, then `marker` (which the socket selects), and returns
/// the event ids the socket received before the marker.
fn received(server: &Server, ws: &mut Client, events: &[Value], marker: &Value) -> Vec<String> {
    if !events.is_empty() {
        assert_eq!(server.post_batch(events).status, 200);
    }
    assert_eq!(server.post_event(marker).status, 200);
    let mut got = Vec::new();
    // Pings keep each read alive; bound the whole wait, not just one read.
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    loop {
        assert!(std::time::Instant::now() < deadline, "the marker never came; got {got:?}");
        let m = next_json(ws);
        let id = m["event_id"].as_str().unwrap_or_else(|| panic!("expected an event, got {m}")).to_string();
        if m["event_id"] == marker["event_id"] {
            return got;
        }
        got.push(id);
    }
}

fn ids_where(events: &[Value], f: impl Fn(&str, &str) -> bool) -> Vec<String> {
    events
        .iter()
        .filter(|e| f(e["device_id"].as_str().unwrap(), e["type"].as_str().unwrap()))
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_url_takes_several_devices_prefixes_and_types() {
    let server = Ingestd::new().set("server.shards", 2).start();
    let (a, b, c) = (unique("a"), unique("b"), unique("c"));
    let fleet = format!("{}/", unique("fleet"));
    let in_fleet = format!("{fleet}7");
    let q = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut devices =
        connect(&server, &format!("?device_id={}&device_id={}&device_prefix={}", q(&a), q(&b), q(&fleet)));
    let mut typed = connect(&server, &format!("?device_id={}&device_prefix={}&type=gps&type=boot", q(&a), q(&fleet)));
    let mut one = connect(&server, &format!("?device_id={}&type=gps", q(&a)));
    let events: Vec<Value> =
        [&a, &b, &c, &in_fleet].iter().flat_map(|d| ["gps", "boot", "temp"].map(|t| ev(d, t))).collect();
    let marker = ev(&a, "gps");
    let got = received(&server, &mut devices, &events, &marker);
    assert_eq!(got, ids_where(&events, |d, _| d == a || d == b || d.starts_with(&fleet)));
    let got = received(&server, &mut typed, &[], &marker);
    let want = ids_where(&events, |d, t| (d == a || d.starts_with(&fleet)) && (t == "gps" || t == "boot"));
    assert_eq!(got, want, "(devices ∪ prefixes) × types");
    let got = received(&server, &mut one, &[], &marker);
    assert_eq!(got, ids_where(&events, |d, t| d == a && t == "gps"), "the single-filter form is unchanged");
}

#[test]
fn subscribe_and_unsubscribe_change_the_rooms_without_reconnecting() {
    let server = Ingestd::new().set("server.shards", 2).start();
    let (x, y, z) = (unique("x"), unique("y"), unique("z"));
    let mut ws = connect(&server, &format!("?device_id={x}"));
    let answer = ok(&mut ws, json!({"op": "subscribe", "id": 1, "devices": [y]}));
    assert_eq!(
        answer,
        json!({"op": "subscribe", "id": 1, "ok": true, "devices": 2, "prefixes": 0, "types": 0, "every_type": true})
    );
    let events = vec![ev(&x, "t"), ev(&y, "t"), ev(&z, "t"), ev(&y, "u")];
    let got = received(&server, &mut ws, &events, &ev(&x, "t"));
    assert_eq!(got, ids_where(&events, |d, _| d == x || d == y));
    // Leave y: after the answer, nothing of y arrives.
    let answer = ok(&mut ws, json!({"op": "unsubscribe", "id": "leave-y", "devices": [y]}));
    assert_eq!((answer["id"].clone(), answer["devices"].clone()), (json!("leave-y"), json!(1)));
    let later = vec![ev(&y, "t"), ev(&z, "t"), ev(&y, "t")];
    assert_eq!(received(&server, &mut ws, &later, &ev(&x, "t")), Vec::<String>::new());
    // Types narrow every room; every_type widens again.
    ok(&mut ws, json!({"op": "subscribe", "types": ["gps"]}));
    let mixed = vec![ev(&x, "gps"), ev(&x, "boot")];
    assert_eq!(received(&server, &mut ws, &mixed, &ev(&x, "gps")), ids_where(&mixed, |_, t| t == "gps"));
    ok(&mut ws, json!({"op": "subscribe", "every_type": true}));
    // (Fresh events: a re-sent one is not an event anew and is not pushed.)
    let mixed = vec![ev(&x, "gps"), ev(&x, "boot")];
    assert_eq!(received(&server, &mut ws, &mixed, &ev(&x, "t")), ids_where(&mixed, |_, _| true));
    // Leaving the last room leaves a socket that receives nothing, not everything.
    let answer = ok(&mut ws, json!({"op": "unsubscribe", "devices": [x]}));
    assert_eq!(answer["devices"], 0);
    let w = unique("w");
    ok(&mut ws, json!({"op": "subscribe", "devices": [w]}));
    let nothing = vec![ev(&x, "t"), ev(&z, "t")];
    assert_eq!(received(&server, &mut ws, &nothing, &ev(&w, "t")), Vec::<String>::new());
}

#[test]
fn a_socket_opened_for_everything_narrows_to_its_first_room_and_prefixes_work() {
    let server = Ingestd::new().start();
    let fleet = format!("{}/", unique("fleet"));
    let other = format!("{}/", unique("other"));
    let mut ws = connect(&server, "");
    let answer = ok(&mut ws, json!({"op": "subscribe", "prefixes": [fleet]}));
    assert_eq!((answer["devices"].clone(), answer["prefixes"].clone()), (json!(0), json!(1)));
    let events = vec![ev(&format!("{fleet}1"), "t"), ev(&format!("{other}1"), "t"), ev(&format!("{fleet}2"), "t")];
    let marker = ev(&format!("{fleet}m"), "t");
    assert_eq!(received(&server, &mut ws, &events, &marker), ids_where(&events, |d, _| d.starts_with(&fleet)));
    // The empty prefix is every device, named explicitly.
    ok(&mut ws, json!({"op": "subscribe", "prefixes": [""]}));
    let events = vec![ev(&format!("{fleet}1"), "t"), ev(&format!("{other}1"), "t")];
    let marker = ev(&format!("{fleet}m"), "t");
    assert_eq!(received(&server, &mut ws, &events, &marker), ids_where(&events, |_, _| true));
}

#[test]
fn bad_control_frames_are_answered_and_the_socket_goes_on() {
    let server = Ingestd::new().start();
    let room = unique("room");
    let mut ws = connect(&server, &format!("?device_id={room}"));
    for (frame, wanted) in [
        (r#"{"op":"subscribe","devices":["a"]"#, "not valid JSON"),
        (r#"{"op":"join","id":3}"#, "op must be \"subscribe\" or \"unsubscribe\""),
        (r#"{"op":"subscribe","devices":"a"}"#, "devices must be an array of strings"),
        (r#"{"op":"subscribe","devices":[7]}"#, "devices[0] must be a string"),
        (r#"{"op":"subscribe","devices":[""]}"#, "devices[0] must be 1-128 bytes"),
        (r#"{"op":"subscribe","types":[true]}"#, "types[0] must be a string"),
        (r#"{"op":"subscribe","room":"a"}"#, "unknown field `room`"),
        (r#"{"op":"unsubscribe","every_type":true}"#, "subscribe only"),
    ] {
        let error = refused(&mut ws, frame);
        assert!(error.contains(wanted), "{frame}: {error:?} does not say {wanted:?}");
    }
    ws.send(Message::Text(r#"{"op":"join","id":"q7"}"#.into())).unwrap();
    assert_eq!(next_json(&mut ws)["id"], "q7", "the id is echoed in an error too");
    // Nothing changed, and ingest frames still work; control frames are not in `seq`.
    let mine = ev(&room, "t");
    ws.send(Message::Text(mine.to_string().into())).unwrap();
    // The answer (after the commit report) and the pushed event (after the
    // broadcast) travel different paths from the writer: either may be first.
    let (first, second) = (next_json(&mut ws), next_json(&mut ws));
    let (answer, pushed) = if first.get("seq").is_some() { (first, second) } else { (second, first) };
    assert_eq!((answer["seq"].clone(), answer["accepted"].clone()), (json!(1), json!(1)), "{answer}");
    assert_eq!(pushed["event_id"], mine["event_id"], "its own event is pushed too");
    // An event that happens to carry an `op` field is an event, not a frame.
    let server = Ingestd::new().set("ingest.allow_unknown_fields", true).start();
    let mut ws = connect(&server, "?subscribe=false");
    let mut odd = ev(&room, "t");
    odd["op"] = json!("subscribe");
    ws.send(Message::Text(odd.to_string().into())).unwrap();
    let answer = next_json(&mut ws);
    assert_eq!((answer["seq"].clone(), answer["accepted"].clone()), (json!(1), json!(1)), "{answer}");
    assert_eq!(server.count_id(odd["event_id"].as_str().unwrap()), 1);
    // An ingest-only socket has no rooms to change.
    let error = refused(&mut ws, r#"{"op":"subscribe","devices":["a"]}"#);
    assert!(error.contains("subscribe=false"), "{error}");
}

#[test]
fn bounds_per_socket_are_enforced() {
    let server = Ingestd::new()
        .set("websocket.max_devices_per_socket", 3)
        .set("websocket.max_prefixes_per_socket", 1)
        .set("websocket.max_types_per_socket", 2)
        .set("websocket.max_control_frame_bytes", 300)
        .start();
    assert_eq!(try_connect(&server, "?device_id=a&device_id=b&device_id=c&device_id=d").err(), Some(400));
    assert_eq!(try_connect(&server, "?device_prefix=a&device_prefix=b").err(), Some(400));
    assert_eq!(try_connect(&server, "?snapshot=true").err(), Some(400), "no snapshot without [state]");
    let (a, b) = (unique("a"), unique("b"));
    let mut ws = connect(&server, &format!("?device_id={a}&device_id={b}"));
    let error = refused(&mut ws, &json!({"op": "subscribe", "devices": ["c", "d"]}).to_string());
    assert!(error.contains("websocket.max_devices_per_socket (3)"), "{error}");
    let error = refused(&mut ws, &json!({"op": "subscribe", "types": ["1", "2", "3"]}).to_string());
    assert!(error.contains("websocket.max_types_per_socket (2)"), "{error}");
    let long = json!({"op": "subscribe", "devices": ["x".repeat(120), "y".repeat(120), "z".repeat(120)]}).to_string();
    let error = refused(&mut ws, &long);
    assert!(error.contains("websocket.max_control_frame_bytes (300)"), "{error}");
    let error = refused(&mut ws, r#"{"op":"subscribe","snapshot":true}"#);
    assert!(error.contains("snapshot is not available") && error.contains("[state]"), "{error}");
    // A refused frame changed nothing: a and b still arrive, c never did.
    let events = vec![ev(&a, "t"), ev("c", "t"), ev(&b, "t")];
    assert_eq!(received(&server, &mut ws, &events, &ev(&a, "t")), ids_where(&events, |d, _| d == a || d == b));
    let answer = ok(&mut ws, json!({"op": "subscribe", "devices": ["c"]}));
    assert_eq!(answer["devices"], 3, "up to the bound is fine");
}

#[test]
fn a_tokens_device_prefix_bounds_every_room() {
    let token = secret_token("rooms");
    let config = format!(
        "[auth]\nmode = \"tokens\"\n\n[[auth.tokens]]\ntoken = \"{token}\"\nscopes = [\"ingest\", \"subscribe\"]\n\
         device_prefix = \"fleet-a/\"\nname = \"fleet-a\"\n"
    );
    let server = Ingestd::new().config_file(&temp_file("rooms-auth.toml", &config).display().to_string()).start();
    let q = |filters: &str| format!("?{filters}access_token={token}");
    assert_eq!(try_connect(&server, &q("device_prefix=fleet-b/&")).err(), Some(403));
    assert_eq!(try_connect(&server, &q("device_prefix=fleet-a/x/&device_prefix=fleet&")).err(), Some(403));
    assert_eq!(try_connect(&server, &q("device_id=fleet-a/1&device_id=fleet-b/1&")).err(), Some(403));
    let mut ws = connect(&server, &q(""));
    let error = refused(&mut ws, r#"{"op":"subscribe","devices":["fleet-a/1","fleet-b/1"]}"#);
    assert!(error.contains("devices[1]") && error.contains("fleet-a/"), "{error}");
    let error = refused(&mut ws, r#"{"op":"subscribe","prefixes":[""]}"#);
    assert!(error.contains("prefixes[0]"), "{error}");
    let a1 = format!("fleet-a/{}", unique("1"));
    ok(&mut ws, json!({"op": "subscribe", "devices": [a1]}));
    let send = |events: &[Value]| {
        let resp = server.send(&Req::post("/events/batch").json(&Value::Array(events.to_vec())).bearer(&token));
        assert_eq!(resp.status, 200, "{resp:?}");
    };
    let events = vec![ev(&a1, "t"), ev("fleet-a/2", "t"), ev(&a1, "u")];
    send(&events);
    let marker = ev(&a1, "m");
    send(std::slice::from_ref(&marker));
    let mut got = Vec::new();
    loop {
        let m = next_json(&mut ws);
        if m["event_id"] == marker["event_id"] {
            break;
        }
        got.push(m["event_id"].as_str().unwrap().to_string());
    }
    assert_eq!(got, ids_where(&events, |d, _| d == a1), "the default (the token's prefix) was replaced by the room");
}

#[test]
fn control_frames_keep_their_place_among_ingest_answers() {
    let server = Ingestd::new().start();
    let room = unique("room");
    let mut ws = connect(&server, "?device_id=nobody");
    let frames = [
        ev(&room, "t").to_string(),
        json!({"op": "subscribe", "id": "s", "devices": [room]}).to_string(),
        ev(&room, "t").to_string(),
        json!({"op": "unsubscribe", "id": "u", "devices": ["nobody"]}).to_string(),
    ];
    for f in &frames {
        ws.send(Message::Text(f.clone().into())).unwrap();
    }
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let m = next_json(&mut ws);
        if m.get("seq").is_some() || m.get("ok").is_some() {
            answers.push(m);
        }
    }
    let tags: Vec<Value> = answers.iter().map(|a| a.get("seq").cloned().unwrap_or_else(|| a["id"].clone())).collect();
    assert_eq!(tags, [json!(1), json!("s"), json!(2), json!("u")], "{answers:?}");
}
