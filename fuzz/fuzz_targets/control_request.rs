#![no_main]
// See latentloop::fuzzing::control_request for what this feeds and what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| latentloop::fuzzing::control_request(data));
