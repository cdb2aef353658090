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

/// A loaded kernel and the device stream its launches go on.
#[cfg(feature = "cuda")]
pub struct Kernel {
    func: candle_core::cuda_backend::cudarc::driver::CudaFunction,
    stream: Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

#[cfg(feature = "cuda")]
impl Kernel {
    /// A launch of this kernel on the device's stream, arguments to be pushed in order.
    pub fn builder(&self) -> candle_core::cuda_backend::cudarc::driver::LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

#[cfg(feature = "cuda")]
impl std::ops::Deref for Kernel {
    type Target = candle_core::cuda_backend::cudarc::driver::CudaFunction;

    fn deref(&self) -> &Self::Target {
        &self.func
    }
}

/// `kernel` of `source` (compiled once per architecture by [`ptx_for`] under `name`), loaded on
/// `dev`.
#[cfg(feature = "cuda")]
pub fn function(
    dev: &candle_core::CudaDevice,
    name: &str,
    source: &'static str,
    accelerated: bool,
    kernel: &str,
) -> candle_core::Result<Kernel> {
    let (module, ptx) = ptx_for(dev, name, source, accelerated)?;
    Ok(Kernel {
        func: dev
            .get_or_load_custom_func(kernel, &module, &ptx)?
            .into_cuda_function(),
        stream: dev.cuda_stream(),
    })
}
