//! `ingestd-load`: the load generator users benchmark ingestd with, and the
//! raw-COPY reference it is compared against.
//!
//! ```text
//! ingestd-load http [--url http://127.0.0.1:8080] [--route batch|single] ...
//! ingestd-load copy-baseline --database-url URL [--connections 2] ...
//! ingestd-load get FILE KEY.PATH
//! ```
//!
//! Run `ingestd-load help` for every option. Modules (under `ingestd-load/`):
//! `events` (the event generator), `client` (transports), `load` (closed/open loops),
//! `baseline` (raw COPY), `procstat` (CPU/RSS from /proc), `report`, `svg`.

// A tool: a panic here is a failed measurement, not a crashed appliance.
#![allow(clippy::unwrap_used)]

#[path = "ingestd-load/args.rs"]
mod args;
#[path = "ingestd-load/baseline.rs"]
mod baseline;
#[path = "ingestd-load/client.rs"]
mod client;
#[path = "ingestd-load/events.rs"]
mod events;
#[path = "ingestd-load/load.rs"]
mod load;
#[path = "ingestd-load/procstat.rs"]
mod procstat;
#[path = "ingestd-load/report.rs"]
mod report;
#[path = "ingestd-load/svg.rs"]
mod svg;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use args::{Args, opt_seconds};
use events::{DupMode, GenConfig, IdKind};
use load::{LoadConfig, Loop, Route};
use procstat::{Scope, Watched};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
ingestd-load: load generator for ingestd, and the raw-COPY reference

USAGE
  ingestd-load http [OPTIONS]            drive ingestd's ingest API (HTTP, or WebSocket with --route ws)
  ingestd-load copy-baseline [OPTIONS]   raw binary COPY of the same rows, for comparison
  ingestd-load get FILE KEY.PATH         print one value of a result.json (for scripts)
  ingestd-load help

http OPTIONS
  --url URL                 ingestd base URL (default http://127.0.0.1:8080); also positional
  --route batch|single|ws   POST /events/batch (default), POST /events, or WebSocket ingest:
                            GET /ws, then one text frame of --batch-size events per request
  --batch-size N            events per batch request (default 100)
  --concurrency C           closed loop: C connections sending back to back (default 64)
  --rate R                  open loop: R requests/s in total (latency from intended send time)
  --event-rate E            open loop: E events/s in total (= E / batch-size requests/s)
  --connections C           open loop: connections the rate is spread over (default 64)
  --duration S              measured seconds (default 20; 8 per sweep step)
  --warmup S                seconds run first and not measured (default 3; 2 per sweep step)
  --duplicates P            percent of deliberate duplicates (default 0)
  --dup-mode spread|resend  spread: P% of events reuse a recent event_id of the same connection;
                            resend: P% of requests re-send a whole recent request (default spread)
  --dup-window N            spread duplicates pick among the connection's last N events (default 10000)
  --ids seq|random|none     event_id: <run>-<conn>-<sequence> (increasing per connection), <run>-<conn>-<16 hex>
                            (spread over the key space like UUIDv4), or none (ingestd assigns UUIDv7) (default seq)
  --devices N               device_id pool size (default 10000)
  --run-id ID               event_id prefix (default: random per run)
  --timeout S               connect/read/write timeout (default 30)
  --pause-after-503 MS      closed loop: a connection that got a 503 waits MS milliseconds before
                            its next request, like a device that backs off (default 0: at once);
                            503 answers are counted, and their latency reported apart from 2xx
  --sweep LIST              open-loop steps at these fractions of the maximum, e.g. 10,25,50,75,90,100
  --max-event-rate E        the maximum for --sweep (default: measured first, closed loop)
  --pause S                 pause between sweep steps (default 1)
  --watch NAME=PID          sample CPU and RSS of a process (e.g. ingestd=1234); repeatable
  --watch-tree NAME=PID     the same for a process and its children (e.g. postgres=<postmaster>)
  --out DIR                 write result.json and SVG plots into DIR
  --quiet-summary           do not print the human summary

copy-baseline OPTIONS
  --database-url URL        PostgreSQL URL (or INGESTD_DATABASE_URL)
  --table NAME              table to (re)create (default ingestd_copy_baseline; dropped first!)
  --connections W           parallel COPY connections (default 2)
  --batch-rows N            rows per COPY transaction (default 5000)
  --streams S               event_id streams, as from S HTTP connections (default: --connections);
                            pass the load's --concurrency so both write the same key order
  --body-events N           events per generated body, the load's --batch-size (default 100)
  --event-rate E            open loop: bodies arrive at E events/s; a free connection COPYs every
                            body that has arrived (up to --batch-rows rows) in one transaction, and
                            each body's latency runs from its arrival time to its COMMIT: the ack
                            latency an ingestd with no overhead of its own would give at that rate
  --rows N                  rows to pre-generate and copy (default 1000000)
  --duration S              stop after warm-up + S seconds even if rows remain
  --warmup S                seconds copied first and left out of the rate (default 0)
  --drop-after              drop the table at the end (e.g. for a warm-up)
  --ids, --devices, --run-id, --watch, --watch-tree, --out   as for http
";

fn main() -> ExitCode {
    let mut args = Args::new(std::env::args().skip(1));
    let result = match args.positional().as_deref() {
        Some("http") => cmd_http(args),
        Some("copy-baseline") => cmd_baseline(args),
        Some("get") => cmd_get(args),
        Some("help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingestd-load: {e}");
            ExitCode::from(2)
        }
    }
}

fn gen_config(args: &mut Args) -> Result<GenConfig, String> {
    let dup_percent: f64 = args.get("duplicates", 0.0)?;
    if !(0.0..=100.0).contains(&dup_percent) {
        return Err("--duplicates must be between 0 and 100".into());
    }
    let run_id = args.opt_str("run-id")?.unwrap_or_else(GenConfig::new_run_id);
    if run_id.is_empty()
        || run_id.len() > 64
        || !run_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:".contains(&b))
    {
        return Err("--run-id must be 1-64 characters of [A-Za-z0-9._:]".into());
    }
    let ids = args.get("ids", IdKind::Seq)?;
    if ids == IdKind::None && dup_percent > 0.0 {
        return Err("--ids none sends no event_id, so there is nothing to duplicate: drop --duplicates".into());
    }
    Ok(GenConfig {
        run_id,
        devices: args.get("devices", 10_000)?,
        ids,
        dup_percent,
        dup_mode: args.get("dup-mode", DupMode::Spread)?,
        dup_window: args.get("dup-window", 10_000)?,
    })
}

fn watched(args: &mut Args) -> Result<Vec<Watched>, String> {
    let mut w = Vec::new();
    for s in args.values("watch")? {
        w.push(Watched::parse(&s, Scope::Process)?);
    }
    for s in args.values("watch-tree")? {
        w.push(Watched::parse(&s, Scope::Tree)?);
    }
    Ok(w)
}

fn cmd_http(mut args: Args) -> Result<(), String> {
    let url = match args.opt_str("url")? {
        Some(u) => u,
        None => args.positional().unwrap_or_else(|| "http://127.0.0.1:8080".into()),
    };
    let route = match args.opt_str("route")?.as_deref() {
        None | Some("batch") => Route::Batch,
        Some("single") => Route::Single,
        Some("ws") => Route::Ws,
        Some(o) => return Err(format!("--route {o:?}: expected batch, single or ws")),
    };
    let batch_size: usize = args.get("batch-size", 100)?;
    if batch_size == 0 {
        return Err("--batch-size must be at least 1".into());
    }
    let per_req = if route == Route::Single { 1 } else { batch_size } as f64;
    let sweep = args.opt_str("sweep")?.map(|s| args::fractions(&s)).transpose()?;
    let concurrency: usize = args.get("concurrency", 64)?;
    let rate: Option<f64> = args.opt("rate")?;
    let event_rate: Option<f64> = args.opt("event-rate")?;
    let connections: usize = args.get("connections", 64)?;
    let (dflt_dur, dflt_warm) = if sweep.is_some() { (8.0, 2.0) } else { (20.0, 3.0) };
    let duration = opt_seconds(&mut args, "duration", dflt_dur)?.round().max(1.0) as u64;
    let warmup = opt_seconds(&mut args, "warmup", dflt_warm)?.round() as u64;
    let timeout = Duration::from_secs_f64(opt_seconds(&mut args, "timeout", 30.0)?.max(0.1));
    let max_event_rate: Option<f64> = args.opt("max-event-rate")?;
    let pause = opt_seconds(&mut args, "pause", 1.0)?;
    let pause_after_503: u64 = args.get("pause-after-503", 0)?;
    let events = gen_config(&mut args)?;
    let watch = watched(&mut args)?;
    let out = args.opt_str("out")?.map(PathBuf::from);
    let quiet = args.flag("quiet-summary");
    args.finish()?;
    if concurrency == 0 || connections == 0 {
        return Err("--concurrency and --connections must be at least 1".into());
    }

    if sweep.is_some() && (rate.is_some() || event_rate.is_some()) {
        return Err("--sweep sets the rates itself (fractions of --max-event-rate): drop --rate / --event-rate".into());
    }
    let rate = match (rate, event_rate) {
        (Some(_), Some(_)) => return Err("give --rate or --event-rate, not both".into()),
        (Some(r), None) => Some(r),
        (None, Some(e)) => Some(e / per_req),
        (None, None) => None,
    };
    if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("the rate must be positive".into());
    }
    if pause_after_503 > 0 && (rate.is_some() || sweep.is_some()) {
        return Err(
            "--pause-after-503 is for the closed loop (--concurrency): an open loop sends on its schedule".into()
        );
    }
    let mode = match rate {
        Some(rate) => Loop::Open { rate, connections },
        None => Loop::Closed { concurrency },
    };
    let base = LoadConfig {
        url,
        route,
        batch_size,
        mode,
        warmup_s: warmup,
        duration_s: duration,
        events,
        timeout,
        watch,
        label: String::new(),
        pause_after_503: Duration::from_millis(pause_after_503),
    };

    let Some(fractions) = sweep else {
        let r = load::run(&base)?;
        if !quiet {
            report::print_summary(&r);
        }
        if let Some(dir) = &out {
            report::write_run(dir, &r)?;
            eprintln!("ingestd-load: wrote {}/result.json, latency.svg, throughput.svg", dir.display());
        }
        return Ok(());
    };

    // Sweep: find the maximum (closed loop) unless given, then open-loop steps.
    let mut doc = report::envelope("http-sweep");
    let max = match max_event_rate {
        Some(m) => m,
        None => {
            let mut events = base.events.clone();
            events.run_id = format!("{}.0", base.events.run_id);
            let cfg = LoadConfig { mode: Loop::Closed { concurrency }, label: "max ".into(), events, ..base.clone() };
            eprintln!("ingestd-load: measuring the maximum first (closed loop, {concurrency} connections)");
            let r = load::run(&cfg)?;
            doc.insert("max_run".into(), r.to_json());
            r.events_per_s()
        }
    };
    if max <= 0.0 {
        return Err("the maximum rate is 0: nothing was acknowledged".into());
    }
    let mut steps = Vec::new();
    for (i, f) in fractions.iter().enumerate() {
        if i > 0 || max_event_rate.is_none() {
            std::thread::sleep(Duration::from_secs_f64(pause));
        }
        // Every step sends new ids: its own run id, derived from the sweep's.
        let mut events = base.events.clone();
        events.run_id = format!("{}.{}", base.events.run_id, i + 1);
        let cfg = LoadConfig {
            mode: Loop::Open { rate: f * max / per_req, connections },
            label: format!("{:>3.0}% ", f * 100.0),
            events,
            ..base.clone()
        };
        eprintln!("ingestd-load: sweep step {:.0}% = {} events/s", f * 100.0, load::fmt_int(f * max));
        let r = load::run(&cfg)?;
        steps.push((*f, r));
    }
    report::print_sweep_table(max, &steps);
    doc.insert("max_events_per_s".into(), json!(max));
    doc.insert("config".into(), base.to_json());
    doc.insert("steps".into(), Value::Array(steps.iter().map(|(f, r)| report::sweep_step_json(*f, max, r)).collect()));
    doc.insert("note".into(), json!(report::two_core_note()));
    if let Some(dir) = &out {
        report::write_json(dir, "result.json", &Value::Object(doc))?;
        let subtitle = format!(
            "{} over {connections} connections, {} s per step",
            match route {
                Route::Batch => format!("POST /events/batch × {batch_size}"),
                Route::Single => "POST /events".into(),
                Route::Ws => format!("WebSocket frames × {batch_size}"),
            },
            duration
        );
        report::write(dir, "sweep.svg", &report::sweep_chart(max, &steps, &subtitle).render())?;
        eprintln!("ingestd-load: wrote {}/result.json, sweep.svg", dir.display());
    }
    Ok(())
}

fn cmd_baseline(mut args: Args) -> Result<(), String> {
    let url = match args.opt_str("database-url")? {
        Some(u) => u,
        None => {
            std::env::var("INGESTD_DATABASE_URL").map_err(|_| "--database-url (or INGESTD_DATABASE_URL) is required")?
        }
    };
    let table = args.get("table", "ingestd_copy_baseline".to_string())?;
    if table.is_empty() || !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') {
        return Err("--table must be a plain name or schema.name".into());
    }
    let connections: usize = args.get("connections", 2)?;
    let batch_rows: usize = args.get("batch-rows", 5000)?;
    let streams: usize = args.get("streams", 0)?;
    let body_events: usize = args.get("body-events", 100)?;
    let rows: u64 = args.get("rows", 1_000_000)?;
    let event_rate: Option<f64> = args
        .opt_str("event-rate")?
        .map(|r| r.parse().map_err(|_| format!("--event-rate {r}: not a number")))
        .transpose()?;
    let duration_s = args.opt_str("duration")?.map(|d| args::seconds(&d)).transpose()?;
    let warmup_s = opt_seconds(&mut args, "warmup", 0.0)?.round() as u64;
    let drop_after = args.flag("drop-after");
    let events = gen_config(&mut args)?;
    let watch = watched(&mut args)?;
    let out = args.opt_str("out")?.map(PathBuf::from);
    args.finish()?;
    if connections == 0 || batch_rows == 0 || rows == 0 || body_events == 0 {
        return Err("--connections, --batch-rows, --body-events and --rows must be at least 1".into());
    }
    if events.dup_percent > 0.0 {
        return Err("copy-baseline copies unique rows only (no --duplicates)".into());
    }
    if event_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err("--event-rate must be a positive number of events/s".into());
    }
    let cfg = baseline::BaselineConfig {
        url,
        table,
        connections,
        batch_rows,
        event_rate,
        streams,
        body_events,
        rows,
        duration_s,
        warmup_s,
        drop_after,
        events,
        watch,
        out,
    };
    baseline::run(&cfg)?;
    Ok(())
}

fn cmd_get(mut args: Args) -> Result<(), String> {
    let file = args.positional().ok_or("usage: ingestd-load get FILE KEY.PATH")?;
    let key = args.positional().ok_or("usage: ingestd-load get FILE KEY.PATH")?;
    args.finish()?;
    println!("{}", report::get(&file, &key)?);
    Ok(())
}
