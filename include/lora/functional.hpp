#pragma once

/// \file
/// The LoRA arithmetic on plain tensors, shared by the module (`LoRALinear`) and by code that
/// adapts weights it does not own (TorchScript modules).

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lora::functional {

/// ΔW = s · B · A, with A: r × in and B: out × r, in the dtype of A.
///
/// Half-precision factors are multiplied in float32 and the product is returned in float32,
/// so that a merge into a half-precision weight rounds once.
inline at::Tensor delta_weight(const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2 && lora_B.size(1) == lora_A.size(0),
              "lora::delta_weight: expected lora_A [r, in] and lora_B [out, r] (got ", lora_A.sizes(), " and ",
              lora_B.sizes(), ")");
  const bool half = lora_A.scalar_type() == at::kHalf || lora_A.scalar_type() == at::kBFloat16;
  const auto A = half ? lora_A.to(at::kFloat) : lora_A;
  const auto B = half ? lora_B.to(at::kFloat) : lora_B.to(A.scalar_type());
  return at::mm(B, A).mul_(scaling);
}

/// Row norms ‖W + ΔW‖ (one per output feature), DoRA's denominator.
///
/// Computed without autograd: DoRA treats the norm as a constant in backward (paper §4.3).
inline at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& delta) {
  at::NoGradGuard no_grad;
  const auto dtype = at::promote_types(weight.scalar_type(), delta.scalar_type());
  return at::linalg_vector_norm(weight.to(dtype) + delta.to(dtype), 2, {1}, /*keepdim=*/false, c10::nullopt);
}

}  // namespace lora::functional
