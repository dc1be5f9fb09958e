//! Kernel benchmark in the manner of llm.c's dev/cuda: every workload is first checked against
//! the CPU engine, then timed with CUDA events (warm-up, ≥ 20 repetitions, the median; the L2 is
//! flushed between repetitions by writing a 256 MB buffer) and reported as time, achieved GB/s and
//! GFLOP/s, and the fraction of two ceilings measured at start: device-to-device copy bandwidth
//! and the FP32 FMA rate (`fma_loop_f32` in cuda/smoke.cu).
//!
//! Workloads: the BackEI layer forward and backward at the first and second spiking layers of the
//! mnist, fashion-mnist and cifar10 networks (B = 100, T = 20, back + ei; validated against the
//! CPU at B = 2, T = 4 in the smooth mode, where the comparison is exact up to rounding), and the
//! plain spiking layer on [T = 32, 64 × 65 536] f32 (validated at B = 2).
//! The byte and flop counts are models: bytes = every saved/read tensor once; flops = 2 per
//! multiply-add of the gate convolutions (forward: W_b ⊛ s and W_e ⊛ v; backward: the two adjoint
//! convolutions and the two weight gradients), pointwise work not counted.
//!
//! Every fused workload runs with the v1, v2 and v3 kernels (`KernelVersion`) and the tensor-core
//! v4 kernels in each precision (fp32 = split fp16 hi + lo, tf32, bf16), each validated against
//! the CPU before it is timed (fp32 modes to 1e-4; tf32 and bf16 to 2e-3 and 2e-2 of each
//! tensor's scale, their precision); reference rows `<workload>@v2`, `@v3`, `@v4/<precision>`.
//! A third ceiling, the tensor cores' rate per precision, is measured by `mma_peak_*`
//! (cuda/mma_probe.cu: independent mma.sync on registers); v4 rows also print the fraction of it
//! their issued products reach (fp32 mode issues 3 products per real × real product, 2 per
//! spike × real one).
//! Then the UNFUSED baseline (`gpu::backei_unfused`: a few pointwise kernels per step, the gate
//! convolutions through cuBLAS), validated and timed the same way: rows labelled `unfused` and
//! the reference row `<workload>@unfused`; the speed ratio fused/unfused (unfused time over
//! fused time, > 1 when fusion wins) is printed per fused version.
//!
//! With `$BACKEI_BENCH_V4_TILINGS` (`sweep`, `all` or `BACKEI_V4_TILING` requests separated by
//! `;`: `backei_v4::bench_tilings`) every v4 row is followed by the tilings it names, each
//! validated and timed as its own row (`<workload>@v4/<precision>[co_t=…,mt=…,…]`), then printed
//! fastest first beside the planner's choice.
//!
//! Writes a CSV to `$BACKEI_BENCH_CSV` or `bench/kernels.csv`. Without a GPU it says the GPU part
//! was skipped and exits 0. `cargo bench --bench kernels [-- FILTER]`: FILTER keeps the workloads
//! whose name contains it, or any of its `,`-separated parts (`fashion,cifar10 L1`).

use backei::cpu::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams};
use backei::gpu::backei_layer::{BackEiSlots, DeviceLimits, GpuBackEiLayer, GpuLayer, KernelVersion};
use backei::gpu::backei_unfused::UnfusedBackEiLayer;
use backei::gpu::backei_v4::{bench_tilings, V4Tiling};
use backei::gpu::GpuDevice;
use backei::spec::{FeedbackConfig, FiringMode, NeuronConfig};
use backei::Precision;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

const REPS: usize = 21;
const WARMUP: usize = 3;

struct Bench {
    dev: Arc<GpuDevice>,
    flush: CudaSlice<u8>,
    copy_gbs: f64,
    fma_gflops: f64,
    /// The tensor cores' rate per precision (f16 for fp32 mode's products, tf32, bf16), GFLOP/s.
    tc_gflops: [(Precision, f64); 3],
    rows: Vec<String>,
    failed: Vec<String>,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

impl Bench {
    /// Median milliseconds of `f` over REPS runs, L2 flushed before each.
    fn time(&mut self, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
        let s = self.dev.stream.clone();
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (a, b) = (self.dev.ctx.new_event(flags)?, self.dev.ctx.new_event(flags)?);
        for _ in 0..WARMUP {
            f()?;
        }
        // slow workloads (the cifar10 layers of the v1 kernels take seconds) get fewer repetitions
        a.record(&s)?;
        f()?;
        b.record(&s)?;
        let once = a.elapsed_ms(&b)? as f64;
        let reps = if once * REPS as f64 > 4000.0 { 5 } else { REPS };
        let mut ms = Vec::with_capacity(reps);
        for _ in 0..reps {
            s.memset_zeros(&mut self.flush)?;
            a.record(&s)?;
            f()?;
            b.record(&s)?;
            ms.push(a.elapsed_ms(&b)? as f64);
        }
        ms.sort_by(|x, y| x.total_cmp(y));
        Ok(ms[ms.len() / 2])
    }

    fn report(&mut self, name: &str, kernel: &str, ms: f64, bytes: f64, flops: f64, valid: &str) {
        let gbs = bytes / ms / 1e6;
        let gfl = flops / ms / 1e6;
        println!(
            "{name:<34} {kernel:<9} {ms:>9.3} ms {gbs:>8.1} GB/s ({:>5.1}% of copy) {gfl:>9.1} GFLOP/s ({:>5.1}% of FMA) [{valid}]",
            100.0 * gbs / self.copy_gbs,
            100.0 * gfl / self.fma_gflops
        );
        self.rows.push(format!(
            "{name},{kernel},{ms:.4},{gbs:.2},{gfl:.2},{:.4},{:.4},{valid}",
            gbs / self.copy_gbs,
            gfl / self.fma_gflops
        ));
    }
}

fn ceilings(dev: &Arc<GpuDevice>, flush: &mut CudaSlice<u8>) -> Res<(f64, f64)> {
    let s = &dev.stream;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (a, b) = (dev.ctx.new_event(flags)?, dev.ctx.new_event(flags)?);
    let n = 256usize << 20;
    let src = s.alloc_zeros::<f32>(n / 4)?;
    let mut dst = s.alloc_zeros::<f32>(n / 4)?;
    let mut best = f64::MAX;
    for _ in 0..10 {
        s.memset_zeros(flush)?;
        a.record(s)?;
        s.memcpy_dtod(&src, &mut dst)?;
        b.record(s)?;
        best = best.min(a.elapsed_ms(&b)? as f64);
    }
    let copy = 2.0 * n as f64 / best / 1e6;
    let f = dev.kernels.function("smoke", "fma_loop_f32")?;
    let (blocks, threads, iters) = (132 * 64u32, 256u32, 4096i32);
    let mut y = s.alloc_zeros::<f32>((blocks * threads) as usize)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let (x, c) = (0.999f32, 0.001f32);
    let mut best = f64::MAX;
    for _ in 0..5 {
        a.record(s)?;
        unsafe { s.launch_builder(&f).arg(&mut y).arg(&iters).arg(&x).arg(&c).launch(cfg)? };
        b.record(s)?;
        best = best.min(a.elapsed_ms(&b)? as f64);
    }
    let flops = 2.0 * 8.0 * iters as f64 * (blocks * threads) as f64;
    Ok((copy, flops / best / 1e6))
}

/// The tensor cores' rate for each precision's products (fp32 mode issues fp16 products): the
/// best of 5 launches of `mma_peak_*` (8 independent MMAs per round on register operands).
fn tensor_ceilings(dev: &Arc<GpuDevice>) -> Res<[(Precision, f64); 3]> {
    let s = &dev.stream;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (a, b) = (dev.ctx.new_event(flags)?, dev.ctx.new_event(flags)?);
    let (blocks, threads, iters) = (132 * 8u32, 256u32, 2048i32);
    let mut sink = s.alloc_zeros::<f32>(blocks as usize)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let mut out = [(Precision::Fp32, 0.0), (Precision::Tf32, 0.0), (Precision::Bf16, 0.0)];
    for (p, gflops) in out.iter_mut() {
        let (kernel, k) = match p {
            Precision::Fp32 => ("mma_peak_f16", 16.0),
            Precision::Tf32 => ("mma_peak_tf32", 8.0),
            Precision::Bf16 => ("mma_peak_bf16", 16.0),
        };
        let f = dev.kernels.function("mma_probe", kernel)?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            a.record(s)?;
            // SAFETY: the argument list matches mma_peak_*; sink holds one float per block.
            unsafe { s.launch_builder(&f).arg(&mut sink).arg(&iters).launch(cfg)? };
            b.record(s)?;
            best = best.min(a.elapsed_ms(&b)? as f64);
        }
        let warps = (blocks * threads / 32) as f64;
        let flops = warps * iters as f64 * 8.0 * 2.0 * 16.0 * 8.0 * k;
        *gflops = flops / best / 1e6;
    }
    Ok(out)
}

/// Tensor-core products issued per useful multiply-add of a workload's convolutions (fp32 mode's
/// split: 3 per real × real product, 2 per spike × real one; forward: W_b ⊛ s (spikes), W_e ⊛ v;
/// backward: W_eᵀ ⊛ dz, W_bᵀ ⊛ da, dz ⋆ v, da ⋆ s), averaged over the forward and backward's
/// 3·gates convolutions; 1 in the other modes.
fn products_per_mac(p: Precision, fb: &FeedbackConfig) -> f64 {
    if p != Precision::Fp32 {
        return 1.0;
    }
    let (b, e) = (fb.back as usize as f64, fb.ei as usize as f64);
    // back: 2 (fwd) + 3 (adjoint) + 2 (wgrad); ei: 3 + 3 + 3
    (b * 7.0 + e * 9.0) / (3.0 * (b + e)).max(1.0)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Max relative error, the denominator floored at `floor` × the tensor's scale (1 %, as
/// tests/common/layer_check.rs; 1 = relative to the scale, for tf32 and bf16).
fn max_rel_floor(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let floor = (floor * scale).max(1e-6);
    a.iter().zip(b).fold(0f64, |e, (x, y)| e.max((*x as f64 - *y as f64).abs() / (y.abs() as f64).max(floor)))
}

/// Random parameters and the flat layout [W_b][b_b][W_e][b_e] (empty when off).
fn setup(shape: [usize; 3], fb: &FeedbackConfig, seed: u64) -> (Vec<f32>, BackEiSlots) {
    let c = shape[0];
    let k = 2 * fb.radius + 1;
    let wl = c * c * k * k;
    let mut at = 0;
    let mut slot = |len: usize, on: bool| {
        let r = at..at + if on { len } else { 0 };
        at = r.end;
        r
    };
    let slots = [slot(wl, fb.back), slot(c, fb.back), slot(wl, fb.ei), slot(c, fb.ei)];
    let bound = 1.5 / ((c * k * k) as f32).sqrt();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (uniform(&mut rng, at.max(1), -bound, bound), slots)
}

/// The CPU reference of a validation: the data, the f64 CPU layer's results (the yardstick, as
/// f32) and the f32 CPU layer's (whose error against the f64 sets how close an f32 GPU kernel can
/// be: the tests' criterion, tests/common/layer_check.rs).
struct Reference {
    params: Vec<f32>,
    slots: BackEiSlots,
    input: Vec<f32>,
    gout: Vec<f32>,
    /// s, v, ∂L/∂I, the parameter gradients: f64 engine (rounded to f32), then the f32 engine
    wide: [Vec<f32>; 4],
    narrow: [Vec<f32>; 4],
}

/// A validation's outcome: the device's worst error against the f64 CPU over s, v, ∂I and the
/// gradients, the f32 CPU's worst, and whether every tensor is within its bound.
struct Validation {
    err: f64,
    cpu_err: f64,
    ok: bool,
}

impl Validation {
    fn label(&self) -> String {
        let verdict = if self.ok { "valid" } else { "INVALID" };
        format!("{verdict} (max rel err {:.1e}; f32 CPU {:.1e})", self.err, self.cpu_err)
    }
}

/// One CPU engine's layer at (batch, steps) in the smooth mode (T_in = T), forward and backward:
/// s, v, ∂L/∂I and the parameter gradients, as f32.
fn cpu_layer<F: backei::Real>(
    shape: [usize; 3],
    fb: FeedbackConfig,
    batch: usize,
    steps: usize,
    neuron: &NeuronConfig,
    (params, slots, input, gout): (&[f32], &BackEiSlots, &[f32], &[f32]),
) -> Res<[Vec<f32>; 4]> {
    let wide = |x: &[f32]| x.iter().map(|&v| F::from_f64(v as f64)).collect::<Vec<F>>();
    let narrow = |x: &[F]| x.iter().map(|&v| v.to_f64() as f32).collect::<Vec<f32>>();
    let (params, input, gout) = (wide(params), wide(input), wide(gout));
    let mut cpu = BackEiLayer::<F>::new(shape, fb, neuron);
    let p = BackEiParams {
        w_b: &params[slots[0].clone()],
        b_b: &params[slots[1].clone()],
        w_e: &params[slots[2].clone()],
        b_e: &params[slots[3].clone()],
    };
    cpu.forward(&p, &input, steps, batch, steps)?;
    let mut cg = vec![F::from_f64(0.0); params.len()];
    let mut cgin = vec![F::from_f64(0.0); input.len()];
    {
        let (wb, rest) = cg.split_at_mut(slots[0].len());
        let (bb, rest) = rest.split_at_mut(slots[1].len());
        let (we, rest) = rest.split_at_mut(slots[2].len());
        let (be, _) = rest.split_at_mut(slots[3].len());
        cpu.backward(&p, &mut BackEiGrads { w_b: wb, b_b: bb, w_e: we, b_e: be }, &input, steps, &gout, &mut cgin)?;
    }
    Ok([narrow(&cpu.out), narrow(&cpu.v), narrow(&cgin), narrow(&cg)])
}

/// The f64 and f32 CPU layers at (batch, steps) in the smooth mode, on one set of data.
fn cpu_reference(shape: [usize; 3], fb: FeedbackConfig, batch: usize, steps: usize, neuron: &NeuronConfig) -> Res<Reference> {
    let n: usize = shape.iter().product();
    let (params, slots) = setup(shape, &fb, 7);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let input = uniform(&mut rng, steps * batch * n, -0.6, 1.6);
    let gout = uniform(&mut rng, steps * batch * n, -1.0, 1.0);
    let data = (&params[..], &slots, &input[..], &gout[..]);
    let wide = cpu_layer::<f64>(shape, fb, batch, steps, neuron, data)?;
    let narrow = cpu_layer::<f32>(shape, fb, batch, steps, neuron, data)?;
    Ok(Reference { params, slots, input, gout, wide, narrow })
}

/// A device layer vs the CPU reference `r` at (batch, steps), f32 arithmetic's bound.
fn compare_layer(dev: &Arc<GpuDevice>, layer: &mut impl GpuLayer, r: &Reference, batch: usize, steps: usize) -> Res<Validation> {
    compare_layer_floor(dev, layer, r, batch, steps, F32_BOUND)
}

/// Each of s, v, ∂I and the gradients against the f64 CPU: within `tol` (relative, the
/// denominator floored at `floor` × the tensor's scale) or 4× the f32 CPU engine's own error,
/// whichever is larger — a sum in another order than the CPU's is as good as the f32 CPU's,
/// not equal to it (tests/common/layer_check.rs; at the cifar10 shapes the f32 CPU itself is
/// 1–2e-4 off, and so was every GPU version in the H200 run of 2026-12-04 that a flat 1e-4
/// called invalid).
fn compare_layer_floor(
    dev: &Arc<GpuDevice>,
    layer: &mut impl GpuLayer,
    r: &Reference,
    batch: usize,
    steps: usize,
    (tol, floor): (f64, f64),
) -> Res<Validation> {
    let max_rel = |a: &[f32], b: &[f32]| max_rel_floor(a, b, floor);
    let (params, slots, input, gout) = (&r.params, &r.slots, &r.input, &r.gout);
    let s = &dev.stream;
    let dp = s.clone_htod(params)?;
    let mut dg = s.alloc_zeros::<f32>(params.len())?;
    let di = s.clone_htod(input)?;
    let dgo = s.clone_htod(gout)?;
    let mut dgin = s.alloc_zeros::<f32>(input.len())?;
    layer.forward(&dp, slots, &di.slice(..), steps, batch, steps)?;
    layer.backward(&dp, &mut dg, slots, &di.slice(..), steps, &dgo.slice(..), &mut dgin.slice_mut(..))?;
    let (out, v, _, _) = layer.saved()?;
    let got = [s.clone_dtoh(out)?, s.clone_dtoh(v)?, s.clone_dtoh(&dgin)?, s.clone_dtoh(&dg)?];
    let mut check = Validation { err: 0.0, cpu_err: 0.0, ok: true };
    for ((got, want), cpu) in got.iter().zip(&r.wide).zip(&r.narrow) {
        let (e, c) = (max_rel(got, want), max_rel(cpu, want));
        check.err = check.err.max(e);
        check.cpu_err = check.cpu_err.max(c);
        check.ok &= e <= tol.max(4.0 * c);
    }
    Ok(check)
}

/// f32 arithmetic's validation bound: 1e-4 with a 1 % floor (or 4× the f32 CPU's error).
const F32_BOUND: (f64, f64) = (1e-4, 1e-2);

fn smooth_neuron() -> NeuronConfig {
    NeuronConfig { mode: FiringMode::Smooth { k: 4.0 }, ..Default::default() }
}

/// A kernel version and (v4) its precision.
type Version = (KernelVersion, Precision);

/// The validation bound of a version: fp32 arithmetic to 1e-4 (1 % floor), tf32 and bf16 to their
/// precision relative to each tensor's scale (tests/common/layer_check.rs, `Tolerance::of`).
fn bound((version, p): Version) -> (f64, f64) {
    match (version, p) {
        (KernelVersion::V4, Precision::Tf32) => (2e-3, 1.0),
        (KernelVersion::V4, Precision::Bf16) => (2e-2, 1.0),
        _ => F32_BOUND,
    }
}

/// The fused layer of `version` (and for v4 the tiling asked for, else the planner's), as the
/// validation and the timing both build it.
fn fused_layer(
    dev: &Arc<GpuDevice>,
    shape: [usize; 3],
    fb: FeedbackConfig,
    neuron: &NeuronConfig,
    version: Version,
    tiling: Option<V4Tiling>,
) -> Res<GpuBackEiLayer> {
    let mut layer = GpuBackEiLayer::new(dev, shape, fb, neuron)?;
    (layer.version, layer.precision) = version;
    if let Some(t) = tiling {
        layer.v4_choices.tiling = Some(t.into());
    }
    Ok(layer)
}

/// The fused layer (`version`) vs the CPU at (batch, steps) in the smooth mode.
fn validate(
    dev: &Arc<GpuDevice>,
    shape: [usize; 3],
    fb: FeedbackConfig,
    batch: usize,
    steps: usize,
    version: Version,
    tiling: Option<V4Tiling>,
) -> Res<Validation> {
    let neuron = smooth_neuron();
    let r = cpu_reference(shape, fb, batch, steps, &neuron)?;
    let mut g = fused_layer(dev, shape, fb, &neuron, version, tiling)?;
    let vplan = g.prepare(batch, steps)?.clone();
    if vplan.path == backei::gpu::backei_layer::LayerPath::Fused && vplan.version != version.0 {
        return Err(format!("{shape:?}: {version:?} fell back to {:?}: {:?}", vplan.version, vplan.fallback).into());
    }
    compare_layer_floor(dev, &mut g, &r, batch, steps, bound(version))
}

/// The unfused layer vs the CPU, as `validate`.
fn validate_unfused(dev: &Arc<GpuDevice>, shape: [usize; 3], fb: FeedbackConfig, batch: usize, steps: usize) -> Res<Validation> {
    let neuron = smooth_neuron();
    let r = cpu_reference(shape, fb, batch, steps, &neuron)?;
    compare_layer(dev, &mut UnfusedBackEiLayer::new(dev, shape, fb, &neuron)?, &r, batch, steps)
}

/// Byte and flop models of a workload (see the file's header): (forward bytes, backward bytes,
/// flops of one gate conv over all steps, gates).
fn models(shape: [usize; 3], fb: &FeedbackConfig, batch: usize, steps: usize) -> (f64, f64, f64, usize) {
    let n: usize = shape.iter().product();
    let all = (steps * batch * n) as f64;
    let gates = fb.back as usize + fb.ei as usize;
    let k = 2 * fb.radius + 1;
    let conv_flops = 2.0 * all * (shape[0] * k * k) as f64;
    let plain = gates == 0;
    let fwd_bytes = 4.0 * all * if plain { 3.0 } else { 3.0 + gates as f64 + 1.0 };
    let bwd_bytes = 4.0 * all * if plain { 3.0 } else { 5.0 + 2.0 * gates as f64 };
    (fwd_bytes, bwd_bytes, conv_flops, gates)
}

/// The unfused layer (per-step pointwise kernels, gate convs through cuBLAS) at a workload:
/// validated against the CPU, then timed; rows `<name> fwd/bwd` (`unfused`) and
/// `<ref_name>@unfused` (`fwd+bwd`). Returns the fwd+bwd milliseconds.
#[allow(clippy::too_many_arguments)]
fn unfused_workload(
    bench: &mut Bench,
    name: &str,
    ref_name: &str,
    shape: [usize; 3],
    fb: FeedbackConfig,
    batch: usize,
    steps: usize,
    vb: usize,
    vt: usize,
) -> Res<f64> {
    let check = validate_unfused(&bench.dev, shape, fb, vb, vt)?;
    let valid = check.label();
    if !check.ok {
        bench.failed.push(format!("{name} unfused"));
    }
    let dev = bench.dev.clone();
    let s = dev.stream.clone();
    let n: usize = shape.iter().product();
    let (params, slots) = setup(shape, &fb, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let input = s.clone_htod(&uniform(&mut rng, steps * batch * n, -0.6, 1.6))?;
    let gout = s.clone_htod(&uniform(&mut rng, steps * batch * n, -1.0, 1.0))?;
    let dp = s.clone_htod(&params)?;
    let mut dg = s.alloc_zeros::<f32>(params.len())?;
    let mut gin = s.alloc_zeros::<f32>(steps * batch * n)?;
    let mut layer = UnfusedBackEiLayer::new(&dev, shape, fb, &NeuronConfig::default())?;
    let plan = layer.prepare(batch, steps)?.clone();
    let (fwd_bytes, bwd_bytes, conv_flops, gates) = models(shape, &fb, batch, steps);
    let (lf, lb) = plan.launches();
    let chunks = plan.conv.map_or(0, |p| p.chunks);
    let fwd_ms = bench.time(|| Ok(layer.forward(&dp, &slots, &input.slice(..), steps, batch, steps)?))?;
    bench.report(&format!("{name} fwd {lf} launches {chunks} chunks"), "unfused", fwd_ms, fwd_bytes, gates as f64 * conv_flops, &valid);
    let ms =
        bench.time(|| Ok(layer.backward(&dp, &mut dg, &slots, &input.slice(..), steps, &gout.slice(..), &mut gin.slice_mut(..))?))?;
    bench.report(&format!("{name} bwd {lb} launches"), "unfused", ms, bwd_bytes, 2.0 * gates as f64 * conv_flops, &valid);
    bench.report(&format!("{ref_name}@unfused"), "fwd+bwd", fwd_ms + ms, fwd_bytes + bwd_bytes, 3.0 * gates as f64 * conv_flops, &valid);
    Ok(fwd_ms + ms)
}

#[allow(clippy::too_many_arguments)]
fn layer_workload(
    bench: &mut Bench,
    name: &str,
    ref_name: &str,
    shape: [usize; 3],
    fb: FeedbackConfig,
    batch: usize,
    steps: usize,
    vb: usize,
    vt: usize,
    version: Version,
    tiling: Option<V4Tiling>,
) -> Res<f64> {
    let check = validate(&bench.dev, shape, fb, vb, vt, version, tiling)?;
    let valid = check.label();
    if !check.ok {
        bench.failed.push(format!("{name} {version:?}"));
    }
    let dev = bench.dev.clone();
    let s = dev.stream.clone();
    let n: usize = shape.iter().product();
    let all = (steps * batch * n) as f64;
    let (params, slots) = setup(shape, &fb, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let input = s.clone_htod(&uniform(&mut rng, steps * batch * n, -0.6, 1.6))?;
    let gout = s.clone_htod(&uniform(&mut rng, steps * batch * n, -1.0, 1.0))?;
    let dp = s.clone_htod(&params)?;
    let mut dg = s.alloc_zeros::<f32>(params.len())?;
    let mut gin = s.alloc_zeros::<f32>(steps * batch * n)?;
    let mut layer = fused_layer(&dev, shape, fb, &NeuronConfig::default(), version, tiling)?;
    let plan = layer.prepare(batch, steps)?.clone();
    let gates = fb.back as usize + fb.ei as usize;
    let k = 2 * fb.radius + 1;
    let conv_flops = 2.0 * all * (shape[0] * k * k) as f64;
    let plain = gates == 0;
    let fwd_bytes = 4.0 * all * if plain { 3.0 } else { 3.0 + gates as f64 + 1.0 };
    let ms = bench.time(|| Ok(layer.forward(&dp, &slots, &input.slice(..), steps, batch, steps)?))?;
    let fwd_ms = ms;
    // v4 with its phases ordered by neighbour flags (BACKEI_V4_SYNC=neighbours): rows `…@v4/<p>+flags`,
    // with L2 prefetches (BACKEI_V4_PREFETCH=l2): `…+pf`, with chunks spanning samples
    // (BACKEI_V4_CHUNKS=span): `…+span`, and a tiling other than the planner's
    // (BACKEI_BENCH_V4_TILINGS): rows `…@v4/<p>[co_t=…,mt=…]`
    let mut flags = if plan.v4.as_ref().is_some_and(|v| v.neighbour_sync) { "+flags" } else { "" }.to_string();
    if plan.v4.as_ref().is_some_and(|v| v.prefetch_l2) {
        flags.push_str("+pf");
    }
    if plan.v4.as_ref().is_some_and(|v| v.span_samples) {
        flags.push_str("+span");
    }
    if let Some(t) = tiling {
        flags.push_str(&format!("[{t}]"));
    }
    let kname = match (plain, plan.version) {
        (true, _) => "plain".to_string(),
        (false, KernelVersion::V4) => format!("fused-v4/{}{flags}", version.1),
        (false, v) => format!("fused-{}", format!("{v:?}").to_lowercase()),
    };
    let kname = kname.as_str();
    bench.report(&format!("{name} fwd {:?}", plan.wgrad), kname, ms, fwd_bytes, gates as f64 * conv_flops, &valid);
    let bwd_bytes = 4.0 * all * if plain { 3.0 } else { 5.0 + 2.0 * gates as f64 };
    let ms =
        bench.time(|| Ok(layer.backward(&dp, &mut dg, &slots, &input.slice(..), steps, &gout.slice(..), &mut gin.slice_mut(..))?))?;
    bench.report(&format!("{name} bwd {:?}", plan.wgrad), kname, ms, bwd_bytes, 2.0 * gates as f64 * conv_flops, &valid);
    // the row bench/reference/run.py joins on (its workload names)
    // v1 keeps the reference's workload name (run.py takes a workload's first row); v2 and v3 get
    // `@v2` / `@v3`
    let row = match version.0 {
        KernelVersion::V1 => ref_name.to_string(),
        KernelVersion::V2 => format!("{ref_name}@v2"),
        KernelVersion::V3 => format!("{ref_name}@v3"),
        KernelVersion::V4 => format!("{ref_name}@v4/{}{flags}", version.1),
    };
    let useful = 3.0 * gates as f64 * conv_flops;
    bench.report(&row, "fwd+bwd", fwd_ms + ms, fwd_bytes + bwd_bytes, useful, &valid);
    if plan.version == KernelVersion::V4 {
        let peak = bench.tc_gflops.iter().find(|(p, _)| *p == version.1).map_or(f64::NAN, |x| x.1);
        let issued = useful * products_per_mac(version.1, &fb) / (fwd_ms + ms) / 1e6;
        println!(
            "{row}: {issued:.0} GFLOP/s of tensor-core products issued, {:.1}% of the measured {} rate",
            100.0 * issued / peak,
            version.1
        );
    }
    Ok(fwd_ms + ms)
}

/// A workload as `layer_workload` takes it: name, reference name, shape, switches, B, T and the
/// validation's B and T.
type LayerCase<'a> = (&'a str, &'a str, [usize; 3], FeedbackConfig, usize, usize, usize, usize);

/// Times the v4 tilings `which` names (`bench_tilings`) of one workload and precision, each
/// validated against the CPU first, and prints them fastest first beside the planner's choice
/// (the first of the list): what `BACKEI_V4_TILING` should say if the planner's is not the fastest.
fn tiling_sweep(bench: &mut Bench, which: &str, case: LayerCase, version: Version) {
    let (name, ref_name, shape, f, b, t, vb, vt) = case;
    let list = match DeviceLimits::of(&bench.dev).and_then(|limits| bench_tilings(which, shape, &f, b, t, &limits, version.1)) {
        Ok(l) => l,
        Err(e) => {
            println!("{name} {version:?}: tilings: {e}");
            bench.failed.push(format!("{name} {version:?} tilings: {e}"));
            return;
        }
    };
    let mut timed: Vec<(f64, V4Tiling)> = Vec::new();
    for (i, tiling) in list.iter().enumerate() {
        match layer_workload(bench, name, ref_name, shape, f, b, t, vb, vt, version, Some(*tiling)) {
            Ok(ms) => timed.push((ms, *tiling)),
            Err(e) => {
                println!("{name} {version:?} [{tiling}]: FAILED: {e}");
                bench.failed.push(format!("{name} {version:?} [{tiling}]: {e}"));
            }
        }
        if i == 0 {
            println!("{name} v4/{}: the planner's tiling is {tiling}", version.1);
        }
    }
    let planner = timed.iter().find(|x| Some(&x.1) == list.first()).map(|x| x.0);
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (ms, tiling) in &timed {
        let vs = planner.map_or(String::new(), |p| format!(" ({:.2}x the planner's)", p / ms));
        println!("{name} v4/{} tiling {tiling}: {ms:.3} ms fwd+bwd{vs}", version.1);
    }
    if let (Some((ms, best)), Some(p)) = (timed.first(), planner) {
        if Some(best) != list.first() {
            println!("{name} v4/{}: fastest tiling {best} ({ms:.3} ms, planner's {p:.3} ms): BACKEI_V4_TILING={best}", version.1);
        }
    }
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let dev = match GpuDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("kernels bench: GPU part skipped ({e})");
            cpu_figures(filter.as_deref());
            return;
        }
    };
    if let Err(e) = run(dev, filter) {
        eprintln!("kernels bench failed: {e}");
        std::process::exit(1);
    }
}

/// Whether the bench's FILTER argument keeps a workload: no filter, or a name that contains one
/// of its `,`-separated parts (empty parts ignored; a filter of none keeps every workload).
fn selected(filter: Option<&str>, name: &str) -> bool {
    let mut parts = filter.into_iter().flat_map(|f| f.split(',')).map(str::trim).filter(|x| !x.is_empty()).peekable();
    parts.peek().is_none() || parts.any(|x| name.contains(x))
}

/// Without a GPU: the CPU engine's BackEI layer, forward + backward, on the same layer shapes at
/// B = 2, T = 20 (one run each, its random setup included), so the bench still says something.
fn cpu_figures(filter: Option<&str>) {
    let fb = |r| FeedbackConfig { back: true, ei: true, radius: r, delay: 1 };
    let shapes = [
        ("mnist L1 15x24x24 r2", [15, 24, 24], 2),
        ("mnist L2 40x8x8 r2", [40, 8, 8], 2),
        ("fashion L1 32x28x28 r1", [32, 28, 28], 1),
        ("fashion L2 64x14x14 r1", [64, 14, 14], 1),
        ("cifar10 L1 128x32x32 r1", [128, 32, 32], 1),
        ("cifar10 L2 256x16x16 r1", [256, 16, 16], 1),
    ];
    let (b, t) = (2, 20);
    println!("CPU engine ({} threads), BackEI layer forward + backward, B = {b}, T = {t}, back + ei:", rayon::current_num_threads());
    for (name, shape, r) in shapes {
        if !selected(filter, name) {
            continue;
        }
        let t0 = std::time::Instant::now();
        match cpu_reference(shape, fb(r), b, t, &NeuronConfig::default()) {
            Ok(_) => {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                println!("  {name:<26} {ms:>10.1} ms  ({:.1} ms per sample)", ms / b as f64);
            }
            Err(e) => println!("  {name:<26} failed: {e}"),
        }
    }
}

fn run(dev: Arc<GpuDevice>, filter: Option<String>) -> Res<()> {
    let mut flush = dev.stream.alloc_zeros::<u8>(256 << 20)?;
    let (copy_gbs, fma_gflops) = ceilings(&dev, &mut flush)?;
    let tc_gflops = tensor_ceilings(&dev)?;
    println!(
        "device {} ({}): copy {copy_gbs:.0} GB/s, FP32 FMA {fma_gflops:.0} GFLOP/s, tensor cores (mma.sync) f16 {:.0}, tf32 {:.0}, bf16 {:.0} GFLOP/s",
        dev.name,
        dev.kernels.arch(),
        tc_gflops[0].1,
        tc_gflops[1].1,
        tc_gflops[2].1
    );
    let mut bench = Bench { dev, flush, copy_gbs, fma_gflops, tc_gflops, rows: Vec::new(), failed: Vec::new() };
    let fb = |r| FeedbackConfig { back: true, ei: true, radius: r, delay: 1 };
    let plain = FeedbackConfig { back: false, ei: false, radius: 0, delay: 1 };
    // (name, shape, switches, B, T, B and T of the CPU validation)
    type Workload = (&'static str, [usize; 3], FeedbackConfig, usize, usize, usize, usize, &'static str);
    let workloads: Vec<Workload> = vec![
        ("mnist L1 15x24x24 r2", [15, 24, 24], fb(2), 100, 20, 2, 4, "backei_fwd_bwd/mnist/L1"),
        ("mnist L2 40x8x8 r2", [40, 8, 8], fb(2), 100, 20, 2, 4, "backei_fwd_bwd/mnist/L2"),
        ("fashion L1 32x28x28 r1", [32, 28, 28], fb(1), 100, 20, 2, 4, "backei_fwd_bwd/fashion-mnist/L1"),
        ("fashion L2 64x14x14 r1", [64, 14, 14], fb(1), 100, 20, 2, 4, "backei_fwd_bwd/fashion-mnist/L2"),
        ("cifar10 L1 128x32x32 r1", [128, 32, 32], fb(1), 100, 20, 1, 3, "backei_fwd_bwd/cifar10/L1"),
        ("cifar10 L2 256x16x16 r1", [256, 16, 16], fb(1), 100, 20, 1, 3, "backei_fwd_bwd/cifar10/L2"),
        ("plain 64x65536 T32", [65_536, 1, 1], plain, 64, 32, 2, 32, "plain_lif_fwd_bwd/T32x64x65536"),
    ];
    // v1, v2, v3 and v4 in every precision; $BACKEI_BENCH_VERSIONS narrows it (`v2,v3`, `v4`,
    // `v4/tf32`)
    let all_versions = || -> Vec<Version> {
        let mut v: Vec<Version> = [KernelVersion::V1, KernelVersion::V2, KernelVersion::V3].map(|k| (k, Precision::Fp32)).to_vec();
        v.extend(Precision::ALL.map(|p| (KernelVersion::V4, p)));
        v
    };
    let parse = |item: &str| -> backei::Result<Vec<Version>> {
        let (v, p) = item.split_once('/').unwrap_or((item, ""));
        let version = KernelVersion::parse(v)?;
        Ok(match (version, p) {
            (KernelVersion::V4, "") => Precision::ALL.map(|p| (version, p)).to_vec(),
            (_, "") => vec![(version, Precision::Fp32)],
            (_, p) => vec![(version, p.parse()?)],
        })
    };
    let fused_versions: Vec<Version> = match std::env::var("BACKEI_BENCH_VERSIONS") {
        Ok(list) => match list.split(',').map(parse).collect::<backei::Result<Vec<_>>>() {
            Ok(v) if !v.is_empty() => v.into_iter().flatten().collect(),
            Ok(_) => all_versions(),
            Err(e) => {
                eprintln!("BACKEI_BENCH_VERSIONS: {e}");
                std::process::exit(2);
            }
        },
        Err(_) => all_versions(),
    };
    // v4's other tilings beside the planner's ($BACKEI_BENCH_V4_TILINGS: sweep, all, or requests
    // separated by `;`), each validated and timed as its own row
    let tilings = std::env::var("BACKEI_BENCH_V4_TILINGS").ok().filter(|x| !x.trim().is_empty());
    for (name, shape, f, b, t, vb, vt, ref_name) in workloads {
        if !selected(filter.as_deref(), name) {
            continue;
        }
        // v1, v2 and v3 side by side (each validated against the CPU first; $BACKEI_BENCH_VERSIONS,
        // e.g. `v2,v3`, narrows the list); the plain layer has one version
        let versions: Vec<Version> = if f.back || f.ei { fused_versions.clone() } else { vec![(KernelVersion::V1, Precision::Fp32)] };
        let mut fused_ms = Vec::new();
        for &version in &versions {
            match layer_workload(&mut bench, name, ref_name, shape, f, b, t, vb, vt, version, None) {
                Ok(ms) => fused_ms.push((version, ms)),
                Err(e) => {
                    // one version failing (e.g. a v2 launch error) must not hide the other's timings
                    println!("{name} {version:?}: FAILED: {e}");
                    bench.failed.push(format!("{name} {version:?}: {e}"));
                }
            }
            if version.0 == KernelVersion::V4 {
                if let Some(which) = &tilings {
                    tiling_sweep(&mut bench, which, (name, ref_name, shape, f, b, t, vb, vt), version);
                }
            }
        }
        // the unfused baseline (fused workloads only): what fusion buys
        if f.back || f.ei {
            match unfused_workload(&mut bench, name, ref_name, shape, f, b, t, vb, vt) {
                Ok(un_ms) => {
                    for (version, ms) in fused_ms {
                        let version = format!("{:?}/{}", version.0, version.1);
                        println!(
                            "{name}: fused {version:?} {ms:.3} ms vs unfused {un_ms:.3} ms: speed ratio fused/unfused {:.2}x",
                            un_ms / ms
                        );
                    }
                }
                Err(e) => {
                    println!("{name} unfused: FAILED: {e}");
                    bench.failed.push(format!("{name} unfused: {e}"));
                }
            }
        }
    }
    let path = std::env::var("BACKEI_BENCH_CSV").unwrap_or_else(|_| "bench/kernels.csv".into());
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut csv = String::from("workload,kernel,ms,gb_per_s,gflop_per_s,frac_copy_bw,frac_fma,validation\n");
    for r in &bench.rows {
        csv.push_str(r);
        csv.push('\n');
    }
    std::fs::write(&path, csv)?;
    println!("wrote {path}");
    if !bench.failed.is_empty() {
        return Err(format!("GPU result differs from the CPU for: {}", bench.failed.join(", ")).into());
    }
    Ok(())
}
