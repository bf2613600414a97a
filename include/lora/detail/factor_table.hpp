#pragma once

// Named bare parameters that clone: PEFT keeps an Embedding's factors in a ParameterDict
// (`lora_embedding_A.<adapter>`), and LibTorch's ParameterDict loses its entries in clone().

#include <algorithm>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

namespace lora::detail {

class FactorTableImpl : public torch::nn::Cloneable<FactorTableImpl> {
 public:
  FactorTableImpl() = default;

  /// Registers `tensor` as parameter `name` (replacing an entry of that name), keeping its
  /// `requires_grad`.
  void insert(const std::string& name, const at::Tensor& tensor) {
    auto it = std::find_if(shapes_.begin(), shapes_.end(), [&](const auto& entry) { return entry.first == name; });
    if (it == shapes_.end()) {
      shapes_.emplace_back(name, tensor.sizes().vec());
    } else {
      it->second = tensor.sizes().vec();
    }
    register_parameter(name, tensor, tensor.requires_grad());  // its training flag kept
  }
  bool contains(const std::string& name) const { return parameters_.contains(name); }
  const at::Tensor& get(const std::string& name) const {
    const auto* found = parameters_.find(name);
    TORCH_CHECK(found != nullptr, "lora: no factor '", name, "'");
    return *found;
  }
  /// The names in insertion order.
  std::vector<std::string> names() const {
    std::vector<std::string> result;
    for (const auto& entry : shapes_) result.push_back(entry.first);
    return result;
  }
  /// Cloneable's contract: the entries again, to be filled with the copied values.
  void reset() override {
    for (const auto& [name, shape] : shapes_) register_parameter(name, at::empty(shape));
  }
  void pretty_print(std::ostream& stream) const override { stream << "lora::FactorTable"; }

 private:
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes_;
};

TORCH_MODULE(FactorTable);

}  // namespace lora::detail
