//! One HTTP/1.1 connection on a shard: read a request, answer it, repeat.
//!
//! Requests on a connection are served strictly in order, which is all that
//! pipelining needs: bytes after one request stay in the buffer for the next.
//! Every read has a deadline: `idle_timeout` while waiting for a request's
//! first byte (when shutdown also interrupts it), `request_timeout` from that
//! byte to the last one of the body (408). A read that loses to its deadline
//! or to shutdown is cancelled explicitly (`Canceller`) and awaited, so no
//! io_uring operation outlives its buffer's owner and no buffer is leaked.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::http::{self, BodyFraming, ChunkError, Chunked, HeadError, RequestHead, Response, Target};
use super::io::{IDLE_READ_BYTES, READ_CHUNK_BYTES, ReadOutcome};
use super::transport::Transport;
use super::{ShardCtx, routes, ws};
use crate::auth::Grant;
use crate::limits::IpPass;

/// Response buffer kept between requests; a larger one is released.
const KEPT_OUT_BYTES: usize = 4 * 1024;

/// What reading from the connection produced.
enum Next {
    /// A whole request: head, body (de-chunked, not yet decompressed), and
    /// the token's grant when authentication is on.
    Request(RequestHead, Vec<u8>, Option<Arc<Grant>>),
    /// A request refused before any body; the connection stays usable.
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
    /// Response bytes, reused.
    out: Vec<u8>,
    ctx: Rc<ShardCtx>,
}

impl Conn {
    pub fn new(stream: Transport, ip: IpPass, ctx: Rc<ShardCtx>) -> Self {
        Self { stream, ip, buf: Vec::new(), out: Vec::new(), ctx }
    }

    pub async fn run(mut self) {
        loop {
            let (response, head_only) = match self.next_request().await {
                Ok(Next::Answer(response)) => (response, false),
                Ok(Next::Request(head, _, grant)) if head.target == Target::Ws => {
                    match routes::upgrade(&self.ctx, &head, self.ip.ip(), grant.as_deref()) {
                        Ok((accept, request, admission)) => {
                            self.ctx.stats().response(101);
                            let leftover = std::mem::take(&mut self.buf);
                            let client = ws::Client { ip: self.ip, grant };
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
            let close = response.close;
            if !self.send(&response, head_only).await || close {
                return;
            }
            // Nothing pipelined: the next wait needs only a small buffer.
            if self.buf.is_empty() && self.buf.capacity() > IDLE_READ_BYTES {
                self.buf = Vec::new();
            }
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
            match self.read_more(deadline.unwrap_or(idle_deadline), idle, want).await {
                ReadOutcome::Data => {
                    deadline.get_or_insert_with(|| Instant::now() + request_timeout);
                }
                ReadOutcome::TimedOut if !idle => return Err(Stop::Respond(timeout_response())),
                _ => return Err(Stop::Close),
            }
        };
        self.ctx.stats().request(routes::route(&head));
        let deadline = deadline.unwrap_or_else(|| Instant::now() + request_timeout);
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
        let body = match head.body {
            BodyFraming::None => {
                self.buf.drain(..head.len);
                Vec::new()
            }
            BodyFraming::Length(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > max_body {
                    return Err(Stop::Respond(routes::too_large_body(max_body)));
                }
                let total = head.len + n;
                if head.expect_continue && self.buf.len() < total {
                    self.send_continue().await?;
                }
                while self.buf.len() < total {
                    match self.read_more(deadline, false, total - self.buf.len()).await {
                        ReadOutcome::Data => {}
                        ReadOutcome::TimedOut => return Err(Stop::Respond(timeout_response())),
                        _ => return Err(Stop::Close),
                    }
                }
                let body = self.buf[head.len..total].to_vec();
                self.buf.drain(..total);
                body
            }
            BodyFraming::Chunked => {
                if head.expect_continue && self.buf.len() == head.len {
                    self.send_continue().await?;
                }
                self.buf.drain(..head.len);
                let mut body = Vec::new();
                loop {
                    match http::decode_chunks(&self.buf, &mut body, max_body) {
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
        Ok(Next::Request(head, body, admitted.ok().flatten()))
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
    let mut out = Vec::new();
    response.write_to(&mut out, false);
    let _ = stream.write_all_by(out, Instant::now() + write_timeout).await;
}

fn timeout_response() -> Response {
    Response::error(408, "request not received within server.request_timeout_ms")
}
