//! Host side of the tensor-core BackEI kernels, v4 (`cuda/backei_v4.cu`: the equations, the
//! implicit-GEMM layout, the precision modes and the work mapping are described there). This file
//! is the pure plan — which channel tile, chunk size and shared-memory layout a shape gets on a
//! device, and why a shape cannot run (then the layer falls back to v3 and says why) — and the
//! module's compile-time constants. The launches live with the other versions' in
//! `backei_layer.rs`.
//!
//! Shared memory of a block (one block per SM; every offset a multiple of 16):
//!   [weights: both gates' slices (resident), or one channel slab's fragments at a time, streamed
//!   from L2 by cp.async][dW accumulators, both gates, f32 CO_T × k²·c_pad (or in the global
//!   dw_part)][slab planes: the halo of `slab` channels][own planes: the halo of the block's CO_T
//!   channels (the weight gradient's dY)][reduction scratch, the block's range and partners (32 B),
//!   the chunk's pixel rows for the weight gradient (2 × 128·mt words)]
//! The plan prefers, in order: resident weights and on-chip dW (no traffic but the halos), on-chip
//! dW with streamed weights, resident weights with dW in global memory (L2), both off chip; then
//! the largest channel tile (fewer groups: each group stages the same halos again), the whole halo
//! in one slab (else 64, 32, 16 channels at a time), two m-tiles per warp (256-pixel chunks).

use super::backei_layer::{opt_in_smem, DeviceLimits, GpuBackEiLayer, KernelLaunch, LayerDims, LayerInput, NeuronParams};
pub use super::backei_v4_tiling::{V4Choices, V4Tiling, V4TilingRequest, TILING_ENV};
use crate::error::{shape_err, BackeiError, Result};
use crate::precision::Precision;
use crate::spec::FeedbackConfig;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

/// The kernel module of v4 (`cuda/backei_v4.cu`), compiled per instance with `V4Plan::defines`.
pub const V4_MODULE: &str = "backei_v4";
/// Threads per block (`WARPS` · 32 in the .cu).
pub const V4_THREADS: u32 = 256;

/// `BACKEI_V4_SYNC=neighbours` orders the v4 kernels' phases by neighbour flags (`V4_SYNC`,
/// cuda/v4/sync.cuh: a block waits only for the blocks whose pixels lie within r rows of its own);
/// unset or `grid`: a grid barrier after every phase. Opt-in until a GPU run shows it correct and
/// faster (`bench/gpu/session.sh` times both).
pub const SYNC_ENV: &str = "BACKEI_V4_SYNC";

/// `BACKEI_V4_SYNC`'s value: neighbour flags (`neighbours`) or grid barriers (unset, `grid`).
pub fn neighbour_sync_from_env(value: Option<&str>) -> Result<bool> {
    super::util::opt_in_from_env(SYNC_ENV, value, "neighbours", "neighbour flags between the v4 kernels' phases", "grid")
}

/// `BACKEI_V4_PREFETCH=l2` has the v4 kernels prefetch each chunk's epilogue inputs into L2 before
/// the chunk's GEMMs (`V4_PREFETCH`, cuda/v4/chunks.cuh prefetch_owned_l2: the saved state and
/// carried gradients the epilogue loads a few elements ahead); unset or `off`: none. A hint
/// that changes no value; opt-in until a GPU run shows it faster (`bench/gpu/session.sh
/// v4-prefetch` times both).
pub const PREFETCH_ENV: &str = "BACKEI_V4_PREFETCH";

/// `BACKEI_V4_PREFETCH`'s value: L2 prefetches (`l2`) or none (unset, `off`).
pub fn prefetch_l2_from_env(value: Option<&str>) -> Result<bool> {
    super::util::opt_in_from_env(PREFETCH_ENV, value, "l2", "the epilogue inputs prefetched into L2", "off")
}
/// `BACKEI_V4_CHUNKS=span` lets a v4 block's chunks run on across a sample's end (`V4_CROSS`,
/// cuda/v4/chunks.cuh `chunk_len`: as far as the chunk's halo fits the planes), where they stop at
/// every sample's end (unset or `sample`): fewer chunks per block where a sample's pixels are not
/// a multiple of the chunk ([`V4Plan::chunk_counts`]: fashion-mnist L1 6 -> 5, L2 7 -> 5 on an
/// H100/H200). Opt-in until a GPU run shows it faster (`bench/gpu/session.sh v4-span` times both).
pub const CHUNKS_ENV: &str = "BACKEI_V4_CHUNKS";

/// `BACKEI_V4_CHUNKS`'s value: chunks that span samples (`span`) or stop at each sample's end
/// (unset, `sample`).
pub fn span_samples_from_env(value: Option<&str>) -> Result<bool> {
    super::util::opt_in_from_env(CHUNKS_ENV, value, "span", "chunks that run on across a sample's end", "sample")
}
const WARPS: usize = 8;
/// Shared memory the driver reserves per resident block (1 KiB on sm_80 / sm_90).
const SMEM_RESERVED_PER_BLOCK: usize = 1024;

/// The device's `V4Dims` (`cuda/backei_v4.cu`), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Dims {
    pub c_pad: i32,
    pub groups: i32,
    pub ranges: i32,
    pub halo_rows: i32,
    pub slab: i32,
    pub pstride: i32,
    pub plane_bytes: i32,
    pub own_pstride: i32,
    pub own_plane_bytes: i32,
    pub wslice_bytes: i32,
    pub w_resident: i32,
    pub dw_smem: i32,
    pub smem_dw: i32,
    pub smem_halo: i32,
    pub smem_own: i32,
    pub smem_misc: i32,
}
// SAFETY: plain-old-data with the C layout of cuda/backei_v4.cu's V4Dims.
unsafe impl DeviceRepr for V4Dims {}

/// The device's `V4Window` (`cuda/backei_v4.cu`): the steps [t0, t1) of one launch, and the step
/// the input buffer starts at (`in_t0`: 0, or t0 for an input that holds the window's steps alone:
/// [`InputWindows`](super::backei_layer::InputWindows)).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Window {
    pub t0: i32,
    pub t1: i32,
    pub in_t0: i32,
    /// The fused pooling writes int8 codes of the pooled spikes (`pool::PoolIo::S8ToQ8`), not f32.
    pub pool_q8: i32,
}
// SAFETY: plain-old-data with the C layout of cuda/backei_v4.cu's V4Window.
unsafe impl DeviceRepr for V4Window {}

/// How the v4 backward reads ∂L/∂s (the kernels' `V4GradIn`): the layer's output gradient
/// (`pooled` 0, the default), or the output gradient of the network's 2×2 pooling after the layer,
/// taken through the pooling's backward on the fly — with a dropout between, its mask drawn again
/// from `keys[slot]` (device memory: the step's staged keys) at `index0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct V4GradIn {
    pub pooled: i32,
    pub dropout: i32,
    pub p: f32,
    /// 1/(1−p) rounded to f32 (`dropout::scale`)
    pub scale: f32,
    pub index0: u64,
    /// the device address of the keys
    pub keys: u64,
    pub slot: i32,
    pub _pad: i32,
}
// SAFETY: plain-old-data with the C layout of cuda/backei_v4.cu's V4GradIn (40 bytes).
unsafe impl DeviceRepr for V4GradIn {}

impl V4Window {
    /// The windows of `--recompute K` over T steps, in time order ([0, K), [K, 2K), …, the last
    /// one shorter when K does not divide T); one window [0, T) without recompute.
    pub fn all(steps: usize, k: Option<usize>) -> Vec<V4Window> {
        let k = k.unwrap_or(steps).clamp(1, steps.max(1));
        (0..steps.div_ceil(k)).map(|w| V4Window { t0: (w * k) as i32, t1: (steps.min((w + 1) * k)) as i32, in_t0: 0, pool_q8: 0 }).collect()
    }

    /// This window reading an input that holds its steps alone ([t1 − t0][B][N]).
    pub fn own_input(self) -> V4Window {
        V4Window { in_t0: self.t0, ..self }
    }
}

/// How a layer runs on the v4 kernels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V4Plan {
    pub precision: Precision,
    /// Output channels per block (16, 32 or 64) and m-tiles per warp (chunks of 128·mt pixels).
    pub co_t: usize,
    pub mt: usize,
    pub dims: V4Dims,
    /// groups · ranges blocks, all co-resident (one per SM).
    pub grid: u32,
    pub smem_bytes: u32,
    pub forward: &'static str,
    pub backward: &'static str,
    /// The module's compile-time constants (NVRTC `-D`): radius, precision, tile; C, H, W.
    pub defines: Vec<(String, String)>,
    /// Scratch: the weight fragments (bytes), their inverse scales (floats), the per-range partial
    /// weight gradients (floats).
    pub wfrag_bytes: usize,
    pub winv: usize,
    pub dw_part: usize,
    /// The fp32 mode's row maxima (u32 words; [`rowmax_words`]).
    pub rowmax: usize,
    /// z is saved as a one-byte code (`V4_ZCODE`; `backei_layer::apply_compact`).
    pub z_code: bool,
    /// s (the layer's output) is saved as int8 (`V4_S8`; `backei_layer::apply_compact`).
    pub s8: bool,
    /// The backward's bias partial sums live in `db_carry` between its epilogues (floats; 0: in
    /// registers across the loop, the buffer only carrying them between `--recompute` windows).
    pub db_carry: usize,
    /// The backward stores dz_t once (phase 3 of step t + D) in a ring of min(D, T) [B][N] slots,
    /// the layer's `dz` buffer, and stages it from there (`V4_DZ_RING`; [`V4Plan::stores_dz`]).
    pub dz_ring: bool,
    /// The phases are ordered by neighbour flags instead of grid barriers (`V4_SYNC`;
    /// [`V4Plan::order_by_neighbours`], cuda/v4/sync.cuh).
    pub neighbour_sync: bool,
    /// Each chunk's epilogue inputs are prefetched into L2 (`V4_PREFETCH`;
    /// [`V4Plan::prefetch_epilogue_inputs`], cuda/v4/chunks.cuh).
    pub prefetch_l2: bool,
    /// A block's chunks run on across a sample's end (`V4_CROSS`; [`V4Plan::span_samples`]).
    pub span_samples: bool,
    /// The gates' radius r (`V4_R`).
    pub radius: usize,
    /// The tile and placement (`co_t`, `mt`, `dims.slab`, `dims.w_resident`, `dims.dw_smem` say
    /// the same): the planner's first feasible choice or the one `BACKEI_V4_TILING` asked for.
    pub tiling: V4Tiling,
}

impl V4Plan {
    /// Whether `plan_v4` builds the backward to store dz in a ring (`dz_ring`): with both gates
    /// (phase 3 forms dz only where there is a feedback slot) and D < T, on tiles of at most 32
    /// accumulators per thread (the 64-accumulator tiles keep phase 3's epilogue lean: per-element
    /// spills, `rowmax.cuh`'s DZ_ROWMAX). Phase 2 then stages dz_t with one load per halo element
    /// instead of the feedback slot, v, z and their product (the SASS of the fashion L1 backward,
    /// 2026-12-06: its largest loop of code per element).
    pub fn stores_dz(&self, fb: &FeedbackConfig, steps: usize) -> bool {
        fb.back && fb.ei && fb.delay < steps && !self.wide_tile()
    }

    /// Builds the kernels to order their phases by neighbour flags (`V4_SYNC`, cuda/v4/sync.cuh):
    /// each block publishes its completed phases and waits only for the blocks that own pixels
    /// within r rows of its own, instead of a grid barrier after every phase. The same arithmetic
    /// in the same order: the same bits (`tests/emu_v4.rs`).
    pub fn order_by_neighbours(&mut self) {
        if !self.neighbour_sync {
            self.neighbour_sync = true;
            self.defines.push(("V4_SYNC".to_string(), "1".to_string()));
        }
    }

    /// Builds the kernels to prefetch each chunk's epilogue inputs into L2 before the chunk's
    /// GEMMs (`V4_PREFETCH`, cuda/v4/chunks.cuh prefetch_owned_l2). A hint: the same bits
    /// (`tests/emu_v4.rs`).
    pub fn prefetch_epilogue_inputs(&mut self) {
        if !self.prefetch_l2 {
            self.prefetch_l2 = true;
            self.defines.push(("V4_PREFETCH".to_string(), "1".to_string()));
        }
    }

    /// Builds the kernels to let a chunk span samples (`V4_CROSS`, cuda/v4/chunks.cuh
    /// `chunk_len`): a block's chunks run on across a sample's end as far as the chunk's halo —
    /// the samples' rows with 2r padding rows between them — fits the planes' `halo_rows`. The
    /// same sums per output element; the fp32 mode's per-chunk scales and the order in which the
    /// weight gradients' per-chunk sums are folded follow the chunks (`tests/emu_v4.rs`).
    pub fn span_samples(&mut self) {
        if !self.span_samples {
            self.span_samples = true;
            self.defines.push(("V4_CROSS".to_string(), "1".to_string()));
        }
    }

    /// Builds the kernels to let chunks span samples ([`V4Plan::span_samples`]) and gives them
    /// taller halo planes where the device's shared memory holds them beside the plan's tiling
    /// (whose choice does not change): up to the rows the tallest chunk that spans samples needs
    /// ([`V4Plan::span_rows_needed`]) — on maps smaller than a chunk, several samples' rows with
    /// their padding, so that a chunk fills its m-tiles with several samples' pixels.
    pub fn span_samples_in(&mut self, shape: [usize; 3], fb: &FeedbackConfig, limits: &DeviceLimits, batch: usize) {
        self.span_samples();
        let t = self.tiling;
        let budget = limits.max_smem_per_block as usize;
        let now = self.dims.halo_rows as usize;
        for rows in (now + 1..=self.span_rows_needed(shape, batch)).rev() {
            if let Some((dims, smem)) =
                layout(shape, fb, self.precision, t.co_t, t.mt, t.slab, t.weights_on_chip, t.dw_on_chip, budget, Some(rows))
            {
                self.dims = V4Dims { ranges: self.dims.ranges, ..dims };
                self.smem_bytes = smem as u32;
                return;
            }
        }
    }

    /// The halo rows of the tallest chunk this plan's ranges would make if the planes had rows
    /// enough for any: r rows above its first row and below its last, 2r padding rows between two
    /// samples ([`V4Plan::span_samples_in`] grows the planes to it where shared memory allows).
    pub fn span_rows_needed(&self, shape: [usize; 3], batch: usize) -> usize {
        let (w, hw, r) = (shape[2], shape[1] * shape[2], self.radius);
        let rows = |&(p, len): &(usize, usize)| {
            let (q, last) = (p % hw, p % hw + len - 1);
            (last / w + last / hw * 2 * r) - q / w + 1 + 2 * r
        };
        self.chunks_within(shape, batch, usize::MAX / 4).iter().flatten().map(rows).max().unwrap_or(0)
    }

    /// The pixels of the chunk that starts at pixel q of its sample with n pixels left in its range
    /// (the kernel's `chunk_len`): up to 128·mt, within the range, and within the sample — or,
    /// spanning samples, as far as its virtual rows fit planes of `halo_rows` rows.
    fn chunk_len(&self, shape: [usize; 3], q: usize, n: usize, halo_rows: usize) -> usize {
        let (h, w) = (shape[1], shape[2]);
        let (hw, r) = (h * w, self.radius);
        let (left, n) = (hw - q, n.min(16 * WARPS * self.mt));
        if n <= left {
            return n;
        }
        if !self.span_samples {
            return left;
        }
        // the virtual pixels below lim end in sample j at its pixel o (a virtual sample: (h + 2r)·w)
        let lim = (q / w + halo_rows).saturating_sub(2 * r).saturating_mul(w);
        let vs = (h + 2 * r) * w;
        let (j, o) = (lim / vs, (lim % vs).min(hw));
        left.max(n.min(j.saturating_mul(hw).saturating_add(o).saturating_sub(q)))
    }

    /// The chunks of each pixel range (the kernel's `for_each_chunk` and `chunk_at`): for range r,
    /// the (first pixel of the batch, pixels) of each chunk, in order. Chunks hold up to 128·mt
    /// pixels, stop at the range's end and — unless `span_samples` — at each sample's end.
    pub fn chunks(&self, shape: [usize; 3], batch: usize) -> Vec<Vec<(usize, usize)>> {
        self.chunks_within(shape, batch, self.dims.halo_rows as usize)
    }

    /// [`V4Plan::chunks`] with planes of `halo_rows` rows.
    fn chunks_within(&self, shape: [usize; 3], batch: usize, halo_rows: usize) -> Vec<Vec<(usize, usize)>> {
        let hw = shape[1] * shape[2];
        let total = batch * hw;
        let ranges = self.dims.ranges.max(1) as usize;
        (0..ranges)
            .map(|range| {
                let (start, end) = (total * range / ranges, total * (range + 1) / ranges);
                let mut out = Vec::new();
                let mut p = start;
                while p < end {
                    let len = self.chunk_len(shape, p % hw, end - p, halo_rows);
                    out.push((p, len));
                    p += len;
                }
                out
            })
            .collect()
    }

    /// The most chunks any block runs per phase, and the mean over the blocks ([`V4Plan::chunks`]).
    pub fn chunk_counts(&self, shape: [usize; 3], batch: usize) -> (usize, f64) {
        let per: Vec<usize> = self.chunks(shape, batch).iter().map(Vec::len).collect();
        (per.iter().copied().max().unwrap_or(0), per.iter().sum::<usize>() as f64 / per.len().max(1) as f64)
    }

    /// u32 words of the launches' sync buffer (`bar`, zeroed before every launch): the grid
    /// barrier, then one phase count per block (read only under neighbour flags).
    pub fn sync_words(&self) -> usize {
        1 + self.grid as usize
    }

    /// Builds the kernels to save z as a one-byte code (`V4_ZCODE`); the caller has checked that
    /// the code is exact and sizes the z buffer (`backei_layer::apply_compact`).
    pub fn code_z(&mut self) {
        if !self.z_code {
            self.z_code = true;
            self.defines.push(("V4_ZCODE".to_string(), "1".to_string()));
        }
    }

    /// Whether a thread's tile holds 64 accumulators (mt = 2, co_t = 64: cifar10 L2/L3), the tiles
    /// whose backward carries its bias sums in memory and skips dz's row maxima (the kernel's
    /// `DZ_ROWMAX`: MT·NT·4 > 32) to stay clear of per-element spills.
    pub fn wide_tile(&self) -> bool {
        self.mt * self.co_t > 64
    }

    /// Whether `plan_v4` builds the backward to carry its bias sums in memory (`carry_bias_sums`):
    /// for the tiles of 64 accumulators per thread, and in fp32 mode, whose weight-gradient k-loop
    /// holds both planes' fragments of dY and X (fashion-mnist L1's backward, 16 accumulators per
    /// thread, spilled 24 bytes at 255 registers with its sums in registers since that loop forms
    /// its addresses by walks instead of divisions; 244 registers with them carried, sm_90,
    /// 2026-12-06). The cost: 2 × 4·NT words per thread and chunk of phase 2, in L1.
    pub fn carries_bias_sums(&self) -> bool {
        self.wide_tile() || self.precision == Precision::Fp32
    }

    /// Builds the backward to keep each thread's bias partial sums in the `db_carry` buffer between
    /// phase 2's epilogues (`V4_DB_CARRIED`) instead of registers across the whole loop: what
    /// `plan_v4` picks for tiles of 64 accumulators per thread (mt = 2, co_t = 64: cifar10 L2/L3),
    /// where ptxas otherwise kept the 32 sums in local memory with a load and a store per element
    /// (sm_90 fp32, 2026-12-05: 176-byte stack frame, 32 with it and dz's row maxima off). The same
    /// additions in the same order: the same bits (`tests/emu_v4.rs`).
    pub fn carry_bias_sums(&mut self) {
        if self.db_carry == 0 {
            self.db_carry = db_carry_floats(self.grid, self.co_t);
            self.defines.push(("V4_DB_CARRIED".to_string(), "1".to_string()));
        }
    }

    /// Builds the kernels to write and read s as int8 (`V4_S8`); the caller has checked that the
    /// spikes are exact (exact firing) and that the output's reader takes int8, and sizes the
    /// output buffer (`backei_layer::apply_compact`).
    pub fn store_s8(&mut self) {
        if !self.s8 {
            self.s8 = true;
            self.defines.push(("V4_S8".to_string(), "1".to_string()));
        }
    }

    /// Whether the backward stages dz and da once, into the own planes where the weight gradient
    /// reads them as dY (the kernel's `dy_shares_slab`): one channel group whose tile is the whole
    /// padded channel range in one slab, so both plane sets have one geometry.
    pub fn stages_dy_once(&self) -> bool {
        let d = &self.dims;
        d.groups == 1 && d.slab == d.c_pad && d.own_pstride == d.pstride && d.own_plane_bytes == d.plane_bytes
    }

    /// The build constants that repeat a run-time dim (`V4_DW_SMEM`: `dims.dw_smem`) agree with it:
    /// the GPU build trusts the constant (cuda/backei_v4.cu `dw_on_chip`), so a plan changed after
    /// `plan_v4_tiled` made its constants would have its kernels use shared memory it did not size.
    pub fn check_build_constants(&self) -> Result<()> {
        let dw = self.defines.iter().find(|(k, _)| k == "V4_DW_SMEM").map(|(_, v)| v.as_str());
        if dw.and_then(|v| v.parse::<i32>().ok()) == Some(self.dims.dw_smem) {
            Ok(())
        } else {
            Err(BackeiError::Cuda(format!(
                "internal: the v4 plan's build constant V4_DW_SMEM is {dw:?}, its dims.dw_smem {}",
                self.dims.dw_smem
            )))
        }
    }

    /// The constants without C, H and W (and what follows from them, V4_DY_ONCE), the feedback
    /// paths (V4_BACK, V4_EI) and the weight gradients' placement (V4_DW_SMEM): one emulator build
    /// serves every shape, switch and placement of a tile, and decides them at run time.
    pub fn tile_defines(&self) -> Vec<(String, String)> {
        self.defines
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "V4_C" | "V4_H" | "V4_W" | "V4_BACK" | "V4_EI" | "V4_DY_ONCE" | "V4_DW_SMEM"))
            .cloned()
            .collect()
    }
}

/// Bytes per operand element and planes of a real operand (hi, lo in fp32 mode).
pub fn operand_format(p: Precision) -> (usize, usize) {
    match p {
        Precision::Fp32 => (2, 2),
        Precision::Tf32 => (4, 1),
        Precision::Bf16 => (2, 1),
    }
}

/// The row pitch (floats) of the weight-gradient accumulators in shared memory, k²·c_pad + 8: the
/// kernel's `DW_SMEM_PITCH`, padded so that the fold's float2 updates of 8 rows spread over every
/// bank (k²·c_pad is a multiple of 16, so the pitch is ≡ 8 or 24 mod 32).
pub fn dw_smem_pitch(n_all: usize) -> usize {
    n_all + 8
}

/// The one named exception to "no local memory" in the v4 kernels: the backward of the tiles of 64
/// accumulators per thread (mt = 2, co_t = 64; cifar10 L2/L3, fp32 mode, 255 registers) spills a
/// few set-up values — 36 bytes, 12 instructions on sm_90 (2026-12-05); 16 bytes, 6 instructions
/// since the GEMMs' 32-bit shared addresses (2026-12-07: three words stored at the step's start
/// and reloaded once per chunk), none per element and none in the hot loop (checked apart) — and
/// may touch local memory in at most this many instructions:
/// a per-element spill, unrolled over the 64 elements of the epilogues, takes dozens (it took 128
/// before the bias sums left the registers). The forward of the same tiles falls under it too:
/// at fashion-mnist L2's shape (64 channels, a tiling only the bench's sweep takes) it keeps two
/// words of the shared-memory layout in 8 bytes, stored once and reloaded once per slab of the
/// convolution (4 instructions, sm_90, 2026-12-06), none per element.
pub const V4_WIDE_TILE_LOCAL_OPS: usize = 16;

/// Local-memory instructions any v4 instance may hold where none lies inside a loop nested in
/// the time loop (`KernelCheck::local_depth` ≤ 1): a value of the set-up spilled and reloaded at
/// most once per step. With the kernels at 240–255 registers, ptxas spills such a value now and
/// then (the fashion-mnist L2 bf16 backward, 2026-12-07, fifth session: one word stored before the
/// time loop and reloaded at its head — 2 instructions, once per step, beside ~10⁵ per chunk). A
/// spill inside a chunk or an element's code still fails the check.
pub const V4_STEP_LEVEL_LOCAL_OPS: usize = 8;

/// The `db_carry` buffer (floats): each thread's 4 · co_t / 8 bias partial sums, [grid][4·NT][256].
pub fn db_carry_floats(grid: u32, co_t: usize) -> usize {
    grid as usize * co_t / 2 * V4_THREADS as usize
}

/// Words of the row maxima an fp32-mode launch keeps (the kernel's v4/rowmax.cuh): the largest
/// |x| of every (sample, image row) of v_t for every step, of da for two steps and of dz for 2D
/// (whence each staged chunk's scale, instead of a walk over its halo) — [T + 2 + 2D][B][H]. The
/// other modes scale nothing: none.
pub fn rowmax_words(precision: Precision, fb: &FeedbackConfig, batch: usize, steps: usize, h: usize) -> usize {
    if precision != Precision::Fp32 || !(fb.back || fb.ei) {
        return 0;
    }
    (steps + 2 + 2 * fb.delay) * batch * h
}

fn round16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// The kernel names of a radius and precision (they say version, radius and precision).
pub fn kernel_names(r: usize, p: Precision) -> Option<(&'static str, &'static str)> {
    Some(match (r, p) {
        (1, Precision::Fp32) => ("backei_forward_v4_r1_fp32", "backei_backward_v4_r1_fp32"),
        (1, Precision::Tf32) => ("backei_forward_v4_r1_tf32", "backei_backward_v4_r1_tf32"),
        (1, Precision::Bf16) => ("backei_forward_v4_r1_bf16", "backei_backward_v4_r1_bf16"),
        (2, Precision::Fp32) => ("backei_forward_v4_r2_fp32", "backei_backward_v4_r2_fp32"),
        (2, Precision::Tf32) => ("backei_forward_v4_r2_tf32", "backei_backward_v4_r2_tf32"),
        (2, Precision::Bf16) => ("backei_forward_v4_r2_bf16", "backei_backward_v4_r2_bf16"),
        _ => return None,
    })
}

/// The shared-memory layout of one (tile, slab, placement) choice, or None when it exceeds `budget`.
#[allow(clippy::too_many_arguments)]
fn layout(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    p: Precision,
    co_t: usize,
    mt: usize,
    slab: usize,
    w_resident: bool,
    dw_smem: bool,
    budget: usize,
    rows: Option<usize>,
) -> Option<(V4Dims, usize)> {
    let [c, h, w] = shape;
    let r = fb.radius;
    let kk = (2 * r + 1) * (2 * r + 1);
    let (eb, planes) = operand_format(p);
    let c_pad = c.div_ceil(16) * 16;
    let groups = c.div_ceil(co_t);
    let p_ch = 16 * WARPS * mt;
    // the tallest halo of a chunk within one sample, or (rows) taller planes for chunks that span
    // samples (V4Plan::span_samples_in)
    let halo_rows = rows.unwrap_or(h.min((p_ch - 1) / w + 2) + 2 * r);
    let pstride = slab * eb + 16;
    let plane = round16(halo_rows * (w + 2 * r) * pstride);
    let own_pstride = co_t * eb + 16;
    let own_plane = round16(halo_rows * (w + 2 * r) * own_pstride);
    let wslice = kk * c_pad * co_t * eb * planes;
    let gates = fb.back as usize + fb.ei as usize;
    // resident: both gates' whole slices; streamed: one slab's fragments at a time
    let w_bytes = if w_resident { gates * wslice } else { kk * slab * co_t * eb * planes };
    let dw_bytes = if dw_smem { 2 * co_t * dw_smem_pitch(kk * c_pad) * 4 } else { 0 };
    // the reduction scratch, the block's range and partners (sync.cuh's BlockShare), the chunk's
    // pixel rows for the weight gradient (gemm.cuh's fill_pixel_rows: 2·p_ch words)
    let misc = 4 * WARPS * co_t + 32 + 2 * p_ch * 4;
    let smem_dw = round16(w_bytes);
    let smem_halo = smem_dw + round16(dw_bytes);
    // a real operand takes `planes` planes (hi and lo in fp32 mode); the smooth firing mode of the
    // gradient checks stages s as a real operand too
    let smem_own = smem_halo + planes * plane;
    let smem_misc = smem_own + planes * own_plane;
    let total = smem_misc + misc;
    let fits = |x: usize| i32::try_from(x).ok();
    if total > budget {
        return None;
    }
    let dims = V4Dims {
        c_pad: fits(c_pad)?,
        groups: fits(groups)?,
        ranges: 0,
        halo_rows: fits(halo_rows)?,
        slab: fits(slab)?,
        pstride: fits(pstride)?,
        plane_bytes: fits(plane)?,
        own_pstride: fits(own_pstride)?,
        own_plane_bytes: fits(own_plane)?,
        wslice_bytes: fits(wslice)?,
        w_resident: w_resident as i32,
        dw_smem: dw_smem as i32,
        smem_dw: fits(smem_dw)?,
        smem_halo: fits(smem_halo)?,
        smem_own: fits(smem_own)?,
        smem_misc: fits(smem_misc)?,
    };
    Some((dims, total))
}

/// Every tiling of a layer that fits the device's shared memory, with its layout, in the planner's
/// order of preference: weights and dW on chip, dW on chip with the weights streamed, weights on
/// chip with dW in L2, both in L2; then the widest channel tile (each channel group stages the same
/// halos again), the whole halo in one slab (else 64, 32, 16 channels at a time), two m-tiles per
/// warp. [`plan_v4`] takes the first; `BACKEI_V4_TILING` and the kernel bench any other.
pub fn v4_tilings(shape: [usize; 3], fb: &FeedbackConfig, limits: &DeviceLimits, precision: Precision) -> Vec<(V4Tiling, V4Dims, usize)> {
    let budget = limits.max_smem_per_block as usize;
    let c_pad = shape[0].div_ceil(16) * 16;
    let slabs: Vec<usize> = std::iter::once(c_pad).chain([64, 32, 16].into_iter().filter(|&s| s < c_pad)).collect();
    let mut out = Vec::new();
    for (weights_on_chip, dw_on_chip) in [(true, true), (false, true), (true, false), (false, false)] {
        for co_t in [64usize, 32, 16] {
            // a tile wider than the padded channels only adds zero columns
            if co_t > 16 && co_t > c_pad {
                continue;
            }
            for &slab in &slabs {
                for mt in [2usize, 1] {
                    if let Some((dims, smem)) = layout(shape, fb, precision, co_t, mt, slab, weights_on_chip, dw_on_chip, budget, None) {
                        out.push((V4Tiling { co_t, mt, slab, weights_on_chip, dw_on_chip }, dims, smem));
                    }
                }
            }
        }
    }
    out
}

/// The tilings the kernel bench times for a layer (`BACKEI_BENCH_V4_TILINGS`), items separated by
/// `;`: `sweep` — for each (channel tile, m-tiles per warp), the first feasible tiling with it in
/// the planner's order (its slab and placement as the planner would take them: the choices that
/// change the work per MMA and per staged element); `all` — every feasible tiling; a request
/// (`BACKEI_V4_TILING`'s form) — the first feasible tiling that meets it. Each tiling once, only
/// those a launch can take (the grid fits the device), the planner's own choice first where listed.
pub fn bench_tilings(
    which: &str,
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    precision: Precision,
) -> Result<Vec<V4Tiling>> {
    let plans = |t: &V4Tiling| plan_v4_tiled(shape, fb, batch, steps, limits, precision, Some(&V4TilingRequest::from(*t))).is_ok();
    let feasible: Vec<V4Tiling> = v4_tilings(shape, fb, limits, precision).into_iter().map(|x| x.0).filter(plans).collect();
    let mut out: Vec<V4Tiling> = Vec::new();
    fn add(out: &mut Vec<V4Tiling>, t: V4Tiling) {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    for item in which.split(';').map(str::trim).filter(|x| !x.is_empty()) {
        match item {
            "sweep" => {
                let mut shapes: Vec<(usize, usize)> = Vec::new();
                for t in &feasible {
                    if !shapes.contains(&(t.co_t, t.mt)) {
                        shapes.push((t.co_t, t.mt));
                        add(&mut out, *t);
                    }
                }
            }
            "all" => feasible.iter().for_each(|t| add(&mut out, *t)),
            request => {
                let q = V4TilingRequest::parse(request)?;
                match feasible.iter().find(|t| q.matches(t)) {
                    Some(t) => add(&mut out, *t),
                    None => {
                        return Err(crate::error::config_err(
                            "BACKEI_BENCH_V4_TILINGS",
                            format!(
                                "`{request}`: no feasible tiling of {shape:?} ({precision}) meets it; use sweep, all, or requests, separated by ;"
                            ),
                        ))
                    }
                }
            }
        }
    }
    if let Some(first) = feasible.first() {
        if let Some(i) = out.iter().position(|t| t == first) {
            out[..=i].rotate_right(1);
        }
    }
    Ok(out)
}

/// The tilings of cifar10 L1 that `bench/gpu/session.sh v4-tune-cifar` times beside the planner's
/// (its V4_CIFAR_TILINGS default, `bench_tilings` requests): 2 channel groups of 64 with two and
/// one m-tiles, 4 of 32, where the planner takes 8 groups of 16 (each group stages the whole
/// 128-channel halo again; on 2026-12-04 v4 fp32 took 305 ms there against v3's 210, while cifar10
/// L2 — the same products per step in 64-channel tiles — took 133).
pub const CIFAR10_L1_TUNING: &str = "co_t=64,mt=2;co_t=64,mt=1;co_t=32,mt=2";

/// The v4 plan of a layer on a device, or why v4 cannot run it (the layer then falls back).
pub fn plan_v4(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    precision: Precision,
) -> std::result::Result<V4Plan, String> {
    plan_v4_tiled(shape, fb, batch, steps, limits, precision, None)
}

/// [`plan_v4`] with the first feasible tiling that meets `request` (None: the first feasible one);
/// where v4 can run the shape but no tiling meets the request, the error says so and lists the
/// feasible tilings.
pub fn plan_v4_tiled(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    precision: Precision,
    request: Option<&V4TilingRequest>,
) -> std::result::Result<V4Plan, String> {
    let [c, h, w] = shape;
    let r = fb.radius;
    let Some((forward, backward)) = kernel_names(r, precision) else {
        return Err(format!("radius {r}: the v4 kernels are built for r = 1 and r = 2"));
    };
    if !(fb.back || fb.ei) {
        return Err("back and ei are off: the plain spiking layer has no gate convolution".into());
    }
    if h < 2 * r + 1 || w < 2 * r + 1 {
        return Err(format!("a {h}×{w} map is smaller than the {0}×{0} gate", 2 * r + 1));
    }
    let budget = limits.max_smem_per_block as usize;
    let tilings = v4_tilings(shape, fb, limits, precision);
    if tilings.is_empty() {
        return Err(format!(
            "no channel tile of 16 or more fits {budget} B of shared memory (C = {c}, r = {r}, {precision}), even with the weights \
             and weight gradients in L2 and the halo staged 16 channels at a time"
        ));
    }
    let Some(&(tiling, mut dims, smem)) = tilings.iter().find(|(t, _, _)| request.is_none_or(|q| q.matches(t))) else {
        let feasible: Vec<String> = tilings.iter().map(|(t, _, _)| t.to_string()).collect();
        return Err(format!(
            "{TILING_ENV}={}: no tiling of {shape:?} ({precision}) that fits {budget} B of shared memory has these values; the feasible \
             ones, the planner's first choice first: {}",
            request.map(|q| q.to_string()).unwrap_or_default(),
            feasible.join("; ")
        ));
    };
    let (co_t, mt) = (tiling.co_t, tiling.mt);
    let groups = dims.groups as usize;
    let per_sm = (limits.max_smem_per_sm as usize / (smem + SMEM_RESERVED_PER_BLOCK)).min(1);
    let resident = per_sm * limits.sm_count as usize;
    if groups > resident {
        return Err(format!("{groups} channel groups need {groups} co-resident blocks; the device holds {resident}"));
    }
    let pixels = batch.checked_mul(h * w).ok_or("B·H·W overflows")?;
    let ranges = (resident / groups).clamp(1, pixels.div_ceil(16).max(1));
    dims.ranges = i32::try_from(ranges).map_err(|_| "too many ranges")?;
    let kk = (2 * r + 1) * (2 * r + 1);
    let n_all = kk * dims.c_pad as usize;
    let dw_part = ranges * 2 * groups * co_t * (n_all + 1);
    let prec_id = match precision {
        Precision::Fp32 => 0,
        Precision::Tf32 => 1,
        Precision::Bf16 => 2,
    };
    let defines = [
        ("V4_R", r),
        ("V4_PREC", prec_id),
        ("V4_CO_T", co_t),
        ("V4_MT", mt),
        ("V4_C", c),
        ("V4_H", h),
        ("V4_W", w),
        ("V4_BACK", usize::from(fb.back)),
        ("V4_EI", usize::from(fb.ei)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let rowmax = rowmax_words(precision, fb, batch, steps, h);
    let mut plan = V4Plan {
        precision,
        co_t,
        mt,
        grid: (groups * ranges) as u32,
        smem_bytes: smem as u32,
        forward,
        backward,
        defines,
        wfrag_bytes: 2 * groups * dims.wslice_bytes as usize,
        winv: 2 * groups,
        dw_part,
        rowmax,
        dims,
        z_code: false,
        s8: false,
        db_carry: 0,
        dz_ring: false,
        neighbour_sync: false,
        prefetch_l2: false,
        span_samples: false,
        radius: r,
        tiling,
    };
    if plan.carries_bias_sums() {
        plan.carry_bias_sums();
    }
    if plan.stores_dz(fb, steps) {
        plan.dz_ring = true;
        plan.defines.push(("V4_DZ_RING".to_string(), "1".to_string()));
    }
    // whether the backward stages its convolution operand once as dY (and the weight gradient's X
    // beside it): a constant of the instance, so that the GPU build drops the path it never takes
    // (cuda/v4/gemm.cuh dy_shares_slab; the emulator's build without shape constants decides at run
    // time, tile_defines leaves it out)
    plan.defines.push(("V4_DY_ONCE".to_string(), (plan.stages_dy_once() as u8).to_string()));
    // the weight gradients' placement likewise (cuda/backei_v4.cu dw_on_chip): the fold's shared
    // loads and stores at a constant pitch where they are on chip
    plan.defines.push(("V4_DW_SMEM".to_string(), plan.dims.dw_smem.to_string()));
    Ok(plan)
}

/// The plan's dims for a grid the driver can make co-resident (`resident` blocks): fewer ranges
/// when the occupancy API allows fewer blocks than planned (the partial-sum buffer, sized for the
/// plan's ranges, is then large enough).
pub fn dims_for_resident(plan: &V4Plan, resident: u32) -> Option<(V4Dims, u32)> {
    let groups = plan.dims.groups as u32;
    if resident < groups {
        return None;
    }
    let ranges = (resident / groups).min(plan.dims.ranges as u32);
    Some((V4Dims { ranges: ranges as i32, ..plan.dims }, ranges * groups))
}

/// The static check of one v4 module instance (`backei kernels --sass`, tests/kernels_compile.rs):
/// the kernels' resources and hot loops as NVRTC compiled them for `arch`, and what is wrong.
#[derive(Clone, Debug)]
pub struct V4Check {
    pub plan: V4Plan,
    pub kernels: Vec<super::sass::KernelCheck>,
    /// Resident blocks per SM of each kernel (registers, shared memory, threads).
    pub blocks_per_sm: Vec<u32>,
    /// Each kernel's cross-block synchronisation as its PTX orders it (`sync_order`).
    pub sync: Vec<super::sync_order::KernelSync>,
    /// Empty when the instance passes: a hot loop without HMMA, local memory, an integer
    /// division in a hot loop, a staging loop with fewer than V4_STAGING_LOADS loads in flight,
    /// a grid larger than the blocks that can be co-resident, a grid barrier or neighbour flag
    /// without its fences (a release before each arrival, an acquire after each poll), L2
    /// prefetches in a build that did not ask for them (or none in one that did), or a call to
    /// outlined code.
    pub problems: Vec<String>,
}

/// The most calls to the float division's slow path a v4 kernel may hold (`sass::float_division_calls`):
/// set-up divisions outside the time loop, never one per element (sm_90, 2026-12-07: one each).
pub const V4_FLOAT_DIVISIONS: usize = 2;

/// The fewest global loads a v4 staging loop may keep in flight (the static check): the halo walk
/// issues StageBatch = 16 elements' loads (4 for dz, of 4–5 loads each) before storing any; NVRTC
/// unrolls a walk of one element at a time by 4 by itself, so fewer than 16 means the batch is
/// lost or shrunk (8 until 2026-12-06, fourth session).
pub const V4_STAGING_LOADS: usize = 16;

/// The plan and module constants of a layer's v4 instance in training (exact firing, the
/// rectangle surrogate, pooling after it: z saved as its one-byte code when ei is on, s as int8).
pub fn training_instance(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    precision: Precision,
) -> Result<(V4Plan, Vec<(String, String)>)> {
    training_instance_tiled(shape, fb, batch, steps, limits, precision, None)
}

/// [`training_instance`] with the tiling `request` asks for (`BACKEI_V4_TILING`'s path): the
/// static check of the instances the kernel bench's tiling sweep may make the fastest.
pub fn training_instance_tiled(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    precision: Precision,
    request: Option<&V4TilingRequest>,
) -> Result<(V4Plan, Vec<(String, String)>)> {
    let mut plan =
        plan_v4_tiled(shape, fb, batch, steps, limits, precision, request).map_err(|why| BackeiError::Cuda(format!("{shape:?}: {why}")))?;
    let neuron = crate::spec::NeuronConfig::default();
    if fb.ei && super::backei_layer::z_code_is_exact(&neuron) {
        plan.code_z();
    }
    // every BackEI layer of the four networks is followed by pooling: s as int8 in training
    plan.store_s8();
    let np = NeuronParams::from_config(&neuron);
    let defines = instance_defines(&plan, &np);
    Ok((plan, defines))
}

/// A module instance's label and its `-D` constants.
pub type LabelledInstance = (&'static str, Vec<(String, String)>);

/// The v4 instances `backei kernels` and CI assemble with ptxas: the module is specialised at
/// compile time (C, H, W, r, precision), and the build without those constants runs only in the
/// CPU emulator, so the report reads instances a GPU loads — fashion-mnist's layer 1 (halo rows of
/// 30 pixels: the row walk) and cifar10's layer 1 (rows of 34: the flat walk), fp32 mode (the
/// default), B = 100, T = 20 on an H100. (The emulator's build picks the walk at run time and holds
/// both, 4 registers more than either: the pip ptxas spills 20 bytes of its sm_90 backward.)
pub fn report_instances() -> Result<Vec<LabelledInstance>> {
    let fb = FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 };
    let mut out = Vec::new();
    for (label, shape) in [("fashion-mnist L1", [32usize, 28, 28]), ("cifar10 L1", [128, 32, 32])] {
        let (_, defines) = training_instance(shape, &fb, 100, 20, &DeviceLimits::H100, Precision::Fp32)?;
        out.push((label, defines));
    }
    Ok(out)
}

/// Compiles the v4 instance of a layer (exact firing, the rectangle surrogate, pooling after it:
/// the training configuration, so z saved as its one-byte code when ei is on and s as int8) for
/// `arch` on a device like `limits` and checks it statically.
pub fn check_instance(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    batch: usize,
    steps: usize,
    limits: &DeviceLimits,
    precision: Precision,
    arch: &str,
) -> Result<V4Check> {
    let (plan, defines) = training_instance(shape, fb, batch, steps, limits, precision)?;
    check_planned(plan, &defines, limits, arch)
}

/// [`check_instance`] of a plan and its module constants (a training instance changed by the
/// caller: `V4Plan::order_by_neighbours`, say; `instance_defines` gives the constants).
pub fn check_planned(plan: V4Plan, defines: &[(String, String)], limits: &DeviceLimits, arch: &str) -> Result<V4Check> {
    let (kernels, ptx) = super::sass::check_module_and_ptx(V4_MODULE, arch, defines)?;
    let mut problems = Vec::new();
    // the phases' ordering across blocks (cuda/v4/sync.cuh): grid barriers in every kernel (phase
    // 0, the final reduction), and with neighbour flags the flags — each released and acquired
    let sync = super::sync_order::kernel_sync(&ptx);
    for s in &sync {
        problems.extend(s.problems.iter().cloned());
        if s.adds == 0 || s.polls == 0 {
            problems.push(format!("{}: no grid barrier found in its PTX (atom.global.add, then polls)", s.kernel));
        }
        if plan.neighbour_sync != (s.exchanges > 0) {
            problems.push(format!("{}: {} flag exchanges in its PTX with neighbour_sync {}", s.kernel, s.exchanges, plan.neighbour_sync));
        }
    }
    let mut blocks_per_sm = Vec::new();
    for k in &kernels {
        // every phase inlined (V4_INLINE_LAMBDA): an outlined phase spills across its call
        if !k.outlined.is_empty() {
            problems.push(format!("{}: calls outlined code (its caller spills across the call): {:?}", k.kernel, k.outlined));
        }
        // no float division per element (common.cuh rcp_rn_unit: the sigmoid's reciprocal without
        // the branch to the slow path, which split each element's epilogue into blocks of its own);
        // a hoisted set-up division or two (the rectangle's 1/width) are allowed
        if k.float_divisions > V4_FLOAT_DIVISIONS {
            problems.push(format!(
                "{}: {} calls to the float division's slow path (at most {V4_FLOAT_DIVISIONS}: a division per element in an epilogue?)",
                k.kernel, k.float_divisions
            ));
        }
        // the L2 prefetches (V4_PREFETCH) are in the build that asked for them, and only there
        if plan.prefetch_l2 != (k.l2_prefetches > 0) {
            problems.push(format!("{}: {} L2 prefetches (CCTL.E.PF2) with prefetch_l2 {}", k.kernel, k.l2_prefetches, plan.prefetch_l2));
        }
        let per_sm = super::sass::blocks_per_sm(k.registers, V4_THREADS, plan.smem_bytes + k.static_smem, limits.max_smem_per_sm);
        blocks_per_sm.push(per_sm);
        if per_sm * limits.sm_count < plan.grid {
            problems.push(format!(
                "{}: the cooperative plan launches {} blocks, but {} registers and {} B of shared memory leave {per_sm} per SM ({} in all)",
                k.kernel,
                plan.grid,
                k.registers,
                plan.smem_bytes + k.static_smem,
                per_sm * limits.sm_count
            ));
        }
        let step_level = k.local_depth <= 1 && k.local_ops <= V4_STEP_LEVEL_LOCAL_OPS;
        if k.local_bytes > 0 && !step_level && !(plan.wide_tile() && k.local_ops <= V4_WIDE_TILE_LOCAL_OPS) {
            problems.push(format!(
                "{}: {} bytes of local memory (spills or an indexed array), {} instructions touching it, the deepest inside {} loop(s)",
                k.kernel, k.local_bytes, k.local_ops, k.local_depth
            ));
        }
        // the halo walks (cuda/v4/halo.cuh, for_each_halo_element): StageBatch elements per
        // thread, one to five loads each, issued before any is stored
        if let Some(&least) = k.staging.iter().min() {
            if least < V4_STAGING_LOADS {
                problems.push(format!(
                    "{}: a staging loop keeps {least} global load(s) in flight (at least {V4_STAGING_LOADS} expected): its \
                     elements wait for more memory round trips; staging loops: {:?}",
                    k.kernel, k.staging
                ));
            }
        } else {
            problems.push(format!("{}: no staging loop found (a loop that loads global and stores shared memory)", k.kernel));
        }
        match k.hot {
            None => problems.push(format!("{}: no loop found", k.kernel)),
            Some(m) => {
                if m.mma == 0 {
                    problems.push(format!("{}: the hot loop has no tensor-core instruction (HMMA): {m:?}", k.kernel));
                }
                if m.local > 0 {
                    problems.push(format!("{}: the hot loop touches local memory: {m:?}", k.kernel));
                }
                if m.idiv > 0 {
                    problems.push(format!("{}: the hot loop divides integers: {m:?}", k.kernel));
                }
            }
        }
    }
    Ok(V4Check { plan, kernels, blocks_per_sm, sync, problems })
}

fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BackeiError {
    move |e| BackeiError::Cuda(format!("{what}: {e:?}"))
}

fn missing(what: &str) -> BackeiError {
    BackeiError::Cuda(format!("BackEI layer (v4): {what} missing"))
}

/// The module instance's constants for a neuron: the plan's, and the firing mode and surrogate
/// (one surrogate's code in the epilogues instead of all of them).
pub fn instance_defines(plan: &V4Plan, np: &NeuronParams) -> Vec<(String, String)> {
    let mut d = plan.defines.clone();
    d.push(("V4_SMOOTH".into(), np.smooth.to_string()));
    d.push(("V4_SURR".into(), np.surrogate.to_string()));
    d
}

/// The kernel of a module instance, opted in to its shared memory, and the launch configuration
/// and dims of the grid the device can make co-resident; the barrier word zeroed.
fn prepare_launch(
    layer: &mut GpuBackEiLayer,
    plan: &V4Plan,
    kernel: &'static str,
    np: &NeuronParams,
) -> Result<(CudaFunction, LaunchConfig, V4Dims)> {
    plan.check_build_constants()?;
    let f = layer.dev.kernels.function_with(V4_MODULE, &instance_defines(plan, np), kernel)?;
    let l = KernelLaunch {
        module: V4_MODULE,
        kernel,
        grid: (plan.grid, 1, 1),
        block: V4_THREADS,
        smem_bytes: plan.smem_bytes,
        cooperative: true,
    };
    opt_in_smem(&f, &l)?;
    let resident = layer.resident_blocks(&f, &l)?;
    let (vd, grid) = dims_for_resident(plan, resident).ok_or_else(|| {
        BackeiError::Cuda(format!(
            "{kernel}: {} channel groups need as many co-resident blocks, the device holds {resident}",
            plan.dims.groups
        ))
    })?;
    let bar = layer.bar.as_mut().ok_or_else(|| missing("the grid barrier"))?;
    layer.dev.stream.memset_zeros(bar).map_err(cuda_err("zeroing the grid barrier"))?;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (V4_THREADS, 1, 1), shared_mem_bytes: plan.smem_bytes };
    Ok((f, cfg, vd))
}

/// The forward: one launch over all T steps, or with `--recompute K` one per window, each keeping
/// v at its end for the next (`GpuBackEiLayer::forward` checked the buffers); with `pooled`, each
/// launch also writes its steps' 2×2 average pooling of s there ([T][B][C][H/2][W/2]; f32, or
/// with `pool_q8` int8 codes of the pooled spikes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    layer: &mut GpuBackEiLayer,
    plan: &V4Plan,
    window: Option<usize>,
    params: &CudaSlice<f32>,
    input: &mut LayerInput,
    dims: LayerDims,
    np: NeuronParams,
    mut pooled: Option<&mut CudaViewMut<f32>>,
    pool_q8: bool,
) -> Result<()> {
    let windows = V4Window::all(dims.t as usize, window);
    let last = windows.len() - 1;
    for (w, mut win) in windows.into_iter().enumerate() {
        let y = pooled.as_deref_mut();
        win.pool_q8 = (pool_q8 && y.is_some()) as i32;
        on_input(input, win, true, &dims, |x, win| {
            launch_forward(layer, plan, params, x, dims, np, win, w.checked_sub(1), (w < last).then_some(w), y)
        })?;
    }
    Ok(())
}

/// Runs `launch` on window `win`'s input: the whole input, or a windowed input's own steps
/// (`fill`: written first) with the window reading them from step t0 (`V4Window::own_input`).
fn on_input(
    input: &mut LayerInput,
    win: V4Window,
    fill: bool,
    dims: &LayerDims,
    launch: impl FnOnce(&CudaView<f32>, V4Window) -> Result<()>,
) -> Result<()> {
    match input {
        LayerInput::Whole(x) => launch(x, win),
        LayerInput::Windows(src) => {
            let (t0, t1) = (win.t0 as usize, win.t1 as usize);
            if fill {
                src.fill(t0, t1)?;
            }
            let x = src.window(t0, t1)?;
            let want = (t1 - t0) * dims.b as usize * dims.c as usize * dims.h as usize * dims.w as usize;
            if x.len() != want {
                return Err(shape_err(format!("BackEI layer input, steps {t0}..{t1}"), want.to_string(), x.len().to_string()));
            }
            launch(&x, win.own_input())
        }
    }
}

/// The backward: one launch over all T steps, or with `--recompute K` the windows in reverse, each
/// but the last (whose state the forward left in place) recomputed from its checkpoint first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    layer: &mut GpuBackEiLayer,
    plan: &V4Plan,
    window: Option<usize>,
    params: &CudaSlice<f32>,
    grads: &mut CudaSlice<f32>,
    input: &mut LayerInput,
    grad_out: &CudaView<f32>,
    grad_in_of: V4GradIn,
    grad_in: &mut CudaViewMut<f32>,
    dims: LayerDims,
    np: NeuronParams,
) -> Result<()> {
    let windows = V4Window::all(dims.t as usize, window);
    let last = windows.len() - 1;
    for (w, win) in windows.into_iter().enumerate().rev() {
        if w != last {
            // (the pooled output was written by the forward; its buffer may hold other data now)
            let ckpt = w.checked_sub(1);
            on_input(input, win, true, &dims, |x, win| launch_forward(layer, plan, params, x, dims, np, win, ckpt, None, None))?;
        }
        // (a windowed input still holds this window: the forward's last fill or the one above)
        on_input(input, win, false, &dims, |x, win| {
            launch_backward(layer, plan, params, grads, x, (grad_out, grad_in_of), grad_in, dims, np, win)
        })?;
    }
    Ok(())
}

/// What both launches read: the saved s, v, g, z (the dummy for a gate that is off), the grid
/// barrier, the weight fragments and their inverse scales.
struct Saved<'a> {
    out: &'a CudaSlice<f32>,
    v: &'a CudaSlice<f32>,
    g: &'a CudaSlice<f32>,
    z: &'a CudaSlice<f32>,
    bar: &'a CudaSlice<u32>,
    wfrag: &'a CudaSlice<f32>,
    winv: &'a CudaSlice<f32>,
}

fn saved(layer: &GpuBackEiLayer) -> Result<Saved<'_>> {
    let d = &layer.dummy;
    Ok(Saved {
        out: layer.out.as_ref().ok_or_else(|| missing("s"))?,
        v: layer.v.as_ref().ok_or_else(|| missing("v"))?,
        g: layer.g.as_ref().unwrap_or(d),
        z: layer.z.as_ref().unwrap_or(d),
        bar: layer.bar.as_ref().ok_or_else(|| missing("the grid barrier"))?,
        wfrag: layer.v4_wfrag.as_ref().ok_or_else(|| missing("the weight fragments"))?,
        winv: layer.v4_winv.as_ref().ok_or_else(|| missing("the weight scales"))?,
    })
}

/// The row maxima (fp32 mode: `plan.rowmax` words), else the dummy word (the other modes' kernels
/// never touch it).
fn rowmax<'a>(layer: &'a GpuBackEiLayer, plan: &V4Plan) -> Result<&'a CudaSlice<f32>> {
    if plan.rowmax == 0 {
        return Ok(&layer.dummy);
    }
    layer.v4_rowmax.as_ref().filter(|r| r.len() >= plan.rowmax).ok_or_else(|| missing("the row maxima"))
}

/// One forward launch over the steps of `win`: v_{t0−1} from checkpoint `ckpt_in`, v_{t1−1} also
/// into checkpoint `ckpt_out` (slots of `v_ckpt`, [B][N] each).
#[allow(clippy::too_many_arguments)]
fn launch_forward(
    layer: &mut GpuBackEiLayer,
    plan: &V4Plan,
    params: &CudaSlice<f32>,
    input: &CudaView<f32>,
    dims: LayerDims,
    np: NeuronParams,
    win: V4Window,
    ckpt_in: Option<usize>,
    ckpt_out: Option<usize>,
    pooled: Option<&mut CudaViewMut<f32>>,
) -> Result<()> {
    let (f, cfg, vd) = prepare_launch(layer, plan, plan.forward, &np)?;
    let stream = layer.dev.stream.clone();
    let Saved { out, v, g, z, bar, wfrag, winv } = saved(layer)?;
    let rowmax = rowmax(layer, plan)?;
    let bn = dims.b as usize * dims.c as usize * dims.h as usize * dims.w as usize;
    let ckpt = |slot: Option<usize>| -> Result<Option<CudaView<f32>>> {
        let Some(i) = slot else { return Ok(None) };
        layer.v_ckpt.as_ref().and_then(|c| c.try_slice(i * bn..(i + 1) * bn)).map(Some).ok_or_else(|| missing("a v checkpoint"))
    };
    let (v_prev, v_last) = (ckpt(ckpt_in)?, ckpt(ckpt_out)?);
    let null = 0u64;
    let mut b = stream.launch_builder(&f);
    b.arg(params).arg(input).arg(out).arg(v).arg(g).arg(z);
    match &v_prev {
        Some(p) => b.arg(p),
        None => b.arg(&null),
    };
    match &v_last {
        Some(p) => b.arg(p),
        None => b.arg(&null),
    };
    match pooled {
        Some(y) => b.arg(y),
        None => b.arg(&null),
    };
    b.arg(rowmax).arg(bar).arg(wfrag).arg(winv).arg(&dims).arg(&np).arg(&vd).arg(&win);
    // SAFETY: the argument list matches backei_forward_v4_*; the buffers were sized by the plan
    // (out: T·B·N; v, g, z: (t1 − t0)·B·N at least; the checkpoints B·N; pooled: T·B·C·⌊H/2⌋·⌊W/2⌋
    // values, f32 or bytes as win.pool_q8 says,
    // checked by GpuBackEiLayer::forward_with; wfrag: 2·groups slices;
    // winv: 2·groups; rowmax: rowmax_words, written by the launch alone); v_last is written by this launch alone (cudarc's shared view only passes
    // its address); the grid is co-resident (occupancy-clamped above), as the kernel's grid
    // barrier requires.
    unsafe { b.launch_cooperative(cfg) }.map_err(cuda_err(plan.forward))?;
    Ok(())
}

/// One backward launch over the steps of `win` (BPTT and the weight gradients, accumulated into
/// `grads` by the launch that ends at t0 = 0).
#[allow(clippy::too_many_arguments)]
fn launch_backward(
    layer: &mut GpuBackEiLayer,
    plan: &V4Plan,
    params: &CudaSlice<f32>,
    grads: &mut CudaSlice<f32>,
    input: &CudaView<f32>,
    (grad_out, grad_in_of): (&CudaView<f32>, V4GradIn),
    grad_in: &mut CudaViewMut<f32>,
    dims: LayerDims,
    np: NeuronParams,
    win: V4Window,
) -> Result<()> {
    let (f, cfg, vd) = prepare_launch(layer, plan, plan.backward, &np)?;
    let stream = layer.dev.stream.clone();
    let Saved { out, v, g, z, bar, wfrag, winv } = saved(layer)?;
    let rowmax = rowmax(layer, plan)?;
    let d = &layer.dummy;
    let dv = layer.dv.as_ref().ok_or_else(|| missing("dv"))?;
    let fb = layer.fb.as_ref().unwrap_or(d);
    let dzr = if plan.dz_ring { layer.dz.as_ref().ok_or_else(|| missing("the dz ring"))? } else { d };
    let da = layer.da.as_ref().unwrap_or(d);
    let part = layer.v4_dw_part.as_ref().ok_or_else(|| missing("the partial weight gradients"))?;
    let whole = win.t0 == 0 && win.t1 == dims.t;
    let carry = if whole && plan.db_carry == 0 { d } else { layer.v4_db_carry.as_ref().ok_or_else(|| missing("the carried bias sums"))? };
    let mut b = stream.launch_builder(&f);
    b.arg(params).arg(&mut *grads).arg(input).arg(out).arg(v).arg(g).arg(z).arg(grad_out).arg(&grad_in_of).arg(&mut *grad_in);
    b.arg(dv).arg(fb).arg(dzr).arg(da).arg(part).arg(carry).arg(rowmax);
    b.arg(bar).arg(wfrag).arg(winv).arg(&dims).arg(&np).arg(&vd).arg(&win);
    // SAFETY: the argument list matches backei_backward_v4_*; grad_out: T·B·N, or when pooled
    // T·B·C·⌊H/2⌋·⌊W/2⌋ (checked by the layer), and the keys the step's key table (slot checked); dv, da: B·N, fb and (dz_ring) the dz ring: min(D, T)·B·N,
    // dw_part: ranges·2·groups·CO_T·(k²·c_pad + 1) for the plan's ranges (≥ vd.ranges);
    // db_carry: grid·CO_T/2·256 (read and written only when the window is not the whole loop or
    // the plan carries the bias sums in it);
    // rowmax: rowmax_words (fp32 mode; the other modes never touch it);
    // the scratch buffers are written by the kernel alone; the grid is co-resident.
    unsafe { b.launch_cooperative(cfg) }.map_err(cuda_err(plan.backward))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fb(r: usize) -> FeedbackConfig {
        FeedbackConfig { back: true, ei: true, radius: r, delay: 1 }
    }

    #[test]
    fn the_fashion_and_mnist_layers_get_resident_weights_and_on_chip_weight_gradients() {
        for (shape, r) in [([32usize, 28, 28], 1usize), ([64, 14, 14], 1), ([15, 24, 24], 2)] {
            let p = plan_v4(shape, &fb(r), 100, 20, &DeviceLimits::H100, Precision::Fp32).unwrap();
            assert!(p.smem_bytes as usize <= DeviceLimits::H100.max_smem_per_block as usize, "{shape:?}: {p:?}");
            assert!(p.dims.dw_smem == 1, "{shape:?}: {p:?}");
            assert_eq!(p.grid as usize, p.dims.groups as usize * p.dims.ranges as usize);
            assert!(p.grid <= DeviceLimits::H100.sm_count, "{shape:?}");
        }
        let l1 = plan_v4([32, 28, 28], &fb(1), 100, 20, &DeviceLimits::H100, Precision::Fp32).unwrap();
        assert_eq!((l1.co_t, l1.dims.groups, l1.dims.w_resident), (32, 1, 1), "{l1:?}");
    }

    #[test]
    fn every_offset_is_16_byte_aligned_and_the_regions_do_not_overlap() {
        for c in [1usize, 15, 16, 33, 64, 128] {
            for p in Precision::ALL {
                for r in [1usize, 2] {
                    let Ok(pl) = plan_v4([c, 9, 11], &fb(r), 3, 4, &DeviceLimits::A100, p) else { continue };
                    let d = pl.dims;
                    for x in [
                        d.smem_dw,
                        d.smem_halo,
                        d.smem_own,
                        d.smem_misc,
                        d.plane_bytes,
                        d.own_plane_bytes,
                        d.pstride,
                        d.own_pstride,
                        d.wslice_bytes,
                    ] {
                        assert_eq!(x % 16, 0, "{c} {p} {r}: {d:?}");
                    }
                    let (eb, planes) = operand_format(p);
                    let kk = ((2 * r + 1) * (2 * r + 1)) as i32;
                    let weights = if d.w_resident == 1 { 2 * d.wslice_bytes } else { kk * d.slab * pl.co_t as i32 * (eb * planes) as i32 };
                    let planes = planes as i32;
                    assert!(d.smem_dw >= weights && d.smem_halo >= d.smem_dw, "{d:?}");
                    assert!(
                        d.smem_own >= d.smem_halo + planes * d.plane_bytes && d.smem_misc >= d.smem_own + planes * d.own_plane_bytes,
                        "{d:?}"
                    );
                    assert!(d.c_pad as usize >= c && d.c_pad % 16 == 0 && d.slab % 16 == 0 && d.slab <= d.c_pad);
                    // conflict-free ldmatrix rows: an odd number of 16-byte units per pixel
                    assert_eq!((d.pstride / 16) % 2, 1, "{d:?}");
                    assert_eq!((d.own_pstride / 16) % 2, 1, "{d:?}");
                }
            }
        }
    }

    #[test]
    fn shapes_v4_cannot_run_say_why() {
        let e = plan_v4([8, 9, 9], &fb(3), 2, 2, &DeviceLimits::H100, Precision::Fp32).unwrap_err();
        assert!(e.contains("radius 3"), "{e}");
        let tiny = DeviceLimits { max_smem_per_block: 4096, ..DeviceLimits::H100 };
        let e = plan_v4([64, 14, 14], &fb(1), 2, 2, &tiny, Precision::Fp32).unwrap_err();
        assert!(e.contains("shared memory"), "{e}");
        let few = DeviceLimits { sm_count: 2, ..DeviceLimits::H100 };
        let e = plan_v4([256, 8, 8], &fb(1), 2, 2, &few, Precision::Bf16).unwrap_err();
        assert!(e.contains("co-resident"), "{e}");
    }

    #[test]
    fn fewer_resident_blocks_shrink_the_ranges_not_the_groups() {
        let p = plan_v4([64, 14, 14], &fb(1), 100, 20, &DeviceLimits::H100, Precision::Fp32).unwrap();
        let (d, grid) = dims_for_resident(&p, 50).unwrap();
        assert_eq!(d.groups, p.dims.groups);
        assert_eq!(grid as i32, d.groups * d.ranges);
        assert!(grid <= 50 && d.ranges <= p.dims.ranges);
        assert!(dims_for_resident(&p, p.dims.groups as u32 - 1).is_none());
    }

    /// Every feasible tiling of the fashion shapes carries the weight gradients' placement as the
    /// build constant its dims say (`V4_DW_SMEM`), and a plan whose dims changed after it fails
    /// the launch's check instead of running kernels built for the other placement.
    #[test]
    fn the_weight_gradient_placement_constant_follows_the_plan() {
        for shape in [[32usize, 28, 28], [64, 14, 14]] {
            for (t, _, _) in v4_tilings(shape, &fb(1), &DeviceLimits::H100, Precision::Fp32) {
                let q = plan_v4_tiled(shape, &fb(1), 100, 20, &DeviceLimits::H100, Precision::Fp32, Some(&t.into())).unwrap();
                q.check_build_constants().unwrap_or_else(|e| panic!("{shape:?} {t}: {e}"));
                assert_eq!(q.defines.iter().filter(|(k, _)| k == "V4_DW_SMEM").count(), 1);
                let mut changed = q.clone();
                changed.dims.dw_smem = 1 - changed.dims.dw_smem;
                let e = changed.check_build_constants().unwrap_err().to_string();
                assert!(e.contains("V4_DW_SMEM"), "{e}");
            }
        }
    }

    #[test]
    fn l2_prefetches_are_opt_in_and_build_the_kernels_once_without_changing_the_plan() {
        env_opt_in(prefetch_l2_from_env, PREFETCH_ENV, "l2", "off", "on");
        let p = opt_in_builds_once("V4_PREFETCH", V4Plan::prefetch_epilogue_inputs);
        assert!(p.prefetch_l2);
    }

    /// An opt-in variable's parser: unset and `off` give false, `on` (blanks around it allowed)
    /// true, and `bad` an error naming the variable and both values.
    fn env_opt_in(parse: fn(Option<&str>) -> Result<bool>, var: &str, on: &str, off: &str, bad: &str) {
        assert!(!parse(None).unwrap());
        assert!(!parse(Some(off)).unwrap());
        assert!(parse(Some(&format!(" {on} "))).unwrap());
        let e = parse(Some(bad)).unwrap_err().to_string();
        assert!(e.contains(var) && e.contains(on) && e.contains(off), "{e}");
    }

    /// A build opt-in of the fashion L1 plan: off by default, its define once however often it is
    /// applied, kept by the emulator's build (tile_defines), and nothing else of the plan changed.
    fn opt_in_builds_once(define: &str, apply: fn(&mut V4Plan)) -> V4Plan {
        let plain = plan_v4([32, 28, 28], &fb(1), 100, 20, &DeviceLimits::H100, Precision::Fp32).unwrap();
        assert!(!plain.defines.iter().any(|(k, _)| k == define));
        let mut p = plain.clone();
        apply(&mut p);
        apply(&mut p);
        assert_eq!(p.defines.iter().filter(|(k, v)| k == define && v == "1").count(), 1, "{:?}", p.defines);
        assert!(p.tile_defines().iter().any(|(k, _)| k == define));
        assert_eq!((p.grid, p.smem_bytes, p.dw_part, p.tiling), (plain.grid, plain.smem_bytes, plain.dw_part, plain.tiling));
        p
    }

    /// `BACKEI_V4_CHUNKS=span`: opt-in, one define; the planes grow only within the device's
    /// shared memory beside the plan's tiling (none at fashion-mnist L1 in fp32, which fills it);
    /// and the chunks it makes (the host twin of the kernel's chunk_len) cover each range in
    /// order, hold at most 128·mt pixels, and keep their halo — virtual rows, 2r padding rows
    /// between samples — within the planes' rows, on every BackEI shape of the four networks in
    /// every precision; and they are fewer where a sample is not a whole number of chunks or a
    /// chunk holds several samples (the numbers docs/gpu.md quotes).
    #[test]
    fn chunks_that_span_samples_are_opt_in_fit_the_halo_planes_and_are_fewer() {
        env_opt_in(span_samples_from_env, CHUNKS_ENV, "span", "sample", "yes");
        assert!(opt_in_builds_once("V4_CROSS", V4Plan::span_samples).span_samples);
        let h100 = DeviceLimits::H100;
        let full = plan_v4([32, 28, 28], &fb(1), 100, 20, &h100, Precision::Fp32).unwrap();
        assert!(!full.span_samples);
        let mut grown = full.clone();
        grown.span_samples_in([32, 28, 28], &fb(1), &h100, 100);
        assert!(grown.span_samples && grown.span_rows_needed([32, 28, 28], 100) > full.dims.halo_rows as usize);
        assert_eq!((grown.dims, grown.smem_bytes), (full.dims, full.smem_bytes), "fashion L1 fp32 fills the shared memory");

        let shapes: [([usize; 3], usize); 9] = [
            ([15, 24, 24], 2),
            ([40, 8, 8], 2),
            ([32, 28, 28], 1),
            ([64, 14, 14], 1),
            ([15, 30, 30], 2),
            ([40, 11, 11], 2),
            ([128, 32, 32], 1),
            ([256, 16, 16], 1),
            ([512, 8, 8], 1),
        ];
        for (shape, r) in shapes {
            for precision in [Precision::Fp32, Precision::Tf32, Precision::Bf16] {
                let Ok(sample) = plan_v4(shape, &fb(r), 100, 20, &h100, precision) else { continue };
                let mut span = sample.clone();
                span.span_samples_in(shape, &fb(r), &h100, 100);
                assert!(span.smem_bytes <= h100.max_smem_per_block && span.dims.halo_rows >= sample.dims.halo_rows);
                assert_eq!((span.tiling, span.grid, span.dims.ranges), (sample.tiling, sample.grid, sample.dims.ranges));
                let (h, w) = (shape[1], shape[2]);
                let hw = h * w;
                let p_ch = 128 * span.mt;
                let mut most_samples = 1;
                for plan in [&sample, &span] {
                    let ranges = plan.chunks(shape, 100);
                    assert_eq!(ranges.len(), plan.dims.ranges as usize);
                    let mut next = 0;
                    for chunks in &ranges {
                        for &(p, len) in chunks {
                            assert_eq!(p, next, "{shape:?} {precision}: the chunks cover the batch in order");
                            assert!(len >= 1 && len <= p_ch, "{shape:?}: a chunk of {len}");
                            next = p + len;
                            let (q, last) = (p % hw, (p + len - 1) - p / hw * hw);
                            assert!(plan.span_samples || last < hw, "{shape:?}: only span crosses a sample's end");
                            most_samples = most_samples.max(last / hw + 1);
                            // virtual rows: y_first − r … the last pixel's row (2r further per sample boundary) + r
                            let rows = (last / w + last / hw * 2 * r) - q / w + 1 + 2 * r;
                            assert!(rows <= plan.dims.halo_rows as usize, "{shape:?} {precision}: a halo of {rows} rows");
                        }
                    }
                    assert_eq!(next, 100 * hw);
                }
                let ((most0, mean0), (most1, mean1)) = (sample.chunk_counts(shape, 100), span.chunk_counts(shape, 100));
                assert!(most1 <= most0 && mean1 <= mean0, "{shape:?} {precision}: {most0} {mean0} -> {most1} {mean1}");
                if precision == Precision::Fp32 && shape == [32, 28, 28] {
                    assert_eq!((most0, most1), (6, 5), "fashion-mnist L1");
                }
                if precision == Precision::Fp32 && shape == [64, 14, 14] {
                    assert_eq!((most0, most1), (7, 5), "fashion-mnist L2");
                }
                if hw % p_ch == 0 {
                    assert_eq!(most1, most0, "{shape:?} {precision}: whole chunks per sample");
                }
                println!(
                    "{shape:?} r {r} {precision} mt {}: chunks per block, most {most0} -> {most1}, mean {mean0:.2} -> {mean1:.2}; \
                     halo rows {} -> {} (smem {} -> {} B), up to {most_samples} samples per chunk",
                    span.mt, sample.dims.halo_rows, span.dims.halo_rows, sample.smem_bytes, span.smem_bytes
                );
            }
        }
    }

    #[test]
    fn neighbour_flags_are_opt_in_build_the_kernels_once_and_size_the_sync_buffer() {
        env_opt_in(neighbour_sync_from_env, SYNC_ENV, "neighbours", "grid", "flags");
        let mut p = plan_v4([32, 28, 28], &fb(1), 100, 20, &DeviceLimits::H100, Precision::Fp32).unwrap();
        assert!(!p.neighbour_sync && !p.defines.iter().any(|(k, _)| k == "V4_SYNC"));
        let grid_smem = p.smem_bytes;
        p.order_by_neighbours();
        p.order_by_neighbours();
        assert!(p.neighbour_sync);
        assert_eq!(p.defines.iter().filter(|(k, v)| k == "V4_SYNC" && v == "1").count(), 1, "{:?}", p.defines);
        // the grid barrier and one phase count per block; the same shared memory either way
        assert_eq!(p.sync_words(), 1 + 132);
        assert_eq!(p.smem_bytes, grid_smem);
        let lp =
            super::super::backei_layer::plan_tensor_cores([32, 28, 28], &fb(1), 100, 20, &DeviceLimits::H100, Precision::Fp32).unwrap();
        assert_eq!(lp.sync_words(), 1 + lp.v4.as_ref().unwrap().grid as usize);
        let v1 = super::super::backei_layer::plan([32, 28, 28], &fb(1), 100, 20, &DeviceLimits::H100).unwrap();
        assert_eq!(v1.sync_words(), 0, "v1 launches nothing cooperative");
    }
}

#[cfg(test)]
mod network_tests {
    use super::*;
    use crate::spec::{LayerSpec, NetworkSpec};

    #[test]
    fn the_planner_takes_the_first_feasible_tiling_and_a_request_any_other() {
        use super::super::backei_layer::{plan_tensor_cores, plan_tensor_cores_with, KernelVersion};
        let fb = |r| FeedbackConfig { back: true, ei: true, radius: r, delay: 1 };
        let h100 = &DeviceLimits::H100;
        for (shape, r) in [([32usize, 28, 28], 1), ([64, 14, 14], 1), ([15, 24, 24], 2), ([256, 16, 16], 1)] {
            for p in Precision::ALL {
                let all = v4_tilings(shape, &fb(r), h100, p);
                let first = plan_v4(shape, &fb(r), 100, 20, h100, p).unwrap();
                assert_eq!(first.tiling, all[0].0, "{shape:?} {p}");
                // every feasible tiling plans, says itself in its fields and fits the device
                for (t, dims, smem) in &all {
                    let q = plan_v4_tiled(shape, &fb(r), 100, 20, h100, p, Some(&V4TilingRequest::from(*t))).unwrap();
                    assert_eq!(q.tiling, *t);
                    assert_eq!((q.co_t, q.mt, q.dims.slab as usize), (t.co_t, t.mt, t.slab));
                    assert_eq!((q.dims.w_resident == 1, q.dims.dw_smem == 1), (t.weights_on_chip, t.dw_on_chip));
                    assert_eq!((q.dims.smem_own, q.smem_bytes as usize), (dims.smem_own, *smem));
                    assert!(*smem <= h100.max_smem_per_block as usize, "{t}: {smem} B");
                }
                let distinct: std::collections::HashSet<_> = all.iter().map(|x| x.0).collect();
                assert_eq!(distinct.len(), all.len(), "{shape:?} {p}: a tiling listed twice");
            }
        }
        // fashion-mnist L1 in fp32 mode: one m-tile per warp with dW on chip first; two m-tiles
        // fit with dW in L2, and the request finds them
        let l1 = [32usize, 28, 28];
        let first = plan_v4(l1, &fb(1), 100, 20, h100, Precision::Fp32).unwrap();
        assert_eq!((first.tiling.mt, first.tiling.dw_on_chip, first.tiling.weights_on_chip), (1, true, true));
        // (two m-tiles with both on chip take 16-channel tiles: two groups stage every halo twice)
        let mt2 = V4TilingRequest::parse("mt=2").unwrap();
        let q = plan_v4_tiled(l1, &fb(1), 100, 20, h100, Precision::Fp32, Some(&mt2)).unwrap();
        assert_eq!((q.mt, q.co_t, q.dims.groups), (2, 16, 2), "{}", q.tiling);
        let mt2 = V4TilingRequest::parse("co_t=32,mt=2").unwrap();
        let q = plan_v4_tiled(l1, &fb(1), 100, 20, h100, Precision::Fp32, Some(&mt2)).unwrap();
        assert_eq!((q.mt, q.co_t), (2, 32));
        assert!(!q.tiling.dw_on_chip || !q.tiling.weights_on_chip, "{}", q.tiling);
        // dW in L2: each range's partial sums in dw_part, sized the same either way
        assert_eq!(q.dw_part, first.dw_part * q.grid as usize / first.grid as usize);
        // no tiling of 32 channels is 64 wide: an error naming the variable and the feasible ones
        let wide = V4TilingRequest::parse("co_t=64").unwrap();
        let e = plan_v4_tiled(l1, &fb(1), 100, 20, h100, Precision::Fp32, Some(&wide)).unwrap_err();
        assert!(e.contains(TILING_ENV) && e.contains("co_t=64") && e.contains(&first.tiling.to_string()), "{e}");
        // through the layer's planner: that request is a configuration error, not a fallback to
        // v3; where v4 cannot run the shape at all, the layer falls back as without a request
        let ask = |t: &str| V4Choices { tiling: Some(V4TilingRequest::parse(t).unwrap()), ..Default::default() };
        let e = plan_tensor_cores_with(l1, &fb(1), 100, 20, h100, Precision::Fp32, &ask("co_t=64")).unwrap_err().to_string();
        assert!(e.contains(TILING_ENV), "{e}");
        let r3 = plan_tensor_cores_with(l1, &fb(3), 100, 20, h100, Precision::Fp32, &ask("co_t=64")).unwrap();
        assert_ne!(r3.version, KernelVersion::V4);
        assert!(r3.fallback.as_deref().is_some_and(|f| f.contains("radius 3")), "{:?}", r3.fallback);
        // the choices reach the plan: the tiling, the phases' order and the buffers they size
        let all = V4Choices { neighbour_sync: true, prefetch_l2: true, ..ask("mt=2") };
        let lp = plan_tensor_cores_with(l1, &fb(1), 100, 20, h100, Precision::Fp32, &all).unwrap();
        let v = lp.v4.as_ref().unwrap();
        assert!(v.neighbour_sync && v.prefetch_l2 && v.mt == 2);
        assert_eq!(v.defines.iter().filter(|(k, v)| k == "V4_PREFETCH" && v == "1").count(), 1, "{:?}", v.defines);
        assert_eq!(lp.buffers.v4_dw_part, v.dw_part);
        assert_eq!(
            plan_tensor_cores_with(l1, &fb(1), 100, 20, h100, Precision::Fp32, &V4Choices::default()).unwrap(),
            plan_tensor_cores(l1, &fb(1), 100, 20, h100, Precision::Fp32).unwrap()
        );
    }

    #[test]
    fn the_bench_sweeps_each_tile_shape_once_the_planners_choice_first() {
        let fb = FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 };
        let h100 = &DeviceLimits::H100;
        let l1 = [32usize, 28, 28];
        let first = plan_v4(l1, &fb, 100, 20, h100, Precision::Fp32).unwrap().tiling;
        let sweep = bench_tilings("sweep", l1, &fb, 100, 20, h100, Precision::Fp32).unwrap();
        let shapes: Vec<(usize, usize)> = sweep.iter().map(|t| (t.co_t, t.mt)).collect();
        // c_pad 32: tiles of 32 and 16 channels, one and two m-tiles each
        assert_eq!(sweep[0], first);
        assert_eq!(shapes.len(), 4, "{shapes:?}");
        for s in [(32, 1), (32, 2), (16, 1), (16, 2)] {
            assert!(shapes.contains(&s), "{shapes:?}");
        }
        let all = bench_tilings("all", l1, &fb, 100, 20, h100, Precision::Fp32).unwrap();
        assert_eq!(all.len(), v4_tilings(l1, &fb, h100, Precision::Fp32).len());
        assert_eq!(all[0], first);
        // a list: each request's first feasible tiling, no repeats; the planner's choice first
        // where the list names it
        let two = bench_tilings("co_t=32,mt=2 ; mt=1 ; co_t=32,mt=1", l1, &fb, 100, 20, h100, Precision::Fp32).unwrap();
        assert_eq!(two.len(), 2, "{two:?}");
        assert_eq!(two[0], first);
        assert_eq!((two[1].co_t, two[1].mt), (32, 2));
        let e = bench_tilings("co_t=64", l1, &fb, 100, 20, h100, Precision::Fp32).unwrap_err().to_string();
        assert!(e.contains("BACKEI_BENCH_V4_TILINGS") && e.contains("co_t=64"), "{e}");
        assert!(bench_tilings("mt=7", l1, &fb, 100, 20, h100, Precision::Fp32).unwrap_err().to_string().contains(TILING_ENV));
    }

    /// The `v4-tune-cifar` stage's default requests (bench/gpu/session.sh V4_CIFAR_TILINGS, the
    /// same as CIFAR10_L1_TUNING, which CI's static check compiles) name three tilings of cifar10
    /// L1 other than the planner's, with fewer channel groups: 2 groups of 64 channels with two and
    /// one m-tiles, 4 of 32 — so that the lease's minutes time what the stage says, not a tiling
    /// found by accident (a request resolves to the first feasible tiling that meets it).
    #[test]
    fn the_cifar10_tuning_requests_name_wider_channel_tiles_than_the_planners() {
        let fb = FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 };
        let l1 = [128usize, 32, 32];
        let session = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/gpu/session.sh")).unwrap();
        let requests = session.split("V4_CIFAR_TILINGS:-").nth(1).and_then(|x| x.split('}').next()).expect("the stage's default requests");
        assert_eq!(requests, CIFAR10_L1_TUNING);
        // (the H100's and H200's limits; on an A100's 163 KB the planner takes 64 channels already)
        let limits = &DeviceLimits::H100;
        let planner = plan_v4(l1, &fb, 100, 20, limits, Precision::Fp32).unwrap();
        assert_eq!((planner.co_t, planner.dims.groups), (16, 8), "{}", planner.tiling);
        let list = bench_tilings(requests, l1, &fb, 100, 20, limits, Precision::Fp32).unwrap();
        let got: Vec<(usize, usize, i32)> = list
            .iter()
            .map(|t| {
                let q = plan_v4_tiled(l1, &fb, 100, 20, limits, Precision::Fp32, Some(&V4TilingRequest::from(*t))).unwrap();
                (t.co_t, t.mt, q.dims.groups)
            })
            .collect();
        assert_eq!(got, [(64, 2, 2), (64, 1, 2), (32, 2, 4)], "{requests}: {list:?}");
        assert!(!list.contains(&planner.tiling));
    }

    /// The fold of a warp's weight-gradient fragment into the shared accumulators (wgrad_gemm:
    /// lane (g, t) updates rows g and g + 8 at columns 2t, 2t + 1 of an n-tile, one float2 each) is
    /// free of bank conflicts with the padded pitch: each half-warp's 16 float2 fall in 32
    /// different banks, for every k²·c_pad the plans make (c_pad a multiple of 16, r = 1 and 2) —
    /// and the unpadded pitch puts 4 or 8 lanes on one bank.
    #[test]
    fn the_weight_gradient_fold_spreads_over_every_bank() {
        let banks_hit = |pitch: usize, n0: usize, half: usize| {
            let mut hit = [0u32; 32];
            for lane in 16 * half..16 * half + 16 {
                let (g, t) = (lane / 4, lane % 4);
                let word = g * pitch + n0 + 2 * t;
                hit[word % 32] += 1;
                hit[(word + 1) % 32] += 1;
            }
            hit.iter().copied().max().unwrap()
        };
        for kk in [9usize, 25] {
            for c_pad in (16..=512).step_by(16) {
                let n_all = kk * c_pad;
                for n0 in (0..n_all).step_by(8).take(8) {
                    for half in 0..2 {
                        assert_eq!(banks_hit(dw_smem_pitch(n_all), n0, half), 1, "k² {kk}, c_pad {c_pad}, n-tile at {n0}");
                    }
                    assert!(banks_hit(n_all, n0, 0) >= 2, "the unpadded pitch conflicts (k² {kk}, c_pad {c_pad})");
                }
            }
        }
    }

    /// Every BackEI layer of the four networks runs on v4 in every precision on an H100/H200; the
    /// plans (printed) are the ones docs/gpu.md describes.
    #[test]
    fn plans_of_the_four_networks() {
        for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::nmnist(), NetworkSpec::cifar10()] {
            for l in spec.plan().unwrap().iter().filter(|l| l.spec == LayerSpec::BackEi) {
                for p in Precision::ALL {
                    match plan_v4(l.output, &spec.feedback, 100, 20, &DeviceLimits::H100, p) {
                        Ok(v) => {
                            // the backward carries its bias sums in memory in fp32 mode and for
                            // the 64-accumulator tiles, in registers otherwise
                            assert_eq!(v.db_carry > 0, p == Precision::Fp32 || v.wide_tile(), "{} {:?} {p}", spec.name, l.output);
                            assert_eq!(v.defines.iter().any(|(k, _)| k == "V4_DB_CARRIED"), v.db_carry > 0);
                            println!(
                                "{:<14} {:?} {p}: co_t {} mt {} groups {} ranges {} smem {} resident weights {} dW on chip {}",
                                spec.name,
                                l.output,
                                v.co_t,
                                v.mt,
                                v.dims.groups,
                                v.dims.ranges,
                                v.smem_bytes,
                                v.dims.w_resident,
                                v.dims.dw_smem
                            )
                        }
                        Err(why) => panic!("{} {:?} {p}: {why}", spec.name, l.output),
                    }
                }
            }
        }
    }
}
