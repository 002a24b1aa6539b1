#![no_main]
// See latentloop::fuzzing::model_file for what this feeds and what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| latentloop::fuzzing::model_file(data));
