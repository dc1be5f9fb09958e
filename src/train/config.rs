//! The resolved settings of a training run: what `config.json` records and `--resume` restores.
//! Each dataset's defaults reproduce the paper's recipe, except the embedded `mnist-sample`,
//! whose defaults are sized for a two-core CPU.

use crate::cpu::loss::Loss;
use crate::data::nmnist::Binning;
use crate::data::{DatasetKind, Encoding};
use crate::error::{config_err, Result};
use crate::optim::{OptimizerConfig, StepLr};
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
    pub lr_schedule: StepLr,
    pub encoding: String,
    pub loss: Loss,
    pub seed: u64,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Fraction of the training set held out for validation (0 = none).
    pub val_split: f64,
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

impl TrainConfig {
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
        if self.lr_schedule.step_size == 0 {
            return Err(config_err("--lr-step", "must be at least 1 epoch"));
        }
        let gamma = self.lr_schedule.gamma;
        if !(gamma > 0.0 && gamma <= 1.0) {
            return Err(config_err(
                "--lr-gamma",
                format!("{gamma} must lie in (0, 1] (the factor StepLR multiplies the learning rate by)"),
            ));
        }
        if self.train_limit == Some(0) {
            return Err(config_err("--train-limit", "0: must be at least 1 (leave it out to train on the whole training set)"));
        }
        if self.test_limit == Some(0) {
            return Err(config_err("--test-limit", "0: must be at least 1 (leave it out to evaluate on the whole test set)"));
        }
        self.optimizer.validate()?;
        crate::cpu::backei_layer::SavedState::lean(self.recompute).validate()?;
        self.network.plan()?;
        Ok(())
    }
}
