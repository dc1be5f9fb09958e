//! The command line's side of a data-parallel run (anyhow, as at the binary's edge): rank 0
//! decides what the run is, every rank learns it, and an error no other rank knows about ends
//! them all instead of leaving them waiting.

use super::collective::Collective;
use super::launch::gpu_for_rank;
use crate::gpu::DeviceChoice;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::process::ExitCode;

#[derive(Serialize, Deserialize)]
enum Decision<S> {
    Go(S),
    Stop { message: String, usage: bool },
}

/// Runs `decide` on rank 0 only and gives every rank its shared part `S` (rank 0 keeps its
/// private part `P` too: a resumed checkpoint, say, which reaches the others later as
/// parameters). When rank 0 fails, every rank fails: rank 0 with its error, the others with one
/// saying so, made by `usage_error` when `is_usage` classed rank 0's error as a usage error.
pub fn decided_by_lead<S, P>(
    world: &dyn Collective,
    decide: impl FnOnce() -> anyhow::Result<(S, P)>,
    is_usage: impl Fn(&anyhow::Error) -> bool,
    usage_error: impl Fn(String) -> anyhow::Error,
) -> anyhow::Result<(S, Option<P>)>
where
    S: Serialize + DeserializeOwned,
{
    if world.size() == 1 {
        return decide().map(|(s, p)| (s, Some(p)));
    }
    let mut bytes = Vec::new();
    let mut mine = None;
    if world.rank() == 0 {
        let decision = match decide() {
            Ok((s, p)) => {
                let d = serde_json::to_vec(&Decision::Go(&s))?;
                mine = Some(Ok((s, Some(p))));
                d
            }
            Err(e) => {
                let d = serde_json::to_vec(&Decision::<()>::Stop { message: format!("{e:#}"), usage: is_usage(&e) })?;
                mine = Some(Err(e));
                d
            }
        };
        bytes = decision;
    }
    world.broadcast(&mut bytes)?;
    if let Some(result) = mine {
        if result.is_err() {
            world.note_shared_failure(true);
        }
        return result;
    }
    match serde_json::from_slice::<Decision<S>>(&bytes)? {
        Decision::Go(s) => Ok((s, None)),
        Decision::Stop { message, usage } => {
            world.note_shared_failure(false);
            let text = format!("rank 0 could not start the run: {message}");
            Err(if usage { usage_error(text) } else { anyhow::anyhow!(text) })
        }
    }
}

/// `result` on every rank when it is Ok on every rank; else every rank fails.
pub fn all_ok<T>(world: &dyn Collective, result: anyhow::Result<T>, during: &str) -> anyhow::Result<T> {
    if world.size() == 1 {
        return result;
    }
    let failed = result.is_err() as u8 as f64;
    let mut v = [failed, failed * (world.rank() + 1) as f64];
    world.sum_f64(&mut v)?;
    if v[0] > 0.0 {
        world.note_shared_failure(result.is_err());
        return match result {
            Err(e) => Err(e),
            Ok(_) if v[0] == 1.0 => Err(anyhow::anyhow!("rank {} failed {during} (its error is in its output)", v[1] as usize - 1)),
            Ok(_) => Err(anyhow::anyhow!("{} ranks failed {during} (their errors are in their output)", v[0])),
        };
    }
    result
}

/// The end of a rank's command. One process: `result` as it is. A rank of several: an error
/// the other ranks do not know about aborts the whole job (MPI_Abort), since they would wait for
/// this rank for ever; otherwise the error is printed here, by the rank it concerns (`error:
/// rank r of N: ...`), and every rank waits for the others before MPI is finalised: the launcher
/// ends a job when its first process exits with a non-zero status, and rank 0 may still be
/// writing the checkpoint then. `exit_code` gives an error's exit status.
pub fn finish(
    world: Box<dyn Collective>,
    result: anyhow::Result<ExitCode>,
    exit_code: impl Fn(&anyhow::Error) -> u8,
) -> anyhow::Result<ExitCode> {
    if world.size() == 1 {
        return result;
    }
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let e = e.context(format!("rank {} of {}", world.rank(), world.size()));
            match world.shared_failure() {
                None => {
                    eprintln!("error: {e:#}\nrank {} is ending every rank (MPI_Abort): the others cannot know of this error", world.rank());
                    world.abort(1);
                }
                Some(report_here) => {
                    if report_here || world.rank() == 0 {
                        eprintln!("error: {e:#}");
                    }
                    ExitCode::from(exit_code(&e))
                }
            }
        }
    };
    // every rank is done (rank 0's files written, its messages printed) before any exits
    let mut nothing = [0.0];
    world.sum_f64(&mut nothing)?;
    drop(world); // MPI_Finalize
    Ok(code)
}

/// The engine a rank asks for: `--device auto` or `cuda` give rank r the GPU of its local rank
/// (modulo the GPUs it sees); `cuda:N` is taken as given; `cpu` is the CPU. Ranks that
/// outnumber their node's GPUs are refused: NCCL needs a GPU of its own for each rank.
pub fn device_for_rank(device: &str, world: &dyn Collective) -> Result<DeviceChoice, String> {
    let choice: DeviceChoice = device.parse()?;
    if world.size() == 1 || choice == DeviceChoice::Cpu || device.starts_with("cuda:") {
        return Ok(choice);
    }
    let gpus = if crate::gpu::device::driver_present() {
        cudarc::driver::result::init().ok().and_then(|_| cudarc::driver::CudaContext::device_count().ok()).unwrap_or(0).max(0) as usize
    } else {
        0
    };
    if gpus == 0 {
        return match choice {
            DeviceChoice::Auto => Ok(DeviceChoice::Cpu),
            _ => Err(format!("--device {device}: rank {} sees no GPU", world.rank())),
        };
    }
    if world.local_size() > gpus {
        return Err(format!(
            "{} ranks run on this node but it shows {gpus} GPU(s): NCCL needs one GPU per rank; start at most {gpus} rank(s) per node (mpirun --map-by ppr:{gpus}:node, srun --ntasks-per-node={gpus}) or train on the CPU (--device cpu)",
            world.local_size()
        ));
    }
    Ok(DeviceChoice::Cuda(gpu_for_rank(None, world.local_rank(), gpus)))
}
