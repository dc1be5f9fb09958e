//! One layer behind a handle: its settings, its engine (the CPU engine's `BackEiLayer` in f32 and
//! f64, or the GPU's fused `GpuBackEiLayer`), and forward/backward on memory the CALLER owns.
//!
//! The handle keeps no per-batch state between calls: what the backward needs from the forward
//! (v, g, z — the membrane before reset and the two gates' pre-activations) lives in the caller's
//! `saved` workspace, and the output s is the caller's own tensor, handed back to the backward.
//! So one layer may run several forwards before their backwards (a module used twice in a model,
//! `torch.autograd.gradcheck`), and nothing is allocated per call on the GPU. Sizes come from
//! [`Layer::sizes`].
//!
//! Parameters are one flat buffer, in this order, each gate's tensors present only when the gate
//! is on: W_b [C][C][2r+1][2r+1], b_b [C], W_e [C][C][2r+1][2r+1], b_e [C] (PyTorch's Conv2d
//! layout). Gradients of the parameters are ADDED to the caller's buffer (zero it first, or let it
//! accumulate over micro-batches); the gradient of the input is written.

use crate::cpu::CpuLayers;
use crate::cuda::CudaLayer;
use crate::error::{invalid, Result};
use backei::spec::{FeedbackConfig, FiringMode, NeuronConfig, Surrogate};
use backei::Precision;
use cudarc::driver::sys::CUstream;
use std::sync::Mutex;

/// The settings of a layer (validated by [`Layer::new`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerConfig {
    /// [C, H, W]; a plain spiking layer over N neurons is [N, 1, 1] with both gates off.
    pub shape: [usize; 3],
    pub feedback: FeedbackConfig,
    pub neuron: NeuronConfig,
    /// The tensor-core rounding of the GPU's gate convolutions (see `backei::Precision`).
    pub precision: Precision,
    /// Bit-reproducible weight gradients on the GPU (no float atomics), as `--deterministic`.
    pub deterministic: bool,
}

impl LayerConfig {
    /// A BackEI layer with the paper's settings: both gates, r = 1, D = 1, λ = 0.2, θ = 0.5, the
    /// height-1 width-1 rectangle surrogate.
    pub fn backei(channels: usize, height: usize, width: usize) -> Self {
        LayerConfig {
            shape: [channels, height, width],
            feedback: FeedbackConfig::default(),
            neuron: NeuronConfig::default(),
            precision: Precision::default(),
            deterministic: false,
        }
    }

    /// The plain spiking layer (no gates) over `neurons` neurons per sample.
    pub fn spiking(neurons: usize) -> Self {
        let feedback = FeedbackConfig { back: false, ei: false, radius: 0, delay: 1 };
        LayerConfig { shape: [neurons, 1, 1], feedback, ..Self::backei(neurons, 1, 1) }
    }

    pub fn neurons(&self) -> usize {
        self.shape.iter().product()
    }

    /// C·C·(2r+1)²: the length of W_b and of W_e.
    pub fn gate_weight_len(&self) -> usize {
        let k = 2 * self.feedback.radius + 1;
        self.shape[0] * self.shape[0] * k * k
    }

    /// The flat parameter buffer's slots [W_b, b_b, W_e, b_e] (empty for a gate that is off).
    pub fn slots(&self) -> [std::ops::Range<usize>; 4] {
        let (wl, c) = (self.gate_weight_len(), self.shape[0]);
        let mut at = 0;
        let mut next = |on: bool, len: usize| {
            let r = if on { at..at + len } else { at..at };
            at = r.end;
            r
        };
        let fb = self.feedback;
        [next(fb.back, wl), next(fb.back, c), next(fb.ei, wl), next(fb.ei, c)]
    }

    /// Floats in the flat parameter buffer.
    pub fn param_len(&self) -> usize {
        self.slots()[3].end
    }

    /// The checks the layers themselves make, up front, with numbers that cannot overflow.
    fn validate(&self) -> Result<()> {
        let [c, h, w] = self.shape;
        let n = c.checked_mul(h).and_then(|x| x.checked_mul(w)).ok_or_else(|| invalid("shape", format!("{:?} overflows", self.shape)))?;
        if n == 0 {
            return Err(config_err("shape", format!("[C, H, W] = {:?} has a zero dimension", self.shape)));
        }
        let fb = self.feedback;
        if fb.delay == 0 {
            return Err(config_err("delay", "D = 0: the feedback delay must be at least 1 step"));
        }
        if fb.radius > 64 {
            return Err(config_err("radius", format!("r = {}: the gate kernel (2r+1)² must fit the map; r ≤ 64", fb.radius)));
        }
        if let Some(problem) = fb.gate_misfit(h, w) {
            return Err(config_err("radius", problem));
        }
        let nr = self.neuron;
        for (name, x) in [("leak", nr.leak), ("threshold", nr.threshold)] {
            if !x.is_finite() {
                return Err(config_err(name, format!("{x} is not a finite number")));
            }
        }
        let param = match nr.surrogate {
            Surrogate::Rectangle { width } => ("surrogate width", width),
            Surrogate::Sigmoid { alpha } | Surrogate::Atan { alpha } => ("surrogate alpha", alpha),
        };
        if !(param.1.is_finite() && param.1 > 0.0) {
            return Err(config_err(param.0, format!("{} must be a positive number", param.1)));
        }
        if let FiringMode::Smooth { k } = nr.mode {
            if !(k.is_finite() && k > 0.0) {
                return Err(config_err("smooth_k", format!("{k} must be positive (0 selects the exact step functions)")));
            }
        }
        Ok(())
    }
}

fn config_err(field: &str, problem: impl Into<String>) -> crate::error::CapiError {
    backei::BackeiError::Config { field: field.into(), problem: problem.into() }.into()
}

/// Which engine runs a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The CPU engine on host memory, in f32 or f64.
    Cpu,
    /// The fused CUDA kernels on device `ordinal`, f32, on the caller's stream.
    Cuda { ordinal: usize },
}

/// The element type of a call's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

/// The batch shape of one call: B samples, T steps, and an input of T_in = 1 (direct encoding:
/// the same current at every step) or T_in = T steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub batch: usize,
    pub steps: usize,
    pub t_in: usize,
}

/// The sizes of one call's tensors (elements) and workspaces (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sizes {
    /// T_in·B·C·H·W: the input current and its gradient.
    pub input_len: usize,
    /// T·B·C·H·W: the output spikes s and their gradient.
    pub output_len: usize,
    /// The flat parameter buffer (and its gradient).
    pub param_len: usize,
    /// Kept by the caller from a forward to its backward (256-byte aligned on the GPU).
    pub saved_bytes: usize,
    /// Used during one call only, forward or backward (256-byte aligned on the GPU).
    pub scratch_bytes: usize,
}

/// The caller's workspaces of one call: host memory for the CPU engine, device memory for CUDA.
#[derive(Clone, Copy, Debug)]
pub struct Workspace {
    pub saved: *mut u8,
    pub saved_bytes: usize,
    pub scratch: *mut u8,
    pub scratch_bytes: usize,
}

/// One layer: settings and engine. Calls on one layer are serialised by a lock; on the GPU, one
/// layer must not be driven on two streams at once (each call lends it the caller's stream).
pub struct Layer {
    config: LayerConfig,
    engine: Engine,
    cpu: Mutex<CpuLayers>,
    cuda: Option<Mutex<CudaLayer>>,
}

impl Layer {
    pub fn new(config: LayerConfig, engine: Engine) -> Result<Layer> {
        config.validate()?;
        let cuda = match engine {
            Engine::Cpu => None,
            Engine::Cuda { ordinal } => Some(Mutex::new(CudaLayer::new(&config, ordinal)?)),
        };
        Ok(Layer { config, engine, cpu: Mutex::new(CpuLayers::default()), cuda })
    }

    pub fn config(&self) -> &LayerConfig {
        &self.config
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Every size of a call with this batch shape, or why the batch shape cannot run.
    pub fn sizes(&self, b: BatchShape, dtype: Dtype) -> Result<Sizes> {
        let n = self.config.neurons();
        if b.batch == 0 || b.steps == 0 {
            return Err(config_err("batch shape", format!("B = {}, T = {}: both must be at least 1", b.batch, b.steps)));
        }
        if b.t_in != 1 && b.t_in != b.steps {
            return Err(config_err(
                "T_in",
                format!("the input current has T_in = {} steps; it must be 1 (direct encoding) or T = {}", b.t_in, b.steps),
            ));
        }
        let bn = b.batch.checked_mul(n).ok_or_else(|| invalid("batch", "B·C·H·W overflows"))?;
        let output_len = b.steps.checked_mul(bn).ok_or_else(|| invalid("steps", "T·B·C·H·W overflows"))?;
        let base = Sizes { input_len: b.t_in * bn, output_len, param_len: self.config.param_len(), saved_bytes: 0, scratch_bytes: 0 };
        match &self.cuda {
            None => Ok(Sizes { saved_bytes: CpuLayers::saved_bytes(&self.config, output_len, dtype)?, ..base }),
            Some(cuda) => {
                if dtype != Dtype::F32 {
                    return Err(config_err(
                        "dtype",
                        "the CUDA kernels compute in float32; use f32 tensors (float64 runs on the CPU engine)",
                    ));
                }
                let (saved_bytes, scratch_bytes) = lock(cuda).workspace_bytes(b)?;
                Ok(Sizes { saved_bytes, scratch_bytes, ..base })
            }
        }
    }

    fn expect_engine(&self, cuda: bool) -> Result<()> {
        match (self.engine, cuda) {
            (Engine::Cpu, false) | (Engine::Cuda { .. }, true) => Ok(()),
            (Engine::Cpu, true) => Err(invalid("layer", "this layer was created for the CPU engine: call the host functions")),
            (Engine::Cuda { .. }, false) => {
                Err(invalid("layer", "this layer was created for CUDA: call the CUDA functions with device pointers"))
            }
        }
    }

    /// All T steps on the CPU engine: s into `output`, v/g/z into the saved workspace.
    ///
    /// # Safety
    /// Every pointer must address host memory of the length [`Layer::sizes`] gives (input, output,
    /// params: elements of F; saved: bytes), valid for the call.
    pub unsafe fn forward_host<F: crate::cpu::HostReal>(
        &self,
        b: BatchShape,
        input: *const F,
        params: *const F,
        output: *mut F,
        ws: Workspace,
    ) -> Result<()> {
        self.expect_engine(false)?;
        let sizes = self.sizes(b, F::DTYPE)?;
        unsafe { lock(&self.cpu).forward(&self.config, b, &sizes, input, params, output, ws) }
    }

    /// BPTT on the CPU engine, from the saved workspace of the forward that produced `output`.
    ///
    /// # Safety
    /// As [`Layer::forward_host`]; grad_output has the output's length, grad_input the input's,
    /// grad_params the parameters'.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_host<F: crate::cpu::HostReal>(
        &self,
        b: BatchShape,
        input: *const F,
        params: *const F,
        output: *const F,
        grad_output: *const F,
        grad_input: *mut F,
        grad_params: *mut F,
        ws: Workspace,
    ) -> Result<()> {
        self.expect_engine(false)?;
        let sizes = self.sizes(b, F::DTYPE)?;
        let args = crate::cpu::BackwardArgs { input, params, output, grad_output, grad_input, grad_params };
        unsafe { lock(&self.cpu).backward(&self.config, b, &sizes, args, ws) }
    }

    /// All T steps on the GPU, launched on the caller's `stream` and returning before they run.
    ///
    /// # Safety
    /// The pointers must be device memory of the current device's primary context, of the sizes
    /// [`Layer::sizes`] gives, and stay valid until the work on `stream` is done; `stream` must be
    /// a live stream of that context (or null, the legacy default stream).
    pub unsafe fn forward_cuda(&self, stream: CUstream, b: BatchShape, input: u64, params: u64, output: u64, ws: Workspace) -> Result<()> {
        self.expect_engine(true)?;
        let sizes = self.sizes(b, Dtype::F32)?;
        let cuda = self.cuda.as_ref().ok_or_else(|| invalid("layer", "no CUDA engine"))?;
        unsafe { lock(cuda).forward(&self.config, stream, b, &sizes, input, params, output, ws) }
    }

    /// BPTT on the GPU, on the caller's `stream`, from the saved workspace of the forward that
    /// produced `output`.
    ///
    /// # Safety
    /// As [`Layer::forward_cuda`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_cuda(
        &self,
        stream: CUstream,
        b: BatchShape,
        input: u64,
        params: u64,
        output: u64,
        grad_output: u64,
        grad_input: u64,
        grad_params: u64,
        ws: Workspace,
    ) -> Result<()> {
        self.expect_engine(true)?;
        let sizes = self.sizes(b, Dtype::F32)?;
        let cuda = self.cuda.as_ref().ok_or_else(|| invalid("layer", "no CUDA engine"))?;
        let args = crate::cuda::BackwardArgs { input, params, output, grad_output, grad_input, grad_params };
        unsafe { lock(cuda).backward(&self.config, stream, b, &sizes, args, ws) }
    }
}

/// A lock that a panic in an earlier call (caught at the boundary) does not poison for good: the
/// state is rebuilt or re-lent at every call.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks that a caller's pointer is non-null and aligned for its element type.
pub(crate) fn check_ptr(name: &'static str, addr: usize, align: usize) -> Result<()> {
    if addr == 0 {
        return Err(invalid(name, "is NULL"));
    }
    if addr % align != 0 {
        return Err(invalid(name, format!("address {addr:#x} is not aligned to {align} bytes")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_gates_in_pytorch_order() {
        let mut c = LayerConfig::backei(3, 5, 5);
        assert_eq!(c.slots(), [0..81, 81..84, 84..165, 165..168]);
        c.feedback.back = false;
        assert_eq!(c.slots(), [0..0, 0..0, 0..81, 81..84]);
        assert_eq!(LayerConfig::spiking(10).param_len(), 0);
    }

    #[test]
    fn bad_settings_and_batch_shapes_are_errors() {
        let mut c = LayerConfig::backei(3, 2, 2);
        let e = Layer::new(c, Engine::Cpu).err().unwrap().to_string();
        assert!(e.contains("radius") && e.contains("2×2"), "{e}");
        c.shape = [3, 5, 5];
        c.feedback.delay = 0;
        assert!(Layer::new(c, Engine::Cpu).err().unwrap().to_string().contains("delay"));
        let l = Layer::new(LayerConfig::backei(3, 5, 5), Engine::Cpu).unwrap();
        let e = l.sizes(BatchShape { batch: 2, steps: 4, t_in: 3 }, Dtype::F32).unwrap_err().to_string();
        assert!(e.contains("T_in = 3"), "{e}");
        let s = l.sizes(BatchShape { batch: 2, steps: 4, t_in: 1 }, Dtype::F64).unwrap();
        assert_eq!((s.input_len, s.output_len, s.param_len), (150, 600, 168));
        assert_eq!(s.saved_bytes, 3 * 600 * 8);
    }
}
