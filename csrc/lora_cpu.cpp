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
//   kept per thread and reduced once. Where this torch exports no usable BLAS symbol (or
//   RVCLORA_CPU_BLAS=0) the backend is unavailable (cpu_blas_ok) and `auto` picks another.
// * float32 Conv1d/ConvTranspose1d calls with groups 1 and no dropout run hand-vectorised thin
//   passes instead on an AVX2+FMA or AVX-512 CPU (lora_cpu_simd.cpp).
// * Dropout masks are a counter-based hash of (seed, element index of x), regenerated in
//   backward; nothing mask-sized is ever stored.
//
// Files: lora_cpu_common.h (shared helpers, BLAS), lora_cpu_ops.h (the op bodies' declarations),
// lora_cpu_linear.cpp, lora_cpu_conv1d.cpp, lora_cpu_convt.cpp (one op each), and this file: the
// BLAS check, `rvclora info`'s text, the dropout-mask op, the C++ autograd Functions and the
// registration. The fake kernels are registered from Python (rvclora/ops/backends/cpu.py).

#include "lora_cpu_ops.h"
#include "lora_cpu_simd.h"

namespace rvclora_cpu {

// --------------------------------------------------------------------------- BLAS check and block length

// The symbol's calling convention is assumed (Fortran BLAS, 32-bit ints): check it once on a small
// product with transposes and leading dimensions before trusting it; a BLAS that disagrees (an ILP64
// build, say) leaves the cpu backend unavailable and `rvclora info` says so.
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

// RVCLORA_CPU_BLAS=0 switches BLAS off, and with it the cpu backend (cpu_blas_ok).
bool blas_switched_off() {
  static const bool off = [] {
    const char* v = std::getenv("RVCLORA_CPU_BLAS");
    return v != nullptr && std::string(v) == "0";
  }();
  return off;
}

template bool blas_agrees<float>();
template bool blas_agrees<double>();

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

// Whether the thin passes can run at all: the BLAS symbols are there, switched on and agree with
// blas_agrees' check. Without them the cpu backend is unavailable (rvclora/ops/backends/cpu.py).
bool cpu_blas_ok() {
  return !blas_switched_off() && blas_agrees<float>() && blas_agrees<double>();
}

namespace {

// What runs the thin passes here (shown by `rvclora info`).
std::string cpu_info_blas();

// How many threads an at::parallel_for of this extension runs on. at::parallel_for is a header
// template: built without -fopenmp its `#pragma omp parallel` is ignored and every parallel pass
// of this extension runs on one thread (rvclora/ops/extension.py, openmp_flags).
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
  if (!cpu_blas_ok()) return cpu_info_blas();  // the backend is unavailable: why
  const std::string simd = rvclora_cpu_simd::isa() > 0
                               ? std::string("Conv1d and ConvTranspose1d float32 thin passes: ") + rvclora_cpu_simd::isa_name() +
                                     " kernels; other "
                               : std::string("");
  const int64_t threads = cpu_parallel_threads();
  return simd + cpu_info_blas() + "; parallel passes on " + std::to_string(threads) + " thread" +
         (threads == 1 ? "" : "s");
}

std::string cpu_info_blas() {
  if (blas_switched_off()) return "no usable BLAS for the thin LoRA passes: RVCLORA_CPU_BLAS=0 switches it off";
  if (!blas_present<float>() || !blas_present<double>())
    return "no usable BLAS for the thin LoRA passes: this torch exports no sgemm_/dgemm_";
  if (!blas_agrees<float>() || !blas_agrees<double>())
    return "no usable BLAS for the thin LoRA passes: torch's sgemm_/dgemm_ failed rvclora's calling-convention "
           "check";
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
  m.def("cpu_conv1d_plans() -> str");
  m.def("cpu_conv1d_plan_hold(bool on) -> ()");
  m.def("cpu_conv1d_plan_set(str key, str plan, float library_ms, float direct_ms) -> ()");
  m.def("cpu_parallel_threads() -> int");
  m.def("cpu_blas_ok() -> bool");
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
  m.impl("cpu_conv1d_plans", &conv1d_plans);
  m.impl("cpu_conv1d_plan_hold", &conv1d_plan_hold);
  m.impl("cpu_conv1d_plan_set", &conv1d_plan_set);
  m.impl("cpu_parallel_threads", &cpu_parallel_threads);
  m.impl("cpu_blas_ok", &cpu_blas_ok);
}

}  // namespace rvclora_cpu

