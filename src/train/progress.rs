//! Progress of a run, and how long the rest of it will take. On a terminal an indicatif bar per
//! phase (training, validation, test evaluation) with the phase's and the whole run's time left;
//! otherwise (a log file, a pipe, SLURM's output) a timestamped line every `--progress-every`
//! seconds with the same figures. The run folder's logs are written either way.
//!
//! The estimate of the whole run ([`RunClock`]) counts every phase: the training samples and the
//! evaluation samples left, each at the rate measured so far in this process (evaluation, before
//! it is first measured, at a third of a training sample's time: the forward alone, as the
//! CPU engine's benchmark measures it).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// A local timestamp, `2026-12-02T10:31:05`.
pub fn timestamp() -> String {
    chrono::Local::now().format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// A duration for people: `45s`, `3m10s`, `2h05m`, `3d04h`.
pub fn human(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Evaluating a sample costs its forward pass alone: about a third of a training step (forward
/// 1.68 s of a 4.94 s step, `cargo bench --bench train_cpu`), until it is measured.
const EVAL_COST_BEFORE_MEASURED: f64 = 1.0 / 3.0;

/// What a run has left and how fast it goes: the basis of every time estimate.
#[derive(Clone, Debug)]
pub struct RunClock {
    epochs: usize,
    train_per_epoch: usize,
    eval_per_epoch: usize,
    train: (f64, f64),
    eval: (f64, f64),
}

/// Where a run stands inside an epoch.
#[derive(Clone, Copy, Debug)]
pub enum Position {
    /// Training, this many samples of the epoch done.
    Train { epoch: usize, done: usize },
    /// Evaluating (validation, then test), this many evaluation samples of the epoch done.
    Eval { epoch: usize, done: usize },
}

impl RunClock {
    /// A run of `epochs` epochs of `train_per_epoch` training and `eval_per_epoch` evaluation
    /// (validation + test) samples.
    pub fn new(epochs: usize, train_per_epoch: usize, eval_per_epoch: usize) -> Self {
        RunClock { epochs, train_per_epoch, eval_per_epoch, train: (0.0, 0.0), eval: (0.0, 0.0) }
    }

    /// `samples` trained in `secs`.
    pub fn trained(&mut self, samples: usize, secs: f64) {
        self.train.0 += secs;
        self.train.1 += samples as f64;
    }

    /// `samples` evaluated in `secs`.
    pub fn evaluated(&mut self, samples: usize, secs: f64) {
        self.eval.0 += secs;
        self.eval.1 += samples as f64;
    }

    pub fn train_secs_per_sample(&self) -> Option<f64> {
        (self.train.1 > 0.0).then(|| self.train.0 / self.train.1)
    }

    pub fn eval_secs_per_sample(&self) -> Option<f64> {
        if self.eval.1 > 0.0 {
            Some(self.eval.0 / self.eval.1)
        } else {
            self.train_secs_per_sample().map(|t| t * EVAL_COST_BEFORE_MEASURED)
        }
    }

    /// Seconds one whole epoch takes (training and evaluation).
    pub fn epoch_secs(&self) -> Option<f64> {
        Some(self.train_per_epoch as f64 * self.train_secs_per_sample()? + self.eval_per_epoch as f64 * self.eval_secs_per_sample()?)
    }

    /// (the rest of this epoch, the rest of the run) in seconds, once a rate is known.
    pub fn left(&self, at: Position) -> Option<(f64, f64)> {
        let t = self.train_secs_per_sample()?;
        let e = self.eval_secs_per_sample()?;
        let (epoch, this_epoch) = match at {
            Position::Train { epoch, done } => {
                (epoch, self.train_per_epoch.saturating_sub(done) as f64 * t + self.eval_per_epoch as f64 * e)
            }
            Position::Eval { epoch, done } => (epoch, self.eval_per_epoch.saturating_sub(done) as f64 * e),
        };
        let later = self.epochs.saturating_sub(epoch + 1) as f64 * self.epoch_secs()?;
        Some((this_epoch, this_epoch + later))
    }

    pub fn epochs(&self) -> usize {
        self.epochs
    }
    pub fn train_per_epoch(&self) -> usize {
        self.train_per_epoch
    }
    pub fn eval_per_epoch(&self) -> usize {
        self.eval_per_epoch
    }
}

/// How progress is shown.
#[derive(Clone, Copy, Debug)]
pub struct Display {
    /// Nothing at all (`--quiet`, or a rank other than the first).
    pub quiet: bool,
    /// Seconds between two lines when stderr is not a terminal (`--progress-every`; 0: every batch).
    pub every: f64,
    /// stderr is a terminal: bars instead of lines.
    pub terminal: bool,
}

impl Display {
    pub fn new(quiet: bool, every: f64) -> Self {
        Display { quiet, every, terminal: std::io::stderr().is_terminal() }
    }
}

/// The progress of one phase of one epoch: training, validation or test.
pub struct PhaseProgress {
    bar: Option<ProgressBar>,
    label: String,
    total: usize,
    display: Display,
    /// When the last line was printed, else when the phase began.
    last_line: Instant,
    lines: usize,
}

impl PhaseProgress {
    /// `label` names the phase (`epoch 3/200 train`), `total` its batches.
    pub fn new(label: String, total: usize, display: Display) -> Self {
        let bar = (!display.quiet && display.terminal).then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                    .expect("valid template"),
            );
            b.set_prefix(label.clone());
            b
        });
        PhaseProgress { bar, label, total, display, last_line: Instant::now(), lines: 0 }
    }

    /// `done` batches of the phase are done; `msg` says how it goes (rate, loss, accuracy);
    /// `left` is (the rest of the epoch, the rest of the run) in seconds.
    pub fn update(&mut self, done: usize, msg: &str, left: Option<(f64, f64)>) {
        let left_text = left.map(|(epoch, run)| format!("epoch left {}, run left {}", human(epoch), human(run)));
        match &self.bar {
            Some(b) => {
                b.set_position(done as u64);
                let run_left = left.map(|(_, run)| format!(" | run left {}", human(run))).unwrap_or_default();
                b.set_message(format!("{msg}{run_left}"));
            }
            None if self.display.quiet => {}
            None => {
                // a line every `every` seconds, and the phase's last one if it printed any
                let every = self.display.every.max(0.0);
                let due =
                    every == 0.0 || self.last_line.elapsed() >= Duration::from_secs_f64(every) || (done == self.total && self.lines > 0);
                if due {
                    let sep = if msg.is_empty() { "" } else { ": " };
                    let tail = left_text.map(|t| format!(" | {t}")).unwrap_or_default();
                    eprintln!("{} {} {done}/{} batches{sep}{msg}{tail}", timestamp(), self.label, self.total);
                    self.last_line = Instant::now();
                    self.lines += 1;
                }
            }
        }
    }

    /// A line of its own above the bar (or among the lines).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(4.4), "4s");
        assert_eq!(human(190.0), "3m10s");
        assert_eq!(human(7500.0), "2h05m");
        assert_eq!(human(3.0 * 86_400.0 + 4.0 * 3600.0 + 5.0), "3d04h");
        assert_eq!(human(f64::NAN), "?");
    }

    #[test]
    fn the_run_estimate_counts_every_epoch_and_the_evaluations() {
        // 3 epochs of 100 training and 50 evaluation samples
        let mut c = RunClock::new(3, 100, 50);
        assert!(c.left(Position::Train { epoch: 0, done: 0 }).is_none(), "no rate yet");
        c.trained(10, 1.0); // 0.1 s a training sample
                            // evaluation not measured yet: a third of a training sample's time
        let (epoch, run) = c.left(Position::Train { epoch: 0, done: 10 }).unwrap();
        let e = 0.1 / 3.0;
        assert!((epoch - (90.0 * 0.1 + 50.0 * e)).abs() < 1e-9);
        assert!((run - (epoch + 2.0 * (10.0 + 50.0 * e))).abs() < 1e-9);
        c.trained(90, 9.0);
        c.evaluated(50, 2.5); // 0.05 s an evaluation sample
        let (epoch, run) = c.left(Position::Eval { epoch: 1, done: 20 }).unwrap();
        assert!((epoch - 30.0 * 0.05).abs() < 1e-9);
        assert!((run - (epoch + 12.5)).abs() < 1e-9, "one more epoch of 10 s training and 2.5 s evaluation: {run}");
        assert_eq!(c.left(Position::Eval { epoch: 2, done: 50 }).unwrap(), (0.0, 0.0));
    }
}
