#pragma once

// The BERT-mini shape the whole-model benchmarks share: 256 hidden, 4 layers, 4 heads, 1024 FFN,
// BertConfig's other defaults (bert-base's vocabulary and positions).

#include <lora/models/bert_config.hpp>

inline lora::models::BertConfig bert_mini_config() {
  lora::models::BertConfig config;
  config.hidden_size = 256;
  config.num_hidden_layers = 4;
  config.num_attention_heads = 4;
  config.intermediate_size = 1024;
  return config;
}
