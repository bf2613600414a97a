#pragma once

/// \file
/// `BertConfig`: Hugging Face's `config.json` for BERT, read and written.

#include <cstdint>
#include <fstream>
#include <map>
#include <optional>
#include <string>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

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
    positive("num_labels", num_labels);
    TORCH_CHECK(hidden_size % num_attention_heads == 0, "BertConfig: hidden_size ", hidden_size,
                " is not a multiple of num_attention_heads ", num_attention_heads);
    TORCH_CHECK(hidden_act == "gelu" || hidden_act == "gelu_new" || hidden_act == "gelu_pytorch_tanh" ||
                    hidden_act == "relu",
                "BertConfig: unsupported hidden_act '", hidden_act, "' (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)");
    for (const auto& [name, p] : {std::pair<const char*, double>{"hidden_dropout_prob", hidden_dropout_prob},
                                  {"attention_probs_dropout_prob", attention_probs_dropout_prob},
                                  {"classifier_dropout", classifier_dropout.value_or(0.0)}}) {
      TORCH_CHECK(p >= 0.0 && p < 1.0, "BertConfig: ", name, " must be in [0, 1) (got ", p, ")");
    }
    TORCH_CHECK(layer_norm_eps > 0, "BertConfig: layer_norm_eps must be > 0 (got ", layer_norm_eps, ")");
    TORCH_CHECK(pad_token_id >= 0 && pad_token_id < vocab_size, "BertConfig: pad_token_id ", pad_token_id,
                " is outside the vocabulary (size ", vocab_size, ")");
    TORCH_CHECK(id2label.empty() || static_cast<int64_t>(id2label.size()) == num_labels, "BertConfig: id2label has ",
                id2label.size(), " labels but num_labels is ", num_labels);
  }

  /// Reads a parsed config.json. The architecture fields (vocab_size, hidden_size,
  /// num_hidden_layers, num_attention_heads, intermediate_size) are required; the rest default
  /// as in transformers. `where` names the file in messages.
  static BertConfig from_json(const nlohmann::json& json, const std::string& where = "config.json") {
    TORCH_CHECK(json.is_object(), where, ": expected a JSON object");
    BertConfig config;
    auto read_int = [&](const char* key, int64_t& field, bool required) {
      if (!json.contains(key)) {
        TORCH_CHECK(!required, where, ": missing '", key, "'");
        return;
      }
      TORCH_CHECK(json[key].is_number_integer(), where, ": '", key, "' must be an integer (got ", json[key].dump(), ")");
      field = json[key].get<int64_t>();
    };
    auto read_double = [&](const char* key, double& field) {
      if (!json.contains(key) || json[key].is_null()) return;
      TORCH_CHECK(json[key].is_number(), where, ": '", key, "' must be a number (got ", json[key].dump(), ")");
      field = json[key].get<double>();
    };
    read_int("vocab_size", config.vocab_size, true);
    read_int("hidden_size", config.hidden_size, true);
    read_int("num_hidden_layers", config.num_hidden_layers, true);
    read_int("num_attention_heads", config.num_attention_heads, true);
    read_int("intermediate_size", config.intermediate_size, true);
    read_int("max_position_embeddings", config.max_position_embeddings, false);
    read_int("type_vocab_size", config.type_vocab_size, false);
    read_int("pad_token_id", config.pad_token_id, false);
    read_double("hidden_dropout_prob", config.hidden_dropout_prob);
    read_double("attention_probs_dropout_prob", config.attention_probs_dropout_prob);
    read_double("layer_norm_eps", config.layer_norm_eps);
    if (json.contains("classifier_dropout") && !json["classifier_dropout"].is_null()) {
      double p = 0;
      read_double("classifier_dropout", p);
      config.classifier_dropout = p;
    }
    if (json.contains("hidden_act")) {
      TORCH_CHECK(json["hidden_act"].is_string(), where, ": 'hidden_act' must be a string");
      config.hidden_act = json["hidden_act"].get<std::string>();
    }
    if (json.contains("position_embedding_type")) {
      const auto type = json["position_embedding_type"];
      TORCH_CHECK(type.is_string() && type.get<std::string>() == "absolute", where,
                  ": only position_embedding_type 'absolute' is supported (got ", type.dump(), ")");
    }
    if (json.contains("id2label") && json["id2label"].is_object()) {
      for (const auto& [key, value] : json["id2label"].items()) {
        int64_t id = -1;
        try {
          size_t used = 0;
          id = std::stoll(key, &used);
          TORCH_CHECK(used == key.size(), "");
        } catch (...) {
          TORCH_CHECK(false, where, ": id2label key '", key, "' is not an integer");
        }
        TORCH_CHECK(value.is_string(), where, ": id2label['", key, "'] must be a string");
        config.id2label[id] = value.get<std::string>();
      }
      config.num_labels = static_cast<int64_t>(config.id2label.size());
    }
    if (json.contains("num_labels")) read_int("num_labels", config.num_labels, false);
    try {
      config.validate();
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, where, ": ", error.what_without_backtrace());
    }
    return config;
  }

  static BertConfig from_file(const std::string& path) {
    std::ifstream in(path);
    TORCH_CHECK(in, "BertConfig: cannot open '", path, "'");
    nlohmann::json json;
    try {
      in >> json;
    } catch (const nlohmann::json::exception& error) {
      TORCH_CHECK(false, "BertConfig: invalid JSON in '", path, "': ", error.what());
    }
    return from_json(json, path);
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
    if (!id2label.empty()) {
      nlohmann::ordered_json id2, label2;
      for (const auto& [id, label] : id2label) {
        id2[std::to_string(id)] = label;
        label2[label] = id;
      }
      json["id2label"] = id2;
      json["label2id"] = label2;
    }
    json["initializer_range"] = 0.02;
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
