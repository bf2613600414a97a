#pragma once

/// \file
/// BERT's WordPiece tokenizer, id for id as Hugging Face's `BertTokenizer` computes them:
/// special-token split, text cleaning, CJK splitting, NFC, lowercasing and accent stripping
/// (uncased), punctuation split, then greedy longest-match-first WordPiece.

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <lora/tokenizers/detail/unicode.hpp>
#include <lora/tokenizers/tokenizer.hpp>

namespace lora::tokenizers {

/// How text is normalised before WordPiece (`BertTokenizer`'s options).
struct WordPieceOptions {
  /// Lowercase the text (uncased models). Default true.
  bool lowercase = true;
  /// Strip accents (NFD, drop combining marks). Unset: as `lowercase` (transformers' rule).
  std::optional<bool> strip_accents;
  /// Put spaces around CJK ideographs so that each is a word. Default true.
  bool split_cjk = true;
  /// Words longer than this many characters become [UNK]. Default 100.
  int64_t max_chars_per_word = 100;
};

/// A BERT WordPiece tokenizer over a `vocab.txt` (one token per line; id = line number).
///
///     auto tokenizer = lora::tokenizers::WordPieceTokenizer::from_file("vocab.txt");
///     auto ids = tokenizer.encode("hello world!").input_ids;  // [101, 7592, 2088, 999, 102]
///     auto batch = tokenizer.encode_batch({"a great film", "dull"}, 128);
class WordPieceTokenizer : public Tokenizer {
 public:
  /// Reads `vocab.txt`. Errors: a missing file, an empty vocabulary, a token listed twice
  /// (both line numbers), a special token ([PAD] [UNK] [CLS] [SEP] [MASK]) absent.
  static WordPieceTokenizer from_file(const std::string& path, WordPieceOptions options = {}) {
    std::ifstream in(path, std::ios::binary);
    TORCH_CHECK(in, "WordPieceTokenizer: cannot open vocabulary '", path, "'");
    std::vector<std::string> tokens;
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      tokens.push_back(line);
    }
    return WordPieceTokenizer(std::move(tokens), options, path);
  }

  WordPieceTokenizer(std::vector<std::string> vocabulary, WordPieceOptions options = {},
                     const std::string& where = "vocabulary")
      : options_(options) {
    TORCH_CHECK(!vocabulary.empty(), "WordPieceTokenizer: ", where, " is empty");
    TORCH_CHECK(options.max_chars_per_word > 0, "WordPieceTokenizer: max_chars_per_word must be > 0 (got ",
                options.max_chars_per_word, ")");
    auto vocab = std::make_shared<Vocab>();
    vocab->tokens = std::move(vocabulary);  // the maps view these strings: they never move again
    vocab->ids.reserve(vocab->tokens.size());
    for (size_t i = 0; i < vocab->tokens.size(); ++i) {
      const std::string_view token = vocab->tokens[i];
      const auto [it, inserted] = vocab->ids.emplace(token, static_cast<int64_t>(i));
      TORCH_CHECK(inserted, "WordPieceTokenizer: token '", vocab->tokens[i], "' appears twice in ", where,
                  " (lines ", it->second + 1, " and ", i + 1, ")");
      if (token.size() > 2 && token.substr(0, 2) == "##") {
        vocab->continuations.emplace(token.substr(2), static_cast<int64_t>(i));
      }
    }
    std::vector<std::string> absent;
    for (const auto* special : {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}) {
      if (!vocab->ids.count(special)) absent.push_back(special);
    }
    TORCH_CHECK(absent.empty(), "WordPieceTokenizer: ", where, " lacks the special token(s) ", join(absent));
    pad_ = vocab->ids.at("[PAD]");
    unk_ = vocab->ids.at("[UNK]");
    cls_ = vocab->ids.at("[CLS]");
    sep_ = vocab->ids.at("[SEP]");
    mask_ = vocab->ids.at("[MASK]");
    strip_accents_ = options_.strip_accents.value_or(options_.lowercase);
    vocab_ = std::move(vocab);
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(vocab_->tokens.size()); }
  int64_t pad_id() const override { return pad_; }
  int64_t unk_id() const override { return unk_; }
  int64_t cls_id() const { return cls_; }
  int64_t sep_id() const { return sep_; }
  int64_t mask_id() const { return mask_; }
  const WordPieceOptions& options() const { return options_; }

  /// The id of `token`, or [UNK]'s.
  int64_t token_to_id(const std::string& token) const override {
    const auto it = vocab_->ids.find(token);
    return it == vocab_->ids.end() ? unk_ : it->second;
  }
  const std::string& id_to_token(int64_t id) const override {
    TORCH_CHECK(id >= 0 && id < vocab_size(), "WordPieceTokenizer: id ", id, " is outside the vocabulary (size ",
                vocab_size(), ")");
    return vocab_->tokens[static_cast<size_t>(id)];
  }

  /// Token ids of `text`, without [CLS]/[SEP].
  std::vector<int64_t> tokenize_ids(const std::string& text) const override {
    std::vector<int64_t> ids;
    tokenize(text, [&](int64_t id) { ids.push_back(id); });
    return ids;
  }

  /// Token strings of `text` (WordPiece pieces with their "##"), without [CLS]/[SEP].
  std::vector<std::string> tokenize_strings(const std::string& text) const {
    std::vector<std::string> tokens;
    tokenize(text, [&](int64_t id) { tokens.push_back(vocab_->tokens[static_cast<size_t>(id)]); });
    return tokens;
  }

  /// [CLS] a [SEP] (b [SEP]) with token types 0 (a) and 1 (b). With `max_length` > 0 it is
  /// truncated to that many tokens by removing tokens from the end of the longer sequence first
  /// (transformers' "longest_first"); by default (0) nothing is cut, as transformers'
  /// `tokenizer(text)` does not truncate unless asked.
  Encoding encode(const std::string& a, const std::optional<std::string>& b = std::nullopt,
                  int64_t max_length = 0) const override {
    auto first = tokenize_ids(a);
    std::vector<int64_t> second;
    if (b) second = tokenize_ids(*b);
    const int64_t specials = b ? 3 : 2;
    truncate_longest_first(first, b ? &second : nullptr, specials, max_length, who());
    Encoding encoding;
    encoding.input_ids.reserve(first.size() + second.size() + specials);
    encoding.input_ids.push_back(cls_);
    encoding.input_ids.insert(encoding.input_ids.end(), first.begin(), first.end());
    encoding.input_ids.push_back(sep_);
    encoding.token_type_ids.assign(encoding.input_ids.size(), 0);
    if (b) {
      encoding.input_ids.insert(encoding.input_ids.end(), second.begin(), second.end());
      encoding.input_ids.push_back(sep_);
      encoding.token_type_ids.resize(encoding.input_ids.size(), 1);
    }
    encoding.attention_mask.assign(encoding.input_ids.size(), 1);
    return encoding;
  }

  /// Text of `ids`: pieces joined with "##" continuations glued, special tokens skipped (by
  /// default), spaces before punctuation and English contractions removed as transformers'
  /// `clean_up_tokenization_spaces` does.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const override {
    std::string text;
    for (const auto id : ids) {
      if (skip_special_tokens && (id == pad_ || id == cls_ || id == sep_ || id == mask_ || id == unk_)) continue;
      const auto& token = id_to_token(id);
      if (token.size() > 2 && token.compare(0, 2, "##") == 0 && !text.empty()) {
        text += token.substr(2);
      } else {
        if (!text.empty()) text += ' ';
        text += token;
      }
    }
    for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
             {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"}, {" 'm", "'m"},
             {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}}) {
      for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
        text.replace(at, from.size(), to);
      }
    }
    return text;
  }

  std::string kind() const override { return "WordPiece"; }

 protected:
  const char* who() const override { return "WordPieceTokenizer"; }

 private:
  struct ViewHash {
    size_t operator()(std::string_view view) const { return std::hash<std::string_view>()(view); }
  };
  using Table = std::unordered_map<std::string_view, int64_t, ViewHash>;
  /// Immutable and shared between copies: the tables view the strings of `tokens`.
  struct Vocab {
    std::vector<std::string> tokens;
    Table ids;
    Table continuations;  // "##x" by "x"
  };

  static std::string join(const std::vector<std::string>& items) {
    std::string out;
    for (const auto& item : items) out += (out.empty() ? "" : " ") + item;
    return out;
  }

  /// Calls `emit(id)` for each token of `text`.
  template <typename Emit>
  void tokenize(const std::string& text, Emit&& emit) const {
    // Special tokens written in the text stay whole (transformers splits them out first).
    size_t start = 0;
    while (start < text.size()) {
      size_t best = std::string::npos;
      int64_t best_id = -1;
      size_t best_length = 0;
      for (const auto& [token, id] : {std::pair<const char*, int64_t>{"[CLS]", cls_}, {"[SEP]", sep_},
                                      {"[PAD]", pad_}, {"[MASK]", mask_}, {"[UNK]", unk_}}) {
        const auto at = text.find(token, start);
        if (at < best) {
          best = at;
          best_id = id;
          best_length = std::char_traits<char>::length(token);
        }
      }
      basic_then_wordpiece(std::string_view(text).substr(start, best == std::string::npos ? std::string::npos
                                                                                          : best - start),
                           emit);
      if (best == std::string::npos) break;
      emit(best_id);
      start = best + best_length;
    }
  }

  template <typename Emit>
  void basic_then_wordpiece(std::string_view segment, Emit& emit) const {
    if (segment.empty()) return;
    std::vector<char32_t> raw;
    detail::decode_utf8(std::string(segment), raw);
    std::vector<char32_t> cps;
    cps.reserve(raw.size() + 8);
    bool ascii = true;
    for (const auto cp : raw) {
      if (cp == 0 || cp == detail::kReplacement || detail::is_control(cp)) continue;  // clean
      if (detail::is_whitespace(cp)) {
        cps.push_back(' ');
        continue;
      }
      ascii = ascii && cp < 0x80;
      if (options_.split_cjk && detail::is_cjk(cp)) {
        cps.push_back(' ');
        cps.push_back(cp);
        cps.push_back(' ');
      } else if (options_.lowercase) {
        detail::append_lower(cps, cp);
      } else {
        cps.push_back(cp);
      }
    }
    if (!ascii) cps = detail::normalize(cps, /*compose=*/true);  // NFC

    std::vector<char32_t> word;
    size_t i = 0;
    while (i < cps.size()) {
      while (i < cps.size() && detail::splits_words(cps[i])) ++i;
      const size_t begin = i;
      while (i < cps.size() && !detail::splits_words(cps[i])) ++i;
      if (i == begin) break;
      word.assign(cps.begin() + static_cast<std::ptrdiff_t>(begin), cps.begin() + static_cast<std::ptrdiff_t>(i));
      if (strip_accents_) strip_accents(word);
      split_punctuation_and_wordpiece(word, emit);
    }
  }

  static void strip_accents(std::vector<char32_t>& word) {
    const bool ascii = std::all_of(word.begin(), word.end(), [](char32_t cp) { return cp < 0x80; });
    if (ascii) return;
    auto decomposed = detail::normalize(word, /*compose=*/false);  // NFD
    word.clear();
    for (const auto cp : decomposed) {
      if (detail::category(cp) != UTF8PROC_CATEGORY_MN) word.push_back(cp);
    }
  }

  template <typename Emit>
  void split_punctuation_and_wordpiece(const std::vector<char32_t>& word, Emit& emit) const {
    size_t begin = 0;
    for (size_t i = 0; i <= word.size(); ++i) {
      const bool end = i == word.size();
      if (end || detail::is_punctuation(word[i])) {
        if (i > begin) wordpiece(word, begin, i, emit);
        if (!end) wordpiece(word, i, i + 1, emit);
        begin = i + 1;
      }
    }
  }

  /// Greedy longest-match-first over characters [begin, end) of `word`.
  template <typename Emit>
  void wordpiece(const std::vector<char32_t>& word, size_t begin, size_t end, Emit& emit) const {
    const size_t length = end - begin;
    if (static_cast<int64_t>(length) > options_.max_chars_per_word) {
      emit(unk_);
      return;
    }
    std::string utf8;
    std::vector<size_t> offsets;  // byte offset of each character, plus the end
    offsets.reserve(length + 1);
    for (size_t i = begin; i < end; ++i) {
      offsets.push_back(utf8.size());
      detail::append_utf8(utf8, word[i]);
    }
    offsets.push_back(utf8.size());
    const std::string_view view(utf8);
    std::vector<int64_t> pieces;
    size_t start = 0;
    while (start < length) {
      size_t stop = length;
      int64_t found = -1;
      const auto& table = start == 0 ? vocab_->ids : vocab_->continuations;
      while (stop > start) {
        const auto it = table.find(view.substr(offsets[start], offsets[stop] - offsets[start]));
        if (it != table.end()) {
          found = it->second;
          break;
        }
        --stop;
      }
      if (found < 0) {
        emit(unk_);
        return;
      }
      pieces.push_back(found);
      start = stop;
    }
    for (const auto id : pieces) emit(id);
  }

  std::shared_ptr<const Vocab> vocab_;
  WordPieceOptions options_;
  bool strip_accents_ = true;
  int64_t pad_ = 0, unk_ = 0, cls_ = 0, sep_ = 0, mask_ = 0;
};

}  // namespace lora::tokenizers
