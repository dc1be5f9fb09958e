//! Input encoders: direct (the image is the input current at every step) and rate (per-step
//! Bernoulli spikes with probability = intensity, drawn from a counter-based hash of
//! (seed, epoch, sample index, t, pixel), so results do not depend on thread scheduling).

use std::fmt;
use std::str::FromStr;

/// How static images become network input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Encoding {
    /// The (scaled / normalised) image is the input current at every step; `t_in = 1`.
    #[default]
    Direct,
    /// Bernoulli spikes per step with p = intensity in [0, 1]; `t_in = T`.
    Rate,
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Direct => "direct",
            Encoding::Rate => "rate",
        })
    }
}

impl FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "direct" => Ok(Encoding::Direct),
            "rate" => Ok(Encoding::Rate),
            _ => Err(format!("unknown encoding `{s}`; expected direct or rate")),
        }
    }
}

/// SplitMix64 finaliser: a good 64-bit mixing function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E3779B97F4A7C15;

/// Key of one (seed, epoch, sample, t) stream; `purpose` separates independent uses
/// (rate spikes, augmentation, shuffling).
#[inline]
pub fn stream_key(seed: u64, purpose: u64, epoch: u64, sample: u64, t: u64) -> u64 {
    let mut k = mix64(seed ^ purpose.wrapping_mul(GOLDEN));
    k = mix64(k ^ epoch.wrapping_add(GOLDEN));
    k = mix64(k ^ sample.wrapping_add(GOLDEN.wrapping_mul(3)));
    mix64(k ^ t.wrapping_add(GOLDEN.wrapping_mul(5)))
}

/// The `i`-th 64-bit draw of a stream (counter-based: no state).
#[inline]
pub fn draw(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)))
}

pub const PURPOSE_RATE: u64 = 1;
pub const PURPOSE_AUGMENT: u64 = 2;
pub const PURPOSE_SHUFFLE: u64 = 3;

/// Threshold table: pixel byte b spikes iff a 32-bit draw < `THRESH[b]` = b·2³²/255, i.e.
/// with probability exactly b/255 (b = 255 always spikes, b = 0 never).
pub fn thresholds() -> [u64; 256] {
    let mut t = [0u64; 256];
    for (b, v) in t.iter_mut().enumerate() {
        *v = ((b as u64) << 32) / 255;
    }
    t
}

/// Rate-encodes one step: `out[i] = 1.0` with probability `intensity[i] / 255`, else 0.
/// `key` = `stream_key(seed, PURPOSE_RATE, epoch, sample, t)`.
pub fn rate_step(intensity: &[u8], key: u64, thresh: &[u64; 256], out: &mut [f32]) {
    // One 64-bit draw serves two pixels: pixel 2k uses its low 32 bits, 2k+1 the high ones.
    for (k, (o, px)) in out.chunks_mut(2).zip(intensity.chunks(2)).enumerate() {
        let h = draw(key, k as u64);
        for (j, (o, &b)) in o.iter_mut().zip(px).enumerate() {
            let u = (h >> (32 * j)) & 0xffff_ffff;
            *o = if u < thresh[b as usize] { 1.0 } else { 0.0 };
        }
    }
}

/// Direct encoding with a per-channel lookup table (byte → f32); `plane` = H·W.
pub fn direct(src: &[u8], lut: &[[f32; 256]], plane: usize, out: &mut [f32]) {
    for (c, (o, s)) in out.chunks_exact_mut(plane).zip(src.chunks_exact(plane)).enumerate() {
        let l = &lut[c.min(lut.len() - 1)];
        for (o, &b) in o.iter_mut().zip(s) {
            *o = l[b as usize];
        }
    }
}

/// Lookup table scaling bytes to [0, 1].
pub fn unit_lut() -> [f32; 256] {
    let mut l = [0f32; 256];
    for (b, v) in l.iter_mut().enumerate() {
        *v = b as f32 / 255.0;
    }
    l
}
