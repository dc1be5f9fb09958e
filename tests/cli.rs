//! The `backei` binary as a user meets it: exact resume after an interruption, Ctrl-C, and the
//! errors (and exit codes) for bad input. Runs the CPU engine on small slices of the built-in
//! sample so that each run takes seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "common/run_dir.rs"]
mod run_dir;
use run_dir::{metrics_without_time, Scratch};

fn backei() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backei"));
    c.env_remove("BACKEI_INTERRUPT_AFTER_BATCHES");
    c
}

fn tmp(name: &str) -> Scratch {
    Scratch::new("cli", name)
}

/// A short CPU run of the MNIST network on 96 training and 32 test digits.
fn small_run(out: &Path) -> Command {
    let mut c = backei();
    c.args([
        "train",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--train-limit",
        "96",
        "--test-limit",
        "32",
        "--quiet",
        "--out",
    ])
    .arg(out);
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn an_interrupted_run_resumes_to_exactly_the_uninterrupted_result() {
    let whole = tmp("whole");
    let o = small_run(&whole).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // interrupted in the middle of the first epoch (after 3 of its 6 batches)
    let cut = tmp("cut");
    let o = small_run(&cut).env("BACKEI_INTERRUPT_AFTER_BATCHES", "3").output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("resume with: backei train --resume"), "{t}");
    assert!(cut.join("checkpoint-last.safetensors").is_file());

    let o = backei().args(["train", "--resume"]).arg(&cut).arg("--quiet").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(metrics_without_time(&cut), metrics_without_time(&whole));
    assert_eq!(metrics_without_time(&whole).len(), 3, "a header and two epochs");
    // the final weights and optimizer state are bit-identical
    let a = std::fs::read(whole.join("checkpoint-last.safetensors")).unwrap();
    let b = std::fs::read(cut.join("checkpoint-last.safetensors")).unwrap();
    let tensors = |bytes: &[u8]| {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
        v.sort();
        v
    };
    assert_eq!(tensors(&a), tensors(&b));
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_exits_130() {
    let out = tmp("sigint");
    let mut child = small_run(&out).args(["--epochs", "1000"]).spawn().unwrap();
    // wait until training has begun (the config is written before the first batch)
    let t0 = std::time::Instant::now();
    while !out.join("config.json").exists() {
        assert!(t0.elapsed().as_secs() < 60, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(out.join("checkpoint-last.safetensors").is_file());
}

#[test]
fn usage_errors_exit_2_and_runtime_errors_exit_1_with_a_clear_message() {
    // unknown option
    let o = backei().args(["train", "--no-such-flag"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // impossible settings
    let o = backei().args(["train", "--device", "cpu", "--steps", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("steps"), "{}", text(&o));
    let o = backei().args(["train", "--device", "cpu", "--steps", "3", "--delay", "5"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("D = 5 > T = 3"), "{}", text(&o));
    let o = backei().args(["train", "--device", "tpu"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("expected auto, cpu, cuda or cuda:N"), "{}", text(&o));
    // --device cuda on a machine without a GPU: a runtime error, no panic
    if !backei::gpu::device::driver_present() {
        let o = backei().args(["train", "--device", "cuda", "--out"]).arg(tmp("nocuda")).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("--device cpu"), "{}", text(&o));
    }
    // an unwritable --out
    let blocker = tmp("blocker");
    std::fs::write(&blocker, b"a file, not a folder").unwrap();
    let o = backei().args(["train", "--device", "cpu", "--out"]).arg(blocker.join("run")).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--out"), "{}", text(&o));
}

#[test]
fn resume_refuses_other_settings_and_damaged_checkpoints() {
    let run = tmp("ck");
    let o = small_run(&run).args(["--epochs", "1"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // another dataset (or any other setting) with --resume
    let o = backei().args(["train", "--dataset", "fashion-mnist", "--resume"]).arg(&run).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("conflicts with --resume"), "{}", text(&o));
    let ck = run.join("checkpoint-last.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    // truncated
    let t = run.join("truncated.safetensors");
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    let o = backei().args(["eval", "--device", "cpu", "--checkpoint"]).arg(&t).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("not a valid backei checkpoint"), "{}", text(&o));
    // one bit flipped in the tensor data (the last byte is tensor data)
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    let f = run.join("flipped.safetensors");
    std::fs::write(&f, &flipped).unwrap();
    let o = backei().args(["train", "--resume"]).arg(&f).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("SHA-256"), "{}", text(&o));
    // the intact checkpoint evaluates, and --json is machine-readable
    let o = backei().args(["eval", "--device", "cpu", "--json", "--test-limit", "32", "--checkpoint"]).arg(&ck).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"], 32);
    assert_eq!(v["confusion"].as_array().unwrap().len(), 10);
}

#[test]
fn plot_draws_several_runs_into_png_and_svg() {
    let a = tmp("plot-a");
    let o = small_run(&a).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let b = tmp("plot-b");
    let o = small_run(&b).args(["--no-back", "--no-ei"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let png = tmp("plot").with_extension("png");
    let o = backei().arg("plot").arg(&a).arg(&b).arg("-o").arg(&png).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let svg = png.with_extension("svg");
    let o = backei().arg("plot").arg(&a).arg(&b).arg("-o").arg(&svg).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("mnist-sample back+ei T=2") && s.contains("mnist-sample plain T=2"), "legend from the configs");
    // the test loss is drawn (dashed: one short line per dash): without its column, the lines go
    assert!(s.contains("dashed: test"), "the loss panel's caption");
    let lines = |svg: &str| svg.matches("<polyline").count() + svg.matches("<line").count();
    let no_test_loss = tmp("plot-no-test-loss");
    std::fs::create_dir_all(&no_test_loss).unwrap();
    std::fs::copy(a.join("config.json"), no_test_loss.join("config.json")).unwrap();
    let rows: Vec<String> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(row["test_loss"].is_number(), "no test_loss in {l}");
            row["test_loss"] = serde_json::Value::Null;
            row.to_string()
        })
        .collect();
    std::fs::write(no_test_loss.join("metrics.jsonl"), rows.join("\n") + "\n").unwrap();
    let svg1 = tmp("plot-one").with_extension("svg");
    let o = backei().arg("plot").arg(&a).arg("-o").arg(&svg1).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let svg0 = tmp("plot-zero").with_extension("svg");
    let o = backei().arg("plot").arg(&no_test_loss).arg("-o").arg(&svg0).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let (with, without) = (lines(&std::fs::read_to_string(&svg1).unwrap()), lines(&std::fs::read_to_string(&svg0).unwrap()));
    assert!(with >= without + 5, "the test loss adds its dashes: {with} lines with it, {without} without");
    // a folder that is not a run
    let empty = tmp("plot-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = backei().arg("plot").arg(&empty).arg("-o").arg(&svg).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("config.json"), "{}", text(&o));
}

#[test]
fn precision_and_recompute_are_recorded_and_change_nothing_on_the_cpu() {
    let plain = tmp("plain");
    let o = small_run(&plain).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // bf16 and state kept every step only (T = 2, K = 1: everything else recomputed)
    let lean = tmp("lean");
    let o = small_run(&lean).args(["--precision", "bf16", "--recompute", "1"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("computes in f32"), "the CPU engine must say it ignores --precision: {}", text(&o));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(lean.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["config"]["precision"], "bf16");
    assert_eq!(cfg["config"]["recompute"], 1);
    // the CPU computes in f32 whatever --precision says, and recomputing gives the same bits
    assert_eq!(metrics_without_time(&lean), metrics_without_time(&plain));
    // the checkpoint records the precision, and loads in any other
    let ck = lean.join("checkpoint-last.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config = meta.metadata().as_ref().unwrap()["config"].clone();
    assert!(config.contains("\"precision\":\"bf16\""), "{config}");
    let o =
        backei().args(["eval", "--device", "cpu", "--precision", "tf32", "--test-limit", "32", "--checkpoint"]).arg(&ck).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = backei()
        .args(["train", "--resume"])
        .arg(&lean)
        .args(["--precision", "fp32", "--recompute", "2", "--epochs", "3", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(lean.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["config"]["precision"], "fp32");
    // bad values are usage errors naming the flag
    let o = backei().args(["train", "--device", "cpu", "--recompute", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--recompute"), "{}", text(&o));
    let o = backei().args(["train", "--device", "cpu", "--precision", "fp16"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("tf32"), "{}", text(&o));
}

#[test]
fn info_reports_the_memory_of_each_setting() {
    let o = backei().args(["info", "--model", "cifar10"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("cifar10 at batch 100, T = 20, direct encoding, precision fp32 (cuBLAS GEMMs)") && t.contains("spiking layers"),
        "{t}"
    );
    let o = backei()
        .args(["info", "--model", "fashion-mnist", "--encoding", "rate", "--precision", "bf16", "--deterministic"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("rate encoding, precision bf16 (tensor-core GEMMs)") && text(&o).contains("deterministic"), "{}", text(&o));
    // --recompute: the figure of the windowed state (v4 kernels), smaller than keeping every step
    let gib = |args: &[&str]| -> f64 {
        let o = backei().args(["info", "--model", "fashion-mnist", "--steps", "100"]).args(args).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        gib_of(&text(&o))
    };
    let (all, lean) = (gib(&[]), gib(&["--recompute", "10"]));
    assert!(lean < all && lean <= 8.0, "--recompute 10: {lean} GiB, every step: {all} GiB");
    let o = backei().args(["info", "--model", "fashion-mnist", "--recompute", "10"]).output().unwrap();
    assert!(text(&o).contains("v4 (--recompute 10)"), "{}", text(&o));
    // on cuBLAS it also says what the tensor-core GEMMs would need (their convolutions run per
    // window too): for cifar10 at --recompute 4, within issue 12's 4 GiB
    let o = backei().args(["info", "--model", "cifar10", "--recompute", "4"]).env_remove("BACKEI_FEEDFORWARD").output().unwrap();
    let t = text(&o);
    let line = t.lines().find(|l| l.contains("with BACKEI_FEEDFORWARD=tc")).unwrap_or_else(|| panic!("{t}"));
    let tc: f64 = line.trim_end_matches(" GiB").rsplit(' ').next().unwrap().parse().unwrap_or_else(|_| panic!("{line}"));
    assert!(tc <= 4.0 && tc < gib_of(&t), "{t}");
}

/// The figure of `backei info`'s "a training step needs X GiB of device memory" line.
fn gib_of(t: &str) -> f64 {
    let at = t.find(" GiB of device memory").unwrap_or_else(|| panic!("{t}"));
    t[..at].rsplit(' ').next().unwrap().parse().unwrap_or_else(|_| panic!("{t}"))
}

// ---- the command surface (issue 17) -----------------------------------------------------------

/// The options of a `--help` text: (flag, whether it takes a value, its help text).
fn options(help: &str) -> Vec<(String, bool, String)> {
    let mut out: Vec<(String, bool, String)> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        let t = t.strip_prefix("-h, ").or_else(|| t.strip_prefix("-V, ")).or_else(|| t.strip_prefix("-o, ")).unwrap_or(t);
        if let Some(rest) = t.strip_prefix("--") {
            let (head, text) = rest.split_once("  ").unwrap_or((rest, ""));
            let flag = head.split_whitespace().next().unwrap().to_string();
            out.push((flag, head.contains('<'), text.trim().to_string()));
        } else if let Some(last) = out.last_mut() {
            if !line.trim().is_empty() && line.starts_with("      ") {
                last.2.push(' ');
                last.2.push_str(line.trim());
            }
        }
    }
    out
}

#[test]
fn every_train_flag_has_help_and_shows_its_default() {
    let o = backei().args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout).to_string();
    let opts = options(&help);
    assert!(opts.len() > 40, "{help}");
    for (flag, takes_value, text) in &opts {
        assert!(!text.is_empty(), "--{flag} has no help text:\n{help}");
        if *takes_value {
            assert!(text.contains("[default:"), "--{flag} does not show its default: {text}");
        }
    }
    for flag in ["epochs", "batch-size", "lr", "weight-decay", "lr-schedule", "config", "early-stopping", "log-interval"] {
        assert!(opts.iter().any(|(f, _, _)| f == flag), "--{flag} missing from train --help");
    }
}

/// The README's `Exit codes:` paragraph, with its markdown undone.
fn readme_paragraph(start: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let at = readme.find(start).unwrap_or_else(|| panic!("README has no paragraph starting `{start}`"));
    let para = readme[at..].split("\n\n").next().unwrap();
    para.replace("**", "").split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_readme_states_the_exit_codes_of_the_help() {
    let readme = readme_paragraph("Exit codes:");
    for args in [vec!["--help"], vec!["train", "--help"]] {
        let o = backei().args(&args).output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout).to_string();
        let at = help.find("Exit codes:").unwrap_or_else(|| panic!("{args:?} --help has no exit codes"));
        let para = help[at..].split("\n\n").next().unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(para, readme, "{args:?}");
    }
}

#[test]
fn every_backei_command_of_the_readme_names_real_subcommands_and_flags() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut checked = 0;
    for line in readme.lines().map(str::trim).filter(|l| l.starts_with("backei ")) {
        let words: Vec<&str> = line.split('#').next().unwrap().split_whitespace().skip(1).collect();
        let sub: Vec<&str> = if words[0] == "data" { words[..2].to_vec() } else { words[..1].to_vec() };
        let o = backei().args(&sub).arg("--help").output().unwrap();
        assert!(o.status.success(), "`{line}`: `backei {}` is not a command", sub.join(" "));
        let help = String::from_utf8_lossy(&o.stdout).to_string();
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let name = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
                "`{line}`: {name} is not a flag of `backei {}`",
                sub.join(" ")
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} commands found");
    // the README says how `backei` gets on the PATH
    assert!(readme.contains("cargo install --path ."), "the README must say how to install the binary");
}

/// A run of 2 epochs piped (not a terminal) with a progress line after every batch: the
/// evaluations report their progress like the training, each line with a timestamp and the time
/// left, and the run's default folder is named by its local date and time.
#[test]
fn piped_progress_covers_the_evaluations_with_timestamps_and_time_left() {
    let cwd = tmp("progress");
    std::fs::create_dir_all(&cwd).unwrap();
    let o = backei()
        .current_dir(&cwd)
        .args(["train", "--device", "cpu", "--steps", "2", "--batch-size", "16", "--epochs", "2"])
        .args(["--train-limit", "96", "--test-limit", "32", "--progress-every", "0"])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    // 96 training samples, 10 held out: 6 training batches, 1 validation batch, 2 test batches
    assert!(t.contains("86 training samples; 10 held out for validation (--val-split 0.1"), "{t}");
    for phase in ["train 6/6", "val 1/1", "test 1/2", "test 2/2"] {
        let line =
            t.lines().find(|l| l.contains(&format!("epoch 2/2 {phase} batches"))).unwrap_or_else(|| panic!("no `{phase}` line:\n{t}"));
        let stamp = line.split(' ').next().unwrap();
        assert!(is_timestamp(stamp, ':'), "{line}");
        assert!(line.contains("epoch left") && line.contains("run left"), "{line}");
    }
    // the epoch line counts the evaluation's time, and the run's estimate
    let epoch1 = t.lines().find(|l| l.starts_with("epoch 1/2:")).unwrap();
    assert!(epoch1.contains(" train + ") && epoch1.contains(" eval") && epoch1.contains("run left"), "{epoch1}");
    assert!(t.contains("time: ") && t.contains(" evaluation)"), "{t}");
    // runs/mnist-sample-YYYY-MM-DDTHH-MM-SS
    let runs: Vec<String> = std::fs::read_dir(cwd.join("runs")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let stamp = runs[0].strip_prefix("mnist-sample-").unwrap_or_else(|| panic!("{runs:?}"));
    assert!(is_timestamp(stamp, '-'), "{stamp}");
    // T = 2 is too short for this network to fire: the loss stays where it starts, and says why
    assert!(t.contains("hint: the training loss stayed at 0.1000") && t.contains("fired no spike") && t.contains("input scale"), "{t}");
}

/// `2026-12-02T10:31:05` (or with `-` for `:`, as in folder names).
fn is_timestamp(s: &str, time_sep: char) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b.get(i).is_some_and(|c| c.is_ascii_digit()));
    s.len() == 19
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == time_sep as u8
        && digits(14..16)
        && b[16] == time_sep as u8
        && digits(17..19)
}

#[test]
fn a_failed_start_leaves_no_run_folder() {
    let cwd = tmp("failed-start");
    std::fs::create_dir_all(&cwd).unwrap();
    let missing = cwd.join("no-such-data");
    // no data: the default folder (runs/…) and an --out folder with missing parents both go
    for out in [None, Some("deep/er/run")] {
        let mut c = backei();
        c.current_dir(&cwd).args(["train", "--device", "cpu", "--dataset", "fashion-mnist", "--data-dir"]).arg(&missing);
        if let Some(o) = out {
            c.args(["--out", o]);
        }
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let left: Vec<_> = std::fs::read_dir(&cwd).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{out:?} left {left:?}");
    }
    // a folder that was there before stays
    std::fs::create_dir_all(cwd.join("mine")).unwrap();
    let o = backei()
        .current_dir(&cwd)
        .args(["train", "--device", "cpu", "--dataset", "fashion-mnist", "--out", "mine", "--data-dir"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(cwd.join("mine").is_dir());
}

#[test]
fn eval_takes_a_run_folder_and_names_layers_by_kind_and_plot_writes_into_it() {
    let run = tmp("eval-folder");
    let o = small_run(&run).args(["--epochs", "1"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // a run folder (its best checkpoint), as a positional argument or --checkpoint
    for args in
        [vec!["eval", "--device", "cpu", "--test-limit", "32"], vec!["eval", "--device", "cpu", "--test-limit", "32", "--checkpoint"]]
    {
        let o = backei().args(&args).arg(&run).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains("checkpoint-best.safetensors (epoch 1) on 32 test samples"), "{t}");
        assert!(t.contains("1 BackEI 15×24×24: firing rate") && t.contains("10 Spiking 10: firing rate"), "{t}");
    }
    let o = backei().args(["eval", "--device", "cpu", "--json", "--test-limit", "32"]).arg(&run).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["firing_rates"][0]["name"], "1 BackEI 15×24×24");
    // plot without -o: plot.png in the run folder, and says so
    let o = backei().arg("plot").arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let png = run.join("plot.png");
    assert!(text(&o).contains(&format!("wrote {}", png.display())), "{}", text(&o));
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}

/// The learning rate of each epoch, from metrics.jsonl.
fn lrs(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"].as_f64().unwrap())
        .collect()
}

#[test]
fn weight_decay_cosine_schedule_and_a_config_file_with_flags_over_it() {
    let dir = tmp("config");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("settings.json");
    std::fs::write(
        &file,
        r#"{"epochs": 3, "batch_size": 16, "train_limit": 64, "test_limit": 16, "network": {"steps": 2},
            "lr_schedule": {"kind": "cosine", "warmup_epochs": 2, "min_lr": 0.0}}"#,
    )
    .unwrap();
    let run = dir.join("run");
    let o = backei()
        .args(["train", "--device", "cpu", "--quiet", "--config"])
        .arg(&file)
        .args(["--epochs", "4", "--weight-decay", "0.05", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let c = &cfg["config"];
    assert_eq!((c["epochs"].as_u64(), c["batch_size"].as_u64(), c["network"]["steps"].as_u64()), (Some(4), Some(16), Some(2)));
    assert_eq!(c["optimizer"]["weight_decay"], 0.05);
    assert_eq!(c["optimizer"]["decoupled_weight_decay"], true, "--weight-decay is AdamW's");
    // warm-up over 2 epochs, then cosine over the other 2
    let got = lrs(&run);
    let want = [5e-4, 1e-3, 1e-3, 5e-4];
    assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12), "{got:?}");
    // the run's own config.json is a config file too: the same settings again
    let again = dir.join("again");
    let o = backei()
        .args(["train", "--quiet", "--epochs", "1", "--config"])
        .arg(run.join("config.json"))
        .arg("--out")
        .arg(&again)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let cfg2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(again.join("config.json")).unwrap()).unwrap();
    let mut c2 = cfg2["config"].clone();
    c2["epochs"] = c["epochs"].clone();
    assert_eq!(&c2, c);
    // mistakes name the file and the key, or the flag
    std::fs::write(&file, r#"{"epoch": 3}"#).unwrap();
    let o = backei().args(["train", "--config"]).arg(&file).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("settings.json") && text(&o).contains("`epoch` is not a setting"), "{}", text(&o));
    for (args, says) in [
        (vec!["--weight-decay", "-1"], "--weight-decay"),
        (vec!["--lr-schedule", "cosine", "--lr-step", "10"], "--lr-step does not apply to --lr-schedule cosine"),
        (vec!["--warmup-epochs", "3"], "--warmup-epochs does not apply to --lr-schedule step"),
        (vec!["--early-stopping", "2", "--val-split", "0"], "needs a validation split"),
        (vec!["--optimizer", "lamb"], "expected adam, adamw or sgd"),
    ] {
        let o = backei().args(["train", "--device", "cpu"]).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(says), "{args:?}: {}", text(&o));
    }
}

#[test]
fn early_stopping_ends_the_run_when_validation_stops_improving() {
    let run = tmp("early");
    // a learning rate so small that nothing changes: epoch 1 stays the best
    let o = small_run(&run).args(["--lr", "1e-9", "--epochs", "6", "--early-stopping", "2", "--steps", "4"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("stopped early after epoch 3") && t.contains("not improved for 2 epochs"), "{t}");
    assert_eq!(metrics_without_time(&run).len(), 4, "a header and 3 epochs");
    // resuming it changes nothing and says why
    let o = backei().args(["train", "--device", "cpu", "--resume"]).arg(&run).output().unwrap();
    assert!(o.status.success() && text(&o).contains("stopped early after epoch 3"), "{}", text(&o));
    assert_eq!(metrics_without_time(&run).len(), 4);
}

#[test]
fn the_event_file_holds_every_epoch_and_step_scalar() {
    let run = tmp("tensorboard");
    let o = small_run(&run).args(["--log-interval", "2"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let events: Vec<PathBuf> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let scalars = backei::train::tensorboard::read_scalars(&events[0]).unwrap();
    let at = |tag: &str| -> Vec<(i64, f32)> { scalars.iter().filter(|s| s.1 == tag).map(|s| (s.0, s.2)).collect() };
    // per epoch, step = epoch; the values equal metrics.jsonl's
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (tag, key) in [
        ("epoch/loss/train", "train_loss"),
        ("epoch/accuracy/test", "test_accuracy"),
        ("epoch/accuracy/val", "val_accuracy"),
        ("epoch/lr", "lr"),
    ] {
        let want: Vec<(i64, f32)> = rows.iter().map(|r| (r["epoch"].as_i64().unwrap(), r[key].as_f64().unwrap() as f32)).collect();
        assert_eq!(at(tag), want, "{tag}");
    }
    for tag in [
        "epoch/loss/test",
        "epoch/loss/val",
        "epoch/firing_rate/1_BackEI",
        "epoch/inhibitory_fraction/4_BackEI",
        "epoch/firing_rate/10_Spiking",
    ] {
        assert_eq!(at(tag).len(), 2, "{tag}");
    }
    // per 2 steps: 6 batches an epoch, 2 epochs
    for tag in ["step/loss/train", "step/accuracy/train", "step/lr", "step/firing_rate/8_Spiking", "step/inhibitory_fraction/1_BackEI"] {
        assert_eq!(at(tag).iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 4, 6, 8, 10, 12], "{tag}");
    }
}

#[test]
fn predict_classifies_png_files_and_idx_images_as_eval_counts_them() {
    use backei::data::{Dataset, DatasetKind, LoadOptions, Split};
    let run = tmp("predict");
    let o = small_run(&run).args(["--epochs", "1", "--steps", "4"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // the first 32 test digits: an IDX file of all, PNG files (grey, and RGB) of the first two
    let test = Dataset::load(DatasetKind::MnistSample, Split::Test, &LoadOptions::default()).unwrap();
    let n = 32;
    let mut idx = vec![0, 0, 8, 3];
    for d in [n as u32, 28, 28] {
        idx.extend_from_slice(&d.to_be_bytes());
    }
    for i in 0..n {
        idx.extend_from_slice(test.sample(i));
    }
    let idx_path = run.join("digits-idx3-ubyte");
    std::fs::write(&idx_path, &idx).unwrap();
    let png_path = |i: usize, rgb: bool| {
        let p = run.join(format!("digit{i}{}.png", if rgb { "-rgb" } else { "" }));
        let mut bytes = Vec::new();
        let mut enc = png::Encoder::new(&mut bytes, 28, 28);
        enc.set_color(if rgb { png::ColorType::Rgb } else { png::ColorType::Grayscale });
        let px: Vec<u8> = if rgb { test.sample(i).iter().flat_map(|&v| [v, v, v]).collect() } else { test.sample(i).to_vec() };
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&px).unwrap();
        w.finish().unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let (p0, p1) = (png_path(0, false), png_path(1, true));
    let o = backei()
        .args(["predict", "--device", "cpu", "--json", "--checkpoint"])
        .arg(&run)
        .arg(&p0)
        .arg(&p1)
        .arg(&idx_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let preds: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(preds.len(), 2 + n);
    for p in &preds {
        let scores: Vec<f64> = p["scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect();
        assert_eq!(scores.len(), 10);
        let best = scores.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(scores[p["class"].as_u64().unwrap() as usize], best, "{p}");
    }
    // a PNG and the same digit in the IDX file: the same prediction; RGB is read as grey
    assert_eq!(preds[0]["class"], preds[2]["class"]);
    assert_eq!(preds[0]["scores"], preds[2]["scores"]);
    assert_eq!(preds[1]["scores"], preds[3]["scores"]);
    assert_eq!(preds[2]["image"], format!("{}[0]", idx_path.display()));
    // the IDX predictions' accuracy is eval's on the same 32 digits
    let correct = (0..n).filter(|&i| preds[2 + i]["class"].as_u64().unwrap() == test.labels()[i] as u64).count();
    let o = backei().args(["eval", "--device", "cpu", "--json", "--test-limit", "32"]).arg(&run).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((v["accuracy"].as_f64().unwrap() - correct as f64 / n as f64).abs() < 1e-12, "{v} vs {correct}/{n}");
    // the plain output: one line per image, class then scores
    let o = backei().args(["predict", "--device", "cpu", "--checkpoint"]).arg(&run).arg(&p0).output().unwrap();
    let line = String::from_utf8_lossy(&o.stdout).lines().next().unwrap().to_string();
    assert!(line.starts_with(&format!("{}: {}", p0.display(), preds[0]["class"])) && line.contains("scores 0:"), "{line}");
    // an image of another size names it and the size it needs
    let small = run.join("small.png");
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, 20, 20);
    enc.set_color(png::ColorType::Grayscale);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&[0u8; 400]).unwrap();
    w.finish().unwrap();
    std::fs::write(&small, bytes).unwrap();
    let o = backei().args(["predict", "--device", "cpu", "--checkpoint"]).arg(&run).arg(&small).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("small.png") && text(&o).contains("20×20") && text(&o).contains("28×28"), "{}", text(&o));
}

#[test]
fn a_cpu_run_far_longer_than_an_hour_is_warned_with_what_fits() {
    let run = tmp("long");
    let o = backei()
        .args(["train", "--device", "cpu", "--epochs", "100000", "--quiet", "--out"])
        .arg(&run)
        .env("BACKEI_INTERRUPT_AFTER_BATCHES", "3")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    let t = text(&o);
    let w = t.lines().find(|l| l.starts_with("warning: at the rate measured so far")).unwrap_or_else(|| panic!("no warning:\n{t}"));
    assert!(w.contains("on the CPU engine") && w.contains("To finish within about an hour here: --epochs "), "{w}");
}

/// NVRTC from the pip wheel is found without LD_LIBRARY_PATH (in the active venv, or python3's
/// site-packages), and where there is none the error says what to install.
#[test]
fn nvrtc_of_a_pip_wheel_is_found_by_itself() {
    let o = backei().arg("info").env_remove("LD_LIBRARY_PATH").output().unwrap();
    let t = text(&o);
    assert!(
        t.lines().any(|l| l.starts_with("NVRTC: 1")),
        "NVRTC not found without LD_LIBRARY_PATH; `pip install nvidia-cuda-nvrtc-cu12` into the active venv (`bash .ci/run` puts it in target/python-ref):\n{t}"
    );
    // nowhere to look: the line says what to install (unless a CUDA toolkit is on the system's path)
    let empty = tmp("no-python");
    std::fs::create_dir_all(&empty).unwrap();
    let o = backei()
        .arg("info")
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("VIRTUAL_ENV")
        .env("PATH", &*empty)
        .env("HOME", &*empty)
        .output()
        .unwrap();
    let line = text(&o).lines().find(|l| l.starts_with("NVRTC:")).unwrap().to_string();
    // a CUDA toolkit the dynamic linker knows of is found; without one, the line names the wheel
    let system_nvrtc = std::fs::read("/etc/ld.so.cache").map(|b| b.windows(8).any(|w| w == b"libnvrtc")).unwrap_or(false);
    if system_nvrtc {
        assert!(line.starts_with("NVRTC: 1"), "{line}");
    } else {
        assert!(line.contains("pip install nvidia-cuda-nvrtc-cu12"), "{line}");
    }
}
