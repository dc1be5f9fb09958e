//! Embeds the CUDA sources of `cuda/` into the library. No CUDA is needed to build: the kernels
//! are compiled at run time by NVRTC. `#include "x.cuh"` lines are inlined here, wrapped in
//! `#line` directives, so that NVRTC's messages name the original file and line.

use std::fmt::Write as _;
use std::path::Path;
use std::{env, fs};

fn inline(dir: &Path, file: &str, depth: usize, out: &mut String) {
    let text = fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("cuda/{file}: {e}"));
    writeln!(out, "#line 1 \"{file}\"").unwrap();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let inc = rest.trim_end_matches('"');
            assert!(depth < 8, "cuda/{file}: includes nested too deep");
            inline(dir, inc, depth + 1, out);
            writeln!(out, "#line {} \"{file}\"", n + 2).unwrap();
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
}

fn main() {
    // the commit a binary was built from, for config.json and `backei info` (absent outside git)
    if let Ok(out) = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output() {
        if out.status.success() {
            println!("cargo:rustc-env=BACKEI_GIT_COMMIT={}", String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    println!("cargo:rerun-if-changed=.git/HEAD");
    let dir = Path::new("cuda");
    println!("cargo:rerun-if-changed=cuda");
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("cuda/ folder")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    names.sort();
    let out_dir = env::var("OUT_DIR").unwrap();
    let mut table =
        String::from("/// (module name, file, full source with headers inlined)\npub const KERNEL_SOURCES: &[(&str, &str, &str)] = &[\n");
    for name in &names {
        let mut src = String::new();
        inline(dir, name, 0, &mut src);
        let module = name.trim_end_matches(".cu");
        let path = Path::new(&out_dir).join(format!("{module}.inlined.cu"));
        fs::write(&path, &src).unwrap();
        writeln!(table, "    ({module:?}, {name:?}, include_str!({:?})),", path.display().to_string()).unwrap();
        println!("cargo:rerun-if-changed=cuda/{name}");
    }
    table.push_str("];\n");
    // the original files, for quoting the offending line of a compile error
    // (cuda/ and its sub-folders one level down, named as the #line directives name them: v4/x.cuh)
    let listing = |sub: &str| -> Vec<String> {
        fs::read_dir(dir.join(sub))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu") || n.ends_with(".cuh"))
            .map(|n| if sub.is_empty() { n } else { format!("{sub}/{n}") })
            .collect()
    };
    let subdirs: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut files = listing("");
    for sub in &subdirs {
        files.extend(listing(sub));
    }
    files.sort();
    table.push_str("/// (file, original text)\npub const KERNEL_FILES: &[(&str, &str)] = &[\n");
    for f in &files {
        let abs = fs::canonicalize(dir.join(f)).unwrap();
        writeln!(table, "    ({f:?}, include_str!({:?})),", abs.display().to_string()).unwrap();
    }
    table.push_str("];\n");
    fs::write(Path::new(&out_dir).join("kernel_sources.rs"), table).unwrap();
}
