//! The feed-forward layers' GEMMs at the reference size (B = 100, T = 20: 2000 samples or rows):
//! cuBLAS's FP32 path (im2col for the convolutions) against the tensor-core kernels of
//! `cuda/gemm_tc.cu` in each precision, per layer of the fashion-mnist and cifar10 networks,
//! forward and backward (weight, bias and data gradients). Each tensor-core result is first
//! checked against cuBLAS's to the precision's tolerance (`gemm_tc`'s docs), then both are timed
//! with CUDA events (warm-up, the median of 11) and reported as ms and TFLOP/s (2 per
//! multiply-add). The fastest correct path per precision is what `BACKEI_FEEDFORWARD` should
//! default to: cuBLAS stays the fp32 default until these rows say otherwise (docs/gpu.md).
//! Layers with a GEMM that takes the 256-thread tiles (`BACKEI_TC_TILES=big`, opt-in: 128×128 or
//! 64×128) get `tc <p> big` rows, checked against cuBLAS like the others; whether they give the
//! bits of `tc <p>` on the default tiles is printed (the same bits only where both split K alike).
//! Convolutions the window-staged kernels take (`BACKEI_TC_CONV=halo`, opt-in: `cuda/conv_halo.cu`,
//! forward and data gradient) get `tc <p> halo` rows, checked against cuBLAS like `tc <p>`.
//!
//! Without a GPU it says so and exits 0. `cargo bench --bench feedforward [-- FILTER]`.

use backei::cpu::conv::ConvGeom;
use backei::gpu::backei_layer::DeviceLimits;
use backei::gpu::conv_halo::{self, HaloOp};
use backei::gpu::gemm_tc::{self, FeedForward, FeedForwardWs, XForm};
use backei::gpu::{conv, linear, GpuDevice};
use backei::{NetworkSpec, Precision};
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

const SAMPLES: usize = 2000;
const REPS: usize = 11;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One feed-forward layer of a network.
#[derive(Clone, Copy)]
enum Layer {
    Conv(ConvGeom),
    Linear { n_in: usize, n_out: usize },
}

fn layers(spec: &NetworkSpec) -> Vec<(String, Layer)> {
    use backei::LayerSpec;
    spec.plan()
        .unwrap()
        .iter()
        .enumerate()
        .filter_map(|(i, lp)| {
            let [c, h, w] = lp.input;
            match lp.spec {
                LayerSpec::Conv { out_channels, kernel, padding } => {
                    Some((format!("{} conv{i}", spec.name), Layer::Conv(ConvGeom::new(c, out_channels, h, w, kernel, padding))))
                }
                LayerSpec::Linear { out_features } => {
                    Some((format!("{} linear{i}", spec.name), Layer::Linear { n_in: c, n_out: out_features }))
                }
                _ => None,
            }
        })
        .collect()
}

struct Buffers {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    x: CudaSlice<f32>,
    y: CudaSlice<f32>,
    dy: CudaSlice<f32>,
    dw: CudaSlice<f32>,
    db: CudaSlice<f32>,
    dx: CudaSlice<f32>,
    /// x as int8 codes (spike inputs only): what the tensor cores read where the network keeps
    /// pooled spikes as codes (`memory::pooled_as_codes`; here c = x, factor 1).
    xq: Option<CudaSlice<f32>>,
}

fn rand(dev: &GpuDevice, rng: &mut ChaCha8Rng, n: usize, spikes: bool) -> Res<CudaSlice<f32>> {
    let v: Vec<f32> =
        (0..n).map(|_| if spikes { [-1.0, 0.0, 0.0, 1.0][rng.random_range(0..4)] } else { rng.random_range(-1.0f32..1.0) }).collect();
    Ok(dev.stream.clone_htod(&v)?)
}

/// (forward, backward) multiply-adds, input length, output length, weights, biases.
fn dims(l: &Layer) -> (f64, f64, usize, usize, usize, usize) {
    match *l {
        Layer::Conv(g) => {
            let mac = (SAMPLES * g.out_pixels() * g.cout * g.col_rows()) as f64;
            (mac, 2.0 * mac, SAMPLES * g.in_len(), SAMPLES * g.out_len(), g.weight_len(), g.cout)
        }
        Layer::Linear { n_in, n_out } => {
            let mac = (SAMPLES * n_in * n_out) as f64;
            (mac, 2.0 * mac, SAMPLES * n_in, SAMPLES * n_out, n_in * n_out, n_out)
        }
    }
}

/// Forward (`fwd`) or backward of `l` with `ws`; `xf`: how the input is stored (spike inputs are
/// exact; `XForm::Q8` reads `bf.xq`).
fn run(dev: &GpuDevice, ws: &mut FeedForwardWs, l: &Layer, bf: &mut Buffers, fwd: bool, xf: XForm) -> Res<()> {
    let x = match (xf, &bf.xq) {
        (XForm::Q8(_), Some(q)) => q.as_view(),
        (XForm::Q8(_), None) => return Err("int8 codes of a real input".into()),
        _ => bf.x.as_view(),
    };
    match *l {
        Layer::Conv(g) => {
            if fwd {
                conv::forward_with(dev, ws, &g, SAMPLES, &bf.w.as_view(), &bf.b.as_view(), &x, &mut bf.y.as_view_mut(), xf)?
            } else {
                let mut dx = bf.dx.as_view_mut();
                conv::backward_with(
                    dev,
                    ws,
                    &g,
                    SAMPLES,
                    &bf.w.as_view(),
                    &x,
                    &bf.dy.as_view(),
                    &mut bf.dw.as_view_mut(),
                    &mut bf.db.as_view_mut(),
                    Some(&mut dx),
                    xf,
                )?
            }
        }
        Layer::Linear { n_in, n_out } => {
            if fwd {
                linear::forward_with(dev, ws, n_in, n_out, SAMPLES, &bf.w.as_view(), &bf.b.as_view(), &x, &mut bf.y.as_view_mut(), xf)?
            } else {
                let mut dx = bf.dx.as_view_mut();
                linear::backward_with(
                    dev,
                    ws,
                    n_in,
                    n_out,
                    SAMPLES,
                    &bf.w.as_view(),
                    &x,
                    &bf.dy.as_view(),
                    &mut bf.dw.as_view_mut(),
                    &mut bf.db.as_view_mut(),
                    Some(&mut dx),
                    xf,
                )?
            }
        }
    }
    Ok(())
}

fn median_ms(dev: &GpuDevice, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    let mut ms = Vec::new();
    for _ in 0..REPS {
        // timing events: record_event(None) makes them with CU_EVENT_DISABLE_TIMING, whose
        // elapsed time is CUDA_ERROR_INVALID_HANDLE (every row of the first GPU run failed so)
        let a = dev.stream.record_event(Some(CU_EVENT_DEFAULT))?;
        f()?;
        let b = dev.stream.record_event(Some(CU_EVENT_DEFAULT))?;
        ms.push(a.elapsed_ms(&b)? as f64);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[REPS / 2])
}

/// max |a − b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1e-30f64, |m, &x| m.max((x as f64).abs()));
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max) / scale
}

fn tolerance(p: Precision) -> f64 {
    // the op-level tolerances of tests/common/ff_check.rs, against cuBLAS (itself f32)
    match p {
        Precision::Fp32 => 1e-5,
        Precision::Tf32 => 2e-3,
        Precision::Bf16 => 1.5e-2,
    }
}

fn bench_layer(dev: &Arc<GpuDevice>, name: &str, l: &Layer, exact: bool) -> Res<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mac_f, mac_b, nin, nout, nw, nb) = dims(l);
    let x = rand(dev, &mut rng, nin, exact)?;
    // spike inputs also as int8 codes (c = x, factor 1: the same values)
    let xq = if exact {
        let host = dev.stream.clone_dtoh(&x)?;
        let mut bytes: Vec<u8> = host.iter().map(|&v| v as i8 as u8).collect();
        bytes.resize(host.len().div_ceil(4) * 4, 0);
        let words: Vec<f32> = bytes.chunks(4).map(|q| f32::from_le_bytes([q[0], q[1], q[2], q[3]])).collect();
        Some(dev.stream.clone_htod(&words)?)
    } else {
        None
    };
    let mut bf = Buffers {
        w: rand(dev, &mut rng, nw, false)?,
        b: rand(dev, &mut rng, nb, false)?,
        x,
        y: dev.stream.alloc_zeros(nout)?,
        dy: rand(dev, &mut rng, nout, false)?,
        dw: dev.stream.alloc_zeros(nw)?,
        db: dev.stream.alloc_zeros(nb)?,
        dx: dev.stream.alloc_zeros(nin)?,
        xq,
    };
    let limits = DeviceLimits::of(dev)?;
    let mut results: Vec<(String, [Vec<f32>; 3])> = Vec::new();
    // (mode, input form, 256-thread tiles, window-staged convolutions)
    let mut modes: Vec<(FeedForward, XForm, bool, bool)> = [
        FeedForward::Cublas,
        FeedForward::TensorCore(Precision::Fp32),
        FeedForward::TensorCore(Precision::Tf32),
        FeedForward::TensorCore(Precision::Bf16),
    ]
    .into_iter()
    .map(|m| (m, exact.into(), false, false))
    .collect();
    if exact {
        // reading the codes: must give the bits of "tc fp32" (the emulator checks this in CI)
        modes.push((FeedForward::TensorCore(Precision::Fp32), XForm::Q8(1.0), false, false));
    }
    if takes_big_tiles(l, &limits) {
        // the 256-thread tiles (BACKEI_TC_TILES=big, opt-in): must give the bits of the default tiles
        for p in Precision::ALL {
            modes.push((FeedForward::TensorCore(p), exact.into(), true, false));
        }
    }
    for p in Precision::ALL {
        if takes_halo(l, p, exact, &limits) {
            // the window-staged convolutions (BACKEI_TC_CONV=halo, opt-in)
            modes.push((FeedForward::TensorCore(p), exact.into(), false, true));
        }
    }
    for (mode, xf, big, halo) in modes {
        let mut ws = FeedForwardWs::new(dev, mode, limits)?.with_big_tiles(big).with_halo_convs(halo);
        let label = match (mode, xf, big, halo) {
            (FeedForward::Cublas, ..) => "cublas fp32".to_string(),
            (FeedForward::TensorCore(p), XForm::Q8(_), ..) => format!("tc {p} int8"),
            (FeedForward::TensorCore(p), _, true, _) => format!("tc {p} big"),
            (FeedForward::TensorCore(p), _, _, true) => format!("tc {p} halo"),
            (FeedForward::TensorCore(p), ..) => format!("tc {p}"),
        };
        // one forward and one backward from zeroed gradients, for the check
        dev.stream.memset_zeros(&mut bf.dw)?;
        dev.stream.memset_zeros(&mut bf.db)?;
        run(dev, &mut ws, l, &mut bf, true, xf)?;
        run(dev, &mut ws, l, &mut bf, false, xf)?;
        let out = [dev.stream.clone_dtoh(&bf.y)?, dev.stream.clone_dtoh(&bf.dw)?, dev.stream.clone_dtoh(&bf.dx)?];
        let bits = |v: &[Vec<f32>; 3]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<u32>>();
        // the 256-thread tiles and the int8 codes against their twins: the same bits where the
        // two plans split K alike (the emulator and tests/gpu_feedforward.rs check that); at the
        // bench's sizes the first GPU run (2026-12-04) saw other bits — a different split of K,
        // or accumulation in the tensor cores that the emulator does not model (bench/RESULTS.md)
        // — so it is reported here, and the rows are checked against cuBLAS like the others
        let twin = match (mode, xf, big) {
            (FeedForward::TensorCore(p), _, true) => Some(format!("tc {p}")),
            (FeedForward::TensorCore(_), XForm::Q8(_), _) => Some("tc fp32".to_string()),
            _ => None,
        };
        let same_bits = twin.and_then(|t| results.iter().find(|(l, _)| *l == t)).map(|(_, o)| bits(o) == bits(&out));
        if let (FeedForward::TensorCore(p), Some((_, reference))) = (mode, results.first()) {
            let err = (0..3).map(|k| rel(&out[k], &reference[k])).fold(0.0, f64::max);
            if err > tolerance(p) {
                println!("  {name:<22} {label:<12} WRONG: differs from cuBLAS by {err:.2e} of the scale (tolerance {:.0e})", tolerance(p));
                continue;
            }
        }
        let f = median_ms(dev, || run(dev, &mut ws, l, &mut bf, true, xf))?;
        let b = median_ms(dev, || run(dev, &mut ws, l, &mut bf, false, xf))?;
        println!(
            "  {name:<22} {label:<12} forward {f:>8.3} ms {:>7.1} TFLOP/s   backward {b:>8.3} ms {:>7.1} TFLOP/s{}",
            2.0 * mac_f / f / 1e9,
            2.0 * mac_b / b / 1e9,
            match same_bits {
                Some(true) => "   (the bits of its twin)",
                Some(false) => "   (not the bits of its twin)",
                None => "",
            }
        );
        results.push((label, out));
    }
    Ok(())
}

/// Whether the window-staged kernels take the convolution's forward or data gradient.
fn takes_halo(l: &Layer, p: Precision, exact: bool, limits: &DeviceLimits) -> bool {
    match *l {
        Layer::Conv(g) => {
            conv_halo::halo_plan(HaloOp::Forward, &g, SAMPLES, p, exact, limits).is_some()
                || conv_halo::halo_plan(HaloOp::BackwardData, &g, SAMPLES, p, false, limits).is_some()
        }
        Layer::Linear { .. } => false,
    }
}

/// Whether any GEMM of the layer's forward or backward takes other tiles when the 256-thread ones
/// are allowed (`BACKEI_TC_TILES=big`: 128×128 or 64×128).
fn takes_big_tiles(l: &Layer, limits: &DeviceLimits) -> bool {
    let descs = match *l {
        Layer::Conv(g) => vec![
            gemm_tc::conv_forward(&g, SAMPLES, 0, 0, 0, 0, false),
            gemm_tc::conv_backward_data(&g, SAMPLES, 0, 0, 0),
            gemm_tc::conv_weight_grad(&g, SAMPLES, 0, 0, 0, 0, false),
        ],
        Layer::Linear { n_in, n_out } => vec![
            gemm_tc::linear_forward(n_in, n_out, SAMPLES, 0, 0, 0, 0, false),
            gemm_tc::linear_backward_data(n_in, n_out, SAMPLES, 0, 0, 0),
            gemm_tc::linear_weight_grad(n_in, n_out, SAMPLES, 0, 0, 0, 0, false),
        ],
    };
    let tile = |d: &gemm_tc::GemmDesc, big| gemm_tc::gemm_plan_tiles(d.m as usize, d.cols(), d.k as usize, limits, big).tile;
    descs.iter().any(|d| tile(d, true) != tile(d, false))
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let dev = match GpuDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("feed-forward GEMM bench: GPU part skipped: {e}");
            return;
        }
    };
    println!("feed-forward GEMMs on {} ({}), {SAMPLES} samples/rows (B = 100, T = 20)", dev.name, dev.kernels.arch());
    for spec in [NetworkSpec::fashion_mnist(), NetworkSpec::cifar10()] {
        let plan = spec.plan().unwrap();
        for (name, l) in layers(&spec) {
            if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                continue;
            }
            // which inputs are spikes: as the network decides
            let i: usize = name.rsplit(|c: char| !c.is_ascii_digit()).next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let exact = backei::gpu::gemm_tc::input_exact_in_fp16(&spec, &plan, i);
            if let Err(e) = bench_layer(&dev, &name, &l, exact) {
                println!("  {name}: failed: {e}");
            }
        }
    }
}
