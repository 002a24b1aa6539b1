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
//! Each decoded bin also goes, after it was published, to the control thread (recent bins
//! for calibration) and to the shadow decoders, through taps of the same kind.
//!
//! Every bin it takes, and what became of it (decoded and published, skipped, dropped as
//! stale or out of order), goes to the recorder thread as a copy in a preallocated slot
//! ([`RecordTap`]); a full ring costs a counted record, never a wait.
//!
//! Per bin this thread allocates nothing, takes no lock, and makes no system call but the
//! socket's and, while no bin is due, a timed park: it sleeps until shortly before the next
//! bin is due, then spins ([`Waiter`]).

use super::changes::{Applied, Inbox, What};
use super::clock::monotonic_ns;
use super::record::{Published, RecordTap};
use super::source::{BinSlot, Counters};
use super::stats::{TimingRecord, MAX_BEHAVIOR};
use super::step::{is_restart, Outcome, Step};
use super::wait::Waiter;
use crate::decoder::Decoder;
use crate::session::Decision;
use crate::wire::output::{self, OutputHeader};
use ringbuf::traits::{Consumer, Producer};
use ringbuf::{HeapCons, HeapProd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct Decode {
    pub decoder: Box<dyn Decoder>,
    pub ring: HeapCons<BinSlot>,
    pub free: HeapProd<BinSlot>,
    pub out: zmq::Socket,
    pub stats: HeapProd<TimingRecord>,
    /// Every bin and what became of it, to the recorder thread (None: not recording).
    pub record: Option<RecordTap>,
    /// Changes from the control thread, applied between bins (None: no control socket).
    pub changes: Option<Inbox>,
    /// Every decoded bin to the control thread too (calibrate, adaptation).
    pub feed: Option<RecordTap>,
    /// ...and to the shadow decoders (pipeline/shadow.rs), after it was published.
    pub shadow: Option<RecordTap>,
    pub counters: Arc<Counters>,
    pub stop: Arc<AtomicBool>,
    pub waiter: Waiter,
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
    mut passed_over: impl FnMut(&BinSlot, Decision),
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
                passed_over(&old, Decision::Stale);
            } else {
                done.skipped += 1;
                passed_over(&old, Decision::Skipped);
            }
            give_back(free, old);
        } else {
            done.stale += 1;
            passed_over(&newer, Decision::Stale);
            give_back(free, newer);
        }
    }
    done
}

impl Decode {
    /// Applies the control thread's changes (between bins): a decoder swapped in (its state
    /// carried over where it can be, else it starts from its prior with RESET), a reset at
    /// the next bin, pause, a mark. Each goes into the session at this place, and what it
    /// replaced goes back to the control thread to be freed there.
    fn apply_changes(&mut self, msg: &mut Box<[u8]>) {
        let Some(inbox) = self.changes.as_mut() else { return };
        while let Some(change) = inbox.take() {
            let mut report = Applied { id: change.id, after_seq: self.step.last_seq(), carried: false, replaced: None };
            match change.what {
                What::Decoder { mut decoder, msg: mut buffer, carry } => {
                    report.carried = carry && decoder.carry_state_from(&*self.decoder);
                    if !report.carried {
                        self.step.request_reset();
                    }
                    std::mem::swap(&mut self.decoder, &mut decoder);
                    std::mem::swap(msg, &mut buffer);
                    report.replaced = Some((decoder, buffer));
                }
                What::Reset => self.step.request_reset(),
                What::Pause(on) => self.step.set_paused(on),
                What::Mark => {}
            }
            if let Some(r) = self.record.as_mut() {
                r.applied(change.id);
            }
            inbox.report(report);
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
        let mut msg = vec![0u8; output::len(d, l)].into_boxed_slice();
        let mut expected_ns: Option<u64> = None;
        let c = self.counters.clone();
        // The decoder the session starts with is change 0, applied before the first bin.
        if let Some(r) = self.record.as_mut() {
            r.applied(0);
        }
        loop {
            self.apply_changes(&mut msg);
            let t0 = monotonic_ns();
            self.decoder.predict(); // the next bin's prediction, before it arrives
            let predict_ns = monotonic_ns() - t0;
            let (ring, inbox) = (&mut self.ring, &self.changes);
            let got = self.waiter.wait(expected_ns, &self.stop, || match ring.try_pop() {
                Some(s) => Some(Some(s)),
                None => inbox.as_ref().is_some_and(Inbox::pending).then_some(None),
            });
            let mut slot = match got {
                None => break,
                Some(None) => continue, // a change: applied before anything else
                Some(Some(s)) => s,
            };
            let now = monotonic_ns();
            let stale_ns = self.stale_ns;
            let is_stale = |b: &BinSlot| now.saturating_sub(b.recv_ns) > stale_ns;
            let record = &mut self.record;
            let passed_over = |b: &BinSlot, why| {
                if let Some(r) = record.as_mut() {
                    r.bin(b, why, 0, now, None);
                }
            };
            let last = self.step.last_seq();
            let caught = catch_up(&mut slot, &mut self.ring, &mut self.free, last, is_stale, passed_over);
            Counters::add(&c.out_of_order, caught.stale);
            let pop_ns = monotonic_ns();

            let header = match self.step.apply(&mut *self.decoder, &slot, caught.skipped, &c) {
                Outcome::Decoded(h) => h,
                Outcome::OutOfOrder => {
                    if let Some(r) = self.record.as_mut() {
                        r.bin(&slot, Decision::OutOfOrder, caught.skipped, pop_ns, None);
                    }
                    give_back(&mut self.free, slot);
                    continue;
                }
            };
            let step_ns = monotonic_ns();

            let dec = &*self.decoder;
            output::encode(&header, dec.behavior(), dec.mean(), dec.lag1_mean(), &mut msg);
            let publish_ns = monotonic_ns();
            output::set_publish_ns(&mut msg, publish_ns);
            let output_dropped = self.out.send(&msg[..], zmq::DONTWAIT).is_err();
            if output_dropped {
                Counters::add(&c.output_dropped, 1);
            }
            let sent_ns = monotonic_ns();

            let rec = TimingRecord {
                seq: slot.seq,
                flags: header.flags,
                recv_ns: slot.recv_ns,
                push_ns: slot.push_ns,
                pop_ns,
                step_ns,
                sent_ns,
                predict_ns,
                source_ns: slot.source_ns,
                dims: 0,
                has_truth: false,
                behavior: [0.0; MAX_BEHAVIOR],
                truth: [0.0; MAX_BEHAVIOR],
            }
            .with_behavior(dec.behavior(), &slot);
            if self.stats.try_push(rec).is_err() {
                Counters::add(&c.stats_dropped, 1);
            }
            let header = OutputHeader { publish_ns, ..header };
            let p = Published::of(&header, dec, step_ns, output_dropped);
            for tap in [self.record.as_mut(), self.feed.as_mut(), self.shadow.as_mut()].into_iter().flatten() {
                tap.bin(&slot, Decision::Decoded, caught.skipped, pop_ns, Some(&p));
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
        let done = catch_up(&mut kept, &mut ring, &mut free, last, |_| true, |_, _| {});
        let returned = std::iter::from_fn(|| back.try_pop()).count() as u64;
        assert_eq!(returned, done.skipped + done.stale, "every slot not kept goes back");
        (kept.seq, kept.restart, done)
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
