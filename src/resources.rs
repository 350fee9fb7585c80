//! The files the configuration names, loaded: the token table
//! (`auth.token_file` and the inline tokens), the TLS certificate and key,
//! and the database's access (its CA, client certificate and password
//! files, and `PGPASSWORD`: [`crate::writer::connect::Access`]).
//!
//! The configuration itself is plain validated data and reads no file; this
//! is where files are read, once at start-up (`main`, before anything is
//! bound, so that a bad file is exit 64 naming its key, and `--check-config`
//! reports it too) and again on SIGHUP through the same function (a bad file
//! then keeps the running resources and says why). On SIGHUP the token table
//! and the TLS pair are both swapped in (`app::reload`): a renewed
//! certificate needs no restart.

use std::sync::Arc;

use crate::auth::Tokens;
use crate::config::Config;
use crate::writer::connect::Access;

/// What the configuration's files hold.
pub struct Resources {
    pub tokens: Tokens,
    /// The TLS listener's rustls configuration, when `[tls]` is on, and
    /// the SHA-256 fingerprint of its leaf certificate (for the log).
    pub tls: Option<(Arc<rustls::ServerConfig>, String)>,
    /// How to open a database connection: TLS and the password.
    pub database: Access,
}

/// Every file problem, each with the key that names the file.
#[derive(Debug)]
pub struct ResourceError(pub Vec<(String, String)>);

impl std::fmt::Display for ResourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (key, why)) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "config key {key}: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ResourceError {}

impl Resources {
    /// Reads every file `config` names; reports every problem at once.
    pub fn load(config: &Config) -> Result<Resources, ResourceError> {
        let mut problems = Vec::new();
        let tokens = Tokens::load(&config.auth).map_err(|p| problems.extend(p)).ok();
        let tls = if config.tls.enabled() {
            crate::shard::transport::server_config(&config.tls.cert_file, &config.tls.key_file)
                .map_err(|p| problems.push(p))
                .ok()
        } else {
            None
        };
        let database = Access::load(&config.database).map_err(|p| problems.extend(p)).ok();
        match (tokens, database) {
            (Some(tokens), Some(database)) if problems.is_empty() => Ok(Resources { tokens, tls, database }),
            _ => Err(ResourceError(problems)),
        }
    }
}
