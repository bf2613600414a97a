#pragma once

/// \file
/// BERT (Devlin et al. 2019) with Hugging Face's module names, so that checkpoint keys map one
/// to one (`bert.encoder.layer.0.attention.self.query.weight`, `classifier.weight`), and every
/// projection adaptable by `lora::inject` (declared as `lora::LoRALinear<>`).

#include <cmath>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <lora/linear.hpp>
#include <lora/models/bert_config.hpp>
#include <lora/models/detail/attention.hpp>
#include <lora/models/encoder.hpp>

namespace lora::models {

namespace detail {

inline torch::nn::LayerNorm layer_norm(const BertConfig& config) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.hidden_size}).eps(config.layer_norm_eps));
}

}  // namespace detail

/// Word + position + token-type embeddings, LayerNorm, dropout.
struct BertEmbeddingsImpl : torch::nn::Module {
  explicit BertEmbeddingsImpl(const BertConfig& config) {
    word_embeddings = register_module(
        "word_embeddings",
        torch::nn::Embedding(torch::nn::EmbeddingOptions(config.vocab_size, config.hidden_size)
                                 .padding_idx(config.pad_token_id)));
    position_embeddings = register_module(
        "position_embeddings", torch::nn::Embedding(config.max_position_embeddings, config.hidden_size));
    token_type_embeddings =
        register_module("token_type_embeddings", torch::nn::Embedding(config.type_vocab_size, config.hidden_size));
    LayerNorm = register_module("LayerNorm", detail::layer_norm(config));
    dropout = register_module("dropout", torch::nn::Dropout(config.hidden_dropout_prob));
  }

  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& token_type_ids) {
    const auto positions = torch::arange(input_ids.size(1), input_ids.options()).unsqueeze(0);
    auto embeddings = word_embeddings(input_ids) + token_type_embeddings(token_type_ids);
    embeddings = embeddings + position_embeddings(positions);
    return detail::drop(dropout, LayerNorm(embeddings));
  }

  torch::nn::Embedding word_embeddings{nullptr}, position_embeddings{nullptr}, token_type_embeddings{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(BertEmbeddings);

/// Multi-head self-attention: `query`, `key`, `value`.
struct BertSelfAttentionImpl : torch::nn::Module {
  explicit BertSelfAttentionImpl(const BertConfig& config)
      : heads(config.num_attention_heads), head_size(config.hidden_size / config.num_attention_heads) {
    query = register_module("query", detail::projection(config.hidden_size, config.hidden_size));
    key = register_module("key", detail::projection(config.hidden_size, config.hidden_size));
    value = register_module("value", detail::projection(config.hidden_size, config.hidden_size));
    dropout = register_module("dropout", torch::nn::Dropout(config.attention_probs_dropout_prob));
  }

  /// `additive_mask` is [batch, 1, 1, seq] (0 for tokens, the dtype's minimum for padding) or undefined.
  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& additive_mask) {
    return detail::multi_head_attention(query(hidden), key(hidden), value(hidden), heads, additive_mask,
                                        dropout->options.p(), dropout->is_training());
  }

  int64_t heads, head_size;
  lora::LoRALinear<> query{nullptr}, key{nullptr}, value{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(BertSelfAttention);

/// `dense`, dropout, then LayerNorm with the residual: BERT's attention.output and output.
struct BertResidualOutputImpl : torch::nn::Module {
  BertResidualOutputImpl(const BertConfig& config, int64_t in) {
    dense = register_module("dense", detail::projection(in, config.hidden_size));
    LayerNorm = register_module("LayerNorm", detail::layer_norm(config));
    dropout = register_module("dropout", torch::nn::Dropout(config.hidden_dropout_prob));
  }
  at::Tensor forward(const at::Tensor& x, const at::Tensor& residual) {
    return LayerNorm(detail::drop(dropout, dense(x)) + residual);
  }
  lora::LoRALinear<> dense{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(BertResidualOutput);

struct BertAttentionImpl : torch::nn::Module {
  explicit BertAttentionImpl(const BertConfig& config) {
    self = register_module("self", BertSelfAttention(config));
    output = register_module("output", BertResidualOutput(config, config.hidden_size));
  }
  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& additive_mask) {
    return output(self(hidden, additive_mask), hidden);
  }
  BertSelfAttention self{nullptr};
  BertResidualOutput output{nullptr};
};
TORCH_MODULE(BertAttention);

struct BertIntermediateImpl : torch::nn::Module {
  explicit BertIntermediateImpl(const BertConfig& config) : act(config.hidden_act) {
    dense = register_module("dense", detail::projection(config.hidden_size, config.intermediate_size));
  }
  at::Tensor forward(const at::Tensor& hidden) { return detail::activation(dense(hidden), act); }
  std::string act;
  lora::LoRALinear<> dense{nullptr};
};
TORCH_MODULE(BertIntermediate);

struct BertLayerImpl : torch::nn::Module {
  explicit BertLayerImpl(const BertConfig& config) {
    attention = register_module("attention", BertAttention(config));
    intermediate = register_module("intermediate", BertIntermediate(config));
    output = register_module("output", BertResidualOutput(config, config.intermediate_size));
  }
  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& additive_mask) {
    const auto attended = attention(hidden, additive_mask);
    return output(intermediate(attended), attended);
  }
  BertAttention attention{nullptr};
  BertIntermediate intermediate{nullptr};
  BertResidualOutput output{nullptr};
};
TORCH_MODULE(BertLayer);

struct BertPoolerImpl : torch::nn::Module {
  explicit BertPoolerImpl(const BertConfig& config) {
    dense = register_module("dense", detail::projection(config.hidden_size, config.hidden_size));
  }
  /// tanh(dense(h[:, 0])): the first ([CLS]) token.
  at::Tensor forward(const at::Tensor& hidden) { return torch::tanh(dense(hidden.select(1, 0))); }
  lora::LoRALinear<> dense{nullptr};
};
TORCH_MODULE(BertPooler);

/// What `BertModel::forward` returns.
struct BertOutput {
  at::Tensor last_hidden_state;         ///< [batch, seq, hidden]
  at::Tensor pooler_output;             ///< [batch, hidden]
  std::vector<at::Tensor> hidden_states;  ///< embeddings then every layer's output, when asked for
};

/// The BERT encoder: embeddings, `encoder.layer.{i}`, pooler.
struct BertModelImpl : torch::nn::Module {
  explicit BertModelImpl(const BertConfig& config_) : config(config_) {
    config.validate();
    embeddings = register_module("embeddings", BertEmbeddings(config));
    auto encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
    layers = encoder->register_module("layer", torch::nn::ModuleList());
    for (int64_t i = 0; i < config.num_hidden_layers; ++i) layers->push_back(BertLayer(config));
    pooler = register_module("pooler", BertPooler(config));
  }

  /// `input_ids` [batch, seq] (int64); `attention_mask` 1 for tokens, 0 for padding (undefined:
  /// all tokens); `token_type_ids` undefined means all 0. Padded keys are masked with the
  /// dtype's minimum before the softmax, as transformers does.
  BertOutput forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {},
                     const at::Tensor& token_type_ids = {}, bool output_hidden_states = false) {
    detail::check_encoder_inputs("BertModel", input_ids, attention_mask, config.max_position_embeddings);
    const auto types = token_type_ids.defined() ? token_type_ids : torch::zeros_like(input_ids);
    TORCH_CHECK(types.sizes() == input_ids.sizes(), "BertModel: token_type_ids shape ", types.sizes(),
                " differs from input_ids shape ", input_ids.sizes());
    auto hidden = embeddings(input_ids, types);
    const auto additive_mask = attention_mask.defined()
                                   ? detail::additive_attention_mask(attention_mask, hidden.scalar_type())
                                   : at::Tensor();
    BertOutput output;
    if (output_hidden_states) output.hidden_states.push_back(hidden);
    for (const auto& layer : *layers) {
      hidden = layer->as<BertLayerImpl>()->forward(hidden, additive_mask);
      if (output_hidden_states) output.hidden_states.push_back(hidden);
    }
    output.last_hidden_state = hidden;
    output.pooler_output = pooler(hidden);
    return output;
  }

  BertConfig config;
  BertEmbeddings embeddings{nullptr};
  torch::nn::ModuleList layers{nullptr};  ///< registered as encoder.layer
  BertPooler pooler{nullptr};
};
TORCH_MODULE(BertModel);

/// BERT with a classification head: `bert`, dropout, `classifier` on the pooled output.
struct BertForSequenceClassificationImpl : torch::nn::Module {
  explicit BertForSequenceClassificationImpl(const BertConfig& config_) : config(config_) {
    bert = register_module("bert", BertModel(config));
    dropout = register_module("dropout",
                              torch::nn::Dropout(config.classifier_dropout.value_or(config.hidden_dropout_prob)));
    classifier = register_module("classifier", detail::projection(config.hidden_size, config.num_labels));
  }

  /// Logits [batch, num_labels].
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {},
                     const at::Tensor& token_type_ids = {}) {
    return classifier(detail::drop(dropout, bert->forward(input_ids, attention_mask, token_type_ids).pooler_output));
  }

  BertConfig config;
  BertModel bert{nullptr};
  torch::nn::Dropout dropout{nullptr};
  lora::LoRALinear<> classifier{nullptr};
};
TORCH_MODULE(BertForSequenceClassification);

}  // namespace lora::models
