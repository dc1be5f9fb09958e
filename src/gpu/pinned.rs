//! Page-locked (pinned) host buffers for the loader, so that the GPU engine's upload of each
//! batch (`memcpy_htod` in `network.rs`) is a direct DMA instead of a copy through the driver's
//! staging buffer.
//!
//! `PinnedAllocator` registers each `Vec<f32>` the loader allocates with
//! `cuMemHostRegister` (whole capacity, flags 0) and unregisters it with `cuMemHostUnregister`
//! in `release`; the loader guarantees that every buffer goes back through `release` before it
//! is freed (freed-while-registered memory makes later registrations at the same address fail,
//! and the driver would keep pinning pages the program no longer owns). The loader calls
//! `allocate` and `release` from its background threads too, so each call first binds the CUDA
//! context to the calling thread.
//!
//! Pinning is an optimisation, never a requirement: when there is no context, or binding it or
//! registering fails (e.g. a `memlock` limit), the allocator prints one warning and from then on
//! hands out plain pageable memory; it never panics.
//!
//! Pinned memory makes the upload truly asynchronous: `memcpy_htod` returns before the DMA has
//! read the buffer. `GpuNetwork::forward` therefore waits on an event recorded after the upload
//! before it returns, so a batch dropped (and its buffer refilled by a loader thread) after a
//! training or evaluation step can never race with the copy.

use super::device::driver_present;
use crate::data::BufferAllocator;
use cudarc::driver::{sys, CudaContext};
use std::collections::HashSet;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A [`BufferAllocator`] of page-locked host memory (see the module docs).
pub struct PinnedAllocator {
    ctx: Option<Arc<CudaContext>>,
    /// Start addresses of the buffers registered here and not yet unregistered.
    registered: Mutex<HashSet<usize>>,
    /// Why buffers are pageable: set by the first failure (or at construction without a
    /// context); from then on no registration is tried.
    fallback: Mutex<Option<String>>,
    warned_fallback: AtomicBool,
    warned_unregister: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a CUDA driver call, turning a failure or a panic (a symbol the loaded driver lacks)
/// into an error message.
fn driver_call(what: &str, f: impl FnOnce() -> sys::CUresult) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(sys::CUresult::CUDA_SUCCESS) => Ok(()),
        Ok(r) => Err(format!("{what}: {r:?}")),
        Err(_) => Err(format!("{what}: the CUDA driver call panicked")),
    }
}

impl PinnedAllocator {
    /// Pins buffers for `ctx`'s device.
    pub fn new(ctx: Arc<CudaContext>) -> PinnedAllocator {
        PinnedAllocator {
            ctx: Some(ctx),
            registered: Mutex::new(HashSet::new()),
            fallback: Mutex::new(None),
            warned_fallback: AtomicBool::new(false),
            warned_unregister: AtomicBool::new(false),
        }
    }

    /// An allocator that hands out pageable memory, warning once (at the first allocation) why.
    pub fn unavailable(reason: impl Into<String>) -> PinnedAllocator {
        PinnedAllocator {
            ctx: None,
            registered: Mutex::new(HashSet::new()),
            fallback: Mutex::new(Some(reason.into())),
            warned_fallback: AtomicBool::new(false),
            warned_unregister: AtomicBool::new(false),
        }
    }

    /// Pins buffers for GPU `ordinal`, or falls back to pageable memory (one warning) when
    /// there is no driver or no such device. Never fails, never panics.
    pub fn for_device(ordinal: usize) -> PinnedAllocator {
        if !driver_present() {
            return PinnedAllocator::unavailable("no NVIDIA driver: libcuda.so could not be loaded");
        }
        let opened = catch_unwind(|| {
            cudarc::driver::result::init().map_err(|e| format!("cuInit: {e:?}"))?;
            CudaContext::new(ordinal).map_err(|e| format!("opening cuda:{ordinal}: {e:?}"))
        });
        match opened {
            Ok(Ok(ctx)) => PinnedAllocator::new(ctx),
            Ok(Err(e)) => PinnedAllocator::unavailable(e),
            Err(_) => PinnedAllocator::unavailable(format!("opening cuda:{ordinal}: the CUDA driver call panicked")),
        }
    }

    /// True while buffers are being page-locked (false after a fallback).
    pub fn is_pinning(&self) -> bool {
        self.ctx.is_some() && lock(&self.fallback).is_none()
    }

    /// Why buffers are pageable, if they are.
    pub fn fallback_reason(&self) -> Option<String> {
        lock(&self.fallback).clone()
    }

    /// Buffers registered now (allocated and not yet released).
    pub fn registered_buffers(&self) -> usize {
        lock(&self.registered).len()
    }

    /// Warnings printed so far: at most one for the fallback to pageable memory and one for
    /// failed unregistrations.
    pub fn warnings(&self) -> usize {
        self.warned_fallback.load(Ordering::SeqCst) as usize + self.warned_unregister.load(Ordering::SeqCst) as usize
    }

    /// Prints the fallback warning, the first time only.
    fn warn_fallback_once(&self) {
        if !self.warned_fallback.swap(true, Ordering::SeqCst) {
            let reason = self.fallback_reason().unwrap_or_default();
            eprintln!("warning: page-locked loader buffers unavailable ({reason}); using pageable memory (slower uploads to the GPU)");
        }
    }

    /// Stops pinning for good (the first reason is kept) and warns once.
    fn fall_back(&self, reason: String) {
        lock(&self.fallback).get_or_insert(reason);
        self.warn_fallback_once();
    }

    fn register(&self, ctx: &CudaContext, buf: &mut Vec<f32>) -> Result<(), String> {
        catch_unwind(AssertUnwindSafe(|| ctx.bind_to_thread()))
            .map_err(|_| "binding the CUDA context: the CUDA driver call panicked".to_string())?
            .map_err(|e| format!("binding the CUDA context to the loader thread: {e:?}"))?;
        let bytes = buf.capacity() * std::mem::size_of::<f32>();
        let p = buf.as_mut_ptr() as *mut c_void;
        // SAFETY: `p` is the start of a live allocation of `bytes` bytes, owned by `buf`, which
        // is unregistered in `release` before it is freed (the loader's guarantee).
        driver_call(&format!("cuMemHostRegister of {bytes} bytes"), || unsafe { sys::cuMemHostRegister_v2(p, bytes, 0) })
    }
}

impl BufferAllocator for PinnedAllocator {
    fn allocate(&self, len: usize) -> Vec<f32> {
        let mut buf = Vec::with_capacity(len);
        if buf.capacity() == 0 {
            return buf;
        }
        let ctx = match self.ctx.as_ref() {
            Some(ctx) if lock(&self.fallback).is_none() => ctx,
            _ => {
                self.warn_fallback_once();
                return buf;
            }
        };
        match self.register(ctx, &mut buf) {
            Ok(()) => {
                lock(&self.registered).insert(buf.as_ptr() as usize);
            }
            Err(e) => self.fall_back(e),
        }
        buf
    }

    fn release(&self, buf: Vec<f32>) {
        let p = buf.as_ptr() as usize;
        if !lock(&self.registered).remove(&p) {
            return; // pageable: nothing to undo
        }
        let Some(ctx) = self.ctx.as_ref() else { return };
        let r = catch_unwind(AssertUnwindSafe(|| ctx.bind_to_thread()))
            .map_err(|_| "binding the CUDA context: the CUDA driver call panicked".to_string())
            .and_then(|r| r.map_err(|e| format!("binding the CUDA context: {e:?}")))
            // SAFETY: `p` was registered by `allocate` and not unregistered since.
            .and_then(|()| driver_call("cuMemHostUnregister", || unsafe { sys::cuMemHostUnregister(p as *mut c_void) }));
        if let Err(e) = r {
            // The context is gone or broken, and its registrations with it: free anyway.
            if !self.warned_unregister.swap(true, Ordering::SeqCst) {
                eprintln!("warning: could not unregister a page-locked loader buffer ({e})");
            }
        }
        drop(buf);
    }
}

impl std::fmt::Debug for PinnedAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedAllocator")
            .field("pinning", &self.is_pinning())
            .field("registered", &self.registered_buffers())
            .field("fallback", &self.fallback_reason())
            .finish()
    }
}
