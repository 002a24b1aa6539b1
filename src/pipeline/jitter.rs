//! `latentloop jitter`: the scheduling noise floor of a core, i.e. the latency tail that no
//! decoder running on it can beat.
//!
//! A thread spins on the core reading CLOCK_MONOTONIC. A gap between two reads longer than
//! [`STALL_NS`] is time the thread did not run: the hypervisor ran something else (steal),
//! an interrupt or a kernel thread took the core, or another task was scheduled. From the
//! recorded stalls the run replays an ideal decoder: a bin arrives at the start of every
//! period and needs `work` of CPU time, so its latency is `work` plus the stalls it lives
//! through. That latency's tail is a floor under `run`'s receive-to-publish on this core,
//! the same way cyclictest bounds any real-time task. Measure it on a rig before a session,
//! on the core the decoder gets (`decode_core`), with its `realtime_priority`.

use super::clock::{monotonic_ns, pin_current_thread, set_realtime};
use super::stats::{hist, StageSummary};
use serde::Serialize;

/// A gap between two clock reads at least this long is a stall. An undisturbed read loop
/// takes tens of ns an iteration.
pub const STALL_NS: u64 = 2_000;
/// Stalls recorded per second at most (16 bytes each, reserved before the loop so that it
/// never allocates); a run that fills them stops early and says so.
const MAX_STALLS_PER_SECOND: f64 = 50_000.0;
/// Stall counts are also reported over these lengths (us).
const OVER_US: [u64; 5] = [10, 50, 150, 1_000, 10_000];

/// What to watch and which ideal decoder to replay; checked when made (`new`).
#[derive(Clone, Copy, Debug)]
pub struct JitterOptions {
    seconds: f64,
    core: Option<usize>,
    realtime: Option<i32>,
    /// The bin width: one ideal bin arrives per period.
    period_ns: u64,
    /// CPU time the ideal decoder needs per bin.
    work_ns: u64,
}

impl JitterOptions {
    /// Options from the command line's units, refused with the flag and the reason.
    pub fn new(
        seconds: f64,
        core: Option<usize>,
        realtime: Option<i32>,
        bin_ms: f64,
        work_us: f64,
    ) -> Result<Self, String> {
        if !(seconds > 0.0 && seconds <= 3600.0) {
            return Err(format!("--seconds must be in (0, 3600], not {seconds}"));
        }
        if !(bin_ms > 0.0 && bin_ms.is_finite()) {
            return Err(format!("--bin-ms must be positive, not {bin_ms}"));
        }
        if !(work_us >= 0.0 && work_us < bin_ms * 1e3) {
            return Err(format!("--work-us must be >= 0 and shorter than a bin ({} us), not {work_us}", bin_ms * 1e3));
        }
        let ns = |x: f64| (x * 1e3).round() as u64;
        Ok(JitterOptions { seconds, core, realtime, period_ns: ns(bin_ms * 1e3).max(1), work_ns: ns(work_us) })
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct StallsOver {
    pub us: u64,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct JitterReport {
    pub core: Option<usize>,
    pub realtime_priority: Option<i32>,
    /// How long the core was watched (less than asked only when `truncated`).
    pub seconds: f64,
    pub truncated: bool,
    pub stall_threshold_us: f64,
    pub stalls: u64,
    /// Time lost in stalls over the time watched.
    pub stolen_fraction: f64,
    pub stalls_over: Vec<StallsOver>,
    /// Lengths of the stalls.
    pub stall: StageSummary,
    pub bin_ms: f64,
    pub work_us: f64,
    /// Latency of the ideal decoder, one per bin: `work` plus the stalls it met.
    pub ideal_decoder: StageSummary,
    /// Ideal bins whose latency exceeded one bin width.
    pub ideal_deadline_misses: u64,
}

impl JitterReport {
    /// One line for people.
    pub fn line(&self) -> String {
        let d = &self.ideal_decoder;
        format!(
            "{:.1} s on {}: {} stalls >= {} us took {:.2}% of the time, longest {:.0} us; an ideal decoder \
             needing {:.0} us per {} ms bin: p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us, {} over the deadline",
            self.seconds,
            self.core.map_or("any core".into(), |c| format!("core {c}")),
            self.stalls,
            self.stall_threshold_us,
            self.stolen_fraction * 100.0,
            self.stall.max_us,
            self.work_us,
            self.bin_ms,
            d.p50_us,
            d.p99_us,
            d.p999_us,
            d.max_us,
            self.ideal_deadline_misses
        )
    }
}

/// Watches the core for `o.seconds` on a thread of its own, then replays the ideal decoder.
pub fn measure(o: &JitterOptions) -> Result<JitterReport, String> {
    let o = *o;
    let watched = std::thread::Builder::new()
        .name("ll-jitter".into())
        .spawn(move || -> Result<_, String> {
            if let Some(core) = o.core {
                pin_current_thread(core)?;
            }
            if let Some(p) = o.realtime {
                set_realtime(p)?;
            }
            Ok(watch(o.seconds))
        })
        .map_err(|e| format!("cannot start the measuring thread: {e}"))?
        .join()
        .map_err(|_| "the measuring thread panicked".to_string())??;
    Ok(report(&o, &watched))
}

/// What the spinning thread saw: stalls as (last read before, first read after).
struct Watched {
    start: u64,
    end: u64,
    stalls: Vec<(u64, u64)>,
    truncated: bool,
}

fn watch(seconds: f64) -> Watched {
    let mut stalls = Vec::with_capacity((seconds * MAX_STALLS_PER_SECOND) as usize);
    let start = monotonic_ns();
    let stop = start + (seconds * 1e9) as u64;
    let (mut last, mut truncated) = (start, false);
    loop {
        let now = monotonic_ns();
        if now - last >= STALL_NS {
            if stalls.len() == stalls.capacity() {
                truncated = true;
                break;
            }
            stalls.push((last, now));
        }
        last = now;
        if now >= stop {
            break;
        }
    }
    Watched { start, end: last, stalls, truncated }
}

fn report(o: &JitterOptions, w: &Watched) -> JitterReport {
    let mut stall = hist();
    let mut lost = 0u64;
    for &(a, b) in &w.stalls {
        let _ = stall.record(b - a);
        lost += b - a;
    }
    let stalls_over = OVER_US
        .iter()
        .map(|&us| StallsOver { us, count: w.stalls.iter().filter(|(a, b)| b - a >= us * 1000).count() as u64 })
        .collect();
    let bins = (w.end - w.start) / o.period_ns;
    let latencies = ideal_latencies(&w.stalls, w.start, o.period_ns, bins, o.work_ns);
    let mut ideal = hist();
    for &l in &latencies {
        let _ = ideal.record(l.max(1));
    }
    let elapsed = (w.end - w.start) as f64;
    JitterReport {
        core: o.core,
        realtime_priority: o.realtime,
        seconds: elapsed / 1e9,
        truncated: w.truncated,
        stall_threshold_us: STALL_NS as f64 / 1e3,
        stalls: w.stalls.len() as u64,
        stolen_fraction: if elapsed > 0.0 { lost as f64 / elapsed } else { 0.0 },
        stalls_over,
        stall: StageSummary::of("stall", "a gap between two clock reads of the spinning thread", &stall),
        bin_ms: o.period_ns as f64 / 1e6,
        work_us: o.work_ns as f64 / 1e3,
        ideal_decoder: StageSummary::of(
            "ideal_decoder",
            "a bin arriving at each period's start, needing work_us of CPU, delayed only by the stalls",
            &ideal,
        ),
        ideal_deadline_misses: latencies.iter().filter(|&&l| l > o.period_ns).count() as u64,
    }
}

/// The latency of a job needing `work` ns of CPU that arrives at `start + k period` for
/// k in 0..bins, on a core that is taken away during `stalls` (sorted, disjoint (from, to)
/// intervals): the job runs whenever the core is not stalled, so it finishes `work` of
/// running time after it arrives. A job arriving inside a stall starts when the stall ends.
pub fn ideal_latencies(stalls: &[(u64, u64)], start: u64, period: u64, bins: u64, work: u64) -> Vec<u64> {
    let mut first = 0; // the first stall that ends after the current arrival
    (0..bins)
        .map(|k| {
            let arrive = start + k * period;
            while first < stalls.len() && stalls[first].1 <= arrive {
                first += 1;
            }
            let (mut at, mut left) = (arrive, work);
            for &(from, to) in &stalls[first..] {
                if from >= at + left {
                    break;
                }
                left -= from.saturating_sub(at);
                at = to;
            }
            at + left - arrive
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ideal_decoder_runs_between_stalls() {
        // Bins every 100 ns needing 30 ns; stalls over [20, 50) and [110, 200) and [205, 210).
        let stalls = [(20, 50), (110, 200), (205, 210)];
        let l = ideal_latencies(&stalls, 0, 100, 4, 30);
        // Bin 0: runs 0..20, stalled to 50, runs 50..60: 60.
        // Bin 1 (at 100): runs 100..110, stalled to 200, runs 200..205, stalled to 210,
        // runs 210..225: 125.
        // Bin 2 (at 200): the core is free at 200 until 205, then 210..235: 35.
        // Bin 3 (at 300): nothing in the way: 30.
        assert_eq!(l, vec![60, 125, 35, 30]);
        // Arriving inside a stall: starts at its end.
        assert_eq!(ideal_latencies(&[(0, 40)], 10, 100, 1, 5), vec![35]);
        // No stalls: every latency is the work.
        assert_eq!(ideal_latencies(&[], 0, 10, 3, 7), vec![7, 7, 7]);
    }

    #[test]
    fn options_are_checked() {
        let o = JitterOptions::new(1.0, Some(1), None, 1.0, 50.0).unwrap();
        assert_eq!((o.period_ns, o.work_ns), (1_000_000, 50_000));
        let err = |s, b, w| JitterOptions::new(s, None, None, b, w).unwrap_err();
        assert!(err(0.0, 1.0, 50.0).contains("--seconds"));
        assert!(err(f64::NAN, 1.0, 50.0).contains("--seconds"));
        assert!(err(1.0, 0.0, 50.0).contains("--bin-ms must be positive"));
        assert!(err(1.0, -1.0, 0.0).contains("--bin-ms must be positive"));
        assert!(err(1.0, 1.0, 1000.0).contains("shorter than a bin"));
        assert!(err(1.0, 1.0, -5.0).contains("--work-us must be >= 0"));
        assert!(err(1.0, 1.0, f64::NAN).contains("--work-us"));
    }

    #[test]
    fn a_short_watch_reports_consistent_figures() {
        let r = measure(&JitterOptions::new(0.05, None, None, 1.0, 10.0).unwrap()).unwrap();
        assert!(r.seconds >= 0.05 && r.seconds < 1.0, "{}", r.seconds);
        assert!((0.0..=1.0).contains(&r.stolen_fraction));
        assert_eq!(r.ideal_decoder.count, (r.seconds * 1e9).round() as u64 / 1_000_000);
        // Never faster than the work itself.
        assert!(r.ideal_decoder.p50_us >= 10.0 - 0.01, "{}", r.ideal_decoder.p50_us);
        assert_eq!(r.stall.count, r.stalls);
    }
}
