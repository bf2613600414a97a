#pragma once

/// \file
/// Attach adapters to a native LibTorch model, and the model-level operations on them:
/// activate, disable, delete, merge, unload. Every operation checks the whole model first and
/// is all or nothing: a failure part-way restores what it had changed.
///
/// Adapters attach *in place* to layers the model declares as `lora::LoRALinear<>` (which
/// behave exactly like `torch::nn::Linear` until an adapter is attached), so they are on the
/// forward path by construction. A target that is a plain `torch::nn::Linear` is refused:
/// LibTorch's `replace_module` cannot reach the parent's typed member that `forward` calls.
/// Saved modules (`modules_to_save`) can be of any type (see `ModulesToSave`).

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <lora/config.hpp>
#include <lora/detail/strings.hpp>
#include <lora/detail/undo.hpp>
#include <lora/layer.hpp>
#include <lora/modules_to_save.hpp>
#include <lora/plan.hpp>
#include <lora/state_dict.hpp>
#include <lora/target.hpp>
#include <lora/trainable.hpp>

namespace lora {

namespace detail {

/// The parent of the module at `path` and the child's name in it.
inline std::pair<torch::nn::Module*, std::string> parent_of(torch::nn::Module& model, const std::string& path) {
  const auto dot = path.rfind('.');
  if (dot == std::string::npos) return {&model, path};
  const auto modules = model.named_modules("", /*include_self=*/false);
  const auto* parent = modules.find(path.substr(0, dot));
  TORCH_INTERNAL_ASSERT(parent != nullptr, "no parent module for '", path, "'");
  return {parent->get(), path.substr(dot + 1)};
}

/// The modules of `model` a config can select, in model order, with their objects: adapter
/// layers are leaves (their insides are their own business).
inline std::vector<std::pair<ModuleEntry, std::shared_ptr<torch::nn::Module>>> selectable_modules(
    const torch::nn::Module& model) {
  std::vector<std::pair<ModuleEntry, std::shared_ptr<torch::nn::Module>>> modules;
  std::vector<std::string> holders;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    const auto& name = item.key();
    if (std::any_of(holders.begin(), holders.end(), [&](const std::string& outer) { return is_inside(name, outer); })) {
      continue;
    }
    const auto& module = item.value();
    const auto is_linear = [](const std::shared_ptr<torch::nn::Module>& candidate) {
      if (auto layer = std::dynamic_pointer_cast<LoRALayer>(candidate)) return layer->layer_kind() == LayerKind::kLinear;
      return std::dynamic_pointer_cast<torch::nn::LinearImpl>(candidate) != nullptr;
    };
    bool linear = is_linear(module);
    if (auto saved = std::dynamic_pointer_cast<ModulesToSaveImpl>(module)) linear = is_linear(saved->module());
    if (std::dynamic_pointer_cast<AdapterLayer>(module)) holders.push_back(name);
    modules.push_back({{name, linear}, module});
  }
  return modules;
}

/// PEFT allows one adapter per model when any adapter trains biases: whose biases would they be?
inline void check_bias_adapters(const torch::nn::Module& model, const LoraConfig& config, const char* who) {
  for (const auto& name : all_adapter_names(model)) {
    const auto other = model_adapter_config(model, name);
    const bool biased = config.bias() != BiasMode::kNone || (other && other->bias() != BiasMode::kNone);
    TORCH_CHECK(!biased, who, ": the model already has adapter '", name, "'; with bias '", to_string(config.bias()),
                "'", other ? " (and '" + to_string(other->bias()) + "' for '" + name + "')" : std::string(),
                " only one adapter is supported, as in PEFT (the biases would be shared)");
  }
}

/// Does this init rewrite the base weight (PiSSA, OLoRA)?
inline bool rewrites_base_weight(const LoRAOptions& options) {
  const auto kind = parse_init(options.init()).kind;
  return kind == InitKind::kPiSSA || kind == InitKind::kOLoRA;
}

/// Records the state of the CPU generator and of those of `devices` (initialisations draw from
/// them), so that a failed attempt does not shift a seeded run.
inline void keep_generators(const std::vector<c10::Device>& devices, UndoLog& undo) {
  std::vector<at::Generator> generators{at::detail::getDefaultCPUGenerator()};
  for (const auto& device : devices) {
    if (device.is_cpu()) continue;
    const auto& generator = at::globalContext().defaultGenerator(device);
    if (std::none_of(generators.begin(), generators.end(), [&](const at::Generator& g) { return g == generator; })) {
      generators.push_back(generator);
    }
  }
  for (auto& generator : generators) {
    undo.add([generator, state = generator.get_state()]() mutable { generator.set_state(state); });
  }
}

/// Adds the plan's adapter to one layer, recording how to take it off again (and, for an
/// initialisation that rewrites the base weight, how to put the weight back).
inline void add_adapter_undoably(const std::shared_ptr<LoRALayer>& layer, const AdapterPlan& plan,
                                 const Selection& selection, UndoLog& undo, const char* who) {
  if (rewrites_base_weight(selection.options)) {
    undo.add([layer, kept = layer->base_weight().detach().clone()] {
      torch::NoGradGuard no_grad;
      layer->base_weight().copy_(kept);
    });
  }
  try {
    layer->add_adapter(plan.adapter_name, selection.options, plan.config);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, who, ": module '", selection.name, "': ", error.what_without_backtrace());
  }
  undo.add([layer, name = plan.adapter_name] { layer->delete_adapter(name); });
}

/// The saved modules and adapted layers `model` holds.
inline ExistingAdapters existing_adapters(const torch::nn::Module& model) {
  ExistingAdapters existing;
  for (const auto& [path, layer] : adapter_layers(model)) {
    if (layer->adapter_names().empty()) continue;
    (std::dynamic_pointer_cast<LoRALayer>(layer) ? existing.adapted : existing.saved).emplace_back(path, layer->adapter_names());
  }
  return existing;
}

}  // namespace detail

/// Plans adapter `adapter_name` on `model` as `config` selects it, with every check
/// `inject` makes, changing nothing. Throws naming the module and the problem.
inline AdapterPlan plan_injection(const torch::nn::Module& model, const LoraConfig& config,
                                  const std::string& adapter_name = "default") {
  const TargetMatcher matcher(config);
  detail::check_bias_adapters(model, config, "lora::inject");
  const auto modules = detail::selectable_modules(model);
  std::map<std::string, std::shared_ptr<torch::nn::Module>> by_name;
  std::vector<ModuleEntry> entries;
  for (const auto& [entry, module] : modules) {
    entries.push_back(entry);
    by_name[entry.name] = module;
  }
  AdapterPlan plan{adapter_name, std::make_shared<const LoraConfig>(config), {}};
  const auto existing = detail::existing_adapters(model);
  for (auto& selection : select_modules(matcher, entries, "lora::inject", "linear modules in the model")) {
    const auto& module = by_name.at(selection.name);
    auto wrapper = std::dynamic_pointer_cast<ModulesToSaveImpl>(module);
    detail::check_against_existing(selection, existing, "lora::inject");
    if (selection.saved) {
      try {
        wrapper ? wrapper->check_add_adapter(adapter_name)
                : ModulesToSaveImpl::check_wrappable(module, selection.name);
      } catch (const c10::Error& error) {
        TORCH_CHECK(false, "lora::inject: module '", selection.name, "': ", error.what_without_backtrace());
      }
      plan.modules.push_back(std::move(selection));
      continue;
    }
    auto layer = std::dynamic_pointer_cast<LoRALayer>(module);
    if (!layer) {
      TORCH_CHECK(!std::dynamic_pointer_cast<torch::nn::LinearImpl>(module), "lora::inject: module '", selection.name,
                  "' is a plain torch::nn::Linear. The model's forward calls it through its own typed member, "
                  "which replace_module cannot reach, so an adapter attached there would never run. Declare it as "
                  "lora::LoRALinear<> (it behaves exactly like torch::nn::Linear until an adapter is attached), or make "
                  "it adaptable in place with lora::make_adaptable");
      const bool plain_layer = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(module) ||
                               std::dynamic_pointer_cast<torch::nn::Conv1dImpl>(module) ||
                               std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(module);
      TORCH_CHECK(!plain_layer, "lora::inject: module '", selection.name, "' is a plain ", module->name(),
                  ", which the model calls through its own typed member. Declare it as lora::LoRAEmbedding / "
                  "lora::LoRAConv1d / lora::LoRAConv2d, or make it adaptable in place with lora::make_adaptable");
      TORCH_CHECK(false, "lora::inject: module '", selection.name, "' (", module->name(),
                  ") matches the targets but is not a layer adapters attach to; supported: lora::LoRALinear<Base>, "
                  "lora::LoRAEmbedding, lora::LoRAConv1d, lora::LoRAConv2d");
    }
    TORCH_CHECK(!layer->has_adapter(adapter_name), "lora::inject: adapter '", adapter_name,
                "' is already attached to '", selection.name, "'");
    try {
      layer->check_add_adapter(adapter_name, selection.options);
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::inject: module '", selection.name, "': ", error.what_without_backtrace());
    }
    plan.modules.push_back(std::move(selection));
  }
  return plan;
}

/// Applies a plan made by `plan_injection` for this model: attaches the adapters, wraps the
/// saved modules and freezes everything but the active adapters (and the chosen biases), as
/// PEFT's `get_peft_model` does (unless `freeze_the_rest` is false). All or nothing: on a failure part-way (a PiSSA decomposition
/// that does not converge, say) every change is undone, base weights included.
namespace detail {

/// `apply_plan`, recording the inverse of every change in `undo` (the caller commits).
inline InjectionReport apply_plan(torch::nn::Module& model, const AdapterPlan& plan, bool freeze_the_rest,
                                  UndoLog& undo) {
  const auto modules = model.named_modules("", /*include_self=*/false);
  std::vector<c10::Device> devices;
  for (const auto& selection : plan.modules) {
    const auto* found = modules.find(selection.name);
    if (auto layer = found ? std::dynamic_pointer_cast<LoRALayer>(*found) : nullptr) {
      devices.push_back(layer->base_weight().device());
    }
  }
  keep_generators(devices, undo);
  std::vector<std::pair<at::Tensor, bool>> flags;
  for (const auto& parameter : model.parameters()) flags.emplace_back(parameter, parameter.requires_grad());
  undo.add([flags] {
    for (const auto& [parameter, requires_grad] : flags) parameter.requires_grad_(requires_grad);
  });
  const auto& name = plan.adapter_name;
  for (const auto& selection : plan.modules) {
    const auto* found = modules.find(selection.name);
    TORCH_CHECK(found != nullptr, "lora::apply_plan: the model has no module '", selection.name,
                "' (was the plan made for another model?)");
    const auto module = *found;
    if (selection.saved) {
      if (auto wrapper = std::dynamic_pointer_cast<ModulesToSaveImpl>(module)) {
        wrapper->add_adapter(name, plan.config);
        undo.add([wrapper, name] { wrapper->delete_adapter(name); });
        continue;
      }
      auto [parent, child] = parent_of(model, selection.name);
      auto wrapper = std::make_shared<ModulesToSaveImpl>(module);
      wrapper->add_adapter(name, plan.config);
      parent->replace_module(child, wrapper);
      undo.add([parent = parent, child = child, wrapper] { parent->replace_module(child, wrapper->release(false)); });
      continue;
    }
    auto layer = std::dynamic_pointer_cast<LoRALayer>(module);
    TORCH_CHECK(layer != nullptr, "lora::apply_plan: module '", selection.name, "' is not a LoRA layer");
    add_adapter_undoably(layer, plan, selection, undo, "lora::inject");
  }
  if (freeze_the_rest) mark_only_lora_as_trainable(model, plan.config->bias());
  return plan.report();
}

}  // namespace detail

inline InjectionReport apply_plan(torch::nn::Module& model, const AdapterPlan& plan, bool freeze_the_rest = true) {
  detail::UndoLog undo;
  auto report = detail::apply_plan(model, plan, freeze_the_rest, undo);
  undo.commit();
  return report;
}

/// Attaches adapter `adapter_name` to every module of `model` that `config` selects and returns
/// what was attached where. The model remembers `config` for this adapter (saving it needs no
/// second copy). Nothing is changed when any check fails or the attachment fails part-way.
///
/// Errors: no module matches (the message lists the linear modules that exist); a
/// `modules_to_save`, `exclude_modules`, pattern or layer entry that selects nothing; a match
/// that is not a LoRA-adaptable layer (names its type; for a plain `torch::nn::Linear` says
/// how to make it adaptable); the adapter name already present on a matched layer.
///
///     auto report = lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(8).alpha(16))
///                                            .target_modules({"query", "value"})
///                                            .modules_to_save({"classifier"}));
inline InjectionReport inject(torch::nn::Module& model, const LoraConfig& config,
                              const std::string& adapter_name = "default") {
  return apply_plan(model, plan_injection(model, config, adapter_name));
}

/// Trains `names` in full as adapter `adapter_name` without any low-rank adapter (a
/// head-only baseline): each module whose name ends with an entry gets a trainable copy,
/// its original kept. Nothing else is frozen or unfrozen. All or nothing. PEFT has no file
/// format for an adapter without low-rank parts, so such an adapter cannot be saved with
/// `save_adapter` (save the model after `merge_and_unload` instead).
///
///     lora::add_modules_to_save(*model, {"classifier", "pooler.dense"});
inline InjectionReport add_modules_to_save(torch::nn::Module& model, const std::vector<std::string>& names,
                                           const std::string& adapter_name = "default") {
  TORCH_CHECK(!names.empty(), "lora::add_modules_to_save: no module names given");
  const auto names_in_use = detail::all_adapter_names(model);
  TORCH_CHECK(std::find(names_in_use.begin(), names_in_use.end(), adapter_name) == names_in_use.end(),
              "lora::add_modules_to_save: the model already has adapter '", adapter_name,
              "'; save modules with it through its LoraConfig (modules_to_save), or use another name");
  detail::check_bias_adapters(model, LoraConfig(), "lora::add_modules_to_save");
  const auto modules = detail::selectable_modules(model);
  std::vector<ModuleEntry> entries;
  for (const auto& item : modules) entries.push_back(item.first);
  for (const auto& key : names) {
    TORCH_CHECK(!key.empty(), "lora::add_modules_to_save: an entry is empty");
    const bool found = std::any_of(entries.begin(), entries.end(),
                                   [&](const ModuleEntry& entry) { return detail::ends_with(entry.name, key); });
    TORCH_CHECK(found, "lora::add_modules_to_save: entry '", key, "' matches no module; module names end with: ",
                detail::some(detail::name_endings(entries), 40));
  }
  AdapterPlan plan{adapter_name, std::make_shared<const LoraConfig>(LoraConfig().modules_to_save(names)), {}};
  const auto existing = detail::existing_adapters(model);
  std::vector<std::string> roots;
  for (const auto& item : modules) {
    const auto& entry = item.first;  // C++17 lambdas cannot capture structured bindings
    const auto& module = item.second;
    const bool named = std::any_of(names.begin(), names.end(),
                                   [&](const std::string& key) { return detail::ends_with(entry.name, key); });
    const bool nested = std::any_of(roots.begin(), roots.end(),
                                    [&](const std::string& root) { return detail::is_inside(entry.name, root); });
    if (!named || nested) continue;
    auto wrapper = std::dynamic_pointer_cast<ModulesToSaveImpl>(module);
    Selection selection{entry.name, true, LoRAOptions()};
    detail::check_against_existing(selection, existing, "lora::add_modules_to_save");
    try {
      wrapper ? wrapper->check_add_adapter(adapter_name) : ModulesToSaveImpl::check_wrappable(module, entry.name);
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::add_modules_to_save: module '", entry.name, "': ", error.what_without_backtrace());
    }
    roots.push_back(entry.name);
    plan.modules.push_back(std::move(selection));
  }
  return apply_plan(model, plan, /*freeze_the_rest=*/false);
}

/// Freezes (`trainable = false`) or unfreezes adapter `name` in every layer that holds it, for
/// good: a frozen adapter does not train even when active. Its trained biases follow.
inline void set_adapter_trainable(torch::nn::Module& model, const std::string& name, bool trainable) {
  detail::check_model_adapter(model, name, "freeze");
  for (const auto& item : detail::layers_with(model, name)) item.second->set_trainable(name, trainable);
  for (auto& item : detail::trained_biases(model, name)) item.second.requires_grad_(trainable);
}

/// Activates `name` in every layer that has it; layers without it compute their base output.
inline void set_adapter(torch::nn::Module& model, const std::string& name) {
  detail::check_model_adapter(model, name, "activate");
  const auto layers = adapter_layers(model);
  auto wanted = [&](const AdapterLayer& layer) {
    return layer.has_adapter(name) ? std::vector<std::string>{name} : std::vector<std::string>{};
  };
  for (const auto& item : layers) item.second->check_set_adapters(wanted(*item.second));
  for (const auto& item : layers) item.second->set_adapters(wanted(*item.second));
}

/// Activates several adapters; each layer activates those of them it has. A saved module can
/// have only one of them active.
inline void set_adapters(torch::nn::Module& model, const std::vector<std::string>& names) {
  for (const auto& name : names) detail::check_model_adapter(model, name, "activate");
  const auto layers = adapter_layers(model);
  auto wanted = [&](const AdapterLayer& layer) {
    std::vector<std::string> present;
    for (const auto& name : names) {
      if (layer.has_adapter(name)) present.push_back(name);
    }
    return present;
  };
  for (const auto& [path, layer] : layers) {
    try {
      layer->check_set_adapters(wanted(*layer));
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::set_adapters: module '", path, "': ", error.what_without_backtrace());
    }
  }
  for (const auto& item : layers) item.second->set_adapters(wanted(*item.second));
}

/// `enable_adapters(model, false)`: the model computes its base output (merged layers are
/// unmerged first, saved modules hold their original values); `true` restores the adapters.
inline void enable_adapters(torch::nn::Module& model, bool enabled) {
  for (const auto& item : adapter_layers(model)) item.second->enable_adapters(enabled);
}

/// Removes adapter `name` from every layer that has it. Refused (changing nothing) while it is
/// merged anywhere.
inline void delete_adapter(torch::nn::Module& model, const std::string& name) {
  detail::check_model_adapter(model, name, "delete");
  const auto layers = detail::layers_with(model, name);
  for (const auto& [path, layer] : layers) {
    try {
      layer->check_delete_adapter(name);
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::delete_adapter: module '", path, "': ", error.what_without_backtrace());
    }
  }
  for (const auto& item : layers) item.second->delete_adapter(name);
}

/// Renames adapter `from` to `to` in every layer that has it, all or nothing: refused
/// (changing nothing) when `to` is taken or not a valid name.
inline void rename_adapter(torch::nn::Module& model, const std::string& from, const std::string& to) {
  detail::check_model_adapter(model, from, "rename");
  const auto names = detail::all_adapter_names(model);
  TORCH_CHECK(to == from || std::find(names.begin(), names.end(), to) == names.end(), "lora::rename_adapter: adapter '",
              to, "' exists already (the model has: ", detail::join(names), ")");
  const auto layers = detail::layers_with(model, from);
  for (const auto& [path, layer] : layers) {
    try {
      layer->check_rename_adapter(from, to);
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::rename_adapter: module '", path, "': ", error.what_without_backtrace());
    }
  }
  for (const auto& item : layers) item.second->rename_adapter(from, to);
}

/// Merges the active adapters of every layer into its base weight, all or nothing: refused
/// while adapters are disabled (anywhere), and with `safe_merge` a layer whose merge would
/// write NaN/Inf stops the merge and the weights of the layers this call merged are restored
/// bit for bit. Saved modules need no merge (they already compute with their copy).
inline void merge(torch::nn::Module& model, bool safe_merge = false) {
  for (const auto& [path, layer] : adapter_layers(model)) {
    TORCH_CHECK(layer->adapter_names().empty() || layer->adapters_enabled(), "lora::merge: module '", path,
                "': cannot merge while adapters are disabled; call enable_adapters(model, true) first");
  }
  const auto layers = lora_layers(model);
  for (const auto& [path, layer] : layers) {
    try {
      layer->check_merge();
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::merge: module '", path, "': ", error.what_without_backtrace());
    }
  }
  detail::UndoLog undo;
  for (const auto& [path, layer] : layers) {
    const auto count = layer->merged_adapters().size();
    const auto kept = layer->base_weight().detach().clone();  // to restore it bit for bit
    try {
      layer->merge({}, safe_merge);  // itself all or nothing
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::merge: module '", path, "': ", error.what_without_backtrace());
    }
    if (layer->merged_adapters().size() != count) {
      undo.add([layer = layer, count, kept] { layer->rollback_merges(count, kept); });
    }
  }
  undo.commit();
}

/// Undoes every merge.
inline void unmerge(torch::nn::Module& model) {
  for (const auto& item : lora_layers(model)) item.second->unmerge();
}

/// Merges the active adapters and removes all adapter structure: every LoRA layer then holds
/// only its (merged) base layer, and every saved module is back in its parent holding the
/// active copy's values, so the model computes what it computed with the adapters and can be
/// saved or traced as a plain model (see `base_state_dict`). All or nothing, like `merge`.
inline void merge_and_unload(torch::nn::Module& model, bool safe_merge = false) {
  merge(model, safe_merge);
  for (const auto& item : lora_layers(model)) item.second->forget_adapters();
  for (const auto& [path, layer] : adapter_layers(model)) {
    if (auto wrapper = std::dynamic_pointer_cast<ModulesToSaveImpl>(layer)) {
      auto [parent, child] = detail::parent_of(model, path);
      parent->replace_module(child, wrapper->release(/*keep_active=*/true));
    }
  }
}

/// Removes all adapters without merging: the model is its original self again (saved modules
/// back in their parents with their original values).
inline void unload(torch::nn::Module& model) {
  for (const auto& item : lora_layers(model)) item.second->unload();
  for (const auto& [path, layer] : adapter_layers(model)) {
    if (auto wrapper = std::dynamic_pointer_cast<ModulesToSaveImpl>(layer)) {
      auto [parent, child] = detail::parent_of(model, path);
      parent->replace_module(child, wrapper->release(/*keep_active=*/false));
    }
  }
}

}  // namespace lora
