// The contract of the expert GEMMs, shared by their two implementations: the mma.sync path
// (grouped_gemm.cu, every architecture from sm_80) and the wgmma path (hopper_gemm.cu, sm_90a).
// Both export the same launchers (remoe_kernels.h), the Rust layer picks one per device, and
// tests/gpu_gemm_paths.rs holds them to the same bits; so what a launch computes is written here
// once: the modes and what tells them apart, which expert a row tile belongs to, the operands,
// one parameter struct per epilogue, and the C entry points. Each path keeps what is its own: tile
// shapes, mainloop, and the epilogue code over these parameters.
#pragma once

#include "common.cuh"

// The row GEMMs: for the pairs p of expert e (rows of A), out[p, :] = A[p, :] . B_e, followed by
// the mode's epilogue. The weight gradients, whose reduction runs over the pairs, are not one of
// them (each path has its own kernel for those).
enum GemmMode { kUpSwiGLU = 0, kDown = 1, kDAct = 2, kDX = 3 };

// ---- parameters of the epilogues ----

// The up projection: act = SiLU(g) u, from the accumulators' g and u columns rounded to T
// (swiglu.cuh), and g and u themselves when the backward needs them. [|A|, N] each.
template <typename T>
struct SwiGLUParams {
  T *act;
  T *g;  // null unless g and u are both saved: u is written only with g
  T *u;
};

// Split-K's f32 store: K range s writes its partial sums to plane s, which the plane sum
// (split_k.cu) adds in plane order.
struct SplitKStoreParams {
  float *planes;   // k_splits planes of plane_rows x N floats
  int plane_rows;  // >= |A|
};

// The down projection: y = act Wd_e rounded once to T from the f32 accumulators, where a
// launch's K range is whole (k_splits == 1). Under split-K no unit holds a whole sum: the units
// write their partial sums instead, and the plane sum rounds the total into y, so y has one
// rounding, after the whole sum, either way.
template <typename T>
struct DownParams {
  T *y;                        // [|A|, N]: written when k_splits == 1
  SplitKStoreParams partials;  // written when k_splits > 1
};

// SwiGLU's backward (dAct): the accumulators hold dOut_t Wd_e^T for pair p of token t.
template <typename T>
struct DActParams {
  T *dg;              // [|A|, N]
  T *du;              // [|A|, N]
  T *act_r;           // R act (act recomputed from g and u; gated_act), for dWd [|A|, N]
  const T *g;         // saved by the forward [|A|, N]
  const T *u;         // saved by the forward [|A|, N]
  const float *gate;  // R of each pair [|A|]
  float *dots;        // dR's 32-column group sums [|A|, ceil(N / 32)]
};

// dX's plain store.
template <typename T>
struct StoreParams {
  T *out;  // [|A|, N]
};

// ---- operands ----

// A: the pairs' rows, K contiguous.
template <typename T>
struct AOperand {
  const T *rows;           // [*, K]: up x, down act, dAct dOut, dX dg
  const T *rows2;          // dX's second K segment: du (null elsewhere)
  const uint32_t *gather;  // up, dAct: pair p reads row gather[p]; null: row p
};

// B: the experts' weights, [E][K][N] as the forward reads them; the backward reads the same
// tensors as [E][N][K] (ModeTraits::kBNMajor).
template <typename T>
struct BOperand {
  const T *w;         // up Wg, down Wd, dAct Wd, dX Wg
  const T *w_paired;  // up: Wu, whose columns share each B tile with Wg's (null elsewhere)
  const T *w2;        // dX's second K segment: Wu (null elsewhere)
};

// ---- the modes ----

template <int kMode>
struct ModeTraits;
// kGathered: A's rows come through AOperand::gather. kBNMajor: B is read as [N][K] per expert.
// kSegments: K segments, each with its own A and B (dX = dg Wg^T + du Wu^T). kPairedColumns: a
// B tile holds the same output columns of w and w_paired, so it yields half as many outputs.
template <>
struct ModeTraits<kUpSwiGLU> {
  static constexpr bool kGathered = true, kBNMajor = false, kPairedColumns = true;
  static constexpr int kSegments = 1;
  template <typename T>
  using Epilogue = SwiGLUParams<T>;
};
template <>
struct ModeTraits<kDown> {
  static constexpr bool kGathered = false, kBNMajor = false, kPairedColumns = false;
  static constexpr int kSegments = 1;
  template <typename T>
  using Epilogue = DownParams<T>;
};
template <>
struct ModeTraits<kDAct> {
  static constexpr bool kGathered = true, kBNMajor = true, kPairedColumns = false;
  static constexpr int kSegments = 1;
  template <typename T>
  using Epilogue = DActParams<T>;
};
template <>
struct ModeTraits<kDX> {
  static constexpr bool kGathered = false, kBNMajor = true, kPairedColumns = false;
  static constexpr int kSegments = 2;
  template <typename T>
  using Epilogue = StoreParams<T>;
};

// Output columns of a tile of `b_cols` B columns.
template <int kMode>
__host__ __device__ constexpr int out_cols(int b_cols) {
  return ModeTraits<kMode>::kPairedColumns ? b_cols / 2 : b_cols;
}

// ---- the tile scheduler ----

// Rows [row0, row0 + rows) of expert `expert`'s pairs: rows <= REMOE_GEMM_TILE_ROWS.
struct RowTile {
  int expert, row0, rows;
};

// Expert i's pairs [expert_offsets[i], expert_offsets[i + 1]) are row tiles
// [tile_offsets[i], tile_offsets[i + 1]) of REMOE_GEMM_TILE_ROWS (remoe_routing_stats), for the
// e experts of a launch; both offsets live on the device, so the host sizes its grids for an
// upper bound.
struct RowTiles {
  const uint32_t *expert_offsets;  // [e + 1]
  const uint32_t *tile_offsets;    // [e + 1]

  // Row tiles of this launch.
  __device__ __forceinline__ int count(int e) const { return (int)tile_offsets[e]; }

  // The expert owning row tile `tile`: the i with tile_offsets[i] <= tile < tile_offsets[i + 1].
  __device__ __forceinline__ int expert_of_tile(int e, int tile) const {
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

  __device__ __forceinline__ RowTile at(int e, int tile) const {
    RowTile t;
    t.expert = expert_of_tile(e, tile);
    t.row0 = (int)expert_offsets[t.expert] +
             (tile - (int)tile_offsets[t.expert]) * REMOE_GEMM_TILE_ROWS;
    t.rows = min(REMOE_GEMM_TILE_ROWS, (int)expert_offsets[t.expert + 1] - t.row0);
    return t;
  }
};

// A row GEMM launch, as both paths' kernels take it (by value), B aside: the mma.sync path
// reads B's pointers in the kernel, the Hopper path makes tensor maps of them on the host.
// The order of the fields, here and in the structs above, is the order of the flat parameter
// structs these replaced, with the scalars last: NVVM loads adjacent scalars as pairs and
// numbers registers by the order of the loads, and ptxas allocates registers differently for
// another order of the same code (the Hopper dAct kernel's spills changed).
template <typename T, int kMode>
struct RowGemmParams {
  AOperand<T> a;
  RowTiles tiles;
  typename ModeTraits<kMode>::template Epilogue<T> epi;
  // [2] the Hopper path's unit counter, zero between launches (hopper_gemm.cu, take_row_unit);
  // the mma.sync path, whose grid is one block per unit, ignores it.
  uint32_t *sched;
  int e, K, N;    // e experts, each with a K x N B
  int col_tiles;  // output column tiles, of the path's width (out_cols): set by its launcher
  // Split-K (the down projection, 1 elsewhere): each output tile's K blocks are cut into
  // k_splits ranges [s kb / k_splits, (s + 1) kb / k_splits), kb = ceil(K / 64) over all
  // segments, the same ranges on both paths; range s is written to plane s (SplitKStoreParams).
  int k_splits;
};

// The first K block of split-K range s (of k_splits over kb blocks; range s ends where s + 1
// begins). Both paths and the small-batch kernel (decode.cu) cut K here, so their planes hold
// the same partial sums and the plane sums the same bits.
__device__ __forceinline__ int split_k_begin(int s, int kb, int k_splits) {
  return (int)((long long)s * kb / k_splits);
}

// ---- pack helpers (pack2 is common.cuh's) ----

// Two values rounded to T, one 4-byte store.
template <typename T>
__device__ __forceinline__ void store2(T *p, float lo, float hi) {
  *reinterpret_cast<uint32_t *>(p) = pack2<T>(lo, hi);
}
// Two T values, one 4-byte load.
template <typename T>
__device__ __forceinline__ void load2(const T *p, float out[2]) {
  const uint32_t raw = *reinterpret_cast<const uint32_t *>(p);
  const T *v = reinterpret_cast<const T *>(&raw);
  out[0] = to_float(v[0]);
  out[1] = to_float(v[1]);
}
// Eight values rounded to T, one 16-byte store.
template <typename T>
__device__ __forceinline__ void store8v(T *p, const float (&v)[8]) {
  uint4 raw;
  raw.x = pack2<T>(v[0], v[1]);
  raw.y = pack2<T>(v[2], v[3]);
  raw.z = pack2<T>(v[4], v[5]);
  raw.w = pack2<T>(v[6], v[7]);
  *reinterpret_cast<uint4 *>(p) = raw;
}

// ---- entry points ----

// The C launchers of one path (PATH: empty for the mma.sync path, hopper_ for the wgmma path)
// for the element type T (SUFFIX: bf16 or f16), over what the path defines before expanding it:
//   template <typename T, int kMode>
//   int launch_row_gemm(RowGemmParams<T, kMode> p, BOperand<T> b, int num_tiles,
//                       cudaStream_t stream);
//   template <typename T>
//   int launch_weight_grad(a, gather, b, store, expert_offsets, a_rows, b_rows, e, m, n, split,
//                          cudaStream_t stream);  (as the launcher takes them)
// clang-format off
#define REMOE_GEMM_ENTRY_POINTS(PATH, SUFFIX, T)                                                   \
  extern "C" int remoe_##PATH##expert_up_swiglu_##SUFFIX REMOE_EXPERT_UP_PARAMS {                  \
    RowGemmParams<T, kUpSwiGLU> p{};                                                               \
    BOperand<T> b{};                                                                               \
    p.tiles = RowTiles{expert_offsets, tile_offsets};                                              \
    p.sched = sched;                                                                               \
    p.e = e;                                                                                       \
    p.a.rows = reinterpret_cast<const T *>(x);                                                     \
    p.a.gather = pair_token;                                                                       \
    b.w = reinterpret_cast<const T *>(wg);                                                         \
    b.w_paired = reinterpret_cast<const T *>(wu);                                                  \
    p.epi.act = reinterpret_cast<T *>(act);                                                        \
    p.epi.g = g != nullptr && u != nullptr ? reinterpret_cast<T *>(g) : nullptr;                   \
    p.epi.u = reinterpret_cast<T *>(u);                                                            \
    p.K = h;                                                                                       \
    p.N = f;                                                                                       \
    return launch_row_gemm<T, kUpSwiGLU>(p, b, num_tiles, (cudaStream_t)stream);                   \
  }                                                                                                \
  extern "C" int remoe_##PATH##expert_down_##SUFFIX REMOE_EXPERT_DOWN_PARAMS {                     \
    /* y is written without a split, the f32 planes with one: refuse the buffer that is missing */ \
    if (y == nullptr || (k_splits > 1 && partials == nullptr)) return (int)cudaErrorInvalidValue; \
    RowGemmParams<T, kDown> p{};                                                                   \
    BOperand<T> b{};                                                                               \
    p.tiles = RowTiles{expert_offsets, tile_offsets};                                              \
    p.sched = sched;                                                                               \
    p.e = e;                                                                                       \
    p.a.rows = reinterpret_cast<const T *>(act);                                                   \
    b.w = reinterpret_cast<const T *>(wd);                                                         \
    p.epi.y = reinterpret_cast<T *>(y);                                                            \
    p.epi.partials.planes = partials;                                                              \
    p.epi.partials.plane_rows = plane_rows;                                                        \
    p.K = f;                                                                                       \
    p.N = h;                                                                                       \
    p.k_splits = k_splits;                                                                         \
    return launch_row_gemm<T, kDown>(p, b, num_tiles, (cudaStream_t)stream);                       \
  }                                                                                                \
  extern "C" int remoe_##PATH##expert_dact_##SUFFIX REMOE_EXPERT_DACT_PARAMS {                     \
    RowGemmParams<T, kDAct> p{};                                                                   \
    BOperand<T> b{};                                                                               \
    p.tiles = RowTiles{expert_offsets, tile_offsets};                                              \
    p.sched = sched;                                                                               \
    p.e = e;                                                                                       \
    p.a.rows = reinterpret_cast<const T *>(dout);                                                  \
    p.a.gather = pair_token;                                                                       \
    b.w = reinterpret_cast<const T *>(wd);                                                         \
    p.epi.g = reinterpret_cast<const T *>(g);                                                      \
    p.epi.u = reinterpret_cast<const T *>(u);                                                      \
    p.epi.gate = pair_gate;                                                                        \
    p.epi.dots = row_dots;                                                                         \
    p.epi.dg = reinterpret_cast<T *>(dg);                                                          \
    p.epi.du = reinterpret_cast<T *>(du);                                                          \
    p.epi.act_r = reinterpret_cast<T *>(act_r);                                                    \
    p.K = h;                                                                                       \
    p.N = f;                                                                                       \
    return launch_row_gemm<T, kDAct>(p, b, num_tiles, (cudaStream_t)stream);                       \
  }                                                                                                \
  extern "C" int remoe_##PATH##expert_dx_##SUFFIX REMOE_EXPERT_DX_PARAMS {                         \
    RowGemmParams<T, kDX> p{};                                                                     \
    BOperand<T> b{};                                                                               \
    p.tiles = RowTiles{expert_offsets, tile_offsets};                                              \
    p.sched = sched;                                                                               \
    p.e = e;                                                                                       \
    p.a.rows = reinterpret_cast<const T *>(dg);                                                    \
    p.a.rows2 = reinterpret_cast<const T *>(du);                                                   \
    b.w = reinterpret_cast<const T *>(wg);                                                         \
    b.w2 = reinterpret_cast<const T *>(wu);                                                        \
    p.epi.out = reinterpret_cast<T *>(dx_pair);                                                    \
    p.K = f;                                                                                       \
    p.N = h;                                                                                       \
    return launch_row_gemm<T, kDX>(p, b, num_tiles, (cudaStream_t)stream);                         \
  }                                                                                                \
  extern "C" int remoe_##PATH##expert_weight_grad_##SUFFIX REMOE_EXPERT_WEIGHT_GRAD_PARAMS {       \
    return launch_weight_grad<T>(a, gather, b, store, expert_offsets, a_rows, b_rows, e, m, n,     \
                                 split, (cudaStream_t)stream);                                     \
  }
// clang-format on
