//! A whole network on the CPU engine: the layers of a `NetworkSpec` in sequence, one flat
//! parameter buffer (the optimizer's view) and one flat gradient buffer, forward over T, loss,
//! BPTT backward and the optimizer step.

use super::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams, SavedState};
use super::conv::{self, ConvGeom};
use super::loss::{self, Loss};
use super::{dropout, linear, pool};
use crate::error::{check_finite, config_err, shape_err, Result};
use crate::optim::Optimizer;
use crate::spec::{FeedbackConfig, LayerSpec, NetworkSpec};
use crate::Real;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ops::Range;

/// One named parameter tensor inside the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSlot {
    /// PyTorch-style module name, e.g. `layers.1.back.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    /// PyTorch's default bound 1/sqrt(fan_in).
    pub init_bound: f64,
}

enum Op<F: Real> {
    Conv {
        geom: ConvGeom,
        w: Range<usize>,
        b: Range<usize>,
    },
    Linear {
        n_in: usize,
        n_out: usize,
        w: Range<usize>,
        b: Range<usize>,
    },
    Pool {
        c: usize,
        h: usize,
        w: usize,
    },
    /// `key`: the RNG key of the last training forward (None: evaluation, no dropout); the
    /// backward draws the mask again from it.
    Dropout {
        p: f32,
        index: u32,
        key: Option<u64>,
    },
    Flatten,
    /// BackEI or plain spiking; `params` = W_b, b_b, W_e, b_e (empty ranges when disabled).
    Spike {
        layer: Box<BackEiLayer<F>>,
        params: [Range<usize>; 4],
    },
}

struct Layer<F: Real> {
    op: Op<F>,
    in_len: usize,
    out_len: usize,
    /// Output [T_out][B][out_len] (unused by Flatten and Spike, whose output lives elsewhere).
    out: Vec<F>,
    /// ∂L/∂input [T_in][B][in_len].
    grad_in: Vec<F>,
    t_in: usize,
    t_out: usize,
}

/// Per-step results of a training step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub correct: usize,
    pub batch: usize,
}

/// The network on the CPU engine, in float type `F` (f32 to train, f64 for gradient checks).
pub struct Network<F: Real> {
    pub spec: NetworkSpec,
    pub params: Vec<F>,
    pub grads: Vec<F>,
    pub slots: Vec<ParamSlot>,
    layers: Vec<Layer<F>>,
    classes: usize,
    input: Vec<F>,
    input_t: usize,
    /// ∂L/∂input of the last backward.
    pub input_grad: Vec<F>,
    batch: usize,
    readout: Vec<F>,
    readout_grad: Vec<F>,
    /// Seed of the dropout masks; with `iteration` it keys every mask.
    pub dropout_seed: u64,
    /// Training iterations done (keys the dropout masks; the optimizer counts its own steps).
    pub iteration: u64,
    pub training: bool,
    /// The position of the batch's first sample in the global batch it is a shard of (data-
    /// parallel training; 0 otherwise): the dropout masks are those of that place.
    pub sample_offset: usize,
}

impl<F: Real> Network<F> {
    /// Builds the network of `spec` with PyTorch's default initialisation drawn from `seed`.
    pub fn new(spec: &NetworkSpec, seed: u64) -> Result<Self> {
        let plan = spec.plan()?;
        let mut slots = Vec::new();
        let mut total = 0usize;
        let mut add = |slots: &mut Vec<ParamSlot>, name: String, shape: Vec<usize>, fan_in: usize| {
            let len: usize = shape.iter().product();
            let range = total..total + len;
            total += len;
            slots.push(ParamSlot { name, shape, range: range.clone(), init_bound: 1.0 / (fan_in as f64).sqrt() });
            range
        };
        let mut layers = Vec::with_capacity(plan.len());
        for (i, lp) in plan.iter().enumerate() {
            let [c, h, w] = lp.input;
            let op = match lp.spec {
                LayerSpec::Conv { out_channels, kernel, padding } => {
                    let geom = ConvGeom::new(c, out_channels, h, w, kernel, padding);
                    let fan_in = c * kernel * kernel;
                    let wr = add(&mut slots, format!("layers.{i}.weight"), vec![out_channels, c, kernel, kernel], fan_in);
                    let br = add(&mut slots, format!("layers.{i}.bias"), vec![out_channels], fan_in);
                    Op::Conv { geom, w: wr, b: br }
                }
                LayerSpec::Linear { out_features } => {
                    let wr = add(&mut slots, format!("layers.{i}.weight"), vec![out_features, c], c);
                    let br = add(&mut slots, format!("layers.{i}.bias"), vec![out_features], c);
                    Op::Linear { n_in: c, n_out: out_features, w: wr, b: br }
                }
                LayerSpec::AvgPool => Op::Pool { c, h, w },
                LayerSpec::Dropout { p } => Op::Dropout { p: p as f32, index: i as u32, key: None },
                LayerSpec::Flatten => Op::Flatten,
                LayerSpec::BackEi | LayerSpec::Spiking => {
                    let fb = if lp.spec == LayerSpec::BackEi {
                        spec.feedback
                    } else {
                        FeedbackConfig { back: false, ei: false, radius: 0, delay: 1 }
                    };
                    let mut layer = BackEiLayer::<F>::new(lp.input, fb, &spec.neuron);
                    layer.saved = SavedState::lean(None);
                    let k = 2 * fb.radius + 1;
                    let wshape = vec![c, c, k, k];
                    let fan_in = c * k * k;
                    let mut params: [Range<usize>; 4] = [0..0, 0..0, 0..0, 0..0];
                    if fb.back {
                        params[0] = add(&mut slots, format!("layers.{i}.back.weight"), wshape.clone(), fan_in);
                        params[1] = add(&mut slots, format!("layers.{i}.back.bias"), vec![c], fan_in);
                    }
                    if fb.ei {
                        params[2] = add(&mut slots, format!("layers.{i}.ei.weight"), wshape.clone(), fan_in);
                        params[3] = add(&mut slots, format!("layers.{i}.ei.bias"), vec![c], fan_in);
                    }
                    Op::Spike { layer: Box::new(layer), params }
                }
            };
            layers.push(Layer {
                op,
                in_len: lp.input.iter().product(),
                out_len: lp.output.iter().product(),
                out: Vec::new(),
                grad_in: Vec::new(),
                t_in: 0,
                t_out: 0,
            });
        }
        let mut params = vec![F::ZERO; total];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for s in &slots {
            for p in &mut params[s.range.clone()] {
                *p = F::from_f64(rng.random_range(-s.init_bound..s.init_bound));
            }
        }
        let classes = spec.classes()?;
        Ok(Network {
            spec: spec.clone(),
            grads: vec![F::ZERO; total],
            params,
            slots,
            layers,
            classes,
            input: Vec::new(),
            input_t: 0,
            input_grad: Vec::new(),
            batch: 0,
            readout: Vec::new(),
            readout_grad: Vec::new(),
            dropout_seed: seed,
            iteration: 0,
            training: true,
            sample_offset: 0,
        })
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// What the spiking layers keep for the backward (default: `SavedState::lean(None)`, every
    /// step, z coded where exact); `recompute = Some(K)` keeps windows of K steps and recomputes
    /// the rest in the backward, with bit-identical gradients.
    pub fn set_saved_state(&mut self, saved: SavedState) -> Result<()> {
        saved.validate()?;
        for l in &mut self.layers {
            if let Op::Spike { layer, .. } = &mut l.op {
                layer.saved = saved;
            }
        }
        Ok(())
    }

    /// Bytes the last forward left for the backward: every layer's output (the input gradients
    /// and backward scratch are not counted) and the spiking layers' saved state.
    pub fn state_bytes(&self) -> usize {
        let f = std::mem::size_of::<F>();
        self.layers
            .iter()
            .map(|l| match &l.op {
                Op::Spike { layer, .. } => layer.state_bytes(),
                _ => f * l.out.len(),
            })
            .sum::<usize>()
            + f * self.input.len()
    }

    /// The parameter tensor called `name`.
    pub fn param(&self, name: &str) -> Option<&[F]> {
        self.slots.iter().find(|s| s.name == name).map(|s| &self.params[s.range.clone()])
    }

    /// Checks an input batch: `x` is [T_in][B][C][H][W] with T_in = 1 (direct encoding) or T.
    fn check_input(&self, x: &[F], t_in: usize, batch: usize) -> Result<()> {
        let frame: usize = self.spec.input.iter().product();
        let t = self.spec.steps;
        if batch == 0 {
            return Err(config_err("batch", "batch size 0"));
        }
        if t_in != 1 && t_in != t {
            return Err(shape_err("network input", format!("T_in = 1 or T = {t} frames"), format!("T_in = {t_in}")));
        }
        if x.len() != t_in * batch * frame {
            return Err(shape_err(
                "network input",
                format!("{t_in}×{batch}×{:?} = {} values", self.spec.input, t_in * batch * frame),
                format!("{} values", x.len()),
            ));
        }
        check_finite("network input", x, "the input batch holds NaN or Inf: check the data and its normalisation")
    }

    /// Runs the network over all T steps and returns the readout [B][classes].
    pub fn forward(&mut self, x: &[F], t_in: usize, batch: usize) -> Result<&[F]> {
        self.check_input(x, t_in, batch)?;
        check_finite("parameters", &self.params, "a parameter is NaN or Inf: the run diverged; lower the learning rate")?;
        let steps = self.spec.steps;
        self.input.clear();
        self.input.extend_from_slice(x);
        self.input_t = t_in;
        self.batch = batch;
        let mut prev_t = t_in;
        for i in 0..self.layers.len() {
            let (before, rest) = self.layers.split_at_mut(i);
            let layer = &mut rest[0];
            let src: &[F] = source(before, &self.input);
            layer.t_in = prev_t;
            let t_out = match layer.op {
                Op::Spike { .. } | Op::Dropout { .. } => steps,
                _ => prev_t,
            };
            layer.t_out = t_out;
            let out_total = t_out * batch * layer.out_len;
            if !matches!(layer.op, Op::Flatten | Op::Spike { .. }) && layer.out.len() != out_total {
                layer.out = vec![F::ZERO; out_total];
            }
            let p = &self.params;
            match &mut layer.op {
                Op::Conv { geom, w, b } => conv::forward(geom, &p[w.clone()], &p[b.clone()], src, &mut layer.out),
                Op::Linear { n_in, n_out, w, b } => linear::forward(*n_in, *n_out, &p[w.clone()], &p[b.clone()], src, &mut layer.out),
                Op::Pool { c, h, w } => pool::forward(*c, *h, *w, src, &mut layer.out),
                Op::Flatten => {}
                Op::Dropout { p: prob, index, key } => {
                    let step = batch * layer.in_len;
                    let expanded;
                    let src = if prev_t == 1 {
                        expanded = src.repeat(steps);
                        &expanded[..]
                    } else {
                        src
                    };
                    *key = self.training.then(|| crate::rng::dropout_key(self.dropout_seed, self.iteration, *index));
                    match key {
                        Some(key) => dropout::forward(*key, *prob, step, (self.sample_offset * layer.in_len) as u64, src, &mut layer.out),
                        None => layer.out.copy_from_slice(src),
                    }
                }
                Op::Spike { layer: sl, params } => {
                    let bp = BackEiParams {
                        w_b: &p[params[0].clone()],
                        b_b: &p[params[1].clone()],
                        w_e: &p[params[2].clone()],
                        b_e: &p[params[3].clone()],
                    };
                    sl.forward(&bp, src, prev_t, batch, steps)?;
                }
            }
            prev_t = t_out;
        }
        let last_t = prev_t;
        let out = source(&self.layers, &self.input);
        self.readout.resize(batch * self.classes, F::ZERO);
        loss::readout(out, last_t, batch, self.classes, &mut self.readout);
        Ok(&self.readout)
    }

    /// BPTT from ∂L/∂readout; accumulates into `grads` (call `zero_grads` first) and, when
    /// `want_input_grad`, writes ∂L/∂input into `input_grad`.
    pub fn backward(&mut self, d_readout: &[F], want_input_grad: bool) -> Result<()> {
        let batch = self.batch;
        if batch == 0 {
            return Err(config_err("backward", "backward called before forward"));
        }
        if d_readout.len() != batch * self.classes {
            return Err(shape_err("readout gradient", format!("{}", batch * self.classes), format!("{}", d_readout.len())));
        }
        // A NaN/Inf here would silently poison every gradient (found by tests/bad_input.rs).
        check_finite("readout gradient", d_readout, "∂L/∂readout holds NaN or Inf: check the loss")?;
        let n = self.layers.len();
        let last_t = self.layers[n - 1].t_out;
        // ∂L/∂s_t = ∂L/∂y / T for every t
        let mut upstream: Vec<F> = Vec::with_capacity(last_t * d_readout.len());
        let inv_t = F::ONE / F::from_f64(last_t as f64);
        for _ in 0..last_t {
            upstream.extend(d_readout.iter().map(|&d| d * inv_t));
        }
        for i in (0..n).rev() {
            if i == 0 && !want_input_grad && !self.layers[0].has_params() {
                break;
            }
            let (before, rest) = self.layers.split_at_mut(i);
            let (layer, after) = rest.split_first_mut().unwrap();
            let src: &[F] = source(before, &self.input);
            let dy: &[F] = if i + 1 == n { &upstream } else { &after[0].grad_in };
            let in_total = layer.t_in * batch * layer.in_len;
            if layer.grad_in.len() != in_total && !matches!(layer.op, Op::Flatten) {
                layer.grad_in = vec![F::ZERO; in_total];
            }
            let need_dx = i > 0 || want_input_grad;
            let (p, g) = (&self.params, &mut self.grads);
            match &mut layer.op {
                Op::Conv { geom, w, b } => {
                    let (gw, gb) = two_mut(g, w.clone(), b.clone());
                    conv::backward_weights(geom, src, dy, gw, gb);
                    if need_dx {
                        conv::backward_data(geom, &p[w.clone()], dy, &mut layer.grad_in, false);
                    }
                }
                Op::Linear { n_in, n_out, w, b } => {
                    let (gw, gb) = two_mut(g, w.clone(), b.clone());
                    linear::backward_weights(*n_in, *n_out, src, dy, gw, gb);
                    if need_dx {
                        linear::backward_data(*n_in, *n_out, &p[w.clone()], dy, &mut layer.grad_in);
                    }
                }
                Op::Pool { c, h, w } => pool::backward(*c, *h, *w, dy, &mut layer.grad_in),
                Op::Flatten => {
                    layer.grad_in.clear();
                    layer.grad_in.extend_from_slice(dy);
                }
                Op::Dropout { p: prob, key, .. } => {
                    let step = batch * layer.in_len;
                    let index0 = (self.sample_offset * layer.in_len) as u64;
                    if let Some(key) = *key {
                        if layer.t_in == layer.t_out {
                            dropout::backward(key, *prob, step, index0, dy, &mut layer.grad_in);
                        } else {
                            let mut full = vec![F::ZERO; dy.len()];
                            dropout::backward(key, *prob, step, index0, dy, &mut full);
                            sum_steps(&full, &mut layer.grad_in);
                        }
                    } else if layer.t_in == layer.t_out {
                        layer.grad_in.copy_from_slice(dy);
                    } else {
                        sum_steps(dy, &mut layer.grad_in);
                    }
                }
                Op::Spike { layer: sl, params } => {
                    let gr = split4(g, params);
                    let bp = BackEiParams {
                        w_b: &p[params[0].clone()],
                        b_b: &p[params[1].clone()],
                        w_e: &p[params[2].clone()],
                        b_e: &p[params[3].clone()],
                    };
                    let [w_b, b_b, w_e, b_e] = gr;
                    let mut bg = BackEiGrads { w_b, b_b, w_e, b_e };
                    sl.backward(&bp, &mut bg, src, layer.t_in, dy, &mut layer.grad_in)?;
                }
            }
        }
        if want_input_grad {
            self.input_grad.clear();
            self.input_grad.extend_from_slice(&self.layers[0].grad_in);
        }
        Ok(())
    }

    pub fn zero_grads(&mut self) {
        self.grads.fill(F::ZERO);
    }

    /// Forward, loss, backward, optimizer step: one training iteration.
    pub fn train_step(&mut self, x: &[F], t_in: usize, labels: &[u8], loss: Loss, opt: &mut Optimizer) -> Result<StepStats> {
        self.check_labels(labels)?;
        self.check_optimizer(opt)?;
        let stats = self.forward_loss(x, t_in, labels, loss)?;
        self.backward_loss(1.0)?;
        self.apply_gradients(opt)?;
        Ok(stats)
    }

    /// The first half of a training step: forward in training mode and the loss, with
    /// ∂L/∂readout kept for `backward_loss`. Data-parallel training splits the step here (and
    /// after the backward) to agree with the other ranks and to reduce the gradients.
    pub fn forward_loss(&mut self, x: &[F], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats> {
        let batch = labels.len();
        self.check_labels(labels)?;
        self.training = true;
        self.forward(x, t_in, batch)?;
        let mut dy = std::mem::take(&mut self.readout_grad);
        dy.resize(batch * self.classes, F::ZERO);
        let l = loss::loss_and_grad(loss, &self.readout, labels, self.classes, &mut dy);
        self.readout_grad = dy;
        if !l.is_finite() {
            let layer = match self.first_nonfinite_layer() {
                Some((i, kind)) => format!("; first non-finite output in layer {i} ({kind})"),
                None => String::new(),
            };
            return Err(crate::BackeiError::NonFinite {
                place: format!("loss at iteration {}{layer}", self.iteration),
                index: 0,
                value: l.to_f64(),
                hint: "training diverged; lower the learning rate (--lr) or check the input data".into(),
            });
        }
        let correct = loss::argmax_rows(&self.readout, self.classes).iter().zip(labels).filter(|(p, l)| **p == **l as usize).count();
        Ok(StepStats { loss: l.to_f64(), correct, batch })
    }

    /// The gradients of the last `forward_loss`'s loss times `scale` into `grads` (replacing
    /// them). A rank of a data-parallel run passes its share of the global batch (b_r / B), so
    /// that the sum over ranks is the gradient of the global batch's mean loss.
    pub fn backward_loss(&mut self, scale: f64) -> Result<()> {
        self.zero_grads();
        let mut dy = std::mem::take(&mut self.readout_grad);
        if scale != 1.0 {
            let s = F::from_f64(scale);
            dy.iter_mut().for_each(|d| *d *= s);
        }
        let r = self.backward(&dy, false);
        self.readout_grad = dy;
        r
    }

    /// The optimizer step from `grads` (refused when a gradient is NaN or Inf); counts the
    /// iteration.
    pub fn apply_gradients(&mut self, opt: &mut Optimizer) -> Result<()> {
        self.check_optimizer(opt)?;
        check_finite("gradients", &self.grads, "a gradient is NaN or Inf: lower the learning rate")?;
        opt.update(&mut self.params, &self.grads);
        self.iteration += 1;
        Ok(())
    }

    fn check_optimizer(&self, opt: &Optimizer) -> Result<()> {
        // An optimizer sized for another network made `Optimizer::update` index out of bounds
        // (a panic; found by tests/bad_input.rs): refuse it here instead.
        if opt.m.len() != self.params.len() {
            return Err(shape_err(
                "optimizer state",
                format!("an optimizer for this network's {} parameters", self.params.len()),
                format!("one for {} parameters (Optimizer::new(cfg, net.num_params()))", opt.m.len()),
            ));
        }
        Ok(())
    }

    /// Loss (and readout) without updating anything.
    pub fn evaluate(&mut self, x: &[F], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats> {
        let batch = labels.len();
        self.check_labels(labels)?;
        self.training = false;
        self.forward(x, t_in, batch)?;
        let mut dy = vec![F::ZERO; batch * self.classes];
        let l = loss::loss_and_grad(loss, &self.readout, labels, self.classes, &mut dy);
        let correct = loss::argmax_rows(&self.readout, self.classes).iter().zip(labels).filter(|(p, l)| **p == **l as usize).count();
        Ok(StepStats { loss: l.to_f64(), correct, batch })
    }

    /// Predicted classes (inference mode: dropout off).
    pub fn predict(&mut self, x: &[F], t_in: usize, batch: usize) -> Result<Vec<usize>> {
        self.training = false;
        let classes = self.classes;
        let y = self.forward(x, t_in, batch)?;
        Ok(loss::argmax_rows(y, classes))
    }

    /// The predicted classes of the last forward's readout.
    pub fn last_predictions(&self) -> Vec<usize> {
        loss::argmax_rows(&self.readout, self.classes)
    }

    /// The readout [B][classes] of the last forward.
    pub fn readout(&self) -> &[F] {
        &self.readout
    }

    /// Replaces every parameter (same layout as `params`), validating length and finiteness.
    pub fn load_params(&mut self, params: &[F]) -> Result<()> {
        if params.len() != self.params.len() {
            return Err(shape_err(
                "parameters",
                format!("{} values for network {}", self.params.len(), self.spec.name),
                format!("{}", params.len()),
            ));
        }
        check_finite("loaded parameters", params, "the parameters hold NaN or Inf")?;
        self.params.copy_from_slice(params);
        Ok(())
    }

    /// The first layer (index and kind) whose last output holds NaN or Inf, for error messages.
    pub fn first_nonfinite_layer(&self) -> Option<(usize, String)> {
        (0..self.layers.len()).find_map(|i| {
            let out = self.layer_output(i)?;
            out.iter().any(|x| !x.is_finite()).then(|| (i, format!("{:?}", self.spec.layers[i])))
        })
    }

    fn check_labels(&self, labels: &[u8]) -> Result<()> {
        if labels.is_empty() {
            return Err(config_err("labels", "an empty batch"));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= self.classes) {
            return Err(config_err("labels", format!("label {l} of sample {i} is not below the {} classes", self.classes)));
        }
        Ok(())
    }

    /// Firing rate and inhibitory fraction of each spiking layer in the last forward:
    /// (layer index, firing rate, inhibitory fraction or None without E/I).
    pub fn spike_stats(&self) -> Vec<(usize, f64, Option<f64>)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.op {
                Op::Spike { layer, .. } => Some((i, layer.firing_rate(), layer.feedback.ei.then(|| layer.inhibitory_fraction()))),
                _ => None,
            })
            .collect()
    }

    /// The output [T][B][...] of layer `i` in the last forward.
    pub fn layer_output(&self, i: usize) -> Option<&[F]> {
        (i < self.layers.len()).then(|| source(&self.layers[..=i], &self.input))
    }
}

impl<F: Real> Layer<F> {
    fn has_params(&self) -> bool {
        matches!(self.op, Op::Conv { .. } | Op::Linear { .. })
            || matches!(&self.op, Op::Spike { params, .. } if !params[0].is_empty() || !params[2].is_empty())
    }
}

/// The input of the layer after `before`: the output of the last layer that holds one.
fn source<'a, F: Real>(before: &'a [Layer<F>], input: &'a [F]) -> &'a [F] {
    for l in before.iter().rev() {
        match &l.op {
            Op::Flatten => continue,
            Op::Spike { layer, .. } => return &layer.out,
            _ => return &l.out,
        }
    }
    input
}

fn sum_steps<F: Real>(full: &[F], out: &mut [F]) {
    out.fill(F::ZERO);
    for step in full.chunks(out.len()) {
        out.iter_mut().zip(step).for_each(|(a, b)| *a += *b);
    }
}

fn two_mut<F>(g: &mut [F], a: Range<usize>, b: Range<usize>) -> (&mut [F], &mut [F]) {
    debug_assert!(a.end <= b.start);
    let (x, y) = g.split_at_mut(b.start);
    (&mut x[a], &mut y[..b.end - b.start])
}

/// Four disjoint, ascending (possibly empty) ranges of `g` as four mutable slices.
fn split4<'a, F>(g: &'a mut [F], r: &[Range<usize>; 4]) -> [&'a mut [F]; 4] {
    let mut rest: &'a mut [F] = g;
    let mut offset = 0;
    let mut out: [&'a mut [F]; 4] = Default::default();
    for (k, range) in r.iter().enumerate() {
        if range.is_empty() {
            continue;
        }
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail.split_at_mut(range.start - offset);
        let (mine, tail) = tail.split_at_mut(range.len());
        out[k] = mine;
        rest = tail;
        offset = range.end;
    }
    out
}
