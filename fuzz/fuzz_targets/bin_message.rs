#![no_main]
// See latentloop::fuzzing::bin_message for what this feeds and what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| latentloop::fuzzing::bin_message(data));
