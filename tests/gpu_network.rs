//! The GPU engine against its CPU twin: every op on random inputs, a full training step of each
//! of the four networks from identical weights, and 100 training steps of Fashion-MNIST. All need
//! a CUDA GPU (run with `cargo test --test gpu_network -- --ignored`); without one they FAIL.

use backei::cpu::conv::ConvGeom;
use backei::cpu::network::Network;
use backei::cpu::{conv as cconv, dropout as cdrop, linear as clin, loss as closs, pool as cpool};
use backei::gpu::conv::{ConvWorkspace, DEFAULT_WORKSPACE_BYTES};
use backei::gpu::loss::LossBuffers;
use backei::gpu::{conv, dropout, linear, loss, pool, GpuDevice, GpuNetwork, GpuOptimizer};
use backei::{FiringMode, Loss, NetworkSpec, Optimizer, OptimizerConfig};
use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

fn dev() -> Arc<GpuDevice> {
    GpuDevice::open(0).expect("these tests need a CUDA GPU")
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn up(d: &GpuDevice, x: &[f32]) -> CudaSlice<f32> {
    d.stream.clone_htod(x).unwrap()
}

/// A device buffer filled with NaN: whatever the kernel does not write stays NaN.
fn poisoned(d: &GpuDevice, n: usize) -> CudaSlice<f32> {
    up(d, &vec![f32::NAN; n])
}

fn down(d: &GpuDevice, x: &CudaSlice<f32>) -> Vec<f32> {
    d.stream.clone_dtoh(x).unwrap()
}

/// The worst |x − reference| / max(|reference|, floor) over the elements, where floor =
/// 1e-2·max|reference|: below 1 % of a tensor's scale, sums that cancel leave only the engines'
/// f32 rounding (the first GPU run found a W_b gradient element 1e-3 of the scale off by 1.04e-4
/// of the floor). Returns (index, error, the reference's scale).
fn worst_relative<T: Copy + Into<f64>>(x: &[f32], reference: &[T]) -> (usize, f64, f64) {
    assert_eq!(x.len(), reference.len(), "lengths");
    let scale = reference.iter().fold(0f64, |m, &r| m.max(r.into().abs()));
    let floor = 1e-2 * scale.max(1e-30);
    let mut worst = (0usize, 0f64);
    for (i, (&g, &c)) in x.iter().zip(reference).enumerate() {
        let c: f64 = c.into();
        let err = if g.is_finite() { (g as f64 - c).abs() / c.abs().max(floor) } else { f64::INFINITY };
        if err > worst.1 {
            worst = (i, err);
        }
    }
    (worst.0, worst.1, scale)
}

/// Every element written and |gpu − cpu| ≤ rel·max(|cpu|, floor) ([`worst_relative`]).
fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], rel: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    if let Some(i) = gpu.iter().position(|g| !g.is_finite()) {
        panic!("{what}: element {i} not written or not finite ({})", gpu[i]);
    }
    let (i, err, scale) = worst_relative(gpu, cpu);
    println!("{what}: worst relative error {err:.2e} at {i} (max |cpu| {scale:.3e})");
    assert!(err <= rel, "{what}: element {i} gpu {} cpu {} (relative {err:.3e} > {rel:e})", gpu[i], cpu[i]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conv_matches_the_cpu_with_padding_odd_sizes_and_chunks() {
    let d = dev();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (g, samples, ws_bytes) in [
        (ConvGeom::new(3, 5, 9, 11, 3, 1), 6, DEFAULT_WORKSPACE_BYTES),
        (ConvGeom::new(2, 4, 7, 7, 5, 0), 5, DEFAULT_WORKSPACE_BYTES),
        (ConvGeom::new(1, 6, 8, 5, 5, 2), 7, 3000),                   // one sample per chunk
        (ConvGeom::new(4, 3, 10, 9, 3, 1), 9, 4 * (36 + 3) * 90 * 2), // two samples per chunk
    ] {
        let w = rand_vec(&mut rng, g.weight_len(), 0.5);
        let b = rand_vec(&mut rng, g.cout, 0.5);
        let x = rand_vec(&mut rng, samples * g.in_len(), 1.0);
        let dy = rand_vec(&mut rng, samples * g.out_len(), 1.0);
        let dw0 = rand_vec(&mut rng, g.weight_len(), 0.1);
        let db0 = rand_vec(&mut rng, g.cout, 0.1);
        let mut y = vec![0f32; samples * g.out_len()];
        cconv::forward(&g, &w, &b, &x, &mut y);
        let (mut dw, mut db) = (dw0.clone(), db0.clone());
        cconv::backward_weights(&g, &x, &dy, &mut dw, &mut db);
        let mut dx = vec![0f32; samples * g.in_len()];
        cconv::backward_data(&g, &w, &dy, &mut dx, false);

        let mut ws = ConvWorkspace::new(ws_bytes);
        let (wg, bg, xg, dyg) = (up(&d, &w), up(&d, &b), up(&d, &x), up(&d, &dy));
        let mut yg = poisoned(&d, y.len());
        conv::forward(&d, &mut ws, &g, samples, &wg.as_view(), &bg.as_view(), &xg.as_view(), &mut yg.as_view_mut()).unwrap();
        let (mut dwg, mut dbg, mut dxg) = (up(&d, &dw0), up(&d, &db0), poisoned(&d, dx.len()));
        conv::backward(
            &d,
            &mut ws,
            &g,
            samples,
            &wg.as_view(),
            &xg.as_view(),
            &dyg.as_view(),
            &mut dwg.as_view_mut(),
            &mut dbg.as_view_mut(),
            Some(&mut dxg.as_view_mut()),
        )
        .unwrap();
        let tag = format!("conv {g:?} n={samples}");
        assert_close(&format!("{tag} y"), &down(&d, &yg), &y, 1e-4);
        assert_close(&format!("{tag} dW"), &down(&d, &dwg), &dw, 1e-4);
        assert_close(&format!("{tag} db"), &down(&d, &dbg), &db, 1e-4);
        assert_close(&format!("{tag} dx"), &down(&d, &dxg), &dx, 1e-4);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_matches_the_cpu() {
    let d = dev();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n_in, n_out, rows) = (37, 13, 9);
    let w = rand_vec(&mut rng, n_in * n_out, 0.3);
    let b = rand_vec(&mut rng, n_out, 0.3);
    let x = rand_vec(&mut rng, rows * n_in, 1.0);
    let dy = rand_vec(&mut rng, rows * n_out, 1.0);
    let dw0 = rand_vec(&mut rng, n_in * n_out, 0.1);
    let db0 = rand_vec(&mut rng, n_out, 0.1);
    let mut y = vec![0f32; rows * n_out];
    clin::forward(n_in, n_out, &w, &b, &x, &mut y);
    let (mut dw, mut db) = (dw0.clone(), db0.clone());
    clin::backward_weights(n_in, n_out, &x, &dy, &mut dw, &mut db);
    let mut dx = vec![0f32; rows * n_in];
    clin::backward_data(n_in, n_out, &w, &dy, &mut dx);
    let (wg, bg, xg, dyg) = (up(&d, &w), up(&d, &b), up(&d, &x), up(&d, &dy));
    let mut yg = poisoned(&d, y.len());
    linear::forward(&d, n_in, n_out, rows, &wg.as_view(), &bg.as_view(), &xg.as_view(), &mut yg.as_view_mut()).unwrap();
    let (mut dwg, mut dbg, mut dxg) = (up(&d, &dw0), up(&d, &db0), poisoned(&d, dx.len()));
    linear::backward(
        &d,
        n_in,
        n_out,
        rows,
        &wg.as_view(),
        &xg.as_view(),
        &dyg.as_view(),
        &mut dwg.as_view_mut(),
        &mut dbg.as_view_mut(),
        Some(&mut dxg.as_view_mut()),
    )
    .unwrap();
    assert_close("linear y", &down(&d, &yg), &y, 1e-4);
    assert_close("linear dW", &down(&d, &dwg), &dw, 1e-4);
    assert_close("linear db", &down(&d, &dbg), &db, 1e-4);
    assert_close("linear dx", &down(&d, &dxg), &dx, 1e-4);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pool_matches_the_cpu_on_odd_sizes() {
    let d = dev();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (n, c, h, w) in [(4, 3, 7, 9), (2, 5, 8, 8), (3, 1, 5, 2)] {
        let x = rand_vec(&mut rng, n * c * h * w, 1.0);
        let dy = rand_vec(&mut rng, n * c * (h / 2) * (w / 2), 1.0);
        let mut y = vec![0f32; dy.len()];
        cpool::forward(c, h, w, &x, &mut y);
        let mut dx = vec![0f32; x.len()];
        cpool::backward(c, h, w, &dy, &mut dx);
        let (xg, dyg) = (up(&d, &x), up(&d, &dy));
        let (mut yg, mut dxg) = (poisoned(&d, y.len()), poisoned(&d, dx.len()));
        pool::forward(&d, n * c, h, w, &xg.as_view(), pool::PoolIo::F32, &mut yg.as_view_mut()).unwrap();
        pool::backward(&d, n * c, h, w, &dyg.as_view(), &mut dxg.as_view_mut()).unwrap();
        // the same four additions and one multiplication: bit for bit
        assert_eq!(down(&d, &yg), y, "pool forward {n}×{c}×{h}×{w}");
        assert_eq!(down(&d, &dxg), dx, "pool backward {n}×{c}×{h}×{w} (dropped rows/columns must be 0)");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dropout_masks_are_identical_to_the_cpu() {
    let d = dev();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (len, steps, p) = (3001usize, 4usize, 0.5f32);
    let key = backei::rng::dropout_key(4150, 12, 3);
    // i0 > 0: a data-parallel shard's place in the global batch
    for (t_in, i0) in [(1, 0u64), (steps, 0), (1, 3 * len as u64)] {
        // strictly nonzero inputs, so a zero output means a dropped element
        let x: Vec<f32> = (0..t_in * len).map(|_| rng.random_range(0.5f32..1.5) * if rng.random::<bool>() { 1.0 } else { -1.0 }).collect();
        let dy = rand_vec(&mut rng, steps * len, 1.0);
        let xs = if t_in == 1 { x.repeat(steps) } else { x.clone() };
        let mut y = vec![0f32; steps * len];
        cdrop::forward(key, p, len, i0, &xs, &mut y);
        let mask: Vec<u8> = y.iter().map(|&v| (v != 0.0) as u8).collect();
        let mut full = vec![0f32; steps * len];
        cdrop::backward(key, p, len, i0, &dy, &mut full);
        let dx: Vec<f32> =
            if t_in == 1 { (0..len).map(|i| (0..steps).fold(0f32, |a, t| a + full[t * len + i])).collect() } else { full.clone() };
        let (xg, dyg) = (up(&d, &x), up(&d, &dy));
        let (mut yg, mut dxg) = (poisoned(&d, y.len()), poisoned(&d, dx.len()));
        let mut table = dropout::DropoutKeys::new(&d, 2).unwrap();
        table.stage(&d, &[0, key]).unwrap();
        let key_mask = dropout::Mask::Key { keys: &table.keys, slot: 1, index0: i0 };
        dropout::forward(&d, key_mask, p, len, steps, t_in, &xg.as_view(), &mut yg.as_view_mut()).unwrap();
        dropout::backward(&d, key_mask, p, len, steps, t_in, &dyg.as_view(), &mut dxg.as_view_mut()).unwrap();
        let yh = down(&d, &yg);
        let gpu_mask: Vec<u8> = yh.iter().map(|&v| (v != 0.0) as u8).collect();
        assert_eq!(gpu_mask, mask, "T_in = {t_in}, i0 = {i0}: the GPU's mask differs from the CPU's");
        assert_eq!(yh, y, "T_in = {t_in}, i0 = {i0}: outputs");
        assert_eq!(down(&d, &dxg), dx, "T_in = {t_in}, i0 = {i0}: input gradient");
        let kept = mask.iter().filter(|&&m| m == 1).count() as f64 / mask.len() as f64;
        assert!((kept - 0.5).abs() < 0.03, "{kept}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn readout_and_losses_match_the_cpu() {
    let d = dev();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (t, b, k) = (4usize, 5usize, 10usize);
    let s: Vec<f32> = (0..t * b * k).map(|_| [-1.0f32, 0.0, 1.0][rng.random_range(0..3)]).collect();
    let labels: Vec<u8> = (0..b).map(|_| rng.random_range(0..k as u8)).collect();
    let mut y = vec![0f32; b * k];
    closs::readout(&s, t, b, k, &mut y);
    let sg = up(&d, &s);
    let mut yg = poisoned(&d, b * k);
    loss::readout(&d, t, b * k, &sg.as_view(), &mut yg.as_view_mut()).unwrap();
    assert_eq!(down(&d, &yg), y, "readout");
    let mut ds = poisoned(&d, t * b * k);
    let dyr = rand_vec(&mut rng, b * k, 1.0);
    loss::readout_backward(&d, t, b * k, &up(&d, &dyr).as_view(), &mut ds.as_view_mut()).unwrap();
    let expect: Vec<f32> = (0..t).flat_map(|_| dyr.iter().map(|&g| g * (1.0 / t as f32))).collect();
    assert_eq!(down(&d, &ds), expect, "readout backward");
    for kind in [Loss::Mse, Loss::Ce] {
        let mut dy = vec![0f32; b * k];
        let l = closs::loss_and_grad(kind, &y, &labels, k, &mut dy);
        let mut lb = LossBuffers::new(&d, b, k).unwrap();
        d.stream.memcpy_htod(&vec![f32::NAN; b * k], &mut lb.dy).unwrap();
        let (lg, pred) = lb.compute(&d, kind, &yg.as_view(), &labels).unwrap();
        assert!((lg - l as f64).abs() <= 1e-6 * (l as f64).abs().max(1e-6), "{kind:?}: loss {lg} vs {l}");
        assert_close(&format!("{kind:?} dy"), &down(&d, &lb.dy), &dy, 1e-5);
        assert_eq!(pred, closs::argmax_rows(&y, k), "{kind:?}: predictions");
        assert!(lb.compute(&d, kind, &yg.as_view(), &[10, 0, 0, 0, 0]).is_err(), "a label ≥ classes is an error");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_adam_adamw_and_sgd_equal_the_cpu_optimizer() {
    let d = dev();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let n = 100_003;
    for cfg in [
        OptimizerConfig::adam(1e-3),
        OptimizerConfig::Adam { lr: 0.01, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.01, decoupled_weight_decay: false },
        OptimizerConfig::adamw(0.01, 0.05),
        OptimizerConfig::sgd(0.1, 0.9),
        OptimizerConfig::Sgd { lr: 0.05, momentum: 0.0, weight_decay: 1e-3 },
    ] {
        let mut p = rand_vec(&mut rng, n, 1.0);
        let mut cpu = Optimizer::new(cfg, n).unwrap();
        let mut pg = up(&d, &p);
        let mut gpu = GpuOptimizer::new(&d, cfg, n).unwrap();
        for step in 0..6 {
            let g = rand_vec(&mut rng, n, 1.0);
            cpu.update(&mut p, &g);
            gpu.update(&mut pg, &up(&d, &g)).unwrap();
            assert_close(&format!("{cfg:?} step {step} params"), &down(&d, &pg), &p, 1e-6);
        }
        let host = gpu.to_host().unwrap();
        assert_eq!(host.step, cpu.step);
        // the moments are stored in f32 by both; 1e-5 of the floor (first GPU run: 1.6e-6)
        assert_close(&format!("{cfg:?} m"), &host.m, &cpu.m, 1e-5);
        if !cpu.v.is_empty() {
            assert_close(&format!("{cfg:?} v"), &host.v, &cpu.v, 1e-5);
        }
        // the state round-trips through the host (checkpoints)
        let mut again = GpuOptimizer::from_host(&d, &host).unwrap();
        let g = rand_vec(&mut rng, n, 1.0);
        cpu.update(&mut p, &g);
        again.update(&mut pg, &up(&d, &g)).unwrap();
        assert_close(&format!("{cfg:?} after reload"), &down(&d, &pg), &p, 1e-6);
    }
}

fn small(spec: NetworkSpec, mode: FiringMode) -> NetworkSpec {
    let mut s = spec;
    s.steps = 4;
    s.neuron.mode = mode;
    s
}

fn batch_for(spec: &NetworkSpec, b: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let frame: usize = spec.input.iter().product();
    let x = (0..b * frame).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let labels = (0..b).map(|_| rng.random_range(0..10u8)).collect();
    (x, labels)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-300)
}

/// One training step on both engines from identical weights; returns (cpu, gpu) networks.
fn one_step(spec: &NetworkSpec, batch: usize, loss: Loss) -> (Network<f32>, GpuNetwork, f64, f64) {
    let d = dev();
    let mut cpu = Network::<f32>::new(spec, 4150).unwrap();
    let mut gpu = GpuNetwork::from_cpu(&d, &cpu).unwrap();
    assert!(gpu.params_to_host().unwrap() == cpu.params, "identical starting weights");
    let cfg = OptimizerConfig::adam(1e-3);
    let mut oc = Optimizer::new(cfg, cpu.num_params()).unwrap();
    let mut og = GpuOptimizer::new(&d, cfg, gpu.num_params()).unwrap();
    let (x, labels) = batch_for(spec, batch, 9);
    let sc = cpu.train_step(&x, 1, &labels, loss, &mut oc).unwrap();
    let sg = gpu.train_step(&x, 1, &labels, loss, &mut og).unwrap();
    println!("{}: loss cpu {} gpu {}, correct {} / {}", spec.name, sc.loss, sg.loss, sc.correct, sg.correct);
    (cpu, gpu, sc.loss, sg.loss)
}

/// The gradients of `one_step`'s step on the f64 CPU engine, from the f32 network's starting
/// weights (`cpu` has taken its step: its parameters moved, so they are rebuilt from the seed).
fn step_f64(spec: &NetworkSpec, batch: usize, loss: Loss) -> Vec<f64> {
    let start = Network::<f32>::new(spec, 4150).unwrap();
    let mut wide = Network::<f64>::new(spec, 4150).unwrap();
    wide.params = start.params.iter().map(|&p| p as f64).collect();
    let mut o = Optimizer::new(OptimizerConfig::adam(1e-3), wide.num_params()).unwrap();
    let (x, labels) = batch_for(spec, batch, 9);
    let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    wide.train_step(&x, 1, &labels, loss, &mut o).unwrap();
    wide.grads.clone()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_training_step_of_each_network_matches_the_cpu_in_smooth_mode() {
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
        let spec = small(spec, FiringMode::Smooth { k: 4.0 });
        for loss in [Loss::Mse, Loss::Ce] {
            let (cpu, gpu, lc, lg) = one_step(&spec, 3, loss);
            assert!((lc - lg).abs() <= 1e-4 * lc.abs(), "{} {loss:?}: loss {lg} vs {lc}", spec.name);
            let grads = gpu.grads_to_host().unwrap();
            // against the f64 CPU engine from the same weights, within 1e-4 or 4× the f32 CPU
            // engine's own error, whichever is larger (the layer tests' criterion): a GPU sum in
            // another order is as good as the f32 CPU's, not equal to it (an H200 run found a
            // cifar10 conv gradient 1.15e-4 from the f32 CPU's, through v3's atomic weight sums)
            let wide = step_f64(&spec, 3, loss);
            for s in &cpu.slots {
                let what = format!("{} {loss:?} grad {}", spec.name, s.name);
                let (g, c, w) = (&grads[s.range.clone()], &cpu.grads[s.range.clone()], &wide[s.range.clone()]);
                if let Some(i) = g.iter().position(|x| !x.is_finite()) {
                    panic!("{what}: element {i} not written or not finite ({})", g[i]);
                }
                let (_, cpu_err, _) = worst_relative(c, w);
                let (i, err, scale) = worst_relative(g, w);
                let bound = 1e-4f64.max(4.0 * cpu_err);
                println!("{what}: worst relative error {err:.2e} at {i} (f32 CPU {cpu_err:.2e}; max |f64| {scale:.3e})");
                assert!(err <= bound, "{what}: element {i} gpu {} f64 {} (relative {err:.3e} > {bound:.3e})", g[i], w[i]);
            }
            // the Adam step moved both engines' weights the same way: Adam's step is at most
            // ~lr per element, whatever the gradient, so compare within a fraction of it
            let p = gpu.params_to_host().unwrap();
            let worst = p.iter().zip(&cpu.params).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 2.1e-3, "{} {loss:?}: parameters after the step differ by {worst}", spec.name);
            assert_eq!(gpu.iteration, cpu.iteration);
            let (rc, rg) = (cpu.spike_stats(), gpu.spike_stats().unwrap());
            assert_eq!(rc.len(), rg.len());
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_training_step_of_each_network_is_close_to_the_cpu_in_exact_mode() {
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
        let spec = small(spec, FiringMode::Exact);
        let (cpu, gpu, lc, lg) = one_step(&spec, 4, Loss::Mse);
        // spikes may flip where v lands within rounding of θ: a looser check
        assert!((lc - lg).abs() <= 1e-2 * lc.abs().max(1e-3), "{}: loss {lg} vs {lc}", spec.name);
        let grads = gpu.grads_to_host().unwrap();
        assert!(grads.iter().all(|g| g.is_finite()));
        for s in &cpu.slots {
            let (a, b) = (&grads[s.range.clone()], &cpu.grads[s.range.clone()]);
            if b.iter().all(|&x| x == 0.0) {
                assert!(a.iter().all(|&x| x.abs() < 1e-6), "{} {}: the CPU gradient is 0", spec.name, s.name);
                continue;
            }
            let c = cosine(a, b);
            println!("{} {}: cosine {c:.6}", spec.name, s.name);
            assert!(c > 0.99, "{} {}: gradient direction differs (cosine {c})", spec.name, s.name);
        }
        let (rc, rg) = (cpu.spike_stats(), gpu.spike_stats().unwrap());
        for ((i, fc, _), (j, fg, _)) in rc.iter().zip(&rg) {
            assert_eq!(i, j);
            assert!((fc - fg).abs() < 1e-2, "{}: layer {i} firing rate {fg} vs {fc}", spec.name);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn predict_and_evaluate_match_the_cpu_and_buffers_follow_the_batch_shape() {
    let d = dev();
    let spec = small(NetworkSpec::cifar10(), FiringMode::Smooth { k: 4.0 });
    let mut cpu = Network::<f32>::new(&spec, 3).unwrap();
    let mut gpu = GpuNetwork::from_cpu(&d, &cpu).unwrap();
    for b in [2, 5, 2] {
        let (x, labels) = batch_for(&spec, b, b as u64);
        let ec = cpu.evaluate(&x, 1, &labels, Loss::Ce).unwrap();
        let eg = gpu.evaluate(&x, 1, &labels, Loss::Ce).unwrap();
        assert!((ec.loss - eg.loss).abs() <= 1e-4 * ec.loss.abs(), "B = {b}: {} vs {}", eg.loss, ec.loss);
        assert_eq!(cpu.predict(&x, 1, b).unwrap(), gpu.predict(&x, 1, b).unwrap(), "B = {b}");
        // T_in = T (rate-coded input) as well
        let xt = x.repeat(spec.steps);
        let ec = cpu.evaluate(&xt, spec.steps, &labels, Loss::Mse).unwrap();
        let eg = gpu.evaluate(&xt, spec.steps, &labels, Loss::Mse).unwrap();
        assert!((ec.loss - eg.loss).abs() <= 1e-4 * ec.loss.abs(), "B = {b}, T_in = T: {} vs {}", eg.loss, ec.loss);
    }
    // bad input is an error, never a panic
    assert!(gpu.forward(&[0.0; 7], 1, 2).is_err());
    assert!(gpu.evaluate(&vec![0.0; 3 * 32 * 32], 1, &[11], Loss::Mse).is_err());
    assert!(gpu.forward(&vec![f32::NAN; 3 * 32 * 32], 1, 1).is_err());
}

/// The Fashion-MNIST folder: `$BACKEI_DATA/fashion-mnist`, the copy `../shared/gpu/pack --data`
/// puts in `.gpu/data/`, or Debian's `/usr/share/datasets/fashion-mnist`.
fn fashion_dir() -> String {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("BACKEI_DATA") {
        candidates.push(std::path::PathBuf::from(d).join("fashion-mnist"));
    }
    candidates.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".gpu/data/fashion-mnist"));
    candidates.push("/usr/share/datasets/fashion-mnist".into());
    candidates
        .iter()
        .find(|d| d.join("train-images-idx3-ubyte.gz").is_file())
        .unwrap_or_else(|| panic!("Fashion-MNIST not found in any of {candidates:?}"))
        .display()
        .to_string()
}

fn read_idx(path: &str) -> (Vec<usize>, Vec<u8>) {
    use std::io::Read;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(f).read_to_end(&mut bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(bytes.len() >= 4 && bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 8, "{path}: not an IDX file of u8");
    let nd = bytes[3] as usize;
    let dims: Vec<usize> = (0..nd).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let data = bytes[4 + 4 * nd..].to_vec();
    assert_eq!(data.len(), dims.iter().product::<usize>(), "{path}: truncated");
    (dims, data)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn hundred_fashion_mnist_steps_follow_the_cpu_loss_curve() {
    let d = dev();
    let dir = fashion_dir();
    let (dims, images) = read_idx(&format!("{dir}/train-images-idx3-ubyte.gz"));
    let (_, labels) = read_idx(&format!("{dir}/train-labels-idx1-ubyte.gz"));
    assert_eq!(&dims[1..], &[28, 28]);
    // Smooth firing (k = 4): with the exact step functions a spike that flips on rounding sends
    // the two engines down different trajectories (the second GPU run, exact mode, B = 8: loss
    // curves 8.7 % apart on average though both learned); smooth firing has no flips, so the
    // curves must agree to rounding. The exact mode's agreement is checked per step in
    // a_training_step_of_each_network_is_close_to_the_cpu_in_exact_mode.
    let mut spec = NetworkSpec::fashion_mnist();
    spec.steps = 4;
    spec.neuron.mode = FiringMode::Smooth { k: 4.0 };
    let (b, steps) = (16usize, 100usize);
    let mut cpu = Network::<f32>::new(&spec, 4150).unwrap();
    let mut gpu = GpuNetwork::from_cpu(&d, &cpu).unwrap();
    let cfg = OptimizerConfig::adam(1e-3);
    let mut oc = Optimizer::new(cfg, cpu.num_params()).unwrap();
    let mut og = GpuOptimizer::new(&d, cfg, gpu.num_params()).unwrap();
    let (mut lc, mut lg) = (Vec::new(), Vec::new());
    for it in 0..steps {
        let start = it * b;
        let x: Vec<f32> = images[start * 784..(start + b) * 784].iter().map(|&p| p as f32 / 255.0).collect();
        let y = &labels[start..start + b];
        lc.push(cpu.train_step(&x, 1, y, Loss::Mse, &mut oc).unwrap().loss);
        lg.push(gpu.train_step(&x, 1, y, Loss::Mse, &mut og).unwrap().loss);
    }
    println!("step  cpu loss   gpu loss");
    for (i, (c, g)) in lc.iter().zip(&lg).enumerate() {
        println!("{i:>4}  {c:.6}  {g:.6}");
    }
    let mean_rel = lc.iter().zip(&lg).map(|(c, g)| (c - g).abs() / c.abs().max(1e-12)).sum::<f64>() / steps as f64;
    println!("mean relative difference {:.3} %", 100.0 * mean_rel);
    assert!(mean_rel < 0.01, "the GPU loss curve departs from the CPU's by {:.3} % on average", 100.0 * mean_rel);
    let first: f64 = lc[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = lc[steps - 10..].iter().sum::<f64>() / 10.0;
    assert!(last < first, "the loss must fall over 100 steps ({first} → {last})");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn deterministic_training_is_bit_reproducible() {
    // --deterministic: the same steps from the same weights give bit-identical parameters, so a
    // resumed GPU run equals an uninterrupted one (as on the CPU)
    let d = dev();
    let mut spec = NetworkSpec::fashion_mnist();
    spec.steps = 4;
    let cpu = Network::<f32>::new(&spec, 4150).unwrap();
    let (x, labels) = batch_for(&spec, 6, 11);
    let run = || {
        let mut g = GpuNetwork::from_cpu(&d, &cpu).unwrap();
        g.set_deterministic(true);
        let mut o = GpuOptimizer::new(&d, OptimizerConfig::adam(1e-3), g.num_params()).unwrap();
        let losses: Vec<f64> = (0..3).map(|_| g.train_step(&x, 1, &labels, Loss::Mse, &mut o).unwrap().loss).collect();
        (g.params_to_host().unwrap(), losses)
    };
    let (p1, l1) = run();
    let (p2, l2) = run();
    assert_eq!(l1, l2);
    assert!(p1.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()), "parameters differ between two deterministic runs");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_profiled_step_names_every_op_and_changes_nothing() {
    let d = dev();
    let spec = small(NetworkSpec::fashion_mnist(), FiringMode::Exact);
    let (x, labels) = batch_for(&spec, 4, 3);
    let cfg = OptimizerConfig::adam(1e-3);
    // two identical networks, one profiled: the same parameters after a step
    let cpu = Network::<f32>::new(&spec, 4150).unwrap();
    let (mut a, mut b) = (GpuNetwork::from_cpu(&d, &cpu).unwrap(), GpuNetwork::from_cpu(&d, &cpu).unwrap());
    // bit-for-bit needs the deterministic plans: v2/v3's weight gradients otherwise add their
    // blocks' partials with atomics, in an order that differs between any two runs (profiled or not)
    a.set_deterministic(true);
    b.set_deterministic(true);
    let (mut oa, mut ob) = (GpuOptimizer::new(&d, cfg, a.num_params()).unwrap(), GpuOptimizer::new(&d, cfg, b.num_params()).unwrap());
    b.set_profiling(true).unwrap();
    a.train_step(&x, 1, &labels, Loss::Mse, &mut oa).unwrap();
    b.train_step(&x, 1, &labels, Loss::Mse, &mut ob).unwrap();
    let rows = b.take_profile().unwrap();
    assert!(a.params_to_host().unwrap() == b.params_to_host().unwrap(), "profiling changed the step");
    let labels_seen: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for want in ["forward layer 0 conv", "optimizer"] {
        assert!(labels_seen.contains(&want), "no `{want}` in {labels_seen:?}");
    }
    // the BackEI layers are labelled with the kernels they run (v3 by default, or a fallback)
    for want in ["forward layer 1 backei v", "backward layer 1 backei v"] {
        assert!(labels_seen.iter().any(|l| l.starts_with(want)), "no `{want}…` in {labels_seen:?}");
    }
    // the readout and the loss run inside the last spiking layer's launches (fused by default)
    for want in ["spiking with the readout", "spiking with the loss"] {
        assert!(labels_seen.iter().any(|l| l.ends_with(want)), "no `… {want}` in {labels_seen:?}");
    }
    assert!(rows.iter().all(|r| r.1 >= 0.0) && rows.iter().map(|r| r.1).sum::<f64>() > 0.0, "{rows:?}");
    b.set_profiling(false).unwrap();
    assert!(b.take_profile().unwrap().is_empty());
}
