//! One training step (forward, loss, BPTT backward, Adam) of the Fashion-MNIST network on the
//! CPU engine at the reference's batch 100 and T = 20, direct encoding, random input in [0, 1].
//! 1 warm-up + REPS timed repetitions; prints each, the median, and the forward / backward /
//! optimizer split of the median repetition.
//!
//! Run: `cargo bench --bench train_cpu` (REPS and BATCH/STEPS can be overridden by the
//! environment variables BENCH_REPS, BENCH_BATCH, BENCH_STEPS).

use backei::cpu::loss::loss_and_grad;
use backei::{Loss, Network, NetworkSpec, Optimizer, OptimizerConfig};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let reps = env("BENCH_REPS", 3).max(1);
    let batch = env("BENCH_BATCH", 100);
    let mut spec = NetworkSpec::fashion_mnist();
    spec.steps = env("BENCH_STEPS", 20);
    let mut net = Network::<f32>::new(&spec, 4150).expect("network");
    let mut opt = Optimizer::new(OptimizerConfig::adam(1e-3), net.num_params()).expect("optimizer");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..batch * 28 * 28).map(|_| rng.random::<f32>()).collect();
    let labels: Vec<u8> = (0..batch).map(|_| rng.random_range(0..10u8)).collect();
    println!(
        "train_cpu: fashion-mnist, B = {batch}, T = {}, {} parameters, {} rayon threads",
        spec.steps,
        net.num_params(),
        rayon::current_num_threads()
    );
    let mut times = Vec::new();
    for rep in 0..=reps {
        // the same work as Network::train_step, timed in its three parts
        let t0 = Instant::now();
        net.training = true;
        let y = net.forward(&x, 1, batch).expect("forward").to_vec();
        let mut dy = vec![0.0f32; y.len()];
        let loss = loss_and_grad(Loss::Mse, &y, &labels, 10, &mut dy);
        let t1 = Instant::now();
        net.zero_grads();
        net.backward(&dy, false).expect("backward");
        let t2 = Instant::now();
        opt.update(&mut net.params, &net.grads);
        let t3 = Instant::now();
        let (f, b, o) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64());
        let total = f + b + o;
        if rep == 0 {
            println!("warm-up: {total:.3} s (loss {loss:.4})");
        } else {
            println!("rep {rep}: {total:.3} s = forward {f:.3} + backward {b:.3} + adam {o:.3} (loss {loss:.4})");
            times.push((total, f, b, o));
        }
    }
    times.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let (t, f, b, o) = times[times.len() / 2];
    println!(
        "median step: {t:.3} s (forward {:.0} %, backward {:.0} %, adam {:.0} %); {:.1} ms per sample",
        100.0 * f / t,
        100.0 * b / t,
        100.0 * o / t,
        1000.0 * t / batch as f64
    );
}
