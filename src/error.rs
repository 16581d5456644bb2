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

    /// A run that does not fit in memory, found before it starts or when a large buffer
    /// could not be allocated.
    /// Stopped on request (Ctrl-C in the Python API); the run folder is resumable.
    #[error("{0}")]
    Interrupted(String),

    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// Standard output is full or closed (`> /dev/full`, a closed pipe).
    #[error("cannot write to standard output ({0}); free space or redirect it elsewhere")]
    Output(#[source] std::io::Error),

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
    /// A closed pipe on standard output (`normlab ... | head -1`): Unix tools end quietly.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

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
