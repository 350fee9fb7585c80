//! Transports: how one worker sends one ingest body and learns the answer.
//!
//! [`Transport`] is what the load loops drive: [`HttpClient`] for
//! `POST /events[/batch]`, [`WsClient`] for ingest over `GET /ws` (one text
//! frame per request, answered in order by `{"seq":n,"accepted":N,...}`).
//! ingestd has no ingest-only WebSocket: every `/ws` socket also subscribes,
//! so the load tool connects with a `device_id` filter no event matches.
//!
//! [`HttpClient`] is a deliberately small blocking HTTP/1.1 client: one
//! keep-alive `TcpStream`, one request buffer reused for every request
//! (head + body written with one `write_all`), the answer read until its
//! `Content-Length` is complete. Nothing is pipelined.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The answer to one ingest request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// `accepted` from the JSON answer (0 when absent).
    pub accepted: u64,
}

/// Sends one body and waits for its answer.
pub trait Transport: Send {
    fn send(&mut self, body: &[u8]) -> io::Result<Reply>;
}

/// Where and how to POST.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    pub path: String,
    pub timeout: Duration,
}

impl HttpTarget {
    /// From `http://host:port` (or `host:port`) and a path.
    pub fn parse(url: &str, path: &str, timeout: Duration) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        if rest.starts_with("https://") || url.starts_with("https://") {
            return Err("https is not supported; use http://".into());
        }
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {hostport:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("no address for {hostport:?}"))?;
        Ok(Self { addr, host: hostport.to_string(), path: path.to_string(), timeout })
    }
}

pub struct HttpClient {
    target: HttpTarget,
    stream: Option<TcpStream>,
    req: Vec<u8>,
    resp: Vec<u8>,
    /// Connections opened (the first one included).
    pub connects: u64,
}

impl HttpClient {
    pub fn new(target: HttpTarget) -> Self {
        Self { target, stream: None, req: Vec::with_capacity(64 * 1024), resp: Vec::with_capacity(4096), connects: 0 }
    }

    fn connect(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.target.addr, self.target.timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.target.timeout))?;
            s.set_write_timeout(Some(self.target.timeout))?;
            self.connects += 1;
            self.stream = Some(s);
        }
        Ok(self.stream.as_mut().expect("just connected"))
    }

    fn exchange(&mut self, body: &[u8]) -> io::Result<(Reply, bool)> {
        self.req.clear();
        let t = &self.target;
        let _ = write!(
            self.req,
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            t.path,
            t.host,
            body.len()
        );
        self.req.extend_from_slice(body);
        let req = std::mem::take(&mut self.req);
        let written = self.connect().and_then(|s| s.write_all(&req));
        self.req = req;
        written?;
        let mut resp = std::mem::take(&mut self.resp);
        let answer = read_response(self.stream.as_mut().expect("connected"), &mut resp);
        self.resp = resp;
        answer
    }
}

impl Transport for HttpClient {
    fn send(&mut self, body: &[u8]) -> io::Result<Reply> {
        match self.exchange(body) {
            Ok((reply, close)) => {
                if close {
                    self.stream = None;
                }
                Ok(reply)
            }
            Err(e) => {
                // Whatever state the connection is in, start over on a new one.
                self.stream = None;
                Err(e)
            }
        }
    }
}

/// Reads one response; returns it and whether the server closes the connection.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(Reply, bool)> {
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a complete response"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut headers);
        let head = match r.parse(buf) {
            Ok(httparse::Status::Partial) => {
                if buf.len() > 64 * 1024 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "response head over 64 KiB"));
                }
                continue;
            }
            Ok(httparse::Status::Complete(n)) => n,
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad response: {e}"))),
        };
        let status = r.code.unwrap_or(0);
        let mut length = None;
        let mut close = r.version == Some(0);
        for h in r.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = h.value.eq_ignore_ascii_case(b"close");
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "chunked responses are not supported"));
            }
        }
        let Some(length) = length else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "response without Content-Length"));
        };
        let total = head + length;
        while buf.len() < total {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a response body"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let accepted = accepted_count(&buf[head..total]);
        return Ok((Reply { status, accepted }, close));
    }
}

/// WebSocket ingest: one `tungstenite` client socket, one text frame per
/// body, waiting for its answer before the next (no pipelining, like HTTP).
pub struct WsClient {
    target: HttpTarget,
    ws: Option<tungstenite::WebSocket<TcpStream>>,
    /// Connections opened (the first one included).
    pub connects: u64,
}

impl WsClient {
    pub fn new(target: HttpTarget) -> Self {
        Self { target, ws: None, connects: 0 }
    }

    fn exchange(&mut self, body: &[u8]) -> io::Result<Reply> {
        if self.ws.is_none() {
            let t = &self.target;
            let s = TcpStream::connect_timeout(&t.addr, t.timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(t.timeout))?;
            s.set_write_timeout(Some(t.timeout))?;
            let url = format!("ws://{}{}", t.host, t.path);
            let (ws, _) = tungstenite::client(url.as_str(), s)
                .map_err(|e| io::Error::other(format!("WebSocket upgrade failed: {e}")))?;
            self.connects += 1;
            self.ws = Some(ws);
        }
        let ws = self.ws.as_mut().expect("connected");
        let text = std::str::from_utf8(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        ws.send(tungstenite::Message::text(text)).map_err(ws_error)?;
        loop {
            match ws.read().map_err(ws_error)? {
                tungstenite::Message::Text(answer) => {
                    let answer = answer.as_bytes();
                    // Every /ws socket is also a subscriber: skip pushed events
                    // (the path's filter should match none), keep answers.
                    if !answer.starts_with(b"{\"seq\"") {
                        continue;
                    }
                    // Success answers carry no status; failures say which HTTP status they stand for.
                    let status = number_after(answer, b"\"status\"").map_or(200, |s| s as u16);
                    return Ok(Reply { status, accepted: accepted_count(answer) });
                }
                tungstenite::Message::Close(frame) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("server closed the WebSocket: {frame:?}"),
                    ));
                }
                _ => continue,
            }
        }
    }
}

fn ws_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl Transport for WsClient {
    fn send(&mut self, body: &[u8]) -> io::Result<Reply> {
        let r = self.exchange(body);
        if r.is_err() {
            self.ws = None;
        }
        r
    }
}

/// The unsigned integer after `"key":` in a JSON text, without a JSON parser.
fn number_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = body.windows(key.len()).position(|w| w == key)?;
    let rest = &body[at + key.len()..];
    let start = rest.iter().position(|&b| b != b':' && !b.is_ascii_whitespace())?;
    let digits: Vec<u8> = rest[start..].iter().copied().take_while(u8::is_ascii_digit).collect();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// `N` from `"accepted":N` in a JSON answer, without a JSON parser.
pub fn accepted_count(body: &[u8]) -> u64 {
    number_after(body, b"\"accepted\"").unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_from_answers() {
        assert_eq!(accepted_count(br#"{"accepted":100,"rejected":[]}"#), 100);
        assert_eq!(accepted_count(br#"{"accepted": 7, "rejected":[]}"#), 7);
        assert_eq!(accepted_count(br#"{"error":"full"}"#), 0);
        assert_eq!(number_after(br#"{"seq":3,"status":503,"error":"x"}"#, b"\"status\""), Some(503));
        assert_eq!(number_after(br#"{"seq":3,"accepted":1}"#, b"\"status\""), None);
    }

    #[test]
    fn round_trip_against_a_tiny_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 65536];
            for i in 0..2 {
                let mut got = Vec::new();
                // Read head + body (the test body is "[1,2]").
                while !got.ends_with(b"[1,2]") {
                    let n = s.read(&mut buf).unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got.starts_with(b"POST /events/batch HTTP/1.1\r\n"));
                let body = format!("{{\"accepted\":{i},\"rejected\":[]}}");
                write!(s, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
            }
        });
        let target = HttpTarget::parse(&format!("http://{addr}"), "/events/batch", Duration::from_secs(5)).unwrap();
        let mut c = HttpClient::new(target);
        assert_eq!(c.send(b"[1,2]").unwrap(), Reply { status: 200, accepted: 0 });
        assert_eq!(c.send(b"[1,2]").unwrap(), Reply { status: 200, accepted: 1 });
        assert_eq!(c.connects, 1);
        server.join().unwrap();
    }
}
