//! The CPU engine's lean saved state: `--recompute K` (windows of K steps kept, the rest recomputed
//! in the backward from u checkpoints) and z kept as one-byte codes where exact give the very
//! bits of storing everything — forward outputs, every gradient, whole training steps — while
//! the state the forward keeps shrinks as K does.

use backei::cpu::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams, SavedState};
use backei::spec::{FeedbackConfig, FiringMode, LayerSpec, NetworkSpec, NeuronConfig, Surrogate};
use backei::{Loss, Network, Optimizer, OptimizerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Everything a layer's forward and backward produce, as bits.
#[derive(Debug, PartialEq)]
struct Run {
    out: Vec<u32>,
    grads: Vec<u32>,
    grad_in: Vec<u32>,
    state_bytes: usize,
}

struct LayerCase {
    shape: [usize; 3],
    fb: FeedbackConfig,
    neuron: NeuronConfig,
    batch: usize,
    steps: usize,
    t_in: usize,
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Forward, then two backwards (gradients accumulate; the second one after the first moved the
/// window the layer holds), with `saved`.
fn run_layer(c: &LayerCase, saved: SavedState, seed: u64) -> Run {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let [ch, h, w] = c.shape;
    let n = ch * h * w;
    let k = 2 * c.fb.radius + 1;
    let wl = ch * ch * k * k;
    let mut vec = |len: usize, a: f32| (0..len).map(|_| rng.random_range(-a..a)).collect::<Vec<f32>>();
    let (w_b, b_b, w_e, b_e) = (vec(wl, 0.4), vec(ch, 0.5), vec(wl, 0.4), vec(ch, 0.3));
    let input: Vec<f32> = vec(c.t_in * c.batch * n, 1.2).iter().map(|x| x + 0.4).collect();
    let grad_out = vec(c.steps * c.batch * n, 1.0);
    let on = |yes: bool, v: &[f32]| if yes { v.to_vec() } else { Vec::new() };
    let (w_b, b_b, w_e, b_e) = (on(c.fb.back, &w_b), on(c.fb.back, &b_b), on(c.fb.ei, &w_e), on(c.fb.ei, &b_e));
    let p = BackEiParams { w_b: &w_b, b_b: &b_b, w_e: &w_e, b_e: &b_e };
    let mut layer = BackEiLayer::<f32>::new(c.shape, c.fb, &c.neuron);
    layer.saved = saved;
    layer.forward(&p, &input, c.t_in, c.batch, c.steps).unwrap();
    let state_bytes = layer.state_bytes();
    let (mut gwb, mut gbb, mut gwe, mut gbe) = (vec![0f32; w_b.len()], vec![0f32; b_b.len()], vec![0f32; w_e.len()], vec![0f32; b_e.len()]);
    let mut grad_in = vec![0f32; c.t_in * c.batch * n];
    let mut all_gin = Vec::new();
    for _ in 0..2 {
        let mut g = BackEiGrads { w_b: &mut gwb, b_b: &mut gbb, w_e: &mut gwe, b_e: &mut gbe };
        layer.backward(&p, &mut g, &input, c.t_in, &grad_out, &mut grad_in).unwrap();
        all_gin.extend_from_slice(&grad_in);
    }
    let grads: Vec<f32> = [gwb, gbb, gwe, gbe].concat();
    assert!(grads.iter().chain(&all_gin).all(|x| x.is_finite()));
    Run { out: bits(&layer.out), grads: bits(&grads), grad_in: bits(&all_gin), state_bytes }
}

fn cases() -> Vec<LayerCase> {
    let fb = |back, ei, radius, delay| FeedbackConfig { back, ei, radius, delay };
    let exact = NeuronConfig::default();
    let with = |surrogate, mode| NeuronConfig { surrogate, mode, ..NeuronConfig::default() };
    let mut v = Vec::new();
    for (f, neuron) in [
        (fb(true, true, 1, 1), exact),
        (fb(true, true, 1, 2), exact),
        (fb(true, true, 2, 3), exact),
        (fb(true, false, 1, 1), exact),
        (fb(false, true, 1, 1), exact),
        (fb(false, false, 0, 1), exact),
        (fb(true, true, 1, 1), with(Surrogate::Sigmoid { alpha: 4.0 }, FiringMode::Exact)),
        (fb(true, true, 1, 2), with(Surrogate::Atan { alpha: 2.0 }, FiringMode::Exact)),
        (fb(true, true, 1, 1), with(Surrogate::Rectangle { width: 0.5 }, FiringMode::Exact)),
        (fb(true, true, 1, 1), with(Surrogate::default(), FiringMode::Smooth { k: 5.0 })),
    ] {
        for t_in in [1, 7] {
            v.push(LayerCase { shape: [3, 5, 6], fb: f, neuron, batch: 2, steps: 7, t_in });
        }
    }
    v
}

#[test]
fn recompute_and_coded_z_give_the_bits_of_storing_everything() {
    for (i, c) in cases().iter().enumerate() {
        let full = run_layer(c, SavedState::FULL, i as u64);
        assert!(full.out.iter().any(|&b| f32::from_bits(b) != 0.0), "case {i}: no spikes, the case tests nothing");
        let mut last = full.state_bytes;
        // from keeping every step down to one step and a checkpoint per step
        for k in [None, Some(100), Some(7), Some(4), Some(3), Some(2), Some(1)] {
            for compact in [false, true] {
                let saved = SavedState { recompute: k, compact };
                let r = run_layer(c, saved, i as u64);
                let what = format!("case {i} ({:?}, {:?}, T_in {}) with {saved:?}", c.fb, c.neuron, c.t_in);
                assert_eq!(r.out, full.out, "{what}: outputs");
                assert_eq!(r.grad_in, full.grad_in, "{what}: input gradients");
                assert_eq!(r.grads, full.grads, "{what}: parameter gradients");
                assert!(r.state_bytes <= full.state_bytes, "{what}: more state than storing everything");
            }
            // the lean state never grows as K shrinks (down to K = 2; K = 1 keeps a u per step)
            let r = run_layer(c, SavedState::lean(k), i as u64);
            if k != Some(1) {
                assert!(r.state_bytes <= last, "case {i}: K = {k:?} keeps {} bytes, more than {last}", r.state_bytes);
            }
            last = r.state_bytes;
        }
    }
}

#[test]
fn saved_state_sizes_are_what_the_windows_say() {
    let c = &cases()[0]; // back + ei, exact firing, rectangle surrogate: z is coded
    let (n, b, t) = (3 * 5 * 6, 2, 7);
    let f = 4;
    let full = run_layer(c, SavedState::FULL, 1).state_bytes;
    // s, v, g, z over all T
    assert_eq!(full, f * 4 * t * b * n);
    // z as one byte per neuron and step
    assert_eq!(run_layer(c, SavedState::lean(None), 1).state_bytes, f * 3 * t * b * n + t * b * n);
    // K = 3: s over T, v, g, z-codes over 3 steps, u at the start of windows 1 and 2
    assert_eq!(run_layer(c, SavedState::lean(Some(3)), 1).state_bytes, f * t * b * n + (f * 2 + 1) * 3 * b * n + f * 2 * b * n);
    // the smooth surrogate keeps z itself
    let smooth = &cases()[12];
    assert!(smooth.neuron.surrogate != Surrogate::default());
    assert_eq!(run_layer(smooth, SavedState::lean(Some(3)), 1).state_bytes, f * t * b * n + f * 3 * 3 * b * n + f * 2 * b * n);
}

#[test]
fn recompute_zero_is_refused_with_the_fix() {
    let c = &cases()[0];
    let mut layer = BackEiLayer::<f32>::new(c.shape, c.fb, &c.neuron);
    layer.saved = SavedState::lean(Some(0));
    let e = layer.forward(&BackEiParams { w_b: &[], b_b: &[], w_e: &[], b_e: &[] }, &[], 1, 1, 1).unwrap_err().to_string();
    assert!(e.contains("--recompute") && e.contains("K ≥ 1"), "{e}");
    let mut net = Network::<f32>::new(&NetworkSpec::mnist(), 1).unwrap();
    assert!(net.set_saved_state(SavedState::lean(Some(0))).is_err());
}

/// A network with every layer kind: conv, BackEI, dropout, pooling, flatten, linear, plain spiking.
fn every_layer_kind(steps: usize) -> NetworkSpec {
    NetworkSpec {
        name: "every-kind".into(),
        input: [2, 10, 10],
        layers: vec![
            LayerSpec::Conv { out_channels: 4, kernel: 3, padding: 1 },
            LayerSpec::BackEi,
            LayerSpec::Dropout { p: 0.3 },
            LayerSpec::AvgPool,
            LayerSpec::Conv { out_channels: 5, kernel: 3, padding: 0 },
            LayerSpec::BackEi,
            LayerSpec::Flatten,
            LayerSpec::Linear { out_features: 12 },
            LayerSpec::Spiking,
            LayerSpec::Dropout { p: 0.5 },
            LayerSpec::Linear { out_features: 10 },
            LayerSpec::Spiking,
        ],
        feedback: FeedbackConfig { back: true, ei: true, radius: 1, delay: 2 },
        neuron: NeuronConfig::default(),
        steps,
    }
}

/// Three Adam steps of a network with `saved`; the parameters, statistics and state bytes.
fn train(spec: &NetworkSpec, saved: SavedState, t_in: usize) -> (Vec<u32>, Vec<backei::StepStats>, usize) {
    let mut net = Network::<f32>::new(spec, 4150).unwrap();
    net.set_saved_state(saved).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::adam(3e-3), net.num_params()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let frame: usize = spec.input.iter().product();
    let batch = 3;
    let mut stats = Vec::new();
    let mut bytes = 0;
    for _ in 0..3 {
        let x: Vec<f32> = (0..t_in * batch * frame).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let labels: Vec<u8> = (0..batch).map(|_| rng.random_range(0..10u8)).collect();
        stats.push(net.train_step(&x, t_in, &labels, Loss::Mse, &mut opt).unwrap());
        bytes = net.state_bytes();
    }
    (bits(&net.params), stats, bytes)
}

#[test]
fn whole_training_steps_are_bit_identical_under_recompute() {
    let t = 6;
    let spec = every_layer_kind(t);
    for t_in in [1, t] {
        let (p_full, s_full, b_full) = train(&spec, SavedState::FULL, t_in);
        assert!(s_full.iter().all(|s| s.loss.is_finite()));
        for k in [Some(1), Some(2), Some(4), None] {
            let (p, s, b) = train(&spec, SavedState::lean(k), t_in);
            assert_eq!(s, s_full, "T_in {t_in}, K = {k:?}: losses or accuracies differ");
            assert!(p == p_full, "T_in {t_in}, K = {k:?}: the parameters after three steps differ");
            assert!(b < b_full, "T_in {t_in}, K = {k:?}: {b} bytes of state, storing everything keeps {b_full}");
        }
    }
}
