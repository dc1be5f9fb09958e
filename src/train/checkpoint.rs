//! Checkpoints: safetensors files holding every parameter under its PyTorch-style name (so a
//! PyTorch user can load them), the optimizer's moments, and in the metadata the run's
//! configuration, network, epoch, position inside the epoch, RNG state and a SHA-256 over every
//! byte that is loaded: each metadata field and each tensor (a truncated, bit-flipped or edited
//! file is refused, not half-loaded). A checkpoint whose parameters or optimizer state hold NaN
//! or Inf is refused too. Written atomically ([`crate::atomic_file`]).

use super::config::TrainConfig;
use crate::cpu::network::ParamSlot;
use crate::error::{BackeiError, Result};
use crate::optim::Optimizer;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "backei-checkpoint-2";
/// The first format, whose SHA-256 covered the tensors only; still read, with a warning.
const FORMAT_TENSORS_ONLY: &str = "backei-checkpoint-1";

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

/// Format 2's SHA-256: every metadata field but `sha256` itself (sorted by name), then every
/// tensor in the file (sorted by name: name, dtype, shape, bytes). Independent of the network, so
/// it is checked before any setting in the file is believed.
fn digest(meta: &HashMap<String, String>, tensors: &[(String, String, Vec<usize>, &[u8])]) -> String {
    let mut h = Sha256::new();
    let mut fields: Vec<(&String, &String)> = meta.iter().filter(|(k, _)| k.as_str() != "sha256").collect();
    fields.sort();
    // each piece preceded by its length, so that no two different contents hash the same bytes
    let mut piece = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    for (k, v) in fields {
        piece(k.as_bytes());
        piece(v.as_bytes());
    }
    let mut sorted: Vec<&(String, String, Vec<usize>, &[u8])> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, dtype, shape, bytes) in sorted {
        piece(name.as_bytes());
        piece(dtype.as_bytes());
        piece(format!("{shape:?}").as_bytes());
        piece(bytes);
    }
    hex(&h.finalize())
}

/// Format 1's SHA-256: the tensors only, in the network's order.
fn digest_tensors_only(tensors: &[(String, Vec<usize>, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (name, shape, bytes) in tensors {
        h.update(name.as_bytes());
        h.update(format!("{shape:?}").as_bytes());
        h.update(bytes);
    }
    hex(&h.finalize())
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of the slot holding flat parameter `i`, with the index inside it.
fn slot_name(slots: &[ParamSlot], i: usize) -> String {
    match slots.iter().find(|s| s.range.contains(&i)) {
        Some(s) => format!("{}[{}]", s.name, i - s.range.start),
        None => "parameters".into(),
    }
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
    let described: Vec<(String, String, Vec<usize>, &[u8])> =
        tensors.iter().map(|(n, shape, b)| (n.clone(), format!("{:?}", Dtype::F32), shape.clone(), *b)).collect();
    let sha = digest(&meta, &described);
    meta.insert("sha256".into(), sha);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            (n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).expect("shape matches bytes by construction"))
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| io_err(path, e))?;
    crate::atomic_file::write(path, &bytes).map_err(|e| io_err(path, format!("cannot write checkpoint: {e}")))
}

/// Reads and verifies a checkpoint: its SHA-256 over every metadata field and tensor, the
/// tensors against the network its settings describe, and that every value is finite. Returns the
/// checkpoint and its parameter names and shapes.
pub fn load(path: &Path) -> Result<(Checkpoint, Vec<(String, Vec<usize>)>)> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, format!("cannot read checkpoint: {e}")))?;
    let bad = |what: String| {
        io_err(path, format!("not a valid backei checkpoint: {what} (the file may be truncated or corrupted; use checkpoint-best.safetensors or an earlier copy)"))
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().ok_or_else(|| bad("no metadata".into()))?;
    let field = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("metadata field `{k}` missing")));
    let format = field("format")?;
    if format == FORMAT {
        let all: Vec<(String, String, Vec<usize>, &[u8])> =
            st.tensors().into_iter().map(|(n, t)| (n, format!("{:?}", t.dtype()), t.shape().to_vec(), t.data())).collect();
        if digest(&meta, &all) != field("sha256")? {
            return Err(bad(
                "SHA-256 of the metadata (settings, progress, optimizer state) and tensors does not match the one recorded (bit flip, partial write or edited metadata)"
                    .into(),
            ));
        }
    } else if format != FORMAT_TENSORS_ONLY {
        return Err(bad(format!("format `{format}` is not {FORMAT}")));
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
            if t.dtype() != Dtype::F32 {
                return Err(bad(format!("tensor `{name}` is {:?}, expected F32", t.dtype())));
            }
            moments[k] = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.push((name.to_string(), t.shape().to_vec(), t.data()));
        }
    }
    // every tensor in the file is one of those
    if let Some(extra) = st.names().into_iter().find(|n| !tensors.iter().any(|t| &t.0 == *n)) {
        return Err(bad(format!("tensor `{extra}` is not part of the {} network's checkpoint", config.network.name)));
    }
    if format == FORMAT_TENSORS_ONLY {
        if digest_tensors_only(&tensors) != field("sha256")? {
            return Err(bad("SHA-256 of the tensors does not match the one recorded (bit flip or partial write)".into()));
        }
        eprintln!(
            "warning: {} is a format-1 checkpoint: its SHA-256 covers the tensors but not the settings and progress in its metadata, which are used unverified",
            path.display()
        );
    }
    let [m, v] = moments;
    for (name, values) in [("parameters", &params), ("optimizer.m", &m), ("optimizer.v", &v)] {
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            let tensor = if name == "parameters" { slot_name(&net.slots, i) } else { format!("{name}[{i}]") };
            return Err(io_err(
                path,
                format!(
                    "`{tensor}` is {}: the checkpoint was saved holding a non-finite value (its checksum matches, so the file is as it was written) and cannot be resumed or evaluated; use checkpoint-best.safetensors or an earlier copy",
                    values[i]
                ),
            ));
        }
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
