//! A run folder as the trainer holds it: locked against a second writer, cleared of the temporary
//! files a killed process left, and its checkpoint pair made consistent.
//!
//! The pair: at the end of an epoch `checkpoint-last` is written first, then, if the epoch
//! improved on the best, `checkpoint-best` as a copy of it. `checkpoint-last` is the record: its
//! progress names the best epoch. A kill between the two writes leaves a `checkpoint-last` that
//! *is* the best (its epoch is its best epoch) beside an older `checkpoint-best`;
//! [`RunFolder::reconcile_best`] sees that and copies it over. After a kill at any other point the
//! pair is already consistent (both old, or both new), so the best checkpoint is never lost.

use super::checkpoint::{self, Checkpoint};
use super::config::TrainConfig;
use crate::atomic_file;
use crate::error::{BackeiError, Result};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const LAST: &str = "checkpoint-last.safetensors";
pub const BEST: &str = "checkpoint-best.safetensors";
pub const CONFIG: &str = "config.json";

/// A run folder opened for writing. The lock (an exclusive `flock` on the folder itself) is held
/// until this is dropped, so two processes never write one run folder.
pub struct RunFolder {
    dir: PathBuf,
    _lock: std::fs::File,
}

fn io_err(path: &Path, problem: impl std::fmt::Display) -> BackeiError {
    BackeiError::Io { path: path.display().to_string(), problem: problem.to_string() }
}

impl RunFolder {
    /// Creates (if needed) and locks `dir`, then removes stale temporary files. Returns the folder
    /// and a note per temporary file removed.
    pub fn open(dir: &Path) -> Result<(RunFolder, Vec<String>)> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, format!("cannot create the run folder: {e}")))?;
        let lock = Self::try_lock(dir)?.ok_or_else(|| {
            io_err(dir, "another backei process is writing this run folder (it holds its lock); wait for it to end or use another --out")
        })?;
        let removed = atomic_file::remove_stale_temps(dir).map_err(|e| io_err(dir, format!("cannot remove stale temporary files: {e}")))?;
        let notes = removed.iter().map(|p| format!("removed {} (a temporary file left by a killed run)", p.display())).collect();
        Ok((RunFolder { dir: dir.to_path_buf(), _lock: lock }, notes))
    }

    /// Opens `dir` only if no other process holds it (None if one does).
    pub fn open_if_free(dir: &Path) -> Result<Option<RunFolder>> {
        Ok(Self::try_lock(dir)?.map(|lock| RunFolder { dir: dir.to_path_buf(), _lock: lock }))
    }

    fn try_lock(dir: &Path) -> Result<Option<std::fs::File>> {
        let f = std::fs::File::open(dir).map_err(|e| io_err(dir, format!("cannot open the run folder: {e}")))?;
        // SAFETY: flock(2) on a descriptor we own.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(Some(f));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Ok(None),
            // a file system without locks (some network mounts): go on unlocked
            Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => Ok(Some(f)),
            _ => Err(io_err(dir, format!("cannot lock the run folder: {e}"))),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn last(&self) -> PathBuf {
        self.dir.join(LAST)
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join(BEST)
    }

    /// Makes `checkpoint-best` hold the epoch `checkpoint-last` records as the best, when the last
    /// write sequence was cut between the two files. Returns a line saying what was repaired.
    pub fn reconcile_best(&self) -> Result<Option<String>> {
        let last_path = self.last();
        if !last_path.is_file() {
            return Ok(None);
        }
        let (last, _) = checkpoint::load(&last_path)?;
        let p = &last.progress;
        let last_is_best = p.batches_done == 0 && p.epoch > 0 && p.best_epoch == p.epoch;
        if !last_is_best {
            return Ok(None);
        }
        let best_path = self.best();
        let best_epoch = match checkpoint::load(&best_path) {
            Ok((best, _)) => Some(best.progress.epoch),
            Err(_) => None,
        };
        if best_epoch == Some(p.best_epoch) {
            return Ok(None);
        }
        atomic_file::copy(&last_path, &best_path)
            .map_err(|e| io_err(&best_path, format!("cannot restore the best checkpoint from {LAST}: {e}")))?;
        Ok(Some(format!(
            "restored {} from {LAST}: epoch {} is the best (the last run stopped between writing the two)",
            best_path.display(),
            p.best_epoch
        )))
    }
}

/// Checks that a checkpoint belongs to the run folder `dir` it is used with: its dataset and
/// network equal those of `dir/config.json` (when there is one). `allow` skips the check (the
/// user said so).
pub fn check_belongs(dir: &Path, file: &Path, ck: &Checkpoint, allow: bool) -> Result<()> {
    let path = dir.join(CONFIG);
    if allow || !path.exists() {
        return Ok(());
    }
    let hint = "pass --allow-foreign-checkpoint to use it anyway (its own settings are used)";
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, format!("cannot read the run's settings: {e}; {hint}")))?;
    let recorded: TrainConfig = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::from_value(v["config"].clone()).ok())
        .ok_or_else(|| io_err(&path, format!("not a backei run configuration; {hint}")))?;
    let differs = if recorded.dataset != ck.config.dataset {
        Some(format!("dataset `{}`, but {} says `{}`", ck.config.dataset, path.display(), recorded.dataset))
    } else if recorded.network != ck.config.network {
        Some(format!("network `{}` with other settings than {} records", ck.config.network.name, path.display()))
    } else {
        None
    };
    match differs {
        Some(d) => Err(BackeiError::Config {
            field: "--resume/--checkpoint".into(),
            problem: format!("{} was trained with {d}: it does not belong to this run folder; {hint}", file.display()),
        }),
        None => Ok(()),
    }
}
