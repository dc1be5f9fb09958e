//! The CPU engine behind a handle: `backei::cpu::backei_layer::BackEiLayer` in f32 and f64 (made
//! at first use of each), run on the caller's host memory.
//!
//! The CPU layer keeps its saved state in its own vectors; a call copies v, g, z (and s) out to
//! the caller's tensors after the forward and back in before the backward, so the handle carries
//! nothing from one call to the next. The copies are O(T·B·N) against the layer's O(T·B·N·C·k²)
//! convolutions.

use crate::error::{invalid, Result};
use crate::layer::{check_ptr, BatchShape, Dtype, LayerConfig, Sizes, Workspace};
use backei::cpu::backei_layer::{BackEiGrads, BackEiLayer, BackEiParams};
use backei::Real;
use std::slice;

/// The element types the CPU engine runs in.
pub trait HostReal: Real {
    const DTYPE: Dtype;
    fn layer(layers: &mut CpuLayers) -> &mut Option<BackEiLayer<Self>>;
}

impl HostReal for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn layer(layers: &mut CpuLayers) -> &mut Option<BackEiLayer<f32>> {
        &mut layers.f32
    }
}

impl HostReal for f64 {
    const DTYPE: Dtype = Dtype::F64;
    fn layer(layers: &mut CpuLayers) -> &mut Option<BackEiLayer<f64>> {
        &mut layers.f64
    }
}

#[derive(Default)]
pub struct CpuLayers {
    f32: Option<BackEiLayer<f32>>,
    f64: Option<BackEiLayer<f64>>,
}

/// The host pointers of a backward.
pub struct BackwardArgs<F> {
    pub input: *const F,
    pub params: *const F,
    pub output: *const F,
    pub grad_output: *const F,
    pub grad_input: *mut F,
    pub grad_params: *mut F,
}

/// The saved workspace: v, then g (back on), then z (ei on), T·B·N elements each.
fn saved_parts(config: &LayerConfig) -> usize {
    1 + config.feedback.back as usize + config.feedback.ei as usize
}

impl CpuLayers {
    pub fn saved_bytes(config: &LayerConfig, output_len: usize, dtype: Dtype) -> Result<usize> {
        output_len.checked_mul(saved_parts(config) * dtype.bytes()).ok_or_else(|| invalid("batch", "the saved workspace overflows"))
    }

    fn get<F: HostReal>(&mut self, config: &LayerConfig) -> &mut BackEiLayer<F> {
        F::layer(self).get_or_insert_with(|| BackEiLayer::new(config.shape, config.feedback, &config.neuron))
    }

    /// # Safety
    /// See `Layer::forward_host`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward<F: HostReal>(
        &mut self,
        config: &LayerConfig,
        b: BatchShape,
        sizes: &Sizes,
        input: *const F,
        params: *const F,
        output: *mut F,
        ws: Workspace,
    ) -> Result<()> {
        let align = std::mem::align_of::<F>();
        check_ptr("input", input as usize, align)?;
        check_ptr("output", output as usize, align)?;
        check_saved(&ws, sizes.saved_bytes, align)?;
        // SAFETY (all slices below): the caller guarantees these lengths (Layer::sizes).
        let input = unsafe { slice::from_raw_parts(input, sizes.input_len) };
        let params = unsafe { param_slice(params, sizes.param_len)? };
        let output = unsafe { slice::from_raw_parts_mut(output, sizes.output_len) };
        let saved = unsafe { slice::from_raw_parts_mut(ws.saved as *mut F, sizes.output_len * saved_parts(config)) };
        let slots = config.slots();
        let p = BackEiParams {
            w_b: &params[slots[0].clone()],
            b_b: &params[slots[1].clone()],
            w_e: &params[slots[2].clone()],
            b_e: &params[slots[3].clone()],
        };
        let layer = self.get::<F>(config);
        layer.forward(&p, input, b.t_in, b.batch, b.steps)?;
        output.copy_from_slice(&layer.out);
        let mut parts = saved.chunks_exact_mut(sizes.output_len);
        for kept in saved_state(layer) {
            if let Some(dst) = parts.next() {
                dst.copy_from_slice(kept);
            }
        }
        Ok(())
    }

    /// # Safety
    /// See `Layer::backward_host`.
    pub unsafe fn backward<F: HostReal>(
        &mut self,
        config: &LayerConfig,
        b: BatchShape,
        sizes: &Sizes,
        a: BackwardArgs<F>,
        ws: Workspace,
    ) -> Result<()> {
        let align = std::mem::align_of::<F>();
        for (name, p) in [
            ("input", a.input as usize),
            ("output", a.output as usize),
            ("grad_output", a.grad_output as usize),
            ("grad_input", a.grad_input as usize),
        ] {
            check_ptr(name, p, align)?;
        }
        check_saved(&ws, sizes.saved_bytes, align)?;
        // SAFETY (all slices below): the caller guarantees these lengths (Layer::sizes).
        let input = unsafe { slice::from_raw_parts(a.input, sizes.input_len) };
        let params = unsafe { param_slice(a.params, sizes.param_len)? };
        let output = unsafe { slice::from_raw_parts(a.output, sizes.output_len) };
        let grad_output = unsafe { slice::from_raw_parts(a.grad_output, sizes.output_len) };
        let grad_input = unsafe { slice::from_raw_parts_mut(a.grad_input, sizes.input_len) };
        let grad_params: &mut [F] = if sizes.param_len == 0 {
            &mut []
        } else {
            check_ptr("grad_params", a.grad_params as usize, align)?;
            unsafe { slice::from_raw_parts_mut(a.grad_params, sizes.param_len) }
        };
        let saved = unsafe { slice::from_raw_parts(ws.saved as *const F, sizes.output_len * saved_parts(config)) };
        let slots = config.slots();
        let p = BackEiParams {
            w_b: &params[slots[0].clone()],
            b_b: &params[slots[1].clone()],
            w_e: &params[slots[2].clone()],
            b_e: &params[slots[3].clone()],
        };
        let (gw_b, rest) = grad_params.split_at_mut(slots[1].start);
        let (gb_b, rest) = rest.split_at_mut(slots[1].len());
        let (gw_e, gb_e) = rest.split_at_mut(slots[2].len());
        let mut grads = BackEiGrads { w_b: gw_b, b_b: gb_b, w_e: gw_e, b_e: gb_e };
        let layer = self.get::<F>(config);
        layer.size_for(b.batch, b.steps);
        layer.out.copy_from_slice(output);
        let mut parts = saved.chunks_exact(sizes.output_len);
        for kept in saved_state_mut(layer) {
            if let Some(src) = parts.next() {
                kept.copy_from_slice(src);
            }
        }
        layer.backward(&p, &mut grads, input, b.t_in, grad_output, grad_input)?;
        Ok(())
    }
}

/// v, g (back on), z (ei on): what the backward needs from the forward besides s.
fn saved_state<F: Real>(l: &BackEiLayer<F>) -> Vec<&[F]> {
    let mut v: Vec<&[F]> = vec![&l.v];
    if l.feedback.back {
        v.push(&l.g);
    }
    if l.feedback.ei {
        v.push(&l.z);
    }
    v
}

fn saved_state_mut<F: Real>(l: &mut BackEiLayer<F>) -> Vec<&mut [F]> {
    let (back, ei) = (l.feedback.back, l.feedback.ei);
    let mut v: Vec<&mut [F]> = vec![&mut l.v];
    if back {
        v.push(&mut l.g);
    }
    if ei {
        v.push(&mut l.z);
    }
    v
}

fn check_saved(ws: &Workspace, need: usize, align: usize) -> Result<()> {
    check_ptr("saved", ws.saved as usize, align)?;
    if ws.saved_bytes < need {
        return Err(invalid("saved_bytes", format!("{} bytes given, the saved workspace needs {need}", ws.saved_bytes)));
    }
    Ok(())
}

/// # Safety
/// `params` must address `len` elements (it may be NULL when `len` is 0: a plain layer).
unsafe fn param_slice<'a, F>(params: *const F, len: usize) -> Result<&'a [F]> {
    if len == 0 {
        return Ok(&[]);
    }
    check_ptr("params", params as usize, std::mem::align_of::<F>())?;
    Ok(unsafe { slice::from_raw_parts(params, len) })
}
