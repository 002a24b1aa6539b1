//! The decode thread: pops bins, keeps the sequence honest (gaps, restarts, duplicates),
//! runs the filter step, publishes, and hands a timing record to the stats thread.
//!
//! Falling behind: a bin is stale when it was received more than `stale` ago. While the
//! bin at hand is stale and newer ones are waiting, the decoder skips ahead to the first
//! bin that is not; bins that complete together (one acquisition block can hold many) are
//! not stale and are all decoded. Skipped bins, like bins that never arrived, are predicted
//! through (predict-only steps, so the state stays on the right clock) and reported in the
//! next output's `dropped_before` with the GAP flag. A gap longer than `max_gap` resets the
//! decoder to its prior instead. Nothing stale is ever decoded silently: a duplicate or late
//! bin in the backlog never displaces a fresher one (it is counted out of order), and a
//! restart in the backlog is not lost (the bin kept from the restarted stream is decoded as
//! its first, with RESTART|RESET, and the bins skipped before it in `dropped_before`).
//!
//! Per bin this thread allocates nothing, takes no lock, and makes no system call but the
//! socket's and, while no bin is due, a timed park: it sleeps until shortly before the next
//! bin is due, then spins (`Decode::wait`).

use super::clock::monotonic_ns;
use super::source::{BinSlot, Counters};
use super::stats::{TimingRecord, MAX_BEHAVIOR};
use super::step::{is_restart, Outcome, Step};
use crate::decoder::Decoder;
use crate::wire::output;
use ringbuf::traits::{Consumer, Producer};
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
    /// The per-bin step (sequence checks, decoder step, output header).
    pub step: Step,
    pub core: Option<usize>,
    pub realtime: Option<i32>,
    /// Told whether the thread's set-up (real-time priority) worked, before the first bin.
    pub ready: crossbeam_channel::Sender<Result<(), String>>,
}

/// Start spinning at least this long before a bin is due: a timed park wakes up late.
const MIN_LEAD_NS: u64 = 250_000;
/// Added to the lateness a park showed when the lead grows to cover it.
const LEAD_MARGIN_NS: u64 = 50_000;

/// The spin lead after a timed park that woke `late` ns after it was asked to: the recent
/// worst lateness plus a margin, forgotten by 1/64 a park, within [MIN_LEAD, bin / 4] so that
/// spinning never takes more than a quarter of the core. (On a VM a 19 ms park wakes 130 to
/// 1,800 us late, so a fixed lead left the decoder asleep when most 20 ms bins came.)
fn next_lead(lead: u64, late: u64, bin_ns: u64) -> u64 {
    (lead - lead / 64).max(late + LEAD_MARGIN_NS).clamp(MIN_LEAD_NS, (bin_ns / 4).max(MIN_LEAD_NS))
}

/// Returns a slot to the acquisition thread. The return ring has room for every slot there
/// is, so this cannot fail; if it ever did, the slot would be freed here, on the decode
/// thread, which the debug assertion catches.
fn give_back(free: &mut impl Producer<Item = BinSlot>, slot: BinSlot) {
    let returned = free.try_push(slot);
    debug_assert!(returned.is_ok(), "the return ring holds every slot");
}

/// What [`catch_up`] did with the bins it did not keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CaughtUp {
    /// Bins replaced by a newer one (their sequence numbers lie between the last decoded
    /// bin and the kept one, or before a restart): reported in `dropped_before`.
    skipped: u64,
    /// Duplicates and late bins dropped on the way (counted as out of order).
    stale: u64,
}

/// The decoder is behind when the bin at hand is stale (`is_stale`) and newer ones wait:
/// takes waiting bins while the kept one is stale, keeps the one to decode in `slot`, and
/// returns the others to `free`. A duplicate or late bin never displaces a fresher one (it is dropped as stale),
/// and a restart is not lost when newer bins of the restarted stream replace it: they
/// inherit its restart.
fn catch_up(
    slot: &mut BinSlot,
    ring: &mut impl Consumer<Item = BinSlot>,
    free: &mut impl Producer<Item = BinSlot>,
    last: Option<u64>,
    is_stale: impl Fn(&BinSlot) -> bool,
) -> CaughtUp {
    let mut done = CaughtUp::default();
    while is_stale(slot) {
        let Some(mut newer) = ring.try_pop() else { break };
        let kept_is_stale = !is_restart(slot, last) && matches!(last, Some(l) if slot.seq <= l);
        let newer_restarts = is_restart(&newer, Some(slot.seq));
        if kept_is_stale || newer_restarts || newer.seq > slot.seq {
            if !kept_is_stale {
                newer.restart = newer_restarts || is_restart(slot, last);
            }
            let old = std::mem::replace(slot, newer);
            if kept_is_stale {
                done.stale += 1;
            } else {
                done.skipped += 1;
            }
            give_back(free, old);
        } else {
            done.stale += 1;
            give_back(free, newer);
        }
    }
    done
}

impl Decode {
    /// Waits for a bin. Bins come on a clock: sleep until `lead` before the expected
    /// arrival, then spin (a woken thread costs ~30 us, a spinning one sees the bin at
    /// once), and if it is more than `spin` late, nap until the producer unparks us. The
    /// lead follows how late the timed parks wake ([`next_lead`]). A `spin` of a bin width
    /// or more never sleeps ahead: the thread spins from one bin to the next (for a core of
    /// its own, where no wake-up is the lowest latency).
    fn wait(&mut self, expected_ns: Option<u64>, lead: &mut u64) -> Option<BinSlot> {
        let spin_ns = self.spin.as_nanos() as u64;
        let sleep_ahead = spin_ns < self.bin_ns;
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
            if sleep_ahead && now + *lead < expected {
                let until = expected - *lead;
                std::thread::park_timeout(Duration::from_nanos(until - now));
                let woke = monotonic_ns();
                if woke > until {
                    *lead = next_lead(*lead, woke - until, self.bin_ns);
                }
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
        if let Err(e) = super::clock::tighten_timer_slack() {
            eprintln!("warning: decode thread: {e}");
        }
        let setup = self.realtime.map_or(Ok(()), super::clock::set_realtime);
        let failed = setup.is_err();
        let _ = self.ready.send(setup);
        if failed {
            return self.decoder;
        }
        let (d, l) = (self.decoder.behavior_dims(), self.decoder.latents());
        let mut msg = vec![0u8; output::len(d, l)];
        let mut expected_ns: Option<u64> = None;
        let mut lead = MIN_LEAD_NS;
        let c = self.counters.clone();
        loop {
            let t0 = monotonic_ns();
            self.decoder.predict(); // the next bin's prediction, before it arrives
            let predict_ns = monotonic_ns() - t0;
            let Some(mut slot) = self.wait(expected_ns, &mut lead) else { break };
            let now = monotonic_ns();
            let stale_ns = self.stale_ns;
            let is_stale = |b: &BinSlot| now.saturating_sub(b.recv_ns) > stale_ns;
            let caught = catch_up(&mut slot, &mut self.ring, &mut self.free, self.step.last_seq(), is_stale);
            Counters::add(&c.out_of_order, caught.stale);
            let pop_ns = monotonic_ns();

            let header = match self.step.apply(&mut *self.decoder, &slot, caught.skipped, &c) {
                Outcome::Decoded(h) => h,
                Outcome::OutOfOrder => {
                    give_back(&mut self.free, slot);
                    continue;
                }
            };
            let step_ns = monotonic_ns();

            output::encode(&header, self.decoder.behavior(), self.decoder.mean(), self.decoder.lag1_mean(), &mut msg);
            output::set_publish_ns(&mut msg, monotonic_ns());
            if self.out.send(&msg[..], zmq::DONTWAIT).is_err() {
                Counters::add(&c.output_dropped, 1);
            }
            let sent_ns = monotonic_ns();

            let mut rec = TimingRecord {
                seq: slot.seq,
                flags: header.flags,
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
            expected_ns = Some(slot.recv_ns + self.bin_ns);
            give_back(&mut self.free, slot);
            // From the second bin on, the whole loop is the live per-bin path.
            super::hot_path::set(true);
        }
        super::hot_path::set(false);
        self.decoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbuf::traits::Split;
    use ringbuf::HeapRb;

    fn slot(seq: u64, restart: bool) -> BinSlot {
        BinSlot { seq, restart, ..BinSlot::new(1, 0) }
    }

    /// Catches up over `waiting` after `first`: returns the kept bin, its restart flag, and
    /// what happened to the others (every slot must come back to `free`).
    fn run(first: BinSlot, waiting: &[(u64, bool)], last: Option<u64>) -> (u64, bool, CaughtUp) {
        let (mut prod, mut ring) = HeapRb::<BinSlot>::new(16).split();
        let (mut free, mut back) = HeapRb::<BinSlot>::new(16).split();
        for &(seq, restart) in waiting {
            let _ = prod.try_push(slot(seq, restart));
        }
        let mut kept = first;
        let done = catch_up(&mut kept, &mut ring, &mut free, last, |_| true);
        let returned = std::iter::from_fn(|| back.try_pop()).count() as u64;
        assert_eq!(returned, done.skipped + done.stale, "every slot not kept goes back");
        (kept.seq, kept.restart, done)
    }

    #[test]
    fn the_lead_covers_the_lateness_seen_then_forgets_it() {
        let bin = 20_000_000;
        // Lateness under the minimum leaves it there.
        assert_eq!(next_lead(MIN_LEAD_NS, 100_000, bin), MIN_LEAD_NS);
        // A late wake-up grows it to that lateness plus the margin...
        let grown = next_lead(MIN_LEAD_NS, 1_700_000, bin);
        assert_eq!(grown, 1_750_000);
        // ...then it decays by 1/64 a park while the parks are on time...
        assert_eq!(next_lead(grown, 0, bin), 1_750_000 - 1_750_000 / 64);
        let mut l = grown;
        for _ in 0..1000 {
            l = next_lead(l, 0, bin);
        }
        assert_eq!(l, MIN_LEAD_NS);
        // ...and never exceeds a quarter of a bin (nor falls below the minimum for short bins).
        assert_eq!(next_lead(MIN_LEAD_NS, 9_000_000, bin), bin / 4);
        assert_eq!(next_lead(MIN_LEAD_NS, 900_000, 1_000_000), MIN_LEAD_NS);
    }

    #[test]
    fn newest_wins_and_the_skipped_are_counted() {
        assert_eq!(
            run(slot(11, false), &[(12, false), (13, false)], Some(10)),
            (13, false, CaughtUp { skipped: 2, stale: 0 })
        );
        assert_eq!(run(slot(11, false), &[], Some(10)), (11, false, CaughtUp::default()));
    }

    #[test]
    fn late_bins_never_displace_fresher_ones() {
        // 13 arrives before the late 8 and the duplicate 13: 13 is decoded.
        let r = run(slot(12, false), &[(13, false), (8, false), (13, false)], Some(11));
        assert_eq!(r, (13, false, CaughtUp { skipped: 1, stale: 2 }));
        // A stale bin first in line gives way to the next fresh one without counting as skipped.
        let r = run(slot(9, false), &[(12, false)], Some(11));
        assert_eq!(r, (12, false, CaughtUp { skipped: 0, stale: 1 }));
    }

    #[test]
    fn a_restart_in_the_backlog_is_not_lost() {
        // The old stream was at 29; 0 (stream start), 1, 2 of the new one are waiting.
        let r = run(slot(30, false), &[(0, true), (1, false), (2, false)], Some(29));
        assert_eq!(r, (2, true, CaughtUp { skipped: 3, stale: 0 }));
        // Without the flag: a jump back of more than 64 from the newest seen.
        let r = run(slot(200, false), &[(100, false), (101, false)], Some(150));
        assert_eq!(r, (101, true, CaughtUp { skipped: 2, stale: 0 }));
        // A jump back of 64 is a late bin, not a restart.
        let r = run(slot(200, false), &[(136, false)], Some(150));
        assert_eq!(r, (200, false, CaughtUp { skipped: 0, stale: 1 }));
    }
}
