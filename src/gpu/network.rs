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
//! Buffers are allocated for a batch shape (B, T_in) once, from `memory::buffer_plan` (the same
//! plan `memory_plan` adds up: outputs the backward does not read and the input gradients share
//! two slots each), and reused; a new shape reallocates.
//!
//! A training step has no host synchronisation: its per-step values (input, labels, dropout keys,
//! optimizer scalars) are copied in before its kernels and its results (per-row losses,
//! predictions, non-finite counts) copied out after them, so the kernels themselves are the same
//! every step and run as one CUDA graph (`graph.rs`). `train_step_pipelined` returns the results
//! of the step before (reading them costs nothing then: the host is one step ahead of the GPU);
//! `train_step` waits for its own. A step whose loss or gradients are NaN/Inf is reported by the
//! host one step late, but never reaches the parameters: the optimizer kernel skips its update
//! when the step's status words are non-zero, and they stay so (every later step reports the
//! error too) until parameters are loaded (`load_params`).

use super::backei_layer::{BackEiSlots, Epilogue, GpuBackEiLayer, InputWindows, KernelVersion, LayerInput, PoolDropout};
use super::conv;
use super::device::GpuDevice;
use super::dropout::{DropoutKeys, Mask};
use super::gemm_tc::{input_exact_in_fp16, FeedForward, FeedForwardWs, XForm};
use super::graph::{Action, GraphBook, StepKey};
use super::loss::{self as gloss, LossBuffers, STATUS_GRADS, STATUS_LOSS, STATUS_PARAMS, STATUS_WORDS};
use super::memory::{batch_that_fits, buffer_plan, layer_steps, spike_feedback, BufferPlan, Place, StepSettings};
use super::optim::{count_nonfinite, count_nonfinite_into, GpuOptimizer};
use super::pool::PoolIo;
use super::profile::OpTimer;
use super::util::{cuda_err, is_oom};
use super::{dropout, linear, pool};
use crate::cpu::conv::ConvGeom;
use crate::cpu::loss::Loss;
use crate::cpu::network::{Network, ParamSlot, StepStats};
use crate::error::{check_finite, config_err, shape_err, BackeiError, Result};
use crate::precision::Precision;
use crate::spec::{LayerSpec, NetworkSpec};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaView, CudaViewMut};
use std::ops::Range;
use std::sync::Arc;

pub use super::memory::{memory_plan, MemoryPlan};

enum Op {
    /// `x_exact`: the input is spikes or their averages, exact in fp16 (one product fewer in
    /// the tensor cores' fp32 mode).
    Conv {
        geom: ConvGeom,
        w: Range<usize>,
        b: Range<usize>,
        x_exact: bool,
    },
    Linear {
        n_in: usize,
        n_out: usize,
        w: Range<usize>,
        b: Range<usize>,
        x_exact: bool,
    },
    /// `dropout`: the (p, key slot) of a dropout layer before it that runs fused into this one.
    Pool {
        c: usize,
        h: usize,
        w: usize,
        dropout: Option<(f32, usize)>,
    },
    /// `key_slot`: where this layer's key sits in the network's `DropoutKeys`; `fused`: it runs
    /// inside the pooling layer after it (`memory::fuses_into_pool`).
    Dropout {
        p: f32,
        index: u32,
        key_slot: usize,
        fused: bool,
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
    /// Where the output lives (`Place::Own`: in `out`; a forward slot; None for flatten and
    /// spiking layers, whose output lives elsewhere).
    out_place: Place,
    out: Option<CudaSlice<f32>>,
    /// Where ∂L/∂input lives (a gradient slot, or None).
    grad_place: Place,
    /// A convolution run per `--recompute` window of the BackEI layer after it
    /// (`memory::conv_output_window`): `out` holds one window of this many steps, and the layer
    /// after it runs this one ([`ConvWindows`]).
    window: Option<usize>,
    /// A pooling layer whose output is int8 codes of the pooled spikes (`memory::pooled_as_codes`:
    /// `out` holds ⌈len/4⌉ f32 words; the conv or linear layer after it reads them as
    /// `XForm::Q8`, [`x_form`]).
    codes: bool,
}

impl Layer {
    /// The first flat index of this layer's parameters (None without parameters).
    fn param_start(&self) -> Option<usize> {
        match &self.op {
            Op::Conv { w, .. } | Op::Linear { w, .. } => Some(w.start),
            Op::Spike { params, .. } => params.iter().filter(|r| !r.is_empty()).map(|r| r.start).min(),
            _ => None,
        }
    }

    fn has_params(&self) -> bool {
        match &self.op {
            Op::Conv { .. } | Op::Linear { .. } => true,
            Op::Spike { params, .. } => params.iter().any(|r| !r.is_empty()),
            _ => false,
        }
    }
}

/// A step launched whose results have not been read yet.
struct Pending {
    iteration: u64,
    labels: Vec<u8>,
}

/// The network on the GPU engine (f32 state, products in the precision of `settings`).
pub struct GpuNetwork {
    pub dev: Arc<GpuDevice>,
    pub spec: NetworkSpec,
    pub slots: Vec<ParamSlot>,
    pub params: CudaSlice<f32>,
    pub grads: CudaSlice<f32>,
    layers: Vec<Layer>,
    classes: usize,
    settings: StepSettings,
    /// The buffers of the current shape.
    plan: Option<BufferPlan>,
    input: Option<CudaSlice<f32>>,
    readout: Option<CudaSlice<f32>>,
    out_slots: [Option<CudaSlice<f32>>; 2],
    grad_slots: [Option<CudaSlice<f32>>; 2],
    loss: Option<LossBuffers>,
    keys: DropoutKeys,
    /// The convolutions' and linear layers' GEMMs: the path and its workspace.
    ff: FeedForwardWs,
    counter: CudaSlice<u32>,
    /// (B, T_in) the buffers are sized for.
    shape: (usize, usize),
    /// Bumped whenever buffers are reallocated or the launches change: keys the graphs.
    generation: u64,
    graphs: GraphBook<CudaGraph>,
    pending: Option<Pending>,
    /// The results of a step read before anyone asked for them (see `settle`).
    settled: Option<Result<StepStats>>,
    /// Seed of the dropout masks; with `iteration` it keys every mask (as the CPU engine).
    pub dropout_seed: u64,
    /// Training iterations launched.
    pub iteration: u64,
    pub training: bool,
    /// The position of the batch's first sample in the global batch (as the CPU engine's).
    pub sample_offset: usize,
    /// Per-op timing of the steps (`set_profiling`), read with `take_profile`.
    timer: Option<OpTimer>,
    /// The last layer runs the readout and the training step's loss in its own kernels (see
    /// `readout_fused`; `BACKEI_FUSED_READOUT=0` or `set_fused_readout` turns it off).
    fused_readout: bool,
    /// Recorded after each input upload (see `upload_input`).
    uploaded: CudaEvent,
}

/// A layer's label in a profile: its index and kind (`backei v1`, `spiking`, `conv`, …).
fn op_label(i: usize, op: &Op) -> String {
    let kind = match op {
        Op::Conv { .. } => "conv".to_string(),
        Op::Linear { .. } => "linear".to_string(),
        Op::Pool { dropout: None, .. } => "pool".to_string(),
        Op::Pool { dropout: Some(_), .. } => "dropout+pool".to_string(),
        Op::Dropout { .. } => "dropout".to_string(),
        Op::Flatten => "flatten".to_string(),
        Op::Spike { layer, .. } => {
            if layer.feedback.back || layer.feedback.ei {
                // the version that runs (--recompute takes v4, a shape v2–v4 cannot run falls back)
                format!("backei {:?}", layer.plan.as_ref().map_or(layer.version, |p| p.version)).to_lowercase()
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

/// The two shared slots, split for one layer: the readable ones and the one it writes (if any).
fn slot_views(
    slots: &mut [Option<CudaSlice<f32>>; 2],
    write: Option<usize>,
) -> ([Option<&CudaSlice<f32>>; 2], Option<&mut CudaSlice<f32>>) {
    let [a, b] = slots;
    match write {
        None => ([a.as_ref(), b.as_ref()], None),
        Some(0) => ([None, b.as_ref()], a.as_mut()),
        Some(_) => ([a.as_ref(), None], b.as_mut()),
    }
}

fn slot_of(place: Place) -> Option<usize> {
    match place {
        Place::Slot { slot, .. } => Some(slot),
        _ => None,
    }
}

/// The first `len` values of a buffer as a view.
fn view<'a>(buf: &'a CudaSlice<f32>, len: usize, what: &str) -> Result<CudaView<'a, f32>> {
    buf.try_slice(0..len).ok_or_else(|| shape_err(what, format!("≥ {len} values"), format!("{}", buf.len())))
}

/// The pooling after `layer` that the layer's own v4 kernels run — the memory plan decided so
/// (`memory::pools_in_spiking_layer`) and gave the pooling no input gradient — from the layers
/// `after` it: how many layers it spans (1, or 2 with a dropout fused into it) and that dropout's
/// (p, key slot).
fn pooling_inside(layer: &Layer, after: &[Layer]) -> Option<(usize, Option<(f32, usize)>)> {
    if !matches!(&layer.op, Op::Spike { layer, .. } if layer.pools_in_forward()) {
        return None;
    }
    match after {
        [Layer { op: Op::Pool { dropout: None, .. }, grad_place: Place::None, .. }, ..] => Some((1, None)),
        [Layer { op: Op::Dropout { fused: true, .. }, .. }, Layer { op: Op::Pool { dropout: Some(d), .. }, grad_place: Place::None, .. }, ..] => {
            Some((2, Some(*d)))
        }
        _ => None,
    }
}

/// Whether the input of the layer after `before` is int8 spikes (a v4 BackEI layer's compact
/// output, which only pooling reads: `memory::output_read_by_pool`).
fn source_is_s8(before: &[Layer]) -> bool {
    match before.iter().rev().find(|l| !matches!(l.op, Op::Flatten | Op::Dropout { fused: true, .. })) {
        Some(Layer { op: Op::Spike { layer, .. }, .. }) => layer.spikes_s8(),
        _ => false,
    }
}

/// The input of the layer after `before`: the output of the last layer that holds one (int8
/// spikes in ⌈len/4⌉ f32 words where [`source_is_s8`]).
fn source<'a>(
    before: &'a [Layer],
    input: &'a CudaSlice<f32>,
    slots: &[Option<&'a CudaSlice<f32>>; 2],
    batch: usize,
) -> Result<CudaView<'a, f32>> {
    for l in before.iter().rev() {
        let len = l.t_out * batch * l.out_len;
        let buf = match (&l.op, l.out_place) {
            (Op::Flatten, _) | (Op::Dropout { fused: true, .. }, _) => continue,
            (Op::Spike { layer, .. }, _) if layer.spikes_s8() => return view(layer.output()?, len.div_ceil(4), "int8 spikes"),
            (Op::Spike { layer, .. }, _) => layer.output()?,
            (_, Place::Own(_)) if l.codes => {
                return view(l.out.as_ref().ok_or_else(|| missing("a layer output"))?, len.div_ceil(4), "pooled spikes as int8 codes")
            }
            (_, Place::Own(_)) => l.out.as_ref().ok_or_else(|| missing("a layer output"))?,
            (_, Place::Slot { slot, .. }) => {
                slots[slot].ok_or_else(|| BackeiError::Cuda("internal: a layer reads the forward slot it writes".into()))?
            }
            (_, Place::None) => return Err(missing("a layer output")),
        };
        return view(buf, len, "layer output");
    }
    Ok(input.as_view())
}

/// How a conv or linear layer after `before` reads its input (`exact`: the memory plan's
/// `input_exact_in_fp16`): int8 codes where the pooling before it writes them, whose value
/// depends on whether a training step's dropout scaled them (`pool::q8_factor`), else f32.
fn x_form(before: &[Layer], exact: bool, training: bool) -> XForm {
    x_codes(before, training).unwrap_or(exact.into())
}

/// [`x_form`] where the input is int8 codes.
fn x_codes(before: &[Layer], training: bool) -> Option<XForm> {
    match before.iter().rev().find(|l| !matches!(l.op, Op::Flatten)) {
        Some(Layer { op: Op::Pool { dropout, .. }, codes: true, .. }) => {
            let scale = dropout.filter(|_| training).map(|(p, _)| dropout::scale(p));
            Some(XForm::Q8(pool::q8_factor(scale)))
        }
        _ => None,
    }
}

/// Where ∂L/∂(output of the layer before `after`) lives: the grad_in of the next layer that has
/// one, or the readout's gradient.
fn grad_of_output(after: &[Layer], upstream: Place) -> Place {
    // (a fused dropout's grad_place is the one its pooling layer writes)
    after.iter().find(|l| !matches!(l.op, Op::Flatten)).map_or(upstream, |l| l.grad_place)
}

/// A convolution run one `--recompute` window at a time for the BackEI layer after it
/// (`memory::conv_output_window`): each `fill` writes that window's steps of its output into its
/// one-window buffer, with the bits of the convolution over every step (`conv::forward_part`).
struct ConvWindows<'a> {
    dev: &'a GpuDevice,
    ff: &'a mut FeedForwardWs,
    geom: &'a ConvGeom,
    w: CudaView<'a, f32>,
    b: CudaView<'a, f32>,
    x_form: XForm,
    /// The convolution's input, every step.
    x: CudaView<'a, f32>,
    y: &'a mut CudaSlice<f32>,
    batch: usize,
    steps: usize,
}

impl<'a> ConvWindows<'a> {
    fn new(
        dev: &'a GpuDevice,
        ff: &'a mut FeedForwardWs,
        conv: &'a mut Layer,
        params: &'a CudaSlice<f32>,
        x: CudaView<'a, f32>,
        x_codes: Option<XForm>,
        (batch, steps): (usize, usize),
    ) -> Result<Self> {
        let Layer { op: Op::Conv { geom, w, b, x_exact }, out, .. } = conv else {
            return Err(BackeiError::Cuda("internal: a layer run per window that is not a convolution".into()));
        };
        let y = out.as_mut().ok_or_else(|| missing("a convolution's window"))?;
        let (w, b) = (params.slice(w.clone()), params.slice(b.clone()));
        Ok(ConvWindows { dev, ff, geom, w, b, x_form: x_codes.unwrap_or((*x_exact).into()), x, y, batch, steps })
    }
}

impl InputWindows for ConvWindows<'_> {
    fn fill(&mut self, t0: usize, t1: usize) -> Result<()> {
        let (first, count) = (t0 * self.batch, (t1 - t0) * self.batch);
        let len = count * self.geom.out_len();
        let have = self.y.len();
        let mut y =
            self.y.try_slice_mut(0..len).ok_or_else(|| shape_err("a convolution's window", format!("≥ {len} values"), have.to_string()))?;
        let samples = (self.steps * self.batch, first, count);
        conv::forward_part(self.dev, self.ff, self.geom, samples, &self.w, &self.b, &self.x, &mut y, self.x_form)
    }

    fn window(&self, t0: usize, t1: usize) -> Result<CudaView<'_, f32>> {
        view(self.y, (t1 - t0) * self.batch * self.geom.out_len(), "a convolution's window")
    }
}

/// Whether the input of spiking layer `layer` comes from a convolution run per window (the layer
/// right `before` it: [`ConvWindows`]).
fn input_by_windows(layer: &Layer, before: &[Layer]) -> bool {
    matches!(layer.op, Op::Spike { .. }) && before.last().is_some_and(|l| l.window.is_some())
}

/// The pooling a spiking layer runs into `y`: f32, or int8 codes (`codes`: the pooling layer's).
fn pool_epilogue<'a, 'b>(y: &'a mut CudaViewMut<'b, f32>, codes: bool) -> Epilogue<'a, 'b> {
    if codes {
        Epilogue::PoolCodes(y)
    } else {
        Epilogue::Pool(y)
    }
}

/// The output of the pooling `next` (the layer after a spiking layer that pools into it).
fn pooled_output<'a>(next: &'a mut Layer, slot_out: Option<&'a mut CudaSlice<f32>>) -> Result<CudaViewMut<'a, f32>> {
    match next.out_place {
        Place::Own(len) => Ok(next.out.as_mut().ok_or_else(|| missing("a pooling output"))?.slice_mut(0..len)),
        Place::Slot { len, .. } => Ok(slot_out.ok_or_else(|| missing("a forward slot"))?.slice_mut(0..len)),
        Place::None => Err(missing("a pooling output")),
    }
}

/// A spiking layer's backward from `input`: from the gradient of the pooling it runs inside
/// (`pools`, with the dropout between drawn from `keys` at sample `offset` when `training`), or
/// from ∂L/∂s.
#[allow(clippy::too_many_arguments)]
fn spike_backward(
    sl: &mut GpuBackEiLayer,
    params: &BackEiSlots,
    (p, g): (&CudaSlice<f32>, &mut CudaSlice<f32>),
    input: LayerInput,
    t_in: usize,
    dy: &CudaView<f32>,
    pools: Option<(usize, Option<(f32, usize)>)>,
    (keys, training, offset): (&CudaSlice<u64>, bool, usize),
    dx: &mut CudaViewMut<f32>,
) -> Result<()> {
    let Some((_, dropout)) = pools else { return sl.backward_with(p, g, params, input, t_in, dy, dx) };
    let [c, h, w] = sl.shape;
    let index0 = (offset * c * h * w) as u64;
    let dropout = match dropout {
        Some((prob, slot)) if training => Some(PoolDropout { keys, slot, p: prob, index0 }),
        _ => None,
    };
    sl.backward_from_pooled(p, g, params, input, t_in, dy, dropout, dx)
}

/// Turns off the last layer's fused readout and loss (`=0`; the default `1` fuses them).
pub const FUSED_READOUT_ENV: &str = "BACKEI_FUSED_READOUT";

/// `BACKEI_FUSED_READOUT`'s value: fused (unset, empty or 1) or not (0).
pub fn fused_readout_from_env(value: Option<&str>) -> Result<bool> {
    super::util::switch_from_env(FUSED_READOUT_ENV, value, "the last layer computes the readout and the loss", "separate kernels")
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
        let mut dropouts = 0usize;
        for (i, (lp, &(t_in, t_out))) in plan.iter().zip(&ts).enumerate() {
            let [c, h, w] = lp.input;
            let op = match lp.spec {
                LayerSpec::Conv { out_channels, kernel, padding } => {
                    let (wr, br) = (need(format!("layers.{i}.weight"))?, need(format!("layers.{i}.bias"))?);
                    let x_exact = input_exact_in_fp16(&spec, &plan, i);
                    Op::Conv { geom: ConvGeom::new(c, out_channels, h, w, kernel, padding), w: wr, b: br, x_exact }
                }
                LayerSpec::Linear { out_features } => Op::Linear {
                    n_in: c,
                    n_out: out_features,
                    w: need(format!("layers.{i}.weight"))?,
                    b: need(format!("layers.{i}.bias"))?,
                    x_exact: input_exact_in_fp16(&spec, &plan, i),
                },
                LayerSpec::AvgPool => Op::Pool { c, h, w, dropout: None },
                LayerSpec::Dropout { p } => {
                    dropouts += 1;
                    Op::Dropout { p: p as f32, index: i as u32, key_slot: dropouts - 1, fused: false }
                }
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
                out_place: Place::None,
                out: None,
                grad_place: Place::None,
                window: None,
                codes: false,
            });
        }
        let params = dev.stream.clone_htod(&cpu.params).map_err(cuda_err("uploading the parameters"))?;
        let grads = dev.stream.alloc_zeros::<f32>(cpu.params.len().max(1)).map_err(cuda_err("allocating the gradients"))?;
        let counter = dev.stream.alloc_zeros::<u32>(1).map_err(cuda_err("allocating a counter"))?;
        let limits = super::backei_layer::DeviceLimits::of(dev)?;
        let settings = StepSettings::new(limits)?;
        Ok(GpuNetwork {
            dev: dev.clone(),
            classes: spec.classes()?,
            ff: FeedForwardWs::new(dev, settings.feedforward, limits)?
                .with_big_tiles(settings.big_tiles)
                .with_halo_convs(settings.halo_convs),
            settings,
            keys: DropoutKeys::new(dev, dropouts)?,
            spec,
            slots,
            params,
            grads,
            layers,
            plan: None,
            input: None,
            readout: None,
            out_slots: [None, None],
            grad_slots: [None, None],
            loss: None,
            timer: None,
            fused_readout: fused_readout_from_env(std::env::var(FUSED_READOUT_ENV).ok().as_deref())?,
            uploaded: dev.ctx.new_event(None).map_err(cuda_err("creating the upload event"))?,
            counter,
            shape: (0, 0),
            generation: 0,
            graphs: GraphBook::from_env()?,
            pending: None,
            settled: None,
            dropout_seed: cpu.dropout_seed,
            iteration: cpu.iteration,
            training: true,
            sample_offset: cpu.sample_offset,
        })
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The first flat parameter index of every layer with parameters, in layer order: the
    /// points at which `enqueue_backward` reports gradients final.
    pub fn layer_param_starts(&self) -> Vec<usize> {
        self.layers.iter().filter_map(Layer::param_start).collect()
    }

    pub fn num_params(&self) -> usize {
        self.slots.last().map_or(0, |s| s.range.end)
    }

    /// The settings the steps run under (precision, determinism, kernel version, device limits).
    pub fn settings(&self) -> &StepSettings {
        &self.settings
    }

    /// How the convolutions' and linear layers' products are rounded (state, master weights and
    /// optimizer state stay f32 in every mode), and so which GEMMs compute them
    /// (`gemm_tc::FeedForward`).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let settings = self.settings.with_precision(precision)?;
        self.change_settings(settings);
        Ok(())
    }

    /// Takes new step settings; when they differ, every buffer and launch is planned again at the
    /// next step (the spiking layers take their share of the settings there, in `ensure_buffers`).
    fn change_settings(&mut self, settings: StepSettings) {
        if settings != self.settings {
            self.settings = settings;
            self.ff.mode = settings.feedforward;
            self.ff.big_tiles = settings.big_tiles;
            self.ff.halo_convs = settings.halo_convs;
            self.plan = None;
            self.invalidate_launches();
        }
    }

    /// Which GEMMs the convolutions and linear layers run: cuBLAS (fp32 only) or the tensor-core
    /// kernels in the current precision (what `BACKEI_FEEDFORWARD` picks, for tests and benches).
    pub fn set_feedforward(&mut self, tensor_cores: bool) -> Result<()> {
        let mode = match (tensor_cores, self.settings.precision) {
            (true, p) => FeedForward::TensorCore(p),
            (false, Precision::Fp32) => FeedForward::Cublas,
            (false, p) => return Err(config_err("feed-forward GEMMs", format!("cuBLAS computes fp32 only, not {p}"))),
        };
        self.change_settings(StepSettings { feedforward: mode, ..self.settings });
        Ok(())
    }

    /// `--recompute K`: the BackEI layers keep their state for windows of K steps and recompute
    /// the earlier windows in the backward, on the v4 kernels (`backei_layer::apply_recompute`);
    /// the gradients are those of keeping every step, bit for bit.
    pub fn set_recompute(&mut self, recompute: Option<usize>) -> Result<()> {
        let settings = StepSettings { recompute, ..self.settings };
        settings.check_gpu()?;
        self.change_settings(settings);
        Ok(())
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

    /// Replaces every parameter (a checkpoint, or the CPU engine's weights), and forgets a
    /// reported non-finite step.
    pub fn load_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.num_params() {
            return Err(shape_err("parameters", format!("{} values", self.num_params()), format!("{}", params.len())));
        }
        check_finite("parameters", params, "a parameter to load is NaN or Inf")?;
        self.settle()?;
        if !params.is_empty() {
            self.dev.stream.memcpy_htod(params, &mut self.params).map_err(cuda_err("uploading the parameters"))?;
        }
        if let Some(lb) = self.loss.as_mut() {
            lb.clear_status(&self.dev)?;
        }
        Ok(())
    }

    /// The graphs' state for a new set of launches (new buffers or settings).
    fn invalidate_launches(&mut self) {
        self.generation += 1;
        self.graphs.retain_generation(self.generation);
    }

    /// Sizes every buffer for (batch, t_in) from `memory::buffer_plan`; a no-op when the shape is
    /// unchanged. Reads the results of a launched step first (its buffers go).
    fn ensure_buffers(&mut self, batch: usize, t_in: usize) -> Result<()> {
        if self.shape == (batch, t_in) && self.plan.is_some() {
            return Ok(());
        }
        self.settle()?;
        // free the old shape's buffers first, so that the new ones can use their memory
        self.input = None;
        self.readout = None;
        self.out_slots = [None, None];
        self.grad_slots = [None, None];
        self.loss = None;
        self.plan = None;
        self.shape = (0, 0);
        for l in &mut self.layers {
            l.out = None;
        }
        self.invalidate_launches();
        let bp = buffer_plan(&self.spec, batch, self.spec.steps, t_in, &self.settings)?;
        let stream = self.dev.stream.clone();
        let alloc = |len: usize, what: &str| {
            stream.alloc_zeros::<f32>(len.max(1)).map_err(cuda_err(format!("allocating {what} for batch {batch}")))
        };
        let mut fused_before: Option<(f32, usize)> = None;
        for (i, (l, lb)) in self.layers.iter_mut().zip(&bp.layers).enumerate() {
            l.t_in = lb.t_in;
            l.t_out = lb.t_out;
            l.out_place = lb.output;
            l.grad_place = lb.grad_in;
            l.window = lb.window;
            l.codes = lb.codes;
            match &mut l.op {
                Op::Dropout { p, key_slot, fused, .. } => {
                    *fused = lb.fused;
                    fused_before = lb.fused.then_some((*p, *key_slot));
                }
                Op::Pool { dropout, .. } => *dropout = fused_before.take(),
                _ => fused_before = None,
            }
            if let Place::Own(len) = lb.output {
                l.out = Some(alloc(len, "a layer output")?);
            }
            if let Op::Spike { layer, .. } = &mut l.op {
                // the layer allocates its own buffers, from the very plan the memory plan counted
                layer.deterministic = self.settings.deterministic;
                layer.precision = self.settings.precision;
                layer.version = self.settings.version;
                layer.recompute = self.settings.recompute;
                layer.v4_choices = self.settings.v4;
                // the memory plan decided whether s is written as int8 (read by pooling only)
                layer.compact_z = self.settings.compact;
                layer.compact_s = lb.spiking.as_ref().and_then(|p| p.v4.as_ref()).is_some_and(|v| v.s8);
                let made = layer.prepare(batch, self.spec.steps)?;
                if Some(made) != lb.spiking.as_ref() {
                    return Err(BackeiError::Cuda(format!("internal: layer {i}'s launch plan differs from the memory plan's")));
                }
            }
        }
        for k in 0..2 {
            if bp.out_slots[k] > 0 {
                self.out_slots[k] = Some(alloc(bp.out_slots[k], "a shared output slot")?);
            }
            if bp.grad_slots[k] > 0 {
                self.grad_slots[k] = Some(alloc(bp.grad_slots[k], "a shared gradient slot")?);
            }
        }
        self.input = Some(alloc(bp.input, "the input batch")?);
        self.readout = Some(alloc(batch * self.classes, "the readout")?);
        self.loss = Some(LossBuffers::new(&self.dev, batch, self.classes)?);
        self.plan = Some(bp);
        self.shape = (batch, t_in);
        Ok(())
    }

    /// Device bytes this network holds (its own buffers, the spiking layers' plan buffers, the
    /// conv workspace, cuBLAS's workspace not counted): what `memory_plan` predicts, for the GPU
    /// tests.
    pub fn allocated_bytes(&self) -> usize {
        let f = |b: &Option<CudaSlice<f32>>| 4 * b.as_ref().map_or(0, |x| x.len());
        let mut n = 4 * (self.params.len() + self.grads.len() + self.counter.len());
        n += f(&self.input) + f(&self.readout);
        n += self.out_slots.iter().chain(&self.grad_slots).map(f).sum::<usize>();
        n += self.layers.iter().map(|l| f(&l.out)).sum::<usize>();
        for l in &self.layers {
            if let Op::Spike { layer, .. } = &l.op {
                for b in [
                    &layer.out,
                    &layer.v,
                    &layer.g,
                    &layer.z,
                    &layer.dv,
                    &layer.fb,
                    &layer.dz,
                    &layer.da,
                    &layer.wg_partials,
                    &layer.staged_weights,
                    &layer.v4_wfrag,
                    &layer.v4_winv,
                    &layer.v4_dw_part,
                    &layer.v_ckpt,
                    &layer.v4_db_carry,
                    &layer.v4_rowmax,
                ] {
                    n += f(b);
                }
            }
        }
        n += self.loss.as_ref().map_or(0, |l| LossBuffers::device_bytes(l.batch, l.classes));
        n += 8 * self.keys.keys.len();
        n + self.ff.bytes()
    }

    /// Adds what to do about an out-of-memory error: the plan and a batch size that fits.
    fn explain_oom(&self, e: BackeiError, batch: usize, t_in: usize) -> BackeiError {
        if !is_oom(&e) {
            return e;
        }
        let steps = self.spec.steps;
        let total = self.dev.ctx.total_mem().unwrap_or(0);
        let need = memory_plan(&self.spec, batch, steps, t_in, &self.settings).map(|p| p.to_string()).unwrap_or_default();
        let fit = batch_that_fits(&self.spec, batch, steps, t_in, total / 10 * 9, &self.settings);
        let advice = match fit {
            Some(b) if b < batch => {
                format!("use --batch-size {b} (the largest that fits 90 % of the {:.1} GiB)", total as f64 / (1u64 << 30) as f64)
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

    /// Checks a host batch, sizes the buffers and copies it in (asynchronously when `x` is
    /// page-locked; `wait_for_upload` must follow before the caller may reuse `x`).
    fn upload_input(&mut self, x: &[f32], t_in: usize, batch: usize) -> Result<()> {
        self.check_input_shape(x.len(), t_in, batch)?;
        check_finite("network input", x, "the input batch holds NaN or Inf: check the data and its normalisation")?;
        self.ensure_buffers(batch, t_in).map_err(|e| self.explain_oom(e, batch, t_in))?;
        let input = self.input.as_mut().ok_or_else(|| missing("the input buffer"))?;
        self.dev.stream.memcpy_htod(x, input).map_err(cuda_err("uploading the input batch"))?;
        // `x` may be page-locked (the loader's buffers on this engine, `gpu::pinned`); then the
        // copy above is truly asynchronous and returns before the DMA has read `x`. The caller
        // may drop the batch as soon as we return, and a loader thread then refills the same
        // buffer, so `wait_for_upload` waits for an event recorded right after the upload before
        // returning, on success and on error alike. (one event, recorded again for every batch)
        if let Err(e) = self.uploaded.record(&self.dev.stream) {
            let _ = self.dev.stream.synchronize();
            return Err(cuda_err("recording the input upload")(e));
        }
        Ok(())
    }

    fn wait_for_upload(&self) -> Result<()> {
        self.uploaded.synchronize().map_err(cuda_err("waiting for the input upload"))
    }

    /// Runs the network over all T steps on a host batch x [T_in][B][C][H][W]; the readout
    /// [B][classes] stays on the device (`readout_to_host` copies it).
    pub fn forward(&mut self, x: &[f32], t_in: usize, batch: usize) -> Result<()> {
        self.settle()?;
        self.upload_input(x, t_in, batch)?;
        let r = self.checked_forward(batch).map_err(|e| self.explain_oom(e, batch, t_in));
        let waited = self.wait_for_upload();
        r.and(waited)
    }

    /// `forward` on a batch already on this device.
    pub fn forward_device(&mut self, x: &CudaView<f32>, t_in: usize, batch: usize) -> Result<()> {
        self.settle()?;
        self.check_input_shape(x.len(), t_in, batch)?;
        self.ensure_buffers(batch, t_in).map_err(|e| self.explain_oom(e, batch, t_in))?;
        let input = self.input.as_mut().ok_or_else(|| missing("the input buffer"))?;
        self.dev.stream.memcpy_dtod(x, input).map_err(cuda_err("copying the input batch"))?;
        self.checked_forward(batch).map_err(|e| self.explain_oom(e, batch, t_in))
    }

    /// The forward after a check that the parameters are finite (outside training steps, whose
    /// optimizer never writes non-finite values: see the module docs).
    fn checked_forward(&mut self, batch: usize) -> Result<()> {
        if count_nonfinite(&self.dev, &self.params, &mut self.counter)? > 0 {
            return Err(BackeiError::NonFinite {
                place: "parameters (GPU)".into(),
                index: 0,
                value: f64::NAN,
                hint: "a parameter is NaN or Inf: the run diverged; lower the learning rate".into(),
            });
        }
        if self.training {
            self.stage_dropout_keys()?;
        }
        if let Some(t) = self.timer.as_mut() {
            t.mark("input upload, parameter check, host gaps")?;
        }
        self.enqueue_forward(batch)
    }

    /// The keys of this iteration's dropout masks, copied to the device.
    fn stage_dropout_keys(&mut self) -> Result<()> {
        let keys: Vec<u64> = self
            .layers
            .iter()
            .filter_map(|l| match l.op {
                Op::Dropout { index, .. } => Some(crate::rng::dropout_key(self.dropout_seed, self.iteration, index)),
                _ => None,
            })
            .collect();
        self.keys.stage(&self.dev, &keys)
    }

    /// The forward's launches (no host synchronisation): every layer, then the readout.
    fn enqueue_forward(&mut self, batch: usize) -> Result<()> {
        let dev = self.dev.clone();
        let steps = self.spec.steps;
        let fused = self.readout_fused();
        let last = self.layers.len().saturating_sub(1);
        let (training, offset) = (self.training, self.sample_offset);
        let input = self.input.as_ref().ok_or_else(|| missing("the input buffer"))?;
        let p = &self.params;
        // the layer before pooled its output into this (pooling) layer's output already
        let mut pooled_ahead = false;
        for i in 0..self.layers.len() {
            let (before, rest) = self.layers.split_at_mut(i);
            let (layer, after) = rest.split_first_mut().ok_or_else(|| missing("a layer"))?;
            if std::mem::take(&mut pooled_ahead) {
                continue;
            }
            // a v4 BackEI layer followed by pooling (no dropout between) writes the pooling's output
            // (with a dropout between, the forward stays the dropout+pooling kernel's)
            let pool_next = pooling_inside(layer, after) == Some((1, None));
            let writes = if pool_next { after[0].out_place } else { layer.out_place };
            let (readable, slot_out) = slot_views(&mut self.out_slots, slot_of(writes));
            if layer.window.is_some() {
                // a convolution the BackEI layer after it runs per window (below)
                continue;
            }
            if input_by_windows(layer, before) {
                let (pre, conv) = before.split_at_mut(i - 1);
                let x = source(pre, input, &readable, batch)?;
                let mut cw = ConvWindows::new(&dev, &mut self.ff, &mut conv[0], p, x, x_codes(pre, training), (batch, steps))?;
                let Op::Spike { layer: sl, params } = &mut layer.op else { return Err(missing("a spiking layer")) };
                let (t_in, by_windows) = (layer.t_in, LayerInput::Windows(&mut cw));
                if pool_next {
                    let codes = after[0].codes;
                    let mut y = pooled_output(&mut after[0], slot_out)?;
                    sl.forward_with(p, params, by_windows, t_in, batch, steps, pool_epilogue(&mut y, codes))?;
                    pooled_ahead = true;
                } else {
                    sl.forward_with(p, params, by_windows, t_in, batch, steps, Epilogue::None)?;
                }
                if let Some(t) = self.timer.as_mut() {
                    let with = if pool_next { " with the pooling" } else { "" };
                    t.mark(format!("forward {}{with} and layer {}'s convolution per window", op_label(i, &layer.op), i - 1))?;
                }
                continue;
            }
            let src = source(before, input, &readable, batch)?;
            let io = PoolIo::from_flags(source_is_s8(before), layer.codes);
            let xf = |exact: bool| x_form(before, exact, training);
            let (t_in, t_out) = (layer.t_in, layer.t_out);
            let rows = t_in * batch;
            match &mut layer.op {
                Op::Flatten | Op::Dropout { fused: true, .. } => {}
                Op::Spike { layer: sl, params } if fused && i == last => {
                    let y = self.readout.as_mut().ok_or_else(|| missing("the readout"))?;
                    sl.forward_with(p, params, LayerInput::Whole(&src), t_in, batch, steps, Epilogue::Readout(&mut y.as_view_mut()))?
                }
                Op::Spike { layer: sl, params } if pool_next => {
                    let codes = after[0].codes;
                    let mut y = pooled_output(&mut after[0], slot_out)?;
                    sl.forward_with(p, params, LayerInput::Whole(&src), t_in, batch, steps, pool_epilogue(&mut y, codes))?;
                    pooled_ahead = true;
                }
                Op::Spike { layer: sl, params } => sl.forward(p, params, &src, t_in, batch, steps)?,
                op => {
                    let mut y = match layer.out_place {
                        Place::Own(len) => layer.out.as_mut().ok_or_else(|| missing("a layer output"))?.slice_mut(0..len),
                        Place::Slot { len, .. } => slot_out.ok_or_else(|| missing("a forward slot"))?.slice_mut(0..len),
                        Place::None => return Err(missing("a layer output")),
                    };
                    match op {
                        Op::Conv { geom, w, b, x_exact } => conv::forward_with(
                            &dev,
                            &mut self.ff,
                            geom,
                            rows,
                            &p.slice(w.clone()),
                            &p.slice(b.clone()),
                            &src,
                            &mut y,
                            xf(*x_exact),
                        )?,
                        Op::Linear { n_in, n_out, w, b, x_exact } => linear::forward_with(
                            &dev,
                            &mut self.ff,
                            *n_in,
                            *n_out,
                            rows,
                            &p.slice(w.clone()),
                            &p.slice(b.clone()),
                            &src,
                            &mut y,
                            xf(*x_exact),
                        )?,
                        Op::Pool { c, h, w, dropout: None } => pool::forward(&dev, rows * *c, *h, *w, &src, io, &mut y)?,
                        Op::Pool { c, h, w, dropout: Some((prob, key_slot)) } => {
                            // the dropout's input: c planes of h·w per sample
                            let index0 = (offset * *c * *h * *w) as u64;
                            let mask = if training { Mask::Key { keys: &self.keys.keys, slot: *key_slot, index0 } } else { Mask::Off };
                            let planes = batch * *c;
                            dropout::forward_pooled(&dev, mask, *prob, planes, t_out, *h, *w, &src, io, &mut y)?
                        }
                        Op::Dropout { p: prob, key_slot, .. } => {
                            let index0 = (offset * layer.in_len) as u64;
                            let mask = if training { Mask::Key { keys: &self.keys.keys, slot: *key_slot, index0 } } else { Mask::Off };
                            dropout::forward(&dev, mask, *prob, batch * layer.in_len, t_out, t_in, &src, &mut y)?
                        }
                        Op::Flatten | Op::Spike { .. } => {}
                    }
                }
            }
            if let (Some(t), false) = (self.timer.as_mut(), matches!(layer.op, Op::Flatten | Op::Dropout { fused: true, .. })) {
                let with = match (fused && i == last, pool_next) {
                    (true, _) => " with the readout",
                    (_, true) => " with the pooling",
                    _ => "",
                };
                t.mark(format!("forward {}{with}", op_label(i, &layer.op)))?;
            }
        }
        if fused {
            return Ok(());
        }
        let last_t = self.layers.last().map_or(1, |l| l.t_out);
        let slots = [self.out_slots[0].as_ref(), self.out_slots[1].as_ref()];
        let out = source(&self.layers, input, &slots, batch)?;
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
        self.settle()?;
        let lb = self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?;
        self.dev.stream.memcpy_htod(d_readout, &mut lb.dy).map_err(cuda_err("uploading the readout gradient"))?;
        self.enqueue_backward(None, None).map_err(|e| self.explain_oom(e, batch, t_in))
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        self.dev.stream.memset_zeros(&mut self.grads).map_err(cuda_err("clearing the gradients"))
    }

    /// BPTT's launches from the ∂L/∂readout in the loss buffers (no host synchronisation).
    /// `ready`, when given, is called after the launches of every layer with parameters, with the
    /// lowest flat index whose gradient is then enqueued in full (layers run last to first and own
    /// ascending ranges of the flat buffer, so everything from there to the end is): data-parallel
    /// training starts reducing those gradients while the earlier layers' backward still runs.
    /// With `fused_loss` (a training step whose forward fused the readout: `readout_fused`) the
    /// last layer computes the loss from the readout and the staged labels itself
    /// (`backward_from_loss`); otherwise ∂L/∂readout is already in the loss buffers.
    fn enqueue_backward(&mut self, mut ready: Option<&mut dyn FnMut(usize) -> Result<()>>, fused_loss: Option<Loss>) -> Result<()> {
        let dev = self.dev.clone();
        let batch = self.shape.0;
        let n = self.layers.len();
        let last_t = self.layers.last().map_or(1, |l| l.t_out);
        let bk = batch * self.classes;
        let upstream = self.plan.as_ref().ok_or_else(|| missing("the buffer plan"))?.upstream;
        if fused_loss.is_none() {
            let lb = self.loss.as_ref().ok_or_else(|| missing("the loss buffers"))?;
            let (_, ups) = slot_views(&mut self.grad_slots, slot_of(upstream));
            let mut ups = ups.ok_or_else(|| missing("the readout gradient"))?.slice_mut(0..upstream.len());
            gloss::readout_backward(&dev, last_t, bk, &lb.dy.as_view(), &mut ups)?;
        }
        let Some(first) = self.layers.iter().position(|l| l.has_params()) else {
            return Ok(());
        };
        let input = self.input.as_ref().ok_or_else(|| missing("the input buffer"))?;
        let out_slots = [self.out_slots[0].as_ref(), self.out_slots[1].as_ref()];
        let (p, g) = (&self.params, &mut self.grads);
        for i in (first..n).rev() {
            let (before, rest) = self.layers.split_at_mut(i);
            let (layer, after) = rest.split_first_mut().ok_or_else(|| missing("a layer"))?;
            if matches!(layer.op, Op::Flatten | Op::Dropout { fused: true, .. }) {
                continue;
            }
            // a pooling whose backward runs inside the v4 BackEI layer before it (`pooling_inside`):
            // the only pooling here without an input gradient, since a layer with parameters
            // comes before it
            if matches!(layer.op, Op::Pool { .. }) && layer.grad_place == Place::None {
                continue;
            }
            let pools = pooling_inside(layer, after);
            if let (Some(loss), true) = (fused_loss, i + 1 == n) {
                let Op::Spike { layer: sl, .. } = &mut layer.op else {
                    return Err(BackeiError::Cuda("internal: the fused loss needs a spiking last layer".into()));
                };
                let (_, dx_slot) = slot_views(&mut self.grad_slots, slot_of(layer.grad_place));
                let mut dx = dx_slot.ok_or_else(|| missing("a layer's input gradient"))?.slice_mut(0..layer.grad_place.len());
                let y = self.readout.as_ref().ok_or_else(|| missing("the readout"))?;
                let lb = self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?;
                sl.backward_from_loss(lb, loss, &y.as_view(), &mut dx)?;
                if let Some(t) = self.timer.as_mut() {
                    t.mark(format!("backward {} with the loss", op_label(i, &layer.op)))?;
                }
                continue;
            }
            let dy_place = grad_of_output(&after[pools.map_or(0, |p| p.0)..], upstream);
            let (readable, dx_slot) = slot_views(&mut self.grad_slots, slot_of(layer.grad_place));
            let dy_buf = slot_of(dy_place).and_then(|s| readable[s]).ok_or_else(|| missing("an output gradient"))?;
            let dy = view(dy_buf, dy_place.len(), "output gradient")?;
            let mut dx: Option<CudaViewMut<f32>> = match dx_slot {
                Some(b) => Some(b.slice_mut(0..layer.grad_place.len())),
                None => None,
            };
            let (t_in, t_out) = (layer.t_in, layer.t_out);
            let rows = t_in * batch;
            let need_dx = || missing("a layer's input gradient");
            let mask = (&self.keys.keys, self.training, self.sample_offset);
            let xf = |exact: bool| x_form(before, exact, self.training);
            if input_by_windows(layer, before) {
                // the input current made per window again by the convolution before (ConvWindows)
                let (pre, conv) = before.split_at_mut(i - 1);
                let x = source(pre, input, &out_slots, batch)?;
                let mut cw =
                    ConvWindows::new(&dev, &mut self.ff, &mut conv[0], p, x, x_codes(pre, self.training), (batch, self.spec.steps))?;
                let Op::Spike { layer: sl, params } = &mut layer.op else { return Err(missing("a spiking layer")) };
                let dx = dx.as_mut().ok_or_else(need_dx)?;
                spike_backward(sl, params, (p, &mut *g), LayerInput::Windows(&mut cw), t_in, &dy, pools, mask, dx)?;
                if let Some(t) = self.timer.as_mut() {
                    let with = if pools.is_some() { " with the pooling" } else { "" };
                    t.mark(format!("backward {}{with} and layer {}'s convolution per window", op_label(i, &layer.op), i - 1))?;
                }
                if let (Some(ready), Some(lo)) = (ready.as_mut(), layer.param_start()) {
                    ready(lo)?;
                }
                continue;
            }
            let reads_input = matches!(layer.op, Op::Conv { .. } | Op::Linear { .. } | Op::Spike { .. });
            let src = if reads_input { Some(source(before, input, &out_slots, batch)?) } else { None };
            let src = || src.as_ref().ok_or_else(|| missing("a layer input"));
            match &mut layer.op {
                Op::Conv { geom, w, b, x_exact } => {
                    let mut gv = g.slice_mut(w.start..b.end);
                    let (mut gw, mut gb) = gv.split_at_mut(w.len());
                    let wv = p.slice(w.clone());
                    conv::backward_with(&dev, &mut self.ff, geom, rows, &wv, src()?, &dy, &mut gw, &mut gb, dx.as_mut(), xf(*x_exact))?;
                }
                Op::Linear { n_in, n_out, w, b, x_exact } => {
                    let mut gv = g.slice_mut(w.start..b.end);
                    let (mut gw, mut gb) = gv.split_at_mut(w.len());
                    let wv = p.slice(w.clone());
                    linear::backward_with(
                        &dev,
                        &mut self.ff,
                        *n_in,
                        *n_out,
                        rows,
                        &wv,
                        src()?,
                        &dy,
                        &mut gw,
                        &mut gb,
                        dx.as_mut(),
                        xf(*x_exact),
                    )?;
                }
                Op::Pool { c, h, w, dropout: None } => pool::backward(&dev, rows * *c, *h, *w, &dy, dx.as_mut().ok_or_else(need_dx)?)?,
                Op::Pool { c, h, w, dropout: Some((prob, key_slot)) } => {
                    let index0 = (self.sample_offset * *c * *h * *w) as u64;
                    let mask = if self.training { Mask::Key { keys: &self.keys.keys, slot: *key_slot, index0 } } else { Mask::Off };
                    dropout::backward_pooled(&dev, mask, *prob, batch * *c, t_out, *h, *w, &dy, dx.as_mut().ok_or_else(need_dx)?)?
                }
                Op::Dropout { p: prob, key_slot, .. } => {
                    let index0 = (self.sample_offset * layer.in_len) as u64;
                    let mask = if self.training { Mask::Key { keys: &self.keys.keys, slot: *key_slot, index0 } } else { Mask::Off };
                    dropout::backward(&dev, mask, *prob, batch * layer.in_len, t_out, t_in, &dy, dx.as_mut().ok_or_else(need_dx)?)?
                }
                Op::Spike { layer: sl, params } => {
                    let dx = dx.as_mut().ok_or_else(need_dx)?;
                    spike_backward(sl, params, (p, &mut *g), LayerInput::Whole(src()?), t_in, &dy, pools, mask, dx)?
                }
                Op::Flatten => {}
            }
            if let Some(t) = self.timer.as_mut() {
                let with = if pools.is_some() { " with the pooling" } else { "" };
                t.mark(format!("backward {}{with}", op_label(i, &layer.op)))?;
            }
            if let (Some(ready), Some(lo)) = (ready.as_mut(), layer.param_start()) {
                ready(lo)?;
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

    /// The launches of one training step after its inputs are staged — what a step graph holds:
    /// forward, loss, backward, the gradient check, the (guarded) optimizer update.
    fn enqueue_train_body(&mut self, opt: &mut GpuOptimizer, loss: Loss) -> Result<()> {
        let batch = self.shape.0;
        let fused = self.readout_fused();
        self.enqueue_forward(batch)?;
        if !fused {
            let y = self.readout.as_ref().ok_or_else(|| missing("the readout"))?;
            let lb = self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?;
            lb.enqueue(&self.dev, loss, &y.as_view(), true)?;
            if let Some(t) = self.timer.as_mut() {
                t.mark("readout and loss")?;
            }
        }
        self.zero_grads()?;
        self.enqueue_backward(None, fused.then_some(loss))?;
        let lb = self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?;
        count_nonfinite_into(&self.dev, &self.grads.as_view(), &mut lb.status.slice_mut(STATUS_GRADS..STATUS_GRADS + 1))?;
        if let Some(t) = self.timer.as_mut() {
            t.mark("gradient check")?;
        }
        opt.enqueue(&mut self.params, &self.grads, &lb.status.as_view())?;
        count_nonfinite_into(&self.dev, &self.params.as_view(), &mut lb.status.slice_mut(STATUS_PARAMS..STATUS_PARAMS + 1))?;
        if let Some(t) = self.timer.as_mut() {
            t.mark("optimizer")?;
        }
        Ok(())
    }

    /// The step's launches: eagerly, captured into a graph, or replayed (see `graph.rs`).
    fn run_train_body(&mut self, opt: &mut GpuOptimizer, loss: Loss, t_in: usize) -> Result<()> {
        let key = StepKey {
            batch: self.shape.0,
            t_in,
            loss,
            generation: self.generation,
            optimizer: StepKey::optimizer_bits(&opt.config),
            optimizer_state: opt.state_addresses(),
        };
        match self.graphs.action(&key, self.timer.is_some()) {
            Action::Eager => {
                self.enqueue_train_body(opt, loss)?;
                self.graphs.ran_eagerly(&key);
            }
            Action::Replay => {
                let g = self.graphs.graph(&key).ok_or_else(|| BackeiError::Cuda("internal: no graph to replay".into()))?;
                g.launch().map_err(cuda_err("launching the step graph"))?;
            }
            Action::Capture => {
                let stream = self.dev.stream.clone();
                stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(cuda_err("beginning a graph capture"))?;
                let body = self.enqueue_train_body(opt, loss);
                let end = stream.end_capture(CUgraphInstantiate_flags(0));
                match (body, end) {
                    (Ok(()), Ok(Some(graph))) => {
                        graph.launch().map_err(cuda_err("launching the step graph"))?;
                        self.graphs.captured(&key, graph);
                    }
                    (body, end) => {
                        let why = match (body, end) {
                            (Err(e), _) => e.to_string(),
                            (_, Err(e)) => format!("{e:?}"),
                            _ => "the capture was empty".to_string(),
                        };
                        if self.graphs.capture_failed(&key, why.clone()) {
                            eprintln!("warning: capturing a training step into a CUDA graph failed ({why}); its kernels are launched one by one instead");
                        }
                        self.enqueue_train_body(opt, loss)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Launches one training step (forward, loss, backward, gradient check, optimizer) without
    /// waiting for it, and returns the results of the step launched before it, if any: its loss
    /// and correct count, or the error of a step whose loss or gradients were NaN/Inf (whose
    /// update the device skipped). `finish_steps` returns the last step's.
    pub fn train_step_pipelined(
        &mut self,
        x: &[f32],
        t_in: usize,
        labels: &[u8],
        loss: Loss,
        opt: &mut GpuOptimizer,
    ) -> Result<Option<StepStats>> {
        self.check_labels(labels)?;
        self.training = true;
        let r = self.launch_train_step(x, t_in, labels, loss, opt);
        let waited = self.wait_for_upload();
        r?;
        waited?;
        self.settled.take().transpose()
    }

    fn launch_train_step(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss, opt: &mut GpuOptimizer) -> Result<()> {
        let batch = labels.len();
        self.upload_input(x, t_in, batch)?;
        self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?.stage_labels(&self.dev, labels)?;
        self.stage_dropout_keys()?;
        opt.stage()?;
        if let Some(t) = self.timer.as_mut() {
            t.mark("input upload, staging, host gaps")?;
        }
        self.run_train_body(opt, loss, t_in).map_err(|e| self.explain_oom(e, batch, t_in))?;
        // the step before this one is done once this one's inputs are in: read its results now,
        // before this step's read-back reuses their page-locked buffers
        self.settle()?;
        self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?.enqueue_readback(&self.dev)?;
        self.pending = Some(Pending { iteration: self.iteration, labels: labels.to_vec() });
        self.iteration += 1;
        Ok(())
    }

    /// Reads the results of a launched step (waiting for it) into `settled`.
    fn settle(&mut self) -> Result<()> {
        let Some(p) = self.pending.take() else { return Ok(()) };
        let lb = self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?;
        let r = lb.results()?;
        let outcome = if r.status.iter().any(|&s| s != 0) {
            let (place, hint) = if r.status[STATUS_LOSS] != 0 {
                (format!("loss at iteration {}", p.iteration), "training diverged; lower the learning rate (--lr) or check the input data")
            } else if r.status[STATUS_GRADS] != 0 {
                (
                    format!("gradients (GPU) at iteration {}: {} are NaN or Inf", p.iteration, r.status[STATUS_GRADS]),
                    "lower the learning rate",
                )
            } else {
                (format!("parameters after the update of iteration {}", p.iteration), "lower the learning rate")
            };
            let hint = format!("{hint} (this step's update was skipped, and every later one is until parameters are loaded)");
            Err(BackeiError::NonFinite { place, index: 0, value: f64::NAN, hint })
        } else {
            let correct = r.pred.iter().zip(&p.labels).filter(|(a, b)| **a == **b as i32).count();
            Ok(StepStats { loss: r.row_loss.iter().map(|&x| x as f64).sum(), correct, batch: p.labels.len() })
        };
        debug_assert!(self.settled.is_none(), "a step's results were never collected");
        self.settled = Some(outcome);
        debug_assert_eq!(STATUS_WORDS, r.status.len());
        Ok(())
    }

    /// Waits for the last launched step and returns its results (None when none is pending).
    pub fn finish_steps(&mut self) -> Result<Option<StepStats>> {
        self.settle()?;
        self.settled.take().transpose()
    }

    /// Forward, loss, backward, optimizer step: one training iteration (as the CPU engine's),
    /// waiting for its results.
    pub fn train_step(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss, opt: &mut GpuOptimizer) -> Result<StepStats> {
        // results of earlier pipelined steps belong to `finish_steps`; collect them first
        if self.pending.is_some() || self.settled.is_some() {
            return Err(config_err("train_step", "a pipelined step is still pending: call finish_steps first"));
        }
        self.train_step_pipelined(x, t_in, labels, loss, opt)?;
        self.finish_steps()?.ok_or_else(|| BackeiError::Cuda("internal: a step left no results".into()))
    }

    /// The first part of a training step run eagerly, for data-parallel training (as
    /// `cpu::Network::forward_loss`): forward in training mode and the loss, read back at once
    /// (the ranks agree on it before the backward); ∂L/∂readout stays on the device.
    pub fn forward_loss(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats> {
        if self.pending.is_some() || self.settled.is_some() {
            return Err(config_err("forward_loss", "a pipelined step is still pending: call finish_steps first"));
        }
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
                hint: "training diverged; lower the learning rate (--lr) or check the input data".into(),
            });
        }
        if let Some(t) = self.timer.as_mut() {
            t.mark("readout and loss")?;
        }
        Ok(StepStats { loss: l, correct, batch })
    }

    /// The gradients of the last `forward_loss`'s loss times `scale` into `grads` (replacing
    /// them), calling `ready` as each layer's gradients are enqueued (see `enqueue_backward`).
    pub fn backward_loss(&mut self, scale: f64, ready: Option<&mut dyn FnMut(usize) -> Result<()>>) -> Result<()> {
        let (batch, t_in) = self.shape;
        if scale != 1.0 {
            // B × classes values: scaled on the host rather than by one more kernel
            let lb = self.loss.as_mut().ok_or_else(|| missing("the loss buffers"))?;
            let mut dy = self.dev.stream.clone_dtoh(&lb.dy).map_err(cuda_err("reading the readout gradient"))?;
            dy.iter_mut().for_each(|d| *d = (*d as f64 * scale) as f32);
            self.dev.stream.memcpy_htod(&dy, &mut lb.dy).map_err(cuda_err("uploading the readout gradient"))?;
        }
        self.zero_grads()?;
        self.enqueue_backward(ready, None).map_err(|e| self.explain_oom(e, batch, t_in))
    }

    /// The optimizer step from `grads` (refused when a gradient is NaN or Inf); counts the
    /// iteration. The eager step's last part, after the gradients' reduction.
    pub fn apply_gradients(&mut self, opt: &mut GpuOptimizer) -> Result<()> {
        let bad = count_nonfinite(&self.dev, &self.grads, &mut self.counter)?;
        if let Some(t) = self.timer.as_mut() {
            t.mark("gradient check")?;
        }
        if bad > 0 {
            return Err(BackeiError::NonFinite {
                place: format!("gradients (GPU) at iteration {}: {bad} are NaN or Inf", self.iteration),
                index: 0,
                value: f64::NAN,
                hint: "lower the learning rate".into(),
            });
        }
        opt.update(&mut self.params, &self.grads)?;
        if let Some(t) = self.timer.as_mut() {
            t.mark("optimizer")?;
        }
        self.iteration += 1;
        Ok(())
    }

    /// Per-op timing from now on (on) or no more (off): CUDA events between the ops of every
    /// step, which then runs eagerly (not as a graph); `take_profile` reads them.
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

    /// CUDA graphs for the training steps on (the default, unless `BACKEI_CUDA_GRAPHS=0`) or off
    /// (every launch one by one).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = GraphBook::new(on);
    }

    /// How many step graphs this network holds, and why capturing failed (if it did) for the
    /// current shape: for tests and `backei info`.
    pub fn graph_status(&self) -> (usize, Option<String>) {
        (self.graphs.captured_count(), self.graphs.disabled.clone())
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

    /// The readout and the training step's loss inside the last spiking layer's kernels (on by
    /// default) or in kernels of their own (`loss.cu`): the same bits either way.
    pub fn set_fused_readout(&mut self, on: bool) {
        if on != self.fused_readout {
            self.fused_readout = on;
            self.invalidate_launches();
        }
    }

    /// The pooling after a v4 BackEI layer inside that layer's forward and backward (on by
    /// default: `StepSettings::fused_pool`) or in launches of its own (`pool.cu`): the same bits
    /// either way, and without ∂L/∂s stored.
    pub fn set_fused_pool(&mut self, on: bool) {
        self.change_settings(StepSettings { fused_pool: on, ..self.settings });
    }

    /// Whether the last layer computes the readout in its forward and, in a training step, the
    /// loss and ∂L/∂s in its backward: it must be a plain spiking layer (every network ends in
    /// one) with one neuron per class over all T, and some layer must have parameters (else no
    /// backward runs).
    fn readout_fused(&self) -> bool {
        let fusable = |l: &Layer| match &l.op {
            Op::Spike { layer, .. } => layer.fuses_readout() && l.t_out == self.spec.steps && l.out_len == self.classes,
            _ => false,
        };
        self.fused_readout && self.layers.last().is_some_and(fusable) && self.layers.iter().any(Layer::has_params)
    }

    /// The v4 kernels' compact saved state (on by default: z as a one-byte code, s as int8 where
    /// pooling reads it; `memory::StepSettings::compact`) or everything in f32: the same bits.
    pub fn set_compact_state(&mut self, on: bool) {
        self.change_settings(StepSettings { compact: on, ..self.settings });
    }

    /// The fused BackEI kernels the layers ask for (`$BACKEI_BACKEI_KERNEL` at construction); a
    /// layer whose shape a version cannot run falls back as its plan says.
    pub fn set_kernel_version(&mut self, version: KernelVersion) {
        self.change_settings(StepSettings { version, ..self.settings });
    }

    /// Bit-reproducible steps (`--deterministic`): every BackEI layer takes the plan without float
    /// atomics of its kernel version (`gpu::backei_layer::plan_deterministic`: v1 with the Separate
    /// weight-gradient reduction; v2/v3 with partial sums reduced in order); the other ops are
    /// cuBLAS GEMMs and kernels without atomics, deterministic on a given card.
    pub fn set_deterministic(&mut self, on: bool) {
        self.change_settings(StepSettings { deterministic: on, ..self.settings });
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

    /// The output [T][B][...] of layer `i` in the last forward, copied to the host. An output
    /// that only fed pooling or dropout lives in a shared slot that later layers reuse: asking
    /// for it is an error naming the layer.
    pub fn layer_output_to_host(&self, i: usize) -> Result<Vec<f32>> {
        if i >= self.layers.len() {
            return Err(config_err("layer", format!("layer {i} of {}", self.layers.len())));
        }
        if let Place::Slot { .. } = self.layers[i].out_place {
            return Err(config_err("layer", format!("layer {i}'s output is not kept after the forward (only the next layer reads it)")));
        }
        if let Op::Dropout { fused: true, .. } = self.layers[i].op {
            return Err(config_err("layer", format!("layer {i} (dropout) runs inside the pooling after it: its output is never stored")));
        }
        if let Some(k) = self.layers[i].window {
            let why = format!("layer {i} (a convolution) is run per --recompute window: it keeps {k} of its steps (drop --recompute or use cuBLAS to keep them all)");
            return Err(config_err("layer", why));
        }
        let input = self.input.as_ref().ok_or_else(|| missing("the input buffer"))?;
        let slots = [self.out_slots[0].as_ref(), self.out_slots[1].as_ref()];
        let v = source(&self.layers[..=i], input, &slots, self.shape.0)?;
        self.dev.stream.clone_dtoh(&v).map_err(cuda_err("reading a layer output"))
    }

    /// The memory plan of this network at a batch shape, under its settings.
    pub fn memory_plan(&self, batch: usize, t_in: usize) -> Result<MemoryPlan> {
        memory_plan(&self.spec, batch, self.spec.steps, t_in, &self.settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_readout_env_takes_1_and_0_and_refuses_the_rest_naming_the_fix() {
        for on in [None, Some(""), Some("1"), Some(" 1 ")] {
            assert!(fused_readout_from_env(on).unwrap(), "{on:?}");
        }
        assert!(!fused_readout_from_env(Some("0")).unwrap());
        let e = fused_readout_from_env(Some("yes")).unwrap_err().to_string();
        assert!(e.contains(FUSED_READOUT_ENV) && e.contains("`yes`") && e.contains("use 1") && e.contains("or 0"), "{e}");
        use super::super::memory::{fused_pool_from_env, FUSED_POOL_ENV};
        assert!(fused_pool_from_env(None).unwrap() && !fused_pool_from_env(Some("0")).unwrap());
        let e = fused_pool_from_env(Some("2")).unwrap_err().to_string();
        assert!(e.contains(FUSED_POOL_ENV) && e.contains("`2`") && e.contains("runs the pooling"), "{e}");
    }
}
