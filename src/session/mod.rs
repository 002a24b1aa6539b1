//! The session format: everything a `latentloop run` received, decided and published, in a
//! folder that is self-contained (docs/SESSION.md is the reference; python/latentloop/
//! session.py reads it without latentloop). This module knows only the format: the
//! recorder thread of `run` (src/pipeline/record.rs) writes through [`write`], `replay` and
//! the tests read through [`read`].
//!
//! A session folder holds:
//! - `session.json`: the [`Header`] (config text, the model's SHA-256, versions, clock, seeds);
//! - `model-K.safetensors`: every model the session decoded with (K = 0 first; swaps add more);
//! - `records.lls`: an append-only stream of framed, checksummed chunks (bins, events, end).
//!
//! Why a format of our own: a closed-loop session must survive `kill -9` with everything up
//! to the last complete chunk readable, and be read with nothing but numpy. A 24-byte frame
//! with the length and CRC-32 of the payload (and of the frame itself) gives exactly that:
//! a reader stops at the first frame that does not check and says where. Bins are fixed-size
//! little-endian records (one `np.frombuffer` per chunk); events are JSON lines.

pub mod read;
pub mod write;

use serde::{Deserialize, Serialize};

/// First bytes of `records.lls`.
pub const MAGIC: [u8; 8] = *b"LLSESSN\0";
/// Bump when a reader of this version would misread a newer file (a field moved, a chunk
/// kind changed meaning). Adding a chunk kind or an event kind does not need a bump: readers
/// skip what they do not know.
pub const VERSION: u32 = 1;
/// Magic, version, reserved.
pub const FILE_HEADER: usize = 16;

pub const CHUNK_MAGIC: [u8; 4] = *b"LLSC";
/// Magic, kind, encoding, reserved (2), stored length, raw length, payload CRC, frame CRC.
pub const CHUNK_HEADER: usize = 24;

/// What a chunk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// A shape (channels, behaviour dims, latents), then fixed-size bin records.
    Bins = 1,
    /// JSON lines, one event each.
    Events = 2,
    /// One JSON object: the run ended cleanly (its counters).
    End = 3,
}

impl ChunkKind {
    pub fn from_code(c: u8) -> Option<ChunkKind> {
        match c {
            1 => Some(ChunkKind::Bins),
            2 => Some(ChunkKind::Events),
            3 => Some(ChunkKind::End),
            _ => None,
        }
    }
}

/// Payload encodings.
pub const RAW: u8 = 0;
pub const ZLIB: u8 = 1;

/// The shape of the bin records of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Shape {
    pub channels: usize,
    pub behavior_dims: usize,
    /// Length of the decoder's state mean (and lag-1 mean); 0 where nothing was decoded yet.
    pub latents: usize,
}

/// Bytes of a bins chunk's shape: channels u32, behaviour dims u16, latents u16.
pub const SHAPE_BYTES: usize = 8;
/// Bytes of a bin record before its arrays.
pub const BIN_FIXED: usize = 96;

impl Shape {
    /// Bytes of one bin record of this shape.
    pub fn record_len(&self) -> usize {
        BIN_FIXED + 4 * (self.channels + 2 * self.behavior_dims + 2 * self.latents)
    }
}

/// What happened to a bin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Given to the per-bin step and published (its output is in the record).
    Decoded = 0,
    /// The decoder, behind, passed over it to reach a newer waiting bin (reported in the
    /// next output's dropped_before).
    Skipped = 1,
    /// Dropped while catching up: a duplicate or late bin in the backlog.
    Stale = 2,
    /// Given to the per-bin step, which dropped it as a duplicate or late bin.
    OutOfOrder = 3,
    /// Lost at acquisition: every slot was with the decoder.
    RingFull = 4,
    /// Taken for the calibration block (no decoder yet).
    Calibration = 5,
}

impl Decision {
    pub fn from_code(c: u8) -> Option<Decision> {
        use Decision::*;
        [Decoded, Skipped, Stale, OutOfOrder, RingFull, Calibration].into_iter().find(|d| *d as u8 == c)
    }
    /// Whether the per-bin step saw this bin (so replay must give it to the step too).
    pub fn stepped(self) -> bool {
        matches!(self, Decision::Decoded | Decision::OutOfOrder)
    }
}

/// `dtype` of a record whose counts were made by latentloop (sim, Open Ephys, LSL), not
/// received as LLBN counts (0 u16, 1 u32, 2 f32: the wire's codes).
pub const DTYPE_BINNED: u8 = 3;

/// Bits of [`BinFields::bits`].
pub const BIT_HAS_BEHAVIOR: u8 = 1;
/// The step was told this bin restarts the stream (the publisher's flag, or inherited from
/// a restart the catch-up passed over).
pub const BIT_RESTART: u8 = 2;
/// ZeroMQ refused the output without blocking (no room for a slow subscriber).
pub const BIT_OUTPUT_DROPPED: u8 = 4;

/// The fixed part of a bin record (offsets in docs/SESSION.md).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BinFields {
    /// Record number from 0, in the order written.
    pub index: u64,
    pub seq: u64,
    pub source_ts: u64,
    /// Host CLOCK_MONOTONIC ns: the bin complete, in the ring, taken by the decoder, the
    /// step done, the output stamped (0: did not happen).
    pub recv_ns: u64,
    pub push_ns: u64,
    pub pop_ns: u64,
    pub step_ns: u64,
    pub publish_ns: u64,
    /// Newer bins the decoder passed over to reach this one (an input of the step).
    pub skipped: u64,
    pub dropped_before: u32,
    pub kl: f32,
    /// LLBN flags as received (no data, stream start).
    pub wire_flags: u16,
    /// LLOT flags of the output (0 when there is none).
    pub out_flags: u16,
    pub decision: u8,
    /// 0 data, 1 no data, 2 refused by the source.
    pub kind: u8,
    pub dtype: u8,
    pub bits: u8,
    /// Records lost just before this one (the recorder's ring was full).
    pub records_lost_before: u32,
}

impl BinFields {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        for v in [
            self.index,
            self.seq,
            self.source_ts,
            self.recv_ns,
            self.push_ns,
            self.pop_ns,
            self.step_ns,
            self.publish_ns,
            self.skipped,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.dropped_before.to_le_bytes());
        out.extend_from_slice(&self.kl.to_le_bytes());
        out.extend_from_slice(&self.wire_flags.to_le_bytes());
        out.extend_from_slice(&self.out_flags.to_le_bytes());
        out.extend_from_slice(&[self.decision, self.kind, self.dtype, self.bits]);
        out.extend_from_slice(&self.records_lost_before.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        debug_assert_eq!(out.len() - start, BIN_FIXED);
    }

    /// Reads the fixed part of a record (`b` at least [`BIN_FIXED`] bytes).
    pub fn decode(b: &[u8]) -> BinFields {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        BinFields {
            index: u64_at(0),
            seq: u64_at(8),
            source_ts: u64_at(16),
            recv_ns: u64_at(24),
            push_ns: u64_at(32),
            pop_ns: u64_at(40),
            step_ns: u64_at(48),
            publish_ns: u64_at(56),
            skipped: u64_at(64),
            dropped_before: u32_at(72),
            kl: f32::from_bits(u32_at(76)),
            wire_flags: u16_at(80),
            out_flags: u16_at(82),
            decision: b[84],
            kind: b[85],
            dtype: b[86],
            bits: b[87],
            records_lost_before: u32_at(88),
        }
    }
}

/// The arrays of a bin record, in file order.
#[derive(Clone, Copy, Debug)]
pub struct BinArrays<'a> {
    pub counts: &'a [f32],
    /// Behaviour the bin carried (zeros when it carried none).
    pub behavior_in: &'a [f32],
    /// What was published (zeros when nothing was).
    pub behavior_out: &'a [f32],
    pub latent: &'a [f32],
    pub lag1: &'a [f32],
}

impl BinArrays<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.counts, self.behavior_in, self.behavior_out, self.latent, self.lag1] {
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// `session.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Header {
    /// "latentloop-session".
    pub format: String,
    pub version: u32,
    pub latentloop_version: String,
    /// The git commit latentloop was built from ("unknown" outside a checkout).
    pub git_commit: String,
    /// UTC, RFC 3339, and the host monotonic clock read at the same moment: wall time of a
    /// record = created + (t_ns - created_monotonic_ns).
    pub created: String,
    pub created_monotonic_ns: u64,
    /// How to read every *_ns field.
    pub clock: String,
    pub config_path: String,
    pub config_text: String,
    pub source: String,
    pub bin_ms: f64,
    pub channels: usize,
    /// Behaviour values per bin the source carries (0: none).
    pub behavior_dims: usize,
    /// The model the session started with (None while a calibration block is recorded
    /// first; the decoder events name every model).
    pub model: Option<ModelRef>,
    /// The filter's noise seed and samples (XFADS), the Kalman mode, the backend.
    pub decoder: DecoderRef,
    /// What the config says about the experiment (for NWB).
    pub description: String,
    pub subject: Option<serde_json::Value>,
    /// experimenter, institution, session_id where the config gives them.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

pub const FORMAT_NAME: &str = "latentloop-session";

/// A model file in the session folder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelRef {
    /// File name inside the session folder.
    pub file: String,
    pub sha256: String,
    /// `AnyModel::describe`.
    pub describe: String,
    /// Where it was loaded from (or "calibration").
    pub origin: String,
}

/// How the decoders of the session were built from their models.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DecoderRef {
    pub seed: u64,
    pub samples: Option<usize>,
    /// "exact" or "steady".
    pub kalman_mode: String,
    /// "cpu" or "cuda".
    pub backend: String,
    /// Missing bins the decoder predicts through before it resets instead (the step's).
    pub max_predict_gap: u64,
}

/// The session folder's file names.
pub const HEADER_FILE: &str = "session.json";
pub const RECORDS_FILE: &str = "records.lls";

/// `model-K.safetensors`.
pub fn model_file_name(k: usize) -> String {
    format!("model-{k}.safetensors")
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The commit latentloop was built from (build.rs), "unknown" without git.
pub fn git_commit() -> &'static str {
    option_env!("LATENTLOOP_GIT_COMMIT").unwrap_or("unknown")
}

/// The frame CRC covers bytes 0..20 of the chunk header.
pub(crate) fn frame_crc(header: &[u8]) -> u32 {
    crc32fast::hash(&header[..20])
}
