//! Shards: one pinned thread per core, each with its own io_uring runtime
//! (monoio), its own SO_REUSEPORT listener and every connection it accepts.
//!
//! A shard shares nothing mutable with other shards. What its connections
//! share lives in one `Rc<ShardCtx>`: the parser and its buffers, the senders
//! to the writers' ring, the shard's own counters. Nothing here blocks: ring
//! hand-offs are `try_send`, and commit reports arrive through oneshots that
//! wake the runtime from the writer thread.
//!
//! Shutdown: when the shard's shutdown oneshot fires (or its sender is
//! dropped), the accept loop stops and closes the listener; connections idle
//! between requests close at once, busy ones finish their request and answer
//! with `Connection: close`. When the last connection's gate pass drops,
//! the shard drops its ring senders (which is how writers learn that no more
//! work will come) and its thread returns.
//!
//! - [`http`]: request heads, chunked bodies, gzip, responses (pure).
//! - [`conn`]: one connection's read/answer loop with deadlines.
//! - [`routes`]: who may make a request, what each route answers.
//! - [`devices`]: `GET /devices…`, the latest state of devices, read by the
//!   readers ([`crate::read`]) and awaited like a commit report.
//! - [`accept`]: one body of events from admission to answer (HTTP and
//!   WebSocket ingest alike).
//! - [`ws`]: WebSocket sessions: subscriptions, fan-out, ingest frames.
//! - [`rooms`]: what a subscriber selects, control frames, the shard's index.
//! - [`snapshot`]: a room's current state before its live events, and the
//!   hand-over between them.
//! - [`io`]: reads with deadlines and explicit cancellation.
//! - [`transport`]: plain TCP or TLS (rustls, sans-I/O) under both.

pub mod accept;
pub mod conn;
pub mod devices;
pub mod http;
pub mod io;
pub mod rooms;
pub mod routes;
pub mod snapshot;
pub mod transport;
pub mod ws;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use futures_channel::oneshot;
use monoio::io::Canceller;

use crate::broadcast::{Hub, Inbox};
use crate::budget::Budget;
use crate::config::LiveConfig;
use crate::health::Health;
use crate::ingest::Parser;
use crate::metrics::{Metrics, ShardStats};
use crate::pipeline::RingSender;
use crate::report::Report;
use crate::shutdown::{Shutdown, ShutdownSignal};

/// Everything a shard thread starts with.
pub struct ShardSetup {
    pub id: usize,
    pub core: Option<core_affinity::CoreId>,
    /// Bound with SO_REUSEPORT before the thread starts, so bind errors and
    /// the real port are known before ingestd reports ready.
    pub listener: std::net::TcpListener,
    /// The `[tls]` listener, bound the same way, and its rustls config in
    /// force (SIGHUP swaps it when the certificate is renewed).
    pub tls: Option<(std::net::TcpListener, Arc<TlsConfig>)>,
    pub ring: RingSender,
    /// What requests may hold in memory (`limits.memory_budget_bytes`).
    pub budget: Budget,
    pub config: Arc<LiveConfig>,
    pub metrics: Arc<Metrics>,
    /// Readiness: the breaker's view (admission), the database, `/health`.
    pub health: Arc<Health>,
    /// What `/health`, `/stats` and `/metrics` render.
    pub report: Arc<Report>,
    pub shutdown: Shutdown,
    pub hub: Arc<Hub>,
    /// Committed batches for this shard's subscribers.
    pub inbox: Inbox,
    /// With `ack = "spool"`: where requests' rows go instead of the ring.
    pub spool: Option<crate::spool::SpoolSender>,
    /// The token table in force (SIGHUP swaps it).
    pub tokens: Arc<arc_swap::ArcSwap<crate::auth::Tokens>>,
    /// Per-IP connection counts and rates, shared by every shard.
    pub limits: Arc<crate::limits::Limits>,
    /// The readers of device state, with `[state]` on.
    pub readers: Option<crate::read::Readers>,
}

/// The TLS listener's rustls configuration in force. Each handshake takes
/// the one current when its connection is accepted (a lock-free load);
/// SIGHUP stores a new one when `tls.cert_file`/`key_file` load, and a
/// connection keeps the configuration it started with.
pub type TlsConfig = arc_swap::ArcSwap<rustls::ServerConfig>;

/// What a shard's connections share; lives and dies on the shard thread.
pub struct ShardCtx {
    pub id: usize,
    /// The running configuration; SIGHUP may replace its live settings.
    live: Arc<LiveConfig>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub report: Arc<Report>,
    pub parser: RefCell<Parser>,
    pub ring: RingSender,
    /// What requests may hold in memory, shared by every shard and writer.
    pub budget: Budget,
    /// Resolves when shutdown begins.
    pub shutdown: ShutdownSignal,
    /// The shutdown itself (has it begun?).
    stop: Shutdown,
    pub hub: Arc<Hub>,
    /// The WebSocket subscribers this shard owns.
    pub ws: ws::Subscribers,
    /// With `ack = "spool"`; dropped with the context, which is how the
    /// spool's appender learns that no more appends will come.
    pub spool: Option<crate::spool::SpoolSender>,
    /// The token table in force (SIGHUP swaps it).
    pub tokens: Arc<arc_swap::ArcSwap<crate::auth::Tokens>>,
    /// Per-IP connection counts and rates, shared by every shard.
    pub limits: Arc<crate::limits::Limits>,
    /// The readers of device state, with `[state]` on; dropped with the
    /// context, which is how the readers learn that no more reads will come.
    pub readers: Option<crate::read::Readers>,
    /// Makes request ids: UUIDv7 from this shard's own context (no lock).
    request_ids: uuid::timestamp::context::ContextV7,
}

impl ShardCtx {
    /// A new request id, for a request that did not bring an `X-Request-Id`:
    /// a UUIDv7 (time-ordered, unique across shards and instances without
    /// any coordination; made from this shard's context, so no lock and no
    /// syscall beyond reading the clock).
    pub fn new_request_id(&self) -> String {
        uuid::Uuid::new_v7(uuid::Timestamp::now(&self.request_ids)).hyphenated().to_string()
    }

    pub fn stats(&self) -> &ShardStats {
        &self.metrics.shards[self.id]
    }

    /// The configuration now: a lock-free load. Read what you need and let
    /// the guard go; don't hold it across an `.await`.
    pub fn config(&self) -> crate::config::ConfigGuard {
        self.live.load()
    }

    /// WebSocket limits now.
    pub fn ws_limits(&self) -> ws::WsLimits {
        ws::WsLimits::from_config(&self.config().websocket)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.stop.has_begun()
    }
}

/// Starts a shard thread named `shard-{id}`.
pub fn spawn(setup: ShardSetup) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("shard-{}", setup.id)).spawn(move || {
        if let Some(core) = setup.core
            && !core_affinity::set_for_current(core)
        {
            crate::warn!("could not pin shard to its core", shard = setup.id, core = core.id);
        }
        let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().with_entries(1024).build();
        match runtime {
            Ok(mut rt) => rt.block_on(run(setup)),
            Err(e) => crate::error!("cannot start shard runtime", shard = setup.id, error = e),
        }
    })
}

async fn run(setup: ShardSetup) {
    let id = setup.id;
    let listen = |l: std::net::TcpListener| {
        monoio::net::TcpListener::from_std(l).map_err(|e| crate::error!("cannot use listener", shard = id, error = e))
    };
    let Ok(listener) = listen(setup.listener) else { return };
    let tls = match setup.tls {
        Some((l, config)) => match listen(l) {
            Ok(l) => Some((l, config)),
            Err(()) => return,
        },
        None => None,
    };
    let config = setup.config.load();
    let rules = crate::ingest::Rules::from_config(&config.ingest);
    drop(config);
    let ctx = Rc::new(ShardCtx {
        id,
        parser: RefCell::new(Parser::new(rules)),
        ring: setup.ring,
        budget: setup.budget,
        shutdown: setup.shutdown.signal(),
        stop: setup.shutdown,
        hub: setup.hub,
        ws: ws::Subscribers::default(),
        spool: setup.spool,
        tokens: setup.tokens,
        limits: setup.limits,
        readers: setup.readers,
        live: setup.config,
        metrics: setup.metrics,
        health: setup.health,
        report: setup.report,
        request_ids: uuid::timestamp::context::ContextV7::new(),
    });
    let fan_out = monoio::spawn(ws::fan_out_task(ctx.clone(), setup.inbox));
    let lag_probe = monoio::spawn(lag_probe(ctx.clone()));
    let gate = Rc::new(Gate::default());
    let tls_accept = tls.map(|(l, config)| monoio::spawn(accept_loop(l, Some(config), ctx.clone(), gate.clone())));
    accept_loop(listener, None, ctx.clone(), gate.clone()).await;
    if let Some(task) = tls_accept {
        task.await;
    }
    gate.closed().await;
    fan_out.await;
    lag_probe.await;
    crate::debug!("shard finished", shard = id);
    // `ctx` drops here: the ring senders go, and writers can drain and stop.
}

/// Accepts connections on one listener until shutdown, then closes it.
/// With `tls`, each connection speaks TLS.
async fn accept_loop(
    listener: monoio::net::TcpListener,
    tls: Option<Arc<TlsConfig>>,
    ctx: Rc<ShardCtx>,
    gate: Rc<Gate>,
) {
    let shards = ctx.config().shard_count();
    loop {
        let canceller = Canceller::new();
        let mut accept = std::pin::pin!(listener.cancelable_accept(canceller.handle()));
        let shutdown = ctx.shutdown.clone();
        let accepted = monoio::select! {
            r = &mut accept => Some(r),
            _ = shutdown => None,
        };
        let accepted = match accepted {
            Some(r) => r,
            None => {
                canceller.cancel();
                // A connection that raced the cancellation is still served.
                accept.await
            }
        };
        let stop = ctx.shutdown.peek().is_some();
        match accepted {
            Ok((stream, peer)) => {
                let stats = ctx.stats();
                stats.connections_accepted.inc();
                let (max_connections, max_per_ip) = {
                    let c = ctx.config();
                    (c.server.max_connections.div_ceil(shards), c.limits.max_connections_per_ip)
                };
                if gate.open.get() >= max_connections {
                    stats.connections_refused.inc();
                    drop(stream);
                } else {
                    let _ = stream.set_nodelay(true);
                    let pass = gate.pass(ctx.clone());
                    let ip = ctx.limits.connect(peer.ip(), max_per_ip);
                    let transport = match &tls {
                        None => Ok(transport::Transport::Plain(stream)),
                        Some(config) => transport::Transport::tls(stream, &config.load_full()),
                    };
                    let ctx = ctx.clone();
                    monoio::spawn(async move {
                        match (transport, ip) {
                            (Ok(t), Ok(ip)) => conn::Conn::new(t, ip, ctx).run().await,
                            (Ok(t), Err(_)) => {
                                ctx.stats().connections_refused.inc();
                                conn::refuse_per_ip(t, &ctx).await;
                            }
                            (Err(e), _) => crate::warn!("cannot start a TLS session", error = e),
                        }
                        drop(pass);
                    });
                }
            }
            Err(e) if !stop => {
                // EMFILE and friends: back off briefly instead of spinning.
                crate::warn!("accept failed", shard = ctx.id, error = e);
                monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(_) => {}
        }
        if stop {
            break;
        }
    }
}

/// Measures event-loop lag: how late a 100 ms timer fires. Ends at shutdown.
async fn lag_probe(ctx: Rc<ShardCtx>) {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(100);
    loop {
        let asked = std::time::Instant::now();
        let shutdown = ctx.shutdown.clone();
        let stop = monoio::select! {
            _ = monoio::time::sleep(EVERY) => false,
            _ = shutdown => true,
        };
        if stop {
            return;
        }
        let late = asked.elapsed().saturating_sub(EVERY);
        let stats = ctx.stats();
        stats.loop_lag_us.record_duration(late);
        stats.loop_lag_last_us.store(late.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts a shard's open connections; [`Gate::closed`] resolves when the last
/// one has finished.
#[derive(Default)]
struct Gate {
    open: Cell<usize>,
    waiter: RefCell<Option<oneshot::Sender<()>>>,
}

/// Held by a connection task for its whole life.
struct GatePass {
    gate: Rc<Gate>,
    ctx: Rc<ShardCtx>,
}

impl Gate {
    fn pass(self: &Rc<Self>, ctx: Rc<ShardCtx>) -> GatePass {
        self.open.set(self.open.get() + 1);
        ctx.stats().connections_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        GatePass { gate: self.clone(), ctx }
    }

    async fn closed(&self) {
        if self.open.get() == 0 {
            return;
        }
        let (tx, rx) = oneshot::channel();
        *self.waiter.borrow_mut() = Some(tx);
        let _ = rx.await;
    }
}

impl Drop for GatePass {
    fn drop(&mut self) {
        self.ctx.stats().connections_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let open = self.gate.open.get() - 1;
        self.gate.open.set(open);
        if open == 0
            && let Some(tx) = self.gate.waiter.borrow_mut().take()
        {
            let _ = tx.send(());
        }
    }
}
