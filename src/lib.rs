//! ingestd: a thread-per-core ingest appliance. JSON events arrive over HTTP,
//! are validated on the core that received them, and are committed to
//! PostgreSQL in large binary COPY batches by dedicated writer threads.
//!
//! # Layout
//!
//! The modules follow the data, top to bottom, and each imports only the
//! ones below it (checked by `tests/layers.rs`; the drawing and each
//! module's one job are in `docs/ARCHITECTURE.md`):
//!
//! - [`app`] starts the threads and owns the stop order; [`resources`]
//!   loads the files the configuration names; [`deadletter`] is the
//!   `ingestd dead-letter list|replay|purge` command.
//! - [`shard`]: one pinned monoio (io_uring) runtime per core owning its
//!   listener and connections: `conn` → `routes` → `devices` → `ws` → `accept` (the one
//!   admission step for HTTP and WebSocket ingest) → `http`, `transport`,
//!   `io`.
//! - [`report`] renders `/health`, `/stats`, `/metrics`; [`auth`] and
//!   [`limits`] say who may and how often.
//! - [`ingest`]: pure validation and encoding: body → simd-json tape → rows.
//! - [`read`]: reader threads that read the latest state of devices
//!   (`[state]`) for the shards, on a pool of their own.
//! - [`drain`] feeds spooled rows back to the writers (`ack = "spool"`).
//! - [`writer`]: writer threads, the `db-probe` thread, the idempotent COPY.
//! - [`pipeline`]: the one bounded ring to the writers and the backlog that
//!   bounds a wait; [`broadcast`]: committed events to subscribers.
//! - [`health`], [`breaker`]: what is known about the database.
//! - [`spool`]: the disk log; [`metrics`]: per-thread counters;
//!   [`shutdown`]: one shutdown value; [`config`]: plain validated data.
//! - [`log`], [`labels`], [`row`] (the binary COPY tuple every stage passes
//!   along) and [`budget`] (memory budgets in bytes) at the bottom.
//!
//! # Threads and ownership
//!
//! `shard-{n}` threads never block: they `try_send` to the ring and await
//! commit reports. `writer-{n}` threads block only on the ring and on
//! PostgreSQL. Each thread owns its buffers and its counters. The locks
//! that exist are off the per-event path (per batch, per request when a
//! limit is on, per subscribe, or contended only by a scrape); the list is
//! in `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod breaker;
pub mod broadcast;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod deadletter;
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
pub mod read;
pub mod report;
pub mod resources;
pub mod row;
pub mod shard;
pub mod shutdown;
pub mod spool;
pub mod writer;
