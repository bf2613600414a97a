#pragma once

/// \file
/// `tokenizer.json`, the file Hugging Face's fast tokenizers save (and many hub folders ship
/// instead of vocabulary files): its WordPiece (BERT, DistilBERT) and byte-level BPE (RoBERTa,
/// GPT-2) pipelines read into our tokenizers. A pipeline step we do not reproduce exactly is
/// refused by name rather than approximated.

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/tokenizers/bpe.hpp>
#include <lora/tokenizers/tokenizer.hpp>
#include <lora/tokenizers/wordpiece.hpp>

namespace lora::tokenizers {

namespace detail {

inline const nlohmann::json& field(const nlohmann::json& object, const char* key, const std::string& where) {
  TORCH_CHECK(object.is_object() && object.contains(key), where, ": missing '", key, "'");
  return object[key];
}

inline std::string type_of(const nlohmann::json& step) {
  if (step.is_null()) return "";
  TORCH_CHECK(step.is_object() && step.contains("type") && step["type"].is_string(),
              "tokenizer.json: a pipeline step has no 'type' (got ", step.dump().substr(0, 80), ")");
  return step["type"].get<std::string>();
}

/// The `added_tokens` list: (id, content, lstrip, rstrip).
struct AddedToken {
  int64_t id;
  SpecialToken token;
};

inline std::vector<AddedToken> added_tokens(const nlohmann::json& json, const std::string& where) {
  std::vector<AddedToken> out;
  if (!json.contains("added_tokens") || json["added_tokens"].is_null()) return out;
  TORCH_CHECK(json["added_tokens"].is_array(), where, ": 'added_tokens' must be a list");
  for (const auto& item : json["added_tokens"]) {
    TORCH_CHECK(item.is_object() && item.contains("id") && item["id"].is_number_integer() && item.contains("content") &&
                    item["content"].is_string(),
                where, ": an added token needs an integer 'id' and a string 'content' (got ", item.dump(), ")");
    AddedToken added{item["id"].get<int64_t>(), {item["content"].get<std::string>()}};
    added.token.lstrip = item.value("lstrip", false);
    added.token.rstrip = item.value("rstrip", false);
    TORCH_CHECK(!item.value("single_word", false), where, ": added token '", added.token.content,
                "' is single_word, which is not supported");
    out.push_back(std::move(added));
  }
  return out;
}

/// The model's vocabulary (token → id) with the added tokens, as tokens by id (ids 0…n-1).
inline std::vector<std::string> tokens_by_id(const nlohmann::json& vocab, const std::vector<AddedToken>& added,
                                             const std::string& where) {
  TORCH_CHECK(vocab.is_object(), where, ": model.vocab must be an object of token ids");
  nlohmann::json all = vocab;
  for (const auto& item : added) {
    if (!all.contains(item.token.content)) all[item.token.content] = item.id;
    TORCH_CHECK(all[item.token.content] == item.id, where, ": added token '", item.token.content, "' has id ", item.id,
                " but the vocabulary gives it ", all[item.token.content].dump());
  }
  return ByteLevelBpeTokenizer::vocabulary_from_json(all, where);
}

inline ByteLevelBpeTokenizer bpe_from_tokenizer_json(const nlohmann::json& json, const std::string& where) {
  const auto& model = field(json, "model", where);
  auto refuse_set = [&](const char* key) {
    if (!model.contains(key) || model[key].is_null()) return;
    const auto& value = model[key];
    const bool unset = (value.is_string() && value.get<std::string>().empty()) || (value.is_boolean() && !value.get<bool>());
    TORCH_CHECK(unset, where, ": BPE model setting '", key, "' = ", value.dump(), " is not supported");
  };
  refuse_set("continuing_subword_prefix");
  refuse_set("end_of_word_suffix");
  refuse_set("byte_fallback");
  refuse_set("fuse_unk");
  if (model.contains("dropout") && !model["dropout"].is_null()) {
    TORCH_CHECK(model["dropout"].is_number() && model["dropout"].get<double>() == 0.0, where,
                ": BPE dropout is not supported (got ", model["dropout"].dump(), ")");
  }
  const auto normalizer = type_of(json.value("normalizer", nlohmann::json()));
  TORCH_CHECK(normalizer.empty(), where, ": normalizer '", normalizer,
              "' is not supported with byte-level BPE (RoBERTa's is null)");
  const auto& pre = field(json, "pre_tokenizer", where);
  TORCH_CHECK(type_of(pre) == "ByteLevel", where, ": pre_tokenizer '", type_of(pre),
              "' is not supported with BPE (expected ByteLevel)");
  TORCH_CHECK(pre.value("use_regex", true), where, ": ByteLevel with use_regex false is not supported");
  BpeOptions options;
  options.add_prefix_space = pre.value("add_prefix_space", false);
  const auto post = json.value("post_processor", nlohmann::json());
  if (type_of(post) == "RobertaProcessing") {
    auto token = [&](const char* key) {
      const auto& pair = field(post, key, where + " post_processor");
      TORCH_CHECK(pair.is_array() && pair.size() == 2 && pair[0].is_string(), where, ": post_processor '", key,
                  "' must be [token, id]");
      return pair[0].get<std::string>();
    };
    options.specials.bos = token("cls");
    options.specials.eos = token("sep");
  } else {
    TORCH_CHECK(type_of(post).empty() || type_of(post) == "ByteLevel", where, ": post_processor '", type_of(post),
                "' is not supported with BPE (expected RobertaProcessing)");
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) options.specials.unk = model["unk_token"];
  const auto added = added_tokens(json, where);
  for (const auto& item : added) options.split_tokens.push_back(item.token);
  std::vector<ByteLevelBpeTokenizer::Merge> merges;
  const auto& listed = field(model, "merges", where + " model");
  TORCH_CHECK(listed.is_array(), where, ": model.merges must be a list");
  for (const auto& merge : listed) {
    if (merge.is_string()) {  // "left right" (tokenizers < 0.20)
      const auto text = merge.get<std::string>();
      const auto space = text.find(' ');
      TORCH_CHECK(space != std::string::npos && text.find(' ', space + 1) == std::string::npos, where, ": merge '",
                  text, "' is not two tokens");
      merges.emplace_back(text.substr(0, space), text.substr(space + 1));
    } else {  // ["left", "right"] (tokenizers >= 0.20)
      TORCH_CHECK(merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string(), where,
                  ": merge ", merge.dump(), " is not two tokens");
      merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
    }
  }
  return ByteLevelBpeTokenizer(tokens_by_id(field(model, "vocab", where + " model"), added, where), merges,
                               std::move(options), where);
}

inline WordPieceTokenizer wordpiece_from_tokenizer_json(const nlohmann::json& json, const std::string& where) {
  const auto& model = field(json, "model", where);
  TORCH_CHECK(model.value("continuing_subword_prefix", std::string("##")) == "##", where,
              ": WordPiece continuing_subword_prefix '", model.value("continuing_subword_prefix", std::string()),
              "' is not supported (expected ##)");
  TORCH_CHECK(model.value("unk_token", std::string("[UNK]")) == "[UNK]", where, ": WordPiece unk_token '",
              model.value("unk_token", std::string()), "' is not supported (expected [UNK])");
  WordPieceOptions options;
  options.max_chars_per_word = model.value("max_input_chars_per_word", int64_t{100});
  const auto normalizer = json.value("normalizer", nlohmann::json());
  TORCH_CHECK(type_of(normalizer) == "BertNormalizer", where, ": normalizer '", type_of(normalizer),
              "' is not supported with WordPiece (expected BertNormalizer)");
  TORCH_CHECK(normalizer.value("clean_text", true), where, ": BertNormalizer with clean_text false is not supported");
  options.lowercase = normalizer.value("lowercase", true);
  options.split_cjk = normalizer.value("handle_chinese_chars", true);
  if (normalizer.contains("strip_accents") && !normalizer["strip_accents"].is_null()) {
    TORCH_CHECK(normalizer["strip_accents"].is_boolean(), where, ": strip_accents must be true, false or null");
    options.strip_accents = normalizer["strip_accents"].get<bool>();
  }
  const auto pre = json.value("pre_tokenizer", nlohmann::json());
  TORCH_CHECK(type_of(pre) == "BertPreTokenizer", where, ": pre_tokenizer '", type_of(pre),
              "' is not supported with WordPiece (expected BertPreTokenizer)");
  const auto post = json.value("post_processor", nlohmann::json());
  TORCH_CHECK(type_of(post).empty() || type_of(post) == "TemplateProcessing" || type_of(post) == "BertProcessing",
              where, ": post_processor '", type_of(post), "' is not supported with WordPiece");
  return WordPieceTokenizer(tokens_by_id(field(model, "vocab", where + " model"), added_tokens(json, where), where),
                            options, where);
}

}  // namespace detail

/// Reads a `tokenizer.json` (WordPiece or byte-level BPE model).
inline std::shared_ptr<Tokenizer> tokenizer_from_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "tokenizer.json: cannot open '", path, "'");
  nlohmann::json json;
  try {
    in >> json;
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, "tokenizer.json: invalid JSON in '", path, "': ", error.what());
  }
  const std::string where = "'" + path + "'";
  TORCH_CHECK(json.is_object(), where, " is not a JSON object");
  const auto type = detail::type_of(detail::field(json, "model", where));
  if (type == "BPE") return std::make_shared<ByteLevelBpeTokenizer>(detail::bpe_from_tokenizer_json(json, where));
  if (type == "WordPiece") return std::make_shared<WordPieceTokenizer>(detail::wordpiece_from_tokenizer_json(json, where));
  TORCH_CHECK(false, where, ": tokenizer model '", type, "' is not supported (supported: WordPiece, BPE)");
  return nullptr;
}

}  // namespace lora::tokenizers
