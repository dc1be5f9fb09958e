//! What a training step holds on the device, decided before anything is allocated: where every
//! buffer of `GpuNetwork` lives ([`buffer_plan`], which `GpuNetwork` allocates from) and what it
//! all adds up to ([`memory_plan`], which `backei info` prints). Pure host logic, no GPU needed.
//!
//! The lean layout:
//! - a layer's output is kept for the backward only where the next layer's backward reads its
//!   input (conv, linear, spiking); an output that only feeds pooling or dropout (whose backward
//!   does not read it: the dropout mask is drawn again from its key) lives in one of two shared
//!   forward slots (the second only while the first is still to be read);
//! - the input gradients (∂L/∂input of every layer, and the readout's ∂L/∂s) live in two shared
//!   slots used alternately along the backward: a layer's backward reads one and writes the other;
//! - each BackEI layer's buffers are its own launch plan's `BufferSizes` (the plan its
//!   `GpuBackEiLayer::prepare` allocates from), never a second formula.

use super::backei_layer::{plan_layer, CompactState, DeviceLimits, KernelVersion, LaunchPlan};
use super::backei_v4::V4Choices;
use super::conv::{ConvPlan, DEFAULT_WORKSPACE_BYTES};
use super::conv_halo::{self, halo_plan, HaloOp};
use super::device::CUBLAS_WORKSPACE_BYTES;
use super::dropout::DropoutKeys;
use super::gemm_tc::{self, FeedForward};
use super::loss::LossBuffers;
use super::optim::GpuOptimizer;
use crate::cpu::conv::ConvGeom;
use crate::error::{config_err, Result};
use crate::optim::OptimizerConfig;
use crate::precision::Precision;
use crate::spec::{FeedbackConfig, LayerPlan, LayerSpec, NetworkSpec, NeuronConfig};

/// Everything besides the network and the batch shape that decides what a step holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepSettings {
    pub precision: Precision,
    /// `--recompute K`: the BackEI layers keep v, g, z for windows of K steps and recompute the
    /// earlier windows in the backward (v4 kernels; `backei_layer::apply_recompute`).
    pub recompute: Option<usize>,
    /// `--deterministic`: the BackEI layers' deterministic plans.
    pub deterministic: bool,
    /// The BackEI kernels asked for (`$BACKEI_BACKEI_KERNEL`).
    pub version: KernelVersion,
    /// The device the plans are made for.
    pub limits: DeviceLimits,
    /// The feed-forward layers' GEMMs: cuBLAS or tensor cores (follows `precision` and
    /// `BACKEI_FEEDFORWARD`; see `with_precision`).
    pub feedforward: FeedForward,
    /// The v4 kernels' compact saved state (`backei_layer::CompactState`): z as a one-byte code,
    /// and s as int8 where pooling reads it. On by default; the same bits either way.
    pub compact: bool,
    /// A 2×2 pooling right after a v4 BackEI layer runs inside that layer's kernels: its forward in
    /// the layer's forward, its backward in the layer's backward (∂L/∂s never stored). On by
    /// default (`BACKEI_FUSED_POOL=0` turns it off); the same bits either way.
    pub fused_pool: bool,
    /// The tensor-core GEMMs may take the 256-thread tiles (`BACKEI_TC_TILES=big`, opt-in until a
    /// GPU run shows them correct and faster; `gemm_tc::gemm_plan_tiles`). The same bits either way.
    pub big_tiles: bool,
    /// The convolutions' forward and data gradient run on the window-staged kernels where they
    /// apply (`BACKEI_TC_CONV=halo`, `conv_halo::halo_plan`; opt-in until a GPU run shows them
    /// correct and faster). Other bits than the generic GEMM's, within the same tolerance.
    pub halo_convs: bool,
    /// The v4 BackEI layers' tiling and phase order (`BACKEI_V4_TILING`, `BACKEI_V4_SYNC`): every
    /// layer plans with these, so that its plan is the one this memory plan counts.
    pub v4: V4Choices,
}

/// Turns off the pooling fused into the v4 BackEI kernels (`=0`; the default `1` fuses it).
pub const FUSED_POOL_ENV: &str = "BACKEI_FUSED_POOL";

/// `BACKEI_FUSED_POOL`'s value: fused (unset, empty or 1) or not (0).
pub fn fused_pool_from_env(value: Option<&str>) -> Result<bool> {
    super::util::switch_from_env(FUSED_POOL_ENV, value, "a v4 BackEI layer runs the pooling after it", "the pooling's own launches")
}

impl StepSettings {
    /// The defaults (fp32, no recompute, not deterministic, the kernels `$BACKEI_BACKEI_KERNEL`
    /// names) on a device with `limits`.
    pub fn new(limits: DeviceLimits) -> Result<Self> {
        StepSettings {
            precision: Precision::Fp32,
            recompute: None,
            deterministic: false,
            version: KernelVersion::from_env()?,
            limits,
            feedforward: FeedForward::Cublas,
            compact: true,
            fused_pool: fused_pool_from_env(std::env::var(FUSED_POOL_ENV).ok().as_deref())?,
            big_tiles: gemm_tc::big_tiles_in_env()?,
            halo_convs: conv_halo::halo_from_env(std::env::var(conv_halo::CONV_ENV).ok().as_deref())?,
            v4: V4Choices::from_env()?,
        }
        .with_precision(Precision::Fp32)
    }

    /// These settings in `precision`, with the feed-forward path it takes (`FeedForward::from_env`).
    pub fn with_precision(self, precision: Precision) -> Result<Self> {
        Ok(StepSettings { precision, feedforward: FeedForward::from_env(precision)?, ..self })
    }

    /// Settings for sizing the CPU engine's state with the GPU's plan (the same tensors): fp32,
    /// v1 kernels, an H100's limits.
    pub fn cpu_proxy() -> Self {
        StepSettings {
            precision: Precision::Fp32,
            recompute: None,
            deterministic: false,
            version: KernelVersion::default(),
            limits: DeviceLimits::H100,
            feedforward: FeedForward::Cublas,
            compact: true,
            fused_pool: true,
            big_tiles: false,
            halo_convs: false,
            v4: V4Choices::default(),
        }
    }

    /// Refuses what the GPU engine cannot do, naming the fix.
    pub fn check_gpu(&self) -> Result<()> {
        super::backei_layer::check_recompute(self.recompute)
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

/// The gates of a spiking layer: the network's for a BackEI layer, none for a plain one.
pub fn spike_feedback(spec: &NetworkSpec, l: &LayerSpec) -> FeedbackConfig {
    if *l == LayerSpec::BackEi {
        spec.feedback
    } else {
        FeedbackConfig { back: false, ei: false, radius: 0, delay: 1 }
    }
}

/// The launch plan a spiking layer of `shape` with `neuron` runs at a batch shape under
/// `settings`: the plan `GpuBackEiLayer::prepare` makes (and allocates its buffers from).
/// `pooled`: the layer's output is read only by pooling ([`output_read_by_pool`]), whose kernels
/// take int8 spikes.
#[allow(clippy::too_many_arguments)]
pub fn spiking_plan(
    shape: [usize; 3],
    fb: &FeedbackConfig,
    neuron: &NeuronConfig,
    batch: usize,
    steps: usize,
    s: &StepSettings,
    pooled: bool,
) -> Result<LaunchPlan> {
    let compact = CompactState::of(neuron, s.compact, s.compact && pooled);
    plan_layer(shape, fb, batch, steps, &s.limits, s.version, s.precision, s.deterministic, s.recompute, compact, &s.v4)
}

/// Whether the 2×2 pooling after a spiking layer with buffers `before` runs inside that layer's
/// kernels (`StepSettings::fused_pool`, on the v4 kernels).
pub fn pools_in_spiking_layer(before: &LayerBuffers, settings: &StepSettings) -> bool {
    settings.fused_pool && before.spiking.as_ref().is_some_and(|p| p.v4.is_some())
}

/// Whether layer `i`'s output is read only by a 2×2 pooling, directly or through a dropout fused
/// into it: the GPU's pooling kernels read int8 spikes (`pool::forward` with `x_s8`,
/// `dropout::forward_pooled` with `x_s8`), so a v4 BackEI layer there writes its spikes as int8.
pub fn output_read_by_pool(plan: &[LayerPlan], ts: &[(usize, usize)], i: usize) -> bool {
    match plan.get(i + 1).map(|l| &l.spec) {
        Some(LayerSpec::AvgPool) => true,
        Some(LayerSpec::Dropout { .. }) => fuses_into_pool(plan, ts, i + 1),
        _ => false,
    }
}

/// Whether pooling layer `i` writes its output as int8 codes (`pool::PoolIo::S8ToQ8`): c = the sum
/// of the four (kept) spikes, whose value c · `pool::q8_factor` is the f32 output's exactly — a
/// quarter of the bytes (cifar10 at B = 100, T = 20: 0.32 GiB less). Where the input is a v4
/// layer's int8 spikes (`layers` holds the spiking plans: the compact state), a dropout between
/// scales by a power of two (else a kept spike's x·scale and the partial sums round, and one code
/// could not stand for every pattern), and what reads the output — through a flatten — is a
/// convolution or a linear layer on the tensor-core GEMMs, which read the codes
/// (`gemm_tc::XForm::Q8`; cuBLAS reads only f32).
pub fn pooled_as_codes(plan: &[LayerPlan], layers: &[LayerBuffers], i: usize, settings: &StepSettings) -> bool {
    if plan[i].spec != LayerSpec::AvgPool || !settings.compact || !matches!(settings.feedforward, FeedForward::TensorCore(_)) {
        return false;
    }
    let src = match i.checked_sub(1).map(|j| (&plan[j].spec, layers[j].fused)) {
        Some((LayerSpec::Dropout { p }, true)) => {
            if !super::dropout::scale_is_power_of_two(*p as f32) {
                return false;
            }
            i - 2
        }
        Some(_) => i - 1,
        None => return false,
    };
    let s8 = layers[src].spiking.as_ref().and_then(|p| p.v4.as_ref()).is_some_and(|v| v.s8);
    let reader = plan[i + 1..].iter().find(|l| l.spec != LayerSpec::Flatten).map(|l| &l.spec);
    s8 && matches!(reader, Some(LayerSpec::Conv { .. } | LayerSpec::Linear { .. }))
}

/// Where one buffer of the step lives (lengths in f32 values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Not allocated (nothing reads it).
    None,
    /// Its own allocation.
    Own(usize),
    /// The first `len` values of one of two shared slots.
    Slot { slot: usize, len: usize },
}

impl Place {
    pub fn len(&self) -> usize {
        match *self {
            Place::None => 0,
            Place::Own(len) | Place::Slot { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The buffers of one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBuffers {
    pub t_in: usize,
    pub t_out: usize,
    /// The output [T_out][B][out_len] of a conv, linear, pool or dropout layer (None for flatten
    /// and spiking layers: a spiking layer's output is among its own buffers).
    pub output: Place,
    /// ∂L/∂input [T_in][B][in_len], a gradient slot (None where no gradient flows further up).
    pub grad_in: Place,
    /// A spiking layer's launch plan (its buffers are `plan.buffers`).
    pub spiking: Option<LaunchPlan>,
    /// A dropout layer run fused into the pooling layer after it ([`fuses_into_pool`]): it has no
    /// output, and that pooling layer writes this layer's input gradient.
    pub fused: bool,
    /// A convolution recomputed per `--recompute` window ([`conv_output_window`]): its output
    /// holds this many steps, one window of the BackEI layer after it, instead of all T.
    pub window: Option<usize>,
    /// A pooling layer whose output is int8 codes of the pooled spikes ([`pooled_as_codes`]):
    /// `output` holds them in ⌈len/4⌉ f32 words.
    pub codes: bool,
}

/// Every buffer of a training step at one batch shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferPlan {
    pub batch: usize,
    pub steps: usize,
    pub t_in: usize,
    pub classes: usize,
    pub params: usize,
    pub layers: Vec<LayerBuffers>,
    /// The input batch [T_in][B][C][H][W].
    pub input: usize,
    /// ∂L/∂s of the last layer [T][B][classes], a gradient slot.
    pub upstream: Place,
    /// The two shared forward slots (outputs nothing reads in the backward).
    pub out_slots: [usize; 2],
    /// The two shared gradient slots.
    pub grad_slots: [usize; 2],
    /// The conv workspace: column buffer and transposed-output buffer (f32 values).
    pub conv_col: usize,
    pub conv_t: usize,
    /// Dropout layers (one key each).
    pub dropouts: usize,
    /// The tensor-core GEMMs' split-K partial sums (f32 values; 0 on the cuBLAS path).
    pub tc_partial: usize,
    /// The window-staged convolutions' prepared weights (u32 words; 0 unless `halo_convs`).
    pub halo_wprep: usize,
}

/// Whether layer `i` is a dropout layer that runs fused into the 2×2 pooling right after it
/// (`dropout::forward_pooled`: its output is never stored, nor the pooling's input gradient).
/// Its input must have all T steps (a T_in = 1 input would be broadcast first).
pub fn fuses_into_pool(plan: &[LayerPlan], ts: &[(usize, usize)], i: usize) -> bool {
    matches!(plan[i].spec, LayerSpec::Dropout { .. }) && plan.get(i + 1).is_some_and(|l| l.spec == LayerSpec::AvgPool) && ts[i].0 == ts[i].1
}

/// The window of K steps the output of layer `i` holds when it is a convolution recomputed per
/// `--recompute` window (FlashAttention's trade: recompute instead of store): a convolution over
/// every step (T_in = T) whose output only the v4 BackEI layer right after it reads, that layer
/// keeping windows of K < T steps. The network then runs the convolution for each window just
/// before the layer's launches of that window — forward, and again for the backward's recompute
/// of every window but the last — so its [T][B][N] output is never stored: K steps instead of T,
/// for one more convolution forward over T − K steps. Only on the tensor-core GEMMs, whose
/// convolution over a window gives the bits of the convolution over every step
/// (`gemm_tc::conv_forward_part`; cuBLAS makes no such promise), so the gradients stay those of
/// storing everything.
pub fn conv_output_window(plan: &[LayerPlan], layers: &[LayerBuffers], i: usize, steps: usize, settings: &StepSettings) -> Option<usize> {
    if !matches!(plan[i].spec, LayerSpec::Conv { .. }) || !matches!(settings.feedforward, FeedForward::TensorCore(_)) {
        return None;
    }
    if (layers[i].t_in, layers[i].t_out) != (steps, steps) {
        return None;
    }
    let next = layers.get(i + 1)?.spiking.as_ref()?;
    next.v4.as_ref()?;
    next.window.filter(|&k| k < steps)
}

/// Whether layer `i`'s backward reads its input (the output of the layer before it).
fn backward_reads_input(l: &LayerSpec) -> bool {
    matches!(l, LayerSpec::Conv { .. } | LayerSpec::Linear { .. } | LayerSpec::BackEi | LayerSpec::Spiking)
}

/// Refuses a batch and T whose memory plan would overflow `usize` (`backei info` printed 0.25 GiB
/// for usize::MAX). Every term of the plan is at most 64·T·B·W per layer, W the largest number of
/// values one sample has in a layer (a conv's column buffer included), plus the parameters and the
/// fixed workspaces, so checking that bound in u128 first keeps all the usize arithmetic exact
/// (the spiking layers' launch plans included).
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
        .and_then(|x| x.checked_add(16 * params + (DEFAULT_WORKSPACE_BYTES + CUBLAS_WORKSPACE_BYTES) as u128));
    match bound {
        Some(b) if b <= usize::MAX as u128 => Ok(()),
        _ => Err(config_err(
            "--batch-size/--steps",
            format!("batch {batch} at T = {steps}: the memory a training step needs does not fit in 64 bits"),
        )),
    }
}

/// Where every buffer of a training step of `spec` lives at batch `batch`, T = `steps`, an input
/// of `t_in` frames.
pub fn buffer_plan(spec: &NetworkSpec, batch: usize, steps: usize, t_in: usize, settings: &StepSettings) -> Result<BufferPlan> {
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
    let classes = spec.classes()?;
    let ts = layer_steps(&plan, steps, t_in);
    let n = plan.len();
    let mut layers = Vec::with_capacity(n);
    let (mut out_slots, mut grad_slots) = ([0usize; 2], [0usize; 2]);
    let (mut conv_col, mut conv_t) = (0usize, 0usize);
    let mut params = 0usize;
    // (slot, reader) of the last output put in a forward slot
    let mut last_transient: Option<(usize, usize)> = None;
    for (i, (lp, &(ti, to))) in plan.iter().zip(&ts).enumerate() {
        let [c, h, w] = lp.input;
        let out_len = to * batch * lp.output.iter().product::<usize>();
        let mut spiking = None;
        match lp.spec {
            LayerSpec::Conv { out_channels, kernel, padding } => {
                let g = ConvGeom::new(c, out_channels, h, w, kernel, padding);
                if settings.feedforward == FeedForward::Cublas {
                    let cp = ConvPlan::new(&g, ti * batch, DEFAULT_WORKSPACE_BYTES);
                    conv_col = conv_col.max(cp.col_floats);
                    conv_t = conv_t.max(cp.t_floats);
                }
                params += g.weight_len() + out_channels;
            }
            LayerSpec::Linear { out_features } => params += c * out_features + out_features,
            LayerSpec::BackEi | LayerSpec::Spiking => {
                let fb = spike_feedback(&spec, &lp.spec);
                let k = 2 * fb.radius + 1;
                params += (c * c * k * k + c) * (fb.back as usize + fb.ei as usize);
                let pooled = output_read_by_pool(&plan, &ts, i);
                spiking = Some(spiking_plan(lp.input, &fb, &spec.neuron, batch, steps, settings, pooled)?);
            }
            _ => {}
        }
        let fused = fuses_into_pool(&plan, &ts, i);
        let output = match lp.spec {
            LayerSpec::Flatten | LayerSpec::BackEi | LayerSpec::Spiking => Place::None,
            _ if fused => Place::None,
            // (a fused dropout's input is read by the pooling after it)
            _ => match (i + 1..n)
                .find(|&j| plan[j].spec != LayerSpec::Flatten)
                .map(|j| if fuses_into_pool(&plan, &ts, j) { j + 1 } else { j })
            {
                Some(j) if !backward_reads_input(&plan[j].spec) => {
                    // slot 0, unless the last output put in a slot is still to be read: by this
                    // very layer (pooling after dropout after pooling …)
                    let slot = match last_transient {
                        Some((slot, reader)) if reader == i => 1 - slot,
                        _ => 0,
                    };
                    last_transient = Some((slot, j));
                    out_slots[slot] = out_slots[slot].max(out_len);
                    Place::Slot { slot, len: out_len }
                }
                _ => Place::Own(out_len),
            },
        };
        layers.push(LayerBuffers { t_in: ti, t_out: to, output, grad_in: Place::None, spiking, fused, window: None, codes: false });
    }
    // pooled spikes that only the tensor-core GEMMs read, as int8 codes
    for i in 0..n {
        if pooled_as_codes(&plan, &layers, i, settings) {
            if let Place::Own(len) = layers[i].output {
                layers[i].output = Place::Own(len.div_ceil(4));
                layers[i].codes = true;
            }
        }
    }
    // convolutions recomputed per window hold one window of their output
    for i in 0..n {
        if let Some(k) = conv_output_window(&plan, &layers, i, steps, settings) {
            layers[i].window = Some(k);
            layers[i].output = Place::Own(k * batch * plan[i].output.iter().product::<usize>());
        }
    }
    // the gradients, in the order the backward writes them: the readout's, then the layers' from
    // the last to the first; a layer passes one on when a layer before it has parameters, and a
    // spiking layer always writes one
    let last_t = ts.last().map_or(t_in, |x| x.1);
    let upstream_len = last_t * batch * classes;
    grad_slots[0] = upstream_len;
    let upstream = Place::Slot { slot: 0, len: upstream_len };
    let has_params = |lp: &LayerPlan| match lp.spec {
        LayerSpec::Conv { .. } | LayerSpec::Linear { .. } => true,
        LayerSpec::BackEi => spec.feedback.back || spec.feedback.ei,
        _ => false,
    };
    let mut written = 1usize;
    for i in (0..n).rev() {
        let lp = &plan[i];
        let param_before = plan[..i].iter().any(has_params);
        let is_spike = matches!(lp.spec, LayerSpec::BackEi | LayerSpec::Spiking);
        // a pooling layer after a fused dropout writes the dropout's input gradient (below)
        let pool_of_fused = i > 0 && layers[i - 1].fused;
        // a pooling right after a v4 BackEI layer, or a dropout fused into a pooling there, has
        // its backward run inside that layer and writes nothing: the layer reads the pooling's
        // output gradient itself (the pooling after such a dropout is `pool_of_fused` already)
        let pool_in_spike = (lp.spec == LayerSpec::AvgPool || layers[i].fused) && i > 0 && pools_in_spiking_layer(&layers[i - 1], settings);
        if lp.spec != LayerSpec::Flatten && !pool_of_fused && !pool_in_spike && (param_before || is_spike) {
            let slot = written % 2;
            written += 1;
            let len = layers[i].t_in * batch * lp.input.iter().product::<usize>();
            grad_slots[slot] = grad_slots[slot].max(len);
            layers[i].grad_in = Place::Slot { slot, len };
            if layers[i].fused {
                layers[i + 1].grad_in = layers[i].grad_in;
            }
        }
    }
    // the tensor-core GEMMs' split-K partial sums: the largest any GEMM of the step asks for, from
    // the GEMMs' own descriptors (the data gradients only where a gradient flows further up)
    let (mut tc_partial, mut halo_wprep) = (0usize, 0usize);
    if let FeedForward::TensorCore(p) = settings.feedforward {
        for (lp, lb) in plan.iter().zip(&layers) {
            let [c, h, w] = lp.input;
            let rows = lb.t_in * batch;
            let descs = match lp.spec {
                LayerSpec::Conv { out_channels, kernel, padding } => {
                    let g = ConvGeom::new(c, out_channels, h, w, kernel, padding);
                    // the window-staged kernels (conv::forward_part, conv::backward_with): their
                    // prepared weights, and no split-K of the GEMMs they stand in for
                    let halo = |op: HaloOp, count: usize| {
                        settings.halo_convs.then(|| halo_plan(op, &g, count, p, false, &settings.limits)).flatten()
                    };
                    let halo_fwd = halo(HaloOp::Forward, lb.window.map_or(rows, |k| k * batch));
                    let halo_dgrad = if lb.grad_in.is_empty() { None } else { halo(HaloOp::BackwardData, rows) };
                    for h in [halo_fwd, halo_dgrad].into_iter().flatten() {
                        halo_wprep = halo_wprep.max(h.wprep_words);
                    }
                    if let (Some(k), None) = (lb.window, halo_fwd) {
                        // run per window, with the split-K of the whole (conv_forward_part)
                        let part =
                            gemm_tc::conv_forward_part(&g, rows, 0, k * batch, (0, 0, 0, 0), false, &settings.limits, settings.big_tiles).1;
                        tc_partial = tc_partial.max(part.partial);
                    }
                    vec![
                        (lb.window.is_none() && halo_fwd.is_none()).then(|| gemm_tc::conv_forward(&g, rows, 0, 0, 0, 0, false)),
                        Some(gemm_tc::conv_weight_grad(&g, rows, 0, 0, 0, 0, false)),
                        (!lb.grad_in.is_empty() && halo_dgrad.is_none()).then(|| gemm_tc::conv_backward_data(&g, rows, 0, 0, 0)),
                    ]
                }
                LayerSpec::Linear { out_features } => vec![
                    Some(gemm_tc::linear_forward(c, out_features, rows, 0, 0, 0, 0, false)),
                    Some(gemm_tc::linear_weight_grad(c, out_features, rows, 0, 0, 0, 0, false)),
                    (!lb.grad_in.is_empty()).then(|| gemm_tc::linear_backward_data(c, out_features, rows, 0, 0, 0)),
                ],
                _ => Vec::new(),
            };
            for d in descs.into_iter().flatten() {
                tc_partial = tc_partial.max(gemm_tc::partial_of(&d, &settings.limits, settings.big_tiles));
            }
        }
    }
    Ok(BufferPlan {
        batch,
        steps,
        t_in,
        classes,
        params,
        layers,
        tc_partial,
        halo_wprep,
        input: t_in * batch * spec.input.iter().product::<usize>(),
        upstream,
        out_slots,
        grad_slots,
        conv_col,
        conv_t,
        dropouts: plan.iter().filter(|l| matches!(l.spec, LayerSpec::Dropout { .. })).count(),
    })
}

/// Bytes of the network's counter word (the parameter check outside training steps).
pub const COUNTER_BYTES: usize = 4;

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
    /// Adam's m and v and its step scalars (SGD needs less).
    pub optimizer: usize,
    /// The input batch, the kept outputs of the conv, linear, pool and dropout layers, and the
    /// two forward slots.
    pub activations: usize,
    /// The spiking layers' buffers (their launch plans' `BufferSizes`): output, saved state,
    /// backward scratch.
    pub spiking: usize,
    /// The two gradient slots.
    pub gradients: usize,
    /// The conv workspace (cuBLAS path) or the tensor-core GEMMs' split-K sums and scales,
    /// cuBLAS's workspace, the readout, the loss buffers (with the step's status words), the
    /// dropout keys and a counter.
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

impl BufferPlan {
    /// The plan's bytes, by kind.
    pub fn memory(&self) -> MemoryPlan {
        let f = 4usize;
        let own: usize = self.layers.iter().map(|l| if let Place::Own(n) = l.output { n } else { 0 }).sum();
        MemoryPlan {
            batch: self.batch,
            steps: self.steps,
            t_in: self.t_in,
            params: f * self.params,
            grads: f * self.params.max(1),
            optimizer: GpuOptimizer::device_bytes(&OptimizerConfig::adam(1e-3), self.params),
            activations: f * (self.input.max(1) + own + self.out_slots.iter().sum::<usize>()),
            spiking: self.layers.iter().filter_map(|l| l.spiking.as_ref()).map(|s| s.buffers.total_bytes()).sum(),
            gradients: f * self.grad_slots.iter().sum::<usize>(),
            workspaces: f * (self.conv_col + self.conv_t + self.batch * self.classes)
                + gemm_tc::workspace_bytes(self.tc_partial)
                + 4 * self.halo_wprep
                + CUBLAS_WORKSPACE_BYTES
                + LossBuffers::device_bytes(self.batch, self.classes)
                + DropoutKeys::device_bytes(self.dropouts)
                + COUNTER_BYTES,
        }
    }
}

/// The device memory a training step of `spec` needs at batch `batch`, T = `steps` and an input
/// of `t_in` frames (1: direct encoding; T: rate coding, the larger), under `settings`.
pub fn memory_plan(spec: &NetworkSpec, batch: usize, steps: usize, t_in: usize, settings: &StepSettings) -> Result<MemoryPlan> {
    settings.check_gpu()?;
    Ok(buffer_plan(spec, batch, steps, t_in, settings)?.memory())
}

/// The largest batch ≤ `batch` whose training step fits `bytes` (None: not even one sample).
pub fn batch_that_fits(
    spec: &NetworkSpec,
    batch: usize,
    steps: usize,
    t_in: usize,
    bytes: usize,
    settings: &StepSettings,
) -> Option<usize> {
    let fits = |b: usize| memory_plan(spec, b, steps, t_in, settings).map(|p| p.total() <= bytes).unwrap_or(false);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::network::Network;
    use crate::gpu::backei_layer::{plan_deterministic, plan_version};
    use crate::spec::NeuronConfig;

    const GB40: usize = 40_000_000_000;

    /// fp32, v1, an H100
    fn h100() -> StepSettings {
        StepSettings::cpu_proxy()
    }

    fn four() -> [NetworkSpec; 4] {
        [NetworkSpec::mnist(), NetworkSpec::fashion_mnist(), NetworkSpec::cifar10(), NetworkSpec::nmnist()]
    }

    /// Every layer kind, and pooling and dropout chained (two outputs in the forward slots at once).
    fn chained() -> NetworkSpec {
        NetworkSpec {
            name: "chained".into(),
            input: [2, 16, 16],
            layers: vec![
                LayerSpec::Conv { out_channels: 4, kernel: 3, padding: 1 },
                LayerSpec::BackEi,
                LayerSpec::Dropout { p: 0.5 },
                LayerSpec::AvgPool,
                LayerSpec::Dropout { p: 0.2 },
                LayerSpec::AvgPool,
                LayerSpec::Flatten,
                LayerSpec::Dropout { p: 0.1 },
                LayerSpec::Linear { out_features: 10 },
                LayerSpec::Spiking,
            ],
            feedback: FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 },
            neuron: NeuronConfig::default(),
            steps: 5,
        }
    }

    #[test]
    fn memory_plan_of_the_four_networks() {
        for spec in four() {
            let direct = memory_plan(&spec, 100, 20, 1, &h100()).unwrap();
            let rate = memory_plan(&spec, 100, 20, 20, &h100()).unwrap();
            println!("{:<14} direct {direct}\n{:<14} rate   {rate}", spec.name, "");
            // the parameter count is the CPU engine's
            let n = Network::<f32>::new(&spec, 1).unwrap().num_params();
            assert_eq!(direct.params, 4 * n, "{}", spec.name);
            assert_eq!(direct.grads, 4 * n);
            assert_eq!(
                direct.optimizer,
                8 * n + 8 * 3 + 4,
                "Adam's m and v, three f64 scalars (learning rate, step, decoupled weight decay), a status word"
            );
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
            let double = memory_plan(&spec, 200, 20, 1, &h100()).unwrap();
            assert!(double.total() > direct.total() && double.total() < 2 * direct.total());
            assert!(direct.total() < GB40, "{} does not fit 40 GB: {direct}", spec.name);
        }
    }

    #[test]
    fn the_spiking_layers_count_exactly_their_launch_plans_in_every_setting() {
        for spec in four() {
            for (version, deterministic) in
                [(KernelVersion::V1, false), (KernelVersion::V1, true), (KernelVersion::V3, false), (KernelVersion::V3, true)]
            {
                let s = StepSettings { version, deterministic, ..h100() };
                let bp = buffer_plan(&spec, 50, 8, 1, &s).unwrap();
                let mut want = 0;
                for (lp, lb) in spec.plan().unwrap().iter().zip(&bp.layers) {
                    if matches!(lp.spec, LayerSpec::BackEi | LayerSpec::Spiking) {
                        let fb = spike_feedback(&spec, &lp.spec);
                        let p = if deterministic {
                            plan_deterministic(lp.input, &fb, 50, 8, &s.limits, version).unwrap()
                        } else {
                            plan_version(lp.input, &fb, 50, 8, &s.limits, version).unwrap()
                        };
                        assert_eq!(lb.spiking.as_ref(), Some(&p), "{} {:?}", spec.name, lp.spec);
                        want += p.buffers.total_bytes();
                    } else {
                        assert!(lb.spiking.is_none());
                    }
                }
                assert_eq!(bp.memory().spiking, want);
            }
        }
    }

    #[test]
    fn every_precision_is_accepted() {
        let spec = NetworkSpec::fashion_mnist();
        for precision in Precision::ALL {
            assert!(memory_plan(&spec, 100, 20, 1, &StepSettings { precision, ..h100() }).is_ok());
        }
    }

    /// `--recompute K`: the BackEI layers keep v, g, z for K steps plus v at each window's end
    /// (exactly `apply_recompute`'s buffers, added up by the plan); fashion-mnist at T = 100,
    /// B = 100 fits 8 GiB (issue 12's target) where keeping every step does not.
    #[test]
    fn recompute_keeps_a_window_of_state_and_fits_fashion_mnist_at_t_100_in_8_gib() {
        const GIB8: usize = 8 << 30;
        let spec = NetworkSpec::fashion_mnist();
        let all = memory_plan(&spec, 100, 100, 1, &h100()).unwrap();
        let bp = buffer_plan(&spec, 100, 100, 1, &h100()).unwrap();
        println!("fashion-mnist, every step kept: {all}");
        assert!(all.total() > GIB8, "{all}");
        for k in [1usize, 10, 20, 50] {
            let s = StepSettings { recompute: Some(k), ..h100() };
            let m = memory_plan(&spec, 100, 100, 1, &s).unwrap();
            let rp = buffer_plan(&spec, 100, 100, 1, &s).unwrap();
            println!("fashion-mnist, --recompute {k}: {m}");
            assert!(m.total() <= GIB8, "K = {k}: {m}");
            assert_eq!((m.params, m.activations, m.workspaces), (all.params, all.activations, all.workspaces));
            // (v4 runs the pooling inside the BackEI layers: ∂L/∂s is not stored)
            assert!(m.gradients < all.gradients, "K = {k}: {m} vs {all}");
            // what changes is each BackEI layer's v, g, z (K steps instead of T) and the checkpoints
            for (a, r) in bp.layers.iter().zip(&rp.layers) {
                let (Some(a), Some(r)) = (&a.spiking, &r.spiking) else { continue };
                if r.path == super::super::backei_layer::LayerPath::Plain {
                    assert_eq!(r.buffers.v, a.buffers.v, "a plain layer keeps every step");
                    continue;
                }
                let bn = r.buffers.dv;
                assert_eq!(r.window, Some(k));
                assert_eq!(r.version, KernelVersion::V4, "--recompute runs the v4 kernels");
                // z as its one-byte code (exact firing, rectangle surrogate: the default neuron)
                assert_eq!((r.buffers.v, r.buffers.g, r.buffers.z), (k * bn, k * bn, (k * bn).div_ceil(4)));
                assert!(r.v4.as_ref().is_some_and(|v| v.z_code));
                assert_eq!(r.buffers.v_ckpt, (100usize.div_ceil(k) - 1) * bn);
                // s is the next layer's input: every step, as int8 (pooling reads it)
                assert_eq!(r.buffers.out, a.buffers.out.div_ceil(4), "s: every step, a byte each");
            }
        }
        // K ≥ T is one window: the plan of keeping every step (on v4)
        let v4 = StepSettings { version: KernelVersion::V4, ..h100() };
        let once = memory_plan(&spec, 100, 20, 1, &StepSettings { recompute: Some(20), ..h100() }).unwrap();
        assert_eq!(once, memory_plan(&spec, 100, 20, 1, &v4).unwrap());
        let e = memory_plan(&spec, 100, 20, 1, &StepSettings { recompute: Some(0), ..h100() }).unwrap_err().to_string();
        assert!(e.contains("--recompute") && e.contains("at least 1"), "{e}");
    }

    /// v4 keeps z as a one-byte code exactly where the code is exact (exact firing and the
    /// rectangle surrogate, `z_code_is_exact`) and s as int8 where the firing is exact (every
    /// BackEI layer of the networks is read by pooling), a quarter of their bytes, counted by the
    /// plan; smooth firing keeps both in f32, the sigmoid and arctan surrogates keep z in f32, and
    /// so do v1–v3 and `compact: false`.
    #[test]
    fn v4_keeps_z_and_s_as_bytes_where_that_is_exact() {
        use crate::spec::{FiringMode, Surrogate};
        let v4 = StepSettings { version: KernelVersion::V4, ..h100() };
        // per BackEI layer: (z words, z coded, s words, s int8)
        let of = |spec: &NetworkSpec, s: &StepSettings| -> Vec<(usize, bool, usize, bool)> {
            let bp = buffer_plan(spec, 100, 20, 1, s).unwrap();
            let layers =
                bp.layers.iter().filter_map(|l| l.spiking.as_ref()).filter(|p| p.path != super::super::backei_layer::LayerPath::Plain);
            layers
                .map(|p| {
                    let (zc, s8) = p.v4.as_ref().map_or((false, false), |v| (v.z_code, v.s8));
                    (p.buffers.z, zc, p.buffers.out, s8)
                })
                .collect()
        };
        for spec in four() {
            let f32s = of(&spec, &h100());
            for (exact, z_exact, compact) in [(true, true, true), (true, false, true), (false, false, true), (true, true, false)] {
                let mut s2 = spec.clone();
                if !exact {
                    s2.neuron.mode = FiringMode::Smooth { k: 4.0 };
                }
                if !z_exact {
                    s2.neuron.surrogate = Surrogate::Atan { alpha: 2.0 };
                }
                let got = of(&s2, &StepSettings { compact, ..v4 });
                assert_eq!(got.len(), f32s.len());
                for (&(z, zc, out, s8), &(zf, zcf, outf, s8f)) in got.iter().zip(&f32s) {
                    assert!(!zcf && !s8f, "{}: v1 keeps f32", spec.name);
                    let what = format!("{} exact {exact} rectangle {z_exact} compact {compact}", spec.name);
                    assert_eq!((zc, s8), (compact && exact && z_exact, compact && exact), "{what}");
                    assert_eq!(z, if zc { zf.div_ceil(4) } else { zf }, "{what}: z");
                    assert_eq!(out, if s8 { outf.div_ceil(4) } else { outf }, "{what}: s");
                }
            }
        }
        let spec = NetworkSpec::fashion_mnist();
        let lean = memory_plan(&spec, 100, 20, 1, &v4).unwrap();
        let full = memory_plan(&spec, 100, 20, 1, &StepSettings { compact: false, ..v4 }).unwrap();
        let saved: usize =
            of(&spec, &h100()).iter().map(|&(z, _, out, _)| (z - z.div_ceil(4)) + (out - out.div_ceil(4))).sum::<usize>() * 4;
        assert_eq!(full.total() - lean.total(), saved, "the plan counts the bytes saved: {lean} vs {full}");
    }

    /// Pooled spikes as int8 codes (`pooled_as_codes`): on the v4 kernels (int8 spikes) and the
    /// tensor-core GEMMs, every pooling whose output a convolution or a linear layer reads keeps
    /// ⌈len/4⌉ words — fashion-mnist's two, cifar10's three (dropout 0.5: scale 2) — and the step
    /// holds exactly the bytes saved less; cuBLAS, v1 (f32 spikes), `compact: false` and a dropout
    /// whose scale is not a power of two keep f32.
    #[test]
    fn pooled_spikes_are_int8_codes_where_only_the_tensor_core_gemms_read_them() {
        use crate::gpu::gemm_tc::FeedForward;
        let tc = StepSettings { version: KernelVersion::V4, feedforward: FeedForward::TensorCore(Precision::Fp32), ..h100() };
        let coded = |spec: &NetworkSpec, s: &StepSettings| -> Vec<usize> {
            let bp = buffer_plan(spec, 100, 20, 1, s).unwrap();
            bp.layers.iter().enumerate().filter(|(_, l)| l.codes).map(|(i, _)| i).collect()
        };
        for (spec, pools) in
            [(NetworkSpec::fashion_mnist(), vec![2usize, 5]), (NetworkSpec::cifar10(), vec![3, 7, 11]), (NetworkSpec::mnist(), vec![2, 5])]
        {
            let plan = spec.plan().unwrap();
            assert_eq!(coded(&spec, &tc), pools, "{}", spec.name);
            let bp = buffer_plan(&spec, 100, 20, 1, &tc).unwrap();
            let f32s = buffer_plan(&spec, 100, 20, 1, &StepSettings { feedforward: FeedForward::Cublas, ..tc }).unwrap();
            let mut saved = 0;
            for &i in &pools {
                assert_eq!(plan[i].spec, LayerSpec::AvgPool);
                let len = 20 * 100 * plan[i].output.iter().product::<usize>();
                assert_eq!(bp.layers[i].output, Place::Own(len.div_ceil(4)), "{} layer {i}", spec.name);
                assert_eq!(f32s.layers[i].output, Place::Own(len), "{} layer {i} on cuBLAS", spec.name);
                saved += 4 * (len - len.div_ceil(4));
            }
            let same_gemms_f32 = buffer_plan(&spec, 100, 20, 1, &StepSettings { compact: false, ..tc }).unwrap();
            assert!(same_gemms_f32.layers.iter().all(|l| !l.codes), "{}: compact off", spec.name);
            // (compact off also keeps s and z in f32: compare the activations alone)
            assert_eq!(same_gemms_f32.memory().activations - bp.memory().activations, saved, "{}", spec.name);
            if spec.name == "cifar10" {
                println!("cifar10: the pooled spikes as int8 codes save {:.3} GiB", saved as f64 / (1u64 << 30) as f64);
                assert!(saved > 300 << 20, "{saved}");
            }
            assert!(coded(&spec, &StepSettings { version: KernelVersion::V1, ..tc }).is_empty(), "{}: v1", spec.name);
        }
        let mut odd = NetworkSpec::cifar10();
        for l in odd.layers.iter_mut() {
            if let LayerSpec::Dropout { p } = l {
                *p = 0.3;
            }
        }
        assert!(coded(&odd, &tc).is_empty(), "a dropout of 0.3 scales by 1/0.7: no exact code");
    }

    /// The v4 choices of a step (`BACKEI_V4_TILING`, `BACKEI_V4_SYNC`, `BACKEI_V4_PREFETCH`,
    /// `BACKEI_V4_CHUNKS`) reach every BackEI layer's plan in the memory plan — the plan each layer
    /// then makes with the same settings, which the network requires to be equal — and the memory
    /// they change is counted (the layers' scratch follows the tile: bias-sum carries, the dz
    /// ring); neighbour flags, prefetches and chunks that span samples change only the kernels.
    #[test]
    fn the_v4_choices_reach_every_backei_layers_plan_and_its_memory() {
        use crate::gpu::backei_v4::{V4Choices, V4TilingRequest};
        let spec = NetworkSpec::fashion_mnist();
        let v4 = StepSettings { version: KernelVersion::V4, ..h100() };
        let ask = V4Choices {
            tiling: Some(V4TilingRequest::parse("mt=2,dw=l2").unwrap()),
            neighbour_sync: true,
            prefetch_l2: true,
            span_samples: true,
        };
        let asked = StepSettings { v4: ask, ..v4 };
        let layers = |s: &StepSettings| -> Vec<crate::gpu::backei_v4::V4Plan> {
            buffer_plan(&spec, 100, 20, 1, s).unwrap().layers.iter().filter_map(|l| l.spiking.as_ref()?.v4.clone()).collect()
        };
        let (plain, chosen) = (layers(&v4), layers(&asked));
        assert_eq!(plain.len(), 2);
        assert_eq!(chosen.len(), 2);
        for (a, b) in plain.iter().zip(&chosen) {
            assert!(!a.neighbour_sync && b.neighbour_sync);
            assert!(!a.prefetch_l2 && b.prefetch_l2);
            assert!(!a.span_samples && b.span_samples);
            assert!(a.tiling.dw_on_chip && a.mt == 1, "{}", a.tiling);
            assert!(!b.tiling.dw_on_chip && b.mt == 2, "{}", b.tiling);
        }
        let (m0, m1) = (memory_plan(&spec, 100, 20, 1, &v4).unwrap(), memory_plan(&spec, 100, 20, 1, &asked).unwrap());
        assert_ne!(m0.spiking, m1.spiking, "the layers' scratch follows the tiling: {m0} vs {m1}");
        let flags = StepSettings { v4: V4Choices { tiling: None, neighbour_sync: true, prefetch_l2: true, span_samples: true }, ..v4 };
        assert_eq!(memory_plan(&spec, 100, 20, 1, &flags).unwrap().total(), m0.total());
    }

    /// The pooling after a v4 BackEI layer (directly, or after a dropout fused into it: cifar10)
    /// runs its backward inside the layer: the pooling and the dropout write no input gradient
    /// (∂L/∂s is never stored), the gradient slots alternate over the layers that do, and the plan
    /// shrinks by what the largest ∂L/∂s took; v1 and `fused_pool: false` keep it.
    #[test]
    fn a_pooling_inside_the_v4_layer_stores_no_spike_gradient() {
        let v4 = StepSettings { version: KernelVersion::V4, ..h100() };
        for spec in four() {
            let plan = spec.plan().unwrap();
            let fused = buffer_plan(&spec, 100, 20, 1, &v4).unwrap();
            let kept = buffer_plan(&spec, 100, 20, 1, &StepSettings { fused_pool: false, ..v4 }).unwrap();
            let v1 = buffer_plan(&spec, 100, 20, 1, &h100()).unwrap();
            let mut inside = 0;
            for i in 1..plan.len() {
                let pool = plan[i].spec == LayerSpec::AvgPool;
                let after_backei = pool && plan[i - 1].spec == LayerSpec::BackEi;
                let after_dropout = pool && i > 1 && fused.layers[i - 1].fused && plan[i - 2].spec == LayerSpec::BackEi;
                if after_backei || after_dropout {
                    inside += 1;
                    assert!(fused.layers[i].grad_in.is_empty(), "{} layer {i}: the pooling writes no gradient", spec.name);
                    assert!(!kept.layers[i].grad_in.is_empty() && !v1.layers[i].grad_in.is_empty());
                }
                if after_dropout {
                    assert!(fused.layers[i - 1].grad_in.is_empty(), "{} layer {}: the dropout writes no gradient", spec.name, i - 1);
                }
                // the slots alternate: no layer writes the slot it reads (a fused dropout's slot is
                // the one its pooling writes)
                let next = (i + 1..plan.len()).find(|&j| plan[j].spec != LayerSpec::Flatten && !fused.layers[j].grad_in.is_empty());
                let next = next.filter(|_| !fused.layers[i].fused);
                if let (Place::Slot { slot, .. }, Some(j)) = (fused.layers[i].grad_in, next) {
                    if let Place::Slot { slot: read, .. } = fused.layers[j].grad_in {
                        assert_ne!(slot, read, "{} layer {i} writes the slot it reads", spec.name);
                    }
                }
            }
            let (mf, mk) = (
                memory_plan(&spec, 100, 20, 1, &v4).unwrap(),
                memory_plan(&spec, 100, 20, 1, &StepSettings { fused_pool: false, ..v4 }).unwrap(),
            );
            assert_eq!(inside, 3 - (spec.name != "cifar10") as usize, "{}: every BackEI layer is followed by pooling", spec.name);
            assert!(mf.gradients < mk.gradients, "{}: {mf} vs {mk}", spec.name);
            assert_eq!((mf.spiking, mf.activations), (mk.spiking, mk.activations));
        }
    }

    /// With `--recompute K` on the tensor-core GEMMs, a convolution that feeds a BackEI layer over
    /// every step holds one window of K steps (it is run per window: `conv_output_window`), and
    /// nothing else changes: cifar10's second and third, fashion-mnist's second; never the first
    /// (direct encoding runs it once), never on cuBLAS, never without a window. This is what
    /// brings a cifar10 step at B = 100, T = 20 under 4 GiB.
    #[test]
    fn recompute_on_the_tensor_cores_keeps_one_window_of_the_convolutions_before_backei_layers() {
        use crate::gpu::gemm_tc::FeedForward;
        let tc = StepSettings { feedforward: FeedForward::TensorCore(Precision::Fp32), ..h100() };
        for (spec, windowed) in [(NetworkSpec::cifar10(), vec![4usize, 8]), (NetworkSpec::fashion_mnist(), vec![3])] {
            let plan = spec.plan().unwrap();
            for k in [1usize, 5, 7] {
                let s = StepSettings { recompute: Some(k), ..tc };
                let bp = buffer_plan(&spec, 100, 20, 1, &s).unwrap();
                let cublas = buffer_plan(&spec, 100, 20, 1, &StepSettings { recompute: Some(k), ..h100() }).unwrap();
                let whole = buffer_plan(&spec, 100, 20, 1, &tc).unwrap();
                let mut saved = 0;
                for (i, l) in bp.layers.iter().enumerate() {
                    let out: usize = plan[i].output.iter().product();
                    if windowed.contains(&i) {
                        assert_eq!(l.window, Some(k), "{} layer {i}", spec.name);
                        assert_eq!(l.output, Place::Own(k * 100 * out), "{} layer {i}", spec.name);
                        assert_eq!(whole.layers[i].output, Place::Own(20 * 100 * out));
                        saved += (20 - k) * 100 * out * 4;
                    } else {
                        assert_eq!(l.window, None, "{} layer {i}", spec.name);
                        // (--recompute runs v4, whose int8 spikes the pooling writes as codes; `whole`
                        // runs v1)
                        let f32_len = if l.codes { whole.layers[i].output.len().div_ceil(4) } else { whole.layers[i].output.len() };
                        assert_eq!(l.output.len(), f32_len, "{} layer {i}", spec.name);
                    }
                    assert_eq!(cublas.layers[i].window, None, "cuBLAS: every step kept");
                    assert_eq!(whole.layers[i].window, None, "no --recompute: every step kept");
                }
                let (m, mw) = (bp.memory(), buffer_plan(&spec, 100, 20, 1, &StepSettings { recompute: Some(20), ..tc }).unwrap().memory());
                assert_eq!(mw.activations - m.activations, saved, "{} K = {k}: {m} vs {mw}", spec.name);
            }
        }
        // the target: a cifar10 step at B = 100, T = 20 in at most 4 GiB
        let spec = NetworkSpec::cifar10();
        for (k, p) in [(4usize, Precision::Fp32), (4, Precision::Tf32), (5, Precision::Bf16)] {
            let s = StepSettings {
                recompute: Some(k),
                version: KernelVersion::V4,
                feedforward: FeedForward::TensorCore(p),
                precision: p,
                ..h100()
            };
            let m = memory_plan(&spec, 100, 20, 1, &s).unwrap();
            println!("cifar10, tensor-core GEMMs, {p}, --recompute {k}: {m}");
            assert!(m.total() <= 4 << 30, "--recompute {k}, {p}: {m}");
        }
    }

    /// The split-K sums are sized for the tiles the step's GEMMs take: with the 256-thread tiles
    /// allowed (`BACKEI_TC_TILES=big`, carried by `StepSettings::big_tiles`) the plans differ, and
    /// the workspace covers every large GEMM of the step under either set.
    #[test]
    fn split_k_sums_are_sized_for_the_tile_set_of_the_settings() {
        use crate::gpu::gemm_tc::{self, FeedForward};
        let tc = StepSettings { feedforward: FeedForward::TensorCore(Precision::Fp32), ..h100() };
        let mut differ = false;
        for (spec, gemms) in
            [(NetworkSpec::cifar10(), gemm_tc::cifar10_step_gemms()), (NetworkSpec::fashion_mnist(), gemm_tc::fashion_step_gemms())]
        {
            let mut sizes = Vec::new();
            for big_tiles in [false, true] {
                let s = StepSettings { big_tiles, ..tc };
                let bp = buffer_plan(&spec, 100, 20, 1, &s).unwrap();
                let need = gemms.iter().map(|(_, d)| gemm_tc::partial_of(d, &s.limits, big_tiles)).max().unwrap();
                println!("{} big tiles {big_tiles}: split-K sums {} values, the named GEMMs need {need}", spec.name, bp.tc_partial);
                assert!(bp.tc_partial >= need, "{} big tiles {big_tiles}: {} < {need}", spec.name, bp.tc_partial);
                sizes.push(bp.tc_partial);
            }
            differ |= sizes[0] != sizes[1];
        }
        assert!(differ, "the tile set changes no split-K plan of cifar10 or fashion-mnist");
    }

    /// With the window-staged convolutions on, the plan holds their prepared weights (as many
    /// words as the largest conv's plan asks for) in the workspaces, and drops the split-K sums of
    /// the GEMMs they stand in for: never more partial sums than without them; off, nothing.
    #[test]
    fn window_staged_convolutions_hold_their_weights_and_drop_the_replaced_partials() {
        let tc = StepSettings { feedforward: FeedForward::TensorCore(Precision::Fp32), ..h100() };
        for spec in [NetworkSpec::fashion_mnist(), NetworkSpec::cifar10()] {
            let off = buffer_plan(&spec, 100, 20, 1, &tc).unwrap();
            let on_settings = StepSettings { halo_convs: true, ..tc };
            let on = buffer_plan(&spec, 100, 20, 1, &on_settings).unwrap();
            assert_eq!(off.halo_wprep, 0, "{}", spec.name);
            // every conv with 16+ input channels has a plan; the largest prepared weights of them
            let mut largest = 0;
            for lp in spec.plan().unwrap() {
                if let LayerSpec::Conv { out_channels, kernel, padding } = lp.spec {
                    let [c, h, w] = lp.input;
                    let g = ConvGeom::new(c, out_channels, h, w, kernel, padding);
                    if let Some(p) = halo_plan(HaloOp::Forward, &g, 2000, Precision::Fp32, false, &tc.limits) {
                        largest = largest.max(p.wprep_words);
                    }
                }
            }
            println!(
                "{}: prepared weights {} words (largest forward plan {largest}), split-K sums {} -> {}",
                spec.name, on.halo_wprep, off.tc_partial, on.tc_partial
            );
            assert!(largest > 0 && on.halo_wprep >= largest, "{}: {} < {largest}", spec.name, on.halo_wprep);
            assert!(on.tc_partial <= off.tc_partial, "{}: {} > {}", spec.name, on.tc_partial, off.tc_partial);
            let (m_off, m_on) = (off.memory(), on.memory());
            let expected =
                m_off.workspaces - gemm_tc::workspace_bytes(off.tc_partial) + gemm_tc::workspace_bytes(on.tc_partial) + 4 * on.halo_wprep;
            assert_eq!(m_on.workspaces, expected, "{}", spec.name);
        }
    }

    /// A BackEI layer v4 cannot run (radius 3) cannot recompute: the error names the layer, why,
    /// and the fix.
    #[test]
    fn recompute_on_a_layer_v4_cannot_run_says_why() {
        let mut spec = NetworkSpec::mnist();
        spec.feedback.radius = 3;
        let e = memory_plan(&spec, 4, 20, 1, &StepSettings { recompute: Some(5), ..h100() }).unwrap_err().to_string();
        assert!(e.contains("--recompute") && e.contains("radius 3") && e.contains("drop --recompute"), "{e}");
    }

    /// The two rules the shared slots rely on, checked by walking the forward and the backward.
    fn check_slots(spec: &NetworkSpec, t_in: usize) {
        let bp = buffer_plan(spec, 3, spec.steps, t_in, &h100()).unwrap();
        let plan = spec.plan().unwrap();
        let n = plan.len();
        // the layer that reads layer i's output: the next one, or the pooling after a fused dropout
        let next = |i: usize| (i + 1..n).find(|&j| plan[j].spec != LayerSpec::Flatten).map(|j| if bp.layers[j].fused { j + 1 } else { j });
        for i in 0..n {
            let lb = &bp.layers[i];
            if let Place::Slot { slot, len } = lb.output {
                assert!(len <= bp.out_slots[slot]);
                // its one reader is the next layer, whose backward does not read it, and which
                // writes its own output elsewhere
                let j = next(i).expect("a slot output has a reader");
                assert!(!backward_reads_input(&plan[j].spec), "{}: layer {j} reads layer {i}'s slot in the backward", spec.name);
                assert_ne!(bp.layers[j].output, lb.output, "{}: layer {j} overwrites its input", spec.name);
                if let Place::Slot { slot: s2, .. } = bp.layers[j].output {
                    assert_ne!(s2, slot, "{}: layer {j} writes the slot it reads", spec.name);
                }
            }
            if matches!(lb.output, Place::Own(_)) {
                assert!(next(i).is_none_or(|j| backward_reads_input(&plan[j].spec)), "{}: layer {i} kept for nothing", spec.name);
            }
        }
        // backward: every layer reads ∂L/∂output from one gradient slot and writes ∂L/∂input to
        // the other
        let mut dy = bp.upstream;
        let first = plan.iter().position(|l| match l.spec {
            LayerSpec::Conv { .. } | LayerSpec::Linear { .. } => true,
            LayerSpec::BackEi => spec.feedback.back || spec.feedback.ei,
            _ => false,
        });
        for i in (first.unwrap_or(n)..n).rev() {
            // (a fused dropout's input gradient is written by the pooling after it)
            if plan[i].spec == LayerSpec::Flatten || bp.layers[i].fused {
                continue;
            }
            let dx = bp.layers[i].grad_in;
            if let (Place::Slot { slot: a, len: la }, Place::Slot { slot: b, len: lb }) = (dy, dx) {
                assert_ne!(a, b, "{}: layer {i} writes the gradient slot it reads", spec.name);
                assert!(la <= bp.grad_slots[a] && lb <= bp.grad_slots[b]);
            } else if i > first.unwrap() {
                panic!("{}: layer {i} has no gradient slots: {dy:?} → {dx:?}", spec.name);
            }
            dy = dx;
        }
    }

    #[test]
    fn shared_slots_never_overwrite_what_is_still_read() {
        for spec in four().into_iter().chain([chained()]) {
            for t_in in [1, spec.steps] {
                check_slots(&spec, t_in);
            }
        }
        // dropout fused into the pooling after it: the pooled maps go to the forward slots, two
        // at once where a fused pair feeds another
        let bp = buffer_plan(&chained(), 3, 5, 1, &h100()).unwrap();
        let fused: Vec<usize> = (0..bp.layers.len()).filter(|&i| bp.layers[i].fused).collect();
        assert_eq!(fused, vec![2, 4], "the dropouts before pooling (the one after flatten feeds a linear layer)");
        let slots: Vec<(usize, usize)> = bp.layers.iter().enumerate().filter_map(|(i, l)| slot_of(l.output).map(|s| (i, s))).collect();
        assert_eq!(slots, vec![(3, 0), (5, 1)]);
        assert!(matches!(bp.layers[7].output, Place::Own(_)));
        // a fused pair's pooling writes the dropout's input gradient; neither has another
        assert_eq!(bp.layers[3].grad_in, bp.layers[2].grad_in);
        assert!(bp.layers[2].output.is_empty());
        // a dropout of a one-frame input (direct encoding) is not fused: conv → dropout → pool
        // puts two outputs in the slots
        let unfusable = NetworkSpec {
            name: "unfusable".into(),
            input: [2, 12, 12],
            layers: vec![
                LayerSpec::Conv { out_channels: 4, kernel: 3, padding: 1 },
                LayerSpec::Dropout { p: 0.5 },
                LayerSpec::AvgPool,
                LayerSpec::Conv { out_channels: 5, kernel: 3, padding: 1 },
                LayerSpec::BackEi,
                LayerSpec::Flatten,
                LayerSpec::Linear { out_features: 10 },
                LayerSpec::Spiking,
            ],
            feedback: FeedbackConfig { back: true, ei: true, radius: 1, delay: 1 },
            neuron: NeuronConfig::default(),
            steps: 3,
        };
        check_slots(&unfusable, 1);
        check_slots(&unfusable, 3);
        let direct = buffer_plan(&unfusable, 2, 3, 1, &h100()).unwrap();
        assert!(!direct.layers[1].fused);
        assert_eq!(direct.layers.iter().filter_map(|l| slot_of(l.output)).collect::<Vec<_>>(), vec![0, 1]);
        assert!(buffer_plan(&unfusable, 2, 3, 3, &h100()).unwrap().layers[1].fused);
    }

    fn slot_of(p: Place) -> Option<usize> {
        match p {
            Place::Slot { slot, .. } => Some(slot),
            _ => None,
        }
    }

    #[test]
    fn cifar10_dropouts_are_fused_into_pooling_and_gradients_take_two_slots() {
        let spec = NetworkSpec::cifar10();
        let bp = buffer_plan(&spec, 100, 20, 1, &h100()).unwrap();
        let m = bp.memory();
        println!("{m}");
        // the three dropouts before pooling run fused into it: no dropout output anywhere
        assert_eq!(bp.layers.iter().filter(|l| l.fused).count(), 3);
        assert_eq!(bp.out_slots, [0, 0]);
        // the gradients: two slots, the larger the first dropout's ∂L/∂input (128×32×32)
        let first = 20 * 100 * 128 * 32 * 32;
        assert_eq!(bp.grad_slots.iter().max().copied(), Some(first));
        assert_eq!(m.gradients, 4 * bp.grad_slots.iter().sum::<usize>());
        assert!(m.gradients < 2 * 4 * first);
        // the first BackEI layer alone keeps s, v, g, z over 20×100×128×32×32 neurons
        assert!(m.spiking >= 4 * 4 * first, "{m}");
        assert!(m.total() < GB40, "{m}");
        // the tensor cores need no column buffer
        let tc = buffer_plan(&spec, 100, 20, 1, &StepSettings { feedforward: FeedForward::TensorCore(Precision::Bf16), ..h100() })
            .unwrap()
            .memory();
        println!("tensor cores: {tc}");
        assert!(tc.workspaces < m.workspaces, "{tc} vs {m}");
    }

    #[test]
    fn memory_plan_refuses_bad_shapes_and_finds_a_batch_that_fits() {
        let spec = NetworkSpec::cifar10();
        let s = h100();
        assert!(memory_plan(&spec, 0, 20, 1, &s).unwrap_err().to_string().contains("batch"));
        assert!(memory_plan(&spec, 10, 20, 3, &s).unwrap_err().to_string().contains("T_in = 3"));
        assert!(memory_plan(&spec, 10, 0, 1, &s).is_err());
        let one = memory_plan(&spec, 1, 20, 1, &s).unwrap().total();
        let b = batch_that_fits(&spec, 100, 20, 1, 4_000_000_000, &s).unwrap();
        assert!((1..100).contains(&b));
        assert!(memory_plan(&spec, b, 20, 1, &s).unwrap().total() <= 4_000_000_000);
        assert!(memory_plan(&spec, b + 1, 20, 1, &s).unwrap().total() > 4_000_000_000);
        assert_eq!(batch_that_fits(&spec, 100, 20, 1, one - 1, &s), None);
        assert_eq!(batch_that_fits(&spec, 100, 20, 1, usize::MAX / 2, &s), Some(100));
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
