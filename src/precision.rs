//! The arithmetic of the GPU's tensor-core products, chosen per run (`--precision`) and per launch.
//! State, gradients, master weights, optimizer state and checkpoints are f32 in every mode; the
//! mode only says how the operands of the convolutions' and linear layers' products are rounded.
//!
//! - `fp32` (the default): near-FP32 results. Real operands are split into a high and a low fp16
//!   half after a power-of-two scaling (Ootomo & Yokota 2022: error-corrected tensor-core GEMM), so
//!   a real × real product takes three tensor-core products (hi·hi + hi·lo + lo·hi) and a spike
//!   operand (exact in fp16: −1, 0, 1) times a real one two.
//! - `tf32`: one TF32 product (10-bit mantissa, f32 range), like cuDNN's default in PyTorch.
//! - `bf16`: one bfloat16 product (7-bit mantissa, f32 range).
//!
//! The CPU engine always computes in f32 (or f64): it is the reference every mode is checked against.

use crate::error::{config_err, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Tf32,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Tf32, Precision::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = crate::BackeiError;
    fn from_str(s: &str) -> Result<Self> {
        Precision::ALL.into_iter().find(|p| p.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            config_err("precision", format!("`{s}` is not a precision mode; use fp32 (near-FP32, the default), tf32 or bf16"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_say_the_choices() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{}\"", p.name()));
        }
        let e = "fp16".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("fp32") && e.contains("tf32") && e.contains("bf16"), "{e}");
    }
}
