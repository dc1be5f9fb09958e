#![no_main]
use backei::data::cifar;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let (mut px, mut lb) = (Vec::new(), Vec::new());
    if cifar::parse_batch(data, Path::new("fuzz"), &mut px, &mut lb).is_ok() {
        assert_eq!(px.len(), lb.len() * cifar::PIXELS);
        assert!(lb.iter().all(|&l| l < 10));
    }
});
