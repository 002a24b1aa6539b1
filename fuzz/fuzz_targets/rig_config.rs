#![no_main]
// See latentloop::fuzzing::rig_config for what this feeds and what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| latentloop::fuzzing::rig_config(data));
