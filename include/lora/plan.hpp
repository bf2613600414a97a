#pragma once

/// \file
/// `AdapterPlan`: what attaching an adapter will do, checked in full before anything changes;
/// shared by `lora::inject`, adapter loading and `lora::JitAdapters`, which each plan, then
/// apply the plan all or nothing. `InjectionReport`: what was attached where.

#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <lora/config.hpp>
#include <lora/detail/strings.hpp>
#include <lora/target.hpp>

namespace lora {

/// What an injection attached where.
struct InjectionReport {
  struct Entry {
    std::string module;  ///< qualified module name
    bool saved = false;  ///< a trainable copy (modules_to_save) rather than a low-rank adapter
    int64_t r = 0;
    double alpha = 0;
    double scaling = 0;
  };
  std::string adapter_name;
  std::vector<Entry> entries;

  /// Qualified names of the modules given low-rank adapters, in model order.
  std::vector<std::string> adapted_modules() const { return names(false); }
  /// Qualified names of the modules saved as trainable copies.
  std::vector<std::string> saved_modules() const { return names(true); }

  /// One line per module: "bert.encoder.layer.0.attention.self.query: r=8 alpha=16 (scaling 2)".
  std::string to_string() const {
    std::ostringstream out;
    out << "adapter '" << adapter_name << "': " << adapted_modules().size() << " adapted, " << saved_modules().size()
        << " saved\n";
    for (const auto& entry : entries) {
      out << "  " << entry.module << ": ";
      if (entry.saved) {
        out << "trainable copy\n";
      } else {
        out << "r=" << entry.r << " alpha=" << entry.alpha << " (scaling " << entry.scaling << ")\n";
      }
    }
    return out.str();
  }

 private:
  std::vector<std::string> names(bool saved) const {
    std::vector<std::string> out;
    for (const auto& entry : entries) {
      if (entry.saved == saved) out.push_back(entry.module);
    }
    return out;
  }
};

/// Adapter `adapter_name` as a config selects it on one model: every module and the options
/// it gets, already checked against the model's layers. Applying it changes the model; a
/// plan is made and applied in one call (`lora::inject`), or inspected first.
struct AdapterPlan {
  std::string adapter_name;
  /// The config the adapter is attached with; every layer remembers it.
  std::shared_ptr<const LoraConfig> config;
  /// The selected modules in model order: targets with their options, and saved modules.
  std::vector<Selection> modules;

  /// What applying the plan attaches, as `inject` reports it.
  InjectionReport report() const {
    InjectionReport report;
    report.adapter_name = adapter_name;
    for (const auto& selection : modules) {
      const auto& options = selection.options;
      if (selection.saved) {
        report.entries.push_back({selection.name, true, 0, 0, 0});
      } else {
        report.entries.push_back({selection.name, false, options.r(), options.alpha(), options.scaling()});
      }
    }
    return report;
  }
};

namespace detail {

/// What a model already holds, by module path: the saved modules and the layers with LoRA
/// adapters, each with its adapter names.
struct ExistingAdapters {
  std::vector<std::pair<std::string, std::vector<std::string>>> saved;
  std::vector<std::pair<std::string, std::vector<std::string>>> adapted;
};

/// Checks a selection against what the model already holds, the same way for native and
/// TorchScript models: a module is adapted or saved, not both (nor inside one another), and
/// saved modules do not nest (a saved selection equal to a saved module adds a copy to it).
inline void check_against_existing(const Selection& selection, const ExistingAdapters& existing, const char* who) {
  const auto& name = selection.name;
  if (selection.saved) {
    for (const auto& [path, adapters] : existing.saved) {
      TORCH_CHECK(path == name || (!is_inside(name, path) && !is_inside(path, name)), who, ": module '", name,
                  "' cannot be saved: '", path, "' is saved already, for adapters (", join(adapters),
                  "); saved modules cannot nest");
    }
    for (const auto& [path, adapters] : existing.adapted) {
      TORCH_CHECK(path != name && !is_inside(path, name), who, ": module '", name, "' is to be saved in full but ",
                  path == name ? "it" : "'" + path + "' inside it", " carries LoRA adapters (", join(adapters),
                  "); a module is adapted or saved, not both");
    }
    return;
  }
  for (const auto& [path, adapters] : existing.saved) {
    TORCH_CHECK(path != name && !is_inside(name, path), who, ": module '", name,
                "' matches the targets but is saved in full for adapter(s) ", join(adapters), " (modules_to_save",
                path == name ? "" : " of '" + path + "'", "); a module is adapted or saved, not both");
  }
}

}  // namespace detail

}  // namespace lora
