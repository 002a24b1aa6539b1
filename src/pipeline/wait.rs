//! How the decode thread waits for the next bin without a wake-up on the critical path.
//!
//! Bins come on a clock: the thread sleeps until `lead` before the expected arrival, then
//! spins (a woken thread costs ~30 us, a spinning one sees the bin at once), and if the bin
//! is more than `spin` late, naps until the producer unparks it. The lead follows how late
//! the timed parks wake ([`next_lead`]). A `spin` of a bin width or more never sleeps ahead:
//! the thread spins from one bin to the next (for a core of its own, where no wake-up is the
//! lowest latency). No allocation, lock or system call but the timed parks.

use super::clock::monotonic_ns;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

/// The waiting state of one thread.
pub struct Waiter {
    spin_ns: u64,
    bin_ns: u64,
    lead: u64,
}

impl Waiter {
    pub fn new(spin: Duration, bin_ns: u64) -> Self {
        Waiter { spin_ns: spin.as_nanos() as u64, bin_ns, lead: MIN_LEAD_NS }
    }

    /// Waits until `poll` has something (a bin, or a change to apply between bins), the next
    /// bin being expected at `expected_ns`; `None` once `stop` is set.
    pub fn wait<T>(
        &mut self,
        expected_ns: Option<u64>,
        stop: &AtomicBool,
        mut poll: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        let sleep_ahead = self.spin_ns < self.bin_ns;
        let start = monotonic_ns();
        let expected = expected_ns.unwrap_or(start);
        loop {
            if let Some(x) = poll() {
                return Some(x);
            }
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let now = monotonic_ns();
            if sleep_ahead && now + self.lead < expected {
                let until = expected - self.lead;
                std::thread::park_timeout(Duration::from_nanos(until - now));
                let woke = monotonic_ns();
                if woke > until {
                    self.lead = next_lead(self.lead, woke - until, self.bin_ns);
                }
            } else if now < expected.max(start) + self.spin_ns {
                std::hint::spin_loop();
            } else {
                std::thread::park_timeout(Duration::from_millis(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
