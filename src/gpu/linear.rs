//! Linear layer on the GPU through cuBLAS: y[rows×out] = x[rows×in]·Wᵀ + b over all T×B rows at
//! once, W [out][in] (PyTorch's layout). Twin of `src/cpu/linear.rs`; the bias kernels live in
//! `cuda/conv.cu` (bias_fill_f32, bias_grad_f32 with P = 1). `forward_with` / `backward_with`
//! take the path a run chose: these, or the tensor-core GEMMs of `cuda/gemm_tc.cu`.

use super::conv::{bias_grad, cublas_reads_f32};
use super::device::GpuDevice;
use super::gemm_tc::{self, addr, FeedForward, FeedForwardWs, XForm};
use super::util::{check_len, cuda_err, grid, sgemm_rm, GemmShape};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

/// Row-major GEMMs: forward y = x·Wᵀ, data gradient dx = dy·W, weight gradient dW += dyᵀ·x.
pub fn gemm_shapes(n_in: usize, n_out: usize, rows: usize) -> [GemmShape; 3] {
    [
        GemmShape { m: rows, n: n_out, k: n_in, ta: false, tb: true, lda: n_in, ldb: n_in, ldc: n_out },
        GemmShape { m: rows, n: n_in, k: n_out, ta: false, tb: false, lda: n_out, ldb: n_in, ldc: n_in },
        GemmShape { m: n_out, n: n_in, k: rows, ta: true, tb: false, lda: n_out, ldb: n_in, ldc: n_in },
    ]
}

#[allow(clippy::too_many_arguments)]
pub fn forward(
    dev: &GpuDevice,
    n_in: usize,
    n_out: usize,
    rows: usize,
    w: &CudaView<f32>,
    b: &CudaView<f32>,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("linear weight", w.len(), n_in * n_out)?;
    check_len("linear bias", b.len(), n_out)?;
    check_len("linear input", x.len(), rows * n_in)?;
    check_len("linear output", y.len(), rows * n_out)?;
    let f = dev.kernels.function("conv", "bias_fill_f32")?;
    let (total, cout, p) = ((rows * n_out) as i64, n_out as i32, 1i32);
    // SAFETY: y holds rows·n_out values, b n_out.
    unsafe { dev.stream.launch_builder(&f).arg(&mut *y).arg(b).arg(&total).arg(&cout).arg(&p).launch(grid(rows * n_out)) }
        .map_err(cuda_err("bias_fill_f32"))?;
    let [fwd, _, _] = gemm_shapes(n_in, n_out, rows);
    sgemm_rm(dev, &fwd, 1.0, x, w, 1.0, y)
}

/// dW += dyᵀ·x, db += Σ_rows dy, and (when `dx` is given) dx = dy·W (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &GpuDevice,
    n_in: usize,
    n_out: usize,
    rows: usize,
    w: &CudaView<f32>,
    x: &CudaView<f32>,
    dy: &CudaView<f32>,
    dw: &mut CudaViewMut<f32>,
    db: &mut CudaViewMut<f32>,
    dx: Option<&mut CudaViewMut<f32>>,
) -> Result<()> {
    check_len("linear weight gradient", dw.len(), n_in * n_out)?;
    check_len("linear input", x.len(), rows * n_in)?;
    check_len("linear output gradient", dy.len(), rows * n_out)?;
    let [_, dgrad, wgrad] = gemm_shapes(n_in, n_out, rows);
    sgemm_rm(dev, &wgrad, 1.0, dy, x, 1.0, dw)?;
    bias_grad(dev, rows, n_out, 1, dy, db)?;
    if let Some(dx) = dx {
        check_len("linear input gradient", dx.len(), rows * n_in)?;
        sgemm_rm(dev, &dgrad, 1.0, dy, w, 0.0, dx)?;
    }
    Ok(())
}

/// `forward` on the path of `ff` (`x_form`: as `conv::forward_with`'s).
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    dev: &GpuDevice,
    ff: &mut FeedForwardWs,
    n_in: usize,
    n_out: usize,
    rows: usize,
    w: &CudaView<f32>,
    b: &CudaView<f32>,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<f32>,
    x_form: impl Into<XForm>,
) -> Result<()> {
    let x_form = x_form.into();
    let FeedForward::TensorCore(p) = ff.mode else {
        cublas_reads_f32(x_form)?;
        return forward(dev, n_in, n_out, rows, w, b, x, y);
    };
    check_len("linear weight", w.len(), n_in * n_out)?;
    check_len("linear bias", b.len(), n_out)?;
    check_len("linear input (in f32 words)", x.len(), x_form.words(rows * n_in))?;
    check_len("linear output", y.len(), rows * n_out)?;
    let (wa, xa) = (addr(dev, w), addr(dev, x));
    let d = gemm_tc::linear_forward(n_in, n_out, rows, xa, wa, addr(dev, b), addr(dev, y), x_form);
    gemm_tc::run(dev, ff, d, p, [(xa, x.len()), (wa, w.len())])
}

/// `backward` on the path of `ff`: dW += dyᵀ·x and db += Σ dy in one GEMM (the bias gradient is
/// its column of ones), dx = dy·W in another.
#[allow(clippy::too_many_arguments)]
pub fn backward_with(
    dev: &GpuDevice,
    ff: &mut FeedForwardWs,
    n_in: usize,
    n_out: usize,
    rows: usize,
    w: &CudaView<f32>,
    x: &CudaView<f32>,
    dy: &CudaView<f32>,
    dw: &mut CudaViewMut<f32>,
    db: &mut CudaViewMut<f32>,
    dx: Option<&mut CudaViewMut<f32>>,
    x_form: impl Into<XForm>,
) -> Result<()> {
    let x_form = x_form.into();
    let FeedForward::TensorCore(p) = ff.mode else {
        cublas_reads_f32(x_form)?;
        return backward(dev, n_in, n_out, rows, w, x, dy, dw, db, dx);
    };
    check_len("linear weight gradient", dw.len(), n_in * n_out)?;
    check_len("linear bias gradient", db.len(), n_out)?;
    check_len("linear input (in f32 words)", x.len(), x_form.words(rows * n_in))?;
    check_len("linear output gradient", dy.len(), rows * n_out)?;
    let (wa, xa, dya) = (addr(dev, w), addr(dev, x), addr(dev, dy));
    let d = gemm_tc::linear_weight_grad(n_in, n_out, rows, dya, xa, addr(dev, dw), addr(dev, db), x_form);
    gemm_tc::run(dev, ff, d, p, [(dya, dy.len()), (xa, x.len())])?;
    if let Some(dx) = dx {
        check_len("linear input gradient", dx.len(), rows * n_in)?;
        let d = gemm_tc::linear_backward_data(n_in, n_out, rows, dya, wa, addr(dev, &*dx));
        gemm_tc::run(dev, ff, d, p, [(dya, dy.len()), (wa, w.len())])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_shapes_match_the_buffers() {
        let (n_in, n_out, rows) = (3136, 1024, 2000);
        let [f, d, w] = gemm_shapes(n_in, n_out, rows);
        for s in [f, d, w] {
            s.validate().unwrap();
        }
        assert_eq!(f.extents(), (rows * n_in, n_in * n_out, rows * n_out));
        assert_eq!(d.extents(), (rows * n_out, n_in * n_out, rows * n_in));
        assert_eq!(w.extents(), (rows * n_out, rows * n_in, n_in * n_out));
    }
}
