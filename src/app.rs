//! Wires the threads together and owns the shutdown order.
//!
//! Start-up, in order: database reachable and table ready (or unreachable:
//! start not ready; refused: exit) → memory budgets and the ring → writer
//! threads → listeners bound (SO_REUSEPORT, one per shard) → shard threads →
//! the database probe → signal handler → the readiness line on stdout.
//! Nothing is announced before it can be served.
//!
//! `run` reads as the three phases: [`start`] → [`serve`] (SIGHUP reloads)
//! → [`stop`].
//!
//! Shutdown cascades through ownership, never through a polled flag:
//! SIGTERM/SIGINT → the one [`Shutdown`] begins → shards stop accepting,
//! finish in-flight requests and drop their ring senders → writers see their
//! ring disconnect, commit what is left and return their reports → the pool
//! closes → the exit code says whether everything accepted was committed. A
//! second signal, or `server.shutdown_timeout_ms` passing, ends the wait.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::breaker::Breaker;
use crate::broadcast::{self, Hub};
use crate::budget::Budget;
use crate::cluster;
use crate::config::{AckMode, Config, Feed, LiveConfig, Sources};
use crate::drain::{DrainReport, Drainer};
use crate::health::{DbStatus, Health};
use crate::metrics::Metrics;
use crate::pipeline::{self, CostModel, RingGauge, RingSender};
use crate::report::Report;
use crate::resources::{ResourceError, Resources};
use crate::shard::{self, ShardSetup};
use crate::shutdown::Shutdown;
use crate::spool::Spool;
use crate::writer::connect::{Access, SharedAccess};
use crate::writer::db::{self, Statements};
use crate::writer::probe::{self, Probe, Verdict};
use crate::writer::recent::RecentIds;
use crate::writer::{Writer, WriterReport};

/// Why ingestd could not run; each maps to an exit code in `main`.
#[derive(Debug)]
pub enum RunError {
    /// PostgreSQL unreachable or the table unusable at start-up (69).
    Database(String),
    /// A listener could not be bound (71).
    Bind(String),
    /// A thread or the signal handler could not start (70).
    Internal(String),
    /// The disk spool could not be opened (74): locked, corrupt, unwritable.
    Spool(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Database(m) => write!(f, "database: {m}"),
            RunError::Bind(m) => write!(f, "listen: {m}"),
            RunError::Internal(m) => write!(f, "internal: {m}"),
            RunError::Spool(m) => write!(f, "spool: {m}"),
        }
    }
}

impl std::error::Error for RunError {}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every accepted event was committed or answered with a retryable error.
    Clean,
    /// The shutdown deadline passed, or queued events could not be committed.
    Incomplete,
}

/// Runs ingestd until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP
/// re-reads `sources` and applies the settings that can change live.
pub fn run(config: Config, resources: Resources, sources: Sources) -> Result<Ended, RunError> {
    let running = start(config, resources)?;
    let signal = serve(&running, &sources);
    Ok(stop(running, signal))
}

/// Everything `start` built that `serve` and `stop` act on.
struct Running {
    live: Arc<LiveConfig>,
    shutdown: Shutdown,
    health: Arc<Health>,
    report: Arc<Report>,
    hub: Arc<Hub>,
    tokens: Arc<arc_swap::ArcSwap<crate::auth::Tokens>>,
    /// The TLS listener's rustls configuration, when `[tls]` is on.
    tls: Option<Arc<shard::TlsConfig>>,
    /// The database's TLS material and password: new connections use
    /// what the last SIGHUP read.
    access: SharedAccess,
    signals: crossbeam_channel::Receiver<i32>,
    threads: Threads,
}

/// The threads, in the order `stop` joins them: shards, then the spool's,
/// then writers, then the broadcaster, the bus and the probe.
struct Threads {
    shards: Vec<JoinHandle<()>>,
    spool: Option<(JoinHandle<crate::spool::AppenderReport>, JoinHandle<DrainReport>)>,
    writers: Vec<JoinHandle<WriterReport>>,
    /// `reader-{n}`, with `[state]` on: they stop when the shards are gone.
    readers: Vec<JoinHandle<()>>,
    broadcaster: JoinHandle<()>,
    /// `cluster-bus`, with `[cluster] feed` on: ends after the broadcaster.
    cluster: Option<JoinHandle<()>>,
    probe: JoinHandle<()>,
    /// Dropped to stop the probe.
    probe_stop: crossbeam_channel::Sender<()>,
}

/// Start-up, in the order of the module docs; nothing is announced before
/// it can be served.
fn start(config: Config, resources: Resources) -> Result<Running, RunError> {
    let live: Arc<LiveConfig> = Arc::new(LiveConfig::from_pointee(config));
    let config = live.load_full();
    let (shards, writers) = (config.shard_count(), config.writer.writers);
    let sql = Arc::new(Statements::new(
        &config.database.table,
        &config.dead_letter_table(),
        config.database.statement_timeout_ms,
        config.state_table().as_deref(),
    ));
    let Resources { tokens, tls: tls_config, database: access } = resources;
    let access: SharedAccess = Arc::new(arc_swap::ArcSwap::from_pointee(access));
    let pool =
        db::pool(&config.database, &access, config.pool_size()).map_err(|e| RunError::Database(e.to_string()))?;
    let database = check_database(&config, &access.load(), &sql)?;
    let table_ready = Arc::new(AtomicBool::new(database == DbStatus::Up));
    let breaker = Breaker::new(config.breaker, Instant::now());
    let shutdown = Shutdown::new();
    let health = Arc::new(Health::new(database, breaker.view(), shutdown.clone()));
    let breaker = Arc::new(parking_lot::Mutex::new(breaker));

    // What requests, and the live feed, may hold in memory (crate::budget).
    let budget = Budget::new("limits.memory_budget_bytes", config.limits.memory_budget_bytes);
    let fanout_budget = Budget::new("websocket.fanout_budget_bytes", config.websocket.fanout_budget_bytes);
    let (ring_sender, receivers, backlog) = pipeline::ring(writers, config.pipeline.ring_capacity);
    let ws = &config.websocket;
    let (hub, publisher, published) =
        Hub::new(shards, ws.max_subscribers, ws.max_per_ip, ws.broadcast_ring, fanout_budget);
    let (inbox_senders, inboxes) = broadcast::inboxes(shards, ws.inbox_batches);
    // The live feed across instances (crate::cluster): its thread takes
    // batches from the broadcaster and gives the shards other instances'.
    let cluster = match config.cluster.feed {
        Feed::Off => None,
        _ => Some(
            cluster::start(&config.cluster, hub.clone(), inbox_senders.clone())
                .map_err(|e| RunError::Internal(e.to_string()))?,
        ),
    };
    let (outlet, cluster_status, cluster_thread) = match cluster {
        Some(c) => (Some(c.outlet), Some(c.status), Some(c.thread)),
        None => (None, None, None),
    };
    let metrics = Arc::new(Metrics::new(shards, writers));
    let report = Arc::new(Report {
        metrics: metrics.clone(),
        health: health.clone(),
        ring: RingGauge::new(&receivers),
        backlog,
        budget: budget.clone(),
        hub: hub.clone(),
        pool: pool.clone(),
        cluster: cluster_status,
    });
    let broadcaster = {
        let hub = hub.clone();
        spawn("broadcaster", move || broadcast::run(hub, published, inbox_senders, outlet))?
    };
    let recent =
        RecentIds::new(Duration::from_millis(config.writer.dedup_window_ms), config.writer.dedup_max_ids).map(Arc::new);
    let mut writer_threads = Vec::with_capacity(writers);
    for (id, ring) in receivers.into_iter().enumerate() {
        let writer = Writer {
            id,
            ring,
            pool: pool.clone(),
            sql: sql.clone(),
            config: live.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
            recent: recent.clone(),
            publisher: publisher.clone(),
            breaker: breaker.clone(),
            table_ready: table_ready.clone(),
            last_commit: std::cell::Cell::new(Duration::ZERO),
            cost: std::cell::Cell::new(CostModel::default()),
        };
        writer_threads.push(spawn(&format!("writer-{id}"), move || writer.run())?);
    }
    // Only writers publish now; their exit is what closes the broadcaster's ring.
    drop(publisher);

    let (spool_sender, spool_threads) = open_spool(&config, &health, &ring_sender, &budget, &shutdown)?;

    let (readers, reader_threads) = start_readers(&config, &access)?;

    let listeners = bind_listeners(config.server.listen_addr(), shards)?;
    let local = listeners[0].local_addr().map_err(|e| RunError::Bind(e.to_string()))?;
    let mut tls_listeners: Vec<_> = Vec::new();
    let mut tls_local = None;
    let tls_config = tls_config.map(|(rustls_config, fingerprint)| {
        crate::info!("TLS certificate loaded", cert_file = config.tls.cert_file, sha256 = fingerprint);
        Arc::new(shard::TlsConfig::new(rustls_config))
    });
    if let Some(tls_config) = &tls_config {
        let bound = bind_listeners(config.tls.listen_addr(), shards)?;
        tls_local = Some(bound[0].local_addr().map_err(|e| RunError::Bind(e.to_string()))?);
        tls_listeners = bound.into_iter().map(|l| Some((l, tls_config.clone()))).collect();
    }
    tls_listeners.resize_with(shards, || None);
    health.tls.store(tls_local.is_some(), Ordering::Relaxed);
    if tokens.mode() == crate::auth::AuthMode::Off {
        crate::warn!(
            "authentication is off (auth.mode = \"off\"): anyone who reaches the listener may ingest and read"
        );
    }
    health.auth_tokens.store(tokens.mode() == crate::auth::AuthMode::Tokens, Ordering::Relaxed);
    let tokens = Arc::new(arc_swap::ArcSwap::from_pointee(tokens));
    let limits = crate::limits::Limits::new();
    let cores = if config.server.pin_cores { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
    let mut shard_threads = Vec::with_capacity(shards);
    for (((id, listener), inbox), tls) in listeners.into_iter().enumerate().zip(inboxes).zip(tls_listeners) {
        let setup = ShardSetup {
            id,
            core: (!cores.is_empty()).then(|| cores[id % cores.len()]),
            listener,
            tls,
            ring: ring_sender.clone(),
            budget: budget.clone(),
            config: live.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            report: report.clone(),
            shutdown: shutdown.clone(),
            hub: hub.clone(),
            inbox,
            spool: spool_sender.clone(),
            tokens: tokens.clone(),
            limits: limits.clone(),
            readers: readers.clone(),
        };
        shard_threads
            .push(shard::spawn(setup).map_err(|e| RunError::Internal(format!("cannot start shard thread: {e}")))?);
    }
    // Only shards (and the spool drainer) hold ring senders now, and only
    // shards hold spool senders: their exit is what closes the ring.
    drop(ring_sender);
    drop(spool_sender);
    drop(readers);

    // The probe keeps /health and the breaker current with no client traffic.
    let (probe_stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let probe = Probe {
        config: live.clone(),
        access: access.clone(),
        sql,
        table_ready,
        breaker,
        metrics,
        health: health.clone(),
        stop: stopped,
    };
    let probe = spawn("db-probe", move || probe.run())?;

    let signals = signal_channel()?;
    announce(&config, local, tls_local);
    let threads = Threads {
        shards: shard_threads,
        spool: spool_threads,
        writers: writer_threads,
        readers: reader_threads,
        broadcaster,
        cluster: cluster_thread,
        probe,
        probe_stop,
    };
    Ok(Running { live, shutdown, health, report, hub, tokens, tls: tls_config, access, signals, threads })
}

/// With `[state]` on: the readers of device state (`crate::read`), on a
/// pool of their own of `state.readers` connections, so that a read never
/// takes a writer's connection.
fn start_readers(
    config: &Config,
    access: &SharedAccess,
) -> Result<(Option<crate::read::Readers>, Vec<JoinHandle<()>>), RunError> {
    let Some(table) = config.state_table() else { return Ok((None, Vec::new())) };
    let n = config.state.readers;
    let pool = db::pool(&config.database, access, n as u32).map_err(|e| RunError::Database(e.to_string()))?;
    let (readers, threads) = crate::read::start(n, pool, &table)
        .map_err(|e| RunError::Internal(format!("cannot start reader thread: {e}")))?;
    Ok((Some(readers), threads))
}

/// A database that refuses us (credentials, TLS, pg_hba.conf, a missing
/// table with create_table = false) stops start-up: that is configuration.
/// One that is unreachable does not: ingestd starts not ready, answers 503,
/// and the probe makes the table when it first gets through.
fn check_database(config: &Config, access: &Access, sql: &Statements) -> Result<DbStatus, RunError> {
    match probe::check(access, &config.database, sql, config.database.create_table) {
        Verdict::Up => Ok(DbStatus::Up),
        Verdict::Unreachable(why) => {
            crate::warn!("database unreachable at start-up; starting not ready", error = why);
            Ok(DbStatus::Unreachable)
        }
        Verdict::Refused(why) => Err(RunError::Database(format!(
            "PostgreSQL refused ingestd (check database.url, the database.tls_mode / ca_file / cert_file / \
             key_file / password_file keys, database.table and create_table): {why}"
        ))),
    }
}

type SpoolThreads = (JoinHandle<crate::spool::AppenderReport>, JoinHandle<DrainReport>);

/// `ack = "spool"`: the spool takes the shards' appends (one group-commit
/// thread) and a drainer feeds its records to the writers.
fn open_spool(
    config: &Config,
    health: &Health,
    ring: &RingSender,
    budget: &Budget,
    shutdown: &Shutdown,
) -> Result<(Option<crate::spool::SpoolSender>, Option<SpoolThreads>), RunError> {
    if config.ingest.ack != AckMode::Spool {
        return Ok((None, None));
    }
    let (spool, appender, recovery) = Spool::open(config.spool.clone())
        .map_err(|e| RunError::Spool(format!("{}: {e}", config.spool.dir.display())))?;
    if let Some(cut) = &recovery.tail_cut {
        crate::warn!(
            "spool: torn tail cut at start-up",
            path = cut.path.display(),
            offset = cut.offset,
            bytes = cut.bytes_cut,
            intact_records_after = cut.intact_after
        );
    }
    crate::info!(
        "spool opened",
        dir = config.spool.dir.display(),
        committed_seq = recovery.committed_seq,
        next_seq = recovery.next_seq,
        to_replay = recovery.next_seq.saturating_sub(recovery.committed_seq + 1)
    );
    let _ = health.spool.set(spool.clone());
    let (sender, appender) =
        appender.spawn().map_err(|e| RunError::Internal(format!("cannot start spool appender: {e}")))?;
    let drainer = Drainer {
        spool,
        ring: ring.clone(),
        budget: budget.clone(),
        max_in_flight: (config.pipeline.ring_capacity * config.writer.writers).max(1),
        shutdown: shutdown.clone(),
    };
    let drain = spawn("spool-drain", move || drainer.run())?;
    Ok((Some(sender), Some((appender, drain))))
}

/// The readiness line (stdout) and the start-up log line.
fn announce(config: &Config, local: SocketAddr, tls_local: Option<SocketAddr>) {
    crate::info!(
        "ingestd ready",
        listen = local,
        shards = config.shard_count(),
        writers = config.writer.writers,
        ack = format!("{:?}", config.ingest.ack).to_lowercase(),
        table = config.database.table
    );
    let mut stdout = std::io::stdout().lock();
    if let Some(tls_local) = tls_local {
        let _ = writeln!(stdout, "ingestd listening on https://{tls_local}");
    }
    let _ = writeln!(stdout, "ingestd listening on http://{local}");
    let _ = stdout.flush();
}

/// Serves until SIGTERM or SIGINT (returned); applies SIGHUPs meanwhile.
fn serve(running: &Running, sources: &Sources) -> i32 {
    loop {
        match running.signals.recv() {
            Ok(signal_hook::consts::SIGHUP) => reload(running, sources),
            Ok(signal) => return signal,
            Err(_) => return signal_hook::consts::SIGTERM,
        }
    }
}

/// The shutdown cascade: begin (shards stop accepting), then join every
/// thread in order on a helper thread, so that the deadline or a second
/// signal can still end the wait.
fn stop(running: Running, signal: i32) -> Ended {
    let Running { live, shutdown, report, signals, threads, .. } = running;
    let timeout = live.load().server.shutdown_timeout();
    let started = shutdown.begin(timeout);
    crate::info!("shutdown started", signal = signal, timeout_ms = timeout.as_millis());
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let joiner = spawn("joiner", move || {
        let _ = done_tx.send(join(threads));
    });
    if joiner.is_err() {
        return Ended::Incomplete;
    }
    let until = started + timeout;
    loop {
        crossbeam_channel::select! {
            recv(done_rx) -> joined => return match joined {
                Ok((report, left_in_spool)) => {
                    crate::info!(
                        "shutdown complete",
                        acknowledged = report.committed,
                        not_committed = report.uncommitted,
                        lost = report.lost,
                        spool_records_left = left_in_spool,
                        elapsed_ms = started.elapsed().as_millis()
                    );
                    if report.lost == 0 && left_in_spool == 0 { Ended::Clean } else { Ended::Incomplete }
                }
                Err(_) => Ended::Incomplete,
            },
            recv(signals) -> signal => {
                if signal == Ok(signal_hook::consts::SIGHUP) {
                    continue;
                }
                crate::warn!("second signal: exiting before shutdown finished");
                return Ended::Incomplete;
            },
            recv(crossbeam_channel::at(until)) -> _ => {
                crate::error!(
                    "shutdown deadline passed with work in flight",
                    timeout_ms = timeout.as_millis(),
                    ring_depth = report.ring.depth()
                );
                return Ended::Incomplete;
            },
        }
    }
}

/// Joins the threads in the shutdown order; what the writers and the spool
/// report.
fn join(threads: Threads) -> (WriterReport, u64) {
    let Threads { shards, spool, writers, readers, broadcaster, cluster, probe, probe_stop } = threads;
    drop(probe_stop);
    for t in shards {
        let _ = t.join();
    }
    // Shards held the readers' queue: the readers finish and return.
    for t in readers {
        let _ = t.join();
    }
    // Shards are gone: the appender stops, the drainer catches up (or runs
    // out of time) and drops its ring senders.
    let mut left_in_spool = 0;
    if let Some((appender, drain)) = spool {
        if let Ok(report) = drain.join() {
            left_in_spool = report.left();
            crate::info!(
                "spool drained",
                committed_seq = report.committed_seq,
                durable_seq = report.durable_seq,
                left_for_next_start = report.left()
            );
        }
        let _ = appender.join();
    }
    let mut total = WriterReport::default();
    for t in writers {
        if let Ok(r) = t.join() {
            total.committed += r.committed;
            total.uncommitted += r.uncommitted;
            total.lost += r.lost;
        }
    }
    // Writers are gone, so the broadcaster's ring has closed; its end closes
    // the bus's queue (what is queued goes out within publish_timeout_ms).
    let _ = broadcaster.join();
    if let Some(cluster) = cluster {
        let _ = cluster.join();
    }
    let _ = probe.join();
    (total, left_in_spool)
}

/// Starts a named thread.
fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<JoinHandle<T>, RunError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| RunError::Internal(format!("cannot start {name} thread: {e}")))
}

/// One listener per shard on the same address with SO_REUSEPORT; with port
/// 0 the first one picks the port and the others join it.
fn bind_listeners(
    addr: Result<SocketAddr, std::net::AddrParseError>,
    shards: usize,
) -> Result<Vec<std::net::TcpListener>, RunError> {
    let mut addr = addr.map_err(|e| RunError::Bind(e.to_string()))?;
    let mut out = Vec::with_capacity(shards);
    for _ in 0..shards {
        let listener = bind_one(addr).map_err(|e| RunError::Bind(format!("{addr}: {e}")))?;
        if addr.port() == 0 {
            addr = listener.local_addr().map_err(|e| RunError::Bind(e.to_string()))?;
        }
        out.push(listener);
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Re-reads the configuration's sources (and the token file); applies live
/// keys, keeps the rest (naming them), and keeps everything when the new
/// configuration is bad.
fn reload(running: &Running, sources: &Sources) {
    let Running { live, tokens, tls, access, health, report: observed, hub, .. } = running;
    let mut sources = sources.clone();
    sources.env = Sources::env_overrides(std::env::vars());
    match Config::load(&sources).and_then(|new| live.load().reloaded(&new)) {
        Err(e) => crate::error!("SIGHUP: reload refused, the running configuration stays", error = e),
        Ok((merged, report)) => {
            crate::log::init(merged.log.level, merged.log.format);
            // The files are read through the same function as at start-up.
            match Resources::load(&merged) {
                Ok(Resources { tokens: table, tls: pair, database }) => {
                    crate::info!("SIGHUP: tokens loaded", mode = table.mode().as_str(), tokens = table.len());
                    health.auth_tokens.store(table.mode() == crate::auth::AuthMode::Tokens, Ordering::Relaxed);
                    tokens.store(Arc::new(table));
                    // New handshakes take the re-read pair; open connections
                    // keep the configuration they started with.
                    if let (Some(running), Some((config, fingerprint))) = (tls, pair) {
                        running.store(config);
                        crate::info!(
                            "SIGHUP: TLS certificate loaded",
                            cert_file = merged.tls.cert_file,
                            sha256 = fingerprint
                        );
                    }
                    // Database connections already open keep their session;
                    // new ones use the files as they are now.
                    access.store(Arc::new(database));
                }
                Err(ResourceError(problems)) => {
                    for (key, why) in problems {
                        crate::error!(
                            "SIGHUP: reload refused, the running configuration stays",
                            key = key,
                            error = why
                        );
                    }
                    return;
                }
            }
            observed.budget.set_limit(merged.limits.memory_budget_bytes);
            hub.budget.set_limit(merged.websocket.fanout_budget_bytes);
            live.store(Arc::new(merged));
            for key in &report.need_restart {
                crate::warn!("SIGHUP: changed, but needs a restart to take effect", key = key);
            }
            crate::info!(
                "SIGHUP: configuration reloaded",
                applied = if report.applied.is_empty() { "none".to_string() } else { report.applied.join(",") },
                needs_restart =
                    if report.need_restart.is_empty() { "none".to_string() } else { report.need_restart.join(",") }
            );
        }
    }
}

/// SIGTERM and SIGINT (and SIGHUP) as a channel: the first of SIGTERM or
/// SIGINT starts a graceful shutdown, the second cuts it short.
fn signal_channel() -> Result<crossbeam_channel::Receiver<i32>, RunError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| RunError::Internal(format!("cannot install signal handlers: {e}")))?;
    let (tx, rx) = crossbeam_channel::bounded(4);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if tx.send(signal).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| RunError::Internal(format!("cannot start signal thread: {e}")))?;
    Ok(rx)
}
