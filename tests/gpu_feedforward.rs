//! The feed-forward layers' tensor-core GEMMs on a GPU, through `conv::forward_with` and the rest
//! exactly as the network calls them, against the CPU engine in every precision
//! (`tests/common/ff_check.rs`, the emulator's checks), and dropout fused into pooling against the
//! CPU's two layers, bit for bit. All need a CUDA GPU (`cargo test --test gpu_feedforward --
//! --ignored`, staged in bench/gpu/session.sh); without one they FAIL.
mod common;

use backei::cpu::conv::ConvGeom;
use backei::gpu::backei_layer::DeviceLimits;
use backei::gpu::gemm_tc::{FeedForward, FeedForwardWs};
use backei::gpu::{conv, dropout, linear, GpuDevice};
use backei::Precision;
use common::ff_check::{check_convs, check_linears, FfDevice, Grads};
use cudarc::driver::CudaSlice;
use std::sync::Arc;

struct Gpu(Arc<GpuDevice>);

impl Gpu {
    fn new() -> Self {
        Gpu(GpuDevice::open(0).expect("these tests need a CUDA GPU"))
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
        FeedForwardWs::new(&self.0, FeedForward::TensorCore(p), DeviceLimits::of(&self.0).unwrap()).unwrap()
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
