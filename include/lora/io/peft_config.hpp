#pragma once

/// \file
/// `adapter_config.json`, PEFT's LoraConfig as JSON: reading it into a `LoraConfig`, writing one
/// that every PEFT release from 0.10 on reads, and the table of keys PEFT added after 0.10.

#include <algorithm>
#include <array>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/config.hpp>

namespace lora::io {

/// A PEFT release, "0.10.0" (or "0.10"), compared numerically.
struct PeftVersion {
  int major = 0, minor = 0, patch = 0;

  /// Parses "MAJOR.MINOR" or "MAJOR.MINOR.PATCH" (digits only); throws naming the text.
  static PeftVersion parse(const std::string& text) {
    PeftVersion version;
    std::array<int*, 3> parts{&version.major, &version.minor, &version.patch};
    size_t part = 0, start = 0;
    bool ok = !text.empty();
    while (ok && part < parts.size()) {
      const auto dot = text.find('.', start);
      const auto digits = text.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      ok = !digits.empty() && digits.size() <= 4 && digits.find_first_not_of("0123456789") == std::string::npos;
      if (ok) *parts[part++] = std::stoi(digits);
      if (dot == std::string::npos) break;
      start = dot + 1;
      ok = ok && part < parts.size();
    }
    TORCH_CHECK(ok && part >= 2, "lora: PEFT version '", text, "' is not of the form 0.10 or 0.10.0");
    return version;
  }

  std::string to_string() const {
    return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
  }
  bool operator<(const PeftVersion& other) const {
    return std::tie(major, minor, patch) < std::tie(other.major, other.minor, other.patch);
  }
};

/// A key of adapter_config.json that PEFT added after 0.10: the release that introduced it, the
/// value it means nothing with (what `LoraConfig` of that release defaults to), and whether
/// this library implements it.
struct PeftConfigKey {
  const char* key;
  const char* since;
  const char* default_json;  ///< the default value as JSON text
  bool supported;
};

/// The keys PEFT 0.10.0 writes: a file with only these is read by every PEFT from 0.10 on.
inline const std::vector<std::string>& peft_0_10_keys() {
  static const std::vector<std::string> keys = {
      "alpha_pattern",   "auto_mapping",        "base_model_name_or_path", "bias",         "fan_in_fan_out",
      "inference_mode",  "init_lora_weights",   "layer_replication",       "layers_pattern", "layers_to_transform",
      "loftq_config",    "lora_alpha",          "lora_dropout",            "megatron_config", "megatron_core",
      "modules_to_save", "peft_type",           "r",                       "rank_pattern",  "revision",
      "target_modules",  "task_type",           "use_dora",                "use_rslora"};
  return keys;
}

/// The keys PEFT added after 0.10.0 (from PEFT's source and release history; docs/peft.md has
/// the table). PEFT 0.10–0.13 raise `TypeError` on a key they do not know; 0.14 and later drop
/// it with a warning, i.e. silently change the adapter's meaning if its value mattered.
inline const std::vector<PeftConfigKey>& peft_later_keys() {
  static const std::vector<PeftConfigKey> keys = {
      {"runtime_config", "0.12.0", "null", true},  // never written: PEFT drops it from the file itself
      {"exclude_modules", "0.14.0", "null", true},
      {"lora_bias", "0.14.0", "false", false},
      {"eva_config", "0.14.0", "null", false},
      {"corda_config", "0.15.0", "null", false},
      {"trainable_token_indices", "0.15.0", "null", false},
      {"use_qalora", "0.16.0", "false", false},
      {"qalora_group_size", "0.16.0", "16", true},  // meaningful only with use_qalora
      {"target_parameters", "0.17.0", "null", false},
      {"alora_invocation_tokens", "0.17.0", "null", false},
      {"arrow_config", "0.18.0", "null", false},
      {"ensure_weight_tying", "0.18.0", "false", false},
      {"peft_version", "0.18.0", "null", true},  // informational; never written
  };
  return keys;
}

/// A value of a PEFT 0.10 key that older releases refuse: `init_lora_weights` methods added
/// later ("pissa" and "pissa_niter_<k>" in 0.11.0, "olora" in 0.12.0).
struct PeftConfigValue {
  const char* key;
  const char* value;  ///< the value, or its prefix when it ends with '*'
  const char* since;
};

inline const std::vector<PeftConfigValue>& peft_later_values() {
  static const std::vector<PeftConfigValue> values = {
      {"init_lora_weights", "pissa", "0.11.0"},
      {"init_lora_weights", "pissa_niter_*", "0.11.0"},
      {"init_lora_weights", "olora", "0.12.0"},
  };
  return values;
}

/// How `adapter_config.json` is written.
struct ConfigFormat {
  /// The oldest PEFT release that must read the file with the same meaning, e.g. "0.10.0".
  /// Saving refuses a setting that release cannot express (`exclude_modules` needs 0.14).
  /// Default: unset, meaning the keys of PEFT 0.10 plus only the later keys whose values
  /// differ from their defaults, so that the file needs the newest release among those.
  std::optional<std::string> min_peft_version;
};

namespace detail {

/// The JSON value `config` gives a later key, or null when it holds the key's default (or the
/// key is never written).
inline nlohmann::ordered_json later_key_value(const LoraConfig& config, const std::string& key) {
  if (key == "exclude_modules" && !config.exclude_modules().empty()) return config.exclude_modules();
  return nullptr;
}

/// PEFT writes an integral alpha as an integer (16, not 16.0).
inline nlohmann::ordered_json number(double value) {
  const bool integral = value == static_cast<double>(static_cast<int64_t>(value));
  return integral ? nlohmann::ordered_json(static_cast<int64_t>(value)) : nlohmann::ordered_json(value);
}

inline nlohmann::ordered_json string_or_null(const std::string& text) {
  return text.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(text);
}

template <typename List>
nlohmann::ordered_json list_or_null(const List& list) {
  return list.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(list);
}

}  // namespace detail

/// `config` as adapter_config.json: PEFT 0.10's keys with PEFT's values (sorted, as PEFT's
/// `sort_keys=True` writes them), plus the later keys whose values are not their defaults.
/// Throws when `format.min_peft_version` names a release that lacks a key the config needs.
inline nlohmann::ordered_json adapter_config_json(const LoraConfig& config, const ConfigFormat& format = {}) {
  config.validate();
  const auto& options = config.adapter();
  const auto init = parse_init(options.init());
  std::vector<std::pair<std::string, nlohmann::ordered_json>> items;
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object();
  for (const auto& [key, rank] : config.rank_pattern()) rank_pattern[key] = rank;
  nlohmann::ordered_json alpha_pattern = nlohmann::ordered_json::object();
  for (const auto& [key, alpha] : config.alpha_pattern()) alpha_pattern[key] = alpha;
  items.emplace_back("alpha_pattern", alpha_pattern);
  items.emplace_back("auto_mapping", nullptr);
  items.emplace_back("base_model_name_or_path", detail::string_or_null(config.base_model_name_or_path()));
  items.emplace_back("bias", to_string(config.bias()));
  items.emplace_back("fan_in_fan_out", false);
  items.emplace_back("inference_mode", true);  // PEFT's save_pretrained writes true
  if (init.kind == InitKind::kDefault) {
    items.emplace_back("init_lora_weights", true);
  } else if (init.kind == InitKind::kRandom) {
    items.emplace_back("init_lora_weights", false);
  } else {
    items.emplace_back("init_lora_weights", to_string(init));
  }
  items.emplace_back("layer_replication", nullptr);
  items.emplace_back("layers_pattern", detail::list_or_null(config.layers_pattern()));
  items.emplace_back("layers_to_transform", detail::list_or_null(config.layers_to_transform()));
  items.emplace_back("loftq_config", nlohmann::ordered_json::object());
  items.emplace_back("lora_alpha", detail::number(options.alpha()));
  items.emplace_back("lora_dropout", options.dropout());
  items.emplace_back("megatron_config", nullptr);
  items.emplace_back("megatron_core", "megatron.core");
  items.emplace_back("modules_to_save", detail::list_or_null(config.modules_to_save()));
  items.emplace_back("peft_type", "LORA");
  items.emplace_back("r", options.r());
  items.emplace_back("rank_pattern", rank_pattern);
  items.emplace_back("revision", detail::string_or_null(config.revision()));
  if (!config.target_regex().empty()) {
    items.emplace_back("target_modules", config.target_regex());
  } else if (config.all_linear()) {
    items.emplace_back("target_modules", "all-linear");
  } else {
    items.emplace_back("target_modules", config.target_modules());
  }
  items.emplace_back("task_type", detail::string_or_null(config.task_type()));
  items.emplace_back("use_dora", options.use_dora());
  items.emplace_back("use_rslora", options.use_rslora());

  const auto target = format.min_peft_version ? std::optional<PeftVersion>(PeftVersion::parse(*format.min_peft_version))
                                              : std::nullopt;
  TORCH_CHECK(!target || !(*target < PeftVersion{0, 10, 0}), "lora: min_peft_version ", *format.min_peft_version,
              " is older than 0.10.0, the oldest PEFT format this library writes");
  for (const auto& key : peft_later_keys()) {
    auto value = detail::later_key_value(config, key.key);
    if (value.is_null()) continue;
    TORCH_CHECK(!target || !(*target < PeftVersion::parse(key.since)), "lora: the adapter needs '", key.key,
                "' = ", value.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace),
                ", which PEFT reads from ", key.since, " on, but min_peft_version is ",
                target->to_string(),
                " (PEFT before 0.14 refuses keys it does not know; 0.14 and later drop them silently). Raise "
                "min_peft_version or do without the setting");
    items.emplace_back(key.key, std::move(value));
  }
  if (target) {
    for (const auto& later : peft_later_values()) {
      const auto found = std::find_if(items.begin(), items.end(), [&](const auto& item) { return item.first == later.key; });
      if (found == items.end() || !found->second.is_string()) continue;
      const std::string value = found->second.get<std::string>();
      const std::string wanted = later.value;
      const bool matches = wanted.back() == '*' ? value.compare(0, wanted.size() - 1, wanted, 0, wanted.size() - 1) == 0
                                                : value == wanted;
      TORCH_CHECK(!matches || !(*target < PeftVersion::parse(later.since)), "lora: ", later.key, " \"", value,
                  "\" needs PEFT ", later.since, " or later, but min_peft_version is ", target->to_string());
    }
  }
  std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  nlohmann::ordered_json json = nlohmann::ordered_json::object();
  for (auto& [key, value] : items) json[key] = std::move(value);
  return json;
}

/// Reads adapter_config.json's content. `peft_type` must be "LORA" and `r` an integer; other
/// keys default as in PEFT. A key PEFT added later that this library does not implement is
/// refused when its value is not the default (loading would change the adapter's meaning);
/// keys nobody knows are reported through `warn` and ignored, as PEFT ≥ 0.14 does. `where`
/// names the file in messages.
inline LoraConfig lora_config_from_json(const nlohmann::ordered_json& json, const std::string& where,
                                        std::ostream* warn = &std::cerr) {
  TORCH_CHECK(json.is_object(), where, ": expected a JSON object");
  TORCH_CHECK(json.contains("peft_type"), where, ": missing 'peft_type'");
  TORCH_CHECK(json["peft_type"].is_string() && json["peft_type"].get<std::string>() == "LORA", where,
              ": unsupported peft_type ", json["peft_type"].dump(), " (only \"LORA\" is supported)");
  const auto& base_keys = peft_0_10_keys();
  for (const auto& entry : json.items()) {
    const std::string& key = entry.key();  // not a structured binding: C++17 lambdas cannot capture those
    const auto& value = entry.value();
    if (std::find(base_keys.begin(), base_keys.end(), key) != base_keys.end()) continue;
    const auto& later = peft_later_keys();
    const auto found = std::find_if(later.begin(), later.end(), [&](const PeftConfigKey& item) { return key == item.key; });
    if (found == later.end()) {
      if (warn) *warn << "lora: " << where << ": ignoring unknown key '" << key << "'\n";
      continue;
    }
    const auto default_value = nlohmann::ordered_json::parse(found->default_json);
    const bool is_default = value == default_value || value.is_null() ||
                            (value.is_boolean() && !value.get<bool>() && default_value.is_boolean()) ||
                            ((value.is_array() || value.is_object()) && value.empty());
    TORCH_CHECK(found->supported || is_default, where, ": '", key, "' = ", value.dump(), " (PEFT ", found->since,
                ") is not supported by this library; loading would ignore it and change the adapter's meaning");
  }
  auto get = [&](const char* key) -> const nlohmann::ordered_json* {
    return json.contains(key) && !json[key].is_null() ? &json[key] : nullptr;
  };
  auto require = [&](bool ok, const char* key, const char* expected) {
    TORCH_CHECK(ok, where, ": '", key, "' must be ", expected, " (got ", json.contains(key) ? json[key].dump() : "nothing",
                ")");
  };
  auto unsupported_unless_empty = [&](const char* key) {
    const auto* value = get(key);
    TORCH_CHECK(value == nullptr || ((value->is_object() || value->is_array()) && value->empty()), where, ": '", key,
                "' = ", value ? value->dump() : "", " is not supported by this library");
  };
  unsupported_unless_empty("layer_replication");
  unsupported_unless_empty("megatron_config");
  unsupported_unless_empty("loftq_config");
  LoRAOptions options;
  const auto* r = get("r");
  require(r && r->is_number_integer(), "r", "an integer");
  options.r(r->get<int64_t>());
  // An optional field: checked with `valid`, then handed to `set` as the type of `type`.
  using Json = nlohmann::ordered_json;
  auto field = [&](const char* key, auto type, bool (Json::*valid)() const noexcept, const char* expected, auto set) {
    if (const auto* value = get(key)) {
      require(((*value).*valid)(), key, expected);
      set(value->template get<decltype(type)>());
    }
  };
  field("lora_alpha", double{}, &Json::is_number, "a number", [&](double value) { options.alpha(value); });
  field("lora_dropout", double{}, &Json::is_number, "a number", [&](double value) { options.dropout(value); });
  field("use_rslora", bool{}, &Json::is_boolean, "true or false", [&](bool value) { options.use_rslora(value); });
  field("use_dora", bool{}, &Json::is_boolean, "true or false", [&](bool value) { options.use_dora(value); });
  if (const auto* init = get("init_lora_weights")) {
    require(init->is_boolean() || init->is_string(), "init_lora_weights", "true, false or a method name");
    options.init(init->is_boolean() ? (init->get<bool>() ? "default" : "false") : init->get<std::string>());
  }
  if (const auto* fan = get("fan_in_fan_out")) {
    require(fan->is_boolean() && !fan->get<bool>(), "fan_in_fan_out", "false (Linear layers store [out, in])");
  }
  LoraConfig lora(options);
  if (const auto* targets = get("target_modules")) {
    if (targets->is_string()) {
      const auto text = targets->get<std::string>();
      text == "all-linear" ? void(lora.target_modules({"all-linear"})) : void(lora.target_regex(text));
    } else {
      require(targets->is_array() && std::all_of(targets->begin(), targets->end(),
                                                  [](const nlohmann::ordered_json& item) { return item.is_string(); }),
              "target_modules", "a list of names or a regular expression");
      auto names = targets->get<std::vector<std::string>>();
      std::sort(names.begin(), names.end());  // PEFT writes a set: its order means nothing
      lora.target_modules(names);
    }
  }
  auto string_list = [&](const char* key) {
    std::vector<std::string> out;
    if (const auto* value = get(key)) {
      if (value->is_string()) return std::vector<std::string>{value->get<std::string>()};
      require(value->is_array() && std::all_of(value->begin(), value->end(),
                                                [](const nlohmann::ordered_json& item) { return item.is_string(); }),
              key, "a list of names");
      out = value->get<std::vector<std::string>>();
    }
    return out;
  };
  lora.modules_to_save(string_list("modules_to_save"));
  if (const auto* exclude = get("exclude_modules"); exclude && exclude->is_string()) {
    // PEFT matches a string with re.fullmatch; this library takes lists of names only.
    TORCH_CHECK(false, where, ": 'exclude_modules' as a regular expression (", exclude->dump(),
                ") is not supported; give a list of module names");
  }
  lora.exclude_modules(string_list("exclude_modules"));
  lora.layers_pattern(string_list("layers_pattern"));
  if (const auto* layers = get("layers_to_transform")) {
    if (layers->is_number_integer()) {
      lora.layers_to_transform({layers->get<int64_t>()});
    } else {
      require(layers->is_array() && std::all_of(layers->begin(), layers->end(),
                                                 [](const nlohmann::ordered_json& item) { return item.is_number_integer(); }),
              "layers_to_transform", "an integer or a list of integers");
      lora.layers_to_transform(layers->get<std::vector<int64_t>>());
    }
  }
  // {key regex: value} in file order (first match wins), each value checked by `valid`.
  auto pattern = [&](const char* key, auto value_type, bool (nlohmann::ordered_json::*valid)() const noexcept,
                     const char* expected) {
    std::vector<std::pair<std::string, decltype(value_type)>> items;
    if (const auto* object = get(key)) {
      require(object->is_object(), key, expected);
      for (const auto& [name, value] : object->items()) {
        require((value.*valid)(), key, expected);
        items.emplace_back(name, value.template get<decltype(value_type)>());
      }
    }
    return items;
  };
  lora.rank_pattern(pattern("rank_pattern", int64_t{}, &nlohmann::ordered_json::is_number_integer,
                            "an object of integer ranks"));
  lora.alpha_pattern(pattern("alpha_pattern", double{}, &nlohmann::ordered_json::is_number, "an object of numbers"));
  if (const auto* bias = get("bias")) {
    require(bias->is_string(), "bias", "\"none\", \"all\" or \"lora_only\"");
    try {
      lora.bias(parse_bias(bias->get<std::string>()));
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, where, ": ", error.what_without_backtrace());
    }
  }
  for (const auto* key : {"task_type", "base_model_name_or_path", "revision"}) {
    if (const auto* value = get(key)) require(value->is_string(), key, "a string or null");
  }
  if (const auto* task = get("task_type")) lora.task_type(task->get<std::string>());
  if (const auto* base = get("base_model_name_or_path")) lora.base_model_name_or_path(base->get<std::string>());
  if (const auto* revision = get("revision")) lora.revision(revision->get<std::string>());
  try {
    lora.validate();
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, where, ": ", error.what_without_backtrace());
  }
  return lora;
}

/// Reads and parses a JSON file; errors (missing file, invalid JSON) name the file.
inline nlohmann::ordered_json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "lora: cannot open '", path, "'");
  try {
    return nlohmann::ordered_json::parse(in);  // ordered: rank/alpha patterns match in file order
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, "lora: invalid JSON in '", path, "': ", error.what());
  }
  return {};  // unreachable
}

}  // namespace lora::io
