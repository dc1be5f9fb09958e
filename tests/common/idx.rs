//! Reads the gzipped IDX files of (Fashion-)MNIST directly. Missing files are an error (the
//! learning test must fail, not skip, when the data is not installed).

use flate2::read::GzDecoder;
use std::io::Read;

pub const FASHION_DIR: &str = "/usr/share/datasets/fashion-mnist";

fn read_gz(path: &str) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| {
        panic!("{path}: {e}; install the Debian package `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist)")
    });
    let mut out = Vec::new();
    GzDecoder::new(f).read_to_end(&mut out).unwrap_or_else(|e| panic!("{path}: not a valid gzip file: {e}"));
    out
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// The first `n` images (pixels scaled to [0, 1], [n][28·28]) and labels of a split
/// ("train" or "t10k").
pub fn fashion(split: &str, n: usize) -> (Vec<f32>, Vec<u8>, usize, usize) {
    let img = read_gz(&format!("{FASHION_DIR}/{split}-images-idx3-ubyte.gz"));
    let lab = read_gz(&format!("{FASHION_DIR}/{split}-labels-idx1-ubyte.gz"));
    assert_eq!(be32(&img[0..4]), 0x0803, "bad IDX magic in the images file");
    assert_eq!(be32(&lab[0..4]), 0x0801, "bad IDX magic in the labels file");
    let (count, rows, cols) = (be32(&img[4..8]), be32(&img[8..12]), be32(&img[12..16]));
    assert_eq!(be32(&lab[4..8]), count, "image and label counts differ");
    assert!(n <= count, "asked for {n} images, the file has {count}");
    let px = rows * cols;
    let images = img[16..16 + n * px].iter().map(|&p| p as f32 / 255.0).collect();
    let labels = lab[8..8 + n].to_vec();
    (images, labels, rows, cols)
}
