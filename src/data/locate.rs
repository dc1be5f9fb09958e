//! Finding data without flags: `--data-dir`, else `$BACKEI_DATA/<dataset>`, else
//! `./data/<dataset>`, else `/usr/share/datasets/<dataset>` (where Debian's
//! `dataset-fashion-mnist` installs Fashion-MNIST).

use super::{cifar, idx, nmnist, DataError, DatasetKind, Split};
use std::path::{Path, PathBuf};

/// The system-wide folder searched last.
pub const SYSTEM_DIR: &str = "/usr/share/datasets";

/// True if `dir` holds (at least one split of) the dataset's files.
pub fn has_dataset(kind: DatasetKind, dir: &Path) -> bool {
    match kind {
        DatasetKind::MnistSample => true,
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            [Split::Train, Split::Test].iter().any(|&s| idx::find_file(dir, idx::base_names(s).0).1)
        }
        DatasetKind::Cifar10 => {
            let b = cifar::batches_dir(dir);
            b.join("test_batch.bin").is_file() || b.join("data_batch_1.bin").is_file()
        }
        DatasetKind::Nmnist => nmnist::split_dir(dir, Split::Train).is_dir() || nmnist::split_dir(dir, Split::Test).is_dir(),
    }
}

/// The folders searched, in order. With `data_dir`, only it and `data_dir/<dataset>`.
pub fn candidates_with(kind: DatasetKind, data_dir: Option<&Path>, env: Option<&Path>, cwd: &Path, system: &Path) -> Vec<PathBuf> {
    let name = kind.name();
    if let Some(d) = data_dir {
        return vec![d.to_path_buf(), d.join(name)];
    }
    let mut v = Vec::new();
    if let Some(e) = env {
        v.push(e.join(name));
    }
    v.push(cwd.join("data").join(name));
    v.push(system.join(name));
    v
}

/// How to get the data, for error messages.
pub fn how_to_get(kind: DatasetKind) -> String {
    let fetch = format!(
        "run `backei data fetch {kind} --dir DIR` and pass `--data-dir DIR` (or set BACKEI_DATA so that DIR is $BACKEI_DATA/{kind})"
    );
    match kind {
        DatasetKind::FashionMnist => {
            format!("{fetch}, or `apt-get install dataset-fashion-mnist` (installs into {SYSTEM_DIR}/fashion-mnist)")
        }
        DatasetKind::Nmnist => format!(
            "{fetch} (downloads, verifies and unpacks Train.zip and Test.zip; if the download is refused, put the two zips, linked from {}, into DIR by hand first)",
            super::fetch::NMNIST_PAGE
        ),
        _ => fetch,
    }
}

/// What a dataset folder must hold, for error messages.
pub fn expected_files(kind: DatasetKind) -> &'static str {
    match kind {
        DatasetKind::MnistSample => "nothing (embedded)",
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
        }
        DatasetKind::Cifar10 => "data_batch_1.bin … data_batch_5.bin and test_batch.bin (optionally in cifar-10-batches-bin/)",
        DatasetKind::Nmnist => "Train/<digit>/*.bin and Test/<digit>/*.bin",
    }
}

/// Pure form of [`locate`]: searches `candidates_with(..)`.
pub fn locate_with(
    kind: DatasetKind,
    data_dir: Option<&Path>,
    env: Option<&Path>,
    cwd: &Path,
    system: &Path,
) -> Result<PathBuf, DataError> {
    let looked = candidates_with(kind, data_dir, env, cwd, system);
    for c in &looked {
        if c.is_dir() && has_dataset(kind, c) {
            return Ok(c.clone());
        }
    }
    Err(DataError::NotFound { dataset: kind.name().to_string(), looked, expected: expected_files(kind).to_string(), how: how_to_get(kind) })
}

/// Finds the dataset's folder using `--data-dir`, `$BACKEI_DATA`, the current directory and
/// [`SYSTEM_DIR`].
pub fn locate(kind: DatasetKind, data_dir: Option<&Path>) -> Result<PathBuf, DataError> {
    let env = std::env::var_os("BACKEI_DATA").filter(|s| !s.is_empty()).map(PathBuf::from);
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    locate_with(kind, data_dir, env.as_deref(), &cwd, Path::new(SYSTEM_DIR))
}
