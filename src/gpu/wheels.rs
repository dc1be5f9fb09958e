//! NVIDIA's CUDA pip wheels (nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvcc-cu12, nvidia-cuda-nvdisasm,
//! …) as a source of NVRTC, ptxas, nvdisasm and cuobjdump, found without any setting: the
//! `nvidia` package of the active virtual environment (`$VIRTUAL_ENV`), of the `python3` on the
//! PATH, and of the user's site-packages. NVRTC from a wheel is loaded by its path
//! ([`preload_nvrtc`]), so `backei kernels` and the GPU engine work with `pip install
//! nvidia-cuda-nvrtc-cu12` alone, without LD_LIBRARY_PATH.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `site-packages/nvidia` folders under `lib/python3*/` of a Python prefix.
fn under_prefix(prefix: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else { return vec![] };
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages").join("nvidia"))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// Every `nvidia` package folder found, the active environment's first.
pub fn nvidia_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let mut dirs = Vec::new();
        if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
            dirs.extend(under_prefix(Path::new(&venv)));
        }
        // the namespace package may span several folders
        if let Ok(out) = Command::new("python3")
            .args(["-c", "import nvidia; print('\\n'.join(nvidia.__path__))"])
            .stderr(std::process::Stdio::null())
            .output()
        {
            dirs.extend(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).filter(|p| p.is_dir()));
        }
        if let Some(home) = std::env::var_os("HOME") {
            dirs.extend(under_prefix(&Path::new(&home).join(".local")));
        }
        let mut seen = std::collections::HashSet::new();
        dirs.retain(|d| seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone())));
        dirs
    })
}

/// The wheels' copies of a tool (`bin/<name>` under `cu13`, `cu12`, `cuda_nvcc`, …), in search order.
pub fn tool_candidates(name: &str) -> Vec<PathBuf> {
    let subs = ["cu13/bin", "cu12/bin", "cuda_nvcc/bin", "cuda_nvdisasm/bin", "cuda_cuobjdump/bin"];
    nvidia_dirs().iter().flat_map(|d| subs.iter().map(move |s| d.join(s).join(name))).collect()
}

/// The wheels' NVRTC libraries (`libnvrtc.so.<major>`), newest major first.
pub fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for d in nvidia_dirs() {
        for sub in ["cu13/lib", "cuda_nvrtc/lib", "cu12/lib"] {
            let Ok(entries) = std::fs::read_dir(d.join(sub)) else { continue };
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(major) = name.strip_prefix("libnvrtc.so.").and_then(|m| m.parse::<u32>().ok()) {
                    found.push((major, e.path()));
                }
            }
        }
    }
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Loads a wheel's NVRTC by its path and keeps it loaded, so that the dynamic loader finds it by
/// its soname when cudarc asks for `libnvrtc.so.<major>`. Returns the file loaded, or None when no
/// wheel has one that loads.
pub fn preload_nvrtc() -> Option<&'static Path> {
    static LOADED: OnceLock<Option<PathBuf>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            nvrtc_candidates().into_iter().find(|p| {
                use std::os::unix::ffi::OsStrExt;
                let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else { return false };
                // SAFETY: dlopen of a shared library by path; the handle is kept (never closed),
                // so the library stays loaded for cudarc to find by its soname.
                !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
            })
        })
        .as_deref()
}

/// What to do when NVRTC is found nowhere: the sentence errors end with.
pub const NVRTC_HELP: &str = "install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12` (found by itself in the active \
virtual environment, in python3's site-packages or in ~/.local; elsewhere put its nvidia/cuda_nvrtc/lib folder on LD_LIBRARY_PATH)";
