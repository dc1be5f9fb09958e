//! `backei._backei`: one backei layer (`backei_capi::layer::Layer`, the code behind the C ABI) as a
//! Python object whose forward and backward take PyTorch tensors as DLPack capsules
//! (`torch.utils.dlpack.to_dlpack`), zero-copy: the kernels read and write the tensors' own
//! memory, on the CUDA stream the caller names (`torch.cuda.current_stream().cuda_stream`), or the
//! CPU engine on host tensors. `backei/torch.py` wraps it in `torch.autograd.Function`s and
//! `nn.Module`s.
//!
//! Every check of shape and dtype happens here, with backei's own error messages (those of the
//! CLI): shape and setting errors raise ValueError, dtype errors TypeError, CUDA errors
//! RuntimeError.

use backei::spec::{FiringMode, Surrogate};
use backei::{BackeiError, Precision};
use backei_capi::error::CapiError;
use backei_capi::layer::{BatchShape, Dtype, Engine, Layer, LayerConfig, Sizes, Workspace};
use dlpark::ffi::{DLDataTypeCode, DLDeviceType};
use dlpark::python::{from_dlpack, ImportedDlpack};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

fn py_err(e: CapiError) -> PyErr {
    let msg = e.to_string();
    match &e {
        CapiError::Backei(BackeiError::Cuda(_)) | CapiError::Backei(BackeiError::Io { .. }) => PyRuntimeError::new_err(msg),
        CapiError::Backei(BackeiError::Config { field, .. }) if field == "dtype" => PyTypeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

fn shape_err(place: &str, expected: String, got: String) -> PyErr {
    PyValueError::new_err(BackeiError::Shape { place: place.into(), expected, got }.to_string())
}

fn dtype_err(problem: String) -> PyErr {
    PyTypeError::new_err(BackeiError::Config { field: "dtype".into(), problem }.to_string())
}

/// The element type of a torch dtype's name (`str(tensor.dtype)`).
fn dtype_of(name: &str, engine: Engine) -> PyResult<Dtype> {
    match (name, engine) {
        ("torch.float32", _) => Ok(Dtype::F32),
        ("torch.float64", Engine::Cpu) => Ok(Dtype::F64),
        ("torch.float64", Engine::Cuda { .. }) => {
            Err(dtype_err("the CUDA kernels compute in float32; got a float64 tensor on CUDA (float64 runs on the CPU engine)".into()))
        }
        (other, _) => Err(dtype_err(format!("{other} is not supported: use torch.float32 (or torch.float64 on the CPU)"))),
    }
}

/// Whether the strides (None: compact) lay the tensor out densely in row-major order; a dimension
/// of size 1 may have any stride (PyTorch gives such dimensions arbitrary ones).
fn row_major(shape: &[i64], strides: Option<&[i64]>) -> bool {
    let Some(strides) = strides else { return true };
    let mut want = 1i64;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != want {
            return false;
        }
        want = want.saturating_mul(n);
    }
    true
}

/// An imported tensor: the capsule's owner keeps its memory alive while this lives.
struct Tensor {
    _held: ImportedDlpack,
    name: &'static str,
    addr: u64,
    len: usize,
    device: (DLDeviceType, i32),
    dtype: (u8, u8, u16),
    compact: bool,
}

impl Tensor {
    /// Imports a DLPack capsule (single use: each capsule is consumed here).
    fn open(name: &'static str, capsule: &Bound<'_, PyAny>) -> PyResult<Tensor> {
        let held = from_dlpack(capsule.as_borrowed(), None, None)?;
        let t = held.validate().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        let (dev, dt) = (t.device(), t.dtype());
        let compact = row_major(t.shape(), t.strides());
        let len = t.num_elements();
        // SAFETY: a validated descriptor; the address is only handed to the layer, which stays
        // inside the length checked by `expect`.
        let addr = unsafe { t.offset_bytes_ptr() }.map_err(|e| PyValueError::new_err(format!("{name}: {e}")))? as u64;
        Ok(Tensor {
            _held: held,
            name,
            addr,
            len,
            device: (dev.device_type, dev.device_id),
            dtype: (dt.code.0, dt.bits, dt.lanes),
            compact,
        })
    }

    /// The float type of this tensor for the layer's engine.
    fn float_dtype(&self, engine: Engine) -> PyResult<Dtype> {
        match self.dtype {
            (c, 32, 1) if c == DLDataTypeCode::FLOAT.0 => Ok(Dtype::F32),
            (c, 64, 1) if c == DLDataTypeCode::FLOAT.0 => dtype_of("torch.float64", engine),
            (c, bits, _) => Err(dtype_err(format!(
                "{} has DLPack type code {c} with {bits} bits: use torch.float32 (or torch.float64 on the CPU)",
                self.name
            ))),
        }
    }

    /// Checks device, element type (None: bytes), layout and length (`at_least`: a workspace).
    fn expect(&self, engine: Engine, dtype: Option<Dtype>, len: usize, at_least: bool) -> PyResult<()> {
        let name = self.name;
        let on_engine = match engine {
            Engine::Cpu => self.device.0 == DLDeviceType::CPU,
            Engine::Cuda { ordinal } => self.device.0 == DLDeviceType::CUDA && self.device.1 as usize == ordinal,
        };
        if !on_engine {
            let want = match engine {
                Engine::Cpu => "the CPU".to_string(),
                Engine::Cuda { ordinal } => format!("cuda:{ordinal}"),
            };
            return Err(PyValueError::new_err(format!(
                "{name} is on DLPack device {:?}:{}, this layer runs on {want}: move it with .to()",
                self.device.0, self.device.1
            )));
        }
        let (code, bits) = match dtype {
            Some(Dtype::F32) => (DLDataTypeCode::FLOAT.0, 32),
            Some(Dtype::F64) => (DLDataTypeCode::FLOAT.0, 64),
            None => (DLDataTypeCode::UINT.0, 8),
        };
        if self.dtype != (code, bits, 1) {
            let want = match dtype {
                Some(Dtype::F32) => "float32 (as the input)",
                Some(Dtype::F64) => "float64 (as the input)",
                None => "uint8",
            };
            return Err(dtype_err(format!("{name} has DLPack type code {} with {} bits; it must be {want}", self.dtype.0, self.dtype.1)));
        }
        if !self.compact {
            return Err(PyValueError::new_err(format!("{name} is not contiguous: pass tensor.contiguous()")));
        }
        if (at_least && self.len < len) || (!at_least && self.len != len) {
            let want = if at_least { format!("at least {len} bytes") } else { format!("{len} elements") };
            return Err(shape_err(name, want, self.len.to_string()));
        }
        Ok(())
    }
}

#[pyclass(name = "Layer", module = "backei._backei", frozen)]
struct PyLayer {
    inner: Layer,
}

#[pymethods]
impl PyLayer {
    /// A layer of [C, H, W] on `device` ("cpu" or "cuda", with `index` the CUDA ordinal).
    #[new]
    #[pyo3(signature = (channels, height, width, *, back, ei, radius, delay, leak, threshold, surrogate, surrogate_param, smooth_k, precision, deterministic, device, index))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        channels: usize,
        height: usize,
        width: usize,
        back: bool,
        ei: bool,
        radius: usize,
        delay: usize,
        leak: f64,
        threshold: f64,
        surrogate: &str,
        surrogate_param: f64,
        smooth_k: Option<f64>,
        precision: &str,
        deterministic: bool,
        device: &str,
        index: usize,
    ) -> PyResult<Self> {
        let mut c = LayerConfig::backei(channels, height, width);
        c.feedback.back = back;
        c.feedback.ei = ei;
        c.feedback.radius = radius;
        c.feedback.delay = delay;
        c.neuron.leak = leak;
        c.neuron.threshold = threshold;
        c.neuron.surrogate = match surrogate {
            "rectangle" => Surrogate::Rectangle { width: surrogate_param },
            "sigmoid" => Surrogate::Sigmoid { alpha: surrogate_param },
            "atan" => Surrogate::Atan { alpha: surrogate_param },
            s => {
                let e = BackeiError::Config {
                    field: "surrogate".into(),
                    problem: format!("`{s}` is not a surrogate; use rectangle, sigmoid or atan"),
                };
                return Err(PyValueError::new_err(e.to_string()));
            }
        };
        c.neuron.mode = match smooth_k {
            None => FiringMode::Exact,
            Some(k) => FiringMode::Smooth { k },
        };
        c.precision = precision.parse::<Precision>().map_err(|e| PyValueError::new_err(e.to_string()))?;
        c.deterministic = deterministic;
        let engine = match device {
            "cpu" => Engine::Cpu,
            "cuda" => Engine::Cuda { ordinal: index },
            d => return Err(PyValueError::new_err(format!("device type `{d}`: backei runs on cpu and cuda tensors"))),
        };
        Ok(PyLayer { inner: Layer::new(c, engine).map_err(py_err)? })
    }

    /// Elements of the flat parameter buffer [W_b, b_b, W_e, b_e] (gates that are on only).
    #[getter]
    fn param_len(&self) -> usize {
        self.inner.config().param_len()
    }

    /// Checks an input of `shape` (torch.Size) and dtype name for T steps (None: T = T_in) and
    /// returns (T_in, B, T, saved_bytes, scratch_bytes).
    #[pyo3(signature = (shape, dtype, steps=None))]
    fn plan(&self, shape: Vec<i64>, dtype: &str, steps: Option<usize>) -> PyResult<(usize, usize, usize, usize, usize)> {
        let [c, h, w] = self.inner.config().shape;
        let dt = dtype_of(dtype, self.inner.engine())?;
        let want = format!("[T, B, {c}, {h}, {w}] (time-major: T steps, B samples, C·H·W of the layer)");
        if shape.len() != 5 || shape[2..] != [c as i64, h as i64, w as i64] || shape[0] < 1 || shape[1] < 1 {
            return Err(shape_err("BackEI layer input", want, format!("{shape:?}")));
        }
        let (t_in, batch) = (shape[0] as usize, shape[1] as usize);
        let steps = steps.unwrap_or(t_in);
        let b = BatchShape { batch, steps, t_in };
        let s = self.inner.sizes(b, dt).map_err(py_err)?;
        Ok((t_in, batch, steps, s.saved_bytes, s.scratch_bytes))
    }

    /// All T steps: s into `output` (the tensors as DLPack capsules; `stream` the CUDA stream's
    /// handle, 0 on the CPU). The GIL is released while the CPU engine computes.
    #[pyo3(signature = (t_in, batch, steps, stream, input, params, output, saved, scratch=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        py: Python<'_>,
        t_in: usize,
        batch: usize,
        steps: usize,
        stream: usize,
        input: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyAny>>,
        output: &Bound<'_, PyAny>,
        saved: &Bound<'_, PyAny>,
        scratch: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let x = Tensor::open("input", input)?;
        let call = Call::new(&self.inner, t_in, batch, steps, &x)?;
        let p = call.params("params", params)?;
        let y = call.tensor("output", output, call.sizes.output_len)?;
        let ws = call.workspace(saved, scratch)?;
        let (layer, b, dt) = (&self.inner, call.b, call.dtype);
        let (xa, pa, ya) = (x.addr, p.as_ref().map_or(0, |t| t.addr), y.addr);
        let w = ws.raw;
        let r = py.detach(move || {
            // SAFETY: every address was imported above with its length checked against sizes.
            unsafe {
                match (layer.engine(), dt) {
                    (Engine::Cuda { .. }, _) => layer.forward_cuda(stream as _, b, xa, pa, ya, w.get()),
                    (Engine::Cpu, Dtype::F32) => layer.forward_host::<f32>(b, xa as _, pa as _, ya as _, w.get()),
                    (Engine::Cpu, Dtype::F64) => layer.forward_host::<f64>(b, xa as _, pa as _, ya as _, w.get()),
                }
            }
        });
        drop((x, p, y, ws));
        r.map_err(py_err)
    }

    /// BPTT: ∂L/∂input into `grad_input`, ∂L/∂params ADDED into `grad_params`.
    #[pyo3(signature = (t_in, batch, steps, stream, input, params, output, grad_output, grad_input, grad_params, saved, scratch=None))]
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        py: Python<'_>,
        t_in: usize,
        batch: usize,
        steps: usize,
        stream: usize,
        input: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyAny>>,
        output: &Bound<'_, PyAny>,
        grad_output: &Bound<'_, PyAny>,
        grad_input: &Bound<'_, PyAny>,
        grad_params: Option<&Bound<'_, PyAny>>,
        saved: &Bound<'_, PyAny>,
        scratch: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let x = Tensor::open("input", input)?;
        let call = Call::new(&self.inner, t_in, batch, steps, &x)?;
        let p = call.params("params", params)?;
        let y = call.tensor("output", output, call.sizes.output_len)?;
        let dy = call.tensor("grad_output", grad_output, call.sizes.output_len)?;
        let dx = call.tensor("grad_input", grad_input, call.sizes.input_len)?;
        let dp = call.params("grad_params", grad_params)?;
        let ws = call.workspace(saved, scratch)?;
        let (layer, b, dt) = (&self.inner, call.b, call.dtype);
        let addrs = [x.addr, p.as_ref().map_or(0, |t| t.addr), y.addr, dy.addr, dx.addr, dp.as_ref().map_or(0, |t| t.addr)];
        let w = ws.raw;
        let r = py.detach(move || {
            let [xa, pa, ya, dya, dxa, dpa] = addrs;
            // SAFETY: every address was imported above with its length checked against sizes.
            unsafe {
                match (layer.engine(), dt) {
                    (Engine::Cuda { .. }, _) => layer.backward_cuda(stream as _, b, xa, pa, ya, dya, dxa, dpa, w.get()),
                    (Engine::Cpu, Dtype::F32) => {
                        layer.backward_host::<f32>(b, xa as _, pa as _, ya as _, dya as _, dxa as _, dpa as _, w.get())
                    }
                    (Engine::Cpu, Dtype::F64) => {
                        layer.backward_host::<f64>(b, xa as _, pa as _, ya as _, dya as _, dxa as _, dpa as _, w.get())
                    }
                }
            }
        });
        drop((x, p, y, dy, dx, dp, ws));
        r.map_err(py_err)
    }
}

/// One forward or backward: the batch shape, its sizes and the element type (the input's).
struct Call<'a> {
    layer: &'a Layer,
    b: BatchShape,
    sizes: Sizes,
    dtype: Dtype,
}

/// The workspace addresses, Send so the call can run without the GIL.
#[derive(Clone, Copy)]
struct RawWorkspace {
    saved: u64,
    saved_bytes: usize,
    scratch: u64,
    scratch_bytes: usize,
}

impl RawWorkspace {
    fn get(self) -> Workspace {
        Workspace {
            saved: self.saved as *mut u8,
            saved_bytes: self.saved_bytes,
            scratch: self.scratch as *mut u8,
            scratch_bytes: self.scratch_bytes,
        }
    }
}

struct HeldWorkspace {
    _saved: Tensor,
    _scratch: Option<Tensor>,
    raw: RawWorkspace,
}

impl<'a> Call<'a> {
    /// The call's batch shape and sizes; the element type is the input's (checked here).
    fn new(layer: &'a Layer, t_in: usize, batch: usize, steps: usize, input: &Tensor) -> PyResult<Self> {
        let dtype = input.float_dtype(layer.engine())?;
        let b = BatchShape { batch, steps, t_in };
        let sizes = layer.sizes(b, dtype).map_err(py_err)?;
        input.expect(layer.engine(), Some(dtype), sizes.input_len, false)?;
        Ok(Call { layer, b, sizes, dtype })
    }

    fn tensor(&self, name: &'static str, capsule: &Bound<'_, PyAny>, len: usize) -> PyResult<Tensor> {
        let t = Tensor::open(name, capsule)?;
        t.expect(self.layer.engine(), Some(self.dtype), len, false)?;
        Ok(t)
    }

    fn params(&self, name: &'static str, capsule: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Tensor>> {
        match capsule {
            None if self.sizes.param_len == 0 => Ok(None),
            None => Err(PyValueError::new_err(format!("{name}: {} parameters needed, none given", self.sizes.param_len))),
            Some(c) => self.tensor(name, c, self.sizes.param_len).map(Some),
        }
    }

    fn workspace(&self, saved: &Bound<'_, PyAny>, scratch: Option<&Bound<'_, PyAny>>) -> PyResult<HeldWorkspace> {
        let bytes = |name, c: &Bound<'_, PyAny>, need| -> PyResult<Tensor> {
            let t = Tensor::open(name, c)?;
            t.expect(self.layer.engine(), None, need, true)?;
            Ok(t)
        };
        let s = bytes("saved", saved, self.sizes.saved_bytes)?;
        let sc = match scratch {
            Some(c) => Some(bytes("scratch", c, self.sizes.scratch_bytes)?),
            None if self.sizes.scratch_bytes == 0 => None,
            None => return Err(PyValueError::new_err(format!("scratch: {} bytes needed, none given", self.sizes.scratch_bytes))),
        };
        let raw = RawWorkspace {
            saved: s.addr,
            saved_bytes: s.len,
            scratch: sc.as_ref().map_or(0, |t| t.addr),
            scratch_bytes: sc.as_ref().map_or(0, |t| t.len),
        };
        Ok(HeldWorkspace { _saved: s, _scratch: sc, raw })
    }
}

#[pymodule]
fn _backei(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLayer>()?;
    Ok(())
}
