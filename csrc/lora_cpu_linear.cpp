// The `cpu` backend's Linear: linear_fwd and linear_bwd (declared in lora_cpu_ops.h).
#include "lora_cpu_ops.h"

namespace rvclora_cpu {
namespace {

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

}  // namespace

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

}  // namespace rvclora_cpu
