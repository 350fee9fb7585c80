//! What each route does with a request, and the JSON it answers.
//!
//! Ingest routes parse and validate on the shard, hand the rows to a writer
//! ring without blocking (a full ring is 503 at once), and with
//! `ack = "commit"` await the writer's commit report before answering 200.
//! WebSocket ingest frames go through the same [`ingest_events`].
//!
//! Every step that would make a client wait or hold memory has a bound and
//! answers 503 + `Retry-After` past it ([`crate::labels::Shed`] names
//! which): the breaker, the estimated wait for a writer, the memory budget,
//! the wait itself (`ingest.max_wait_ms`), the spool.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::conn::Body;
use super::http::{self, BodyFraming, GunzipError, HeadError, Media, Method, RequestHead, Response};
use super::{ShardCtx, ws};
use crate::auth::{Denied, Grant, Scope, Secret};
use crate::broadcast::{Admission, Refusal};
use crate::budget::Lease;
use crate::config::AckMode;
use crate::ingest::event::Reason;
use crate::ingest::{BodyError, BodyKind, Clock, Rejection, parse};
use crate::labels::{RejectKind, Route, Shed};
use crate::limits::{IpPass, retry_after_secs};
use crate::pipeline::{self, CommitOutcome, HandOffError, Job, Reply, Ticket};

/// The answer to a head that could not be parsed.
pub fn head_error(ctx: &ShardCtx, e: &HeadError) -> Response {
    ctx.stats().request(Route::Unknown);
    match e {
        HeadError::Bad(why) => Response::error(400, why),
        HeadError::TooLarge(why) => Response::error(431, why),
        HeadError::Encoding => Response::error(415, "Content-Encoding must be gzip or identity"),
        HeadError::Version => Response::error(505, "only HTTP/1.0 and HTTP/1.1 are served"),
        HeadError::Partial => Response::error(400, "incomplete request head"),
    }
}

pub fn too_large_body(max: usize) -> Response {
    Response::error(413, &format!("body larger than server.max_body_bytes ({max} bytes)"))
}

/// Who may make this request, before anything else is looked at: the
/// client IP's rate, then (unless the route is `/health`) its token and the
/// token's rate and scope. `Ok(None)` when authentication is off.
pub fn admit(ctx: &ShardCtx, head: &RequestHead, ip: &IpPass) -> Result<Option<Arc<Grant>>, Response> {
    let (ip_rate, token_rate) = {
        let c = ctx.config();
        (c.limits.ip_rate(), c.limits.token_rate())
    };
    ip.take(ip_rate.0, ip_rate.1)
        .map_err(|wait| too_many_requests("too many requests from this address (limits.ip_requests_per_s)", wait))?;
    let scope = match head.target {
        Route::Health | Route::Unknown => return Ok(None),
        Route::Events | Route::Batch => Scope::Ingest,
        Route::Stats | Route::Metrics => Scope::Admin,
        // The query decides between them; `upgrade` checks which.
        Route::Ws => Scope::Subscribe,
    };
    let query_token;
    let token = match (&head.bearer, &head.websocket) {
        (Some(t), _) => Some(t),
        (None, Some(ws)) => {
            query_token = access_token(&ws.query);
            query_token.as_ref()
        }
        (None, None) => None,
    };
    let Some(grant) = ctx.tokens.load().authenticate(token).map_err(unauthorized)? else {
        return Ok(None);
    };
    ip.take_from(&grant.rate, token_rate.0, token_rate.1).map_err(|wait| {
        too_many_requests(&format!("too many requests with {} (limits.token_requests_per_s)", grant.label()), wait)
    })?;
    if scope != Scope::Subscribe && !grant.allows(scope) {
        return Err(forbidden_scope(&grant, scope));
    }
    Ok(Some(grant))
}

/// `?access_token=` of a WebSocket upgrade.
fn access_token(query: &str) -> Option<Secret> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "access_token")
        .filter(|(_, v)| !v.is_empty())
        .map(|(_, v)| Secret::new(v.as_bytes()))
}

pub fn unauthorized(why: Denied) -> Response {
    let mut r = Response::error(401, &why.to_string());
    r.challenge = Some("Bearer");
    r
}

pub fn forbidden_scope(grant: &Grant, scope: Scope) -> Response {
    Response::error(403, &format!("{} lacks the `{}` scope this needs", grant.label(), scope.as_str()))
}

pub fn too_many_requests(message: &str, wait: std::time::Duration) -> Response {
    Response::error(429, message).retry_after(retry_after_secs(wait))
}

/// Decides everything that can be decided from the head alone, before any
/// body byte is read: unknown routes, methods, framing, media type, size.
pub fn refuse_before_body(ctx: &ShardCtx, head: &RequestHead) -> Option<Response> {
    let ingest = matches!(head.target, Route::Events | Route::Batch);
    let method_ok = match head.target {
        Route::Events | Route::Batch => head.method == Method::Post,
        Route::Unknown => true,
        _ => matches!(head.method, Method::Get | Method::Head),
    };
    let refusal = if head.target == Route::Unknown {
        Response::error(404, "no such route; see POST /events, POST /events/batch, GET /ws, /health, /stats, /metrics")
    } else if !method_ok {
        let mut r = Response::error(405, &format!("method not allowed here; use {}", head.target.allow()));
        r.allow = Some(head.target.allow());
        r
    } else if !ingest {
        return None;
    } else if head.body == BodyFraming::None {
        Response::error(411, "a body needs Content-Length or Transfer-Encoding: chunked")
    } else if head.media == Media::Unsupported {
        Response::error(415, "Content-Type must be application/json, or application/x-ndjson on /events/batch")
    } else if let BodyFraming::Length(n) = head.body
        && n > ctx.config().server.max_body_bytes as u64
    {
        too_large_body(ctx.config().server.max_body_bytes)
    } else {
        return None;
    };
    Some(refusal)
}

/// 503 + `Retry-After` for a request that does not fit in the memory budget.
pub fn over_budget(ctx: &ShardCtx, key: &str) -> Response {
    ctx.stats().shed(Shed::MemoryBudget);
    unavailable(ctx, &format!("server is over its memory budget ({key}); nothing was stored, retry later"))
}

fn unavailable(ctx: &ShardCtx, message: &str) -> Response {
    Response::error(503, message).retry_after(ctx.config().server.retry_after_s)
}

/// Refuses (503) an ingest request that could not be served in time, before
/// its body is read: the breaker is open, or the writers could not start
/// its COPY within `ingest.max_wait_ms`. With `ack = "spool"` the spool
/// rides these out, so only the spool's own bounds apply.
pub fn refuse_for_load(ctx: &ShardCtx, head: &RequestHead) -> Option<Response> {
    if !matches!(head.target, Route::Events | Route::Batch) {
        return None;
    }
    load_refusal(ctx).map(|(why, message)| {
        ctx.stats().shed(why);
        unavailable(ctx, &message)
    })
}

/// Whether the writers can take a request now; `Some` says why not.
fn load_refusal(ctx: &ShardCtx) -> Option<(Shed, String)> {
    if ctx.spool.is_some() {
        return None;
    }
    let now = Instant::now();
    if let crate::breaker::Admission::Rejected { retry_after } = ctx.metrics.breaker.admit(now) {
        return Some((
            Shed::BreakerOpen,
            format!(
                "database unavailable (circuit breaker open); nothing was stored, retry in {} ms",
                retry_after.as_millis().max(1)
            ),
        ));
    }
    let max_wait = Duration::from_millis(ctx.config().ingest.max_wait_ms);
    let wait = ctx.rings.backlog().wait_estimate(now);
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

/// Answers a request whose head passed [`refuse_before_body`] and whose body
/// has been read.
pub async fn handle(ctx: &ShardCtx, head: &RequestHead, body: Body, grant: Option<&Grant>) -> Response {
    match head.target {
        Route::Events => ingest(ctx, head, body, BodyKind::Single, grant).await,
        Route::Batch if head.media == Media::Ndjson => ingest(ctx, head, body, BodyKind::Ndjson, grant).await,
        Route::Batch => ingest(ctx, head, body, BodyKind::JsonArray, grant).await,
        Route::Health => {
            let status = if ctx.metrics.ready() { 200 } else { 503 };
            let r = Response::json(status, ctx.metrics.health_json());
            if status == 503 { r.retry_after(ctx.config().server.retry_after_s) } else { r }
        }
        Route::Stats => Response::json(200, ctx.metrics.stats_json()),
        Route::Metrics => {
            let mut r = Response::json(200, ctx.metrics.prometheus());
            r.content_type = "text/plain; version=0.0.4; charset=utf-8";
            r
        }
        Route::Ws | Route::Unknown => Response::error(404, "no such route"),
    }
}

async fn ingest(ctx: &ShardCtx, head: &RequestHead, body: Body, kind: BodyKind, grant: Option<&Grant>) -> Response {
    let (max_decompressed, retry_after) = {
        let c = ctx.config();
        (c.server.max_decompressed_bytes, c.server.retry_after_s)
    };
    let Body { bytes, mut lease } = body;
    let bytes = if head.gzip {
        match http::gunzip(&bytes, max_decompressed, &mut lease) {
            Ok(b) => {
                // The compressed body goes; its bytes leave the lease.
                drop(bytes);
                lease.set(b.capacity());
                b
            }
            Err(GunzipError::Invalid) => return Response::error(400, "body is not valid gzip"),
            Err(GunzipError::TooLarge) => {
                return Response::error(
                    413,
                    &format!("gzip body inflates past server.max_decompressed_bytes ({max_decompressed})"),
                );
            }
            Err(GunzipError::OverBudget(e)) => return over_budget(ctx, e.key),
        }
    } else {
        bytes
    };
    match ingest_events(ctx, bytes, lease, kind, grant).await {
        Ingested::Answer { status, accepted, rejected } => Response::json(status, ingest_json(accepted, &rejected)),
        Ingested::BodyRefused { status, message } => {
            Response::json(status, serde_json::json!({"error": message, "accepted": 0, "rejected": []}).to_string())
        }
        Ingested::Failed { status, message, retry } => {
            let r = Response::error(status, &message);
            if retry { r.retry_after(retry_after) } else { r }
        }
    }
}

/// What ingesting one body came to, for HTTP and WebSocket alike.
pub enum Ingested {
    /// 200 (committed), 202 (queued) or 400 (no event was valid).
    Answer { status: u16, accepted: usize, rejected: Vec<Rejection> },
    /// The body as a whole was refused (400 malformed, 413 too many events).
    BodyRefused { status: u16, message: String },
    /// Nothing stored: 503 (retry may help) or 500.
    Failed { status: u16, message: String, retry: bool },
}

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
    let stats = ctx.stats();
    let failed = |status, message: &str, retry| Ingested::Failed { status, message: message.to_string(), retry };
    // The breaker and the writers' backlog, again: a WebSocket frame comes
    // straight here, and time has passed while an HTTP body was read.
    if let Some((why, message)) = load_refusal(ctx) {
        stats.shed(why);
        return failed(503, &message, true);
    }
    let now_unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    let (rules, ack, shutdown_timeout, max_wait) = {
        let c = ctx.config();
        (
            crate::ingest::Rules::from_config(&c.ingest),
            c.ingest.ack,
            c.server.shutdown_timeout(),
            Duration::from_millis(c.ingest.max_wait_ms),
        )
    };
    // Parsing takes scratch and rows besides the body: leased first. A small
    // body asks for a bound that needs no scan; the scanned one is computed
    // when that does not fit, or for a large body.
    let len = body.as_ref().len();
    let cheap = (len <= parse::SCAN_ABOVE_BYTES).then(|| parse::working_bytes_unscanned(len));
    let fits = cheap.is_some_and(|bound| lease.try_grow(bound).is_ok());
    let mut working = cheap.unwrap_or(0);
    let leased = if fits {
        Ok(())
    } else {
        working = parse::working_bytes(body.as_ref(), kind);
        lease.try_grow(working)
    };
    if let Err(e) = leased {
        if lease.bytes() + working > e.limit {
            return failed(
                413,
                &format!(
                    "this body needs about {} bytes to parse, more than {} allows in all; send smaller batches",
                    lease.bytes() + working,
                    e.key
                ),
                false,
            );
        }
        stats.shed(Shed::MemoryBudget);
        return failed(
            503,
            &format!("server is over its memory budget ({}); nothing was stored, retry later", e.key),
            true,
        );
    }
    // The parser is borrowed only for this synchronous call, never across an await.
    let parsed = {
        let mut parser = ctx.parser.borrow_mut();
        parser.set_rules(rules);
        let parsed = parser.parse(body.as_ref(), kind, Clock { now_unix_us });
        parser.shed();
        parsed
    };
    drop(body);
    let mut parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            let status = if matches!(e, BodyError::TooManyEvents { .. }) { 413 } else { 400 };
            if let BodyError::Malformed(_) = e {
                stats.rejected(RejectKind::Malformed);
            }
            return Ingested::BodyRefused { status, message: e.to_string() };
        }
    };
    parsed.rows.shrink();
    lease.set(parsed.rows.memory_bytes() + parsed.rejected.len() * REJECTION_BYTES);
    if let Some(grant) = grant.filter(|g| !g.device_prefix.is_empty())
        && let Some(row) =
            (0..parsed.rows.len()).find(|&i| parsed.rows.view(i).is_none_or(|v| !grant.owns_device(v.device_id)))
    {
        let index = request_index(&parsed.rejected, row);
        return Ingested::Failed {
            status: 403,
            message: format!(
                "event {index}: {} may only write device_ids starting with {:?}; nothing was stored",
                grant.label(),
                grant.device_prefix
            ),
            retry: false,
        };
    }
    for r in &parsed.rejected {
        stats.rejected(r.error.kind);
    }
    let accepted = parsed.rows.len();
    stats.events_accepted.add(accepted as u64);
    if accepted == 0 {
        return Ingested::Answer { status: 400, accepted: 0, rejected: parsed.rejected };
    }
    if let Some(spool) = &ctx.spool {
        return spool_append(ctx, spool, parsed, lease, max_wait).await;
    }
    let (reply, wait) = match ack {
        AckMode::Commit => {
            let (tx, rx) = pipeline::commit_channel();
            let ticket = Ticket::new();
            (Reply::Shard { tx, ticket: ticket.clone() }, Some((rx, ticket)))
        }
        AckMode::Queue | AckMode::Spool => (Reply::None, None),
    };
    let enqueued = Instant::now();
    let job = Job { rows: parsed.rows, reply, enqueued, lease };
    match ctx.rings.try_send(job) {
        Ok(()) => {}
        Err(HandOffError::Full(_)) => {
            stats.shed(Shed::RingFull);
            return failed(503, "ingest rings are full; retry later", true);
        }
        Err(HandOffError::Closed(_)) => {
            stats.shed(Shed::ShuttingDown);
            return failed(503, "shutting down; retry on another instance or later", true);
        }
    }
    let Some((mut wait, ticket)) = wait else {
        return Ingested::Answer { status: 202, accepted, rejected: parsed.rejected };
    };
    // At shutdown, a commit that is not reported in time is answered 503
    // (before the process exits) rather than left to a dropped connection.
    let give_up = async {
        let _ = ctx.shutdown.clone().await;
        monoio::time::sleep(shutdown_timeout.mul_f64(0.9)).await;
    };
    let mut give_up = std::pin::pin!(give_up);
    // Until a writer claims it, the request may be given up after `max_wait`.
    let outcome = monoio::select! {
        r = &mut wait => Some(r),
        _ = monoio::time::sleep(max_wait.saturating_sub(enqueued.elapsed())) => None,
        _ = &mut give_up => Some(Err(futures_channel::oneshot::Canceled)),
    };
    let outcome = match outcome {
        Some(r) => Some(r),
        None if ticket.cancel() => {
            stats.shed(Shed::WaitExpired);
            return failed(
                503,
                &format!(
                    "no writer could start this request within ingest.max_wait_ms ({} ms); nothing was stored, \
                     retry later or elsewhere",
                    max_wait.as_millis()
                ),
                true,
            );
        }
        // A writer claimed it: its COPY has started; wait for the commit.
        None => monoio::select! {
            r = &mut wait => Some(r),
            _ = &mut give_up => None,
        },
    };
    let Some(outcome) = outcome else {
        return failed(503, "shutting down before this batch was committed; it may or may not be stored: retry", true);
    };
    match outcome {
        Ok(CommitOutcome::Committed { dead_letters }) if dead_letters.is_empty() => {
            Ingested::Answer { status: 200, accepted, rejected: parsed.rejected }
        }
        Ok(CommitOutcome::Committed { dead_letters }) => {
            let mut rejected = parsed.rejected;
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

/// Heap bytes one rejection holds (its reason's text), for the lease.
const REJECTION_BYTES: usize = 128;

/// `ack = "spool"`: durable on local disk is the promise; the drainer takes
/// the rows to PostgreSQL from there. The fsync is awaited at most
/// `max_wait`: past it the client gets a 503 (the record may still become
/// durable and be stored; a retry is idempotent).
async fn spool_append(
    ctx: &ShardCtx,
    spool: &crate::spool::SpoolSender,
    parsed: crate::ingest::Parsed,
    mut lease: Lease,
    max_wait: Duration,
) -> Ingested {
    let stats = ctx.stats();
    let failed = |status, message: &str, retry| Ingested::Failed { status, message: message.to_string(), retry };
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

/// Decides a `GET /ws` upgrade: the handshake, the query, the limits.
/// On success: the `Sec-WebSocket-Accept` value, the subscription, and the
/// admission that holds the subscriber's slot.
pub fn upgrade(
    ctx: &ShardCtx,
    head: &RequestHead,
    peer: IpAddr,
    grant: Option<&Grant>,
) -> Result<(String, ws::WsRequest, Admission), Response> {
    let retry = ctx.config().server.retry_after_s;
    let Some(hs) = head.websocket.as_deref() else {
        return Err(Response::error(400, "expected a WebSocket upgrade"));
    };
    if !hs.upgrade {
        return Err(Response::error(426, "GET /ws needs `Upgrade: websocket` and `Connection: Upgrade`"));
    }
    if hs.version.as_deref() != Some("13") {
        return Err(Response::error(426, "Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = hs.key.as_deref().filter(|k| !k.is_empty()) else {
        return Err(Response::error(400, "Sec-WebSocket-Key is missing"));
    };
    if ctx.is_shutting_down() {
        return Err(Response::error(503, "shutting down").retry_after(retry));
    }
    let mut request = ws::WsRequest::parse(&hs.query).map_err(|why| Response::error(400, &why))?;
    if let Some(grant) = grant {
        let needs = if request.ingest_only { Scope::Ingest } else { Scope::Subscribe };
        if !grant.allows(needs) {
            let mut refusal = forbidden_scope(grant, needs);
            if needs == Scope::Subscribe && grant.allows(Scope::Ingest) {
                refusal = Response::error(
                    403,
                    &format!(
                        "{} lacks the `subscribe` scope; add subscribe=false for an ingest-only socket",
                        grant.label()
                    ),
                );
            }
            return Err(refusal);
        }
        if !grant.device_prefix.is_empty() {
            if request.device_id.as_deref().is_some_and(|d| !grant.owns_device(d.as_bytes())) {
                return Err(Response::error(
                    403,
                    &format!(
                        "{} may only subscribe to device_ids starting with {:?}",
                        grant.label(),
                        grant.device_prefix
                    ),
                ));
            }
            request.device_prefix = Some(grant.device_prefix.clone());
        }
    }
    let admission = ctx.hub.admit(ctx.id, peer, ctx.ws_limits().max_per_shard).map_err(|refusal| match refusal {
        Refusal::Full => {
            Response::error(503, "subscriber limit reached (websocket.max_subscribers)").retry_after(retry)
        }
        Refusal::PerIp => {
            Response::error(429, "too many WebSocket connections from this address (websocket.max_per_ip)")
                .retry_after(retry)
        }
    })?;
    Ok((tungstenite::handshake::derive_accept_key(key.as_bytes()), request, admission))
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
