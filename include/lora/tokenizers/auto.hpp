#pragma once

/// \file
/// The tokenizer of a Hugging Face model folder, whichever files it ships: `vocab.txt`
/// (WordPiece), `vocab.json` + `merges.txt` (byte-level BPE), or only `tokenizer.json`. Options
/// come from `tokenizer_config.json` as transformers reads them.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/detail/strings.hpp>
#include <lora/tokenizers/bpe.hpp>
#include <lora/tokenizers/tokenizer.hpp>
#include <lora/tokenizers/tokenizer_json.hpp>
#include <lora/tokenizers/wordpiece.hpp>

namespace lora::tokenizers {

/// `tokenizer_config.json` of `folder` (an empty object when there is none).
inline nlohmann::json read_tokenizer_config(const std::string& folder) {
  const auto path = std::filesystem::path(folder) / "tokenizer_config.json";
  std::error_code error;
  if (!std::filesystem::exists(path, error)) return nlohmann::json::object();
  std::ifstream in(path);
  nlohmann::json json;
  try {
    in >> json;
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, "tokenizer: invalid JSON in '", path.string(), "': ", error.what());
  }
  TORCH_CHECK(json.is_object(), "tokenizer: '", path.string(), "' is not a JSON object");
  return json;
}

/// The added tokens a folder's `tokenizer_config.json` (`added_tokens_decoder`, transformers ≥
/// 4.34) and `added_tokens.json` (older) list, with their flags.
inline std::vector<AddedToken> folder_added_tokens(const std::string& folder, const nlohmann::json& config) {
  namespace fs = std::filesystem;
  const std::string where = "tokenizer_config.json of '" + folder + "'";
  std::vector<AddedToken> added;
  if (config.contains("added_tokens_decoder") && !config["added_tokens_decoder"].is_null()) {
    TORCH_CHECK(config["added_tokens_decoder"].is_object(), where, ": 'added_tokens_decoder' must be an object");
    for (const auto& [key, item] : config["added_tokens_decoder"].items()) {
      const auto id = lora::detail::parse_integer(key);
      TORCH_CHECK(id.has_value(), where, ": added_tokens_decoder key '", key, "' is not an id");
      added.push_back(detail::added_token(item, *id, where));
    }
  }
  const auto extra = fs::path(folder) / "added_tokens.json";
  std::error_code error;
  if (fs::exists(extra, error)) {
    std::ifstream in(extra);
    nlohmann::json json;
    try {
      in >> json;
    } catch (const nlohmann::json::exception& error) {
      TORCH_CHECK(false, "tokenizer: invalid JSON in '", extra.string(), "': ", error.what());
    }
    TORCH_CHECK(json.is_object(), "tokenizer: '", extra.string(), "' must be an object of token ids");
    for (const auto& entry : json.items()) {
      const std::string& token = entry.key();  // C++17 lambdas cannot capture structured bindings
      const auto& id = entry.value();
      TORCH_CHECK(id.is_number_integer(), "tokenizer: '", token, "' in '", extra.string(), "' has a non-integer id");
      const bool listed = std::any_of(added.begin(), added.end(),
                                      [&](const AddedToken& item) { return item.token.content == token; });
      if (!listed) added.push_back({id.get<int64_t>(), {token, false, false, false}});
    }
  }
  return added;
}

/// Opens the tokenizer of a model folder. The slow tokenizers' files are preferred (they are
/// what transformers' `BertTokenizer` / `RobertaTokenizer` read, and what our parity tests
/// check); `tokenizer.json` is read when they are absent. `tokenizer_config.json` supplies
/// `do_lower_case`, `strip_accents`, `tokenize_chinese_chars` (WordPiece), `add_prefix_space`,
/// the special tokens' names and `added_tokens_decoder` (BPE); `added_tokens.json` too. WordPiece
/// keeps only its five special tokens whole: a folder that adds others is refused by name.
inline std::shared_ptr<Tokenizer> load_tokenizer(const std::string& folder) {
  namespace fs = std::filesystem;
  const fs::path dir(folder);
  std::error_code error;
  TORCH_CHECK(fs::is_directory(dir, error), "tokenizer: '", folder, "' is not a folder");
  const auto config = read_tokenizer_config(folder);
  auto flag = [&](const char* key, bool fallback) {
    if (!config.contains(key) || config[key].is_null()) return fallback;
    TORCH_CHECK(config[key].is_boolean(), "tokenizer: '", key, "' in tokenizer_config.json of '", folder,
                "' must be true or false (got ", config[key].dump(), ")");
    return config[key].get<bool>();
  };
  if (fs::exists(dir / "vocab.txt", error)) {
    WordPieceOptions options;
    options.lowercase = flag("do_lower_case", true);
    if (config.contains("strip_accents") && !config["strip_accents"].is_null()) {
      options.strip_accents = flag("strip_accents", options.lowercase);
    }
    options.split_cjk = flag("tokenize_chinese_chars", true);
    detail::check_wordpiece_added_tokens(folder_added_tokens(folder, config), "tokenizer files of '" + folder + "'");
    return std::make_shared<WordPieceTokenizer>(WordPieceTokenizer::from_file((dir / "vocab.txt").string(), options));
  }
  if (fs::exists(dir / "vocab.json", error) && fs::exists(dir / "merges.txt", error)) {
    BpeOptions options;
    options.add_prefix_space = flag("add_prefix_space", false);
    const std::string where = "tokenizer files of '" + folder + "'";
    auto& roles = options.specials;
    roles.bos = detail::config_token(config, "bos_token", roles.bos, where);
    roles.eos = detail::config_token(config, "eos_token", roles.eos, where);
    roles.pad = detail::config_token(config, "pad_token", roles.pad, where);
    roles.unk = detail::config_token(config, "unk_token", roles.unk, where);
    roles.mask = detail::config_token(config, "mask_token", roles.mask, where);
    auto tokens = ByteLevelBpeTokenizer::read_vocabulary((dir / "vocab.json").string());
    const auto added = folder_added_tokens(folder, config);
    if (!added.empty()) {
      // The added tokens (with their lstrip/rstrip, e.g. <mask>'s) are what is split out; the
      // roles' tokens are split too, as transformers treats every special token as added.
      detail::add_to_vocabulary(tokens, added, where);
      for (const auto& item : added) options.split_tokens.push_back(item.token);
      for (const auto& role : {roles.mask, roles.bos, roles.eos, roles.pad, roles.unk}) {
        const bool listed = std::any_of(options.split_tokens.begin(), options.split_tokens.end(),
                                        [&](const SpecialToken& token) { return token.content == role; });
        if (!listed) options.split_tokens.push_back({role, role == roles.mask});
      }
    }
    const auto merges = ByteLevelBpeTokenizer::read_merges((dir / "merges.txt").string());
    return std::make_shared<ByteLevelBpeTokenizer>(std::move(tokens), merges, std::move(options), where);
  }
  if (fs::exists(dir / "tokenizer.json", error)) {
    return tokenizer_from_json_file((dir / "tokenizer.json").string(), config);
  }
  TORCH_CHECK(false, "tokenizer: '", folder,
              "' has no tokenizer files (expected vocab.txt, vocab.json + merges.txt, or tokenizer.json)");
  return nullptr;
}

}  // namespace lora::tokenizers
