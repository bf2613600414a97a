#pragma once

/// \file
/// `lora::MixedBatch`: one forward (and backward) over a batch whose examples use different
/// adapters of the same model, PEFT's `adapter_names=` without its loop over sub-batches.
///
///     {
///       lora::MixedBatch mix(*model, {"alice", "bob", "", "alice"});  // "" = base model alone
///       auto logits = model->forward(input_ids, attention_mask);
///     }
///
/// While the guard lives, every adapted layer computes its base product once for the whole
/// batch and adds each adapter's delta to the rows of that adapter's examples (one gather, two
/// small matmuls and one scatter-add per adapter present, whatever its rank; DoRA included);
/// a saved module (a `modules_to_save` head) gives each example its adapter's copy. The result
/// equals running each example alone with its adapter active.
///
/// Training several adapters at once: the batch is differentiable, and while the guard lives
/// exactly the adapters in the batch that are trainable (not loaded for inference, not frozen
/// with `set_adapter_trainable`) train, with their heads; each example's loss reaches only its
/// own adapter. Keep the guard alive through `backward()`: training flags are restored when it
/// goes away.
///
/// Contract: the batch is the first dimension of every adapted layer's input (true of our
/// encoders and heads); no adapter may be merged and adapters must be enabled; a saved module
/// can be routed when its tensors all belong to Linear layers (our models' classifier heads).
/// One mixed batch at a time per model: routing is state on the layers, as training mode is.

#include <algorithm>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <lora/detail/routing.hpp>
#include <lora/detail/strings.hpp>
#include <lora/layer.hpp>
#include <lora/modules_to_save.hpp>
#include <lora/state_dict.hpp>

namespace lora {

class MixedBatch {
 public:
  /// Routes `adapter_per_example[i]` (an adapter name, or "" for the base model) to example i of
  /// the next forward passes of `model`. Checks everything first: on an error nothing is routed.
  MixedBatch(torch::nn::Module& model, const std::vector<std::string>& adapter_per_example) {
    auto routing = std::make_shared<const detail::Routing>(adapter_per_example);
    const auto& groups = routing->groups();
    const auto holders = adapter_layers(model);
    std::set<std::string> known;
    for (const auto& [path, holder] : holders) {
      for (const auto& name : holder->adapter_names()) known.insert(name);
    }
    for (const auto& name : groups) {
      TORCH_CHECK(name.empty() || known.count(name) > 0, "lora::MixedBatch: unknown adapter '", name,
                  "' (adapters: ", detail::join({known.begin(), known.end()}), ")");
    }

    struct Planned {
      std::shared_ptr<LoRALayer> layer;
      std::vector<detail::RoutedBase> base_values;
    };
    std::vector<Planned> planned;
    std::vector<std::shared_ptr<ModulesToSaveImpl>> saved_modules;
    std::set<const AdapterLayer*> seen;  // a module registered under two paths is routed once
    for (const auto& [path, holder] : holders) {
      if (!seen.insert(holder.get()).second) continue;
      TORCH_CHECK(holder->adapters_enabled(), "lora::MixedBatch: adapters are disabled in '", path,
                  "'; call enable_adapters(true) first");
      if (auto layer = std::dynamic_pointer_cast<LoRALayer>(holder)) {
        check_layer(*layer, path, /*with_base_values=*/false);
        planned.push_back({layer, {}});
      } else if (auto saved = std::dynamic_pointer_cast<ModulesToSaveImpl>(holder)) {
        std::set<std::string> routed_keys;
        for (const auto& [inner, layer] : lora_layers(*saved->module())) {
          const auto weight_key = detail::join_path(inner, "base_layer.weight");
          const auto bias_key = detail::join_path(inner, "base_layer.bias");
          const bool has_bias = layer->base_bias().defined();
          std::vector<detail::RoutedBase> values;
          for (const auto& name : groups) {
            const auto& key = saved->has_adapter(name) ? name : std::string();  // no copy: the original
            values.push_back({saved->tensor(key, weight_key), has_bias ? saved->tensor(key, bias_key) : at::Tensor()});
          }
          routed_keys.insert({weight_key, bias_key});
          check_layer(*layer, detail::join_path(path, inner), /*with_base_values=*/true);
          planned.push_back({layer, std::move(values)});
        }
        for (const auto& key : saved->tensor_keys()) {
          TORCH_CHECK(routed_keys.count(key) > 0, "lora::MixedBatch: saved module '", path, "' holds '", key,
                      "', which a mixed batch cannot give per-example values: only the Linear layers of a saved "
                      "module are routed (a classifier head)");
        }
        saved_modules.push_back(saved);
      }
    }

    // Nothing below throws: the batch is routed in full.
    for (auto& item : planned) {
      item.layer->route(routing, std::move(item.base_values));
      layers_.push_back(item.layer);
    }
    for (auto& saved : saved_modules) saved->route(groups);
    saved_ = std::move(saved_modules);
    routing_ = std::move(routing);
  }

  ~MixedBatch() {
    for (auto& layer : layers_) layer->route(nullptr);
    for (auto& saved : saved_) saved->unroute();
  }

  MixedBatch(const MixedBatch&) = delete;
  MixedBatch& operator=(const MixedBatch&) = delete;

  /// The distinct adapters of the batch in order of first appearance ("" for base-only rows).
  const std::vector<std::string>& adapters() const { return routing_->groups(); }

 private:
  static void check_layer(const LoRALayer& layer, const std::string& path, bool with_base_values) {
    try {
      layer.check_route(with_base_values);
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::MixedBatch: layer '", path, "': ", error.what_without_backtrace());
    }
  }

  std::shared_ptr<const detail::Routing> routing_;
  std::vector<std::shared_ptr<LoRALayer>> layers_;
  std::vector<std::shared_ptr<ModulesToSaveImpl>> saved_;
};

}  // namespace lora
