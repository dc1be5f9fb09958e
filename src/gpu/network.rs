//! A whole network on the GPU engine: the twin of `cpu::network::Network<f32>`, built from the
//! same `NetworkSpec` with the same parameter layout (the same `ParamSlot`s in one flat device
//! buffer, one flat gradient buffer: the fused optimizer's view), forward over T, readout, loss,
//! BPTT backward and the optimizer step.
//!
//! Shapes follow the CPU engine: every tensor is time-major [T][B][C][H][W]; under direct
//! encoding (T_in = 1) the layers before the first spiking layer (the first convolution) run once
//! and the spiking layer broadcasts its input current. Conv and linear layers run over all their
//! T×B samples in one go (im2col + cuBLAS, chunked when the column buffer would exceed the
//! workspace); the spiking layers are `GpuBackEiLayer`s (fused time loops).
//!
//! Buffers are allocated for a batch shape (B, T_in) once and reused; a new shape reallocates.
//! `memory_plan` is the pure host function that says what a training step needs on the device.

use super::backei_layer::{BackEiSlots, GpuBackEiLayer};
use super::conv::{self, ConvPlan, ConvWorkspace, DEFAULT_WORKSPACE_BYTES};
use super::device::GpuDevice;
use super::loss::{self as gloss, LossBuffers};
use super::optim::{count_nonfinite, GpuOptimizer};
use super::profile::OpTimer;
use super::util::{cuda_err, is_oom};
use super::{dropout, linear, pool};
use crate::cpu::conv::ConvGeom;
use crate::cpu::loss::Loss;
use crate::cpu::network::{Network, ParamSlot, StepStats};
use crate::error::{check_finite, config_err, shape_err, BackeiError, Result};
use crate::spec::{FeedbackConfig, LayerPlan, LayerSpec, NetworkSpec};
use cudarc::driver::{CudaEvent, CudaSlice, CudaView};
use std::ops::Range;
use std::sync::Arc;

enum Op {
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
    /// `key`: the RNG key of the last training forward (None: evaluation, no dropout).
    Dropout {
        p: f32,
        index: u32,
        key: Option<u64>,
    },
    Flatten,
    Spike {
        layer: Box<GpuBackEiLayer>,
        params: BackEiSlots,
    },
}

struct Layer {
    op: Op,
    in_len: usize,
    out_len: usize,
    t_in: usize,
    t_out: usize,
    /// Output [T_out][B][out_len] (None for Flatten and Spike, whose output lives elsewhere).
    out: Option<CudaSlice<f32>>,
    /// ∂L/∂input [T_in][B][in_len] (None where no gradient has to flow further up).
    grad_in: Option<CudaSlice<f32>>,
}

impl Layer {
    fn has_params(&self) -> bool {
        match &self.op {
            Op::Conv { .. } | Op::Linear { .. } => true,
            Op::Spike { params, .. } => params.iter().any(|r| !r.is_empty()),
            _ => false,
        }
    }
}

/// (T_in, T_out) of every layer for an input of `t_in` frames: spiking and dropout layers run all
/// T steps, every other layer keeps the steps of its input (T_in = 1 stays 1: computed once).
pub fn layer_steps(plan: &[LayerPlan], steps: usize, t_in: usize) -> Vec<(usize, usize)> {
    let mut prev = t_in;
    plan.iter()
        .map(|lp| {
            let out = match lp.spec {
                LayerSpec::BackEi | LayerSpec::Spiking | LayerSpec::Dropout { .. } => steps,
                _ => prev,
            };
            let r = (prev, out);
            prev = out;
            r
        })
        .collect()
}

fn spike_feedback(spec: &NetworkSpec, l: &LayerSpec) -> FeedbackConfig {
    if *l == LayerSpec::BackEi {
        spec.feedback
    } else {
        FeedbackConfig { back: false, ei: false, radius: 0, delay: 1 }
    }
}

/// The device memory of one training step, by kind, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    pub batch: usize,
    pub steps: usize,
    pub t_in: usize,
    /// The flat parameter buffer.
    pub params: usize,
    /// The flat gradient buffer.
    pub grads: usize,
    /// Adam's m and v (the larger of the two optimizers).
    pub optimizer: usize,
    /// The input batch and the outputs of the conv, linear, pool and dropout layers.
    pub activations: usize,
    /// The spiking layers' outputs and the state their backward needs (v, g, z), plus their BPTT
    /// scratch (an estimate of `GpuBackEiLayer`'s use: s, v, g if back, z if ei, ∂L/∂s over all
    /// T, and four one-step buffers).
    pub spiking: usize,
    /// ∂L/∂input of every layer that passes a gradient on.
    pub gradients: usize,
    /// The conv workspace (column buffer + transposed output), readout and loss buffers.
    pub workspaces: usize,
}

impl MemoryPlan {
    pub fn total(&self) -> usize {
        self.params + self.grads + self.optimizer + self.activations + self.spiking + self.gradients + self.workspaces
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |b: usize| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "B = {}, T = {}, T_in = {}: {:.2} GiB (params {:.2}, grads {:.2}, optimizer {:.2}, activations {:.2}, spiking layers {:.2}, input gradients {:.2}, workspaces {:.2})",
            self.batch,
            self.steps,
            self.t_in,
            g(self.total()),
            g(self.params),
            g(self.grads),
            g(self.optimizer),
            g(self.activations),
            g(self.spiking),
            g(self.gradients),
            g(self.workspaces)
        )
    }
}

/// The device memory a training step of `spec` needs at batch `batch` and T = `steps`, in the
/// worst case of the two encodings (T_in = T, e.g. rate coding). Pure host logic.
pub fn memory_plan(spec: &NetworkSpec, batch: usize, steps: usize) -> Result<MemoryPlan> {
    memory_plan_for(spec, batch, steps, steps)
}

/// `memory_plan` for an input of `t_in` frames (1: direct encoding, or T).
pub fn memory_plan_for(spec: &NetworkSpec, batch: usize, steps: usize, t_in: usize) -> Result<MemoryPlan> {
    let mut spec = spec.clone();
    spec.steps = steps;
    let plan = spec.plan()?;
    if batch == 0 {
        return Err(config_err("batch", "batch size 0"));
    }
    if t_in != 1 && t_in != steps {
        return Err(config_err("t_in", format!("T_in = {t_in}: must be 1 or T = {steps}")));
    }
    check_plan_fits_usize(&plan, batch, steps)?;
    let f = 4usize;
    let classes = spec.classes()?;
    let ts = layer_steps(&plan, steps, t_in);
    let mut mp = MemoryPlan { batch, steps, t_in, ..Default::default() };
    let mut nparams = 0usize;
    let mut has_params = Vec::with_capacity(plan.len());
    let mut ws = 0usize;
    mp.activations += f * t_in * batch * spec.input.iter().product::<usize>();
    for (lp, &(ti, to)) in plan.iter().zip(&ts) {
        let [c, h, w] = lp.input;
        let in_len = c * h * w;
        let out_len: usize = lp.output.iter().product();
        let p = match lp.spec {
            LayerSpec::Conv { out_channels, kernel, padding } => {
                let g = ConvGeom::new(c, out_channels, h, w, kernel, padding);
                ws = ws.max(ConvPlan::new(&g, ti * batch, DEFAULT_WORKSPACE_BYTES).workspace_bytes());
                g.weight_len() + out_channels
            }
            LayerSpec::Linear { out_features } => c * out_features + out_features,
            LayerSpec::BackEi | LayerSpec::Spiking => {
                let fb = spike_feedback(&spec, &lp.spec);
                let k = 2 * fb.radius + 1;
                let per_gate = c * c * k * k + c;
                let all = to * batch * in_len;
                mp.spiking += f * ((3 + fb.back as usize + fb.ei as usize) * all + 4 * batch * in_len);
                per_gate * (fb.back as usize + fb.ei as usize)
            }
            _ => 0,
        };
        nparams += p;
        has_params.push(p > 0 || matches!(lp.spec, LayerSpec::Conv { .. } | LayerSpec::Linear { .. }));
        if !matches!(lp.spec, LayerSpec::Flatten | LayerSpec::BackEi | LayerSpec::Spiking) {
            mp.activations += f * to * batch * out_len;
        }
    }
    for (i, (lp, &(ti, _))) in plan.iter().zip(&ts).enumerate() {
        let needs = has_params[..i].iter().any(|&x| x) || matches!(lp.spec, LayerSpec::BackEi | LayerSpec::Spiking);
        if needs && lp.spec != LayerSpec::Flatten {
            mp.gradients += f * ti * batch * lp.input.iter().product::<usize>();
        }
    }
    mp.params = f * nparams;
    mp.grads = f * nparams;
    mp.optimizer = 2 * f * nparams;
    let last_t = ts.last().map_or(t_in, |x| x.1);
    mp.workspaces = ws + f * (2 * batch * classes + last_t * batch * classes) + 16 * batch;
    Ok(mp)
}

/// Refuses a batch and T whose memory plan would overflow `usize` (`backei info` printed 0.25 GiB
/// for usize::MAX). Every term of the plan is at most 64·T·B·W per layer, W the largest number of
/// values one sample has in a layer (a conv's column buffer included), plus the parameters and the
/// fixed workspace, so checking that bound in u128 first keeps all the usize arithmetic exact.
fn check_plan_fits_usize(plan: &[LayerPlan], batch: usize, steps: usize) -> Result<()> {
    let mut widest: u128 = 1;
    let mut params: u128 = 0;
    for lp in plan {
        let [c, h, w] = lp.input;
        let (i, o) = ((c * h * w) as u128, lp.output.iter().map(|&d| d as u128).product::<u128>());
        let mut wide = i.max(o);
        if let LayerSpec::Conv { out_channels, kernel, padding } = lp.spec {
            let g = ConvGeom::new(c, out_channels, h, w, kernel, padding);
            wide = wide.max(((g.col_rows() + g.cout) * g.out_pixels()) as u128);
            params += g.weight_len() as u128 + out_channels as u128;
        }
        // a BackEI gate or linear layer: at most in × out (or C²k²) weights
        params += i.saturating_mul(o.max(9 * c as u128));
        widest = widest.max(wide);
    }
    let bound = (batch as u128)
        .checked_mul(steps as u128)
        .and_then(|x| x.checked_mul(widest))
        .and_then(|x| x.checked_mul(64 * (plan.len() as u128 + 2)))
        .and_then(|x| x.checked_add(16 * params + DEFAULT_WORKSPACE_BYTES as u128));
    match bound {
        Some(b) if b <= usize::MAX as u128 => Ok(()),
        _ => Err(config_err(
            "--batch-size/--steps",
            format!("batch {batch} at T = {steps}: the memory a training step needs does not fit in 64 bits"),
        )),
    }
}

/// The largest batch ≤ `batch` whose training step fits `bytes` (None: not even one sample).
pub fn batch_that_fits(spec: &NetworkSpec, batch: usize, steps: usize, t_in: usize, bytes: usize) -> Option<usize> {
    let fits = |b: usize| memory_plan_for(spec, b, steps, t_in).map(|p| p.total() <= bytes).unwrap_or(false);
    if !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1usize, batch.max(1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

/// The network on the GPU engine (f32).
pub struct GpuNetwork {
    pub dev: Arc<GpuDevice>,
    pub spec: NetworkSpec,
    pub slots: Vec<ParamSlot>,
    pub params: CudaSlice<f32>,
    pub grads: CudaSlice<f32>,
    layers: Vec<Layer>,
    classes: usize,
    input: Option<CudaSlice<f32>>,
    readout: Option<CudaSlice<f32>>,
    upstream: Option<CudaSlice<f32>>,
    loss: Option<LossBuffers>,
    conv_ws: ConvWorkspace,
    counter: CudaSlice<u32>,
    /// (B, T_in) the buffers are sized for.
    shape: (usize, usize),
    /// Seed of the dropout masks; with `iteration` it keys every mask (as the CPU engine).
    pub dropout_seed: u64,
    /// Training iterations done.
    pub iteration: u64,
    pub training: bool,
    /// Per-op timing of the steps (`set_profiling`), read with `take_profile`.
    timer: Option<OpTimer>,
    /// Recorded after each input upload (see `forward`).
    uploaded: CudaEvent,
}

/// A layer's label in a profile: its index and kind (`backei v1`, `spiking`, `conv`, …).
fn op_label(i: usize, op: &Op) -> String {
    let kind = match op {
        Op::Conv { .. } => "conv".to_string(),
        Op::Linear { .. } => "linear".to_string(),
        Op::Pool { .. } => "pool".to_string(),
        Op::Dropout { .. } => "dropout".to_string(),
        Op::Flatten => "flatten".to_string(),
        Op::Spike { layer, .. } => {
            if layer.feedback.back || layer.feedback.ei {
                format!("backei {:?}", layer.version).to_lowercase()
            } else {
                "spiking".to_string()
            }
        }
    };
    format!("layer {i} {kind}")
}

fn missing(what: &str) -> BackeiError {
    BackeiError::Cuda(format!("internal: {what} used before it was allocated (call forward first)"))
}

/// The input of the layer after `before`: the output of the last layer that holds one.
fn source<'a>(before: &'a [Layer], input: &'a CudaSlice<f32>, batch: usize) -> Result<CudaView<'a, f32>> {
    for l in before.iter().rev() {
        let len = l.t_out * batch * l.out_len;
        let buf = match &l.op {
            Op::Flatten => continue,
            Op::Spike { layer, .. } => layer.output()?,
            _ => l.out.as_ref().ok_or_else(|| missing("a layer output"))?,
        };
        return buf.try_slice(0..len).ok_or_else(|| shape_err("layer output", format!("≥ {len} values"), format!("{}", buf.len())));
    }
    Ok(input.as_view())
}

/// ∂L/∂(output of the layer before `after`): the grad_in of the next layer that holds one.
fn grad_of_output<'a>(after: &'a [Layer], upstream: &'a CudaSlice<f32>) -> Result<CudaView<'a, f32>> {
    for l in after {
        if matches!(l.op, Op::Flatten) {
            continue;
        }
        return Ok(l.grad_in.as_ref().ok_or_else(|| missing("a layer's input gradient"))?.as_view());
    }
    Ok(upstream.as_view())
}

impl GpuNetwork {
    /// The network of `spec` with PyTorch's default initialisation from `seed`: the very weights
    /// `cpu::Network::<f32>::new(spec, seed)` draws.
    pub fn new(dev: &Arc<GpuDevice>, spec: &NetworkSpec, seed: u64) -> Result<Self> {
        let cpu = Network::<f32>::new(spec, seed)?;
        Self::from_cpu(dev, &cpu)
    }

    /// The GPU twin of a CPU network: same spec, slots, weights, dropout seed and iteration.
    pub fn from_cpu(dev: &Arc<GpuDevice>, cpu: &Network<f32>) -> Result<Self> {
        let spec = cpu.spec.clone();
        let plan = spec.plan()?;
        let slots = cpu.slots.clone();
        let find = |name: String| slots.iter().find(|s| s.name == name).map(|s| s.range.clone());
        let need =
            |name: String| find(name.clone()).ok_or_else(|| config_err("parameters", format!("the CPU network has no slot `{name}`")));
        let ts = layer_steps(&plan, spec.steps, 1);
        let mut layers = Vec::with_capacity(plan.len());
        for (i, (lp, &(t_in, t_out))) in plan.iter().zip(&ts).enumerate() {
            let [c, h, w] = lp.input;
            let op = match lp.spec {
                LayerSpec::Conv { out_channels, kernel, padding } => {
                    let (w, b) = (need(format!("layers.{i}.weight"))?, need(format!("layers.{i}.bias"))?);
                    Op::Conv { geom: ConvGeom::new(c, out_channels, h, w_of(lp), kernel, padding), w, b }
                }
                LayerSpec::Linear { out_features } => Op::Linear {
                    n_in: c,
                    n_out: out_features,
                    w: need(format!("layers.{i}.weight"))?,
                    b: need(format!("layers.{i}.bias"))?,
                },
                LayerSpec::AvgPool => Op::Pool { c, h, w },
                LayerSpec::Dropout { p } => Op::Dropout { p: p as f32, index: i as u32, key: None },
                LayerSpec::Flatten => Op::Flatten,
                LayerSpec::BackEi | LayerSpec::Spiking => {
                    let fb = spike_feedback(&spec, &lp.spec);
                    let get = |s: &str| find(format!("layers.{i}.{s}")).unwrap_or(0..0);
                    let params: BackEiSlots = [get("back.weight"), get("back.bias"), get("ei.weight"), get("ei.bias")];
                    Op::Spike { layer: Box::new(GpuBackEiLayer::new(dev, lp.input, fb, &spec.neuron)?), params }
                }
            };
            if let Op::Conv { w, b, .. } | Op::Linear { w, b, .. } = &op {
                if w.end != b.start {
                    return Err(config_err("parameters", format!("layer {i}: the bias must follow the weight in the flat buffer")));
                }
            }
            layers.push(Layer {
                op,
                in_len: lp.input.iter().product(),
                out_len: lp.output.iter().product(),
                t_in,
                t_out,
                out: None,
                grad_in: None,
            });
        }
        let params = dev.stream.clone_htod(&cpu.params).map_err(cuda_err("uploading the parameters"))?;
        let grads = dev.stream.alloc_zeros::<f32>(cpu.params.len().max(1)).map_err(cuda_err("allocating the gradients"))?;
        let counter = dev.stream.alloc_zeros::<u32>(1).map_err(cuda_err("allocating a counter"))?;
        Ok(GpuNetwork {
            dev: dev.clone(),
            classes: spec.classes()?,
            spec,
            slots,
            params,
            grads,
            layers,
            input: None,
            readout: None,
            upstream: None,
            loss: None,
            conv_ws: ConvWorkspace::new(DEFAULT_WORKSPACE_BYTES),
            timer: None,
            uploaded: dev.ctx.new_event(None).map_err(cuda_err("creating the upload event"))?,
            counter,
            shape: (0, 0),
            dropout_seed: cpu.dropout_seed,
            iteration: cpu.iteration,
            training: true,
        })
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn num_params(&self) -> usize {
        self.slots.last().map_or(0, |s| s.range.end)
    }

    /// The parameters, copied to the host (the CPU engine's layout).
    pub fn params_to_host(&self) -> Result<Vec<f32>> {
        let mut v = self.dev.stream.clone_dtoh(&self.params).map_err(cuda_err("reading the parameters"))?;
        v.truncate(self.num_params());
        Ok(v)
    }

    /// The gradients of the last backward, copied to the host.
    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        let mut v = self.dev.stream.clone_dtoh(&self.grads).map_err(cuda_err("reading the gradients"))?;
        v.truncate(self.num_params());
        Ok(v)
    }

    /// Replaces every parameter (a checkpoint, or the CPU engine's weights).
    pub fn load_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.num_params() {
            return Err(shape_err("parameters", format!("{} values", self.num_params()), format!("{}", params.len())));
        }
        check_finite("parameters", params, "a parameter to load is NaN or Inf")?;
        if !params.is_empty() {
            self.dev.stream.memcpy_htod(params, &mut self.params).map_err(cuda_err("uploading the parameters"))?;
        }
        Ok(())
    }

    /// Sizes every buffer for (batch, t_in); a no-op when the shape is unchanged.
    fn ensure_buffers(&mut self, batch: usize, t_in: usize) -> Result<()> {
        if self.shape == (batch, t_in) {
            return Ok(());
        }
        let stream = self.dev.stream.clone();
        // free the old shape's buffers first, so that the new ones can use their memory
        self.input = None;
        self.readout = None;
        self.upstream = None;
        self.loss = None;
        self.shape = (0, 0);
        let plan = self.spec.plan()?;
        let ts = layer_steps(&plan, self.spec.steps, t_in);
        let mut param_before = false;
        let alloc = |len: usize, what: &str| {
            stream.alloc_zeros::<f32>(len.max(1)).map_err(cuda_err(format!("allocating {what} for batch {batch}")))
        };
        for (l, &(ti, to)) in self.layers.iter_mut().zip(&ts) {
            l.out = None;
            l.grad_in = None;
            l.t_in = ti;
            l.t_out = to;
        }
        for (l, &(ti, to)) in self.layers.iter_mut().zip(&ts) {
            if !matches!(l.op, Op::Flatten | Op::Spike { .. }) {
                l.out = Some(alloc(to * batch * l.out_len, "a layer output")?);
            }
            let is_spike = matches!(l.op, Op::Spike { .. });
            if !matches!(l.op, Op::Flatten) && (param_before || is_spike) {
                l.grad_in = Some(alloc(ti * batch * l.in_len, "a layer's input gradient")?);
            }
            param_before |= l.has_params();
        }
        let frame: usize = self.spec.input.iter().product();
        let last_t = ts.last().map_or(t_in, |x| x.1);
        self.input = Some(alloc(t_in * batch * frame, "the input batch")?);
        self.readout = Some(alloc(batch * self.classes, "the readout")?);
        self.upstream = Some(alloc(last_t * batch * self.classes, "the readout gradient")?);
        self.loss = Some(LossBuffers::new(&self.dev, batch, self.classes)?);
        self.shape = (batch, t_in);
        Ok(())
    }

    /// Adds what to do about an out-of-memory error: the plan and a batch size that fits.
    fn explain_oom(&self, e: BackeiError, batch: usize, t_in: usize) -> BackeiError {
        if !is_oom(&e) {
            return e;
        }
        let steps = self.spec.steps;
        let total = self.dev.ctx.total_mem().unwrap_or(0);
        let need = memory_plan_for(&self.spec, batch, steps, t_in).map(|p| p.to_string()).unwrap_or_default();
        let fit = batch_that_fits(&self.spec, batch, steps, t_in, total / 10 * 9);
        let advice = match fit {
            Some(b) if b < batch => {
                format!("use --batch {b} (the largest that fits 90 % of the {:.1} GiB)", total as f64 / (1u64 << 30) as f64)
            }
            Some(_) => "other processes hold GPU memory: free it or lower the batch size".to_string(),
            None => format!("not even batch 1 fits at T = {steps}: lower T or use --device cpu"),
        };
        BackeiError::Cuda(format!("out of GPU memory at batch size {batch}, T = {steps}: the step needs {need}; {advice} ({e})"))
    }

    fn check_input_shape(&self, len: usize, t_in: usize, batch: usize) -> Result<()> {
        let frame: usize = self.spec.input.iter().product();
        let t = self.spec.steps;
        if batch == 0 {
            return Err(config_err("batch", "batch size 0"));
        }
        if t_in != 1 && t_in != t {
            return Err(shape_err("network input", format!("T_in = 1 or T = {t} frames"), format!("T_in = {t_in}")));
        }
        if len != t_in * batch * frame {
            return Err(shape_err(
                "network input",
                format!("{t_in}×{batch}×{:?} = {} values", self.spec.input, t_in * batch * frame),
                format!("{len} values"),
            ));
        }
        Ok(())
    }

    /// Runs the network over all T steps on a host batch x [T_in][B][C][H][W]; the readout
    /// [B][classes] stays on the device (`readout_to_host` copies it).
    pub fn forward(&mut self, x: &[f32], t_in: usize, batch: usize) -> Result<()> {
        self.check_input_shape(x.len(), t_in, batch)?;
        check_finite("network input", x, "the input batch holds NaN or Inf: check the data and its normalisation")?;
        self.ensure_buffers(batch, t_in).map_err(|e| self.explain_oom(e, batch, t_in))?;
        let input = self.input.as_mut().ok_or_else(|| missing("the input buffer"))?;
        self.dev.stream.memcpy_htod(x, input).map_err(cuda_err("uploading the input batch"))?;
        // `x` may be page-locked (the loader's buffers on this engine, `gpu::pinned`); then the
        // copy above is truly asynchronous and returns before the DMA has read `x`. The caller
        // may drop the batch as soon as this returns, and a loader thread then refills the same
        // buffer, so wait for an event recorded right after the upload before returning, on
        // success and on error alike. The forward's own read-backs have usually waited for the
        // upload by then, so this costs nothing; it makes the guarantee independent of them.
        // (one event, created with the network and recorded again for every batch)
        if let Err(e) = self.uploaded.record(&self.dev.stream) {
            let _ = self.dev.stream.synchronize();
            return Err(cuda_err("recording the input upload")(e));
        }
        let r = self.run_forward(batch).map_err(|e| self.explain_oom(e, batch, t_in));
        let waited = self.uploaded.synchronize().map_err(cuda_err("waiting for the input upload"));
        r.and(waited)
    }

    /// `forward` on a batch already on this device.
    pub fn forward_device(&mut self, x: &CudaView<f32>, t_in: usize, batch: usize) -> Result<()> {
        self.check_input_shape(x.len(), t_in, batch)?;
        self.ensure_buffers(batch, t_in).map_err(|e| self.explain_oom(e, batch, t_in))?;
        let input = self.input.as_mut().ok_or_else(|| missing("the input buffer"))?;
        self.dev.stream.memcpy_dtod(x, input).map_err(cuda_err("copying the input batch"))?;
        self.run_forward(batch).map_err(|e| self.explain_oom(e, batch, t_in))
    }

    fn run_forward(&mut self, batch: usize) -> Result<()> {
        if count_nonfinite(&self.dev, &self.params, &mut self.counter)? > 0 {
            return Err(BackeiError::NonFinite {
                place: "parameters (GPU)".into(),
                index: 0,
                value: f64::NAN,
                hint: "a parameter is NaN or Inf: the run diverged; lower the learning rate".into(),
            });
        }
        let dev = self.dev.clone();
        let steps = self.spec.steps;
        let (seed, iteration, training) = (self.dropout_seed, self.iteration, self.training);
        if let Some(t) = self.timer.as_mut() {
            t.mark("input upload, parameter check, host gaps")?;
        }
        let input = self.input.as_ref().ok_or_else(|| missing("the input buffer"))?;
        let p = &self.params;
        for i in 0..self.layers.len() {
            let (before, rest) = self.layers.split_at_mut(i);
            let layer = &mut rest[0];
            let src = source(before, input, batch)?;
            let (t_in, t_out) = (layer.t_in, layer.t_out);
            let rows = t_in * batch;
            match &mut layer.op {
                Op::Flatten => {}
                Op::Spike { layer: sl, params } => sl.forward(p, params, &src, t_in, batch, steps)?,
                op => {
                    let out = layer.out.as_mut().ok_or_else(|| missing("a layer output"))?;
                    let mut y = out.as_view_mut();
                    match op {
                        Op::Conv { geom, w, b } => {
                            conv::forward(&dev, &mut self.conv_ws, geom, rows, &p.slice(w.clone()), &p.slice(b.clone()), &src, &mut y)?
                        }
                        Op::Linear { n_in, n_out, w, b } => {
                            linear::forward(&dev, *n_in, *n_out, rows, &p.slice(w.clone()), &p.slice(b.clone()), &src, &mut y)?
                        }
                        Op::Pool { c, h, w } => pool::forward(&dev, rows * *c, *h, *w, &src, &mut y)?,
                        Op::Dropout { p: prob, index, key } => {
                            *key = training.then(|| crate::rng::dropout_key(seed, iteration, *index));
                            dropout::forward(&dev, *key, *prob, batch * layer.in_len, t_out, t_in, &src, &mut y)?
                        }
                        Op::Flatten | Op::Spike { .. } => {}
                    }
                }
            }
            if let (Some(t), false) = (self.timer.as_mut(), matches!(layer.op, Op::Flatten)) {
                t.mark(format!("forward {}", op_label(i, &layer.op)))?;
            }
        }
        let last_t = self.layers.last().map_or(1, |l| l.t_out);
        let out = source(&self.layers, input, batch)?;
        let y = self.readout.as_mut().ok_or_else(|| missing("the readout"))?;
        gloss::readout(&dev, last_t, batch * self.classes, &out, &mut y.as_view_mut())
    }

    /// The readout [B][classes] of the last forward.
    pub fn readout_to_host(&self) -> Result<Vec<f32>> {
        let y = self.readout.as_ref().ok_or_else(|| missing("the readout"))?;
        self.dev.stream.clone_dtoh(y).map_err(cuda_err("reading the readout"))
    }

    /// BPTT from a host ∂L/∂readout [B][classes]; ACCUMULATES into `grads` (call `zero_grads`).
    pub fn backward(&mut self, d_readout: &[f32]) -> Result<()> {
        let (batch, t_in) = self.shape;
        if batch == 0 {
            return Err(config_err("backward", "backward called before forward"));
        }
        if d_readout.len() != batch * self.classes {
            return Err(shape_err("readout gradient", format!("{}", batch * self.classes), format!("{}", d_readout.len())));
        }
        let lb = self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?;
        self.dev.stream.memcpy_htod(d_readout, &mut lb.dy).map_err(cuda_err("uploading the readout gradient"))?;
        self.run_backward().map_err(|e| self.explain_oom(e, batch, t_in))
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        self.dev.stream.memset_zeros(&mut self.grads).map_err(cuda_err("clearing the gradients"))
    }

    /// BPTT from the ∂L/∂readout in the loss buffers.
    fn run_backward(&mut self) -> Result<()> {
        let dev = self.dev.clone();
        let batch = self.shape.0;
        let n = self.layers.len();
        let last_t = self.layers.last().map_or(1, |l| l.t_out);
        let bk = batch * self.classes;
        let lb = self.loss.as_ref().ok_or_else(|| missing("the loss buffers"))?;
        let upstream = self.upstream.as_mut().ok_or_else(|| missing("the readout gradient"))?;
        gloss::readout_backward(&dev, last_t, bk, &lb.dy.as_view(), &mut upstream.as_view_mut())?;
        let upstream = &*upstream;
        let Some(first) = self.layers.iter().position(|l| l.has_params()) else {
            return Ok(());
        };
        let input = self.input.as_ref().ok_or_else(|| missing("the input buffer"))?;
        let (p, g) = (&self.params, &mut self.grads);
        for i in (first..n).rev() {
            let (before, rest) = self.layers.split_at_mut(i);
            let (layer, after) = rest.split_first_mut().ok_or_else(|| missing("a layer"))?;
            if matches!(layer.op, Op::Flatten) {
                continue;
            }
            let src = source(before, input, batch)?;
            let dy = grad_of_output(after, upstream)?;
            let (t_in, t_out) = (layer.t_in, layer.t_out);
            let rows = t_in * batch;
            let mut dx = layer.grad_in.as_mut().map(|b| b.as_view_mut());
            let need_dx = || missing("a layer's input gradient");
            match &mut layer.op {
                Op::Conv { geom, w, b } => {
                    let mut gv = g.slice_mut(w.start..b.end);
                    let (mut gw, mut gb) = gv.split_at_mut(w.len());
                    conv::backward(&dev, &mut self.conv_ws, geom, rows, &p.slice(w.clone()), &src, &dy, &mut gw, &mut gb, dx.as_mut())?;
                }
                Op::Linear { n_in, n_out, w, b } => {
                    let mut gv = g.slice_mut(w.start..b.end);
                    let (mut gw, mut gb) = gv.split_at_mut(w.len());
                    linear::backward(&dev, *n_in, *n_out, rows, &p.slice(w.clone()), &src, &dy, &mut gw, &mut gb, dx.as_mut())?;
                }
                Op::Pool { c, h, w } => pool::backward(&dev, rows * *c, *h, *w, &dy, dx.as_mut().ok_or_else(need_dx)?)?,
                Op::Dropout { p: prob, key, .. } => {
                    dropout::backward(&dev, *key, *prob, batch * layer.in_len, t_out, t_in, &dy, dx.as_mut().ok_or_else(need_dx)?)?
                }
                Op::Spike { layer: sl, params } => sl.backward(p, g, params, &src, t_in, &dy, dx.as_mut().ok_or_else(need_dx)?)?,
                Op::Flatten => {}
            }
            if let Some(t) = self.timer.as_mut() {
                t.mark(format!("backward {}", op_label(i, &layer.op)))?;
            }
        }
        Ok(())
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

    fn loss_of_readout(&mut self, loss: Loss, labels: &[u8]) -> Result<(f64, usize)> {
        let y = self.readout.as_ref().ok_or_else(|| missing("the readout"))?;
        let lb = self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?;
        let (l, pred) = lb.compute(&self.dev, loss, &y.as_view(), labels)?;
        let correct = pred.iter().zip(labels).filter(|(p, l)| **p == **l as usize).count();
        Ok((l, correct))
    }

    /// Forward, loss, backward, optimizer step: one training iteration (as the CPU engine's).
    pub fn train_step(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss, opt: &mut GpuOptimizer) -> Result<StepStats> {
        let batch = labels.len();
        self.check_labels(labels)?;
        self.training = true;
        self.forward(x, t_in, batch)?;
        let (l, correct) = self.loss_of_readout(loss, labels)?;
        if !l.is_finite() {
            return Err(BackeiError::NonFinite {
                place: format!("loss at iteration {}", self.iteration),
                index: 0,
                value: l,
                hint: "training diverged; lower the learning rate".into(),
            });
        }
        if let Some(t) = self.timer.as_mut() {
            t.mark("readout and loss")?;
        }
        self.zero_grads()?;
        self.run_backward().map_err(|e| self.explain_oom(e, batch, t_in))?;
        let bad = count_nonfinite(&self.dev, &self.grads, &mut self.counter)?;
        if let Some(t) = self.timer.as_mut() {
            t.mark("gradient check")?;
        }
        if bad > 0 {
            return Err(BackeiError::NonFinite {
                place: "gradients (GPU)".into(),
                index: 0,
                value: f64::NAN,
                hint: format!("{bad} gradients are NaN or Inf: lower the learning rate"),
            });
        }
        opt.update(&mut self.params, &self.grads)?;
        if let Some(t) = self.timer.as_mut() {
            t.mark("optimizer")?;
        }
        self.iteration += 1;
        Ok(StepStats { loss: l, correct, batch })
    }

    /// Per-op timing from now on (on) or no more (off): CUDA events between the ops of every
    /// step; `take_profile` reads them.
    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        self.timer = if on {
            let mut t = OpTimer::new(self.dev.stream.clone());
            t.mark("start")?;
            Some(t)
        } else {
            None
        };
        Ok(())
    }

    /// The per-op durations (ms) recorded since `set_profiling(true)` or the last call, in order
    /// (see `gpu::profile::merge` to sum them per op); empty when profiling is off.
    pub fn take_profile(&mut self) -> Result<Vec<(String, f64)>> {
        let Some(t) = self.timer.as_mut() else { return Ok(Vec::new()) };
        let rows = t.take()?;
        t.mark("start")?;
        Ok(rows)
    }

    /// Loss and accuracy without updating anything (dropout off).
    pub fn evaluate(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats> {
        let batch = labels.len();
        self.check_labels(labels)?;
        self.training = false;
        self.forward(x, t_in, batch)?;
        let (l, correct) = self.loss_of_readout(loss, labels)?;
        Ok(StepStats { loss: l, correct, batch })
    }

    /// Predicted classes (inference: dropout off).
    pub fn predict(&mut self, x: &[f32], t_in: usize, batch: usize) -> Result<Vec<usize>> {
        self.training = false;
        self.forward(x, t_in, batch)?;
        let y = self.readout.as_ref().ok_or_else(|| missing("the readout"))?;
        LossBuffers::predict(&self.dev, &y.as_view(), self.classes)
    }

    /// Bit-reproducible steps (`--deterministic`): every BackEI layer takes the plan without float
    /// atomics of its kernel version (`gpu::backei_layer::plan_deterministic`: v1 with the Separate
    /// weight-gradient reduction; v2/v3 with partial sums reduced in order); the other ops are
    /// cuBLAS GEMMs and kernels without atomics, deterministic on a given card.
    pub fn set_deterministic(&mut self, on: bool) {
        for l in &mut self.layers {
            if let Op::Spike { layer, .. } = &mut l.op {
                layer.deterministic = on;
            }
        }
    }

    /// (layer index, firing rate, inhibitory fraction or None without E/I) of every spiking
    /// layer in the last forward, as `cpu::Network::spike_stats`.
    pub fn spike_stats(&self) -> Result<Vec<(usize, f64, Option<f64>)>> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let Op::Spike { layer, .. } = &l.op {
                let (rate, inh) = layer.spike_stats()?;
                out.push((i, rate, layer.feedback.ei.then_some(inh)));
            }
        }
        Ok(out)
    }

    /// The output [T][B][...] of layer `i` in the last forward, copied to the host.
    pub fn layer_output_to_host(&self, i: usize) -> Result<Vec<f32>> {
        if i >= self.layers.len() {
            return Err(config_err("layer", format!("layer {i} of {}", self.layers.len())));
        }
        let input = self.input.as_ref().ok_or_else(|| missing("the input buffer"))?;
        let v = source(&self.layers[..=i], input, self.shape.0)?;
        self.dev.stream.clone_dtoh(&v).map_err(cuda_err("reading a layer output"))
    }

    /// The memory plan of this network at a batch shape.
    pub fn memory_plan(&self, batch: usize, t_in: usize) -> Result<MemoryPlan> {
        memory_plan_for(&self.spec, batch, self.spec.steps, t_in)
    }
}

fn w_of(lp: &LayerPlan) -> usize {
    lp.input[2]
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB40: usize = 40_000_000_000;

    #[test]
    fn memory_plan_of_the_four_networks() {
        for spec in [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()] {
            let direct = memory_plan_for(&spec, 100, 20, 1).unwrap();
            let rate = memory_plan(&spec, 100, 20).unwrap();
            println!("{:<14} direct {direct}\n{:<14} rate   {rate}", spec.name, "");
            // the parameter count is the CPU engine's
            let n = Network::<f32>::new(&spec, 1).unwrap().num_params();
            assert_eq!(direct.params, 4 * n, "{}", spec.name);
            assert_eq!((direct.grads, direct.optimizer), (4 * n, 8 * n));
            // T_in = T holds every frame and the first conv over all steps: never smaller
            assert!(rate.total() >= direct.total());
            assert!(rate.activations > direct.activations);
            // the spiking layers hold at least s and v over all T steps of every neuron
            let plan = spec.plan().unwrap();
            let neurons: usize = plan
                .iter()
                .filter(|l| matches!(l.spec, LayerSpec::BackEi | LayerSpec::Spiking))
                .map(|l| l.input.iter().product::<usize>())
                .sum();
            assert!(direct.spiking >= 4 * 2 * 20 * 100 * neurons);
            // twice the batch needs more, but less than twice (the parameters do not grow)
            let double = memory_plan_for(&spec, 200, 20, 1).unwrap();
            assert!(double.total() > direct.total() && double.total() < 2 * direct.total());
            assert!(direct.total() < GB40, "{} does not fit 40 GB: {direct}", spec.name);
        }
    }

    #[test]
    fn cifar10_at_b100_t20_fits_40_gb_in_both_encodings() {
        let spec = NetworkSpec::cifar10();
        let direct = memory_plan_for(&spec, 100, 20, 1).unwrap();
        let rate = memory_plan(&spec, 100, 20).unwrap();
        assert!(rate.total() < GB40, "{rate}");
        assert!(direct.total() < GB40, "{direct}");
        // the first BackEI layer alone keeps s, v, g, z and ∂L/∂s over 20×100×128×32×32 neurons
        let first = 20 * 100 * 128 * 32 * 32;
        assert!(direct.spiking >= 4 * 5 * first, "{direct}");
        // and the plan is not vacuous: more than 8 GB at this size
        assert!(direct.total() > 8_000_000_000, "{direct}");
    }

    #[test]
    fn memory_plan_refuses_bad_shapes_and_finds_a_batch_that_fits() {
        let spec = NetworkSpec::cifar10();
        assert!(memory_plan(&spec, 0, 20).unwrap_err().to_string().contains("batch"));
        assert!(memory_plan_for(&spec, 10, 20, 3).unwrap_err().to_string().contains("T_in = 3"));
        assert!(memory_plan(&spec, 10, 0).is_err());
        let one = memory_plan_for(&spec, 1, 20, 1).unwrap().total();
        let b = batch_that_fits(&spec, 100, 20, 1, 8_000_000_000).unwrap();
        assert!((1..100).contains(&b));
        assert!(memory_plan_for(&spec, b, 20, 1).unwrap().total() <= 8_000_000_000);
        assert!(memory_plan_for(&spec, b + 1, 20, 1).unwrap().total() > 8_000_000_000);
        assert_eq!(batch_that_fits(&spec, 100, 20, 1, one - 1), None);
        assert_eq!(batch_that_fits(&spec, 100, 20, 1, usize::MAX / 2), Some(100));
    }

    #[test]
    fn layer_steps_compute_the_first_conv_once_under_direct_encoding() {
        let spec = NetworkSpec::cifar10();
        let plan = spec.plan().unwrap();
        let ts = layer_steps(&plan, 20, 1);
        assert_eq!(ts[0], (1, 1), "conv 1 runs once");
        assert_eq!(ts[1], (1, 20), "the BackEI layer broadcasts its current");
        assert!(ts[2..].iter().all(|&t| t == (20, 20)));
        assert!(layer_steps(&plan, 20, 20).iter().all(|&t| t == (20, 20)));
    }
}
