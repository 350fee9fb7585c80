//! Spool append throughput against the machine's raw fsync'd append rate,
//! both measured in the same run on the same disk, so that the ratio is what
//! travels between machines.
//!
//! `cargo bench --bench spool` times it; under `cargo test` (no `--bench`
//! argument) it appends a few records as a smoke test and prints nothing.
//! Records are 33,000 bytes: one 100-event request of COPY tuples.
//!
//! | measured | what it is |
//! |---|---|
//! | raw, group 1 | a plain file: `write` + `fdatasync` per record — the machine's fsync'd append rate |
//! | raw, group N | `write` N records, one `fdatasync`: the best any group commit of N can do |
//! | spool, N appenders | N threads each `try_append` and wait for the ack, in a loop, while a committer thread calls `commit_through` every 20 ms (checkpoint + segment deletion, as the writers will) |
//!
//! The directory is `$INGESTD_BENCH_DIR` if set, else Cargo's target tmp dir
//! (the disk the project builds on). `$INGESTD_BENCH_COMMIT_MS` sets the
//! committer's period (default 20; 0: no committer), to see what checkpoint
//! fsyncs cost the appends on a shared journal.

// A tool: a panic here is a failed measurement, not a crashed appliance.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ingestd::spool::{Spool, SpoolConfig, SpoolError};

const RECORD_BYTES: usize = 33_000;
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

fn main() {
    let timed = std::env::args().any(|a| a == "--bench");
    let root = std::env::var_os("INGESTD_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
        .join(format!("spool-bench-{}", std::process::id()));
    // The disk is shared (builds, other processes, one ext4 journal), and
    // its fsync rate swings within seconds. So every case runs in short
    // interleaved rounds, each spool case right after its raw counterpart;
    // rates are medians over rounds and each ratio is the median of the
    // ratios within a round.
    let (budget, rounds) = if timed { (Duration::from_millis(500), 7) } else { (Duration::ZERO, 1) };
    let commit_ms: u64 = std::env::var("INGESTD_BENCH_COMMIT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let record: Vec<u8> = (0..RECORD_BYTES).map(|i| (i % 251) as u8).collect();
    const SIZES: [usize; 3] = [1, 8, 64];
    let mut raw = [const { Vec::new() }; 3];
    let mut spool: [Vec<Outcome>; 3] = [const { Vec::new() }; 3];
    for round in 0..rounds {
        for (k, &n) in SIZES.iter().enumerate() {
            raw[k].push(raw_append(&root.join(format!("raw-{n}-{round}")), &record, n, budget));
            spool[k].push(spool_append(&root.join(format!("spool-{n}-{round}")), &record, n, commit_ms, budget));
        }
    }
    let _ = fs::remove_dir_all(&root);
    if !timed {
        return;
    }

    let mb = |records_per_s: f64| records_per_s * RECORD_BYTES as f64 / 1e6;
    println!(
        "spool append, {RECORD_BYTES}-byte records, medians of {rounds} interleaved rounds of {} ms, \
         commit_through every {commit_ms} ms (0: never), dir {}",
        budget.as_millis(),
        root.display()
    );
    for (n, rates) in SIZES.iter().zip(&raw) {
        let rate = median(rates.clone());
        println!("raw   write×{n:<2} + 1 fdatasync   {rate:>8.0} records/s {:>7.1} MB/s", mb(rate));
    }
    for (k, n) in SIZES.iter().enumerate() {
        let o = &spool[k];
        let rate = median(o.iter().map(|o| o.rate).collect());
        let per_group = median(o.iter().map(|o| o.records_per_group).collect());
        let vs_single = median((0..rounds).map(|i| o[i].rate / raw[0][i]).collect());
        let vs_group = median((0..rounds).map(|i| o[i].rate / raw[k][i]).collect());
        let busy: u64 = o.iter().map(|o| o.busy).sum();
        println!(
            "spool {n:>2} appenders          {rate:>8.0} records/s {:>7.1} MB/s  {per_group:>5.1} records/fsync  \
             × raw per-record {vs_single:.2}  × raw group-{n} {vs_group:.2}  busy {busy}",
            mb(rate),
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Appends `group` records per `fdatasync` to a plain file for `budget`;
/// records/s. Starts a new file every segment's worth, like the spool.
fn raw_append(dir: &Path, record: &[u8], group: usize, budget: Duration) -> f64 {
    fs::create_dir_all(dir).expect("bench dir");
    let path = dir.join("raw");
    let mut file = File::create(&path).expect("create");
    let mut written = 0u64;
    let mut records = 0u64;
    let start = Instant::now();
    loop {
        for _ in 0..group {
            file.write_all(record).expect("write");
        }
        file.sync_data().expect("fdatasync");
        records += group as u64;
        written += (group * record.len()) as u64;
        if written >= SEGMENT_BYTES {
            file = File::create(&path).expect("recreate");
            written = 0;
        }
        if start.elapsed() >= budget {
            break;
        }
    }
    let rate = records as f64 / start.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(dir);
    rate
}

struct Outcome {
    rate: f64,
    records_per_group: f64,
    /// Appends refused because the queue was full (retried).
    busy: u64,
}

/// `appenders` threads append through the appender thread for `budget`.
fn spool_append(dir: &Path, record: &[u8], appenders: usize, commit_ms: u64, budget: Duration) -> Outcome {
    let config = SpoolConfig {
        dir: dir.to_path_buf(),
        segment_bytes: SEGMENT_BYTES,
        max_bytes: 16 * SEGMENT_BYTES,
        ..SpoolConfig::default()
    };
    let (spool, appender, _) = Spool::open(config).expect("open spool");
    let (sender, appender_thread) = appender.spawn().expect("spawn appender");
    let stop = Arc::new(AtomicBool::new(false));

    let committer = (commit_ms > 0).then(|| {
        let (spool, stop) = (spool.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(commit_ms));
                spool.commit_through(spool.durable_seq()).expect("commit");
            }
        })
    });
    let start = Instant::now();
    let threads: Vec<_> = (0..appenders)
        .map(|_| {
            let (sender, record) = (sender.clone(), record.to_vec());
            std::thread::spawn(move || {
                let (mut records, mut busy) = (0u64, 0u64);
                loop {
                    match sender.try_append(record.clone()) {
                        Ok(wait) => {
                            wait.wait_blocking().expect("durable");
                            records += 1;
                        }
                        Err(SpoolError::Busy | SpoolError::Full { .. }) => {
                            busy += 1;
                            std::thread::yield_now();
                        }
                        Err(e) => panic!("append: {e}"),
                    }
                    if start.elapsed() >= budget {
                        return (records, busy);
                    }
                }
            })
        })
        .collect();
    let (records, busy) =
        threads.into_iter().map(|t| t.join().expect("appender")).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let elapsed = start.elapsed().as_secs_f64();
    drop(sender);
    let report = appender_thread.join().expect("appender thread");
    stop.store(true, Ordering::Relaxed);
    if let Some(committer) = committer {
        committer.join().expect("committer");
    }
    assert_eq!(report.records, records, "every append acknowledged once");
    drop(spool);
    let _ = fs::remove_dir_all(dir);
    Outcome {
        rate: records as f64 / elapsed,
        records_per_group: report.records as f64 / report.groups.max(1) as f64,
        busy,
    }
}
