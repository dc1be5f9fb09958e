//! Nothing crashes, and errors name the real cause: oversize settings, empty data sets and limits
//! of 0, something other than a file where a data file should be, an output that cannot be
//! written, and IDX files whose header and size disagree (refused before the body is read).

mod data_fixtures;
use backei::data::{DataError, Dataset, DatasetKind, LoadOptions, Split};
use data_fixtures::*;
use std::path::Path;
use std::process::{Command, Output};

fn backei() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backei"));
    c.env_remove("BACKEI_INTERRUPT_AFTER_BATCHES").env_remove("BACKEI_TEST_CRASH_AT");
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn has_all(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message lacks `{p}`:\n{msg}");
    }
}

fn load(kind: DatasetKind, dir: &Path, split: Split) -> Result<Dataset, DataError> {
    Dataset::load(
        kind,
        split,
        &LoadOptions { data_dir: Some(dir.into()), steps: 4, cache_dir: Some(dir.join("cache")), ..Default::default() },
    )
}

#[test]
fn oversize_settings_are_errors_that_say_what_fits() {
    let out = tempfile::tempdir().unwrap();
    let o = backei().args(["train", "--device", "cpu", "--quiet", "--batch-size", "1000000000", "--out"]).arg(out.path()).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    has_all(&t, &["--batch-size", "host memory", "largest batch that fits is"]);
    assert!(!t.contains("memory allocation"), "{t}");
    let fits: usize = t.split("(--batch-size ").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
    assert!((1..1_000_000_000).contains(&fits), "{t}");

    let o = backei().args(["train", "--device", "cpu", "--quiet", "--steps", "1000000", "--out"]).arg(out.path()).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    has_all(&text(&o), &["T = 1000000", "largest T that fits is"]);

    // products past 64 bits are errors, not a wrapped small figure
    for (b, t) in [("18446744073709551615", "20"), ("100", "18446744073709551615"), ("4294967296", "4294967296")] {
        let o = backei().args(["info", "--model", "mnist", "--batch-size", b, "--steps", t]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        has_all(&text(&o), &["does not fit in 64 bits"]);
        assert!(!text(&o).contains("GiB of device memory"), "{}", text(&o));
    }
}

fn train_on(dir: &Path, extra: &[&str]) -> Output {
    let out = tempfile::tempdir().unwrap();
    backei()
        .args(["train", "--dataset", "mnist", "--device", "cpu", "--quiet", "--steps", "1", "--epochs", "1", "--data-dir"])
        .arg(dir)
        .args(extra)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap()
}

#[test]
fn empty_data_and_limits_of_zero_are_clear_errors_naming_the_cause() {
    // a test file with 0 items
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 20, 0, false);
    let o = train_on(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    has_all(&text(&o), &["t10k-images-idx3-ubyte", "test split", "0 samples"]);
    assert!(!text(&o).contains("test acc"), "{}", text(&o));
    // a training file with 0 items: the file is named, not flags never given
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 0, 5, true);
    let o = train_on(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    has_all(&text(&o), &["train-images-idx3-ubyte.gz", "train split", "0 samples"]);
    assert!(!text(&o).contains("--train-limit") && !text(&o).contains("--val-split"), "{}", text(&o));
    // limits of 0
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 20, 5, true);
    for flag in ["--train-limit", "--test-limit"] {
        let o = train_on(d.path(), &[flag, "0"]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        has_all(&text(&o), &[flag, "at least 1"]);
    }
    let o = backei().args(["eval", "--test-limit", "0", "--checkpoint", "any.safetensors"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    has_all(&text(&o), &["--test-limit", "at least 1"]);
    // a validation split that leaves nothing to train on names itself and the numbers
    let o = train_on(d.path(), &["--train-limit", "1", "--val-split", "0.9"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    has_all(&text(&o), &["--val-split", "holds out 1 of --train-limit 1"]);
}

#[test]
fn something_other_than_a_file_says_what_it_is() {
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 3, 3, false);
    let p = d.path();
    let cases: Vec<(&str, Box<dyn Fn(&Path)>, &str)> = vec![
        ("train-images-idx3-ubyte", Box::new(|f: &Path| std::fs::create_dir(f).unwrap()), "is a directory"),
        (
            "train-images-idx3-ubyte",
            Box::new(|f: &Path| {
                let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: mkfifo(3) with a valid C path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            }),
            "is a FIFO",
        ),
        ("train-images-idx3-ubyte", Box::new(|f: &Path| std::os::unix::fs::symlink("/dev/null", f).unwrap()), "is a character device"),
        (
            "train-images-idx3-ubyte",
            Box::new(|f: &Path| {
                let other = f.with_file_name("loop-partner");
                std::os::unix::fs::symlink(&other, f).unwrap();
                std::os::unix::fs::symlink(f, &other).unwrap();
            }),
            "is a symbolic link loop",
        ),
        (
            "train-images-idx3-ubyte",
            Box::new(|f: &Path| std::os::unix::fs::symlink("/nonexistent/file", f).unwrap()),
            "broken symbolic link",
        ),
    ];
    for (name, make, says) in cases {
        let f = p.join(name);
        std::fs::remove_file(&f).unwrap();
        make(&f);
        let m = load(DatasetKind::Mnist, p, Split::Train).unwrap_err().to_string();
        has_all(&m, &[name, says, "expected an IDX image file"]);
        assert!(!m.contains("No such file or directory"), "{m}");
        // and the command line prints the cause once
        let o = backei().args(["data", "inspect", "mnist", "--data-dir"]).arg(p).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert_eq!(text(&o).matches(says).count(), 1, "{}", text(&o));
        let _ = std::fs::remove_dir(&f);
        let _ = std::fs::remove_file(&f);
        let _ = std::fs::remove_file(p.join("loop-partner"));
        write(&f, &idx_images(3, 28, 28, pix));
    }
    // a missing file still says so, once
    std::fs::remove_file(p.join("t10k-labels-idx1-ubyte")).unwrap();
    let o = backei().args(["data", "inspect", "mnist", "--data-dir"]).arg(p).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(text(&o).matches("No such file or directory").count(), 1, "{}", text(&o));
    // an N-MNIST event file that is a folder
    let n = tempfile::tempdir().unwrap();
    write_nmnist(n.path(), 1);
    std::fs::create_dir(n.path().join("Train/1/99999.bin")).unwrap();
    let m = load(DatasetKind::Nmnist, n.path(), Split::Train).unwrap_err().to_string();
    has_all(&m, &["99999.bin", "is a directory"]);
}

#[test]
fn an_output_that_cannot_be_written_says_write() {
    let d = tempfile::tempdir().unwrap();
    let grid = d.path().join("grid.png");
    std::fs::create_dir(&grid).unwrap();
    std::fs::write(grid.join("inside"), b"x").unwrap();
    let o = backei().args(["data", "inspect", "mnist-sample", "--grid"]).arg(&grid).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    has_all(&text(&o), &["grid.png", "cannot write the PNG grid"]);
    assert!(!text(&o).contains("cannot read"), "{}", text(&o));
}

/// Runs `cmd` and returns its output and its peak resident memory in bytes.
fn output_and_peak_memory(cmd: &mut Command) -> (Output, u64) {
    use std::io::Read;
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    let mut status = 0;
    // SAFETY: wait4(2) on our own child, with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    use std::os::unix::process::ExitStatusExt;
    (Output { status: std::process::ExitStatus::from_raw(status), stdout: out, stderr: err }, usage.ru_maxrss as u64 * 1024)
}

/// `data inspect` on `dir` fails naming `file` and the size its header calls for, without reading
/// the rest (its peak memory stays small).
fn refused_without_reading(dir: &Path, file: &str) {
    let (o, peak) = output_and_peak_memory(backei().args(["data", "inspect", "mnist", "--data-dir"]).arg(dir));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    has_all(&text(&o), &[file, "7840 bytes for dimensions [10, 28, 28]", "trailing bytes"]);
    assert!(peak < 200 << 20, "reading the refused file took {} MiB", peak >> 20);
}

#[test]
fn an_idx_file_larger_than_its_header_says_is_refused_before_it_is_read() {
    const BIG: u64 = 1 << 30;
    // raw: a valid header for 10 images, then a (sparse) gigabyte
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 10, 10, false);
    let images = d.path().join("train-images-idx3-ubyte");
    let f = std::fs::OpenOptions::new().write(true).open(&images).unwrap();
    f.set_len(BIG).unwrap();
    drop(f);
    refused_without_reading(d.path(), "train-images-idx3-ubyte");

    // gzip: the same, compressed (the decompressor stops one byte past what the header calls for)
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 10, 10, true);
    {
        // streamed, so that this process stays small (a child's peak memory counts its parent's
        // at the spawn)
        use std::io::Write;
        let file = std::fs::File::create(d.path().join("train-images-idx3-ubyte.gz")).unwrap();
        let mut e = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
        e.write_all(&idx_images(10, 28, 28, pix)).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..BIG >> 21 {
            e.write_all(&zeros).unwrap();
        }
        e.finish().unwrap();
    }
    refused_without_reading(d.path(), "train-images-idx3-ubyte.gz");

    // a header claiming more than fits is refused before a byte of the body is read
    let d = tempfile::tempdir().unwrap();
    write_mnist(d.path(), 10, 10, false);
    let mut header = idx_images(0, 28, 28, pix);
    header[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    write(&d.path().join("train-images-idx3-ubyte"), &header);
    let m = load(DatasetKind::Mnist, d.path(), Split::Train).unwrap_err().to_string();
    has_all(&m, &["train-images-idx3-ubyte", "truncated body"]);
}

/// On the GPU engine the network's state is checked against the device's free memory.
#[test]
#[ignore = "needs a CUDA GPU"]
fn on_a_gpu_an_oversize_batch_names_device_memory_and_what_fits() {
    use backei::train::config::{defaults_for, network_for, TrainConfig};
    let (engine, _) =
        backei::Engine::new(&backei::NetworkSpec::mnist(), 1, backei::gpu::DeviceChoice::Cuda(0), backei::OptimizerConfig::adam(1e-3))
            .unwrap();
    let d = defaults_for(DatasetKind::Mnist);
    let mut network = network_for(DatasetKind::Mnist);
    network.steps = 20;
    let cfg = |batch_size| TrainConfig {
        dataset: "mnist".into(),
        data_dir: None,
        device: "cuda".into(),
        epochs: 1,
        batch_size,
        optimizer: backei::OptimizerConfig::adam(d.lr),
        lr_schedule: backei::LrSchedule::paper(),
        encoding: "direct".into(),
        loss: backei::Loss::Mse,
        seed: 1,
        train_limit: None,
        test_limit: None,
        val_split: 0.0,
        early_stopping: None,
        log_interval: 50,
        deterministic: false,
        precision: Default::default(),
        recompute: None,
        workers: 2,
        network: network.clone(),
        binning: Default::default(),
    };
    let e = backei::train::run::check_memory(&cfg(1_000_000_000), &engine).unwrap_err().to_string();
    has_all(&e, &["device memory", "largest batch that fits is"]);
    let fits: usize = e.split("(--batch-size ").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
    backei::train::run::check_memory(&cfg(fits), &engine).unwrap();
}
