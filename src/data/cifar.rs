//! CIFAR-10 reader, binary version: `data_batch_1..5.bin`, `test_batch.bin`, records of
//! 1 label byte + 3072 pixel bytes (R, G, B planes of 32×32), optionally inside the
//! `cifar-10-batches-bin` folder.

use super::{read_file, DataError, Dataset, DatasetKind, Split};
use std::path::{Path, PathBuf};

pub const RECORD: usize = 3073;
pub const PIXELS: usize = 3072;

/// File names of a split.
pub fn file_names(split: Split) -> Vec<&'static str> {
    match split {
        Split::Train => vec!["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"],
        Split::Test => vec!["test_batch.bin"],
    }
}

/// The folder that holds the batch files: `dir/cifar-10-batches-bin` if it exists, else `dir`.
pub fn batches_dir(dir: &Path) -> PathBuf {
    let inner = dir.join("cifar-10-batches-bin");
    if inner.is_dir() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// Parses one batch file, appending pixels (CHW) and labels. Never panics.
pub fn parse_batch(bytes: &[u8], path: &Path, pixels: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<usize, DataError> {
    if bytes.is_empty() {
        return Err(DataError::format(path, 0, "record 0", "3073-byte records (1 label + 3072 pixels)", "an empty file"));
    }
    if !bytes.len().is_multiple_of(RECORD) {
        let n = bytes.len() / RECORD;
        return Err(DataError::format(
            path,
            (n * RECORD) as u64,
            format!("record {n}"),
            "a whole number of 3073-byte records (1 label + 3×32×32 pixels)",
            format!("{} bytes left over (truncated record; file is {} bytes)", bytes.len() % RECORD, bytes.len()),
        ));
    }
    let n = bytes.len() / RECORD;
    pixels.reserve(n * PIXELS);
    labels.reserve(n);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(DataError::format(
                path,
                (i * RECORD) as u64,
                format!("label of record {i}"),
                "a class in 0..=9",
                rec[0].to_string(),
            ));
        }
        labels.push(rec[0]);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(n)
}

/// Loads a split of CIFAR-10 from `dir` (or `dir/cifar-10-batches-bin`).
pub fn load_dir(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let bdir = batches_dir(dir);
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut sources = Vec::new();
    for name in file_names(split) {
        let p = bdir.join(name);
        let bytes = read_file(&p, "a CIFAR-10 binary batch (3073-byte records)")?;
        parse_batch(&bytes, &p, &mut pixels, &mut labels)?;
        sources.push(p);
    }
    Ok(Dataset::from_raw(DatasetKind::Cifar10, split, [3, 32, 32], 1, pixels, labels, sources))
}
