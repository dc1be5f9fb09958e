//! The data subsystem's error type. Every message names the file, the offset or field, and
//! what was expected; "not found" errors list where we looked and how to get the data.

use std::path::PathBuf;

/// Errors of the data subsystem. None of the readers panic on bad input; they return one of
/// these.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read (including "file not found"). The cause is part of the
    /// message (and not a `source`, so that it is not printed twice).
    #[error("{}: cannot read file: {cause} (expected {expected})", path.display())]
    Io { path: PathBuf, expected: String, cause: std::io::Error },
    /// Something other than a regular file where a data file should be: a directory, a FIFO, a
    /// device, a socket, a symbolic link loop or a broken link.
    #[error("{}: is {what}, not a regular file (expected {expected})", path.display())]
    NotAFile { path: PathBuf, what: String, expected: String },
    /// A file could not be written (an output such as `--grid out.png`).
    #[error("{}: cannot write {what}: {cause}", path.display())]
    Write { path: PathBuf, what: String, cause: String },
    /// The bytes of a file do not have the expected format.
    #[error("{}: at byte offset {offset}, field `{field}`: expected {expected}, found {found}", path.display())]
    Format { path: PathBuf, offset: u64, field: String, expected: String, found: String },
    /// A `.gz` file whose gzip stream is corrupt or truncated.
    #[error("{}: corrupt gzip stream ({detail}); expected a complete gzip file (re-download it)", path.display())]
    Gzip { path: PathBuf, detail: String },
    /// Two files that must agree (an IDX image file and its label file) do not.
    #[error("{}: field `{field}` is {found}, but {} says {expected}; expected the two to match", path.display(), other.display())]
    Mismatch { path: PathBuf, other: PathBuf, field: String, expected: String, found: String },
    /// A folder that should hold samples holds none.
    #[error("{}: folder holds no samples; expected {expected}", path.display())]
    EmptyDir { path: PathBuf, expected: String },
    /// The dataset was not found anywhere we looked.
    #[error("dataset `{dataset}` not found; looked in:\n{}\nexpected {expected}.\nTo get it: {how}",
        looked.iter().map(|p| format!("  - {}", p.display())).collect::<Vec<_>>().join("\n"))]
    NotFound { dataset: String, looked: Vec<PathBuf>, expected: String, how: String },
    /// A downloaded file whose checksum does not match the one in the code. `algorithm` is
    /// "SHA-256" or "MD5".
    #[error("{}: {algorithm} mismatch: expected {expected}, found {found}; the downloaded file was deleted, run the fetch again (with --mirror: check the mirror's copy)", path.display())]
    Checksum { path: PathBuf, algorithm: String, expected: String, found: String },
    /// A download failed (HTTP error status, connection error, or an interrupted transfer).
    #[error("{url} -> {}: download failed: {detail}", path.display())]
    Download { url: String, path: PathBuf, detail: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, expected: impl Into<String>, cause: std::io::Error) -> Self {
        DataError::Io { path: path.into(), expected: expected.into(), cause }
    }

    pub(crate) fn format(
        path: impl Into<PathBuf>,
        offset: u64,
        field: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        DataError::Format { path: path.into(), offset, field: field.into(), expected: expected.into(), found: found.into() }
    }
}
