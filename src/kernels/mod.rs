//! Parallax's own GPU kernels, wrapped as candle custom ops.
//!
//! Kernels are CUDA C++ compiled at run time with NVRTC for the GPU that is present (no CUDA
//! toolkit is needed to build Parallax; the first use costs a fraction of a second). Every kernel
//! has a plain candle composition that computes the same function: it runs on the CPU and on any
//! input the kernel does not take, and `parallax selfcheck` compares the two on the GPU.

pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda_util;
pub mod elementwise;
pub mod flash_attn;
pub mod flash_attn_fp8;
pub mod fp8;
pub mod fp8_gemm;
pub mod gemm;
pub mod ln_fp8;
pub mod lt_algo;
pub mod nvrtc;
pub mod qkv_prep;
pub mod reference;
