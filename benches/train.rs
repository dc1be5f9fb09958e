//! One full training step (forward over T, loss, BPTT, Adam) of each network at the reference
//! size B = 100, T = 20, on the GPU (every network) and on the CPU (mnist and fashion-mnist, one
//! repetition: it takes seconds). The GPU steps run as the trainer runs them: pipelined, one
//! CUDA graph per step (`BACKEI_CUDA_GRAPHS=0` for launches one by one). Prints samples/s and the
//! GPU memory the step held (`mem_get_info` before and after) beside `memory_plan`'s figure and
//! the bytes the network allocated. Without a GPU it prints the CPU figures and says the GPU
//! part was skipped. After the timed steps, one more GPU step runs eagerly with CUDA events
//! between its ops and prints where its time goes (per layer, forward and backward, loss,
//! gradient check, optimizer).
//!
//! cargo bench --bench train            (BACKEI_BENCH_REPS=N for more GPU repetitions;
//!                                       BACKEI_BENCH_RECOMPUTE=K adds cifar10 and fashion-mnist
//!                                       rows with --recompute K on the tensor-core GEMMs in fp32:
//!                                       the per-window convolutions' cost and the memory they save;
//!                                       BACKEI_BENCH_NETWORKS=fashion-mnist,cifar10 narrows the
//!                                       GPU rows to those networks; BACKEI_BENCH_CPU=0 skips
//!                                       the CPU rows)

use backei::gpu::profile::merge;
use backei::gpu::{GpuDevice, GpuNetwork, GpuOptimizer};
use backei::{Loss, Network, NetworkSpec, Optimizer, OptimizerConfig, Precision};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

const B: usize = 100;
const T: usize = 20;

fn batch(spec: &NetworkSpec) -> (Vec<f32>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let frame: usize = spec.input.iter().product();
    ((0..B * frame).map(|_| rng.random_range(0.0f32..1.0)).collect(), (0..B).map(|_| rng.random_range(0..10u8)).collect())
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Hands the memory that freed buffers left in the driver's stream-ordered pool back to the
/// device, so that `mem_get_info` before a network sees what the network will really take (the
/// first GPU run read 0 GiB for nmnist: it had reused the pool cifar10 left behind).
fn trim_pool(dev: &GpuDevice) {
    use cudarc::driver::sys;
    let _ = dev.synchronize();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a valid device handle and out-pointer; trimming only releases unused pool memory.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, dev.ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS {
            sys::cuMemPoolTrimTo(pool, 0);
        }
    }
}

/// (seconds per step, bytes held per mem_get_info, memory plan bytes, bytes the network allocated)
/// `mode`: None for the run's defaults, else (precision, tensor-core GEMMs); `recompute`:
/// `--recompute K`.
fn gpu_step(
    dev: &std::sync::Arc<GpuDevice>,
    spec: &NetworkSpec,
    reps: usize,
    mode: Option<(Precision, bool)>,
    recompute: Option<usize>,
) -> Result<(f64, usize, usize, usize), String> {
    trim_pool(dev);
    let (free0, _) = dev.ctx.mem_get_info().map_err(|e| format!("{e:?}"))?;
    let mut net = GpuNetwork::new(dev, spec, 4150).map_err(|e| e.to_string())?;
    if let Some((p, tc)) = mode {
        net.set_precision(p).map_err(|e| e.to_string())?;
        net.set_feedforward(tc).map_err(|e| e.to_string())?;
    }
    net.set_recompute(recompute).map_err(|e| e.to_string())?;
    let mut opt = GpuOptimizer::new(dev, OptimizerConfig::adam(1e-3), net.num_params()).map_err(|e| e.to_string())?;
    let (x, labels) = batch(spec);
    // the first step allocates the buffers and compiles/loads the kernels, the second captures
    // the step graph
    for _ in 0..2 {
        net.train_step(&x, 1, &labels, Loss::Mse, &mut opt).map_err(|e| e.to_string())?;
    }
    dev.synchronize().map_err(|e| e.to_string())?;
    let (free1, _) = dev.ctx.mem_get_info().map_err(|e| format!("{e:?}"))?;
    let t0 = Instant::now();
    for _ in 0..reps {
        net.train_step_pipelined(&x, 1, &labels, Loss::Mse, &mut opt).map_err(|e| e.to_string())?;
    }
    net.finish_steps().map_err(|e| e.to_string())?;
    dev.synchronize().map_err(|e| e.to_string())?;
    let secs = t0.elapsed().as_secs_f64() / reps as f64;
    let (graphs, off) = net.graph_status();
    println!("    {}: {graphs} step graph(s){}", spec.name, off.map(|w| format!(" (graphs off: {w})")).unwrap_or_default());
    let plan = net.memory_plan(B, 1).map(|p| p.total()).unwrap_or(0);
    let allocated = net.allocated_bytes()
        + backei::gpu::GpuOptimizer::device_bytes(&opt.config, net.num_params())
        + backei::gpu::device::CUBLAS_WORKSPACE_BYTES;
    let (free2, _) = dev.ctx.mem_get_info().map_err(|e| format!("{e:?}"))?;
    // one more step with an event between every two ops: where the step's time goes
    net.set_profiling(true).map_err(|e| e.to_string())?;
    net.train_step(&x, 1, &labels, Loss::Mse, &mut opt).map_err(|e| e.to_string())?;
    let rows = net.take_profile().map_err(|e| e.to_string())?;
    net.set_profiling(false).map_err(|e| e.to_string())?;
    let total: f64 = rows.iter().map(|r| r.1).sum();
    println!("    {} step profile (one step, events between ops; total {total:.2} ms):", spec.name);
    for (label, ms, _) in merge(&rows) {
        println!("      {label:<44} {ms:>9.3} ms {:>5.1} %", 100.0 * ms / total.max(1e-9));
    }
    Ok((secs, free0.saturating_sub(free1.min(free2)), plan, allocated))
}

fn main() {
    let reps: usize = std::env::var("BACKEI_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let nets = [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()];
    println!("one training step, B = {B}, T = {T}, direct encoding, MSE, Adam");
    match GpuDevice::open(0) {
        Ok(dev) => {
            println!("GPU: {} ({})", dev.name, dev.kernels.arch());
            // the defaults of every network, then fashion-mnist and cifar10 with the feed-forward
            // layers on tensor cores in each precision (BACKEI_BENCH_PRECISIONS=none skips those)
            let tc_modes: Vec<(Precision, bool)> = match std::env::var("BACKEI_BENCH_PRECISIONS").as_deref() {
                Ok("none") => Vec::new(),
                Ok(list) => list.split(',').filter_map(|p| p.parse().ok()).map(|p| (p, true)).collect(),
                Err(_) => Precision::ALL.iter().map(|&p| (p, true)).collect(),
            };
            let recompute: Option<usize> = std::env::var("BACKEI_BENCH_RECOMPUTE").ok().and_then(|s| s.parse().ok());
            type Run = (NetworkSpec, Option<(Precision, bool)>, Option<usize>);
            let chosen = std::env::var("BACKEI_BENCH_NETWORKS").ok();
            let wanted = |s: &&NetworkSpec| chosen.as_deref().is_none_or(|list| list.split(',').any(|n| n == s.name));
            let mut runs: Vec<Run> = nets.iter().filter(wanted).map(|s| (s.clone(), None, None)).collect();
            for s in nets.iter().filter(wanted).filter(|s| s.name == "fashion-mnist" || s.name == "cifar10") {
                runs.extend(tc_modes.iter().map(|&m| (s.clone(), Some(m), None)));
                if let Some(k) = recompute {
                    runs.push((s.clone(), Some((Precision::Fp32, true)), Some(k)));
                }
            }
            for (spec, mode, k) in runs {
                let mut spec = spec.clone();
                spec.steps = T;
                let label = match (mode, k) {
                    (None, _) => spec.name.clone(),
                    (Some((p, _)), None) => format!("{} tc {p}", spec.name),
                    (Some((p, _)), Some(k)) => format!("{} tc {p} recompute {k}", spec.name),
                };
                match gpu_step(&dev, &spec, reps, mode, k) {
                    Ok((secs, held, plan, allocated)) => println!(
                        "  gpu {label:<30} {:>9.2} ms/step {:>9.1} samples/s   device memory held {:>6.2} GiB (memory_plan {:.2} GiB, allocated {:.2} GiB)",
                        secs * 1e3,
                        B as f64 / secs,
                        gib(held),
                        gib(plan),
                        gib(allocated)
                    ),
                    Err(e) => println!("  gpu {label:<30} failed: {e}"),
                }
            }
        }
        Err(e) => println!("GPU part skipped: {e}"),
    }
    // BACKEI_BENCH_CPU=0: the GPU rows alone (the device sessions time the CPU rows once)
    let cpu_rows = std::env::var("BACKEI_BENCH_CPU").map_or(true, |v| v != "0");
    for spec in nets.iter().filter(|s| cpu_rows && (s.name == "mnist" || s.name == "fashion-mnist")) {
        let mut spec = spec.clone();
        spec.steps = T;
        let mut net = Network::<f32>::new(&spec, 4150).expect("network");
        let mut opt = Optimizer::new(OptimizerConfig::adam(1e-3), net.num_params()).expect("optimizer");
        let (x, labels) = batch(&spec);
        let t0 = Instant::now();
        match net.train_step(&x, 1, &labels, Loss::Mse, &mut opt) {
            Ok(_) => {
                let secs = t0.elapsed().as_secs_f64();
                println!(
                    "  cpu {:<14} {:>9.2} ms/step {:>9.1} samples/s   ({} threads)",
                    spec.name,
                    secs * 1e3,
                    B as f64 / secs,
                    rayon::current_num_threads()
                );
            }
            Err(e) => println!("  cpu {:<14} failed: {e}", spec.name),
        }
    }
}
