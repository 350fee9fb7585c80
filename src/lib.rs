//! ingestd: a thread-per-core ingest appliance. JSON events arrive over HTTP,
//! are validated on the core that received them, and are committed to
//! PostgreSQL in large binary COPY batches by dedicated writer threads.
//!
//! # Layout
//!
//! The modules follow the data:
//!
//! - [`config`]: file → env → flags, validated into one [`config::Config`].
//! - [`shard`]: one pinned monoio (io_uring) runtime per core, owning its
//!   listener (SO_REUSEPORT) and connections; HTTP/1.1 framing and routes.
//! - [`ingest`]: pure validation and encoding: body → simd-json tape → COPY
//!   tuples, with a reason for every rejected event.
//! - [`pipeline`]: the bounded rings from shards to writers and the oneshot
//!   commit report that travels back.
//! - [`writer`]: writer threads, binary COPY encoding, idempotent batch
//!   commit over an `r2d2` pool.
//! - [`broadcast`]: committed events, serialised once, to the shards'
//!   WebSocket subscribers.
//! - [`metrics`]: per-thread counters and histograms; `/stats`, `/metrics`.
//! - [`app`]: starts the threads in order and owns the shutdown cascade.
//! - [`log`]: structured log lines on stderr.
//!
//! # Threads and ownership
//!
//! `shard-{n}` threads never block: they `try_send` to the rings and await
//! commit reports. `writer-{n}` threads block only on their ring and on
//! PostgreSQL. Nothing mutable is shared on the hot path: each thread owns
//! its buffers and its counters; the only locks are the writers' histograms
//! (one lock per batch, contended only by a scrape) and the pool's.

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod breaker;
pub mod broadcast;
pub mod budget;
pub mod config;
pub mod drain;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod ingest;
pub mod labels;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod pipeline;
pub mod report;
pub mod resources;
pub mod row;
pub mod shard;
pub mod shutdown;
pub mod spool;
pub mod writer;
