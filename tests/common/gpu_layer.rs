//! The device half of a layer comparison on a real GPU (`tests/common/layer_check.rs` holds the
//! data, the CPU reference and the comparison): upload a case's data, run the layer's forward and
//! backward, read back what `compare` needs. Shared by the fused and the unfused layer's tests
//! through the layers' common interface (`gpu::backei_layer::GpuLayer`).

use super::layer_check::{Case, DeviceOut, Inputs};
use backei::gpu::backei_layer::GpuLayer;
use backei::gpu::GpuDevice;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Fills a device buffer with NaN: every element a kernel should write must come back finite.
pub fn nan_fill(dev: &GpuDevice, buf: &mut CudaSlice<f32>) {
    let f = dev.kernels.function("smoke", "fill_f32").unwrap();
    let n = buf.len() as i32;
    let nan = f32::NAN;
    unsafe { dev.stream.launch_builder(&f).arg(buf).arg(&nan).arg(&n).launch(LaunchConfig::for_num_elems(n as u32)).unwrap() };
}

/// Uploads the case's data (∂I NaN-poisoned), runs forward and backward, reads back the outputs,
/// the saved tensors, ∂I and the gradient buffer.
pub fn forward_backward(dev: &GpuDevice, layer: &mut impl GpuLayer, c: &Case, x: &Inputs) -> DeviceOut {
    let s = &dev.stream;
    let n: usize = c.shape.iter().product();
    let (b, t) = (c.batch, c.steps);
    let d_params = s.clone_htod(&x.params).unwrap();
    let mut d_grads = s.clone_htod(&x.grads0).unwrap();
    let d_input = s.clone_htod(&x.input).unwrap();
    let d_gout = s.clone_htod(&x.grad_out).unwrap();
    let mut d_gin = s.alloc_zeros::<f32>(c.t_in * b * n).unwrap();
    nan_fill(dev, &mut d_gin);
    layer.forward(&d_params, &x.slots, &d_input.slice(..), c.t_in, b, t).unwrap();
    let (out, v, g, z) = layer.saved().unwrap();
    let (out, v) = (s.clone_dtoh(out).unwrap(), s.clone_dtoh(v).unwrap());
    let (g, z) = (g.map(|x| s.clone_dtoh(x).unwrap()), z.map(|x| s.clone_dtoh(x).unwrap()));
    layer.backward(&d_params, &mut d_grads, &x.slots, &d_input.slice(..), c.t_in, &d_gout.slice(..), &mut d_gin.slice_mut(..)).unwrap();
    DeviceOut { out, v, g, z, gin: s.clone_dtoh(&d_gin).unwrap(), grads: s.clone_dtoh(&d_grads).unwrap() }
}
