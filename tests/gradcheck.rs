//! Correctness of the CPU engine's BPTT.
//!
//! * `smooth_gradcheck_*`: with H and sign replaced by sigmoid(k·x) and tanh(k·x)
//!   (`FiringMode::Smooth`), the whole network is smooth, so the BPTT gradient must equal
//!   central finite differences (Richardson-extrapolated) of the loss, in f64, for every
//!   parameter element (tensors over 400 elements: 400 random ones) and every input element.
//! * `reference_gradcheck_*`: with the true step functions and a surrogate, the engine's
//!   gradients equal those of the reference twin (`tests/common/twin.rs`): the network written
//!   plainly from model.md on a scalar autodiff tape, whose H and sign nodes carry the surrogate
//!   as their local derivative.
//! * `forward_by_hand_*`: three steps of a 2-channel BackEI layer against a hand-computed table.

mod common;

use backei::cpu::backei_layer::{BackEiLayer, BackEiParams};
use backei::cpu::loss::loss_and_grad;
use backei::spec::{FeedbackConfig, FiringMode, LayerSpec, NetworkSpec, NeuronConfig, Surrogate};
use backei::{Loss, Network};
use common::Rng;

use LayerSpec::*;

fn conv(out: usize, k: usize, p: usize) -> LayerSpec {
    Conv { out_channels: out, kernel: k, padding: p }
}
fn linear(out: usize) -> LayerSpec {
    Linear { out_features: out }
}

fn spec(input: [usize; 3], layers: Vec<LayerSpec>, feedback: FeedbackConfig, steps: usize) -> NetworkSpec {
    NetworkSpec { name: "test".into(), input, layers, feedback, neuron: NeuronConfig::default(), steps }
}

fn fb(back: bool, ei: bool, radius: usize, delay: usize) -> FeedbackConfig {
    FeedbackConfig { back, ei, radius, delay }
}

/// The objective: L = Σ c·readout (c fixed random), or one of the engine's losses.
#[derive(Clone, Copy, Debug)]
enum Objective {
    Linear,
    Engine(Loss),
}

struct Setup {
    net: Network<f64>,
    x: Vec<f64>,
    t_in: usize,
    batch: usize,
    c: Vec<f64>,
    labels: Vec<u8>,
    obj: Objective,
}

impl Setup {
    /// A network with parameters drawn uniformly in ±gain·(PyTorch bound), input in [0, x_max).
    fn new(spec: &NetworkSpec, t_in: usize, batch: usize, obj: Objective, seed: u64, gain: f64, x_max: f64) -> Setup {
        let mut net = Network::<f64>::new(spec, seed).unwrap();
        let mut rng = Rng(seed ^ 0xABCDEF);
        for s in net.slots.clone() {
            for p in &mut net.params[s.range.clone()] {
                *p = rng.uniform(-gain * s.init_bound, gain * s.init_bound);
            }
        }
        let frame: usize = spec.input.iter().product();
        let x = rng.vec(t_in * batch * frame, 0.0, x_max);
        let classes = spec.classes().unwrap();
        let c = rng.vec(batch * classes, -1.0, 1.0);
        let labels = (0..batch).map(|_| rng.below(classes) as u8).collect();
        Setup { net, x, t_in, batch, c, labels, obj }
    }

    /// Forward; returns L and ∂L/∂readout.
    fn loss(&mut self) -> (f64, Vec<f64>) {
        let y = self.net.forward(&self.x, self.t_in, self.batch).unwrap().to_vec();
        match self.obj {
            Objective::Linear => (y.iter().zip(&self.c).map(|(a, b)| a * b).sum(), self.c.clone()),
            Objective::Engine(loss) => {
                let mut dy = vec![0.0; y.len()];
                let l = loss_and_grad(loss, &y, &self.labels, self.net.classes(), &mut dy);
                (l, dy)
            }
        }
    }

    /// BPTT gradients: (parameters, input).
    fn bptt(&mut self) -> (Vec<f64>, Vec<f64>) {
        let (_, dy) = self.loss();
        self.net.zero_grads();
        self.net.backward(&dy, true).unwrap();
        (self.net.grads.clone(), self.net.input_grad.clone())
    }
}

/// Central difference with one Richardson step: (4·D(h/2) − D(h))/3, error O(h⁴).
fn richardson(mut f: impl FnMut(f64) -> f64, h: f64) -> f64 {
    let d = |f: &mut dyn FnMut(f64) -> f64, h: f64| (f(h) - f(-h)) / (2.0 * h);
    let d1 = d(&mut f, h);
    let d2 = d(&mut f, h / 2.0);
    (4.0 * d2 - d1) / 3.0
}

/// Relative tolerance of the smooth check, and its absolute floor. The floor: the round-off of
/// a central difference is ≈ ε·|L|/h ≈ 2.2e-16·|L|/1e-4 ≈ 2e-12·|L| (|L| ≲ 5 here), and the
/// Richardson combination multiplies it by ≈ 3; 1e-10 leaves a factor > 3 of margin and only
/// matters for gradients below 1e-4 (where 1e-6 relative would ask for less than round-off).
const REL: f64 = 1e-6;
const FLOOR: f64 = 1e-10;
const H: f64 = 1e-4;

fn within(a: f64, n: f64) -> bool {
    (a - n).abs() <= REL * n.abs().max(a.abs()) + FLOOR
}

/// BPTT vs finite differences for every parameter tensor (≤ 400 elements each, else a random
/// 400) and every input element. Also checks that every tensor's gradient is not trivially 0.
fn smooth_check(name: &str, spec: NetworkSpec, t_in: usize, batch: usize, obj: Objective, seed: u64) {
    let mut spec = spec;
    spec.neuron.mode = FiringMode::Smooth { k: 5.0 };
    let mut s = Setup::new(&spec, t_in, batch, obj, seed, 1.5, 1.5);
    let (gp, gx) = s.bptt();
    let mut rng = Rng(seed);
    let mut worst = (0.0f64, String::new());
    let mut worst_abs = 0.0f64;
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut check = |what: String, a: f64, n: f64, failures: &mut Vec<String>| {
        let rel = (a - n).abs() / n.abs().max(a.abs()).max(1e-300);
        worst_abs = worst_abs.max((a - n).abs());
        if n.abs() > 1e-4 && rel > worst.0 {
            worst = (rel, what.clone());
        }
        if !within(a, n) {
            failures.push(format!("{what}: bptt {a:e} vs fd {n:e}"));
        }
    };
    for slot in s.net.slots.clone() {
        let len = slot.range.len();
        let idx: Vec<usize> = if len <= 400 { (0..len).collect() } else { (0..400).map(|_| rng.below(len)).collect() };
        let max_g = slot.range.clone().map(|i| gp[i].abs()).fold(0.0, f64::max);
        assert!(max_g > 1e-4, "{name}: gradient of {} is (nearly) zero everywhere (max {max_g:e}): the check would be empty", slot.name);
        for k in idx {
            let i = slot.range.start + k;
            let p0 = s.net.params[i];
            let n = richardson(
                |h| {
                    s.net.params[i] = p0 + h;
                    s.loss().0
                },
                H,
            );
            s.net.params[i] = p0;
            check(format!("{}[{k}]", slot.name), gp[i], n, &mut failures);
            checked += 1;
        }
    }
    assert!(gx.iter().any(|g| g.abs() > 1e-4), "{name}: input gradient is zero");
    for i in 0..s.x.len() {
        let x0 = s.x[i];
        let n = richardson(
            |h| {
                s.x[i] = x0 + h;
                s.loss().0
            },
            H,
        );
        s.x[i] = x0;
        check(format!("input[{i}]"), gx[i], n, &mut failures);
        checked += 1;
    }
    eprintln!(
        "{name}: {checked} derivatives checked, worst relative error (|g| > 1e-4) {:.2e} at {}, worst absolute error {worst_abs:.2e}",
        worst.0, worst.1
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {checked} derivatives disagree:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}

/// conv → BackEI (or plain) → flatten → linear → plain spiking, on a 2×5×5 input.
fn conv_net(feedback: FeedbackConfig, steps: usize, first: LayerSpec) -> NetworkSpec {
    spec([2, 5, 5], vec![conv(3, 3, 1), first, Flatten, linear(4), Spiking], feedback, steps)
}

#[test]
fn smooth_gradcheck_plain_spiking() {
    smooth_check("plain", conv_net(fb(false, false, 1, 1), 4, Spiking), 1, 2, Objective::Linear, 1);
}

#[test]
fn smooth_gradcheck_back_only() {
    smooth_check("back only", conv_net(fb(true, false, 1, 1), 4, BackEi), 1, 2, Objective::Linear, 2);
}

#[test]
fn smooth_gradcheck_ei_only() {
    smooth_check("ei only", conv_net(fb(false, true, 1, 1), 4, BackEi), 1, 2, Objective::Linear, 3);
}

#[test]
fn smooth_gradcheck_back_ei() {
    smooth_check("back+ei", conv_net(fb(true, true, 1, 1), 4, BackEi), 1, 2, Objective::Linear, 4);
}

#[test]
fn smooth_gradcheck_back_ei_delay2() {
    smooth_check("back+ei D=2", conv_net(fb(true, true, 1, 2), 5, BackEi), 1, 2, Objective::Linear, 5);
}

#[test]
fn smooth_gradcheck_back_ei_radius2() {
    smooth_check("back+ei r=2", conv_net(fb(true, true, 2, 1), 4, BackEi), 1, 2, Objective::Linear, 6);
}

#[test]
fn smooth_gradcheck_after_linear() {
    // BackEI after a Linear layer: a 1×1 map with radius 0.
    let s = spec([2, 3, 3], vec![Flatten, linear(5), BackEi, linear(4), Spiking], fb(true, true, 0, 1), 4);
    smooth_check("after linear", s, 1, 3, Objective::Linear, 7);
}

#[test]
fn smooth_gradcheck_two_layers_with_pooling() {
    // 6×6 → BackEI → pool 3×3 → conv → BackEI (r = 1 on 3×3) → pool (odd: 1×1) → linear.
    let s = spec(
        [2, 6, 6],
        vec![conv(3, 3, 1), BackEi, AvgPool, conv(4, 3, 1), BackEi, AvgPool, Flatten, linear(4), Spiking],
        fb(true, true, 1, 1),
        4,
    );
    smooth_check("two layers + pool", s, 1, 2, Objective::Linear, 8);
}

#[test]
fn smooth_gradcheck_per_step_input() {
    smooth_check("per-step input", conv_net(fb(true, true, 1, 1), 4, BackEi), 4, 2, Objective::Linear, 9);
}

#[test]
fn smooth_gradcheck_dropout() {
    // Dropout straight after the (direct) input, after BackEI, and after the linear layer's spikes.
    let s = spec(
        [2, 5, 5],
        vec![
            Dropout { p: 0.25 },
            conv(3, 3, 1),
            BackEi,
            Dropout { p: 0.5 },
            AvgPool,
            Flatten,
            linear(6),
            Spiking,
            Dropout { p: 0.5 },
            linear(4),
            Spiking,
        ],
        fb(true, true, 1, 1),
        4,
    );
    smooth_check("dropout", s, 1, 2, Objective::Linear, 10);
}

#[test]
fn smooth_gradcheck_mse_loss() {
    smooth_check("mse", conv_net(fb(true, true, 1, 1), 4, BackEi), 1, 3, Objective::Engine(Loss::Mse), 11);
}

#[test]
fn smooth_gradcheck_ce_loss() {
    smooth_check("ce", conv_net(fb(true, true, 1, 2), 4, BackEi), 4, 3, Objective::Engine(Loss::Ce), 12);
}

// ---------------------------------------------------------------------------------------------
// Reference twin

/// Engine (exact firing, surrogate backward) vs the twin: readout and every gradient.
fn reference_check(name: &str, spec: NetworkSpec, t_in: usize, batch: usize, seed: u64, gain: f64, x_max: f64) {
    assert_eq!(spec.neuron.mode, FiringMode::Exact);
    // The test must exercise something: every spiking layer both fires and stays silent, and
    // BackEI layers with E/I emit inhibitory (−1) as well as excitatory spikes. Random draws
    // that leave a layer silent are skipped (deterministically: the first good seed is used).
    let active = |stats: &[(usize, f64, Option<f64>)]| {
        stats.iter().all(|(layer, rate, inh)| {
            let ok_inh = !(spec.feedback.ei && spec.layers[*layer] == BackEi) || inh.is_some_and(|f| f > 0.02 && f < 0.98);
            *rate > 0.02 && *rate < 0.98 && ok_inh
        })
    };
    let mut found = None;
    for k in 0..50 {
        let mut s = Setup::new(&spec, t_in, batch, Objective::Linear, seed + 1000 * k, gain, x_max);
        let readout = s.net.forward(&s.x, t_in, batch).unwrap().to_vec();
        let stats = s.net.spike_stats();
        if active(&stats) {
            found = Some((s, readout, stats));
            break;
        }
    }
    let (mut s, readout, stats) = found.unwrap_or_else(|| panic!("{name}: no seed gives activity in every layer"));
    let (gp, gx) = s.bptt();
    let twin = common::twin::run(&spec, &s.net.slots, &s.net.params, &s.x, t_in, batch, &s.c, s.net.dropout_seed, s.net.iteration);
    // the forward must be the same function (a tie at a threshold would be a 1e-16 accident)
    for (i, (a, b)) in readout.iter().zip(&twin.readout).enumerate() {
        assert!((a - b).abs() < 1e-12, "{name}: readout[{i}] engine {a} vs twin {b}");
    }
    let mut worst = 0.0f64;
    let mut nonzero = 0;
    let cmp = |what: &str, a: &[f64], b: &[f64], worst: &mut f64, nonzero: &mut usize| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let err = (x - y).abs();
            let scale = x.abs().max(y.abs());
            if scale > 0.0 {
                *nonzero += 1;
                *worst = worst.max(err / scale);
            }
            // 1e-9 relative; 1e-13 absolute floor for sums that cancel to ~0 (both sides sum
            // the same O(1) terms in different orders: round-off ≈ 1e-16 per term).
            assert!(err <= 1e-9 * scale + 1e-13, "{name}: {what}[{i}] engine {x:e} vs twin {y:e}");
        }
    };
    for slot in &s.net.slots {
        let before = nonzero;
        cmp(&slot.name, &gp[slot.range.clone()], &twin.param_grad[slot.range.clone()], &mut worst, &mut nonzero);
        assert!(nonzero > before, "{name}: the gradient of {} is zero in both: nothing checked", slot.name);
    }
    cmp("input", &gx, &twin.input_grad, &mut worst, &mut nonzero);
    eprintln!("{name}: {nonzero} nonzero gradients agree, worst relative error {worst:.2e}; spike stats {stats:?}");
}

fn with_surrogate(mut s: NetworkSpec, sur: Surrogate) -> NetworkSpec {
    s.neuron.surrogate = sur;
    s
}

#[test]
fn reference_gradcheck_plain() {
    reference_check("plain", conv_net(fb(false, false, 1, 1), 5, Spiking), 1, 3, 21, 2.0, 2.0);
}

#[test]
fn reference_gradcheck_back_ei_delay1_r1() {
    reference_check("back+ei D1 r1", conv_net(fb(true, true, 1, 1), 6, BackEi), 1, 3, 22, 2.0, 2.0);
}

#[test]
fn reference_gradcheck_back_ei_delay2_r2() {
    reference_check("back+ei D2 r2", conv_net(fb(true, true, 2, 2), 6, BackEi), 6, 2, 23, 2.0, 2.0);
}

#[test]
fn reference_gradcheck_back_only_and_ei_only() {
    reference_check("back only", conv_net(fb(true, false, 1, 1), 5, BackEi), 1, 3, 24, 2.0, 2.0);
    reference_check("ei only", conv_net(fb(false, true, 1, 1), 5, BackEi), 1, 3, 25, 2.0, 2.0);
}

#[test]
fn reference_gradcheck_linear_and_pooling() {
    let s = spec([2, 3, 3], vec![Flatten, linear(6), BackEi, linear(4), Spiking], fb(true, true, 0, 2), 5);
    reference_check("after linear", s, 1, 8, 26, 1.5, 2.0);
    let s = spec(
        [2, 6, 6],
        vec![conv(3, 3, 1), BackEi, AvgPool, conv(4, 3, 1), BackEi, AvgPool, Flatten, linear(4), Spiking],
        fb(true, true, 1, 1),
        5,
    );
    reference_check("two layers + pool", s, 5, 2, 27, 2.0, 2.0);
}

#[test]
fn reference_gradcheck_dropout() {
    let s = spec(
        [2, 5, 5],
        vec![conv(3, 3, 1), BackEi, Dropout { p: 0.5 }, AvgPool, Flatten, linear(6), Spiking, Dropout { p: 0.25 }, linear(4), Spiking],
        fb(true, true, 1, 1),
        5,
    );
    reference_check("dropout", s, 1, 3, 28, 2.0, 2.0);
}

#[test]
fn reference_gradcheck_surrogates() {
    let base = conv_net(fb(true, true, 1, 1), 5, BackEi);
    reference_check("rectangle w=0.5", with_surrogate(base.clone(), Surrogate::Rectangle { width: 0.5 }), 1, 3, 29, 2.0, 2.0);
    reference_check("sigmoid α=4", with_surrogate(base.clone(), Surrogate::Sigmoid { alpha: 4.0 }), 1, 3, 30, 2.0, 2.0);
    reference_check("atan α=2", with_surrogate(base, Surrogate::Atan { alpha: 2.0 }), 5, 3, 31, 2.0, 2.0);
}

// ---------------------------------------------------------------------------------------------
// Forward by hand

/// C = 2 on a 1×1 map (r = 0, D = 1, λ = 0.2, θ = 0.5), back + ei, three steps, one sample.
/// W_b = [[1, −2], [0.5, 1]] (row = output channel), b_b = [0, 0.5];
/// W_e = [[1, −1], [−0.5, 0.25]], b_e = [0, 0]; I_1 = I_2 = [1.5, 0.75], I_3 = [1.0, 0.75].
///
/// t = 1: s_0 = 0 → a = b_b = [0, 0.5], g = [σ(0), σ(0.5)] = [0.5, 0.6224593312018546]
///        v = 0.2·0 + g·I = [0.75, 0.466844498401391]; o = [1, 0] (0.4668 ≤ 0.5)
///        z = W_e v = [0.75 − 0.46684 = 0.283155501598609, −0.375 + 0.11671 = −0.2582888753996523]
///        s = sign(z)·o = [1, 0]; u = v·(1 − o) = [0, 0.466844498401391]
/// t = 2: a = W_b s_1 + b_b = [1·1 + 0, 0.5·1 + 0.5] = [1, 1], g = σ(1) = 0.7310585786300049 (both)
///        v = [0 + 0.73106·1.5 = 1.0965878679450074, 0.2·0.46684 + 0.73106·0.75 = 0.6416628336527819]
///        o = [1, 1]; z = [1.09659 − 0.64166 = 0.4549250342922255, −0.54829 + 0.16042 = −0.38787822555930823]
///        s = [+1, −1] (channel 1 is inhibitory at this step); u = [0, 0]
/// t = 3: a = [1·1 − 2·(−1) + 0, 0.5·1 + 1·(−1) + 0.5] = [3, 0], g = [σ(3) = 0.9525741268224334, 0.5]
///        v = [0.95257·1.0 = 0.9525741268224334, 0.5·0.75 = 0.375]; o = [1, 0]
///        z = [0.95257 − 0.375 = 0.5775741268224334, −0.47629 + 0.09375 = −0.3825370634112167]
///        s = [1, 0]
/// The gate matters: at t = 3 channel 1's own −1 closes its gate to 0.5 so it stays silent
/// (with the t = 2 gate 0.731 it would reach 0.548 > θ and fire).
#[test]
fn forward_by_hand_backei_two_channels() {
    let nc = NeuronConfig::default();
    let mut layer = BackEiLayer::<f64>::new([2, 1, 1], fb(true, true, 0, 1), &nc);
    let p = BackEiParams { w_b: &[1.0, -2.0, 0.5, 1.0], b_b: &[0.0, 0.5], w_e: &[1.0, -1.0, -0.5, 0.25], b_e: &[0.0, 0.0] };
    let input = [1.5, 0.75, 1.5, 0.75, 1.0, 0.75];
    layer.forward(&p, &input, 3, 1, 3).unwrap();
    #[rustfmt::skip]
    let table: [([f64; 2], [f64; 2], [f64; 2], [f64; 2]); 3] = [
        // g                                        v                                          z                                              s
        ([0.5, 0.6224593312018546],                 [0.75, 0.466844498401391],                 [0.283155501598609, -0.2582888753996523],      [1.0, 0.0]),
        ([0.7310585786300049, 0.7310585786300049],  [1.0965878679450074, 0.6416628336527819],  [0.4549250342922255, -0.38787822555930823],    [1.0, -1.0]),
        ([0.9525741268224334, 0.5],                 [0.9525741268224334, 0.375],               [0.5775741268224334, -0.3825370634112167],     [1.0, 0.0]),
    ];
    for (t, (g, v, z, s)) in table.iter().enumerate() {
        for c in 0..2 {
            let i = t * 2 + c;
            assert!((layer.g[i] - g[c]).abs() < 1e-14, "g[t={}][{c}] = {} ≠ {}", t + 1, layer.g[i], g[c]);
            assert!((layer.v[i] - v[c]).abs() < 1e-14, "v[t={}][{c}] = {} ≠ {}", t + 1, layer.v[i], v[c]);
            assert!((layer.z[i] - z[c]).abs() < 1e-14, "z[t={}][{c}] = {} ≠ {}", t + 1, layer.z[i], z[c]);
            assert_eq!(layer.out[i], s[c], "s[t={}][{c}]", t + 1);
        }
    }
    // the same layer without the gate (back off): channel 1 fires at t = 3 instead.
    let mut plain_gate = BackEiLayer::<f64>::new([2, 1, 1], fb(false, true, 0, 1), &nc);
    let p2 = BackEiParams { w_b: &[], b_b: &[], w_e: p.w_e, b_e: p.b_e };
    plain_gate.forward(&p2, &input, 3, 1, 3).unwrap();
    // t = 1: v = I = [1.5, 0.75] both fire; z = [0.75, −0.5625] → s = [1, −1]; u = 0
    assert_eq!(&plain_gate.out[0..2], &[1.0, -1.0]);
    assert_eq!(&plain_gate.v[0..2], &[1.5, 0.75]);
}
