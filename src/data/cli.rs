//! The `backei data …` subcommands.

use super::{fetch, inspect, locate, DatasetKind, LoadOptions, EMBEDDED_SAMPLE_NOTICE};
use std::path::PathBuf;

/// Dataset tools. Datasets: mnist-sample (built in), mnist, fashion-mnist, cifar10, nmnist.
#[derive(clap::Subcommand, Debug, Clone)]
#[command(after_help = EMBEDDED_SAMPLE_NOTICE)]
pub enum DataCommand {
    /// Download a dataset's standard files (checksum verified, resumable) and unpack the
    /// archives. Files already in DIR (e.g. N-MNIST's Train.zip/Test.zip downloaded by hand) are
    /// verified and unpacked, not downloaded again.
    #[command(after_help = EMBEDDED_SAMPLE_NOTICE)]
    Fetch {
        /// mnist, fashion-mnist, cifar10 or nmnist.
        dataset: DatasetKind,
        /// Destination folder [default: $BACKEI_DATA/<dataset>, else ./data/<dataset>].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Download URL/<file name> instead of the usual locations (same checksums), e.g. your
        /// institution's copy [default: $BACKEI_MIRROR].
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
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
        /// N-MNIST: how events are cut into frames: tonic-time (tonic's ToFrame(n_time_bins=T)),
        /// tonic-events, spikingjelly-time, spikingjelly-number or equal-time (docs/data.md).
        #[arg(long, default_value_t = super::nmnist::Binning::default())]
        binning: super::nmnist::Binning,
    },
}

/// Default folder for `fetch`: `$BACKEI_DATA/<dataset>`, else `./data/<dataset>`.
pub fn default_fetch_dir(kind: DatasetKind) -> PathBuf {
    match std::env::var_os("BACKEI_DATA").filter(|s| !s.is_empty()) {
        Some(d) => PathBuf::from(d).join(kind.name()),
        None => PathBuf::from("data").join(kind.name()),
    }
}

/// Default of `fetch --mirror`: `$BACKEI_MIRROR` when set and not empty.
pub fn default_mirror() -> Option<String> {
    std::env::var("BACKEI_MIRROR").ok().filter(|s| !s.is_empty())
}

/// Runs a `data` subcommand.
pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Fetch { dataset, dir, mirror, no_progress } => {
            let dir = dir.unwrap_or_else(|| default_fetch_dir(dataset));
            let mirror = mirror.or_else(default_mirror).filter(|m| !m.is_empty());
            if let Some(m) = &mirror {
                println!("fetching from the mirror {m} (not the usual locations)");
            }
            let opts = fetch::FetchOptions { progress: !no_progress, mirror };
            fetch::fetch(dataset, &dir, &opts, &mut |line| println!("{line}"))?;
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
        DataCommand::Inspect { dataset, data_dir, grid, steps, cache_dir, binning } => {
            let opts = LoadOptions { data_dir, steps, cache_dir, binning };
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
