//! 2×2 average pooling, stride 2, floor on odd sizes (PyTorch's AvgPool2d(2)).
//! Layout: x [n][c][h][w] → y [n][c][h/2][w/2].

use crate::Real;
use rayon::prelude::*;

pub fn forward<F: Real>(c: usize, h: usize, w: usize, x: &[F], y: &mut [F]) {
    let (ho, wo) = (h / 2, w / 2);
    let q = F::from_f64(0.25);
    y.par_chunks_mut(ho * wo).zip(x.par_chunks(h * w)).with_min_len(c).for_each(|(y, x)| {
        for oy in 0..ho {
            let r0 = &x[2 * oy * w..];
            let r1 = &x[(2 * oy + 1) * w..];
            for ox in 0..wo {
                y[oy * wo + ox] = (r0[2 * ox] + r0[2 * ox + 1] + r1[2 * ox] + r1[2 * ox + 1]) * q;
            }
        }
    });
}

pub fn backward<F: Real>(c: usize, h: usize, w: usize, dy: &[F], dx: &mut [F]) {
    let (ho, wo) = (h / 2, w / 2);
    let q = F::from_f64(0.25);
    dx.par_chunks_mut(h * w).zip(dy.par_chunks(ho * wo)).with_min_len(c).for_each(|(dx, dy)| {
        dx.fill(F::ZERO); // rows/columns dropped by the floor get no gradient
        for oy in 0..ho {
            for ox in 0..wo {
                let d = dy[oy * wo + ox] * q;
                dx[2 * oy * w + 2 * ox] = d;
                dx[2 * oy * w + 2 * ox + 1] = d;
                dx[(2 * oy + 1) * w + 2 * ox] = d;
                dx[(2 * oy + 1) * w + 2 * ox + 1] = d;
            }
        }
    });
}
