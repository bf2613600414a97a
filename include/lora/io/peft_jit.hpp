#pragma once

/// \file
/// PEFT adapter folders for TorchScript modules (see <lora/io/peft.hpp> and <lora/jit.hpp>).

#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <lora/io/peft.hpp>
#include <lora/jit.hpp>

namespace lora::io {

/// Writes adapter `name` of a TorchScript module's adapters as PEFT does (same files and keys
/// as for a native model).
inline void save_adapter(const JitAdapters& adapters, const AdapterConfig& config, const std::string& dir,
                         const std::string& name = "default") {
  detail::write_adapter_folder(detail::adapter_folder(dir, name), config, adapters.adapter_state_dict(name));
}

/// Attaches adapter `name` from a PEFT adapter folder to the scripted module of `adapters` and
/// loads its tensors. Every key, rank and shape is checked against the scripted module first:
/// on any error nothing changes. A non-zero `lora_dropout` is set to 0 with a warning
/// (re-parametrised weights cannot drop out the adapter's input).
inline InjectionReport load_adapter(JitAdapters& adapters, const std::string& dir, const std::string& name = "default",
                                    std::ostream* warn = &std::cerr) {
  std::map<std::string, torch::jit::Module> modules;
  std::vector<std::string> module_names;
  for (const auto& item : adapters.module().named_modules()) {
    if (item.name.empty()) continue;
    modules.emplace(item.name, item.value);
    module_names.push_back(item.name);
  }
  auto [lora, tensors] = detail::read_for_loading(dir, name, module_names, warn);
  if (lora.adapter().dropout() != 0.0) {
    if (warn) {
      *warn << "lora: " << dir << ": lora_dropout " << lora.adapter().dropout()
            << " is not applied to a TorchScript module (weights are re-parametrised)\n";
    }
    lora.adapter(LoRAOptions(lora.adapter()).dropout(0.0));
  }
  const std::string prefix = "base_model.model.";

  // The exact keys and shapes the adapter will have, from the plan.
  std::map<std::string, std::vector<int64_t>> expected;
  for (const auto& selection : adapters.plan(lora, name)) {
    const auto& submodule = modules.at(selection.name);
    if (selection.saved) {
      for (const auto& item : submodule.named_parameters(/*recurse=*/true)) {
        expected[prefix + selection.name + "." + item.name] = item.value.sizes().vec();
      }
      continue;
    }
    const auto weight = submodule.attr("weight").toTensor();
    const auto r = selection.options.r();
    expected[prefix + selection.name + ".lora_A.weight"] = {r, weight.size(1)};
    expected[prefix + selection.name + ".lora_B.weight"] = {weight.size(0), r};
    if (selection.options.use_dora()) expected[prefix + selection.name + ".lora_magnitude_vector"] = {weight.size(0)};
  }
  std::vector<std::string> missing, unknown;
  for (const auto& [key, shape] : expected) {
    const auto* tensor = tensors.find(key);
    if (tensor == nullptr) {
      missing.push_back(key);
      continue;
    }
    TORCH_CHECK(tensor->sizes() == at::IntArrayRef(shape), "lora: adapter tensor '", key, "' has shape ",
                tensor->sizes(), " but adapter '", name, "' expects ", at::IntArrayRef(shape));
  }
  for (const auto& item : tensors) {
    if (!expected.count(item.key())) unknown.push_back(item.key());
  }
  TORCH_CHECK(missing.empty(), "lora: the adapter state lacks ", missing.size(), " tensor(s) of adapter '", name,
              "': ", lora::detail::join(missing));
  TORCH_CHECK(unknown.empty(), "lora: the adapter state has ", unknown.size(), " tensor(s) adapter '", name,
              "' does not: ", lora::detail::join(unknown));

  auto report = adapters.add_adapter(lora, name);
  torch::OrderedDict<std::string, at::Tensor> low_rank("adapter tensor");
  {
    torch::NoGradGuard no_grad;
    for (const auto& entry : report.entries) {
      if (!entry.saved) continue;
      for (const auto& item : modules.at(entry.module).named_parameters(/*recurse=*/true)) {
        item.value.copy_(tensors[prefix + entry.module + "." + item.name]);
      }
    }
    for (const auto& item : tensors) {
      const bool saved = std::any_of(report.entries.begin(), report.entries.end(), [&](const auto& entry) {
        return entry.saved && item.key().compare(0, prefix.size() + entry.module.size() + 1,
                                                 prefix + entry.module + ".") == 0;
      });
      if (!saved) low_rank.insert(item.key(), item.value());
    }
  }
  lora::load_adapter_state_dict(*adapters.adapters(), low_rank, name, prefix);
  adapters.refresh();
  return report;
}

/// Loads a PEFT adapter folder into a scripted module that has no adapters yet.
///
///     auto scripted = torch::jit::load("bert-traced.pt");
///     auto adapters = lora::io::load_jit_adapter(scripted, "sst2-adapter");
inline JitAdapters load_jit_adapter(torch::jit::Module& module, const std::string& dir,
                                    const std::string& name = "default", std::ostream* warn = &std::cerr) {
  JitAdapters adapters(module);
  load_adapter(adapters, dir, name, warn);
  return adapters;
}

}  // namespace lora::io
