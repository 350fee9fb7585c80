//! Spool directories (segments, checkpoint) built from the input: recovery and replay.
//! Invariants: `ingestd::fuzzing::spool_reader`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingestd::fuzzing::spool_reader(data));
