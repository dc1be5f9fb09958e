//! Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes, `timeout` and
//! `kill` send) both ask the training loop to finish its step, write `checkpoint-last` and exit
//! (130 after SIGINT, 143 after SIGTERM: 128 + the signal's number, as a shell reports it).
//! A second signal exits at once, without a checkpoint.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// The signals that stop a run, watched by a background thread.
pub struct StopSignals {
    /// Set on the first signal; the training loop polls it.
    pub flag: Arc<AtomicBool>,
    received: Arc<AtomicI32>,
}

/// The exit status of a process stopped by signal `sig` (the shell's convention).
pub fn exit_code(sig: i32) -> u8 {
    (128 + sig).clamp(0, 255) as u8
}

fn name(sig: i32) -> &'static str {
    match sig {
        signal_hook::consts::SIGINT => "Ctrl-C (SIGINT)",
        signal_hook::consts::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

impl StopSignals {
    /// Starts watching SIGINT and SIGTERM.
    pub fn install() -> std::io::Result<StopSignals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let flag = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicI32::new(0));
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let (f, r) = (flag.clone(), received.clone());
        std::thread::Builder::new().name("stop-signals".into()).spawn(move || {
            for sig in signals.forever() {
                if f.swap(true, Ordering::SeqCst) {
                    eprintln!("\nsecond signal ({}): exiting without a checkpoint", name(sig));
                    std::process::exit(exit_code(sig) as i32);
                }
                r.store(sig, Ordering::SeqCst);
                eprintln!("\n{}: finishing the current step and writing a checkpoint (send it again to exit at once)", name(sig));
            }
        })?;
        Ok(StopSignals { flag, received })
    }

    /// The first signal received (None: none, or the stop came from elsewhere).
    pub fn received(&self) -> Option<i32> {
        Some(self.received.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }

    /// The exit status for a run stopped by the flag: 128 + the signal, 130 if none was received
    /// (the test hook BACKEI_INTERRUPT_AFTER_BATCHES acts as Ctrl-C).
    pub fn exit_code(&self) -> u8 {
        exit_code(self.received().unwrap_or(signal_hook::consts::SIGINT))
    }
}
