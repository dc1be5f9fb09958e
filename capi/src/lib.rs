//! The C ABI of backei (`include/backei.h`, generated from this file by cbindgen): a BackEI layer
//! or a plain spiking layer behind an opaque handle, forward and backward over the caller's memory
//! — device pointers on the caller's `CUstream`, or host pointers for the CPU engine.
//!
//! Every function returns a `BackeiStatus` (0 = OK) and leaves the message of a failure in
//! `backei_last_error()`, per thread. No panic crosses the boundary (each body runs under
//! `catch_unwind`). `capi/README.md` is the guide; `capi/tests/c/backei_test.c` a complete program.
//!
//! The Rust API under it ([`layer::Layer`]) is what the Python package calls.

pub mod cpu;
pub mod cuda;
pub mod error;
pub mod layer;

use backei::spec::{FiringMode, Surrogate};
use backei::Precision;
pub use error::BackeiStatus;
use error::{guarded, invalid, Result};
use layer::{BatchShape, Dtype, Engine, Layer, LayerConfig, Workspace};
use std::ffi::{c_char, c_void};

/// CUDA's stream handle (`CUstream` in cuda.h; NULL is the legacy default stream).
pub type CuStream = cudarc::driver::sys::CUstream;

/// Which engine a layer runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackeiEngine {
    /// The CPU engine: host pointers, float or double.
    Cpu = 0,
    /// The fused CUDA kernels: device pointers, float, on the caller's stream.
    Cuda = 1,
}

/// The element type of a call's tensors and workspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackeiDtype {
    F32 = 0,
    /// The CPU engine only (gradient checks).
    F64 = 1,
}

/// The surrogate gradient of the step functions H and sign in the backward pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackeiSurrogate {
    /// 1/width where |x| < width/2 (the reference: width 1).
    Rectangle = 0,
    /// alpha·σ(alpha·x)·(1 − σ(alpha·x)).
    Sigmoid = 1,
    /// (alpha/2) / (1 + (π/2·alpha·x)²).
    Atan = 2,
}

/// The rounding of the GPU's tensor-core gate convolutions (`backei::Precision`); the CPU engine
/// always computes exactly in its dtype.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackeiPrecision {
    /// Near-FP32 (the default).
    Fp32 = 0,
    Tf32 = 1,
    Bf16 = 2,
}

/// The settings of a layer. Start from `backei_backei_config` or `backei_spiking_config` and change
/// what you need. Enum-valued fields are `uint32_t` so that any value a C caller writes is checked.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BackeiLayerConfig {
    /// C, H, W of the layer's map (a plain spiking layer over N neurons: N, 1, 1).
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// The adaptive self-feedback gate g = σ(W_b ⊛ s_{t−D} + b_b).
    pub back: bool,
    /// The dynamic E/I gate e = sign(W_e ⊛ v_t + b_e).
    pub ei: bool,
    /// r: the gate convolutions are (2r+1)×(2r+1), zero padding r.
    pub radius: usize,
    /// D ≥ 1: the feedback reads s_{t−D}.
    pub delay: usize,
    /// λ: the membrane keeps λ·u of the previous step (0.2).
    pub leak: f64,
    /// θ: a neuron fires when v > θ (0.5).
    pub threshold: f64,
    /// A `BackeiSurrogate`.
    pub surrogate: u32,
    /// The surrogate's width (rectangle) or alpha (sigmoid, atan).
    pub surrogate_param: f64,
    /// 0: the exact step functions (the model). k > 0: H → σ(k·x) and sign → tanh(k·x) with their
    /// true derivatives, a smooth layer for finite-difference gradient checks.
    pub smooth_k: f64,
    /// A `BackeiPrecision`.
    pub precision: u32,
    /// Bit-reproducible weight gradients on the GPU (no float atomics).
    pub deterministic: bool,
}

/// The batch shape of a call: B samples, T steps, T_in = 1 (the same input current at every step)
/// or T_in = T.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BackeiBatch {
    pub batch: usize,
    pub steps: usize,
    pub t_in: usize,
}

/// Sizes of a call (`backei_workspace_size`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BackeiSizes {
    /// Elements of the input current [T_in][B][C][H][W] (and of its gradient).
    pub input_len: usize,
    /// Elements of the output spikes [T][B][C][H][W] (and of their gradient).
    pub output_len: usize,
    /// Elements of the flat parameters [W_b, b_b, W_e, b_e] (gates that are on only).
    pub param_len: usize,
    /// Bytes kept by the caller from a forward to its backward.
    pub saved_bytes: usize,
    /// Bytes used during one call only.
    pub scratch_bytes: usize,
}

/// The caller's workspaces of a call: device memory (256-byte aligned) for CUDA, host memory for
/// the CPU engine. Either pointer may be NULL when its size is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BackeiWorkspace {
    pub saved: *mut c_void,
    pub saved_bytes: usize,
    pub scratch: *mut c_void,
    pub scratch_bytes: usize,
}

/// A layer (opaque).
pub struct BackeiLayer {
    inner: Layer,
}

impl BackeiLayerConfig {
    fn from(c: &LayerConfig) -> Self {
        let (surrogate, surrogate_param) = match c.neuron.surrogate {
            Surrogate::Rectangle { width } => (BackeiSurrogate::Rectangle, width),
            Surrogate::Sigmoid { alpha } => (BackeiSurrogate::Sigmoid, alpha),
            Surrogate::Atan { alpha } => (BackeiSurrogate::Atan, alpha),
        };
        BackeiLayerConfig {
            channels: c.shape[0],
            height: c.shape[1],
            width: c.shape[2],
            back: c.feedback.back,
            ei: c.feedback.ei,
            radius: c.feedback.radius,
            delay: c.feedback.delay,
            leak: c.neuron.leak,
            threshold: c.neuron.threshold,
            surrogate: surrogate as u32,
            surrogate_param,
            smooth_k: 0.0,
            precision: BackeiPrecision::Fp32 as u32,
            deterministic: c.deterministic,
        }
    }

    fn to_config(&self) -> Result<LayerConfig> {
        let mut c = LayerConfig::backei(self.channels, self.height, self.width);
        c.feedback.back = self.back;
        c.feedback.ei = self.ei;
        c.feedback.radius = self.radius;
        c.feedback.delay = self.delay;
        c.neuron.leak = self.leak;
        c.neuron.threshold = self.threshold;
        let p = self.surrogate_param;
        c.neuron.surrogate = match self.surrogate {
            0 => Surrogate::Rectangle { width: p },
            1 => Surrogate::Sigmoid { alpha: p },
            2 => Surrogate::Atan { alpha: p },
            s => return Err(invalid("surrogate", format!("{s} is not a BackeiSurrogate (0 rectangle, 1 sigmoid, 2 atan)"))),
        };
        c.neuron.mode = if self.smooth_k == 0.0 { FiringMode::Exact } else { FiringMode::Smooth { k: self.smooth_k } };
        c.precision = match self.precision {
            0 => Precision::Fp32,
            1 => Precision::Tf32,
            2 => Precision::Bf16,
            p => return Err(invalid("precision", format!("{p} is not a BackeiPrecision (0 fp32, 1 tf32, 2 bf16)"))),
        };
        c.deterministic = self.deterministic;
        Ok(c)
    }
}

fn batch(b: BackeiBatch) -> BatchShape {
    BatchShape { batch: b.batch, steps: b.steps, t_in: b.t_in }
}

fn workspace(w: BackeiWorkspace) -> Workspace {
    Workspace { saved: w.saved as *mut u8, saved_bytes: w.saved_bytes, scratch: w.scratch as *mut u8, scratch_bytes: w.scratch_bytes }
}

/// # Safety
/// `layer` must be NULL or a live handle from `backei_layer_create`.
unsafe fn handle<'a>(layer: *const BackeiLayer) -> Result<&'a Layer> {
    // SAFETY: the caller's promise.
    unsafe { layer.as_ref() }.map(|l| &l.inner).ok_or_else(|| invalid("layer", "is NULL"))
}

fn out<'a, T>(ptr: *mut T, name: &'static str) -> Result<&'a mut T> {
    // SAFETY: a caller's out-pointer, checked for NULL.
    unsafe { ptr.as_mut() }.ok_or_else(|| invalid(name, "is NULL"))
}

/// The message of the last failed call on this thread, "" after a successful one. Valid until the
/// next call of this library on the same thread; never NULL.
#[no_mangle]
pub extern "C" fn backei_last_error() -> *const c_char {
    error::last_error_ptr()
}

/// The settings of a BackEI layer of C channels on an H×W map, as in the paper: both gates, r = 1,
/// D = 1, λ = 0.2, θ = 0.5, the rectangle surrogate of width 1, exact step functions, fp32.
#[no_mangle]
pub extern "C" fn backei_backei_config(channels: usize, height: usize, width: usize) -> BackeiLayerConfig {
    BackeiLayerConfig::from(&LayerConfig::backei(channels, height, width))
}

/// The settings of a plain spiking layer (no gates) over N neurons per sample.
#[no_mangle]
pub extern "C" fn backei_spiking_config(neurons: usize) -> BackeiLayerConfig {
    BackeiLayerConfig::from(&LayerConfig::spiking(neurons))
}

/// Creates a layer on an engine (`BackeiEngine`; `device` is the CUDA ordinal, ignored for the
/// CPU). On success `*layer` is a handle to free with `backei_layer_destroy`. CUDA: the driver and
/// NVRTC are loaded here; a machine without them gets BACKEI_STATUS_CUDA, never a crash.
///
/// # Safety
/// `config` must point to a `BackeiLayerConfig`; `layer` to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn backei_layer_create(
    config: *const BackeiLayerConfig,
    engine: u32,
    device: i32,
    layer: *mut *mut BackeiLayer,
) -> BackeiStatus {
    guarded(|| {
        let out = out(layer, "layer")?;
        *out = std::ptr::null_mut();
        // SAFETY: the caller's promise, checked for NULL.
        let config = unsafe { config.as_ref() }.ok_or_else(|| invalid("config", "is NULL"))?.to_config()?;
        let engine = match engine {
            0 => Engine::Cpu,
            1 => Engine::Cuda { ordinal: usize::try_from(device).map_err(|_| invalid("device", format!("{device} is negative")))? },
            e => return Err(invalid("engine", format!("{e} is not a BackeiEngine (0 CPU, 1 CUDA)"))),
        };
        let inner = Layer::new(config, engine)?;
        *out = Box::into_raw(Box::new(BackeiLayer { inner }));
        Ok(())
    })
}

/// Frees a layer (NULL is a no-op). On CUDA, only after the work it launched has finished or been
/// ordered before any reuse of its memory, as for any free; backei owns no memory that its
/// kernels read, so pending launches stay valid.
///
/// # Safety
/// `layer` must be NULL or a live handle, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn backei_layer_destroy(layer: *mut BackeiLayer) {
    if !layer.is_null() {
        // SAFETY: a handle from Box::into_raw, given back once.
        let owned = unsafe { Box::from_raw(layer) };
        // dropping frees only backei's own placeholder; a panic must not unwind into C
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(owned)));
    }
}

/// The layer's settings.
///
/// # Safety
/// `layer` a live handle; `config` writable.
#[no_mangle]
pub unsafe extern "C" fn backei_layer_config(layer: *const BackeiLayer, config: *mut BackeiLayerConfig) -> BackeiStatus {
    guarded(|| {
        let l = unsafe { handle(layer)? };
        let mut c = BackeiLayerConfig::from(l.config());
        if let FiringMode::Smooth { k } = l.config().neuron.mode {
            c.smooth_k = k;
        }
        c.precision = match l.config().precision {
            Precision::Fp32 => 0,
            Precision::Tf32 => 1,
            Precision::Bf16 => 2,
        };
        *out(config, "config")? = c;
        Ok(())
    })
}

/// The sizes of every tensor and workspace of a call with this batch shape and element type, or
/// why the batch shape cannot run (a T_in other than 1 or T, an f64 call on CUDA, ...).
///
/// # Safety
/// `layer` a live handle; `sizes` writable.
#[no_mangle]
pub unsafe extern "C" fn backei_workspace_size(
    layer: *const BackeiLayer,
    b: BackeiBatch,
    dtype: u32,
    sizes: *mut BackeiSizes,
) -> BackeiStatus {
    guarded(|| {
        let l = unsafe { handle(layer)? };
        let dtype = match dtype {
            0 => Dtype::F32,
            1 => Dtype::F64,
            d => return Err(invalid("dtype", format!("{d} is not a BackeiDtype (0 f32, 1 f64)"))),
        };
        let s = l.sizes(batch(b), dtype)?;
        *out(sizes, "sizes")? = BackeiSizes {
            input_len: s.input_len,
            output_len: s.output_len,
            param_len: s.param_len,
            saved_bytes: s.saved_bytes,
            scratch_bytes: s.scratch_bytes,
        };
        Ok(())
    })
}

/// All T steps of a CUDA layer, enqueued on `stream` (the caller's; NULL = the legacy default
/// stream): s [T][B][C][H][W] into `output`, the backward's state into `ws.saved`. Returns once
/// the kernels are enqueued; neither synchronises nor allocates.
///
/// # Safety
/// Device pointers of the current device's primary context, of the sizes `backei_workspace_size`
/// gives, valid until the enqueued work has run; `stream` a live stream of that context.
#[no_mangle]
pub unsafe extern "C" fn backei_forward_cuda(
    layer: *mut BackeiLayer,
    stream: CuStream,
    b: BackeiBatch,
    input: *const f32,
    params: *const f32,
    output: *mut f32,
    ws: BackeiWorkspace,
) -> BackeiStatus {
    guarded(|| {
        let l = unsafe { handle(layer)? };
        unsafe { l.forward_cuda(stream, batch(b), input as u64, params as u64, output as u64, workspace(ws)) }
    })
}

/// BPTT of a CUDA layer on `stream`, from the `output` and `ws.saved` of its forward: writes
/// ∂L/∂input into `grad_input`, ADDS ∂L/∂params into `grad_params` (NULL for a plain layer).
///
/// # Safety
/// As `backei_forward_cuda`; `ws.saved` holds what the forward of this batch left there.
#[no_mangle]
pub unsafe extern "C" fn backei_backward_cuda(
    layer: *mut BackeiLayer,
    stream: CuStream,
    b: BackeiBatch,
    input: *const f32,
    params: *const f32,
    output: *const f32,
    grad_output: *const f32,
    grad_input: *mut f32,
    grad_params: *mut f32,
    ws: BackeiWorkspace,
) -> BackeiStatus {
    guarded(|| {
        let l = unsafe { handle(layer)? };
        let (i, p, o, go, gi, gp) = (input as u64, params as u64, output as u64, grad_output as u64, grad_input as u64, grad_params as u64);
        unsafe { l.backward_cuda(stream, batch(b), i, p, o, go, gi, gp, workspace(ws)) }
    })
}

/// All T steps of a CPU layer on host floats: s into `output`, the backward's state into
/// `ws.saved` (`ws.scratch` is unused: scratch_bytes is 0 on the CPU).
///
/// # Safety
/// Host pointers of the sizes `backei_workspace_size` gives for BACKEI_DTYPE_F32.
#[no_mangle]
pub unsafe extern "C" fn backei_forward_host_f32(
    layer: *mut BackeiLayer,
    b: BackeiBatch,
    input: *const f32,
    params: *const f32,
    output: *mut f32,
    ws: BackeiWorkspace,
) -> BackeiStatus {
    guarded(|| unsafe { handle(layer)?.forward_host(batch(b), input, params, output, workspace(ws)) })
}

/// BPTT of a CPU layer on host floats, from the `output` and `ws.saved` of its forward: writes
/// ∂L/∂input, ADDS ∂L/∂params into `grad_params` (NULL for a plain layer).
///
/// # Safety
/// As `backei_forward_host_f32`; `ws.saved` holds what the forward of this batch left there.
#[no_mangle]
pub unsafe extern "C" fn backei_backward_host_f32(
    layer: *mut BackeiLayer,
    b: BackeiBatch,
    input: *const f32,
    params: *const f32,
    output: *const f32,
    grad_output: *const f32,
    grad_input: *mut f32,
    grad_params: *mut f32,
    ws: BackeiWorkspace,
) -> BackeiStatus {
    guarded(|| unsafe {
        handle(layer)?.backward_host(batch(b), input, params, output, grad_output, grad_input, grad_params, workspace(ws))
    })
}

/// `backei_forward_host_f32` in double precision (the CPU engine only: gradient checks).
///
/// # Safety
/// Host pointers of the sizes `backei_workspace_size` gives for BACKEI_DTYPE_F64.
#[no_mangle]
pub unsafe extern "C" fn backei_forward_host_f64(
    layer: *mut BackeiLayer,
    b: BackeiBatch,
    input: *const f64,
    params: *const f64,
    output: *mut f64,
    ws: BackeiWorkspace,
) -> BackeiStatus {
    guarded(|| unsafe { handle(layer)?.forward_host(batch(b), input, params, output, workspace(ws)) })
}

/// `backei_backward_host_f32` in double precision.
///
/// # Safety
/// As `backei_forward_host_f64`; `ws.saved` holds what the forward of this batch left there.
#[no_mangle]
pub unsafe extern "C" fn backei_backward_host_f64(
    layer: *mut BackeiLayer,
    b: BackeiBatch,
    input: *const f64,
    params: *const f64,
    output: *const f64,
    grad_output: *const f64,
    grad_input: *mut f64,
    grad_params: *mut f64,
    ws: BackeiWorkspace,
) -> BackeiStatus {
    guarded(|| unsafe {
        handle(layer)?.backward_host(batch(b), input, params, output, grad_output, grad_input, grad_params, workspace(ws))
    })
}
