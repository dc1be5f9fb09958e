//! Loader: order, layout, encodings, augmentation, buffers, determinism across workers; every
//! buffer an allocator hands out goes back through its `release` (full epochs, a loader dropped
//! mid-epoch, batches dropped without `recycle`).

mod data_fixtures;
use backei::data::augment::{self, CropFlip};
use backei::data::loader::epoch_order;
use backei::data::{Batch, BufferAllocator, Dataset, DatasetKind, Encoding, LoadOptions, Loader, LoaderOptions, Shard, Split};
use data_fixtures::pix;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn synth(kind: DatasetKind, split: Split, n: usize) -> Arc<Dataset> {
    let shape = kind.shape();
    let per: usize = shape.iter().product();
    let data: Vec<u8> = (0..n).flat_map(|i| (0..per).map(move |p| pix(i, p))).collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Arc::new(Dataset::from_raw(kind, split, shape, 1, data, labels, vec![]))
}

fn opts(batch: usize) -> LoaderOptions {
    LoaderOptions { batch_size: batch, seed: 7, ..Default::default() }
}

fn collect(l: &Loader, epoch: usize) -> Vec<Batch> {
    l.epoch(epoch).collect()
}

#[test]
fn order_is_a_pure_permutation_of_seed_and_epoch() {
    let a = epoch_order(1000, 7, 3, true);
    assert_eq!(a, epoch_order(1000, 7, 3, true));
    assert_ne!(a, epoch_order(1000, 7, 4, true));
    assert_ne!(a, epoch_order(1000, 8, 3, true));
    let mut s = a.clone();
    s.sort();
    assert_eq!(s, (0..1000).collect::<Vec<_>>());
    assert_eq!(epoch_order(5, 7, 3, false), vec![0, 1, 2, 3, 4]);
}

#[test]
fn batches_cover_epoch_and_partial_batch_option() {
    let ds = synth(DatasetKind::Mnist, Split::Train, 103);
    let keep = Loader::new(ds.clone(), opts(10));
    assert_eq!(keep.batches_per_epoch(), 11);
    let b = collect(&keep, 0);
    assert_eq!(b.len(), 11);
    assert_eq!(b[10].batch, 3);
    assert_eq!(b[10].x.len(), 3 * 784);
    let idx: Vec<usize> = b.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, keep.order(0));
    let drop = Loader::new(ds, LoaderOptions { drop_last: true, ..opts(10) });
    assert_eq!(drop.batches_per_epoch(), 10);
    let b = collect(&drop, 0);
    assert_eq!(b.len(), 10);
    assert!(b.iter().all(|b| b.batch == 10 && b.labels.len() == 10));
}

#[test]
fn the_ranks_shards_of_every_batch_together_are_the_whole_batch() {
    // data-parallel training: each of 3 ranks builds only its share of every global batch of 16
    // (rate encoding and augmentation keyed by the sample, not by its place in the batch)
    let ds = synth(DatasetKind::Mnist, Split::Train, 53);
    let o = LoaderOptions { encoding: Encoding::Rate, steps: 3, augment: true, ..opts(16) };
    let whole = collect(&Loader::new(ds.clone(), o.clone()), 2);
    let shards: Vec<Vec<Batch>> =
        (0..3).map(|rank| collect(&Loader::new(ds.clone(), LoaderOptions { shard: Shard { rank, ranks: 3 }, ..o.clone() }), 2)).collect();
    for (k, w) in whole.iter().enumerate() {
        let parts: Vec<&Batch> = shards.iter().map(|s| &s[k]).collect();
        let indices: Vec<usize> = parts.iter().flat_map(|p| p.indices.clone()).collect();
        assert_eq!(indices, w.indices, "batch {k}");
        let mut offset = 0;
        for p in &parts {
            assert_eq!((p.offset, p.global_batch), (offset, w.batch));
            // x is [T][B][784]: each step of a shard is the matching slice of the whole batch's step
            for t in 0..3 {
                let mine = &p.x[t * p.batch * 784..(t + 1) * p.batch * 784];
                let theirs = &w.x[(t * w.batch + offset) * 784..(t * w.batch + offset + p.batch) * 784];
                assert!(mine == theirs, "batch {k}, step {t}");
            }
            offset += p.batch;
        }
    }
    // the last global batch holds 5 samples: shards of 2, 2 and 1
    assert_eq!(shards.iter().map(|s| s[3].batch).collect::<Vec<_>>(), [2, 2, 1]);
}

#[test]
fn direct_layout_and_scaling() {
    let ds = synth(DatasetKind::FashionMnist, Split::Train, 20);
    let l = Loader::new(ds.clone(), LoaderOptions { shuffle: false, ..opts(8) });
    let b = collect(&l, 0);
    assert_eq!((b[0].t_in, b[0].batch, b[0].shape), (1, 8, [1, 28, 28]));
    let (bi, i, p) = (1, 3, 400); // batch 1, element 3 = sample 11
    assert_eq!(b[bi].indices[i], 11);
    assert_eq!(b[bi].labels[i], 1);
    assert_eq!(b[bi].x[i * 784 + p], pix(11, p) as f32 / 255.0);
}

#[test]
#[allow(clippy::needless_range_loop)]
fn rate_encoding_is_time_major_reproducible_and_calibrated() {
    let ds = synth(DatasetKind::Mnist, Split::Train, 64);
    let o = LoaderOptions { encoding: Encoding::Rate, steps: 5, ..opts(16) };
    let a = collect(&Loader::new(ds.clone(), LoaderOptions { workers: 0, ..o.clone() }), 2);
    let b = collect(&Loader::new(ds.clone(), LoaderOptions { workers: 3, prefetch: 2, ..o.clone() }), 2);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.indices, y.indices);
        assert_eq!(x.x, y.x, "rate spikes must not depend on workers");
    }
    assert_eq!((a[0].t_in, a[0].x.len()), (5, 5 * 16 * 784));
    // Different epoch: different spikes.
    let c = collect(&Loader::new(ds.clone(), o.clone()), 3);
    assert_ne!(a[0].x, c[0].x);
    // Values are 0/1; p = 0 never spikes, p = 255 always does; mean rate ≈ intensity.
    let (mut want, mut got, mut n) = (0f64, 0f64, 0usize);
    for bt in &a {
        for t in 0..bt.t_in {
            for bi in 0..bt.batch {
                let s = ds.sample(bt.indices[bi]);
                for p in 0..784 {
                    let v = bt.x[(t * bt.batch + bi) * 784 + p];
                    assert!(v == 0.0 || v == 1.0);
                    if s[p] == 0 {
                        assert_eq!(v, 0.0);
                    }
                    if s[p] == 255 {
                        assert_eq!(v, 1.0);
                    }
                    want += s[p] as f64 / 255.0;
                    got += v as f64;
                    n += 1;
                }
            }
        }
    }
    assert!(((got - want) / n as f64).abs() < 0.005, "rate {} vs intensity {}", got / n as f64, want / n as f64);
}

#[test]
fn cifar_test_split_gets_normalisation_only() {
    let ds = synth(DatasetKind::Cifar10, Split::Test, 4);
    let l = Loader::new(ds.clone(), LoaderOptions { shuffle: false, augment: true, ..opts(4) });
    let b = collect(&l, 0);
    for c in 0..3 {
        let p = c * 1024 + 77;
        let want = (pix(2, p) as f32 / 255.0 - augment::CIFAR_MEAN[c]) / augment::CIFAR_STD[c];
        assert!((b[0].x[2 * 3072 + p] - want).abs() < 1e-6);
    }
}

#[test]
fn cifar_train_augmentation_crop_flip_deterministic() {
    let ds = synth(DatasetKind::Cifar10, Split::Train, 40);
    let o = LoaderOptions { augment: true, ..opts(8) };
    let a = collect(&Loader::new(ds.clone(), LoaderOptions { workers: 0, ..o.clone() }), 1);
    let b = collect(&Loader::new(ds.clone(), LoaderOptions { workers: 2, ..o.clone() }), 1);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.x, y.x);
    }
    // Each sample equals crop_flip with its drawn offsets, then normalisation.
    let lut = augment::cifar_norm_lut();
    let mut flips = 0;
    let mut shifted = 0;
    for bt in &a {
        for (bi, &i) in bt.indices.iter().enumerate() {
            let cf = CropFlip::draw(7, 1, i as u64, 4, true);
            flips += cf.flip as usize;
            shifted += (cf != CropFlip::identity(4)) as usize;
            let mut img = vec![0u8; 3072];
            augment::crop_flip(ds.sample(i), &mut img, [3, 32, 32], 4, cf);
            for p in (0..3072).step_by(37) {
                assert_eq!(bt.x[bi * 3072 + p], lut[p / 1024][img[p] as usize]);
            }
        }
    }
    assert!(flips > 5 && flips < 35, "flips {flips}");
    assert!(shifted > 30);
}

#[test]
fn crop_flip_geometry() {
    // 1×2×3 image 1..6; pad 1; shift by (dy=0, dx=2) = up-left pad row, 1 px right; flip.
    let src = [1u8, 2, 3, 4, 5, 6];
    let mut dst = [0u8; 6];
    augment::crop_flip(&src, &mut dst, [1, 2, 3], 1, CropFlip { dy: 1, dx: 1, flip: false });
    assert_eq!(dst, src);
    augment::crop_flip(&src, &mut dst, [1, 2, 3], 1, CropFlip { dy: 1, dx: 1, flip: true });
    assert_eq!(dst, [3, 2, 1, 6, 5, 4]);
    augment::crop_flip(&src, &mut dst, [1, 2, 3], 1, CropFlip { dy: 0, dx: 2, flip: false });
    assert_eq!(dst, [0, 0, 0, 2, 3, 0]);
}

#[test]
fn mnist_family_not_augmented_unless_asked() {
    let ds = synth(DatasetKind::Mnist, Split::Train, 16);
    let plain = collect(&Loader::new(ds.clone(), LoaderOptions { shuffle: false, ..opts(16) }), 0);
    for (bi, &i) in plain[0].indices.iter().enumerate() {
        assert_eq!(plain[0].x[bi * 784 + 300], pix(i, 300) as f32 / 255.0);
    }
    let aug = collect(&Loader::new(ds, LoaderOptions { shuffle: false, augment: true, ..opts(16) }), 0);
    assert_ne!(plain[0].x, aug[0].x);
}

#[test]
fn nmnist_frames_are_time_major() {
    let per = 2 * 34 * 34;
    let t = 3;
    let n = 5;
    let data: Vec<u8> = (0..n * t * per).map(|k| (k % 7) as u8).collect();
    let ds = Arc::new(Dataset::from_raw(DatasetKind::Nmnist, Split::Train, [2, 34, 34], t, data, vec![1; n], vec![]));
    let l = Loader::new(ds.clone(), LoaderOptions { shuffle: false, encoding: Encoding::Rate, ..opts(2) });
    assert_eq!(l.t_in(), 3);
    let b = collect(&l, 0);
    let bt = &b[1]; // samples 2, 3
    for tt in 0..t {
        for bi in 0..2 {
            for p in [0, 1000, per - 1] {
                assert_eq!(bt.x[(tt * 2 + bi) * per + p], ds.sample(2 + bi)[tt * per + p] as f32);
            }
        }
    }
}

struct Counting(AtomicUsize, AtomicUsize);
impl BufferAllocator for Counting {
    fn allocate(&self, len: usize) -> Vec<f32> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Vec::with_capacity(len)
    }
    fn release(&self, _buf: Vec<f32>) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn custom_allocator_and_buffer_reuse() {
    let ds = synth(DatasetKind::Mnist, Split::Train, 200);
    let alloc = Arc::new(Counting(AtomicUsize::new(0), AtomicUsize::new(0)));
    let l = Loader::with_allocator(ds, LoaderOptions { workers: 1, prefetch: 2, ..opts(10) }, alloc.clone());
    for e in 0..3 {
        let mut ptrs = Vec::new();
        for b in l.epoch(e) {
            ptrs.push(b.x.as_ptr() as usize);
            l.recycle(b);
        }
        assert_eq!(ptrs.len(), 20);
    }
    // 60 batches served from a handful of buffers.
    let n = alloc.0.load(Ordering::SeqCst);
    assert!((1..=8).contains(&n), "allocated {n} buffers");
}

#[test]
fn dropping_an_epoch_midway_does_not_hang() {
    let ds = synth(DatasetKind::Mnist, Split::Train, 500);
    let l = Loader::new(ds, LoaderOptions { workers: 2, prefetch: 2, ..opts(5) });
    let mut it = l.epoch(0);
    let first = it.next().unwrap();
    drop(it);
    // A fresh epoch 0 is identical (resume).
    let again = l.epoch(0).next().unwrap();
    assert_eq!(first.indices, again.indices);
    assert_eq!(first.x, again.x);
}

#[test]
fn embedded_sample_full_epoch() {
    let ds = Arc::new(Dataset::load(DatasetKind::MnistSample, Split::Train, &LoadOptions::default()).unwrap());
    let l = Loader::new(ds.clone(), LoaderOptions { batch_size: 128, ..Default::default() });
    let mut seen = vec![false; ds.len()];
    let mut count = 0;
    for b in l.epoch(0) {
        for (k, &i) in b.indices.iter().enumerate() {
            assert!(!seen[i]);
            seen[i] = true;
            assert_eq!(b.labels[k], ds.labels()[i]);
        }
        count += b.batch;
    }
    assert_eq!(count, 8000);
}

/// Counts allocations and releases, and checks that every released buffer was allocated here
/// and released once (`bad` counts violations; asserting inside `release` would panic on a
/// loader thread).
#[derive(Default)]
struct Tracking {
    allocated: AtomicUsize,
    released: AtomicUsize,
    bad: AtomicUsize,
    live: Mutex<HashSet<usize>>,
}

impl BufferAllocator for Tracking {
    fn allocate(&self, len: usize) -> Vec<f32> {
        let v = Vec::with_capacity(len);
        self.allocated.fetch_add(1, Ordering::SeqCst);
        self.live.lock().unwrap().insert(v.as_ptr() as usize);
        v
    }
    fn release(&self, buf: Vec<f32>) {
        if !self.live.lock().unwrap().remove(&(buf.as_ptr() as usize)) {
            self.bad.fetch_add(1, Ordering::SeqCst);
        }
        self.released.fetch_add(1, Ordering::SeqCst);
    }
}

impl Tracking {
    fn counts(&self) -> (usize, usize) {
        (self.allocated.load(Ordering::SeqCst), self.released.load(Ordering::SeqCst))
    }
    /// Everything allocated has been released, once, and nothing else.
    fn balanced(&self) {
        let (a, r) = self.counts();
        assert!(a > 0);
        assert_eq!(a, r, "allocated {a}, released {r}");
        assert_eq!(self.bad.load(Ordering::SeqCst), 0, "released a buffer not allocated here, or twice");
        assert!(self.live.lock().unwrap().is_empty());
    }
}

#[test]
fn every_buffer_is_released_after_full_epochs() {
    for workers in [0, 1, 3] {
        let ds = synth(DatasetKind::Mnist, Split::Train, 205);
        let alloc = Arc::new(Tracking::default());
        let l = Loader::with_allocator(ds, LoaderOptions { workers, prefetch: 2, ..opts(10) }, alloc.clone());
        for e in 0..2 {
            let mut n = 0;
            for b in l.epoch(e) {
                assert!(b.x.is_lent());
                n += 1;
                l.recycle(b);
            }
            assert_eq!(n, 21);
        }
        // The pool keeps a few buffers for the next epoch; the loader's end releases them.
        let (a, r) = alloc.counts();
        assert!(r < a, "workers {workers}: allocated {a}, released {r}");
        drop(l);
        alloc.balanced();
    }
}

#[test]
fn dropping_the_loader_mid_epoch_releases_every_buffer() {
    let ds = synth(DatasetKind::Mnist, Split::Train, 500);
    let alloc = Arc::new(Tracking::default());
    let l = Loader::with_allocator(ds, LoaderOptions { workers: 2, prefetch: 4, ..opts(5) }, alloc.clone());
    let mut it = l.epoch(0);
    let first = it.next().unwrap();
    let second = it.next().unwrap();
    // Let the workers fill the prefetch queues, then drop the loader, the epoch (queued batches
    // and workers blocked on a full queue) and, last, the batches still held.
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(l);
    drop(it);
    drop(second);
    let (a, r) = alloc.counts();
    assert!(r < a, "a batch still holds its buffer: allocated {a}, released {r}");
    drop(first);
    alloc.balanced();
}

#[test]
fn dropped_batches_return_their_buffers() {
    let ds = synth(DatasetKind::Mnist, Split::Train, 300);
    let alloc = Arc::new(Tracking::default());
    let l = Loader::with_allocator(ds, LoaderOptions { workers: 2, prefetch: 2, ..opts(6) }, alloc.clone());
    let mut kept = Vec::new();
    for (k, b) in l.epoch(0).enumerate() {
        // A clone is plain memory: it belongs to no loader and never reaches the allocator.
        let c = b.clone();
        assert!(!c.x.is_lent() && c.x == b.x);
        if k % 10 == 0 {
            kept.push(b); // held past the epoch
        }
        // else: dropped here without `recycle`
    }
    // 50 batches from a handful of buffers: dropping a batch returned its buffer to the pool.
    let (a, _) = alloc.counts();
    assert!(a <= 16, "allocated {a} buffers for 50 batches");
    drop(l);
    drop(kept);
    alloc.balanced();
}
