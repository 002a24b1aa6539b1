//! Errors that name the problem. Every user-facing failure (bad model file, bad data file,
//! bad config, bad bin) is one of these; the CLI prints it and exits with code 2.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("model file {path}: {msg}")]
    Model { path: PathBuf, msg: String },
    #[error("data file {path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A model, data set and request that do not fit together (e.g. channel counts).
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn model(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Model { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn data(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Data { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
}
