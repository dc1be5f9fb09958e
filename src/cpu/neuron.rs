//! The neuron's pointwise functions: fire (H), the E/I sign, and their backward-pass gradients.
//! The CUDA twin is `cuda/common.cuh`; both evaluate the same expressions in the same order.

use crate::spec::{FiringMode, NeuronConfig, Surrogate};
use crate::Real;

/// The neuron constants in the engine's float type, ready for the inner loops.
#[derive(Clone, Copy, Debug)]
pub struct Neuron<F> {
    pub leak: F,
    pub threshold: F,
    surrogate: Surrogate,
    smooth_k: Option<F>,
}

impl<F: Real> Neuron<F> {
    pub fn new(cfg: &NeuronConfig) -> Self {
        Neuron {
            leak: F::from_f64(cfg.leak),
            threshold: F::from_f64(cfg.threshold),
            surrogate: cfg.surrogate,
            smooth_k: match cfg.mode {
                FiringMode::Exact => None,
                FiringMode::Smooth { k } => Some(F::from_f64(k)),
            },
        }
    }

    /// o = H(x), x = v − θ; H(x) = 1 iff x > 0 (strictly).
    #[inline(always)]
    pub fn fire(&self, x: F) -> F {
        match self.smooth_k {
            None => {
                if x > F::ZERO {
                    F::ONE
                } else {
                    F::ZERO
                }
            }
            Some(k) => (k * x).sigmoid(),
        }
    }

    /// dH/dx as the backward pass uses it.
    #[inline(always)]
    pub fn fire_grad(&self, x: F) -> F {
        match self.smooth_k {
            None => self.surrogate_grad(x),
            Some(k) => {
                let s = (k * x).sigmoid();
                k * s * (F::ONE - s)
            }
        }
    }

    /// e = sign(z), sign(0) = 0.
    #[inline(always)]
    pub fn sign(&self, z: F) -> F {
        match self.smooth_k {
            None => {
                if z > F::ZERO {
                    F::ONE
                } else if z < F::ZERO {
                    -F::ONE
                } else {
                    F::ZERO
                }
            }
            Some(k) => (k * z).tanh(),
        }
    }

    /// d sign/dz as the backward pass uses it (the reference uses the same height-1 rectangle as
    /// for H, not twice it).
    #[inline(always)]
    pub fn sign_grad(&self, z: F) -> F {
        match self.smooth_k {
            None => self.surrogate_grad(z),
            Some(k) => {
                let t = (k * z).tanh();
                k * (F::ONE - t * t)
            }
        }
    }

    /// Whether sign(z) and d sign/dz are functions of a one-byte code of z ([`Neuron::z_code`]): with
    /// the exact step functions and the rectangle surrogate, the backward needs only sign(z) and
    /// whether z lies inside the rectangle, so the forward may keep that byte instead of z.
    pub fn z_code_is_exact(&self) -> bool {
        self.smooth_k.is_none() && matches!(self.surrogate, Surrogate::Rectangle { .. })
    }

    /// The one-byte code of z: bits 0–1 hold sign(z) + 1, bit 2 whether d sign/dz ≠ 0. Only
    /// meaningful where [`Neuron::z_code_is_exact`].
    #[inline(always)]
    pub fn z_code(&self, z: F) -> u8 {
        let sign = if z > F::ZERO {
            2
        } else if z < F::ZERO {
            0
        } else {
            1
        };
        sign | (((self.sign_grad(z) != F::ZERO) as u8) << 2)
    }

    /// sign(z) from z's code: the very value `sign(z)` returns.
    #[inline(always)]
    pub fn sign_of_code(&self, code: u8) -> F {
        match code & 3 {
            2 => F::ONE,
            0 => -F::ONE,
            _ => F::ZERO,
        }
    }

    /// d sign/dz from z's code: the rectangle's height (the surrogate at 0, inside the window, so
    /// the very value `sign_grad(z)` returns) or 0.
    #[inline(always)]
    pub fn sign_grad_of_code(&self, code: u8) -> F {
        if code & 4 != 0 {
            self.surrogate_grad(F::ZERO)
        } else {
            F::ZERO
        }
    }

    #[inline(always)]
    fn surrogate_grad(&self, x: F) -> F {
        match self.surrogate {
            Surrogate::Rectangle { width } => {
                let w = F::from_f64(width);
                if x.abs() < w * F::from_f64(0.5) {
                    F::ONE / w
                } else {
                    F::ZERO
                }
            }
            Surrogate::Sigmoid { alpha } => {
                let a = F::from_f64(alpha);
                let s = (a * x).sigmoid();
                a * s * (F::ONE - s)
            }
            Surrogate::Atan { alpha } => {
                let a = F::from_f64(alpha);
                let y = F::from_f64(std::f64::consts::FRAC_PI_2) * a * x;
                a * F::from_f64(0.5) / (F::ONE + y * y)
            }
        }
    }
}
