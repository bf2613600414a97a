#pragma once

/// \file
/// Hugging Face BERT checkpoint folders (`config.json` + `model.safetensors`, optionally
/// sharded): load them into `BertForSequenceClassification`, save a model back (TorchScript
/// weight import: <lora/models/bert_torchscript.hpp>).

#include <string>
#include <vector>

#include <lora/models/bert.hpp>
#include <lora/models/checkpoint.hpp>

namespace lora::models {

/// BERT's names: `bert.`, the `classifier`, pretraining heads `cls.*` and the old
/// `position_ids` buffer ignored.
inline CheckpointLayout bert_layout(const BertConfig& config) {
  return {"BERT", "bert.", {"classifier."}, {"cls."}, {"embeddings.position_ids"}, config.initializer_range};
}

/// Initialises weights as transformers' `BertPreTrainedModel._init_weights` does (see
/// `init_encoder_weights`), with row `pad_token_id` of the word embeddings 0.
inline void init_bert_weights(torch::nn::Module& model, double initializer_range = 0.02, int64_t pad_token_id = 0) {
  init_encoder_weights(model, initializer_range);
  torch::NoGradGuard no_grad;
  for (auto& item : lora::base_state_dict(model)) {
    if (lora::detail::ends_with(item.key(), "word_embeddings.weight")) item.value()[pad_token_id].zero_();
  }
}

/// Copies a Hugging Face BERT state dict into `model` with `load_checkpoint_state`'s rules: a
/// plain `BertModel` checkpoint (keys without `bert.`), `LayerNorm.gamma/beta`, pretraining
/// heads and a missing classifier are accepted.
inline LoadReport load_bert_state(BertForSequenceClassificationImpl& model,
                                  const torch::OrderedDict<std::string, at::Tensor>& checkpoint,
                                  const LoadOptions& options = {}, const std::string& where = "checkpoint") {
  return load_checkpoint_state(model, checkpoint, bert_layout(model.config), options, where);
}

/// Loads a Hugging Face BERT folder (config.json + model.safetensors) as
/// `BertForSequenceClassification`, in float32 on the CPU (move it with `->to(device)`).
///
///     auto model = lora::models::load_bert_for_sequence_classification("bert-base-uncased");
inline BertForSequenceClassification load_bert_for_sequence_classification(const std::string& folder,
                                                                           const LoadOptions& options = {}) {
  BertForSequenceClassification model(
      BertConfig::from_file(config_path_for(folder, "bert", "load_bert_for_sequence_classification")));
  auto fresh = options;
  fresh.init_missing_classifier = true;  // a new model: transformers' initialisation, not LibTorch's
  load_bert_state(*model, read_checkpoint_tensors(folder, options.file_access), fresh, "'" + folder + "'");
  return model;
}

/// Writes `model` as a Hugging Face folder: config.json and model.safetensors, plus vocab.txt
/// when `vocab_file` is given, replaced as one unit (see `save_checkpoint_folder`).
inline void save_bert(BertForSequenceClassificationImpl& model, const std::string& folder,
                      const std::string& vocab_file = "") {
  std::vector<FolderFile> files;
  if (!vocab_file.empty()) files.emplace_back(vocab_file, "vocab.txt");
  save_checkpoint_folder(model, folder, model.config.to_json(), files, "save_bert");
}

}  // namespace lora::models
