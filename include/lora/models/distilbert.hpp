#pragma once

/// \file
/// DistilBERT (Sanh et al. 2019) as transformers 4.39 defines it, with its module names
/// (`distilbert.transformer.layer.0.attention.q_lin`, `pre_classifier`, `classifier`) so that
/// checkpoint and PEFT keys map one to one; every projection is a `lora::LoRALinear<>`.

#include <cmath>
#include <string>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>
#include <torch/types.h>

#include <lora/linear.hpp>
#include <lora/models/detail/attention.hpp>
#include <lora/models/distilbert_config.hpp>
#include <lora/models/encoder.hpp>

namespace lora::models {

namespace detail {

inline torch::nn::LayerNorm distilbert_layer_norm(const DistilBertConfig& config) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.dim}).eps(DistilBertConfig::kLayerNormEps));
}

/// transformers' `create_sinusoidal_embeddings`: sin on even, cos on odd columns of
/// pos / 10000^(2⌊j/2⌋/dim), computed in float64 as numpy does.
inline void fill_sinusoidal(at::Tensor& weight) {
  const auto positions = weight.size(0), dim = weight.size(1);
  auto table = at::empty({positions, dim}, at::kDouble);
  auto cell = table.accessor<double, 2>();
  for (int64_t pos = 0; pos < positions; ++pos) {
    for (int64_t j = 0; j < dim; ++j) {
      const double angle =
          static_cast<double>(pos) / std::pow(10000.0, 2.0 * static_cast<double>(j / 2) / static_cast<double>(dim));
      cell[pos][j] = j % 2 == 0 ? std::sin(angle) : std::cos(angle);
    }
  }
  torch::NoGradGuard no_grad;
  weight.copy_(table);
}

}  // namespace detail

/// Word + position embeddings (positions 0…L-1, whatever the padding), LayerNorm, dropout.
struct DistilBertEmbeddingsImpl : torch::nn::Module {
  explicit DistilBertEmbeddingsImpl(const DistilBertConfig& config) {
    word_embeddings = register_module(
        "word_embeddings", torch::nn::Embedding(torch::nn::EmbeddingOptions(config.vocab_size, config.dim)
                                                    .padding_idx(config.pad_token_id)));
    position_embeddings =
        register_module("position_embeddings", torch::nn::Embedding(config.max_position_embeddings, config.dim));
    if (config.sinusoidal_pos_embds) {
      detail::fill_sinusoidal(position_embeddings->weight);
      position_embeddings->weight.set_requires_grad(false);  // fixed, as in transformers
    }
    LayerNorm = register_module("LayerNorm", detail::distilbert_layer_norm(config));
    dropout = register_module("dropout", torch::nn::Dropout(config.dropout));
  }

  at::Tensor forward(const at::Tensor& input_ids) {
    const auto positions = at::arange(input_ids.size(1), input_ids.options()).unsqueeze(0);
    return detail::drop(dropout, LayerNorm(word_embeddings(input_ids) + position_embeddings(positions)));
  }

  torch::nn::Embedding word_embeddings{nullptr}, position_embeddings{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(DistilBertEmbeddings);

/// Multi-head self-attention: `q_lin`, `k_lin`, `v_lin`, `out_lin`. As in transformers, the
/// query is scaled before the product and padded keys are filled with the dtype's minimum.
struct DistilBertAttentionImpl : torch::nn::Module {
  explicit DistilBertAttentionImpl(const DistilBertConfig& config)
      : heads(config.n_heads), head_size(config.dim / config.n_heads) {
    q_lin = register_module("q_lin", detail::projection(config.dim, config.dim));
    k_lin = register_module("k_lin", detail::projection(config.dim, config.dim));
    v_lin = register_module("v_lin", detail::projection(config.dim, config.dim));
    out_lin = register_module("out_lin", detail::projection(config.dim, config.dim));
    dropout = register_module("dropout", torch::nn::Dropout(config.attention_dropout));
  }

  /// `additive_mask` is [batch, 1, 1, seq] (0 for tokens, the dtype's minimum for padding) or
  /// undefined. transformers scales the query and fills padded scores with the minimum; the
  /// scale folded into the product and the minimum added give the same scores (bit for bit
  /// when √d is a power of two).
  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& additive_mask) {
    return out_lin(detail::multi_head_attention(q_lin(hidden), k_lin(hidden), v_lin(hidden), heads, additive_mask,
                                                dropout->options.p(), dropout->is_training()));
  }

  int64_t heads, head_size;
  lora::LoRALinear<> q_lin{nullptr}, k_lin{nullptr}, v_lin{nullptr}, out_lin{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(DistilBertAttention);

/// `lin1`, activation, `lin2`, dropout.
struct DistilBertFeedForwardImpl : torch::nn::Module {
  explicit DistilBertFeedForwardImpl(const DistilBertConfig& config) : act(config.activation) {
    lin1 = register_module("lin1", detail::projection(config.dim, config.hidden_dim));
    lin2 = register_module("lin2", detail::projection(config.hidden_dim, config.dim));
    dropout = register_module("dropout", torch::nn::Dropout(config.dropout));
  }
  at::Tensor forward(const at::Tensor& x) { return detail::drop(dropout, lin2(detail::activation(lin1(x), act))); }
  std::string act;
  lora::LoRALinear<> lin1{nullptr}, lin2{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(DistilBertFeedForward);

/// One transformer block: attention and feed-forward, each followed by a residual LayerNorm.
struct DistilBertBlockImpl : torch::nn::Module {
  explicit DistilBertBlockImpl(const DistilBertConfig& config) {
    attention = register_module("attention", DistilBertAttention(config));
    sa_layer_norm = register_module("sa_layer_norm", detail::distilbert_layer_norm(config));
    ffn = register_module("ffn", DistilBertFeedForward(config));
    output_layer_norm = register_module("output_layer_norm", detail::distilbert_layer_norm(config));
  }
  at::Tensor forward(const at::Tensor& x, const at::Tensor& additive_mask) {
    const auto attended = sa_layer_norm(attention(x, additive_mask) + x);
    return output_layer_norm(ffn(attended) + attended);
  }
  DistilBertAttention attention{nullptr};
  torch::nn::LayerNorm sa_layer_norm{nullptr};
  DistilBertFeedForward ffn{nullptr};
  torch::nn::LayerNorm output_layer_norm{nullptr};
};
TORCH_MODULE(DistilBertBlock);

/// The DistilBERT encoder: `embeddings`, `transformer.layer.{i}`. No pooler, no token types.
struct DistilBertModelImpl : torch::nn::Module {
  explicit DistilBertModelImpl(const DistilBertConfig& config_) : config(config_) {
    config.validate();
    embeddings = register_module("embeddings", DistilBertEmbeddings(config));
    auto transformer = register_module("transformer", std::make_shared<torch::nn::Module>());
    layers = transformer->register_module("layer", torch::nn::ModuleList());
    for (int64_t i = 0; i < config.n_layers; ++i) layers->push_back(DistilBertBlock(config));
  }

  /// `input_ids` [batch, seq] (int64); `attention_mask` 1 for tokens, 0 for padding (undefined:
  /// all tokens).
  EncoderOutput forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {},
                        bool output_hidden_states = false) {
    detail::check_encoder_inputs("DistilBertModel", input_ids, attention_mask, config.max_position_embeddings);
    auto hidden = embeddings(input_ids);
    const auto additive_mask = attention_mask.defined()
                                   ? detail::additive_attention_mask(attention_mask, hidden.scalar_type())
                                   : at::Tensor();
    EncoderOutput output;
    if (output_hidden_states) output.hidden_states.push_back(hidden);
    for (const auto& layer : *layers) {
      hidden = layer->as<DistilBertBlockImpl>()->forward(hidden, additive_mask);
      if (output_hidden_states) output.hidden_states.push_back(hidden);
    }
    output.last_hidden_state = hidden;
    return output;
  }

  DistilBertConfig config;
  DistilBertEmbeddings embeddings{nullptr};
  torch::nn::ModuleList layers{nullptr};  ///< registered as transformer.layer
};
TORCH_MODULE(DistilBertModel);

/// DistilBERT with transformers' classification head: the first token through `pre_classifier`,
/// ReLU, dropout, `classifier`.
struct DistilBertForSequenceClassificationImpl : torch::nn::Module {
  explicit DistilBertForSequenceClassificationImpl(const DistilBertConfig& config_) : config(config_) {
    distilbert = register_module("distilbert", DistilBertModel(config));
    pre_classifier = register_module("pre_classifier", detail::projection(config.dim, config.dim));
    classifier = register_module("classifier", detail::projection(config.dim, config.num_labels));
    dropout = register_module("dropout", torch::nn::Dropout(config.seq_classif_dropout));
  }

  /// Logits [batch, num_labels].
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {}) {
    const auto first = distilbert->forward(input_ids, attention_mask).last_hidden_state.select(1, 0);
    return classifier(detail::drop(dropout, at::relu(pre_classifier(first))));
  }

  DistilBertConfig config;
  DistilBertModel distilbert{nullptr};
  lora::LoRALinear<> pre_classifier{nullptr}, classifier{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(DistilBertForSequenceClassification);

}  // namespace lora::models
