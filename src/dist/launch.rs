//! How this process was started: by a parallel launcher (`mpirun`/`mpiexec` of Open MPI or
//! MPICH, Slurm's `srun`) or by hand, and which GPU of its node a rank takes.

/// The environment variable that shows a parallel launcher started this process, if any.
/// Open MPI's mpirun sets OMPI_COMM_WORLD_SIZE, MPICH's Hydra PMI_SIZE/PMI_RANK, PMIx-based
/// launchers PMIX_RANK, and srun SLURM_STEP_ID (not set in an sbatch script itself, which is
/// one process).
pub fn launcher_variable() -> Option<&'static str> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "SLURM_STEP_ID"].into_iter().find(|v| std::env::var_os(v).is_some())
}

/// This rank's index among the ranks of its node, as the launcher told it: Open MPI
/// (OMPI_COMM_WORLD_LOCAL_RANK), Slurm (SLURM_LOCALID), MPICH (MPI_LOCALRANKID). None when no
/// launcher said; then `dist::mpi` asks MPI (the rank inside a shared-memory split of the world).
pub fn local_rank_from_env() -> Option<(usize, &'static str)> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse().ok()).map(|n| (n, v)))
}

/// The GPU a rank takes: the one `--device cuda:N` names, else its local rank modulo the GPUs
/// the node shows it (one each when the launcher sets CUDA_VISIBLE_DEVICES per rank, as
/// `srun --gpus-per-task=1` does).
pub fn gpu_for_rank(explicit: Option<usize>, local_rank: usize, visible_gpus: usize) -> usize {
    match explicit {
        Some(n) => n,
        None => local_rank % visible_gpus.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_spread_over_the_gpus_of_their_node() {
        assert_eq!((0..4).map(|r| gpu_for_rank(None, r, 4)).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(gpu_for_rank(None, 5, 4), 1);
        assert_eq!(gpu_for_rank(None, 3, 1), 0, "one visible GPU per rank");
        assert_eq!(gpu_for_rank(Some(2), 0, 4), 2, "an explicit cuda:N wins");
        assert_eq!(gpu_for_rank(None, 1, 0), 0);
    }
}
