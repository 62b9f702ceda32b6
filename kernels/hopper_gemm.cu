// Grouped expert GEMMs for Hopper (sm_90a): wgmma from shared memory, warp specialisation,
// mbarrier pipelines and persistent CTAs. The same five GEMMs as kernels/grouped_gemm.cu (the
// mma.sync path, kept for sm_80/86/89 and forced on Hopper by the tests), with the same
// launcher contract (remoe_kernels.h), so the Rust layer picks a path per device.
//
// One CTA = one producer warpgroup and two consumer warpgroups (384 threads, one CTA per SM).
// Persistent: the grid is at most one CTA per SM, and each CTA walks the output tiles
// blockIdx.x, blockIdx.x + gridDim.x, ...; the tile count is read from device memory
// (tile_offsets[E] row tiles of 128 rows times the column tiles), so the grid never depends on
// the routing. The producer runs ahead of the consumers across tile boundaries, so the next
// tile's operands load while the consumers run the current tile's epilogue.
//
// Shared memory holds kStages stages of {A tile 128 x 64, B tile 64 x 256}, bf16/f16, each in
// the 128-byte swizzled layout wgmma reads ("atoms" of 8 rows x 128 bytes, 16-byte chunk c of row
// r stored at chunk c ^ (r & 7)). Two barriers per stage: `full` (the stage is loaded) and
// `empty` (both consumer warpgroups are done with it).
//
// Operand loading, the part that differs between the GEMMs:
// - B (the expert weights, fixed shapes) comes by TMA from a 3-D tensor map [E][rows][cols], so
//   rows or columns past an expert's edge are zero-filled by the copy engine rather than read
//   from the next expert.
// - A (rows of routed pairs) comes through cp.async from the producer warpgroup's 128 threads:
//   the up projection gathers X's rows, and dAct dOut's, through pair_token inside the load (no
//   permuted copy), and every row past the expert's last pair is zero-filled. Each producer thread's arrival on
//   the stage's `full` barrier is made by the hardware when its copies land
//   (cp.async.mbarrier.arrive), so every stage can be in flight at once; the consumers order
//   those generic-proxy writes before their wgmma reads with fence.proxy.async.
// - The weight gradients (reduction over an expert's pairs, K = n_e) load each full block of 64
//   pairs by TMA (both operands, or only dY/dg/du when A is X gathered through pair_token, which
//   goes through cp.async), and an expert's last, partial block through cp.async, whose zero
//   fill stops the reduction exactly at the expert's edge.
//
// Epilogues work on the f32 accumulators in registers: SwiGLU (up), f32 store (down), SwiGLU's
// backward from the saved g and u (dAct), plain store (dX), and the f32 weight-gradient store or
// accumulate, which goes through shared memory so that each warp writes whole row segments
// (store_weight_grad_tile says why). The wgmma accumulator layout puts column n and n + 128 of
// an m64n256 tile in the same thread, which is why the up projection's B tile holds 128 columns
// of Wg then the same 128 columns of Wu: each thread owns g and u of the same outputs.
#include <atomic>
#include <cuda.h>

#include <type_traits>

#include "common.cuh"
#include "swiglu.cuh"
#include "weight_grad_split.cuh"

namespace {

constexpr int BM = 128;  // rows (pairs) per tile: two consumer warpgroups of 64
constexpr int BN = 256;  // B columns per tile (the up projection: 128 of Wg, 128 of Wu)
constexpr int BK = 64;   // k per stage: one 128-byte swizzle atom of 16-bit values
constexpr int kStages = 4;
constexpr int kThreads = 384;
constexpr int kATileBytes = BM * BK * 2;
constexpr int kBTileBytes = BN * BK * 2;
constexpr int kStageBytes = kATileBytes + kBTileBytes;
constexpr int kAtomBytes = 64 * 128;  // one [64 rows][64 values] block of the swizzled layout
constexpr int kBarrierBytes = 2 * kStages * 8;
// Dynamic shared memory: the stages (1024-byte aligned, as the swizzle atoms need) + barriers.
constexpr int kSmemBytes = kStages * kStageBytes + kBarrierBytes + 1024;
// The weight gradients' store goes through shared memory, kStagedRows rows of the f32 tile at a
// time, after the barriers (store_weight_grad_tile). With the kernel's 1 KB of static shared
// memory this is all but the last 1 KB of the 227 KB a CTA may have.
constexpr int kStagedRows = 32;
constexpr int kWeightGradSmemBytes = kSmemBytes + kStagedRows * BN * 4;
static_assert(kWeightGradSmemBytes + 1024 <= 227 * 1024, "the staging buffer must fit");

enum Mode { kUpSwiGLU = 0, kDown = 1, kDAct = 2, kDX = 3 };

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

// ---- mbarrier ----
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// ---- copies ----
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
// One arrival on `bar` once every cp.async this thread has issued so far has landed (the
// barrier's expected count includes it), so a stage is published the moment its data is in
// shared memory and the producer never blocks on its own copies.
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}
// Orders the generic proxy's shared-memory writes seen by this thread (cp.async's among them)
// before the async proxy's reads that follow (wgmma's operand loads): the consumers run it after
// a stage's `full` barrier and before their wgmmas read the stage.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap *map, uint32_t bar,
                                            int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4, %5}], [%2];\n" ::"r"(dst),
      "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, uint32_t bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4}], [%2];\n" ::"r"(dst),
      "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// ---- wgmma ----
// Shared-memory matrix descriptor, 128-byte swizzle. K-major operands (each row's k values
// contiguous): sbo = 1024 (8 rows of 128 bytes), lbo unused. MN-major operands (each k row's
// m or n values contiguous, stored as [64-column atoms][k rows][64]): lbo = the distance between
// 64-column atoms, sbo = 1024 (8 k rows).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = (uint64_t)((addr & 0x3FFFF) >> 4);
  d |= (uint64_t)((lbo & 0x3FFFF) >> 4) << 16;
  d |= (uint64_t)((sbo & 0x3FFFF) >> 4) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// wgmma.mma_async m64n256k16 with f32 accumulators d[128] += A . B, A and B from shared memory
// through their descriptors; scale_d = 0 overwrites d instead (the first k-step of a tile).
// kTransA / kTransB: 1 for an MN-major operand. TY: the PTX input type ("bf16" or "f16").
// clang-format off
#define REMOE_WGMMA_M64N256K16(TY)                                                          \
  asm volatile(                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                         \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"                         \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                                  \
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "                        \
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "                        \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                        \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "                        \
      "%60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "                        \
      "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, "                        \
      "%84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                        \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "                \
      "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, "            \
      "%120, %121, %122, %123, %124, %125, %126, %127"                                      \
      "}, %128, %129, p, 1, 1, %131, %132;\n}\n"                                            \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),             \
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),           \
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),       \
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),       \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),       \
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),       \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),       \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),       \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),       \
        "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),       \
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]),       \
        "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),       \
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),       \
        "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),       \
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]),       \
        "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),       \
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]),     \
        "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), \
        "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), \
        "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), \
        "+f"(d[126]), "+f"(d[127])                                                          \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB))

// clang-format on
template <typename T>
struct Wgmma;
template <>
struct Wgmma<__nv_bfloat16> {
  template <int kTransA, int kTransB>
  __device__ __forceinline__ static void mma(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                             int scale_d) {
    REMOE_WGMMA_M64N256K16("bf16");
  }
};
template <>
struct Wgmma<__half> {
  template <int kTransA, int kTransB>
  __device__ __forceinline__ static void mma(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                             int scale_d) {
    REMOE_WGMMA_M64N256K16("f16");
  }
};

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
// The expert owning row tile `tile`: the e with tile_offsets[e] <= tile < tile_offsets[e + 1].
__device__ __forceinline__ int expert_of_tile(const uint32_t *tile_offsets, int e, int tile) {
  int lo = 0, hi = e - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if ((int)tile_offsets[mid] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Byte offset of 16-byte chunk `chunk` (of 8 per row) of row `row` in a swizzled atom.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return (uint32_t)(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// The accumulators of an m64nN wgmma give lane q of each quad (lane & 3) columns 8 j + 2 q and
// 8 j + 2 q + 1 of its row, for every j: 4-byte pieces, so a warp's stores would touch 8 rows x
// 16 bytes each. Within the four j's of group `jg` (columns 32 jg .. 32 jg + 31), this trades
// values among the quad so that lane q ends up with the 8 consecutive columns 32 jg + 8 q + 0..7
// (16-byte stores and loads, 64 contiguous bytes per row and warp instruction). `half` picks
// row lane/4 (0) or lane/4 + 8 (1). Only shuffles and selects: no shared memory.
__device__ __forceinline__ void quad_columns(const float (&acc)[128], int jg, int half,
                                             float (&out)[8]) {
  const int q = threadIdx.x & 3;
  const int quad_base = (threadIdx.x & 31) & ~3;
  float x[4], y[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[i] = acc[4 * (4 * jg + i) + 2 * half];
    y[i] = acc[4 * (4 * jg + i) + 2 * half + 1];
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    // Round r: lane q reads from lane (q + r) & 3 the pair that lane holds for j = 4 jg + q.
    const int give = (q - r) & 3;
    float sx = x[0], sy = y[0];
#pragma unroll
    for (int i = 1; i < 4; ++i) {
      if (give == i) {
        sx = x[i];
        sy = y[i];
      }
    }
    const int from = (q + r) & 3;
    const float rx = __shfl_sync(0xffffffffu, sx, quad_base | from);
    const float ry = __shfl_sync(0xffffffffu, sy, quad_base | from);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (from == i) {
        out[2 * i] = rx;
        out[2 * i + 1] = ry;
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void store8v(T *p, const float (&v)[8]) {
  uint4 raw;
  raw.x = pack2<T>(v[0], v[1]);
  raw.y = pack2<T>(v[2], v[3]);
  raw.z = pack2<T>(v[4], v[5]);
  raw.w = pack2<T>(v[6], v[7]);
  *reinterpret_cast<uint4 *>(p) = raw;
}
// The pipeline position shared by the producer and the consumers: stage and barrier parity of
// the n-th k-block this CTA handles (counted across tiles).
struct PipePos {
  int n = 0;
  __device__ __forceinline__ int stage() const { return n % kStages; }
  __device__ __forceinline__ int parity() const { return (n / kStages) & 1; }
};

// The stages and their barriers, laid out and initialised the same way by both kernels.
// `full`: the stage is loaded (129 arrivals: each producer thread's cp.async.mbarrier.arrive, and
// thread 0 once more, with the TMA's byte count or plainly). `empty`: both consumer warpgroups
// are done with it (one arrival per consumer warp).
struct Pipeline {
  uint8_t *smem;  // kStages stages of kStageBytes (A tile, then B tile), 1024-byte aligned
  uint64_t *full;
  uint64_t *empty;

  __device__ __forceinline__ uint32_t a_tile(PipePos pos) const {
    return smem_u32(smem + pos.stage() * kStageBytes);
  }
  __device__ __forceinline__ uint32_t b_tile(PipePos pos) const {
    return a_tile(pos) + kATileBytes;
  }
  // The first byte past the barriers, where a kernel's extra shared memory begins.
  __device__ __forceinline__ uint8_t *end() const {
    return reinterpret_cast<uint8_t *>(empty + kStages);
  }
  __device__ __forceinline__ uint32_t full_bar(PipePos pos) const {
    return smem_u32(&full[pos.stage()]);
  }
  // Producer: waits until the consumers have released the stage (passes at once on the first
  // round: waiting for the parity before a fresh barrier's phase 0 succeeds immediately).
  __device__ __forceinline__ void acquire(PipePos pos) const {
    mbar_wait(smem_u32(&empty[pos.stage()]), pos.parity() ^ 1);
  }
  // Consumer: waits until the stage is loaded, and orders its cp.async (generic-proxy) writes
  // before the wgmma reads that follow.
  __device__ __forceinline__ void wait_loaded(PipePos pos) const {
    mbar_wait(full_bar(pos), pos.parity());
    fence_proxy_async();
  }
  // Consumer, after its wgmmas on the stage have completed: one arrival per warp.
  __device__ __forceinline__ void release(PipePos pos) const {
    if ((threadIdx.x & 31) == 0) mbar_arrive(smem_u32(&empty[pos.stage()]));
  }
};

// Aligns the dynamic shared memory, initialises the barriers and makes them visible to the CTA.
__device__ __forceinline__ Pipeline setup_pipeline(uint8_t *smem_raw) {
  Pipeline p;
  p.smem = reinterpret_cast<uint8_t *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                       ~(uintptr_t)1023);
  p.full = reinterpret_cast<uint64_t *>(p.smem + kStages * kStageBytes);
  p.empty = p.full + kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(smem_u32(&p.full[s]), 128 + 1);
      mbar_init(smem_u32(&p.empty[s]), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  return p;
}

// One consumer warpgroup's MMAs on one stage: four k16 steps of m64n256k16, accumulating into acc
// unless `overwrite` (the first stage of a tile). a and b are the warpgroup's operand tiles; a
// K-major operand advances 32 bytes per k16 step inside its 128-byte rows, an MN-major one 16
// rows (2048 bytes), its 64-column atoms kAtomBytes apart. Returns once the MMAs have completed,
// so the stage can be released.
template <typename T, int kAMNMajor, int kBMNMajor>
__device__ __forceinline__ void mma_stage(float (&acc)[128], uint32_t a, uint32_t b,
                                          bool overwrite) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    const uint64_t da =
        kAMNMajor ? smem_desc(a + ks * 2048, kAtomBytes, 1024) : smem_desc(a + ks * 32, 16, 1024);
    const uint64_t db =
        kBMNMajor ? smem_desc(b + ks * 2048, kAtomBytes, 1024) : smem_desc(b + ks * 32, 16, 1024);
    Wgmma<T>::template mma<kAMNMajor, kBMNMajor>(acc, da, db, !overwrite || ks > 0);
  }
  wgmma_commit();
  wgmma_wait0();
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---------------------------------------------------------------------------------------------
// Row-tile GEMMs: out[rows of expert e, :] = A[rows, :] . B_e (up, down, dAct, dX).

template <typename T>
struct RowGemmArgs {
  const T *a0;                     // A rows [*, K]: X (up, gathered), act, dy, dg
  const T *a1;                     // dX only: du, the second K segment (B = Wu^T)
  const uint32_t *gather;          // up, dAct: A row of pair p is gather[p]
  const uint32_t *expert_offsets;  // [E+1]
  const uint32_t *tile_offsets;    // [E+1], row tiles of BM
  T *out0;                         // up: act; dAct: dg; dX: dx_pair
  T *out1;                         // up: g (may be null); dAct: du
  T *out2;                         // up: u (may be null); dAct: act, recomputed
  float *out_f32;                  // down: y
  const T *in_g;                   // dAct: saved g
  const T *in_u;                   // dAct: saved u
  const float *row_scale;          // dAct: the pairs' gates R
  float *row_dots;                 // dAct: dR's 32-column group sums [|A|, ceil(N / 32)]
  int e, K, N, col_tiles;
  // Split-K (the down projection at small |A|, 1 elsewhere): each output tile's K blocks are cut
  // into k_splits ranges [s kb / k_splits, (s + 1) kb / k_splits), each a separate work unit
  // that writes its partial sums to plane s of out_f32 (planes of plane_rows x N floats).
  int k_splits, plane_rows;
};

// One unit of a row GEMM's persistent work: a (row tile, column tile) and one of its K ranges.
struct RowUnit {
  int expert, row0, rows, col_tile, split, kb_begin, kb_end;
};

// Unit `unit` of the grid's walk; k_blocks counts every K block of the tile (both segments of
// dX). Split fastest, so that the CTAs sharing an output tile run side by side.
template <typename T>
__device__ __forceinline__ RowUnit row_unit(const RowGemmArgs<T> &args, int unit, int k_blocks) {
  RowUnit u;
  u.split = unit % args.k_splits;
  const int tile = unit / args.k_splits;
  const int row_tile = tile / args.col_tiles;
  u.col_tile = tile - row_tile * args.col_tiles;
  u.expert = expert_of_tile(args.tile_offsets, args.e, row_tile);
  u.row0 = (int)args.expert_offsets[u.expert] + (row_tile - (int)args.tile_offsets[u.expert]) * BM;
  u.rows = min(BM, (int)args.expert_offsets[u.expert + 1] - u.row0);
  u.kb_begin = (int)((long long)u.split * k_blocks / args.k_splits);
  u.kb_end = (int)((long long)(u.split + 1) * k_blocks / args.k_splits);
  return u;
}

// Column layout of each mode's B operand and output.
template <int kMode>
struct RowGemmTraits {
  // B stored [k rows][n] per expert (the forward's Wg, Wu, Wd): MN-major for wgmma.
  static constexpr bool kBMNMajor = kMode == kUpSwiGLU || kMode == kDown;
  // Output columns per tile: the up projection's 256 B columns are 128 of Wg and 128 of Wu.
  static constexpr int kOutCols = kMode == kUpSwiGLU ? BN / 2 : BN;
  static constexpr int kSegments = kMode == kDX ? 2 : 1;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Loads one stage's B tile by TMA. MN-major: four [64 k][64 n] boxes; K-major: one [256 n][64 k].
template <int kMode>
__device__ __forceinline__ void load_b_stage(uint32_t b_smem, const CUtensorMap *map0,
                                             const CUtensorMap *map1, uint32_t bar, int segment,
                                             int expert, int out_col0, int k0) {
  if constexpr (kMode == kUpSwiGLU) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      tma_load_3d(b_smem + j * kAtomBytes, j < 2 ? map0 : map1, bar, out_col0 + (j & 1) * 64, k0,
                  expert);
  } else if constexpr (kMode == kDown) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      tma_load_3d(b_smem + j * kAtomBytes, map0, bar, out_col0 + j * 64, k0, expert);
  } else {
    tma_load_3d(b_smem, segment == 0 ? map0 : map1, bar, k0, out_col0, expert);
  }
}

template <typename T, int kMode>
__device__ __forceinline__ void row_gemm_producer(const RowGemmArgs<T> &args, const Pipeline &pipe,
                                                  const CUtensorMap *map0, const CUtensorMap *map1,
                                                  int total_tiles) {
  using Tr = RowGemmTraits<kMode>;
  const int pt = threadIdx.x;    // 0..127
  const int chunk = pt & 7;      // this thread's 16-byte chunk of each of its rows
  const int row_base = pt >> 3;  // rows row_base + 16 i, i = 0..7
  const int K = args.K;
  const int k_blocks = (K + BK - 1) / BK;
  PipePos pos;
  for (int unit = blockIdx.x; unit < total_tiles; unit += gridDim.x) {
    const RowUnit u = row_unit(args, unit, k_blocks * Tr::kSegments);
    const int expert = u.expert, row0 = u.row0, rows = u.rows, col_tile = u.col_tile;
    uint32_t src_row[8];
    uint32_t row_ok = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = row_base + 16 * i;
      const bool ok = r < rows;
      row_ok |= (uint32_t)ok << i;
      src_row[i] =
          ok ? (args.gather != nullptr ? args.gather[row0 + r] : (uint32_t)(row0 + r)) : 0u;
    }
    for (int kb = u.kb_begin; kb < u.kb_end; ++kb) {
      const int segment = kb >= k_blocks ? 1 : 0;
      const int k0 = (kb - segment * k_blocks) * BK;
      pipe.acquire(pos);
      const uint32_t a_smem = pipe.a_tile(pos);
      const T *a = segment == 0 ? args.a0 : args.a1;
      const bool k_ok = k0 + chunk * 8 < K;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = row_base + 16 * i;
        const bool ok = k_ok && ((row_ok >> i) & 1);
        const T *src = ok ? a + (size_t)src_row[i] * K + k0 + chunk * 8 : a;
        cp_async16(a_smem + swz(r, chunk), src, ok ? 16 : 0);
      }
      const uint32_t bar = pipe.full_bar(pos);
      cp_async_arrive(bar);
      if (pt == 0) {
        mbar_arrive_expect_tx(bar, kBTileBytes);
        load_b_stage<kMode>(pipe.b_tile(pos), map0, map1, bar, segment, expert,
                            col_tile * Tr::kOutCols, k0);
      }
      ++pos.n;
    }
  }
  cp_async_wait_all();
}

// Epilogue policies of the row GEMMs. Each thread owns rows wg_row0 + 16 warp + lane/4 (+ 8) of
// the tile; quad_columns hands it 8 consecutive columns at a time. Every lane of a quad takes
// part in the shuffles; the loads and stores are masked after.

// dAct: A was dOut's rows gathered through pair_token, so the accumulators hold dOut_t Wd_e^T.
// From the saved g and u (four column groups' loads issued before the first is used, so their
// latencies overlap): a recomputed and written for dWd; dR's sum over each 32-column group (one
// quad's 32 columns, swiglu.cuh's order); SwiGLU's backward of da = R (dOut_t Wd_e^T).
template <typename T>
__device__ __forceinline__ void dact_epilogue(const RowGemmArgs<T> &args, float (&acc)[128],
                                              int row0, int rows, int col0, int wg_row0) {
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) & 3;
  const int N = args.N;
  const int groups = (N + 31) / 32;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = wg_row0 + warp * 16 + (lane >> 2) + half * 8;
    const bool row_ok = r < rows;
    const size_t row = (size_t)row0 + (row_ok ? r : 0);
    const size_t orow = row * N;
    const float gate = row_ok ? args.row_scale[row] : 0.f;
#pragma unroll
    for (int batch = 0; batch < BN / 32; batch += 4) {
      uint4 g_raw[4], u_raw[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int col = col0 + (batch + b) * 32 + (lane & 3) * 8;
        g_raw[b] = u_raw[b] = make_uint4(0, 0, 0, 0);
        if (row_ok && col < N) {
          g_raw[b] = *reinterpret_cast<const uint4 *>(args.in_g + orow + col);
          u_raw[b] = *reinterpret_cast<const uint4 *>(args.in_u + orow + col);
        }
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        float v[8];
        quad_columns(acc, batch + b, half, v);
        const int col = col0 + (batch + b) * 32 + (lane & 3) * 8;
        const T *ge = reinterpret_cast<const T *>(&g_raw[b]);
        const T *ue = reinterpret_cast<const T *>(&u_raw[b]);
        float a[8], dg[8], du[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float g = to_float(ge[i]), u = to_float(ue[i]), s = sigmoid(g);
          a[i] = swiglu_rounded<T>(g, u, s);
          dswiglu(gate * v[i], g, u, s, dg[i], du[i]);
        }
        const float eight = tree4(dot2(a[0], v[0], a[1], v[1]), dot2(a[2], v[2], a[3], v[3]),
                                  dot2(a[4], v[4], a[5], v[5]), dot2(a[6], v[6], a[7], v[7]));
        const float group = quad_tree(eight);
        if (row_ok && col < N) {
          store8v<T>(args.out0 + orow + col, dg);
          store8v<T>(args.out1 + orow + col, du);
          store8v<T>(args.out2 + orow + col, a);
          if ((lane & 3) == 0) args.row_dots[row * groups + col / 32] = group;
        }
      }
    }
  }
}

// Up (SwiGLU, and g and u when saving), down (f32 y) and dX (plain store).
template <typename T, int kMode>
__device__ __forceinline__ void store_epilogue(const RowGemmArgs<T> &args, float (&acc)[128],
                                               int row0, int rows, int col0, int wg_row0,
                                               int split) {
  using Tr = RowGemmTraits<kMode>;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) & 3;
  const int N = args.N;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = wg_row0 + warp * 16 + (lane >> 2) + half * 8;
    const bool row_ok = r < rows;
    const size_t orow = (size_t)(row0 + (row_ok ? r : 0)) * N;
#pragma unroll
    for (int jg = 0; jg < Tr::kOutCols / 32; ++jg) {
      float v[8];
      quad_columns(acc, jg, half, v);
      const int col = col0 + jg * 32 + (lane & 3) * 8;
      if constexpr (kMode == kUpSwiGLU) {
        float u[8], a[8];
        quad_columns(acc, jg + 4, half, u);  // Wu's columns: 128 further in the tile
        if (!row_ok || col >= N) continue;
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = swiglu<T>(v[i], u[i]);
        store8v<T>(args.out0 + orow + col, a);
        if (args.out1 != nullptr) {
          store8v<T>(args.out1 + orow + col, v);
          store8v<T>(args.out2 + orow + col, u);
        }
      } else if constexpr (kMode == kDown) {
        if (!row_ok || col >= N) continue;
        float *y = args.out_f32 + (size_t)split * args.plane_rows * N;
        float4 *o = reinterpret_cast<float4 *>(y + orow + col);
        o[0] = make_float4(v[0], v[1], v[2], v[3]);
        o[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        if (!row_ok || col >= N) continue;
        store8v<T>(args.out0 + orow + col, v);
      }
    }
  }
}

template <typename T, int kMode>
__device__ __forceinline__ void row_gemm_epilogue(const RowGemmArgs<T> &args, float (&acc)[128],
                                                  int row0, int rows, int col0, int wg_row0,
                                                  int split) {
  if constexpr (kMode == kDAct)
    dact_epilogue<T>(args, acc, row0, rows, col0, wg_row0);
  else
    store_epilogue<T, kMode>(args, acc, row0, rows, col0, wg_row0, split);
}

template <typename T, int kMode>
__device__ __forceinline__ void row_gemm_consumer(const RowGemmArgs<T> &args, const Pipeline &pipe,
                                                  int total_tiles) {
  using Tr = RowGemmTraits<kMode>;
  const int wg = threadIdx.x / 128 - 1;  // 0 or 1: rows 64 wg .. 64 wg + 63 of the tile
  const int k_blocks = (args.K + BK - 1) / BK * Tr::kSegments;
  float acc[128];
  PipePos pos;
  for (int unit = blockIdx.x; unit < total_tiles; unit += gridDim.x) {
    const RowUnit u = row_unit(args, unit, k_blocks);
    // An expert's last tile may end before this warpgroup's rows (every tile of a small batch
    // does: 64 pairs per expert at config S, one at decode). Its MMAs would multiply zero-filled
    // rows that the epilogue never stores, and they share the SM's tensor cores with the other
    // warpgroup's; so it only keeps the stages' barriers in step. The stored rows are unchanged.
    const bool idle = wg * 64 >= u.rows;
    for (int kb = u.kb_begin; kb < u.kb_end; ++kb) {
      pipe.wait_loaded(pos);
      // A is K-major (this warpgroup's 64 rows: 64 x 128 bytes in); B as the mode stores it.
      if (!idle)
        mma_stage<T, 0, Tr::kBMNMajor ? 1 : 0>(acc, pipe.a_tile(pos) + wg * (64 * 128),
                                               pipe.b_tile(pos), kb == u.kb_begin);
      pipe.release(pos);
      ++pos.n;
    }
    if (!idle)
      row_gemm_epilogue<T, kMode>(args, acc, u.row0, u.rows, u.col_tile * Tr::kOutCols, wg * 64,
                                  u.split);
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads, 1)
    row_gemm_kernel(const RowGemmArgs<T> args, const __grid_constant__ CUtensorMap map0,
                    const __grid_constant__ CUtensorMap map1) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const Pipeline pipe = setup_pipeline(smem_raw);
  const int total_tiles = (int)args.tile_offsets[args.e] * args.col_tiles * args.k_splits;
  if (threadIdx.x < 128) {
    setmaxnreg_dec<56>();
    row_gemm_producer<T, kMode>(args, pipe, &map0, &map1, total_tiles);
  } else {
    setmaxnreg_inc<224>();
    row_gemm_consumer<T, kMode>(args, pipe, total_tiles);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Weight gradients: out[e, m, n] (+)= sum over expert e's pairs p of A[row(p), m] . B[p, n],
// with row(p) = gather[p] or p. Both operands are MN-major (each pair's row contiguous): A's tile
// is [64 pairs][128 m] as two atoms, B's [64 pairs][256 n] as four. The reduction runs over the
// expert's pairs in ascending order inside one CTA: deterministic, no atomics.

template <typename T>
struct WeightGradArgs {
  const T *a;
  const uint32_t *gather;
  const T *b;
  float *out;
  const uint32_t *expert_offsets;
  int e, M, N, m_tiles, n_tiles, accumulate;
  // The fixed-order split (weight_grad_split.cuh); plan == nullptr: one chunk per expert.
  const uint32_t *plan;
  float *slots;
  uint32_t *counters;
};

// Work unit u is output tile (u % tiles) of chunk (u / tiles), tiles = m_tiles * n_tiles: the
// tiles of one chunk are neighbours, so they share their B rows (and A's) in L2.
struct WgTile {
  WgChunk c;
  int tile, m0, n0;
};
template <typename T>
__device__ __forceinline__ WgTile weight_grad_unit(const WeightGradArgs<T> &args, int unit) {
  const int tiles = args.m_tiles * args.n_tiles;
  WgTile w;
  w.c = wg_chunk(args.plan, args.expert_offsets, args.e, unit / tiles);
  w.tile = unit % tiles;
  w.m0 = w.tile / args.n_tiles * BM;
  w.n0 = w.tile % args.n_tiles * BN;
  return w;
}

// Bytes a full block of 64 pairs brings by TMA: B always, A when it is not gathered.
__host__ __device__ constexpr int weight_grad_tx_bytes(bool gathered) {
  return kBTileBytes + (gathered ? 0 : kATileBytes);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Loads A [64 pairs][128 m] (two atoms) and B [64 pairs][256 n] (four atoms) of one stage.
// TMA for a full block (A too when not gathered); cp.async with zero fill for A when gathered
// and for both in the expert's last, partial block. Every producer thread arrives once per stage
// (through cp.async.mbarrier.arrive, whether it copied anything or not) and thread 0 once more,
// with the TMA's byte count or plainly: the `full` barrier expects 129 arrivals.
template <typename T>
__device__ __forceinline__ void weight_grad_load_stage(const WeightGradArgs<T> &args,
                                                       uint32_t a_smem, uint32_t bar,
                                                       const CUtensorMap *map_a,
                                                       const CUtensorMap *map_b, int p0, int K,
                                                       int k0, int m0, int n0) {
  const int pt = threadIdx.x;
  const bool gathered = args.gather != nullptr;
  const bool whole = k0 + BK <= K;
  const uint32_t b_smem = a_smem + kATileBytes;
  if (whole && pt == 0) {
    mbar_arrive_expect_tx(bar, weight_grad_tx_bytes(gathered));
#pragma unroll
    for (int j = 0; j < 4; ++j)
      tma_load_2d(b_smem + j * kAtomBytes, map_b, bar, n0 + 64 * j, p0 + k0);
    if (!gathered) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
        tma_load_2d(a_smem + j * kAtomBytes, map_a, bar, m0 + 64 * j, p0 + k0);
    }
  }
  if (!whole || gathered) {
    // A: 16 chunks of 8 values per 256-byte row; this thread's rows a_row + 8 i.
    const int a_chunk = pt & 15, a_row = pt >> 4;
    const bool a_col_ok = m0 + a_chunk * 8 < args.M;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int k = a_row + 8 * i;
      const bool ok = a_col_ok && k0 + k < K;
      const T *src = args.a;
      if (ok) {
        const uint32_t p = (uint32_t)(p0 + k0 + k);
        const uint32_t row = gathered ? args.gather[p] : p;
        src = args.a + (size_t)row * args.M + m0 + a_chunk * 8;
      }
      cp_async16(a_smem + (a_chunk >> 3) * kAtomBytes + swz(k, a_chunk & 7), src, ok ? 16 : 0);
    }
  }
  if (!whole) {
    // B: 32 chunks per 512-byte row; this thread's rows b_row + 4 i.
    const int b_chunk = pt & 31, b_row = pt >> 5;
    const bool b_col_ok = n0 + b_chunk * 8 < args.N;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int k = b_row + 4 * i;
      const bool ok = b_col_ok && k0 + k < K;
      const T *src = ok ? args.b + (size_t)(p0 + k0 + k) * args.N + n0 + b_chunk * 8 : args.b;
      cp_async16(b_smem + (b_chunk >> 3) * kAtomBytes + swz(k, b_chunk & 7), src, ok ? 16 : 0);
    }
    if (pt == 0) mbar_arrive(bar);
  }
  cp_async_arrive(bar);
}

template <typename T>
__device__ __forceinline__ void weight_grad_producer(const WeightGradArgs<T> &args,
                                                     const Pipeline &pipe, const CUtensorMap *map_a,
                                                     const CUtensorMap *map_b, int units) {
  PipePos pos;
  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const WgTile w = weight_grad_unit(args, unit);
    for (int k0 = 0; k0 < w.c.len; k0 += BK) {
      pipe.acquire(pos);
      weight_grad_load_stage<T>(args, pipe.a_tile(pos), pipe.full_bar(pos), map_a, map_b, w.c.p0,
                                w.c.len, k0, w.m0, w.n0);
      ++pos.n;
    }
  }
  cp_async_wait_all();
}

// Barrier 1 over the two consumer warpgroups (barrier 0 is __syncthreads').
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// Stores (or adds to out, with args.accumulate) one 128 x 256 f32 tile of a weight gradient at
// rows m0, columns n0 of out. The small-batch weight gradients are nothing but this store (K is
// an expert's pairs: 64 at config S, 1 in decode), and its pattern decides their speed: stored
// from the accumulators' layout (each instruction writing 16 bytes into each of 8 rows) the
// tile goes out at 1.3 TB/s; each warp writing whole 1 KB row segments, 2.4 TB/s
// (tools/hbm-stream/store.cu on the H100). So the tile goes through shared memory in four
// rounds of 32 rows (one warpgroup's rows r, r + 16, ... for half = 0 or 1): the round's
// warpgroup writes its accumulators there, then all eight consumer warps store the rows. In
// shared memory, staging row s's 32-byte chunks are XOR-swizzled by s % 4 (column c at
// c ^ 8 (s % 4)), so that a half-warp's 8-byte stores (four rows at once) fall in different
// banks; a warp reading one row's 512 bytes reads each bank four times whatever the swizzle.
// Must be called by all 256 consumer threads.
template <typename T>
__device__ __forceinline__ void store_weight_grad_tile(const WeightGradArgs<T> &args,
                                                       const float (&acc)[128], float *out,
                                                       int m0, int n0, float *staging) {
  const int wg = threadIdx.x / 128 - 1;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) & 3;  // in the warpgroup
  const int cw = (threadIdx.x - 128) >> 5;   // 0..7 over the consumers
#pragma unroll
  for (int round = 0; round < 4; ++round) {
    const int round_wg = round >> 1, half = round & 1;
    if (wg == round_wg) {
      // Accumulator j covers columns 8 (j / 4) + 2 (lane % 4) + {0, 1} of row lane / 4 (+ 8
      // for the upper pair): staging row 8 warp + lane / 4.
      const int srow = warp * 8 + (lane >> 2);
      float *row = staging + srow * BN;
      const int swizzle = (srow & 3) << 3;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
        *reinterpret_cast<float2 *>(row + ((8 * j + 2 * (lane & 3)) ^ swizzle)) =
            make_float2(acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
    }
    consumer_sync();
    // Staging row s = 8 w + r holds tile row 64 round_wg + 16 w + r + 8 half.
#pragma unroll
    for (int i = 0; i < kStagedRows / 8; ++i) {
      const int s = cw + 8 * i;
      const int m = m0 + 64 * round_wg + 16 * (s >> 3) + (s & 7) + 8 * half;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = c * 128 + lane * 4;
        const int n = n0 + col;
        if (m >= args.M || n >= args.N) continue;
        float4 v = *reinterpret_cast<const float4 *>(staging + s * BN + (col ^ ((s & 3) << 3)));
        float4 *o = reinterpret_cast<float4 *>(out + (size_t)m * args.N + n);
        if (args.accumulate) {
          const float4 a = *o;
          v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
        }
        *o = v;
      }
    }
    consumer_sync();
  }
}

template <typename T>
__device__ __forceinline__ void weight_grad_consumer(const WeightGradArgs<T> &args,
                                                     const Pipeline &pipe, float *staging,
                                                     int units) {
  __shared__ int last_flag;
  const int wg = threadIdx.x / 128 - 1;
  const int ct = threadIdx.x - 128;  // 0..255 over the consumers
  const int tiles = args.m_tiles * args.n_tiles;
  float acc[128];
  PipePos pos;
  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const WgTile w = weight_grad_unit(args, unit);
    const int m0 = w.m0, n0 = w.n0;
    if (w.c.len == 0) {
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    }
    for (int k0 = 0; k0 < w.c.len; k0 += BK) {
      pipe.wait_loaded(pos);
      // Both operands MN-major; this warpgroup's 64 columns of m are A's atom wg.
      mma_stage<T, 1, 1>(acc, pipe.a_tile(pos) + wg * kAtomBytes, pipe.b_tile(pos), k0 == 0);
      pipe.release(pos);
      ++pos.n;
    }
    // A chunk of a split expert: the tile's last unit stores the sum of all its chunks.
    if (w.c.chunks > 1 && !wg_split_finish<128>(args.slots, args.counters, w.c, tiles, w.tile, ct,
                                                256, &last_flag, consumer_sync, acc))
      continue;
    store_weight_grad_tile(args, acc, args.out + (size_t)w.c.expert * args.M * args.N, m0, n0,
                           staging);
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    weight_grad_kernel(const WeightGradArgs<T> args, const __grid_constant__ CUtensorMap map_a,
                       const __grid_constant__ CUtensorMap map_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const Pipeline pipe = setup_pipeline(smem_raw);
  const int units = wg_total_chunks(args.plan, args.e) * args.m_tiles * args.n_tiles;
  if (threadIdx.x < 128) {
    setmaxnreg_dec<56>();
    weight_grad_producer<T>(args, pipe, &map_a, &map_b, units);
  } else {
    setmaxnreg_inc<224>();
    float *staging = reinterpret_cast<float *>(pipe.end());
    weight_grad_consumer<T>(args, pipe, staging, units);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side.

// cuTensorMapEncodeTiled, from the driver through the runtime (the crate links no libcuda).
using EncodeTiledFn = CUresult (*)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                   const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                   const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = []() -> EncodeTiledFn {
    void *p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return nullptr;
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

template <typename T>
constexpr CUtensorMapDataType tma_dtype() {
  return sizeof(T) == 2 && std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                          : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

// A [E][rows][cols] weight tensor (cols contiguous) as a 3-D tensor map with a box of
// box_cols x box_rows x 1 and 128-byte swizzle (box_cols = 64 16-bit values = 128 bytes).
template <typename T>
cudaError_t weight_map(CUtensorMap *map, const void *base, int e, int rows, int cols,
                       int box_rows) {
  const EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {(cuuint64_t)cols, (cuuint64_t)rows, (cuuint64_t)e};
  const cuuint64_t strides[2] = {(cuuint64_t)cols * 2, (cuuint64_t)rows * cols * 2};
  const cuuint32_t box[3] = {64, (cuuint32_t)box_rows, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, tma_dtype<T>(), 3, const_cast<void *>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A [rows][cols] operand (cols contiguous) as a 2-D tensor map with 64 x 64 boxes, 128-byte
// swizzle. Rows past `rows` or columns past `cols` read as zeros.
template <typename T>
cudaError_t rows_map(CUtensorMap *map, const void *base, long long rows, int cols) {
  const EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)(rows > 0 ? rows : 1)};
  const cuuint64_t strides[1] = {(cuuint64_t)cols * 2};
  const cuuint32_t box[2] = {64, 64};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, tma_dtype<T>(), 2, const_cast<void *>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Streaming multiprocessors of the current device (the persistent grid), cached per device.
// Atomic: several host threads launch at once (an expert-parallel group's ranks), and they
// may fill an entry together (with the same value).
int sm_count() {
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  const bool cached = dev >= 0 && dev < 64;
  if (cached) {
    const int known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  if (cached) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

template <typename Kernel>
cudaError_t prepare(Kernel kernel, int smem_bytes) {
  // Set on every launch: the attribute belongs to the current device, and a process may use
  // several (the call costs far less than the kernel).
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
}

template <typename T, int kMode>
int launch_row_gemm(RowGemmArgs<T> args, const void *b0, const void *b1, int num_tiles,
                    cudaStream_t stream) {
  if (num_tiles == 0) return 0;
  using Tr = RowGemmTraits<kMode>;
  // B as stored per expert: [K][N] for the forward (MN-major), [N][K] for the backward.
  const int b_rows = Tr::kBMNMajor ? args.K : args.N;
  const int b_cols = Tr::kBMNMajor ? args.N : args.K;
  const int box_rows = Tr::kBMNMajor ? BK : BN;
  CUtensorMap map0, map1;
  cudaError_t err = weight_map<T>(&map0, b0, args.e, b_rows, b_cols, box_rows);
  if (err == cudaSuccess)
    err = weight_map<T>(&map1, b1 != nullptr ? b1 : b0, args.e, b_rows, b_cols, box_rows);
  auto kernel = row_gemm_kernel<T, kMode>;
  if (err == cudaSuccess) err = prepare(kernel, kSmemBytes);
  if (err != cudaSuccess) return (int)err;
  args.col_tiles = (args.N + Tr::kOutCols - 1) / Tr::kOutCols;
  if (args.k_splits < 1) args.k_splits = 1;
  const long long tiles = (long long)num_tiles * args.col_tiles * args.k_splits;
  if (tiles > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  const int grid = (int)(tiles < (long long)sm_count() ? tiles : (long long)sm_count());
  if (grid <= 0) return (int)cudaErrorInvalidDevice;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(args, map0, map1);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_weight_grad(const uint16_t *a, const uint32_t *gather, const uint16_t *b, float *out,
                       const uint32_t *expert_offsets, int a_rows, int b_rows, int e, int M, int N,
                       int accumulate, const remoe_wgrad_split_t *split, cudaStream_t stream) {
  auto kernel = weight_grad_kernel<T>;
  CUtensorMap map_a, map_b;
  cudaError_t err = rows_map<T>(&map_a, a, a_rows, M);
  if (err == cudaSuccess) err = rows_map<T>(&map_b, b, b_rows, N);
  if (err == cudaSuccess) err = prepare(kernel, kWeightGradSmemBytes);
  if (err != cudaSuccess) return (int)err;
  WeightGradArgs<T> args{reinterpret_cast<const T *>(a),
                         gather,
                         reinterpret_cast<const T *>(b),
                         out,
                         expert_offsets,
                         e,
                         M,
                         N,
                         (M + BM - 1) / BM,
                         (N + BN - 1) / BN,
                         accumulate,
                         split != nullptr ? split->plan : nullptr,
                         split != nullptr ? split->slots : nullptr,
                         split != nullptr ? split->counters : nullptr};
  // Enough CTAs for the most units any plan makes (each expert at least one chunk, the split
  // ones at most wg_max_slots more); the kernel reads this launch's count from the plan.
  const int chunks = e + (args.plan != nullptr ? wg_max_slots(M, N) : 0);
  const long long tiles = (long long)chunks * args.m_tiles * args.n_tiles;
  if (tiles > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  if (tiles == 0) return 0;
  const int grid = (int)(tiles < (long long)sm_count() ? tiles : (long long)sm_count());
  if (grid <= 0) return (int)cudaErrorInvalidDevice;
  kernel<<<grid, kThreads, kWeightGradSmemBytes, stream>>>(args, map_a, map_b);
  return (int)cudaGetLastError();
}

}  // namespace

#define REMOE_HOPPER_GEMM_ENTRY_POINTS(SUFFIX, T)                                                 \
  extern "C" int remoe_hopper_expert_up_swiglu_##SUFFIX(                                          \
      const uint16_t *x, const uint32_t *pair_token, const uint16_t *wg, const uint16_t *wu,      \
      uint16_t *act, uint16_t *g, uint16_t *u, const uint32_t *expert_offsets,                    \
      const uint32_t *tile_offsets, int32_t num_tiles, int32_t e, int32_t h, int32_t f,           \
      remoe_stream_t stream) {                                                                    \
    RowGemmArgs<T> a{};                                                                           \
    a.a0 = reinterpret_cast<const T *>(x);                                                        \
    a.gather = pair_token;                                                                        \
    a.out0 = reinterpret_cast<T *>(act);                                                          \
    a.out1 = g != nullptr && u != nullptr ? reinterpret_cast<T *>(g) : nullptr;                   \
    a.out2 = reinterpret_cast<T *>(u);                                                            \
    a.expert_offsets = expert_offsets;                                                            \
    a.tile_offsets = tile_offsets;                                                                \
    a.e = e;                                                                                      \
    a.K = h;                                                                                      \
    a.N = f;                                                                                      \
    return launch_row_gemm<T, kUpSwiGLU>(a, wg, wu, num_tiles, (cudaStream_t)stream);             \
  }                                                                                               \
  extern "C" int remoe_hopper_expert_down_##SUFFIX(                                               \
      const uint16_t *act, const uint16_t *wd, float *y, const uint32_t *expert_offsets,          \
      const uint32_t *tile_offsets, int32_t num_tiles, int32_t e, int32_t h, int32_t f,           \
      int32_t k_splits, int32_t plane_rows, remoe_stream_t stream) {                              \
    RowGemmArgs<T> a{};                                                                           \
    a.a0 = reinterpret_cast<const T *>(act);                                                      \
    a.out_f32 = y;                                                                                \
    a.k_splits = k_splits;                                                                        \
    a.plane_rows = plane_rows;                                                                    \
    a.expert_offsets = expert_offsets;                                                            \
    a.tile_offsets = tile_offsets;                                                                \
    a.e = e;                                                                                      \
    a.K = f;                                                                                      \
    a.N = h;                                                                                      \
    return launch_row_gemm<T, kDown>(a, wd, nullptr, num_tiles, (cudaStream_t)stream);            \
  }                                                                                               \
  extern "C" int remoe_hopper_expert_dact_##SUFFIX(                                               \
      const uint16_t *dout, const uint32_t *pair_token, const float *pair_gate,                   \
      const uint16_t *wd, const uint16_t *g, const uint16_t *u, uint16_t *dg, uint16_t *du,       \
      uint16_t *act, float *row_dots, const uint32_t *expert_offsets,                             \
      const uint32_t *tile_offsets, int32_t num_tiles, int32_t e, int32_t h, int32_t f,           \
      remoe_stream_t stream) {                                                                    \
    RowGemmArgs<T> a{};                                                                           \
    a.a0 = reinterpret_cast<const T *>(dout);                                                     \
    a.gather = pair_token;                                                                        \
    a.row_scale = pair_gate;                                                                      \
    a.in_g = reinterpret_cast<const T *>(g);                                                      \
    a.in_u = reinterpret_cast<const T *>(u);                                                      \
    a.out0 = reinterpret_cast<T *>(dg);                                                           \
    a.out1 = reinterpret_cast<T *>(du);                                                           \
    a.out2 = reinterpret_cast<T *>(act);                                                          \
    a.row_dots = row_dots;                                                                        \
    a.expert_offsets = expert_offsets;                                                            \
    a.tile_offsets = tile_offsets;                                                                \
    a.e = e;                                                                                      \
    a.K = h;                                                                                      \
    a.N = f;                                                                                      \
    return launch_row_gemm<T, kDAct>(a, wd, nullptr, num_tiles, (cudaStream_t)stream);            \
  }                                                                                               \
  extern "C" int remoe_hopper_expert_dx_##SUFFIX(                                                 \
      const uint16_t *dg, const uint16_t *du, const uint16_t *wg, const uint16_t *wu,             \
      uint16_t *dx_pair, const uint32_t *expert_offsets, const uint32_t *tile_offsets,            \
      int32_t num_tiles, int32_t e, int32_t h, int32_t f, remoe_stream_t stream) {                \
    RowGemmArgs<T> a{};                                                                           \
    a.a0 = reinterpret_cast<const T *>(dg);                                                       \
    a.a1 = reinterpret_cast<const T *>(du);                                                       \
    a.out0 = reinterpret_cast<T *>(dx_pair);                                                      \
    a.expert_offsets = expert_offsets;                                                            \
    a.tile_offsets = tile_offsets;                                                                \
    a.e = e;                                                                                      \
    a.K = f;                                                                                      \
    a.N = h;                                                                                      \
    return launch_row_gemm<T, kDX>(a, wg, wu, num_tiles, (cudaStream_t)stream);                   \
  }                                                                                               \
  extern "C" int remoe_hopper_expert_weight_grad_##SUFFIX(                                        \
      const uint16_t *a, const uint32_t *gather, const uint16_t *b, float *out,                   \
      const uint32_t *expert_offsets, int32_t a_rows, int32_t b_rows, int32_t e, int32_t m,       \
      int32_t n, int32_t accumulate, const remoe_wgrad_split_t *split, remoe_stream_t stream) {   \
    return launch_weight_grad<T>(a, gather, b, out, expert_offsets, a_rows, b_rows, e, m, n,      \
                                 accumulate, split, (cudaStream_t)stream);                        \
  }

REMOE_HOPPER_GEMM_ENTRY_POINTS(bf16, __nv_bfloat16)
REMOE_HOPPER_GEMM_ENTRY_POINTS(f16, __half)

// Whether this binary holds the sm_90a code of the kernels above for the current device: the
// probe compiled for any other target (sm_80 code, or PTX that the driver JIT-compiles for a
// newer chip) reports 0, and then the Hopper launchers must not be used (their kernels would
// be empty). Synchronous; the Rust layer calls it once per device and caches the answer.
__global__ void hopper_gemm_probe(int32_t *out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

extern "C" int remoe_hopper_gemm_available(int32_t *available) {
  *available = 0;
  int32_t *d = nullptr;
  cudaError_t err = cudaMalloc(&d, sizeof(int32_t));
  if (err != cudaSuccess) return (int)err;
  hopper_gemm_probe<<<1, 1>>>(d);
  err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(available, d, sizeof(int32_t), cudaMemcpyDeviceToHost);
  cudaFree(d);
  return (int)err;
}
