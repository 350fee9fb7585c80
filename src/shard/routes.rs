//! What each route does with a request, and the JSON it answers.
//!
//! Ingest routes parse and validate on the shard, hand the rows to a writer
//! ring without blocking (a full ring is 503 at once), and with
//! `ack = "commit"` await the writer's commit report before answering 200.

use std::fmt::Write as _;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::ShardCtx;
use super::http::{self, BodyFraming, GunzipError, HeadError, Media, Method, RequestHead, Response, Target};
use crate::config::AckMode;
use crate::ingest::{BodyError, BodyKind, Clock, Rejection};
use crate::metrics::Route;
use crate::pipeline::{self, CommitOutcome, HandOffError, Job};

/// The metrics label of a request.
pub fn route(head: &RequestHead) -> Route {
    match head.target {
        Target::Events => Route::Event,
        Target::Batch => Route::Batch,
        Target::Health => Route::Health,
        Target::Stats => Route::Stats,
        Target::Metrics => Route::Metrics,
        Target::Ws | Target::Unknown => Route::Other,
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
    } else if head.target == Target::Ws {
        Response::error(501, "WebSocket (GET /ws) is not available in this build yet")
    } else if !ingest {
        return None;
    } else if head.body == BodyFraming::None {
        Response::error(411, "a body needs Content-Length or Transfer-Encoding: chunked")
    } else if head.media == Media::Unsupported {
        Response::error(415, "Content-Type must be application/json, or application/x-ndjson on /events/batch")
    } else if let BodyFraming::Length(n) = head.body
        && n > ctx.config.server.max_body_bytes as u64
    {
        too_large_body(ctx.config.server.max_body_bytes)
    } else {
        return None;
    };
    Some(refusal)
}

/// Answers a request whose head passed [`refuse_before_body`] and whose body
/// has been read.
pub async fn handle(ctx: &ShardCtx, head: &RequestHead, body: Vec<u8>) -> Response {
    match head.target {
        Target::Events => ingest(ctx, head, body, BodyKind::Single).await,
        Target::Batch if head.media == Media::Ndjson => ingest(ctx, head, body, BodyKind::Ndjson).await,
        Target::Batch => ingest(ctx, head, body, BodyKind::JsonArray).await,
        Target::Health => {
            let status = if ctx.metrics.ready() { 200 } else { 503 };
            let r = Response::json(status, ctx.metrics.health_json());
            if status == 503 { r.retry_after(ctx.config.server.retry_after_s) } else { r }
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

async fn ingest(ctx: &ShardCtx, head: &RequestHead, body: Vec<u8>, kind: BodyKind) -> Response {
    let server = &ctx.config.server;
    let body = if head.gzip {
        match http::gunzip(&body, server.max_decompressed_bytes) {
            Ok(b) => b,
            Err(GunzipError::Invalid) => return Response::error(400, "body is not valid gzip"),
            Err(GunzipError::TooLarge) => {
                return Response::error(
                    413,
                    &format!("gzip body inflates past server.max_decompressed_bytes ({})", server.max_decompressed_bytes),
                );
            }
        }
    } else {
        body
    };
    let now_unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    // The parser is borrowed only for this synchronous call, never across an await.
    let parsed = ctx.parser.borrow_mut().parse(&body, kind, Clock { now_unix_us });
    drop(body);
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            let status = if matches!(e, BodyError::TooManyEvents { .. }) { 413 } else { 400 };
            if let BodyError::Malformed(_) = e {
                ctx.stats().rejected(crate::ingest::event::RejectKind::Malformed);
            }
            return Response::json(status, serde_json::json!({"error": e.to_string(), "accepted": 0, "rejected": []}).to_string());
        }
    };
    let stats = ctx.stats();
    for r in &parsed.rejected {
        stats.rejected(r.error.kind);
    }
    let accepted = parsed.rows.len();
    stats.events_accepted.add(accepted as u64);
    if accepted == 0 {
        return Response::json(400, ingest_json(0, &parsed.rejected));
    }
    let (reply, wait) = match ctx.config.ingest.ack {
        AckMode::Commit => {
            let (tx, rx) = pipeline::commit_channel();
            (Some(tx), Some(rx))
        }
        AckMode::Queue => (None, None),
    };
    let job = Job { rows: parsed.rows, reply, enqueued: Instant::now() };
    let retry = server.retry_after_s;
    match ctx.rings.try_send(job) {
        Ok(()) => {}
        Err(HandOffError::Full(_)) => {
            stats.overload_rejections.inc();
            return Response::error(503, "ingest rings are full; retry later").retry_after(retry);
        }
        Err(HandOffError::Closed(_)) => {
            return Response::error(503, "shutting down; retry on another instance or later").retry_after(retry);
        }
    }
    let Some(wait) = wait else {
        return Response::json(202, ingest_json(accepted, &parsed.rejected));
    };
    match wait.await {
        Ok(CommitOutcome::Committed) => Response::json(200, ingest_json(accepted, &parsed.rejected)),
        Ok(CommitOutcome::Unavailable(why)) => {
            Response::error(503, &format!("database unavailable, nothing was stored: {why}")).retry_after(retry)
        }
        Ok(CommitOutcome::Refused(why)) => {
            Response::error(500, &format!("PostgreSQL refused these events, nothing was stored: {why}"))
        }
        Err(_canceled) => Response::error(503, "writer stopped before commit; retry").retry_after(retry),
    }
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
    use crate::ingest::event::{Reason, RejectKind};

    #[test]
    fn ingest_body_shape() {
        let rejected = [Rejection { index: 2, error: Reason::new(RejectKind::InvalidValue, "bad \"x\"") }];
        let v: serde_json::Value = serde_json::from_str(&ingest_json(3, &rejected)).unwrap();
        assert_eq!(v, serde_json::json!({"accepted": 3, "rejected": [{"index": 2, "error": "bad \"x\""}]}));
    }
}
