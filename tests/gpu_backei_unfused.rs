//! The UNFUSED GPU BackEI layer (`gpu::backei_unfused`: pointwise kernels per step, gate
//! convolutions through cuBLAS) against the CPU engine, in the smooth firing mode (no step
//! functions, so every comparison is strict): s, v, g, z, ∂I and the four weight gradients
//! (accumulated onto random starting values), compared as tests/common/layer_check.rs compares
//! the fused layer. Every output, saved tensor and scratch buffer is NaN-poisoned
//! first; every element must come back finite. Shapes: odd maps, batch 1 and 2, back/ei each on
//! and off, r = 1 and 2, D = 1, 3 and D ≥ T, T_in = 1 and T, and a conv workspace so small that
//! every gate conv runs in several chunks.
//!
//! These tests need a CUDA GPU; without one they FAIL when run with `--ignored`.

mod common;

use backei::gpu::backei_layer::BackEiSlots;
use backei::gpu::backei_unfused::UnfusedBackEiLayer;
use backei::gpu::GpuDevice;
use backei::spec::{FeedbackConfig, NeuronConfig};
use common::gpu_layer::{forward_backward, nan_fill};
use common::layer_check::{self, compare, cpu_reference, inputs, smooth};
use std::sync::Arc;

struct Case {
    /// The layer, its data and the comparison: tests/common/layer_check.rs (smooth firing).
    base: layer_check::Case,
    /// The conv workspace's cap (None: the default).
    ws_bytes: Option<usize>,
}

#[allow(clippy::too_many_arguments)]
fn case(shape: [usize; 3], back: bool, ei: bool, radius: usize, delay: usize, batch: usize, steps: usize, t_in: usize) -> Case {
    let name = format!("{shape:?} back {back} ei {ei} r {radius} D {delay} B {batch} T {steps} T_in {t_in}");
    Case { base: smooth(layer_check::case(&name, shape, back, ei, radius, delay, batch, steps, t_in)), ws_bytes: None }
}

fn run(dev: &Arc<GpuDevice>, c: &Case, seed: u64) {
    let lc = &c.base;
    let x = inputs(lc, seed);
    let cpu = cpu_reference(lc, &x);
    let (b, t) = (lc.batch, lc.steps);
    let mut layer = UnfusedBackEiLayer::new(dev, lc.shape, lc.fb, &lc.neuron).unwrap();
    if let Some(w) = c.ws_bytes {
        layer.ws.max_bytes = w;
    }
    let plan = layer.prepare(b, t).unwrap().clone();
    if c.ws_bytes.is_some() {
        assert!(plan.conv.unwrap().chunks > 1, "{}: the small workspace must split the convs", lc.name);
    }
    for buf in [
        &mut layer.out,
        &mut layer.v,
        &mut layer.g,
        &mut layer.z,
        &mut layer.u,
        &mut layer.du,
        &mut layer.dz,
        &mut layer.dvp,
        &mut layer.dvc,
        &mut layer.da,
        &mut layer.ring,
    ]
    .into_iter()
    .flatten()
    {
        nan_fill(dev, buf);
    }
    let d = forward_backward(dev, &mut layer, lc, &x);
    let label = format!("unfused, launches {:?}", plan.launches());
    compare(lc, &label, &x, &cpu, &d);
}

fn device() -> Arc<GpuDevice> {
    GpuDevice::open(0).expect("these tests need a CUDA GPU")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn unfused_layer_matches_the_cpu_in_smooth_mode_for_every_switch() {
    let dev = device();
    let mut cases = Vec::new();
    for (back, ei) in [(true, true), (true, false), (false, true), (false, false)] {
        for (r, d, t_in) in [(1, 1, 5), (2, 3, 1)] {
            cases.push(case([5, 7, 9], back, ei, r, d, 2, 5, t_in));
        }
    }
    cases.push(case([3, 6, 4], true, true, 1, 7, 1, 4, 4)); // D ≥ T: the feedback never arrives
    cases.push(case([4, 9, 7], true, true, 2, 1, 2, 1, 1)); // T = 1
    cases.push(case([15, 12, 12], true, true, 2, 1, 2, 4, 4)); // mnist-like layer 1, smaller map
    let mut small = case([6, 8, 10], true, true, 1, 2, 3, 4, 1);
    small.ws_bytes = Some(2 * 4 * (6 * 9 + 6) * 80); // two samples per chunk: 2 chunks per conv
    small.base.name += " small workspace";
    cases.push(small);
    for (i, c) in cases.iter().enumerate() {
        run(&dev, c, 6150 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn unfused_bad_calls_are_errors() {
    let dev = device();
    let fb = FeedbackConfig::default();
    let mut layer = UnfusedBackEiLayer::new(&dev, [2, 3, 3], fb, &NeuronConfig::default()).unwrap();
    let params = dev.stream.alloc_zeros::<f32>(2 * (4 * 9 + 2)).unwrap();
    let slots: BackEiSlots = [0..36, 36..38, 38..74, 74..76];
    let input = dev.stream.alloc_zeros::<f32>(18 * 2).unwrap();
    let e = layer.forward(&params, &slots, &input.slice(..), 2, 1, 3).unwrap_err().to_string();
    assert!(e.contains("T_in"), "{e}");
    let e = layer.forward(&params, &slots, &input.slice(..), 1, 1, 3).unwrap_err().to_string();
    assert!(e.contains("input"), "{e}");
    let bad: BackEiSlots = [0..35, 36..38, 38..74, 74..76];
    let e = layer.forward(&params, &bad, &input.slice(..18), 1, 1, 3).unwrap_err().to_string();
    assert!(e.contains("W_b"), "{e}");
    let mut fresh = UnfusedBackEiLayer::new(&dev, [2, 3, 3], fb, &NeuronConfig::default()).unwrap();
    let mut grads = dev.stream.alloc_zeros::<f32>(76).unwrap();
    let mut gin = dev.stream.alloc_zeros::<f32>(18).unwrap();
    let gout = dev.stream.alloc_zeros::<f32>(54).unwrap();
    let e = fresh
        .backward(&params, &mut grads, &slots, &input.slice(..18), 1, &gout.slice(..), &mut gin.slice_mut(..))
        .unwrap_err()
        .to_string();
    assert!(e.contains("before forward"), "{e}");
    assert!(fresh.output().is_err());
}
