//! The GPU engine behind a handle: `backei::gpu::backei_layer::GpuBackEiLayer` launched on the
//! CALLER's stream over the CALLER's device memory.
//!
//! - The stream: cudarc's `CudaContext::wrap_borrowed_stream` (dropping the wrapper never destroys
//!   it); the layer gets a view of the device on that stream for the call (`GpuDevice::on_stream`).
//! - The memory: every pointer (input, parameters, output, gradients, the two workspaces) becomes a
//!   `CudaSlice` through `CudaStream::upgrade_device_ptr` and goes back through `CudaSlice::leak`
//!   at the end of the call, on every path ([`Lent`], [`CallGuard`]): backei never frees it.
//! - No synchronisation: the context's event tracking is off, so cudarc records no events on the
//!   caller's buffers and never makes a stream wait; nothing here calls a synchronising CUDA
//!   function on the caller's stream. The only memory backei owns is the layer's one-float
//!   placeholder for a disabled gate (never dereferenced), allocated on backei's own stream.
//!
//! The layer's per-batch buffers (`BufferSizes`) are carved from the caller's workspaces, each
//! at a 256-byte boundary: v, g, z from `saved` (kept from forward to backward), the backward's
//! scratch and the tiled kernels' staged weights and grid barrier from `scratch`.

use crate::error::{invalid, CapiError, Result};
use crate::layer::{check_ptr, BatchShape, LayerConfig, Sizes, Workspace};
use backei::gpu::backei_layer::{BufferSizes, BufferSource, GpuBackEiLayer, LaunchPlan};
use backei::gpu::GpuDevice;
use backei::BackeiError;
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, OnceLock};

/// Every carve of a workspace starts at this boundary (the tiled kernels load float4s).
pub const WORKSPACE_ALIGN: usize = 256;

/// One device per ordinal per process: its context (event tracking off) and kernel registry, on
/// backei's own stream (which only ever sees the placeholder allocations).
fn device(ordinal: usize) -> Result<Arc<GpuDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<GpuDevice>>>> = OnceLock::new();
    let mut devices = DEVICES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devices.get(&ordinal) {
        return Ok(d.clone());
    }
    let dev = GpuDevice::open(ordinal)?;
    // SAFETY: before any slice of this context exists. The C ABI orders all work itself: every
    // call runs on the caller's one stream, and the caller keeps its memory alive until then.
    unsafe { dev.ctx.disable_event_tracking() };
    let own = dev.ctx.new_stream().map_err(cuda("creating backei's stream"))?;
    let dev = dev.on_stream(own);
    devices.insert(ordinal, dev.clone());
    Ok(dev)
}

fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CapiError {
    move |e| BackeiError::Cuda(format!("{what}: {e:?}")).into()
}

/// A caller's device memory as a `CudaSlice` for one call; leaked (never freed) when dropped.
struct Lent<T>(ManuallyDrop<CudaSlice<T>>);

impl<T: DeviceRepr> Lent<T> {
    /// # Safety
    /// `ptr` must address `len` elements of T on the stream's device for the call.
    unsafe fn new(stream: &Arc<CudaStream>, ptr: CUdeviceptr, len: usize) -> Self {
        Lent(ManuallyDrop::new(unsafe { stream.upgrade_device_ptr(ptr, len) }))
    }
}

impl<T> Drop for Lent<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the slice is never used again.
        let _ = unsafe { ManuallyDrop::take(&mut self.0) }.leak();
    }
}

impl<T> Deref for Lent<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.0
    }
}

impl<T> DerefMut for Lent<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.0
    }
}

/// Where each of the layer's buffers goes: the output is the caller's own tensor; v, g, z are
/// kept in `saved`; the rest is per-call `scratch`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Home {
    Output,
    Saved,
    Scratch,
}

fn home(which: &str) -> Home {
    match which {
        "out" => Home::Output,
        // v4's weight fragments and scales are kept too: the backward may read the forward's
        "v" | "g" | "z" | "v4_wfrag" | "v4_winv" => Home::Saved,
        _ => Home::Scratch,
    }
}

/// Bytes used so far of one workspace, each carve at [`WORKSPACE_ALIGN`].
#[derive(Default)]
struct Carver {
    used: usize,
}

impl Carver {
    fn carve(&mut self, bytes: usize) -> Result<usize> {
        let at = self.used.checked_next_multiple_of(WORKSPACE_ALIGN).ok_or_else(|| invalid("workspace", "size overflows"))?;
        self.used = at.checked_add(bytes).ok_or_else(|| invalid("workspace", "size overflows"))?;
        Ok(at)
    }
}

/// The carves of a plan, in the order `GpuBackEiLayer::prepare_lent` asks for its buffers.
fn named_buffers(b: &BufferSizes) -> [(&'static str, usize); 13] {
    [
        ("out", b.out),
        ("v", b.v),
        ("g", b.g),
        ("z", b.z),
        ("dv", b.dv),
        ("fb", b.fb),
        ("dz", b.dz),
        ("da", b.da),
        ("wg_partials", b.wg_partials),
        ("staged_weights", b.staged_weights),
        ("v4_wfrag", b.v4_wfrag),
        ("v4_winv", b.v4_winv),
        ("v4_dw_part", b.v4_dw_part),
    ]
}

/// (saved, scratch) bytes of a plan.
fn workspace_bytes(plan: &LaunchPlan) -> Result<(usize, usize)> {
    let (mut saved, mut scratch) = (Carver::default(), Carver::default());
    for (which, n) in named_buffers(&plan.buffers) {
        let bytes = n.checked_mul(4).ok_or_else(|| invalid("workspace", "size overflows"))?;
        match home(which) {
            _ if n == 0 => {}
            Home::Output => {}
            Home::Saved => _ = saved.carve(bytes)?,
            Home::Scratch => _ = scratch.carve(bytes)?,
        }
    }
    if plan.sync_words() > 0 {
        scratch.carve(4 * plan.sync_words())?; // the grid barrier (v4: and the blocks' phase counts)
    }
    Ok((saved.used, scratch.used))
}

/// Lends the layer the caller's memory for one call.
struct Lender<'a> {
    stream: &'a Arc<CudaStream>,
    output: (CUdeviceptr, usize),
    saved: (CUdeviceptr, usize, Carver),
    scratch: (CUdeviceptr, usize, Carver),
}

impl Lender<'_> {
    fn region(&mut self, home: Home, bytes: usize) -> Result<CUdeviceptr> {
        let (name, (base, cap, carver)) = match home {
            Home::Saved => ("saved_bytes", &mut self.saved),
            _ => ("scratch_bytes", &mut self.scratch),
        };
        let at = carver.carve(bytes)?;
        if carver.used > *cap || *base == 0 {
            return Err(invalid(
                name,
                format!("{cap} bytes given, this batch shape needs at least {} (ask backei_workspace_size)", carver.used),
            ));
        }
        Ok(*base + at as CUdeviceptr)
    }
}

impl BufferSource for Lender<'_> {
    fn floats(&mut self, which: &'static str, n: usize) -> backei::Result<Option<CudaSlice<f32>>> {
        if n == 0 {
            return Ok(None);
        }
        let to_backei = |e: CapiError| BackeiError::Config { field: "workspace".into(), problem: e.to_string() };
        let ptr = match home(which) {
            Home::Output => {
                if n != self.output.1 {
                    return Err(BackeiError::Shape {
                        place: "BackEI output".into(),
                        expected: format!("{n} floats"),
                        got: self.output.1.to_string(),
                    });
                }
                self.output.0
            }
            h => self.region(h, n * 4).map_err(to_backei)?,
        };
        // SAFETY: inside the caller's tensor or workspace (sizes checked above).
        Ok(Some(unsafe { self.stream.upgrade_device_ptr(ptr, n) }))
    }

    fn barrier(&mut self, words: usize) -> backei::Result<CudaSlice<u32>> {
        let to_backei = |e: CapiError| BackeiError::Config { field: "workspace".into(), problem: e.to_string() };
        let ptr = self.region(Home::Scratch, 4 * words).map_err(to_backei)?;
        // SAFETY: inside the caller's scratch workspace.
        Ok(unsafe { self.stream.upgrade_device_ptr(ptr, words) })
    }
}

/// The layer during one call: on the caller's stream, holding lent buffers. Dropping it (on every
/// path, errors and panics included) leaks the lent buffers back and returns the layer to
/// backei's own stream, so the layer never keeps a caller's stream or memory.
struct CallGuard<'a> {
    layer: &'a mut GpuBackEiLayer,
    home: Arc<GpuDevice>,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let (floats, bar) = self.layer.take_buffers();
        for s in floats {
            let _ = s.leak();
        }
        if let Some(b) = bar {
            let _ = b.leak();
        }
        self.layer.dev = self.home.clone();
    }
}

/// The device pointers of a backward.
pub struct BackwardArgs {
    pub input: u64,
    pub params: u64,
    pub output: u64,
    pub grad_output: u64,
    pub grad_input: u64,
    pub grad_params: u64,
}

pub struct CudaLayer {
    home: Arc<GpuDevice>,
    layer: GpuBackEiLayer,
}

impl CudaLayer {
    pub fn new(config: &LayerConfig, ordinal: usize) -> Result<CudaLayer> {
        let home = device(ordinal)?;
        let mut layer = GpuBackEiLayer::new(&home, config.shape, config.feedback, &config.neuron)?;
        layer.deterministic = config.deterministic;
        layer.precision = config.precision;
        // the placeholder was allocated on backei's stream: ready before any caller stream uses it
        home.synchronize()?;
        Ok(CudaLayer { home, layer })
    }

    pub fn workspace_bytes(&self, b: BatchShape) -> Result<(usize, usize)> {
        workspace_bytes(&self.layer.plan_for(b.batch, b.steps)?)
    }

    /// Puts the layer on the caller's stream with the caller's memory lent for this call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn begin<'a>(
        &'a mut self,
        stream: CUstream,
        b: BatchShape,
        sizes: &Sizes,
        output: u64,
        ws: Workspace,
    ) -> Result<(CallGuard<'a>, Arc<CudaStream>)> {
        check_ptr("output", output as usize, 4)?;
        for (name, p) in [("saved", ws.saved as usize), ("scratch", ws.scratch as usize)] {
            if p % WORKSPACE_ALIGN != 0 {
                return Err(invalid(name, format!("address {p:#x} is not aligned to {WORKSPACE_ALIGN} bytes")));
            }
        }
        for (name, given, need) in
            [("saved_bytes", ws.saved_bytes, sizes.saved_bytes), ("scratch_bytes", ws.scratch_bytes, sizes.scratch_bytes)]
        {
            if given < need {
                return Err(invalid(name, format!("{given} bytes given, this batch shape needs {need} (ask backei_workspace_size)")));
            }
        }
        self.home.ctx.bind_to_thread().map_err(cuda("making the device's primary context current"))?;
        // SAFETY: the caller's live stream of this context; the wrapper never destroys it.
        let stream = unsafe { self.home.ctx.wrap_borrowed_stream(stream) };
        let home = self.home.clone();
        self.layer.dev = home.on_stream(stream.clone());
        let guard = CallGuard { layer: &mut self.layer, home };
        let mut lender = Lender {
            stream: &stream,
            output: (output, sizes.output_len),
            saved: (ws.saved as CUdeviceptr, ws.saved_bytes, Carver::default()),
            scratch: (ws.scratch as CUdeviceptr, ws.scratch_bytes, Carver::default()),
        };
        guard.layer.prepare_lent(b.batch, b.steps, b.t_in, &mut lender)?;
        Ok((guard, stream))
    }

    /// # Safety
    /// See `Layer::forward_cuda`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        &mut self,
        config: &LayerConfig,
        stream: CUstream,
        b: BatchShape,
        sizes: &Sizes,
        input: u64,
        params: u64,
        output: u64,
        ws: Workspace,
    ) -> Result<()> {
        check_ptr("input", input as usize, 4)?;
        let (call, stream) = unsafe { self.begin(stream, b, sizes, output, ws)? };
        let params = unsafe { lent_params(&stream, params, sizes.param_len)? };
        // SAFETY: the caller's input of input_len floats.
        let x = unsafe { Lent::<f32>::new(&stream, input, sizes.input_len) };
        call.layer.forward(&params, &config.slots(), &x.as_view(), b.t_in, b.batch, b.steps)?;
        Ok(())
    }

    /// # Safety
    /// See `Layer::backward_cuda`.
    pub unsafe fn backward(
        &mut self,
        config: &LayerConfig,
        stream: CUstream,
        b: BatchShape,
        sizes: &Sizes,
        a: BackwardArgs,
        ws: Workspace,
    ) -> Result<()> {
        for (name, p) in [("input", a.input), ("grad_output", a.grad_output), ("grad_input", a.grad_input)] {
            check_ptr(name, p as usize, 4)?;
        }
        let (call, stream) = unsafe { self.begin(stream, b, sizes, a.output, ws)? };
        let params = unsafe { lent_params(&stream, a.params, sizes.param_len)? };
        let mut grads = unsafe { lent_params(&stream, a.grad_params, sizes.param_len)? };
        // SAFETY: the caller's tensors of the lengths Layer::sizes gives.
        let x = unsafe { Lent::<f32>::new(&stream, a.input, sizes.input_len) };
        let dy = unsafe { Lent::<f32>::new(&stream, a.grad_output, sizes.output_len) };
        let mut dx = unsafe { Lent::<f32>::new(&stream, a.grad_input, sizes.input_len) };
        call.layer.backward(&params, &mut grads, &config.slots(), &x.as_view(), b.t_in, &dy.as_view(), &mut dx.as_view_mut())?;
        Ok(())
    }
}

/// The flat parameters (or their gradient): a plain layer has none and may pass NULL; the kernels
/// still take a pointer, so an empty slice stands in.
unsafe fn lent_params(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Result<Lent<f32>> {
    if len == 0 {
        // a non-null address the kernels never read (a plain layer has no gate weights)
        return Ok(unsafe { Lent::new(stream, if ptr == 0 { WORKSPACE_ALIGN as u64 } else { ptr }, 0) });
    }
    check_ptr("params", ptr as usize, 4)?;
    Ok(unsafe { Lent::new(stream, ptr, len) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use backei::gpu::backei_layer::{plan_tensor_cores, plan_version, DeviceLimits, KernelVersion};
    use backei::spec::FeedbackConfig;
    use backei::Precision;

    #[test]
    fn workspaces_hold_every_buffer_of_every_plan_at_aligned_offsets() {
        let fb = FeedbackConfig::default();
        for v in [KernelVersion::V1, KernelVersion::V2, KernelVersion::V3] {
            for (shape, b, t) in [([4, 6, 7], 2, 5), ([64, 14, 14], 8, 20), ([16, 1, 1], 3, 4)] {
                let fb = if shape[1] == 1 { FeedbackConfig { back: false, ei: false, ..fb } } else { fb };
                let plan = plan_version(shape, &fb, b, t, &DeviceLimits::H100, v).unwrap();
                let (saved, scratch) = workspace_bytes(&plan).unwrap();
                let p = plan.buffers;
                assert!(saved >= 4 * (p.v + p.g + p.z), "{shape:?} {v:?}");
                assert!(saved < 4 * (p.v + p.g + p.z) + 3 * WORKSPACE_ALIGN);
                let scratch_floats = p.dv + p.fb + p.dz + p.da + p.wg_partials + p.staged_weights;
                assert!(scratch >= 4 * scratch_floats + if plan.version.is_tiled() { 4 } else { 0 });
                assert_eq!((p.v4_wfrag, p.v4_winv, p.v4_dw_part), (0, 0, 0));
                assert!(scratch < 4 * scratch_floats + 8 * WORKSPACE_ALIGN);
            }
        }
        // v4 (tensor cores): its weight fragments and scales are kept, its partial sums scratch
        let plan = plan_tensor_cores([32, 28, 28], &fb, 4, 6, &DeviceLimits::H100, Precision::Bf16).unwrap();
        let p = plan.buffers;
        let (saved, scratch) = workspace_bytes(&plan).unwrap();
        assert!(saved >= 4 * (p.v + p.g + p.z + p.v4_wfrag + p.v4_winv), "{p:?}");
        // (the sync buffer: the grid barrier and one phase count per block)
        assert_eq!(plan.sync_words(), 1 + plan.v4.as_ref().unwrap().grid as usize);
        assert!(scratch >= 4 * (p.dv + p.fb + p.dz + p.da + p.v4_dw_part + plan.sync_words()), "{p:?}");
    }
}
