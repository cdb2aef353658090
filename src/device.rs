//! Devices: parsing `--device`, synchronising, and reading GPU memory use.

use candle_core::Device;

use crate::error::{Error, Result};

/// `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse(name: &str) -> Result<Device> {
    let bad = |reason: &str| Error::setting("device", name, reason);
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        other => match other.strip_prefix("cuda:") {
            Some(n) => {
                let i: usize = n
                    .parse()
                    .map_err(|_| bad("expected cuda:N with N a GPU index"))?;
                cuda(i)
            }
            None => Err(bad("unknown device: use cpu, cuda or cuda:N")),
        },
    }
}

fn cuda(i: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::setting(
            "device",
            format!("cuda:{i}"),
            "this build has no CUDA support: rebuild with `--features cuda` (see README)",
        ));
    }
    Device::new_cuda(i).map_err(|e| Error::setting("device", format!("cuda:{i}"), e.to_string()))
}

/// Wait for all queued work on `dev` (no-op on the CPU).
pub fn synchronize(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// Bytes of GPU memory in use on `dev`'s GPU (all processes), or `None` on the CPU.
pub fn gpu_memory_used(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = dev;
    None
}

/// Peak GPU memory of `dev`'s stream-ordered allocator (candle allocates through the device's
/// default memory pool): bytes held by live allocations and bytes the pool reserved, each the
/// highest since the last [`reset_memory_peak`]. `None` on the CPU or when the driver cannot say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPeak {
    /// Most bytes in live allocations at once (what `torch.cuda.max_memory_allocated` reports).
    pub allocated: u64,
    /// Most bytes the pool held from the driver at once (allocations plus cached free blocks).
    pub reserved: u64,
}

/// Bytes in live allocations of `dev`'s default memory pool now (`None` on the CPU).
pub fn memory_in_use(dev: &Device) -> Result<Option<u64>> {
    synchronize(dev)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let pool = default_mem_pool(cuda)?;
        let mut v: u64 = 0;
        // SAFETY: the attribute is a cuuint64_t the driver writes.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                &mut v as *mut u64 as *mut _,
            )
        };
        driver_ok(r, "cuMemPoolGetAttribute")?;
        return Ok(Some(v));
    }
    let _ = dev;
    Ok(None)
}

/// Start a new peak-memory window on `dev` (no-op on the CPU). Waits for queued work first.
pub fn reset_memory_peak(dev: &Device) -> Result<()> {
    synchronize(dev)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let pool = default_mem_pool(cuda)?;
        for attr in [
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
        ] {
            let mut zero: u64 = 0;
            // SAFETY: `pool` is the device's default pool; the attribute takes a cuuint64_t.
            let r =
                unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut _) };
            driver_ok(r, "cuMemPoolSetAttribute")?;
        }
    }
    Ok(())
}

/// The peak since the last [`reset_memory_peak`] (waits for queued work first).
pub fn memory_peak(dev: &Device) -> Result<Option<MemoryPeak>> {
    synchronize(dev)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let pool = default_mem_pool(cuda)?;
        let get = |attr| -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: as above; the driver writes one cuuint64_t.
            let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _) };
            driver_ok(r, "cuMemPoolGetAttribute")?;
            Ok(v)
        };
        return Ok(Some(MemoryPeak {
            allocated: get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        }));
    }
    let _ = dev;
    Ok(None)
}

/// Make `dev`'s CUDA context current on this thread (a thread that did not create it must, before
/// raw driver calls such as kernel launches; a no-op on the CPU).
pub fn bind_thread(dev: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        cuda.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Candle(candle_core::Error::Cuda(Box::new(e))))?;
    }
    let _ = dev;
    Ok(())
}

#[cfg(feature = "cuda")]
fn default_mem_pool(
    cuda: &candle_core::CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = cuda.cuda_stream().context().clone();
    ctx.bind_to_thread()
        .map_err(|e| Error::Candle(candle_core::Error::Cuda(Box::new(e))))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one pool handle for a valid device ordinal.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    driver_ok(r, "cuDeviceGetDefaultMemPool")?;
    Ok(pool)
}

#[cfg(feature = "cuda")]
fn driver_ok(
    r: candle_core::cuda_backend::cudarc::driver::sys::CUresult,
    what: &str,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUresult;
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Candle(candle_core::Error::Msg(format!(
            "{what} failed: {r:?}"
        ))))
    }
}

/// A human name for the device (GPU model where known).
pub fn describe(dev: &Device) -> String {
    match dev {
        Device::Cpu => format!(
            "cpu ({} threads)",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let ctx = cuda.cuda_stream().context().clone();
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            let cc = ctx
                .compute_capability()
                .map(|(a, b)| format!("sm_{a}{b}"))
                .unwrap_or_default();
            format!("{name} ({cc})")
        }
        _ => format!("{dev:?}"),
    }
}

/// How many CUDA GPUs this process can see (0 in builds without the `cuda` feature, or when the
/// driver is missing).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// A GPU as the devices panel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// CUDA index (`cuda:N`).
    pub index: usize,
    pub name: String,
    /// Total memory in bytes.
    pub memory: u64,
}

/// What `nvidia-smi topo -m` prints (how the GPUs are linked), read once per process; `None`
/// without `nvidia-smi`.
pub fn gpu_topology() -> Option<&'static str> {
    static TOPO: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    TOPO.get_or_init(|| {
        let out = std::process::Command::new("nvidia-smi")
            .args(["topo", "-m"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .as_deref()
}

/// The GPUs present, with their names and memory, read from the driver without creating a
/// context (no GPU memory taken). Empty in builds without the `cuda` feature.
pub fn gpus() -> Vec<GpuInfo> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        if result::init().is_err() {
            return Vec::new();
        }
        (0..cuda_device_count())
            .filter_map(|index| {
                let dev = result::device::get(index as i32).ok()?;
                // SAFETY: `dev` is a valid device handle; the driver writes a NUL-terminated name
                // of at most the buffer's length.
                let memory = unsafe { result::device::total_mem(dev) }.ok()? as u64;
                let mut buf = [0 as std::ffi::c_char; 256];
                let r = unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, dev) };
                let name = if r == sys::CUresult::CUDA_SUCCESS {
                    // SAFETY: the driver wrote a NUL-terminated string into `buf`.
                    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                } else {
                    format!("GPU {index}")
                };
                Some(GpuInfo {
                    index,
                    name,
                    memory,
                })
            })
            .collect()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_rejects_bad_names() {
        assert!(parse("cpu").is_ok_and(|d| d.is_cpu()));
        for bad in ["tpu", "cuda:x", "cuda:-1"] {
            match parse(bad) {
                Err(Error::InvalidSetting { name, .. }) => assert_eq!(name, "device"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        if !cfg!(feature = "cuda") {
            let e = parse("cuda").expect_err("no cuda in this build");
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
        assert_eq!(gpu_memory_used(&Device::Cpu), None);
        assert!(reset_memory_peak(&Device::Cpu).is_ok());
        assert!(matches!(memory_peak(&Device::Cpu), Ok(None)));
        assert!(matches!(memory_in_use(&Device::Cpu), Ok(None)));
    }
}
