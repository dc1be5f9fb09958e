//! SASS of what runs, without a GPU: the CUBIN NVRTC builds for an architecture (the image the
//! registry loads, no PTX JIT in between) disassembled by `nvdisasm` (pip `nvidia-cuda-nvdisasm`),
//! and per kernel the instruction mix of its hot loop and its theoretical occupancy.
//! `backei kernels --arch sm_90 --sass` prints it; `tests/kernels_compile.rs` fails CI when a v4
//! hot loop has no HMMA, touches local memory or divides, when a cooperative plan assumes more
//! resident blocks than the registers and shared memory allow, or when a staging loop keeps too
//! few global loads in flight.
//!
//! The hot loop is read off the control flow: every backward branch closes a loop (its target
//! label up to the branch); among the innermost loops (those that contain no other), the one with
//! the most tensor-core instructions (else FMAs) is the kernel's hot loop. These are predictions
//! from the code, not measurements: a static count says what a compute-bound loop issues, not how
//! long memory makes it wait.

use crate::error::{BackeiError, Result};
use std::path::PathBuf;
use std::process::Command;

/// `$NVDISASM`, else `nvdisasm` on PATH, else a pip package's copy, else CUDA's.
pub fn find_nvdisasm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVDISASM") {
        return Some(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("nvdisasm")).collect()).unwrap_or_default();
    candidates.extend(super::wheels::tool_candidates("nvdisasm"));
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvdisasm"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Disassembles a CUBIN (all kernels) with nvdisasm.
pub fn disassemble(cubin: &[u8]) -> Result<String> {
    let tool = find_nvdisasm()
        .ok_or_else(|| BackeiError::Cuda("nvdisasm not found: set NVDISASM, put it on PATH, or pip install nvidia-cuda-nvdisasm".into()))?;
    let file = std::env::temp_dir().join(format!("backei-sass-{}-{:x}.cubin", std::process::id(), cubin.len() ^ cubin.as_ptr() as usize));
    let io = |e: std::io::Error| BackeiError::Io { path: file.display().to_string(), problem: e.to_string() };
    std::fs::write(&file, cubin).map_err(io)?;
    let out = Command::new(&tool).arg(&file).output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(|e| BackeiError::Io { path: tool.display().to_string(), problem: e.to_string() })?;
    if !out.status.success() {
        return Err(BackeiError::Cuda(format!("nvdisasm failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One instruction: its opcode (with modifiers, e.g. `HMMA.16816.F32`) and, for a branch, the
/// target label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instr {
    pub opcode: String,
    pub target: Option<String>,
}

/// A kernel's instructions and the labels in between (label → index of the next instruction).
#[derive(Clone, Debug, Default)]
pub struct KernelSass {
    pub name: String,
    pub instrs: Vec<Instr>,
    pub labels: Vec<(String, usize)>,
}

/// Splits nvdisasm's output into kernels.
pub fn parse(sass: &str) -> Vec<KernelSass> {
    let mut out: Vec<KernelSass> = Vec::new();
    for line in sass.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix(".text.").and_then(|r| r.strip_suffix(':')) {
            out.push(KernelSass { name: name.to_string(), ..Default::default() });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if t.starts_with(".L") && t.ends_with(':') {
            k.labels.push((t.trim_end_matches(':').to_string(), k.instrs.len()));
            continue;
        }
        // "/*0240*/   @!P2 BRA `(.L_x_0) ;"
        let Some(rest) = t.strip_prefix("/*").and_then(|r| r.split_once("*/")).map(|(_, r)| r.trim()) else { continue };
        let rest = rest.trim_start_matches('{').trim();
        let mut words = rest.split_whitespace();
        let Some(mut op) = words.next() else { continue };
        if op.starts_with('@') {
            match words.next() {
                Some(o) => op = o,
                None => continue,
            }
        }
        if op.is_empty() || !op.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
            continue;
        }
        let target = rest.find("`(").and_then(|i| rest[i + 2..].split(')').next()).map(|s| s.to_string());
        k.instrs.push(Instr { opcode: op.trim_end_matches(';').to_string(), target });
    }
    out
}

/// The instruction mix of a stretch of code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mix {
    pub total: usize,
    /// Tensor-core MMAs (HMMA).
    pub mma: usize,
    /// FP32 fused multiply-adds (FFMA).
    pub ffma: usize,
    /// Shared-memory loads: LDS and LDSM (ldmatrix).
    pub lds: usize,
    pub ldsm: usize,
    /// Global loads and stores (LDG, STG; LDGSTS = cp.async counts as a load).
    pub ldg: usize,
    pub stg: usize,
    /// Local memory (LDL, STL): spills or dynamically indexed arrays.
    pub local: usize,
    /// Integer division or remainder by a run-time value: the reciprocal sequence's I2F.U32.RP,
    /// or a call to the 64-bit division routine.
    pub idiv: usize,
}

impl Mix {
    pub fn of(instrs: &[Instr]) -> Mix {
        let mut m = Mix { total: instrs.len(), ..Mix::default() };
        for i in instrs {
            let op = i.opcode.as_str();
            let base = op.split('.').next().unwrap_or(op);
            match base {
                "HMMA" => m.mma += 1,
                "FFMA" => m.ffma += 1,
                "LDS" => m.lds += 1,
                "LDSM" => {
                    m.lds += 1;
                    m.ldsm += 1
                }
                "LDG" | "LDGSTS" => m.ldg += 1,
                "STG" => m.stg += 1,
                "LDL" | "STL" => m.local += 1,
                _ => {}
            }
            if op.starts_with("I2F.U32.RP") || op.starts_with("I2F.RP") {
                m.idiv += 1;
            }
            if base == "CALL" && i.target.as_deref().is_some_and(is_integer_division_routine) {
                m.idiv += 1;
            }
        }
        m
    }
}

/// Whether a called routine is an integer division or remainder (`__cuda_sm20_div_s64`,
/// `…_rem_u64`), not a floating-point one (`…_div_rn_f64_full`, the slow path of an f64 division).
fn is_integer_division_routine(target: &str) -> bool {
    (target.contains("div") || target.contains("rem")) && !target.contains("_f64") && !target.contains("_f32")
}

/// The loops of a kernel: (first instruction, the backward branch) index pairs.
pub fn loops(k: &KernelSass) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (j, ins) in k.instrs.iter().enumerate() {
        let Some(t) = &ins.target else { continue };
        if !ins.opcode.starts_with("BRA") {
            continue;
        }
        if let Some(&(_, at)) = k.labels.iter().find(|(l, _)| l == t) {
            if at <= j {
                out.push((at, j));
            }
        }
    }
    out
}

/// The hot loop's range and instruction mix: the innermost loop with the most MMAs (else FFMAs).
pub fn hot_loop(k: &KernelSass) -> Option<((usize, usize), Mix)> {
    innermost_loops(k).into_iter().map(|r| (r, Mix::of(&k.instrs[r.0..=r.1]))).max_by_key(|(_, m)| (m.mma, m.ffma))
}

/// The loops that contain no other loop. A branch to itself is not one: nvdisasm ends every
/// kernel with `.L_x_N: BRA .L_x_N` after its EXIT (a trap never reached), which made that
/// one-instruction "loop" the hot loop of every kernel without MMA or FMA in its loops.
fn innermost_loops(k: &KernelSass) -> Vec<(usize, usize)> {
    let ls: Vec<(usize, usize)> = loops(k).into_iter().filter(|&(a, b)| b > a).collect();
    ls.iter().copied().filter(|&(a, b)| !ls.iter().any(|&(c, d)| (c, d) != (a, b) && a <= c && d <= b)).collect()
}

/// The deepest loop nesting of any local-memory instruction (LDL, STL): 0 where none lies in a
/// loop (or the kernel touches no local memory), 1 where the deepest lies in an outermost loop
/// only — in the v4 kernels the time loop: once per step, never per chunk or per element.
pub fn local_depth(k: &KernelSass) -> usize {
    let ls: Vec<(usize, usize)> = loops(k).into_iter().filter(|&(a, b)| b > a).collect();
    k.instrs
        .iter()
        .enumerate()
        .filter(|(_, i)| matches!(i.opcode.split('.').next(), Some("LDL" | "STL")))
        .map(|(j, _)| ls.iter().filter(|&&(a, b)| a <= j && j <= b).count())
        .max()
        .unwrap_or(0)
}

/// Global loads in flight while a stretch of code stages memory into shared memory: the longest
/// run of global loads (LDG; cp.async's LDGSTS excluded, it waits for nothing) with no shared store
/// (STS) between them. A staging loop that converts each element as it arrives reads 1 — every
/// element then waits for its own memory round trip, ~600 cycles from L2 — while one that issues a
/// batch of loads before it stores any reads the batch (the loads' latencies overlap). A static
/// count, not a measurement: it says what can overlap, not how long memory takes.
pub fn loads_between_shared_stores(instrs: &[Instr]) -> usize {
    let (mut best, mut run) = (0, 0);
    for i in instrs {
        let op = i.opcode.as_str();
        if op.starts_with("STS") {
            run = 0;
        } else if (op == "LDG" || op.starts_with("LDG.")) && !op.starts_with("LDGSTS") {
            run += 1;
            best = best.max(run);
        }
    }
    best
}

/// The staging loops of a kernel: the innermost loops that load global memory and store shared
/// memory and issue no MMA (the halo walks of the v4 kernels), with the loads each keeps in flight
/// (`loads_between_shared_stores`).
pub fn staging_loops(k: &KernelSass) -> Vec<((usize, usize), usize)> {
    innermost_loops(k)
        .into_iter()
        .filter_map(|r| {
            let body = &k.instrs[r.0..=r.1];
            let m = Mix::of(body);
            let stores = body.iter().any(|i| i.opcode.starts_with("STS"));
            let batch = loads_between_shared_stores(body);
            (stores && batch > 0 && m.mma == 0).then_some((r, batch))
        })
        .collect()
}

/// The functions a kernel calls that are not CUDA's own routines (`$__internal_…`: the 64-bit
/// division, the float division's and reciprocal's slow paths): code NVRTC outlined — a lambda or
/// function it found too big to inline — whose call spills what is live across it (2026-12-07:
/// phase 2 of the v4 backward outlined, a 928-byte stack frame). The targets, in code order.
pub fn outlined_calls(k: &KernelSass) -> Vec<String> {
    k.instrs
        .iter()
        .filter(|i| i.opcode.starts_with("CALL"))
        .filter_map(|i| i.target.clone())
        .filter(|t| !t.starts_with("$__internal_"))
        .collect()
}

/// Calls to the slow paths of CUDA's correctly rounded float division and reciprocal
/// (`$__internal_…_rcp_rn_f32_slowpath`, `…_div_rn_…`): each such division in the code branches
/// to one, so an unrolled epilogue that divides per element holds one per element (the v4
/// forward's sigmoid did, 16–64 per kernel, until 2026-12-07), a hoisted set-up division one.
pub fn float_division_calls(k: &KernelSass) -> usize {
    k.instrs
        .iter()
        .filter(|i| i.opcode.starts_with("CALL"))
        .filter_map(|i| i.target.as_deref())
        .filter(|t| t.starts_with("$__internal_") && (t.contains("rcp_rn_f32") || t.contains("div_rn")))
        .count()
}

/// Resident blocks per SM of a kernel (the theoretical occupancy, as the CUDA occupancy
/// calculator computes it for sm_80/sm_90: registers allocated per warp in units of 256, 64 K
/// registers, 2048 threads, 32 blocks, and `smem_per_sm` bytes of shared memory with 1 KiB reserved
/// per block).
pub fn blocks_per_sm(registers: u32, threads: u32, smem_bytes: u32, smem_per_sm: u32) -> u32 {
    if threads == 0 {
        return 0;
    }
    let warps = threads.div_ceil(32);
    let regs_per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    let by_regs = 65_536 / (regs_per_warp * warps).max(1);
    let by_threads = 2048 / (warps * 32);
    let by_smem = if smem_bytes == 0 { 32 } else { smem_per_sm / (smem_bytes + 1024) };
    by_regs.min(by_threads).min(by_smem).min(32)
}

/// `$CUOBJDUMP`, else `cuobjdump` on PATH, else a pip package's copy, else CUDA's.
pub fn find_cuobjdump() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CUOBJDUMP") {
        return Some(PathBuf::from(p));
    }
    find_nvdisasm().map(|p| p.with_file_name("cuobjdump")).filter(|p| p.is_file()).or_else(|| {
        let p = PathBuf::from("/usr/local/cuda/bin/cuobjdump");
        p.is_file().then_some(p)
    })
}

/// Registers, static shared memory and local memory of every kernel in a CUBIN (cuobjdump
/// -res-usage): (kernel, registers, shared bytes, local bytes). The local bytes are STACK + LOCAL:
/// cuobjdump puts a kernel's register spills in its stack frame, not under LOCAL (seen 2026-12-05:
/// the cifar10 L2 fp32 v4 backward, 212 bytes of spill stores by ptxas -v, read STACK:80 LOCAL:0 —
/// a check of LOCAL alone had passed it for two sessions).
pub fn resource_usage(cubin: &[u8]) -> Result<Vec<(String, u32, u32, u32)>> {
    let tool = find_cuobjdump().ok_or_else(|| {
        BackeiError::Cuda("cuobjdump not found: set CUOBJDUMP, put it on PATH, or pip install nvidia-cuda-cuobjdump".into())
    })?;
    let file = std::env::temp_dir().join(format!("backei-res-{}-{:x}.cubin", std::process::id(), cubin.len() ^ cubin.as_ptr() as usize));
    let io = |e: std::io::Error| BackeiError::Io { path: file.display().to_string(), problem: e.to_string() };
    std::fs::write(&file, cubin).map_err(io)?;
    let out = Command::new(&tool).arg("-res-usage").arg(&file).output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(|e| BackeiError::Io { path: tool.display().to_string(), problem: e.to_string() })?;
    if !out.status.success() {
        return Err(BackeiError::Cuda(format!("cuobjdump failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(parse_resource_usage(&String::from_utf8_lossy(&out.stdout)))
}

pub fn parse_resource_usage(text: &str) -> Vec<(String, u32, u32, u32)> {
    let mut out = Vec::new();
    let mut name: Option<String> = None;
    let field = |line: &str, key: &str| -> u32 {
        line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    for line in text.lines() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("Function ").and_then(|r| r.strip_suffix(':')) {
            name = Some(n.to_string());
        } else if let (Some(n), true) = (name.take(), t.starts_with("REG:")) {
            out.push((n, field(t, "REG:"), field(t, "SHARED:"), field(t, "STACK:") + field(t, "LOCAL:")));
        }
    }
    out
}

/// What the static check reads off one kernel of one module instance.
#[derive(Clone, Debug)]
pub struct KernelCheck {
    pub kernel: String,
    pub registers: u32,
    pub static_smem: u32,
    /// Local memory per thread: the stack frame (register spills) and local arrays.
    pub local_bytes: u32,
    /// Instructions of the whole kernel that touch local memory (LDL, STL): a spill of a value
    /// used per element shows as dozens (unrolled epilogues), one of a set-up value as a few.
    pub local_ops: usize,
    /// The deepest loop nesting of those instructions (`local_depth`).
    pub local_depth: usize,
    /// The hot loop's mix (None: the kernel has no loop).
    pub hot: Option<Mix>,
    /// Global loads the hot loop keeps in flight between its shared stores (a GEMM that stages its
    /// tiles inside the loop: `loads_between_shared_stores`).
    pub hot_loads: usize,
    /// Each staging loop's loads in flight (`staging_loops`), in code order.
    pub staging: Vec<usize>,
    /// Instructions of the whole kernel.
    pub total: usize,
    /// L2 prefetches (`prefetch.global.L2`: CCTL.E.PF2) in the whole kernel.
    pub l2_prefetches: usize,
    /// Calls to outlined code (`outlined_calls`).
    pub outlined: Vec<String>,
    /// Calls to the float division's and reciprocal's slow paths (`float_division_calls`).
    pub float_divisions: usize,
}

/// Compiles a module instance for `arch` (a real architecture), disassembles its CUBIN and
/// reads every kernel's resources and hot loop.
pub fn check_module(module: &str, arch: &str, defines: &super::kernels::Defines) -> Result<Vec<KernelCheck>> {
    Ok(check_module_and_ptx(module, arch, defines)?.0)
}

/// [`check_module`], and the PTX the CUBIN was assembled from (for checks that read PTX:
/// `sync_order`).
pub fn check_module_and_ptx(module: &str, arch: &str, defines: &super::kernels::Defines) -> Result<(Vec<KernelCheck>, String)> {
    let c = super::kernels::compile_module_with(module, arch, defines)?;
    let cubin =
        c.cubin.ok_or_else(|| BackeiError::Cuda(format!("NVRTC gave no CUBIN for {arch} (a real architecture, sm_XX, is needed)")))?;
    let res = resource_usage(&cubin)?;
    let sass = parse(&disassemble(&cubin)?);
    let checks = sass
        .iter()
        .map(|k| {
            let (_, registers, static_smem, local_bytes) = res.iter().find(|r| r.0 == k.name).cloned().unwrap_or_default();
            KernelCheck {
                kernel: k.name.clone(),
                registers,
                static_smem,
                local_bytes,
                local_ops: Mix::of(&k.instrs).local,
                local_depth: local_depth(k),
                hot: hot_loop(k).map(|(_, m)| m),
                hot_loads: hot_loop(k).map_or(0, |((a, b), _)| loads_between_shared_stores(&k.instrs[a..=b])),
                staging: staging_loops(k).into_iter().map(|(_, n)| n).collect(),
                total: k.instrs.len(),
                l2_prefetches: k.instrs.iter().filter(|i| i.opcode.starts_with("CCTL") && i.opcode.contains(".PF2")).count(),
                outlined: outlined_calls(k),
                float_divisions: float_division_calls(k),
            }
        })
        .collect();
    Ok((checks, c.ptx))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "
//--------------------- .text.k --------------------------
.text.k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDSM.16.M88.4 R48, [R98] ;
        /*0020*/                   HMMA.16816.F32 R88, R48.reuse, R92, R88 ;
        /*0030*/                   FFMA R2, R9, R10, -1 ;
.L_x_2:
        /*0040*/                   LDS.64 R4, [R3] ;
        /*0050*/                   HMMA.16816.F32 R84, R48, R94, R84 ;
        /*0060*/                   HMMA.16816.F32 R80, R48, R96, R80 ;
        /*0070*/               @P0 BRA `(.L_x_2) ;
        /*0080*/                   LDL.64 R34, [R1+0x8] ;
        /*0090*/                   I2F.U32.RP R34, UR18 ;
        /*00a0*/              @!P1 BRA `(.L_x_1) ;
        /*00b0*/                   EXIT ;
";

    #[test]
    fn finds_the_innermost_loop_with_the_most_mmas_and_counts_its_mix() {
        let ks = parse(SAMPLE);
        assert_eq!(ks.len(), 1);
        let k = &ks[0];
        assert_eq!(k.name, "k");
        assert_eq!(k.instrs.len(), 12);
        assert_eq!(loops(k), vec![(4, 7), (1, 10)]);
        let ((a, b), m) = hot_loop(k).unwrap();
        assert_eq!((a, b), (4, 7));
        assert_eq!((m.total, m.mma, m.lds, m.ldsm, m.local, m.idiv), (4, 2, 1, 0, 0, 0));
        let outer = Mix::of(&k.instrs[1..=10]);
        assert_eq!((outer.mma, outer.ffma, outer.ldsm, outer.local, outer.idiv), (3, 1, 1, 1, 1));
        // the LDL lies in the outer loop, after the inner one
        assert_eq!(local_depth(k), 1);
    }

    #[test]
    fn local_depth_counts_the_loops_around_the_deepest_spill() {
        let at = |inner: bool| {
            let spill = "        /*0000*/                   STL [R1], R36 ;\n";
            format!(
                ".text.k:\n{}.L_x_1:\n{}.L_x_2:\n{}        /*0000*/              @P0 BRA `(.L_x_2) ;\n        /*0000*/              @P1 BRA `(.L_x_1) ;\n        /*0000*/                   EXIT ;\n.L_x_9:\n        /*0000*/                   BRA `(.L_x_9) ;\n",
                spill,
                if inner { "" } else { spill },
                if inner { spill } else { "" }
            )
        };
        assert_eq!(local_depth(&parse(&at(false))[0]), 1, "{}", at(false));
        assert_eq!(local_depth(&parse(&at(true))[0]), 2, "{}", at(true));
        // no local memory: 0, whatever the loops (the trap after EXIT, a branch to itself, is none)
        assert_eq!(local_depth(&parse(STAGING)[0]), 0);
    }

    // two staging loops: one converts each element as it arrives (1 load in flight), one issues
    // three loads before it stores (3); and a GEMM loop that stages inside (HMMA: not a staging loop)
    const STAGING: &str = "
.text.s:
.L_x_1:
        /*0000*/                   LDG.E.STRONG.GPU R4, desc[UR4][R2.64] ;
        /*0010*/                   F2FP.F16.F32.PACK_AB R5, RZ, R4 ;
        /*0020*/                   STS.U16 [R6], R5 ;
        /*0030*/                   LDG.E.STRONG.GPU R4, desc[UR4][R2.64+0x4] ;
        /*0040*/                   STS.U16 [R6+0x2], R4 ;
        /*0050*/              @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0060*/              @P1 LDG.E.STRONG.GPU R4, desc[UR4][R2.64] ;
        /*0070*/                   LDG.E.STRONG.GPU R7, desc[UR4][R2.64+0x70] ;
        /*0080*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR4][R10.64] ;
        /*0090*/                   LDG.E.S8.STRONG.GPU R8, desc[UR4][R2.64+0xe0] ;
        /*00a0*/                   STS.U16 [R6], R4 ;
        /*00b0*/                   STS.U16 [R6+0x2], R7 ;
        /*00c0*/                   LDG.E R8, desc[UR4][R2.64] ;
        /*00d0*/              @P0 BRA `(.L_x_2) ;
.L_x_3:
        /*00e0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00f0*/                   LDG.E R5, desc[UR4][R2.64] ;
        /*0100*/                   STS [R6], R4 ;
        /*0110*/                   HMMA.16816.F32 R88, R48, R92, R88 ;
        /*0120*/              @P0 BRA `(.L_x_3) ;
        /*0130*/                   EXIT ;
";

    /// An elementwise kernel: a grid-stride loop with no MMA or FMA (here one that divides through
    /// the 64-bit routine), then nvdisasm's trap after EXIT, a branch to itself — which is no loop.
    /// adam_f32's f64 division and square root call slow-path routines; they are no integer
    /// division, and a grid-stride loop's 64-bit remainder is.
    #[test]
    fn only_integer_division_routines_count_as_idiv() {
        let call = |t: &str| format!("        /*0000*/                   CALL.REL.NOINC `({t}) ;\n");
        let sass = format!(
            ".text.k:\n{}{}{}{}{}",
            call("$__internal_2_$__cuda_sm20_div_rn_f64_full"),
            call("$__internal_4_$__cuda_sm20_dsqrt_rn_f64_mediumpath_v1"),
            call("$__internal_9_$__cuda_sm20_div_s64"),
            call("$__internal_11_$__cuda_sm20_rem_u64"),
            "        /*0010*/                   I2F.U32.RP R5, R3 ;\n"
        );
        let ks = parse(&sass);
        assert_eq!(ks[0].instrs.len(), 5, "{sass}");
        assert_eq!(Mix::of(&ks[0].instrs).idiv, 3);
    }

    #[test]
    fn calls_to_outlined_code_are_told_from_cudas_routines() {
        let sass = "
.text.k:
        /*0000*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0010*/                   CALL.REL.NOINC `($k$_ZZ11backward_v4ENKUlRKN2v45ChunkEE_clESQ_) ;
        /*0020*/              @!P0 CALL.REL.NOINC `($__internal_2_$__cuda_sm20_rcp_rn_f32_slowpath) ;
        /*0030*/                   EXIT ;
";
        let ks = parse(sass);
        assert_eq!(outlined_calls(&ks[0]), vec!["$k$_ZZ11backward_v4ENKUlRKN2v45ChunkEE_clESQ_".to_string()]);
        // the reciprocal's slow path is a float division; the 64-bit integer division is not
        assert_eq!(float_division_calls(&ks[0]), 1);
        assert!(outlined_calls(&parse(SAMPLE)[0]).is_empty());
    }

    #[test]
    fn a_kernels_trap_after_exit_is_not_its_hot_loop() {
        let sass = "
.text.pool:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_5:
        /*0010*/                   LDG.E R4, desc[UR6][R2.64] ;
        /*0020*/                   CALL.REL.NOINC `($__internal_3_$__cuda_sm20_div_s64) ;
        /*0030*/                   STG.E desc[UR6][R6.64], R4 ;
        /*0040*/              @!P0 BRA `(.L_x_5) ;
        /*0050*/                   EXIT ;
.L_x_6:
        /*0060*/                   BRA `(.L_x_6) ;
";
        let ks = parse(sass);
        assert_eq!(loops(&ks[0]), vec![(1, 4), (6, 6)]);
        let ((a, b), m) = hot_loop(&ks[0]).expect("the grid-stride loop");
        assert_eq!((a, b), (1, 4));
        assert_eq!((m.total, m.ldg, m.stg, m.idiv), (4, 1, 1, 1));
    }

    #[test]
    fn counts_the_global_loads_each_staging_loop_keeps_in_flight() {
        let k = &parse(STAGING)[0];
        assert_eq!(loads_between_shared_stores(&k.instrs[0..=5]), 1);
        assert_eq!(loads_between_shared_stores(&k.instrs[6..=13]), 3, "LDGSTS (cp.async) is not a load that waits");
        assert_eq!(staging_loops(k), vec![((0, 5), 1), ((6, 13), 3)], "the loop with HMMA is the GEMM, not a staging loop");
        let ((a, b), _) = hot_loop(k).unwrap();
        assert_eq!(loads_between_shared_stores(&k.instrs[a..=b]), 2);
    }

    #[test]
    fn reads_cuobjdump_resource_usage() {
        // (f's stack frame, where spills go, counts as local memory: 8 + 24)
        let text = "\nResource usage:\n Common:\n  GLOBAL:60 CONSTANT[4]:120\n Function backei_backward_v4_r1_fp32:\n  REG:250 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:808 TEXTURE:0\n Function f:\n  REG:16 STACK:8 SHARED:0 LOCAL:24 CONSTANT[0]:8\n";
        assert_eq!(
            parse_resource_usage(text),
            vec![("backei_backward_v4_r1_fp32".to_string(), 250, 1024, 0), ("f".to_string(), 16, 0, 32)]
        );
    }

    #[test]
    fn occupancy_follows_registers_threads_and_shared_memory() {
        // 256 threads at 255 registers: 8 warps × 8192 registers = all 64 K: one block
        assert_eq!(blocks_per_sm(255, 256, 0, 233_472), 1);
        assert_eq!(blocks_per_sm(128, 256, 0, 233_472), 2);
        assert_eq!(blocks_per_sm(32, 256, 0, 233_472), 8);
        assert_eq!(blocks_per_sm(32, 256, 200_000, 233_472), 1);
        assert_eq!(blocks_per_sm(32, 256, 240_000, 233_472), 0);
    }
}
