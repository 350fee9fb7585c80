//! `ingestd`: parses flags, loads the configuration, runs, maps errors to
//! exit codes. Everything else lives in the library.
//!
//! Exit codes: 0 clean shutdown; 64 bad usage or configuration; 69 database
//! refusing ingestd at start-up; 70 internal error; 71 cannot listen; 74 the
//! disk spool cannot be opened; 75 shutdown ended with work not committed to
//! PostgreSQL (deadline passed, second signal, queued events lost, or spool
//! records left for the next start: those are safe on disk).

use std::process::ExitCode;

use ingestd::app::{self, Ended, RunError};
use ingestd::config::{Config, Sources};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay`'s index in mimalloc.h (v2 and v3 alike; the
/// sys crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc give freed memory back to the OS at once instead of after
/// its purge delay (1 s in v3), which only elapses when some thread later
/// frees again: after a burst of large requests into an idle process, RSS
/// stayed at ~840 MiB of freed pages, and went to 66-78 MiB with this set
/// (same throughput within noise). An operator's `MIMALLOC_PURGE_DELAY`
/// still wins.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option before any other thread exists;
        // mimalloc reads options atomically and allows changing this one at
        // run time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

const USAGE: &str = "\
usage: ingestd [--config FILE] [--listen ADDR] [--database-url URL]
               [--set section.key=value]... [--check-config]

  --config FILE        TOML configuration (see tuning/default.toml)
  --listen ADDR        HTTP/WebSocket address (env INGESTD_LISTEN)
  --database-url URL   PostgreSQL URL (env INGESTD_DATABASE_URL)
  --set S.K=V          any other key (env INGESTD_<SECTION>__<KEY>)
  --check-config       print the effective configuration and exit
Flags win over environment variables, which win over the file.";

struct Args {
    sources: Sources,
    check_config: bool,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut sources = Sources::default();
    let mut check_config = false;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") && f != "--set" => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| inline.clone().or_else(|| args.next()).ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--check-config" => check_config = true,
            "--config" => sources.file = Some(value("--config")?),
            "--listen" => sources.flags.push(("server.listen".into(), value("--listen")?)),
            "--database-url" => sources.flags.push(("database.url".into(), value("--database-url")?)),
            "--set" => {
                let kv = value("--set")?;
                let (k, v) = kv.split_once('=').ok_or(format!("--set {kv}: expected section.key=value"))?;
                sources.flags.push((k.trim().to_string(), v.trim().to_string()));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Some(Args { sources, check_config }))
}

fn main() -> ExitCode {
    return_freed_memory_at_once();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ingestd: {e}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let mut sources = args.sources;
    sources.env = Sources::env_overrides(std::env::vars());
    let config = match Config::load(&sources) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ingestd: {e}");
            return ExitCode::from(64);
        }
    };
    if args.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    ingestd::log::init(config.log.level, config.log.format);
    match app::run(config, sources) {
        Ok(Ended::Clean) => ExitCode::SUCCESS,
        Ok(Ended::Incomplete) => ExitCode::from(75),
        Err(e) => {
            ingestd::error!("cannot run", error = e);
            ExitCode::from(match e {
                RunError::Database(_) => 69,
                RunError::Internal(_) => 70,
                RunError::Bind(_) => 71,
                RunError::Spool(_) => 74,
            })
        }
    }
}
