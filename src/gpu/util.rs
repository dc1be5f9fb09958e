//! Small helpers shared by the GPU host files: launch geometry, CUDA/cuBLAS errors as
//! `BackeiError` values, and row-major SGEMM on top of column-major cuBLAS.

use super::device::GpuDevice;
use crate::error::{config_err, shape_err, BackeiError, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut, DriverError, LaunchConfig};

/// Threads per block of every elementwise kernel.
pub const BLOCK: u32 = 256;

/// A 1-D launch for `total` elements of a grid-stride kernel (the grid is capped; the kernel's
/// loop covers the rest).
pub fn grid(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// A CUDA driver error as a value naming what failed.
pub fn cuda_err(what: impl Into<String>) -> impl FnOnce(DriverError) -> BackeiError {
    let what = what.into();
    move |e| BackeiError::Cuda(format!("{what}: {e:?}"))
}

/// An on/off environment switch, on by default: unset, empty or 1 is on, 0 off; anything else is
/// refused, naming what 1 and 0 mean (`on`, `off`).
pub fn switch_from_env(name: &str, value: Option<&str>, on: &str, off: &str) -> Result<bool> {
    match value.map(str::trim) {
        None | Some("") | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(config_err(name, format!("`{other}`: use 1 ({on}, the default) or 0 ({off})"))),
    }
}

/// An opt-in choice between two named values: `on` (what it means: `on_means`) or `off`, the
/// default when unset or empty; anything else is an error naming both.
pub fn opt_in_from_env(name: &str, value: Option<&str>, on: &str, on_means: &str, off: &str) -> Result<bool> {
    match value.map(str::trim) {
        None | Some("") => Ok(false),
        Some(v) if v == off => Ok(false),
        Some(v) if v == on => Ok(true),
        Some(v) => Err(config_err(name, format!("`{v}`: use {on} ({on_means}) or {off} (the default)"))),
    }
}

/// Whether an error is the device running out of memory.
pub fn is_oom(e: &BackeiError) -> bool {
    matches!(e, BackeiError::Cuda(m) if m.contains("OUT_OF_MEMORY"))
}

/// `len` must equal `expected` for the buffer `place`.
pub fn check_len(place: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(shape_err(place, format!("{expected} f32 values"), format!("{len}")))
    }
}

/// A row-major GEMM C[m×n] = α·op(A)·op(B) + β·C: A is stored m×k (k×m when `ta`) with row
/// stride `lda`, B k×n (n×k when `tb`) with row stride `ldb`, C m×n with row stride `ldc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl GemmShape {
    /// Elements of A, B and C the call touches (the buffers must hold at least these).
    pub fn extents(&self) -> (usize, usize, usize) {
        let (ar, ac) = if self.ta { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.tb { (self.n, self.k) } else { (self.k, self.n) };
        ((ar - 1) * self.lda + ac, (br - 1) * self.ldb + bc, (self.m - 1) * self.ldc + self.n)
    }

    /// Leading dimensions at least the row lengths, and every size within cuBLAS's `int`.
    pub fn validate(&self) -> Result<()> {
        let ac = if self.ta { self.m } else { self.k };
        let bc = if self.tb { self.k } else { self.n };
        let dims = [self.m, self.n, self.k, self.lda, self.ldb, self.ldc];
        if dims.contains(&0) || self.lda < ac || self.ldb < bc || self.ldc < self.n || dims.iter().any(|&d| d > i32::MAX as usize) {
            return Err(shape_err("GEMM", "positive sizes that fit an int, leading dimensions ≥ row lengths", format!("{self:?}")));
        }
        Ok(())
    }
}

fn op(t: bool) -> cublasOperation_t {
    if t {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// Row-major C = α·op(A)·op(B) + β·C through column-major cuBLAS: Cᵀ = op(B)ᵀ·op(A)ᵀ, i.e. the
/// column-major call with A and B swapped (m ↔ n).
pub fn sgemm_rm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    dev: &GpuDevice,
    s: &GemmShape,
    alpha: f32,
    a: &A,
    b: &B,
    beta: f32,
    c: &mut C,
) -> Result<()> {
    s.validate()?;
    let (na, nb, nc) = s.extents();
    if a.len() < na || b.len() < nb || c.len() < nc {
        return Err(shape_err(
            "GEMM operands",
            format!("A ≥ {na}, B ≥ {nb}, C ≥ {nc} values for {s:?}"),
            format!("{}, {}, {}", a.len(), b.len(), c.len()),
        ));
    }
    let cfg = GemmConfig {
        transa: op(s.tb),
        transb: op(s.ta),
        m: s.n as i32,
        n: s.m as i32,
        k: s.k as i32,
        alpha,
        lda: s.ldb as i32,
        ldb: s.lda as i32,
        beta,
        ldc: s.ldc as i32,
    };
    // SAFETY: the extents of every operand were checked against the buffers above.
    unsafe { dev.blas()?.gemm(cfg, b, a, c) }.map_err(|e| BackeiError::Cuda(format!("cublasSgemm {s:?}: {e:?}")))
}
