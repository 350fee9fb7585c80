//! Request bodies for POST /events and JSON-array POST /events/batch.
//! Invariants: `ingestd::fuzzing::event_validator`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingestd::fuzzing::event_validator(data));
