//! The ingest stage: request bodies in, validated COPY rows out. Pure: no I/O,
//! no clock reads (the caller passes the time), so every rule is unit-tested.
//!
//! - [`event`]: the contract's rule for each field.
//! - [`parse`]: simd-json tape walk over single, array and NDJSON bodies.

pub mod event;
pub mod parse;

pub use parse::{BodyError, BodyKind, Clock, Parsed, Parser, Rejection, Rules};
