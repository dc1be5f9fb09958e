//! Runs the crate's CUDA kernels on the CPU (no GPU, no CUDA): the module's source, exactly as
//! NVRTC gets it (`backei::gpu::kernels::module_source`), is rewritten into C++ against
//! `tests/emu/cuda_emu.h`, compiled by the system C++ compiler into a shared library (cached in
//! the target folder, keyed by the source's hash) and launched through `emu_launch`, whose
//! arguments are those of `cuLaunchKernel`: one pointer per kernel parameter. See the header for
//! what the emulation models (barriers, shuffles, atomics, grid barriers, NaN-poisoned shared
//! memory, shuffled thread order) and what it does not (speed, FMA contraction).
//!
//! The rewriting is textual and small: `extern __shared__ T x[];` becomes a pointer to the
//! block's dynamic shared memory, `__shared__ T x[n];` a reference to a per-block array, and a
//! dispatch table over every `extern "C" __global__` kernel is appended.

use backei::gpu::backei_layer::KernelLaunch;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

const HEADER: &str = include_str!("../emu/cuda_emu.h");

type LaunchFn =
    unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, u32, u32, u32, i32, u64, *mut *mut c_void, *mut c_char, usize) -> i32;

pub struct EmuModule {
    _lib: libloading::Library,
    launch: LaunchFn,
    pub kernels: Vec<String>,
}

/// The kernel arguments of one launch, kept alive (and at fixed addresses) until it returns.
#[derive(Default)]
pub struct Args {
    values: Vec<Box<dyn std::any::Any>>,
    ptrs: Vec<*mut c_void>,
}

impl Args {
    pub fn new() -> Self {
        Self::default()
    }
    /// A by-value parameter (an integer, a float, a `#[repr(C)]` struct, or a raw pointer).
    pub fn val<T: Copy + 'static>(&mut self, v: T) -> &mut Self {
        let mut b: Box<T> = Box::new(v);
        self.ptrs.push(&mut *b as *mut T as *mut c_void);
        self.values.push(b);
        self
    }
    /// A device pointer: here, the host buffer itself.
    pub fn buf_mut(&mut self, v: &mut [f32]) -> &mut Self {
        self.val(v.as_mut_ptr())
    }
    pub fn buf_u32(&mut self, v: &mut [u32]) -> &mut Self {
        self.val(v.as_mut_ptr())
    }
}

/// The C++ translation of a module's CUDA source, with the dispatch table appended; `defines`
/// are the module's compile-time constants (NVRTC's -D options).
fn translate(cuda: &str, defines: &[(String, String)]) -> (String, Vec<String>) {
    let mut out = String::with_capacity(cuda.len() + HEADER.len() + 4096);
    out.push_str("#line 1 \"cuda_emu.h\"\n");
    out.push_str(HEADER);
    out.push('\n');
    for (k, v) in defines {
        out.push_str(&format!("#define {k} {v}\n"));
    }
    let mut kernels = Vec::new();
    let mut static_id = 0;
    for line in cuda.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("extern __shared__ ") {
            // extern __shared__ T name[];
            let decl = rest.trim_end().trim_end_matches(';').trim_end().trim_end_matches("[]");
            let (ty, name) = decl.rsplit_once(char::is_whitespace).expect("extern __shared__ declaration");
            out.push_str(&format!("{ty}* {name} = reinterpret_cast<{ty}*>(emu::dyn_smem());\n"));
            continue;
        }
        if let Some(rest) = t.strip_prefix("__shared__ ") {
            // __shared__ [__align__(n)] T name[n]...; (static shared arrays are 16-byte aligned here)
            let rest = match rest.strip_prefix("__align__(") {
                Some(r) => r.split_once(')').map_or(r, |(_, tail)| tail).trim_start(),
                None => rest,
            };
            let decl = rest.trim_end().trim_end_matches(';');
            let open = decl.find('[').expect("__shared__ arrays only");
            let (head, dims) = decl.split_at(open);
            let (ty, name) = head.trim().rsplit_once(char::is_whitespace).expect("__shared__ declaration");
            out.push_str(&format!("auto& {name} = emu::shared_static<{ty}{dims}, {static_id}>();\n"));
            static_id += 1;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    // kernel names: extern "C" __global__ void [__launch_bounds__(...)] NAME(
    let mut rest = cuda;
    while let Some(at) = rest.find("extern \"C\"") {
        rest = &rest[at + 10..];
        let s = rest.trim_start();
        let Some(s) = s.strip_prefix("__global__") else { continue };
        let s = s.trim_start().strip_prefix("void").expect("kernels return void").trim_start();
        let s = if let Some(b) = s.strip_prefix("__launch_bounds__") {
            let close = b.find(')').expect("__launch_bounds__(...)");
            b[close + 1..].trim_start()
        } else {
            s
        };
        let name: String = s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        kernels.push(name);
    }
    // EMU_MMA_TRUNCATE (a define): this module's mma.sync follows the truncating model (cuda_emu.h)
    out.push_str("\n#line 1 \"emu_model\"\n#ifdef EMU_MMA_TRUNCATE\nstatic const bool emu_truncate_set = (emu::mma_truncate_model = true);\n#endif\n");
    // EMU_BLOCK_STALLS (a define): this module's cooperative launches run their blocks at different paces
    out.push_str("#ifdef EMU_BLOCK_STALLS\nstatic const bool emu_stalls_set = (emu::block_stalls_model = true);\n#endif\n");
    out.push_str("\n#line 1 \"emu_dispatch\"\nstatic bool emu_dispatch(const char* name, void** args) {\n");
    for k in &kernels {
        out.push_str(&format!("    if (!strcmp(name, EMU_XSTR({k}))) {{ emu::bind_kernel({k}, args); return true; }}\n"));
    }
    out.push_str(
        "    return false;\n}\n\
         extern \"C\" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,\n\
         unsigned bz, unsigned smem, int coop, unsigned long long seed, void** args, char* err, size_t errlen) {\n\
         return emu::launch(emu_dispatch, name, gx, gy, gz, bx, by, bz, smem, coop, seed, args, err, errlen);\n}\n",
    );
    (out, kernels)
}

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

fn build(module: &str, defines: &[(String, String)]) -> Result<EmuModule, String> {
    let (_, cuda) = backei::gpu::kernels::module_source(module).map_err(|e| e.to_string())?;
    let (cpp, kernels) = translate(cuda, defines);
    let flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-w"];
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cpp.hash(&mut h);
    flags.hash(&mut h);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = format!("{module}-{:016x}", h.finish());
    let lib = dir.join(format!("{key}.so"));
    if !lib.exists() {
        // a unique scratch name per build: test threads (and processes) may build the same module at once
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tag = format!("{}.{}", std::process::id(), BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let src = dir.join(format!("{key}.{tag}.cpp"));
        std::fs::write(&src, &cpp).map_err(|e| format!("{}: {e}", src.display()))?;
        let tmp = dir.join(format!("{key}.{tag}.so"));
        let out = std::process::Command::new(compiler())
            .args(flags)
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .output()
            .map_err(|e| format!("running the C++ compiler `{}` (set CXX): {e}", compiler()))?;
        if !out.status.success() {
            return Err(format!("compiling the emulated module {module} ({}):\n{}", src.display(), String::from_utf8_lossy(&out.stderr)));
        }
        std::fs::rename(&tmp, &lib).map_err(|e| format!("{}: {e}", lib.display()))?;
        let _ = std::fs::remove_file(&src);
    }
    // SAFETY: the library was built above from our own source; its only export is emu_launch.
    let lib = unsafe { libloading::Library::new(&lib) }.map_err(|e| format!("{}: {e}", lib.display()))?;
    let launch = *unsafe { lib.get::<LaunchFn>(b"emu_launch\0") }.map_err(|e| e.to_string())?;
    Ok(EmuModule { _lib: lib, launch, kernels })
}

/// The emulated module, compiled once per process.
pub fn module(name: &str) -> Arc<EmuModule> {
    module_with(name, &[])
}

/// The emulated module built with compile-time constants (as NVRTC's `-D NAME=VALUE`), compiled
/// once per process and set of constants.
pub fn module_with(name: &str, defines: &[(String, String)]) -> Arc<EmuModule> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<EmuModule>>>> = OnceLock::new();
    let key = format!("{name}{defines:?}");
    if let Some(m) = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return m.clone();
    }
    // built outside the lock: test threads build different modules in parallel
    let m = Arc::new(build(name, defines).unwrap_or_else(|e| panic!("{e}")));
    CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert(m).clone()
}

impl EmuModule {
    /// Launches `kernel` with the raw configuration; `seed` shuffles the block and thread order.
    pub fn launch_raw(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        cooperative: bool,
        seed: u64,
        args: &mut Args,
    ) -> Result<(), String> {
        let name = CString::new(kernel).unwrap();
        let mut err = vec![0u8; 512];
        // SAFETY: `args` holds one pointer per kernel parameter, each to a live value of the
        // parameter's type; buffers passed as pointers are host memory the caller sized.
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                smem,
                cooperative as i32,
                seed,
                args.ptrs.as_mut_ptr(),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            Err(format!("{kernel}: {}", String::from_utf8_lossy(&err[..end])))
        }
    }

    /// Launches a plan's kernel with the plan's own grid, block, shared memory and cooperativeness.
    pub fn launch(&self, l: &KernelLaunch, seed: u64, args: &mut Args) -> Result<(), String> {
        self.launch_raw(l.kernel, l.grid, (l.block, 1, 1), l.smem_bytes, l.cooperative, seed, args)
    }
}

/// Guard floats on both sides of every emulated device buffer: a kernel that writes outside its
/// buffer changes them.
pub const GUARD: usize = 64;
pub const GUARD_VALUE: f32 = -7.25e30;

/// A host buffer standing in for a device allocation: NaN-poisoned (every element the test reads
/// must have been written), with guards.
pub struct DevBuf {
    data: Vec<f32>,
    name: &'static str,
}

impl DevBuf {
    pub fn new(name: &'static str, len: usize) -> Self {
        let mut data = vec![f32::NAN; len.max(1) + 2 * GUARD];
        data[..GUARD].fill(GUARD_VALUE);
        let n = data.len();
        data[n - GUARD..].fill(GUARD_VALUE);
        DevBuf { data, name }
    }
    pub fn from(name: &'static str, xs: &[f32]) -> Self {
        let mut b = Self::new(name, xs.len());
        b.data[GUARD..GUARD + xs.len()].copy_from_slice(xs);
        b
    }
    pub fn ptr(&mut self) -> *mut f32 {
        self.data[GUARD..].as_mut_ptr()
    }
    pub fn host(&self) -> Vec<f32> {
        self.data[GUARD..self.data.len() - GUARD].to_vec()
    }
    pub fn check_guards(&self) {
        let n = self.data.len();
        assert!(
            self.data[..GUARD].iter().chain(&self.data[n - GUARD..]).all(|&x| x == GUARD_VALUE),
            "a kernel wrote outside the buffer `{}`",
            self.name
        );
    }
}
