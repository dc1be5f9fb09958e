//! Gradients all-reduced on the GPU by NCCL (feature `nccl`, part of `distributed`).
//!
//! Rendezvous: rank 0 draws the NCCL unique id, the world broadcasts it (over MPI), and every
//! rank joins the communicator with its rank. Each step, the buckets of `dist::buckets` are
//! all-reduced (sum) in place in the network's flat gradient buffer on a stream of their own,
//! each launched as soon as the backward has enqueued its layers (a CUDA event on the compute
//! stream, waited for by the NCCL stream), so the reduction of the last layers overlaps the
//! backward of the first ones. `finish` makes the compute stream wait for the last bucket
//! before the optimizer reads the gradients.
//!
//! Loading: NCCL is opened at run time, never linked, and probed before any use, so a machine
//! without it gets an error naming the fix, never a panic. cudarc's own NCCL loader (behind its
//! `nccl` feature, whose types this module uses) looks for `libnccl.so` and `libnccl.so.<CUDA
//! major>` but not `libnccl.so.2`, the only name pip's `nvidia-nccl-cu12`/`-cu13` wheels ship, so
//! the library is opened here instead (`BACKEI_NCCL`, then `libnccl.so.2`, `libnccl.so`, then the
//! wheel's folder next to any pip `nvidia/*/lib` folder on LD_LIBRARY_PATH) and cudarc's NCCL
//! functions are never called. Results and reduction ops cross the boundary as plain integers
//! (NCCL may return values a Rust enum does not list).
//!
//! The NCCL stream is created through the driver API, not as a cudarc stream, and the device
//! runs without cudarc's per-buffer event tracking (`gpu::device`): the ordering between the
//! network's stream and the NCCL stream is exactly the two events below.

use super::buckets;
use super::collective::Collective;
use crate::error::{BackeiError, Result};
use crate::gpu::GpuNetwork;
use cudarc::driver::sys::{CUdeviceptr, CUevent, CUevent_flags, CUevent_wait_flags, CUstream};
use cudarc::driver::{result as cu, CudaContext, CudaStream, DevicePtr};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::ops::Range;
use std::sync::{Arc, OnceLock};

const NCCL_SUM: c_int = 0;

type NcclStream = cudarc::nccl::sys::cudaStream_t;

/// The NCCL entry points this module uses, resolved once from the library found.
pub struct NcclLib {
    pub path: String,
    pub version: i32,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, NcclStream) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    _lib: libloading::Library,
}

/// The file names tried, in order.
fn candidates() -> Vec<String> {
    let mut c = Vec::new();
    if let Ok(p) = std::env::var("BACKEI_NCCL") {
        c.push(p);
    }
    c.push("libnccl.so.2".into());
    c.push("libnccl.so".into());
    // pip puts each CUDA library in site-packages/nvidia/<name>/lib: where one is on the path,
    // the NCCL wheel's folder is its sibling
    for dir in std::env::var("LD_LIBRARY_PATH").unwrap_or_default().split(':') {
        if let Some(i) = dir.rfind("/nvidia/") {
            let p = format!("{}/nvidia/nccl/lib/libnccl.so.2", &dir[..i]);
            if !c.contains(&p) {
                c.push(p);
            }
        }
    }
    c
}

fn load() -> std::result::Result<NcclLib, String> {
    let mut tried = Vec::new();
    for name in candidates() {
        // SAFETY: loading NCCL runs its initialisers, which only set up the library.
        match unsafe { libloading::Library::new(&name) } {
            Ok(lib) => return resolve(lib, name),
            Err(e) => tried.push(format!("{name} ({e})")),
        }
    }
    Err(format!(
        "NCCL not found (tried {}): install it (pip install nvidia-nccl-cu12, or your distribution's libnccl2) and put the folder holding libnccl.so.2 on LD_LIBRARY_PATH, or set BACKEI_NCCL=/path/to/libnccl.so.2",
        tried.join("; ")
    ))
}

fn resolve(lib: libloading::Library, path: String) -> std::result::Result<NcclLib, String> {
    // SAFETY: each symbol is looked up with the C signature NCCL 2.x declares for it.
    unsafe {
        macro_rules! sym {
            ($name:literal) => {
                *lib.get($name.as_bytes()).map_err(|e| format!("{path} lacks {}: {e} (not an NCCL 2 library?)", $name))?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = sym!("ncclGetVersion");
        let mut version = 0;
        if get_version(&mut version) != 0 {
            return Err(format!("{path}: ncclGetVersion failed"));
        }
        Ok(NcclLib {
            version,
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_abort: sym!("ncclCommAbort"),
            all_reduce: sym!("ncclAllReduce"),
            get_error_string: sym!("ncclGetErrorString"),
            path,
            _lib: lib,
        })
    }
}

/// NCCL, loaded once per process, or why it could not be.
pub fn library() -> Result<&'static NcclLib> {
    static LIB: OnceLock<std::result::Result<NcclLib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(|e| BackeiError::Distributed(e.clone()))
}

impl NcclLib {
    fn check(&self, what: &str, r: c_int) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(r)) }.to_string_lossy().into_owned();
        Err(BackeiError::Distributed(format!("{what}: NCCL error {r} ({text})")))
    }

    /// "NCCL 2.27.3 (path)".
    pub fn describe(&self) -> String {
        let v = self.version;
        let (major, minor, patch) =
            if v >= 10_000 { (v / 10_000, (v % 10_000) / 100, v % 100) } else { (v / 1000, (v % 1000) / 100, v % 100) };
        format!("NCCL {major}.{minor}.{patch} ({})", self.path)
    }
}

fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BackeiError {
    move |e| BackeiError::Cuda(format!("{what}: {e:?}"))
}

/// One rank's NCCL communicator bound to one network's gradient buffer.
pub struct NcclReducer {
    lib: &'static NcclLib,
    comm: ncclComm_t,
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    stream: CUstream,
    /// Recorded on the compute stream before a bucket's launch; on the NCCL stream after the last.
    ready: CUevent,
    done: CUevent,
    grads: CUdeviceptr,
    len: usize,
    buckets: Vec<Range<usize>>,
    /// Buckets launched in the current step.
    launched: usize,
    /// Set when a call failed: the communicator is then aborted rather than destroyed.
    broken: bool,
}

impl NcclReducer {
    /// Joins the NCCL communicator of every rank of `world` (a collective call: every rank
    /// makes it) for the gradients of `net`, with buckets of `bucket_bytes`.
    pub fn new(world: &dyn Collective, net: &GpuNetwork, bucket_bytes: usize) -> Result<NcclReducer> {
        let lib = library()?;
        let ctx = net.dev.ctx.clone();
        ctx.bind_to_thread().map_err(cuda("binding the context"))?;
        let mut id = ncclUniqueId { internal: [0; 128] };
        if world.rank() == 0 {
            // SAFETY: id is a valid out-pointer.
            lib.check("ncclGetUniqueId", unsafe { (lib.get_unique_id)(&mut id) })?;
        }
        let mut bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        world.broadcast(&mut bytes)?;
        if bytes.len() != id.internal.len() {
            return Err(BackeiError::Distributed(format!("the NCCL id arrived with {} bytes, not 128", bytes.len())));
        }
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as c_char;
        }
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: the context is current; comm is a valid out-pointer; every rank passes the same
        // id and size and its own rank.
        let r = unsafe { (lib.comm_init_rank)(&mut comm, world.size() as c_int, id, world.rank() as c_int) };
        lib.check("ncclCommInitRank (NCCL needs one GPU per rank: two ranks on one GPU are refused)", r)?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(cuda("creating the NCCL stream"))?;
        let ready = cu::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(cuda("creating an event"))?;
        let done = cu::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(cuda("creating an event"))?;
        let compute = net.dev.stream.clone();
        // The buffer lives as long as the network; without event tracking the returned guard
        // records nothing.
        let grads = net.grads.device_ptr(&compute).0;
        let len = net.num_params();
        let buckets = buckets::plan(&net.layer_param_starts(), len, (bucket_bytes / 4).max(1));
        Ok(NcclReducer { lib, comm, ctx, compute, stream, ready, done, grads, len, buckets, launched: 0, broken: false })
    }

    /// The buckets, in launch order.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    fn launch_next(&mut self) -> Result<()> {
        let b = self.buckets[self.launched].clone();
        let ptr = (self.grads + (b.start * 4) as u64) as *mut c_void;
        // SAFETY: the events and streams are live; the bucket lies inside the gradient buffer;
        // the NCCL stream waits for the compute stream's work up to now (the bucket's backward).
        let r = unsafe {
            cu::event::record(self.ready, self.compute.cu_stream()).map_err(cuda("recording the gradients-ready event"))?;
            cu::stream::wait_event(self.stream, self.ready, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(cuda("ordering the NCCL stream after the backward"))?;
            (self.lib.all_reduce)(ptr, ptr, b.len(), ncclDataType_t::ncclFloat32, NCCL_SUM, self.comm, self.stream as NcclStream)
        };
        self.launched += 1;
        self.lib.check("ncclAllReduce of the gradients", r).inspect_err(|_| self.broken = true)
    }

    /// The backward has enqueued every gradient from flat index `lo` on: launch the buckets
    /// that lie there.
    pub fn ready(&mut self, lo: usize) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda("binding the context"))?;
        while self.launched < self.buckets.len() && self.buckets[self.launched].start >= lo {
            self.launch_next()?;
        }
        Ok(())
    }

    /// Launches the buckets not yet launched (all of them for a rank without samples this
    /// step), and orders the compute stream after the last; ready for the next step.
    pub fn finish(&mut self, num_params: usize) -> Result<()> {
        if num_params != self.len {
            return Err(BackeiError::Distributed(format!(
                "the NCCL reducer was built for {} parameters, the network has {num_params}",
                self.len
            )));
        }
        self.ctx.bind_to_thread().map_err(cuda("binding the context"))?;
        while self.launched < self.buckets.len() {
            self.launch_next()?;
        }
        self.launched = 0;
        // SAFETY: live event and streams.
        unsafe {
            cu::event::record(self.done, self.stream).map_err(cuda("recording the all-reduce's end"))?;
            cu::stream::wait_event(self.compute.cu_stream(), self.done, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(cuda("ordering the optimizer after the all-reduce"))?;
        }
        Ok(())
    }
}

impl Drop for NcclReducer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: each handle was created in `new` and is released once, here. A communicator
        // whose call failed (or whose peers may be gone) is aborted: destroying it could wait
        // for ever.
        unsafe {
            if self.broken {
                (self.lib.comm_abort)(self.comm);
            } else {
                let _ = cu::stream::synchronize(self.stream);
                (self.lib.comm_destroy)(self.comm);
            }
            let _ = cu::event::destroy(self.ready);
            let _ = cu::event::destroy(self.done);
            let _ = cu::stream::destroy(self.stream);
        }
    }
}
