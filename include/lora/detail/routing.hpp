#pragma once

// Which adapter each example of a mixed-adapter batch uses, grouped by adapter: what a routed
// layer reads (see <lora/mixed_batch.hpp>).

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lora::detail {

/// The base weight and bias one routing group's rows use in a layer (a saved module's copy);
/// undefined weight: the layer's own.
struct RoutedBase {
  at::Tensor weight;
  at::Tensor bias;
};

class Routing {
 public:
  /// `adapter_per_example[i]` is the adapter of example i ("" for the base model alone).
  explicit Routing(const std::vector<std::string>& adapter_per_example) : batch_(adapter_per_example.size()) {
    TORCH_CHECK(batch_ > 0, "lora::MixedBatch: the batch is empty (no adapter name per example)");
    for (size_t i = 0; i < adapter_per_example.size(); ++i) {
      const auto& name = adapter_per_example[i];
      size_t group = 0;
      while (group < groups_.size() && groups_[group] != name) ++group;
      if (group == groups_.size()) {
        groups_.push_back(name);
        examples_.emplace_back();
      }
      examples_[group].push_back(static_cast<int64_t>(i));
    }
  }

  int64_t batch_size() const { return static_cast<int64_t>(batch_); }
  /// Distinct adapter names in order of first appearance; "" (base only) is a group too.
  const std::vector<std::string>& groups() const { return groups_; }

  /// The rows of group `group` in a layer input of `rows` rows, on `device`: each example owns
  /// rows / batch consecutive rows (the batch is the input's first dimension). Built once per
  /// row count and device, then shared by every layer of that shape.
  const at::Tensor& rows(size_t group, int64_t rows, const c10::Device& device) const {
    TORCH_CHECK(rows % batch_size() == 0, "lora::MixedBatch: a routed layer got ", rows,
                " rows, which is not a multiple of the batch of ", batch_size(),
                " examples (the batch must be the first dimension of every adapted layer's input)");
    const auto key = std::make_pair(rows, device.str());
    auto found = cache_.find(key);
    if (found == cache_.end()) {
      const int64_t per_example = rows / batch_size();
      std::vector<at::Tensor> built;
      const auto offsets = at::arange(per_example, at::kLong);
      for (const auto& examples : examples_) {
        const auto first_rows = at::tensor(examples, at::kLong).mul_(per_example).unsqueeze(1);
        built.push_back((first_rows + offsets).reshape({-1}).to(device));
      }
      found = cache_.emplace(key, std::move(built)).first;
    }
    return found->second.at(group);
  }

 private:
  size_t batch_;
  std::vector<std::string> groups_;
  std::vector<std::vector<int64_t>> examples_;
  mutable std::map<std::pair<int64_t, std::string>, std::vector<at::Tensor>> cache_;
};

}  // namespace lora::detail
