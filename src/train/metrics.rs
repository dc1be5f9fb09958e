//! Per-epoch metrics, written as `metrics.csv` and `metrics.jsonl` (one row per epoch, appended
//! and flushed as each epoch ends, so a crash loses nothing already reported).

use crate::error::{BackeiError, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_accuracy: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Firing rate of each spiking layer (on the last training batch).
    pub firing_rates: Vec<f64>,
    /// Fraction of inhibitory outputs among fired spikes, per BackEI layer with E/I.
    pub inhibitory_fractions: Vec<f64>,
    /// Loss on the validation split (absent in rows written before it was recorded).
    #[serde(default)]
    pub val_loss: Option<f64>,
    /// Seconds the epoch's evaluations took (validation and test); `seconds` is the training's.
    /// Absent in rows written before it was recorded.
    #[serde(default)]
    pub eval_seconds: Option<f64>,
}

pub struct MetricsWriter {
    csv: PathBuf,
    jsonl: PathBuf,
}

fn io(path: &Path, e: std::io::Error) -> BackeiError {
    BackeiError::Io { path: path.display().to_string(), problem: e.to_string() }
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.6}")).unwrap_or_default()
}

impl MetricsWriter {
    /// Opens (creating with a header if new) the two files in `dir`. On resume, rows of epochs
    /// at or after `from_epoch` are dropped, so the files match an uninterrupted run.
    pub fn open(dir: &Path, from_epoch: usize) -> Result<Self> {
        let w = MetricsWriter { csv: dir.join("metrics.csv"), jsonl: dir.join("metrics.jsonl") };
        // metrics.jsonl is the record; metrics.csv is rewritten from it (so its columns are this
        // version's even for rows an earlier version wrote)
        let old_jsonl = std::fs::read_to_string(&w.jsonl).unwrap_or_default();
        let mut jsonl = String::new();
        let mut csv = String::from(Self::HEADER);
        csv.push('\n');
        for line in old_jsonl.lines() {
            if let Ok(row) = serde_json::from_str::<EpochRow>(line) {
                if row.epoch <= from_epoch {
                    jsonl.push_str(line);
                    jsonl.push('\n');
                    csv.push_str(&Self::csv_line(&row));
                }
            }
        }
        crate::atomic_file::write(&w.csv, csv.as_bytes()).map_err(|e| io(&w.csv, e))?;
        crate::atomic_file::write(&w.jsonl, jsonl.as_bytes()).map_err(|e| io(&w.jsonl, e))?;
        Ok(w)
    }

    const HEADER: &'static str = "epoch,train_loss,train_accuracy,val_accuracy,test_accuracy,test_loss,lr,seconds,samples_per_second,firing_rates,inhibitory_fractions,val_loss,eval_seconds";

    fn csv_line(row: &EpochRow) -> String {
        let join = |v: &[f64]| v.iter().map(|x| format!("{x:.5}")).collect::<Vec<_>>().join(";");
        format!(
            "{},{:.6},{:.6},{},{},{},{:e},{:.3},{:.1},{},{},{},{}\n",
            row.epoch,
            row.train_loss,
            row.train_accuracy,
            opt(row.val_accuracy),
            opt(row.test_accuracy),
            opt(row.test_loss),
            row.lr,
            row.seconds,
            row.samples_per_second,
            join(&row.firing_rates),
            join(&row.inhibitory_fractions),
            opt(row.val_loss),
            row.eval_seconds.map(|s| format!("{s:.3}")).unwrap_or_default(),
        )
    }

    pub fn append(&self, row: &EpochRow) -> Result<()> {
        let line = Self::csv_line(row);
        let append = |path: &Path, text: &str| -> Result<()> {
            let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path).map_err(|e| io(path, e))?;
            f.write_all(text.as_bytes()).map_err(|e| io(path, e))?;
            f.sync_data().map_err(|e| io(path, e))
        };
        append(&self.csv, &line)?;
        append(&self.jsonl, &(serde_json::to_string(row).expect("plain data") + "\n"))
    }

    /// Every row of a run folder's `metrics.jsonl`.
    pub fn read(dir: &Path) -> Result<Vec<EpochRow>> {
        let path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        text.lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| BackeiError::Io { path: path.display().to_string(), problem: format!("line {}: {e}", i + 1) })
            })
            .collect()
    }
}
