#pragma once

/// \file
/// RoBERTa (Liu et al. 2019) as transformers 4.39 defines it: BERT's encoder layers under
/// `roberta.encoder.layer.{i}`, position ids counted from the padding id, and the
/// `classifier.{dense,out_proj}` head on the first (`<s>`) token. Every projection is a
/// `lora::LoRALinear<>`, so PEFT's RoBERTa adapters load unchanged.

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <lora/linear.hpp>
#include <lora/models/bert.hpp>
#include <lora/models/encoder.hpp>
#include <lora/models/roberta_config.hpp>

namespace lora::models {

/// transformers' `create_position_ids_from_input_ids`: real tokens get padding_idx + 1,
/// padding_idx + 2, …; padding gets padding_idx. Decided by the ids, not the attention mask.
inline at::Tensor roberta_position_ids(const at::Tensor& input_ids, int64_t padding_idx) {
  const auto keep = input_ids.ne(padding_idx).to(at::kInt);
  return (keep.cumsum(1, at::kInt) * keep).to(at::kLong) + padding_idx;
}

/// Word + position (from the ids) + token-type embeddings, LayerNorm, dropout.
struct RobertaEmbeddingsImpl : torch::nn::Module {
  explicit RobertaEmbeddingsImpl(const RobertaConfig& config) : padding_idx(config.pad_token_id) {
    auto embedding = [&](int64_t rows, bool padded) {
      auto options = torch::nn::EmbeddingOptions(rows, config.hidden_size);
      if (padded) options.padding_idx(config.pad_token_id);
      return torch::nn::Embedding(options);
    };
    word_embeddings = register_module("word_embeddings", embedding(config.vocab_size, true));
    position_embeddings = register_module("position_embeddings", embedding(config.max_position_embeddings, true));
    token_type_embeddings = register_module("token_type_embeddings", embedding(config.type_vocab_size, false));
    LayerNorm = register_module("LayerNorm", detail::layer_norm(config));
    dropout = register_module("dropout", torch::nn::Dropout(config.hidden_dropout_prob));
  }

  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& token_type_ids) {
    auto embeddings = word_embeddings(input_ids) + token_type_embeddings(token_type_ids);
    embeddings = embeddings + position_embeddings(roberta_position_ids(input_ids, padding_idx));
    return detail::drop(dropout, LayerNorm(embeddings));
  }

  int64_t padding_idx;
  torch::nn::Embedding word_embeddings{nullptr}, position_embeddings{nullptr}, token_type_embeddings{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(RobertaEmbeddings);

/// The RoBERTa encoder without a pooler (as `RobertaForSequenceClassification` builds it):
/// `embeddings`, `encoder.layer.{i}` (BERT's layers).
struct RobertaModelImpl : torch::nn::Module {
  explicit RobertaModelImpl(const RobertaConfig& config_) : config(config_) {
    config.validate();
    embeddings = register_module("embeddings", RobertaEmbeddings(config));
    auto encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
    layers = encoder->register_module("layer", torch::nn::ModuleList());
    for (int64_t i = 0; i < config.num_hidden_layers; ++i) layers->push_back(BertLayer(config));
  }

  /// `input_ids` [batch, seq] (int64; padding must use `pad_token_id`, which decides the
  /// positions); `attention_mask` 1 for tokens, 0 for padding (undefined: all tokens);
  /// `token_type_ids` undefined means all 0.
  EncoderOutput forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {},
                        const at::Tensor& token_type_ids = {}, bool output_hidden_states = false) {
    detail::check_encoder_inputs("RobertaModel", input_ids, attention_mask, config.max_tokens());
    const auto types = token_type_ids.defined() ? token_type_ids : at::zeros_like(input_ids);
    TORCH_CHECK(types.sizes() == input_ids.sizes(), "RobertaModel: token_type_ids shape ", types.sizes(),
                " differs from input_ids shape ", input_ids.sizes());
    auto hidden = embeddings(input_ids, types);
    const auto additive_mask = attention_mask.defined()
                                   ? detail::additive_attention_mask(attention_mask, hidden.scalar_type())
                                   : at::Tensor();
    EncoderOutput output;
    if (output_hidden_states) output.hidden_states.push_back(hidden);
    for (const auto& layer : *layers) {
      hidden = layer->as<BertLayerImpl>()->forward(hidden, additive_mask);
      if (output_hidden_states) output.hidden_states.push_back(hidden);
    }
    output.last_hidden_state = hidden;
    return output;
  }

  RobertaConfig config;
  RobertaEmbeddings embeddings{nullptr};
  torch::nn::ModuleList layers{nullptr};  ///< registered as encoder.layer
};
TORCH_MODULE(RobertaModel);

/// transformers' `RobertaClassificationHead`: dropout, `dense`, tanh, dropout, `out_proj` on
/// the first token.
struct RobertaClassificationHeadImpl : torch::nn::Module {
  explicit RobertaClassificationHeadImpl(const RobertaConfig& config) {
    dense = register_module("dense", detail::projection(config.hidden_size, config.hidden_size));
    dropout = register_module("dropout",
                              torch::nn::Dropout(config.classifier_dropout.value_or(config.hidden_dropout_prob)));
    out_proj = register_module("out_proj", detail::projection(config.hidden_size, config.num_labels));
  }
  /// `hidden` [batch, seq, hidden] → logits [batch, num_labels].
  at::Tensor forward(const at::Tensor& hidden) {
    return out_proj(detail::drop(dropout, at::tanh(dense(detail::drop(dropout, hidden.select(1, 0))))));
  }
  lora::LoRALinear<> dense{nullptr}, out_proj{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(RobertaClassificationHead);

/// RoBERTa with its classification head: `roberta`, `classifier`.
struct RobertaForSequenceClassificationImpl : torch::nn::Module {
  explicit RobertaForSequenceClassificationImpl(const RobertaConfig& config_) : config(config_) {
    roberta = register_module("roberta", RobertaModel(config));
    classifier = register_module("classifier", RobertaClassificationHead(config));
  }

  /// Logits [batch, num_labels].
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {},
                     const at::Tensor& token_type_ids = {}) {
    return classifier(roberta->forward(input_ids, attention_mask, token_type_ids).last_hidden_state);
  }

  RobertaConfig config;
  RobertaModel roberta{nullptr};
  RobertaClassificationHead classifier{nullptr};
};
TORCH_MODULE(RobertaForSequenceClassification);

}  // namespace lora::models
