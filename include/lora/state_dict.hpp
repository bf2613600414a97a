#pragma once

/// \file
/// State dicts of adapted models: an adapter's tensors under PEFT's file keys (save and load),
/// and the model's own tensors under the names of the model without adapters.

#include <algorithm>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/ordered_dict.h>

#include <lora/detail/strings.hpp>
#include <lora/layer.hpp>

namespace lora {

namespace detail {

inline std::string join_path(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "." + key;
}

/// The top-level adapter layer a tensor key of `model` belongs to: (its path, the key relative
/// to it), or nullptr when the key is outside every adapter layer.
inline std::pair<const std::pair<std::string, std::shared_ptr<AdapterLayer>>*, std::string> owning_layer(
    const std::vector<std::pair<std::string, std::shared_ptr<AdapterLayer>>>& layers, const std::string& key) {
  for (const auto& item : layers) {
    const auto& path = item.first;
    if (path.empty()) return {&item, key};
    if (is_inside(key, path)) {
      return {&item, key.substr(path.size() + 1)};
    }
  }
  return {nullptr, key};
}

/// Every adapter layer that holds adapter `name`.
inline std::vector<std::pair<std::string, std::shared_ptr<AdapterLayer>>> layers_with(const torch::nn::Module& model,
                                                                                     const std::string& name) {
  std::vector<std::pair<std::string, std::shared_ptr<AdapterLayer>>> out;
  for (auto& item : adapter_layers(model)) {
    if (item.second->has_adapter(name)) out.push_back(std::move(item));
  }
  return out;
}

/// Every adapter name any layer of `model` holds, in first-seen order.
inline std::vector<std::string> all_adapter_names(const torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& item : adapter_layers(model)) {
    for (const auto& name : item.second->adapter_names()) {
      if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
    }
  }
  return names;
}

inline void check_model_adapter(const torch::nn::Module& model, const std::string& name, const char* operation) {
  const auto names = all_adapter_names(model);
  TORCH_CHECK(std::find(names.begin(), names.end(), name) != names.end(), "lora: cannot ", operation,
              " unknown adapter '", name, "' (the model has: ", join(names), ")");
}

/// The configuration adapter `name` was attached with (the same one in every layer), or
/// nullptr when it was added to layers directly.
inline std::shared_ptr<const LoraConfig> model_adapter_config(const torch::nn::Module& model, const std::string& name) {
  std::shared_ptr<const LoraConfig> config;
  for (const auto& [path, layer] : layers_with(model, name)) {
    auto own = layer->adapter_config(name);
    TORCH_CHECK(own != nullptr || config == nullptr, "lora: adapter '", name, "' of layer '", path,
                "' was attached without a model-level config while other layers have one");
    if (config == nullptr) config = own;
  }
  return config;
}

/// The biases that adapter `name` trains besides its adapters, under PEFT's in-memory names
/// (adapter name removed, which is how PEFT writes them): with bias "lora_only" the base bias
/// of each layer holding a LoRA adapter (`….query.base_layer.bias`); with "all" every
/// parameter whose name contains "bias" (PEFT's test), outside saved modules, a LoRA layer's
/// as `….base_layer.bias` and any other as its own name (`….key.bias`).
inline std::vector<std::pair<std::string, at::Tensor>> trained_biases(const torch::nn::Module& model,
                                                                     const std::string& name) {
  std::vector<std::pair<std::string, at::Tensor>> biases;
  const auto config = model_adapter_config(model, name);
  if (config == nullptr || config->bias() == BiasMode::kNone) return biases;
  const auto layers = adapter_layers(model);
  if (config->bias() == BiasMode::kLoraOnly) {
    for (const auto& [path, layer] : lora_layers(model)) {
      if (!layer->has_adapter(name)) continue;
      if (layer->base_bias().defined()) biases.emplace_back(join_path(path, "base_layer.bias"), layer->base_bias());
    }
    return biases;
  }
  for (const auto& item : model.named_parameters()) {
    const auto [owner, relative] = owning_layer(layers, item.key());
    if (owner == nullptr) {
      if (item.key().find("bias") != std::string::npos) biases.emplace_back(item.key(), item.value());
      continue;
    }
    auto lora = std::dynamic_pointer_cast<LoRALayer>(owner->second);
    if (lora == nullptr || !starts_with(relative, "base_layer.")) continue;  // saved modules; adapter tensors
    const auto base_name = relative.substr(std::string("base_layer.").size());
    if (base_name.find("bias") == std::string::npos) continue;
    // PEFT wraps a layer (and names its base `base_layer`) only when some adapter targets it.
    const bool wrapped = !lora->adapter_names().empty();
    biases.emplace_back(join_path(owner->first, wrapped ? relative : base_name), item.value());
  }
  return biases;
}

/// Keys PEFT ≤ 0.20 writes with bias "all" that are copies of a saved module's bias (its
/// frozen original and a stray `modules_to_save.bias`), which loading ignores as PEFT does.
inline bool is_saved_module_bias_echo(const std::vector<std::pair<std::string, std::shared_ptr<AdapterLayer>>>& saved,
                                      const std::string& key) {
  for (const auto& [path, layer] : saved) {
    for (const std::string middle : {".original_module.", ".modules_to_save."}) {
      const auto head = path + middle;
      if (starts_with(key, head) && key.find("bias", head.size()) != std::string::npos) return true;
    }
  }
  return false;
}

}  // namespace detail

/// Adapter `name`'s tensors under PEFT's file keys: `prefix` + module path + `.lora_A.weight`,
/// `.lora_B.weight`, `.lora_magnitude_vector`; saved modules by their own names
/// (`base_model.model.classifier.weight`); and the biases the adapter trains (bias "all" or
/// "lora_only", see `LoraConfig::bias`) as PEFT names them (`….query.base_layer.bias`).
inline torch::OrderedDict<std::string, at::Tensor> adapter_state_dict(const torch::nn::Module& model,
                                                                      const std::string& name = "default",
                                                                      const std::string& prefix = "base_model.model.") {
  detail::check_model_adapter(model, name, "save");
  torch::OrderedDict<std::string, at::Tensor> state("adapter tensor");
  for (const auto& [path, layer] : detail::layers_with(model, name)) {
    for (const auto& [key, tensor] : layer->adapter_state(name)) state.insert(prefix + detail::join_path(path, key), tensor);
  }
  for (const auto& [key, tensor] : detail::trained_biases(model, name)) {
    if (!state.contains(prefix + key)) state.insert(prefix + key, tensor);
  }
  return state;
}

/// Copies adapter tensors saved under PEFT's file keys (as `adapter_state_dict` writes them)
/// into adapter `name`, which must already be attached (by `inject` with a matching config).
/// Every adapter tensor must be present with the same shape, except the biases (PEFT 0.10
/// drops "lora_only" biases) and the saved modules that the task type implies (which keep
/// their values, as in PEFT); every key of `state` must belong to the adapter. Otherwise
/// nothing is copied and the error lists the offending keys. Returns the keys copied.
inline std::vector<std::string> load_adapter_state_dict(torch::nn::Module& model,
                                                        const torch::OrderedDict<std::string, at::Tensor>& state,
                                                        const std::string& name = "default",
                                                        const std::string& prefix = "base_model.model.") {
  detail::check_model_adapter(model, name, "load");
  const auto holders = detail::layers_with(model, name);
  for (const auto& [path, layer] : lora_layers(model)) {
    const auto& merged = layer->merged_adapters();
    TORCH_CHECK(std::find(merged.begin(), merged.end(), name) == merged.end(), "lora: cannot load adapter '", name,
                "' while it is merged into '", path, "'; call unmerge first");
  }
  const auto config = detail::model_adapter_config(model, name);
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  std::vector<std::string> missing, copied;
  std::set<std::string> used;
  auto take = [&](const std::string& full, const at::Tensor& destination, bool required) {
    const auto* source = state.find(full);
    if (source == nullptr) {
      if (required) missing.push_back(full);
      return;
    }
    TORCH_CHECK(source->sizes() == destination.sizes(), "lora: adapter tensor '", full, "' has shape ", source->sizes(),
                " but adapter '", name, "' expects ", destination.sizes());
    copies.emplace_back(destination, *source);
    copied.push_back(full);
    used.insert(full);
  };
  std::vector<std::pair<std::string, std::shared_ptr<AdapterLayer>>> saved;
  for (const auto& holder : holders) {
    const auto& path = holder.first;  // C++17 lambdas cannot capture structured bindings
    const auto& layer = holder.second;
    const bool is_lora = std::dynamic_pointer_cast<LoRALayer>(layer) != nullptr;
    if (!is_lora) saved.emplace_back(path, layer);
    // A saved module only the task type implies ("classifier" for SEQ_CLS) may be absent.
    bool required = true;
    if (!is_lora && config != nullptr) {
      const auto task = config->task_modules();
      const auto& listed = config->modules_to_save();
      auto is_task_head = [&](const std::string& key) { return std::find(task.begin(), task.end(), key) != task.end(); };
      const bool by_task = std::any_of(task.begin(), task.end(), [&](const std::string& key) { return detail::ends_with(path, key); });
      const bool by_list = std::any_of(listed.begin(), listed.end(), [&](const std::string& key) {
        return !is_task_head(key) && detail::ends_with(path, key);
      });
      required = !by_task || by_list;
    }
    for (const auto& [key, tensor] : layer->adapter_state(name)) take(prefix + detail::join_path(path, key), tensor, required);
  }
  for (const auto& [key, tensor] : detail::trained_biases(model, name)) {
    if (!used.count(prefix + key)) take(prefix + key, tensor, /*required=*/false);
  }
  TORCH_CHECK(missing.empty(), "lora: the adapter state lacks ", missing.size(), " tensor(s) of adapter '", name,
              "': ", detail::join(missing));
  std::vector<std::string> unknown;
  for (const auto& item : state) {
    if (used.count(item.key())) continue;
    const bool echo = config != nullptr && config->bias() == BiasMode::kAll &&
                      detail::starts_with(item.key(), prefix) &&
                      detail::is_saved_module_bias_echo(saved, item.key().substr(prefix.size()));
    if (!echo) unknown.push_back(item.key());
  }
  TORCH_CHECK(unknown.empty(), "lora: the adapter state has ", unknown.size(), " tensor(s) adapter '", name,
              "' does not: ", detail::join(unknown));
  torch::NoGradGuard no_grad;
  for (auto& [destination, source] : copies) destination.copy_(source);
  return copied;
}

/// The model's parameters and buffers under the names of the model without adapters:
/// `….query.base_layer.weight` becomes `….query.weight`, a saved module reports its original
/// tensors under its own names, adapter tensors are left out. After `merge_and_unload` this
/// is the merged model's plain state dict.
inline torch::OrderedDict<std::string, at::Tensor> base_state_dict(const torch::nn::Module& model) {
  const auto layers = adapter_layers(model);
  torch::OrderedDict<std::string, at::Tensor> state("tensor");
  std::set<const void*> reported;  // layers already written
  auto add = [&](const std::string& key, const at::Tensor& tensor) {
    const auto [owner, relative] = detail::owning_layer(layers, key);
    (void)relative;
    if (owner == nullptr) {
      state.insert(key, tensor);
      return;
    }
    if (!reported.insert(owner->second.get()).second) return;
    for (const auto& [name, value] : owner->second->base_state()) state.insert(detail::join_path(owner->first, name), value);
  };
  for (const auto& item : model.named_parameters()) add(item.key(), item.value());
  for (const auto& item : model.named_buffers()) add(item.key(), item.value());
  return state;
}

}  // namespace lora
