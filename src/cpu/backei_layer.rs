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
//! Saved by forward: s_t (the output itself, over all T), and v_t, g_t (back), z_t (ei) as set by
//! [`SavedState`]: every step (the default), or with `recompute = Some(K)` a window of K steps
//! plus u at the start of every window, the backward recomputing each earlier window's steps from
//! its checkpoint (the same code on the same inputs: bit-identical gradients); z_t as a one-byte
//! code of sign(z_t) and the surrogate's window where that is exact (`compact`). o and e are
//! recomputed.
//!
//! Layout: every tensor is time-major [T][B][C][H][W]; the input current may have T_in = 1
//! (direct encoding: the same current at every step, its gradient summed over t).

use super::conv::{self, ConvGeom};
use super::neuron::Neuron;
use crate::error::{config_err, shape_err, Result};
use crate::spec::{FeedbackConfig, NeuronConfig};
use crate::Real;
use rayon::prelude::*;

/// What the forward keeps for the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SavedState {
    /// `Some(K)`: keep v, g, z of one window of K steps and u at the start of every window; the
    /// backward recomputes each earlier window from its checkpoint (activation checkpointing over
    /// time). `None`: keep every step.
    pub recompute: Option<usize>,
    /// Keep z as a one-byte code (sign and surrogate window) where that is exact: exact firing
    /// and the rectangle surrogate (`Neuron::z_code_is_exact`); else z itself.
    pub compact: bool,
}

impl SavedState {
    /// Every step, z as values: the state tests and the GPU comparisons inspect.
    pub const FULL: SavedState = SavedState { recompute: None, compact: false };

    /// The lean state: z coded where exact, windows of `recompute` steps when given.
    pub fn lean(recompute: Option<usize>) -> SavedState {
        SavedState { recompute, compact: true }
    }

    /// Refuses K = 0.
    pub fn validate(&self) -> Result<()> {
        if self.recompute == Some(0) {
            return Err(config_err("--recompute", "K = 0: keep every K-th step's state with K ≥ 1 (K ≥ T keeps every step)"));
        }
        Ok(())
    }

    /// Steps per window for T = `steps`: K, at most T.
    pub fn window(&self, steps: usize) -> usize {
        self.recompute.unwrap_or(steps).clamp(1, steps.max(1))
    }
}

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
    /// What the forward keeps for the backward (set before a forward).
    pub saved: SavedState,
    /// s_t, the layer's output [T][B][C][H][W].
    pub out: Vec<F>,
    /// v_t, membrane after integration, before reset: [window][B][C][H][W] (every step with
    /// `SavedState::FULL`).
    pub v: Vec<F>,
    /// g_t = σ(a_t) (back on), as v.
    pub g: Vec<F>,
    /// z_t = W_e ⊛ v_t + b_e (ei on, not coded), as v.
    pub z: Vec<F>,
    /// z_t's codes (`Neuron::z_code`: ei on, coded), as v.
    z_codes: Vec<u8>,
    /// u at the start of windows 1, 2, … (recompute).
    checkpoints: Vec<F>,
    /// Steps per window, and the window whose state v, g, z hold.
    window: usize,
    held: usize,
    /// Whether z is kept as codes (for the current buffers).
    coded: bool,
    u: Vec<F>,
    /// one step's z while it is coded
    z_step: Vec<F>,
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
            saved: SavedState::FULL,
            out: Vec::new(),
            v: Vec::new(),
            g: Vec::new(),
            z: Vec::new(),
            z_codes: Vec::new(),
            checkpoints: Vec::new(),
            window: 0,
            held: 0,
            coded: false,
            u: Vec::new(),
            z_step: Vec::new(),
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

    /// Sizes every buffer for a batch shape and the saved-state setting; a no-op when neither
    /// changed. Public for a caller that keeps the saved state itself (the C ABI's workspace): with
    /// `SavedState::FULL` it restores `out`, `v`, `g`, `z` after this and before a backward.
    pub fn size_for(&mut self, batch: usize, steps: usize) {
        let window = self.saved.window(steps);
        let coded = self.feedback.ei && self.saved.compact && self.neuron.z_code_is_exact();
        if self.batch == batch && self.steps == steps && self.window == window && self.coded == coded {
            return;
        }
        let bn = batch * self.neurons();
        let kept = window * bn;
        let windows = steps.div_ceil(window);
        self.out = vec![F::ZERO; steps * bn];
        self.v = vec![F::ZERO; kept];
        self.g = if self.feedback.back { vec![F::ZERO; kept] } else { Vec::new() };
        self.z = if self.feedback.ei && !coded { vec![F::ZERO; kept] } else { Vec::new() };
        self.z_codes = if coded { vec![0; kept] } else { Vec::new() };
        self.z_step = if coded { vec![F::ZERO; bn] } else { Vec::new() };
        self.checkpoints = vec![F::ZERO; (windows - 1) * bn];
        self.u = vec![F::ZERO; bn];
        self.gs = Vec::new();
        for s in [&mut self.dv, &mut self.dz, &mut self.da, &mut self.du] {
            *s = vec![F::ZERO; bn];
        }
        self.batch = batch;
        self.steps = steps;
        self.window = window;
        self.coded = coded;
    }

    /// Bytes the forward leaves for the backward: s over all T, the kept v, g, z (or z's codes)
    /// and the recompute checkpoints.
    pub fn state_bytes(&self) -> usize {
        let f = std::mem::size_of::<F>();
        f * (self.out.len() + self.v.len() + self.g.len() + self.z.len() + self.checkpoints.len()) + self.z_codes.len()
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
        self.saved.validate()?;
        self.validate(p, input.len(), t_in, batch, steps)?;
        self.size_for(batch, steps);
        let bn = batch * self.neurons();
        let k = self.window;
        self.u.fill(F::ZERO);
        for w in 0..steps.div_ceil(k) {
            if w > 0 {
                self.checkpoints[(w - 1) * bn..w * bn].copy_from_slice(&self.u);
            }
            self.run_steps(p, input, t_in, w * k, ((w + 1) * k).min(steps), true);
        }
        self.held = steps.div_ceil(k) - 1;
        Ok(())
    }

    /// Steps t0..t1 from the state in `self.u` (u_{t0−1}), keeping v, g, z in the window's slots
    /// t − t0. `write_out`: the forward writes s_t; a recomputation leaves the s_t the forward
    /// wrote (it computes the same values) and reads the earlier ones for the feedback.
    fn run_steps(&mut self, p: &BackEiParams<F>, input: &[F], t_in: usize, t0: usize, t1: usize, write_out: bool) {
        let bn = self.batch * self.neurons();
        let hw = self.shape[1] * self.shape[2];
        let (back, ei, d) = (self.feedback.back, self.feedback.ei, self.feedback.delay);
        let nr = self.neuron;
        let gate = self.gate;
        let coded = self.coded;
        for t in t0..t1 {
            let slot = (t - t0) * bn..(t - t0 + 1) * bn;
            let i_t = &input[if t_in == 1 { 0 } else { t * bn }..][..bn];
            let (past, rest) = self.out.split_at_mut(t * bn);
            let s_t = &mut rest[..bn];
            if back {
                let a_t = &mut self.g[slot.clone()];
                if t >= d {
                    conv::forward(&gate, p.w_b, p.b_b, &past[(t - d) * bn..][..bn], a_t);
                } else {
                    for (i, a) in a_t.iter_mut().enumerate() {
                        *a = p.b_b[(i / hw) % self.shape[0]];
                    }
                }
                a_t.par_iter_mut().for_each(|a| *a = a.sigmoid());
            }
            let v_t = &mut self.v[slot.clone()];
            let g_t: &[F] = if back { &self.g[slot.clone()] } else { &[] };
            v_t.par_iter_mut().zip(self.u.par_iter()).enumerate().for_each(|(i, (v, u))| {
                let cur = if back { g_t[i] * i_t[i] } else { i_t[i] };
                *v = nr.leak * *u + cur;
            });
            if ei {
                let z_t = if coded { &mut self.z_step[..] } else { &mut self.z[slot.clone()] };
                conv::forward(&gate, p.w_e, p.b_e, v_t, z_t);
                if coded {
                    let codes = &mut self.z_codes[slot.clone()];
                    codes.par_iter_mut().zip(self.z_step.par_iter()).for_each(|(c, z)| *c = nr.z_code(*z));
                }
            }
            let z_t: &[F] = match (ei, coded) {
                (false, _) => &[],
                (true, true) => &self.z_step,
                (true, false) => &self.z[slot],
            };
            let step = |i: usize, u: &mut F| {
                let v = v_t[i];
                let o = nr.fire(v - nr.threshold);
                *u = v * (F::ONE - o);
                if ei {
                    nr.sign(z_t[i]) * o
                } else {
                    o
                }
            };
            if write_out {
                s_t.par_iter_mut().zip(self.u.par_iter_mut()).enumerate().for_each(|(i, (s, u))| *s = step(i, u));
            } else {
                self.u.par_iter_mut().enumerate().for_each(|(i, u)| {
                    step(i, u);
                });
            }
        }
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
        self.gs.clear();
        self.gs.extend_from_slice(&grad_out[..steps * bn]);
        self.du.fill(F::ZERO);
        if t_in == 1 {
            grad_in[..bn].fill(F::ZERO);
        }
        let k = self.window;
        for w in (0..steps.div_ceil(k)).rev() {
            let (t0, t1) = (w * k, ((w + 1) * k).min(steps));
            if w != self.held {
                // recompute the window's steps from its checkpoint
                match w {
                    0 => self.u.fill(F::ZERO),
                    _ => self.u.copy_from_slice(&self.checkpoints[(w - 1) * bn..w * bn]),
                }
                self.run_steps(p, input, t_in, t0, t1, false);
                self.held = w;
            }
            for t in (t0..t1).rev() {
                self.backward_step(p, grads, input, t_in, grad_in, t, (t - t0) * bn..(t - t0 + 1) * bn);
            }
        }
        Ok(())
    }

    /// One step of BPTT: step t, whose v, g, z sit at `slot` of the kept window.
    #[allow(clippy::too_many_arguments)]
    fn backward_step(
        &mut self,
        p: &BackEiParams<F>,
        grads: &mut BackEiGrads<F>,
        input: &[F],
        t_in: usize,
        grad_in: &mut [F],
        t: usize,
        slot: std::ops::Range<usize>,
    ) {
        let bn = self.batch * self.neurons();
        let hw = self.shape[1] * self.shape[2];
        let c = self.shape[0];
        let (back, ei, d) = (self.feedback.back, self.feedback.ei, self.feedback.delay);
        let nr = self.neuron;
        let gate = self.gate;
        let coded = self.coded;
        let v_t = &self.v[slot.clone()];
        let z_t: &[F] = if ei && !coded { &self.z[slot.clone()] } else { &[] };
        let codes: &[u8] = if coded { &self.z_codes[slot.clone()] } else { &[] };
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
                let (sign, sign_grad) = if coded {
                    (nr.sign_of_code(codes[i]), nr.sign_grad_of_code(codes[i]))
                } else {
                    (nr.sign(z_t[i]), nr.sign_grad(z_t[i]))
                };
                d_o = ds * sign;
                *dz = ds * o * sign_grad;
            }
            d_o -= du[i] * v;
            *dv = du[i] * (F::ONE - o) + d_o * nr.fire_grad(x);
        });
        if ei {
            conv::backward_data(&gate, p.w_e, &self.dz, &mut self.dv, true);
            conv::backward_weights(&gate, v_t, &self.dz, grads.w_e, grads.b_e);
        }
        let i_t = &input[if t_in == 1 { 0 } else { t * bn }..][..bn];
        let g_t: &[F] = if back { &self.g[slot] } else { &[] };
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
