//! Client bytes on an upgraded WebSocket: frames, then ingest of text messages.
//! Invariants: `ingestd::fuzzing::ws_ingest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingestd::fuzzing::ws_ingest(data));
