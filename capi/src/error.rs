//! Errors at the boundary: every call returns a [`BackeiStatus`], and the message of the last
//! failed call on a thread stays readable through `backei_last_error()` until the next call on
//! that thread. A panic never crosses the boundary: [`guarded`] catches it and reports
//! `BACKEI_STATUS_PANIC` with its message.

use backei::BackeiError;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use thiserror::Error;

/// What a call of the C ABI returns. `BACKEI_STATUS_OK` is 0; every other value comes with a
/// message from `backei_last_error()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackeiStatus {
    Ok = 0,
    /// A NULL pointer, an unknown enum value, a workspace too small or misaligned.
    InvalidArgument = 1,
    /// A setting that cannot work (radius, delay, a gate that does not fit the map, ...).
    Config = 2,
    /// A tensor of the wrong size.
    Shape = 3,
    /// CUDA could not be used or a CUDA call failed (no driver, no NVRTC, a launch error).
    Cuda = 4,
    /// NaN or Inf where a finite number is required.
    NonFinite = 5,
    /// Reading or writing a file failed (the kernel cache).
    Io = 6,
    /// A bug in backei: it panicked; the panic was caught at the boundary.
    Panic = 7,
    /// Any other error of the library (none of the layer calls should meet one).
    Other = 8,
}

/// An error of the C ABI or of the library under it.
#[derive(Debug, Error)]
pub enum CapiError {
    #[error("invalid argument `{arg}`: {problem}")]
    Invalid { arg: &'static str, problem: String },
    #[error(transparent)]
    Backei(#[from] BackeiError),
}

pub type Result<T, E = CapiError> = std::result::Result<T, E>;

pub fn invalid(arg: &'static str, problem: impl Into<String>) -> CapiError {
    CapiError::Invalid { arg, problem: problem.into() }
}

impl CapiError {
    pub fn status(&self) -> BackeiStatus {
        match self {
            CapiError::Invalid { .. } => BackeiStatus::InvalidArgument,
            CapiError::Backei(e) => match e {
                BackeiError::Config { .. } => BackeiStatus::Config,
                BackeiError::Shape { .. } => BackeiStatus::Shape,
                BackeiError::NonFinite { .. } => BackeiStatus::NonFinite,
                BackeiError::Cuda(_) => BackeiStatus::Cuda,
                BackeiError::Io { .. } => BackeiStatus::Io,
                BackeiError::Distributed(_) => BackeiStatus::Other,
            },
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // an interior NUL would cut the C string short: show it instead
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The message of the last failed call on this thread ("" after a successful one).
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs one call of the C ABI: its error becomes a status and the thread's last error; a panic
/// is caught here and never unwinds into the caller's frames.
pub fn guarded(call: impl FnOnce() -> Result<()>) -> BackeiStatus {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(())) => {
            set_last_error("");
            BackeiStatus::Ok
        }
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            e.status()
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("backei panicked (a bug; please report it): {what}"));
            BackeiStatus::Panic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: the pointer is the thread's live CString.
        unsafe { CStr::from_ptr(last_error_ptr()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn errors_and_panics_become_statuses_and_messages() {
        assert_eq!(guarded(|| Err(invalid("input", "is NULL"))), BackeiStatus::InvalidArgument);
        assert_eq!(last(), "invalid argument `input`: is NULL");
        assert_eq!(guarded(|| panic!("boom")), BackeiStatus::Panic);
        assert!(last().contains("boom"), "{}", last());
        assert_eq!(guarded(|| Ok(())), BackeiStatus::Ok);
        assert_eq!(last(), "");
        let shape = BackeiError::Shape { place: "x".into(), expected: "1".into(), got: "2".into() };
        assert_eq!(guarded(|| Err(shape.into())), BackeiStatus::Shape);
        assert_eq!(last(), "shape mismatch in x: expected 1, got 2");
    }
}
