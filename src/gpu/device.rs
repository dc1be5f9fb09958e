//! Finding the GPU: the driver, NVRTC and cuBLAS are loaded dynamically, and each is probed with
//! `is_culib_present()` before first use, so a machine without CUDA gets an error, never a panic.

use super::kernels::{nvrtc_present, KernelRegistry};
use crate::error::{BackeiError, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaStream};
use std::sync::{Arc, OnceLock};

/// What `backei info` reports about CUDA on this machine.
#[derive(Clone, Debug)]
pub struct CudaReport {
    pub driver: std::result::Result<i32, String>,
    pub nvrtc: std::result::Result<(i32, i32), String>,
    pub cublas: bool,
    pub devices: Vec<(String, (i32, i32), usize)>,
}

pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen libcublas.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> BackeiError + '_ {
    move |e| BackeiError::Cuda(format!("{what}: {e:?}"))
}

/// Every CUDA fact this machine can tell, without failing.
pub fn report() -> CudaReport {
    let driver = if driver_present() {
        cudarc::driver::result::init().map_err(|e| format!("{e:?}")).and_then(|_| {
            let mut v = 0;
            // SAFETY: the library is loaded and initialised; v is a valid out-pointer.
            let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
            if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                Ok(v)
            } else {
                Err(format!("cuDriverGetVersion: {r:?}"))
            }
        })
    } else {
        Err("libcuda.so not found (no NVIDIA driver)".into())
    };
    let nvrtc = if nvrtc_present() {
        super::kernels::nvrtc_version().map_err(|e| e.to_string())
    } else {
        Err(format!("libnvrtc.so not found: {}", super::wheels::NVRTC_HELP))
    };
    let mut devices = Vec::new();
    if driver.is_ok() {
        let n = CudaContext::device_count().unwrap_or(0);
        for i in 0..n.max(0) as usize {
            if let Ok(ctx) = CudaContext::new(i) {
                devices.push((ctx.name().unwrap_or_default(), ctx.compute_capability().unwrap_or((0, 0)), ctx.total_mem().unwrap_or(0)));
            }
        }
    }
    CudaReport { driver, nvrtc, cublas: cublas_present(), devices }
}

/// Bytes of the workspace cuBLAS gets (`cublasSetWorkspace`): its GEMMs then never allocate,
/// which a captured CUDA graph requires; 32 MiB is what NVIDIA recommends for Hopper.
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// One GPU: its context and stream, the kernel registry, and cuBLAS.
///
/// Everything runs on ONE stream of our own (not the legacy default stream, which cannot be
/// captured into a CUDA graph), in order; cudarc's per-buffer event tracking, which orders work
/// across streams, is off (there is one stream), so that a captured graph holds only our launches.
pub struct GpuDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    /// (major, minor) compute capability.
    pub capability: (i32, i32),
    /// Shared by every [`GpuDevice::on_stream`] view of this device: modules load once.
    pub kernels: Arc<KernelRegistry>,
    blas: OnceLock<(CudaBlas, cudarc::driver::CudaSlice<u8>)>,
}

// SAFETY: CudaBlas holds a handle bound to our one stream; all use goes through &GpuDevice on the
// thread that drives the stream.
unsafe impl Sync for GpuDevice {}
unsafe impl Send for GpuDevice {}

impl GpuDevice {
    /// Opens GPU `ordinal`, or says plainly why it cannot.
    pub fn open(ordinal: usize) -> Result<Arc<GpuDevice>> {
        if !driver_present() {
            return Err(BackeiError::Cuda("no NVIDIA driver: libcuda.so could not be loaded (use --device cpu)".into()));
        }
        if !nvrtc_present() {
            return Err(BackeiError::Cuda(format!("NVRTC (libnvrtc.so) not found: {}", super::wheels::NVRTC_HELP)));
        }
        cudarc::driver::result::init().map_err(cuda_err("cuInit"))?;
        let n = CudaContext::device_count().map_err(cuda_err("cuDeviceGetCount"))?;
        if n <= 0 {
            return Err(BackeiError::Cuda("the driver found no CUDA device".into()));
        }
        if ordinal >= n as usize {
            return Err(BackeiError::Cuda(format!("cuda:{ordinal} asked for, but this machine has {n} device(s): cuda:0..cuda:{}", n - 1)));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating the context"))?;
        let capability = ctx.compute_capability().map_err(cuda_err("compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: before any buffer exists, and all work goes to the one stream below. Without
        // tracking, cudarc's page-locked slices no longer wait for their copies: host buffers
        // that copies read or fill are `staging::PinnedBuf`s, which keep their own event.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err("creating the stream"))?;
        let arch = format!("sm_{}{}", capability.0, capability.1);
        let kernels = Arc::new(KernelRegistry::new(ctx.clone(), arch));
        Ok(Arc::new(GpuDevice { ctx, stream, ordinal, name, capability, kernels, blas: OnceLock::new() }))
    }

    /// This device's context and kernels driving another stream: the C ABI and the PyTorch layers
    /// launch on the stream their caller gives them. cuBLAS is not shared (a handle binds to one
    /// stream); the view loads its own at first use.
    pub fn on_stream(&self, stream: Arc<CudaStream>) -> Arc<GpuDevice> {
        Arc::new(GpuDevice {
            ctx: self.ctx.clone(),
            stream,
            ordinal: self.ordinal,
            name: self.name.clone(),
            capability: self.capability,
            kernels: self.kernels.clone(),
            blas: OnceLock::new(),
        })
    }

    /// cuBLAS on this device's stream with its own workspace (loaded at first use).
    pub fn blas(&self) -> Result<&CudaBlas> {
        if let Some((b, _)) = self.blas.get() {
            return Ok(b);
        }
        if !cublas_present() {
            return Err(BackeiError::Cuda("cuBLAS (libcublas.so) not found: install the CUDA toolkit or pip nvidia-cublas-cu12".into()));
        }
        let b = CudaBlas::new(self.stream.clone()).map_err(|e| BackeiError::Cuda(format!("cublasCreate: {e:?}")))?;
        let mut ws = self.stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES).map_err(cuda_err("allocating the cuBLAS workspace"))?;
        {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _sync) = ws.device_ptr_mut(&self.stream);
            // SAFETY: the workspace outlives the handle (both live in `self.blas`) and is used
            // by this handle only, on its stream.
            let r =
                unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*b.handle(), ptr as *mut std::ffi::c_void, CUBLAS_WORKSPACE_BYTES) };
            if r != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(BackeiError::Cuda(format!("cublasSetWorkspace: {r:?}")));
            }
        }
        Ok(&self.blas.get_or_init(|| (b, ws)).0)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }
}

/// Which engine a run uses: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

/// Resolves a choice: `Ok(Some(gpu))` for the GPU engine, `Ok(None)` for the CPU engine, with a
/// line saying which was chosen and why. `auto` falls back to the CPU; `cuda` does not.
pub fn choose(choice: DeviceChoice) -> Result<(Option<Arc<GpuDevice>>, String)> {
    match choice {
        DeviceChoice::Cpu => Ok((None, "engine: CPU (--device cpu)".into())),
        DeviceChoice::Cuda(n) => {
            let d = GpuDevice::open(n)?;
            let line = format!("engine: GPU cuda:{n} {} ({})", d.name, d.kernels.arch());
            Ok((Some(d), line))
        }
        DeviceChoice::Auto => match GpuDevice::open(0) {
            Ok(d) => {
                let line = format!("engine: GPU cuda:0 {} ({}) — chosen by --device auto", d.name, d.kernels.arch());
                Ok((Some(d), line))
            }
            Err(e) => Ok((None, format!("engine: CPU — --device auto found no usable GPU ({e})"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cuda:3".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(3));
        assert!("gpu".parse::<DeviceChoice>().unwrap_err().contains("expected auto"));
    }
}
