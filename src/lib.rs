pub mod app;
pub mod config;
pub mod ingest;
pub mod log;
pub mod metrics;
pub mod pipeline;
pub mod shard;
pub mod writer;
