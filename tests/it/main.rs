#![allow(clippy::unwrap_used)]
//! Black-box integration tests for `ingestd`: one test binary (ripgrep
//! style), each module covering one part of the contract in
//! `../shared/SPEC.md` and `docs/INTERFACE.md`.
//!
//! Every test spawns the real binary on `127.0.0.1:0` with a table of its own
//! in the PostgreSQL cluster named by `INGESTD_TEST_DATABASE_URL` (exported
//! by `scripts/test.sh`), talks raw HTTP/1.1 to it and checks the database.
//!
//! - `support`: the harness (spawning, raw HTTP client, database helpers).
//! - `cluster`: one live feed across three instances over a real Redis or
//!   NATS bus (issue 16): exactly once per subscriber, the bus killed and
//!   restarted under load, `[cluster]` configuration.
//! - `config`: command line, `--check-config`, config errors, exit codes.
//! - `cors`: browsers as clients: CORS and the WebSocket `Origin` check, in
//!   a real headless Chromium.
//! - `deadletter`: `ingestd dead-letter list|replay|purge` and the
//!   `ingestd_dead_letters_waiting` gauge (issue 13).
//! - `devices`: `GET /devices/{device_id}` and `GET /devices` (the latest
//!   state, `[state]`): pages, filters, bad parameters, tokens, timeouts.
//! - `dbtls`: TLS to PostgreSQL (sslmode, CA, password file), a TLS-only cluster.
//! - `ingest`: the success paths of `POST /events` and `/events/batch`,
//!   timestamps, partial rejection, idempotency, `ack = "queue"`.
//! - `validation`: per-event validation rules and their reasons.
//! - `http`: HTTP/1.1 handling and the error statuses.
//! - `hostile`: hostile input over real sockets (encodings, nesting, smuggling,
//!   bombs, floods, slow clients, broken WebSocket frames).
//! - `observability`: `/health`, `/stats`, `/metrics`.
//! - `ops`: SIGHUP reload.
//! - `pgbouncer`: through a real PgBouncer in transaction pooling mode
//!   (ingest, idempotency, dead letters, statement_timeout, the breaker).
//! - `overload`: fail fast with 503 + Retry-After.
//! - `reliability`: faults: dead letters, SIGKILL, PostgreSQL restarts, the spool (issue 5).
//! - `scale`: two instances on one table; strict `/metrics` parsing.
//! - `security`: bearer tokens and scopes, token reload, TLS, rate and
//!   connection limits, the write timeout.
//! - `lifecycle`: signals and graceful shutdown under load.
//! - `ws`: `GET /ws` subscriptions and ingest over WebSocket.
//! - `rooms`: several filters in the `GET /ws` URL, subscribe/unsubscribe
//!   control frames, their bounds and a token's device prefix (issue 13).
//! - `snapshot`: the rooms' state before their live events, and the
//!   hand-over under concurrent ingest (issue 13).
//! - `spec`: literal readings of SPEC.md where INTERFACE.md is silent.
//! - `stall`: PostgreSQL locked, slowed, stopped or refusing: the memory
//!   budget, the time bound on answers, `/health` with no traffic (issue 11).

mod support;

mod cluster;
mod config;
mod cors;
mod dbtls;
mod deadletter;
mod devices;
mod hostile;
mod http;
mod ingest;
mod lifecycle;
mod observability;
mod ops;
mod overload;
mod pgbouncer;
mod reliability;
mod rooms;
mod scale;
mod security;
mod snapshot;
mod spec;
mod stall;
mod state;
mod validation;
mod ws;
