//! Pipelined HTTP/1.1 requests: heads, Content-Length and chunked bodies, gzip.
//! Invariants: `ingestd::fuzzing::http_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingestd::fuzzing::http_request(data));
