//! Latency and accuracy bookkeeping, on the stats thread (never on the decode thread):
//! one HdrHistogram (ns) per stage, a running behaviour R^2 against ground truth, and the
//! reports written at the end: HdrHistogram percentile-distribution files (.hgrm), a JSON
//! summary, an SVG plot, and periodic snapshots.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// Behaviour dimensions carried per timing record (the running R^2 uses at most these).
pub const MAX_BEHAVIOR: usize = 8;

/// What the decode thread reports about one published bin (fixed size, no allocation).
#[derive(Clone, Copy, Debug)]
pub struct TimingRecord {
    pub seq: u64,
    pub flags: u16,
    pub recv_ns: u64,
    pub push_ns: u64,
    pub pop_ns: u64,
    pub step_ns: u64,
    pub sent_ns: u64,
    /// Duration of the predict done ahead of this bin (off the critical path).
    pub predict_ns: u64,
    /// When the source says the bin ended, on the host clock (0: it does not say).
    pub source_ns: u64,
    pub dims: u8,
    pub has_truth: bool,
    pub behavior: [f32; MAX_BEHAVIOR],
    pub truth: [f32; MAX_BEHAVIOR],
}

impl TimingRecord {
    /// Fills in the decoded behaviour (its first [`MAX_BEHAVIOR`] dims) and, when the bin
    /// carried it, the true behaviour beside it, for the running R^2.
    pub fn with_behavior(mut self, decoded: &[f32], slot: &super::source::BinSlot) -> Self {
        let k = decoded.len().min(MAX_BEHAVIOR);
        self.dims = k as u8;
        self.has_truth = slot.has_behavior;
        self.behavior[..k].copy_from_slice(&decoded[..k]);
        if slot.has_behavior {
            let t = k.min(slot.behavior.len());
            self.truth[..t].copy_from_slice(&slot.behavior[..t]);
        }
        self
    }
}

/// Names and meanings of the six stages a [`TimingRecord`] is split into.
pub type Stages = [(&'static str, &'static str); 6];

/// The stages, in the order of one bin's journey.
pub const STAGES: Stages = [
    ("acquire_to_ring", "bin complete -> in the ring"),
    ("ring_wait", "in the ring -> popped by the decoder"),
    ("filter", "popped -> filter step done"),
    ("publish", "encode + zmq send"),
    ("receive_to_publish", "bin complete -> sent (end to end)"),
    ("predict_ahead", "prediction made before the bin arrived (off the critical path)"),
];

/// The same six times for a shadow decoder (pipeline/shadow.rs): its record's `push_ns` is
/// when the driving decoder published the bin, `pop_ns` when the shadow thread took it.
pub const SHADOW_STAGES: Stages = [
    ("driver_publish", "bin complete -> published by the driving decoder"),
    ("handoff", "-> taken by the shadow thread"),
    ("filter", "taken -> the shadow's filter step done"),
    ("publish", "encode + zmq send"),
    ("receive_to_publish", "bin complete -> the shadow's output sent"),
    ("predict_ahead", "the shadow's prediction of the next bin, made after it published"),
];

/// A latency histogram: 1 ns .. 100 s at 3 significant digits.
pub(crate) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Variance-weighted R^2 over output dims, accumulated bin by bin (FALCON's definition).
#[derive(Clone, Debug, Default)]
pub struct RunningR2 {
    n: f64,
    sse: [f64; MAX_BEHAVIOR],
    sum: [f64; MAX_BEHAVIOR],
    sumsq: [f64; MAX_BEHAVIOR],
    dims: usize,
}

impl RunningR2 {
    pub fn add(&mut self, pred: &[f32], truth: &[f32]) {
        self.dims = pred.len();
        self.n += 1.0;
        for i in 0..pred.len() {
            let (p, t) = (pred[i] as f64, truth[i] as f64);
            self.sse[i] += (p - t) * (p - t);
            self.sum[i] += t;
            self.sumsq[i] += t * t;
        }
    }
    pub fn value(&self) -> Option<f64> {
        if self.n < 2.0 || self.dims == 0 {
            return None;
        }
        let (mut sse, mut sst) = (0.0, 0.0);
        for i in 0..self.dims {
            sse += self.sse[i];
            sst += self.sumsq[i] - self.sum[i] * self.sum[i] / self.n;
        }
        (sst > 0.0).then(|| 1.0 - sse / sst)
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct StageSummary {
    pub stage: String,
    pub meaning: String,
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl StageSummary {
    /// Percentiles of a histogram of ns, in us.
    pub fn of(stage: &str, meaning: &str, h: &Histogram<u64>) -> Self {
        let q = |p: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(p) as f64 / 1e3 };
        StageSummary {
            stage: stage.to_string(),
            meaning: meaning.to_string(),
            count: h.len(),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if h.is_empty() { 0.0 } else { h.max() as f64 / 1e3 },
            mean_us: if h.is_empty() { 0.0 } else { h.mean() / 1e3 },
        }
    }
}

pub struct Stats {
    stages: &'static Stages,
    pub hists: Vec<Histogram<u64>>,
    /// Source's end of the bin -> sent, for sources that timestamp on the host's clock (LSL).
    pub source_to_publish: Histogram<u64>,
    /// Since the last snapshot.
    interval: Vec<Histogram<u64>>,
    pub r2: RunningR2,
    pub bin_ns: u64,
    pub deadline_misses: u64,
    pub records: u64,
}

impl Stats {
    pub fn new(bin_ns: u64) -> Self {
        Self::with_stages(bin_ns, &STAGES)
    }

    pub fn with_stages(bin_ns: u64, stages: &'static Stages) -> Self {
        Stats {
            stages,
            hists: STAGES.iter().map(|_| hist()).collect(),
            source_to_publish: hist(),
            interval: STAGES.iter().map(|_| hist()).collect(),
            r2: RunningR2::default(),
            bin_ns,
            deadline_misses: 0,
            records: 0,
        }
    }

    pub fn record(&mut self, r: &TimingRecord) {
        let values = [
            r.push_ns.saturating_sub(r.recv_ns),
            r.pop_ns.saturating_sub(r.push_ns),
            r.step_ns.saturating_sub(r.pop_ns),
            r.sent_ns.saturating_sub(r.step_ns),
            r.sent_ns.saturating_sub(r.recv_ns),
            r.predict_ns,
        ];
        for (i, v) in values.iter().enumerate() {
            let v = (*v).max(1);
            let _ = self.hists[i].record(v);
            let _ = self.interval[i].record(v);
        }
        if r.source_ns > 0 {
            let _ = self.source_to_publish.record(r.sent_ns.saturating_sub(r.source_ns).max(1));
        }
        if values[4] > self.bin_ns {
            self.deadline_misses += 1;
        }
        if r.has_truth && r.dims > 0 {
            let k = r.dims as usize;
            self.r2.add(&r.behavior[..k], &r.truth[..k]);
        }
        self.records += 1;
    }

    fn summarise(&self, hists: &[Histogram<u64>]) -> Vec<StageSummary> {
        self.stages.iter().zip(hists).map(|((name, meaning), h)| StageSummary::of(name, meaning, h)).collect()
    }

    pub fn summary(&self) -> Vec<StageSummary> {
        self.summarise(&self.hists)
    }

    /// The interval's stages, then starts a new interval.
    pub fn take_interval(&mut self) -> Vec<StageSummary> {
        let s = self.summarise(&self.interval);
        self.interval.iter_mut().for_each(|h| h.reset());
        s
    }

    /// p50 / p99 of end-to-end so far, in us (for the status line).
    pub fn e2e_us(&self) -> (f64, f64) {
        let h = &self.hists[4];
        if h.is_empty() {
            return (0.0, 0.0);
        }
        (h.value_at_quantile(0.5) as f64 / 1e3, h.value_at_quantile(0.99) as f64 / 1e3)
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<20} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "stage (us)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for st in self.summary() {
            let _ = writeln!(
                s,
                "{:<20} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                st.stage, st.count, st.p50_us, st.p90_us, st.p99_us, st.p999_us, st.max_us
            );
        }
        s
    }

    /// Writes one `.hgrm` per stage, the SVG plot, and returns the stage summaries.
    pub fn write_reports(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for ((name, _), h) in self.stages.iter().zip(&self.hists) {
            std::fs::write(dir.join(format!("latency-{name}.hgrm")), hgrm(h))?;
        }
        if !self.source_to_publish.is_empty() {
            std::fs::write(dir.join("latency-source_to_publish.hgrm"), hgrm(&self.source_to_publish))?;
        }
        std::fs::write(dir.join("latency.svg"), svg(self.stages, &self.hists))?;
        Ok(())
    }
}

/// HdrHistogram's percentile-distribution text (values in microseconds), the format its
/// plotting tools read.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    if h.is_empty() {
        return s;
    }
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:14.2}", 1.0 / (1.0 - q)) } else { format!("{:>14}", "") };
        let _ = writeln!(
            s,
            "{:12.3} {:2.12} {:10} {}",
            v.value_iterated_to() as f64 / 1e3,
            q,
            v.count_since_last_iteration(),
            inv
        );
    }
    let _ = writeln!(s, "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]", h.mean() / 1e3, h.stdev() / 1e3);
    let _ = writeln!(s, "#[Max     = {:12.3}, Total count    = {:12}]", h.max() as f64 / 1e3, h.len());
    let _ = writeln!(s, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), h.distinct_values());
    s
}

/// Latency by percentile for every stage, log-scaled like HdrHistogram's plots
/// (x: 1/(1-p) from 50% to 99.99%, y: microseconds).
pub fn svg(stages: &Stages, hists: &[Histogram<u64>]) -> String {
    let (w, h, ml, mb, mt, mr) = (820.0, 480.0, 70.0, 50.0, 30.0, 210.0);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let pct = [0.5, 0.75, 0.9, 0.99, 0.999, 0.9999];
    let xmax = (1.0f64 / (1.0 - 0.9999)).log10();
    let xpos = |p: f64| ml + pw * ((1.0 / (1.0 - p)).log10() - (2.0f64).log10()) / (xmax - (2.0f64).log10());
    let ymax =
        hists.iter().filter(|x| !x.is_empty()).map(|x| x.value_at_quantile(0.9999) as f64 / 1e3).fold(1.0, f64::max)
            * 1.1;
    let ypos = |v: f64| mt + ph * (1.0 - v / ymax);
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#111111", "#9467bd"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">latentloop latency by percentile</text>\n",
        ml + pw / 2.0
    );
    for &p in &pct {
        let x = xpos(p);
        let _ = writeln!(s, "<line x1=\"{x:.1}\" y1=\"{mt}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#ddd\"/>", mt + ph);
        let _ = writeln!(s, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}%</text>", mt + ph + 18.0, p * 100.0);
    }
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = ypos(v);
        let _ = writeln!(s, "<line x1=\"{ml}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>", ml + pw);
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>", ml - 6.0, y + 4.0);
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">percentile</text>", ml + pw / 2.0, h - 10.0);
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">latency (us)</text>",
        mt + ph / 2.0,
        mt + ph / 2.0
    );
    for (i, ((name, _), hist)) in stages.iter().zip(hists).enumerate() {
        if hist.is_empty() {
            continue;
        }
        let pts: Vec<String> = (0..=100)
            .map(|k| {
                let p = 1.0 - 0.5 * (1e-4f64 / 0.5).powf(k as f64 / 100.0);
                format!("{:.1},{:.1}", xpos(p), ypos(hist.value_at_quantile(p) as f64 / 1e3))
            })
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            colours[i],
            pts.join(" ")
        );
        let ly = mt + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"3\"/>",
            w - mr + 10.0,
            w - mr + 30.0,
            colours[i]
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">{name}</text>", w - mr + 36.0, ly + 4.0);
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_r2_matches_the_batch_formula() {
        let truth = [[1.0f32, 0.0], [2.0, 1.0], [3.0, 0.0], [4.0, 1.0]];
        let pred = [[1.5f32, 0.0], [2.0, 0.5], [2.5, 0.0], [4.0, 1.0]];
        let mut r = RunningR2::default();
        for (p, t) in pred.iter().zip(&truth) {
            r.add(p, t);
        }
        // SSE = 0.25 + 0.25 + 0.25 = 0.75; SST = 5 + 1 = 6.
        assert!((r.value().unwrap() - (1.0 - 0.75 / 6.0)).abs() < 1e-12);
    }

    #[test]
    fn stages_and_deadline_misses_are_counted() {
        let mut s = Stats::new(1_000_000);
        let base = TimingRecord {
            seq: 0,
            flags: 0,
            recv_ns: 1000,
            push_ns: 3000,
            pop_ns: 10_000,
            step_ns: 40_000,
            sent_ns: 50_000,
            predict_ns: 7000,
            source_ns: 0,
            dims: 0,
            has_truth: false,
            behavior: [0.0; MAX_BEHAVIOR],
            truth: [0.0; MAX_BEHAVIOR],
        };
        s.record(&base);
        s.record(&TimingRecord { sent_ns: 2_000_000, ..base });
        let sum = s.summary();
        // 3 significant digits: values are exact to 0.1%.
        assert!((sum[0].p50_us - 2.0).abs() <= 0.002 && (sum[2].p50_us - 30.0).abs() <= 0.03, "{sum:?}");
        assert_eq!(s.deadline_misses, 1);
        let text = hgrm(&s.hists[4]);
        assert!(text.contains("#[Max") && text.contains("Total count    =            2"), "{text}");
        assert!(svg(&STAGES, &s.hists).contains("<polyline"));
    }
}
