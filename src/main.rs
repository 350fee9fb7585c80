//! `ingestd`: parses flags, loads the configuration, runs, maps errors to
//! exit codes. Everything else lives in the library.
//!
//! Exit codes: 0 clean shutdown; 64 bad usage or configuration; 69 database
//! refusing ingestd at start-up; 70 internal error; 71 cannot listen; 74 the
//! disk spool cannot be opened; 75 shutdown ended with work not committed to
//! PostgreSQL (deadline passed, second signal, queued events lost, or spool
//! records left for the next start: those are safe on disk).
//! `ingestd dead-letter …` (see `ingestd::deadletter`) adds 65: a replay
//! left dead letters that are still refused; its 69 also covers a database
//! that is unreachable.

use std::process::ExitCode;

use ingestd::app::{self, Ended, RunError};
use ingestd::config::{Config, Sources};
use ingestd::resources::Resources;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often freed memory is handed back to the OS.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Hands memory that mimalloc keeps after frees back to the OS once a second.
///
/// mimalloc (v3) returns freed pages only after a purge delay, and only when
/// some thread frees again later: after a burst of large requests into a
/// process that then went idle, RSS stayed at ~840 MiB of freed pages. A
/// purge delay of 0 fixes that but makes every large free return its pages
/// and the next allocation fault them in again (clear_page: 3 % → 7 % of
/// ingestd's CPU under the benchmark). A collection once a second on a
/// thread of its own costs nothing measurable and brings RSS back within
/// about a second (measured in `tests/it/stall.rs`). The thread is detached:
/// it holds nothing and ends with the process.
#[allow(unsafe_code)]
fn spawn_memory_purger() {
    let spawned = std::thread::Builder::new().name("mem-purge".into()).spawn(|| {
        // mi_collect works through the calling thread's heap, which exists
        // only once the thread has allocated.
        let warm = std::hint::black_box(Box::new(0u64));
        drop(warm);
        loop {
            std::thread::sleep(PURGE_EVERY);
            // SAFETY: mi_collect takes no pointers; it may be called from any
            // thread at any time.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
    });
    if let Err(e) = spawned {
        ingestd::warn!("cannot start the memory purger; freed memory returns to the OS later", error = e);
    }
}

const USAGE: &str = "\
usage: ingestd [--config FILE] [--listen ADDR] [--database-url URL]
               [--set section.key=value]... [--check-config]
       ingestd [--config FILE] [--database-url URL] [--set S.K=V]...
               dead-letter list|replay|purge [...]   (ingestd dead-letter --help)

  --config FILE        TOML configuration (see tuning/default.toml)
  --listen ADDR        HTTP/WebSocket address (env INGESTD_LISTEN)
  --database-url URL   PostgreSQL URL (env INGESTD_DATABASE_URL)
  --set S.K=V          any other key (env INGESTD_<SECTION>__<KEY>)
  --check-config       print the effective configuration and exit
Flags win over environment variables, which win over the file.";

struct Args {
    sources: Sources,
    check_config: bool,
    /// `dead-letter …`: the words after it that are not global flags.
    dead_letter: Option<Vec<String>>,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut sources = Sources::default();
    let mut check_config = false;
    let mut dead_letter: Option<Vec<String>> = None;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        if dead_letter.is_none() && arg == "dead-letter" {
            dead_letter = Some(Vec::new());
            continue;
        }
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
            _ if dead_letter.is_some() => {
                if let Some(words) = dead_letter.as_mut() {
                    words.push(arg);
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if dead_letter.is_some() && check_config {
        return Err("--check-config and dead-letter do not go together".into());
    }
    Ok(Some(Args { sources, check_config, dead_letter }))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}\n\n{}", ingestd::deadletter::USAGE);
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
    // The files the configuration names (tokens, TLS certificate) are read
    // before anything is bound; a bad one is a configuration error too.
    let resources = match Resources::load(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ingestd: {e}");
            return ExitCode::from(64);
        }
    };
    if args.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if let Some(words) = &args.dead_letter {
        let command = match ingestd::deadletter::parse_args(words, std::time::SystemTime::now()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ingestd: {e}\n{}", ingestd::deadletter::USAGE);
                return ExitCode::from(64);
            }
        };
        let ran = ingestd::deadletter::run(&command, &config, &resources.database);
        return ExitCode::from(ingestd::deadletter::print(&ran));
    }
    ingestd::log::init(config.log.level, config.log.format);
    spawn_memory_purger();
    match app::run(config, resources, sources) {
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
