// FP8 (E4M3) quantisation of bf16 rows, compiled with NVRTC for sm_89 and newer.
//
// One block per row: the row's largest magnitude (its values kept in registers for the second
// pass, see KEEP), its scale amax / 448 written to `scale[row]`, then every value multiplied by
// the scale's correctly rounded reciprocal (`e4m3_inv`: the CPU's rounding in `fp8.rs` computes
// the same products, so the two match bit for bit) and converted with the hardware's
// round-to-nearest-even, saturating conversion. With `fixed`
// non-null every row uses `*fixed` as its scale instead (per-tensor quantisation; the caller
// computed it). Rows of zeros get scale 1. `k` must be a multiple of 8.

struct __align__(16) Q4 { unsigned x, y, z, w; };
struct __align__(8) Q2 { unsigned x, y; };

__device__ __forceinline__ unsigned short f32x2_to_e4m3x2(float lo, float hi) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// Eight bf16 values times `inv` (a scale's reciprocal) written as eight E4M3 bytes at `dst`.
__device__ __forceinline__ void quantise8(const Q4 w, float inv, unsigned char* dst) {
    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
    unsigned short o[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        o[i] = f32x2_to_e4m3x2(__fmul_rn(bf2f(ws[i] & 0xffff), inv),
                               __fmul_rn(bf2f(ws[i] >> 16), inv));
    Q2 out;
    out.x = (unsigned)o[0] | ((unsigned)o[1] << 16);
    out.y = (unsigned)o[2] | ((unsigned)o[3] << 16);
    *(Q2*)dst = out;
}

__device__ __forceinline__ float max8(const Q4 w, float m) {
    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m = fmaxf(m, fabsf(bf2f(ws[i] & 0xffff)));
        m = fmaxf(m, fabsf(bf2f(ws[i] >> 16)));
    }
    return m;
}

// Chunks of 8 values a thread keeps in registers between the maximum and the quantisation: rows
// of up to KEEP * 8 * blockDim.x values (16,384 with 256 threads, every FLUX/klein activation)
// are read from memory once; longer rows are read twice.
#define KEEP 8

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
    const int step = blockDim.x * 8;
    const bool kept = k <= KEEP * step;
    Q4 keep[KEEP];
    if (kept) {
#pragma unroll
        for (int i = 0; i < KEEP; ++i) {
            const int c = threadIdx.x * 8 + i * step;
            if (c < k) keep[i] = *(const Q4*)(xr + c);
        }
    }

    float s;
    if (fixed) {
        s = *fixed;
    } else {
        float m = 0.f;
        if (kept) {
#pragma unroll
            for (int i = 0; i < KEEP; ++i)
                if (threadIdx.x * 8 + i * step < k) m = max8(keep[i], m);
        } else {
            for (int c = threadIdx.x * 8; c < k; c += step) m = max8(*(const Q4*)(xr + c), m);
        }
        s = e4m3_scale(block_max(m, warp_max));
        if (threadIdx.x == 0) scale[row] = s;
    }
    const float inv = e4m3_inv(s);
    if (kept) {
#pragma unroll
        for (int i = 0; i < KEEP; ++i) {
            const int c = threadIdx.x * 8 + i * step;
            if (c < k) quantise8(keep[i], inv, qr + c);
        }
    } else {
        for (int c = threadIdx.x * 8; c < k; c += step) quantise8(*(const Q4*)(xr + c), inv, qr + c);
    }
    if (fixed && threadIdx.x == 0) scale[row] = s;
}

// Two E4M3 values (low byte first in memory) as two floats, through the hardware conversion.
__device__ __forceinline__ float2 e4m3x2_to_f32x2(unsigned short v) {
    unsigned h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(v));
    unsigned short lo = (unsigned short)(h2 & 0xffff), hi = (unsigned short)(h2 >> 16);
    float a, b;
    asm("cvt.f32.f16 %0, %1;" : "=f"(a) : "h"(lo));
    asm("cvt.f32.f16 %0, %1;" : "=f"(b) : "h"(hi));
    return make_float2(a, b);
}

// The bf16 matrix an Fp8Matrix stands for: out[r, c] = q[r, c] · scale[r]. Grid-stride over
// groups of 8 values (`k` is a multiple of 16).
extern "C" __global__ void parallax_fp8_dequant_rows_bf16(
    const unsigned char* __restrict__ q,
    const float* __restrict__ scale,
    unsigned short* __restrict__ out,
    long long rows,
    int k) {
    const long long groups = rows * (long long)(k / 8);
    for (long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x; g < groups;
         g += (long long)gridDim.x * blockDim.x) {
        const long long r = g / (k / 8);
        const float s = scale[r];
        const Q2 w = *(const Q2*)(q + g * 8);
        const unsigned ws[2] = {w.x, w.y};
        Q4 o;
        unsigned os[4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float2 a = e4m3x2_to_f32x2((unsigned short)(ws[i] & 0xffff));
            const float2 b = e4m3x2_to_f32x2((unsigned short)(ws[i] >> 16));
            os[2 * i] = pack_bf16x2(a.x * s, a.y * s);
            os[2 * i + 1] = pack_bf16x2(b.x * s, b.y * s);
        }
        o.x = os[0]; o.y = os[1]; o.z = os[2]; o.w = os[3];
        *(Q4*)(out + g * 8) = o;
    }
}

// y[b, r] = scale[r] · Σ_c q[r, c] · x[b, c] (+ bias[r]), in bf16, for a few rows `b` of x: the
// adaLN modulations' product on a conditioning vector, reading the FP8 weight once (a memory-
// bound matrix-vector product, half the bytes of a bf16 weight). One warp per output row; each
// lane reads 8 weight bytes at a time. `k` is a multiple of 8; at most 8 rows of x.
extern "C" __global__ void parallax_fp8_gemv_bf16(
    const unsigned char* __restrict__ q,
    const float* __restrict__ scale,
    const unsigned short* __restrict__ bias,
    const unsigned short* __restrict__ x,
    unsigned short* __restrict__ y,
    int n,
    int k,
    int batch) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= n) return;
    const unsigned char* qr = q + (long long)warp * k;
    float acc[8];
#pragma unroll
    for (int b = 0; b < 8; ++b) acc[b] = 0.f;
    for (int c = lane * 8; c < k; c += 256) {
        const Q2 w = *(const Q2*)(qr + c);
        const float2 w0 = e4m3x2_to_f32x2((unsigned short)(w.x & 0xffff));
        const float2 w1 = e4m3x2_to_f32x2((unsigned short)(w.x >> 16));
        const float2 w2 = e4m3x2_to_f32x2((unsigned short)(w.y & 0xffff));
        const float2 w3 = e4m3x2_to_f32x2((unsigned short)(w.y >> 16));
        const float wv[8] = {w0.x, w0.y, w1.x, w1.y, w2.x, w2.y, w3.x, w3.y};
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            if (b < batch) {
                const Q4 xv = *(const Q4*)(x + (long long)b * k + c);
                const unsigned xs[4] = {xv.x, xv.y, xv.z, xv.w};
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    s = fmaf(wv[2 * i], bf2f(xs[i] & 0xffff), s);
                    s = fmaf(wv[2 * i + 1], bf2f(xs[i] >> 16), s);
                }
                acc[b] += s;
            }
        }
    }
#pragma unroll
    for (int b = 0; b < 8; ++b) {
        float v = acc[b];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        acc[b] = v;
    }
    if (lane == 0) {
        const float s = scale[warp];
        const float bb = bias ? bf2f(bias[warp]) : 0.f;
        for (int b = 0; b < batch; ++b) y[(long long)b * n + warp] = f2bf(acc[b] * s + bb);
    }
}
