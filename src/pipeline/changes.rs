//! Changes to a running decoder, prepared off the real-time path and applied between bins.
//!
//! The control thread builds everything a change needs (a new decoder with its output
//! buffer, a mask, a flag), then pushes it into a small SPSC ring. The decode thread takes
//! it between bins (after publishing, before the next prediction, and while it waits for a
//! bin), applies it, marks the place in the session (`applied`), and sends what it replaced
//! back through a second ring, so that the old decoder is freed on the control thread.
//! Nothing changes in the middle of a step, and the decode thread neither allocates nor
//! frees for it.

use crate::decoder::Decoder;
use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

/// What a change does.
pub enum What {
    /// Swap in a decoder; `carry`: take over the old one's state where the latent spaces
    /// match (else start from the prior, RESET on the next output). `msg` is the output
    /// message buffer sized for it.
    Decoder { decoder: Box<dyn Decoder>, msg: Box<[u8]>, carry: bool },
    /// The filter state starts over at the next bin.
    Reset,
    /// Outputs flagged PAUSED (true) or not.
    Pause(bool),
    /// Only a mark in the session (an `event` command: stored with the bin it arrived at).
    Mark,
}

pub struct Change {
    /// The session's change id (its `decoder`/`change` event names it).
    pub id: u64,
    pub what: What,
}

/// A decoder and its output buffer, on their way to be freed off the real-time path.
pub type Replaced = (Box<dyn Decoder>, Box<[u8]>);

/// What the decode thread reports back about a change.
pub struct Applied {
    pub id: u64,
    /// The last sequence number decoded before the change (None before the first bin).
    pub after_seq: Option<u64>,
    /// For a decoder swap: whether the state was carried over.
    pub carried: bool,
    /// What the change replaced (a decoder and its buffer), to drop off the real-time path.
    pub replaced: Option<Replaced>,
}

/// The decode thread's end.
pub struct Inbox {
    pub changes: HeapCons<Change>,
    pub applied: HeapProd<Applied>,
}

/// The control thread's end.
pub struct Outbox {
    pub changes: HeapProd<Change>,
    pub applied: HeapCons<Applied>,
}

/// Changes in flight at once (the control thread waits for each to be applied).
const DEPTH: usize = 4;

pub fn channel() -> (Outbox, Inbox) {
    let (cp, cc) = HeapRb::<Change>::new(DEPTH).split();
    let (ap, ac) = HeapRb::<Applied>::new(DEPTH).split();
    (Outbox { changes: cp, applied: ac }, Inbox { changes: cc, applied: ap })
}

impl Inbox {
    pub fn pending(&self) -> bool {
        !ringbuf::traits::Observer::is_empty(&self.changes)
    }
    pub fn take(&mut self) -> Option<Change> {
        self.changes.try_pop()
    }
    pub fn report(&mut self, a: Applied) {
        // The ring holds as many reports as changes can be in flight.
        let sent = self.applied.try_push(a);
        debug_assert!(sent.is_ok(), "the applied ring has room for every change in flight");
    }
}

impl Outbox {
    /// Sends a change; gives it back if DEPTH changes are already waiting.
    pub fn send(&mut self, c: Change) -> Result<(), Change> {
        self.changes.try_push(c)
    }
    /// Waits up to `timeout` for change `id` to be applied (reports of others are dropped,
    /// with what they replaced, here).
    pub fn wait_applied(&mut self, id: u64, timeout: std::time::Duration) -> Option<Applied> {
        let start = std::time::Instant::now();
        loop {
            while let Some(a) = self.applied.try_pop() {
                if a.id == id {
                    return Some(a);
                }
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
    }
}
