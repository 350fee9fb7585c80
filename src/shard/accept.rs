//! Accepting one body of events, for HTTP and WebSocket ingest alike:
//! admit → lease → parse → authorize → hand off → await → answer, each a
//! small step below. The routes (`routes`) and the WebSocket session (`ws`)
//! own their framing and call [`ingest_events`]; neither calls the other.
//!
//! Every step that would make a client wait or hold memory has a bound and
//! answers 503 + `Retry-After` past it ([`crate::labels::Shed`] names which):
//! the breaker, the estimated wait for a writer, the memory budget, the wait
//! itself (`ingest.max_wait_ms`), the spool.

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::ShardCtx;
use crate::auth::Grant;
use crate::budget::Lease;
use crate::config::AckMode;
use crate::ingest::event::Reason;
use crate::ingest::{BodyError, BodyKind, Clock, Parsed, Rejection, parse};
use crate::labels::{RejectKind, Shed};
use crate::pipeline::{self, CommitOutcome, CommitWait, HandOffError, Job, Reply, Ticket};

/// What ingesting one body came to, for HTTP and WebSocket alike.
pub enum Ingested {
    /// 200 (committed), 202 (queued) or 400 (no event was valid).
    Answer { status: u16, accepted: usize, rejected: Vec<Rejection> },
    /// The body as a whole was refused (400 malformed, 413 too many events).
    BodyRefused { status: u16, message: String },
    /// Nothing stored: 503 (retry may help) or 500, 403, 413.
    Failed { status: u16, message: String, retry: bool },
}

fn failed(status: u16, message: &str, retry: bool) -> Ingested {
    Ingested::Failed { status, message: message.to_string(), retry }
}

/// Heap bytes one rejection holds (its reason's text), for the lease.
const REJECTION_BYTES: usize = 128;

/// Validates a body on this shard, hands its rows to a writer without
/// blocking, and with `ack = "commit"` waits for the commit report. A
/// `grant` with a device prefix refuses (403) a body with any event outside it.
///
/// `lease` holds the body's bytes in the memory budget; it grows for the
/// parse, shrinks to the encoded rows, and travels with them to the writer.
/// The body itself is dropped as soon as it is parsed.
pub async fn ingest_events<B: AsRef<[u8]>>(
    ctx: &ShardCtx,
    body: B,
    mut lease: Lease,
    kind: BodyKind,
    grant: Option<&Grant>,
) -> Ingested {
    // The breaker and the writers' backlog, again: a WebSocket frame comes
    // straight here, and time has passed while an HTTP body was read.
    if let Some((why, message)) = load_refusal(ctx) {
        ctx.stats().shed(why);
        return failed(503, &message, true);
    }
    if let Err(refusal) = lease_parse(ctx, body.as_ref(), kind, &mut lease) {
        return refusal;
    }
    let parsed = match parse_body(ctx, body, kind) {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    lease.set(parsed.rows.memory_bytes() + parsed.rejected.len() * REJECTION_BYTES);
    if let Some(refusal) = authorize(&parsed, grant) {
        return refusal;
    }
    let stats = ctx.stats();
    for r in &parsed.rejected {
        stats.rejected(r.error.kind);
    }
    let accepted = parsed.rows.len();
    stats.events_accepted.add(accepted as u64);
    if accepted == 0 {
        return Ingested::Answer { status: 400, accepted: 0, rejected: parsed.rejected };
    }
    let max_wait = Duration::from_millis(ctx.config().ingest.max_wait_ms);
    if let Some(spool) = &ctx.spool {
        return spool_append(ctx, spool, parsed, lease, max_wait).await;
    }
    let Parsed { rows, rejected } = parsed;
    let waiting = match hand_off(ctx, rows, lease) {
        Ok(waiting) => waiting,
        Err(refusal) => return refusal,
    };
    let Some((wait, ticket, enqueued)) = waiting else {
        return Ingested::Answer { status: 202, accepted, rejected };
    };
    let outcome = match await_commit(ctx, wait, ticket, enqueued, max_wait).await {
        Ok(outcome) => outcome,
        Err(refusal) => return refusal,
    };
    answer(ctx, outcome, accepted, rejected)
}

/// Whether the writers can take a request now; `Some` says why not: the
/// breaker is open, or the estimated wait for a writer passes
/// `ingest.max_wait_ms`. With `ack = "spool"` the spool rides these out.
pub fn load_refusal(ctx: &ShardCtx) -> Option<(Shed, String)> {
    if ctx.spool.is_some() {
        return None;
    }
    let now = Instant::now();
    if let crate::breaker::Admission::Rejected { retry_after } = ctx.health.breaker.admit(now) {
        return Some((
            Shed::BreakerOpen,
            format!(
                "database unavailable (circuit breaker open); nothing was stored, retry in {} ms",
                retry_after.as_millis().max(1)
            ),
        ));
    }
    let max_wait = Duration::from_millis(ctx.config().ingest.max_wait_ms);
    let wait = ctx.ring.backlog().wait_estimate(now);
    (wait > max_wait).then(|| {
        (
            Shed::WaitEstimate,
            format!(
                "the writers are behind: this request would wait about {} ms for one, more than \
                 ingest.max_wait_ms ({} ms); nothing was stored, retry later or elsewhere",
                wait.as_millis(),
                max_wait.as_millis()
            ),
        )
    })
}

/// Leases what parsing takes besides the body (scratch and rows). A small
/// body asks for a bound that needs no scan; the scanned one is computed
/// when that does not fit, or for a large body. A body that could never fit
/// is 413; one that does not fit now, 503.
fn lease_parse(ctx: &ShardCtx, body: &[u8], kind: BodyKind, lease: &mut Lease) -> Result<(), Ingested> {
    let len = body.len();
    if len <= parse::SCAN_ABOVE_BYTES && lease.try_grow(parse::working_bytes_unscanned(len)).is_ok() {
        return Ok(());
    }
    let working = parse::working_bytes(body, kind);
    let Err(e) = lease.try_grow(working) else { return Ok(()) };
    if lease.bytes() + working > e.limit {
        return Err(failed(
            413,
            &format!(
                "this body needs about {} bytes to parse, more than {} allows in all; send smaller batches",
                lease.bytes() + working,
                e.key
            ),
            false,
        ));
    }
    ctx.stats().shed(Shed::MemoryBudget);
    Err(failed(503, &format!("server is over its memory budget ({}); nothing was stored, retry later", e.key), true))
}

/// Parses and validates on this shard's parser; the body is dropped here.
fn parse_body<B: AsRef<[u8]>>(ctx: &ShardCtx, body: B, kind: BodyKind) -> Result<Parsed, Ingested> {
    let now_unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    let rules = crate::ingest::Rules::from_config(&ctx.config().ingest);
    // The parser is borrowed only for this synchronous call, never across an await.
    let parsed = {
        let mut parser = ctx.parser.borrow_mut();
        parser.set_rules(rules);
        let parsed = parser.parse(body.as_ref(), kind, Clock { now_unix_us });
        parser.shed();
        parsed
    };
    drop(body);
    match parsed {
        Ok(mut p) => {
            p.rows.shrink();
            Ok(p)
        }
        Err(e) => {
            let status = if matches!(e, BodyError::TooManyEvents { .. }) { 413 } else { 400 };
            if let BodyError::Malformed(_) = e {
                ctx.stats().rejected(RejectKind::Malformed);
            }
            Err(Ingested::BodyRefused { status, message: e.to_string() })
        }
    }
}

/// A token with a device prefix may only write its own devices: any event
/// outside it refuses the whole request (403), nothing stored.
fn authorize(parsed: &Parsed, grant: Option<&Grant>) -> Option<Ingested> {
    let grant = grant.filter(|g| !g.device_prefix.is_empty())?;
    let row = (0..parsed.rows.len()).find(|&i| parsed.rows.view(i).is_none_or(|v| !grant.owns_device(v.device_id)))?;
    let index = request_index(&parsed.rejected, row);
    Some(failed(
        403,
        &format!(
            "event {index}: {} may only write device_ids starting with {:?}; nothing was stored",
            grant.label(),
            grant.device_prefix
        ),
        false,
    ))
}

/// Hands the rows to the writers' ring without blocking. With
/// `ack = "commit"` returns what to await: the reply, the ticket that
/// settles a give-up, and when it was handed over; `None` with `ack = "queue"`.
fn hand_off(
    ctx: &ShardCtx,
    rows: crate::row::RowBuf,
    lease: Lease,
) -> Result<Option<(CommitWait, Ticket, Instant)>, Ingested> {
    let (reply, wait) = match ctx.config().ingest.ack {
        AckMode::Commit => {
            let (tx, rx) = pipeline::commit_channel();
            let ticket = Ticket::new();
            (Reply::Shard { tx, ticket: ticket.clone() }, Some((rx, ticket)))
        }
        AckMode::Queue | AckMode::Spool => (Reply::None, None),
    };
    let enqueued = Instant::now();
    match ctx.ring.try_send(Job { rows, reply, enqueued, lease }) {
        Ok(()) => Ok(wait.map(|(rx, ticket)| (rx, ticket, enqueued))),
        Err(HandOffError::Full(_)) => {
            ctx.stats().shed(Shed::RingFull);
            Err(failed(503, "the ingest ring is full; retry later", true))
        }
        Err(HandOffError::Closed(_)) => {
            ctx.stats().shed(Shed::ShuttingDown);
            Err(failed(503, "shutting down; retry on another instance or later", true))
        }
    }
}

/// Waits for the writer's report. Until a writer claims the request it may
/// be given up after `max_wait` (then it is never written: 503); once
/// claimed, its COPY has started and the commit is awaited. At shutdown a
/// commit not reported in time is answered 503 before the process exits.
async fn await_commit(
    ctx: &ShardCtx,
    mut wait: CommitWait,
    ticket: Ticket,
    enqueued: Instant,
    max_wait: Duration,
) -> Result<Result<CommitOutcome, futures_channel::oneshot::Canceled>, Ingested> {
    let shutdown_timeout = ctx.config().server.shutdown_timeout();
    let give_up = async {
        let _ = ctx.shutdown.clone().await;
        monoio::time::sleep(shutdown_timeout.mul_f64(0.9)).await;
    };
    let mut give_up = std::pin::pin!(give_up);
    let outcome = monoio::select! {
        r = &mut wait => Some(r),
        _ = monoio::time::sleep(max_wait.saturating_sub(enqueued.elapsed())) => None,
        _ = &mut give_up => Some(Err(futures_channel::oneshot::Canceled)),
    };
    let outcome = match outcome {
        Some(r) => Some(r),
        None if ticket.cancel() => {
            ctx.stats().shed(Shed::WaitExpired);
            return Err(failed(
                503,
                &format!(
                    "no writer could start this request within ingest.max_wait_ms ({} ms); nothing was stored, \
                     retry later or elsewhere",
                    max_wait.as_millis()
                ),
                true,
            ));
        }
        None => monoio::select! {
            r = &mut wait => Some(r),
            _ = &mut give_up => None,
        },
    };
    outcome.ok_or_else(|| {
        failed(503, "shutting down before this batch was committed; it may or may not be stored: retry", true)
    })
}

/// Turns a writer's report into the answer: dead letters join the
/// rejected events, with the request's own indexes.
fn answer(
    ctx: &ShardCtx,
    outcome: Result<CommitOutcome, futures_channel::oneshot::Canceled>,
    accepted: usize,
    mut rejected: Vec<Rejection>,
) -> Ingested {
    let stats = ctx.stats();
    match outcome {
        Ok(CommitOutcome::Committed { dead_letters }) if dead_letters.is_empty() => {
            Ingested::Answer { status: 200, accepted, rejected }
        }
        Ok(CommitOutcome::Committed { dead_letters }) => {
            let refused = dead_letters.len();
            let table = ctx.config().dead_letter_table();
            let mut extra: Vec<Rejection> = dead_letters
                .into_iter()
                .map(|(row, why)| Rejection {
                    index: request_index(&rejected, row),
                    error: Reason::new(
                        RejectKind::RefusedByDatabase,
                        format!("PostgreSQL refused this event ({why}); it was kept in {table}"),
                    ),
                })
                .collect();
            for r in &extra {
                stats.rejected(r.error.kind);
            }
            rejected.append(&mut extra);
            rejected.sort_by_key(|r| r.index);
            let accepted = accepted - refused;
            Ingested::Answer { status: if accepted > 0 { 200 } else { 400 }, accepted, rejected }
        }
        Ok(CommitOutcome::Expired(why)) => {
            stats.shed(Shed::WaitExpired);
            failed(503, &why, true)
        }
        Ok(CommitOutcome::Unavailable(why)) => {
            failed(503, &format!("database unavailable, nothing was stored: {why}"), true)
        }
        Ok(CommitOutcome::Refused(why)) => {
            failed(500, &format!("PostgreSQL refused these events, nothing was stored: {why}"), false)
        }
        Err(_canceled) => failed(503, "writer stopped before commit; retry", true),
    }
}

/// `ack = "spool"`: durable on local disk is the promise; the drainer takes
/// the rows to PostgreSQL from there. The fsync is awaited at most
/// `max_wait`: past it the client gets a 503 (the record may still become
/// durable and be stored; a retry is idempotent).
async fn spool_append(
    ctx: &ShardCtx,
    spool: &crate::spool::SpoolSender,
    parsed: Parsed,
    mut lease: Lease,
    max_wait: Duration,
) -> Ingested {
    let stats = ctx.stats();
    let accepted = parsed.rows.len();
    let record = parsed.rows.to_spool_record();
    drop(parsed.rows);
    lease.set(record.capacity() + parsed.rejected.len() * REJECTION_BYTES);
    let appended = match spool.try_append_leased(record, lease) {
        Ok(wait) => monoio::select! {
            r = wait => Some(r),
            _ = monoio::time::sleep(max_wait) => None,
        },
        Err(e) => Some(Err(e)),
    };
    match appended {
        Some(Ok(_seq)) => Ingested::Answer { status: 200, accepted, rejected: parsed.rejected },
        Some(Err(crate::spool::SpoolError::TooLarge { .. })) => {
            failed(413, "request too large for one spool record (spool.segment_bytes)", false)
        }
        Some(Err(e)) => {
            stats.shed(Shed::Spool);
            failed(503, &format!("spool cannot take these events, nothing was stored: {e}"), true)
        }
        None => {
            stats.shed(Shed::Spool);
            failed(
                503,
                &format!(
                    "the spool did not confirm these events within ingest.max_wait_ms ({} ms); they may or may \
                     not be stored: retry (idempotent)",
                    max_wait.as_millis()
                ),
                true,
            )
        }
    }
}

/// The request index of accepted row `row`: rows are the events that passed
/// validation, in order, so skip the rejected indexes (sorted) before it.
fn request_index(rejected: &[Rejection], row: usize) -> usize {
    let mut index = row;
    for r in rejected {
        if r.index <= index {
            index += 1;
        } else {
            break;
        }
    }
    index
}

/// `{"accepted": N, "rejected": [{"index": i, "error": "..."}]}`
pub fn ingest_json(accepted: usize, rejected: &[Rejection]) -> String {
    let mut s = String::with_capacity(32 + rejected.len() * 80);
    let _ = write!(s, "{{\"accepted\":{accepted},\"rejected\":[");
    for (i, r) in rejected.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{{\"index\":{},\"error\":{}}}", r.index, serde_json::Value::from(&*r.error.message));
    }
    s.push_str("]}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_map_back_to_request_indexes() {
        let rej = |i| Rejection { index: i, error: Reason::new(RejectKind::InvalidValue, "x") };
        let rejected = [rej(0), rej(2), rej(3)];
        // Request: 0 rej, 1 row0, 2 rej, 3 rej, 4 row1, 5 row2.
        assert_eq!([0, 1, 2].map(|r| request_index(&rejected, r)), [1, 4, 5]);
        assert_eq!(request_index(&[], 7), 7);
    }

    #[test]
    fn ingest_body_shape() {
        let rejected = [Rejection { index: 2, error: Reason::new(RejectKind::InvalidValue, "bad \"x\"") }];
        let v: serde_json::Value = serde_json::from_str(&ingest_json(3, &rejected)).unwrap();
        assert_eq!(v, serde_json::json!({"accepted": 3, "rejected": [{"index": 2, "error": "bad \"x\""}]}));
    }
}
