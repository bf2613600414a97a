#pragma once

/// \file
/// Byte-level BPE (GPT-2, RoBERTa), id for id as transformers' `RobertaTokenizer` computes
/// them: special tokens split out of the text (`<mask>` strips the space before it), GPT-2's
/// pre-tokenisation pattern, UTF-8 bytes mapped to printable characters, then the ranked
/// merges of `merges.txt`. No normalisation: the text's bytes all survive (`decode` gives them
/// back).

#include <array>
#include <cstdint>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/tokenizers/detail/unicode.hpp>
#include <lora/tokenizers/tokenizer.hpp>

namespace lora::tokenizers {

/// A token cut out of the text before BPE (`<s>`, `<mask>`, ...), as transformers' AddedToken.
struct SpecialToken {
  std::string content;
  bool lstrip = false;   ///< the text before it loses its trailing whitespace
  bool rstrip = false;   ///< the text after it loses its leading whitespace
  bool special = true;   ///< skipped by `decode(ids, skip_special_tokens = true)`
};

/// The special tokens' roles (their contents must be vocabulary tokens).
struct BpeSpecials {
  std::string bos = "<s>", eos = "</s>", pad = "<pad>", unk = "<unk>", mask = "<mask>";
};

/// How a byte-level BPE tokenizer behaves.
struct BpeOptions {
  /// Prepend a space to a text that does not start with whitespace, so that its first word
  /// is tokenised like the others (`RobertaTokenizer(add_prefix_space=True)`). Default false.
  bool add_prefix_space = false;
  BpeSpecials specials;
  /// Tokens split out of the text; empty: the five specials, `<mask>` with lstrip (RoBERTa's).
  std::vector<SpecialToken> split_tokens;
};

namespace detail {

/// GPT-2's `bytes_to_unicode`: printable bytes keep their code point, the other 68 become
/// U+0100, U+0101, ... in byte order (space → Ġ U+0120).
inline const std::array<char32_t, 256>& byte_to_char() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> out{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      out[static_cast<size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
    }
    return out;
  }();
  return table;
}

/// The inverse of `byte_to_char`: -1 for characters that stand for no byte.
inline int char_to_byte(char32_t cp) {
  static const std::vector<int> table = [] {
    std::vector<int> out(324, -1);
    for (int b = 0; b < 256; ++b) out[byte_to_char()[static_cast<size_t>(b)]] = b;
    return out;
  }();
  return cp < table.size() ? table[cp] : -1;
}

/// Calls `emit(begin, end)` for each piece of `cps[begin, end)` that GPT-2's pattern
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` finds, scanning
/// left to right with the alternatives in order, as Python's `regex.findall` does.
template <typename Emit>
void gpt2_pieces(const std::vector<char32_t>& cps, size_t begin, size_t end, Emit&& emit) {
  auto other = [](char32_t cp) { return !is_white_space(cp) && !is_letter(cp) && !is_number(cp); };
  size_t i = begin;
  while (i < end) {
    const char32_t c = cps[i];
    if (c == '\'' && i + 1 < end) {  // contractions, lower case only
      const char32_t n = cps[i + 1];
      if (n == 's' || n == 't' || n == 'm' || n == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < end && ((n == 'r' && cps[i + 2] == 'e') || (n == 'v' && cps[i + 2] == 'e') ||
                          (n == 'l' && cps[i + 2] == 'l'))) {
        emit(i, i + 3);
        i += 3;
        continue;
      }
    }
    const size_t word = (c == ' ' && i + 1 < end) ? i + 1 : i;  // the optional leading space
    bool matched = false;
    for (auto* in_class : {+[](char32_t cp) { return is_letter(cp); }, +[](char32_t cp) { return is_number(cp); }}) {
      if (in_class(cps[word])) {
        size_t k = word;
        while (k < end && in_class(cps[k])) ++k;
        emit(i, k);
        i = k;
        matched = true;
        break;
      }
    }
    if (matched) continue;
    if (other(cps[word])) {
      size_t k = word;
      while (k < end && other(cps[k])) ++k;
      emit(i, k);
      i = k;
      continue;
    }
    // Whitespace: a run up to (not including) the last one before a non-space, else the run.
    size_t k = i;
    while (k < end && is_white_space(cps[k])) ++k;
    if (k < end && k - i > 1) --k;
    emit(i, k);
    i = k;
  }
}

/// UTF-8 decoding with Python's `errors="replace"`: each maximal ill-formed subsequence becomes
/// one U+FFFD.
inline std::string utf8_replace_invalid(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  const auto at = [&](size_t k) { return static_cast<unsigned char>(bytes[k]); };
  while (i < bytes.size()) {
    const unsigned char lead = at(i);
    size_t need = lead < 0x80 ? 0 : (lead >= 0xC2 && lead <= 0xDF) ? 1 : (lead >= 0xE0 && lead <= 0xEF) ? 2
                                                                  : (lead >= 0xF0 && lead <= 0xF4) ? 3 : 99;
    if (need == 0) {
      out.push_back(static_cast<char>(lead));
      ++i;
      continue;
    }
    size_t good = 1;  // bytes of a well-formed prefix
    if (need != 99) {
      for (size_t k = 1; k <= need && i + k < bytes.size(); ++k) {
        unsigned char low = 0x80, high = 0xBF;
        if (k == 1) {
          if (lead == 0xE0) low = 0xA0;
          if (lead == 0xED) high = 0x9F;
          if (lead == 0xF0) low = 0x90;
          if (lead == 0xF4) high = 0x8F;
        }
        if (at(i + k) < low || at(i + k) > high) break;
        ++good;
      }
    }
    if (need != 99 && good == need + 1) {
      out.append(bytes, i, good);
    } else {
      append_utf8(out, kReplacement);
    }
    i += good;
  }
  return out;
}

}  // namespace detail

/// A byte-level BPE tokenizer over `vocab.json` + `merges.txt` (RoBERTa, GPT-2 style).
///
///     auto tokenizer = lora::tokenizers::ByteLevelBpeTokenizer::from_files("vocab.json", "merges.txt");
///     auto ids = tokenizer.encode("a charming film").input_ids;   // <s> a Ġcharming Ġfilm </s>
///
/// Thread-safe: the per-word cache is guarded.
class ByteLevelBpeTokenizer : public Tokenizer {
 public:
  using Merge = std::pair<std::string, std::string>;

  /// Reads `vocab.json` (a JSON object token → id; raw UTF-8 or `\u` escapes) and `merges.txt`
  /// as `RobertaTokenizer` does: the first line is dropped whatever it says, so is everything
  /// after the last newline; a line holds two tokens separated by whitespace.
  static ByteLevelBpeTokenizer from_files(const std::string& vocab_json, const std::string& merges_txt,
                                          BpeOptions options = {}) {
    auto tokens = read_vocabulary(vocab_json);  // first: its errors come first
    return ByteLevelBpeTokenizer(std::move(tokens), read_merges(merges_txt), std::move(options), "'" + vocab_json + "'");
  }

  /// `vocab.json` as tokens by id.
  static std::vector<std::string> read_vocabulary(const std::string& vocab_json) {
    std::ifstream in(vocab_json, std::ios::binary);
    TORCH_CHECK(in, "ByteLevelBpeTokenizer: cannot open vocabulary '", vocab_json, "'");
    nlohmann::json vocab;
    try {
      in >> vocab;
    } catch (const nlohmann::json::exception& error) {
      TORCH_CHECK(false, "ByteLevelBpeTokenizer: invalid JSON in '", vocab_json, "': ", error.what());
    }
    return vocabulary_from_json(vocab, "'" + vocab_json + "'");
  }

  /// `merges.txt`'s pairs in rank order (see `merges_from_text`).
  static std::vector<Merge> read_merges(const std::string& merges_txt) {
    std::ifstream in(merges_txt, std::ios::binary);
    TORCH_CHECK(in, "ByteLevelBpeTokenizer: cannot open merges '", merges_txt, "'");
    std::stringstream text;
    text << in.rdbuf();
    return merges_from_text(text.str());
  }

  /// `tokens[id]` is the token of id `id`; `merges` in rank order (a pair listed twice keeps
  /// its later rank, as a Python dict does).
  ByteLevelBpeTokenizer(std::vector<std::string> tokens, const std::vector<Merge>& merges, BpeOptions options = {},
                        const std::string& where = "vocabulary")
      : state_(std::make_shared<State>()) {
    TORCH_CHECK(!tokens.empty(), "ByteLevelBpeTokenizer: ", where, " is empty");
    auto& state = *state_;
    state.options = std::move(options);
    state.tokens = std::move(tokens);
    state.ids.reserve(state.tokens.size());
    for (size_t id = 0; id < state.tokens.size(); ++id) {
      const auto [it, inserted] = state.ids.emplace(state.tokens[id], static_cast<int64_t>(id));
      TORCH_CHECK(inserted, "ByteLevelBpeTokenizer: token '", state.tokens[id], "' has two ids in ", where, " (",
                  it->second, " and ", id, ")");
    }
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      state.ranks[merges[rank].first + " " + merges[rank].second] = static_cast<int64_t>(rank);
    }
    const auto& roles = state.options.specials;
    auto id_of = [&](const std::string& role, const std::string& token) {
      const auto it = state.ids.find(token);
      TORCH_CHECK(it != state.ids.end(), "ByteLevelBpeTokenizer: ", where, " lacks the ", role, " token '", token, "'");
      return it->second;
    };
    bos_ = id_of("begin", roles.bos);
    eos_ = id_of("end", roles.eos);
    pad_ = id_of("padding", roles.pad);
    unk_ = id_of("unknown", roles.unk);
    mask_ = id_of("mask", roles.mask);
    if (state.options.split_tokens.empty()) {
      state.options.split_tokens = {{roles.bos}, {roles.pad}, {roles.eos}, {roles.unk}, {roles.mask, true, false}};
    }
    for (const auto& special : state.options.split_tokens) {
      TORCH_CHECK(!special.content.empty(), "ByteLevelBpeTokenizer: a special token is empty");
      state.special_ids.push_back(id_of("special", special.content));
    }
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(state_->tokens.size()); }
  int64_t pad_id() const override { return pad_; }
  int64_t unk_id() const override { return unk_; }
  int64_t bos_id() const { return bos_; }
  int64_t eos_id() const { return eos_; }
  int64_t mask_id() const { return mask_; }
  const BpeOptions& options() const { return state_->options; }
  std::string kind() const override { return "BPE"; }

  int64_t token_to_id(const std::string& token) const override {
    const auto it = state_->ids.find(token);
    return it == state_->ids.end() ? unk_ : it->second;
  }
  const std::string& id_to_token(int64_t id) const override {
    TORCH_CHECK(id >= 0 && id < vocab_size(), "ByteLevelBpeTokenizer: id ", id, " is outside the vocabulary (size ",
                vocab_size(), ")");
    return state_->tokens[static_cast<size_t>(id)];
  }

  std::vector<int64_t> tokenize_ids(const std::string& text) const override {
    std::vector<int64_t> ids;
    tokenize(text, ids);
    return ids;
  }

  /// The vocabulary strings of `text`'s tokens (byte characters: a space shows as Ġ).
  std::vector<std::string> tokenize_strings(const std::string& text) const {
    std::vector<std::string> tokens;
    for (const auto id : tokenize_ids(text)) tokens.push_back(state_->tokens[static_cast<size_t>(id)]);
    return tokens;
  }

  /// `<s> a </s>`, or `<s> a </s></s> b </s>` for a pair; token types all 0 (RoBERTa has one).
  Encoding encode(const std::string& a, const std::optional<std::string>& b = std::nullopt,
                  int64_t max_length = 0) const override {
    auto first = tokenize_ids(a);
    std::vector<int64_t> second;
    if (b) second = tokenize_ids(*b);
    truncate_longest_first(first, b ? &second : nullptr, b ? 4 : 2, max_length, who());
    Encoding encoding;
    auto& ids = encoding.input_ids;
    ids.reserve(first.size() + second.size() + 4);
    ids.push_back(bos_);
    ids.insert(ids.end(), first.begin(), first.end());
    ids.push_back(eos_);
    if (b) {
      ids.push_back(eos_);
      ids.insert(ids.end(), second.begin(), second.end());
      ids.push_back(eos_);
    }
    encoding.token_type_ids.assign(ids.size(), 0);
    encoding.attention_mask.assign(ids.size(), 1);
    return encoding;
  }

  /// The text of `ids`: tokens concatenated, characters mapped back to bytes, decoded as UTF-8
  /// (ill-formed bytes become U+FFFD). No space clean-up: `decode(encode(t))` gives `t` back.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const override {
    std::string bytes;
    std::vector<char32_t> cps;
    for (const auto id : ids) {
      if (skip_special_tokens && is_special(id)) continue;
      detail::decode_utf8(id_to_token(id), cps);
      for (const auto cp : cps) {
        const int byte = detail::char_to_byte(cp);
        if (byte >= 0) {
          bytes.push_back(static_cast<char>(byte));
        } else {
          detail::append_utf8(bytes, cp);  // a character that stands for no byte: kept as it is
        }
      }
    }
    return detail::utf8_replace_invalid(bytes);
  }

  /// vocab.json's object as tokens by id; ids must be 0…n-1, each once.
  static std::vector<std::string> vocabulary_from_json(const nlohmann::json& vocab, const std::string& where) {
    TORCH_CHECK(vocab.is_object(), "ByteLevelBpeTokenizer: ", where, " must be a JSON object of token ids");
    std::vector<std::string> tokens(vocab.size());
    std::vector<bool> seen(vocab.size(), false);
    for (const auto& [token, id] : vocab.items()) {
      TORCH_CHECK(id.is_number_integer(), "ByteLevelBpeTokenizer: token '", token, "' in ", where,
                  " has a non-integer id ", id.dump());
      const auto value = id.get<int64_t>();
      TORCH_CHECK(value >= 0 && value < static_cast<int64_t>(tokens.size()), "ByteLevelBpeTokenizer: token '", token,
                  "' in ", where, " has id ", value, " outside [0, ", tokens.size(), ")");
      TORCH_CHECK(!seen[static_cast<size_t>(value)], "ByteLevelBpeTokenizer: id ", value, " is given to two tokens in ",
                  where, " ('", tokens[static_cast<size_t>(value)], "' and '", token, "')");
      seen[static_cast<size_t>(value)] = true;
      tokens[static_cast<size_t>(value)] = token;
    }
    return tokens;
  }

  /// merges.txt's pairs, as `RobertaTokenizer` reads them (`read().split("\n")[1:-1]`, each
  /// line split on whitespace; lines that do not hold two tokens never match and are skipped).
  static std::vector<Merge> merges_from_text(const std::string& text) {
    std::vector<Merge> merges;
    size_t start = text.find('\n');
    if (start == std::string::npos) return merges;
    ++start;
    for (size_t end = text.find('\n', start); end != std::string::npos; end = text.find('\n', start)) {
      std::istringstream line(text.substr(start, end - start));
      std::string left, right, extra;
      if (line >> left >> right && !(line >> extra)) merges.emplace_back(left, right);
      start = end + 1;
    }
    return merges;
  }

 protected:
  const char* who() const override { return "ByteLevelBpeTokenizer"; }

 private:
  struct State {
    BpeOptions options;
    std::vector<std::string> tokens;
    std::unordered_map<std::string, int64_t> ids;
    std::unordered_map<std::string, int64_t> ranks;  // "left right" → rank (byte characters hold no space)
    std::vector<int64_t> special_ids;
    std::mutex cache_mutex;
    std::unordered_map<std::string, std::vector<int64_t>> cache;  // piece (as bytes) → ids
  };
  static constexpr size_t kCacheLimit = 1 << 16;

  bool is_special(int64_t id) const {
    const auto& split = state_->options.split_tokens;
    for (size_t s = 0; s < split.size(); ++s) {
      if (state_->special_ids[s] == id) return split[s].special;
    }
    return id == bos_ || id == eos_ || id == pad_ || id == unk_ || id == mask_;
  }

  void tokenize(std::string text, std::vector<int64_t>& ids) const {
    const auto& state = *state_;
    if (state.options.add_prefix_space && !text.empty()) {
      std::vector<char32_t> first;
      detail::decode_utf8(text.substr(0, std::min<size_t>(4, text.size())), first);
      if (!detail::is_python_space(first.front())) text.insert(text.begin(), ' ');
    }
    // Cut at special tokens (the earliest, then the longest), as transformers' trie does.
    struct Part {
      std::string text;
      int special = -1;  // index into split_tokens
    };
    std::vector<Part> parts;
    const auto& split = state.options.split_tokens;
    size_t from = 0, at = 0;
    while (at < text.size()) {
      int best = -1;
      for (size_t s = 0; s < split.size(); ++s) {
        const auto& content = split[s].content;
        if (text.compare(at, content.size(), content) == 0 &&
            (best < 0 || content.size() > split[static_cast<size_t>(best)].content.size())) {
          best = static_cast<int>(s);
        }
      }
      if (best < 0) {
        ++at;
        continue;
      }
      if (at > from) parts.push_back({text.substr(from, at - from)});
      parts.push_back({split[static_cast<size_t>(best)].content, best});
      at += split[static_cast<size_t>(best)].content.size();
      from = at;
    }
    if (from < text.size()) parts.push_back({text.substr(from)});
    // lstrip / rstrip: the neighbouring text loses its whitespace on that side.
    for (size_t p = 0; p < parts.size(); ++p) {
      if (parts[p].special < 0) continue;
      const auto& special = split[static_cast<size_t>(parts[p].special)];
      if (special.rstrip && p + 1 < parts.size() && parts[p + 1].special < 0) strip(parts[p + 1].text, true);
      if (special.lstrip && p > 0 && parts[p - 1].special < 0) strip(parts[p - 1].text, false);
    }
    std::vector<char32_t> cps;
    for (const auto& part : parts) {
      if (part.special >= 0) {
        ids.push_back(state.special_ids[static_cast<size_t>(part.special)]);
        continue;
      }
      detail::decode_utf8(part.text, cps);
      detail::gpt2_pieces(cps, 0, cps.size(), [&](size_t begin, size_t end) {
        std::string piece;
        for (size_t k = begin; k < end; ++k) detail::append_utf8(piece, cps[k]);
        bpe(piece, ids);
      });
    }
  }

  /// Removes Python whitespace from the front (`leading`) or the back of `text`.
  static void strip(std::string& text, bool leading) {
    std::vector<char32_t> cps;
    detail::decode_utf8(text, cps);
    size_t begin = 0, end = cps.size();
    if (leading) {
      while (begin < end && detail::is_python_space(cps[begin])) ++begin;
    } else {
      while (end > begin && detail::is_python_space(cps[end - 1])) --end;
    }
    text.clear();
    for (size_t k = begin; k < end; ++k) detail::append_utf8(text, cps[k]);
  }

  /// Appends the ids of one pre-tokenised piece (UTF-8 text).
  void bpe(const std::string& piece, std::vector<int64_t>& ids) const {
    auto& state = *state_;
    {
      std::lock_guard<std::mutex> lock(state.cache_mutex);
      const auto hit = state.cache.find(piece);
      if (hit != state.cache.end()) {
        ids.insert(ids.end(), hit->second.begin(), hit->second.end());
        return;
      }
    }
    std::vector<std::string> word;
    word.reserve(piece.size());
    for (const unsigned char byte : piece) {
      word.emplace_back();
      detail::append_utf8(word.back(), detail::byte_to_char()[byte]);
    }
    std::string key;
    while (word.size() > 1) {
      int64_t best_rank = -1;
      size_t best = 0;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        key.assign(word[i]).append(" ").append(word[i + 1]);
        const auto found = state.ranks.find(key);
        if (found != state.ranks.end() && (best_rank < 0 || found->second < best_rank)) {
          best_rank = found->second;
          best = i;
        }
      }
      if (best_rank < 0) break;
      const std::string first = word[best], second = word[best + 1];
      std::vector<std::string> merged;
      merged.reserve(word.size());
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
          merged.push_back(first + second);
          i += 2;
        } else {
          merged.push_back(std::move(word[i]));
          ++i;
        }
      }
      word = std::move(merged);
    }
    std::vector<int64_t> piece_ids;
    piece_ids.reserve(word.size());
    for (const auto& token : word) {
      const auto found = state.ids.find(token);
      piece_ids.push_back(found == state.ids.end() ? unk_ : found->second);
    }
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
    std::lock_guard<std::mutex> lock(state.cache_mutex);
    if (state.cache.size() >= kCacheLimit) state.cache.clear();
    state.cache.emplace(piece, std::move(piece_ids));
  }

  std::shared_ptr<State> state_;
  int64_t bos_ = 0, eos_ = 0, pad_ = 0, unk_ = 0, mask_ = 0;
};

}  // namespace lora::tokenizers
