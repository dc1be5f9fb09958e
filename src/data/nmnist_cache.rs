//! The N-MNIST frame cache: binned frames of a split on disk, so that 70,000 event files are read
//! once per T and binning, not on every run.
//!
//! A cache file is keyed by its sources and checked before it is used:
//! * its name and header hold T and the binning;
//! * its manifest lists every source file with its size, modification time (ns) and the SHA-256
//!   of the bytes that were read; the cache is used only if the folder lists the same files with
//!   the same sizes and times. A file whose time lies within [`RACY`] of the cache's build is
//!   hashed again (a change inside the file system's clock tick keeps the time), so a rewritten
//!   file is never hidden by an old cache;
//! * a SHA-256 over the whole file (header, manifest, labels, frames) is checked on every load:
//!   damaged or edited bytes rebuild the cache, they are never used.
//!
//! Layout: `BKEINMNC`, version (u32 LE), manifest length (u64 LE), manifest (JSON), n labels,
//! n·T·2·34·34 frame bytes, 32-byte checksum. Written atomically; temporary files of killed
//! writers are removed.

use super::nmnist::{Binning, FRAME};
use super::Split;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 8] = b"BKEINMNC";
const VERSION: u32 = 2;
/// Files modified this close to (or after) the build are re-hashed on load.
const RACY: u64 = 2_000_000_000;

/// Path of the cache file for a split, T and binning.
pub fn cache_path(cache_dir: &Path, split: Split, steps: usize, binning: Binning) -> PathBuf {
    cache_dir.join(format!("nmnist-{split}-T{steps}-{binning}-v{VERSION}.bin"))
}

/// One source file as the cache recorded it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceFile {
    /// Relative to the split's folder.
    pub name: String,
    pub label: u8,
    pub size: u64,
    pub mtime_ns: u64,
    pub sha256: String,
}

/// (size, modification time in ns) of a file; zeros if it cannot be read (then it never matches
/// a recorded one and the cache is rebuilt).
pub fn stat(p: &Path) -> (u64, u64) {
    match std::fs::metadata(p) {
        Ok(m) => (m.len(), m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64)),
        Err(_) => (0, 0),
    }
}

fn rel(dir: &Path, p: &Path) -> String {
    p.strip_prefix(dir).unwrap_or(p).to_string_lossy().into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl SourceFile {
    pub fn new(dir: &Path, p: &Path, label: u8, (size, mtime_ns): (u64, u64), bytes: &[u8]) -> SourceFile {
        SourceFile { name: rel(dir, p), label, size, mtime_ns, sha256: sha256_hex(bytes) }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    steps: usize,
    binning: Binning,
    built_at_ns: u64,
    sources: Vec<SourceFile>,
}

/// SHA-256 of the parts, each hashed in 1 MiB chunks on all cores (a cache of the training split
/// at T = 20 is 2.8 GB).
fn checksum(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in parts {
        let chunks: Vec<[u8; 32]> = part.par_chunks(1 << 20).map(|c| Sha256::digest(c).into()).collect();
        h.update((part.len() as u64).to_le_bytes());
        for c in chunks {
            h.update(c);
        }
    }
    h.finalize().into()
}

fn header(manifest: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + manifest.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    h.extend_from_slice(manifest);
    h
}

/// Writes a cache file atomically (after removing temporary files of dead writers).
pub fn write(
    path: &Path,
    steps: usize,
    binning: Binning,
    built_at: SystemTime,
    sources: &[SourceFile],
    labels: &[u8],
    frames: &[u8],
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        crate::atomic_file::remove_temps_of_dead_processes(dir)?;
    }
    let built_at_ns = built_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let manifest =
        serde_json::to_vec(&Manifest { steps, binning, built_at_ns, sources: sources.to_vec() }).map_err(std::io::Error::other)?;
    let head = header(&manifest);
    let sum = checksum(&[&head, labels, frames]);
    crate::atomic_file::write_with(path, |w| {
        w.write_all(&head)?;
        w.write_all(labels)?;
        w.write_all(frames)?;
        w.write_all(&sum)
    })
}

/// What a lookup found.
pub enum Lookup {
    Hit {
        labels: Vec<u8>,
        frames: Vec<u8>,
    },
    /// No cache file yet.
    Missing,
    /// A cache file that cannot be used, and why (rebuilt, and the reason printed).
    Stale(String),
}

/// Reads the cache for `files` (path, label, size) of the split folder `dir`, if it is valid.
pub fn read(path: &Path, dir: &Path, steps: usize, binning: Binning, files: &[(PathBuf, u8, u64)]) -> Lookup {
    match read_checked(path, dir, steps, binning, files) {
        Ok(Some((labels, frames))) => Lookup::Hit { labels, frames },
        Ok(None) => Lookup::Missing,
        Err(why) => Lookup::Stale(why),
    }
}

fn read_checked(
    path: &Path,
    dir: &Path,
    steps: usize,
    binning: Binning,
    files: &[(PathBuf, u8, u64)],
) -> Result<Option<(Vec<u8>, Vec<u8>)>, String> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it ({e})")),
    };
    let io = |e: std::io::Error| format!("cannot read it ({e})");
    let file_len = f.metadata().map_err(io)?.len();
    let mut fixed = [0u8; 20];
    f.read_exact(&mut fixed).map_err(|_| "it is shorter than its header".to_string())?;
    if &fixed[..8] != MAGIC || fixed[8..12] != VERSION.to_le_bytes() {
        return Err("it was written by another version".into());
    }
    let manifest_len = u64::from_le_bytes(fixed[12..20].try_into().expect("8 bytes"));
    if manifest_len > file_len {
        return Err("its manifest is longer than the file".into());
    }
    let mut manifest_bytes = vec![0u8; manifest_len as usize];
    f.read_exact(&mut manifest_bytes).map_err(io)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|e| format!("its manifest does not parse ({e})"))?;
    if manifest.steps != steps || manifest.binning != binning {
        return Err(format!("it holds T = {} by {}, not T = {steps} by {binning}", manifest.steps, manifest.binning));
    }
    let n = manifest.sources.len();
    let frames_len = (n as u64).checked_mul(steps as u64 * FRAME as u64).ok_or("its size overflows")?;
    let want = 20 + manifest_len + n as u64 + frames_len + 32;
    if file_len != want {
        return Err(format!("it is {file_len} bytes, its header calls for {want}"));
    }
    // the same files, with the same sizes and times
    if n != files.len() {
        return Err(format!("the folder holds {} event files, the cache was built from {n}", files.len()));
    }
    for (rec, (p, label, size)) in manifest.sources.iter().zip(files) {
        let (_, mtime_ns) = stat(p);
        if rec.name != rel(dir, p) || rec.label != *label || rec.size != *size || rec.mtime_ns != mtime_ns {
            return Err(format!("{} changed since the cache was built (or files were added or removed)", p.display()));
        }
    }
    let mut labels = vec![0u8; n];
    f.read_exact(&mut labels).map_err(io)?;
    let mut frames = vec![0u8; frames_len as usize];
    f.read_exact(&mut frames).map_err(io)?;
    let mut sum = [0u8; 32];
    f.read_exact(&mut sum).map_err(io)?;
    if checksum(&[&header(&manifest_bytes), &labels, &frames]) != sum {
        return Err("its checksum does not match (the file was damaged or edited)".into());
    }
    if labels.iter().any(|&l| l >= 10) {
        return Err("it holds a label ≥ 10".into());
    }
    // files written within the clock tick of the build may have changed without a new time
    let racy = manifest.built_at_ns.saturating_sub(RACY);
    let changed = manifest
        .sources
        .par_iter()
        .zip(files)
        .find_any(|(rec, (p, _, _))| rec.mtime_ns >= racy && std::fs::read(p).map_or(true, |bytes| sha256_hex(&bytes) != rec.sha256));
    if let Some((_, (p, _, _))) = changed {
        return Err(format!("{} changed since the cache was built (its content differs)", p.display()));
    }
    Ok(Some((labels, frames)))
}
