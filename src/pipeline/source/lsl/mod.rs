//! A Lab Streaming Layer stream as a source: resolved by name, type or source_id, pulled in
//! chunks into preallocated buffers (no allocation, liblsl's own pull), and turned into
//! bins: this file only translates; the binning is the shared layer's.
//!
//! Shapes (`[source.lsl] shape`, or from the stream's metadata with "auto"):
//! - counts: one LSL sample per bin, one channel per model channel. Sequence numbers count
//!   samples; a gap in timestamps (a shortfall of more than `gap_tolerance_ms`, default
//!   50 ms, against the nominal rate) advances them by the samples missing, so the decoder sees the gap (GAP, predicted through). NaN or absurd
//!   counts are refused and answered, like the zmq source's.
//! - continuous: voltage at the stream's rate, threshold crossings binned by sample count
//!   (src/pipeline/source/binning.rs and threshold.rs, as for Open Ephys). A gap in
//!   timestamps skips the samples missing; a chunk with a non-finite sample is refused.
//! - markers (`markers = "name"`): a string stream beside the data; each marker becomes an
//!   event of the session (`marker`, with its LSL time).
//!
//! Time: LSL's timestamps (with `time_correction`, which liblsl estimates in the background)
//! are on the host's CLOCK_MONOTONIC when the outlet is on this machine, so each bin carries
//! where its source said it ended (`source_ns`), beside the host receive time; the run's
//! reports then have a source -> publish latency. A stream that goes silent is warned about;
//! liblsl reconnects when it comes back (same source_id), and the silence shows as a gap.

pub mod ffi;

use super::binning::{BinningSettings, Once, SampleBins};
use super::threshold::Strided;
use super::{BinSlot, Counters, FixedText, Next, RejectLog, SlotKind, Source};
use crate::config::LslConfig;
use crate::pipeline::clock::monotonic_ns;
use ffi::{Api, Description, Inlet, CF_STRING, EC_LOST};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// Samples pulled at once (per channel): a generous chunk of a 30 kHz stream.
const CHUNK: usize = 4096;
/// A stream without a sample for this long is warned about (and again when it is back).
const SILENT: Duration = Duration::from_secs(1);
/// How often the clock offset estimate is read again.
const TC_EVERY_NS: u64 = 2_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Counts,
    Continuous,
}

/// What the source saw (for the end-of-run line).
#[derive(Clone, Debug, Default)]
pub struct LslStats {
    pub chunks: u64,
    pub samples: u64,
    /// Gaps in the timestamps, and the samples they were missing.
    pub gaps: u64,
    pub missing_samples: u64,
    /// Times the stream went silent (and came back, if it did).
    pub silences: u64,
    pub markers: u64,
    pub rejected_chunks: u64,
}

const W_SILENT: u32 = 0;
const W_BACK: u32 = 1;
const W_LOST: u32 = 2;

pub struct LslSource {
    inlet: Inlet,
    markers: Option<Inlet>,
    desc: Description,
    shape: Shape,
    channels: usize,
    max_count: f32,
    gap_tolerance_s: f64,
    log: RejectLog,
    counters: Arc<Counters>,
    warned: Once,
    stats: LslStats,
    data: Vec<f32>,
    ts: Vec<f64>,
    /// Samples of the last pull not yet turned into bins (counts shape): `pos..len`.
    pos: usize,
    len: usize,
    /// Counts: the next bin's sequence number.
    seq: u64,
    /// Gap detection: (timestamp, samples since) of the clock anchor (remote clock).
    clock_anchor: Option<(f64, u64)>,
    /// Continuous: sample number of the next sample.
    sample_no: i64,
    bins: Option<SampleBins>,
    /// (sample number, local time in s) of a recent sample: the source time of bin ends.
    anchor: (i64, f64),
    time_correction: f64,
    tc_at: u64,
    /// LSL's clock minus CLOCK_MONOTONIC, in ns (about 0: both are steady_clock).
    clock_offset_ns: i64,
    last_data_ns: u64,
    silent: bool,
    marker_buf: Vec<*mut std::ffi::c_char>,
    marker_ts: Vec<f64>,
}

// SAFETY: the raw marker-string pointers are only scratch (null between pulls); the inlets
// are Send; the source is used by one thread at a time.
unsafe impl Send for LslSource {}

impl LslSource {
    /// Resolves the stream (and the marker stream), checks it against the run, opens inlets.
    pub fn open(
        api: &Arc<Api>,
        cfg: &LslConfig,
        channels: usize,
        bin_ms: f64,
        counters: Arc<Counters>,
        log: RejectLog,
    ) -> Result<LslSource, String> {
        let (prop, value) = match (&cfg.name, &cfg.stream_type, &cfg.source_id) {
            (Some(v), _, _) => ("name", v),
            (_, Some(v), _) => ("type", v),
            (_, _, Some(v)) => ("source_id", v),
            _ => return Err("[source.lsl] names no stream".into()),
        };
        let info = resolve_one(api, prop, value, cfg.resolve_timeout_s)?;
        let desc = info.describe();
        let bin_rate = 1000.0 / bin_ms;
        let shape = match cfg.shape.as_str() {
            "counts" => Shape::Counts,
            "continuous" => Shape::Continuous,
            _ if desc.srate > 0.0 && (desc.srate - bin_rate).abs() <= 1e-6 * bin_rate => Shape::Counts,
            _ if desc.srate > bin_rate => Shape::Continuous,
            _ => {
                return Err(format!(
                    "stream {desc}: with shape = \"auto\" its rate must be the bin rate ({bin_rate} Hz: counts) or higher (continuous); set shape"
                ));
            }
        };
        let refuse = |msg: String| Err(msg);
        if desc.format == CF_STRING {
            return refuse(format!("stream {desc} carries strings: it is a marker stream (use markers = ...)"));
        }
        if desc.channels != channels {
            return refuse(format!("stream {desc} has {} channels, but channels = {channels}", desc.channels));
        }
        if shape == Shape::Continuous && desc.srate <= 0.0 {
            return refuse(format!("stream {desc} has an irregular rate: continuous voltage needs a nominal rate"));
        }
        let inlet = Inlet::open(info, 2)?;
        let markers = match &cfg.markers {
            Some(name) => {
                let m = resolve_one(api, "name", name, cfg.resolve_timeout_s)?;
                let md = m.describe();
                if md.format != CF_STRING {
                    return Err(format!("marker stream {md} is not a string stream"));
                }
                Some(Inlet::open(m, 10)?)
            }
            None => None,
        };
        let bins = (shape == Shape::Continuous).then(|| {
            let mut b = SampleBins::new(
                BinningSettings {
                    channels,
                    bin_ms,
                    continuous: true,
                    threshold: cfg.threshold,
                    noise_seconds: cfg.noise_seconds,
                    refractory_ms: cfg.refractory_ms,
                },
                "lsl",
                log.clone(),
            );
            b.set_sample_rate(desc.srate);
            b.block(CHUNK as i64);
            b
        });
        if let Some(b) = &bins {
            if b.samples_per_bin() < 1 {
                return Err(format!("bin_ms = {bin_ms} is under one sample of stream {desc}"));
            }
        }
        Ok(LslSource {
            clock_offset_ns: ffi::clock_offset_ns(api),
            inlet,
            markers,
            shape,
            channels,
            max_count: cfg.max_count,
            gap_tolerance_s: cfg.gap_tolerance_ms / 1000.0,
            log,
            counters,
            warned: Once::default(),
            stats: LslStats::default(),
            data: vec![0.0; CHUNK * channels],
            ts: vec![0.0; CHUNK],
            pos: 0,
            len: 0,
            seq: 0,
            clock_anchor: None,
            sample_no: 0,
            bins,
            anchor: (0, 0.0),
            time_correction: 0.0,
            tc_at: 0,
            last_data_ns: monotonic_ns(),
            silent: false,
            marker_buf: vec![std::ptr::null_mut(); 64],
            marker_ts: vec![0.0; 64],
            desc,
        })
    }

    pub fn description(&self) -> &Description {
        &self.desc
    }
    pub fn shape(&self) -> Shape {
        self.shape
    }
    pub fn stats(&self) -> &LslStats {
        &self.stats
    }

    /// Local (host CLOCK_MONOTONIC) time in ns of a remote LSL timestamp.
    fn local_ns(&self, ts: f64) -> u64 {
        (((ts + self.time_correction) * 1e9) as i64 + self.clock_offset_ns).max(0) as u64
    }

    /// Pulls what is there (waiting up to `timeout` for the first sample).
    fn pull(&mut self, timeout: Duration) -> usize {
        let now = monotonic_ns();
        if now >= self.tc_at {
            self.tc_at = now + TC_EVERY_NS;
            if let Some(tc) = self.inlet.time_correction() {
                self.time_correction = tc;
            }
        }
        self.take_markers();
        // What is there now; if nothing, wait for one sample (a pull of a chunk with a
        // timeout would wait for the whole chunk), then take what came with it.
        let mut ec = 0;
        let mut n = self.pull_now(0, &mut ec);
        if n == 0 && ec == 0 {
            // SAFETY: the buffer holds at least one frame of `channels` values; live inlet.
            let ts = unsafe {
                (self.inlet.api.pull_sample_f)(
                    self.inlet.ptr,
                    self.data.as_mut_ptr(),
                    self.channels as i32,
                    timeout.as_secs_f64(),
                    &mut ec,
                )
            };
            if ts != 0.0 && ec == 0 {
                self.ts[0] = ts;
                n = self.channels + self.pull_now(1, &mut ec);
            }
        }
        if ec == EC_LOST {
            self.warned.warn(&self.log, "lsl", W_LOST, |r| write!(r, "stream '{}' was lost", self.desc.name));
        }
        let frames = n / self.channels.max(1);
        let now = monotonic_ns();
        if frames == 0 {
            if !self.silent && now - self.last_data_ns > SILENT.as_nanos() as u64 {
                self.silent = true;
                self.stats.silences += 1;
                let name = &self.desc.name;
                self.warned.warn(&self.log, "lsl", W_SILENT, |r| {
                    write!(
                        r,
                        "stream '{name}' has sent nothing for 1 s (waiting for it: liblsl reconnects when it is back)"
                    )
                });
            }
            return 0;
        }
        if self.silent {
            self.silent = false;
            let name = &self.desc.name;
            self.warned.warn(&self.log, "lsl", W_BACK, |r| write!(r, "stream '{name}' is back"));
        }
        self.last_data_ns = now;
        self.stats.chunks += 1;
        self.stats.samples += frames as u64;
        frames
    }

    /// Pulls the samples already there into the buffers from frame `from` on; returns the
    /// values pulled.
    fn pull_now(&mut self, from: usize, ec: &mut i32) -> usize {
        let c = self.channels;
        // SAFETY: the buffers hold CHUNK frames of `channels` values and CHUNK timestamps;
        // from `from` on there are CHUNK - from of each, the sizes given; the inlet is live.
        (unsafe {
            (self.inlet.api.pull_chunk_f)(
                self.inlet.ptr,
                self.data.as_mut_ptr().add(from * c),
                self.ts.as_mut_ptr().add(from),
                ((CHUNK - from) * c) as _,
                (CHUNK - from) as _,
                0.0,
                ec,
            )
        }) as usize
    }

    /// Samples missing before a sample stamped `ts`. LSL carries no sample numbers, so a gap
    /// is read from the timestamps against the nominal rate: the samples the clock says
    /// should have come since an anchor, against those that did. Timestamps jitter (an
    /// outlet that stamps at push time), so only a shortfall of more than
    /// max(3 samples, `gap_tolerance_ms`) is a gap; the anchor follows a stream that runs fast at once and
    /// one that runs slow over ~1000 samples, so a clock off its nominal rate is not a gap.
    fn missing_before(&mut self, ts: f64) -> u64 {
        let sr = self.desc.srate;
        let Some((t_ref, n_ref)) = self.clock_anchor else {
            self.clock_anchor = Some((ts, 0));
            return 0;
        };
        if sr <= 0.0 {
            return 0;
        }
        let n = n_ref + 1;
        let expected = (ts - t_ref) * sr;
        let behind = expected - n as f64;
        let tolerance = (self.gap_tolerance_s * sr).max(3.0);
        if behind > tolerance {
            let k = behind.round() as u64;
            self.stats.gaps += 1;
            self.stats.missing_samples += k;
            self.clock_anchor = Some((ts - (n + k) as f64 / sr, n + k));
            return k;
        }
        let t_ref = if behind < 0.0 { ts - n as f64 / sr } else { t_ref + behind / sr * 1e-3 };
        self.clock_anchor = Some((t_ref, n));
        0
    }

    /// Counts: the next pulled sample as one bin.
    fn counts_bin(&mut self, slot: &mut BinSlot) {
        let i = self.pos;
        self.pos += 1;
        let ts = self.ts[i];
        self.seq += self.missing_before(ts);
        let row = &self.data[i * self.channels..(i + 1) * self.channels];
        slot.seq = self.seq;
        self.seq += 1;
        slot.source_ts = self.local_ns(ts);
        slot.source_ns = slot.source_ts;
        slot.recv_ns = monotonic_ns();
        slot.restart = slot.seq == 0;
        slot.wire_flags = if slot.restart { crate::wire::bin::FLAG_STREAM_START } else { 0 };
        slot.has_behavior = false;
        slot.counts.copy_from_slice(row);
        let bad = slot.counts.iter().position(|v| !v.is_finite() || !(0.0..=self.max_count).contains(v));
        slot.kind = match bad {
            None => SlotKind::Data,
            Some(j) => {
                let (v, max, seq) = (slot.counts[j], self.max_count, slot.seq);
                self.log.reject(&self.counters, |r| {
                    if v.is_finite() {
                        write!(r, "lsl bin seq {seq} refused: channel {j} has an absurd value {v} (allowed 0..={max})")
                    } else {
                        write!(r, "lsl bin seq {seq} refused: channel {j} is not finite ({v})")
                    }
                });
                SlotKind::Rejected
            }
        };
    }

    /// Continuous: the pulled chunk into the binning layer.
    fn continuous_chunk(&mut self, frames: usize, now: u64) {
        let missing = self.missing_before(self.ts[0]);
        for i in 1..frames {
            // The rest of the chunk moves the anchor on (a gap inside a chunk is rare: liblsl
            // hands out what arrived together).
            let _ = self.missing_before(self.ts[i]);
        }
        self.sample_no += missing as i64;
        let (n, s0) = (self.channels, self.sample_no);
        let data = &self.data[..frames * n];
        if let Some(k) = data.iter().position(|v| !v.is_finite()) {
            self.stats.rejected_chunks += 1;
            let (c, i) = (k % n, k / n);
            self.log.reject(&self.counters, |r| {
                write!(
                    r,
                    "lsl chunk of {frames} samples refused: channel {c} sample {i} (sample {}) is not finite",
                    s0 + i as i64
                )
            });
        } else if let Some(b) = self.bins.as_mut() {
            for c in 0..n {
                b.continuous(c, s0, &Strided { data, channel: c, stride: n }, now);
            }
        }
        self.anchor = (s0, self.ts[0]);
        self.sample_no += frames as i64;
    }

    /// Markers into the session (as events) and the log.
    fn take_markers(&mut self) {
        let Some(m) = &self.markers else { return };
        let mut ec = 0;
        let cap = self.marker_buf.len();
        // SAFETY: `marker_buf` holds `cap` pointers set to null (a 1-channel stream: one
        // per sample), `marker_ts` `cap` timestamps; liblsl allocates the strings.
        let n = unsafe {
            (m.api.pull_chunk_str)(
                m.ptr,
                self.marker_buf.as_mut_ptr(),
                self.marker_ts.as_mut_ptr(),
                cap as _,
                cap as _,
                0.0,
                &mut ec,
            )
        } as usize;
        for i in 0..n.min(cap) {
            let p = self.marker_buf[i];
            if p.is_null() {
                continue;
            }
            let mut text = FixedText::new();
            // SAFETY: liblsl wrote a NUL-terminated string here.
            let _ = text.write_str(&unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy());
            let t = self.local_ns(self.marker_ts[i]);
            self.log.marker(t, text);
            self.stats.markers += 1;
        }
        // Every non-null slot is liblsl's string: freed with its own function (pylsl's rule).
        for p in self.marker_buf.iter_mut() {
            if !p.is_null() {
                // SAFETY: allocated by liblsl for this pull, freed once.
                unsafe { (m.api.destroy_string)(*p) };
                *p = std::ptr::null_mut();
            }
        }
        let _ = ec;
    }

    /// A line for the end of a run: what did not go as it should.
    pub fn summary(&self) -> Option<String> {
        let s = &self.stats;
        let mut parts: Vec<String> = [
            (s.gaps, "gaps in the timestamps"),
            (s.missing_samples, "samples missing"),
            (s.silences, "silences of 1 s or more"),
            (s.rejected_chunks, "chunks refused"),
        ]
        .iter()
        .filter(|(k, _)| *k > 0)
        .map(|(k, what)| format!("{k} {what}"))
        .collect();
        if let Some(b) = &self.bins {
            parts.extend(b.summary_parts());
        }
        (!parts.is_empty()).then(|| format!("lsl: {} samples; {}", s.samples, parts.join("; ")))
    }
}

impl Source for LslSource {
    fn channels(&self) -> usize {
        self.channels
    }
    fn behavior_dims(&self) -> usize {
        0
    }
    fn next(&mut self, slot: &mut BinSlot, timeout: Duration) -> Next {
        match self.shape {
            Shape::Counts => {
                if self.pos == self.len {
                    (self.pos, self.len) = (0, self.pull(timeout));
                    if self.len == 0 {
                        return Next::Idle;
                    }
                }
                self.counts_bin(slot);
                Next::Bin
            }
            Shape::Continuous => {
                let deadline = monotonic_ns() + timeout.as_nanos() as u64;
                loop {
                    if let Some(b) = self.bins.as_mut() {
                        if b.pop(slot) {
                            // Where the source says the bin ended: its last sample's time.
                            let (spb, sr) = (b.samples_per_bin(), self.desc.srate);
                            let last = slot.source_ts as i64 + spb - 1;
                            let ts = self.anchor.1 + (last - self.anchor.0) as f64 / sr;
                            slot.source_ns = self.local_ns(ts);
                            return Next::Bin;
                        }
                    }
                    let now = monotonic_ns();
                    if now >= deadline {
                        return Next::Idle;
                    }
                    let frames = self.pull(Duration::from_nanos(deadline - now));
                    if frames > 0 {
                        self.continuous_chunk(frames, monotonic_ns());
                    }
                }
            }
        }
    }
}

impl Drop for LslSource {
    fn drop(&mut self) {
        if let Some(line) = self.summary() {
            eprintln!("{line}");
        }
    }
}

/// One stream matching `prop = value`, or a message that lists what was found.
fn resolve_one(api: &Arc<Api>, prop: &str, value: &str, timeout: f64) -> Result<ffi::Resolved, String> {
    let mut found = ffi::resolve(api, prop, value, timeout)?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => {
            let others = ffi::all_streams(api, 1.0);
            let list = if others.is_empty() {
                "none".to_string()
            } else {
                others.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
            };
            Err(format!("no LSL stream with {prop} = '{value}' within {timeout} s; streams found: {list}"))
        }
        n => {
            let list: Vec<String> = found.iter().map(|r| r.describe().to_string()).collect();
            Err(format!("{n} LSL streams with {prop} = '{value}': {}; name it by source_id", list.join(", ")))
        }
    }
}
