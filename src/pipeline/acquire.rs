//! The acquisition thread: asks the source for bins and pushes them into the SPSC ring.
//! It never waits for the decoder: slots come back through a return ring, and if none is
//! free (the decoder holds them all) the bin is dropped and counted, and the decoder sees
//! the gap in sequence numbers.

use super::clock::monotonic_ns;
use super::record::RecordTap;
use super::source::{BinSlot, Counters, Next, Source};
use crate::session::Decision;
use ringbuf::traits::{Consumer, Producer};
use ringbuf::{HeapCons, HeapProd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

pub struct Acquire {
    pub source: Box<dyn Source>,
    pub ring: HeapProd<BinSlot>,
    pub free: HeapCons<BinSlot>,
    /// Receives bins while every other slot is in flight (they are then dropped).
    pub spare: BinSlot,
    pub counters: Arc<Counters>,
    /// Bins dropped here (no free slot) still go into the session.
    pub record: Option<RecordTap>,
    pub stop: Arc<AtomicBool>,
    /// Woken after each push (it may be parked waiting); set once the decoder starts.
    pub consumer: Arc<OnceLock<Thread>>,
    pub core: Option<usize>,
}

/// How long a source may wait for data before the loop looks at the stop flag again.
const POLL: Duration = Duration::from_millis(50);

impl Acquire {
    pub fn run(mut self) -> Box<dyn Source> {
        if let Some(core) = self.core {
            if let Err(e) = super::clock::pin_current_thread(core) {
                eprintln!("warning: acquisition thread: {e}");
            }
        }
        let mut held: Option<BinSlot> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let mut slot = match held.take().or_else(|| self.free.try_pop()) {
                Some(s) => s,
                None => {
                    // Every slot is with the decoder: read the bin anyway (so the source
                    // never backs up) and drop it.
                    if let Next::Bin = self.source.next(&mut self.spare, POLL) {
                        Counters::add(&self.counters.acquired, 1);
                        Counters::add(&self.counters.dropped_ring_full, 1);
                        if let Some(r) = self.record.as_mut() {
                            r.bin(&self.spare, Decision::RingFull, 0, 0, None);
                        }
                    }
                    continue;
                }
            };
            match self.source.next(&mut slot, POLL) {
                Next::Bin => {
                    Counters::add(&self.counters.acquired, 1);
                    slot.push_ns = monotonic_ns();
                    if let Err(slot) = self.ring.try_push(slot) {
                        // Cannot happen (the ring holds every slot), but never lose the buffer.
                        held = Some(slot);
                        Counters::add(&self.counters.dropped_ring_full, 1);
                    } else if let Some(t) = self.consumer.get() {
                        t.unpark();
                    }
                    // From the first bin handed over on, this loop is the live per-bin path.
                    super::hot_path::set(true);
                }
                Next::Idle => held = Some(slot),
                Next::End => break,
            }
        }
        super::hot_path::set(false);
        self.source
    }
}
