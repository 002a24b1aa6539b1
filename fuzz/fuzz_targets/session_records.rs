#![no_main]
// See latentloop::fuzzing::session_records for what this feeds and what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| latentloop::fuzzing::session_records(data));
