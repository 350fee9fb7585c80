//! One HTTP/1.1 connection on a shard: read a request, answer it, repeat.
//!
//! Requests on a connection are served strictly in order, which is all that
//! pipelining needs: bytes after one request stay in the buffer for the next.
//! Every read has a deadline: `idle_timeout` while waiting for a request's
//! first byte (when shutdown also interrupts it), `request_timeout` from that
//! byte to the last one of the body (408). A read that loses to its deadline
//! or to shutdown is cancelled explicitly (`Canceller`) and awaited, so no
//! io_uring operation outlives its buffer's owner and no buffer is leaked.
//!
//! Memory: a body is leased from the memory budget (`limits.memory_budget_bytes`)
//! by its `Content-Length` before a byte of it is read, and read straight into
//! a buffer of its own size; a chunked body is leased as it grows, and a head
//! past the idle buffer's size the same way. A request that does not fit, or
//! that the writers could not start within `ingest.max_wait_ms`, is answered
//! 503 + `Retry-After` at once. The client must see that 503, not a reset: a
//! body already on its way is read and dropped through a small fixed buffer
//! (bounded by `max_body_bytes` and the request's deadline) and the
//! connection stays open; with `Expect: 100-continue` the 503 goes instead
//! of the 100 and the connection closes (the client has not sent the body).
//!
//! Every answer carries `X-Request-Id`: the client's (checked by
//! [`http::request_id_is_valid`]) or one made here ([`ShardCtx::new_request_id`]),
//! and every log line about the request names it (`request_id=`): a 4xx
//! (`info`, "request refused"), a 5xx (`warn`, "request failed"), and any
//! answer slower than `log.slow_request_ms` (`warn`, "slow request"). That
//! id is how an operator finds a client's complaint in the log.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::http::{self, Body, BodyFraming, ChunkError, Chunked, HeadError, RequestHead, Response};
use super::io::{IDLE_READ_BYTES, READ_CHUNK_BYTES, ReadOutcome};
use super::transport::Transport;
use super::{ShardCtx, routes, ws};
use crate::auth::Grant;
use crate::budget::Lease;
use crate::labels::Route;
use crate::limits::IpPass;

/// Response buffer kept between requests; a larger one is released.
const KEPT_OUT_BYTES: usize = 4 * 1024;

/// What reading from the connection produced.
enum Next {
    /// A whole request: head, body (de-chunked, not yet decompressed), and
    /// the token's grant when authentication is on.
    Request(RequestHead, Body, Option<Arc<Grant>>),
    /// A request refused before its body was used; the connection stays usable.
    Answer(Response),
}

/// Why the loop stops reading requests.
enum Stop {
    /// Close without a word (EOF, idle timeout, shutdown while idle, I/O error).
    Close,
    /// Answer, then close.
    Respond(Response),
}

pub struct Conn {
    stream: Transport,
    /// The client's IP: its connection count and request rate.
    ip: IpPass,
    /// Unconsumed request bytes, starting at index 0.
    buf: Vec<u8>,
    /// `buf`'s bytes in the memory budget once it outgrows the idle size.
    buf_lease: Lease,
    /// Response bytes, reused.
    out: Vec<u8>,
    /// The request being served, once its head is parsed.
    current: Option<Current>,
    ctx: Rc<ShardCtx>,
}

/// What the answer and the log need to know about the request in hand.
struct Current {
    id: String,
    origin: Option<String>,
    method: http::Method,
    route: Route,
    /// Its first byte.
    started: Instant,
}

impl Conn {
    pub fn new(stream: Transport, ip: IpPass, ctx: Rc<ShardCtx>) -> Self {
        let buf_lease = ctx.budget.lease();
        Self { stream, ip, buf: Vec::new(), buf_lease, out: Vec::new(), current: None, ctx }
    }

    pub async fn run(mut self) {
        loop {
            let (response, head_only) = match self.next_request().await {
                Ok(Next::Answer(response)) => (response, false),
                Ok(Next::Request(head, _body, grant)) if head.target == Route::Ws => {
                    match routes::upgrade(&self.ctx, &head, self.ip.ip(), grant.as_deref()) {
                        Ok((accept, request, admission)) => {
                            self.ctx.stats().response(101);
                            let leftover = std::mem::take(&mut self.buf);
                            let request_id = self.current.take().map(|c| c.id).unwrap_or_default();
                            let client = ws::Client { ip: self.ip, grant, request_id };
                            ws::serve(self.stream, leftover, self.ctx, request, admission, client, &accept).await;
                            return;
                        }
                        Err(refusal) => (refusal, false),
                    }
                }
                Ok(Next::Request(head, body, grant)) => {
                    let head_only = head.method == http::Method::Head;
                    let mut response = routes::handle(&self.ctx, &head, body, grant.as_deref()).await;
                    if !head.keep_alive || self.ctx.is_shutting_down() {
                        response.close = true;
                    }
                    (response, head_only)
                }
                Err(Stop::Close) => return,
                Err(Stop::Respond(response)) => (response.closing(), false),
            };
            self.ctx.stats().response(response.status);
            let mut response = response;
            self.finish(&mut response);
            let close = response.close;
            if !self.send(&response, head_only).await || close {
                return;
            }
            // Nothing pipelined: the next wait needs only a small buffer.
            if self.buf.is_empty() && self.buf.capacity() > IDLE_READ_BYTES {
                self.buf = Vec::new();
            }
            self.true_up_buf_lease();
        }
    }

    /// Reads one whole request: its head, then its body. The request's bytes
    /// are consumed from the buffer.
    async fn next_request(&mut self) -> Result<Next, Stop> {
        let (max_headers, max_head, max_body, request_timeout, idle_timeout) = {
            let c = self.ctx.config();
            let s = &c.server;
            (s.max_headers, s.max_header_bytes, s.max_body_bytes, s.request_timeout(), s.idle_timeout())
        };
        let idle_deadline = Instant::now() + idle_timeout;
        let mut deadline = (!self.buf.is_empty()).then(|| Instant::now() + request_timeout);
        let head = loop {
            if !self.buf.is_empty() {
                match http::parse_head(&self.buf, max_headers, max_head) {
                    Ok(head) => break head,
                    Err(HeadError::Partial) => {}
                    Err(e) => return Err(Stop::Respond(routes::head_error(&self.ctx, &e))),
                }
            }
            if self.buf.is_empty() && self.ctx.is_shutting_down() {
                return Err(Stop::Close);
            }
            let idle = self.buf.is_empty();
            let want = if idle { IDLE_READ_BYTES } else { READ_CHUNK_BYTES.min(max_head) };
            if !idle && self.buf_lease.try_resize(self.buf.len() + want).is_err() {
                // A head cannot be skipped to keep the connection: answer and close.
                let refusal = routes::over_budget(&self.ctx, self.ctx.budget.key());
                return Err(Stop::Respond(refusal));
            }
            let outcome = self.read_more(deadline.unwrap_or(idle_deadline), idle, want).await;
            self.true_up_buf_lease();
            match outcome {
                ReadOutcome::Data => {
                    deadline.get_or_insert_with(|| Instant::now() + request_timeout);
                }
                ReadOutcome::TimedOut if !idle => return Err(Stop::Respond(timeout_response())),
                _ => return Err(Stop::Close),
            }
        };
        self.ctx.stats().request(head.target);
        let deadline = deadline.unwrap_or_else(|| Instant::now() + request_timeout);
        let mut head = head;
        self.current = Some(Current {
            id: head.request_id.take().unwrap_or_else(|| self.ctx.new_request_id()),
            origin: head.origin.clone(),
            method: head.method,
            route: head.target,
            started: deadline.checked_sub(request_timeout).unwrap_or_else(Instant::now),
        });
        let admitted = routes::admit(&self.ctx, &head, &self.ip);
        let refusal = match &admitted {
            Ok(_) => routes::refuse_before_body(&self.ctx, &head),
            Err(refusal) => Some(refusal.clone()),
        };
        if let Some(mut refusal) = refusal {
            if matches!(head.body, BodyFraming::None | BodyFraming::Length(0)) {
                self.buf.drain(..head.len);
                refusal.close |= !head.keep_alive;
                return Ok(Next::Answer(refusal));
            }
            // A body is on the wire and will not be read: close after answering.
            return Err(Stop::Respond(refusal));
        }
        // Load: the database breaker, the wait for a writer. Decided before
        // the body is read, so that a flood costs a head each, not a body.
        if let Some(refusal) = routes::refuse_for_load(&self.ctx, &head) {
            return self.shed(&head, refusal, deadline, max_body).await;
        }
        let mut lease = self.ctx.budget.lease();
        let bytes = match head.body {
            BodyFraming::None => {
                self.buf.drain(..head.len);
                Vec::new()
            }
            BodyFraming::Length(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > max_body {
                    return Err(Stop::Respond(routes::too_large_body(max_body)));
                }
                if lease.try_resize(n).is_err() {
                    let refusal = routes::over_budget(&self.ctx, self.ctx.budget.key());
                    return self.shed(&head, refusal, deadline, max_body).await;
                }
                let total = head.len + n;
                if head.expect_continue && self.buf.len() < total {
                    self.send_continue().await?;
                }
                // What came with the head moves into a buffer of the body's
                // own size; the rest is read straight into it.
                let here = self.buf.len().min(total);
                let mut body = Vec::with_capacity(n);
                body.extend_from_slice(&self.buf[head.len..here]);
                self.buf.drain(..here);
                while body.len() < n {
                    let want = (n - body.len()).min(READ_CHUNK_BYTES * 4);
                    match self.stream.read_more(&mut body, want, deadline, std::future::pending::<()>()).await {
                        ReadOutcome::Data => {}
                        ReadOutcome::TimedOut => return Err(Stop::Respond(timeout_response())),
                        _ => return Err(Stop::Close),
                    }
                }
                body
            }
            BodyFraming::Chunked => {
                if head.expect_continue && self.buf.len() == head.len {
                    self.send_continue().await?;
                }
                self.buf.drain(..head.len);
                let mut body = Vec::new();
                loop {
                    let decoded = http::decode_chunks(&self.buf, &mut body, max_body);
                    if lease.try_resize(body.capacity()).is_err() {
                        // Over budget part-way: drop what we have and read the rest away.
                        let refusal = routes::over_budget(&self.ctx, self.ctx.budget.key());
                        let consumed = match decoded {
                            Ok(Chunked::Done { consumed } | Chunked::Partial { consumed }) => consumed,
                            Err(_) => 0,
                        };
                        let seen = body.len();
                        drop(body);
                        drop(lease);
                        if let Ok(Chunked::Done { .. }) = decoded {
                            self.buf.drain(..consumed);
                            return Ok(Next::Answer(keep_alive_if(&head, refusal)));
                        }
                        self.buf.drain(..consumed);
                        return self.discard_chunks(&head, refusal, deadline, max_body.saturating_sub(seen)).await;
                    }
                    match decoded {
                        Ok(Chunked::Done { consumed }) => {
                            self.buf.drain(..consumed);
                            break body;
                        }
                        Ok(Chunked::Partial { consumed }) => {
                            self.buf.drain(..consumed);
                        }
                        Err(ChunkError::Bad) => {
                            return Err(Stop::Respond(Response::error(400, "malformed chunked body")));
                        }
                        Err(ChunkError::TooLarge) => return Err(Stop::Respond(routes::too_large_body(max_body))),
                    }
                    match self.read_more(deadline, false, READ_CHUNK_BYTES).await {
                        ReadOutcome::Data => {}
                        ReadOutcome::TimedOut => return Err(Stop::Respond(timeout_response())),
                        _ => return Err(Stop::Close),
                    }
                }
            }
        };
        lease.set(bytes.capacity());
        Ok(Next::Request(head, Body { bytes, lease }, admitted.ok().flatten()))
    }

    /// Answers `refusal` (a 503) to a request whose body will not be used,
    /// keeping the connection: a body already on its way is read and dropped
    /// through a small buffer, within the request's deadline and
    /// `max_body_bytes`. With `Expect: 100-continue` and nothing of the body
    /// sent yet, the 503 goes instead of the 100 and the connection closes.
    async fn shed(
        &mut self,
        head: &RequestHead,
        refusal: Response,
        deadline: Instant,
        max_body: usize,
    ) -> Result<Next, Stop> {
        let body_started = self.buf.len() > head.len;
        match head.body {
            BodyFraming::None | BodyFraming::Length(0) => {
                self.buf.drain(..head.len);
                Ok(Next::Answer(keep_alive_if(head, refusal)))
            }
            _ if head.expect_continue && !body_started => Err(Stop::Respond(refusal.closing())),
            BodyFraming::Length(n) => {
                let total = head.len.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
                if total - head.len > max_body {
                    return Err(Stop::Respond(refusal.closing()));
                }
                let here = self.buf.len().min(total);
                self.buf.drain(..here);
                let mut left = total - here;
                while left > 0 {
                    debug_assert!(self.buf.is_empty());
                    match self.read_more(deadline, false, left.min(READ_CHUNK_BYTES)).await {
                        ReadOutcome::Data => {
                            left -= self.buf.len();
                            self.buf.clear();
                        }
                        ReadOutcome::TimedOut => return Err(Stop::Respond(timeout_response())),
                        _ => return Err(Stop::Close),
                    }
                }
                Ok(Next::Answer(keep_alive_if(head, refusal)))
            }
            BodyFraming::Chunked => {
                self.buf.drain(..head.len);
                self.discard_chunks(head, refusal, deadline, max_body).await
            }
        }
    }

    /// Reads the rest of a chunked body (the buffer starts inside it) and
    /// drops it, then answers `refusal` keeping the connection.
    async fn discard_chunks(
        &mut self,
        head: &RequestHead,
        refusal: Response,
        deadline: Instant,
        mut allowed: usize,
    ) -> Result<Next, Stop> {
        let mut sink = Vec::new();
        loop {
            match http::decode_chunks(&self.buf, &mut sink, allowed) {
                Ok(Chunked::Done { consumed }) => {
                    self.buf.drain(..consumed);
                    return Ok(Next::Answer(keep_alive_if(head, refusal)));
                }
                Ok(Chunked::Partial { consumed }) => {
                    self.buf.drain(..consumed);
                    allowed -= sink.len();
                    sink.clear();
                }
                Err(ChunkError::Bad) => return Err(Stop::Respond(Response::error(400, "malformed chunked body"))),
                Err(ChunkError::TooLarge) => return Err(Stop::Respond(refusal.closing())),
            }
            match self.read_more(deadline, false, READ_CHUNK_BYTES).await {
                ReadOutcome::Data => {}
                ReadOutcome::TimedOut => return Err(Stop::Respond(timeout_response())),
                _ => return Err(Stop::Close),
            }
        }
    }

    /// Stamps the answer with the request's id and CORS headers, and logs a
    /// refused, failed or slow request with that id. A head that did not
    /// parse gets an id made for it.
    fn finish(&mut self, response: &mut Response) {
        let current = self.current.take();
        let id = match &current {
            Some(c) => c.id.clone(),
            None => self.ctx.new_request_id(),
        };
        routes::add_cors(&self.ctx, current.as_ref().and_then(|c| c.origin.as_deref()), response);
        let status = response.status;
        let (method, route, elapsed) = match &current {
            Some(c) => (method_name(c.method), c.route.label(), c.started.elapsed()),
            None => ("-", "-", std::time::Duration::ZERO),
        };
        let ms = elapsed.as_millis();
        let slow_ms = self.ctx.config().log.slow_request_ms;
        let client = self.ip.ip();
        if status >= 400 {
            let error = error_text(response);
            if status >= 500 {
                crate::warn!(
                    "request failed",
                    request_id = id,
                    method = method,
                    route = route,
                    status = status,
                    ms = ms,
                    client = client,
                    error = error
                );
            } else {
                crate::info!(
                    "request refused",
                    request_id = id,
                    method = method,
                    route = route,
                    status = status,
                    ms = ms,
                    client = client,
                    error = error
                );
            }
        } else if slow_ms > 0 && ms >= u128::from(slow_ms) {
            crate::warn!(
                "slow request",
                request_id = id,
                method = method,
                route = route,
                status = status,
                ms = ms,
                client = client,
                slow_request_ms = slow_ms
            );
        }
        response.request_id = Some(id.into());
    }

    /// Holds `buf`'s bytes beyond the idle size in the memory budget.
    fn true_up_buf_lease(&mut self) {
        let cap = self.buf.capacity();
        self.buf_lease.set(if cap > IDLE_READ_BYTES { cap } else { 0 });
    }

    async fn send_continue(&mut self) -> Result<(), Stop> {
        let deadline = Instant::now() + self.ctx.config().server.write_timeout();
        let (written, _) = self.stream.write_all_by(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), deadline).await;
        if written { Ok(()) } else { Err(Stop::Close) }
    }

    /// Reads more request bytes; while `idle`, shutdown interrupts the wait.
    async fn read_more(&mut self, deadline: Instant, idle: bool, want: usize) -> ReadOutcome {
        let shutdown = idle.then(|| self.ctx.shutdown.clone());
        let interrupt = async move {
            match shutdown {
                Some(s) => {
                    let _ = s.await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        self.stream.read_more(&mut self.buf, want, deadline, interrupt).await
    }

    /// Writes a response; false when the peer is gone or has not read it
    /// within `server.write_timeout_ms`.
    async fn send(&mut self, response: &Response, head_only: bool) -> bool {
        let mut out = std::mem::take(&mut self.out);
        response.write_to(&mut out, head_only);
        let deadline = Instant::now() + self.ctx.config().server.write_timeout();
        let (written, mut out) = self.stream.write_all_by(out, deadline).await;
        if out.capacity() > KEPT_OUT_BYTES {
            out = Vec::new();
        }
        self.out = out;
        written
    }
}

/// Answers a connection over `limits.max_connections_per_ip` with 429 and
/// closes it, without reading a request.
pub async fn refuse_per_ip(mut stream: Transport, ctx: &ShardCtx) {
    let (retry, write_timeout) = {
        let c = ctx.config();
        (c.server.retry_after_s, c.server.write_timeout())
    };
    let response = Response::error(429, "too many connections from this address (limits.max_connections_per_ip)")
        .retry_after(retry)
        .closing();
    ctx.stats().response(429);
    let mut response = response;
    response.request_id = Some(ctx.new_request_id().into());
    let mut out = Vec::new();
    response.write_to(&mut out, false);
    let _ = stream.write_all_by(out, Instant::now() + write_timeout).await;
}

/// `refusal` for a request whose bytes were all consumed: the connection
/// stays open unless the client asked to close it.
fn keep_alive_if(head: &RequestHead, mut refusal: Response) -> Response {
    refusal.close |= !head.keep_alive;
    refusal
}

fn method_name(m: http::Method) -> &'static str {
    match m {
        http::Method::Get => "GET",
        http::Method::Head => "HEAD",
        http::Method::Post => "POST",
        http::Method::Options => "OPTIONS",
        http::Method::Other => "other",
    }
}

/// What a refusal said, for its log line: the `error` of a JSON error body,
/// else the body's start (an ingest answer listing rejected events).
fn error_text(response: &Response) -> String {
    const MAX: usize = 300;
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(&response.body)
        && let Some(serde_json::Value::String(e)) = map.get("error")
    {
        return e.clone();
    }
    let text = String::from_utf8_lossy(&response.body);
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.into_owned(),
    }
}

fn timeout_response() -> Response {
    Response::error(408, "request not received within server.request_timeout_ms")
}
