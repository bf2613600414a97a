#pragma once

/// \file
/// `lora::io::hotswap_adapter`: replaces a loaded adapter with another PEFT folder while the
/// base model stays as it is (PEFT 0.14's `hotswap_adapter`), also when the new adapter targets
/// other layers or has other ranks, which PEFT refuses.

#include <algorithm>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <lora/inject.hpp>
#include <lora/io/peft.hpp>
#include <lora/state_dict.hpp>
#include <lora/target.hpp>

namespace lora::io {

/// How `hotswap_adapter` replaced the adapter.
enum class SwapKind {
  /// Same layers, ranks, scales and saved modules: the new values were copied into the
  /// adapter's own tensors, which stay the same objects (an optimizer or a captured graph that
  /// holds them keeps working).
  kInPlace,
  /// Another structure: a new adapter was attached and took the old one's name and activity.
  kRebuilt,
};

struct HotswappedAdapter {
  LoraConfig config;
  SwapKind kind;
};

namespace detail {

/// True when the files can be copied into adapter `name` as it stands: the same tensor keys
/// and shapes, and every adapted layer's rank, alpha, rsLoRA, DoRA and dropout unchanged.
inline bool same_structure(const torch::nn::Module& model, const std::string& name, const AdapterFiles& files) {
  const auto current = adapter_state_dict(model, name, peft_prefix());
  if (current.size() != files.tensors.size()) return false;
  for (const auto& item : current) {
    const auto* incoming = files.tensors.find(item.key());
    if (incoming == nullptr || incoming->sizes() != item.value().sizes()) return false;
  }
  const auto attached = lora::detail::model_adapter_config(model, name);
  if (attached == nullptr || attached->bias() != files.config.bias()) return false;
  const TargetMatcher matcher(files.config);
  for (const auto& [path, layer] : lora_layers(model)) {
    if (!layer->has_adapter(name)) continue;
    const auto wanted = matcher.options_for(path);
    const auto& held = layer->adapter_options(name);
    if (wanted.r() != held.r() || wanted.alpha() != held.alpha() || wanted.use_rslora() != held.use_rslora() ||
        wanted.use_dora() != held.use_dora() || wanted.dropout() != held.dropout()) {
      return false;
    }
  }
  return true;
}

/// An adapter name the model does not use: `base` + `suffix` (+ "_" ...).
inline std::string unused_name(const torch::nn::Module& model, const std::string& base, const std::string& suffix) {
  const auto names = lora::detail::all_adapter_names(model);
  std::string candidate = base + suffix;
  while (std::find(names.begin(), names.end(), candidate) != names.end()) candidate += "_";
  return candidate;
}

}  // namespace detail

/// Replaces the values of adapter `name` with those of the PEFT folder `dir` (read as
/// `load_adapter(model, dir, name, options)` reads it). The base weights are not touched and no other
/// adapter changes.
///
/// When the structure is the same (see `SwapKind::kInPlace`) the values are copied in place and
/// the adapter keeps its activity and training flags. Otherwise the new adapter is attached
/// under a temporary name, then takes the old one's name and the old one goes: it is active in
/// each layer where the old one was active (and in layers new to it, if the old one was active
/// anywhere), trainable as `options.is_trainable` says. Either way the rest of the model keeps
/// its training flags and mode.
///
/// All or nothing: a bad folder, a shape that does not fit, a merged adapter (refused) leave
/// the model exactly as it was, still serving the old adapter.
///
///     lora::io::hotswap_adapter(*model, "adapters/alice-v2", "alice");
inline HotswappedAdapter hotswap_adapter(torch::nn::Module& model, const std::string& dir, const std::string& name,
                                         const LoadOptions& options = {}) {
  lora::detail::check_model_adapter(model, name, "hot-swap");
  for (const auto& [path, layer] : lora_layers(model)) {
    const auto& merged = layer->merged_adapters();
    TORCH_CHECK(std::find(merged.begin(), merged.end(), name) == merged.end(), "lora::io::hotswap_adapter: adapter '",
                name, "' is merged into '", path, "'; call unmerge first");
  }
  auto files = detail::read_adapter_files(dir, options.saved_as.value_or(name), options.warn);
  if (detail::same_structure(model, name, files)) {
    load_adapter_state_dict(model, files.tensors, name, detail::peft_prefix());
    const auto config = std::make_shared<const LoraConfig>(files.config);
    for (const auto& item : lora::detail::layers_with(model, name)) item.second->set_adapter_config(name, config);
    return {std::move(files.config), SwapKind::kInPlace};
  }

  // Each layer's active adapters, to put back after the swap.
  std::map<std::string, std::vector<std::string>> active_before;
  std::set<std::string> old_holders;
  bool was_active = false;
  for (const auto& [path, layer] : adapter_layers(model)) {
    const auto& active = layer->active_adapters();
    active_before[path] = active;
    if (layer->has_adapter(name)) old_holders.insert(path);
    was_active = was_active || std::find(active.begin(), active.end(), name) != active.end();
  }
  const auto temporary = detail::unused_name(model, name, "_hotswap");
  auto loaded = detail::attach_adapter(model, std::move(files), dir, temporary, options, /*as_a_load=*/false);
  // The new adapter serves beside the old one; now they trade names. Nothing here is expected
  // to fail (the names are free and valid, nothing is merged); should it, every step so far is
  // undone and the old adapter serves on.
  const auto backup = detail::unused_name(model, name, "_replaced");
  int renamed = 0;
  try {
    lora::rename_adapter(model, name, backup);
    ++renamed;
    lora::rename_adapter(model, temporary, name);
    ++renamed;
    lora::delete_adapter(model, backup);
  } catch (...) {
    if (renamed == 2) lora::rename_adapter(model, name, temporary);
    if (renamed >= 1) lora::rename_adapter(model, backup, name);
    lora::delete_adapter(model, temporary);
    for (const auto& [path, layer] : adapter_layers(model)) {
      const auto before = active_before.find(path);
      if (before != active_before.end()) layer->set_adapters(before->second);
    }
    throw;
  }
  // Layers keep their active sets; a layer the new adapter reaches first takes it in as active
  // when the old one was active, and stays inactive otherwise (a new saved module would else
  // serve its copy to everyone).
  for (const auto& [path, layer] : adapter_layers(model)) {
    std::vector<std::string> active;
    const auto before = active_before.find(path);
    if (before != active_before.end()) {
      for (const auto& other : before->second) {
        if (layer->has_adapter(other)) active.push_back(other);
      }
    }
    if (was_active && layer->has_adapter(name) && old_holders.count(path) == 0) {
      if (std::dynamic_pointer_cast<LoRALayer>(layer) == nullptr) active.clear();  // one saved copy at a time
      active.push_back(name);
    }
    layer->set_adapters(active);
  }
  return {std::move(loaded.config), SwapKind::kRebuilt};
}

}  // namespace lora::io
