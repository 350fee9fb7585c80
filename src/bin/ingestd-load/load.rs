//! The load loops: closed loop (N connections, each sending back to back)
//! and open loop (a fixed request rate spread over N connections, latency
//! measured from each request's *intended* send time, so that a server that
//! stalls is charged for every request that could not be sent meanwhile:
//! coordinated omission is corrected), plus the sweep over several rates.
//!
//! Each worker thread owns one [`Transport`] and one [`Generator`], and
//! records into its own `Mutex<Interval>` (uncontended: the reporter takes it
//! once a second). The reporter (the calling thread) turns each second into a
//! timeline entry, prints the progress line and samples CPU and memory of the
//! watched processes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::client::{HttpClient, HttpTarget, Transport, WsClient};
use crate::events::{BodyInfo, DupMode, GenConfig, Generator};
use crate::procstat::{self, Reading, Watched};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /events/batch` with `batch_size` events.
    Batch,
    /// `POST /events` with one event.
    Single,
    /// `GET /ws`, then one text frame per request holding `batch_size` events
    /// (an array; one object when `batch_size` is 1).
    Ws,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Batch => "/events/batch",
            Route::Single => "/events",
            // A filter no generated event matches: ingest only, no pushes.
            Route::Ws => "/ws?device_id=ingestd-load-subscribes-to-nothing",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Route::Batch => "batch",
            Route::Single => "single",
            Route::Ws => "ws",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Loop {
    Closed {
        concurrency: usize,
    },
    /// `rate` requests per second in total.
    Open {
        rate: f64,
        connections: usize,
    },
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: String,
    pub route: Route,
    pub batch_size: usize,
    pub mode: Loop,
    pub warmup_s: u64,
    pub duration_s: u64,
    pub events: GenConfig,
    pub timeout: Duration,
    pub watch: Vec<Watched>,
    /// Prefix of progress lines (the sweep step).
    pub label: String,
    /// Closed loop: how long a connection waits after a 503 before its next
    /// request (a device that backs off). Zero: at once.
    pub pause_after_503: Duration,
}

impl LoadConfig {
    pub fn events_per_request(&self) -> usize {
        match self.route {
            Route::Batch | Route::Ws => self.batch_size,
            Route::Single => 1,
        }
    }

    pub fn connections(&self) -> usize {
        match self.mode {
            Loop::Closed { concurrency } => concurrency,
            Loop::Open { connections, .. } => connections,
        }
    }

    pub fn to_json(&self) -> Value {
        let (mode, rate) = match self.mode {
            Loop::Closed { .. } => ("closed", Value::Null),
            Loop::Open { rate, .. } => ("open", json!(rate)),
        };
        json!({
            "url": self.url,
            "route": self.route.name(),
            "path": self.route.path(),
            "batch_size": self.events_per_request(),
            "loop": mode,
            "connections": self.connections(),
            "rate_requests_per_s": rate,
            "rate_events_per_s": rate.as_f64().map(|r| r * self.events_per_request() as f64),
            "warmup_s": self.warmup_s,
            "duration_s": self.duration_s,
            "duplicates_percent": self.events.dup_percent,
            "dup_mode": self.events.dup_mode.name(),
            "dup_window": self.events.dup_window,
            "ids": self.events.ids.name(),
            "devices": self.events.devices,
            "run_id": self.events.run_id,
            "timeout_s": self.timeout.as_secs_f64(),
            "pause_after_503_ms": self.pause_after_503.as_secs_f64() * 1000.0,
        })
    }
}

/// Counters of one interval or of a whole run.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub requests: u64,
    pub status: BTreeMap<u16, u64>,
    /// Transport failures (connect, reset, timeout, malformed answer).
    pub errors: u64,
    pub events_sent: u64,
    /// Sum of `accepted` over 2xx answers.
    pub events_acked: u64,
    pub dups_sent: u64,
    /// Deliberate duplicates inside acknowledged requests.
    pub dups_acked: u64,
    pub bytes_sent: u64,
    /// Open loop: requests scheduled before the end that were never sent
    /// because the server (or the client) fell behind; each is recorded in
    /// the latency histogram with the time it had waited when the run ended.
    pub not_sent: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.requests += o.requests;
        for (k, v) in &o.status {
            *self.status.entry(*k).or_default() += v;
        }
        self.errors += o.errors;
        self.events_sent += o.events_sent;
        self.events_acked += o.events_acked;
        self.dups_sent += o.dups_sent;
        self.dups_acked += o.dups_acked;
        self.bytes_sent += o.bytes_sent;
        self.not_sent += o.not_sent;
    }

    fn subtract(&mut self, o: &Counts) {
        self.requests -= o.requests;
        for (k, v) in &o.status {
            *self.status.entry(*k).or_default() -= v;
        }
        self.errors -= o.errors;
        self.events_sent -= o.events_sent;
        self.events_acked -= o.events_acked;
        self.dups_sent -= o.dups_sent;
        self.dups_acked -= o.dups_acked;
        self.bytes_sent -= o.bytes_sent;
        self.not_sent -= o.not_sent;
    }

    pub fn status(&self, code: u16) -> u64 {
        self.status.get(&code).copied().unwrap_or(0)
    }

    pub fn non_2xx_other(&self) -> u64 {
        self.status.iter().filter(|(k, _)| !matches!(**k, 200 | 202 | 503)).map(|(_, v)| v).sum()
    }

    fn to_json(&self) -> Value {
        let status: serde_json::Map<String, Value> =
            self.status.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        json!({
            "requests": self.requests,
            "status": status,
            "errors": self.errors,
            "events_sent": self.events_sent,
            "events_acked": self.events_acked,
            "duplicates_sent": self.dups_sent,
            "duplicates_acked": self.dups_acked,
            "unique_events_acked": self.events_acked.saturating_sub(self.dups_acked),
            "bytes_sent": self.bytes_sent,
            "not_sent": self.not_sent,
        })
    }
}

/// Latency histogram in microseconds, 1 µs to 1 h, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, h.high());
    h.record(us).expect("clamped into range");
}

pub fn q_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 }
}

pub fn latency_json(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "mean": round3(if h.is_empty() { 0.0 } else { h.mean() / 1000.0 }),
        "p50": round3(q_ms(h, 0.50)),
        "p90": round3(q_ms(h, 0.90)),
        "p99": round3(q_ms(h, 0.99)),
        "p999": round3(q_ms(h, 0.999)),
        "max": round3(if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 }),
    })
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

struct Interval {
    counts: Counts,
    /// Latency of 2xx answers (and, open loop, of requests never sent).
    hist: Histogram<u64>,
    /// Latency of 503 answers: how fast ingestd turns load away.
    hist_503: Histogram<u64>,
}

impl Interval {
    fn new() -> Self {
        Self { counts: Counts::default(), hist: new_hist(), hist_503: new_hist() }
    }

    fn drain_into(&mut self, into: &mut Interval) {
        into.counts.add(&self.counts);
        into.hist.add(&self.hist).expect("same bounds");
        into.hist_503.add(&self.hist_503).expect("same bounds");
        self.reset();
    }

    fn reset(&mut self) {
        self.counts = Counts::default();
        self.hist.reset();
        self.hist_503.reset();
    }
}

struct Shared {
    stop: AtomicBool,
    slots: Vec<Mutex<Interval>>,
    /// The first few distinct transport errors, for the summary.
    error_samples: Mutex<Vec<String>>,
}

/// What one run measured (the measured window: after warm-up).
pub struct RunResult {
    pub config: LoadConfig,
    pub counts: Counts,
    /// Warm-up included: everything this run sent (e.g. to check `count(*)`).
    pub counts_all: Counts,
    /// Latency of 2xx answers.
    pub hist: Histogram<u64>,
    /// Latency of 503 answers.
    pub hist_503: Histogram<u64>,
    pub measure_s: f64,
    pub timeline: Vec<Value>,
    /// name → (average cores over the window, peak RSS/PSS MiB, VmHWM MiB)
    pub cpu: Vec<(String, f64, f64, f64)>,
    pub error_samples: Vec<String>,
    /// Per-second series for plots: (t, p50, p99, p999, events/s).
    pub series: Vec<(f64, f64, f64, f64, f64)>,
    pub warmup_series: usize,
}

impl RunResult {
    pub fn events_per_s(&self) -> f64 {
        self.counts.events_acked as f64 / self.measure_s.max(1e-9)
    }

    pub fn unique_events_per_s(&self) -> f64 {
        self.counts.events_acked.saturating_sub(self.counts.dups_acked) as f64 / self.measure_s.max(1e-9)
    }

    pub fn requests_per_s(&self) -> f64 {
        self.counts.requests as f64 / self.measure_s.max(1e-9)
    }

    pub fn cpu_json(&self) -> Value {
        let m: serde_json::Map<String, Value> = self
            .cpu
            .iter()
            .map(|(name, cores, rss, hwm)| {
                (
                    name.clone(),
                    json!({"cores_avg": round3(*cores), "rss_peak_mib": round3(*rss), "vm_hwm_mib": round3(*hwm)}),
                )
            })
            .collect();
        Value::Object(m)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "config": self.config.to_json(),
            "measured_s": round3(self.measure_s),
            "totals": self.counts.to_json(),
            "totals_with_warmup": self.counts_all.to_json(),
            "rates": {
                "requests_per_s": round3(self.requests_per_s()),
                "events_per_s_acked": round3(self.events_per_s()),
                "unique_events_per_s_acked": round3(self.unique_events_per_s()),
            },
            "latency_ms": latency_json(&self.hist),
            "latency_503_ms": latency_json(&self.hist_503),
            "processes": self.cpu_json(),
            "error_samples": self.error_samples,
            "timeline": self.timeline,
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs one load phase and returns what it measured.
pub fn run(cfg: &LoadConfig) -> Result<RunResult, String> {
    let target = HttpTarget::parse(&cfg.url, cfg.route.path(), cfg.timeout)?;
    let n = cfg.connections().max(1);
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        slots: (0..n).map(|_| Mutex::new(Interval::new())).collect(),
        error_samples: Mutex::new(Vec::new()),
    });
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + Duration::from_secs(cfg.warmup_s + cfg.duration_s);
    let cfg_arc = Arc::new(cfg.clone());
    let mut handles = Vec::with_capacity(n);
    for idx in 0..n {
        let shared = shared.clone();
        let cfg = cfg_arc.clone();
        let transport: Box<dyn Transport> = match cfg.route {
            Route::Ws => Box::new(WsClient::new(target.clone())),
            Route::Batch | Route::Single => Box::new(HttpClient::new(target.clone())),
        };
        let h = std::thread::Builder::new()
            .name(format!("load-{idx}"))
            .stack_size(256 * 1024)
            .spawn(move || worker(idx, &cfg, &shared, transport, start, end))
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        handles.push(h);
    }

    let mut watch: Vec<Watched> = cfg.watch.clone();
    watch.push(Watched::this_process("ingestd-load"));
    watch.push(Watched::machine());
    let read_all = |w: &[Watched]| -> Vec<Option<Reading>> { w.iter().map(Watched::read).collect() };
    let mut prev = read_all(&watch);
    let mut prev_t = Instant::now();
    let mut window_start_readings = prev.clone();
    let mut window_start = start;
    let mut peaks = vec![(0.0f64, 0.0f64); watch.len()];
    let mut total = Interval::new();
    let mut all = Counts::default();
    let mut tick_iv = Interval::new();
    let mut timeline = Vec::new();
    let mut series = Vec::new();
    let ticks = cfg.warmup_s + cfg.duration_s;

    for tick in 1..=ticks {
        sleep_until(start + Duration::from_secs(tick));
        for slot in &shared.slots {
            slot.lock().drain_into(&mut tick_iv);
        }
        let now = Instant::now();
        let dt = now.duration_since(prev_t).as_secs_f64();
        let readings = read_all(&watch);
        let measuring = tick > cfg.warmup_s;
        let mut cpu = serde_json::Map::new();
        let mut rss = serde_json::Map::new();
        let mut cpu_text = String::new();
        for (i, w) in watch.iter().enumerate() {
            if let (Some(a), Some(b)) = (&prev[i], &readings[i]) {
                let c = procstat::cores(a, b, dt);
                cpu.insert(w.name.clone(), json!(round3(c)));
                rss.insert(w.name.clone(), json!(round3(b.rss_kib as f64 / 1024.0)));
                cpu_text.push_str(&format!(" {} {:.2}", w.name, c));
                if measuring {
                    peaks[i].0 = peaks[i].0.max(b.rss_kib as f64 / 1024.0);
                    peaks[i].1 = peaks[i].1.max(b.hwm_kib as f64 / 1024.0);
                }
            }
        }
        let c = &tick_iv.counts;
        let h = &tick_iv.hist;
        timeline.push(json!({
            "t": tick,
            "phase": if measuring { "measure" } else { "warmup" },
            "requests": c.requests,
            "events_acked": c.events_acked,
            "events_per_s": round3(c.events_acked as f64 / dt.max(1e-9)),
            "status_503": c.status(503),
            "status_other": c.non_2xx_other(),
            "errors": c.errors,
            "p50_ms": round3(q_ms(h, 0.5)),
            "p90_ms": round3(q_ms(h, 0.9)),
            "p99_ms": round3(q_ms(h, 0.99)),
            "p999_ms": round3(q_ms(h, 0.999)),
            "max_ms": round3(if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 }),
            "p50_503_ms": round3(q_ms(&tick_iv.hist_503, 0.5)),
            "p99_503_ms": round3(q_ms(&tick_iv.hist_503, 0.99)),
            "cpu_cores": cpu,
            "rss_mib": rss,
        }));
        series.push((tick as f64, q_ms(h, 0.5), q_ms(h, 0.99), q_ms(h, 0.999), c.events_acked as f64 / dt.max(1e-9)));
        all.add(&tick_iv.counts);
        if measuring {
            total.counts.add(&tick_iv.counts);
            total.hist.add(&tick_iv.hist).expect("same bounds");
            total.hist_503.add(&tick_iv.hist_503).expect("same bounds");
        }
        eprintln!(
            "{}[{:>4}s] {} {:>7} req/s {:>9} ev/s acked  p99 {:>7.2} ms{}  503s {}{}  other {}  errors {}  cpu{}",
            cfg.label,
            tick,
            if measuring { "run " } else { "warm" },
            fmt_int(c.requests as f64 / dt),
            fmt_int(c.events_acked as f64 / dt),
            q_ms(h, 0.99),
            if measuring && !total.hist.is_empty() {
                format!(" (so far {:.2})", q_ms(&total.hist, 0.99))
            } else {
                String::new()
            },
            c.status(503),
            if tick_iv.hist_503.is_empty() {
                String::new()
            } else {
                format!(" (p99 {:.2} ms)", q_ms(&tick_iv.hist_503, 0.99))
            },
            c.non_2xx_other(),
            c.errors,
            cpu_text,
        );
        tick_iv.reset();
        if tick == cfg.warmup_s {
            window_start = now;
            window_start_readings = readings.clone();
        }
        prev = readings;
        prev_t = now;
    }

    // Stop: closed-loop workers finish the request in flight; open-loop
    // workers have no more scheduled sends. Their answers count as measured.
    shared.stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let tail_from = total.counts.clone();
    for slot in &shared.slots {
        slot.lock().drain_into(&mut total);
    }
    // The tail (answers after the last tick) counts in both totals.
    let mut tail = total.counts.clone();
    tail.subtract(&tail_from);
    all.add(&tail);
    let finished = Instant::now();
    let end_readings = read_all(&watch);
    let measure_s = finished.duration_since(window_start).as_secs_f64();
    let cpu = watch
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let cores = match (&window_start_readings[i], &end_readings[i]) {
                (Some(a), Some(b)) => procstat::cores(a, b, measure_s),
                _ => 0.0,
            };
            let hwm = end_readings[i].map_or(peaks[i].1, |r| (r.hwm_kib as f64 / 1024.0).max(peaks[i].1));
            (w.name.clone(), cores, peaks[i].0, hwm)
        })
        .collect();
    let error_samples = shared.error_samples.lock().clone();
    Ok(RunResult {
        config: cfg.clone(),
        counts: total.counts,
        counts_all: all,
        hist: total.hist,
        hist_503: total.hist_503,
        measure_s,
        timeline,
        cpu,
        error_samples,
        series,
        warmup_series: cfg.warmup_s as usize,
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn worker(
    idx: usize,
    cfg: &LoadConfig,
    shared: &Shared,
    mut transport: Box<dyn Transport>,
    start: Instant,
    end: Instant,
) {
    let mut generator = Generator::new(&cfg.events, idx as u32);
    let mut body = Vec::with_capacity(cfg.events_per_request() * 360 + 64);
    let resend = cfg.events.dup_mode == DupMode::Resend && cfg.events.dup_percent > 0.0;
    let mut sent: Vec<(Vec<u8>, u64)> = Vec::new();
    let (interval, offset) = match cfg.mode {
        Loop::Open { rate, connections } => (connections as f64 / rate, idx as f64 / rate),
        Loop::Closed { .. } => (0.0, 0.0),
    };
    let open = matches!(cfg.mode, Loop::Open { .. });
    sleep_until(start);
    let mut i: u64 = 0;
    loop {
        let intended = if open {
            let t = start + Duration::from_secs_f64(offset + i as f64 * interval);
            if t >= end {
                break;
            }
            if shared.stop.load(Ordering::Relaxed) {
                // Behind schedule at the end: what could not be sent waited
                // at least until now (coordinated omission, even at the end).
                let now = Instant::now();
                let mut slot = shared.slots[idx].lock();
                let mut j = i;
                loop {
                    let t = start + Duration::from_secs_f64(offset + j as f64 * interval);
                    if t >= end {
                        break;
                    }
                    slot.counts.not_sent += 1;
                    record(&mut slot.hist, now.saturating_duration_since(t));
                    j += 1;
                }
                break;
            }
            sleep_until(t);
            t
        } else {
            let t = Instant::now();
            if t >= end || shared.stop.load(Ordering::Relaxed) {
                break;
            }
            t
        };
        i += 1;
        let info = if resend && !sent.is_empty() && generator.rng().percent(cfg.events.dup_percent) {
            let k = generator.rng().below(sent.len() as u64) as usize;
            body.clear();
            body.extend_from_slice(&sent[k].0);
            BodyInfo { events: sent[k].1, dups: sent[k].1 }
        } else {
            let info = match cfg.route {
                Route::Batch => generator.batch(cfg.batch_size, now_ms(), &mut body),
                Route::Ws if cfg.batch_size > 1 => generator.batch(cfg.batch_size, now_ms(), &mut body),
                Route::Single | Route::Ws => generator.single(now_ms(), &mut body),
            };
            if resend {
                // Keep the last 16 bodies as candidates for re-sending.
                if sent.len() < 16 {
                    sent.push((body.clone(), info.events));
                } else {
                    let k = (i % 16) as usize;
                    sent[k].0.clear();
                    sent[k].0.extend_from_slice(&body);
                    sent[k].1 = info.events;
                }
            }
            info
        };
        let result = transport.send(&body);
        let latency = intended.elapsed();
        let failed = {
            let mut slot = shared.slots[idx].lock();
            let c = &mut slot.counts;
            c.requests += 1;
            c.events_sent += info.events;
            c.dups_sent += info.dups;
            c.bytes_sent += body.len() as u64;
            match &result {
                Ok(reply) => {
                    *c.status.entry(reply.status).or_default() += 1;
                    if (200..300).contains(&reply.status) {
                        c.events_acked += reply.accepted;
                        c.dups_acked += info.dups.min(reply.accepted);
                        record(&mut slot.hist, latency);
                    } else if reply.status == 503 {
                        record(&mut slot.hist_503, latency);
                    }
                    false
                }
                Err(_) => {
                    c.errors += 1;
                    true
                }
            }
        };
        let status = result.as_ref().ok().map(|r| r.status);
        if let Err(e) = result {
            let mut samples = shared.error_samples.lock();
            let text = format!("{}: {e}", e.kind());
            if samples.len() < 5 && !samples.contains(&text) {
                samples.push(text);
            }
        }
        if failed {
            // Do not spin on a dead server.
            std::thread::sleep(Duration::from_millis(50));
        } else if let Some(until) = backoff_until(cfg, status, Instant::now(), end) {
            sleep_until(until);
        }
    }
}

/// Closed loop: after a 503, when the connection may send again
/// (`--pause-after-503`, cut short at the end of the run); `None`: at once.
fn backoff_until(cfg: &LoadConfig, status: Option<u16>, now: Instant, end: Instant) -> Option<Instant> {
    let closed = matches!(cfg.mode, Loop::Closed { .. });
    (closed && status == Some(503) && !cfg.pause_after_503.is_zero()).then(|| (now + cfg.pause_after_503).min(end))
}

pub fn fmt_int(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Read, Write};

    fn config(url: String, concurrency: usize, pause_ms: u64) -> LoadConfig {
        LoadConfig {
            url,
            route: Route::Batch,
            batch_size: 2,
            mode: Loop::Closed { concurrency },
            warmup_s: 0,
            duration_s: 1,
            events: GenConfig {
                run_id: "t".into(),
                devices: 10,
                ids: crate::events::IdKind::Seq,
                dup_percent: 0.0,
                dup_mode: DupMode::Spread,
                dup_window: 10,
            },
            timeout: Duration::from_secs(5),
            watch: Vec::new(),
            label: String::new(),
            pause_after_503: Duration::from_millis(pause_ms),
        }
    }

    /// A server that answers every request with `status` (keep-alive).
    fn answering(status: u16) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        // One request: head, then Content-Length bytes.
                        let mut headers = [httparse::EMPTY_HEADER; 16];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
                            let len = req
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                                .unwrap_or(0);
                            if buf.len() >= head + len {
                                buf.drain(..head + len);
                                let body = if status == 200 { r#"{"accepted":2}"# } else { r#"{"error":"busy"}"# };
                                let answer =
                                    format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                                if s.write_all(answer.as_bytes()).is_err() {
                                    return;
                                }
                                continue;
                            }
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn latency_of_503_answers_apart_from_2xx() {
        let r = run(&config(answering(503), 2, 0)).unwrap();
        assert!(r.counts.status(503) > 10, "{:?}", r.counts);
        assert_eq!(r.hist_503.len(), r.counts.status(503));
        assert!(r.hist.is_empty());
        assert_eq!(r.counts.events_acked, 0);
        let j = r.to_json();
        assert_eq!(j["latency_503_ms"]["count"], json!(r.counts.status(503)));
        assert_eq!(j["latency_ms"]["count"], json!(0));

        let r = run(&config(answering(200), 1, 0)).unwrap();
        assert_eq!(r.hist.len(), r.counts.status(200));
        assert!(r.hist_503.is_empty());
    }

    #[test]
    fn pause_after_503_spaces_out_requests() {
        // 2 connections for ~1 s, each pausing 200 ms after every 503: at most
        // 6 requests each (the pause is cut short at the end of the run).
        let r = run(&config(answering(503), 2, 200)).unwrap();
        assert!((4..=12).contains(&r.counts.requests), "{} requests", r.counts.requests);
        assert_eq!(r.counts.status(503), r.counts.requests);
    }

    #[test]
    fn backoff_only_after_503_in_the_closed_loop() {
        let now = Instant::now();
        let end = now + Duration::from_secs(10);
        let cfg = config(String::new(), 1, 50);
        assert_eq!(backoff_until(&cfg, Some(503), now, end), Some(now + Duration::from_millis(50)));
        assert_eq!(backoff_until(&cfg, Some(200), now, end), None);
        assert_eq!(backoff_until(&cfg, None, now, end), None);
        // Never past the end of the run.
        assert_eq!(
            backoff_until(&cfg, Some(503), now, now + Duration::from_millis(10)),
            Some(now + Duration::from_millis(10))
        );
        assert_eq!(backoff_until(&config(String::new(), 1, 0), Some(503), now, end), None);
        let open = LoadConfig { mode: Loop::Open { rate: 10.0, connections: 1 }, ..cfg };
        assert_eq!(backoff_until(&open, Some(503), now, end), None);
    }

    #[test]
    fn thousands() {
        assert_eq!(fmt_int(1234567.4), "1,234,567");
        assert_eq!(fmt_int(999.0), "999");
        assert_eq!(fmt_int(0.0), "0");
    }
}
