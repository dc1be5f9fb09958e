//! Where a training step's GPU time goes: CUDA events recorded on the stream between the ops of a
//! step (`GpuNetwork::set_profiling`), read back as one duration per op. Used by
//! `cargo bench --bench train` to print the breakdown of a step; off by default (an event per op
//! costs a little, and reading them back synchronises the stream).

use crate::error::{BackeiError, Result};
use cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaStream};
use std::sync::Arc;

/// Events recorded after each op, each with the op's label; the first one marks the start.
pub struct OpTimer {
    stream: Arc<CudaStream>,
    marks: Vec<(String, CudaEvent)>,
}

fn cuda_err(e: cudarc::driver::DriverError) -> BackeiError {
    BackeiError::Cuda(format!("profiling event: {e:?}"))
}

impl OpTimer {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        OpTimer { stream, marks: Vec::new() }
    }

    /// Records an event now; the time since the previous mark is charged to `label`.
    pub fn mark(&mut self, label: impl Into<String>) -> Result<()> {
        let e = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err)?;
        self.marks.push((label.into(), e));
        Ok(())
    }

    /// The durations (ms) between consecutive marks, labelled by the later mark, and clears the
    /// marks. Waits for the recorded work.
    pub fn take(&mut self) -> Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        for w in self.marks.windows(2) {
            out.push((w[1].0.clone(), w[0].1.elapsed_ms(&w[1].1).map_err(cuda_err)? as f64));
        }
        self.marks.clear();
        Ok(out)
    }
}

/// Sums the durations of equal labels, keeping the order of first appearance.
pub fn merge(rows: &[(String, f64)]) -> Vec<(String, f64, usize)> {
    let mut out: Vec<(String, f64, usize)> = Vec::new();
    for (l, ms) in rows {
        match out.iter_mut().find(|(k, _, _)| k == l) {
            Some(e) => {
                e.1 += ms;
                e.2 += 1;
            }
            None => out.push((l.clone(), *ms, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sums_equal_labels_in_first_seen_order() {
        let rows: Vec<(String, f64)> = [("a", 1.0), ("b", 2.0), ("a", 0.5)].iter().map(|(l, m)| (l.to_string(), *m)).collect();
        assert_eq!(merge(&rows), vec![("a".to_string(), 1.5, 2), ("b".to_string(), 2.0, 1)]);
    }
}
