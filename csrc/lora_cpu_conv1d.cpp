// The `cpu` backend's Conv1d: conv1d_fwd and conv1d_bwd (declared in lora_cpu_ops.h), the
// geometry, the BLAS time-block passes and the SIMD dispatch (csrc/lora_cpu_simd.cpp).
#include "lora_cpu_ops.h"
#include "lora_cpu_simd.h"

#if defined(__has_include)
#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2 size (u_first_bytes)
#endif
#endif

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>

namespace rvclora_cpu {
namespace {

// --------------------------------------------------------------------------- Conv1d geometry

enum class PadMode { kZeros, kReflect, kReplicate, kCircular };

PadMode pad_mode_of(c10::string_view m) {
  if (m == "zeros") return PadMode::kZeros;
  if (m == "reflect") return PadMode::kReflect;
  if (m == "replicate") return PadMode::kReplicate;
  if (m == "circular") return PadMode::kCircular;
  TORCH_CHECK(false, "rvclora cpu: padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got '",
              std::string(m), "'");
}

struct C1Geom {
  int64_t N, Cin, T, Cout, K, r, stride, padl, padr, dil, G, Tout, cin_g, cout_g, rg;
  PadMode mode;
  // Index into x of padded position p, or -1 for a zero.
  RVC_INLINE int64_t src(int64_t p) const {
    int64_t q = p - padl;
    if (q >= 0 && q < T) return q;
    switch (mode) {
      case PadMode::kZeros:
        return -1;
      case PadMode::kReflect:
        return q < 0 ? -q : 2 * (T - 1) - q;
      case PadMode::kReplicate:
        return q < 0 ? 0 : T - 1;
      case PadMode::kCircular:
        return ((q % T) + T) % T;
    }
    return -1;
  }
};

C1Geom conv1d_geom(const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B, int64_t stride,
                   at::IntArrayRef padding, int64_t dilation, int64_t groups, c10::string_view padding_mode) {
  TORCH_CHECK(x.dim() == 3, "rvclora cpu: conv1d x must be (N, C_in, T), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, "rvclora cpu: conv1d weight must be (C_out, C_in/groups, K), got ", weight.sizes());
  TORCH_CHECK(padding.size() == 2, "rvclora cpu: padding must be (left, right), got ", padding);
  C1Geom g{};
  g.N = x.size(0), g.Cin = x.size(1), g.T = x.size(2);
  g.Cout = weight.size(0), g.K = weight.size(2), g.r = A.size(0);
  g.stride = stride, g.padl = padding[0], g.padr = padding[1], g.dil = dilation, g.G = groups;
  g.mode = pad_mode_of(padding_mode);
  TORCH_CHECK(stride >= 1 && dilation >= 1 && groups >= 1 && g.padl >= 0 && g.padr >= 0,
              "rvclora cpu: need stride, dilation, groups >= 1 and padding >= 0");
  TORCH_CHECK(g.Cin % groups == 0 && g.Cout % groups == 0 && g.r % groups == 0,
              "rvclora cpu: C_in, C_out and r must be divisible by groups=", groups);
  g.cin_g = g.Cin / groups, g.cout_g = g.Cout / groups, g.rg = g.r / groups;
  TORCH_CHECK(weight.size(1) == g.cin_g, "rvclora cpu: weight.shape[1] must be C_in/groups = ", g.cin_g);
  TORCH_CHECK(A.size(1) == g.cin_g * g.K, "rvclora cpu: lora_A must be (r, C_in/groups*K) = (", g.r, ", ",
              g.cin_g * g.K, "), got ", A.sizes());
  TORCH_CHECK(B.size(0) == g.Cout && B.size(1) == g.rg, "rvclora cpu: lora_B must be (C_out, r/groups) = (", g.Cout,
              ", ", g.rg, "), got ", B.sizes());
  if (g.mode != PadMode::kZeros && (g.padl > 0 || g.padr > 0)) {
    TORCH_CHECK(g.mode != PadMode::kReflect || (g.padl < g.T && g.padr < g.T),
                "rvclora cpu: reflect padding must be smaller than the input length");
    TORCH_CHECK(g.mode != PadMode::kCircular || (g.padl <= g.T && g.padr <= g.T),
                "rvclora cpu: circular padding must not exceed the input length");
  }
  const int64_t span = g.T + g.padl + g.padr - dilation * (g.K - 1) - 1;
  TORCH_CHECK(span >= 0, "rvclora cpu: input of length ", g.T, " is shorter than the kernel's reach");
  g.Tout = span / stride + 1;
  return g;
}

// (padded input, padding the convolution itself applies): nn.Conv1d's own padding when it can.
std::pair<Tensor, int64_t> conv1d_input(const Tensor& x, const C1Geom& g) {
  if (g.padl == 0 && g.padr == 0) return {x, 0};
  if (g.mode == PadMode::kZeros && g.padl == g.padr) return {x, g.padl};
  switch (g.mode) {
    case PadMode::kZeros:
      return {at::constant_pad_nd(x, {g.padl, g.padr}, 0), 0};
    case PadMode::kReflect:
      return {at::reflection_pad1d(x, {g.padl, g.padr}), 0};
    case PadMode::kReplicate:
      return {at::replication_pad1d(x, {g.padl, g.padr}), 0};
    case PadMode::kCircular:
      return {at::_pad_circular(x, {g.padl, g.padr}), 0};
  }
  return {x, 0};
}

// The adjoint of conv1d_input applied to the gradient of the padded input.
Tensor conv1d_unpad(const Tensor& gxp, const Tensor& x, const C1Geom& g, int64_t conv_pad) {
  if (conv_pad > 0 || (g.padl == 0 && g.padr == 0)) return gxp;
  switch (g.mode) {
    case PadMode::kZeros:
      return gxp.narrow(2, g.padl, g.T);
    case PadMode::kReflect:
      return at::reflection_pad1d_backward(gxp, x, {g.padl, g.padr});
    case PadMode::kReplicate:
      return at::replication_pad1d_backward(gxp, x, {g.padl, g.padr});
    case PadMode::kCircular: {
      Tensor gx = gxp.narrow(2, g.padl, g.T).clone();
      if (g.padl > 0) gx.narrow(2, g.T - g.padl, g.padl).add_(gxp.narrow(2, 0, g.padl));
      if (g.padr > 0) gx.narrow(2, 0, g.padr).add_(gxp.narrow(2, g.padl + g.T, g.padr));
      return gx;
    }
  }
  return gxp;
}

// --------------------------------------------------------------------------- Conv1d through BLAS
// The thin LoRA passes, each a handful of BLAS calls per time block: per tap j the LoRA input
// is x shifted by j·dilation (a view with x's row stride when stride is 1, zero padding and no
// dropout; gathered into a block buffer otherwise), and A is taken tap-major, At (K, r, C_in/g).
//   forward   u_blk = Σ_j At_j · x_j                          (+ y_blk += s·B·u_blk unmerged)
//   backward  g_u_blk = s·Bᵀ·g_blk;  grad_B += g_blk·u_blkᵀ;  grad_A_j += g_u_blk·x_jᵀ
//             grad_x += Σ_j At_jᵀ·g_u, shifted (unmerged input gradient, a second pass)

template <class T>
struct TapView {
  const T* p;  // column lo of the tap's rows
  int64_t ld, lo, hi;
};

// Stride 1 and nothing to pad but zeros: a tap is a view of x (with dropout it is still gathered).
bool conv1d_views(const C1Geom& g) { return g.stride == 1 && (g.mode == PadMode::kZeros || (g.padl == 0 && g.padr == 0)); }

template <class T>
TapView<T> conv1d_tap(const T* x, const C1Geom& g, const Dropout<T>& d, bool view, int64_t n, int64_t grp,
                      int64_t tap, int64_t t0, int64_t t1, int64_t ldb, T* buf) {
  const int64_t row0 = n * g.Cin + grp * g.cin_g;
  if (view) {
    const int64_t off = tap * g.dil - g.padl;
    const int64_t lo = std::max(t0, -off), hi = std::min(t1, g.T - off);
    if (lo >= hi) return {x, g.T, 0, 0};
    return {x + row0 * g.T + lo + off, g.T, lo, hi};
  }
  for (int64_t i = 0; i < g.cin_g; ++i) {
    const int64_t base = (row0 + i) * g.T;
    const T* xrow = x + base;
    T* b = buf + i * ldb;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = g.src(t * g.stride + tap * g.dil);
      b[t - t0] = s < 0 ? T(0) : (d.on ? xrow[s] * d.at(base + s) : xrow[s]);
    }
  }
  return {buf, ldb, t0, t1};
}

template <class T>
struct C1FwdB {
  const T* x;
  const T* At;  // (K, r, cin_g)
  T* u;         // (N, r, Tout)
  T* y;         // (N, Cout, Tout) += s·B·u when not merged, else null
  const T* B;   // (Cout, rg)
  T s;
  C1Geom g;
  Dropout<T> d;
  bool view;
  int64_t tb, nblk;
};

template <class T>
void conv1d_fwd_blas(const C1FwdB<T>& p) {
  const C1Geom& g = p.g;
  at::parallel_for(0, g.N * g.G * p.nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(p.view ? 0 : static_cast<size_t>(g.cin_g * p.tb));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
      const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.Tout), len = t1 - t0;
      T* ub = p.u + (n * g.r + grp * g.rg) * g.Tout + t0;
      for (int64_t j = 0; j < g.rg; ++j) std::fill(ub + j * g.Tout, ub + j * g.Tout + len, T(0));
      for (int64_t tap = 0; tap < g.K; ++tap) {
        const TapView<T> v = conv1d_tap(p.x, g, p.d, p.view, n, grp, tap, t0, t1, p.tb, buf.data());
        if (v.lo >= v.hi) continue;
        gemm_rm<T>(false, false, g.rg, v.hi - v.lo, g.cin_g, T(1), p.At + (tap * g.r + grp * g.rg) * g.cin_g, g.cin_g,
                   v.p, v.ld, T(1), ub + (v.lo - t0), g.Tout);
      }
      if (p.y)
        gemm_rm<T>(false, false, g.cout_g, len, g.rg, p.s, p.B + grp * g.cout_g * g.rg, g.rg, ub, g.Tout, T(1),
                   p.y + (n * g.Cout + grp * g.cout_g) * g.Tout + t0, g.Tout);
    }
  });
}

template <class T>
struct C1BwdB {
  const T* gy;  // (N, Cout, Tout)
  const T* x;   // (N, Cin, T)
  const T* u;   // (N, r, Tout)
  const T* At;  // (K, r, cin_g)
  const T* B;   // (Cout, rg)
  T* gu;        // (N, r, Tout) when the unmerged input gradient needs all of g_u, else null
  Partials<T>* pA;  // (K, r, cin_g)
  Partials<T>* pB;  // (Cout, rg), without the factor s
  T s;
  C1Geom g;
  Dropout<T> d;
  bool view;
  int64_t tb, nblk;
};

template <class T>
void conv1d_bwd_blas(const C1BwdB<T>& p) {
  const C1Geom& g = p.g;
  at::parallel_for(0, g.N * g.G * p.nblk, 1, [&](int64_t b0, int64_t b1) {
    T* gA = p.pA->mine();
    T* gB = p.pB->mine();
    std::vector<T> buf(p.view || !gA ? 0 : static_cast<size_t>(g.cin_g * p.tb));
    std::vector<T> local(p.gu ? 0 : static_cast<size_t>(g.rg * p.tb));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
      const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.Tout), len = t1 - t0;
      const T* gblk = p.gy + (n * g.Cout + grp * g.cout_g) * g.Tout + t0;
      T* gub = p.gu ? p.gu + (n * g.r + grp * g.rg) * g.Tout + t0 : local.data();
      const int64_t ldgu = p.gu ? g.Tout : p.tb;
      if (gA || p.gu)
        gemm_rm<T>(true, false, g.rg, len, g.cout_g, p.s, p.B + grp * g.cout_g * g.rg, g.rg, gblk, g.Tout, T(0), gub,
                   ldgu);
      if (gB)
        gemm_rm<T>(false, true, g.cout_g, g.rg, len, T(1), gblk, g.Tout, p.u + (n * g.r + grp * g.rg) * g.Tout + t0,
                   g.Tout, T(1), gB + grp * g.cout_g * g.rg, g.rg);
      if (!gA) continue;
      for (int64_t tap = 0; tap < g.K; ++tap) {
        const TapView<T> v = conv1d_tap(p.x, g, p.d, p.view, n, grp, tap, t0, t1, p.tb, buf.data());
        if (v.lo >= v.hi) continue;
        gemm_rm<T>(false, true, g.rg, g.cin_g, v.hi - v.lo, T(1), gub + (v.lo - t0), ldgu, v.p, v.ld, T(1),
                   gA + (tap * g.r + grp * g.rg) * g.cin_g, g.cin_g);
      }
    }
  });
}

// grad_x (N, Cin, T) += D(Σ_j At_jᵀ·g_u shifted by the tap): the unmerged input gradient's LoRA
// term, parallel over blocks of input time (needs conv1d_views' geometry; g_u already has s).
template <class T>
void conv1d_grad_x_blas(T* gx, const T* gu, const T* At, const C1Geom& g, const Dropout<T>& d) {
  const int64_t tb = blas_block_len(g.T, g.N * g.G, g.cin_g);
  const int64_t nblk = (g.T + tb - 1) / tb;
  at::parallel_for(0, g.N * g.G * nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> acc(d.on ? static_cast<size_t>(g.cin_g * tb) : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t blk = b % nblk, grp = (b / nblk) % g.G, n = b / (nblk * g.G);
      const int64_t c0 = blk * tb, c1 = std::min(c0 + tb, g.T), len = c1 - c0;
      const int64_t row0 = n * g.Cin + grp * g.cin_g;
      T* dst = d.on ? acc.data() : gx + row0 * g.T + c0;
      const int64_t ld = d.on ? tb : g.T;
      if (d.on) std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t tap = 0; tap < g.K; ++tap) {
        const int64_t off = tap * g.dil - g.padl;
        const int64_t tlo = std::max<int64_t>(c0 - off, 0), thi = std::min<int64_t>(c1 - off, g.Tout);
        if (tlo >= thi) continue;
        gemm_rm<T>(true, false, g.cin_g, thi - tlo, g.rg, T(1), At + (tap * g.r + grp * g.rg) * g.cin_g, g.cin_g,
                   gu + (n * g.r + grp * g.rg) * g.Tout + tlo, g.Tout, T(1), dst + (tlo + off - c0), ld);
      }
      if (d.on)
        for (int64_t i = 0; i < g.cin_g; ++i) {
          const int64_t base = (row0 + i) * g.T;
          for (int64_t c = c0; c < c1; ++c) gx[base + c] += acc[i * tb + c - c0] * d.at(base + c);
        }
      (void)len;
    }
  });
}

// gA_ (r, cin_g·K) = Σ over threads of the tap-major partials (K, r, cin_g).
template <class T>
void reduce_tap_major(const Partials<T>& pA, T* gA_, const C1Geom& g) {
  for (int64_t tap = 0; tap < g.K; ++tap)
    for (int64_t j = 0; j < g.r; ++j)
      for (int64_t i = 0; i < g.cin_g; ++i) {
        const int64_t src = (tap * g.r + j) * g.cin_g + i;
        T s = 0;
        for (int64_t t = 0; t < pA.nthreads; ++t) s += pA.buf[static_cast<size_t>(t * pA.size + src)];
        gA_[(j * g.cin_g + i) * g.K + tap] = s;
      }
}

int64_t c1_largest(const C1Geom& g) {
  return std::max({g.N * g.Cout * g.Tout, g.N * g.Cin * g.T, g.Cout * g.cin_g * g.K});
}

// --------------------------------------------------------------------------- merged weight and input gradient

// W + s·ΔW for Conv1d: W (Cout, cin_g, K), A (r, cin_g·K), B (Cout, rg).
Tensor merged_conv1d_weight(const Tensor& W, const Tensor& A, const Tensor& B, double s, int64_t G) {
  const int64_t out = W.size(0);
  if (G == 1) return at::addmm(W.reshape({out, -1}), B, A, 1.0, s).view(W.sizes());
  return at::baddbmm(W.reshape({G, out / G, -1}), B.reshape({G, out / G, -1}), A.reshape({G, A.size(0) / G, -1}), 1.0,
                     s)
      .view(W.sizes());
}

// grad_x (N, Cin, T) += D(conv1dᵀ(g_u, A)): the LoRA term of the input gradient on the dropout path.
template <class T>
void add_conv1d_lora_grad_x(T* gx, const T* gu, const T* A, const C1Geom& g, const Dropout<T>& d) {
  at::parallel_for(0, g.N * g.Cin, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> lx(static_cast<size_t>(g.T));
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n = row / g.Cin, ci = row % g.Cin, grp = ci / g.cin_g, i = ci % g.cin_g;
      std::fill(lx.begin(), lx.end(), T(0));
      for (int64_t tap = 0; tap < g.K; ++tap)
        for (int64_t t = 0; t < g.Tout; ++t) {
          const int64_t s = g.src(t * g.stride + tap * g.dil);
          if (s < 0) continue;
          T v = 0;
          for (int64_t j = 0; j < g.rg; ++j)
            v += A[((grp * g.rg + j) * g.cin_g + i) * g.K + tap] * gu[(n * g.r + grp * g.rg + j) * g.Tout + t];
          lx[s] += v;
        }
      T* gr = gx + row * g.T;
      for (int64_t t = 0; t < g.T; ++t) gr[t] += d.on ? lx[t] * d.at(row * g.T + t) : lx[t];
    }
  });
}

// --------------------------------------------------------------------------- Conv1d ops

// The hand-vectorised thin passes (csrc/lora_cpu_simd.cpp) run float32 calls with groups 1,
// stride 1, zero (or no) padding and no dropout, on a CPU with AVX2+FMA or AVX-512.
bool simd_conv1d(const Tensor& x, const C1Geom& g, double dropout_p) {
  return x.scalar_type() == at::kFloat && dropout_p == 0.0 && g.G == 1 && conv1d_views(g) &&
         rvclora_cpu_simd::isa() > 0 && g.N * g.Tout > 0;
}

// Inputs larger than this many bytes get u before y in the SIMD forward: twice the L2 of the threads that
// run it (sysconf's level-2 size per core, 1 MiB where it reports none). Measured on an AMD EPYC (Zen 5,
// 1 MiB L2 per core, 2 threads), alternating whole-step runs of bench/compare_backends.py against the
// previous build: at batch 4 (x 6.5 MB per layer) u first ran 3-11 points faster in 4 of 4 pairs; at batch 1
// (x 1.6 MB) it showed no gain (1.5-7 points slower in 4 pairs, inside the host's run-to-run spread), so the
// convolution keeps going first there. Intel has not been measured.
int64_t l2_bytes() {
  static const int64_t l2 = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long v = 0;
#endif
    return v > 0 ? static_cast<int64_t>(v) : int64_t{1} << 20;
  }();
  return l2;
}

int64_t u_first_bytes() { return 2 * l2_bytes() * std::max<int64_t>(1, at::get_num_threads()); }

rvclora_cpu_simd::Dims simd_dims(const C1Geom& g) {
  return {g.N, g.Cin, g.T, g.Cout, g.K, g.r, g.padl, g.dil, g.Tout};
}

// --------------------------------------------------------------------------- the plan: library or direct
// Two ways to run a SIMD-eligible float32 Conv1d (groups 1, stride 1, zero padding, no dropout):
//   library  the convolution (forward, input gradient) by oneDNN through at::convolution, the LoRA terms by the
//            thin passes (u after or before it; g_u, grad_A, grad_B in one sweep over g);
//   direct   the convolution by the thin passes' own microkernel with the merged weight W + s·B·A: y and u in one
//            sweep over x (Cout + r rows per time tile), grad_x = conv1dᵀ(g, W + s·B·A) by the same microkernel,
//            grad_A and grad_B as in the library plan. No convolution library call at all.
// Measured on an AMD EPYC (Zen 4, 2 threads): oneDNN runs RVC's 32- and 64-channel stages (T = 6400-12800) at
// 30-50 GFLOP/s for k = 3, where the direct kernel runs y and u together in less time than oneDNN's y alone; at
// 256 channels and k = 11 (a weight larger than L2) oneDNN is faster. Neither wins everywhere, so the plan is
// chosen per layer geometry by timing both on the first call (see choose_plan), unless RVCLORA_AUTOSELECT=fixed
// (the library plan, deterministic) or RVCLORA_CPU_CONV1D=library|direct forces one.
enum class Plan { kLibrary, kDirect };

// A direct plan re-reads the whole (merged) weight for every time tile: only weights that fit L2 are candidates.
bool direct_candidate(const C1Geom& g) {
  return g.Cout * g.cin_g * g.K * static_cast<int64_t>(sizeof(float)) <= l2_bytes();
}

// RVCLORA_CPU_CONV1D: "" (choose), "library" or "direct" (forced; the tests run each plan this way).
std::optional<Plan> forced_plan() {
  const char* e = std::getenv("RVCLORA_CPU_CONV1D");
  if (e == nullptr || *e == '\0') return std::nullopt;
  const std::string v(e);
  if (v == "library") return Plan::kLibrary;
  if (v == "direct") return Plan::kDirect;
  TORCH_CHECK(false, "RVCLORA_CPU_CONV1D must be 'library' or 'direct' (or unset: measured per layer), got '", v,
              "'");
}

bool fixed_mode() {
  const char* e = std::getenv("RVCLORA_AUTOSELECT");
  if (e == nullptr) return false;
  std::string v(e);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  v.erase(0, v.find_first_not_of(" \t"));
  v.erase(v.find_last_not_of(" \t") + 1);
  return v == "fixed";
}

struct PlanEntry {
  Plan plan;
  double library_ms, direct_ms;
  bool measured;  // here, in this process (else set from rvclora's per-machine cache)
};

struct PlanTable {
  std::mutex mu;
  std::map<std::string, PlanEntry> entries;
  double seconds = 0;  // spent measuring
};

PlanTable& plan_table() {
  static PlanTable t;
  return t;
}

// While positive (rvclora's auto is timing the cpu backend against the torch path on a shortened synthetic input),
// a geometry without a plan runs the library plan and records nothing: timing both plans there would be spent on
// a length the model never runs.
std::atomic<int>& plan_hold() {
  static std::atomic<int> n{0};
  return n;
}

// The key of a plan: the layer's geometry, the batch, the rank, the thread count and the output length rounded up to
// a power of two (sequence lengths vary from batch to batch in the synthesizer's text encoder and flow: a plan is
// timed once per length class, not once per length).
std::string plan_key(const char* dir, const C1Geom& g, int64_t extra) {
  int64_t tcls = 1;
  while (tcls < g.Tout) tcls *= 2;
  std::ostringstream k;
  k << dir << " Cin=" << g.Cin << " Cout=" << g.Cout << " k=" << g.K << " dil=" << g.dil << " pad=" << g.padl << ","
    << g.padr << " T<=" << tcls << " N=" << g.N << " r=" << g.r << " threads=" << at::get_num_threads() << " #"
    << extra;
  return k.str();
}

// The plan for `key`: forced, fixed (library), cached, or measured now by running both on the call's own inputs:
// one warm-up run each (oneDNN's primitive creation, page faults), then library, direct. Where one is faster by more
// than kClearMargin, that decides it; otherwise direct, library again and the faster of each plan's two runs (the
// order library, direct, direct, library lets a drift in the machine's speed favour neither). `run(plan)` computes
// the op's result by that plan; the chosen plan's last result is handed back in `out`, so the measuring call costs
// three extra runs (five for a close call).
constexpr double kClearMargin = 1.15;

template <class R>
Plan choose_plan(const std::string& key, const std::function<R(Plan)>& run, std::optional<R>& out) {
  if (auto f = forced_plan()) return *f;
  if (fixed_mode()) return Plan::kLibrary;
  PlanTable& t = plan_table();
  {
    std::lock_guard<std::mutex> lock(t.mu);
    auto it = t.entries.find(key);
    if (it != t.entries.end()) return it->second.plan;
  }
  if (plan_hold().load() > 0) return Plan::kLibrary;
  const auto t0 = std::chrono::steady_clock::now();
  run(Plan::kLibrary);
  run(Plan::kDirect);
  std::optional<R> lib_out, dir_out;
  const auto time_it = [&](Plan p) {
    const auto a = std::chrono::steady_clock::now();
    (p == Plan::kDirect ? dir_out : lib_out) = run(p);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count();
  };
  double lib_ms = time_it(Plan::kLibrary), dir_ms = time_it(Plan::kDirect);
  if (std::max(lib_ms, dir_ms) <= kClearMargin * std::min(lib_ms, dir_ms)) {
    dir_ms = std::min(dir_ms, time_it(Plan::kDirect));
    lib_ms = std::min(lib_ms, time_it(Plan::kLibrary));
  }
  const Plan chosen = dir_ms < lib_ms ? Plan::kDirect : Plan::kLibrary;
  out = chosen == Plan::kDirect ? std::move(dir_out) : std::move(lib_out);
  std::lock_guard<std::mutex> lock(t.mu);
  t.entries.emplace(key, PlanEntry{chosen, lib_ms, dir_ms, true});
  t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return chosen;
}

}  // namespace

std::tuple<Tensor, Tensor> conv1d_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                      const Tensor& lora_A, const Tensor& lora_B, double scaling, int64_t stride,
                                      at::IntArrayRef padding, int64_t dilation, int64_t groups,
                                      c10::string_view padding_mode, double dropout_p,
                                      const std::optional<Tensor>& seed) {
  check_common(x, weight, lora_A, lora_B);
  const C1Geom g = conv1d_geom(x, weight, lora_A, lora_B, stride, padding, dilation, groups, padding_mode);
  const Tensor A = factor(lora_A, x), B = factor(lora_B, x);
  const Tensor xc = x.contiguous();
  auto [xp, cpad] = conv1d_input(xc, g);
  if (simd_conv1d(x, g, dropout_p)) {
    const auto run = [&](Plan plan) -> std::tuple<Tensor, Tensor> {
      if (plan == Plan::kDirect) {
        const Tensor wm = merged_conv1d_weight(weight, A, B, scaling, 1).contiguous();
        Tensor y = at::empty({g.N, g.Cout, g.Tout}, x.options()), u = at::empty({g.N, g.r, g.Tout}, x.options());
        const Tensor bc = bias.has_value() && bias->defined() ? bias->to(x.scalar_type()).contiguous() : Tensor();
        rvclora_cpu_simd::conv1d_direct_fwd(xc.const_data_ptr<float>(), wm.const_data_ptr<float>(),
                                            bc.defined() ? bc.const_data_ptr<float>() : nullptr,
                                            A.const_data_ptr<float>(), y.mutable_data_ptr<float>(),
                                            u.mutable_data_ptr<float>(), simd_dims(g));
        return {y, u};
      }
      // y by the convolution library (merged weight where the weight is no larger than y), u by the SIMD kernel
      // in one sweep over x. Whichever runs first reads x while the op before this layer has left it in cache.
      // Where x fits the threads' L2 the convolution goes first; where it is larger, u does: the convolution's
      // output would push x out before the thin pass reads it, and the thin pass suffers more from that than the
      // convolution (see u_first_bytes).
      const bool merged = weight.numel() <= g.N * g.Cout * g.Tout;
      const bool u_first = x.numel() * static_cast<int64_t>(sizeof(float)) > u_first_bytes();
      Tensor u;
      const auto thin_u = [&] {
        u = at::empty({g.N, g.r, g.Tout}, x.options());
        rvclora_cpu_simd::conv1d_u(xc.const_data_ptr<float>(), A.const_data_ptr<float>(),
                                   u.mutable_data_ptr<float>(), simd_dims(g));
      };
      if (u_first) thin_u();
      const Tensor w = merged ? merged_conv1d_weight(weight, A, B, scaling, groups) : weight;
      Tensor y = at::convolution(xp, w, bias, {stride}, {cpad}, {dilation}, false, {0}, groups).contiguous();
      if (!u_first) thin_u();
      if (!merged) y.baddbmm_(B.unsqueeze(0).expand({g.N, g.Cout, g.r}), u, 1.0, scaling);
      return {y, u};
    };
    if (!direct_candidate(g) && !forced_plan()) return run(Plan::kLibrary);
    std::optional<std::tuple<Tensor, Tensor>> out;
    const Plan plan = choose_plan<std::tuple<Tensor, Tensor>>(
        plan_key("forward", g, bias.has_value() && bias->defined()), run, out);
    return out ? *std::move(out) : run(plan);
  }
  // BLAS path: merge only when the weight is no larger than y (merging costs a pass over the
  // weight, the separate LoRA term a pass over y).
  check_blas(x, c1_largest(g));
  const bool merged = dropout_p == 0.0 && weight.numel() <= g.N * g.Cout * g.Tout;
  const Tensor w = merged ? merged_conv1d_weight(weight, A, B, scaling, groups) : weight;
  Tensor y = at::convolution(xp, w, bias, {stride}, {cpad}, {dilation}, false, {0}, groups).contiguous();
  Tensor u = at::empty({g.N, g.r, g.Tout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rvclora_cpu_conv1d_fwd", [&] {
    const Tensor At = A.view({g.r, g.cin_g, g.K}).permute({2, 0, 1}).contiguous();
    C1FwdB<scalar_t> p{xc.const_data_ptr<scalar_t>(), At.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(),
                       merged ? nullptr : y.mutable_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
                       static_cast<scalar_t>(scaling), g, make_dropout<scalar_t>(seed, dropout_p),
                       conv1d_views(g) && dropout_p == 0.0, 0, 0};
    p.tb = blas_block_len(g.Tout, g.N * g.G, std::max(g.cin_g, g.cout_g));
    p.nblk = (g.Tout + p.tb - 1) / p.tb;
    conv1d_fwd_blas<scalar_t>(p);
  });
  return {y, u};
}

Grads5 conv1d_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B, double scaling, int64_t stride, at::IntArrayRef padding, int64_t dilation,
                  int64_t groups, c10::string_view padding_mode, double dropout_p, const std::optional<Tensor>& seed,
                  std::array<bool, 5> needs) {
  check_common(x, weight, lora_A, lora_B);
  const C1Geom g = conv1d_geom(x, weight, lora_A, lora_B, stride, padding, dilation, groups, padding_mode);
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_A = needs[3], need_B = needs[4];
  const Tensor A = factor(lora_A, x), B = factor(lora_B, x);
  const Tensor xc = x.contiguous(), gy = grad_y.to(x.scalar_type()).contiguous(), uc = u.contiguous();
  TORCH_CHECK(gy.sizes() == at::IntArrayRef({g.N, g.Cout, g.Tout}), "rvclora cpu: grad_y must be ",
              at::IntArrayRef({g.N, g.Cout, g.Tout}), ", got ", grad_y.sizes());
  // SIMD and BLAS paths: the unmerged input gradient (a thin pass from g_u into grad_x) when the
  // weight is larger than x (merging costs a pass over the weight) and the taps are views.
  const bool simd = simd_conv1d(x, g, dropout_p);
  const auto run = [&](Plan plan) -> Grads5 {
    const bool direct = simd && plan == Plan::kDirect && !need_w && !need_b;
    const bool merged = dropout_p == 0.0 && (direct || !conv1d_views(g) || weight.numel() <= x.numel());
    Tensor gx = empty0(x), gw = empty0(x), gbias = empty0(x), gA_ = empty0(x), gB_ = empty0(x);
    if (direct && need_x) {
      const Tensor wm = merged_conv1d_weight(weight, A, B, scaling, 1).contiguous();
      gx = at::empty({g.N, g.Cin, g.T}, x.options());
      rvclora_cpu_simd::conv1d_direct_gx(gy.const_data_ptr<float>(), wm.const_data_ptr<float>(),
                                         gx.mutable_data_ptr<float>(), simd_dims(g));
    } else if (need_x || need_w || need_b) {
      auto [xp, cpad] = conv1d_input(xc, g);
      const Tensor w = merged ? merged_conv1d_weight(weight, A, B, scaling, groups) : weight;
      std::optional<at::IntArrayRef> bias_sizes;
      const std::vector<int64_t> bsz{g.Cout};
      if (need_b) bias_sizes = at::IntArrayRef(bsz);
      auto [gxp, gw_, gbias_] = at::convolution_backward(gy, xp, w, bias_sizes, {stride}, {cpad}, {dilation}, false, {0},
                                                      groups, {need_x, need_w, need_b});
      if (need_x) gx = conv1d_unpad(gxp, xc, g, cpad).contiguous();
      if (need_w) gw = like_input(gw_, weight);
      if (need_b) gbias = gbias_;
    }
    const bool lora_x = need_x && !merged;
    if (simd && (need_A || need_B || lora_x)) {
      if (need_A) gA_ = at::empty({g.r, g.cin_g * g.K}, x.options());
      if (need_B) gB_ = at::empty({g.Cout, g.rg}, x.options());
      Tensor gu = lora_x ? at::empty({g.N, g.r, g.Tout}, x.options()) : Tensor();
      rvclora_cpu_simd::conv1d_bwd(gy.const_data_ptr<float>(), xc.const_data_ptr<float>(), uc.const_data_ptr<float>(),
                                   B.const_data_ptr<float>(), static_cast<float>(scaling),
                                   need_A ? gA_.mutable_data_ptr<float>() : nullptr,
                                   need_B ? gB_.mutable_data_ptr<float>() : nullptr,
                                   lora_x ? gu.mutable_data_ptr<float>() : nullptr, simd_dims(g));
      if (lora_x)
        rvclora_cpu_simd::conv1d_grad_x(gu.const_data_ptr<float>(), A.const_data_ptr<float>(),
                                        gx.mutable_data_ptr<float>(), simd_dims(g));
    } else if (need_A || need_B || lora_x) {
      check_blas(x, c1_largest(g));
      Tensor gu = lora_x ? at::empty({g.N, g.r, g.Tout}, x.options()) : Tensor();
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rvclora_cpu_conv1d_bwd", [&] {
        const Tensor At = A.view({g.r, g.cin_g, g.K}).permute({2, 0, 1}).contiguous();
        Partials<scalar_t> pA(g.K * g.r * g.cin_g, need_A), pB(g.Cout * g.rg, need_B);
        const Dropout<scalar_t> d = make_dropout<scalar_t>(seed, dropout_p);
        C1BwdB<scalar_t> p{gy.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                           At.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
                           lora_x ? gu.mutable_data_ptr<scalar_t>() : nullptr, &pA, &pB,
                           static_cast<scalar_t>(scaling), g, d, conv1d_views(g) && !d.on, 0, 0};
        p.tb = blas_block_len(g.Tout, g.N * g.G, std::max(g.cin_g, g.cout_g));
        p.nblk = (g.Tout + p.tb - 1) / p.tb;
        conv1d_bwd_blas<scalar_t>(p);
        if (need_A) {
          gA_ = at::empty({g.r, g.cin_g * g.K}, x.options());
          reduce_tap_major(pA, gA_.mutable_data_ptr<scalar_t>(), g);
        }
        if (need_B) {
          gB_ = at::empty({g.Cout, g.rg}, x.options());
          pB.reduce_into(gB_.mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(scaling));
        }
        if (lora_x) {
          if (conv1d_views(g))
            conv1d_grad_x_blas<scalar_t>(gx.mutable_data_ptr<scalar_t>(), gu.const_data_ptr<scalar_t>(),
                                         At.const_data_ptr<scalar_t>(), g, d);
          else
            add_conv1d_lora_grad_x<scalar_t>(gx.mutable_data_ptr<scalar_t>(), gu.const_data_ptr<scalar_t>(),
                                             A.const_data_ptr<scalar_t>(), g, d);
        }
      });
    }
    if (need_x) gx = grad_input_layout(gx, x, false);
    if (need_A) gA_ = like_input(gA_, lora_A);
    if (need_B) gB_ = like_input(gB_, lora_B);
    return {gx, gw, gbias, gA_, gB_};
  };
  // the direct plan changes only the input gradient's convolution: nothing to choose without it
  if (!simd || !need_x || need_w || need_b || (!direct_candidate(g) && !forced_plan())) return run(Plan::kLibrary);
  std::optional<Grads5> out;
  const Plan plan =
      choose_plan<Grads5>(plan_key("backward", g, (need_A ? 1 : 0) + (need_B ? 2 : 0)), run, out);
  return out ? *std::move(out) : run(plan);
}

}  // namespace rvclora_cpu

namespace rvclora_cpu {

void conv1d_plan_hold(bool on) {
  if (on)
    ++plan_hold();
  else
    --plan_hold();
}

// A plan timed by an earlier process on this machine (rvclora's autoselect cache): used as if timed here.
void conv1d_plan_set(c10::string_view key, c10::string_view plan, double library_ms, double direct_ms) {
  TORCH_CHECK(plan == "library" || plan == "direct", "rvclora cpu: a Conv1d plan must be 'library' or 'direct', got '",
              std::string(plan), "'");
  TORCH_CHECK(!key.empty(), "rvclora cpu: a Conv1d plan needs a key");
  PlanTable& t = plan_table();
  std::lock_guard<std::mutex> lock(t.mu);
  t.entries.emplace(std::string(key),
                    PlanEntry{plan == "direct" ? Plan::kDirect : Plan::kLibrary, library_ms, direct_ms, false});
}

// The plans this process runs, one per line: "<key>\t<plan>\t<library ms>\t<direct ms>\t<measured|cached>",
// after a first line "seconds\t<time spent measuring here>".
std::string conv1d_plans() {
  PlanTable& t = plan_table();
  std::lock_guard<std::mutex> lock(t.mu);
  std::ostringstream out;
  out << "seconds\t" << t.seconds << "\n";
  for (const auto& [key, e] : t.entries)
    out << key << "\t" << (e.plan == Plan::kDirect ? "direct" : "library") << "\t" << e.library_ms << "\t"
        << e.direct_ms << "\t" << (e.measured ? "measured" : "cached") << "\n";
  return out.str();
}

}  // namespace rvclora_cpu
