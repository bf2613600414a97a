#pragma once

/// \file
/// `tokenizer.json`, the file Hugging Face's fast tokenizers save (and many hub folders ship
/// instead of vocabulary files): its WordPiece (BERT, DistilBERT) and byte-level BPE (RoBERTa)
/// pipelines read into our tokenizers. A pipeline step we do not reproduce exactly is refused
/// by name rather than approximated. Also the added-token lists of `tokenizer_config.json` /
/// `added_tokens.json` (`added_tokens`), which the vocabulary-file path uses.

#include <algorithm>
#include <fstream>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/detail/strings.hpp>
#include <lora/tokenizers/bpe.hpp>
#include <lora/tokenizers/tokenizer.hpp>
#include <lora/tokenizers/wordpiece.hpp>

namespace lora::tokenizers {

/// An added token with its id (`tokenizer.json`'s `added_tokens`, `tokenizer_config.json`'s
/// `added_tokens_decoder`, `added_tokens.json`).
struct AddedToken {
  int64_t id = 0;
  SpecialToken token;
};

namespace detail {

inline const nlohmann::json& field(const nlohmann::json& object, const char* key, const std::string& where) {
  TORCH_CHECK(object.is_object() && object.contains(key), where, ": missing '", key, "'");
  return object[key];
}

/// `object[key]` as a T, or `fallback` when it is absent or null; a value of another type is
/// an error naming the key (nlohmann's `value()` would throw its own exception type).
template <typename T>
T optional(const nlohmann::json& object, const char* key, T fallback, const std::string& where) {
  if (!object.is_object() || !object.contains(key) || object[key].is_null()) return fallback;
  const auto& value = object[key];
  bool fits = false;
  if constexpr (std::is_same_v<T, bool>) {
    fits = value.is_boolean();
  } else if constexpr (std::is_same_v<T, std::string>) {
    fits = value.is_string();
  } else if constexpr (std::is_integral_v<T>) {
    fits = value.is_number_integer();
  } else {
    fits = value.is_number();
  }
  TORCH_CHECK(fits, where, ": '", key, "' has a value of the wrong type (got ", value.dump(), ")");
  return value.get<T>();
}

/// A pipeline step's `type` ("" for null). Files written by tokenizers before 0.9 have no
/// `type` in their model: `model_type` tells BPE and WordPiece apart by their fields.
inline std::string type_of(const nlohmann::json& step, const std::string& where) {
  if (step.is_null()) return "";
  TORCH_CHECK(step.is_object(), where, ": a pipeline step is not an object (got ", step.dump().substr(0, 80), ")");
  return optional<std::string>(step, "type", "", where);
}

inline std::string model_type(const nlohmann::json& model, const std::string& where) {
  auto type = type_of(model, where);
  if (!type.empty()) return type;
  if (model.is_object() && model.contains("merges")) return "BPE";
  if (model.is_object() && (model.contains("max_input_chars_per_word") || model.contains("continuing_subword_prefix"))) {
    return "WordPiece";
  }
  return "";
}

inline AddedToken added_token(const nlohmann::json& item, int64_t id, const std::string& where) {
  TORCH_CHECK(item.is_object() && item.contains("content") && item["content"].is_string(), where,
              ": an added token needs a string 'content' (got ", item.dump(), ")");
  AddedToken added{id, {item["content"].get<std::string>()}};
  added.token.lstrip = optional(item, "lstrip", false, where);
  added.token.rstrip = optional(item, "rstrip", false, where);
  added.token.special = optional(item, "special", false, where);
  TORCH_CHECK(!optional(item, "single_word", false, where), where, ": added token '", added.token.content,
              "' is single_word, which is not supported");
  return added;
}

/// `tokenizer.json`'s `added_tokens` list.
inline std::vector<AddedToken> added_tokens(const nlohmann::json& json, const std::string& where) {
  std::vector<AddedToken> out;
  if (!json.contains("added_tokens") || json["added_tokens"].is_null()) return out;
  TORCH_CHECK(json["added_tokens"].is_array(), where, ": 'added_tokens' must be a list");
  for (const auto& item : json["added_tokens"]) {
    TORCH_CHECK(item.is_object() && item.contains("id") && item["id"].is_number_integer(), where,
                ": an added token needs an integer 'id' (got ", item.dump(), ")");
    out.push_back(added_token(item, item["id"].get<int64_t>(), where));
  }
  return out;
}

/// Puts added tokens into a vocabulary (tokens by id): one already there must have its id; a
/// new one must take the next id, as transformers appends them.
inline void add_to_vocabulary(std::vector<std::string>& tokens, std::vector<AddedToken> added,
                              const std::string& where) {
  std::sort(added.begin(), added.end(), [](const AddedToken& a, const AddedToken& b) { return a.id < b.id; });
  for (const auto& item : added) {
    const auto size = static_cast<int64_t>(tokens.size());
    if (item.id < size) {
      TORCH_CHECK(item.id >= 0 && tokens[static_cast<size_t>(item.id)] == item.token.content, where, ": added token '",
                  item.token.content, "' has id ", item.id, ", which the vocabulary gives to '",
                  item.id >= 0 ? tokens[static_cast<size_t>(item.id)] : std::string("?"), "'");
      continue;
    }
    TORCH_CHECK(item.id == size, where, ": added token '", item.token.content, "' has id ", item.id,
                " but the vocabulary ends at ", size - 1, " (added ids must follow on)");
    tokens.push_back(item.token.content);
  }
}

/// A special token named in `tokenizer_config.json` (a string, or an object with `content`).
inline std::string config_token(const nlohmann::json& config, const char* key, const std::string& fallback,
                                const std::string& where) {
  if (!config.is_object() || !config.contains(key) || config[key].is_null()) return fallback;
  const auto& value = config[key];
  if (value.is_string()) return value.get<std::string>();
  TORCH_CHECK(value.is_object() && value.contains("content") && value["content"].is_string(), where, ": '", key,
              "' must be a token string or an object with 'content' (got ", value.dump(), ")");
  return value["content"].get<std::string>();
}

inline void check_wordpiece_added_tokens(const std::vector<AddedToken>& added, const std::string& where) {
  for (const auto& item : added) {
    const auto& content = item.token.content;
    TORCH_CHECK(content == "[PAD]" || content == "[UNK]" || content == "[CLS]" || content == "[SEP]" ||
                    content == "[MASK]",
                where, ": added token '", content,
                "' is not supported with WordPiece (only [PAD] [UNK] [CLS] [SEP] [MASK] are kept whole)");
  }
}

/// The ids a template lists: "[CLS]" for a special token, "$A" for a sequence.
inline std::vector<std::string> template_items(const nlohmann::json& items, const std::string& where) {
  std::vector<std::string> out;
  TORCH_CHECK(items.is_array(), where, ": a post_processor template must be a list");
  for (const auto& item : items) {
    if (item.contains("SpecialToken")) {
      out.push_back(optional<std::string>(item["SpecialToken"], "id", "?", where));
    } else if (item.contains("Sequence")) {
      out.push_back("$" + optional<std::string>(item["Sequence"], "id", "?", where));
    } else {
      out.push_back("?");
    }
  }
  return out;
}

inline ByteLevelBpeTokenizer bpe_from_tokenizer_json(const nlohmann::json& json, const nlohmann::json& config,
                                                     const std::string& where) {
  const auto& model = field(json, "model", where);
  auto refuse_set = [&](const char* key) {
    if (!model.contains(key) || model[key].is_null()) return;
    const auto& value = model[key];
    const bool unset = (value.is_string() && value.get<std::string>().empty()) || (value.is_boolean() && !value.get<bool>());
    TORCH_CHECK(unset, where, ": BPE model setting '", key, "' = ", value.dump(), " is not supported");
  };
  for (const auto* key : {"continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "fuse_unk",
                          "ignore_merges"}) {
    refuse_set(key);
  }
  TORCH_CHECK(optional(model, "dropout", 0.0, where) == 0.0, where, ": BPE dropout is not supported (got ",
              model["dropout"].dump(), ")");
  const auto normalizer = type_of(json.contains("normalizer") ? json["normalizer"] : nlohmann::json(), where);
  TORCH_CHECK(normalizer.empty(), where, ": normalizer '", normalizer,
              "' is not supported with byte-level BPE (RoBERTa's is null)");
  const auto& pre = field(json, "pre_tokenizer", where);
  TORCH_CHECK(type_of(pre, where) == "ByteLevel", where, ": pre_tokenizer '", type_of(pre, where),
              "' is not supported with BPE (expected ByteLevel)");
  TORCH_CHECK(optional(pre, "use_regex", true, where), where, ": ByteLevel with use_regex false is not supported");
  BpeOptions options;
  options.add_prefix_space = optional(config, "add_prefix_space", optional(pre, "add_prefix_space", false, where), where);
  // The only post-processing encode() does: <s> a </s> (</s> b </s>).
  const auto& post = field(json, "post_processor", where);
  TORCH_CHECK(type_of(post, where) == "RobertaProcessing", where, ": post_processor '", type_of(post, where),
              "' is not supported with BPE (expected RobertaProcessing: <s> text </s>)");
  auto token = [&](const char* key) {
    const auto& pair = field(post, key, where + " post_processor");
    TORCH_CHECK(pair.is_array() && pair.size() == 2 && pair[0].is_string(), where, ": post_processor '", key,
                "' must be [token, id]");
    return pair[0].get<std::string>();
  };
  options.specials.bos = token("cls");
  options.specials.eos = token("sep");
  options.specials.unk = optional<std::string>(model, "unk_token", options.specials.unk, where);
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
  auto tokens = ByteLevelBpeTokenizer::vocabulary_from_json(field(model, "vocab", where + " model"), where);
  add_to_vocabulary(tokens, added, where);
  return ByteLevelBpeTokenizer(std::move(tokens), merges, std::move(options), where);
}

inline WordPieceTokenizer wordpiece_from_tokenizer_json(const nlohmann::json& json, const nlohmann::json& config,
                                                        const std::string& where) {
  const auto& model = field(json, "model", where);
  const auto prefix = optional<std::string>(model, "continuing_subword_prefix", "##", where);
  TORCH_CHECK(prefix == "##", where, ": WordPiece continuing_subword_prefix '", prefix, "' is not supported (expected ##)");
  const auto unk = optional<std::string>(model, "unk_token", "[UNK]", where);
  TORCH_CHECK(unk == "[UNK]", where, ": WordPiece unk_token '", unk, "' is not supported (expected [UNK])");
  WordPieceOptions options;
  options.max_chars_per_word = optional<int64_t>(model, "max_input_chars_per_word", 100, where);
  const auto& normalizer = field(json, "normalizer", where);
  TORCH_CHECK(type_of(normalizer, where) == "BertNormalizer", where, ": normalizer '", type_of(normalizer, where),
              "' is not supported with WordPiece (expected BertNormalizer)");
  TORCH_CHECK(optional(normalizer, "clean_text", true, where), where,
              ": BertNormalizer with clean_text false is not supported");
  // tokenizer_config.json's options win over the file's, as transformers' fast tokenizers apply them.
  options.lowercase = optional(config, "do_lower_case", optional(normalizer, "lowercase", true, where), where);
  options.split_cjk =
      optional(config, "tokenize_chinese_chars", optional(normalizer, "handle_chinese_chars", true, where), where);
  for (const auto* source : {&normalizer, &config}) {  // null: as lowercase
    if (source->is_object() && source->contains("strip_accents") && !(*source)["strip_accents"].is_null()) {
      options.strip_accents = optional(*source, "strip_accents", false, where);
    }
  }
  const auto& pre = field(json, "pre_tokenizer", where);
  TORCH_CHECK(type_of(pre, where) == "BertPreTokenizer", where, ": pre_tokenizer '", type_of(pre, where),
              "' is not supported with WordPiece (expected BertPreTokenizer)");
  // The only post-processing encode() does: [CLS] a [SEP] (b [SEP]).
  const auto& post = field(json, "post_processor", where);
  const auto post_type = type_of(post, where);
  if (post_type == "TemplateProcessing") {
    const auto single = template_items(field(post, "single", where), where);
    TORCH_CHECK(single == std::vector<std::string>({"[CLS]", "$A", "[SEP]"}), where,
                ": post_processor template '", lora::detail::join(single, " "),
                "' is not supported (expected [CLS] $A [SEP])");
  } else {
    TORCH_CHECK(post_type == "BertProcessing", where, ": post_processor '", post_type,
                "' is not supported with WordPiece (expected TemplateProcessing or BertProcessing)");
    TORCH_CHECK(field(post, "cls", where)[0] == "[CLS]" && field(post, "sep", where)[0] == "[SEP]", where,
                ": BertProcessing must use [CLS] and [SEP]");
  }
  const auto added = added_tokens(json, where);
  check_wordpiece_added_tokens(added, where);
  auto tokens = ByteLevelBpeTokenizer::vocabulary_from_json(field(model, "vocab", where + " model"), where);
  add_to_vocabulary(tokens, added, where);
  return WordPieceTokenizer(std::move(tokens), options, where);
}

}  // namespace detail

/// Reads a `tokenizer.json` (WordPiece or byte-level BPE model). `tokenizer_config` (the
/// folder's `tokenizer_config.json`, or an empty object) supplies the options transformers'
/// fast tokenizers apply over the file: `add_prefix_space`, `do_lower_case`, `strip_accents`,
/// `tokenize_chinese_chars`.
inline std::shared_ptr<Tokenizer> tokenizer_from_json_file(const std::string& path,
                                                           const nlohmann::json& tokenizer_config = nlohmann::json::object()) {
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
  const auto type = detail::model_type(detail::field(json, "model", where), where);
  if (type == "BPE") {
    return std::make_shared<ByteLevelBpeTokenizer>(detail::bpe_from_tokenizer_json(json, tokenizer_config, where));
  }
  TORCH_CHECK(type == "WordPiece", where, ": tokenizer model '", type, "' is not supported (supported: WordPiece, BPE)");
  return std::make_shared<WordPieceTokenizer>(detail::wordpiece_from_tokenizer_json(json, tokenizer_config, where));
}

}  // namespace lora::tokenizers
