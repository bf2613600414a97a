#pragma once

/// \file
/// Weights of a TorchScript BERT (a transformers model traced and saved with `torch.jit.save`)
/// for `BertForSequenceClassification`. Kept apart from <lora/models/bert_checkpoint.hpp>
/// because it pulls in the TorchScript headers.

#include <string>

#include <torch/ordered_dict.h>
#include <torch/script.h>

#include <lora/models/bert_checkpoint.hpp>

namespace lora::models {

/// Imports the weights of a TorchScript BERT by parameter name, with `load_bert_state`'s rules.
inline LoadReport load_bert_state_from_torchscript(BertForSequenceClassificationImpl& model,
                                                   const torch::jit::Module& scripted, const LoadOptions& options = {}) {
  torch::OrderedDict<std::string, at::Tensor> state("scripted tensor");
  for (const auto& item : scripted.named_parameters()) state.insert(item.name, item.value.detach());
  for (const auto& item : scripted.named_buffers()) state.insert(item.name, item.value.detach());
  return load_bert_state(model, state, options, "TorchScript module");
}

}  // namespace lora::models
