//! The recorder thread: everything the session received, decided and published goes to disk
//! here, through [`crate::session::write`], never on the real-time threads.
//!
//! The decode thread (and the acquisition thread, for bins it had to drop) copies each
//! record into a preallocated [`RecordSlot`] and pushes it into an SPSC ring; the slots come
//! back through a second ring, as bins do. If no slot is free (the disk stalled), the record
//! is lost and counted: the next record says how many were lost before it, the recorder
//! writes a `record_gap` event, and the summary shows the count. The real-time threads never
//! wait for the disk. Other threads (main, control) send events and owned records through a
//! channel ([`ToRecorder`]).
//!
//! Allocation happens here (chunk buffers, JSON), never on the threads that feed it.

use super::clock::monotonic_ns;
use super::source::{BinSlot, FixedText};
use crate::session::write::SessionWriter;
use crate::session::{BinArrays, BinFields, Decision, Shape, BIT_HAS_BEHAVIOR, BIT_OUTPUT_DROPPED, BIT_RESTART};
use crate::wire::output::{OutputHeader, FLAG_RESTART};
use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One record on its way to the disk: a bin with what was decided and published, or the
/// mark that a change was applied before the next bin.
pub struct RecordSlot {
    pub fields: BinFields,
    pub shape: Shape,
    /// counts, behaviour in, behaviour out, latent, lag-1 (the first `shape`'s worth used).
    values: Box<[f32]>,
    /// `Some(id)`: not a bin; change `id` was applied here (the bin fields are unused).
    pub applied: Option<u64>,
}

impl RecordSlot {
    fn new(capacity: usize) -> Self {
        RecordSlot {
            fields: BinFields::default(),
            shape: Shape::default(),
            values: vec![0.0; capacity].into(),
            applied: None,
        }
    }

    /// A record made off the real-time path (calibration bins on the main thread).
    pub fn owned(fields: BinFields, shape: Shape, counts: &[f32], behavior_in: &[f32]) -> Self {
        let mut r = RecordSlot::new(shape.channels + 2 * shape.behavior_dims + 2 * shape.latents);
        r.fill_bin(fields, shape, counts, behavior_in, &[], &[], &[]);
        r
    }

    pub fn arrays(&self) -> BinArrays<'_> {
        let s = self.shape;
        let (c, rest) = self.values.split_at(s.channels);
        let (bi, rest) = rest.split_at(s.behavior_dims);
        let (bo, rest) = rest.split_at(s.behavior_dims);
        let (lat, rest) = rest.split_at(s.latents);
        BinArrays { counts: c, behavior_in: bi, behavior_out: bo, latent: lat, lag1: &rest[..s.latents] }
    }

    /// Copies a bin in; the output arrays are zeros where empty (nothing was published).
    #[allow(clippy::too_many_arguments)]
    fn fill_bin(
        &mut self,
        fields: BinFields,
        shape: Shape,
        counts: &[f32],
        behavior_in: &[f32],
        behavior_out: &[f32],
        latent: &[f32],
        lag1: &[f32],
    ) {
        self.fields = fields;
        self.shape = shape;
        self.applied = None;
        let (d, l) = (shape.behavior_dims, shape.latents);
        let v = &mut self.values[..shape.channels + 2 * d + 2 * l];
        let (c, rest) = v.split_at_mut(shape.channels);
        c.copy_from_slice(counts);
        let (bi, rest) = rest.split_at_mut(d);
        copy_or_zero(bi, behavior_in);
        let (bo, rest) = rest.split_at_mut(d);
        copy_or_zero(bo, behavior_out);
        let (lat, lg) = rest.split_at_mut(l);
        copy_or_zero(lat, latent);
        copy_or_zero(lg, lag1);
    }
}

fn copy_or_zero(dst: &mut [f32], src: &[f32]) {
    if src.len() == dst.len() {
        dst.copy_from_slice(src);
    } else {
        dst.fill(0.0);
    }
}

/// What a real-time thread needs to record: its end of a ring pair.
pub struct RecordTap {
    ring: HeapProd<RecordSlot>,
    free: HeapCons<RecordSlot>,
    /// Records lost since the last one that got through.
    lost: u32,
    /// Counted for the summary.
    lost_total: Arc<AtomicU64>,
    /// Floats a slot holds.
    capacity: usize,
}

/// The decoder's side of one published (or dropped) bin.
pub struct Published<'a> {
    pub header: &'a OutputHeader,
    pub behavior: &'a [f32],
    pub latent: &'a [f32],
    pub lag1: &'a [f32],
    pub step_ns: u64,
    pub publish_ns: u64,
    pub output_dropped: bool,
}

impl<'a> Published<'a> {
    /// What `dec` published with `header`.
    pub fn of(header: &'a OutputHeader, dec: &'a dyn crate::decoder::Decoder, step_ns: u64, dropped: bool) -> Self {
        Published {
            header,
            behavior: dec.behavior(),
            latent: dec.mean(),
            lag1: dec.lag1_mean(),
            step_ns,
            publish_ns: header.publish_ns,
            output_dropped: dropped,
        }
    }
}

impl RecordTap {
    /// The most latents a record can hold (a decoder with more cannot be recorded).
    pub fn max_latents(&self, channels: usize, behavior_dims: usize) -> usize {
        (self.capacity - channels - 2 * behavior_dims) / 2
    }

    /// Records a bin and what happened to it. Never waits and never allocates: with no free
    /// slot the record is counted as lost.
    pub fn bin(&mut self, slot: &BinSlot, decision: Decision, skipped: u64, pop_ns: u64, out: Option<&Published>) {
        let Some(mut r) = self.free.try_pop() else {
            self.lose();
            return;
        };
        let mut bits = if slot.has_behavior { BIT_HAS_BEHAVIOR } else { 0 };
        if slot.restart {
            bits |= BIT_RESTART;
        }
        let mut fields = BinFields {
            index: 0,
            seq: slot.seq,
            source_ts: slot.source_ts,
            recv_ns: slot.recv_ns,
            push_ns: slot.push_ns,
            pop_ns,
            skipped,
            wire_flags: slot.wire_flags,
            decision: decision as u8,
            kind: slot.kind as u8,
            dtype: slot.dtype,
            bits,
            records_lost_before: std::mem::take(&mut self.lost),
            ..Default::default()
        };
        let (mut beh, mut lat, mut lag) = (&[][..], &[][..], &[][..]);
        if let Some(p) = out {
            fields.step_ns = p.step_ns;
            fields.publish_ns = p.publish_ns;
            fields.dropped_before = p.header.dropped_before;
            fields.kl = p.header.kl;
            fields.out_flags = p.header.flags;
            if p.output_dropped {
                fields.bits |= BIT_OUTPUT_DROPPED;
            }
            (beh, lat, lag) = (p.behavior, p.latent, p.lag1);
        }
        let shape = Shape { channels: slot.counts.len(), behavior_dims: slot.behavior.len(), latents: lat.len() };
        r.fill_bin(fields, shape, &slot.counts, if slot.has_behavior { &slot.behavior } else { &[] }, beh, lat, lag);
        self.push(r);
    }

    /// Records that change `id` was applied before the next bin.
    pub fn applied(&mut self, id: u64) {
        let Some(mut r) = self.free.try_pop() else {
            self.lose();
            return;
        };
        r.applied = Some(id);
        r.fields.recv_ns = monotonic_ns(); // when it was applied, on this thread
        self.push(r);
    }

    fn lose(&mut self) {
        self.lost = self.lost.saturating_add(1);
        self.lost_total.fetch_add(1, Ordering::Relaxed);
    }

    fn push(&mut self, r: RecordSlot) {
        let pushed = self.ring.try_push(r);
        debug_assert!(pushed.is_ok(), "the record ring holds every slot");
    }
}

/// The draining end of a ring pair (the recorder's, or the control thread's feed).
pub struct TapEnd {
    ring: HeapCons<RecordSlot>,
    free: HeapProd<RecordSlot>,
}

impl TapEnd {
    /// Hands every waiting record to `f` and returns its slot; the number handled.
    pub fn drain(&mut self, mut f: impl FnMut(&RecordSlot)) -> usize {
        let mut n = 0;
        while let Some(r) = self.ring.try_pop() {
            f(&r);
            let back = self.free.try_push(r);
            debug_assert!(back.is_ok(), "the free ring holds every slot");
            n += 1;
        }
        n
    }
}

/// A ring pair of `slots` records of `capacity` floats each: the tap for a real-time thread
/// and the end that drains it.
pub fn tap(slots: usize, capacity: usize, lost_total: Arc<AtomicU64>) -> (RecordTap, TapEnd) {
    let (ring_p, ring_c) = HeapRb::<RecordSlot>::new(slots).split();
    let (mut free_p, free_c) = HeapRb::<RecordSlot>::new(slots).split();
    for _ in 0..slots {
        let _ = free_p.try_push(RecordSlot::new(capacity));
    }
    (RecordTap { ring: ring_p, free: free_c, lost: 0, lost_total, capacity }, TapEnd { ring: ring_c, free: free_p })
}

/// Messages from threads that may block (main, control).
pub enum ToRecorder {
    /// An event (a JSON object with at least "kind"; "record" is filled in if absent).
    Event(serde_json::Value),
    /// A bin recorded off the real-time path.
    Bin(Box<RecordSlot>),
    /// A new header (e.g. once the calibrated model is known).
    Header(Box<crate::session::Header>),
    /// Everything is in: write the end record with this summary and stop.
    Finish(serde_json::Value),
}

/// What a source reports for the session (sent by [`super::source::RejectLog`]).
#[derive(Clone, Copy, Debug)]
pub struct SourceEvent {
    pub t_ns: u64,
    pub kind: SourceEventKind,
    pub text: FixedText,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceEventKind {
    /// A refused message and why.
    Rejected,
    Warning,
    /// A marker of the source's own (an LSL marker stream), at its time.
    Marker,
}

/// What `run` holds of the recorder: the thread's inputs.
pub struct Recording {
    pub tx: crossbeam_channel::Sender<ToRecorder>,
    /// Records lost because a ring had no free slot (a stalled disk).
    pub lost: Arc<AtomicU64>,
    pub dir: std::path::PathBuf,
}

/// The thread's state.
pub struct Recorder {
    writer: SessionWriter,
    ends: Vec<TapEnd>,
    rx: crossbeam_channel::Receiver<ToRecorder>,
    rejects: crossbeam_channel::Receiver<SourceEvent>,
}

/// Sets up a recorder writing to `writer`: `taps` ring pairs of `slots` records of
/// `capacity` floats (one per real-time thread that records).
pub fn recorder(
    writer: SessionWriter,
    taps: &[(usize, usize)],
    rejects: crossbeam_channel::Receiver<SourceEvent>,
) -> (Recorder, Vec<RecordTap>, Recording) {
    let lost = Arc::new(AtomicU64::new(0));
    let (mut handles, mut ends) = (Vec::new(), Vec::new());
    for &(slots, capacity) in taps {
        let (h, e) = tap(slots, capacity, lost.clone());
        handles.push(h);
        ends.push(e);
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let dir = writer.dir().to_path_buf();
    (Recorder { writer, ends, rx, rejects }, handles, Recording { tx, lost, dir })
}

/// How long the recorder sleeps when there is nothing to write.
const IDLE: Duration = Duration::from_millis(5);

/// What the recorder thread returns: the records written, or why the disk failed.
pub type RecordResult = Result<crate::session::write::Written, String>;

impl Recorder {
    /// Drains the rings and the channel until told to finish. A write error stops the
    /// recording (returned, and reported by `run`), never the decoder: the real-time threads
    /// then lose records, counted.
    pub fn run(mut self) -> RecordResult {
        // Below the real-time threads and the senders that share their cores: compressing a
        // chunk (a few ms each 250 ms at 1 kHz) should wait for them, not they for it.
        // SAFETY: setpriority on the calling thread (tid 0 = this thread on Linux).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        let dir = self.writer.dir().to_path_buf();
        let failed = |e: std::io::Error| format!("recording stopped: cannot write {}: {e}", dir.display());
        loop {
            let mut finish = None;
            while let Ok(m) = self.rx.try_recv() {
                match m {
                    ToRecorder::Event(e) => self.writer.event(e),
                    ToRecorder::Bin(r) => write_record(&mut self.writer, &r).map_err(failed)?,
                    ToRecorder::Header(h) => self.writer.update_header(&h).map_err(|e| e.to_string())?,
                    ToRecorder::Finish(summary) => finish = Some(summary),
                }
            }
            while let Ok(e) = self.rejects.try_recv() {
                let (kind, key) = match e.kind {
                    SourceEventKind::Rejected => ("rejected", "reason"),
                    SourceEventKind::Warning => ("source_warning", "reason"),
                    SourceEventKind::Marker => ("marker", "label"),
                };
                self.writer.event(serde_json::json!({"kind": kind, "t_ns": e.t_ns, key: e.text.as_str()}));
            }
            let mut any = false;
            for k in 0..self.ends.len() {
                let mut res = Ok(());
                let writer = &mut self.writer;
                any |= self.ends[k].drain(|r| {
                    if res.is_ok() {
                        res = write_record(writer, r);
                    }
                }) > 0;
                res.map_err(failed)?;
            }
            if let Some(summary) = finish {
                // The senders have stopped (run joins them first): nothing more can come.
                return self.writer.finish(summary).map_err(failed);
            }
            self.writer.flush_if_due().map_err(failed)?;
            if !any {
                std::thread::sleep(IDLE);
            }
        }
    }
}

/// One record into the session: a bin (with a record_gap event before it when records were
/// lost, a restart event after it), or an `applied` mark.
fn write_record(writer: &mut SessionWriter, r: &RecordSlot) -> std::io::Result<()> {
    if let Some(id) = r.applied {
        writer.event(serde_json::json!({"kind": "applied", "change": id, "t_ns": r.fields.recv_ns}));
        return Ok(());
    }
    let f = &r.fields;
    if f.records_lost_before > 0 {
        writer.event(serde_json::json!({"kind": "record_gap", "lost": f.records_lost_before}));
    }
    let index = writer.bin(f, r.shape, &r.arrays())?;
    if f.out_flags & FLAG_RESTART != 0 {
        writer.event(serde_json::json!({"kind": "restart", "seq": f.seq, "record": index}));
    }
    Ok(())
}
