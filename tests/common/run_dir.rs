//! Reading a run folder in the command-line tests (included by `#[path]`, without the rest of
//! `common`).
#![allow(dead_code)]

use std::path::Path;

/// metrics.csv without the timing columns (seconds, samples/s), which no two runs share.
pub fn metrics_without_time(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            [&f[..7], &f[9..]].concat().join(",")
        })
        .collect()
}
