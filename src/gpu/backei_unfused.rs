//! The UNFUSED BackEI layer: the baseline that shows what fusion buys. A few launches per time
//! step, the gate convolutions through cuBLAS (`gpu::conv`: im2col + one SGEMM over the batch),
//! pointwise kernels in between (`cuda/backei_unfused.cu`, whose header has the math). The
//! same interface as the fused [`GpuBackEiLayer`](super::backei_layer::GpuBackEiLayer): flat
//! parameter / gradient device buffers addressed by [`BackEiSlots`], the input current
//! [T_in][B][C][H][W] with T_in ∈ {1, T}, the output s [T][B][..], ∂I out, weight gradients
//! ACCUMULATED. Twins: `src/cpu/backei_layer.rs` (the reference), `cuda/backei_unfused.cu`.
//!
//! The launch schedule is a pure function ([`UnfusedPlan::new`]: a list of [`Op`]s per pass),
//! so the unit tests below execute it on the CPU with the CPU convolutions and compare with the
//! CPU layer — the order of the steps, the flags, the delay ring's slots are checked without a GPU.
//!
//! Per step t forward: [`Op::GateConv`] (a_t = W_b ⊛ s_{t−D} + b_b, back and t ≥ D),
//! [`Op::Integrate`] (g, v; and with ei off also o, s, u), [`Op::EiConv`] (z_t = W_e ⊛ v_t + b_e),
//! [`Op::Fire`] (s, u; ei on). Backward, t = T−1..0: [`Op::BwdPoint`] (dz, dv's pointwise part;
//! with ei off also ∂I, du, da), [`Op::EiGrad`] (W_e's conv backward: dW_e, db_e, dvc = W_eᵀ ⊛ dz),
//! [`Op::BwdInput`] (dv = dvp + dvc → ∂I, du, da), [`Op::GateGrad`] (W_b's conv backward: dW_b,
//! db_b, and W_bᵀ ⊛ da into the feedback ring's slot of step t − D) or [`Op::GateBiasGrad`]
//! (t < D: db_b only). The feedback of step t − D is kept in ring slot (t − D) mod D = t mod D:
//! written at step t, read by step t − D's `BwdPoint`, and no step in between uses that slot.

use super::backei_layer::{check_backward_args, check_forward_input, check_slots, impl_gpu_layer, validate, BackEiSlots, NeuronParams};
use super::conv::{self, ConvPlan, ConvWorkspace, DEFAULT_WORKSPACE_BYTES};
use super::device::GpuDevice;
use super::util::{cuda_err, grid};
use crate::cpu::conv::ConvGeom;
use crate::error::{config_err, shape_err, BackeiError, Result};
use crate::spec::{FeedbackConfig, NeuronConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use std::ops::Range;
use std::sync::Arc;

/// One step of the unfused schedule (t is the time step; `src` the step whose output feeds a gate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// a_t = W_b ⊛ s_src + b_b into g_t (cuBLAS), src = t − D.
    GateConv { t: usize, src: usize },
    /// `unfused_integrate_f32`: g_t = σ(a_t) (a_t = b_b unless `a_ready`), v_t = λ·u + g_t·I_t;
    /// u is read when `has_u`; with `finish` (ei off) also s_t = o_t and u_t.
    Integrate { t: usize, a_ready: bool, has_u: bool, finish: bool },
    /// z_t = W_e ⊛ v_t + b_e (cuBLAS).
    EiConv { t: usize },
    /// `unfused_fire_f32`: s_t = sign(z_t)·o_t, u_t = v_t·(1 − o_t).
    Fire { t: usize },
    /// `unfused_bwd_point_f32`: ds = ∂L/∂s_t (+ the ring's `fb_slot`), dz, dvp; du read when
    /// `has_du`; with `finish` (ei off) also ∂I, du, da. `first`: the first step of the pass
    /// (t = T−1), which initialises a T_in = 1 input gradient instead of adding to it.
    BwdPoint { t: usize, fb_slot: Option<usize>, has_du: bool, finish: bool, first: bool },
    /// W_e's conv backward at step t: dW_e += dz ⋆ v_t, db_e += Σ dz, dvc = W_eᵀ ⊛ dz.
    EiGrad { t: usize },
    /// `unfused_bwd_input_f32`: dv = dvp + dvc → ∂I_t, du, da.
    BwdInput { t: usize, first: bool },
    /// W_b's conv backward: dW_b += da ⋆ s_src, db_b += Σ da, ring[slot] = W_bᵀ ⊛ da.
    GateGrad { t: usize, src: usize, slot: usize },
    /// db_b += Σ da (t < D: the gate saw no spikes, only its bias).
    GateBiasGrad { t: usize },
}

/// Device buffer lengths (f32 elements) of the unfused layer for one batch shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnfusedBuffers {
    /// s [T][B][N]
    pub out: usize,
    /// v [T][B][N]
    pub v: usize,
    /// g [T][B][N] (back; holds a_t between the conv and the integrate kernel)
    pub g: usize,
    /// z [T][B][N] (ei)
    pub z: usize,
    /// the membrane u [B][N] (forward state)
    pub u: usize,
    /// λ·dv_{t+1} [B][N] (backward state)
    pub du: usize,
    /// dz [B][N] (ei)
    pub dz: usize,
    /// dv's pointwise part [B][N] (ei)
    pub dvp: usize,
    /// W_eᵀ ⊛ dz [B][N] (ei)
    pub dvc: usize,
    /// da [B][N] (back)
    pub da: usize,
    /// the feedback ring [D][B][N] (back and D < T)
    pub ring: usize,
}

impl UnfusedBuffers {
    pub fn total_bytes(&self) -> usize {
        4 * (self.out + self.v + self.g + self.z + self.u + self.du + self.dz + self.dvp + self.dvc + self.da + self.ring)
    }
}

/// The unfused layer's schedule and buffers for one batch shape (a pure function of the shape,
/// the switches, the batch shape and the conv workspace's cap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnfusedPlan {
    pub batch: usize,
    pub steps: usize,
    /// The C→C gate convolution (k = 2r + 1, padding r).
    pub gate: ConvGeom,
    /// How one step's gate conv over the B samples is chunked (None: no gate).
    pub conv: Option<ConvPlan>,
    pub buffers: UnfusedBuffers,
    /// Slots of the feedback ring (D when back and D < T, else 0).
    pub ring_slots: usize,
    pub forward: Vec<Op>,
    pub backward: Vec<Op>,
}

impl UnfusedPlan {
    pub fn new(shape: [usize; 3], fb: &FeedbackConfig, batch: usize, steps: usize, workspace_bytes: usize) -> Result<UnfusedPlan> {
        validate(shape, fb, batch, steps)?;
        let [c, h, w] = shape;
        let k = 2 * fb.radius + 1;
        let gate = ConvGeom::new(c, c, h, w, k, fb.radius);
        let gated = fb.back || fb.ei;
        let bn = batch * c * h * w;
        let all = steps * bn;
        let (back, ei, d) = (fb.back, fb.ei, fb.delay);
        let ring_slots = if back && d < steps { d } else { 0 };
        let on = |b: bool, n: usize| if b { n } else { 0 };
        let buffers = UnfusedBuffers {
            out: all,
            v: all,
            g: on(back, all),
            z: on(ei, all),
            u: bn,
            du: bn,
            dz: on(ei, bn),
            dvp: on(ei, bn),
            dvc: on(ei, bn),
            da: on(back, bn),
            ring: ring_slots * bn,
        };
        let mut forward = Vec::new();
        for t in 0..steps {
            let a_ready = back && t >= d;
            if a_ready {
                forward.push(Op::GateConv { t, src: t - d });
            }
            forward.push(Op::Integrate { t, a_ready, has_u: t > 0, finish: !ei });
            if ei {
                forward.push(Op::EiConv { t });
                forward.push(Op::Fire { t });
            }
        }
        let mut backward = Vec::new();
        for t in (0..steps).rev() {
            let first = t + 1 == steps;
            let fb_slot = if back && t + d < steps { Some(t % d) } else { None };
            backward.push(Op::BwdPoint { t, fb_slot, has_du: !first, finish: !ei, first });
            if ei {
                backward.push(Op::EiGrad { t });
                backward.push(Op::BwdInput { t, first });
            }
            if back {
                backward.push(if t >= d { Op::GateGrad { t, src: t - d, slot: t % d } } else { Op::GateBiasGrad { t } });
            }
        }
        let conv = if gated { Some(ConvPlan::new(&gate, batch, workspace_bytes)) } else { None };
        Ok(UnfusedPlan { batch, steps, gate, conv, buffers, ring_slots, forward, backward })
    }

    /// Kernel launches (cuBLAS GEMMs included) of the forward and of the backward pass.
    pub fn launches(&self) -> (usize, usize) {
        let chunks = self.conv.map_or(0, |p| p.chunks);
        let count = |ops: &[Op]| {
            ops.iter()
                .map(|op| match op {
                    // im2col, GEMM, bias + transpose
                    Op::GateConv { .. } | Op::EiConv { .. } => 3 * chunks,
                    // bias_grad, then per chunk im2col, transpose, GEMM dW, GEMM dcol, col2im
                    Op::EiGrad { .. } | Op::GateGrad { .. } => 1 + 5 * chunks,
                    _ => 1,
                })
                .sum()
        };
        (count(&self.forward), count(&self.backward))
    }
}

/// Calls `f` with two disjoint mutable views of `buf` (the ranges must not overlap; checked).
fn with_two_mut<R>(
    buf: &mut CudaSlice<f32>,
    a: Range<usize>,
    b: Range<usize>,
    f: impl FnOnce(&mut CudaViewMut<f32>, &mut CudaViewMut<f32>) -> Result<R>,
) -> Result<R> {
    let bad = || shape_err("BackEI gradient slots", "two disjoint ranges inside the buffer", format!("{a:?} and {b:?}"));
    if a.end <= b.start {
        let mut whole = buf.try_slice_mut(a.start..b.end).ok_or_else(bad)?;
        let (mut x, mut rest) = whole.split_at_mut(a.len());
        let (_, mut y) = rest.split_at_mut(b.start - a.end);
        f(&mut x, &mut y)
    } else if b.end <= a.start {
        let mut whole = buf.try_slice_mut(b.start..a.end).ok_or_else(bad)?;
        let (mut y, mut rest) = whole.split_at_mut(b.len());
        let (_, mut x) = rest.split_at_mut(a.start - b.end);
        f(&mut x, &mut y)
    } else {
        Err(bad())
    }
}

/// A device buffer of `n` floats, or None for n = 0.
fn alloc(dev: &GpuDevice, n: usize) -> Result<Option<CudaSlice<f32>>> {
    if n == 0 {
        return Ok(None);
    }
    // SAFETY: every element is written by a kernel (or a conv) before it is read: the schedule
    // reads u only when has_u, du only when has_du, a ring slot only after its GateGrad.
    let b = unsafe { dev.stream.alloc::<f32>(n) }.map_err(|e| {
        BackeiError::Cuda(format!("allocating {} MiB for an unfused BackEI layer: {e:?} (reduce the batch or T)", (n * 4) >> 20))
    })?;
    Ok(Some(b))
}

/// `buf[r]` as a view, or an error naming the buffer (never a panic).
fn part<'a>(buf: &'a Option<CudaSlice<f32>>, r: Range<usize>, name: &str) -> Result<CudaView<'a, f32>> {
    buf.as_ref()
        .and_then(|b| b.try_slice(r.clone()))
        .ok_or_else(|| BackeiError::Cuda(format!("unfused BackEI layer: buffer {name} lacks {r:?}")))
}

/// `buf[r]` as a mutable view, or an error naming the buffer.
fn part_mut<'a>(buf: &'a mut Option<CudaSlice<f32>>, r: Range<usize>, name: &str) -> Result<CudaViewMut<'a, f32>> {
    buf.as_mut()
        .and_then(|b| b.try_slice_mut(r.clone()))
        .ok_or_else(|| BackeiError::Cuda(format!("unfused BackEI layer: buffer {name} lacks {r:?}")))
}

fn view_of<'a>(v: &'a CudaView<'a, f32>, r: Range<usize>, name: &str) -> Result<CudaView<'a, f32>> {
    v.try_slice(r.clone()).ok_or_else(|| shape_err(format!("unfused BackEI layer: {name}"), format!("elements {r:?}"), v.len().to_string()))
}

/// The unfused BackEI layer (see the module's documentation).
pub struct UnfusedBackEiLayer {
    pub dev: Arc<GpuDevice>,
    pub feedback: FeedbackConfig,
    pub neuron: NeuronConfig,
    /// [C, H, W]
    pub shape: [usize; 3],
    /// The conv workspace of the gate convolutions (cap: `ws.max_bytes`).
    pub ws: ConvWorkspace,
    /// The plan of the current batch shape (after `prepare` or `forward`).
    pub plan: Option<UnfusedPlan>,
    t_in: usize,
    /// s [T][B][N] of the last forward.
    pub out: Option<CudaSlice<f32>>,
    /// v [T][B][N] of the last forward.
    pub v: Option<CudaSlice<f32>>,
    /// g [T][B][N] (back on).
    pub g: Option<CudaSlice<f32>>,
    /// z [T][B][N] (ei on).
    pub z: Option<CudaSlice<f32>>,
    /// State and backward scratch (public so that tests can poison them).
    pub u: Option<CudaSlice<f32>>,
    pub du: Option<CudaSlice<f32>>,
    pub dz: Option<CudaSlice<f32>>,
    pub dvp: Option<CudaSlice<f32>>,
    pub dvc: Option<CudaSlice<f32>>,
    pub da: Option<CudaSlice<f32>>,
    pub ring: Option<CudaSlice<f32>>,
    /// Stands in for a buffer a kernel's flags say it never touches.
    dummy: CudaSlice<f32>,
}

const MODULE: &str = "backei_unfused";

impl UnfusedBackEiLayer {
    pub fn new(dev: &Arc<GpuDevice>, shape: [usize; 3], feedback: FeedbackConfig, neuron: &NeuronConfig) -> Result<Self> {
        validate(shape, &feedback, 1, 1)?;
        let dummy = dev.stream.alloc_zeros::<f32>(1).map_err(cuda_err("allocating"))?;
        Ok(UnfusedBackEiLayer {
            dev: dev.clone(),
            feedback,
            neuron: *neuron,
            shape,
            ws: ConvWorkspace::new(DEFAULT_WORKSPACE_BYTES),
            plan: None,
            t_in: 0,
            out: None,
            v: None,
            g: None,
            z: None,
            u: None,
            du: None,
            dz: None,
            dvp: None,
            dvc: None,
            da: None,
            ring: None,
            dummy,
        })
    }

    /// Neurons per sample.
    pub fn neurons(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of W_b (and of W_e): C·C·(2r+1)².
    pub fn gate_weight_len(&self) -> usize {
        let k = 2 * self.feedback.radius + 1;
        self.shape[0] * self.shape[0] * k * k
    }

    /// Plans and sizes every buffer for a batch shape (a no-op when unchanged).
    pub fn prepare(&mut self, batch: usize, steps: usize) -> Result<&UnfusedPlan> {
        let stale = self.plan.as_ref().is_none_or(|p| p.batch != batch || p.steps != steps);
        if stale {
            let p = UnfusedPlan::new(self.shape, &self.feedback, batch, steps, self.ws.max_bytes)?;
            let b = p.buffers;
            self.plan = None;
            (self.out, self.v, self.g, self.z) = (None, None, None, None);
            (self.u, self.du, self.dz, self.dvp, self.dvc, self.da, self.ring) = (None, None, None, None, None, None, None);
            self.out = alloc(&self.dev, b.out)?;
            self.v = alloc(&self.dev, b.v)?;
            self.g = alloc(&self.dev, b.g)?;
            self.z = alloc(&self.dev, b.z)?;
            self.u = alloc(&self.dev, b.u)?;
            self.du = alloc(&self.dev, b.du)?;
            self.dz = alloc(&self.dev, b.dz)?;
            self.dvp = alloc(&self.dev, b.dvp)?;
            self.dvc = alloc(&self.dev, b.dvc)?;
            self.da = alloc(&self.dev, b.da)?;
            self.ring = alloc(&self.dev, b.ring)?;
            self.plan = Some(p);
        }
        self.plan.as_ref().ok_or_else(|| BackeiError::Cuda("unfused BackEI layer: no plan".into()))
    }

    /// All T steps for a batch; the output s [T][B][C][H][W] is then `self.output()`.
    pub fn forward(
        &mut self,
        params: &CudaSlice<f32>,
        slots: &BackEiSlots,
        input: &CudaView<f32>,
        t_in: usize,
        batch: usize,
        steps: usize,
    ) -> Result<()> {
        let n = self.neurons();
        check_forward_input(t_in, batch, steps, n, input.len())?;
        let plan = self.prepare(batch, steps)?.clone();
        check_slots(self.shape, &self.feedback, slots, params.len(), "parameter")?;
        // a rejected call leaves no half-made output behind: t_in is set only once checked
        self.t_in = t_in;
        let np = NeuronParams::from_config(&self.neuron);
        let (back, c, hw) = (self.feedback.back, self.shape[0] as i32, (self.shape[1] * self.shape[2]) as i32);
        let bn = batch * n;
        let step = |t: usize| t * bn..(t + 1) * bn;
        let in_step = |t: usize| if t_in == 1 { 0..bn } else { step(t) };
        let stream = self.dev.stream.clone();
        let f_int = self.dev.kernels.function(MODULE, "unfused_integrate_f32")?;
        let f_fire = self.dev.kernels.function(MODULE, "unfused_fire_f32")?;
        let bnl = bn as i64;
        let cfg = grid(bn);
        let gate = plan.gate;
        let p_slot = |i: usize| params.try_slice(slots[i].clone()).ok_or_else(|| config_err("slots", "a slot outside the parameters"));
        for op in &plan.forward {
            match *op {
                Op::GateConv { t, src } => {
                    let x = part(&self.out, step(src), "s")?;
                    let mut y = part_mut(&mut self.g, step(t), "g")?;
                    conv::forward(&self.dev, &mut self.ws, &gate, batch, &p_slot(0)?, &p_slot(1)?, &x, &mut y)?;
                }
                Op::Integrate { t, a_ready, has_u, finish } => {
                    let d = || self.dummy.as_view();
                    let i_t = view_of(input, in_step(t), "input current")?;
                    let b_b = if back { p_slot(1)? } else { d() };
                    let g_t = if back { part(&self.g, step(t), "g")? } else { d() };
                    let v_t = part(&self.v, step(t), "v")?;
                    let u = part(&self.u, 0..bn, "u")?;
                    let s_t = if finish { part(&self.out, step(t), "s")? } else { d() };
                    let (back, a_ready, has_u, finish) = (back as i32, a_ready as i32, has_u as i32, finish as i32);
                    // SAFETY: the argument list matches unfused_integrate_f32; every view holds bn
                    // elements or is the dummy the flags say is never touched. g_t, v_t, u, s_t are
                    // written through views of distinct buffers; nothing else runs meanwhile.
                    unsafe {
                        stream
                            .launch_builder(&f_int)
                            .arg(&i_t)
                            .arg(&b_b)
                            .arg(&g_t)
                            .arg(&v_t)
                            .arg(&u)
                            .arg(&s_t)
                            .arg(&bnl)
                            .arg(&c)
                            .arg(&hw)
                            .arg(&back)
                            .arg(&a_ready)
                            .arg(&has_u)
                            .arg(&finish)
                            .arg(&np)
                            .launch(cfg)
                    }
                    .map_err(cuda_err("launching unfused_integrate_f32"))?;
                }
                Op::EiConv { t } => {
                    let x = part(&self.v, step(t), "v")?;
                    let mut y = part_mut(&mut self.z, step(t), "z")?;
                    conv::forward(&self.dev, &mut self.ws, &gate, batch, &p_slot(2)?, &p_slot(3)?, &x, &mut y)?;
                }
                Op::Fire { t } => {
                    let v_t = part(&self.v, step(t), "v")?;
                    let z_t = part(&self.z, step(t), "z")?;
                    let u = part(&self.u, 0..bn, "u")?;
                    let s_t = part(&self.out, step(t), "s")?;
                    // SAFETY: the argument list matches unfused_fire_f32; every view holds bn elements.
                    unsafe { stream.launch_builder(&f_fire).arg(&v_t).arg(&z_t).arg(&u).arg(&s_t).arg(&bnl).arg(&np).launch(cfg) }
                        .map_err(cuda_err("launching unfused_fire_f32"))?;
                }
                other => return Err(BackeiError::Cuda(format!("unfused BackEI layer: {other:?} in the forward schedule"))),
            }
        }
        Ok(())
    }

    /// BPTT: ∂L/∂s [T][B][..] in, ∂L/∂I out ([T_in][B][..], summed over t when T_in = 1),
    /// parameter gradients ACCUMULATED into `grads` at `slots`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        params: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        slots: &BackEiSlots,
        input: &CudaView<f32>,
        t_in: usize,
        grad_out: &CudaView<f32>,
        grad_in: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let plan = self.plan.clone().ok_or_else(|| config_err("backward", "BackEI layer backward called before forward"))?;
        let (batch, steps, n) = (plan.batch, plan.steps, self.neurons());
        check_backward_args(
            self.shape,
            &self.feedback,
            slots,
            (batch, steps, t_in),
            self.t_in,
            grad_out.len(),
            grad_in.len(),
            input.len(),
            (params.len(), grads.len()),
        )?;
        let bn = batch * n;
        let np = NeuronParams::from_config(&self.neuron);
        let (back, ei) = (self.feedback.back, self.feedback.ei);
        let (c, hw) = (self.shape[0], self.shape[1] * self.shape[2]);
        let step = |t: usize| t * bn..(t + 1) * bn;
        let in_step = |t: usize| if t_in == 1 { 0..bn } else { step(t) };
        let stream = self.dev.stream.clone();
        let f_point = self.dev.kernels.function(MODULE, "unfused_bwd_point_f32")?;
        let f_input = self.dev.kernels.function(MODULE, "unfused_bwd_input_f32")?;
        let bnl = bn as i64;
        let cfg = grid(bn);
        let gate = plan.gate;
        let acc = (t_in == 1) as i32;
        let p_slot = |i: usize| params.try_slice(slots[i].clone()).ok_or_else(|| config_err("slots", "a slot outside the parameters"));
        for op in &plan.backward {
            match *op {
                Op::BwdPoint { t, fb_slot, has_du, finish, first } => {
                    let d = || self.dummy.as_view();
                    let go = view_of(grad_out, step(t), "∂L/∂s")?;
                    let fb = match fb_slot {
                        Some(k) => part(&self.ring, step(k), "feedback ring")?,
                        None => d(),
                    };
                    let v_t = part(&self.v, step(t), "v")?;
                    let z_t = if ei { part(&self.z, step(t), "z")? } else { d() };
                    let du = part(&self.du, 0..bn, "du")?;
                    let dz = if ei { part(&self.dz, 0..bn, "dz")? } else { d() };
                    let dvp = if finish { d() } else { part(&self.dvp, 0..bn, "dvp")? };
                    let i_t = if finish { view_of(input, in_step(t), "input current")? } else { d() };
                    let g_t = if finish && back { part(&self.g, step(t), "g")? } else { d() };
                    let di = if finish {
                        grad_in
                            .try_slice(in_step(t))
                            .ok_or_else(|| shape_err("∂L/∂I", format!("{}", t_in * bn), grad_in.len().to_string()))?
                    } else {
                        d()
                    };
                    let da = if finish && back { part(&self.da, 0..bn, "da")? } else { d() };
                    let (back_, ei_) = (back as i32, ei as i32);
                    let (has_fb, has_du, finish, first) = (fb_slot.is_some() as i32, has_du as i32, finish as i32, first as i32);
                    // SAFETY: the argument list matches unfused_bwd_point_f32; every view holds bn
                    // elements or is the dummy the flags say is never touched; du, dz, dvp, ∂I, da
                    // are written through views of distinct buffers; nothing else runs meanwhile.
                    unsafe {
                        stream
                            .launch_builder(&f_point)
                            .arg(&go)
                            .arg(&fb)
                            .arg(&v_t)
                            .arg(&z_t)
                            .arg(&du)
                            .arg(&dz)
                            .arg(&dvp)
                            .arg(&i_t)
                            .arg(&g_t)
                            .arg(&di)
                            .arg(&da)
                            .arg(&bnl)
                            .arg(&back_)
                            .arg(&ei_)
                            .arg(&has_fb)
                            .arg(&has_du)
                            .arg(&finish)
                            .arg(&acc)
                            .arg(&first)
                            .arg(&np)
                            .launch(cfg)
                    }
                    .map_err(cuda_err("launching unfused_bwd_point_f32"))?;
                }
                Op::EiGrad { t } => {
                    let w = p_slot(2)?;
                    let x = part(&self.v, step(t), "v")?;
                    let dy = part(&self.dz, 0..bn, "dz")?;
                    let mut dx = part_mut(&mut self.dvc, 0..bn, "dvc")?;
                    let (dev, ws) = (&self.dev, &mut self.ws);
                    with_two_mut(grads, slots[2].clone(), slots[3].clone(), |dw, db| {
                        conv::backward(dev, ws, &gate, batch, &w, &x, &dy, dw, db, Some(&mut dx))
                    })?;
                }
                Op::BwdInput { t, first } => {
                    let d = || self.dummy.as_view();
                    let dvp = part(&self.dvp, 0..bn, "dvp")?;
                    let dvc = part(&self.dvc, 0..bn, "dvc")?;
                    let i_t = view_of(input, in_step(t), "input current")?;
                    let g_t = if back { part(&self.g, step(t), "g")? } else { d() };
                    let di = grad_in
                        .try_slice(in_step(t))
                        .ok_or_else(|| shape_err("∂L/∂I", format!("{}", t_in * bn), grad_in.len().to_string()))?;
                    let du = part(&self.du, 0..bn, "du")?;
                    let da = if back { part(&self.da, 0..bn, "da")? } else { d() };
                    let (back_, first) = (back as i32, first as i32);
                    // SAFETY: the argument list matches unfused_bwd_input_f32; every view holds bn
                    // elements or is the dummy the flags say is never touched.
                    unsafe {
                        stream
                            .launch_builder(&f_input)
                            .arg(&dvp)
                            .arg(&dvc)
                            .arg(&i_t)
                            .arg(&g_t)
                            .arg(&di)
                            .arg(&du)
                            .arg(&da)
                            .arg(&bnl)
                            .arg(&back_)
                            .arg(&acc)
                            .arg(&first)
                            .arg(&np)
                            .launch(cfg)
                    }
                    .map_err(cuda_err("launching unfused_bwd_input_f32"))?;
                }
                Op::GateGrad { t: _, src, slot } => {
                    let w = p_slot(0)?;
                    let x = part(&self.out, step(src), "s")?;
                    let dy = part(&self.da, 0..bn, "da")?;
                    let mut dx = part_mut(&mut self.ring, step(slot), "feedback ring")?;
                    let (dev, ws) = (&self.dev, &mut self.ws);
                    with_two_mut(grads, slots[0].clone(), slots[1].clone(), |dw, db| {
                        conv::backward(dev, ws, &gate, batch, &w, &x, &dy, dw, db, Some(&mut dx))
                    })?;
                }
                Op::GateBiasGrad { t: _ } => {
                    let dy = part(&self.da, 0..bn, "da")?;
                    let mut db = grads.try_slice_mut(slots[1].clone()).ok_or_else(|| config_err("slots", "b_b outside the gradients"))?;
                    conv::bias_grad(&self.dev, batch, c, hw, &dy, &mut db)?;
                }
                other => return Err(BackeiError::Cuda(format!("unfused BackEI layer: {other:?} in the backward schedule"))),
            }
        }
        Ok(())
    }

    /// s of the last forward.
    pub fn output(&self) -> Result<&CudaSlice<f32>> {
        self.out.as_ref().ok_or_else(|| config_err("output", "the BackEI layer has no output yet: run forward first"))
    }
}

impl_gpu_layer!(UnfusedBackEiLayer);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams};
    use crate::cpu::conv as cconv;
    use crate::cpu::neuron::Neuron;
    use crate::spec::{FiringMode, Surrogate};

    /// Executes a plan's schedule on the CPU, op for op as the GPU does (the pointwise ops are
    /// the kernels' expressions, the convs the CPU engine's), so the unit tests check the
    /// schedule — order, flags, ring slots — against the reference without a GPU.
    struct Sim {
        out: Vec<f32>,
        v: Vec<f32>,
        g: Vec<f32>,
        z: Vec<f32>,
        u: Vec<f32>,
        du: Vec<f32>,
        dz: Vec<f32>,
        dvp: Vec<f32>,
        dvc: Vec<f32>,
        da: Vec<f32>,
        ring: Vec<f32>,
    }

    fn nan(n: usize) -> Vec<f32> {
        vec![f32::NAN; n]
    }

    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    fn simulate(
        plan: &UnfusedPlan,
        shape: [usize; 3],
        fb: &FeedbackConfig,
        nr: &Neuron<f32>,
        params: &[f32],
        slots: &BackEiSlots,
        input: &[f32],
        t_in: usize,
        grad_out: &[f32],
        grads: &mut [f32],
        grad_in: &mut [f32],
    ) -> Sim {
        let b = plan.buffers;
        // everything poisoned: a read before a write shows up as NaN in the results
        let mut s = Sim {
            out: nan(b.out),
            v: nan(b.v),
            g: nan(b.g),
            z: nan(b.z),
            u: nan(b.u),
            du: nan(b.du),
            dz: nan(b.dz),
            dvp: nan(b.dvp),
            dvc: nan(b.dvc),
            da: nan(b.da),
            ring: nan(b.ring),
        };
        let bn = b.u;
        let (c, hw) = (shape[0], shape[1] * shape[2]);
        let st = |t: usize| t * bn..(t + 1) * bn;
        let ist = |t: usize| if t_in == 1 { 0..bn } else { st(t) };
        let p = |i: usize| &params[slots[i].clone()];
        let g = &plan.gate;
        let (back, ei) = (fb.back, fb.ei);
        for op in &plan.forward {
            match *op {
                Op::GateConv { t, src } => {
                    let x = s.out[st(src)].to_vec();
                    cconv::forward(g, p(0), p(1), &x, &mut s.g[st(t)]);
                }
                Op::Integrate { t, a_ready, has_u, finish } => {
                    for i in 0..bn {
                        let mut cur = input[ist(t)][i];
                        if back {
                            let a = if a_ready { s.g[t * bn + i] } else { p(1)[(i / hw) % c] };
                            let gt = 1.0 / (1.0 + (-a).exp());
                            s.g[t * bn + i] = gt;
                            cur *= gt;
                        }
                        let u0 = if has_u { s.u[i] } else { 0.0 };
                        let v = nr.leak * u0 + cur;
                        s.v[t * bn + i] = v;
                        if finish {
                            let o = nr.fire(v - nr.threshold);
                            s.u[i] = v * (1.0 - o);
                            s.out[t * bn + i] = o;
                        }
                    }
                }
                Op::EiConv { t } => {
                    let x = s.v[st(t)].to_vec();
                    cconv::forward(g, p(2), p(3), &x, &mut s.z[st(t)]);
                }
                Op::Fire { t } => {
                    for i in 0..bn {
                        let v = s.v[t * bn + i];
                        let o = nr.fire(v - nr.threshold);
                        s.u[i] = v * (1.0 - o);
                        s.out[t * bn + i] = nr.sign(s.z[t * bn + i]) * o;
                    }
                }
                other => panic!("{other:?} in the forward schedule"),
            }
        }
        let split =
            |grads: &mut [f32], w: Range<usize>, bb: Range<usize>| -> (Vec<f32>, Vec<f32>) { (grads[w].to_vec(), grads[bb].to_vec()) };
        let input_at = |s: &mut Sim, grad_in: &mut [f32], t: usize, i: usize, dv: f32, first: bool| {
            let dcur = if back { dv * s.g[t * bn + i] } else { dv };
            let di = &mut grad_in[ist(t)][i];
            if t_in == 1 && !first {
                *di += dcur;
            } else {
                *di = dcur;
            }
            s.du[i] = nr.leak * dv;
            if back {
                let gg = s.g[t * bn + i];
                s.da[i] = dv * input[ist(t)][i] * gg * (1.0 - gg);
            }
        };
        for op in &plan.backward {
            match *op {
                Op::BwdPoint { t, fb_slot, has_du, finish, first } => {
                    for i in 0..bn {
                        let v = s.v[t * bn + i];
                        let x = v - nr.threshold;
                        let o = nr.fire(x);
                        let ds = match fb_slot {
                            Some(k) => grad_out[t * bn + i] + s.ring[k * bn + i],
                            None => grad_out[t * bn + i],
                        };
                        let dui = if has_du { s.du[i] } else { 0.0 };
                        let mut d_o = ds;
                        if ei {
                            let z = s.z[t * bn + i];
                            d_o = ds * nr.sign(z);
                            s.dz[i] = ds * o * nr.sign_grad(z);
                        }
                        d_o -= dui * v;
                        let dv = dui * (1.0 - o) + d_o * nr.fire_grad(x);
                        if finish {
                            input_at(&mut s, grad_in, t, i, dv, first);
                        } else {
                            s.dvp[i] = dv;
                        }
                    }
                }
                Op::EiGrad { t } => {
                    let (mut dw, mut db) = split(grads, slots[2].clone(), slots[3].clone());
                    cconv::backward_weights(g, &s.v[st(t)], &s.dz, &mut dw, &mut db);
                    grads[slots[2].clone()].copy_from_slice(&dw);
                    grads[slots[3].clone()].copy_from_slice(&db);
                    cconv::backward_data(g, p(2), &s.dz, &mut s.dvc, false);
                }
                Op::BwdInput { t, first } => {
                    for i in 0..bn {
                        let dv = s.dvp[i] + s.dvc[i];
                        input_at(&mut s, grad_in, t, i, dv, first);
                    }
                }
                Op::GateGrad { t: _, src, slot } => {
                    let (mut dw, mut db) = split(grads, slots[0].clone(), slots[1].clone());
                    cconv::backward_weights(g, &s.out[st(src)], &s.da, &mut dw, &mut db);
                    grads[slots[0].clone()].copy_from_slice(&dw);
                    grads[slots[1].clone()].copy_from_slice(&db);
                    cconv::backward_data(g, p(0), &s.da, &mut s.ring[st(slot)], false);
                }
                Op::GateBiasGrad { t: _ } => {
                    for i in 0..bn {
                        grads[slots[1].start + (i / hw) % c] += s.da[i];
                    }
                }
                other => panic!("{other:?} in the backward schedule"),
            }
        }
        s
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
        let floor = (1e-2 * scale).max(1e-6);
        a.iter().zip(b).fold(0f64, |e, (x, y)| e.max((*x as f64 - *y as f64).abs() / (y.abs() as f64).max(floor)))
    }

    /// A deterministic pseudo-random f32 in [lo, hi).
    fn rand_vec(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|i| lo + (hi - lo) * crate::rng::uniform24(seed, 0, i as u64)).collect()
    }

    fn check(shape: [usize; 3], fb: FeedbackConfig, neuron: NeuronConfig, batch: usize, steps: usize, t_in: usize, ws_bytes: usize) {
        let [ch, ..] = shape;
        let n: usize = shape.iter().product();
        let k = 2 * fb.radius + 1;
        let wl = ch * ch * k * k;
        // [pad 3][W_b][b_b][W_e][b_e][pad 2], as tests/gpu_backei_layer.rs
        let mut at = 3;
        let mut slot = |len: usize, on: bool| {
            let r = at..at + if on { len } else { 0 };
            at = r.end;
            r
        };
        let slots: BackEiSlots = [slot(wl, fb.back), slot(ch, fb.back), slot(wl, fb.ei), slot(ch, fb.ei)];
        let total = at + 2;
        let bound = 1.5 / ((ch * k * k) as f32).sqrt();
        let params = rand_vec(1, total, -bound, bound);
        let grads0 = rand_vec(2, total, -0.1, 0.1);
        let input = rand_vec(3, t_in * batch * n, -0.6, 1.6);
        let gout = rand_vec(4, steps * batch * n, -1.0, 1.0);
        let mut cpu = BackEiLayer::<f32>::new(shape, fb, &neuron);
        let p = BackEiParams {
            w_b: &params[slots[0].clone()],
            b_b: &params[slots[1].clone()],
            w_e: &params[slots[2].clone()],
            b_e: &params[slots[3].clone()],
        };
        cpu.forward(&p, &input, t_in, batch, steps).unwrap();
        let mut g_cpu = grads0.clone();
        let mut gin_cpu = vec![0f32; input.len()];
        {
            let (_, rest) = g_cpu.split_at_mut(slots[0].start);
            let (wb, rest) = rest.split_at_mut(slots[0].len());
            let (bb, rest) = rest.split_at_mut(slots[1].len());
            let (we, rest) = rest.split_at_mut(slots[2].len());
            let (be, _) = rest.split_at_mut(slots[3].len());
            cpu.backward(&p, &mut BackEiGrads { w_b: wb, b_b: bb, w_e: we, b_e: be }, &input, t_in, &gout, &mut gin_cpu).unwrap();
        }
        let plan = UnfusedPlan::new(shape, &fb, batch, steps, ws_bytes).unwrap();
        let nr = Neuron::<f32>::new(&neuron);
        let mut g_sim = grads0.clone();
        let mut gin_sim = vec![f32::NAN; input.len()];
        let s = simulate(&plan, shape, &fb, &nr, &params, &slots, &input, t_in, &gout, &mut g_sim, &mut gin_sim);
        let name = format!("{shape:?} {fb:?} {:?} B {batch} T {steps} T_in {t_in}", neuron.mode);
        for (what, a, b) in
            [("s", &s.out, &cpu.out), ("v", &s.v, &cpu.v), ("g", &s.g, &cpu.g), ("z", &s.z, &cpu.z), ("∂I", &gin_sim, &gin_cpu)]
        {
            assert!(a.iter().all(|x| x.is_finite()), "{name}: {what} read an unwritten value");
            let e = rel(a, b);
            assert!(e < 1e-4, "{name}: {what} differs by {e:.2e}");
        }
        assert_eq!(g_sim[..3], g_cpu[..3], "{name}: padding touched");
        assert_eq!(g_sim[total - 2..], g_cpu[total - 2..], "{name}: padding touched");
        for (j, r) in slots.iter().enumerate() {
            let e = rel(&g_sim[r.clone()], &g_cpu[r.clone()]);
            assert!(g_sim[r.clone()].iter().all(|x| x.is_finite()) && e < 1e-4, "{name}: gradient {j} differs by {e:.2e}");
        }
    }

    #[test]
    fn the_schedule_run_on_the_cpu_matches_the_reference_for_every_switch() {
        let smooth = NeuronConfig { mode: FiringMode::Smooth { k: 4.0 }, ..Default::default() };
        let exact = NeuronConfig::default();
        let atan = NeuronConfig { surrogate: Surrogate::Atan { alpha: 2.0 }, leak: 0.5, threshold: 0.3, ..Default::default() };
        for neuron in [smooth, exact, atan] {
            for (back, ei) in [(true, true), (true, false), (false, true), (false, false)] {
                for (r, d) in [(1, 1), (2, 3), (1, 7)] {
                    for t_in in [1, 5] {
                        let fb = FeedbackConfig { back, ei, radius: r, delay: d };
                        check([3, 7, 9], fb, neuron, 2, 5, t_in, DEFAULT_WORKSPACE_BYTES);
                    }
                }
            }
        }
        // T = 1, a single channel, and a workspace so small that every conv runs one sample per chunk
        check([1, 3, 3], FeedbackConfig::default(), smooth, 3, 1, 1, DEFAULT_WORKSPACE_BYTES);
        check([4, 5, 6], FeedbackConfig { delay: 2, ..Default::default() }, smooth, 3, 6, 6, 16);
    }

    #[test]
    fn the_schedule_has_the_documented_shape() {
        let fb = FeedbackConfig { back: true, ei: true, radius: 1, delay: 2 };
        let p = UnfusedPlan::new([2, 3, 3], &fb, 4, 4, DEFAULT_WORKSPACE_BYTES).unwrap();
        assert_eq!(
            p.forward[..6],
            [
                Op::Integrate { t: 0, a_ready: false, has_u: false, finish: false },
                Op::EiConv { t: 0 },
                Op::Fire { t: 0 },
                Op::Integrate { t: 1, a_ready: false, has_u: true, finish: false },
                Op::EiConv { t: 1 },
                Op::Fire { t: 1 },
            ]
        );
        assert_eq!(p.forward[6], Op::GateConv { t: 2, src: 0 });
        assert_eq!(p.forward.len(), 4 * 3 + 2);
        assert_eq!(
            p.backward[..4],
            [
                Op::BwdPoint { t: 3, fb_slot: None, has_du: false, finish: false, first: true },
                Op::EiGrad { t: 3 },
                Op::BwdInput { t: 3, first: true },
                Op::GateGrad { t: 3, src: 1, slot: 1 },
            ]
        );
        // step 1 reads the feedback step 3 wrote into slot 1; step 0 that of step 2 (slot 0)
        assert!(p.backward.contains(&Op::BwdPoint { t: 1, fb_slot: Some(1), has_du: true, finish: false, first: false }));
        assert!(p.backward.contains(&Op::BwdPoint { t: 0, fb_slot: Some(0), has_du: true, finish: false, first: false }));
        assert_eq!(p.backward.last(), Some(&Op::GateBiasGrad { t: 0 }));
        assert_eq!(p.ring_slots, 2);
        let bn = 4 * 18;
        assert_eq!(
            p.buffers,
            UnfusedBuffers { out: 4 * bn, v: 4 * bn, g: 4 * bn, z: 4 * bn, u: bn, du: bn, dz: bn, dvp: bn, dvc: bn, da: bn, ring: 2 * bn }
        );
        // one chunk: forward 2 convs × 3 + 2 kernels per step, minus the two missing W_b convs
        assert_eq!(p.conv.unwrap().chunks, 1);
        assert_eq!(p.launches(), (4 * 8 - 2 * 3, 4 * (1 + 6 + 1 + 6) - 2 * 6 + 2));
        // the plain layer: one kernel per step each way, no ring, no conv
        let plain = FeedbackConfig { back: false, ei: false, radius: 0, delay: 1 };
        let p = UnfusedPlan::new([5, 1, 1], &plain, 2, 3, DEFAULT_WORKSPACE_BYTES).unwrap();
        assert_eq!((p.forward.len(), p.backward.len(), p.conv, p.ring_slots, p.launches()), (3, 3, None, 0, (3, 3)));
        // D ≥ T: the feedback never arrives, no ring and no W_b conv
        let p = UnfusedPlan::new([2, 3, 3], &FeedbackConfig { delay: 4, ..fb }, 1, 4, DEFAULT_WORKSPACE_BYTES).unwrap();
        assert_eq!(p.ring_slots, 0);
        assert!(!p.forward.iter().any(|o| matches!(o, Op::GateConv { .. })));
        assert!(!p.backward.iter().any(|o| matches!(o, Op::GateGrad { .. })));
    }

    #[test]
    fn bad_settings_and_slots_are_errors() {
        let fb = FeedbackConfig::default();
        assert!(UnfusedPlan::new([4, 4, 4], &fb, 0, 5, 1 << 20).is_err());
        assert!(UnfusedPlan::new([4, 4, 4], &fb, 2, 0, 1 << 20).is_err());
        assert!(UnfusedPlan::new([4, 4, 4], &FeedbackConfig { delay: 0, ..fb }, 2, 5, 1 << 20).is_err());
        let slots: BackEiSlots = [0..36, 36..38, 38..74, 74..76];
        assert!(check_slots([2, 3, 3], &fb, &slots, 76, "parameter").is_ok());
        assert!(check_slots([2, 3, 3], &fb, &slots, 75, "parameter").unwrap_err().to_string().contains("b_e"));
        let bad: BackEiSlots = [0..35, 36..38, 38..74, 74..76];
        assert!(check_slots([2, 3, 3], &fb, &bad, 76, "parameter").unwrap_err().to_string().contains("W_b"));
        let overlap: BackEiSlots = [0..36, 35..37, 38..74, 74..76];
        assert!(check_slots([2, 3, 3], &fb, &overlap, 76, "parameter").unwrap_err().to_string().contains("disjoint"));
        // a bias slot BEFORE its weights is fine
        let swapped: BackEiSlots = [2..38, 0..2, 38..74, 74..76];
        assert!(check_slots([2, 3, 3], &fb, &swapped, 76, "parameter").is_ok());
    }
}
