//! One entry point per parser of outside bytes, each taking arbitrary bytes and going
//! through the same code a run, `eval` or `replay` uses: the fuzz targets (fuzz/), the
//! corpus replay test (tests/fuzz_corpus.rs) and the property tests call these. Each must
//! return (an error is a fine answer); a panic, a hang or an abort is a bug.
//!
//! Not a user API (`#[doc(hidden)]`): inputs are what a fuzzer makes, so the functions
//! allocate and, for the parsers that read files, write the bytes to a scratch folder.

use crate::pipeline::source::openephys::{Binner, Frames, Mode, Settings};
use crate::pipeline::source::{BinSlot, Counters, RejectLog};
use std::path::PathBuf;
use std::sync::Arc;

/// A parser's entry point: any bytes in, nothing out but a return.
pub type Parse = fn(&[u8]);

/// The parsers, by the name of their fuzz target and corpus folder.
pub const TARGETS: [(&str, Parse); 8] = [
    ("bin_message", bin_message),
    ("output_message", output_message),
    ("openephys_message", openephys_message),
    ("rig_config", rig_config),
    ("model_file", model_file),
    ("npz", npz),
    ("session_records", session_records),
    ("control_request", control_request),
];

/// An LLBN bin as the zmq source reads it: the header, then the payload into buffers of
/// the channel count the header claims (bounded, as the source's are by the config).
pub fn bin_message(data: &[u8]) {
    use crate::wire::bin;
    let (channels, dims) = match bin::header(data) {
        Ok(h) => (h.channels.min(4096), h.behavior_dims.min(64)),
        Err(_) => (8, 2),
    };
    let mut counts = vec![0.0; channels];
    let mut behavior = vec![0.0; dims];
    if let Ok(h) = bin::decode(data, &mut counts, &mut behavior, 1000.0) {
        // What decodes is itself once encoded again.
        let mut out = Vec::new();
        let b: &[f32] = if h.behavior_dims == 0 { &[] } else { &behavior };
        bin::encode(&h, &counts, b, &mut out);
        let mut again = (vec![0.0; channels], vec![0.0; dims]);
        let h2 = bin::decode(&out, &mut again.0, &mut again.1, 1000.0).expect("a re-encoded bin decodes");
        assert_eq!((h2, &again.0), (h, &counts), "a bin changed through encode and decode");
    }
}

/// latentloop's own output message, as the Python peers and `receive_outputs` read it.
pub fn output_message(data: &[u8]) {
    let _ = crate::wire::output::decode(data);
}

/// A ZMQ Interface message (envelope, JSON header, payload) into an Open Ephys binner, in
/// the mode the first byte picks; the bins it makes are popped as the source does.
/// Input: mode byte, then the frames, each prefixed by its length (u16 LE).
pub fn openephys_message(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let mode = if mode & 1 == 0 { Mode::Continuous } else { Mode::Spikes };
    let set = Settings {
        channels: 4,
        bin_ms: 1.0,
        mode,
        stream: None,
        threshold: 4.0,
        noise_seconds: 0.01,
        refractory_ms: 1.0,
        electrodes: Vec::new(),
    };
    let (tx, _rx) = crossbeam_channel::bounded(1024);
    let mut binner = Binner::new(set, Arc::new(Counters::default()), RejectLog::new(tx));
    let mut slot = BinSlot::new(4, 0);
    let mut now = 0u64;
    // Several messages per input, so that sequences (gaps, restarts, rate changes) are reached.
    while !rest.is_empty() {
        let mut parts: Vec<&[u8]> = Vec::new();
        for _ in 0..3 {
            if rest.len() < 2 {
                break;
            }
            let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
            parts.push(&rest[2..2 + n]);
            rest = &rest[2 + n..];
        }
        if parts.is_empty() {
            break;
        }
        let get = |i: usize| parts.get(i).copied().unwrap_or(&[]);
        let frames = Frames { envelope: get(0), header: get(1), payload: get(2), count: parts.len(), truncated: false };
        now += 1_000_000;
        binner.handle(&frames, now);
        let mut popped = 0;
        while binner.pop(&mut slot) {
            popped += 1;
            assert!(popped <= 1_000_000, "one message made a million bins");
        }
    }
}

/// A rig config (TOML) as `latentloop run` loads it: every key checked.
pub fn rig_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::config::RigConfig::parse(text, &scratch().join("rig.toml"));
}

/// A model file: the safetensors header and metadata, the model card, the XFADS name
/// mapping, the compiled model.
pub fn model_file(data: &[u8]) {
    if let Ok(f) = crate::model::ModelFile::from_bytes(data) {
        let _ = crate::any_model::AnyModel::from_model_file(&f);
    }
}

/// A session file (.npz) as `eval`, `fit` and the simulator's readers take it.
pub fn npz(data: &[u8]) {
    let p = scratch().join("data.npz");
    if std::fs::write(&p, data).is_ok() {
        let _ = crate::data::Dataset::read_npz(&p);
        let _ = crate::data::npz::read_arrays(&p);
    }
}

/// A session's records file (`records.lls`) beside a valid header, read as `replay`
/// and the Python reader's Rust twin do: the scan, every bins chunk, every record.
pub fn session_records(data: &[u8]) {
    let dir = scratch().join("session");
    let _ = std::fs::create_dir_all(&dir);
    let header = dir.join(crate::session::HEADER_FILE);
    if !header.exists() {
        let _ = std::fs::write(&header, SESSION_HEADER);
    }
    if std::fs::write(dir.join(crate::session::RECORDS_FILE), data).is_err() {
        return;
    }
    if let Ok(s) = crate::session::read::Session::open(&dir) {
        let _ = s.status();
        for chunk in s.bin_chunks() {
            let Ok(bins) = chunk else { break };
            for b in &bins {
                let _ = (b.decision(), b.arrays());
            }
        }
    }
}

/// A control-socket request (JSON) as the control thread parses it.
pub fn control_request(data: &[u8]) {
    let _ = crate::pipeline::control::parse_request(data);
}

/// The header of a real session (a 4-channel, 2-latent, 2-dimension run), for
/// [`session_records`].
pub const SESSION_HEADER: &str = include_str!("../fuzz/session.json");

/// A scratch folder of this process (tmpfs when there is one).
fn scratch() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base =
            if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let d = base.join(format!("latentloop-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    })
    .clone()
}
