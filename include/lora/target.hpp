#pragma once

/// \file
/// Which modules of a model get adapters: PEFT's name-matching rules, shared by the native and
/// the TorchScript injectors.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>

#include <lora/config.hpp>
#include <lora/detail/strings.hpp>

namespace lora {

/// True when `name` is `key` or ends with "." + `key` (PEFT's rule for a list of names).
inline bool name_matches(const std::string& name, const std::string& key) {
  if (name == key) return true;
  return name.size() > key.size() && detail::ends_with(name, key) && name[name.size() - key.size() - 1] == '.';
}

/// Applies a `LoraConfig`'s target, exclusion, layer and pattern rules to qualified module names.
class TargetMatcher {
 public:
  explicit TargetMatcher(const LoraConfig& config) : config_(config) {
    config.validate();
    if (!config.target_regex().empty()) target_regex_ = compile(config.target_regex(), "target_regex");
    for (const auto& pattern : config.layers_pattern()) {
      layer_regexes_.push_back(compile(".*\\." + pattern + "\\.(\\d+)\\.", "layers_pattern"));
    }
    if (layer_regexes_.empty()) layer_regexes_.push_back(std::regex(".*\\.[^.]*\\.(\\d+)\\."));
    for (const auto& [key, rank] : config.rank_pattern()) {
      rank_regexes_.emplace_back(std::make_pair(key, compile("(.*\\.)?(" + key + ")", "rank_pattern")), rank);
    }
    for (const auto& [key, alpha] : config.alpha_pattern()) {
      alpha_regexes_.emplace_back(std::make_pair(key, compile("(.*\\.)?(" + key + ")", "alpha_pattern")), alpha);
    }
    implied_ = config.implied_modules_to_save();
  }

  /// Does `name` match the targets (for a list: also the layer filter)? `all-linear` is the
  /// caller's business: it knows which modules are linear.
  bool is_target(const std::string& name) const {
    if (!config_.target_regex().empty()) return std::regex_match(name, target_regex_);
    bool found = false;
    for (const auto& key : config_.target_modules()) found = found || name_matches(name, key);
    return found && in_selected_layer(name);
  }

  /// Does `name` pass the layer filter (`layers_to_transform` / `layers_pattern`)?
  bool in_selected_layer(const std::string& name) const {
    if (config_.layers_to_transform().empty()) return true;
    const auto index = layer_index(name);
    const auto& wanted = config_.layers_to_transform();
    return index >= 0 && std::find(wanted.begin(), wanted.end(), index) != wanted.end();
  }

  bool is_excluded(const std::string& name) const {
    for (const auto& key : config_.exclude_modules()) {
      if (name_matches(name, key)) return true;
    }
    return false;
  }

  /// Is `name` a module to save? PEFT's rule (`_set_trainable`): the name ends with an entry
  /// of `modules_to_save` (or of the task type's implied ones), with no dot boundary, so that
  /// "classifier" also selects DistilBERT's `pre_classifier`.
  bool is_saved(const std::string& name) const { return !saved_entry(name).empty(); }

  /// The `modules_to_save` (or implied) entry that selects `name`, or "".
  std::string saved_entry(const std::string& name) const {
    for (const auto* list : {&config_.modules_to_save(), &implied_}) {
      for (const auto& key : *list) {
        if (detail::ends_with(name, key)) return key;
      }
    }
    return {};
  }

  /// Entries that the task type adds or that PEFT ≥ 0.11 writes into `modules_to_save` for it:
  /// they may match nothing ("score" in a BERT).
  bool is_optional_saved_entry(const std::string& key) const {
    const auto task = config_.task_modules();
    return std::find(task.begin(), task.end(), key) != task.end();
  }

  /// Does rank_pattern / alpha_pattern key `key` select module `name`?
  bool pattern_selects(const std::string& key, const std::string& name) const {
    for (const auto& [regex, rank] : rank_regexes_) {
      (void)rank;
      if (regex.first == key) return std::regex_match(name, regex.second);
    }
    for (const auto& [regex, alpha] : alpha_regexes_) {
      (void)alpha;
      if (regex.first == key) return std::regex_match(name, regex.second);
    }
    return false;
  }

  /// The layer index of `name` by the layer rules (`layers_pattern`), or -1 when it has none.
  int64_t layer_index(const std::string& name) const {
    for (const auto& regex : layer_regexes_) {
      std::smatch match;
      if (std::regex_search(name, match, regex, std::regex_constants::match_continuous)) {
        const auto digits = match[1].str();
        return digits.size() > 9 ? std::numeric_limits<int64_t>::max() : std::stoll(digits);
      }
    }
    return -1;
  }

  /// The adapter options for module `name`, with `rank_pattern` / `alpha_pattern` applied.
  LoRAOptions options_for(const std::string& name) const {
    auto options = config_.adapter();
    for (const auto& [regex, rank] : rank_regexes_) {
      if (std::regex_match(name, regex.second)) {
        options.r(rank);
        break;
      }
    }
    for (const auto& [regex, alpha] : alpha_regexes_) {
      if (std::regex_match(name, regex.second)) {
        options.alpha(alpha);
        break;
      }
    }
    return options;
  }

  const LoraConfig& config() const { return config_; }

 private:
  static std::regex compile(const std::string& pattern, const char* field) {
    try {
      return std::regex(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& error) {
      TORCH_CHECK(false, "LoraConfig: ", field, " '", pattern, "' is not a valid regular expression (", error.what(),
                  ")");
    }
    return {};  // unreachable
  }

  LoraConfig config_;
  std::regex target_regex_;
  std::vector<std::regex> layer_regexes_;
  std::vector<std::pair<std::pair<std::string, std::regex>, int64_t>> rank_regexes_;
  std::vector<std::pair<std::pair<std::string, std::regex>, double>> alpha_regexes_;
  std::vector<std::string> implied_;
};

/// One module the config selects, with the options it gets.
struct Selection {
  std::string name;
  bool saved = false;  ///< modules_to_save (trained in full) rather than a low-rank adapter
  LoRAOptions options;
};

/// A module of the tree a config is applied to, in model order.
struct ModuleEntry {
  std::string name;
  bool linear = false;  ///< a Linear-like layer (for all-linear and for messages)
};

namespace detail {

/// "a, b, … and 12 more": a readable list of candidates for an error message.
inline std::string some(const std::vector<std::string>& names, size_t limit = 24) {
  if (names.size() <= limit) return join(names);
  std::vector<std::string> head(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(limit));
  return join(head) + " and " + std::to_string(names.size() - limit) + " more";
}

/// The distinct last components of module names, sorted: what a name rule can end with.
inline std::vector<std::string> name_endings(const std::vector<ModuleEntry>& modules) {
  std::set<std::string> endings;
  for (const auto& module : modules) endings.insert(module.name.substr(module.name.rfind('.') + 1));
  return {endings.begin(), endings.end()};
}

}  // namespace detail

/// Applies a config to a model's modules (in model order). Selected are the targets (for
/// all-linear: the linear modules but the last one, the output head) that are not excluded,
/// plus the saved modules (outermost ones; a module inside a saved one is neither adapted nor
/// saved separately, as in PEFT ≥ 0.18). A saved module gets no adapter.
///
/// Every entry must do something, or the call throws naming it and listing candidates: no
/// module adapted at all (the targets are PEFT's rule: some may match nothing); an
/// `exclude_modules` or `modules_to_save` entry that matches no module (except the
/// sequence-classification heads "classifier" and "score"); a `rank_pattern` / `alpha_pattern`
/// key that matches no adapted module; a `layers_to_transform` index no targeted module has.
/// `who` and `what_linear` make the messages ("lora::inject", "linear modules in the model").
inline std::vector<Selection> select_modules(const TargetMatcher& matcher, const std::vector<ModuleEntry>& modules,
                                             const char* who, const char* what_linear) {
  const auto& config = matcher.config();
  std::vector<std::string> linear_names;
  for (const auto& module : modules) {
    if (module.linear) linear_names.push_back(module.name);
  }
  const std::string output_head = config.all_linear() && !linear_names.empty() ? linear_names.back() : "";

  std::vector<std::string> saved_roots;
  auto in_saved = [&](const std::string& name) {
    return std::any_of(saved_roots.begin(), saved_roots.end(), [&](const std::string& root) {
      return name == root || detail::is_inside(name, root);
    });
  };
  for (const auto& module : modules) {
    if (!in_saved(module.name) && matcher.is_saved(module.name)) saved_roots.push_back(module.name);
  }

  std::vector<Selection> selected;
  std::vector<int64_t> target_layers;  // layer indices of modules the targets name (before the layer filter)
  for (const auto& module : modules) {
    const auto& name = module.name;
    if (in_saved(name)) {
      if (std::find(saved_roots.begin(), saved_roots.end(), name) != saved_roots.end()) {
        selected.push_back({name, true, LoRAOptions()});
      }
      continue;
    }
    bool named = false;
    if (config.all_linear()) {
      named = module.linear && name != output_head;
    } else if (!config.target_regex().empty()) {
      named = matcher.is_target(name);
    } else {
      named = std::any_of(config.target_modules().begin(), config.target_modules().end(),
                          [&](const std::string& key) { return name_matches(name, key); });
    }
    if (!named || matcher.is_excluded(name)) continue;
    // (A regular expression comes without a layer filter: LoraConfig::validate refuses both.)
    const bool filtered = !config.layers_to_transform().empty();
    if (filtered) target_layers.push_back(matcher.layer_index(name));
    if (filtered && !matcher.in_selected_layer(name)) continue;
    selected.push_back({name, false, matcher.options_for(name)});
  }

  std::vector<std::string> adapted;
  for (const auto& selection : selected) {
    if (!selection.saved) adapted.push_back(selection.name);
  }
  TORCH_CHECK(!adapted.empty(), who, ": no module matches the targets (",
              config.target_regex().empty() ? detail::join(config.target_modules()) : config.target_regex(), ")",
              config.layers_to_transform().empty() ? "" : " in the layers of layers_to_transform", "; ", what_linear,
              ": ", detail::some(linear_names));

  for (const auto& key : config.modules_to_save()) {
    if (matcher.is_optional_saved_entry(key)) continue;
    const bool found = std::any_of(modules.begin(), modules.end(),
                                   [&](const ModuleEntry& module) { return detail::ends_with(module.name, key); });
    TORCH_CHECK(found, who, ": modules_to_save entry '", key, "' matches no module (a module matches when its name "
                "ends with the entry); module names end with: ", detail::some(detail::name_endings(modules), 40));
  }
  for (const auto& key : config.exclude_modules()) {
    const bool found = std::any_of(modules.begin(), modules.end(),
                                   [&](const ModuleEntry& module) { return name_matches(module.name, key); });
    TORCH_CHECK(found, who, ": exclude_modules entry '", key, "' matches no module; module names end with: ",
                detail::some(detail::name_endings(modules), 40));
  }
  auto check_pattern = [&](const std::string& key, const char* field) {
    const bool found = std::any_of(adapted.begin(), adapted.end(),
                                   [&](const std::string& name) { return matcher.pattern_selects(key, name); });
    TORCH_CHECK(found, who, ": ", field, " key '", key, "' matches no adapted module; adapted: ", detail::some(adapted));
  };
  for (const auto& item : config.rank_pattern()) check_pattern(item.first, "rank_pattern");
  for (const auto& item : config.alpha_pattern()) check_pattern(item.first, "alpha_pattern");
  for (const auto index : config.layers_to_transform()) {
    if (std::find(target_layers.begin(), target_layers.end(), index) != target_layers.end()) continue;
    std::set<int64_t> present(target_layers.begin(), target_layers.end());
    present.erase(-1);
    std::vector<std::string> listed;
    for (const auto value : present) listed.push_back(std::to_string(value));
    TORCH_CHECK(false, who, ": layers_to_transform lists layer ", index,
                ", which no targeted module is in; the targeted modules are in layers: ", detail::join(listed));
  }
  for (const auto& selection : selected) {
    if (!selection.saved) selection.options.validate();
  }
  return selected;
}

}  // namespace lora
