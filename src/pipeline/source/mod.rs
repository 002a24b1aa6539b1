//! Where bins come from. A source runs on the acquisition thread: it receives or generates
//! data, bins it, stamps the host receive time, and fills preallocated slots.

pub mod openephys;
pub mod sim;
pub mod zmq_bins;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// Counts for every channel.
    Data,
    /// A bin without data (the source said so): a predict-only step.
    NoData,
    /// The message was refused (its reason was counted and logged by the source); its
    /// sequence number is known, so the bin is still answered, flagged.
    Rejected,
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

/// Reports refused messages: every one is counted, the first few are logged with their
/// reason (on the stats thread, which owns the terminal).
#[derive(Clone)]
pub struct RejectLog {
    tx: crossbeam_channel::Sender<String>,
    logged: std::sync::Arc<AtomicU64>,
}

/// Messages logged in full; the rest only counted.
const LOGGED_REJECTS: u64 = 20;

impl RejectLog {
    pub fn new(tx: crossbeam_channel::Sender<String>) -> Self {
        RejectLog { tx, logged: Default::default() }
    }
    pub fn reject(&self, counters: &Counters, reason: impl FnOnce() -> String) {
        Counters::add(&counters.rejected, 1);
        if self.logged.fetch_add(1, Ordering::Relaxed) < LOGGED_REJECTS {
            let _ = self.tx.try_send(reason());
        }
    }
}
