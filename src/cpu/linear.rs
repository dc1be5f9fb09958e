//! Linear layer on the CPU: y[n×out] = x[n×in] · Wᵀ + b, W [out][in] (PyTorch's layout), rows of
//! the batch (all T×B of them at once) split over the cores.

use crate::Real;
use rayon::prelude::*;

fn row_chunk(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads() * 2).max(1)
}

pub fn forward<F: Real>(n_in: usize, n_out: usize, weight: &[F], bias: &[F], x: &[F], y: &mut [F]) {
    let rows = x.len() / n_in;
    let c = row_chunk(rows);
    y.par_chunks_mut(c * n_out).zip(x.par_chunks(c * n_in)).for_each(|(y, x)| {
        let m = x.len() / n_in;
        for row in y.chunks_mut(n_out) {
            row.copy_from_slice(bias);
        }
        unsafe {
            F::gemm(
                m,
                n_in,
                n_out,
                F::ONE,
                x.as_ptr(),
                n_in as isize,
                1,
                weight.as_ptr(),
                1,
                n_in as isize,
                F::ONE,
                y.as_mut_ptr(),
                n_out as isize,
                1,
            );
        }
    });
}

/// dx = dy · W.
pub fn backward_data<F: Real>(n_in: usize, n_out: usize, weight: &[F], dy: &[F], dx: &mut [F]) {
    let rows = dy.len() / n_out;
    let c = row_chunk(rows);
    dx.par_chunks_mut(c * n_in).zip(dy.par_chunks(c * n_out)).for_each(|(dx, dy)| {
        let m = dy.len() / n_out;
        unsafe {
            F::gemm(
                m,
                n_out,
                n_in,
                F::ONE,
                dy.as_ptr(),
                n_out as isize,
                1,
                weight.as_ptr(),
                n_in as isize,
                1,
                F::ZERO,
                dx.as_mut_ptr(),
                n_in as isize,
                1,
            );
        }
    });
}

/// dW += dyᵀ · x, db += Σ_rows dy.
pub fn backward_weights<F: Real>(n_in: usize, n_out: usize, x: &[F], dy: &[F], dw: &mut [F], db: &mut [F]) {
    let rows = dy.len() / n_out;
    let c = row_chunk(n_out);
    dw.par_chunks_mut(c * n_in).enumerate().for_each(|(i, dw)| {
        let o0 = i * c;
        let m = dw.len() / n_in;
        unsafe {
            F::gemm(
                m,
                rows,
                n_in,
                F::ONE,
                dy.as_ptr().add(o0),
                1,
                n_out as isize,
                x.as_ptr(),
                n_in as isize,
                1,
                F::ONE,
                dw.as_mut_ptr(),
                n_in as isize,
                1,
            );
        }
    });
    for row in dy.chunks(n_out) {
        db.iter_mut().zip(row).for_each(|(a, b)| *a += *b);
    }
}
