//! The tensor-core BackEI kernels (v4, `cuda/backei_v4.cu`) executed on the CPU emulator
//! (`tests/emu/cuda_emu.h`, whose mma.sync, ldmatrix and cp.async follow the PTX ISA and are
//! themselves checked against a GPU by `tests/gpu_mma.rs`), launched exactly as the host plans
//! them (`backei::gpu::backei_v4::plan_v4` through `plan_tensor_cores`) and compared with the CPU
//! engine by `tests/common/layer_check.rs` — forward, every gradient, every switch, D = 1..3,
//! r = 1 and 2, odd shapes and the BackEI shapes of the networks, in each precision mode.
//!
//! Tolerances per mode: `Tolerance::of` in tests/common/layer_check.rs (and docs/gpu.md) says
//! which and why.
mod common;

use backei::gpu::backei_layer::{
    apply_recompute, layer_dims, plan_tensor_cores, DeviceLimits, KernelVersion, LaunchPlan, NeuronParams, WgradPath,
};
use backei::gpu::backei_v4::{V4GradIn, V4Window};
use backei::precision::Precision;
use backei::spec::{LayerSpec, NetworkSpec};
use common::emu::{self, Args, DevBuf};
use common::layer_check::{
    case, compare_within, cpu_reference, err_vs_exact_floor, inputs, odd_shape_cases, smooth, Case, DeviceOut, Inputs, Tolerance,
};

/// A device with few SMs, so that several pixel ranges (blocks) meet at every grid barrier and a
/// block owns several chunks, without emulating 132 blocks of 256 threads.
const SMALL: DeviceLimits = DeviceLimits { sm_count: 3, max_smem_per_block: 232_448, max_smem_per_sm: 233_472 };

thread_local! {
    /// Whether this test thread's emulated v4 modules follow the truncating model of the tensor
    /// cores (cuda_emu.h's EMU_MMA_TRUNCATE) instead of the exact one.
    static TRUNCATING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The defines of the plan's emulated module: its tile's, and EMU_MMA_TRUNCATE where the thread
/// asks for the truncating model.
fn module_defines(v4: &backei::gpu::backei_v4::V4Plan) -> Vec<(String, String)> {
    let mut d = v4.tile_defines();
    if TRUNCATING.with(|t| t.get()) {
        d.push(("EMU_MMA_TRUNCATE".into(), "1".into()));
    }
    d
}

/// One forward and backward of the plan's v4 kernels on the emulator, launched as
/// `gpu::backei_v4::{forward, backward}` launch them: one window over all T, or with the plan's
/// `--recompute` window the forward window by window (keeping v at each window's end) and the
/// backward in reverse, every window but the last recomputed first. v, g, z in the result are what
/// the buffers hold at the end (the whole loop's only without a window).
fn emulate_v4(c: &Case, x: &Inputs, plan: &LaunchPlan, sched: u64) -> DeviceOut {
    emulate_v4_pooling(c, x, plan, sched, (std::ptr::null_mut(), false), None, false)
}

/// [`emulate_v4`] with the forward also writing the 2×2 average pooling of s into `pooled`
/// ([T][B][C][H/2][W/2]; null: none), and with `dy_pooled` the backward reading that pooling's
/// output gradient (and its `V4GradIn`: a dropout between?) instead of `x.grad_out`, as the
/// network's fused pooling launches them. With `own_input` (T_in = T), every launch reads an
/// input buffer that holds its window's steps alone (`V4Window::own_input`), refilled before each
/// window as the network's convolution recomputed per window refills it.
fn emulate_v4_pooling(
    c: &Case,
    x: &Inputs,
    plan: &LaunchPlan,
    sched: u64,
    (pooled, pool_q8): (*mut f32, bool),
    dy_pooled: Option<(&[f32], V4GradIn)>,
    own_input: bool,
) -> DeviceOut {
    let v4 = plan.v4.as_ref().unwrap_or_else(|| panic!("{}: not a v4 plan: {:?}", c.name, plan.fallback));
    // (a plan changed after the layer's planner made its launches would launch with other sizes)
    assert_eq!((plan.forward.smem_bytes, plan.backward.smem_bytes), (v4.smem_bytes, v4.smem_bytes), "{}", c.name);
    let n: usize = c.shape.iter().product();
    let (b, t) = (c.batch, c.steps);
    let bs = plan.buffers;
    let np = NeuronParams::from_config(&c.neuron);
    let m = emu::module_with("backei_v4", &module_defines(v4));
    let mut params = DevBuf::from("params", &x.params);
    let mut grads = DevBuf::from("grads", &x.grads0);
    let mut input = DevBuf::from("input", &x.input);
    let mut gout = DevBuf::from("grad_out", dy_pooled.map_or(&x.grad_out[..], |d| d.0));
    let grad_in_of = dy_pooled.map_or(V4GradIn::default(), |d| d.1);
    let mut gin = DevBuf::new("grad_in", c.t_in * b * n);
    let mut out = DevBuf::new("out", bs.out);
    let mut v = DevBuf::new("v", bs.v);
    let mut g = DevBuf::new("g", bs.g);
    let mut z = DevBuf::new("z", bs.z);
    let mut dv = DevBuf::new("dv", bs.dv);
    let mut fbuf = DevBuf::new("fb", bs.fb);
    let mut dzr = DevBuf::new("dz ring", bs.dz);
    let mut da = DevBuf::new("da", bs.da);
    let mut wfrag = DevBuf::new("wfrag", bs.v4_wfrag);
    let mut winv = DevBuf::new("winv", bs.v4_winv);
    let mut part = DevBuf::new("dw_part", bs.v4_dw_part);
    let mut ckpt = DevBuf::new("v_ckpt", bs.v_ckpt);
    let mut carry = DevBuf::new("db_carry", bs.v4_db_carry);
    let mut rowmax = DevBuf::new("rowmax", bs.v4_rowmax);
    // the grid barrier and the blocks' phase counts (neighbour flags), zeroed before every launch
    let mut bar = vec![0u32; plan.sync_words()];
    let dims = layer_dims(c.shape, &c.fb, b, t, &x.slots, c.t_in, false, false).unwrap();
    let ck = ckpt.ptr();
    let slot = |i: Option<usize>| i.map_or(std::ptr::null_mut(), |i| ck.wrapping_add(i * b * n));
    let windows = V4Window::all(t, plan.window);
    let last = windows.len() - 1;
    let (pp, pi, po, pv, pg, pz) = (params.ptr(), input.ptr(), out.ptr(), v.ptr(), g.ptr(), z.ptr());
    let (pwf, pwi, prm) = (wfrag.ptr(), winv.ptr(), rowmax.ptr());
    let mut launches = 0u64;
    // the input of a window's launches: the whole buffer, or (own_input) a buffer of the window's
    // steps alone, exactly as long (its guards and NaN tail catch a read of another step)
    assert!(!own_input || c.t_in == t, "{}: a window's own input needs T_in = T", c.name);
    let window_input = |win: V4Window| -> (V4Window, *mut f32, Option<DevBuf>) {
        if !own_input {
            return (win, pi, None);
        }
        let bn = b * n;
        let mut buf = DevBuf::from("window input", &x.input[win.t0 as usize * bn..win.t1 as usize * bn]);
        (win.own_input(), buf.ptr(), Some(buf))
    };
    let mut forward = |win: V4Window, ckpt_in: Option<usize>, ckpt_out: Option<usize>, pooled: *mut f32, bar: &mut Vec<u32>| {
        bar.fill(0);
        let (win, pi, window_buf) = window_input(win);
        let mut a = Args::new();
        a.val(pp).val(pi).val(po).val(pv).val(pg).val(pz).val(slot(ckpt_in)).val(slot(ckpt_out)).val(pooled).val(prm);
        a.buf_u32(bar).val(pwf).val(pwi).val(dims).val(np).val(v4.dims).val(win);
        m.launch(&plan.forward, sched + launches, &mut a).unwrap_or_else(|e| panic!("{} forward {win:?}: {e}", c.name));
        launches += 1;
        if let Some(w) = window_buf {
            w.check_guards();
        }
    };
    for (w, &win) in windows.iter().enumerate() {
        let win = V4Window { pool_q8: (pool_q8 && !pooled.is_null()) as i32, ..win };
        forward(win, w.checked_sub(1), (w < last).then_some(w), pooled, &mut bar);
    }
    let (pgr, pgo, pgi, pdv, pfb, pdz, pda, ppart, pcarry) =
        (grads.ptr(), gout.ptr(), gin.ptr(), dv.ptr(), fbuf.ptr(), dzr.ptr(), da.ptr(), part.ptr(), carry.ptr());
    for (w, &win) in windows.iter().enumerate().rev() {
        if w != last {
            forward(win, w.checked_sub(1), None, std::ptr::null_mut(), &mut bar);
        }
        bar.fill(0);
        let (win, pi, window_buf) = window_input(win);
        let mut a = Args::new();
        a.val(pp).val(pgr).val(pi).val(po).val(pv).val(pg).val(pz);
        a.val(pgo).val(grad_in_of).val(pgi).val(pdv).val(pfb).val(pdz).val(pda).val(ppart).val(pcarry).val(prm);
        a.buf_u32(&mut bar).val(pwf).val(pwi).val(dims).val(np).val(v4.dims).val(win);
        m.launch(&plan.backward, sched + 1000 + w as u64, &mut a).unwrap_or_else(|e| panic!("{} backward {win:?}: {e}", c.name));
        if let Some(w) = window_buf {
            w.check_guards();
        }
    }
    for buf in [&params, &grads, &input, &gout, &gin, &out, &v, &g, &z, &dv, &fbuf, &dzr, &da, &wfrag, &winv, &part, &ckpt, &carry, &rowmax]
    {
        buf.check_guards();
    }
    assert_eq!(params.host(), x.params, "{}: the parameters were written", c.name);
    DeviceOut {
        out: out.host(),
        v: v.host(),
        g: c.fb.back.then(|| g.host()),
        z: c.fb.ei.then(|| z.host()),
        gin: gin.host(),
        grads: grads.host(),
    }
}

/// A buffer's bits, for the comparisons that must be exact.
fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

/// Two runs that must agree bit for bit: the spikes, ∂L/∂I and every parameter gradient.
fn assert_same_bits(a: &DeviceOut, b: &DeviceOut, what: &str) {
    assert_eq!(bits(&a.out), bits(&b.out), "{what}: the spikes");
    assert_eq!(bits(&a.gin), bits(&b.gin), "{what}: ∂L/∂I");
    assert_eq!(bits(&a.grads), bits(&b.grads), "{what}: the parameter gradients");
}

fn v4_plan(c: &Case, limits: &DeviceLimits, p: Precision) -> LaunchPlan {
    let plan = plan_tensor_cores(c.shape, &c.fb, c.batch, c.steps, limits, p).unwrap();
    assert_eq!(plan.version, KernelVersion::V4, "{}: fell back: {:?}", c.name, plan.fallback);
    assert_eq!(plan.wgrad, WgradPath::Fused);
    plan
}

/// Runs every case in precision `p`; returns how many compared their weight gradients strictly.
fn run(cases: &[Case], limits: &DeviceLimits, p: Precision) -> usize {
    let mut strict = 0;
    for (i, c) in cases.iter().enumerate() {
        let x = inputs(c, 4150 + i as u64);
        let cpu = cpu_reference(c, &x);
        let plan = v4_plan(c, limits, p);
        let d = emulate_v4(c, &x, &plan, 17 + i as u64);
        let v4 = plan.v4.as_ref().unwrap();
        let label = format!("v4/{p} co_t {} mt {} grid {} smem {}", v4.co_t, v4.mt, v4.grid, v4.smem_bytes);
        strict += compare_within(c, &label, &x, &cpu, &d, Tolerance::of(p)).strict_grads as usize;
    }
    strict
}

/// The fused cases of the shared odd-shape list (back/ei on and off, r = 1 with D = 1, r = 2 with
/// D = 3, T_in = 1 and T, D > T, T = 1); the 1×1 map with r = 0 is v4's to refuse.
fn odd_fused_cases() -> Vec<Case> {
    odd_shape_cases(2).into_iter().filter(|c| c.fb.radius >= 1).collect()
}

#[test]
fn v4_fp32_matches_the_cpu_on_odd_shapes_and_every_switch() {
    let cases = odd_fused_cases();
    let strict = run(&cases, &SMALL, Precision::Fp32);
    assert!(strict * 2 >= cases.len(), "fewer than half of the cases compared their weight gradients strictly");
}

#[test]
fn v4_fp32_gradients_match_in_smooth_mode_beyond_one_chunk_and_one_channel_group() {
    let mut cases = Vec::new();
    for (back, ei) in [(true, true), (true, false), (false, true)] {
        for (r, d, t_in) in [(1, 1, 4), (2, 2, 1)] {
            cases.push(smooth(case(&format!("5×7×9 back {back} ei {ei} r {r} D {d} T_in {t_in}"), [5, 7, 9], back, ei, r, d, 2, 4, t_in)));
        }
    }
    // 40 channels: three 16-channel groups (the last partial) and c_pad 48; 19×21 maps: a sample
    // spans several 256-pixel chunks and a chunk several rows
    cases.push(smooth(case("40×19×21 back+ei r 1 D 1", [40, 19, 21], true, true, 1, 1, 2, 3, 3)));
    cases.push(smooth(case("17×13×11 back+ei r 2 D 3", [17, 13, 11], true, true, 2, 3, 3, 4, 1)));
    // halo rows wider than a warp (W + 2r > 32: the flat staging walk, not the row walk), and
    // rows of 8 and 16 lanes (W + 2r ≤ 8, ≤ 16)
    cases.push(smooth(case("4×5×33 back+ei r 1 D 1", [4, 5, 33], true, true, 1, 1, 2, 3, 3)));
    cases.push(smooth(case("3×6×29 back+ei r 2 D 1", [3, 6, 29], true, true, 2, 1, 2, 3, 3)));
    cases.push(smooth(case("6×5×5 back+ei r 1 D 1", [6, 5, 5], true, true, 1, 1, 2, 3, 3)));
    cases.push(smooth(case("6×9×14 back+ei r 1 D 1", [6, 9, 14], true, true, 1, 1, 2, 3, 3)));
    // both ways of staging the backward's dY: once for the convolution and the weight gradient
    // (one channel group in one slab), and twice (several groups)
    let once = cases.iter().filter(|c| v4_plan(c, &SMALL, Precision::Fp32).v4.as_ref().is_some_and(|v| v.stages_dy_once())).count();
    assert!(once > 0 && once < cases.len(), "{once} of {} cases stage dY once", cases.len());
    assert_eq!(run(&cases, &SMALL, Precision::Fp32), cases.len(), "smooth mode compares every gradient");
}

/// The fp32 mode's sums when the tensor cores cut their terms (cuda_emu.h's truncating model,
/// after Fasi et al. 2021): every GEMM adds the split products of two k-steps in a fresh fragment
/// (the small products of each k-step before its hi·hi) and that fragment to its f32 sum with
/// round-to-nearest (mma.cuh's mma_f16_split_into), so the cut stays relative to two k-steps'
/// products, never to the sum: under the truncating model every tensor stays within 1.5× the f32
/// CPU engine's own error (against the f64 run; the fresh fragments measure 0.3–1.0×, a sum kept
/// in the tensor cores' accumulator 1.0–3.4×, most tensors above 2×), and within the f32
/// tolerance under either model. Shapes: fashion-mnist L1's channels and row length (dY staged
/// once, 9·32-long convolution sums) and one like L2's with 48 channels (432-long sums, three
/// channel groups — SMALL holds three blocks — and slabs of three k-steps: a pair and an odd one),
/// with enough pixels for several chunks.
#[test]
fn v4_fp32_stays_within_the_f32_tolerance_when_the_tensor_cores_truncate() {
    let cases = [
        smooth(case("32×6×28 back+ei r 1 D 1", [32, 6, 28], true, true, 1, 1, 2, 3, 3)),
        smooth(case("48×7×14 back+ei r 1 D 2", [48, 7, 14], true, true, 1, 2, 2, 3, 1)),
    ];
    assert_eq!(run(&cases, &SMALL, Precision::Fp32), cases.len(), "smooth mode compares every gradient");
    TRUNCATING.with(|t| t.set(true));
    for (i, c) in cases.iter().enumerate() {
        let x = inputs(c, 4150 + i as u64);
        let cpu = cpu_reference(c, &x);
        let plan = v4_plan(c, &SMALL, Precision::Fp32);
        let d = emulate_v4(c, &x, &plan, 17 + i as u64);
        assert!(compare_within(c, "v4/fp32, truncating tensor cores", &x, &cpu, &d, Tolerance::of(Precision::Fp32)).strict_grads);
        let floor = Tolerance::of(Precision::Fp32).floor;
        let mut tensors: Vec<(String, &[f32], &[f32], &[f64])> =
            vec![("v".into(), &d.v, &cpu.layer.v, &cpu.exact.v), ("∂I".into(), &d.gin, &cpu.gin, &cpu.exact.gin)];
        for (j, s) in x.slots.iter().enumerate() {
            tensors.push((format!("parameter gradient {j}"), &d.grads[s.clone()], &cpu.grads[s.clone()], &cpu.exact.grads[s.clone()]));
        }
        for (what, dev, c32, c64) in tensors {
            let (e, e32) = (err_vs_exact_floor(dev, c64, floor, |_| true), err_vs_exact_floor(c32, c64, floor, |_| true));
            assert!(
                e <= 1.5 * e32,
                "{}: {what} is {e:.2e} from the f64 run, the f32 CPU engine {e32:.2e}: the sum drifts in the tensor cores",
                c.name
            );
        }
    }
    TRUNCATING.with(|t| t.set(false));
}

/// The largest shared-memory budget (scanned down from SMALL's in 1 KB steps) whose v4 plan for
/// `c` satisfies `want`: a way to reach each placement of the plan on purpose.
fn limits_where(c: &Case, p: Precision, want: impl Fn(&backei::gpu::backei_v4::V4Plan) -> bool) -> DeviceLimits {
    let mut smem = SMALL.max_smem_per_block;
    while smem > 8192 {
        let lim = DeviceLimits { max_smem_per_block: smem, ..SMALL };
        if let Ok(v) = backei::gpu::backei_v4::plan_v4(c.shape, &c.fb, c.batch, c.steps, &lim, p) {
            if want(&v) {
                return lim;
            }
        }
        smem -= 1024;
    }
    panic!("{}: no budget gives the wanted plan", c.name)
}

/// The halo staged in channel slabs (a partial last one), the weights streamed from L2 slab by slab,
/// the weight-gradient accumulators in global memory (L2), each reached by a smaller budget.
#[test]
fn v4_fp32_matches_with_channel_slabs_streamed_weights_and_weight_gradients_in_l2() {
    let c40 = smooth(case("40×9×11 back+ei r 1 D 2", [40, 9, 11], true, true, 1, 2, 2, 3, 3));
    // 80 channels: c_pad 80, so slabs of 64 or 32 leave a partial last slab
    let c80 = smooth(case("80×6×7 back+ei r 1 D 1", [80, 6, 7], true, true, 1, 1, 1, 2, 2));
    // cifar10's widest tile: 64 channels per block (8 n-tiles, 4 weight-gradient m-tiles)
    let c64 = smooth(case("72×5×6 back+ei r 1 D 1", [72, 5, 6], true, true, 1, 1, 2, 2, 2));
    type Want = fn(&backei::gpu::backei_v4::V4Plan) -> bool;
    let placements: [(&Case, &str, Want); 5] = [
        (&c40, "resident weights, slabs, dW in L2", |v| v.dims.w_resident == 1 && v.dims.dw_smem == 0 && v.dims.slab < v.dims.c_pad),
        (&c40, "streamed weights, dW on chip", |v| v.dims.w_resident == 0 && v.dims.dw_smem == 1),
        (&c40, "slabs, streamed weights, dW in L2", |v| v.dims.slab < v.dims.c_pad && v.dims.w_resident == 0 && v.dims.dw_smem == 0),
        (&c80, "a partial last slab", |v| v.dims.c_pad % v.dims.slab != 0),
        (&c64, "64-channel tiles", |v| v.co_t == 64),
    ];
    for (i, (c, what, want)) in placements.into_iter().enumerate() {
        let lim = limits_where(c, Precision::Fp32, want);
        let x = inputs(c, 99 + i as u64);
        let cpu = cpu_reference(c, &x);
        let plan = v4_plan(c, &lim, Precision::Fp32);
        let d = emulate_v4(c, &x, &plan, 5 + i as u64);
        let v4 = plan.v4.as_ref().unwrap();
        let label = format!("v4/fp32 {what}: slab {} of {} co_t {} smem {}", v4.dims.slab, v4.dims.c_pad, v4.co_t, v4.smem_bytes);
        assert!(compare_within(c, &label, &x, &cpu, &d, Tolerance::F32).strict_grads);
    }
}

#[test]
fn v4_tf32_and_bf16_match_the_cpu_within_their_precision() {
    let cases: Vec<Case> = [
        case("6×9×8 back+ei r 1 D 1", [6, 9, 8], true, true, 1, 1, 2, 4, 4),
        case("6×9×8 back r 2 D 2 T_in 1", [6, 9, 8], true, false, 2, 2, 2, 4, 1),
        case("6×9×8 ei r 1", [6, 9, 8], false, true, 1, 1, 2, 4, 4),
        case("33×10×7 back+ei r 1 D 1", [33, 10, 7], true, true, 1, 1, 2, 3, 3),
    ]
    .into_iter()
    .map(smooth)
    .collect();
    for p in [Precision::Tf32, Precision::Bf16] {
        assert_eq!(run(&cases, &SMALL, p), cases.len(), "{p}: smooth mode compares every gradient");
    }
}

#[test]
fn v4_matches_the_cpu_on_the_backei_shapes_of_the_mnist_fashion_and_nmnist_networks() {
    let mut cases = Vec::new();
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::nmnist()] {
        for (i, l) in spec.plan().unwrap().iter().enumerate() {
            if l.spec != LayerSpec::BackEi {
                continue;
            }
            let fb = spec.feedback;
            cases.push(smooth(case(
                &format!("{} layer {i} {:?}", spec.name, l.output),
                l.output,
                fb.back,
                fb.ei,
                fb.radius,
                fb.delay,
                1,
                2,
                2,
            )));
        }
    }
    assert_eq!(run(&cases, &DeviceLimits::H100, Precision::Fp32), cases.len());
}

/// cifar10's BackEI layers (128, 256 and 512 channels: several channel groups, slabs, streamed
/// weights, 64-channel tiles) at batch 1, 2 steps, on an H100's plan. Passed on 2026-12-02 in
/// 805 s on the 2-core development machine: too long for every CI run, so it is run by hand
/// (`cargo test --test emu_v4 -- --ignored`); the same tiling paths run in CI in
/// `v4_fp32_matches_with_channel_slabs_streamed_weights_and_weight_gradients_in_l2`.
#[test]
#[ignore = "13 minutes on the emulator; run by hand with --ignored (the paths it takes run in CI at small shapes)"]
fn v4_matches_the_cpu_on_the_backei_shapes_of_the_cifar10_network() {
    let spec = NetworkSpec::cifar10();
    let mut cases = Vec::new();
    for (i, l) in spec.plan().unwrap().iter().enumerate().filter(|(_, l)| l.spec == LayerSpec::BackEi) {
        let fb = spec.feedback;
        cases.push(smooth(case(&format!("cifar10 layer {i} {:?}", l.output), l.output, fb.back, fb.ei, fb.radius, fb.delay, 1, 2, 2)));
    }
    assert_eq!(run(&cases, &DeviceLimits::H100, Precision::Fp32), cases.len());
}

/// `--recompute K`: the forward in windows of K steps (v kept at each window's end), the backward
/// window by window in reverse with each earlier window recomputed from its checkpoint, gives the
/// very bits of one launch over the whole loop — the spikes, ∂L/∂I and every weight and bias
/// gradient — for K = 1, a K that divides T, one that does not, and K = T − 1; with the weight
/// gradients' accumulators in shared memory and in L2 (dw_part), back and ei on and off, D > K;
/// and so does each window reading an input buffer that holds its own steps alone.
#[test]
fn v4_recompute_windows_give_the_bits_of_the_whole_loop() {
    let c = smooth(case("5×7×9 back+ei r 1 D 2 T 6", [5, 7, 9], true, true, 1, 2, 2, 6, 6));
    let c_back = case("6×5×7 back r 2 D 3 T_in 1 T 5", [6, 5, 7], true, false, 2, 3, 2, 5, 1);
    let c_ei = smooth(case("40×9×11 ei r 1 T 4", [40, 9, 11], false, true, 1, 1, 2, 4, 4));
    let dw_l2 = limits_where(&c, Precision::Fp32, |v| v.dims.dw_smem == 0);
    let runs: [(&Case, DeviceLimits, &[usize]); 4] =
        [(&c, SMALL, &[1, 2, 4, 5]), (&c, dw_l2, &[3]), (&c_back, SMALL, &[1, 2]), (&c_ei, SMALL, &[3])];
    for (i, (c, lim, ks)) in runs.into_iter().enumerate() {
        let x = inputs(c, 770 + i as u64);
        let whole_plan = v4_plan(c, &lim, Precision::Fp32);
        let whole = emulate_v4(c, &x, &whole_plan, 3);
        // the whole loop is itself right (so that equal bits mean right bits)
        let cpu = cpu_reference(c, &x);
        compare_within(c, "v4/fp32 whole loop", &x, &cpu, &whole, Tolerance::F32);
        for &k in ks {
            let mut plan = whole_plan.clone();
            apply_recompute(&mut plan, c.shape, &c.fb, k, c.steps).unwrap();
            assert_eq!(plan.window, Some(k), "{}: K = {k}", c.name);
            let bn = c.batch * c.shape.iter().product::<usize>();
            assert_eq!((plan.buffers.v, plan.buffers.v_ckpt), (k * bn, (c.steps.div_ceil(k) - 1) * bn), "{}: K = {k}", c.name);
            let win = emulate_v4(c, &x, &plan, 40 + k as u64);
            assert_eq!(bits(&win.out), bits(&whole.out), "{}: K = {k}: the spikes", c.name);
            assert_eq!(bits(&win.gin), bits(&whole.gin), "{}: K = {k}: ∂L/∂I", c.name);
            assert_eq!(bits(&win.grads), bits(&whole.grads), "{}: K = {k}: the parameter gradients", c.name);
            // the window buffers end holding the first window: the whole loop's first K steps
            assert_eq!(bits(&win.v), bits(&whole.v[..k * bn]), "{}: K = {k}: v of the first window", c.name);
            // each window reading an input buffer of its own steps alone (the convolution before
            // the layer recomputed per window: memory::conv_output_window) reads the same values
            if c.t_in == c.steps {
                let own = emulate_v4_pooling(c, &x, &plan, 60 + k as u64, (std::ptr::null_mut(), false), None, true);
                assert_eq!(bits(&own.out), bits(&whole.out), "{}: K = {k}, own window input: the spikes", c.name);
                assert_eq!(bits(&own.gin), bits(&whole.gin), "{}: K = {k}, own window input: ∂L/∂I", c.name);
                assert_eq!(bits(&own.grads), bits(&whole.grads), "{}: K = {k}, own window input: the gradients", c.name);
            }
        }
    }
}

/// The compact saved state (`apply_compact`: z as a one-byte code, `V4_ZCODE`, exact firing and
/// the rectangle surrogate; s as int8, `V4_S8`) gives the bits of saving them in f32 — the spikes,
/// v, g, ∂L/∂I and every gradient — and its bytes are the CPU engine's `Neuron::z_code` of the f32
/// run's z and the f32 run's spikes: each alone and both, back+ei and ei alone, a rectangle of
/// width 1 and 0.7, fp32 and bf16 products, with `--recompute` windows.
#[test]
fn v4_compact_state_gives_the_bits_of_saving_it_in_f32() {
    use backei::cpu::neuron::Neuron;
    use backei::gpu::backei_layer::{apply_compact, z_code_is_exact, CompactState};
    use backei::spec::Surrogate;
    let mut narrow = case("5×7×9 back+ei r 1 D 2 T 6 rectangle 0.7", [5, 7, 9], true, true, 1, 2, 2, 6, 6);
    narrow.neuron.surrogate = Surrogate::Rectangle { width: 0.7 };
    let cases = [
        (case("5×7×9 back+ei r 1 D 2 T 6", [5, 7, 9], true, true, 1, 2, 2, 6, 6), None),
        (narrow, Some(4)),
        (case("40×9×11 ei r 1 T 4 T_in 1", [40, 9, 11], false, true, 1, 1, 2, 4, 1), None),
        (case("6×5×7 back r 2 D 3 T 5", [6, 5, 7], true, false, 2, 3, 2, 5, 5), Some(2)),
    ];
    // the first element whose bits differ, not two whole tensors
    let same = |a: &[f32], b: &[f32], what: String| {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        if let Some(e) = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
            panic!("{what}: element {e} is {} compact, {} in f32", a[e], b[e]);
        }
    };
    let bytes = |words: &[f32], n: usize| -> Vec<u8> { words.iter().flat_map(|w| w.to_le_bytes()).take(n).collect() };
    for (i, (c, k)) in cases.iter().enumerate() {
        assert!(z_code_is_exact(&c.neuron), "{}", c.name);
        let x = inputs(c, 880 + i as u64);
        let neuron = Neuron::<f32>::new(&c.neuron);
        for p in [Precision::Fp32, Precision::Bf16] {
            let mut plain = v4_plan(c, &SMALL, p);
            if let Some(k) = *k {
                apply_recompute(&mut plain, c.shape, &c.fb, k, c.steps).unwrap();
            }
            let f = emulate_v4(c, &x, &plain, 5);
            for compact in [CompactState { z: true, s: false }, CompactState { z: false, s: true }, CompactState { z: true, s: true }] {
                let mut plan = plain.clone();
                apply_compact(&mut plan, &c.fb, compact);
                let v4 = plan.v4.as_ref().unwrap();
                assert_eq!((v4.z_code, v4.s8), (compact.z && c.fb.ei, compact.s), "{}", c.name);
                let want_z = if v4.z_code { plain.buffers.z.div_ceil(4) } else { plain.buffers.z };
                assert_eq!(plan.buffers.z, want_z, "{}: a byte per element of z", c.name);
                let want_s = if compact.s { plain.buffers.out.div_ceil(4) } else { plain.buffers.out };
                assert_eq!(plan.buffers.out, want_s, "{}: a byte per spike", c.name);
                let d = emulate_v4(c, &x, &plan, 6);
                let what = format!("{} {p} K {k:?} {compact:?}", c.name);
                if compact.s {
                    // int8 has no −0: a spike sign(z)·0 = −0 in f32 is 0 here (equal values; a
                    // zero's sign never changes a sum that has a non-zero term)
                    let s: Vec<f32> = bytes(&d.out, f.out.len()).iter().map(|&b| b as i8 as f32).collect();
                    let unsigned = |v: &[f32]| v.iter().map(|&x| if x == 0.0 { 0.0 } else { x }).collect::<Vec<f32>>();
                    same(&s, &unsigned(&f.out), format!("{what}: the spikes"));
                } else {
                    same(&d.out, &f.out, format!("{what}: the spikes"));
                }
                same(&d.v, &f.v, format!("{what}: v"));
                same(d.g.as_deref().unwrap_or(&[]), f.g.as_deref().unwrap_or(&[]), format!("{what}: g"));
                same(&d.gin, &f.gin, format!("{what}: ∂L/∂I"));
                same(&d.grads, &f.grads, format!("{what}: the parameter gradients"));
                if v4.z_code {
                    let z = f.z.as_ref().unwrap();
                    let codes = bytes(d.z.as_ref().unwrap(), z.len());
                    let want: Vec<u8> = z.iter().map(|&z| neuron.z_code(z)).collect();
                    if let Some(e) = codes.iter().zip(&want).position(|(a, b)| a != b) {
                        panic!("{what}: element {e}: code {} where Neuron::z_code of z = {} is {}", codes[e], z[e], want[e]);
                    }
                    let kinds: std::collections::BTreeSet<u8> = codes.iter().copied().collect();
                    assert!(kinds.len() >= 3, "{what}: the codes take only the values {kinds:?}: the test would not see a wrong decoder");
                }
            }
            if c.fb.ei {
                assert!(f.out.iter().any(|&s| s < 0.0), "{}: no inhibitory spike: int8 −1 untested", c.name);
            }
        }
    }
}

/// The 2×2 average pooling fused into the v4 forward (`pooled`: the network's pooling layer after
/// a BackEI layer) gives the bits of `cpu::pool::forward` on the layer's spikes (which the rest of
/// the emulator tests compare with the CPU engine), and changes nothing else: odd maps (the floor
/// drops a row and a column), f32 and int8 spikes, `--recompute` windows (each forward window
/// pools its own steps; the backward's recomputing launches write nothing there).
#[test]
fn v4_forward_pools_its_spikes_as_the_pooling_layer_would() {
    use backei::gpu::backei_layer::{apply_compact, CompactState};
    let cases = [
        (case("5×7×9 back+ei r 1 D 2 T 6", [5, 7, 9], true, true, 1, 2, 2, 6, 6), None, false),
        (case("6×8×6 back r 2 D 1 T 5", [6, 8, 6], true, false, 2, 1, 3, 5, 1), Some(2), true),
        (case("16×6×7 ei r 1 T 4", [16, 6, 7], false, true, 1, 1, 2, 4, 4), Some(3), true),
        // 5·16·16 pixels over 3 blocks: each block's items (its 16 channels × the ≥ 26 image rows
        // its range touches × 8 pooled columns) take pool_owned's 4 outputs per thread and pass
        // over more than three passes, the last partly
        (case("8×16×16 back+ei r 1 B 5 T 2", [8, 16, 16], true, true, 1, 1, 5, 2, 2), None, true),
    ];
    for (i, (c, k, s8)) in cases.iter().enumerate() {
        let x = inputs(c, 660 + i as u64);
        let [ch, h, w] = c.shape;
        if i == 3 {
            let plan = v4_plan(c, &SMALL, Precision::Fp32);
            let v4 = plan.v4.as_ref().unwrap();
            let (ranges, pass) = (v4.dims.ranges as usize, 4 * plan.forward.block as usize);
            for r in 0..ranges {
                let (start, end) = (c.batch * h * w * r / ranges, c.batch * h * w * (r + 1) / ranges);
                let items = v4.co_t * ((end - 1) / w - start / w + 1) * (w / 2);
                assert!(items > 3 * pass && !items.is_multiple_of(pass), "{}: range {r}: {items} items, {pass} a pass", c.name);
            }
        }
        let mut plan = v4_plan(c, &SMALL, Precision::Fp32);
        if let Some(k) = *k {
            apply_recompute(&mut plan, c.shape, &c.fb, k, c.steps).unwrap();
        }
        apply_compact(&mut plan, &c.fb, CompactState { z: true, s: *s8 });
        let planes = c.steps * c.batch * ch;
        let outputs = planes * (h / 2) * (w / 2);
        let mut y = DevBuf::new("pooled", outputs);
        let plain = emulate_v4(c, &x, &plan, 8);
        let d = emulate_v4_pooling(c, &x, &plan, 8, (y.ptr(), false), None, false);
        y.check_guards();
        for (name, a, b) in [("s", &d.out, &plain.out), ("∂L/∂I", &d.gin, &plain.gin), ("gradients", &d.grads, &plain.grads)] {
            assert!(bits(a) == bits(b), "{} K {k:?}: {name} changed by pooling", c.name);
        }
        let s: Vec<f32> = if *s8 {
            plain.out.iter().flat_map(|w| w.to_le_bytes()).take(planes * h * w).map(|b| b as i8 as f32).collect()
        } else {
            plain.out.clone()
        };
        let mut want = vec![0f32; y.host().len()];
        backei::cpu::pool::forward(planes, h, w, &s, &mut want);
        assert!(want.iter().any(|&v| v != 0.0), "{}: nothing fired", c.name);
        assert_eq!(bits(&y.host()), bits(&want), "{} K {k:?} s8 {s8}: the pooled spikes", c.name);
        if *s8 {
            // the pooled spikes as int8 codes (`Epilogue::PoolCodes`): c · 1/4 is the f32 output
            let mut q = DevBuf::new("pooled codes", outputs.div_ceil(4));
            let d = emulate_v4_pooling(c, &x, &plan, 8, (q.ptr(), true), None, false);
            q.check_guards();
            assert!(bits(&d.out) == bits(&plain.out), "{}: s changed by pooling into codes", c.name);
            let codes: Vec<f32> = q
                .host()
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .take(outputs)
                .map(|b| b as i8 as f32 * backei::gpu::pool::q8_factor(None))
                .collect();
            assert_eq!(bits(&codes), bits(&want), "{} K {k:?}: the pooled spikes as int8 codes", c.name);
        }
    }
}

/// The v4 backward taking the pooling's output gradient (`backward_from_pooled`: ∂L/∂s through the
/// 2×2 pooling's backward on the fly, never stored; with a dropout between, its mask drawn again)
/// gives the bits of `cpu::pool::backward` (then `cpu::dropout::backward`) then the backward from
/// ∂L/∂s: odd maps (the rows and columns the floor dropped get 0), back+ei, back and ei alone, f32
/// and int8 spikes, `--recompute` windows, a data-parallel shard's mask offset.
#[test]
fn v4_backward_from_the_pooling_gradient_gives_the_bits_of_the_pooling_backward() {
    use backei::cpu::{dropout as cdrop, pool as cpool};
    use backei::gpu::backei_layer::{apply_compact, CompactState};
    let cases = [
        (case("5×7×9 back+ei r 1 D 2 T 6", [5, 7, 9], true, true, 1, 2, 2, 6, 6), None, false),
        (case("6×8×6 back r 2 D 1 T 5 T_in 1", [6, 8, 6], true, false, 2, 1, 3, 5, 1), Some(2), true),
        (case("16×6×7 ei r 1 T 4", [16, 6, 7], false, true, 1, 1, 2, 4, 4), Some(3), true),
        // whole m-tiles of whole channel tiles (for_each_owned_loaded's path without tests): phase
        // 3 reads the pooled gradient there (V4Grad::at_row; odd sizes: the floor's last row and
        // column), phase 2 the slot, and at t ≥ T − D the pooled gradient through the tested path
        (case("16×9×7 back+ei r 1 D 1 T 4", [16, 9, 7], true, true, 1, 1, 2, 4, 4), None, true),
    ];
    for (i, (c, k, s8)) in cases.iter().enumerate() {
        let mut plan = v4_plan(c, &SMALL, Precision::Fp32);
        if let Some(k) = *k {
            apply_recompute(&mut plan, c.shape, &c.fb, k, c.steps).unwrap();
        }
        apply_compact(&mut plan, &c.fb, CompactState { z: true, s: *s8 });
        let [ch, h, w] = c.shape;
        let (steps, len) = (c.steps, c.batch * ch * h * w);
        let planes = steps * c.batch * ch;
        let mut rng = common::Rng(77 + i as u64);
        let dy: Vec<f32> = (0..planes * (h / 2) * (w / 2)).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect();
        let mut pooled = vec![0f32; planes * h * w];
        cpool::backward(planes, h, w, &dy, &mut pooled);
        // no dropout; a dropout (p 0.5) at a shard's offset
        let key = backei::rng::dropout_key(4150, 11, 3);
        let mut keys = vec![3u64, 5, key];
        for (p, index0) in [(None, 0u64), (Some(0.5f32), 4_321)] {
            let mut x = inputs(c, 550 + i as u64);
            let mut gi = V4GradIn { pooled: 1, ..Default::default() };
            x.grad_out = match p {
                None => pooled.clone(),
                Some(p) => {
                    let mut full = vec![0f32; steps * len];
                    cdrop::backward(key, p, len, index0, &pooled, &mut full);
                    (gi.dropout, gi.p, gi.scale, gi.index0) = (1, p, backei::gpu::dropout::scale(p), index0);
                    (gi.keys, gi.slot) = (keys.as_mut_ptr() as u64, 2);
                    full
                }
            };
            let want = emulate_v4(c, &x, &plan, 9);
            let got = emulate_v4_pooling(c, &x, &plan, 9, (std::ptr::null_mut(), false), Some((&dy, gi)), false);
            for (name, a, b) in
                [("∂L/∂I", &got.gin, &want.gin), ("the parameter gradients", &got.grads, &want.grads), ("s", &got.out, &want.out)]
            {
                assert!(bits(a) == bits(b), "{} K {k:?} s8 {s8} dropout {p:?}: {name} differ", c.name);
            }
            assert!(want.grads.iter().any(|&g| g != 0.0), "{}: no gradient", c.name);
        }
    }
}

/// The smooth-mode cases of the GPU test (`tests/gpu_backei_layer.rs::v4_matches_the_cpu_in_tf32_and_bf16`:
/// the same cases, seeds and H100 plan, so the same values) in tf32 and bf16. An H200 run failed
/// one at tf32 (a spike 2.5e-3 off where z sits on tanh's steep part); the emulator gives the very
/// same values, so the kernel does what the emulator does, and the spike's tolerance now carries
/// v's and z's (`Tolerance` in tests/common/layer_check.rs).
#[test]
fn v4_tf32_and_bf16_on_the_gpu_tests_smooth_cases() {
    let cases: Vec<Case> = common::layer_check::smooth_wgrad_cases().into_iter().filter(|c| c.smem_limit.is_none()).collect();
    for p in [Precision::Tf32, Precision::Bf16] {
        assert_eq!(run(&cases, &DeviceLimits::H100, p), cases.len(), "{p}: smooth mode compares every gradient");
    }
}

/// The fp32 mode's scales from row maxima (`cuda/v4/rowmax.cuh`: the writer of v, da and the
/// feedback slot also keeps each (sample, image row)'s largest |x|, and a chunk's scale reads its
/// halo's rows instead of walking the halo) give the bits of walking the halo (`V4_ROWMAX=0`) —
/// the spikes, v, g, z, ∂L/∂I and every gradient: exact and smooth firing, back+ei, ei alone and
/// back alone, D = 1..3, r = 1 and 2, chunks spanning rows and several channel groups (one row's
/// maximum merged from several blocks), halo rows wider than a warp, and `--recompute` windows,
/// whose edges leave dz without maxima (those steps walk).
#[test]
fn v4_scales_from_row_maxima_give_the_bits_of_walking_the_halo() {
    let cases = [
        (smooth(case("5×7×9 back+ei r 1 D 2 T 6", [5, 7, 9], true, true, 1, 2, 2, 6, 6)), &[None, Some(1), Some(4)][..]),
        (case("40×19×21 back+ei r 1 D 1", [40, 19, 21], true, true, 1, 1, 2, 3, 3), &[None, Some(2)]),
        (case("17×13×11 back+ei r 2 D 3 T_in 1", [17, 13, 11], true, true, 2, 3, 3, 4, 1), &[None]),
        (smooth(case("4×5×33 back+ei r 1 D 1", [4, 5, 33], true, true, 1, 1, 2, 3, 3)), &[None]),
        (case("40×9×11 ei r 1 T 4", [40, 9, 11], false, true, 1, 1, 2, 4, 4), &[None]),
        (case("6×5×7 back r 2 D 3 T 5", [6, 5, 7], true, false, 2, 3, 2, 5, 5), &[None, Some(2)]),
    ];
    for (i, (c, ks)) in cases.iter().enumerate() {
        let x = inputs(c, 990 + i as u64);
        assert_eq!(v4_plan(c, &SMALL, Precision::Bf16).buffers.v4_rowmax, 0, "{}: bf16 scales nothing", c.name);
        for &k in *ks {
            let mut plan = v4_plan(c, &SMALL, Precision::Fp32);
            let h = c.shape[1];
            assert_eq!(plan.buffers.v4_rowmax, (c.steps + 2 + 2 * c.fb.delay) * c.batch * h, "{}", c.name);
            if let Some(k) = k {
                apply_recompute(&mut plan, c.shape, &c.fb, k, c.steps).unwrap();
            }
            let mut walk = plan.clone();
            walk.v4.as_mut().unwrap().defines.push(("V4_ROWMAX".to_string(), "0".to_string()));
            let rows = emulate_v4(c, &x, &plan, 8);
            let walked = emulate_v4(c, &x, &walk, 9);
            assert_all_bits(&rows, &walked, &format!("{} K {k:?}", c.name));
            if k.is_none() {
                // and both are right (equal bits of a wrong kernel would prove nothing)
                compare_within(c, "v4/fp32 row maxima", &x, &cpu_reference(c, &x), &rows, Tolerance::F32);
            }
        }
    }
}

/// The backward's bias partial sums kept in `db_carry` between phase 2's epilogues
/// (`V4Plan::carry_bias_sums`, `V4_DB_CARRIED`: what the plan picks for tiles of 64 accumulators
/// per thread) give the bits of keeping them in registers across the loop — the same additions
/// in the same order — with and without `--recompute` windows: a small tile made to carry them,
/// and cifar10's widest tile (mt 2, co_t 64), which carries them by itself, made not to.
#[test]
fn v4_bias_sums_carried_in_memory_give_the_bits_of_registers() {
    let small = smooth(case("5×7×9 back+ei r 1 D 2 T 6", [5, 7, 9], true, true, 1, 2, 2, 6, 6));
    let wide = case("72×5×6 back+ei r 1 D 1 T 3", [72, 5, 6], true, true, 1, 1, 2, 3, 3);
    let wide_lim = limits_where(&wide, Precision::Fp32, |v| v.co_t == 64 && v.mt == 2);
    for (i, (c, lim, ks)) in [(&small, SMALL, &[None, Some(2)][..]), (&wide, wide_lim, &[None, Some(2)])].into_iter().enumerate() {
        let x = inputs(c, 1210 + i as u64);
        for &k in ks {
            let mut plan = v4_plan(c, &lim, Precision::Fp32);
            let v4 = plan.v4.as_ref().unwrap();
            // the plan's own choice: carried in fp32 mode (and for the 64-accumulator tile)
            assert!(v4.db_carry > 0 && v4.carries_bias_sums(), "{}: mt {} co_t {}", c.name, v4.mt, v4.co_t);
            assert_eq!(plan.buffers.v4_db_carry, v4.db_carry, "{}", c.name);
            if let Some(k) = k {
                apply_recompute(&mut plan, c.shape, &c.fb, k, c.steps).unwrap();
            }
            let mut other = plan.clone();
            let o = other.v4.as_mut().unwrap();
            if o.db_carry > 0 {
                o.db_carry = 0;
                o.defines.retain(|(name, _)| name != "V4_DB_CARRIED");
                if k.is_none() {
                    other.buffers.v4_db_carry = 0;
                }
            } else {
                o.carry_bias_sums();
                other.buffers.v4_db_carry = o.db_carry;
            }
            let (a, b) = (emulate_v4(c, &x, &plan, 12), emulate_v4(c, &x, &other, 13));
            assert_same_bits(&a, &b, &format!("{} K {k:?}", c.name));
            if k.is_none() {
                compare_within(c, "v4/fp32 bias sums", &x, &cpu_reference(c, &x), &a, Tolerance::F32);
            }
        }
    }
}

/// dz_t stored once by phase 3 of step t + D in the ring (`V4_DZ_RING`, `V4Plan::stores_dz`) and
/// staged from there by phase 2 gives the bits of forming it on the fly from the feedback slot, v
/// and z per halo element: the same product of the same f32 values. In each precision (the ring
/// exists in every mode; fp32 also forms dz's row maxima from it), exact and smooth, D = 1 and 2,
/// with and without --recompute windows (steps whose t + D lies past the window take the
/// on-the-fly form, which the comparison covers too).
#[test]
fn v4_dz_stored_once_gives_the_bits_of_staging_it_on_the_fly() {
    let exact = case("6×7×9 back+ei r 1 D 2 T 6", [6, 7, 9], true, true, 1, 2, 2, 6, 6);
    let smooth_d1 = smooth(case("5×6×5 back+ei r 1 D 1 T 5", [5, 6, 5], true, true, 1, 1, 2, 5, 5));
    for (i, c) in [&exact, &smooth_d1].into_iter().enumerate() {
        let x = inputs(c, 1310 + i as u64);
        for p in Precision::ALL {
            for k in [None, Some(2)] {
                let mut plan = v4_plan(c, &SMALL, p);
                let v4 = plan.v4.as_ref().unwrap();
                assert!(v4.dz_ring && v4.stores_dz(&c.fb, c.steps), "{}: the plan stores dz", c.name);
                assert_eq!(plan.buffers.dz, c.fb.delay * c.batch * c.shape.iter().product::<usize>(), "{}: the ring", c.name);
                if let Some(k) = k {
                    apply_recompute(&mut plan, c.shape, &c.fb, k, c.steps).unwrap();
                }
                let mut other = plan.clone();
                let o = other.v4.as_mut().unwrap();
                o.dz_ring = false;
                o.defines.retain(|(name, _)| name != "V4_DZ_RING");
                other.buffers.dz = 0;
                let (a, b) = (emulate_v4(c, &x, &plan, 22), emulate_v4(c, &x, &other, 23));
                assert_same_bits(&a, &b, &format!("{} {p} K {k:?}", c.name));
                if k.is_none() {
                    compare_within(c, &format!("v4/{p} dz ring"), &x, &cpu_reference(c, &x), &a, Tolerance::of(p));
                }
            }
        }
    }
}

/// Devices of 8 and 12 SMs: 8 pixel ranges of one channel group, 4 of three, so that most pairs of
/// blocks own no pixels within r rows of each other and neighbour flags let them drift apart.
const EIGHT: DeviceLimits = DeviceLimits { sm_count: 8, ..SMALL };
const TWELVE: DeviceLimits = DeviceLimits { sm_count: 12, ..SMALL };

/// `plan` with the emulator's stalled blocks (EMU_BLOCK_STALLS: each block runs a round with a
/// probability of its own, redrawn every few thousand rounds), and the phases ordered by
/// neighbour flags (`V4_SYNC`) or, with `unordered`, by nothing at all (`V4_SYNC_UNORDERED`).
fn stalled(plan: &LaunchPlan, neighbours: bool, unordered: bool) -> LaunchPlan {
    let mut p = plan.clone();
    let v4 = p.v4.as_mut().unwrap();
    v4.defines.push(("EMU_BLOCK_STALLS".to_string(), "1".to_string()));
    if neighbours {
        v4.order_by_neighbours();
    }
    if unordered {
        v4.defines.push(("V4_SYNC_UNORDERED".to_string(), "1".to_string()));
    }
    p
}

/// Everything a run writes that a stale read could change: the spikes, v, g, z, ∂L/∂I, every
/// gradient, and the fused pooling's outputs.
fn assert_all_bits(a: &DeviceOut, b: &DeviceOut, what: &str) {
    assert_state_bits(a, b, what);
    assert_eq!(bits(&a.grads), bits(&b.grads), "{what}: the parameter gradients");
}

/// The same but the parameter gradients: the spikes, v, g, z and ∂L/∂I.
fn assert_state_bits(a: &DeviceOut, b: &DeviceOut, what: &str) {
    assert_eq!(bits(&a.out), bits(&b.out), "{what}: the spikes");
    assert_eq!(bits(&a.v), bits(&b.v), "{what}: v");
    assert_eq!(a.g.as_deref().map(bits), b.g.as_deref().map(bits), "{what}: g");
    assert_eq!(a.z.as_deref().map(bits), b.z.as_deref().map(bits), "{what}: z");
    assert_eq!(bits(&a.gin), bits(&b.gin), "{what}: ∂L/∂I");
}

/// One run with the forward's fused pooling (f32) into a fresh buffer: the run and the pooled bits.
fn emulate_pooled(c: &Case, x: &Inputs, plan: &LaunchPlan, sched: u64) -> (DeviceOut, Vec<u32>) {
    let [ch, h, w] = c.shape;
    let mut y = DevBuf::new("pooled", c.steps * c.batch * ch * (h / 2) * (w / 2));
    let d = emulate_v4_pooling(c, x, plan, sched, (y.ptr(), false), None, false);
    y.check_guards();
    (d, bits(&y.host()))
}

/// The phases ordered by neighbour flags (`V4Plan::order_by_neighbours`, cuda/v4/sync.cuh: a block
/// waits only for the blocks owning pixels within r rows of its own; the row-max slots zeroed and
/// the pooling done by their owners) give the bits of grid barriers — with the emulator's blocks
/// running at different paces, so that blocks far apart drift by several phases: 8 ranges of a
/// few rows (r = 1: two partners), several channel groups (every group of a partner range),
/// ranges shorter than r rows that span samples (partners beyond the next range), ei and back
/// alone, D = 1..3, each precision, `--recompute` windows, the fused pooling.
#[test]
fn v4_neighbour_flags_give_the_bits_of_grid_barriers_with_blocks_drifting_apart() {
    let cases = [
        (case("6×16×8 back+ei r 1 D 2 T 5", [6, 16, 8], true, true, 1, 2, 2, 5, 5), Precision::Fp32, EIGHT, &[None, Some(2)][..]),
        (case("40×12×6 back+ei r 2 D 1 T 3", [40, 12, 6], true, true, 2, 1, 2, 3, 3), Precision::Fp32, TWELVE, &[None]),
        (smooth(case("5×6×5 back+ei r 2 D 1 T 4 B 3", [5, 6, 5], true, true, 2, 1, 3, 4, 4)), Precision::Tf32, EIGHT, &[None]),
        (case("16×10×6 ei r 1 T 4", [16, 10, 6], false, true, 1, 1, 2, 4, 4), Precision::Fp32, EIGHT, &[None]),
        (case("6×10×7 back r 2 D 3 T 5", [6, 10, 7], true, false, 2, 3, 2, 5, 1), Precision::Bf16, EIGHT, &[None, Some(3)]),
    ];
    for (i, (c, p, lim, ks)) in cases.iter().enumerate() {
        let x = inputs(c, 1410 + i as u64);
        for &k in *ks {
            let mut plan = v4_plan(c, lim, *p);
            let v4 = plan.v4.as_ref().unwrap();
            assert!(v4.dims.ranges >= 4, "{}: groups {} ranges {}", c.name, v4.dims.groups, v4.dims.ranges);
            if let Some(k) = k {
                apply_recompute(&mut plan, c.shape, &c.fb, k, c.steps).unwrap();
            }
            let what = format!("{} {p} K {k:?}", c.name);
            let (grid, grid_pooled) = emulate_pooled(c, &x, &stalled(&plan, false, false), 31 + i as u64);
            let (flags, flags_pooled) = emulate_pooled(c, &x, &stalled(&plan, true, false), 41 + i as u64);
            assert_all_bits(&grid, &flags, &what);
            assert_eq!(grid_pooled, flags_pooled, "{what}: the pooled spikes");
            if k.is_none() {
                compare_within(c, &format!("v4/{p} neighbour flags"), &x, &cpu_reference(c, &x), &flags, Tolerance::of(*p));
            }
        }
    }
}

/// The stalled blocks of the emulator expose a missing wait: the same kernels publishing their
/// phase counts but never waiting (`V4_SYNC_UNORDERED`) read stale halos and slots and give other
/// bits than grid barriers — so the equality above is evidence, not a schedule that happens to
/// keep the blocks in step.
#[test]
fn v4_without_waits_the_stalled_blocks_read_stale_data() {
    let c = case("6×16×8 back+ei r 1 D 2 T 5", [6, 16, 8], true, true, 1, 2, 2, 5, 5);
    let x = inputs(&c, 1410);
    let plan = v4_plan(&c, &EIGHT, Precision::Fp32);
    let grid = emulate_v4(&c, &x, &stalled(&plan, false, false), 31);
    let unordered = emulate_v4(&c, &x, &stalled(&plan, true, true), 41);
    let same = bits(&grid.out) == bits(&unordered.out)
        && bits(&grid.v) == bits(&unordered.v)
        && bits(&grid.gin) == bits(&unordered.gin)
        && bits(&grid.grads) == bits(&unordered.grads);
    assert!(!same, "{}: without waits the drifting blocks gave the bits of grid barriers", c.name);
}

/// Every tile shape the kernel bench sweeps (`BACKEI_BENCH_V4_TILINGS=sweep`: each channel tile
/// and m-tiles per warp with the planner's slab and placement for it), and dW in L2 with two
/// m-tiles, run through the layer's planner with the tiling asked for (`BACKEI_V4_TILING`'s path,
/// `plan_tensor_cores_with`) and match the CPU engine: whatever tiling a GPU run finds fastest
/// computes the layer. 20 channels (c_pad 32: tiles of 32 and 16), a sample over several chunks.
#[test]
fn v4_every_tiling_the_bench_sweeps_matches_the_cpu() {
    use backei::gpu::backei_layer::plan_tensor_cores_with;
    use backei::gpu::backei_v4::{bench_tilings, V4Choices};
    let c = smooth(case("20×17×15 back+ei r 1 D 1", [20, 17, 15], true, true, 1, 1, 2, 3, 3));
    for p in [Precision::Fp32, Precision::Bf16] {
        let list = bench_tilings("sweep; co_t=32,mt=2,dw=l2", c.shape, &c.fb, c.batch, c.steps, &SMALL, p).unwrap();
        let shapes: std::collections::HashSet<(usize, usize)> = list.iter().map(|t| (t.co_t, t.mt)).collect();
        assert_eq!(shapes.len(), 4, "{p}: {list:?}");
        assert!(list.iter().any(|t| !t.dw_on_chip), "{p}: {list:?}");
        let x = inputs(&c, 771);
        let cpu = cpu_reference(&c, &x);
        for (i, t) in list.iter().enumerate() {
            let choices = V4Choices { tiling: Some((*t).into()), ..Default::default() };
            let plan = plan_tensor_cores_with(c.shape, &c.fb, c.batch, c.steps, &SMALL, p, &choices).unwrap();
            assert_eq!(plan.v4.as_ref().unwrap().tiling, *t);
            let d = emulate_v4(&c, &x, &plan, 31 + i as u64);
            assert!(compare_within(&c, &format!("v4/{p} {t}"), &x, &cpu, &d, Tolerance::of(p)).strict_grads || p != Precision::Fp32);
        }
    }
}

/// L2 prefetches of the epilogue inputs and of the next chunk's halo (`BACKEI_V4_PREFETCH=l2`:
/// `V4Plan::prefetch_epilogue_inputs`, cuda/v4/chunks.cuh prefetch_owned_l2, prefetch_next_halo_l2)
/// change no bit, and every prefetch addresses an element of its buffer (the emulator's prefetch
/// faults on a guard element: a run past the end of the last sample's last channel shows):
/// back+ei, back and ei alone, each precision, `--recompute` windows with a window's own input,
/// ∂L/∂s from the pooling's gradient, several chunks per block with a short last chunk, chunks
/// that end a sample (the next one in the next sample).
#[test]
fn v4_l2_prefetches_change_no_bit_and_stay_inside_their_buffers() {
    let cases = [
        (case("5×7×9 back+ei r 1 D 2 T 6", [5, 7, 9], true, true, 1, 2, 2, 6, 6), Precision::Fp32, None, false),
        (case("6×8×6 back r 2 D 1 T 5 T_in 1", [6, 8, 6], true, false, 2, 1, 3, 5, 1), Precision::Bf16, Some(2), false),
        (case("16×6×7 ei r 1 T 4", [16, 6, 7], false, true, 1, 1, 2, 4, 4), Precision::Tf32, Some(3), true),
        (smooth(case("20×17×15 back+ei r 1 D 1", [20, 17, 15], true, true, 1, 1, 2, 3, 3)), Precision::Fp32, None, false),
    ];
    for (i, (c, p, k, own_input)) in cases.iter().enumerate() {
        let mut plan = v4_plan(c, &SMALL, *p);
        if let Some(k) = *k {
            apply_recompute(&mut plan, c.shape, &c.fb, k, c.steps).unwrap();
        }
        let mut with = plan.clone();
        with.v4.as_mut().unwrap().prefetch_epilogue_inputs();
        let x = inputs(c, 1210 + i as u64);
        let what = format!("{} {p} K {k:?}", c.name);
        let run = |pl: &LaunchPlan| emulate_v4_pooling(c, &x, pl, 9, (std::ptr::null_mut(), false), None, *own_input);
        assert_all_bits(&run(&plan), &run(&with), &what);
        if i == 0 {
            // ∂L/∂s through the pooling's backward (V4Grad pooled: its reads are not prefetched)
            let [ch, h, w] = c.shape;
            let mut rng = common::Rng(78);
            let dy: Vec<f32> = (0..c.steps * c.batch * ch * (h / 2) * (w / 2)).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect();
            let gi = V4GradIn { pooled: 1, ..Default::default() };
            let run = |pl: &LaunchPlan| emulate_v4_pooling(c, &x, pl, 9, (std::ptr::null_mut(), false), Some((&dy, gi)), false);
            assert_all_bits(&run(&plan), &run(&with), &format!("{what} pooled"));
        }
    }
}

/// How many of the plan's chunks span samples (`V4Plan::chunks`, the host twin of the kernel's
/// chunk_len).
fn spanning_chunks(c: &Case, plan: &LaunchPlan) -> usize {
    let hw = c.shape[1] * c.shape[2];
    let v4 = plan.v4.as_ref().unwrap();
    v4.chunks(c.shape, c.batch).iter().flatten().filter(|&&(p, len)| p / hw != (p + len - 1) / hw).count()
}

/// Chunks that span samples (`BACKEI_V4_CHUNKS=span`: `V4Plan::span_samples_in`, `V4_CROSS`; the
/// halo staged as one virtual image of the samples' rows with 2r padding rows between them, in
/// planes grown where shared memory allows — maps smaller than a chunk take several samples) match
/// the CPU engine in every precision — and in tf32 and bf16, which scale nothing per chunk, the
/// forward and ∂L/∂I give the bits of chunks that stop at each sample's end (each output's sum is
/// the same; only the weight gradients' per-chunk sums fold in another grouping). r = 1 and 2,
/// back+ei, back and ei alone, T_in 1 and T, D 1 to 3, both halo walks (rows wider than 32
/// columns take the flat walk), a chunk whose halo takes every row of the planes, chunks of three
/// samples and more; with ∂L/∂s
/// through the pooling's backward and a dropout, and with L2 prefetches (inside their buffers) and
/// neighbour flags over drifting blocks, the bits of the plain span run.
#[test]
fn v4_chunks_that_span_samples_match_the_cpu_and_give_the_bits_of_chunks_per_sample() {
    use backei::gpu::backei_layer::plan_tensor_cores_with;
    use backei::gpu::backei_v4::V4Choices;
    let exact = [
        case("16×12×12 back+ei r 1 D 1 B 2", [16, 12, 12], true, true, 1, 1, 2, 4, 4),
        case("6×14×10 back r 2 D 3 B 2 T_in 1", [6, 14, 10], true, false, 2, 3, 2, 5, 1),
        case("20×13×11 ei r 1 B 2", [20, 13, 11], false, true, 1, 1, 2, 3, 3),
        case("5×9×34 back+ei r 1 D 2 B 2 (flat walk)", [5, 9, 34], true, true, 1, 2, 2, 3, 3),
        case("7×5×6 back+ei r 1 D 1 B 9 (several samples per chunk)", [7, 5, 6], true, true, 1, 1, 9, 3, 3),
        case("6×6×5 back r 2 D 2 B 7 T_in 1 (several samples per chunk)", [6, 6, 5], true, false, 2, 2, 7, 4, 1),
    ];
    // the smooth firing mode (no spike can flip): every weight gradient compared strictly
    let cases: Vec<Case> = exact.iter().cloned().chain(exact.iter().cloned().map(smooth)).collect();
    // fp32 mode: sample 1's input 4× sample 0's, its rows' maxima two binades up, so that a
    // spanning chunk's scale depends on both samples' rows (a scale from one sample's would differ)
    let input = |c: &Case, seed: u64, p: Precision| {
        let mut x = inputs(c, seed);
        let n: usize = c.shape.iter().product();
        if p == Precision::Fp32 {
            x.input.chunks_mut(n).enumerate().filter(|(j, _)| j % c.batch == 1).for_each(|(_, s)| s.iter_mut().for_each(|v| *v *= 4.0));
        }
        x
    };
    for (i, c) in cases.iter().enumerate() {
        for p in [Precision::Fp32, Precision::Tf32, Precision::Bf16] {
            let x = input(c, 1610 + i as u64, p);
            let cpu = cpu_reference(c, &x);
            let plan = v4_plan(c, &SMALL, p);
            // through the layer's planner, as BACKEI_V4_CHUNKS=span plans it (the launches' shared
            // memory follows the grown planes)
            let choices = V4Choices { span_samples: true, ..Default::default() };
            let span = plan_tensor_cores_with(c.shape, &c.fb, c.batch, c.steps, &SMALL, p, &choices).unwrap();
            assert!(span.v4.as_ref().unwrap().span_samples);
            assert_eq!(spanning_chunks(c, &plan), 0, "{}", c.name);
            let chunks = span.v4.as_ref().unwrap().chunks(c.shape, c.batch);
            assert!(spanning_chunks(c, &span) > 0, "{} {p}: no chunk spans two samples: {chunks:?}", c.name);
            if c.name.contains("several") {
                let hw = c.shape[1] * c.shape[2];
                let most = chunks.iter().flatten().map(|&(q, len)| (q + len - 1) / hw - q / hw + 1).max();
                assert!(most >= Some(3), "{} {p}: at most {most:?} samples per chunk: {chunks:?}", c.name);
            }
            let got = emulate_v4(c, &x, &span, 51 + i as u64);
            let strict = compare_within(c, &format!("v4/{p} span"), &x, &cpu, &got, Tolerance::of(p)).strict_grads;
            assert!(strict || i < exact.len(), "{} {p}: the weight gradients were not compared", c.name);
            if p == Precision::Fp32 {
                // the scales from the row maxima of both samples' rows give the bits of walking
                // the spanning halo (v4/rowmax.cuh halo_rows_max), with --recompute windows too
                for k in [None, Some(2)].into_iter().take(if i == 0 { 2 } else { 1 }) {
                    let mut rows = span.clone();
                    if let Some(k) = k {
                        apply_recompute(&mut rows, c.shape, &c.fb, k, c.steps).unwrap();
                    }
                    let mut walk = rows.clone();
                    walk.v4.as_mut().unwrap().defines.push(("V4_ROWMAX".to_string(), "0".to_string()));
                    let what = format!("{} span K {k:?}", c.name);
                    let (a, b) = (if k.is_none() { None } else { Some(emulate_v4(c, &x, &rows, 8)) }, emulate_v4(c, &x, &walk, 9));
                    assert_all_bits(a.as_ref().unwrap_or(&got), &b, &format!("{what}: row maxima vs the walk"));
                }
            } else {
                let per_sample = emulate_v4(c, &x, &plan, 51 + i as u64);
                assert_state_bits(&got, &per_sample, &format!("{} {p}", c.name));
            }
            if (i == 0 || i == 4) && p != Precision::Tf32 {
                // (two samples per chunk, and several)
                // ∂L/∂s through the pooling's backward with a dropout (V4Grad::at past the sample)
                use backei::cpu::{dropout as cdrop, pool as cpool};
                let [ch, h, w] = c.shape;
                let planes = c.steps * c.batch * ch;
                let mut rng = common::Rng(79);
                let dy: Vec<f32> = (0..planes * (h / 2) * (w / 2)).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect();
                let mut pooled = vec![0f32; planes * h * w];
                cpool::backward(planes, h, w, &dy, &mut pooled);
                let key = backei::rng::dropout_key(4150, 12, 3);
                let mut keys = vec![3u64, 5, key];
                let len = c.batch * ch * h * w;
                let mut xd = input(c, 1610 + i as u64, p);
                let mut full = vec![0f32; c.steps * len];
                cdrop::backward(key, 0.5, len, 777, &pooled, &mut full);
                xd.grad_out = full;
                let gi = V4GradIn {
                    pooled: 1,
                    dropout: 1,
                    p: 0.5,
                    scale: backei::gpu::dropout::scale(0.5),
                    index0: 777,
                    keys: keys.as_mut_ptr() as u64,
                    slot: 2,
                    _pad: 0,
                };
                let want = emulate_v4(c, &xd, &span, 9);
                let got = emulate_v4_pooling(c, &xd, &span, 9, (std::ptr::null_mut(), false), Some((&dy, gi)), false);
                assert_same_bits(&got, &want, &format!("{} {p} span, pooled gradient with dropout", c.name));
                // prefetches and neighbour flags change no bit
                let mut flagged = stalled(&span, true, false);
                flagged.v4.as_mut().unwrap().prefetch_epilogue_inputs();
                assert_all_bits(
                    &emulate_v4(c, &x, &flagged, 61),
                    &emulate_v4(c, &x, &span, 62),
                    &format!("{} {p} span + flags + pf", c.name),
                );
            }
        }
    }
}
