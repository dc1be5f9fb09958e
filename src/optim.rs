//! Optimizers over one flat parameter buffer, with PyTorch's exact update rules, and StepLR.
//! The GPU engine's fused optimizer kernel (`cuda/optim.cu`) computes the same expressions.

use crate::error::{config_err, Result};
use crate::Real;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// torch.optim.Adam: bias-corrected, eps added after the square root.
    Adam { lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
    /// torch.optim.SGD with momentum (dampening 0, not Nesterov).
    Sgd { lr: f64, momentum: f64, weight_decay: f64 },
}

impl OptimizerConfig {
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
    pub fn sgd(lr: f64, momentum: f64) -> Self {
        OptimizerConfig::Sgd { lr, momentum, weight_decay: 0.0 }
    }
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Adam { lr, .. } | OptimizerConfig::Sgd { lr, .. } => lr,
        }
    }
    pub fn validate(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        match *self {
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay } => {
                if !(ok(lr) && lr > 0.0) {
                    return Err(config_err("lr", format!("{lr} must be a positive number")));
                }
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return Err(config_err("betas", "Adam's betas must lie in [0, 1)"));
                }
                if !(ok(eps) && ok(weight_decay)) {
                    return Err(config_err("eps/weight_decay", "must be finite and ≥ 0"));
                }
            }
            OptimizerConfig::Sgd { lr, momentum, weight_decay } => {
                if !(ok(lr) && lr > 0.0) {
                    return Err(config_err("lr", format!("{lr} must be a positive number")));
                }
                if !(ok(momentum) && ok(weight_decay)) {
                    return Err(config_err("momentum/weight_decay", "must be finite and ≥ 0"));
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
            OptimizerConfig::Adam { beta1, beta2, eps, weight_decay, .. } => {
                let bc1 = 1.0 - beta1.powi(self.step as i32);
                let bc2 = 1.0 - beta2.powi(self.step as i32);
                let step_size = lr / bc1;
                let bc2_sqrt = bc2.sqrt();
                for i in 0..params.len() {
                    let p = params[i].to_f64();
                    let g = grads[i].to_f64() + weight_decay * p;
                    let m = beta1 * self.m[i] as f64 + (1.0 - beta1) * g;
                    let v = beta2 * self.v[i] as f64 + (1.0 - beta2) * g * g;
                    self.m[i] = m as f32;
                    self.v[i] = v as f32;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    params[i] = F::from_f64(p - step_size * m / denom);
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
}
