//! Bad input: each case returns an error naming the file, the offset or field, and what was
//! expected — never a panic. Plus a deterministic property test over random/mutated bytes.

mod data_fixtures;
use backei::data::{cifar, idx, nmnist, DataError, Dataset, DatasetKind, LoadOptions, Split};
use data_fixtures::*;
use std::path::Path;

fn load(kind: DatasetKind, dir: &Path, split: Split) -> Result<Dataset, DataError> {
    Dataset::load(
        kind,
        split,
        &LoadOptions { data_dir: Some(dir.into()), steps: 4, cache_dir: Some(dir.join("cache")), ..Default::default() },
    )
}

fn err(kind: DatasetKind, dir: &Path, split: Split) -> String {
    load(kind, dir, split).unwrap_err().to_string()
}

fn has_all(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message lacks `{p}`:\n{msg}");
    }
}

#[test]
fn missing_file() {
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 3, 3, true);
    std::fs::remove_file(d.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let m = err(DatasetKind::Mnist, d.path(), Split::Test);
    has_all(&m, &["t10k-labels-idx1-ubyte", "cannot read", "IDX label file"]);
    // Train still loads.
    assert!(load(DatasetKind::Mnist, d.path(), Split::Train).is_ok());
    // CIFAR: one batch missing.
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path(), 1);
    std::fs::remove_file(d.path().join("data_batch_3.bin")).unwrap();
    has_all(&err(DatasetKind::Cifar10, d.path(), Split::Train), &["data_batch_3.bin", "3073-byte records"]);
}

#[test]
fn wrong_magic() {
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 3, 3, false);
    let mut b = idx_images(3, 28, 28, pix);
    b[3] = 1; // idx1 magic in an image file
    write(&d.path().join("train-images-idx3-ubyte"), &b);
    let m = err(DatasetKind::Mnist, d.path(), Split::Train);
    has_all(&m, &["train-images-idx3-ubyte", "offset 0", "magic", "0x00000803", "0x00000801"]);
}

#[test]
fn truncated_header_and_body() {
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 3, 3, false);
    let full = idx_images(3, 28, 28, pix);
    write(&d.path().join("train-images-idx3-ubyte"), &full[..10]);
    let m = err(DatasetKind::Mnist, d.path(), Split::Train);
    has_all(&m, &["train-images-idx3-ubyte", "offset 10", "header", "16-byte header", "truncated header"]);
    write(&d.path().join("train-images-idx3-ubyte"), &full[..2]);
    has_all(&err(DatasetKind::Mnist, d.path(), Split::Train), &["offset 0", "magic", "truncated header"]);
    write(&d.path().join("train-images-idx3-ubyte"), &full[..full.len() - 5]);
    let m = err(DatasetKind::Mnist, d.path(), Split::Train);
    has_all(&m, &["train-images-idx3-ubyte", "offset 2363", "`data`", "2352 bytes", "found 2347 bytes", "truncated body"]);
    // CIFAR truncated record.
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path(), 2);
    let b = cifar_records(2, 0);
    write(&d.path().join("test_batch.bin"), &b[..3073 + 100]);
    let m = err(DatasetKind::Cifar10, d.path(), Split::Test);
    has_all(&m, &["test_batch.bin", "offset 3073", "record 1", "3073-byte records", "truncated record"]);
    // N-MNIST truncated event.
    let d = tempfile::tempdir().unwrap();
    write_nmnist(d.path(), 1);
    write(&d.path().join("Test/1/00000.bin"), &events(&[(1, 1, 1, 1), (2, 2, 0, 2)])[..8]);
    let m = err(DatasetKind::Nmnist, d.path(), Split::Test);
    has_all(&m, &["00000.bin", "offset 5", "event 1", "5-byte", "truncated record"]);
}

#[test]
fn image_count_differs_from_label_count() {
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 3, 3, true);
    write(&d.path().join("train-labels-idx1-ubyte.gz"), &gz(&idx_labels(&[1, 2])));
    let m = err(DatasetKind::Mnist, d.path(), Split::Train);
    has_all(&m, &["train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz", "number of items", "3 images", "2 labels"]);
}

#[test]
fn label_out_of_range() {
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 3, 3, false);
    write(&d.path().join("t10k-labels-idx1-ubyte"), &idx_labels(&[1, 10, 2]));
    let m = err(DatasetKind::Mnist, d.path(), Split::Test);
    has_all(&m, &["t10k-labels-idx1-ubyte", "offset 9", "label of item 1", "0..=9", "found 10"]);
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path(), 2);
    let mut b = cifar_records(2, 0);
    b[3073] = 200;
    write(&d.path().join("test_batch.bin"), &b);
    has_all(&err(DatasetKind::Cifar10, d.path(), Split::Test), &["test_batch.bin", "offset 3073", "label of record 1", "found 200"]);
}

#[test]
fn dimensions_not_the_datasets() {
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 3, 3, false);
    write(&d.path().join("train-images-idx3-ubyte"), &idx_images(3, 32, 32, pix));
    let m = err(DatasetKind::FashionMnist, d.path(), Split::Train);
    has_all(&m, &["train-images-idx3-ubyte", "offset 8", "dimensions", "28×28", "32×32"]);
}

#[test]
fn corrupt_gzip() {
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 3, 3, true);
    let mut g = gz(&idx_images(3, 28, 28, pix));
    let n = g.len();
    for b in &mut g[12..n - 10] {
        *b ^= 0x5a;
    }
    write(&d.path().join("train-images-idx3-ubyte.gz"), &g);
    has_all(&err(DatasetKind::Mnist, d.path(), Split::Train), &["train-images-idx3-ubyte.gz", "corrupt gzip", "expected a complete gzip"]);
    // Truncated gzip.
    let g = gz(&idx_images(3, 28, 28, pix));
    write(&d.path().join("train-images-idx3-ubyte.gz"), &g[..g.len() / 2]);
    has_all(&err(DatasetKind::Mnist, d.path(), Split::Train), &["train-images-idx3-ubyte.gz", "corrupt gzip"]);
}

#[test]
fn nmnist_event_outside_sensor() {
    let d = tempfile::tempdir().unwrap();
    write_nmnist(d.path(), 1);
    write(&d.path().join("Train/2/00000.bin"), &events(&[(1, 1, 1, 1), (5, 34, 0, 9)]));
    let m = err(DatasetKind::Nmnist, d.path(), Split::Train);
    has_all(&m, &["Train/2/00000.bin", "offset 6", "y of event 1", "0..34", "found 34"]);
    write(&d.path().join("Train/2/00000.bin"), &events(&[(40, 1, 1, 1)]));
    has_all(&err(DatasetKind::Nmnist, d.path(), Split::Train), &["offset 0", "x of event 0", "found 40"]);
}

#[test]
fn empty_folder() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("Train/3")).unwrap();
    std::fs::create_dir_all(d.path().join("Test")).unwrap();
    let m = err(DatasetKind::Nmnist, d.path(), Split::Train);
    has_all(&m, &["Train", "no samples", "digit folders 0..9"]);
    // An empty dataset folder for the IDX formats: not found, with the places looked.
    let e = tempfile::tempdir().unwrap();
    let m = err(DatasetKind::Mnist, e.path(), Split::Train);
    has_all(&m, &["not found", &e.path().display().to_string(), "backei data fetch mnist --dir DIR"]);
    // An empty CIFAR batch file.
    let c = tempfile::tempdir().unwrap();
    write_cifar(c.path(), 1);
    write(&c.path().join("test_batch.bin"), &[]);
    has_all(&err(DatasetKind::Cifar10, c.path(), Split::Test), &["test_batch.bin", "offset 0", "empty file"]);
}

/// Thousands of random and mutated inputs: every parser returns Ok or Err, never panics.
#[test]
fn property_parsers_never_panic() {
    let p = Path::new("fuzz.bin");
    let seeds: Vec<Vec<u8>> = vec![
        idx_images(2, 28, 28, pix),
        idx_labels(&[1, 2, 3]),
        gz(&idx_labels(&[1, 2, 3, 4])),
        cifar_records(2, 0),
        events(&[(1, 2, 1, 5), (0, 240, 0, 0), (33, 33, 0, 0x7fffff), (3, 3, 1, 2)]),
    ];
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    let (mut ok, mut errs) = (0usize, 0usize);
    for i in 0..6000 {
        let mut b: Vec<u8> = if i % 3 == 0 {
            let n = rng.below(64);
            (0..n).map(|_| rng.next() as u8).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        if !b.is_empty() && i % 3 != 0 {
            for _ in 0..1 + rng.below(6) {
                if b.is_empty() {
                    break;
                }
                match rng.below(4) {
                    0 => {
                        let k = rng.below(b.len());
                        b[k] = rng.next() as u8;
                    }
                    1 => b.truncate(rng.below(b.len() + 1)),
                    2 => {
                        let k = rng.below(b.len());
                        b.insert(k, rng.next() as u8)
                    }
                    _ => {
                        // Header fields set to extremes (huge dimensions).
                        if b.len() >= 8 {
                            let k = 4 + 4 * rng.below((b.len() - 4) / 4).min(3);
                            let v = [0xff, 0xff, 0xff, 0xff];
                            let end = (k + 4).min(b.len());
                            b[k..end].copy_from_slice(&v[..end - k]);
                        }
                    }
                }
            }
        }
        let mut px = Vec::new();
        let mut lb = Vec::new();
        let results = [
            idx::parse_idx(&b, p, 3).is_ok(),
            idx::parse_idx(&b, p, 1).is_ok(),
            cifar::parse_batch(&b, p, &mut px, &mut lb).is_ok(),
            nmnist::parse_events(&b, p)
                .map(|ev| {
                    let mut out = vec![0u8; 3 * nmnist::FRAME];
                    nmnist::bin_events(&ev, 3, nmnist::Binning::default(), &mut out);
                })
                .is_ok(),
            idx::load_bytes(DatasetKind::Mnist, Split::Train, &b, &b, (p, p)).is_ok(),
        ];
        for r in results {
            if r {
                ok += 1
            } else {
                errs += 1
            }
        }
    }
    assert!(ok > 0 && errs > 0, "ok {ok} err {errs}");
}
