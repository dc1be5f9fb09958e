//! Will a setting fit? The memory a training run needs, from the memory plan, against what the
//! machine has (host: the kernel's available memory, the cgroup's limit under SLURM, Kubernetes
//! or Docker, and the address-space limit; device: the GPU's free memory), checked before any of
//! it is allocated, so that `--batch-size 1000000000` is an error that says what fits instead of
//! an aborted allocation.

use crate::error::{config_err, Result};
use crate::gpu::memory::{buffer_plan, MemoryPlan, StepSettings};
use crate::spec::NetworkSpec;

/// Bytes as people read them (GiB, TiB, …).
pub fn human(bytes: u128) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The host memory this process can still allocate: the least of the kernel's `MemAvailable`,
/// the room left under the cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) and under
/// `RLIMIT_AS`. None where none of them can be read (then nothing is checked).
pub fn host_available() -> Option<u64> {
    let mut least: Option<u64> = None;
    let mut take = |v: u64| least = Some(least.map_or(v, |l| l.min(v)));
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(kb) = text
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            take(kb.saturating_mul(1024));
        }
    }
    // cgroup v2: the process's own group (`0::/path` in /proc/self/cgroup)
    if let Some(group) =
        std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)))
    {
        let dir = format!("/sys/fs/cgroup{}", group.trim_end_matches('/'));
        if let (Some(max), Some(cur)) = (read_u64(&format!("{dir}/memory.max")), read_u64(&format!("{dir}/memory.current"))) {
            take(max.saturating_sub(cur));
        }
    }
    // cgroup v1
    if let (Some(max), Some(cur)) =
        (read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes"), read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes"))
    {
        if max < (1 << 60) {
            take(max.saturating_sub(cur));
        }
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
        let pages =
            std::fs::read_to_string("/proc/self/statm").ok().and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0);
        take((lim.rlim_cur as u64).saturating_sub(pages * 4096));
    }
    least
}

/// An error unless `bytes` of host memory are available (`what` names what they are for and
/// `fix` how to need less). Passes when availability cannot be read.
pub fn ensure_host(bytes: u128, what: &str, fix: &str) -> std::result::Result<(), String> {
    match host_available() {
        Some(avail) if bytes > avail as u128 => {
            Err(format!("{what} needs {} of host memory, but {} is available; {fix}", human(bytes), human(avail as u128)))
        }
        _ => Ok(()),
    }
}

/// What a training run at a batch size and T needs: the network's state (the memory plan; on the
/// device for the GPU engine, in host memory for the CPU engine, which holds the same state) and
/// the loader's batch buffers (host memory, page-locked on the GPU engine).
#[derive(Clone, Debug)]
pub struct RunNeeds {
    pub plan: MemoryPlan,
    pub loader: u128,
}

/// Batch buffers a loader keeps: its prefetch queue, one per worker being filled, one in use.
fn loader_buffers(prefetch: usize, workers: usize) -> u128 {
    (prefetch.max(2) + workers.max(1) + 1) as u128
}

/// The memory a training run needs (an error where the sizes overflow 64 bits).
/// `settings`: the GPU engine's, or for the CPU engine (which holds the same state) any.
pub fn run_needs(
    spec: &NetworkSpec,
    batch: usize,
    steps: usize,
    t_in: usize,
    prefetch: usize,
    workers: usize,
    settings: &StepSettings,
) -> Result<RunNeeds> {
    let plan = buffer_plan(spec, batch, steps, t_in, settings)?.memory();
    let per_batch = 4u128 * t_in as u128 * batch as u128 * spec.input.iter().map(|&d| d as u128).product::<u128>();
    Ok(RunNeeds { plan, loader: per_batch * loader_buffers(prefetch, workers) })
}

/// Where the network's state lives and how much room there is.
pub struct Room {
    /// Free device memory (the GPU engine), None for the CPU engine.
    pub device_free: Option<u64>,
    /// Available host memory (None: unknown, nothing is checked against it).
    pub host: Option<u64>,
}

impl RunNeeds {
    fn fits(&self, room: &Room) -> bool {
        let net = self.plan.total() as u128;
        match room.device_free {
            Some(dev) => net <= dev as u128 && room.host.is_none_or(|h| self.loader <= h as u128),
            None => room.host.is_none_or(|h| net + self.loader <= h as u128),
        }
    }
}

/// Checks that a training run of `spec` at `batch` and T = `steps` (input frames `t_in`) fits
/// `room` under `settings` (see `run_needs`); if not, the error says what it needs, what there is, and the largest batch and T that
/// fit.
#[allow(clippy::too_many_arguments)]
pub fn check_run(
    spec: &NetworkSpec,
    batch: usize,
    steps: usize,
    t_in_is_t: bool,
    prefetch: usize,
    workers: usize,
    room: &Room,
    settings: &StepSettings,
) -> Result<()> {
    let t_in = |t: usize| if t_in_is_t { t } else { 1 };
    let needs = |b: usize, t: usize| run_needs(spec, b, t, t_in(t), prefetch, workers, settings);
    let fits = |b: usize, t: usize| needs(b, t).is_ok_and(|n| n.fits(room));
    let n = match needs(batch, steps) {
        Ok(n) => n,
        Err(crate::BackeiError::Config { problem, .. }) => {
            return Err(config_err("--batch-size/--steps", format!("{problem}; {}", suggestion(batch, steps, &fits))))
        }
        Err(e) => return Err(e),
    };
    if n.fits(room) {
        return Ok(());
    }
    let (place, has) = match room.device_free {
        Some(d) => ("device", d),
        None => ("host", room.host.unwrap_or(0)),
    };
    let needed = if room.device_free.is_some() { n.plan.total() as u128 } else { n.plan.total() as u128 + n.loader };
    let loader = if room.device_free.is_some() {
        format!(
            " (and {} of host memory for the loader's batch buffers, {} available)",
            human(n.loader),
            room.host.map_or("?".into(), |h| human(h as u128))
        )
    } else {
        format!(" ({} for the network's state, {} for the loader's batch buffers)", human(n.plan.total() as u128), human(n.loader))
    };
    let mut advice = suggestion(batch, steps, &fits);
    if room.device_free.is_some() {
        if let Some(r) = recompute_that_fits(settings, steps, &|s: &StepSettings| {
            run_needs(spec, batch, steps, t_in(steps), prefetch, workers, s).is_ok_and(|n| n.fits(room))
        }) {
            advice = format!("{advice}; or keep batch {batch} and T = {steps} with {r}");
        }
    }
    Err(config_err(
        "--batch-size/--steps",
        format!(
            "batch {batch} at T = {steps}: a training step needs {} of {place} memory{loader}, but {} is free; {advice}",
            human(needed),
            human(has as u128),
        ),
    ))
}

/// On the GPU, the setting that keeps the batch and T and fits: `--recompute K` with the largest K
/// (the least recomputation) — on the GEMMs asked for, else on the tensor-core GEMMs (fp32 on
/// cuBLAS otherwise: no column buffer, and their convolutions before the BackEI layers run per
/// window). None when the run already recomputes or no K fits.
fn recompute_that_fits(settings: &StepSettings, steps: usize, fits: &dyn Fn(&StepSettings) -> bool) -> Option<String> {
    use crate::gpu::gemm_tc::FeedForward;
    if settings.recompute.is_some() {
        return None;
    }
    let largest = |s: &StepSettings| (1..steps).rev().find(|&k| fits(&StepSettings { recompute: Some(k), ..*s }));
    if let Some(k) = largest(settings) {
        return Some(format!("--recompute {k} (the same gradients, part of the forward run twice)"));
    }
    if settings.feedforward == FeedForward::Cublas {
        let tc = StepSettings { feedforward: FeedForward::TensorCore(settings.precision), ..*settings };
        if let Some(k) = largest(&tc) {
            return Some(format!("--recompute {k} and BACKEI_FEEDFORWARD=tc (the same gradients, part of the forward run twice)"));
        }
    }
    None
}

/// "the largest batch that fits at T = …", "the largest T that fits at batch …".
fn suggestion(batch: usize, steps: usize, fits: &dyn Fn(usize, usize) -> bool) -> String {
    let largest = |hi: usize, ok: &dyn Fn(usize) -> bool| -> Option<usize> {
        if !ok(1) {
            return None;
        }
        let (mut lo, mut hi) = (1usize, hi.max(1));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if ok(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Some(lo)
    };
    let mut parts = Vec::new();
    if let Some(b) = largest(batch, &|b| fits(b, steps)) {
        parts.push(format!("at T = {steps} the largest batch that fits is {b} (--batch-size {b})"));
    }
    if let Some(t) = largest(steps, &|t| fits(batch, t)) {
        parts.push(format!("at batch {batch} the largest T that fits is {t} (--steps {t})"));
    }
    if parts.is_empty() {
        match largest(batch.min(steps), &|x| fits(x, x)) {
            Some(x) => parts.push(format!("batch {x} at T = {x} fits")),
            None => parts.push("not even batch 1 at T = 1 fits".into()),
        }
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(human(5 << 40), "5.0 TiB");
    }

    #[test]
    fn what_fits_is_found_and_fits() {
        let spec = NetworkSpec::mnist();
        let settings = StepSettings::cpu_proxy();
        let room = Room { device_free: None, host: Some(4 << 30) };
        let e = check_run(&spec, 1_000_000_000, 4, false, 4, 2, &room, &settings).unwrap_err().to_string();
        assert!(e.contains("largest batch that fits is"), "{e}");
        let b: usize = e.split("--batch-size ").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
        check_run(&spec, b, 4, false, 4, 2, &room, &settings).unwrap();
        assert!(check_run(&spec, b + 1, 4, false, 4, 2, &room, &settings).is_err());
        // the GPU engine: the state on the device, the buffers on the host
        let gpu = Room { device_free: Some(1 << 30), host: Some(64 << 30) };
        let e = check_run(&spec, 100, 1_000_000, true, 4, 2, &gpu, &settings).unwrap_err().to_string();
        assert!(e.contains("device memory") && e.contains("largest T that fits"), "{e}");
        // sizes past 64 bits are an error, not a wrapped small number
        let e = check_run(&spec, usize::MAX, usize::MAX / 2, true, 4, 2, &room, &settings).unwrap_err().to_string();
        assert!(e.contains("64 bits"), "{e}");
    }

    /// On the GPU, a run that does not fit also hears which `--recompute K` keeps its batch and T
    /// (the largest K that fits), and when only the tensor-core GEMMs make it fit, that too: the
    /// setting named fits, and K + 1 does not.
    #[test]
    fn a_run_that_does_not_fit_the_gpu_hears_which_recompute_fits() {
        use crate::gpu::gemm_tc::FeedForward;
        let spec = NetworkSpec::cifar10();
        let v1 = StepSettings::cpu_proxy();
        let host = Some(64u64 << 30);
        // (free device memory, whether only the tensor-core GEMMs fit)
        for (free, tc_only) in [(6u64 << 30, false), (4u64 << 30, true)] {
            let room = Room { device_free: Some(free), host };
            let e = check_run(&spec, 100, 20, false, 4, 2, &room, &v1).unwrap_err().to_string();
            let k: usize = e
                .split("--recompute ")
                .nth(1)
                .unwrap_or_else(|| panic!("{e}"))
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(e.contains("BACKEI_FEEDFORWARD=tc"), tc_only, "{e}");
            let ff = if tc_only { FeedForward::TensorCore(crate::Precision::Fp32) } else { FeedForward::Cublas };
            let with = |k: usize| StepSettings { recompute: Some(k), feedforward: ff, ..v1 };
            check_run(&spec, 100, 20, false, 4, 2, &room, &with(k)).unwrap_or_else(|e| panic!("K = {k}: {e}"));
            assert!(k + 1 >= 20 || check_run(&spec, 100, 20, false, 4, 2, &room, &with(k + 1)).is_err(), "K = {k} is the largest");
            println!("{}: {e}", free >> 20);
        }
        // already recomputing: nothing more to say about it
        let room = Room { device_free: Some(1 << 30), host };
        let e = check_run(&spec, 100, 20, false, 4, 2, &room, &StepSettings { recompute: Some(2), ..v1 }).unwrap_err().to_string();
        assert!(!e.contains("keep batch"), "{e}");
    }
}
