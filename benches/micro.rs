//! Micro-benchmarks of the per-core stages, each printed with a reference
//! measured in the same run so that the ratio, not the absolute number, is
//! what travels between machines.
//!
//! `cargo bench --bench micro` times them. Under `cargo test` (no `--bench`
//! argument) each runs a few iterations as a smoke test and prints nothing
//! timed: benchmarks are never timed tests in CI.
//!
//! | stage | reference |
//! |---|---|
//! | parse + validate + COPY-encode a 100-event body | simd-json tape parse alone of the same body |
//! | COPY row encoding | `memcpy` of the same bytes |
//! | HTTP request head parsing (ingestd's `parse_head`) | bare `httparse` of the same head |
//! | ring hand-off (shard → writer thread) | the same with an unbounded channel |

// A tool: a panic here is a failed measurement, not a crashed appliance.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use ingestd::ingest::{BodyKind, Clock, Parser, Rules};
use ingestd::row::{RowBuf, RowFields};
use ingestd::shard::http::parse_head;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW_US: i64 = 1_780_000_000_000_000;

fn main() {
    let timed = std::env::args().any(|a| a == "--bench");
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let budget = if timed { Duration::from_secs(2) } else { Duration::ZERO };
    if run("parse") {
        parse(budget);
    }
    if run("copy") {
        copy_encoding(budget);
    }
    if run("http") {
        http_head(budget);
    }
    if run("ring") {
        ring_hand_off(timed);
    }
}

/// Runs `f` (which handles `per_call` items) for about `budget`; items/s.
fn rate(budget: Duration, per_call: u64, mut f: impl FnMut()) -> f64 {
    f(); // warm
    let start = Instant::now();
    let mut calls = 0u64;
    loop {
        f();
        calls += 1;
        if start.elapsed() >= budget {
            break;
        }
    }
    (calls * per_call) as f64 / start.elapsed().as_secs_f64()
}

fn report(name: &str, unit: &str, ours: f64, reference_name: &str, reference: f64, timed: bool) {
    if timed {
        println!(
            "{name:<34} {:>10.0} {unit}/s   reference ({reference_name}) {:>10.0} {unit}/s   ratio {:.2}",
            ours,
            reference,
            ours / reference
        );
    }
}

/// A 100-event batch like the load generator's: ~190-byte payloads.
pub fn sample_body(events: usize) -> Vec<u8> {
    let mut body = String::from("[");
    for i in 0..events {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#"{{"event_id":"bench-{i:08}-7f3a9c","device_id":"device-{:05}","type":"temperature","ts":1779999999000,"payload":{{"celsius":21.{i},"humidity":0.43,"battery":{{"volts":3.71,"pct":88}},"fw":"2.4.1","tags":["roof","north"],"seq":{i},"ok":true,"note":"sensor reading within range"}}}}"#,
            i % 10_000
        ));
    }
    body.push(']');
    body.into_bytes()
}

fn parse(budget: Duration) {
    let timed = !budget.is_zero();
    let body = sample_body(100);
    let mut parser = Parser::new(Rules {
        max_events: 10_000,
        max_payload_bytes: 65_536,
        max_payload_depth: 256,
        max_future_skew_us: 300_000_000,
        allow_unknown_fields: false,
    });
    let clock = Clock { now_unix_us: NOW_US };
    let check = parser.parse(&body, BodyKind::JsonArray, clock).expect("valid body");
    assert_eq!((check.rows.len(), check.rejected.len()), (100, 0));
    let ours = rate(budget, 100, || {
        black_box(parser.parse(black_box(&body), BodyKind::JsonArray, clock).ok());
    });
    let mut scratch = body.clone();
    let mut buffers = simd_json::Buffers::new(body.len());
    let reference = rate(budget, 100, || {
        scratch.copy_from_slice(&body);
        black_box(simd_json::to_tape_with_buffers(&mut scratch, &mut buffers).ok().map(|t| t.0.len()));
    });
    report("parse+validate+encode (100/body)", "events", ours, "simd-json tape only", reference, timed);
}

fn copy_encoding(budget: Duration) {
    let timed = !budget.is_zero();
    let payload = br#"{"celsius":21.5,"humidity":0.43,"battery":{"volts":3.71,"pct":88},"fw":"2.4.1","tags":["roof","north"],"seq":1,"ok":true}"#;
    let row = RowFields {
        event_id: b"bench-00000001-7f3a9c",
        device_id: "device-00001",
        event_type: "temperature",
        ts: 1,
        received_at: 2,
        payload: Some(payload),
    };
    let mut rows = RowBuf::with_capacity(256 * 1000, 1000);
    let ours = rate(budget, 1000, || {
        rows = RowBuf::with_capacity(256 * 1000, 1000);
        for _ in 0..1000 {
            rows.push(black_box(&row));
        }
        black_box(rows.bytes().len());
    });
    let one_row = {
        let mut r = RowBuf::default();
        r.push(&row);
        r.bytes().to_vec()
    };
    let reference = rate(budget, 1000, || {
        let mut out = Vec::with_capacity(256 * 1000);
        for _ in 0..1000 {
            out.extend_from_slice(black_box(&one_row));
        }
        black_box(out.len());
    });
    report("COPY row encoding", "rows", ours, "memcpy of encoded row", reference, timed);
}

fn http_head(budget: Duration) {
    let timed = !budget.is_zero();
    let head = b"POST /events/batch HTTP/1.1\r\nHost: ingest.example:8080\r\nUser-Agent: fleet-agent/2.4\r\nContent-Type: application/json\r\nContent-Length: 33000\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n";
    assert!(parse_head(head, 64, 16 * 1024).is_ok());
    let ours = rate(budget, 1, || {
        black_box(parse_head(black_box(head), 64, 16 * 1024).ok());
    });
    let reference = rate(budget, 1, || {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        black_box(req.parse(black_box(head)).ok());
    });
    report("HTTP head parse", "heads", ours, "bare httparse", reference, timed);
}

fn ring_hand_off(timed: bool) {
    let n: u64 = if timed { 2_000_000 } else { 1_000 };
    let measure = |bounded: bool| {
        let (tx, rx) = if bounded { crossbeam_channel::bounded::<u64>(1024) } else { crossbeam_channel::unbounded() };
        let consumer = std::thread::spawn(move || {
            let mut sum = 0u64;
            while let Ok(v) = rx.recv() {
                sum = sum.wrapping_add(v);
            }
            sum
        });
        let start = Instant::now();
        for i in 0..n {
            // What a shard does: try, and on a full ring answer 503 (here: spin).
            let mut v = i;
            loop {
                match tx.try_send(v) {
                    Ok(()) => break,
                    Err(e) => {
                        v = e.into_inner();
                        std::hint::spin_loop();
                    }
                }
            }
        }
        drop(tx);
        let _ = consumer.join();
        n as f64 / start.elapsed().as_secs_f64()
    };
    let ours = measure(true);
    let reference = measure(false);
    report("ring hand-off (bounded 1024)", "jobs", ours, "unbounded channel", reference, timed);
}
