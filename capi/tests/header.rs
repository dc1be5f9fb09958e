//! `include/backei.h` is what cbindgen 0.29 generates from this crate with `capi/cbindgen.toml`:
//! CI fails when the checked-in header is stale. After changing the ABI, regenerate it with
//!
//!     BACKEI_BLESS=1 cargo test -p backei-capi --test header

use std::path::Path;

#[test]
fn the_checked_in_header_is_what_cbindgen_generates() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    let bindings =
        cbindgen::Builder::new().with_crate(crate_dir).with_config(config).generate().expect("cbindgen could not generate the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = crate_dir.parent().expect("the repository").join("include/backei.h");
    if std::env::var_os("BACKEI_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing include/backei.h");
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/backei.h is stale: regenerate it with `BACKEI_BLESS=1 cargo test -p backei-capi --test header` and commit it"
    );
}
