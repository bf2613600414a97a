#pragma once

/// \file
/// Hugging Face RoBERTa folders (`cardiffnlp/twitter-roberta-base-sentiment-latest`,
/// `siebert/sentiment-roberta-large-english`, ...): load them into
/// `RobertaForSequenceClassification`, save a model back.

#include <string>
#include <vector>

#include <lora/models/checkpoint.hpp>
#include <lora/models/roberta.hpp>

namespace lora::models {

/// RoBERTa's names: `roberta.`, the head `classifier.{dense,out_proj}`; the masked-LM head
/// (`lm_head`), a pooler (sequence classification has none) and old buffers ignored.
inline CheckpointLayout roberta_layout(const RobertaConfig& config) {
  return {"RoBERTa",
          "roberta.",
          {"classifier."},
          {"lm_head.", "roberta.pooler."},
          {"embeddings.position_ids", "embeddings.token_type_ids"},
          config.initializer_range};
}

inline LoadReport load_roberta_state(RobertaForSequenceClassificationImpl& model,
                                     const torch::OrderedDict<std::string, at::Tensor>& checkpoint,
                                     const LoadOptions& options = {}, const std::string& where = "checkpoint") {
  return load_checkpoint_state(model, checkpoint, roberta_layout(model.config), options, where);
}

/// Loads a Hugging Face RoBERTa folder as `RobertaForSequenceClassification` (float32, CPU).
inline RobertaForSequenceClassification load_roberta_for_sequence_classification(const std::string& folder,
                                                                                 const LoadOptions& options = {}) {
  RobertaForSequenceClassification model(
      RobertaConfig::from_file(config_path_for(folder, "roberta", "load_roberta_for_sequence_classification")));
  auto fresh = options;
  fresh.init_missing_classifier = true;
  load_roberta_state(*model, read_checkpoint_tensors(folder, options.file_access), fresh, "'" + folder + "'");
  return model;
}

/// Writes `model` as a Hugging Face folder (config.json, model.safetensors, plus the tokenizer
/// files given, e.g. {{"vocab.json", "vocab.json"}, {"merges.txt", "merges.txt"}}), as one unit.
inline void save_roberta(RobertaForSequenceClassificationImpl& model, const std::string& folder,
                         const std::vector<FolderFile>& tokenizer_files = {}) {
  save_checkpoint_folder(model, folder, model.config.to_json(), tokenizer_files, "save_roberta");
}

}  // namespace lora::models
