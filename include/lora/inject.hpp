#pragma once

/// \file
/// Attach adapters to a native LibTorch model, and the model-level operations on them:
/// activate, disable, delete, merge, unload, adapter state with PEFT's key names.
///
/// Adapters attach *in place* to layers the model declares as `lora::LoRALinear<>` (which
/// behave exactly like `torch::nn::Linear` until an adapter is attached), so they are on the
/// forward path by construction. A target that is a plain `torch::nn::Linear` is refused:
/// LibTorch's `replace_module` cannot reach the parent's typed member that `forward` calls.

#include <algorithm>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/ordered_dict.h>

#include <lora/config.hpp>
#include <lora/detail/strings.hpp>
#include <lora/layer.hpp>
#include <lora/target.hpp>
#include <lora/trainable.hpp>

namespace lora {

/// What `inject` attached where.
struct InjectionReport {
  struct Entry {
    std::string module;  ///< qualified module name
    bool saved = false;  ///< a trainable copy (modules_to_save) rather than a low-rank adapter
    int64_t r = 0;
    double alpha = 0;
    double scaling = 0;
  };
  std::string adapter_name;
  std::vector<Entry> entries;

  /// Qualified names of the modules given low-rank adapters, in model order.
  std::vector<std::string> adapted_modules() const { return names(false); }
  /// Qualified names of the modules saved as trainable copies.
  std::vector<std::string> saved_modules() const { return names(true); }

  /// One line per module: "bert.encoder.layer.0.attention.self.query: r=8 alpha=16 (scaling 2)".
  std::string to_string() const {
    std::ostringstream out;
    out << "adapter '" << adapter_name << "': " << adapted_modules().size() << " adapted, " << saved_modules().size()
        << " saved\n";
    for (const auto& entry : entries) {
      out << "  " << entry.module << ": ";
      if (entry.saved) {
        out << "trainable copy\n";
      } else {
        out << "r=" << entry.r << " alpha=" << entry.alpha << " (scaling " << entry.scaling << ")\n";
      }
    }
    return out.str();
  }

 private:
  std::vector<std::string> names(bool saved) const {
    std::vector<std::string> out;
    for (const auto& entry : entries) {
      if (entry.saved == saved) out.push_back(entry.module);
    }
    return out;
  }
};

namespace detail {

/// A readable type name for error messages.
inline std::string module_type(const torch::nn::Module& module) {
  return module.name();
}

/// True for a module that lives inside a LoRA layer (its base layer or adapter parts).
inline bool inside_lora_layer(const std::string& name, const std::vector<std::string>& lora_names) {
  return std::any_of(lora_names.begin(), lora_names.end(), [&](const std::string& outer) {
    return name.size() > outer.size() + 1 && name.compare(0, outer.size() + 1, outer + ".") == 0;
  });
}

/// Every adapter name any layer of `model` holds.
inline std::vector<std::string> all_adapter_names(const torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& item : lora_layers(model)) {
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

}  // namespace detail

/// Attaches adapter `adapter_name` to every module of `model` that `config` selects and returns
/// what was attached where. Nothing is changed when any check fails.
///
/// Errors: no module matches (the message lists the linear modules that exist); a match that
/// is not a LoRA-adaptable layer (names its type; for a plain `torch::nn::Linear` says how to
/// make it adaptable); the adapter name already present on a matched layer.
///
///     auto report = lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(8).alpha(16))
///                                            .target_modules({"query", "value"})
///                                            .modules_to_save({"classifier"}));
inline InjectionReport inject(torch::nn::Module& model, const LoraConfig& config,
                              const std::string& adapter_name = "default") {
  const TargetMatcher matcher(config);
  const auto layers = lora_layers(model);
  std::vector<std::string> layer_names;
  for (const auto& item : layers) layer_names.push_back(item.first);

  // Every module outside LoRA layers, in model order, and whether it is linear (adaptable or not).
  std::vector<std::pair<std::string, bool>> names;
  std::map<std::string, std::shared_ptr<torch::nn::Module>> by_name;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (detail::inside_lora_layer(item.key(), layer_names)) continue;
    const bool linear = std::dynamic_pointer_cast<LoRALayer>(item.value()) != nullptr ||
                        std::dynamic_pointer_cast<torch::nn::LinearImpl>(item.value()) != nullptr;
    names.emplace_back(item.key(), linear);
    by_name[item.key()] = item.value();
  }

  struct Plan {
    Selection selection;
    std::shared_ptr<LoRALayer> layer;
  };
  std::vector<Plan> plans;
  for (auto& selection : select_modules(matcher, names, "lora::inject", "linear modules in the model")) {
    const auto& module = by_name.at(selection.name);
    auto layer = std::dynamic_pointer_cast<LoRALayer>(module);
    if (!layer) {
      TORCH_CHECK(!std::dynamic_pointer_cast<torch::nn::LinearImpl>(module), "lora::inject: module '", selection.name,
                  "' is a plain torch::nn::Linear. The model's forward calls it through its own typed member, "
                  "which replace_module cannot reach, so an adapter attached there would never run. Declare it as "
                  "lora::LoRALinear<> (it behaves exactly like torch::nn::Linear until an adapter is attached)");
      TORCH_CHECK(false, "lora::inject: module '", selection.name, "' (", detail::module_type(*module), ") matches ",
                  selection.saved ? "modules_to_save" : "the targets",
                  " but is not a Linear layer; supported: lora::LoRALinear<Base> (Linear-like layers)");
    }
    TORCH_CHECK(!layer->has_adapter(adapter_name), "lora::inject: adapter '", adapter_name,
                "' is already attached to '", selection.name, "'");
    try {  // every layer-level check, before any layer changes
      selection.saved ? layer->check_add_trainable_copy(adapter_name)
                      : layer->check_add_adapter(adapter_name, selection.options);
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::inject: module '", selection.name, "': ", error.what_without_backtrace());
    }
    plans.push_back({std::move(selection), layer});
  }

  InjectionReport report;
  report.adapter_name = adapter_name;
  for (const auto& [selection, layer] : plans) {
    const auto& options = selection.options;
    if (selection.saved) {
      layer->add_trainable_copy(adapter_name);
      report.entries.push_back({selection.name, true, 0, 0, 0});
    } else {
      layer->add_adapter(adapter_name, options);
      report.entries.push_back({selection.name, false, options.r(), options.alpha(), options.scaling()});
    }
  }
  // As PEFT's get_peft_model: everything but the active adapters (and chosen biases) freezes.
  mark_only_lora_as_trainable(model, config.bias());
  return report;
}

/// Activates `name` in every layer that has it; layers without it compute their base output.
inline void set_adapter(torch::nn::Module& model, const std::string& name) {
  detail::check_model_adapter(model, name, "activate");
  for (const auto& item : lora_layers(model)) {
    auto& layer = *item.second;
    layer.set_adapters(layer.has_adapter(name) ? std::vector<std::string>{name} : std::vector<std::string>{});
  }
}

/// Activates several adapters; each layer activates those of them it has.
inline void set_adapters(torch::nn::Module& model, const std::vector<std::string>& names) {
  for (const auto& name : names) detail::check_model_adapter(model, name, "activate");
  for (const auto& item : lora_layers(model)) {
    std::vector<std::string> present;
    for (const auto& name : names) {
      if (item.second->has_adapter(name)) present.push_back(name);
    }
    item.second->set_adapters(present);
  }
}

/// `enable_adapters(model, false)`: the model computes its base output (merged layers are
/// unmerged first); `true` restores the active adapters.
inline void enable_adapters(torch::nn::Module& model, bool enabled) {
  for (const auto& item : lora_layers(model)) item.second->enable_adapters(enabled);
}

/// Removes adapter `name` from every layer that has it.
inline void delete_adapter(torch::nn::Module& model, const std::string& name) {
  detail::check_model_adapter(model, name, "delete");
  for (const auto& item : lora_layers(model)) {
    if (item.second->has_adapter(name)) item.second->delete_adapter(name);
  }
}

/// Merges the active adapters of every layer into its base weight. With `safe_merge`, a layer
/// whose merge would write NaN/Inf stops the merge and the layers this call merged are
/// unmerged again.
inline void merge(torch::nn::Module& model, bool safe_merge = false) {
  std::vector<std::shared_ptr<LoRALayer>> merged_now;
  try {
    for (const auto& item : lora_layers(model)) {
      const bool was_merged = item.second->merged();
      item.second->merge({}, safe_merge);
      if (!was_merged && item.second->merged()) merged_now.push_back(item.second);
    }
  } catch (...) {
    for (auto& layer : merged_now) layer->unmerge();
    throw;
  }
}

/// Undoes every merge.
inline void unmerge(torch::nn::Module& model) {
  for (const auto& item : lora_layers(model)) item.second->unmerge();
}

/// Merges the active adapters and removes all adapter structure: every LoRA layer then holds
/// only its (merged) base layer and computes exactly what a plain Linear with those weights
/// computes, so the model can be saved or traced as a plain model (see `base_state_dict`).
inline void merge_and_unload(torch::nn::Module& model, bool safe_merge = false) {
  for (const auto& item : lora_layers(model)) item.second->merge_and_unload(safe_merge);
}

/// Removes all adapters without merging: the model is its original self again.
inline void unload(torch::nn::Module& model) {
  for (const auto& item : lora_layers(model)) item.second->unload();
}

/// Adapter `name`'s tensors under PEFT's file keys: `prefix` + module path + `.lora_A.weight`,
/// `.lora_B.weight`, `.lora_magnitude_vector`, and saved modules by their own parameter names
/// (`base_model.model.classifier.weight`).
inline torch::OrderedDict<std::string, at::Tensor> adapter_state_dict(const torch::nn::Module& model,
                                                                      const std::string& name = "default",
                                                                      const std::string& prefix = "base_model.model.") {
  detail::check_model_adapter(model, name, "save");
  torch::OrderedDict<std::string, at::Tensor> state("adapter tensor");
  for (const auto& [path, layer] : lora_layers(model)) {
    if (!layer->has_adapter(name)) continue;
    for (const auto& [key, tensor] : layer->adapter_state(name)) {
      state.insert(prefix + (path.empty() ? key : path + "." + key), tensor);
    }
  }
  return state;
}

/// Copies adapter tensors saved under PEFT's file keys (as `adapter_state_dict` writes them)
/// into adapter `name`, which must already be attached (by `inject` with a matching config).
/// Every key of `state` must belong to the adapter and every adapter tensor must be present,
/// with the same shape; otherwise nothing is copied and the error lists the offending keys.
inline void load_adapter_state_dict(torch::nn::Module& model, const torch::OrderedDict<std::string, at::Tensor>& state,
                                    const std::string& name = "default",
                                    const std::string& prefix = "base_model.model.") {
  detail::check_model_adapter(model, name, "load");
  for (const auto& [path, layer] : lora_layers(model)) {
    const auto& merged = layer->merged_adapters();
    TORCH_CHECK(std::find(merged.begin(), merged.end(), name) == merged.end(), "lora: cannot load adapter '", name,
                "' while it is merged into '", path, "'; call unmerge first");
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  std::vector<std::string> missing;
  size_t used = 0;
  for (const auto& [path, layer] : lora_layers(model)) {
    if (!layer->has_adapter(name)) continue;
    for (const auto& [key, tensor] : layer->adapter_state(name)) {
      const auto full = prefix + (path.empty() ? key : path + "." + key);
      const auto* source = state.find(full);
      if (source == nullptr) {
        missing.push_back(full);
        continue;
      }
      TORCH_CHECK(source->sizes() == tensor.sizes(), "lora: adapter tensor '", full, "' has shape ", source->sizes(),
                  " but adapter '", name, "' expects ", tensor.sizes());
      copies.emplace_back(tensor, *source);
      ++used;
    }
  }
  TORCH_CHECK(missing.empty(), "lora: the adapter state lacks ", missing.size(), " tensor(s) of adapter '", name,
              "': ", detail::join(missing));
  if (used != state.size()) {
    std::vector<std::string> unknown;
    for (const auto& item : state) {
      const bool known = std::any_of(copies.begin(), copies.end(), [&](const auto& copy) {
        return copy.second.is_same(item.value());
      });
      if (!known) unknown.push_back(item.key());
    }
    TORCH_CHECK(false, "lora: the adapter state has ", unknown.size(), " tensor(s) adapter '", name,
                "' does not: ", detail::join(unknown));
  }
  torch::NoGradGuard no_grad;
  for (auto& [destination, source] : copies) destination.copy_(source);
}

/// The model's parameters and buffers under the names of the model without adapters:
/// `….query.base_layer.weight` becomes `….query.weight`; adapter tensors are left out.
/// After `merge_and_unload` this is the merged model's plain state dict.
inline torch::OrderedDict<std::string, at::Tensor> base_state_dict(const torch::nn::Module& model) {
  const auto layers = lora_layers(model);
  torch::OrderedDict<std::string, at::Tensor> state("tensor");
  auto add = [&](const std::string& key, const at::Tensor& tensor) {
    for (const auto& [path, layer] : layers) {
      const std::string inside = path.empty() ? "" : path + ".";
      if (key.compare(0, inside.size(), inside) != 0) continue;
      const auto rest = key.substr(inside.size());
      if (rest.compare(0, 11, "base_layer.") == 0) {
        state.insert(inside + rest.substr(11), tensor);
      }
      return;  // adapter parts and trainable copies are not part of the base model
    }
    state.insert(key, tensor);
  };
  for (const auto& item : model.named_parameters()) add(item.key(), item.value());
  for (const auto& item : model.named_buffers()) add(item.key(), item.value());
  return state;
}

}  // namespace lora
