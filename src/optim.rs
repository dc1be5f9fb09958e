//! Optimizers over one flat parameter buffer, with PyTorch's exact update rules (Adam, AdamW,
//! SGD with momentum), and the learning-rate schedules (StepLR; cosine with linear warm-up).
//! The GPU engine's fused optimizer kernel (`cuda/optim.cu`) computes the same expressions.

use crate::error::{config_err, Result};
use crate::Real;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// torch.optim.Adam: bias-corrected, eps added after the square root. With
    /// `decoupled_weight_decay` it is torch.optim.AdamW (PyTorch's Adam flag of the same name):
    /// the parameters shrink by `lr · weight_decay` before the update instead of `weight_decay ·
    /// p` being added to the gradient (L2). Absent in configurations written before it existed.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        #[serde(default)]
        decoupled_weight_decay: bool,
    },
    /// torch.optim.SGD with momentum (dampening 0, not Nesterov).
    Sgd { lr: f64, momentum: f64, weight_decay: f64 },
}

impl OptimizerConfig {
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled_weight_decay: false }
    }
    /// torch.optim.AdamW(lr, weight_decay) with PyTorch's betas and eps.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        OptimizerConfig::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, decoupled_weight_decay: true }
    }
    pub fn sgd(lr: f64, momentum: f64) -> Self {
        OptimizerConfig::Sgd { lr, momentum, weight_decay: 0.0 }
    }
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Adam { lr, .. } | OptimizerConfig::Sgd { lr, .. } => lr,
        }
    }
    /// The PyTorch class this is: Adam, AdamW or SGD.
    pub fn name(&self) -> &'static str {
        match *self {
            OptimizerConfig::Adam { decoupled_weight_decay: true, .. } => "AdamW",
            OptimizerConfig::Adam { .. } => "Adam",
            OptimizerConfig::Sgd { .. } => "SGD",
        }
    }
    /// The factor every parameter is multiplied by before a step at learning rate `lr`:
    /// 1 − lr · weight_decay for AdamW, 1 (exactly: the product changes no bit) otherwise.
    pub fn decay_factor(&self, lr: f64) -> f64 {
        match *self {
            OptimizerConfig::Adam { weight_decay, decoupled_weight_decay: true, .. } => 1.0 - lr * weight_decay,
            _ => 1.0,
        }
    }
    pub fn validate(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        match *self {
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, .. } => {
                if !(ok(lr) && lr > 0.0) {
                    return Err(config_err("lr", format!("{lr} must be a positive number")));
                }
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return Err(config_err("betas", "Adam's betas must lie in [0, 1)"));
                }
                if !ok(eps) {
                    return Err(config_err("eps", format!("{eps} must be finite and ≥ 0")));
                }
                if !ok(weight_decay) {
                    return Err(config_err("--weight-decay", format!("{weight_decay} must be finite and ≥ 0")));
                }
            }
            OptimizerConfig::Sgd { lr, momentum, weight_decay } => {
                if !(ok(lr) && lr > 0.0) {
                    return Err(config_err("lr", format!("{lr} must be a positive number")));
                }
                if !ok(momentum) {
                    return Err(config_err("--momentum", format!("{momentum} must be finite and ≥ 0")));
                }
                if !ok(weight_decay) {
                    return Err(config_err("--weight-decay", format!("{weight_decay} must be finite and ≥ 0")));
                }
            }
        }
        Ok(())
    }
}

/// An optimizer's state over a flat buffer of `len` parameters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// The learning rate in force (StepLR changes it).
    pub lr: f64,
    /// Steps taken (Adam's t).
    pub step: u64,
    /// Adam: first moment; SGD: momentum buffer.
    pub m: Vec<f32>,
    /// Adam: second moment.
    pub v: Vec<f32>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig, len: usize) -> Result<Self> {
        config.validate()?;
        let v = match config {
            OptimizerConfig::Adam { .. } => vec![0.0; len],
            OptimizerConfig::Sgd { .. } => Vec::new(),
        };
        Ok(Optimizer { config, lr: config.lr(), step: 0, m: vec![0.0; len], v })
    }

    /// One update of `params` from `grads` (PyTorch's formulas, computed in f64 per element and
    /// stored in the optimizer's f32 state).
    pub fn update<F: Real>(&mut self, params: &mut [F], grads: &[F]) {
        self.step += 1;
        let lr = self.lr;
        match self.config {
            OptimizerConfig::Adam { beta1, beta2, eps, weight_decay, decoupled_weight_decay, .. } => {
                // L2 (Adam) adds weight_decay·p to the gradient; AdamW shrinks p instead
                let coupled = if decoupled_weight_decay { 0.0 } else { weight_decay };
                let decay = self.config.decay_factor(lr);
                let bc1 = 1.0 - beta1.powi(self.step as i32);
                let bc2 = 1.0 - beta2.powi(self.step as i32);
                let step_size = lr / bc1;
                let bc2_sqrt = bc2.sqrt();
                for i in 0..params.len() {
                    let p = params[i].to_f64();
                    let g = grads[i].to_f64() + coupled * p;
                    let m = beta1 * self.m[i] as f64 + (1.0 - beta1) * g;
                    let v = beta2 * self.v[i] as f64 + (1.0 - beta2) * g * g;
                    self.m[i] = m as f32;
                    self.v[i] = v as f32;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    params[i] = F::from_f64(p * decay - step_size * m / denom);
                }
            }
            OptimizerConfig::Sgd { momentum, weight_decay, .. } => {
                let first = self.step == 1;
                for i in 0..params.len() {
                    let p = params[i].to_f64();
                    let g = grads[i].to_f64() + weight_decay * p;
                    let d = if momentum != 0.0 {
                        let b = if first { g } else { momentum * self.m[i] as f64 + g };
                        self.m[i] = b as f32;
                        b
                    } else {
                        g
                    };
                    params[i] = F::from_f64(p - lr * d);
                }
            }
        }
    }
}

/// torch.optim.lr_scheduler.StepLR: lr = base · gamma^⌊epoch / step_size⌋.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLr {
    pub step_size: usize,
    pub gamma: f64,
}

impl StepLr {
    pub fn lr_at(&self, base: f64, epoch: usize) -> f64 {
        base * self.gamma.powi((epoch / self.step_size.max(1)) as i32)
    }
}

/// Linear warm-up, then cosine annealing, per epoch (PyTorch's LinearLR followed by
/// CosineAnnealingLR in a SequentialLR): for epoch e (0-based) of E,
///   e < W:  lr = base · (e + 1) / W
///   e ≥ W:  lr = min_lr + (base − min_lr) · (1 + cos(π · (e − W) / (E − W))) / 2
/// so the first epoch after the warm-up runs at `base` and the last one just above `min_lr`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CosineLr {
    pub warmup_epochs: usize,
    pub min_lr: f64,
}

impl CosineLr {
    pub fn lr_at(&self, base: f64, epoch: usize, epochs: usize) -> f64 {
        let w = self.warmup_epochs;
        if epoch < w {
            return base * (epoch + 1) as f64 / w as f64;
        }
        let span = epochs.saturating_sub(w).max(1) as f64;
        let t = ((epoch - w) as f64 / span).min(1.0);
        self.min_lr + (base - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
    }
}

/// The learning rate per epoch: StepLR (the paper's) or cosine with warm-up. Written as
/// `{"kind": "step", "step_size": 40, "gamma": 0.1}` or `{"kind": "cosine", "warmup_epochs": 5,
/// "min_lr": 0.0}`; configurations written before the cosine schedule existed hold a StepLR
/// without `kind`, and still read.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "ScheduleForms", into = "TaggedSchedule")]
pub enum LrSchedule {
    Step(StepLr),
    Cosine(CosineLr),
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum TaggedSchedule {
    Step { step_size: usize, gamma: f64 },
    Cosine { warmup_epochs: usize, min_lr: f64 },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScheduleForms {
    Tagged(TaggedSchedule),
    Untagged(StepLr),
}

impl From<ScheduleForms> for LrSchedule {
    fn from(f: ScheduleForms) -> Self {
        match f {
            ScheduleForms::Tagged(TaggedSchedule::Step { step_size, gamma }) | ScheduleForms::Untagged(StepLr { step_size, gamma }) => {
                LrSchedule::Step(StepLr { step_size, gamma })
            }
            ScheduleForms::Tagged(TaggedSchedule::Cosine { warmup_epochs, min_lr }) => {
                LrSchedule::Cosine(CosineLr { warmup_epochs, min_lr })
            }
        }
    }
}

impl From<LrSchedule> for TaggedSchedule {
    fn from(s: LrSchedule) -> Self {
        match s {
            LrSchedule::Step(StepLr { step_size, gamma }) => TaggedSchedule::Step { step_size, gamma },
            LrSchedule::Cosine(CosineLr { warmup_epochs, min_lr }) => TaggedSchedule::Cosine { warmup_epochs, min_lr },
        }
    }
}

impl LrSchedule {
    /// The paper's: ×0.1 every 40 epochs.
    pub fn paper() -> Self {
        LrSchedule::Step(StepLr { step_size: 40, gamma: 0.1 })
    }

    /// The learning rate of epoch `epoch` (0-based) of a run of `epochs`.
    pub fn lr_at(&self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            LrSchedule::Step(s) => s.lr_at(base, epoch),
            LrSchedule::Cosine(c) => c.lr_at(base, epoch, epochs),
        }
    }

    /// Its settings checked, naming the flag to change.
    pub fn validate(&self, base: f64) -> Result<()> {
        match *self {
            LrSchedule::Step(StepLr { step_size, gamma }) => {
                if step_size == 0 {
                    return Err(config_err("--lr-step", "must be at least 1 epoch"));
                }
                if !(gamma > 0.0 && gamma <= 1.0) {
                    return Err(config_err(
                        "--lr-gamma",
                        format!("{gamma} must lie in (0, 1] (the factor StepLR multiplies the learning rate by)"),
                    ));
                }
            }
            LrSchedule::Cosine(CosineLr { min_lr, .. }) => {
                if !(min_lr.is_finite() && min_lr >= 0.0 && min_lr <= base) {
                    return Err(config_err("--min-lr", format!("{min_lr} must lie in [0, --lr {base}]")));
                }
            }
        }
        Ok(())
    }

    /// One line for the run's summary: "StepLR ×0.1 every 40 epochs", "cosine to 0 after 5 warm-up epochs".
    pub fn describe(&self) -> String {
        match self {
            LrSchedule::Step(s) => format!("StepLR ×{} every {} epochs", s.gamma, s.step_size),
            LrSchedule::Cosine(c) => format!("cosine to {:e} after {} warm-up epoch(s)", c.min_lr, c.warmup_epochs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_matches_pytorch_first_steps() {
        // torch.optim.Adam([p], lr=0.1) with p=1.0 and grads 0.5 then −0.25, by hand:
        // step 1: m=0.05, v=0.00025, m̂=0.5, v̂=0.25, p = 1 − 0.1·0.5/(0.5+1e-8) = 0.9
        let mut o = Optimizer::new(OptimizerConfig::adam(0.1), 1).unwrap();
        let mut p = [1.0f64];
        o.update(&mut p, &[0.5]);
        assert!((p[0] - 0.9).abs() < 1e-7, "{}", p[0]);
        // step 2: m=0.045−0.025=0.02, v=0.00024975+0.0000625=0.00031225
        // m̂=0.02/0.19, v̂=0.00031225/0.001999, p −= 0.1·m̂/(sqrt(v̂)+eps)
        o.update(&mut p, &[-0.25]);
        let mh = 0.02 / 0.19;
        let vh = 0.00031225f64 / (1.0 - 0.999f64.powi(2));
        let expect = 0.9 - 0.1 * mh / (vh.sqrt() + 1e-8);
        assert!((p[0] - expect).abs() < 1e-6, "{} vs {expect}", p[0]);
    }

    #[test]
    fn sgd_momentum_matches_pytorch() {
        let mut o = Optimizer::new(OptimizerConfig::sgd(0.1, 0.9), 1).unwrap();
        let mut p = [1.0f64];
        o.update(&mut p, &[1.0]); // buf = 1 → p = 0.9
        o.update(&mut p, &[1.0]); // buf = 1.9 → p = 0.71
        assert!((p[0] - 0.71).abs() < 1e-7);
        assert_eq!(StepLr { step_size: 40, gamma: 0.1 }.lr_at(1e-3, 80), 1e-3 * 0.1f64.powi(2));
    }

    #[test]
    fn adamw_shrinks_the_weights_before_the_adam_step() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.5), p = 1, grad 0.5: p·(1 − 0.05) − 0.1·m̂/(sqrt(v̂)+eps)
        let mut o = Optimizer::new(OptimizerConfig::adamw(0.1, 0.5), 1).unwrap();
        let mut p = [1.0f64];
        o.update(&mut p, &[0.5]);
        assert!((p[0] - (0.95 - 0.1)).abs() < 1e-7, "{}", p[0]);
        // Adam with the same weight decay adds it to the gradient instead (L2): a different step
        let l2 = OptimizerConfig::Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5, decoupled_weight_decay: false };
        let mut o = Optimizer::new(l2, 1).unwrap();
        let mut q = [1.0f64];
        o.update(&mut q, &[0.5]);
        assert!((q[0] - 0.9).abs() < 1e-7, "{}", q[0]);
        // no weight decay: AdamW is Adam, bit for bit
        let (mut a, mut b) = ([0.3f32, -0.7], [0.3f32, -0.7]);
        let mut oa = Optimizer::new(OptimizerConfig::adam(1e-2), 2).unwrap();
        let mut ob = Optimizer::new(OptimizerConfig::adamw(1e-2, 0.0), 2).unwrap();
        for g in [[0.1f32, -0.2], [0.4, 0.0]] {
            oa.update(&mut a, &g);
            ob.update(&mut b, &g);
        }
        assert_eq!(a, b);
    }

    #[test]
    fn cosine_warms_up_linearly_then_anneals_to_min_lr() {
        let s = LrSchedule::Cosine(CosineLr { warmup_epochs: 4, min_lr: 1e-5 });
        let lrs: Vec<f64> = (0..14).map(|e| s.lr_at(1e-3, e, 14)).collect();
        for (lr, want) in lrs[..4].iter().zip([2.5e-4, 5e-4, 7.5e-4, 1e-3]) {
            assert!((lr - want).abs() < 1e-18, "{lrs:?}");
        }
        assert!((lrs[4] - 1e-3).abs() < 1e-18, "the first epoch after the warm-up runs at the base rate: {}", lrs[4]);
        // halfway through the 10 cosine epochs: the mean of base and min
        assert!((lrs[9] - (1e-3 + 1e-5) / 2.0).abs() < 1e-15, "{}", lrs[9]);
        assert!(lrs[4..].windows(2).all(|w| w[1] < w[0]), "decreasing: {lrs:?}");
        assert!(lrs[13] > 1e-5 && lrs[13] < 4e-5, "{}", lrs[13]);
        // no warm-up: starts at the base rate
        assert_eq!(LrSchedule::Cosine(CosineLr { warmup_epochs: 0, min_lr: 0.0 }).lr_at(1e-3, 0, 10), 1e-3);
    }

    #[test]
    fn schedules_read_their_old_and_new_forms() {
        let old: LrSchedule = serde_json::from_str(r#"{"step_size":40,"gamma":0.1}"#).unwrap();
        assert_eq!(old, LrSchedule::paper());
        let json = serde_json::to_string(&LrSchedule::paper()).unwrap();
        assert_eq!(json, r#"{"kind":"step","step_size":40,"gamma":0.1}"#);
        let c = LrSchedule::Cosine(CosineLr { warmup_epochs: 5, min_lr: 0.0 });
        assert_eq!(serde_json::from_str::<LrSchedule>(&serde_json::to_string(&c).unwrap()).unwrap(), c);
        assert!(serde_json::from_str::<LrSchedule>(r#"{"kind":"cosine","warmup":5}"#).is_err());
    }
}
