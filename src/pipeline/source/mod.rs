//! Where bins come from. A source runs on the acquisition thread: it receives or generates
//! data, bins it, stamps the host receive time, and fills preallocated slots.

pub mod binning;
pub mod lsl;
pub mod openephys;
pub mod sim;
pub mod threshold;
pub mod zmq_bins;

use crate::pipeline::record::{SourceEvent, SourceEventKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The discriminants are the `kind` codes of the session's bin records.
pub enum SlotKind {
    /// Counts for every channel.
    Data = 0,
    /// A bin without data (the source said so): a predict-only step.
    NoData = 1,
    /// The message was refused (its reason was counted and logged by the source); its
    /// sequence number is known, so the bin is still answered, flagged.
    Rejected = 2,
}

/// One bin travelling from the acquisition thread to the decode thread. Slots are allocated
/// once and recycled through a return ring, so the per-bin path never allocates.
#[derive(Debug)]
pub struct BinSlot {
    pub seq: u64,
    pub source_ts: u64,
    /// Host CLOCK_MONOTONIC ns when the bin was complete.
    pub recv_ns: u64,
    /// When it entered the ring.
    pub push_ns: u64,
    pub kind: SlotKind,
    /// The publisher (re)started with this bin.
    pub restart: bool,
    pub counts: Box<[f32]>,
    /// Behaviour that came with the bin (calibration targets or simulator truth).
    pub behavior: Box<[f32]>,
    pub has_behavior: bool,
    /// The LLBN flags the bin came with (sources that bin themselves set the stream-start
    /// flag on their first bin), for the session record.
    pub wire_flags: u16,
    /// How the counts were sent: the LLBN dtype code, or `session::DTYPE_BINNED` for bins a
    /// source made itself.
    pub dtype: u8,
    /// Host CLOCK_MONOTONIC ns at which the source says the bin ended (LSL timestamps,
    /// clock-corrected); 0 when the source does not say.
    pub source_ns: u64,
}

impl BinSlot {
    pub fn new(channels: usize, behavior_dims: usize) -> Self {
        BinSlot {
            seq: 0,
            source_ts: 0,
            recv_ns: 0,
            push_ns: 0,
            kind: SlotKind::Data,
            restart: false,
            counts: vec![0.0; channels].into_boxed_slice(),
            behavior: vec![0.0; behavior_dims].into_boxed_slice(),
            has_behavior: false,
            wire_flags: 0,
            dtype: crate::session::DTYPE_BINNED,
            source_ns: 0,
        }
    }

    /// This slot holding a recorded bin again (replay, and the shadow decoders' copy of what
    /// the driving decoder took): what the per-bin step reads of it. Behaviour is kept when
    /// the record carries it and it fits.
    pub fn refill(&mut self, f: &crate::session::BinFields, counts: &[f32], behavior: &[f32]) {
        self.seq = f.seq;
        self.source_ts = f.source_ts;
        self.recv_ns = f.recv_ns;
        self.push_ns = f.push_ns;
        self.restart = f.bits & crate::session::BIT_RESTART != 0;
        self.kind = SlotKind::from_code(f.kind);
        self.wire_flags = f.wire_flags;
        self.dtype = f.dtype;
        self.counts.copy_from_slice(counts);
        self.has_behavior = f.bits & crate::session::BIT_HAS_BEHAVIOR != 0 && behavior.len() == self.behavior.len();
        if self.has_behavior {
            self.behavior.copy_from_slice(behavior);
        }
    }
}

impl SlotKind {
    /// From a session record's `kind` code (unknown codes read as refused).
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => SlotKind::Data,
            1 => SlotKind::NoData,
            _ => SlotKind::Rejected,
        }
    }
}

pub enum Next {
    /// The slot holds a bin.
    Bin,
    /// Nothing arrived within the timeout.
    Idle,
    /// The source has no more data.
    End,
}

pub trait Source: Send {
    fn channels(&self) -> usize;
    fn behavior_dims(&self) -> usize;
    /// Waits up to `timeout` for the next bin.
    fn next(&mut self, slot: &mut BinSlot, timeout: Duration) -> Next;
}

/// Counters shared by every thread of a run: relaxed atomics, no locks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bins the source delivered.
    pub acquired: AtomicU64,
    /// Bins lost because every slot was in flight (the decoder was behind).
    pub dropped_ring_full: AtomicU64,
    /// Messages refused (malformed, wrong channel count, NaN, absurd values).
    pub rejected: AtomicU64,
    /// Upstream messages lost (Open Ephys message_num gaps).
    pub lost_messages: AtomicU64,
    /// Bins skipped by the decoder to catch up with the newest.
    pub skipped: AtomicU64,
    /// Bins missing from the sequence (predicted through).
    pub missing: AtomicU64,
    /// Duplicate or out-of-order bins dropped.
    pub out_of_order: AtomicU64,
    /// Publisher restarts seen.
    pub restarts: AtomicU64,
    /// Decoder resets (restart, gap too long, numerical breakdown).
    pub resets: AtomicU64,
    /// Bins decoded (published).
    pub decoded: AtomicU64,
    /// Published bins that carried no observation.
    pub predict_only: AtomicU64,
    /// Output messages ZeroMQ refused without blocking (no room for a slow subscriber).
    pub output_dropped: AtomicU64,
    /// Timing records lost because the stats ring was full.
    pub stats_dropped: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// A short message formatted without the heap (the acquisition thread's reasons and
/// warnings): at most [`FixedText::CAPACITY`] bytes, longer ones cut at a character boundary and
/// marked with "...".
#[derive(Clone, Copy)]
pub struct FixedText {
    len: u16,
    /// Something did not fit: "..." ends the text and nothing more is taken.
    cut: bool,
    buf: [u8; FixedText::CAPACITY],
}

impl FixedText {
    pub const CAPACITY: usize = 240;

    pub fn new() -> Self {
        FixedText { len: 0, cut: false, buf: [0; FixedText::CAPACITY] }
    }
    pub fn as_str(&self) -> &str {
        // Only whole characters are ever copied in (`write_str`).
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
    pub fn clear(&mut self) {
        (self.len, self.cut) = (0, false);
    }
}

impl Default for FixedText {
    fn default() -> Self {
        FixedText::new()
    }
}

impl std::fmt::Write for FixedText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        const MORE: &str = "...";
        if self.cut {
            return Ok(());
        }
        let at = self.len as usize;
        let room = FixedText::CAPACITY - MORE.len() - at;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[at..at + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take as u16;
        if take < s.len() {
            let at = self.len as usize;
            self.buf[at..at + MORE.len()].copy_from_slice(MORE.as_bytes());
            self.len += MORE.len() as u16;
            self.cut = true;
        }
        Ok(())
    }
}

impl std::fmt::Display for FixedText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for FixedText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// A line for the terminal from the acquisition thread.
#[derive(Clone, Copy, Debug)]
pub enum LogLine {
    /// A refused message and why.
    Rejected(FixedText),
    /// Something the operator should know (printed once per kind by the source).
    Warning(FixedText),
}

impl std::fmt::Display for LogLine {
    /// As the terminal shows it: `rejected: ...` or `warning: ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogLine::Rejected(t) => write!(f, "rejected: {t}"),
            LogLine::Warning(t) => write!(f, "warning: {t}"),
        }
    }
}

/// Reports refused messages: every one is counted, the first few are logged with their
/// reason, and warnings are passed on; the main thread, which owns the terminal, prints them.
/// Nothing here allocates: reasons are formatted into a [`FixedText`] and travel through a
/// bounded channel of plain data (full: the line is dropped, the count stays).
#[derive(Clone)]
pub struct RejectLog {
    tx: crossbeam_channel::Sender<LogLine>,
    logged: std::sync::Arc<AtomicU64>,
    /// Every refusal and warning, for the session recording.
    record: Option<crossbeam_channel::Sender<SourceEvent>>,
}

/// Messages logged in full; the rest only counted.
const LOGGED_REJECTS: u64 = 20;

impl RejectLog {
    pub fn new(tx: crossbeam_channel::Sender<LogLine>) -> Self {
        RejectLog { tx, logged: Default::default(), record: None }
    }
    /// Also sends every refusal and warning (not only the first few) to the recorder.
    pub fn recording(mut self, record: crossbeam_channel::Sender<SourceEvent>) -> Self {
        self.record = Some(record);
        self
    }
    fn to_record(&self, kind: SourceEventKind, t_ns: u64, text: FixedText) {
        if let Some(r) = &self.record {
            let _ = r.try_send(SourceEvent { t_ns, kind, text });
        }
    }
    /// A marker of the source's (at its own time): into the session only.
    pub fn marker(&self, t_ns: u64, text: FixedText) {
        self.to_record(SourceEventKind::Marker, t_ns, text);
    }
    /// Counts a refused message and returns its reason (for the bin's record); the first
    /// few are also sent to the terminal.
    pub fn reject(&self, counters: &Counters, reason: impl FnOnce(&mut FixedText) -> std::fmt::Result) -> FixedText {
        Counters::add(&counters.rejected, 1);
        let mut text = FixedText::new();
        let _ = reason(&mut text);
        if self.logged.fetch_add(1, Ordering::Relaxed) < LOGGED_REJECTS {
            let _ = self.tx.try_send(LogLine::Rejected(text));
        }
        self.to_record(SourceEventKind::Rejected, crate::pipeline::clock::monotonic_ns(), text);
        text
    }
    pub fn warn(&self, what: impl FnOnce(&mut FixedText) -> std::fmt::Result) {
        let mut text = FixedText::new();
        let _ = what(&mut text);
        let _ = self.tx.try_send(LogLine::Warning(text));
        self.to_record(SourceEventKind::Warning, crate::pipeline::clock::monotonic_ns(), text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write;

    #[test]
    fn text_keeps_what_fits_and_marks_the_cut() {
        let mut t = FixedText::new();
        let why = "bad";
        write!(t, "bin seq {} refused: {why}", 7).unwrap();
        assert_eq!(t.as_str(), "bin seq 7 refused: bad");
        let mut long = FixedText::new();
        write!(long, "{}", "é".repeat(200)).unwrap();
        write!(long, "more").unwrap();
        assert!(long.as_str().ends_with("...") && long.as_str().len() <= FixedText::CAPACITY, "{long}");
        assert!(long.as_str().starts_with("éé"));
    }
}
