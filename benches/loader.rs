//! Loader throughput (no model): Fashion-MNIST direct (the real files if installed, else
//! synthetic data of the same shape) and augmented CIFAR-10 (synthetic, 50,000 images).
//! Prints images/s; targets ≥ 50,000 (Fashion-MNIST) and ≥ 20,000 (augmented CIFAR-10) on
//! two cores. Run with `cargo bench --bench loader`.

use backei::data::{Dataset, DatasetKind, Encoding, LoadOptions, Loader, LoaderOptions, Split};
use std::sync::Arc;
use std::time::Instant;

fn synth(kind: DatasetKind, n: usize) -> Dataset {
    let shape = kind.shape();
    let per: usize = shape.iter().product();
    let mut s = 0x1234_5678_u32;
    let data = (0..n * per)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as u8
        })
        .collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Dataset::from_raw(kind, Split::Train, shape, 1, data, labels, vec![])
}

fn run(name: &str, ds: Arc<Dataset>, opts: LoaderOptions, epochs: usize) -> f64 {
    let l = Loader::new(ds.clone(), opts);
    // Warm-up epoch (buffer pool).
    for b in l.epoch(0) {
        l.recycle(b);
    }
    let t = Instant::now();
    let mut n = 0usize;
    let mut check = 0f32;
    for e in 1..=epochs {
        for b in l.epoch(e) {
            n += b.batch;
            check += b.x[b.x.len() / 2];
            l.recycle(b);
        }
    }
    let s = t.elapsed().as_secs_f64();
    let rate = n as f64 / s;
    println!("{name:<48} {rate:>12.0} images/s  ({n} images in {s:.3} s, checksum {check:.1})");
    rate
}

fn main() {
    let workers: usize = std::env::var("BACKEI_LOADER_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    println!("loader benchmark: {workers} workers, batch 128, prefetch 4");
    let fashion = match Dataset::load(
        DatasetKind::FashionMnist,
        Split::Train,
        &LoadOptions { data_dir: Some("/usr/share/datasets/fashion-mnist".into()), ..Default::default() },
    ) {
        Ok(d) => {
            println!("Fashion-MNIST: real files, {} images", d.len());
            d
        }
        Err(e) => {
            println!("Fashion-MNIST: synthetic 60000 images ({e})");
            synth(DatasetKind::FashionMnist, 60000)
        }
    };
    let fashion = Arc::new(fashion);
    let base = LoaderOptions { batch_size: 128, workers, prefetch: 4, seed: 1, ..Default::default() };
    let f = run("fashion-mnist direct", fashion.clone(), base.clone(), 3);
    run("fashion-mnist rate T=8", fashion, LoaderOptions { encoding: Encoding::Rate, steps: 8, ..base.clone() }, 1);
    let cifar = Arc::new(synth(DatasetKind::Cifar10, 50000));
    let c = run("cifar10 direct + augmentation (synthetic)", cifar, LoaderOptions { augment: true, ..base }, 2);
    println!(
        "targets: fashion-mnist ≥ 50000/s: {}; augmented cifar10 ≥ 20000/s: {}",
        if f >= 50000.0 { "met" } else { "NOT met" },
        if c >= 20000.0 { "met" } else { "NOT met" }
    );
}
