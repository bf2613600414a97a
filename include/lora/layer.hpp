#pragma once

/// \file
/// `LoRALayer`: the type-erased interface every adapted layer implements, so that code walking a
/// module tree (freezing, merging, saving) can handle any `LoRALinear<Base>` alike.

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <lora/options.hpp>

namespace lora {

/// Adapter management shared by all LoRA layers, PEFT's `LoraLayer` API.
///
/// Find adapted layers in a model with
/// `std::dynamic_pointer_cast<lora::LoRALayer>(module)` or `lora::lora_layers(model)`.
class LoRALayer {
 public:
  virtual ~LoRALayer() = default;

  /// Adds a new adapter. The first adapter of a layer becomes active; later ones start inactive
  /// (and frozen) until `set_adapter` selects them, as in PEFT.
  virtual void add_adapter(const std::string& name, const LoRAOptions& options) = 0;
  /// Adds a trainable full copy of the base layer under `name` (PEFT's `modules_to_save`): while
  /// that adapter is active the copy computes the output and trains; the base layer keeps the
  /// original weights. A layer holds either low-rank adapters or trainable copies.
  virtual void add_trainable_copy(const std::string& name) = 0;
  /// Throws what `add_adapter` / `add_trainable_copy` would throw, changing nothing: lets a
  /// caller check a whole plan before touching any layer.
  virtual void check_add_adapter(const std::string& name, const LoRAOptions& options) const = 0;
  virtual void check_add_trainable_copy(const std::string& name) const = 0;
  /// True when adapter `name` is a trainable copy rather than a low-rank adapter.
  virtual bool is_trainable_copy(const std::string& name) const = 0;
  /// Removes an adapter and its parameters. It must not be merged. If it was the only active
  /// adapter, the first remaining one becomes active.
  virtual void delete_adapter(const std::string& name) = 0;

  /// Names of all adapters, in insertion order.
  virtual std::vector<std::string> adapter_names() const = 0;
  virtual bool has_adapter(const std::string& name) const = 0;
  /// The options an adapter was created with.
  virtual const LoRAOptions& adapter_options(const std::string& name) const = 0;

  /// Activates exactly this adapter: its parameters become trainable, the others' frozen. A
  /// merged adapter that is no longer active is unmerged first, as in PEFT.
  virtual void set_adapter(const std::string& name) = 0;
  /// Activates several adapters at once; their deltas are summed.
  virtual void set_adapters(const std::vector<std::string>& names) = 0;
  virtual const std::vector<std::string>& active_adapters() const = 0;

  /// `enable_adapters(false)` makes the layer compute the base output only (unmerging first if
  /// needed); `enable_adapters(true)` restores the active adapters.
  virtual void enable_adapters(bool enabled) = 0;
  virtual bool adapters_enabled() const = 0;

  /// Writes the named adapters (by default the active ones) into the base weight; adapters
  /// already merged are skipped. With `safe_merge`, each merged weight is checked for NaN/Inf
  /// before it is written, and a failure undoes this call's merges: all or nothing. Refused
  /// while adapters are disabled. Names come first so that `merge({"a"})` cannot be read as a
  /// bool: `merge()`, `merge({"a", "b"})`, `merge({}, /*safe_merge=*/true)`.
  virtual void merge(const std::vector<std::string>& adapter_names = {}, bool safe_merge = false) = 0;
  /// Undoes every merge, most recent first.
  virtual void unmerge() = 0;
  /// True when at least one adapter is merged into the base weight.
  virtual bool merged() const = 0;
  virtual const std::vector<std::string>& merged_adapters() const = 0;

  /// Merges the active adapters, then forgets every adapter: the layer keeps the merged weights
  /// and computes exactly what its base layer does (PEFT's `merge_and_unload`).
  virtual void merge_and_unload(bool safe_merge = false) = 0;
  /// Unmerges, then forgets every adapter: the layer is its original base layer again.
  virtual void unload() = 0;

  /// One adapter's tensors under PEFT's file names, relative to the layer: `lora_A.weight`,
  /// `lora_B.weight`, `lora_magnitude_vector` (DoRA), or for a trainable copy its own
  /// parameter names (`weight`, `bias`).
  virtual std::vector<std::pair<std::string, at::Tensor>> adapter_state(const std::string& name) const = 0;

  /// The weight that makes the base layer compute what the adapted layer computes without
  /// dropout: W + Σ s·B·A over the active, unmerged adapters (DoRA: rescaled rows), shaped like
  /// the base weight. Differentiable in the adapter parameters; used to re-parametrise weights
  /// the library cannot wrap (TorchScript modules).
  virtual at::Tensor adapted_weight() const = 0;

  /// s·B·A of one adapter, shaped like the base weight ([out, in] for a Linear).
  virtual at::Tensor delta_weight(const std::string& name) const = 0;
  /// The frozen base weight and bias (bias undefined when the base layer has none).
  virtual at::Tensor base_weight() const = 0;
  virtual at::Tensor base_bias() const = 0;
};

/// Every LoRA layer in `model` (including `model` itself, under the name ""), with its qualified
/// name, in `named_modules()` order.
inline std::vector<std::pair<std::string, std::shared_ptr<LoRALayer>>> lora_layers(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, std::shared_ptr<LoRALayer>>> layers;
  if (dynamic_cast<const LoRALayer*>(&model) != nullptr) {
    auto self = std::const_pointer_cast<torch::nn::Module>(model.weak_from_this().lock());
    TORCH_CHECK(self != nullptr, "lora::lora_layers: the layer must be owned by a shared_ptr (a module holder or "
                                 "std::make_shared), not allocated on the stack");
    layers.emplace_back("", std::dynamic_pointer_cast<LoRALayer>(self));
  }
  for (const auto& item : model.named_modules(/*name_prefix=*/"", /*include_self=*/false)) {
    if (auto layer = std::dynamic_pointer_cast<LoRALayer>(item.value())) layers.emplace_back(item.key(), layer);
  }
  return layers;
}

}  // namespace lora
