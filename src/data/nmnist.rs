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
//! Binning rule [`BINNING_RULE`] (`equal-time-v1`): the span from the sample's first to last
//! event timestamp is cut into T equal bins; frame t, channel p (0 = OFF, 1 = ON) counts the
//! events at each pixel (saturating at 255). Frames are cached on disk, keyed by T and the
//! rule, and rebuilt when either (or the source file list) changes.

use super::{read_file, DataError, Dataset, DatasetKind, Split};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const SIZE: usize = 34;
pub const FRAME: usize = 2 * SIZE * SIZE;
/// Identifies the binning rule in the cache key; change it when the rule changes.
pub const BINNING_RULE: &str = "equal-time-v1";
const CACHE_MAGIC: &[u8; 8] = b"BKEINMNC";
const CACHE_VERSION: u32 = 1;

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

/// Bins events into `steps` frames of 2×34×34 saturating counts (rule [`BINNING_RULE`]).
/// `out` must hold `steps * 2 * 34 * 34` bytes and is overwritten.
pub fn bin_events(events: &[Event], steps: usize, out: &mut [u8]) {
    out.fill(0);
    if events.is_empty() || steps == 0 {
        return;
    }
    let t0 = events.iter().map(|e| e.t).min().unwrap_or(0);
    let t1 = events.iter().map(|e| e.t).max().unwrap_or(0);
    let span = (t1 - t0 + 1) as u128;
    for e in events {
        let bin = (((e.t - t0) as u128 * steps as u128) / span).min(steps as u128 - 1) as usize;
        let idx = bin * FRAME + e.p as usize * SIZE * SIZE + e.y as usize * SIZE + e.x as usize;
        out[idx] = out[idx].saturating_add(1);
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

fn fingerprint(files: &[(PathBuf, u8, u64)], dir: &Path) -> u64 {
    // FNV-1a over relative names and sizes.
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    for (p, l, s) in files {
        let rel = p.strip_prefix(dir).unwrap_or(p);
        eat(rel.to_string_lossy().as_bytes());
        eat(&[*l]);
        eat(&s.to_le_bytes());
    }
    h
}

/// Path of the cache file for a split, T and the current rule.
pub fn cache_path(cache_dir: &Path, split: Split, steps: usize) -> PathBuf {
    cache_dir.join(format!("nmnist-{split}-T{steps}-{BINNING_RULE}.bin"))
}

fn cache_header(steps: usize, n: usize, fp: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(CACHE_MAGIC);
    h.extend_from_slice(&CACHE_VERSION.to_le_bytes());
    h.extend_from_slice(&(steps as u64).to_le_bytes());
    h.extend_from_slice(&(BINNING_RULE.len() as u64).to_le_bytes());
    h.extend_from_slice(BINNING_RULE.as_bytes());
    h.extend_from_slice(&(n as u64).to_le_bytes());
    h.extend_from_slice(&fp.to_le_bytes());
    h
}

fn read_cache(path: &Path, header: &[u8], n: usize, steps: usize) -> Option<(Vec<u8>, Vec<u8>)> {
    let bytes = std::fs::read(path).ok()?;
    let want = header.len() + n + n * steps * FRAME;
    if bytes.len() != want || &bytes[..header.len()] != header {
        return None;
    }
    let labels = bytes[header.len()..header.len() + n].to_vec();
    if labels.iter().any(|&l| l >= 10) {
        return None;
    }
    Some((labels, bytes[header.len() + n..].to_vec()))
}

fn write_cache(path: &Path, header: &[u8], labels: &[u8], frames: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(header)?;
        f.write_all(labels)?;
        f.write_all(frames)?;
        f.flush()?;
    }
    std::fs::rename(&tmp, path)
}

/// Loads a split of N-MNIST from `root` (holding `Train/` and `Test/`), binned into `steps`
/// frames, using (and refreshing) the cache in `cache_dir` (default `root/backei-cache`).
pub fn load_dir(root: &Path, split: Split, steps: usize, cache_dir: Option<&Path>) -> Result<Dataset, DataError> {
    let steps = steps.max(1);
    let dir = split_dir(root, split);
    let files = list_files(&dir)?;
    let n = files.len();
    let fp = fingerprint(&files, &dir);
    let header = cache_header(steps, n, fp);
    let cdir = cache_dir.map(Path::to_path_buf).unwrap_or_else(|| root.join("backei-cache"));
    let cpath = cache_path(&cdir, split, steps);
    let sources: Vec<PathBuf> = vec![dir.clone()];
    if let Some((labels, frames)) = read_cache(&cpath, &header, n, steps) {
        return Ok(Dataset::from_raw(DatasetKind::Nmnist, split, [2, SIZE, SIZE], steps, frames, labels, sources));
    }
    let per = steps * FRAME;
    let mut frames = vec![0u8; n * per];
    frames.par_chunks_mut(per).zip(files.par_iter()).try_for_each(|(out, (p, _, _))| -> Result<(), DataError> {
        let bytes = read_file(p, "an N-MNIST .bin event file (40-bit records)")?;
        let ev = parse_events(&bytes, p)?;
        bin_events(&ev, steps, out);
        Ok(())
    })?;
    let labels: Vec<u8> = files.iter().map(|f| f.1).collect();
    if let Err(e) = write_cache(&cpath, &header, &labels, &frames) {
        eprintln!("warning: could not write N-MNIST frame cache {}: {e}", cpath.display());
    }
    Ok(Dataset::from_raw(DatasetKind::Nmnist, split, [2, SIZE, SIZE], steps, frames, labels, sources))
}
