// The small-batch linear ops (bindings.cpp): y = x (W ⊙ M)ᵀ + b and its signed-constant form for 1-16
// rows of x. Registered as torch.ops.supsup_cpu ops, and called directly by python_module.cpp.
#pragma once
#include <optional>

#include <ATen/ATen.h>

namespace supsup_cpu {

at::Tensor masked_linear_small(const at::Tensor& x, const at::Tensor& w, const at::Tensor& words,
                               const std::optional<at::Tensor>& bias);

at::Tensor signed_masked_linear_small(const at::Tensor& x, const at::Tensor& sign_words, const at::Tensor& mask_words,
                                      double scale, const std::optional<at::Tensor>& bias);

}  // namespace supsup_cpu
