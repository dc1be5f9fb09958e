//! Resource use of every kernel without a GPU: NVRTC's PTX assembled by `ptxas -v` for an
//! architecture, its report parsed into registers, shared memory and spills per kernel.
//! `backei kernels --arch sm_90` prints it; CI fails on any spill. Modules specialised at compile
//! time (backei_v4) are reported as the instances a GPU loads (`backei_v4::report_instances`).

use super::backei_v4::{report_instances, V4_MODULE};
use super::kernels::{compile_module_with, module_names};
use crate::error::{BackeiError, Result};
use std::path::PathBuf;
use std::process::Command;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelStats {
    pub module: String,
    pub kernel: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// `$PTXAS`, else `ptxas` on PATH, else the pip package nvidia-cuda-nvcc-cu12's copy, else CUDA's.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PTXAS") {
        return Some(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("ptxas")).collect()).unwrap_or_default();
    candidates.extend(super::wheels::tool_candidates("ptxas"));
    candidates.push(PathBuf::from("/usr/local/cuda/bin/ptxas"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Parses `ptxas -v` output into one entry per kernel.
pub fn parse_ptxas_report(module: &str, text: &str) -> Vec<KernelStats> {
    let mut out: Vec<KernelStats> = Vec::new();
    let num_before = |s: &str, unit: &str| -> u32 {
        s.find(unit).and_then(|i| s[..i].split_whitespace().last()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    for line in text.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelStats {
                module: module.into(),
                kernel: name,
                registers: 0,
                shared_bytes: 0,
                stack_bytes: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack_bytes = num_before(line, "bytes stack frame");
                k.spill_stores = num_before(line, "bytes spill stores");
                k.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = num_before(line, "registers");
                k.shared_bytes = num_before(line, "bytes smem");
            }
        }
    }
    out
}

impl KernelStats {
    /// Whether the kernel spills registers, but for the one named exception: the window-staged fp32
    /// tiles of 256 pixels (`conv_halo_fp32_m*n256`) sit at 255 registers, and ptxas spills 4
    /// bytes of the sm_90 ones (an 8-byte stack frame) — the pip wheel's ptxas and NVRTC's own
    /// CUBIN (what runs) alike, outside the tap loop (`tests/kernels_compile.rs`
    /// `window_staged_convolutions_loop_over_taps_on_tensor_cores` reads its SASS: the loop has no
    /// local access). (Until 2026-12-05 that test read cuobjdump's LOCAL, which leaves spills out,
    /// and this comment said NVRTC's CUBIN had none.)
    pub fn spills(&self, arch: &str) -> bool {
        let named = arch == "sm_90" && self.kernel.starts_with("conv_halo_fp32_m") && self.kernel.ends_with("n256");
        if named {
            self.spill_stores > 8 || self.spill_loads > 8
        } else {
            self.spill_stores + self.spill_loads > 0
        }
    }
}

/// Compiles every module for `arch` and reports each kernel's resources.
pub fn kernel_report(arch: &str) -> Result<Vec<KernelStats>> {
    let ptxas = find_ptxas()
        .ok_or_else(|| BackeiError::Cuda("ptxas not found: set PTXAS, put it on PATH, or pip install nvidia-cuda-nvcc-cu12".into()))?;
    let dir = std::env::temp_dir().join(format!("backei-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BackeiError::Io { path: dir.display().to_string(), problem: e.to_string() })?;
    let mut all = Vec::new();
    // assembles one module instance (the n-th: its file names) and adds its kernels under `label`
    let mut n = 0;
    let mut assemble = |label: &str, module: &str, defines: &[(String, String)]| -> Result<()> {
        n += 1;
        let ptx = compile_module_with(module, arch, defines)?.ptx;
        let file = dir.join(format!("{n}.ptx"));
        std::fs::write(&file, ptx).map_err(|e| BackeiError::Io { path: file.display().to_string(), problem: e.to_string() })?;
        let out = Command::new(&ptxas)
            .args(["-v", &format!("-arch={arch}"), "-o"])
            .arg(dir.join(format!("{n}.cubin")))
            .arg(&file)
            .output()
            .map_err(|e| BackeiError::Io { path: ptxas.display().to_string(), problem: e.to_string() })?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(BackeiError::Cuda(format!("ptxas failed on module {label} for {arch}:\n{text}")));
        }
        all.extend(parse_ptxas_report(label, &text));
        Ok(())
    };
    // each module once, as NVRTC compiles it by itself; v4 as the instances a GPU loads
    for module in module_names() {
        if module == V4_MODULE {
            for (label, defines) in report_instances()? {
                assemble(&format!("{module} ({label})"), module, &defines)?;
            }
        } else {
            assemble(module, module, &[])?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spill_fails_but_for_the_named_exception_within_its_bytes() {
        let k = |kernel: &str, st, ld| KernelStats {
            module: "m".into(),
            kernel: kernel.into(),
            registers: 255,
            shared_bytes: 0,
            stack_bytes: 8,
            spill_stores: st,
            spill_loads: ld,
        };
        assert!(!k("conv_halo_fp32_m32n256", 4, 4).spills("sm_90"));
        assert!(k("conv_halo_fp32_m32n256", 12, 4).spills("sm_90"), "more than the named 8 bytes");
        assert!(k("conv_halo_fp32_m32n256", 4, 4).spills("sm_80"), "the exception is sm_90's");
        assert!(k("conv_halo_fp32_m32n128", 4, 0).spills("sm_90"), "another tile is no exception");
        assert!(k("backei_backward_v4_r1_fp32", 0, 4).spills("sm_90"));
        assert!(!k("backei_backward_v4_r1_fp32", 0, 0).spills("sm_90"));
    }

    #[test]
    fn parses_ptxas_verbose_output() {
        let text = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'backei_forward_f32' for 'sm_90'\n\
ptxas info    : Function properties for backei_forward_f32\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'fill_f32' for 'sm_90'\n\
ptxas info    : Function properties for fill_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 8 registers, used 0 barriers, 364 bytes cmem[0]\n";
        let k = parse_ptxas_report("m", text);
        assert_eq!(k.len(), 2);
        assert_eq!((k[0].registers, k[0].shared_bytes, k[0].stack_bytes, k[0].spill_stores, k[0].spill_loads), (40, 4096, 8, 4, 12));
        assert_eq!((k[1].kernel.as_str(), k[1].registers, k[1].shared_bytes), ("fill_f32", 8, 0));
    }
}
