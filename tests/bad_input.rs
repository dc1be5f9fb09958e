//! Every constructor and step rejects bad shapes and settings with an error (never a panic,
//! never silently) whose message says what is wrong and where.

use backei::spec::{FeedbackConfig, FiringMode, LayerSpec, NetworkSpec, NeuronConfig, Surrogate};
use backei::{Loss, Network, Optimizer, OptimizerConfig};
use LayerSpec::*;

/// A small valid network: [2, 5, 5] → conv → BackEI (r = 1) → pool → flatten → linear 3 → spiking.
fn small() -> NetworkSpec {
    NetworkSpec {
        name: "small".into(),
        input: [2, 5, 5],
        layers: vec![Conv { out_channels: 3, kernel: 3, padding: 1 }, BackEi, AvgPool, Flatten, Linear { out_features: 3 }, Spiking],
        feedback: FeedbackConfig::default(),
        neuron: NeuronConfig::default(),
        steps: 4,
    }
}

/// The error of building `spec` (as a network, too), with every `needles` in its message.
fn rejects(spec: &NetworkSpec, needles: &[&str]) {
    let e = spec.plan().expect_err("the spec should be rejected").to_string();
    for n in needles {
        assert!(e.contains(n), "message `{e}` lacks `{n}`");
    }
    let e2 = Network::<f32>::new(spec, 1).err().expect("Network::new should reject it").to_string();
    assert_eq!(e, e2);
}

fn msg<T>(r: backei::Result<T>) -> String {
    match r {
        Ok(_) => panic!("accepted silently"),
        Err(e) => e.to_string(),
    }
}

fn assert_has(m: &str, needles: &[&str]) {
    for n in needles {
        assert!(m.contains(n), "message `{m}` lacks `{n}`");
    }
}

#[test]
fn the_small_spec_is_valid() {
    assert_eq!(small().classes().unwrap(), 3);
    Network::<f32>::new(&small(), 1).unwrap();
}

#[test]
fn zero_steps() {
    let mut s = small();
    s.steps = 0;
    rejects(&s, &["steps", "T = 0"]);
}

#[test]
fn delay_zero_and_delay_beyond_t() {
    let mut s = small();
    s.feedback.delay = 0;
    rejects(&s, &["delay", "D = 0"]);
    let mut s = small();
    s.feedback.delay = 5;
    rejects(&s, &["delay", "D = 5 > T = 4"]);
    s.feedback.delay = 4; // D = T is allowed (the feedback arrives at the last step)
    s.plan().unwrap();
}

#[test]
fn radius_that_does_not_fit_the_map() {
    let mut s = small();
    s.feedback.radius = 3; // a 7×7 gate on the 5×5 map of layers[1]
    rejects(&s, &["radius", "layers[1]", "7×7", "5×5", "r ≤ 2"]);
    // after a linear layer (1×1) only r = 0 fits
    let mut s = small();
    s.layers = vec![Flatten, Linear { out_features: 4 }, BackEi, Linear { out_features: 3 }, Spiking];
    rejects(&s, &["radius", "layers[2]", "1×1"]);
    s.feedback.radius = 0;
    s.plan().unwrap();
}

#[test]
fn kernel_linear_pool_dropout_and_empty_layers() {
    let mut s = small();
    s.layers[0] = Conv { out_channels: 3, kernel: 9, padding: 1 };
    rejects(&s, &["layers[0]", "kernel", "9×9", "5×5"]);
    let mut s = small();
    s.layers[0] = Conv { out_channels: 0, kernel: 3, padding: 1 };
    rejects(&s, &["layers[0]", "out_channels"]);
    let mut s = small();
    s.layers.remove(3); // no Flatten before the Linear
    rejects(&s, &["layers[3]", "Flatten"]);
    let mut s = small();
    s.layers.insert(3, AvgPool); // 2×2 → 1×1 → a third pool on 1×1
    s.layers.insert(3, AvgPool);
    rejects(&s, &["layers[4]", "pooling", "1×1"]);
    for p in [1.0, -0.1, f64::NAN] {
        let mut s = small();
        s.layers.insert(2, Dropout { p });
        rejects(&s, &["layers[2]", "dropout probability"]);
    }
    let mut s = small();
    s.layers.clear();
    rejects(&s, &["layers", "at least one layer"]);
    let mut s = small();
    s.input = [2, 0, 5];
    rejects(&s, &["input", "zero dimension"]);
}

#[test]
fn neuron_settings() {
    for leak in [-0.1, 1.5, f64::NAN] {
        let mut s = small();
        s.neuron.leak = leak;
        rejects(&s, &["leak", "[0, 1]"]);
    }
    for th in [f64::INFINITY, f64::NAN] {
        let mut s = small();
        s.neuron.threshold = th;
        rejects(&s, &["threshold", "finite"]);
    }
    for sur in [Surrogate::Rectangle { width: 0.0 }, Surrogate::Sigmoid { alpha: f64::NAN }, Surrogate::Atan { alpha: -1.0 }] {
        let mut s = small();
        s.neuron.surrogate = sur;
        rejects(&s, &["surrogate", "positive"]);
    }
    let mut s = small();
    s.neuron.mode = FiringMode::Smooth { k: 0.0 };
    rejects(&s, &["mode", "steepness"]);
}

#[test]
fn unknown_preset() {
    let e = msg(NetworkSpec::preset("mnistt"));
    assert_has(&e, &["mnistt", "fashion-mnist"]);
}

fn input(batch: usize, t_in: usize) -> Vec<f32> {
    vec![0.5; t_in * batch * 50]
}

#[test]
fn input_length_batch_and_frames() {
    let mut net = Network::<f32>::new(&small(), 1).unwrap();
    // one value too few for B = 2
    let mut x = input(2, 1);
    x.pop();
    assert_has(&msg(net.forward(&x, 1, 2)), &["network input", "99 values", "100 values"]);
    // the right length for B = 3 but B = 2 claimed
    assert_has(&msg(net.forward(&input(3, 1), 1, 2)), &["network input", "150 values"]);
    // T_in neither 1 nor T
    assert_has(&msg(net.forward(&input(2, 3), 3, 2)), &["network input", "T_in = 3", "T = 4"]);
    assert_has(&msg(net.forward(&[], 1, 0)), &["batch", "0"]);
    net.forward(&input(2, 4), 4, 2).unwrap();
    net.forward(&input(2, 1), 1, 2).unwrap();
}

#[test]
fn non_finite_input_and_parameters() {
    let mut net = Network::<f32>::new(&small(), 1).unwrap();
    let mut x = input(2, 1);
    x[7] = f32::NAN;
    assert_has(&msg(net.forward(&x, 1, 2)), &["network input", "element 7", "NaN"]);
    x[7] = f32::INFINITY;
    assert_has(&msg(net.forward(&x, 1, 2)), &["network input", "element 7", "inf"]);
    let x = input(2, 1);
    net.params[11] = f32::NEG_INFINITY;
    assert_has(&msg(net.forward(&x, 1, 2)), &["parameters", "element 11"]);
    let mut opt = Optimizer::new(OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
    assert_has(&msg(net.train_step(&x, 1, &[0, 1], Loss::Mse, &mut opt)), &["parameters", "element 11"]);
}

#[test]
fn labels() {
    let mut net = Network::<f32>::new(&small(), 1).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
    let x = input(2, 1);
    assert_has(&msg(net.train_step(&x, 1, &[0, 3], Loss::Mse, &mut opt)), &["labels", "label 3 of sample 1", "3 classes"]);
    assert_has(&msg(net.evaluate(&x, 1, &[7, 0], Loss::Ce)), &["label 7 of sample 0"]);
    assert_has(&msg(net.train_step(&[], 1, &[], Loss::Mse, &mut opt)), &["labels", "empty"]);
    // three labels for a batch of two images: the input length no longer matches B = 3
    assert_has(&msg(net.train_step(&x, 1, &[0, 1, 2], Loss::Mse, &mut opt)), &["network input", "150 values", "100 values"]);
    net.train_step(&x, 1, &[0, 2], Loss::Mse, &mut opt).unwrap();
}

#[test]
fn backward_misuse() {
    let mut net = Network::<f64>::new(&small(), 1).unwrap();
    assert_has(&msg(net.backward(&[0.0; 6], false)), &["backward", "before forward"]);
    net.forward(&vec![0.5; 100], 1, 2).unwrap();
    assert_has(&msg(net.backward(&[0.0; 5], false)), &["readout gradient", "6", "5"]);
    let mut dy = vec![0.1; 6];
    dy[4] = f64::NAN;
    assert_has(&msg(net.backward(&dy, false)), &["readout gradient", "element 4"]);
}

#[test]
fn optimizer_settings_and_size() {
    assert_has(&msg(Optimizer::new(OptimizerConfig::adam(0.0), 3)), &["lr"]);
    assert_has(&msg(Optimizer::new(OptimizerConfig::adam(f64::NAN), 3)), &["lr"]);
    let bad_beta =
        OptimizerConfig::Adam { lr: 1e-3, beta1: 1.0, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled_weight_decay: false };
    assert_has(&msg(Optimizer::new(bad_beta, 3)), &["betas"]);
    assert_has(&msg(Optimizer::new(OptimizerConfig::sgd(0.1, -0.5), 3)), &["momentum"]);
    // an optimizer made for another network
    let mut net = Network::<f32>::new(&small(), 1).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::adam(1e-3), net.num_params() - 1).unwrap();
    let e = msg(net.train_step(&input(2, 1), 1, &[0, 1], Loss::Mse, &mut opt));
    assert_has(&e, &["optimizer", &format!("{}", net.num_params())]);
}

#[test]
fn the_backei_layer_alone_validates_its_calls() {
    use backei::cpu::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams};
    let fb = FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 };
    let mut layer = BackEiLayer::<f64>::new([2, 3, 3], fb, &NeuronConfig::default());
    let w = vec![0.1; 2 * 2 * 9];
    let b = vec![0.0; 2];
    let p = BackEiParams { w_b: &w, b_b: &b, w_e: &w, b_e: &b };
    let (mut gw, mut gb, mut gw2, mut gb2) = (vec![0.0; 36], vec![0.0; 2], vec![0.0; 36], vec![0.0; 2]);
    let mut g = BackEiGrads { w_b: &mut gw, b_b: &mut gb, w_e: &mut gw2, b_e: &mut gb2 };
    let x = vec![0.7; 4 * 18];
    let err = |r: backei::Result<()>| r.unwrap_err().to_string();
    assert!(err(layer.backward(&p, &mut g, &x, 4, &x, &mut vec![0.0; 72])).contains("before forward"));
    assert!(err(layer.forward(&p, &x[..70], 4, 1, 4)).contains("4×1×18 values"));
    assert!(err(layer.forward(&p, &x, 3, 1, 4)).contains("T_in = 1 or T = 4"));
    assert!(err(layer.forward(&p, &x, 4, 1, 0)).contains("T = 0"));
    let short = BackEiParams { w_b: &w[..35], b_b: &b, w_e: &w, b_e: &b };
    assert!(err(layer.forward(&short, &x, 4, 1, 4)).contains("W_b"));
    layer.forward(&p, &x, 4, 1, 4).unwrap();
    assert!(err(layer.backward(&p, &mut g, &x, 4, &x[..10], &mut vec![0.0; 72])).contains("∂L/∂s"));
    let mut wide = BackEiLayer::<f64>::new([2, 3, 3], FeedbackConfig { radius: 2, ..fb }, &NeuronConfig::default());
    let w5 = vec![0.1; 2 * 2 * 25];
    let p5 = BackEiParams { w_b: &w5, b_b: &b, w_e: &w5, b_e: &b };
    assert!(err(wide.forward(&p5, &x, 4, 1, 4)).contains("does not fit the 3×3 map"));
}
