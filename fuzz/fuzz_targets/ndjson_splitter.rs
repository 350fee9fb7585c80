//! NDJSON bodies for POST /events/batch.
//! Invariants: `ingestd::fuzzing::ndjson_splitter`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingestd::fuzzing::ndjson_splitter(data));
