//! The CPU ops (im2col+GEMM convolution, linear, 2×2 average pooling) against naive loops, in
//! f64, on odd sizes, with padding, and with several samples (the ops split samples over cores).

mod common;

use backei::cpu::conv::{self, ConvGeom};
use backei::cpu::{linear, pool};
use common::Rng;

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{what}[{i}]: {x} vs naive {y}");
    }
}

/// Naive conv of n samples: y[n][co][oy][ox] = b[co] + Σ w[co][ci][ky][kx]·x[n][ci][oy+ky−p][ox+kx−p].
fn naive_conv(g: &ConvGeom, w: &[f64], b: &[f64], x: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * g.out_len()];
    for s in 0..n {
        for co in 0..g.cout {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let mut acc = b[co];
                    for ci in 0..g.cin {
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let (iy, ix) = (oy as isize + ky as isize - g.pad as isize, ox as isize + kx as isize - g.pad as isize);
                                if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                    acc += w[((co * g.cin + ci) * g.k + ky) * g.k + kx]
                                        * x[s * g.in_len() + (ci * g.h + iy as usize) * g.w + ix as usize];
                                }
                            }
                        }
                    }
                    y[s * g.out_len() + (co * g.ho + oy) * g.wo + ox] = acc;
                }
            }
        }
    }
    y
}

/// Naive adjoints of the conv: dx and (dW, db), by the same loops with the product's roles swapped.
fn naive_conv_back(g: &ConvGeom, w: &[f64], x: &[f64], dy: &[f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; n * g.in_len()];
    let mut dw = vec![0.0; g.weight_len()];
    let mut db = vec![0.0; g.cout];
    for s in 0..n {
        for co in 0..g.cout {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let d = dy[s * g.out_len() + (co * g.ho + oy) * g.wo + ox];
                    db[co] += d;
                    for ci in 0..g.cin {
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let (iy, ix) = (oy as isize + ky as isize - g.pad as isize, ox as isize + kx as isize - g.pad as isize);
                                if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                    let xi = s * g.in_len() + (ci * g.h + iy as usize) * g.w + ix as usize;
                                    let wi = ((co * g.cin + ci) * g.k + ky) * g.k + kx;
                                    dx[xi] += w[wi] * d;
                                    dw[wi] += x[xi] * d;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

#[test]
fn conv_matches_naive_loops() {
    let mut rng = Rng(7);
    // (cin, cout, h, w, k, pad): odd and non-square maps, no padding, padding < k/2, = k/2, > k/2
    for &(cin, cout, h, w, k, pad) in &[
        (1, 2, 5, 5, 3, 0),
        (2, 3, 7, 5, 3, 1),
        (3, 2, 6, 9, 5, 2),
        (2, 2, 4, 3, 3, 2),
        (3, 4, 5, 5, 5, 2),
        (2, 3, 1, 1, 1, 0),
        (1, 1, 3, 3, 3, 1),
    ] {
        let g = ConvGeom::new(cin, cout, h, w, k, pad);
        for n in [1, 3, 7] {
            let x = rng.vec(n * g.in_len(), -1.0, 1.0);
            let wt = rng.vec(g.weight_len(), -1.0, 1.0);
            let b = rng.vec(cout, -1.0, 1.0);
            let what = format!("conv {cin}→{cout} {h}×{w} k{k} p{pad} n{n}");
            let mut y = vec![f64::NAN; n * g.out_len()];
            conv::forward(&g, &wt, &b, &x, &mut y);
            close(&y, &naive_conv(&g, &wt, &b, &x, n), &format!("{what} forward"));
            let dy = rng.vec(n * g.out_len(), -1.0, 1.0);
            let (ndx, ndw, ndb) = naive_conv_back(&g, &wt, &x, &dy, n);
            // overwrite mode
            let mut dx = vec![f64::NAN; n * g.in_len()];
            conv::backward_data(&g, &wt, &dy, &mut dx, false);
            close(&dx, &ndx, &format!("{what} backward_data"));
            // accumulate mode adds to what is there
            let base = rng.vec(n * g.in_len(), -1.0, 1.0);
            let mut dx = base.clone();
            conv::backward_data(&g, &wt, &dy, &mut dx, true);
            let want: Vec<f64> = base.iter().zip(&ndx).map(|(a, b)| a + b).collect();
            close(&dx, &want, &format!("{what} backward_data accumulate"));
            // weights accumulate
            let (w0, b0) = (rng.vec(g.weight_len(), -1.0, 1.0), rng.vec(cout, -1.0, 1.0));
            let (mut dw, mut db) = (w0.clone(), b0.clone());
            conv::backward_weights(&g, &x, &dy, &mut dw, &mut db);
            close(&dw, &w0.iter().zip(&ndw).map(|(a, b)| a + b).collect::<Vec<_>>(), &format!("{what} dW"));
            close(&db, &b0.iter().zip(&ndb).map(|(a, b)| a + b).collect::<Vec<_>>(), &format!("{what} db"));
        }
    }
}

#[test]
fn linear_matches_naive_loops() {
    let mut rng = Rng(8);
    for &(n_in, n_out, rows) in &[(1, 1, 1), (7, 3, 5), (13, 10, 17), (64, 33, 9)] {
        let x = rng.vec(rows * n_in, -1.0, 1.0);
        let w = rng.vec(n_out * n_in, -1.0, 1.0);
        let b = rng.vec(n_out, -1.0, 1.0);
        let mut y = vec![f64::NAN; rows * n_out];
        linear::forward(n_in, n_out, &w, &b, &x, &mut y);
        let mut ny = vec![0.0; rows * n_out];
        for r in 0..rows {
            for o in 0..n_out {
                ny[r * n_out + o] = b[o] + (0..n_in).map(|i| w[o * n_in + i] * x[r * n_in + i]).sum::<f64>();
            }
        }
        close(&y, &ny, "linear forward");
        let dy = rng.vec(rows * n_out, -1.0, 1.0);
        let mut dx = vec![f64::NAN; rows * n_in];
        linear::backward_data(n_in, n_out, &w, &dy, &mut dx);
        let mut ndx = vec![0.0; rows * n_in];
        let mut ndw = rng.vec(n_out * n_in, -1.0, 1.0);
        let mut ndb = rng.vec(n_out, -1.0, 1.0);
        let (mut dw, mut db) = (ndw.clone(), ndb.clone());
        for r in 0..rows {
            for o in 0..n_out {
                let d = dy[r * n_out + o];
                ndb[o] += d;
                for i in 0..n_in {
                    ndx[r * n_in + i] += w[o * n_in + i] * d;
                    ndw[o * n_in + i] += x[r * n_in + i] * d;
                }
            }
        }
        close(&dx, &ndx, "linear backward_data");
        linear::backward_weights(n_in, n_out, &x, &dy, &mut dw, &mut db);
        close(&dw, &ndw, "linear dW (accumulated)");
        close(&db, &ndb, "linear db (accumulated)");
    }
}

#[test]
fn avg_pool_matches_naive_loops_on_odd_sizes() {
    let mut rng = Rng(9);
    for &(c, h, w, n) in &[(1, 2, 2, 1), (3, 5, 7, 2), (2, 7, 7, 3), (4, 6, 3, 1)] {
        let (ho, wo) = (h / 2, w / 2);
        let x = rng.vec(n * c * h * w, -1.0, 1.0);
        let mut y = vec![f64::NAN; n * c * ho * wo];
        pool::forward(c, h, w, &x, &mut y);
        let mut ny = vec![0.0; y.len()];
        let dy = rng.vec(y.len(), -1.0, 1.0);
        let mut ndx = vec![0.0; x.len()];
        for p in 0..n * c {
            for oy in 0..ho {
                for ox in 0..wo {
                    for (dy_, dx_) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let xi = p * h * w + (2 * oy + dy_) * w + 2 * ox + dx_;
                        ny[p * ho * wo + oy * wo + ox] += 0.25 * x[xi];
                        ndx[xi] += 0.25 * dy[p * ho * wo + oy * wo + ox];
                    }
                }
            }
        }
        close(&y, &ny, &format!("pool {c}×{h}×{w} forward"));
        // the dropped last row/column (odd sizes) must get exactly 0, even over stale values
        let mut dx = vec![f64::NAN; x.len()];
        pool::backward(c, h, w, &dy, &mut dx);
        close(&dx, &ndx, &format!("pool {c}×{h}×{w} backward"));
    }
}
