#pragma once

/// \file
/// Which parameters train: freeze everything but the adapters (PEFT's bias modes), and count
/// trainable versus total parameters.

#include <cstdint>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <lora/config.hpp>
#include <lora/layer.hpp>
#include <lora/state_dict.hpp>

namespace lora {

/// Freezes every parameter of `model` except the active adapters' (LoRA adapters and saved
/// modules' copies) and the biases `bias` names: with `kLoraOnly` the base bias of each layer
/// holding a LoRA adapter, with `kAll` every parameter whose name contains "bias" (PEFT's
/// rule) outside saved modules (whose original and inactive copies stay frozen, as in PEFT).
///
///     lora::mark_only_lora_as_trainable(*model, lora::BiasMode::kLoraOnly);
inline void mark_only_lora_as_trainable(torch::nn::Module& model, BiasMode bias = BiasMode::kNone) {
  for (auto& parameter : model.parameters()) parameter.requires_grad_(false);
  const auto layers = adapter_layers(model);
  for (const auto& [name, layer] : layers) layer->set_adapters(layer->active_adapters());  // active ones train
  if (bias == BiasMode::kLoraOnly) {
    for (const auto& [name, layer] : lora_layers(model)) {
      if (layer->adapter_names().empty()) continue;
      const auto layer_bias = layer->base_bias();
      if (layer_bias.defined()) layer_bias.requires_grad_(true);
    }
  }
  if (bias == BiasMode::kAll) {
    for (auto& item : model.named_parameters()) {
      if (item.key().find("bias") == std::string::npos) continue;
      const auto owner = detail::owning_layer(layers, item.key()).first;
      if (owner != nullptr && std::dynamic_pointer_cast<LoRALayer>(owner->second) == nullptr) continue;  // saved module
      item.value().requires_grad_(true);
    }
  }
}

/// Makes every parameter of `model` trainable, for full fine-tuning (LoRA layers freeze their
/// base weights when they are built, so a fresh model starts with its projections frozen).
/// Refused while the model holds adapters: full fine-tuning trains the base itself.
///
///     auto model = lora::models::load_bert_for_sequence_classification("bert-base-uncased");
///     lora::mark_all_as_trainable(*model);
inline void mark_all_as_trainable(torch::nn::Module& model) {
  for (const auto& [path, layer] : adapter_layers(model)) {
    TORCH_CHECK(layer->adapter_names().empty(), "lora::mark_all_as_trainable: module '", path, "' holds adapters (",
                detail::join(layer->adapter_names()), "); merge_and_unload or unload them before full fine-tuning");
  }
  for (auto& parameter : model.parameters()) parameter.requires_grad_(true);
}

/// Trainable and total parameter counts, PEFT's `print_trainable_parameters`.
struct ParameterCount {
  int64_t trainable = 0;
  int64_t total = 0;

  /// Share of trainable parameters, in percent (0 for an empty model).
  double trainable_percent() const { return total == 0 ? 0.0 : 100.0 * static_cast<double>(trainable) / total; }

  /// "trainable params: 8,450 || all params: 4,394,628 || trainable%: 0.1923"
  std::string to_string() const {
    std::ostringstream out;
    out.setf(std::ios::fixed);
    out.precision(4);
    out << "trainable params: " << grouped(trainable) << " || all params: " << grouped(total)
        << " || trainable%: " << trainable_percent();
    return out.str();
  }

 private:
  static std::string grouped(int64_t value) {
    std::string digits = std::to_string(value < 0 ? -value : value);
    for (int64_t i = static_cast<int64_t>(digits.size()) - 3; i > 0; i -= 3) digits.insert(i, ",");
    return value < 0 ? "-" + digits : digits;
  }
};

/// Counts each parameter tensor once, even when it is registered in several places.
inline ParameterCount count_parameters(const torch::nn::Module& model) {
  ParameterCount count;
  std::unordered_set<const void*> seen;
  for (const auto& parameter : model.parameters()) {
    if (!seen.insert(parameter.unsafeGetTensorImpl()).second) continue;
    count.total += parameter.numel();
    if (parameter.requires_grad()) count.trainable += parameter.numel();
  }
  return count;
}

/// Prints `count_parameters(model).to_string()` and a newline.
inline void print_trainable_parameters(const torch::nn::Module& model, std::ostream& out = std::cout) {
  out << count_parameters(model).to_string() << '\n';
}

}  // namespace lora
