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
