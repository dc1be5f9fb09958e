//! Declarative networks: the four networks of the paper (and any other stack of the same layer
//! kinds) as data, validated and with every layer's shape worked out before anything runs.

use crate::error::{config_err, Result};
use serde::{Deserialize, Serialize};

/// Gradient of the step function used in the backward pass (the forward pass stays exact).
/// The same surrogate serves H (firing) and sign (the E/I gate), as in the reference, where both
/// use a rectangle of height 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Surrogate {
    /// 1/width where |x| < width/2, else 0. width = 1 is the reference (height 1, width 1).
    Rectangle { width: f64 },
    /// alpha·σ(alpha·x)·(1 − σ(alpha·x)) (SpikingJelly's Sigmoid surrogate; alpha = 4 there).
    Sigmoid { alpha: f64 },
    /// (alpha/2) / (1 + (π/2·alpha·x)²) (SpikingJelly's ATan surrogate; alpha = 2 there).
    Atan { alpha: f64 },
}

impl Default for Surrogate {
    fn default() -> Self {
        Surrogate::Rectangle { width: 1.0 }
    }
}

/// How H (fire) and sign (E/I gate) are evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FiringMode {
    /// The model: exact step functions forward, the surrogate backward.
    #[default]
    Exact,
    /// For gradient checks only: H(x) → sigmoid(k·x), sign(x) → tanh(k·x), and their exact
    /// derivatives as the "surrogates", so the whole network is smooth and finite differences
    /// must agree with BPTT.
    Smooth { k: f64 },
}

/// The neuron constants shared by every spiking layer of a network.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeuronConfig {
    /// λ: the membrane keeps λ·u of the previous step (reference 0.2).
    pub leak: f64,
    /// θ: a neuron fires when v > θ (reference 0.5).
    pub threshold: f64,
    pub surrogate: Surrogate,
    pub mode: FiringMode,
}

impl Default for NeuronConfig {
    fn default() -> Self {
        NeuronConfig { leak: 0.2, threshold: 0.5, surrogate: Surrogate::default(), mode: FiringMode::Exact }
    }
}

/// The switches of a BackEI layer (shared by every BackEI layer of a network).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeedbackConfig {
    /// Adaptive self-feedback gate g_t = σ(W_b ⊛ s_{t−D} + b_b).
    pub back: bool,
    /// Dynamic E/I gate e_t = sign(W_e ⊛ v_t + b_e).
    pub ei: bool,
    /// Kernel radius r: the gate convolutions are (2r+1)×(2r+1).
    pub radius: usize,
    /// Feedback delay D ≥ 1 (reference 1).
    pub delay: usize,
}

impl FeedbackConfig {
    /// Why the (2r+1)×(2r+1) gate kernels do not fit an h×w map, or None when they do (or when
    /// both gates are off). The one rule of the spec and the CPU layer.
    pub fn gate_misfit(&self, h: usize, w: usize) -> Option<String> {
        let k = 2 * self.radius + 1;
        ((self.back || self.ei) && (k > h || k > w)).then(|| {
            format!(
                "r = {} gives a {k}×{k} gate kernel that does not fit the {h}×{w} map; use r ≤ {}",
                self.radius,
                (h.min(w).max(1) - 1) / 2
            )
        })
    }
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 }
    }
}

/// One layer of a network description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LayerSpec {
    /// Conv2d, stride 1, zero padding, with bias.
    Conv { out_channels: usize, kernel: usize, padding: usize },
    /// Fully connected, with bias.
    Linear { out_features: usize },
    /// 2×2 average pooling, stride 2 (odd sizes floor, as PyTorch).
    AvgPool,
    /// Dropout with probability p; a new mask at every time step.
    Dropout { p: f64 },
    /// [C, H, W] → [C·H·W] (no data movement: the layout is already contiguous).
    Flatten,
    /// A BackEI spiking layer (feedback and E/I as the network's FeedbackConfig says).
    BackEi,
    /// A plain spiking layer (leak, fire, hard reset; no feedback, no E/I).
    Spiking,
}

/// A whole network: input shape, layers, and the settings shared by its spiking layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    /// [C, H, W] of one input frame.
    pub input: [usize; 3],
    pub layers: Vec<LayerSpec>,
    pub feedback: FeedbackConfig,
    pub neuron: NeuronConfig,
    /// T: time steps per sample.
    pub steps: usize,
}

/// A layer with its input and output shapes resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerPlan {
    pub spec: LayerSpec,
    pub input: [usize; 3],
    pub output: [usize; 3],
}

fn block(out: usize, kernel: usize, padding: usize) -> [LayerSpec; 3] {
    [LayerSpec::Conv { out_channels: out, kernel, padding }, LayerSpec::BackEi, LayerSpec::AvgPool]
}

impl NetworkSpec {
    /// The MNIST network of the paper (r = 2).
    pub fn mnist() -> Self {
        Self::mnist_like("mnist", [1, 28, 28])
    }

    /// The N-MNIST network: the MNIST network with 2 input channels on 34×34 frames.
    pub fn nmnist() -> Self {
        Self::mnist_like("nmnist", [2, 34, 34])
    }

    fn mnist_like(name: &str, input: [usize; 3]) -> Self {
        let mut layers = Vec::new();
        layers.extend(block(15, 5, 0));
        layers.extend(block(40, 5, 0));
        layers.extend([
            LayerSpec::Flatten,
            LayerSpec::Linear { out_features: 300 },
            LayerSpec::Spiking,
            LayerSpec::Linear { out_features: 10 },
            LayerSpec::Spiking,
        ]);
        NetworkSpec {
            name: name.into(),
            input,
            layers,
            feedback: FeedbackConfig { radius: 2, ..Default::default() },
            neuron: NeuronConfig::default(),
            steps: 20,
        }
    }

    /// The Fashion-MNIST network of the paper (r = 1).
    pub fn fashion_mnist() -> Self {
        let mut layers = Vec::new();
        layers.extend(block(32, 5, 2));
        layers.extend(block(64, 5, 2));
        layers.extend([
            LayerSpec::Flatten,
            LayerSpec::Linear { out_features: 1024 },
            LayerSpec::Spiking,
            LayerSpec::Linear { out_features: 10 },
            LayerSpec::Spiking,
        ]);
        NetworkSpec {
            name: "fashion-mnist".into(),
            input: [1, 28, 28],
            layers,
            feedback: FeedbackConfig { radius: 1, ..Default::default() },
            neuron: NeuronConfig::default(),
            steps: 20,
        }
    }

    /// The CIFAR-10 network of the paper (r = 1, dropout 0.5).
    pub fn cifar10() -> Self {
        let mut layers = Vec::new();
        for out in [128, 256, 512] {
            layers.extend([
                LayerSpec::Conv { out_channels: out, kernel: 3, padding: 1 },
                LayerSpec::BackEi,
                LayerSpec::Dropout { p: 0.5 },
                LayerSpec::AvgPool,
            ]);
        }
        layers.extend([
            LayerSpec::Flatten,
            LayerSpec::Linear { out_features: 1024 },
            LayerSpec::Spiking,
            LayerSpec::Dropout { p: 0.5 },
            LayerSpec::Linear { out_features: 10 },
            LayerSpec::Spiking,
        ]);
        NetworkSpec {
            name: "cifar10".into(),
            input: [3, 32, 32],
            layers,
            feedback: FeedbackConfig { radius: 1, ..Default::default() },
            neuron: NeuronConfig::default(),
            steps: 20,
        }
    }

    /// A preset by name: `mnist`, `fashion-mnist`, `cifar10`, `nmnist` (`mnist-sample` is mnist).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "mnist" | "mnist-sample" => Ok(Self::mnist()),
            "fashion-mnist" => Ok(Self::fashion_mnist()),
            "cifar10" => Ok(Self::cifar10()),
            "nmnist" => Ok(Self::nmnist()),
            other => {
                Err(config_err("network", format!("unknown network `{other}`; expected one of mnist, fashion-mnist, cifar10, nmnist")))
            }
        }
    }

    /// Number of output classes (the features of the last layer).
    pub fn classes(&self) -> Result<usize> {
        let plan = self.plan()?;
        let out = plan.last().map(|l| l.output).unwrap_or(self.input);
        Ok(out.iter().product())
    }

    /// Validates every setting and resolves every layer's shapes.
    pub fn plan(&self) -> Result<Vec<LayerPlan>> {
        let fb = &self.feedback;
        let n = &self.neuron;
        if self.steps == 0 {
            return Err(config_err("steps", "T = 0: a spiking network needs at least one time step"));
        }
        if self.input.contains(&0) {
            return Err(config_err("input", format!("input shape {:?} has a zero dimension", self.input)));
        }
        if fb.delay == 0 {
            return Err(config_err("delay", "D = 0: the feedback delay must be at least 1 step"));
        }
        if fb.back && fb.delay > self.steps {
            return Err(config_err("delay", format!("D = {} > T = {}: the feedback would never arrive; use D ≤ T", fb.delay, self.steps)));
        }
        if !(n.leak.is_finite() && (0.0..=1.0).contains(&n.leak)) {
            return Err(config_err("leak", format!("λ = {} must lie in [0, 1]", n.leak)));
        }
        if !n.threshold.is_finite() {
            return Err(config_err("threshold", "θ must be finite"));
        }
        let width_ok = match n.surrogate {
            Surrogate::Rectangle { width } => width.is_finite() && width > 0.0,
            Surrogate::Sigmoid { alpha } | Surrogate::Atan { alpha } => alpha.is_finite() && alpha > 0.0,
        };
        if !width_ok {
            return Err(config_err("surrogate", format!("{:?}: its width/alpha must be a positive number", n.surrogate)));
        }
        if let FiringMode::Smooth { k } = n.mode {
            if !(k.is_finite() && k > 0.0) {
                return Err(config_err("mode", "smooth firing needs a positive steepness k"));
            }
        }
        if self.layers.is_empty() {
            return Err(config_err("layers", "a network needs at least one layer"));
        }
        let mut shape = self.input;
        let mut plans = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let [c, h, w] = shape;
            let at = |what: &str| format!("layers[{i}] ({layer:?}): {what}");
            let out = match *layer {
                LayerSpec::Conv { out_channels, kernel, padding } => {
                    if out_channels == 0 || kernel == 0 {
                        return Err(config_err(at("conv"), "out_channels and kernel must be positive"));
                    }
                    if h + 2 * padding < kernel || w + 2 * padding < kernel {
                        return Err(config_err(
                            at("kernel"),
                            format!("a {kernel}×{kernel} kernel does not fit a {h}×{w} map with padding {padding}"),
                        ));
                    }
                    [out_channels, h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1]
                }
                LayerSpec::Linear { out_features } => {
                    if out_features == 0 {
                        return Err(config_err(at("out_features"), "must be positive"));
                    }
                    if h != 1 || w != 1 {
                        return Err(config_err(
                            at("input"),
                            format!("Linear needs a flat input; insert Flatten before it (input is {c}×{h}×{w})"),
                        ));
                    }
                    [out_features, 1, 1]
                }
                LayerSpec::AvgPool => {
                    if h < 2 || w < 2 {
                        return Err(config_err(at("input"), format!("2×2 pooling needs a map of at least 2×2, got {h}×{w}")));
                    }
                    [c, h / 2, w / 2]
                }
                LayerSpec::Dropout { p } => {
                    if !(0.0..1.0).contains(&p) {
                        return Err(config_err(at("p"), format!("dropout probability {p} must lie in [0, 1)")));
                    }
                    shape
                }
                LayerSpec::Flatten => [c * h * w, 1, 1],
                LayerSpec::BackEi => {
                    if let Some(problem) = fb.gate_misfit(h, w) {
                        return Err(config_err(at("radius"), problem));
                    }
                    shape
                }
                LayerSpec::Spiking => shape,
            };
            plans.push(LayerPlan { spec: layer.clone(), input: shape, output: out });
            shape = out;
        }
        Ok(plans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_shapes_match_the_paper() {
        let f = NetworkSpec::fashion_mnist().plan().unwrap();
        assert_eq!(f[0].output, [32, 28, 28]);
        assert_eq!(f[5].output, [64, 7, 7]);
        assert_eq!(f[6].output, [3136, 1, 1]);
        let m = NetworkSpec::mnist().plan().unwrap();
        assert_eq!(m[5].output, [40, 4, 4]);
        assert_eq!(m[6].output, [640, 1, 1]);
        let c = NetworkSpec::cifar10().plan().unwrap();
        assert_eq!(c[12].output, [8192, 1, 1]);
        let n = NetworkSpec::nmnist().plan().unwrap();
        assert_eq!(n[0].output, [15, 30, 30]);
        assert_eq!(n[6].output, [1000, 1, 1]);
        for s in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
            assert_eq!(s.classes().unwrap(), 10);
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let mut s = NetworkSpec::fashion_mnist();
        s.steps = 0;
        assert!(s.plan().unwrap_err().to_string().contains("steps"));
        let mut s = NetworkSpec::fashion_mnist();
        s.steps = 4;
        s.feedback.delay = 5;
        assert!(s.plan().unwrap_err().to_string().contains("D = 5 > T = 4"));
        let mut s = NetworkSpec::mnist();
        s.feedback.radius = 4; // a 9×9 gate does not fit the 8×8 map of the second BackEI layer
        let e = s.plan().unwrap_err().to_string();
        assert!(e.contains("radius") && e.contains("8×8"), "{e}");
    }
}
