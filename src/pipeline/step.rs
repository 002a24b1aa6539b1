//! The per-bin step: what happens to one bin once the decode thread (or `replay`, or `eval`)
//! has it in hand. Sequence checks (gap, duplicate, restart), the decoder's step with the
//! bin's data, the flags and the header of the output. No clock, socket or file in here: the
//! same bins and the same decisions give the same outputs, bit for bit, whoever drives it.
//!
//! - A restart (the publisher's stream-start flag, or a jump back of more than
//!   [`REORDER_WINDOW`]) resets the decoder and flags RESTART|RESET; bins skipped before the
//!   first bin of the new stream are reported (`dropped_before`), not predicted through.
//! - A duplicate or late bin (sequence number not above the last one) is dropped:
//!   [`Outcome::OutOfOrder`], no output.
//! - A gap of missing or skipped bins is predicted through (predict-only steps, so the state
//!   stays on the bin clock) and flagged GAP; a gap longer than `max_gap` resets instead.
//! - A bin refused by the source (REJECTED), a bin without data, and a bin the decoder
//!   refuses (non-finite values) are predict-only steps.
//! - Control changes between bins: a reset requested (the next bin starts from the prior,
//!   RESET) and pause (outputs flagged PAUSED).
//!
//! Allocates nothing; the counters are relaxed atomics.

use super::source::{BinSlot, Counters, SlotKind};
use crate::decoder::Decoder;
use crate::wire::output::{self, OutputHeader};

/// A sequence number this far below the last one is a restarted publisher, not a late bin.
pub const REORDER_WINDOW: u64 = 64;

/// Whether `slot` starts a new stream after `last` (the last sequence number decoded or
/// kept): the publisher said so, or the sequence jumped back by more than the window.
pub fn is_restart(slot: &BinSlot, last: Option<u64>) -> bool {
    slot.restart || matches!(last, Some(l) if slot.seq + REORDER_WINDOW < l)
}

/// What the step did with a bin.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// The bin was decoded (perhaps predict-only): publish this header with the decoder's
    /// behaviour, mean and lag-1 mean. `publish_ns` is left 0 for the caller to stamp.
    Decoded(OutputHeader),
    /// A duplicate or late bin: dropped, counted as out of order, nothing published.
    OutOfOrder,
}

/// The sequence state the step carries from bin to bin, and the two settings control
/// changes between bins (pause, a reset at the next bin).
#[derive(Clone, Debug)]
pub struct Step {
    last_seq: Option<u64>,
    /// Missing or skipped bins the decoder predicts through; a longer gap resets it.
    max_gap: u64,
    /// Outputs carry PAUSED.
    paused: bool,
    /// The next decoded bin starts from the prior (RESET).
    reset_pending: bool,
}

impl Step {
    pub fn new(max_gap: u64) -> Self {
        Step { last_seq: None, max_gap, paused: false, reset_pending: false }
    }

    /// Outputs from the next bin on carry PAUSED (or no longer do).
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The decoder starts over from its prior at the next decoded bin, flagged RESET.
    pub fn request_reset(&mut self) {
        self.reset_pending = true;
    }

    /// The last sequence number decoded (None before the first bin).
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Decodes `slot`. `skipped` is how many newer-than-decoded bins the caller passed over to
    /// reach it (the decode thread's catch-up when it fell behind; 0 for `eval` and for a
    /// session replayed with its recorded decisions, which passes the recorded value).
    pub fn apply(&mut self, decoder: &mut dyn Decoder, slot: &BinSlot, skipped: u64, c: &Counters) -> Outcome {
        let mut flags = 0u16;
        let mut dropped_before = 0u64;
        let last = self.last_seq;
        if is_restart(slot, last) || last.is_none() {
            if last.is_some() {
                decoder.reset();
                flags |= output::FLAG_RESTART | output::FLAG_RESET;
                Counters::add(&c.restarts, 1);
                Counters::add(&c.resets, 1);
            }
            // Bins skipped before the first bin of a (re)started stream are reported, not
            // predicted through: the decoder starts from its prior at this one.
            if skipped > 0 {
                flags |= output::FLAG_GAP;
                dropped_before = skipped;
                Counters::add(&c.skipped, skipped);
            }
        } else if let Some(l) = last {
            if slot.seq <= l {
                Counters::add(&c.out_of_order, 1);
                return Outcome::OutOfOrder;
            }
            let gap = slot.seq - l - 1;
            if gap > 0 {
                flags |= output::FLAG_GAP;
                dropped_before = gap;
                Counters::add(&c.skipped, skipped.min(gap));
                Counters::add(&c.missing, gap.saturating_sub(skipped));
                if gap > self.max_gap {
                    decoder.reset();
                    flags |= output::FLAG_RESET;
                    Counters::add(&c.resets, 1);
                } else {
                    for _ in 0..gap {
                        // A step without data cannot be refused.
                        let _ = decoder.step(None);
                    }
                }
            }
        }

        if std::mem::take(&mut self.reset_pending) && flags & output::FLAG_RESET == 0 {
            decoder.reset();
            flags |= output::FLAG_RESET;
            Counters::add(&c.resets, 1);
        }
        if self.paused {
            flags |= output::FLAG_PAUSED;
        }
        let obs = match slot.kind {
            SlotKind::Data => Some(&slot.counts[..]),
            SlotKind::NoData => None,
            SlotKind::Rejected => {
                flags |= output::FLAG_REJECTED;
                None
            }
        };
        let info = decoder.step(obs).or_else(|_| {
            flags |= output::FLAG_REJECTED;
            decoder.step(None)
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
        Counters::add(&c.decoded, 1);
        if flags & output::FLAG_PREDICT_ONLY != 0 {
            Counters::add(&c.predict_only, 1);
        }
        self.last_seq = Some(slot.seq);
        Outcome::Decoded(OutputHeader {
            flags,
            dropped_before: dropped_before.min(u32::MAX as u64) as u32,
            seq: slot.seq,
            source_ts: slot.source_ts,
            recv_ns: slot.recv_ns,
            publish_ns: 0,
            kl,
        })
    }
}
