//! Results: the human summary, `result.json`, and the SVG plots.

use std::path::Path;

use serde_json::{Value, json};

use crate::load::{RunResult, fmt_int, latency_json, q_ms, round3};
use crate::procstat;
use crate::svg::{COLORS, Chart, Series};

/// The exact command line, shell-quoted where needed.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b)) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fields every result file starts with.
pub fn envelope(kind: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("tool".into(), json!("ingestd-load"));
    m.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    m.insert("kind".into(), json!(kind));
    m.insert("command".into(), json!(command_line()));
    m.insert("argv".into(), json!(std::env::args().collect::<Vec<_>>()));
    m.insert("started_at".into(), json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
    m.insert("machine".into(), procstat::machine());
    m
}

pub fn write(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn write_json(dir: &Path, name: &str, v: &Value) -> Result<(), String> {
    write(dir, name, &(serde_json::to_string_pretty(v).expect("serializable") + "\n"))
}

fn describe(r: &RunResult) -> String {
    let c = &r.config;
    let what = match c.route {
        crate::load::Route::Batch => format!("POST {} × {} events", c.route.path(), c.batch_size),
        crate::load::Route::Single => format!("POST {}", c.route.path()),
        crate::load::Route::Ws => format!("WebSocket /ws frames × {} events", c.batch_size),
    };
    let mode = match c.mode {
        crate::load::Loop::Closed { concurrency } => format!("closed loop, {concurrency} connections"),
        crate::load::Loop::Open { rate, connections } => format!(
            "open loop, {} req/s = {} events/s over {connections} connections",
            fmt_int(rate),
            fmt_int(rate * c.events_per_request() as f64)
        ),
    };
    let dups = if c.events.dup_percent > 0.0 {
        format!(", {}% duplicates ({})", c.events.dup_percent, c.events.dup_mode.name())
    } else {
        String::new()
    };
    format!("{mode}, {what}{dups}, {} s + {} s warm-up", c.duration_s, c.warmup_s)
}

/// The human summary of one run.
pub fn print_summary(r: &RunResult) {
    let c = &r.counts;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("ingestd-load http: {}", describe(r));
    println!("  target        {}", r.config.url);
    println!(
        "  requests      {} in {:.1} s = {}/s   status 200: {}  202: {}  503: {}{}  other: {}  transport errors: {}",
        fmt_int(c.requests as f64),
        r.measure_s,
        fmt_int(r.requests_per_s()),
        fmt_int(c.status(200) as f64),
        fmt_int(c.status(202) as f64),
        fmt_int(c.status(503) as f64),
        latency_503_text(r),
        fmt_int(c.non_2xx_other() as f64),
        fmt_int(c.errors as f64),
    );
    println!(
        "  events        {} acked = {} events/s   (sent {}, of which deliberate duplicates {}; unique acked {}/s)",
        fmt_int(c.events_acked as f64),
        fmt_int(r.events_per_s()),
        fmt_int(c.events_sent as f64),
        fmt_int(c.dups_sent as f64),
        fmt_int(r.unique_events_per_s()),
    );
    let h = &r.hist;
    println!(
        "  ack latency   p50 {:.2} ms  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  ({} answers{})",
        q_ms(h, 0.5),
        q_ms(h, 0.9),
        q_ms(h, 0.99),
        q_ms(h, 0.999),
        if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 },
        fmt_int(h.len() as f64),
        if matches!(r.config.mode, crate::load::Loop::Open { .. }) { ", from intended send time" } else { "" },
    );
    let mut load_cores = 0.0;
    let cpu: Vec<String> = r
        .cpu
        .iter()
        .map(|(name, cores, rss, hwm)| {
            if name == "ingestd-load" {
                load_cores = *cores;
            }
            if name == "machine" {
                format!("whole machine busy {cores:.2} of {nproc} cores")
            } else if *hwm > 0.0 {
                format!("{name} {cores:.2} cores, RSS peak {rss:.0} MiB (VmHWM {hwm:.0})")
            } else {
                format!("{name} {cores:.2} cores, PSS {rss:.0} MiB")
            }
        })
        .collect();
    println!("  processes     {}", cpu.join("; "));
    if let crate::load::Loop::Open { rate, .. } = r.config.mode {
        let achieved = r.requests_per_s();
        if achieved < rate * 0.95 || c.not_sent > 0 {
            println!(
                "  NOTE          sent {} req/s of the {} asked; {} scheduled requests were never sent (counted in the latency \
                 with the time they had waited): the server fell behind, or too few connections for this latency",
                fmt_int(achieved),
                fmt_int(rate),
                fmt_int(c.not_sent as f64)
            );
        }
    }
    println!(
        "  NOTE          this machine has {nproc} cores; the load generator ran on them too and used {load_cores:.2} cores"
    );
    for e in &r.error_samples {
        println!("  error sample  {e}");
    }
}

/// ` (503 latency p50 … p99 …, 12.3% of requests)` after the 503 count; empty without 503s.
fn latency_503_text(r: &RunResult) -> String {
    let h = &r.hist_503;
    if h.is_empty() {
        return String::new();
    }
    let pause = if r.config.pause_after_503.is_zero() {
        String::new()
    } else {
        format!(", then {} ms pause", r.config.pause_after_503.as_millis())
    };
    format!(
        " (503 latency p50 {:.2} ms  p99 {:.2}  max {:.2}; {:.1}% of requests{pause})",
        q_ms(h, 0.5),
        q_ms(h, 0.99),
        h.max() as f64 / 1000.0,
        100.0 * r.counts.status(503) as f64 / r.counts.requests.max(1) as f64,
    )
}

/// result.json and the plots of one run.
pub fn write_run(dir: &Path, r: &RunResult) -> Result<(), String> {
    let mut m = envelope("http");
    if let Value::Object(rest) = r.to_json() {
        m.extend(rest);
    }
    m.insert("note".into(), json!(two_core_note()));
    write_json(dir, "result.json", &Value::Object(m))?;
    write(dir, "latency.svg", &latency_chart(r).render())?;
    write(dir, "throughput.svg", &throughput_chart(r).render())?;
    Ok(())
}

pub fn two_core_note() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "The load generator, ingestd and PostgreSQL all ran on this machine's {nproc} cores and competed for them; see processes.*.cores_avg."
    )
}

fn latency_chart(r: &RunResult) -> Chart {
    let pick = |f: fn(&(f64, f64, f64, f64, f64)) -> f64| -> Vec<(f64, f64)> {
        r.series.iter().filter(|p| p.4 > 0.0).map(|p| (p.0, f(p))).collect()
    };
    Chart {
        title: "ingestd ack latency per second".into(),
        subtitle: describe(r),
        x_label: "time (s)".into(),
        y_label: "latency (ms, log scale)".into(),
        y_log: true,
        shade_until: (r.warmup_series > 0).then(|| (r.warmup_series as f64, "warm-up".into())),
        series: vec![
            Series { name: "p50".into(), color: COLORS[0], points: pick(|p| p.1), markers: false },
            Series { name: "p99".into(), color: COLORS[1], points: pick(|p| p.2), markers: false },
            Series { name: "p99.9".into(), color: COLORS[2], points: pick(|p| p.3), markers: false },
        ],
    }
}

fn throughput_chart(r: &RunResult) -> Chart {
    Chart {
        title: "ingestd events acknowledged per second".into(),
        subtitle: describe(r),
        x_label: "time (s)".into(),
        y_label: "events/s acked".into(),
        y_log: false,
        shade_until: (r.warmup_series > 0).then(|| (r.warmup_series as f64, "warm-up".into())),
        series: vec![Series {
            name: "events/s".into(),
            color: COLORS[3],
            points: r.series.iter().map(|p| (p.0, p.4)).collect(),
            markers: false,
        }],
    }
}

/// One sweep step in the result file and table.
pub fn sweep_step_json(fraction: f64, max_events_per_s: f64, r: &RunResult) -> Value {
    json!({
        "fraction": fraction,
        "target_events_per_s": round3(fraction * max_events_per_s),
        "achieved_events_per_s": round3(r.events_per_s()),
        "achieved_requests_per_s": round3(r.requests_per_s()),
        "latency_ms": latency_json(&r.hist),
        "status_503": r.counts.status(503),
        "status_other": r.counts.non_2xx_other(),
        "errors": r.counts.errors,
        "not_sent": r.counts.not_sent,
        "processes": r.cpu_json(),
        "run": r.to_json(),
    })
}

pub fn print_sweep_table(max: f64, steps: &[(f64, RunResult)]) {
    println!("\nthroughput vs latency (open loop, fractions of {} events/s):", fmt_int(max));
    println!("| load | target ev/s | acked ev/s | p50 ms | p99 ms | p99.9 ms | max ms | 503s | errors | not sent |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (f, r) in steps {
        let h = &r.hist;
        println!(
            "| {:.0}% | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            f * 100.0,
            fmt_int(f * max),
            fmt_int(r.events_per_s()),
            q_ms(h, 0.5),
            q_ms(h, 0.99),
            q_ms(h, 0.999),
            if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 },
            r.counts.status(503),
            r.counts.errors,
            r.counts.not_sent
        );
    }
}

pub fn sweep_chart(max: f64, steps: &[(f64, RunResult)], subtitle: &str) -> Chart {
    let pts = |q: f64| -> Vec<(f64, f64)> {
        steps.iter().filter(|(_, r)| !r.hist.is_empty()).map(|(_, r)| (r.events_per_s(), q_ms(&r.hist, q))).collect()
    };
    Chart {
        title: "ingestd throughput vs ack latency (open loop)".into(),
        subtitle: format!("{subtitle}; steps at fractions of {} events/s", fmt_int(max)),
        x_label: "events/s acknowledged".into(),
        y_label: "latency (ms, log scale)".into(),
        y_log: true,
        shade_until: None,
        series: vec![
            Series { name: "p50".into(), color: COLORS[0], points: pts(0.5), markers: true },
            Series { name: "p99".into(), color: COLORS[1], points: pts(0.99), markers: true },
            Series { name: "p99.9".into(), color: COLORS[2], points: pts(0.999), markers: true },
        ],
    }
}

/// `ingestd-load get FILE KEY.PATH`: one value of a result file, for scripts.
/// Array elements are addressed by index (`timeline.3.p99_ms`).
pub fn get(file: &str, path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let root: Value = serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    let mut v = &root;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        v = match v {
            Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            Value::Object(o) => o.get(part),
            _ => None,
        }
        .ok_or_else(|| format!("{file}: no key {path:?} (stopped at {part:?})"))?;
    }
    Ok(match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}
