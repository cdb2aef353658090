// Parallax fused element-wise kernels (bf16 in and out, f32 arithmetic), compiled with NVRTC.
//
// - bias (+ GELU): y = x + bias[col], optionally GELU (tanh form), over (rows, N) in one pass.
// - gated residual: y = x + gate[b, col] * u over (B, L, C) with a per-sample gate.
// - LayerNorm + modulation: y = LN(x) * (1 + scale[b, col]) + shift[b, col], LN without affine
//   parameters (eps 1e-6), one block per row.
// - SwiGLU: silu(gate) * up, the halves read in place from a wider product, optionally written
//   beside another tensor.
// - column copy: a tensor written into the first columns of a wider buffer (rows at a stride).
// All vectorised 8 values (16 bytes) at a time; N and C must be multiples of 8.

struct __align__(16) U4 { unsigned x, y, z, w; };
struct __align__(8) U2 { unsigned x, y; };
struct V8 { float v[8]; };

__device__ __forceinline__ V8 load8(const unsigned short* p) {
    const U4 w = *(const U4*)p;
    V8 r;
    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        r.v[2 * i] = bf2f(ws[i] & 0xffff);
        r.v[2 * i + 1] = bf2f(ws[i] >> 16);
    }
    return r;
}

__device__ __forceinline__ void store8(unsigned short* p, const V8& r) {
    unsigned ws[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) ws[i] = (unsigned)f2bf(r.v[2 * i]) | ((unsigned)f2bf(r.v[2 * i + 1]) << 16);
    U4 o;
    o.x = ws[0];
    o.y = ws[1];
    o.z = ws[2];
    o.w = ws[3];
    *(U4*)p = o;
}

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;
    return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

template <bool GELU>
__device__ __forceinline__ void bias_act(const unsigned short* __restrict__ x,
                                         const unsigned short* __restrict__ bias,
                                         unsigned short* __restrict__ y, u64 n8, int N) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        const u64 off = i * 8;
        const int col = (int)(off % (u64)N);
        V8 a = load8(x + off);
        const V8 b = load8(bias + col);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float s = a.v[j] + b.v[j];
            a.v[j] = GELU ? gelu_tanh(s) : s;
        }
        store8(y + off, a);
    }
}

extern "C" __global__ void parallax_bias_bf16(const unsigned short* x, const unsigned short* bias,
                                              unsigned short* y, u64 n8, int N) {
    bias_act<false>(x, bias, y, n8, N);
}

extern "C" __global__ void parallax_bias_gelu_bf16(const unsigned short* x, const unsigned short* bias,
                                                   unsigned short* y, u64 n8, int N) {
    bias_act<true>(x, bias, y, n8, N);
}

// out = [a, GELU(y + bias)] along the last axis: a (rows, A), y (rows, M), bias (M), out (rows,
// A + M). The single-stream block's attention output and MLP activation, joined for linear2 in
// the same pass that applies the MLP's bias and GELU (no separate concatenation copy).
extern "C" __global__ void parallax_cat_bias_gelu_bf16(const unsigned short* __restrict__ a,
                                                       const unsigned short* __restrict__ y,
                                                       const unsigned short* __restrict__ bias,
                                                       unsigned short* __restrict__ out, u64 n8,
                                                       int A, int M) {
    const int W8 = (A + M) / 8;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / W8;
        const int c = (int)(i % W8) * 8;
        if (c < A) {
            *(U4*)(out + i * 8) = *(const U4*)(a + r * A + c);
        } else {
            const int cm = c - A;
            V8 v = load8(y + r * M + cm);
            const V8 b = load8(bias + cm);
#pragma unroll
            for (int j = 0; j < 8; ++j) v.v[j] = gelu_tanh(v.v[j] + b.v[j]);
            store8(out + i * 8, v);
        }
    }
}

// out[r, 0:A] = a[r, :] for rows r of out at stride LD (a contiguous, rows of A values): the
// tensor a product is joined to, copied into the wider buffer the product wrote its columns of.
extern "C" __global__ void parallax_copy_columns_bf16(const unsigned short* __restrict__ a,
                                                      unsigned short* __restrict__ out, u64 n8,
                                                      int A, u64 LD) {
    const int A8 = A / 8;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / A8;
        const int c = (int)(i % A8) * 8;
        *(U4*)(out + r * LD + c) = *(const U4*)(a + i * 8);
    }
}

// y = x + gate[b] * u; x, u, y: (B, L, C); gate: (B, C).
extern "C" __global__ void parallax_gated_residual_bf16(const unsigned short* __restrict__ x,
                                                        const unsigned short* __restrict__ gate,
                                                        const unsigned short* __restrict__ u,
                                                        unsigned short* __restrict__ y, u64 n8,
                                                        int L, int C) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        const u64 off = i * 8;
        const int col = (int)(off % (u64)C);
        const u64 b = off / ((u64)L * C);
        V8 a = load8(x + off);
        const V8 g = load8(gate + b * C + col);
        const V8 w = load8(u + off);
#pragma unroll
        for (int j = 0; j < 8; ++j) a.v[j] += g.v[j] * w.v[j];
        store8(y + off, a);
    }
}

// One block per row of C values, C/8 threads (each 8 values). x, y: (B, L, C); shift, scale: (B, C).
extern "C" __global__ void parallax_ln_modulate_bf16(const unsigned short* __restrict__ x,
                                                     const unsigned short* __restrict__ shift,
                                                     const unsigned short* __restrict__ scale,
                                                     unsigned short* __restrict__ y, int L, int C) {
    __shared__ float red[32];
    const u64 row = blockIdx.x;
    const u64 b = row / L;
    const int col = threadIdx.x * 8;
    const bool active = col < C;
    V8 a;
    float s = 0.f;
    if (active) {
        a = load8(x + row * C + col);
#pragma unroll
        for (int j = 0; j < 8; ++j) s += a.v[j];
    }
    const float mean = block_sum(s, red) / C;
    float q = 0.f;
    if (active) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float d = a.v[j] - mean;
            q += d * d;
        }
    }
    const float rstd = rsqrtf(block_sum(q, red) / C + 1e-6f);
    if (active) {
        const V8 sh = load8(shift + b * C + col);
        const V8 sc = load8(scale + b * C + col);
#pragma unroll
        for (int j = 0; j < 8; ++j) a.v[j] = (a.v[j] - mean) * rstd * (1.f + sc.v[j]) + sh.v[j];
        store8(y + row * C + col, a);
    }
}

// GroupNorm statistics, step 1: partial sums of one slice of one (batch, group) range.
// x: (B*G) contiguous ranges of `per` values; grid (S, B*G); partial sums go to
// psum/psq[(bg * S + split)] and are added up afterwards in a fixed order (deterministic).
extern "C" __global__ void parallax_group_partial_sums_bf16(const unsigned short* __restrict__ x,
                                                             float* __restrict__ psum,
                                                             float* __restrict__ psq, u64 per,
                                                             u64 chunk) {
    __shared__ float r1[32], r2[32];
    const u64 bg = blockIdx.y;
    const int S = gridDim.x;
    const u64 start = blockIdx.x * chunk;
    const u64 end = start + chunk < per ? start + chunk : per;
    const unsigned short* base = x + bg * per;
    float s = 0.f, q = 0.f;
    for (u64 i = start + threadIdx.x * 8; i < end; i += (u64)blockDim.x * 8) {
        const V8 a = load8(base + i);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s += a.v[j];
            q += a.v[j] * a.v[j];
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffff, s, o);
        q += __shfl_xor_sync(0xffffffff, q, o);
    }
    if (lane == 0) {
        r1[warp] = s;
        r2[warp] = q;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float ts = 0.f, tq = 0.f;
        for (int w = 0; w < nw; ++w) {
            ts += r1[w];
            tq += r2[w];
        }
        psum[bg * S + blockIdx.x] = ts;
        psq[bg * S + blockIdx.x] = tq;
    }
}

// GroupNorm, step 2 (with the statistics folded into per-channel a and c):
// y = x * a[b, c] + c[b, c], then swish if asked. x, y: (B, C, HW) with HW a multiple of 8.
extern "C" __global__ void parallax_channel_affine_bf16(const unsigned short* __restrict__ x,
                                                        const float* __restrict__ a,
                                                        const float* __restrict__ c,
                                                        unsigned short* __restrict__ y, u64 n8,
                                                        u64 hw, int swish) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        const u64 off = i * 8;
        const u64 bc = off / hw;  // (batch * C + channel)
        const float av = a[bc], cv = c[bc];
        V8 v = load8(x + off);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float t = v.v[j] * av + cv;
            v.v[j] = swish ? t / (1.f + __expf(-t)) : t;
        }
        store8(y + off, v);
    }
}

// Convolution epilogue, in place: y += bias[channel] (+ r), y and r (B, C, HW) with HW a multiple
// of 8, bias (C). One pass instead of a broadcast add and a residual add, no new tensor.
template <bool RES>
__device__ __forceinline__ void channel_bias(unsigned short* __restrict__ y,
                                             const unsigned short* __restrict__ bias,
                                             const unsigned short* __restrict__ r, u64 n8, u64 hw,
                                             u64 C) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        const u64 off = i * 8;
        const float b = bf2f(bias[(off / hw) % C]);
        V8 v = load8(y + off);
        if (RES) {
            const V8 s = load8(r + off);
#pragma unroll
            for (int j = 0; j < 8; ++j) v.v[j] += s.v[j];
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) v.v[j] += b;
        store8(y + off, v);
    }
}

extern "C" __global__ void parallax_channel_bias_bf16(unsigned short* y, const unsigned short* bias,
                                                      u64 n8, u64 hw, u64 C) {
    channel_bias<false>(y, bias, nullptr, n8, hw, C);
}

extern "C" __global__ void parallax_channel_bias_residual_bf16(unsigned short* y,
                                                               const unsigned short* bias,
                                                               const unsigned short* r, u64 n8,
                                                               u64 hw, u64 C) {
    channel_bias<true>(y, bias, r, n8, hw, C);
}

// Nearest-neighbour 2x upsampling of x (planes of h x w, w a multiple of 4) into y (planes of
// 2h x 2w): each thread reads 4 values (8 bytes) and writes 8 values (16 bytes) to two rows.
extern "C" __global__ void parallax_upsample2x_bf16(const unsigned short* __restrict__ x,
                                                    unsigned short* __restrict__ y, u64 n4, u64 w) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n4; i += (u64)gridDim.x * blockDim.x) {
        const u64 off = i * 4;
        const u64 row = off / w;  // plane * h + input row
        const u64 col = off % w;
        const U2 v = *(const U2*)(x + off);
        const unsigned a = v.x & 0xffff, b = v.x >> 16, c = v.y & 0xffff, d = v.y >> 16;
        U4 o;
        o.x = a | (a << 16);
        o.y = b | (b << 16);
        o.z = c | (c << 16);
        o.w = d | (d << 16);
        unsigned short* out = y + (2 * row) * (2 * w) + 2 * col;
        *(U4*)out = o;
        *(U4*)(out + 2 * w) = o;
    }
}

// Softmax over each row of `n` values (n a multiple of 8), one block of 1024 threads per row,
// for long rows (the autoencoder's attention scores: up to 2^20 per row). Pass 1 keeps a running
// (max, sum of exp) per thread and merges them across the block; pass 2 writes exp(x - max) / sum.
extern "C" __global__ void parallax_softmax_rows_bf16(const unsigned short* __restrict__ x,
                                                      unsigned short* __restrict__ y, u64 n) {
    __shared__ float red_m[32], red_s[32];
    const unsigned short* xr = x + (u64)blockIdx.x * n;
    unsigned short* yr = y + (u64)blockIdx.x * n;
    float m = NEG_INF, s = 0.f;
    for (u64 off = (u64)threadIdx.x * 8; off < n; off += (u64)blockDim.x * 8) {
        const V8 a = load8(xr + off);
        float cm = a.v[0];
#pragma unroll
        for (int j = 1; j < 8; ++j) cm = fmaxf(cm, a.v[j]);
        const float nm = fmaxf(m, cm);
        if (nm == NEG_INF) continue;  // all -inf so far: nothing to add
        float cs = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) cs += __expf(a.v[j] - nm);
        s = (m == NEG_INF ? 0.f : s * __expf(m - nm)) + cs;
        m = nm;
    }
    // Merge (m, s) pairs: over the warp, then over the warps.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffff, m, o);
        const float os = __shfl_xor_sync(0xffffffff, s, o);
        const float nm = fmaxf(m, om);
        s = (m == NEG_INF ? 0.f : s * __expf(m - nm)) + (om == NEG_INF ? 0.f : os * __expf(om - nm));
        m = nm;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        red_m[warp] = m;
        red_s[warp] = s;
    }
    __syncthreads();
    float gm = NEG_INF;
    for (int w = 0; w < nw; ++w) gm = fmaxf(gm, red_m[w]);
    float gs = 0.f;
    for (int w = 0; w < nw; ++w)
        if (red_m[w] != NEG_INF) gs += red_s[w] * __expf(red_m[w] - gm);
    const float inv = 1.f / gs;
    for (u64 off = (u64)threadIdx.x * 8; off < n; off += (u64)blockDim.x * 8) {
        V8 a = load8(xr + off);
#pragma unroll
        for (int j = 0; j < 8; ++j) a.v[j] = __expf(a.v[j] - gm) * inv;
        store8(yr + off, a);
    }
}

// SwiGLU, optionally joined after another tensor: out (rows, A + F) = [a, silu(g) * u], with a
// (rows, A) contiguous, and row r of g and u starting at g + r * S and u + r * S (the two halves
// of a wider product read in place: u = g + F for FLUX.2's [gate | up] rows, S the product's
// row length). A = 0 writes the SwiGLU alone (a is not read). A, F and S multiples of 8.
extern "C" __global__ void parallax_cat_swiglu_bf16(const unsigned short* __restrict__ a,
                                                    const unsigned short* __restrict__ g,
                                                    const unsigned short* __restrict__ u,
                                                    unsigned short* __restrict__ out, u64 n8,
                                                    int A, int F, u64 S) {
    const u64 W8 = (u64)(A + F) / 8;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / W8;
        const int c = (int)(i - r * W8) * 8;
        if (c < A) {
            *(U4*)(out + i * 8) = *(const U4*)(a + r * A + c);
        } else {
            const u64 off = r * S + (u64)(c - A);
            V8 x = load8(g + off);
            const V8 y = load8(u + off);
#pragma unroll
            for (int j = 0; j < 8; ++j) x.v[j] = x.v[j] / (1.f + __expf(-x.v[j])) * y.v[j];
            store8(out + i * 8, x);
        }
    }
}
