//! A connection's byte stream: plain TCP, or TLS over TCP with rustls.
//!
//! rustls is used sans-I/O (`ServerConnection` fed with `read_tls` and
//! drained with `write_tls`) so that every socket operation still goes
//! through [`io::read_more`] and [`io::write_all_by`], with their deadlines
//! and explicit io_uring cancellation; a wrapper stream type could not offer
//! that. The handshake happens inside the first read, under that read's
//! deadline. A WebSocket splits the stream into a reading and a writing task
//! on the same shard; with TLS both halves share the one session through an
//! `Rc<RefCell<…>>` that is never borrowed across an `.await`. One read loop
//! (`tls_read_more`) and one write (`tls_write_all_by`) serve the whole
//! stream and the halves alike.

use std::cell::RefCell;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use monoio::io::{CancelableAsyncReadRent, CancelableAsyncWriteRent, Splitable};
use monoio::net::TcpStream;
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use rustls::ServerConnection;

use super::io::{self, IDLE_READ_BYTES, ReadOutcome};

/// Most ciphertext read from the socket at a time (one full TLS record).
const CIPHER_READ_BYTES: usize = 16 * 1024 + 256;

/// Ciphertext to read for `want` plaintext bytes: as little as the caller's
/// idle read while it waits (with io_uring the buffer is pinned for the whole
/// wait), a whole record once data flows.
fn cipher_want(want: usize) -> usize {
    want.clamp(IDLE_READ_BYTES, CIPHER_READ_BYTES)
}

/// A connection's stream.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// TLS over one TCP stream.
pub struct TlsStream {
    tcp: TcpStream,
    tls: Rc<RefCell<TlsSession>>,
}

/// The rustls session and the ciphertext received but not yet fed to it.
/// Shared by a split stream's two halves; borrowed only between awaits.
pub struct TlsSession {
    conn: ServerConnection,
    cipher_in: Vec<u8>,
}

impl Transport {
    /// A TLS stream over `tcp`; the handshake runs in the first read.
    pub fn tls(tcp: TcpStream, config: &Arc<rustls::ServerConfig>) -> Result<Transport, rustls::Error> {
        let conn = ServerConnection::new(config.clone())?;
        let tls = Rc::new(RefCell::new(TlsSession { conn, cipher_in: Vec::new() }));
        Ok(Transport::Tls(Box::new(TlsStream { tcp, tls })))
    }

    /// See [`io::read_more`]: appends plaintext to `buf`.
    pub async fn read_more<I: Future<Output = ()>>(
        &mut self,
        buf: &mut Vec<u8>,
        want: usize,
        deadline: Instant,
        interrupt: I,
    ) -> ReadOutcome {
        match self {
            Transport::Plain(tcp) => io::read_more(tcp, buf, want, deadline, interrupt).await,
            Transport::Tls(s) => {
                let TlsStream { tcp, tls } = &mut **s;
                tls_read_more(tcp, tls, buf, want, deadline, interrupt).await
            }
        }
    }

    /// See [`io::write_all_by`]: writes all of `buf` as plaintext.
    pub async fn write_all_by(&mut self, buf: Vec<u8>, deadline: Instant) -> (bool, Vec<u8>) {
        match self {
            Transport::Plain(tcp) => io::write_all_by(tcp, buf, deadline).await,
            Transport::Tls(s) => tls_write_all_by(&mut s.tcp, &s.tls, buf, deadline).await,
        }
    }

    /// Splits into a reading and a writing half for a WebSocket session.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Transport::Plain(tcp) => {
                let (r, w) = tcp.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Transport::Tls(s) => {
                let TlsStream { tcp, tls } = *s;
                let (r, w) = tcp.into_split();
                (ReadHalf::Tls { tcp: r, tls: tls.clone() }, WriteHalf::Tls { tcp: w, tls })
            }
        }
    }
}

/// A socket under a TLS session, as the one read loop needs it: ciphertext
/// in, and the session's queued records (handshake, alerts) out when this
/// socket may write.
trait CipherSocket: CancelableAsyncReadRent {
    /// Sends the records the session has queued; false if that failed.
    async fn send_queued(&mut self, tls: &RefCell<TlsSession>, deadline: Instant) -> bool;
}

impl CipherSocket for TcpStream {
    async fn send_queued(&mut self, tls: &RefCell<TlsSession>, deadline: Instant) -> bool {
        let mut cipher = Vec::new();
        if !encrypt(&mut tls.borrow_mut().conn, &[], &mut cipher) {
            return false;
        }
        cipher.is_empty() || io::write_all_by(self, cipher, deadline).await.0
    }
}

impl CipherSocket for TcpOwnedReadHalf {
    /// A reading half cannot write: what the session queued in answer to a
    /// read (a TLS 1.3 key update, say) goes out with the writing half's
    /// next write. The handshake is over before a stream is split.
    async fn send_queued(&mut self, _: &RefCell<TlsSession>, _: Instant) -> bool {
        true
    }
}

/// The TLS read loop, for a whole stream and a reading half alike:
/// plaintext the session already has, else its queued records out, else
/// more ciphertext in (at most a record; see [`cipher_want`]).
async fn tls_read_more<S: CipherSocket, I: Future<Output = ()>>(
    tcp: &mut S,
    tls: &RefCell<TlsSession>,
    buf: &mut Vec<u8>,
    want: usize,
    deadline: Instant,
    interrupt: I,
) -> ReadOutcome {
    let mut interrupt = pin!(interrupt);
    let mut cipher = Vec::new();
    loop {
        let plaintext = tls.borrow_mut().take_plaintext(buf, want);
        match plaintext {
            Plaintext::Some => return ReadOutcome::Data,
            Plaintext::Closed => return ReadOutcome::Eof,
            Plaintext::Failed => {
                // Send the alert rustls queued, if the peer still listens.
                let _ = tcp.send_queued(tls, deadline).await;
                return ReadOutcome::Failed;
            }
            Plaintext::None => {}
        }
        // Handshake messages (and alerts) go out before we wait.
        if !tcp.send_queued(tls, deadline).await {
            return ReadOutcome::Failed;
        }
        match io::read_more(tcp, &mut cipher, cipher_want(want), deadline, interrupt.as_mut()).await {
            ReadOutcome::Data => tls.borrow_mut().cipher_in.append(&mut cipher),
            other => return other,
        }
    }
}

/// Writes all of `buf` as TLS records: encrypted first (no borrow of the
/// session lives across an await), then sent.
async fn tls_write_all_by<W: CancelableAsyncWriteRent>(
    tcp: &mut W,
    tls: &RefCell<TlsSession>,
    buf: Vec<u8>,
    deadline: Instant,
) -> (bool, Vec<u8>) {
    let mut cipher = Vec::with_capacity(buf.len() + buf.len() / 16 + 64);
    if !encrypt(&mut tls.borrow_mut().conn, &buf, &mut cipher) {
        return (false, buf);
    }
    (io::write_all_by(tcp, cipher, deadline).await.0, buf)
}

/// What the session had for the reader.
enum Plaintext {
    Some,
    None,
    /// The peer sent close_notify.
    Closed,
    /// A TLS protocol error; the connection is done.
    Failed,
}

impl TlsSession {
    /// Feeds buffered ciphertext to rustls and moves what plaintext it
    /// yields into `buf`.
    fn take_plaintext(&mut self, buf: &mut Vec<u8>, want: usize) -> Plaintext {
        loop {
            // Plaintext first: rustls stops accepting ciphertext while its
            // plaintext buffer is full.
            let len = buf.len();
            // At most `want`: a body read must not take the next request's bytes.
            buf.resize(len + want.max(1), 0);
            let read = self.conn.reader().read(&mut buf[len..]);
            match read {
                Ok(0) => {
                    buf.truncate(len);
                    return Plaintext::Closed;
                }
                Ok(n) => {
                    buf.truncate(len + n);
                    return Plaintext::Some;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => buf.truncate(len),
                Err(_) => {
                    buf.truncate(len);
                    return Plaintext::Failed;
                }
            }
            if self.cipher_in.is_empty() {
                return Plaintext::None;
            }
            let fed = match self.conn.read_tls(&mut self.cipher_in.as_slice()) {
                Ok(n) => n,
                Err(_) => return Plaintext::Failed,
            };
            self.cipher_in.drain(..fed);
            if self.cipher_in.is_empty() && self.cipher_in.capacity() > IDLE_READ_BYTES {
                // An idle connection keeps no record-sized buffer.
                self.cipher_in = Vec::new();
            }
            if self.conn.process_new_packets().is_err() {
                return Plaintext::Failed;
            }
            if fed == 0 {
                return Plaintext::None;
            }
        }
    }
}

/// Encrypts all of `plain` into TLS records appended to `cipher`. Draining
/// the records as it goes keeps rustls's own buffer from filling up.
fn encrypt(conn: &mut ServerConnection, plain: &[u8], cipher: &mut Vec<u8>) -> bool {
    let mut at = 0;
    while at < plain.len() || conn.wants_write() {
        if at < plain.len() {
            match conn.writer().write(&plain[at..]) {
                Ok(n) => at += n,
                Err(_) => return false,
            }
        }
        while conn.wants_write() {
            if conn.write_tls(cipher).is_err() {
                return false;
            }
        }
    }
    true
}

/// The reading half of a split [`Transport`].
pub enum ReadHalf {
    Plain(TcpOwnedReadHalf),
    Tls { tcp: TcpOwnedReadHalf, tls: Rc<RefCell<TlsSession>> },
}

impl ReadHalf {
    /// See [`io::read_more`].
    pub async fn read_more<I: Future<Output = ()>>(
        &mut self,
        buf: &mut Vec<u8>,
        want: usize,
        deadline: Instant,
        interrupt: I,
    ) -> ReadOutcome {
        match self {
            ReadHalf::Plain(tcp) => io::read_more(tcp, buf, want, deadline, interrupt).await,
            ReadHalf::Tls { tcp, tls } => tls_read_more(tcp, tls, buf, want, deadline, interrupt).await,
        }
    }
}

/// The writing half of a split [`Transport`].
pub enum WriteHalf {
    Plain(TcpOwnedWriteHalf),
    Tls { tcp: TcpOwnedWriteHalf, tls: Rc<RefCell<TlsSession>> },
}

impl WriteHalf {
    /// See [`io::write_all_by`].
    pub async fn write_all_by(&mut self, buf: Vec<u8>, deadline: Instant) -> (bool, Vec<u8>) {
        match self {
            WriteHalf::Plain(tcp) => io::write_all_by(tcp, buf, deadline).await,
            WriteHalf::Tls { tcp, tls } => tls_write_all_by(tcp, tls, buf, deadline).await,
        }
    }
}

/// Loads `[tls]`'s certificate chain and key into a rustls server config,
/// with the SHA-256 fingerprint of the leaf certificate (hex), which the
/// log shows so that an operator can tell which certificate is in force.
pub fn server_config(cert_file: &str, key_file: &str) -> Result<(Arc<rustls::ServerConfig>, String), (String, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("tls.cert_file".to_string(), format!("cannot read certificates from {cert_file}: {e}")))?;
    if certs.is_empty() {
        return Err(("tls.cert_file".into(), format!("{cert_file} holds no PEM certificate")));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| ("tls.key_file".to_string(), format!("cannot read a private key from {key_file}: {e}")))?;
    let fingerprint = {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(certs[0].as_ref());
        digest.iter().fold(String::with_capacity(64), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| ("tls.key_file".to_string(), format!("{key_file} is not a usable private key: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls".to_string(), e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            let why = format!("{cert_file} is not a valid certificate for the key in tls.key_file: {e}");
            ("tls.cert_file".to_string(), why)
        })?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), fingerprint))
}
