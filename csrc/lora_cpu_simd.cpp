// The thin LoRA passes of the `cpu` backend's Conv1d, hand-vectorised (float32; see lora_cpu_simd.h).
//
// The kernel body (lora_cpu_simd_body.h) is compiled twice, inside `#pragma GCC target` regions:
// for AVX-512 (zmm, masked loads) and for AVX2+FMA (ymm). The extension itself is built without
// -march flags, so it loads on any x86-64; isa() picks the widest variant this CPU runs, once.
// RVCLORA_CPU_SIMD=avx2 or =0 narrows the choice (tests run every variant on an AVX-512 machine);
// with 0, or on other compilers and CPUs, the ops keep the library/BLAS passes of lora_cpu_{conv1d,convt}.cpp.
//
//   forward   u: per (sample, time block), a register tile of RBM ranks × NV vectors of time,
//             accumulated over (channel, tap) with each tap a shifted (masked at the edges) load of x
//   backward  per (sample, time block): g_u = s·Bᵀg into an L1 scratch (the same microkernel, K = 1),
//             then grad_A += g_u ⊗ x_tap and grad_B += g ⊗ u as register-tiled reductions over the
//             block while its g, u, g_u and x are in cache; partial sums per thread, reduced once.
//             The reduction tile is RRB rows of g_u (or u) × QB columns of x taps (or g rows): 4 × 4 for
//             AVX-512 and 4 × 3 for AVX2, chosen by measurement on an AMD EPYC (Zen 5). 4 rows keep the
//             block of g_u in L1 next to the columns; the earlier 8 × 2 ran the pass at 0.6-0.7× the
//             speed, and 8 × 3, 4 × 6, 3 × 5, 2 × 8 measured slower too (notes in docs/maths.md).
//   grad_x    where the weight is larger than x, the input gradient keeps W unmerged and adds
//             conv1dᵀ(g_u, A): the forward's microkernel with g_u as the input and A's taps reversed.
#include "lora_cpu_simd.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RVC_SIMD_BUILT 1
#include <immintrin.h>
#else
#define RVC_SIMD_BUILT 0
#endif

namespace rvclora_cpu_simd {

#if RVC_SIMD_BUILT

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
namespace k512 {
struct V {
  using v = __m512;
  static constexpr int W = 16;
  static inline v zero() { return _mm512_setzero_ps(); }
  static inline v load(const float* p) { return _mm512_loadu_ps(p); }
  static inline v load_win(const float* row, int64_t pos, int64_t lim) {
    const int64_t lo = pos < 0 ? -pos : 0, hi = std::min<int64_t>(W, lim - pos);
    if (hi <= lo) return zero();
    const __mmask16 m = static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    return _mm512_maskz_loadu_ps(m, row + pos);  // masked-off lanes are not read
  }
  static inline void store(float* p, v a) { _mm512_storeu_ps(p, a); }
  static inline void store_n(float* p, v a, int n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), a); }
  static inline v set1(float a) { return _mm512_set1_ps(a); }
  static inline v fma(v a, v b, v c) { return _mm512_fmadd_ps(a, b, c); }
  static inline v add(v a, v b) { return _mm512_add_ps(a, b); }
  static inline float hsum(v a) { return _mm512_reduce_add_ps(a); }
};
constexpr int RBM = 8, NV = 3, RRB = 4, QB = 4;
#include "lora_cpu_simd_body.h"
}  // namespace k512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace k256 {
struct V {
  using v = __m256;
  static constexpr int W = 8;
  static inline __m256i lanes(int64_t lo, int64_t hi) {  // all-ones in lanes [lo, hi)
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_si256(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(static_cast<int>(lo) - 1)),
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), idx));
  }
  static inline v zero() { return _mm256_setzero_ps(); }
  static inline v load(const float* p) { return _mm256_loadu_ps(p); }
  static inline v load_win(const float* row, int64_t pos, int64_t lim) {
    const int64_t lo = pos < 0 ? -pos : 0, hi = std::min<int64_t>(W, lim - pos);
    if (hi <= lo) return zero();
    return _mm256_maskload_ps(row + pos, lanes(lo, hi));  // masked-off lanes are not read
  }
  static inline void store(float* p, v a) { _mm256_storeu_ps(p, a); }
  static inline void store_n(float* p, v a, int n) { _mm256_maskstore_ps(p, lanes(0, n), a); }
  static inline v set1(float a) { return _mm256_set1_ps(a); }
  static inline v fma(v a, v b, v c) { return _mm256_fmadd_ps(a, b, c); }
  static inline v add(v a, v b) { return _mm256_add_ps(a, b); }
  static inline float hsum(v a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};
constexpr int RBM = 4, NV = 2, RRB = 4, QB = 3;
#include "lora_cpu_simd_body.h"
}  // namespace k256
#pragma GCC pop_options

int isa() {
  static const int level = [] {
    int best = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      best = 2;
    const char* env = std::getenv("RVCLORA_CPU_SIMD");
    if (env != nullptr && *env != '\0') {
      const std::string e(env);
      const int cap = e == "0" || e == "off" ? 0 : e == "avx2" ? 1 : 2;
      best = std::min(best, cap);
    }
    return best;
  }();
  return level;
}

#else

int isa() { return 0; }

#endif

const char* isa_name() {
  switch (isa()) {
    case 2:
      return "AVX-512";
    case 1:
      return "AVX2+FMA";
    default:
      return "none";
  }
}

namespace {

constexpr int64_t kLanes = 16;  // the widest vector: scratch rows are padded to it

// Time-block length: a multiple of 48 (both ISAs' forward step), near `target`, with enough blocks
// (over the batch) for `per_thread` per thread where the sequence allows it, and a block count that
// splits evenly over the threads: at::parallel_for hands each thread one contiguous run of blocks,
// so 3 blocks on 2 threads (T = 3200 at 1536) left one thread with a 128-sample remainder.
int64_t block_len(int64_t Tout, int64_t N, int64_t target, int64_t per_thread = 2) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nb = std::max<int64_t>(1, (Tout + target - 1) / target);       // blocks per sample
  nb = std::max(nb, (per_thread * threads + N - 1) / N);                 // enough for every thread
  while ((N * nb) % threads != 0 && nb < Tout) ++nb;                     // an even split
  const int64_t len = ((Tout + nb - 1) / nb + 47) / 48 * 48;
  return std::max<int64_t>(48, len);
}

// A float buffer left uninitialised. std::vector<float>(n) first writes n zeros: a serial memset, up to megabytes
// for the phase-split g of an upsampler, in front of every parallel pass while the other threads wait. Each user
// below writes every element it reads.
class Scratch {
 public:
  explicit Scratch(size_t n) : p_(n ? new float[n] : nullptr) {}
  float* data() { return p_.get(); }
  const float* data() const { return p_.get(); }
  float& operator[](size_t i) { return p_[i]; }

 private:
  std::unique_ptr<float[]> p_;
};

// fn(n, t0, t1) for every (sample, time block) of a T-long sequence, blocks of about 768 samples, parallel
// over the blocks: the drivers of the forward-style passes (u, the direct plan, the input gradients).
template <class F>
void each_time_block(int64_t T, int64_t N, const F& fn) {
  const int64_t L = block_len(T, N, 768);
  const int64_t nblk = (T + L - 1) / L;
  at::parallel_for(0, N * nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = (b % nblk) * L;
      fn(b / nblk, t0, std::min(t0 + L, T));
    }
  });
}

// src (rows, cols·K) transposed with its taps reversed: dst (cols, rows·K), dst[c, j·K + k'] = src[j, c·K + K − 1 − k']
// (the weight of an input gradient run as a forward pass: A for g_u, the merged weight for g).
Scratch transposed_reversed_taps(const float* src, int64_t rows, int64_t cols, int64_t K) {
  Scratch dst(static_cast<size_t>(rows * cols * K));
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t k = 0; k < K; ++k) dst[(c * rows + j) * K + k] = src[(j * cols + c) * K + K - 1 - k];
  return dst;
}

// out[i] = scale · Σ over the threads' partial sums (part holds `threads` runs of `size`).
void reduce_threads(const std::vector<float>& part, int64_t size, int64_t threads, float* out, float scale) {
  for (int64_t i = 0; i < size; ++i) {
    float acc = 0.f;
    for (int64_t t = 0; t < threads; ++t) acc += part[static_cast<size_t>(t * size + i)];
    out[i] = scale * acc;
  }
}

}  // namespace

void conv1d_u(const float* x, const float* A, float* u, const Dims& d) {
#if RVC_SIMD_BUILT
  const int level = isa();
  TORCH_CHECK(level > 0, "rvclora cpu: the SIMD kernels are not available on this CPU");
  each_time_block(d.Tout, d.N, [&](int64_t n, int64_t t0, int64_t t1) {
    if (level == 2)
      k512::u_block(x, A, u, d, n, t0, t1);
    else
      k256::u_block(x, A, u, d, n, t0, t1);
  });
#else
  (void)x, (void)A, (void)u, (void)d;
  TORCH_CHECK(false, "rvclora cpu: the SIMD kernels were not compiled in");
#endif
}

void conv1d_bwd(const float* g, const float* x, const float* u, const float* B, float s, float* gA, float* gB,
                float* gu, const Dims& d) {
#if RVC_SIMD_BUILT
  const int level = isa();
  TORCH_CHECK(level > 0, "rvclora cpu: the SIMD kernels are not available on this CPU");
  // one block per thread where the sequence is short: each block ends in a horizontal sum per
  // (rank, column) of the reductions, a cost that does not shrink with the block
  const int64_t L = block_len(d.Tout, d.N, 1536, 1);
  const int64_t nblk = (d.Tout + L - 1) / L;
  const int64_t ldl = (L + kLanes - 1) / kLanes * kLanes;
  const int64_t sizeA = gA ? d.r * d.Cin * d.K : 0, sizeB = gB ? d.Cout * d.r : 0;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<float> partA(static_cast<size_t>(sizeA * threads), 0.f), partB(static_cast<size_t>(sizeB * threads), 0.f);
  // s·Bᵀ (r, Cout) for g_u; the columns of the two reductions: (channel, tap) of x, and the rows of g
  Scratch Bs(static_cast<size_t>(d.r * d.Cout));
  for (int64_t o = 0; o < d.Cout; ++o)
    for (int64_t j = 0; j < d.r; ++j) Bs[j * d.Cout + o] = s * B[o * d.r + j];
  std::vector<int64_t> a_off(d.Cin * d.K), a_shift(d.Cin * d.K), a_out(d.Cin * d.K);
  for (int64_t c = 0; c < d.Cin; ++c)
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t q = c * d.K + k;
      a_off[q] = c * d.T, a_shift[q] = k * d.dil - d.padl, a_out[q] = q;
    }
  std::vector<int64_t> b_off(d.Cout), b_shift(d.Cout, 0), b_out(d.Cout);
  for (int64_t o = 0; o < d.Cout; ++o) b_off[o] = o * d.Tout, b_out[o] = o * d.r;
  at::parallel_for(0, d.N * nblk, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid >= 0 && tid < threads, "rvclora cpu: thread id ", tid, " outside the pool of ", threads);
    float* pA = gA ? partA.data() + tid * sizeA : nullptr;
    float* pB = gB ? partB.data() + tid * sizeB : nullptr;
    Scratch gu_loc(static_cast<size_t>(d.r * ldl)), u_loc(static_cast<size_t>(gB ? d.r * ldl : 0));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / nblk, t0 = (b % nblk) * L, t1 = std::min(t0 + L, d.Tout);
      if (level == 2)
        k512::bwd_block(g, x, u, Bs.data(), d, n, t0, t1, gu_loc.data(), u_loc.data(), ldl, pA, pB, gu, a_off.data(),
                        a_shift.data(), a_out.data(), b_off.data(), b_shift.data(), b_out.data());
      else
        k256::bwd_block(g, x, u, Bs.data(), d, n, t0, t1, gu_loc.data(), u_loc.data(), ldl, pA, pB, gu, a_off.data(),
                        a_shift.data(), a_out.data(), b_off.data(), b_shift.data(), b_out.data());
    }
  });
  reduce_threads(partA, sizeA, threads, gA, 1.f);
  reduce_threads(partB, sizeB, threads, gB, s);
#else
  (void)g, (void)x, (void)u, (void)B, (void)s, (void)gA, (void)gB, (void)gu, (void)d;
  TORCH_CHECK(false, "rvclora cpu: the SIMD kernels were not compiled in");
#endif
}

void conv1d_grad_x(const float* gu, const float* A, float* gx, const Dims& d) {
#if RVC_SIMD_BUILT
  const int level = isa();
  TORCH_CHECK(level > 0, "rvclora cpu: the SIMD kernels are not available on this CPU");
  const Scratch Ag = transposed_reversed_taps(A, d.r, d.Cin, d.K);  // (Cin, r·K)
  each_time_block(d.T, d.N, [&](int64_t n, int64_t t0, int64_t t1) {
    if (level == 2)
      k512::gx_block(gu, Ag.data(), gx, d, n, t0, t1);
    else
      k256::gx_block(gu, Ag.data(), gx, d, n, t0, t1);
  });
#else
  (void)gu, (void)A, (void)gx, (void)d;
  TORCH_CHECK(false, "rvclora cpu: the SIMD kernels were not compiled in");
#endif
}

void conv1d_direct_fwd(const float* x, const float* Wm, const float* bias, const float* A, float* y, float* u,
                       const Dims& d) {
#if RVC_SIMD_BUILT
  const int level = isa();
  TORCH_CHECK(level > 0, "rvclora cpu: the SIMD kernels are not available on this CPU");
  each_time_block(d.Tout, d.N, [&](int64_t n, int64_t t0, int64_t t1) {
    if (level == 2)
      k512::direct_fwd_block(x, Wm, bias, A, y, u, d, n, t0, t1);
    else
      k256::direct_fwd_block(x, Wm, bias, A, y, u, d, n, t0, t1);
  });
#else
  (void)x, (void)Wm, (void)bias, (void)A, (void)y, (void)u, (void)d;
  TORCH_CHECK(false, "rvclora cpu: the SIMD kernels were not compiled in");
#endif
}

void conv1d_direct_gx(const float* g, const float* Wm, float* gx, const Dims& d) {
#if RVC_SIMD_BUILT
  const int level = isa();
  TORCH_CHECK(level > 0, "rvclora cpu: the SIMD kernels are not available on this CPU");
  const Scratch Wt = transposed_reversed_taps(Wm, d.Cout, d.Cin, d.K);  // (Cin, Cout·K)
  each_time_block(d.T, d.N, [&](int64_t n, int64_t t0, int64_t t1) {
    if (level == 2)
      k512::direct_gx_block(g, Wt.data(), gx, d, n, t0, t1);
    else
      k256::direct_gx_block(g, Wt.data(), gx, d, n, t0, t1);
  });
#else
  (void)g, (void)Wm, (void)gx, (void)d;
  TORCH_CHECK(false, "rvclora cpu: the SIMD kernels were not compiled in");
#endif
}

void convt_bwd(const float* g, const float* x, const float* u, const float* B, float s, float* gA, float* gB,
               float* gu, const TDims& d) {
#if RVC_SIMD_BUILT
  const int level = isa();
  TORCH_CHECK(level > 0, "rvclora cpu: the SIMD kernels are not available on this CPU");
  const int64_t S = d.stride, Tp = (d.L + S - 1) / S, ncol = d.Cout * d.K;
  // g split by phase: gp[n][o][p][t'] = g[n][o][t'·S + p] (0 past L); with stride 1 it is g itself
  Scratch gp_buf(S > 1 ? static_cast<size_t>(d.N * d.Cout * S * Tp) : 0);
  if (S > 1) {
    at::parallel_for(0, d.N * d.Cout, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const float* src = g + row * d.L;
        float* dst = gp_buf.data() + row * S * Tp;
        for (int64_t p = 0; p < S; ++p)
          for (int64_t t = 0; t < Tp; ++t) {
            const int64_t l = t * S + p;
            dst[p * Tp + t] = l < d.L ? src[l] : 0.f;
          }
      }
    });
  }
  const float* gp = S > 1 ? gp_buf.data() : g;
  const int64_t per_n = d.Cout * S * Tp;
  // column (o, k): g[o, t·S + v] with v = k·dil − pad = p + S·sh, 0 ≤ p < S  →  row (o, p), shift sh
  std::vector<int64_t> coff(ncol), cshift(ncol);
  int64_t lo = 0, hi = 0;
  for (int64_t o = 0; o < d.Cout; ++o)
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t v = k * d.dil - d.pad;
      const int64_t sh = v >= 0 ? v / S : -((-v + S - 1) / S), p = v - sh * S;
      coff[o * d.K + k] = (o * S + p) * Tp, cshift[o * d.K + k] = sh;
      if (o == 0 && k == 0) lo = hi = sh;
      lo = std::min(lo, sh), hi = std::max(hi, sh);
    }
  std::vector<int64_t> x_off(d.Cin), zero_shift(std::max(d.Cin, ncol), 0), a_out(d.Cin), b_out(ncol);
  for (int64_t c = 0; c < d.Cin; ++c) x_off[c] = c * d.T, a_out[c] = c;
  for (int64_t q = 0; q < ncol; ++q) b_out[q] = q;
  Scratch Bs(static_cast<size_t>(d.r * ncol));
  for (int64_t i = 0; i < d.r * ncol; ++i) Bs[i] = s * B[i];
  const int64_t L = block_len(d.T, d.N, 1536, 1);
  const int64_t nblk = (d.T + L - 1) / L;
  const int64_t ldl = (L + kLanes - 1) / kLanes * kLanes;
  const int64_t sizeA = gA ? d.r * d.Cin : 0, sizeB = gB ? d.r * ncol : 0;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<float> partA(static_cast<size_t>(sizeA * threads), 0.f), partB(static_cast<size_t>(sizeB * threads), 0.f);
  at::parallel_for(0, d.N * nblk, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid >= 0 && tid < threads, "rvclora cpu: thread id ", tid, " outside the pool of ", threads);
    float* pA = gA ? partA.data() + tid * sizeA : nullptr;
    float* pB = gB ? partB.data() + tid * sizeB : nullptr;
    Scratch gu_loc(static_cast<size_t>(d.r * ldl)), u_loc(static_cast<size_t>(gB ? d.r * ldl : 0));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / nblk, t0 = (b % nblk) * L, t1 = std::min(t0 + L, d.T);
      const float* gpn = gp + n * per_n;
      if (level == 2)
        k512::convt_bwd_block(gpn, Tp, coff.data(), cshift.data(), lo, hi, x, u, Bs.data(), d, n, t0, t1,
                              gu_loc.data(), u_loc.data(), ldl, pA, pB, gu, x_off.data(), zero_shift.data(),
                              a_out.data(), b_out.data());
      else
        k256::convt_bwd_block(gpn, Tp, coff.data(), cshift.data(), lo, hi, x, u, Bs.data(), d, n, t0, t1,
                              gu_loc.data(), u_loc.data(), ldl, pA, pB, gu, x_off.data(), zero_shift.data(),
                              a_out.data(), b_out.data());
    }
  });
  reduce_threads(partA, sizeA, threads, gA, 1.f);
  reduce_threads(partB, sizeB, threads, gB, s);
#else
  (void)g, (void)x, (void)u, (void)B, (void)s, (void)gA, (void)gB, (void)gu, (void)d;
  TORCH_CHECK(false, "rvclora cpu: the SIMD kernels were not compiled in");
#endif
}

}  // namespace rvclora_cpu_simd
