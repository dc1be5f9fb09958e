//! Progress: an indicatif bar per epoch (samples/s, loss, running accuracy, ETA) when stderr is
//! a terminal; plain lines otherwise. The logs in the run folder are written either way.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct EpochProgress {
    bar: Option<ProgressBar>,
    total: usize,
    last_plain: std::time::Instant,
}

impl EpochProgress {
    pub fn new(epoch: usize, epochs: usize, batches: usize, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(batches as u64);
            b.set_style(
                ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                    .expect("valid template"),
            );
            b.set_prefix(format!("{}/{epochs}", epoch + 1));
            b
        });
        EpochProgress { bar, total: batches, last_plain: std::time::Instant::now() }
    }

    pub fn update(&mut self, done: usize, samples_per_s: f64, loss: f64, accuracy: f64) {
        let msg = format!("{samples_per_s:.0} samples/s loss {loss:.4} acc {:.2}%", accuracy * 100.0);
        match &self.bar {
            Some(b) => {
                b.set_position(done as u64);
                b.set_message(msg);
            }
            None if self.last_plain.elapsed().as_secs() >= 30 => {
                eprintln!("  batch {done}/{}: {msg}", self.total);
                self.last_plain = std::time::Instant::now();
            }
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
