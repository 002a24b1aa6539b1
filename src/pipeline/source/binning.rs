//! Bins on the sample clock, for every source that sends samples or timed events rather
//! than bins (Open Ephys, LSL): never by arrival time.
//!
//! Bins are `spb = round(bin_ms / 1000 * sample_rate)` samples; bin `k` covers sample
//! numbers `[origin + k spb, origin + (k+1) spb)`, its sequence number is `k` and its
//! source timestamp its first sample number.
//!
//! - Continuous voltage ([`SampleBins::continuous`]): each channel's first `noise_seconds`
//!   estimate its noise (src/pipeline/source/threshold.rs); `origin` is the start of the
//!   first block after every channel's warm-up. Crossings count in the bin of their sample.
//!   A bin is complete when every channel has delivered samples past its end. A channel
//!   that falls more than one block (the largest seen) plus [`STALE_BINS`] bins behind the
//!   furthest one no longer holds bins back: they are emitted without it and it is counted
//!   stale. A bin in which no channel delivered a single sample (lost data) is never emitted:
//!   the decoder sees the gap in sequence numbers.
//! - Events ([`SampleBins::event`]): each adds one to its channel in the bin of its sample
//!   number. Time ([`SampleBins::time`]) is the highest sample number seen; a bin is emitted
//!   once time has passed one full bin beyond its end, which leaves a late event one bin to
//!   arrive.
//!
//! After the warm-up nothing is allocated: counts go into preallocated rings (bins being
//! filled, and a queue of finished bins that the source hands out one per call). The rings
//! grow, once, for a block longer than any before (counted and warned).

use super::threshold::{Detector, Samples};
use super::{BinSlot, FixedText, RejectLog, SlotKind};
use std::fmt::Write as _;

/// Continuous mode: bins wait for a lagging channel until the furthest channel is this many
/// bins, plus one block, past their end.
pub const STALE_BINS: i64 = 2;
/// The smallest bin ring (it grows with the block size: see `ensure_capacity`).
const MIN_RING_BINS: usize = 64;

/// What the binning saw.
#[derive(Clone, Debug, Default)]
pub struct BinningStats {
    pub bins: u64,
    /// Bins emitted without every channel (stale channels).
    pub forced_bins: u64,
    /// Per channel: bins emitted without it.
    pub stale: Vec<u64>,
    /// Bins no data arrived for (continuous) or that a time jump passed over (events): not
    /// emitted, so the decoder sees them missing.
    pub skipped_bins: u64,
    /// Finished bins dropped because the queue was full (cannot happen when bins are taken
    /// after each message, as the sources do).
    pub dropped: u64,
    /// Times the bin rings grew for a longer block than any before (allocates).
    pub grown: u64,
    /// Blocks that started after the sample their channel was expected at.
    pub gaps: u64,
    /// Blocks whose samples had all been delivered already.
    pub repeated: u64,
    /// Crossings or events whose bin had already been emitted.
    pub late: u64,
}

/// Warnings printed once each.
#[derive(Default)]
pub struct Once(u64);

impl Once {
    /// Warns about `bit` once, prefixed with the source's name.
    pub fn warn(
        &mut self,
        log: &RejectLog,
        label: &str,
        bit: u32,
        msg: impl FnOnce(&mut FixedText) -> std::fmt::Result,
    ) {
        if self.0 & (1 << bit) == 0 {
            self.0 |= 1 << bit;
            log.warn(|r| {
                write!(r, "{label}: ")?;
                msg(r)
            });
        }
    }
}

const W_BIN_WIDTH: u32 = 0;
const W_WARMUP: u32 = 1;
const W_FLAT: u32 = 2;
const W_GROWN: u32 = 3;
const W_STALE: u32 = 4;
const W_LATE: u32 = 5;

/// Bins being filled: `cap` rows of `n` counts, bin `b` in row `b % cap`.
struct Ring {
    cap: usize,
    n: usize,
    counts: Vec<f32>,
    /// Samples (continuous) or events that went into each row.
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

/// Finished bins waiting for the source's `next`, oldest first.
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

/// One continuous channel: where its samples are and its detector.
#[derive(Default)]
struct Chan {
    /// The sample number after the last one delivered.
    next: Option<i64>,
    det: Detector,
}

/// How the binning is set up (from the source's config).
#[derive(Clone, Debug)]
pub struct BinningSettings {
    pub channels: usize,
    pub bin_ms: f64,
    /// Continuous voltage (threshold crossings) or events.
    pub continuous: bool,
    pub threshold: f32,
    pub noise_seconds: f32,
    pub refractory_ms: f32,
}

/// The sample-clock binner (see the module doc).
pub struct SampleBins {
    set: BinningSettings,
    n: usize,
    /// The source's name in warnings.
    label: &'static str,
    log: RejectLog,
    warned: Once,
    stats: BinningStats,
    sample_rate: Option<f64>,
    spb: i64,
    refractory: i64,
    noise_len: usize,
    /// The longest block seen (samples).
    max_block: i64,
    /// Sample number of bin 0's first sample, once binning has started.
    origin: Option<i64>,
    /// Continuous: the warm-up is over; the first block starting at or after this sample
    /// number sets the origin.
    align_after: Option<i64>,
    /// Continuous: first sample of the warm-up (its deadline counts from it).
    warm_first: Option<i64>,
    /// Events: the highest sample number seen since the origin.
    t_max: i64,
    chans: Vec<Chan>,
    pending: Ring,
    /// First bin not yet finished.
    lo: u64,
    ready: Ready,
    restart_next: bool,
}

impl SampleBins {
    pub fn new(set: BinningSettings, label: &'static str, log: RejectLog) -> SampleBins {
        let n = set.channels;
        SampleBins {
            n,
            label,
            log,
            warned: Once::default(),
            stats: BinningStats { stale: vec![0; n], ..Default::default() },
            sample_rate: None,
            spb: 0,
            refractory: 0,
            noise_len: 1,
            max_block: 0,
            origin: None,
            align_after: None,
            warm_first: None,
            t_max: i64::MIN,
            chans: (0..n).map(|_| Chan::default()).collect(),
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
    pub fn stats(&self) -> &BinningStats {
        &self.stats
    }
    pub fn sample_rate(&self) -> Option<f64> {
        self.sample_rate
    }
    /// Samples per bin (0 before the sample rate is known).
    pub fn samples_per_bin(&self) -> i64 {
        self.spb
    }
    pub fn origin(&self) -> Option<i64> {
        self.origin
    }
    /// A channel's noise sd (continuous), once estimated.
    pub fn noise_sd(&self, channel: usize) -> Option<f32> {
        self.chans.get(channel).and_then(|c| c.det.sd())
    }
    /// Finished bins waiting.
    pub fn ready(&self) -> usize {
        self.ready.len
    }
    /// Hands out the oldest finished bin.
    pub fn pop(&mut self, slot: &mut BinSlot) -> bool {
        self.ready.pop(slot)
    }

    /// The stream's sample rate (once, before any samples): false when a bin would be
    /// under one sample.
    pub fn set_sample_rate(&mut self, sr: f64) -> bool {
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
            self.warned.warn(&self.log, self.label, W_BIN_WIDTH, |r| {
                write!(r, "bin_ms = {bin_ms} is not a whole number of samples at {sr} Hz: bins are {spb} samples ({ms:.4} ms)")
            });
        }
        if self.set.continuous {
            let noise_len = self.noise_len;
            self.chans.iter_mut().for_each(|c| c.det.reserve(noise_len));
        }
        true
    }

    /// A block of `ns` samples is coming: the rings are made large enough for it.
    pub fn block(&mut self, ns: i64) {
        if ns > self.max_block {
            self.max_block = ns;
            if self.origin.is_some() {
                self.ensure_capacity();
            }
        }
    }

    /// The stream started over (its sample numbers restart): bins restart from a new origin
    /// (the noise estimates are kept); the half-filled bins of the old run are dropped, and
    /// the next bin carries the restart.
    pub fn restart(&mut self) {
        self.origin = None;
        self.lo = 0;
        self.pending.clear();
        let warmed = self.chans.iter().all(|c| c.det.sd().is_some());
        self.align_after = if warmed { Some(i64::MIN) } else { None };
        self.warm_first = None;
        self.t_max = i64::MIN;
        for c in &mut self.chans {
            c.next = None;
            c.det.restart();
        }
        self.restart_next = true;
    }

    /// Events mode: bins start at the first sample number the stream shows.
    pub fn start_at(&mut self, origin: i64) {
        if self.origin.is_none() {
            self.origin = Some(origin);
            self.lo = 0;
            self.t_max = origin - 1;
            self.ensure_capacity();
        }
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
            self.warned.warn(&self.log, self.label, W_GROWN, |r| {
                write!(r, "a block of {mb} samples: bin rings grown to {cap} bins")
            });
        }
        self.pending.grow(cap, self.lo);
        self.ready.grow(2 * cap);
    }

    /// Continuous samples of channel `c` starting at sample number `s`; `now` is when they
    /// were received (the receive time of the bins they finish).
    pub fn continuous(&mut self, c: usize, s: i64, x: &impl Samples, now: u64) {
        let end = s + x.len() as i64;
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
                    ch.det.break_continuity();
                    self.stats.gaps += 1;
                }
                Some(_) => {}
                None => ch.det.break_continuity(),
            }
        }
        if self.origin.is_none() {
            self.warm_first.get_or_insert(from);
            if self.align_after.is_some_and(|a| from >= a) {
                self.start_at(from);
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
            let seg = super::threshold::Range { inner: x, from: (t - s) as usize, to: (seg_end - s) as usize };
            let ch = &mut self.chans[c];
            let had_sd = ch.det.sd().is_some();
            let k = ch.det.process(&seg, t, refr, noise_len, thr);
            if !had_sd && ch.det.sd() == Some(0.0) {
                self.warned.warn(&self.log, self.label, W_FLAT, |r| {
                    write!(r, "channel {c} is flat during the warm-up (noise sd 0)")
                });
            }
            match row {
                Some(r) => {
                    self.pending.counts[r * self.n + c] += k as f32;
                    self.pending.filled[r] += (seg_end - t) as u64;
                }
                None if k > 0 && self.origin.is_some_and(|o| t >= o) => {
                    self.stats.late += k as u64;
                    self.warned.warn(&self.log, self.label, W_LATE, |r| {
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
        let all = self.chans.iter().all(|c| c.det.sd().is_some());
        let deadline = self.warm_first.map_or(i64::MAX, |f| f.saturating_add(2 * self.noise_len as i64));
        if all || lead >= deadline {
            if !all {
                let missing = self.chans.iter().filter(|c| c.det.sd().is_none()).count();
                self.warned.warn(&self.log, self.label, W_WARMUP, |r| {
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

    /// Events mode: time has reached sample number `t` (any message's last sample).
    pub fn time(&mut self, t: i64, now: u64) {
        if self.origin.is_none() {
            return;
        }
        self.t_max = self.t_max.max(t);
        self.advance_events(now);
    }

    /// Finishes every bin that time has passed by more than one bin.
    fn advance_events(&mut self, now: u64) {
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

    /// Events mode: one event of channel `c` at sample number `s` (after time has moved to
    /// it). False when its bin was already emitted (counted late) or binning has not begun.
    pub fn event(&mut self, c: usize, s: i64, now: u64) -> bool {
        let Some(o) = self.origin else { return false };
        self.time(s, now);
        let b = if s >= o { ((s - o) / self.spb) as u64 } else { 0 };
        if s < o || b < self.lo || b >= self.lo + self.pending.cap as u64 {
            self.stats.late += 1;
            self.warned.warn(&self.log, self.label, W_LATE, |r| {
                write!(r, "an event of channel {c} arrived for a bin already emitted")
            });
            return false;
        }
        let r = self.pending.row(b);
        self.pending.counts[r * self.n + c] += 1.0;
        self.pending.filled[r] += 1;
        true
    }

    /// Bin `lo` is finished: into the ready queue (unless no data went into it).
    fn retire(&mut self, now: u64) {
        let (b, o, n) = (self.lo, self.origin.unwrap_or(0), self.n);
        let r = self.pending.row(b);
        let end = o + (b as i64 + 1) * self.spb;
        let continuous = self.set.continuous;
        if continuous && self.pending.filled[r] == 0 {
            self.stats.skipped_bins += 1;
        } else {
            if continuous {
                let mut forced = false;
                for (c, ch) in self.chans.iter().enumerate() {
                    if ch.next.unwrap_or(i64::MIN) < end {
                        forced = true;
                        self.stats.stale[c] += 1;
                        self.warned.warn(&self.log, self.label, W_STALE, |r| {
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

    /// What did not go as it should, for the end-of-run line (None: nothing).
    pub fn summary_parts(&self) -> Vec<String> {
        let s = &self.stats;
        let parts = [
            (s.forced_bins, "bins emitted without a stale channel"),
            (s.skipped_bins, "bins skipped (no data)"),
            (s.late, "crossings/events too late for their bin"),
            (s.gaps, "blocks after a gap in sample numbers"),
            (s.dropped, "bins dropped (queue full)"),
        ];
        let mut line: Vec<String> =
            parts.iter().filter(|(k, _)| *k > 0).map(|(k, what)| format!("{k} {what}")).collect();
        let stale: Vec<String> =
            s.stale.iter().enumerate().filter(|(_, k)| **k > 0).map(|(c, k)| format!("{c}: {k}")).collect();
        if !stale.is_empty() {
            line.push(format!("stale bins per channel {{{}}}", stale.join(", ")));
        }
        line
    }
}
