//! The training loop: epochs of shuffled batches through an engine, evaluation, metrics,
//! checkpoints after every epoch (and on Ctrl-C), exact resume.

use super::checkpoint::{self, Checkpoint, Progress};
use super::config::TrainConfig;
use super::metrics::{EpochRow, MetricsWriter};
use super::progress::{human, Display, PhaseProgress, Position, RunClock};
use super::report::{cpu_duration_warning, silence_hint, summary};
use super::run_folder::RunFolder;
use super::tensorboard::EventWriter;
use crate::cpu::loss::Loss;
use crate::data::loader::epoch_order;
use crate::data::{Dataset, DatasetKind, LoadOptions, Loader, LoaderOptions, Split};
use crate::dist::{fingerprint, Collective, Solo, Team};
use crate::engine::Engine;
use crate::error::{config_err, BackeiError, Result};
use crate::spec::LayerSpec;
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
        shard: Default::default(),
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
    /// Wall-clock seconds the evaluation took.
    pub seconds: f64,
}

pub fn evaluate(engine: &mut Engine, data: Arc<Dataset>, cfg: &TrainConfig) -> Result<Evaluation> {
    evaluate_with_progress(engine, data, cfg, &mut |_, _| {})
}

/// `evaluate`, calling `progress(batches done, samples done)` after every batch.
pub fn evaluate_with_progress(
    engine: &mut Engine,
    data: Arc<Dataset>,
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Evaluation> {
    let solo = Solo::default();
    evaluate_sharded(engine, data, cfg, &Team::new(&solo, engine)?, progress)
}

/// The batches an evaluation of `samples` samples runs.
pub fn eval_batches(samples: usize, cfg: &TrainConfig) -> usize {
    samples.div_ceil(cfg.batch_size.max(1))
}

/// `evaluate` with every batch shared among the ranks of `team` (each evaluates its shard) and
/// the sums reduced: every rank gets the whole dataset's figures. `progress(batches, samples)`
/// counts the whole batches (every rank's shards) done.
pub fn evaluate_sharded(
    engine: &mut Engine,
    data: Arc<Dataset>,
    cfg: &TrainConfig,
    team: &Team,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Evaluation> {
    let started = Instant::now();
    let classes = data.num_classes();
    let total = data.len();
    // (layer, has an E/I gate) of every spiking layer: the same list on every rank, batches or not
    let spiking: Vec<(usize, bool)> = engine
        .spec()
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match l {
            LayerSpec::BackEi => Some((i, engine.spec().feedback.ei)),
            LayerSpec::Spiking => Some((i, false)),
            _ => None,
        })
        .collect();
    // sums: loss·samples, samples, correct, confusion[true][predicted], then per spiking layer
    // rate·samples and inhibitory fraction·samples
    let len = 3 + classes * classes + 2 * spiking.len();
    let local = (|| -> Result<Vec<f64>> {
        let mut sums = vec![0.0; len];
        let mut opts = loader_options(cfg, false)?;
        opts.shard = team.shard();
        let loader = Loader::with_allocator(data, opts, engine.buffer_allocator());
        for (k, batch) in loader.epoch(0).enumerate() {
            let done = ((k + 1) * cfg.batch_size).min(total);
            if batch.batch == 0 {
                progress(k + 1, done);
                continue; // this rank's share of a small last batch is empty
            }
            let s = engine.evaluate(&batch.x, batch.t_in, &batch.labels, cfg.loss)?;
            let preds = engine.last_predictions()?;
            let b = s.batch as f64;
            sums[0] += s.loss * b;
            sums[1] += b;
            sums[2] += s.correct as f64;
            for (p, l) in preds.iter().zip(&batch.labels) {
                sums[3 + *l as usize * classes + *p] += 1.0;
            }
            let rates = &mut sums[3 + classes * classes..];
            for (acc, cur) in rates.chunks_mut(2).zip(&engine.spike_stats()?) {
                acc[0] += cur.1 * b;
                acc[1] += cur.2.unwrap_or(0.0) * b;
            }
            loader.recycle(batch);
            progress(k + 1, done);
        }
        Ok(sums)
    })();
    let sums = team.sum_or_fail(local, len, "in the evaluation")?;
    if sums[1] == 0.0 {
        return Err(config_err("--test-limit", "nothing to evaluate: the data set holds 0 samples"));
    }
    let n = sums[1];
    Ok(Evaluation {
        accuracy: sums[2] / n,
        loss: sums[0] / n,
        confusion: sums[3..3 + classes * classes].chunks(classes).map(|r| r.iter().map(|&c| c as usize).collect()).collect(),
        spike_stats: spiking
            .iter()
            .zip(sums[3 + classes * classes..].chunks(2))
            .map(|(&(i, ei), acc)| (i, acc[0] / n, ei.then(|| acc[1] / n)))
            .collect(),
        samples: sums[1] as usize,
        seconds: started.elapsed().as_secs_f64(),
    })
}

pub enum RunOutcome {
    Finished {
        final_test_accuracy: f64,
        best_accuracy: f64,
        best_epoch: usize,
        /// Why the run ended before its last epoch (early stopping), if it did.
        stopped_early: Option<String>,
        /// The closing lines: final, best-by-validation and best-over-epochs accuracies, time
        /// (rank 0's; empty on the other ranks).
        summary: Vec<String>,
    },
    Interrupted {
        checkpoint: PathBuf,
    },
    /// `--resume` of a run that has already done the epochs asked for (or stopped early):
    /// nothing was run or written.
    AlreadyFinished {
        epochs_done: usize,
        batches_done: usize,
        epochs: usize,
        best_accuracy: f64,
        best_epoch: usize,
        stopped_early: bool,
    },
}

pub struct RunOptions<'a> {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub resume: Option<Checkpoint>,
    pub quiet: bool,
    /// Seconds between two progress lines when stderr is not a terminal (0: every batch).
    pub progress_every: f64,
    /// Set by the Ctrl-C handler: the loop saves a checkpoint and stops after the current step.
    pub interrupt: Arc<AtomicBool>,
    /// Extra lines for config.json (engine, device).
    pub engine_line: &'a str,
    /// The ranks of a data-parallel run (`dist::init()`), or a `dist::Solo` for one process.
    pub world: &'a dyn Collective,
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

/// True when early stopping ended the run at `p` (its patience ran out at an epoch's end).
fn stopped_early(cfg: &TrainConfig, p: &Progress) -> bool {
    cfg.early_stopping.is_some_and(|patience| p.batches_done == 0 && p.epoch > 0 && p.epoch - p.best_epoch >= patience)
}

/// One line on how the data were split: what trains, what chooses the best checkpoint, what reports.
fn describe_split(cfg: &TrainConfig, data: &RunData) -> String {
    let test = format!("{} test samples (for reporting)", data.test.len());
    match &data.val {
        Some(v) => format!(
            "data: {} training samples; {} held out for validation (--val-split {}: they choose the best checkpoint{}); {test}",
            data.train.len(),
            v.len(),
            cfg.val_split,
            if cfg.early_stopping.is_some() { " and stop early" } else { "" }
        ),
        None => format!(
            "data: {} training samples, no validation split (--val-split 0: the best checkpoint is chosen on the test set, as the paper reports); {test}",
            data.train.len()
        ),
    }
}

/// A paper-recipe run: a dataset's own defaults (200 epochs), sized for a GPU.
fn is_paper_recipe(cfg: &TrainConfig) -> bool {
    let kind = cfg.dataset_kind().unwrap_or(DatasetKind::MnistSample);
    kind != DatasetKind::MnistSample && cfg.epochs >= super::config::defaults_for(kind).epochs
}

/// Per-layer scalars for TensorBoard: `{prefix}/firing_rate/<layer>` and `…/inhibitory_fraction/<layer>`.
fn layer_scalars(spec: &crate::spec::NetworkSpec, prefix: &str, stats: &[(usize, f64, Option<f64>)]) -> Vec<(String, f64)> {
    let mut v = Vec::new();
    for &(i, rate, inh) in stats {
        let tag = super::report::layer_tag(spec, i);
        v.push((format!("{prefix}/firing_rate/{tag}"), rate));
        if let Some(f) = inh {
            v.push((format!("{prefix}/inhibitory_fraction/{tag}"), f));
        }
    }
    v
}

/// One evaluation phase of an epoch (validation or test) with its progress, counted in the clock.
#[allow(clippy::too_many_arguments)]
fn evaluate_phase(
    engine: &mut Engine,
    data: &Arc<Dataset>,
    cfg: &TrainConfig,
    team: &Team,
    label: String,
    display: Display,
    clock: &mut RunClock,
    epoch: usize,
    done_before: &mut usize,
) -> Result<Evaluation> {
    let mut bar = PhaseProgress::new(label, eval_batches(data.len(), cfg), display);
    let started = Instant::now();
    let (mut tick, mut counted) = (Instant::now(), 0usize);
    let before = *done_before;
    let ev = evaluate_sharded(engine, data.clone(), cfg, team, &mut |k, n| {
        clock.evaluated(n - counted, tick.elapsed().as_secs_f64());
        tick = Instant::now();
        counted = n;
        let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.update(k, &format!("{rate:.0} samples/s"), clock.left(Position::Eval { epoch, done: before + n }));
    })?;
    bar.finish();
    *done_before += ev.samples;
    Ok(ev)
}

/// Trains as the configuration says, printing one summary line per epoch. In a data-parallel
/// run (`opts.world` of several ranks) every rank calls this with the same configuration; each
/// trains on its shard of every batch, and rank 0 alone writes the run folder (`dist::team`).
pub fn train(opts: RunOptions, engine: &mut Engine) -> Result<RunOutcome> {
    let slots = engine.slots().to_vec();
    let slots = &slots[..];
    let cfg = &opts.config;
    cfg.validate()?;
    let mut team = Team::new(opts.world, engine)?;
    let lead = team.is_lead();
    let several = opts.world.size() > 1;
    // locked for the whole run; temporary files of killed runs removed; the checkpoint pair made
    // whole (by rank 0, the one rank that writes there)
    let folder = team.all_ok(
        if lead {
            RunFolder::open(&opts.out).and_then(|(folder, notes)| {
                for n in notes {
                    eprintln!("{n}");
                }
                if opts.resume.is_some() {
                    if let Some(line) = folder.reconcile_best()? {
                        eprintln!("{line}");
                    }
                }
                Ok(Some(folder))
            })
        } else {
            Ok(None)
        },
        "to open the run folder",
    )?;
    let finished = opts.resume.as_ref().map(|ck| &ck.progress).filter(|p| p.epoch >= cfg.epochs || stopped_early(cfg, p));
    if team.any(finished.is_some())? {
        // rank 0 decided (it alone read the checkpoint); the others report nothing
        let p = finished.cloned().unwrap_or(Progress {
            epoch: 0,
            batches_done: 0,
            iteration: 0,
            partial: [0.0; 4],
            best_accuracy: 0.0,
            best_epoch: 0,
        });
        return Ok(RunOutcome::AlreadyFinished {
            epochs_done: p.epoch,
            batches_done: p.batches_done,
            epochs: cfg.epochs,
            best_accuracy: p.best_accuracy,
            best_epoch: p.best_epoch,
            stopped_early: p.epoch < cfg.epochs,
        });
    }
    if several && lead && cfg.batch_size < opts.world.size() {
        eprintln!(
            "warning: --batch-size {} is the global batch: {} of the {} ranks get no sample in any step (give at least one sample per rank)",
            cfg.batch_size,
            opts.world.size() - cfg.batch_size,
            opts.world.size()
        );
    }
    // each rank holds its shard of a batch: the largest shard is what must fit
    let mut per_rank = cfg.clone();
    per_rank.batch_size = team.shard().range(cfg.batch_size).len().max(1);
    team.all_ok(check_memory(&per_rank, engine), "the memory check")?;
    let data = load_data_agreed(cfg, &team)?;
    if lead {
        if !opts.quiet {
            eprintln!("{}", describe_split(cfg, &data));
        }
        let engine_line =
            if several { format!("{} | data-parallel: {}", opts.engine_line, team.describe()) } else { opts.engine_line.to_string() };
        write_config(&opts.out, cfg, &engine_line)?;
    }
    let mut progress = Progress { epoch: 0, batches_done: 0, iteration: 0, partial: [0.0; 4], best_accuracy: -1.0, best_epoch: 0 };
    if let Some(ck) = opts.resume {
        engine.load_params(&ck.params)?;
        engine.set_optimizer_state(&ck.optimizer)?;
        engine.set_iteration(ck.progress.iteration);
        progress = ck.progress;
    }
    // every rank starts from rank 0's parameters, optimizer state and place in the run
    team.sync_start(engine, &mut progress)?;
    let metrics = if lead { Some(MetricsWriter::open(&opts.out, progress.epoch)?) } else { None };
    let mut board = if lead { Some(EventWriter::create(&opts.out)?) } else { None };
    // Page-locked buffers on the GPU engine: each batch's upload is a direct DMA.
    let mut train_opts = loader_options(cfg, true)?;
    train_opts.shard = team.shard();
    let loader = Loader::with_allocator(data.train.clone(), train_opts, engine.buffer_allocator());
    let batches = loader.batches_per_epoch();
    let last_path = folder.as_ref().map_or_else(|| opts.out.join("checkpoint-last.safetensors"), RunFolder::last);
    let best_path = folder.as_ref().map_or_else(|| opts.out.join("checkpoint-best.safetensors"), RunFolder::best);
    let base_lr = cfg.optimizer.lr();
    let spec = engine.spec().clone();
    let classes = data.test.num_classes();
    let n_train = data.train.len();
    let val_samples = data.val.as_ref().map_or(0, |v| v.len());
    let mut clock = RunClock::new(cfg.epochs, n_train, val_samples + data.test.len());
    let display = Display::new(opts.quiet || !lead, opts.progress_every);
    // the warning for a run far too long for the CPU engine: once, when a rate is measured
    let mut duration_checked = engine.is_gpu() || !lead;
    let save = |path: &Path, engine: &Engine, progress: &Progress| -> Result<()> {
        if !lead {
            return Ok(());
        }
        let ck =
            Checkpoint { config: cfg.clone(), progress: progress.clone(), params: engine.params()?, optimizer: engine.optimizer_state()? };
        checkpoint::save(path, &ck, slots)
    };
    // A test hook: behave as if Ctrl-C came after this many training batches of this process.
    let interrupt_after: Option<usize> = std::env::var("BACKEI_INTERRUPT_AFTER_BATCHES").ok().and_then(|v| v.parse().ok());
    let mut batches_this_process = 0usize;
    let mut final_acc = 0.0;
    let mut early = None;
    for epoch in progress.epoch..cfg.epochs {
        let lr = cfg.lr_schedule.lr_at(base_lr, epoch, cfg.epochs);
        engine.set_lr(lr);
        let label = |phase: &str| format!("epoch {}/{} {phase}", epoch + 1, cfg.epochs);
        let mut bar = PhaseProgress::new(label("train"), batches, display);
        let started = Instant::now();
        let mut tick = Instant::now();
        // TensorBoard's per-step scalars: loss·samples, correct, samples since the last ones
        let mut window = [0.0f64; 3];
        let [mut loss_sum, mut correct, mut seen, secs_before] = progress.partial;
        for (k, batch) in loader.epoch(epoch).enumerate() {
            if k < progress.batches_done {
                loader.recycle(batch);
                continue;
            }
            // this process asks to stop after this step (a signal, or the test hook's count)
            let asked = opts.interrupt.load(Ordering::SeqCst) || interrupt_after == Some(batches_this_process + 1);
            let report = match team.train_step(engine, &batch, cfg.loss, asked) {
                Ok(r) => r,
                Err(e) => {
                    if several && opts.world.shared_failure().is_some() {
                        // every rank stops here: rank 0 keeps the last finished step
                        progress.partial = [loss_sum, correct, seen, secs_before + started.elapsed().as_secs_f64()];
                        bar.finish();
                        match save(&last_path, engine, &progress) {
                            Err(save_err) => eprintln!("could not write the checkpoint of the last finished step: {save_err}"),
                            Ok(()) if lead => eprintln!("checkpoint of the last finished step written to {}", last_path.display()),
                            Ok(()) => {}
                        }
                    }
                    return Err(in_epoch(e, epoch));
                }
            };
            loader.recycle(batch);
            // one process stops when it is asked to; the ranks of a data-parallel run stop
            // together, after the step in which any of them was
            let interrupted = report.interrupt;
            // the last step of the epoch, or before a checkpoint: wait for its results too
            let last = if k + 1 == batches || interrupted { engine.finish_steps().map_err(|e| in_epoch(e, epoch))? } else { None };
            for s in report.done.iter().chain(&last) {
                loss_sum += s.loss * s.batch as f64;
                correct += s.correct as f64;
                seen += s.batch as f64;
                window[0] += s.loss * s.batch as f64;
                window[1] += s.correct as f64;
                window[2] += s.batch as f64;
            }
            // the whole batch (every rank's shard) counts in the run's rate
            let batch_samples = ((k + 1) * cfg.batch_size).min(n_train) - (k * cfg.batch_size).min(n_train);
            clock.trained(batch_samples, tick.elapsed().as_secs_f64());
            tick = Instant::now();
            progress.batches_done = k + 1;
            progress.iteration = engine.iteration();
            batches_this_process += 1;
            if interrupt_after == Some(batches_this_process) {
                opts.interrupt.store(true, Ordering::SeqCst);
            }
            if progress.iteration % cfg.log_interval as u64 == 0 && window[2] > 0.0 {
                if let Some(board) = board.as_mut() {
                    let mut scalars = vec![
                        ("step/loss/train".to_string(), window[0] / window[2]),
                        ("step/accuracy/train".to_string(), window[1] / window[2]),
                        ("step/lr".to_string(), lr),
                    ];
                    scalars.extend(layer_scalars(&spec, "step", &engine.spike_stats()?));
                    board.scalars(progress.iteration, &scalars)?;
                    board.flush()?;
                }
                window = [0.0; 3];
            }
            let secs = secs_before + started.elapsed().as_secs_f64();
            let left = clock.left(Position::Train { epoch, done: (k + 1) * cfg.batch_size });
            let msg = format!(
                "{:.0} samples/s loss {:.4} acc {:.2}%",
                seen / secs.max(1e-9),
                loss_sum / seen.max(1.0),
                correct / seen.max(1.0) * 100.0
            );
            bar.update(k + 1, &msg, left);
            // after two batches (the first one warms up): is this run too long for the CPU?
            if !duration_checked && batches_this_process >= 2 {
                duration_checked = true;
                if let Some(w) = left.and_then(|(_, run)| cpu_duration_warning(&clock, epoch, run, is_paper_recipe(cfg))) {
                    bar.println(&w);
                }
            }
            if interrupted && k + 1 < batches {
                progress.partial = [loss_sum, correct, seen, secs];
                bar.finish();
                save(&last_path, engine, &progress)?;
                if let Some(board) = board.as_mut() {
                    board.flush()?;
                }
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
        let mut stats = engine.spike_stats()?;
        if several {
            // the last batch's firing statistics, averaged over the ranks
            let flat: Vec<f64> = stats.iter().flat_map(|s| [s.1, s.2.unwrap_or(0.0)]).collect();
            let sums = team.sum_or_fail(Ok(flat), 2 * stats.len(), "in the firing statistics")?;
            let n = opts.world.size() as f64;
            for (s, sum) in stats.iter_mut().zip(sums.chunks(2)) {
                s.1 = sum[0] / n;
                s.2 = s.2.map(|_| sum[1] / n);
            }
            let params = engine.params()?;
            team.expect_same(&format!("parameters after epoch {}", epoch + 1), fingerprint(params.iter().map(|p| p.to_bits() as u64)))?;
        }
        // validation, then test: each with its progress, both counted in the epoch's time
        let eval_started = Instant::now();
        let mut eval_done = 0usize;
        let val = match &data.val {
            Some(v) => Some(evaluate_phase(engine, v, cfg, &team, label("val"), display, &mut clock, epoch, &mut eval_done)?),
            None => None,
        };
        let test = evaluate_phase(engine, &data.test, cfg, &team, label("test"), display, &mut clock, epoch, &mut eval_done)?;
        let eval_seconds = eval_started.elapsed().as_secs_f64();
        final_acc = test.accuracy;
        let row = EpochRow {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1.0),
            train_accuracy: correct / seen.max(1.0),
            val_accuracy: val.as_ref().map(|v| v.accuracy),
            test_accuracy: Some(test.accuracy),
            test_loss: Some(test.loss),
            lr,
            seconds,
            samples_per_second: seen / seconds.max(1e-9),
            firing_rates: stats.iter().map(|s| s.1).collect(),
            inhibitory_fractions: stats.iter().filter_map(|s| s.2).collect(),
            val_loss: val.as_ref().map(|v| v.loss),
            eval_seconds: Some(eval_seconds),
        };
        if let Some(m) = &metrics {
            m.append(&row)?;
        }
        if let Some(board) = board.as_mut() {
            let mut scalars = vec![
                ("epoch/loss/train".to_string(), row.train_loss),
                ("epoch/loss/test".to_string(), test.loss),
                ("epoch/accuracy/train".to_string(), row.train_accuracy),
                ("epoch/accuracy/test".to_string(), test.accuracy),
                ("epoch/lr".to_string(), lr),
                ("epoch/seconds/train".to_string(), seconds),
                ("epoch/seconds/eval".to_string(), eval_seconds),
            ];
            if let Some(v) = &val {
                scalars.extend([("epoch/loss/val".to_string(), v.loss), ("epoch/accuracy/val".to_string(), v.accuracy)]);
            }
            scalars.extend(layer_scalars(&spec, "epoch", &stats));
            board.scalars(row.epoch as u64, &scalars)?;
            board.flush()?;
        }
        // selection by validation accuracy when there is a validation split, else by test
        let score = val.as_ref().map_or(test.accuracy, |v| v.accuracy);
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
        if improved && lead {
            crate::atomic_file::copy(&last_path, &best_path)
                .map_err(|e| BackeiError::Io { path: best_path.display().to_string(), problem: format!("cannot write checkpoint: {e}") })?;
        }
        if lead {
            let run_left = if epoch + 1 < cfg.epochs {
                clock
                    .left(Position::Eval { epoch, done: clock.eval_per_epoch() })
                    .map(|(_, r)| format!(" | run left {}", human(r)))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            eprintln!(
                "epoch {}/{}: train loss {:.4} acc {:.2}% | {}test loss {:.4} acc {:.2}% | lr {:.1e} | {} train + {} eval, {:.0} samples/s{run_left}{}",
                epoch + 1,
                cfg.epochs,
                row.train_loss,
                row.train_accuracy * 100.0,
                val.as_ref().map(|v| format!("val acc {:.2}% | ", v.accuracy * 100.0)).unwrap_or_default(),
                test.loss,
                test.accuracy * 100.0,
                lr,
                human(seconds),
                human(eval_seconds),
                row.samples_per_second,
                if improved { " (best)" } else { "" }
            );
            if let Some(hint) = silence_hint(&spec, cfg.loss, classes, row.train_loss, &stats) {
                eprintln!("{hint}");
            }
        }
        // every rank holds the same (reduced) validation figures: they all stop here together
        if stopped_early(cfg, &progress) && epoch + 1 < cfg.epochs {
            early = Some(format!(
                "stopped early after epoch {}: the validation accuracy has not improved for {} epochs (--early-stopping); the best is {:.2}% at epoch {}",
                epoch + 1,
                progress.epoch - progress.best_epoch,
                progress.best_accuracy * 100.0,
                progress.best_epoch
            ));
            break;
        }
        if team.any(opts.interrupt.load(Ordering::SeqCst))? && epoch + 1 < cfg.epochs {
            return Ok(RunOutcome::Interrupted { checkpoint: last_path });
        }
    }
    let summary = if lead { summary(&MetricsWriter::read(&opts.out)?, cfg, progress.best_epoch, val_samples) } else { vec![] };
    Ok(RunOutcome::Finished {
        final_test_accuracy: final_acc,
        best_accuracy: progress.best_accuracy,
        best_epoch: progress.best_epoch,
        stopped_early: early,
        summary,
    })
}

/// Loads the data on every rank; a rank that cannot stops them all, and ranks whose data differ
/// (another copy on another node) stop with an error naming the rank.
fn load_data_agreed(cfg: &TrainConfig, team: &Team) -> Result<RunData> {
    let data = team.all_ok(load_data(cfg), "to load the data")?;
    for (what, ds) in [("training data", Some(&data.train)), ("validation data", data.val.as_ref()), ("test data", Some(&data.test))] {
        if let Some(ds) = ds {
            team.expect_same(what, fingerprint([ds.len() as u64].into_iter().chain(ds.labels().iter().map(|&l| l as u64))))?;
        }
    }
    Ok(data)
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
