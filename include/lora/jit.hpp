#pragma once

/// \file
/// LoRA for TorchScript modules (`torch::jit::Module`, e.g. a Hugging Face BERT traced in
/// Python and loaded with `torch::jit::load`).
///
/// A scripted module's code cannot be changed, so adapters are applied by re-parametrising
/// weights: each targeted Linear gets a native `LoRALinear<>` that shares its frozen weight,
/// and `refresh()` sets the scripted submodule's `weight` attribute to W + s·B·A (a tensor in
/// the autograd graph of A and B). Call `refresh()` before every forward pass while training;
/// the scripted weights themselves are never modified except by `merge()`.
///
/// Kept out of <lora/lora.hpp>: it pulls in the TorchScript headers.

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/ordered_dict.h>
#include <torch/script.h>
#include <ATen/CPUGeneratorImpl.h>

#include <lora/config.hpp>
#include <lora/detail/strings.hpp>
#include <lora/inject.hpp>
#include <lora/linear.hpp>
#include <lora/target.hpp>

namespace lora {

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
  InjectionReport add_adapter(const LoraConfig& config, const std::string& adapter_name) {
    const auto selected = plan(config, adapter_name);
    std::map<std::string, torch::jit::Module> by_name;
    for (const auto& item : module_.named_modules()) by_name.emplace(item.name, item.value);

    TORCH_CHECK(config.adapter().dropout() == 0.0, "lora::JitAdapters: dropout must be 0 for TorchScript modules (got ",
                config.adapter().dropout(),
                "): adapters are applied by re-parametrising weights, which cannot drop out the adapter's input alone");

    if (targets_.empty() && saved_.empty()) {
      for (const auto& parameter : module_.parameters()) parameter.requires_grad_(false);
    }
    InjectionReport report;
    report.adapter_name = adapter_name;
    for (const auto& selection : selected) {
      const auto& options = selection.options;
      if (selection.saved) {
        save_module(selection.name, by_name.at(selection.name), adapter_name);
        report.entries.push_back({selection.name, true, 0, 0, 0});
        continue;
      }
      auto* target = find_target(selection.name);
      if (target == nullptr) target = &add_target(selection.name, by_name.at(selection.name));
      target->layer->add_adapter(adapter_name, options);
      report.entries.push_back({selection.name, false, options.r(), options.alpha(), options.scaling()});
    }
    refresh();
    return report;
  }

  /// What `add_adapter(config, adapter_name)` would attach, checked in full, without changing
  /// anything: the selected modules and their options.
  std::vector<Selection> plan(const LoraConfig& config, const std::string& adapter_name) const {
    const TargetMatcher matcher(config);
    TORCH_CHECK(config.adapter().dropout() == 0.0, "lora::JitAdapters: dropout must be 0 for TorchScript modules (got ",
                config.adapter().dropout(),
                "): adapters are applied by re-parametrising weights, which cannot drop out the adapter's input alone");
    std::vector<std::pair<std::string, bool>> names;
    std::map<std::string, torch::jit::Module> by_name;
    for (const auto& item : module_.named_modules()) {
      if (item.name.empty()) continue;
      names.emplace_back(item.name, is_linear(item.value));
      by_name.emplace(item.name, item.value);
    }
    auto selected = select_modules(matcher, names, "lora::JitAdapters", "Linear modules in the scripted module");
    for (const auto& selection : selected) {
      const auto& name = selection.name;
      const auto& submodule = by_name.at(name);
      if (selection.saved) {
        TORCH_CHECK(!find_saved(name), "lora::JitAdapters: module '", name, "' is already saved by adapter '",
                    find_saved(name)->adapter, "'; one saved copy per module is supported for TorchScript");
        continue;
      }
      TORCH_CHECK(is_linear(submodule), "lora::JitAdapters: module '", name, "' (",
                  submodule.type()->name()->qualifiedName(),
                  ") matches the targets but is not a Linear (a module of type *.Linear with a 2-D weight)");
      for (const auto& target : targets_) {
        TORCH_CHECK(target.name != name || !target.layer->has_adapter(adapter_name), "lora::JitAdapters: adapter '",
                    adapter_name, "' is already attached to '", name, "'");
      }
    }
    return selected;
  }

  /// The scripted module the adapters act on.
  const torch::jit::Module& module() const { return module_; }

  /// Writes each targeted submodule's adapted weight (W + s·B·A of its active adapters) into
  /// the scripted module. Call it before every forward pass while the adapters train: the
  /// result is part of the autograd graph of A and B. Under `torch::NoGradGuard` it only
  /// updates values. Forgetting it after an optimizer step makes the next backward fail
  /// ("backward through the graph a second time"), never silently train a stale copy.
  void refresh() {
    for (auto& target : targets_) target.submodule.setattr("weight", target.layer->adapted_weight());
  }

  /// Activates `name` (in every targeted submodule that has it) and re-applies the weights;
  /// saved modules of other adapters go back to their original values.
  void set_adapter(const std::string& name) {
    lora::set_adapter(*root_, name);
    for (auto& saved : saved_) {
      restore_saved(saved, saved.adapter == name);
      for (const auto& item : saved.submodule.named_parameters(/*recurse=*/true)) {
        item.value.requires_grad_(saved.adapter == name);
      }
    }
    refresh();
  }

  /// `false`: the scripted module computes its original output; `true`: adapters again.
  void enable_adapters(bool enabled) {
    lora::enable_adapters(*root_, enabled);
    for (auto& saved : saved_) restore_saved(saved, enabled);
    refresh();
  }

  /// Writes the active adapters into the scripted weights permanently (`safe_merge` checks for
  /// NaN/Inf first); `module.save()` then writes a plain TorchScript module.
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
  /// holds a `LoRALinear<>` whose frozen `base_layer` shares the scripted weight. Save it with
  /// `torch::save`; use it with the model-level functions of <lora/inject.hpp>.
  std::shared_ptr<torch::nn::Module> adapters() const { return root_; }

  /// Every trainable tensor: the active adapters' parameters and the saved modules' weights.
  std::vector<at::Tensor> parameters() const {
    std::vector<at::Tensor> out;
    for (const auto& parameter : root_->parameters()) {
      if (parameter.requires_grad()) out.push_back(parameter);
    }
    for (const auto& saved : saved_) {
      for (const auto& item : saved.submodule.named_parameters(/*recurse=*/true)) {
        if (item.value.requires_grad()) out.push_back(item.value);
      }
    }
    return out;
  }

  /// Adapter `name`'s tensors under PEFT's file keys (see `lora::adapter_state_dict`), saved
  /// modules included.
  torch::OrderedDict<std::string, at::Tensor> adapter_state_dict(const std::string& name = "default",
                                                                 const std::string& prefix = "base_model.model.") const {
    auto state = lora::adapter_state_dict(*root_, name, prefix);
    for (const auto& saved : saved_) {
      if (saved.adapter != name) continue;
      for (const auto& item : saved.submodule.named_parameters(/*recurse=*/true)) {
        state.insert(prefix + saved.name + "." + item.name, item.value);
      }
    }
    return state;
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
  };
  struct Saved {
    std::string name;
    std::string adapter;
    torch::jit::Module submodule;
    std::vector<std::pair<std::string, at::Tensor>> aside;  // the values not in use: original or trained
    bool disabled = false;
  };

  Target* find_target(const std::string& name) {
    for (auto& target : targets_) {
      if (target.name == name) return &target;
    }
    return nullptr;
  }

  const Saved* find_saved(const std::string& name) const {
    for (const auto& saved : saved_) {
      if (saved.name == name) return &saved;
    }
    return nullptr;
  }

  Target& add_target(const std::string& name, torch::jit::Module submodule) {
    const auto weight = submodule.attr("weight").toTensor();
    const bool has_bias = submodule.hasattr("bias") && submodule.attr("bias").isTensor();
    // A native Linear sharing the scripted weight and bias (same storage, so merges land there).
    // Building it draws a throwaway init: restore the generator so that adapters draw exactly
    // what the native injector (and PEFT) would.
    auto generator = at::detail::getDefaultCPUGenerator();
    const auto state = generator.get_state();
    torch::nn::Linear base(torch::nn::LinearOptions(weight.size(1), weight.size(0)).bias(has_bias));
    generator.set_state(state);
    base->weight.set_data(weight.detach());
    if (has_bias) base->bias.set_data(submodule.attr("bias").toTensor().detach());
    LoRALinear<> layer(base);
    register_path(name, layer.ptr());
    targets_.push_back({name, submodule, layer});
    return targets_.back();
  }

  void save_module(const std::string& name, torch::jit::Module submodule, const std::string& adapter) {
    Saved saved{name, adapter, submodule, {}};
    for (const auto& item : submodule.named_parameters(/*recurse=*/true)) {
      saved.aside.emplace_back(item.name, item.value.detach().clone());
      item.value.requires_grad_(true);
    }
    saved_.push_back(std::move(saved));
  }

  /// Disabling puts the original values in the scripted module and keeps the trained ones
  /// aside; enabling swaps them back.
  static void restore_saved(Saved& saved, bool enabled) {
    if (saved.disabled != enabled) return;  // already in the requested state
    torch::NoGradGuard no_grad;
    for (auto& [path, aside] : saved.aside) {
      auto live = live_parameter(saved.submodule, path);
      auto in_use = live.detach().clone();
      live.copy_(aside);
      aside = in_use;
    }
    saved.disabled = !enabled;
  }

  static at::Tensor live_parameter(const torch::jit::Module& module, const std::string& path) {
    for (const auto& item : module.named_parameters(/*recurse=*/true)) {
      if (item.name == path) return item.value;
    }
    TORCH_INTERNAL_ASSERT(false, "saved parameter '", path, "' disappeared");
    return {};  // unreachable
  }

  void register_path(const std::string& name, std::shared_ptr<torch::nn::Module> leaf) {
    auto node = root_;
    size_t start = 0;
    while (true) {
      const auto dot = name.find('.', start);
      const auto part = name.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (dot == std::string::npos) {
        node->register_module(part, std::move(leaf));
        return;
      }
      const auto children = node->named_children();
      auto child = children.find(part);
      node = child ? *child : node->register_module(part, std::make_shared<torch::nn::Module>());
      start = dot + 1;
    }
  }

  torch::jit::Module module_;
  std::shared_ptr<torch::nn::Module> root_;
  std::vector<Target> targets_;
  std::vector<Saved> saved_;
};

}  // namespace lora
