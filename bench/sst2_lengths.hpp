#pragma once

// Row lengths of real data for the benchmarks: the token counts ([CLS] + WordPiece + [SEP], at
// most 128) of the SST-2 training sentences in ../shared, or none when LORA_SHARED_DIR is unset.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include <lora/data/tsv.hpp>
#include <lora/tokenizers/wordpiece.hpp>

inline std::vector<int64_t> sst2_lengths() {
  const char* shared = std::getenv("LORA_SHARED_DIR");
  if (shared == nullptr) return {};
  const std::string root = shared;
  const auto tokenizer = lora::tokenizers::WordPieceTokenizer::from_file(root + "/data/vocab/bert-base-uncased.txt");
  std::vector<int64_t> lengths;
  for (const auto& example : lora::data::read_tsv(root + "/data/sst2/train.tsv", lora::data::Layout::kGlue).examples) {
    lengths.push_back(std::min<int64_t>(128, static_cast<int64_t>(tokenizer.tokenize_ids(example.text).size()) + 2));
  }
  return lengths;
}
