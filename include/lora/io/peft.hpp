#pragma once

/// \file
/// Adapter folders in Hugging Face PEFT's format: `adapter_config.json` and
/// `adapter_model.safetensors` (metadata {"format": "pt"}), keys `base_model.model.<path>.lora_A.weight`.

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <lora/config.hpp>
#include <lora/detail/atomic_file.hpp>
#include <lora/detail/undo.hpp>
#include <lora/inject.hpp>
#include <lora/io/peft_config.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/state_dict.hpp>

namespace lora::io {

/// How `save_adapter` writes an adapter folder.
struct SaveOptions {
  /// adapter_config.json's format (see `ConfigFormat::min_peft_version`).
  ConfigFormat format;
  /// PEFT's `path_initial_model_for_weight_conversion`: the folder of this adapter as saved
  /// right after a PiSSA / OLoRA initialisation. Given, the adapter is written as a plain LoRA
  /// adapter for the *original* base model (whose weights PiSSA replaced by a residual):
  /// A' = [A; A₀], B' = [B, −B₀], so that s·B'A' = s·BA − s·B₀A₀, with r and lora_alpha doubled
  /// (alpha ×√2 with rsLoRA; rank_pattern and alpha_pattern doubled) to keep the scale, and
  /// init_lora_weights true. Empty: the adapter is written as it is.
  std::string initial_adapter;
};

/// How `load_adapter` attaches an adapter.
struct LoadOptions {
  /// Train the loaded adapter (PEFT's `is_trainable=True`). Default false, as PEFT's
  /// `from_pretrained`: the adapter, its saved modules and biases are frozen and the model is
  /// put in evaluation mode.
  bool is_trainable = false;
  /// Where notices go (unknown config keys, saved modules the file does not hold); nullptr:
  /// silent.
  std::ostream* warn = &std::cerr;
  /// The name the adapter was saved under, which says where in `dir` it is (PEFT keeps an
  /// adapter other than "default" in `dir/<name>`). Unset: the name it is loaded as. Give
  /// "default" to load `dir` itself under any name.
  std::optional<std::string> saved_as = std::nullopt;
};

/// What `load_adapter` attached, with the configuration it read (which the model now
/// remembers, so `save_adapter` writes it back without a second read).
struct LoadedAdapter {
  LoraConfig config;
  InjectionReport report;
  /// Saved modules the task type implies ("classifier" for SEQ_CLS) that the file did not
  /// hold: they keep the model's values, as in PEFT.
  std::vector<std::string> kept_modules;
};

namespace detail {

inline const std::string& peft_prefix() {
  static const std::string prefix = "base_model.model.";
  return prefix;
}

inline std::filesystem::path adapter_folder(const std::string& dir, const std::string& name) {
  TORCH_CHECK(!name.empty() && name.find_first_of("/\\") == std::string::npos && name != "." && name != "..",
              "lora: adapter name '", name, "' cannot name a folder (it must be a plain name, without '/')");
  TORCH_CHECK(!dir.empty(), "lora: no folder given for adapter '", name, "'");
  // PEFT puts an adapter named other than "default" in a sub-folder of that name.
  return name == "default" ? std::filesystem::path(dir) : std::filesystem::path(dir) / name;
}

/// Checks that `config` describes adapter `name` as the model holds it: the modules it selects
/// among `modules` are exactly the layers with the adapter, each with the rank, alpha, rsLoRA
/// and DoRA the config gives it, and the saved modules are exactly those it saves. `layers`
/// are the adapter layers by path. Throws naming the first difference.
inline void check_config_describes(const LoraConfig& config, const std::string& name,
                                   const std::vector<ModuleEntry>& modules,
                                   const std::vector<std::pair<std::string, std::shared_ptr<AdapterLayer>>>& layers,
                                   const char* who) {
  TORCH_CHECK(!config.target_modules().empty() || !config.target_regex().empty(), who, ": adapter '", name,
              "' has no low-rank part (saved modules only, as lora::add_modules_to_save makes); PEFT's format cannot "
              "hold it: call lora::merge_and_unload and save the model instead");
  // The biases the file holds follow the config the adapter was attached with.
  for (const auto& [path, layer] : layers) {
    if (!layer->has_adapter(name) || layer->adapter_config(name) == nullptr) continue;
    const auto attached = layer->adapter_config(name)->bias();
    TORCH_CHECK(attached == config.bias(), who, ": adapter '", name, "' was attached with bias '", to_string(attached),
                "' but the config gives '", to_string(config.bias()), "'; the file's biases would not match it");
    break;
  }
  const TargetMatcher matcher(config);
  std::vector<Selection> selected;
  try {
    selected = select_modules(matcher, modules, who, "linear modules");
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, who, ": the config does not describe adapter '", name, "': ", error.what_without_backtrace());
  }
  std::map<std::string, const Selection*> by_name;
  for (const auto& selection : selected) by_name[selection.name] = &selection;
  std::set<std::string> holders;
  for (const auto& item : layers) {
    const auto& path = item.first;  // C++17 lambdas cannot capture structured bindings
    const auto& layer = item.second;
    if (!layer->has_adapter(name)) continue;
    holders.insert(path);
    const auto found = by_name.find(path);
    auto lora = std::dynamic_pointer_cast<LoRALayer>(layer);
    TORCH_CHECK(found != by_name.end(), who, ": module '", path, "' holds adapter '", name, "' (",
                lora ? "LoRA" : "saved in full", ") but the config does not select it");
    TORCH_CHECK(found->second->saved == (lora == nullptr), who, ": module '", path, "' holds adapter '", name,
                lora ? "' as LoRA but the config saves it in full" : "' saved in full but the config adapts it");
    if (!lora) continue;
    const auto& have = lora->adapter_options(name);
    const auto& want = found->second->options;
    auto differ = [&](const char* what, const auto& a, const auto& b) {
      TORCH_CHECK(a == b, who, ": module '", path, "': adapter '", name, "' has ", what, "=", a,
                  " but the config gives ", what, "=", b, "; the saved file would load with another scale");
    };
    differ("r", have.r(), want.r());
    differ("lora_alpha", have.alpha(), want.alpha());
    differ("use_rslora", have.use_rslora(), want.use_rslora());
    differ("use_dora", have.use_dora(), want.use_dora());
    // PiSSA/OLoRA replaced the base weight by a residual: a file that says otherwise would load
    // onto the original weights.
    TORCH_CHECK(lora::detail::rewrites_base_weight(have) == lora::detail::rewrites_base_weight(want), who,
                ": module '", path, "': adapter '", name, "' was initialised with '", have.init(),
                "' but the config says init_lora_weights '", want.init(), "'");
  }
  for (const auto& selection : selected) {
    TORCH_CHECK(holders.count(selection.name), who, ": the config ", selection.saved ? "saves" : "adapts", " module '",
                selection.name, "' but it does not hold adapter '", name, "'");
  }
}

/// Writes an adapter folder as one unit (both files or neither; see `replace_folder_atomically`).
inline void write_adapter_folder(const std::filesystem::path& folder, const LoraConfig& config,
                                 const torch::OrderedDict<std::string, at::Tensor>& tensors, const SaveOptions& options) {
  const auto json = adapter_config_json(config, options.format);
  lora::detail::replace_folder_atomically(
      folder.string(),
      [&](const std::filesystem::path& temporary) {
        save_safetensors((temporary / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
        std::string text;
        try {
          text = json.dump(2) + "\n";
        } catch (const nlohmann::json::exception& error) {
          TORCH_CHECK(false, "lora: cannot write adapter_config.json for '", folder.string(), "': ", error.what());
        }
        lora::detail::write_file_atomically((temporary / "adapter_config.json").string(),
                                            [&](std::ostream& out) { out << text; }, "lora");
      },
      "lora::io::save_adapter");
}

/// The configuration saved for adapter `name`: `given`, or else the one the model remembers.
inline LoraConfig config_to_save(const torch::nn::Module& model, const std::string& name, const LoraConfig* given) {
  if (given) return *given;
  const auto remembered = lora::detail::model_adapter_config(model, name);
  TORCH_CHECK(remembered != nullptr, "lora::io::save_adapter: adapter '", name,
              "' was not attached by lora::inject or load_adapter, so the model does not know its config; pass the "
              "LoraConfig it was made with");
  return *remembered;
}

}  // namespace detail

/// Reads `adapter_config.json` of an adapter folder (`dir/<name>/` for a name other than
/// "default").
inline LoraConfig read_adapter_config(const std::string& dir, const std::string& name = "default",
                                      std::ostream* warn = &std::cerr) {
  const auto path = (detail::adapter_folder(dir, name) / "adapter_config.json").string();
  return lora_config_from_json(read_json_file(path), path, warn);
}

/// Writes adapter `name` of `model` as PEFT does: `dir/adapter_config.json` and
/// `dir/adapter_model.safetensors` (`dir/<name>/…` for a name other than "default"), with the
/// configuration the adapter was attached with. The folder is replaced as a unit: a failure
/// or a crash leaves the previous adapter intact, never a mismatched pair.
inline void save_adapter(const torch::nn::Module& model, const std::string& dir, const std::string& name = "default",
                         const SaveOptions& options = {});

/// The same with an explicit configuration (e.g. another `base_model_name_or_path`). It must
/// describe the adapter as the model holds it: the same modules, ranks, alphas, rsLoRA and
/// DoRA, or saving refuses naming the difference (a wrong config would load with the wrong
/// scale).
inline void save_adapter(const torch::nn::Module& model, const LoraConfig& config, const std::string& dir,
                         const std::string& name = "default", const SaveOptions& options = {});

namespace detail {

/// PEFT's `subtract_mutated_init`: the trained adapter `tensors` (config `config`) rewritten
/// against its state at initialisation, read from the adapter folder `initial`, as a plain LoRA
/// adapter of twice the rank for the original base weights. Other tensors (DoRA magnitudes,
/// saved modules, biases) are kept: ‖W + s·B'A'‖ = ‖W_residual + s·BA‖, so a magnitude stays
/// valid (PEFT drops them).
inline std::pair<LoraConfig, torch::OrderedDict<std::string, at::Tensor>> as_plain_lora(
    const LoraConfig& config, const torch::OrderedDict<std::string, at::Tensor>& tensors, const std::string& initial) {
  const char* who = "lora::io::save_adapter (initial_adapter)";
  TORCH_CHECK(!config.adapter().use_rslora() || (config.rank_pattern().empty() && config.alpha_pattern().empty()), who,
              ": rsLoRA with rank_pattern or alpha_pattern cannot be converted (PEFT refuses it too: doubling a "
              "pattern's rank would change its scale)");
  const auto initial_config_path = (std::filesystem::path(initial) / "adapter_config.json").string();
  const auto initial_file = (std::filesystem::path(initial) / "adapter_model.safetensors").string();
  TORCH_CHECK(std::filesystem::exists(initial_file), who, ": no initial adapter at '", initial_file,
              "' (save the adapter right after its PiSSA/OLoRA initialisation, before training)");
  const auto initial_config = lora_config_from_json(read_json_file(initial_config_path), initial_config_path, nullptr);
  TORCH_CHECK(initial_config.adapter().r() == config.adapter().r(), who, ": the initial adapter in '", initial,
              "' has r=", initial_config.adapter().r(), " but the trained one r=", config.adapter().r());
  const auto start = load_safetensors(initial_file, SafetensorsReadOptions{std::nullopt, FileAccess::kCopy}).tensors;
  torch::OrderedDict<std::string, at::Tensor> result("adapter tensor");
  size_t factors = 0;
  for (const auto& item : tensors) {
    const auto& key = item.key();
    const bool is_A = lora::detail::ends_with(key, ".lora_A.weight");
    const bool is_B = lora::detail::ends_with(key, ".lora_B.weight");
    if (!is_A && !is_B) {
      result.insert(key, item.value());
      continue;
    }
    const auto* before = start.find(key);
    TORCH_CHECK(before != nullptr, who, ": the initial adapter in '", initial, "' has no '", key, "'");
    TORCH_CHECK(before->sizes() == item.value().sizes(), who, ": '", key, "' has shape ", item.value().sizes(),
                " but ", before->sizes(), " in the initial adapter in '", initial, "'");
    const auto init = before->to(item.value().device(), item.value().scalar_type());
    result.insert(key, is_A ? at::cat({item.value(), init}, 0) : at::cat({item.value(), -init}, 1));
    ++factors;
  }
  for (const auto& item : start) {
    const bool factor = lora::detail::ends_with(item.key(), ".lora_A.weight") || lora::detail::ends_with(item.key(), ".lora_B.weight");
    TORCH_CHECK(!factor || tensors.contains(item.key()), who, ": the initial adapter in '", initial, "' has '",
                item.key(), "', which the trained adapter lacks: it belongs to another adapter");
  }
  TORCH_CHECK(factors > 0, who, ": the adapter has no lora_A/lora_B factors to convert");

  auto converted = config;
  auto options = converted.adapter();
  options.r(2 * options.r());
  options.alpha(options.use_rslora() ? options.alpha() * std::sqrt(2.0) : 2 * options.alpha());
  options.init("default");
  converted.adapter(options);
  RankPattern ranks;
  for (const auto& [key, rank] : config.rank_pattern()) ranks.emplace_back(key, 2 * rank);
  AlphaPattern alphas;
  for (const auto& [key, alpha] : config.alpha_pattern()) alphas.emplace_back(key, 2 * alpha);
  converted.rank_pattern(ranks);
  converted.alpha_pattern(alphas);
  return {converted, std::move(result)};
}

inline void save_adapter_impl(const torch::nn::Module& model, const LoraConfig* given, const std::string& dir,
                              const std::string& name, const SaveOptions& options) {
  lora::detail::check_model_adapter(model, name, "save");
  const auto config = config_to_save(model, name, given);
  std::vector<ModuleEntry> modules;
  for (const auto& item : lora::detail::selectable_modules(model)) modules.push_back(item.first);
  check_config_describes(config, name, modules, adapter_layers(model), "lora::io::save_adapter");
  if (options.initial_adapter.empty()) {
    write_adapter_folder(adapter_folder(dir, name), config, adapter_state_dict(model, name), options);
    return;
  }
  auto converted = as_plain_lora(config, adapter_state_dict(model, name), options.initial_adapter);
  write_adapter_folder(adapter_folder(dir, name), converted.first, converted.second, options);
}

}  // namespace detail

inline void save_adapter(const torch::nn::Module& model, const std::string& dir, const std::string& name,
                         const SaveOptions& options) {
  detail::save_adapter_impl(model, nullptr, dir, name, options);
}

inline void save_adapter(const torch::nn::Module& model, const LoraConfig& config, const std::string& dir,
                         const std::string& name, const SaveOptions& options) {
  detail::save_adapter_impl(model, &config, dir, name, options);
}

namespace detail {

/// An adapter folder read for loading: its config and tensors, with the checks that need no
/// model (key prefix, PiSSA/OLoRA refusal, each `lora_A` rank against `r` / `rank_pattern`).
struct AdapterFiles {
  LoraConfig config;
  torch::OrderedDict<std::string, at::Tensor> tensors;
  std::string tensor_file;
};

inline AdapterFiles read_adapter_files(const std::string& dir, const std::string& name, std::ostream* warn) {
  auto config = read_adapter_config(dir, name, warn);
  const auto init = parse_init(config.adapter().init()).kind;
  TORCH_CHECK(init != InitKind::kPiSSA && init != InitKind::kOLoRA, "lora: the adapter in '", dir,
              "' was initialised with '", config.adapter().init(),
              "', which trains against a residual base weight (W minus its principal part); loading it onto the "
              "original model would be wrong. Load it onto the residual model, or save it as a plain LoRA adapter "
              "against its initial state (lora::io::SaveOptions::initial_adapter; PEFT: "
              "path_initial_model_for_weight_conversion)");
  const auto file = (adapter_folder(dir, name) / "adapter_model.safetensors").string();
  // Read, not mapped: adapters are small, and then nothing depends on the file once it is read.
  auto tensors = load_safetensors(file, SafetensorsReadOptions{std::nullopt, FileAccess::kCopy}).tensors;
  const auto& prefix = peft_prefix();
  const TargetMatcher matcher(config);
  for (const auto& item : tensors) {
    const auto& key = item.key();
    TORCH_CHECK(lora::detail::starts_with(key, prefix), "lora: adapter tensor '", key, "' in '", file,
                "' does not start with '", prefix, "'");
    // The rank is the first size of every A factor: [r, in] (Linear), [r, in, k...] (conv),
    // [r, num_embeddings] (Embedding's bare lora_embedding_A).
    for (const std::string suffix : {".lora_A.weight", ".lora_embedding_A"}) {
      if (key.size() <= prefix.size() + suffix.size() || !lora::detail::ends_with(key, suffix)) continue;
      const auto path = key.substr(prefix.size(), key.size() - prefix.size() - suffix.size());
      const auto expected = matcher.options_for(path).r();
      const auto& value = item.value();
      TORCH_CHECK(value.dim() >= 2 && value.size(0) == expected, "lora: '", key, "' in '", file, "' has shape ",
                  value.sizes(), ", rank ", value.dim() >= 2 ? value.size(0) : -1,
                  ", but adapter_config.json gives module '", path, "' r=", expected);
    }
  }
  return {std::move(config), std::move(tensors), file};
}

/// Loaded adapters never re-run a data-dependent initialisation: their tensors are loaded.
inline void plain_init(AdapterPlan& plan) {
  for (auto& selection : plan.modules) selection.options.init("default");
}

/// The saved modules the plan wraps that the file holds no tensor for.
inline std::vector<std::string> modules_without_tensors(const AdapterPlan& plan,
                                                        const torch::OrderedDict<std::string, at::Tensor>& tensors) {
  std::vector<std::string> kept;
  for (const auto& selection : plan.modules) {
    if (!selection.saved) continue;
    const auto inside = peft_prefix() + selection.name + ".";
    const bool present = std::any_of(tensors.begin(), tensors.end(), [&](const auto& item) {
      return lora::detail::starts_with(item.key(), inside);
    });
    if (!present) kept.push_back(selection.name);
  }
  return kept;
}

}  // namespace detail

/// Attaches adapter `name` from a PEFT adapter folder to `model` and loads its tensors: for
/// inference (frozen, model in eval mode) unless `options.is_trainable`, as PEFT's
/// `from_pretrained`. Returns the configuration read and what was attached where.
///
/// Everything is checked, and a failure at any point leaves the model exactly as it was (no
/// adapter, same trainable flags, same output): the config (peft_type, values, settings this
/// library lacks), every tensor key against the model's module paths, each `lora_A` rank
/// against `r` / `rank_pattern`, missing tensors, shapes.
///
///     auto loaded = lora::io::load_adapter(*model, "sst2-adapter");
///     std::cout << loaded.report.to_string();
inline LoadedAdapter load_adapter(torch::nn::Module& model, const std::string& dir, const std::string& name = "default",
                                  const LoadOptions& options = {});

namespace detail {

/// `load_adapter` of files already read: attaches them to `model` as adapter `name` (which may
/// differ from the name the folder was read under), all or nothing. `as_a_load` false (a
/// hot-swap): the rest of the model keeps its training flags and mode.
inline LoadedAdapter attach_adapter(torch::nn::Module& model, AdapterFiles files, const std::string& dir,
                                    const std::string& name, const LoadOptions& options, bool as_a_load = true) {
  auto plan = plan_injection(model, files.config, name);
  plain_init(plan);
  const auto kept = modules_without_tensors(plan, files.tensors);
  lora::detail::UndoLog undo;
  auto report = lora::detail::apply_plan(model, plan, /*freeze_the_rest=*/as_a_load, undo);
  load_adapter_state_dict(model, files.tensors, name, peft_prefix());
  if (!options.is_trainable) {
    lora::set_adapter_trainable(model, name, false);
    if (as_a_load) model.eval();
  }
  undo.commit();
  if (options.warn && !kept.empty()) {
    *options.warn << "lora: " << dir << ": no tensors for " << lora::detail::join(kept) << " (implied by task_type "
                  << files.config.task_type() << "); they keep the model's values\n";
  }
  return {std::move(files.config), std::move(report), kept};
}

}  // namespace detail

inline LoadedAdapter load_adapter(torch::nn::Module& model, const std::string& dir, const std::string& name,
                                  const LoadOptions& options) {
  return detail::attach_adapter(model, detail::read_adapter_files(dir, options.saved_as.value_or(name), options.warn), dir,
                                name, options);
}

}  // namespace lora::io
