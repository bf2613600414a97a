#pragma once

/// \file
/// Adapters for models that do not declare adaptable layers: `lora::make_adaptable` turns the
/// plain `torch::nn::Linear`, `Embedding`, `Conv1d` and `Conv2d` members a config targets into
/// LoRA layers *in the module tree*, without touching the model's source.
///
/// A LibTorch model calls its submodules through typed members (`fc1->forward(x)`), which no
/// library can replace. So the tree gets a LoRA layer under the member's name (named as PEFT
/// names it: `fc1.base_layer.weight`, `fc1.lora_A.<adapter>.weight`), whose base layer shares
/// the member's tensors, and the member's `weight` is re-parametrised: inside a scope it is
/// W₀ + s·B·A (DoRA: rescaled rows), a tensor in the autograd graph of the adapters. Outside a
/// scope the member holds no weight at all, so a forward that forgot the scope fails (LibTorch
/// reports an undefined tensor) instead of running stale values.
///
///     struct NetImpl : torch::nn::Module { torch::nn::Linear fc1{...}, fc2{...}; ... };
///     auto adaptable = lora::make_adaptable(*net, config);   // fc1, fc2 become LoRA layers
///     lora::inject(*net, config);                            // or lora::io::load_adapter(*net, dir)
///     auto loss = adaptable.run([&] { return criterion(net->forward(x), y); });
///     loss.backward(); optimizer.step();                     // the next run() refreshes
///
/// Everything else (saving, loading, merging, several adapters) goes through the ordinary
/// model-level functions, since the tree holds ordinary LoRA layers. Dropout on the adapter
/// input cannot be expressed as a weight: adapters with dropout are refused while training.
/// `release()` puts the plain members back (after `merge_and_unload` or `unload`).

#include <algorithm>
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
#include <lora/conv.hpp>
#include <lora/embedding.hpp>
#include <lora/inject.hpp>
#include <lora/linear.hpp>
#include <lora/target.hpp>

namespace lora {

/// The plain layers `make_adaptable` re-parametrised, and the scope their weights are valid in.
class AdaptableLayers {
 public:
  /// One re-parametrised member: the plain module the model calls, and the LoRA layer that
  /// took its place in the tree.
  struct Target {
    std::string path;
    std::shared_ptr<torch::nn::Module> plain;
    std::shared_ptr<LoRALayer> layer;
    std::shared_ptr<torch::nn::Module> layer_module;
    at::Tensor* weight = nullptr;  ///< the plain module's `weight` member, which its forward reads
    at::Tensor* bias = nullptr;    ///< its `bias` member (nullptr for an Embedding)
  };

  /// While alive, every re-parametrised member holds its adapted weight. Scopes nest.
  class Scope {
   public:
    explicit Scope(AdaptableLayers& owner) : owner_(&owner) {
      if (owner_->depth_++ == 0) {
        try {
          owner_->refresh();
        } catch (...) {
          owner_->clear();
          --owner_->depth_;
          throw;
        }
      }
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    ~Scope() {
      if (--owner_->depth_ == 0) owner_->clear();
    }

   private:
    AdaptableLayers* owner_;
  };

  AdaptableLayers() = default;
  AdaptableLayers(const AdaptableLayers&) = delete;
  AdaptableLayers& operator=(const AdaptableLayers&) = delete;
  AdaptableLayers(AdaptableLayers&&) = default;
  AdaptableLayers& operator=(AdaptableLayers&&) = default;

  /// Runs `f` (a forward pass, or a whole loss computation) with the adapted weights in place.
  template <typename F>
  decltype(auto) run(F&& f) {
    Scope scope(*this);
    return std::forward<F>(f)();
  }

  /// The adapted weights in place until the returned scope ends.
  Scope scope() { return Scope(*this); }

  /// Puts the plain members back into the tree, holding the LoRA layers' base weights (with
  /// whatever was merged into them), and ends the re-parametrisation. Refused while a layer
  /// still has adapters (call `merge_and_unload` or `unload` first) or inside a scope.
  void release() {
    TORCH_CHECK(depth_ == 0, "lora::AdaptableLayers: cannot release inside a scope");
    for (const auto& target : targets_) {
      TORCH_CHECK(target.layer->adapter_names().empty(), "lora::AdaptableLayers: '", target.path,
                  "' still has adapters (", detail::join(target.layer->adapter_names()),
                  "); call lora::merge_and_unload or lora::unload first");
    }
    for (auto& target : targets_) {
      torch::NoGradGuard no_grad;
      auto plain_parameters = target.plain->named_parameters(/*recurse=*/false);
      auto weight = plain_parameters["weight"];
      weight.set_data(target.layer->base_weight());  // the layer may have moved, or been merged into
      *target.weight = weight;
      if (target.bias != nullptr && plain_parameters.contains("bias")) {
        auto bias = plain_parameters["bias"];
        bias.set_data(target.layer->base_bias());
        *target.bias = bias;
      }
      const auto [parent, child] = detail::parent_of(*root_, target.path);
      parent->replace_module(child, target.plain);
    }
    targets_.clear();
  }

  const std::vector<Target>& targets() const { return targets_; }
  bool in_scope() const { return depth_ > 0; }

 private:
  friend AdaptableLayers make_adaptable(torch::nn::Module& model, const LoraConfig& config);

  void refresh() {
    for (auto& target : targets_) {
      const bool training = target.layer_module->is_training();
      for (const auto& name : target.layer->active_adapters()) {
        const auto dropout = target.layer->adapter_options(name).dropout();
        TORCH_CHECK(!training || dropout == 0.0, "lora::AdaptableLayers: adapter '", name, "' of '", target.path,
                    "' has dropout ", dropout,
                    ", which a re-parametrised weight cannot apply (it acts on the layer's input); use dropout 0, or "
                    "declare the layer as a LoRA layer in the model");
      }
      *target.weight = target.layer->adapted_weight();
      if (target.bias != nullptr) *target.bias = target.layer->base_bias();
    }
  }

  void clear() {
    for (auto& target : targets_) *target.weight = at::Tensor();
  }

  std::shared_ptr<torch::nn::Module> root_;
  std::vector<Target> targets_;
  int depth_ = 0;
};

namespace detail {

/// A LoRA layer over a fresh module of the plain one's type whose tensors share the plain
/// module's storage (so merges land in it), built without moving torch's generator.
template <typename Kind>
std::shared_ptr<LoRAModuleImpl<Kind>> layer_over(const std::shared_ptr<typename Kind::BaseModule>& plain) {
  auto generator = at::detail::getDefaultCPUGenerator();
  const auto state = generator.get_state();
  auto shell = std::make_shared<typename Kind::BaseModule>(Kind::options(*plain));
  generator.set_state(state);
  torch::NoGradGuard no_grad;
  auto originals = plain->named_parameters(/*recurse=*/false);
  for (auto& item : shell->named_parameters(/*recurse=*/false)) item.value().set_data(originals[item.key()]);
  return std::make_shared<LoRAModuleImpl<Kind>>(torch::nn::ModuleHolder<typename Kind::BaseModule>(shell));
}

/// The target for `module` if it is a plain layer `make_adaptable` handles, else an empty one.
inline AdaptableLayers::Target adaptable_target(const std::string& path, const std::shared_ptr<torch::nn::Module>& module) {
  AdaptableLayers::Target target{path, module, nullptr, nullptr};
  auto finish = [&](auto layer, at::Tensor* weight, at::Tensor* bias) {
    target.layer = layer;
    target.layer_module = layer;
    target.weight = weight;
    target.bias = bias;
  };
  if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(module)) {
    finish(layer_over<LinearKind<torch::nn::LinearImpl>>(linear), &linear->weight, &linear->bias);
  } else if (auto embedding = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(module)) {
    finish(layer_over<EmbeddingKind>(embedding), &embedding->weight, nullptr);
  } else if (auto conv1 = std::dynamic_pointer_cast<torch::nn::Conv1dImpl>(module)) {
    finish(layer_over<ConvKind<1, torch::nn::Conv1dImpl>>(conv1), &conv1->weight, &conv1->bias);
  } else if (auto conv2 = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(module)) {
    finish(layer_over<ConvKind<2, torch::nn::Conv2dImpl>>(conv2), &conv2->weight, &conv2->bias);
  }
  return target;
}

}  // namespace detail

/// Re-parametrises the plain Linear / Embedding / Conv1d / Conv2d members of `model` that
/// `config` targets (its target rules, exclusions and layer filters, as `inject` applies them;
/// targets that already are LoRA layers are left alone) and returns their handle. Attach
/// adapters afterwards with `inject` or `load_adapter`, and run forward passes through the
/// handle (`run` or `scope`). All or nothing: a module the config targets that is of another
/// type, or a layer that cannot hold adapters (a grouped convolution), leaves the model
/// unchanged and throws naming it. The model must outlive the handle.
inline AdaptableLayers make_adaptable(torch::nn::Module& model, const LoraConfig& config) {
  const TargetMatcher matcher(config);
  const auto modules = detail::selectable_modules(model);
  std::vector<ModuleEntry> entries;
  for (const auto& item : modules) entries.push_back(item.first);
  AdaptableLayers result;
  result.root_ = model.weak_from_this().lock();
  TORCH_CHECK(result.root_ != nullptr, "lora::make_adaptable: the model must be owned by a shared_ptr (a module "
                                       "holder or std::make_shared), not allocated on the stack");
  for (const auto& selection : select_modules(matcher, entries, "lora::make_adaptable", "linear modules in the model")) {
    if (selection.saved) continue;
    const auto found = std::find_if(modules.begin(), modules.end(),
                                    [&](const auto& item) { return item.first.name == selection.name; });
    const auto& module = found->second;
    if (std::dynamic_pointer_cast<AdapterLayer>(module)) continue;  // declared already
    AdaptableLayers::Target target;
    try {
      target = detail::adaptable_target(selection.name, module);
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::make_adaptable: module '", selection.name, "': ", error.what_without_backtrace());
    }
    TORCH_CHECK(target.layer != nullptr, "lora::make_adaptable: module '", selection.name, "' (", module->name(),
                ") matches the targets but is not a torch::nn::Linear, Embedding, Conv1d or Conv2d");
    result.targets_.push_back(std::move(target));
  }
  // Nothing is swapped before every target is built.
  for (auto& target : result.targets_) {
    const auto [parent, child] = detail::parent_of(model, target.path);
    parent->replace_module(child, target.layer_module);
  }
  result.clear();
  return result;
}

}  // namespace lora
