//! The training loop: epochs of shuffled batches through an engine, evaluation, metrics,
//! checkpoints after every epoch (and on Ctrl-C), exact resume.

use super::checkpoint::{self, Checkpoint, Progress};
use super::config::TrainConfig;
use super::metrics::{EpochRow, MetricsWriter};
use super::progress::EpochProgress;
use super::run_folder::RunFolder;
use crate::cpu::loss::Loss;
use crate::data::loader::epoch_order;
use crate::data::{Dataset, DatasetKind, LoadOptions, Loader, LoaderOptions, Split};
use crate::engine::Engine;
use crate::error::{config_err, BackeiError, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The datasets of a run: training (after --train-limit and --val-split), validation, test.
pub struct RunData {
    pub train: Arc<Dataset>,
    pub val: Option<Arc<Dataset>>,
    pub test: Arc<Dataset>,
}

/// Loads and splits the data as the configuration says. The training subset and the validation
/// split are drawn with a permutation of the seed, so a resumed run sees the very same samples.
pub fn load_data(cfg: &TrainConfig) -> Result<RunData> {
    let kind = cfg.dataset_kind()?;
    let opts = LoadOptions { data_dir: cfg.data_dir.clone(), steps: cfg.network.steps, cache_dir: None, binning: cfg.binning };
    let data_err = |e: crate::data::DataError| BackeiError::Io { path: kind.name().into(), problem: e.to_string() };
    let full_train = Dataset::load(kind, Split::Train, &opts).map_err(data_err)?;
    let mut test = Dataset::load(kind, Split::Test, &opts).map_err(data_err)?;
    if full_train.shape() != cfg.network.input && kind != DatasetKind::Nmnist {
        return Err(config_err("network.input", format!("{:?} does not match the data's {:?}", cfg.network.input, full_train.shape())));
    }
    for d in [&full_train, &test] {
        if d.is_empty() {
            return Err(empty_split(d));
        }
    }
    let mut order = epoch_order(full_train.len(), cfg.seed ^ 0x5eed_da7a, 0, true);
    if let Some(limit) = cfg.train_limit {
        order.truncate(limit);
    }
    let n_val = (order.len() as f64 * cfg.val_split).round() as usize;
    let val = (n_val > 0).then(|| Arc::new(full_train.subset(&order[..n_val])));
    let mut train_idx = order[n_val..].to_vec();
    train_idx.sort_unstable();
    let train = if cfg.train_limit.is_none() && n_val == 0 { full_train } else { full_train.subset(&train_idx) };
    if train.is_empty() {
        let of = match cfg.train_limit {
            Some(l) => format!("--train-limit {l}"),
            None => format!("all {} training samples", order.len()),
        };
        return Err(config_err("--val-split", format!("{} holds out {n_val} of {of}, leaving none to train on", cfg.val_split)));
    }
    if let Some(limit) = cfg.test_limit {
        let idx: Vec<usize> = (0..limit.min(test.len())).collect();
        test = test.subset(&idx);
    }
    Ok(RunData { train: Arc::new(train), val, test: Arc::new(test) })
}

/// The error for a split that holds no samples, naming the files it was read from.
fn empty_split(d: &Dataset) -> BackeiError {
    let files: Vec<String> = d.sources().iter().map(|p| p.display().to_string()).collect();
    BackeiError::Io {
        path: if files.is_empty() { d.kind().name().to_string() } else { files.join(", ") },
        problem: format!(
            "the {} split of {} holds 0 samples; a run needs at least one to {} (is this the right file, or was it cut short?)",
            d.split(),
            d.kind(),
            if d.split() == Split::Train { "train on" } else { "evaluate on" }
        ),
    }
}

/// Batches the loader prepares ahead.
const PREFETCH: usize = 4;

/// Checks, before anything is allocated, that the run's batch size and T fit the memory there is
/// (the network's state on the device or in host memory, the loader's buffers in host memory).
pub fn check_memory(cfg: &TrainConfig, engine: &Engine) -> Result<()> {
    let room = crate::memory::Room { device_free: engine.device_memory_free(), host: crate::memory::host_available() };
    let frames_each_step = cfg.encoding()? == crate::data::Encoding::Rate || cfg.dataset_kind()? == DatasetKind::Nmnist;
    let settings = engine.step_settings();
    crate::memory::check_run(&cfg.network, cfg.batch_size, cfg.network.steps, frames_each_step, PREFETCH, cfg.workers, &room, &settings)
}

pub fn loader_options(cfg: &TrainConfig, train: bool) -> Result<LoaderOptions> {
    Ok(LoaderOptions {
        batch_size: cfg.batch_size,
        steps: cfg.network.steps,
        encoding: cfg.encoding()?,
        shuffle: train,
        seed: cfg.seed,
        drop_last: false,
        augment: train && cfg.dataset_kind()? == DatasetKind::Cifar10,
        workers: cfg.workers,
        prefetch: PREFETCH,
    })
}

/// Accuracy, loss and confusion matrix of an engine over a whole dataset.
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<usize>>,
    pub spike_stats: Vec<(usize, f64, Option<f64>)>,
    pub samples: usize,
}

pub fn evaluate(engine: &mut Engine, data: Arc<Dataset>, cfg: &TrainConfig) -> Result<Evaluation> {
    let classes = data.num_classes();
    let loader = Loader::with_allocator(data, loader_options(cfg, false)?, engine.buffer_allocator());
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (mut loss_sum, mut n, mut correct) = (0.0, 0usize, 0usize);
    let mut rates: Vec<(usize, f64, Option<f64>)> = Vec::new();
    for batch in loader.epoch(0) {
        let s = engine.evaluate(&batch.x, batch.t_in, &batch.labels, cfg.loss)?;
        let preds = engine.last_predictions()?;
        loss_sum += s.loss * s.batch as f64;
        n += s.batch;
        correct += s.correct;
        for (p, l) in preds.iter().zip(&batch.labels) {
            confusion[*l as usize][*p] += 1;
        }
        let st = engine.spike_stats()?;
        if rates.is_empty() {
            rates = st.iter().map(|&(i, _, inh)| (i, 0.0, inh.map(|_| 0.0))).collect();
        }
        for (acc, cur) in rates.iter_mut().zip(&st) {
            acc.1 += cur.1 * s.batch as f64;
            if let (Some(a), Some(c)) = (acc.2.as_mut(), cur.2) {
                *a += c * s.batch as f64;
            }
        }
        loader.recycle(batch);
    }
    if n == 0 {
        return Err(config_err("--test-limit", "nothing to evaluate: the data set holds 0 samples"));
    }
    for r in &mut rates {
        r.1 /= n.max(1) as f64;
        if let Some(a) = r.2.as_mut() {
            *a /= n.max(1) as f64;
        }
    }
    Ok(Evaluation {
        accuracy: correct as f64 / n.max(1) as f64,
        loss: loss_sum / n.max(1) as f64,
        confusion,
        spike_stats: rates,
        samples: n,
    })
}

pub enum RunOutcome {
    Finished {
        final_test_accuracy: f64,
        best_accuracy: f64,
        best_epoch: usize,
    },
    Interrupted {
        checkpoint: PathBuf,
    },
    /// `--resume` of a run that has already done the epochs asked for: nothing was run or written.
    AlreadyFinished {
        epochs_done: usize,
        batches_done: usize,
        epochs: usize,
        best_accuracy: f64,
        best_epoch: usize,
    },
}

pub struct RunOptions<'a> {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub resume: Option<Checkpoint>,
    pub quiet: bool,
    /// Set by the Ctrl-C handler: the loop saves a checkpoint and stops after the current step.
    pub interrupt: Arc<AtomicBool>,
    /// Extra lines for config.json (engine, device).
    pub engine_line: &'a str,
}

fn write_config(out: &Path, cfg: &TrainConfig, engine_line: &str) -> Result<()> {
    let v = serde_json::json!({
        "backei_version": env!("CARGO_PKG_VERSION"),
        "commit": option_env!("BACKEI_GIT_COMMIT").unwrap_or("unknown"),
        "engine": engine_line,
        "config": cfg,
    });
    let path = out.join("config.json");
    crate::atomic_file::write(&path, serde_json::to_string_pretty(&v).expect("plain data").as_bytes())
        .map_err(|e| BackeiError::Io { path: path.display().to_string(), problem: e.to_string() })
}

/// Trains as the configuration says, printing one summary line per epoch.
pub fn train(opts: RunOptions, engine: &mut Engine) -> Result<RunOutcome> {
    let slots = engine.slots().to_vec();
    let slots = &slots[..];
    let cfg = &opts.config;
    cfg.validate()?;
    // locked for the whole run; temporary files of killed runs removed; the checkpoint pair made whole
    let (folder, notes) = RunFolder::open(&opts.out)?;
    for n in notes {
        eprintln!("{n}");
    }
    if let Some(ck) = &opts.resume {
        if let Some(line) = folder.reconcile_best()? {
            eprintln!("{line}");
        }
        let p = &ck.progress;
        if p.epoch >= cfg.epochs {
            return Ok(RunOutcome::AlreadyFinished {
                epochs_done: p.epoch,
                batches_done: p.batches_done,
                epochs: cfg.epochs,
                best_accuracy: p.best_accuracy,
                best_epoch: p.best_epoch,
            });
        }
    }
    check_memory(cfg, engine)?;
    let data = load_data(cfg)?;
    write_config(&opts.out, cfg, opts.engine_line)?;
    let mut progress = Progress { epoch: 0, batches_done: 0, iteration: 0, partial: [0.0; 4], best_accuracy: -1.0, best_epoch: 0 };
    if let Some(ck) = opts.resume {
        engine.load_params(&ck.params)?;
        engine.set_optimizer_state(&ck.optimizer)?;
        engine.set_iteration(ck.progress.iteration);
        progress = ck.progress;
    }
    let metrics = MetricsWriter::open(&opts.out, progress.epoch)?;
    // Page-locked buffers on the GPU engine: each batch's upload is a direct DMA.
    let loader = Loader::with_allocator(data.train.clone(), loader_options(cfg, true)?, engine.buffer_allocator());
    let batches = loader.batches_per_epoch();
    let last_path = folder.last();
    let best_path = folder.best();
    let base_lr = cfg.optimizer.lr();
    let save = |path: &Path, engine: &Engine, progress: &Progress| -> Result<()> {
        let ck =
            Checkpoint { config: cfg.clone(), progress: progress.clone(), params: engine.params()?, optimizer: engine.optimizer_state()? };
        checkpoint::save(path, &ck, slots)
    };
    // A test hook: behave as if Ctrl-C came after this many training batches of this process.
    let interrupt_after: Option<usize> = std::env::var("BACKEI_INTERRUPT_AFTER_BATCHES").ok().and_then(|v| v.parse().ok());
    let mut batches_this_process = 0usize;
    let mut final_acc = 0.0;
    for epoch in progress.epoch..cfg.epochs {
        let lr = cfg.lr_schedule.lr_at(base_lr, epoch);
        engine.set_lr(lr);
        let mut bar = EpochProgress::new(epoch, cfg.epochs, batches, opts.quiet);
        let started = Instant::now();
        let [mut loss_sum, mut correct, mut seen, secs_before] = progress.partial;
        for (k, batch) in loader.epoch(epoch).enumerate() {
            if k < progress.batches_done {
                loader.recycle(batch);
                continue;
            }
            // the GPU returns the step before this one's results (it runs one step ahead)
            let done = engine.train_step_pipelined(&batch.x, batch.t_in, &batch.labels, cfg.loss).map_err(|e| in_epoch(e, epoch))?;
            loader.recycle(batch);
            let interrupted = opts.interrupt.load(Ordering::SeqCst) || interrupt_after == Some(batches_this_process + 1);
            // the last step of the epoch, or before a checkpoint: wait for its results too
            let last = if k + 1 == batches || interrupted { engine.finish_steps().map_err(|e| in_epoch(e, epoch))? } else { None };
            for s in done.iter().chain(&last) {
                loss_sum += s.loss * s.batch as f64;
                correct += s.correct as f64;
                seen += s.batch as f64;
            }
            progress.batches_done = k + 1;
            progress.iteration = engine.iteration();
            batches_this_process += 1;
            if interrupt_after == Some(batches_this_process) {
                opts.interrupt.store(true, Ordering::SeqCst);
            }
            let secs = secs_before + started.elapsed().as_secs_f64();
            bar.update(k + 1, seen / secs.max(1e-9), loss_sum / seen.max(1.0), correct / seen.max(1.0));
            if interrupted && k + 1 < batches {
                progress.partial = [loss_sum, correct, seen, secs];
                bar.finish();
                save(&last_path, engine, &progress)?;
                return Ok(RunOutcome::Interrupted { checkpoint: last_path });
            }
        }
        bar.finish();
        // (nothing is pending when the epoch ran to its last batch; this keeps it so otherwise)
        if let Some(s) = engine.finish_steps().map_err(|e| in_epoch(e, epoch))? {
            loss_sum += s.loss * s.batch as f64;
            correct += s.correct as f64;
            seen += s.batch as f64;
        }
        let seconds = secs_before + started.elapsed().as_secs_f64();
        let stats = engine.spike_stats()?;
        let val = match &data.val {
            Some(v) => Some(evaluate(engine, v.clone(), cfg)?.accuracy),
            None => None,
        };
        let test = evaluate(engine, data.test.clone(), cfg)?;
        final_acc = test.accuracy;
        let row = EpochRow {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1.0),
            train_accuracy: correct / seen.max(1.0),
            val_accuracy: val,
            test_accuracy: Some(test.accuracy),
            test_loss: Some(test.loss),
            lr,
            seconds,
            samples_per_second: seen / seconds.max(1e-9),
            firing_rates: stats.iter().map(|s| s.1).collect(),
            inhibitory_fractions: stats.iter().filter_map(|s| s.2).collect(),
        };
        metrics.append(&row)?;
        // selection by validation accuracy when there is a validation split, else by test
        let score = val.unwrap_or(test.accuracy);
        progress.epoch = epoch + 1;
        progress.batches_done = 0;
        progress.partial = [0.0; 4];
        progress.iteration = engine.iteration();
        let improved = score > progress.best_accuracy;
        if improved {
            progress.best_accuracy = score;
            progress.best_epoch = epoch + 1;
        }
        // last first, then best as its copy: `last` records the best epoch, so a kill between the
        // two is repaired from it when the folder is opened again (RunFolder::reconcile_best)
        save(&last_path, engine, &progress)?;
        if improved {
            crate::atomic_file::copy(&last_path, &best_path)
                .map_err(|e| BackeiError::Io { path: best_path.display().to_string(), problem: format!("cannot write checkpoint: {e}") })?;
        }
        eprintln!(
            "epoch {}/{}: train loss {:.4} acc {:.2}% | {}test acc {:.2}% | lr {:.1e} | {:.1}s, {:.0} samples/s{}",
            epoch + 1,
            cfg.epochs,
            row.train_loss,
            row.train_accuracy * 100.0,
            val.map(|v| format!("val acc {:.2}% | ", v * 100.0)).unwrap_or_default(),
            test.accuracy * 100.0,
            lr,
            seconds,
            row.samples_per_second,
            if improved { " (best)" } else { "" }
        );
        if opts.interrupt.load(Ordering::SeqCst) && epoch + 1 < cfg.epochs {
            return Ok(RunOutcome::Interrupted { checkpoint: last_path });
        }
    }
    Ok(RunOutcome::Finished { final_test_accuracy: final_acc, best_accuracy: progress.best_accuracy, best_epoch: progress.best_epoch })
}

/// A non-finite step's error, with the epoch it happened in.
fn in_epoch(e: BackeiError, epoch: usize) -> BackeiError {
    match e {
        BackeiError::NonFinite { place, index, value, hint } => {
            BackeiError::NonFinite { place: format!("{place} (epoch {})", epoch + 1), index, value, hint }
        }
        other => other,
    }
}

/// A loss parsed from the command line.
pub fn parse_loss(s: &str) -> Result<Loss> {
    s.parse().map_err(|e: String| config_err("--loss", e))
}
