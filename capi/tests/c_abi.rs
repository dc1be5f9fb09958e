//! Builds `capi/tests/c/backei_test.c` with the system C compiler (`$CC`, else `cc`) against
//! `include/backei.h` and the static library cargo just built, and runs it: the CPU engine here,
//! the CUDA engine (ignored without a GPU; `bench/gpu/session.sh`'s `ffi` stage runs the same
//! program, built by `bench/gpu/pack_ffi.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libraries a Rust static library needs from the system (`--print native-static-libs`).
const NATIVE_LIBS: &[&str] = &["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("capi/ sits in the repository").to_path_buf()
}

/// Where cargo put libbackei_capi.a: `cargo test` leaves it beside the test binaries in
/// target/<profile>/deps/ (only `cargo build` copies it up to target/<profile>/).
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let deps = exe.parent().expect("target/<profile>/deps/<test>");
    let candidates = [deps.join("libbackei_capi.a"), deps.parent().unwrap_or(deps).join("libbackei_capi.a")];
    let found = candidates.iter().find(|p| p.exists()).cloned();
    found.unwrap_or_else(|| {
        panic!(
            "libbackei_capi.a is in neither {} nor {}: cargo builds it with this crate's tests",
            candidates[0].display(),
            candidates[1].display()
        )
    })
}

fn build_c_test() -> PathBuf {
    let lib = static_lib();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("backei_test");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let src = repo().join("capi/tests/c/backei_test.c");
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(repo().join("include"))
        .arg(&src)
        .arg(&lib)
        .args(NATIVE_LIBS)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}`: {e} (install gcc, or set CC)"));
    assert!(status.success(), "{cc} failed to build {}", src.display());
    out
}

fn run(mode: &str) {
    let exe = build_c_test();
    let out = Command::new(&exe).arg(mode).output().expect("running the C test program");
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the C test program failed in {mode} mode");
    let last = text.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed") && !last.starts_with("0 passed"), "{last}");
}

#[test]
fn c_program_runs_the_cpu_engine() {
    run("cpu");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn c_program_runs_the_cuda_engine_on_its_own_stream() {
    run("cuda");
}
