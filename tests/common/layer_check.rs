//! One comparison of a device BackEI layer (a real GPU in `tests/gpu_backei_layer.rs`, the CPU
//! emulation of the same kernels in `tests/emu_kernels.rs`) against the CPU engine, the reference.
//!
//! How it compares (f32 on both sides; the device sums in another order and, on a GPU, contracts
//! to FMA):
//! - every output and saved tensor is poisoned with NaN before the launch, and every element must
//!   come back finite (written);
//! - spikes: per sample, the first step where s differs is a FLIP; a flip must be explained by
//!   rounding (|v − θ| or |z| of the CPU within 1e-4 there), and the flips must be < 1e-4 of the
//!   outputs; the raw mismatch fraction (flips and what they cascade into) is printed;
//! - v, g, z: before the sample's first flip; ∂I: on samples without a flip; dW_b, db_b, dW_e,
//!   db_e (accumulated onto random starting values): when no sample flipped. Each is measured
//!   against the CPU engine run in f64 (the exact answer to the precision that matters here), as
//!   max |x − exact| / max(|exact|, 1e-2 · max|exact|), and must be within 1e-4 OR within 4× the
//!   CPU engine's own f32 error on the same tensor. Why the second clause: a bias gradient sums
//!   T·B·H·W terms, and f32 rounding alone then exceeds 1e-4 (the emulated fashion-mnist layer 1,
//!   1,568 terms, sums up to 30: the f32 CPU engine itself is off by 1.8e-4 in these units). A
//!   sample where the f64 run fires differently from the f32 run is treated as flipped. The smooth
//!   firing mode (no step functions, so no flips) makes every gradient comparison strict.

use backei::cpu::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams};
use backei::gpu::backei_layer::{BackEiSlots, LayerPath, WgradPath};
use backei::spec::{FeedbackConfig, FiringMode, NeuronConfig, Surrogate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub shape: [usize; 3],
    pub fb: FeedbackConfig,
    pub neuron: NeuronConfig,
    pub batch: usize,
    pub steps: usize,
    pub t_in: usize,
    /// Overrides the device's shared memory limit (0 forces the global-memory paths).
    pub smem_limit: Option<u32>,
    /// The path the plan must take.
    pub want_path: LayerPath,
    pub want_wgrad: Option<WgradPath>,
}

#[allow(clippy::too_many_arguments)]
pub fn case(
    name: &str,
    shape: [usize; 3],
    back: bool,
    ei: bool,
    radius: usize,
    delay: usize,
    batch: usize,
    steps: usize,
    t_in: usize,
) -> Case {
    let fused = back || ei;
    Case {
        name: name.into(),
        shape,
        fb: FeedbackConfig { back, ei, radius, delay },
        neuron: NeuronConfig::default(),
        batch,
        steps,
        t_in,
        smem_limit: None,
        want_path: if fused { LayerPath::Fused } else { LayerPath::Plain },
        want_wgrad: None,
    }
}

pub fn smooth(mut c: Case) -> Case {
    c.neuron.mode = FiringMode::Smooth { k: 4.0 };
    c.name += " smooth";
    c
}

pub fn global_mem(mut c: Case) -> Case {
    c.smem_limit = Some(0);
    c.want_wgrad = Some(WgradPath::Separate);
    c.name += " global-memory path";
    c
}

pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn all_written(name: &str, xs: &[f32]) {
    if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
        panic!("{name}: element {i} of {} was not written (still NaN/Inf: {})", xs.len(), xs[i]);
    }
}

/// A case's random data: the flat parameter buffer [pad 3][W_b][b_b][W_e][b_e][pad 2] (empty
/// slots for a disabled gate), the gradient buffer's starting values, I and ∂L/∂s.
pub struct Inputs {
    pub slots: BackEiSlots,
    pub total: usize,
    pub params: Vec<f32>,
    pub grads0: Vec<f32>,
    pub input: Vec<f32>,
    pub grad_out: Vec<f32>,
}

pub fn inputs(c: &Case, seed: u64) -> Inputs {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ch = c.shape[0];
    let n: usize = c.shape.iter().product();
    let (b, t) = (c.batch, c.steps);
    let k = 2 * c.fb.radius + 1;
    let wl = ch * ch * k * k;
    let mut at = 3;
    let mut slot = |len: usize, on: bool| {
        let r = at..at + if on { len } else { 0 };
        at = r.end;
        r
    };
    let slots: BackEiSlots = [slot(wl, c.fb.back), slot(ch, c.fb.back), slot(wl, c.fb.ei), slot(ch, c.fb.ei)];
    let total = at + 2;
    let bound = 1.5 / ((ch * k * k) as f32).sqrt();
    let params = uniform(&mut rng, total, -bound, bound);
    let grads0 = uniform(&mut rng, total, -0.1, 0.1);
    let input = uniform(&mut rng, c.t_in * b * n, -0.6, 1.6);
    let grad_out = uniform(&mut rng, t * b * n, -1.0, 1.0);
    Inputs { slots, total, params, grads0, input, grad_out }
}

/// The CPU engine's forward and backward on the case's data.
pub struct CpuRef {
    pub layer: BackEiLayer<f32>,
    /// grads0 plus the layer's parameter gradients.
    pub grads: Vec<f32>,
    pub gin: Vec<f32>,
    /// The same in f64 (from the same f32 data).
    pub exact: Exact,
}

/// The CPU engine's results in f64.
pub struct Exact {
    pub out: Vec<f64>,
    pub v: Vec<f64>,
    pub g: Vec<f64>,
    pub z: Vec<f64>,
    pub grads: Vec<f64>,
    pub gin: Vec<f64>,
}

fn run_cpu<F: backei::real::Real>(c: &Case, x: &Inputs) -> (BackEiLayer<F>, Vec<F>, Vec<F>) {
    let n: usize = c.shape.iter().product();
    let (b, t) = (c.batch, c.steps);
    let s = &x.slots;
    let cv = |v: &[f32]| v.iter().map(|&a| F::from_f64(a as f64)).collect::<Vec<F>>();
    let params = cv(&x.params);
    let input = cv(&x.input);
    let grad_out = cv(&x.grad_out);
    let mut cpu = BackEiLayer::<F>::new(c.shape, c.fb, &c.neuron);
    let p = BackEiParams { w_b: &params[s[0].clone()], b_b: &params[s[1].clone()], w_e: &params[s[2].clone()], b_e: &params[s[3].clone()] };
    cpu.forward(&p, &input, c.t_in, b, t).unwrap();
    let mut g_cpu = cv(&x.grads0);
    let mut gin = vec![F::from_f64(0.0); c.t_in * b * n];
    {
        let (_, rest) = g_cpu.split_at_mut(s[0].start);
        let (wb, rest) = rest.split_at_mut(s[0].len());
        let (bb, rest) = rest.split_at_mut(s[1].len());
        let (we, rest) = rest.split_at_mut(s[2].len());
        let (be, _) = rest.split_at_mut(s[3].len());
        let mut grads = BackEiGrads { w_b: wb, b_b: bb, w_e: we, b_e: be };
        cpu.backward(&p, &mut grads, &input, c.t_in, &grad_out, &mut gin).unwrap();
    }
    (cpu, g_cpu, gin)
}

pub fn cpu_reference(c: &Case, x: &Inputs) -> CpuRef {
    let (layer, grads, gin) = run_cpu::<f32>(c, x);
    let (l64, grads64, gin64) = run_cpu::<f64>(c, x);
    let exact = Exact { out: l64.out, v: l64.v, g: l64.g, z: l64.z, grads: grads64, gin: gin64 };
    CpuRef { layer, grads, gin, exact }
}

/// max over admitted elements of |a − exact| / max(|exact|, 1e-2·max|exact|, 1e-6).
pub fn err_vs_exact(a: &[f32], exact: &[f64], keep: impl Fn(usize) -> bool) -> f64 {
    err_vs_exact_floor(a, exact, 1e-2, keep)
}

/// [`err_vs_exact`] with the denominator's floor at `floor` × max|exact| (1: the error relative to
/// the tensor's scale, the measure for products rounded to 10 or 7 bits, whose error follows the
/// magnitudes summed, not the sum).
pub fn err_vs_exact_floor(a: &[f32], exact: &[f64], floor: f64, keep: impl Fn(usize) -> bool) -> f64 {
    let scale = exact.iter().fold(0f64, |m, x| m.max(x.abs()));
    let floor = (floor * scale).max(1e-6);
    let mut e = 0f64;
    for i in 0..a.len() {
        if keep(i) {
            e = e.max((a[i] as f64 - exact[i]).abs() / exact[i].abs().max(floor));
        }
    }
    e
}

/// What the device computed (copied to the host).
pub struct DeviceOut {
    pub out: Vec<f32>,
    pub v: Vec<f32>,
    pub g: Option<Vec<f32>>,
    pub z: Option<Vec<f32>>,
    pub gin: Vec<f32>,
    pub grads: Vec<f32>,
}

pub struct Outcome {
    /// Outputs that differ (flips and what they cascade into).
    pub raw: usize,
    /// No sample flipped: every gradient was compared.
    pub strict_grads: bool,
}

/// How close a device must come to the CPU engine.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Relative error of every tensor against the f64 run (the measure of `err_vs_exact`) ...
    pub rel: f64,
    /// ... or at most this many times the f32 CPU engine's own error on the same tensor.
    pub f32_ratio: f64,
    /// A spike flip is rounding when |v − θ| or |z| of the CPU is within this much; smooth-mode
    /// spikes must agree within `rel` of their scale.
    pub flip_window: f32,
    /// The largest fraction of outputs that may flip.
    pub flip_fraction: f64,
    /// The floor of the relative error's denominator, as a fraction of the tensor's scale.
    pub floor: f64,
}

impl Tolerance {
    /// f32 arithmetic in another order (v1–v3; v4 in fp32 mode): see the module comment.
    pub const F32: Tolerance = Tolerance { rel: 1e-4, f32_ratio: 4.0, flip_window: 1e-4, flip_fraction: 1e-4, floor: 1e-2 };

    /// The tensor-core kernels (v4) in a precision mode. fp32 (split fp16 hi + lo, ~22 bits per
    /// operand) is held to the f32 kernels' tolerance. tf32 and bf16 round each operand of a
    /// product to 11 or 8 significant bits (a relative error up to 2^-11 or 2^-8 per operand), so
    /// every tensor is compared relative to its scale (a rounded product's error follows the
    /// magnitudes summed, not their sum, which may cancel) at about 4× and 5× one operand's
    /// rounding: 2e-3 and 2e-2. Spike flips are then expected where |v − θ| or |z| is within that
    /// much; the gradient comparisons use the smooth firing mode, where nothing flips.
    pub fn of(p: backei::Precision) -> Tolerance {
        match p {
            backei::Precision::Fp32 => Tolerance::F32,
            backei::Precision::Tf32 => Tolerance { rel: 2e-3, f32_ratio: 0.0, flip_window: 2e-3, flip_fraction: 2e-2, floor: 1.0 },
            backei::Precision::Bf16 => Tolerance { rel: 2e-2, f32_ratio: 0.0, flip_window: 2e-2, flip_fraction: 5e-2, floor: 1.0 },
        }
    }
}

/// Compares and panics with the case's name on any disagreement; `label` (the kernel version and
/// path) goes into the printed line.
pub fn compare(c: &Case, label: &str, x: &Inputs, r: &CpuRef, d: &DeviceOut) -> Outcome {
    compare_within(c, label, x, r, d, Tolerance::F32)
}

/// [`compare`] with another tolerance (the tensor-core kernels' tf32 and bf16 modes).
pub fn compare_within(c: &Case, label: &str, x: &Inputs, r: &CpuRef, d: &DeviceOut, tol: Tolerance) -> Outcome {
    let n: usize = c.shape.iter().product();
    let (b, t) = (c.batch, c.steps);
    let all = t * b * n;
    let cpu = &r.layer;
    all_written("s", &d.out);
    all_written("v", &d.v);
    if c.fb.back {
        all_written("g", d.g.as_ref().expect("g"));
    }
    if c.fb.ei {
        all_written("z", d.z.as_ref().expect("z"));
    }
    all_written("∂I", &d.gin);
    all_written("gradients", &d.grads);

    // spikes and flips
    let theta = c.neuron.threshold as f32;
    let exact = matches!(c.neuron.mode, FiringMode::Exact);
    let mut first_flip = vec![usize::MAX; b];
    // a sample where some |v − θ| or |z| sits within rounding of a kink of the rectangle
    // surrogate (±width/2) may get another surrogate value on the device without any spike flip
    let mut kink = vec![false; b];
    let mut raw = 0usize;
    let half = match c.neuron.surrogate {
        Surrogate::Rectangle { width } => Some(width as f32 / 2.0),
        _ => None,
    };
    // smooth mode: s is continuous; compare it against 1e-4 of its scale (the second GPU run
    // found s = tanh(k·z)·σ(k·(v − θ)) off by 1.1e-6 where z ≈ 0.003 had cancelled)
    let s_scale = cpu.out.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    // tf32 and bf16 (tolerances relative to a tensor's scale): v and z are held to rel × their
    // scales, and s = σ(k·(v − θ))·tanh(k·z) carries those errors through the functions' steepest
    // slopes, k/4 and k — so s is allowed what they are allowed. (An H200 and the emulator both
    // gave s = −0.26561 against −0.26810 at tf32 where z = −0.070 sits on tanh's steep part: z's
    // error, 2^-11 of the magnitudes W_e ⊛ v sums, times k·(1 − tanh²) ≈ 3.7.)
    let s_tol = match (c.neuron.mode, tol.floor >= 1.0) {
        (FiringMode::Smooth { k }, true) => {
            let scale = |x: &[f32]| x.iter().fold(0f32, |m, y| m.max(y.abs()));
            let z_scale = if c.fb.ei { scale(&cpu.z) } else { 0.0 };
            tol.rel as f32 * s_scale.max(k as f32 * (scale(&cpu.v) / 4.0 + z_scale))
        }
        _ => tol.rel as f32 * s_scale,
    };
    for tt in 0..t {
        for bb in 0..b {
            for i in 0..n {
                let e = (tt * b + bb) * n + i;
                if let (true, Some(h)) = (exact, half) {
                    let near = |x: f32| (x.abs() - h).abs() < tol.flip_window / 10.0;
                    kink[bb] |= near(cpu.v[e] - theta) || (c.fb.ei && near(cpu.z[e]));
                }
                let differs = if exact { d.out[e] != cpu.out[e] } else { (d.out[e] - cpu.out[e]).abs() > s_tol };
                if differs {
                    raw += 1;
                    if first_flip[bb] == usize::MAX {
                        first_flip[bb] = tt;
                        let near_v = (cpu.v[e] - theta).abs() < tol.flip_window;
                        let near_z = c.fb.ei && cpu.z[e].abs() < tol.flip_window;
                        assert!(
                            near_v || near_z,
                            "{}: spike of sample {bb} neuron {i} at t = {tt} differs (device {}, CPU {}) although v − θ = {} and z = {}: not a rounding flip",
                            c.name,
                            d.out[e],
                            cpu.out[e],
                            cpu.v[e] - theta,
                            if c.fb.ei { cpu.z[e] } else { f32::NAN }
                        );
                    }
                }
            }
        }
    }
    let flips = first_flip.iter().filter(|f| **f != usize::MAX).count();
    // samples where the f64 run fires differently from the f32 CPU run: compared like flips
    for tt in 0..t {
        for bb in 0..b {
            let differs = (0..n).any(|i| {
                let e = (tt * b + bb) * n + i;
                if exact {
                    r.exact.out[e] as f32 != cpu.out[e]
                } else {
                    (r.exact.out[e] as f32 - cpu.out[e]).abs() > 1e-4 * s_scale
                }
            });
            if differs && first_flip[bb] > tt {
                first_flip[bb] = tt;
            }
        }
    }
    assert!((flips as f64) / (all as f64) < tol.flip_fraction || flips == 0, "{}: {flips} flips in {all} outputs", c.name);
    if !exact {
        assert_eq!(raw, 0, "{}: in the smooth mode s must agree within {:e} everywhere", c.name, tol.rel);
    }
    // gradients are compared on samples without a flip or a kink
    for (f, k) in first_flip.iter_mut().zip(&kink) {
        if *k && *f == usize::MAX {
            *f = usize::MAX - 1;
        }
    }
    let before_flip = |e: usize| {
        let (tt, bb) = (e / (b * n), (e / n) % b);
        tt < first_flip[bb]
    };
    let ex = &r.exact;
    // (device error, the f32 CPU engine's error), both against the f64 run
    let pair = |dev: &[f32], c32: &[f32], c64: &[f64], keep: &dyn Fn(usize) -> bool| {
        (err_vs_exact_floor(dev, c64, tol.floor, keep), err_vs_exact_floor(c32, c64, tol.floor, keep))
    };
    let no_flip = |e: usize| first_flip[(e / n) % b] == usize::MAX;
    let ev = pair(&d.v, &cpu.v, &ex.v, &before_flip);
    let eg = d.g.as_ref().map(|g| pair(g, &cpu.g, &ex.g, &before_flip)).unwrap_or((0.0, 0.0));
    let ez = d.z.as_ref().map(|z| pair(z, &cpu.z, &ex.z, &before_flip)).unwrap_or((0.0, 0.0));
    let ein = pair(&d.gin, &r.gin, &ex.gin, &no_flip);
    let flips_or_kinks = first_flip.iter().filter(|f| **f != usize::MAX).count();
    let names = ["dW_b", "db_b", "dW_e", "db_e"];
    let mut ew = [(0f64, 0f64); 4];
    let strict = flips_or_kinks == 0;
    if strict {
        for (j, s) in x.slots.iter().enumerate() {
            ew[j] = pair(&d.grads[s.clone()], &r.grads[s.clone()], &ex.grads[s.clone()], &|_| true);
        }
        assert_eq!(d.grads[..3], r.grads[..3], "{}: the padding of the gradient buffer was touched", c.name);
        assert_eq!(d.grads[x.total - 2..], r.grads[x.total - 2..], "{}: the padding of the gradient buffer was touched", c.name);
    }
    let show = |(a, b): (f64, f64)| format!("{a:.1e} (f32 CPU {b:.1e})");
    println!(
        "{:<48} {label} | mismatch {:.2e} flips {flips} | max err vs f64: v {} g {} z {} dI {} {}",
        c.name,
        raw as f64 / all as f64,
        show(ev),
        show(eg),
        show(ez),
        show(ein),
        if strict {
            names.iter().zip(ew).map(|(n, e)| format!("{n} {}", show(e))).collect::<Vec<_>>().join(" ")
        } else {
            "(weights skipped: a flip or a surrogate kink)".into()
        }
    );
    for (what, (e, e32)) in [("v", ev), ("g", eg), ("z", ez), ("∂I", ein)].into_iter().chain(names.into_iter().zip(ew)) {
        assert!(
            e < tol.rel || e <= tol.f32_ratio * e32,
            "{} ({label}): {what} differs from the exact (f64) result by {e:.2e} (relative), the f32 CPU engine by {e32:.2e}",
            c.name
        );
    }
    Outcome { raw, strict_grads: strict }
}

// ---- the case lists both devices run (the GPU in gpu_backei_layer.rs, the emulator in emu_kernels.rs)

/// Odd shapes with every switch: back/ei each on and off, r = 1 (D = 1) and r = 2 (D = 3), T_in = 1
/// and T, batch `batch`; a 1×1 map with r = 0 (a 3×3 gate does not fit it: the spec, the CPU layer
/// and the GPU plan refuse that), D > T, and T = 1.
pub fn odd_shape_cases(batch: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    for (back, ei) in [(true, true), (true, false), (false, true)] {
        for (r, d) in [(1, 1), (2, 3)] {
            for t_in in [1, 6] {
                let name = format!("3×7×9 back {back} ei {ei} r {r} D {d} T_in {t_in} B {batch}");
                cases.push(case(&name, [3, 7, 9], back, ei, r, d, batch, 6, t_in));
            }
        }
    }
    cases.push(case("1×1×1 back+ei r 0 B 3", [1, 1, 1], true, true, 0, 1, 3, 5, 5));
    cases.push(case("2×5×3 back+ei D > T", [2, 5, 3], true, true, 1, 7, 2, 4, 4));
    cases.push(case("4×9×7 back+ei T 1", [4, 9, 7], true, true, 2, 1, 2, 1, 1));
    cases
}

/// Smooth firing (every gradient compared strictly), each case on the OnChip weight-gradient
/// path and on the global-memory (Separate) path.
pub fn smooth_wgrad_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (back, ei) in [(true, true), (true, false), (false, true)] {
        for (r, d, t_in) in [(1, 1, 5), (2, 3, 1)] {
            let mut c =
                smooth(case(&format!("5×7×9 back {back} ei {ei} r {r} D {d} T_in {t_in} B 2"), [5, 7, 9], back, ei, r, d, 2, 5, t_in));
            c.want_wgrad = Some(WgradPath::OnChip);
            cases.push(c.clone());
            cases.push(global_mem(c));
        }
    }
    cases
}

/// The plain layer (back and ei off).
pub fn plain_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for t_in in [1, 7] {
        cases.push(case(&format!("plain 5×7×9 T_in {t_in} B 3"), [5, 7, 9], false, false, 0, 1, 3, 7, t_in));
        cases.push(smooth(case(&format!("plain 300 T_in {t_in} B 4"), [300, 1, 1], false, false, 0, 1, 4, 7, t_in)));
    }
    cases.push(case("plain 1 neuron T 1", [1, 1, 1], false, false, 0, 1, 1, 1, 1));
    cases
}
