//! What `/health`, `/stats` and `/metrics` answer: the counters of every
//! thread (`metrics`), the readiness state (`health`) and the gauges of the
//! other stages (ring, backlog, budgets, subscribers, pool), rendered as
//! JSON and as Prometheus text format 0.0.4. Reads only: nothing here is on
//! a request's path but these three routes.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::broadcast::{BusDrop, Hub};
use crate::budget::Budget;
use crate::cluster;
use crate::health::{DbStatus, Health};
use crate::labels::{RejectKind, Route, Shed};
use crate::metrics::{
    self, Counter, Metrics, SLOT_SECS, STATUS_CODES, ShardStats, Snapshot, WINDOW_SLOTS, WriterStats, process_rss_bytes,
};
use crate::pipeline::{Backlog, RingGauge};

/// Everything the three routes read; built once by `app`, shared by shards.
pub struct Report {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The writers' ring, for its depth.
    pub ring: RingGauge,
    /// What waits in the ring and how fast the writers drain it.
    pub backlog: Arc<Backlog>,
    /// What requests hold in memory (`limits.memory_budget_bytes`).
    pub budget: Budget,
    /// Subscriber counts per shard, and the live feed's budget.
    pub hub: Arc<Hub>,
    /// The writers' connection pool, for its state.
    pub pool: crate::writer::db::Pool,
    /// The live feed across instances, when `[cluster] feed` is on.
    pub cluster: Option<Arc<cluster::Status>>,
}

impl Report {
    /// The `/health` body.
    pub fn health_json(&self) -> String {
        let ready = self.health.ready();
        let database = self.health.database.status();
        let status = if self.health.shutdown.has_begun() {
            "shutting_down"
        } else if !ready && self.health.spool.get().is_some() {
            "spool_unavailable"
        } else if !ready && database == DbStatus::Refused {
            "database_refused"
        } else if !ready {
            "database_unavailable"
        } else {
            "ready"
        };
        let now = Instant::now();
        serde_json::json!({
            "status": status,
            "ready": ready,
            "database": database.as_str(),
            "database_for_s": self.health.database.for_how_long(now).as_secs(),
            "database_up": database == DbStatus::Up,
            "breaker": self.health.breaker.state().as_str(),
            "queue_wait_ms": self.backlog.wait_estimate(now).as_millis() as u64,
            "memory_used_bytes": self.budget.used(),
            "memory_budget_bytes": self.budget.limit(),
            "uptime_s": self.metrics.started.elapsed().as_secs(),
            "auth": if self.health.auth_tokens.load(Ordering::Relaxed) { "tokens" } else { "off" },
            "tls": self.health.tls.load(Ordering::Relaxed),
            "cluster": self.cluster_json(),
        })
        .to_string()
    }

    /// The bus as `/health` and `/stats` show it (`null` with the feed off).
    /// The bus never makes ingestd unready: ingest does not depend on it.
    fn cluster_json(&self) -> serde_json::Value {
        let Some(c) = &self.cluster else { return serde_json::Value::Null };
        let export = &self.hub.export;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "feed": c.feed.as_str(),
            "instance": c.instance,
            "bus": c.bus(),
            "peers": c.peers.load(Ordering::Relaxed),
            "published_batches": get(&c.published_batches),
            "published_events": get(&c.published_events),
            "publish_dropped_events": BusDrop::ALL.iter().map(|w| export.dropped(*w)).sum::<u64>(),
            "received_batches": get(&c.received_batches),
            "received_events": get(&c.received_events),
            "missed_events": get(&c.missed_events),
            "reconnects": get(&c.reconnects),
            "lag_ms": c.lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        })
    }

    /// The `/stats` body: totals since start, per-reason rejections, and
    /// latency quantiles and batch sizes over the last minute (`window_s`).
    pub fn stats_json(&self) -> String {
        let shed_by_reason: serde_json::Map<String, serde_json::Value> = Shed::ALL
            .iter()
            .map(|k| (k.label().to_string(), self.metrics.sum_shards(|s| s.shed[*k as usize].get()).into()))
            .collect();
        let rejected_by_reason: serde_json::Map<String, serde_json::Value> = RejectKind::ALL
            .iter()
            .map(|k| (k.label().to_string(), self.metrics.sum_shards(|s| s.events_rejected[*k as usize].get()).into()))
            .collect();
        // Quantiles over the recent window (metrics::Window), in ms.
        let now = Instant::now();
        let m = &self.metrics;
        let quantiles_ms = |d: &Snapshot| {
            let w = &d.window;
            serde_json::json!({
                "count": w.count,
                "p50": w.quantile(0.5) as f64 / 1000.0,
                "p99": w.quantile(0.99) as f64 / 1000.0,
                "p999": w.quantile(0.999) as f64 / 1000.0,
                "max": w.max as f64 / 1000.0,
            })
        };
        let batch = m.merged(now, |w| &w.batch_events).window;
        let spool = self.health.spool.get().map(|s| {
            let st = s.stats();
            serde_json::json!({
                "used_bytes": st.used_bytes,
                "max_bytes": st.max_bytes,
                "segments": st.segments,
                "durable_seq": st.durable_seq,
                "committed_seq": st.committed_seq,
                "pending_records": st.durable_seq.saturating_sub(st.committed_seq),
                "append_groups": st.append_groups,
                "appended_records": st.appended_records,
            })
        });
        let mut stats = serde_json::json!({
            "spool": spool,
            "uptime_s": self.metrics.started.elapsed().as_secs_f64(),
            "ready": self.health.ready(),
            "database": self.health.database.status().as_str(),
            "database_up": self.health.database.is_up(),
            "breaker": self.health.breaker.state().as_str(),
            "breaker_opens": self.health.breaker.opens(),
            "memory": {
                "used_bytes": self.budget.used(),
                "peak_bytes": self.budget.peak(),
                "budget_bytes": self.budget.limit(),
                "refused": self.budget.refused(),
                "fanout_used_bytes": self.hub.budget.used(),
                "fanout_budget_bytes": self.hub.budget.limit(),
                "fanout_refused": self.hub.budget.refused(),
            },
            "queued_events": self.backlog.queued_events(),
            "queue_wait_ms": self.backlog.wait_estimate(Instant::now()).as_millis() as u64,
            "shed_by_reason": shed_by_reason,
            "jobs_expired": self.metrics.sum_writers(|w| w.jobs_expired.get()),
            "events_accepted": self.metrics.sum_shards(|s| s.events_accepted.get()),
            "events_rejected": self.metrics.sum_shards(|s| s.events_rejected.iter().map(Counter::get).sum()),
            "events_rejected_by_reason": rejected_by_reason,
            "events_committed": self.metrics.sum_writers(|w| w.events_committed.get()),
            "events_duplicate": self.metrics.sum_writers(|w| w.events_duplicate.get()),
            "events_lost": self.metrics.sum_writers(|w| w.events_lost.get()),
            "batches": self.metrics.sum_writers(|w| w.batches.get()),
            "batch_failures": self.metrics.sum_writers(|w| w.batch_failures.get()),
            "staging_fallbacks": self.metrics.sum_writers(|w| w.staging_fallbacks.get()),
            "dedup_suspects": self.metrics.sum_writers(|w| w.dedup_suspects.get()),
            "events_dead_lettered": self.metrics.sum_writers(|w| w.events_dead_lettered.get()),
            "window_s": WINDOW_SLOTS as u64 * SLOT_SECS,
            "batch_events": {
                "count": batch.count,
                "mean": batch.mean(),
                "p50": batch.quantile(0.5),
                "p99": batch.quantile(0.99),
                "max": batch.max,
            },
            "ring_depth": self.ring.depth(),
            "ring_capacity": self.ring.capacity(),
            "requests": self.metrics.sum_shards(|s| s.requests.iter().map(Counter::get).sum()),
            "overload_rejections": self.metrics.sum_shards(|s| s.overload_rejections.get()),
            "connections_open": self.metrics.shards.iter().map(|s| s.connections_open.load(Ordering::Relaxed)).sum::<i64>(),
            "ws_subscribers": self.hub.subscribers(),
            "ws_messages_sent": self.metrics.sum_shards(|s| s.ws_messages_sent.get()),
            "ws_dropped": self.metrics.sum_shards(|s| s.ws_dropped.get()),
            "ws_slow_closes": self.metrics.sum_shards(|s| s.ws_slow_closes.get()),
            "ws_fanout_latency_ms": quantiles_ms(&m.merged_shards(now, |s| &s.ws_fanout_us)),
            "shard_loop_lag_ms": quantiles_ms(&m.merged_shards(now, |s| &s.loop_lag_us)),
            "db_pool": Some(&self.pool).map(|p| {
                let st = p.state();
                serde_json::json!({"in_use": st.connections - st.idle_connections, "idle": st.idle_connections, "max": p.max_size()})
            }),
            "commit_latency_ms": quantiles_ms(&m.merged(now, |w| &w.commit_us)),
            "ack_latency_ms": quantiles_ms(&m.merged(now, |w| &w.ack_us)),
        });
        // Rows in the dead-letter table as last counted (null until then).
        // Added here: one more key in the literal above passes json!'s
        // recursion limit.
        if let Some(map) = stats.as_object_mut() {
            map.insert("dead_letters_waiting".into(), self.metrics.dead_letters_waiting().into());
            map.insert("cluster".into(), self.cluster_json());
        }
        stats.to_string()
    }

    /// The `/metrics` body, Prometheus text format 0.0.4: one section per
    /// stage, in the order of the data flow.
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let o = &mut out;
        let now = Instant::now();
        self.readiness(o);
        self.memory(o);
        self.requests(o);
        self.websocket(o);
        self.writers(o);
        self.queue(o, now);
        self.latencies(o, now);
        self.pool_and_spool(o);
        self.cluster(o);
        process(o, self.metrics.started);
        out
    }

    fn cluster(&self, o: &mut String) {
        let Some(c) = &self.cluster else { return };
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let values: [(&str, &str, u64); 9] = [
            (
                "ingestd_cluster_bus_up",
                "1 when this instance both publishes to and is subscribed on the bus.",
                c.is_up().into(),
            ),
            (
                "ingestd_cluster_peers",
                "Other instances heard from on the bus in the last minute.",
                c.peers.load(Ordering::Relaxed) as u64,
            ),
            (
                "ingestd_cluster_published_batches_total",
                "Messages with events this instance put on the bus.",
                get(&c.published_batches),
            ),
            (
                "ingestd_cluster_published_events_total",
                "Events this instance put on the bus.",
                get(&c.published_events),
            ),
            (
                "ingestd_cluster_received_batches_total",
                "Other instances' messages with events taken off the bus.",
                get(&c.received_batches),
            ),
            (
                "ingestd_cluster_received_events_total",
                "Other instances' events taken off the bus.",
                get(&c.received_events),
            ),
            (
                "ingestd_cluster_missed_events_total",
                "Other instances' events that never arrived here (gaps in their counts); subscribers were told.",
                get(&c.missed_events),
            ),
            ("ingestd_cluster_reconnects_total", "Bus connections made again after one was lost.", get(&c.reconnects)),
            (
                "ingestd_cluster_foreign_messages_total",
                "Messages on the channel that were not ingestd's or were damaged.",
                get(&c.foreign_messages),
            ),
        ];
        for (name, help, value) in values {
            family(o, name, if name.ends_with("_total") { "counter" } else { "gauge" }, help);
            let _ = writeln!(o, "{name} {value}");
        }
        let name = "ingestd_cluster_publish_dropped_events_total";
        family(o, name, "counter", "Events committed here that did not go out on the bus, by reason.");
        for why in BusDrop::ALL {
            let _ = writeln!(o, "{name}{{reason=\"{}\"}} {}", why.label(), self.hub.export.dropped(why));
        }
        let name = "ingestd_cluster_receive_lag_seconds";
        family(o, name, "gauge", "Age of the latest message from another instance when it arrived (sender's clock).");
        let _ = writeln!(o, "{name} {:.6}", c.lag_us.load(Ordering::Relaxed) as f64 / 1e6);
    }

    fn readiness(&self, o: &mut String) {
        family(o, "ingestd_build_info", "gauge", "Build information.");
        let _ = writeln!(o, "ingestd_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        let health = &self.health;
        let gauges: [(&str, &str, u64); 5] = [
            (
                "ingestd_up",
                "1 when ready to accept work (not shutting down, database reachable).",
                health.ready().into(),
            ),
            (
                "ingestd_database_up",
                "1 when the last database round trip (a write or a probe) succeeded.",
                health.database.is_up().into(),
            ),
            (
                "ingestd_database_state",
                "The database as last seen: 0 up, 1 unreachable, 2 refused us.",
                health.database.status().as_gauge().into(),
            ),
            (
                "ingestd_breaker_state",
                "Database circuit breaker: 0 closed, 1 open, 2 half-open.",
                health.breaker.state().as_gauge().into(),
            ),
            ("ingestd_breaker_opens_total", "Times the database circuit breaker opened.", health.breaker.opens()),
        ];
        for (name, help, value) in gauges {
            family(o, name, if name.ends_with("_total") { "counter" } else { "gauge" }, help);
            let _ = writeln!(o, "{name} {value}");
        }
        family(o, "ingestd_db_probes_total", "counter", "Database probes (while no writer reached it), by verdict.");
        for status in [DbStatus::Up, DbStatus::Unreachable, DbStatus::Refused] {
            let n = self.metrics.probes[status as usize].get();
            let _ = writeln!(o, "ingestd_db_probes_total{{result=\"{}\"}} {n}", status.as_str());
        }
    }

    fn memory(&self, o: &mut String) {
        let budgets = [("requests", &self.budget), ("fanout", &self.hub.budget)];
        let families: [Family<Budget>; 4] = [
            (
                "ingestd_memory_budget_bytes",
                "gauge",
                "Memory budgets: requests (limits.memory_budget_bytes) and the live feed (websocket.fanout_budget_bytes).",
                |b| b.limit() as u64,
            ),
            ("ingestd_memory_used_bytes", "gauge", "Bytes leased from each memory budget now.", |b| b.used() as u64),
            ("ingestd_memory_peak_bytes", "gauge", "Most bytes ever leased at once from each memory budget.", |b| {
                b.peak() as u64
            }),
            (
                "ingestd_memory_refusals_total",
                "counter",
                "Leases each memory budget refused (503s for requests, missed events for the live feed).",
                Budget::refused,
            ),
        ];
        for (name, kind, help, value) in families {
            family(o, name, kind, help);
            for (budget, b) in budgets {
                let _ = writeln!(o, "{name}{{budget=\"{budget}\"}} {}", value(b));
            }
        }
    }

    fn requests(&self, o: &mut String) {
        let shards = &self.metrics.shards;
        family(o, "ingestd_http_requests_total", "counter", "HTTP requests by shard and route.");
        for (i, s) in shards.iter().enumerate() {
            for r in Route::ALL {
                let (route, n) = (r.label(), s.requests[r as usize].get());
                let _ = writeln!(o, "ingestd_http_requests_total{{shard=\"{i}\",route=\"{route}\"}} {n}");
            }
        }
        family(o, "ingestd_http_responses_total", "counter", "HTTP responses by shard and status code.");
        for (i, s) in shards.iter().enumerate() {
            for (slot, code) in STATUS_CODES.iter().enumerate() {
                let n = s.responses[slot].get();
                if n > 0 {
                    let code = if *code == 0 { "other".to_string() } else { code.to_string() };
                    let _ = writeln!(o, "ingestd_http_responses_total{{shard=\"{i}\",code=\"{code}\"}} {n}");
                }
            }
        }
        family(o, "ingestd_events_rejected_total", "counter", "Events rejected by validation, by reason.");
        for (i, s) in shards.iter().enumerate() {
            for k in RejectKind::ALL {
                let (reason, n) = (k.label(), s.events_rejected[k as usize].get());
                let _ = writeln!(o, "ingestd_events_rejected_total{{shard=\"{i}\",reason=\"{reason}\"}} {n}");
            }
        }
        family(o, "ingestd_requests_shed_total", "counter", "Requests answered 503 without being stored, by reason.");
        for (i, s) in shards.iter().enumerate() {
            for k in Shed::ALL {
                let (reason, n) = (k.label(), s.shed[k as usize].get());
                let _ = writeln!(o, "ingestd_requests_shed_total{{shard=\"{i}\",reason=\"{reason}\"}} {n}");
            }
        }
        let families: [Family<ShardStats>; 5] = [
            ("ingestd_events_accepted_total", "counter", "Events that passed validation.", |s| s.events_accepted.get()),
            (
                "ingestd_overload_rejections_total",
                "counter",
                "Requests answered 503 without being stored (any reason; see ingestd_requests_shed_total).",
                |s| s.overload_rejections.get(),
            ),
            ("ingestd_connections_accepted_total", "counter", "TCP connections accepted.", |s| {
                s.connections_accepted.get()
            }),
            (
                "ingestd_connections_refused_total",
                "counter",
                "TCP connections closed at once: shard at server.max_connections.",
                |s| s.connections_refused.get(),
            ),
            ("ingestd_connections_open", "gauge", "Open TCP connections.", |s| {
                s.connections_open.load(Ordering::Relaxed).max(0) as u64
            }),
        ];
        by_shard(o, &self.metrics, &families);
    }

    fn websocket(&self, o: &mut String) {
        family(o, "ingestd_ws_subscribers", "gauge", "WebSocket subscribers, by shard.");
        for (i, slot) in self.hub.slots.iter().enumerate() {
            let _ = writeln!(o, "ingestd_ws_subscribers{{shard=\"{i}\"}} {}", slot.subscribers.load(Ordering::Relaxed));
        }
        let families: [Family<ShardStats>; 5] = [
            ("ingestd_ws_messages_sent_total", "counter", "WebSocket messages written to subscribers.", |s| {
                s.ws_messages_sent.get()
            }),
            ("ingestd_ws_sent_bytes_total", "counter", "WebSocket bytes written.", |s| s.ws_bytes_sent.get()),
            (
                "ingestd_ws_dropped_events_total",
                "counter",
                "Events a subscriber did not get (dropped, lost to a 1013 close, or missed upstream).",
                |s| s.ws_dropped.get(),
            ),
            (
                "ingestd_ws_slow_closes_total",
                "counter",
                "Subscribers closed with 1013 because their queue was full.",
                |s| s.ws_slow_closes.get(),
            ),
            ("ingestd_ws_ingest_frames_total", "counter", "Ingest frames received over WebSocket.", |s| {
                s.ws_ingest_frames.get()
            }),
        ];
        by_shard(o, &self.metrics, &families);
    }

    fn writers(&self, o: &mut String) {
        let families: [Family<WriterStats>; 9] = [
            ("ingestd_events_committed_total", "counter", "Events committed to PostgreSQL.", |w| {
                w.events_committed.get()
            }),
            (
                "ingestd_events_duplicate_total",
                "counter",
                "Events skipped because their event_id was already stored.",
                |w| w.events_duplicate.get(),
            ),
            ("ingestd_events_lost_total", "counter", "ack=queue events not committed before shutdown.", |w| {
                w.events_lost.get()
            }),
            ("ingestd_batches_total", "counter", "COPY transactions committed.", |w| w.batches.get()),
            ("ingestd_batch_failures_total", "counter", "COPY transactions that failed.", |w| w.batch_failures.get()),
            (
                "ingestd_staging_fallbacks_total",
                "counter",
                "Batches redone through the staging table after a unique violation.",
                |w| w.staging_fallbacks.get(),
            ),
            (
                "ingestd_events_dead_lettered_total",
                "counter",
                "Events PostgreSQL refused, kept in the dead-letter table.",
                |w| w.events_dead_lettered.get(),
            ),
            (
                "ingestd_dedup_suspects_total",
                "counter",
                "Rows inserted through staging because their event_id was committed lately.",
                |w| w.dedup_suspects.get(),
            ),
            (
                "ingestd_jobs_expired_total",
                "counter",
                "Requests a writer answered 503 because they had waited past ingest.max_wait_ms.",
                |w| w.jobs_expired.get(),
            ),
        ];
        for (name, kind, help, value) in families {
            family(o, name, kind, help);
            for (i, w) in self.metrics.writers.iter().enumerate() {
                let _ = writeln!(o, "{name}{{writer=\"{i}\"}} {}", value(w));
            }
        }
        // Absent until the probe first counted the table (or with the count off).
        if let Some(waiting) = self.metrics.dead_letters_waiting() {
            family(
                o,
                "ingestd_dead_letters_waiting",
                "gauge",
                "Rows in the dead-letter table (counted every database.dead_letter_count_interval_ms).",
            );
            let _ = writeln!(o, "ingestd_dead_letters_waiting {waiting}");
        }
    }

    fn queue(&self, o: &mut String, now: Instant) {
        family(o, "ingestd_ring_depth", "gauge", "Requests waiting for a writer.");
        let _ = writeln!(o, "ingestd_ring_depth {}", self.ring.depth());
        family(o, "ingestd_queued_events", "gauge", "Events waiting for a writer.");
        let _ = writeln!(o, "ingestd_queued_events {}", self.backlog.queued_events());
        family(
            o,
            "ingestd_queue_wait_estimate_seconds",
            "gauge",
            "How long a request handed over now would wait for its COPY to start (admission refuses past ingest.max_wait_ms).",
        );
        let _ = writeln!(o, "ingestd_queue_wait_estimate_seconds {}", self.backlog.wait_estimate(now).as_secs_f64());
        family(
            o,
            "ingestd_writer_batch_cost_seconds",
            "gauge",
            "Each writer's fitted commit cost: fixed per batch, and per event.",
        );
        for (i, load) in self.backlog.loads(now).enumerate() {
            for (part, us) in [("batch", load.model.overhead_us), ("event", load.model.per_event_us)] {
                let _ =
                    writeln!(o, "ingestd_writer_batch_cost_seconds{{writer=\"{i}\",part=\"{part}\"}} {}", us * 1e-6);
            }
        }
        family(
            o,
            "ingestd_ring_capacity",
            "gauge",
            "Requests the writers' ring holds (writers × pipeline.ring_capacity).",
        );
        let _ = writeln!(o, "ingestd_ring_capacity {}", self.ring.capacity());
    }

    /// The distributions, as histograms summed over the instance's threads:
    /// per-shard or per-writer buckets would multiply the series by the
    /// thread count for quantiles nobody reads per thread; a stuck shard
    /// shows in `ingestd_shard_loop_lag_last_seconds`, a slow writer in
    /// `ingestd_writer_batch_cost_seconds`.
    fn latencies(&self, o: &mut String, now: Instant) {
        let m = &self.metrics;
        histogram(
            o,
            "ingestd_ws_fanout_latency_seconds",
            "Commit to WebSocket frame written, per event and subscriber.",
            &m.merged_shards(now, |s| &s.ws_fanout_us),
        );
        histogram(
            o,
            "ingestd_commit_duration_seconds",
            "COPY and commit time per batch.",
            &m.merged(now, |w| &w.commit_us),
        );
        histogram(
            o,
            "ingestd_ack_latency_seconds",
            "Time from ring hand-off to commit, per request.",
            &m.merged(now, |w| &w.ack_us),
        );
        histogram(o, "ingestd_batch_events", "Events per COPY batch.", &m.merged(now, |w| &w.batch_events));
        histogram(
            o,
            "ingestd_shard_loop_lag_seconds",
            "How late a shard's 100 ms timer fires: event-loop lag.",
            &m.merged_shards(now, |s| &s.loop_lag_us),
        );
        histogram(
            o,
            "ingestd_db_probe_duration_seconds",
            "Database probes (while no writer reached it): connect and round trip.",
            &metrics::merge([&m.probe_us].into_iter(), now),
        );
        family(o, "ingestd_shard_loop_lag_last_seconds", "gauge", "The latest event-loop lag reading per shard.");
        for (i, s) in m.shards.iter().enumerate() {
            let lag = s.loop_lag_last_us.load(Ordering::Relaxed) as f64 * 1e-6;
            let _ = writeln!(o, "ingestd_shard_loop_lag_last_seconds{{shard=\"{i}\"}} {lag}");
        }
    }

    fn pool_and_spool(&self, o: &mut String) {
        let state = self.pool.state();
        family(o, "ingestd_db_pool_connections", "gauge", "PostgreSQL connections in the writers' pool, by state.");
        let in_use = state.connections - state.idle_connections;
        let _ = writeln!(o, "ingestd_db_pool_connections{{state=\"in_use\"}} {in_use}");
        let _ = writeln!(o, "ingestd_db_pool_connections{{state=\"idle\"}} {}", state.idle_connections);
        family(o, "ingestd_db_pool_max_connections", "gauge", "Size of the writers' pool (database.pool_size).");
        let _ = writeln!(o, "ingestd_db_pool_max_connections {}", self.pool.max_size());
        let Some(spool) = self.health.spool.get() else { return };
        let st = spool.stats();
        let values: [(&str, &str, &str, u64); 4] = [
            ("ingestd_spool_used_bytes", "gauge", "Bytes in the disk spool.", st.used_bytes),
            ("ingestd_spool_max_bytes", "gauge", "Bound on the disk spool (spool.max_bytes).", st.max_bytes),
            (
                "ingestd_spool_pending_records",
                "gauge",
                "Spool records durable but not yet committed in PostgreSQL.",
                st.durable_seq.saturating_sub(st.committed_seq),
            ),
            ("ingestd_spool_fsyncs_total", "counter", "Group commits (one fsync each) of the spool.", st.append_groups),
        ];
        for (name, kind, help, value) in values {
            family(o, name, kind, help);
            let _ = writeln!(o, "{name} {value}");
        }
    }
}

/// The process families every exporter has.
fn process(o: &mut String, started: Instant) {
    if let Some(rss) = process_rss_bytes() {
        family(o, "process_resident_memory_bytes", "gauge", "Resident set size.");
        let _ = writeln!(o, "process_resident_memory_bytes {rss}");
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        family(o, "process_open_fds", "gauge", "Open file descriptors.");
        let _ = writeln!(o, "process_open_fds {}", dir.count());
    }
    family(o, "process_uptime_seconds", "gauge", "Seconds since start.");
    let _ = writeln!(o, "process_uptime_seconds {:.3}", started.elapsed().as_secs_f64());
}

/// A metric family read off a `T`: name, type, help, value.
type Family<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Families of per-shard values, one series per shard.
fn by_shard(o: &mut String, m: &Metrics, families: &[Family<ShardStats>]) {
    for (name, kind, help, value) in families {
        family(o, name, kind, help);
        for (i, s) in m.shards.iter().enumerate() {
            let _ = writeln!(o, "{name}{{shard=\"{i}\"}} {}", value(s));
        }
    }
}

/// A histogram family: cumulative `_bucket{le}` series (the edges in the
/// exported unit, then `+Inf`), `_sum` and `_count`. `_count` is the `+Inf`
/// bucket as read, so the two always agree.
fn histogram(o: &mut String, name: &str, help: &str, d: &Snapshot) {
    family(o, name, "histogram", help);
    let mut count = 0;
    for (i, n) in d.cumulative().enumerate() {
        match d.edges.get(i) {
            Some(&edge) => {
                let _ = writeln!(o, "{name}_bucket{{le=\"{}\"}} {n}", edge as f64 / d.per_unit);
            }
            None => {
                let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {n}");
            }
        }
        count = n;
    }
    let _ = writeln!(o, "{name}_sum {}", d.sum as f64 / d.per_unit);
    let _ = writeln!(o, "{name}_count {count}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let (_set, receivers, backlog) = crate::pipeline::ring(2, 8);
        let (hub, _publisher, _rx) = Hub::new(2, 10, 10, 4, Budget::unlimited());
        let breaker = crate::breaker::Breaker::new(Default::default(), Instant::now()).view();
        let db = crate::config::DatabaseConfig { url: "postgres://u@127.0.0.1:1/db".into(), ..Default::default() };
        Report {
            metrics: Arc::new(Metrics::new(2, 2)),
            health: Arc::new(Health::new(DbStatus::Up, breaker, crate::shutdown::Shutdown::new())),
            ring: RingGauge::new(&receivers),
            backlog,
            budget: Budget::new("limits.memory_budget_bytes", 1000),
            hub,
            pool: {
                let access = crate::writer::connect::Access::load_with(&db, None).expect("plain access");
                crate::writer::db::pool(&db, &Arc::new(arc_swap::ArcSwap::from_pointee(access)), 1)
                    .expect("a lazy pool")
            },
            cluster: None,
        }
    }

    #[test]
    fn prometheus_lines_parse() {
        let r = report();
        r.metrics.shards[1].events_accepted.add(5);
        r.metrics.writers[0].events_committed.add(3);
        r.metrics.writers[0].commit_us.record(1500);
        let text = r.prometheus();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.starts_with("ingestd_") || series.starts_with("process_"), "{line}");
        }
        assert!(text.contains("ingestd_events_accepted_total{shard=\"1\"} 5"));
        assert!(text.contains("ingestd_events_committed_total{writer=\"0\"} 3"));
        // A histogram summed over writers, edges in seconds, cumulative.
        r.metrics.writers[1].ack_us.record(2_000);
        r.metrics.writers[0].ack_us.record(40_000_000);
        let text = r.prometheus();
        for line in [
            "# TYPE ingestd_ack_latency_seconds histogram",
            "ingestd_ack_latency_seconds_bucket{le=\"0.0001\"} 0",
            "ingestd_ack_latency_seconds_bucket{le=\"0.001\"} 0",
            "ingestd_ack_latency_seconds_bucket{le=\"0.0025\"} 1",
            "ingestd_ack_latency_seconds_bucket{le=\"30\"} 1",
            "ingestd_ack_latency_seconds_bucket{le=\"+Inf\"} 2",
            "ingestd_ack_latency_seconds_sum 40.002",
            "ingestd_ack_latency_seconds_count 2",
            "ingestd_shard_loop_lag_seconds_bucket{le=\"0.00005\"} 0",
            "ingestd_batch_events_bucket{le=\"100000\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        assert!(!text.contains("quantile="), "no summaries left");
        assert!(!text.contains("ingestd_cluster_"), "no bus families with the feed off");
    }

    #[test]
    fn the_bus_shows_in_health_and_metrics_when_the_feed_is_on() {
        let mut r = report();
        let status = Arc::new(cluster::Status::new(crate::config::Feed::Redis, "node-a".into()));
        status.received_events.fetch_add(7, Ordering::Relaxed);
        r.cluster = Some(status);
        r.hub.export_to_bus();
        r.hub.export.lost(BusDrop::Timeout, 3);
        let text = r.prometheus();
        for line in [
            "ingestd_cluster_bus_up 0",
            "ingestd_cluster_received_events_total 7",
            "ingestd_cluster_publish_dropped_events_total{reason=\"timeout\"} 3",
            "ingestd_cluster_publish_dropped_events_total{reason=\"bus_down\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        let health: serde_json::Value = serde_json::from_str(&r.health_json()).unwrap();
        assert_eq!(health["cluster"]["bus"], "connecting");
        assert_eq!(health["cluster"]["instance"], "node-a");
        assert_eq!(health["cluster"]["publish_dropped_events"], 3);
    }

    #[test]
    fn stats_sum_all_threads() {
        let r = report();
        r.metrics.shards[0].events_accepted.add(2);
        r.metrics.shards[1].events_accepted.add(3);
        r.metrics.shards[0].rejected(RejectKind::NulCharacter);
        let v: serde_json::Value = serde_json::from_str(&r.stats_json()).unwrap();
        assert_eq!(v["events_accepted"], 5);
        assert_eq!(v["events_rejected"], 1);
        assert_eq!(v["events_rejected_by_reason"]["nul_character"], 1);
        // Latencies over the last minute, in ms.
        r.metrics.writers[0].ack_us.record(1_000);
        r.metrics.writers[1].ack_us.record(3_000);
        let v: serde_json::Value = serde_json::from_str(&r.stats_json()).unwrap();
        assert_eq!(v["window_s"], 60);
        assert_eq!(v["ack_latency_ms"]["count"], 2);
        assert_eq!(v["ack_latency_ms"]["max"], 3.0);
        let p50 = v["ack_latency_ms"]["p50"].as_f64().unwrap();
        assert!((1.0..=1.0625).contains(&p50), "p50 {p50}");
    }
}
