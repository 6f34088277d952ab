// Shared by the `cpu` backend's op files (lora_cpu_linear.cpp, lora_cpu_conv1d.cpp,
// lora_cpu_convt.cpp) and its registration (lora_cpu.cpp): dropout, argument checks and layouts,
// per-thread partial sums and the BLAS calls. What runs where is described in lora_cpu.cpp.
#pragma once

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

using at::Tensor;
using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

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

inline int64_t seed_of(const std::optional<Tensor>& seed, double p) {
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

inline void check_common(const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B) {
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
inline Tensor factor(const Tensor& t, const Tensor& x) { return t.to(x.scalar_type()).contiguous(); }

// A gradient in the layout (and dtype) of the tensor it belongs to.
inline Tensor like_input(Tensor g, const Tensor& input) {
  if (g.scalar_type() != input.scalar_type()) g = g.to(input.scalar_type());
  Tensor out = at::empty_like(input);
  if (out.strides() == g.strides()) return g;
  out.copy_(g);
  return out;
}

inline Tensor empty0(const Tensor& x) { return at::empty({0}, x.options()); }

// grad_x in the layout the base layer's autograd gives it: contiguous, except for a transposed 2-D
// Linear input (x.t() of a contiguous matrix), whose gradient nn.Linear returns transposed too.
inline bool transposed_2d(const Tensor& x) {
  return x.dim() == 2 && x.size(0) > 1 && x.size(1) > 1 && x.stride(0) == 1 && x.stride(1) == x.size(0);
}

inline Tensor grad_input_layout(Tensor g, const Tensor& x, bool linear) {
  if (g.scalar_type() != x.scalar_type()) g = g.to(x.scalar_type());
  if (linear && transposed_2d(x)) {
    if (g.strides() == x.strides()) return g;
    Tensor out = at::empty({x.size(1), x.size(0)}, g.options()).t();
    out.copy_(g);
    return out;
  }
  return g.contiguous();
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
// BLAS leaves them null, and the cpu backend is then unavailable.
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
inline bool blas_present<float>() { return sgemm_ != nullptr; }
template <>
inline bool blas_present<double>() { return dgemm_ != nullptr; }

template <class T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc);

// The symbol's calling convention is assumed (Fortran BLAS, 32-bit ints): checked once on a small
// product (lora_cpu.cpp); RVCLORA_CPU_BLAS=0 switches BLAS off. Without an agreeing BLAS the cpu
// backend is unavailable (cpu_blas_ok).
template <class T>
bool blas_agrees();
bool blas_switched_off();

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

// Block length: rows × length near RVCLORA_CPU_BLOCK elements (lora_cpu.cpp).
int64_t blas_block_len(int64_t T, int64_t outer, int64_t rows);

inline bool blas_for(const Tensor& x, int64_t largest) {
  return x.scalar_type() == at::kFloat ? use_blas<float>(largest) : use_blas<double>(largest);
}

// The thin passes need BLAS: a call that reaches them without it (the backend reports itself
// unavailable then, so only a direct op call can) or with a dimension past BLAS's 32-bit ints fails.
inline void check_blas(const Tensor& x, int64_t largest) {
  TORCH_CHECK(blas_for(x, largest), "rvclora cpu: the thin LoRA passes need torch's BLAS (sgemm_/dgemm_, ",
              "switched on) and tensors below 2^31 elements, got one of ", largest, " elements; use the torch backend");
}

}  // namespace rvclora_cpu
