//! The data-parallel step's GPU path on one GPU (feature `nccl`; `bench/gpu/session.sh` builds
//! and runs it on a lent GPU): NCCL refuses two ranks on one GPU, so the world here is of one
//! rank, and the test checks the path itself — the eager split step (forward and loss, the
//! backward with `ready` calls, NCCL all-reduces launched bucket by bucket on their own stream
//! while the backward runs, the optimizer after the last) — against the engine's own step (one
//! CUDA graph per step). Without a GPU these tests FAIL; they are ignored in CI.
#![cfg(feature = "nccl")]

use backei::data::Batch;
use backei::dist::{ReducerKind, Solo, Team};
use backei::gpu::DeviceChoice;
use backei::{Engine, Loss, NetworkSpec, OptimizerConfig};

fn engine(spec: &NetworkSpec) -> Engine {
    let (mut e, _) = Engine::new(spec, 4150, DeviceChoice::Cuda(0), OptimizerConfig::adam(1e-3)).expect("these tests need a CUDA GPU");
    // no float atomics in the gradients: the two paths can then agree bit for bit
    if let Engine::Gpu { net, .. } = &mut e {
        net.set_deterministic(true);
    }
    e
}

fn batch(spec: &NetworkSpec, k: usize, n: usize) -> Batch {
    let frame: usize = spec.input.iter().product();
    let x: Vec<f32> = (0..n * frame).map(|i| ((i * 7 + k * 131) % 29) as f32 / 28.0).collect();
    Batch {
        x: x.into(),
        t_in: 1,
        batch: n,
        shape: spec.input,
        labels: (0..n).map(|i| ((i * 3 + k) % 10) as u8).collect(),
        indices: (0..n).collect(),
        global_batch: n,
        offset: 0,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_nccl_path_of_a_world_of_one_follows_the_engines_own_step() {
    let mut spec = NetworkSpec::fashion_mnist();
    spec.steps = 4;
    // one bucket (the default's 25 MiB hold all 3.3 M gradients), then one bucket per layer
    for (bucket_bytes, many) in [(None, false), (Some(4usize), true)] {
        let (mut plain, mut split) = (engine(&spec), engine(&spec));
        let solo = Solo::default();
        let mut team =
            Team::with_reducer(&solo, &split, ReducerKind::Nccl { bucket_bytes }).expect("NCCL loads and its communicator opens");
        let line = team.describe();
        assert!(line.contains("NCCL 2.") && line.contains("bucket"), "{line}");
        assert_eq!(line.contains("in 1 bucket(s)"), !many, "{line}");
        for k in 0..4 {
            let b = batch(&spec, k, 16);
            let a = plain.train_step(&b.x, 1, &b.labels, Loss::Mse).unwrap();
            let r = team.train_step(&mut split, &b, Loss::Mse, false).unwrap();
            let s = r.done.expect("a data-parallel step reports itself");
            assert_eq!((s.batch, s.correct), (a.batch, a.correct), "step {k}");
            assert!((s.loss - a.loss).abs() <= 1e-6 * a.loss.abs().max(1e-3), "step {k}: loss {} vs {}", s.loss, a.loss);
        }
        let (p, q) = (plain.params().unwrap(), split.params().unwrap());
        let d = max_diff(&p, &q);
        eprintln!("buckets {bucket_bytes:?}: the NCCL path and the engine's step differ by at most {d:e} after 4 steps ({line})");
        assert!(d <= 1e-6, "parameters differ by {d} after 4 steps");
        let (m, n) = (plain.optimizer_state().unwrap().m, split.optimizer_state().unwrap().m);
        assert!(max_diff(&m, &n) <= 1e-6 * m.iter().fold(0f32, |a, x| a.max(x.abs())), "Adam's first moments differ");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_rank_without_samples_contributes_zero_gradients_through_nccl() {
    // the last batch of an epoch can leave a rank no sample: it launches every bucket all the same
    let mut spec = NetworkSpec::mnist();
    spec.steps = 2;
    let mut e = engine(&spec);
    let solo = Solo::default();
    let mut team = Team::with_reducer(&solo, &e, ReducerKind::Nccl { bucket_bytes: Some(4) }).unwrap();
    let before = e.params().unwrap();
    let mut empty = batch(&spec, 0, 0);
    empty.global_batch = 0;
    let r = team.train_step(&mut e, &empty, Loss::Mse, false).unwrap();
    assert_eq!(r.done.map(|s| s.batch), Some(0));
    let after = e.params().unwrap();
    // Adam from zero moments and a zero gradient moves nothing
    assert_eq!(max_diff(&before, &after), 0.0);
    assert_eq!(e.iteration(), 1, "the step counts on every rank alike");
    // and a real step after it works
    let b = batch(&spec, 1, 8);
    team.train_step(&mut e, &b, Loss::Mse, false).unwrap();
    assert!(max_diff(&after, &e.params().unwrap()) > 0.0);
}
