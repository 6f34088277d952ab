// The `cpu` backend: the three LoRA ops as compiled CPU code (float32 and float64).
//
// What runs where:
// * Base-sized work stays in the convolution/GEMM library (oneDNN/MKL through ATen). Without
//   dropout the forward and the input gradient can use the merged weight W + s·ΔW (one base-sized
//   op each, no r extra output channels). Merging costs a pass over the weight, the separate LoRA
//   term a thin pass over the activation: Conv1d merges where the weight is no larger than y
//   (forward) or x (input gradient), ConvTranspose1d where the weight is small against x.
// * The thin LoRA passes go through the BLAS that torch links (sgemm_/dgemm_, MKL in the x86
//   wheels), a few calls per time block, parallel over (batch, group, block), single-threaded
//   BLAS inside each block:
//     forward   u = conv(D(x), A)                 per tap j: u_blk += At_j · x_j   (x_j: x shifted
//                                                 by j·dilation, a view with x's row stride)
//     backward  g_u = s·Bᵀg, grad_B += g·uᵀ       on the same block of g (one pass over g)
//               grad_A_j += g_u · x_jᵀ            on the same block of x
//   A tap is a view of x when the stride is 1, the padding zeros and there is no dropout; else it
//   is gathered (padded, masked, strided) into a block buffer. Weight-gradient partial sums are
//   kept per thread and reduced once. Where this torch exports no BLAS symbol (or
//   RVCLORA_CPU_BLAS=0), hand-written loops over the same blocks run instead.
// * Dropout masks are a counter-based hash of (seed, element index of x), regenerated in
//   backward; nothing mask-sized is ever stored.
//
// Each op is one call per layer and direction; autograd and the fake kernels are registered
// from Python (rvclora/ops/cpu_backend.py).

#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_pad_circular.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/reflection_pad1d.h>
#include <ATen/ops/reflection_pad1d_backward.h>
#include <ATen/ops/replication_pad1d.h>
#include <ATen/ops/replication_pad1d_backward.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "lora_cpu_simd.h"

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace rvclora_cpu {
namespace {

using at::Tensor;
using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// --------------------------------------------------------------------------- ISA clones
// The hot block loops are compiled twice: for AVX2+FMA and for the baseline ISA, picked at run
// time (the extension is built without -march flags, so it runs on any x86-64 or other CPU).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RVC_HAVE_AVX2_CLONE 1
#define RVC_TARGET_AVX2 __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
#define RVC_HAVE_AVX2_CLONE 0
#endif
#if defined(__GNUC__)
#define RVC_INLINE inline __attribute__((always_inline))
#else
#define RVC_INLINE inline
#endif

// --------------------------------------------------------------------------- dropout

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// keep(i) ⇔ the top 24 bits of hash(seed, i), as a uniform in [0, 1), are ≥ p.
template <class T>
struct Dropout {
  bool on = false;
  uint64_t key = 0;
  uint32_t threshold = 0;
  T scale = T(1);
  RVC_INLINE T at(int64_t idx) const {
    const uint32_t h = static_cast<uint32_t>(mix64(key + static_cast<uint64_t>(idx) * 0x9E3779B97F4A7C15ULL) >> 40);
    return h >= threshold ? scale : T(0);
  }
};

int64_t seed_of(const std::optional<Tensor>& seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "rvclora cpu: dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->defined(), "rvclora cpu: dropout_p = ", p, " > 0 needs a seed tensor");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
              "rvclora cpu: seed must be a one-element int64 CPU tensor, got ", seed->scalar_type(), " on ",
              seed->device(), " with ", seed->numel(), " elements");
  return seed->item<int64_t>();
}

template <class T>
Dropout<T> make_dropout(const std::optional<Tensor>& seed, double p) {
  Dropout<T> d;
  const int64_t s = seed_of(seed, p);
  if (p == 0.0) return d;
  d.on = true;
  d.key = mix64(static_cast<uint64_t>(s) ^ 0x6A09E667F3BCC909ULL);
  d.threshold = static_cast<uint32_t>(std::ceil(p * 16777216.0));
  d.scale = static_cast<T>(1.0 / (1.0 - p));
  return d;
}

// --------------------------------------------------------------------------- small helpers

void check_common(const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "rvclora cpu: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rvclora cpu: weight dtype ", weight.scalar_type(),
              " must equal x's (", x.scalar_type(), ")");
  for (const Tensor* t : {&x, &weight, &A, &B})
    TORCH_CHECK(t->device().is_cpu(), "rvclora cpu: every tensor must be on the CPU, got ", t->device());
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2, "rvclora cpu: lora_A and lora_B must be 2-D, got ", A.sizes(), " and ",
              B.sizes());
}

// The factors in x's dtype, contiguous (a copy only when they differ, e.g. fp32 factors with fp64 x).
Tensor factor(const Tensor& t, const Tensor& x) { return t.to(x.scalar_type()).contiguous(); }

// A gradient in the layout (and dtype) of the tensor it belongs to.
Tensor like_input(Tensor g, const Tensor& input) {
  if (g.scalar_type() != input.scalar_type()) g = g.to(input.scalar_type());
  Tensor out = at::empty_like(input);
  if (out.strides() == g.strides()) return g;
  out.copy_(g);
  return out;
}

Tensor empty0(const Tensor& x) { return at::empty({0}, x.options()); }

// grad_x in the layout the base layer's autograd gives it: contiguous, except for a transposed 2-D
// Linear input (x.t() of a contiguous matrix), whose gradient nn.Linear returns transposed too.
bool transposed_2d(const Tensor& x) {
  return x.dim() == 2 && x.size(0) > 1 && x.size(1) > 1 && x.stride(0) == 1 && x.stride(1) == x.size(0);
}

Tensor grad_input_layout(Tensor g, const Tensor& x, bool linear) {
  if (g.scalar_type() != x.scalar_type()) g = g.to(x.scalar_type());
  if (linear && transposed_2d(x)) {
    if (g.strides() == x.strides()) return g;
    Tensor out = at::empty({x.size(1), x.size(0)}, g.options()).t();
    out.copy_(g);
    return out;
  }
  return g.contiguous();
}

// Time-block length: long enough for the vector loops, short enough that the per-block
// accumulators stay in L1, and enough blocks for every thread.
int64_t block_len(int64_t T, int64_t outer) {
  int64_t tb = 256;
  if (outer <= 0 || T <= 0) return std::max<int64_t>(1, std::min(tb, T));  // empty batch: nothing to split
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  if (outer * ((T + tb - 1) / tb) < want && T > 16) {
    const int64_t per = std::max<int64_t>(1, (want + outer - 1) / outer);
    tb = std::max<int64_t>(16, ((T + per - 1) / per + 15) / 16 * 16);
  }
  return std::max<int64_t>(1, std::min(tb, T));
}

template <class T>
RVC_INLINE void axpy(T* __restrict y, const T* __restrict x, T a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <class T>
RVC_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  // Eight independent partial sums: vectorisable without -ffast-math, and more accurate than one.
  T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int q = 0; q < 8; ++q) s[q] += a[i + q] * b[i + q];
  T tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// Per-thread partial sums of a weight gradient, reduced once at the end.
template <class T>
struct Partials {
  int64_t size, nthreads;
  std::vector<T> buf;
  Partials(int64_t size_, bool need) : size(need ? size_ : 0), nthreads(at::get_num_threads()) {
    buf.assign(static_cast<size_t>(size * nthreads), T(0));
  }
  T* mine() {
    if (size == 0) return nullptr;
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid >= 0 && tid < nthreads, "rvclora cpu: thread id ", tid, " outside the pool of ", nthreads);
    return buf.data() + static_cast<size_t>(tid) * size;
  }
  void reduce_into(T* out, T alpha) const {
    for (int64_t i = 0; i < size; ++i) {
      T s = 0;
      for (int64_t t = 0; t < nthreads; ++t) s += buf[static_cast<size_t>(t * size + i)];
      out[i] = alpha * s;
    }
  }
};


// --------------------------------------------------------------------------- BLAS
// The thin LoRA GEMMs call the BLAS that torch itself links (MKL's sgemm_/dgemm_ in the x86
// wheels), on raw pointers with leading dimensions: a tap of a dilated convolution is a view of
// x with an offset, so no im2col and no copies. Weak symbols: a torch built without an exported
// BLAS leaves them null, and the hand-written loops below run instead.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

template <class T>
bool blas_present();
template <>
bool blas_present<float>() { return sgemm_ != nullptr; }
template <>
bool blas_present<double>() { return dgemm_ != nullptr; }

template <class T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc);

// The symbol's calling convention is assumed (Fortran BLAS, 32-bit ints): check it once on a small
// product with transposes and leading dimensions before trusting it; a BLAS that disagrees (an ILP64
// build, say) leaves the loops in charge and `rvclora info` says so.
template <class T>
bool blas_agrees() {
  static const bool ok = [] {
    if (!blas_present<T>()) return false;
    // C (2×3, ldc 4) = 2·Aᵀ·B + C with A stored 2×2 (lda 3), B 2×3 (ldb 5)
    const T A[6] = {1, 2, 0, 3, 4, 0};
    const T B[10] = {1, 0, 2, 0, 0, -1, 1, 0, 0, 0};
    T C[8] = {1, 1, 1, 0, 1, 1, 1, 0};
    gemm_rm<T>(true, false, 2, 3, 2, T(2), A, 3, B, 5, T(1), C, 4);
    // Aᵀ = [[1, 3], [2, 4]];  Aᵀ·B = [[-2, 3, 2], [-2, 4, 4]]
    const T want[8] = {-3, 7, 5, 0, -3, 9, 9, 0};
    for (int i = 0; i < 8; ++i)
      if (C[i] != want[i]) return false;
    return true;
  }();
  return ok;
}

// Whether the BLAS path runs: the symbol is there and agrees with blas_agrees' check,
// RVCLORA_CPU_BLAS is not 0 (a switch to compare against the loops), and every dimension fits
// BLAS's 32-bit ints.
bool blas_switched_off() {
  static const bool off = [] {
    const char* v = std::getenv("RVCLORA_CPU_BLAS");
    return v != nullptr && std::string(v) == "0";
  }();
  return off;
}

template <class T>
bool use_blas(int64_t largest) {
  return !blas_switched_off() && blas_agrees<T>() && largest < (int64_t(1) << 31) - 1;
}

// Row-major C (M×N, ldc) = alpha·op(A)·op(B) + beta·C, op(A) M×K, op(B) K×N (column-major BLAS
// computing Cᵀ = op(B)ᵀ·op(A)ᵀ). Single-threaded when called from a parallel region.
template <class T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(std::max<int64_t>(1, ldb)), lb = static_cast<int>(std::max<int64_t>(1, lda)),
            lc = static_cast<int>(std::max<int64_t>(1, ldc));
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  else
    dgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

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

// One row of the (padded, dropped-out, strided) LoRA input for a time block: values for output
// positions t in [lo, hi) are row[t - lo]; positions of the block outside [lo, hi) read zeros.
template <class T>
struct RowView {
  const T* row;
  int64_t lo, hi;
};

template <class T>
RVC_INLINE RowView<T> conv1d_row(const T* x, const C1Geom& g, const Dropout<T>& d, int64_t n, int64_t ci, int64_t tap,
                                 int64_t t0, int64_t t1, T* buf) {
  const int64_t base = (n * g.Cin + ci) * g.T;
  const T* xrow = x + base;
  if (g.stride == 1 && g.mode == PadMode::kZeros && !d.on) {
    const int64_t off = tap * g.dil - g.padl;
    const int64_t lo = std::max(t0, -off), hi = std::min(t1, g.T - off);
    if (lo >= hi) return {xrow, 0, 0};
    return {xrow + lo + off, lo, hi};
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t s = g.src(t * g.stride + tap * g.dil);
    buf[t - t0] = s < 0 ? T(0) : (d.on ? xrow[s] * d.at(base + s) : xrow[s]);
  }
  return {buf, t0, t1};
}

template <class T>
struct C1Fwd {
  const T* x;
  const T* A;  // (r, cin_g, K)
  T* u;        // (N, r, Tout)
  C1Geom g;
  Dropout<T> d;
  int64_t tb, nblk;
};

// u for blocks [b0, b1) of (n, group, time block).
template <class T>
RVC_INLINE void conv1d_u_body(const C1Fwd<T>& p, int64_t b0, int64_t b1) {
  const C1Geom& g = p.g;
  std::vector<T> acc(static_cast<size_t>(g.rg * p.tb)), buf(static_cast<size_t>(p.tb));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
    const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.Tout), len = t1 - t0;
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t i = 0; i < g.cin_g; ++i) {
      const int64_t ci = grp * g.cin_g + i;
      for (int64_t tap = 0; tap < g.K; ++tap) {
        const RowView<T> v = conv1d_row(p.x, g, p.d, n, ci, tap, t0, t1, buf.data());
        if (v.lo >= v.hi) continue;
        for (int64_t j = 0; j < g.rg; ++j) {
          const T a = p.A[((grp * g.rg + j) * g.cin_g + i) * g.K + tap];
          axpy(acc.data() + j * p.tb + (v.lo - t0), v.row, a, v.hi - v.lo);
        }
      }
    }
    for (int64_t j = 0; j < g.rg; ++j)
      std::copy(acc.data() + j * p.tb, acc.data() + j * p.tb + len, p.u + (n * g.r + grp * g.rg + j) * g.Tout + t0);
  }
}

template <class T>
struct C1Bwd {
  const T* g;   // grad_y (N, Cout, Tout)
  const T* x;   // (N, Cin, T)
  const T* u;   // (N, r, Tout)
  const T* A;   // (r, cin_g, K)
  const T* B;   // (Cout, rg)
  T* gu;        // optional (N, r, Tout): s·Bᵀg, for the dropout path's input gradient
  Partials<T>* pA;  // (r, cin_g, K)
  Partials<T>* pB;  // (Cout, rg)
  T scaling;
  C1Geom geo;
  Dropout<T> d;
  int64_t tb, nblk;
};

// One pass over g per block: g_u (kept in the block) and grad_B; then grad_A over x.
template <class T>
RVC_INLINE void conv1d_bwd_body(const C1Bwd<T>& p, int64_t b0, int64_t b1) {
  const C1Geom& g = p.geo;
  std::vector<T> acc(static_cast<size_t>(g.rg * p.tb)), buf(static_cast<size_t>(p.tb));
  T* gA = p.pA->mine();
  T* gB = p.pB->mine();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
    const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.Tout), len = t1 - t0;
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t o = 0; o < g.cout_g; ++o) {
      const int64_t oc = grp * g.cout_g + o;
      const T* grow = p.g + (n * g.Cout + oc) * g.Tout + t0;
      for (int64_t j = 0; j < g.rg; ++j) axpy(acc.data() + j * p.tb, grow, p.B[oc * g.rg + j], len);
      if (gB)
        for (int64_t j = 0; j < g.rg; ++j)
          gB[oc * g.rg + j] += dot(grow, p.u + (n * g.r + grp * g.rg + j) * g.Tout + t0, len);
    }
    if (!gA && !p.gu) continue;
    for (auto& v : acc) v *= p.scaling;
    if (p.gu)
      for (int64_t j = 0; j < g.rg; ++j)
        std::copy(acc.data() + j * p.tb, acc.data() + j * p.tb + len, p.gu + (n * g.r + grp * g.rg + j) * g.Tout + t0);
    if (!gA) continue;
    for (int64_t i = 0; i < g.cin_g; ++i) {
      const int64_t ci = grp * g.cin_g + i;
      for (int64_t tap = 0; tap < g.K; ++tap) {
        const RowView<T> v = conv1d_row(p.x, g, p.d, n, ci, tap, t0, t1, buf.data());
        if (v.lo >= v.hi) continue;
        for (int64_t j = 0; j < g.rg; ++j)
          gA[((grp * g.rg + j) * g.cin_g + i) * g.K + tap] +=
              dot(acc.data() + j * p.tb + (v.lo - t0), v.row, v.hi - v.lo);
      }
    }
  }
}


// --------------------------------------------------------------------------- Conv1d through BLAS
// The same passes as above, each a handful of BLAS calls per time block: per tap j the LoRA input
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

// Block length: rows × length near RVCLORA_CPU_BLOCK elements (default 2^17: 512 KiB of fp32, well
// inside a core's L2), then split evenly so every thread gets the same number of blocks.
int64_t blas_block_len(int64_t T, int64_t outer, int64_t rows) {
  static const int64_t elems = [] {
    const char* v = std::getenv("RVCLORA_CPU_BLOCK");
    const int64_t e = v ? std::atoll(v) : 0;
    return e > 0 ? e : (int64_t(1) << 17);
  }();
  if (outer <= 0 || T <= 16) return std::max<int64_t>(1, T);
  const int64_t tb = std::clamp<int64_t>(elems / std::max<int64_t>(1, rows), 64, 8192);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nblk = (T + tb - 1) / tb;
  const int64_t total = outer * nblk;
  if (total % threads != 0 || total < 2 * threads) {
    // more blocks per sample, up to a multiple of the thread count (and at least two per thread)
    const int64_t want = std::max<int64_t>(2 * threads, (total + threads - 1) / threads * threads);
    nblk = std::max<int64_t>(nblk, (want + outer - 1) / outer);
  }
  const int64_t len = ((T + nblk - 1) / nblk + 15) / 16 * 16;
  return std::max<int64_t>(16, std::min(len, T));
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

bool blas_for(const Tensor& x, int64_t largest) {
  return x.scalar_type() == at::kFloat ? use_blas<float>(largest) : use_blas<double>(largest);
}

int64_t c1_largest(const C1Geom& g) {
  return std::max({g.N * g.Cout * g.Tout, g.N * g.Cin * g.T, g.Cout * g.cin_g * g.K});
}

// --------------------------------------------------------------------------- ConvTranspose1d

struct CTGeom {
  int64_t N, Cin, T, Cout, K, r, stride, pad, opad, dil, G, L, cin_g, cout_g, rg;
};

CTGeom convt_geom(const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B, int64_t stride,
                  int64_t padding, int64_t output_padding, int64_t dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 3, "rvclora cpu: conv_transpose1d x must be (N, C_in, T), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, "rvclora cpu: conv_transpose1d weight must be (C_in, C_out/groups, K), got ",
              weight.sizes());
  TORCH_CHECK(stride >= 1 && dilation >= 1 && groups >= 1 && padding >= 0 && output_padding >= 0,
              "rvclora cpu: need stride, dilation, groups >= 1 and padding, output_padding >= 0");
  CTGeom g{};
  g.N = x.size(0), g.Cin = x.size(1), g.T = x.size(2);
  g.K = weight.size(2), g.G = groups, g.Cout = weight.size(1) * groups, g.r = A.size(0);
  g.stride = stride, g.pad = padding, g.opad = output_padding, g.dil = dilation;
  TORCH_CHECK(weight.size(0) == g.Cin, "rvclora cpu: weight.shape[0] must equal C_in = ", g.Cin);
  TORCH_CHECK(g.Cin % groups == 0 && g.r % groups == 0, "rvclora cpu: C_in and r must be divisible by groups=",
              groups);
  g.cin_g = g.Cin / groups, g.cout_g = weight.size(1), g.rg = g.r / groups;
  TORCH_CHECK(A.size(1) == g.cin_g, "rvclora cpu: lora_A must be (r, C_in/groups) = (", g.r, ", ", g.cin_g,
              "), got ", A.sizes());
  TORCH_CHECK(B.size(0) == g.r && B.size(1) == g.cout_g * g.K, "rvclora cpu: lora_B must be (r, C_out/groups*K) = (",
              g.r, ", ", g.cout_g * g.K, "), got ", B.sizes());
  g.L = (g.T - 1) * stride - 2 * padding + dilation * (g.K - 1) + output_padding + 1;
  TORCH_CHECK(g.L >= 1, "rvclora cpu: conv_transpose1d output length ", g.L, " must be positive");
  return g;
}

template <class T>
RVC_INLINE const T* convt_row(const T* x, const CTGeom& g, const Dropout<T>& d, int64_t n, int64_t ci, int64_t t0,
                              int64_t t1, T* buf) {
  const int64_t base = (n * g.Cin + ci) * g.T;
  if (!d.on) return x + base + t0;
  for (int64_t t = t0; t < t1; ++t) buf[t - t0] = x[base + t] * d.at(base + t);
  return buf;
}

template <class T>
struct CTFwd {
  const T* x;
  const T* A;  // (r, cin_g)
  T* u;        // (N, r, T)
  CTGeom g;
  Dropout<T> d;
  int64_t tb, nblk;
};

template <class T>
RVC_INLINE void convt_u_body(const CTFwd<T>& p, int64_t b0, int64_t b1) {
  const CTGeom& g = p.g;
  std::vector<T> acc(static_cast<size_t>(g.rg * p.tb)), buf(static_cast<size_t>(p.tb));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
    const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.T), len = t1 - t0;
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t i = 0; i < g.cin_g; ++i) {
      const T* row = convt_row(p.x, g, p.d, n, grp * g.cin_g + i, t0, t1, buf.data());
      for (int64_t j = 0; j < g.rg; ++j) axpy(acc.data() + j * p.tb, row, p.A[(grp * g.rg + j) * g.cin_g + i], len);
    }
    for (int64_t j = 0; j < g.rg; ++j)
      std::copy(acc.data() + j * p.tb, acc.data() + j * p.tb + len, p.u + (n * g.r + grp * g.rg + j) * g.T + t0);
  }
}

template <class T>
struct CTBwd {
  const T* g;   // (N, Cout, L)
  const T* x;   // (N, Cin, T)
  const T* u;   // (N, r, T)
  const T* A;   // (r, cin_g)
  const T* B;   // (r, cout_g, K)
  T* gx;        // optional (N, Cin, T): the LoRA term of grad_x is added here (dropout path)
  Partials<T>* pA;  // (r, cin_g)
  Partials<T>* pB;  // (r, cout_g, K)
  T scaling;
  CTGeom geo;
  Dropout<T> d;
  int64_t tb, nblk;
};

// Per block of input time: one pass over g (strided by the upsampling factor) gives g_u and
// grad_B; then grad_A over x, and the 1×1 input-gradient term, all inside the block.
template <class T>
RVC_INLINE void convt_bwd_body(const CTBwd<T>& p, int64_t b0, int64_t b1) {
  const CTGeom& g = p.geo;
  std::vector<T> acc(static_cast<size_t>(g.rg * p.tb)), buf(static_cast<size_t>(p.tb)), gs(static_cast<size_t>(p.tb));
  T* gA = p.pA->mine();
  T* gB = p.pB->mine();
  const int64_t ok = g.cout_g * g.K;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
    const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.T), len = t1 - t0;
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t o = 0; o < g.cout_g; ++o) {
      const T* grow = p.g + (n * g.Cout + grp * g.cout_g + o) * g.L;
      for (int64_t tap = 0; tap < g.K; ++tap) {
        // gs[t] = g[n, o, t·stride − pad + tap·dil] (zero outside the output)
        const int64_t off = tap * g.dil - g.pad;
        bool any = false;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t l = t * g.stride + off;
          const bool in = l >= 0 && l < g.L;
          gs[t - t0] = in ? grow[l] : T(0);
          any |= in;
        }
        if (!any) continue;
        for (int64_t j = 0; j < g.rg; ++j) {
          const int64_t jb = (grp * g.rg + j) * ok + o * g.K + tap;
          axpy(acc.data() + j * p.tb, gs.data(), p.B[jb], len);
          if (gB) gB[jb] += dot(gs.data(), p.u + (n * g.r + grp * g.rg + j) * g.T + t0, len);
        }
      }
    }
    if (!gA && !p.gx) continue;
    for (auto& v : acc) v *= p.scaling;
    for (int64_t i = 0; i < g.cin_g; ++i) {
      const int64_t ci = grp * g.cin_g + i;
      if (gA) {
        const T* row = convt_row(p.x, g, p.d, n, ci, t0, t1, buf.data());
        for (int64_t j = 0; j < g.rg; ++j) gA[(grp * g.rg + j) * g.cin_g + i] += dot(acc.data() + j * p.tb, row, len);
      }
      if (p.gx) {
        std::fill(buf.begin(), buf.end(), T(0));
        for (int64_t j = 0; j < g.rg; ++j) axpy(buf.data(), acc.data() + j * p.tb, p.A[(grp * g.rg + j) * g.cin_g + i], len);
        const int64_t base = (n * g.Cin + ci) * g.T;
        T* gxr = p.gx + base;
        for (int64_t t = t0; t < t1; ++t) gxr[t] += p.d.on ? buf[t - t0] * p.d.at(base + t) : buf[t - t0];
      }
    }
  }
}


// --------------------------------------------------------------------------- ConvTranspose1d through BLAS
// u = A·D(x) at the input's rate; g_u = s·Σ_tap Bt_tap·g_tap and grad_B_tap += u·g_tapᵀ, where
// g_tap[o, t] = g[o, t·stride + tap·dil − pad] is gathered per block (a view when stride is 1);
// grad_A += g_u·D(x)ᵀ and the unmerged input gradient's term D(Aᵀ·g_u) stay inside the block.

template <class T>
struct CTFwdB {
  const T* x;
  const T* A;  // (r, cin_g)
  T* u;        // (N, r, T)
  CTGeom g;
  Dropout<T> d;
  int64_t tb, nblk;
};

// D(x) rows of group grp for input time [t0, t1): a view of x without dropout, else masked into buf.
template <class T>
std::pair<const T*, int64_t> convt_x_block(const T* x, const CTGeom& g, const Dropout<T>& d, int64_t n, int64_t grp,
                                           int64_t t0, int64_t t1, int64_t ldb, T* buf) {
  const int64_t row0 = n * g.Cin + grp * g.cin_g;
  if (!d.on) return {x + row0 * g.T + t0, g.T};
  for (int64_t i = 0; i < g.cin_g; ++i) {
    const int64_t base = (row0 + i) * g.T;
    for (int64_t t = t0; t < t1; ++t) buf[i * ldb + t - t0] = x[base + t] * d.at(base + t);
  }
  return {buf, ldb};
}

template <class T>
void convt_fwd_blas(const CTFwdB<T>& p) {
  const CTGeom& g = p.g;
  at::parallel_for(0, g.N * g.G * p.nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(p.d.on ? static_cast<size_t>(g.cin_g * p.tb) : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
      const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.T), len = t1 - t0;
      auto [xv, ldx] = convt_x_block(p.x, g, p.d, n, grp, t0, t1, p.tb, buf.data());
      gemm_rm<T>(false, false, g.rg, len, g.cin_g, T(1), p.A + grp * g.rg * g.cin_g, g.cin_g, xv, ldx, T(0),
                 p.u + (n * g.r + grp * g.rg) * g.T + t0, g.T);
    }
  });
}

template <class T>
struct CTBwdB {
  const T* gy;  // (N, Cout, L)
  const T* x;   // (N, Cin, T)
  const T* u;   // (N, r, T)
  const T* A;   // (r, cin_g)
  const T* Bt;  // (K, r, cout_g)
  T* gx;        // (N, Cin, T) += D(Aᵀ·g_u) when not merged, else null
  Partials<T>* pA;  // (r, cin_g)
  Partials<T>* pB;  // (K, r, cout_g), without the factor s
  T s;
  CTGeom g;
  Dropout<T> d;
  int64_t tb, nblk;
};

template <class T>
void convt_bwd_blas(const CTBwdB<T>& p) {
  const CTGeom& g = p.g;
  at::parallel_for(0, g.N * g.G * p.nblk, 1, [&](int64_t b0, int64_t b1) {
    T* gA = p.pA->mine();
    T* gB = p.pB->mine();
    std::vector<T> gub(static_cast<size_t>(g.rg * p.tb)), gs(static_cast<size_t>(g.cout_g * p.tb));
    std::vector<T> buf(static_cast<size_t>(g.cin_g * p.tb));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
      const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.T), len = t1 - t0;
      const int64_t grow0 = n * g.Cout + grp * g.cout_g;
      std::fill(gub.begin(), gub.end(), T(0));
      for (int64_t tap = 0; tap < g.K; ++tap) {
        const int64_t off = tap * g.dil - g.pad;
        // t·stride + off in [0, L)
        const int64_t lo = std::max(t0, off >= 0 ? 0 : (-off + g.stride - 1) / g.stride);
        const int64_t hi = std::min(t1, g.L - 1 - off < 0 ? 0 : (g.L - 1 - off) / g.stride + 1);
        if (lo >= hi) continue;
        const T* gv;
        int64_t ldg;
        if (g.stride == 1) {
          gv = p.gy + grow0 * g.L + lo + off, ldg = g.L;
        } else {
          for (int64_t o = 0; o < g.cout_g; ++o) {
            const T* row = p.gy + (grow0 + o) * g.L + off;
            T* dst = gs.data() + o * p.tb;
            for (int64_t t = lo; t < hi; ++t) dst[t - lo] = row[t * g.stride];
          }
          gv = gs.data(), ldg = p.tb;
        }
        gemm_rm<T>(false, false, g.rg, hi - lo, g.cout_g, p.s, p.Bt + (tap * g.r + grp * g.rg) * g.cout_g, g.cout_g,
                   gv, ldg, T(1), gub.data() + (lo - t0), p.tb);
        if (gB)
          gemm_rm<T>(false, true, g.rg, g.cout_g, hi - lo, T(1), p.u + (n * g.r + grp * g.rg) * g.T + lo, g.T, gv, ldg,
                     T(1), gB + (tap * g.r + grp * g.rg) * g.cout_g, g.cout_g);
      }
      if (gA) {
        auto [xv, ldx] = convt_x_block(p.x, g, p.d, n, grp, t0, t1, p.tb, buf.data());
        gemm_rm<T>(false, true, g.rg, g.cin_g, len, T(1), gub.data(), p.tb, xv, ldx, T(1), gA + grp * g.rg * g.cin_g,
                   g.cin_g);
      }
      if (p.gx) {
        const int64_t row0 = n * g.Cin + grp * g.cin_g;
        if (!p.d.on) {
          gemm_rm<T>(true, false, g.cin_g, len, g.rg, T(1), p.A + grp * g.rg * g.cin_g, g.cin_g, gub.data(), p.tb, T(1),
                     p.gx + row0 * g.T + t0, g.T);
        } else {
          gemm_rm<T>(true, false, g.cin_g, len, g.rg, T(1), p.A + grp * g.rg * g.cin_g, g.cin_g, gub.data(), p.tb, T(0),
                     buf.data(), p.tb);
          for (int64_t i = 0; i < g.cin_g; ++i) {
            const int64_t base = (row0 + i) * g.T;
            for (int64_t t = t0; t < t1; ++t) p.gx[base + t] += buf[i * p.tb + t - t0] * p.d.at(base + t);
          }
        }
      }
    }
  });
}

// gB (r, cout_g·K) = s · Σ over threads of the tap-major partials (K, r, cout_g).
template <class T>
void reduce_convt_B(const Partials<T>& pB, T* out, const CTGeom& g, T s) {
  for (int64_t tap = 0; tap < g.K; ++tap)
    for (int64_t j = 0; j < g.r; ++j)
      for (int64_t o = 0; o < g.cout_g; ++o) {
        const int64_t src = (tap * g.r + j) * g.cout_g + o;
        T acc = 0;
        for (int64_t t = 0; t < pB.nthreads; ++t) acc += pB.buf[static_cast<size_t>(t * pB.size + src)];
        out[(j * g.cout_g + o) * g.K + tap] = s * acc;
      }
}

int64_t ct_largest(const CTGeom& g) {
  return std::max({g.N * g.Cout * g.L, g.N * g.Cin * g.T, g.Cin * g.cout_g * g.K});
}

// --------------------------------------------------------------------------- ISA dispatch

#define RVC_CLONED(NAME, BODY, ARGS)                                                       \
  template <class T>                                                                       \
  void NAME##_base(const ARGS<T>& p, int64_t b0, int64_t b1) {                             \
    BODY(p, b0, b1);                                                                       \
  }                                                                                        \
  RVC_AVX2_CLONE(NAME, BODY, ARGS)                                                         \
  template <class T>                                                                       \
  void NAME(const ARGS<T>& p, int64_t nblocks) {                                           \
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) { NAME##_pick<T>(p, b0, b1); }); \
  }

#if RVC_HAVE_AVX2_CLONE
#define RVC_AVX2_CLONE(NAME, BODY, ARGS)                                       \
  template <class T>                                                           \
  RVC_TARGET_AVX2 void NAME##_avx2(const ARGS<T>& p, int64_t b0, int64_t b1) { \
    BODY(p, b0, b1);                                                           \
  }                                                                            \
  template <class T>                                                           \
  void NAME##_pick(const ARGS<T>& p, int64_t b0, int64_t b1) {                 \
    if (cpu_has_avx2())                                                        \
      NAME##_avx2<T>(p, b0, b1);                                               \
    else                                                                       \
      NAME##_base<T>(p, b0, b1);                                               \
  }
#else
#define RVC_AVX2_CLONE(NAME, BODY, ARGS)                       \
  template <class T>                                           \
  void NAME##_pick(const ARGS<T>& p, int64_t b0, int64_t b1) { \
    NAME##_base<T>(p, b0, b1);                                 \
  }
#endif

RVC_CLONED(run_conv1d_u, conv1d_u_body, C1Fwd)
RVC_CLONED(run_conv1d_bwd, conv1d_bwd_body, C1Bwd)
RVC_CLONED(run_convt_u, convt_u_body, CTFwd)
RVC_CLONED(run_convt_bwd, convt_bwd_body, CTBwd)

// --------------------------------------------------------------------------- merged weights

// W + s·ΔW for Conv1d: W (Cout, cin_g, K), A (r, cin_g·K), B (Cout, rg).
Tensor merged_conv1d_weight(const Tensor& W, const Tensor& A, const Tensor& B, double s, int64_t G) {
  const int64_t out = W.size(0);
  if (G == 1) return at::addmm(W.reshape({out, -1}), B, A, 1.0, s).view(W.sizes());
  return at::baddbmm(W.reshape({G, out / G, -1}), B.reshape({G, out / G, -1}), A.reshape({G, A.size(0) / G, -1}), 1.0,
                     s)
      .view(W.sizes());
}

// W + s·ΔW for ConvTranspose1d: W (Cin, cout_g, K), A (r, cin_g), B (r, cout_g·K).
Tensor merged_convt_weight(const Tensor& W, const Tensor& A, const Tensor& B, double s, int64_t G) {
  const int64_t cin = W.size(0);
  if (G == 1) return at::addmm(W.reshape({cin, -1}), A.t(), B, 1.0, s).view(W.sizes());
  const int64_t rg = A.size(0) / G;
  return at::baddbmm(W.reshape({G, cin / G, -1}), A.reshape({G, rg, cin / G}).transpose(1, 2),
                     B.reshape({G, rg, -1}), 1.0, s)
      .view(W.sizes());
}

// y (N, Cout, Tout) += s · grouped_1x1(B, u): the LoRA term of the dropout path.
template <class T>
void add_lora_1x1(T* y, const T* u, const T* B, const C1Geom& g, T s) {
  at::parallel_for(0, g.N * g.Cout, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n = row / g.Cout, oc = row % g.Cout, grp = oc / g.cout_g;
      T* yr = y + row * g.Tout;
      for (int64_t j = 0; j < g.rg; ++j)
        axpy(yr, u + (n * g.r + grp * g.rg + j) * g.Tout, s * B[oc * g.rg + j], g.Tout);
    }
  });
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

rvclora_cpu_simd::Dims simd_dims(const C1Geom& g) {
  return {g.N, g.Cin, g.T, g.Cout, g.K, g.r, g.padl, g.dil, g.Tout};
}

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
    // y by the convolution library (merged weight where the weight is no larger than y), u by the
    // SIMD kernel in one sweep over x.
    const bool merged = weight.numel() <= g.N * g.Cout * g.Tout;
    const Tensor w = merged ? merged_conv1d_weight(weight, A, B, scaling, groups) : weight;
    Tensor y = at::convolution(xp, w, bias, {stride}, {cpad}, {dilation}, false, {0}, groups).contiguous();
    Tensor u = at::empty({g.N, g.r, g.Tout}, x.options());
    rvclora_cpu_simd::conv1d_u(xc.const_data_ptr<float>(), A.const_data_ptr<float>(), u.mutable_data_ptr<float>(),
                               simd_dims(g));
    if (!merged) y.baddbmm_(B.unsqueeze(0).expand({g.N, g.Cout, g.r}), u, 1.0, scaling);
    return {y, u};
  }
  // BLAS path: merge only when the weight is no larger than y (merging costs a pass over the
  // weight, the separate LoRA term a pass over y); the loops always merge without dropout.
  const bool blas = blas_for(x, c1_largest(g));
  const bool merged = dropout_p == 0.0 && (!blas || weight.numel() <= g.N * g.Cout * g.Tout);
  const Tensor w = merged ? merged_conv1d_weight(weight, A, B, scaling, groups) : weight;
  Tensor y = at::convolution(xp, w, bias, {stride}, {cpad}, {dilation}, false, {0}, groups).contiguous();
  Tensor u = at::empty({g.N, g.r, g.Tout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rvclora_cpu_conv1d_fwd", [&] {
    if (blas) {
      const Tensor At = A.view({g.r, g.cin_g, g.K}).permute({2, 0, 1}).contiguous();
      C1FwdB<scalar_t> p{xc.const_data_ptr<scalar_t>(), At.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(),
                         merged ? nullptr : y.mutable_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
                         static_cast<scalar_t>(scaling), g, make_dropout<scalar_t>(seed, dropout_p),
                         conv1d_views(g) && dropout_p == 0.0, 0, 0};
      p.tb = blas_block_len(g.Tout, g.N * g.G, std::max(g.cin_g, g.cout_g));
      p.nblk = (g.Tout + p.tb - 1) / p.tb;
      conv1d_fwd_blas<scalar_t>(p);
      return;
    }
    C1Fwd<scalar_t> p{xc.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(),
                      g, make_dropout<scalar_t>(seed, dropout_p), 0, 0};
    p.tb = block_len(g.Tout, g.N * g.G);
    p.nblk = (g.Tout + p.tb - 1) / p.tb;
    run_conv1d_u<scalar_t>(p, g.N * g.G * p.nblk);
    if (!merged)
      add_lora_1x1<scalar_t>(y.mutable_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                             B.const_data_ptr<scalar_t>(), g, static_cast<scalar_t>(scaling));
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
  // weight is larger than x (merging costs a pass over the weight) and the taps are views; the
  // loops always merge without dropout.
  const bool simd = simd_conv1d(x, g, dropout_p);
  const bool blas = blas_for(x, c1_largest(g));
  const bool merged = dropout_p == 0.0 && ((!simd && !blas) || !conv1d_views(g) || weight.numel() <= x.numel());
  Tensor gx = empty0(x), gw = empty0(x), gbias = empty0(x), gA_ = empty0(x), gB_ = empty0(x);
  if (need_x || need_w || need_b) {
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
    Tensor gu = lora_x ? at::empty({g.N, g.r, g.Tout}, x.options()) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rvclora_cpu_conv1d_bwd", [&] {
      if (blas) {
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
        return;
      }
      Partials<scalar_t> pA(g.r * g.cin_g * g.K, need_A), pB(g.Cout * g.rg, need_B);
      const Dropout<scalar_t> d = make_dropout<scalar_t>(seed, dropout_p);
      C1Bwd<scalar_t> p{gy.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                        A.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
                        lora_x ? gu.mutable_data_ptr<scalar_t>() : nullptr, &pA, &pB,
                        static_cast<scalar_t>(scaling), g, d, 0, 0};
      p.tb = block_len(g.Tout, g.N * g.G);
      p.nblk = (g.Tout + p.tb - 1) / p.tb;
      run_conv1d_bwd<scalar_t>(p, g.N * g.G * p.nblk);
      if (need_A) {
        gA_ = at::empty({g.r, g.cin_g * g.K}, x.options());
        pA.reduce_into(gA_.mutable_data_ptr<scalar_t>(), scalar_t(1));
      }
      if (need_B) {
        gB_ = at::empty({g.Cout, g.rg}, x.options());
        pB.reduce_into(gB_.mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(scaling));
      }
      if (lora_x)
        add_conv1d_lora_grad_x<scalar_t>(gx.mutable_data_ptr<scalar_t>(), gu.const_data_ptr<scalar_t>(),
                                         A.const_data_ptr<scalar_t>(), g, d);
    });
  }
  if (need_x) gx = grad_input_layout(gx, x, false);
  if (need_A) gA_ = like_input(gA_, lora_A);
  if (need_B) gB_ = like_input(gB_, lora_B);
  return {gx, gw, gbias, gA_, gB_};
}

// --------------------------------------------------------------------------- ConvTranspose1d ops

// The hand-vectorised passes (csrc/lora_cpu_simd.cpp) run float32 calls with groups 1 and no dropout, on a
// CPU with AVX2+FMA or AVX-512: u = A·x is the Conv1d u pass with one tap, the backward's g_u, grad_A
// and grad_B run on g split by phase (t mod stride), and the unmerged input gradient's term Aᵀ·g_u is the
// Conv1d one with one tap.
bool simd_convt(const Tensor& x, const CTGeom& g, double dropout_p) {
  return x.scalar_type() == at::kFloat && dropout_p == 0.0 && g.G == 1 && rvclora_cpu_simd::isa() > 0 &&
         g.N * g.T > 0;
}

rvclora_cpu_simd::TDims simd_tdims(const CTGeom& g) {
  return {g.N, g.Cin, g.T, g.Cout, g.K, g.r, g.stride, g.pad, g.dil, g.L};
}

// u = A·x (and grad_x += Aᵀ·g_u) as a Conv1d with one tap over the input's time.
rvclora_cpu_simd::Dims simd_pointwise(const CTGeom& g) { return {g.N, g.Cin, g.T, g.r, 1, g.r, 0, 1, g.T}; }

// Merging costs a pass over the weight (in·out/g·k) per call; when the weight dwarfs the input
// (RVC's first upsampler: 32 frames, a 512×256×16 weight) the separate LoRA term is cheaper.
bool convt_merge_pays(const Tensor& x, const Tensor& weight) { return weight.numel() <= x.numel() * weight.size(2); }

// y (N, Cout, L) += s·Σ_{j,k} B[j, o·K + k]·u[j, t] at l = t·stride + k·dil − pad (groups 1).
void y_add_convt_lora(Tensor& y, const Tensor& u, const Tensor& B, const CTGeom& g, double s) {
  const Tensor cols = at::matmul(B.t(), u).contiguous();  // (N, Cout·K, T)
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rvclora_cpu_convt_col2im", [&] {
    const scalar_t* c = cols.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(s);
    at::parallel_for(0, g.N * g.Cout, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        scalar_t* yr = yp + row * g.L;
        const int64_t n = row / g.Cout, o = row % g.Cout;
        for (int64_t k = 0; k < g.K; ++k) {
          const scalar_t* cr = c + ((n * g.Cout + o) * g.K + k) * g.T;
          const int64_t off = k * g.dil - g.pad;
          // t with 0 ≤ t·stride + off < L
          const int64_t lo = off >= 0 ? 0 : (-off + g.stride - 1) / g.stride;
          const int64_t hi = g.L - 1 - off < 0 ? 0 : std::min(g.T, (g.L - 1 - off) / g.stride + 1);
          for (int64_t t = lo; t < hi; ++t) yr[t * g.stride + off] += sc * cr[t];
        }
      }
    });
  });
}

std::tuple<Tensor, Tensor> convt_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                     const Tensor& lora_A, const Tensor& lora_B, double scaling, int64_t stride,
                                     int64_t padding, int64_t output_padding, int64_t dilation, int64_t groups,
                                     double dropout_p, const std::optional<Tensor>& seed) {
  check_common(x, weight, lora_A, lora_B);
  const CTGeom g = convt_geom(x, weight, lora_A, lora_B, stride, padding, output_padding, dilation, groups);
  const Tensor A = factor(lora_A, x), B = factor(lora_B, x);
  const Tensor xc = x.contiguous();
  Tensor u = at::empty({g.N, g.r, g.T}, x.options());
  const bool blas = blas_for(x, ct_largest(g));
  const bool simd = simd_convt(x, g, dropout_p);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rvclora_cpu_convt_fwd", [&] {
    if (simd) {
      rvclora_cpu_simd::conv1d_u(xc.const_data_ptr<float>(), A.const_data_ptr<float>(), u.mutable_data_ptr<float>(),
                                 simd_pointwise(g));
      return;
    }
    if (blas) {
      CTFwdB<scalar_t> p{xc.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), g,
                         make_dropout<scalar_t>(seed, dropout_p), 0, 0};
      p.tb = blas_block_len(g.T, g.N * g.G, g.cin_g);
      p.nblk = (g.T + p.tb - 1) / p.tb;
      convt_fwd_blas<scalar_t>(p);
      return;
    }
    CTFwd<scalar_t> p{xc.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), g,
                      make_dropout<scalar_t>(seed, dropout_p), 0, 0};
    p.tb = block_len(g.T, g.N * g.G);
    p.nblk = (g.T + p.tb - 1) / p.tb;
    run_convt_u<scalar_t>(p, g.N * g.G * p.nblk);
  });
  const bool merged = dropout_p == 0.0 && convt_merge_pays(x, weight);
  const Tensor w = merged ? merged_convt_weight(weight, A, B, scaling, groups) : weight;
  Tensor y = at::convolution(xc, w, bias, {stride}, {padding}, {dilation}, true, {output_padding}, groups).contiguous();
  if (!merged && groups == 1) {
    // y += s·col2im(Bᵀ·u): one GEMM per sample (K·C_out × r × T), then every column is added at its output
    // position; the library's transposed convolution with r input channels ran this at a fraction of the speed
    y_add_convt_lora(y, u, B, g, scaling);
  } else if (!merged) {
    const Tensor lora = at::convolution(u, B.view({g.r, g.cout_g, g.K}), std::nullopt, {stride}, {padding},
                                        {dilation}, true, {output_padding}, groups);
    y.add_(lora, scaling);
  }
  return {y, u};
}

Grads5 convt_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& lora_A,
                 const Tensor& lora_B, double scaling, int64_t stride, int64_t padding, int64_t output_padding,
                 int64_t dilation, int64_t groups, double dropout_p, const std::optional<Tensor>& seed,
                 std::array<bool, 5> needs) {
  check_common(x, weight, lora_A, lora_B);
  const CTGeom g = convt_geom(x, weight, lora_A, lora_B, stride, padding, output_padding, dilation, groups);
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_A = needs[3], need_B = needs[4];
  const Tensor A = factor(lora_A, x), B = factor(lora_B, x);
  const Tensor xc = x.contiguous(), gy = grad_y.to(x.scalar_type()).contiguous(), uc = u.contiguous();
  TORCH_CHECK(gy.sizes() == at::IntArrayRef({g.N, g.Cout, g.L}), "rvclora cpu: grad_y must be ",
              at::IntArrayRef({g.N, g.Cout, g.L}), ", got ", grad_y.sizes());
  const bool merged = dropout_p == 0.0 && convt_merge_pays(x, weight);
  Tensor gx = empty0(x), gw = empty0(x), gbias = empty0(x), gA_ = empty0(x), gB_ = empty0(x);
  if (need_x || need_w || need_b) {
    const Tensor w = merged ? merged_convt_weight(weight, A, B, scaling, groups) : weight;
    std::optional<at::IntArrayRef> bias_sizes;
    const std::vector<int64_t> bsz{g.Cout};
    if (need_b) bias_sizes = at::IntArrayRef(bsz);
    auto [gx_, gw_, gbias_] = at::convolution_backward(gy, xc, w, bias_sizes, {stride}, {padding}, {dilation}, true,
                                                    {output_padding}, groups, {need_x, need_w, need_b});
    if (need_x) gx = gx_.contiguous();
    if (need_w) gw = like_input(gw_, weight);
    if (need_b) gbias = gbias_;
  }
  const bool lora_x = need_x && !merged;
  if (simd_convt(x, g, dropout_p) && (need_A || need_B || lora_x)) {
    if (need_A) gA_ = at::empty({g.r, g.cin_g}, x.options());
    if (need_B) gB_ = at::empty({g.r, g.cout_g * g.K}, x.options());
    Tensor gu = lora_x ? at::empty({g.N, g.r, g.T}, x.options()) : Tensor();
    rvclora_cpu_simd::convt_bwd(gy.const_data_ptr<float>(), xc.const_data_ptr<float>(), uc.const_data_ptr<float>(),
                                B.const_data_ptr<float>(), static_cast<float>(scaling),
                                need_A ? gA_.mutable_data_ptr<float>() : nullptr,
                                need_B ? gB_.mutable_data_ptr<float>() : nullptr,
                                lora_x ? gu.mutable_data_ptr<float>() : nullptr, simd_tdims(g));
    if (lora_x)
      rvclora_cpu_simd::conv1d_grad_x(gu.const_data_ptr<float>(), A.const_data_ptr<float>(),
                                      gx.mutable_data_ptr<float>(), simd_pointwise(g));
  } else if (need_A || need_B || lora_x) {
    const bool blas = blas_for(x, ct_largest(g));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rvclora_cpu_convt_bwd", [&] {
      if (blas) {
        const Tensor Bt = B.view({g.r, g.cout_g, g.K}).permute({2, 0, 1}).contiguous();
        Partials<scalar_t> pA(g.r * g.cin_g, need_A), pB(g.K * g.r * g.cout_g, need_B);
        CTBwdB<scalar_t> p{gy.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                           A.const_data_ptr<scalar_t>(), Bt.const_data_ptr<scalar_t>(),
                           lora_x ? gx.mutable_data_ptr<scalar_t>() : nullptr, &pA, &pB,
                           static_cast<scalar_t>(scaling), g, make_dropout<scalar_t>(seed, dropout_p), 0, 0};
        // a block holds g's gathered taps (C_out/groups rows, stride× the input block's span)
        p.tb = blas_block_len(g.T, g.N * g.G, std::max(g.cin_g, g.cout_g * g.stride));
        p.nblk = (g.T + p.tb - 1) / p.tb;
        convt_bwd_blas<scalar_t>(p);
        if (need_A) {
          gA_ = at::empty({g.r, g.cin_g}, x.options());
          pA.reduce_into(gA_.mutable_data_ptr<scalar_t>(), scalar_t(1));
        }
        if (need_B) {
          gB_ = at::empty({g.r, g.cout_g * g.K}, x.options());
          reduce_convt_B(pB, gB_.mutable_data_ptr<scalar_t>(), g, static_cast<scalar_t>(scaling));
        }
        return;
      }
      Partials<scalar_t> pA(g.r * g.cin_g, need_A), pB(g.r * g.cout_g * g.K, need_B);
      CTBwd<scalar_t> p{gy.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                        A.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
                        lora_x ? gx.mutable_data_ptr<scalar_t>() : nullptr, &pA, &pB,
                        static_cast<scalar_t>(scaling), g, make_dropout<scalar_t>(seed, dropout_p), 0, 0};
      p.tb = block_len(g.T, g.N * g.G);
      p.nblk = (g.T + p.tb - 1) / p.tb;
      run_convt_bwd<scalar_t>(p, g.N * g.G * p.nblk);
      if (need_A) {
        gA_ = at::empty({g.r, g.cin_g}, x.options());
        pA.reduce_into(gA_.mutable_data_ptr<scalar_t>(), scalar_t(1));
      }
      if (need_B) {
        gB_ = at::empty({g.r, g.cout_g * g.K}, x.options());
        pB.reduce_into(gB_.mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(scaling));
      }
    });
  }
  if (need_x) gx = grad_input_layout(gx, x, false);
  if (need_A) gA_ = like_input(gA_, lora_A);
  if (need_B) gB_ = like_input(gB_, lora_B);
  return {gx, gw, gbias, gA_, gB_};
}

// --------------------------------------------------------------------------- Linear ops
// Every LoRA pass of a Linear is a plain (thin) GEMM already; the gain here is one op call
// per layer and direction and the merged weight.

Tensor masked(const Tensor& x2, const std::optional<Tensor>& seed, double p) {
  Tensor out = at::empty_like(x2, at::MemoryFormat::Contiguous);
  const Tensor xc = x2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "rvclora_cpu_mask", [&] {
    const Dropout<scalar_t> d = make_dropout<scalar_t>(seed, p);
    const scalar_t* xi = xc.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = xi[i] * d.at(i);
    });
  });
  return out;
}

void check_linear(const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2, "rvclora cpu: linear needs x (..., in) and weight (out, in)");
  const int64_t in = x.size(-1), out = weight.size(0), r = A.size(0);
  TORCH_CHECK(weight.size(1) == in, "rvclora cpu: weight must be (out, ", in, "), got ", weight.sizes());
  TORCH_CHECK(A.size(1) == in && B.size(0) == out && B.size(1) == r, "rvclora cpu: lora_A must be (r, ", in,
              ") and lora_B (", out, ", r), got ", A.sizes(), " and ", B.sizes());
}

std::tuple<Tensor, Tensor> linear_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                      const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                                      const std::optional<Tensor>& seed) {
  check_common(x, weight, lora_A, lora_B);
  check_linear(x, weight, lora_A, lora_B);
  const Tensor A = factor(lora_A, x), B = factor(lora_B, x);
  const Tensor x2 = x.reshape({-1, x.size(-1)});
  std::vector<int64_t> ysize(x.sizes().begin(), x.sizes().end());
  ysize.back() = weight.size(0);
  Tensor y, u;
  if (dropout_p == 0.0) {
    const Tensor w = at::addmm(weight, B, A, 1.0, scaling);
    y = bias.has_value() && bias->defined() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    u = at::mm(x2, A.t());
  } else {
    u = at::mm(masked(x2, seed, dropout_p), A.t());
    y = bias.has_value() && bias->defined() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    y.addmm_(u, B.t(), 1.0, scaling);
  }
  return {y.view(ysize), u};
}

Grads5 linear_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B, double scaling, double dropout_p, const std::optional<Tensor>& seed,
                  std::array<bool, 5> needs) {
  check_common(x, weight, lora_A, lora_B);
  check_linear(x, weight, lora_A, lora_B);
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_A = needs[3], need_B = needs[4];
  const Tensor A = factor(lora_A, x), B = factor(lora_B, x);
  const Tensor x2 = x.reshape({-1, x.size(-1)});
  const Tensor g2 = grad_y.to(x.scalar_type()).reshape({-1, weight.size(0)});
  Tensor gx = empty0(x), gw = empty0(x), gbias = empty0(x), gA_ = empty0(x), gB_ = empty0(x);
  const bool merged = dropout_p == 0.0;
  Tensor gu;
  if (need_A || (need_x && !merged)) gu = at::mm(g2, B).mul_(scaling);
  if (need_x) {
    Tensor gx2;
    if (merged) {
      gx2 = at::mm(g2, at::addmm(weight, B, A, 1.0, scaling));
    } else {
      gx2 = at::mm(g2, weight);
      gx2.add_(masked(at::mm(gu, A), seed, dropout_p));
    }
    gx = grad_input_layout(gx2.view(x.sizes()), x, true);
  }
  if (need_w) gw = like_input(at::mm(g2.t(), x2), weight);
  if (need_b) gbias = g2.sum(0);
  if (need_A) gA_ = like_input(at::mm(gu.t(), merged ? x2 : masked(x2, seed, dropout_p)), lora_A);
  if (need_B) gB_ = like_input(at::mm(g2.t(), u.to(x.scalar_type())).mul_(scaling), lora_B);
  return {gx, gw, gbias, gA_, gB_};
}

// What runs the thin passes here (shown by `rvclora info`).
std::string cpu_info_blas();

// How many threads an at::parallel_for of this extension runs on. at::parallel_for is a header
// template: built without -fopenmp its `#pragma omp parallel` is ignored and every parallel pass
// of this file runs on one thread (rvclora/ops/extension.py, openmp_flags).
int64_t cpu_parallel_threads() {
  const int64_t n = std::max<int64_t>(1, at::get_num_threads());
  std::vector<char> seen(static_cast<size_t>(n), 0);
  at::parallel_for(0, 64 * n, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    if (tid >= 0 && tid < n) seen[static_cast<size_t>(tid)] = 1;  // distinct slots: no race on one byte
  });
  return std::count(seen.begin(), seen.end(), 1);
}

std::string cpu_info() {
  const std::string simd = rvclora_cpu_simd::isa() > 0
                               ? std::string("Conv1d and ConvTranspose1d float32 thin passes: ") + rvclora_cpu_simd::isa_name() +
                                     " kernels; other "
                               : std::string("");
  const int64_t threads = cpu_parallel_threads();
  return simd + cpu_info_blas() + "; parallel passes on " + std::to_string(threads) + " thread" +
         (threads == 1 ? "" : "s");
}

std::string cpu_info_blas() {
  if (blas_switched_off()) return "thin LoRA passes: hand-written loops (RVCLORA_CPU_BLAS=0)";
  if (!blas_present<float>() || !blas_present<double>())
    return "thin LoRA passes: hand-written loops (this torch exports no sgemm_/dgemm_)";
  if (!blas_agrees<float>() || !blas_agrees<double>())
    return "thin LoRA passes: hand-written loops (torch's sgemm_/dgemm_ failed rvclora's calling-convention check)";
  return "thin LoRA passes: BLAS (torch's sgemm_/dgemm_)";
}

// --------------------------------------------------------------------------- dropout mask op

Tensor dropout_mask(const Tensor& like, const Tensor& seed, double p) {
  TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble,
              "rvclora cpu: dropout_mask dtype must be float32 or float64, got ", like.scalar_type());
  Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "rvclora_cpu_dropout_mask", [&] {
    const Dropout<scalar_t> d = make_dropout<scalar_t>(seed, p);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = d.on ? d.at(i) : scalar_t(1);
    });
  });
  return out;
}

}  // namespace

// FRAGMENT: the same `rvclora` namespace holds the ConvTranspose1d kernels of lora_convt_cpu.cpp.

// --------------------------------------------------------------------------- eager autograd in C++
// rvclora::cpu_lora_<op>(<the forward's arguments>) -> y: one op call per layer and step, whose Autograd
// kernel is a C++ autograd Function over the bodies above. It saves what the Python glue saved
// (x, u, weight, lora_A, lora_B, seed) and its backward is the _bwd op's body, so an eager training step
// runs no Python per layer beyond the call itself. Under torch.compile the _fwd/_bwd ops run instead
// (rvclora/ops/autograd.py), each an opaque node of the graph.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// needs for (x, weight, bias, lora_A, lora_B) from the node's input edges (an absent bias has none).
std::array<bool, 5> needs_of(AutogradContext* ctx, bool has_bias) {
  const size_t b = has_bias ? 1 : 0;
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2),
          ctx->needs_input_grad(2 + b), ctx->needs_input_grad(3 + b)};
}

void save_common(AutogradContext* ctx, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& A,
                 const Tensor& B, const std::optional<Tensor>& bias, const std::optional<Tensor>& seed, double s,
                 double p) {
  ctx->save_for_backward({x, u, weight, A, B, seed.has_value() ? *seed : Tensor()});
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->saved_data["scaling"] = s;
  ctx->saved_data["dropout_p"] = p;
}

std::optional<Tensor> saved_seed(const variable_list& saved) {
  return saved[5].defined() ? std::optional<Tensor>(saved[5]) : std::nullopt;
}

// The gradients in forward-argument order: the five tensors' (undefined where not needed), then none.
variable_list grads_out(const Grads5& g, const std::array<bool, 5>& needs, size_t nargs) {
  variable_list out(nargs);
  const Tensor* all[5] = {&std::get<0>(g), &std::get<1>(g), &std::get<2>(g), &std::get<3>(g), &std::get<4>(g)};
  for (size_t i = 0; i < 5; ++i)
    if (needs[i]) out[i] = *all[i];
  return out;
}

bool any_of5(const std::array<bool, 5>& n) { return n[0] || n[1] || n[2] || n[3] || n[4]; }

struct LinearFn : public torch::autograd::Function<LinearFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                        const Tensor& A, const Tensor& B, double s, double p, const std::optional<Tensor>& seed) {
    auto [y, u] = linear_fwd(x, weight, bias, A, B, s, p, seed);
    save_common(ctx, x, u, weight, A, B, bias, seed, s, p);
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto needs = needs_of(ctx, ctx->saved_data["has_bias"].toBool());
    if (!any_of5(needs)) return variable_list(8);
    const auto sv = ctx->get_saved_variables();
    return grads_out(linear_bwd(grads[0], sv[0], sv[1], sv[2], sv[3], sv[4], ctx->saved_data["scaling"].toDouble(),
                                ctx->saved_data["dropout_p"].toDouble(), saved_seed(sv), needs),
                     needs, 8);
  }
};

struct Conv1dFn : public torch::autograd::Function<Conv1dFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                        const Tensor& A, const Tensor& B, double s, int64_t stride, at::IntArrayRef padding,
                        int64_t dilation, int64_t groups, c10::string_view mode, double p,
                        const std::optional<Tensor>& seed) {
    auto [y, u] = conv1d_fwd(x, weight, bias, A, B, s, stride, padding, dilation, groups, mode, p, seed);
    save_common(ctx, x, u, weight, A, B, bias, seed, s, p);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["mode"] = std::string(mode);
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto needs = needs_of(ctx, ctx->saved_data["has_bias"].toBool());
    if (!any_of5(needs)) return variable_list(13);
    const auto sv = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const std::vector<int64_t> padding = d["padding"].toIntVector();
    return grads_out(conv1d_bwd(grads[0], sv[0], sv[1], sv[2], sv[3], sv[4], d["scaling"].toDouble(),
                                d["stride"].toInt(), padding, d["dilation"].toInt(), d["groups"].toInt(),
                                d["mode"].toStringRef(), d["dropout_p"].toDouble(), saved_seed(sv), needs),
                     needs, 13);
  }
};

struct ConvTFn : public torch::autograd::Function<ConvTFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                        const Tensor& A, const Tensor& B, double s, int64_t stride, int64_t padding,
                        int64_t output_padding, int64_t dilation, int64_t groups, double p,
                        const std::optional<Tensor>& seed) {
    auto [y, u] = convt_fwd(x, weight, bias, A, B, s, stride, padding, output_padding, dilation, groups, p, seed);
    save_common(ctx, x, u, weight, A, B, bias, seed, s, p);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["output_padding"] = output_padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto needs = needs_of(ctx, ctx->saved_data["has_bias"].toBool());
    if (!any_of5(needs)) return variable_list(13);
    const auto sv = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    return grads_out(convt_bwd(grads[0], sv[0], sv[1], sv[2], sv[3], sv[4], d["scaling"].toDouble(),
                               d["stride"].toInt(), d["padding"].toInt(), d["output_padding"].toInt(),
                               d["dilation"].toInt(), d["groups"].toInt(), d["dropout_p"].toDouble(), saved_seed(sv),
                               needs),
                     needs, 13);
  }
};

Tensor linear_eager(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A,
                    const Tensor& B, double s, double p, const std::optional<Tensor>& seed) {
  return LinearFn::apply(x, weight, bias, A, B, s, p, seed);
}

Tensor conv1d_eager(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A,
                    const Tensor& B, double s, int64_t stride, at::IntArrayRef padding, int64_t dilation, int64_t groups,
                    c10::string_view mode, double p, const std::optional<Tensor>& seed) {
  return Conv1dFn::apply(x, weight, bias, A, B, s, stride, padding, dilation, groups, mode, p, seed);
}

Tensor convt_eager(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A,
                   const Tensor& B, double s, int64_t stride, int64_t padding, int64_t output_padding, int64_t dilation,
                   int64_t groups, double p, const std::optional<Tensor>& seed) {
  return ConvTFn::apply(x, weight, bias, A, B, s, stride, padding, output_padding, dilation, groups, p, seed);
}

// Below autograd (inference mode, or a caller that already is): the forward alone.
Tensor linear_y(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A,
                const Tensor& B, double s, double p, const std::optional<Tensor>& seed) {
  return std::get<0>(linear_fwd(x, weight, bias, A, B, s, p, seed));
}

Tensor conv1d_y(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A,
                const Tensor& B, double s, int64_t stride, at::IntArrayRef padding, int64_t dilation, int64_t groups,
                c10::string_view mode, double p, const std::optional<Tensor>& seed) {
  return std::get<0>(conv1d_fwd(x, weight, bias, A, B, s, stride, padding, dilation, groups, mode, p, seed));
}

Tensor convt_y(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A,
               const Tensor& B, double s, int64_t stride, int64_t padding, int64_t output_padding, int64_t dilation,
               int64_t groups, double p, const std::optional<Tensor>& seed) {
  return std::get<0>(convt_fwd(x, weight, bias, A, B, s, stride, padding, output_padding, dilation, groups, p, seed));
}

TORCH_LIBRARY_FRAGMENT(rvclora, m) {
  m.def(
      "cpu_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "cpu_lora_linear_bwd(Tensor grad_y, Tensor x, Tensor u, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, Tensor? seed, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpu_lora_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "int stride, int[2] padding, int dilation, int groups, str padding_mode, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor)");
  m.def(
      "cpu_lora_conv1d_bwd(Tensor grad_y, Tensor x, Tensor u, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scaling, int stride, int[2] padding, int dilation, int groups, str padding_mode, float dropout_p, "
      "Tensor? seed, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpu_lora_conv_transpose1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "int stride, int padding, int output_padding, int dilation, int groups, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor)");
  m.def(
      "cpu_lora_conv_transpose1d_bwd(Tensor grad_y, Tensor x, Tensor u, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scaling, int stride, int padding, int output_padding, int dilation, int groups, float dropout_p, "
      "Tensor? seed, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the eager ops: the forwards' arguments, y out, autograd in C++ (see above)
  m.def(
      "cpu_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor? seed) -> Tensor");
  m.def(
      "cpu_lora_conv1d(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "int stride, int[2] padding, int dilation, int groups, str padding_mode, float dropout_p, Tensor? seed) "
      "-> Tensor");
  m.def(
      "cpu_lora_conv_transpose1d(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "int stride, int padding, int output_padding, int dilation, int groups, float dropout_p, Tensor? seed) "
      "-> Tensor");
  m.def("cpu_dropout_mask(Tensor like, Tensor seed, float dropout_p) -> Tensor");
  m.def("cpu_info() -> str");
  m.def("cpu_parallel_threads() -> int");
}

TORCH_LIBRARY_IMPL(rvclora, CPU, m) {
  m.impl("cpu_lora_linear_fwd", &linear_fwd);
  m.impl("cpu_lora_linear_bwd", &linear_bwd);
  m.impl("cpu_lora_conv1d_fwd", &conv1d_fwd);
  m.impl("cpu_lora_conv1d_bwd", &conv1d_bwd);
  m.impl("cpu_lora_conv_transpose1d_fwd", &convt_fwd);
  m.impl("cpu_lora_conv_transpose1d_bwd", &convt_bwd);
  m.impl("cpu_dropout_mask", &dropout_mask);
  m.impl("cpu_lora_linear", &linear_y);
  m.impl("cpu_lora_conv1d", &conv1d_y);
  m.impl("cpu_lora_conv_transpose1d", &convt_y);
}

TORCH_LIBRARY_IMPL(rvclora, Autograd, m) {
  m.impl("cpu_lora_linear", &linear_eager);
  m.impl("cpu_lora_conv1d", &conv1d_eager);
  m.impl("cpu_lora_conv_transpose1d", &convt_eager);
}

// No tensor arguments: registered for every backend (CompositeExplicitAutograd would need one).
TORCH_LIBRARY_IMPL(rvclora, CatchAll, m) {
  m.impl("cpu_info", &cpu_info);
  m.impl("cpu_parallel_threads", &cpu_parallel_threads);
}

}  // namespace rvclora_cpu
