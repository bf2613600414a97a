#pragma once

/// \file
/// `BertConfig`: Hugging Face's `config.json` for BERT, read and written.

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/models/detail/config_json.hpp>

namespace lora::models {

/// The architecture of a BERT model, with Hugging Face's field names and defaults.
struct BertConfig {
  int64_t vocab_size = 30522;
  int64_t hidden_size = 768;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t intermediate_size = 3072;
  /// "gelu" (exact, erf), "gelu_new" / "gelu_pytorch_tanh" (tanh approximation) or "relu".
  std::string hidden_act = "gelu";
  double hidden_dropout_prob = 0.1;
  double attention_probs_dropout_prob = 0.1;
  /// Dropout before the classifier; unset means hidden_dropout_prob (as in transformers).
  std::optional<double> classifier_dropout;
  int64_t max_position_embeddings = 512;
  int64_t type_vocab_size = 2;
  double layer_norm_eps = 1e-12;
  /// σ of transformers' normal initialisation (used for a head the checkpoint lacks).
  double initializer_range = 0.02;
  int64_t pad_token_id = 0;
  int64_t num_labels = 2;
  /// Label names by id (`id2label`), e.g. {0: "negative", 1: "positive"}; may be empty.
  std::map<int64_t, std::string> id2label;

  /// Throws naming the first inconsistent value.
  void validate() const {
    auto positive = [](const char* name, int64_t value) {
      TORCH_CHECK(value > 0, "BertConfig: ", name, " must be > 0 (got ", value, ")");
    };
    positive("vocab_size", vocab_size);
    positive("hidden_size", hidden_size);
    positive("num_hidden_layers", num_hidden_layers);
    positive("num_attention_heads", num_attention_heads);
    positive("intermediate_size", intermediate_size);
    positive("max_position_embeddings", max_position_embeddings);
    positive("type_vocab_size", type_vocab_size);
    TORCH_CHECK(hidden_size % num_attention_heads == 0, "BertConfig: hidden_size ", hidden_size,
                " is not a multiple of num_attention_heads ", num_attention_heads);
    TORCH_CHECK(hidden_act == "gelu" || hidden_act == "gelu_new" || hidden_act == "gelu_pytorch_tanh" ||
                    hidden_act == "relu",
                "BertConfig: unsupported hidden_act '", hidden_act, "' (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)");
    detail::check_probability("BertConfig", "hidden_dropout_prob", hidden_dropout_prob);
    detail::check_probability("BertConfig", "attention_probs_dropout_prob", attention_probs_dropout_prob);
    detail::check_probability("BertConfig", "classifier_dropout", classifier_dropout.value_or(0.0));
    TORCH_CHECK(layer_norm_eps > 0, "BertConfig: layer_norm_eps must be > 0 (got ", layer_norm_eps, ")");
    TORCH_CHECK(initializer_range > 0, "BertConfig: initializer_range must be > 0 (got ", initializer_range, ")");
    TORCH_CHECK(pad_token_id >= 0 && pad_token_id < vocab_size, "BertConfig: pad_token_id ", pad_token_id,
                " is outside the vocabulary (size ", vocab_size, ")");
    detail::check_labels("BertConfig", id2label, num_labels);
  }

  /// Reads a parsed config.json. The architecture fields (vocab_size, hidden_size,
  /// num_hidden_layers, num_attention_heads, intermediate_size) are required; the rest default
  /// as in transformers. `where` names the file in messages.
  static BertConfig from_json(const nlohmann::json& json, const std::string& where = "config.json") {
    BertConfig config;
    config.read_fields(detail::ConfigReader(json, where));
    detail::validate_in(config, where);
    return config;
  }

  static BertConfig from_file(const std::string& path) {
    return from_json(detail::read_config_file(path, "BertConfig"), path);
  }

  /// Reads BERT's fields into this config (families built on BERT's encoder share them).
  void read_fields(const detail::ConfigReader& read) {
    read.integer("vocab_size", vocab_size, true);
    read.integer("hidden_size", hidden_size, true);
    read.integer("num_hidden_layers", num_hidden_layers, true);
    read.integer("num_attention_heads", num_attention_heads, true);
    read.integer("intermediate_size", intermediate_size, true);
    read.integer("max_position_embeddings", max_position_embeddings);
    read.integer("type_vocab_size", type_vocab_size);
    read.integer("pad_token_id", pad_token_id);
    read.number("hidden_dropout_prob", hidden_dropout_prob);
    read.number("attention_probs_dropout_prob", attention_probs_dropout_prob);
    read.number("layer_norm_eps", layer_norm_eps);
    read.number("initializer_range", initializer_range);
    read.number("classifier_dropout", classifier_dropout);
    read.string("hidden_act", hidden_act);
    read.require_value("position_embedding_type", "absolute");
    read.labels(id2label, num_labels);
  }

  /// config.json as transformers writes it for BertForSequenceClassification.
  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json json;
    json["architectures"] = {"BertForSequenceClassification"};
    json["attention_probs_dropout_prob"] = attention_probs_dropout_prob;
    json["classifier_dropout"] = classifier_dropout ? nlohmann::ordered_json(*classifier_dropout) : nullptr;
    json["hidden_act"] = hidden_act;
    json["hidden_dropout_prob"] = hidden_dropout_prob;
    json["hidden_size"] = hidden_size;
    detail::write_labels(json, id2label);
    json["initializer_range"] = initializer_range;
    json["intermediate_size"] = intermediate_size;
    json["layer_norm_eps"] = layer_norm_eps;
    json["max_position_embeddings"] = max_position_embeddings;
    json["model_type"] = "bert";
    json["num_attention_heads"] = num_attention_heads;
    json["num_hidden_layers"] = num_hidden_layers;
    if (id2label.empty()) json["num_labels"] = num_labels;
    json["pad_token_id"] = pad_token_id;
    json["position_embedding_type"] = "absolute";
    json["torch_dtype"] = "float32";
    json["type_vocab_size"] = type_vocab_size;
    json["vocab_size"] = vocab_size;
    return json;
  }
};

}  // namespace lora::models
