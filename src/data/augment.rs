//! Augmentation. CIFAR-10 (train): random crop 32 with 4 pixels of zero padding, horizontal
//! flip with probability 1/2, then per-channel normalisation (mean [`CIFAR_MEAN`], std
//! [`CIFAR_STD`]); the test set gets the normalisation only. MNIST family: none unless asked
//! (`augment = true` gives a random shift: crop 28 with 2 pixels of padding, no flip).
//! Draws come from the counter-based hash of (seed, epoch, sample index), so they do not
//! depend on thread scheduling.

use super::encode::{draw, stream_key, PURPOSE_AUGMENT};

pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f32; 3] = [0.2023, 0.1994, 0.2010];
pub const CIFAR_PAD: usize = 4;
pub const MNIST_PAD: usize = 2;

/// One draw of crop offsets (each in `0..=2*pad`) and flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropFlip {
    pub dy: usize,
    pub dx: usize,
    pub flip: bool,
}

impl CropFlip {
    /// The identity (no shift, no flip) for padding `pad`.
    pub fn identity(pad: usize) -> Self {
        CropFlip { dy: pad, dx: pad, flip: false }
    }

    /// Draws offsets and flip for a sample.
    pub fn draw(seed: u64, epoch: u64, sample: u64, pad: usize, allow_flip: bool) -> Self {
        let key = stream_key(seed, PURPOSE_AUGMENT, epoch, sample, 0);
        let r = draw(key, 0);
        let m = 2 * pad as u64 + 1;
        CropFlip { dy: (r % m) as usize, dx: ((r >> 16) % m) as usize, flip: allow_flip && (r >> 63) == 1 }
    }
}

/// Pads `src` (C×H×W bytes) with `pad` zero pixels, crops H×W at (dy, dx), flips if asked.
pub fn crop_flip(src: &[u8], dst: &mut [u8], shape: [usize; 3], pad: usize, cf: CropFlip) {
    let [c, h, w] = shape;
    for ch in 0..c {
        let s = &src[ch * h * w..(ch + 1) * h * w];
        let d = &mut dst[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            let sy = y as isize + cf.dy as isize - pad as isize;
            let row = &mut d[y * w..(y + 1) * w];
            if sy < 0 || sy >= h as isize {
                row.fill(0);
                continue;
            }
            let srow = &s[sy as usize * w..(sy as usize + 1) * w];
            for (x, o) in row.iter_mut().enumerate() {
                let xx = if cf.flip { w - 1 - x } else { x };
                let sx = xx as isize + cf.dx as isize - pad as isize;
                *o = if sx < 0 || sx >= w as isize { 0 } else { srow[sx as usize] };
            }
        }
    }
}

/// Per-channel lookup tables byte → (byte/255 − mean) / std for CIFAR-10.
pub fn cifar_norm_lut() -> Vec<[f32; 256]> {
    (0..3)
        .map(|c| {
            let mut l = [0f32; 256];
            for (b, v) in l.iter_mut().enumerate() {
                *v = (b as f32 / 255.0 - CIFAR_MEAN[c]) / CIFAR_STD[c];
            }
            l
        })
        .collect()
}
