#pragma once

/// \file
/// LoRA for TorchScript modules (`torch::jit::Module`, e.g. a Hugging Face BERT traced in
/// Python and loaded with `torch::jit::load`).
///
/// A scripted module's code cannot be changed, so adapters are applied by re-parametrising
/// weights: each targeted Linear gets a native `LoRALinear<>` whose base layer holds the very
/// tensors of the scripted submodule, and `refresh()` sets the scripted submodule's `weight`
/// attribute to W + s·B·A (a tensor in the autograd graph of A and B). Call `refresh()` before
/// every forward pass while training; the scripted weights themselves are never modified
/// except by `merge()` (and by PiSSA/OLoRA initialisations, which replace W by its residual).
/// Saved modules (`modules_to_save`) train in place, their original
/// values kept (see `ModulesToSave`).
///
/// Kept out of <lora/lora.hpp>: it pulls in the TorchScript headers.

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/ordered_dict.h>
#include <torch/script.h>

#include <lora/config.hpp>
#include <lora/detail/module_path.hpp>
#include <lora/detail/strings.hpp>
#include <lora/detail/undo.hpp>
#include <lora/inject.hpp>
#include <lora/linear.hpp>
#include <lora/modules_to_save.hpp>
#include <lora/plan.hpp>
#include <lora/state_dict.hpp>
#include <lora/target.hpp>

namespace lora {

namespace detail {

/// A `torch::nn::Linear` whose weight and bias *are* the given tensors (the scripted
/// module's own, not copies), so that merges land in them and a device move of either side is
/// seen by both.
class SharedLinearImpl : public torch::nn::LinearImpl {
 public:
  SharedLinearImpl(const at::Tensor& shared_weight, const at::Tensor& shared_bias)
      : torch::nn::LinearImpl(torch::nn::LinearOptions(shared_weight.size(1), shared_weight.size(0))
                                  .bias(shared_bias.defined())) {
    weight = shared_weight;
    parameters_["weight"] = shared_weight;
    if (shared_bias.defined()) {
      bias = shared_bias;
      parameters_["bias"] = shared_bias;
    }
  }
};

/// A native module tree whose parameters and buffers are the tensors of a scripted module
/// (same tensors, not copies): what a `ModulesToSave` wraps for TorchScript.
inline std::shared_ptr<torch::nn::Module> tensor_view(const torch::jit::Module& module) {
  auto root = std::make_shared<torch::nn::Module>(module.type()->name() ? module.type()->name()->name() : "Module");
  auto place = [&](const std::string& path, const at::Tensor& tensor, bool parameter) {
    const auto [node, leaf] = parent_for_path(*root, path);
    if (parameter) {
      node->register_parameter(leaf, tensor, tensor.requires_grad());
    } else {
      node->register_buffer(leaf, tensor);
    }
  };
  for (const auto& item : module.named_parameters(/*recurse=*/true)) place(item.name, item.value, true);
  for (const auto& item : module.named_buffers(/*recurse=*/true)) place(item.name, item.value, false);
  return root;
}

/// Registers `leaf` in `root` under the dotted `path`, creating plain modules on the way.
inline void register_path(torch::nn::Module& root, const std::string& path, std::shared_ptr<torch::nn::Module> leaf) {
  const auto [node, name] = parent_for_path(root, path);
  node->register_module(name, std::move(leaf));
}

/// Removes the module at `path` from `root`, and the plain modules on the way that become empty.
inline void unregister_path(torch::nn::Module& root, const std::string& path) {
  const auto dot = path.rfind('.');
  if (dot == std::string::npos) {
    root.unregister_module(path);
    return;
  }
  const auto parent_path = path.substr(0, dot);
  const auto modules = root.named_modules("", false);
  const auto* parent = modules.find(parent_path);
  TORCH_INTERNAL_ASSERT(parent != nullptr, "unregister_path: no '", parent_path, "'");
  (*parent)->unregister_module(path.substr(dot + 1));
  if ((*parent)->children().empty() && (*parent)->parameters().empty()) unregister_path(root, parent_path);
}

}  // namespace detail

/// Adapters attached to a TorchScript module, and their parameters as a native module tree.
///
///     auto scripted = torch::jit::load("bert.pt");
///     auto lora = lora::JitAdapters::inject(scripted, lora::LoraConfig(lora::LoRAOptions(8).alpha(16))
///                                                         .target_modules({"query", "value"}));
///     torch::optim::AdamW optimizer(lora.parameters(), torch::optim::AdamWOptions(1e-3));
///     for (...) {
///       lora.refresh();                       // W + s·B·A into the scripted weights
///       auto loss = ...(scripted.forward(inputs).toTensor());
///       optimizer.zero_grad(); loss.backward(); optimizer.step();
///     }
///     lora.merge();
///     scripted.save("bert-merged.pt");        // a plain TorchScript module again
class JitAdapters {
 public:
  /// Finds the targets in `module`, freezes every scripted parameter, attaches adapter
  /// `adapter_name` and applies it (`refresh()`). Nothing is changed when a check fails.
  static JitAdapters inject(torch::jit::Module& module, const LoraConfig& config,
                            const std::string& adapter_name = "default") {
    JitAdapters adapters(module);
    adapters.add_adapter(config, adapter_name);
    return adapters;
  }

  /// Adapters for `module`, none attached yet (see `add_adapter`).
  explicit JitAdapters(torch::jit::Module& module) : module_(module), root_(std::make_shared<torch::nn::Module>()) {}

  /// Attaches another adapter to the same scripted module (inactive until `set_adapter`).
  /// All or nothing: `plan` then `apply`.
  InjectionReport add_adapter(const LoraConfig& config, const std::string& adapter_name) {
    return apply(plan(config, adapter_name));
  }

  /// What `add_adapter(config, adapter_name)` would attach, checked in full, without changing
  /// anything.
  AdapterPlan plan(const LoraConfig& config, const std::string& adapter_name) const {
    const TargetMatcher matcher(config);
    TORCH_CHECK(config.adapter().dropout() == 0.0, "lora::JitAdapters: dropout must be 0 for TorchScript modules (got ",
                config.adapter().dropout(),
                "): adapters are applied by re-parametrising weights, which cannot drop out the adapter's input alone");
    TORCH_CHECK(config.bias() == BiasMode::kNone, "lora::JitAdapters: bias '", to_string(config.bias()),
                "' is not supported for TorchScript modules (only 'none')");
    std::vector<ModuleEntry> entries;
    std::map<std::string, torch::jit::Module> by_name;
    for (const auto& item : module_.named_modules()) {
      if (item.name.empty()) continue;
      entries.push_back({item.name, is_linear(item.value)});
      by_name.emplace(item.name, item.value);
    }
    const auto saved = saved_modules();
    // Another JitAdapters' re-parametrised weights (non-leaf tensors) would be frozen and
    // rewritten under it: one JitAdapters per scripted module.
    for (const auto& item : module_.named_parameters()) {
      if (item.value.is_leaf()) continue;
      const auto owner = item.name.substr(0, item.name.rfind('.'));
      TORCH_CHECK(find_target(owner) != nullptr, "lora::JitAdapters: '", item.name,
                  "' is re-parametrised by another JitAdapters; use that one to add adapters");
    }
    AdapterPlan plan{adapter_name, std::make_shared<const LoraConfig>(config), {}};
    const auto existing = detail::existing_adapters(*root_);
    for (auto& selection : select_modules(matcher, entries, "lora::JitAdapters", "Linear modules in the scripted module")) {
      const auto& name = selection.name;
      const auto& submodule = by_name.at(name);
      const auto wrapper = saved.find(name);
      detail::check_against_existing(selection, existing, "lora::JitAdapters");
      if (selection.saved) {
        try {
          if (wrapper != saved.end()) {
            wrapper->second->check_add_adapter(adapter_name);
          } else {
            ModulesToSaveImpl::check_wrappable(detail::tensor_view(submodule), name);
          }
        } catch (const c10::Error& error) {
          TORCH_CHECK(false, "lora::JitAdapters: module '", name, "': ", error.what_without_backtrace());
        }
        plan.modules.push_back(std::move(selection));
        continue;
      }
      TORCH_CHECK(is_linear(submodule), "lora::JitAdapters: module '", name, "' (",
                  submodule.type()->name()->qualifiedName(),
                  ") matches the targets but is not a Linear (a module of type *.Linear with a 2-D weight)");
      if (const auto* target = find_target(name)) {
        TORCH_CHECK(!target->layer->has_adapter(adapter_name), "lora::JitAdapters: adapter '", adapter_name,
                    "' is already attached to '", name, "'");
        try {
          target->layer->check_add_adapter(adapter_name, selection.options);
        } catch (const c10::Error& error) {
          TORCH_CHECK(false, "lora::JitAdapters: module '", name, "': ", error.what_without_backtrace());
        }
      } else {
        const auto weight = submodule.attr("weight").toTensor();
        try {
          check_linear_adapter(adapter_name, selection.options, weight.size(1), weight.size(0), weight.scalar_type());
        } catch (const c10::Error& error) {
          TORCH_CHECK(false, "lora::JitAdapters: module '", name, "': ", error.what_without_backtrace());
        }
      }
      plan.modules.push_back(std::move(selection));
    }
    return plan;
  }

  /// Applies a plan made by `plan` for this module: all or nothing (a failure part-way, such as
  /// a PiSSA decomposition that does not converge, restores the scripted module as it was).
  InjectionReport apply(const AdapterPlan& plan) {
    detail::UndoLog undo;
    auto report = apply(plan, undo);
    undo.commit();
    return report;
  }

  /// `apply`, recording the inverse of every change in `undo` instead of committing: the
  /// caller (an adapter load) commits once its own steps have succeeded too.
  InjectionReport apply(const AdapterPlan& plan, detail::UndoLog& undo) {
    // Undone last: the scripted weights as the restored adapters give them, and the generator
    // as it was (initialisations draw from it).
    undo.add([this] { refresh(); });
    detail::keep_generators({module_.parameters().size() ? (*module_.parameters().begin()).device() : c10::Device(c10::kCPU)},
                            undo);
    std::vector<std::pair<at::Tensor, bool>> flags;
    for (const auto& parameter : module_.parameters()) {
      if (parameter.is_leaf()) flags.emplace_back(parameter, parameter.requires_grad());  // ours are refreshed
    }
    undo.add([flags] {
      for (const auto& [parameter, requires_grad] : flags) parameter.requires_grad_(requires_grad);
    });
    if (targets_.empty() && saved_modules().empty()) {
      for (const auto& parameter : module_.parameters()) parameter.requires_grad_(false);
    }
    std::map<std::string, torch::jit::Module> by_name;
    for (const auto& item : module_.named_modules()) by_name.emplace(item.name, item.value);
    const auto& name = plan.adapter_name;
    for (const auto& selection : plan.modules) {
      const auto found = by_name.find(selection.name);
      TORCH_CHECK(found != by_name.end(), "lora::JitAdapters::apply: the scripted module has no submodule '",
                  selection.name, "' (was the plan made for another module?)");
      const auto& submodule = found->second;
      if (selection.saved) {
        const auto saved = saved_modules();
        if (const auto found = saved.find(selection.name); found != saved.end()) {
          auto wrapper = found->second;
          wrapper->add_adapter(name, plan.config);
          undo.add([wrapper, name] { wrapper->delete_adapter(name); });
          continue;
        }
        auto wrapper = std::make_shared<ModulesToSaveImpl>(detail::tensor_view(submodule));
        wrapper->add_adapter(name, plan.config);
        detail::register_path(*root_, selection.name, wrapper);
        undo.add([this, wrapper, path = selection.name] {
          wrapper->release(/*keep_active=*/false);
          detail::unregister_path(*root_, path);
        });
        continue;
      }
      auto* target = find_target(selection.name);
      if (target == nullptr) {
        target = &add_target(selection.name, submodule);
        undo.add([this, path = selection.name] { remove_target(path); });
      }
      detail::add_adapter_undoably(target->layer.ptr(), plan, selection, undo, "lora::JitAdapters");
    }
    refresh();
    return plan.report();
  }

  /// The scripted module the adapters act on.
  const torch::jit::Module& module() const { return module_; }
  torch::jit::Module& module() { return module_; }

  /// Writes each targeted submodule's adapted weight (W + s·B·A of its active adapters) into
  /// the scripted module. Call it before every forward pass while the adapters train: the
  /// result is part of the autograd graph of A and B. Under `torch::NoGradGuard` it only
  /// updates values. Forgetting it after an optimizer step makes the next backward fail
  /// ("backward through the graph a second time"), never silently train a stale copy.
  ///
  /// If the scripted module was moved (`scripted.to(device or dtype)`), the adapters follow it
  /// here; `to()` moves both at once.
  void refresh() {
    for (auto& target : targets_) {
      const auto current = target.submodule.attr("weight").toTensor();
      const auto base = target.layer->base_weight();
      bool moved = current.device() != base.device() || current.scalar_type() != base.scalar_type();
      for (const auto& parameter : target.layer->parameters()) moved = moved || parameter.device() != current.device();
      if (moved) {
        // The base follows the scripted weight's device and dtype; the adapters its device only
        // (their dtype is the user's choice, `adapter_dtype`).
        target.layer->to(current.device());
        target.layer->base_layer()->to(current.device(), current.scalar_type());
      }
      target.submodule.setattr("weight", target.layer->adapted_weight());
    }
  }

  /// Moves the scripted module and the adapters to `device` (and `dtype`, when given), then
  /// refreshes.
  void to(torch::Device device, c10::optional<at::ScalarType> dtype = c10::nullopt) {
    if (dtype) {
      module_.to(device, *dtype);
      root_->to(device, *dtype);
    } else {
      module_.to(device);
      root_->to(device);
    }
    refresh();
  }

  /// Activates `name` (in every targeted submodule that has it) and re-applies the weights;
  /// saved modules of other adapters go back to their original values.
  void set_adapter(const std::string& name) {
    lora::set_adapter(*root_, name);
    refresh();
  }

  /// `false`: the scripted module computes its original output; `true`: adapters again.
  void enable_adapters(bool enabled) {
    lora::enable_adapters(*root_, enabled);
    refresh();
  }

  /// Writes the active adapters into the scripted weights permanently (`safe_merge` checks for
  /// NaN/Inf first; all or nothing); `module.save()` then writes a plain TorchScript module.
  void merge(bool safe_merge = false) {
    lora::merge(*root_, safe_merge);
    refresh();
  }

  /// Undoes `merge()`.
  void unmerge() {
    lora::unmerge(*root_);
    refresh();
  }

  bool merged() const {
    return std::any_of(targets_.begin(), targets_.end(), [](const Target& t) { return t.layer->merged(); });
  }

  /// The adapter parameters as a native module tree: `bert.encoder.layer.0.attention.self.query`
  /// holds a `LoRALinear<>` whose frozen `base_layer` holds the scripted weight; a saved
  /// module is a `ModulesToSave` whose live values are the scripted tensors. Use it with the
  /// model-level functions of <lora/inject.hpp> and <lora/state_dict.hpp>.
  std::shared_ptr<torch::nn::Module> adapters() const { return root_; }

  /// Every trainable tensor: the active adapters' parameters and the saved modules' weights.
  std::vector<at::Tensor> parameters() const {
    std::vector<at::Tensor> out;
    for (const auto& parameter : root_->parameters()) {
      if (parameter.requires_grad()) out.push_back(parameter);
    }
    return out;
  }

  /// Adapter `name`'s tensors under PEFT's file keys (see `lora::adapter_state_dict`), saved
  /// modules included.
  torch::OrderedDict<std::string, at::Tensor> adapter_state_dict(const std::string& name = "default",
                                                                 const std::string& prefix = "base_model.model.") const {
    return lora::adapter_state_dict(*root_, name, prefix);
  }

  /// The qualified names of the targeted submodules, in module order.
  std::vector<std::string> target_names() const {
    std::vector<std::string> names;
    for (const auto& target : targets_) names.push_back(target.name);
    return names;
  }

  /// True for what the injector treats as a Linear: a module whose class is named `Linear`
  /// (`torch.nn.Linear` when traced or scripted) with a 2-D `weight`.
  static bool is_linear(const torch::jit::Module& module) {
    const auto type_name = module.type()->name();
    if (!type_name || type_name->name() != "Linear" || !module.hasattr("weight")) return false;
    const auto weight = module.attr("weight");
    return weight.isTensor() && weight.toTensor().dim() == 2;
  }

 private:
  struct Target {
    std::string name;
    torch::jit::Module submodule;
    LoRALinear<> layer{nullptr};
    at::Tensor original;  ///< the scripted weight tensor, to put back if the target is removed
  };

  const Target* find_target(const std::string& name) const {
    for (const auto& target : targets_) {
      if (target.name == name) return &target;
    }
    return nullptr;
  }
  Target* find_target(const std::string& name) {
    return const_cast<Target*>(static_cast<const JitAdapters*>(this)->find_target(name));
  }

  /// The saved modules by path.
  std::map<std::string, std::shared_ptr<ModulesToSaveImpl>> saved_modules() const {
    std::map<std::string, std::shared_ptr<ModulesToSaveImpl>> saved;
    for (const auto& [path, layer] : adapter_layers(*root_)) {
      if (auto wrapper = std::dynamic_pointer_cast<ModulesToSaveImpl>(layer)) saved.emplace(path, wrapper);
    }
    return saved;
  }

  Target& add_target(const std::string& name, torch::jit::Module submodule) {
    const auto weight = submodule.attr("weight").toTensor();
    const bool has_bias = submodule.hasattr("bias") && submodule.attr("bias").isTensor();
    const auto bias = has_bias ? submodule.attr("bias").toTensor() : at::Tensor();
    // Building the Linear draws a throwaway init: restore the generator so that adapters draw
    // exactly what the native injector (and PEFT) would.
    auto generator = at::detail::getDefaultCPUGenerator();
    const auto state = generator.get_state();
    auto shared = std::make_shared<detail::SharedLinearImpl>(weight, bias);
    generator.set_state(state);
    LoRALinear<> layer{torch::nn::Linear(std::shared_ptr<torch::nn::LinearImpl>(shared))};
    detail::register_path(*root_, name, layer.ptr());
    targets_.push_back({name, submodule, layer, weight});
    return targets_.back();
  }

  void remove_target(const std::string& name) {
    const auto found = std::find_if(targets_.begin(), targets_.end(), [&](const Target& t) { return t.name == name; });
    if (found == targets_.end()) return;
    found->submodule.setattr("weight", found->original);
    detail::unregister_path(*root_, name);
    targets_.erase(found);
  }

  torch::jit::Module module_;
  std::shared_ptr<torch::nn::Module> root_;
  std::vector<Target> targets_;
};

}  // namespace lora
