//! The v4 plan's choices that a run may set instead of the planner's preference order: the tile and
//! placement (`BACKEI_V4_TILING`) and the order of the phases (`BACKEI_V4_SYNC`), carried together
//! by [`V4Choices`] from the step's settings (and the memory plan) to every BackEI layer, so that
//! the plan a layer makes and the one the memory plan counted are the same plan.
//!
//! Why a tiling can be chosen. `plan_v4` takes the first tiling that fits shared memory in a fixed
//! order of preference (weights and dW on chip, then the widest channel tile, the whole halo in one
//! slab, two m-tiles per warp). Whether that order is the fastest is for a GPU to say: at the
//! fashion-mnist shapes it keeps dW on chip and so takes one m-tile per warp (fp32 mode), where two
//! would halve the shared-memory reads per MMA at the price of dW in L2 (docs/gpu.md). The kernel
//! bench times every feasible tiling of a workload (`BACKEI_BENCH_V4_TILINGS=all`), each validated
//! against the CPU engine, and this variable runs the one it finds fastest.

use super::backei_v4::{CHUNKS_ENV, PREFETCH_ENV, SYNC_ENV};
use crate::error::{config_err, Result};
use std::fmt;

/// `BACKEI_V4_TILING=co_t=32,mt=2,slab=32,weights=smem,dw=l2` (any subset of the keys): the v4
/// layers take the first feasible tiling, in the planner's order, that has the values given; a
/// request no feasible tiling meets is an error (the message lists the feasible ones). Unset: the
/// planner's first choice.
pub const TILING_ENV: &str = "BACKEI_V4_TILING";

/// One v4 tiling: output channels per block, m-tiles per warp (chunks of 128·mt pixels), channels
/// per staged slab, and where each gate's weights and the weight-gradient accumulators live
/// (shared memory for the whole launch, or L2: weights streamed slab by slab, dW in the block's
/// slice of a global buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct V4Tiling {
    pub co_t: usize,
    pub mt: usize,
    pub slab: usize,
    pub weights_on_chip: bool,
    pub dw_on_chip: bool,
}

fn place(on_chip: bool) -> &'static str {
    if on_chip {
        "smem"
    } else {
        "l2"
    }
}

impl fmt::Display for V4Tiling {
    /// The form `BACKEI_V4_TILING` reads back: `co_t=32,mt=1,slab=32,weights=smem,dw=smem`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "co_t={},mt={},slab={},weights={},dw={}",
            self.co_t,
            self.mt,
            self.slab,
            place(self.weights_on_chip),
            place(self.dw_on_chip)
        )
    }
}

/// What a run asks of the tiling: each key given or left to the planner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4TilingRequest {
    pub co_t: Option<usize>,
    pub mt: Option<usize>,
    pub slab: Option<usize>,
    pub weights_on_chip: Option<bool>,
    pub dw_on_chip: Option<bool>,
}

impl From<V4Tiling> for V4TilingRequest {
    /// Exactly this tiling.
    fn from(t: V4Tiling) -> Self {
        V4TilingRequest {
            co_t: Some(t.co_t),
            mt: Some(t.mt),
            slab: Some(t.slab),
            weights_on_chip: Some(t.weights_on_chip),
            dw_on_chip: Some(t.dw_on_chip),
        }
    }
}

impl V4TilingRequest {
    /// Whether `t` has every value the request gives.
    pub fn matches(&self, t: &V4Tiling) -> bool {
        self.co_t.is_none_or(|x| x == t.co_t)
            && self.mt.is_none_or(|x| x == t.mt)
            && self.slab.is_none_or(|x| x == t.slab)
            && self.weights_on_chip.is_none_or(|x| x == t.weights_on_chip)
            && self.dw_on_chip.is_none_or(|x| x == t.dw_on_chip)
    }

    /// Reads `key=value` pairs separated by commas (the form [`V4Tiling`] prints); every error names
    /// the variable, the item and what it takes.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |item: &str, fix: &str| config_err(TILING_ENV, format!("`{item}`: {fix} (e.g. co_t=32,mt=2,slab=32,weights=smem,dw=l2)"));
        let mut r = V4TilingRequest::default();
        let mut any = false;
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            any = true;
            let Some((key, value)) = item.split_once('=') else {
                return Err(bad(item, "each item is key=value"));
            };
            let (key, value) = (key.trim(), value.trim());
            let number = |allowed: &[usize]| -> Result<usize> {
                value.parse::<usize>().ok().filter(|x| allowed.contains(x) || (allowed.is_empty() && *x > 0 && x % 16 == 0)).ok_or_else(
                    || {
                        let takes = if allowed.is_empty() {
                            format!("{key} takes a positive multiple of 16")
                        } else {
                            format!("{key} takes one of {allowed:?}")
                        };
                        bad(item, &takes)
                    },
                )
            };
            let placement = || -> Result<bool> {
                match value {
                    "smem" => Ok(true),
                    "l2" => Ok(false),
                    _ => Err(bad(item, &format!("{key} takes smem (shared memory for the whole launch) or l2"))),
                }
            };
            let duplicate = match key {
                "co_t" => r.co_t.replace(number(&[16, 32, 64])?).is_some(),
                "mt" => r.mt.replace(number(&[1, 2])?).is_some(),
                "slab" => r.slab.replace(number(&[])?).is_some(),
                "weights" => r.weights_on_chip.replace(placement()?).is_some(),
                "dw" => r.dw_on_chip.replace(placement()?).is_some(),
                _ => return Err(bad(item, "the keys are co_t, mt, slab, weights and dw")),
            };
            if duplicate {
                return Err(bad(item, &format!("{key} is given twice")));
            }
        }
        if !any {
            return Err(config_err(TILING_ENV, "empty: unset it for the planner's choice, or give key=value items"));
        }
        Ok(r)
    }
}

impl fmt::Display for V4TilingRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items = Vec::new();
        if let Some(x) = self.co_t {
            items.push(format!("co_t={x}"));
        }
        if let Some(x) = self.mt {
            items.push(format!("mt={x}"));
        }
        if let Some(x) = self.slab {
            items.push(format!("slab={x}"));
        }
        if let Some(x) = self.weights_on_chip {
            items.push(format!("weights={}", place(x)));
        }
        if let Some(x) = self.dw_on_chip {
            items.push(format!("dw={}", place(x)));
        }
        f.write_str(&items.join(","))
    }
}

/// `BACKEI_V4_TILING`'s value: None when unset (or only blanks).
pub fn tiling_from_env(value: Option<&str>) -> Result<Option<V4TilingRequest>> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => V4TilingRequest::parse(v).map(Some),
    }
}

/// The v4 plan's run-time choices, one value for a whole step: the memory plan and every BackEI
/// layer plan with the same choices (`backei_layer::plan_layer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4Choices {
    /// The tiling asked for (`BACKEI_V4_TILING`); None: the planner's first choice.
    pub tiling: Option<V4TilingRequest>,
    /// Phases ordered by neighbour flags instead of grid barriers (`BACKEI_V4_SYNC=neighbours`).
    pub neighbour_sync: bool,
    /// Each chunk's epilogue inputs prefetched into L2 before its GEMMs (`BACKEI_V4_PREFETCH=l2`).
    pub prefetch_l2: bool,
    /// A block's chunks run on across a sample's end (`BACKEI_V4_CHUNKS=span`).
    pub span_samples: bool,
}

impl V4Choices {
    /// The choices the environment makes (`BACKEI_V4_TILING`, `BACKEI_V4_SYNC`, `BACKEI_V4_PREFETCH`,
    /// `BACKEI_V4_CHUNKS`).
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok();
        Self::from_values(var(TILING_ENV).as_deref(), var(SYNC_ENV).as_deref(), var(PREFETCH_ENV).as_deref(), var(CHUNKS_ENV).as_deref())
    }

    /// The choices of the four variables' values.
    pub fn from_values(tiling: Option<&str>, sync: Option<&str>, prefetch: Option<&str>, chunks: Option<&str>) -> Result<Self> {
        Ok(V4Choices {
            tiling: tiling_from_env(tiling)?,
            neighbour_sync: super::backei_v4::neighbour_sync_from_env(sync)?,
            prefetch_l2: super::backei_v4::prefetch_l2_from_env(prefetch)?,
            span_samples: super::backei_v4::span_samples_from_env(chunks)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiling_prints_the_request_that_selects_exactly_it() {
        let t = V4Tiling { co_t: 32, mt: 2, slab: 32, weights_on_chip: true, dw_on_chip: false };
        assert_eq!(t.to_string(), "co_t=32,mt=2,slab=32,weights=smem,dw=l2");
        let r = V4TilingRequest::parse(&t.to_string()).unwrap();
        assert_eq!(r, V4TilingRequest::from(t));
        assert_eq!(r.to_string(), t.to_string());
        assert!(r.matches(&t));
        for other in [V4Tiling { mt: 1, ..t }, V4Tiling { co_t: 16, ..t }, V4Tiling { slab: 16, ..t }, V4Tiling { dw_on_chip: true, ..t }] {
            assert!(!r.matches(&other), "{other}");
        }
    }

    #[test]
    fn a_partial_request_leaves_the_other_keys_to_the_planner() {
        let r = V4TilingRequest::parse(" mt=2 , dw=l2 ").unwrap();
        assert_eq!(r, V4TilingRequest { mt: Some(2), dw_on_chip: Some(false), ..Default::default() });
        assert_eq!(r.to_string(), "mt=2,dw=l2");
        assert!(r.matches(&V4Tiling { co_t: 16, mt: 2, slab: 64, weights_on_chip: false, dw_on_chip: false }));
        assert!(!r.matches(&V4Tiling { co_t: 16, mt: 1, slab: 64, weights_on_chip: false, dw_on_chip: false }));
    }

    #[test]
    fn bad_requests_name_the_variable_the_item_and_the_fix() {
        for (text, wants) in [
            ("co_t=48", "co_t takes one of [16, 32, 64]"),
            ("mt=3", "mt takes one of [1, 2]"),
            ("slab=20", "slab takes a positive multiple of 16"),
            ("slab=0", "slab takes a positive multiple of 16"),
            ("weights=hbm", "weights takes smem"),
            ("dw", "each item is key=value"),
            ("tile=2", "the keys are co_t, mt, slab, weights and dw"),
            ("mt=1,mt=2", "mt is given twice"),
            (",", "empty"),
        ] {
            let e = V4TilingRequest::parse(text).unwrap_err().to_string();
            assert!(e.contains(TILING_ENV) && e.contains(wants), "{text}: {e}");
        }
        assert_eq!(tiling_from_env(None).unwrap(), None);
        assert_eq!(tiling_from_env(Some("  ")).unwrap(), None);
        assert!(tiling_from_env(Some("mt=9")).is_err());
    }

    #[test]
    fn the_choices_read_the_four_variables() {
        let c = V4Choices::from_values(Some("co_t=16"), Some("neighbours"), Some("l2"), Some("span")).unwrap();
        assert_eq!(c.tiling, Some(V4TilingRequest { co_t: Some(16), ..Default::default() }));
        assert!(c.neighbour_sync && c.prefetch_l2 && c.span_samples);
        assert_eq!(V4Choices::from_values(None, None, None, None).unwrap(), V4Choices::default());
        assert_eq!(V4Choices::from_values(None, None, None, Some("sample")).unwrap(), V4Choices::default());
        assert!(V4Choices::from_values(None, Some("sometimes"), None, None).is_err());
        assert!(V4Choices::from_values(None, None, Some("l1"), None).unwrap_err().to_string().contains(PREFETCH_ENV));
        let e = V4Choices::from_values(None, None, None, Some("cross")).unwrap_err().to_string();
        assert!(e.contains(CHUNKS_ENV) && e.contains("span") && e.contains("sample"), "{e}");
    }
}
