//! The `backei` binary as a user meets it: exact resume after an interruption, Ctrl-C, and the
//! errors (and exit codes) for bad input. Runs the CPU engine on small slices of the built-in
//! sample so that each run takes seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "common/run_dir.rs"]
mod run_dir;
use run_dir::metrics_without_time;

fn backei() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backei"));
    c.env_remove("BACKEI_INTERRUPT_AFTER_BATCHES");
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("backei-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
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
    // the GPU engine cannot recompute yet: info says so instead of a figure
    let o = backei().args(["info", "--model", "fashion-mnist", "--steps", "100", "--recompute", "10"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cannot recompute yet"), "{}", text(&o));
}
