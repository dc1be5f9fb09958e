//! The kernel registry: every `cuda/*.cu` is embedded at build time, compiled by NVRTC for the
//! device's own architecture at first use, loaded once per process, and its PTX cached on disk
//! keyed by source hash, architecture, NVRTC version and options, so a second start compiles
//! nothing. A compile error carries NVRTC's log and the offending source lines.

use crate::error::{BackeiError, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// Names of every kernel module (one per `cuda/*.cu`).
pub fn module_names() -> impl Iterator<Item = &'static str> {
    KERNEL_SOURCES.iter().map(|(m, _, _)| *m)
}

/// A module's file name and full source (headers inlined), exactly as NVRTC compiles it.
pub fn module_source(module: &str) -> Result<(&'static str, &'static str)> {
    KERNEL_SOURCES.iter().find(|(m, _, _)| *m == module).map(|(_, f, s)| (*f, *s)).ok_or_else(|| {
        BackeiError::Cuda(format!("no kernel module `{module}` (modules: {})", module_names().collect::<Vec<_>>().join(", ")))
    })
}

/// Whether the NVRTC library can be loaded (never panics).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_present() {
        Ok(())
    } else {
        Err(BackeiError::Cuda(
            "the NVRTC library (libnvrtc.so) was not found: install the CUDA toolkit or the pip package \
             nvidia-cuda-nvrtc-cu12 and put its lib folder on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both are valid out-pointers.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        Ok((major, minor))
    } else {
        Err(BackeiError::Cuda(format!("nvrtcVersion: {r:?}")))
    }
}

/// The options every module is compiled with. Precise division, square root and denormals keep
/// the GPU's arithmetic close to the CPU engine's, so spikes flip only within rounding.
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "-std=c++17".into(), "-lineinfo".into()]
}

/// Compiles one module to PTX for `arch` (e.g. `sm_90`) — no GPU needed, only NVRTC.
pub fn compile_module(module: &str, arch: &str) -> Result<String> {
    require_nvrtc()?;
    let (file, source) = module_source(module)?;
    let opts = CompileOptions { options: compile_options(arch), name: Some(file.to_string()), ..Default::default() };
    match compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => {
            Err(BackeiError::Cuda(format!("NVRTC failed to compile cuda/{file} for {arch}:\n{}", explain_log(&log.to_string_lossy()))))
        }
        Err(e) => Err(BackeiError::Cuda(format!("NVRTC failed on cuda/{file}: {e:?}"))),
    }
}

/// NVRTC's log with each `file(line): error` followed by that line of the source.
pub fn explain_log(log: &str) -> String {
    let mut out = String::new();
    for line in log.lines() {
        out.push_str(line);
        out.push('\n');
        if let Some((file, n)) = parse_location(line) {
            if let Some((_, text)) = KERNEL_FILES.iter().find(|(f, _)| *f == file) {
                if let Some(src) = text.lines().nth(n.saturating_sub(1)) {
                    out.push_str(&format!("    cuda/{file}:{n} | {}\n", src.trim_end()));
                }
            }
        }
    }
    out
}

fn parse_location(line: &str) -> Option<(&str, usize)> {
    let open = line.find('(')?;
    let close = line[open..].find(')')? + open;
    let n = line[open + 1..close].parse().ok()?;
    Some((&line[..open], n))
}

/// Where compiled PTX is kept: `$BACKEI_KERNEL_CACHE`, else `$XDG_CACHE_HOME/backei/kernels`,
/// else `~/.cache/backei/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("BACKEI_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("backei/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/backei/kernels"))
}

/// The cache key of a module: source, architecture, NVRTC version and options.
pub fn cache_key(module: &str, arch: &str, nvrtc: (i32, i32)) -> Result<String> {
    let (_, source) = module_source(module)?;
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update(arch.as_bytes());
    h.update(format!("{nvrtc:?}").as_bytes());
    h.update(compile_options(arch).join(" ").as_bytes());
    let d = h.finalize();
    Ok(format!("{module}-{arch}-{}", d.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>()))
}

/// PTX for a module, from the disk cache or freshly compiled (and then cached, atomically).
pub fn cached_ptx(module: &str, arch: &str, dir: Option<&Path>) -> Result<(String, bool)> {
    let key = cache_key(module, arch, nvrtc_version()?)?;
    if let Some(dir) = dir {
        let path = dir.join(format!("{key}.ptx"));
        if let Ok(ptx) = std::fs::read_to_string(&path) {
            return Ok((ptx, true));
        }
    }
    let ptx = compile_module(module, arch)?;
    if let Some(dir) = dir {
        // A cache that cannot be written only costs a compile next time.
        let _ = crate::atomic_file::write(&dir.join(format!("{key}.ptx")), ptx.as_bytes());
    }
    Ok((ptx, false))
}

/// Loads each module once per process and hands out its functions.
pub struct KernelRegistry {
    ctx: Arc<CudaContext>,
    arch: String,
    cache: Option<PathBuf>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl KernelRegistry {
    pub fn new(ctx: Arc<CudaContext>, arch: String) -> Self {
        KernelRegistry { ctx, arch, cache: cache_dir(), modules: Mutex::default(), functions: Mutex::default() }
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn module(&self, module: &'static str) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(module) {
            return Ok(m.clone());
        }
        let (ptx, _) = cached_ptx(module, &self.arch, self.cache.as_deref())?;
        let m = self
            .ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|e| BackeiError::Cuda(format!("loading module {module} for {}: {e:?}", self.arch)))?;
        mods.insert(module, m.clone());
        Ok(m)
    }

    /// The kernel `name` of `module` (e.g. `("backei_layer", "backei_forward_f32")`).
    pub fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(&(module, name)) {
            return Ok(f.clone());
        }
        let f =
            self.module(module)?.load_function(name).map_err(|e| BackeiError::Cuda(format!("kernel {name} in module {module}: {e:?}")))?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert((module, name), f.clone());
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_is_embedded_with_line_directives() {
        assert!(module_names().any(|m| m == "smoke"));
        for (m, file, src) in KERNEL_SOURCES {
            assert!(src.starts_with(&format!("#line 1 \"{file}\"")), "{m}");
            assert!(!src.contains("#include \""), "{m}: an include was not inlined");
        }
    }

    #[test]
    fn compile_errors_quote_the_source_line() {
        let log = "common.cuh(24): error: identifier \"x\" is undefined";
        let text = explain_log(log);
        let line24 = KERNEL_FILES.iter().find(|(f, _)| *f == "common.cuh").unwrap().1.lines().nth(23).unwrap();
        assert!(text.contains(&format!("cuda/common.cuh:24 | {}", line24.trim_end())), "{text}");
    }
}
