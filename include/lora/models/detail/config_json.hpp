#pragma once

// Reading and writing the fields of Hugging Face `config.json` files, with messages that name
// the file, the key and the offending value. Shared by every model family's config.

#include <cstdint>
#include <fstream>
#include <map>
#include <optional>
#include <string>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/detail/strings.hpp>

namespace lora::models::detail {

/// Reads typed fields of one parsed config.json; absent (or null) optional keys keep the field.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& json, std::string where) : json_(json), where_(std::move(where)) {
    TORCH_CHECK(json_.is_object(), where_, ": expected a JSON object");
  }

  const std::string& where() const { return where_; }
  bool has(const char* key) const { return json_.contains(key) && !json_[key].is_null(); }

  void integer(const char* key, int64_t& field, bool required = false) const {
    if (!has(key)) {
      TORCH_CHECK(!required, where_, ": missing '", key, "'");
      return;
    }
    TORCH_CHECK(json_[key].is_number_integer(), where_, ": '", key, "' must be an integer (got ", json_[key].dump(), ")");
    field = json_[key].get<int64_t>();
  }

  void number(const char* key, double& field) const {
    if (!has(key)) return;
    TORCH_CHECK(json_[key].is_number(), where_, ": '", key, "' must be a number (got ", json_[key].dump(), ")");
    field = json_[key].get<double>();
  }

  void number(const char* key, std::optional<double>& field) const {
    if (!has(key)) return;
    double value = 0;
    number(key, value);
    field = value;
  }

  void string(const char* key, std::string& field) const {
    if (!has(key)) return;
    TORCH_CHECK(json_[key].is_string(), where_, ": '", key, "' must be a string (got ", json_[key].dump(), ")");
    field = json_[key].get<std::string>();
  }

  void boolean(const char* key, bool& field) const {
    if (!has(key)) return;
    TORCH_CHECK(json_[key].is_boolean(), where_, ": '", key, "' must be true or false (got ", json_[key].dump(), ")");
    field = json_[key].get<bool>();
  }

  /// `id2label` (string keys holding integers) and `num_labels`, as transformers reads them:
  /// id2label, when present, sets the label count (transformers only warns about a different
  /// `num_labels` next to it, and keeps id2label).
  void labels(std::map<int64_t, std::string>& id2label, int64_t& num_labels) const {
    if (has("id2label")) {
      TORCH_CHECK(json_["id2label"].is_object(), where_, ": 'id2label' must be an object (got ",
                  json_["id2label"].dump(), ")");
      for (const auto& [key, value] : json_["id2label"].items()) {
        const auto id = lora::detail::parse_integer(key);
        TORCH_CHECK(id.has_value(), where_, ": id2label key '", key, "' is not an integer");
        TORCH_CHECK(value.is_string(), where_, ": id2label['", key, "'] must be a string");
        id2label[*id] = value.get<std::string>();
      }
      num_labels = static_cast<int64_t>(id2label.size());
      return;
    }
    integer("num_labels", num_labels);
  }

  /// A string field that must hold one value, e.g. `position_embedding_type` "absolute".
  void require_value(const char* key, const std::string& expected) const {
    if (!has(key)) return;
    TORCH_CHECK(json_[key].is_string() && json_[key].get<std::string>() == expected, where_, ": only ", key, " '",
                expected, "' is supported (got ", json_[key].dump(), ")");
  }

 private:
  const nlohmann::json& json_;
  std::string where_;
};

/// The parsed JSON object of a config file; `who` names the config type in messages.
inline nlohmann::json read_config_file(const std::string& path, const char* who) {
  std::ifstream in(path);
  TORCH_CHECK(in, who, ": cannot open '", path, "'");
  nlohmann::json json;
  try {
    in >> json;
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, who, ": invalid JSON in '", path, "': ", error.what());
  }
  return json;
}

/// Runs `config.validate()`, prefixing its message with the file.
template <typename Config>
void validate_in(const Config& config, const std::string& where) {
  try {
    config.validate();
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, where, ": ", error.what_without_backtrace());
  }
}

/// Writes `id2label` and `label2id` as transformers does (nothing when there are no names: the
/// caller writes `num_labels` then, at its place in the sorted keys).
inline void write_labels(nlohmann::ordered_json& json, const std::map<int64_t, std::string>& id2label) {
  if (id2label.empty()) return;
  nlohmann::ordered_json id2, label2;
  for (const auto& [id, label] : id2label) {
    id2[std::to_string(id)] = label;
    label2[label] = id;
  }
  json["id2label"] = id2;
  json["label2id"] = label2;
}

/// Checks that `id2label` names every label and nothing else.
inline void check_labels(const char* who, const std::map<int64_t, std::string>& id2label, int64_t num_labels) {
  TORCH_CHECK(num_labels > 0, who, ": num_labels must be > 0 (got ", num_labels, ")");
  TORCH_CHECK(id2label.empty() || static_cast<int64_t>(id2label.size()) == num_labels, who, ": id2label has ",
              id2label.size(), " labels but num_labels is ", num_labels);
  for (const auto& [id, label] : id2label) {
    TORCH_CHECK(id >= 0 && id < num_labels, who, ": id2label has id ", id, " ('", label, "') outside [0, ", num_labels,
                ")");
  }
}

/// Checks a dropout probability.
inline void check_probability(const char* who, const char* name, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, who, ": ", name, " must be in [0, 1) (got ", p, ")");
}

}  // namespace lora::models::detail
