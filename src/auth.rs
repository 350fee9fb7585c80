//! Who may do what: bearer tokens with scopes and an optional device prefix.
//!
//! Tokens come from `[auth]` in the configuration and, optionally, from a
//! token file that SIGHUP re-reads. A request names its token in
//! `Authorization: Bearer <token>` (on `GET /ws` also `?access_token=`, since
//! browsers cannot set headers on a WebSocket). The table is keyed by the
//! SHA-256 digest of each token, never the token itself: a lookup by digest
//! takes the same time whatever prefix of a real token a guess shares, and a
//! final constant-time comparison of the digests settles the match. Tokens
//! are never logged, printed by `--check-config`, or kept in request heads
//! in a form that `Debug` shows.
//!
//! Authentication is off only when the configuration says so: `auth.mode`
//! defaults to `off` (the HTTP contract itself carries no credentials) only
//! while every listener is on loopback; a listener any other host can reach
//! needs `auth.mode` written explicitly, `tokens` or `off`. `/health` says
//! which mode runs and start-up logs a warning when it is off.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::limits::Rate;

pub use crate::config::{AuthConfig, AuthMode, Scope, TokenConfig};

/// A token presented by a client, kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(bytes: &[u8]) -> Secret {
        Secret(bytes.into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What a known token grants, shared by every request that presents it.
#[derive(Debug)]
pub struct Grant {
    pub name: Box<str>,
    scopes: u8,
    pub device_prefix: Box<str>,
    /// `limits.token_requests_per_s` state for this token (all shards).
    pub rate: Rate,
    digest: [u8; 32],
}

impl Grant {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }

    /// Whether this token may write or read events of `device_id`.
    pub fn owns_device(&self, device_id: &[u8]) -> bool {
        device_id.starts_with(self.device_prefix.as_bytes())
    }

    /// "token `name`" for error messages.
    pub fn label(&self) -> String {
        if self.name.is_empty() { "this token".to_string() } else { format!("token `{}`", self.name) }
    }
}

/// Why a request is not authenticated: each is a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` (or `access_token`) at all.
    Missing,
    /// A token that is not in the table.
    Unknown,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denied::Missing => "authentication required: send `Authorization: Bearer <token>`",
            Denied::Unknown => "the bearer token is not valid",
        })
    }
}

/// The token table in force; swapped whole on SIGHUP.
#[derive(Debug, Default)]
pub struct Tokens {
    mode: AuthMode,
    by_digest: HashMap<[u8; 32], Arc<Grant>>,
}

/// The token file's shape: `[[tokens]]` entries.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

impl Tokens {
    /// Builds the table from `[auth]`, reading the token file. Every problem
    /// is reported with the key (or file) it concerns; secrets never appear.
    pub fn load(config: &AuthConfig) -> Result<Tokens, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut entries: Vec<(String, TokenConfig)> =
            config.tokens.iter().enumerate().map(|(i, t)| (format!("auth.tokens[{i}]"), t.clone())).collect();
        if !config.token_file.is_empty() {
            match std::fs::read_to_string(&config.token_file) {
                Err(e) => {
                    problems.push(("auth.token_file".to_string(), format!("cannot read {}: {e}", config.token_file)))
                }
                Ok(text) => match toml::from_str::<TokenFile>(&text) {
                    Err(e) => problems.push((
                        "auth.token_file".to_string(),
                        format!("{} is not a valid token file: {}", config.token_file, e.message()),
                    )),
                    Ok(file) => entries.extend(
                        file.tokens
                            .into_iter()
                            .enumerate()
                            .map(|(i, t)| (format!("auth.token_file {} tokens[{i}]", config.token_file), t)),
                    ),
                },
            }
        }
        let mut by_digest = HashMap::with_capacity(entries.len());
        for (key, t) in entries {
            let visible = t.token.bytes().all(|b| b.is_ascii_graphic());
            if !(16..=512).contains(&t.token.len()) || !visible {
                problems.push((key.clone(), "token must be 16 to 512 bytes of visible ASCII, no spaces".into()));
                continue;
            }
            if t.scopes.is_empty() {
                problems.push((key.clone(), "scopes must name at least one of ingest, subscribe, read, admin".into()));
            }
            let digest: [u8; 32] = Sha256::digest(t.token.as_bytes()).into();
            let grant = Grant {
                name: t.name.as_str().into(),
                scopes: t.scopes.iter().fold(0, |bits, s| bits | s.bit()),
                device_prefix: t.device_prefix.as_str().into(),
                rate: Rate::default(),
                digest,
            };
            if by_digest.insert(digest, Arc::new(grant)).is_some() {
                problems.push((key, "the same token is listed twice".into()));
            }
        }
        if config.mode == AuthMode::Tokens && by_digest.is_empty() && problems.is_empty() {
            problems.push((
                "auth.tokens".to_string(),
                "auth.mode = \"tokens\" needs at least one token (inline or in auth.token_file)".into(),
            ));
        }
        if problems.is_empty() { Ok(Tokens { mode: config.mode, by_digest }) } else { Err(problems) }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Who presented `token`. `Ok(None)` when authentication is off.
    pub fn authenticate(&self, token: Option<&Secret>) -> Result<Option<Arc<Grant>>, Denied> {
        if self.mode == AuthMode::Off {
            return Ok(None);
        }
        let token = token.ok_or(Denied::Missing)?;
        let digest: [u8; 32] = Sha256::digest(&token.0).into();
        match self.by_digest.get(&digest) {
            Some(grant) if constant_time_eq(&grant.digest, &digest) => Ok(Some(grant.clone())),
            _ => Err(Denied::Unknown),
        }
    }
}

/// Compares without an early exit, so the time does not depend on where the
/// first difference is.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token in an `Authorization` header value: `Bearer <token>`, the
/// scheme case-insensitive. `None` for any other scheme or an empty token.
pub fn bearer(value: &[u8]) -> Option<Secret> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then(|| Secret::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str, scopes: &[Scope], prefix: &str) -> TokenConfig {
        TokenConfig { token: secret.into(), scopes: scopes.to_vec(), device_prefix: prefix.into(), name: "t".into() }
    }

    fn config(tokens: Vec<TokenConfig>) -> AuthConfig {
        AuthConfig { mode: AuthMode::Tokens, token_file: String::new(), tokens, mode_given: true }
    }

    #[test]
    fn off_lets_everyone_in() {
        let t = Tokens::load(&AuthConfig::default()).unwrap();
        assert_eq!(t.authenticate(None).unwrap().map(|g| g.name.clone()), None);
    }

    #[test]
    fn tokens_are_checked_with_their_scopes_and_prefix() {
        let t = Tokens::load(&config(vec![token("0123456789abcdef", &[Scope::Ingest], "fleet-a/")])).unwrap();
        assert_eq!(t.authenticate(None).unwrap_err(), Denied::Missing);
        assert_eq!(t.authenticate(Some(&Secret::new(b"0123456789abcdeX"))).unwrap_err(), Denied::Unknown);
        let g = t.authenticate(Some(&Secret::new(b"0123456789abcdef"))).unwrap().unwrap();
        assert!(g.allows(Scope::Ingest) && !g.allows(Scope::Admin) && !g.allows(Scope::Subscribe));
        assert!(g.owns_device(b"fleet-a/7") && !g.owns_device(b"fleet-b/7"));
    }

    #[test]
    fn bad_tables_are_refused_without_showing_secrets() {
        let problems = Tokens::load(&config(vec![])).unwrap_err();
        assert_eq!(problems[0].0, "auth.tokens");
        let problems = Tokens::load(&config(vec![token("short", &[Scope::Admin], "")])).unwrap_err();
        assert_eq!(problems[0].0, "auth.tokens[0]");
        assert!(!format!("{problems:?}").contains("short"));
        let dup = token("0123456789abcdef", &[Scope::Admin], "");
        assert!(Tokens::load(&config(vec![dup.clone(), dup])).is_err());
        assert!(Tokens::load(&config(vec![token("0123456789abcdef", &[], "")])).is_err());
        assert!(!format!("{:?}", token("0123456789abcdef", &[], "")).contains("0123"));
    }

    #[test]
    fn token_file_adds_tokens_and_a_bad_one_is_named() {
        let dir = std::env::temp_dir().join(format!("ingestd-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.toml");
        std::fs::write(&path, "[[tokens]]\ntoken = \"fedcba9876543210\"\nscopes = [\"admin\"]\n").unwrap();
        let mut c = config(vec![]);
        c.token_file = path.display().to_string();
        let t = Tokens::load(&c).unwrap();
        assert!(t.authenticate(Some(&Secret::new(b"fedcba9876543210"))).unwrap().unwrap().allows(Scope::Admin));
        std::fs::write(&path, "[[tokens]]\ntoken = 1\n").unwrap();
        assert_eq!(Tokens::load(&c).unwrap_err()[0].0, "auth.token_file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bearer_header_values() {
        assert_eq!(bearer(b"Bearer abc"), Some(Secret::new(b"abc")));
        assert_eq!(bearer(b"bearer   abc "), Some(Secret::new(b"abc")));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bear"), None);
    }
}
