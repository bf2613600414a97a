#pragma once

/// \file
/// The type-erased interfaces of everything that holds adapters in a model tree, so that code
/// walking a model (freezing, merging, saving) handles every layer kind alike:
/// `AdapterLayer` (any holder of named adapters) and `LoRALayer` (low-rank adapters over a
/// frozen base layer: `LoRALinear<Base>`, `LoRAEmbedding`, `LoRAConv1d`, `LoRAConv2d`). Saved modules (`ModulesToSave`, PEFT's
/// `modules_to_save`) are `AdapterLayer`s too.

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <lora/config.hpp>
#include <lora/detail/routing.hpp>
#include <lora/detail/strings.hpp>
#include <lora/options.hpp>

namespace lora {

namespace detail {
class Int8Weight;  // <lora/detail/int8_linear.hpp>
}  // namespace detail

/// The kind of base layer a `LoRALayer` adapts (PEFT's layer classes).
enum class LayerKind { kLinear, kEmbedding, kConv };

/// A module that holds named adapters. Find them with `lora::adapter_layers(model)`.
class AdapterLayer {
 public:
  virtual ~AdapterLayer() = default;

  /// Names of all adapters, in insertion order.
  virtual std::vector<std::string> adapter_names() const = 0;
  virtual bool has_adapter(const std::string& name) const = 0;

  /// Activates exactly these adapters (each must be present): their parameters train, the
  /// others' are frozen.
  virtual void set_adapters(const std::vector<std::string>& names) = 0;
  virtual const std::vector<std::string>& active_adapters() const = 0;
  /// Throws what `set_adapters(names)` would throw, changing nothing.
  virtual void check_set_adapters(const std::vector<std::string>& names) const = 0;

  /// `enable_adapters(false)` makes the layer compute what the model without adapters
  /// computes; `enable_adapters(true)` restores the active adapters.
  virtual void enable_adapters(bool enabled) = 0;
  virtual bool adapters_enabled() const = 0;

  /// Removes an adapter and its parameters. If it was the only active adapter, the first
  /// remaining one becomes active.
  virtual void delete_adapter(const std::string& name) = 0;
  /// Throws what `delete_adapter(name)` would throw, changing nothing.
  virtual void check_delete_adapter(const std::string& name) const = 0;

  /// One adapter's tensors under PEFT's file names, relative to the layer: `lora_A.weight`,
  /// `lora_B.weight`, `lora_magnitude_vector` for a LoRA layer; the module's own names
  /// (`weight`, `bias`) for a saved module.
  virtual std::vector<std::pair<std::string, at::Tensor>> adapter_state(const std::string& name) const = 0;

  /// The layer's tensors as the model without adapters names them, relative to the layer
  /// (`weight`, `bias`): what `lora::base_state_dict` reports for it.
  virtual std::vector<std::pair<std::string, at::Tensor>> base_state() const = 0;

  /// `set_trainable(name, false)` freezes adapter `name` for good: its parameters do not train
  /// even while it is active (an adapter loaded for inference). `true` undoes that.
  virtual void set_trainable(const std::string& name, bool trainable) = 0;
  virtual bool is_trainable(const std::string& name) const = 0;

  /// The model-level configuration adapter `name` was attached with (by `lora::inject` or an
  /// adapter load), or nullptr for an adapter added to the layer directly.
  virtual std::shared_ptr<const LoraConfig> adapter_config(const std::string& name) const = 0;
  /// Replaces that configuration (a hot-swap that kept the adapter's structure).
  virtual void set_adapter_config(const std::string& name, std::shared_ptr<const LoraConfig> config) = 0;

  /// Renames adapter `from` to `to`, keeping its values, options, activity, merges and training
  /// flags (parameter names change with it: `lora_A.<to>.weight`).
  virtual void rename_adapter(const std::string& from, const std::string& to) = 0;
  /// Throws what `rename_adapter(from, to)` would throw, changing nothing.
  virtual void check_rename_adapter(const std::string& from, const std::string& to) const = 0;
};

/// Low-rank adapters over a frozen base layer, PEFT's `LoraLayer` API.
///
/// Find adapted layers in a model with `lora::lora_layers(model)`.
class LoRALayer : public AdapterLayer {
 public:
  /// Adds a new adapter. The first adapter of a layer becomes active; later ones start inactive
  /// (and frozen) until `set_adapters` selects them, as in PEFT. `config` is the model-level
  /// configuration it belongs to (see `adapter_config`).
  virtual void add_adapter(const std::string& name, const LoRAOptions& options,
                           std::shared_ptr<const LoraConfig> config = nullptr) = 0;
  /// Throws what `add_adapter` would throw, changing nothing: lets a caller check a whole plan
  /// before touching any layer.
  virtual void check_add_adapter(const std::string& name, const LoRAOptions& options) const = 0;

  /// The options an adapter was created with.
  virtual const LoRAOptions& adapter_options(const std::string& name) const = 0;

  /// Activates exactly this adapter. A merged adapter that is no longer active is unmerged
  /// first, as in PEFT.
  void set_adapter(const std::string& name) { set_adapters({name}); }

  /// Writes the named adapters (by default the active ones) into the base weight; adapters
  /// already merged are skipped. With `safe_merge`, each merged weight is checked for NaN/Inf
  /// before it is written, and a failure undoes this call's merges: all or nothing. Refused
  /// while adapters are disabled. Names come first so that `merge({"a"})` cannot be read as a
  /// bool: `merge()`, `merge({"a", "b"})`, `merge({}, /*safe_merge=*/true)`.
  virtual void merge(const std::vector<std::string>& adapter_names = {}, bool safe_merge = false) = 0;
  /// Throws what `merge(adapter_names)` would throw before computing anything (unknown names,
  /// adapters disabled), changing nothing.
  virtual void check_merge(const std::vector<std::string>& adapter_names = {}) const = 0;
  /// Undoes every merge, most recent first (exact up to rounding).
  virtual void unmerge() = 0;
  /// Undoes, exactly, the merges made since `merged_adapters()` held `count` names: `weight` is
  /// a copy of the base weight taken then. What all-or-nothing operations roll back with.
  virtual void rollback_merges(size_t count, const at::Tensor& weight) = 0;
  /// True when at least one adapter is merged into the base weight.
  virtual bool merged() const = 0;
  virtual const std::vector<std::string>& merged_adapters() const = 0;

  /// Merges the active adapters, then forgets every adapter: the layer keeps the merged weights
  /// and computes exactly what its base layer does (PEFT's `merge_and_unload`). Refused while
  /// adapters are disabled, as `merge` is.
  virtual void merge_and_unload(bool safe_merge = false) = 0;
  /// Forgets every adapter of a layer whose merges are already done (the second half of
  /// `merge_and_unload`); cannot fail.
  virtual void forget_adapters() = 0;
  /// Unmerges, then forgets every adapter: the layer is its original base layer again.
  virtual void unload() = 0;

  /// The weight that makes the base layer compute what the adapted layer computes without
  /// dropout: W + Σ s·B·A over the active, unmerged adapters (DoRA: rescaled rows), shaped like
  /// the base weight. Differentiable in the adapter parameters; used to re-parametrise weights
  /// the library cannot wrap (TorchScript modules).
  virtual at::Tensor adapted_weight() const = 0;

  /// s·B·A of one adapter, shaped like the base weight ([out, in] for a Linear, its transpose
  /// [num_embeddings, embedding_dim] for an Embedding, [out, in, k...] for a convolution).
  virtual at::Tensor delta_weight(const std::string& name) const = 0;
  /// The frozen base weight and bias (bias undefined when the base layer has none).
  virtual at::Tensor base_weight() const = 0;
  virtual at::Tensor base_bias() const = 0;
  /// The base layer's input and output sizes as PEFT names them: features for a Linear,
  /// `num_embeddings` and `embedding_dim` for an Embedding, channels for a convolution.
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  /// What kind of layer the adapters are over (`all-linear` selects only Linear ones).
  virtual LayerKind layer_kind() const = 0;

  /// Routes a mixed-adapter batch through this layer; `lora::MixedBatch` calls it, code
  /// should use that. While routed, the rows of each routing group get that group's adapter
  /// (nothing for "" or for an adapter this layer lacks) whatever the active set is, and the
  /// group's `base_values` entry, where defined, replaces the base weight and bias for its
  /// rows (a saved module's copies). The routed adapters that are trainable train, no other.
  /// nullptr ends routing and restores the active set's training flags.
  virtual void route(std::shared_ptr<const detail::Routing> routing, std::vector<detail::RoutedBase> base_values = {}) = 0;
  /// Throws what `route` would throw (merged adapters, adapters disabled, base values this
  /// kind of layer cannot take), changing nothing.
  virtual void check_route(bool with_base_values) const = 0;

  /// Replaces the frozen fp32 base weight by an int8 copy (per output channel) multiplied by
  /// LibTorch's dynamically quantised GEMM; see `lora::quantize_base`. One way: the fp32
  /// weight is released. Linear layers over `torch::nn::Linear` on the CPU only. `int8` is
  /// the copy when already made from this layer's weight (`lora::quantize_base` makes every
  /// layer's before changing any), else it is made here.
  virtual void quantize_base(std::shared_ptr<const detail::Int8Weight> int8 = nullptr) = 0;
  /// Throws what `quantize_base` would throw, changing nothing.
  virtual void check_quantize_base() const = 0;
  /// Whether the base weight is stored int8 (then merging and DoRA are refused).
  virtual bool base_is_int8() const = 0;
};

namespace detail {

template <typename Layer>
std::vector<std::pair<std::string, std::shared_ptr<Layer>>> find_layers(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, std::shared_ptr<Layer>>> layers;
  // An adapter layer's insides (its base layer, a saved module's copies) are its own business.
  std::vector<std::string> holders;
  auto inside_holder = [&](const std::string& name) {
    for (const auto& holder : holders) {
      if (holder.empty() || detail::is_inside(name, holder)) {
        return true;
      }
    }
    return false;
  };
  if (dynamic_cast<const AdapterLayer*>(&model) != nullptr) {
    auto self = std::const_pointer_cast<torch::nn::Module>(model.weak_from_this().lock());
    TORCH_CHECK(self != nullptr, "lora: the layer must be owned by a shared_ptr (a module holder or "
                                 "std::make_shared), not allocated on the stack");
    if (auto layer = std::dynamic_pointer_cast<Layer>(self)) layers.emplace_back("", layer);
    holders.push_back("");
  }
  for (const auto& item : model.named_modules(/*name_prefix=*/"", /*include_self=*/false)) {
    if (inside_holder(item.key())) continue;
    if (std::dynamic_pointer_cast<AdapterLayer>(item.value()) == nullptr) continue;
    holders.push_back(item.key());
    if (auto layer = std::dynamic_pointer_cast<Layer>(item.value())) layers.emplace_back(item.key(), layer);
  }
  return layers;
}

}  // namespace detail

/// Every adapter layer of `model` (LoRA layers and saved modules, `model` itself included
/// under the name ""), with its qualified name, in `named_modules()` order. Layers inside
/// another adapter layer (the copies a saved module keeps) are not listed.
inline std::vector<std::pair<std::string, std::shared_ptr<AdapterLayer>>> adapter_layers(
    const torch::nn::Module& model) {
  return detail::find_layers<AdapterLayer>(model);
}

/// Every LoRA layer of `model` (including `model` itself, under the name ""), with its
/// qualified name, in `named_modules()` order.
inline std::vector<std::pair<std::string, std::shared_ptr<LoRALayer>>> lora_layers(const torch::nn::Module& model) {
  return detail::find_layers<LoRALayer>(model);
}

}  // namespace lora
