//! A tiny scalar reverse-mode autodiff tape, written for the reference twin only.
//!
//! Every node has at most two parents, each with the local derivative ∂node/∂parent recorded
//! when the node is made. `grad` sweeps the tape once backwards. The step function H and sign
//! are nodes whose recorded "derivative" is the surrogate: that is the whole surrogate-gradient
//! method, stated in one place, independent of the engine's hand-derived BPTT.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V(pub usize);

#[derive(Default)]
pub struct Tape {
    pub val: Vec<f64>,
    parents: Vec<[(usize, f64); 2]>,
    nparents: Vec<u8>,
}

impl Tape {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, x: f64, ps: &[(V, f64)]) -> V {
        let mut p = [(0usize, 0.0f64); 2];
        for (k, (v, d)) in ps.iter().enumerate() {
            p[k] = (v.0, *d);
        }
        self.val.push(x);
        self.parents.push(p);
        self.nparents.push(ps.len() as u8);
        V(self.val.len() - 1)
    }

    /// An input (or a constant: a leaf whose gradient nobody reads).
    pub fn leaf(&mut self, x: f64) -> V {
        self.push(x, &[])
    }

    pub fn v(&self, a: V) -> f64 {
        self.val[a.0]
    }

    pub fn add(&mut self, a: V, b: V) -> V {
        let x = self.v(a) + self.v(b);
        self.push(x, &[(a, 1.0), (b, 1.0)])
    }

    pub fn sub(&mut self, a: V, b: V) -> V {
        let x = self.v(a) - self.v(b);
        self.push(x, &[(a, 1.0), (b, -1.0)])
    }

    pub fn mul(&mut self, a: V, b: V) -> V {
        let (x, y) = (self.v(a), self.v(b));
        self.push(x * y, &[(a, y), (b, x)])
    }

    /// c·a for a constant c.
    pub fn scale(&mut self, a: V, c: f64) -> V {
        let x = self.v(a) * c;
        self.push(x, &[(a, c)])
    }

    /// a + c for a constant c.
    pub fn add_const(&mut self, a: V, c: f64) -> V {
        let x = self.v(a) + c;
        self.push(x, &[(a, 1.0)])
    }

    pub fn sigmoid(&mut self, a: V) -> V {
        let y = 1.0 / (1.0 + (-self.v(a)).exp());
        self.push(y, &[(a, y * (1.0 - y))])
    }

    /// H(a) = 1 if a > 0 else 0, with `surrogate(a)` as its derivative.
    pub fn heaviside(&mut self, a: V, surrogate: impl Fn(f64) -> f64) -> V {
        let x = self.v(a);
        let y = if x > 0.0 { 1.0 } else { 0.0 };
        self.push(y, &[(a, surrogate(x))])
    }

    /// sign(a) (sign(0) = 0), with `surrogate(a)` as its derivative.
    pub fn sign(&mut self, a: V, surrogate: impl Fn(f64) -> f64) -> V {
        let x = self.v(a);
        let y = if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        };
        self.push(y, &[(a, surrogate(x))])
    }

    /// Σ terms (a chain of additions; `None` for an empty sum).
    pub fn sum(&mut self, terms: &[V]) -> Option<V> {
        let mut acc = *terms.first()?;
        for &t in &terms[1..] {
            acc = self.add(acc, t);
        }
        Some(acc)
    }

    /// ∂out/∂node for every node of the tape.
    pub fn grad(&self, out: V) -> Vec<f64> {
        let mut g = vec![0.0; self.val.len()];
        g[out.0] = 1.0;
        for i in (0..=out.0).rev() {
            let gi = g[i];
            if gi == 0.0 {
                continue;
            }
            for k in 0..self.nparents[i] as usize {
                let (p, d) = self.parents[i][k];
                g[p] += gi * d;
            }
        }
        g
    }
}

#[test]
fn tape_differentiates_a_small_expression() {
    // f = sigmoid(x·y) + (x − 3y)·x ; ∂f/∂x = σ'(xy)·y + 2x − 3y, ∂f/∂y = σ'(xy)·x − 3x
    let mut t = Tape::new();
    let (x, y) = (t.leaf(0.7), t.leaf(-1.3));
    let xy = t.mul(x, y);
    let s = t.sigmoid(xy);
    let y3 = t.scale(y, 3.0);
    let d = t.sub(x, y3);
    let dx = t.mul(d, x);
    let f = t.add(s, dx);
    let g = t.grad(f);
    let sg = 1.0 / (1.0 + (0.91f64).exp());
    let sp = sg * (1.0 - sg);
    assert!((g[x.0] - (sp * -1.3 + 1.4 + 3.9)).abs() < 1e-14);
    assert!((g[y.0] - (sp * 0.7 - 2.1)).abs() < 1e-14);
}
