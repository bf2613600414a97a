#pragma once

// What the multi-adapter tests share: a tiny BERT classifier, adapters with values of their own,
// padded batches.

#include <string>

#include <torch/torch.h>

#include <lora/lora.hpp>
#include <lora/models/bert.hpp>

namespace lora::testing {

inline lora::models::BertConfig tiny_config() {
  lora::models::BertConfig config;
  config.vocab_size = 40;
  config.hidden_size = 16;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 2;
  config.intermediate_size = 24;
  config.max_position_embeddings = 16;
  config.hidden_dropout_prob = 0.0;
  config.attention_probs_dropout_prob = 0.0;
  config.num_labels = 3;
  return config;
}

/// Non-zero values in every adapter tensor and saved head of adapter `name`, so that each
/// adapter computes something of its own.
inline void randomize(torch::nn::Module& model, const std::string& name) {
  torch::NoGradGuard no_grad;
  for (const auto& [path, layer] : lora::adapter_layers(model)) {
    if (!layer->has_adapter(name)) continue;
    for (auto& [key, tensor] : layer->adapter_state(name)) {
      if (key == "lora_magnitude_vector") {
        tensor.uniform_(0.5, 1.5);
      } else {
        tensor.normal_(0.0, 0.3);
      }
    }
  }
}

struct Batch {
  torch::Tensor ids;
  torch::Tensor mask;
};

inline Batch padded_batch(int64_t size, int64_t length, uint64_t seed) {
  torch::manual_seed(seed);
  Batch batch{torch::randint(1, tiny_config().vocab_size, {size, length}, torch::kLong),
              torch::ones({size, length}, torch::kLong)};
  for (int64_t i = 0; i < size; ++i) {  // rows of different lengths: padding in most
    const auto used = length - (i % 3);
    batch.mask[i].slice(0, used).zero_();
    batch.ids[i].slice(0, used).zero_();
  }
  return batch;
}

}  // namespace lora::testing
