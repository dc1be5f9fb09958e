//! The UNFUSED GPU BackEI layer (`gpu::backei_unfused`: pointwise kernels per step, gate
//! convolutions through cuBLAS) against the CPU engine, in the smooth firing mode (no step
//! functions, so every comparison is strict): s, v, g, z, ∂I and the four weight gradients
//! (accumulated onto random starting values) within 1e-4 relative, with a floor of 1e-2·max|ref|
//! as in tests/gpu_backei_layer.rs. Every output, saved tensor and scratch buffer is NaN-poisoned
//! first; every element must come back finite. Shapes: odd maps, batch 1 and 2, back/ei each on
//! and off, r = 1 and 2, D = 1, 3 and D ≥ T, T_in = 1 and T, and a conv workspace so small that
//! every gate conv runs in several chunks.
//!
//! These tests need a CUDA GPU; without one they FAIL when run with `--ignored`.

use backei::cpu::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams};
use backei::gpu::backei_layer::BackEiSlots;
use backei::gpu::backei_unfused::UnfusedBackEiLayer;
use backei::gpu::GpuDevice;
use backei::spec::{FeedbackConfig, FiringMode, NeuronConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

#[derive(Clone, Debug)]
struct Case {
    name: String,
    shape: [usize; 3],
    fb: FeedbackConfig,
    batch: usize,
    steps: usize,
    t_in: usize,
    /// The conv workspace's cap (None: the default).
    ws_bytes: Option<usize>,
}

#[allow(clippy::too_many_arguments)]
fn case(shape: [usize; 3], back: bool, ei: bool, radius: usize, delay: usize, batch: usize, steps: usize, t_in: usize) -> Case {
    Case {
        name: format!("{shape:?} back {back} ei {ei} r {radius} D {delay} B {batch} T {steps} T_in {t_in}"),
        shape,
        fb: FeedbackConfig { back, ei, radius, delay },
        batch,
        steps,
        t_in,
        ws_bytes: None,
    }
}

fn nan_fill(dev: &GpuDevice, buf: &mut CudaSlice<f32>) {
    let f = dev.kernels.function("smoke", "fill_f32").unwrap();
    let n = buf.len() as i32;
    let nan = f32::NAN;
    unsafe { dev.stream.launch_builder(&f).arg(buf).arg(&nan).arg(&n).launch(LaunchConfig::for_num_elems(n as u32)).unwrap() };
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// max |a − b| / max(|b|, 1e-2·max|b|, 1e-6), as tests/gpu_backei_layer.rs.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let floor = (1e-2 * scale).max(1e-6);
    a.iter().zip(b).fold(0f64, |e, (x, y)| e.max((*x as f64 - *y as f64).abs() / (y.abs() as f64).max(floor)))
}

fn all_written(what: &str, xs: &[f32]) {
    if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} of {} was not written (still NaN/Inf: {})", xs.len(), xs[i]);
    }
}

fn run(dev: &Arc<GpuDevice>, c: &Case, seed: u64) {
    let neuron = NeuronConfig { mode: FiringMode::Smooth { k: 4.0 }, ..Default::default() };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ch = c.shape[0];
    let n: usize = c.shape.iter().product();
    let (b, t) = (c.batch, c.steps);
    let all = t * b * n;
    let k = 2 * c.fb.radius + 1;
    let wl = ch * ch * k * k;
    // [pad 3][W_b][b_b][W_e][b_e][pad 2], empty slots for a disabled gate
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
    let grad_out = uniform(&mut rng, all, -1.0, 1.0);

    let mut cpu = BackEiLayer::<f32>::new(c.shape, c.fb, &neuron);
    let p = BackEiParams {
        w_b: &params[slots[0].clone()],
        b_b: &params[slots[1].clone()],
        w_e: &params[slots[2].clone()],
        b_e: &params[slots[3].clone()],
    };
    cpu.forward(&p, &input, c.t_in, b, t).unwrap();
    let mut g_cpu = grads0.clone();
    let mut cpu_gin = vec![0f32; c.t_in * b * n];
    {
        let (_, rest) = g_cpu.split_at_mut(slots[0].start);
        let (wb, rest) = rest.split_at_mut(slots[0].len());
        let (bb, rest) = rest.split_at_mut(slots[1].len());
        let (we, rest) = rest.split_at_mut(slots[2].len());
        let (be, _) = rest.split_at_mut(slots[3].len());
        cpu.backward(&p, &mut BackEiGrads { w_b: wb, b_b: bb, w_e: we, b_e: be }, &input, c.t_in, &grad_out, &mut cpu_gin).unwrap();
    }

    let s = &dev.stream;
    let mut layer = UnfusedBackEiLayer::new(dev, c.shape, c.fb, &neuron).unwrap();
    if let Some(w) = c.ws_bytes {
        layer.ws.max_bytes = w;
    }
    let plan = layer.prepare(b, t).unwrap().clone();
    if c.ws_bytes.is_some() {
        assert!(plan.conv.unwrap().chunks > 1, "{}: the small workspace must split the convs", c.name);
    }
    for buf in [
        &mut layer.out,
        &mut layer.v,
        &mut layer.g,
        &mut layer.z,
        &mut layer.u,
        &mut layer.du,
        &mut layer.dz,
        &mut layer.dvp,
        &mut layer.dvc,
        &mut layer.da,
        &mut layer.ring,
    ]
    .into_iter()
    .flatten()
    {
        nan_fill(dev, buf);
    }
    let d_params = s.clone_htod(&params).unwrap();
    let mut d_grads = s.clone_htod(&grads0).unwrap();
    let d_input = s.clone_htod(&input).unwrap();
    let d_gout = s.clone_htod(&grad_out).unwrap();
    let mut d_gin = s.alloc_zeros::<f32>(c.t_in * b * n).unwrap();
    nan_fill(dev, &mut d_gin);
    layer.forward(&d_params, &slots, &d_input.slice(..), c.t_in, b, t).unwrap();
    let out = s.clone_dtoh(layer.output().unwrap()).unwrap();
    let v = s.clone_dtoh(layer.v.as_ref().unwrap()).unwrap();
    let g = layer.g.as_ref().map(|x| s.clone_dtoh(x).unwrap());
    let z = layer.z.as_ref().map(|x| s.clone_dtoh(x).unwrap());
    layer.backward(&d_params, &mut d_grads, &slots, &d_input.slice(..), c.t_in, &d_gout.slice(..), &mut d_gin.slice_mut(..)).unwrap();
    let gin = s.clone_dtoh(&d_gin).unwrap();
    let grads = s.clone_dtoh(&d_grads).unwrap();

    let mut errs = vec![("s", rel_err(&out, &cpu.out)), ("v", rel_err(&v, &cpu.v))];
    all_written("s", &out);
    all_written("v", &v);
    if let Some(g) = &g {
        all_written("g", g);
        errs.push(("g", rel_err(g, &cpu.g)));
    }
    if let Some(z) = &z {
        all_written("z", z);
        errs.push(("z", rel_err(z, &cpu.z)));
    }
    all_written("∂I", &gin);
    all_written("gradients", &grads);
    errs.push(("∂I", rel_err(&gin, &cpu_gin)));
    for (name, r) in ["dW_b", "db_b", "dW_e", "db_e"].into_iter().zip(slots.iter()) {
        if !r.is_empty() {
            errs.push((name, rel_err(&grads[r.clone()], &g_cpu[r.clone()])));
        }
    }
    assert_eq!(grads[..3], g_cpu[..3], "{}: the padding of the gradient buffer was touched", c.name);
    assert_eq!(grads[total - 2..], g_cpu[total - 2..], "{}: the padding of the gradient buffer was touched", c.name);
    println!(
        "{:<60} launches {:?} | {}",
        c.name,
        plan.launches(),
        errs.iter().map(|(w, e)| format!("{w} {e:.1e}")).collect::<Vec<_>>().join(" ")
    );
    for (what, e) in errs {
        assert!(e < 1e-4, "{}: {what} differs from the CPU by {e:.2e} (relative)", c.name);
    }
}

fn device() -> Arc<GpuDevice> {
    GpuDevice::open(0).expect("these tests need a CUDA GPU")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn unfused_layer_matches_the_cpu_in_smooth_mode_for_every_switch() {
    let dev = device();
    let mut cases = Vec::new();
    for (back, ei) in [(true, true), (true, false), (false, true), (false, false)] {
        for (r, d, t_in) in [(1, 1, 5), (2, 3, 1)] {
            cases.push(case([5, 7, 9], back, ei, r, d, 2, 5, t_in));
        }
    }
    cases.push(case([3, 6, 4], true, true, 1, 7, 1, 4, 4)); // D ≥ T: the feedback never arrives
    cases.push(case([4, 9, 7], true, true, 2, 1, 2, 1, 1)); // T = 1
    cases.push(case([15, 12, 12], true, true, 2, 1, 2, 4, 4)); // mnist-like layer 1, smaller map
    let mut small = case([6, 8, 10], true, true, 1, 2, 3, 4, 1);
    small.ws_bytes = Some(2 * 4 * (6 * 9 + 6) * 80); // two samples per chunk: 2 chunks per conv
    small.name += " small workspace";
    cases.push(small);
    for (i, c) in cases.iter().enumerate() {
        run(&dev, c, 6150 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn unfused_bad_calls_are_errors() {
    let dev = device();
    let fb = FeedbackConfig::default();
    let mut layer = UnfusedBackEiLayer::new(&dev, [2, 3, 3], fb, &NeuronConfig::default()).unwrap();
    let params = dev.stream.alloc_zeros::<f32>(2 * (4 * 9 + 2)).unwrap();
    let slots: BackEiSlots = [0..36, 36..38, 38..74, 74..76];
    let input = dev.stream.alloc_zeros::<f32>(18 * 2).unwrap();
    let e = layer.forward(&params, &slots, &input.slice(..), 2, 1, 3).unwrap_err().to_string();
    assert!(e.contains("T_in"), "{e}");
    let e = layer.forward(&params, &slots, &input.slice(..), 1, 1, 3).unwrap_err().to_string();
    assert!(e.contains("input"), "{e}");
    let bad: BackEiSlots = [0..35, 36..38, 38..74, 74..76];
    let e = layer.forward(&params, &bad, &input.slice(..18), 1, 1, 3).unwrap_err().to_string();
    assert!(e.contains("W_b"), "{e}");
    let mut fresh = UnfusedBackEiLayer::new(&dev, [2, 3, 3], fb, &NeuronConfig::default()).unwrap();
    let mut grads = dev.stream.alloc_zeros::<f32>(76).unwrap();
    let mut gin = dev.stream.alloc_zeros::<f32>(18).unwrap();
    let gout = dev.stream.alloc_zeros::<f32>(54).unwrap();
    let e = fresh
        .backward(&params, &mut grads, &slots, &input.slice(..18), 1, &gout.slice(..), &mut gin.slice_mut(..))
        .unwrap_err()
        .to_string();
    assert!(e.contains("before forward"), "{e}");
    assert!(fresh.output().is_err());
}
