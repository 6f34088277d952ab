// The `cpu` backend's op bodies, one file per op (lora_cpu_linear.cpp, lora_cpu_conv1d.cpp,
// lora_cpu_convt.cpp); lora_cpu.cpp registers them and wraps them in C++ autograd Functions.
#pragma once

#include "lora_cpu_common.h"

namespace rvclora_cpu {

std::tuple<Tensor, Tensor> linear_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                      const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                                      const std::optional<Tensor>& seed);

Grads5 linear_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B, double scaling, double dropout_p, const std::optional<Tensor>& seed,
                  std::array<bool, 5> needs);

std::tuple<Tensor, Tensor> conv1d_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                      const Tensor& lora_A, const Tensor& lora_B, double scaling, int64_t stride,
                                      at::IntArrayRef padding, int64_t dilation, int64_t groups,
                                      c10::string_view padding_mode, double dropout_p,
                                      const std::optional<Tensor>& seed);

Grads5 conv1d_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B, double scaling, int64_t stride, at::IntArrayRef padding, int64_t dilation,
                  int64_t groups, c10::string_view padding_mode, double dropout_p, const std::optional<Tensor>& seed,
                  std::array<bool, 5> needs);

// The Conv1d plans (library or direct) chosen by measurement in this process (lora_cpu_conv1d.cpp).
std::string conv1d_plans();
// Hold (on) or release (off) the timing of Conv1d plans: while held, unplanned geometries run the library plan.
void conv1d_plan_hold(bool on);
// A plan from rvclora's per-machine cache (kept unless this process already has one for the key).
void conv1d_plan_set(c10::string_view key, c10::string_view plan, double library_ms, double direct_ms);

std::tuple<Tensor, Tensor> convt_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                     const Tensor& lora_A, const Tensor& lora_B, double scaling, int64_t stride,
                                     int64_t padding, int64_t output_padding, int64_t dilation, int64_t groups,
                                     double dropout_p, const std::optional<Tensor>& seed);

Grads5 convt_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& lora_A,
                 const Tensor& lora_B, double scaling, int64_t stride, int64_t padding, int64_t output_padding,
                 int64_t dilation, int64_t groups, double dropout_p, const std::optional<Tensor>& seed,
                 std::array<bool, 5> needs);

}  // namespace rvclora_cpu
