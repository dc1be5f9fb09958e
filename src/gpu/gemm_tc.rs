//! Host side of the tensor-core GEMMs of the feed-forward layers (`cuda/gemm_tc.cu`, whose header
//! gives the math): the descriptor of each op — a convolution's forward, data gradient and weight
//! gradient as implicit GEMMs, a linear layer's three GEMMs — as pure functions of the shapes and
//! the buffers' device addresses, the grid and split-K, and the launches. Twins:
//! `src/cpu/conv.rs`, `src/cpu/linear.rs`; callers `src/gpu/conv.rs`, `src/gpu/linear.rs`.
//!
//! Which path a run takes ([`FeedForward`]): cuBLAS's FP32 GEMMs (im2col for the convolutions)
//! stay the default in fp32 mode until a GPU run has timed both; tf32 and bf16 run these kernels
//! (cuBLAS's SGEMM computes fp32 only); `BACKEI_FEEDFORWARD=tc` takes them in fp32 mode too.

use super::backei_layer::DeviceLimits;
use super::device::GpuDevice;
use super::util::cuda_err;
use crate::cpu::conv::ConvGeom;
use crate::error::{config_err, shape_err, Result};
use crate::precision::Precision;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

/// The environment variable that picks the feed-forward layers' GEMMs: `tc` or `cublas`.
pub const FEEDFORWARD_ENV: &str = "BACKEI_FEEDFORWARD";

/// How the convolutions and linear layers compute their products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FeedForward {
    /// cuBLAS SGEMM (FP32), im2col for the convolutions.
    Cublas,
    /// `gemm_tc.cu` on tensor cores, in this precision.
    TensorCore(Precision),
}

impl FeedForward {
    /// The path for `precision` and the value of `BACKEI_FEEDFORWARD` (None: unset).
    pub fn choose(precision: Precision, env: Option<&str>) -> Result<Self> {
        match env.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") => Ok(match precision {
                Precision::Fp32 => FeedForward::Cublas,
                p => FeedForward::TensorCore(p),
            }),
            Some("tc") => Ok(FeedForward::TensorCore(precision)),
            Some("cublas") if precision == Precision::Fp32 => Ok(FeedForward::Cublas),
            Some("cublas") => Err(config_err(
                FEEDFORWARD_ENV,
                format!("cublas computes fp32 only, not --precision {precision}: use --precision fp32 or {FEEDFORWARD_ENV}=tc"),
            )),
            Some(other) => Err(config_err(FEEDFORWARD_ENV, format!("`{other}`: use tc (tensor cores) or cublas (FP32)"))),
        }
    }

    /// `choose` with the variable as it is set.
    pub fn from_env(precision: Precision) -> Result<Self> {
        Self::choose(precision, std::env::var(FEEDFORWARD_ENV).ok().as_deref())
    }
}

pub const IDX_LINEAR: i32 = 0;
pub const IDX_SAMPLE_PIXEL: i32 = 1;
pub const IDX_CHANNEL_TAP: i32 = 2;

/// Threads of a GEMM block of the square and wide tiles, and the k-step (`TC_*` in the .cu).
pub const TC_THREADS: u32 = 128;
pub const TC_BK: usize = 32;

/// `BACKEI_TC_TILES=big` lets GEMMs take the 256-thread tiles: 128×128 for large ones
/// ([`TileShape::Big`]), 64×128 for the others with M > 32 and N ≥ 128 ([`TileShape::Mid`]);
/// unset or `small`: 64×64 and 32×128 only. Opt-in until a GPU run shows them correct and faster
/// (the feedforward bench of `bench/gpu/session.sh` times both sets).
pub const TILES_ENV: &str = "BACKEI_TC_TILES";

/// Whether `BACKEI_TC_TILES` (its value, None: unset) allows the big tiles.
pub fn big_tiles_from_env(value: Option<&str>) -> Result<bool> {
    super::util::opt_in_from_env(TILES_ENV, value, "big", "128×128 tiles for large GEMMs", "small")
}

/// `BACKEI_TC_TILES` as the process has it: read once, by `StepSettings::new` (into its
/// `big_tiles`, which the network's [`FeedForwardWs`] carries to every plan).
pub fn big_tiles_in_env() -> Result<bool> {
    big_tiles_from_env(std::env::var(TILES_ENV).ok().as_deref())
}

/// A block's tile of C: 4 warps of 32×32 as 2×2 (64×64) or 1×4 (32×128, the `_m32` kernels), or
/// 8 warps as 2×4, of 64×32 (128×128, the `_big` kernels) or of 32×32 (64×128, `_mid`). The shape changes which block computes
/// an output, never its sum (the same products in the same k order), so a GEMM gives the same bits
/// under any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileShape {
    Square,
    /// For M ≤ 32 (fashion-mnist's conv2 data gradient: M = 32 input channels; mnist's convs),
    /// where a 64-row tile would issue half or more of its MMAs on padding.
    Wide,
    /// For large GEMMs (cifar10's convolutions: M ≥ 128 channels, N = B·T·pixels): a thread stages
    /// the same 32 elements per k-step as on a square tile for twice the MMAs, and a block reads
    /// half the bytes per product from L2 (16 KB per 1 MFLOP instead of per 0.5). One block per SM.
    Big,
    /// For the other GEMMs with M > 32 and N ≥ 128 (fashion-mnist's conv2 forward and weight
    /// gradient): a thread stages 24 elements per k-step where a square tile's stages 32 for the same
    /// MMAs. One block per SM (within 128 registers ptxas spilled).
    Mid,
}

impl TileShape {
    /// The shape for an M × n_cols output, without the big tiles (see [`gemm_plan`]).
    pub fn of(m: usize, n_cols: usize) -> TileShape {
        if m <= 32 && n_cols > 32 {
            TileShape::Wide
        } else {
            TileShape::Square
        }
    }
    /// (rows, columns) of C per block.
    pub fn dims(self) -> (usize, usize) {
        match self {
            TileShape::Square => (64, 64),
            TileShape::Wide => (32, 128),
            TileShape::Big => (128, 128),
            TileShape::Mid => (64, 128),
        }
    }
    /// Threads of a block.
    pub fn threads(self) -> u32 {
        match self {
            TileShape::Square | TileShape::Wide => TC_THREADS,
            TileShape::Big | TileShape::Mid => 2 * TC_THREADS,
        }
    }
    /// The blocks per SM the plan aims for: what the kernels' `__launch_bounds__` minimum promises
    /// (3 for the square tiles, 2 for the wide ones, 1 for the 256-thread ones), the square
    /// tiles' held at 2 so that a third leaves room for the last wave.
    pub fn blocks_per_sm(self) -> usize {
        match self {
            TileShape::Square | TileShape::Wide => 2,
            TileShape::Big | TileShape::Mid => 1,
        }
    }
    /// A warp's rows of C (its columns: 32).
    pub fn warp_rows(self) -> usize {
        if self == TileShape::Big {
            64
        } else {
            32
        }
    }
    /// The kernel of a precision with this tile.
    pub fn kernel(self, precision: Precision) -> &'static str {
        match (self, precision) {
            (TileShape::Square, Precision::Fp32) => "gemm_tc_fp32",
            (TileShape::Square, Precision::Tf32) => "gemm_tc_tf32",
            (TileShape::Square, Precision::Bf16) => "gemm_tc_bf16",
            (TileShape::Wide, Precision::Fp32) => "gemm_tc_fp32_m32",
            (TileShape::Wide, Precision::Tf32) => "gemm_tc_tf32_m32",
            (TileShape::Wide, Precision::Bf16) => "gemm_tc_bf16_m32",
            (TileShape::Big, Precision::Fp32) => "gemm_tc_fp32_big",
            (TileShape::Big, Precision::Tf32) => "gemm_tc_tf32_big",
            (TileShape::Big, Precision::Bf16) => "gemm_tc_bf16_big",
            (TileShape::Mid, Precision::Fp32) => "gemm_tc_fp32_mid",
            (TileShape::Mid, Precision::Tf32) => "gemm_tc_tf32_mid",
            (TileShape::Mid, Precision::Bf16) => "gemm_tc_bf16_mid",
        }
    }
}

/// How an index maps to a memory offset and a spatial place (`IndexMap` in the .cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexMap {
    pub stride: i64,
    pub kind: i32,
    pub count: i32,
    pub per: i32,
    pub width: i32,
    pub row_stride: i32,
    pub origin: i32,
    pub sign: i32,
    /// `per` and `width` as [`FastDiv`] magic numbers: the kernel's index tables divide by a
    /// multiply-high and a shift, not by an integer division (a ~20-instruction sequence on the
    /// critical path of every k-step: SASS of gemm_tc showed 4 in its loop).
    pub per_mul: u32,
    pub per_shr: u32,
    pub width_mul: u32,
    pub width_shr: u32,
    pub pad_: i32,
}

/// Division of a non-negative `i32` by a fixed divisor d ≥ 1 as q = umulhi(n, mul) >> shr
/// (CUTLASS's `FastDivmod`; Granlund & Montgomery 1994): mul = ⌈2^(31 + ℓ) / d⌉ with ℓ = ⌈log₂ d⌉,
/// shr = ℓ − 1, exact for every 0 ≤ n < 2^31; d = 1 is passed through (`fast_div` in gemm_tc.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastDiv {
    pub d: u32,
    pub mul: u32,
    pub shr: u32,
}

impl FastDiv {
    pub fn new(d: u32) -> Self {
        assert!(d >= 1, "division by zero");
        if d == 1 {
            return FastDiv { d, mul: 0, shr: 0 };
        }
        let l = 32 - (d - 1).leading_zeros(); // ⌈log₂ d⌉ ≥ 1
        let p = 31 + l;
        let mul = (1u64 << p).div_ceil(d as u64);
        FastDiv { d, mul: mul as u32, shr: p - 32 }
    }

    /// n / d for 0 ≤ n < 2^31, as the kernel computes it.
    pub fn div(&self, n: u32) -> u32 {
        if self.d == 1 {
            n
        } else {
            (((n as u64 * self.mul as u64) >> 32) as u32) >> self.shr
        }
    }
}

/// One GEMM operand (`Operand` in the .cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Operand {
    pub p: u64,
    pub mn: IndexMap,
    pub k: IndexMap,
    pub sp_h: i32,
    pub sp_w: i32,
    pub ones: i32,
    pub exact: i32,
    pub k_fast: i32,
    pub scale_slot: i32,
    /// `p` holds int8 codes c of pooled spikes, the element being c · `q8_factor` ([`XForm::Q8`]).
    pub q8: i32,
    pub q8_factor: f32,
}

/// Where C goes (`Output` in the .cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub p: u64,
    pub m: IndexMap,
    pub n: IndexMap,
    pub bias: u64,
    pub ones_out: u64,
    pub bias_on: i32,
    pub accumulate: i32,
}

/// A whole GEMM (`GemmDesc` in the .cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GemmDesc {
    pub a: Operand,
    pub b: Operand,
    pub out: Output,
    pub partial: u64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub splits: i32,
    pub kt_per_split: i32,
    pub pad_: i32,
}

// SAFETY: plain-old-data with the C layout of cuda/gemm_tc.cu's structs (checked by the
// emulator test `gemm_tc_structs_have_the_layout_of_the_kernels`).
unsafe impl DeviceRepr for IndexMap {}
unsafe impl DeviceRepr for Operand {}
unsafe impl DeviceRepr for Output {}
unsafe impl DeviceRepr for GemmDesc {}

/// An index's place: its offset (None: outside the valid range), (y, x), or the ones column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Invalid,
    Ones,
    At { off: i64, y: i32, x: i32 },
}

impl IndexMap {
    /// i → i·stride.
    pub fn linear(count: usize, stride: usize) -> Self {
        IndexMap { stride: stride as i64, kind: IDX_LINEAR, count: count as i32, ..Default::default() }
    }

    /// i = (sample, pixel) on a map `width` wide with `per` pixels → sample·stride + y·row_stride + x.
    pub fn sample_pixel(count: usize, per: usize, width: usize, stride: usize, row_stride: usize) -> Self {
        IndexMap {
            stride: stride as i64,
            kind: IDX_SAMPLE_PIXEL,
            count: count as i32,
            per: per as i32,
            width: width as i32,
            row_stride: row_stride as i32,
            ..Default::default()
        }
        .with_divisors()
    }

    /// The magic numbers of `per` and `width` (both ≥ 1 where the kind uses them).
    fn with_divisors(self) -> Self {
        let (p, w) = (FastDiv::new(self.per.max(1) as u32), FastDiv::new(self.width.max(1) as u32));
        IndexMap { per_mul: p.mul, per_shr: p.shr, width_mul: w.mul, width_shr: w.shr, ..self }
    }

    fn per_div(&self) -> FastDiv {
        FastDiv { d: self.per as u32, mul: self.per_mul, shr: self.per_shr }
    }

    fn width_div(&self) -> FastDiv {
        FastDiv { d: self.width as u32, mul: self.width_mul, shr: self.width_shr }
    }

    /// (i / per, i % per) and (r / width, r % width) as the kernel computes them.
    fn split(&self, i: i64) -> (i64, i64, i64) {
        let q = self.per_div().div(i as u32) as i64;
        let r = i - q * self.per as i64;
        let y = self.width_div().div(r as u32) as i64;
        (q, y, r - y * self.width as i64)
    }

    /// i = (channel, tap) of a k×k kernel → channel·stride + y·row_stride + x, (y, x) =
    /// sign·((ky, kx) − origin).
    pub fn channel_tap(count: usize, k: usize, stride: usize, row_stride: usize, origin: usize, sign: i32) -> Self {
        IndexMap {
            stride: stride as i64,
            kind: IDX_CHANNEL_TAP,
            count: count as i32,
            per: (k * k) as i32,
            width: k as i32,
            row_stride: row_stride as i32,
            origin: origin as i32,
            sign,
            ..Default::default()
        }
        .with_divisors()
    }

    /// The place of index `i` (`index_entry` in the .cu).
    pub fn entry(&self, i: usize, ones: bool) -> Entry {
        let i = i as i64;
        if i >= self.count as i64 {
            return if ones && i == self.count as i64 { Entry::Ones } else { Entry::Invalid };
        }
        match self.kind {
            IDX_LINEAR => Entry::At { off: i * self.stride, y: 0, x: 0 },
            IDX_SAMPLE_PIXEL => {
                let (s, y, x) = self.split(i);
                Entry::At { off: s * self.stride + y * self.row_stride as i64 + x, y: y as i32, x: x as i32 }
            }
            _ => {
                let (c, ky, kx) = self.split(i);
                let sign = self.sign as i64;
                let (y, x) = (sign * (ky - self.origin as i64), sign * (kx - self.origin as i64));
                Entry::At { off: c * self.stride + y * self.row_stride as i64 + x, y: y as i32, x: x as i32 }
            }
        }
    }
}

impl Operand {
    /// The offset of element (mn, k) from `p`, or None for a zero (padding, beyond the ends), or
    /// Some(None) for the ones column: the host twin of `operand_at`.
    pub fn element(&self, mn: usize, k: usize) -> Option<Option<i64>> {
        let (em, ek) = (self.mn.entry(mn, self.ones != 0), self.k.entry(k, false));
        match (em, ek) {
            (_, Entry::Invalid | Entry::Ones) | (Entry::Invalid, _) => None,
            (Entry::Ones, _) => Some(None),
            (Entry::At { off: om, y: ym, x: xm }, Entry::At { off: ok, y: yk, x: xk }) => {
                if self.sp_h != 0 {
                    let (y, x) = (ym + yk, xm + xk);
                    if y < 0 || y >= self.sp_h || x < 0 || x >= self.sp_w {
                        return None;
                    }
                }
                Some(Some(om + ok))
            }
        }
    }
}

impl Output {
    /// The offset of C[m][n] from `p`.
    pub fn offset(&self, m: usize, n: usize) -> i64 {
        match (self.m.entry(m, false), self.n.entry(n, false)) {
            (Entry::At { off: a, .. }, Entry::At { off: b, .. }) => a + b,
            _ => -1,
        }
    }
}

fn k_contiguous(im: &IndexMap) -> bool {
    (im.kind == IDX_LINEAR && im.stride == 1) || (im.kind == IDX_SAMPLE_PIXEL && im.row_stride == im.width)
}

/// How a layer's input x is stored, and whether its values are exact in fp16 unscaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum XForm {
    /// f32, any values (fp32 mode scales it and splits it into hi + lo).
    Real,
    /// f32 spikes or their averages ([`input_exact_in_fp16`]): one fp16 half, no scale.
    Exact,
    /// int8 codes c of pooled spikes, the value being c · factor exactly (`memory::pooled_as_codes`;
    /// exact in fp16 too): a quarter of the bytes, the bits of the f32 tensor.
    Q8(f32),
}

impl From<bool> for XForm {
    /// `exact`: [`XForm::Exact`], else [`XForm::Real`].
    fn from(exact: bool) -> Self {
        if exact {
            XForm::Exact
        } else {
            XForm::Real
        }
    }
}

impl XForm {
    pub fn exact(self) -> bool {
        self != XForm::Real
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        if matches!(self, XForm::Q8(_)) {
            1
        } else {
            4
        }
    }

    /// f32 words holding `len` elements.
    pub fn words(self, len: usize) -> usize {
        (len * self.bytes()).div_ceil(4)
    }
}

fn x_operand(p: u64, mn: IndexMap, k: IndexMap, spatial: Option<(usize, usize)>, form: XForm, slot: i32) -> Operand {
    let mut o = operand(p, mn, k, spatial, form.exact(), slot);
    if let XForm::Q8(factor) = form {
        o.q8 = 1;
        o.q8_factor = factor;
    }
    o
}

fn operand(p: u64, mn: IndexMap, k: IndexMap, spatial: Option<(usize, usize)>, exact: bool, slot: i32) -> Operand {
    let (sp_h, sp_w) = spatial.map_or((0, 0), |(h, w)| (h as i32, w as i32));
    Operand {
        q8: 0,
        q8_factor: 0.0,
        p,
        mn,
        k,
        sp_h,
        sp_w,
        ones: 0,
        exact: exact as i32,
        k_fast: k_contiguous(&k) as i32,
        scale_slot: if exact { -1 } else { slot },
    }
}

/// Conv forward over `samples` samples: C[co][(s,p)] = Σ_(ci,tap) W[co][ci][tap]·X[s][ci][p+tap−pad],
/// + b[co], written to y [samples][cout][ho][wo].
pub fn conv_forward(g: &ConvGeom, samples: usize, w: u64, b: u64, x: u64, y: u64, x_form: impl Into<XForm>) -> GemmDesc {
    let (kk, p, hw) = (g.col_rows(), g.out_pixels(), g.h * g.w);
    let a = operand(w, IndexMap::linear(g.cout, kk), IndexMap::linear(kk, 1), None, false, 0);
    let bo = x_operand(
        x,
        IndexMap::sample_pixel(samples * p, p, g.wo, g.in_len(), g.w),
        IndexMap::channel_tap(kk, g.k, hw, g.w, g.pad, 1),
        Some((g.h, g.w)),
        x_form.into(),
        1,
    );
    let out = Output {
        p: y,
        m: IndexMap::linear(g.cout, p),
        n: IndexMap::sample_pixel(samples * p, p, g.wo, g.out_len(), g.wo),
        bias: b,
        bias_on: 1,
        ..Default::default()
    };
    desc(a, bo, out, g.cout, samples * p, kk)
}

/// Conv data gradient: C[ci][(s,q)] = Σ_(co,tap) W[co][ci][tap]·dY[s][co][q+pad−tap], written to
/// dx [samples][cin][h][w].
pub fn conv_backward_data(g: &ConvGeom, samples: usize, w: u64, dy: u64, dx: u64) -> GemmDesc {
    let (kk, p, hw) = (g.k * g.k, g.out_pixels(), g.h * g.w);
    let kdim = g.cout * kk;
    let a = operand(w, IndexMap::linear(g.cin, kk), IndexMap::channel_tap(kdim, g.k, g.cin * kk, g.k, 0, 1), None, false, 0);
    let bo = operand(
        dy,
        IndexMap::sample_pixel(samples * hw, hw, g.w, g.out_len(), g.wo),
        IndexMap::channel_tap(kdim, g.k, p, g.wo, g.pad, -1),
        Some((g.ho, g.wo)),
        false,
        1,
    );
    let out = Output {
        p: dx,
        m: IndexMap::linear(g.cin, hw),
        n: IndexMap::sample_pixel(samples * hw, hw, g.w, g.in_len(), g.w),
        ..Default::default()
    };
    desc(a, bo, out, g.cin, samples * hw, kdim)
}

/// Conv weight gradient: dW[co][(ci,tap)] += Σ_(s,p) dY[s][co][p]·X[s][ci][p+tap−pad], and (the
/// ones column) db[co] += Σ_(s,p) dY[s][co][p].
pub fn conv_weight_grad(g: &ConvGeom, samples: usize, dy: u64, x: u64, dw: u64, db: u64, x_form: impl Into<XForm>) -> GemmDesc {
    let (kk, p, hw) = (g.col_rows(), g.out_pixels(), g.h * g.w);
    let kdim = samples * p;
    let a = operand(dy, IndexMap::linear(g.cout, p), IndexMap::sample_pixel(kdim, p, g.wo, g.out_len(), g.wo), None, false, 0);
    let mut bo = x_operand(
        x,
        IndexMap::channel_tap(kk, g.k, hw, g.w, g.pad, 1),
        IndexMap::sample_pixel(kdim, p, g.wo, g.in_len(), g.w),
        Some((g.h, g.w)),
        x_form.into(),
        1,
    );
    bo.ones = 1;
    let out =
        Output { p: dw, m: IndexMap::linear(g.cout, kk), n: IndexMap::linear(kk, 1), ones_out: db, accumulate: 1, ..Default::default() };
    desc(a, bo, out, g.cout, kk, kdim)
}

/// Linear forward over `rows` rows: y[r][o] = Σ_i x[r][i]·W[o][i] + b[o].
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(n_in: usize, n_out: usize, rows: usize, x: u64, w: u64, b: u64, y: u64, x_form: impl Into<XForm>) -> GemmDesc {
    let a = x_operand(x, IndexMap::linear(rows, n_in), IndexMap::linear(n_in, 1), None, x_form.into(), 0);
    let bo = operand(w, IndexMap::linear(n_out, n_in), IndexMap::linear(n_in, 1), None, false, 1);
    let out = Output { p: y, m: IndexMap::linear(rows, n_out), n: IndexMap::linear(n_out, 1), bias: b, bias_on: 2, ..Default::default() };
    desc(a, bo, out, rows, n_out, n_in)
}

/// Linear data gradient: dx[r][i] = Σ_o dy[r][o]·W[o][i].
pub fn linear_backward_data(n_in: usize, n_out: usize, rows: usize, dy: u64, w: u64, dx: u64) -> GemmDesc {
    let a = operand(dy, IndexMap::linear(rows, n_out), IndexMap::linear(n_out, 1), None, false, 0);
    let bo = operand(w, IndexMap::linear(n_in, 1), IndexMap::linear(n_out, n_in), None, false, 1);
    let out = Output { p: dx, m: IndexMap::linear(rows, n_in), n: IndexMap::linear(n_in, 1), ..Default::default() };
    desc(a, bo, out, rows, n_in, n_out)
}

/// Linear weight gradient: dW[o][i] += Σ_r dy[r][o]·x[r][i], and db[o] += Σ_r dy[r][o].
#[allow(clippy::too_many_arguments)]
pub fn linear_weight_grad(n_in: usize, n_out: usize, rows: usize, dy: u64, x: u64, dw: u64, db: u64, x_form: impl Into<XForm>) -> GemmDesc {
    let a = operand(dy, IndexMap::linear(n_out, 1), IndexMap::linear(rows, n_out), None, false, 0);
    let mut bo = x_operand(x, IndexMap::linear(n_in, 1), IndexMap::linear(rows, n_in), None, x_form.into(), 1);
    bo.ones = 1;
    let out =
        Output { p: dw, m: IndexMap::linear(n_out, n_in), n: IndexMap::linear(n_in, 1), ones_out: db, accumulate: 1, ..Default::default() };
    desc(a, bo, out, n_out, n_in, rows)
}

/// Whether gemm_tc.cu reads the operand without index tables (`affine` there): both maps LINEAR
/// and no spatial check — every linear layer's operands, a convolution's weights in its forward.
pub fn is_affine(o: &Operand) -> bool {
    o.mn.kind == IDX_LINEAR && o.k.kind == IDX_LINEAR && o.sp_h == 0
}

/// The same GEMM with every affine operand read through the kernel's index tables: each LINEAR map
/// rewritten as the SAMPLE_PIXEL map that addresses the same elements (one pixel per sample). For
/// the checks that the affine path gives the table path's bits (`tests/emu_feedforward.rs`) and
/// costs fewer instructions (`tests/kernels_compile.rs`).
pub fn through_tables(mut d: GemmDesc) -> GemmDesc {
    let tabled = |m: IndexMap| if m.kind == IDX_LINEAR { IndexMap::sample_pixel(m.count as usize, 1, 1, m.stride as usize, 1) } else { m };
    for o in [&mut d.a, &mut d.b] {
        o.mn = tabled(o.mn);
        o.k = tabled(o.k);
    }
    d
}

/// The `-D` constants that compile gemm_tc.cu with `d`'s operand modes fixed (`TC_PIN`), so that
/// the k-tile loop's SASS is the path this op runs (the generic kernel's loop holds every path
/// side by side). Analysis only (`backei kernels --sass`, `tests/kernels_compile.rs`): the engine
/// never loads such an instance.
pub fn pin_defines(d: &GemmDesc) -> Vec<(String, String)> {
    let pin = |o: &Operand| format!("{},{},{},{},{},{},{}", o.k_fast, o.q8, o.exact, o.ones, (o.sp_h != 0) as i32, o.mn.kind, o.k.kind);
    vec![("TC_PIN".into(), "1".into()), ("TC_PIN_A".into(), pin(&d.a)), ("TC_PIN_B".into(), pin(&d.b))]
}

/// The feed-forward GEMMs of a fashion-mnist training step at B = 100, T = 20 on the v4 path:
/// conv2 (32 → 64, k 5, pad 2, 14×14) and fc1 (3136 → 1024), each forward, data gradient and
/// weight gradient, their inputs pooled spikes as int8 codes — ~159 of the step's ~500 GFLOP.
/// For the static report of the path each op runs (`pin_defines`); the addresses are placeholders,
/// nothing is launched.
pub fn fashion_step_gemms() -> Vec<(&'static str, GemmDesc)> {
    let (s, rows) = (2000, 2000);
    let g = ConvGeom::new(32, 64, 14, 14, 5, 2);
    let q8 = XForm::Q8(0.25);
    let at = |i: u64| 0x1000_0000 * i;
    vec![
        ("conv2 forward", conv_forward(&g, s, at(1), at(2), at(3), at(4), q8)),
        ("conv2 data gradient", conv_backward_data(&g, s, at(1), at(2), at(3))),
        ("conv2 weight gradient", conv_weight_grad(&g, s, at(1), at(2), at(3), at(4), q8)),
        ("fc1 forward", linear_forward(3136, 1024, rows, at(1), at(2), at(3), at(4), q8)),
        ("fc1 data gradient", linear_backward_data(3136, 1024, rows, at(1), at(2), at(3))),
        ("fc1 weight gradient", linear_weight_grad(3136, 1024, rows, at(1), at(2), at(3), at(4), q8)),
    ]
}

/// The feed-forward GEMMs of a cifar10 training step (B = 100, T = 20: 2,000 sample-steps) that
/// the big tiles are for: conv2 (128 → 256 on 16×16), conv3 (256 → 512 on 8×8), fc1 (8192 → 1024);
/// their inputs are pooled spikes read as int8 codes (dropout 0.5: factor 2/4). For
/// `backei kernels --sass` and the plan tests.
pub fn cifar10_step_gemms() -> Vec<(&'static str, GemmDesc)> {
    let (s, rows) = (2000, 2000);
    let (g2, g3) = (ConvGeom::new(128, 256, 16, 16, 3, 1), ConvGeom::new(256, 512, 8, 8, 3, 1));
    let q8 = XForm::Q8(0.5);
    let at = |i: u64| 0x1000_0000 * i;
    vec![
        ("conv2 forward", conv_forward(&g2, s, at(1), at(2), at(3), at(4), q8)),
        ("conv2 data gradient", conv_backward_data(&g2, s, at(1), at(2), at(3))),
        ("conv2 weight gradient", conv_weight_grad(&g2, s, at(1), at(2), at(3), at(4), q8)),
        ("conv3 forward", conv_forward(&g3, s, at(1), at(2), at(3), at(4), q8)),
        ("conv3 data gradient", conv_backward_data(&g3, s, at(1), at(2), at(3))),
        ("conv3 weight gradient", conv_weight_grad(&g3, s, at(1), at(2), at(3), at(4), q8)),
        ("fc1 forward", linear_forward(8192, 1024, rows, at(1), at(2), at(3), at(4), q8)),
        ("fc1 data gradient", linear_backward_data(8192, 1024, rows, at(1), at(2), at(3))),
        ("fc1 weight gradient", linear_weight_grad(8192, 1024, rows, at(1), at(2), at(3), at(4), q8)),
    ]
}

fn desc(a: Operand, b: Operand, out: Output, m: usize, n: usize, k: usize) -> GemmDesc {
    GemmDesc {
        a,
        b,
        out,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        splits: 1,
        kt_per_split: k.div_ceil(TC_BK).max(1) as i32,
        ..Default::default()
    }
}

/// The grid and split-K of a GEMM on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmPlan {
    pub tile: TileShape,
    pub grid: (u32, u32, u32),
    pub splits: usize,
    pub kt_per_split: usize,
    /// f32 values of the split partial sums (0 without split-K).
    pub partial: usize,
}

/// Output tiles and k-steps of a GEMM; split-K (fixed-order partial sums) when the tiles alone
/// would leave most SMs idle: aim for two blocks per SM. On the default tiles (64×64, 32×128);
/// [`gemm_plan_tiles`] with the 256-thread ones allowed.
pub fn gemm_plan(m: usize, n_cols: usize, k: usize, limits: &DeviceLimits) -> GemmPlan {
    gemm_plan_tiles(m, n_cols, k, limits, false)
}

/// Whether an M × n_cols × K GEMM takes the big tiles (when allowed): both sides at least one big
/// tile (a smaller side would be half padding), and enough work for one block per SM — from the
/// output tiles, or from split-K with at least 8 k-steps per split.
pub fn wants_big_tiles(m: usize, n_cols: usize, k: usize, limits: &DeviceLimits) -> bool {
    let tiles = m.div_ceil(128) * n_cols.div_ceil(128);
    m >= 128 && n_cols >= 128 && tiles * (k.div_ceil(TC_BK) / 8).max(1) >= limits.sm_count as usize
}

/// [`gemm_plan`] with the 256-thread tiles allowed or not: then the big ones where
/// [`wants_big_tiles`], else the mid ones for M > 32 and N ≥ 128 (split-K fills the device as for
/// any tile), else the square or wide ones.
pub fn gemm_plan_tiles(m: usize, n_cols: usize, k: usize, limits: &DeviceLimits, big: bool) -> GemmPlan {
    let tile = if big && wants_big_tiles(m, n_cols, k, limits) {
        TileShape::Big
    } else if big && m > 32 && n_cols >= 128 {
        TileShape::Mid
    } else {
        TileShape::of(m, n_cols)
    };
    let (bm, bn) = tile.dims();
    let (tm, tn) = (m.div_ceil(bm), n_cols.div_ceil(bn));
    let ktiles = k.div_ceil(TC_BK).max(1);
    let want = tile.blocks_per_sm() * limits.sm_count as usize;
    let mut splits = if tm * tn >= want { 1 } else { want.div_ceil(tm * tn).min(ktiles) };
    let kt_per_split = ktiles.div_ceil(splits.max(1));
    splits = ktiles.div_ceil(kt_per_split);
    GemmPlan {
        tile,
        grid: (tn as u32, tm as u32, splits as u32),
        splits,
        kt_per_split,
        partial: if splits > 1 { splits * m * n_cols } else { 0 },
    }
}

/// The plan of a GEMM over some of the columns of a `whole` one (the same M and K): the grid
/// covers the part's columns, the split-K is the whole's (the same splits of the same k-steps),
/// so that every element of the part is the very sum — the same products in the same order — that
/// the whole GEMM computes for it.
pub fn gemm_plan_like(m: usize, n_cols: usize, whole: &GemmPlan) -> GemmPlan {
    let (bm, bn) = whole.tile.dims();
    GemmPlan {
        grid: (n_cols.div_ceil(bn) as u32, m.div_ceil(bm) as u32, whole.splits as u32),
        partial: if whole.splits > 1 { whole.splits * m * n_cols } else { 0 },
        ..*whole
    }
}

/// The conv forward of samples [first, first + count) of an input of `samples` samples at `x`
/// (the whole input), written to `y` ([count][cout][ho][wo]), with the plan that makes every
/// output the bits `conv_forward` over all the samples gives it ([`gemm_plan_like`]; in fp32
/// mode pass the whole input as the source of its scale, as the whole GEMM does). This is how a
/// convolution before a BackEI layer is recomputed per `--recompute` window
/// (`memory::conv_output_window`).
#[allow(clippy::too_many_arguments)]
pub fn conv_forward_part(
    g: &ConvGeom,
    samples: usize,
    first: usize,
    count: usize,
    (w, b, x, y): (u64, u64, u64, u64),
    x_form: impl Into<XForm>,
    limits: &DeviceLimits,
    big_tiles: bool,
) -> (GemmDesc, GemmPlan) {
    let x_form = x_form.into();
    let whole = conv_forward(g, samples, w, b, x, y, x_form);
    let whole_plan = gemm_plan_tiles(whole.m as usize, whole.cols(), whole.k as usize, limits, big_tiles);
    let d = conv_forward(g, count, w, b, x + (x_form.bytes() * first * g.in_len()) as u64, y, x_form);
    let plan = gemm_plan_like(d.m as usize, d.cols(), &whole_plan);
    (d, plan)
}

/// Whether the input of layer `i` of `spec` is exact in fp16 without scaling: the spikes of a
/// spiking layer (−1, 0, 1; exact firing only), or their averages by pooling and dropout scalings
/// that are powers of two (2×2 pooling halves the spacing twice: a few pools stay within fp16's
/// 11 bits), through flattening.
pub fn input_exact_in_fp16(spec: &crate::spec::NetworkSpec, plan: &[crate::spec::LayerPlan], i: usize) -> bool {
    use crate::spec::{FiringMode, LayerSpec};
    let mut pools = 0;
    for lp in plan[..i].iter().rev() {
        match lp.spec {
            LayerSpec::Flatten => {}
            LayerSpec::AvgPool => pools += 1,
            LayerSpec::Dropout { p } => {
                if !super::dropout::scale_is_power_of_two(p as f32) {
                    return false;
                }
            }
            LayerSpec::BackEi | LayerSpec::Spiking => return spec.neuron.mode == FiringMode::Exact && pools <= 4,
            LayerSpec::Conv { .. } | LayerSpec::Linear { .. } => return false,
        }
    }
    false
}

/// The f32 values of split-K partial sums a GEMM needs on a device (0 without split-K), with the
/// 256-thread tiles allowed or not.
pub fn partial_of(d: &GemmDesc, limits: &DeviceLimits, big_tiles: bool) -> usize {
    gemm_plan_tiles(d.m as usize, d.cols(), d.k as usize, limits, big_tiles).partial
}

/// The bound of every map's width and height (`GemmDesc::validate`).
const MAP_LIMIT: i32 = 1 << 27;

impl GemmDesc {
    /// Columns of C (N, and the ones column when there is one).
    pub fn cols(&self) -> usize {
        self.n as usize + self.b.ones as usize
    }

    /// Every dimension in the kernels' 32-bit range (the element offsets are 64-bit), and every
    /// map's width and height below 2^27: the kernel's index entries mark an invalid index and
    /// the ones column by a y or x of ±2^29, and its bounds test tells them from every sum of two
    /// valid entries' coordinates, which then stays within ±2^28.
    pub fn validate(&self) -> Result<()> {
        if self.m <= 0 || self.n <= 0 || self.k <= 0 {
            return Err(shape_err("tensor-core GEMM", "positive M, N, K within 2^31", format!("M {} N {} K {}", self.m, self.n, self.k)));
        }
        for im in [&self.a.mn, &self.a.k, &self.b.mn, &self.b.k, &self.out.m, &self.out.n] {
            let height = if im.kind == IDX_SAMPLE_PIXEL { im.per / im.width.max(1) } else { im.width };
            if im.kind != IDX_LINEAR && (im.width >= MAP_LIMIT || height >= MAP_LIMIT) {
                return Err(shape_err(
                    "tensor-core GEMM",
                    "maps below 2^27 pixels wide and high (in fp32 mode BACKEI_FEEDFORWARD=cublas takes any size)",
                    format!("a map {} wide and {height} high", im.width),
                ));
            }
        }
        Ok(())
    }
}

/// The device memory of the tensor-core GEMMs: the operands' largest |x| (two words) and the
/// split-K partial sums (grown to the largest GEMM's).
pub struct TcWorkspace {
    pub maxbits: CudaSlice<u32>,
    partial: Option<CudaSlice<f32>>,
}

/// Device bytes of a workspace whose partial sums hold `partial` values.
pub fn workspace_bytes(partial: usize) -> usize {
    8 + 4 * partial
}

impl TcWorkspace {
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        Ok(TcWorkspace { maxbits: dev.stream.alloc_zeros(2).map_err(cuda_err("allocating the GEMM scales"))?, partial: None })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        workspace_bytes(self.partial.as_ref().map_or(0, |p| p.len()))
    }
}

/// The feed-forward layers' GEMM state: which path, what its plans need (the device limits,
/// whether the 256-thread tiles are allowed), and each path's workspace (cuBLAS: the im2col
/// column buffer; tensor cores: scales and split-K sums).
pub struct FeedForwardWs {
    pub mode: FeedForward,
    pub limits: DeviceLimits,
    /// The 256-thread tiles allowed ([`gemm_plan_tiles`]); off by default (`with_big_tiles`).
    pub big_tiles: bool,
    /// Convolutions' forward and data gradient on the window-staged kernels where they apply
    /// (`conv_halo`); off by default (`with_halo_convs`).
    pub halo_convs: bool,
    pub conv: super::conv::ConvWorkspace,
    pub tc: TcWorkspace,
    pub halo: super::conv_halo::HaloWorkspace,
}

impl FeedForwardWs {
    /// On the default tiles.
    pub fn new(dev: &GpuDevice, mode: FeedForward, limits: DeviceLimits) -> Result<Self> {
        Ok(FeedForwardWs {
            mode,
            limits,
            big_tiles: false,
            halo_convs: false,
            conv: super::conv::ConvWorkspace::new(super::conv::DEFAULT_WORKSPACE_BYTES),
            tc: TcWorkspace::new(dev)?,
            halo: Default::default(),
        })
    }

    /// With the window-staged convolutions or not (`StepSettings::halo_convs`).
    pub fn with_halo_convs(self, halo_convs: bool) -> Self {
        FeedForwardWs { halo_convs, ..self }
    }

    /// With the 256-thread tiles allowed or not (`StepSettings::big_tiles`).
    pub fn with_big_tiles(self, big_tiles: bool) -> Self {
        FeedForwardWs { big_tiles, ..self }
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.conv.bytes() + self.tc.bytes() + self.halo.bytes()
    }
}

/// A view's device address (the GEMM descriptors hold addresses).
pub fn addr<T>(dev: &GpuDevice, v: &impl cudarc::driver::DevicePtr<T>) -> u64 {
    v.device_ptr(&dev.stream).0
}

/// One launch of a GEMM's sequence (see [`launches`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TcLaunch {
    /// Zero the two scale words at `maxbits` (fp32 mode).
    ClearScales,
    /// `absmax_f32` of `len` values at `ptr` into the word at `out`.
    Absmax { ptr: u64, len: usize, out: u64, grid: u32 },
    /// `gemm_tc_<precision>` over `grid`.
    Gemm { kernel: &'static str, grid: (u32, u32, u32), threads: u32, desc: GemmDesc },
    /// `gemm_tc_reduce_f32`: the splits' fixed-order sum.
    Reduce { grid: u32, desc: GemmDesc },
}

/// Blocks of the grid-stride helper kernels (256 threads each).
/// Blocks of 256 threads for a grid-stride helper kernel over `n` elements (also `conv_halo`'s).
pub(super) fn helper_blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 1 << 20) as u32
}

/// The launches of one GEMM under `plan`: (fp32 mode) the operands' scales, the product, (split-K)
/// the fixed-order sum of the splits. `sources` are the operands' whole buffers (address, length)
/// for their largest |x|, A's first; `maxbits` the two scale words, `partial` the split-K buffer
/// (at least `plan.partial` values). The GPU runs this list (`run`) and so do the emulator tests.
pub fn launches(
    mut d: GemmDesc,
    plan: &GemmPlan,
    precision: Precision,
    sources: [(u64, usize); 2],
    maxbits: u64,
    partial: u64,
) -> Vec<TcLaunch> {
    d.splits = plan.splits as i32;
    d.kt_per_split = plan.kt_per_split as i32;
    d.partial = if plan.splits > 1 { partial } else { 0 };
    let mut out = Vec::new();
    if precision == Precision::Fp32 {
        out.push(TcLaunch::ClearScales);
        for (slot, (op, (ptr, len))) in [d.a, d.b].iter().zip(sources).enumerate() {
            if op.exact == 0 && len > 0 {
                out.push(TcLaunch::Absmax { ptr, len, out: maxbits + 4 * slot as u64, grid: helper_blocks(len.min(1 << 28)) });
            }
        }
    }
    out.push(TcLaunch::Gemm { kernel: plan.tile.kernel(precision), grid: plan.grid, threads: plan.tile.threads(), desc: d });
    if plan.splits > 1 {
        out.push(TcLaunch::Reduce { grid: helper_blocks(d.m as usize * d.cols()), desc: d });
    }
    out
}

/// The launch shape of a helper kernel of `blocks` blocks ([`helper_blocks`]).
pub(super) fn helper_config(blocks: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// `absmax_f32`: the largest |x| of `len` f32 values at `ptr` (its bits) into the word at `out`
/// (fp32 mode's scales; also `conv_halo`'s).
pub(super) fn launch_absmax(dev: &GpuDevice, ptr: u64, len: usize, out: u64, grid: u32) -> Result<()> {
    let f = dev.kernels.function("gemm_tc", "absmax_f32")?;
    let n = len as i64;
    // SAFETY: `ptr` holds `len` values and `out` a word of the caller's workspace.
    unsafe { dev.stream.launch_builder(&f).arg(&ptr).arg(&n).arg(&out).launch(helper_config(grid)) }.map_err(cuda_err("absmax_f32"))?;
    Ok(())
}

/// Runs one GEMM on the device (see [`launches`]).
pub fn run(dev: &GpuDevice, ff: &mut FeedForwardWs, d: GemmDesc, precision: Precision, sources: [(u64, usize); 2]) -> Result<()> {
    d.validate()?;
    let plan = gemm_plan_tiles(d.m as usize, d.cols(), d.k as usize, &ff.limits, ff.big_tiles);
    run_planned(dev, &mut ff.tc, d, &plan, precision, sources)
}

/// [`run`] under a given plan (`conv_forward_part`'s).
pub fn run_planned(
    dev: &GpuDevice,
    ws: &mut TcWorkspace,
    d: GemmDesc,
    plan: &GemmPlan,
    precision: Precision,
    sources: [(u64, usize); 2],
) -> Result<()> {
    use cudarc::driver::DevicePtrMut;
    d.validate()?;
    if plan.partial > 0 && ws.partial.as_ref().is_none_or(|p| p.len() < plan.partial) {
        ws.partial = None;
        ws.partial = Some(dev.stream.alloc_zeros(plan.partial).map_err(cuda_err("allocating the split-K partial sums"))?);
    }
    let partial = match ws.partial.as_mut() {
        Some(p) => p.device_ptr_mut(&dev.stream).0,
        None => 0,
    };
    let maxbits = ws.maxbits.device_ptr_mut(&dev.stream).0;
    for l in launches(d, plan, precision, sources, maxbits, partial) {
        // SAFETY (every launch): the descriptor's addresses and extents come from the callers'
        // checked buffers; the scale words and the partial sums are the workspace's, sized above.
        match l {
            TcLaunch::ClearScales => dev.stream.memset_zeros(&mut ws.maxbits).map_err(cuda_err("clearing the GEMM scales"))?,
            TcLaunch::Absmax { ptr, len, out, grid } => launch_absmax(dev, ptr, len, out, grid)?,
            TcLaunch::Gemm { kernel, grid, threads, desc } => {
                let f = dev.kernels.function("gemm_tc", kernel)?;
                let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
                unsafe { dev.stream.launch_builder(&f).arg(&desc).arg(&maxbits).launch(cfg) }.map_err(cuda_err(kernel))?;
            }
            TcLaunch::Reduce { grid, desc } => {
                let f = dev.kernels.function("gemm_tc", "gemm_tc_reduce_f32")?;
                unsafe { dev.stream.launch_builder(&f).arg(&desc).launch(helper_config(grid)) }.map_err(cuda_err("gemm_tc_reduce_f32"))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{conv as cconv, linear as clin};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The kernel marks an invalid index and the ones column by a y or x of ±2^29 in its index
    /// entries: a map as wide or high as 2^27 is refused with the fix; fashion-mnist's step and a
    /// map just below the bound are accepted.
    #[test]
    fn maps_too_large_for_the_index_entries_sentinels_are_refused() {
        for (op, d) in fashion_step_gemms() {
            d.validate().unwrap_or_else(|e| panic!("{op}: {e}"));
        }
        let wide = ConvGeom::new(1, 1, 1, 1 << 27, 1, 0);
        let e = conv_forward(&wide, 1, 1, 2, 3, 4, false).validate().expect_err("a map 2^27 wide");
        assert!(e.to_string().contains("2^27") && e.to_string().contains("cublas"), "{e}");
        let high = ConvGeom::new(1, 1, 1 << 27, 1, 1, 0);
        assert!(conv_forward(&high, 1, 1, 2, 3, 4, false).validate().is_err(), "a map 2^27 high");
        let fits = ConvGeom::new(1, 1, 3, (1 << 27) - 1, 1, 0);
        conv_forward(&fits, 1, 1, 2, 3, 4, false).validate().expect("just below the bound");
    }

    /// The index tables' multiply-high division equals integer division for every divisor the
    /// maps use (kernel areas, widths, pixels per sample: 1 up to millions) and every index
    /// below 2^31: the boundaries around each multiple, the extremes and random indices.
    #[test]
    fn fast_division_is_exact_for_every_index_below_2_to_the_31() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut divisors: Vec<u32> = (1..=4096).collect();
        divisors.extend([6_272, 65_536, 65_537, 1 << 20, (1 << 24) + 3, (1 << 30) - 1, 1 << 30, (1 << 30) + 1, i32::MAX as u32]);
        divisors.extend((0..2000).map(|_| rng.random_range(1..=i32::MAX as u32)));
        for &d in &divisors {
            let f = FastDiv::new(d);
            let mut ns = vec![0u32, 1, d - 1, d, d.saturating_add(1), i32::MAX as u32, i32::MAX as u32 - 1];
            for q in [1u32, 2, 3, 7, 1000, (i32::MAX as u32) / d] {
                if let Some(m) = d.checked_mul(q).filter(|&m| m <= i32::MAX as u32) {
                    ns.extend([m - 1, m, m.saturating_add(1).min(i32::MAX as u32)]);
                }
            }
            ns.extend((0..64).map(|_| rng.random_range(0..=i32::MAX as u32)));
            for n in ns {
                assert_eq!(f.div(n), n / d, "{n} / {d} ({f:?})");
            }
        }
        // what the index maps carry
        let m = IndexMap::channel_tap(9 * 64, 3, 196, 14, 1, 1);
        assert_eq!((FastDiv::new(9).mul, FastDiv::new(9).shr, FastDiv::new(3).mul), (m.per_mul, m.per_shr, m.width_mul));
        assert_eq!(m.entry(5 * 9 + 7, false), Entry::At { off: 5 * 196 + 14, y: 1, x: 0 });
    }

    /// Fake device addresses: buffer j starts at j << 40, so an offset names the buffer.
    const BUF: u64 = 1 << 40;

    /// C of a descriptor, computed on the host from the descriptor alone (f64 sums), written into
    /// the buffers as the kernel's epilogue would: the index algebra, checked without a GPU.
    fn interpret(d: &GemmDesc, bufs: &mut [Vec<f32>]) {
        let read = |bufs: &[Vec<f32>], base: u64, off: i64| -> f32 {
            let addr = base as i64 + off;
            let (j, i) = ((addr as u64 / BUF) as usize, (addr as u64 % BUF) as usize);
            bufs[j][i]
        };
        let cols = d.cols();
        let mut c = vec![0f64; d.m as usize * cols];
        for m in 0..d.m as usize {
            for n in 0..cols {
                let mut s = 0f64;
                for k in 0..d.k as usize {
                    let av = d.a.element(m, k).map_or(0.0, |o| o.map_or(1.0, |off| read(bufs, d.a.p, off)));
                    let bv = d.b.element(n, k).map_or(0.0, |o| o.map_or(1.0, |off| read(bufs, d.b.p, off)));
                    s += av as f64 * bv as f64;
                }
                c[m * cols + n] = s;
            }
        }
        for m in 0..d.m as usize {
            for n in 0..cols {
                let mut v = c[m * cols + n] as f32;
                if n == d.n as usize {
                    let j = (d.out.ones_out / BUF) as usize;
                    bufs[j][m] += v;
                    continue;
                }
                if d.out.bias_on == 1 {
                    v += read(bufs, d.out.bias, m as i64);
                }
                if d.out.bias_on == 2 {
                    v += read(bufs, d.out.bias, n as i64);
                }
                let addr = d.out.p as i64 + d.out.offset(m, n);
                let (j, i) = ((addr as u64 / BUF) as usize, (addr as u64 % BUF) as usize);
                bufs[j][i] = if d.out.accumulate != 0 { bufs[j][i] + v } else { v };
            }
        }
    }

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn close(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * scale, "{what}: element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn the_conv_descriptors_compute_the_cpu_convolution() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for g in [
            ConvGeom::new(3, 5, 7, 6, 3, 1),
            ConvGeom::new(2, 4, 9, 9, 5, 0),
            ConvGeom::new(1, 3, 5, 5, 5, 2),
            ConvGeom::new(4, 2, 6, 8, 3, 2),
        ] {
            let s = 3;
            let (w, b, x, dy) = (
                rand_vec(&mut rng, g.weight_len()),
                rand_vec(&mut rng, g.cout),
                rand_vec(&mut rng, s * g.in_len()),
                rand_vec(&mut rng, s * g.out_len()),
            );
            // buffers: 0 w, 1 b, 2 x, 3 y / dx, 4 dy, 5 dw, 6 db
            let mut bufs = vec![
                w.clone(),
                b.clone(),
                x.clone(),
                vec![0.0; s * g.out_len()],
                dy.clone(),
                vec![0.5; g.weight_len()],
                vec![0.25; g.cout],
            ];
            interpret(&conv_forward(&g, s, 0, BUF, 2 * BUF, 3 * BUF, false), &mut bufs);
            let mut y = vec![0f32; s * g.out_len()];
            cconv::forward(&g, &w, &b, &x, &mut y);
            close(&format!("{g:?} forward"), &bufs[3], &y);
            bufs[3] = vec![f32::NAN; s * g.in_len()];
            interpret(&conv_backward_data(&g, s, 0, 4 * BUF, 3 * BUF), &mut bufs);
            let mut dx = vec![0f32; s * g.in_len()];
            cconv::backward_data(&g, &w, &dy, &mut dx, false);
            close(&format!("{g:?} data gradient"), &bufs[3], &dx);
            interpret(&conv_weight_grad(&g, s, 4 * BUF, 2 * BUF, 5 * BUF, 6 * BUF, false), &mut bufs);
            let (mut dw, mut db) = (vec![0.5f32; g.weight_len()], vec![0.25f32; g.cout]);
            cconv::backward_weights(&g, &x, &dy, &mut dw, &mut db);
            close(&format!("{g:?} weight gradient"), &bufs[5], &dw);
            close(&format!("{g:?} bias gradient"), &bufs[6], &db);
        }
    }

    #[test]
    fn the_linear_descriptors_compute_the_cpu_linear_layer() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (n_in, n_out, rows) = (37, 11, 9);
        let (w, b, x, dy) = (
            rand_vec(&mut rng, n_in * n_out),
            rand_vec(&mut rng, n_out),
            rand_vec(&mut rng, rows * n_in),
            rand_vec(&mut rng, rows * n_out),
        );
        let mut bufs = vec![
            w.clone(),
            b.clone(),
            x.clone(),
            vec![0.0; rows * n_out],
            dy.clone(),
            vec![0.5; n_in * n_out],
            vec![0.25; n_out],
            vec![0.0; rows * n_in],
        ];
        interpret(&linear_forward(n_in, n_out, rows, 2 * BUF, 0, BUF, 3 * BUF, false), &mut bufs);
        let mut y = vec![0f32; rows * n_out];
        clin::forward(n_in, n_out, &w, &b, &x, &mut y);
        close("linear forward", &bufs[3], &y);
        interpret(&linear_backward_data(n_in, n_out, rows, 4 * BUF, 0, 7 * BUF), &mut bufs);
        let mut dx = vec![0f32; rows * n_in];
        clin::backward_data(n_in, n_out, &w, &dy, &mut dx);
        close("linear data gradient", &bufs[7], &dx);
        interpret(&linear_weight_grad(n_in, n_out, rows, 4 * BUF, 2 * BUF, 5 * BUF, 6 * BUF, false), &mut bufs);
        let (mut dw, mut db) = (vec![0.5f32; n_in * n_out], vec![0.25f32; n_out]);
        clin::backward_weights(n_in, n_out, &x, &dy, &mut dw, &mut db);
        close("linear weight gradient", &bufs[5], &dw);
        close("linear bias gradient", &bufs[6], &db);
    }

    #[test]
    fn split_k_fills_the_device_and_covers_every_k_step_once() {
        let h100 = DeviceLimits::H100;
        // fashion-mnist conv2's weight gradient: 64 × (32·25 + 1) outputs, K = 2000·196 pixels
        let p = gemm_plan(64, 801, 2000 * 196, &h100);
        assert_eq!((p.grid.0, p.grid.1), (13, 1));
        assert!(p.splits > 1 && p.grid.0 as usize * p.splits >= 2 * 132, "{p:?}");
        let ktiles = (2000usize * 196).div_ceil(TC_BK);
        assert!(p.splits * p.kt_per_split >= ktiles && (p.splits - 1) * p.kt_per_split < ktiles, "{p:?}");
        assert_eq!(p.partial, p.splits * 64 * 801);
        // a large forward needs no split
        let f = gemm_plan(64, 2000 * 196, 800, &h100);
        assert_eq!((f.splits, f.partial), (1, 0));
        // never more splits than k-steps
        let tiny = gemm_plan(8, 8, 40, &h100);
        assert_eq!(tiny.splits, 2);
        assert_eq!(tiny.kt_per_split, 1);
    }

    /// The 256-thread tiles only where `BACKEI_TC_TILES=big` allows them: then the big ones for
    /// every large GEMM of a cifar10 step and fashion-mnist's fc1 (both sides ≥ 128, work for one
    /// block per SM), the mid ones for fashion-mnist's conv2 forward and weight gradient (64 output
    /// channels) and smaller GEMMs with N ≥ 128; the plan covers the output and every k-step once,
    /// with one block per SM at least.
    #[test]
    fn big_tiles_are_opt_in_and_taken_by_large_gemms_only() {
        let h100 = DeviceLimits::H100;
        let plan = |d: &GemmDesc, big: bool| gemm_plan_tiles(d.m as usize, d.cols(), d.k as usize, &h100, big);
        for (op, d) in cifar10_step_gemms() {
            assert_ne!(plan(&d, false).tile, TileShape::Big, "{op}");
            let p = plan(&d, true);
            assert_eq!(p.tile, TileShape::Big, "cifar10 {op}: {d:?}");
            let (m, n, ktiles) = (d.m as usize, d.cols(), (d.k as usize).div_ceil(TC_BK));
            assert!(p.grid.0 as usize * 128 >= n && (p.grid.0 as usize - 1) * 128 < n, "{op}: {p:?}");
            assert!(p.grid.1 as usize * 128 >= m && (p.grid.1 as usize - 1) * 128 < m, "{op}: {p:?}");
            assert!(p.splits * p.kt_per_split >= ktiles && (p.splits - 1) * p.kt_per_split < ktiles, "{op}: {p:?}");
            assert!(p.grid.0 as usize * p.grid.1 as usize * p.splits >= 132, "{op}: fewer blocks than SMs: {p:?}");
            assert_eq!(p.partial, if p.splits > 1 { p.splits * m * n } else { 0 }, "{op}");
        }
        // fashion-mnist: fc1 on the big tiles; conv2's forward and weight gradient (M = 64) on the
        // mid ones; its data gradient (M = 32) stays on the wide ones
        for (op, d) in fashion_step_gemms() {
            let want = match op {
                _ if op.starts_with("fc1") => TileShape::Big,
                "conv2 data gradient" => TileShape::Wide,
                _ => TileShape::Mid,
            };
            let p = plan(&d, true);
            assert_eq!(p.tile, want, "fashion-mnist {op}: {d:?}");
            let (bm, bn) = p.tile.dims();
            assert!(p.grid.0 as usize * bn >= d.cols() && p.grid.1 as usize * bm >= d.m as usize, "{op}: {p:?}");
            assert_eq!(plan(&d, false).tile, if op == "conv2 data gradient" { TileShape::Wide } else { TileShape::Square }, "{op}");
        }
        // 200 × 200 × 64: 4 big tiles and 2 k-steps would leave 128 of 132 SMs idle (mid tiles then)
        assert_eq!(gemm_plan_tiles(200, 200, 64, &h100, true).tile, TileShape::Mid);
        assert_eq!(gemm_plan_tiles(200, 200, 64 * 1024, &h100, true).tile, TileShape::Big, "split-K fills the device");
        assert_eq!(gemm_plan_tiles(100, 100_000, 4096, &h100, true).tile, TileShape::Mid, "M below one big tile");
        assert_eq!(gemm_plan_tiles(100, 100, 4096, &h100, true).tile, TileShape::Square, "N below one mid tile");
        assert_eq!(gemm_plan_tiles(20, 100_000, 4096, &h100, true).tile, TileShape::Wide, "M ≤ 32");
        assert_eq!((TileShape::Big.threads(), TileShape::Mid.threads()), (256, 256));
        assert_eq!(TileShape::Mid.kernel(Precision::Fp32), "gemm_tc_fp32_mid");
        assert_eq!(TileShape::Big.kernel(Precision::Bf16), "gemm_tc_bf16_big");
        // the variable
        for (v, want) in
            [(None, Some(false)), (Some(""), Some(false)), (Some("small"), Some(false)), (Some(" big"), Some(true)), (Some("huge"), None)]
        {
            match (big_tiles_from_env(v), want) {
                (Ok(got), Some(want)) => assert_eq!(got, want, "{v:?}"),
                (Err(e), None) => assert!(e.to_string().contains(TILES_ENV) && e.to_string().contains("big"), "{e}"),
                (r, _) => panic!("{v:?}: {r:?}"),
            }
        }
    }

    #[test]
    fn spikes_and_their_averages_are_exact_inputs_images_are_not() {
        use crate::spec::{FiringMode, LayerSpec, NetworkSpec};
        let exact_inputs = |spec: &NetworkSpec| -> Vec<usize> {
            let plan = spec.plan().unwrap();
            (0..plan.len())
                .filter(|&i| {
                    matches!(plan[i].spec, LayerSpec::Conv { .. } | LayerSpec::Linear { .. }) && input_exact_in_fp16(spec, &plan, i)
                })
                .collect()
        };
        // fashion-mnist: conv 0 reads the image; conv 3 a pooled spike map, linear 7 its flattening,
        // linear 9 spikes
        assert_eq!(exact_inputs(&NetworkSpec::fashion_mnist()), vec![3, 7, 9]);
        // cifar10: dropout 0.5 scales by 2, a power of two
        let cifar = NetworkSpec::cifar10();
        let all: Vec<usize> = cifar
            .plan()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l.spec, LayerSpec::Conv { .. } | LayerSpec::Linear { .. }))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(exact_inputs(&cifar), all[1..].to_vec());
        // a dropout of 0.3 scales by 1/0.7: not exact
        let mut odd = cifar.clone();
        for l in &mut odd.layers {
            if let LayerSpec::Dropout { p } = l {
                *p = 0.3;
            }
        }
        assert!(exact_inputs(&odd).len() < exact_inputs(&cifar).len());
        // smooth firing: real-valued "spikes"
        let mut smooth = NetworkSpec::fashion_mnist();
        smooth.neuron.mode = FiringMode::Smooth { k: 4.0 };
        assert!(exact_inputs(&smooth).is_empty());
    }

    #[test]
    fn the_path_follows_the_precision_and_the_variable() {
        assert_eq!(FeedForward::choose(Precision::Fp32, None).unwrap(), FeedForward::Cublas);
        assert_eq!(FeedForward::choose(Precision::Bf16, None).unwrap(), FeedForward::TensorCore(Precision::Bf16));
        assert_eq!(FeedForward::choose(Precision::Fp32, Some("tc")).unwrap(), FeedForward::TensorCore(Precision::Fp32));
        assert_eq!(FeedForward::choose(Precision::Fp32, Some("cublas")).unwrap(), FeedForward::Cublas);
        let e = FeedForward::choose(Precision::Tf32, Some("cublas")).unwrap_err().to_string();
        assert!(e.contains("fp32 only") && e.contains(FEEDFORWARD_ENV), "{e}");
        assert!(FeedForward::choose(Precision::Fp32, Some("fast")).is_err());
    }
}
