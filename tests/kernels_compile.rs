//! Every kernel compiles with NVRTC for sm_80 and sm_90 and assembles with ptxas without a single
//! register spill, and the tensor-core kernels (v4) do what they are for, read off the SASS that
//! runs — checked in CI, where there is no GPU (`.ci/run` installs the pip packages
//! nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvcc-cu12, nvidia-cuda-nvdisasm and nvidia-cuda-cuobjdump).
//! Without them these tests fail and say why.

use backei::gpu::backei_layer::{DeviceLimits, V2_BLOCKS_PER_SM};
use backei::gpu::backei_v4::{check_instance, check_planned, instance_defines, training_instance, V4Check, V4Plan};
use backei::gpu::kernels::{compile_module, module_names, nvrtc_present};
use backei::gpu::ptxas::kernel_report;
use backei::gpu::sass::{blocks_per_sm, find_cuobjdump, find_nvdisasm};
use backei::spec::FeedbackConfig;
use backei::Precision;

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
            // no spill, but for the one named exception (KernelStats::spills: up to 8 bytes of the
            // sm_90 window-staged fp32 tiles of 256 pixels under the pip ptxas)
            assert!(!k.spills(arch), "{arch} {}::{} spills registers: {}/{} bytes", k.module, k.kernel, k.spill_stores, k.spill_loads);
            assert!(k.registers > 0 && k.registers <= 255, "{k:?}");
            // the v2/v3 cooperative plans count on two co-resident blocks of 256 threads per SM
            if k.kernel.contains("_v2_") || k.kernel.contains("_v3_") {
                let by_regs = blocks_per_sm(k.registers, 256, 0, 233_472);
                assert!(by_regs >= V2_BLOCKS_PER_SM, "{arch} {}: {} registers leave {by_regs} blocks per SM", k.kernel, k.registers);
            }
        }
    }
}

#[test]
fn a_compile_error_names_file_line_and_source() {
    require_nvrtc();
    // a real module compiles (every one does, in the test above); a missing one says so
    compile_module("smoke", "sm_90").unwrap_or_else(|e| panic!("{e}"));
    let err = compile_module("no_such_module", "sm_90").unwrap_err().to_string();
    assert!(err.contains("no kernel module `no_such_module`"), "{err}");
}

/// The v4 kernels as NVRTC builds them for sm_90 (the SASS that runs on an H100/H200): the hot loop
/// of each forward and backward issues HMMA, touches no local memory and divides no integers, no
/// kernel uses local memory, and the cooperative plan's grid fits the blocks that registers and
/// shared memory leave resident. The fashion-mnist layers in every precision, mnist's layer 1
/// (r = 2), cifar10's layers 2 and 3 (the widest tile).
#[test]
fn v4_hot_loops_run_on_tensor_cores_without_local_memory_or_division() {
    require_nvrtc();
    assert!(
        find_nvdisasm().is_some() && find_cuobjdump().is_some(),
        "pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump (.ci/run does this)"
    );
    let fb = |radius| FeedbackConfig { back: true, ei: true, radius, delay: 1 };
    let cases = [
        ([32usize, 28, 28], 1usize, Precision::Fp32),
        ([64, 14, 14], 1, Precision::Fp32),
        ([15, 24, 24], 2, Precision::Fp32),
        ([32, 28, 28], 1, Precision::Tf32),
        ([32, 28, 28], 1, Precision::Bf16),
        // 64-channel tiles, channel slabs, weights streamed from L2 (cifar10's layers 2 and 3: the
        // backward's bias sums carried in memory, and its named spill exception)
        ([256, 16, 16], 1, Precision::Fp32),
        ([512, 8, 8], 1, Precision::Fp32),
    ];
    for (shape, r, p) in cases {
        let c = check_instance(shape, &fb(r), 100, 20, &DeviceLimits::H100, p, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.kernels.len(), 2, "{shape:?} {p}: {:?}", c.kernels);
        for (k, per_sm) in c.kernels.iter().zip(&c.blocks_per_sm) {
            let m = k.hot.expect("a hot loop");
            println!(
                "{shape:?} {p} {}: {} registers, local memory {} B in {} instructions (loop depth {}), {per_sm} block(s)/SM, hot loop {m:?}",
                k.kernel, k.registers, k.local_bytes, k.local_ops, k.local_depth
            );
            // one HMMA per product of a k-step: at least one per m-tile and n-tile
            assert!(m.mma >= 4 && m.ldsm > 0, "{shape:?} {p} {}: {m:?}", k.kernel);
        }
        assert!(c.problems.is_empty(), "{shape:?} {p}: {:?}", c.problems);
    }
}

/// The static check (sm_90, an H100) of a layer's v4 training instance with an opt-in applied
/// (`opt_in`, whose build constant `define` = 1 is asserted), each kernel's reading printed under
/// `label`.
fn check_opt_in(shape: [usize; 3], p: Precision, label: &str, define: &str, opt_in: impl Fn(&mut V4Plan)) -> V4Check {
    use backei::gpu::backei_layer::NeuronParams;
    require_nvrtc();
    assert!(find_nvdisasm().is_some() && find_cuobjdump().is_some(), "pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump");
    let fb = FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 };
    let np = NeuronParams::from_config(&backei::spec::NeuronConfig::default());
    let (mut plan, _) = training_instance(shape, &fb, 100, 20, &DeviceLimits::H100, p).unwrap_or_else(|e| panic!("{e}"));
    opt_in(&mut plan);
    let defines = instance_defines(&plan, &np);
    assert!(defines.iter().any(|(k, v)| k == define && v == "1"), "{defines:?}");
    let c = check_planned(plan, &defines, &DeviceLimits::H100, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    for k in &c.kernels {
        println!(
            "{shape:?} {p} {} ({label}): {} registers, local {} B in {} instructions, hot loop {:?}, {} prefetches, {} instructions",
            k.kernel, k.registers, k.local_bytes, k.local_ops, k.hot, k.l2_prefetches, k.total
        );
    }
    c
}

/// The v4 instances with their phases ordered by neighbour flags (`BACKEI_V4_SYNC=neighbours`,
/// opt-in: `V4_SYNC`, cuda/v4/sync.cuh) pass the same static check as the grid-barrier build:
/// fashion-mnist L1 in fp32 and bf16, cifar10 L2 (the widest tile, its named spill exception);
/// and their PTX releases every flag it publishes and acquires every flag it polls.
#[test]
fn v4_with_neighbour_flags_passes_the_same_static_check() {
    for (shape, p) in [([32usize, 28, 28], Precision::Fp32), ([32, 28, 28], Precision::Bf16), ([256, 16, 16], Precision::Fp32)] {
        let c = check_opt_in(shape, p, "neighbour flags", "V4_SYNC", V4Plan::order_by_neighbours);
        // the flags' fences, read off the PTX (sync_order): each of a kernel's phase ends (two per
        // step, forward and backward) publishes its flag after a release and polls its partners'
        // before an acquire
        for s in &c.sync {
            println!("{shape:?} {p} {}: {} flag exchanges, {} barrier arrivals, {} polls", s.kernel, s.exchanges, s.adds, s.polls);
            assert!(s.exchanges >= 2 && s.polls >= 2 * s.exchanges, "{shape:?} {p}: {s:?}");
        }
        assert!(c.problems.is_empty(), "{shape:?} {p}: {:?}", c.problems);
    }
}

/// The v4 instances that prefetch their epilogue inputs into L2 (`BACKEI_V4_PREFETCH=l2`, opt-in:
/// `V4_PREFETCH`, cuda/v4/chunks.cuh) pass the same static check as the default build — fashion
/// L1 in fp32, cifar10 L2 (the widest tile, the most registers) — and hold the prefetches
/// (CCTL.E.PF2: the check fails a build that asked for them without any, and one with any that
/// did not ask).
#[test]
fn v4_with_l2_prefetches_passes_the_same_static_check() {
    for shape in [[32usize, 28, 28], [256, 16, 16]] {
        let c = check_opt_in(shape, Precision::Fp32, "L2 prefetches", "V4_PREFETCH", V4Plan::prefetch_epilogue_inputs);
        for k in &c.kernels {
            assert!(k.l2_prefetches > 0, "{shape:?} {}", k.kernel);
        }
        assert!(c.problems.is_empty(), "{shape:?}: {:?}", c.problems);
    }
}

/// The v4 instances whose chunks span samples (`BACKEI_V4_CHUNKS=span`, opt-in: `V4_CROSS`,
/// cuda/v4/chunks.cuh chunk_len) pass the same static check as the default build: fashion-mnist
/// L1 and L2 in fp32 (the layers whose chunk counts it lowers, 6 -> 5 and 7 -> 5) and bf16, and
/// cifar10 L2 (the widest tile, the most registers).
#[test]
fn v4_with_chunks_spanning_samples_passes_the_same_static_check() {
    for (shape, p) in [
        ([32usize, 28, 28], Precision::Fp32),
        ([64, 14, 14], Precision::Fp32),
        ([32, 28, 28], Precision::Bf16),
        ([256, 16, 16], Precision::Fp32),
    ] {
        let c = check_opt_in(shape, p, "chunks spanning samples", "V4_CROSS", V4Plan::span_samples);
        assert!(c.problems.is_empty(), "{shape:?} {p}: {:?}", c.problems);
    }
}

/// Every tiling the kernel bench sweeps at the fashion-mnist shapes (`BACKEI_BENCH_V4_TILINGS=sweep`:
/// each channel tile and m-tile count, the planner's slab and placement for it), in fp32 and bf16,
/// and the cifar10 L1 tilings of the `v4-tune-cifar` stage (fp32: `CIFAR10_L1_TUNING`) pass the
/// static check the planner's own instances pass — so whichever a GPU run finds fastest (and
/// `BACKEI_V4_TILING` then selects) has tensor-core hot loops without local memory or division
/// and a grid that fits.
#[test]
fn v4_every_tiling_the_bench_tunes_passes_the_static_check() {
    use backei::gpu::backei_v4::{bench_tilings, training_instance_tiled, V4TilingRequest, CIFAR10_L1_TUNING};
    require_nvrtc();
    assert!(find_nvdisasm().is_some() && find_cuobjdump().is_some(), "pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump");
    let fb = FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 };
    let h100 = DeviceLimits::H100;
    let cases = [
        ([32usize, 28, 28], Precision::Fp32, "sweep"),
        ([32, 28, 28], Precision::Bf16, "sweep"),
        ([64, 14, 14], Precision::Fp32, "sweep"),
        ([64, 14, 14], Precision::Bf16, "sweep"),
        ([128, 32, 32], Precision::Fp32, CIFAR10_L1_TUNING),
    ];
    for (shape, p, which) in cases {
        // the planner's choice is checked by v4_hot_loops_…: the others here (a list of
        // requests names none of the planner's)
        let skip = usize::from(which == "sweep");
        for t in bench_tilings(which, shape, &fb, 100, 20, &h100, p).unwrap().into_iter().skip(skip) {
            let (plan, defines) =
                training_instance_tiled(shape, &fb, 100, 20, &h100, p, Some(&V4TilingRequest::from(t))).unwrap_or_else(|e| panic!("{e}"));
            let c = check_planned(plan, &defines, &h100, "sm_90").unwrap_or_else(|e| panic!("{e}"));
            for k in &c.kernels {
                println!(
                    "{shape:?} {p} [{t}] {}: {} registers, local {} B in {} instructions, hot loop {:?}",
                    k.kernel, k.registers, k.local_bytes, k.local_ops, k.hot
                );
            }
            assert!(c.problems.is_empty(), "{shape:?} {p} [{t}]: {:?}", c.problems);
        }
    }
}

/// An affine operand (both maps LINEAR: every linear layer's operands, a convolution's weights) is
/// loaded without the index tables — a base address plus a constant step per element, a predicated
/// load, no entry reads and no per-element branches on the entries' kinds. Read off the path one op
/// runs (gemm_tc.cu compiled with its operand modes pinned, `gemm_tc::pin_defines`): fc1's forward
/// (both operands affine) must take at most 4/5 of the instructions per k-tile of the same op read
/// through the tables (`gemm_tc::through_tables`), in every precision (sm_90, 2026-12-03, its input
/// as int8 codes: fp32 518 against 732, tf32 499 against 712, bf16 383 against 595), and still
/// issue its 32 loads per tile.
#[test]
fn gemm_tc_reads_affine_operands_without_the_index_tables() {
    use backei::gpu::gemm_tc::{fashion_step_gemms, is_affine, pin_defines, through_tables};
    use backei::gpu::sass::check_module;
    require_nvrtc();
    assert!(find_nvdisasm().is_some() && find_cuobjdump().is_some(), "pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump");
    let (_, d) = fashion_step_gemms().into_iter().find(|(op, _)| *op == "fc1 forward").expect("fc1 forward");
    assert!(is_affine(&d.a) && is_affine(&d.b));
    let path = |d| check_module("gemm_tc", "sm_90", &pin_defines(&d)).unwrap_or_else(|e| panic!("{e}"));
    let (affine, tables) = (path(d), path(through_tables(d)));
    for name in ["gemm_tc_fp32", "gemm_tc_tf32", "gemm_tc_bf16"] {
        let loop_of = |ks: &[backei::gpu::sass::KernelCheck]| {
            let k = ks.iter().find(|k| k.kernel == name).unwrap_or_else(|| panic!("{name} not in the module"));
            assert_eq!(k.local_bytes, 0, "{name}");
            k.hot.unwrap_or_else(|| panic!("{name}: no loop"))
        };
        let (a, t) = (loop_of(&affine), loop_of(&tables));
        println!("{name}: fc1 forward's k-tile loop {} instructions affine, {} through the tables ({a:?})", a.total, t.total);
        assert!(a.mma >= 8 && a.ldg == 32, "{name}: the k-tile loop with its 32 loads: {a:?}");
        assert!(5 * a.total <= 4 * t.total, "{name}: affine {} instructions per k-tile, tables {}", a.total, t.total);
    }
}

/// The big tiles (128×128, `BACKEI_TC_TILES=big`) exist to halve the staging per product: on the
/// path cifar10's conv2 forward runs (operand modes pinned, its input as int8 codes), a `_big`
/// loop pass — a warp's 64×32×32 — must take at most 0.6 of two square-tile passes (2 × 32×32×32),
/// in every precision, with twice the MMAs per pass (sm_90, 2026-12-03: fp32 706 against 2 × 673,
/// tf32 677 against 2 × 648, bf16 577 against 2 × 532), and no local memory.
#[test]
fn gemm_tc_big_tiles_halve_the_instructions_per_product() {
    use backei::gpu::gemm_tc::{cifar10_step_gemms, pin_defines, TileShape};
    use backei::gpu::sass::check_module;
    require_nvrtc();
    assert!(find_nvdisasm().is_some() && find_cuobjdump().is_some(), "pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump");
    let (_, d) = cifar10_step_gemms().into_iter().find(|(op, _)| *op == "conv2 forward").expect("conv2 forward");
    let kernels = check_module("gemm_tc", "sm_90", &pin_defines(&d)).unwrap_or_else(|e| panic!("{e}"));
    for p in Precision::ALL {
        let loop_of = |tile: TileShape| {
            let name = tile.kernel(p);
            let k = kernels.iter().find(|k| k.kernel == name).unwrap_or_else(|| panic!("{name} not in the module"));
            assert_eq!(k.local_bytes, 0, "{name}");
            k.hot.unwrap_or_else(|| panic!("{name}: no loop"))
        };
        let (big, square) = (loop_of(TileShape::Big), loop_of(TileShape::Square));
        println!("{p}: conv2 forward's k-tile loop {} instructions on the big tiles, {} on the square ones", big.total, square.total);
        assert_eq!(big.mma, 2 * square.mma, "{p}: a big warp tile is two square ones: {big:?} {square:?}");
        assert!(10 * big.total <= 6 * 2 * square.total, "{p}: big {} instructions per pass, square 2 × {}", big.total, square.total);
    }
}

/// The feed-forward tensor-core GEMMs (cuda/gemm_tc.cu) as NVRTC builds them for sm_90: the k-tile
/// loop issues every thread's 16 + 16 loads of the next A and B tiles before it stores any (they
/// are in flight behind the current tile's MMAs: register double buffering). Converting each
/// element as it arrived kept one load in flight, a memory round trip per element. The index
/// tables rebuilt every k-tile (between two barriers) divide by multiply-high and shift
/// (`FastDiv`): no integer division in the loop (there were 4).
#[test]
fn gemm_tc_keeps_its_next_tiles_loads_in_flight_behind_the_mmas() {
    require_nvrtc();
    assert!(find_nvdisasm().is_some() && find_cuobjdump().is_some(), "pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump");
    let kernels = backei::gpu::sass::check_module("gemm_tc", "sm_90", &[]).unwrap_or_else(|e| panic!("{e}"));
    for name in [
        "gemm_tc_fp32",
        "gemm_tc_tf32",
        "gemm_tc_bf16",
        "gemm_tc_fp32_m32",
        "gemm_tc_tf32_m32",
        "gemm_tc_bf16_m32",
        "gemm_tc_fp32_big",
        "gemm_tc_tf32_big",
        "gemm_tc_bf16_big",
        "gemm_tc_fp32_mid",
        "gemm_tc_tf32_mid",
        "gemm_tc_bf16_mid",
    ] {
        let k = kernels.iter().find(|k| k.kernel == name).unwrap_or_else(|| panic!("{name} not in the module"));
        let m = k.hot.unwrap_or_else(|| panic!("{name}: no loop"));
        // a static count over the loop's code: both operand layouts' gathers (k contiguous or not)
        // are laid out in it, one of them runs — 32 loads on the path a tile takes
        println!("{name}: {} registers, hot loop {m:?}, {} global loads between shared stores in its code", k.registers, k.hot_loads);
        assert!(m.mma >= 8, "{name}: the hot loop is the k-tile loop: {m:?}");
        // a thread's elements of A's and B's tiles: 32 (square, big), 40 (wide), 24 (mid)
        let want = if name.ends_with("_mid") { 24 } else { 32 };
        assert!(k.hot_loads >= want, "{name}: {} global loads between shared stores ({want} expected)", k.hot_loads);
        assert_eq!(k.local_bytes, 0, "{name}");
        assert_eq!(m.idiv, 0, "{name}: an integer division in the k-tile loop: {m:?}");
    }
}

/// The elementwise kernels' grid-stride loops keep their coordinates as mixed-radix digits
/// advanced by the stride (`cuda/grid_digits.cuh`): no integer division per element. They had
/// 2–6 64-bit divisions per element (a ~70-instruction call each; avgpool2_forward_f32's loop was
/// 513 instructions for 4 elements, now ~230). One exception, named: the fused loss backward's
/// 32-bit row division (one thread per (row, class) of B·K ≤ a few thousand outputs).
#[test]
fn elementwise_grid_stride_loops_do_not_divide() {
    require_nvrtc();
    assert!(
        find_nvdisasm().is_some() && find_cuobjdump().is_some(),
        "pip install nvidia-cuda-nvdisasm nvidia-cuda-nvcc-cu12 nvidia-cuda-cuobjdump"
    );
    let allowed = ["spiking_loss_backward_v1_f32"];
    let mut checked = 0;
    for module in ["pool", "dropout", "conv", "loss", "optim", "spiking", "gemm_tc"] {
        for k in backei::gpu::sass::check_module(module, "sm_90", &[]).unwrap_or_else(|e| panic!("{module}: {e}")) {
            let Some(m) = k.hot else { continue };
            println!("{module}/{}: hot loop {m:?}", k.kernel);
            if !allowed.contains(&k.kernel.as_str()) {
                assert_eq!(m.idiv, 0, "{module}/{}: an integer division in its loop: {m:?}", k.kernel);
                checked += 1;
            }
        }
    }
    assert!(checked >= 25, "only {checked} kernels with a loop: a module lost its kernels?");
}

/// The window-staged convolutions (cuda/conv_halo.cu) as NVRTC builds them for sm_90: their hot
/// loop is the tap loop over the staged window, in which only the weights' slice moves (cp.async)
/// and the operands come by ldmatrix (sm_90, 2026-12-04: fp32 430 instructions for 96 HMMA on the
/// n256 tiles — 128 of them the FADDs that add each k-step's fragment to the sum — and 260 for 48
/// on m128n64; tf32, whose m16n8k8 does half an fp16 HMMA's work, 285 for 64 and 194 for 32; bf16
/// 165 for 32 and 155 for 16 — the small tile's per-tap overhead), where
/// the generic kernel's 32-row data gradient spends 993 instructions a k-step in fp32 mode, two
/// thirds of them gathering its operand per tap. Checked: at most 10 instructions per HMMA, no
/// local memory, no integer division.
#[test]
fn window_staged_convolutions_loop_over_taps_on_tensor_cores() {
    require_nvrtc();
    assert!(find_nvdisasm().is_some() && find_cuobjdump().is_some(), "pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump");
    let kernels = backei::gpu::sass::check_module("conv_halo", "sm_90", &[]).unwrap_or_else(|e| panic!("{e}"));
    let mut checked = 0;
    for p in ["fp32", "tf32", "bf16"] {
        for tile in ["m64n256", "m32n256", "m128n64"] {
            let name = format!("conv_halo_{p}_{tile}");
            let k = kernels.iter().find(|k| k.kernel == name).unwrap_or_else(|| panic!("{name} not in the module"));
            let m = k.hot.unwrap_or_else(|| panic!("{name}: no loop"));
            println!("{name}: {} registers, hot loop {m:?}", k.registers);
            // the named exception (KernelStats::spills): the fp32 256-pixel tiles' 4 bytes of spill
            // (an 8-byte stack frame), never inside the tap loop
            let allowed = if p == "fp32" && tile.ends_with("n256") { 8 } else { 0 };
            assert!(k.local_bytes <= allowed, "{name}: {} bytes of local memory (spills)", k.local_bytes);
            assert_eq!(m.local, 0, "{name}: the tap loop touches local memory: {m:?}");
            assert_eq!(m.idiv, 0, "{name}: an integer division in the tap loop: {m:?}");
            assert!(m.mma >= 16, "{name}: the hot loop is the tap loop: {m:?}");
            assert!(m.total <= 10 * m.mma, "{name}: {} instructions for {} HMMA", m.total, m.mma);
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}
