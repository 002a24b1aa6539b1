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
//! This adapter turns the protocol into what the shared layers take: continuous blocks
//! (`sample_num`, one channel's float32 samples) go to the threshold detector and the
//! sample-clock bins (src/pipeline/source/binning.rs, threshold.rs); spike events become
//! events of their electrode's channel; every message's sample number moves time on. The
//! binning rules (origin after the warm-up, complete and stale bins, events binned by
//! sample number) are the binning layer's, the same for LSL.
//!
//! - continuous mode: crossings of `-threshold * sd` in the channels' blocks;
//! - spikes mode: each spike event adds one to its electrode's channel in the bin of its
//!   `sample_num`; time is the highest sample number seen on any message (a data block's
//!   last sample, a spike's or a TTL event's sample).
//!
//! Per message, after the warm-up, nothing is allocated: frames are received into fixed
//! buffers, the JSON header is parsed into structs that borrow from it, and counts go into
//! the binning layer's preallocated rings.

mod protocol;
mod testing;
#[cfg(test)]
mod tests;

pub use protocol::{Frames, DATA_ENVELOPE, EVENT_ENVELOPE};
pub use testing::{data_message, spike_message, ttl_message};

use super::binning::{BinningSettings, BinningStats, Once, SampleBins};
use super::threshold::LeBytes;
use super::{BinSlot, Counters, FixedText, Next, RejectLog, Source};
use crate::config::OpenEphysConfig;
use crate::pipeline::clock::monotonic_ns;
use protocol::{trim_nul, Header, Lossy, Text};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

pub use super::binning::STALE_BINS;

/// Receive buffers: a JSON header never comes near 64 KiB; 1 MiB of payload is a block of
/// 262,144 samples (the GUI's buffer is a few thousand at most).
const HEADER_BUF: usize = 64 * 1024;
const PAYLOAD_BUF: usize = 1 << 20;
/// Messages queued in the SUB socket before ZeroMQ drops (which shows as lost messages).
const RCVHWM: i32 = 100_000;

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

impl Settings {
    fn binning(&self) -> BinningSettings {
        BinningSettings {
            channels: self.channels,
            bin_ms: self.bin_ms,
            continuous: self.mode == Mode::Continuous,
            threshold: self.threshold,
            noise_seconds: self.noise_seconds,
            refractory_ms: self.refractory_ms,
        }
    }
}

/// What the source saw, beyond the shared [`Counters`] and the binning's own stats.
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
    /// Acquisition restarts (message_num stepped back).
    pub restarts: u64,
    /// Upstream messages lost (message_num gaps); also in `Counters::lost_messages`.
    pub lost_messages: u64,
    /// The binning layer's (bins, stale, gaps, late, ...).
    pub binning: BinningStats,
}

const W_CHANNEL: u32 = 0;
const W_STREAM: u32 = 1;
const W_ELECTRODE: u32 = 2;

/// The protocol: messages in, bins out (through the binning layer). No socket (the source
/// below owns that), so it can be tested message by message.
pub struct Binner {
    set: Settings,
    counters: Arc<Counters>,
    log: RejectLog,
    stats: OpenEphysStats,
    warned: Once,
    last_message: Option<u64>,
    /// Spikes: electrode names in channel order.
    names: Vec<String>,
    bins: SampleBins,
}

impl Binner {
    pub fn new(set: Settings, counters: Arc<Counters>, log: RejectLog) -> Binner {
        let names = set.electrodes.clone();
        let bins = SampleBins::new(set.binning(), "openephys", log.clone());
        Binner {
            counters,
            log,
            stats: OpenEphysStats::default(),
            warned: Once::default(),
            last_message: None,
            names,
            bins,
            set,
        }
    }

    pub fn channels(&self) -> usize {
        self.bins.channels()
    }
    /// The source's counts and the binning's.
    pub fn stats(&self) -> OpenEphysStats {
        OpenEphysStats { binning: self.bins.stats().clone(), ..self.stats.clone() }
    }
    /// Samples per bin (0 before the first data message).
    pub fn samples_per_bin(&self) -> i64 {
        self.bins.samples_per_bin()
    }
    pub fn origin(&self) -> Option<i64> {
        self.bins.origin()
    }
    /// A channel's noise sd (continuous mode), once estimated.
    pub fn noise_sd(&self, channel: usize) -> Option<f32> {
        self.bins.noise_sd(channel)
    }
    /// Finished bins waiting.
    pub fn ready(&self) -> usize {
        self.bins.ready()
    }

    /// Hands out the oldest finished bin.
    pub fn pop(&mut self, slot: &mut BinSlot) -> bool {
        self.bins.pop(slot)
    }

    fn reject(&self, reason: impl FnOnce(&mut FixedText) -> std::fmt::Result) {
        self.log.reject(&self.counters, |r| {
            r.write_str("Open Ephys ")?;
            reason(r)
        });
    }

    fn warn(&mut self, bit: u32, msg: impl FnOnce(&mut FixedText) -> std::fmt::Result) {
        self.warned.warn(&self.log, "openephys", bit, msg);
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

    /// Acquisition restarted: sample numbers start over (the binning layer starts again
    /// from a new origin, keeping the noise estimates).
    fn restart(&mut self) {
        self.stats.restarts += 1;
        self.bins.restart();
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
        let n = self.channels();
        if continuous && ch >= n {
            self.stats.ignored_channel += 1;
            self.warn(W_CHANNEL, |r| {
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
        match self.bins.sample_rate() {
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
                if !self.bins.set_sample_rate(sr) {
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
        self.bins.block(ns);
        match self.set.mode {
            Mode::Spikes => {
                // Only time: the samples are not looked at.
                self.bins.start_at(s);
                self.bins.time(s + ns - 1, now);
            }
            Mode::Continuous => self.bins.continuous(ch, s, &LeBytes(m.payload), now),
        }
    }

    fn stream_ok(&mut self, stream: Option<&Text>) -> bool {
        let Some(want) = &self.set.stream else { return true };
        if stream.is_some_and(|s| s.0 == *want) {
            return true;
        }
        self.stats.ignored_stream += 1;
        self.warned.warn(&self.log, "openephys", W_STREAM, |r| {
            let got = stream.map_or("(none)", |s| &*s.0);
            write!(r, "ignoring messages of stream '{got}' (stream = '{want}')")
        });
        false
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
            let n = self.channels();
            self.warn(W_ELECTRODE, |r| {
                let name = &e.0;
                write!(r, "ignoring spikes of electrode '{name}': not in the electrodes list (or more than channels = {n} electrodes)")
            });
            return;
        };
        if self.bins.origin().is_none() {
            self.stats.before_origin += 1;
            return;
        }
        self.bins.event(c, s, now);
    }

    /// Electrode name -> channel: the configured list, else order of first appearance.
    fn electrode(&mut self, name: &str) -> Option<usize> {
        if let Some(i) = self.names.iter().position(|x| x == name) {
            return Some(i);
        }
        if self.set.electrodes.is_empty() && self.names.len() < self.channels() {
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
        if let Some(s) = ct.sample_num {
            self.bins.time(s, now);
        }
    }

    /// A line for the end of a run: what did not go as it should.
    pub fn summary(&self) -> Option<String> {
        let s = &self.stats;
        let parts = [
            (s.lost_messages, "messages lost (message_num gaps)"),
            (s.ignored_channel, "messages of channels beyond `channels`"),
            (s.ignored_stream, "messages of another stream"),
            (s.ignored_electrode, "spikes of unknown electrodes"),
            (s.restarts, "acquisition restarts"),
        ];
        let mut line: Vec<String> =
            parts.iter().filter(|(k, _)| *k > 0).map(|(k, what)| format!("{k} {what}")).collect();
        line.extend(self.bins.summary_parts());
        (!line.is_empty()).then(|| format!("openephys: {} bins; {}", self.bins.stats().bins, line.join("; ")))
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
        self.binner.channels()
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
