//! `copy-baseline`: the reference ingestd is measured against.
//!
//! The same generator as the HTTP load makes the events; ingestd's own
//! [`Parser`] turns them into binary COPY tuples (so the rows are
//! byte-identical to what ingestd writes), all before the clock starts. Then
//! `connections` threads each COPY their share, `batch_rows` rows per
//! transaction (binary COPY with ingestd's own header, trailer and column
//! list), into a freshly created table with the SPEC schema (text primary
//! key), as ingestd creates it.
//!
//! With `--event-rate` it is an open-loop reference for latency instead:
//! bodies "arrive" on a fixed schedule, a free connection takes every body
//! that has arrived (up to `batch_rows` rows) into one COPY transaction, and
//! each body's latency is measured from its scheduled arrival to the COMMIT.
//! That is what ingestd's writers do, minus HTTP, parsing and ingestd's own
//! CPU: the ack latency floor the database and the machine allow at that rate.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ingestd::config::DatabaseConfig;
use ingestd::ingest::{BodyKind, Clock, Parser, Rules};
use ingestd::row::{COLUMNS, HEADER, TRAILER};
use ingestd::writer::{connect::Access, db};
use serde_json::{Value, json};

use crate::events::{GenConfig, Generator};
use crate::load::{fmt_int, latency_json, new_hist, q_ms, round3};
use crate::procstat::{self, Watched};
use crate::report;

pub struct BaselineConfig {
    pub url: String,
    pub table: String,
    pub connections: usize,
    pub batch_rows: usize,
    /// Open loop: bodies arrive at this many events/s (closed loop: `None`).
    pub event_rate: Option<f64>,
    /// Event id streams (like HTTP connections of the load), at least `connections`.
    pub streams: usize,
    /// Events per generated body (the load's batch size).
    pub body_events: usize,
    pub rows: u64,
    pub duration_s: Option<f64>,
    /// Seconds copied first and left out of the rate (whole seconds).
    pub warmup_s: u64,
    pub drop_after: bool,
    pub events: GenConfig,
    pub watch: Vec<Watched>,
    pub out: Option<PathBuf>,
}

impl BaselineConfig {
    fn to_json(&self) -> Value {
        json!({
            "database_url": ingestd::config::mask_password(&self.url),
            "table": self.table,
            "connections": self.connections,
            "batch_rows": self.batch_rows,
            "event_rate": self.event_rate,
            "streams": self.streams.max(self.connections),
            "body_events": self.body_events,
            "rows": self.rows,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "drop_after": self.drop_after,
            "ids": self.events.ids.name(),
            "devices": self.events.devices,
            "run_id": self.events.run_id,
            "format": "binary COPY, one transaction per batch (BEGIN; COPY ... FROM STDIN (FORMAT binary); COMMIT)",
        })
    }
}

fn db_config(url: &str) -> DatabaseConfig {
    DatabaseConfig { url: url.to_string(), statement_timeout_ms: 600_000, ..DatabaseConfig::default() }
}

/// A connection as ingestd's writers open one: the URL's TLS parameters
/// (`sslmode`, `sslrootcert`, …) and `PGPASSWORD` mean the same here.
fn connect(url: &str) -> Result<postgres::Client, String> {
    let db = db_config(url);
    let config = db::pg_config(&db).map_err(|e| format!("bad database URL: {e}"))?;
    let access = Access::load(&db).map_err(|problems| {
        let why: Vec<String> = problems.into_iter().map(|(key, why)| format!("{key}: {why}")).collect();
        format!("bad database URL: {}", why.join("; "))
    })?;
    access.connect(&config).map_err(|e| format!("cannot connect to PostgreSQL: {}", access.describe(&e)))
}

/// The parser rules of ingestd's default configuration (as a shard builds them).
fn default_rules() -> Rules {
    Rules::from_config(&ingestd::config::IngestConfig::default())
}

/// Raw binary COPY of pre-encoded tuples in one transaction: what ingestd's
/// writers do on their fast path, without their de-duplication.
fn copy_rows(client: &mut postgres::Client, statement: &str, tuples: &[u8]) -> Result<u64, postgres::Error> {
    let mut tx = client.transaction()?;
    let mut w = tx.copy_in(statement)?;
    // A write error is the connection failing; `finish` reports it as a postgres::Error.
    let _ = w.write_all(HEADER).and_then(|()| w.write_all(tuples)).and_then(|()| w.write_all(TRAILER));
    let n = w.finish()?;
    tx.commit()?;
    Ok(n)
}

/// One connection's pre-encoded batches: (tuple bytes, rows).
type Batches = Vec<(Vec<u8>, u64)>;

/// What a COPY thread measured.
struct CopyThread {
    /// Per COPY transaction.
    batch: hdrhistogram::Histogram<u64>,
    /// Open loop: per body, from its arrival to its commit (after the warm-up).
    ack: hdrhistogram::Histogram<u64>,
    batches: u64,
    end: Instant,
}

fn record(hist: &mut hdrhistogram::Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, hist.high());
    hist.record(us).expect("clamped");
}

/// The open-loop arrival schedule the COPY threads share.
struct Schedule {
    bodies: Vec<(Vec<u8>, u64)>,
    /// Bodies arriving per second.
    per_s: f64,
    /// Bodies taken by some thread so far (the next one to take).
    taken: AtomicU64,
    /// Bodies per COPY at most (`batch_rows` / `body_events`).
    max_bodies: u64,
    warmup: Duration,
}

impl Schedule {
    fn arrival(&self, start: Instant, k: u64) -> Instant {
        start + Duration::from_secs_f64(k as f64 / self.per_s)
    }

    /// One connection: take every body that has arrived, COPY it, repeat.
    fn run(
        &self,
        client: &mut postgres::Client,
        copy_sql: &str,
        start: Instant,
        stop: &AtomicBool,
        rows_done: &AtomicU64,
    ) -> Result<CopyThread, String> {
        let (mut batch, mut ack) = (new_hist(), new_hist());
        let mut batches = 0;
        let mut tuples = Vec::new();
        let total = self.bodies.len() as u64;
        while !stop.load(Ordering::Relaxed) {
            let first = self.taken.load(Ordering::Acquire);
            if first >= total {
                break;
            }
            let now = Instant::now();
            let arrived = ((now.duration_since(start).as_secs_f64() * self.per_s) as u64 + 1).min(total);
            if arrived <= first {
                std::thread::sleep(self.arrival(start, first).saturating_duration_since(now));
                continue;
            }
            let last = arrived.min(first + self.max_bodies);
            if self.taken.compare_exchange(first, last, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            tuples.clear();
            let mut rows = 0;
            for (bytes, n) in &self.bodies[first as usize..last as usize] {
                tuples.extend_from_slice(bytes);
                rows += n;
            }
            let t = Instant::now();
            copy_rows(client, copy_sql, &tuples).map_err(|e| format!("COPY failed: {e}"))?;
            let end = Instant::now();
            record(&mut batch, end - t);
            batches += 1;
            rows_done.fetch_add(rows, Ordering::Relaxed);
            for k in first..last {
                let arrived_at = self.arrival(start, k);
                if arrived_at >= start + self.warmup {
                    record(&mut ack, end.saturating_duration_since(arrived_at));
                }
            }
        }
        Ok(CopyThread { batch, ack, batches, end: Instant::now() })
    }
}

/// Rows for one COPY connection: bodies of `body_events` events taken in turn
/// from the generators of `streams` (as if from that many HTTP connections),
/// encoded by ingestd's parser, cut into batches of `batch_rows`.
fn generate(
    events: &GenConfig,
    streams: &[u32],
    rows: u64,
    batch_rows: usize,
    body_events: usize,
) -> Result<Batches, String> {
    let mut generators: Vec<Generator> = streams.iter().map(|&s| Generator::new(events, s)).collect();
    let mut turn = 0;
    let mut parser = Parser::new(default_rules());
    let mut body = Vec::new();
    let mut batches = Vec::new();
    let mut left = rows;
    while left > 0 {
        let in_batch = left.min(batch_rows as u64);
        let mut bytes = Vec::with_capacity(in_batch as usize * 300);
        let mut done = 0u64;
        while done < in_batch {
            let n = (in_batch - done).min(body_events as u64) as usize;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
            generators[turn].batch(n, now.as_millis() as u64, &mut body);
            turn = (turn + 1) % generators.len();
            let parsed = parser
                .parse(&body, BodyKind::JsonArray, Clock { now_unix_us: now.as_micros() as i64 })
                .map_err(|e| format!("ingestd's parser refused a generated body: {e}"))?;
            if let Some(r) = parsed.rejected.first() {
                return Err(format!("ingestd's parser rejected a generated event: {r:?}"));
            }
            bytes.extend_from_slice(parsed.rows.bytes());
            done += parsed.rows.len() as u64;
        }
        left -= done;
        batches.push((bytes, done));
    }
    Ok(batches)
}

pub fn run(cfg: &BaselineConfig) -> Result<Value, String> {
    let w = cfg.connections.max(1);
    let table = db::quote_table(&cfg.table);
    let mut control = connect(&cfg.url)?;
    control
        .batch_execute(&format!(
            "SET client_min_messages = warning; DROP TABLE IF EXISTS {table}; {}; RESET client_min_messages",
            db::create_table_sql(&table)
        ))
        .map_err(|e| format!("re-creating {table}: {e}"))?;

    // Pre-generate every connection's rows, in parallel, before the clock starts.
    let t_gen = Instant::now();
    eprintln!("copy-baseline: encoding {} rows with ingestd's parser ...", fmt_int(cfg.rows as f64));
    let shares: Vec<u64> = (0..w as u64).map(|i| cfg.rows / w as u64 + u64::from(i < cfg.rows % w as u64)).collect();
    // Connection i takes streams i, i + w, i + 2w, ...: `streams` insertion
    // points in the primary key in all, like that many HTTP clients.
    let streams = cfg.streams.max(w);
    let stream_sets: Vec<Vec<u32>> = (0..w).map(|i| (i..streams).step_by(w).map(|s| s as u32).collect()).collect();
    let generated: Vec<Result<Batches, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = shares
            .iter()
            .enumerate()
            .map(|(i, &rows)| {
                let events = &cfg.events;
                let body_events = cfg.body_events;
                let batch_rows = if cfg.event_rate.is_some() { body_events } else { cfg.batch_rows };
                let set = &stream_sets[i];
                s.spawn(move || generate(events, set, rows, batch_rows, body_events))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("generator panicked".into()))).collect()
    });
    let mut per_conn = Vec::with_capacity(w);
    for g in generated {
        per_conn.push(g?);
    }
    let bytes: usize = per_conn.iter().flatten().map(|(b, _)| b.len()).sum();
    let generate_s = t_gen.elapsed().as_secs_f64();
    eprintln!(
        "copy-baseline: {} rows, {:.0} MiB of COPY tuples ({:.0} bytes/row) encoded in {:.1} s",
        fmt_int(cfg.rows as f64),
        bytes as f64 / 1048576.0,
        bytes as f64 / cfg.rows.max(1) as f64,
        generate_s
    );

    let mut clients = Vec::with_capacity(w);
    for _ in 0..w {
        clients.push(connect(&cfg.url)?);
    }
    let barrier = Arc::new(Barrier::new(w + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let rows_done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let copy_sql = format!("COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)");
    let mut handles = Vec::new();
    match cfg.event_rate {
        None => {
            for (mut client, batches) in clients.into_iter().zip(per_conn) {
                let (barrier, stop, rows_done, finished) =
                    (barrier.clone(), stop.clone(), rows_done.clone(), finished.clone());
                let copy_sql = copy_sql.clone();
                handles.push(std::thread::spawn(move || -> Result<CopyThread, String> {
                    let mut hist = new_hist();
                    let mut n = 0u64;
                    barrier.wait();
                    let result = (|| {
                        for (bytes, rows) in &batches {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let t = Instant::now();
                            copy_rows(&mut client, &copy_sql, bytes).map_err(|e| format!("COPY failed: {e}"))?;
                            record(&mut hist, t.elapsed());
                            n += 1;
                            rows_done.fetch_add(*rows, Ordering::Relaxed);
                        }
                        Ok(())
                    })();
                    let end = Instant::now();
                    finished.fetch_add(1, Ordering::Relaxed);
                    result.map(|()| CopyThread { batch: hist, ack: new_hist(), batches: n, end })
                }));
            }
        }
        Some(event_rate) => {
            // One arrival schedule for all connections: body k arrives at
            // start + k / rate, taken in turn from every connection's share.
            let longest = per_conn.iter().map(Vec::len).max().unwrap_or(0);
            let mut bodies = Vec::with_capacity(per_conn.iter().map(Vec::len).sum());
            let mut lists: Vec<_> = per_conn.into_iter().map(Vec::into_iter).collect();
            for _ in 0..longest {
                bodies.extend(lists.iter_mut().filter_map(Iterator::next));
            }
            let schedule = Arc::new(Schedule {
                bodies,
                per_s: event_rate / cfg.body_events as f64,
                taken: AtomicU64::new(0),
                max_bodies: cfg.batch_rows.div_ceil(cfg.body_events).max(1) as u64,
                warmup: Duration::from_secs(cfg.warmup_s),
            });
            for mut client in clients {
                let (barrier, stop, rows_done, finished, schedule) =
                    (barrier.clone(), stop.clone(), rows_done.clone(), finished.clone(), schedule.clone());
                let copy_sql = copy_sql.clone();
                handles.push(std::thread::spawn(move || -> Result<CopyThread, String> {
                    barrier.wait();
                    let start = Instant::now();
                    let result = schedule.run(&mut client, &copy_sql, start, &stop, &rows_done);
                    finished.fetch_add(1, Ordering::Relaxed);
                    result
                }));
            }
        }
    }

    let mut watch = cfg.watch.clone();
    watch.push(Watched::this_process("ingestd-load"));
    watch.push(Watched::machine());
    let first = watch.iter().map(Watched::read).collect::<Vec<_>>();
    barrier.wait();
    let start = Instant::now();
    let mut prev = first.clone();
    let mut prev_rows = 0;
    let mut prev_t = start;
    let mut timeline = Vec::new();
    let mut tick = 0u64;
    // The measured window starts after the warm-up.
    let mut window = (start, 0u64, first.clone());
    while finished.load(Ordering::Relaxed) < w {
        tick += 1;
        let target = start + Duration::from_secs(tick);
        while Instant::now() < target && finished.load(Ordering::Relaxed) < w {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(d) = cfg.duration_s
            && start.elapsed().as_secs_f64() >= d + cfg.warmup_s as f64
        {
            stop.store(true, Ordering::Relaxed);
        }
        let now = Instant::now();
        let dt = now.duration_since(prev_t).as_secs_f64();
        let done = rows_done.load(Ordering::Relaxed);
        let readings = watch.iter().map(Watched::read).collect::<Vec<_>>();
        let mut cpu = serde_json::Map::new();
        let mut text = String::new();
        for (i, wd) in watch.iter().enumerate() {
            if let (Some(a), Some(b)) = (&prev[i], &readings[i]) {
                let c = procstat::cores(a, b, dt);
                cpu.insert(wd.name.clone(), json!(round3(c)));
                text.push_str(&format!(" {} {c:.2}", wd.name));
            }
        }
        let rate = (done - prev_rows) as f64 / dt.max(1e-9);
        eprintln!(
            "copy-baseline [{tick:>4}s] {:>9} rows/s  total {:>10}  cpu{text}",
            fmt_int(rate),
            fmt_int(done as f64)
        );
        let measuring = tick > cfg.warmup_s;
        timeline.push(json!({
            "t": round3(now.duration_since(start).as_secs_f64()),
            "phase": if measuring { "measure" } else { "warmup" },
            "rows_per_s": round3(rate),
            "cpu_cores": cpu,
        }));
        if tick == cfg.warmup_s && finished.load(Ordering::Relaxed) < w {
            window = (now, done, readings.clone());
        }
        prev = readings;
        prev_rows = done;
        prev_t = now;
    }
    let mut hist = new_hist();
    let mut ack = new_hist();
    let mut batches = 0;
    let mut last_end = start;
    for h in handles {
        let t = h.join().map_err(|_| "a COPY thread panicked".to_string())??;
        hist.add(&t.batch).expect("same bounds");
        ack.add(&t.ack).expect("same bounds");
        batches += t.batches;
        last_end = last_end.max(t.end);
    }
    let end_readings = watch.iter().map(Watched::read).collect::<Vec<_>>();
    let rows = rows_done.load(Ordering::Relaxed);
    let (window_start, rows_before, first) = window;
    if cfg.warmup_s > 0 && window_start == start {
        eprintln!("copy-baseline: WARNING: the rows ran out during the warm-up; the rate covers the whole run");
    }
    let elapsed = last_end.duration_since(window_start).as_secs_f64();
    let measured_rows = rows - rows_before;
    let rows_per_s = measured_rows as f64 / elapsed.max(1e-9);
    let ran_out =
        cfg.duration_s.is_some_and(|d| last_end.duration_since(start).as_secs_f64() < d + cfg.warmup_s as f64 - 0.5);
    if ran_out {
        eprintln!(
            "copy-baseline: WARNING: all {} pre-generated rows were copied before --duration ended; pass more --rows",
            cfg.rows
        );
    }
    let counted: i64 =
        control.query_one(&format!("SELECT count(*) FROM {table}"), &[]).map_err(|e| format!("count(*): {e}"))?.get(0);
    let mut processes = serde_json::Map::new();
    let mut cpu_text = Vec::new();
    for (i, wd) in watch.iter().enumerate() {
        if let (Some(a), Some(b)) = (&first[i], &end_readings[i]) {
            let c = procstat::cores(a, b, elapsed);
            processes.insert(
                wd.name.clone(),
                json!({"cores_avg": round3(c), "rss_mib": round3(b.rss_kib as f64 / 1024.0), "cpu_us_per_row": round3(c * 1e6 / rows_per_s.max(1e-9))}),
            );
            if wd.name == "machine" {
                cpu_text.push(format!("whole machine busy {c:.2} cores"));
            } else {
                cpu_text.push(format!("{} {c:.2} cores ({:.2} µs/row)", wd.name, c * 1e6 / rows_per_s.max(1e-9)));
            }
        }
    }
    if cfg.drop_after {
        control.batch_execute(&format!("DROP TABLE {table}")).map_err(|e| format!("DROP TABLE: {e}"))?;
    }

    println!(
        "copy-baseline: {} rows in {:.2} s{} = {} rows/s  ({} connections × {} rows per COPY transaction, binary COPY into {}{})",
        fmt_int(measured_rows as f64),
        elapsed,
        if rows_before > 0 {
            format!(" (after {} s / {} rows of warm-up)", cfg.warmup_s, fmt_int(rows_before as f64))
        } else {
            String::new()
        },
        fmt_int(rows_per_s),
        w,
        cfg.batch_rows,
        table,
        if cfg.drop_after { ", dropped afterwards" } else { "" }
    );
    println!(
        "  per COPY transaction: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms; count(*) = {}",
        q_ms(&hist, 0.5),
        q_ms(&hist, 0.99),
        hist.max() as f64 / 1000.0,
        fmt_int(counted as f64)
    );
    if let Some(rate) = cfg.event_rate {
        println!(
            "  open loop at {} events/s: latency from arrival to COMMIT p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms; {:.0} rows per COPY on average",
            fmt_int(rate),
            q_ms(&ack, 0.5),
            q_ms(&ack, 0.99),
            q_ms(&ack, 0.999),
            ack.max() as f64 / 1000.0,
            rows as f64 / batches.max(1) as f64
        );
    }
    println!("  processes: {}", cpu_text.join("; "));
    if counted as u64 != rows {
        println!("  WARNING: count(*) {counted} differs from the rows copied ({rows})");
    }

    let mut m = report::envelope("copy-baseline");
    m.insert("config".into(), cfg.to_json());
    m.insert(
        "totals".into(),
        json!({
            "rows": rows,
            "rows_measured": measured_rows,
            "rows_in_warmup": rows_before,
            "ran_out_of_rows": ran_out,
            "rows_counted": counted,
            "batches": batches,
            "elapsed_s": round3(elapsed),
            "rows_per_s": round3(rows_per_s),
            "encoded_bytes": bytes,
            "generate_s": round3(generate_s),
        }),
    );
    m.insert("batch_latency_ms".into(), latency_json(&hist));
    if cfg.event_rate.is_some() {
        m.insert("ack_latency_ms".into(), latency_json(&ack));
    }
    m.insert("processes".into(), Value::Object(processes));
    m.insert("timeline".into(), Value::Array(timeline));
    m.insert("note".into(), json!(report::two_core_note()));
    let v = Value::Object(m);
    if let Some(dir) = &cfg.out {
        report::write_json(dir, "result.json", &v)?;
    }
    Ok(v)
}
