// libFuzzer target: tokenisation of arbitrary bytes (WordPiece and byte-level BPE: encode,
// pairs, truncation, decode) and the vocabulary readers (vocab.txt, vocab.json, merges.txt,
// tokenizer.json) on arbitrary files. The first byte picks what the rest of the input is.
#include <lora/tokenizers/auto.hpp>

#include "fuzz_common.hpp"

namespace {

const lora::tokenizers::WordPieceTokenizer& wordpiece() {
  static const lora::tokenizers::WordPieceTokenizer tokenizer(
      {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "##s", "is", "great", "!", "caf", "##é", "a", "##b"});
  return tokenizer;
}

const lora::tokenizers::ByteLevelBpeTokenizer& bpe() {
  static const lora::tokenizers::ByteLevelBpeTokenizer tokenizer = [] {
    std::vector<std::string> tokens{"<s>", "<pad>", "</s>", "<unk>"};
    for (int b = 0; b < 256; ++b) {
      std::string token;
      lora::tokenizers::detail::append_utf8(token, lora::tokenizers::detail::byte_to_char()[static_cast<size_t>(b)]);
      tokens.push_back(token);
    }
    const std::string G = "\xc4\xa0";  // Ġ, the space byte
    const std::vector<lora::tokenizers::ByteLevelBpeTokenizer::Merge> merges{
        {"h", "e"}, {"l", "l"}, {"he", "ll"}, {G, "w"}, {"o", "r"}, {G + "w", "or"}, {"'", "s"}};
    for (const auto& [left, right] : merges) tokens.push_back(left + right);
    tokens.push_back("<mask>");
    return lora::tokenizers::ByteLevelBpeTokenizer(tokens, merges);
  }();
  return tokenizer;
}

void tokenize_with(const lora::tokenizers::Tokenizer& tokenizer, const std::string& text) {
  const auto half = text.size() / 2;
  const auto encoding = tokenizer.encode(text);
  (void)tokenizer.decode(encoding.input_ids);
  (void)tokenizer.decode(encoding.input_ids, false);
  (void)tokenizer.encode(text.substr(0, half), text.substr(half), 7);
  (void)tokenizer.encode_batch({text, text.substr(half)}, 16);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 5) {
    case 0:
      lora::fuzz::expect_only_library_errors("wordpiece", [&] { tokenize_with(wordpiece(), text); });
      break;
    case 1:
      lora::fuzz::expect_only_library_errors("bpe", [&] { tokenize_with(bpe(), text); });
      break;
    case 2: {  // vocab.txt
      const auto& path = lora::fuzz::scratch_file(data + 1, size - 1, ".vocab.txt");
      lora::fuzz::expect_only_library_errors("vocab.txt", [&] {
        tokenize_with(lora::tokenizers::WordPieceTokenizer::from_file(path), "[CLS] the films, caf\xc3\xa9!");
      });
      break;
    }
    case 3: {  // vocab.json, with merges.txt made of its own bytes
      const auto& path = lora::fuzz::scratch_file(data + 1, size - 1, ".vocab.json");
      lora::fuzz::expect_only_library_errors("vocab.json", [&] {
        const auto tokens = lora::tokenizers::ByteLevelBpeTokenizer::read_vocabulary(path);
        const auto merges = lora::tokenizers::ByteLevelBpeTokenizer::merges_from_text(text);
        tokenize_with(lora::tokenizers::ByteLevelBpeTokenizer(tokens, merges), "hello <mask> world 's");
      });
      break;
    }
    default: {  // tokenizer.json
      const auto& path = lora::fuzz::scratch_file(data + 1, size - 1, ".tokenizer.json");
      lora::fuzz::expect_only_library_errors("tokenizer.json", [&] {
        tokenize_with(*lora::tokenizers::tokenizer_from_json_file(path), "Hello <mask> the films!");
      });
    }
  }
  return 0;
}
