//! The checks of the feed-forward layers' tensor-core GEMMs (`cuda/gemm_tc.cu`), shared by the CPU
//! emulator (`tests/emu_feedforward.rs`, through the host's descriptors and launch lists) and a
//! GPU (`tests/gpu_feedforward.rs`, through `conv::forward_with` and the rest, as the network calls
//! them): one case list, one comparison with the CPU engine in f64, one tolerance per mode.

use super::Rng;
use backei::cpu::conv::{self as cconv, ConvGeom};
use backei::cpu::linear as clin;
use backei::Precision;

/// The largest |device − exact| over max |exact| a tensor may show, with exact the f64 CPU result.
/// fp32 mode's split products carry ~22 bits: its error is that of f32 sums (measured on the
/// emulator ≤ 3.3e-7); tf32 rounds each operand to 11 significant bits (≤ 4.1e-4), bf16 to 8
/// (≤ 2.9e-3): the bounds leave a factor of 5–6 for sums of other lengths and for the tensor
/// cores' own accumulation order.
pub fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 2e-6,
        Precision::Tf32 => 2e-3,
        Precision::Bf16 => 1.5e-2,
    }
}

/// What a convolution's or linear layer's backward returns: dW and db (added to the initial
/// contents) and dx.
pub struct Grads {
    pub dw: Vec<f32>,
    pub db: Vec<f32>,
    pub dx: Vec<f32>,
}

/// Runs the tensor-core ops on some device.
pub trait FfDevice {
    #[allow(clippy::too_many_arguments)]
    fn conv_forward(&self, p: Precision, g: &ConvGeom, s: usize, w: &[f32], b: &[f32], x: &[f32], exact: bool) -> Vec<f32>;
    #[allow(clippy::too_many_arguments)]
    fn conv_backward(
        &self,
        p: Precision,
        g: &ConvGeom,
        s: usize,
        w: &[f32],
        x: &[f32],
        dy: &[f32],
        dw0: &[f32],
        db0: &[f32],
        exact: bool,
    ) -> Grads;
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        p: Precision,
        n_in: usize,
        n_out: usize,
        rows: usize,
        w: &[f32],
        b: &[f32],
        x: &[f32],
        exact: bool,
    ) -> Vec<f32>;
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        p: Precision,
        n_in: usize,
        n_out: usize,
        rows: usize,
        w: &[f32],
        x: &[f32],
        dy: &[f32],
        dw0: &[f32],
        db0: &[f32],
        exact: bool,
    ) -> Grads;
}

pub fn host(rng: &mut Rng, n: usize, spikes: bool) -> Vec<f32> {
    if spikes {
        // spikes of a BackEI layer: −1, 0, +1
        (0..n).map(|_| [-1.0f32, 0.0, 0.0, 1.0][rng.below(4)]).collect()
    } else {
        rng.vec(n, -1.0, 1.0).into_iter().map(|v| v as f32).collect()
    }
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// max |a − exact| / max |exact|, every element written.
pub fn rel_err(what: &str, a: &[f32], exact: &[f64]) -> f64 {
    assert_eq!(a.len(), exact.len(), "{what}");
    let scale = exact.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(exact)
        .enumerate()
        .map(|(i, (&x, &e))| {
            assert!(x.is_finite(), "{what}: element {i} not written or not finite ({x})");
            (x as f64 - e).abs() / scale
        })
        .fold(0.0, f64::max)
}

pub fn check(what: &str, p: Precision, a: &[f32], exact: &[f64]) {
    let e = rel_err(what, a, exact);
    println!("{what}: {p} error {e:.2e} of the largest value (tolerance {:.0e})", tolerance(p));
    assert!(e <= tolerance(p), "{what}: {p} error {e:.3e} > {:.0e}", tolerance(p));
}

/// What was added to `before`.
fn added(after: &[f32], before: &[f32]) -> Vec<f32> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// Gradients are added to what the buffers hold: start small, so that the sum's f32 rounding
/// stays below what the check resolves.
fn tiny(rng: &mut Rng, n: usize) -> Vec<f32> {
    host(rng, n, false).iter().map(|x| x * 1e-9).collect()
}

pub fn conv_shapes() -> Vec<(ConvGeom, usize)> {
    vec![
        // odd sizes, padding, several tiles in every dimension (M 70 > 64 output channels)
        (ConvGeom::new(3, 70, 7, 6, 3, 1), 2),
        (ConvGeom::new(2, 4, 9, 9, 5, 0), 3),
        // the first convolution of fashion-mnist (1→32, k 5, pad 2) on a smaller map
        (ConvGeom::new(1, 32, 12, 10, 5, 2), 2),
        // more input channels than one k-step: K = 40·9 = 360
        (ConvGeom::new(40, 9, 5, 5, 3, 1), 2),
    ]
}

/// Shapes for the window-staged convolutions (`cuda/conv_halo.cu`) that take every tile and every
/// path: several pixel tiles a sample with a tile starting mid-row, channel counts that pad a chunk
/// and a block, several chunks and channel blocks, valid (pad 0) and over-padded convolutions, the
/// data gradient's flipped taps, and fashion-mnist's conv2.
pub fn halo_conv_shapes() -> Vec<(ConvGeom, usize)> {
    vec![
        (ConvGeom::new(16, 40, 7, 30, 3, 1), 2),  // fwd m64n256, 210 px; dgrad m32n256, 2 chunks
        (ConvGeom::new(16, 24, 20, 17, 3, 1), 2), // 340 px: 2 tiles a sample, the second from mid-row
        (ConvGeom::new(16, 70, 9, 9, 5, 0), 2),   // valid: fwd 5×5 on m128n64; dgrad 9×9 from 5×5
        (ConvGeom::new(40, 130, 6, 6, 3, 1), 1),  // 2 chunks; fwd 2 channel blocks of 128; dgrad 5 chunks
        (ConvGeom::new(64, 16, 3, 3, 3, 2), 2),   // over-padded: 5×5 out of 3×3
        (ConvGeom::new(32, 64, 14, 14, 5, 2), 2), // fashion-mnist's conv2
    ]
}

/// One convolution (forward, data gradient, weight and bias gradient) in `p` against the CPU
/// engine in f64.
/// `x_scale` scales the input as in [`linear_case`] (the bias gradient's column of ones).
#[allow(clippy::too_many_arguments)]
pub fn conv_case(dev: &dyn FfDevice, g: ConvGeom, samples: usize, p: Precision, spikes: bool, x_scale: f32, seed: u64) {
    let mut rng = Rng(seed);
    let w: Vec<f32> = host(&mut rng, g.weight_len(), false).iter().map(|v| v * 0.5).collect();
    let b = host(&mut rng, g.cout, false);
    let x: Vec<f32> = host(&mut rng, samples * g.in_len(), spikes).iter().map(|v| v * x_scale).collect();
    let dy: Vec<f32> = host(&mut rng, samples * g.out_len(), false).iter().map(|v| v * 1e-3).collect();
    let (dw0, db0) = (tiny(&mut rng, g.weight_len()), tiny(&mut rng, g.cout));
    let what = format!("conv {:?} S {samples}{} x·{x_scale}", (g.cin, g.cout, g.h, g.w, g.k, g.pad), if spikes { " spikes" } else { "" });
    let y = dev.conv_forward(p, &g, samples, &w, &b, &x, spikes);
    let mut y64 = vec![0f64; samples * g.out_len()];
    cconv::forward(&g, &f64s(&w), &f64s(&b), &f64s(&x), &mut y64);
    check(&format!("{what} forward"), p, &y, &y64);
    let gr = dev.conv_backward(p, &g, samples, &w, &x, &dy, &dw0, &db0, spikes);
    let mut dx64 = vec![0f64; samples * g.in_len()];
    cconv::backward_data(&g, &f64s(&w), &f64s(&dy), &mut dx64, false);
    check(&format!("{what} data gradient"), p, &gr.dx, &dx64);
    let (mut dw64, mut db64) = (vec![0f64; g.weight_len()], vec![0f64; g.cout]);
    cconv::backward_weights(&g, &f64s(&x), &f64s(&dy), &mut dw64, &mut db64);
    check(&format!("{what} weight gradient"), p, &added(&gr.dw, &dw0), &dw64);
    check(&format!("{what} bias gradient"), p, &added(&gr.db, &db0), &db64);
}

/// One linear layer's three GEMMs in `p` against the CPU engine in f64.
/// `x_scale` scales the (real) input: below 1/4, fp32 mode's power-of-two operand scale reaches
/// 2^16, beyond fp16's range for the weight gradient's column of ones (the bias gradient).
#[allow(clippy::too_many_arguments)]
pub fn linear_case(dev: &dyn FfDevice, n_in: usize, n_out: usize, rows: usize, p: Precision, spikes: bool, x_scale: f32, seed: u64) {
    let mut rng = Rng(seed);
    let w: Vec<f32> = host(&mut rng, n_in * n_out, false).iter().map(|v| v * 0.1).collect();
    let b = host(&mut rng, n_out, false);
    let x: Vec<f32> = host(&mut rng, rows * n_in, spikes).iter().map(|v| v * x_scale).collect();
    let dy: Vec<f32> = host(&mut rng, rows * n_out, false).iter().map(|v| v * 1e-4).collect();
    let (dw0, db0) = (tiny(&mut rng, n_in * n_out), tiny(&mut rng, n_out));
    let what = format!("linear {n_in}→{n_out} × {rows}{} x·{x_scale}", if spikes { " spikes" } else { "" });
    let y = dev.linear_forward(p, n_in, n_out, rows, &w, &b, &x, spikes);
    let mut y64 = vec![0f64; rows * n_out];
    clin::forward(n_in, n_out, &f64s(&w), &f64s(&b), &f64s(&x), &mut y64);
    check(&format!("{what} forward"), p, &y, &y64);
    let gr = dev.linear_backward(p, n_in, n_out, rows, &w, &x, &dy, &dw0, &db0, spikes);
    let mut dx64 = vec![0f64; rows * n_in];
    clin::backward_data(n_in, n_out, &f64s(&w), &f64s(&dy), &mut dx64);
    check(&format!("{what} data gradient"), p, &gr.dx, &dx64);
    let (mut dw64, mut db64) = (vec![0f64; n_in * n_out], vec![0f64; n_out]);
    clin::backward_weights(n_in, n_out, &f64s(&x), &f64s(&dy), &mut dw64, &mut db64);
    check(&format!("{what} weight gradient"), p, &added(&gr.dw, &dw0), &dw64);
    check(&format!("{what} bias gradient"), p, &added(&gr.db, &db0), &db64);
}

/// Every convolution shape in `p`, with real and (fp32 mode: both) spike inputs.
pub fn check_convs(dev: &dyn FfDevice, p: Precision) {
    for (i, (g, s)) in conv_shapes().into_iter().enumerate() {
        let seed = 100 * (p as u64 + 1) + i as u64;
        if p == Precision::Fp32 {
            conv_case(dev, g, s, p, false, 1.0, seed);
            conv_case(dev, g, s, p, true, 1.0, seed + 50);
            if i == 0 {
                // real inputs below 1/4: fp32 mode's operand scale reaches 2^16 (an H200 found
                // the bias gradient NaN there)
                conv_case(dev, g, s, p, false, 1.0 / 64.0, seed + 70);
            }
        } else {
            conv_case(dev, g, s, p, i % 2 == 0, 1.0, seed);
        }
    }
}

/// Linear layers in every mode: several tiles each way, spike inputs, and small real inputs
/// (largest |x| 2^-6: an H200 found the bias gradient NaN there in fp32 mode).
pub fn check_linears(dev: &dyn FfDevice) {
    for (i, p) in Precision::ALL.into_iter().enumerate() {
        let seed = 500 + 10 * i as u64;
        linear_case(dev, 45, 67, 70, p, false, 1.0, seed);
        linear_case(dev, 100, 10, 33, p, true, 1.0, seed + 5);
        linear_case(dev, 40, 10, 33, p, false, 1.0 / 64.0, seed + 7);
    }
}
