// Kernel-level check of the two expert-GEMM paths (tools/gemm-paths/build.sh builds it): every
// Hopper GEMM against the mma.sync kernel on the same inputs, bitwise, and both timed.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>
#include "remoe_kernels.h"
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1);} } while (0)
#define LK(x) do { int c_ = (x); if (c_ != 0) { printf("launch error %d (%s) at %s:%d\n", c_, cudaGetErrorString((cudaError_t)c_), __FILE__, __LINE__); exit(1);} } while (0)

static uint64_t rng_state = 0x1234567;
static float urand() { rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL; return ((rng_state >> 40) & 0xFFFFFF) / 16777216.0f; }
static uint16_t bf(float f) { __nv_bfloat16 b = __float2bfloat16(f); return *(uint16_t*)&b; }
static float fb(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

template <typename T> T* dalloc(size_t n) { T* p; CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); return p; }
static uint16_t* dbf(size_t n, float scale) { std::vector<uint16_t> h(n); for (auto& v : h) v = bf((urand() * 2 - 1) * scale); auto p = dalloc<uint16_t>(n); CK(cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice)); return p; }
template <typename T> std::vector<T> host(const T* d, size_t n) { std::vector<T> h(n); CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost)); return h; }
static float val(uint16_t v) { return fb(v); }
static float val(float v) { return v; }

struct Cmp { double tensor_rel; double worst_row_rel; size_t bad; bool bitwise_repeat; };
// max|a-b| / max|b| over the tensor, and the worst per-row ratio (row norms).
template <typename T> Cmp compare(const T* got_d, const T* ref_d, size_t rows, size_t cols) {
  auto g = host(got_d, rows * cols), r = host(ref_d, rows * cols);
  double maxref = 0, maxdiff = 0, worst = 0; size_t bad = 0;
  for (size_t i = 0; i < rows; ++i) {
    double rmax = 0, dmax = 0;
    for (size_t j = 0; j < cols; ++j) {
      double a = val(g[i * cols + j]), b = val(r[i * cols + j]);
      if (!std::isfinite(a)) { ++bad; dmax = INFINITY; continue; }
      rmax = std::max(rmax, fabs(b)); dmax = std::max(dmax, fabs(a - b));
    }
    maxref = std::max(maxref, rmax); maxdiff = std::max(maxdiff, dmax);
    if (rmax > 0) worst = std::max(worst, dmax / rmax); else if (dmax > 0) worst = INFINITY;
  }
  return {maxref > 0 ? maxdiff / maxref : maxdiff, worst, bad, false};
}

struct Timer { cudaEvent_t a, b; Timer() { cudaEventCreate(&a); cudaEventCreate(&b); } };
template <typename F> std::vector<float> time_it(F f, int reps) {
  std::vector<float> ms; Timer t;
  for (int i = 0; i < 3; ++i) f();
  for (int i = 0; i < reps; ++i) { cudaEventRecord(t.a); f(); cudaEventRecord(t.b); cudaEventSynchronize(t.b); float m; cudaEventElapsedTime(&m, t.a, t.b); ms.push_back(m); }
  std::sort(ms.begin(), ms.end()); return ms;
}
static int failures = 0;
static void report(const char* cfg, const char* what, Cmp c, double tol, std::vector<float> th, std::vector<float> tm, double flops, bool rep) {
  bool ok = c.tensor_rel <= tol && c.worst_row_rel <= 4 * tol && c.bad == 0 && rep;
  if (!ok) ++failures;
  double mh = th.empty() ? 0 : th[th.size() / 2], mm = tm.empty() ? 0 : tm[tm.size() / 2];
  printf("%-4s %-6s %s rel %.2e row %.2e nonfinite %zu repeat %s | hopper %.3f ms (%.3f-%.3f) %5.0f TF/s | mma %.3f ms %5.0f TF/s | x%.2f\n",
         cfg, what, ok ? "OK  " : "FAIL", c.tensor_rel, c.worst_row_rel, c.bad, rep ? "bitwise" : "DIFF",
         mh, th.empty() ? 0 : th.front(), th.empty() ? 0 : th.back(), mh > 0 ? flops / mh / 1e9 : 0, mm, mm > 0 ? flops / mm / 1e9 : 0, mh > 0 ? mm / mh : 0);
}
template <typename T> bool same_bits(const T* a, const T* b, size_t n) { auto x = host(a, n), y = host(b, n); return memcmp(x.data(), y.data(), n * sizeof(T)) == 0; }

static const char* only = nullptr;
static void run(const char* name, int T, int H, int F, int E, int mode /*0 uniform k=1, 1 skewed with an empty expert, 2 all to one*/, int reps) {
  if (only && strcmp(only, name) != 0) return;
  // Routing: counts per expert, pair tokens random (tokens may repeat across experts).
  std::vector<uint32_t> counts(E, 0);
  if (mode == 0) for (int e = 0; e < E; ++e) counts[e] = T / E + (e < T % E);
  else if (mode == 1) { double s = 0; for (int e = 0; e < E; ++e) s += 1.0 / (e + 1); int left = T; for (int e = 0; e < E; ++e) { int c = (e == E - 1) ? left : (int)(T * (1.0 / (e + 1)) / s); if (e == 1) c = 0; c = std::min(c, left); counts[e] = c; left -= c; } counts[0] += left; }
  else counts[E / 2] = T;
  std::vector<uint32_t> eo(E + 1, 0), to(E + 1, 0);
  for (int e = 0; e < E; ++e) { eo[e + 1] = eo[e] + counts[e]; to[e + 1] = to[e] + (counts[e] + 127) / 128; }
  const int P = eo[E], tiles = to[E];
  std::vector<uint32_t> ptok(P); for (auto& v : ptok) v = (uint32_t)(urand() * T) % T;
  auto d_eo = dalloc<uint32_t>(E + 1), d_to = dalloc<uint32_t>(E + 1), d_pt = dalloc<uint32_t>(P);
  // The row GEMMs' tile counter: zero once, left zero by every launch (all on stream s).
  auto d_sched = dalloc<uint32_t>(2); CK(cudaMemset(d_sched, 0, 2 * sizeof(uint32_t)));
  CK(cudaMemcpy(d_eo, eo.data(), 4 * (E + 1), cudaMemcpyHostToDevice)); CK(cudaMemcpy(d_to, to.data(), 4 * (E + 1), cudaMemcpyHostToDevice)); CK(cudaMemcpy(d_pt, ptok.data(), 4 * std::max(P,1), cudaMemcpyHostToDevice));
  auto x = dbf((size_t)T * H, 1.f), wg = dbf((size_t)E * H * F, 1.f / sqrtf(H)), wu = dbf((size_t)E * H * F, 1.f / sqrtf(H)), wd = dbf((size_t)E * F * H, 1.f / sqrtf(F));
  size_t PF = (size_t)P * F, PH = (size_t)P * H;
  auto act_r = dalloc<uint16_t>(PF), g_r = dalloc<uint16_t>(PF), u_r = dalloc<uint16_t>(PF), act_h = dalloc<uint16_t>(PF), g_h = dalloc<uint16_t>(PF), u_h = dalloc<uint16_t>(PF), tmp16 = dalloc<uint16_t>(std::max(PF, PH));
  auto y_r = dalloc<uint16_t>(PH), y_h = dalloc<uint16_t>(PH);
  auto tmp32 = dalloc<float>(std::max(PH, (size_t)E * H * F));
  auto dg_r = dalloc<uint16_t>(PF), du_r = dalloc<uint16_t>(PF), dg_h = dalloc<uint16_t>(PF), du_h = dalloc<uint16_t>(PF);
  auto dx_r = dalloc<uint16_t>(PH), dx_h = dalloc<uint16_t>(PH);
  auto w_r = dalloc<float>((size_t)E * H * F), w_h = dalloc<float>((size_t)E * H * F);
  auto poison = [](void* p, size_t bytes) { CK(cudaMemset(p, 0xFF, std::max<size_t>(bytes, 1))); };
  double fl_up = 2.0 * P * H * 2.0 * F, fl_down = 2.0 * P * F * H;
  // The weight gradients' fixed-order split, planned on the device as the layer's backward does.
  uint64_t plan_words, slot_floats, counter_words;
  LK(remoe_weight_grad_split_sizes(E, H, F, &plan_words, &slot_floats, &counter_words));
  auto d_plan = dalloc<uint32_t>(plan_words), d_counters = dalloc<uint32_t>(counter_words);
  auto d_slots = dalloc<float>(slot_floats);
  CK(cudaMemset(d_counters, 0, std::max<uint64_t>(counter_words, 1) * 4));
  LK(remoe_weight_grad_plan(d_eo, E, H, F, -1, d_plan, 0));
  const remoe_wgrad_split_t sp{d_plan, d_slots, d_counters};
  { auto plan = host(d_plan, plan_words); int split = 0; for (int e = 0; e < E; ++e) split += plan[e + 1] - plan[e] > 1;
    printf("%-4s weight-grad plan: %u chunks for %d experts, %d split, %llu slot floats\n", name, plan[E], E, split, (unsigned long long)slot_floats); }
  cudaStream_t s = 0;
  // up
  LK(remoe_expert_up_swiglu_bf16(x, d_pt, wg, wu, act_r, g_r, u_r, d_eo, d_to, d_sched, tiles, E, H, F, s));
  poison(act_h, PF * 2); poison(g_h, PF * 2); poison(u_h, PF * 2);
  LK(remoe_hopper_expert_up_swiglu_bf16(x, d_pt, wg, wu, act_h, g_h, u_h, d_eo, d_to, d_sched, tiles, E, H, F, s));
  CK(cudaDeviceSynchronize());
  Cmp c1 = compare(act_h, act_r, P, F), cg = compare(g_h, g_r, P, F), cu = compare(u_h, u_r, P, F);
  LK(remoe_hopper_expert_up_swiglu_bf16(x, d_pt, wg, wu, tmp16, g_h, u_h, d_eo, d_to, d_sched, tiles, E, H, F, s)); CK(cudaDeviceSynchronize());
  bool rep = same_bits(tmp16, act_h, PF);
  auto th = time_it([&] { remoe_hopper_expert_up_swiglu_bf16(x, d_pt, wg, wu, act_h, g_h, u_h, d_eo, d_to, d_sched, tiles, E, H, F, s); }, reps);
  auto tm = time_it([&] { remoe_expert_up_swiglu_bf16(x, d_pt, wg, wu, act_r, g_r, u_r, d_eo, d_to, d_sched, tiles, E, H, F, s); }, reps);
  report(name, "up", c1, 2e-2, th, tm, fl_up, rep); report(name, "up.g", cg, 1e-2, {}, {}, 0, true); report(name, "up.u", cu, 1e-2, {}, {}, 0, true);
  // up without saving g,u
  poison(act_h, PF * 2);
  LK(remoe_hopper_expert_up_swiglu_bf16(x, d_pt, wg, wu, act_h, nullptr, nullptr, d_eo, d_to, d_sched, tiles, E, H, F, s)); CK(cudaDeviceSynchronize());
  report(name, "up.nos", compare(act_h, act_r, P, F), 2e-2, {}, {}, 0, true);
  // down: one K range, so y (bf16) is written directly and no partial sums are used.
  LK(remoe_expert_down_bf16(act_r, wd, y_r, nullptr, d_eo, d_to, d_sched, tiles, E, H, F, 1, P, s));
  poison(y_h, PH * 2);
  LK(remoe_hopper_expert_down_bf16(act_r, wd, y_h, nullptr, d_eo, d_to, d_sched, tiles, E, H, F, 1, P, s)); CK(cudaDeviceSynchronize());
  Cmp c2 = compare(y_h, y_r, P, H);
  const bool down_same = same_bits(y_h, y_r, PH);
  LK(remoe_hopper_expert_down_bf16(act_r, wd, tmp16, nullptr, d_eo, d_to, d_sched, tiles, E, H, F, 1, P, s)); CK(cudaDeviceSynchronize());
  rep = same_bits(tmp16, y_h, PH) && down_same;
  th = time_it([&] { remoe_hopper_expert_down_bf16(act_r, wd, y_h, nullptr, d_eo, d_to, d_sched, tiles, E, H, F, 1, P, s); }, reps);
  tm = time_it([&] { remoe_expert_down_bf16(act_r, wd, y_r, nullptr, d_eo, d_to, d_sched, tiles, E, H, F, 1, P, s); }, reps);
  report(name, "down", c2, 1e-3, th, tm, fl_down, rep);
  // dact: A is x's rows gathered through the pair tokens (standing in for dOut), gates in (0, 1).
  const int G = (F + 31) / 32;
  std::vector<float> gates_h(std::max(P, 1)); for (auto& v : gates_h) v = urand();
  auto d_gate = dalloc<float>(P); CK(cudaMemcpy(d_gate, gates_h.data(), 4 * std::max(P, 1), cudaMemcpyHostToDevice));
  auto dots_r = dalloc<float>((size_t)P * G), dots_h = dalloc<float>((size_t)P * G);
  LK(remoe_expert_dact_bf16(x, d_pt, d_gate, wd, g_r, u_r, dg_r, du_r, act_r, dots_r, d_eo, d_to, d_sched, tiles, E, H, F, s));
  poison(dg_h, PF * 2); poison(du_h, PF * 2); poison(act_h, PF * 2); poison(dots_h, (size_t)P * G * 4);
  LK(remoe_hopper_expert_dact_bf16(x, d_pt, d_gate, wd, g_r, u_r, dg_h, du_h, act_h, dots_h, d_eo, d_to, d_sched, tiles, E, H, F, s)); CK(cudaDeviceSynchronize());
  Cmp c3 = compare(dg_h, dg_r, P, F), c3u = compare(du_h, du_r, P, F), c3a = compare(act_h, act_r, P, F), c3d = compare(dots_h, dots_r, P, G);
  // The paths must agree bit for bit (the layer's bitwise test relies on it).
  bool same = same_bits(dg_h, dg_r, PF) && same_bits(du_h, du_r, PF) && same_bits(act_h, act_r, PF) && same_bits(dots_h, dots_r, (size_t)P * G);
  LK(remoe_hopper_expert_dact_bf16(x, d_pt, d_gate, wd, g_r, u_r, tmp16, du_h, act_h, dots_h, d_eo, d_to, d_sched, tiles, E, H, F, s)); CK(cudaDeviceSynchronize());
  rep = same_bits(tmp16, dg_h, PF) && same;
  th = time_it([&] { remoe_hopper_expert_dact_bf16(x, d_pt, d_gate, wd, g_r, u_r, dg_h, du_h, act_h, dots_h, d_eo, d_to, d_sched, tiles, E, H, F, s); }, reps);
  tm = time_it([&] { remoe_expert_dact_bf16(x, d_pt, d_gate, wd, g_r, u_r, dg_r, du_r, act_r, dots_r, d_eo, d_to, d_sched, tiles, E, H, F, s); }, reps);
  report(name, "dact", c3, 2e-2, th, tm, fl_down, rep); report(name, "dact.u", c3u, 2e-2, {}, {}, 0, true);
  report(name, "dact.a", c3a, 2e-2, {}, {}, 0, true); report(name, "dact.dR", c3d, 1e-3, {}, {}, 0, true);
  // dAct writes R act, with act recomputed bit for bit as the up projection's: the forward's act
  // into act_r, then bf16(f32(R * act)) on the host (kernels/swiglu.cuh, gated_act), bit for bit.
  LK(remoe_expert_up_swiglu_bf16(x, d_pt, wg, wu, act_r, g_r, u_r, d_eo, d_to, d_sched, tiles, E, H, F, s)); CK(cudaDeviceSynchronize());
  {
    auto a = host(act_r, PF), got = host(act_h, PF);
    size_t bad = 0;
    for (size_t i = 0; i < PF; ++i) if (bf(gates_h[i / F] * fb(a[i])) != got[i]) ++bad;
    if (bad) ++failures;
    printf("%-4s %-6s %s R act = bf16(gate * the up projection's act): %zu of %zu differ\n", name, "dact.Ra", bad ? "FAIL" : "OK  ", bad, PF);
  }
  CK(cudaFree(d_gate)); CK(cudaFree(dots_r)); CK(cudaFree(dots_h));
  // dx
  LK(remoe_expert_dx_bf16(dg_r, du_r, wg, wu, dx_r, d_eo, d_to, d_sched, tiles, E, H, F, s));
  poison(dx_h, PH * 2);
  LK(remoe_hopper_expert_dx_bf16(dg_r, du_r, wg, wu, dx_h, d_eo, d_to, d_sched, tiles, E, H, F, s)); CK(cudaDeviceSynchronize());
  Cmp c4 = compare(dx_h, dx_r, P, H);
  LK(remoe_hopper_expert_dx_bf16(dg_r, du_r, wg, wu, tmp16, d_eo, d_to, d_sched, tiles, E, H, F, s)); CK(cudaDeviceSynchronize());
  rep = same_bits(tmp16, dx_h, PH);
  th = time_it([&] { remoe_hopper_expert_dx_bf16(dg_r, du_r, wg, wu, dx_h, d_eo, d_to, d_sched, tiles, E, H, F, s); }, reps);
  tm = time_it([&] { remoe_expert_dx_bf16(dg_r, du_r, wg, wu, dx_r, d_eo, d_to, d_sched, tiles, E, H, F, s); }, reps);
  report(name, "dx", c4, 2e-2, th, tm, fl_up, rep);
  // weight grads. dWd^T = dOut_g^T (R act) (m=H, n=F; x's rows through the pair tokens stand in
  // for dOut's, act_h is dAct's R act), stored transposed into [E, F, H]; dWg = X_g^T dg (m=H,
  // n=F, gathered). The Hopper path reads the gathered rows in its mainloop at F <= 512 and
  // from a pair-order copy by TMA above (src/gemm.rs, HOPPER_WG_GATHER_MAX_FFN): both here.
  const remoe_wgrad_store_t st_r{w_r, 0, 1}, st_h{w_h, 0, 1}, st_t{tmp32, 0, 1}, st_ta{tmp32, 1, 1};
  LK(remoe_expert_weight_grad_bf16(x, d_pt, act_h, st_r, d_eo, T, P, E, H, F, &sp, s));
  poison(w_h, (size_t)E * F * H * 4);
  LK(remoe_hopper_expert_weight_grad_bf16(x, d_pt, act_h, st_h, d_eo, T, P, E, H, F, &sp, s)); CK(cudaDeviceSynchronize());
  Cmp c5 = compare(w_h, w_r, (size_t)E * F, H);
  LK(remoe_hopper_expert_weight_grad_bf16(x, d_pt, act_h, st_t, d_eo, T, P, E, H, F, &sp, s)); CK(cudaDeviceSynchronize());
  rep = same_bits(tmp32, w_h, (size_t)E * F * H);
  // accumulate: twice = 2x
  LK(remoe_hopper_expert_weight_grad_bf16(x, d_pt, act_h, st_ta, d_eo, T, P, E, H, F, &sp, s)); CK(cudaDeviceSynchronize());
  { auto a = host(tmp32, (size_t)E * F * H), b = host(w_h, (size_t)E * F * H); size_t bad = 0; for (size_t i = 0; i < a.size(); ++i) if (a[i] != 2 * b[i]) ++bad; if (bad) { printf("accumulate mismatch %zu\n", bad); ++failures; } }
  {  // The same on the mma.sync path.
    LK(remoe_expert_weight_grad_bf16(x, d_pt, act_h, st_t, d_eo, T, P, E, H, F, &sp, s));
    LK(remoe_expert_weight_grad_bf16(x, d_pt, act_h, st_ta, d_eo, T, P, E, H, F, &sp, s)); CK(cudaDeviceSynchronize());
    auto a = host(tmp32, (size_t)E * F * H), b = host(w_r, (size_t)E * F * H); size_t bad = 0; for (size_t i = 0; i < a.size(); ++i) if (a[i] != 2 * b[i]) ++bad; if (bad) { printf("mma accumulate mismatch %zu\n", bad); ++failures; }
  }
  th = time_it([&] { remoe_hopper_expert_weight_grad_bf16(x, d_pt, act_h, st_h, d_eo, T, P, E, H, F, &sp, s); }, reps);
  tm = time_it([&] { remoe_expert_weight_grad_bf16(x, d_pt, act_h, st_r, d_eo, T, P, E, H, F, &sp, s); }, reps);
  report(name, "dWd", c5, 1e-3, th, tm, fl_down, rep);
  report(name, "dWd=mma", c5, 1e-3, {}, {}, 0, same_bits(w_h, w_r, (size_t)E * F * H));
  {  // dOut's rows copied into pair order first, then all-TMA blocks (the layer's way at F > 512).
    auto dg_rows = dalloc<uint16_t>(PH);
    poison(w_h, (size_t)E * F * H * 4);
    LK(remoe_gather_rows_16(x, d_pt, dg_rows, d_eo + E, P, H, s));
    LK(remoe_hopper_expert_weight_grad_bf16(dg_rows, nullptr, act_h, st_h, d_eo, P, P, E, H, F, &sp, s)); CK(cudaDeviceSynchronize());
    Cmp c = compare(w_h, w_r, (size_t)E * F, H);
    report(name, "dWdc=mma", c, 1e-3, {}, {}, 0, same_bits(w_h, w_r, (size_t)E * F * H));
    auto tc = time_it([&] { remoe_gather_rows_16(x, d_pt, dg_rows, d_eo + E, P, H, s); remoe_hopper_expert_weight_grad_bf16(dg_rows, nullptr, act_h, st_h, d_eo, P, P, E, H, F, &sp, s); }, reps);
    report(name, "dWd+g", c, 1e-3, tc, tm, fl_down, true);
    // One chunk per expert (no split): its result within f32 rounding, and its time.
    LK(remoe_hopper_expert_weight_grad_bf16(dg_rows, nullptr, act_h, st_t, d_eo, P, P, E, H, F, nullptr, s)); CK(cudaDeviceSynchronize());
    Cmp c1c = compare(tmp32, w_h, (size_t)E * F, H);
    auto tn = time_it([&] { remoe_hopper_expert_weight_grad_bf16(dg_rows, nullptr, act_h, st_t, d_eo, P, P, E, H, F, nullptr, s); }, reps);
    report(name, "dWd-1c", c1c, 1e-4, tn, {}, fl_down, true);
    cudaFree(dg_rows);
  }
  const remoe_wgrad_store_t sp_r{w_r, 0, 0}, sp_h{w_h, 0, 0}, sp_t{tmp32, 0, 0};
  LK(remoe_expert_weight_grad_bf16(x, d_pt, dg_r, sp_r, d_eo, T, P, E, H, F, &sp, s));
  poison(w_h, (size_t)E * F * H * 4);
  LK(remoe_hopper_expert_weight_grad_bf16(x, d_pt, dg_r, sp_h, d_eo, T, P, E, H, F, &sp, s)); CK(cudaDeviceSynchronize());
  Cmp c6 = compare(w_h, w_r, (size_t)E * H, F);
  th = time_it([&] { remoe_hopper_expert_weight_grad_bf16(x, d_pt, dg_r, sp_h, d_eo, T, P, E, H, F, &sp, s); }, reps);
  tm = time_it([&] { remoe_expert_weight_grad_bf16(x, d_pt, dg_r, sp_r, d_eo, T, P, E, H, F, &sp, s); }, reps);
  report(name, "dWg", c6, 1e-3, th, tm, fl_down, true);
  // dWg as the backward's Hopper path runs it: X's rows gathered once, then all-TMA blocks.
  {
    auto xg = dalloc<uint16_t>(PH);
    poison(w_h, (size_t)E * F * H * 4);
    LK(remoe_gather_rows_16(x, d_pt, xg, d_eo + E, P, H, s));
    LK(remoe_hopper_expert_weight_grad_bf16(xg, nullptr, dg_r, sp_h, d_eo, P, P, E, H, F, &sp, s)); CK(cudaDeviceSynchronize());
    Cmp c7 = compare(w_h, w_r, (size_t)E * H, F);
    report(name, "dWg=mma", c7, 1e-3, {}, {}, 0, same_bits(w_h, w_r, (size_t)E * H * F));
    th = time_it([&] { remoe_gather_rows_16(x, d_pt, xg, d_eo + E, P, H, s); remoe_hopper_expert_weight_grad_bf16(xg, nullptr, dg_r, sp_h, d_eo, P, P, E, H, F, &sp, s); }, reps);
    auto tg = time_it([&] { remoe_gather_rows_16(x, d_pt, xg, d_eo + E, P, H, s); }, reps);
    report(name, "dWg+g", c7, 1e-3, th, tm, fl_down, true);
    auto tn = time_it([&] { remoe_gather_rows_16(x, d_pt, xg, d_eo + E, P, H, s); remoe_hopper_expert_weight_grad_bf16(xg, nullptr, dg_r, sp_t, d_eo, P, P, E, H, F, nullptr, s); }, reps);
    report(name, "dWg-1c", compare(tmp32, w_h, (size_t)E * H, F), 1e-4, tn, {}, fl_down, true);
    printf("%-4s gather alone %.4f ms (%.0f GB/s)\n", name, tg[tg.size() / 2], 2.0 * PH * 2 / tg[tg.size() / 2] / 1e6);
    cudaFree(xg);
  }
  CK(cudaDeviceSynchronize());
  for (void* p : {(void*)d_plan, (void*)d_counters, (void*)d_slots}) cudaFree(p);
  for (void* p : {(void*)d_eo, (void*)d_to, (void*)d_sched, (void*)d_pt, (void*)x, (void*)wg, (void*)wu, (void*)wd, (void*)act_r, (void*)g_r, (void*)u_r, (void*)act_h, (void*)g_h, (void*)u_h, (void*)tmp16, (void*)y_r, (void*)y_h, (void*)tmp32, (void*)dg_r, (void*)du_r, (void*)dg_h, (void*)du_h, (void*)dx_r, (void*)dx_h, (void*)w_r, (void*)w_h}) cudaFree(p);
}

// The router forward (logits, gates, per-block statistics) at T 16384, H 768: time against the
// floor of reading X once.
static void router_timing(int E) {
  const int T = 16384, H = 768;
  auto x = dbf((size_t)T * H, 1.f), wr = dbf((size_t)H * E, 1.f / sqrtf(H));
  auto logits = dalloc<float>((size_t)T * E), gates = dalloc<float>((size_t)T * E);
  auto bc = dalloc<uint32_t>((size_t)(T / 64) * E);
  auto bs = dalloc<float>((size_t)(T / 64) * E);
  auto flags = dalloc<uint32_t>(2);
  CK(cudaMemset(flags, 0, 8));
  // 20 launches back to back per timed region: a single ~10 us kernel between two events also
  // times the host's launch latency, which the GPU idles through.
  auto tr = time_it([&] { for (int i = 0; i < 20; ++i) remoe_router_forward_bf16(x, wr, logits, gates, bc, bs, flags, T, H, E, 0); }, 20);
  for (auto& v : tr) v /= 20;
  uint32_t f[2]; CK(cudaMemcpy(f, flags, 8, cudaMemcpyDeviceToHost));
  printf("router E %3d (%s): %.4f ms (%.4f-%.4f), X read floor at 3 TB/s %.4f ms, non-finite flags %u\n", E, E % 8 == 0 ? "mma.sync" : "FMA", tr[tr.size() / 2], tr.front(), tr.back(), (double)T * H * 2 / 3e12 * 1e3, f[0]);
  for (void* p : {(void*)x, (void*)wr, (void*)logits, (void*)gates, (void*)bc, (void*)bs, (void*)flags}) cudaFree(p);
}

int main(int argc, char** argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 20;
  if (argc > 2) only = argv[2];
  cudaDeviceProp p; CK(cudaGetDeviceProperties(&p, 0)); printf("device %s, %d SMs\n", p.name, p.multiProcessorCount);
  run("tiny", 300, 200, 328, 5, 1, 3);       // H, F not multiples of 64; an empty expert; skew
  run("one", 4099, 128, 256, 4, 2, 3);        // one expert takes every token (its reduction in 8 chunks)
  run("prim", 257, 72, 136, 3, 0, 3);         // prime T
  run("A", 16384, 768, 3072, 8, 0, reps);
  run("Ask", 16384, 768, 3072, 8, 1, reps);
  run("Ahot", 16384, 768, 3072, 8, 2, reps);  // one expert takes every pair (not split: see weight_grad_split.cuh)
  run("Shot", 32768, 512, 1024, 16, 2, reps); // small experts (16 tiles), one takes every pair: split 4 ways
  run("Ssk", 32768, 512, 1024, 16, 1, reps);  // the same experts, skewed
  run("B", 131072, 768, 384, 64, 0, reps);     // k=8: 8T pairs
  run("D", 16384, 1536, 6144, 8, 0, reps);
  run("S", 512, 768, 3072, 8, 0, reps);       // config S: 64 pairs per expert, bound by streaming the weights
  run("S8", 8, 768, 3072, 8, 0, reps);        // decode-sized: one pair per expert
  if (!only || strcmp(only, "router") == 0) { router_timing(8); router_timing(16); router_timing(64); router_timing(63); router_timing(128); router_timing(512); }
  printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
