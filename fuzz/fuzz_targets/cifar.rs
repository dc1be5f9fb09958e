#![no_main]
use backei::data::cifar;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fn check(bytes: &[u8]) {
    let (mut px, mut lb) = (Vec::new(), Vec::new());
    if cifar::parse_batch(bytes, Path::new("fuzz"), &mut px, &mut lb).is_ok() {
        assert_eq!(px.len(), lb.len() * cifar::PIXELS);
        assert!(lb.iter().all(|&l| l < 10));
    }
}

fuzz_target!(|data: &[u8]| {
    // the raw bytes, as a file would hold them
    check(data);
    // and the same bytes repeated to whole 3073-byte records, so that the record path (labels,
    // pixel copies) is reached: random lengths almost never are a multiple of 3073
    if !data.is_empty() {
        let records = 1 + data[0] as usize % 3;
        let aligned: Vec<u8> = data.iter().copied().cycle().take(records * 3073).collect();
        check(&aligned);
    }
});
