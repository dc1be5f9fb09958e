//! The kernel registry: every `cuda/*.cu` is embedded at build time, compiled by NVRTC for the
//! device's own architecture at first use — to a CUBIN for that architecture, so what runs is the
//! machine code NVRTC produced and `backei kernels --sass` disassembles, never a driver JIT of PTX —
//! loaded once per process, and cached on disk keyed by source hash, architecture, NVRTC version,
//! options and compile-time constants (`-D`, the v4 kernels' shape specialisation), so a second
//! start compiles nothing. A compile error carries NVRTC's log and the offending source lines.

use crate::error::{BackeiError, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
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
    let present = || unsafe { cudarc::nvrtc::sys::is_culib_present() };
    // on the library path, else a pip wheel's, loaded by its path
    present() || (super::wheels::preload_nvrtc().is_some() && present())
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_present() {
        Ok(())
    } else {
        Err(BackeiError::Cuda(format!("the NVRTC library (libnvrtc.so) was not found: {}", super::wheels::NVRTC_HELP)))
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

/// Compile-time constants of a module instance: `-D NAME=VALUE` each.
pub type Defines = [(String, String)];

/// What NVRTC produced for one module instance: the PTX always, the CUBIN when `arch` is a real
/// architecture (sm_XX).
pub struct Compiled {
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
}

/// Compiles one module to PTX for `arch` (e.g. `sm_90`) — no GPU needed, only NVRTC.
pub fn compile_module(module: &str, arch: &str) -> Result<String> {
    Ok(compile_module_with(module, arch, &[])?.ptx)
}

/// Compiles one module instance (its `-D` constants) for `arch`: the PTX and, for a real
/// architecture, the CUBIN.
pub fn compile_module_with(module: &str, arch: &str, defines: &Defines) -> Result<Compiled> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::CString;
    require_nvrtc()?;
    let (file, source) = module_source(module)?;
    let src = CString::new(source).map_err(|_| BackeiError::Cuda(format!("cuda/{file} contains a NUL byte")))?;
    let name = CString::new(file).map_err(|_| BackeiError::Cuda("module name contains a NUL byte".into()))?;
    let mut opts = compile_options(arch);
    opts.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    let prog = result::create_program(&src, Some(&name)).map_err(|e| BackeiError::Cuda(format!("NVRTC on cuda/{file}: {e:?}")))?;
    // SAFETY: prog is a live program from create_program; it is destroyed once, below.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let out = match compiled {
            Err(_) => {
                let log = result::get_program_log(prog).map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>()).unwrap_or_default();
                let defs = if defines.is_empty() { String::new() } else { format!(" with {}", opts[3..].join(" ")) };
                Err(BackeiError::Cuda(format!(
                    "NVRTC failed to compile cuda/{file}{defs} for {arch}:\n{}",
                    explain_log(log.trim_end_matches('\0'))
                )))
            }
            Ok(()) => {
                let ptx = result::get_ptx(prog).map_err(|e| BackeiError::Cuda(format!("NVRTC PTX of cuda/{file}: {e:?}")))?;
                let ptx: String = ptx.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
                let mut cubin = None;
                if arch.starts_with("sm_") {
                    let mut size = 0usize;
                    if sys::nvrtcGetCUBINSize(prog, &mut size).result().is_ok() && size > 0 {
                        let mut bin = vec![0u8; size];
                        if sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut _).result().is_ok() {
                            cubin = Some(bin);
                        }
                    }
                }
                Ok(Compiled { ptx, cubin })
            }
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
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

/// The cache key of a module instance: source, architecture, NVRTC version, options, constants.
pub fn cache_key(module: &str, arch: &str, nvrtc: (i32, i32), defines: &Defines) -> Result<String> {
    let (_, source) = module_source(module)?;
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update(arch.as_bytes());
    h.update(format!("{nvrtc:?}").as_bytes());
    h.update(compile_options(arch).join(" ").as_bytes());
    for (k, v) in defines {
        h.update(format!(" -D{k}={v}").as_bytes());
    }
    let d = h.finalize();
    Ok(format!("{module}-{arch}-{}", d.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>()))
}

/// PTX for a module, from the disk cache or freshly compiled (and then cached, atomically).
pub fn cached_ptx(module: &str, arch: &str, dir: Option<&Path>) -> Result<(String, bool)> {
    let key = cache_key(module, arch, nvrtc_version()?, &[])?;
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

/// The loadable image of a module instance — its CUBIN for a real architecture, else its PTX —
/// from the disk cache or freshly compiled (and then cached). Returns (image, from the cache).
pub fn cached_image(module: &str, arch: &str, defines: &Defines, dir: Option<&Path>) -> Result<(Ptx, bool)> {
    let key = cache_key(module, arch, nvrtc_version()?, defines)?;
    if let Some(dir) = dir {
        if let Ok(bin) = std::fs::read(dir.join(format!("{key}.cubin"))) {
            return Ok((Ptx::from_binary(bin), true));
        }
        if let Ok(ptx) = std::fs::read_to_string(dir.join(format!("{key}.ptx"))) {
            return Ok((Ptx::from_src(ptx), true));
        }
    }
    let c = compile_module_with(module, arch, defines)?;
    // A cache that cannot be written only costs a compile next time.
    Ok(match c.cubin {
        Some(bin) => {
            if let Some(dir) = dir {
                let _ = crate::atomic_file::write(&dir.join(format!("{key}.cubin")), &bin);
            }
            (Ptx::from_binary(bin), false)
        }
        None => {
            if let Some(dir) = dir {
                let _ = crate::atomic_file::write(&dir.join(format!("{key}.ptx")), c.ptx.as_bytes());
            }
            (Ptx::from_src(c.ptx), false)
        }
    })
}

/// Loads each module once per process and hands out its functions.
pub struct KernelRegistry {
    ctx: Arc<CudaContext>,
    arch: String,
    cache: Option<PathBuf>,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

fn instance_key(module: &str, defines: &Defines) -> String {
    let mut k = module.to_string();
    for (n, v) in defines {
        k.push_str(&format!(" -D{n}={v}"));
    }
    k
}

impl KernelRegistry {
    pub fn new(ctx: Arc<CudaContext>, arch: String) -> Self {
        KernelRegistry { ctx, arch, cache: cache_dir(), modules: Mutex::default(), functions: Mutex::default() }
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn module(&self, module: &'static str) -> Result<Arc<CudaModule>> {
        self.module_with(module, &[])
    }

    /// A module instance with compile-time constants, compiled (or read from the disk cache) and
    /// loaded once per process.
    pub fn module_with(&self, module: &str, defines: &Defines) -> Result<Arc<CudaModule>> {
        let key = instance_key(module, defines);
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(&key) {
            return Ok(m.clone());
        }
        let (image, _) = cached_image(module, &self.arch, defines, self.cache.as_deref())?;
        let m = self.ctx.load_module(image).map_err(|e| BackeiError::Cuda(format!("loading module {key} for {}: {e:?}", self.arch)))?;
        mods.insert(key, m.clone());
        Ok(m)
    }

    /// The kernel `name` of `module` (e.g. `("backei_layer", "backei_forward_v1_f32")`).
    pub fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        self.function_with(module, &[], name)
    }

    /// The kernel `name` of a module instance with compile-time constants.
    pub fn function_with(&self, module: &str, defines: &Defines, name: &str) -> Result<CudaFunction> {
        let key = format!("{} :: {name}", instance_key(module, defines));
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(f.clone());
        }
        let f = self
            .module_with(module, defines)?
            .load_function(name)
            .map_err(|e| BackeiError::Cuda(format!("kernel {name} in module {module}: {e:?}")))?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert(key, f.clone());
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
        // a part in a sub-folder, named as its #line directives name it
        let text = explain_log("v4/halo.cuh(1): error: expected a declaration");
        let line1 = KERNEL_FILES.iter().find(|(f, _)| *f == "v4/halo.cuh").expect("cuda/v4/halo.cuh embedded").1.lines().next().unwrap();
        assert!(text.contains(&format!("cuda/v4/halo.cuh:1 | {}", line1.trim_end())), "{text}");
        let v4 = KERNEL_SOURCES.iter().find(|(m, _, _)| *m == "backei_v4").unwrap().2;
        assert!(v4.contains("#line 1 \"v4/halo.cuh\""), "the part is inlined under its own name");
    }
}
