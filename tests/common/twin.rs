//! The reference twin: the network of a `NetworkSpec` written plainly from docs/model.md, step by
//! step and sample by sample, with scalar ops on the autodiff tape (convolutions as loops, no
//! GEMM, no hand-written backward). It shares nothing with the engine but the public spec types,
//! the parameter names/layout of `net.slots` (to read the same numbers) and the dropout-mask
//! function of `backei::rng` (the masks are part of the spec: a pure function of their key).

use super::tape::{Tape, V};
use backei::spec::{FiringMode, LayerSpec, NetworkSpec, Surrogate};
use backei::ParamSlot;
use std::collections::HashMap;

/// The surrogate dH/dx (and d sign/dx) as model.md / spec.rs define it.
pub fn surrogate(s: Surrogate, x: f64) -> f64 {
    match s {
        Surrogate::Rectangle { width } => {
            if x.abs() < width / 2.0 {
                1.0 / width
            } else {
                0.0
            }
        }
        Surrogate::Sigmoid { alpha } => {
            let sg = 1.0 / (1.0 + (-alpha * x).exp());
            alpha * sg * (1.0 - sg)
        }
        Surrogate::Atan { alpha } => {
            let y = std::f64::consts::FRAC_PI_2 * alpha * x;
            alpha / 2.0 / (1.0 + y * y)
        }
    }
}

/// The result of running the twin: readout values, and the gradient of L = Σ c·readout with
/// respect to every parameter (flat, in the engine's layout) and every input element.
pub struct TwinResult {
    pub readout: Vec<f64>,
    pub param_grad: Vec<f64>,
    pub input_grad: Vec<f64>,
}

/// A C×H×W map of tape nodes.
#[derive(Clone)]
struct Map {
    c: usize,
    h: usize,
    w: usize,
    x: Vec<V>,
}

struct Ctx<'a> {
    tape: Tape,
    params: Vec<V>,
    slots: &'a [ParamSlot],
}

impl Ctx<'_> {
    fn p(&self, name: &str) -> &[V] {
        let s = self.slots.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no parameter {name}"));
        &self.params[s.range.clone()]
    }
}

/// out[co][y][x] = b[co] + Σ_{ci,ky,kx} W[co][ci][ky][kx] · in[ci][y+ky−pad][x+kx−pad] (zero outside).
fn conv(ctx: &mut Ctx, w: &[V], b: &[V], cout: usize, k: usize, pad: usize, m: &Map) -> Map {
    let ho = m.h + 2 * pad + 1 - k;
    let wo = m.w + 2 * pad + 1 - k;
    let mut out = Vec::with_capacity(cout * ho * wo);
    for co in 0..cout {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut acc = b[co];
                for ci in 0..m.c {
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = oy as isize + ky as isize - pad as isize;
                            let ix = ox as isize + kx as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= m.h as isize || ix >= m.w as isize {
                                continue;
                            }
                            let wv = w[((co * m.c + ci) * k + ky) * k + kx];
                            let xv = m.x[(ci * m.h + iy as usize) * m.w + ix as usize];
                            let prod = ctx.tape.mul(wv, xv);
                            acc = ctx.tape.add(acc, prod);
                        }
                    }
                }
                out.push(acc);
            }
        }
    }
    Map { c: cout, h: ho, w: wo, x: out }
}

/// State of one spiking layer for one sample.
struct SpikeState {
    u: Option<Vec<V>>,
    /// s_1, s_2, ... (all past outputs, for the delay).
    s: Vec<Vec<V>>,
}

/// Runs the twin on input x ([T_in][B][C][H][W], T_in = 1 or T) with the engine's parameters.
pub fn run(
    spec: &NetworkSpec,
    slots: &[ParamSlot],
    params: &[f64],
    x: &[f64],
    t_in: usize,
    batch: usize,
    c: &[f64],
    dropout_seed: u64,
    iteration: u64,
) -> TwinResult {
    let steps = spec.steps;
    let [ci, hi, wi] = spec.input;
    let frame = ci * hi * wi;
    let mut tape = Tape::new();
    let pv: Vec<V> = params.iter().map(|&p| tape.leaf(p)).collect();
    let xv: Vec<V> = x.iter().map(|&v| tape.leaf(v)).collect();
    let mut ctx = Ctx { tape, params: pv, slots };
    let (lam, th) = (spec.neuron.leak, spec.neuron.threshold);
    let fb = spec.feedback;
    let sur = spec.neuron.surrogate;
    assert!(spec.neuron.mode == FiringMode::Exact, "the twin implements the model (exact firing) only");
    let out_len = spec.classes().unwrap();
    let mut readout_nodes: Vec<Vec<Vec<V>>> = vec![Vec::new(); batch]; // [b][t] -> output
    for b in 0..batch {
        let mut states: HashMap<usize, SpikeState> = HashMap::new();
        for t in 0..steps {
            let t0 = if t_in == 1 { 0 } else { t };
            let off = (t0 * batch + b) * frame;
            let mut m = Map { c: ci, h: hi, w: wi, x: xv[off..off + frame].to_vec() };
            for (li, layer) in spec.layers.iter().enumerate() {
                m = match *layer {
                    LayerSpec::Conv { out_channels, kernel, padding } => {
                        let w = ctx.p(&format!("layers.{li}.weight")).to_vec();
                        let bi = ctx.p(&format!("layers.{li}.bias")).to_vec();
                        conv(&mut ctx, &w, &bi, out_channels, kernel, padding, &m)
                    }
                    LayerSpec::Linear { out_features } => {
                        let w = ctx.p(&format!("layers.{li}.weight")).to_vec();
                        let bi = ctx.p(&format!("layers.{li}.bias")).to_vec();
                        let n_in = m.x.len();
                        let mut out = Vec::new();
                        for o in 0..out_features {
                            let mut acc = bi[o];
                            for i in 0..n_in {
                                let prod = ctx.tape.mul(w[o * n_in + i], m.x[i]);
                                acc = ctx.tape.add(acc, prod);
                            }
                            out.push(acc);
                        }
                        Map { c: out_features, h: 1, w: 1, x: out }
                    }
                    LayerSpec::AvgPool => {
                        let (ho, wo) = (m.h / 2, m.w / 2);
                        let mut out = Vec::new();
                        for ch in 0..m.c {
                            for oy in 0..ho {
                                for ox in 0..wo {
                                    let at = |y: usize, x: usize| m.x[(ch * m.h + y) * m.w + x];
                                    let s = ctx
                                        .tape
                                        .sum(&[
                                            at(2 * oy, 2 * ox),
                                            at(2 * oy, 2 * ox + 1),
                                            at(2 * oy + 1, 2 * ox),
                                            at(2 * oy + 1, 2 * ox + 1),
                                        ])
                                        .unwrap();
                                    out.push(ctx.tape.scale(s, 0.25));
                                }
                            }
                        }
                        Map { c: m.c, h: ho, w: wo, x: out }
                    }
                    LayerSpec::Dropout { p } => {
                        let p32 = p as f32;
                        let key = backei::rng::dropout_key(dropout_seed, iteration, li as u32);
                        let len = m.x.len();
                        let scale = 1.0 / (1.0 - p32 as f64);
                        let mut out = Vec::new();
                        for (i, &xv) in m.x.iter().enumerate() {
                            let keep = backei::rng::dropout_keep(key, t as u32, (b * len + i) as u64, p32);
                            out.push(ctx.tape.scale(xv, if keep { scale } else { 0.0 }));
                        }
                        Map { x: out, ..m }
                    }
                    LayerSpec::Flatten => Map { c: m.c * m.h * m.w, h: 1, w: 1, x: m.x },
                    LayerSpec::BackEi | LayerSpec::Spiking => {
                        let plain = *layer == LayerSpec::Spiking;
                        let (back, ei) = if plain { (false, false) } else { (fb.back, fb.ei) };
                        let (r, d) = (fb.radius, fb.delay);
                        let n = m.x.len();
                        let st = states.entry(li).or_insert(SpikeState { u: None, s: Vec::new() });
                        let u_prev = st.u.clone();
                        let s_past: Option<Vec<V>> = if t >= d { Some(st.s[t - d].clone()) } else { None };
                        let k = 2 * r + 1;
                        // 1. gate
                        let g: Option<Vec<V>> = if back {
                            let wb = ctx.p(&format!("layers.{li}.back.weight")).to_vec();
                            let bb = ctx.p(&format!("layers.{li}.back.bias")).to_vec();
                            let a = match s_past {
                                Some(sp) => conv(&mut ctx, &wb, &bb, m.c, k, r, &Map { x: sp, ..m.clone() }).x,
                                None => (0..n).map(|i| bb[i / (m.h * m.w)]).collect(),
                            };
                            Some(a.into_iter().map(|a| ctx.tape.sigmoid(a)).collect())
                        } else {
                            None
                        };
                        // 2. integrate
                        let mut v = Vec::with_capacity(n);
                        for i in 0..n {
                            let cur = match &g {
                                Some(g) => ctx.tape.mul(g[i], m.x[i]),
                                None => m.x[i],
                            };
                            v.push(match &u_prev {
                                Some(u) => {
                                    let lu = ctx.tape.scale(u[i], lam);
                                    ctx.tape.add(lu, cur)
                                }
                                None => cur,
                            });
                        }
                        // 3. fire
                        let o: Vec<V> = v
                            .iter()
                            .map(|&vi| {
                                let x = ctx.tape.add_const(vi, -th);
                                ctx.tape.heaviside(x, |x| surrogate(sur, x))
                            })
                            .collect();
                        // 4. E/I gate on v before the reset
                        let e: Option<Vec<V>> = if ei {
                            let we = ctx.p(&format!("layers.{li}.ei.weight")).to_vec();
                            let be = ctx.p(&format!("layers.{li}.ei.bias")).to_vec();
                            let z = conv(&mut ctx, &we, &be, m.c, k, r, &Map { x: v.clone(), ..m.clone() }).x;
                            Some(z.into_iter().map(|z| ctx.tape.sign(z, |x| surrogate(sur, x))).collect())
                        } else {
                            None
                        };
                        // 5. reset (not detached): u = v·(1 − o) = v − v·o
                        let u: Vec<V> = (0..n)
                            .map(|i| {
                                let vo = ctx.tape.mul(v[i], o[i]);
                                ctx.tape.sub(v[i], vo)
                            })
                            .collect();
                        // 6. output
                        let s: Vec<V> = match &e {
                            Some(e) => (0..n).map(|i| ctx.tape.mul(e[i], o[i])).collect(),
                            None => o,
                        };
                        let st = states.get_mut(&li).unwrap();
                        st.u = Some(u);
                        st.s.push(s.clone());
                        Map { x: s, ..m }
                    }
                };
            }
            assert_eq!(m.x.len(), out_len);
            readout_nodes[b].push(m.x);
        }
    }
    // readout y[b][k] = (1/T) Σ_t s_t[b][k]; L = Σ c·y
    let mut readout = Vec::new();
    let mut terms = Vec::new();
    for b in 0..batch {
        for k in 0..out_len {
            let col: Vec<V> = (0..steps).map(|t| readout_nodes[b][t][k]).collect();
            let s = ctx.tape.sum(&col).unwrap();
            let y = ctx.tape.scale(s, 1.0 / steps as f64);
            readout.push(ctx.tape.v(y));
            terms.push(ctx.tape.scale(y, c[b * out_len + k]));
        }
    }
    let l = ctx.tape.sum(&terms).unwrap();
    let g = ctx.tape.grad(l);
    TwinResult { readout, param_grad: ctx.params.iter().map(|v| g[v.0]).collect(), input_grad: xv.iter().map(|v| g[v.0]).collect() }
}
