//! `backei train --config FILE`: a run's settings from a JSON file with the keys of a run
//! folder's `config.json` — its `"config"` object, or a whole `config.json` of an earlier run —
//! any subset of them. What the file leaves out keeps the dataset's default; the flags given on
//! the command line override the file. A key that is not a setting is an error naming it (a typo
//! must not silently train with the default).

use super::config::TrainConfig;
use crate::data::DatasetKind;
use crate::error::{BackeiError, Result};
use serde_json::Value;
use std::path::Path;

fn err(path: &Path, problem: impl Into<String>) -> BackeiError {
    BackeiError::Config { field: format!("--config {}", path.display()), problem: problem.into() }
}

/// The settings object of a config file: the file itself, or its `"config"` member when it is a
/// run folder's `config.json` (which also records the version, commit and engine).
pub fn read(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BackeiError::Io { path: path.display().to_string(), problem: format!("cannot read the config file: {e}") })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err(path, format!("not valid JSON: {e}")))?;
    let settings = match v.get("config") {
        Some(inner) if v.get("backei_version").is_some() => inner.clone(),
        _ => v,
    };
    if !settings.is_object() {
        return Err(err(path, "expected a JSON object of settings, e.g. {\"epochs\": 10, \"batch_size\": 32}"));
    }
    Ok(settings)
}

/// The run's settings: the defaults of the dataset (`dataset` if given on the command line, else
/// the file's, else mnist-sample) with the file's settings over them.
pub fn settings(path: &Path, file: &Value, dataset: Option<DatasetKind>) -> Result<TrainConfig> {
    let kind = match (dataset, file.get("dataset")) {
        (Some(k), _) => k,
        (None, Some(Value::String(name))) => name.parse().map_err(|e: String| err(path, format!("`dataset`: {e}")))?,
        (None, Some(other)) => return Err(err(path, format!("`dataset` is {other}, expected a name such as \"fashion-mnist\""))),
        (None, None) => DatasetKind::MnistSample,
    };
    let base = TrainConfig::defaults(kind);
    let mut merged = serde_json::to_value(&base).expect("plain data");
    let mut file = file.clone();
    if dataset.is_some() {
        file.as_object_mut().expect("checked by read").remove("dataset");
    }
    merge(&mut merged, &file);
    let cfg: TrainConfig = serde_path_to_error::deserialize(merged).map_err(|e| err(path, format!("`{}`: {}", e.path(), e.inner())))?;
    // every key of the file must be a setting: compare with what the settings write back
    let written = serde_json::to_value(&cfg).expect("plain data");
    if let Some(key) = unknown_key(&file, &written, "") {
        return Err(err(path, format!("`{key}` is not a setting (the keys are those of a run folder's config.json)")));
    }
    Ok(cfg)
}

/// `over` merged into `base`: objects key by key, anything else replaced. An object whose
/// `kind` (the optimizer's, the schedule's) differs from the base's replaces it whole, so that
/// no setting of the other kind is carried over.
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() && slot.get("kind") == v.get("kind").or(slot.get("kind")) => {
                        merge(slot, v)
                    }
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The first key (dotted path) of `file` that `written` lacks.
fn unknown_key(file: &Value, written: &Value, prefix: &str) -> Option<String> {
    let (Value::Object(f), Value::Object(w)) = (file, written) else { return None };
    for (k, v) in f {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match w.get(k) {
            None => return Some(path),
            Some(inner) => {
                if let Some(p) = unknown_key(v, inner, &path) {
                    return Some(p);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p() -> &'static Path {
        Path::new("run.json")
    }

    #[test]
    fn a_partial_file_keeps_the_datasets_defaults() {
        let cfg = settings(p(), &json!({"dataset": "fashion-mnist", "epochs": 7, "network": {"steps": 8}}), None).unwrap();
        let d = TrainConfig::defaults(DatasetKind::FashionMnist);
        assert_eq!(cfg.epochs, 7);
        assert_eq!(cfg.network.steps, 8);
        assert_eq!(cfg.batch_size, d.batch_size);
        assert_eq!(cfg.network.layers, d.network.layers);
        // the dataset of the command line wins, and the file's other settings still apply
        let cfg = settings(p(), &json!({"dataset": "fashion-mnist", "epochs": 7}), Some(DatasetKind::MnistSample)).unwrap();
        assert_eq!((cfg.dataset.as_str(), cfg.epochs), ("mnist-sample", 7));
    }

    #[test]
    fn a_whole_config_json_of_a_run_reads_back_to_its_settings() {
        let mut original = TrainConfig::defaults(DatasetKind::Cifar10);
        original.optimizer = crate::OptimizerConfig::adamw(3e-4, 0.05);
        original.lr_schedule = crate::LrSchedule::Cosine(crate::CosineLr { warmup_epochs: 5, min_lr: 1e-6 });
        let file = json!({"backei_version": "0.1.0", "commit": "x", "engine": "cpu", "config": original});
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
        let v = read(&path).unwrap();
        assert_eq!(settings(&path, &v, None).unwrap(), original);
    }

    #[test]
    fn another_optimizer_kind_replaces_the_default_one_whole() {
        let cfg = settings(p(), &json!({"optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}}), None).unwrap();
        assert_eq!(cfg.optimizer, crate::OptimizerConfig::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 5e-4 });
        // the same kind merges: only lr changes
        let cfg = settings(p(), &json!({"optimizer": {"lr": 0.01}}), None).unwrap();
        assert_eq!(cfg.optimizer, crate::OptimizerConfig::adam(0.01));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = settings(p(), &json!({"epoch": 3}), None).unwrap_err().to_string();
        assert!(e.contains("`epoch` is not a setting") && e.contains("run.json"), "{e}");
        let e = settings(p(), &json!({"network": {"feedback": {"bak": false}}}), None).unwrap_err().to_string();
        assert!(e.contains("`network.feedback.bak`"), "{e}");
        let e = settings(p(), &json!({"epochs": "ten"}), None).unwrap_err().to_string();
        assert!(e.contains("`epochs`: invalid type") && e.contains("run.json"), "{e}");
        let e = settings(p(), &json!({"dataset": "imagenet"}), None).unwrap_err().to_string();
        assert!(e.contains("`dataset`") && e.contains("imagenet"), "{e}");
    }
}
