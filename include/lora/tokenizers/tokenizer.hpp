#pragma once

/// \file
/// What every tokenizer offers (WordPiece for BERT and DistilBERT, byte-level BPE for RoBERTa),
/// and the encodings they produce: one sequence before padding, and padded int64 batches.

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lora::tokenizers {

/// One encoded sequence or pair, before padding.
struct Encoding {
  std::vector<int64_t> input_ids;
  std::vector<int64_t> token_type_ids;
  std::vector<int64_t> attention_mask;
};

/// A padded batch, ready for a model's `forward`: int64 tensors [batch, length].
struct BatchEncoding {
  at::Tensor input_ids;
  at::Tensor attention_mask;
  at::Tensor token_type_ids;
};

/// How a batch is padded.
enum class Padding {
  kLongest,    ///< to the longest row of the batch (dynamic padding)
  kMaxLength,  ///< to `max_length`
};

/// Pads encodings into int64 tensors with `pad_id`: to the longest row, or to `max_length`.
inline BatchEncoding pad_encodings(const std::vector<Encoding>& encodings, int64_t pad_id,
                                   Padding padding = Padding::kLongest, int64_t max_length = 0,
                                   const char* who = "Tokenizer") {
  TORCH_CHECK(!encodings.empty(), who, ": cannot pad an empty batch");
  TORCH_CHECK(padding != Padding::kMaxLength || max_length > 0, who,
              ": padding to max_length needs max_length > 0 (got ", max_length, ")");
  int64_t longest = 0;
  for (const auto& encoding : encodings) longest = std::max<int64_t>(longest, encoding.input_ids.size());
  const int64_t length = padding == Padding::kLongest ? longest : max_length;
  TORCH_CHECK(longest <= length, who, ": a row has ", longest, " tokens, more than max_length ", length);
  const auto rows = static_cast<int64_t>(encodings.size());
  BatchEncoding batch{at::full({rows, length}, pad_id, at::kLong), at::zeros({rows, length}, at::kLong),
                      at::zeros({rows, length}, at::kLong)};
  auto ids = batch.input_ids.accessor<int64_t, 2>();
  auto mask = batch.attention_mask.accessor<int64_t, 2>();
  auto types = batch.token_type_ids.accessor<int64_t, 2>();
  for (int64_t r = 0; r < rows; ++r) {
    const auto& encoding = encodings[static_cast<size_t>(r)];
    TORCH_CHECK(encoding.token_type_ids.size() == encoding.input_ids.size(), who, ": row ", r, " has ",
                encoding.input_ids.size(), " input ids but ", encoding.token_type_ids.size(), " token type ids");
    for (size_t c = 0; c < encoding.input_ids.size(); ++c) {
      ids[r][static_cast<int64_t>(c)] = encoding.input_ids[c];
      mask[r][static_cast<int64_t>(c)] = 1;
      types[r][static_cast<int64_t>(c)] = encoding.token_type_ids[c];
    }
  }
  return batch;
}

/// transformers' "longest_first" truncation: tokens leave from the end of the longer sequence
/// until both fit `max_length` with `specials` special tokens (no-op for `max_length` 0).
inline void truncate_longest_first(std::vector<int64_t>& first, std::vector<int64_t>* second, int64_t specials,
                                   int64_t max_length, const char* who) {
  if (max_length <= 0) return;
  TORCH_CHECK(max_length >= specials, who, ": max_length ", max_length, " leaves no room for the ", specials,
              " special tokens");
  const size_t budget = static_cast<size_t>(max_length - specials);
  while (first.size() + (second ? second->size() : 0) > budget) {
    if (!second || first.size() > second->size()) {
      first.pop_back();
    } else {
      second->pop_back();
    }
  }
}

/// The interface the library's data pipeline uses (`lora::data::Batcher`, the sentiment
/// program); `load_tokenizer` (<lora/tokenizers/auto.hpp>) opens the right one for a folder.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// Token ids of `text`, without special tokens.
  virtual std::vector<int64_t> tokenize_ids(const std::string& text) const = 0;
  /// The model input for `a` (and `b`), special tokens included; truncated to `max_length`
  /// tokens longest-first when it is > 0, untouched by default (as transformers' `tokenizer(text)`).
  virtual Encoding encode(const std::string& a, const std::optional<std::string>& b = std::nullopt,
                          int64_t max_length = 0) const = 0;
  /// Text of `ids`.
  virtual std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const = 0;

  virtual int64_t vocab_size() const = 0;
  virtual int64_t pad_id() const = 0;
  virtual int64_t unk_id() const = 0;
  /// The id of `token`, or the unknown token's.
  virtual int64_t token_to_id(const std::string& token) const = 0;
  virtual const std::string& id_to_token(int64_t id) const = 0;
  /// "WordPiece" or "BPE".
  virtual std::string kind() const = 0;

  /// Pads encodings with this tokenizer's padding id.
  BatchEncoding pad(const std::vector<Encoding>& encodings, Padding padding = Padding::kLongest,
                    int64_t max_length = 0) const {
    return pad_encodings(encodings, pad_id(), padding, max_length, who());
  }

  /// Encodes and pads single sentences, truncated to `max_length` tokens when it is > 0.
  BatchEncoding encode_batch(const std::vector<std::string>& texts, int64_t max_length = 0,
                             Padding padding = Padding::kLongest) const {
    std::vector<Encoding> encodings;
    encodings.reserve(texts.size());
    for (const auto& text : texts) encodings.push_back(encode(text, std::nullopt, max_length));
    return pad(encodings, padding, max_length);
  }

 protected:
  Tokenizer() = default;
  Tokenizer(const Tokenizer&) = default;
  Tokenizer& operator=(const Tokenizer&) = default;
  /// The class name, for messages.
  virtual const char* who() const = 0;
};

}  // namespace lora::tokenizers
