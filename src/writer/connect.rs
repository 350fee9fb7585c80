//! How ingestd opens a PostgreSQL connection: TLS with libpq's `sslmode`
//! meaning and the password, from the files the configuration names.
//!
//! TLS is rustls (the same crate and ring provider as the HTTPS listener)
//! through `tokio-postgres-rustls`, which turns a `rustls::ClientConfig`
//! into the `MakeTlsConnect` the sync `postgres` crate takes (and supports
//! SCRAM channel binding). The modes are built here as certificate
//! verifiers on that config: `verify-full` is rustls's WebPKI verifier,
//! `verify-ca` the same minus the host-name check, and `require`/`prefer`
//! without a CA file check only the handshake signatures (encryption
//! without authentication, as in libpq). `prefer` retries in plain text
//! when TLS fails, as libpq does.
//!
//! An [`Access`] is built by `resources` at start-up and on SIGHUP (so a
//! rotated password file or certificate is used by the next connection),
//! and shared as [`SharedAccess`] by the writers' pool and the probe.
//! [`Access::describe`] turns a failed connection into a message that names
//! the cause and the key to change; [`super::db::is_refusal`] decides that
//! a certificate that does not verify is a refusal, not an outage.

use std::sync::Arc;

use postgres::Client;
use postgres::config::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseConfig, DbTls, Roots, TlsMode, Verify};

/// The current [`Access`], swapped whole on SIGHUP.
pub type SharedAccess = Arc<arc_swap::ArcSwap<Access>>;

/// Everything a connection needs beyond the URL: TLS and the password.
pub struct Access {
    tls: DbTls,
    connector: MakeRustlsConnect,
    /// From `database.password_file` or `PGPASSWORD`, used when the URL has
    /// none. Never logged (`Debug` leaves it out).
    password: Option<String>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A file problem: (key, why).
type Problem = (String, String);

impl Access {
    /// Reads the CA, client certificate and password files `db` names (and
    /// `PGPASSWORD`); reports every problem with its key.
    pub fn load(db: &DatabaseConfig) -> Result<Access, Vec<Problem>> {
        Self::load_with(db, std::env::var("PGPASSWORD").ok())
    }

    /// [`Access::load`] with the environment's password given.
    pub fn load_with(db: &DatabaseConfig, pgpassword: Option<String>) -> Result<Access, Vec<Problem>> {
        let target = db.target()?;
        let mut problems = Vec::new();
        let config = client_config(&target.tls).map_err(|p| problems.push(p)).ok();
        let password = if !db.password_file.is_empty() {
            read_password(&db.password_file).map_err(|p| problems.push(p)).ok()
        } else if target.config.get_password().is_some() {
            None
        } else {
            pgpassword.filter(|p| !p.is_empty())
        };
        match config {
            Some(config) if problems.is_empty() => {
                Ok(Access { tls: target.tls, connector: MakeRustlsConnect::new(config), password })
            }
            _ => Err(problems),
        }
    }

    /// The effective TLS settings.
    pub fn tls(&self) -> &DbTls {
        &self.tls
    }

    /// Opens a connection with `config` (the URL without its TLS
    /// parameters, plus ingestd's session settings) in this TLS mode.
    pub fn connect(&self, config: &postgres::Config) -> Result<Client, postgres::Error> {
        let mut config = config.clone();
        if config.get_password().is_none()
            && let Some(p) = &self.password
        {
            config.password(p);
        }
        let tls = self.connector.clone();
        match self.tls.mode.value {
            TlsMode::Disable => config.ssl_mode(SslMode::Disable).connect(tls),
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => {
                config.ssl_mode(SslMode::Require).connect(tls)
            }
            // libpq: TLS when the server offers it; when it fails (the
            // handshake, or the server turning the TLS session away), once
            // more in plain text. A TCP failure is not retried.
            TlsMode::Prefer => match config.ssl_mode(SslMode::Prefer).connect(tls.clone()) {
                Err(e) if e.as_db_error().is_some() || is_tls_error(&e) => {
                    config.ssl_mode(SslMode::Disable).connect(tls).map_err(|_| e)
                }
                other => other,
            },
        }
    }

    /// What went wrong, naming the key to change when the cause is a known
    /// one (a certificate, TLS required or missing, the password), else
    /// PostgreSQL's own words.
    pub fn describe(&self, e: &postgres::Error) -> String {
        let base = describe(e);
        match self.explain(e) {
            Some(why) => format!("{why} ({base})"),
            None => base,
        }
    }

    fn explain(&self, e: &postgres::Error) -> Option<String> {
        let tls = &self.tls;
        let mode = format!("database.tls_mode = {} (from {})", tls.mode.value.as_str(), tls.mode.from);
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            if code == "28000" && db.message().contains("no encryption") {
                return Some(format!(
                    "PostgreSQL requires TLS for this connection (pg_hba.conf has only hostssl entries for it) \
                     but TLS is off: {mode}; use sslmode=require or verify-full (database.tls_mode)"
                ));
            }
            if code == "28P01" {
                return Some(format!("PostgreSQL rejected the password; check {}", self.password_source()));
            }
            // pg_hba.conf `cert` (or clientcert=verify-ca / verify-full):
            // no certificate came, or it names another user.
            if code == "28000" && db.message().contains("certificate") {
                return Some(match &tls.client {
                    None => "PostgreSQL requires a client certificate for this user (pg_hba.conf `cert` or \
                             clientcert) and none is configured: set database.cert_file and database.key_file \
                             (sslcert / sslkey)"
                        .to_string(),
                    Some((cert, _)) if db.message().contains("requires a valid client certificate") => format!(
                        "PostgreSQL requires a client certificate but did not receive {} ({}): a server asks for \
                         one only when its ssl_ca_file is set",
                        cert.value, cert.from
                    ),
                    Some((cert, _)) => format!(
                        "PostgreSQL did not accept the client certificate {} ({}) for the user in database.url: \
                         with pg_hba.conf `cert` its CN must be that user name (or mapped to it in pg_ident.conf)",
                        cert.value, cert.from
                    ),
                });
            }
            return None;
        }
        if e.to_string().contains("password missing") {
            return Some(
                "PostgreSQL asks for a password and none is configured: put it in database.password_file, \
                 PGPASSWORD or the URL"
                    .into(),
            );
        }
        if let Some(r) = rustls_error(e) {
            let roots = match &tls.roots.value {
                Roots::File(path) => format!("the CA file {path} ({})", tls.roots.from),
                Roots::System | Roots::None => {
                    "the system's trusted roots (no database.ca_file / sslrootcert given)".to_string()
                }
            };
            return Some(match r {
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => format!(
                    "the server's certificate is not valid for the host name in database.url ({mode} checks the \
                     host name): connect by a name the certificate carries, or use verify-ca"
                ),
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature | CertificateError::BadEncoding,
                ) => format!(
                    "the server's certificate does not verify against {roots}: set database.ca_file (sslrootcert) \
                     to the CA that signed it"
                ),
                rustls::Error::InvalidCertificate(c) => {
                    format!("the server's certificate is not acceptable ({c:?}) under {mode}, checked against {roots}")
                }
                rustls::Error::AlertReceived(alert) => match &tls.client {
                    // Under TLS 1.3 the server checks the client's
                    // certificate after the client's side of the handshake,
                    // and says no with an alert.
                    Some((cert, _)) if client_cert_alert(*alert) => format!(
                        "PostgreSQL did not accept the client certificate {} ({}): {alert:?}; it must be signed \
                         by a CA in the server's ssl_ca_file and be valid now",
                        cert.value, cert.from
                    ),
                    Some(_) => format!("PostgreSQL ended the TLS handshake ({alert:?}) under {mode}"),
                    None => format!(
                        "PostgreSQL ended the TLS handshake ({alert:?}): if it wants a client certificate, set \
                         database.cert_file / key_file (sslcert / sslkey)"
                    ),
                },
                other => format!("TLS with PostgreSQL failed ({other}) under {mode}"),
            });
        }
        if is_tls_error(e) && e.to_string().contains("does not support TLS") {
            return Some(format!(
                "PostgreSQL does not offer TLS but {mode}: turn ssl on in the server, or use sslmode=prefer / disable"
            ));
        }
        None
    }

    fn password_source(&self) -> &'static str {
        match self.password {
            Some(_) => "database.password_file or PGPASSWORD",
            None => "the password in database.url (or database.password_file, PGPASSWORD)",
        }
    }
}

/// PostgreSQL's own words for an error (severity, message, SQLSTATE), or
/// the client's when the server said nothing.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        // The client's words, with the cause it keeps apart (the TLS
        // handshake's "invalid peer certificate: UnknownIssuer", an I/O error).
        None => match std::error::Error::source(e) {
            Some(cause) if !e.to_string().contains(&cause.to_string()) => format!("{e}: {cause}"),
            _ => e.to_string(),
        },
    }
}

/// The alerts a TLS server sends about the client's certificate.
fn client_cert_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::UnknownCA
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::CertificateRequired
            | A::AccessDenied
    )
}

/// Whether the error came from the TLS layer (the handshake, or the server
/// saying it does not speak TLS), as opposed to TCP or the protocol.
pub fn is_tls_error(e: &postgres::Error) -> bool {
    e.to_string().starts_with("error performing TLS handshake")
}

/// The rustls error inside a failed handshake, if that is what it was (a
/// certificate, an alert), rather than the connection dropping under it.
pub fn rustls_error(e: &postgres::Error) -> Option<&rustls::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
            && let Some(r) = r.downcast_ref::<rustls::Error>()
        {
            return Some(r);
        }
        cause = c.source();
    }
    None
}

fn read_password(path: &str) -> Result<String, Problem> {
    let key = "database.password_file".to_string();
    let text = std::fs::read_to_string(path).map_err(|e| (key.clone(), format!("cannot read {path}: {e}")))?;
    // One line; the newline an editor adds is not part of it.
    let password = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if password.is_empty() {
        return Err((key, format!("{path} is empty")));
    }
    if password.contains('\n') {
        return Err((key, format!("{path} must hold the password on one line")));
    }
    Ok(password.to_string())
}

fn client_config(tls: &DbTls) -> Result<rustls::ClientConfig, Problem> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("database.tls_mode".to_string(), e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.verify {
        Verify::Nothing => Arc::new(NoVerification(provider.clone())),
        Verify::Chain | Verify::ChainAndHost => {
            let roots = Arc::new(roots(tls)?);
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| (key_of(&tls.roots.from, "database.ca_file"), e.to_string()))?;
            if tls.verify == Verify::Chain { Arc::new(ChainOnly(webpki)) } else { webpki }
        }
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    match &tls.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let (cert_key, key_key) =
                (key_of(&cert.from, "database.cert_file"), key_of(&key.from, "database.key_file"));
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.value)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| (cert_key.clone(), format!("cannot read certificates from {}: {e}", cert.value)))?;
            if chain.is_empty() {
                return Err((cert_key, format!("{} holds no PEM certificate", cert.value)));
            }
            let private = PrivateKeyDer::from_pem_file(&key.value).map_err(|e| {
                let why = match e {
                    rustls::pki_types::pem::Error::NoItemsFound => {
                        format!("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", key.value)
                    }
                    e => format!("cannot read a private key from {}: {e}", key.value),
                };
                (key_key.clone(), why)
            })?;
            builder.with_client_auth_cert(chain, private).map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => (
                    cert_key,
                    format!("{} is not the certificate of the private key in {} ({key_key})", cert.value, key.value),
                ),
                e => (key_key, format!("{} is not a private key ingestd can use: {e}", key.value)),
            })
        }
    }
}

/// The key to name for a setting given as `from` (a key, or a URL parameter
/// that stands for `key`).
fn key_of(from: &str, key: &str) -> String {
    if from.starts_with("database.") { key.to_string() } else { format!("{key} ({from})") }
}

fn roots(tls: &DbTls) -> Result<rustls::RootCertStore, Problem> {
    let mut store = rustls::RootCertStore::empty();
    match &tls.roots.value {
        Roots::File(path) => {
            let key = key_of(&tls.roots.from, "database.ca_file");
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| (key.clone(), format!("cannot read CA certificates from {path}: {e}")))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err((key, format!("{path} holds no usable PEM CA certificate")));
            }
        }
        Roots::System | Roots::None => {
            // The platform's store (on Linux the distribution's bundle, or
            // SSL_CERT_FILE / SSL_CERT_DIR when set).
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(ToString::to_string).unwrap_or_else(|| "none found".into());
                return Err((
                    "database.ca_file".into(),
                    format!(
                        "is empty and the system has no trusted roots to verify PostgreSQL with ({why}); \
                         give the CA file (e.g. your provider's root certificate)"
                    ),
                ));
            }
        }
    }
    Ok(store)
}

/// `verify-ca`: the WebPKI verifier's chain check, without the host name.
/// rustls checks the chain before the name, so `NotValidForName` means the
/// chain verified.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` / `prefer` without a CA file: any certificate (libpq does the
/// same), but the handshake signatures are still checked, so the session
/// is encrypted to whoever holds that certificate's key.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(url: &str) -> DatabaseConfig {
        DatabaseConfig { url: url.into(), ..DatabaseConfig::default() }
    }

    #[test]
    fn pgpassword_only_when_nothing_else_gives_one() {
        let a = Access::load_with(&db("postgres://u@h/d"), Some("env".into())).unwrap();
        assert_eq!(a.password.as_deref(), Some("env"));
        let a = Access::load_with(&db("postgres://u:url@h/d"), Some("env".into())).unwrap();
        assert_eq!(a.password, None, "the URL's password wins");
        let dir = std::env::temp_dir().join(format!("ingestd-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "from file\n").unwrap();
        let d = DatabaseConfig { password_file: file.display().to_string(), ..db("postgres://u@h/d") };
        let a = Access::load_with(&d, Some("env".into())).unwrap();
        assert_eq!(a.password.as_deref(), Some("from file"));
        assert!(!format!("{a:?}").contains("from file"), "Debug hides it");
        std::fs::write(&file, "").unwrap();
        let e = Access::load_with(&d, None).unwrap_err();
        assert_eq!(e[0].0, "database.password_file");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_ca_file_names_its_key() {
        let e = Access::load_with(&db("postgres://u@h/d?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem"), None)
            .unwrap_err();
        assert!(e[0].0.starts_with("database.ca_file"), "{e:?}");
        assert!(e[0].0.contains("sslrootcert"), "{e:?}");
    }
}
