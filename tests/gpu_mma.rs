//! The tensor-core wrappers of `cuda/mma.cuh` on real hardware: mma.sync's fragment layouts,
//! ldmatrix (.trans), cp.async and the conversions follow the PTX ISA as documented there — the
//! same checks (`tests/common/mma_check.rs`) that `tests/emu_mma.rs` runs on the CPU emulator, so a
//! pass here and there means the emulator checking the v4 kernels in CI models the hardware.
//!
//! These tests need a CUDA GPU; without one they FAIL when run with `--ignored`.
mod common;

use backei::gpu::GpuDevice;
use common::mma_check::{check_convert, check_ldmatrix, check_mma, ProbeDevice, CONVERT_ROWS};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

struct Gpu(Arc<GpuDevice>);

impl Gpu {
    fn one_warp() -> LaunchConfig {
        LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }
    }
}

impl ProbeDevice for Gpu {
    fn mma(&self, a: &[f32], b: &[f32], c: &[f32], kind: i32) -> Vec<f32> {
        let s = &self.0.stream;
        let f = self.0.kernels.function("mma_probe", "mma_probe").unwrap();
        let (a, b, c) = (s.clone_htod(a).unwrap(), s.clone_htod(b).unwrap(), s.clone_htod(c).unwrap());
        let mut d = s.alloc_zeros::<f32>(128).unwrap();
        // SAFETY: the argument list matches mma_probe; a, b, c, d hold the sizes it reads and writes.
        unsafe { s.launch_builder(&f).arg(&a).arg(&b).arg(&c).arg(&mut d).arg(&kind).launch(Self::one_warp()).unwrap() };
        s.clone_dtoh(&d).unwrap()
    }
    fn ldmatrix(&self, src: &[u16], rows: &[i32]) -> Vec<u32> {
        let s = &self.0.stream;
        let f = self.0.kernels.function("mma_probe", "ldmatrix_probe").unwrap();
        let (src, rows) = (s.clone_htod(src).unwrap(), s.clone_htod(rows).unwrap());
        let mut out = s.alloc_zeros::<u32>(10 * 32 * 4).unwrap();
        // the 32 rows and the 4-byte copies in dynamic shared memory (1,024 bytes)
        let cfg = LaunchConfig { shared_mem_bytes: 1024, ..Self::one_warp() };
        // SAFETY: the argument list matches ldmatrix_probe (cudaMalloc memory is 256-byte aligned).
        unsafe { s.launch_builder(&f).arg(&src).arg(&rows).arg(&mut out).launch(cfg).unwrap() };
        s.clone_dtoh(&out).unwrap()
    }
    fn convert(&self, x: &[f32]) -> Vec<u32> {
        let s = &self.0.stream;
        let f = self.0.kernels.function("mma_probe", "convert_probe").unwrap();
        let n = x.len() as i32;
        let x = s.clone_htod(x).unwrap();
        let mut out = s.alloc_zeros::<u32>(CONVERT_ROWS * x.len()).unwrap();
        // SAFETY: the argument list matches convert_probe.
        unsafe { s.launch_builder(&f).arg(&x).arg(&mut out).arg(&n).launch(LaunchConfig::for_num_elems(n as u32)).unwrap() };
        s.clone_dtoh(&out).unwrap()
    }
}

fn gpu() -> Gpu {
    Gpu(GpuDevice::open(0).expect("a CUDA GPU"))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn hardware_mma_follows_the_documented_fragment_layouts() {
    // the tensor cores' internal sum is not IEEE: allow a few f32 ulps of Σ|terms|
    check_mma(&gpu(), 1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn hardware_ldmatrix_and_cp_async_follow_the_documented_layouts() {
    check_ldmatrix(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn hardware_conversions_round_as_the_emulator_does() {
    check_convert(&gpu());
}
