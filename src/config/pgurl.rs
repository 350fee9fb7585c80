//! TLS and the password of the PostgreSQL connection, with libpq's meaning
//! of the parameters people already write in their URLs (`sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`), and the same as `[database]` keys.
//!
//! The `postgres` crate knows `sslmode` only up to `require` and no
//! certificate parameters, so they are taken out of the URL here (the rest
//! of it is left byte for byte) and resolved once, with the keys, into a
//! [`DbTls`]: which mode, which roots, which client certificate, and which
//! key set each (for messages). A URL parameter and a key that disagree are
//! a configuration error naming both: nothing silently downgrades a
//! `verify-full` written in one place. Plain data: the files are read in
//! `resources`, the handshake happens in `writer::connect`.

use super::DatabaseConfig;

/// `sslmode`, as libpq reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, else plain (libpq's default). Verifies
    /// the chain only when a CA file is given, and falls back to plain when
    /// TLS fails.
    Prefer,
    /// TLS or nothing; the certificate is not checked unless a CA file is
    /// given (then as `verify-ca`: libpq's compatibility rule).
    Require,
    /// TLS, the chain checked against the CA file (or the system's roots),
    /// not the host name.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl TlsMode {
    pub const NAMES: &str = "disable, prefer, require, verify-ca or verify-full";

    pub fn parse(s: &str) -> Option<TlsMode> {
        Some(match s {
            "disable" => TlsMode::Disable,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// What the server's certificate is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Nothing (encryption without authentication): `prefer` and `require`
    /// without a CA file.
    Nothing,
    /// The chain, not the host name.
    Chain,
    /// The chain and the host name.
    ChainAndHost,
}

/// Where trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// Not needed (no verification).
    None,
    /// A PEM file of CA certificates.
    File(String),
    /// The system's trusted roots (`sslrootcert=system`, or a verify mode
    /// without a CA file).
    System,
}

/// One setting and where it was written, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given<T> {
    pub value: T,
    /// `database.tls_mode`, `sslmode in database.url`, or `default`.
    pub from: String,
}

/// The effective TLS settings of the database connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbTls {
    pub mode: Given<TlsMode>,
    pub verify: Verify,
    pub roots: Given<Roots>,
    /// Client certificate chain and key files.
    pub client: Option<(Given<String>, Given<String>)>,
}

/// The URL without the TLS parameters, and the TLS settings.
#[derive(Debug, Clone)]
pub struct DbTarget {
    /// What `postgres::Config` parses.
    pub url: String,
    pub config: postgres::Config,
    pub tls: DbTls,
}

/// The libpq parameters taken out of the URL: (libpq name, its key).
const TLS_PARAMS: [(&str, &str); 4] = [
    ("sslmode", "database.tls_mode"),
    ("sslrootcert", "database.ca_file"),
    ("sslcert", "database.cert_file"),
    ("sslkey", "database.key_file"),
];

impl DatabaseConfig {
    /// The URL and keys resolved; every problem, each with its key.
    pub fn target(&self) -> Result<DbTarget, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let (url, params) = match split_tls_params(&self.url) {
            Ok(split) => split,
            Err(why) => return Err(vec![("database.url".into(), why)]),
        };
        let config = url.parse::<postgres::Config>().map_err(|e| {
            vec![("database.url".to_string(), format!("is not a valid PostgreSQL URL or key=value string: {e}"))]
        })?;
        // One value per setting: the key's or the URL's, never two that differ.
        let mut pick = |param: &str, key: &str, key_value: &str| -> Option<Given<String>> {
            let in_url = params.iter().rev().find(|(k, _)| k == param).map(|(_, v)| v.clone());
            match (key_value.is_empty(), in_url) {
                (true, None) => None,
                (false, None) => Some(Given { value: key_value.to_string(), from: key.to_string() }),
                (true, Some(v)) => Some(Given { value: v, from: format!("{param} in database.url") }),
                (false, Some(v)) if v == key_value => {
                    Some(Given { value: v, from: format!("{key} (and {param} in database.url)") })
                }
                (false, Some(v)) => {
                    problems.push((
                        key.to_string(),
                        format!("is {key_value:?} but database.url says {param}={v}: give it in one place"),
                    ));
                    None
                }
            }
        };
        let [mode_p, root_p, cert_p, key_p] = TLS_PARAMS;
        let mode = pick(mode_p.0, mode_p.1, &self.tls_mode);
        let root = pick(root_p.0, root_p.1, &self.ca_file);
        let cert = pick(cert_p.0, cert_p.1, &self.cert_file);
        let key = pick(key_p.0, key_p.1, &self.key_file);

        let system = root.as_ref().is_some_and(|r| r.value == "system");
        let mode = match mode {
            Some(g) => match TlsMode::parse(&g.value) {
                Some(m) => Given { value: m, from: g.from },
                None => {
                    problems.push((mode_p.1.into(), format!("{:?} ({}) must be {}", g.value, g.from, TlsMode::NAMES)));
                    Given { value: TlsMode::Prefer, from: g.from }
                }
            },
            // libpq: sslrootcert=system implies verify-full.
            None if system => Given { value: TlsMode::VerifyFull, from: "sslrootcert=system".into() },
            None => Given { value: TlsMode::Prefer, from: "default (libpq's prefer)".into() },
        };
        if system && mode.value != TlsMode::VerifyFull {
            problems.push((
                mode_p.1.into(),
                format!(
                    "must be verify-full with the system's roots (ca_file = \"system\"), not {}",
                    mode.value.as_str()
                ),
            ));
        }
        let verify = match mode.value {
            TlsMode::Disable => Verify::Nothing,
            TlsMode::Prefer | TlsMode::Require if root.is_none() => Verify::Nothing,
            TlsMode::Prefer | TlsMode::Require | TlsMode::VerifyCa => Verify::Chain,
            TlsMode::VerifyFull => Verify::ChainAndHost,
        };
        let roots = match root {
            Some(g) if g.value == "system" => Given { value: Roots::System, from: g.from },
            Some(g) => Given { value: Roots::File(g.value), from: g.from },
            None if verify != Verify::Nothing => {
                Given { value: Roots::System, from: "the system's trusted roots (no database.ca_file)".into() }
            }
            None => Given { value: Roots::None, from: "none".into() },
        };
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(c), None) => {
                problems.push((key_p.1.into(), format!("is needed with {}: the client certificate's key", c.from)));
                None
            }
            (None, Some(k)) => {
                problems.push((cert_p.1.into(), format!("is needed with {}: the client certificate", k.from)));
                None
            }
        };
        if !self.password_file.is_empty() && config.get_password().is_some() {
            problems.push((
                "database.password_file".into(),
                "is set but database.url carries a password too: give it in one place".into(),
            ));
        }
        if problems.is_empty() {
            Ok(DbTarget { url, config, tls: DbTls { mode, verify, roots, client } })
        } else {
            Err(problems)
        }
    }
}

/// Takes libpq's TLS parameters out of a connection string (URL or
/// `key=value` form); returns the rest unchanged and the parameters
/// (decoded), in order.
pub fn split_tls_params(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    let ours = |k: &str| TLS_PARAMS.iter().any(|(p, _)| *p == k);
    let mut taken = Vec::new();
    if is_url(url) {
        let Some((base, query)) = url.split_once('?') else { return Ok((url.to_string(), taken)) };
        let mut kept = Vec::new();
        for piece in query.split('&') {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            let k = percent_decode(k)?;
            if ours(&k) {
                taken.push((k, percent_decode(v)?));
            } else {
                kept.push(piece);
            }
        }
        let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        return Ok((rest, taken));
    }
    let mut rest = String::with_capacity(url.len());
    let mut last = 0;
    for p in key_value_params(url)? {
        if ours(&p.key) {
            rest.push_str(&url[last..p.start]);
            last = p.end;
            taken.push((p.key, p.value));
        }
    }
    rest.push_str(&url[last..]);
    Ok((rest, taken))
}

/// Replaces the password of a connection string (`user:password@` and
/// `password=` in a URL, `password=` in the `key=value` form) with `***`.
pub fn mask_password(url: &str) -> String {
    if is_url(url) {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        // The userinfo ends at the last `@` before the query: a password may
        // hold `/` or `@`; masking too much is fine, showing a secret is not.
        let head = &rest[..rest.find('?').unwrap_or(rest.len())];
        let (authority, tail) = match head.rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                let after = &rest[at..];
                let tail_at = after.find(['/', '?']).unwrap_or(after.len());
                let (hosts, tail) = after.split_at(tail_at);
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let shown = if userinfo.contains(':') { format!("{user}:***") } else { userinfo.to_string() };
                (format!("{shown}{hosts}"), tail)
            }
            None => {
                let tail_at = rest.find(['/', '?']).unwrap_or(rest.len());
                let (hosts, tail) = rest.split_at(tail_at);
                (hosts.to_string(), tail)
            }
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|piece| match piece.split_once('=') {
                        Some((k, _)) if percent_decode(k).is_ok_and(|k| k == "password") => format!("{k}=***"),
                        _ => piece.to_string(),
                    })
                    .collect();
                format!("{path}?{}", query.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}://{authority}{tail}");
    }
    match key_value_params(url) {
        Ok(params) => {
            let mut out = String::with_capacity(url.len());
            let mut last = 0;
            for p in params.iter().filter(|p| p.key == "password") {
                out.push_str(&url[last..p.start]);
                out.push_str("password=***");
                last = p.end;
            }
            out.push_str(&url[last..]);
            out
        }
        // Unparseable: show nothing that might be a secret.
        Err(_) if url.contains("password") => "*** (not shown: it may hold a password)".into(),
        Err(_) => url.to_string(),
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => out.push(b),
                None => return Err(format!("bad percent-encoding in {s:?}")),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// One `key = value` of the libpq `key=value` form, with its byte span.
struct KeyValue {
    key: String,
    value: String,
    start: usize,
    end: usize,
}

/// libpq's `key=value` syntax: spaces around `=` allowed; a value is
/// single-quoted or runs to the next space, `\` escaping one character.
fn key_value_params(s: &str) -> Result<Vec<KeyValue>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_string();
        i = skip_ws(i);
        if b.get(i) != Some(&b'=') {
            return Err(format!("expected `=` after {key:?} in database.url"));
        }
        i = skip_ws(i + 1);
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(format!("unterminated quoted value of {key:?} in database.url")),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value).map_err(|_| format!("the value of {key:?} is not UTF-8"))?;
        out.push(KeyValue { key, value, start, end: i });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(url: &str, keys: &[(&str, &str)]) -> DatabaseConfig {
        let mut d = DatabaseConfig { url: url.into(), ..DatabaseConfig::default() };
        for (k, v) in keys {
            let v = v.to_string();
            match *k {
                "tls_mode" => d.tls_mode = v,
                "ca_file" => d.ca_file = v,
                "cert_file" => d.cert_file = v,
                "key_file" => d.key_file = v,
                "password_file" => d.password_file = v,
                _ => panic!("{k}"),
            }
        }
        d
    }

    #[test]
    fn url_params_are_taken_out_and_the_rest_kept() {
        let (rest, taken) =
            split_tls_params("postgres://u@h/db?application_name=a%20b&sslmode=verify-full&sslrootcert=%2Fca.pem")
                .unwrap();
        assert_eq!(rest, "postgres://u@h/db?application_name=a%20b");
        assert_eq!(taken, [("sslmode".into(), "verify-full".into()), ("sslrootcert".into(), "/ca.pem".into())]);
        let (rest, _) = split_tls_params("postgresql://u@h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://u@h/db");
    }

    #[test]
    fn key_value_params_are_taken_out() {
        let (rest, taken) =
            split_tls_params("host=h sslmode = require user=u sslrootcert='/a b\\'c.pem' dbname=d").unwrap();
        assert_eq!(rest, "host=h  user=u  dbname=d");
        assert_eq!(taken, [("sslmode".into(), "require".into()), ("sslrootcert".into(), "/a b'c.pem".into())]);
        assert!(split_tls_params("host=h sslmode='x").is_err());
    }

    #[test]
    fn libpq_rules() {
        let t = db("postgres://u@h/db", &[]).target().unwrap().tls;
        assert_eq!((t.mode.value, t.verify, t.roots.value), (TlsMode::Prefer, Verify::Nothing, Roots::None));
        let t = db("postgres://u@h/db?sslmode=require", &[]).target().unwrap().tls;
        assert_eq!(t.verify, Verify::Nothing);
        // require with a root file behaves like verify-ca.
        let t = db("postgres://u@h/db?sslmode=require&sslrootcert=/ca", &[]).target().unwrap().tls;
        assert_eq!((t.verify, t.roots.value), (Verify::Chain, Roots::File("/ca".into())));
        let t = db("postgres://u@h/db?sslmode=verify-full", &[]).target().unwrap().tls;
        assert_eq!((t.verify, t.roots.value), (Verify::ChainAndHost, Roots::System));
        let t = db("postgres://u@h/db", &[("tls_mode", "verify-ca"), ("ca_file", "/ca")]).target().unwrap().tls;
        assert_eq!((t.mode.value, t.verify), (TlsMode::VerifyCa, Verify::Chain));
        assert_eq!(t.mode.from, "database.tls_mode");
        let t = db("postgres://u@h/db?sslrootcert=system", &[]).target().unwrap().tls;
        assert_eq!((t.mode.value, t.roots.value), (TlsMode::VerifyFull, Roots::System));
    }

    #[test]
    fn conflicts_and_bad_values_are_named() {
        let e = db("postgres://u@h/db?sslmode=verify-full", &[("tls_mode", "disable")]).target().unwrap_err();
        assert_eq!(e[0].0, "database.tls_mode");
        assert!(e[0].1.contains("sslmode=verify-full"), "{e:?}");
        db("postgres://u@h/db?sslmode=require", &[("tls_mode", "require")]).target().expect("same value twice");
        let e = db("postgres://u@h/db?sslmode=verify", &[]).target().unwrap_err();
        assert!(e[0].1.contains("verify-full"), "{e:?}");
        let e = db("postgres://u@h/db", &[("cert_file", "/c")]).target().unwrap_err();
        assert_eq!(e[0].0, "database.key_file");
        let e = db("postgres://u:pw@h/db", &[("password_file", "/p")]).target().unwrap_err();
        assert_eq!(e[0].0, "database.password_file");
        let e = db("postgres://u@h/db?sslrootcert=system&sslmode=require", &[]).target().unwrap_err();
        assert_eq!(e[0].0, "database.tls_mode");
        let e = db("postgres://u@h/db?nope=1", &[]).target().unwrap_err();
        assert_eq!(e[0].0, "database.url");
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(mask_password("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(mask_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(mask_password("postgres://u:s@cr@t@h:5432"), "postgres://u:***@h:5432");
        assert_eq!(mask_password("postgres://u:a/b@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            mask_password("postgresql://u@h/db?password=secret&sslmode=require"),
            "postgresql://u@h/db?password=***&sslmode=require"
        );
        assert_eq!(mask_password("host=h password='se cret' user=u"), "host=h password=*** user=u");
        assert!(!mask_password("host=h password='unterminated").contains("unterminated"));
    }
}
