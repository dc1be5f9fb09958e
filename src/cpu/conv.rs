//! Conv2d on the CPU: stride 1, zero padding, bias; im2col + GEMM per sample, samples spread over
//! all cores. Used by the Conv layers and by the BackEI gates (C→C, (2r+1)², padding r).
//!
//! Layout: x [n][cin][h][w], y [n][cout][ho][wo], weight [cout][cin][k][k] (PyTorch's).

use super::scratch::with_scratch;
use crate::Real;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    pub fn new(cin: usize, cout: usize, h: usize, w: usize, k: usize, pad: usize) -> Self {
        ConvGeom { cin, cout, h, w, k, pad, ho: h + 2 * pad + 1 - k, wo: w + 2 * pad + 1 - k }
    }
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    pub fn out_len(&self) -> usize {
        self.cout * self.ho * self.wo
    }
    /// Rows of the im2col matrix: cin·k·k.
    pub fn col_rows(&self) -> usize {
        self.cin * self.k * self.k
    }
    pub fn out_pixels(&self) -> usize {
        self.ho * self.wo
    }
    pub fn weight_len(&self) -> usize {
        self.cout * self.col_rows()
    }
}

/// The output columns ox whose input column ox + kx − pad lies inside the map: [lo, hi).
#[inline(always)]
fn valid_cols(g: &ConvGeom, kx: usize) -> (usize, usize) {
    let lo = g.pad.saturating_sub(kx).min(g.wo);
    let hi = (g.w + g.pad).saturating_sub(kx).min(g.wo).max(lo);
    (lo, hi)
}

/// col[(ci·k + ky)·k + kx][oy·wo + ox] = x[ci][oy + ky − pad][ox + kx − pad] (0 outside).
/// Rows are copied as contiguous runs: the padding is only at the ends of each run.
fn im2col<F: Real>(g: &ConvGeom, x: &[F], col: &mut [F]) {
    let p = g.out_pixels();
    for ci in 0..g.cin {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &mut col[((ci * g.k + ky) * g.k + kx) * p..][..p];
                let (lo, hi) = valid_cols(g, kx);
                for oy in 0..g.ho {
                    let iy = oy as isize + ky as isize - g.pad as isize;
                    let dst = &mut row[oy * g.wo..(oy + 1) * g.wo];
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(F::ZERO);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    dst[..lo].fill(F::ZERO);
                    dst[hi..].fill(F::ZERO);
                    let ix0 = lo + kx - g.pad;
                    dst[lo..hi].copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
                }
            }
        }
    }
}

/// The adjoint of im2col: dx += scatter(col).
fn col2im_add<F: Real>(g: &ConvGeom, col: &[F], dx: &mut [F]) {
    let p = g.out_pixels();
    for ci in 0..g.cin {
        let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &col[((ci * g.k + ky) * g.k + kx) * p..][..p];
                let (lo, hi) = valid_cols(g, kx);
                if lo == hi {
                    continue;
                }
                let ix0 = lo + kx - g.pad;
                for oy in 0..g.ho {
                    let iy = oy as isize + ky as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w + ix0..][..hi - lo];
                    let src = &row[oy * g.wo + lo..oy * g.wo + hi];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += *s);
                }
            }
        }
    }
}

/// y = W ⊛ x + b for n samples.
pub fn forward<F: Real>(g: &ConvGeom, weight: &[F], bias: &[F], x: &[F], y: &mut [F]) {
    let (kk, p) = (g.col_rows(), g.out_pixels());
    debug_assert_eq!(x.len() / g.in_len(), y.len() / g.out_len());
    y.par_chunks_mut(g.out_len()).zip(x.par_chunks(g.in_len())).for_each(|(y, x)| {
        with_scratch(kk * p, |col: &mut [F]| {
            im2col(g, x, col);
            for (co, row) in y.chunks_mut(p).enumerate() {
                row.fill(bias[co]);
            }
            // y[cout×p] += W[cout×kk] · col[kk×p]
            unsafe {
                F::gemm(
                    g.cout,
                    kk,
                    p,
                    F::ONE,
                    weight.as_ptr(),
                    kk as isize,
                    1,
                    col.as_ptr(),
                    p as isize,
                    1,
                    F::ONE,
                    y.as_mut_ptr(),
                    p as isize,
                    1,
                );
            }
        })
    });
}

/// dx (+)= Wᵀ ⊛ dy for n samples; `accumulate` adds to dx instead of overwriting it.
pub fn backward_data<F: Real>(g: &ConvGeom, weight: &[F], dy: &[F], dx: &mut [F], accumulate: bool) {
    let (kk, p) = (g.col_rows(), g.out_pixels());
    dx.par_chunks_mut(g.in_len()).zip(dy.par_chunks(g.out_len())).for_each(|(dx, dy)| {
        with_scratch(kk * p, |col: &mut [F]| {
            // col[kk×p] = Wᵀ[kk×cout] · dy[cout×p]
            unsafe {
                F::gemm(
                    kk,
                    g.cout,
                    p,
                    F::ONE,
                    weight.as_ptr(),
                    1,
                    kk as isize,
                    dy.as_ptr(),
                    p as isize,
                    1,
                    F::ZERO,
                    col.as_mut_ptr(),
                    p as isize,
                    1,
                );
            }
            if !accumulate {
                dx.fill(F::ZERO);
            }
            col2im_add(g, col, dx);
        })
    });
}

/// dW += Σ_n dy_n · im2col(x_n)ᵀ and db += Σ_n Σ_p dy_n over n samples.
pub fn backward_weights<F: Real>(g: &ConvGeom, x: &[F], dy: &[F], dw: &mut [F], db: &mut [F]) {
    let (kk, p) = (g.col_rows(), g.out_pixels());
    let n = dy.len() / g.out_len();
    if n == 0 {
        return;
    }
    let chunk = n.div_ceil(rayon::current_num_threads());
    let partials: Vec<(Vec<F>, Vec<F>)> = (0..n)
        .into_par_iter()
        .step_by(chunk)
        .map(|start| {
            let end = (start + chunk).min(n);
            let mut dwl = vec![F::ZERO; g.weight_len()];
            let mut dbl = vec![F::ZERO; g.cout];
            with_scratch(kk * p, |col: &mut [F]| {
                for s in start..end {
                    let xs = &x[s * g.in_len()..(s + 1) * g.in_len()];
                    let dys = &dy[s * g.out_len()..(s + 1) * g.out_len()];
                    im2col(g, xs, col);
                    // dW[cout×kk] += dy[cout×p] · colᵀ[p×kk]
                    unsafe {
                        F::gemm(
                            g.cout,
                            p,
                            kk,
                            F::ONE,
                            dys.as_ptr(),
                            p as isize,
                            1,
                            col.as_ptr(),
                            1,
                            p as isize,
                            F::ONE,
                            dwl.as_mut_ptr(),
                            kk as isize,
                            1,
                        );
                    }
                    for (co, row) in dys.chunks(p).enumerate() {
                        dbl[co] += row.iter().copied().sum::<F>();
                    }
                }
            });
            (dwl, dbl)
        })
        .collect();
    for (dwl, dbl) in partials {
        dw.iter_mut().zip(&dwl).for_each(|(a, b)| *a += *b);
        db.iter_mut().zip(&dbl).for_each(|(a, b)| *a += *b);
    }
}
