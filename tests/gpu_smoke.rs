//! The GPU engine's first contact: a device opens, a kernel compiles, loads and runs, and the
//! counter-based RNG of `cuda/common.cuh` equals `backei::rng` bit for bit.

use backei::gpu::GpuDevice;
use cudarc::driver::{LaunchConfig, PushKernelArg};

#[test]
#[ignore = "needs a CUDA GPU"]
fn rng_twin_matches_the_cpu_bit_for_bit() {
    let dev = GpuDevice::open(0).expect("a CUDA GPU");
    let f = dev.kernels.function("smoke", "rng_uniform24").unwrap();
    let n = 100_003usize;
    let key = backei::rng::dropout_key(4150, 17, 5);
    let t = 9u32;
    let mut y = dev.stream.alloc_zeros::<f32>(n).unwrap();
    let n_i32 = n as i32;
    unsafe {
        dev.stream.launch_builder(&f).arg(&mut y).arg(&key).arg(&t).arg(&n_i32).launch(LaunchConfig::for_num_elems(n as u32)).unwrap();
    }
    let got = dev.stream.clone_dtoh(&y).unwrap();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.to_bits(), backei::rng::uniform24(key, t, i as u64).to_bits(), "element {i}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn second_start_loads_kernels_from_the_disk_cache() {
    let dir = std::env::temp_dir().join(format!("backei-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dev = GpuDevice::open(0).expect("a CUDA GPU");
    let arch = dev.kernels.arch().to_string();
    let (_, hit) = backei::gpu::kernels::cached_ptx("smoke", &arch, Some(&dir)).unwrap();
    assert!(!hit, "a fresh cache cannot hit");
    let (_, hit) = backei::gpu::kernels::cached_ptx("smoke", &arch, Some(&dir)).unwrap();
    assert!(hit, "the second start must load the cached PTX");
    let _ = std::fs::remove_dir_all(&dir);
}
