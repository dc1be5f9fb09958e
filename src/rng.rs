//! Counter-based random numbers: a value is a pure function of its key, so the CPU engine, the
//! GPU engine (`cuda/common.cuh` has the same functions) and any thread order draw the very same
//! dropout masks. SplitMix64's finaliser serves as the mixing function.

/// SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mix.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of one dropout layer at one training iteration: (seed, iteration, layer).
#[inline(always)]
pub fn dropout_key(seed: u64, iteration: u64, layer: u32) -> u64 {
    mix64(seed ^ mix64(iteration.wrapping_mul(0x1_0000_0001) ^ ((layer as u64) << 48)))
}

/// A uniform number in [0, 1) with 24 random bits, for time step `t` and element `index`
/// (the element's position inside one step's [B][C][H][W] block).
#[inline(always)]
pub fn uniform24(key: u64, t: u32, index: u64) -> f32 {
    let r = mix64(key ^ mix64(((t as u64) << 40) ^ index));
    (r >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Dropout keeps an element when its uniform draw is ≥ p.
#[inline(always)]
pub fn dropout_keep(key: u64, t: u32, index: u64, p: f32) -> bool {
    uniform24(key, t, index) >= p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_uniform_and_keyed() {
        let key = dropout_key(4150, 7, 3);
        let n = 200_000u64;
        let mean: f64 = (0..n).map(|i| uniform24(key, 2, i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        let kept = (0..n).filter(|&i| dropout_keep(key, 2, i, 0.5)).count() as f64 / n as f64;
        assert!((kept - 0.5).abs() < 0.01, "kept {kept}");
        // another step, layer or iteration gives another mask
        let same_t = (0..1000).filter(|&i| dropout_keep(key, 2, i, 0.5) == dropout_keep(key, 3, i, 0.5)).count();
        assert!(same_t < 600, "{same_t}");
        let other = dropout_key(4150, 8, 3);
        let same_it = (0..1000).filter(|&i| dropout_keep(key, 2, i, 0.5) == dropout_keep(other, 2, i, 0.5)).count();
        assert!(same_it < 600, "{same_it}");
        // fixed values, pinned so that the CUDA twin can be checked against them
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
    }
}
