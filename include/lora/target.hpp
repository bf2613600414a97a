#pragma once

/// \file
/// Which modules of a model get adapters: PEFT's name-matching rules, shared by the native and
/// the TorchScript injectors.

#include <algorithm>
#include <regex>
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
  return name.size() > key.size() && name.compare(name.size() - key.size(), key.size(), key) == 0 &&
         name[name.size() - key.size() - 1] == '.';
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
      rank_regexes_.emplace_back(compile("(.*\\.)?(" + key + ")", "rank_pattern"), rank);
    }
    for (const auto& [key, alpha] : config.alpha_pattern()) {
      alpha_regexes_.emplace_back(compile("(.*\\.)?(" + key + ")", "alpha_pattern"), alpha);
    }
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
    for (const auto& regex : layer_regexes_) {
      std::smatch match;
      if (std::regex_search(name, match, regex, std::regex_constants::match_continuous)) {
        const auto index = std::stoll(match[1].str());
        const auto& wanted = config_.layers_to_transform();
        return std::find(wanted.begin(), wanted.end(), index) != wanted.end();
      }
    }
    return false;  // no layer index in the name
  }

  bool is_excluded(const std::string& name) const {
    for (const auto& key : config_.exclude_modules()) {
      if (name_matches(name, key)) return true;
    }
    return false;
  }

  bool is_saved(const std::string& name) const {
    for (const auto& key : config_.modules_to_save()) {
      if (name_matches(name, key)) return true;
    }
    return false;
  }

  /// The adapter options for module `name`, with `rank_pattern` / `alpha_pattern` applied.
  LoRAOptions options_for(const std::string& name) const {
    auto options = config_.adapter();
    for (const auto& [regex, rank] : rank_regexes_) {
      if (std::regex_match(name, regex)) {
        options.r(rank);
        break;
      }
    }
    for (const auto& [regex, alpha] : alpha_regexes_) {
      if (std::regex_match(name, regex)) {
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
  std::vector<std::pair<std::regex, int64_t>> rank_regexes_;
  std::vector<std::pair<std::regex, double>> alpha_regexes_;
};

/// One module the config selects, with the options it gets.
struct Selection {
  std::string name;
  bool saved = false;  ///< modules_to_save (trained in full) rather than a low-rank adapter
  LoRAOptions options;
};

/// Applies a config to a model's modules, given in model order with whether each is linear.
/// Selected modules are targets (or, for all-linear, linear modules but the last one, the
/// output head) that are not excluded, plus the saved modules; a saved module gets no adapter.
/// Throws, naming the targets and listing the linear modules, when no module would be adapted;
/// `who` and `what_linear` make the message ("lora::inject", "linear modules in the model").
inline std::vector<Selection> select_modules(const TargetMatcher& matcher,
                                             const std::vector<std::pair<std::string, bool>>& modules,
                                             const char* who, const char* what_linear) {
  const auto& config = matcher.config();
  std::vector<std::string> linear_names;
  for (const auto& [name, linear] : modules) {
    if (linear) linear_names.push_back(name);
  }
  const std::string output_head = config.all_linear() && !linear_names.empty() ? linear_names.back() : "";

  std::vector<Selection> selected;
  for (const auto& [name, linear] : modules) {
    if (matcher.is_excluded(name)) continue;
    const bool saved = matcher.is_saved(name);
    const bool targeted = config.all_linear() ? linear && name != output_head && matcher.in_selected_layer(name)
                                              : matcher.is_target(name);
    if (saved || targeted) selected.push_back({name, saved, matcher.options_for(name)});
  }
  const bool any_adapted =
      std::any_of(selected.begin(), selected.end(), [](const Selection& selection) { return !selection.saved; });
  TORCH_CHECK(any_adapted, who, ": no module matches the targets (",
              config.target_regex().empty() ? detail::join(config.target_modules()) : config.target_regex(), "); ",
              what_linear, ": ", detail::join(linear_names));
  for (const auto& selection : selected) {
    if (!selection.saved) selection.options.validate();
  }
  return selected;
}

}  // namespace lora
