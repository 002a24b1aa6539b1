//! The Open Ephys GUI's ZMQ Interface plugin (v1.0.0) on a SUB socket, binned by sample
//! number (never by arrival time). docs/OPENEPHYS.md is the user's guide; the message format
//! below was read from the plugin's source (Source/ZmqInterface.cpp), not its docs.
//!
//! Messages: 3 frames (2 for a TTL event without data): envelope `DATA\0` or `EVENT\0`, a
//! JSON header, and a payload (continuous: `num_samples` float32 LE of one channel; spike:
//! the waveform). Every kind carries `message_num`, which counts all messages and restarts
//! when acquisition starts: a gap is lost messages (PUB drops at its high-water mark), a
//! step back is a restarted acquisition.
//!
//! Bins: `spb = round(bin_ms / 1000 * sample_rate)` samples, bin `k` covering sample numbers
//! `[origin + k spb, origin + (k+1) spb)`; its sequence number is `k`, its source timestamp
//! the first sample number.
//!
//! - continuous mode: the first `noise_seconds` of each channel estimate its noise
//!   (sd = median|x| / 0.6745); `origin` is then the start of the first block after every
//!   channel's warm-up. Negative-going crossings of `-threshold * sd` (at most one per
//!   `refractory_ms`) are counted in the bin of the crossing sample. A bin is complete when
//!   every channel has delivered samples past its end. A channel that falls more than one
//!   block (the largest `num_samples` seen) plus [`STALE_BINS`] bins behind the furthest one
//!   no longer holds bins back: they are emitted without it and it is counted stale. A bin
//!   in which no channel delivered a single sample (lost data) is never emitted: the decoder
//!   sees the gap in sequence numbers.
//! - spikes mode: each spike event adds one to its electrode's channel in the bin of its
//!   `sample_num`. Time is the highest sample number seen on any message (a data block's
//!   last sample, a spike's or a TTL event's sample); a bin is emitted once time has passed
//!   one full bin beyond its end, which leaves a late spike event one bin to arrive.
//!
//! Per message, after the warm-up, nothing is allocated: frames are received into fixed
//! buffers, the JSON header is parsed into structs that borrow from it, and counts go into
//! preallocated rings (a ring of bins being filled and a queue of finished bins that
//! [`Source::next`] hands out one per call).

use super::{BinSlot, Counters, FixedText, Next, RejectLog, SlotKind, Source};
use crate::config::OpenEphysConfig;
use crate::pipeline::clock::monotonic_ns;
use serde::de::{Deserializer, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// First frame of a continuous-data message (NUL included, as the plugin sends it).
pub const DATA_ENVELOPE: &[u8] = b"DATA\0";
/// First frame of spike and TTL event messages.
pub const EVENT_ENVELOPE: &[u8] = b"EVENT\0";
/// Continuous mode: bins wait for a lagging channel until the furthest channel is this many
/// bins, plus one block, past their end.
pub const STALE_BINS: i64 = 2;
/// The smallest bin ring (it grows with the block size: see `Binner::ensure_capacity`).
const MIN_RING_BINS: usize = 64;
/// Receive buffers: a JSON header never comes near 64 KiB; 1 MiB of payload is a block of
/// 262,144 samples (the GUI's buffer is a few thousand at most).
const HEADER_BUF: usize = 64 * 1024;
const PAYLOAD_BUF: usize = 1 << 20;
/// Messages queued in the SUB socket before ZeroMQ drops (which shows as lost messages).
const RCVHWM: i32 = 100_000;
/// "No crossing yet": far enough in the past for any refractory period.
const NEVER: i64 = i64::MIN / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Threshold crossings detected in the continuous float32 blocks.
    Continuous,
    /// Spike events (the GUI's own detector) counted per electrode.
    Spikes,
}

/// What the binner needs from the config, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub channels: usize,
    pub bin_ms: f64,
    pub mode: Mode,
    pub stream: Option<String>,
    pub threshold: f32,
    pub noise_seconds: f32,
    pub refractory_ms: f32,
    pub electrodes: Vec<String>,
}

impl Settings {
    pub fn new(cfg: &OpenEphysConfig, channels: usize, bin_ms: f64) -> Result<Settings, String> {
        let mode = match cfg.mode.as_str() {
            "continuous" => Mode::Continuous,
            "spikes" => Mode::Spikes,
            m => return Err(format!("[source.openephys] mode = '{m}': expected 'continuous' or 'spikes'")),
        };
        if channels == 0 {
            return Err("channels must be at least 1".into());
        }
        if !(bin_ms.is_finite() && bin_ms > 0.0) {
            return Err(format!("bin_ms = {bin_ms} must be positive"));
        }
        if !(cfg.threshold.is_finite() && cfg.threshold > 0.0) {
            return Err(format!(
                "[source.openephys] threshold = {} must be a positive multiple of the sd",
                cfg.threshold
            ));
        }
        if mode == Mode::Continuous && !(cfg.noise_seconds.is_finite() && cfg.noise_seconds > 0.0) {
            return Err(format!("[source.openephys] noise_seconds = {} must be positive", cfg.noise_seconds));
        }
        if !(cfg.refractory_ms.is_finite() && cfg.refractory_ms >= 0.0) {
            return Err(format!("[source.openephys] refractory_ms = {} must be >= 0", cfg.refractory_ms));
        }
        if !cfg.electrodes.is_empty() {
            if mode != Mode::Spikes {
                return Err("[source.openephys] electrodes is for mode = 'spikes'".into());
            }
            if cfg.electrodes.len() != channels {
                return Err(format!(
                    "[source.openephys] electrodes names {} electrodes but channels = {channels}",
                    cfg.electrodes.len()
                ));
            }
            for (i, e) in cfg.electrodes.iter().enumerate() {
                if cfg.electrodes[..i].contains(e) {
                    return Err(format!("[source.openephys] electrode '{e}' is listed twice"));
                }
            }
        }
        Ok(Settings {
            channels,
            bin_ms,
            mode,
            stream: cfg.stream.clone(),
            threshold: cfg.threshold,
            noise_seconds: cfg.noise_seconds,
            refractory_ms: cfg.refractory_ms,
            electrodes: cfg.electrodes.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// The JSON header, borrowed from the received frame.

/// A JSON string: borrowed from the message, owned only when it contains escapes (a plain
/// `&str` field would refuse those).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(V).map(Text)
    }
}

/// Fields the decoder uses; the rest (timestamp, channel_name, source_node, sorted_id,
/// threshold, ...) are skipped without being stored.
#[derive(Deserialize)]
struct Header<'a> {
    message_num: u64,
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    #[serde(default, borrow)]
    content: Option<Content<'a>>,
    #[serde(default, borrow)]
    spike: Option<SpikeInfo<'a>>,
    #[serde(default)]
    data_size: Option<i64>,
}

/// `content` of a data message (channel_num, num_samples, sample_num, sample_rate) or of a
/// TTL event (sample_num).
#[derive(Deserialize)]
struct Content<'a> {
    #[serde(default, borrow)]
    stream: Option<Text<'a>>,
    #[serde(default)]
    channel_num: Option<i64>,
    #[serde(default)]
    num_samples: Option<i64>,
    #[serde(default)]
    sample_num: Option<i64>,
    #[serde(default)]
    sample_rate: Option<f64>,
}

#[derive(Deserialize)]
struct SpikeInfo<'a> {
    #[serde(default, borrow)]
    stream: Option<Text<'a>>,
    #[serde(default, borrow)]
    electrode: Option<Text<'a>>,
    #[serde(default)]
    sample_num: Option<i64>,
    #[serde(default)]
    num_channels: Option<i64>,
    #[serde(default)]
    num_samples: Option<i64>,
}

/// One received message: its first three frames and how many it had.
#[derive(Clone, Copy, Debug)]
pub struct Frames<'a> {
    pub envelope: &'a [u8],
    pub header: &'a [u8],
    pub payload: &'a [u8],
    /// Frames the message had (only the first three are kept).
    pub count: usize,
    /// A frame was longer than its receive buffer and was cut.
    pub truncated: bool,
}

impl<'a> Frames<'a> {
    /// A message from its parts (tests and tools).
    pub fn from_parts(parts: &'a [Vec<u8>]) -> Frames<'a> {
        let get = |i: usize| parts.get(i).map_or(&[][..], |p| &p[..]);
        Frames { envelope: get(0), header: get(1), payload: get(2), count: parts.len(), truncated: false }
    }
}

/// A continuous-data message as the plugin sends it (tests and tools; allocates).
pub fn data_message(
    message_num: u64,
    stream: &str,
    channel: usize,
    sample_num: i64,
    sample_rate: f64,
    samples: &[f32],
) -> Vec<Vec<u8>> {
    let json = serde_json::json!({
        "message_num": message_num,
        "type": "data",
        "content": {
            "stream": stream,
            "channel_num": channel,
            "channel_name": format!("CH{}", channel + 1),
            "num_samples": samples.len(),
            "sample_num": sample_num,
            "sample_rate": sample_rate,
        },
        "data_size": samples.len() * 4,
        "timestamp": 1_700_000_000_000u64,
    });
    let payload = samples.iter().flat_map(|v| v.to_le_bytes()).collect();
    vec![DATA_ENVELOPE.to_vec(), serde_json::to_vec_pretty(&json).expect("json"), payload]
}

/// A spike event as the plugin sends it (tests and tools; the waveform is zeros).
pub fn spike_message(
    message_num: u64,
    stream: &str,
    electrode: &str,
    sample_num: i64,
    num_channels: usize,
    num_samples: usize,
) -> Vec<Vec<u8>> {
    let json = serde_json::json!({
        "message_num": message_num,
        "type": "spike",
        "spike": {
            "stream": stream,
            "source_node": 104,
            "electrode": electrode,
            "sample_num": sample_num,
            "num_channels": num_channels,
            "num_samples": num_samples,
            "sorted_id": 0,
            "threshold": vec![-50.0; num_channels],
        },
        "timestamp": 1_700_000_000_000u64,
    });
    let waveform = vec![0u8; 4 * num_channels * num_samples];
    vec![EVENT_ENVELOPE.to_vec(), serde_json::to_vec_pretty(&json).expect("json"), waveform]
}

/// A TTL event as the plugin sends it: 10 bytes of data (line, state, u64 word at 2).
pub fn ttl_message(message_num: u64, stream: &str, sample_num: i64, line: u8, on: bool) -> Vec<Vec<u8>> {
    let json = serde_json::json!({
        "message_num": message_num,
        "type": "event",
        "content": { "stream": stream, "source_node": 100, "type": 3, "sample_num": sample_num },
        "data_size": 10,
        "timestamp": 1_700_000_000_000u64,
    });
    let mut data = vec![line, on as u8];
    data.extend_from_slice(&(if on { 1u64 << line } else { 0 }).to_le_bytes());
    vec![EVENT_ENVELOPE.to_vec(), serde_json::to_vec_pretty(&json).expect("json"), data]
}

// ---------------------------------------------------------------------------------------
// Noise and crossings.

/// The robust noise sd of a channel: median(|x|) / 0.6745 (Quiroga et al. 2004). Reorders
/// `x` (in place, no allocation).
pub fn robust_sd(x: &mut [f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    for v in x.iter_mut() {
        *v = v.abs();
    }
    let n = x.len();
    let (below, mid, _) = x.select_nth_unstable_by(n / 2, f32::total_cmp);
    let mid = *mid;
    let median = if n % 2 == 1 { mid } else { (below.iter().copied().fold(f32::MIN, f32::max) + mid) / 2.0 };
    median / 0.6745
}

/// One channel's detector (continuous mode).
struct Chan {
    /// The sample number after the last one delivered.
    next: Option<i64>,
    prev: f32,
    have_prev: bool,
    /// Sample number of the last counted crossing.
    last_cross: i64,
    /// Warm-up samples (capacity = the warm-up length; freed once estimated).
    noise: Vec<f32>,
    sd: Option<f32>,
    /// -threshold * sd.
    level: f32,
}

impl Chan {
    fn new() -> Chan {
        Chan { next: None, prev: 0.0, have_prev: false, last_cross: NEVER, noise: Vec::new(), sd: None, level: 0.0 }
    }

    /// Runs the detector over float32 LE samples whose first is sample number `t0`; returns
    /// the crossings. Samples go to the noise estimate while it is not made yet.
    fn process(&mut self, bytes: &[u8], t0: i64, refractory: i64, noise_len: usize, threshold: f32) -> u32 {
        let mut k = 0;
        for (i, b) in bytes.chunks_exact(4).enumerate() {
            let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if self.sd.is_some() {
                let t = t0 + i as i64;
                if self.have_prev && self.prev >= self.level && x < self.level && t - self.last_cross >= refractory {
                    self.last_cross = t;
                    k += 1;
                }
            } else {
                self.noise.push(x);
                if self.noise.len() >= noise_len {
                    let sd = robust_sd(&mut self.noise);
                    self.sd = Some(sd);
                    self.level = -threshold * sd;
                    self.noise = Vec::new();
                }
            }
            self.prev = x;
            self.have_prev = true;
        }
        k
    }
}

// ---------------------------------------------------------------------------------------
// Rings.

/// Bins being filled: `cap` rows of `n` counts, bin `b` in row `b % cap`.
struct Ring {
    cap: usize,
    n: usize,
    counts: Vec<f32>,
    /// Samples (continuous) or events (spikes) that went into each row.
    filled: Vec<u64>,
}

impl Ring {
    fn row(&self, b: u64) -> usize {
        (b as usize) & (self.cap - 1)
    }
    fn clear(&mut self) {
        self.counts.fill(0.0);
        self.filled.fill(0);
    }
    /// Grows to `cap` rows (a power of two), keeping the rows of bins `lo..lo + old cap`.
    fn grow(&mut self, cap: usize, lo: u64) {
        let mut counts = vec![0.0; cap * self.n];
        let mut filled = vec![0; cap];
        for b in lo..lo + self.cap as u64 {
            let (from, to) = (self.row(b), (b as usize) & (cap - 1));
            counts[to * self.n..(to + 1) * self.n].copy_from_slice(&self.counts[from * self.n..(from + 1) * self.n]);
            filled[to] = self.filled[from];
        }
        (self.cap, self.counts, self.filled) = (cap, counts, filled);
    }
}

#[derive(Clone, Copy, Default)]
struct Meta {
    seq: u64,
    source_ts: u64,
    recv_ns: u64,
    restart: bool,
}

/// Finished bins waiting for [`Source::next`], oldest first.
struct Ready {
    cap: usize,
    n: usize,
    counts: Vec<f32>,
    meta: Vec<Meta>,
    head: usize,
    len: usize,
}

impl Ready {
    fn push(&mut self, counts: &[f32], meta: Meta) -> bool {
        if self.len == self.cap {
            return false;
        }
        let i = (self.head + self.len) % self.cap;
        self.counts[i * self.n..(i + 1) * self.n].copy_from_slice(counts);
        self.meta[i] = meta;
        self.len += 1;
        true
    }
    fn pop(&mut self, slot: &mut BinSlot) -> bool {
        if self.len == 0 {
            return false;
        }
        let i = self.head;
        let m = self.meta[i];
        let k = slot.counts.len().min(self.n);
        slot.counts[..k].copy_from_slice(&self.counts[i * self.n..i * self.n + k]);
        slot.seq = m.seq;
        slot.source_ts = m.source_ts;
        slot.recv_ns = m.recv_ns;
        slot.kind = SlotKind::Data;
        slot.restart = m.restart;
        slot.wire_flags = if m.restart { crate::wire::bin::FLAG_STREAM_START } else { 0 };
        slot.has_behavior = false;
        self.head = (self.head + 1) % self.cap;
        self.len -= 1;
        true
    }
    fn grow(&mut self, cap: usize) {
        let mut counts = vec![0.0; cap * self.n];
        let mut meta = vec![Meta::default(); cap];
        for j in 0..self.len {
            let i = (self.head + j) % self.cap;
            counts[j * self.n..(j + 1) * self.n].copy_from_slice(&self.counts[i * self.n..(i + 1) * self.n]);
            meta[j] = self.meta[i];
        }
        (self.cap, self.counts, self.meta, self.head) = (cap, counts, meta, 0);
    }
}

// ---------------------------------------------------------------------------------------
// The binner: messages in, bins out. No socket (the source below owns that), so it can be
// tested message by message.

/// What the source saw, beyond the shared [`Counters`].
#[derive(Clone, Debug, Default)]
pub struct OpenEphysStats {
    pub messages: u64,
    pub data_messages: u64,
    pub spike_messages: u64,
    pub ttl_messages: u64,
    /// Messages of another type (the plugin sends none today).
    pub other_messages: u64,
    /// Continuous messages for channel_num >= channels (ignored).
    pub ignored_channel: u64,
    /// Messages of another stream than the configured one (ignored).
    pub ignored_stream: u64,
    /// Spikes of electrodes not in the list (or beyond `channels` of them).
    pub ignored_electrode: u64,
    /// Spikes that came before the first data message gave the sample rate and origin.
    pub before_origin: u64,
    /// Crossings or spikes whose bin had already been emitted.
    pub late: u64,
    /// Blocks that started after the sample their channel was expected at.
    pub gaps: u64,
    /// Blocks whose samples had all been delivered already.
    pub repeated: u64,
    /// Acquisition restarts (message_num stepped back).
    pub restarts: u64,
    /// Upstream messages lost (message_num gaps); also in `Counters::lost_messages`.
    pub lost_messages: u64,
    pub bins: u64,
    /// Bins emitted without every channel (stale channels).
    pub forced_bins: u64,
    /// Per channel: bins emitted without it.
    pub stale: Vec<u64>,
    /// Bins no data arrived for (continuous) or that a time jump passed over (spikes): not
    /// emitted, so the decoder sees them missing.
    pub skipped_bins: u64,
    /// Finished bins dropped because the queue was full (cannot happen when bins are taken
    /// after each message, as `next` does).
    pub dropped: u64,
    /// Times the bin rings grew for a longer block than any before (allocates).
    pub grown: u64,
}

/// Warnings printed once each.
#[derive(Default)]
struct Once(u64);

impl Once {
    fn warn(&mut self, log: &RejectLog, bit: u32, msg: impl FnOnce(&mut FixedText) -> std::fmt::Result) {
        if self.0 & (1 << bit) == 0 {
            self.0 |= 1 << bit;
            log.warn(|r| {
                r.write_str("openephys: ")?;
                msg(r)
            });
        }
    }
}

const W_CHANNEL: u32 = 0;
const W_STREAM: u32 = 1;
const W_ELECTRODE: u32 = 2;
const W_BIN_WIDTH: u32 = 3;
const W_WARMUP: u32 = 4;
const W_FLAT: u32 = 5;
const W_GROWN: u32 = 6;
const W_STALE: u32 = 7;
const W_LATE: u32 = 8;

pub struct Binner {
    set: Settings,
    n: usize,
    counters: Arc<Counters>,
    log: RejectLog,
    stats: OpenEphysStats,
    warned: Once,
    sample_rate: Option<f64>,
    spb: i64,
    refractory: i64,
    noise_len: usize,
    /// The longest block seen (samples).
    max_block: i64,
    last_message: Option<u64>,
    /// Sample number of bin 0's first sample, once binning has started.
    origin: Option<i64>,
    /// Continuous: the warm-up is over; the first block starting at or after this sample
    /// number sets the origin.
    align_after: Option<i64>,
    /// Continuous: first sample of the warm-up (its deadline counts from it).
    warm_first: Option<i64>,
    /// Spikes: the highest sample number seen since the origin.
    t_max: i64,
    chans: Vec<Chan>,
    /// Spikes: electrode names in channel order.
    names: Vec<String>,
    pending: Ring,
    /// First bin not yet finished.
    lo: u64,
    ready: Ready,
    restart_next: bool,
}

impl Binner {
    pub fn new(set: Settings, counters: Arc<Counters>, log: RejectLog) -> Binner {
        let n = set.channels;
        let names = set.electrodes.clone();
        Binner {
            n,
            counters,
            log,
            stats: OpenEphysStats { stale: vec![0; n], ..Default::default() },
            warned: Once::default(),
            sample_rate: None,
            spb: 0,
            refractory: 0,
            noise_len: 1,
            max_block: 0,
            last_message: None,
            origin: None,
            align_after: None,
            warm_first: None,
            t_max: i64::MIN,
            chans: (0..n).map(|_| Chan::new()).collect(),
            names,
            pending: Ring { cap: 0, n, counts: Vec::new(), filled: Vec::new() },
            lo: 0,
            ready: Ready { cap: 0, n, counts: Vec::new(), meta: Vec::new(), head: 0, len: 0 },
            restart_next: false,
            set,
        }
    }

    pub fn channels(&self) -> usize {
        self.n
    }
    pub fn stats(&self) -> &OpenEphysStats {
        &self.stats
    }
    /// Samples per bin (0 before the first data message).
    pub fn samples_per_bin(&self) -> i64 {
        self.spb
    }
    pub fn origin(&self) -> Option<i64> {
        self.origin
    }
    /// A channel's noise sd (continuous mode), once estimated.
    pub fn noise_sd(&self, channel: usize) -> Option<f32> {
        self.chans.get(channel).and_then(|c| c.sd)
    }
    /// Finished bins waiting.
    pub fn ready(&self) -> usize {
        self.ready.len
    }

    /// Hands out the oldest finished bin.
    pub fn pop(&mut self, slot: &mut BinSlot) -> bool {
        self.ready.pop(slot)
    }

    fn reject(&self, reason: impl FnOnce(&mut FixedText) -> std::fmt::Result) {
        self.log.reject(&self.counters, |r| {
            r.write_str("Open Ephys ")?;
            reason(r)
        });
    }

    /// One message; `now_ns` is when it was received (the receive time of the bins it
    /// finishes).
    pub fn handle(&mut self, m: &Frames, now_ns: u64) {
        self.stats.messages += 1;
        let data = m.envelope == DATA_ENVELOPE;
        if !data && m.envelope != EVENT_ENVELOPE {
            let env = m.envelope;
            self.reject(|r| {
                write!(r, "message refused: envelope {:?} (expected \"DATA\\0\" or \"EVENT\\0\")", Lossy(env))
            });
            return;
        }
        if m.count < 2 {
            self.reject(|r| {
                write!(r, "message refused: {} frame(s), expected envelope, JSON header, payload", m.count)
            });
            return;
        }
        let json = trim_nul(m.header);
        let h: Header = match serde_json::from_slice(json) {
            Ok(h) => h,
            Err(e) => {
                self.reject(|r| write!(r, "message refused: bad JSON header ({e}): {:?}", Lossy(json)));
                return;
            }
        };
        let num = h.message_num;
        self.account(num);
        if m.count > 3 {
            self.reject(|r| write!(r, "message {num} refused: {} frames, at most 3 expected", m.count));
            return;
        }
        if m.truncated {
            self.reject(|r| write!(r, "message {num} refused: a frame is longer than the receive buffer"));
            return;
        }
        match (data, &*h.kind.0) {
            (true, "data") => self.data_message(&h, m, now_ns),
            (false, "spike") => self.spike_message(&h, m, now_ns),
            (false, "event") => self.ttl_message(&h, m, now_ns),
            (true, k) => self.reject(|r| write!(r, "message {num} refused: DATA envelope with type '{k}'")),
            (false, _) => self.stats.other_messages += 1,
        }
    }

    /// message_num: gaps are lost messages; a step back is a restarted acquisition.
    fn account(&mut self, num: u64) {
        match self.last_message {
            None => {} // messages before the subscription are not lost ones
            Some(last) if num > last => self.lost(num - last - 1),
            Some(_) => {
                self.restart();
                // The new acquisition's messages start at 1.
                self.lost(num.saturating_sub(1));
            }
        }
        self.last_message = Some(num);
    }

    fn lost(&mut self, k: u64) {
        if k > 0 {
            self.stats.lost_messages += k;
            Counters::add(&self.counters.lost_messages, k);
        }
    }

    /// Acquisition restarted: sample numbers start over. Bins restart from a new origin
    /// (the noise estimates are kept); the half-filled bins of the old run are dropped.
    fn restart(&mut self) {
        self.stats.restarts += 1;
        self.origin = None;
        self.lo = 0;
        self.pending.clear();
        let warmed = self.chans.iter().all(|c| c.sd.is_some());
        self.align_after = if warmed { Some(i64::MIN) } else { None };
        self.warm_first = None;
        self.t_max = i64::MIN;
        for c in &mut self.chans {
            c.next = None;
            c.have_prev = false;
            c.last_cross = NEVER;
        }
        self.restart_next = true;
    }

    fn data_message(&mut self, h: &Header, m: &Frames, now: u64) {
        let num = h.message_num;
        let Some(ct) = &h.content else {
            return self.reject(|r| write!(r, "data message {num} refused: no 'content'"));
        };
        let missing = [
            ("channel_num", ct.channel_num.is_none()),
            ("num_samples", ct.num_samples.is_none()),
            ("sample_num", ct.sample_num.is_none()),
            ("sample_rate", ct.sample_rate.is_none()),
        ];
        if let Some((f, _)) = missing.iter().find(|(_, absent)| *absent) {
            return self.reject(|r| write!(r, "data message {num} refused: no content.{f}"));
        }
        let (ch, ns, s, sr) = (
            ct.channel_num.unwrap_or(0),
            ct.num_samples.unwrap_or(0),
            ct.sample_num.unwrap_or(0),
            ct.sample_rate.unwrap_or(0.0),
        );
        let Some(ds) = h.data_size else {
            return self.reject(|r| write!(r, "data message {num} refused: no data_size"));
        };
        if m.count != 3 {
            return self.reject(|r| write!(r, "data message {num} refused: {} frames, expected 3", m.count));
        }
        if ch < 0 || ns < 0 || s < 0 {
            return self.reject(|r| {
                write!(r, "data message {num} refused: channel_num {ch}, num_samples {ns}, sample_num {s}")
            });
        }
        if ds != ns * 4 {
            return self.reject(|r| write!(r, "data message {num} refused: data_size {ds} != num_samples {ns} x 4"));
        }
        let len = m.payload.len();
        if len as i64 != ds {
            return self.reject(|r| write!(r, "data message {num} refused: payload of {len} bytes, data_size {ds}"));
        }
        if !(sr.is_finite() && sr > 0.0) {
            return self.reject(|r| write!(r, "data message {num} refused: sample_rate {sr}"));
        }
        if !self.stream_ok(ct.stream.as_ref()) {
            return;
        }
        let ch = ch as usize;
        let continuous = self.set.mode == Mode::Continuous;
        if continuous && ch >= self.n {
            self.stats.ignored_channel += 1;
            let n = self.n;
            self.warned.warn(&self.log, W_CHANNEL, |r| {
                write!(
                    r,
                    "ignoring continuous channel {ch} (and any other channel >= {n}): channels = {n} uses channel_num 0..{}; \
                     select the first {n} channels in the plugin",
                    n - 1
                )
            });
            return;
        }
        if continuous {
            let finite = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite();
            if let Some(i) = m.payload.chunks_exact(4).position(|b| !finite(b)) {
                return self.reject(|r| {
                    write!(
                        r,
                        "data message {num} refused: channel {ch} sample {i} (sample_num {}) is not finite",
                        s + i as i64
                    )
                });
            }
        }
        match self.sample_rate {
            Some(rate) if rate != sr => {
                return self.reject(|r| {
                    write!(
                        r,
                        "data message {num} refused: sample_rate {sr} Hz, but the run started at {rate} Hz \
                         (restart latentloop after changing the rate)"
                    )
                });
            }
            Some(_) => {}
            None => {
                if !self.set_sample_rate(sr) {
                    let bin_ms = self.set.bin_ms;
                    return self.reject(|r| {
                        write!(r, "data message {num} refused: bin_ms = {bin_ms} is under one sample at {sr} Hz")
                    });
                }
            }
        }
        self.stats.data_messages += 1;
        if ns == 0 {
            return;
        }
        if ns > self.max_block {
            self.max_block = ns;
            if self.origin.is_some() {
                self.ensure_capacity();
            }
        }
        match self.set.mode {
            Mode::Spikes => {
                // Only time: the samples are not looked at.
                if self.origin.is_none() {
                    self.start_binning(s);
                }
                self.t_max = self.t_max.max(s + ns - 1);
                self.advance_spikes(now);
            }
            Mode::Continuous => self.continuous(ch, s, m.payload, now),
        }
    }

    fn stream_ok(&mut self, stream: Option<&Text>) -> bool {
        let Some(want) = &self.set.stream else { return true };
        if stream.is_some_and(|s| s.0 == *want) {
            return true;
        }
        self.stats.ignored_stream += 1;
        self.warned.warn(&self.log, W_STREAM, |r| {
            let got = stream.map_or("(none)", |s| &*s.0);
            write!(r, "ignoring messages of stream '{got}' (stream = '{want}')")
        });
        false
    }

    fn set_sample_rate(&mut self, sr: f64) -> bool {
        let exact = self.set.bin_ms / 1000.0 * sr;
        let spb = exact.round();
        if spb < 1.0 {
            return false;
        }
        self.sample_rate = Some(sr);
        self.spb = spb as i64;
        self.refractory = (self.set.refractory_ms as f64 / 1000.0 * sr).round() as i64;
        self.noise_len = ((self.set.noise_seconds as f64 * sr).round() as usize).max(1);
        if (spb - exact).abs() > 1e-6 * exact {
            let (ms, bin_ms) = (spb / sr * 1000.0, self.set.bin_ms);
            self.warned.warn(&self.log, W_BIN_WIDTH, |r| {
                write!(r, "bin_ms = {bin_ms} is not a whole number of samples at {sr} Hz: bins are {spb} samples ({ms:.4} ms)")
            });
        }
        if self.set.mode == Mode::Continuous {
            for c in &mut self.chans {
                if c.sd.is_none() {
                    c.noise.reserve_exact(self.noise_len);
                }
            }
        }
        true
    }

    /// Bins start at sample number `origin`.
    fn start_binning(&mut self, origin: i64) {
        self.origin = Some(origin);
        self.lo = 0;
        self.t_max = origin - 1;
        self.ensure_capacity();
    }

    /// Rings large enough for the longest block seen: the bins a channel may run ahead by
    /// (a block and the stale margin) plus the block being processed, twice over.
    fn ensure_capacity(&mut self) {
        let block_bins = ((self.max_block + self.spb - 1) / self.spb.max(1)).max(1) as usize;
        let cap = (4 * block_bins + 4 * STALE_BINS as usize + 16).next_power_of_two().max(MIN_RING_BINS);
        if cap <= self.pending.cap {
            return;
        }
        if self.pending.cap > 0 {
            self.stats.grown += 1;
            let mb = self.max_block;
            self.warned
                .warn(&self.log, W_GROWN, |r| write!(r, "a block of {mb} samples: bin rings grown to {cap} bins"));
        }
        self.pending.grow(cap, self.lo);
        self.ready.grow(2 * cap);
    }

    fn continuous(&mut self, c: usize, s: i64, payload: &[u8], now: u64) {
        let end = s + (payload.len() / 4) as i64;
        let mut from = s;
        {
            let ch = &mut self.chans[c];
            match ch.next {
                Some(nx) if end <= nx => {
                    self.stats.repeated += 1;
                    return;
                }
                Some(nx) if s < nx => from = nx, // the part already seen is skipped
                Some(nx) if s > nx => {
                    ch.have_prev = false;
                    self.stats.gaps += 1;
                }
                Some(_) => {}
                None => ch.have_prev = false,
            }
        }
        if self.origin.is_none() {
            self.warm_first.get_or_insert(from);
            if self.align_after.is_some_and(|a| from >= a) {
                self.start_binning(from);
            }
        }
        if let Some(o) = self.origin {
            if end > o {
                self.make_room(((end - 1 - o) / self.spb) as u64, now);
            }
        }
        let (refr, noise_len, thr, spb) = (self.refractory, self.noise_len, self.set.threshold, self.spb);
        let mut t = from;
        while t < end {
            let (seg_end, row) = match self.origin {
                Some(o) if t >= o => {
                    let b = ((t - o) / spb) as u64;
                    (end.min(o + (b as i64 + 1) * spb), (b >= self.lo).then(|| self.pending.row(b)))
                }
                Some(o) => (end.min(o), None),
                None => (end, None),
            };
            let bytes = &payload[((t - s) * 4) as usize..((seg_end - s) * 4) as usize];
            let ch = &mut self.chans[c];
            let had_sd = ch.sd.is_some();
            let k = ch.process(bytes, t, refr, noise_len, thr);
            if !had_sd && ch.sd == Some(0.0) {
                self.warned
                    .warn(&self.log, W_FLAT, |r| write!(r, "channel {c} is flat during the warm-up (noise sd 0)"));
            }
            match row {
                Some(r) => {
                    self.pending.counts[r * self.n + c] += k as f32;
                    self.pending.filled[r] += (seg_end - t) as u64;
                }
                None if k > 0 && self.origin.is_some_and(|o| t >= o) => {
                    self.stats.late += k as u64;
                    self.warned.warn(&self.log, W_LATE, |r| {
                        write!(r, "channel {c}: crossings arrived for a bin already emitted")
                    });
                }
                None => {}
            }
            t = seg_end;
        }
        let ch = &mut self.chans[c];
        ch.next = Some(ch.next.map_or(end, |nx| nx.max(end)));
        if self.origin.is_none() {
            self.check_warmup();
        } else {
            self.advance_continuous(now);
        }
    }

    /// The warm-up is over when every channel has its noise estimate, or when the stream has
    /// run twice the warm-up (a channel that never delivers must not hold the run back).
    fn check_warmup(&mut self) {
        if self.align_after.is_some() {
            return;
        }
        let lead = self.chans.iter().filter_map(|c| c.next).max().unwrap_or(i64::MIN);
        let all = self.chans.iter().all(|c| c.sd.is_some());
        let deadline = self.warm_first.map_or(i64::MAX, |f| f.saturating_add(2 * self.noise_len as i64));
        if all || lead >= deadline {
            if !all {
                let missing = self.chans.iter().filter(|c| c.sd.is_none()).count();
                self.warned.warn(&self.log, W_WARMUP, |r| {
                    write!(r, "{missing} channel(s) have no noise estimate after twice the warm-up: counting starts without them")
                });
            }
            self.align_after = Some(lead);
        }
    }

    /// Makes sure bin `b_last` fits in the ring: older bins are finished first (normally
    /// nothing to do; after a jump in sample numbers the bins in between are skipped).
    fn make_room(&mut self, b_last: u64, now: u64) {
        let cap = self.pending.cap as u64;
        if b_last < self.lo + cap {
            return;
        }
        let need = b_last + 1 - cap;
        for _ in 0..(need - self.lo).min(cap) {
            self.retire(now);
        }
        if self.lo < need {
            self.stats.skipped_bins += need - self.lo;
            self.lo = need;
        }
    }

    /// Finishes every bin all channels have delivered, and those a stale channel holds back.
    fn advance_continuous(&mut self, now: u64) {
        let Some(o) = self.origin else { return };
        let (mut min_end, mut lead) = (i64::MAX, i64::MIN);
        for c in &self.chans {
            let e = c.next.unwrap_or(i64::MIN);
            min_end = min_end.min(e);
            lead = lead.max(e);
        }
        let stale = self.max_block + STALE_BINS * self.spb;
        for _ in 0..self.pending.cap {
            let end = o + (self.lo as i64 + 1) * self.spb;
            if min_end >= end || lead >= end.saturating_add(stale) {
                self.retire(now);
            } else {
                break;
            }
        }
    }

    /// Finishes every bin that time has passed by more than one bin.
    fn advance_spikes(&mut self, now: u64) {
        let Some(o) = self.origin else { return };
        let x = self.t_max.saturating_add(1) - o;
        if x < 2 * self.spb {
            return;
        }
        let due = (x / self.spb - 1) as u64;
        if due <= self.lo {
            return;
        }
        for _ in 0..(due - self.lo).min(self.pending.cap as u64) {
            self.retire(now);
        }
        if self.lo < due {
            self.stats.skipped_bins += due - self.lo;
            self.lo = due;
        }
    }

    /// Bin `lo` is finished: into the ready queue (unless no data went into it).
    fn retire(&mut self, now: u64) {
        let (b, o, n) = (self.lo, self.origin.unwrap_or(0), self.n);
        let r = self.pending.row(b);
        let end = o + (b as i64 + 1) * self.spb;
        let continuous = self.set.mode == Mode::Continuous;
        if continuous && self.pending.filled[r] == 0 {
            self.stats.skipped_bins += 1;
        } else {
            if continuous {
                let mut forced = false;
                for (c, ch) in self.chans.iter().enumerate() {
                    if ch.next.unwrap_or(i64::MIN) < end {
                        forced = true;
                        self.stats.stale[c] += 1;
                        self.warned.warn(&self.log, W_STALE, |r| {
                            write!(
                                r,
                                "channel {c} is behind the others: bins are emitted without it (counted as stale)"
                            )
                        });
                    }
                }
                self.stats.forced_bins += forced as u64;
            }
            let meta =
                Meta { seq: b, source_ts: (o + b as i64 * self.spb) as u64, recv_ns: now, restart: self.restart_next };
            if self.ready.push(&self.pending.counts[r * n..(r + 1) * n], meta) {
                self.stats.bins += 1;
                self.restart_next = false;
            } else {
                self.stats.dropped += 1;
            }
        }
        self.pending.counts[r * n..(r + 1) * n].fill(0.0);
        self.pending.filled[r] = 0;
        self.lo += 1;
    }

    fn spike_message(&mut self, h: &Header, m: &Frames, now: u64) {
        self.stats.spike_messages += 1;
        if self.set.mode != Mode::Spikes {
            return;
        }
        let num = h.message_num;
        let Some(sp) = &h.spike else {
            return self.reject(|r| write!(r, "spike message {num} refused: no 'spike' object"));
        };
        let (Some(e), Some(s), Some(nc), Some(ns)) = (&sp.electrode, sp.sample_num, sp.num_channels, sp.num_samples)
        else {
            return self.reject(|r| {
                write!(r, "spike message {num} refused: spike.electrode, sample_num, num_channels and num_samples are required")
            });
        };
        if m.count != 3 {
            return self.reject(|r| write!(r, "spike message {num} refused: {} frames, expected 3", m.count));
        }
        if s < 0 || nc < 0 || ns < 0 {
            return self.reject(|r| {
                write!(r, "spike message {num} refused: sample_num {s}, num_channels {nc}, num_samples {ns}")
            });
        }
        let len = m.payload.len();
        if len as i64 != nc * ns * 4 {
            return self.reject(|r| {
                write!(r, "spike message {num} refused: waveform of {len} bytes, expected num_channels {nc} x num_samples {ns} x 4")
            });
        }
        if !self.stream_ok(sp.stream.as_ref()) {
            return;
        }
        let Some(c) = self.electrode(&e.0) else {
            self.stats.ignored_electrode += 1;
            let n = self.n;
            self.warned.warn(&self.log, W_ELECTRODE, |r| {
                let name = &e.0;
                write!(r, "ignoring spikes of electrode '{name}': not in the electrodes list (or more than channels = {n} electrodes)")
            });
            return;
        };
        let Some(o) = self.origin else {
            self.stats.before_origin += 1;
            return;
        };
        self.t_max = self.t_max.max(s);
        self.advance_spikes(now);
        let b = if s >= o { ((s - o) / self.spb) as u64 } else { 0 };
        if s < o || b < self.lo || b >= self.lo + self.pending.cap as u64 {
            self.stats.late += 1;
            self.warned
                .warn(&self.log, W_LATE, |r| write!(r, "a spike of electrode {c} arrived for a bin already emitted"));
            return;
        }
        let r = self.pending.row(b);
        self.pending.counts[r * self.n + c] += 1.0;
        self.pending.filled[r] += 1;
    }

    /// Electrode name -> channel: the configured list, else order of first appearance.
    fn electrode(&mut self, name: &str) -> Option<usize> {
        if let Some(i) = self.names.iter().position(|x| x == name) {
            return Some(i);
        }
        if self.set.electrodes.is_empty() && self.names.len() < self.n {
            self.names.push(name.to_owned());
            return Some(self.names.len() - 1);
        }
        None
    }

    fn ttl_message(&mut self, h: &Header, m: &Frames, now: u64) {
        self.stats.ttl_messages += 1;
        if self.set.mode != Mode::Spikes {
            return;
        }
        let num = h.message_num;
        let ds = h.data_size.unwrap_or(0);
        let (want_frames, len) = (if ds > 0 { 3 } else { 2 }, m.payload.len());
        if m.count != want_frames || (ds > 0 && len as i64 != ds) {
            return self.reject(|r| {
                write!(r, "event message {num} refused: {} frames ({len} bytes of data), data_size {ds}", m.count)
            });
        }
        let Some(ct) = &h.content else { return };
        if !self.stream_ok(ct.stream.as_ref()) {
            return;
        }
        if let (Some(s), Some(_)) = (ct.sample_num, self.origin) {
            self.t_max = self.t_max.max(s);
            self.advance_spikes(now);
        }
    }

    /// A line for the end of a run: what did not go as it should.
    pub fn summary(&self) -> Option<String> {
        let s = &self.stats;
        let stale: Vec<String> =
            s.stale.iter().enumerate().filter(|(_, k)| **k > 0).map(|(c, k)| format!("{c}: {k}")).collect();
        let parts = [
            (s.lost_messages, "messages lost (message_num gaps)"),
            (s.forced_bins, "bins emitted without a stale channel"),
            (s.skipped_bins, "bins skipped (no data)"),
            (s.late, "crossings/spikes too late for their bin"),
            (s.ignored_channel, "messages of channels beyond `channels`"),
            (s.ignored_stream, "messages of another stream"),
            (s.ignored_electrode, "spikes of unknown electrodes"),
            (s.gaps, "blocks after a gap in sample numbers"),
            (s.restarts, "acquisition restarts"),
            (s.dropped, "bins dropped (queue full)"),
        ];
        let mut line: Vec<String> =
            parts.iter().filter(|(k, _)| *k > 0).map(|(k, what)| format!("{k} {what}")).collect();
        if !stale.is_empty() {
            line.push(format!("stale bins per channel {{{}}}", stale.join(", ")));
        }
        (!line.is_empty()).then(|| format!("openephys: {} bins; {}", s.bins, line.join("; ")))
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let mut b = b;
    while let [rest @ .., 0] = b {
        b = rest;
    }
    b
}

/// Bytes shown as text in a log line (first 200).
struct Lossy<'a>(&'a [u8]);

impl std::fmt::Debug for Lossy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let b = &self.0[..self.0.len().min(200)];
        write!(f, "{:?}", String::from_utf8_lossy(b))
    }
}

// ---------------------------------------------------------------------------------------
// The source.

pub struct OpenEphysSource {
    sock: zmq::Socket,
    envelope: [u8; 16],
    header: Vec<u8>,
    payload: Vec<u8>,
    binner: Binner,
    /// Print the end-of-run summary when dropped.
    report: bool,
}

impl OpenEphysSource {
    /// A SUB socket connected to the GUI's data socket (ZeroMQ reconnects until it is up).
    pub fn connect(
        ctx: &zmq::Context,
        endpoint: &str,
        set: Settings,
        counters: Arc<Counters>,
        log: RejectLog,
    ) -> Result<OpenEphysSource, String> {
        let sock = ctx.socket(zmq::SUB).map_err(|e| e.to_string())?;
        // Everything: the event messages carry message_num too.
        sock.set_subscribe(b"").map_err(|e| e.to_string())?;
        sock.set_rcvhwm(RCVHWM).map_err(|e| e.to_string())?;
        sock.set_linger(0).map_err(|e| e.to_string())?;
        sock.connect(endpoint).map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
        Ok(OpenEphysSource {
            sock,
            envelope: [0; 16],
            header: vec![0; HEADER_BUF],
            payload: vec![0; PAYLOAD_BUF],
            binner: Binner::new(set, counters, log),
            report: true,
        })
    }

    pub fn binner(&self) -> &Binner {
        &self.binner
    }

    /// No end-of-run summary on stderr.
    pub fn quiet(mut self) -> Self {
        self.report = false;
        self
    }

    /// Receives and handles one message if one is there.
    fn receive(&mut self) -> bool {
        let n0 = match self.sock.recv_into(&mut self.envelope, zmq::DONTWAIT) {
            Ok(n) => n,
            Err(_) => return false,
        };
        let mut lens = [n0, 0, 0];
        let mut truncated = n0 > self.envelope.len();
        let mut count = 1;
        // The frames of a message arrive together: the rest never blocks.
        while self.sock.get_rcvmore().unwrap_or(false) {
            let r = match count {
                1 => self.sock.recv_into(&mut self.header, 0),
                2 => self.sock.recv_into(&mut self.payload, 0),
                _ => self.sock.recv_into(&mut [], 0),
            };
            let Ok(k) = r else { break };
            if count < 3 {
                lens[count] = k;
                truncated |= k > if count == 1 { self.header.len() } else { self.payload.len() };
            }
            count += 1;
        }
        let now = monotonic_ns();
        let frames = Frames {
            envelope: &self.envelope[..lens[0].min(self.envelope.len())],
            header: &self.header[..lens[1].min(self.header.len())],
            payload: &self.payload[..lens[2].min(self.payload.len())],
            count,
            truncated,
        };
        self.binner.handle(&frames, now);
        true
    }
}

impl Source for OpenEphysSource {
    fn channels(&self) -> usize {
        self.binner.n
    }
    fn behavior_dims(&self) -> usize {
        0
    }
    fn next(&mut self, slot: &mut BinSlot, timeout: Duration) -> Next {
        if self.binner.pop(slot) {
            return Next::Bin;
        }
        let deadline = monotonic_ns() + timeout.as_nanos() as u64;
        loop {
            while self.receive() {
                if self.binner.pop(slot) {
                    return Next::Bin;
                }
                // A stream that never finishes a bin (warm-up, a misconfigured channel
                // count) must not keep the caller from its stop flag.
                if monotonic_ns() >= deadline {
                    return Next::Idle;
                }
            }
            let now = monotonic_ns();
            if now >= deadline {
                return Next::Idle;
            }
            let ms = ((deadline - now).div_ceil(1_000_000)) as i64;
            match self.sock.poll(zmq::POLLIN, ms) {
                Ok(k) if k > 0 => {}
                _ => return Next::Idle,
            }
        }
    }
}

impl Drop for OpenEphysSource {
    fn drop(&mut self) {
        if self.report {
            if let Some(line) = self.binner.summary() {
                eprintln!("{line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bin {
        seq: u64,
        ts: u64,
        restart: bool,
        counts: Vec<f32>,
    }

    fn settings(mode: Mode, n: usize, bin_ms: f64) -> Settings {
        Settings {
            channels: n,
            bin_ms,
            mode,
            stream: None,
            threshold: 4.0,
            noise_seconds: 0.1,
            refractory_ms: 3.0,
            electrodes: Vec::new(),
        }
    }

    fn binner(set: Settings) -> (Binner, Arc<Counters>, crossbeam_channel::Receiver<crate::pipeline::source::LogLine>) {
        let counters = Arc::new(Counters::default());
        let (tx, rx) = crossbeam_channel::bounded(64);
        (Binner::new(set, counters.clone(), RejectLog::new(tx)), counters, rx)
    }

    /// The next refusal the binner logged (warnings passed over).
    fn next_rejection(rx: &crossbeam_channel::Receiver<crate::pipeline::source::LogLine>) -> String {
        loop {
            match rx.try_recv().expect("a refusal was logged") {
                crate::pipeline::source::LogLine::Rejected(t) => return t.to_string(),
                crate::pipeline::source::LogLine::Warning(_) => {}
            }
        }
    }

    /// Handles one message and takes every bin it finished.
    fn feed(b: &mut Binner, parts: Vec<Vec<u8>>) -> Vec<Bin> {
        b.handle(&Frames::from_parts(&parts), 7);
        let mut slot = BinSlot::new(b.channels(), 0);
        let mut out = Vec::new();
        while b.pop(&mut slot) {
            assert_eq!(slot.kind, SlotKind::Data);
            assert_eq!(slot.recv_ns, 7);
            out.push(Bin { seq: slot.seq, ts: slot.source_ts, restart: slot.restart, counts: slot.counts.to_vec() });
        }
        out
    }

    /// Noise of |x| = 0.5 everywhere: sd = 0.5 / 0.6745, never near a threshold of 4 sd.
    fn quiet_signal(t0: i64, len: usize) -> Vec<f32> {
        (0..len).map(|i| if (t0 + i as i64) % 2 == 0 { 0.5 } else { -0.5 }).collect()
    }

    /// Feeds `channels` channels from sample `from` to `to` in blocks of `block`, with
    /// spikes (-10 for one sample) at the given (channel, sample) pairs; returns the bins.
    struct Feeder {
        num: u64,
        block: usize,
        rate: f64,
    }

    impl Feeder {
        fn run(&mut self, b: &mut Binner, chans: &[usize], from: i64, to: i64, spikes: &[(usize, i64)]) -> Vec<Bin> {
            let mut out = Vec::new();
            let mut s = from;
            while s < to {
                let len = (self.block as i64).min(to - s) as usize;
                for &c in chans {
                    let mut x = quiet_signal(s, len);
                    for &(sc, st) in spikes {
                        if sc == c && st >= s && st < s + len as i64 {
                            x[(st - s) as usize] = -10.0;
                        }
                    }
                    self.num += 1;
                    out.extend(feed(b, data_message(self.num, "s", c, s, self.rate, &x)));
                }
                s += len as i64;
            }
            out
        }
    }

    #[test]
    fn robust_sd_is_median_abs_over_0_6745() {
        let mut x = [1.0, -2.0, 3.0, -4.0, 5.0];
        assert!((robust_sd(&mut x) - 3.0 / 0.6745).abs() < 1e-6);
        let mut x = [1.0, -2.0, 3.0, -4.0];
        assert!((robust_sd(&mut x) - 2.5 / 0.6745).abs() < 1e-6);
        assert_eq!(robust_sd(&mut []), 0.0);
    }

    #[test]
    fn continuous_counts_crossings_exactly_per_bin() {
        // 1 kHz, 10 ms bins = 10 samples; 100 samples of warm-up; blocks of 25 samples
        // (not aligned with bins); refractory 3 samples.
        let (mut b, counters, _rx) = binner(settings(Mode::Continuous, 2, 10.0));
        let mut f = Feeder { num: 0, block: 25, rate: 1000.0 };
        let warm = f.run(&mut b, &[0, 1], 1000, 1100, &[]);
        assert!(warm.is_empty());
        assert_eq!(b.noise_sd(0), Some(0.5 / 0.6745));
        assert_eq!(b.origin(), None);
        // The first block after the warm-up sets the origin: 1100.
        let spikes = [
            (0, 1100), // bin 0, first sample
            (0, 1109), // bin 0, last sample (9 samples later: outside the refractory)
            (1, 1112), // bin 1
            (1, 1114), // 2 samples later, back above the level in between: refractory
            (1, 1117), // 5 samples after 1112: counted, bin 1
            (0, 1124), // bin 2, last sample of a block
            (0, 1126), // refractory across the block boundary: not counted
            (1, 1150), // bin 5
        ];
        let bins = f.run(&mut b, &[0, 1], 1100, 1200, &spikes);
        assert_eq!(b.origin(), Some(1100));
        assert_eq!(bins.len(), 10);
        for (k, bin) in bins.iter().enumerate() {
            assert_eq!(bin.seq, k as u64);
            assert_eq!(bin.ts, 1100 + 10 * k as u64);
            assert!(!bin.restart);
        }
        let counts: Vec<[f32; 2]> = bins.iter().map(|b| [b.counts[0], b.counts[1]]).collect();
        assert_eq!(counts[0], [2.0, 0.0]);
        assert_eq!(counts[1], [0.0, 2.0]);
        assert_eq!(counts[2], [1.0, 0.0]);
        assert_eq!(counts[5], [0.0, 1.0]);
        let total: f32 = counts.iter().map(|c| c[0] + c[1]).sum();
        assert_eq!(total, 6.0);
        assert_eq!(Counters::get(&counters.rejected), 0);
        assert_eq!(Counters::get(&counters.lost_messages), 0);
    }

    #[test]
    fn only_negative_going_crossings_count() {
        let (mut b, _, _rx) = binner(settings(Mode::Continuous, 1, 10.0));
        let mut f = Feeder { num: 0, block: 50, rate: 1000.0 };
        f.run(&mut b, &[0], 0, 100, &[]);
        // A long excursion below the level counts once; a large positive one never.
        let mut x = quiet_signal(100, 50);
        x[5..25].fill(-9.0);
        x[30..40].fill(9.0);
        f.num += 1;
        let bins = feed(&mut b, data_message(f.num, "s", 0, 100, 1000.0, &x));
        assert_eq!(bins.len(), 5);
        let total: f32 = bins.iter().map(|b| b.counts[0]).sum();
        assert_eq!(total, 1.0);
        assert_eq!(bins[0].counts[0], 1.0);
    }

    #[test]
    fn a_bin_waits_for_every_channel_and_one_message_can_finish_several() {
        let (mut b, _, _rx) = binner(settings(Mode::Continuous, 3, 10.0));
        let mut f = Feeder { num: 0, block: 50, rate: 1000.0 };
        f.run(&mut b, &[0, 1, 2], 0, 100, &[]);
        // One block of 50 samples = 5 bins: nothing until the last channel delivers it.
        let mut out = Vec::new();
        for c in 0..3 {
            f.num += 1;
            let bins = feed(&mut b, data_message(f.num, "s", c, 100, 1000.0, &quiet_signal(100, 50)));
            if c < 2 {
                assert!(bins.is_empty(), "channel {c}");
            }
            out.extend(bins);
        }
        assert_eq!(out.iter().map(|b| b.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        // A partial bin stays until all channels are past its end.
        f.block = 15;
        let bins = f.run(&mut b, &[0, 1, 2], 150, 165, &[]);
        assert_eq!(bins.iter().map(|b| b.seq).collect::<Vec<_>>(), [5]);
        assert_eq!(b.stats().forced_bins, 0);
    }

    #[test]
    fn a_stale_channel_holds_bins_back_only_so_long() {
        let (mut b, _, _rx) = binner(settings(Mode::Continuous, 2, 10.0));
        let mut f = Feeder { num: 0, block: 20, rate: 1000.0 };
        f.run(&mut b, &[0, 1], 0, 100, &[]);
        let bins = f.run(&mut b, &[0, 1], 100, 200, &[(0, 105)]);
        assert_eq!(bins.len(), 10);
        // Channel 1 stops. Blocks of 20 samples, 2 stale bins: bin k (ending at
        // 100 + 10(k+1)) is emitted once channel 0 reaches its end + 20 + 20.
        let mut got = Vec::new();
        for s in (200..300).step_by(20) {
            let bins = f.run(&mut b, &[0], s, s + 20, &[(0, s + 3)]);
            got.extend(bins.iter().map(|b| (b.seq, b.counts[0])));
            // Every bin ending 40 samples (a block + 2 bins) before channel 0's end is out.
            let end_of_last_emitted = got.last().map_or(200, |&(k, _)| 100 + 10 * (k as i64 + 1));
            assert_eq!(end_of_last_emitted, (s - 20).max(200), "{s}: {got:?}");
        }
        assert_eq!(got.first().unwrap().0, 10);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), (10..16).collect::<Vec<_>>());
        // Crossings of channel 0 still land in their bins: at 203, 223, 243, 263.
        assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(b.stats().stale, [0, 6]);
        assert_eq!(b.stats().forced_bins, 6);
        // Channel 1 comes back after a gap: binning goes on with both.
        let bins = f.run(&mut b, &[1, 0], 300, 320, &[(1, 305)]);
        assert!(bins.iter().all(|b| b.seq >= 16));
    }

    #[test]
    fn message_num_gaps_are_lost_messages_and_a_step_back_restarts() {
        let (mut b, counters, _rx) = binner(settings(Mode::Continuous, 1, 10.0));
        let mut f = Feeder { num: 100, block: 10, rate: 1000.0 }; // joined mid-acquisition
        f.run(&mut b, &[0], 0, 150, &[]);
        assert_eq!(Counters::get(&counters.lost_messages), 0);
        f.num += 3; // three messages lost
        let bins = f.run(&mut b, &[0], 160, 170, &[]);
        assert_eq!(Counters::get(&counters.lost_messages), 3);
        assert_eq!(b.stats().gaps, 1);
        // Bin 5 (150..160) had no data at all: skipped, so the decoder sees the gap.
        assert_eq!(bins.iter().map(|b| b.seq).collect::<Vec<_>>(), [6]);
        assert_eq!(b.stats().skipped_bins, 1);
        // A TTL event counts in message_num.
        f.num += 1;
        assert!(feed(&mut b, ttl_message(f.num, "s", 165, 1, true)).is_empty());
        let bins = f.run(&mut b, &[0], 170, 180, &[]);
        assert_eq!(Counters::get(&counters.lost_messages), 3);
        assert_eq!(bins.iter().map(|b| b.seq).collect::<Vec<_>>(), [7]);
        // Acquisition restarts: message_num from 1, sample numbers from 0; the noise estimate
        // is kept, so binning starts at once at the first block.
        let sd = b.noise_sd(0);
        f.num = 0;
        let bins = f.run(&mut b, &[0], 0, 30, &[(0, 12)]);
        assert_eq!(b.stats().restarts, 1);
        assert_eq!(b.origin(), Some(0));
        assert_eq!(b.noise_sd(0), sd);
        assert_eq!(
            bins.iter().map(|b| (b.seq, b.ts, b.restart)).collect::<Vec<_>>(),
            [(0, 0, true), (1, 10, false), (2, 20, false)]
        );
        assert_eq!(bins[1].counts[0], 1.0);
        assert_eq!(Counters::get(&counters.lost_messages), 3);
        // A restart whose first messages were missed counts them lost.
        f.num = 2;
        f.run(&mut b, &[0], 0, 10, &[]);
        assert_eq!(b.stats().restarts, 2);
        assert_eq!(Counters::get(&counters.lost_messages), 5);
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let (mut b, counters, rx) = binner(settings(Mode::Continuous, 2, 10.0));
        let good = data_message(1, "s", 0, 0, 1000.0, &[0.5; 10]);
        let two_frames = data_message(12, "s", 0, 0, 1000.0, &[0.5; 10])[..2].to_vec();
        let json = |s: &str| vec![DATA_ENVELOPE.to_vec(), s.as_bytes().to_vec(), vec![0; 40]];
        let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
            (vec![good[0].clone()], "1 frame"),
            (vec![good[0].clone(), good[1].clone(), good[2].clone(), vec![]], "4 frames"),
            (vec![b"DAT".to_vec(), good[1].clone(), good[2].clone()], "envelope"),
            (json("{\"message_num\": 2, \"type\": \"data\", "), "bad JSON"),
            (json("[1, 2]"), "bad JSON"),
            (json("{\"type\": \"data\"}"), "bad JSON"), // no message_num
            (json("{\"message_num\": 3, \"type\": \"data\", \"data_size\": 40}"), "no 'content'"),
            (
                json(
                    "{\"message_num\": 4, \"type\": \"data\", \"data_size\": 40, \"content\": {\"channel_num\": 0, \
                     \"sample_num\": 0, \"sample_rate\": 1000.0}}",
                ),
                "no content.num_samples",
            ),
            (
                json(
                    "{\"message_num\": 5, \"type\": \"data\", \"data_size\": 40, \"content\": {\"channel_num\": 0, \
                     \"num_samples\": 10, \"sample_num\": \"zero\", \"sample_rate\": 1000.0}}",
                ),
                "bad JSON",
            ),
            (
                json(
                    "{\"message_num\": 6, \"type\": \"data\", \"data_size\": 44, \"content\": {\"channel_num\": 0, \
                     \"num_samples\": 10, \"sample_num\": 0, \"sample_rate\": 1000.0}}",
                ),
                "data_size 44 != num_samples 10 x 4",
            ),
            (
                json(
                    "{\"message_num\": 7, \"type\": \"data\", \"data_size\": 48, \"content\": {\"channel_num\": 0, \
                     \"num_samples\": 12, \"sample_num\": 0, \"sample_rate\": 1000.0}}",
                ),
                "payload of 40 bytes, data_size 48",
            ),
            (
                json(
                    "{\"message_num\": 8, \"type\": \"data\", \"content\": {\"channel_num\": 0, \
                     \"num_samples\": 10, \"sample_num\": 0, \"sample_rate\": 1000.0}}",
                ),
                "no data_size",
            ),
            (
                json(
                    "{\"message_num\": 9, \"type\": \"data\", \"data_size\": 40, \"content\": {\"channel_num\": -1, \
                     \"num_samples\": 10, \"sample_num\": 0, \"sample_rate\": 1000.0}}",
                ),
                "channel_num -1",
            ),
            (
                json(
                    "{\"message_num\": 10, \"type\": \"data\", \"data_size\": 40, \"content\": {\"channel_num\": 0, \
                     \"num_samples\": 10, \"sample_num\": 0, \"sample_rate\": 0}}",
                ),
                "sample_rate 0",
            ),
            (json("{\"message_num\": 11, \"type\": \"spike\"}"), "DATA envelope with type 'spike'"),
            (two_frames, "2 frames, expected 3"),
            (
                {
                    let mut x = [0.5f32; 10];
                    x[3] = f32::NAN;
                    data_message(13, "s", 0, 0, 1000.0, &x)
                },
                "sample 3 (sample_num 3) is not finite",
            ),
        ];
        for (i, (parts, want)) in cases.iter().enumerate() {
            let before = Counters::get(&counters.rejected);
            assert!(feed(&mut b, parts.clone()).is_empty());
            assert_eq!(Counters::get(&counters.rejected), before + 1, "case {i} ({want}) was not refused");
            let reason = next_rejection(&rx);
            assert!(reason.contains(want), "case {i}: '{reason}' does not say '{want}'");
        }
        // Refused messages whose header was read still count for message_num: 1, 3, 4, 6..=13
        // were seen; 2 and 5 (unreadable JSON) are lost.
        assert_eq!(b.stats().restarts, 0);
        assert_eq!(Counters::get(&counters.lost_messages), 2);
        // A good message still goes through afterwards.
        assert!(feed(&mut b, data_message(14, "s", 0, 0, 1000.0, &[0.5; 10])).is_empty());
        assert_eq!(b.stats().data_messages, 1);
        // The sample rate cannot change mid-run.
        assert!(feed(&mut b, data_message(15, "s", 1, 0, 2000.0, &[0.5; 10])).is_empty());
        assert!(next_rejection(&rx).contains("sample_rate 2000 Hz, but the run started at 1000 Hz"));
    }

    #[test]
    fn channels_beyond_n_and_other_streams_are_ignored() {
        let mut set = settings(Mode::Continuous, 1, 10.0);
        set.stream = Some("probe-A".into());
        let (mut b, counters, _rx) = binner(set);
        feed(&mut b, data_message(1, "probe-A", 3, 0, 1000.0, &[0.5; 10]));
        feed(&mut b, data_message(2, "probe-B", 0, 0, 1000.0, &[0.5; 10]));
        feed(&mut b, data_message(3, "probe-A", 0, 0, 1000.0, &[0.5; 10]));
        assert_eq!(b.stats().ignored_channel, 1);
        assert_eq!(b.stats().ignored_stream, 1);
        assert_eq!(b.stats().data_messages, 1);
        assert_eq!(Counters::get(&counters.rejected), 0);
    }

    #[test]
    fn a_jump_in_sample_numbers_skips_the_bins_in_between() {
        let (mut b, _, _rx) = binner(settings(Mode::Continuous, 2, 10.0));
        let mut f = Feeder { num: 0, block: 10, rate: 1000.0 };
        f.run(&mut b, &[0, 1], 0, 100, &[]);
        let bins = f.run(&mut b, &[0, 1], 100, 120, &[]);
        assert_eq!(bins.len(), 2);
        // Channel 0 delivers one bin more, then both jump a million samples ahead.
        f.run(&mut b, &[0], 120, 130, &[(0, 121)]);
        let bins = f.run(&mut b, &[0, 1], 1_000_100, 1_000_120, &[(1, 1_000_105)]);
        let seqs: Vec<u64> = bins.iter().map(|b| b.seq).collect();
        // Bin 2 (channel 0 only) is emitted when the jump comes; then the new bins.
        assert_eq!(seqs, [2, 100_000, 100_001]);
        assert_eq!(bins[0].counts, [1.0, 0.0]);
        assert_eq!(bins[1].counts, [0.0, 1.0]);
        assert_eq!(b.stats().stale[1], 1);
    }

    #[test]
    fn larger_blocks_grow_the_rings() {
        let (mut b, _, _rx) = binner(settings(Mode::Continuous, 1, 1.0)); // 1 sample per bin
        let mut f = Feeder { num: 0, block: 10, rate: 1000.0 };
        f.run(&mut b, &[0], 0, 100, &[]);
        let mut bins = f.run(&mut b, &[0], 100, 200, &[]);
        assert_eq!(b.stats().grown, 0);
        f.block = 1000;
        bins.extend(f.run(&mut b, &[0], 200, 3200, &[(0, 250), (0, 3099)]));
        assert_eq!(b.stats().grown, 1);
        assert_eq!(bins.len(), 3100);
        assert!(bins.iter().enumerate().all(|(k, b)| b.seq == k as u64));
        assert_eq!(bins.iter().map(|b| b.counts[0]).sum::<f32>(), 2.0);
        assert_eq!(bins[150].counts[0], 1.0);
        assert_eq!(bins[2999].counts[0], 1.0);
    }

    fn spike_settings(electrodes: &[&str]) -> Settings {
        let mut s = settings(Mode::Spikes, 2, 10.0);
        s.electrodes = electrodes.iter().map(|e| e.to_string()).collect();
        s
    }

    #[test]
    fn spikes_are_counted_per_electrode_and_time_comes_from_any_message() {
        let (mut b, counters, _rx) = binner(spike_settings(&["TT2", "TT1"]));
        // Spikes before the first data message (no sample rate yet) are not counted.
        assert!(feed(&mut b, spike_message(1, "s", "TT1", 5, 4, 40)).is_empty());
        assert_eq!(b.stats().before_origin, 1);
        // The first data block sets the origin (1000) and time; samples are not examined.
        assert!(feed(&mut b, data_message(2, "s", 0, 1000, 1000.0, &[0.5; 10])).is_empty());
        assert_eq!(b.origin(), Some(1000));
        feed(&mut b, spike_message(3, "s", "TT1", 1003, 4, 40));
        feed(&mut b, spike_message(4, "s", "TT2", 1009, 4, 40));
        feed(&mut b, spike_message(5, "s", "TT2", 1012, 4, 40));
        feed(&mut b, spike_message(6, "s", "TT9", 1013, 4, 40)); // not in the list
                                                                 // Bin 0 (1000..1010) is emitted once time reaches 1019 (one whole bin past its end).
        assert!(feed(&mut b, ttl_message(7, "s", 1018, 0, true)).is_empty());
        let bins = feed(&mut b, ttl_message(8, "s", 1019, 0, false));
        assert_eq!(bins.len(), 1);
        assert_eq!((bins[0].seq, bins[0].ts), (0, 1000));
        assert_eq!(bins[0].counts, [1.0, 1.0]);
        // A data block moves time by its last sample: bins 1..=3 (ends 1020, 1030, 1040).
        let bins = feed(&mut b, data_message(9, "s", 0, 1030, 1000.0, &[0.5; 20]));
        assert_eq!(
            bins.iter().map(|b| (b.seq, b.counts.clone())).collect::<Vec<_>>(),
            [(1, vec![1.0, 0.0]), (2, vec![0.0, 0.0]), (3, vec![0.0, 0.0])]
        );
        // A spike for a bin already emitted is late.
        feed(&mut b, spike_message(10, "s", "TT1", 1035, 4, 40));
        assert_eq!(b.stats().late, 1);
        assert_eq!(b.stats().ignored_electrode, 1);
        assert_eq!(Counters::get(&counters.rejected), 0);
        // A waveform of the wrong size is refused.
        let mut m = spike_message(11, "s", "TT1", 1049, 4, 40);
        m[2].pop();
        feed(&mut b, m);
        assert_eq!(Counters::get(&counters.rejected), 1);
    }

    #[test]
    fn electrodes_map_by_first_appearance_without_a_list() {
        let (mut b, _, _rx) = binner(spike_settings(&[]));
        feed(&mut b, data_message(1, "s", 0, 0, 1000.0, &[0.0; 10]));
        feed(&mut b, spike_message(2, "s", "Electrode 7", 1, 1, 40));
        feed(&mut b, spike_message(3, "s", "Electrode 2", 2, 1, 40));
        feed(&mut b, spike_message(4, "s", "Electrode 7", 3, 1, 40));
        feed(&mut b, spike_message(5, "s", "Electrode 3", 4, 1, 40)); // a third: beyond channels
        let bins = feed(&mut b, data_message(6, "s", 0, 10, 1000.0, &[0.0; 20]));
        assert_eq!(bins[0].counts, [2.0, 1.0]);
        assert_eq!(b.stats().ignored_electrode, 1);
    }

    #[test]
    fn json_strings_with_escapes_are_read() {
        let mut set = settings(Mode::Continuous, 1, 10.0);
        set.stream = Some("Rhythm \"A\"".into());
        let (mut b, counters, _rx) = binner(set);
        feed(&mut b, data_message(1, "Rhythm \"A\"", 0, 0, 1000.0, &[0.5; 10]));
        assert_eq!(b.stats().data_messages, 1);
        assert_eq!(Counters::get(&counters.rejected), 0);
    }

    #[test]
    fn a_dead_channel_does_not_hold_the_warm_up_forever() {
        let (mut b, _, _rx) = binner(settings(Mode::Continuous, 2, 10.0));
        let mut f = Feeder { num: 0, block: 10, rate: 1000.0 };
        // Only channel 0 delivers: after twice the warm-up (200 samples) binning starts, and
        // bins are emitted without channel 1.
        assert!(f.run(&mut b, &[0], 0, 200, &[]).is_empty());
        let bins = f.run(&mut b, &[0], 200, 300, &[]);
        assert_eq!(b.origin(), Some(200));
        assert!(!bins.is_empty() && bins[0].seq == 0);
        assert_eq!(b.stats().stale[1], bins.len() as u64);
    }

    #[test]
    fn settings_are_checked() {
        let cfg = |t: &str| -> OpenEphysConfig { toml::from_str(&format!("endpoint = \"tcp://x:1\"\n{t}")).unwrap() };
        assert!(Settings::new(&cfg(""), 4, 20.0).is_ok());
        assert!(Settings::new(&cfg("mode = \"lfp\""), 4, 20.0).unwrap_err().contains("mode"));
        assert!(Settings::new(&cfg("threshold = -4"), 4, 20.0).unwrap_err().contains("threshold"));
        assert!(Settings::new(&cfg("noise_seconds = 0"), 4, 20.0).unwrap_err().contains("noise_seconds"));
        let e = Settings::new(&cfg("mode = \"spikes\"\nelectrodes = [\"a\", \"b\"]"), 4, 20.0).unwrap_err();
        assert!(e.contains("2 electrodes"), "{e}");
        let e = Settings::new(&cfg("mode = \"spikes\"\nelectrodes = [\"a\", \"a\"]"), 2, 20.0).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(Settings::new(&cfg("electrodes = [\"a\"]"), 1, 20.0).unwrap_err().contains("spikes"));
    }
}
