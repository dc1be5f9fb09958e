//! Errors of the library: values, never panics, each saying what is wrong, where, and the fix.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackeiError {
    /// A setting of a network, layer or run that cannot work.
    #[error("invalid setting `{field}`: {problem}")]
    Config { field: String, problem: String },
    /// A tensor handed in with the wrong shape.
    #[error("shape mismatch in {place}: expected {expected}, got {got}")]
    Shape { place: String, expected: String, got: String },
    /// NaN or Inf where a finite number is required.
    #[error("non-finite value in {place} at element {index} ({value}): {hint}")]
    NonFinite { place: String, index: usize, value: f64, hint: String },
    /// The GPU engine could not be used (no driver, no library, no device, a CUDA error).
    #[error("CUDA: {0}")]
    Cuda(String),
    /// Anything reading or writing files.
    #[error("{path}: {problem}")]
    Io { path: String, problem: String },
    /// Data-parallel training: MPI or NCCL missing or failing, or another rank's failure.
    #[error("distributed training: {0}")]
    Distributed(String),
}

pub type Result<T, E = BackeiError> = std::result::Result<T, E>;

pub(crate) fn config_err(field: impl Into<String>, problem: impl Into<String>) -> BackeiError {
    BackeiError::Config { field: field.into(), problem: problem.into() }
}

pub(crate) fn shape_err(place: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> BackeiError {
    BackeiError::Shape { place: place.into(), expected: expected.into(), got: got.into() }
}

/// The first non-finite element of `xs`, as an error naming `place`.
pub(crate) fn check_finite<F: crate::Real>(place: &str, xs: &[F], hint: &str) -> Result<()> {
    match xs.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(BackeiError::NonFinite { place: place.to_string(), index, value: xs[index].to_f64(), hint: hint.to_string() }),
    }
}
