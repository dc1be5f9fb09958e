//! Host side of the window-staged convolutions (`cuda/conv_halo.cu`, whose header gives the math):
//! a stride-1 convolution's forward or data gradient with each input element staged once per
//! block and 32 channels, every tap reading the staged window at a shifted address. The
//! descriptor, the tile shape, the grid and the shared memory are pure functions of the shapes
//! ([`halo_plan`], [`descriptor`], [`launches`]); [`run`] issues them on a device. Twins:
//! `src/cpu/conv.rs` (forward, backward_data); the generic path beside it: `gemm_tc`.
//!
//! Opt-in (`BACKEI_TC_CONV=halo`, [`halo_from_env`]) until a GPU run shows it correct and faster
//! than the generic implicit GEMM; the feedforward bench times both (`tc <p> halo` rows).

use super::backei_layer::DeviceLimits;
use super::device::GpuDevice;
use super::gemm_tc::{helper_blocks, helper_config, launch_absmax, FeedForwardWs, XForm};
use super::util::cuda_err;
use crate::cpu::conv::ConvGeom;
use crate::error::Result;
use crate::precision::Precision;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

/// `BACKEI_TC_CONV=halo` runs the convolutions' forward and data gradient on the window-staged
/// kernels where [`halo_plan`] takes them; unset or `gemm`: the generic implicit GEMM.
pub const CONV_ENV: &str = "BACKEI_TC_CONV";

/// Whether `BACKEI_TC_CONV` (its value, None: unset) asks for the window-staged kernels.
pub fn halo_from_env(value: Option<&str>) -> Result<bool> {
    super::util::opt_in_from_env(CONV_ENV, value, "halo", "window-staged convolutions", "gemm")
}

/// Input channels per staged chunk (`HALO_CC`), and the 16-bit and tf32 shared-memory rows' bytes.
pub const HALO_CC: usize = 32;
const PITCH16: usize = 80;
const PITCH32: usize = 144;

/// `HaloDesc` of `cuda/conv_halo.cu`, field for field (the layout is checked against the
/// compiler's: `conv_halo_layout`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HaloDesc {
    pub input: u64,
    pub wprep: u64,
    pub bias: u64,
    pub out: u64,
    pub w: u64,
    pub s: i32,
    pub ci: i32,
    pub mo: i32,
    pub ih: i32,
    pub iw: i32,
    pub oh: i32,
    pub ow: i32,
    pub k: i32,
    pub sign: i32,
    pub origin: i32,
    pub lo: i32,
    pub halo_w: i32,
    pub tiles: i32,
    pub chunks: i32,
    pub bm: i32,
    pub transposed: i32,
    pub exact: i32,
    pub q8: i32,
    pub q8_factor: f32,
    pub accumulate: i32,
}

// SAFETY: plain old data with the C layout of the kernel's struct (tested).
unsafe impl DeviceRepr for HaloDesc {}

/// Which convolution op a descriptor computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaloOp {
    /// y = W ⊛ x + b: [samples][cout][ho][wo] from x [samples][cin][h][w]
    Forward,
    /// dx = Wᵀ ⊛ dy (flipped taps): [samples][cin][h][w] from dy [samples][cout][ho][wo], written
    BackwardData,
}

/// A block's tile: output channels × consecutive output pixels of one sample (`conv_halo.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaloShape {
    /// 64 × 256, 8 warps of 32 channels × 64 pixels
    M64N256,
    /// 32 × 256, 4 warps (M ≤ 32: fashion-mnist's conv2 data gradient)
    M32N256,
    /// 128 × 64, 8 warps of 32 × 32 (maps of at most 96 pixels: cifar10's 8×8)
    M128N64,
}

impl HaloShape {
    /// (BM, BN): output channels and pixels of a block.
    pub fn dims(self) -> (usize, usize) {
        match self {
            HaloShape::M64N256 => (64, 256),
            HaloShape::M32N256 => (32, 256),
            HaloShape::M128N64 => (128, 64),
        }
    }
    pub fn threads(self) -> u32 {
        match self {
            HaloShape::M32N256 => 128,
            _ => 256,
        }
    }
    /// The shape for `mo` output channels on maps of `pixels` output pixels.
    pub fn of(mo: usize, pixels: usize) -> Self {
        if mo <= 32 {
            HaloShape::M32N256
        } else if pixels <= 96 {
            HaloShape::M128N64
        } else {
            HaloShape::M64N256
        }
    }
    pub fn kernel(self, p: Precision) -> &'static str {
        use HaloShape::*;
        use Precision::*;
        match (self, p) {
            (M64N256, Fp32) => "conv_halo_fp32_m64n256",
            (M64N256, Tf32) => "conv_halo_tf32_m64n256",
            (M64N256, Bf16) => "conv_halo_bf16_m64n256",
            (M32N256, Fp32) => "conv_halo_fp32_m32n256",
            (M32N256, Tf32) => "conv_halo_tf32_m32n256",
            (M32N256, Bf16) => "conv_halo_bf16_m32n256",
            (M128N64, Fp32) => "conv_halo_fp32_m128n64",
            (M128N64, Tf32) => "conv_halo_tf32_m128n64",
            (M128N64, Bf16) => "conv_halo_bf16_m128n64",
        }
    }
}

/// The weight-preparing kernel of a precision.
pub fn weights_kernel(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "conv_halo_weights_fp32",
        Precision::Tf32 => "conv_halo_weights_tf32",
        Precision::Bf16 => "conv_halo_weights_bf16",
    }
}

/// The extents of an op: (input channels CI, output channels MO, input map, output map).
fn extents(op: HaloOp, g: &ConvGeom) -> (usize, usize, (usize, usize), (usize, usize)) {
    match op {
        HaloOp::Forward => (g.cin, g.cout, (g.h, g.w), (g.ho, g.wo)),
        HaloOp::BackwardData => (g.cout, g.cin, (g.ho, g.wo), (g.h, g.w)),
    }
}

/// How an op over `samples` samples runs: its tile, grid, dynamic shared memory and the words of
/// its prepared weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HaloPlan {
    pub shape: HaloShape,
    pub grid: (u32, u32, u32),
    /// Output rows a block's pixels span at most, and the window's input rows (+ k − 1).
    pub rows: usize,
    pub smem_bytes: usize,
    /// u32 words of `conv_halo_weights`' output.
    pub wprep_words: usize,
    /// Pixel tiles per sample and channel chunks.
    pub tiles: usize,
    pub chunks: usize,
}

/// The plan of `op` on `g` over `samples` samples in `precision` (`exact`: the input is exact in
/// fp16 — spikes, pooled spikes, their int8 codes), or None where the window-staged kernels do
/// not apply: fewer than 16 input channels (a chunk of 32 would be mostly padding: the generic
/// GEMM suits), a window beyond the device's shared memory, or a grid beyond its limits.
pub fn halo_plan(op: HaloOp, g: &ConvGeom, samples: usize, precision: Precision, exact: bool, limits: &DeviceLimits) -> Option<HaloPlan> {
    let (ci, mo, _, (oh, ow)) = extents(op, g);
    let pixels = oh * ow;
    if ci < 16 || samples == 0 || pixels == 0 || mo == 0 {
        return None;
    }
    let shape = HaloShape::of(mo, pixels);
    let (bm, bn) = shape.dims();
    let rows = if bn >= pixels { oh } else { oh.min((bn - 1 + ow - 1) / ow + 1) };
    let hpix = (rows + g.k - 1) * (ow + g.k - 1);
    let (pitch, row_words) = if precision == Precision::Tf32 { (PITCH32, PITCH32 / 4) } else { (PITCH16, PITCH16 / 4) };
    let planes_a = if precision == Precision::Fp32 { 2 } else { 1 };
    let planes_b = if precision == Precision::Fp32 && !exact { 2 } else { 1 };
    let smem_bytes = planes_b * hpix * pitch + 2 * planes_a * bm * pitch;
    // taken or not whatever the input's exactness (the worst case, two planes in fp32 mode), so
    // that the memory plan, which does not track exactness, agrees with the run
    if planes_a * hpix * pitch + 2 * planes_a * bm * pitch > limits.max_smem_per_block as usize {
        return None;
    }
    let tiles = pixels.div_ceil(bn);
    let (chunks, mblocks) = (ci.div_ceil(HALO_CC), mo.div_ceil(bm));
    let blocks_x = samples.checked_mul(tiles)?;
    if blocks_x > i32::MAX as usize || mblocks > 65_535 {
        return None;
    }
    Some(HaloPlan {
        shape,
        grid: (blocks_x as u32, mblocks as u32, 1),
        rows,
        smem_bytes,
        wprep_words: mblocks * chunks * g.k * g.k * planes_a * bm * row_words,
        tiles,
        chunks,
    })
}

/// The descriptor of `op` under `plan`: `input` the op's input (x, or dy), `out` its output (y, or
/// dx), `bias` (0: none; the forward's), `wprep` the prepared weights' buffer.
#[allow(clippy::too_many_arguments)]
pub fn descriptor(
    op: HaloOp,
    g: &ConvGeom,
    samples: usize,
    plan: &HaloPlan,
    (w, bias, input, out, wprep): (u64, u64, u64, u64, u64),
    x_form: impl Into<XForm>,
) -> HaloDesc {
    let x_form = x_form.into();
    let (ci, mo, (ih, iw), (oh, ow)) = extents(op, g);
    let (sign, origin) = match op {
        HaloOp::Forward => (1, g.pad as i32),
        HaloOp::BackwardData => (-1, g.pad as i32),
    };
    let k = g.k as i32;
    let lo = (sign * -origin).min(sign * (k - 1 - origin));
    HaloDesc {
        input,
        wprep,
        bias: if op == HaloOp::Forward { bias } else { 0 },
        out,
        w,
        s: samples as i32,
        ci: ci as i32,
        mo: mo as i32,
        ih: ih as i32,
        iw: iw as i32,
        oh: oh as i32,
        ow: ow as i32,
        k,
        sign,
        origin,
        lo,
        halo_w: (ow + g.k - 1) as i32,
        tiles: plan.tiles as i32,
        chunks: plan.chunks as i32,
        bm: plan.shape.dims().0 as i32,
        transposed: (op == HaloOp::BackwardData) as i32,
        exact: x_form.exact() as i32,
        q8: matches!(x_form, XForm::Q8(_)) as i32,
        q8_factor: if let XForm::Q8(f) = x_form { f } else { 0.0 },
        accumulate: 0,
    }
}

/// One launch of a window-staged convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HaloLaunch {
    /// Zero the two scale words (fp32 mode).
    ClearScales,
    /// gemm_tc's `absmax_f32` of `len` values at `ptr` into the word at `out`.
    Absmax { ptr: u64, len: usize, out: u64, grid: u32 },
    /// `conv_halo_weights_<p>`: W into `desc.wprep`.
    Weights { kernel: &'static str, grid: u32, desc: HaloDesc },
    /// The convolution.
    Conv { kernel: &'static str, grid: (u32, u32, u32), threads: u32, smem_bytes: u32, desc: HaloDesc },
}

/// The launches of one op: in fp32 mode the scales (maxbits[0] the weights' largest |w|,
/// maxbits[1] the input's unless exact; `sources` the buffers they are taken over: the weights,
/// the whole input — a part of it takes the whole's scale, as gemm_tc's parts do), the weights'
/// preparation, the convolution.
pub fn launches(desc: HaloDesc, plan: &HaloPlan, precision: Precision, sources: [(u64, usize); 2], maxbits: u64) -> Vec<HaloLaunch> {
    let mut out = Vec::new();
    if precision == Precision::Fp32 {
        out.push(HaloLaunch::ClearScales);
        let exact = [false, desc.exact != 0];
        for (slot, (ptr, len)) in sources.into_iter().enumerate() {
            if !exact[slot] && len > 0 {
                out.push(HaloLaunch::Absmax { ptr, len, out: maxbits + 4 * slot as u64, grid: helper_blocks(len.min(1 << 28)) });
            }
        }
    }
    out.push(HaloLaunch::Weights { kernel: weights_kernel(precision), grid: helper_blocks(plan.wprep_words), desc });
    out.push(HaloLaunch::Conv {
        kernel: plan.shape.kernel(precision),
        grid: plan.grid,
        threads: plan.shape.threads(),
        smem_bytes: plan.smem_bytes as u32,
        desc,
    });
    out
}

/// The device buffer of the prepared weights, grown to the largest op's.
#[derive(Default)]
pub struct HaloWorkspace {
    wprep: Option<CudaSlice<u32>>,
}

impl HaloWorkspace {
    pub fn bytes(&self) -> usize {
        4 * self.wprep.as_ref().map_or(0, |w| w.len())
    }
}

/// Runs `op` on the device under `plan` (see [`launches`]); `sources` as there.
#[allow(clippy::too_many_arguments)]
pub fn run(
    dev: &GpuDevice,
    ff: &mut FeedForwardWs,
    op: HaloOp,
    g: &ConvGeom,
    samples: usize,
    plan: &HaloPlan,
    (w, bias, input, out): (u64, u64, u64, u64),
    x_form: impl Into<XForm>,
    precision: Precision,
    sources: [(u64, usize); 2],
) -> Result<()> {
    use cudarc::driver::DevicePtrMut;
    if ff.halo.wprep.as_ref().is_none_or(|b| b.len() < plan.wprep_words) {
        ff.halo.wprep = None;
        ff.halo.wprep = Some(dev.stream.alloc_zeros(plan.wprep_words).map_err(cuda_err("allocating the prepared conv weights"))?);
    }
    let wprep = match ff.halo.wprep.as_mut() {
        Some(b) => b.device_ptr_mut(&dev.stream).0,
        None => 0,
    };
    let maxbits = ff.tc.maxbits.device_ptr_mut(&dev.stream).0;
    let desc = descriptor(op, g, samples, plan, (w, bias, input, out, wprep), x_form);
    for l in launches(desc, plan, precision, sources, maxbits) {
        // SAFETY (every launch): the descriptor's addresses and extents come from the caller's
        // checked buffers; the scale words and the prepared weights are the workspace's, sized above.
        match l {
            HaloLaunch::ClearScales => dev.stream.memset_zeros(&mut ff.tc.maxbits).map_err(cuda_err("clearing the conv scales"))?,
            HaloLaunch::Absmax { ptr, len, out, grid } => launch_absmax(dev, ptr, len, out, grid)?,
            HaloLaunch::Weights { kernel, grid, desc } => {
                let f = dev.kernels.function("conv_halo", kernel)?;
                unsafe { dev.stream.launch_builder(&f).arg(&desc).arg(&wprep).arg(&maxbits).launch(helper_config(grid)) }
                    .map_err(cuda_err(kernel))?;
            }
            HaloLaunch::Conv { kernel, grid, threads, smem_bytes, desc } => {
                let f = dev.kernels.function("conv_halo", kernel)?;
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes as i32,
                )
                .map_err(cuda_err("allowing the conv window's shared memory"))?;
                let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: smem_bytes };
                unsafe { dev.stream.launch_builder(&f).arg(&desc).arg(&maxbits).launch(cfg) }.map_err(cuda_err(kernel))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steps' convolutions the kernels are for, and what they take: fashion-mnist's conv2
    /// (32 → 64, 5×5 on 14×14) forward on the wide-enough tiles, its data gradient (M = 32) on
    /// m32n256; cifar10's conv2 (16×16) and conv3 (8×8: m128n64); one block per (sample, pixel
    /// tile, channel block); the shared memory within an H100's; conv1s (1 or 3 input channels)
    /// refused.
    #[test]
    fn plans_of_the_step_convolutions() {
        let h100 = DeviceLimits::H100;
        let fashion = ConvGeom::new(32, 64, 14, 14, 5, 2);
        let f = halo_plan(HaloOp::Forward, &fashion, 2000, Precision::Fp32, true, &h100).unwrap();
        assert_eq!((f.shape, f.grid, f.rows, f.tiles, f.chunks), (HaloShape::M64N256, (2000, 1, 1), 14, 1, 1));
        // window 18 × 18 of one 16-bit plane (exact input) + two buffers of hi and lo weights
        assert_eq!(f.smem_bytes, 18 * 18 * 80 + 2 * 2 * 64 * 80);
        assert_eq!(f.wprep_words, 25 * 2 * 64 * 20);
        let d = halo_plan(HaloOp::BackwardData, &fashion, 2000, Precision::Fp32, false, &h100).unwrap();
        assert_eq!((d.shape, d.grid, d.chunks), (HaloShape::M32N256, (2000, 1, 1), 2));
        assert_eq!(d.smem_bytes, 2 * 18 * 18 * 80 + 2 * 2 * 32 * 80);
        let c2 = ConvGeom::new(128, 256, 16, 16, 3, 1);
        let p = halo_plan(HaloOp::Forward, &c2, 2000, Precision::Bf16, true, &h100).unwrap();
        assert_eq!((p.shape, p.grid, p.rows, p.tiles, p.chunks), (HaloShape::M64N256, (2000, 4, 1), 16, 1, 4));
        let c3 = ConvGeom::new(256, 512, 8, 8, 3, 1);
        let p = halo_plan(HaloOp::BackwardData, &c3, 2000, Precision::Tf32, false, &h100).unwrap();
        assert_eq!((p.shape, p.grid, p.chunks), (HaloShape::M128N64, (2000, 2, 1), 16));
        assert_eq!(p.smem_bytes, 10 * 10 * 144 + 2 * 128 * 144);
        for p in Precision::ALL {
            for op in [HaloOp::Forward, HaloOp::BackwardData] {
                for g in [fashion, c2, c3] {
                    let plan = halo_plan(op, &g, 2000, p, false, &h100).unwrap();
                    assert!(plan.smem_bytes <= 114 * 1024, "{op:?} {g:?} {p}: two blocks per SM: {plan:?}");
                }
            }
        }
        assert_eq!(halo_plan(HaloOp::Forward, &ConvGeom::new(1, 32, 28, 28, 5, 2), 100, Precision::Fp32, false, &h100), None);
        assert_eq!(halo_plan(HaloOp::Forward, &ConvGeom::new(3, 128, 32, 32, 3, 1), 100, Precision::Fp32, false, &h100), None);
        // the data gradient of fashion's conv1 flows nowhere, but would run: 32 input channels
        assert!(halo_plan(HaloOp::BackwardData, &ConvGeom::new(1, 32, 28, 28, 5, 2), 100, Precision::Fp32, false, &h100).is_some());
    }

    /// A block's pixels span at most `rows` output rows wherever its tile starts, and the window
    /// then holds every input the taps read: the kernel's indices stay inside it (checked here
    /// over every tile of odd maps, both ops, every tap).
    #[test]
    fn every_tap_of_every_tile_reads_inside_the_window() {
        let h100 = DeviceLimits::H100;
        for g in [
            ConvGeom::new(16, 40, 7, 30, 3, 1),
            ConvGeom::new(16, 70, 9, 9, 5, 0),
            ConvGeom::new(20, 33, 23, 5, 5, 2),
            ConvGeom::new(64, 16, 3, 3, 3, 2),
        ] {
            for op in [HaloOp::Forward, HaloOp::BackwardData] {
                let plan = halo_plan(op, &g, 3, Precision::Fp32, false, &h100).unwrap();
                let d = descriptor(op, &g, 3, &plan, (0, 0, 0, 0, 0), false);
                let (bn, ohw) = (plan.shape.dims().1 as i32, d.oh * d.ow);
                for tile in 0..d.tiles {
                    let p0 = tile * bn;
                    let (y_first, y_last) = (p0 / d.ow, ((p0 + bn).min(ohw) - 1) / d.ow);
                    let hrows = y_last - y_first + d.k;
                    assert!(hrows as usize <= plan.rows + g.k - 1, "{op:?} {g:?} tile {tile}: {hrows} rows > {plan:?}");
                    for n in p0..(p0 + bn).min(ohw) {
                        let (y, x) = (n / d.ow, n % d.ow);
                        for ky in 0..d.k {
                            for kx in 0..d.k {
                                let (oy, ox) = (d.sign * (ky - d.origin), d.sign * (kx - d.origin));
                                let at = (y - y_first) * d.halo_w + x + (oy - d.lo) * d.halo_w + (ox - d.lo);
                                assert!((0..hrows * d.halo_w).contains(&at), "{op:?} {g:?} n {n} tap ({ky},{kx})");
                                // the window pixel is the input the CPU reads at (y + oy, x + ox)
                                let (hr, hc) = (at / d.halo_w, at % d.halo_w);
                                assert_eq!((y_first + d.lo + hr, d.lo + hc), (y + oy, x + ox));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_variable_takes_halo_or_gemm() {
        for (v, want) in [(None, Some(false)), (Some("gemm"), Some(false)), (Some(" halo "), Some(true)), (Some("im2col"), None)] {
            match (halo_from_env(v), want) {
                (Ok(got), Some(want)) => assert_eq!(got, want, "{v:?}"),
                (Err(e), None) => assert!(e.to_string().contains(CONV_ENV) && e.to_string().contains("halo"), "{e}"),
                (r, _) => panic!("{v:?}: {r:?}"),
            }
        }
    }
}
