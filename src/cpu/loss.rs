//! Readout and losses. The readout is the last layer's output averaged over T (spike counts / T);
//! MSE against the one-hot label (the reference) or cross-entropy with the readout as logits.

use crate::Real;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// mean over batch and classes of (y − onehot)² (the reference's loss).
    #[default]
    Mse,
    /// mean over batch of −log softmax(y)[label].
    Ce,
}

impl std::str::FromStr for Loss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mse" => Ok(Loss::Mse),
            "ce" => Ok(Loss::Ce),
            _ => Err(format!("unknown loss `{s}`: expected mse or ce")),
        }
    }
}

/// y[b][k] = (1/T) Σ_t s[t][b][k].
pub fn readout<F: Real>(s: &[F], t: usize, batch: usize, classes: usize, y: &mut [F]) {
    y.fill(F::ZERO);
    for step in s.chunks(batch * classes).take(t) {
        y.iter_mut().zip(step).for_each(|(a, b)| *a += *b);
    }
    let inv = F::ONE / F::from_f64(t as f64);
    y.iter_mut().for_each(|a| *a *= inv);
}

/// The loss of readout `y` [B][K] against `labels`, and ∂L/∂y into `dy`.
pub fn loss_and_grad<F: Real>(loss: Loss, y: &[F], labels: &[u8], classes: usize, dy: &mut [F]) -> F {
    let b = labels.len();
    let mut total = F::ZERO;
    match loss {
        Loss::Mse => {
            let scale = F::from_f64(1.0 / (b * classes) as f64);
            for (i, (&yi, d)) in y.iter().zip(dy.iter_mut()).enumerate() {
                let target = if labels[i / classes] as usize == i % classes { F::ONE } else { F::ZERO };
                let e = yi - target;
                total += e * e * scale;
                *d = F::from_f64(2.0) * e * scale;
            }
        }
        Loss::Ce => {
            let inv_b = F::from_f64(1.0 / b as f64);
            for (row, (yb, db)) in y.chunks(classes).zip(dy.chunks_mut(classes)).enumerate() {
                let m = yb.iter().copied().fold(yb[0], |a, x| if x > a { x } else { a });
                let z: F = yb.iter().map(|&x| (x - m).exp()).sum();
                let lse = m + F::from_f64(z.to_f64().ln());
                let label = labels[row] as usize;
                total += (lse - yb[label]) * inv_b;
                for (k, (&x, d)) in yb.iter().zip(db.iter_mut()).enumerate() {
                    let p = (x - lse).exp();
                    *d = (p - if k == label { F::ONE } else { F::ZERO }) * inv_b;
                }
            }
        }
    }
    total
}

/// The predicted class of each row: the largest readout, ties to the lowest index.
pub fn argmax_rows<F: Real>(y: &[F], classes: usize) -> Vec<usize> {
    y.chunks(classes).map(|r| r.iter().enumerate().fold(0, |best, (k, &x)| if x > r[best] { k } else { best })).collect()
}
