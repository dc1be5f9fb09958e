//! Reading a run folder in the command-line tests (included by `#[path]`, without the rest of
//! `common`).
#![allow(dead_code)]

use std::path::Path;

/// metrics.csv without the timing columns (seconds, samples/s, eval seconds), which no two runs share.
pub fn metrics_without_time(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap_or("").split(',').collect();
    let timing = |name: &str| ["seconds", "samples_per_second", "eval_seconds"].contains(&name);
    text.lines()
        .map(|l| l.split(',').zip(&header).filter(|(_, name)| !timing(name)).map(|(f, _)| f).collect::<Vec<_>>().join(","))
        .collect()
}

/// A path in the temporary folder for one test's run folder or file, removed with everything in
/// it when dropped: the test suite leaves nothing behind.
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    pub fn new(prefix: &str, name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("backei-{prefix}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_file(&p);
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}
