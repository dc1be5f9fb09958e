//! backei's N-MNIST `--binning` conventions against tonic and SpikingJelly themselves: the same
//! event files binned by `scripts/check_binning.py` (the libraries' own ToFrame and
//! integrate_events_by_fixed_frames_number, from their pip wheels) and by `nmnist::bin_events`
//! and the loader must give identical frames. The Python environment is made by
//! `scripts/install_reference_python.sh` (which `.ci/run` runs); without it this test fails and
//! says how to make it.

mod data_fixtures;
#[path = "common/ref_python.rs"]
mod ref_python;
use backei::data::nmnist::{self, Binning, Event};
use backei::data::{Dataset, DatasetKind, LoadOptions, Split};
use data_fixtures::*;
use ref_python::reference_python;
use std::path::Path;

/// Event files that exercise each convention's edges: counts and spans that T does not divide,
/// several events on one timestamp at window edges, fewer events than frames, a span shorter
/// than T, a single event.
fn cases() -> Vec<Vec<(u8, u8, u8, u32)>> {
    let mut rng = XorShift(0x5eed_b1b5);
    let mut cases = Vec::new();
    for (n, max_gap) in [(3001usize, 200u32), (997, 700), (64, 5000), (250, 3)] {
        let mut t = rng.below(1000) as u32;
        let ev = (0..n)
            .map(|_| {
                t += rng.below(max_gap as usize + 1) as u32;
                (rng.below(34) as u8, rng.below(34) as u8, rng.below(2) as u8, t)
            })
            .collect();
        cases.push(ev);
    }
    // bursts on the window edges of T = 4 over a span of 400 µs
    let mut burst = Vec::new();
    for edge in [0u32, 100, 200, 300, 400] {
        for k in 0..5u8 {
            burst.push((k, 2 * k, k % 2, 1000 + edge));
        }
    }
    cases.push(burst);
    cases.push(vec![(1, 2, 0, 10), (3, 4, 1, 500), (5, 6, 1, 1000)]); // fewer events than frames
    cases.push((0..40u8).map(|k| (k % 34, 7, k % 2, 77 + k as u32 / 20)).collect()); // a span of 1 µs
    cases.push(vec![(9, 9, 1, 123_456)]); // one event
    cases
}

#[test]
fn every_convention_matches_tonic_and_spikingjelly_on_the_same_files() {
    let python = reference_python();
    let d = tempfile::tempdir().unwrap();
    let cases = cases();
    let mut files = Vec::new();
    for (k, ev) in cases.iter().enumerate() {
        files.push(write(&d.path().join(format!("Train/{}/{k:05}.bin", k % 10)), &events(ev)));
    }
    let steps = [1usize, 4, 8, 10, 20];
    let out = d.path().join("reference");
    let o = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_binning.py"))
        .arg(&out)
        .arg(steps.map(|t| t.to_string()).join(","))
        .args(&files)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    println!("{}", String::from_utf8_lossy(&o.stdout));

    let conventions = [Binning::TonicTime, Binning::TonicEvents, Binning::SpikingjellyTime, Binning::SpikingjellyNumber];
    let (mut compared, mut library_failed) = (0, Vec::new());
    for (k, path) in files.iter().enumerate() {
        let ev: Vec<Event> = nmnist::parse_events(&std::fs::read(path).unwrap(), path).unwrap();
        for &t in &steps {
            for b in conventions {
                let stem = out.join(format!("{k}-T{t}-{b}"));
                let mut ours = vec![0u8; t * nmnist::FRAME];
                nmnist::bin_events(&ev, t, b, &mut ours);
                match std::fs::read(stem.with_extension("u8")) {
                    Ok(theirs) => {
                        let first = ours.iter().zip(&theirs).position(|(a, b)| a != b);
                        assert!(
                            first.is_none() && ours.len() == theirs.len(),
                            "case {k}, T = {t}, {b}: frames differ from the library's at byte {first:?}"
                        );
                        compared += 1;
                    }
                    Err(_) => {
                        let why = std::fs::read_to_string(stem.with_extension("err")).unwrap();
                        library_failed.push(format!("case {k}, T = {t}, {b}: {why}"));
                    }
                }
            }
        }
    }
    println!("{compared} frame sets identical; the library itself raised for:\n{}", library_failed.join("\n"));
    // only SpikingJelly's split_by='time' raises (IndexError on an empty window), and only for
    // the cases built to have one
    assert!(library_failed.iter().all(|f| f.contains("spikingjelly-time") && f.contains("IndexError")), "{library_failed:?}");
    assert_eq!(compared + library_failed.len(), cases.len() * steps.len() * conventions.len());
    assert!(compared > 120, "only {compared} compared");

    // the loader (and its cache) gives the same frames as bin_events
    for b in conventions {
        let opts = LoadOptions { data_dir: Some(d.path().into()), steps: 8, cache_dir: Some(d.path().join("cache")), binning: b };
        for _ in 0..2 {
            let data = Dataset::load(DatasetKind::Nmnist, Split::Train, &opts).unwrap();
            for (i, path) in files.iter().enumerate() {
                let ev = nmnist::parse_events(&std::fs::read(path).unwrap(), path).unwrap();
                let mut ours = vec![0u8; 8 * nmnist::FRAME];
                nmnist::bin_events(&ev, 8, b, &mut ours);
                assert!(data.sample(i) == ours.as_slice(), "{b}: sample {i} of the loader differs");
            }
        }
    }
}
