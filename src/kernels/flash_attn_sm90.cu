// Parallax fused attention for Hopper (sm_90a): warpgroup matrix products (wgmma).
//
// The default on sm_90 is `g2n128tpo` (TMA loads from a producer warpgroup, softmax overlapped
// with the P V product; see flash_sm90_tma): 562 TFLOP/s at 16,896 tokens on an H100. The other
// variants stay for comparison (`parallax profile`) and as the fallback for unaligned inputs.
//
// softmax(Q K^T * scale) V, non-causal, bf16 in and out, f32 accumulation, head dim 128. A block
// holds NWG warpgroups of 128 threads; each warpgroup owns 64 query rows, so a block covers 64*NWG
// rows of one (batch*head). Keys and values stream through shared memory BN at a time in a ring
// of STAGES buffers, filled with cp.async by all threads while the previous tile computes. Tiles
// are stored in the 128-byte swizzled layout that wgmma descriptors read: each 64-column half of a
// 128-wide row is a 128-byte line, and 16-byte chunk c of line r sits at chunk c ^ (r % 8).
//
// Per key tile, per warpgroup: S = Q K^T with m64nBNk16 wgmma (Q and K both from shared memory),
// an online softmax on the accumulator registers, then O += P V with m64n128k16 wgmma whose A
// operand is P converted to bf16 in registers (the accumulator layout is the A-fragment layout)
// and whose B operand is V read transposed (MN-major) from shared memory. The L x L score matrix
// never exists. Written for Parallax; compiled at run time with NVRTC for sm_90a (no CUDA
// headers).
//
// FP8 scores (`..._fp8` kernels): Q and K arrive in E4M3, each group of 64 query rows and of 128
// keys of a (batch, head) with its own scale (`parallax_fp8_row_groups_d128` below makes them),
// and S = Q K^T runs as m64n128k32 E4M3 wgmma (twice bf16's rate); the group scales fold into the
// softmax's scale, one number per warpgroup and key tile. V, P and O stay bf16.
//
// Layouts (contiguous): Q (BH, Lq, 128), K and V (BH, Lk, 128). O is (BH, Lq, 128), or with
// `merged` set (B, Lq, H, 128), which is the (B, Lq, H*128) input of the output projection. LSE
// (BH, Lq), when not null: the natural-log log-sum-exp of each query's scaled scores.

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Shared-memory writes by cp.async (generic proxy) made visible to wgmma (async proxy).
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads or writes of accumulator registers across wgmma issue and
// wait points (the hardware writes them asynchronously).
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// A wgmma shared-memory matrix descriptor with 128-byte swizzling: start address, leading and
// stride byte offsets (all in 16-byte units in the descriptor).
__device__ __forceinline__ u64 sw128_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// D (+)= A B for m64n64k16: A (64 x 16) and B (16 x 64, K-major) from shared memory through
// descriptors; `acc` 0 overwrites D.
__device__ __forceinline__ void wgmma_ss_n64(float* d, u64 da, u64 db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(acc));
}

// D (+)= A B for m64n128k16: A (64 x 16) and B (16 x 128, K-major) from shared memory through
// descriptors; `acc` 0 overwrites D.
__device__ __forceinline__ void wgmma_ss_n128(float* d, u64 da, u64 db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}

// D (+)= A B for m64n128k32 in E4M3: A (64 x 32) and B (32 x 128, K-major; 8-bit operands have no
// transposed form) from shared memory through descriptors; `acc` 0 overwrites D.
__device__ __forceinline__ void wgmma_ss_n128_e4m3(float* d, u64 da, u64 db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}

// D (+)= A B for m64n128k16: A (64 x 16) from registers (four bf16x2 per thread, the mma.sync A
// layout), B (16 x 128) from shared memory stored MN-major (imm-trans-b 1).
__device__ __forceinline__ void wgmma_rs_n128_tb(float* d, const unsigned* a, u64 db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}

// Copies `rows` rows of a (., 128) bf16 matrix (rows at and past `valid` read as zeros) into the
// swizzled two-half tile at `dst`: half h (columns 64h..64h+63) is `rows` 128-byte lines.
__device__ __forceinline__ void load_rows(unsigned dst, const unsigned short* src, int rows, int valid,
                                          int tid, int nthreads) {
    for (int c = tid; c < rows * 16; c += nthreads) {
        const int r = c >> 4, cc = c & 15, half = cc >> 3, ch = cc & 7;
        const bool ok = r < valid;
        const unsigned short* s = src + (u64)(ok ? r : 0) * 128 + cc * 8;
        cp_async16(dst + half * rows * 128 + r * 128 + ((ch ^ (r & 7)) << 4), s, ok ? 16 : 0);
    }
}

// The pieces every variant shares. A block's shared memory: Q (BM rows) then STAGES key/value
// tiles (K then V, BN rows each). A bf16 row of 128 values is two 64-column halves of 128-byte
// lines; an E4M3 row (QKROW 128, FP8 scores) is one 128-byte line.
template <int NWG, int BN, int QKROW = 256>
struct Tiles {
    static constexpr int BM = 64 * NWG;
    static constexpr unsigned Q_BYTES = BM * QKROW;
    static constexpr unsigned K_BYTES = BN * QKROW;
    static constexpr unsigned V_BYTES = BN * 256;
    static constexpr unsigned STAGE_BYTES = K_BYTES + V_BYTES;
    unsigned base;
    __device__ unsigned q() const { return base; }
    __device__ unsigned k(int st) const { return base + Q_BYTES + st * STAGE_BYTES; }
    __device__ unsigned v(int st) const { return base + Q_BYTES + st * STAGE_BYTES + K_BYTES; }
};

// S = Q K^T for this warpgroup's 64 rows and BN keys: 8 k-steps of 16 over the head dim (4 per
// 64-column half). Issued, not waited for.
template <int NWG, int BN>
__device__ __forceinline__ void issue_qk(float* s, const Tiles<NWG, BN>& t, int st, int wg) {
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
        const unsigned koff = (ks & 3) * 32;
        const u64 da = sw128_desc(t.q() + (ks >> 2) * Tiles<NWG, BN>::BM * 128 + wg * 64 * 128 + koff, 16, 1024);
        const u64 db = sw128_desc(t.k(st) + (ks >> 2) * BN * 128 + koff, 16, 1024);
        if (BN == 128)
            wgmma_ss_n128(s, da, db, ks > 0);
        else
            wgmma_ss_n64(s, da, db, ks > 0);
    }
}

// The same in E4M3 (FP8 scores): one 128-byte line per row, 4 k-steps of 32 along it.
template <int NWG, int BN>
__device__ __forceinline__ void issue_qk(float* s, const Tiles<NWG, BN, 128>& t, int st, int wg) {
    static_assert(BN == 128, "FP8 scores use 128-key tiles");
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        const u64 da = sw128_desc(t.q() + wg * 64 * 128 + ks * 32, 16, 1024);
        const u64 db = sw128_desc(t.k(st) + ks * 32, 16, 1024);
        wgmma_ss_n128_e4m3(s, da, db, ks > 0);
    }
}

// O += P V: P as bf16 A fragments (16 keys each), V read transposed (MN-major) from shared memory.
// V's descriptor: leading byte offset = the distance between 64-column halves, stride byte offset
// = between groups of 8 key rows (the other reading of the MN-major layout, tried on an H100,
// gives wrong results). Issued, not waited for.
template <int NWG, int BN, int QKROW>
__device__ __forceinline__ void issue_pv(float* o, const unsigned (*pa)[4], const Tiles<NWG, BN, QKROW>& t, int st) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
        wgmma_rs_n128_tb(o, pa[kk], sw128_desc(t.v(st) + kk * 16 * 128, BN * 128, 1024), 1);
}

// S = Q K^T for tile buffer `st`, waited for.
template <int NWG, int BN, int QKROW>
__device__ __forceinline__ void scores(float* s, const Tiles<NWG, BN, QKROW>& t, int st, int wg) {
    fence_regs<BN / 2>(s);
    wgmma_fence();
    issue_qk<NWG, BN>(s, t, st, wg);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<BN / 2>(s);
}

// O += P V for tile buffer `st`, waited for.
template <int NWG, int BN, int QKROW>
__device__ __forceinline__ void accumulate_pv(float* o, const unsigned (*pa)[4], const Tiles<NWG, BN, QKROW>& t, int st) {
    fence_regs<64>(o);
    wgmma_fence();
    issue_pv<NWG, BN>(o, pa, t, st);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<64>(o);
}

// Online softmax of one tile of scores, in place (scores become unnormalised probabilities in
// log2 units): masks keys at and past Lk, updates the running maxima and sums of the thread's
// two rows, returns the factors the output accumulated so far must be scaled by.
template <int NS>
__device__ __forceinline__ void softmax_tile(float* s, int key0, int Lk, int t, float scale_log2,
                                             float& m0, float& m1, float& l0, float& l1, float& a0,
                                             float& a1) {
    if (key0 + 2 * NS > Lk) {
#pragma unroll
        for (int i = 0; i < NS; ++i) {
            const int key = key0 + (i >> 2) * 8 + t * 2 + (i & 1);
            if (key >= Lk) s[i] = NEG_INF;
        }
    }
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int i = 0; i < NS; i += 4) {
        mx0 = fmaxf(mx0, fmaxf(s[i], s[i + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[i + 2], s[i + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
    const float mn0 = fmaxf(m0, mx0 * scale_log2), mn1 = fmaxf(m1, mx1 * scale_log2);
    a0 = ex2(m0 - mn0);
    a1 = ex2(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int i = 0; i < NS; i += 4) {
        s[i] = ex2(fmaf(s[i], scale_log2, -mn0));
        s[i + 1] = ex2(fmaf(s[i + 1], scale_log2, -mn0));
        s[i + 2] = ex2(fmaf(s[i + 2], scale_log2, -mn1));
        s[i + 3] = ex2(fmaf(s[i + 3], scale_log2, -mn1));
        ps0 += s[i] + s[i + 1];
        ps1 += s[i + 2] + s[i + 3];
    }
    l0 = l0 * a0 + ps0;
    l1 = l1 * a1 + ps1;
}

__device__ __forceinline__ void rescale(float* o, float a0, float a1) {
#pragma unroll
    for (int i = 0; i < 64; i += 4) {
        o[i] *= a0;
        o[i + 1] *= a0;
        o[i + 2] *= a1;
        o[i + 3] *= a1;
    }
}

// Probabilities to bf16 A fragments: n8 blocks 2kk and 2kk+1 are keys 16kk..16kk+15.
template <int BN>
__device__ __forceinline__ void to_fragments(const float* s, unsigned (*pa)[4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = pack_bf16x2(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack_bf16x2(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack_bf16x2(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack_bf16x2(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// One tile without overlap: scores, online softmax, O rescaled, O += P V (all waited for).
template <int NWG, int BN, int QKROW>
__device__ __forceinline__ void plain_tile(float* s, float* o, unsigned (*pa)[4], const Tiles<NWG, BN, QKROW>& tl,
                                           int st, int wg, int key0, int Lk, int t, float scale_log2,
                                           float& m0, float& m1, float& l0, float& l1) {
    scores<NWG, BN>(s, tl, st, wg);
    float a0, a1;
    softmax_tile<BN / 2>(s, key0, Lk, t, scale_log2, m0, m1, l0, l1, a0, a1);
    rescale(o, a0, a1);
    to_fragments<BN>(s, pa);
    accumulate_pv<NWG, BN>(o, pa, tl, st);
}

// Normalise and write this thread's two rows of O (and their log-sum-exp).
__device__ __forceinline__ void store_out(const float* o, float m0, float m1, float l0, float l1,
                                          unsigned short* O, float* LSE, int bh, int row0, int Lq,
                                          int H, int merged, int t) {
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    const int row1 = row0 + 8;
    const int b = bh / H, h = bh % H;
    auto out_at = [&](int row) -> unsigned short* {
        return merged ? O + (((u64)b * Lq + row) * H + h) * 128 : O + ((u64)bh * Lq + row) * 128;
    };
    unsigned short* O0 = out_at(row0);
    unsigned short* O1 = out_at(row1);
#pragma unroll
    for (int f = 0; f < 16; ++f) {
        const int d = f * 8 + t * 2;
        if (row0 < Lq) *(unsigned*)(O0 + d) = pack_bf16x2(o[4 * f] * inv0, o[4 * f + 1] * inv0);
        if (row1 < Lq) *(unsigned*)(O1 + d) = pack_bf16x2(o[4 * f + 2] * inv1, o[4 * f + 3] * inv1);
    }
    if (t == 0 && LSE != nullptr) {
        const float ln2 = 0.6931471805599453f;
        if (row0 < Lq) LSE[(u64)bh * Lq + row0] = (m0 + log2f(l0)) * ln2;
        if (row1 < Lq) LSE[(u64)bh * Lq + row1] = (m1 + log2f(l1)) * ln2;
    }
}

// The plain schedule: per tile, S = Q K^T, wait, softmax, O += P V, wait. The next tiles load
// (STAGES - 1 ahead) while this one computes.
template <int NWG, int BN, int STAGES>
__device__ __forceinline__ void flash_sm90(const unsigned short* __restrict__ Q,
                                           const unsigned short* __restrict__ K,
                                           const unsigned short* __restrict__ V,
                                           unsigned short* __restrict__ O, float* __restrict__ LSE,
                                           int Lq, int Lk, float scale_log2, int H, int merged) {
    constexpr int BM = 64 * NWG;
    constexpr int NT = 128 * NWG;
    constexpr int NS = BN / 2;  // score registers per thread
    extern __shared__ unsigned char smem_raw[];
    const Tiles<NWG, BN> tl{(smem_u32(smem_raw) + 1023u) & ~1023u};

    const int bh = blockIdx.y;
    const int q0 = blockIdx.x * BM;
    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int warp = (tid >> 5) & 3, lane = tid & 31;
    const int t = lane & 3;
    const unsigned short* Kg = K + (u64)bh * Lk * 128;
    const unsigned short* Vg = V + (u64)bh * Lk * 128;
    const int ntiles = (Lk + BN - 1) / BN;

    load_rows(tl.q(), Q + ((u64)bh * Lq + q0) * 128, BM, Lq - q0, tid, NT);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ntiles) {
            load_rows(tl.k(s), Kg + (u64)s * BN * 128, BN, Lk - s * BN, tid, NT);
            load_rows(tl.v(s), Vg + (u64)s * BN * 128, BN, Lk - s * BN, tid, NT);
        }
        cp_async_commit();
    }

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    for (int j = 0; j < ntiles; ++j) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of tile j (and Q) are done
        fence_proxy_async();
        __syncthreads();  // everyone's are; everyone is done with tile j-1's buffer
        {
            const int nj = j + STAGES - 1;
            if (nj < ntiles) {
                const int st = nj % STAGES;
                load_rows(tl.k(st), Kg + (u64)nj * BN * 128, BN, Lk - nj * BN, tid, NT);
                load_rows(tl.v(st), Vg + (u64)nj * BN * 128, BN, Lk - nj * BN, tid, NT);
            }
            cp_async_commit();
        }
        float s[NS];
        unsigned pa[BN / 16][4];
        plain_tile<NWG, BN>(s, o, pa, tl, j % STAGES, wg, j * BN, Lk, t, scale_log2, m0, m1, l0, l1);
    }
    store_out(o, m0, m1, l0, l1, O, LSE, bh, q0 + wg * 64 + warp * 16 + (lane >> 2), Lq, H, merged, t);
}

// ---- Tensor-memory-accelerator (TMA) loads and mbarriers, for the `t` variants. ----

// A CUtensorMap made on the host (cuTensorMapEncodeTiled), passed by value as a kernel parameter.
struct __align__(64) TmaDesc {
    u64 v[16];
};

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrive and announce `bytes` of TMA transfer that will complete on this barrier.
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Wait until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    unsigned done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}
// One box of a 3-D tensor map (coordinates innermost first) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_3d(unsigned dst, const TmaDesc* map, int c0, int c1, int c2,
                                            unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// The TMA schedule: the key/value tiles are loaded by the tensor memory accelerator into a ring of
// STAGES buffers, each with a "full" barrier (its bytes have landed) and an "empty" barrier (every
// consumer warp is done with it); consumer warpgroups never meet at a block-wide barrier. With
// PRODUCER a separate warpgroup issues the loads (and gives its registers to the consumers);
// without, thread 0 issues each tile's successor as soon as the buffer is released. OVERLAP runs
// the softmax of tile j during O += P V of tile j-1. The tensor maps are 3-D (128 head-dim, L
// rows, B*H) with boxes of 64 columns: rows past L read as zeros, and boxes land in the 128-byte
// swizzled layout the descriptors expect. With FP8, Q and K are E4M3 (their maps have boxes of
// 128 one-byte columns, one 128-byte line a row) and `qscale`/`kscale` hold their group scales,
// (BH, ceil(Lq / 64)) and (BH, ceil(Lk / 128)).
template <int NWG, int BN, int STAGES, bool OVERLAP, bool PRODUCER, bool FP8 = false>
__device__ __forceinline__ void flash_sm90_tma(const TmaDesc* tq, const TmaDesc* tk, const TmaDesc* tv,
                                               unsigned short* __restrict__ O, float* __restrict__ LSE,
                                               int Lq, int Lk, float scale_log2, int H, int merged,
                                               const float* __restrict__ qscale = nullptr,
                                               const float* __restrict__ kscale = nullptr) {
    constexpr int BM = 64 * NWG;
    constexpr int NS = BN / 2;
    using T = Tiles<NWG, BN, FP8 ? 128 : 256>;
    extern __shared__ unsigned char smem_raw[];
    const T tl{(smem_u32(smem_raw) + 1023u) & ~1023u};
    const unsigned bars = tl.base + T::Q_BYTES + STAGES * T::STAGE_BYTES;
    auto full = [&](int st) { return bars + 8 * st; };
    auto empty = [&](int st) { return bars + 8 * (STAGES + st); };
    const unsigned qbar = bars + 16 * STAGES;

    const int bh = blockIdx.y;
    const int q0 = blockIdx.x * BM;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int ntiles = (Lk + BN - 1) / BN;
    auto load_tile = [&](int j) {
        const int st = j % STAGES;
        mbar_expect_tx(full(st), T::STAGE_BYTES);
        tma_load_3d(tl.k(st), tk, 0, j * BN, bh, full(st));
        if (!FP8) tma_load_3d(tl.k(st) + BN * 128, tk, 64, j * BN, bh, full(st));
        tma_load_3d(tl.v(st), tv, 0, j * BN, bh, full(st));
        tma_load_3d(tl.v(st) + BN * 128, tv, 64, j * BN, bh, full(st));
    };
    // Thread 0 issues tile j + STAGES once every consumer warp has released tile j's buffer.
    auto refill = [&](int j) {
        if (!PRODUCER && tid == 0 && j + STAGES < ntiles) {
            mbar_wait(empty(j % STAGES), (j / STAGES) & 1);
            load_tile(j + STAGES);
        }
    };

    if (tid == 0) {
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(full(st), 1);
            mbar_init(empty(st), NWG * 4);
        }
        mbar_init(qbar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (PRODUCER && (tid >> 7) == NWG) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == NWG * 128) {
            mbar_expect_tx(qbar, T::Q_BYTES);
            tma_load_3d(tl.q(), tq, 0, q0, bh, qbar);
            if (!FP8) tma_load_3d(tl.q() + BM * 128, tq, 64, q0, bh, qbar);
            for (int j = 0; j < ntiles; ++j) {
                if (j >= STAGES) mbar_wait(empty(j % STAGES), ((j / STAGES) - 1) & 1);
                load_tile(j);
            }
        }
        return;
    }
    if (PRODUCER) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    if (!PRODUCER && tid == 0) {
        mbar_expect_tx(qbar, T::Q_BYTES);
        tma_load_3d(tl.q(), tq, 0, q0, bh, qbar);
        if (!FP8) tma_load_3d(tl.q() + BM * 128, tq, 64, q0, bh, qbar);
        for (int j = 0; j < STAGES && j < ntiles; ++j) load_tile(j);
    }

    const int wg = tid >> 7;
    const int warp = (tid >> 5) & 3;
    const int t = lane & 3;
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    float s[NS];
    unsigned pa[BN / 16][4];
    // FP8: the softmax scale of key tile j is scale_log2 times this warpgroup's query scale and
    // the tile's key scale (the E4M3 products are of the scaled-down values).
    const int ngq = (Lq + 63) / 64;
    const float* ks_bh = FP8 ? kscale + (u64)bh * ntiles : nullptr;
    const float sq = FP8 ? scale_log2 * qscale[(u64)bh * ngq + min(q0 / 64 + wg, ngq - 1)] : scale_log2;
    auto tile_scale = [&](int j) { return FP8 ? sq * ks_bh[j] : scale_log2; };
    mbar_wait(qbar, 0);

    if (!OVERLAP) {
        for (int j = 0; j < ntiles; ++j) {
            const int st = j % STAGES;
            mbar_wait(full(st), (j / STAGES) & 1);
            plain_tile<NWG, BN>(s, o, pa, tl, st, wg, j * BN, Lk, t, tile_scale(j), m0, m1, l0, l1);
            if (lane == 0) mbar_arrive(empty(st));
            refill(j);
        }
    } else {
        mbar_wait(full(0), 0);
        scores<NWG, BN>(s, tl, 0, wg);
        {
            float a0, a1;
            softmax_tile<NS>(s, 0, Lk, t, tile_scale(0), m0, m1, l0, l1, a0, a1);
            to_fragments<BN>(s, pa);
        }
        for (int j = 1; j < ntiles; ++j) {
            const int st = j % STAGES;
            const int prev = (j - 1) % STAGES;
            const float sl = tile_scale(j);
            mbar_wait(full(st), (j / STAGES) & 1);
            fence_regs<NS>(s);
            fence_regs<64>(o);
            wgmma_fence();
            issue_qk<NWG, BN>(s, tl, st, wg);
            wgmma_commit();
            issue_pv<NWG, BN>(o, pa, tl, prev);
            wgmma_commit();
            wgmma_wait<1>();
            fence_regs<NS>(s);
            float a0, a1;
            softmax_tile<NS>(s, j * BN, Lk, t, sl, m0, m1, l0, l1, a0, a1);
            wgmma_wait<0>();
            fence_regs<64>(o);
            if (lane == 0) mbar_arrive(empty(prev));
            refill(j - 1);
            rescale(o, a0, a1);
            to_fragments<BN>(s, pa);
        }
        accumulate_pv<NWG, BN>(o, pa, tl, (ntiles - 1) % STAGES);
    }
    store_out(o, m0, m1, l0, l1, O, LSE, bh, q0 + wg * 64 + warp * 16 + (lane >> 2), Lq, H, merged, t);
}

#define SM90_ARGS                                                                            \
    const unsigned short *Q, const unsigned short *K, const unsigned short *V, unsigned short *O, \
        float *LSE, int Lq, int Lk, float scale_log2, int H, int merged
#define SM90_PASS Q, K, V, O, LSE, Lq, Lk, scale_log2, H, merged

// Variants: warpgroups x key tile x stages. Shared memory: 64*NWG*256 + STAGES*BN*512 (+1 KiB
// alignment) bytes.
extern "C" __global__ void __launch_bounds__(256, 1) parallax_flash_sm90_g2n128s2(SM90_ARGS) {
    flash_sm90<2, 128, 2>(SM90_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) parallax_flash_sm90_g2n64s3(SM90_ARGS) {
    flash_sm90<2, 64, 3>(SM90_PASS);
}
extern "C" __global__ void __launch_bounds__(384, 1) parallax_flash_sm90_g3n64s3(SM90_ARGS) {
    flash_sm90<3, 64, 3>(SM90_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) parallax_flash_sm90_g2n128s3(SM90_ARGS) {
    flash_sm90<2, 128, 3>(SM90_PASS);
}

#define TMA_ARGS                                                                                  \
    const __grid_constant__ TmaDesc tq, const __grid_constant__ TmaDesc tk,                       \
        const __grid_constant__ TmaDesc tv, unsigned short *O, float *LSE, int Lq, int Lk, float scale_log2, \
        int H, int merged
#define TMA_PASS &tq, &tk, &tv, O, LSE, Lq, Lk, scale_log2, H, merged

// TMA variants: two consumer warpgroups; `p`: plus a producer warpgroup.
extern "C" __global__ void __launch_bounds__(256, 1) parallax_flash_sm90_g2n128t2(TMA_ARGS) {
    flash_sm90_tma<2, 128, 2, false, false>(TMA_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) parallax_flash_sm90_g2n128t3(TMA_ARGS) {
    flash_sm90_tma<2, 128, 3, false, false>(TMA_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 1) parallax_flash_sm90_g2n128to(TMA_ARGS) {
    flash_sm90_tma<2, 128, 3, true, false>(TMA_PASS);
}
extern "C" __global__ void __launch_bounds__(384, 1) parallax_flash_sm90_g2n128tp(TMA_ARGS) {
    flash_sm90_tma<2, 128, 2, false, true>(TMA_PASS);
}
extern "C" __global__ void __launch_bounds__(384, 1) parallax_flash_sm90_g2n128tpo(TMA_ARGS) {
    flash_sm90_tma<2, 128, 3, true, true>(TMA_PASS);
}

// FP8 scores with the default schedule (producer warpgroup, overlapped softmax): Q and K in E4M3
// with their group scales.
#define TMA8_ARGS TMA_ARGS, const float *qscale, const float *kscale
extern "C" __global__ void __launch_bounds__(384, 1) parallax_flash_sm90_g2n128tpo_fp8(TMA8_ARGS) {
    flash_sm90_tma<2, 128, 3, true, true, true>(TMA_PASS, qscale, kscale);
}

// Quantisation for FP8 scores: x (BH, L, 128) bf16 to E4M3 in groups of G consecutive rows of each
// (batch, head), one block per (group, bh): the group's largest magnitude m gives the scale
// m / 448 (1 for a group of zeros or non-finite values, which then saturate), written to
// scale[bh * gridDim.x + group]; every value is multiplied by its correctly rounded reciprocal
// (`e4m3_inv`, as the CPU's simulation does) and converted with round-to-nearest-even,
// saturating. q has x's layout.
extern "C" __global__ void parallax_fp8_row_groups_d128(const unsigned short* __restrict__ x,
                                                       unsigned char* __restrict__ q,
                                                       float* __restrict__ scale, int L, int G) {
    const int g = blockIdx.x, bh = blockIdx.y;
    const int r0 = g * G;
    const int rows = min(G, L - r0);
    const u64 base = ((u64)bh * L + r0) * 128;
    const unsigned* xs = (const unsigned*)(x + base);
    unsigned short* qs = (unsigned short*)(q + base);
    const int n2 = rows * 64;  // bf16 pairs
    __shared__ float red[32];
    float m = 0.f;
    for (int i = threadIdx.x; i < n2; i += blockDim.x) {
        const unsigned w = xs[i];
        m = fmaxf(m, fmaxf(fabsf(bf2f(w & 0xffff)), fabsf(bf2f(w >> 16))));
    }
    const float sc = e4m3_scale(block_max(m, red));
    if (threadIdx.x == 0) scale[(u64)bh * gridDim.x + g] = sc;
    const float inv = e4m3_inv(sc);
    for (int i = threadIdx.x; i < n2; i += blockDim.x) {
        const unsigned w = xs[i];
        unsigned short r;
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;"
            : "=h"(r)
            : "f"(__fmul_rn(bf2f(w >> 16), inv)), "f"(__fmul_rn(bf2f(w & 0xffff), inv)));
        qs[i] = r;
    }
}
