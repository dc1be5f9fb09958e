//! The `backei data …` subcommands.

use super::{fetch, inspect, locate, DatasetKind, LoadOptions, EMBEDDED_SAMPLE_NOTICE};
use std::path::PathBuf;

/// Dataset tools. Datasets: mnist-sample (built in), mnist, fashion-mnist, cifar10, nmnist.
#[derive(clap::Subcommand, Debug, Clone)]
#[command(after_help = EMBEDDED_SAMPLE_NOTICE)]
pub enum DataCommand {
    /// Download a dataset's standard files (SHA-256 verified, resumable). N-MNIST: unpacks
    /// Train.zip/Test.zip that you downloaded into DIR.
    #[command(after_help = EMBEDDED_SAMPLE_NOTICE)]
    Fetch {
        /// mnist, fashion-mnist, cifar10 or nmnist.
        dataset: DatasetKind,
        /// Destination folder [default: $BACKEI_DATA/<dataset>, else ./data/<dataset>].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Do not draw progress bars.
        #[arg(long)]
        no_progress: bool,
    },
    /// Counts per split and class, pixel mean and std, file checksums; optional image grid.
    #[command(after_help = EMBEDDED_SAMPLE_NOTICE)]
    Inspect {
        /// mnist-sample, mnist, fashion-mnist, cifar10 or nmnist.
        dataset: DatasetKind,
        /// Dataset folder [default: searches $BACKEI_DATA/<dataset>, ./data/<dataset>, /usr/share/datasets/<dataset>].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write the first 64 training samples as a PNG grid (N-MNIST: frames summed).
        #[arg(long, value_name = "OUT.png")]
        grid: Option<PathBuf>,
        /// N-MNIST: number of frames T the events are binned into.
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// N-MNIST: where binned frames are cached [default: <dataset folder>/backei-cache].
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
}

/// Default folder for `fetch`: `$BACKEI_DATA/<dataset>`, else `./data/<dataset>`.
pub fn default_fetch_dir(kind: DatasetKind) -> PathBuf {
    match std::env::var_os("BACKEI_DATA").filter(|s| !s.is_empty()) {
        Some(d) => PathBuf::from(d).join(kind.name()),
        None => PathBuf::from("data").join(kind.name()),
    }
}

/// Runs a `data` subcommand.
pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Fetch { dataset, dir, no_progress } => {
            let dir = dir.unwrap_or_else(|| default_fetch_dir(dataset));
            let progress = !no_progress;
            fetch::fetch(dataset, &dir, progress, &mut |line| println!("{line}"))?;
            if dataset != DatasetKind::MnistSample {
                println!(
                    "{dataset} is in {}; found by `--data-dir {}`{}",
                    dir.display(),
                    dir.display(),
                    if locate::has_dataset(dataset, &dir) { "" } else { " (files incomplete?)" }
                );
            }
            Ok(())
        }
        DataCommand::Inspect { dataset, data_dir, grid, steps, cache_dir } => {
            let opts = LoadOptions { data_dir, steps, cache_dir };
            let (report, train) = inspect::inspect(dataset, &opts)?;
            print!("{report}");
            if let Some(out) = grid {
                inspect::render_grid(&train, 64, &out)?;
                println!("wrote {}", out.display());
            }
            Ok(())
        }
    }
}
