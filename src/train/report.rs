//! What a run tells its user beyond the numbers: the names of its spiking layers, the warning
//! when it will take far longer than a CPU session should, the hint when the network stays
//! silent, and the closing summary (final, best-by-validation and best-over-epochs accuracies,
//! each labelled with how it was chosen).

use super::config::TrainConfig;
use super::metrics::EpochRow;
use super::progress::{human, RunClock};
use crate::cpu::loss::Loss;
use crate::spec::{LayerSpec, NetworkSpec};

/// `2 BackEI 15×24×24`: a layer's index in the network, its kind and its output shape.
pub fn layer_name(spec: &NetworkSpec, index: usize) -> String {
    let plan = spec.plan().ok();
    let kind = match spec.layers.get(index) {
        Some(LayerSpec::BackEi) => "BackEI",
        Some(LayerSpec::Spiking) => "Spiking",
        Some(LayerSpec::Conv { .. }) => "Conv",
        Some(LayerSpec::Linear { .. }) => "Linear",
        Some(LayerSpec::AvgPool) => "AvgPool",
        Some(LayerSpec::Dropout { .. }) => "Dropout",
        Some(LayerSpec::Flatten) => "Flatten",
        None => "?",
    };
    let shape = plan.as_ref().and_then(|p| p.get(index)).map(|l| {
        let [c, h, w] = l.output;
        if h == 1 && w == 1 {
            format!("{c}")
        } else {
            format!("{c}×{h}×{w}")
        }
    });
    match shape {
        Some(s) => format!("{index} {kind} {s}"),
        None => format!("{index} {kind}"),
    }
}

/// The tag-friendly form of a layer's name: `2_BackEI`.
pub fn layer_tag(spec: &NetworkSpec, index: usize) -> String {
    let name = layer_name(spec, index);
    let mut parts = name.split(' ');
    format!("{}_{}", parts.next().unwrap_or("?"), parts.next().unwrap_or("?"))
}

/// A run is worth a warning when it will take longer than this on the CPU engine.
pub const CPU_BUDGET_SECS: f64 = 3600.0;

/// The warning for a run that the CPU engine will take more than an hour over, with what fits in
/// one: fewer `--epochs`, else one epoch on a `--train-limit` subset (and a `--test-limit` when the
/// evaluation alone takes the hour). `paper_recipe` says its settings are a dataset's defaults
/// (the paper's, sized for a GPU). None when the run fits, or before a rate is known.
pub fn cpu_duration_warning(clock: &RunClock, epochs_done: usize, run_left: f64, paper_recipe: bool) -> Option<String> {
    if run_left <= CPU_BUDGET_SECS {
        return None;
    }
    let t = clock.train_secs_per_sample()?;
    let e = clock.eval_secs_per_sample()?;
    let epoch = clock.epoch_secs()?;
    let eval = clock.eval_per_epoch() as f64 * e;
    let fit = if epoch <= CPU_BUDGET_SECS {
        format!("--epochs {}", epochs_done + (CPU_BUDGET_SECS / epoch).floor() as usize)
    } else if eval < CPU_BUDGET_SECS / 2.0 {
        let limit = ((CPU_BUDGET_SECS - eval) / t).floor().max(1.0) as usize;
        format!("--epochs {} --train-limit {limit}", epochs_done + 1)
    } else {
        let limit = (CPU_BUDGET_SECS / 2.0 / t).floor().max(1.0) as usize;
        let test = (CPU_BUDGET_SECS / 2.0 / e).floor().max(1.0) as usize;
        format!("--epochs {} --train-limit {limit} --test-limit {test}", epochs_done + 1)
    };
    let why = if paper_recipe { " These are the paper's settings, sized for a GPU (--device cuda)." } else { "" };
    Some(format!(
        "warning: at the rate measured so far ({:.0} training samples/s) this run will take about {} more on the CPU engine ({} epochs of {} training and {} evaluation samples).{why} To finish within about an hour here: {fit}.",
        1.0 / t,
        human(run_left),
        clock.epochs() - epochs_done,
        clock.train_per_epoch(),
        clock.eval_per_epoch(),
    ))
}

/// The loss of a network whose output never fires (a zero readout): MSE 1/classes, CE ln(classes).
pub fn silent_loss(loss: Loss, classes: usize) -> f64 {
    match loss {
        Loss::Mse => 1.0 / classes as f64,
        Loss::Ce => (classes as f64).ln(),
    }
}

/// The hint for an epoch whose training loss stayed at the loss of a silent network while a
/// spiking layer fired no spike: where the silence starts, and what to check. `stats` is
/// (layer, firing rate, inhibitory fraction) per spiking layer.
pub fn silence_hint(
    spec: &NetworkSpec,
    loss: Loss,
    classes: usize,
    train_loss: f64,
    stats: &[(usize, f64, Option<f64>)],
) -> Option<String> {
    let silent = silent_loss(loss, classes);
    if (train_loss - silent).abs() > 1e-3 * silent {
        return None;
    }
    let (first, _, _) = stats.iter().find(|s| s.1 == 0.0)?;
    let rates: Vec<String> = stats.iter().map(|(i, r, _)| format!("{} {r:.4}", layer_name(spec, *i))).collect();
    Some(format!(
        "hint: the training loss stayed at {train_loss:.4} all epoch, the loss of a network whose output never fires, and layer {} fired no spike (firing rates: {}). With no spikes past that layer the loss cannot move. Check the input scale (pixels are fed as intensities in [0, 1] with --encoding direct; inputs far below the firing threshold never reach it), try more time steps (--steps), another --seed or a larger --lr.",
        layer_name(spec, *first),
        rates.join(", ")
    ))
}

/// The closing lines of a finished run, from its metrics: the final test accuracy, the
/// checkpoint kept as the best (chosen on the validation split when there is one) and its test
/// accuracy, and the best test accuracy over the epochs, labelled as what the paper reports.
pub fn summary(rows: &[EpochRow], cfg: &TrainConfig, best_epoch: usize, val_samples: usize) -> Vec<String> {
    let Some(last) = rows.last() else { return vec![] };
    let pct = |x: Option<f64>| x.map(|v| format!("{:.2}%", v * 100.0)).unwrap_or_else(|| "—".into());
    let mut lines = vec![format!("final test accuracy {} (epoch {})", pct(last.test_accuracy), last.epoch)];
    let best = rows.iter().find(|r| r.epoch == best_epoch);
    if let Some(b) = best {
        if cfg.val_split > 0.0 {
            lines.push(format!(
                "best checkpoint: epoch {} by validation accuracy {} ({val_samples} training samples held out, --val-split {}); its test accuracy {}",
                b.epoch,
                pct(b.val_accuracy),
                cfg.val_split,
                pct(b.test_accuracy)
            ));
        } else {
            lines.push(format!(
                "best checkpoint: epoch {} by test accuracy {} (no validation split: --val-split 0 chooses on the test set)",
                b.epoch,
                pct(b.test_accuracy)
            ));
        }
    }
    // the first epoch that reached the highest test accuracy
    let top = rows.iter().filter(|r| r.test_accuracy.is_some()).fold(None::<&EpochRow>, |best, r| match best {
        Some(b) if b.test_accuracy >= r.test_accuracy => Some(b),
        _ => Some(r),
    });
    if let Some(top) = top {
        lines.push(format!(
            "best test accuracy over the epochs: {} (epoch {}) — the figure the paper reports; it is chosen on the test set, so it overstates what a held-out choice gets",
            pct(top.test_accuracy),
            top.epoch
        ));
    }
    let train: f64 = rows.iter().map(|r| r.seconds).sum();
    let eval: f64 = rows.iter().filter_map(|r| r.eval_seconds).sum();
    lines.push(format!("time: {} ({} training, {} evaluation)", human(train + eval), human(train), human(eval)));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DatasetKind;

    #[test]
    fn layers_are_named_by_index_kind_and_shape() {
        let spec = NetworkSpec::mnist();
        assert_eq!(layer_name(&spec, 1), "1 BackEI 15×24×24");
        assert_eq!(layer_name(&spec, 8), "8 Spiking 300");
        assert_eq!(layer_tag(&spec, 1), "1_BackEI");
    }

    #[test]
    fn a_long_cpu_run_is_told_what_fits_in_an_hour() {
        // 60,000 training samples at 10/s (100 min an epoch), 10,000 evaluated at 60/s
        let mut c = RunClock::new(200, 60_000, 10_000);
        c.trained(100, 10.0);
        c.evaluated(600, 10.0);
        let (_, left) = c.left(super::super::progress::Position::Train { epoch: 0, done: 100 }).unwrap();
        let w = cpu_duration_warning(&c, 0, left, true).unwrap();
        assert!(w.contains("10 training samples/s") && w.contains("the paper's settings"), "{w}");
        // an epoch takes 6000 + 167 s > an hour: one epoch on (3600 − 167)·10 samples
        assert!(w.contains("--epochs 1 --train-limit 34333"), "{w}");
        // short epochs: fewer of them
        let mut c = RunClock::new(200, 1000, 100);
        c.trained(100, 5.0);
        c.evaluated(100, 1.0);
        let (_, left) = c.left(super::super::progress::Position::Train { epoch: 3, done: 0 }).unwrap();
        let w = cpu_duration_warning(&c, 3, left, false).unwrap();
        // 51 s an epoch: 70 more fit in an hour
        assert!(w.contains("--epochs 73") && !w.contains("paper"), "{w}");
        assert!(cpu_duration_warning(&c, 3, 3000.0, false).is_none());
    }

    #[test]
    fn a_silent_network_gets_a_hint_naming_the_first_silent_layer() {
        let spec = NetworkSpec::mnist();
        let stats = [(1, 0.02, Some(0.3)), (4, 0.0, Some(0.0)), (8, 0.0, None), (10, 0.0, None)];
        let h = silence_hint(&spec, Loss::Mse, 10, 0.1, &stats).unwrap();
        assert!(h.contains("layer 4 BackEI 40×8×8 fired no spike") && h.contains("input scale"), "{h}");
        // a loss that moves, or a network that fires, gets none
        assert!(silence_hint(&spec, Loss::Mse, 10, 0.09, &stats).is_none());
        assert!(silence_hint(&spec, Loss::Mse, 10, 0.1, &[(1, 0.1, None), (10, 0.01, None)]).is_none());
        assert!(silence_hint(&spec, Loss::Ce, 10, 10f64.ln(), &stats).is_some());
    }

    #[test]
    fn the_summary_labels_how_each_accuracy_was_chosen() {
        let row = |epoch, val, test| EpochRow {
            epoch,
            train_loss: 0.05,
            train_accuracy: 0.9,
            val_accuracy: Some(val),
            test_accuracy: Some(test),
            test_loss: Some(0.04),
            lr: 1e-3,
            seconds: 60.0,
            samples_per_second: 100.0,
            firing_rates: vec![],
            inhibitory_fractions: vec![],
            val_loss: None,
            eval_seconds: Some(30.0),
        };
        let rows = [row(1, 0.90, 0.91), row(2, 0.95, 0.93), row(3, 0.94, 0.95)];
        let cfg = TrainConfig::defaults(DatasetKind::MnistSample);
        let s = summary(&rows, &cfg, 2, 800).join("\n");
        assert!(s.contains("final test accuracy 95.00% (epoch 3)"), "{s}");
        assert!(s.contains("best checkpoint: epoch 2 by validation accuracy 95.00% (800 training samples held out"), "{s}");
        assert!(s.contains("its test accuracy 93.00%"), "{s}");
        assert!(s.contains("best test accuracy over the epochs: 95.00% (epoch 3) — the figure the paper reports"), "{s}");
        assert!(s.contains("time: 4m30s (3m00s training, 1m30s evaluation)"), "{s}");
    }
}
