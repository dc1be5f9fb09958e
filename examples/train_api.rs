//! The library API in a few lines: build a network from a spec, train it on the embedded MNIST
//! sample for a few steps, read predictions. CI runs this example.
//!
//!   cargo run --release --example train_api

use backei::data::{Dataset, DatasetKind, LoadOptions, Loader, LoaderOptions, Split};
use backei::{Engine, Loss, NetworkSpec, OptimizerConfig};
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    // the paper's MNIST network, shortened to T = 4 steps so this runs in seconds on a CPU
    let mut spec = NetworkSpec::mnist();
    spec.steps = 4;
    // the GPU engine when there is one, else the CPU engine (the line says which)
    let (mut engine, line) = Engine::new(&spec, 4150, "auto".parse().map_err(anyhow::Error::msg)?, OptimizerConfig::adam(1e-3))?;
    println!("{line}");

    let train = Arc::new(Dataset::load(DatasetKind::MnistSample, Split::Train, &LoadOptions::default())?);
    // batches in buffers the engine asks for (page-locked on the GPU: direct uploads)
    let opts = LoaderOptions { batch_size: 16, steps: spec.steps, ..Default::default() };
    let loader = Loader::with_allocator(train, opts, engine.buffer_allocator());
    // 80 steps: the freshly initialised network is nearly silent at first, then learns
    for (i, batch) in loader.epoch(0).take(80).enumerate() {
        let stats = engine.train_step(&batch.x, batch.t_in, &batch.labels, Loss::Mse)?;
        if i % 10 == 9 {
            println!("step {}: loss {:.4}, {}/{} correct", i + 1, stats.loss, stats.correct, stats.batch);
        }
        loader.recycle(batch);
    }

    let test = Dataset::load(DatasetKind::MnistSample, Split::Test, &LoadOptions::default())?;
    let batch = Loader::new(Arc::new(test), LoaderOptions { batch_size: 20, steps: spec.steps, shuffle: false, ..Default::default() })
        .epoch(0)
        .next()
        .expect("a test batch");
    let predicted = engine.predict(&batch.x, batch.t_in, batch.batch)?;
    println!("predicted {predicted:?}\nlabels    {:?}", batch.labels);
    let right = predicted.iter().zip(&batch.labels).filter(|(p, l)| **p == **l as usize).count();
    println!("{right}/{} test digits right", batch.batch);
    assert_eq!(predicted.len(), batch.batch);
    Ok(())
}
