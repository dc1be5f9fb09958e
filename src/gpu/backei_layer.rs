//! Host side of the fused BackEI layer (and of the plain spiking layer, its special case with
//! back and ei off): one launch runs the whole time loop forward, one runs BPTT backward.
//! Twins: `src/cpu/backei_layer.rs` (the reference) and `cuda/backei_layer.cu`, `cuda/spiking.cu`.
//!
//! INTERFACE CONTRACT (used by `src/gpu/network.rs`; keep these signatures):
//! - parameters and gradients live in ONE flat device buffer each (the fused optimizer's view);
//!   a layer is told where its tensors are by `BackEiSlots` = [W_b, b_b, W_e, b_e] ranges
//!   (empty ranges when a gate is off), exactly as `cpu::network` lays them out.
//! - every tensor is time-major [T][B][C][H][W] f32; the input current may have T_in = 1.
//!
//! # Which shape takes which path (see [`plan`], a pure function tested without a GPU)
//! - **Plain** (back and ei both off — the spiking layers after linear layers, or an ablation):
//!   `spiking_forward_v1_f32` / `spiking_backward_v1_f32`, one thread per neuron over B·N
//!   neurons, the time loop inside the thread; saves only v_t. Memory-bound, every access
//!   coalesced.
//! - **Fused** (back or ei on): `backei_forward_v1_f32` / `backei_backward_v1_f32`, ONE BLOCK PER
//!   SAMPLE (grid = B), up to 1024 threads looping over the sample's N = C·H·W neurons; the gate
//!   convolutions need every neighbour of the previous phase, and a block owning the whole sample
//!   needs only `__syncthreads()` between phases. This one path serves every shape of the four
//!   networks (N from 6 400 to 131 072): the state lives in global memory (L1/L2-resident), the
//!   membrane u is recomputed from the thread's own v_{t−1}. The gate weights (C²k² floats per
//!   gate) are copied to shared memory when they fit the device's opt-in limit (layer 1 of mnist,
//!   nmnist and fashion: 45–74 KB for both gates; not their layer 2, 295–320 KB, nor the cifar10
//!   layers, 1.2–19 MB) and read through L1 otherwise.
//! - **Weight gradients**: `OnChip` when the per-sample accumulators (C²k² + C per gate) fit in
//!   shared memory — each block sums its sample's dW over all T in shared memory and does one
//!   atomicAdd pass at the end (mnist layer 1 C = 15 r = 2, nmnist layer 1, fashion layer 1
//!   C = 32 r = 1 on A100/H100); `Separate` otherwise (mnist/nmnist layer 2 C = 40 r = 2, fashion
//!   layer 2 C = 64, all cifar10 layers): the backward kernel saves da_t and dz_t for every step
//!   and `backei_wgrad_v1_f32` reduces them over (t, b, pixel), one block per (c, ci) weight pair.
//!
//! - **v2** (`KernelVersion::V2`, opt-in: `BACKEI_BACKEI_KERNEL=v2` or `layer.version`; v1 stays
//!   the default until v2 is validated on a GPU): `backei_{forward,backward}_v2_r{1,2}_f32`,
//!   persistent kernels under a cooperative launch (grid = min(jobs, 2 blocks/SM · SMs), clamped
//!   by the occupancy API at launch) with a grid barrier between phases; every phase spreads the
//!   batch's tiles (sample × 16/32/64 channels × full rows) over the GPU, the gate convolutions
//!   tiled in FP32 (4 channels × 4 pixels per thread). dz_t and da_t are kept for every step and
//!   `backei_wgrad_tiled_r{1,2}_f32` reduces the weight gradients afterwards. [`plan_version`] falls
//!   back to v1 (saying why in `fallback`) for r ∉ {1, 2}, W > 256 or too little shared memory.
//!   [`v2_tile_job`] mirrors the kernel's index arithmetic; the unit tests check with it that the
//!   tiles cover every output exactly once and read only inside the staged halo.
//! - **v3** (`KernelVersion::V3`, opt-in: `BACKEI_BACKEI_KERNEL=v3`): the v2 kernels with 8-channel
//!   register tiles (`TileDims::cpt` = 8: 32 accumulators per thread, 32 FMAs per 6 shared-memory
//!   loads instead of 16 per 5) and twice the pixels per tile; its weight gradient
//!   (the same `backei_wgrad_tiled_r{1,2}_f32` with `TileDims::wg_cw` > 1) gives each thread 1, 2 or 4 output channels
//!   ([`v3_wgrad_channels_per_thread`]) where v2's gives one (c, ci) pair.
//!   Which of v2 and v3 is faster depends on the shape (a larger tile means fewer jobs to balance
//!   over the SMs): `cargo bench --bench kernels` times v1, v2 and v3 side by side. Both are
//!   executed on the CPU emulator in CI (`tests/emu_kernels.rs`) against the CPU engine.
//!
//! Buffers are sized once per (batch, steps) and reused; all settings and shapes are validated
//! and returned as errors, never panics.

use super::backei_v4::{plan_v4, plan_v4_tiled, V4Choices, TILING_ENV, V4_MODULE, V4_THREADS};
use super::device::GpuDevice;
use super::loss::{LossBuffers, LossScales};
use crate::cpu::loss::Loss;
use crate::error::{config_err, shape_err, BackeiError, Result};
use crate::precision::Precision;
use crate::spec::{FeedbackConfig, FiringMode, NeuronConfig, Surrogate};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use std::ops::Range;
use std::sync::Arc;

/// Where W_b, b_b, W_e, b_e sit in the flat parameter (and gradient) buffer.
pub type BackEiSlots = [Range<usize>; 4];

/// The device's `NeuronParams` (`cuda/common.cuh`), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NeuronParams {
    pub leak: f32,
    pub threshold: f32,
    pub surrogate: i32,
    pub width: f32,
    pub smooth: i32,
    pub k: f32,
}
// SAFETY: plain-old-data with the C layout of cuda/common.cuh's NeuronParams.
unsafe impl DeviceRepr for NeuronParams {}

impl NeuronParams {
    pub fn from_config(cfg: &NeuronConfig) -> Self {
        let (surrogate, width) = match cfg.surrogate {
            Surrogate::Rectangle { width } => (0, width),
            Surrogate::Sigmoid { alpha } => (1, alpha),
            Surrogate::Atan { alpha } => (2, alpha),
        };
        let (smooth, k) = match cfg.mode {
            FiringMode::Exact => (0, 0.0),
            FiringMode::Smooth { k } => (1, k),
        };
        NeuronParams { leak: cfg.leak as f32, threshold: cfg.threshold as f32, surrogate, width: width as f32, smooth, k: k as f32 }
    }
}

/// The device's `LayerDims` (`cuda/backei_layer.cu`), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerDims {
    pub off_wb: i64,
    pub off_bb: i64,
    pub off_we: i64,
    pub off_be: i64,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub r: i32,
    pub t: i32,
    pub b: i32,
    pub t_in: i32,
    pub d: i32,
    pub back: i32,
    pub ei: i32,
    pub w_smem: i32,
    pub wgrad_fused: i32,
}
// SAFETY: plain-old-data with the C layout of cuda/backei_layer.cu's LayerDims.
unsafe impl DeviceRepr for LayerDims {}

/// What the plan needs to know about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    pub sm_count: u32,
    /// Dynamic shared memory one block may opt in to (bytes).
    pub max_smem_per_block: u32,
    /// Shared memory of one SM (bytes): bounds the co-resident blocks of the v2 kernels.
    pub max_smem_per_sm: u32,
}

impl DeviceLimits {
    /// NVIDIA A100 (sm_80): 108 SMs, 163 KiB opt-in shared memory per block.
    pub const A100: DeviceLimits = DeviceLimits { sm_count: 108, max_smem_per_block: 166_912, max_smem_per_sm: 167_936 };
    /// NVIDIA H100 SXM (sm_90): 132 SMs, 227 KiB opt-in shared memory per block.
    pub const H100: DeviceLimits = DeviceLimits { sm_count: 132, max_smem_per_block: 232_448, max_smem_per_sm: 233_472 };

    pub fn of(dev: &GpuDevice) -> Result<Self> {
        let attr = |a| dev.ctx.attribute(a).map_err(|e| BackeiError::Cuda(format!("device attribute {a:?}: {e:?}")));
        Ok(DeviceLimits {
            sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32,
            max_smem_per_block: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as u32,
            max_smem_per_sm: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?.max(0) as u32,
        })
    }
}

/// The dropout between a BackEI layer and the pooling after it, for the layer's backward from the
/// pooling's gradient (`GpuBackEiLayer::backward_from_pooled`): the step's key table (device
/// memory), the layer's slot in it, its probability and the batch's first element.
pub struct PoolDropout<'a> {
    pub keys: &'a CudaSlice<u64>,
    pub slot: usize,
    pub p: f32,
    pub index0: u64,
}

/// What a spiking layer's forward also writes from its spikes, in the same launch
/// (`GpuBackEiLayer::forward_with`).
pub enum Epilogue<'a, 'b> {
    None,
    /// The network's readout y [B][N] = (1/T)·Σ_t s_t, as `loss::readout` computes it
    /// (`spiking_readout_forward_v1_f32`; a plain layer: the network's last).
    Readout(&'a mut CudaViewMut<'b, f32>),
    /// The 2×2 average pooling of s, y [T][B][C][⌊H/2⌋][⌊W/2⌋], as `pool::forward` computes it (the
    /// v4 kernels: `pool_owned` in `cuda/backei_v4.cu`; the network's pooling layer after this one).
    Pool(&'a mut CudaViewMut<'b, f32>),
    /// The same pooling as int8 codes c of the pooled spikes (value c · 0.25; ⌈len/4⌉ f32 words;
    /// `pool::PoolIo::S8ToQ8`): a layer whose spikes are int8 (compact state) only.
    PoolCodes(&'a mut CudaViewMut<'b, f32>),
}

/// A spiking layer's input current made one `--recompute` window at a time (v4): the network's
/// convolution before the layer, recomputed for each window so that its [T][B][N] output is never
/// stored (`memory::conv_output_window`). The forward fills every window in turn; the backward
/// refills every window but the last, whose steps the forward left in place (as it left the
/// layer's own v, g and z of that window).
pub trait InputWindows {
    /// Writes steps [t0, t1) of the input current, [t1 − t0][B][N], into the buffer `window` reads.
    fn fill(&mut self, t0: usize, t1: usize) -> Result<()>;
    /// Steps [t0, t1) as the last `fill` wrote them.
    fn window(&self, t0: usize, t1: usize) -> Result<CudaView<'_, f32>>;
}

/// Where a spiking layer reads its input current.
pub enum LayerInput<'a, 'b> {
    /// Every step in memory, [T_in][B][N].
    Whole(&'a CudaView<'b, f32>),
    /// One window at a time ([`InputWindows`]): T_in = T, the v4 kernels under `--recompute`.
    Windows(&'a mut (dyn InputWindows + 'a)),
}

impl LayerInput<'_, '_> {
    /// The values the input holds over all its steps (a windowed input's: `t_in`·`bn`, each
    /// window's length checked when it is read), refusing windows of a T_in = 1 input.
    fn whole_len(&self, t_in: usize, steps: usize, bn: usize) -> Result<usize> {
        match self {
            LayerInput::Whole(x) => Ok(x.len()),
            LayerInput::Windows(_) if t_in == steps => Ok(t_in * bn),
            LayerInput::Windows(_) => {
                Err(config_err("input", format!("T_in = {t_in}: only an input of every T = {steps} steps comes in windows")))
            }
        }
    }

    /// The whole input, for the kernels that have no windows.
    fn whole(&self) -> Result<&CudaView<'_, f32>> {
        match self {
            LayerInput::Whole(x) => Ok(x),
            LayerInput::Windows(_) => Err(config_err("input", "only the v4 kernels under --recompute read their input window by window")),
        }
    }
}

/// The last layer's kernels with the readout and the loss fused (`cuda/spiking.cu`).
pub const READOUT_FORWARD: &str = "spiking_readout_forward_v1_f32";
pub const LOSS_BACKWARD: &str = "spiking_loss_backward_v1_f32";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerPath {
    /// back and ei off: `spiking.cu`, one thread per neuron.
    Plain,
    /// back and/or ei on: `backei_layer.cu`, one block per sample.
    Fused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgradPath {
    /// No gate weights (plain layer).
    None,
    /// Accumulated per block in shared memory over all T, one atomicAdd pass at the end.
    OnChip,
    /// da_t / dz_t saved per step, reduced afterwards by `backei_wgrad_v1_f32`.
    Separate,
    /// v2: da_t / dz_t saved per step, reduced afterwards by `backei_wgrad_tiled_r{1,2}_f32`.
    Tiled,
    /// v4: accumulated per block inside the backward's time loop, reduced in a fixed order at its end.
    Fused,
}

/// Which generation of the fused BackEI kernels a layer runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelVersion {
    /// One block per sample (`backei_*_v1_f32`): the reference version (the default until the
    /// first GPU run of v3, 2026-12-04).
    V1,
    /// Cooperative persistent kernels with tiled convolutions over the whole batch
    /// (`backei_*_v2_r{1,2}_f32`); radius 1 and 2 only, else the plan falls back to v1.
    V2,
    /// v2 with 8-channel register tiles (`backei_*_v3_r{1,2}_f32`): 32 FMAs per 6 shared-memory
    /// loads in the inner loop instead of 16 per 5. The default: on an H200 (2026-12-04) it agreed
    /// with the CPU engine on every BackEI shape of the four networks and ran the fashion-mnist
    /// step in 50.4 ms against v1's 254 ms and v4's 53.8 ms (fp32; bench/RESULTS.md).
    #[default]
    V3,
    /// Tensor cores (`backei_{forward,backward}_v4_r{1,2}_{fp32,tf32,bf16}`, `cuda/backei_v4.cu`):
    /// implicit-GEMM gate convolutions on mma.sync, weight gradients fused into the backward;
    /// the precision is the layer's (`GpuBackEiLayer::precision`). Falls back to v3 (then v1) where
    /// `backei_v4::plan_v4` says it cannot run.
    V4,
}

/// The environment variable that selects the fused kernels: `v1`, `v2`, `v3` (default) or `v4`.
pub const KERNEL_ENV: &str = "BACKEI_BACKEI_KERNEL";

impl KernelVersion {
    /// Parses `v1` / `v2` (case-insensitive); anything else is an error.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(KernelVersion::V1),
            "v2" | "2" => Ok(KernelVersion::V2),
            "v3" | "3" => Ok(KernelVersion::V3),
            "v4" | "4" => Ok(KernelVersion::V4),
            other => Err(config_err(KERNEL_ENV, format!("`{other}` is not a BackEI kernel version (v1, v2, v3 or v4)"))),
        }
    }

    /// The cooperative tiled kernels (v2 and v3).
    pub fn is_tiled(self) -> bool {
        matches!(self, KernelVersion::V2 | KernelVersion::V3)
    }

    /// Channels per thread of the tiled kernels' register tile.
    pub fn channels_per_thread(self) -> usize {
        if self == KernelVersion::V3 {
            8
        } else {
            4
        }
    }

    /// `$BACKEI_BACKEI_KERNEL`, the default (v3) when unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var(KERNEL_ENV) {
            Ok(s) => Self::parse(&s),
            Err(std::env::VarError::NotPresent) => Ok(KernelVersion::default()),
            Err(e) => Err(config_err(KERNEL_ENV, format!("{e}"))),
        }
    }
}

/// The device's `TileDims` (`cuda/backei_layer.cu`, v2), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TileDims {
    pub co_t: i32,
    pub rows: i32,
    pub row_groups: i32,
    pub ch_groups: i32,
    pub jobs: i32,
    pub wg_rows: i32,
    pub wg_row_groups: i32,
    pub wg_split: i32,
    /// Channels per thread: 4 (v2) or 8 (v3).
    pub cpt: i32,
    /// Weight gradient: output channels per thread (v2: 1; v3: 1, 2 or 4).
    pub wg_cw: i32,
}
// SAFETY: plain-old-data with the C layout of cuda/backei_layer.cu's TileDims.
unsafe impl DeviceRepr for TileDims {}

/// One kernel launch of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLaunch {
    pub module: &'static str,
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem_bytes: u32,
    /// Launched with cuLaunchCooperativeKernel (v2's persistent kernels: grid ≤ co-resident).
    pub cooperative: bool,
}

impl KernelLaunch {
    pub fn config(&self) -> LaunchConfig {
        LaunchConfig { grid_dim: self.grid, block_dim: (self.block, 1, 1), shared_mem_bytes: self.smem_bytes }
    }
}

/// Device buffer lengths (f32 elements) of a layer for one batch shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferSizes {
    /// s [T][B][N] (the output)
    pub out: usize,
    /// v [T][B][N]
    pub v: usize,
    /// g [T][B][N] (back)
    pub g: usize,
    /// z [T][B][N] (ei)
    pub z: usize,
    /// backward scratch: dv [B][N]
    pub dv: usize,
    /// backward scratch: the feedback ring [min(D, T)][B][N] (back, D < T)
    pub fb: usize,
    /// backward scratch: dz, [B][N] (OnChip) or [T][B][N] (Separate); v4: the ring of dz stored
    /// once, [min(D, T)][B][N] (`V4Plan::dz_ring`), else none
    pub dz: usize,
    /// backward scratch: da, [B][N] (OnChip) or [T][B][N] (Separate)
    pub da: usize,
    /// deterministic tiled plans: the weight-gradient blocks' partial sums [wg_split][C²k² + C]
    pub wg_partials: usize,
    /// tiled plans: the gate weights in the staging layout, [W_b][W_e] (C²k² each)
    pub staged_weights: usize,
    /// v4: the gate weights in mma B-fragment order ([gate][group][slice], as f32 words), their
    /// inverse scales [gate][group], and the per-range partial weight gradients
    pub v4_wfrag: usize,
    pub v4_winv: usize,
    pub v4_dw_part: usize,
    /// `--recompute K` (v4): v_{t1−1} at the end of every window but the last, [⌈T/K⌉ − 1][B][N]
    /// (v, g and z then hold K steps)
    pub v_ckpt: usize,
    /// `--recompute K` (v4): each thread's bias partial sums between the backward's launches,
    /// [grid][CO_T/2][256]
    pub v4_db_carry: usize,
    /// v4 in fp32 mode: the operands' row maxima, whence every staged chunk's scale
    /// ([`super::backei_v4::rowmax_words`]: v_t for every step, da and dz for a few; u32 words)
    pub v4_rowmax: usize,
}

impl BufferSizes {
    pub fn total_bytes(&self) -> usize {
        4 * (self.out
            + self.v
            + self.g
            + self.z
            + self.dv
            + self.fb
            + self.dz
            + self.da
            + self.wg_partials
            + self.staged_weights
            + self.v4_wfrag
            + self.v4_winv
            + self.v4_dw_part
            + self.v_ckpt
            + self.v4_db_carry
            + self.v4_rowmax)
    }
}

/// How a layer of a given shape runs on a given device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    pub path: LayerPath,
    pub forward: KernelLaunch,
    pub backward: KernelLaunch,
    pub wgrad: WgradPath,
    /// The separate weight-gradient reduction, launched once per enabled gate.
    pub wgrad_launch: Option<KernelLaunch>,
    /// Deterministic tiled plans: `backei_wgrad_reduce_f32`, after each weight-gradient launch,
    /// adds the blocks' partial sums in a fixed order (instead of their atomicAdd).
    pub wgrad_reduce: Option<KernelLaunch>,
    pub weights_in_smem_forward: bool,
    pub weights_in_smem_backward: bool,
    pub buffers: BufferSizes,
    /// The kernels this plan runs (V1 when V2 was asked for but is impossible for the shape).
    pub version: KernelVersion,
    /// v2's tiling (None for v1).
    pub tile: Option<TileDims>,
    /// Why a V2/V3 request fell back to V1, or a V4 request to V3 (or V1).
    pub fallback: Option<String>,
    /// v4's plan (tile, shared-memory layout, module constants), when the plan runs v4.
    pub v4: Option<super::backei_v4::V4Plan>,
    /// `--recompute K` with K < T (v4 only): the time loop runs in windows of K steps; v, g and z
    /// are kept for one window, v at every window's end, and the backward recomputes each
    /// earlier window before its BPTT ([`apply_recompute`]). None: every step is kept.
    pub window: Option<usize>,
}

impl LaunchPlan {
    /// u32 words of the cooperative kernels' sync buffer (the layer's `bar`, zeroed before every
    /// launch): v2/v3's grid barrier; v4's barrier and one phase count per block
    /// ([`super::backei_v4::V4Plan::sync_words`]); none for v1.
    pub fn sync_words(&self) -> usize {
        match &self.v4 {
            Some(v) if self.version == KernelVersion::V4 => v.sync_words(),
            _ if self.version.is_tiled() => 1,
            _ => 0,
        }
    }
}

const FUSED_MAX_THREADS: usize = 1024;
const PLAIN_THREADS: u32 = 256;
const WGRAD_THREADS: u32 = 256;
/// Beyond this, dynamic shared memory needs an explicit opt-in attribute.
const SMEM_DEFAULT_LIMIT: u32 = 48 * 1024;

fn to_i32(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| config_err(what, format!("{x} exceeds the kernels' 32-bit index range ({})", i32::MAX)))
}

/// Validates a layer's settings (independent of the device).
pub fn validate(shape: [usize; 3], fb: &FeedbackConfig, batch: usize, steps: usize) -> Result<()> {
    if shape.contains(&0) {
        return Err(config_err("shape", format!("layer shape {shape:?} has a zero dimension")));
    }
    if batch == 0 {
        return Err(config_err("batch", "batch = 0: a launch needs at least one sample"));
    }
    if steps == 0 {
        return Err(config_err("steps", "T = 0: a spiking layer needs at least one time step"));
    }
    if fb.delay == 0 {
        return Err(config_err("delay", "D = 0: the feedback delay must be at least 1 step"));
    }
    let n = shape[0].checked_mul(shape[1]).and_then(|x| x.checked_mul(shape[2]));
    let n = n.ok_or_else(|| config_err("shape", format!("{shape:?} overflows")))?;
    to_i32("neurons per sample C·H·W", n)?;
    to_i32("batch", batch)?;
    to_i32("steps", steps)?;
    if let Some(why) = fb.gate_misfit(shape[1], shape[2]) {
        return Err(config_err("radius", why));
    }
    if fb.back || fb.ei {
        let k = 2usize.saturating_mul(fb.radius).saturating_add(1);
        let wlen = shape[0].saturating_mul(shape[0]).saturating_mul(k).saturating_mul(k);
        to_i32("gate weights C·C·(2r+1)² (reduce the radius or the channels)", wlen)?;
        if shape[0] > 65_535 {
            return Err(config_err("channels", format!("C = {} > 65535 (the weight-gradient grid)", shape[0])));
        }
    }
    Ok(())
}

/// Checks the slots against the layer's tensors and the buffer's length; W and b of a gate must
/// not overlap (their gradients are written through two disjoint views).
pub(crate) fn check_slots(shape: [usize; 3], fb: &FeedbackConfig, slots: &BackEiSlots, buffer_len: usize, what: &str) -> Result<()> {
    let k = 2 * fb.radius + 1;
    let (wl, c) = (shape[0] * shape[0] * k * k, shape[0]);
    let want = [(fb.back, wl, "W_b"), (fb.back, c, "b_b"), (fb.ei, wl, "W_e"), (fb.ei, c, "b_e")];
    for (slot, (on, len, name)) in slots.iter().zip(want) {
        if on && slot.len() != len {
            return Err(shape_err(
                format!("BackEI layer {what} slot {name}"),
                format!("{len} elements"),
                format!("{slot:?} ({} elements)", slot.len()),
            ));
        }
        if on && slot.end > buffer_len {
            return Err(shape_err(
                format!("BackEI layer {what} slot {name}"),
                format!("a range inside the {buffer_len}-element buffer"),
                format!("{slot:?}"),
            ));
        }
    }
    for (on, w, b, name) in [(fb.back, &slots[0], &slots[1], "W_b / b_b"), (fb.ei, &slots[2], &slots[3], "W_e / b_e")] {
        if on && !(w.end <= b.start || b.end <= w.start) {
            return Err(shape_err(format!("BackEI layer {what} slots {name}"), "two disjoint ranges", format!("{w:?} and {b:?}")));
        }
    }
    Ok(())
}
/// Checks a backward call against the layer, the last forward's batch shape (`forward_t_in`: its
/// T_in) and the buffers: ∂L/∂s of T·B·N, ∂L/∂I and the input current of T_in·B·N, slots inside
/// both flat buffers, and a gradient buffer as long as the parameters. Shared by the fused and the
/// unfused layer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_backward_args(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    slots: &BackEiSlots,
    (batch, steps, t_in): (usize, usize, usize),
    forward_t_in: usize,
    grad_out_len: usize,
    grad_in_len: usize,
    input_len: usize,
    (params_len, grads_len): (usize, usize),
) -> Result<()> {
    if t_in != forward_t_in {
        return Err(config_err("T_in", format!("backward got T_in = {t_in}, the last forward had T_in = {forward_t_in}")));
    }
    let bn = batch * shape.iter().product::<usize>();
    let all = steps * bn;
    if grad_out_len != all {
        return Err(shape_err("BackEI layer backward ∂L/∂s", format!("T·B·C·H·W = {all}"), grad_out_len.to_string()));
    }
    if grad_in_len != t_in * bn {
        return Err(shape_err("BackEI layer backward ∂L/∂I", format!("T_in·B·C·H·W = {}", t_in * bn), grad_in_len.to_string()));
    }
    if input_len != t_in * bn {
        return Err(shape_err("BackEI layer backward input", format!("T_in·B·C·H·W = {}", t_in * bn), input_len.to_string()));
    }
    check_slots(shape, fb, slots, params_len, "parameter")?;
    check_slots(shape, fb, slots, grads_len, "gradient")?;
    if grads_len != params_len {
        return Err(shape_err(
            "BackEI layer backward gradient buffer",
            format!("{params_len} elements (as the parameters)"),
            grads_len.to_string(),
        ));
    }
    Ok(())
}

/// The input current of a forward: T_in = 1 (direct encoding) or T, and T_in·B·C·H·W values.
/// Shared by the fused and the unfused layer.
pub(crate) fn check_forward_input(t_in: usize, batch: usize, steps: usize, n: usize, len: usize) -> Result<()> {
    if t_in != 1 && t_in != steps {
        return Err(config_err(
            "T_in",
            format!("the input current has T_in = {t_in} steps; it must be 1 (direct encoding) or T = {steps}"),
        ));
    }
    if len != t_in * batch * n {
        return Err(shape_err(
            "BackEI layer forward input",
            format!("T_in·B·C·H·W = {t_in}·{batch}·{n} = {}", t_in * batch * n),
            len.to_string(),
        ));
    }
    Ok(())
}

/// The launch plan of a layer: path, grid/block/shared memory of every kernel, buffer sizes.
/// A pure function of the shape, the switches, the batch shape and the device's limits.
pub fn plan(shape: [usize; 3], fb: &FeedbackConfig, batch: usize, steps: usize, limits: &DeviceLimits) -> Result<LaunchPlan> {
    plan_with(shape, fb, batch, steps, limits, true)
}

/// The plan for `--deterministic` runs: bit-reproducible gradients. For V1 the Separate
/// weight-gradient path everywhere: the OnChip path adds each block's (sample's) dW with
/// atomicAdd, so the order of the float additions, and with it the last bits of the gradient,
/// changes from run to run; the Separate reduction (`backei_wgrad_v1_f32`) gives every weight to
/// one block that sums in a fixed order. For V2/V3 the tiled plan whose weight-gradient blocks
/// write their partial sums to a scratch buffer (`wg_partials`, one slice per split of the
/// (t, b, rows) chunks) instead of adding them with atomicAdd, and `backei_wgrad_reduce_f32` then
/// adds the slices in order; the cooperative kernels themselves use no data atomics (every
/// element has one owner thread).
pub fn plan_deterministic(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    version: KernelVersion,
) -> Result<LaunchPlan> {
    if version.is_tiled() {
        let mut p = plan_version(shape, fb, batch, steps, limits, version)?;
        if let (true, Some(td)) = (p.version.is_tiled(), p.tile) {
            let c = shape[0];
            let k = 2 * fb.radius + 1;
            let len = c * c * k * k + c;
            p.buffers.wg_partials = td.wg_split as usize * len;
            p.wgrad_reduce = Some(KernelLaunch {
                module: "backei_layer",
                kernel: "backei_wgrad_reduce_f32",
                grid: (len.div_ceil(WGRAD_THREADS as usize).min(4096) as u32, 1, 1),
                block: WGRAD_THREADS,
                smem_bytes: 0,
                cooperative: false,
            });
            return Ok(p);
        }
    }
    plan_with(shape, fb, batch, steps, limits, false)
}

fn plan_with(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    allow_onchip: bool,
) -> Result<LaunchPlan> {
    validate(shape, fb, batch, steps)?;
    let n = shape.iter().product::<usize>();
    let bn = batch * n;
    let all = steps * bn;
    if !(fb.back || fb.ei) {
        let blocks = bn.div_ceil(PLAIN_THREADS as usize).clamp(1, 1 << 20) as u32;
        let l = |kernel| KernelLaunch {
            module: "spiking",
            kernel,
            grid: (blocks, 1, 1),
            block: PLAIN_THREADS,
            smem_bytes: 0,
            cooperative: false,
        };
        return Ok(LaunchPlan {
            path: LayerPath::Plain,
            forward: l("spiking_forward_v1_f32"),
            backward: l("spiking_backward_v1_f32"),
            wgrad: WgradPath::None,
            wgrad_launch: None,
            wgrad_reduce: None,
            weights_in_smem_forward: false,
            weights_in_smem_backward: false,
            buffers: BufferSizes { out: all, v: all, ..Default::default() },
            version: KernelVersion::V1,
            tile: None,
            fallback: None,
            v4: None,
            window: None,
        });
    }
    let c = shape[0];
    let k = 2 * fb.radius + 1;
    let wlen = c * c * k * k;
    let gates = fb.back as usize + fb.ei as usize;
    let budget = limits.max_smem_per_block as usize;
    let w_bytes = 4 * gates * wlen;
    let acc_bytes = 4 * gates * (wlen + c);
    let w_fwd = w_bytes <= budget;
    let onchip = allow_onchip && acc_bytes <= budget;
    let used = if onchip { acc_bytes } else { 0 };
    let w_bwd = used + w_bytes <= budget;
    let threads = n.div_ceil(32).clamp(1, FUSED_MAX_THREADS / 32) as u32 * 32;
    let fused = |kernel, smem| KernelLaunch {
        module: "backei_layer",
        kernel,
        grid: (batch as u32, 1, 1),
        block: threads,
        smem_bytes: smem as u32,
        cooperative: false,
    };
    let per_step = if onchip { bn } else { all };
    Ok(LaunchPlan {
        path: LayerPath::Fused,
        forward: fused("backei_forward_v1_f32", if w_fwd { w_bytes } else { 0 }),
        backward: fused("backei_backward_v1_f32", used + if w_bwd { w_bytes } else { 0 }),
        wgrad: if onchip { WgradPath::OnChip } else { WgradPath::Separate },
        wgrad_reduce: None,
        wgrad_launch: (!onchip).then_some(KernelLaunch {
            module: "backei_layer",
            kernel: "backei_wgrad_v1_f32",
            grid: (c as u32, c as u32, 1),
            block: WGRAD_THREADS,
            smem_bytes: 0,
            cooperative: false,
        }),
        weights_in_smem_forward: w_fwd,
        weights_in_smem_backward: w_bwd,
        buffers: BufferSizes {
            out: all,
            v: all,
            g: if fb.back { all } else { 0 },
            z: if fb.ei { all } else { 0 },
            dv: bn,
            fb: if fb.back && fb.delay < steps { fb.delay * bn } else { 0 },
            dz: if fb.ei { per_step } else { 0 },
            da: if fb.back { per_step } else { 0 },
            wg_partials: 0,
            staged_weights: 0,
            v4_wfrag: 0,
            v4_winv: 0,
            v4_dw_part: 0,
            v_ckpt: 0,
            v4_db_carry: 0,
            v4_rowmax: 0,
        },
        version: KernelVersion::V1,
        tile: None,
        fallback: None,
        v4: None,
        window: None,
    })
}

/// v2: threads per block (`V2_THREADS` in the .cu).
pub const V2_THREADS: u32 = 256;
/// v2: input channels staged per chunk (`V2_CI`).
pub const V2_CI: usize = 8;
/// v2: co-resident blocks per SM the kernels are built for (`__launch_bounds__(256, 2)`).
pub const V2_BLOCKS_PER_SM: u32 = 2;
/// v2 weight gradient: pixels per (t, b, row group) chunk, at least one full row.
const V2_WG_PIXELS: usize = 128;
/// Shared memory the driver reserves per resident block (1 KiB on sm_80 / sm_90).
const SMEM_RESERVED_PER_BLOCK: usize = 1024;
/// v2 weight gradient: blocks aimed for per SM (an ordinary launch).
const V2_WG_BLOCKS_PER_SM: usize = 8;

/// Dynamic shared memory of a v2 forward/backward tile (bytes): the input halo chunk
/// [V2_CI][rows + 2r][W + 2r] padded to 4 floats, then the weights [V2_CI][k²][co_t].
pub fn v2_tile_smem_bytes(w: usize, r: usize, rows: usize, co_t: usize) -> usize {
    let k = 2 * r + 1;
    4 * (v2_tile_in_floats(w, r, rows) + V2_CI * k * k * co_t)
}

/// Floats of a tile's input halo chunk, padded to a float4 boundary (`tile_in_floats`).
pub fn v2_tile_in_floats(w: usize, r: usize, rows: usize) -> usize {
    (V2_CI * (rows + 2 * r) * (w + 2 * r) + 3) & !3
}

/// The odd plane stride of the weight gradient's X halo (`wg_plane`).
pub fn v2_wgrad_plane(w: usize, r: usize, wg_rows: usize) -> usize {
    ((wg_rows + 2 * r) * (w + 2 * r)) | 1
}

/// Dynamic shared memory of `backei_wgrad_tiled` (bytes; cw = 1 for v2):
/// dY [16·cw][wg_rows·W], X [16][plane].
pub fn v2_wgrad_smem_bytes(w: usize, r: usize, wg_rows: usize, cw: usize) -> usize {
    4 * (16 * cw * wg_rows * w + 16 * v2_wgrad_plane(w, r, wg_rows))
}

/// v3's weight-gradient output channels per thread: the most of 4 (r = 1) or 2 (r = 2, the
/// kernel's register budget) that the C channels fill, so no block is mostly idle.
pub fn v3_wgrad_channels_per_thread(c: usize, r: usize) -> usize {
    let max = if r == 1 { 4 } else { 2 };
    [4, 2, 1].into_iter().find(|&cw| cw <= max && c >= 16 * cw).unwrap_or(1)
}

/// v2's tiling of a layer, or why v2 cannot run it. Returns (tile, cooperative grid, tile smem,
/// weight-gradient grid, weight-gradient smem).
pub fn v2_tiling(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    cpt: usize,
) -> std::result::Result<(TileDims, u32, usize, (u32, u32), usize), String> {
    let [c, h, w] = shape;
    let r = fb.radius;
    if r != 1 && r != 2 {
        return Err(format!("radius {r}: the v2 kernels are built for r = 1 and r = 2"));
    }
    // (cost in tile slots, co_t, rows, row groups); ties go to the larger channel tile (more reuse)
    let mut best: Option<(usize, usize, usize, usize)> = None;
    for co_t in [16usize, 32, 64] {
        // pixel threads 256·cpt/co_t, 4 pixels each
        let pix = V2_THREADS as usize * cpt * 4 / co_t;
        if w > pix {
            continue;
        }
        let rmax = (pix / w).min(h).max(1);
        let rg = h.div_ceil(rmax);
        let rows = h.div_ceil(rg);
        let cost = c.div_ceil(co_t) * rg;
        if best.map_or(true, |b| cost <= b.0) {
            best = Some((cost, co_t, rows, rg));
        }
    }
    let (_, co_t, rows, rg) =
        best.ok_or_else(|| format!("W = {w} > {}: a tile holds whole rows of at most that many pixels", 256 * cpt / 4))?;
    let cg = c.div_ceil(co_t);
    let jobs = batch.checked_mul(cg).and_then(|x| x.checked_mul(rg)).filter(|&j| j <= i32::MAX as usize);
    let jobs = jobs.ok_or_else(|| format!("{batch}·{cg}·{rg} tile jobs exceed the 32-bit range"))?;
    let smem = v2_tile_smem_bytes(w, r, rows, co_t);
    if smem > limits.max_smem_per_block as usize {
        return Err(format!("a tile needs {smem} B of shared memory, the device allows {}", limits.max_smem_per_block));
    }
    let per_sm = (limits.max_smem_per_sm as usize / (smem + SMEM_RESERVED_PER_BLOCK)).min(V2_BLOCKS_PER_SM as usize);
    if per_sm == 0 || limits.sm_count == 0 {
        return Err(format!("no block of {smem} B shared memory is resident on this device"));
    }
    let grid = jobs.min(per_sm * limits.sm_count as usize).max(1) as u32;
    let wg_rows0 = (V2_WG_PIXELS / w).clamp(1, h);
    let wg_rg = h.div_ceil(wg_rows0);
    let wg_rows = h.div_ceil(wg_rg);
    let cw = if cpt == 8 { v3_wgrad_channels_per_thread(c, r) } else { 1 };
    let wg_smem = v2_wgrad_smem_bytes(w, r, wg_rows, cw);
    if wg_smem > limits.max_smem_per_block as usize {
        return Err(format!("the weight gradient needs {wg_smem} B of shared memory, the device allows {}", limits.max_smem_per_block));
    }
    let tiles = c.div_ceil(16 * cw) * c.div_ceil(16);
    let chunks = steps.saturating_mul(batch).saturating_mul(wg_rg);
    let split = (V2_WG_BLOCKS_PER_SM * limits.sm_count as usize).div_ceil(tiles).clamp(1, chunks.clamp(1, 65_535));
    let td = TileDims {
        co_t: co_t as i32,
        rows: rows as i32,
        row_groups: rg as i32,
        ch_groups: cg as i32,
        jobs: jobs as i32,
        wg_rows: wg_rows as i32,
        wg_row_groups: wg_rg as i32,
        wg_split: split as i32,
        cpt: cpt as i32,
        wg_cw: cw as i32,
    };
    Ok((td, grid, smem, (tiles as u32, split as u32), wg_smem))
}

/// The launch plan for a kernel version: `plan` for V1 (and for the plain layer); for V2 and V3
/// the cooperative tiled kernels when [`v2_tiling`] finds a tiling, else the V1 plan with the
/// reason in `fallback`.
pub fn plan_version(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    version: KernelVersion,
) -> Result<LaunchPlan> {
    if version == KernelVersion::V4 {
        return plan_tensor_cores(shape, fb, batch, steps, limits, Precision::Fp32);
    }
    let mut p = plan(shape, fb, batch, steps, limits)?;
    if version == KernelVersion::V1 || p.path == LayerPath::Plain {
        return Ok(p);
    }
    let (td, grid, smem, wg_grid, wg_smem) = match v2_tiling(shape, fb, batch, steps, limits, version.channels_per_thread()) {
        Ok(x) => x,
        Err(why) => {
            p.fallback = Some(why);
            return Ok(p);
        }
    };
    let r1 = fb.radius == 1;
    let coop = |kernel| KernelLaunch {
        module: "backei_layer",
        kernel,
        grid: (grid, 1, 1),
        block: V2_THREADS,
        smem_bytes: smem as u32,
        cooperative: true,
    };
    let v3 = version == KernelVersion::V3;
    p.forward = coop(match (v3, r1) {
        (false, true) => "backei_forward_v2_r1_f32",
        (false, false) => "backei_forward_v2_r2_f32",
        (true, true) => "backei_forward_v3_r1_f32",
        (true, false) => "backei_forward_v3_r2_f32",
    });
    p.backward = coop(match (v3, r1) {
        (false, true) => "backei_backward_v2_r1_f32",
        (false, false) => "backei_backward_v2_r2_f32",
        (true, true) => "backei_backward_v3_r1_f32",
        (true, false) => "backei_backward_v3_r2_f32",
    });
    p.wgrad = WgradPath::Tiled;
    p.wgrad_launch = Some(KernelLaunch {
        module: "backei_layer",
        kernel: if r1 { "backei_wgrad_tiled_r1_f32" } else { "backei_wgrad_tiled_r2_f32" },
        grid: (wg_grid.0, wg_grid.1, 1),
        block: V2_THREADS,
        smem_bytes: wg_smem as u32,
        cooperative: false,
    });
    p.weights_in_smem_forward = false;
    p.weights_in_smem_backward = false;
    let all = p.buffers.out;
    p.buffers.dz = if fb.ei { all } else { 0 };
    p.buffers.da = if fb.back { all } else { 0 };
    let k = 2 * fb.radius + 1;
    p.buffers.staged_weights = 2 * shape[0] * shape[0] * k * k;
    p.version = version;
    p.tile = Some(td);
    Ok(p)
}

/// THE plan of a layer: the version asked for (v4 in `precision`), deterministic or not, and on
/// v4 the `compact` state ([`CompactState::of`]). What `GpuBackEiLayer::prepare` allocates from
/// and what the network's memory plan counts.
#[allow(clippy::too_many_arguments)]
pub fn plan_layer(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    version: KernelVersion,
    precision: Precision,
    deterministic: bool,
    recompute: Option<usize>,
    compact: CompactState,
    v4: &V4Choices,
) -> Result<LaunchPlan> {
    let mut p = if let Some(k) = recompute {
        // only v4's launches start from a checkpoint: --recompute takes them, whatever was asked
        let mut p = plan_tensor_cores_with(shape, fb, batch, steps, limits, precision, v4)?;
        apply_recompute(&mut p, shape, fb, k, steps)?;
        p
    } else if version == KernelVersion::V4 {
        // deterministic by construction
        plan_tensor_cores_with(shape, fb, batch, steps, limits, precision, v4)?
    } else if deterministic {
        plan_deterministic(shape, fb, batch, steps, limits, version)?
    } else {
        plan_version(shape, fb, batch, steps, limits, version)?
    };
    apply_compact(&mut p, fb, compact);
    Ok(p)
}

/// `--recompute K` on a plan: a fused layer keeps v, g, z for a window of K steps, v at the end of
/// each window but the last (the next window's v_{t0−1}) and, for the backward's launches, each
/// thread's bias partial sums. K ≥ T changes nothing (one window). A plain layer (back and ei
/// off: the spiking layers after linear layers, a few thousand neurons) keeps its v for every
/// step: its kernels have no windows and its state is a small part of the step's.
pub fn apply_recompute(p: &mut LaunchPlan, shape: [usize; 3], fb: &FeedbackConfig, k: usize, steps: usize) -> Result<()> {
    check_recompute(Some(k))?;
    if p.path == LayerPath::Plain || k >= steps {
        return Ok(());
    }
    let Some(v4) = &p.v4 else {
        return Err(config_err(
            "--recompute",
            format!(
                "the BackEI layer {shape:?} cannot run on the v4 kernels, the only ones that recompute ({}); drop --recompute",
                p.fallback.as_deref().unwrap_or("no v4 plan")
            ),
        ));
    };
    let bn = p.buffers.dv;
    let b = &mut p.buffers;
    b.v = k * bn;
    b.g = if fb.back { k * bn } else { 0 };
    b.z = if fb.ei { k * bn } else { 0 };
    b.v_ckpt = (steps.div_ceil(k) - 1) * bn;
    b.v4_db_carry = super::backei_v4::db_carry_floats(v4.grid, v4.co_t);
    p.window = Some(k);
    Ok(())
}

/// Whether z can be kept as a one-byte code (`z_code` in `cuda/common.cuh`, the CPU engine's
/// `Neuron::z_code`): with the exact step functions and the rectangle surrogate the backward reads
/// only sign(z) and whether z lies inside the rectangle.
pub fn z_code_is_exact(neuron: &NeuronConfig) -> bool {
    matches!(neuron.mode, FiringMode::Exact) && matches!(neuron.surrogate, Surrogate::Rectangle { .. })
}

/// Which saved tensors a v4 plan keeps compact ([`apply_compact`]); v1–v3 keep everything in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactState {
    /// z as its one-byte code (only where [`z_code_is_exact`]).
    pub z: bool,
    /// s, the layer's output, as int8 (only with exact firing, and where the output's reader
    /// takes int8: the network's pooling after a BackEI layer).
    pub s: bool,
}

impl CompactState {
    /// What a layer with `neuron` may keep compact: z when `z` is asked and its code is exact, s
    /// when `s8_reader` (the layer's output is read as int8) and the firing is exact.
    pub fn of(neuron: &NeuronConfig, z: bool, s8_reader: bool) -> Self {
        CompactState { z: z && z_code_is_exact(neuron), s: s8_reader && matches!(neuron.mode, FiringMode::Exact) }
    }
}

/// The compact saved state of a v4 plan (apply after [`apply_recompute`]): with the E/I gate on,
/// z as a one-byte code (`V4_ZCODE`) in ⌈len/4⌉ f32 words; s as int8 (`V4_S8`) in ⌈T·B·N/4⌉
/// words. Every other output is the same bits; a plan of v1–v3 is left as it is.
pub fn apply_compact(p: &mut LaunchPlan, fb: &FeedbackConfig, c: CompactState) {
    let Some(v4) = p.v4.as_mut() else { return };
    if c.z && fb.ei && !v4.z_code {
        v4.code_z();
        p.buffers.z = p.buffers.z.div_ceil(4);
    }
    if c.s && !v4.s8 {
        v4.store_s8();
        p.buffers.out = p.buffers.out.div_ceil(4);
    }
}

/// `--recompute K` needs K ≥ 1 (None: every step kept).
pub fn check_recompute(recompute: Option<usize>) -> Result<()> {
    if recompute == Some(0) {
        return Err(config_err("--recompute", "K = 0: K is the number of steps kept between checkpoints, at least 1"));
    }
    Ok(())
}

/// The v4 plan (tensor cores, `precision`) when [`plan_v4`] finds one for the shape and device,
/// else v3's plan (itself falling back to v1 where it must) with v4's reason in `fallback`. The
/// plain layer (back and ei off) keeps its own kernels. v4 is deterministic by construction (its
/// weight gradients are reduced in a fixed order), so `--deterministic` takes the same plan.
pub fn plan_tensor_cores(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    precision: Precision,
) -> Result<LaunchPlan> {
    plan_tensor_cores_with(shape, fb, batch, steps, limits, precision, &V4Choices::default())
}

/// [`plan_tensor_cores`] with the run's v4 choices: the tiling asked for (an error, naming
/// `BACKEI_V4_TILING` and the feasible tilings, where v4 runs the shape but no tiling meets the
/// request) and the phases' order.
pub fn plan_tensor_cores_with(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    precision: Precision,
    choices: &V4Choices,
) -> Result<LaunchPlan> {
    let mut p = plan(shape, fb, batch, steps, limits)?;
    if p.path == LayerPath::Plain {
        return Ok(p);
    }
    let v = match plan_v4_tiled(shape, fb, batch, steps, limits, precision, choices.tiling.as_ref()) {
        Ok(mut v) => {
            if choices.neighbour_sync {
                v.order_by_neighbours();
            }
            if choices.prefetch_l2 {
                v.prefetch_epilogue_inputs();
            }
            if choices.span_samples {
                v.span_samples_in(shape, fb, limits, batch);
            }
            v
        }
        Err(why) if choices.tiling.is_some() && plan_v4(shape, fb, batch, steps, limits, precision).is_ok() => {
            return Err(config_err(TILING_ENV, why));
        }
        Err(why) => {
            let mut q = plan_version(shape, fb, batch, steps, limits, KernelVersion::V3)?;
            q.fallback = Some(match q.fallback {
                Some(more) => format!("v4: {why}; v3: {more}"),
                None => format!("v4: {why}"),
            });
            return Ok(q);
        }
    };
    let coop = |kernel| KernelLaunch {
        module: V4_MODULE,
        kernel,
        grid: (v.grid, 1, 1),
        block: V4_THREADS,
        smem_bytes: v.smem_bytes,
        cooperative: true,
    };
    p.forward = coop(v.forward);
    p.backward = coop(v.backward);
    p.wgrad = WgradPath::Fused;
    p.wgrad_launch = None;
    p.wgrad_reduce = None;
    p.weights_in_smem_forward = v.dims.w_resident == 1;
    p.weights_in_smem_backward = v.dims.w_resident == 1;
    let bn = p.buffers.dv;
    // (v4 keeps no per-step dz; where it stores dz once, the ring of min(D, T) steps: D < T)
    p.buffers.dz = if v.dz_ring { fb.delay * bn } else { 0 };
    p.buffers.da = if fb.back { bn } else { 0 };
    p.buffers.v4_wfrag = v.wfrag_bytes / 4;
    p.buffers.v4_winv = v.winv;
    p.buffers.v4_dw_part = v.dw_part;
    p.buffers.v4_rowmax = v.rowmax;
    p.buffers.v4_db_carry = v.db_carry;
    p.version = KernelVersion::V4;
    p.tile = None;
    p.v4 = Some(v);
    Ok(p)
}

/// One v2 tile job as the device's `tile_job` computes it, for the pixel thread `tp`: (sample,
/// first channel, first row, per j < 4 the pixel y·W + x or None past the tile, per j the halo
/// index of tap (0, 0)). The CPU mirror of the kernel's index arithmetic (tested below).
pub fn v2_tile_job(
    shape: [usize; 3],
    r: usize,
    td: &TileDims,
    job: usize,
    tp: usize,
) -> (usize, usize, usize, [Option<usize>; 4], [usize; 4]) {
    let [_, h, w] = shape;
    let (rows, rgs, cgs, co_t) = (td.rows as usize, td.row_groups as usize, td.ch_groups as usize, td.co_t as usize);
    let np_threads = V2_THREADS as usize / (co_t / td.cpt as usize);
    let rg = job % rgs;
    let rest = job / rgs;
    let b = rest / cgs;
    let co0 = (rest - b * cgs) * co_t;
    let y0 = rg * rows;
    let npix = rows.min(h.saturating_sub(y0)) * w;
    let hs = w + 2 * r;
    let mut pix = [None; 4];
    let mut base = [0; 4];
    for j in 0..4 {
        let p = tp + j * np_threads;
        if p < npix {
            pix[j] = Some(y0 * w + p);
            base[j] = (p / w) * hs + p % w;
        }
    }
    (b, co0, y0, pix, base)
}

/// The kernels' `LayerDims` for a layer, a batch shape and the parameter slots (`w_smem`: the gate
/// weights are staged in shared memory; `wgrad_fused`: the OnChip weight-gradient path). Used by
/// the launches below and by the CPU emulation of the kernels in the tests.
#[allow(clippy::too_many_arguments)]
pub fn layer_dims(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    slots: &BackEiSlots,
    t_in: usize,
    w_smem: bool,
    wgrad_fused: bool,
) -> Result<LayerDims> {
    Ok(LayerDims {
        off_wb: slots[0].start as i64,
        off_bb: slots[1].start as i64,
        off_we: slots[2].start as i64,
        off_be: slots[3].start as i64,
        c: to_i32("C", shape[0])?,
        h: to_i32("H", shape[1])?,
        w: to_i32("W", shape[2])?,
        r: to_i32("radius", fb.radius)?,
        t: to_i32("steps", steps)?,
        b: to_i32("batch", batch)?,
        t_in: to_i32("T_in", t_in)?,
        d: to_i32("delay", fb.delay)?,
        back: fb.back as i32,
        ei: fb.ei as i32,
        w_smem: w_smem as i32,
        wgrad_fused: wgrad_fused as i32,
    })
}

fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BackeiError {
    move |e| BackeiError::Cuda(format!("{what}: {e:?}"))
}

/// A device buffer of `n` floats, or None for n = 0.
fn alloc(dev: &GpuDevice, n: usize) -> Result<Option<CudaSlice<f32>>> {
    if n == 0 {
        return Ok(None);
    }
    // SAFETY: every element is written by a kernel before it is read (see the kernels' docs);
    // tests poison these buffers with NaN to prove it.
    let b = unsafe { dev.stream.alloc::<f32>(n) }
        .map_err(|e| BackeiError::Cuda(format!("allocating {} MiB for a BackEI layer: {e:?} (reduce the batch or T)", (n * 4) >> 20)))?;
    Ok(Some(b))
}

/// Where a layer's buffers come from: its own allocations ([`GpuBackEiLayer::prepare`]) or memory
/// a caller lends for one call ([`GpuBackEiLayer::prepare_lent`]: the C ABI's workspace).
pub trait BufferSource {
    /// `n` floats for the buffer `which` (a field name of [`BufferSizes`]); None for n = 0.
    fn floats(&mut self, which: &'static str, n: usize) -> Result<Option<CudaSlice<f32>>>;
    /// The cooperative kernels' sync buffer, `words` u32 ([`LaunchPlan::sync_words`]; zeroed
    /// before every launch that uses it).
    fn barrier(&mut self, words: usize) -> Result<CudaSlice<u32>>;
}

/// The layer's own buffers, allocated on its device's stream.
struct OwnAllocations<'a>(&'a GpuDevice);

impl BufferSource for OwnAllocations<'_> {
    fn floats(&mut self, _which: &'static str, n: usize) -> Result<Option<CudaSlice<f32>>> {
        alloc(self.0, n)
    }
    fn barrier(&mut self, words: usize) -> Result<CudaSlice<u32>> {
        self.0.stream.alloc_zeros::<u32>(words).map_err(cuda_err("allocating the grid barrier"))
    }
}

/// The interface of a GPU BackEI layer, kept by the fused layer ([`GpuBackEiLayer`]) and the
/// unfused baseline (`gpu::backei_unfused::UnfusedBackEiLayer`), so that tests and benchmarks drive
/// either with one body.
pub trait GpuLayer {
    /// All T steps for a batch (see [`GpuBackEiLayer::forward`]).
    fn forward(
        &mut self,
        params: &CudaSlice<f32>,
        slots: &BackEiSlots,
        input: &CudaView<f32>,
        t_in: usize,
        batch: usize,
        steps: usize,
    ) -> Result<()>;
    /// BPTT, gradients accumulated into `grads` (see [`GpuBackEiLayer::backward`]).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        params: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        slots: &BackEiSlots,
        input: &CudaView<f32>,
        t_in: usize,
        grad_out: &CudaView<f32>,
        grad_in: &mut CudaViewMut<f32>,
    ) -> Result<()>;
    /// (s, v, g, z) of the last forward; g and z when their gates are on.
    fn saved(&self) -> Result<(&CudaSlice<f32>, &CudaSlice<f32>, Option<&CudaSlice<f32>>, Option<&CudaSlice<f32>>)>;
}

/// The extra arguments of the cooperative tiled kernels (v2/v3), or None for the other plans: the
/// grid barrier (zeroed here, before the launch, as grid_sync requires), the staged-weights
/// scratch and the tiling.
fn tiled_args<'a>(
    plan: &LaunchPlan,
    stream: &Arc<CudaStream>,
    bar: Option<&'a mut CudaSlice<u32>>,
    staged_weights: Option<&'a CudaSlice<f32>>,
) -> Result<Option<(&'a CudaSlice<u32>, &'a CudaSlice<f32>, TileDims)>> {
    if !plan.version.is_tiled() || plan.path != LayerPath::Fused {
        return Ok(None);
    }
    let missing = |what: &str| BackeiError::Cuda(format!("BackEI layer: {what} missing for the tiled kernels"));
    let td = plan.tile.ok_or_else(|| missing("the tiling"))?;
    let bar = bar.ok_or_else(|| missing("the grid barrier"))?;
    stream.memset_zeros(bar).map_err(cuda_err("zeroing the grid barrier"))?;
    let ws = staged_weights.ok_or_else(|| missing("the staged weights"))?;
    Ok(Some((&*bar, ws, td)))
}

/// Opts a kernel in to more than the default 48 KiB of dynamic shared memory when its launch needs it.
pub(crate) fn opt_in_smem(f: &CudaFunction, l: &KernelLaunch) -> Result<()> {
    if l.smem_bytes > SMEM_DEFAULT_LIMIT {
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, l.smem_bytes as i32)
            .map_err(|e| BackeiError::Cuda(format!("{}: opting in to {} bytes of shared memory: {e:?}", l.kernel, l.smem_bytes)))?;
    }
    Ok(())
}

pub struct GpuBackEiLayer {
    pub dev: Arc<GpuDevice>,
    pub feedback: FeedbackConfig,
    pub neuron: NeuronConfig,
    /// [C, H, W]
    pub shape: [usize; 3],
    pub limits: DeviceLimits,
    /// The plan of the current batch shape (after `prepare` or `forward`).
    pub plan: Option<LaunchPlan>,
    /// Bit-reproducible gradients (`--deterministic`): see [`plan_deterministic`].
    pub deterministic: bool,
    planned_deterministic: bool,
    batch: usize,
    steps: usize,
    /// s [T][B][N] of the last forward.
    pub out: Option<CudaSlice<f32>>,
    /// v [T][B][N] of the last forward.
    pub v: Option<CudaSlice<f32>>,
    /// g [T][B][N] (back on).
    pub g: Option<CudaSlice<f32>>,
    /// z [T][B][N] (ei on).
    pub z: Option<CudaSlice<f32>>,
    /// Backward scratch (public so that tests can poison it): dv [B][N].
    pub dv: Option<CudaSlice<f32>>,
    /// Backward scratch: the feedback ring [min(D, T)][B][N].
    pub fb: Option<CudaSlice<f32>>,
    /// Backward scratch: dz, [B][N] or [T][B][N] (`BufferSizes::dz`).
    pub dz: Option<CudaSlice<f32>>,
    /// Backward scratch: da, [B][N] or [T][B][N] (`BufferSizes::da`).
    pub da: Option<CudaSlice<f32>>,
    /// Deterministic tiled plans: the weight-gradient partial sums [wg_split][C²k² + C].
    pub wg_partials: Option<CudaSlice<f32>>,
    /// Tiled plans: the gate weights in the kernels' staging layout (rebuilt by every launch).
    pub staged_weights: Option<CudaSlice<f32>>,
    /// Stands in for an absent buffer in a kernel's argument list (never dereferenced).
    pub(crate) dummy: CudaSlice<f32>,
    /// T_in of the last forward.
    t_in: usize,
    /// The fused kernels asked for (`$BACKEI_BACKEI_KERNEL` at construction, V1 by default); the
    /// plan says which ones run (`plan.version`: V2 falls back to V1 where it cannot run).
    pub version: KernelVersion,
    /// The version the current plan was made for.
    planned_version: KernelVersion,
    /// The cooperative kernels' sync buffer: v2/v3's grid barrier word, v4's barrier and phase
    /// counts ([`LaunchPlan::sync_words`]; zeroed before every cooperative launch).
    pub(crate) bar: Option<CudaSlice<u32>>,
    /// v4: the tiling asked for and the phases' order (`$BACKEI_V4_TILING`, `$BACKEI_V4_SYNC` at
    /// construction; a network sets its step's, which its memory plan counted).
    pub v4_choices: V4Choices,
    planned_v4_choices: V4Choices,
    /// The tensor-core products' precision (v4; the other versions compute in f32).
    pub precision: Precision,
    planned_precision: Precision,
    /// v4 scratch (public so that tests can poison it): the weight fragments, their inverse
    /// scales, the per-range partial weight gradients (`BufferSizes::v4_*`).
    pub v4_wfrag: Option<CudaSlice<f32>>,
    pub v4_winv: Option<CudaSlice<f32>>,
    pub v4_dw_part: Option<CudaSlice<f32>>,
    /// `--recompute K` (None: every step kept): see [`apply_recompute`].
    pub recompute: Option<usize>,
    planned_recompute: Option<usize>,
    /// v4: keep z as a one-byte code where that is exact (the default; see [`apply_compact`]).
    /// Off, z is saved in f32 as by v1–v3 (tests that compare z itself).
    pub compact_z: bool,
    planned_compact_z: bool,
    /// v4 with exact firing: write the output s as int8 ([`apply_compact`]) — only for a reader
    /// that takes int8 (the network sets it for a BackEI layer followed by pooling); off by
    /// default: `output()` is then f32, as the C ABI and the PyTorch layers hand it to their users.
    pub compact_s: bool,
    planned_compact_s: bool,
    /// `--recompute`: v at the end of every window but the last, and the backward's carried bias
    /// partial sums (`BufferSizes::v_ckpt`, `v4_db_carry`).
    pub v_ckpt: Option<CudaSlice<f32>>,
    pub v4_db_carry: Option<CudaSlice<f32>>,
    /// v4 in fp32 mode: the row maxima of the staged operands (`BufferSizes::v4_rowmax`).
    pub v4_rowmax: Option<CudaSlice<f32>>,
}

impl GpuBackEiLayer {
    pub fn new(dev: &Arc<GpuDevice>, shape: [usize; 3], feedback: FeedbackConfig, neuron: &NeuronConfig) -> Result<Self> {
        validate(shape, &feedback, 1, 1)?;
        let version = KernelVersion::from_env()?;
        let v4_choices = V4Choices::from_env()?;
        let limits = DeviceLimits::of(dev)?;
        let dummy = dev.stream.alloc_zeros::<f32>(1).map_err(cuda_err("allocating"))?;
        Ok(GpuBackEiLayer {
            dev: dev.clone(),
            feedback,
            neuron: *neuron,
            shape,
            limits,
            plan: None,
            batch: 0,
            steps: 0,
            out: None,
            v: None,
            g: None,
            z: None,
            dv: None,
            fb: None,
            dz: None,
            da: None,
            wg_partials: None,
            staged_weights: None,
            dummy,
            t_in: 0,
            version,
            planned_version: version,
            deterministic: false,
            planned_deterministic: false,
            bar: None,
            v4_choices,
            planned_v4_choices: v4_choices,
            precision: Precision::Fp32,
            planned_precision: Precision::Fp32,
            v4_wfrag: None,
            v4_winv: None,
            v4_dw_part: None,
            recompute: None,
            planned_recompute: None,
            compact_z: true,
            planned_compact_z: true,
            compact_s: false,
            planned_compact_s: false,
            v_ckpt: None,
            v4_db_carry: None,
            v4_rowmax: None,
        })
    }

    /// Neurons per sample.
    pub fn neurons(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of W_b (and of W_e): C·C·(2r+1)².
    pub fn gate_weight_len(&self) -> usize {
        let k = 2 * self.feedback.radius + 1;
        self.shape[0] * self.shape[0] * k * k
    }

    /// Plans and sizes every buffer for a batch shape (a no-op when unchanged).
    pub fn prepare(&mut self, batch: usize, steps: usize) -> Result<&LaunchPlan> {
        if self.plan.is_none()
            || self.batch != batch
            || self.steps != steps
            || self.planned_version != self.version
            || self.planned_deterministic != self.deterministic
            || self.planned_precision != self.precision
            || self.planned_recompute != self.recompute
            || self.planned_compact_z != self.compact_z
            || self.planned_compact_s != self.compact_s
            || self.planned_v4_choices != self.v4_choices
        {
            let dev = self.dev.clone();
            self.install(batch, steps, &mut OwnAllocations(&dev))?;
        }
        self.plan.as_ref().ok_or_else(|| BackeiError::Cuda("BackEI layer: no plan".into()))
    }

    /// The plan `prepare` makes for a batch shape with this layer's version, determinism and
    /// device limits (nothing is allocated).
    pub fn plan_for(&self, batch: usize, steps: usize) -> Result<LaunchPlan> {
        let compact = CompactState::of(&self.neuron, self.compact_z, self.compact_s);
        plan_layer(
            self.shape,
            &self.feedback,
            batch,
            steps,
            &self.limits,
            self.version,
            self.precision,
            self.deterministic,
            self.recompute,
            compact,
            &self.v4_choices,
        )
    }

    /// `prepare` with every buffer lent by `source` for one call (the C ABI and the PyTorch
    /// layers, whose callers own all memory), and `t_in` the T_in of the forward whose state the
    /// lent buffers hold (a backward checks against it). Always re-plans. The lender must take the
    /// buffers back with [`Self::take_buffers`] before the layer could drop them: a `CudaSlice`
    /// frees its memory when dropped.
    pub fn prepare_lent(&mut self, batch: usize, steps: usize, t_in: usize, source: &mut dyn BufferSource) -> Result<&LaunchPlan> {
        self.install(batch, steps, source)?;
        self.t_in = t_in;
        self.plan.as_ref().ok_or_else(|| BackeiError::Cuda("BackEI layer: no plan".into()))
    }

    /// Takes every buffer out of the layer (lent ones go back to their lender), so the next
    /// `prepare` re-plans and allocates.
    pub fn take_buffers(&mut self) -> (Vec<CudaSlice<f32>>, Option<CudaSlice<u32>>) {
        let floats = [
            &mut self.out,
            &mut self.v,
            &mut self.g,
            &mut self.z,
            &mut self.dv,
            &mut self.fb,
            &mut self.dz,
            &mut self.da,
            &mut self.wg_partials,
            &mut self.staged_weights,
            &mut self.v4_wfrag,
            &mut self.v4_winv,
            &mut self.v4_dw_part,
            &mut self.v_ckpt,
            &mut self.v4_db_carry,
            &mut self.v4_rowmax,
        ];
        self.plan = None;
        (floats.into_iter().filter_map(Option::take).collect(), self.bar.take())
    }

    /// Plans a batch shape and takes every buffer the plan needs from `source`.
    fn install(&mut self, batch: usize, steps: usize, source: &mut dyn BufferSource) -> Result<()> {
        let p = self.plan_for(batch, steps)?;
        let b = p.buffers;
        // free the old buffers before allocating the new ones
        (self.out, self.v, self.g, self.z, self.dv, self.fb, self.dz, self.da) = (None, None, None, None, None, None, None, None);
        self.wg_partials = None;
        self.staged_weights = None;
        (self.v4_wfrag, self.v4_winv, self.v4_dw_part, self.v_ckpt, self.v4_db_carry, self.v4_rowmax) =
            (None, None, None, None, None, None);
        self.out = source.floats("out", b.out)?;
        self.v = source.floats("v", b.v)?;
        self.g = source.floats("g", b.g)?;
        self.z = source.floats("z", b.z)?;
        self.dv = source.floats("dv", b.dv)?;
        self.fb = source.floats("fb", b.fb)?;
        self.dz = source.floats("dz", b.dz)?;
        self.da = source.floats("da", b.da)?;
        self.wg_partials = source.floats("wg_partials", b.wg_partials)?;
        self.staged_weights = source.floats("staged_weights", b.staged_weights)?;
        self.v4_wfrag = source.floats("v4_wfrag", b.v4_wfrag)?;
        self.v4_winv = source.floats("v4_winv", b.v4_winv)?;
        self.v4_dw_part = source.floats("v4_dw_part", b.v4_dw_part)?;
        self.v_ckpt = source.floats("v_ckpt", b.v_ckpt)?;
        self.v4_db_carry = source.floats("v4_db_carry", b.v4_db_carry)?;
        self.v4_rowmax = source.floats("v4_rowmax", b.v4_rowmax)?;
        let words = p.sync_words();
        if words > 0 && self.bar.as_ref().is_none_or(|b| b.len() < words) {
            self.bar = None;
            self.bar = Some(source.barrier(words)?);
        }
        self.plan = Some(p);
        self.batch = batch;
        self.steps = steps;
        self.planned_version = self.version;
        self.planned_deterministic = self.deterministic;
        self.planned_precision = self.precision;
        self.planned_v4_choices = self.v4_choices;
        self.planned_recompute = self.recompute;
        self.planned_compact_z = self.compact_z;
        self.planned_compact_s = self.compact_s;
        Ok(())
    }

    fn dims(&self, slots: &BackEiSlots, t_in: usize, w_smem: bool, wgrad_fused: bool) -> Result<LayerDims> {
        layer_dims(self.shape, &self.feedback, self.batch, self.steps, slots, t_in, w_smem, wgrad_fused)
    }

    fn function(&self, l: &KernelLaunch) -> Result<CudaFunction> {
        let f = self.dev.kernels.function(l.module, l.kernel)?;
        opt_in_smem(&f, l)?;
        Ok(f)
    }

    /// The blocks of a cooperative kernel that can be co-resident on the device (occupancy API).
    pub(crate) fn resident_blocks(&self, f: &CudaFunction, l: &KernelLaunch) -> Result<u32> {
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(l.block, l.smem_bytes as usize, None)
            .map_err(|e| BackeiError::Cuda(format!("{}: occupancy query: {e:?}", l.kernel)))?;
        Ok(per_sm.saturating_mul(self.limits.sm_count))
    }

    /// The launch configuration of a cooperative kernel: the plan's grid, clamped to the blocks the
    /// occupancy API says are co-resident (the driver refuses a larger cooperative grid).
    fn coop_config(&self, f: &CudaFunction, l: &KernelLaunch) -> Result<LaunchConfig> {
        let resident = self.resident_blocks(f, l)?;
        if resident == 0 {
            return Err(BackeiError::Cuda(format!(
                "{}: no block of {} threads with {} B shared memory can be resident (use {KERNEL_ENV}=v1)",
                l.kernel, l.block, l.smem_bytes
            )));
        }
        let mut cfg = l.config();
        cfg.grid_dim.0 = cfg.grid_dim.0.min(resident).max(1);
        Ok(cfg)
    }

    /// All T steps for a batch; the output s [T][B][C][H][W] is then `self.output()`.
    pub fn forward(
        &mut self,
        params: &CudaSlice<f32>,
        slots: &BackEiSlots,
        input: &CudaView<f32>,
        t_in: usize,
        batch: usize,
        steps: usize,
    ) -> Result<()> {
        self.forward_with(params, slots, LayerInput::Whole(input), t_in, batch, steps, Epilogue::None)
    }

    /// Whether this layer's forward at a batch shape can also pool its output
    /// ([`Epilogue::Pool`]: its plan runs the v4 kernels); call after `prepare`.
    pub fn pools_in_forward(&self) -> bool {
        self.plan.as_ref().is_some_and(|p| p.v4.is_some())
    }

    /// Whether this layer can run the readout and the loss inside its own kernels
    /// ([`Epilogue::Readout`], `backward_from_loss`: a plain layer, whose thread owns one (b, k)
    /// output over all T).
    pub fn fuses_readout(&self) -> bool {
        !self.feedback.back && !self.feedback.ei
    }

    /// `forward` from `input` (every step, or window by window: [`InputWindows`]), and in the
    /// same launch what `epilogue` asks of its spikes.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &mut self,
        params: &CudaSlice<f32>,
        slots: &BackEiSlots,
        mut input: LayerInput,
        t_in: usize,
        batch: usize,
        steps: usize,
        epilogue: Epilogue,
    ) -> Result<()> {
        let pool_q8 = matches!(epilogue, Epilogue::PoolCodes(_));
        let (readout, pooled) = match epilogue {
            Epilogue::None => (None, None),
            Epilogue::Readout(y) => {
                if !self.fuses_readout() {
                    return Err(config_err("readout", "only a plain spiking layer (back and ei off) computes the readout in its forward"));
                }
                if y.len() != batch * self.neurons() {
                    return Err(shape_err("readout", format!("{}", batch * self.neurons()), format!("{}", y.len())));
                }
                (Some(y), None)
            }
            Epilogue::Pool(y) | Epilogue::PoolCodes(y) => {
                let [c, h, w] = self.shape;
                let values = steps * batch * c * (h / 2) * (w / 2);
                let (want, what) =
                    if pool_q8 { (values.div_ceil(4), "pooled output (int8 codes, in f32 words)") } else { (values, "pooled output") };
                if y.len() != want {
                    return Err(shape_err(what, format!("{want}"), format!("{}", y.len())));
                }
                (None, Some(y))
            }
        };
        let n = self.neurons();
        check_forward_input(t_in, batch, steps, n, input.whole_len(t_in, steps, batch * n)?)?;
        let plan = self.prepare(batch, steps)?.clone();
        check_slots(self.shape, &self.feedback, slots, params.len(), "parameter")?;
        if pool_q8 && !self.spikes_s8() {
            return Err(config_err("pooling", "int8 codes of the pooled spikes need the layer's spikes as int8 (compact state)"));
        }
        self.t_in = t_in;
        let np = NeuronParams::from_config(&self.neuron);
        if let Some(v4) = &plan.v4 {
            // (a readout passed the check above: a plain layer, whose plan is never v4)
            let dims = self.dims(slots, t_in, false, false)?;
            return super::backei_v4::forward(self, v4, plan.window, params, &mut input, dims, np, pooled, pool_q8);
        }
        let input = input.whole()?;
        if pooled.is_some() {
            return Err(config_err("pooling", "only the v4 kernels pool their output in the forward (see pools_in_forward)"));
        }
        let l = plan.forward;
        let f = self.function(&l)?;
        let stream = self.dev.stream.clone();
        let dims = self.dims(slots, t_in, plan.weights_in_smem_forward, plan.wgrad == WgradPath::OnChip)?;
        let coop_cfg = if l.cooperative { Some(self.coop_config(&f, &l)?) } else { None };
        let (out, v) = match (self.out.as_mut(), self.v.as_mut()) {
            (Some(o), Some(v)) => (o, v),
            _ => return Err(BackeiError::Cuda("BackEI layer: output buffers missing".into())),
        };
        match plan.path {
            LayerPath::Plain => {
                let (nn, t, ti) = ((batch * n) as i64, steps as i32, t_in as i32);
                match readout {
                    // SAFETY: the argument list matches spiking_forward_v1_f32; lengths checked above.
                    None => {
                        unsafe {
                            stream.launch_builder(&f).arg(input).arg(out).arg(v).arg(&nn).arg(&t).arg(&ti).arg(&np).launch(l.config())
                        }
                        .map_err(cuda_err("launching spiking_forward_v1_f32"))?;
                    }
                    Some(y) => {
                        let inv_steps = 1.0f32 / steps as f32;
                        let f = self.dev.kernels.function(l.module, READOUT_FORWARD)?;
                        // SAFETY: the argument list matches spiking_readout_forward_v1_f32; y holds
                        // B·N (checked by forward_with), the rest as above. The same grid-stride
                        // launch as the plain forward.
                        unsafe {
                            stream
                                .launch_builder(&f)
                                .arg(input)
                                .arg(out)
                                .arg(v)
                                .arg(y)
                                .arg(&inv_steps)
                                .arg(&nn)
                                .arg(&t)
                                .arg(&ti)
                                .arg(&np)
                                .launch(l.config())
                        }
                        .map_err(cuda_err("launching spiking_readout_forward_v1_f32"))?;
                    }
                }
            }
            LayerPath::Fused => {
                let tiled = tiled_args(&plan, &stream, self.bar.as_mut(), self.staged_weights.as_ref())?;
                // the dummy stands in for a disabled gate's buffer, which the kernel never touches
                let g = self.g.as_ref().unwrap_or(&self.dummy);
                let z = self.z.as_ref().unwrap_or(&self.dummy);
                let mut b = stream.launch_builder(&f);
                b.arg(params).arg(input).arg(&mut *out).arg(&mut *v).arg(g).arg(z);
                if let Some((bar, ws, _)) = &tiled {
                    b.arg(*bar).arg(*ws);
                }
                b.arg(&dims).arg(&np);
                if let Some((_, _, td)) = &tiled {
                    b.arg(td);
                }
                // SAFETY: the argument list matches backei_forward_v1_f32 and, with the barrier,
                // the staged weights and the tiling, backei_forward_v{2,3}_r{1,2}_f32; lengths
                // checked above; the tiled kernels get a cooperative launch (grid ≤ co-resident
                // blocks), as their grid_sync requires.
                unsafe {
                    match coop_cfg {
                        Some(cfg) => b.launch_cooperative(cfg),
                        None => b.launch(l.config()),
                    }
                }
                .map_err(cuda_err(l.kernel))?;
            }
        }
        Ok(())
    }

    /// BPTT: ∂L/∂s [T][B][..] in, ∂L/∂I out ([T_in][B][..], summed over t when T_in = 1),
    /// parameter gradients ACCUMULATED into `grads` at `slots`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        params: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        slots: &BackEiSlots,
        input: &CudaView<f32>,
        t_in: usize,
        grad_out: &CudaView<f32>,
        grad_in: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        self.backward_with(params, grads, slots, LayerInput::Whole(input), t_in, grad_out, grad_in)
    }

    /// `backward` reading the input current from `input` (every step, or window by window:
    /// [`InputWindows`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with(
        &mut self,
        params: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        slots: &BackEiSlots,
        mut input: LayerInput,
        t_in: usize,
        grad_out: &CudaView<f32>,
        grad_in: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let plan = self.plan.clone().ok_or_else(|| config_err("backward", "BackEI layer backward called before forward"))?;
        let (batch, steps, n) = (self.batch, self.steps, self.neurons());
        check_backward_args(
            self.shape,
            &self.feedback,
            slots,
            (batch, steps, t_in),
            self.t_in,
            grad_out.len(),
            grad_in.len(),
            input.whole_len(t_in, steps, batch * n)?,
            (params.len(), grads.len()),
        )?;
        let np = NeuronParams::from_config(&self.neuron);
        if let Some(v4) = &plan.v4 {
            let dims = self.dims(slots, t_in, false, false)?;
            let gi = super::backei_v4::V4GradIn::default();
            return super::backei_v4::backward(self, v4, plan.window, params, grads, &mut input, grad_out, gi, grad_in, dims, np);
        }
        let input = input.whole()?;
        let stream = self.dev.stream.clone();
        let l = plan.backward;
        let f = self.function(&l)?;
        let v = self.v.as_ref().ok_or_else(|| BackeiError::Cuda("BackEI layer: v missing".into()))?;
        match plan.path {
            LayerPath::Plain => {
                let (nn, t, ti) = ((batch * n) as i64, steps as i32, t_in as i32);
                // SAFETY: the argument list matches spiking_backward_v1_f32; lengths checked above.
                unsafe {
                    stream.launch_builder(&f).arg(grad_out).arg(v).arg(grad_in).arg(&nn).arg(&t).arg(&ti).arg(&np).launch(l.config())
                }
                .map_err(cuda_err("launching spiking_backward_v1_f32"))?;
            }
            LayerPath::Fused => {
                let onchip = plan.wgrad == WgradPath::OnChip;
                let dims = self.dims(slots, t_in, plan.weights_in_smem_backward, onchip)?;
                let coop_cfg = if l.cooperative { Some(self.coop_config(&f, &l)?) } else { None };
                let wgrad = match plan.wgrad_launch {
                    Some(w) => Some((w, self.function(&w)?)),
                    None => None,
                };
                // deterministic tiled plans: partial sums into wg_partials, then the ordered reduction
                let reduce = match (plan.wgrad_reduce, self.wg_partials.as_ref()) {
                    (Some(rl), Some(buf)) => Some((rl, self.function(&rl)?, buf)),
                    (None, _) => None,
                    (Some(_), None) => return Err(BackeiError::Cuda("BackEI layer: the partial-sum buffer is missing".into())),
                };
                let tiled = tiled_args(&plan, &stream, self.bar.as_mut(), self.staged_weights.as_ref())?;
                let d = &self.dummy;
                let out = self.out.as_ref().unwrap_or(d);
                let g = self.g.as_ref().unwrap_or(d);
                let z = self.z.as_ref().unwrap_or(d);
                let dv = self.dv.as_ref().unwrap_or(d);
                let fb = self.fb.as_ref().unwrap_or(d);
                let dz = self.dz.as_ref().unwrap_or(d);
                let da = self.da.as_ref().unwrap_or(d);
                let mut b = stream.launch_builder(&f);
                b.arg(params).arg(&mut *grads).arg(input).arg(out).arg(v).arg(g).arg(z).arg(grad_out).arg(&mut *grad_in);
                b.arg(dv).arg(fb).arg(dz).arg(da);
                if let Some((bar, ws, _)) = &tiled {
                    b.arg(*bar).arg(*ws);
                }
                b.arg(&dims).arg(&np);
                if let Some((_, _, td)) = &tiled {
                    b.arg(td);
                }
                // SAFETY: the argument list matches backei_backward_v1_f32 and, with the barrier,
                // the staged weights and the tiling, backei_backward_v{2,3}_r{1,2}_f32; lengths
                // checked above (the Separate and tiled plans size dz and da for every step). The
                // scratch buffers are written by the kernel through pointers; cudarc's shared
                // references only pass their addresses, and no other work touches them meanwhile.
                unsafe {
                    match coop_cfg {
                        Some(cfg) => b.launch_cooperative(cfg),
                        None => b.launch(l.config()),
                    }
                }
                .map_err(cuda_err(l.kernel))?;
                let Some((w, wf)) = wgrad else { return Ok(()) };
                let k = 2 * self.feedback.radius + 1;
                let (wlen, c) = ((self.shape[0] * self.shape[0] * k * k) as i64, self.shape[0] as i32);
                let passes = [
                    (self.feedback.back, slots[0].start, slots[1].start, da, out, self.feedback.delay as i32),
                    (self.feedback.ei, slots[2].start, slots[3].start, dz, v, 0),
                ];
                let null = 0u64;
                for (on, ow, ob, dy, x, shift) in passes {
                    if !on {
                        continue;
                    }
                    let (ow, ob) = (ow as i64, ob as i64);
                    let mut b = stream.launch_builder(&wf);
                    b.arg(&mut *grads).arg(&ow).arg(&ob).arg(dy).arg(x).arg(&shift).arg(&dims);
                    if let Some((_, _, td)) = &tiled {
                        b.arg(td);
                        match &reduce {
                            Some((_, _, buf)) => b.arg(*buf),
                            None => b.arg(&null),
                        };
                    }
                    // SAFETY: the argument list matches backei_wgrad_v1_f32 and, with the tiling and
                    // the partial sums (or null), backei_wgrad_tiled_r{1,2}_f32; dy and x hold
                    // [T][B][N]; partials hold wg_split slices of C²k² + C.
                    unsafe { b.launch(w.config()) }.map_err(cuda_err(w.kernel))?;
                    if let (Some((rl, rf, buf)), Some((_, _, td))) = (&reduce, &tiled) {
                        let splits = td.wg_split;
                        // SAFETY: the argument list matches backei_wgrad_reduce_f32; the slices
                        // were written by the launch above (same stream).
                        unsafe {
                            stream
                                .launch_builder(rf)
                                .arg(&mut *grads)
                                .arg(&ow)
                                .arg(&ob)
                                .arg(*buf)
                                .arg(&splits)
                                .arg(&wlen)
                                .arg(&c)
                                .launch(rl.config())
                        }
                        .map_err(cuda_err(rl.kernel))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// BPTT from the gradient of the network's 2×2 average pooling after this layer, dy_pooled
    /// [T][B][C][⌊H/2⌋][⌊W/2⌋], with `dropout` the dropout between them (its mask drawn again): the
    /// kernel takes ∂L/∂s through their backward on the fly (the bits of `pool::backward` or
    /// `dropout::backward_pooled`, then `backward`), so ∂L/∂s is never stored. The v4 kernels only
    /// ([`Self::pools_in_forward`]); otherwise as `backward`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_from_pooled(
        &mut self,
        params: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        slots: &BackEiSlots,
        mut input: LayerInput,
        t_in: usize,
        dy_pooled: &CudaView<f32>,
        dropout: Option<PoolDropout>,
        grad_in: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let plan = self.plan.clone().ok_or_else(|| config_err("backward", "BackEI layer backward called before forward"))?;
        let Some(v4) = &plan.v4 else {
            return Err(config_err("pooling", "only the v4 kernels take the pooling's gradient (see pools_in_forward)"));
        };
        let (batch, steps, n) = (self.batch, self.steps, self.neurons());
        let [c, h, w] = self.shape;
        let pooled = steps * batch * c * (h / 2) * (w / 2);
        if dy_pooled.len() != pooled {
            return Err(shape_err("pooling output gradient", format!("{pooled}"), format!("{}", dy_pooled.len())));
        }
        // the rest as `backward` checks it (∂L/∂s stands in at its full length)
        let sizes = (params.len(), grads.len());
        let (shape, fb) = (self.shape, self.feedback);
        let input_len = input.whole_len(t_in, steps, batch * n)?;
        check_backward_args(shape, &fb, slots, (batch, steps, t_in), self.t_in, steps * batch * n, grad_in.len(), input_len, sizes)?;
        let np = NeuronParams::from_config(&self.neuron);
        let dims = self.dims(slots, t_in, false, false)?;
        let mut gi = super::backei_v4::V4GradIn { pooled: 1, ..Default::default() };
        if let Some(d) = dropout {
            use cudarc::driver::DevicePtr;
            if d.slot >= d.keys.len() {
                return Err(shape_err("dropout key slot", format!("< {}", d.keys.len()), format!("{}", d.slot)));
            }
            gi.dropout = 1;
            (gi.p, gi.scale, gi.index0, gi.slot) = (d.p, super::dropout::scale(d.p), d.index0, d.slot as i32);
            gi.keys = d.keys.device_ptr(&self.dev.stream).0;
        }
        super::backei_v4::backward(self, v4, plan.window, params, grads, &mut input, dy_pooled, gi, grad_in, dims, np)
    }

    /// The network's last layer, backward from the loss: per-row losses, predictions and
    /// ∂L/∂y (into `lb`), the NaN/Inf rows into the loss status word, and BPTT with ∂L/∂s_t = ∂L/∂y / T, in
    /// one launch (`spiking_loss_backward_v1_f32`: the bits of `loss_grad_f32`,
    /// `count_nonfinite_f32` on the rows, `readout_backward_f32` and `backward`). `y` is the
    /// readout of this layer's last forward; `lb`'s labels are staged. Plain layers only.
    pub fn backward_from_loss(
        &mut self,
        lb: &mut LossBuffers,
        loss: Loss,
        y: &CudaView<f32>,
        grad_in: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let plan = self.plan.clone().ok_or_else(|| config_err("backward", "spiking layer backward called before forward"))?;
        if !self.fuses_readout() || plan.path != LayerPath::Plain {
            return Err(config_err("loss", "only a plain spiking layer computes the loss in its backward"));
        }
        let (batch, steps, n, t_in) = (self.batch, self.steps, self.neurons(), self.t_in);
        if lb.batch != batch || lb.classes != n {
            let want = format!("a batch of {batch} and {n} classes");
            return Err(shape_err("loss buffers", want, format!("a batch of {} and {} classes", lb.batch, lb.classes)));
        }
        if y.len() != batch * n {
            return Err(shape_err("readout", format!("{}", batch * n), format!("{}", y.len())));
        }
        if batch * n > i32::MAX as usize {
            let why =
                format!("{batch} samples × {n} classes: the fused loss indexes them in 32 bits (turn it off with BACKEI_FUSED_READOUT=0)");
            return Err(config_err("loss", why));
        }
        if grad_in.len() != t_in * batch * n {
            return Err(shape_err("spiking layer input gradient", format!("{}", t_in * batch * n), format!("{}", grad_in.len())));
        }
        let v = self.v.as_ref().ok_or_else(|| BackeiError::Cuda("spiking layer: v missing".into()))?;
        let l = plan.backward;
        let f = self.dev.kernels.function(l.module, LOSS_BACKWARD)?;
        let np = NeuronParams::from_config(&self.neuron);
        let (b, k, kind, t, ti) = (batch as i32, n as i32, matches!(loss, Loss::Ce) as i32, steps as i32, t_in as i32);
        let mut builder = self.dev.stream.launch_builder(&f);
        builder.arg(y).arg(&lb.labels).arg(&mut lb.dy).arg(&mut lb.row_loss).arg(&mut lb.pred);
        let mut word = lb.status.slice_mut(super::loss::STATUS_LOSS..super::loss::STATUS_LOSS + 1);
        builder.arg(&mut word);
        let (scales, inv_steps) = (LossScales::new(batch, n), 1.0f32 / steps as f32);
        builder.arg(v).arg(grad_in).arg(&b).arg(&k).arg(&kind).arg(&scales).arg(&inv_steps).arg(&t).arg(&ti).arg(&np);
        // SAFETY: the argument list matches spiking_loss_backward_v1_f32; the loss buffers hold B
        // rows of N = K classes, y B·N, v T·B·N (this layer's forward), grad_in T_in·B·N (checked
        // above). The plain backward's grid-stride launch over the same B·N neurons.
        unsafe { builder.launch(l.config()) }.map_err(cuda_err("launching spiking_loss_backward_v1_f32"))?;
        Ok(())
    }

    /// s of the last forward.
    pub fn output(&self) -> Result<&CudaSlice<f32>> {
        self.out.as_ref().ok_or_else(|| config_err("output", "the BackEI layer has no output yet: run forward first"))
    }

    /// Whether the output s is int8 (the plan's compact state; see `compact_s`): T·B·N bytes in
    /// the f32 words of `output()`.
    pub fn spikes_s8(&self) -> bool {
        self.plan.as_ref().and_then(|p| p.v4.as_ref()).is_some_and(|v| v.s8)
    }

    /// (firing rate, inhibitory fraction among fired) of the last forward, reduced on the GPU.
    pub fn spike_stats(&self) -> Result<(f64, f64)> {
        let out = self.output()?;
        let s8 = self.spikes_s8();
        let n = if s8 { self.steps * self.batch * self.neurons() } else { out.len() };
        let stream = &self.dev.stream;
        let mut counts = stream.alloc_zeros::<u64>(2).map_err(cuda_err("allocating the spike counters"))?;
        let f = self.dev.kernels.function("spiking", if s8 { "spike_counts_s8" } else { "spike_counts_f32" })?;
        let blocks = n.div_ceil(256).clamp(1, 4096) as u32;
        let nn = n as i64;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument list matches spike_counts_f32 and spike_counts_s8; out holds n
        // floats, or n bytes (s8).
        unsafe { stream.launch_builder(&f).arg(out).arg(&nn).arg(&mut counts).launch(cfg) }.map_err(cuda_err("launching spike_counts"))?;
        let c = stream.clone_dtoh(&counts).map_err(cuda_err("reading the spike counters"))?;
        let rate = c[0] as f64 / n.max(1) as f64;
        let inh = if c[0] == 0 { 0.0 } else { c[1] as f64 / c[0] as f64 };
        Ok((rate, inh))
    }
}

/// Implements [`GpuLayer`] by the type's inherent methods of the same names (both layers keep the
/// interface contract at the top of this file).
macro_rules! impl_gpu_layer {
    ($t:ty) => {
        impl $crate::gpu::backei_layer::GpuLayer for $t {
            fn forward(
                &mut self,
                params: &CudaSlice<f32>,
                slots: &BackEiSlots,
                input: &CudaView<f32>,
                t_in: usize,
                batch: usize,
                steps: usize,
            ) -> Result<()> {
                <$t>::forward(self, params, slots, input, t_in, batch, steps)
            }
            fn backward(
                &mut self,
                params: &CudaSlice<f32>,
                grads: &mut CudaSlice<f32>,
                slots: &BackEiSlots,
                input: &CudaView<f32>,
                t_in: usize,
                grad_out: &CudaView<f32>,
                grad_in: &mut CudaViewMut<f32>,
            ) -> Result<()> {
                <$t>::backward(self, params, grads, slots, input, t_in, grad_out, grad_in)
            }
            fn saved(&self) -> Result<(&CudaSlice<f32>, &CudaSlice<f32>, Option<&CudaSlice<f32>>, Option<&CudaSlice<f32>>)> {
                let v = self.v.as_ref().ok_or_else(|| config_err("v", "the layer has no v yet: run forward first"))?;
                Ok((self.output()?, v, self.g.as_ref(), self.z.as_ref()))
            }
        }
    };
}
pub(crate) use impl_gpu_layer;

impl_gpu_layer!(GpuBackEiLayer);

#[cfg(test)]
mod tests {

    #[test]
    fn deterministic_plans_never_use_float_atomics() {
        let fb = |r| FeedbackConfig { back: true, ei: true, radius: r, delay: 1 };
        let shapes = [([15, 24, 24], 2), ([40, 8, 8], 2), ([32, 28, 28], 1), ([64, 14, 14], 1), ([128, 32, 32], 1), ([15, 30, 30], 2)];
        for (shape, r) in shapes {
            let p = plan_deterministic(shape, &fb(r), 100, 20, &DeviceLimits::H100, KernelVersion::V1).unwrap();
            assert_eq!(p.version, KernelVersion::V1, "{shape:?}");
            assert_eq!(p.wgrad, WgradPath::Separate, "{shape:?}: OnChip adds per-block partials with atomicAdd");
            assert!(p.wgrad_launch.is_some());
            let n: usize = shape.iter().product();
            assert_eq!(p.buffers.da, 20 * 100 * n, "{shape:?}: da saved for every step");
            // the tiled kernels: one weight-gradient block per (c, ci) group, nothing else changes
            for v in [KernelVersion::V2, KernelVersion::V3] {
                let d = plan_deterministic(shape, &fb(r), 100, 20, &DeviceLimits::H100, v).unwrap();
                let q = plan_version(shape, &fb(r), 100, 20, &DeviceLimits::H100, v).unwrap();
                assert_eq!(d.version, v, "{shape:?}");
                assert!(q.wgrad_reduce.is_none() && q.buffers.wg_partials == 0, "{shape:?} {v:?}");
                let k = 2 * r + 1;
                let len = shape[0] * shape[0] * k * k + shape[0];
                assert_eq!(d.buffers.wg_partials, d.tile.unwrap().wg_split as usize * len, "{shape:?} {v:?}: one slice per split");
                let red = d.wgrad_reduce.unwrap();
                assert!(red.grid.0 as usize * red.block as usize >= len.min(4096 * 256), "{shape:?}: the reduction covers every element");
                assert_eq!((d.forward, d.backward, d.wgrad_launch), (q.forward, q.backward, q.wgrad_launch));
            }
        }
        // the default plan of fashion layer 1 is the OnChip one, so the switch matters
        assert_eq!(plan([32, 28, 28], &fb(1), 100, 20, &DeviceLimits::H100).unwrap().wgrad, WgradPath::OnChip);
    }
    use super::*;
    use crate::spec::{LayerSpec, NetworkSpec};

    /// (network, layer index, shape, feedback) of every spiking layer of the four networks.
    fn spiking_layers() -> Vec<(String, usize, [usize; 3], FeedbackConfig)> {
        let mut v = Vec::new();
        for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
            for (i, l) in spec.plan().unwrap().iter().enumerate() {
                let fb = match l.spec {
                    LayerSpec::BackEi => spec.feedback,
                    LayerSpec::Spiking => FeedbackConfig { back: false, ei: false, radius: 0, delay: 1 },
                    _ => continue,
                };
                v.push((spec.name.clone(), i, l.output, fb));
            }
        }
        v
    }

    #[test]
    fn device_structs_have_the_c_layout_of_the_kernels() {
        // LayerDims: 4 × i64 + 12 × i32 = 80 bytes (the PTX shows `.param .align 8 .b8 [80]`).
        assert_eq!(std::mem::size_of::<LayerDims>(), 80);
        assert_eq!(std::mem::align_of::<LayerDims>(), 8);
        assert_eq!(std::mem::size_of::<NeuronParams>(), 24);
        let np = NeuronParams::from_config(&NeuronConfig {
            mode: FiringMode::Smooth { k: 3.0 },
            surrogate: Surrogate::Atan { alpha: 2.0 },
            ..Default::default()
        });
        assert_eq!(np, NeuronParams { leak: 0.2, threshold: 0.5, surrogate: 2, width: 2.0, smooth: 1, k: 3.0 });
    }

    #[test]
    fn every_spiking_layer_of_the_four_networks_has_a_plan_that_fits_the_device() {
        let layers = spiking_layers();
        assert_eq!(layers.iter().filter(|l| l.3.back).count(), 2 + 2 + 3 + 2, "BackEI layers found: {layers:?}");
        for limits in [DeviceLimits::A100, DeviceLimits::H100] {
            for (net, i, shape, fb) in &layers {
                for batch in [1, 100, 256] {
                    for steps in [1, 20, 64] {
                        let p = plan(*shape, fb, batch, steps, &limits).unwrap_or_else(|e| panic!("{net} layer {i}: {e}"));
                        let n: usize = shape.iter().product();
                        let all = steps * batch * n;
                        assert_eq!((p.buffers.out, p.buffers.v), (all, all));
                        if !fb.back && !fb.ei {
                            assert_eq!(p.path, LayerPath::Plain);
                            assert_eq!(p.wgrad, WgradPath::None);
                            assert_eq!(p.forward.block, 256);
                            assert!(p.forward.grid.0 as usize * 256 >= (batch * n).min(256 << 20));
                            assert_eq!(p.buffers.total_bytes(), 8 * all, "plain saves only s and v");
                            continue;
                        }
                        assert_eq!(p.path, LayerPath::Fused, "{net} {i}");
                        for l in [p.forward, p.backward] {
                            assert_eq!(l.grid, (batch as u32, 1, 1), "one block per sample");
                            assert!(l.block % 32 == 0 && l.block <= 1024 && l.block as usize <= n.div_ceil(32) * 32);
                            assert!(l.smem_bytes <= limits.max_smem_per_block);
                        }
                        let (c, k) = (shape[0], 2 * fb.radius + 1);
                        let wlen = c * c * k * k;
                        assert_eq!(p.weights_in_smem_forward, 8 * wlen <= limits.max_smem_per_block as usize);
                        assert_eq!(p.forward.smem_bytes as usize, if p.weights_in_smem_forward { 8 * wlen } else { 0 });
                        let onchip = 8 * (wlen + c) <= limits.max_smem_per_block as usize;
                        assert_eq!(p.wgrad, if onchip { WgradPath::OnChip } else { WgradPath::Separate });
                        assert_eq!(p.wgrad_launch.is_some(), !onchip);
                        if let Some(w) = p.wgrad_launch {
                            assert_eq!((w.grid, w.block), ((c as u32, c as u32, 1), 256));
                        }
                        let per_step = if onchip { batch * n } else { all };
                        assert_eq!((p.buffers.g, p.buffers.z, p.buffers.dz, p.buffers.da), (all, all, per_step, per_step));
                        assert_eq!(p.buffers.fb, if steps > 1 { batch * n } else { 0 });
                    }
                }
            }
        }
    }

    #[test]
    fn the_paths_of_the_reference_shapes_are_the_documented_ones() {
        let fb = |r| FeedbackConfig { radius: r, ..Default::default() };
        let h = DeviceLimits::H100;
        let path = |shape, r| {
            let p = plan(shape, &fb(r), 100, 20, &h).unwrap();
            (p.wgrad, p.weights_in_smem_forward)
        };
        // mnist / nmnist layer 1: dW of both gates (2·(15²·25 + 15)·4 = 45 KB) on chip
        assert_eq!(path([15, 24, 24], 2), (WgradPath::OnChip, true));
        assert_eq!(path([15, 30, 30], 2), (WgradPath::OnChip, true));
        // mnist layer 2: 2·40²·25·4 = 320 KB: neither weights nor dW fit
        assert_eq!(path([40, 8, 8], 2), (WgradPath::Separate, false));
        // fashion layer 1: 2·(32²·9 + 32)·4 = 74 KB on chip; layer 2: 295 KB separate
        assert_eq!(path([32, 28, 28], 1), (WgradPath::OnChip, true));
        assert_eq!(path([64, 14, 14], 1), (WgradPath::Separate, false));
        // cifar10: all separate
        for s in [[128, 32, 32], [256, 16, 16], [512, 8, 8]] {
            assert_eq!(path(s, 1), (WgradPath::Separate, false));
        }
        // on an A100 (163 KB) fashion layer 1 still fits
        assert_eq!(plan([32, 28, 28], &fb(1), 100, 20, &DeviceLimits::A100).unwrap().wgrad, WgradPath::OnChip);
        // a device with 48 KB only: fashion layer 1 falls back
        let small = DeviceLimits { sm_count: 80, max_smem_per_block: 48 * 1024, max_smem_per_sm: 64 * 1024 };
        assert_eq!(plan([32, 28, 28], &fb(1), 100, 20, &small).unwrap().wgrad, WgradPath::Separate);
        // one gate only: fashion layer 2's W_e alone (147 KB) fits in the forward
        let ei_only = FeedbackConfig { back: false, ..fb(1) };
        let p = plan([64, 14, 14], &ei_only, 100, 20, &h).unwrap();
        assert!(p.weights_in_smem_forward);
        assert_eq!((p.buffers.g, p.buffers.da, p.buffers.fb), (0, 0, 0));
        // block size: min(1024, N rounded up to 32)
        assert_eq!(plan([1, 3, 5], &fb(1), 2, 3, &h).unwrap().forward.block, 32);
        assert_eq!(plan([15, 24, 24], &fb(2), 2, 3, &h).unwrap().forward.block, 1024);
        // the delay ring: D slots when D < T, none when the feedback never arrives
        assert_eq!(plan([2, 7, 9], &FeedbackConfig { delay: 3, ..fb(1) }, 2, 5, &h).unwrap().buffers.fb, 3 * 2 * 126);
        assert_eq!(plan([2, 7, 9], &FeedbackConfig { delay: 5, ..fb(1) }, 2, 5, &h).unwrap().buffers.fb, 0);
    }

    #[test]
    fn the_plain_layer_of_the_benchmark_is_one_grid_over_all_neurons() {
        let off = FeedbackConfig { back: false, ei: false, radius: 0, delay: 1 };
        let p = plan([64 * 65_536, 1, 1], &off, 1, 32, &DeviceLimits::H100).unwrap();
        assert_eq!(p.path, LayerPath::Plain);
        assert_eq!(p.forward.grid, (16_384, 1, 1));
        assert_eq!(p.forward.kernel, "spiking_forward_v1_f32");
        assert_eq!(p.buffers.total_bytes(), 2 * 32 * 64 * 65_536 * 4);
    }

    #[test]
    fn bad_settings_are_errors_not_panics() {
        let fb = FeedbackConfig::default();
        let h = DeviceLimits::H100;
        let msg = |r: Result<LaunchPlan>| r.unwrap_err().to_string();
        assert!(msg(plan([4, 4, 4], &fb, 0, 5, &h)).contains("batch"));
        assert!(msg(plan([4, 4, 4], &fb, 2, 0, &h)).contains("T = 0"));
        assert!(msg(plan([4, 0, 4], &fb, 2, 5, &h)).contains("zero dimension"));
        assert!(msg(plan([4, 4, 4], &FeedbackConfig { delay: 0, ..fb }, 2, 5, &h)).contains("delay"));
        let r0 = FeedbackConfig { radius: 0, ..fb };
        assert!(msg(plan([70_000, 1, 1], &r0, 2, 5, &h)).contains("exceeds"));
        assert!(msg(plan([1 << 16, 1 << 16, 1], &r0, 1, 1, &h)).contains("exceeds"));
        // a gate kernel larger than the map: refused, as the spec and the CPU layer refuse it
        assert!(msg(plan([4, 2, 9], &fb, 1, 1, &h)).contains("does not fit"));
        assert!(msg(plan([4, 9, 4], &FeedbackConfig { radius: 2, ..fb }, 1, 1, &h)).contains("r ≤ 1"));
        assert!(msg(plan([usize::MAX, 2, 2], &fb, 1, 1, &h)).contains("overflows"));
    }

    /// Every output (b, c, pixel) of a v2 tiling is computed by exactly one (job, thread, i, j),
    /// every tap a thread reads lies in the staged halo at the right image position, the float4
    /// weight loads are aligned and in the chunk, and the weight gradient's blocks cover every
    /// (c, ci) pair and every (t, b, pixel) exactly once with in-plane window reads.
    fn check_v2_coverage(shape: [usize; 3], r: usize, batch: usize, steps: usize, td: &TileDims, wg_grid: (u32, u32)) {
        let [c, h, w] = shape;
        let (k, hw) = (2 * r + 1, h * w);
        let co_t = td.co_t as usize;
        assert!(matches!(co_t, 16 | 32 | 64));
        let cpt = td.cpt as usize;
        assert!(cpt == 4 || cpt == 8);
        let ntc = co_t / cpt;
        let npt = V2_THREADS as usize / ntc;
        assert_eq!(ntc * npt, V2_THREADS as usize);
        let rows = td.rows as usize;
        assert!(rows >= 1 && rows * w <= 4 * npt, "a tile's pixels fit its threads");
        assert_eq!(td.row_groups as usize, h.div_ceil(rows));
        assert!((td.row_groups as usize - 1) * rows < h, "no empty row group");
        assert_eq!(td.ch_groups as usize, c.div_ceil(co_t));
        assert_eq!(td.jobs as usize, batch * td.ch_groups as usize * td.row_groups as usize);
        let (hs, hsz) = (w + 2 * r, (rows + 2 * r) * (w + 2 * r));
        let in_f = v2_tile_in_floats(w, r, rows);
        assert!(in_f % 4 == 0 && in_f >= V2_CI * hsz);
        let mut seen = vec![0u8; batch * c * hw];
        for job in 0..td.jobs as usize {
            for tid in 0..V2_THREADS as usize {
                let (tc, tp) = (tid / npt, tid % npt);
                let (b, co0, y0, pix, base) = v2_tile_job(shape, r, td, job, tp);
                assert!(b < batch && co0 < c && y0 < h);
                // float4 weight loads: (ci·k² + tap)·co_t + cpt·tc + 4·q, aligned, inside the chunk
                for ci in [0, V2_CI - 1] {
                    for tap in [0, k * k - 1] {
                        for q in 0..cpt / 4 {
                            let at = (ci * k * k + tap) * co_t + cpt * tc + 4 * q;
                            assert!(at % 4 == 0 && at + 3 < V2_CI * k * k * co_t);
                        }
                    }
                }
                for j in 0..4 {
                    let Some(p) = pix[j] else {
                        assert_eq!(base[j], 0);
                        continue;
                    };
                    let (y, x) = (p / w, p % w);
                    assert!(y >= y0 && y < (y0 + rows).min(h) && x < w);
                    for ky in 0..k {
                        for kx in 0..k {
                            let hidx = base[j] + ky * hs + kx;
                            assert!(hidx < hsz, "halo read out of the staged plane");
                            // the staging's map: halo (hy, hx) holds image (y0 + hy − r, hx − r)
                            let (hy, hx) = (hidx / hs, hidx % hs);
                            assert_eq!((y0 + hy, hx), (y + ky, x + kx), "the halo read is the tap's input");
                        }
                    }
                    for i in 0..cpt {
                        let ch = co0 + cpt * tc + i;
                        if ch < c {
                            seen[(b * c + ch) * hw + p] += 1;
                        }
                    }
                }
            }
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "{shape:?} B {batch}: an output is computed {} times",
            seen.iter().find(|&&n| n != 1).unwrap()
        );
        // weight gradient
        // weight-gradient blocks (kernel: gi = ceil(C/16), c0 = (bx / gi)·16·cw, i0 = (bx % gi)·16,
        // thread (tcc, tci) owns c0 + cw·tcc + [0, cw) × i0 + tci)
        let cw = td.wg_cw as usize;
        assert!(cw == 1 || (td.cpt == 8 && matches!(cw, 2 | 4)), "{td:?}");
        let gi = c.div_ceil(16);
        assert_eq!(wg_grid.0 as usize, c.div_ceil(16 * cw) * gi);
        let mut pairs = vec![0u8; c * c];
        let mut biases = vec![0u8; c];
        for bx in 0..wg_grid.0 as usize {
            for tid in 0..V2_THREADS as usize {
                let (c0, i0) = ((bx / gi) * 16 * cw, (bx % gi) * 16);
                let (tcc, tci) = (tid / 16, tid % 16);
                for u in 0..cw {
                    let (cc, ci) = (c0 + tcc * cw + u, i0 + tci);
                    if cc < c && ci < c {
                        pairs[cc * c + ci] += 1;
                    }
                    if cc < c && i0 == 0 && tci == 0 {
                        biases[cc] += 1;
                    }
                }
            }
        }
        assert!(pairs.iter().all(|&n| n == 1), "every (c, ci) weight pair has one owner thread");
        assert!(biases.iter().all(|&n| n == 1), "every bias has one owner thread");
        assert!(v2_wgrad_smem_bytes(w, r, td.wg_rows as usize, cw) >= 4 * 16 * cw * td.wg_rows as usize * w);
        let (wr, wrg) = (td.wg_rows as usize, td.wg_row_groups as usize);
        assert!(wr * w <= 256 && wrg == h.div_ceil(wr) && (wrg - 1) * wr < h);
        let plane = v2_wgrad_plane(w, r, wr);
        assert!(plane % 2 == 1 && plane >= (wr + 2 * r) * hs);
        // windows: the last read of a chunk's row py, tap (ky, kx) at x = W − 1
        assert!((wr - 1 + k - 1) * hs + (w - 1) + k - 1 < plane);
        let split = wg_grid.1 as usize;
        assert!(split >= 1 && split <= 65_535 && split as u32 == td.wg_split as u32);
        let chunks = steps * batch * wrg;
        let mut px = vec![0u8; steps * batch * hw];
        for by in 0..split {
            for ch in (by..chunks).step_by(split) {
                let rg = ch % wrg;
                let tb = ch / wrg;
                let (t, b) = (tb / batch, tb % batch);
                let y0 = rg * wr;
                let rows_here = wr.min(h - y0);
                for q in 0..rows_here * w {
                    px[(t * batch + b) * hw + y0 * w + q] += 1;
                }
            }
        }
        assert!(px.iter().all(|&n| n == 1), "the weight gradient's chunks cover every (t, b, pixel) once");
    }

    #[test]
    fn v2_plans_every_backei_shape_within_the_device_limits_and_covers_every_output_once() {
        for (version, limits) in
            [KernelVersion::V2, KernelVersion::V3].into_iter().flat_map(|v| [(v, DeviceLimits::A100), (v, DeviceLimits::H100)])
        {
            for (net, i, shape, fb) in spiking_layers() {
                if !fb.back && !fb.ei {
                    let p = plan_version(shape, &fb, 100, 20, &limits, version).unwrap();
                    assert_eq!((p.path, p.version), (LayerPath::Plain, KernelVersion::V1), "the plain layer has no v2/v3");
                    continue;
                }
                for batch in [1, 100, 256] {
                    for steps in [1, 20, 64] {
                        let p = plan_version(shape, &fb, batch, steps, &limits, version).unwrap();
                        assert_eq!(p.version, version, "{net} layer {i} {shape:?}: fell back: {:?}", p.fallback);
                        assert_eq!(p.tile.unwrap().cpt as usize, version.channels_per_thread());
                        assert_eq!(p.wgrad, WgradPath::Tiled);
                        let td = p.tile.unwrap();
                        let per_sm = (limits.max_smem_per_sm as usize / (p.forward.smem_bytes as usize + SMEM_RESERVED_PER_BLOCK))
                            .min(V2_BLOCKS_PER_SM as usize);
                        for l in [p.forward, p.backward] {
                            assert!(l.cooperative && l.block == V2_THREADS);
                            assert!(l.smem_bytes <= limits.max_smem_per_block, "{net} {i}: {l:?}");
                            assert!(l.grid.0 >= 1 && l.grid.0 as usize <= per_sm * limits.sm_count as usize, "grid ≤ co-resident blocks");
                            assert!(l.grid.0 as i32 <= td.jobs, "no block without a job");
                        }
                        let w = p.wgrad_launch.unwrap();
                        assert!(!w.cooperative && w.smem_bytes <= limits.max_smem_per_block);
                        let all = steps * batch * shape.iter().product::<usize>();
                        assert_eq!((p.buffers.dz, p.buffers.da), (all, all), "v2 keeps dz and da of every step");
                        // exact coverage on a small batch and T (the index arithmetic does not depend on them
                        // beyond the job count, which is checked for every batch above)
                        if batch == 1 && steps == 1 || (batch, steps) == (100, 20) && shape[0] <= 64 && limits == DeviceLimits::H100 {
                            let (b, t) = (batch.min(2), steps.min(3));
                            let q = plan_version(shape, &fb, b, t, &limits, version).unwrap();
                            let wg = q.wgrad_launch.unwrap().grid;
                            check_v2_coverage(shape, fb.radius, b, t, &q.tile.unwrap(), (wg.0, wg.1));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn v2_covers_odd_shapes_and_falls_back_where_it_cannot_run() {
        let h = DeviceLimits::H100;
        for (shape, r) in [
            ([3, 7, 9], 1),
            ([3, 7, 9], 2),
            ([1, 3, 3], 1),
            ([2, 5, 3], 1),
            ([4, 9, 7], 2),
            ([5, 7, 9], 2),
            ([17, 3, 65], 1),
            ([65, 5, 130], 2),
            ([33, 40, 3], 1),
            ([70, 3, 256], 1),
        ] {
            for back_ei in [(true, true), (true, false), (false, true)] {
                let fb = FeedbackConfig { back: back_ei.0, ei: back_ei.1, radius: r, delay: 2 };
                for ((b, t), version) in [(1, 1), (3, 4)].into_iter().flat_map(|bt| [(bt, KernelVersion::V2), (bt, KernelVersion::V3)]) {
                    let p = plan_version(shape, &fb, b, t, &h, version).unwrap();
                    assert_eq!(p.version, version, "{shape:?} r {r}: {:?}", p.fallback);
                    let wg = p.wgrad_launch.unwrap().grid;
                    check_v2_coverage(shape, r, b, t, &p.tile.unwrap(), (wg.0, wg.1));
                }
            }
        }
        let fb = |r| FeedbackConfig { radius: r, ..Default::default() };
        // radius 0 or 3, a row wider than 256, a tiny shared memory: v1 with the reason
        for (shape, r, lim) in
            [([4, 4, 4], 0, h), ([4, 8, 8], 3, h), ([4, 3, 300], 1, h), ([4, 8, 8], 1, DeviceLimits { max_smem_per_block: 1024, ..h })]
        {
            let p = plan_version(shape, &fb(r), 2, 3, &lim, KernelVersion::V2).unwrap();
            assert_eq!(p.version, KernelVersion::V1);
            assert!(p.fallback.is_some() && p.tile.is_none());
            assert_eq!(
                p,
                plan_version(shape, &fb(r), 2, 3, &lim, KernelVersion::V1)
                    .map(|mut q| {
                        q.fallback = p.fallback.clone();
                        q
                    })
                    .unwrap()
            );
        }
        // the default is v3 (measured fastest in fp32 on an H200), and the plans of V1 are `plan`'s
        assert_eq!(KernelVersion::default(), KernelVersion::V3);
        assert_eq!(
            plan_version([32, 28, 28], &fb(1), 100, 20, &h, KernelVersion::V1).unwrap(),
            plan([32, 28, 28], &fb(1), 100, 20, &h).unwrap()
        );
        assert_eq!(KernelVersion::parse(" V2 ").unwrap(), KernelVersion::V2);
        assert_eq!(KernelVersion::parse("v3").unwrap(), KernelVersion::V3);
        assert_eq!(KernelVersion::parse("v4").unwrap(), KernelVersion::V4);
        assert!(KernelVersion::parse("v5").unwrap_err().to_string().contains("v5"));
        // the reference shapes: tile choice and kernel names
        let p = plan_version([32, 28, 28], &fb(1), 100, 20, &h, KernelVersion::V2).unwrap();
        let td = p.tile.unwrap();
        assert_eq!((td.co_t, td.rows, td.row_groups, td.ch_groups, td.jobs), (32, 4, 7, 1, 700));
        assert_eq!(p.forward.grid.0, 2 * 132);
        assert_eq!(p.forward.kernel, "backei_forward_v2_r1_f32");
        let p = plan_version([15, 24, 24], &fb(2), 100, 20, &h, KernelVersion::V2).unwrap();
        assert_eq!((p.backward.kernel, p.wgrad_launch.unwrap().kernel), ("backei_backward_v2_r2_f32", "backei_wgrad_tiled_r2_f32"));
        // v3: twice the pixels per tile at the same channel tile (fashion-mnist layer 1: 32
        // channels × 9 rows of 28, 4 row groups of 7 rows), the v3 kernels and weight gradient
        let p = plan_version([32, 28, 28], &fb(1), 100, 20, &h, KernelVersion::V3).unwrap();
        let td = p.tile.unwrap();
        assert_eq!((td.co_t, td.rows, td.row_groups, td.cpt), (32, 7, 4, 8));
        assert_eq!((p.forward.kernel, p.backward.kernel), ("backei_forward_v3_r1_f32", "backei_backward_v3_r1_f32"));
        assert_eq!(p.wgrad_launch.unwrap().kernel, "backei_wgrad_tiled_r1_f32");
        assert_eq!((td.wg_cw, p.wgrad_launch.unwrap().grid.0), (2, 2), "C = 32: 2 channels per thread, one c-block × 2 ci-blocks");
        assert_eq!(
            (v3_wgrad_channels_per_thread(64, 1), v3_wgrad_channels_per_thread(64, 2), v3_wgrad_channels_per_thread(15, 2)),
            (4, 2, 1)
        );
        // a row of 300 fits a v3 tile (up to 512 pixels), not a v2 tile (up to 256)
        let wide = |v| plan_version([4, 3, 300], &fb(1), 2, 3, &h, v).unwrap().version;
        assert_eq!((wide(KernelVersion::V2), wide(KernelVersion::V3)), (KernelVersion::V1, KernelVersion::V3));
    }

    #[test]
    fn tile_dims_have_the_c_layout_of_the_kernels() {
        assert_eq!(std::mem::size_of::<TileDims>(), 40);
        assert_eq!(std::mem::align_of::<TileDims>(), 4);
    }
}
