//! The BackEI spiking layer on the CPU: the reference every GPU kernel is tested against.
//!
//! For t = 1..T, per sample (state u, s zero at t = 0; s_{t−D} = 0 for t ≤ D):
//!   a_t = W_b ⊛ s_{t−D} + b_b,  g_t = σ(a_t)             (back on; else g_t = 1)
//!   v_t = λ·u_{t−1} + g_t ⊙ I_t                            (integrate)
//!   o_t = H(v_t − θ)                                       (fire)
//!   z_t = W_e ⊛ v_t + b_e,  e_t = sign(z_t)                (ei on; else e_t = 1)
//!   u_t = v_t ⊙ (1 − o_t)                                  (hard reset, not detached)
//!   s_t = e_t ⊙ o_t                                        (output)
//! ⊛ is a C→C convolution, (2r+1)² kernel, stride 1, zero padding r. With back and ei off this
//! is the plain spiking layer (the fully connected case is H = W = 1).
//!
//! BPTT, t = T..1, with ds_t = ∂L/∂s_t (from the next layer plus the feedback of step t+D) and
//! du_t = λ·dv_{t+1}:
//!   de = ds·o, do = ds·e − du·v, dz = de·sign′(z)
//!   dv = du·(1 − o) + do·H′(v − θ) + W_eᵀ ⊛ dz
//!   dI_t = dv·g, du_{t−1} = λ·dv, da = dv·I·g·(1 − g)
//!   ds_{t−D} += W_bᵀ ⊛ da, dW_b += da ⋆ s_{t−D}, dW_e += dz ⋆ v_t, db_* += Σ d*
//! Saved by forward: v_t, g_t (back), z_t (ei), s_t (the output itself); o and e are recomputed.
//!
//! Layout: every tensor is time-major [T][B][C][H][W]; the input current may have T_in = 1
//! (direct encoding: the same current at every step, its gradient summed over t).

use super::conv::{self, ConvGeom};
use super::neuron::Neuron;
use crate::error::{config_err, shape_err, Result};
use crate::spec::{FeedbackConfig, NeuronConfig};
use crate::Real;
use rayon::prelude::*;

/// Parameters of one BackEI layer (empty slices for a disabled gate).
pub struct BackEiParams<'a, F> {
    pub w_b: &'a [F],
    pub b_b: &'a [F],
    pub w_e: &'a [F],
    pub b_e: &'a [F],
}

/// Gradients of one BackEI layer, accumulated into (empty slices for a disabled gate).
pub struct BackEiGrads<'a, F> {
    pub w_b: &'a mut [F],
    pub b_b: &'a mut [F],
    pub w_e: &'a mut [F],
    pub b_e: &'a mut [F],
}

pub struct BackEiLayer<F> {
    pub feedback: FeedbackConfig,
    pub neuron: Neuron<F>,
    /// [C, H, W] of the layer.
    pub shape: [usize; 3],
    pub gate: ConvGeom,
    batch: usize,
    steps: usize,
    /// s_t, the layer's output [T][B][C][H][W].
    pub out: Vec<F>,
    /// v_t, membrane after integration, before reset.
    pub v: Vec<F>,
    /// g_t = σ(a_t) (back on).
    pub g: Vec<F>,
    /// z_t = W_e ⊛ v_t + b_e (ei on).
    pub z: Vec<F>,
    u: Vec<F>,
    // backward scratch, sized once per batch shape
    gs: Vec<F>,
    dv: Vec<F>,
    dz: Vec<F>,
    da: Vec<F>,
    du: Vec<F>,
}

impl<F: Real> BackEiLayer<F> {
    /// A BackEI layer; pass `FeedbackConfig { back: false, ei: false, .. }` for a plain one.
    pub fn new(shape: [usize; 3], feedback: FeedbackConfig, neuron: &NeuronConfig) -> Self {
        let [c, h, w] = shape;
        let k = 2 * feedback.radius + 1;
        BackEiLayer {
            feedback,
            neuron: Neuron::new(neuron),
            shape,
            gate: ConvGeom::new(c, c, h, w, k, feedback.radius),
            batch: 0,
            steps: 0,
            out: Vec::new(),
            v: Vec::new(),
            g: Vec::new(),
            z: Vec::new(),
            u: Vec::new(),
            gs: Vec::new(),
            dv: Vec::new(),
            dz: Vec::new(),
            da: Vec::new(),
            du: Vec::new(),
        }
    }

    /// Neurons per sample.
    pub fn neurons(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of W_b (and of W_e).
    pub fn gate_weight_len(&self) -> usize {
        self.gate.weight_len()
    }

    /// Sizes every buffer for a batch shape; a no-op when the shape is unchanged.
    fn size_for(&mut self, batch: usize, steps: usize) {
        if self.batch == batch && self.steps == steps {
            return;
        }
        let bn = batch * self.neurons();
        let all = steps * bn;
        self.out = vec![F::ZERO; all];
        self.v = vec![F::ZERO; all];
        self.g = if self.feedback.back { vec![F::ZERO; all] } else { Vec::new() };
        self.z = if self.feedback.ei { vec![F::ZERO; all] } else { Vec::new() };
        self.u = vec![F::ZERO; bn];
        self.gs = Vec::new();
        for s in [&mut self.dv, &mut self.dz, &mut self.da, &mut self.du] {
            *s = vec![F::ZERO; bn];
        }
        self.batch = batch;
        self.steps = steps;
    }

    /// Checks the settings, the parameter lengths and the input's shape before a forward.
    fn validate(&self, p: &BackEiParams<F>, input_len: usize, t_in: usize, batch: usize, steps: usize) -> Result<()> {
        let fb = &self.feedback;
        let [c, h, w] = self.shape;
        if c * h * w == 0 {
            return Err(config_err("BackEI layer shape", format!("{:?} has a zero dimension", self.shape)));
        }
        if steps == 0 || batch == 0 {
            return Err(config_err("BackEI layer", format!("T = {steps}, batch = {batch}: both must be at least 1")));
        }
        if fb.back && fb.delay == 0 {
            return Err(config_err("delay", "D = 0: the feedback delay must be at least 1 step"));
        }
        if let Some(problem) = fb.gate_misfit(h, w) {
            return Err(config_err("radius", problem));
        }
        if t_in != 1 && t_in != steps {
            return Err(shape_err("BackEI input current", format!("T_in = 1 or T = {steps}"), format!("T_in = {t_in}")));
        }
        let n = c * h * w;
        if input_len != t_in * batch * n {
            return Err(shape_err("BackEI input current", format!("{t_in}×{batch}×{n} values"), format!("{input_len}")));
        }
        self.check_gate_lengths("parameter", [p.w_b.len(), p.b_b.len(), p.w_e.len(), p.b_e.len()])
    }

    /// The lengths of W_b, b_b, W_e, b_e (parameters or gradients) for the gates that are on.
    fn check_gate_lengths(&self, what: &str, lens: [usize; 4]) -> Result<()> {
        let (fb, c, wl) = (self.feedback, self.shape[0], self.gate.weight_len());
        let want = [("W_b", fb.back, wl), ("b_b", fb.back, c), ("W_e", fb.ei, wl), ("b_e", fb.ei, c)];
        for ((name, on, want), got) in want.into_iter().zip(lens) {
            if on && got != want {
                return Err(shape_err(format!("BackEI {what} {name}"), format!("{want} values"), format!("{got}")));
            }
        }
        Ok(())
    }

    /// Runs all T steps for a batch; the output is `self.out`.
    pub fn forward(&mut self, p: &BackEiParams<F>, input: &[F], t_in: usize, batch: usize, steps: usize) -> Result<()> {
        self.validate(p, input.len(), t_in, batch, steps)?;
        self.size_for(batch, steps);
        let bn = batch * self.neurons();
        let hw = self.shape[1] * self.shape[2];
        let (back, ei, d) = (self.feedback.back, self.feedback.ei, self.feedback.delay);
        let nr = self.neuron;
        let gate = self.gate;
        self.u.fill(F::ZERO);
        for t in 0..steps {
            let i_t = &input[if t_in == 1 { 0 } else { t * bn }..][..bn];
            let (past, rest) = self.out.split_at_mut(t * bn);
            let s_t = &mut rest[..bn];
            if back {
                let a_t = &mut self.g[t * bn..(t + 1) * bn];
                if t >= d {
                    conv::forward(&gate, p.w_b, p.b_b, &past[(t - d) * bn..][..bn], a_t);
                } else {
                    for (i, a) in a_t.iter_mut().enumerate() {
                        *a = p.b_b[(i / hw) % self.shape[0]];
                    }
                }
                a_t.par_iter_mut().for_each(|a| *a = a.sigmoid());
            }
            let v_t = &mut self.v[t * bn..(t + 1) * bn];
            let g_t: &[F] = if back { &self.g[t * bn..(t + 1) * bn] } else { &[] };
            v_t.par_iter_mut().zip(self.u.par_iter()).enumerate().for_each(|(i, (v, u))| {
                let cur = if back { g_t[i] * i_t[i] } else { i_t[i] };
                *v = nr.leak * *u + cur;
            });
            if ei {
                conv::forward(&gate, p.w_e, p.b_e, v_t, &mut self.z[t * bn..(t + 1) * bn]);
            }
            let z_t: &[F] = if ei { &self.z[t * bn..(t + 1) * bn] } else { &[] };
            s_t.par_iter_mut().zip(self.u.par_iter_mut()).enumerate().for_each(|(i, (s, u))| {
                let v = v_t[i];
                let o = nr.fire(v - nr.threshold);
                *u = v * (F::ONE - o);
                *s = if ei { nr.sign(z_t[i]) * o } else { o };
            });
        }
        Ok(())
    }

    /// BPTT over all T steps. `grad_out` is ∂L/∂s [T][B][...]; writes ∂L/∂I into `grad_in`
    /// ([T_in][B][...], summed over t when T_in = 1) and accumulates the parameter gradients.
    pub fn backward(
        &mut self,
        p: &BackEiParams<F>,
        grads: &mut BackEiGrads<F>,
        input: &[F],
        t_in: usize,
        grad_out: &[F],
        grad_in: &mut [F],
    ) -> Result<()> {
        let (batch, steps) = (self.batch, self.steps);
        if batch == 0 {
            return Err(config_err("BackEI backward", "backward called before forward"));
        }
        self.validate(p, input.len(), t_in, batch, steps)?;
        let bn = batch * self.neurons();
        if grad_out.len() != steps * bn || grad_in.len() != t_in * bn {
            return Err(shape_err(
                "BackEI gradients",
                format!("∂L/∂s of {} and ∂L/∂I of {} values", steps * bn, t_in * bn),
                format!("{} and {}", grad_out.len(), grad_in.len()),
            ));
        }
        self.check_gate_lengths("gradient", [grads.w_b.len(), grads.b_b.len(), grads.w_e.len(), grads.b_e.len()])?;
        let hw = self.shape[1] * self.shape[2];
        let c = self.shape[0];
        let (back, ei, d) = (self.feedback.back, self.feedback.ei, self.feedback.delay);
        let nr = self.neuron;
        let gate = self.gate;
        self.gs.clear();
        self.gs.extend_from_slice(&grad_out[..steps * bn]);
        self.du.fill(F::ZERO);
        if t_in == 1 {
            grad_in[..bn].fill(F::ZERO);
        }
        for t in (0..steps).rev() {
            let v_t = &self.v[t * bn..(t + 1) * bn];
            let z_t: &[F] = if ei { &self.z[t * bn..(t + 1) * bn] } else { &[] };
            let (gs_past, gs_rest) = self.gs.split_at_mut(t * bn);
            let ds_t = &gs_rest[..bn];
            let du = &self.du;
            self.dv.par_iter_mut().zip(self.dz.par_iter_mut()).enumerate().for_each(|(i, (dv, dz))| {
                let v = v_t[i];
                let x = v - nr.threshold;
                let o = nr.fire(x);
                let ds = ds_t[i];
                let mut d_o = ds;
                if ei {
                    let z = z_t[i];
                    d_o = ds * nr.sign(z);
                    *dz = ds * o * nr.sign_grad(z);
                }
                d_o -= du[i] * v;
                *dv = du[i] * (F::ONE - o) + d_o * nr.fire_grad(x);
            });
            if ei {
                conv::backward_data(&gate, p.w_e, &self.dz, &mut self.dv, true);
                conv::backward_weights(&gate, v_t, &self.dz, grads.w_e, grads.b_e);
            }
            let i_t = &input[if t_in == 1 { 0 } else { t * bn }..][..bn];
            let g_t: &[F] = if back { &self.g[t * bn..(t + 1) * bn] } else { &[] };
            let dv = &self.dv;
            let di = &mut grad_in[if t_in == 1 { 0 } else { t * bn }..][..bn];
            di.par_iter_mut().zip(self.du.par_iter_mut()).zip(self.da.par_iter_mut()).enumerate().for_each(|(i, ((di, du), da))| {
                let dvi = dv[i];
                let dcur = if back { dvi * g_t[i] } else { dvi };
                if t_in == 1 {
                    *di += dcur;
                } else {
                    *di = dcur;
                }
                *du = nr.leak * dvi;
                if back {
                    let g = g_t[i];
                    *da = dvi * i_t[i] * g * (F::ONE - g);
                }
            });
            if back {
                if t >= d {
                    let s_past = &self.out[(t - d) * bn..][..bn];
                    conv::backward_weights(&gate, s_past, &self.da, grads.w_b, grads.b_b);
                    conv::backward_data(&gate, p.w_b, &self.da, &mut gs_past[(t - d) * bn..][..bn], true);
                } else {
                    for (i, da) in self.da.iter().enumerate() {
                        grads.b_b[(i / hw) % c] += *da;
                    }
                }
            }
        }
        Ok(())
    }

    /// Fraction of neurons that fired, over all steps and samples of the last forward.
    pub fn firing_rate(&self) -> f64 {
        let n = self.out.len().max(1);
        self.out.iter().filter(|s| s.to_f64() != 0.0).count() as f64 / n as f64
    }

    /// Among the outputs that fired, the fraction that were inhibitory (s = −1).
    pub fn inhibitory_fraction(&self) -> f64 {
        let fired = self.out.iter().filter(|s| s.to_f64() != 0.0).count();
        let inh = self.out.iter().filter(|s| s.to_f64() < 0.0).count();
        if fired == 0 {
            0.0
        } else {
            inh as f64 / fired as f64
        }
    }
}
