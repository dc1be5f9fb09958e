#![no_main]
use backei::data::{idx, DatasetKind, Split};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz");
    let _ = idx::parse_idx(data, p, 3);
    let _ = idx::parse_idx(data, p, 1);
    // Also through gzip detection and the image/label pair checks.
    let half = data.len() / 2;
    let _ = idx::load_bytes(DatasetKind::Mnist, Split::Train, &data[..half], &data[half..], (p, p));
});
