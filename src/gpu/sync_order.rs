//! The memory ordering of the persistent kernels' cross-block synchronisation, read off the PTX
//! NVRTC produces for a module instance — what ptxas assembles and the GPU runs. The CPU emulator
//! runs blocks as threads of one process whose fences are no-ops (`tests/emu/cuda_emu.h`), so it
//! shows a missing wait (`V4_SYNC_UNORDERED`), never a missing fence; this check is where a missing
//! fence shows without a GPU.
//!
//! The protocol (cuda/v4/sync.cuh's neighbour flags, backei_common.cuh's grid barrier; cooperative
//! groups' grid sync is built the same way):
//! - **release**: the block's writes of a phase, `bar.sync` (every thread of the block has made
//!   them), `membar.gl` (they are visible at GPU scope before what follows), then the arrival —
//!   `atom.global.exch` of the block's flag, or `atom.global.add` on the barrier word;
//! - **acquire**: a poll with `ld.volatile.global` until the partner's flag (or the barrier's
//!   phase bit) says it has arrived, then `membar.gl` (no later read moves above the poll), then
//!   `bar.sync` (the block's other threads wait for the poller before they read).
//!
//! The check reads each kernel's instructions in program order (the code around these operations
//! is straight-line but for the spin loops), so it says whether the fences are there, in the
//! order the protocol needs; it cannot prove the protocol right (the emulator's stalled-block tests
//! and a GPU run do that).

/// What one kernel of a PTX module does to synchronise with other blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSync {
    pub kernel: String,
    /// `atom.global.exch` (a flag published) and integer `atom.global.add` (a barrier arrival).
    pub exchanges: usize,
    pub adds: usize,
    /// `ld.volatile.global`: polls of a flag or barrier word.
    pub polls: usize,
    /// Arrivals without a release before them, polls without an acquire after them.
    pub problems: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Barrier,
    Fence,
    Arrive,
    Poll,
    Other,
}

fn classify(instr: &str) -> Op {
    // (a guard predicate, `@%p1 ` or `@!%p1 `, does not change what the instruction is)
    let body = match instr.strip_prefix('@') {
        Some(rest) => rest.split_once(char::is_whitespace).map_or("", |(_, b)| b.trim_start()),
        None => instr,
    };
    let op = body.split(|c: char| c.is_whitespace() || c == ';').next().unwrap_or("");
    if op.starts_with("bar.sync") || op.starts_with("barrier.sync") || op == "bar.red.and.pred" {
        Op::Barrier
    } else if matches!(op, "membar.gl" | "membar.sys" | "fence.sc.gpu" | "fence.acq_rel.gpu" | "fence.sc.sys" | "fence.acq_rel.sys") {
        Op::Fence
    } else if (op.starts_with("atom.global.exch")
        || op.starts_with("atom.exch")
        || op.starts_with("atom.global.add")
        || op.starts_with("atom.add"))
        && !op.ends_with(".f32")
        && !op.ends_with(".f64")
        && !op.ends_with(".f16")
    {
        Op::Arrive
    } else if op.starts_with("ld.volatile.global") || op.starts_with("ld.volatile.u") || op.starts_with("ld.volatile.b") {
        Op::Poll
    } else {
        Op::Other
    }
}

/// The instructions of each `.entry` of a PTX module: (kernel, instruction lines), directives,
/// labels, comments and braces left out.
fn entries(ptx: &str) -> Vec<(String, Vec<&str>)> {
    let mut out: Vec<(String, Vec<&str>)> = Vec::new();
    for line in ptx.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix(".visible .entry ").or_else(|| t.strip_prefix(".entry ")) {
            let name = rest.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap_or("").to_string();
            out.push((name, Vec::new()));
            continue;
        }
        let Some((_, instrs)) = out.last_mut() else { continue };
        if t.is_empty() || t.starts_with('.') || t.starts_with("//") || t.starts_with('$') || t.starts_with('{') || t.starts_with('}') {
            continue;
        }
        instrs.push(t);
    }
    out
}

/// Every kernel's synchronisation operations and whether each arrival is released and each poll
/// acquired in program order (module docs).
pub fn kernel_sync(ptx: &str) -> Vec<KernelSync> {
    entries(ptx)
        .into_iter()
        .map(|(kernel, instrs)| {
            let ops: Vec<Op> = instrs.iter().map(|i| classify(i)).collect();
            let mut k = KernelSync { kernel: kernel.clone(), ..Default::default() };
            for (i, &op) in ops.iter().enumerate() {
                match op {
                    Op::Arrive => {
                        if instrs[i].contains("exch") {
                            k.exchanges += 1;
                        } else {
                            k.adds += 1;
                        }
                        // back from the arrival: a fence before any barrier, and a barrier before
                        // that fence with no other arrival between
                        let fence = (0..i).rev().find(|&j| matches!(ops[j], Op::Fence | Op::Barrier | Op::Arrive));
                        let released = match fence {
                            Some(f) if ops[f] == Op::Fence => {
                                (0..f).rev().find(|&j| matches!(ops[j], Op::Barrier | Op::Arrive)).is_some_and(|b| ops[b] == Op::Barrier)
                            }
                            _ => false,
                        };
                        if !released {
                            k.problems.push(format!(
                                "{kernel}: `{}` (instruction {i}) is not released: it needs bar.sync, then membar.gl, before it \
                                 (the block's writes visible at GPU scope before its arrival)",
                                instrs[i]
                            ));
                        }
                    }
                    Op::Poll => {
                        k.polls += 1;
                        // on from the poll: a fence before the next barrier, and that barrier
                        let next = (i + 1..ops.len()).find(|&j| matches!(ops[j], Op::Fence | Op::Barrier));
                        let acquired = match next {
                            Some(f) if ops[f] == Op::Fence => (f + 1..ops.len()).any(|j| ops[j] == Op::Barrier),
                            _ => false,
                        };
                        if !acquired {
                            k.problems.push(format!(
                                "{kernel}: `{}` (instruction {i}) is not acquired: it needs membar.gl, then bar.sync, after it \
                                 (no read of the partner's data may move above the poll)",
                                instrs[i]
                            ));
                        }
                    }
                    _ => {}
                }
            }
            k
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape NVRTC gives the neighbour flags (sync.cuh's phase_done) and the grid barrier,
    // trimmed: release, then the poll loop and the acquire.
    const FLAGS: &str = "
.visible .entry k_flags(
	.param .u64 k_param_0
)
{
	bar.sync 	0;
	@%p158 bra 	$L__BB0_534;
	membar.gl;
	mov.u32 	%r1697, %ctaid.x;
	atom.global.exch.b32 	%r1698, [%rd731], %r2758;
$L__BB0_534:
	ld.volatile.global.u32 	%r1699, [%rd132];
	@%p672 bra 	$L__BB0_538;
$L__BB0_537:
	nanosleep.u32 %r1700;
	ld.volatile.global.u32 	%r1701, [%rd132];
	@%p673 bra 	$L__BB0_537;
$L__BB0_538:
	membar.gl;
	bar.sync 	0;
	atom.global.max.u32 	%r1, [%rd2], %r3;
	atom.global.add.f32 	%f1, [%rd2], %f3;
	bar.sync 	0;
	membar.gl;
	atom.global.add.u32 	%r64, [%rd3], %r843;
	ld.volatile.global.u32 	%r844, [%rd3];
	membar.gl;
	bar.sync 	0;
	ret;
}
";

    #[test]
    fn the_kernels_release_and_acquire_pass() {
        let k = kernel_sync(FLAGS);
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].kernel, "k_flags");
        assert_eq!((k[0].exchanges, k[0].adds, k[0].polls), (1, 1, 3), "atom.max and float adds are not arrivals");
        assert!(k[0].problems.is_empty(), "{:?}", k[0].problems);
    }

    /// FLAGS with `from` replaced by `to` (once; it must occur).
    fn edited(from: &str, to: &str) -> String {
        assert!(FLAGS.contains(from), "{from:?}");
        FLAGS.replacen(from, to, 1)
    }

    #[test]
    fn a_missing_or_misplaced_fence_is_named() {
        // the release's fence gone
        let k = kernel_sync(&edited("membar.gl;\n\tmov.u32", "mov.u32"));
        assert_eq!(k[0].problems.len(), 1, "{:?}", k[0].problems);
        assert!(k[0].problems[0].contains("atom.global.exch") && k[0].problems[0].contains("not released"), "{:?}", k[0].problems);
        // the fence before the block's barrier instead of after it: the other threads' writes
        // are not ordered by it
        let k = kernel_sync(&edited(
            "bar.sync \t0;\n\t@%p158 bra \t$L__BB0_534;\n\tmembar.gl;",
            "membar.gl;\n\tbar.sync \t0;\n\t@%p158 bra \t$L__BB0_534;",
        ));
        assert!(k[0].problems.iter().any(|p| p.contains("atom.global.exch") && p.contains("not released")), "{:?}", k[0].problems);
        // no barrier before the release at all (the first arrival of the kernel)
        let k = kernel_sync(&edited("bar.sync \t0;\n\t@%p158", "@%p158"));
        assert!(k[0].problems.iter().any(|p| p.contains("atom.global.exch") && p.contains("not released")), "{:?}", k[0].problems);
        // the acquire's fence gone: both polls of the flag are named
        let k = kernel_sync(&edited("$L__BB0_538:\n\tmembar.gl;\n", "$L__BB0_538:\n"));
        assert_eq!(k[0].problems.iter().filter(|p| p.contains("not acquired")).count(), 2, "{:?}", k[0].problems);
        // the grid barrier's poll with no fence and barrier after it
        let k = kernel_sync(&edited("membar.gl;\n\tbar.sync \t0;\n\tret;", "ret;"));
        assert!(k[0].problems.iter().any(|p| p.contains("%r844") && p.contains("not acquired")), "{:?}", k[0].problems);
    }

    #[test]
    fn predicates_and_generic_atomics_are_read() {
        assert_eq!(classify("@%p1 atom.global.exch.b32 %r1, [%rd1], %r2;"), Op::Arrive);
        assert_eq!(classify("@!%p1 atom.exch.b32 %r1, [%rd1], %r2;"), Op::Arrive);
        assert_eq!(classify("atom.global.add.f32 %f1, [%rd1], %f2;"), Op::Other);
        assert_eq!(classify("ld.volatile.u32 %r1, [%rd1];"), Op::Poll);
        assert_eq!(classify("ld.global.cg.f32 %f1, [%rd1];"), Op::Other);
        assert_eq!(classify("fence.acq_rel.gpu;"), Op::Fence);
        assert_eq!(classify("barrier.sync 0;"), Op::Barrier);
    }
}
