//! The collective operations data-parallel training needs, behind one trait: [`Solo`] (a world
//! of one process, always built) and `dist::mpi::MpiWorld` (feature `distributed`).

use crate::error::Result;
use std::sync::atomic::{AtomicU8, Ordering};

/// A group of processes ("ranks") that take part in every call together: each collective call
/// must be made by every rank, in the same order, with buffers of the same length.
pub trait Collective {
    /// This process's rank, 0..size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// This rank's index among the ranks on its node (it picks the GPU), and their number.
    fn local_rank(&self) -> usize;
    fn local_size(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank gets the same result.
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Element-wise sum over all ranks, in place (the CPU engine's gradients).
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    /// Rank 0's `bytes` to every rank: the others' are replaced (their length need not match).
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Ends every rank at once (MPI_Abort): for an error the other ranks cannot know about,
    /// which would otherwise leave them waiting in their next collective call for ever.
    fn abort(&self, code: i32) -> !;
    /// One line for the log and config.json: how many ranks, which library.
    fn describe(&self) -> String;
    /// Records that the error this process is about to return is known to every rank (they
    /// all stop together), so ending the run needs no abort; `report_here`: this rank is the one
    /// to print it (its own error, or rank 0 for an error every rank has), the others keep quiet.
    /// The first call counts.
    fn note_shared_failure(&self, report_here: bool);
    /// Some(report_here) once a shared failure was noted.
    fn shared_failure(&self) -> Option<bool>;
}

/// A once-settable record of a shared failure, for the worlds' implementations.
#[derive(Debug, Default)]
pub struct FailureNote(AtomicU8);

impl FailureNote {
    pub fn note(&self, report_here: bool) {
        let _ = self.0.compare_exchange(0, 1 + report_here as u8, Ordering::SeqCst, Ordering::SeqCst);
    }
    pub fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            v => Some(v == 2),
        }
    }
}

/// The world of a single process: every collective is the identity.
#[derive(Debug, Default)]
pub struct Solo {
    failure: FailureNote,
}

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        1
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "1 process".into()
    }
    fn note_shared_failure(&self, report_here: bool) {
        self.failure.note(report_here);
    }
    fn shared_failure(&self) -> Option<bool> {
        // a single process: whatever it knows, everyone knows, and it reports it
        Some(self.failure.get().unwrap_or(true))
    }
}
