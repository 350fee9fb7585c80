//! One HTTP/1.1 connection on a shard: read a request, answer it, repeat.
//!
//! Requests on a connection are served strictly in order, which is all that
//! pipelining needs: bytes after one request stay in the buffer for the next.
//! Every read has a deadline: `idle_timeout` while waiting for a request's
//! first byte (when shutdown also interrupts it), `request_timeout` from that
//! byte to the last one of the body (408). A read that loses to its deadline
//! or to shutdown is cancelled explicitly (`Canceller`) and awaited, so no
//! io_uring operation outlives its buffer's owner and no buffer is leaked.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::http::{self, BodyFraming, ChunkError, Chunked, HeadError, RequestHead, Response, Target};
use super::io::{self, IDLE_READ_BYTES, READ_CHUNK_BYTES, ReadOutcome};
use super::{ShardCtx, routes, ws};

/// Response buffer kept between requests; a larger one is released.
const KEPT_OUT_BYTES: usize = 4 * 1024;

/// What reading from the connection produced.
enum Next {
    /// A whole request: head and body (de-chunked, not yet decompressed).
    Request(RequestHead, Vec<u8>),
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
    stream: TcpStream,
    peer: IpAddr,
    /// Unconsumed request bytes, starting at index 0.
    buf: Vec<u8>,
    /// Response bytes, reused.
    out: Vec<u8>,
    ctx: Rc<ShardCtx>,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: IpAddr, ctx: Rc<ShardCtx>) -> Self {
        Self { stream, peer, buf: Vec::new(), out: Vec::new(), ctx }
    }

    pub async fn run(mut self) {
        loop {
            let (response, head_only) = match self.next_request().await {
                Ok(Next::Answer(response)) => (response, false),
                Ok(Next::Request(head, _)) if head.target == Target::Ws => {
                    match routes::upgrade(&self.ctx, &head, self.peer) {
                        Ok((accept, request, admission)) => {
                            self.ctx.stats().response(101);
                            let leftover = std::mem::take(&mut self.buf);
                            ws::serve(self.stream, leftover, self.ctx, request, admission, &accept).await;
                            return;
                        }
                        Err(refusal) => (refusal, false),
                    }
                }
                Ok(Next::Request(head, body)) => {
                    let head_only = head.method == http::Method::Head;
                    let mut response = routes::handle(&self.ctx, &head, body).await;
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
        if let Some(mut refusal) = routes::refuse_before_body(&self.ctx, &head) {
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
        Ok(Next::Request(head, body))
    }

    async fn send_continue(&mut self) -> Result<(), Stop> {
        let (res, _) = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n".as_slice()).await;
        res.map(|_| ()).map_err(|_| Stop::Close)
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
        io::read_more(&mut self.stream, &mut self.buf, want, deadline, interrupt).await
    }

    /// Writes a response; false when the peer is gone.
    async fn send(&mut self, response: &Response, head_only: bool) -> bool {
        let mut out = std::mem::take(&mut self.out);
        response.write_to(&mut out, head_only);
        let (res, mut out) = self.stream.write_all(out).await;
        if out.capacity() > KEPT_OUT_BYTES {
            out = Vec::new();
        }
        self.out = out;
        res.is_ok()
    }
}

fn timeout_response() -> Response {
    Response::error(408, "request not received within server.request_timeout_ms")
}
