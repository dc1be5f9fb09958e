//! Dropout with a new mask at every time step, drawn from the counter-based RNG (`crate::rng`),
//! so the GPU engine draws the very same masks. Kept elements are scaled by 1/(1−p) (PyTorch).
//! Layout: x [T][B·C·H·W]; the element index is the position inside one step's block.

use crate::rng::dropout_keep;
use crate::Real;
use rayon::prelude::*;

/// y = x·mask/(1−p); `mask` (kept as 0/1 bytes) is what backward needs.
pub fn forward<F: Real>(key: u64, p: f32, step_len: usize, x: &[F], y: &mut [F], mask: &mut [u8]) {
    let scale = F::from_f64(1.0 / (1.0 - p as f64));
    y.par_chunks_mut(step_len).zip(x.par_chunks(step_len)).zip(mask.par_chunks_mut(step_len)).enumerate().for_each(|(t, ((y, x), m))| {
        for i in 0..x.len() {
            let keep = dropout_keep(key, t as u32, i as u64, p);
            m[i] = keep as u8;
            y[i] = if keep { x[i] * scale } else { F::ZERO };
        }
    });
}

pub fn backward<F: Real>(p: f32, dy: &[F], mask: &[u8], dx: &mut [F]) {
    let scale = F::from_f64(1.0 / (1.0 - p as f64));
    dx.par_iter_mut().zip(dy.par_iter()).zip(mask.par_iter()).for_each(|((dx, dy), m)| {
        *dx = if *m != 0 { *dy * scale } else { F::ZERO };
    });
}
