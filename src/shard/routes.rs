//! What each route does with a request, and the JSON it answers.
//!
//! Who may make a request (rate, token, scope), what can be refused from
//! its head alone, and what each route answers. Ingest bodies go to
//! [`accept::ingest_events`] (after gzip), as WebSocket ingest frames do.

use std::net::IpAddr;
use std::sync::Arc;

use super::accept::{self, Ingested};
use super::http::{self, Body, BodyFraming, Cors, GunzipError, HeadError, Media, Method, RequestHead, Response};
use super::{ShardCtx, rooms, ws};
use crate::auth::{Denied, Grant, Scope, Secret};
use crate::broadcast::{Admission, Refusal};
use crate::ingest::BodyKind;
use crate::labels::{Route, Shed};
use crate::limits::{IpPass, retry_after_secs};

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
    // A browser sends a CORS preflight without credentials; it reads nothing.
    if head.method == Method::Options {
        return Ok(None);
    }
    let scope = match head.target {
        Route::Health | Route::Unknown => return Ok(None),
        Route::Events | Route::Batch => Scope::Ingest,
        Route::Stats | Route::Metrics => Scope::Admin,
        Route::Device | Route::Devices => Scope::Read,
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
    if scope == Scope::Read && !grant.allows(Scope::Read) && !grant.allows(Scope::Subscribe) {
        return Err(Response::error(
            403,
            &format!("{} lacks the `read` (or `subscribe`) scope this needs", grant.label()),
        ));
    }
    if !matches!(scope, Scope::Subscribe | Scope::Read) && !grant.allows(scope) {
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
    if head.method == Method::Options
        && let Some(answer) = preflight(ctx, head)
    {
        return Some(answer);
    }
    let ingest = matches!(head.target, Route::Events | Route::Batch);
    let method_ok = match head.target {
        Route::Events | Route::Batch => head.method == Method::Post,
        Route::Unknown => true,
        _ => matches!(head.method, Method::Get | Method::Head),
    };
    let refusal = if head.target == Route::Unknown {
        Response::error(
            404,
            "no such route; see POST /events, POST /events/batch, GET /ws, /devices, /devices/{device_id}, /health, \
             /stats, /metrics",
        )
    } else if !method_ok {
        let mut r = Response::error(405, &format!("method not allowed here; use {}", head.target.allow()));
        r.allow = Some(head.target.allow());
        r
    } else if head.target == Route::Ws
        && let Some(origin) = head.origin.as_deref()
        && ctx.config().cors.enabled()
        && !ctx.config().cors.allows(origin)
    {
        // Cross-site WebSocket hijacking: a page on another site may open a
        // socket with the user's cookies or network position; browsers send
        // `Origin`, other clients usually do not and are not asked to.
        Response::error(403, &format!("origin {origin:?} is not in cors.allowed_origins"))
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

/// A CORS preflight (`OPTIONS` with `Origin`) to a route a page may call,
/// when `[cors]` is on: 204 with the route's methods, the headers a page
/// may send and `cors.max_age_s` for an allowed origin; 403 naming
/// `cors.allowed_origins` otherwise (the browser then refuses the request
/// itself; the 403 tells a person with curl why). `None` = not a
/// preflight: 405 (CORS off) or 404 as for any other method.
fn preflight(ctx: &ShardCtx, head: &RequestHead) -> Option<Response> {
    let c = ctx.config();
    if !c.cors.enabled() || matches!(head.target, Route::Ws | Route::Unknown) {
        return None;
    }
    let Some(origin) = head.origin.as_deref() else {
        return Some(Response::error(400, "a CORS preflight (OPTIONS) needs an Origin header"));
    };
    if !c.cors.allows(origin) {
        return Some(Response::error(403, &format!("origin {origin:?} is not in cors.allowed_origins")));
    }
    let methods = if head.target.is_ingest() { "POST, OPTIONS" } else { "GET, HEAD, OPTIONS" };
    let mut answer = Response::no_content();
    answer.cors = Some(Box::new(Cors { preflight: Some((methods, c.cors.max_age_s)), ..Cors::default() }));
    Some(answer)
}

/// Adds the CORS headers to an answer when `[cors]` is on: `Vary: Origin`
/// to every answer (unless any origin is allowed: then nothing varies),
/// and `Access-Control-Allow-Origin` (the origin, or `*`) when the
/// request's `Origin` is allowed. No `Allow-Credentials`: tokens travel in
/// `Authorization`, which a page sets itself.
pub fn add_cors(ctx: &ShardCtx, origin: Option<&str>, response: &mut Response) {
    let c = ctx.config();
    if !c.cors.enabled() {
        return;
    }
    let any = c.cors.any();
    let cors = response.cors.get_or_insert_with(Box::default);
    cors.vary = !any;
    cors.allow_origin = match origin {
        Some(_) if any => Some("*".to_string()),
        Some(o) if c.cors.allows(o) => Some(o.to_string()),
        _ => None,
    };
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
    accept::load_refusal(ctx).map(|(why, message)| {
        ctx.stats().shed(why);
        unavailable(ctx, &message)
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
            let status = if ctx.health.ready() { 200 } else { 503 };
            let r = Response::json(status, ctx.report.health_json());
            if status == 503 { r.retry_after(ctx.config().server.retry_after_s) } else { r }
        }
        Route::Stats => Response::json(200, ctx.report.stats_json()),
        Route::Metrics => {
            let mut r = Response::json(200, ctx.report.prometheus());
            r.content_type = "text/plain; version=0.0.4; charset=utf-8";
            r
        }
        Route::Device | Route::Devices => super::devices::handle(ctx, head, grant).await,
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
    match accept::ingest_events(ctx, bytes, lease, kind, grant).await {
        Ingested::Answer { status, accepted, rejected } => {
            Response::json(status, accept::ingest_json(accepted, &rejected))
        }
        Ingested::BodyRefused { status, message } => {
            Response::json(status, serde_json::json!({"error": message, "accepted": 0, "rejected": []}).to_string())
        }
        Ingested::Failed { status, message, retry } => {
            let r = Response::error(status, &message);
            if retry { r.retry_after(retry_after) } else { r }
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
            if let Some(outside) = rooms::Selection::outside(&request.devices, &request.prefixes, &grant.device_prefix)
            {
                return Err(Response::error(
                    403,
                    &format!(
                        "{} may only subscribe to device_ids starting with {:?}; {outside} is outside it",
                        grant.label(),
                        grant.device_prefix
                    ),
                ));
            }
            request.scope = grant.device_prefix.clone();
        }
    }
    if request.snapshot && ctx.readers.is_none() {
        return Err(Response::error(400, rooms::SNAPSHOT_NEEDS_STATE));
    }
    if request.snapshot && request.ingest_only {
        return Err(Response::error(400, "snapshot=true needs a subscribing socket; drop subscribe=false"));
    }
    if let Err(why) = request.selection().check_bounds(&ctx.ws_limits().rooms) {
        return Err(Response::error(400, &why));
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
