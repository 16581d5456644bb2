//! The library's one error type: every message names the offending file, shape or value.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },

    #[error("{0}")]
    DataMissing(String),

    #[error("shape error in {layer}: {message}")]
    Shape { layer: String, message: String },

    #[error("{0}")]
    Invalid(String),

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("training diverged: {0}")]
    Diverged(String),

    /// Another process of a data-parallel job failed and printed its error; this one stops
    /// with it, silently.
    #[error("process {0} of the job failed (its error is printed above)")]
    OtherRank(usize),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn shape(layer: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Shape {
            layer: layer.into(),
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
