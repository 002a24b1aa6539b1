//! Rig configuration (`rig-configs/*.toml`). Everything is checked before any thread
//! starts: unknown keys, missing files, impossible bin widths, channel counts that do not
//! match the model. Errors name the line.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RigConfig {
    pub source: SourceConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub calibration: CalibrationConfig,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub reports: ReportsConfig,
    #[serde(default)]
    pub record: RecordConfig,
    #[serde(default)]
    pub control: ControlConfig,
    /// Shadow decoders (`[[decoder]]`): more models decoding the same bins beside the
    /// driving one (`[model]`), each publishing on its own socket.
    #[serde(default, rename = "decoder")]
    pub decoders: Vec<ShadowConfig>,
    /// The file this came from (for messages and relative paths).
    #[serde(skip)]
    pub path: PathBuf,
    #[serde(skip)]
    text: String,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The built-in simulated rig (ground truth on the side).
    Sim,
    /// latentloop's bin schema on a SUB socket.
    Zmq,
    /// The Open Ephys GUI's ZMQ Interface plugin.
    Openephys,
    /// A Lab Streaming Layer stream (liblsl loaded at run time).
    Lsl,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Bin width in milliseconds.
    pub bin_ms: Spanned<f64>,
    /// Channels per bin; must equal the model's.
    pub channels: Spanned<usize>,
    pub sim: Option<SimSourceConfig>,
    pub zmq: Option<ZmqSourceConfig>,
    pub openephys: Option<OpenEphysConfig>,
    pub lsl: Option<LslConfig>,
}

/// `[source.lsl]`: which stream, and what it carries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LslConfig {
    /// The stream to take, by one of its name, type or source_id.
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub stream_type: Option<String>,
    pub source_id: Option<String>,
    /// "counts" (one sample per bin, one channel per model channel), "continuous" (voltage:
    /// threshold crossings binned by sample count), or "auto" (counts when the stream's
    /// nominal rate is the bin rate, continuous when it is higher).
    #[serde(default = "auto")]
    pub shape: String,
    /// Seconds to look for the stream before giving up (and listing what was found).
    #[serde(default = "resolve_timeout")]
    pub resolve_timeout_s: f64,
    /// A marker stream (by name) whose markers become events of the session.
    pub markers: Option<String>,
    /// Counts: the largest count a channel may carry (larger is refused as absurd).
    #[serde(default = "max_count")]
    pub max_count: f32,
    /// Continuous: crossing threshold in multiples of the robust noise sd, negative-going.
    #[serde(default = "threshold")]
    pub threshold: f32,
    /// Continuous: seconds of each channel for its noise estimate, before counting starts.
    #[serde(default = "noise_seconds")]
    pub noise_seconds: f32,
    #[serde(default = "refractory_ms")]
    pub refractory_ms: f32,
    /// A shortfall of samples against the timestamps larger than this (and 3 samples) is a
    /// gap. LSL carries no sample numbers, and an outlet that stamps at push time shows its
    /// own scheduling stalls as late timestamps: smaller losses than this go unflagged.
    #[serde(default = "gap_tolerance_ms")]
    pub gap_tolerance_ms: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSourceConfig {
    /// lorenz | arneodo | rossler | linear
    pub system: Spanned<String>,
    #[serde(default = "one")]
    pub seed: u64,
    /// Defaults to `seed`.
    pub trial_seed: Option<u64>,
    #[serde(default = "two")]
    pub behavior_dims: usize,
    /// A rig that changes under the decoder (for measuring recalibration; see
    /// `sim::Drift`): the tuning turns this many degrees a minute...
    #[serde(default)]
    pub drift_degrees_per_minute: f64,
    /// ...and/or changes at once at this time: turns by `step_rotate_degrees`, the first
    /// `step_dead_channels` go silent, `step_swap_channels` pairs swap.
    pub step_at_seconds: Option<f64>,
    #[serde(default)]
    pub step_rotate_degrees: f64,
    #[serde(default)]
    pub step_dead_channels: usize,
    #[serde(default)]
    pub step_swap_channels: usize,
}

impl SimSourceConfig {
    pub fn drift(&self) -> crate::sim::Drift {
        crate::sim::Drift {
            drift_degrees_per_minute: self.drift_degrees_per_minute,
            step_at_seconds: self.step_at_seconds,
            step_rotate_degrees: self.step_rotate_degrees,
            step_dead_channels: self.step_dead_channels,
            step_swap_channels: self.step_swap_channels,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZmqSourceConfig {
    pub endpoint: String,
    /// Largest count (or value) a channel may carry; larger values are refused as absurd.
    #[serde(default = "max_count")]
    pub max_count: f32,
    /// Behaviour values per bin the publisher sends (0: none). With a model file it must be
    /// 0 or the model's behaviour dims; without, the calibration targets' count.
    #[serde(default = "zero_spanned")]
    pub behavior_dims: Spanned<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenEphysConfig {
    /// The GUI's data socket, e.g. tcp://127.0.0.1:5556.
    pub endpoint: String,
    /// "continuous": detect threshold crossings in float32 blocks; "spikes": count spike events.
    #[serde(default = "continuous")]
    pub mode: String,
    /// Only this stream's messages are used (all streams when absent).
    pub stream: Option<String>,
    /// Crossing threshold in multiples of the robust noise sd (median |x| / 0.6745), negative-going.
    #[serde(default = "threshold")]
    pub threshold: f32,
    /// Seconds of data per channel for the noise estimate, before counting starts.
    #[serde(default = "noise_seconds")]
    pub noise_seconds: f32,
    #[serde(default = "refractory_ms")]
    pub refractory_ms: f32,
    /// Spike mode: electrode names in channel order (default: order of first appearance).
    #[serde(default)]
    pub electrodes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A model file; when absent the run calibrates a Kalman decoder first.
    pub path: Option<Spanned<String>>,
    /// Filter samples S (default: the model card's).
    pub samples: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    /// cpu | cuda | auto
    #[serde(default = "backend")]
    pub backend: String,
    /// Run a model made for another bin width anyway (refused otherwise: its dynamics and
    /// rates are per bin, so it decodes wrongly). The run says so at start and the reports
    /// and the session record it.
    #[serde(default)]
    pub allow_bin_width_mismatch: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { path: None, samples: None, seed: 0, backend: backend(), allow_bin_width_mismatch: false }
    }
}

/// A `[[decoder]]` entry: a shadow decoder. It decodes every bin the driving decoder
/// decoded, on the shadow thread after the driver has published, and publishes its own
/// outputs; its session is recorded under `<session>/shadows/<name>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Names its reports and its session folder: letters, digits, '-' and '_'.
    pub name: Spanned<String>,
    /// The model file (XFADS or Kalman), for the same channels, bin width and behaviour.
    pub model: Spanned<String>,
    /// Its own PUB endpoint, tcp:// or ipc://.
    pub output: Spanned<String>,
    /// Filter samples S (default: the model card's).
    pub samples: Option<usize>,
    /// The filter's noise seed (default: the [model] seed).
    pub seed: Option<u64>,
    /// cpu | cuda | auto, as in [model].
    #[serde(default = "backend")]
    pub backend: String,
}

/// At most this many shadow decoders: each costs a step per bin on the shadow thread.
pub const MAX_SHADOWS: usize = 8;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationConfig {
    /// Length of the calibration block recorded before decoding (no model file).
    pub seconds: Spanned<f64>,
    #[serde(default = "ridge")]
    pub ridge: f64,
    /// "kalman" (default), or "xfads": the Kalman decoder, fitted in seconds, decodes while
    /// the nonlinear model trains on the calibration block in the background; it is swapped
    /// in, between two bins, when training ends (needs the control thread).
    #[serde(default = "kalman_spanned")]
    pub model: Spanned<String>,
    /// The XFADS model trained then (as `latentloop fit xfads`).
    #[serde(default)]
    pub xfads: XfadsCalibration,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        CalibrationConfig {
            seconds: Spanned::new(0..0, 30.0),
            ridge: ridge(),
            model: kalman_spanned(),
            xfads: XfadsCalibration::default(),
        }
    }
}

/// `[calibration.xfads]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XfadsCalibration {
    /// node | mlp | gru | linear
    #[serde(default = "node")]
    pub dynamics: String,
    #[serde(default = "three")]
    pub latents: usize,
    #[serde(default = "xfads_epochs")]
    pub epochs: usize,
    /// Training stops after this long at the latest.
    #[serde(default = "xfads_seconds")]
    pub max_seconds: f64,
}

impl Default for XfadsCalibration {
    fn default() -> Self {
        XfadsCalibration { dynamics: node(), latents: three(), epochs: xfads_epochs(), max_seconds: xfads_seconds() }
    }
}

fn kalman_spanned() -> Spanned<String> {
    Spanned::new(0..0, "kalman".into())
}
fn node() -> String {
    "node".into()
}
fn three() -> usize {
    3
}
fn xfads_epochs() -> usize {
    80
}
fn xfads_seconds() -> f64 {
    300.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// PUB endpoint, tcp:// or ipc://.
    #[serde(default = "out_endpoint")]
    pub endpoint: String,
    /// Messages queued per subscriber before ZeroMQ drops (never blocks the decoder).
    #[serde(default = "sndhwm")]
    pub sndhwm: i32,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig { endpoint: out_endpoint(), sndhwm: sndhwm() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Bins the acquisition ring holds.
    #[serde(default = "ring_capacity")]
    pub ring_capacity: usize,
    /// A bin received longer ago than this (ms) is skipped when a newer one waits
    /// (default: two bin widths). Bins that complete together are all decoded.
    pub stale_ms: Option<f64>,
    /// Missing or skipped bins the decoder predicts through; a longer gap resets it.
    #[serde(default = "max_predict_gap")]
    pub max_predict_gap: u64,
    /// The decode thread sleeps until shortly before a bin is due, then busy-waits up to this
    /// long past its due time (lower latency than a wake-up, at the cost of that core).
    #[serde(default = "spin_us")]
    pub spin_us: u64,
    /// Run the decode thread under SCHED_FIFO at this priority (1-99), so that waking other
    /// threads (ZeroMQ's I/O thread, the acquisition thread) never preempts a bin. Needs
    /// root or CAP_SYS_NICE; refused at start if not granted.
    pub realtime_priority: Option<i32>,
    /// Pin the acquisition / decode threads to these CPU cores.
    pub acquire_core: Option<usize>,
    pub decode_core: Option<usize>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            ring_capacity: ring_capacity(),
            stale_ms: None,
            realtime_priority: None,
            max_predict_gap: max_predict_gap(),
            spin_us: spin_us(),
            acquire_core: None,
            decode_core: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsConfig {
    /// Where latency histograms, the JSON summary and the plot go (relative to the config).
    #[serde(default = "reports_dir")]
    pub dir: String,
    #[serde(default = "snapshot_seconds")]
    pub snapshot_seconds: f64,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        ReportsConfig { dir: reports_dir(), snapshot_seconds: snapshot_seconds() }
    }
}

/// `[record]`: the session recording (docs/SESSION.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    /// Record the session (on unless set false; the run then says so at start).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The session folder (relative to the config); default `<reports dir>/session`. A
    /// session already there is moved aside, never overwritten.
    pub dir: Option<String>,
    /// Records the recorder's ring holds (at 1 kHz, 4096 is 4 s of a stalled disk).
    #[serde(default = "record_ring")]
    pub ring_capacity: usize,
    /// The largest decoder state (latents) a record holds; models loaded later may not be
    /// larger.
    #[serde(default = "max_latents")]
    pub max_latents: usize,
    /// What the session is, for the NWB export's session_description.
    pub description: Option<String>,
    pub experimenter: Option<String>,
    pub institution: Option<String>,
    pub session_id: Option<String>,
    /// The subject, for NWB (subject_id, species, sex, age, ...): kept as given.
    pub subject: Option<toml::Table>,
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            enabled: true,
            dir: None,
            ring_capacity: record_ring(),
            max_latents: max_latents(),
            description: None,
            experimenter: None,
            institution: None,
            session_id: None,
            subject: None,
        }
    }
}

/// `[control]`: the control socket (docs/CONTROL.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// On unless set false.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// ZeroMQ REP endpoint. Default: `ipc://<reports dir>/control.sock` (tcp on 127.0.0.1
    /// with a free port where that path is too long for a unix socket). A tcp endpoint on
    /// another interface than loopback needs `allow_remote = true`.
    pub endpoint: Option<Spanned<String>>,
    #[serde(default)]
    pub allow_remote: bool,
    /// Seconds of received bins kept for `calibrate` and adaptation (at most 600,000 bins).
    #[serde(default = "history_seconds")]
    pub history_seconds: f64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig { enabled: true, endpoint: None, allow_remote: false, history_seconds: history_seconds() }
    }
}

fn history_seconds() -> f64 {
    120.0
}
fn zero_spanned() -> Spanned<usize> {
    Spanned::new(0..0, 0)
}
fn yes() -> bool {
    true
}
fn record_ring() -> usize {
    4096
}
fn max_latents() -> usize {
    256
}
fn one() -> u64 {
    1
}
fn two() -> usize {
    2
}
fn max_count() -> f32 {
    10_000.0
}
fn auto() -> String {
    "auto".into()
}
fn resolve_timeout() -> f64 {
    5.0
}
fn continuous() -> String {
    "continuous".into()
}
fn threshold() -> f32 {
    4.5
}
fn noise_seconds() -> f32 {
    2.0
}
fn gap_tolerance_ms() -> f64 {
    50.0
}
fn refractory_ms() -> f32 {
    1.0
}
fn backend() -> String {
    "cpu".into()
}
fn ridge() -> f64 {
    1.0
}
fn out_endpoint() -> String {
    "tcp://127.0.0.1:5560".into()
}
fn sndhwm() -> i32 {
    1000
}
fn ring_capacity() -> usize {
    64
}
fn max_predict_gap() -> u64 {
    50
}
fn spin_us() -> u64 {
    500
}
fn reports_dir() -> String {
    "reports".into()
}
fn snapshot_seconds() -> f64 {
    10.0
}

impl RigConfig {
    pub fn load(path: impl AsRef<Path>) -> Result<RigConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<RigConfig> {
        let mut c: RigConfig =
            toml::from_str(text).map_err(|e| Error::Config { path: path.into(), msg: e.to_string() })?;
        c.path = path.to_path_buf();
        c.text = text.to_string();
        c.validate()?;
        Ok(c)
    }

    /// An error pointing at the line of `span`.
    pub fn error_at(&self, span: std::ops::Range<usize>, msg: impl std::fmt::Display) -> Error {
        let line = self.text[..span.start.min(self.text.len())].matches('\n').count() + 1;
        let shown = self.text.lines().nth(line - 1).unwrap_or("").trim();
        let msg = if span.is_empty() { msg.to_string() } else { format!("line {line} (`{shown}`): {msg}") };
        Error::Config { path: self.path.clone(), msg }
    }

    /// A path from the config, relative to the config file's directory.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    pub fn bin_seconds(&self) -> f64 {
        *self.source.bin_ms.get_ref() / 1000.0
    }

    /// The config file's text, as read (for the session header).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Where the session is recorded (None: recording is off).
    pub fn session_dir(&self) -> Option<PathBuf> {
        let r = &self.record;
        r.enabled.then(|| match &r.dir {
            Some(d) => self.resolve(d),
            None => self.resolve(&self.reports.dir).join("session"),
        })
    }

    pub fn model_path(&self) -> Option<PathBuf> {
        self.model.path.as_ref().map(|p| self.resolve(p.get_ref()))
    }

    /// Every number a config gives, in its range (so that nothing starts with a value that
    /// would decode wrongly or not at all).
    fn validate_numbers(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config { path: self.path.clone(), msg });
        if let Some(z) = &self.source.zmq {
            // Counts are carried as f32: integers above 2^24 would not be exact.
            if !(z.max_count.is_finite() && z.max_count > 0.0 && z.max_count <= 16_777_216.0) {
                return bad(format!(
                    "[source.zmq] max_count = {}: expected 0 < max_count <= 2^24 (16777216)",
                    z.max_count
                ));
            }
        }
        if let Some(o) = &self.source.openephys {
            for (k, v, min) in [("threshold", o.threshold, 0.0), ("noise_seconds", o.noise_seconds, 0.0)] {
                if !(v.is_finite() && v > min) {
                    return bad(format!("[source.openephys] {k} = {v}: expected a positive number"));
                }
            }
            if !(o.refractory_ms.is_finite() && o.refractory_ms >= 0.0) {
                return bad(format!("[source.openephys] refractory_ms = {}: expected >= 0", o.refractory_ms));
            }
        }
        if let Some(n) = self.model.samples {
            if n < 2 {
                return bad(format!("[model] samples = {n}: the filter needs at least 2 samples"));
            }
        }
        if !(self.calibration.ridge.is_finite() && self.calibration.ridge >= 0.0) {
            return bad(format!("[calibration] ridge = {}: expected >= 0", self.calibration.ridge));
        }
        if self.output.sndhwm < 1 {
            return bad(format!(
                "[output] sndhwm = {}: expected at least 1 (0 would queue without limit)",
                self.output.sndhwm
            ));
        }
        if let Some(ms) = self.pipeline.stale_ms {
            if !(ms.is_finite() && ms > 0.0) {
                return bad(format!("[pipeline] stale_ms = {ms}: expected a positive number of ms"));
            }
        }
        let cores = std::thread::available_parallelism().map_or(usize::MAX, |n| n.get());
        for (k, c) in [("acquire_core", self.pipeline.acquire_core), ("decode_core", self.pipeline.decode_core)] {
            if let Some(c) = c {
                if c >= cores {
                    return bad(format!("[pipeline] {k} = {c}: this machine has cores 0..{}", cores - 1));
                }
            }
        }
        if !(self.reports.snapshot_seconds.is_finite() && self.reports.snapshot_seconds > 0.0) {
            return bad(format!(
                "[reports] snapshot_seconds = {}: expected a positive number",
                self.reports.snapshot_seconds
            ));
        }
        if self.record.max_latents == 0 {
            return bad("[record] max_latents must be at least 1".into());
        }
        Ok(())
    }

    /// The `[[decoder]]` entries: names usable as folder names and unique, outputs their own,
    /// model files that exist, options in range.
    fn validate_shadows(&self) -> Result<()> {
        if self.decoders.len() > MAX_SHADOWS {
            let span = self.decoders[MAX_SHADOWS].name.span();
            return Err(self.error_at(span, format!("at most {MAX_SHADOWS} [[decoder]] entries")));
        }
        for (i, d) in self.decoders.iter().enumerate() {
            let name = d.name.get_ref();
            let fine = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
            if name.is_empty() || name.len() > 64 || !name.chars().all(fine) {
                return Err(self.error_at(
                    d.name.span(),
                    format!("[[decoder]] name = '{name}': use 1 to 64 letters, digits, '-' or '_' (it names a folder)"),
                ));
            }
            let out = d.output.get_ref();
            if out == &self.output.endpoint {
                return Err(self.error_at(
                    d.output.span(),
                    format!("[[decoder]] '{name}' publishes on {out}, the driving decoder's [output] endpoint"),
                ));
            }
            for e in &self.decoders[..i] {
                if e.name.get_ref() == name {
                    return Err(self.error_at(d.name.span(), format!("a second [[decoder]] named '{name}'")));
                }
                if e.output.get_ref() == out {
                    return Err(self.error_at(
                        d.output.span(),
                        format!("[[decoder]] '{name}' publishes on {out}, as '{}' does", e.name.get_ref()),
                    ));
                }
            }
            let full = self.resolve(d.model.get_ref());
            if !full.is_file() {
                return Err(self.error_at(d.model.span(), format!("model file {} does not exist", full.display())));
            }
            if let Some(n) = d.samples.filter(|&n| n < 2) {
                return Err(self.error_at(d.name.span(), format!("[[decoder]] '{name}': samples = {n}, at least 2")));
            }
            if !["cpu", "cuda", "auto"].contains(&d.backend.as_str()) {
                return Err(self.error_at(
                    d.name.span(),
                    format!("[[decoder]] '{name}': backend = '{}': expected cpu, cuda or auto", d.backend),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let s = &self.source;
        let bin_ms = *s.bin_ms.get_ref();
        // Below 0.1 ms no rig delivers data; above 1 s a "closed loop" is not one.
        if !(0.1..=1000.0).contains(&bin_ms) {
            return Err(self.error_at(s.bin_ms.span(), format!("bin_ms = {bin_ms} is outside 0.1..=1000 ms")));
        }
        if *s.channels.get_ref() == 0 {
            return Err(self.error_at(s.channels.span(), "channels must be at least 1"));
        }
        let (needed, present) = match s.kind {
            SourceKind::Sim => ("[source.sim]", s.sim.is_some()),
            SourceKind::Zmq => ("[source.zmq]", s.zmq.is_some()),
            SourceKind::Openephys => ("[source.openephys]", s.openephys.is_some()),
            SourceKind::Lsl => ("[source.lsl]", s.lsl.is_some()),
        };
        if !present {
            return Err(Error::Config { path: self.path.clone(), msg: format!("source kind needs a {needed} table") });
        }
        if let Some(l) = &s.lsl {
            let by = [&l.name, &l.stream_type, &l.source_id].iter().filter(|v| v.is_some()).count();
            if by != 1 {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: "[source.lsl] names the stream by exactly one of name, type or source_id".into(),
                });
            }
            if !["auto", "counts", "continuous"].contains(&l.shape.as_str()) {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: format!("[source.lsl] shape = '{}': expected auto, counts or continuous", l.shape),
                });
            }
            if !(l.resolve_timeout_s.is_finite() && l.resolve_timeout_s > 0.0) {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: format!(
                        "[source.lsl] resolve_timeout_s = {}: expected a positive number",
                        l.resolve_timeout_s
                    ),
                });
            }
            if !(l.gap_tolerance_ms.is_finite() && l.gap_tolerance_ms >= 0.0) {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: format!("[source.lsl] gap_tolerance_ms = {}: expected >= 0", l.gap_tolerance_ms),
                });
            }
            for (k, v) in [("threshold", l.threshold), ("noise_seconds", l.noise_seconds), ("max_count", l.max_count)] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::Config {
                        path: self.path.clone(),
                        msg: format!("[source.lsl] {k} = {v}: expected a positive number"),
                    });
                }
            }
        }
        if let Some(oe) = &s.openephys {
            if oe.mode != "continuous" && oe.mode != "spikes" {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: format!("[source.openephys] mode = '{}': expected 'continuous' or 'spikes'", oe.mode),
                });
            }
        }
        if let Some(p) = &self.model.path {
            let full = self.resolve(p.get_ref());
            if !full.is_file() {
                return Err(self.error_at(p.span(), format!("model file {} does not exist", full.display())));
            }
        } else {
            let secs = *self.calibration.seconds.get_ref();
            let bins = secs / self.bin_seconds();
            if !(secs.is_finite() && bins >= 100.0) {
                return Err(self.error_at(
                    self.calibration.seconds.span(),
                    format!("calibration of {secs} s is {bins:.0} bins; the Kalman fit needs at least 100"),
                ));
            }
            if s.kind == SourceKind::Lsl {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: "the lsl source carries no behaviour to calibrate on: set [model] path".into(),
                });
            }
            if s.kind == SourceKind::Openephys {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: "the openephys source carries no behaviour to calibrate on: set [model] path \
                          (fit one with `latentloop fit` on a recording)"
                        .into(),
                });
            }
        }
        let cal = &self.calibration;
        match cal.model.get_ref().as_str() {
            "kalman" => {}
            "xfads" => {
                if self.model.path.is_some() {
                    return Err(self.error_at(
                        cal.model.span(),
                        "[calibration] model = \"xfads\" applies only without a [model] path",
                    ));
                }
                if !self.control.enabled {
                    return Err(self.error_at(
                        cal.model.span(),
                        "[calibration] model = \"xfads\" needs the control thread ([control] enabled = true)",
                    ));
                }
                if cal.xfads.dynamics.parse::<crate::model::DynamicsKind>().is_err() {
                    return Err(Error::Config {
                        path: self.path.clone(),
                        msg: format!(
                            "[calibration.xfads] dynamics = '{}': expected node, mlp, gru or linear",
                            cal.xfads.dynamics
                        ),
                    });
                }
            }
            other => {
                return Err(self
                    .error_at(cal.model.span(), format!("[calibration] model = '{other}': expected kalman or xfads")))
            }
        }
        if !["cpu", "cuda", "auto"].contains(&self.model.backend.as_str()) {
            return Err(Error::Config {
                path: self.path.clone(),
                msg: format!("[model] backend = '{}': expected cpu, cuda or auto", self.model.backend),
            });
        }
        if let Some(p) = self.pipeline.realtime_priority {
            if !(1..=99).contains(&p) {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: format!("[pipeline] realtime_priority = {p}: SCHED_FIFO priorities are 1..=99"),
                });
            }
        }
        if let Some(ep) = &self.control.endpoint {
            let e = ep.get_ref();
            let local = e.starts_with("ipc://")
                || e.starts_with("inproc://")
                || ["tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:"].iter().any(|p| e.starts_with(p));
            if !local && !self.control.allow_remote {
                return Err(self.error_at(
                    ep.span(),
                    format!("control endpoint {e} is not on this machine: use ipc:// or tcp://127.0.0.1, or set [control] allow_remote = true"),
                ));
            }
        }
        if !(self.control.history_seconds > 0.0 && self.control.history_seconds.is_finite()) {
            return Err(Error::Config { path: self.path.clone(), msg: "[control] history_seconds must be > 0".into() });
        }
        self.validate_numbers()?;
        self.validate_shadows()?;
        if self.record.ring_capacity < 16 {
            return Err(Error::Config { path: self.path.clone(), msg: "[record] ring_capacity must be >= 16".into() });
        }
        if self.pipeline.ring_capacity < 2 {
            return Err(Error::Config { path: self.path.clone(), msg: "[pipeline] ring_capacity must be >= 2".into() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[source]\nkind = \"sim\"\nbin_ms = 20.0\nchannels = 50\n[source.sim]\nsystem = \"lorenz\"\n";

    fn parse(t: &str) -> Result<RigConfig> {
        RigConfig::parse(t, Path::new("/tmp/x.toml"))
    }

    #[test]
    fn shadow_decoders_are_checked_before_start() {
        let model = std::env::temp_dir().join("latentloop-config-shadow.safetensors");
        std::fs::write(&model, b"x").unwrap();
        let entry = |name: &str, out: &str| {
            format!("[[decoder]]\nname = \"{name}\"\nmodel = \"{}\"\noutput = \"{out}\"\n", model.display())
        };
        let two = format!("{GOOD}{}{}", entry("a", "ipc:///tmp/a"), entry("b", "ipc:///tmp/b"));
        let c = parse(&two).unwrap();
        assert_eq!((c.decoders.len(), c.decoders[1].backend.as_str(), c.decoders[1].seed), (2, "cpu", None));
        let e = parse(&format!("{GOOD}{}{}", entry("a", "ipc:///tmp/a"), entry("a", "ipc:///tmp/b")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a second [[decoder]] named 'a'") && e.contains("line 12"), "{e}");
        let e = parse(&format!("{GOOD}{}{}", entry("a", "ipc:///tmp/a"), entry("b", "ipc:///tmp/a")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("publishes on ipc:///tmp/a, as 'a' does"), "{e}");
        let e = parse(&format!("{GOOD}{}", entry("../up", "ipc:///tmp/a"))).unwrap_err().to_string();
        assert!(e.contains("name = '../up'") && e.contains("names a folder"), "{e}");
        let e = parse(&format!("{GOOD}{}", entry("a", "tcp://127.0.0.1:5560"))).unwrap_err().to_string();
        assert!(e.contains("the driving decoder's [output] endpoint"), "{e}");
        let e = parse(&format!("{GOOD}{}", entry("a", "ipc:///tmp/a").replace(&model.display().to_string(), "/nope")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model file /nope does not exist"), "{e}");
        let e = parse(&format!("{GOOD}{}samples = 1\n", entry("a", "ipc:///tmp/a"))).unwrap_err().to_string();
        assert!(e.contains("samples = 1, at least 2"), "{e}");
        let e = parse(&format!("{GOOD}{}colour = 1\n", entry("a", "ipc:///tmp/a"))).unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("colour"), "{e}");
    }

    #[test]
    fn good_config_has_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.bin_seconds(), 0.02);
        assert_eq!(c.pipeline.ring_capacity, 64);
        assert!(c.model_path().is_none());
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let e = parse(&GOOD.replace("bin_ms = 20.0", "bin_ms = 0.0")).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("bin_ms = 0"), "{e}");
        let e = parse(&format!("{GOOD}colour = \"red\"\n")).unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("colour") && e.contains("line 7"), "{e}");
        let e = parse(&format!("{GOOD}[model]\npath = \"nope.safetensors\"\n")).unwrap_err().to_string();
        assert!(e.contains("line 8") && e.contains("does not exist"), "{e}");
        let e = parse(&GOOD.replace("[source.sim]\nsystem = \"lorenz\"\n", "")).unwrap_err().to_string();
        assert!(e.contains("[source.sim]"), "{e}");
        let e = parse(&format!("{GOOD}[pipeline]\nrealtime_priority = 0\n")).unwrap_err().to_string();
        assert!(e.contains("SCHED_FIFO priorities are 1..=99"), "{e}");
        let e = parse(&format!("{GOOD}[calibration]\nseconds = 1.0\n")).unwrap_err().to_string();
        assert!(e.contains("line 8") && e.contains("50 bins"), "{e}");
    }
}
