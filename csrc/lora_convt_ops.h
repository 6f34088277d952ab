// The torch side of the fused ConvTranspose1d + LoRA ops, written once for both devices.
//
// Validation, allocation and the backward plan live here; a `Runner` (CpuRunner in
// lora_convt_cpu.cpp, CudaRunner in lora_convt_cuda_ops.cpp) executes the kernels of
// lora_convt_kernel.cuh on its device. Included by the .cpp files only, never by the .cu.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "lora_convt_kernel.cuh"

namespace rvclora {

using at::Tensor;

inline DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "rvclora: x must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Accumulation dtype: fp32 for every storage type except fp64.
inline at::ScalarType acc_type_of(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t seed_value(const std::optional<Tensor>& seed, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "rvclora: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->defined(), "rvclora: dropout_p = ", dropout_p, " > 0 needs a seed tensor");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
              "rvclora: seed must be a one-element int64 CPU tensor, got ", seed->scalar_type(), " on ",
              seed->device(), " with ", seed->numel(), " elements");
  return seed->item<int64_t>();
}

inline ConvTShape checked_shape(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                const Tensor& lora_A, const Tensor& lora_B, int64_t stride, int64_t padding,
                                int64_t output_padding, int64_t dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 3, "rvclora: x must be (N, C_in, T), got ", x.dim(), " dims");
  TORCH_CHECK(weight.dim() == 3, "rvclora: weight must be (C_in, C_out/groups, K), got ", weight.dim(), " dims");
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2, "rvclora: lora_A and lora_B must be 2-D");
  TORCH_CHECK(stride >= 1 && dilation >= 1 && padding >= 0 && output_padding >= 0 && groups >= 1,
              "rvclora: need stride >= 1, dilation >= 1, padding >= 0, output_padding >= 0, groups >= 1; got stride=",
              stride, " dilation=", dilation, " padding=", padding, " output_padding=", output_padding,
              " groups=", groups);
  TORCH_CHECK(output_padding < stride || output_padding < dilation, "rvclora: output_padding (", output_padding,
              ") must be smaller than stride (", stride, ") or dilation (", dilation, ")");
  const int64_t N = x.size(0), Cin = x.size(1), T = x.size(2);
  const int64_t Cog = weight.size(1), K = weight.size(2), r = lora_A.size(0);
  TORCH_CHECK(weight.size(0) == Cin, "rvclora: weight.shape[0] (", weight.size(0), ") must equal C_in (", Cin, ")");
  TORCH_CHECK(Cin % groups == 0, "rvclora: C_in (", Cin, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(r >= 1 && r % groups == 0, "rvclora: rank r (", r, ") must be >= 1 and divisible by groups (", groups,
              ")");
  TORCH_CHECK(lora_A.size(1) == Cin / groups, "rvclora: lora_A must be (r, C_in/groups) = (", r, ", ", Cin / groups,
              "), got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == r && lora_B.size(1) == Cog * K, "rvclora: lora_B must be (r, C_out/groups*K) = (", r,
              ", ", Cog * K, "), got ", lora_B.sizes());
  TORCH_CHECK(T >= 1 && N >= 1, "rvclora: x must have N >= 1 and T >= 1, got ", x.sizes());
  for (const Tensor* t : {&weight, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "rvclora: weight, lora_A, lora_B must have x's dtype (",
                x.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "rvclora: all tensors must be on x's device (", x.device(), "), got ",
                t->device());
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cog * groups, "rvclora: bias must be (C_out,) = (",
                Cog * groups, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "rvclora: bias must match x's dtype and device");
  }
  const ConvTShape s = make_shape(N, Cin, T, Cog, K, r, stride, padding, output_padding, dilation, groups);
  TORCH_CHECK(s.L >= 1, "rvclora: output length (T-1)*stride - 2*padding + dilation*(K-1) + output_padding + 1 = ",
              s.L, " must be >= 1");
  return s;
}

// The CPU twin fills every buffer a kernel must write with NaN first (Runner::kPoisonOutputs):
// an element the kernel's index maps miss stays NaN, and every CPU test then fails on it.
template <class Runner>
Tensor alloc_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  if (Runner::kPoisonOutputs) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

template <class Runner>
std::tuple<Tensor, Tensor> lora_convt_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                          const Tensor& lora_A, const Tensor& lora_B, double scaling, int64_t stride,
                                          int64_t padding, int64_t output_padding, int64_t dilation, int64_t groups,
                                          double dropout_p, const std::optional<Tensor>& seed) {
  const ConvTShape s = checked_shape(x, weight, bias, lora_A, lora_B, stride, padding, output_padding, dilation, groups);
  const int64_t seed_v = seed_value(seed, dropout_p);
  typename Runner::Guard guard(x);
  const Tensor xc = x.contiguous(), wc = weight.contiguous(), ac = lora_A.contiguous(), bc = lora_B.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor biasc = has_bias ? bias->contiguous() : Tensor();
  Tensor y = alloc_output<Runner>({s.N, s.Cout, s.L}, x.options());
  Tensor u = alloc_output<Runner>({s.N, s.r, s.T}, x.options().dtype(acc_type_of(x)));
  FwdDesc d{xc.data_ptr(), wc.data_ptr(), has_bias ? biasc.data_ptr() : nullptr, ac.data_ptr(), bc.data_ptr(),
            y.data_ptr(), u.data_ptr(), scaling, dropout_p, seed_v, s};
  Runner::fwd(dtype_of(x), d);
  return {y, u};
}

// Weight-gradient reduction: returns the (groups, C1 + C2, Cq, K) sum over the split workspace.
template <class Runner>
Tensor run_wgrad(const at::TensorOptions& acc_options, DType dt, WgradDesc d) {
  wgrad_plan(d);
  Tensor ws = alloc_output<Runner>({d.splits, d.groups, d.C1 + d.C2, d.Cq, d.K}, acc_options);
  d.out = ws.data_ptr();
  Runner::wgrad(dt, d);
  return ws.sum(0);  // fixed-order sum of the split partials: deterministic
}

// Gradients of (x, weight, bias, lora_A, lora_B); `needs` says which (the order of every backend's backward op).
template <class Runner>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_convt_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, double scaling, int64_t stride, int64_t padding, int64_t output_padding, int64_t dilation,
    int64_t groups, double dropout_p, const std::optional<Tensor>& seed, std::array<bool, 5> needs) {
  const bool need_x = needs[0], need_weight = needs[1], need_bias = needs[2], need_A = needs[3], need_B = needs[4];
  const ConvTShape s =
      checked_shape(x, weight, std::nullopt, lora_A, lora_B, stride, padding, output_padding, dilation, groups);
  const int64_t seed_v = seed_value(seed, dropout_p);
  TORCH_CHECK(grad_y.dim() == 3 && grad_y.size(0) == s.N && grad_y.size(1) == s.Cout && grad_y.size(2) == s.L,
              "rvclora: grad_y must be (", s.N, ", ", s.Cout, ", ", s.L, "), got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "rvclora: grad_y must match x's dtype and device");
  const at::ScalarType acc = acc_type_of(x);
  TORCH_CHECK(!need_B || (u.dim() == 3 && u.size(0) == s.N && u.size(1) == s.r && u.size(2) == s.T &&
                          u.scalar_type() == acc && u.device() == x.device()),
              "rvclora: u must be the (", s.N, ", ", s.r, ", ", s.T, ") ", acc, " tensor saved by cuda_lora_conv_transpose1d_fwd");
  typename Runner::Guard guard(x);
  const DType dt = dtype_of(x);
  const Tensor g = grad_y.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const Tensor ac = lora_A.contiguous(), bc = lora_B.contiguous();
  // Unrequested gradients are distinct (0,) tensors: outputs of an op must not alias each other.
  Tensor gx = at::empty({0}, x.options()), gw = at::empty({0}, x.options());
  Tensor ga = at::empty({0}, x.options()), gb = at::empty({0}, x.options());
  Tensor gbias = need_bias ? grad_y.sum(at::IntArrayRef{0, 2}) : at::empty({0}, x.options());

  Tensor gu;
  if (need_x || need_A) {
    if (need_x) gx = alloc_output<Runner>({s.N, s.Cin, s.T}, x.options());
    if (need_A) gu = alloc_output<Runner>({s.N, s.r, s.T}, x.options().dtype(acc));
    BwdInputDesc d{g.data_ptr(), wc.data_ptr(), ac.data_ptr(), bc.data_ptr(),
                   need_x ? gx.data_ptr() : nullptr, need_A ? gu.data_ptr() : nullptr, scaling, dropout_p, seed_v, s};
    Runner::bwd_input(dt, d);
  }
  if (need_weight || need_B) {
    const Tensor uc = need_B ? u.contiguous() : Tensor();
    WgradDesc d{};
    d.p1 = need_weight ? xc.data_ptr() : nullptr;
    d.p1_acc = nullptr;
    d.p2 = need_B ? uc.data_ptr() : nullptr;
    d.q = g.data_ptr();
    d.alpha2 = scaling;
    d.q_dropout_p = 0.0;
    d.q_seed = 0;
    d.N = s.N, d.Tp = s.T, d.C1 = need_weight ? s.Cig : 0, d.C2 = need_B ? s.rg : 0;
    d.C1tot = s.Cin, d.C2tot = s.r, d.Cq = s.Cog, d.Cqtot = s.Cout, d.Lq = s.L, d.groups = s.groups;
    d.S = s.S, d.P = s.P, d.D = s.D, d.K = s.K;
    const Tensor total = run_wgrad<Runner>(x.options().dtype(acc), dt, d);  // (groups, C1 + C2, Cog, K)
    // copy=true: fresh tensors, never views into the workspace (an op's outputs own their storage)
    if (need_weight)
      gw = total.slice(1, 0, d.C1).reshape({s.Cin, s.Cog, s.K}).to(x.scalar_type(), false, true);
    if (need_B)
      gb = total.slice(1, d.C1, d.C1 + d.C2).reshape({s.r, s.Cog * s.K}).to(x.scalar_type(), false, true);
  }
  if (need_A) {
    WgradDesc d{};
    d.p1 = nullptr;
    d.p1_acc = gu.data_ptr();
    d.p2 = nullptr;
    d.q = xc.data_ptr();
    d.alpha2 = 0.0;
    d.q_dropout_p = dropout_p;  // grad_A = Σ g_u ⊗ D(x): the forward's mask, regenerated
    d.q_seed = seed_v;
    d.N = s.N, d.Tp = s.T, d.C1 = s.rg, d.C2 = 0;
    d.C1tot = s.r, d.C2tot = 0, d.Cq = s.Cig, d.Cqtot = s.Cin, d.Lq = s.T, d.groups = s.groups;
    d.S = 1, d.P = 0, d.D = 1, d.K = 1;
    const Tensor total = run_wgrad<Runner>(x.options().dtype(acc), dt, d);  // (groups, rg, Cig, 1)
    ga = total.reshape({s.r, s.Cig}).to(x.scalar_type(), false, true);
  }
  return {gx, gw, gbias, ga, gb};
}

// The dropout mask D applies to an x shaped like `like` (0 or 1/(1-p)), for tests.
template <class Runner>
Tensor lora_convt_dropout_mask(const Tensor& like, const Tensor& seed, double dropout_p) {
  const int64_t seed_v = seed_value(seed, dropout_p);
  typename Runner::Guard guard(like);
  Tensor out = alloc_output<Runner>(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  Runner::mask(dtype_of(like), out.data_ptr(), out.numel(), dropout_p, seed_v);
  return out;
}

}  // namespace rvclora
