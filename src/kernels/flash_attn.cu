// Parallax fused attention (forward), bf16 in, bf16 out, f32 accumulation.
//
// softmax(Q K^T * scale) V for non-causal attention, one (batch*head) per grid row, 128 query rows
// per block (16 per warp, 8 warps), keys and values streamed through shared memory 64 at a time, and an
// online softmax so the L x L score matrix never exists. Tensor-core products use
// mma.sync.m16n8k16 (bf16 -> f32); the score accumulators are re-used in registers as the A
// operand of the P*V product. Written for Parallax; compiled at run time with NVRTC, so it uses
// no CUDA headers (bf16 values travel as 16-bit integers).
//
// Layouts (contiguous): Q (BH, Lq, D), K and V (BH, Lk, D), O (BH, Lq, D), LSE (BH, Lq) natural-log
// log-sum-exp of the scaled scores (for merging partial results, e.g. ring attention).

__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;\n" ::);
}

// Wait until at most one committed group of copies is still in flight.
__device__ __forceinline__ void cp_async_wait_one() {
    asm volatile("cp.async.wait_group 1;\n" ::);
}

// BN keys per tile; STAGES shared-memory buffers (2: the next tile loads while this one computes).
template <int D, int NWARPS, int BN, int STAGES>
__device__ __forceinline__ void flash_fwd(const unsigned short* __restrict__ Q,
                                          const unsigned short* __restrict__ K,
                                          const unsigned short* __restrict__ V,
                                          unsigned short* __restrict__ O, float* __restrict__ LSE,
                                          int Lq, int Lk, float scale_log2) {
    constexpr int SD = D + 8;       // padded shared row (bank-conflict free), 16-byte aligned
    constexpr int KS = D / 16;      // k-slices of the head dim
    constexpr int NF = D / 8;       // n8 fragments of the output
    __shared__ __align__(16) unsigned short sK_all[STAGES * BN * SD];
    __shared__ __align__(16) unsigned short sV_all[STAGES * BN * SD];

    const int bh = blockIdx.y;
    const int q0 = blockIdx.x * (NWARPS * 16);
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const u64 qoff = (u64)bh * Lq * D;
    const u64 koff = (u64)bh * Lk * D;
    const int row0 = q0 + warp * 16 + g;
    const int row1 = row0 + 8;

    // Q fragments for the warp's 16 rows, all of the head dim, kept in registers.
    unsigned qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const int d = ks * 16 + t * 2;
        qf[ks][0] = row0 < Lq ? *(const unsigned*)(Q + qoff + (u64)row0 * D + d) : 0u;
        qf[ks][1] = row1 < Lq ? *(const unsigned*)(Q + qoff + (u64)row1 * D + d) : 0u;
        qf[ks][2] = row0 < Lq ? *(const unsigned*)(Q + qoff + (u64)row0 * D + d + 8) : 0u;
        qf[ks][3] = row1 < Lq ? *(const unsigned*)(Q + qoff + (u64)row1 * D + d + 8) : 0u;
    }

    float o[NF][4];
#pragma unroll
    for (int f = 0; f < NF; ++f) o[f][0] = o[f][1] = o[f][2] = o[f][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    constexpr int CHUNKS = BN * D / 8;  // 16-byte chunks per tile
    auto load_tile = [&](int k0, int stage) {
        unsigned short* sK = sK_all + stage * BN * SD;
        unsigned short* sV = sV_all + stage * BN * SD;
        for (int c = tid; c < CHUNKS; c += NWARPS * 32) {
            const int r = c / (D / 8);
            const int col = (c % (D / 8)) * 8;
            const int key = k0 + r;
            const int bytes = key < Lk ? 16 : 0;
            const int src_key = key < Lk ? key : 0;
            cp_async16(smem_u32(&sK[r * SD + col]), K + koff + (u64)src_key * D + col, bytes);
            cp_async16(smem_u32(&sV[r * SD + col]), V + koff + (u64)src_key * D + col, bytes);
        }
        cp_async_commit();
    };
    if (STAGES > 1) load_tile(0, 0);
    int tile = 0;
    for (int k0 = 0; k0 < Lk; k0 += BN, ++tile) {
        const int stage = STAGES > 1 ? (tile & 1) : 0;
        if (STAGES > 1) {
            if (k0 + BN < Lk) {
                load_tile(k0 + BN, stage ^ 1);  // its buffer was released by the last barrier
                cp_async_wait_one();            // this tile's copies are done
            } else {
                cp_async_wait_all();
            }
            __syncthreads();
        } else {
            __syncthreads();  // everyone is done with the previous tile
            load_tile(k0, 0);
            cp_async_wait_all();
            __syncthreads();
        }
        const unsigned short* sK = sK_all + stage * BN * SD;
        const unsigned short* sV = sV_all + stage * BN * SD;

        // S = Q K^T for 16 rows x 64 keys: 8 n8 fragments. K fragments come four registers at a
        // time (two k-slices of one n8 block of keys) from ldmatrix.
        float s[BN / 8][4];
        {
            const int mi = lane >> 3, r = lane & 7;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
                for (int ks = 0; ks < KS; ks += 2) {
                    unsigned b[4];
                    ldmatrix_x4(b, smem_u32(&sK[(j * 8 + r) * SD + ks * 16 + mi * 8]));
                    mma_bf16(s[j], qf[ks], b[0], b[1]);
                    mma_bf16(s[j], qf[ks + 1], b[2], b[3]);
                }
            }
        }

        // Scale into log2 units, mask keys past the end, online softmax update.
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int key = k0 + j * 8 + t * 2;
            const bool v0 = key < Lk, v1 = key + 1 < Lk;
            s[j][0] = v0 ? s[j][0] * scale_log2 : NEG_INF;
            s[j][1] = v1 ? s[j][1] * scale_log2 : NEG_INF;
            s[j][2] = v0 ? s[j][2] * scale_log2 : NEG_INF;
            s[j][3] = v1 ? s[j][3] * scale_log2 : NEG_INF;
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float a0 = ex2(m0 - mn0), a1 = ex2(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            s[j][0] = ex2(s[j][0] - mn0);
            s[j][1] = ex2(s[j][1] - mn0);
            s[j][2] = ex2(s[j][2] - mn1);
            s[j][3] = ex2(s[j][3] - mn1);
            ps0 += s[j][0] + s[j][1];
            ps1 += s[j][2] + s[j][3];
        }
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
#pragma unroll
        for (int f = 0; f < NF; ++f) {
            o[f][0] *= a0;
            o[f][1] *= a0;
            o[f][2] *= a1;
            o[f][3] *= a1;
        }

        // O += P V: P from the score registers (16 keys per k-step), V via ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned pa[4];
            pa[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const int mi = lane >> 3, r = lane & 7;
            const int key = kk * 16 + (mi & 1) * 8 + r;
#pragma unroll
            for (int f = 0; f < NF; f += 2) {
                const int dim = f * 8 + (mi >> 1) * 8;
                unsigned b[4];
                ldmatrix_x4_trans(b, smem_u32(&sV[key * SD + dim]));
                mma_bf16(o[f], pa, b[0], b[1]);
                mma_bf16(o[f + 1], pa, b[2], b[3]);
            }
        }
        if (STAGES > 1) __syncthreads();  // this buffer is refilled two tiles from now
    }

    // Normalise, write O and the log-sum-exp.
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
        const int d = f * 8 + t * 2;
        if (row0 < Lq)
            *(unsigned*)(O + qoff + (u64)row0 * D + d) = pack_bf16x2(o[f][0] * inv0, o[f][1] * inv0);
        if (row1 < Lq)
            *(unsigned*)(O + qoff + (u64)row1 * D + d) = pack_bf16x2(o[f][2] * inv1, o[f][3] * inv1);
    }
    if (t == 0 && LSE != nullptr) {
        const float ln2 = 0.6931471805599453f;
        if (row0 < Lq) LSE[(u64)bh * Lq + row0] = (m0 + log2f(l0)) * ln2;
        if (row1 < Lq) LSE[(u64)bh * Lq + row1] = (m1 + log2f(l1)) * ln2;
    }
}

#define FLASH_ARGS                                                                          \
    const unsigned short *Q, const unsigned short *K, const unsigned short *V, unsigned short *O, \
        float *LSE, int Lq, int Lk, float scale_log2
#define FLASH_PASS Q, K, V, O, LSE, Lq, Lk, scale_log2

// w4: four warps (64 query rows) per block, 64-key tiles: two blocks share an SM, so one loads
// while the other computes. w8: eight warps (128 rows), half the K/V traffic per query, one block
// per SM. w4p: four warps, 32-key tiles double-buffered (the next tile loads during this one).
extern "C" __global__ void __launch_bounds__(128) parallax_flash_fwd_bf16_d128_w4(FLASH_ARGS) {
    flash_fwd<128, 4, 64, 1>(FLASH_PASS);
}
extern "C" __global__ void __launch_bounds__(256) parallax_flash_fwd_bf16_d128_w8(FLASH_ARGS) {
    flash_fwd<128, 8, 64, 1>(FLASH_PASS);
}
extern "C" __global__ void __launch_bounds__(128) parallax_flash_fwd_bf16_d128_w4p(FLASH_ARGS) {
    flash_fwd<128, 4, 32, 2>(FLASH_PASS);
}
extern "C" __global__ void __launch_bounds__(128) parallax_flash_fwd_bf16_d64_w4(FLASH_ARGS) {
    flash_fwd<64, 4, 64, 1>(FLASH_PASS);
}
extern "C" __global__ void __launch_bounds__(256) parallax_flash_fwd_bf16_d64_w8(FLASH_ARGS) {
    flash_fwd<64, 8, 64, 1>(FLASH_PASS);
}
extern "C" __global__ void __launch_bounds__(128) parallax_flash_fwd_bf16_d64_w4p(FLASH_ARGS) {
    flash_fwd<64, 4, 32, 2>(FLASH_PASS);
}
