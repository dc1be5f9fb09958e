//! Per-thread scratch memory for the inner loops (im2col columns and the like): allocated once
//! per thread and grown when needed, so the hot loops neither allocate nor zero memory.

use crate::Real;
use std::cell::RefCell;

thread_local! {
    static SCRATCH: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch slice of `len` elements whose contents are unspecified (left over
/// from earlier use): `f` must write before it reads. `f` must not call `with_scratch` itself.
pub fn with_scratch<F: Real, R>(len: usize, f: impl FnOnce(&mut [F]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut v = cell.borrow_mut();
        let words = (len * std::mem::size_of::<F>()).div_ceil(8);
        if v.len() < words {
            v.resize(words, 0);
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut v[..words]);
        let buf: &mut [F] = bytemuck::cast_slice_mut(&mut bytes[..len * std::mem::size_of::<F>()]);
        f(buf)
    })
}
