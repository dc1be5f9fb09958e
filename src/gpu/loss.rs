//! Readout and losses on the GPU: the readout (mean over T of the last layer's spikes), MSE or
//! cross-entropy with their gradients, and the predicted class of each sample. Twins:
//! `src/cpu/loss.rs`, `cuda/loss.cu`. Only B losses and B predictions come back to the host.

use super::device::GpuDevice;
use super::util::{check_len, cuda_err, grid};
use crate::cpu::loss::Loss;
use crate::error::{config_err, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

/// y [B·K] = (1/T)·Σ_t s[t] from s [T][B·K].
pub fn readout(dev: &GpuDevice, steps: usize, bk: usize, s: &CudaView<f32>, y: &mut CudaViewMut<f32>) -> Result<()> {
    check_len("readout input", s.len(), steps * bk)?;
    check_len("readout", y.len(), bk)?;
    let f = dev.kernels.function("loss", "readout_f32")?;
    let (st, n) = (steps as i32, bk as i32);
    // SAFETY: lengths checked above.
    unsafe { dev.stream.launch_builder(&f).arg(s).arg(y).arg(&st).arg(&n).launch(grid(bk)) }.map_err(cuda_err("readout_f32"))?;
    Ok(())
}

/// ds [T][B·K] = dy/T at every step.
pub fn readout_backward(dev: &GpuDevice, steps: usize, bk: usize, dy: &CudaView<f32>, ds: &mut CudaViewMut<f32>) -> Result<()> {
    check_len("readout gradient", dy.len(), bk)?;
    check_len("last layer's output gradient", ds.len(), steps * bk)?;
    let f = dev.kernels.function("loss", "readout_backward_f32")?;
    let (st, n) = (steps as i32, bk as i32);
    // SAFETY: lengths checked above.
    unsafe { dev.stream.launch_builder(&f).arg(dy).arg(ds).arg(&st).arg(&n).launch(grid(steps * bk)) }
        .map_err(cuda_err("readout_backward_f32"))?;
    Ok(())
}

/// The buffers of the loss for one batch size.
pub struct LossBuffers {
    pub batch: usize,
    pub classes: usize,
    pub labels: CudaSlice<i32>,
    /// ∂L/∂readout [B][K].
    pub dy: CudaSlice<f32>,
    pub row_loss: CudaSlice<f32>,
    pub pred: CudaSlice<i32>,
}

impl LossBuffers {
    pub fn new(dev: &GpuDevice, batch: usize, classes: usize) -> Result<Self> {
        let a = |what: &str| cuda_err(format!("allocating the loss buffers ({what})"));
        Ok(LossBuffers {
            batch,
            classes,
            labels: dev.stream.alloc_zeros(batch).map_err(a("labels"))?,
            dy: dev.stream.alloc_zeros(batch * classes).map_err(a("dy"))?,
            row_loss: dev.stream.alloc_zeros(batch).map_err(a("loss"))?,
            pred: dev.stream.alloc_zeros(batch).map_err(a("predictions"))?,
        })
    }

    /// The loss of readout `y` against `labels` (summed over the rows in f64) and the predicted
    /// classes; ∂L/∂y is left in `self.dy`.
    pub fn compute(&mut self, dev: &GpuDevice, loss: Loss, y: &CudaView<f32>, labels: &[u8]) -> Result<(f64, Vec<usize>)> {
        if labels.len() != self.batch {
            return Err(config_err("labels", format!("{} labels for a batch of {}", labels.len(), self.batch)));
        }
        check_len("readout", y.len(), self.batch * self.classes)?;
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= self.classes) {
            return Err(config_err("labels", format!("label {l} of sample {i} is not below the {} classes", self.classes)));
        }
        let lab: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
        dev.stream.memcpy_htod(&lab, &mut self.labels).map_err(cuda_err("uploading the labels"))?;
        let f = dev.kernels.function("loss", "loss_grad_f32")?;
        let (b, k, kind) = (self.batch as i32, self.classes as i32, matches!(loss, Loss::Ce) as i32);
        // SAFETY: every buffer was sized for (batch, classes).
        unsafe {
            dev.stream
                .launch_builder(&f)
                .arg(y)
                .arg(&self.labels)
                .arg(&mut self.dy)
                .arg(&mut self.row_loss)
                .arg(&mut self.pred)
                .arg(&b)
                .arg(&k)
                .arg(&kind)
                .launch(grid(self.batch))
        }
        .map_err(cuda_err("loss_grad_f32"))?;
        let rows = dev.stream.clone_dtoh(&self.row_loss).map_err(cuda_err("reading the loss"))?;
        let pred = dev.stream.clone_dtoh(&self.pred).map_err(cuda_err("reading the predictions"))?;
        Ok((rows.iter().map(|&r| r as f64).sum(), pred.iter().map(|&p| p as usize).collect()))
    }

    /// Predicted classes only (no labels): argmax of each row, computed on the host from the
    /// B×K readout (tiny), ties to the lowest index as the CPU engine.
    pub fn predict(dev: &GpuDevice, y: &CudaView<f32>, classes: usize) -> Result<Vec<usize>> {
        let host = dev.stream.clone_dtoh(y).map_err(cuda_err("reading the readout"))?;
        Ok(crate::cpu::loss::argmax_rows(&host, classes))
    }
}
