//! The prefetching batch loader.
//!
//! Per-epoch shuffle order is a pure function of (seed, epoch). Batches are assembled by
//! background threads (batch k by worker k mod W) into reusable buffers and handed over
//! through bounded queues, in order; the result does not depend on the number of workers or
//! on scheduling. Buffers come from a [`BufferAllocator`] (plain `Vec` by default; the GPU
//! engine supplies page-locked buffers) and return to the loader's pool when the batch holding
//! them is dropped or recycled ([`Loader::recycle`]), wherever that happens: in the training
//! loop, on an early return, or in a prefetch queue dropped mid-epoch. The pool gives every
//! buffer back to the allocator's `release` before it is freed (when it has more than it keeps,
//! and when the last batch, epoch iterator and loader using it are gone), so memory an allocator
//! registered (`cuMemHostRegister`) is never freed while still registered.

use super::augment::{self, CropFlip};
use super::encode::{self, Encoding};
use super::{Dataset, DatasetKind, Split};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Loader options.
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub batch_size: usize,
    /// T. Used by rate encoding (`t_in = T`); N-MNIST uses the dataset's frame count.
    pub steps: usize,
    pub encoding: Encoding,
    pub shuffle: bool,
    pub seed: u64,
    /// Drop the last partial batch (else it is kept, smaller).
    pub drop_last: bool,
    /// Augment the train split (CIFAR-10: crop + flip; MNIST family: random shift). Ignored
    /// for the test split and for N-MNIST.
    pub augment: bool,
    /// Background threads; 0 assembles batches on the calling thread.
    pub workers: usize,
    /// Batches prepared ahead (at least 2).
    pub prefetch: usize,
    /// The part of every batch this process takes in data-parallel training: `batch_size` is
    /// the global batch, and each batch holds this rank's contiguous share of it (see
    /// [`Shard::range`]). `Shard::WHOLE` (the default) takes all of it.
    pub shard: Shard,
}

/// One rank's share of every global batch: rank `rank` of `ranks` takes a contiguous slice,
/// the slices are disjoint, cover the batch and differ in size by at most one sample. Every
/// rank walks the same epoch order, so the union of the ranks' batches is the batch a single
/// process would see (PyTorch's DistributedSampler with per-rank batch B/N, without padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    /// The positions of this rank's samples inside a global batch of `len` samples (empty
    /// when the batch has fewer samples than there are ranks and this rank's turn is past).
    pub fn range(&self, len: usize) -> std::ops::Range<usize> {
        let ranks = self.ranks.max(1);
        let (base, extra) = (len / ranks, len % ranks);
        let start = self.rank * base + self.rank.min(extra);
        start..start + base + usize::from(self.rank < extra)
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard::WHOLE
    }
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            batch_size: 64,
            steps: 8,
            encoding: Encoding::Direct,
            shuffle: true,
            seed: 0,
            drop_last: false,
            augment: false,
            workers: 2,
            prefetch: 4,
            shard: Shard::WHOLE,
        }
    }
}

/// One batch. `x` is time-major: `x[((t * batch + b) * C + c) * H * W + h * W + w]`.
#[derive(Clone, Debug)]
pub struct Batch {
    /// The input, in a buffer lent by the loader (it derefs to `[f32]`).
    pub x: BatchBuffer,
    /// 1 for direct encoding of static images; T for rate encoding and N-MNIST frames.
    pub t_in: usize,
    pub batch: usize,
    /// Per-step (C, H, W).
    pub shape: [usize; 3],
    pub labels: Vec<u8>,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
    /// Samples in the global batch this batch is a shard of (= `batch` without sharding).
    pub global_batch: usize,
    /// Position of this batch's first sample inside the global batch (0 without sharding).
    pub offset: usize,
}

/// Supplies the loader's `x` buffers. Implement it to hand out page-locked memory (e.g. a
/// `Vec<f32>` registered with `cuMemHostRegister`, unregistered in `release`; see
/// `gpu::pinned::PinnedAllocator`). The loader never grows a buffer beyond the capacity it was
/// allocated with, so registered memory stays valid while the buffer is reused, and every
/// buffer `allocate` returned goes back through `release` exactly once before it is freed;
/// `release` never receives a buffer `allocate` did not return. Both may be called from any
/// thread (the loader's background threads included).
pub trait BufferAllocator: Send + Sync {
    /// A buffer with capacity for at least `len` f32 (its length and contents are free).
    fn allocate(&self, len: usize) -> Vec<f32>;
    /// Called when the loader gives a buffer up for good.
    fn release(&self, buf: Vec<f32>) {
        drop(buf)
    }
}

/// The default allocator: plain `Vec<f32>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct VecAllocator;

impl BufferAllocator for VecAllocator {
    fn allocate(&self, len: usize) -> Vec<f32> {
        Vec::with_capacity(len)
    }
}

/// A batch's input buffer, lent by its loader; derefs to `[f32]`. Dropping it (or the
/// [`Batch`] holding it) returns it to the loader's pool, which gives it back to the
/// [`BufferAllocator`] when it is no longer needed. A clone is a plain copy that belongs to no
/// loader; `From<Vec<f32>>` makes one too.
pub struct BatchBuffer {
    data: Vec<f32>,
    /// The pool the buffer returns to (None: plain memory, freed on drop).
    home: Option<Arc<Pool>>,
}

impl BatchBuffer {
    /// True if the buffer came from a loader's allocator (and returns there on drop).
    pub fn is_lent(&self) -> bool {
        self.home.is_some()
    }
}

impl std::ops::Deref for BatchBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

impl std::ops::DerefMut for BatchBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

impl Drop for BatchBuffer {
    fn drop(&mut self) {
        if let Some(pool) = self.home.take() {
            pool.put(std::mem::take(&mut self.data));
        }
    }
}

impl Clone for BatchBuffer {
    fn clone(&self) -> Self {
        BatchBuffer { data: self.data.clone(), home: None }
    }
}

impl std::fmt::Debug for BatchBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.data, f)
    }
}

impl From<Vec<f32>> for BatchBuffer {
    fn from(data: Vec<f32>) -> Self {
        BatchBuffer { data, home: None }
    }
}

impl PartialEq for BatchBuffer {
    fn eq(&self, o: &BatchBuffer) -> bool {
        self.data == o.data
    }
}

impl PartialEq<[f32]> for BatchBuffer {
    fn eq(&self, o: &[f32]) -> bool {
        self.data[..] == *o
    }
}

impl PartialEq<Vec<f32>> for BatchBuffer {
    fn eq(&self, o: &Vec<f32>) -> bool {
        self.data == *o
    }
}

/// The loader's reusable buffers. Every buffer in `free` came from `alloc` and goes back
/// through `alloc.release` when the pool has more than `max_free` or is dropped.
struct Pool {
    alloc: Arc<dyn BufferAllocator>,
    free: Mutex<Vec<Vec<f32>>>,
    max_free: usize,
    full_len: usize,
}

impl Pool {
    fn take(self: &Arc<Self>, len: usize) -> BatchBuffer {
        let pooled = {
            let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
            f.pop()
        };
        let mut buf = match pooled {
            Some(b) if b.capacity() >= len => b,
            other => {
                if let Some(small) = other {
                    self.alloc.release(small);
                }
                self.alloc.allocate(self.full_len.max(len))
            }
        };
        if buf.capacity() < len {
            // The allocator handed out less than asked: growing it would reallocate (and free
            // memory it may have registered), so give it back and use plain memory instead.
            self.alloc.release(buf);
            return BatchBuffer { data: vec![0.0; len], home: None };
        }
        // Within capacity: no reallocation. (Every element is written by the encoder.)
        buf.resize(len, 0.0);
        BatchBuffer { data: buf, home: Some(self.clone()) }
    }

    fn put(&self, buf: Vec<f32>) {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() < self.max_free && buf.capacity() >= self.full_len {
            f.push(buf);
        } else {
            drop(f);
            self.alloc.release(buf);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let free = std::mem::take(self.free.get_mut().unwrap_or_else(|e| e.into_inner()));
        for buf in free {
            self.alloc.release(buf);
        }
    }
}

/// What the workers need to turn samples into input.
struct Encoder {
    kind: DatasetKind,
    shape: [usize; 3],
    frames: usize,
    t_in: usize,
    encoding: Encoding,
    seed: u64,
    /// (pad, allow_flip) when augmenting this split.
    augment: Option<(usize, bool)>,
    lut: Vec<[f32; 256]>,
    thresh: [u64; 256],
}

impl Encoder {
    fn new(ds: &Dataset, o: &LoaderOptions) -> Self {
        let kind = ds.kind();
        let nm = ds.is_event_counts();
        let t_in = if nm {
            ds.frames()
        } else if o.encoding == Encoding::Rate {
            o.steps.max(1)
        } else {
            1
        };
        let augment = if o.augment && !nm && ds.split() == Split::Train {
            Some(if kind == DatasetKind::Cifar10 { (augment::CIFAR_PAD, true) } else { (augment::MNIST_PAD, false) })
        } else {
            None
        };
        let lut = if kind == DatasetKind::Cifar10 { augment::cifar_norm_lut() } else { vec![encode::unit_lut()] };
        Encoder {
            kind,
            shape: ds.shape(),
            frames: ds.frames(),
            t_in,
            encoding: o.encoding,
            seed: o.seed,
            augment,
            lut,
            thresh: encode::thresholds(),
        }
    }

    fn per_step(&self) -> usize {
        self.shape.iter().product()
    }

    /// Writes sample `idx` as batch element `b` of a batch of `batch` samples.
    #[allow(clippy::too_many_arguments)]
    fn write(&self, ds: &Dataset, epoch: u64, idx: usize, b: usize, batch: usize, x: &mut [f32], scratch: &mut Vec<u8>) {
        let chw = self.per_step();
        let src = ds.sample(idx);
        if self.kind == DatasetKind::Nmnist {
            for t in 0..self.frames {
                let o = &mut x[(t * batch + b) * chw..(t * batch + b + 1) * chw];
                for (o, &v) in o.iter_mut().zip(&src[t * chw..(t + 1) * chw]) {
                    *o = v as f32;
                }
            }
            return;
        }
        let img: &[u8] = match self.augment {
            Some((pad, flip)) => {
                scratch.resize(chw, 0);
                let cf = CropFlip::draw(self.seed, epoch, idx as u64, pad, flip);
                augment::crop_flip(src, scratch, self.shape, pad, cf);
                scratch
            }
            None => src,
        };
        match self.encoding {
            Encoding::Direct => {
                let o = &mut x[b * chw..(b + 1) * chw];
                encode::direct(img, &self.lut, self.shape[1] * self.shape[2], o);
            }
            Encoding::Rate => {
                for t in 0..self.t_in {
                    let key = encode::stream_key(self.seed, encode::PURPOSE_RATE, epoch, idx as u64, t as u64);
                    let o = &mut x[(t * batch + b) * chw..(t * batch + b + 1) * chw];
                    encode::rate_step(img, key, &self.thresh, o);
                }
            }
        }
    }
}

struct Shared {
    ds: Arc<Dataset>,
    enc: Encoder,
    pool: Arc<Pool>,
    batch_size: usize,
    shard: Shard,
}

impl Shared {
    fn make_batch(&self, epoch: u64, order: &[usize], k: usize, scratch: &mut Vec<u8>) -> Batch {
        let start = k * self.batch_size;
        let end = (start + self.batch_size).min(order.len());
        let global = &order[start..end];
        let mine = self.shard.range(global.len());
        let offset = mine.start;
        let idx = &global[mine];
        let batch = idx.len();
        let chw = self.enc.per_step();
        let mut x = self.pool.take(self.enc.t_in * batch * chw);
        for (b, &i) in idx.iter().enumerate() {
            self.enc.write(&self.ds, epoch, i, b, batch, &mut x, scratch);
        }
        Batch {
            x,
            t_in: self.enc.t_in,
            batch,
            shape: self.enc.shape,
            labels: idx.iter().map(|&i| self.ds.labels()[i]).collect(),
            indices: idx.to_vec(),
            global_batch: global.len(),
            offset,
        }
    }
}

/// The shuffled order of an epoch: a pure function of (seed, epoch) (Fisher–Yates driven
/// by the counter-based hash; independent of `rand`'s version).
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        let key = encode::stream_key(seed, encode::PURPOSE_SHUFFLE, epoch as u64, 0, 0);
        for i in (1..n).rev() {
            let r = encode::draw(key, i as u64);
            // Multiply-shift: unbiased enough for n < 2^32 (bias < 2^-32).
            let j = ((r >> 32) * (i as u64 + 1)) >> 32;
            v.swap(i, j as usize);
        }
    }
    v
}

/// The prefetching loader.
pub struct Loader {
    shared: Arc<Shared>,
    opts: LoaderOptions,
}

impl Loader {
    pub fn new(dataset: Arc<Dataset>, opts: LoaderOptions) -> Loader {
        Loader::with_allocator(dataset, opts, Arc::new(VecAllocator))
    }

    /// Like [`Loader::new`], with buffers from `alloc` (e.g. page-locked memory).
    pub fn with_allocator(dataset: Arc<Dataset>, mut opts: LoaderOptions, alloc: Arc<dyn BufferAllocator>) -> Loader {
        opts.batch_size = opts.batch_size.max(1);
        opts.prefetch = opts.prefetch.max(2);
        let enc = Encoder::new(&dataset, &opts);
        // the largest shard of a batch (rank 0's): no buffer need hold the whole global batch
        let largest = Shard { rank: 0, ..opts.shard }.range(opts.batch_size).len().max(1);
        let full_len = enc.t_in * largest * enc.per_step();
        let shared = Shared {
            ds: dataset,
            pool: Arc::new(Pool { alloc, free: Mutex::new(Vec::new()), max_free: opts.prefetch + opts.workers + 2, full_len }),
            enc,
            batch_size: opts.batch_size,
            shard: opts.shard,
        };
        Loader { shared: Arc::new(shared), opts }
    }

    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.shared.ds
    }
    /// Time steps in each batch's `x` (1, T, or the N-MNIST frame count).
    pub fn t_in(&self) -> usize {
        self.shared.enc.t_in
    }

    pub fn batches_per_epoch(&self) -> usize {
        let n = self.shared.ds.len();
        let b = self.opts.batch_size;
        if self.opts.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of `epoch`.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        epoch_order(self.shared.ds.len(), self.opts.seed, epoch, self.opts.shuffle)
    }

    /// Returns a batch's buffer to its loader's pool for reuse (dropping the batch does the
    /// same; this says so where it happens).
    pub fn recycle(&self, batch: Batch) {
        drop(batch);
    }

    /// The batches of `epoch`, in order, prepared in the background.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        let order = Arc::new(self.order(epoch));
        let total = self.batches_per_epoch();
        let w = self.opts.workers;
        let mut it = EpochIter {
            shared: self.shared.clone(),
            order: order.clone(),
            epoch: epoch as u64,
            next: 0,
            total,
            receivers: Vec::new(),
            handles: Vec::new(),
            scratch: Vec::new(),
        };
        if w == 0 || total == 0 {
            return it;
        }
        let depth = self.opts.prefetch.div_ceil(w).max(1);
        for wi in 0..w.min(total) {
            let (tx, rx) = sync_channel::<Batch>(depth);
            let sh = self.shared.clone();
            let order = order.clone();
            let stride = w.min(total);
            let h = std::thread::Builder::new()
                .name(format!("backei-loader-{wi}"))
                .spawn(move || {
                    let mut scratch = Vec::new();
                    let mut k = wi;
                    while k < total {
                        let b = sh.make_batch(epoch as u64, &order, k, &mut scratch);
                        if tx.send(b).is_err() {
                            return;
                        }
                        k += stride;
                    }
                })
                .expect("spawn loader thread");
            it.receivers.push(rx);
            it.handles.push(h);
        }
        it
    }
}

/// Iterator over one epoch's batches.
pub struct EpochIter {
    shared: Arc<Shared>,
    order: Arc<Vec<usize>>,
    epoch: u64,
    next: usize,
    total: usize,
    receivers: Vec<Receiver<Batch>>,
    handles: Vec<JoinHandle<()>>,
    scratch: Vec<u8>,
}

impl Iterator for EpochIter {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.total {
            return None;
        }
        let k = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            return Some(self.shared.make_batch(self.epoch, &self.order, k, &mut self.scratch));
        }
        let w = k % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(b) => Some(b),
            Err(_) => {
                // The worker died: surface its panic.
                let h = self.handles.remove(w);
                if let Err(p) = h.join() {
                    std::panic::resume_unwind(p);
                }
                panic!("loader worker {w} stopped early");
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let r = self.total - self.next;
        (r, Some(r))
    }
}

impl ExactSizeIterator for EpochIter {}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn shards_split_a_batch_into_disjoint_contiguous_balanced_parts() {
        for len in 0..40 {
            for ranks in 1..7 {
                let parts: Vec<_> = (0..ranks).map(|rank| Shard { rank, ranks }.range(len)).collect();
                let mut next = 0;
                for p in &parts {
                    assert_eq!(p.start, next, "contiguous and in rank order");
                    next = p.end;
                }
                assert_eq!(next, len, "they cover the batch");
                let (lo, hi) = (parts.iter().map(|p| p.len()).min().unwrap(), parts.iter().map(|p| p.len()).max().unwrap());
                assert!(hi - lo <= 1, "balanced: {parts:?}");
            }
        }
        assert_eq!(Shard::WHOLE.range(7), 0..7);
        assert_eq!(Shard { rank: 2, ranks: 3 }.range(16), 11..16);
    }
}
