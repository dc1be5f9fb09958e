//! The checks of `cuda/mma_probe.cu`, shared by the GPU (`tests/gpu_mma.rs`: the hardware
//! follows the PTX ISA's fragment layouts as `cuda/mma.cuh` describes them) and the CPU emulator
//! (`tests/emu_mma.rs`: so does the emulator that runs the v4 kernels in CI). The expected values
//! are computed here from the documented layouts and the IEEE roundings of the `half` crate, not
//! from the emulator's code.

use super::Rng;
use half::{bf16, f16};

/// Precision kinds of the probes (PROBE_* in the .cu).
pub const F16: i32 = 0;
pub const BF16: i32 = 1;
pub const TF32: i32 = 2;

/// Runs the probe kernels on some device.
pub trait ProbeDevice {
    /// D = A·B + C: a [16][K], b [K][8], c [16][8], all row-major; K = 16, or 8 for TF32.
    fn mma(&self, a: &[f32], b: &[f32], c: &[f32], kind: i32) -> Vec<f32>;
    /// `ldmatrix_probe`: the source rows (32 × 8 u16) and each lane's row; returns [9][32][4] u32.
    fn ldmatrix(&self, src: &[u16], rows: &[i32]) -> Vec<u32>;
    /// `convert_probe`: [7][n] u32 (f16, bf16, tf32 bits, split hi, split lo; the packed split of
    /// (x[i], x[(i + 1) % n]): hi, lo).
    fn convert(&self, x: &[f32]) -> Vec<u32>;
}

/// f32 → tf32 as cvt.rna.tf32.f32: nearest, ties away from zero, the low 13 bits cleared.
pub fn tf32_rna(x: f32) -> u32 {
    let b = x.to_bits();
    if !x.is_finite() {
        return if x.is_nan() { b } else { b & 0xFFFF_E000 };
    }
    (b + 0x1000) & 0xFFFF_E000
}

fn rounded(kind: i32, x: f32) -> f64 {
    match kind {
        F16 => f16::from_f32(x).to_f64(),
        BF16 => bf16::from_f32(x).to_f64(),
        _ => f32::from_bits(tf32_rna(x)) as f64,
    }
}

/// Every kind: D must equal C + Σ A·B of the rounded operands to `rel` of Σ|terms| (a wrong
/// fragment layout pairs the wrong elements and misses by O(1)).
pub fn check_mma(dev: &dyn ProbeDevice, rel: f64) {
    let mut rng = Rng(0x3a3a);
    for kind in [F16, BF16, TF32] {
        let k = if kind == TF32 { 8 } else { 16 };
        for trial in 0..3 {
            let a: Vec<f32> = rng.vec(16 * k, -1.0, 1.0).into_iter().map(|x| x as f32).collect();
            let b: Vec<f32> = rng.vec(k * 8, -1.0, 1.0).into_iter().map(|x| x as f32).collect();
            let c: Vec<f32> = rng.vec(16 * 8, -4.0, 4.0).into_iter().map(|x| x as f32).collect();
            let d = dev.mma(&a, &b, &c, kind);
            assert_eq!(d.len(), 128);
            for i in 0..16 {
                for j in 0..8 {
                    let (mut want, mut mag) = (c[i * 8 + j] as f64, (c[i * 8 + j] as f64).abs());
                    for kk in 0..k {
                        let p = rounded(kind, a[i * k + kk]) * rounded(kind, b[kk * 8 + j]);
                        want += p;
                        mag += p.abs();
                    }
                    let got = d[i * 8 + j] as f64;
                    assert!(
                        (got - want).abs() <= rel * mag + 1e-30,
                        "kind {kind} trial {trial}: D[{i}][{j}] = {got}, want {want} (|terms| {mag}): the fragment layout is not the documented one"
                    );
                }
            }
        }
    }
}

/// ldmatrix x1, x2, x4 and x2/x4 .trans with every lane pointing at a scrambled row; then x4 and
/// x4.trans at 32-bit shared addresses, and the 16- and 4-byte shared loads at them (`lds128_at`:
/// the lane's row, `lds32_at`: word lane % 4 of it); then the lane's row copied by 4-byte cp.async,
/// words reversed.
pub fn check_ldmatrix(dev: &dyn ProbeDevice) {
    let src: Vec<u16> = (0..32 * 8).map(|i| i as u16).collect();
    let mut rng = Rng(0x1d1d);
    let mut rows: Vec<i32> = (0..32).collect();
    for i in (1..32).rev() {
        rows.swap(i, rng.below(i + 1));
    }
    let out = dev.ldmatrix(&src, &rows);
    assert_eq!(out.len(), 10 * 32 * 4);
    // the PTX ISA: lanes 8j..8j+7 address matrix j's rows; register j of lane l holds row l/4,
    // elements 2(l%4), 2(l%4)+1 (low half first); transposed: element l/4 of rows 2(l%4), 2(l%4)+1
    let elem = |matrix: usize, row: usize, col: usize| src[rows[8 * matrix + row] as usize * 8 + col] as u32;
    for (variant, (n, trans)) in
        [(1usize, false), (2, false), (4, false), (2, true), (4, true), (4, false), (4, true)].into_iter().enumerate()
    {
        for lane in 0..32 {
            for j in 0..4 {
                let got = out[(variant * 32 + lane) * 4 + j];
                let want = if j >= n {
                    0
                } else if trans {
                    elem(j, 2 * (lane % 4), lane / 4) | elem(j, 2 * (lane % 4) + 1, lane / 4) << 16
                } else {
                    elem(j, lane / 4, 2 * (lane % 4)) | elem(j, lane / 4, 2 * (lane % 4) + 1) << 16
                };
                let at = if variant >= 5 { " at a 32-bit address" } else { "" };
                assert_eq!(got, want, "ldmatrix x{n}{}{at} lane {lane} register {j}", if trans { ".trans" } else { "" });
            }
        }
    }
    // a word of a lane's row: its elements 2w and 2w + 1, the lower in the low half
    let word =
        |lane: usize, w: usize| src[rows[lane] as usize * 8 + 2 * w] as u32 | (src[rows[lane] as usize * 8 + 2 * w + 1] as u32) << 16;
    for lane in 0..32 {
        for j in 0..4 {
            assert_eq!(out[(7 * 32 + lane) * 4 + j], word(lane, j), "ld.shared.v4 lane {lane} word {j}");
            let want = if j == 0 { word(lane, lane % 4) } else { 0 };
            assert_eq!(out[(8 * 32 + lane) * 4 + j], want, "ld.shared.u32 lane {lane} register {j}");
            assert_eq!(out[(9 * 32 + lane) * 4 + j], word(lane, 3 - j), "cp.async 4 bytes lane {lane} word {j}");
        }
    }
}

/// The conversions bit for bit (NaN: NaN-ness only), including ties, subnormals and overflow;
/// the split: hi = fp16(x), lo = fp16(x − hi).
/// The rows of convert_probe's output (cuda/mma_probe.cu), n words each.
pub const CONVERT_ROWS: usize = 8;

pub fn check_convert(dev: &dyn ProbeDevice) {
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0 / 3.0,
        65504.0,
        65519.0,                     // rounds down to the largest half
        65520.0,                     // the tie: rounds to infinity
        1e-5,                        // a half subnormal
        5.960_464_5e-8,              // the smallest half subnormal
        2.980_232_2e-8,              // half of it: the tie rounds to 0 (even)
        4.0e-8,                      // rounds up to the smallest subnormal
        1.0 + 1.0 / 2048.0,          // a half tie: to even (1)
        1.0 + 3.0 / 2048.0,          // a half tie: to even (up)
        1.0 + 1.0 / 256.0,           // a bf16 tie: to even (1)
        1.0 + 3.0 / 256.0,           // a bf16 tie: to even (up)
        f32::from_bits(0x3F80_1000), // a tf32 tie: away from zero
        f32::from_bits(0xBF80_1000),
        f32::from_bits(0x3F80_0FFF),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1), // an f32 subnormal
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        12345.678,
        -0.062_5,
    ];
    let mut rng = Rng(0xc0c0);
    for _ in 0..200 {
        let e = rng.uniform(-30.0, 16.0);
        let s = if rng.below(2) == 0 { 1.0 } else { -1.0 };
        x.push((s * rng.uniform(1.0, 2.0) * 2f64.powf(e.floor())) as f32);
    }
    // the sigmoid's reciprocal (rcp_rn_unit, y ≥ 1): 1, its neighbours, the ends of the range
    // where it rounds (2^126 and the float below it), beyond it, and y = 1 + e^−x over the
    // sigmoid's arguments
    let below_2_126 = f32::from_bits((2f32.powi(126)).to_bits() - 1);
    x.extend([1.0, f32::from_bits(0x3F80_0001), 1.5, 3.0, 7.0, below_2_126, 2f32.powi(126), 2f32.powi(127), 3e38]);
    for _ in 0..300 {
        let a = rng.uniform(-88.0, 30.0) as f32;
        x.push(1.0 + (-a).exp());
        x.push(rng.uniform(1.0, 2.0) as f32 * 2f32.powi(rng.below(126) as i32));
    }
    let n = x.len();
    let out = dev.convert(&x);
    assert_eq!(out.len(), CONVERT_ROWS * n);
    for (i, &y) in x.iter().enumerate() {
        let got = f32::from_bits(out[7 * n + i]);
        if y.is_nan() {
            assert!(got.is_nan(), "rcp_rn_unit(NaN) = {got:e}: NaN expected");
        } else if y >= 1.0 {
            // rounded to nearest below 2^126, 0 from there (and for infinity)
            let want = if y < 2f32.powi(126) { 1.0 / y } else { 0.0 };
            assert_eq!(got.to_bits(), want.to_bits(), "rcp_rn_unit({y:e} = {:#010x}) = {got:e}, want {want:e}", y.to_bits());
        }
    }
    let same = |got: u32, want: u32, nan_mask: (u32, u32), what: &str, v: f32| {
        if v.is_nan() {
            let (exp, man) = nan_mask;
            assert!(got & exp == exp && got & man != 0, "{what}(NaN): a NaN expected, got {got:#x}");
        } else {
            assert_eq!(got, want, "{what}({v:e} = {:#010x})", v.to_bits());
        }
    };
    for (i, &v) in x.iter().enumerate() {
        same(out[i], f16::from_f32(v).to_bits() as u32, (0x7C00, 0x03FF), "f16", v);
        same(out[n + i], bf16::from_f32(v).to_bits() as u32, (0x7F80, 0x007F), "bf16", v);
        if v.is_nan() {
            assert!(f32::from_bits(out[2 * n + i]).is_nan(), "tf32(NaN)");
        } else {
            assert_eq!(out[2 * n + i], tf32_rna(v), "tf32({v:e})");
        }
        if v.is_finite() && v.abs() < 65504.0 {
            let hi = f16::from_f32(v);
            let lo = f16::from_f32(v - hi.to_f32());
            assert_eq!(out[3 * n + i], hi.to_bits() as u32, "split hi({v:e})");
            assert_eq!(out[4 * n + i], lo.to_bits() as u32, "split lo({v:e})");
        }
        // the packed split of a pair: each half the split of its element, x[i] in the low half
        let w = x[(i + 1) % n];
        if v.is_finite() && v.abs() < 65504.0 && w.is_finite() && w.abs() < 65504.0 {
            let (h0, h1) = (f16::from_f32(v), f16::from_f32(w));
            let (l0, l1) = (f16::from_f32(v - h0.to_f32()), f16::from_f32(w - h1.to_f32()));
            assert_eq!(out[5 * n + i], h0.to_bits() as u32 | (h1.to_bits() as u32) << 16, "split_f16_pair hi({v:e}, {w:e})");
            assert_eq!(out[6 * n + i], l0.to_bits() as u32 | (l1.to_bits() as u32) << 16, "split_f16_pair lo({v:e}, {w:e})");
        }
    }
}
