//! Writes the shared test vectors that let an independent implementation (the PyTorch one in
//! `bench/reference/`) check the CPU engine's numbers: forward outputs, loss and every gradient,
//! computed in f64.
//!
//!     cargo run --release --example dump_reference_case -- OUT_DIR
//!
//! One safetensors file per case; tensor names and metadata are documented in
//! `bench/reference/README.md`. Layer cases ("kind" = "layer"):
//!   input [T_in,B,C,H,W], grad_out [T,B,C,H,W] (the upstream ∂L/∂s, i.e. L = Σ grad_out·s),
//!   back.weight/back.bias/ei.weight/ei.bias (when on), out [T,B,C,H,W] (s_t), v [T,B,C,H,W],
//!   grad.input, grad.back.weight, ... (same names with a `grad.` prefix).
//! Network cases ("kind" = "network"):
//!   input [1,B,C,H,W] (direct encoding), labels [B] (i64), every parameter by its PyTorch name,
//!   out.layers.<i> [T,B,...] for every spiking layer, readout [B,K], loss [] (MSE),
//!   grad.<param name> for every parameter.

use backei::cpu::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams};
use backei::cpu::loss;
use backei::{FeedbackConfig, Loss, Network, NetworkSpec, NeuronConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tensors and metadata of one case, written as one safetensors file.
#[derive(Default)]
struct Case {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

impl Case {
    fn f64(&mut self, name: &str, shape: &[usize], data: &[f64]) {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}: shape {shape:?} vs {} values", data.len());
        self.tensors.push((name.into(), Dtype::F64, shape.to_vec(), bytemuck::cast_slice(data).to_vec()));
    }

    /// An f32 tensor (for parameters already rounded to f32, so nothing is lost).
    fn f32_exact(&mut self, name: &str, shape: &[usize], data: &[f64]) {
        let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
        assert!(v.iter().zip(data).all(|(a, b)| *a as f64 == *b), "{name}: not exactly representable in f32");
        self.tensors.push((name.into(), Dtype::F32, shape.to_vec(), bytemuck::cast_slice(&v).to_vec()));
    }

    fn i64(&mut self, name: &str, shape: &[usize], data: &[i64]) {
        self.tensors.push((name.into(), Dtype::I64, shape.to_vec(), bytemuck::cast_slice(data).to_vec()));
    }

    fn meta(&mut self, key: &str, value: impl ToString) {
        self.meta.insert(key.into(), value.to_string());
    }

    fn write(self, path: &Path) -> anyhow::Result<()> {
        let views: Vec<(String, TensorView)> =
            self.tensors.iter().map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?))).collect::<anyhow::Result<_>>()?;
        safetensors::tensor::serialize_to_file(views, Some(self.meta), path)?;
        let size = std::fs::metadata(path)?.len();
        println!("{}  {:.1} KiB", path.display(), size as f64 / 1024.0);
        Ok(())
    }
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Settings of one BackEI-layer case.
struct LayerCase {
    name: &'static str,
    shape: [usize; 3],
    back: bool,
    ei: bool,
    radius: usize,
    delay: usize,
    t_in_is_one: bool,
}

const BATCH: usize = 2;
/// See `network_case`.
const NETWORK_GAIN: f64 = 4.0;
const STEPS: usize = 5;

fn layer_case(lc: &LayerCase, seed: u64, out_dir: &Path) -> anyhow::Result<()> {
    let neuron = NeuronConfig::default();
    let fb = FeedbackConfig { back: lc.back, ei: lc.ei, radius: lc.radius, delay: lc.delay };
    let [c, h, w] = lc.shape;
    let k = 2 * lc.radius + 1;
    let n = c * h * w;
    let t_in = if lc.t_in_is_one { 1 } else { STEPS };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // currents in [−1, 2): with the gate near 1/2 some neurons fire, some do not, some go negative
    let input = uniform(&mut rng, t_in * BATCH * n, -1.0, 2.0);
    let grad_out = uniform(&mut rng, STEPS * BATCH * n, -1.0, 1.0);
    // gate weights at PyTorch's default bound, biases a bit wider so gates are not all near 1/2
    let bound = 1.0 / ((c * k * k) as f64).sqrt();
    let wlen = c * c * k * k;
    let (w_b, b_b) = if lc.back { (uniform(&mut rng, wlen, -bound, bound), uniform(&mut rng, c, -1.0, 1.0)) } else { (vec![], vec![]) };
    let (w_e, b_e) = if lc.ei { (uniform(&mut rng, wlen, -bound, bound), uniform(&mut rng, c, -0.3, 0.3)) } else { (vec![], vec![]) };

    let mut layer = BackEiLayer::<f64>::new(lc.shape, fb, &neuron);
    let p = BackEiParams { w_b: &w_b, b_b: &b_b, w_e: &w_e, b_e: &b_e };
    layer.forward(&p, &input, t_in, BATCH, STEPS).expect("valid case");
    let (mut gw_b, mut gb_b, mut gw_e, mut gb_e) = (vec![0.0; w_b.len()], vec![0.0; b_b.len()], vec![0.0; w_e.len()], vec![0.0; b_e.len()]);
    let mut grad_in = vec![0.0; input.len()];
    {
        let mut g = BackEiGrads { w_b: &mut gw_b, b_b: &mut gb_b, w_e: &mut gw_e, b_e: &mut gb_e };
        layer.backward(&p, &mut g, &input, t_in, &grad_out, &mut grad_in).expect("valid case");
    }

    let mut case = Case::default();
    case.meta("kind", "layer");
    for (key, v) in [("back", lc.back), ("ei", lc.ei)] {
        case.meta(key, v);
    }
    case.meta("radius", lc.radius);
    case.meta("delay", lc.delay);
    case.meta("leak", neuron.leak);
    case.meta("threshold", neuron.threshold);
    case.meta("surrogate_width", 1.0);
    case.meta("steps", STEPS);
    case.meta("t_in", t_in);
    let full = [STEPS, BATCH, c, h, w];
    let ws = [c, c, k, k];
    case.f64("input", &[t_in, BATCH, c, h, w], &input);
    case.f64("grad_out", &full, &grad_out);
    case.f64("out", &full, &layer.out);
    case.f64("v", &full, &layer.v);
    case.f64("grad.input", &[t_in, BATCH, c, h, w], &grad_in);
    if lc.back {
        case.f64("back.weight", &ws, &w_b);
        case.f64("back.bias", &[c], &b_b);
        case.f64("grad.back.weight", &ws, &gw_b);
        case.f64("grad.back.bias", &[c], &gb_b);
    }
    if lc.ei {
        case.f64("ei.weight", &ws, &w_e);
        case.f64("ei.bias", &[c], &b_e);
        case.f64("grad.ei.weight", &ws, &gw_e);
        case.f64("grad.ei.bias", &[c], &gb_e);
    }
    let rate = layer.firing_rate();
    println!("{}: firing rate {:.3}, inhibitory fraction {:.3}", lc.name, rate, layer.inhibitory_fraction());
    anyhow::ensure!(rate > 0.05 && rate < 0.95, "{}: firing rate {rate} makes a weak test case", lc.name);
    case.write(&out_dir.join(format!("{}.safetensors", lc.name)))
}

/// The whole network of `spec` at B = 2, T = `steps`, MSE loss, one forward and one backward.
/// With PyTorch's default init and T = 4 almost nothing fires past the first layer, which would
/// make a weak test; every conv/linear weight (not the gates, not the biases) is multiplied by
/// `gain` so that every layer is active. Parameters are then rounded to f32 (stored as f32 to
/// keep the file small; the computation stays f64 and the rounding loses nothing).
fn network_case(name: &str, mut spec: NetworkSpec, steps: usize, seed: u64, gain: f64, out_dir: &Path) -> anyhow::Result<()> {
    spec.steps = steps;
    let batch = 2;
    let mut net = Network::<f64>::new(&spec, seed)?;
    for s in net.slots.clone() {
        let is_gate = s.name.contains(".back.") || s.name.contains(".ei.");
        let g = if s.name.ends_with(".weight") && !is_gate { gain } else { 1.0 };
        for p in &mut net.params[s.range.clone()] {
            *p = (*p * g) as f32 as f64;
        }
    }
    net.training = false; // no dropout in this case (fashion-mnist has none anyway)
    let frame: usize = spec.input.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    // an "image" in [0, 1), direct encoding (T_in = 1)
    let x = uniform(&mut rng, batch * frame, 0.0, 1.0);
    let labels: Vec<u8> = vec![3, 7];
    let classes = net.classes();
    let readout = net.forward(&x, 1, batch)?.to_vec();
    let mut dy = vec![0.0; batch * classes];
    let l = loss::loss_and_grad(Loss::Mse, &readout, &labels, classes, &mut dy);
    net.zero_grads();
    net.backward(&dy, false)?;

    let mut case = Case::default();
    case.meta("kind", "network");
    case.meta("network", &spec.name);
    case.meta("steps", steps);
    case.meta("seed", seed);
    case.meta("weight_gain", gain);
    case.meta("loss", "mse");
    let [c, h, w] = spec.input;
    case.f64("input", &[1, batch, c, h, w], &x);
    case.i64("labels", &[batch], &labels.iter().map(|&l| l as i64).collect::<Vec<_>>());
    for s in &net.slots {
        case.f32_exact(&s.name, &s.shape, &net.params[s.range.clone()]);
        case.f64(&format!("grad.{}", s.name), &s.shape, &net.grads[s.range.clone()]);
    }
    let plan = spec.plan()?;
    for (i, lp) in plan.iter().enumerate() {
        if matches!(lp.spec, backei::LayerSpec::BackEi | backei::LayerSpec::Spiking) {
            let out = net.layer_output(i).expect("layer exists");
            let [oc, oh, ow] = lp.output;
            // [T, B, features] after a linear layer, [T, B, C, H, W] after a convolution
            let shape =
                if lp.spec == backei::LayerSpec::Spiking { vec![steps, batch, oc * oh * ow] } else { vec![steps, batch, oc, oh, ow] };
            case.f64(&format!("out.layers.{i}"), &shape, out);
        }
    }
    case.f64("readout", &[batch, classes], &readout);
    case.f64("loss", &[], &[l]);
    for (i, rate, inh) in net.spike_stats() {
        println!("{name}: layer {i} firing rate {rate:.3} inhibitory {inh:?}");
    }
    println!("{name}: loss {l:.6}");
    case.write(&out_dir.join(format!("{name}.safetensors")))
}

fn main() -> anyhow::Result<()> {
    let out_dir: PathBuf =
        std::env::args().nth(1).map(PathBuf::from).ok_or_else(|| anyhow::anyhow!("usage: dump_reference_case OUT_DIR"))?;
    std::fs::create_dir_all(&out_dir)?;
    let shape = [4, 6, 7];
    let cases = [
        LayerCase { name: "layer_d1_r1", shape, back: true, ei: true, radius: 1, delay: 1, t_in_is_one: false },
        LayerCase { name: "layer_d2_r1", shape, back: true, ei: true, radius: 1, delay: 2, t_in_is_one: false },
        LayerCase { name: "layer_d1_r2", shape, back: true, ei: true, radius: 2, delay: 1, t_in_is_one: false },
        LayerCase { name: "layer_d2_r2", shape, back: true, ei: true, radius: 2, delay: 2, t_in_is_one: false },
        LayerCase { name: "layer_d1_r1_tin1", shape, back: true, ei: true, radius: 1, delay: 1, t_in_is_one: true },
        LayerCase { name: "layer_back_only", shape, back: true, ei: false, radius: 1, delay: 1, t_in_is_one: false },
        LayerCase { name: "layer_ei_only", shape, back: false, ei: true, radius: 1, delay: 1, t_in_is_one: false },
        LayerCase { name: "layer_plain", shape, back: false, ei: false, radius: 0, delay: 1, t_in_is_one: false },
        LayerCase { name: "layer_plain_fc", shape: [16, 1, 1], back: false, ei: false, radius: 0, delay: 1, t_in_is_one: false },
    ];
    for (i, lc) in cases.iter().enumerate() {
        layer_case(lc, 4150 + i as u64, &out_dir)?;
    }
    let gain: f64 = std::env::var("DUMP_GAIN").ok().and_then(|g| g.parse().ok()).unwrap_or(NETWORK_GAIN);
    network_case("network_fashion-mnist", NetworkSpec::fashion_mnist(), 4, 4150, gain, &out_dir)?;
    Ok(())
}
