//! The GPU training step as the trainer runs it: one CUDA graph per step replayed, pipelined
//! (results one step late, no host synchronisation), a NaN step reported and kept away from the
//! parameters, and the memory plan equal to what the network allocates. All need a CUDA GPU
//! (`cargo test --test gpu_step -- --ignored`, staged in bench/gpu/session.sh); without one they
//! FAIL.

use backei::cpu::network::Network;
use backei::gpu::device::CUBLAS_WORKSPACE_BYTES;
use backei::gpu::{GpuDevice, GpuNetwork, GpuOptimizer};
use backei::{BackeiError, FiringMode, Loss, NetworkSpec, OptimizerConfig, StepStats};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

fn dev() -> Arc<GpuDevice> {
    GpuDevice::open(0).expect("these tests need a CUDA GPU")
}

fn small(spec: NetworkSpec) -> NetworkSpec {
    let mut s = spec;
    s.steps = 4;
    s.neuron.mode = FiringMode::Exact;
    s
}

fn batches(spec: &NetworkSpec, b: usize, t_in: usize, n: usize) -> Vec<(Vec<f32>, Vec<u8>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let frame: usize = spec.input.iter().product();
    (0..n)
        .map(|_| {
            ((0..t_in * b * frame).map(|_| rng.random_range(0.0f32..1.0)).collect(), (0..b).map(|_| rng.random_range(0..10u8)).collect())
        })
        .collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// `steps` training steps of `spec` (deterministic plans: bit-reproducible), graphs on or off,
/// pipelined or not; the statistics and the parameters after them.
fn run(
    d: &Arc<GpuDevice>,
    spec: &NetworkSpec,
    t_in: usize,
    graphs: bool,
    pipelined: bool,
    opt: OptimizerConfig,
) -> (Vec<StepStats>, Vec<u32>, usize) {
    let cpu = Network::<f32>::new(spec, 4150).unwrap();
    let mut net = GpuNetwork::from_cpu(d, &cpu).unwrap();
    net.set_deterministic(true);
    net.set_graphs(graphs);
    let mut o = GpuOptimizer::new(d, opt, net.num_params()).unwrap();
    let mut stats = Vec::new();
    for (x, labels) in batches(spec, 5, t_in, 6) {
        if pipelined {
            stats.extend(net.train_step_pipelined(&x, t_in, &labels, Loss::Ce, &mut o).unwrap());
        } else {
            stats.push(net.train_step(&x, t_in, &labels, Loss::Ce, &mut o).unwrap());
        }
    }
    stats.extend(net.finish_steps().unwrap());
    (stats, bits(&net.params_to_host().unwrap()), net.graph_status().0)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_replay_equals_eager_launches_bit_for_bit() {
    let d = dev();
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
        let spec = small(spec);
        for t_in in [1, spec.steps] {
            for opt in [OptimizerConfig::adam(1e-3), OptimizerConfig::sgd(0.05, 0.9)] {
                let (eager, p_eager, g0) = run(&d, &spec, t_in, false, false, opt);
                let (graph, p_graph, g1) = run(&d, &spec, t_in, true, false, opt);
                let what = format!("{} T_in {t_in} {opt:?}", spec.name);
                assert_eq!(g0, 0, "{what}: graphs off, yet a graph was captured");
                assert_eq!(g1, 1, "{what}: one graph for the one shape (steps 3–6 replay it)");
                assert_eq!(eager.len(), 6);
                assert_eq!(graph, eager, "{what}: losses or accuracies differ");
                assert!(p_graph == p_eager, "{what}: parameters after 6 steps differ");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pipelined_steps_return_the_same_results_one_step_late() {
    let d = dev();
    let spec = small(NetworkSpec::cifar10());
    let (sync, p_sync, _) = run(&d, &spec, 1, true, false, OptimizerConfig::adam(1e-3));
    let (piped, p_piped, _) = run(&d, &spec, 1, true, true, OptimizerConfig::adam(1e-3));
    assert_eq!(piped, sync);
    assert!(p_piped == p_sync);
    // the first pipelined call has nothing to return yet; finish_steps returns the last step's
    let cpu = Network::<f32>::new(&spec, 4150).unwrap();
    let mut net = GpuNetwork::from_cpu(&d, &cpu).unwrap();
    let mut o = GpuOptimizer::new(&d, OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
    let b = batches(&spec, 5, 1, 2);
    assert!(net.train_step_pipelined(&b[0].0, 1, &b[0].1, Loss::Mse, &mut o).unwrap().is_none());
    assert!(net.train_step_pipelined(&b[1].0, 1, &b[1].1, Loss::Mse, &mut o).unwrap().is_some());
    // the synchronous step refuses to drop a pending one's results
    assert!(net.train_step(&b[0].0, 1, &b[0].1, Loss::Mse, &mut o).is_err());
    assert!(net.finish_steps().unwrap().is_some());
    assert!(net.finish_steps().unwrap().is_none());
    // an evaluation in between keeps the pending results for finish_steps
    net.train_step_pipelined(&b[0].0, 1, &b[0].1, Loss::Mse, &mut o).unwrap();
    net.evaluate(&b[1].0, 1, &b[1].1, Loss::Mse).unwrap();
    assert!(net.finish_steps().unwrap().is_some());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_nan_step_is_reported_and_never_reaches_the_parameters() {
    let d = dev();
    let spec = small(NetworkSpec::fashion_mnist());
    let cpu = Network::<f32>::new(&spec, 4150).unwrap();
    let mut net = GpuNetwork::from_cpu(&d, &cpu).unwrap();
    let mut o = GpuOptimizer::new(&d, OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
    let b = batches(&spec, 5, 1, 4);
    for (x, l) in &b[..3] {
        net.train_step_pipelined(x, 1, l, Loss::Mse, &mut o).unwrap();
    }
    net.finish_steps().unwrap();
    let good = net.params_to_host().unwrap();
    // finite but huge first-conv weights: the currents overflow to Inf, the membrane to NaN, and
    // the gradients with it
    let mut bad = good.clone();
    let w = &cpu.slots[0];
    bad[w.range.clone()].iter_mut().for_each(|v| *v = 3e38);
    net.load_params(&bad).unwrap();
    let first = net.train_step_pipelined(&b[3].0, 1, &b[3].1, Loss::Mse, &mut o);
    assert!(first.is_ok(), "the NaN step's results come one step late");
    let second = net.train_step_pipelined(&b[0].0, 1, &b[0].1, Loss::Mse, &mut o);
    match second {
        Err(BackeiError::NonFinite { place, hint, .. }) => {
            assert!(place.contains("iteration 3") && hint.contains("skipped"), "{place}: {hint}")
        }
        other => panic!("expected the NaN step's error, got {other:?}"),
    }
    // the step launched after it was skipped as well, and says so
    assert!(net.finish_steps().is_err(), "a step after a NaN step reported success");
    assert!(net.params_to_host().unwrap() == bad, "a NaN step (or the one after it) changed the parameters");
    // loading good parameters clears the status: training goes on
    net.load_params(&good).unwrap();
    let s = net.train_step(&b[1].0, 1, &b[1].1, Loss::Mse, &mut o).unwrap();
    assert!(s.loss.is_finite());
    assert!(net.params_to_host().unwrap() != good);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_memory_plan_is_what_the_network_allocates() {
    let d = dev();
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
        let spec = small(spec);
        for t_in in [1, spec.steps] {
            for deterministic in [false, true] {
                let cpu = Network::<f32>::new(&spec, 1).unwrap();
                let mut net = GpuNetwork::from_cpu(&d, &cpu).unwrap();
                net.set_deterministic(deterministic);
                let cfg = OptimizerConfig::adam(1e-3);
                let mut o = GpuOptimizer::new(&d, cfg, net.num_params()).unwrap();
                let (x, labels) = batches(&spec, 7, t_in, 1).remove(0);
                net.train_step(&x, t_in, &labels, Loss::Mse, &mut o).unwrap();
                let plan = net.memory_plan(7, t_in).unwrap();
                let held = net.allocated_bytes() + GpuOptimizer::device_bytes(&cfg, net.num_params()) + CUBLAS_WORKSPACE_BYTES;
                assert_eq!(held, plan.total(), "{} T_in {t_in} deterministic {deterministic}: {plan}", spec.name);
            }
        }
    }
}

/// `--recompute K` through the whole step (graphs on): six Adam steps of every network give the
/// very losses and parameters of keeping every step on the same (v4) kernels, and the memory plan
/// is again what the network allocates — on cuBLAS, and on the tensor-core GEMMs, where the
/// convolution before each BackEI layer over T steps is also run per window
/// (`memory::conv_output_window`: the profile names it) instead of keeping its whole output.
#[test]
#[ignore = "needs a CUDA GPU"]
fn recompute_steps_equal_keeping_every_step_bit_for_bit() {
    let d = dev();
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
        let mut spec = small(spec);
        spec.steps = 7;
        let cfg = OptimizerConfig::adam(1e-3);
        for tc in [false, true] {
            let go = |k: Option<usize>| {
                let cpu = Network::<f32>::new(&spec, 4150).unwrap();
                let mut net = GpuNetwork::from_cpu(&d, &cpu).unwrap();
                net.set_kernel_version(backei::gpu::backei_layer::KernelVersion::V4);
                net.set_feedforward(tc).unwrap();
                net.set_recompute(k).unwrap();
                let mut o = GpuOptimizer::new(&d, cfg, net.num_params()).unwrap();
                let b = batches(&spec, 5, 1, 6);
                let mut stats = Vec::new();
                for (x, labels) in &b[..5] {
                    stats.push(net.train_step(x, 1, labels, Loss::Ce, &mut o).unwrap());
                }
                net.set_profiling(true).unwrap();
                stats.push(net.train_step(&b[5].0, 1, &b[5].1, Loss::Ce, &mut o).unwrap());
                let rows = net.take_profile().unwrap();
                net.set_profiling(false).unwrap();
                let per_window = rows.iter().filter(|r| r.0.ends_with("convolution per window")).count();
                let plan = net.memory_plan(5, 1).unwrap();
                let held = net.allocated_bytes() + GpuOptimizer::device_bytes(&cfg, net.num_params()) + CUBLAS_WORKSPACE_BYTES;
                assert_eq!(held, plan.total(), "{} tc {tc} --recompute {k:?}: {plan}", spec.name);
                (stats, bits(&net.params_to_host().unwrap()), plan.total(), per_window)
            };
            let (s_all, p_all, m_all, w_all) = go(None);
            assert_eq!(w_all, 0, "{}: no window, no convolution per window", spec.name);
            for k in [1, 3] {
                let (s, p, m, w) = go(Some(k));
                let what = format!("{} tc {tc} --recompute {k}", spec.name);
                assert_eq!(s, s_all, "{what}: losses or accuracies differ");
                assert!(p == p_all, "{what}: parameters after 6 steps differ");
                // (no `m < m_all` here: at these test sizes, B = 5 and T = 7, the windowed backward's
                // per-block bias-gradient carries (1 MB) outweigh the state it saves; the memory
                // plan's own tests show the saving at real sizes, and `held == plan` above shows
                // the plan is what the network allocates)
                let _ = (m, m_all);
                // (one forward and one backward row per BackEI layer whose convolution runs over T)
                let convs_over_t = if spec.name == "cifar10" { 2 } else { 1 };
                assert_eq!(w, if tc { 2 * convs_over_t } else { 0 }, "{what}: the profile's rows of convolutions per window");
            }
        }
    }
}

/// The last layer's fused readout and loss (the default) against the separate kernels: whole
/// training steps under CUDA graphs (deterministic plans), both losses, evaluation, and the
/// profile's row for the fused launch. The emulator checks the kernels' bits in CI
/// (`emu_kernels::emulated_fused_readout_and_loss_give_the_bits_of_the_separate_kernels`); this
/// checks the host's wiring of them on a real device.
#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_readout_and_loss_give_the_bits_of_the_separate_kernels() {
    let d = dev();
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
        let spec = small(spec);
        for loss in [Loss::Mse, Loss::Ce] {
            let go = |fused: bool| {
                let cpu = Network::<f32>::new(&spec, 4150).unwrap();
                let mut net = GpuNetwork::from_cpu(&d, &cpu).unwrap();
                net.set_deterministic(true);
                net.set_fused_readout(fused);
                let mut o = GpuOptimizer::new(&d, OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
                let b = batches(&spec, 5, 1, 6);
                let mut stats = Vec::new();
                for (x, labels) in &b[..5] {
                    stats.push(net.train_step(x, 1, labels, loss, &mut o).unwrap());
                }
                net.set_profiling(true).unwrap();
                stats.push(net.train_step(&b[5].0, 1, &b[5].1, loss, &mut o).unwrap());
                let rows = net.take_profile().unwrap();
                net.set_profiling(false).unwrap();
                stats.push(net.evaluate(&b[0].0, 1, &b[0].1, loss).unwrap());
                (stats, bits(&net.params_to_host().unwrap()), rows.iter().any(|r| r.0.ends_with("with the loss")), net.graph_status().0)
            };
            let what = format!("{} {loss:?}", spec.name);
            let (s_sep, p_sep, row_sep, g_sep) = go(false);
            let (s_fused, p_fused, row_fused, g_fused) = go(true);
            assert_eq!(s_fused, s_sep, "{what}: losses or accuracies differ");
            assert!(p_fused == p_sep, "{what}: parameters after 6 steps differ");
            assert!(row_fused && !row_sep, "{what}: the profile names the fused launch only when it runs");
            assert_eq!((g_sep, g_fused), (1, 1), "{what}: both capture one step graph");
        }
    }
}

/// The v4 kernels' compact saved state (the default: z as a one-byte code, s as int8 before
/// pooling; on the tensor-core GEMMs also the pooled spikes a conv or linear layer reads as int8
/// codes, `memory::pooled_as_codes`) against keeping all of it in f32 (`set_compact_state(false)`):
/// six Adam steps of fashion-mnist and cifar10 under CUDA graphs, on cuBLAS and on the tensor
/// cores, give the same losses and parameters (compared as values: int8 has no −0, so an
/// exactly-zero sum may change its sign, never its value), and less memory by the plan.
#[test]
#[ignore = "needs a CUDA GPU"]
fn compact_state_steps_equal_f32_state() {
    let d = dev();
    // (two networks: each new v4 instance costs an NVRTC compile in the GPU session's budget)
    for spec in [NetworkSpec::fashion_mnist(), NetworkSpec::cifar10()] {
        let spec = small(spec);
        for tc in [false, true] {
            let go = |compact: bool| {
                let cpu = Network::<f32>::new(&spec, 4150).unwrap();
                let mut net = GpuNetwork::from_cpu(&d, &cpu).unwrap();
                net.set_kernel_version(backei::gpu::backei_layer::KernelVersion::V4);
                net.set_feedforward(tc).unwrap();
                net.set_compact_state(compact);
                let mut o = GpuOptimizer::new(&d, OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
                let stats: Vec<StepStats> =
                    batches(&spec, 5, 1, 6).iter().map(|(x, l)| net.train_step(x, 1, l, Loss::Ce, &mut o).unwrap()).collect();
                let rates = net.spike_stats().unwrap();
                let (ex, el) = &batches(&spec, 5, 1, 1)[0];
                let eval = net.evaluate(ex, 1, el, Loss::Ce).unwrap();
                (stats, net.params_to_host().unwrap(), rates, eval, net.memory_plan(5, 1).unwrap().total())
            };
            let (s_f, p_f, r_f, e_f, m_f) = go(false);
            let (s_c, p_c, r_c, e_c, m_c) = go(true);
            let what = format!("{} on {}", spec.name, if tc { "the tensor cores" } else { "cuBLAS" });
            assert_eq!(s_c, s_f, "{what}: losses or accuracies differ");
            assert!(p_c == p_f, "{what}: parameters after 6 steps differ");
            assert_eq!(r_c, r_f, "{what}: spike statistics differ");
            assert!(e_c == e_f, "{what}: an evaluation's outputs differ");
            assert!(m_c < m_f, "{what}: {m_c} bytes compact, {m_f} in f32");
        }
    }
}

/// The pooling fused into the v4 BackEI kernels (the default on v4: its forward in the layer's
/// forward, its backward — with a dropout between, its mask too — in the layer's backward, ∂L/∂s
/// never stored) against its own launches: six
/// Adam steps of mnist, fashion-mnist and cifar10 under CUDA graphs (the last one profiled) and an evaluation
/// give the same losses and parameter bits, and the profile names the fused launch. The emulator
/// checks the kernel's pooled bits in CI (`emu_v4::v4_forward_pools_its_spikes_as_the_pooling_layer_would`).
#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_pooling_gives_the_bits_of_the_pooling_launch() {
    let d = dev();
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10()] {
        let spec = small(spec);
        let go = |fused: bool| {
            let cpu = Network::<f32>::new(&spec, 4150).unwrap();
            let mut net = GpuNetwork::from_cpu(&d, &cpu).unwrap();
            net.set_kernel_version(backei::gpu::backei_layer::KernelVersion::V4);
            net.set_fused_pool(fused);
            let mut o = GpuOptimizer::new(&d, OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
            let b = batches(&spec, 5, 1, 6);
            let mut stats: Vec<StepStats> = b[..5].iter().map(|(x, l)| net.train_step(x, 1, l, Loss::Mse, &mut o).unwrap()).collect();
            net.set_profiling(true).unwrap();
            stats.push(net.train_step(&b[5].0, 1, &b[5].1, Loss::Mse, &mut o).unwrap());
            let rows = net.take_profile().unwrap();
            net.set_profiling(false).unwrap();
            stats.push(net.evaluate(&b[0].0, 1, &b[0].1, Loss::Mse).unwrap());
            (stats, bits(&net.params_to_host().unwrap()), rows.iter().filter(|r| r.0.ends_with("with the pooling")).count())
        };
        let (s_sep, p_sep, n_sep) = go(false);
        let (s_fused, p_fused, n_fused) = go(true);
        assert_eq!(s_fused, s_sep, "{}: losses or accuracies differ", spec.name);
        assert!(p_fused == p_sep, "{}: parameters after 6 steps differ", spec.name);
        // mnist and fashion-mnist pool right after both BackEI layers: forward and backward fused;
        // cifar10 has a dropout between: its 3 backwards fused (the forward is the dropout+pooling
        // kernel's)
        let want = if spec.name == "cifar10" { 3 } else { 4 };
        assert_eq!((n_sep, n_fused), (0, want), "{}: the profile's fused rows", spec.name);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn profiled_steps_run_eagerly_between_graph_replays() {
    let d = dev();
    let spec = small(NetworkSpec::mnist());
    let cpu = Network::<f32>::new(&spec, 4150).unwrap();
    let mut net = GpuNetwork::from_cpu(&d, &cpu).unwrap();
    let mut o = GpuOptimizer::new(&d, OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
    let b = batches(&spec, 4, 1, 5);
    for (x, l) in &b[..3] {
        net.train_step(x, 1, l, Loss::Mse, &mut o).unwrap();
    }
    assert_eq!(net.graph_status().0, 1);
    net.set_profiling(true).unwrap();
    net.train_step(&b[3].0, 1, &b[3].1, Loss::Mse, &mut o).unwrap();
    let rows = net.take_profile().unwrap();
    assert!(rows.iter().any(|r| r.0 == "optimizer") && rows.iter().any(|r| r.0.starts_with("backward layer")), "{rows:?}");
    net.set_profiling(false).unwrap();
    net.train_step(&b[4].0, 1, &b[4].1, Loss::Mse, &mut o).unwrap();
    assert_eq!(net.graph_status().0, 1, "profiling neither captured nor dropped a graph");
}

/// max |a − b| over max |b|, and the cosine of the angle between a and b.
fn rel_and_cosine(a: &[f32], b: &[f32]) -> (f64, f64) {
    let scale = b.iter().fold(1e-30f64, |m, &x| m.max((x as f64).abs()));
    let rel = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max) / scale;
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    (rel, dot / (na * nb).max(1e-300))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_network_in_every_precision_matches_the_cpu() {
    use backei::Precision;
    let d = dev();
    // (tensor-core GEMMs, precision, largest error of a gradient tensor relative to its largest
    // element, smallest cosine with the CPU's gradient): the bounds of a whole step through the
    // spiking layers (smooth firing: differentiable, no spike flips), first set from the op-level
    // tolerances (docs/gpu.md) — a GPU run confirms or tightens them
    let modes = [
        (false, Precision::Fp32, 1e-4, 0.99999),
        (true, Precision::Fp32, 1e-4, 0.99999),
        (true, Precision::Tf32, 3e-2, 0.999),
        (true, Precision::Bf16, 1e-1, 0.99),
    ];
    let mut failures = Vec::new();
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
        let mut spec = small(spec);
        spec.neuron.mode = FiringMode::Smooth { k: 4.0 };
        let (x, labels) = batches(&spec, 3, 1, 1).remove(0);
        let mut cpu = Network::<f32>::new(&spec, 4150).unwrap();
        let mut oc = backei::Optimizer::new(OptimizerConfig::adam(1e-3), cpu.num_params()).unwrap();
        let sc = cpu.train_step(&x, 1, &labels, Loss::Mse, &mut oc).unwrap();
        for (tc, p, max_rel, min_cos) in modes {
            let mut net = GpuNetwork::from_cpu(&d, &Network::<f32>::new(&spec, 4150).unwrap()).unwrap();
            net.set_precision(p).unwrap();
            net.set_feedforward(tc).unwrap();
            let mut o = GpuOptimizer::new(&d, OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
            let what = format!("{} {p} {}", spec.name, if tc { "tensor cores" } else { "cuBLAS" });
            // every mode runs, and a failure names each tensor that is off (a non-finite step
            // says which gradients hold the NaN or Inf): the GPU run of 2026-12-04 stopped at the
            // first failure and left the rest unknown
            let step = net.train_step(&x, 1, &labels, Loss::Mse, &mut o);
            let grads = net.grads_to_host().unwrap();
            match &step {
                Ok(sg) if (sg.loss - sc.loss).abs() > max_rel * sc.loss.abs() => {
                    failures.push(format!("{what}: loss {} vs {}", sg.loss, sc.loss))
                }
                Ok(_) => {}
                Err(e) => failures.push(format!("{what}: {e}")),
            }
            for s in &cpu.slots {
                let g = &grads[s.range.clone()];
                let bad = g.iter().filter(|x| !x.is_finite()).count();
                if bad > 0 {
                    let first = g.iter().position(|x| !x.is_finite()).unwrap();
                    failures.push(format!("{what} {}: {bad} of {} not finite (first at {first})", s.name, g.len()));
                    continue;
                }
                let (rel, cos) = rel_and_cosine(g, &cpu.grads[s.range.clone()]);
                println!("{what} {}: error {rel:.2e} of the largest element, cosine {cos:.7}", s.name);
                if !(rel <= max_rel && cos >= min_cos) {
                    failures.push(format!("{what} {}: error {rel:.3e}, cosine {cos}", s.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
