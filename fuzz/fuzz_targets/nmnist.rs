#![no_main]
use backei::data::nmnist;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = nmnist::parse_events(data, Path::new("fuzz")) {
        assert!(ev.iter().all(|e| (e.x as usize) < nmnist::SIZE && (e.y as usize) < nmnist::SIZE && e.p < 2));
        let steps = 1 + data.first().copied().unwrap_or(0) as usize % 16;
        let mut out = vec![0u8; steps * nmnist::FRAME];
        for binning in nmnist::Binning::ALL {
            nmnist::bin_events(&ev, steps, binning, &mut out);
        }
    }
});
