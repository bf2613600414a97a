#pragma once

/// \file
/// The tokenizer of a Hugging Face model folder, whichever files it ships: `vocab.txt`
/// (WordPiece), `vocab.json` + `merges.txt` (byte-level BPE), or only `tokenizer.json`. Options
/// come from `tokenizer_config.json` as transformers reads them.

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

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

/// Opens the tokenizer of a model folder. The slow tokenizers' files are preferred (they are
/// what transformers' `BertTokenizer` / `RobertaTokenizer` read, and what our parity tests
/// check); `tokenizer.json` is read when they are absent. `tokenizer_config.json` supplies
/// `do_lower_case`, `strip_accents`, `tokenize_chinese_chars` (WordPiece) and
/// `add_prefix_space` (BPE).
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
    return std::make_shared<WordPieceTokenizer>(WordPieceTokenizer::from_file((dir / "vocab.txt").string(), options));
  }
  if (fs::exists(dir / "vocab.json", error) && fs::exists(dir / "merges.txt", error)) {
    BpeOptions options;
    options.add_prefix_space = flag("add_prefix_space", false);
    return std::make_shared<ByteLevelBpeTokenizer>(ByteLevelBpeTokenizer::from_files(
        (dir / "vocab.json").string(), (dir / "merges.txt").string(), options));
  }
  if (fs::exists(dir / "tokenizer.json", error)) return tokenizer_from_json_file((dir / "tokenizer.json").string());
  TORCH_CHECK(false, "tokenizer: '", folder,
              "' has no tokenizer files (expected vocab.txt, vocab.json + merges.txt, or tokenizer.json)");
  return nullptr;
}

}  // namespace lora::tokenizers
