//! Conv2d on the GPU (stride 1, zero padding, bias): im2col + one cuBLAS SGEMM over a whole chunk
//! of samples (all T×B of them when the column buffer fits the workspace, else in chunks).
//! Twins: `src/cpu/conv.rs` (the reference), `cuda/conv.cu` (im2col, col2im, bias, transposes).
//!
//! Per chunk of n samples (P = ho·wo, KK = cin·k·k, N = n·P):
//!   forward:  col[KK×N] = im2col(x);  yT[cout×N] = W[cout×KK]·col;  y = transpose(yT) + b
//!   backward: col = im2col(x);  dyT[cout×N] = transpose(dy);  dW += dyT·colᵀ;  db += Σ dy;
//!             col ← Wᵀ·dyT (the same buffer);  dx = col2im(col)
//! The workspace (col + yT) is shared by every conv layer of a network, sized once.
//!
//! `forward_with` / `backward_with` take the path a run chose (`gemm_tc::FeedForward`): these
//! cuBLAS functions, or the tensor-core implicit GEMMs of `cuda/gemm_tc.cu` (no column buffer).

use super::conv_halo::{self, HaloOp};
use super::device::GpuDevice;
use super::gemm_tc::{self, addr, FeedForward, FeedForwardWs, XForm};
use super::util::{check_len, cuda_err, grid, sgemm_rm, GemmShape};
use crate::cpu::conv::ConvGeom;
use crate::error::{shape_err, BackeiError, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

/// The default cap of the conv workspace (column buffer + transposed output), in bytes.
pub const DEFAULT_WORKSPACE_BYTES: usize = 512 << 20;

/// How a conv over `samples` samples is split into chunks that fit the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    pub samples: usize,
    /// Samples per chunk (the last chunk may be smaller).
    pub chunk: usize,
    pub chunks: usize,
    /// f32 values of the column buffer: KK·P·chunk.
    pub col_floats: usize,
    /// f32 values of the transposed output / gradient buffer: cout·P·chunk.
    pub t_floats: usize,
}

impl ConvPlan {
    /// The largest chunk whose workspace fits `max_bytes` (at least one sample, even when a single
    /// sample needs more), and never so large that a GEMM dimension overflows cuBLAS's int.
    pub fn new(g: &ConvGeom, samples: usize, max_bytes: usize) -> ConvPlan {
        let p = g.out_pixels();
        let per_sample = (g.col_rows() + g.cout) * p;
        let by_bytes = max_bytes / (4 * per_sample.max(1));
        let by_int = (i32::MAX as usize) / (g.col_rows().max(g.cout) * p).max(1);
        let chunk = by_bytes.min(by_int).clamp(1, samples.max(1));
        ConvPlan { samples, chunk, chunks: samples.div_ceil(chunk), col_floats: g.col_rows() * p * chunk, t_floats: g.cout * p * chunk }
    }

    pub fn workspace_bytes(&self) -> usize {
        4 * (self.col_floats + self.t_floats)
    }
}

/// The three GEMMs of a chunk of `n` samples, row-major: forward yT = W·col, weight gradient
/// dW += dyT·colᵀ, data gradient col = Wᵀ·dyT.
pub fn gemm_shapes(g: &ConvGeom, n: usize) -> [GemmShape; 3] {
    let (kk, cout, np) = (g.col_rows(), g.cout, n * g.out_pixels());
    [
        GemmShape { m: cout, n: np, k: kk, ta: false, tb: false, lda: kk, ldb: np, ldc: np },
        GemmShape { m: cout, n: kk, k: np, ta: false, tb: true, lda: np, ldb: np, ldc: kk },
        GemmShape { m: kk, n: np, k: cout, ta: true, tb: false, lda: kk, ldb: np, ldc: np },
    ]
}

/// The conv workspace: column buffer and transposed-output buffer, grown on demand.
pub struct ConvWorkspace {
    pub max_bytes: usize,
    col: Option<CudaSlice<f32>>,
    t: Option<CudaSlice<f32>>,
}

impl ConvWorkspace {
    pub fn new(max_bytes: usize) -> Self {
        ConvWorkspace { max_bytes, col: None, t: None }
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.col.as_ref().map_or(0, |c| c.len()) + self.t.as_ref().map_or(0, |c| c.len()))
    }

    fn ensure(&mut self, dev: &GpuDevice, plan: &ConvPlan) -> Result<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)> {
        for (buf, len) in [(&mut self.col, plan.col_floats), (&mut self.t, plan.t_floats)] {
            if buf.as_ref().is_none_or(|b| b.len() < len) {
                *buf = None;
                *buf = Some(
                    dev.stream
                        .alloc_zeros::<f32>(len)
                        .map_err(cuda_err(format!("allocating the conv workspace ({} MiB)", (4 * len) >> 20)))?,
                );
            }
        }
        Ok((self.col.as_mut().unwrap(), self.t.as_mut().unwrap()))
    }
}

fn i(x: usize) -> i32 {
    x as i32
}

fn im2col(dev: &GpuDevice, g: &ConvGeom, n: usize, x: &CudaView<f32>, col: &mut CudaViewMut<f32>) -> Result<()> {
    let f = dev.kernels.function("conv", "im2col_f32")?;
    let (nn, cin, h, w, k, pad, ho, wo) = (i(n), i(g.cin), i(g.h), i(g.w), i(g.k), i(g.pad), i(g.ho), i(g.wo));
    let cfg = grid(g.col_rows() * g.out_pixels() * n);
    // SAFETY: x holds n·in_len values, col n·KK·P (checked by the callers).
    unsafe {
        dev.stream.launch_builder(&f).arg(x).arg(col).arg(&nn).arg(&cin).arg(&h).arg(&w).arg(&k).arg(&pad).arg(&ho).arg(&wo).launch(cfg)
    }
    .map_err(cuda_err("im2col_f32"))?;
    Ok(())
}

/// y = W ⊛ x + b over `samples` samples. x [samples][cin][h][w], y [samples][cout][ho][wo].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    dev: &GpuDevice,
    ws: &mut ConvWorkspace,
    g: &ConvGeom,
    samples: usize,
    w: &CudaView<f32>,
    b: &CudaView<f32>,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("conv weight", w.len(), g.weight_len())?;
    check_len("conv bias", b.len(), g.cout)?;
    check_len("conv input", x.len(), samples * g.in_len())?;
    check_len("conv output", y.len(), samples * g.out_len())?;
    let plan = ConvPlan::new(g, samples, ws.max_bytes);
    let (col, yt) = ws.ensure(dev, &plan)?;
    let out = dev.kernels.function("conv", "conv_out_f32")?;
    let p = g.out_pixels();
    for s0 in (0..samples).step_by(plan.chunk) {
        let n = plan.chunk.min(samples - s0);
        let [fwd, _, _] = gemm_shapes(g, n);
        let mut colv = col.slice_mut(0..g.col_rows() * p * n);
        im2col(dev, g, n, &x.slice(s0 * g.in_len()..(s0 + n) * g.in_len()), &mut colv)?;
        let mut ytv = yt.slice_mut(0..g.cout * p * n);
        sgemm_rm(dev, &fwd, 1.0, w, &colv, 0.0, &mut ytv)?;
        let mut yc = y.slice_mut(s0 * g.out_len()..(s0 + n) * g.out_len());
        let (nn, cout, pp) = (i(n), i(g.cout), i(p));
        // SAFETY: yT holds cout·n·P values, y n·cout·P, bias cout.
        unsafe {
            dev.stream
                .launch_builder(&out)
                .arg(&ytv.as_view())
                .arg(b)
                .arg(&mut yc)
                .arg(&nn)
                .arg(&cout)
                .arg(&pp)
                .launch(grid(n * g.out_len()))
        }
        .map_err(cuda_err("conv_out_f32"))?;
    }
    Ok(())
}

/// db[co] += Σ_s Σ_p dy[s][co][p] over `n` samples of `cout`×`p` (the linear layer: p = 1).
pub fn bias_grad(dev: &GpuDevice, n: usize, cout: usize, p: usize, dy: &CudaView<f32>, db: &mut CudaViewMut<f32>) -> Result<()> {
    check_len("bias gradient", db.len(), cout)?;
    check_len("bias gradient's dy", dy.len(), n * cout * p)?;
    let f = dev.kernels.function("conv", "bias_grad_f32")?;
    let cfg = LaunchConfig { grid_dim: (cout as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (nn, c, pp) = (i(n), i(cout), i(p));
    // SAFETY: lengths checked above; the kernel needs 256 threads per block.
    unsafe { dev.stream.launch_builder(&f).arg(dy).arg(db).arg(&nn).arg(&c).arg(&pp).launch(cfg) }.map_err(cuda_err("bias_grad_f32"))?;
    Ok(())
}

/// dW += Σ dy ⋆ x, db += Σ dy, and (when `dx` is given) dx = Wᵀ ⊛ dy (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &GpuDevice,
    ws: &mut ConvWorkspace,
    g: &ConvGeom,
    samples: usize,
    w: &CudaView<f32>,
    x: &CudaView<f32>,
    dy: &CudaView<f32>,
    dw: &mut CudaViewMut<f32>,
    db: &mut CudaViewMut<f32>,
    mut dx: Option<&mut CudaViewMut<f32>>,
) -> Result<()> {
    check_len("conv weight", w.len(), g.weight_len())?;
    check_len("conv weight gradient", dw.len(), g.weight_len())?;
    check_len("conv input", x.len(), samples * g.in_len())?;
    check_len("conv output gradient", dy.len(), samples * g.out_len())?;
    if let Some(dx) = dx.as_ref() {
        check_len("conv input gradient", dx.len(), samples * g.in_len())?;
    }
    bias_grad(dev, samples, g.cout, g.out_pixels(), dy, db)?;
    let plan = ConvPlan::new(g, samples, ws.max_bytes);
    let (col, dyt) = ws.ensure(dev, &plan)?;
    let tr = dev.kernels.function("conv", "conv_dy_t_f32")?;
    let c2i = dev.kernels.function("conv", "col2im_f32")?;
    let p = g.out_pixels();
    for s0 in (0..samples).step_by(plan.chunk) {
        let n = plan.chunk.min(samples - s0);
        let [_, wgrad, dgrad] = gemm_shapes(g, n);
        let mut colv = col.slice_mut(0..g.col_rows() * p * n);
        im2col(dev, g, n, &x.slice(s0 * g.in_len()..(s0 + n) * g.in_len()), &mut colv)?;
        let mut dytv = dyt.slice_mut(0..g.cout * p * n);
        let dyc = dy.slice(s0 * g.out_len()..(s0 + n) * g.out_len());
        let (nn, cout, pp) = (i(n), i(g.cout), i(p));
        // SAFETY: dy chunk and dyT hold n·cout·P values.
        unsafe { dev.stream.launch_builder(&tr).arg(&dyc).arg(&mut dytv).arg(&nn).arg(&cout).arg(&pp).launch(grid(n * g.out_len())) }
            .map_err(cuda_err("conv_dy_t_f32"))?;
        sgemm_rm(dev, &wgrad, 1.0, &dytv, &colv, 1.0, dw)?;
        if let Some(dx) = dx.as_mut() {
            sgemm_rm(dev, &dgrad, 1.0, w, &dytv, 0.0, &mut colv)?;
            let mut dxc = dx.slice_mut(s0 * g.in_len()..(s0 + n) * g.in_len());
            let (cin, h, wd, k, pad, ho, wo, acc) = (i(g.cin), i(g.h), i(g.w), i(g.k), i(g.pad), i(g.ho), i(g.wo), 0i32);
            // SAFETY: col holds KK·n·P values, the dx chunk n·in_len.
            unsafe {
                dev.stream
                    .launch_builder(&c2i)
                    .arg(&colv.as_view())
                    .arg(&mut dxc)
                    .arg(&nn)
                    .arg(&cin)
                    .arg(&h)
                    .arg(&wd)
                    .arg(&k)
                    .arg(&pad)
                    .arg(&ho)
                    .arg(&wo)
                    .arg(&acc)
                    .launch(grid(n * g.in_len()))
            }
            .map_err(cuda_err("col2im_f32"))?;
        }
    }
    Ok(())
}

/// The cuBLAS path reads f32 inputs only (the memory plan asks for int8 codes only on the tensor
/// cores: `memory::pooled_as_codes`).
pub(crate) fn cublas_reads_f32(x_form: XForm) -> Result<()> {
    match x_form {
        XForm::Q8(_) => Err(BackeiError::Cuda("internal: int8 codes of pooled spikes need the tensor-core GEMMs".into())),
        _ => Ok(()),
    }
}

/// `forward` on the path of `ff`: cuBLAS, or the tensor-core implicit GEMM (`x_form`: the input
/// as f32 or int8 codes, and whether it is spikes or averages of spikes, exact in fp16: one product
/// fewer in fp32 mode; `true` for [`XForm::Exact`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    dev: &GpuDevice,
    ff: &mut FeedForwardWs,
    g: &ConvGeom,
    samples: usize,
    w: &CudaView<f32>,
    b: &CudaView<f32>,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<f32>,
    x_form: impl Into<XForm>,
) -> Result<()> {
    let x_form = x_form.into();
    let FeedForward::TensorCore(_) = ff.mode else {
        cublas_reads_f32(x_form)?;
        return forward(dev, &mut ff.conv, g, samples, w, b, x, y);
    };
    // (every sample as the part: the GEMM's own plan)
    forward_part(dev, ff, g, (samples, 0, samples), w, b, x, y, x_form)
}

/// `forward_with` over samples [first, first + count) of the input `x` (all `samples` of them)
/// into `y` ([count][cout][ho][wo]): on the tensor cores, with the plan and scales of the GEMM over
/// every sample, so each output is the bits `forward_with` over all of them writes
/// (`gemm_tc::conv_forward_part`). cuBLAS makes no such promise, so the cuBLAS path refuses (the
/// memory plan recomputes a convolution per window only on the tensor cores:
/// `memory::conv_output_window`).
#[allow(clippy::too_many_arguments)]
pub fn forward_part(
    dev: &GpuDevice,
    ff: &mut FeedForwardWs,
    g: &ConvGeom,
    (samples, first, count): (usize, usize, usize),
    w: &CudaView<f32>,
    b: &CudaView<f32>,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<f32>,
    x_form: impl Into<XForm>,
) -> Result<()> {
    let FeedForward::TensorCore(p) = ff.mode else {
        return Err(BackeiError::Cuda("internal: a convolution over part of its samples needs the tensor-core GEMMs".into()));
    };
    check_len("conv weight", w.len(), g.weight_len())?;
    check_len("conv bias", b.len(), g.cout)?;
    let x_form = x_form.into();
    check_len("conv input (in f32 words)", x.len(), x_form.words(samples * g.in_len()))?;
    check_len("conv output", y.len(), count * g.out_len())?;
    if first + count > samples || count == 0 {
        return Err(shape_err("conv samples", format!("a non-empty part of {samples}"), format!("{first}..{}", first + count)));
    }
    let (wa, xa) = (addr(dev, w), addr(dev, x));
    if let Some(plan) = ff.halo_convs.then(|| conv_halo::halo_plan(HaloOp::Forward, g, count, p, x_form.exact(), &ff.limits)).flatten() {
        // per-sample blocks and the whole input's scale: a part's outputs are the whole's bits
        let part = xa + (x_form.bytes() * first * g.in_len()) as u64;
        let bufs = (wa, addr(dev, b), part, addr(dev, y));
        return conv_halo::run(dev, ff, HaloOp::Forward, g, count, &plan, bufs, x_form, p, [(wa, w.len()), (xa, x.len())]);
    }
    let (d, plan) =
        gemm_tc::conv_forward_part(g, samples, first, count, (wa, addr(dev, b), xa, addr(dev, y)), x_form, &ff.limits, ff.big_tiles);
    gemm_tc::run_planned(dev, &mut ff.tc, d, &plan, p, [(wa, w.len()), (xa, x.len())])
}

/// `backward` on the path of `ff` (see `forward_with`): dW += Σ dy ⋆ x and db += Σ dy in one
/// GEMM (the bias gradient is its column of ones), dx = Wᵀ ⊛ dy in another.
#[allow(clippy::too_many_arguments)]
pub fn backward_with(
    dev: &GpuDevice,
    ff: &mut FeedForwardWs,
    g: &ConvGeom,
    samples: usize,
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
        return backward(dev, &mut ff.conv, g, samples, w, x, dy, dw, db, dx);
    };
    check_len("conv weight", w.len(), g.weight_len())?;
    check_len("conv weight gradient", dw.len(), g.weight_len())?;
    check_len("conv bias gradient", db.len(), g.cout)?;
    check_len("conv input (in f32 words)", x.len(), x_form.words(samples * g.in_len()))?;
    check_len("conv output gradient", dy.len(), samples * g.out_len())?;
    let (wa, xa, dya) = (addr(dev, w), addr(dev, x), addr(dev, dy));
    let d = gemm_tc::conv_weight_grad(g, samples, dya, xa, addr(dev, dw), addr(dev, db), x_form);
    gemm_tc::run(dev, ff, d, p, [(dya, dy.len()), (xa, x.len())])?;
    if let Some(dx) = dx {
        check_len("conv input gradient", dx.len(), samples * g.in_len())?;
        if let Some(plan) = ff.halo_convs.then(|| conv_halo::halo_plan(HaloOp::BackwardData, g, samples, p, false, &ff.limits)).flatten() {
            let bufs = (wa, 0, dya, addr(dev, &*dx));
            return conv_halo::run(
                dev,
                ff,
                HaloOp::BackwardData,
                g,
                samples,
                &plan,
                bufs,
                XForm::Real,
                p,
                [(wa, w.len()), (dya, dy.len())],
            );
        }
        let d = gemm_tc::conv_backward_data(g, samples, wa, dya, addr(dev, &*dx));
        gemm_tc::run(dev, ff, d, p, [(wa, w.len()), (dya, dy.len())])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fit_the_workspace_and_cover_every_sample() {
        // cifar10's second conv over T·B = 2000 samples: 1152·256 + 256·256 floats per sample
        let g = ConvGeom::new(128, 256, 16, 16, 3, 1);
        let plan = ConvPlan::new(&g, 2000, DEFAULT_WORKSPACE_BYTES);
        assert_eq!(plan.chunk, DEFAULT_WORKSPACE_BYTES / (4 * (1152 + 256) * 256));
        assert!(plan.workspace_bytes() <= DEFAULT_WORKSPACE_BYTES);
        assert_eq!(plan.chunks, 2000usize.div_ceil(plan.chunk));
        assert!(plan.chunks > 1 && plan.chunk * plan.chunks >= 2000 && plan.chunk * (plan.chunks - 1) < 2000);
        // a small conv runs in one chunk
        let g1 = ConvGeom::new(3, 128, 32, 32, 3, 1);
        let p1 = ConvPlan::new(&g1, 100, DEFAULT_WORKSPACE_BYTES);
        assert_eq!((p1.chunk, p1.chunks), (100, 1));
        assert_eq!(p1.col_floats, 27 * 1024 * 100);
        // a sample larger than the cap still runs, one at a time
        let p2 = ConvPlan::new(&g, 5, 1000);
        assert_eq!((p2.chunk, p2.chunks), (1, 5));
    }

    #[test]
    fn gemm_shapes_are_consistent_with_the_buffers() {
        for g in [ConvGeom::new(1, 32, 28, 28, 5, 2), ConvGeom::new(15, 40, 12, 12, 5, 0), ConvGeom::new(3, 7, 9, 11, 3, 1)] {
            let n = 7;
            let [f, wg, dg] = gemm_shapes(&g, n);
            let (kk, np) = (g.col_rows(), n * g.out_pixels());
            for s in [f, wg, dg] {
                s.validate().unwrap();
            }
            // forward: W [cout×KK] · col [KK×N] → yT [cout×N]
            assert_eq!(f.extents(), (g.weight_len(), kk * np, g.cout * np));
            // weight gradient: dyT [cout×N] · colᵀ → dW [cout×KK]
            assert_eq!(wg.extents(), (g.cout * np, kk * np, g.weight_len()));
            // data gradient: Wᵀ [KK×cout] · dyT [cout×N] → col [KK×N]
            assert_eq!(dg.extents(), (g.weight_len(), g.cout * np, kk * np));
        }
        let bad = GemmShape { m: 2, n: 3, k: 4, ta: false, tb: false, lda: 3, ldb: 3, ldc: 3 };
        assert!(bad.validate().is_err(), "lda < k must be refused");
    }
}
