//! The tensor-core wrappers of `cuda/mma.cuh` as the CPU emulator runs them (`tests/emu/cuda_emu.h`):
//! mma.sync's fragment layouts, ldmatrix (.trans), cp.async and the conversions, against the PTX
//! ISA's documented behaviour (`tests/common/mma_check.rs`). `tests/gpu_mma.rs` runs the same
//! checks on a GPU, so the emulator that checks the v4 kernels in CI is itself checked.
mod common;

use common::emu::{self, Args};
use common::mma_check::{check_convert, check_ldmatrix, check_mma, ProbeDevice, CONVERT_ROWS};

struct Emulated;

impl ProbeDevice for Emulated {
    fn mma(&self, a: &[f32], b: &[f32], c: &[f32], kind: i32) -> Vec<f32> {
        let (mut a, mut b, mut c) = (a.to_vec(), b.to_vec(), c.to_vec());
        let mut d = vec![f32::NAN; 128];
        let mut args = Args::new();
        args.buf_mut(&mut a).buf_mut(&mut b).buf_mut(&mut c).buf_mut(&mut d).val(kind);
        emu::module("mma_probe").launch_raw("mma_probe", (1, 1, 1), (32, 1, 1), 0, false, 7, &mut args).unwrap();
        d
    }
    fn ldmatrix(&self, src: &[u16], rows: &[i32]) -> Vec<u32> {
        // 16-byte aligned rows for cp.async: the u16 values packed into a u128 buffer
        let mut packed: Vec<u128> = vec![0; src.len() / 8];
        for (i, &x) in src.iter().enumerate() {
            packed[i / 8] |= (x as u128) << (16 * (i % 8));
        }
        let mut rows = rows.to_vec();
        let mut out = vec![0xDEAD_BEEFu32; 10 * 32 * 4];
        let mut args = Args::new();
        args.val(packed.as_mut_ptr() as *mut u16).val(rows.as_mut_ptr()).val(out.as_mut_ptr());
        emu::module("mma_probe").launch_raw("ldmatrix_probe", (1, 1, 1), (32, 1, 1), 1024, false, 8, &mut args).unwrap();
        out
    }
    fn convert(&self, x: &[f32]) -> Vec<u32> {
        let mut x = x.to_vec();
        let n = x.len();
        let mut out = vec![0xDEAD_BEEFu32; CONVERT_ROWS * n];
        let mut args = Args::new();
        args.buf_mut(&mut x).val(out.as_mut_ptr()).val(n as i32);
        emu::module("mma_probe").launch_raw("convert_probe", (2, 1, 1), (64, 1, 1), 0, false, 9, &mut args).unwrap();
        out
    }
}

#[test]
fn emulated_mma_follows_the_ptx_fragment_layouts() {
    // the emulator forms the sum in double and rounds once: within an f32 ulp of Σ|terms|
    check_mma(&Emulated, 1.2e-7);
}

#[test]
fn emulated_ldmatrix_and_cp_async_follow_the_ptx_isa() {
    check_ldmatrix(&Emulated);
}

#[test]
fn emulated_conversions_round_as_the_ptx_cvt_instructions() {
    check_convert(&Emulated);
}
