//! What the trainer needs of an engine, so one training loop drives the CPU engine and the GPU
//! engine alike.

use crate::cpu::loss::Loss;
use crate::cpu::network::{Network, StepStats};
use crate::error::Result;
use crate::optim::Optimizer;

/// Per spiking layer: (layer index, firing rate, inhibitory fraction among fired spikes).
pub type SpikeStats = Vec<(usize, f64, Option<f64>)>;

pub trait TrainEngine {
    /// A line naming the engine and device, for logs and config.json.
    fn describe(&self) -> String;
    fn train_step(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats>;
    /// Loss and correct count without updating; also returns the predicted classes.
    fn evaluate(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<(StepStats, Vec<usize>)>;
    fn spike_stats(&self) -> SpikeStats;
    /// Parameters as one flat host buffer (the order of `Network::slots`).
    fn params(&self) -> Result<Vec<f32>>;
    fn load_params(&mut self, params: &[f32]) -> Result<()>;
    fn optimizer(&self) -> Result<Optimizer>;
    fn load_optimizer(&mut self, opt: Optimizer) -> Result<()>;
    fn set_lr(&mut self, lr: f64);
    /// Training iterations done (keys the dropout masks).
    fn iteration(&self) -> u64;
    fn set_iteration(&mut self, it: u64);
}

/// The CPU engine with its optimizer.
pub struct CpuEngine {
    pub net: Network<f32>,
    pub opt: Optimizer,
}

impl TrainEngine for CpuEngine {
    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn train_step(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats> {
        self.net.train_step(x, t_in, labels, loss, &mut self.opt)
    }
    fn evaluate(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<(StepStats, Vec<usize>)> {
        let s = self.net.evaluate(x, t_in, labels, loss)?;
        Ok((s, self.net.last_predictions()))
    }
    fn spike_stats(&self) -> SpikeStats {
        self.net.spike_stats()
    }
    fn params(&self) -> Result<Vec<f32>> {
        Ok(self.net.params.clone())
    }
    fn load_params(&mut self, params: &[f32]) -> Result<()> {
        self.net.load_params(params)
    }
    fn optimizer(&self) -> Result<Optimizer> {
        Ok(self.opt.clone())
    }
    fn load_optimizer(&mut self, opt: Optimizer) -> Result<()> {
        if opt.m.len() != self.net.num_params() {
            return Err(crate::error::shape_err("optimizer state", format!("{} moments", self.net.num_params()), format!("{}", opt.m.len())));
        }
        self.opt = opt;
        Ok(())
    }
    fn set_lr(&mut self, lr: f64) {
        self.opt.lr = lr;
    }
    fn iteration(&self) -> u64 {
        self.net.iteration
    }
    fn set_iteration(&mut self, it: u64) {
        self.net.iteration = it;
    }
}
