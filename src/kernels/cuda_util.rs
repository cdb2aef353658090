//! Small helpers for launching Parallax's kernels on candle tensors directly (for kernels with
//! more inputs or outputs than candle's custom-op traits take).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Storage, Tensor};

/// A device view of a tensor's storage from its start offset.
pub fn view<'a, T: CudaDType>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, T>> {
    match s {
        Storage::Cuda(c) => Ok(c.as_cuda_slice::<T>()?.slice(l.start_offset()..)),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// The CUDA device a tensor lives on.
pub fn device(x: &Tensor) -> Result<CudaDevice> {
    match x.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// A contiguous tensor of `shape` over a freshly written device buffer.
pub fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The launch shape of the grid-stride kernels: 256 threads a block, enough blocks for `units`
/// work items (at most 16 per SM of a 132-SM GPU; the kernels loop over the rest).
pub fn grid_stride(units: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (units.div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
