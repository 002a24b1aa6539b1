//! The decode thread: pops bins, keeps the sequence honest (gaps, restarts, duplicates),
//! runs the filter step, publishes, and hands a timing record to the stats thread.
//!
//! Falling behind: a bin is stale when it was received more than `stale` ago. While the
//! bin at hand is stale and a newer one is waiting, the decoder skips ahead; bins that
//! complete together (one acquisition block can hold many) are not stale and are all
//! decoded. Skipped bins, like bins that never arrived, are predicted through (predict-only
//! steps, so the state stays on the right clock) and reported in the next output's
//! `dropped_before` with the GAP flag. A gap longer than `max_gap` resets the decoder to its
//! prior instead. Nothing stale is ever decoded silently.
//!
//! Per bin this thread allocates nothing, takes no lock, and makes no system call but the
//! socket's (a bin is awaited by spinning, then parking only after `spin`).

use super::clock::monotonic_ns;
use super::source::{BinSlot, Counters, SlotKind};
use super::stats::{TimingRecord, MAX_BEHAVIOR};
use crate::decoder::Decoder;
use crate::wire::output::{self, OutputHeader};
use ringbuf::traits::{Consumer, Observer, Producer};
use ringbuf::{HeapCons, HeapProd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Decode {
    pub decoder: Box<dyn Decoder>,
    pub ring: HeapCons<BinSlot>,
    pub free: HeapProd<BinSlot>,
    pub out: zmq::Socket,
    pub stats: HeapProd<TimingRecord>,
    pub counters: Arc<Counters>,
    pub stop: Arc<AtomicBool>,
    pub spin: Duration,
    /// The bin width: when the next bin is due.
    pub bin_ns: u64,
    /// A bin received longer ago than this is skipped when a newer one is waiting.
    pub stale_ns: u64,
    pub max_gap: u64,
    pub core: Option<usize>,
}

/// A sequence number this far below the last one is a restarted publisher, not a late bin.
const REORDER_WINDOW: u64 = 64;
/// Start spinning this long before a bin is due (a timed park wakes up to ~100 us late).
const SPIN_LEAD_NS: u64 = 250_000;

impl Decode {
    /// Waits for a bin. Bins come on a clock: sleep until `SPIN_LEAD` before the expected
    /// arrival, then spin (a woken thread costs ~30 us, a spinning one sees the bin at
    /// once), and if it is more than `spin` late, nap until the producer unparks us.
    fn wait(&mut self, expected_ns: Option<u64>) -> Option<BinSlot> {
        let spin_ns = self.spin.as_nanos() as u64;
        let start = monotonic_ns();
        let expected = expected_ns.unwrap_or(start);
        loop {
            if let Some(s) = self.ring.try_pop() {
                return Some(s);
            }
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let now = monotonic_ns();
            if now + SPIN_LEAD_NS < expected {
                std::thread::park_timeout(Duration::from_nanos(expected - SPIN_LEAD_NS - now));
            } else if now < expected.max(start) + spin_ns {
                std::hint::spin_loop();
            } else {
                std::thread::park_timeout(Duration::from_millis(1));
            }
        }
    }

    pub fn run(mut self) -> Box<dyn Decoder> {
        if let Some(core) = self.core {
            if let Err(e) = super::clock::pin_current_thread(core) {
                eprintln!("warning: decode thread: {e}");
            }
        }
        let (d, l) = (self.decoder.behavior_dims(), self.decoder.latents());
        let mut msg = vec![0u8; output::len(d, l)];
        let mut last_seq: Option<u64> = None;
        let mut expected_ns: Option<u64> = None;
        let c = self.counters.clone();
        loop {
            let t0 = monotonic_ns();
            self.decoder.predict(); // the next bin's prediction, before it arrives
            let predict_ns = monotonic_ns() - t0;
            let Some(mut slot) = self.wait(expected_ns) else { break };
            let mut skipped = 0u64;
            let now = monotonic_ns();
            while now.saturating_sub(slot.recv_ns) > self.stale_ns && self.ring.occupied_len() > 0 {
                if let Some(newer) = self.ring.try_pop() {
                    let old = std::mem::replace(&mut slot, newer);
                    let _ = self.free.try_push(old);
                    skipped += 1;
                }
            }
            let pop_ns = monotonic_ns();

            let mut flags = 0u16;
            let mut dropped_before = 0u64;
            let restart = slot.restart || matches!(last_seq, Some(l) if slot.seq + REORDER_WINDOW < l);
            if restart && last_seq.is_some() {
                self.decoder.reset();
                flags |= output::FLAG_RESTART | output::FLAG_RESET;
                Counters::add(&c.restarts, 1);
                Counters::add(&c.resets, 1);
            } else if let Some(l) = last_seq {
                if slot.seq <= l {
                    Counters::add(&c.out_of_order, 1);
                    let _ = self.free.try_push(slot);
                    continue;
                }
                let gap = slot.seq - l - 1;
                if gap > 0 {
                    flags |= output::FLAG_GAP;
                    dropped_before = gap;
                    Counters::add(&c.skipped, skipped.min(gap));
                    Counters::add(&c.missing, gap.saturating_sub(skipped));
                    if gap > self.max_gap {
                        self.decoder.reset();
                        flags |= output::FLAG_RESET;
                        Counters::add(&c.resets, 1);
                    } else {
                        for _ in 0..gap {
                            let _ = self.decoder.step(None);
                        }
                    }
                }
            }

            let obs = match slot.kind {
                SlotKind::Data => Some(&slot.counts[..]),
                SlotKind::NoData => None,
                SlotKind::Rejected => {
                    flags |= output::FLAG_REJECTED;
                    None
                }
            };
            let info = self.decoder.step(obs).or_else(|_| {
                flags |= output::FLAG_REJECTED;
                self.decoder.step(None)
            });
            let kl = match info {
                Ok(i) => {
                    if i.predict_only {
                        flags |= output::FLAG_PREDICT_ONLY;
                    }
                    if i.reset {
                        flags |= output::FLAG_RESET;
                        Counters::add(&c.resets, 1);
                    }
                    i.kl
                }
                Err(_) => 0.0, // unreachable: a step without data cannot be refused
            };
            let step_ns = monotonic_ns();

            let header = OutputHeader {
                flags,
                dropped_before: dropped_before.min(u32::MAX as u64) as u32,
                seq: slot.seq,
                source_ts: slot.source_ts,
                recv_ns: slot.recv_ns,
                publish_ns: 0,
                kl,
            };
            output::encode(&header, self.decoder.behavior(), self.decoder.mean(), self.decoder.lag1_mean(), &mut msg);
            output::set_publish_ns(&mut msg, monotonic_ns());
            if self.out.send(&msg[..], zmq::DONTWAIT).is_err() {
                Counters::add(&c.output_dropped, 1);
            }
            let sent_ns = monotonic_ns();

            let mut rec = TimingRecord {
                seq: slot.seq,
                flags,
                recv_ns: slot.recv_ns,
                push_ns: slot.push_ns,
                pop_ns,
                step_ns,
                sent_ns,
                predict_ns,
                dims: d.min(MAX_BEHAVIOR) as u8,
                has_truth: slot.has_behavior,
                behavior: [0.0; MAX_BEHAVIOR],
                truth: [0.0; MAX_BEHAVIOR],
            };
            let k = rec.dims as usize;
            rec.behavior[..k].copy_from_slice(&self.decoder.behavior()[..k]);
            if slot.has_behavior {
                rec.truth[..k].copy_from_slice(&slot.behavior[..k.min(slot.behavior.len())]);
            }
            if self.stats.try_push(rec).is_err() {
                Counters::add(&c.stats_dropped, 1);
            }
            Counters::add(&c.decoded, 1);
            if flags & output::FLAG_PREDICT_ONLY != 0 {
                Counters::add(&c.predict_only, 1);
            }
            last_seq = Some(slot.seq);
            expected_ns = Some(slot.recv_ns + self.bin_ns);
            let _ = self.free.try_push(slot);
        }
        self.decoder
    }
}
