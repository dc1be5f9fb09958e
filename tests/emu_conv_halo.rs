//! The window-staged convolutions (`cuda/conv_halo.cu`) executed on the CPU emulator through the
//! host's own plans, descriptors and launch lists (`gpu::conv_halo`): forward and data gradient
//! against the CPU engine in f64 in every precision (the tolerances of `tests/common/ff_check.rs`,
//! the same as the generic tensor-core GEMMs'), int8-code inputs against f32 ones bit for bit, and
//! a part of a batch against the whole (the `--recompute` windows' promise).
mod common;

use backei::cpu::conv::{self as cconv, ConvGeom};
use backei::gpu::backei_layer::DeviceLimits;
use backei::gpu::conv_halo::{self, halo_plan, HaloDesc, HaloLaunch, HaloOp, HaloPlan, HaloShape};
use backei::gpu::gemm_tc::XForm;
use backei::Precision;
use common::emu::{self, Args, DevBuf};
use common::ff_check::{check, halo_conv_shapes, host};

const H100: DeviceLimits = DeviceLimits::H100;

/// One op on the emulator as `conv_halo::run` issues it: `input` the op's input (x or dy; f32
/// words, or packed int8 codes), the weights, the bias (forward), the output's length.
#[allow(clippy::too_many_arguments)]
fn emulate(
    op: HaloOp,
    g: &ConvGeom,
    samples: usize,
    p: Precision,
    x_form: XForm,
    w: &[f32],
    b: &[f32],
    input: &[f32],
    out_len: usize,
    seed: u64,
) -> Vec<f32> {
    let plan = halo_plan(op, g, samples, p, x_form.exact(), &H100).unwrap_or_else(|| panic!("{op:?} {g:?}: no plan"));
    let (mut wb, mut bb, mut ib, mut ob) =
        (DevBuf::from("w", w), DevBuf::from("b", b), DevBuf::from("in", input), DevBuf::new("out", out_len));
    run(op, g, samples, &plan, p, x_form, (&mut wb, &mut bb, &mut ib, &mut ob), 0, input.len(), seed);
    for buf in [&wb, &bb, &ib, &ob] {
        buf.check_guards();
    }
    ob.host()
}

/// The launches of one op over samples [first, first + samples) of the input held by `ib` (whose
/// `whole_len` words are the fp32 mode's scale source, as the network's parts use the whole's).
#[allow(clippy::too_many_arguments)]
fn run(
    op: HaloOp,
    g: &ConvGeom,
    samples: usize,
    plan: &HaloPlan,
    p: Precision,
    x_form: XForm,
    (wb, bb, ib, ob): (&mut DevBuf, &mut DevBuf, &mut DevBuf, &mut DevBuf),
    first: usize,
    whole_len: usize,
    seed: u64,
) {
    let halo = emu::module("conv_halo");
    let gemm = emu::module("gemm_tc");
    let mut wprep = DevBuf::new("wprep", plan.wprep_words);
    let mut maxbits = vec![0xFFFF_FFFFu32; 2];
    let mb = maxbits.as_mut_ptr() as u64;
    let in_len = match op {
        HaloOp::Forward => g.in_len(),
        HaloOp::BackwardData => g.out_len(),
    };
    let whole = ib.ptr() as u64;
    let part = whole + (x_form.bytes() * first * in_len) as u64;
    let bias = if op == HaloOp::Forward { bb.ptr() as u64 } else { 0 };
    let desc = conv_halo::descriptor(op, g, samples, plan, (wb.ptr() as u64, bias, part, ob.ptr() as u64, wprep.ptr() as u64), x_form);
    let w_len = g.weight_len();
    for (i, l) in conv_halo::launches(desc, plan, p, [(wb.ptr() as u64, w_len), (whole, whole_len)], mb).into_iter().enumerate() {
        let s = seed + i as u64;
        match l {
            HaloLaunch::ClearScales => maxbits.fill(0),
            HaloLaunch::Absmax { ptr, len, out, grid } => {
                let mut a = Args::new();
                a.val(ptr).val(len as i64).val(out);
                gemm.launch_raw("absmax_f32", (grid.min(4), 1, 1), (256, 1, 1), 0, false, s, &mut a).unwrap();
            }
            HaloLaunch::Weights { kernel, grid, desc } => {
                let mut a = Args::new();
                a.val(desc).val(wprep.ptr() as u64).val(mb);
                halo.launch_raw(kernel, (grid.min(8), 1, 1), (256, 1, 1), 0, false, s, &mut a).unwrap();
            }
            HaloLaunch::Conv { kernel, grid, threads, smem_bytes, desc } => {
                let mut a = Args::new();
                a.val(desc).val(mb);
                halo.launch_raw(kernel, grid, (threads, 1, 1), smem_bytes, false, s, &mut a).unwrap();
            }
        }
    }
    wprep.check_guards();
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Forward and data gradient of every shape in `p` (real inputs; spikes too in fp32 mode, the
/// exact path) against the CPU engine in f64.
fn check_mode(p: Precision) {
    for (i, (g, s)) in halo_conv_shapes().into_iter().enumerate() {
        let mut rng = common::Rng(900 + 10 * i as u64 + p as u64);
        let w: Vec<f32> = host(&mut rng, g.weight_len(), false).iter().map(|v| v * 0.5).collect();
        let b = host(&mut rng, g.cout, false);
        let dy: Vec<f32> = host(&mut rng, s * g.out_len(), false).iter().map(|v| v * 1e-3).collect();
        let what = format!("halo conv {:?} S {s}", (g.cin, g.cout, g.h, g.w, g.k, g.pad));
        let spikes_too: &[bool] = if p == Precision::Fp32 { &[false, true] } else { &[i % 2 == 0] };
        for &spikes in spikes_too {
            let x = host(&mut rng, s * g.in_len(), spikes);
            let y = emulate(HaloOp::Forward, &g, s, p, spikes.into(), &w, &b, &x, s * g.out_len(), 3 + i as u64);
            let mut y64 = vec![0f64; s * g.out_len()];
            cconv::forward(&g, &f64s(&w), &f64s(&b), &f64s(&x), &mut y64);
            check(&format!("{what}{} forward", if spikes { " spikes" } else { "" }), p, &y, &y64);
        }
        let dx = emulate(HaloOp::BackwardData, &g, s, p, XForm::Real, &w, &[], &dy, s * g.in_len(), 7 + i as u64);
        let mut dx64 = vec![0f64; s * g.in_len()];
        cconv::backward_data(&g, &f64s(&w), &f64s(&dy), &mut dx64, false);
        check(&format!("{what} data gradient"), p, &dx, &dx64);
    }
}

#[test]
fn emulated_window_staged_convolutions_match_the_cpu_in_fp32_mode() {
    check_mode(Precision::Fp32);
}

#[test]
fn emulated_window_staged_convolutions_match_the_cpu_in_tf32_mode() {
    check_mode(Precision::Tf32);
}

#[test]
fn emulated_window_staged_convolutions_match_the_cpu_in_bf16_mode() {
    check_mode(Precision::Bf16);
}

/// The test shapes take every tile shape, both ops.
#[test]
fn the_test_shapes_take_every_tile() {
    let mut seen = Vec::new();
    for (g, s) in halo_conv_shapes() {
        for op in [HaloOp::Forward, HaloOp::BackwardData] {
            let plan = halo_plan(op, &g, s, Precision::Fp32, false, &H100).unwrap();
            seen.push((plan.shape, plan.tiles > 1, plan.chunks > 1, plan.grid.1 > 1));
        }
    }
    for shape in [HaloShape::M64N256, HaloShape::M32N256, HaloShape::M128N64] {
        assert!(seen.iter().any(|s| s.0 == shape), "{shape:?}");
    }
    assert!(seen.iter().any(|s| s.1) && seen.iter().any(|s| s.2) && seen.iter().any(|s| s.3), "{seen:?}");
}

/// Pooled spikes read as int8 codes give the bits of reading their f32 values (the codes decode
/// to exactly those values), and a part of a batch gives the bits of the whole's rows: each block
/// owns whole outputs, and a part takes the whole input's scale.
#[test]
fn emulated_codes_and_parts_give_the_bits_of_f32_and_of_the_whole() {
    let g = ConvGeom::new(32, 64, 14, 14, 5, 2);
    let s = 3;
    let mut rng = common::Rng(77);
    let w: Vec<f32> = host(&mut rng, g.weight_len(), false).iter().map(|v| v * 0.5).collect();
    let b = host(&mut rng, g.cout, false);
    let codes: Vec<i8> = (0..s * g.in_len()).map(|_| rng.below(9) as i8 - 4).collect();
    let factor = 0.25f32;
    let values: Vec<f32> = codes.iter().map(|&c| c as f32 * factor).collect();
    let mut packed = vec![0f32; codes.len().div_ceil(4)];
    for (i, c) in codes.iter().enumerate() {
        let word = packed[i / 4].to_bits() | ((*c as u8 as u32) << (8 * (i % 4)));
        packed[i / 4] = f32::from_bits(word);
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for p in Precision::ALL {
        let from_f32 = emulate(HaloOp::Forward, &g, s, p, XForm::Exact, &w, &b, &values, s * g.out_len(), 1);
        let from_codes = emulate(HaloOp::Forward, &g, s, p, XForm::Q8(factor), &w, &b, &packed, s * g.out_len(), 2);
        assert_eq!(bits(&from_codes), bits(&from_f32), "{p}: codes vs f32");
        // samples 1..3 of the real-valued data gradient input, against the whole
        let dy: Vec<f32> = host(&mut rng, s * g.out_len(), false);
        let whole = emulate(HaloOp::BackwardData, &g, s, p, XForm::Real, &w, &[], &dy, s * g.in_len(), 3);
        let plan = halo_plan(HaloOp::BackwardData, &g, 2, p, false, &H100).unwrap();
        let (mut wb, mut bb, mut ib, mut ob) =
            (DevBuf::from("w", &w), DevBuf::new("b", 0), DevBuf::from("dy", &dy), DevBuf::new("dx", 2 * g.in_len()));
        run(HaloOp::BackwardData, &g, 2, &plan, p, XForm::Real, (&mut wb, &mut bb, &mut ib, &mut ob), 1, dy.len(), 4);
        ob.check_guards();
        assert_eq!(bits(&ob.host()), bits(&whole[g.in_len()..]), "{p}: samples 1..3 vs the whole");
    }
}

#[test]
fn halo_desc_has_the_layout_of_the_kernel() {
    use std::mem::{offset_of, size_of};
    let mut out = vec![-1i32; 7];
    let mut a = Args::new();
    a.val(out.as_mut_ptr());
    emu::module("conv_halo").launch_raw("conv_halo_layout", (1, 1, 1), (32, 1, 1), 0, false, 1, &mut a).unwrap();
    let want = [
        size_of::<HaloDesc>(),
        offset_of!(HaloDesc, w),
        offset_of!(HaloDesc, s),
        offset_of!(HaloDesc, sign),
        offset_of!(HaloDesc, halo_w),
        offset_of!(HaloDesc, q8_factor),
        offset_of!(HaloDesc, accumulate),
    ];
    let got: Vec<usize> = out.iter().map(|&x| x as usize).collect();
    assert_eq!(got, want, "size and offsets of HaloDesc");
}
