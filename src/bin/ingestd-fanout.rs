//! `ingestd-fanout`: measures WebSocket fan-out of a running ingestd.
//!
//! Opens `--subscribers` real WebSocket subscribers (tungstenite clients, one
//! thread each), posts events at `--rate` events/s through `POST
//! /events/batch` for `--duration` seconds, and reports events delivered per
//! second (all subscribers together), the latency from ingestd receiving an
//! event (`received_at`) to a subscriber reading it, and ingestd's own
//! commit → frame-written latency from `/stats`. Used by `scripts/fanout.sh`.
//!
//! With `--rooms`, subscriber *i* opens a plain `/ws` and joins the room of
//! one device, `room-i`, with a control frame (`{"op":"subscribe",
//! "devices":["room-i"]}`, waiting for its answer); the events are spread
//! round-robin over those devices, so each event is delivered once, to the
//! one subscriber in its room.
//!
//! With `--addr` given several times (instances sharing one live feed,
//! issue 16's `[cluster] feed`), subscriber *i* connects to address *i* mod
//! *n*, and each address gets `--rate`/*n* events/s from an ingest thread of
//! its own: every subscriber should still receive every event (or, with
//! `--rooms`, the events of its room) wherever it was sent.
//!
//! `--watch NAME=PID` (repeatable) reports the CPU each of those processes
//! used during the ingest (cores, from `/proc/PID/stat`), e.g. each ingestd
//! and the bus server.
//!
//! ```text
//! ingestd-fanout --addr 127.0.0.1:8080 --subscribers 100 --rate 20000 --duration 10
//! ingestd-fanout --addr 127.0.0.1:8080 --subscribers 1000 --rate 20000 --duration 10 --rooms
//! ingestd-fanout --addr 127.0.0.1:8081 --addr 127.0.0.1:8082 --addr 127.0.0.1:8083 \
//!     --subscribers 300 --rate 3000 --watch redis=4242
//! ```

// A tool: a panic here is a failed measurement, not a crashed appliance.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

// The CPU readings of ingestd-load, shared rather than copied.
#[allow(dead_code)]
#[path = "ingestd-load/procstat.rs"]
mod procstat;

struct Args {
    /// One or more instances; subscribers and ingest are spread over them.
    addrs: Vec<String>,
    subscribers: usize,
    rate: u64,
    duration: Duration,
    batch: usize,
    filter: String,
    rooms: bool,
    /// `NAME=PID` of processes whose CPU is reported.
    watch: Vec<procstat::Watched>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        addrs: Vec::new(),
        subscribers: 100,
        rate: 10_000,
        duration: Duration::from_secs(10),
        batch: 100,
        filter: String::new(),
        rooms: false,
        watch: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addrs.push(value()?),
            "--subscribers" => a.subscribers = value()?.parse().map_err(|e| format!("--subscribers: {e}"))?,
            "--rate" => a.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--duration" => a.duration = Duration::from_secs(value()?.parse().map_err(|e| format!("--duration: {e}"))?),
            "--batch" => a.batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--filter" => a.filter = value()?,
            "--rooms" => a.rooms = true,
            "--watch" => a.watch.push(procstat::Watched::parse(&value()?, procstat::Scope::Process)?),
            "-h" | "--help" => {
                return Err("usage: ingestd-fanout --addr HOST:PORT [--addr HOST:PORT]... [--subscribers N] [--rate EVENTS_PER_S] [--duration S] [--batch N] [--filter 'device_id=x' | --rooms] [--watch NAME=PID]...".into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.rooms && !a.filter.is_empty() {
        return Err("--rooms and --filter do not go together".into());
    }
    if a.addrs.is_empty() {
        a.addrs.push("127.0.0.1:8080".into());
    }
    Ok(a)
}

/// Joins the room of `device` and waits for the answer.
fn join_room(ws: &mut tungstenite::WebSocket<TcpStream>, device: &str) -> Result<(), String> {
    let frame = serde_json::json!({"op": "subscribe", "devices": [device]}).to_string();
    ws.send(tungstenite::Message::Text(frame.into())).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let answer: serde_json::Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                if answer["ok"] == true {
                    return Ok(());
                }
                return Err(format!("refused: {answer}"));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("no answer within 30 s".into())
}

fn now_unix_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

fn parse_rfc3339_us(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_micros())
}

/// One blocking HTTP/1.1 POST on a kept-alive connection; returns the status.
fn post(conn: &mut BufReader<TcpStream>, addr: &str, body: &[u8]) -> std::io::Result<u16> {
    let head = format!(
        "POST /events/batch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // One write: head and body split over two segments would meet Nagle's
    // algorithm and the server's delayed ACK (≈ 40 ms per request).
    let mut request = Vec::with_capacity(head.len() + body.len());
    request.extend_from_slice(head.as_bytes());
    request.extend_from_slice(body);
    conn.get_mut().write_all(&request)?;
    let mut status_line = String::new();
    conn.read_line(&mut status_line)?;
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body)?;
    Ok(status)
}

fn get(addr: &str, path: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
}

/// What one ingest thread committed and had refused.
#[derive(Default)]
struct Sent {
    events: u64,
    refused: u64,
}

/// Posts `batch`-event batches to `addr` at `rate` events/s (open loop: one
/// batch every batch/rate seconds, whatever the answers) until `until`.
/// `seq` starts at `first` and steps by `step`, so that several threads
/// number their events apart (the room of an event is `seq` mod rooms).
fn ingest(args: &Args, addr: &str, rate: f64, first: u64, step: u64, started: Instant) -> Sent {
    let ingest = TcpStream::connect(addr).expect("connect for ingest");
    let _ = ingest.set_nodelay(true);
    let mut conn = BufReader::new(ingest);
    let interval = Duration::from_secs_f64(args.batch as f64 / rate.max(0.001));
    let mut next = started;
    let mut sent = Sent::default();
    let mut seq = first;
    let device = args.filter.strip_prefix("device_id=").unwrap_or("fanout").to_string();
    while started.elapsed() < args.duration {
        let mut body = Vec::with_capacity(args.batch * 200);
        body.push(b'[');
        let ts = now_unix_us() / 1000;
        for i in 0..args.batch {
            if i > 0 {
                body.push(b',');
            }
            seq += step;
            let room = args.rooms.then(|| format!("room-{}", seq % args.subscribers as u64));
            let device = room.as_deref().unwrap_or(&device);
            let _ = write!(
                body,
                r#"{{"device_id":"{device}","type":"fanout","ts":{ts},"payload":{{"seq":{seq},"v":21.5,"note":"fan-out measurement"}}}}"#
            );
        }
        body.push(b']');
        match post(&mut conn, addr, &body) {
            Ok(200) => sent.events += args.batch as u64,
            Ok(_) => sent.refused += 1,
            Err(e) => {
                eprintln!("ingest {addr}: {e}");
                break;
            }
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    sent
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(64);
        }
    };
    let args = Arc::new(args);
    let query = if args.filter.is_empty() { String::new() } else { format!("?{}", args.filter) };
    let delivered = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds")));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..args.subscribers {
        let addr = &args.addrs[i % args.addrs.len()];
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("subscriber {i}: connect {addr}: {e}");
                std::process::exit(1);
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let url = format!("ws://{addr}/ws{query}");
        let mut ws = match tungstenite::client(url.as_str(), stream) {
            Ok((ws, _)) => ws,
            Err(e) => {
                eprintln!("subscriber {i}: upgrade: {e}");
                std::process::exit(1);
            }
        };
        if args.rooms
            && let Err(e) = join_room(&mut ws, &format!("room-{i}"))
        {
            eprintln!("subscriber {i}: subscribe: {e}");
            std::process::exit(1);
        }
        let (delivered, latency, stop) = (delivered.clone(), latency.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            while !stop.load(Ordering::Relaxed) {
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        let now = now_unix_us();
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str())
                            && let Some(at) = v["received_at"].as_str().and_then(parse_rfc3339_us)
                        {
                            local.saturating_record((now - at).max(1) as u64);
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
            let _ = latency.lock().add(&local);
        }));
    }
    // One ingest thread per address, each with its share of the rate.
    let n = args.addrs.len();
    let watched: Vec<Option<procstat::Reading>> = args.watch.iter().map(procstat::Watched::read).collect();
    let started = Instant::now();
    let senders: Vec<_> = (0..n)
        .map(|k| {
            let args = args.clone();
            std::thread::spawn(move || {
                ingest(&args, &args.addrs[k], args.rate as f64 / n as f64, k as u64, n as u64, started)
            })
        })
        .collect();
    let sent: Vec<Sent> = senders.into_iter().map(|t| t.join().expect("ingest thread")).collect();
    let ingest_elapsed = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let cpu_secs = started.elapsed().as_secs_f64();
    let cpu: serde_json::Map<String, serde_json::Value> = args
        .watch
        .iter()
        .zip(&watched)
        .map(|(w, before)| {
            let cores = match (before, w.read()) {
                (Some(b), Some(a)) => serde_json::json!((procstat::cores(b, &a, cpu_secs) * 1000.0).round() / 1000.0),
                _ => serde_json::Value::Null,
            };
            (w.name.clone(), cores)
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    let h = latency.lock();
    let delivered = delivered.load(Ordering::Relaxed);
    let (sent, refused) = sent.iter().fold((0, 0), |(e, r), s| (e + s.events, r + s.refused));
    // In rooms, each event has one subscriber.
    let expected = if args.rooms { sent } else { sent * args.subscribers as u64 };
    let servers: Vec<serde_json::Value> = args.addrs.iter().map(|a| get(a, "/stats").unwrap_or_default()).collect();
    let sum = |key: &str| servers.iter().filter_map(|s| s[key].as_u64()).sum::<u64>();
    let mut result = serde_json::json!({
        "instances": n,
        "subscribers": args.subscribers,
        "filter": args.filter,
        "rooms": args.rooms,
        "events_committed": sent,
        "requests_refused": refused,
        "ingest_events_per_s": sent as f64 / ingest_elapsed.as_secs_f64(),
        "delivered": delivered,
        "delivered_expected": expected,
        "delivered_per_s": delivered as f64 / ingest_elapsed.as_secs_f64(),
        "received_to_delivered_ms": {
            "p50": h.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": h.value_at_quantile(0.99) as f64 / 1000.0,
            "p999": h.value_at_quantile(0.999) as f64 / 1000.0,
            "max": h.max() as f64 / 1000.0,
        },
        "server_commit_to_frame_ms": servers[0]["ws_fanout_latency_ms"],
        "server_ws_dropped": sum("ws_dropped"),
        "server_ws_slow_closes": sum("ws_slow_closes"),
    });
    if n > 1 {
        // Per instance: its own latency figures, and what /health says of the feed.
        result["server_commit_to_frame_ms"] =
            servers.iter().map(|s| s["ws_fanout_latency_ms"].clone()).collect::<Vec<_>>().into();
        result["cluster"] = args
            .addrs
            .iter()
            .map(|a| get(a, "/health").map(|h| h["cluster"].clone()).unwrap_or_default())
            .collect::<Vec<_>>()
            .into();
    }
    if !cpu.is_empty() {
        result["cpu_cores"] = cpu.into();
    }
    println!("{}", serde_json::to_string_pretty(&result).unwrap_or_default());
}
