//! Files that survive kills and full disks. A file is written to a temporary file beside it
//! (`<name>.tmp<pid>`), synced, and renamed over the old one, so a reader sees the old file or the
//! new one, never half of one. A write that fails removes its temporary file (a full disk stays as
//! full as it was), and [`remove_stale_temps`] removes the ones a killed process left behind.
//!
//! [`crash_point`] is a test hook: with `BACKEI_TEST_CRASH_AT=k` in the environment the process
//! kills itself (SIGKILL, no clean-up runs) at the k-th crash point it reaches, so a test can
//! stop a run at every step of a write sequence in turn instead of by chance.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The temporary file a write of `path` goes through: `<path>.tmp<pid>`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// True for the names [`temp_path`] makes (and earlier versions made: `config.tmp<pid>`): ending
/// in `.tmp` and digits.
pub fn is_temp_name(name: &str) -> bool {
    match name.rsplit_once(".tmp") {
        Some((stem, digits)) => !stem.is_empty() && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the folder. On
/// any error the temporary file is removed and the old `path` (if any) is untouched.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_with(path, |w| {
        let half = bytes.len() / 2;
        w.write_all(&bytes[..half])?;
        crash_point();
        w.write_all(&bytes[half..])
    })
}

/// [`write`] for content produced piece by piece: `fill` writes it (buffered) into the temporary
/// file.
pub fn write_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        crash_point();
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    crash_point();
    sync_parent(path);
    Ok(())
}

/// Copies `from` to `to` atomically (the same guarantees as [`write`]).
pub fn copy(from: &Path, to: &Path) -> std::io::Result<()> {
    write(to, &std::fs::read(from)?)
}

/// Makes a rename durable: syncs the folder holding `path` (best effort; not every file system
/// allows it).
fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Removes the temporary files (`*.tmp<digits>`) that killed writers left in `dir` and returns
/// their paths. Call it only where no other process writes (a locked run folder); elsewhere use
/// [`remove_temps_of_dead_processes`].
pub fn remove_stale_temps(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    remove_temps_where(dir, |_| true)
}

/// Removes the temporary files in `dir` whose writer (the pid in the name) no longer runs: for
/// folders several processes may write (a shared cache).
pub fn remove_temps_of_dead_processes(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    remove_temps_where(dir, |name| {
        let pid = name.rsplit_once(".tmp").and_then(|(_, d)| d.parse::<i32>().ok()).unwrap_or(0);
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        pid > 0 && unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    })
}

fn remove_temps_where(dir: &Path, stale: impl Fn(&str) -> bool) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        let is_file = ent.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && ent.file_name().to_str().is_some_and(|n| is_temp_name(n) && stale(n)) {
            std::fs::remove_file(ent.path())?;
            removed.push(ent.path());
        }
    }
    removed.sort();
    Ok(removed)
}

static CRASH_POINTS_PASSED: AtomicUsize = AtomicUsize::new(0);

/// The test hook (see the module's doc): SIGKILL at the k-th call when `BACKEI_TEST_CRASH_AT=k`.
pub fn crash_point() {
    let Some(k) = std::env::var("BACKEI_TEST_CRASH_AT").ok().and_then(|v| v.parse::<usize>().ok()) else {
        return;
    };
    if CRASH_POINTS_PASSED.fetch_add(1, Ordering::SeqCst) + 1 == k {
        // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, exactly like `kill -9`.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        assert!(is_temp_name("checkpoint-last.tmp1234"));
        assert!(is_temp_name("config.tmp7"));
        assert!(!is_temp_name("config.json"));
        assert!(!is_temp_name(".tmp12"));
        assert!(!is_temp_name("notes.tmp"));
        assert!(!is_temp_name("x.tmp12a"));
        assert!(is_temp_name(temp_path(Path::new("a/checkpoint-best.safetensors")).file_name().unwrap().to_str().unwrap()));
    }

    #[test]
    fn write_replaces_and_leaves_no_temp_and_stale_temps_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write(&p, b"one").unwrap();
        write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        std::fs::write(d.path().join("checkpoint-last.tmp999999"), b"x").unwrap();
        std::fs::write(d.path().join("keep.txt"), b"x").unwrap();
        let removed = remove_stale_temps(d.path()).unwrap();
        assert_eq!(removed, vec![d.path().join("checkpoint-last.tmp999999")]);
        assert!(d.path().join("keep.txt").exists());
    }

    #[test]
    fn a_failed_write_removes_its_temp_and_keeps_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write(&p, b"old").unwrap();
        // a folder in the way of the rename target makes the rename fail after the temp exists
        let blocked = d.path().join("dir.json");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"x").unwrap();
        assert!(write(&blocked, b"new").is_err());
        let names: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(!names.iter().any(|n| is_temp_name(n)), "{names:?}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }
}
