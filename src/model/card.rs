//! The model card: what a model is, stored as safetensors metadata so Python tools
//! (`safe_open(path).metadata()`) can read it too.

use super::file::ModelFile;

/// Written into every file; `FORMAT_VERSION` changes whenever a reader of the old version
/// would misread the new one.
pub const FORMAT: &str = "latentloop";
pub const FORMAT_VERSION: u32 = 1;

macro_rules! kind_enum {
    ($(#[$m:meta])* $name:ident { $($var:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub enum $name { $(#[serde(rename = $s)] $var),* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),*];
            pub fn as_str(self) -> &'static str { match self { $($name::$var => $s),* } }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($s => Ok($name::$var),)* _ => Err(format!(
                    "unknown {} '{}' (expected one of: {})", stringify!($name), s,
                    [$($s),*].join(", "))) }
            }
        }
    };
}

kind_enum!(
    /// Which decoder a file holds.
    ModelKind { Xfads = "xfads", Kalman = "kalman" }
);
kind_enum!(
    /// The latent dynamics f (ALGORITHM.md section 2).
    DynamicsKind { Gru = "gru", Mlp = "mlp", Node = "node", Linear = "linear" }
);
kind_enum!(
    /// Where the update's Gaussian potential (k, K) comes from (ALGORITHM.md section 3).
    UpdateKind { Encoder = "encoder", Gaussian = "gaussian", PoissonLaplace = "poisson-laplace" }
);
kind_enum!(
    /// The observation model y | z.
    ReadoutKind { Poisson = "poisson", Gaussian = "gaussian", None = "none" }
);

/// Everything about an XFADS-family model that is not a weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Card {
    /// L.
    pub latents: usize,
    /// N.
    pub channels: usize,
    /// Bin width in seconds.
    pub dt: f32,
    /// Default number of samples S of the filter.
    pub samples: usize,
    pub dynamics: DynamicsKind,
    /// Hidden width of the dynamics network (0 for linear).
    pub hidden: usize,
    /// Weightless RMSNorm on f(z).
    pub rmsnorm: bool,
    /// RK4 substeps per bin (node only).
    pub substeps: usize,
    pub update: UpdateKind,
    /// r of the encoder (gaussian and poisson-laplace updates have r = N).
    pub rank: usize,
    /// Hidden width of the encoder (encoder update only).
    pub encoder_hidden: usize,
    pub readout: ReadoutKind,
    /// Lr: only the first Lr latents drive the readout.
    pub readout_latents: usize,
    /// D, the number of decoded behaviour dimensions (0 = none).
    pub behavior_dims: usize,
}

impl Card {
    pub fn write_meta(&self, f: &mut ModelFile) {
        f.set_meta("format", FORMAT);
        f.set_meta("format_version", FORMAT_VERSION);
        f.set_meta("kind", ModelKind::Xfads);
        f.set_meta("latents", self.latents);
        f.set_meta("channels", self.channels);
        f.set_meta("dt", self.dt);
        f.set_meta("samples", self.samples);
        f.set_meta("dynamics", self.dynamics);
        f.set_meta("hidden", self.hidden);
        f.set_meta("rmsnorm", self.rmsnorm);
        f.set_meta("substeps", self.substeps);
        f.set_meta("update", self.update);
        f.set_meta("rank", self.rank);
        f.set_meta("encoder_hidden", self.encoder_hidden);
        f.set_meta("readout", self.readout);
        f.set_meta("readout_latents", self.readout_latents);
        f.set_meta("behavior_dims", self.behavior_dims);
    }

    pub fn read_meta(f: &ModelFile) -> Result<Card, String> {
        let card = Card {
            latents: f.meta_req("latents")?,
            channels: f.meta_req("channels")?,
            dt: f.meta_req("dt")?,
            samples: f.meta_req("samples")?,
            dynamics: f.meta_req("dynamics")?,
            hidden: f.meta_req("hidden")?,
            rmsnorm: f.meta_req("rmsnorm")?,
            substeps: f.meta_req("substeps")?,
            update: f.meta_req("update")?,
            rank: f.meta_req("rank")?,
            encoder_hidden: f.meta_req("encoder_hidden")?,
            readout: f.meta_req("readout")?,
            readout_latents: f.meta_req("readout_latents")?,
            behavior_dims: f.meta_req("behavior_dims")?,
        };
        card.validate()?;
        Ok(card)
    }

    pub fn validate(&self) -> Result<(), String> {
        let fail = |m: String| Err(m);
        if self.latents == 0 || self.channels == 0 {
            return fail(format!("latents ({}) and channels ({}) must be positive", self.latents, self.channels));
        }
        if !(self.dt.is_finite() && self.dt > 0.0) {
            return fail(format!("dt must be a positive number of seconds, got {}", self.dt));
        }
        if self.samples < 2 {
            return fail(format!("samples must be at least 2 (a covariance needs two), got {}", self.samples));
        }
        if self.dynamics != DynamicsKind::Linear && self.hidden == 0 {
            return fail(format!("{} dynamics need hidden > 0", self.dynamics));
        }
        if self.dynamics == DynamicsKind::Node && self.substeps == 0 {
            return fail("node dynamics need substeps >= 1".into());
        }
        if self.readout_latents == 0 || self.readout_latents > self.latents {
            return fail(format!("readout_latents must be in 1..={}, got {}", self.latents, self.readout_latents));
        }
        match self.update {
            UpdateKind::Encoder if self.rank == 0 || self.encoder_hidden == 0 => {
                fail("the encoder update needs rank >= 1 and encoder_hidden >= 1".into())
            }
            UpdateKind::Gaussian if self.readout != ReadoutKind::Gaussian => {
                fail("the gaussian update needs a gaussian readout".into())
            }
            UpdateKind::PoissonLaplace if self.readout != ReadoutKind::Poisson => {
                fail("the poisson-laplace update needs a poisson readout".into())
            }
            UpdateKind::Gaussian | UpdateKind::PoissonLaplace if self.rank != self.channels => fail(format!(
                "the {} update has rank = channels = {}, card says {}",
                self.update, self.channels, self.rank
            )),
            _ => Ok(()),
        }
    }
}

/// Checks the file-format header shared by every model kind and returns the kind.
pub fn read_kind(f: &ModelFile) -> Result<ModelKind, String> {
    match f.meta.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        Some(other) => return Err(format!("metadata 'format' is '{other}', not '{FORMAT}'")),
        None => return Err("no latentloop model card in the metadata".into()),
    }
    let v: u32 = f.meta_req("format_version")?;
    if v != FORMAT_VERSION {
        return Err(format!("model format version {v} is not supported (this build reads version {FORMAT_VERSION})"));
    }
    f.meta_req("kind")
}
