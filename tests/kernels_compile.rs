//! Every kernel compiles with NVRTC for sm_80 and sm_90 and assembles with ptxas without a single
//! register spill — checked in CI, where there is no GPU (`.ci/run` installs the pip packages
//! nvidia-cuda-nvrtc-cu12 and nvidia-cuda-nvcc-cu12). Without NVRTC this test fails and says why.

use backei::gpu::kernels::{compile_module, module_names, nvrtc_present};
use backei::gpu::ptxas::kernel_report;

fn require_nvrtc() {
    assert!(
        nvrtc_present(),
        "NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 and put <site-packages>/nvidia/cuda_nvrtc/lib on LD_LIBRARY_PATH (.ci/run does this)"
    );
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    require_nvrtc();
    for arch in ["sm_80", "sm_90"] {
        let stats = kernel_report(arch).unwrap_or_else(|e| panic!("{e}"));
        assert!(stats.len() >= module_names().count(), "{stats:?}");
        for k in &stats {
            println!(
                "{arch} {:<14} {:<36} regs {:>3} smem {:>6} stack {:>4} spills {}/{}",
                k.module, k.kernel, k.registers, k.shared_bytes, k.stack_bytes, k.spill_stores, k.spill_loads
            );
            assert_eq!((k.spill_stores, k.spill_loads), (0, 0), "{arch} {}::{} spills registers", k.module, k.kernel);
            assert!(k.registers > 0 && k.registers <= 255, "{k:?}");
        }
    }
}

#[test]
fn a_compile_error_names_file_line_and_source() {
    require_nvrtc();
    // every real module compiles; a broken one must report where it broke
    for m in module_names() {
        compile_module(m, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    }
    let err = compile_module("no_such_module", "sm_90").unwrap_err().to_string();
    assert!(err.contains("no kernel module `no_such_module`"), "{err}");
}
