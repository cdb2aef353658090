// Parallax fused QKV preparation: from the QKV projection's output to attention-ready Q, K, V.
//
// For every token of the joint (text, image) sequence and every head: split q/k/v, RMS-normalise
// q and k over the head dim with their learned scales (eps 1e-6), rotate q and k with the
// interleaved 3-axis RoPE tables, and write q, k, v as (B, H, L, D), text tokens first. This is
// one pass over the projection's output instead of the split/copy, norm, concatenate and rotate
// passes of the plain composition. f32 arithmetic, bf16 in and out. Compiled with NVRTC.
//
// Sources: up to two token streams (text: rows 0..Lt, image: rows Lt..Lt+Li), each a (B, rows,
// >= 3*H*D) bf16 tensor whose rows are `stride` elements apart (the single-stream block passes
// its fused linear1 output, whose rows also hold the MLP half).

template <int D>
__device__ __forceinline__ void qkv_prep(
    const unsigned short* __restrict__ txt, int txt_stride, const unsigned short* __restrict__ txt_qs,
    const unsigned short* __restrict__ txt_ks, const unsigned short* __restrict__ img, int img_stride,
    const unsigned short* __restrict__ img_qs, const unsigned short* __restrict__ img_ks,
    const unsigned short* __restrict__ cos_t, const unsigned short* __restrict__ sin_t,
    unsigned short* __restrict__ q, unsigned short* __restrict__ k, unsigned short* __restrict__ v,
    int Lt, int Li, int H) {
    constexpr int PAIRS = D / 2;
    constexpr int PPL = PAIRS / 32;  // pairs per lane
    const int tok = blockIdx.x;
    const int b = blockIdx.y;
    const int L = Lt + Li;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nwarps = blockDim.x >> 5;
    const bool is_txt = tok < Lt;
    const unsigned short* src = is_txt
        ? txt + ((u64)b * Lt + tok) * txt_stride
        : img + ((u64)b * Li + (tok - Lt)) * img_stride;
    const unsigned short* qs = is_txt ? txt_qs : img_qs;
    const unsigned short* ks = is_txt ? txt_ks : img_ks;
    const int HD = H * D;
    for (int h = warp; h < H; h += nwarps) {
        const u64 dst = (((u64)b * H + h) * L + tok) * D;
#pragma unroll
        for (int which = 0; which < 2; ++which) {
            const unsigned short* x = src + which * HD + h * D;
            const unsigned short* scale = which == 0 ? qs : ks;
            float a[PPL], c[PPL];
            float ss = 0.f;
#pragma unroll
            for (int j = 0; j < PPL; ++j) {
                const int p = lane + 32 * j;
                const unsigned w = *(const unsigned*)(x + 2 * p);
                a[j] = bf2f(w & 0xffff);
                c[j] = bf2f(w >> 16);
                ss += a[j] * a[j] + c[j] * c[j];
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
            const float r = rsqrtf(ss / D + 1e-6f);
            unsigned short* out = (which == 0 ? q : k) + dst;
#pragma unroll
            for (int j = 0; j < PPL; ++j) {
                const int p = lane + 32 * j;
                const float x0 = a[j] * r * bf2f(scale[2 * p]);
                const float x1 = c[j] * r * bf2f(scale[2 * p + 1]);
                const float cs = bf2f(cos_t[(u64)tok * PAIRS + p]);
                const float sn = bf2f(sin_t[(u64)tok * PAIRS + p]);
                const unsigned lo = f2bf(x0 * cs - x1 * sn);
                const unsigned hi = f2bf(x0 * sn + x1 * cs);
                *(unsigned*)(out + 2 * p) = lo | (hi << 16);
            }
        }
        const unsigned* vs = (const unsigned*)(src + 2 * HD + h * D);
        unsigned* vd = (unsigned*)(v + dst);
#pragma unroll
        for (int j = 0; j < PPL; ++j) vd[lane + 32 * j] = vs[lane + 32 * j];
    }
}

#define QKV_ARGS                                                                                 \
    const unsigned short *txt, int txt_stride, const unsigned short *txt_qs,                     \
        const unsigned short *txt_ks, const unsigned short *img, int img_stride,                 \
        const unsigned short *img_qs, const unsigned short *img_ks, const unsigned short *cos_t, \
        const unsigned short *sin_t, unsigned short *q, unsigned short *k, unsigned short *v,    \
        int Lt, int Li, int H
#define QKV_PASS txt, txt_stride, txt_qs, txt_ks, img, img_stride, img_qs, img_ks, cos_t, sin_t, q, k, v, Lt, Li, H

extern "C" __global__ void parallax_qkv_prep_bf16_d128(QKV_ARGS) { qkv_prep<128>(QKV_PASS); }
extern "C" __global__ void parallax_qkv_prep_bf16_d64(QKV_ARGS) { qkv_prep<64>(QKV_PASS); }
