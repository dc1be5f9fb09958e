//! One interface over both engines, so the trainer need not care which one runs: a network and
//! its optimizer, on the CPU (`cpu::Network<f32>` + `optim::Optimizer`) or on a GPU
//! (`gpu::GpuNetwork` + `gpu::GpuOptimizer`). Both start from the same weights for the same seed.
//! The optimizer state travels as an `optim::Optimizer` (host vectors), which checkpoints save.

use crate::cpu::backei_layer::SavedState;
use crate::cpu::loss::Loss;
use crate::cpu::network::{Network, ParamSlot, StepStats};
use crate::data::{BufferAllocator, VecAllocator};
use crate::error::{shape_err, Result};
use crate::gpu::{choose, DeviceChoice, GpuNetwork, GpuOptimizer, PinnedAllocator};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::spec::NetworkSpec;
use std::sync::Arc;

pub enum Engine {
    Cpu { net: Box<Network<f32>>, opt: Optimizer },
    Gpu { net: Box<GpuNetwork>, opt: Box<GpuOptimizer> },
}

impl Engine {
    /// Builds the network of `spec` (PyTorch's initialisation from `seed`) and its optimizer on
    /// the engine `choice` resolves to. Returns the engine and a line saying which engine runs
    /// and why (`auto` falls back to the CPU and says so; `cuda` without a GPU is an error).
    pub fn new(spec: &NetworkSpec, seed: u64, choice: DeviceChoice, opt: OptimizerConfig) -> Result<(Engine, String)> {
        opt.validate()?;
        let cpu = Network::<f32>::new(spec, seed)?;
        let (dev, line) = choose(choice)?;
        let engine = match dev {
            None => {
                let o = Optimizer::new(opt, cpu.num_params())?;
                Engine::Cpu { net: Box::new(cpu), opt: o }
            }
            Some(dev) => {
                let net = GpuNetwork::from_cpu(&dev, &cpu)?;
                let o = GpuOptimizer::new(&dev, opt, net.num_params())?;
                Engine::Gpu { net: Box::new(net), opt: Box::new(o) }
            }
        };
        Ok((engine, line))
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Engine::Gpu { .. })
    }

    /// The allocator for this engine's loader buffers: page-locked host memory on the GPU
    /// engine (a direct DMA per upload; falls back to pageable memory with one warning when it
    /// cannot pin), plain `Vec`s on the CPU engine. Give it to `Loader::with_allocator`.
    pub fn buffer_allocator(&self) -> Arc<dyn BufferAllocator> {
        match self {
            Engine::Cpu { .. } => Arc::new(VecAllocator),
            Engine::Gpu { net, .. } => Arc::new(PinnedAllocator::new(net.dev.ctx.clone())),
        }
    }

    /// Free device memory in bytes (None on the CPU engine, or when the driver cannot say).
    pub fn device_memory_free(&self) -> Option<u64> {
        match self {
            Engine::Cpu { .. } => None,
            Engine::Gpu { net, .. } => net.dev.ctx.mem_get_info().ok().map(|(free, _)| free as u64),
        }
    }

    /// The settings a step's memory plan is made for: the GPU engine's own; for the CPU engine,
    /// whose state is the same tensors, `StepSettings::cpu_proxy`.
    pub fn step_settings(&self) -> crate::gpu::StepSettings {
        match self {
            Engine::Cpu { .. } => crate::gpu::StepSettings::cpu_proxy(),
            Engine::Gpu { net, .. } => *net.settings(),
        }
    }

    /// "cpu" or "cuda:N <name>".
    pub fn device_name(&self) -> String {
        match self {
            Engine::Cpu { .. } => "cpu".into(),
            Engine::Gpu { net, .. } => format!("cuda:{} {}", net.dev.ordinal, net.dev.name),
        }
    }

    pub fn spec(&self) -> &NetworkSpec {
        match self {
            Engine::Cpu { net, .. } => &net.spec,
            Engine::Gpu { net, .. } => &net.spec,
        }
    }

    pub fn slots(&self) -> &[ParamSlot] {
        match self {
            Engine::Cpu { net, .. } => &net.slots,
            Engine::Gpu { net, .. } => &net.slots,
        }
    }

    pub fn num_params(&self) -> usize {
        match self {
            Engine::Cpu { net, .. } => net.num_params(),
            Engine::Gpu { net, .. } => net.num_params(),
        }
    }

    /// One training iteration: forward, loss, BPTT, optimizer step.
    pub fn train_step(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats> {
        match self {
            Engine::Cpu { net, opt } => net.train_step(x, t_in, labels, loss, opt),
            Engine::Gpu { net, opt } => net.train_step(x, t_in, labels, loss, opt),
        }
    }

    /// One training iteration launched without waiting for it where the engine can (the GPU: one
    /// CUDA graph, no host synchronisation); returns the results of the step before it (the GPU)
    /// or of this one (the CPU), if any. `finish_steps` returns the last one's.
    pub fn train_step_pipelined(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<Option<StepStats>> {
        match self {
            Engine::Cpu { net, opt } => net.train_step(x, t_in, labels, loss, opt).map(Some),
            Engine::Gpu { net, opt } => net.train_step_pipelined(x, t_in, labels, loss, opt),
        }
    }

    /// Waits for the last step launched by `train_step_pipelined` and returns its results.
    pub fn finish_steps(&mut self) -> Result<Option<StepStats>> {
        match self {
            Engine::Cpu { .. } => Ok(None),
            Engine::Gpu { net, .. } => net.finish_steps(),
        }
    }

    /// The first part of a training step run eagerly: forward and loss (see
    /// `cpu::Network::forward_loss`). With `backward_loss` and `apply_gradients` it is
    /// `train_step`, split where data-parallel training agrees with the other ranks and reduces
    /// the gradients.
    pub fn forward_loss(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats> {
        match self {
            Engine::Cpu { net, .. } => net.forward_loss(x, t_in, labels, loss),
            Engine::Gpu { net, .. } => net.forward_loss(x, t_in, labels, loss),
        }
    }

    /// The gradients of the last `forward_loss` times `scale` into the gradient buffer. The
    /// GPU engine calls `ready(lo)` as soon as the gradients from flat index `lo` to the end are
    /// enqueued (the CPU engine never calls it: its gradients are all final on return).
    pub fn backward_loss(&mut self, scale: f64, ready: Option<&mut dyn FnMut(usize) -> Result<()>>) -> Result<()> {
        match self {
            Engine::Cpu { net, .. } => net.backward_loss(scale),
            Engine::Gpu { net, .. } => net.backward_loss(scale, ready),
        }
    }

    /// The position of the next batches' first sample in their global batch (a data-parallel
    /// rank's shard; 0 otherwise): the dropout masks drawn are those of that place, so N ranks
    /// draw the masks one process draws for the whole batch.
    pub fn set_sample_offset(&mut self, offset: usize) {
        match self {
            Engine::Cpu { net, .. } => net.sample_offset = offset,
            Engine::Gpu { net, .. } => net.sample_offset = offset,
        }
    }

    /// Zero gradients (a data-parallel rank with no sample in this step contributes these).
    pub fn zero_grads(&mut self) -> Result<()> {
        match self {
            Engine::Cpu { net, .. } => {
                net.zero_grads();
                Ok(())
            }
            Engine::Gpu { net, .. } => net.zero_grads(),
        }
    }

    /// The CPU engine's gradient buffer (None on the GPU engine), for reducing it across ranks.
    pub fn cpu_grads_mut(&mut self) -> Option<&mut [f32]> {
        match self {
            Engine::Cpu { net, .. } => Some(&mut net.grads),
            Engine::Gpu { .. } => None,
        }
    }

    /// The GPU engine's network (None on the CPU engine).
    pub fn gpu_network(&self) -> Option<&GpuNetwork> {
        match self {
            Engine::Cpu { .. } => None,
            Engine::Gpu { net, .. } => Some(net),
        }
    }

    /// The optimizer step from the gradient buffer; counts the iteration.
    pub fn apply_gradients(&mut self) -> Result<()> {
        match self {
            Engine::Cpu { net, opt } => net.apply_gradients(opt),
            Engine::Gpu { net, opt } => net.apply_gradients(opt),
        }
    }

    /// Loss and correct count without updating anything (dropout off).
    pub fn evaluate(&mut self, x: &[f32], t_in: usize, labels: &[u8], loss: Loss) -> Result<StepStats> {
        match self {
            Engine::Cpu { net, .. } => net.evaluate(x, t_in, labels, loss),
            Engine::Gpu { net, .. } => net.evaluate(x, t_in, labels, loss),
        }
    }

    pub fn predict(&mut self, x: &[f32], t_in: usize, batch: usize) -> Result<Vec<usize>> {
        match self {
            Engine::Cpu { net, .. } => net.predict(x, t_in, batch),
            Engine::Gpu { net, .. } => net.predict(x, t_in, batch),
        }
    }

    /// The parameters (host copy, the flat layout of `slots()`).
    pub fn params(&self) -> Result<Vec<f32>> {
        match self {
            Engine::Cpu { net, .. } => Ok(net.params.clone()),
            Engine::Gpu { net, .. } => net.params_to_host(),
        }
    }

    pub fn load_params(&mut self, params: &[f32]) -> Result<()> {
        match self {
            Engine::Cpu { net, .. } => {
                if params.len() != net.params.len() {
                    return Err(shape_err("parameters", format!("{} values", net.params.len()), format!("{}", params.len())));
                }
                crate::error::check_finite("parameters", params, "a parameter to load is NaN or Inf")?;
                net.params.copy_from_slice(params);
                Ok(())
            }
            Engine::Gpu { net, .. } => net.load_params(params),
        }
    }

    /// The predicted class of each sample of the last forward.
    pub fn last_predictions(&self) -> Result<Vec<usize>> {
        match self {
            Engine::Cpu { net, .. } => Ok(net.last_predictions()),
            Engine::Gpu { net, .. } => Ok(crate::cpu::loss::argmax_rows(&net.readout_to_host()?, net.classes())),
        }
    }

    /// The readout [B][classes] of the last forward: each output neuron's firing rate (spike
    /// count / T), the scores the prediction is the argmax of.
    pub fn last_readout(&self) -> Result<Vec<f32>> {
        match self {
            Engine::Cpu { net, .. } => Ok(net.readout().to_vec()),
            Engine::Gpu { net, .. } => net.readout_to_host(),
        }
    }

    /// The engine a training configuration asks for: its network from its seed, its optimizer.
    pub fn for_config(cfg: &crate::train::TrainConfig, choice: DeviceChoice) -> Result<(Engine, String)> {
        let (mut engine, mut line) = Engine::new(&cfg.network, cfg.seed, choice, cfg.optimizer)?;
        match &mut engine {
            Engine::Cpu { net, .. } => {
                net.set_saved_state(SavedState::lean(cfg.recompute))?;
                line.push_str(" — computes in f32 (--precision applies to the GPU engine)");
            }
            Engine::Gpu { net, .. } => {
                net.set_recompute(cfg.recompute)?;
                net.set_precision(cfg.precision)?;
                let gemms = match net.settings().feedforward {
                    crate::gpu::gemm_tc::FeedForward::Cublas => "cuBLAS FP32 GEMMs",
                    crate::gpu::gemm_tc::FeedForward::TensorCore(_) => "tensor-core GEMMs",
                };
                line.push_str(&format!(" — precision {} ({gemms})", cfg.precision));
                if cfg.deterministic {
                    net.set_deterministic(true);
                    line.push_str(" — deterministic: no float atomics in the gradients");
                }
            }
        }
        if let Some(k) = cfg.recompute {
            line.push_str(&format!(" — recompute: state kept every {k} steps"));
        }
        Ok((engine, line))
    }

    /// (layer, firing rate, inhibitory fraction) of every spiking layer in the last forward.
    pub fn spike_stats(&self) -> Result<Vec<(usize, f64, Option<f64>)>> {
        match self {
            Engine::Cpu { net, .. } => Ok(net.spike_stats()),
            Engine::Gpu { net, .. } => net.spike_stats(),
        }
    }

    /// The optimizer's state (config, lr, step, m, v) as host vectors, for checkpoints.
    pub fn optimizer_state(&self) -> Result<Optimizer> {
        match self {
            Engine::Cpu { opt, .. } => Ok(opt.clone()),
            Engine::Gpu { opt, .. } => opt.to_host(),
        }
    }

    /// Restores the optimizer's state (from a checkpoint).
    pub fn set_optimizer_state(&mut self, state: &Optimizer) -> Result<()> {
        let n = self.num_params();
        state.config.validate()?;
        if state.m.len() != n || (matches!(state.config, OptimizerConfig::Adam { .. }) && state.v.len() != n) {
            return Err(shape_err(
                "optimizer state",
                format!("m and v of {n} values"),
                format!("m {}, v {}", state.m.len(), state.v.len()),
            ));
        }
        match self {
            Engine::Cpu { opt, .. } => {
                *opt = state.clone();
                Ok(())
            }
            Engine::Gpu { opt, .. } => opt.load(state),
        }
    }

    /// The learning rate in force.
    pub fn lr(&self) -> f64 {
        match self {
            Engine::Cpu { opt, .. } => opt.lr,
            Engine::Gpu { opt, .. } => opt.lr,
        }
    }

    /// Sets the learning rate (StepLR).
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Engine::Cpu { opt, .. } => opt.lr = lr,
            Engine::Gpu { opt, .. } => opt.lr = lr,
        }
    }

    /// Training iterations done (keys the dropout masks).
    pub fn iteration(&self) -> u64 {
        match self {
            Engine::Cpu { net, .. } => net.iteration,
            Engine::Gpu { net, .. } => net.iteration,
        }
    }

    pub fn set_iteration(&mut self, it: u64) {
        match self {
            Engine::Cpu { net, .. } => net.iteration = it,
            Engine::Gpu { net, .. } => net.iteration = it,
        }
    }

    pub fn dropout_seed(&self) -> u64 {
        match self {
            Engine::Cpu { net, .. } => net.dropout_seed,
            Engine::Gpu { net, .. } => net.dropout_seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::device::driver_present;

    #[test]
    fn auto_falls_back_to_the_cpu_without_a_driver_and_says_so() {
        let mut spec = NetworkSpec::mnist();
        spec.steps = 2;
        let (mut e, line) = Engine::new(&spec, 7, DeviceChoice::Auto, OptimizerConfig::adam(1e-3)).unwrap();
        if driver_present() {
            // a machine with a driver: auto takes the GPU when one opens, else falls back
            assert!(line.starts_with("engine: GPU") || line.contains("found no usable GPU"), "{line}");
            return;
        }
        assert!(!e.is_gpu());
        assert!(line.contains("CPU") && line.contains("no usable GPU"), "{line}");
        // the CPU engine works through the Engine interface, from the CPU network's weights
        let reference = Network::<f32>::new(&spec, 7).unwrap();
        assert!(e.params().unwrap() == reference.params);
        let x = vec![0.5f32; 2 * 28 * 28];
        let s = e.train_step(&x, 1, &[3, 4], Loss::Mse).unwrap();
        assert_eq!(s.batch, 2);
        assert!(s.loss.is_finite());
        assert_eq!(e.iteration(), 1);
        let st = e.optimizer_state().unwrap();
        assert_eq!(st.step, 1);
        // exactly what the CPU network and optimizer give by themselves
        let mut direct = Network::<f32>::new(&spec, 7).unwrap();
        let mut o = Optimizer::new(OptimizerConfig::adam(1e-3), direct.num_params()).unwrap();
        let s2 = direct.train_step(&x, 1, &[3, 4], Loss::Mse, &mut o).unwrap();
        assert_eq!(s2, s);
        assert!(e.params().unwrap() == direct.params, "the engine's step differs from the CPU network's");
        assert!(st.m == o.m && st.v == o.v);
        // the optimizer state and the parameters round-trip
        let mut st2 = st.clone();
        st2.step = 41;
        e.set_optimizer_state(&st2).unwrap();
        assert_eq!(e.optimizer_state().unwrap().step, 41);
        e.load_params(&reference.params).unwrap();
        assert!(e.params().unwrap() == reference.params);
        assert!(e.load_params(&[1.0]).unwrap_err().to_string().contains("parameters"));
        let mut bad = st.clone();
        bad.m.pop();
        assert!(e.set_optimizer_state(&bad).is_err());
        assert_eq!(e.predict(&x, 1, 2).unwrap().len(), 2);
        assert_eq!(e.spike_stats().unwrap().len(), 4);
    }

    #[test]
    fn device_cuda_without_a_gpu_is_a_clear_error_not_a_panic() {
        if driver_present() {
            return; // this check is for machines without a driver (CI)
        }
        let spec = NetworkSpec::mnist();
        let r = std::panic::catch_unwind(|| Engine::new(&spec, 1, DeviceChoice::Cuda(0), OptimizerConfig::adam(1e-3)).map(|_| ()));
        let err = r.expect("no panic").expect_err("cuda without a driver must fail");
        let msg = err.to_string();
        assert!(msg.contains("CUDA") && msg.contains("no NVIDIA driver") && msg.contains("--device cpu"), "{msg}");
    }
}
