// LayerNorm + adaLN modulation whose output rows are quantised to E4M3 in the same pass, for a
// FLUX block's FP8 products (qkv, linear1, the MLP's first layer). Compiled after fp8_quant.cu
// (its Q4/Q2 words and f32x2_to_e4m3x2).
//
// Row by row it computes what parallax_ln_modulate_bf16 computes (y = LN(x) * (1 + scale[b]) +
// shift[b], LN without affine parameters, eps 1e-6, f32 arithmetic, y rounded to bf16) and then
// what parallax_fp8_quant_rows_bf16 does to those bf16 values: the row's largest magnitude m,
// its scale m / 448 (1 for a row of zeros or a non-finite maximum) in qscale[row], and every value
// multiplied by its reciprocal (e4m3_inv) and converted with the hardware's round-to-nearest-even, saturating conversion.
// The bf16 rows are written to `y` only when `y` is not null (nothing else reads them when every
// consumer is an FP8 product). One block per row, C/8 threads (eight values each); C a multiple
// of 16.

extern "C" __global__ void parallax_ln_modulate_fp8_bf16(const unsigned short* __restrict__ x,
                                                         const unsigned short* __restrict__ shift,
                                                         const unsigned short* __restrict__ scale,
                                                         unsigned short* __restrict__ y,
                                                         unsigned char* __restrict__ q,
                                                         float* __restrict__ qscale, int L, int C) {
    __shared__ float red[32];
    const u64 row = blockIdx.x;
    const u64 b = row / L;
    const int col = threadIdx.x * 8;
    const bool active = col < C;
    float v[8];
    float s = 0.f;
    if (active) {
        const Q4 w = *(const Q4*)(x + row * C + col);
        const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = bf2f(ws[i] & 0xffff);
            v[2 * i + 1] = bf2f(ws[i] >> 16);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) s += v[j];
    }
    const float mean = block_sum(s, red) / C;
    float sq = 0.f;
    if (active) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float d = v[j] - mean;
            sq += d * d;
        }
    }
    const float rstd = rsqrtf(block_sum(sq, red) / C + 1e-6f);
    // The modulated values rounded to bf16 (what the unfused norm writes), and their largest
    // magnitude.
    float m = 0.f;
    if (active) {
        const Q4 hw = *(const Q4*)(shift + b * C + col);
        const Q4 cw = *(const Q4*)(scale + b * C + col);
        const unsigned hs[4] = {hw.x, hw.y, hw.z, hw.w};
        const unsigned cs[4] = {cw.x, cw.y, cw.z, cw.w};
        unsigned out[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            unsigned short o2[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int j = 2 * i + h;
                const float sh = bf2f(h ? (hs[i] >> 16) : (hs[i] & 0xffff));
                const float sc = bf2f(h ? (cs[i] >> 16) : (cs[i] & 0xffff));
                o2[h] = f2bf((v[j] - mean) * rstd * (1.f + sc) + sh);
                v[j] = bf2f(o2[h]);
                m = fmaxf(m, fabsf(v[j]));
            }
            out[i] = (unsigned)o2[0] | ((unsigned)o2[1] << 16);
        }
        if (y) {
            Q4 o;
            o.x = out[0];
            o.y = out[1];
            o.z = out[2];
            o.w = out[3];
            *(Q4*)(y + row * C + col) = o;
        }
    }
    const float qs = e4m3_scale(block_max(m, red));
    if (threadIdx.x == 0) qscale[row] = qs;
    if (active) {
        const float inv = e4m3_inv(qs);
        unsigned short o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            o[i] = f32x2_to_e4m3x2(__fmul_rn(v[2 * i], inv), __fmul_rn(v[2 * i + 1], inv));
        Q2 w;
        w.x = (unsigned)o[0] | ((unsigned)o[1] << 16);
        w.y = (unsigned)o[2] | ((unsigned)o[3] << 16);
        *(Q2*)(q + row * C + col) = w;
    }
}
