#pragma once

/// \file
/// Adapter folders in Hugging Face PEFT's format: `adapter_config.json` and
/// `adapter_model.safetensors` (metadata {"format": "pt"}), keys `base_model.model.<path>.lora_A.weight`.

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/config.hpp>
#include <lora/inject.hpp>
#include <lora/io/safetensors.hpp>

namespace lora::io {

/// What `adapter_config.json` holds: the LoRA configuration plus PEFT's bookkeeping.
struct AdapterConfig {
  LoraConfig lora;
  /// PEFT's task type; "SEQ_CLS" makes PEFT (and `load_adapter`) save/train the `classifier`
  /// (or `score`) module in full even when `modules_to_save` does not list it.
  std::string task_type = "SEQ_CLS";
  std::string base_model_name_or_path;
  std::optional<std::string> revision;
  bool inference_mode = true;
  /// Written as `peft_version`, the PEFT release whose format the files follow.
  std::string peft_version = "0.10.0";

  /// The modules trained in full: `modules_to_save`, plus "classifier" and "score" for SEQ_CLS.
  std::vector<std::string> effective_modules_to_save() const {
    auto modules = lora.modules_to_save();
    if (task_type == "SEQ_CLS") {
      for (const std::string name : {"classifier", "score"}) {
        if (std::find(modules.begin(), modules.end(), name) == modules.end()) modules.push_back(name);
      }
    }
    return modules;
  }

  /// adapter_config.json with the keys PEFT 0.10 writes (and `peft_version`).
  nlohmann::ordered_json to_json() const {
    const auto& options = lora.adapter();
    const auto init = parse_init(options.init());
    nlohmann::ordered_json json;
    json["alpha_pattern"] = nlohmann::ordered_json::object();
    for (const auto& [key, alpha] : lora.alpha_pattern()) json["alpha_pattern"][key] = alpha;
    json["auto_mapping"] = nullptr;
    json["base_model_name_or_path"] = base_model_name_or_path;
    json["bias"] = to_string(lora.bias());
    json["fan_in_fan_out"] = false;
    json["inference_mode"] = inference_mode;
    if (init.kind == InitKind::kDefault) {
      json["init_lora_weights"] = true;
    } else if (init.kind == InitKind::kRandom) {
      json["init_lora_weights"] = false;
    } else {
      json["init_lora_weights"] = to_string(init);
    }
    json["layer_replication"] = nullptr;
    json["layers_pattern"] = lora.layers_pattern().empty() ? nlohmann::ordered_json(nullptr)
                                                           : nlohmann::ordered_json(lora.layers_pattern());
    json["layers_to_transform"] = lora.layers_to_transform().empty()
                                      ? nlohmann::ordered_json(nullptr)
                                      : nlohmann::ordered_json(lora.layers_to_transform());
    json["loftq_config"] = nlohmann::ordered_json::object();
    // PEFT writes an integral alpha as an integer (16, not 16.0).
    const double alpha = options.alpha();
    json["lora_alpha"] = alpha == static_cast<double>(static_cast<int64_t>(alpha)) ? nlohmann::ordered_json(static_cast<int64_t>(alpha))
                                                                                   : nlohmann::ordered_json(alpha);
    json["lora_dropout"] = options.dropout();
    json["megatron_config"] = nullptr;
    json["megatron_core"] = "megatron.core";
    if (!lora.exclude_modules().empty()) json["exclude_modules"] = lora.exclude_modules();  // PEFT >= 0.14
    json["modules_to_save"] = lora.modules_to_save().empty() ? nlohmann::ordered_json(nullptr)
                                                             : nlohmann::ordered_json(lora.modules_to_save());
    json["peft_type"] = "LORA";
    json["peft_version"] = peft_version;
    json["r"] = options.r();
    json["rank_pattern"] = nlohmann::ordered_json::object();
    for (const auto& [key, rank] : lora.rank_pattern()) json["rank_pattern"][key] = rank;
    json["revision"] = revision ? nlohmann::ordered_json(*revision) : nlohmann::ordered_json(nullptr);
    if (lora.target_regex().empty()) {
      json["target_modules"] = lora.target_modules().size() == 1 && lora.all_linear()
                                   ? nlohmann::ordered_json("all-linear")
                                   : nlohmann::ordered_json(lora.target_modules());
    } else {
      json["target_modules"] = lora.target_regex();
    }
    json["task_type"] = task_type;
    json["use_dora"] = options.use_dora();
    json["use_rslora"] = options.use_rslora();
    return json;
  }

  /// Reads adapter_config.json. `peft_type` must be "LORA"; unknown keys are reported through
  /// `warn` (PEFT versions add fields) and otherwise ignored. `where` names the file.
  static AdapterConfig from_json(const nlohmann::ordered_json& json, const std::string& where,
                                 std::ostream* warn = &std::cerr) {
    TORCH_CHECK(json.is_object(), where, ": expected a JSON object");
    TORCH_CHECK(json.contains("peft_type"), where, ": missing 'peft_type'");
    TORCH_CHECK(json["peft_type"].is_string() && json["peft_type"].get<std::string>() == "LORA", where,
                ": unsupported peft_type ", json["peft_type"].dump(), " (only \"LORA\" is supported)");
    static const std::set<std::string> known = {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
        "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type",
        "peft_version", "r", "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_rslora",
        "exclude_modules", "use_qalora", "qalora_group_size", "layer_replication", "runtime_config", "lora_bias",
        "target_parameters", "trainable_token_indices", "eva_config", "corda_config"};
    for (const auto& [key, value] : json.items()) {
      if (!known.count(key) && warn) *warn << "lora: " << where << ": ignoring unknown key '" << key << "'\n";
    }
    auto get = [&](const char* key) -> const nlohmann::ordered_json* {
      return json.contains(key) && !json[key].is_null() ? &json[key] : nullptr;
    };
    auto require = [&](bool ok, const char* key, const char* expected) {
      TORCH_CHECK(ok, where, ": '", key, "' must be ", expected, " (got ", json.contains(key) ? json[key].dump() : "nothing",
                  ")");
    };
    AdapterConfig config;
    LoRAOptions options;
    const auto* r = get("r");
    require(r && r->is_number_integer(), "r", "an integer");
    options.r(r->get<int64_t>());
    if (const auto* alpha = get("lora_alpha")) {
      require(alpha->is_number(), "lora_alpha", "a number");
      options.alpha(alpha->get<double>());
    }
    if (const auto* dropout = get("lora_dropout")) {
      require(dropout->is_number(), "lora_dropout", "a number");
      options.dropout(dropout->get<double>());
    }
    if (const auto* rslora = get("use_rslora")) {
      require(rslora->is_boolean(), "use_rslora", "true or false");
      options.use_rslora(rslora->get<bool>());
    }
    if (const auto* dora = get("use_dora")) {
      require(dora->is_boolean(), "use_dora", "true or false");
      options.use_dora(dora->get<bool>());
    }
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
    if (const auto* pattern = get("rank_pattern")) {
      require(pattern->is_object(), "rank_pattern", "an object of ranks");
      RankPattern ranks;
      for (const auto& [key, value] : pattern->items()) {
        require(value.is_number_integer(), "rank_pattern", "an object of integer ranks");
        ranks.emplace_back(key, value.get<int64_t>());
      }
      lora.rank_pattern(ranks);
    }
    if (const auto* pattern = get("alpha_pattern")) {
      require(pattern->is_object(), "alpha_pattern", "an object of numbers");
      AlphaPattern alphas;
      for (const auto& [key, value] : pattern->items()) {
        require(value.is_number(), "alpha_pattern", "an object of numbers");
        alphas.emplace_back(key, value.get<double>());
      }
      lora.alpha_pattern(alphas);
    }
    if (const auto* bias = get("bias")) {
      require(bias->is_string(), "bias", "\"none\", \"all\" or \"lora_only\"");
      lora.bias(parse_bias(bias->get<std::string>()));
    }
    config.lora = lora;
    if (const auto* task = get("task_type")) config.task_type = task->is_string() ? task->get<std::string>() : "";
    if (!get("task_type")) config.task_type = "";
    if (const auto* base = get("base_model_name_or_path"); base && base->is_string()) {
      config.base_model_name_or_path = base->get<std::string>();
    }
    if (const auto* revision = get("revision"); revision && revision->is_string()) config.revision = revision->get<std::string>();
    if (const auto* inference = get("inference_mode"); inference && inference->is_boolean()) {
      config.inference_mode = inference->get<bool>();
    }
    if (const auto* version = get("peft_version"); version && version->is_string()) {
      config.peft_version = version->get<std::string>();
    }
    try {
      config.lora.validate();
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, where, ": ", error.what_without_backtrace());
    }
    return config;
  }
};

namespace detail {

inline std::filesystem::path adapter_folder(const std::string& dir, const std::string& name) {
  // PEFT puts an adapter named other than "default" in a sub-folder of that name.
  return name == "default" ? std::filesystem::path(dir) : std::filesystem::path(dir) / name;
}

}  // namespace detail

namespace detail {

/// Writes the two files of an adapter folder, each atomically.
inline void write_adapter_folder(const std::filesystem::path& folder, const AdapterConfig& config,
                                 const torch::OrderedDict<std::string, at::Tensor>& tensors) {
  std::filesystem::create_directories(folder);
  save_safetensors((folder / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
  const auto text = config.to_json().dump(2) + "\n";
  lora::detail::write_file_atomically((folder / "adapter_config.json").string(),
                                      [&](std::ostream& out) { out << text; }, "lora");
}

}  // namespace detail

/// Writes adapter `name` of `model` as PEFT does: `dir/adapter_config.json` and
/// `dir/adapter_model.safetensors` (`dir/<name>/…` for a name other than "default"). `config`
/// is the configuration the adapter was attached with. Each file is written atomically.
inline void save_adapter(const torch::nn::Module& model, const AdapterConfig& config, const std::string& dir,
                         const std::string& name = "default") {
  detail::write_adapter_folder(detail::adapter_folder(dir, name), config, adapter_state_dict(model, name));
}

/// Reads `adapter_config.json` of an adapter folder.
inline AdapterConfig read_adapter_config(const std::string& dir, const std::string& name = "default",
                                         std::ostream* warn = &std::cerr) {
  const auto path = detail::adapter_folder(dir, name) / "adapter_config.json";
  std::ifstream in(path);
  TORCH_CHECK(in, "lora: cannot open '", path.string(), "'");
  nlohmann::ordered_json json;  // ordered: rank/alpha patterns match in file order
  try {
    in >> json;
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, "lora: invalid JSON in '", path.string(), "': ", error.what());
  }
  return AdapterConfig::from_json(json, path.string(), warn);
}

namespace detail {

/// Reads an adapter folder for loading into a model with these module names: the LoraConfig
/// to attach (SEQ_CLS's implied saved modules included when present in both the model and the
/// file, as PEFT's "score" is for other architectures; init "default" so that no
/// initialisation rewrites base weights) and the tensors, whose keys and `lora_A` ranks are
/// checked against the config.
inline std::pair<LoraConfig, torch::OrderedDict<std::string, at::Tensor>> read_for_loading(
    const std::string& dir, const std::string& name, const std::vector<std::string>& module_names,
    std::ostream* warn) {
  const auto config = read_adapter_config(dir, name, warn);
  const auto init = parse_init(config.lora.adapter().init()).kind;
  TORCH_CHECK(init != InitKind::kPiSSA && init != InitKind::kOLoRA, "lora: the adapter in '", dir,
              "' was initialised with '", config.lora.adapter().init(),
              "', which trains against a residual base weight (W minus its principal part); loading it onto the "
              "original model would be wrong. Load it onto the residual model, or convert it to a plain LoRA "
              "adapter first (PEFT: path_initial_model_for_weight_conversion)");
  const auto file = (adapter_folder(dir, name) / "adapter_model.safetensors").string();
  auto tensors = load_safetensors(file).tensors;
  const std::string prefix = "base_model.model.";

  std::vector<std::string> saved;
  const auto& listed = config.lora.modules_to_save();
  for (const auto& candidate : config.effective_modules_to_save()) {
    if (std::find(listed.begin(), listed.end(), candidate) != listed.end()) {
      saved.push_back(candidate);
      continue;
    }
    const bool present = std::any_of(module_names.begin(), module_names.end(), [&](const std::string& module) {
      if (!name_matches(module, candidate)) return false;
      const auto inside = prefix + module + ".";
      return std::any_of(tensors.begin(), tensors.end(),
                         [&](const auto& item) { return item.key().compare(0, inside.size(), inside) == 0; });
    });
    if (present) saved.push_back(candidate);
  }
  auto lora = config.lora;
  lora.modules_to_save(saved);
  lora.adapter(LoRAOptions(lora.adapter()).init("default"));

  const TargetMatcher matcher(lora);
  for (const auto& item : tensors) {
    const auto& key = item.key();
    TORCH_CHECK(key.compare(0, prefix.size(), prefix) == 0, "lora: adapter tensor '", key, "' in '", file,
                "' does not start with '", prefix, "'");
    const std::string suffix = ".lora_A.weight";
    if (key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0) {
      const auto path = key.substr(prefix.size(), key.size() - prefix.size() - suffix.size());
      const auto expected = matcher.options_for(path).r();
      TORCH_CHECK(item.value().dim() == 2 && item.value().size(0) == expected, "lora: '", key, "' in '", file,
                  "' has shape ", item.value().sizes(), ", rank ", item.value().dim() == 2 ? item.value().size(0) : -1,
                  ", but adapter_config.json gives module '", path, "' r=", expected);
    }
  }
  return {lora, tensors};
}

}  // namespace detail

/// Attaches adapter `name` from a PEFT adapter folder to `model` and loads its tensors.
///
/// Everything is checked before the model keeps any change: the config (peft_type, values),
/// every tensor key against the model's module paths, each `lora_A` rank against `r` /
/// `rank_pattern`, missing tensors, shapes. On any error the model is left as it was.
/// Returns what was attached where.
inline InjectionReport load_adapter(torch::nn::Module& model, const std::string& dir,
                                    const std::string& name = "default", std::ostream* warn = &std::cerr) {
  std::vector<std::string> module_names;
  for (const auto& item : model.named_modules("", false)) module_names.push_back(item.key());
  const auto [lora, tensors] = detail::read_for_loading(dir, name, module_names, warn);
  const std::string prefix = "base_model.model.";

  // Remember what inject changes beyond the new adapter, to undo it on failure.
  std::vector<std::pair<at::Tensor, bool>> flags;
  for (const auto& parameter : model.parameters()) flags.emplace_back(parameter, parameter.requires_grad());
  InjectionReport report = inject(model, lora, name);
  try {
    load_adapter_state_dict(model, tensors, name, prefix);
  } catch (...) {
    delete_adapter(model, name);
    for (auto& [parameter, requires_grad] : flags) parameter.requires_grad_(requires_grad);
    throw;
  }
  return report;
}

}  // namespace lora::io
