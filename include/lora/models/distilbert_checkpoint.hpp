#pragma once

/// \file
/// Hugging Face DistilBERT folders (`distilbert-base-uncased-finetuned-sst-2-english` and the
/// like): load them into `DistilBertForSequenceClassification`, save a model back.

#include <string>
#include <vector>

#include <lora/models/checkpoint.hpp>
#include <lora/models/distilbert.hpp>

namespace lora::models {

/// DistilBERT's names: `distilbert.`, the head `pre_classifier` + `classifier`; the masked-LM
/// head of `distilbert-base-uncased` (`vocab_transform`, `vocab_layer_norm`, `vocab_projector`)
/// and the old `position_ids` buffer ignored.
inline CheckpointLayout distilbert_layout(const DistilBertConfig& config) {
  return {"DistilBERT",
          "distilbert.",
          {"pre_classifier.", "classifier."},
          {"vocab_transform.", "vocab_layer_norm.", "vocab_projector."},
          {"embeddings.position_ids"},
          config.initializer_range};
}

/// transformers' `_init_weights` for DistilBERT: `init_encoder_weights`, then the fixed
/// sinusoidal positions when the config asks for them.
inline void init_distilbert_weights(DistilBertForSequenceClassificationImpl& model) {
  init_encoder_weights(model, model.config.initializer_range);
  if (model.config.sinusoidal_pos_embds) {
    detail::fill_sinusoidal(model.distilbert->embeddings->position_embeddings->weight);
  }
}

inline LoadReport load_distilbert_state(DistilBertForSequenceClassificationImpl& model,
                                        const torch::OrderedDict<std::string, at::Tensor>& checkpoint,
                                        const LoadOptions& options = {}, const std::string& where = "checkpoint") {
  return load_checkpoint_state(model, checkpoint, distilbert_layout(model.config), options, where);
}

/// Loads a Hugging Face DistilBERT folder as `DistilBertForSequenceClassification` (float32, CPU).
inline DistilBertForSequenceClassification load_distilbert_for_sequence_classification(
    const std::string& folder, const LoadOptions& options = {}) {
  DistilBertForSequenceClassification model(DistilBertConfig::from_file(
      config_path_for(folder, "distilbert", "load_distilbert_for_sequence_classification")));
  auto fresh = options;
  fresh.init_missing_classifier = true;
  load_distilbert_state(*model, read_checkpoint_tensors(folder, options.file_access), fresh, "'" + folder + "'");
  return model;
}

/// Writes `model` as a Hugging Face folder (config.json, model.safetensors, and vocab.txt when
/// `vocab_file` is given), replaced as one unit.
inline void save_distilbert(DistilBertForSequenceClassificationImpl& model, const std::string& folder,
                            const std::string& vocab_file = "") {
  std::vector<FolderFile> files;
  if (!vocab_file.empty()) files.emplace_back(vocab_file, "vocab.txt");
  save_checkpoint_folder(model, folder, model.config.to_json(), files, "save_distilbert");
}

}  // namespace lora::models
