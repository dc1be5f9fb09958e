//! Readers on well-formed input: IDX (raw, .gz), CIFAR-10, N-MNIST (events, overflow,
//! binning, cache), the embedded sample, the real Fashion-MNIST files, and `locate`.

mod data_fixtures;
use backei::data::nmnist::{self, Binning, Event};
use backei::data::nmnist_cache;
use backei::data::{locate, Dataset, DatasetKind, LoadOptions, Split};
use data_fixtures::*;
use std::path::{Path, PathBuf};

fn opts(dir: &Path) -> LoadOptions {
    LoadOptions { data_dir: Some(dir.to_path_buf()), steps: 4, cache_dir: None, ..Default::default() }
}

#[test]
fn idx_raw_and_gz_roundtrip() {
    for gzip in [false, true] {
        let d = tempfile::tempdir().unwrap();
        write_mnist(d.path(), 30, 12, gzip);
        let tr = Dataset::load(DatasetKind::Mnist, Split::Train, &opts(d.path())).unwrap();
        let te = Dataset::load(DatasetKind::Mnist, Split::Test, &opts(d.path())).unwrap();
        assert_eq!((tr.len(), te.len()), (30, 12));
        assert_eq!(tr.shape(), [1, 28, 28]);
        assert_eq!(tr.frames(), 1);
        assert_eq!(tr.num_classes(), 10);
        assert_eq!(tr.kind(), DatasetKind::Mnist);
        assert_eq!(tr.labels()[13], 3);
        assert_eq!(tr.sample(5)[100], pix(5, 100));
        let sub = tr.subset(&[7, 2, 7]);
        assert_eq!(sub.len(), 3);
        assert_eq!(sub.labels(), &[7, 2, 7]);
        assert_eq!(sub.sample(1), tr.sample(2));
    }
}

#[test]
fn idx_dotted_names_and_dataset_subfolder() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("fashion-mnist");
    let labels: Vec<u8> = (0..5).collect();
    write(&sub.join("train-images.idx3-ubyte"), &idx_images(5, 28, 28, pix));
    write(&sub.join("train-labels.idx1-ubyte"), &idx_labels(&labels));
    // --data-dir may name the parent of <dataset>/.
    let ds = Dataset::load(DatasetKind::FashionMnist, Split::Train, &opts(d.path())).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.labels(), &[0, 1, 2, 3, 4]);
}

#[test]
fn embedded_sample_is_8000_2000() {
    let o = LoadOptions::default();
    let tr = Dataset::load(DatasetKind::MnistSample, Split::Train, &o).unwrap();
    let te = Dataset::load(DatasetKind::MnistSample, Split::Test, &o).unwrap();
    assert_eq!((tr.len(), te.len()), (8000, 2000));
    assert_eq!(tr.shape(), [1, 28, 28]);
    let mut counts = [0usize; 10];
    for &l in tr.labels() {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [797, 921, 789, 818, 785, 683, 823, 841, 750, 793]);
    // Digits: mostly dark background, some ink.
    let s = backei::data::inspect::stats(&tr);
    assert!((s.mean[0] - 0.131).abs() < 0.01, "mean {}", s.mean[0]);
}

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// Real files from Debian's `dataset-fashion-mnist` (CI installs it). Fails if absent.
#[test]
fn real_fashion_mnist() {
    assert!(
        Path::new(FASHION).join("train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
    );
    // Found without flags (BACKEI_DATA / ./data do not hold it in CI; the system folder does).
    let found =
        locate::locate_with(DatasetKind::FashionMnist, None, None, Path::new("/nonexistent"), Path::new(locate::SYSTEM_DIR)).unwrap();
    assert_eq!(found, PathBuf::from(FASHION));
    let o = LoadOptions { data_dir: Some(FASHION.into()), ..Default::default() };
    let tr = Dataset::load(DatasetKind::FashionMnist, Split::Train, &o).unwrap();
    let te = Dataset::load(DatasetKind::FashionMnist, Split::Test, &o).unwrap();
    assert_eq!((tr.len(), te.len()), (60000, 10000));
    // Known first labels: ankle boot (9), ankle boot (9).
    assert_eq!(tr.labels()[0], 9);
    assert_eq!(te.labels()[0], 9);
    let st = backei::data::inspect::stats(&tr);
    assert_eq!(st.per_class, [6000; 10]);
    assert!((st.mean[0] - 0.2860).abs() < 1e-3 && (st.std[0] - 0.3530).abs() < 1e-3, "{st:?}");
}

#[test]
fn cifar_flat_and_in_batches_folder() {
    for inner in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let dir = if inner { d.path().join("cifar-10-batches-bin") } else { d.path().to_path_buf() };
        write_cifar(&dir, 3);
        let tr = Dataset::load(DatasetKind::Cifar10, Split::Train, &opts(d.path())).unwrap();
        let te = Dataset::load(DatasetKind::Cifar10, Split::Test, &opts(d.path())).unwrap();
        assert_eq!((tr.len(), te.len()), (15, 3));
        assert_eq!(tr.shape(), [3, 32, 32]);
        assert_eq!(tr.labels()[14], 4);
        // Record 4 (batch 2, index 1): R plane then G plane.
        assert_eq!(tr.sample(4)[0], pix(4, 0));
        assert_eq!(tr.sample(4)[1024], pix(4, 1024));
        assert_eq!(te.labels()[0], 0);
        assert_eq!(tr.sources().len(), 5);
    }
}

#[test]
fn nmnist_event_decoding() {
    let b = events(&[(3, 4, 1, 0x7A_BCDE), (33, 0, 0, 5)]);
    // (5 < 0x7ABCDE - 2^22: treated as a wrap of the 23-bit counter.)
    let ev = nmnist::parse_events(&b, Path::new("x.bin")).unwrap();
    assert_eq!(ev[0], Event { x: 3, y: 4, p: 1, t: 0x7A_BCDE });
    assert_eq!(ev[1], Event { x: 33, y: 0, p: 0, t: (1 << 23) + 5 });
}

#[test]
fn nmnist_overflow_marker_adds_2_pow_13() {
    // y = 240 marks a timestamp overflow (original reader): later events get +8192 µs.
    let b = events(&[(1, 1, 0, 8000), (0, 240, 0, 0), (2, 2, 1, 100)]);
    let ev = nmnist::parse_events(&b, Path::new("x.bin")).unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].t, 8192 + 100);
}

#[test]
fn nmnist_binning_equal_time() {
    let ev: Vec<Event> = [(0u8, 0u8, 0u8, 0u64), (1, 0, 1, 99), (1, 0, 1, 50), (1, 0, 1, 50), (2, 3, 0, 24)]
        .iter()
        .map(|&(x, y, p, t)| Event { x, y, p, t })
        .collect();
    let mut out = vec![0u8; 4 * nmnist::FRAME];
    nmnist::bin_events(&ev, 4, nmnist::Binning::EqualTime, &mut out);
    let at = |t: usize, p: usize, y: usize, x: usize| out[t * nmnist::FRAME + p * 34 * 34 + y * 34 + x];
    // span 0..=99 (100 µs) cut into 4 bins of 25 µs.
    assert_eq!(at(0, 0, 0, 0), 1);
    assert_eq!(at(0, 0, 3, 2), 1); // t = 24
    assert_eq!(at(2, 1, 0, 1), 2); // t = 50, twice
    assert_eq!(at(3, 1, 0, 1), 1); // t = 99
    assert_eq!(out.iter().map(|&v| v as usize).sum::<usize>(), 5);
}

#[test]
fn nmnist_cache_is_keyed_by_t_binning_and_sources_and_checksummed() {
    let d = tempfile::tempdir().unwrap();
    write_nmnist(d.path(), 2);
    let cache = d.path().join("cache");
    let o = |t| LoadOptions { data_dir: Some(d.path().into()), steps: t, cache_dir: Some(cache.clone()), ..Default::default() };
    let a = Dataset::load(DatasetKind::Nmnist, Split::Train, &o(4)).unwrap();
    assert_eq!((a.len(), a.frames(), a.shape()), (6, 4, [2, 34, 34]));
    assert_eq!(a.labels(), &[0, 0, 1, 1, 2, 2]);
    // tonic's half-open windows drop the last event of each sample
    assert_eq!(a.sample(0).iter().map(|&v| v as usize).sum::<usize>(), 19);
    let c4 = nmnist_cache::cache_path(&cache, Split::Train, 4, Binning::TonicTime);
    assert!(c4.is_file());
    assert!(c4.to_string_lossy().contains("tonic-time"));
    // the second load reads the cache: with the sources' bytes gone (same size and time), it still
    // gives the frames, so they came from the cache
    let src = d.path().join("Train/1/00000.bin");
    let len = std::fs::metadata(&src).unwrap().len();
    let aged = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let age = |p: &Path| std::fs::File::options().write(true).open(p).unwrap().set_modified(aged).unwrap();
    // files older than the cache's build (not "racy") are trusted by size and time
    for entry in walk(&d.path().join("Train")) {
        age(&entry);
    }
    let b = Dataset::load(DatasetKind::Nmnist, Split::Train, &o(4)).unwrap(); // rebuilt: times changed
    assert_eq!(a.raw(), b.raw());
    let original = std::fs::read(&src).unwrap();
    std::fs::write(&src, vec![0u8; len as usize]).unwrap();
    std::fs::File::options().write(true).open(&src).unwrap().set_modified(aged).unwrap();
    let c = Dataset::load(DatasetKind::Nmnist, Split::Train, &o(4)).unwrap();
    assert_eq!(a.raw(), c.raw(), "size and time unchanged and older than the build: the cache is used");
    std::fs::write(&src, &original).unwrap();
    // a byte of the cache overwritten: detected by the checksum and rebuilt, never used
    let mut bytes = std::fs::read(&c4).unwrap();
    let k = bytes.len() - 100;
    bytes[k] ^= 0x40;
    std::fs::write(&c4, &bytes).unwrap();
    let e = Dataset::load(DatasetKind::Nmnist, Split::Train, &o(4)).unwrap();
    assert_eq!(e.raw(), a.raw());
    assert_ne!(std::fs::read(&c4).unwrap(), bytes, "the damaged cache was rewritten");
    // another T or binning: another cache file, built from the events
    let t2 = Dataset::load(DatasetKind::Nmnist, Split::Train, &o(2)).unwrap();
    assert_eq!(t2.frames(), 2);
    assert!(nmnist_cache::cache_path(&cache, Split::Train, 2, Binning::TonicTime).is_file());
    let sj = LoadOptions { binning: Binning::SpikingjellyNumber, ..o(4) };
    let s = Dataset::load(DatasetKind::Nmnist, Split::Train, &sj).unwrap();
    assert_eq!(s.sample(0).iter().map(|&v| v as usize).sum::<usize>(), 20, "split_by='number' keeps every event");
    assert!(nmnist_cache::cache_path(&cache, Split::Train, 4, Binning::SpikingjellyNumber).is_file());
    // a source rewritten with the same size right after the build (same clock tick, same time):
    // its content is hashed again, and the cache rebuilt
    let fresh = Dataset::load(DatasetKind::Nmnist, Split::Train, &o(4)).unwrap();
    let stamp = std::fs::metadata(&src).unwrap().modified().unwrap();
    let mut other = events(&[(5, 5, 1, 0); 20]);
    other.truncate(len as usize);
    std::fs::write(&src, &other).unwrap();
    std::fs::File::options().write(true).open(&src).unwrap().set_modified(stamp).unwrap();
    let g = Dataset::load(DatasetKind::Nmnist, Split::Train, &o(4)).unwrap();
    assert_ne!(g.raw(), fresh.raw(), "the changed source was hidden by the old cache");
    // files added: rebuilt
    write(&d.path().join("Train/2/00009.bin"), &events(&[(1, 1, 1, 1)]));
    let f = Dataset::load(DatasetKind::Nmnist, Split::Train, &o(4)).unwrap();
    assert_eq!(f.len(), 7);
    // no temporary files left in the cache folder
    assert!(std::fs::read_dir(&cache).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")));
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn locate_search_order_and_not_found_message() {
    let d = tempfile::tempdir().unwrap();
    let env = d.path().join("env");
    let cwd = d.path().join("cwd");
    let sys = d.path().join("sys");
    write_mnist(&sys.join("mnist"), 1, 1, true);
    let f = |dd: Option<&Path>| locate::locate_with(DatasetKind::Mnist, dd, Some(&env), &cwd, &sys);
    assert_eq!(f(None).unwrap(), sys.join("mnist"));
    write_mnist(&cwd.join("data/mnist"), 1, 1, false);
    assert_eq!(f(None).unwrap(), cwd.join("data/mnist"));
    write_mnist(&env.join("mnist"), 1, 1, false);
    assert_eq!(f(None).unwrap(), env.join("mnist"));
    let explicit = d.path().join("x");
    write_mnist(&explicit, 1, 1, false);
    assert_eq!(f(Some(&explicit)).unwrap(), explicit);
    // Nothing found: lists where it looked and how to get the data.
    let e = locate::locate_with(DatasetKind::FashionMnist, None, Some(&env), &cwd, &sys).unwrap_err().to_string();
    for p in [env.join("fashion-mnist"), cwd.join("data/fashion-mnist"), sys.join("fashion-mnist")] {
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
    assert!(e.contains("backei data fetch fashion-mnist --dir DIR"), "{e}");
    assert!(e.contains("apt-get install dataset-fashion-mnist"), "{e}");
    let e = locate::locate_with(DatasetKind::Cifar10, Some(&d.path().join("nope")), None, &cwd, &sys).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("backei data fetch cifar10 --dir DIR") && e.contains("data_batch_1.bin"), "{e}");
}

#[test]
fn kind_names_roundtrip() {
    for k in DatasetKind::ALL {
        assert_eq!(k.to_string().parse::<DatasetKind>().unwrap(), k);
    }
    assert_eq!("fashion-mnist".parse::<DatasetKind>().unwrap(), DatasetKind::FashionMnist);
    assert!("imagenet".parse::<DatasetKind>().is_err());
}
