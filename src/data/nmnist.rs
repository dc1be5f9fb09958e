//! N-MNIST reader, original distribution: `Train/<digit>/*.bin`, `Test/<digit>/*.bin`.
//!
//! Each event is 40 bits: byte 0 = x, byte 1 = y, byte 2 bit 7 = polarity, bits 22..0 (the
//! low 7 bits of byte 2, then bytes 3 and 4, big-endian) = timestamp in µs.
//!
//! Timestamp overflow is handled two ways: (1) as in the original MATLAB reader
//! (`Read_Ndataset.m`), an event with y = 240 is an overflow marker, not a spike, and adds
//! 2^13 µs to all later timestamps; (2) if the 23-bit timestamp jumps backwards by more than
//! half its range (2^22 µs), it wrapped, and 2^23 µs are added from there on.
//!
//! Binning ([`Binning`], `--binning`): the events of a sample become T frames (channel 0 = OFF,
//! 1 = ON, per-pixel counts saturating at 255) by one of the conventions PyTorch users compare
//! against — tonic's `ToFrame(n_time_bins=T)` (the default) or `ToFrame(n_event_bins=T)`,
//! SpikingJelly's `integrate_events_by_fixed_frames_number(split_by='time'|'number')` — or by
//! this crate's first rule, `equal-time` (kept so that older runs resume as they were). Each
//! convention is checked against the library itself on the same event files in CI
//! (`scripts/check_binning.py`). Frames are cached on disk ([`super::nmnist_cache`]).

use super::nmnist_cache::{self, SourceFile};
use super::{read_file, DataError, Dataset, DatasetKind, Split};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

pub const SIZE: usize = 34;
pub const FRAME: usize = 2 * SIZE * SIZE;

/// How a sample's events are cut into T frames. With the events e_0 … e_{N-1} in file order (time
/// order), t_0 and t_{N-1} the first and last timestamps, and integer division:
///
/// * `tonic-time` — tonic `ToFrame(sensor_size, n_time_bins=T)`: w = (t_{N-1} − t_0) div T; frame i
///   holds the events with t_0 + i·w ≤ t < t_0 + (i+1)·w (half-open windows: the events at and after
///   t_0 + T·w, the last one included, are dropped; w = 0 gives T empty frames).
/// * `tonic-events` — tonic `ToFrame(n_event_bins=T)`: c = N div T; frame i holds e_{i·c} …
///   e_{(i+1)·c − 1} (the last N mod T events are dropped).
/// * `spikingjelly-time` — SpikingJelly `split_by='time'`: dt = (t_{N-1} − t_0) div T; frame i < T−1
///   holds t_0 + i·dt ≤ t < t_0 + (i+1)·dt, the last frame everything from t_0 + (T−1)·dt on.
///   (SpikingJelly raises IndexError where a window is empty; here that frame is empty.)
/// * `spikingjelly-number` — SpikingJelly `split_by='number'`: d = N div T; frame i < T−1 holds
///   e_{i·d} … e_{(i+1)·d − 1}, the last frame e_{(T−1)·d} … e_{N−1}.
/// * `equal-time` — this crate's first rule: the span from the earliest to the latest event, one
///   µs longer, cut into T equal float bins (no event dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Binning {
    TonicTime,
    TonicEvents,
    SpikingjellyTime,
    SpikingjellyNumber,
    EqualTime,
}

impl Binning {
    pub const ALL: [Binning; 5] =
        [Binning::TonicTime, Binning::TonicEvents, Binning::SpikingjellyTime, Binning::SpikingjellyNumber, Binning::EqualTime];

    pub fn name(self) -> &'static str {
        match self {
            Binning::TonicTime => "tonic-time",
            Binning::TonicEvents => "tonic-events",
            Binning::SpikingjellyTime => "spikingjelly-time",
            Binning::SpikingjellyNumber => "spikingjelly-number",
            Binning::EqualTime => "equal-time",
        }
    }

    /// The rule runs recorded before `--binning` existed used.
    pub fn legacy() -> Binning {
        Binning::EqualTime
    }
}

/// The default: tonic's `ToFrame(n_time_bins=T)`, what most published N-MNIST results used.
impl Default for Binning {
    fn default() -> Self {
        Binning::TonicTime
    }
}

impl std::fmt::Display for Binning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Binning {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Binning::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown binning `{s}`; expected one of {}", Binning::ALL.map(|b| b.name()).join(", ")))
    }
}

/// One event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub x: u8,
    pub y: u8,
    /// 0 = OFF, 1 = ON.
    pub p: u8,
    /// Timestamp in µs, overflow-corrected.
    pub t: u64,
}

/// Parses the events of one `.bin` file. Never panics.
pub fn parse_events(bytes: &[u8], path: &Path) -> Result<Vec<Event>, DataError> {
    if !bytes.len().is_multiple_of(5) {
        let off = bytes.len() - bytes.len() % 5;
        return Err(DataError::format(
            path,
            off as u64,
            format!("event {}", off / 5),
            "whole 5-byte (40-bit) event records",
            format!("{} trailing bytes (truncated record)", bytes.len() % 5),
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / 5);
    let mut marker_offset: u64 = 0;
    let mut wrap_offset: u64 = 0;
    let mut prev_raw: Option<u64> = None;
    for (i, r) in bytes.chunks_exact(5).enumerate() {
        let raw = (((r[2] & 0x7f) as u64) << 16) | ((r[3] as u64) << 8) | r[4] as u64;
        if r[1] == 240 {
            marker_offset += 1 << 13;
            continue;
        }
        if let Some(prev) = prev_raw {
            if raw + (1 << 22) < prev {
                wrap_offset += 1 << 23;
            }
        }
        prev_raw = Some(raw);
        for (v, name) in [(r[0], "x"), (r[1], "y")] {
            if v as usize >= SIZE {
                return Err(DataError::format(
                    path,
                    (i * 5) as u64 + (name == "y") as u64,
                    format!("{name} of event {i}"),
                    format!("a coordinate in 0..{SIZE} (34×34 sensor)"),
                    v.to_string(),
                ));
            }
        }
        out.push(Event { x: r[0], y: r[1], p: r[2] >> 7, t: raw + marker_offset + wrap_offset });
    }
    Ok(out)
}

/// Bins events (in file order) into `steps` frames of 2×34×34 saturating counts by `binning`.
/// `out` must hold `steps * 2 * 34 * 34` bytes and is overwritten.
pub fn bin_events(events: &[Event], steps: usize, binning: Binning, out: &mut [u8]) {
    out.fill(0);
    let n = events.len();
    if n == 0 || steps == 0 {
        return;
    }
    let mut put = |frame: usize, e: &Event| {
        let idx = frame * FRAME + e.p as usize * SIZE * SIZE + e.y as usize * SIZE + e.x as usize;
        out[idx] = out[idx].saturating_add(1);
    };
    let (first, last) = (events[0].t, events[n - 1].t);
    // the libraries' integer division of a span that is negative only for unsorted events
    let span = last.saturating_sub(first);
    match binning {
        Binning::TonicTime | Binning::SpikingjellyTime => {
            let w = span / steps as u64;
            for e in events {
                if e.t < first {
                    continue;
                }
                let k = if w == 0 { u64::MAX } else { (e.t - first) / w };
                if k < steps as u64 {
                    put(k as usize, e);
                } else if binning == Binning::SpikingjellyTime && (w == 0 || k >= steps as u64 - 1) {
                    put(steps - 1, e); // the last frame runs to the end
                }
            }
        }
        Binning::TonicEvents | Binning::SpikingjellyNumber => {
            let c = n / steps;
            for (i, e) in events.iter().enumerate() {
                let k = if c == 0 { usize::MAX } else { i / c };
                if k < steps {
                    put(k, e);
                } else if binning == Binning::SpikingjellyNumber {
                    put(steps - 1, e);
                }
            }
        }
        Binning::EqualTime => {
            let t0 = events.iter().map(|e| e.t).min().unwrap_or(0);
            let t1 = events.iter().map(|e| e.t).max().unwrap_or(0);
            let span = (t1 - t0 + 1) as u128;
            for e in events {
                put((((e.t - t0) as u128 * steps as u128) / span).min(steps as u128 - 1) as usize, e);
            }
        }
    }
}

/// The split's folder (`Train`/`Test`, or lowercase).
pub fn split_dir(root: &Path, split: Split) -> PathBuf {
    let name = match split {
        Split::Train => "Train",
        Split::Test => "Test",
    };
    let p = root.join(name);
    if !p.is_dir() {
        let lower = root.join(name.to_ascii_lowercase());
        if lower.is_dir() {
            return lower;
        }
    }
    p
}

/// Lists (path, label, size) of every `<digit>/*.bin` under `dir`, sorted.
pub fn list_files(dir: &Path) -> Result<Vec<(PathBuf, u8, u64)>, DataError> {
    let expected = "digit folders 0..9 holding N-MNIST .bin event files";
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, expected, e))?;
    let mut files = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| DataError::io(dir, expected, e))?;
        let name = ent.file_name();
        let Some(label) = name.to_str().and_then(|s| s.parse::<u8>().ok()).filter(|&d| d < 10) else {
            continue;
        };
        let sub = ent.path();
        if !sub.is_dir() {
            continue;
        }
        let rd2 = std::fs::read_dir(&sub).map_err(|e| DataError::io(&sub, expected, e))?;
        for f in rd2 {
            let f = f.map_err(|e| DataError::io(&sub, expected, e))?;
            let p = f.path();
            if p.extension().is_some_and(|e| e == "bin") {
                if let Some(what) = super::describe_non_file(&p) {
                    return Err(DataError::NotAFile { path: p, what, expected: "an N-MNIST .bin event file (40-bit records)".into() });
                }
                let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                files.push((p, label, size));
            }
        }
    }
    if files.is_empty() {
        return Err(DataError::EmptyDir { path: dir.to_path_buf(), expected: format!("{expected} (e.g. {}/0/00002.bin)", dir.display()) });
    }
    files.sort();
    Ok(files)
}

/// Loads a split of N-MNIST from `root` (holding `Train/` and `Test/`), binned into `steps`
/// frames by `binning`, using (and refreshing) the cache in `cache_dir` (default
/// `root/backei-cache`).
pub fn load_dir(root: &Path, split: Split, steps: usize, binning: Binning, cache_dir: Option<&Path>) -> Result<Dataset, DataError> {
    let steps = steps.max(1);
    let dir = split_dir(root, split);
    let files = list_files(&dir)?;
    let n = files.len();
    let per = steps.checked_mul(FRAME).and_then(|p| p.checked_mul(n));
    let bytes = per
        .ok_or_else(|| DataError::format(&dir, 0, "frames", "frames that fit in memory", format!("{n} samples × T = {steps} overflow")))?;
    crate::memory::ensure_host(bytes as u128, &format!("{n} N-MNIST samples of {steps} frames"), "use a smaller T (--steps)")
        .map_err(|m| DataError::format(&dir, 0, "frames", "frames that fit in memory", m))?;
    let cdir = cache_dir.map(Path::to_path_buf).unwrap_or_else(|| root.join("backei-cache"));
    let cpath = nmnist_cache::cache_path(&cdir, split, steps, binning);
    let sources = vec![dir.clone()];
    let build = |why: Option<String>| -> Result<Dataset, DataError> {
        if let Some(why) = why {
            eprintln!("rebuilding the N-MNIST frame cache {}: {why}", cpath.display());
        }
        let started = std::time::SystemTime::now();
        let per = steps * FRAME;
        let mut frames = vec![0u8; n * per];
        let mut manifest: Vec<SourceFile> = Vec::with_capacity(n);
        let results: Vec<Result<SourceFile, DataError>> = frames
            .par_chunks_mut(per)
            .zip(files.par_iter())
            .map(|(out, (p, label, _))| {
                // the stat before the read: a file changed while it is read is rebuilt next time
                let stat = nmnist_cache::stat(p);
                let bytes = read_file(p, "an N-MNIST .bin event file (40-bit records)")?;
                let ev = parse_events(&bytes, p)?;
                bin_events(&ev, steps, binning, out);
                Ok(SourceFile::new(&dir, p, *label, stat, &bytes))
            })
            .collect();
        for r in results {
            manifest.push(r?);
        }
        let labels: Vec<u8> = files.iter().map(|f| f.1).collect();
        if let Err(e) = nmnist_cache::write(&cpath, steps, binning, started, &manifest, &labels, &frames) {
            eprintln!("warning: could not write the N-MNIST frame cache {}: {e}", cpath.display());
        }
        Ok(Dataset::from_raw(DatasetKind::Nmnist, split, [2, SIZE, SIZE], steps, frames, labels, sources.clone()))
    };
    match nmnist_cache::read(&cpath, &dir, steps, binning, &files) {
        nmnist_cache::Lookup::Hit { labels, frames } => {
            Ok(Dataset::from_raw(DatasetKind::Nmnist, split, [2, SIZE, SIZE], steps, frames, labels, sources))
        }
        nmnist_cache::Lookup::Missing => build(None),
        nmnist_cache::Lookup::Stale(why) => build(Some(why)),
    }
}
