//! What each route does with a request, and the JSON it answers.
//!
//! Ingest routes parse and validate on the shard, hand the rows to a writer
//! ring without blocking (a full ring is 503 at once), and with
//! `ack = "commit"` await the writer's commit report before answering 200.
//! WebSocket ingest frames go through the same [`ingest_events`].

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::http::{self, BodyFraming, GunzipError, HeadError, Media, Method, RequestHead, Response, Target};
use super::{ShardCtx, ws};
use crate::auth::{Denied, Grant, Scope, Secret};
use crate::broadcast::{Admission, Refusal};
use crate::config::AckMode;
use crate::ingest::event::{Reason, RejectKind};
use crate::ingest::{BodyError, BodyKind, Clock, Rejection};
use crate::limits::{IpPass, retry_after_secs};
use crate::metrics::Route;
use crate::pipeline::{self, CommitOutcome, HandOffError, Job, Reply};

/// The metrics label of a request.
pub fn route(head: &RequestHead) -> Route {
    match head.target {
        Target::Events => Route::Event,
        Target::Batch => Route::Batch,
        Target::Health => Route::Health,
        Target::Stats => Route::Stats,
        Target::Metrics => Route::Metrics,
        Target::Ws => Route::Ws,
        Target::Unknown => Route::Other,
    }
}

/// The answer to a head that could not be parsed.
pub fn head_error(ctx: &ShardCtx, e: &HeadError) -> Response {
    ctx.stats().request(Route::Other);
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
        Target::Health | Target::Unknown => return Ok(None),
        Target::Events | Target::Batch => Scope::Ingest,
        Target::Stats | Target::Metrics => Scope::Admin,
        // The query decides between them; `upgrade` checks which.
        Target::Ws => Scope::Subscribe,
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
    let ingest = matches!(head.target, Target::Events | Target::Batch);
    let method_ok = match head.target {
        Target::Events | Target::Batch => head.method == Method::Post,
        Target::Unknown => true,
        _ => matches!(head.method, Method::Get | Method::Head),
    };
    let refusal = if head.target == Target::Unknown {
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

/// Answers a request whose head passed [`refuse_before_body`] and whose body
/// has been read.
pub async fn handle(ctx: &ShardCtx, head: &RequestHead, body: Vec<u8>, grant: Option<&Grant>) -> Response {
    match head.target {
        Target::Events => ingest(ctx, head, body, BodyKind::Single, grant).await,
        Target::Batch if head.media == Media::Ndjson => ingest(ctx, head, body, BodyKind::Ndjson, grant).await,
        Target::Batch => ingest(ctx, head, body, BodyKind::JsonArray, grant).await,
        Target::Health => {
            let status = if ctx.metrics.ready() { 200 } else { 503 };
            let r = Response::json(status, ctx.metrics.health_json());
            if status == 503 { r.retry_after(ctx.config().server.retry_after_s) } else { r }
        }
        Target::Stats => Response::json(200, ctx.metrics.stats_json()),
        Target::Metrics => {
            let mut r = Response::json(200, ctx.metrics.prometheus());
            r.content_type = "text/plain; version=0.0.4; charset=utf-8";
            r
        }
        Target::Ws | Target::Unknown => Response::error(404, "no such route"),
    }
}

async fn ingest(ctx: &ShardCtx, head: &RequestHead, body: Vec<u8>, kind: BodyKind, grant: Option<&Grant>) -> Response {
    let (max_decompressed, retry_after) = {
        let c = ctx.config();
        (c.server.max_decompressed_bytes, c.server.retry_after_s)
    };
    let body = if head.gzip {
        match http::gunzip(&body, max_decompressed) {
            Ok(b) => b,
            Err(GunzipError::Invalid) => return Response::error(400, "body is not valid gzip"),
            Err(GunzipError::TooLarge) => {
                return Response::error(
                    413,
                    &format!("gzip body inflates past server.max_decompressed_bytes ({max_decompressed})"),
                );
            }
        }
    } else {
        body
    };
    match ingest_events(ctx, &body, kind, grant).await {
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
pub async fn ingest_events(ctx: &ShardCtx, body: &[u8], kind: BodyKind, grant: Option<&Grant>) -> Ingested {
    // While the database breaker is open, say so at once instead of queueing
    // (with ack = spool the spool absorbs the outage instead).
    if ctx.spool.is_none()
        && let crate::writer::breaker::Admission::Rejected { retry_after } = ctx.metrics.breaker.admit(Instant::now())
    {
        ctx.stats().overload_rejections.inc();
        return Ingested::Failed {
            status: 503,
            message: format!(
                "database unavailable (circuit breaker open); nothing was stored, retry in {} ms",
                retry_after.as_millis()
            ),
            retry: true,
        };
    }
    let now_unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    let (rules, ack, shutdown_timeout) = {
        let c = ctx.config();
        (crate::ingest::Rules::from_config(&c.ingest), c.ingest.ack, c.server.shutdown_timeout())
    };
    // The parser is borrowed only for this synchronous call, never across an await.
    let parsed = {
        let mut parser = ctx.parser.borrow_mut();
        parser.set_rules(rules);
        parser.parse(body, kind, Clock { now_unix_us })
    };
    let stats = ctx.stats();
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            let status = if matches!(e, BodyError::TooManyEvents { .. }) { 413 } else { 400 };
            if let BodyError::Malformed(_) = e {
                stats.rejected(RejectKind::Malformed);
            }
            return Ingested::BodyRefused { status, message: e.to_string() };
        }
    };
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
    let failed = |status, message: &str, retry| Ingested::Failed { status, message: message.to_string(), retry };
    if let Some(spool) = &ctx.spool {
        // ack = spool: durable on local disk is the promise; the drainer
        // takes it to PostgreSQL from there.
        let appended = match spool.try_append(parsed.rows.to_spool_record()) {
            Ok(wait) => wait.await,
            Err(e) => Err(e),
        };
        return match appended {
            Ok(_seq) => Ingested::Answer { status: 200, accepted, rejected: parsed.rejected },
            Err(crate::spool::SpoolError::TooLarge { .. }) => {
                failed(413, "request too large for one spool record (spool.segment_bytes)", false)
            }
            Err(e) => {
                stats.overload_rejections.inc();
                failed(503, &format!("spool cannot take these events, nothing was stored: {e}"), true)
            }
        };
    }
    let (reply, wait) = match ack {
        AckMode::Commit => {
            let (tx, rx) = pipeline::commit_channel();
            (Reply::Shard(tx), Some(rx))
        }
        AckMode::Queue | AckMode::Spool => (Reply::None, None),
    };
    let job = Job { rows: parsed.rows, reply, enqueued: Instant::now() };
    match ctx.rings.try_send(job) {
        Ok(()) => {}
        Err(HandOffError::Full(_)) => {
            stats.overload_rejections.inc();
            return failed(503, "ingest rings are full; retry later", true);
        }
        Err(HandOffError::Closed(_)) => return failed(503, "shutting down; retry on another instance or later", true),
    }
    let Some(wait) = wait else {
        return Ingested::Answer { status: 202, accepted, rejected: parsed.rejected };
    };
    // At shutdown, a commit that is not reported in time is answered 503
    // (before the process exits) rather than left to a dropped connection.
    let give_up = async {
        let _ = ctx.shutdown.clone().await;
        monoio::time::sleep(shutdown_timeout.mul_f64(0.9)).await;
    };
    let outcome = monoio::select! {
        r = wait => Some(r),
        _ = give_up => None,
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
        Ok(CommitOutcome::Unavailable(why)) => {
            failed(503, &format!("database unavailable, nothing was stored: {why}"), true)
        }
        Ok(CommitOutcome::Refused(why)) => {
            failed(500, &format!("PostgreSQL refused these events, nothing was stored: {why}"), false)
        }
        Err(_canceled) => failed(503, "writer stopped before commit; retry", true),
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
