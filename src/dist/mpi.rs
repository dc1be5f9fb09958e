//! The MPI world (feature `distributed`): initialised once per process when a launcher started
//! it (`mpirun`, `mpiexec`, `srun`), finalised when dropped. Only the main thread calls MPI
//! (MPI_THREAD_FUNNELED): the loader's and rayon's threads never do.

use super::collective::{Collective, FailureNote};
use super::launch::local_rank_from_env;
use crate::error::{BackeiError, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// MPI counts are C ints: larger buffers travel in pieces of this many elements.
const CHUNK: usize = 1 << 28;

pub struct MpiWorld {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// This rank's index on its node and the number of ranks there.
    local_rank: usize,
    local_size: usize,
    /// Where `local_rank` came from (an environment variable or the shared-memory split).
    pub local_rank_source: &'static str,
    library: String,
    failure: FailureNote,
    // last: MPI_Finalize runs when the universe drops, after the communicators above
    _universe: Universe,
}

impl MpiWorld {
    /// MPI_Init_thread (funneled), the world's rank and size, and the rank's place on its node.
    pub fn init() -> Result<MpiWorld> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| BackeiError::Distributed("MPI was initialised twice in this process".into()))?;
        if threading < mpi::Threading::Funneled {
            return Err(BackeiError::Distributed(format!(
                "the MPI library offers thread level {threading:?}; backei needs MPI_THREAD_FUNNELED (its loader threads run beside the one thread that calls MPI)"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        // the ranks that share this node's memory: their count, and a local rank when the
        // launcher did not set one
        let node = world.split_shared(world.rank());
        let (local_rank, local_rank_source) = local_rank_from_env().unwrap_or((node.rank() as usize, "MPI shared-memory split"));
        let local_size = node.size() as usize;
        let library = mpi::environment::library_version()
            .ok()
            .and_then(|v| v.lines().next().and_then(|l| l.split(',').next()).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")))
            .unwrap_or_else(|| "MPI".into());
        Ok(MpiWorld {
            world,
            rank,
            size,
            local_rank,
            local_size,
            local_rank_source,
            library,
            failure: FailureNote::default(),
            _universe: universe,
        })
    }

    fn sum<T: Equivalence + Copy>(&self, values: &mut [T]) {
        for piece in values.chunks_mut(CHUNK) {
            let send = piece.to_vec();
            self.world.all_reduce_into(&send[..], piece, SystemOperation::sum());
        }
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    // MPI's default error handler (MPI_ERRORS_ARE_FATAL) ends the job on any MPI error, so the
    // calls below return only on success.
    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.sum(values);
        Ok(())
    }
    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.sum(values);
        Ok(())
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for piece in bytes.chunks_mut(CHUNK) {
            root.broadcast_into(piece);
        }
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn describe(&self) -> String {
        format!(
            "{} ranks ({}; this is rank {}, local rank {} of {} on its node)",
            self.size, self.library, self.rank, self.local_rank, self.local_size
        )
    }
    fn note_shared_failure(&self, report_here: bool) {
        self.failure.note(report_here);
    }
    fn shared_failure(&self) -> Option<bool> {
        self.failure.get()
    }
}
