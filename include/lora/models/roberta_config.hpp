#pragma once

/// \file
/// `RobertaConfig`: Hugging Face's `config.json` for RoBERTa (`model_type` "roberta"). The
/// fields are BERT's; padding, begin and end ids and the position offset differ.

#include <cstdint>
#include <string>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/models/bert_config.hpp>
#include <lora/models/detail/config_json.hpp>

namespace lora::models {

/// The architecture of a RoBERTa model: `BertConfig`'s fields with transformers' RoBERTa
/// defaults (pad 1, bos 0, eos 2, vocabulary 50,265).
struct RobertaConfig : BertConfig {
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 2;

  RobertaConfig() {
    vocab_size = 50265;
    pad_token_id = 1;
  }

  /// Positions start after the padding id (transformers' `create_position_ids_from_input_ids`),
  /// so a row holds at most `max_position_embeddings - pad_token_id - 1` tokens (512 for
  /// roberta-base's 514).
  int64_t max_tokens() const { return max_position_embeddings - pad_token_id - 1; }

  void validate() const {
    BertConfig::validate();
    TORCH_CHECK(max_tokens() > 0, "RobertaConfig: max_position_embeddings ", max_position_embeddings,
                " leaves no position after the padding id ", pad_token_id);
    for (const auto& [name, id] : {std::pair<const char*, int64_t>{"bos_token_id", bos_token_id},
                                   {"eos_token_id", eos_token_id}}) {
      TORCH_CHECK(id >= 0 && id < vocab_size, "RobertaConfig: ", name, " ", id, " is outside the vocabulary (size ",
                  vocab_size, ")");
    }
  }

  static RobertaConfig from_json(const nlohmann::json& json, const std::string& where = "config.json") {
    const detail::ConfigReader read(json, where);
    RobertaConfig config;
    config.read_fields(read);
    read.integer("bos_token_id", config.bos_token_id);
    read.integer("eos_token_id", config.eos_token_id);
    detail::validate_in(config, where);
    return config;
  }

  static RobertaConfig from_file(const std::string& path) {
    return from_json(detail::read_config_file(path, "RobertaConfig"), path);
  }

  /// config.json as transformers writes it for RobertaForSequenceClassification (sorted keys).
  nlohmann::ordered_json to_json() const {
    nlohmann::json sorted = BertConfig::to_json();  // std::map keys: sorted as transformers sorts them
    sorted["architectures"] = {"RobertaForSequenceClassification"};
    sorted["model_type"] = "roberta";
    sorted["bos_token_id"] = bos_token_id;
    sorted["eos_token_id"] = eos_token_id;
    nlohmann::ordered_json json;
    for (const auto& [key, value] : sorted.items()) json[key] = value;
    return json;
  }
};

}  // namespace lora::models
