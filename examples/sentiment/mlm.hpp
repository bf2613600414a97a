#pragma once

// Pretraining at small scale, BERT's recipe: a masked language model (15 % of the tokens are
// chosen; of those 80 % become [MASK], 10 % a random word, 10 % stay; the model predicts them
// through a head whose decoder shares the word embeddings) plus a sentence-level task on the
// pooled [CLS] output, as BERT's next-sentence prediction trains its pooler. Ours asks what the
// review is about (its noun): it gives [CLS] a useful representation that is not sentiment.

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <lora/models/bert.hpp>
#include <lora/tokenizers/wordpiece.hpp>
#include <torch/torch.h>

namespace sentiment {

/// BERT's MLM head: dense + GELU + LayerNorm, then the tied word embeddings and a bias.
struct MlmHeadImpl : torch::nn::Module {
  explicit MlmHeadImpl(const lora::models::BertConfig& config) {
    dense = register_module("dense", torch::nn::Linear(config.hidden_size, config.hidden_size));
    norm = register_module("LayerNorm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.hidden_size})
                                                                 .eps(config.layer_norm_eps)));
    bias = register_parameter("bias", torch::zeros({config.vocab_size}));
  }
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& word_embeddings) {
    return torch::nn::functional::linear(norm(torch::gelu(dense(hidden))), word_embeddings, bias);
  }
  torch::nn::Linear dense{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::Tensor bias;
};
TORCH_MODULE(MlmHead);

/// Pretrains `bert` on `sentences` for `steps` steps of `batch_size`; prints the loss now and then.
/// `topics` lists the topic words; a sentence's topic is the first of them it contains.
inline void pretrain_mlm(lora::models::BertModel& bert, const std::vector<std::string>& sentences,
                         const lora::tokenizers::WordPieceTokenizer& tokenizer, const std::vector<std::string>& topics,
                         int64_t steps, int64_t batch_size, double lr, uint64_t seed) {
  MlmHead head(bert->config);
  torch::nn::Linear topic_head(bert->config.hidden_size, static_cast<int64_t>(topics.size()));
  std::vector<int64_t> topic_ids;
  for (const auto& word : topics) topic_ids.push_back(tokenizer.token_to_id(word));
  lora::mark_all_as_trainable(*bert);
  std::vector<torch::Tensor> parameters = bert->parameters();
  for (const auto& parameter : head->parameters()) parameters.push_back(parameter);
  for (const auto& parameter : topic_head->parameters()) parameters.push_back(parameter);
  torch::optim::AdamW optimizer(parameters, torch::optim::AdamWOptions(lr).weight_decay(0.01));
  std::mt19937_64 rng(seed);
  const int64_t first_word = 5;  // after [PAD] [UNK] [CLS] [SEP] [MASK]
  bert->train();
  head->train();
  double recent = 0;
  for (int64_t step = 1; step <= steps; ++step) {
    std::vector<std::string> texts;
    for (int64_t i = 0; i < batch_size; ++i) texts.push_back(sentences[rng() % sentences.size()]);
    auto batch = tokenizer.encode_batch(texts, bert->config.max_position_embeddings);
    auto ids = batch.input_ids.clone();
    auto labels = torch::full_like(ids, -100);
    auto topic = torch::full({ids.size(0)}, -100, torch::kLong);
    for (int64_t r = 0; r < ids.size(0); ++r) {
      for (int64_t c = 0; c < ids.size(1) && topic[r].item<int64_t>() < 0; ++c) {
        const auto found = std::find(topic_ids.begin(), topic_ids.end(), batch.input_ids[r][c].item<int64_t>());
        if (found != topic_ids.end()) topic[r] = static_cast<int64_t>(found - topic_ids.begin());
      }
    }
    auto ids_a = ids.accessor<int64_t, 2>();
    auto labels_a = labels.accessor<int64_t, 2>();
    for (int64_t r = 0; r < ids.size(0); ++r) {
      for (int64_t c = 0; c < ids.size(1); ++c) {
        const auto id = ids_a[r][c];
        if (id < first_word || rng() % 100 >= 15) continue;
        labels_a[r][c] = id;
        const auto roll = rng() % 10;
        if (roll < 8) {
          ids_a[r][c] = tokenizer.mask_id();
        } else if (roll < 9) {
          ids_a[r][c] = first_word + static_cast<int64_t>(rng() % (tokenizer.vocab_size() - first_word));
        }
      }
    }
    optimizer.zero_grad();
    const auto out = bert->forward(ids, batch.attention_mask);
    const auto logits = head(out.last_hidden_state, bert->embeddings->word_embeddings->weight);
    const auto ignore = torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100);
    const auto loss = torch::nn::functional::cross_entropy(logits.view({-1, logits.size(-1)}), labels.view({-1}), ignore) +
                      torch::nn::functional::cross_entropy(topic_head(out.pooler_output), topic, ignore);
    loss.backward();
    torch::nn::utils::clip_grad_norm_(parameters, 1.0);
    optimizer.step();
    recent = step == 1 ? loss.item<double>() : 0.95 * recent + 0.05 * loss.item<double>();
    if (step % 200 == 0 || step == steps) {
      std::printf("  pretraining step %lld/%lld  loss (masked LM + topic) %.3f\n", (long long)step, (long long)steps,
                  recent);
      std::fflush(stdout);
    }
  }
  bert->eval();
}

}  // namespace sentiment
