//! The TensorBoard event files a run writes, read back by the `tensorboard` pip package itself
//! (its EventAccumulator, what `tensorboard --logdir` serves): every scalar, at its step, with
//! its value. The package lives in the venv `scripts/install_reference_python.sh` makes (`.ci/run`
//! runs it); without it this test fails and says how to make it.

#[path = "common/ref_python.rs"]
mod ref_python;
use ref_python::reference_python;
use std::process::Command;

const READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
ea.Reload()
print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}))
"#;

#[test]
fn tensorboard_reads_every_scalar_of_a_run() {
    let python = reference_python();
    let run = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_backei"))
        .args(["train", "--device", "cpu", "--steps", "2", "--batch-size", "16", "--epochs", "2", "--train-limit", "96"])
        .args(["--test-limit", "32", "--log-interval", "3", "--quiet", "--out"])
        .arg(run.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(&python).arg("-c").arg(READ).arg(run.path()).output().unwrap();
    assert!(o.status.success(), "tensorboard could not read the run: {}", String::from_utf8_lossy(&o.stderr));
    // the values are f32 in the file: compared as f32 (the JSON's decimal digits are f64's)
    let seen: std::collections::BTreeMap<String, Vec<(i64, f64)>> = serde_json::from_slice(&o.stdout).unwrap();
    let seen: std::collections::BTreeMap<String, Vec<(i64, f32)>> =
        seen.into_iter().map(|(t, v)| (t, v.into_iter().map(|(s, x)| (s, x as f32)).collect())).collect();
    // what backei wrote, read by its own reader (which checks every record's CRC)
    let file = std::fs::read_dir(run.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."))
        .expect("an event file");
    let mut written: std::collections::BTreeMap<String, Vec<(i64, f32)>> = Default::default();
    for (step, tag, value) in backei::train::tensorboard::read_scalars(&file).unwrap() {
        written.entry(tag).or_default().push((step, value));
    }
    assert_eq!(seen, written, "TensorBoard reads what backei wrote");
    // and that is every scalar the issue asks for: per epoch and per 3 steps (6 batches an epoch)
    for tag in [
        "epoch/loss/train",
        "epoch/loss/val",
        "epoch/loss/test",
        "epoch/accuracy/train",
        "epoch/accuracy/val",
        "epoch/accuracy/test",
        "epoch/lr",
    ] {
        assert_eq!(seen[tag].iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2], "{tag}");
    }
    for tag in [
        "epoch/firing_rate/1_BackEI",
        "epoch/inhibitory_fraction/1_BackEI",
        "step/firing_rate/10_Spiking",
        "step/inhibitory_fraction/4_BackEI",
    ] {
        assert!(seen.contains_key(tag), "{tag} missing: {:?}", seen.keys());
    }
    assert_eq!(seen["step/loss/train"].iter().map(|s| s.0).collect::<Vec<_>>(), vec![3, 6, 9, 12]);
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(run.path().join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (row, (_, v)) in rows.iter().zip(&seen["epoch/accuracy/test"]) {
        assert_eq!(*v, row["test_accuracy"].as_f64().unwrap() as f32);
    }
}
