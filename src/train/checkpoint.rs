//! Checkpoints: safetensors files holding every parameter under its PyTorch-style name (so a
//! PyTorch user can load them), the optimizer's moments, and in the metadata the run's
//! configuration, network, epoch, position inside the epoch, RNG state and a SHA-256 over all
//! tensor bytes (a truncated or bit-flipped file is refused, not half-loaded). Written atomically:
//! temporary file, fsync, rename.

use super::config::TrainConfig;
use crate::cpu::network::ParamSlot;
use crate::error::{BackeiError, Result};
use crate::gpu::kernels::write_atomically;
use crate::optim::Optimizer;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "backei-checkpoint-1";

/// Where a run stands, restored by `--resume`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Epochs fully done.
    pub epoch: usize,
    /// Batches done inside the current (unfinished) epoch; 0 at an epoch boundary.
    pub batches_done: usize,
    /// Training iterations done (keys the dropout masks).
    pub iteration: u64,
    /// Running sums of the unfinished epoch: loss·samples, correct, samples, seconds.
    pub partial: [f64; 4],
    /// Best test (or validation) accuracy so far and its epoch.
    pub best_accuracy: f64,
    pub best_epoch: usize,
}

pub struct Checkpoint {
    pub config: TrainConfig,
    pub progress: Progress,
    pub params: Vec<f32>,
    pub optimizer: Optimizer,
}

fn io_err(path: &Path, problem: impl std::fmt::Display) -> BackeiError {
    BackeiError::Io { path: path.display().to_string(), problem: problem.to_string() }
}

fn digest(tensors: &[(String, Vec<usize>, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (name, shape, bytes) in tensors {
        h.update(name.as_bytes());
        h.update(format!("{shape:?}").as_bytes());
        h.update(bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a checkpoint to `path` atomically.
pub fn save(path: &Path, ck: &Checkpoint, slots: &[ParamSlot]) -> Result<()> {
    let opt_state = ck.optimizer.clone();
    let mut tensors: Vec<(String, Vec<usize>, &[u8])> = Vec::new();
    for s in slots {
        tensors.push((s.name.clone(), s.shape.clone(), bytemuck::cast_slice(&ck.params[s.range.clone()])));
    }
    tensors.push(("optimizer.m".into(), vec![opt_state.m.len()], bytemuck::cast_slice(&opt_state.m)));
    if !opt_state.v.is_empty() {
        tensors.push(("optimizer.v".into(), vec![opt_state.v.len()], bytemuck::cast_slice(&opt_state.v)));
    }
    let json = |v: serde_json::Result<String>| v.expect("plain data serialises");
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("config".into(), json(serde_json::to_string(&ck.config)));
    meta.insert("progress".into(), json(serde_json::to_string(&ck.progress)));
    meta.insert(
        "optimizer".into(),
        serde_json::json!({"config": opt_state.config, "lr": opt_state.lr, "step": opt_state.step}).to_string(),
    );
    meta.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("sha256".into(), digest(&tensors));
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            (n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).expect("shape matches bytes by construction"))
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| io_err(path, e))?;
    write_atomically(path, &bytes).map_err(|e| io_err(path, format!("cannot write checkpoint: {e}")))
}

/// Reads and verifies a checkpoint; `slots` of the network it is loaded into are checked
/// against it when given.
pub fn load(path: &Path) -> Result<(Checkpoint, Vec<(String, Vec<usize>)>)> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, format!("cannot read checkpoint: {e}")))?;
    let bad = |what: String| {
        io_err(path, format!("not a valid backei checkpoint: {what} (the file may be truncated or corrupted; use checkpoint-best.safetensors or an earlier copy)"))
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().ok_or_else(|| bad("no metadata".into()))?;
    let field = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("metadata field `{k}` missing")));
    if field("format")? != FORMAT {
        return Err(bad(format!("format `{}` is not {FORMAT}", field("format")?)));
    }
    let config: TrainConfig = serde_json::from_str(&field("config")?).map_err(|e| bad(format!("metadata `config`: {e}")))?;
    let progress: Progress = serde_json::from_str(&field("progress")?).map_err(|e| bad(format!("metadata `progress`: {e}")))?;
    let optv: serde_json::Value = serde_json::from_str(&field("optimizer")?).map_err(|e| bad(format!("metadata `optimizer`: {e}")))?;
    // tensors in the order they were written: parameters (by the network's slot order), then optimizer
    let net = crate::Network::<f32>::new(&config.network, 0).map_err(|e| bad(format!("network: {e}")))?;
    let mut tensors: Vec<(String, Vec<usize>, &[u8])> = Vec::new();
    let mut params = Vec::with_capacity(net.num_params());
    let mut names = Vec::new();
    for s in &net.slots {
        let t = st.tensor(&s.name).map_err(|_| bad(format!("tensor `{}` missing", s.name)))?;
        if t.dtype() != Dtype::F32 || t.shape() != s.shape.as_slice() {
            return Err(bad(format!("tensor `{}` is {:?} {:?}, expected F32 {:?}", s.name, t.dtype(), t.shape(), s.shape)));
        }
        params.extend(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        tensors.push((s.name.clone(), s.shape.clone(), t.data()));
        names.push((s.name.clone(), s.shape.clone()));
    }
    let mut moments: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
    for (k, name) in ["optimizer.m", "optimizer.v"].iter().enumerate() {
        if let Ok(t) = st.tensor(name) {
            moments[k] = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.push((name.to_string(), t.shape().to_vec(), t.data()));
        }
    }
    let [m, v] = moments;
    if digest(&tensors) != field("sha256")? {
        return Err(bad("SHA-256 of the tensors does not match the one recorded (bit flip or partial write)".into()));
    }
    let optimizer = Optimizer {
        config: serde_json::from_value(optv["config"].clone()).map_err(|e| bad(format!("optimizer config: {e}")))?,
        lr: optv["lr"].as_f64().ok_or_else(|| bad("optimizer lr".into()))?,
        step: optv["step"].as_u64().ok_or_else(|| bad("optimizer step".into()))?,
        m,
        v,
    };
    Ok((Checkpoint { config, progress, params, optimizer }, names))
}
