//! Writer threads: jobs from a ring, batched, COPYed into PostgreSQL, answered.
//!
//! Each writer is a plain OS thread (`writer-{n}`) that owns one ring's
//! receiver and blocks only on it and on PostgreSQL, never on a shard.
//!
//! Batching adapts to load without tuning: a writer takes the first job, then
//! everything already waiting (up to `max_batch_events` / `max_batch_bytes`),
//! and only then, if the batch is still below its bounds, lingers at most
//! `max_linger_ms` for more. Under low load a request is its own batch; under
//! high load jobs pile up while the previous COPY runs and the next batch is
//! large. Repeated `event_id`s inside a batch are dropped before the COPY so
//! that they never force the staging fallback (see [`db`]).
//!
//! - [`copy`]: binary COPY encoding (pure; used by shards).
//! - [`db`]: pool, table, idempotent COPY of a batch.

pub mod copy;
pub mod db;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::config::WriterConfig;
use crate::metrics::Metrics;
use crate::pipeline::{CommitOutcome, Job};
use db::{Pool, Statements, WriteError};

/// What a writer needs, handed to its thread.
pub struct Writer {
    pub id: usize,
    pub ring: Receiver<Job>,
    pub pool: Pool,
    pub sql: Arc<Statements>,
    pub config: WriterConfig,
    pub metrics: Arc<Metrics>,
    /// Set when shutdown starts; the writer keeps retrying `ack = "queue"`
    /// batches until this instant and then counts them lost.
    pub deadline: Arc<std::sync::OnceLock<Instant>>,
}

/// What a writer reports when its ring has closed and drained.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterReport {
    pub committed: u64,
    /// Events accepted but not committed (answered 503/500, or lost in queue mode).
    pub uncommitted: u64,
    /// Of those, events nobody was told about (`ack = "queue"`).
    pub lost: u64,
}

/// The jobs of one batch and which of their rows to write.
struct Batch {
    jobs: Vec<Job>,
    events: usize,
    bytes: usize,
    /// Per job, per row: keep it? `None` while nothing is repeated.
    keep: Option<Vec<Vec<bool>>>,
}

impl Batch {
    fn new(first: Job) -> Self {
        let mut b = Batch { jobs: Vec::with_capacity(16), events: 0, bytes: 0, keep: None };
        b.push(first);
        b
    }

    fn push(&mut self, job: Job) {
        self.events += job.rows.len();
        self.bytes += job.rows.bytes().len();
        self.jobs.push(job);
    }

    fn full(&self, config: &WriterConfig) -> bool {
        self.events >= config.max_batch_events || self.bytes >= config.max_batch_bytes
    }

    /// Marks every repeat of an `event_id` already seen in this batch.
    /// Returns how many rows were dropped.
    fn drop_repeats(&mut self) -> u64 {
        if self.events < 2 {
            return 0;
        }
        let mut seen: HashSet<&[u8]> = HashSet::with_capacity(self.events);
        let mut keep: Option<Vec<Vec<bool>>> = None;
        let mut dropped = 0;
        for (j, job) in self.jobs.iter().enumerate() {
            for r in 0..job.rows.len() {
                if !seen.insert(job.rows.event_id(r)) {
                    let keep = keep.get_or_insert_with(|| self.jobs.iter().map(|j| vec![true; j.rows.len()]).collect());
                    keep[j][r] = false;
                    dropped += 1;
                }
            }
        }
        self.keep = keep;
        dropped
    }

    /// Streams the kept rows of `jobs` (a sub-slice of this batch's jobs
    /// starting at `first`) into a COPY.
    fn write_rows(&self, first: usize, count: usize, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for j in first..first + count {
            let rows = &self.jobs[j].rows;
            match &self.keep {
                None => out.write_all(rows.bytes())?,
                Some(keep) => {
                    for r in (0..rows.len()).filter(|&r| keep[j][r]) {
                        out.write_all(rows.row(r))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn kept_rows(&self, first: usize, count: usize) -> u64 {
        (first..first + count)
            .map(|j| match &self.keep {
                None => self.jobs[j].rows.len() as u64,
                Some(keep) => keep[j].iter().filter(|k| **k).count() as u64,
            })
            .sum()
    }
}

impl Writer {
    /// Runs until every sender of the ring is gone and the ring is drained.
    pub fn run(self) -> WriterReport {
        let mut report = WriterReport::default();
        while let Some(mut batch) = self.next_batch() {
            let repeats = batch.drop_repeats();
            self.metrics.writers[self.id].events_duplicate.add(repeats);
            self.commit(&mut batch, &mut report);
            // Replies went out in commit(); dropping the batch frees its rows.
        }
        crate::debug!("writer finished", writer = self.id, committed = report.committed);
        report
    }

    fn next_batch(&self) -> Option<Batch> {
        let mut batch = Batch::new(self.ring.recv().ok()?);
        while !batch.full(&self.config) {
            match self.ring.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if self.config.max_linger_ms > 0 && !batch.full(&self.config) {
            let until = Instant::now() + Duration::from_millis(self.config.max_linger_ms);
            while !batch.full(&self.config) {
                match self.ring.recv_deadline(until) {
                    Ok(job) => batch.push(job),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        Some(batch)
    }

    /// Commits a batch and answers every job in it.
    fn commit(&self, batch: &mut Batch, report: &mut WriterReport) {
        let stats = &self.metrics.writers[self.id];
        let all = 0..batch.jobs.len();
        match self.write(batch, all.start, all.len()) {
            Ok(()) => self.answer(batch, all, CommitOutcome::Committed, report),
            Err(e) if !e.is_transient() && batch.jobs.len() > 1 => {
                // One request's rows poison the batch: commit each request
                // alone so the others still go in.
                crate::warn!("batch refused, retrying request by request", writer = self.id, error = e);
                for j in 0..batch.jobs.len() {
                    match self.write(batch, j, 1) {
                        Ok(()) => self.answer(batch, j..j + 1, CommitOutcome::Committed, report),
                        Err(e) => self.fail(batch, j..j + 1, &e, report),
                    }
                }
            }
            Err(e) => self.fail(batch, all, &e, report),
        }
        stats.batch_events.record(batch.events as u64);
    }

    /// One transaction for jobs `first..first+count`, retried on a fresh
    /// connection once after a transient failure (the pooled connection may
    /// have died while idle). With `ack = "queue"` nobody can be told to
    /// retry, so transient failures are retried until shutdown's deadline.
    fn write(&self, batch: &Batch, first: usize, count: usize) -> Result<(), WriteError> {
        let stats = &self.metrics.writers[self.id];
        let unacknowledged = batch.jobs[first..first + count].iter().all(|j| j.reply.is_none());
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            let result = self.pool.get().map_err(WriteError::from).and_then(|mut conn| {
                db::copy_batch(&mut conn, &self.sql, &|out| batch.write_rows(first, count, out))
            });
            match result {
                Ok(done) => {
                    self.metrics.database_up.store(true, Ordering::Relaxed);
                    stats.commit_us.record_duration(started.elapsed());
                    stats.batches.inc();
                    stats.events_committed.add(done.inserted);
                    stats.events_duplicate.add(batch.kept_rows(first, count).saturating_sub(done.inserted));
                    if done.via_staging {
                        stats.staging_fallbacks.inc();
                    }
                    return Ok(());
                }
                Err(e) => {
                    stats.batch_failures.inc();
                    if !e.is_transient() {
                        return Err(e);
                    }
                    self.metrics.database_up.store(false, Ordering::Relaxed);
                    attempt += 1;
                    let past_deadline = self.deadline.get().is_some_and(|d| Instant::now() >= *d);
                    if (attempt >= 2 && !unacknowledged) || past_deadline {
                        return Err(e);
                    }
                    if attempt >= 2 {
                        crate::warn!("database unavailable, retrying queued batch", writer = self.id, error = e);
                        std::thread::sleep(Duration::from_millis((100u64 << attempt.min(5)).min(2000)));
                    }
                }
            }
        }
    }

    fn answer(&self, batch: &mut Batch, jobs: std::ops::Range<usize>, outcome: CommitOutcome, report: &mut WriterReport) {
        let stats = &self.metrics.writers[self.id];
        for job in &mut batch.jobs[jobs] {
            stats.ack_us.record_duration(job.enqueued.elapsed());
            report.committed += job.rows.len() as u64;
            if let Some(reply) = job.reply.take() {
                // The shard may have gone (client disconnected): nothing to do.
                let _ = reply.send(outcome.clone());
            }
        }
    }

    fn fail(&self, batch: &mut Batch, jobs: std::ops::Range<usize>, e: &WriteError, report: &mut WriterReport) {
        let outcome = if e.is_transient() {
            CommitOutcome::Unavailable(e.message().to_string())
        } else {
            CommitOutcome::Refused(e.message().to_string())
        };
        for job in &mut batch.jobs[jobs] {
            report.uncommitted += job.rows.len() as u64;
            match job.reply.take() {
                Some(reply) => {
                    let _ = reply.send(outcome.clone());
                }
                None => {
                    report.lost += job.rows.len() as u64;
                    self.metrics.writers[self.id].events_lost.add(job.rows.len() as u64);
                    crate::error!("queued events lost", writer = self.id, events = job.rows.len(), error = e);
                }
            }
        }
    }
}
