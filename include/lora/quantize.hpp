#pragma once

/// \file
/// `lora::quantize_base`: QLoRA's idea where it pays on a CPU. The frozen weights of a model's
/// Linear layers (adapted or not) are stored int8 per output channel and multiplied by
/// LibTorch's dynamically quantised GEMM, while adapters, saved modules (heads) and every
/// other tensor stay fp32. Adapters train through it: the input gradient uses the weight
/// dequantised for the backward pass.

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include <lora/layer.hpp>
#include <lora/linear.hpp>

namespace lora {

/// What `quantize_base` changed.
struct QuantizeReport {
  std::vector<std::string> layers;  ///< qualified names of the layers now int8
  int64_t fp32_bytes = 0;           ///< bytes of fp32 weights released
  int64_t int8_bytes = 0;           ///< bytes of the int8 weights (and the engine's packed copies)
};

/// Stores int8 the frozen base weight of every `LoRALinear<>` (over `torch::nn::Linear`) in
/// `model` that is not already int8; trainable bases (full fine-tuning) and the modules inside
/// saved modules (`modules_to_save`, e.g. a classifier) keep fp32. All or nothing: every layer
/// is checked and every int8 copy made before any layer changes. One way: the fp32 weights are
/// released (reload the model to get them back), so merging is refused afterwards; save and
/// load adapters as usual. CPU only; call it after moving the model, before training or serving.
///
///     auto model = lora::models::load_bert_for_sequence_classification(dir);
///     lora::inject(*model, config);
///     const auto report = lora::quantize_base(*model);  // 12 × 6 projections int8 at bert-base
inline QuantizeReport quantize_base(torch::nn::Module& model) {
  std::vector<std::pair<std::string, std::shared_ptr<LoRALayer>>> chosen;
  for (auto& [name, layer] : lora_layers(model)) {
    if (std::dynamic_pointer_cast<LoRALinearImpl<>>(layer) == nullptr || layer->base_is_int8()) continue;
    if (layer->base_weight().requires_grad()) continue;
    layer->check_quantize_base();
    chosen.emplace_back(name, layer);
  }
  std::vector<std::shared_ptr<const detail::Int8Weight>> copies;
  copies.reserve(chosen.size());
  QuantizeReport report;
  for (const auto& [name, layer] : chosen) {
    try {
      copies.push_back(std::make_shared<const detail::Int8Weight>(layer->base_weight()));
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "lora::quantize_base: layer '", name, "': ", error.what_without_backtrace(),
                  " (no layer was changed)");
    }
    report.fp32_bytes += layer->base_weight().numel() * static_cast<int64_t>(layer->base_weight().element_size());
    report.int8_bytes += copies.back()->bytes();
  }
  // Nothing below throws: the checks ran and the copies exist.
  for (size_t i = 0; i < chosen.size(); ++i) {
    chosen[i].second->quantize_base(copies[i]);
    report.layers.push_back(chosen[i].first);
  }
  return report;
}

/// How many layers of `model` have an int8 base.
inline size_t int8_layer_count(const torch::nn::Module& model) {
  size_t count = 0;
  for (const auto& item : lora_layers(model)) count += item.second->base_is_int8() ? 1 : 0;
  return count;
}

}  // namespace lora
