//! Run-time compilation of Parallax's CUDA kernels with NVRTC, once per kernel source and GPU
//! architecture.

#[cfg(feature = "cuda")]
use std::collections::HashMap;
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex};

/// The compute capability (major, minor) of `dev`.
#[cfg(feature = "cuda")]
pub fn compute_capability(dev: &candle_core::CudaDevice) -> candle_core::Result<(i32, i32)> {
    dev.cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
}

/// PTX for `source` built for `dev`'s architecture, and the module name to load it under.
/// `accelerated` builds for the architecture-specific target (`sm_90a`), which the Hopper-only
/// instructions (wgmma) need.
#[cfg(feature = "cuda")]
pub fn ptx_for(
    dev: &candle_core::CudaDevice,
    name: &str,
    source: &'static str,
    accelerated: bool,
) -> candle_core::Result<(String, Arc<str>)> {
    // Shared, not copied: the PTX is looked up at every launch.
    static CACHE: Mutex<Option<HashMap<String, Arc<str>>>> = Mutex::new(None);
    let (major, minor) = compute_capability(dev)?;
    if major < 8 {
        candle_core::bail!(
            "Parallax's kernels need an sm_80 or newer GPU (found sm_{major}{minor})"
        );
    }
    let arch = format!("sm_{major}{minor}{}", if accelerated { "a" } else { "" });
    let module = format!("parallax_{name}_{arch}");
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(ptx) = cache.get(&module) {
        return Ok((module, ptx.clone()));
    }
    let start = std::time::Instant::now();
    let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
        arch: Some(Box::leak(arch.clone().into_boxed_str())),
        options: vec!["-std=c++17".into()],
        ..Default::default()
    };
    let ptx: Arc<str> =
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(source, opts)
            .map_err(|e| candle_core::Error::Cuda(format!("NVRTC failed on {name}: {e:?}").into()))?
            .to_src()
            .into();
    tracing::info!(
        "compiled {name} for {arch} in {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    cache.insert(module.clone(), ptx.clone());
    Ok((module, ptx))
}
