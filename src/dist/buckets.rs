//! Gradient buckets: which ranges of the flat gradient buffer are all-reduced together, in which
//! order. The backward runs from the last layer to the first, and each layer owns an ascending
//! range of the flat buffer, so the gradients become final from the end of the buffer towards
//! its start. A bucket is a run of whole layers, closed once it holds `bucket_elems` values
//! (PyTorch DDP's `bucket_cap_mb`, 25 MiB by default); it is launched as soon as its first layer's
//! backward is enqueued, while the earlier layers' backward still runs. Every rank derives the
//! same plan from the same network, which NCCL requires: the same calls, in the same order, with
//! the same sizes, on every rank.

use std::ops::Range;

/// The default bucket size, as PyTorch DDP's.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// The buckets in launch order (from the end of the buffer towards its start), covering
/// `0..len` without overlap. `layer_starts`: the first flat index of each layer with
/// parameters, ascending.
pub fn plan(layer_starts: &[usize], len: usize, bucket_elems: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut end = len;
    for &start in layer_starts.iter().rev() {
        if start < end && end - start >= bucket_elems.max(1) {
            out.push(start..end);
            end = start;
        }
    }
    if end > 0 {
        out.push(0..end);
    }
    out
}

/// The bucket size from BACKEI_BUCKET_MB (MiB, may be fractional), else the default.
pub fn bucket_bytes_from_env() -> usize {
    std::env::var("BACKEI_BUCKET_MB")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|mb| *mb > 0.0 && mb.is_finite())
        .map_or(DEFAULT_BUCKET_BYTES, |mb| ((mb * (1u64 << 20) as f64) as usize).max(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaling_model_uses_the_networks_parameter_counts() {
        // docs/distributed.md and bench/distributed_model.py model the all-reduce of these buffers
        let doc = include_str!("../../docs/distributed.md");
        let model = include_str!("../../bench/distributed_model.py");
        for spec in
            [crate::NetworkSpec::mnist(), crate::NetworkSpec::fashion_mnist(), crate::NetworkSpec::cifar10(), crate::NetworkSpec::nmnist()]
        {
            let n = crate::Network::<f32>::new(&spec, 0).unwrap().num_params();
            let digits = n.to_string();
            let mut grouped = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    grouped.push(',');
                }
                grouped.push(c);
            }
            assert!(doc.contains(&format!("| {} | {grouped} |", spec.name)), "docs/distributed.md: {} has {grouped} parameters", spec.name);
            assert!(
                model.contains(&format!("\"{}\": {}", spec.name, grouped.replace(',', "_"))),
                "bench/distributed_model.py: {} has {n}",
                spec.name
            );
        }
    }

    #[test]
    fn buckets_cover_the_buffer_from_its_end_in_whole_layers() {
        // four layers of 10, 30, 5 and 55 values
        let starts = [0, 10, 40, 45];
        assert_eq!(plan(&starts, 100, 1_000), vec![0..100], "all in one bucket");
        assert_eq!(plan(&starts, 100, 1), vec![45..100, 40..45, 10..40, 0..10], "one layer each");
        assert_eq!(plan(&starts, 100, 50), vec![45..100, 0..45]);
        assert_eq!(plan(&starts, 100, 58), vec![40..100, 0..40]);
        assert_eq!(plan(&starts, 100, 61), vec![10..100, 0..10]);
        assert_eq!(plan(&[], 0, 10), Vec::<Range<usize>>::new());
        for cap in 1..120 {
            let p = plan(&starts, 100, cap);
            let mut end = 100;
            for b in &p {
                assert_eq!(b.end, end, "contiguous, launched from the end");
                assert!(b.start == 0 || starts.contains(&b.start), "whole layers");
                end = b.start;
            }
            assert_eq!(end, 0, "covers the buffer");
        }
    }
}
