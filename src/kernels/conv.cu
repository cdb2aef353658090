// Parallax convolution helper (bf16), compiled with NVRTC: the column matrix of a 2D
// convolution laid out (K, M) -- one row per kernel tap kk = (ci * k + ky) * k + kx, one column
// per output position m = oy * wo + ox -- so that weight (Cout, K) x col (K, M) is the output
// (Cout, M) already in NCHW order. It covers output rows [r0, r0 + rows) only, reading the whole
// input map and treating everything outside it as zero: a band needs no padded copy of its input.
//
// Grid: x over the columns (8 per thread), y over the taps, z over the batch. Writes are 16-byte
// vectors when the band's column count is a multiple of 8, reads are per element (the same input
// element serves nine taps, which L1/L2 absorb).

struct __align__(16) ColU4 { unsigned x, y, z, w; };

extern "C" __global__ void parallax_im2col_bf16(const unsigned short* __restrict__ x,
                                                unsigned short* __restrict__ col, int cin, int h,
                                                int w, int k, int stride, int pad, int r0,
                                                int rows, int wo) {
    const int kk = blockIdx.y;
    const int b = blockIdx.z;
    const int kx = kk % k, ky = (kk / k) % k, ci = kk / (k * k);
    const u64 m_count = (u64)rows * (u64)wo;
    const unsigned short* xp = x + ((u64)b * cin + ci) * (u64)h * (u64)w;
    unsigned short* cp = col + ((u64)b * cin * k * k + kk) * m_count;
    const bool vec = (m_count % 8) == 0;
    for (u64 m0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * 8; m0 < m_count;
         m0 += (u64)gridDim.x * blockDim.x * 8) {
        int oy = (int)(m0 / (u64)wo), ox = (int)(m0 % (u64)wo);
        unsigned short v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int iy = (r0 + oy) * stride + ky - pad;
            const int ix = ox * stride + kx - pad;
            const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
            v[j] = inside ? xp[(u64)iy * w + ix] : (unsigned short)0;
            if (++ox == wo) {
                ox = 0;
                ++oy;
            }
        }
        if (vec) {
            ColU4 o;
            o.x = (unsigned)v[0] | ((unsigned)v[1] << 16);
            o.y = (unsigned)v[2] | ((unsigned)v[3] << 16);
            o.z = (unsigned)v[4] | ((unsigned)v[5] << 16);
            o.w = (unsigned)v[6] | ((unsigned)v[7] << 16);
            *(ColU4*)(cp + m0) = o;
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (m0 + j < m_count) cp[m0 + j] = v[j];
        }
    }
}

// Eight consecutive values of an input row starting at column c0 + DX (c0 a multiple of 8),
// zeros outside [0, w): the aligned 16-byte chunk at c0 and, for DX != 0, its neighbour.
template <int DX>
__device__ __forceinline__ ColU4 row8(const unsigned short* __restrict__ row, int c0, int w) {
    const ColU4 zero = {0u, 0u, 0u, 0u};
    const ColU4 a = c0 < w ? *(const ColU4*)(row + c0) : zero;
    if (DX == 0) return a;
    const int nb = DX < 0 ? c0 - 8 : c0 + 8;
    const ColU4 b = (nb >= 0 && nb < w) ? *(const ColU4*)(row + nb) : zero;
    // 16 values lo..hi in order, then the window starting at 8 + DX (DX < 0) or DX (DX > 0).
    const ColU4 lo = DX < 0 ? b : a, hi = DX < 0 ? a : b;
    const unsigned v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    const int s = DX < 0 ? 8 + DX : DX;  // first value of the window, 1..7
    unsigned o[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int e = s + 2 * i;  // element index of o[i]'s low half
        o[i] = (e & 1) ? __funnelshift_r(v[e >> 1], v[(e >> 1) + 1], 16) : v[e >> 1];
    }
    ColU4 r = {o[0], o[1], o[2], o[3]};
    return r;
}

// The same column matrix as parallax_im2col_bf16 for stride 1 when the map's width and the
// output width are multiples of 8 and the kernel's horizontal offsets (kx - pad) lie in -1..1:
// each thread reads one or two aligned 16-byte chunks of an input row instead of eight values.
extern "C" __global__ void parallax_im2col_s1_bf16(const unsigned short* __restrict__ x,
                                                   unsigned short* __restrict__ col, int cin, int h,
                                                   int w, int k, int pad, int r0, int rows,
                                                   int wo) {
    const int kk = blockIdx.y;
    const int b = blockIdx.z;
    const int kx = kk % k, ky = (kk / k) % k, ci = kk / (k * k);
    const int dx = kx - pad;
    const u64 m_count = (u64)rows * (u64)wo;
    const unsigned short* xp = x + ((u64)b * cin + ci) * (u64)h * (u64)w;
    unsigned short* cp = col + ((u64)b * cin * k * k + kk) * m_count;
    const ColU4 zero = {0u, 0u, 0u, 0u};
    for (u64 m0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * 8; m0 < m_count;
         m0 += (u64)gridDim.x * blockDim.x * 8) {
        const int oy = (int)(m0 / (u64)wo), ox0 = (int)(m0 % (u64)wo);
        const int iy = r0 + oy + ky - pad;
        ColU4 o = zero;
        if (iy >= 0 && iy < h) {
            const unsigned short* row = xp + (u64)iy * w;
            o = dx < 0 ? row8<-1>(row, ox0, w) : dx > 0 ? row8<1>(row, ox0, w) : row8<0>(row, ox0, w);
        }
        *(ColU4*)(cp + m0) = o;
    }
}
