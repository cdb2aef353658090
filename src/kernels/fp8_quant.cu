// FP8 (E4M3) quantisation of bf16 rows, compiled with NVRTC for sm_89 and newer.
//
// One block per row: the row's largest magnitude (read once, kept in L1/L2 for the second read),
// its scale amax / 448 written to `scale[row]`, then every value divided by the scale (a true
// division, so the result matches the CPU's rounding in `fp8.rs` bit for bit) and
// converted with the hardware's round-to-nearest-even, saturating conversion. With `fixed`
// non-null every row uses `*fixed` as its scale instead (per-tensor quantisation; the caller
// computed it). Rows of zeros get scale 1. `k` must be a multiple of 8.

struct __align__(16) Q4 { unsigned x, y, z, w; };
struct __align__(8) Q2 { unsigned x, y; };

__device__ __forceinline__ unsigned short f32x2_to_e4m3x2(float lo, float hi) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

extern "C" __global__ void parallax_fp8_quant_rows_bf16(
    const unsigned short* __restrict__ x,
    unsigned char* __restrict__ q,
    float* __restrict__ scale,
    const float* __restrict__ fixed,
    int k) {
    const long long row = blockIdx.x;
    const unsigned short* xr = x + row * (long long)k;
    unsigned char* qr = q + row * (long long)k;
    __shared__ float warp_max[32];
    __shared__ float row_scale;

    float s;
    if (fixed) {
        s = *fixed;
    } else {
        float m = 0.f;
        for (int c = threadIdx.x * 8; c < k; c += blockDim.x * 8) {
            const Q4 w = *(const Q4*)(xr + c);
            const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                m = fmaxf(m, fabsf(bf2f(ws[i] & 0xffff)));
                m = fmaxf(m, fabsf(bf2f(ws[i] >> 16)));
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
        if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
        __syncthreads();
        if (threadIdx.x == 0) {
            float mm = 0.f;
            for (int i = 0; i < (int)(blockDim.x >> 5); ++i) mm = fmaxf(mm, warp_max[i]);
            // Non-finite rows keep scale 1 (their values saturate) rather than poisoning the row.
            row_scale = (mm > 0.f && mm < 3.0e38f) ? mm / 448.f : 1.f;
            scale[row] = row_scale;
        }
        __syncthreads();
        s = row_scale;
    }
    for (int c = threadIdx.x * 8; c < k; c += blockDim.x * 8) {
        const Q4 w = *(const Q4*)(xr + c);
        const unsigned ws[4] = {w.x, w.y, w.z, w.w};
        unsigned short o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            o[i] = f32x2_to_e4m3x2(__fdiv_rn(bf2f(ws[i] & 0xffff), s), __fdiv_rn(bf2f(ws[i] >> 16), s));
        Q2 out;
        out.x = (unsigned)o[0] | ((unsigned)o[1] << 16);
        out.y = (unsigned)o[2] | ((unsigned)o[3] << 16);
        *(Q2*)(qr + c) = out;
    }
    if (fixed && threadIdx.x == 0) scale[row] = s;
}
