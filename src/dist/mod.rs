//! Data-parallel training across processes, GPUs and machines, as Horovod and PyTorch's
//! DistributedDataParallel do it: the same program on every rank, started by `mpirun` or `srun`;
//! MPI for the rendezvous and the small agreements; the gradients summed by NCCL on GPU ranks and
//! by MPI on CPU ranks; every rank taking the same optimizer step. `docs/distributed.md` is the
//! user's guide and the scaling model.
//!
//! - [`collective`]: the operations a run needs, behind one trait; [`collective::Solo`] is the
//!   world of one process (every build), `mpi::MpiWorld` the MPI world (feature `distributed`).
//! - [`launch`]: whether a launcher started this process, the local rank, the rank's GPU.
//! - [`team`]: the step protocol the training loop runs (shards, agreement, reduction).
//! - [`buckets`]: which gradient ranges are reduced together, in which order.
//! - [`cli`]: the command line's side: rank 0 decides, errors end every rank, a GPU per rank.
//! - `nccl` (feature `nccl`): NCCL loaded at run time, the bucketed all-reduce.
//!
//! Semantics (those of PyTorch DDP with a DistributedSampler): `--batch-size` is the global
//! batch; every rank walks the same epoch order and takes a contiguous, disjoint share of each
//! batch; the gradients are those of the global batch's mean loss; evaluation is sharded the same
//! way and its sums reduced; rank 0's parameters and optimizer state reach every rank at the
//! start; only rank 0 writes the run folder.

pub mod buckets;
pub mod cli;
pub mod collective;
pub mod launch;
#[cfg(feature = "distributed")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod team;

pub use collective::{Collective, Solo};
pub use team::{fingerprint, ReducerKind, StepReport, Team};

use crate::error::Result;

/// The world this process belongs to: MPI's when a parallel launcher started it (and backei
/// was built with `distributed`), else a world of one. A launcher starting several processes of
/// a build without MPI is an error: each would train alone and write the same run folder.
pub fn init() -> Result<Box<dyn Collective>> {
    let Some(var) = launch::launcher_variable() else {
        return Ok(Box::new(Solo::default()));
    };
    #[cfg(feature = "distributed")]
    {
        let _ = var;
        Ok(Box::new(mpi::MpiWorld::init()?))
    }
    #[cfg(not(feature = "distributed"))]
    {
        let size = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
            .into_iter()
            .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse::<usize>().ok()));
        if size.is_some_and(|n| n > 1) {
            return Err(crate::error::BackeiError::Distributed(format!(
                "started by a parallel launcher ({var} is set) with {} processes, but this backei was built without the `distributed` feature, so each would train alone: rebuild with `cargo build --release --features distributed` (needs an MPI and libclang), or start one process",
                size.unwrap_or(0)
            )));
        }
        Ok(Box::new(Solo::default()))
    }
}
