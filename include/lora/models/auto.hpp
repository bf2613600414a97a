#pragma once

/// \file
/// One way to open any supported Hugging Face sequence classifier: `load_sequence_classifier`
/// reads `config.json`'s `model_type` ("bert", "distilbert", "roberta") and returns the model
/// behind one interface, with its folder's tokenizer from `lora::tokenizers::load_tokenizer`.
///
///     auto model = lora::models::load_sequence_classifier("distilbert-sst2");
///     auto tokenizer = lora::tokenizers::load_tokenizer("distilbert-sst2");
///     lora::inject(model.module(), lora::LoraConfig(lora::LoRAOptions(8)).target_modules(model.default_targets()));
///     auto batch = tokenizer->encode_batch({"a gripping film"}, model.max_tokens());
///     auto logits = model.forward(batch);

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <lora/models/bert_checkpoint.hpp>
#include <lora/models/distilbert_checkpoint.hpp>
#include <lora/models/roberta_checkpoint.hpp>
#include <lora/tokenizers/tokenizer.hpp>

namespace lora::models {

/// A sequence-classification model of any supported family. Copies share the model.
class SequenceClassifier {
 public:
  explicit SequenceClassifier(BertForSequenceClassification model)
      : module_(model.ptr()),
        model_type_("bert"),
        max_tokens_(model->config.max_position_embeddings),
        num_labels_(model->config.num_labels),
        vocab_size_(model->config.vocab_size),
        id2label_(model->config.id2label),
        default_targets_({"query", "value"}),
        head_({"bert.pooler.dense", "classifier"}),
        forward_([impl = model.ptr()](const at::Tensor& ids, const at::Tensor& mask, const at::Tensor& types) {
          return impl->forward(ids, mask, types);
        }),
        save_([impl = model.ptr()](const std::string& folder, const std::vector<FolderFile>& files) {
          save_checkpoint_folder(*impl, folder, impl->config.to_json(), files, "save");
        }) {}

  explicit SequenceClassifier(DistilBertForSequenceClassification model)
      : module_(model.ptr()),
        model_type_("distilbert"),
        max_tokens_(model->config.max_position_embeddings),
        num_labels_(model->config.num_labels),
        vocab_size_(model->config.vocab_size),
        id2label_(model->config.id2label),
        default_targets_({"q_lin", "v_lin"}),
        head_({"pre_classifier", "classifier"}),
        forward_([impl = model.ptr()](const at::Tensor& ids, const at::Tensor& mask, const at::Tensor&) {
          return impl->forward(ids, mask);  // DistilBERT has no token types
        }),
        save_([impl = model.ptr()](const std::string& folder, const std::vector<FolderFile>& files) {
          save_checkpoint_folder(*impl, folder, impl->config.to_json(), files, "save");
        }) {}

  explicit SequenceClassifier(RobertaForSequenceClassification model)
      : module_(model.ptr()),
        model_type_("roberta"),
        max_tokens_(model->config.max_tokens()),
        num_labels_(model->config.num_labels),
        vocab_size_(model->config.vocab_size),
        id2label_(model->config.id2label),
        default_targets_({"query", "value"}),
        head_({"classifier"}),
        forward_([impl = model.ptr()](const at::Tensor& ids, const at::Tensor& mask, const at::Tensor& types) {
          return impl->forward(ids, mask, types);
        }),
        save_([impl = model.ptr()](const std::string& folder, const std::vector<FolderFile>& files) {
          save_checkpoint_folder(*impl, folder, impl->config.to_json(), files, "save");
        }) {}

  /// config.json's `model_type`: "bert", "distilbert" or "roberta".
  const std::string& model_type() const { return model_type_; }
  /// The model itself, for `lora::inject`, `lora::io::load_adapter`, optimisers, `to(device)`.
  torch::nn::Module& module() const { return *module_; }
  std::shared_ptr<torch::nn::Module> ptr() const { return module_; }
  /// The typed model, or nullptr when it is of another family.
  template <typename Impl>
  std::shared_ptr<Impl> as() const {
    return std::dynamic_pointer_cast<Impl>(module_);
  }

  /// Logits [batch, num_labels]. `token_type_ids` are ignored by DistilBERT (it has none).
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {},
                     const at::Tensor& token_type_ids = {}) const {
    return forward_(input_ids, attention_mask, token_type_ids);
  }
  at::Tensor forward(const tokenizers::BatchEncoding& batch) const {
    return forward_(batch.input_ids, batch.attention_mask, batch.token_type_ids);
  }

  /// Tokens per row at most (RoBERTa: its positions minus the padding offset).
  int64_t max_tokens() const { return max_tokens_; }
  int64_t num_labels() const { return num_labels_; }
  int64_t vocab_size() const { return vocab_size_; }
  const std::map<int64_t, std::string>& id2label() const { return id2label_; }
  /// The attention projections LoRA adapts by default (the family's query and value).
  const std::vector<std::string>& default_targets() const { return default_targets_; }
  /// The modules of the classification head on top of the encoder (BERT: pooler and
  /// classifier; DistilBERT: pre_classifier and classifier; RoBERTa: classifier).
  const std::vector<std::string>& head_modules() const { return head_; }

  /// Writes a Hugging Face folder (see `save_checkpoint_folder`): config.json,
  /// model.safetensors and the given tokenizer files, as one unit.
  void save(const std::string& folder, const std::vector<FolderFile>& tokenizer_files = {}) const {
    save_(folder, tokenizer_files);
  }

 private:
  std::shared_ptr<torch::nn::Module> module_;
  std::string model_type_;
  int64_t max_tokens_, num_labels_, vocab_size_;
  std::map<int64_t, std::string> id2label_;
  std::vector<std::string> default_targets_, head_;
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)> forward_;
  std::function<void(const std::string&, const std::vector<FolderFile>&)> save_;
};

/// The model types `load_sequence_classifier` opens.
inline const std::vector<std::string>& supported_model_types() {
  static const std::vector<std::string> types{"bert", "distilbert", "roberta"};
  return types;
}

/// Opens a Hugging Face folder as the sequence classifier its `config.json` names (a file
/// without `model_type` is read as BERT, as earlier releases did).
inline SequenceClassifier load_sequence_classifier(const std::string& folder, const LoadOptions& options = {}) {
  const auto type = read_model_type(folder);
  if (type == "bert" || type.empty()) return SequenceClassifier(load_bert_for_sequence_classification(folder, options));
  if (type == "distilbert") return SequenceClassifier(load_distilbert_for_sequence_classification(folder, options));
  TORCH_CHECK(type == "roberta", "load_sequence_classifier: '", folder, "' holds a '", type,
              "' model; supported model types: ", lora::detail::join(supported_model_types()));
  return SequenceClassifier(load_roberta_for_sequence_classification(folder, options));
}

/// The files a saved folder needs for its tokenizer, taken from `folder` (vocab.txt, or
/// vocab.json + merges.txt, or tokenizer.json; tokenizer_config.json when present).
inline std::vector<FolderFile> tokenizer_files(const std::string& folder) {
  namespace fs = std::filesystem;
  std::vector<FolderFile> files;
  std::error_code error;
  for (const auto* name : {"vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json"}) {
    if (fs::exists(fs::path(folder) / name, error)) files.emplace_back((fs::path(folder) / name).string(), name);
  }
  return files;
}

}  // namespace lora::models
