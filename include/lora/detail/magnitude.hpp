#pragma once

// DoRA's per-output magnitude vector as a module of its own.

#include <cstdint>
#include <ostream>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

namespace lora::detail {

/// Holds `weight`, one magnitude per output feature, shaped as PEFT stores it: [out] for
/// Linear and Embedding, [1, out, 1, ...] for a convolution. A module rather than a
/// ParameterDict entry because LibTorch's ParameterDict cannot be cloned; the in-memory name
/// `lora_magnitude_vector.<adapter>.weight` is PEFT's (≥ 0.12), and PEFT's files drop the `.weight`.
class MagnitudeImpl : public torch::nn::Cloneable<MagnitudeImpl> {
 public:
  explicit MagnitudeImpl(std::vector<int64_t> shape) : shape_(std::move(shape)) { reset(); }
  explicit MagnitudeImpl(int64_t size) : MagnitudeImpl(std::vector<int64_t>{size}) {}
  void reset() override { weight = register_parameter("weight", at::ones(shape_)); }
  void pretty_print(std::ostream& stream) const override { stream << "lora::Magnitude(" << c10::IntArrayRef(shape_) << ")"; }

  at::Tensor weight;

 private:
  std::vector<int64_t> shape_;
};

TORCH_MODULE(Magnitude);

}  // namespace lora::detail
