#![no_main]
// See latentloop::fuzzing::npz for what this feeds and what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| latentloop::fuzzing::npz(data));
