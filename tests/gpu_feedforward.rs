//! The feed-forward layers' tensor-core GEMMs on a GPU, through `conv::forward_with` and the rest
//! exactly as the network calls them, against the CPU engine in every precision
//! (`tests/common/ff_check.rs`, the emulator's checks), and dropout fused into pooling against the
//! CPU's two layers, bit for bit. All need a CUDA GPU (`cargo test --test gpu_feedforward --
//! --ignored`, staged in bench/gpu/session.sh); without one they FAIL.
mod common;

use backei::cpu::conv::ConvGeom;
use backei::gpu::backei_layer::DeviceLimits;
use backei::gpu::conv_halo::{halo_plan, HaloOp};
use backei::gpu::gemm_tc::{FeedForward, FeedForwardWs};
use backei::gpu::{conv, dropout, linear, GpuDevice};
use backei::Precision;
use common::ff_check::{check_convs, check_linears, conv_case, FfDevice, Grads};
use cudarc::driver::CudaSlice;
use std::sync::Arc;

/// The device, and whether convolutions take the window-staged kernels where they apply
/// (`BACKEI_TC_CONV=halo`).
struct Gpu(Arc<GpuDevice>, bool);

impl Gpu {
    fn new() -> Self {
        Gpu(GpuDevice::open(0).expect("these tests need a CUDA GPU"), false)
    }
    fn up(&self, x: &[f32]) -> CudaSlice<f32> {
        self.0.stream.clone_htod(x).unwrap()
    }
    /// NaN-filled: whatever the kernels do not write stays NaN.
    fn poisoned(&self, n: usize) -> CudaSlice<f32> {
        self.up(&vec![f32::NAN; n])
    }
    fn down(&self, x: &CudaSlice<f32>) -> Vec<f32> {
        self.0.stream.clone_dtoh(x).unwrap()
    }
    fn ws(&self, p: Precision) -> FeedForwardWs {
        FeedForwardWs::new(&self.0, FeedForward::TensorCore(p), DeviceLimits::of(&self.0).unwrap()).unwrap().with_halo_convs(self.1)
    }
}

impl FfDevice for Gpu {
    fn conv_forward(&self, p: Precision, g: &ConvGeom, s: usize, w: &[f32], b: &[f32], x: &[f32], exact: bool) -> Vec<f32> {
        let (wd, bd, xd, mut yd) = (self.up(w), self.up(b), self.up(x), self.poisoned(s * g.out_len()));
        let mut ws = self.ws(p);
        conv::forward_with(&self.0, &mut ws, g, s, &wd.as_view(), &bd.as_view(), &xd.as_view(), &mut yd.as_view_mut(), exact).unwrap();
        self.down(&yd)
    }
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
    ) -> Grads {
        let (wd, xd, dyd) = (self.up(w), self.up(x), self.up(dy));
        let (mut dwd, mut dbd, mut dxd) = (self.up(dw0), self.up(db0), self.poisoned(s * g.in_len()));
        let mut ws = self.ws(p);
        let mut dx = dxd.as_view_mut();
        conv::backward_with(
            &self.0,
            &mut ws,
            g,
            s,
            &wd.as_view(),
            &xd.as_view(),
            &dyd.as_view(),
            &mut dwd.as_view_mut(),
            &mut dbd.as_view_mut(),
            Some(&mut dx),
            exact,
        )
        .unwrap();
        Grads { dw: self.down(&dwd), db: self.down(&dbd), dx: self.down(&dxd) }
    }
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
    ) -> Vec<f32> {
        let (wd, bd, xd, mut yd) = (self.up(w), self.up(b), self.up(x), self.poisoned(rows * n_out));
        let mut ws = self.ws(p);
        linear::forward_with(
            &self.0,
            &mut ws,
            n_in,
            n_out,
            rows,
            &wd.as_view(),
            &bd.as_view(),
            &xd.as_view(),
            &mut yd.as_view_mut(),
            exact,
        )
        .unwrap();
        self.down(&yd)
    }
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
    ) -> Grads {
        let (wd, xd, dyd) = (self.up(w), self.up(x), self.up(dy));
        let (mut dwd, mut dbd, mut dxd) = (self.up(dw0), self.up(db0), self.poisoned(rows * n_in));
        let mut ws = self.ws(p);
        let mut dx = dxd.as_view_mut();
        linear::backward_with(
            &self.0,
            &mut ws,
            n_in,
            n_out,
            rows,
            &wd.as_view(),
            &xd.as_view(),
            &dyd.as_view(),
            &mut dwd.as_view_mut(),
            &mut dbd.as_view_mut(),
            Some(&mut dx),
            exact,
        )
        .unwrap();
        Grads { dw: self.down(&dwd), db: self.down(&dbd), dx: self.down(&dxd) }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_convolutions_match_the_cpu_in_every_mode() {
    let gpu = Gpu::new();
    for p in Precision::ALL {
        check_convs(&gpu, p);
    }
}

/// The window-staged convolutions in `p` on the shapes the emulator checks (every tile, several
/// chunks and pixel tiles, valid and over-padded) and cifar10's two deep convolutions: the forward
/// and data gradient on `cuda/conv_halo.cu`, the weight gradient on gemm_tc as before.
fn check_window_staged(p: Precision) {
    let gpu = Gpu(GpuDevice::open(0).expect("these tests need a CUDA GPU"), true);
    let limits = DeviceLimits::of(&gpu.0).unwrap();
    let mut shapes = common::ff_check::halo_conv_shapes();
    shapes.push((ConvGeom::new(128, 256, 16, 16, 3, 1), 3));
    shapes.push((ConvGeom::new(256, 512, 8, 8, 3, 1), 2));
    for (i, &(g, s)) in shapes.iter().enumerate() {
        for op in [HaloOp::Forward, HaloOp::BackwardData] {
            assert!(halo_plan(op, &g, s, p, false, &limits).is_some(), "{op:?} {g:?} {p}: the window-staged kernels must take it");
        }
        let seed = 700 + 20 * (p as u64) + i as u64;
        conv_case(&gpu, g, s, p, false, 1.0, seed);
        if p == Precision::Fp32 || i % 2 == 0 {
            conv_case(&gpu, g, s, p, true, 1.0, seed + 100);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn window_staged_convolutions_match_the_cpu_in_fp32_mode() {
    check_window_staged(Precision::Fp32);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn window_staged_convolutions_match_the_cpu_in_tf32_mode() {
    check_window_staged(Precision::Tf32);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn window_staged_convolutions_match_the_cpu_in_bf16_mode() {
    check_window_staged(Precision::Bf16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_linear_layers_match_the_cpu_in_every_mode() {
    check_linears(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dropout_and_pooling_in_one_pass_equal_the_cpu_layers_bit_for_bit() {
    use backei::cpu::{dropout as cdrop, pool as cpool};
    let gpu = Gpu::new();
    let d = &gpu.0;
    let mut rng = common::Rng(22);
    let (steps, planes, h, w) = (4usize, 37usize, 15usize, 17usize);
    let len = planes * h * w;
    for (p, index0) in [(0.5f32, 0u64), (0.3, 777)] {
        let key = backei::rng::dropout_key(4150, 3, 5);
        let x = common::ff_check::host(&mut rng, steps * len, false);
        let dy = common::ff_check::host(&mut rng, steps * planes * (h / 2) * (w / 2), false);
        let mut dd = vec![0f32; steps * len];
        cdrop::forward(key, p, len, index0, &x, &mut dd);
        let mut y = vec![0f32; dy.len()];
        cpool::forward(steps * planes, h, w, &dd, &mut y);
        let mut g = vec![0f32; steps * len];
        cpool::backward(steps * planes, h, w, &dy, &mut g);
        let mut dx = vec![0f32; steps * len];
        cdrop::backward(key, p, len, index0, &g, &mut dx);
        let mut table = dropout::DropoutKeys::new(d, 2).unwrap();
        table.stage(d, &[0, key]).unwrap();
        let mask = dropout::Mask::Key { keys: &table.keys, slot: 1, index0 };
        let (xd, dyd, mut yd, mut dxd) = (gpu.up(&x), gpu.up(&dy), gpu.poisoned(y.len()), gpu.poisoned(dx.len()));
        dropout::forward_pooled(d, mask, p, planes, steps, h, w, &xd.as_view(), backei::gpu::pool::PoolIo::F32, &mut yd.as_view_mut())
            .unwrap();
        dropout::backward_pooled(d, mask, p, planes, steps, h, w, &dyd.as_view(), &mut dxd.as_view_mut()).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert!(bits(&gpu.down(&yd)) == bits(&y), "p {p}: forward");
        assert!(bits(&gpu.down(&dxd)) == bits(&dx), "p {p}: backward");
    }
}

/// Every tile shape of the tensor-core GEMMs gives the bits of the square tiles on the hardware,
/// as on the emulator (`emu_feedforward::emulated_gemms_on_256_thread_tiles_give_the_bits_of_square_tiles`):
/// the wide (32×128), big (128×128, 256 threads) and mid (64×128, 256 threads) kernels under the
/// square plan's split-K, every precision, a convolution's forward, data gradient and weight
/// gradient (its ones column) at sizes off every tile grid, large enough for many blocks.
#[test]
#[ignore = "needs a CUDA GPU"]
fn every_tile_shape_gives_the_bits_of_the_square_tiles() {
    use backei::gpu::gemm_tc::{self, addr, gemm_plan_like, gemm_plan_tiles, run_planned, GemmPlan, TcWorkspace, TileShape};
    let gpu = Gpu::new();
    let d = &gpu.0;
    let limits = DeviceLimits::of(d).unwrap();
    let mut rng = common::Rng(90);
    let g = ConvGeom::new(40, 136, 13, 11, 3, 1);
    let samples = 37;
    let host = |rng: &mut common::Rng, n| common::ff_check::host(rng, n, false);
    let (w, b, x, dy) = (
        host(&mut rng, g.weight_len()),
        host(&mut rng, g.cout),
        host(&mut rng, samples * g.in_len()),
        host(&mut rng, samples * g.out_len()),
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for p in Precision::ALL {
        for what in ["forward", "data gradient", "weight gradient"] {
            let run = |tile: TileShape| -> Vec<Vec<f32>> {
                let (wd, bd, xd, dyd) = (gpu.up(&w), gpu.up(&b), gpu.up(&x), gpu.up(&dy));
                let (yd, dxd) = (gpu.poisoned(samples * g.out_len()), gpu.poisoned(samples * g.in_len()));
                let (dwd, dbd) = (gpu.up(&vec![0.5f32; w.len()]), gpu.up(&vec![0.25f32; b.len()]));
                let a = |v: &CudaSlice<f32>| addr(d, v);
                let (desc, sources) = match what {
                    "forward" => (
                        gemm_tc::conv_forward(&g, samples, a(&wd), a(&bd), a(&xd), addr(d, &yd), false),
                        [(a(&wd), w.len()), (a(&xd), x.len())],
                    ),
                    "data gradient" => {
                        (gemm_tc::conv_backward_data(&g, samples, a(&wd), a(&dyd), addr(d, &dxd)), [(a(&wd), w.len()), (a(&dyd), dy.len())])
                    }
                    _ => (
                        gemm_tc::conv_weight_grad(&g, samples, a(&dyd), a(&xd), addr(d, &dwd), addr(d, &dbd), false),
                        [(a(&dyd), dy.len()), (a(&xd), x.len())],
                    ),
                };
                // the square plan's split-K on every tile: the same sums in the same order
                let whole = gemm_plan_tiles(desc.m as usize, desc.cols(), desc.k as usize, &limits, false);
                let plan = gemm_plan_like(desc.m as usize, desc.cols(), &GemmPlan { tile, ..whole });
                let mut ws = TcWorkspace::new(d).unwrap();
                run_planned(d, &mut ws, desc, &plan, p, sources).unwrap();
                d.stream.synchronize().unwrap();
                match what {
                    "forward" => vec![gpu.down(&yd)],
                    "data gradient" => vec![gpu.down(&dxd)],
                    _ => vec![gpu.down(&dwd), gpu.down(&dbd)],
                }
            };
            let square = run(TileShape::Square);
            assert!(square.iter().flatten().all(|v| v.is_finite()), "{p} {what}: an output left unwritten");
            for tile in [TileShape::Wide, TileShape::Big, TileShape::Mid] {
                for (k, (a, q)) in run(tile).iter().zip(&square).enumerate() {
                    assert!(bits(a) == bits(q), "{p} conv {what}: output {k} differs between the {tile:?} and the square tiles");
                }
            }
        }
    }
}
