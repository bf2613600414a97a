#pragma once

/// \file
/// `LoraConfig`: what to adapt in a model and how, PEFT's `LoraConfig`; `BiasMode`.

#include <algorithm>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/arg.h>

#include <lora/options.hpp>

namespace lora {

/// Which biases train besides the adapters (PEFT's `bias`).
enum class BiasMode {
  kNone,      ///< "none": no bias trains.
  kAll,       ///< "all": every bias in the model trains (saved with the adapter).
  kLoraOnly,  ///< "lora_only": the biases of layers that carry a LoRA adapter train (saved with it).
};

/// Parses "none", "all" or "lora_only".
inline BiasMode parse_bias(const std::string& bias) {
  if (bias == "none") return BiasMode::kNone;
  if (bias == "all") return BiasMode::kAll;
  if (bias == "lora_only") return BiasMode::kLoraOnly;
  TORCH_CHECK(false, "lora: unknown bias mode '", bias, "' (expected one of: none, all, lora_only)");
  return BiasMode::kNone;  // unreachable
}

inline std::string to_string(BiasMode bias) {
  switch (bias) {
    case BiasMode::kNone: return "none";
    case BiasMode::kAll: return "all";
    case BiasMode::kLoraOnly: return "lora_only";
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled BiasMode");
  return {};  // unreachable
}

/// Ordered (key regex, value) overrides; the first matching key wins, as in PEFT.
using RankPattern = std::vector<std::pair<std::string, int64_t>>;
using AlphaPattern = std::vector<std::pair<std::string, double>>;

/// The configuration of one adapter over a whole model: the per-layer options, which modules
/// get adapters, and PEFT's bookkeeping fields that `adapter_config.json` carries.
///
/// `inject` remembers the config an adapter was attached with, so that saving it needs no
/// second copy (see `lora::io::save_adapter`).
///
///     auto config = lora::LoraConfig(lora::LoRAOptions(8).alpha(16))
///                       .target_modules({"query", "value"})
///                       .task_type("SEQ_CLS");   // the classifier trains in full, as in PEFT
///     lora::inject(*model, config);
struct LoraConfig {
  /* implicit */ LoraConfig(LoRAOptions adapter = {}) : adapter_(std::move(adapter)) {}

  /// r, alpha, dropout, rsLoRA, DoRA, init and dtype of every adapted layer (before patterns).
  TORCH_ARG(LoRAOptions, adapter);
  /// Module names to adapt: a name matches a module whose qualified name equals it or ends
  /// with "." + it (`query` matches `bert.encoder.layer.3.attention.self.query`).
  /// {"all-linear"} selects every Linear layer except the output head. Default: none.
  TORCH_ARG(std::vector<std::string>, target_modules);
  /// Alternatively a regular expression that must match the whole qualified name
  /// (PEFT's `target_modules` given as a string). Default: empty (unused).
  TORCH_ARG(std::string, target_regex);
  /// Modules never adapted, by the same name rule as `target_modules`; each entry must match a
  /// module of the model. Default: none.
  TORCH_ARG(std::vector<std::string>, exclude_modules);
  /// Only adapt layers whose index (the number after `layers_pattern`, or after any
  /// `<name>.<number>.` in the path) is listed; each index must exist. Default: all layers.
  TORCH_ARG(std::vector<int64_t>, layers_to_transform);
  /// Names of the module lists holding the layers, e.g. {"layer"} for BERT. Default: any.
  TORCH_ARG(std::vector<std::string>, layers_pattern);
  /// Per-module rank overrides: key regex → r, matched against the end of the qualified name
  /// (`(.*\.)?key`), first match wins; each key must match an adapted module. Default: none.
  TORCH_ARG(RankPattern, rank_pattern);
  /// Per-module alpha overrides, matched like `rank_pattern`. Default: none.
  TORCH_ARG(AlphaPattern, alpha_pattern);
  /// Modules trained in full next to the adapters (e.g. {"classifier"}), by the name rule of
  /// `target_modules`; their original weights are kept. Each entry must match a module.
  /// Default: none.
  TORCH_ARG(std::vector<std::string>, modules_to_save);
  /// Which biases train (and are saved) besides the adapters. Default: none.
  TORCH_ARG(BiasMode, bias) = BiasMode::kNone;
  /// PEFT's task type. "SEQ_CLS" (and "TOKEN_CLS") also trains and saves a module named
  /// `classifier` or `score` when the model has one, "QUESTION_ANS" one named `qa_outputs`, as
  /// PEFT's task models do. Default: empty (none).
  TORCH_ARG(std::string, task_type);
  /// Where the base model comes from, written into adapter_config.json. Default: empty.
  TORCH_ARG(std::string, base_model_name_or_path);
  /// The base model's revision, written into adapter_config.json. Default: empty (null).
  TORCH_ARG(std::string, revision);

 public:
  /// True when `target_modules` is PEFT's {"all-linear"}.
  bool all_linear() const { return target_modules_.size() == 1 && target_modules_.front() == "all-linear"; }

  /// The heads PEFT's task models save in full: "classifier" and "score" for SEQ_CLS and
  /// TOKEN_CLS, "qa_outputs" for QUESTION_ANS. They need not exist in the model.
  std::vector<std::string> task_modules() const {
    if (task_type_ == "SEQ_CLS" || task_type_ == "TOKEN_CLS") return {"classifier", "score"};
    if (task_type_ == "QUESTION_ANS") return {"qa_outputs"};
    return {};
  }

  /// The task's heads that `modules_to_save` does not list.
  std::vector<std::string> implied_modules_to_save() const {
    std::vector<std::string> implied;
    for (const auto& name : task_modules()) {
      if (std::find(modules_to_save_.begin(), modules_to_save_.end(), name) == modules_to_save_.end()) {
        implied.push_back(name);
      }
    }
    return implied;
  }

  /// Checks what does not depend on the model; throws naming the bad value.
  void validate() const {
    adapter_.validate();
    TORCH_CHECK(!target_modules_.empty() || !target_regex_.empty(),
                "LoraConfig: no target modules (set target_modules, e.g. {\"query\", \"value\"}, or target_regex)");
    TORCH_CHECK(target_modules_.empty() || target_regex_.empty(),
                "LoraConfig: set target_modules or target_regex, not both (target_regex is '", target_regex_, "')");
    for (const auto& name : target_modules_) {
      TORCH_CHECK(!name.empty(), "LoraConfig: target_modules contains an empty name");
      TORCH_CHECK(name != "all-linear" || target_modules_.size() == 1,
                  "LoraConfig: 'all-linear' must be the only entry of target_modules");
    }
    for (const auto* list : {&exclude_modules_, &modules_to_save_}) {
      for (const auto& name : *list) {
        TORCH_CHECK(!name.empty(), "LoraConfig: ", list == &exclude_modules_ ? "exclude_modules" : "modules_to_save",
                    " contains an empty name");
      }
    }
    TORCH_CHECK(layers_pattern_.empty() || !layers_to_transform_.empty(),
                "LoraConfig: layers_pattern needs layers_to_transform");
    // PEFT refuses the combination (LoraConfig.__post_init__): a file with both would not load there.
    TORCH_CHECK(target_regex_.empty() || layers_to_transform_.empty(),
                "LoraConfig: layers_to_transform cannot be used with target_regex (PEFT refuses it); put the layer "
                "numbers in the regular expression");
    for (const auto index : layers_to_transform_) {
      TORCH_CHECK(index >= 0, "LoraConfig: layers_to_transform must hold layer indices >= 0 (got ", index, ")");
    }
    std::set<std::string> keys;
    for (const auto& [key, rank] : rank_pattern_) {
      TORCH_CHECK(keys.insert("r:" + key).second, "LoraConfig: rank_pattern lists '", key, "' twice");
      TORCH_CHECK(rank > 0, "LoraConfig: rank_pattern['", key, "'] must be > 0 (got ", rank, ")");
    }
    for (const auto& [key, alpha] : alpha_pattern_) {
      TORCH_CHECK(keys.insert("a:" + key).second, "LoraConfig: alpha_pattern lists '", key, "' twice");
      TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "LoraConfig: alpha_pattern['", key,
                  "'] must be finite and > 0 (got ", alpha, ")");
    }
  }
};

}  // namespace lora
