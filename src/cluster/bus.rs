//! The two buses behind one face: connect, send a message, take the next
//! one. Redis pub/sub is connected by us (one connection to publish, one
//! subscribed, each reconnected by `cluster`'s loops); NATS by its client,
//! which reconnects and resubscribes by itself, so here its "connect" only
//! hands out the shared client. Every call is bounded in time by the caller.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;

use crate::config::{ClusterConfig, Feed};

/// Why the bus did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusError {
    /// Not connected (NATS between reconnects).
    Down,
    /// The bus took longer than it was given.
    Timeout,
    /// The client said so.
    Failed(String),
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::Down => f.write_str("not connected"),
            BusError::Timeout => f.write_str("timed out"),
            BusError::Failed(why) => f.write_str(why),
        }
    }
}

fn failed(e: impl fmt::Display) -> BusError {
    BusError::Failed(e.to_string())
}

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bounds `f` by `limit`.
pub async fn within<T>(limit: Duration, f: impl Future<Output = Result<T, BusError>>) -> Result<T, BusError> {
    tokio::time::timeout(limit, f).await.unwrap_or(Err(BusError::Timeout))
}

/// A configured bus, before any connection.
#[derive(Clone)]
pub enum Bus {
    Redis { client: redis::Client, channel: String },
    Nats { client: async_nats::Client, subject: String, up: Arc<AtomicBool> },
}

impl Bus {
    /// Reads the URL; a NATS client starts connecting in the background
    /// (`reconnects` counts its reconnections after the first connect).
    pub async fn open(config: &ClusterConfig, reconnects: Arc<AtomicU64>) -> Result<Bus, BusError> {
        match config.feed {
            Feed::Redis => Ok(Bus::Redis {
                client: redis::Client::open(config.url.as_str()).map_err(failed)?,
                channel: config.channel.clone(),
            }),
            Feed::Nats | Feed::Off => {
                let up = Arc::new(AtomicBool::new(false));
                let (seen, ever) = (up.clone(), Arc::new(AtomicBool::new(false)));
                let max = Duration::from_millis(config.reconnect_max_ms);
                let client = async_nats::ConnectOptions::new()
                    .name("ingestd")
                    .retry_on_initial_connect()
                    .connection_timeout(CONNECT_TIMEOUT)
                    .ping_interval(Duration::from_secs(2))
                    .reconnect_delay_callback(move |attempts| backoff(attempts, max))
                    .event_callback(move |event| {
                        let (up, ever, reconnects) = (seen.clone(), ever.clone(), reconnects.clone());
                        async move {
                            match event {
                                async_nats::Event::Connected => {
                                    up.store(true, Ordering::Relaxed);
                                    if ever.swap(true, Ordering::Relaxed) {
                                        reconnects.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                async_nats::Event::Disconnected | async_nats::Event::Closed => {
                                    up.store(false, Ordering::Relaxed);
                                }
                                _ => {}
                            }
                        }
                    })
                    .connect(config.url.as_str())
                    .await
                    .map_err(failed)?;
                Ok(Bus::Nats { client, subject: config.channel.clone(), up })
            }
        }
    }

    /// A connection to publish on.
    pub async fn sender(&self) -> Result<Sender, BusError> {
        match self {
            Bus::Redis { client, channel } => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(CONNECT_TIMEOUT));
                let con = within(CONNECT_TIMEOUT, async {
                    client.get_multiplexed_async_connection_with_config(&config).await.map_err(failed)
                })
                .await?;
                Ok(Sender::Redis { con, channel: channel.clone() })
            }
            Bus::Nats { client, subject, up } => {
                Ok(Sender::Nats { client: client.clone(), subject: subject.clone(), up: up.clone() })
            }
        }
    }

    /// A subscription to the feed.
    pub async fn receiver(&self) -> Result<Receiver, BusError> {
        match self {
            Bus::Redis { client, channel } => {
                let (mut sink, stream) = within(CONNECT_TIMEOUT, async {
                    client.get_async_pubsub().await.map(|p| p.split()).map_err(failed)
                })
                .await?;
                within(CONNECT_TIMEOUT, async { sink.subscribe(channel.as_str()).await.map_err(failed) }).await?;
                Ok(Receiver::Redis { sink, stream })
            }
            Bus::Nats { client, subject, .. } => {
                let sub =
                    within(CONNECT_TIMEOUT, async { client.subscribe(subject.clone()).await.map_err(failed) }).await?;
                Ok(Receiver::Nats(sub))
            }
        }
    }

    /// Whether the client holds a connection now (NATS); Redis is told by
    /// the loops, which own its connections.
    pub fn nats_up(&self) -> Option<bool> {
        match self {
            Bus::Redis { .. } => None,
            Bus::Nats { up, .. } => Some(up.load(Ordering::Relaxed)),
        }
    }
}

/// The pause before reconnection attempt `attempt` (1, 2, …): 50 ms
/// doubling up to `max`.
pub fn backoff(attempt: usize, max: Duration) -> Duration {
    let shift = attempt.saturating_sub(1).min(16) as u32;
    (Duration::from_millis(50) * 2u32.pow(shift)).min(max)
}

pub enum Sender {
    Redis { con: redis::aio::MultiplexedConnection, channel: String },
    Nats { client: async_nats::Client, subject: String, up: Arc<AtomicBool> },
}

impl Sender {
    /// Largest message the bus takes, when it says (NATS's `max_payload`).
    pub fn max_message(&self) -> Option<usize> {
        match self {
            Sender::Redis { .. } => None,
            Sender::Nats { client, .. } => Some(client.server_info().max_payload).filter(|m| *m > 0),
        }
    }

    pub async fn send(&mut self, msg: Bytes) -> Result<(), BusError> {
        match self {
            Sender::Redis { con, channel } => {
                let _receivers: i64 =
                    redis::cmd("PUBLISH").arg(channel.as_str()).arg(&msg[..]).query_async(con).await.map_err(failed)?;
                Ok(())
            }
            Sender::Nats { client, subject, up } => {
                // The client would buffer while disconnected and send stale
                // batches later; a message that cannot go now is dropped.
                if !up.load(Ordering::Relaxed) {
                    return Err(BusError::Down);
                }
                client.publish(subject.clone(), msg).await.map_err(failed)
            }
        }
    }
}

pub enum Receiver {
    Redis { sink: redis::aio::PubSubSink, stream: redis::aio::PubSubStream },
    Nats(async_nats::Subscriber),
}

impl Receiver {
    /// The next message for which `keep` says yes (Redis hands back our
    /// own messages too: they are left before being copied). A Redis
    /// subscription that brings nothing for `quiet` is pinged (bounded by
    /// `quiet` too): a connection that died without a word is found within
    /// two `quiet`s.
    pub async fn next(&mut self, quiet: Duration, keep: impl Fn(&[u8]) -> bool) -> Result<Bytes, BusError> {
        match self {
            Receiver::Redis { sink, stream } => loop {
                match tokio::time::timeout(quiet, stream.next()).await {
                    Ok(Some(msg)) if !keep(msg.get_payload_bytes()) => {}
                    Ok(Some(msg)) => return Ok(Bytes::copy_from_slice(msg.get_payload_bytes())),
                    Ok(None) => return Err(BusError::Failed("the subscription's connection closed".into())),
                    Err(_) => {
                        within(quiet, async { sink.ping::<redis::Value>().await.map_err(failed) }).await?;
                    }
                }
            },
            Receiver::Nats(sub) => loop {
                match sub.next().await {
                    Some(msg) if !keep(&msg.payload) => {}
                    Some(msg) => return Ok(msg.payload),
                    None => return Err(BusError::Failed("the NATS client closed".into())),
                }
            },
        }
    }
}
