//! The venv of reference Python packages (tonic, SpikingJelly, tensorboard) that
//! `scripts/install_reference_python.sh` makes at target/python-ref (`bash .ci/run` runs it);
//! included by `#[path]`. Without it a test fails and says how to make it.

use std::path::{Path, PathBuf};

pub fn reference_python() -> PathBuf {
    let p = std::env::var_os("BACKEI_REF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/python-ref/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run `bash scripts/install_reference_python.sh` (tonic, SpikingJelly and tensorboard in a venv; `bash .ci/run` does it) or set BACKEI_REF_PYTHON",
        p.display()
    );
    p
}
