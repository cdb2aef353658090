// Parallax CUDA kernels: helpers every kernel source shares. Prepended to each source before
// NVRTC compiles it (see the `SOURCE` constants), since NVRTC gets no include path and no CUDA
// headers (bf16 values travel as 16-bit integers).

#define NEG_INF __int_as_float(0xff800000)
typedef unsigned long long u64;

__device__ __forceinline__ float bf2f(unsigned short v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;  // NaN
    u += 0x7fff + ((u >> 16) & 1);                      // round to nearest even
    return (unsigned short)(u >> 16);
}

// Two floats to one bf16x2 word (`lo` in the low half), rounded to nearest.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The sum over the block of every thread's `s` (warps first, then the warps' sums in order, so
// every caller adds in the same order), returned to every thread. `red` is 32 floats of shared
// memory; the closing barrier lets the caller reuse it at once.
__device__ __forceinline__ float block_sum(float s, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    float tot = 0.f;
    for (int w = 0; w < nw; ++w) tot += red[w];
    __syncthreads();
    return tot;
}

// The largest of every thread's `m` (a magnitude, >= 0) over the block, returned to every thread;
// `red` and the closing barrier as block_sum's.
__device__ __forceinline__ float block_max(float m, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < nw; ++w) r = fmaxf(r, red[w]);
    __syncthreads();
    return r;
}

// The E4M3 scale of values whose largest magnitude is `m`: m / 448 (448 is E4M3's largest value),
// at least the smallest normal f32 (so its reciprocal is finite: rows of tiny values would
// otherwise get an infinite one, and their zeros 0 * inf = NaN), or 1 where m is 0 or not finite
// (the values then saturate rather than poison the scale). `fp8::e4m3_scale` on the CPU.
__device__ __forceinline__ float e4m3_scale(float m) {
    return (m > 0.f && m < 3.0e38f) ? fmaxf(m / 448.f, 1.17549435e-38f) : 1.f;
}

// What values are multiplied by before the E4M3 conversion: the scale's correctly rounded
// reciprocal (one per row or group), each product rounded to nearest (`__fmul_rn`, never fused),
// exactly as the CPU's simulation computes `x * (1 / s)`; a true division per value cost about
// ten instructions each and made the quantisers compute-bound.
__device__ __forceinline__ float e4m3_inv(float s) { return __frcp_rn(s); }

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
    // bytes < 16 zero-fills the rest (rows past the end read as zeros).
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

