//! Page-locked loader buffers (`gpu::pinned::PinnedAllocator`). Without a GPU: the fallback to
//! pageable memory (one warning, no panic, the loader works). With one (run with
//! `cargo test --test gpu_pinned -- --ignored`; without a GPU those FAIL): buffers are really
//! registered with the driver, a loader epoch uploads them correctly, and the GPU engine gives
//! the same result for a pinned batch as for a pageable copy of it.

use backei::data::{BufferAllocator, Dataset, DatasetKind, Loader, LoaderOptions, Split};
use backei::gpu::device::driver_present;
use backei::gpu::{GpuDevice, PinnedAllocator};
use backei::{Engine, Loss, NetworkSpec, OptimizerConfig};
use cudarc::driver::sys;
use std::ffi::c_void;
use std::sync::Arc;

fn digits(n: usize) -> Arc<Dataset> {
    let data: Vec<u8> = (0..n * 784).map(|i| ((i * 37) % 256) as u8).collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Arc::new(Dataset::from_raw(DatasetKind::Mnist, Split::Train, [1, 28, 28], 1, data, labels, vec![]))
}

fn loader(alloc: Arc<dyn BufferAllocator>) -> Loader {
    Loader::with_allocator(digits(100), LoaderOptions { batch_size: 16, workers: 2, prefetch: 2, ..Default::default() }, alloc)
}

#[test]
fn falls_back_to_pageable_memory_with_one_warning() {
    let alloc = Arc::new(PinnedAllocator::unavailable("test: no context"));
    assert!(!alloc.is_pinning());
    assert_eq!(alloc.warnings(), 0, "nothing printed before the first allocation");
    let b = alloc.allocate(1000);
    assert!(b.capacity() >= 1000);
    alloc.release(b);
    // A whole epoch on background threads: buffers work, one warning in all, none registered.
    let l = loader(alloc.clone());
    let mut n = 0;
    for b in l.epoch(0) {
        assert_eq!(b.x.len(), b.batch * 784);
        n += b.batch;
    }
    assert_eq!(n, 100);
    drop(l);
    assert_eq!(alloc.warnings(), 1);
    assert_eq!(alloc.registered_buffers(), 0);
    assert!(alloc.fallback_reason().unwrap().contains("no context"));
    assert_eq!(alloc.allocate(0).capacity(), 0);
}

#[test]
fn without_a_driver_opening_a_device_falls_back_instead_of_failing() {
    if driver_present() {
        return; // this check is for machines without a driver (CI); the GPU test covers the rest
    }
    let alloc = std::panic::catch_unwind(|| PinnedAllocator::for_device(0)).expect("no panic");
    assert!(!alloc.is_pinning());
    assert!(alloc.fallback_reason().unwrap().contains("no NVIDIA driver"));
    let b = alloc.allocate(64);
    assert!(b.capacity() >= 64);
    alloc.release(b);
    assert_eq!(alloc.warnings(), 1);
}

/// True if the driver knows `p` as page-locked host memory (the context must be current).
fn registered(p: *const f32) -> bool {
    let mut flags = 0u32;
    // SAFETY: a query; `p` is only looked up, never accessed.
    unsafe { sys::cuMemHostGetFlags(&mut flags, p as *mut c_void) == sys::CUresult::CUDA_SUCCESS }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pinned_buffers_are_registered_uploaded_and_released() {
    let dev = GpuDevice::open(0).expect("a CUDA GPU");
    let alloc = Arc::new(PinnedAllocator::new(dev.ctx.clone()));
    dev.ctx.bind_to_thread().unwrap();
    // One buffer by hand: registered while held, unregistered by release.
    let b = alloc.allocate(1000);
    assert!(alloc.is_pinning(), "{:?}", alloc.fallback_reason());
    assert_eq!(alloc.registered_buffers(), 1);
    assert!(registered(b.as_ptr()), "cuMemHostGetFlags must know the buffer");
    let plain: Vec<f32> = Vec::with_capacity(1000);
    assert!(!registered(plain.as_ptr()), "the check must tell pageable memory apart");
    alloc.release(b);
    assert_eq!(alloc.registered_buffers(), 0);

    // A loader epoch (buffers allocated on the loader's threads), each batch uploaded.
    let l = loader(alloc.clone());
    let mut dst = dev.stream.alloc_zeros::<f32>(16 * 784).unwrap();
    let mut batches = 0;
    for b in l.epoch(0) {
        dev.ctx.bind_to_thread().unwrap();
        assert!(b.x.is_lent());
        assert!(registered(b.x.as_ptr()), "batch {batches}: buffer not page-locked");
        let n = b.x.len();
        let mut view = dst.slice_mut(0..n);
        dev.stream.memcpy_htod(&b.x[..], &mut view).unwrap();
        dev.stream.synchronize().unwrap();
        let back = dev.stream.clone_dtoh(&dst.slice(0..n)).unwrap();
        assert!(back == b.x[..], "batch {batches}: the device holds other values than the host buffer");
        batches += 1;
    }
    assert_eq!(batches, 7);
    assert!(alloc.registered_buffers() > 0, "the pool keeps registered buffers between epochs");
    assert_eq!(alloc.warnings(), 0, "{:?}", alloc.fallback_reason());
    drop(l);
    assert_eq!(alloc.registered_buffers(), 0, "the loader's end must unregister every buffer");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_gpu_engine_gives_the_same_result_from_pinned_and_pageable_batches() {
    let mut spec = NetworkSpec::mnist();
    spec.steps = 2;
    let (mut engine, line) = Engine::new(&spec, 7, "cuda".parse().unwrap(), OptimizerConfig::adam(1e-3)).expect("a CUDA GPU");
    assert!(engine.is_gpu(), "{line}");
    let l = loader(engine.buffer_allocator());
    for b in l.epoch(0) {
        assert!(b.x.is_lent());
        let copy: Vec<f32> = b.x.to_vec();
        let pinned = engine.evaluate(&b.x, b.t_in, &b.labels, Loss::Mse).unwrap();
        let pageable = engine.evaluate(&copy, b.t_in, &b.labels, Loss::Mse).unwrap();
        assert_eq!((pinned.correct, pinned.batch), (pageable.correct, pageable.batch));
        assert!((pinned.loss - pageable.loss).abs() <= 1e-6 * pageable.loss.abs().max(1e-3), "{pinned:?} vs {pageable:?}");
        // Dropped right after the step: the upload has completed (forward waits for it).
        drop(b);
    }
}
