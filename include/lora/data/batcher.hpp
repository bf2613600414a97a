#pragma once

/// \file
/// Batches of tokenized examples: seeded shuffling, length bucketing (little padding on real
/// data), dynamic padding, and a fixed order for evaluation.

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <lora/data/tsv.hpp>
#include <lora/tokenizers/tokenizer.hpp>

namespace lora::data {

/// A padded batch and where its rows come from.
struct Batch {
  tokenizers::BatchEncoding inputs;  ///< input_ids, attention_mask, token_type_ids [rows, length]
  at::Tensor labels;                 ///< int64 [rows]
  std::vector<int64_t> indices;      ///< positions of the rows in the example list
};

/// How batches are made.
struct BatcherOptions {
  int64_t batch_size = 32;
  /// Tokens per example at most, special tokens included. Default 128.
  int64_t max_length = 128;
  /// Shuffle every epoch (training). Without it the order is the examples' (evaluation).
  bool shuffle = false;
  /// Group examples of similar length into batches (within windows of `bucket_batches`
  /// batches), so that dynamic padding adds little. Default true when shuffling.
  bool bucket = true;
  int64_t bucket_batches = 50;
  uint64_t seed = 0;
  /// kLongest: each batch padded to its longest row (dynamic padding). kMaxLength: every batch
  /// padded to `max_length`, the fixed shape of the simplest recipes (the costliest).
  tokenizers::Padding padding = tokenizers::Padding::kLongest;
};

/// Tokenizes a set of examples once and hands out batches.
///
///     lora::data::BatcherOptions options;
///     options.batch_size = 32;
///     options.shuffle = true;
///     lora::data::Batcher train(examples, tokenizer, options);
///     for (const auto& batch : train.epoch(0)) { ... }
class Batcher {
 public:
  Batcher(const std::vector<Example>& examples, const tokenizers::Tokenizer& tokenizer, BatcherOptions options)
      : pad_id_(tokenizer.pad_id()), options_(options) {
    TORCH_CHECK(options.batch_size > 0, "Batcher: batch_size must be > 0 (got ", options.batch_size, ")");
    TORCH_CHECK(options.max_length >= 2, "Batcher: max_length must be >= 2 (got ", options.max_length, ")");
    TORCH_CHECK(options.bucket_batches > 0, "Batcher: bucket_batches must be > 0 (got ", options.bucket_batches, ")");
    encodings_.reserve(examples.size());
    labels_.reserve(examples.size());
    for (const auto& example : examples) {
      encodings_.push_back(tokenizer.encode(example.text, std::nullopt, options.max_length));
      labels_.push_back(example.label);
    }
  }

  size_t size() const { return encodings_.size(); }
  size_t num_batches() const { return (encodings_.size() + options_.batch_size - 1) / options_.batch_size; }

  /// The batches of one epoch: shuffled (seed and epoch decide the order, the same on every
  /// machine) and bucketed by length when `shuffle`; in example order otherwise.
  std::vector<Batch> epoch(int64_t epoch = 0) const {
    std::vector<int64_t> order(encodings_.size());
    std::iota(order.begin(), order.end(), 0);
    std::vector<std::vector<int64_t>> groups;
    const auto batch = static_cast<size_t>(options_.batch_size);
    if (options_.shuffle) {
      std::mt19937_64 generator(options_.seed * 1000003ULL + static_cast<uint64_t>(epoch));
      shuffle(order, generator);
      if (options_.bucket) {
        const size_t window = batch * static_cast<size_t>(options_.bucket_batches);
        for (size_t start = 0; start < order.size(); start += window) {
          const auto end = std::min(order.size(), start + window);
          std::stable_sort(order.begin() + static_cast<std::ptrdiff_t>(start),
                           order.begin() + static_cast<std::ptrdiff_t>(end),
                           [&](int64_t a, int64_t b) { return length(a) < length(b); });
        }
      }
      for (size_t start = 0; start < order.size(); start += batch) {
        groups.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(start),
                            order.begin() + static_cast<std::ptrdiff_t>(std::min(order.size(), start + batch)));
      }
      if (options_.bucket) shuffle(groups, generator);  // buckets sorted by length: mix their order
    } else {
      for (size_t start = 0; start < order.size(); start += batch) {
        groups.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(start),
                            order.begin() + static_cast<std::ptrdiff_t>(std::min(order.size(), start + batch)));
      }
    }
    std::vector<Batch> batches;
    batches.reserve(groups.size());
    for (auto& group : groups) batches.push_back(make_batch(std::move(group)));
    return batches;
  }

  /// Padding tokens per real token over one epoch's batches (0 = no padding).
  double padding_ratio(int64_t epoch = 0) const {
    int64_t real = 0, padded = 0;
    for (const auto& batch : this->epoch(epoch)) {
      real += batch.inputs.attention_mask.sum().item<int64_t>();
      padded += batch.inputs.attention_mask.numel();
    }
    return real == 0 ? 0.0 : static_cast<double>(padded - real) / static_cast<double>(real);
  }

 private:
  size_t length(int64_t index) const { return encodings_[static_cast<size_t>(index)].input_ids.size(); }

  /// Fisher–Yates with the generator's raw output, so the order does not depend on the
  /// standard library's distributions.
  template <typename T>
  static void shuffle(std::vector<T>& items, std::mt19937_64& generator) {
    for (size_t i = items.size(); i > 1; --i) std::swap(items[i - 1], items[generator() % i]);
  }

  Batch make_batch(std::vector<int64_t> indices) const {
    std::vector<tokenizers::Encoding> rows;
    std::vector<int64_t> labels;
    rows.reserve(indices.size());
    for (const auto index : indices) {
      rows.push_back(encodings_[static_cast<size_t>(index)]);
      labels.push_back(labels_[static_cast<size_t>(index)]);
    }
    Batch batch;
    batch.inputs = tokenizers::pad_encodings(rows, pad_id_, options_.padding, options_.max_length, "Batcher");
    batch.labels = at::tensor(labels, at::kLong);
    batch.indices = std::move(indices);
    return batch;
  }

  int64_t pad_id_;
  BatcherOptions options_;
  std::vector<tokenizers::Encoding> encodings_;
  std::vector<int64_t> labels_;
};

}  // namespace lora::data
