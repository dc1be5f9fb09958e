//! Page-locked host buffers whose asynchronous copies are really waited for.
//!
//! cudarc's `PinnedHostSlice` orders host access against its copies with an event that cudarc
//! records only while the context tracks events, and `GpuDevice::open` turns that tracking off
//! (`device.rs`: kernels on one stream need none, and per-slice events would land in the step's
//! CUDA graph). Its `as_slice`/`as_mut_slice` then returned at once, before the copy had run. The
//! first GPU run (2026-12-04, H200) showed what that does: the first step of every network but
//! the first in a process read 0, a denormal or the previous network's loss; a NaN step went
//! unreported; the host could overwrite labels, optimizer scalars and dropout keys still waiting
//! to be uploaded. A `PinnedBuf` records its own event after each of its copies and waits for it
//! before each host access, whatever the context's tracking.

use super::device::GpuDevice;
use cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError, PinnedHostSlice, ValidAsZeroBits};

/// A page-locked host buffer and the event of its last copy.
pub struct PinnedBuf<T> {
    host: PinnedHostSlice<T>,
    /// Recorded after every copy from or into `host` (never recorded: complete).
    copied: CudaEvent,
}

impl<T: DeviceRepr + ValidAsZeroBits> PinnedBuf<T> {
    /// `len` elements of page-locked memory (not write-combined: the host reads it back).
    pub fn new(dev: &GpuDevice, len: usize) -> Result<Self, DriverError> {
        // SAFETY: every element is written (by the host or a copy) before it is read.
        let host = unsafe { dev.ctx.alloc_pinned_with_flags::<T>(len, 0) }?;
        Ok(PinnedBuf { host, copied: dev.ctx.new_event(None)? })
    }

    /// The buffer, once its last copy is done (a download landed, an upload has read it).
    pub fn host(&self) -> Result<&[T], DriverError> {
        self.copied.synchronize()?;
        self.host.as_slice()
    }

    /// The buffer to fill, once its last copy is done.
    pub fn host_mut(&mut self) -> Result<&mut [T], DriverError> {
        self.copied.synchronize()?;
        self.host.as_mut_slice()
    }

    /// Copies the buffer into `dst`, asynchronously on `stream`.
    pub fn upload<D: DevicePtrMut<T>>(&self, stream: &std::sync::Arc<CudaStream>, dst: &mut D) -> Result<(), DriverError> {
        stream.memcpy_htod(&self.host, dst)?;
        self.copied.record(stream)
    }

    /// Copies `src` into the buffer, asynchronously on `stream`; `host` waits for it.
    pub fn download<S: DevicePtr<T>>(&mut self, stream: &std::sync::Arc<CudaStream>, src: &S) -> Result<(), DriverError> {
        stream.memcpy_dtoh(src, &mut self.host)?;
        self.copied.record(stream)
    }
}
