#pragma once

/// \file
/// PEFT adapter folders for TorchScript modules (see <lora/io/peft.hpp> and <lora/jit.hpp>).

#include <iostream>
#include <string>
#include <vector>

#include <lora/io/peft.hpp>
#include <lora/jit.hpp>

namespace lora::io {

namespace detail {

inline std::vector<ModuleEntry> scripted_modules(const JitAdapters& adapters) {
  std::vector<ModuleEntry> modules;
  for (const auto& item : adapters.module().named_modules()) {
    if (!item.name.empty()) modules.push_back({item.name, JitAdapters::is_linear(item.value)});
  }
  return modules;
}

inline void save_jit_adapter_impl(const JitAdapters& adapters, const LoraConfig* given, const std::string& dir,
                                  const std::string& name, const SaveOptions& options) {
  const auto& root = *adapters.adapters();
  lora::detail::check_model_adapter(root, name, "save");
  const auto config = config_to_save(root, name, given);
  check_config_describes(config, name, scripted_modules(adapters), adapter_layers(root), "lora::io::save_adapter");
  write_adapter_folder(adapter_folder(dir, name), config, adapters.adapter_state_dict(name), options);
}

}  // namespace detail

/// Writes adapter `name` of a TorchScript module's adapters as PEFT does (same files and keys
/// as for a native model), with the configuration it was attached with.
inline void save_adapter(const JitAdapters& adapters, const std::string& dir, const std::string& name = "default",
                         const SaveOptions& options = {}) {
  detail::save_jit_adapter_impl(adapters, nullptr, dir, name, options);
}

/// The same with an explicit configuration, which must describe the adapter (see the native
/// `save_adapter`).
inline void save_adapter(const JitAdapters& adapters, const LoraConfig& config, const std::string& dir,
                         const std::string& name = "default", const SaveOptions& options = {}) {
  detail::save_jit_adapter_impl(adapters, &config, dir, name, options);
}

/// Attaches adapter `name` from a PEFT adapter folder to the scripted module of `adapters` and
/// loads its tensors, for inference unless `options.is_trainable` (as the native
/// `load_adapter`). On any error nothing changes. A non-zero `lora_dropout` is not applied
/// (re-parametrised weights cannot drop out the adapter's input; a notice says so) but is
/// kept in the remembered config, so saving writes it back.
inline LoadedAdapter load_adapter(JitAdapters& adapters, const std::string& dir, const std::string& name = "default",
                                  const LoadOptions& options = {}) {
  auto files = detail::read_adapter_files(dir, name, options.warn);
  auto applied = files.config;
  if (applied.adapter().dropout() != 0.0) {
    if (options.warn) {
      *options.warn << "lora: " << dir << ": lora_dropout " << applied.adapter().dropout()
                    << " is not applied to a TorchScript module (weights are re-parametrised)\n";
    }
    applied.adapter(LoRAOptions(applied.adapter()).dropout(0.0));
  }
  auto plan = adapters.plan(applied, name);
  plan.config = std::make_shared<const LoraConfig>(files.config);
  detail::plain_init(plan);
  const auto kept = detail::modules_without_tensors(plan, files.tensors);
  lora::detail::UndoLog undo;
  auto report = adapters.apply(plan, undo);
  load_adapter_state_dict(*adapters.adapters(), files.tensors, name, detail::peft_prefix());
  adapters.refresh();
  if (!options.is_trainable) {
    lora::set_adapter_trainable(*adapters.adapters(), name, false);
    adapters.refresh();  // re-parametrised weights without the adapters' graph
    adapters.module().eval();
  }
  undo.commit();
  if (options.warn && !kept.empty()) {
    *options.warn << "lora: " << dir << ": no tensors for " << lora::detail::join(kept) << " (implied by task_type "
                  << files.config.task_type() << "); they keep the model's values\n";
  }
  return {files.config, std::move(report), kept};
}

/// Loads a PEFT adapter folder into a scripted module that has no adapters yet.
///
///     auto scripted = torch::jit::load("bert-traced.pt");
///     auto adapters = lora::io::load_jit_adapter(scripted, "sst2-adapter");
inline JitAdapters load_jit_adapter(torch::jit::Module& module, const std::string& dir,
                                    const std::string& name = "default", const LoadOptions& options = {}) {
  JitAdapters adapters(module);
  load_adapter(adapters, dir, name, options);
  return adapters;
}

}  // namespace lora::io
