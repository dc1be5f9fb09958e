//! The CUDA kernels, run on the CPU by the emulator of `tests/emu/cuda_emu.h` (see
//! `tests/common/emu.rs`): CI has no GPU, so this is where the kernels' own code — index
//! arithmetic, tiling, shared-memory staging, barriers, shuffles, atomics, the cooperative
//! kernels' grid barrier — is executed and compared with the CPU engine on every commit. The
//! same comparisons run on a real GPU in the `gpu_*` tests.
mod common;

use common::emu::{self, Args, DevBuf};

#[test]
fn every_module_translates_and_compiles_for_the_emulator() {
    for m in backei::gpu::kernels::module_names() {
        let em = emu::module(m);
        assert!(!em.kernels.is_empty(), "{m}: no kernels found");
    }
}

#[test]
fn rng_twin_is_bit_exact_and_fill_writes_every_element() {
    let m = emu::module("smoke");
    let n = 1000usize;
    let mut y = vec![0f32; n];
    let (key, t) = (0x1234_5678_9abc_def0u64, 7u32);
    m.launch_raw("rng_uniform24", (4, 1, 1), (256, 1, 1), 0, false, 1, Args::new().buf_mut(&mut y).val(key).val(t).val(n as i32)).unwrap();
    for (i, &x) in y.iter().enumerate() {
        assert_eq!(x.to_bits(), backei::rng::uniform24(key, t, i as u64).to_bits(), "element {i}");
    }
    m.launch_raw("fill_f32", (4, 1, 1), (256, 1, 1), 0, false, 2, Args::new().buf_mut(&mut y).val(2.5f32).val(n as i32)).unwrap();
    assert!(y.iter().all(|&x| x == 2.5));
}

// ---- the BackEI layer: v1 and v2 kernels, run as the host plan launches them ------------------------

use backei::gpu::backei_layer::{
    layer_dims, plan_deterministic, plan_version, DeviceLimits, KernelVersion, LaunchPlan, LayerPath, NeuronParams, WgradPath,
};
use backei::spec::{LayerSpec, NetworkSpec};
use common::layer_check::{
    case, compare, cpu_reference, inputs, odd_shape_cases, plain_cases, smooth, smooth_wgrad_cases, Case, DeviceOut,
};

/// The case on the emulated device, launched exactly as `GpuBackEiLayer::forward`/`backward`
/// launch it: the host plan's kernels, grids, blocks, shared memory and `LayerDims`.
fn emulate(c: &Case, seed: u64, plan: &LaunchPlan) -> common::layer_check::Outcome {
    let x = inputs(c, seed);
    let cpu = cpu_reference(c, &x);
    let d = emulate_on(c, &x, plan, seed ^ 0x5eed);
    let label = format!("emulated {:?} {:?}/{:?} grid {:?}", plan.version, plan.path, plan.wgrad, plan.forward.grid);
    compare(c, &label, &x, &cpu, &d)
}

/// The launches of one forward and backward on the emulator; `sched` seeds the block and thread
/// order.
fn emulate_on(c: &Case, x: &common::layer_check::Inputs, plan: &LaunchPlan, sched: u64) -> DeviceOut {
    let n: usize = c.shape.iter().product();
    let (b, t) = (c.batch, c.steps);
    let bs = plan.buffers;
    let np = NeuronParams::from_config(&c.neuron);
    let m = emu::module(plan.forward.module);
    let mut params = DevBuf::from("params", &x.params);
    let mut grads = DevBuf::from("grads", &x.grads0);
    let mut input = DevBuf::from("input", &x.input);
    let mut gout = DevBuf::from("grad_out", &x.grad_out);
    let mut gin = DevBuf::new("grad_in", c.t_in * b * n);
    let mut out = DevBuf::new("out", bs.out);
    let mut v = DevBuf::new("v", bs.v);
    let mut g = DevBuf::new("g", bs.g);
    let mut z = DevBuf::new("z", bs.z);
    let mut dv = DevBuf::new("dv", bs.dv);
    let mut fbuf = DevBuf::new("fb", bs.fb);
    let mut dz = DevBuf::new("dz", bs.dz);
    let mut da = DevBuf::new("da", bs.da);
    let mut bar = vec![0u32; 1];
    let mut partials = DevBuf::new("wg_partials", bs.wg_partials);
    let mut staged = DevBuf::new("staged_weights", bs.staged_weights);
    let onchip = plan.wgrad == WgradPath::OnChip;
    match plan.path {
        LayerPath::Plain => {
            let (nn, tt, ti) = ((b * n) as i64, t as i32, c.t_in as i32);
            let mut a = Args::new();
            a.val(input.ptr()).val(out.ptr()).val(v.ptr()).val(nn).val(tt).val(ti).val(np);
            m.launch(&plan.forward, sched, &mut a).unwrap();
            let mut a = Args::new();
            a.val(gout.ptr()).val(v.ptr()).val(gin.ptr()).val(nn).val(tt).val(ti).val(np);
            m.launch(&plan.backward, sched + 1, &mut a).unwrap();
        }
        LayerPath::Fused => {
            let v2 = plan.version.is_tiled();
            let fwd_dims = layer_dims(c.shape, &c.fb, b, t, &x.slots, c.t_in, plan.weights_in_smem_forward, onchip).unwrap();
            let mut a = Args::new();
            a.val(params.ptr()).val(input.ptr()).val(out.ptr()).val(v.ptr()).val(g.ptr()).val(z.ptr());
            if v2 {
                a.buf_u32(&mut bar).val(staged.ptr());
            }
            a.val(fwd_dims).val(np);
            if v2 {
                a.val(plan.tile.expect("v2 tiling"));
            }
            m.launch(&plan.forward, sched, &mut a).unwrap();
            let bwd_dims = if v2 {
                layer_dims(c.shape, &c.fb, b, t, &x.slots, c.t_in, false, false).unwrap()
            } else {
                layer_dims(c.shape, &c.fb, b, t, &x.slots, c.t_in, plan.weights_in_smem_backward, onchip).unwrap()
            };
            bar[0] = 0;
            let mut a = Args::new();
            a.val(params.ptr()).val(grads.ptr()).val(input.ptr()).val(out.ptr()).val(v.ptr()).val(g.ptr()).val(z.ptr());
            a.val(gout.ptr()).val(gin.ptr()).val(dv.ptr()).val(fbuf.ptr()).val(dz.ptr()).val(da.ptr());
            if v2 {
                a.buf_u32(&mut bar).val(staged.ptr());
            }
            a.val(bwd_dims).val(np);
            if v2 {
                a.val(plan.tile.expect("v2 tiling"));
            }
            m.launch(&plan.backward, sched + 1, &mut a).unwrap();
            if let Some(w) = plan.wgrad_launch {
                let passes = [
                    (c.fb.back, x.slots[0].start, x.slots[1].start, da.ptr(), out.ptr(), c.fb.delay as i32),
                    (c.fb.ei, x.slots[2].start, x.slots[3].start, dz.ptr(), v.ptr(), 0),
                ];
                for (on, ow, ob, dy, xx, shift) in passes {
                    if !on {
                        continue;
                    }
                    let mut a = Args::new();
                    a.val(grads.ptr()).val(ow as i64).val(ob as i64).val(dy).val(xx).val(shift).val(bwd_dims);
                    if v2 {
                        a.val(plan.tile.expect("v2 tiling"));
                        a.val(if plan.wgrad_reduce.is_some() { partials.ptr() } else { std::ptr::null_mut() });
                    }
                    m.launch(&w, sched + 2, &mut a).unwrap();
                    if let Some(r) = plan.wgrad_reduce {
                        let k = 2 * c.fb.radius + 1;
                        let wlen = (c.shape[0] * c.shape[0] * k * k) as i64;
                        let mut a = Args::new();
                        a.val(grads.ptr()).val(ow as i64).val(ob as i64).val(partials.ptr()).val(plan.tile.unwrap().wg_split);
                        a.val(wlen).val(c.shape[0] as i32);
                        m.launch(&r, sched + 3, &mut a).unwrap();
                    }
                }
            }
        }
    }
    for buf in [&params, &grads, &input, &gout, &gin, &out, &v, &g, &z, &dv, &fbuf, &dz, &da, &partials, &staged] {
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

/// A small device: the v2 grid is then smaller than its jobs, so every block loops over several
/// tiles (the persistent path), and several blocks meet at every grid barrier.
const SMALL: DeviceLimits = DeviceLimits { sm_count: 2, max_smem_per_block: 232_448, max_smem_per_sm: 233_472 };

fn plans(c: &Case, limits: DeviceLimits) -> Vec<LaunchPlan> {
    let lim = match c.smem_limit {
        Some(s) => DeviceLimits { max_smem_per_block: s, ..limits },
        None => limits,
    };
    let v1 = plan_version(c.shape, &c.fb, c.batch, c.steps, &lim, KernelVersion::V1).unwrap();
    assert_eq!(v1.path, c.want_path, "{}", c.name);
    if let Some(w) = c.want_wgrad {
        assert_eq!(v1.wgrad, w, "{}", c.name);
    }
    let mut ps = vec![v1];
    if c.want_path == LayerPath::Fused {
        for version in [KernelVersion::V2, KernelVersion::V3] {
            let p = plan_version(c.shape, &c.fb, c.batch, c.steps, &limits, version).unwrap();
            if c.fb.radius == 1 || c.fb.radius == 2 {
                assert_eq!(p.version, version, "{}: {version:?} fell back: {:?}", c.name, p.fallback);
            }
            ps.push(p);
        }
        // --deterministic: v1 with the separate (atomic-free) weight-gradient reduction; v2/v3 with
        // partial sums reduced in order
        for version in [KernelVersion::V1, KernelVersion::V2, KernelVersion::V3] {
            ps.push(plan_deterministic(c.shape, &c.fb, c.batch, c.steps, &limits, version).unwrap());
        }
    }
    ps
}

fn run_all(cases: &[Case], limits: DeviceLimits) {
    let mut strict = 0;
    let mut runs = 0;
    for (i, c) in cases.iter().enumerate() {
        for p in plans(c, limits) {
            let o = emulate(c, 4150 + i as u64, &p);
            strict += o.strict_grads as usize;
            runs += 1;
        }
    }
    assert!(strict * 2 >= runs, "fewer than half of the runs compared their weight gradients strictly");
}

#[test]
fn emulated_fused_layer_matches_the_cpu_on_odd_shapes_and_every_switch() {
    run_all(&odd_shape_cases(2), SMALL);
}

#[test]
fn emulated_fused_layer_gradients_match_in_smooth_mode_on_every_weight_gradient_path() {
    let mut cases = smooth_wgrad_cases();
    // more channels than one v2 channel tile (16) and input chunk (8), more rows than one row group
    cases.push(smooth(case("19×40×37 back+ei r 1 B 2", [19, 40, 37], true, true, 1, 1, 2, 3, 3)));
    run_all(&cases, SMALL);
}

#[test]
fn emulated_plain_layer_matches_the_cpu() {
    run_all(&plain_cases(), DeviceLimits::H100);
}

#[test]
fn emulated_backei_shapes_of_the_mnist_fashion_and_nmnist_networks_match_the_cpu() {
    let mut cases = Vec::new();
    for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::nmnist()] {
        for (i, l) in spec.plan().unwrap().iter().enumerate() {
            if l.spec != LayerSpec::BackEi {
                continue;
            }
            let fb = spec.feedback;
            let c = case(&format!("{} layer {i} {:?}", spec.name, l.output), l.output, fb.back, fb.ei, fb.radius, fb.delay, 1, 2, 2);
            cases.push(smooth(c));
        }
    }
    run_all(&cases, DeviceLimits::H100);
}

// ---- dropout: the masks are the CPU engine's, element for element ----------------------------------

#[test]
fn emulated_dropout_draws_the_cpu_masks_and_backward_matches() {
    let m = emu::module("dropout");
    let (len, steps, p) = (1237usize, 3usize, 0.5f32);
    let key = backei::rng::dropout_key(4150, 17, 2);
    let mut rng = common::Rng(9);
    let x: Vec<f32> = rng.vec(steps * len, -1.0, 1.0).into_iter().map(|v| v as f32).collect();
    let sc = backei::gpu::dropout::scale(p);
    // i0 > 0: a data-parallel rank's shard, drawing the masks of its place in the global batch
    for (t_in, i0) in [(1usize, 0u64), (steps, 0), (1, 5 * 1237), (steps, 3 * 1237)] {
        // CPU: T_in = 1 is the frame broadcast to every step first
        let xb: Vec<f32> = (0..steps * len).map(|j| x[if t_in == 1 { j % len } else { j }]).collect();
        let mut y = vec![0f32; steps * len];
        backei::cpu::dropout::forward(key, p, len, i0, &xb, &mut y);
        let mut yd = DevBuf::new("y", steps * len);
        let mut xd = DevBuf::from("x", &x[..t_in * len]);
        // the key from device memory: the second slot of a table
        let mut keys = vec![0u64, key, 0];
        // forward and backward take the same arguments: (source, destination, keys, slot, i0, p, 1/(1-p), len, T, T_in)
        let mut args = |src: *mut f32, dst: *mut f32| {
            let mut a = Args::new();
            a.val(src).val(dst).val(keys.as_mut_ptr()).val(1i32).val(i0).val(p).val(sc).val(len as i64).val(steps as i32).val(t_in as i32);
            a
        };
        let mut a = args(xd.ptr(), yd.ptr());
        m.launch_raw("dropout_forward_f32", (3, 1, 1), (256, 1, 1), 0, false, 5, &mut a).unwrap();
        yd.check_guards();
        assert_eq!(yd.host(), y, "T_in {t_in}, i0 {i0}: forward differs from the CPU");
        // backward: the mask drawn again; T_in = 1 sums over the steps
        let dy: Vec<f32> = rng.vec(steps * len, -1.0, 1.0).into_iter().map(|v| v as f32).collect();
        let mut dx = vec![0f32; steps * len];
        backei::cpu::dropout::backward(key, p, len, i0, &dy, &mut dx);
        let want: Vec<f32> = if t_in == 1 { (0..len).map(|i| (0..steps).fold(0f32, |acc, t| acc + dx[t * len + i])).collect() } else { dx };
        let mut dyd = DevBuf::from("dy", &dy);
        let mut dxd = DevBuf::new("dx", t_in * len);
        let mut a = args(dyd.ptr(), dxd.ptr());
        m.launch_raw("dropout_backward_f32", (2, 1, 1), (128, 1, 1), 0, false, 6, &mut a).unwrap();
        dxd.check_guards();
        assert_eq!(dxd.host(), want, "T_in {t_in}, i0 {i0}: backward differs from the CPU");
    }
    // a shard's masks are the slice of the whole batch's masks at its place
    let (b, per) = (6usize, 97usize);
    let ones = vec![1f32; b * per];
    let mut whole = vec![0f32; b * per];
    backei::cpu::dropout::forward(key, p, b * per, 0, &ones, &mut whole);
    let mut part = vec![0f32; 2 * per];
    backei::cpu::dropout::forward(key, p, 2 * per, (4 * per) as u64, &ones[..2 * per], &mut part);
    assert_eq!(part, whole[4 * per..], "samples 4 and 5 of the batch");
}

// ---- the spike statistics: warp shuffles, a static shared array, one atomic per block ---------------

#[test]
fn emulated_spike_counts_equal_a_plain_count() {
    let m = emu::module("spiking");
    let mut rng = common::Rng(3);
    let n = 5003usize;
    let s: Vec<f32> = (0..n).map(|_| [-1.0f32, 0.0, 0.0, 1.0][rng.below(4)]).collect();
    let mut counts = [0u64; 2];
    let mut sd = DevBuf::from("s", &s);
    let mut a = Args::new();
    a.val(sd.ptr()).val(n as i64).val(counts.as_mut_ptr());
    m.launch_raw("spike_counts_f32", (3, 1, 1), (256, 1, 1), 0, false, 11, &mut a).unwrap();
    let fired = s.iter().filter(|&&x| x != 0.0).count() as u64;
    let inh = s.iter().filter(|&&x| x < 0.0).count() as u64;
    assert_eq!(counts, [fired, inh]);
}

/// The readers of a v4 BackEI layer's int8 spikes (`V4_S8`): pooling, dropout+pooling (training
/// and evaluation) and the spike statistics give the bits of their f32 kernels on the same spikes.
/// The pooling kernels writing the pooled spikes as int8 codes (`_s8_q8`: what only the
/// tensor-core GEMMs read, `memory::pooled_as_codes`) give codes c — the sums of the (kept) spikes,
/// every one of −4..4 present — whose c · `pool::q8_factor` is the f32 kernel's output bit for bit:
/// plain pooling (1/4), dropout+pooling in training (scale/4, scale 2) and in evaluation (1/4).
#[test]
fn emulated_int8_spike_readers_give_the_bits_of_their_f32_kernels() {
    use backei::gpu::pool::q8_factor;
    let (pm, dm, sm) = (emu::module("pool"), emu::module("dropout"), emu::module("spiking"));
    let mut rng = common::Rng(29);
    let (steps, planes, h, w) = (3usize, 6usize, 9usize, 8usize);
    let n = steps * planes * h * w;
    let mut s8: Vec<i8> = (0..n).map(|_| [-1i8, -1, 0, 1, 1][rng.below(5)]).collect();
    let s: Vec<f32> = s8.iter().map(|&x| x as f32).collect();
    let out_len = steps * planes * (h / 2) * (w / 2);
    let decode = |codes: &[f32], factor: f32, all: bool| -> Vec<f32> {
        let c: Vec<i8> = codes.iter().flat_map(|w| w.to_le_bytes()).take(out_len).map(|b| b as i8).collect();
        assert!(!all || (-4..=4).all(|k| c.contains(&k)), "not every code −4..4 occurs: {:?}", &c[..16]);
        c.iter().map(|&k| k as f32 * factor).collect()
    };
    // (codes: y as int8 codes in ⌈out_len/4⌉ words)
    let run_pool = |kernel: &str, x: *mut std::ffi::c_void, codes: bool| {
        let mut y = DevBuf::new("y", if codes { out_len.div_ceil(4) } else { out_len });
        let mut a = Args::new();
        a.val(x).val(y.ptr()).val((steps * planes) as i64).val(h as i32).val(w as i32);
        pm.launch_raw(kernel, (2, 1, 1), (64, 1, 1), 0, false, 1, &mut a).unwrap();
        y.check_guards();
        y.host()
    };
    let mut sf = DevBuf::from("s", &s);
    let want = run_pool("avgpool2_forward_f32", sf.ptr().cast(), false);
    assert!(want.iter().any(|&y| y < 0.0) && want.iter().any(|&y| y > 0.0));
    assert_eq!(bits(&run_pool("avgpool2_forward_s8", s8.as_mut_ptr().cast(), false)), bits(&want), "pooling");
    let codes = run_pool("avgpool2_forward_s8_q8", s8.as_mut_ptr().cast(), true);
    assert_eq!(bits(&decode(&codes, q8_factor(None), true)), bits(&want), "pooling into codes");
    let key = backei::rng::dropout_key(4150, 3, 1);
    let p = 0.5f32;
    let sc = backei::gpu::dropout::scale(p);
    for train in [true, false] {
        let run = |kernel: &str, x: *mut std::ffi::c_void, codes: bool| {
            let mut keys = vec![7u64, key];
            let mut y = DevBuf::new("y", if codes { out_len.div_ceil(4) } else { out_len });
            let mut a = Args::new();
            a.val(x).val(y.ptr()).val(keys.as_mut_ptr()).val(1i32).val(99u64).val(train as i32).val(p).val(sc);
            a.val(planes as i64).val(steps as i32).val(h as i32).val(w as i32);
            dm.launch_raw(kernel, (3, 1, 1), (32, 1, 1), 0, false, 2, &mut a).unwrap();
            y.check_guards();
            y.host()
        };
        let want = run("dropout_avgpool2_forward_f32", sf.ptr().cast(), false);
        let s8_ptr = s8.as_mut_ptr().cast();
        assert_eq!(bits(&run("dropout_avgpool2_forward_s8", s8_ptr, false)), bits(&want), "dropout+pooling, training {train}");
        let codes = run("dropout_avgpool2_forward_s8_q8", s8_ptr, true);
        let got = decode(&codes, q8_factor(train.then_some(sc)), !train);
        assert_eq!(bits(&got), bits(&want), "dropout+pooling into codes, training {train}");
    }
    let count = |kernel: &str, x: *mut std::ffi::c_void| {
        let mut counts = [0u64; 2];
        let mut a = Args::new();
        a.val(x).val(n as i64).val(counts.as_mut_ptr());
        sm.launch_raw(kernel, (3, 1, 1), (256, 1, 1), 0, false, 11, &mut a).unwrap();
        counts
    };
    let want = [s8.iter().filter(|&&x| x != 0).count() as u64, s8.iter().filter(|&&x| x < 0).count() as u64];
    assert_eq!(count("spike_counts_f32", sf.ptr().cast()), want);
    assert_eq!(count("spike_counts_s8", s8.as_mut_ptr().cast()), want);
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

// ---- --deterministic: the same bits whatever order the blocks run in ---------------------------------

/// (The default plans do not: their float atomicAdds land in the order the blocks finish, and the
/// emulator, which shuffles that order, gives other last bits for another seed.)
#[test]
fn emulated_deterministic_plans_give_the_same_bits_under_any_block_order() {
    // a shape whose weight gradient is split over several blocks per (c, ci) group
    let c = smooth(case("9×12×10 back+ei r 1 B 3", [9, 12, 10], true, true, 1, 1, 3, 4, 4));
    let x = inputs(&c, 77);
    for version in [KernelVersion::V1, KernelVersion::V2, KernelVersion::V3] {
        let p = plan_deterministic(c.shape, &c.fb, c.batch, c.steps, &SMALL, version).unwrap();
        if version != KernelVersion::V1 {
            assert!(p.tile.unwrap().wg_split > 1 && p.wgrad_reduce.is_some(), "{version:?}: {p:?}");
        }
        let a = emulate_on(&c, &x, &p, 1);
        for sched in [2, 3] {
            let b = emulate_on(&c, &x, &p, sched);
            let differ = |x: &[f32], y: &[f32]| x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
            assert_eq!(differ(&a.grads, &b.grads), 0, "{version:?}: gradient elements differ between block orders");
            assert_eq!(differ(&a.gin, &b.gin), 0, "{version:?}: ∂I elements differ between block orders");
            assert_eq!(differ(&a.out, &b.out), 0, "{version:?}: outputs differ between block orders");
        }
    }
}

/// More channels than the largest channel tile (64) and the weight gradient's 16-channel groups:
/// several channel groups per sample, a partial last group, C·C·k² weights far beyond a block
/// (the v1 kernels, one weight-gradient block per (c, ci) pair, are too slow to emulate here).
#[test]
fn emulated_tiled_kernels_match_the_cpu_beyond_one_channel_group() {
    let c = smooth(case("130×6×5 back+ei r 1 B 1 smooth", [130, 6, 5], true, true, 1, 1, 1, 2, 2));
    let mut runs = 0;
    for version in [KernelVersion::V2, KernelVersion::V3] {
        let p = plan_version(c.shape, &c.fb, c.batch, c.steps, &SMALL, version).unwrap();
        assert_eq!(p.version, version, "{:?}", p.fallback);
        assert!(p.tile.unwrap().ch_groups >= 3, "{p:?}");
        let d = plan_deterministic(c.shape, &c.fb, c.batch, c.steps, &SMALL, version).unwrap();
        for plan in [p, d] {
            let o = emulate(&c, 4242, &plan);
            assert!(o.strict_grads);
            runs += 1;
        }
    }
    assert_eq!(runs, 4);
}

// ---- pooling, readout and the losses: the CPU engine's values ---------------------------------------

fn host_vec(rng: &mut common::Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    rng.vec(n, lo, hi).into_iter().map(|v| v as f32).collect()
}

#[test]
fn emulated_pooling_matches_the_cpu_on_odd_maps() {
    let m = emu::module("pool");
    let mut rng = common::Rng(21);
    for (planes, h, w) in [(6usize, 7usize, 5usize), (3, 28, 28), (1, 2, 3)] {
        let (ho, wo) = (h / 2, w / 2);
        let x = host_vec(&mut rng, planes * h * w, -1.0, 1.0);
        let mut y = vec![0f32; planes * ho * wo];
        backei::cpu::pool::forward(1, h, w, &x, &mut y);
        let (mut xd, mut yd) = (DevBuf::from("x", &x), DevBuf::new("y", y.len()));
        let mut a = Args::new();
        a.val(xd.ptr()).val(yd.ptr()).val(planes as i64).val(h as i32).val(w as i32);
        m.launch_raw("avgpool2_forward_f32", (2, 1, 1), (64, 1, 1), 0, false, 1, &mut a).unwrap();
        yd.check_guards();
        assert_eq!(yd.host(), y, "{planes}×{h}×{w}: forward");
        let dy = host_vec(&mut rng, y.len(), -1.0, 1.0);
        let mut dx = vec![0f32; x.len()];
        backei::cpu::pool::backward(1, h, w, &dy, &mut dx);
        let (mut dyd, mut dxd) = (DevBuf::from("dy", &dy), DevBuf::new("dx", dx.len()));
        let mut a = Args::new();
        a.val(dyd.ptr()).val(dxd.ptr()).val(planes as i64).val(h as i32).val(w as i32);
        m.launch_raw("avgpool2_backward_f32", (3, 1, 1), (32, 1, 1), 0, false, 2, &mut a).unwrap();
        dxd.check_guards();
        assert_eq!(dxd.host(), dx, "{planes}×{h}×{w}: backward (every input written, the dropped rows 0)");
    }
}

#[test]
fn emulated_readout_and_losses_match_the_cpu() {
    use backei::cpu::loss::{self, Loss};
    let m = emu::module("loss");
    let mut rng = common::Rng(5);
    let (t, batch, classes) = (4usize, 7usize, 10usize);
    let bk = batch * classes;
    let s: Vec<f32> = (0..t * bk).map(|_| [0.0f32, 1.0, -1.0, 0.0][rng.below(4)]).collect();
    let mut y = vec![0f32; bk];
    loss::readout(&s, t, batch, classes, &mut y);
    let (mut sd, mut yd) = (DevBuf::from("s", &s), DevBuf::new("y", bk));
    let mut a = Args::new();
    a.val(sd.ptr()).val(yd.ptr()).val(t as i32).val(bk as i32);
    m.launch_raw("readout_f32", (1, 1, 1), (128, 1, 1), 0, false, 3, &mut a).unwrap();
    yd.check_guards();
    let got = yd.host();
    assert!(got.iter().zip(&y).all(|(a, b)| (a - b).abs() <= 1e-6), "readout: {got:?} vs {y:?}");
    let labels: Vec<u8> = (0..batch).map(|_| rng.below(classes) as u8).collect();
    let labels_i32: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
    for (kind, lf) in [(0i32, Loss::Mse), (1, Loss::Ce)] {
        let mut dy = vec![0f32; bk];
        let total = loss::loss_and_grad(lf, &y, &labels, classes, &mut dy);
        let mut yd = DevBuf::from("y", &y);
        let mut dyd = DevBuf::new("dy", bk);
        let mut row = DevBuf::new("row_loss", batch);
        let mut lab = labels_i32.clone();
        let mut pred = vec![-1i32; batch];
        let mut a = Args::new();
        a.val(yd.ptr()).val(lab.as_mut_ptr()).val(dyd.ptr()).val(row.ptr()).val(pred.as_mut_ptr());
        a.val(batch as i32).val(classes as i32).val(kind);
        m.launch_raw("loss_grad_f32", (1, 1, 1), (32, 1, 1), 0, false, 4, &mut a).unwrap();
        for b in [&dyd, &row] {
            b.check_guards();
        }
        let g = dyd.host();
        assert!(g.iter().zip(&dy).all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs())), "{lf:?}: ∂y {g:?} vs {dy:?}");
        let sum: f32 = row.host().iter().sum();
        assert!((sum - total).abs() <= 1e-5 * (1.0 + total.abs()), "{lf:?}: loss {sum} vs {total}");
        let want: Vec<i32> = loss::argmax_rows(&y, classes).into_iter().map(|p| p as i32).collect();
        assert_eq!(pred, want, "{lf:?}: predictions");
    }
}

/// The last layer's fused kernels (readout in the forward; loss, its status word and the readout's
/// gradient in the backward) against the five separate launches they replace: every output must
/// be the same bits, in both firing modes, both losses, T_in = 1 and T, a grid-stride launch with
/// fewer threads than neurons, and a batch whose NaN input makes one row's loss NaN.
#[test]
fn emulated_fused_readout_and_loss_give_the_bits_of_the_separate_kernels() {
    use backei::gpu::loss::LossScales;
    let (sm, lm, om) = (emu::module("spiking"), emu::module("loss"), emu::module("optim"));
    let mut rng = common::Rng(17);
    let (classes, grid, block) = (10usize, (2u32, 1, 1), (32u32, 1, 1));
    for (batch, steps, t_in, smooth_mode, nan) in
        [(7usize, 5usize, 5usize, false, false), (3, 4, 1, false, false), (5, 6, 6, true, false), (4, 3, 3, true, true)]
    {
        let mut c = case("readout", [classes, 1, 1], false, false, 0, 1, batch, steps, t_in);
        if smooth_mode {
            c = smooth(c);
        }
        let np = NeuronParams::from_config(&c.neuron);
        let (n, bk) = (batch * classes, batch * classes);
        let mut input = host_vec(&mut rng, t_in * n, -0.5, 1.5);
        if nan {
            input[classes + 3] = f32::NAN; // sample 1, class 3: its row's readout and loss are NaN
        }
        let labels: Vec<i32> = (0..batch).map(|_| rng.below(classes) as i32).collect();
        for kind in [0i32, 1] {
            let label = format!("B {batch} T {steps} T_in {t_in} smooth {smooth_mode} NaN {nan} loss {kind}");
            let (nn, t, ti) = (n as i64, steps as i32, t_in as i32);
            // the separate kernels
            let mut x = DevBuf::from("input", &input);
            let (mut out, mut v, mut y) = (DevBuf::new("out", steps * n), DevBuf::new("v", steps * n), DevBuf::new("y", bk));
            let (mut dy, mut row, mut ds) = (DevBuf::new("dy", bk), DevBuf::new("row_loss", batch), DevBuf::new("ds", steps * bk));
            let mut gin = DevBuf::new("grad_in", t_in * n);
            let (mut lab, mut pred, mut status) = (labels.clone(), vec![-1i32; batch], vec![0u32; 1]);
            let mut a = Args::new();
            a.val(x.ptr()).val(out.ptr()).val(v.ptr()).val(nn).val(t).val(ti).val(np);
            sm.launch_raw("spiking_forward_v1_f32", grid, block, 0, false, 1, &mut a).unwrap();
            let mut a = Args::new();
            a.val(out.ptr()).val(y.ptr()).val(t).val(bk as i32);
            lm.launch_raw("readout_f32", (1, 1, 1), (128, 1, 1), 0, false, 2, &mut a).unwrap();
            let mut a = Args::new();
            a.val(y.ptr()).val(lab.as_mut_ptr()).val(dy.ptr()).val(row.ptr()).val(pred.as_mut_ptr());
            a.val(batch as i32).val(classes as i32).val(kind);
            lm.launch_raw("loss_grad_f32", (1, 1, 1), (32, 1, 1), 0, false, 3, &mut a).unwrap();
            let mut a = Args::new();
            a.val(row.ptr()).val(batch as i64).buf_u32(&mut status);
            om.launch_raw("count_nonfinite_f32", (1, 1, 1), (32, 1, 1), 0, false, 4, &mut a).unwrap();
            let mut a = Args::new();
            a.val(dy.ptr()).val(ds.ptr()).val(t).val(bk as i32);
            lm.launch_raw("readout_backward_f32", (1, 1, 1), (64, 1, 1), 0, false, 5, &mut a).unwrap();
            let mut a = Args::new();
            a.val(ds.ptr()).val(v.ptr()).val(gin.ptr()).val(nn).val(t).val(ti).val(np);
            sm.launch_raw("spiking_backward_v1_f32", grid, block, 0, false, 6, &mut a).unwrap();
            // the fused pair
            let mut x2 = DevBuf::from("input", &input);
            let (mut out2, mut v2, mut y2) = (DevBuf::new("out", steps * n), DevBuf::new("v", steps * n), DevBuf::new("y", bk));
            let (mut dy2, mut row2, mut gin2) = (DevBuf::new("dy", bk), DevBuf::new("row_loss", batch), DevBuf::new("grad_in", t_in * n));
            let (mut lab2, mut pred2, mut status2) = (labels.clone(), vec![-1i32; batch], vec![0u32; 1]);
            let mut a = Args::new();
            let (scales, inv_steps) = (LossScales::new(batch, classes), 1.0f32 / steps as f32);
            // spiking_loss_backward_v1_f32's arguments after the loss buffers and the status word
            let tail = |a: &mut Args, v: *mut f32, gin: *mut f32| {
                a.val(v).val(gin).val(batch as i32).val(classes as i32).val(kind).val(scales).val(inv_steps).val(t).val(ti).val(np);
            };
            a.val(x2.ptr()).val(out2.ptr()).val(v2.ptr()).val(y2.ptr()).val(inv_steps).val(nn).val(t).val(ti).val(np);
            sm.launch_raw("spiking_readout_forward_v1_f32", grid, block, 0, false, 7, &mut a).unwrap();
            let mut a = Args::new();
            a.val(y2.ptr()).val(lab2.as_mut_ptr()).val(dy2.ptr()).val(row2.ptr()).val(pred2.as_mut_ptr()).buf_u32(&mut status2);
            tail(&mut a, v2.ptr(), gin2.ptr());
            sm.launch_raw("spiking_loss_backward_v1_f32", grid, block, 0, false, 8, &mut a).unwrap();
            for (name, sep, fused) in [
                ("s", &out, &out2),
                ("v", &v, &v2),
                ("readout", &y, &y2),
                ("∂L/∂y", &dy, &dy2),
                ("row losses", &row, &row2),
                ("∂L/∂I", &gin, &gin2),
            ] {
                sep.check_guards();
                fused.check_guards();
                let (a, b) = (sep.host(), fused.host());
                // (a NaN's payload follows the host's operand order; a GPU's NaNs are canonical)
                let differ = a.iter().zip(&b).position(|(p, q)| p.to_bits() != q.to_bits() && !(p.is_nan() && q.is_nan()));
                assert_eq!(differ, None, "{label}: {name} differs at {differ:?}: {:?} vs {:?}", differ.map(|i| a[i]), differ.map(|i| b[i]));
            }
            assert_eq!(pred, pred2, "{label}: predictions");
            let bad_rows = row.host().iter().filter(|l| !l.is_finite()).count() as u32;
            assert_eq!(status, [bad_rows], "{label}: the separate count");
            assert_eq!(status2, [bad_rows], "{label}: the fused count");
            assert_eq!(bad_rows > 0, nan, "{label}: the NaN row, and only it, is counted");
            // without a status word (evaluation-style launches) nothing is counted and the rest is the same
            let mut a = Args::new();
            let (mut dy3, mut row3, mut gin3) = (DevBuf::new("dy", bk), DevBuf::new("row_loss", batch), DevBuf::new("grad_in", t_in * n));
            let mut pred3 = vec![-1i32; batch];
            a.val(y2.ptr()).val(lab2.as_mut_ptr()).val(dy3.ptr()).val(row3.ptr()).val(pred3.as_mut_ptr()).val(std::ptr::null_mut::<u32>());
            tail(&mut a, v2.ptr(), gin3.ptr());
            sm.launch_raw("spiking_loss_backward_v1_f32", (1, 1, 1), (256, 1, 1), 0, false, 9, &mut a).unwrap();
            let same = |p: &DevBuf, q: &DevBuf| {
                p.host().iter().zip(q.host()).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()))
            };
            assert!(same(&dy3, &dy) && same(&row3, &row) && same(&gin3, &gin) && pred3 == pred, "{label}: one block, no status word");
        }
    }
}

// ---- the fused optimizers: the CPU optimizer's bits ---------------------------------------------------

#[test]
fn emulated_adam_adamw_and_sgd_steps_equal_the_cpu_optimizer_bit_for_bit() {
    use backei::optim::{Optimizer, OptimizerConfig};
    let m = emu::module("optim");
    let mut rng = common::Rng(8);
    let n = 1001usize;
    let p0 = host_vec(&mut rng, n, -1.0, 1.0);
    let adam = OptimizerConfig::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-4, decoupled_weight_decay: false };
    // a large decoupled weight decay, so that every parameter's shrink shows in its bits
    let adamw = OptimizerConfig::adamw(1e-3, 0.5);
    let sgd = OptimizerConfig::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };
    for config in [adam, adamw, sgd] {
        let mut cpu = Optimizer::new(config, n).unwrap();
        let mut p_cpu = p0.clone();
        let mut p = DevBuf::from("params", &p0);
        let mut mom = DevBuf::from("m", &vec![0f32; n]);
        let mut var = DevBuf::from("v", &vec![0f32; n]);
        for step in 1..=3u64 {
            let g = host_vec(&mut rng, n, -0.5, 0.5);
            cpu.update(&mut p_cpu, &g);
            let mut gd = DevBuf::from("grads", &g);
            // the step's scalars and status words from device memory, as the GPU step stages them
            let mut status = vec![0u32; 3];
            let (kernel, mut scalars) = match config {
                OptimizerConfig::Adam { beta1, beta2, lr, .. } => {
                    let (step_size, bc2_sqrt) = backei::gpu::optim::adam_step_scalars(beta1, beta2, lr, step);
                    ("adam_f32", vec![step_size, bc2_sqrt, config.decay_factor(lr)])
                }
                OptimizerConfig::Sgd { lr, .. } => ("sgd_f32", vec![lr, (step == 1) as u8 as f64, 1.0]),
            };
            let launch =
                |p: &mut DevBuf, gd: &mut DevBuf, mom: &mut DevBuf, var: &mut DevBuf, scalars: &mut Vec<f64>, status: &mut Vec<u32>| {
                    let mut a = Args::new();
                    match config {
                        OptimizerConfig::Adam { beta1, beta2, eps, weight_decay, decoupled_weight_decay, .. } => {
                            // as src/gpu/optim.rs launches it: AdamW's decay is the staged factor
                            let l2 = if decoupled_weight_decay { 0.0 } else { weight_decay };
                            a.val(p.ptr()).val(gd.ptr()).val(mom.ptr()).val(var.ptr()).val(n as i64);
                            a.val(beta1).val(beta2).val(eps).val(l2);
                        }
                        OptimizerConfig::Sgd { momentum, weight_decay, .. } => {
                            a.val(p.ptr()).val(gd.ptr()).val(mom.ptr()).val(n as i64).val(momentum).val(weight_decay);
                        }
                    }
                    a.val(scalars.as_mut_ptr()).val(status.as_mut_ptr()).val(3i32);
                    m.launch_raw(kernel, (3, 1, 1), (128, 1, 1), 0, false, step, &mut a).unwrap();
                };
            // a step whose status says NaN/Inf leaves every parameter and moment as it was
            let before = (p.host(), mom.host(), var.host());
            status[1] = 2;
            launch(&mut p, &mut gd, &mut mom, &mut var, &mut scalars, &mut status);
            assert!(before == (p.host(), mom.host(), var.host()), "{kernel}: a bad step's update was not skipped");
            status[1] = 0;
            launch(&mut p, &mut gd, &mut mom, &mut var, &mut scalars, &mut status);
            for b in [&p, &mom, &var, &gd] {
                b.check_guards();
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&p.host()) == bits(&p_cpu), "{kernel} step {step}: parameters differ from the CPU optimizer");
            assert!(bits(&mom.host()) == bits(&cpu.m), "{kernel} step {step}: first moment / momentum differs");
            if kernel == "adam_f32" {
                assert!(bits(&var.host()) == bits(&cpu.v), "{kernel} step {step}: second moment differs");
            }
        }
    }
}

// ---- the convolution's data movement around the GEMMs (cuBLAS on a GPU; a plain loop here) --------

/// c[m][n] = Σ_k a[m][k]·b[k][n] (row-major), or with `ta` a stored as [k][m]: the CPU engine's
/// GEMM (`Real::gemm`), standing in for cuBLAS.
fn gemm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool) -> Vec<f32> {
    use backei::Real;
    assert!(a.len() == m * k && b.len() == k * n);
    let mut c = vec![0f32; m * n];
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    // SAFETY: a is m×k (or k×m with ta), b k×n, c m×n, all row-major with the strides above.
    unsafe { f32::gemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), n as isize, 1, 0.0, c.as_mut_ptr(), n as isize, 1) };
    c
}

#[test]
fn emulated_convolution_kernels_compose_to_the_cpu_convolution() {
    use backei::cpu::conv::{self, ConvGeom};
    let m = emu::module("conv");
    let mut rng = common::Rng(13);
    for (cin, cout, h, w, k, pad, n) in
        [(3usize, 5usize, 7usize, 6usize, 3usize, 1usize, 2usize), (2, 4, 9, 9, 5, 0, 3), (1, 3, 5, 5, 5, 2, 1)]
    {
        let g = ConvGeom::new(cin, cout, h, w, k, pad);
        let (ho, wo) = (g.ho, g.wo);
        let (pp, kk) = (ho * wo, cin * k * k);
        let x = host_vec(&mut rng, n * cin * h * w, -1.0, 1.0);
        let wt = host_vec(&mut rng, cout * kk, -0.5, 0.5);
        let bias = host_vec(&mut rng, cout, -0.5, 0.5);
        let (ni, ci, hi, wi, ki, padi, hoi, woi) = (n as i32, cin as i32, h as i32, w as i32, k as i32, pad as i32, ho as i32, wo as i32);
        // forward: im2col, yT = W·col, conv_out
        let mut xd = DevBuf::from("x", &x);
        let mut col = DevBuf::new("col", kk * n * pp);
        let mut a = Args::new();
        a.val(xd.ptr()).val(col.ptr()).val(ni).val(ci).val(hi).val(wi).val(ki).val(padi).val(hoi).val(woi);
        m.launch_raw("im2col_f32", (3, 1, 1), (128, 1, 1), 0, false, 1, &mut a).unwrap();
        col.check_guards();
        let mut yt = DevBuf::from("yT", &gemm(&wt, &col.host(), cout, kk, n * pp, false));
        let mut bd = DevBuf::from("bias", &bias);
        let mut y = DevBuf::new("y", n * cout * pp);
        let mut a = Args::new();
        a.val(yt.ptr()).val(bd.ptr()).val(y.ptr()).val(ni).val(cout as i32).val(pp as i32);
        m.launch_raw("conv_out_f32", (2, 1, 1), (64, 1, 1), 0, false, 2, &mut a).unwrap();
        y.check_guards();
        let mut y_cpu = vec![0f32; n * cout * pp];
        conv::forward(&g, &wt, &bias, &x, &mut y_cpu);
        let err = y.host().iter().zip(&y_cpu).fold(0f32, |e, (a, b)| e.max((a - b).abs()));
        assert!(err < 1e-5, "{cin}→{cout} k{k} p{pad}: forward off by {err}");
        // backward data: dyT, colgrad = Wᵀ·dyT, col2im (accumulating onto a starting dx)
        let dy = host_vec(&mut rng, n * cout * pp, -1.0, 1.0);
        let mut dyd = DevBuf::from("dy", &dy);
        let mut dyt = DevBuf::new("dyT", dy.len());
        let mut a = Args::new();
        a.val(dyd.ptr()).val(dyt.ptr()).val(ni).val(cout as i32).val(pp as i32);
        m.launch_raw("conv_dy_t_f32", (2, 1, 1), (64, 1, 1), 0, false, 3, &mut a).unwrap();
        let mut colg = DevBuf::from("colgrad", &gemm(&wt, &dyt.host(), kk, cout, n * pp, true));
        let dx0 = host_vec(&mut rng, x.len(), -1.0, 1.0);
        let mut dx = DevBuf::from("dx", &dx0);
        let mut a = Args::new();
        a.val(colg.ptr()).val(dx.ptr()).val(ni).val(ci).val(hi).val(wi).val(ki).val(padi).val(hoi).val(woi).val(1i32);
        m.launch_raw("col2im_f32", (3, 1, 1), (96, 1, 1), 0, false, 4, &mut a).unwrap();
        dx.check_guards();
        let mut dx_cpu = dx0.clone();
        conv::backward_data(&g, &wt, &dy, &mut dx_cpu, true);
        let err = dx.host().iter().zip(&dx_cpu).fold(0f32, |e, (a, b)| e.max((a - b).abs()));
        assert!(err < 1e-5, "{cin}→{cout} k{k} p{pad}: backward data off by {err}");
        // bias gradient: one block per output channel, accumulated onto db
        let mut dw_cpu = vec![0f32; cout * kk];
        let mut db_cpu = vec![0.25f32; cout];
        conv::backward_weights(&g, &x, &dy, &mut dw_cpu, &mut db_cpu);
        let mut db = DevBuf::from("db", &vec![0.25f32; cout]);
        let mut a = Args::new();
        a.val(dyd.ptr()).val(db.ptr()).val(ni).val(cout as i32).val(pp as i32);
        m.launch_raw("bias_grad_f32", (cout as u32, 1, 1), (256, 1, 1), 0, false, 5, &mut a).unwrap();
        db.check_guards();
        let err = db.host().iter().zip(&db_cpu).fold(0f32, |e, (a, b)| e.max((a - b).abs()));
        assert!(err < 1e-5, "{cin}→{cout} k{k} p{pad}: bias gradient off by {err}");
    }
}

// ---- grid-stride loops: coordinates advanced without division (cuda/grid_digits.cuh) ---------------

/// A launch's (grid, block) dimensions.
type LaunchShape = ((u32, u32, u32), (u32, u32, u32));

/// Launch shapes whose thread count — the loop's stride — is 32, 96, 448 (each a multiple of none
/// of the odd extents below, so the stride carries into every digit) and, last, one thread per
/// element (8,192 threads: no advance, only the division at the start).
const STRIDE_GRIDS: [LaunchShape; 4] =
    [((1, 1, 1), (32, 1, 1)), ((3, 1, 1), (32, 1, 1)), ((7, 1, 1), (64, 1, 1)), ((64, 1, 1), (128, 1, 1))];

/// `run(grid, block)` launches a kernel on fresh outputs of `total` elements and returns them:
/// every grid must give the bits of one thread per element.
fn assert_grid_independent(kernel: &str, total: usize, mut run: impl FnMut((u32, u32, u32), (u32, u32, u32)) -> Vec<f32>) {
    let (one_each, strided) = STRIDE_GRIDS.split_last().unwrap();
    assert!(total > 448 && total <= 8192, "{kernel}: {total} elements leave a grid without advances or threads without elements");
    let want = bits(&run(one_each.0, one_each.1));
    assert!(want.iter().all(|&b| !f32::from_bits(b).is_nan()), "{kernel}: an element left unwritten");
    for &(grid, block) in strided {
        assert_eq!(bits(&run(grid, block)), want, "{kernel} on {grid:?} blocks of {block:?}: another element's coordinates");
    }
}

/// Every elementwise kernel whose grid-stride loop keeps its coordinates as GridDigits: pooling,
/// dropout (+ pooling), the convolution's data movement and the readout's gradient give the same
/// bits on every grid. Extents 5, 7, 11, 13 and 3: a carry that is lost, doubled or taken at the
/// wrong digit reads another element. (The CPU comparisons of the tests above check the values.)
#[test]
fn emulated_grid_stride_loops_give_the_same_bits_on_every_grid() {
    let mut rng = common::Rng(77);
    // pooling: 13 planes of 15×11 (pooled 7×5)
    let pool = emu::module("pool");
    let (planes, h, w) = (13usize, 15usize, 11usize);
    let x = host_vec(&mut rng, planes * h * w, -1.0, 1.0);
    let dy = host_vec(&mut rng, planes * (h / 2) * (w / 2), -1.0, 1.0);
    let plane_args = |a: &mut Args| {
        a.val(planes as i64).val(h as i32).val(w as i32);
    };
    assert_grid_independent("avgpool2_forward_f32", dy.len(), |g, b| {
        let (mut xd, mut yd) = (DevBuf::from("x", &x), DevBuf::new("y", dy.len()));
        let mut a = Args::new();
        a.val(xd.ptr()).val(yd.ptr());
        plane_args(&mut a);
        pool.launch_raw("avgpool2_forward_f32", g, b, 0, false, 1, &mut a).unwrap();
        yd.check_guards();
        yd.host()
    });
    assert_grid_independent("avgpool2_backward_f32", x.len(), |g, b| {
        let (mut dyd, mut dxd) = (DevBuf::from("dy", &dy), DevBuf::new("dx", x.len()));
        let mut a = Args::new();
        a.val(dyd.ptr()).val(dxd.ptr());
        plane_args(&mut a);
        pool.launch_raw("avgpool2_backward_f32", g, b, 0, false, 2, &mut a).unwrap();
        dxd.check_guards();
        dxd.host()
    });

    // dropout and dropout + pooling: 3 steps of 5 planes of 15×11
    let drop = emu::module("dropout");
    let key = backei::rng::dropout_key(4150, 5, 1);
    let (p, sc) = (0.25f32, backei::gpu::dropout::scale(0.25));
    let (steps, pps) = (3usize, 5usize);
    let len = pps * h * w;
    let xs = host_vec(&mut rng, steps * len, -1.0, 1.0);
    let dys = host_vec(&mut rng, steps * pps * (h / 2) * (w / 2), -1.0, 1.0);
    let mut keys = vec![key];
    let keys_ptr = keys.as_mut_ptr();
    for kernel in ["dropout_forward_f32", "dropout_backward_f32"] {
        assert_grid_independent(kernel, xs.len(), |g, b| {
            let (mut src, mut dst) = (DevBuf::from("src", &xs), DevBuf::new("dst", xs.len()));
            let mut a = Args::new();
            a.val(src.ptr())
                .val(dst.ptr())
                .val(keys_ptr)
                .val(0i32)
                .val(7u64)
                .val(p)
                .val(sc)
                .val(len as i64)
                .val(steps as i32)
                .val(steps as i32);
            drop.launch_raw(kernel, g, b, 0, false, 3, &mut a).unwrap();
            dst.check_guards();
            dst.host()
        });
    }
    assert_grid_independent("broadcast_steps_f32", xs.len(), |g, b| {
        let (mut src, mut dst) = (DevBuf::from("x", &xs[..len]), DevBuf::new("y", xs.len()));
        let mut a = Args::new();
        a.val(src.ptr()).val(dst.ptr()).val(len as i64).val(steps as i32);
        drop.launch_raw("broadcast_steps_f32", g, b, 0, false, 4, &mut a).unwrap();
        dst.check_guards();
        dst.host()
    });
    for (kernel, input, out_len) in [("dropout_avgpool2_forward_f32", &xs, dys.len()), ("dropout_avgpool2_backward_f32", &dys, xs.len())] {
        assert_grid_independent(kernel, out_len, |g, b| {
            let (mut src, mut dst) = (DevBuf::from("src", input), DevBuf::new("dst", out_len));
            let mut a = Args::new();
            a.val(src.ptr()).val(dst.ptr()).val(keys_ptr).val(0i32).val(11u64).val(1i32).val(p).val(sc);
            a.val(pps as i64).val(steps as i32).val(h as i32).val(w as i32);
            drop.launch_raw(kernel, g, b, 0, false, 5, &mut a).unwrap();
            dst.check_guards();
            dst.host()
        });
    }

    // the convolution's data movement: 7 samples, 2 → 7 channels, 7×5 maps, k 3, pad 1
    let conv = emu::module("conv");
    let (n, cin, cout, ch, cw, k, pad) = (7usize, 2usize, 7usize, 7usize, 5usize, 3usize, 1usize);
    let (ho, wo) = (ch + 2 * pad - k + 1, cw + 2 * pad - k + 1);
    let pp = ho * wo;
    let geometry = |a: &mut Args| {
        for v in [n, cin, ch, cw, k, pad, ho, wo] {
            a.val(v as i32);
        }
    };
    let cx = host_vec(&mut rng, n * cin * ch * cw, -1.0, 1.0);
    let cols = host_vec(&mut rng, cin * k * k * n * pp, -1.0, 1.0);
    assert_grid_independent("im2col_f32", cols.len(), |g, b| {
        let (mut xd, mut col) = (DevBuf::from("x", &cx), DevBuf::new("col", cols.len()));
        let mut a = Args::new();
        a.val(xd.ptr()).val(col.ptr());
        geometry(&mut a);
        conv.launch_raw("im2col_f32", g, b, 0, false, 6, &mut a).unwrap();
        col.check_guards();
        col.host()
    });
    assert_grid_independent("col2im_f32", cx.len(), |g, b| {
        let (mut col, mut dx) = (DevBuf::from("col", &cols), DevBuf::from("dx", &cx));
        let mut a = Args::new();
        a.val(col.ptr()).val(dx.ptr());
        geometry(&mut a);
        a.val(1i32);
        conv.launch_raw("col2im_f32", g, b, 0, false, 7, &mut a).unwrap();
        dx.check_guards();
        dx.host()
    });
    let ys = host_vec(&mut rng, n * cout * pp, -1.0, 1.0);
    let bias = host_vec(&mut rng, cout, -1.0, 1.0);
    for kernel in ["conv_out_f32", "conv_dy_t_f32"] {
        assert_grid_independent(kernel, ys.len(), |g, b| {
            let (mut src, mut bd, mut dst) = (DevBuf::from("src", &ys), DevBuf::from("bias", &bias), DevBuf::new("dst", ys.len()));
            let mut a = Args::new();
            a.val(src.ptr());
            if kernel == "conv_out_f32" {
                a.val(bd.ptr());
            }
            a.val(dst.ptr()).val(n as i32).val(cout as i32).val(pp as i32);
            conv.launch_raw(kernel, g, b, 0, false, 8, &mut a).unwrap();
            dst.check_guards();
            dst.host()
        });
    }
    assert_grid_independent("bias_fill_f32", ys.len(), |g, b| {
        let (mut dst, mut bd) = (DevBuf::new("y", ys.len()), DevBuf::from("bias", &bias));
        let mut a = Args::new();
        a.val(dst.ptr()).val(bd.ptr()).val(ys.len() as i64).val(cout as i32).val(pp as i32);
        conv.launch_raw("bias_fill_f32", g, b, 0, false, 9, &mut a).unwrap();
        dst.check_guards();
        dst.host()
    });
    // bias_grad_f32 strides by its 256 threads over n·P = 105·k: 5 samples of 19×11 (1,045 > 4·256)
    let (bn, bp) = (5usize, 19 * 11);
    let bdy = host_vec(&mut rng, bn * cout * bp, -1.0, 1.0);
    let mut db = DevBuf::from("db", &vec![0.5f32; cout]);
    let mut dyd = DevBuf::from("dy", &bdy);
    let mut a = Args::new();
    a.val(dyd.ptr()).val(db.ptr()).val(bn as i32).val(cout as i32).val(bp as i32);
    conv.launch_raw("bias_grad_f32", (cout as u32, 1, 1), (256, 1, 1), 0, false, 10, &mut a).unwrap();
    db.check_guards();
    for (co, got) in db.host().into_iter().enumerate() {
        let want = 0.5 + (0..bn).flat_map(|s| (0..bp).map(move |q| (s, q))).map(|(s, q)| bdy[(s * cout + co) * bp + q] as f64).sum::<f64>();
        assert!((got as f64 - want).abs() < 1e-4, "bias_grad_f32 channel {co}: {got} vs {want}");
    }

    // the readout's gradient: 13 steps of 7×5
    let loss = emu::module("loss");
    let (t, bk) = (13usize, 35usize);
    let rdy = host_vec(&mut rng, bk, -1.0, 1.0);
    assert_grid_independent("readout_backward_f32", t * bk, |g, b| {
        let (mut dyd, mut ds) = (DevBuf::from("dy", &rdy), DevBuf::new("ds", t * bk));
        let mut a = Args::new();
        a.val(dyd.ptr()).val(ds.ptr()).val(t as i32).val(bk as i32);
        loss.launch_raw("readout_backward_f32", g, b, 0, false, 11, &mut a).unwrap();
        ds.check_guards();
        ds.host()
    });
}
