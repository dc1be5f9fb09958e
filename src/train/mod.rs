//! The training loop and everything around it: run configuration, checkpoints, metrics,
//! progress display, evaluation.

pub mod checkpoint;
pub mod config;
pub mod config_file;
pub mod metrics;
pub mod progress;
pub mod report;
pub mod run;
pub mod run_folder;
pub mod signals;
pub mod tensorboard;

pub use config::TrainConfig;
