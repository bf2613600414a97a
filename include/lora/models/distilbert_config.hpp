#pragma once

/// \file
/// `DistilBertConfig`: Hugging Face's `config.json` for DistilBERT (`model_type` "distilbert"),
/// read and written with transformers' field names (`dim`, `n_layers`, `hidden_dim`, ...).

#include <cstdint>
#include <map>
#include <string>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/models/detail/config_json.hpp>

namespace lora::models {

/// The architecture of a DistilBERT model, with transformers' names and defaults.
struct DistilBertConfig {
  int64_t vocab_size = 30522;
  int64_t max_position_embeddings = 512;
  /// Fixed sinusoidal position embeddings (initialised so; a checkpoint's values are loaded).
  bool sinusoidal_pos_embds = false;
  int64_t n_layers = 6;
  int64_t n_heads = 12;
  int64_t dim = 768;
  int64_t hidden_dim = 3072;
  double dropout = 0.1;
  double attention_dropout = 0.1;
  /// "gelu" (exact) or "relu".
  std::string activation = "gelu";
  double initializer_range = 0.02;
  double qa_dropout = 0.1;
  double seq_classif_dropout = 0.2;
  int64_t pad_token_id = 0;
  int64_t num_labels = 2;
  std::map<int64_t, std::string> id2label;
  /// Hard-coded in transformers' DistilBERT (not a config field).
  static constexpr double kLayerNormEps = 1e-12;

  /// Throws naming the first inconsistent value.
  void validate() const {
    auto positive = [](const char* name, int64_t value) {
      TORCH_CHECK(value > 0, "DistilBertConfig: ", name, " must be > 0 (got ", value, ")");
    };
    positive("vocab_size", vocab_size);
    positive("max_position_embeddings", max_position_embeddings);
    positive("n_layers", n_layers);
    positive("n_heads", n_heads);
    positive("dim", dim);
    positive("hidden_dim", hidden_dim);
    TORCH_CHECK(dim % n_heads == 0, "DistilBertConfig: dim ", dim, " is not a multiple of n_heads ", n_heads);
    TORCH_CHECK(activation == "gelu" || activation == "relu", "DistilBertConfig: unsupported activation '",
                activation, "' (supported: gelu, relu)");
    detail::check_probability("DistilBertConfig", "dropout", dropout);
    detail::check_probability("DistilBertConfig", "attention_dropout", attention_dropout);
    detail::check_probability("DistilBertConfig", "qa_dropout", qa_dropout);
    detail::check_probability("DistilBertConfig", "seq_classif_dropout", seq_classif_dropout);
    TORCH_CHECK(initializer_range > 0, "DistilBertConfig: initializer_range must be > 0 (got ", initializer_range,
                ")");
    TORCH_CHECK(pad_token_id >= 0 && pad_token_id < vocab_size, "DistilBertConfig: pad_token_id ", pad_token_id,
                " is outside the vocabulary (size ", vocab_size, ")");
    TORCH_CHECK(!sinusoidal_pos_embds || dim % 2 == 0, "DistilBertConfig: sinusoidal_pos_embds needs an even dim (got ",
                dim, ")");
    detail::check_labels("DistilBertConfig", id2label, num_labels);
  }

  /// Reads a parsed config.json; `dim`, `n_layers`, `n_heads`, `hidden_dim` and `vocab_size` are
  /// required, the rest default as in transformers.
  static DistilBertConfig from_json(const nlohmann::json& json, const std::string& where = "config.json") {
    const detail::ConfigReader read(json, where);
    DistilBertConfig config;
    read.integer("vocab_size", config.vocab_size, true);
    read.integer("dim", config.dim, true);
    read.integer("n_layers", config.n_layers, true);
    read.integer("n_heads", config.n_heads, true);
    read.integer("hidden_dim", config.hidden_dim, true);
    read.integer("max_position_embeddings", config.max_position_embeddings);
    read.boolean("sinusoidal_pos_embds", config.sinusoidal_pos_embds);
    read.number("dropout", config.dropout);
    read.number("attention_dropout", config.attention_dropout);
    read.string("activation", config.activation);
    read.number("initializer_range", config.initializer_range);
    read.number("qa_dropout", config.qa_dropout);
    read.number("seq_classif_dropout", config.seq_classif_dropout);
    read.integer("pad_token_id", config.pad_token_id);
    read.labels(config.id2label, config.num_labels);
    detail::validate_in(config, where);
    return config;
  }

  static DistilBertConfig from_file(const std::string& path) {
    return from_json(detail::read_config_file(path, "DistilBertConfig"), path);
  }

  /// config.json as transformers writes it for DistilBertForSequenceClassification (sorted keys).
  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json json;
    json["activation"] = activation;
    json["architectures"] = {"DistilBertForSequenceClassification"};
    json["attention_dropout"] = attention_dropout;
    json["dim"] = dim;
    json["dropout"] = dropout;
    json["hidden_dim"] = hidden_dim;
    detail::write_labels(json, id2label);
    json["initializer_range"] = initializer_range;
    json["max_position_embeddings"] = max_position_embeddings;
    json["model_type"] = "distilbert";
    json["n_heads"] = n_heads;
    json["n_layers"] = n_layers;
    if (id2label.empty()) json["num_labels"] = num_labels;
    json["pad_token_id"] = pad_token_id;
    json["qa_dropout"] = qa_dropout;
    json["seq_classif_dropout"] = seq_classif_dropout;
    json["sinusoidal_pos_embds"] = sinusoidal_pos_embds;
    json["torch_dtype"] = "float32";
    json["vocab_size"] = vocab_size;
    return json;
  }
};

}  // namespace lora::models
