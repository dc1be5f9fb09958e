//! The resolved settings of a training run: what `config.json` records and `--resume` restores.
//! Each dataset's defaults reproduce the paper's recipe, except the embedded `mnist-sample`,
//! whose defaults are sized for a two-core CPU.

use crate::cpu::loss::Loss;
use crate::data::nmnist::Binning;
use crate::data::{DatasetKind, Encoding};
use crate::error::{config_err, Result};
use crate::optim::{LrSchedule, OptimizerConfig};
use crate::precision::Precision;
use crate::spec::NetworkSpec;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub dataset: String,
    pub data_dir: Option<PathBuf>,
    pub device: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    pub lr_schedule: LrSchedule,
    pub encoding: String,
    pub loss: Loss,
    pub seed: u64,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Fraction of the training set held out for validation (0 = none): the best checkpoint and
    /// early stopping are decided on it; without one, on the test set (the paper's protocol).
    pub val_split: f64,
    /// Stop when the validation accuracy has not improved for this many epochs (None: never).
    /// Absent in configs written before it existed.
    #[serde(default)]
    pub early_stopping: Option<usize>,
    /// TensorBoard's per-step scalars every this many training batches (the per-epoch ones are
    /// written at every epoch). Absent in configs written before it existed: 50.
    #[serde(default = "default_log_interval")]
    pub log_interval: usize,
    pub deterministic: bool,
    /// How the GPU rounds the operands of the convolutions' and linear layers' products; master
    /// weights, optimizer state and checkpoints are f32 in every mode, and the CPU engine computes
    /// in f32 whatever this says. Absent in configs written before it existed: fp32.
    #[serde(default)]
    pub precision: Precision,
    /// Keep the spiking layers' state every K steps and recompute the rest in the backward
    /// (`--recompute K`; None keeps every step). Gradients are bit-identical either way.
    #[serde(default)]
    pub recompute: Option<usize>,
    pub workers: usize,
    /// The network, with T, back/ei, D and r folded in.
    pub network: NetworkSpec,
    /// How N-MNIST events are cut into frames (`--binning`); runs recorded before it existed used
    /// `equal-time`.
    #[serde(default = "Binning::legacy")]
    pub binning: Binning,
}

fn default_log_interval() -> usize {
    DEFAULT_LOG_INTERVAL
}

/// TensorBoard's per-step scalars: every 50 training batches unless `--log-interval` says otherwise.
pub const DEFAULT_LOG_INTERVAL: usize = 50;

/// The fraction of the training set a new run holds out for validation unless `--val-split`
/// says otherwise: the best checkpoint is chosen on it, and the test set stays for reporting.
pub const DEFAULT_VAL_SPLIT: f64 = 0.1;

/// The defaults of a dataset (before command-line overrides).
pub struct DatasetDefaults {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub steps: usize,
    pub train_limit: Option<usize>,
}

pub fn defaults_for(kind: DatasetKind) -> DatasetDefaults {
    match kind {
        // Sized so that a bare `backei train` ends on a two-core CPU within 5 minutes with
        // ≥ 95 % test accuracy (see README: measured figures).
        DatasetKind::MnistSample => DatasetDefaults { epochs: 3, batch_size: 16, lr: 1e-3, steps: 4, train_limit: None },
        // The paper's recipe: Adam 1e-3, StepLR ×0.1 every 40 epochs, 200 epochs, batch 100, T = 20.
        _ => DatasetDefaults { epochs: 200, batch_size: 100, lr: 1e-3, steps: 20, train_limit: None },
    }
}

/// The network a dataset trains.
pub fn network_for(kind: DatasetKind) -> NetworkSpec {
    match kind {
        DatasetKind::MnistSample | DatasetKind::Mnist => NetworkSpec::mnist(),
        DatasetKind::FashionMnist => NetworkSpec::fashion_mnist(),
        DatasetKind::Cifar10 => NetworkSpec::cifar10(),
        DatasetKind::Nmnist => NetworkSpec::nmnist(),
    }
}

/// The seed of the paper's runs (and every default run).
pub const DEFAULT_SEED: u64 = 4150;

impl TrainConfig {
    /// A new run's settings for a dataset before any flag or `--config` file: the dataset's
    /// defaults (the paper's recipe, or the two-core-CPU sizing of `mnist-sample`), a
    /// validation split of [`DEFAULT_VAL_SPLIT`], the engine chosen by `--device auto`.
    pub fn defaults(kind: DatasetKind) -> TrainConfig {
        let d = defaults_for(kind);
        let mut network = network_for(kind);
        network.steps = d.steps;
        TrainConfig {
            dataset: kind.name().into(),
            data_dir: None,
            device: "auto".into(),
            epochs: d.epochs,
            batch_size: d.batch_size,
            optimizer: OptimizerConfig::adam(d.lr),
            lr_schedule: LrSchedule::paper(),
            encoding: "direct".into(),
            loss: Loss::Mse,
            seed: DEFAULT_SEED,
            train_limit: d.train_limit,
            test_limit: None,
            val_split: DEFAULT_VAL_SPLIT,
            early_stopping: None,
            log_interval: DEFAULT_LOG_INTERVAL,
            deterministic: false,
            precision: Precision::default(),
            recompute: None,
            workers: 2,
            network,
            binning: Binning::default(),
        }
    }

    pub fn dataset_kind(&self) -> Result<DatasetKind> {
        self.dataset.parse().map_err(|e: String| config_err("dataset", e))
    }

    pub fn encoding(&self) -> Result<Encoding> {
        match self.encoding.as_str() {
            "direct" => Ok(Encoding::Direct),
            "rate" => Ok(Encoding::Rate),
            other => Err(config_err("encoding", format!("`{other}`: expected direct or rate"))),
        }
    }

    /// Every setting checked together, with the option to change named.
    pub fn validate(&self) -> Result<()> {
        self.dataset_kind()?;
        self.encoding()?;
        if self.epochs == 0 {
            return Err(config_err("--epochs", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(config_err("--batch-size", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.val_split) {
            return Err(config_err("--val-split", format!("{} must lie in [0, 1)", self.val_split)));
        }
        if self.early_stopping == Some(0) {
            return Err(config_err("--early-stopping", "0: must be at least 1 epoch without improvement"));
        }
        if self.early_stopping.is_some() && self.val_split == 0.0 {
            return Err(config_err(
                "--early-stopping",
                "needs a validation split to watch (--val-split > 0): stopping on the test accuracy would choose on the test set",
            ));
        }
        if self.log_interval == 0 {
            return Err(config_err("--log-interval", "0: must be at least 1 batch"));
        }
        if self.train_limit == Some(0) {
            return Err(config_err("--train-limit", "0: must be at least 1 (leave it out to train on the whole training set)"));
        }
        if self.test_limit == Some(0) {
            return Err(config_err("--test-limit", "0: must be at least 1 (leave it out to evaluate on the whole test set)"));
        }
        self.optimizer.validate()?;
        self.lr_schedule.validate(self.optimizer.lr())?;
        crate::cpu::backei_layer::SavedState::lean(self.recompute).validate()?;
        self.network.plan()?;
        Ok(())
    }
}
