//! One CUDA graph per training step: the bookkeeping that decides, per step, whether the step's
//! kernels are launched one by one (eagerly), captured into a graph, or replayed from one.
//!
//! A training step's launches (forward, loss, backward, gradient check, optimizer; the BackEI
//! layers' cooperative launches included) are the same from one step to the next once the
//! per-step values live in device memory: the input, labels, dropout keys and optimizer scalars
//! are copied in before the launch (`GpuNetwork` stages them), and the results are copied out
//! after it. So the first step of a shape runs eagerly (it allocates the buffers, loads the
//! modules, creates the cuBLAS handle — none of which may happen during a capture), the second
//! is captured and launched, and every later one replays the graph: one launch per step instead
//! of a few hundred. What a replay bakes in — the batch shape, the buffers' addresses, the loss,
//! the optimizer's constants and state addresses — is the [`StepKey`]; a change of any of them
//! is a new key. A capture that fails (a driver that cannot capture a cooperative launch, say)
//! is remembered with its reason, the step runs eagerly, and so do that key's later steps.
//! While profiling (`GpuNetwork::set_profiling`) steps run eagerly, so that events between the
//! ops still time each op. `BACKEI_CUDA_GRAPHS=0` turns graphs off.

use crate::cpu::loss::Loss;
use crate::error::Result;
use crate::optim::OptimizerConfig;
use std::collections::HashMap;

/// The environment variable that turns the step graphs off (`0`) or on (`1`, the default).
pub const GRAPHS_ENV: &str = "BACKEI_CUDA_GRAPHS";

/// Why `BACKEI_CUDA_GRAPHS` (its value, if set) turns graphs off, or None when it leaves them on.
pub fn graphs_off(value: Option<&str>) -> Result<Option<String>> {
    let on = super::util::switch_from_env(GRAPHS_ENV, value, "CUDA graphs", "launch one by one")?;
    Ok((!on).then(|| format!("{GRAPHS_ENV}=0")))
}

/// Everything a captured training step bakes in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StepKey {
    pub batch: usize,
    pub t_in: usize,
    pub loss: Loss,
    /// The network's buffer generation: bumped whenever a buffer is reallocated or a setting that
    /// changes the launches changes (kernel version, determinism, precision).
    pub generation: u64,
    /// The optimizer's kind and constants, as bits.
    pub optimizer: [u64; 5],
    /// The device addresses of the optimizer's m, v and step scalars.
    pub optimizer_state: [u64; 3],
}

impl StepKey {
    /// The bits of an optimizer's constants (the learning rate excepted: it is staged per step).
    pub fn optimizer_bits(c: &OptimizerConfig) -> [u64; 5] {
        match *c {
            OptimizerConfig::Adam { beta1, beta2, eps, weight_decay, decoupled_weight_decay, .. } => {
                [if decoupled_weight_decay { 2 } else { 0 }, beta1.to_bits(), beta2.to_bits(), eps.to_bits(), weight_decay.to_bits()]
            }
            OptimizerConfig::Sgd { momentum, weight_decay, .. } => [1, momentum.to_bits(), weight_decay.to_bits(), 0, 0],
        }
    }
}

/// How a step's kernels are launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// One by one.
    Eager,
    /// Captured into a graph, which is then launched.
    Capture,
    /// The captured graph, launched again.
    Replay,
}

enum Entry<G> {
    /// Ran eagerly once: its buffers, modules and handles exist; capture it next time.
    Warm,
    Captured(G),
    /// Capturing failed (the reason): eager from now on.
    Failed(String),
}

/// The graphs of a network's training steps, by key. `G` is the graph (`cudarc`'s `CudaGraph`;
/// the unit tests use `()`).
pub struct GraphBook<G> {
    entries: HashMap<StepKey, Entry<G>>,
    /// Why graphs are off (`BACKEI_CUDA_GRAPHS=0`), or None.
    pub disabled: Option<String>,
}

impl<G> GraphBook<G> {
    /// Graphs on unless `BACKEI_CUDA_GRAPHS=0`; any other value than 0 or 1 is an error.
    pub fn from_env() -> Result<Self> {
        let disabled = graphs_off(std::env::var(GRAPHS_ENV).ok().as_deref())?;
        Ok(GraphBook { entries: HashMap::new(), disabled })
    }

    pub fn new(enabled: bool) -> Self {
        GraphBook { entries: HashMap::new(), disabled: (!enabled).then(|| "turned off".to_string()) }
    }

    /// What to do for a step with `key`; `profiling` steps always run eagerly.
    pub fn action(&self, key: &StepKey, profiling: bool) -> Action {
        if self.disabled.is_some() || profiling {
            return Action::Eager;
        }
        match self.entries.get(key) {
            None | Some(Entry::Failed(_)) => Action::Eager,
            Some(Entry::Warm) => Action::Capture,
            Some(Entry::Captured(_)) => Action::Replay,
        }
    }

    /// A step with `key` ran eagerly (after `action` said so).
    pub fn ran_eagerly(&mut self, key: &StepKey) {
        self.entries.entry(key.clone()).or_insert(Entry::Warm);
    }

    /// The graph captured for `key`.
    pub fn captured(&mut self, key: &StepKey, graph: G) {
        self.entries.insert(key.clone(), Entry::Captured(graph));
    }

    /// Capturing `key` failed; true the first time a capture fails (to say so once).
    pub fn capture_failed(&mut self, key: &StepKey, why: String) -> bool {
        let first = !self.entries.values().any(|e| matches!(e, Entry::Failed(_)));
        self.entries.insert(key.clone(), Entry::Failed(why));
        first
    }

    /// The graph of `key`, when captured.
    pub fn graph(&self, key: &StepKey) -> Option<&G> {
        match self.entries.get(key) {
            Some(Entry::Captured(g)) => Some(g),
            _ => None,
        }
    }

    /// Forgets every key of another buffer generation than `generation` (their graphs point to
    /// freed buffers): drops those graphs.
    pub fn retain_generation(&mut self, generation: u64) {
        self.entries.retain(|k, _| k.generation == generation);
    }

    /// Graphs held.
    pub fn captured_count(&self) -> usize {
        self.entries.values().filter(|e| matches!(e, Entry::Captured(_))).count()
    }

    /// Why the capture of `key` failed, if it did.
    pub fn failure(&self, key: &StepKey) -> Option<&str> {
        match self.entries.get(key) {
            Some(Entry::Failed(why)) => Some(why),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(batch: usize, generation: u64) -> StepKey {
        StepKey {
            batch,
            t_in: 1,
            loss: Loss::Mse,
            generation,
            optimizer: StepKey::optimizer_bits(&OptimizerConfig::adam(1e-3)),
            optimizer_state: [1, 2, 3],
        }
    }

    #[test]
    fn a_shape_runs_eagerly_once_is_captured_once_then_replays() {
        let mut b = GraphBook::<u32>::new(true);
        let k = key(100, 0);
        assert_eq!(b.action(&k, false), Action::Eager, "the first step allocates: eager");
        b.ran_eagerly(&k);
        assert_eq!(b.action(&k, false), Action::Capture);
        b.captured(&k, 7);
        for _ in 0..3 {
            assert_eq!(b.action(&k, false), Action::Replay);
        }
        assert_eq!(b.graph(&k), Some(&7));
        // a profiled step runs eagerly and leaves the graph alone
        assert_eq!(b.action(&k, true), Action::Eager);
        b.ran_eagerly(&k);
        assert_eq!(b.action(&k, false), Action::Replay);
        // another batch size is another key, warmed up on its own
        let k2 = key(40, 0);
        assert_eq!(b.action(&k2, false), Action::Eager);
        b.ran_eagerly(&k2);
        assert_eq!(b.action(&k2, false), Action::Capture);
        assert_eq!(b.captured_count(), 1);
    }

    #[test]
    fn new_buffers_drop_the_old_graphs_and_failures_stay_eager() {
        let mut b = GraphBook::<u32>::new(true);
        let (k0, k1) = (key(100, 0), key(100, 1));
        b.ran_eagerly(&k0);
        b.captured(&k0, 1);
        b.retain_generation(1);
        assert_eq!(b.captured_count(), 0, "a graph of freed buffers must not survive");
        assert_eq!(b.action(&k1, false), Action::Eager);
        b.ran_eagerly(&k1);
        assert!(b.capture_failed(&k1, "no cooperative capture".into()), "the first failure is reported");
        assert_eq!(b.action(&k1, false), Action::Eager);
        assert_eq!(b.failure(&k1), Some("no cooperative capture"));
        let k2 = key(50, 1);
        b.ran_eagerly(&k2);
        assert!(!b.capture_failed(&k2, "again".into()), "later failures are not reported again");
        // the optimizer's constants and state are part of the key
        let mut k3 = k1.clone();
        k3.optimizer = StepKey::optimizer_bits(&OptimizerConfig::sgd(0.1, 0.9));
        assert_ne!(k3, k1);
        assert_eq!(StepKey::optimizer_bits(&OptimizerConfig::adam(1e-3)), StepKey::optimizer_bits(&OptimizerConfig::adam(5e-4)));
    }

    #[test]
    fn graphs_can_be_turned_off() {
        assert_eq!(graphs_off(None).unwrap(), None);
        assert_eq!(graphs_off(Some("1")).unwrap(), None);
        assert!(graphs_off(Some("0")).unwrap().is_some());
        let e = graphs_off(Some("yes")).unwrap_err().to_string();
        assert!(e.contains(GRAPHS_ENV) && e.contains("use 1"), "{e}");
        let mut b = GraphBook::<u32>::new(false);
        let k = key(8, 0);
        b.ran_eagerly(&k);
        assert_eq!(b.action(&k, false), Action::Eager);
        assert!(b.disabled.is_some());
    }
}
