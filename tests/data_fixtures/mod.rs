//! Writers for small fixture files in the standard formats, shared by the data tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

pub fn idx_images(n: usize, h: usize, w: usize, f: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        v.extend_from_slice(&(d as u32).to_be_bytes());
    }
    for i in 0..n {
        for p in 0..h * w {
            v.push(f(i, p));
        }
    }
    v
}

pub fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// Pixel value of sample i, pixel p in the fixtures.
pub fn pix(i: usize, p: usize) -> u8 {
    ((i * 31 + p * 7) % 256) as u8
}

/// Writes an MNIST-style folder: `n_train`/`n_test` samples, labels i % 10.
pub fn write_mnist(dir: &Path, n_train: usize, n_test: usize, gzip: bool) {
    for (stem, n) in [("train", n_train), ("t10k", n_test)] {
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let (im, lb) = (idx_images(n, 28, 28, pix), idx_labels(&labels));
        let (im, lb, ext) = if gzip { (gz(&im), gz(&lb), ".gz") } else { (im, lb, "") };
        write(&dir.join(format!("{stem}-images-idx3-ubyte{ext}")), &im);
        write(&dir.join(format!("{stem}-labels-idx1-ubyte{ext}")), &lb);
    }
}

pub fn cifar_records(n: usize, first: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for i in first..first + n {
        v.push((i % 10) as u8);
        for p in 0..3072 {
            v.push(pix(i, p));
        }
    }
    v
}

/// Writes CIFAR-10 batch files: `per` records each, 5 train batches + test.
pub fn write_cifar(dir: &Path, per: usize) {
    for b in 1..=5 {
        write(&dir.join(format!("data_batch_{b}.bin")), &cifar_records(per, (b - 1) * per));
    }
    write(&dir.join("test_batch.bin"), &cifar_records(per, 1000));
}

/// One N-MNIST event record.
pub fn event(x: u8, y: u8, p: u8, t: u32) -> [u8; 5] {
    [x, y, (p << 7) | ((t >> 16) & 0x7f) as u8, (t >> 8) as u8, t as u8]
}

pub fn events(ev: &[(u8, u8, u8, u32)]) -> Vec<u8> {
    ev.iter().flat_map(|&(x, y, p, t)| event(x, y, p, t)).collect()
}

/// Writes an N-MNIST tree: for each split, `per_digit` files per digit 0..3.
pub fn write_nmnist(root: &Path, per_digit: usize) {
    for split in ["Train", "Test"] {
        for d in 0..3u8 {
            for k in 0..per_digit {
                let ev: Vec<(u8, u8, u8, u32)> =
                    (0..20u32).map(|j| (((j as usize + k) % 34) as u8, d * 5 + (j % 3) as u8, (j % 2) as u8, j * 1000)).collect();
                write(&root.join(split).join(d.to_string()).join(format!("{k:05}.bin")), &events(&ev));
            }
        }
    }
}

/// Tiny deterministic PRNG for property tests.
pub struct XorShift(pub u64);
impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
