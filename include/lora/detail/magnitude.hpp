#pragma once

// DoRA's per-output magnitude vector as a module of its own.

#include <ostream>

#include <ATen/ATen.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

namespace lora::detail {

/// Holds `weight` [out]. A module rather than a ParameterDict entry because LibTorch's
/// ParameterDict cannot be cloned; the in-memory name `lora_magnitude_vector.<adapter>.weight`
/// is PEFT's (≥ 0.12), and PEFT's files drop the `.weight`.
class MagnitudeImpl : public torch::nn::Cloneable<MagnitudeImpl> {
 public:
  explicit MagnitudeImpl(int64_t size) : size_(size) { reset(); }
  void reset() override { weight = register_parameter("weight", at::ones({size_})); }
  void pretty_print(std::ostream& stream) const override { stream << "lora::Magnitude(" << size_ << ")"; }

  at::Tensor weight;

 private:
  int64_t size_;
};
TORCH_MODULE(Magnitude);

}  // namespace lora::detail
