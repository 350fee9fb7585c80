//! HTTP/1.1 framing for shards: request heads (with `httparse`), chunked
//! bodies, gzip, and responses. Pure: byte slices in, decisions out, so every
//! status code of the contract is decided here and unit-tested.
//!
//! Request smuggling defences live here too: conflicting `Content-Length`
//! values, `Content-Length` together with `Transfer-Encoding`, and any
//! transfer coding other than a final `chunked` are refused with 400 and the
//! connection is closed.

use crate::labels::Route;
use std::io::Read as _;

/// What a request head says, once parsed; the raw headers are not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    pub target: Route,
    pub body: BodyFraming,
    pub media: Media,
    pub gzip: bool,
    pub expect_continue: bool,
    pub keep_alive: bool,
    /// Bytes of the head, including the blank line.
    pub len: usize,
    /// The token of `Authorization: Bearer <token>`, if one was sent.
    pub bearer: Option<crate::auth::Secret>,
    /// `GET /ws` only: the handshake headers and query.
    pub websocket: Option<Box<WsHandshake>>,
    /// The client's `X-Request-Id`, checked by [`request_id_is_valid`].
    pub request_id: Option<String>,
    /// `Origin`: the page a browser sends this request for.
    pub origin: Option<String>,
    /// `/devices…` only: the request target as sent (path and query), which
    /// these routes read their parameters from.
    pub path: Option<Box<str>>,
}

/// Longest `X-Request-Id` accepted from a client.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// An `X-Request-Id` a client may send: 1 to [`MAX_REQUEST_ID_BYTES`]
/// visible ASCII characters, so that it is one token in a log line and
/// cannot forge one. A longer or unprintable one is refused (400 naming the
/// header) rather than replaced: a client that sent an id expects to find
/// that id in the logs.
pub fn request_id_is_valid(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// What a WebSocket upgrade request said (RFC 6455 §4.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WsHandshake {
    /// `Upgrade: websocket` and `Connection: upgrade` were both present.
    pub upgrade: bool,
    /// `Sec-WebSocket-Version` (13 is the only one served).
    pub version: Option<String>,
    pub key: Option<String>,
    /// The query string, without `?`.
    pub query: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    /// A CORS preflight when it carries `Origin`.
    Options,
    Other,
}

/// A request body (de-chunked, not yet decompressed) and its bytes in the
/// memory budget.
pub struct Body {
    pub bytes: Vec<u8>,
    pub lease: crate::budget::Lease,
}

/// How the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// The body's media type, as far as ingest cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    /// `application/json`, or no `Content-Type` at all.
    Json,
    /// `application/x-ndjson` (also `application/ndjson`, `application/jsonlines`).
    Ndjson,
    /// Anything else: 415 on ingest routes.
    Unsupported,
}

/// A head that cannot be served; each maps to one status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// More bytes are needed (not an error yet).
    Partial,
    /// 400: malformed request line or headers, or a smuggling attempt.
    Bad(&'static str),
    /// 431: too many headers or too large a head.
    TooLarge(&'static str),
    /// 415: a `Content-Encoding` other than gzip or identity.
    Encoding,
    /// 505: not HTTP/1.x.
    Version,
}

/// Parses a request head from the start of `buf`.
pub fn parse_head(buf: &[u8], max_headers: usize, max_head_bytes: usize) -> Result<RequestHead, HeadError> {
    // The common case parses into a stack array; only a configuration that
    // allows more headers than it holds pays for a heap allocation.
    const ON_STACK: usize = 64;
    let mut on_stack = [httparse::EMPTY_HEADER; ON_STACK];
    let mut on_heap;
    let headers: &mut [httparse::Header<'_>] = if max_headers <= ON_STACK {
        &mut on_stack[..max_headers]
    } else {
        on_heap = vec![httparse::EMPTY_HEADER; max_headers];
        &mut on_heap
    };
    let mut req = httparse::Request::new(headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head_bytes => {
            return Err(HeadError::TooLarge("request head larger than server.max_header_bytes"));
        }
        Ok(httparse::Status::Partial) => return Err(HeadError::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooLarge("more headers than server.max_headers"));
        }
        // A well-formed request line naming another version is 505; garbage is 400.
        Err(httparse::Error::Version) if names_other_http_version(buf) => return Err(HeadError::Version),
        Err(_) => return Err(HeadError::Bad("malformed HTTP request head")),
    };
    if len > max_head_bytes {
        return Err(HeadError::TooLarge("request head larger than server.max_header_bytes"));
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        Some("OPTIONS") => Method::Options,
        _ => Method::Other,
    };
    let path = req.path.unwrap_or("/");
    let target = Route::from_path(path);
    let kept_path = matches!(target, Route::Device | Route::Devices).then(|| path.into());
    let mut websocket = (target == Route::Ws).then(|| {
        Box::new(WsHandshake {
            query: path.split_once('?').map(|(_, q)| q.to_string()).unwrap_or_default(),
            ..Default::default()
        })
    });
    let (mut upgrade_header, mut connection_upgrade) = (false, false);
    let http11 = req.version == Some(1);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut media = Media::Json;
    let mut gzip = false;
    let mut expect_continue = false;
    let mut keep_alive = http11;
    let mut bearer = None;
    let mut authorization_seen = false;
    let mut request_id = None;
    let mut origin = None;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HeadError::Bad("header value is not valid UTF-8"))?.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let digits = !value.is_empty() && value.len() <= 19 && value.bytes().all(|b| b.is_ascii_digit());
            let n: u64 = value
                .parse()
                .ok()
                .filter(|_| digits)
                .ok_or(HeadError::Bad("Content-Length must be digits only (a non-negative integer)"))?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(HeadError::Bad("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            let last = value.rsplit(',').next().map(str::trim).unwrap_or("");
            if !last.eq_ignore_ascii_case("chunked") || chunked {
                return Err(HeadError::Bad("only Transfer-Encoding: chunked is supported"));
            }
            if value.split(',').count() > 1 {
                return Err(HeadError::Bad("only Transfer-Encoding: chunked is supported"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-type") {
            let essence = value.split(';').next().unwrap_or("").trim();
            media = if essence.eq_ignore_ascii_case("application/json") {
                Media::Json
            } else if ["application/x-ndjson", "application/ndjson", "application/jsonlines", "application/x-jsonlines"]
                .iter()
                .any(|m| essence.eq_ignore_ascii_case(m))
            {
                Media::Ndjson
            } else {
                Media::Unsupported
            };
        } else if name.eq_ignore_ascii_case("content-encoding") {
            for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                    if gzip {
                        return Err(HeadError::Encoding);
                    }
                    gzip = true;
                } else if !coding.eq_ignore_ascii_case("identity") {
                    return Err(HeadError::Encoding);
                }
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            if authorization_seen {
                return Err(HeadError::Bad("more than one Authorization header"));
            }
            authorization_seen = true;
            bearer = crate::auth::bearer(value.as_bytes());
        } else if name.eq_ignore_ascii_case("x-request-id") {
            if request_id.is_some() {
                return Err(HeadError::Bad("more than one X-Request-Id header"));
            }
            // An empty value is taken as no id: one is made.
            if !value.is_empty() {
                if !request_id_is_valid(value.as_bytes()) {
                    return Err(HeadError::Bad(
                        "X-Request-Id must be 1 to 128 visible ASCII characters (no spaces or control characters)",
                    ));
                }
                request_id = Some(value.to_string());
            }
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    connection_upgrade = true;
                }
            }
        } else if let Some(ws) = websocket.as_mut() {
            if name.eq_ignore_ascii_case("upgrade") {
                upgrade_header = value.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket"));
            } else if name.eq_ignore_ascii_case("sec-websocket-key") {
                ws.key = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("sec-websocket-version") {
                ws.version = Some(value.to_string());
            }
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err(HeadError::Bad("Content-Length together with Transfer-Encoding is refused"));
    }
    // `Length(0)` (a length was given) differs from `None` (no framing at
    // all), which is what 411 is about.
    let body = match (chunked, content_length) {
        (true, _) => BodyFraming::Chunked,
        (false, Some(n)) => BodyFraming::Length(n),
        (false, None) => BodyFraming::None,
    };
    if let Some(ws) = websocket.as_mut() {
        ws.upgrade = upgrade_header && connection_upgrade;
    }
    Ok(RequestHead {
        method,
        target,
        body,
        media,
        gzip,
        expect_continue,
        keep_alive,
        len,
        bearer,
        websocket,
        request_id,
        origin,
        path: kept_path,
    })
}

/// Whether the request line reads `METHOD TARGET HTTP/x.y` with x.y not 1.x.
fn names_other_http_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(buf);
    let mut parts = line.trim_ascii().split(|&b| b == b' ');
    let (Some(_), Some(_), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    version.len() >= 6
        && version.starts_with(b"HTTP/")
        && version[5].is_ascii_digit()
        && !version.starts_with(b"HTTP/1.")
}

/// Progress of a chunked body decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// Need more input; `consumed` bytes of input were decoded so far.
    Partial { consumed: usize },
    /// Body complete; `consumed` bytes of input (trailers included) were used.
    Done { consumed: usize },
}

/// Why a chunked body is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkError {
    /// 400: bad chunk size line or missing CRLF.
    Bad,
    /// 413: the decoded body grew past the limit.
    TooLarge,
}

/// Decodes as many complete chunks from `input` as it holds into `out`.
/// Call again with the unconsumed rest plus new bytes. Strict (RFC 9112
/// §7.1): a chunk size is 1 to 16 hex digits, extensions hold no control
/// characters, every line ends in CRLF, and trailers are well-formed
/// header lines; anything else is refused, because a lenient reading here
/// is where request smuggling lives.
pub fn decode_chunks(input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<Chunked, ChunkError> {
    let mut at = 0;
    loop {
        let rest = &input[at..];
        let Some((size_len, size)) = chunk_size_line(rest)? else {
            return Ok(Chunked::Partial { consumed: at });
        };
        if size == 0 {
            return match trailers_end(&rest[size_len..])? {
                Some(end) => Ok(Chunked::Done { consumed: at + size_len + end }),
                None => Ok(Chunked::Partial { consumed: at }),
            };
        }
        let size = usize::try_from(size).map_err(|_| ChunkError::TooLarge)?;
        if out.len().saturating_add(size) > limit {
            return Err(ChunkError::TooLarge);
        }
        let need = size_len + size + 2;
        if rest.len() < need {
            return Ok(Chunked::Partial { consumed: at });
        }
        if &rest[size_len + size..need] != b"\r\n" {
            return Err(ChunkError::Bad);
        }
        out.extend_from_slice(&rest[size_len..size_len + size]);
        at += need;
    }
}

/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 8 * 1024;

/// `chunk-size [ chunk-ext ] CRLF` at the start of `buf`: its length and the
/// size, or `None` when the line is not complete yet.
fn chunk_size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, ChunkError> {
    let Some(lf) = buf.iter().take(MAX_CHUNK_LINE + 1).position(|&b| b == b'\n') else {
        return if buf.len() > MAX_CHUNK_LINE { Err(ChunkError::Bad) } else { Ok(None) };
    };
    let line = buf[..lf].strip_suffix(b"\r").ok_or(ChunkError::Bad)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(ChunkError::Bad);
    }
    let size = line[..digits].iter().fold(0u64, |n, &b| (n << 4) | u64::from((b as char).to_digit(16).unwrap_or(0)));
    let ext = &line[digits..];
    // Extensions: `;name[=value]`, possibly after whitespace; no CTLs.
    let ext_ok = ext.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
        && (ext.is_empty() || ext.trim_ascii_start().starts_with(b";"));
    if !ext_ok {
        return Err(ChunkError::Bad);
    }
    Ok(Some((lf + 1, size)))
}

/// The trailer section after the last chunk: header lines up to an empty
/// line. Its length, or `None` when it is not complete yet.
fn trailers_end(buf: &[u8]) -> Result<Option<usize>, ChunkError> {
    let mut at = 0;
    loop {
        if at > MAX_TRAILERS {
            return Err(ChunkError::Bad);
        }
        let rest = &buf[at..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            return if rest.len() > MAX_TRAILERS { Err(ChunkError::Bad) } else { Ok(None) };
        };
        let line = rest[..lf].strip_suffix(b"\r").ok_or(ChunkError::Bad)?;
        at += lf + 1;
        if line.is_empty() {
            return Ok(Some(at));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { return Err(ChunkError::Bad) };
        let name_ok = colon > 0 && line[..colon].iter().all(|&b| is_token_char(b));
        let value_ok = line[colon + 1..].iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80);
        if !name_ok || !value_ok {
            return Err(ChunkError::Bad);
        }
    }
}

/// RFC 9110 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Why a gzip body is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GunzipError {
    /// 400: not valid gzip.
    Invalid,
    /// 413: more than the limit once decompressed.
    TooLarge,
    /// 503: the output does not fit in the memory budget now.
    OverBudget(crate::budget::OverBudget),
}

/// Decompressed output grows by at least this much at a time.
const GUNZIP_STEP: usize = 64 * 1024;

/// Decompresses a gzip body, refusing to produce more than `limit` bytes.
/// The output is leased from the memory budget as it grows (`lease` already
/// holds the compressed body), so a bomb within `limit` still cannot take
/// more than the budget allows.
pub fn gunzip(body: &[u8], limit: usize, lease: &mut crate::budget::Lease) -> Result<Vec<u8>, GunzipError> {
    let base = lease.bytes();
    let mut out: Vec<u8> = Vec::new();
    let mut decoder = flate2::read::MultiGzDecoder::new(body).take(limit as u64 + 1);
    loop {
        if out.capacity() == out.len() {
            let grow = GUNZIP_STEP.max(out.len() / 2).min(limit + 1 - out.len().min(limit));
            lease.try_resize(base + out.len() + grow).map_err(GunzipError::OverBudget)?;
            out.reserve_exact(grow.max(1));
        }
        let room = (out.capacity() - out.len()) as u64;
        match (&mut decoder).take(room).read_to_end(&mut out) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Err(GunzipError::Invalid),
        }
        if out.len() > limit {
            return Err(GunzipError::TooLarge);
        }
    }
    if out.len() > limit {
        return Err(GunzipError::TooLarge);
    }
    Ok(out)
}

/// A response, written in one go.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Seconds for `Retry-After` (503, 429).
    pub retry_after: Option<u32>,
    /// `Allow` for 405.
    pub allow: Option<&'static str>,
    /// `WWW-Authenticate` for 401.
    pub challenge: Option<&'static str>,
    /// Close the connection after this response.
    pub close: bool,
    /// `X-Request-Id`: the client's, or the one made for the request.
    pub request_id: Option<Box<str>>,
    /// CORS headers, for a request from an allowed origin (or `Vary: Origin` alone).
    pub cors: Option<Box<Cors>>,
    /// The body's bytes in the memory budget, when it is large enough to
    /// count (a page of devices); released when the response is dropped.
    pub held: Option<std::rc::Rc<crate::budget::Lease>>,
}

/// The request headers a page may send (`Access-Control-Allow-Headers`).
pub const CORS_ALLOW_HEADERS: &str = "Content-Type, Authorization, Content-Encoding, X-Request-Id";
/// The answer headers a page may read besides the safelisted ones.
pub const CORS_EXPOSE_HEADERS: &str = "X-Request-Id, Retry-After";

/// The CORS headers of one answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cors {
    /// `Access-Control-Allow-Origin`: the request's origin, or `*`; `None`
    /// for an origin not allowed.
    pub allow_origin: Option<String>,
    /// `Vary: Origin`: the answer depends on the origin (a list, not `*`).
    pub vary: bool,
    /// A preflight's `Access-Control-Allow-Methods` and `-Max-Age`.
    pub preflight: Option<(&'static str, u32)>,
}

impl Response {
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: body.into_bytes(),
            retry_after: None,
            allow: None,
            challenge: None,
            close: false,
            request_id: None,
            cors: None,
            held: None,
        }
    }

    /// `{"error": message}` plus extra fields already rendered as JSON members.
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, serde_json::json!({ "error": message }).to_string())
    }

    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 204 with no body: a CORS preflight's answer.
    pub fn no_content() -> Self {
        let mut r = Self::json(204, String::new());
        r.content_type = "";
        r
    }

    /// Serialises into `out` (cleared first). `head_only` omits the body (HEAD).
    pub fn write_to(&self, out: &mut Vec<u8>, head_only: bool) {
        use std::io::Write as _;
        out.clear();
        let _ = write!(out, "HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        // A 204 has neither (RFC 9110 §8.6).
        if self.status != 204 {
            let _ = write!(out, "Content-Type: {}\r\nContent-Length: {}\r\n", self.content_type, self.body.len());
        }
        if let Some(id) = &self.request_id {
            let _ = write!(out, "X-Request-Id: {id}\r\n");
        }
        if let Some(cors) = &self.cors {
            if let Some(origin) = &cors.allow_origin {
                let _ = write!(out, "Access-Control-Allow-Origin: {origin}\r\n");
                let _ = write!(out, "Access-Control-Expose-Headers: {CORS_EXPOSE_HEADERS}\r\n");
                if let Some((methods, max_age)) = cors.preflight {
                    let _ = write!(
                        out,
                        "Access-Control-Allow-Methods: {methods}\r\nAccess-Control-Allow-Headers: \
                         {CORS_ALLOW_HEADERS}\r\nAccess-Control-Max-Age: {max_age}\r\n"
                    );
                }
            }
            if cors.vary {
                out.extend_from_slice(b"Vary: Origin\r\n");
            }
        }
        if let Some(s) = self.retry_after {
            let _ = write!(out, "Retry-After: {s}\r\n");
        }
        if let Some(a) = self.allow {
            let _ = write!(out, "Allow: {a}\r\n");
        }
        if let Some(c) = self.challenge {
            let _ = write!(out, "WWW-Authenticate: {c}\r\n");
        }
        if self.close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<RequestHead, HeadError> {
        parse_head(raw.as_bytes(), 64, 16 * 1024)
    }

    #[test]
    fn post_with_length() {
        let h = head("POST /events/batch?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/x-ndjson; charset=utf-8\r\nContent-Length: 12\r\nContent-Encoding: gzip\r\n\r\nbody").unwrap();
        assert_eq!(
            (h.method, h.target, h.body, h.media, h.gzip, h.keep_alive),
            (Method::Post, Route::Batch, BodyFraming::Length(12), Media::Ndjson, true, true)
        );
        assert_eq!(h.len, h.len.min(200));
    }

    #[test]
    fn partial_and_limits() {
        assert_eq!(head("POST /events HTTP/1.1\r\nHost"), Err(HeadError::Partial));
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(matches!(head(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err(HeadError::TooLarge(_))));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(300));
        assert!(matches!(parse_head(big.as_bytes(), 64, 256), Err(HeadError::TooLarge(_))));
    }

    #[test]
    fn websocket_handshake_headers() {
        let h = head("GET /ws?device_id=d%201&type=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        let ws = h.websocket.unwrap();
        assert!(ws.upgrade);
        assert_eq!(
            (ws.key.as_deref(), ws.version.as_deref(), ws.query.as_str()),
            (Some("dGhlIHNhbXBsZSBub25jZQ=="), Some("13"), "device_id=d%201&type=t")
        );
        assert!(head("GET /health HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").unwrap().websocket.is_none());
        assert!(!head("GET /ws HTTP/1.1\r\n\r\n").unwrap().websocket.unwrap().upgrade);
    }

    #[test]
    fn request_id_and_origin() {
        let h =
            head("POST /events HTTP/1.1\r\nX-Request-Id: dev-42/a:b\r\nOrigin: https://app.example\r\n\r\n").unwrap();
        assert_eq!((h.request_id.as_deref(), h.origin.as_deref()), (Some("dev-42/a:b"), Some("https://app.example")));
        assert_eq!(head("GET /health HTTP/1.1\r\nX-Request-Id:\r\n\r\n").unwrap().request_id, None);
        let long = format!("GET /health HTTP/1.1\r\nX-Request-Id: {}\r\n\r\n", "a".repeat(129));
        let at_limit = format!("GET /health HTTP/1.1\r\nX-Request-Id: {}\r\n\r\n", "a".repeat(128));
        assert!(head(&at_limit).is_ok());
        for bad in [
            long.as_str(),
            "GET / HTTP/1.1\r\nX-Request-Id: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nX-Request-Id: \u{e9}\r\n\r\n",
        ] {
            match head(bad) {
                Err(HeadError::Bad(why)) => assert!(why.contains("X-Request-Id"), "{why}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(matches!(head("GET / HTTP/1.1\r\nX-Request-Id: a\r\nX-Request-Id: b\r\n\r\n"), Err(HeadError::Bad(_))));
        assert_eq!(head("OPTIONS /events HTTP/1.1\r\n\r\n").unwrap().method, Method::Options);
    }

    #[test]
    fn cors_and_request_id_headers() {
        let mut out = Vec::new();
        let mut r = Response::no_content();
        r.request_id = Some("r-1".into());
        r.cors = Some(Box::new(Cors {
            allow_origin: Some("https://a".into()),
            vary: true,
            preflight: Some(("POST, OPTIONS", 600)),
        }));
        r.write_to(&mut out, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n") && !text.contains("Content-Length"), "{text}");
        for h in [
            "X-Request-Id: r-1\r\n",
            "Access-Control-Allow-Origin: https://a\r\n",
            "Access-Control-Allow-Methods: POST, OPTIONS\r\n",
            "Access-Control-Allow-Headers: Content-Type, Authorization, Content-Encoding, X-Request-Id\r\n",
            "Access-Control-Max-Age: 600\r\n",
            "Access-Control-Expose-Headers: X-Request-Id, Retry-After\r\n",
            "Vary: Origin\r\n",
        ] {
            assert!(text.contains(h), "{h} in {text}");
        }
        let mut out = Vec::new();
        let mut r = Response::error(403, "no");
        r.cors = Some(Box::new(Cors { allow_origin: None, vary: true, preflight: None }));
        r.write_to(&mut out, false);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("Access-Control") && text.contains("Vary: Origin\r\n"), "{text}");
    }

    #[test]
    fn version_errors() {
        assert_eq!(head("GET / HTTP/2.0\r\n\r\n"), Err(HeadError::Version));
        assert!(matches!(head("THIS IS NOT HTTP\r\n\r\n"), Err(HeadError::Bad(_))));
    }

    #[test]
    fn smuggling_is_refused() {
        assert!(matches!(
            head("POST /events HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(
            head("POST /events HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(
            head("POST /events HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(head("POST /events HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), Err(HeadError::Bad(_))));
        let same = head("POST /events HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n").unwrap();
        assert_eq!(same.body, BodyFraming::Length(2));
    }

    #[test]
    fn framing_media_encoding_connection() {
        assert_eq!(
            head("POST /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap().body,
            BodyFraming::Chunked
        );
        assert_eq!(head("POST /events HTTP/1.1\r\n\r\n").unwrap().body, BodyFraming::None);
        assert_eq!(head("POST /events HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap().body, BodyFraming::Length(0));
        assert_eq!(
            head("POST /events HTTP/1.1\r\nContent-Type: text/plain\r\n\r\n").unwrap().media,
            Media::Unsupported
        );
        assert_eq!(head("POST /events HTTP/1.1\r\nContent-Encoding: br\r\n\r\n"), Err(HeadError::Encoding));
        assert!(!head("GET /health HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().keep_alive);
        assert!(!head("GET /health HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(head("GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().keep_alive);
        assert!(head("POST /events HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").unwrap().expect_continue);
        assert_eq!(head("GET /nope HTTP/1.1\r\n\r\n").unwrap().target, Route::Unknown);
    }

    #[test]
    fn chunked_decoding() {
        let mut out = Vec::new();
        let input = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        assert_eq!(decode_chunks(input, &mut out, 100), Ok(Chunked::Done { consumed: input.len() - 4 }));
        assert_eq!(out, b"hello world");
        let mut out = Vec::new();
        assert_eq!(decode_chunks(b"5\r\nhel", &mut out, 100), Ok(Chunked::Partial { consumed: 0 }));
        assert_eq!(decode_chunks(b"5\r\nhello\r\n0\r\n", &mut out, 100), Ok(Chunked::Partial { consumed: 10 }));
        let mut out = Vec::new();
        assert_eq!(decode_chunks(b"zz\r\n", &mut out, 100), Err(ChunkError::Bad));
        assert_eq!(decode_chunks(b"5\r\nhelloXX", &mut out, 100), Err(ChunkError::Bad));
        assert_eq!(decode_chunks(b"ffffffffffff\r\n", &mut out, 100), Err(ChunkError::TooLarge));
    }

    #[test]
    fn chunked_decoding_is_strict_where_smuggling_lives() {
        let bad: &[&[u8]] = &[
            b"\r\nhello\r\n0\r\n\r\n",                // empty size line
            b"-5\r\nhello\r\n0\r\n\r\n",              // sign
            b"0x5\r\nhello\r\n0\r\n\r\n",             // prefix
            b"5\nhello\r\n0\r\n\r\n",                 // bare LF
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",          // LF inside an extension
            b"5;a\x01\r\nhello\r\n0\r\n\r\n",         // CTL inside an extension
            b"5 junk\r\nhello\r\n0\r\n\r\n",          // not an extension
            b"11111111111111111\r\n",                 // 17 digits
            b"5\r\nhello\r\n0\r\nno colon\r\n\r\n",   // bad trailer
            b"5\r\nhello\r\n0\r\n x: folded\r\n\r\n", // obs-fold trailer
            b"5\r\nhello\r\n0\r\nX: y\n\r\n",         // bare LF in trailers
        ];
        for input in bad {
            let mut out = Vec::new();
            let got = decode_chunks(input, &mut out, 1 << 20);
            assert!(got.is_err(), "{:?} -> {got:?}", String::from_utf8_lossy(input));
        }
        let mut out = Vec::new();
        let ok = b"5 ; name=\"v\"\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n";
        assert_eq!(decode_chunks(ok, &mut out, 100), Ok(Chunked::Done { consumed: ok.len() }));
    }

    #[test]
    fn content_length_is_digits_only() {
        for v in ["+5", "-5", "5 5", "0x5", "", "99999999999999999999"] {
            let raw = format!("POST /events HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
            assert!(matches!(head(&raw), Err(HeadError::Bad(_))), "{v:?}");
        }
        assert_eq!(head("POST /events HTTP/1.1\r\nContent-Length: 05\r\n\r\n").unwrap().body, BodyFraming::Length(5));
    }

    #[test]
    fn gzip_bounds() {
        use std::io::Write as _;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&vec![b'a'; 10_000]).unwrap();
        let gz = enc.finish().unwrap();
        let lease = &mut crate::budget::Lease::detached();
        assert_eq!(gunzip(&gz, 10_000, lease).unwrap().len(), 10_000);
        assert_eq!(gunzip(&gz, 9_999, lease), Err(GunzipError::TooLarge));
        assert_eq!(gunzip(b"not gzip", 100, lease), Err(GunzipError::Invalid));
        let budget = crate::budget::Budget::new("limits.memory_budget_bytes", 5_000);
        let mut small = budget.lease();
        assert!(matches!(gunzip(&gz, 10_000, &mut small), Err(GunzipError::OverBudget(_))));
        let big = crate::budget::Budget::new("limits.memory_budget_bytes", 1 << 20);
        let mut lease = big.lease();
        let out = gunzip(&gz, 10_000, &mut lease).unwrap();
        assert!(lease.bytes() >= out.len(), "the output is leased as it grows");
    }

    #[test]
    fn response_bytes() {
        let mut out = Vec::new();
        Response::error(503, "full").retry_after(1).closing().write_to(&mut out, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Retry-After: 1\r\n") && text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"full\"}"));
    }
}
