//! Nothing lost: kills at every point of a run's write sequence, failed writes, SIGTERM, resuming
//! a finished run, and checkpoints that were edited, come from another run or hold NaN. Runs the
//! CPU engine on a few digits of the built-in sample, so each run takes about a second.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Output};

#[path = "common/run_dir.rs"]
mod run_dir;
use run_dir::{metrics_without_time, Scratch};

fn backei() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backei"));
    c.env_remove("BACKEI_INTERRUPT_AFTER_BATCHES").env_remove("BACKEI_TEST_CRASH_AT");
    c
}

fn tmp(name: &str) -> Scratch {
    Scratch::new("runfolder", name)
}

/// A CPU run of the MNIST network on 32 training and 16 test digits, 2 batches an epoch. The
/// learning rate is so small that the test accuracy stays where it starts: epoch 1 is the best,
/// and epoch 2 does not improve on it (so `checkpoint-best` must keep epoch 1's weights).
fn tiny_run(out: &Path, epochs: usize) -> Command {
    let mut c = backei();
    c.args(["train", "--device", "cpu", "--steps", "2", "--batch-size", "16", "--train-limit", "32", "--test-limit", "16"])
        .args(["--lr", "1e-7", "--workers", "1", "--quiet", "--epochs", &epochs.to_string(), "--out"])
        .arg(out);
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run_ok(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{:?}\n{}", o.status, text(&o));
    o
}

/// The tensors of a checkpoint, sorted by name.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort();
    v
}

/// The `progress` metadata of a checkpoint.
fn progress(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&meta.metadata().as_ref().unwrap()["progress"]).unwrap()
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| backei::atomic_file::is_temp_name(n))
        .collect()
}

#[test]
fn a_kill_at_every_crash_point_loses_nothing_and_resumes_to_the_uninterrupted_result() {
    let whole = tmp("whole");
    run_ok(&mut tiny_run(&whole, 2));
    // the scenario this test is about: the best epoch is not the last one
    assert_eq!(progress(&whole.join("checkpoint-best.safetensors"))["epoch"], 1, "epoch 1 should stay the best");
    assert_eq!(progress(&whole.join("checkpoint-last.safetensors"))["epoch"], 2);
    assert_ne!(tensors(&whole.join("checkpoint-best.safetensors")), tensors(&whole.join("checkpoint-last.safetensors")));

    let mut crashed = 0;
    for k in 1.. {
        let run = tmp(&format!("crash{k}"));
        let o = tiny_run(&run, 2).env("BACKEI_TEST_CRASH_AT", k.to_string()).output().unwrap();
        if o.status.success() {
            break; // k is past the last crash point
        }
        assert_eq!(o.status.signal(), Some(libc::SIGKILL), "crash point {k}: {:?}\n{}", o.status, text(&o));
        crashed += 1;
        // what a user does next: resume, or start again when no checkpoint was written yet
        if run.join("checkpoint-last.safetensors").exists() {
            run_ok(backei().args(["train", "--quiet", "--resume"]).arg(&run));
        } else {
            run_ok(&mut tiny_run(&run, 2));
        }
        assert_eq!(metrics_without_time(&run), metrics_without_time(&whole), "crash point {k}");
        for name in ["checkpoint-last.safetensors", "checkpoint-best.safetensors"] {
            assert!(tensors(&run.join(name)) == tensors(&whole.join(name)), "crash point {k}: {name} differs from the uninterrupted run's");
            assert_eq!(progress(&run.join(name)), progress(&whole.join(name)), "crash point {k}: {name}");
        }
        assert_eq!(temp_files(&run), Vec::<String>::new(), "crash point {k}: temporary files left");
        let _ = std::fs::remove_dir_all(&run);
    }
    // config.json, the two metrics files, and two epochs' checkpoints: 3 points per file write
    assert!(crashed >= 15, "only {crashed} crash points were reached");
}

#[test]
fn a_kill_between_the_two_checkpoint_writes_is_repaired_for_eval_too() {
    // a one-epoch run: epoch 1 is the best and the last; the crash points of its end are
    // last (3 points), then best (3 points)
    let reference = tmp("one-epoch");
    run_ok(&mut tiny_run(&reference, 1));
    let mut k = 1;
    let run = loop {
        let run = tmp(&format!("between{k}"));
        let o = tiny_run(&run, 1).env("BACKEI_TEST_CRASH_AT", k.to_string()).output().unwrap();
        assert!(!o.status.success(), "no crash point found between the two writes");
        if run.join("checkpoint-last.safetensors").exists() && !run.join("checkpoint-best.safetensors").exists() {
            break run;
        }
        k += 1;
    };
    // eval of the best checkpoint restores it from checkpoint-last first
    let o = run_ok(backei().args(["eval", "--device", "cpu", "--json", "--checkpoint"]).arg(run.join("checkpoint-best.safetensors")));
    assert!(text(&o).contains("restored"), "{}", text(&o));
    assert!(tensors(&run.join("checkpoint-best.safetensors")) == tensors(&reference.join("checkpoint-best.safetensors")));
    assert!(temp_files(&run).is_empty(), "{:?}", temp_files(&run));
}

/// Limits the size of any file the child writes (a full disk, as the writer sees it: EFBIG).
fn with_file_size_limit(c: &mut Command, bytes: u64) -> &mut Command {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        })
    }
}

#[test]
fn a_failed_write_leaves_no_temporary_file_and_stale_ones_are_removed_when_the_folder_is_opened() {
    let run = tmp("fsize");
    // config and metrics fit in 1 MB, a 3.6 MB checkpoint does not
    let o = with_file_size_limit(&mut tiny_run(&run, 1), 1 << 20).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot write checkpoint"), "{}", text(&o));
    assert_eq!(temp_files(&run), Vec::<String>::new());
    assert!(!run.join("checkpoint-last.safetensors").exists());

    // temporary files of killed runs (names of this version and of earlier ones)
    let stale = ["checkpoint-last.safetensors.tmp4242", "checkpoint-best.tmp77", "config.tmp4242", "metrics.csv.tmp9"];
    for n in stale {
        std::fs::write(run.join(n), vec![0u8; 1000]).unwrap();
    }
    std::fs::write(run.join("notes.txt"), b"mine").unwrap();
    let o = run_ok(&mut tiny_run(&run, 1));
    assert_eq!(temp_files(&run), Vec::<String>::new());
    assert!(text(&o).contains("checkpoint-best.tmp77"), "the removal is reported: {}", text(&o));
    assert_eq!(std::fs::read(run.join("notes.txt")).unwrap(), b"mine");
}

#[test]
fn sigterm_writes_a_checkpoint_and_exits_143_and_the_run_resumes() {
    let out = tmp("sigterm");
    let mut child = tiny_run(&out, 1000).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("metrics.csv").exists() {
        assert!(t0.elapsed().as_secs() < 60, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) on our child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert!(out.join("checkpoint-last.safetensors").is_file());
    let done = progress(&out.join("checkpoint-last.safetensors"));
    let epochs = done["epoch"].as_u64().unwrap() + 1;
    run_ok(backei().args(["train", "--quiet", "--epochs", &epochs.to_string(), "--resume"]).arg(&out));
    assert_eq!(progress(&out.join("checkpoint-last.safetensors"))["epoch"], epochs);
}

/// Every file of a folder with its bytes and modification time.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap(), e.metadata().unwrap().modified().unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn resuming_a_finished_run_says_so_and_changes_nothing() {
    let run = tmp("finished");
    run_ok(&mut tiny_run(&run, 1));
    let before = snapshot(&run);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let o = run_ok(backei().args(["train", "--device", "cpu", "--resume"]).arg(&run));
    let t = text(&o);
    assert!(t.contains("is finished") && t.contains("--epochs 2"), "{t}");
    assert!(!t.contains("final test accuracy"), "{t}");
    assert_eq!(snapshot(&run), before, "the run folder changed");
    // asking for fewer epochs than were done: the same
    let o = run_ok(backei().args(["train", "--device", "cpu", "--epochs", "1", "--resume"]).arg(run.join("checkpoint-last.safetensors")));
    assert!(text(&o).contains("is finished"), "{}", text(&o));
    assert_eq!(snapshot(&run), before);
}

/// Rewrites one metadata field of a safetensors file without touching anything else.
fn edit_metadata(path: &Path, out: &Path, key: &str, edit: impl Fn(&str) -> String) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let old = header["__metadata__"][key].as_str().unwrap().to_string();
    let new = edit(&old);
    assert_ne!(old, new, "the edit changed nothing");
    header["__metadata__"][key] = serde_json::Value::String(new);
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(out, file).unwrap();
}

#[test]
fn edited_checkpoint_metadata_is_refused() {
    let run = tmp("edited");
    run_ok(&mut tiny_run(&run, 1));
    let ck = run.join("checkpoint-last.safetensors");
    let edits: [(&str, &str, &str); 3] = [
        ("progress", "\"epoch\":1", "\"epoch\":0"),
        ("progress", "\"batches_done\":0", "\"batches_done\":1"),
        ("config", "\"batch_size\":16", "\"batch_size\":8"),
    ];
    for (key, from, to) in edits {
        let edited = run.join("edited.safetensors");
        edit_metadata(&ck, &edited, key, |s| s.replace(from, to));
        for args in [vec!["train", "--quiet", "--epochs", "3", "--resume"], vec!["eval", "--device", "cpu", "--checkpoint"]] {
            let o = backei().args(&args).arg(&edited).output().unwrap();
            assert_eq!(o.status.code(), Some(1), "{key} {to}: {}", text(&o));
            assert!(text(&o).contains("SHA-256") && text(&o).contains("metadata"), "{}", text(&o));
        }
    }
    assert_eq!(metrics_without_time(&run).len(), 2, "the metrics were not rewritten");
}

#[test]
fn a_checkpoint_of_another_run_is_refused_unless_the_user_asks() {
    let plain = tmp("foreign-plain");
    run_ok(tiny_run(&plain, 1).args(["--no-back", "--no-ei"]));
    let run = tmp("foreign-home");
    run_ok(&mut tiny_run(&run, 1));
    let foreign = run.join("from-elsewhere.safetensors");
    std::fs::copy(plain.join("checkpoint-last.safetensors"), &foreign).unwrap();
    let config_before = std::fs::read(run.join("config.json")).unwrap();
    // eval first: once train is allowed to use it, the folder's config.json is the foreign run's
    for args in
        [vec!["eval", "--device", "cpu", "--test-limit", "16", "--checkpoint"], vec!["train", "--quiet", "--epochs", "2", "--resume"]]
    {
        let o = backei().args(&args).arg(&foreign).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains("does not belong to this run folder") && t.contains("--allow-foreign-checkpoint"), "{t}");
        let o = backei().args(&args).arg(&foreign).arg("--allow-foreign-checkpoint").output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        if args[0] == "train" {
            // the user asked: the folder now holds the foreign run's settings
            assert_ne!(std::fs::read(run.join("config.json")).unwrap(), config_before);
        }
    }
}

#[test]
fn a_checkpoint_holding_nan_is_refused_by_name_not_blamed_on_the_learning_rate() {
    let run = tmp("nan");
    run_ok(&mut tiny_run(&run, 1));
    let ck_path = run.join("checkpoint-last.safetensors");
    let (mut ck, _) = backei::train::checkpoint::load(&ck_path).unwrap();
    ck.optimizer.v[3] = f32::NAN;
    let slots = backei::Network::<f32>::new(&ck.config.network, 0).unwrap().slots;
    let saved = run.join("nan.safetensors");
    backei::train::checkpoint::save(&saved, &ck, &slots).unwrap();
    let o = backei().args(["train", "--quiet", "--epochs", "2", "--resume"]).arg(&saved).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("optimizer.v[3]") && t.contains("NaN") && t.contains("nan.safetensors"), "{t}");
    assert!(!t.contains("diverged") && !t.contains("learning rate"), "{t}");
}

#[test]
fn negative_numbers_are_values_and_the_lr_schedule_is_checked() {
    let o = backei().args(["train", "--device", "cpu", "--lr", "-1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("-1 must be a positive number"), "{}", text(&o));
    for g in ["0", "1.5", "-0.5", "nan", "inf"] {
        let o = backei().args(["train", "--device", "cpu", "--lr-gamma", g]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "--lr-gamma {g}: {}", text(&o));
        assert!(text(&o).contains("--lr-gamma") && text(&o).contains("(0, 1]"), "{}", text(&o));
    }
}

#[test]
fn the_exit_codes_are_documented_in_the_help() {
    for args in [vec!["--help"], vec!["train", "--help"]] {
        let o = run_ok(backei().args(&args));
        let t = text(&o);
        for code in ["0 ", "1 ", "2 ", "130", "143", "SIGTERM"] {
            assert!(t.contains(code), "{args:?} lacks `{code}`:\n{t}");
        }
    }
}

/// A run folder another process is writing (it holds the folder's flock) is refused, for a new
/// run and for a resume, with what to do; the folder is left as it was.
#[test]
fn a_run_folder_another_process_holds_is_refused() {
    use std::os::unix::io::AsRawFd;
    let run = tmp("locked");
    run_ok(&mut tiny_run(&run, 1));
    let before = snapshot(&run);
    let dir = std::fs::File::open(&*run).unwrap();
    // SAFETY: flock(2) on a descriptor we own; released when `dir` is dropped.
    assert_eq!(unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    for mut c in [tiny_run(&run, 2), {
        let mut c = backei();
        c.args(["train", "--device", "cpu", "--epochs", "2", "--resume"]).arg(&*run);
        c
    }] {
        let o = c.output().unwrap();
        assert!(!o.status.success(), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains("another backei process is writing this run folder") && t.contains("--out"), "{t}");
    }
    assert_eq!(snapshot(&run), before, "a refused run changed the folder");
    drop(dir);
    // the lock gone, the resume runs
    run_ok(backei().args(["train", "--device", "cpu", "--quiet", "--epochs", "2", "--resume"]).arg(&*run));
}

/// A second signal while the first one's checkpoint is on its way exits at once, with the
/// second signal's status and a line saying no checkpoint was written for it.
#[test]
fn a_second_signal_exits_at_once() {
    let out = tmp("second-signal");
    let child = tiny_run(&out, 1000).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("metrics.csv").exists() {
        assert!(t0.elapsed().as_secs() < 60, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our child, twice in a row (the second long before a step ends).
    unsafe {
        assert_eq!(libc::kill(child.id() as i32, libc::SIGTERM), 0);
        assert_eq!(libc::kill(child.id() as i32, libc::SIGINT), 0);
    }
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    // both are pending at once, and the kernel may hand them over in either order: the one seen
    // second names itself and gives the status
    let second = match o.status.code() {
        Some(130) => "Ctrl-C (SIGINT)",
        Some(143) => "SIGTERM",
        _ => panic!("{:?}: {t}", o.status),
    };
    assert!(t.contains(&format!("second signal ({second}): exiting without a checkpoint")), "{t}");
}
