//! Dropout with a new mask at every time step, drawn from the counter-based RNG (`crate::rng`),
//! so the GPU engine draws the very same masks. Kept elements are scaled by 1/(1−p) (PyTorch).
//! No mask is stored: the backward draws it again from the same key (as the GPU's kernels do).
//! Layout: x [T][B·C·H·W]; the element index is the position inside one step's block, counted
//! from `index0`: a data-parallel rank whose batch is the shard of the global batch starting at
//! sample s passes s·C·H·W, so each sample gets the mask it gets in one process's whole batch.

use crate::rng::dropout_keep;
use crate::Real;
use rayon::prelude::*;

/// y = x·mask/(1−p), mask drawn from `key` for elements `index0..` of each step.
pub fn forward<F: Real>(key: u64, p: f32, step_len: usize, index0: u64, x: &[F], y: &mut [F]) {
    let scale = F::from_f64(1.0 / (1.0 - p as f64));
    y.par_chunks_mut(step_len).zip(x.par_chunks(step_len)).enumerate().for_each(|(t, (y, x))| {
        for i in 0..x.len() {
            y[i] = if dropout_keep(key, t as u32, index0 + i as u64, p) { x[i] * scale } else { F::ZERO };
        }
    });
}

/// dx = dy·mask/(1−p), the forward's mask drawn again from `key` (and `index0`).
pub fn backward<F: Real>(key: u64, p: f32, step_len: usize, index0: u64, dy: &[F], dx: &mut [F]) {
    let scale = F::from_f64(1.0 / (1.0 - p as f64));
    dx.par_chunks_mut(step_len).zip(dy.par_chunks(step_len)).enumerate().for_each(|(t, (dx, dy))| {
        for i in 0..dy.len() {
            dx[i] = if dropout_keep(key, t as u32, index0 + i as u64, p) { dy[i] * scale } else { F::ZERO };
        }
    });
}

/// The mask [T][step_len] (1: kept) of `key`, for tests and inspection.
pub fn mask(key: u64, p: f32, step_len: usize, steps: usize) -> Vec<u8> {
    (0..steps * step_len).map(|j| dropout_keep(key, (j / step_len) as u32, (j % step_len) as u64, p) as u8).collect()
}
