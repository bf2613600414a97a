#pragma once

/// \file
/// `ModulesToSave`: PEFT's `ModulesToSaveWrapper` for a module of any type: the module trains
/// in full for an adapter while its original values are kept.

#include <algorithm>
#include <memory>
#include <ostream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <lora/detail/module_path.hpp>
#include <lora/detail/strings.hpp>
#include <lora/layer.hpp>
#include <lora/state_dict.hpp>

namespace lora {

/// Trainable full copies of a module, one per adapter, beside its frozen original (PEFT's
/// `modules_to_save`), for a module of any type.
///
/// LibTorch models call their submodules through typed members, which no wrapper can
/// replace. So the wrapped module itself stays on the forward path and always holds the
/// values in use: the active adapter's copy, or the original while no adapter that saves it is
/// active (or adapters are disabled). The other value sets live in frozen modules of the same
/// structure. Switching exchanges tensor storage (no copy), and the tree is re-registered so
/// that names always say what the values are, as PEFT names them:
/// `classifier.original_module.weight` (frozen), `classifier.modules_to_save.default.weight`.
///
/// `lora::inject` creates these for `LoraConfig::modules_to_save`; the wrapper takes the
/// module's place among its parent's children.
///
/// One optimizer per adapter: the wrapped module's tensors are the trainable ones for
/// whichever adapter is active, so an optimizer's state for them follows the live values.
///
/// Unlike PEFT, the original never trains: with adapters disabled nothing of a saved module
/// trains (PEFT makes the original trainable then), and `release` freezes the module it
/// hands back, like every base weight after `merge_and_unload`.
class ModulesToSaveImpl : public torch::nn::Module, public AdapterLayer {
 public:
  /// Wraps `module`, which must hold tensors and no LoRA adapters (a module is adapted or
  /// saved, not both). No adapter yet: the module computes its original output.
  explicit ModulesToSaveImpl(std::shared_ptr<torch::nn::Module> module) : torch::nn::Module("lora::ModulesToSave") {
    check_wrappable(module, "module");
    module_ = std::move(module);
    // Each tensor once (tied tensors appear under several names), with the name the model
    // without adapters gives it.
    std::unordered_map<const void*, std::string> base_names;
    for (const auto& item : base_state_dict(*module_)) base_names.emplace(item.value().unsafeGetTensorImpl(), item.key());
    std::unordered_map<const void*, bool> seen;
    auto collect = [&](const std::string& key, const at::Tensor& tensor, bool parameter) {
      if (!tensor.defined() || !seen.emplace(tensor.unsafeGetTensorImpl(), true).second) return;
      const auto found = base_names.find(tensor.unsafeGetTensorImpl());
      entries_.push_back({key, found == base_names.end() ? key : found->second, parameter});
      original_.tensors.push_back(tensor);
    };
    for (const auto& item : module_->named_parameters()) collect(item.key(), item.value(), true);
    for (const auto& item : module_->named_buffers()) collect(item.key(), item.value(), false);
    original_.module = module_;  // the wrapped module holds the original values
    register_module("original_module", original_.module);
    copies_holder_ = register_module("modules_to_save", std::make_shared<torch::nn::Module>("lora::ModulesToSaveDict"));
    settle();
  }

  /// Throws when `module` cannot be saved: empty, no tensors, holding LoRA adapters or a saved
  /// module.
  static void check_wrappable(const std::shared_ptr<torch::nn::Module>& module, const std::string& path) {
    TORCH_CHECK(module != nullptr, "lora::ModulesToSave: module '", path, "' is empty (nullptr)");
    TORCH_CHECK(!module->parameters().empty() || !module->buffers().empty(), "lora::ModulesToSave: module '", path,
                "' (", module->name(), ") has no parameters or buffers to train");
    for (const auto& [name, layer] : adapter_layers(*module)) {
      const bool lora = std::dynamic_pointer_cast<LoRALayer>(layer) != nullptr;
      TORCH_CHECK(layer->adapter_names().empty(), "lora::ModulesToSave: module '", detail::join_path(path, name), "' ",
                  lora ? "carries LoRA adapters (" : "is saved already, for adapters (", detail::join(layer->adapter_names()),
                  lora ? "); a module is adapted or saved, not both" : "); saved modules cannot nest");
    }
  }

  /// Adds adapter `name`: a trainable copy of the original values, active if it is the first
  /// adapter (as in PEFT).
  void add_adapter(const std::string& name, std::shared_ptr<const LoraConfig> config = nullptr) {
    check_add_adapter(name);
    Slot copy{shadow(original_.tensors), {}};
    copy.tensors = shadow_tensors(*copy.module);
    copies_holder_->register_module(name, copy.module);
    copies_.push_back({name, std::move(copy), std::move(config), true});
    if (active_.empty()) active_.push_back(name);
    settle();
  }

  /// Throws what `add_adapter(name)` would throw, changing nothing.
  void check_add_adapter(const std::string& name) const {
    check_not_routed("add an adapter");
    TORCH_CHECK(!name.empty() && name.find('.') == std::string::npos,
                "lora::ModulesToSave: adapter name must be non-empty and contain no '.' (got '", name, "')");
    TORCH_CHECK(!has_adapter(name), "lora::ModulesToSave: adapter '", name, "' already exists");
  }

  /// The wrapped module: the one the parent's forward calls.
  const std::shared_ptr<torch::nn::Module>& module() const { return module_; }

  /// Puts the values a model without this wrapper keeps into the wrapped module, and returns
  /// it for its parent: the active copy's with `keep_active` (`merge_and_unload`), else the
  /// original ones (`unload`). Its parameters are then frozen, like every base weight.
  std::shared_ptr<torch::nn::Module> release(bool keep_active) {
    move_live_to(keep_active ? wanted() : "");
    for (auto& parameter : module_->parameters()) parameter.requires_grad_(false);
    return module_;
  }

  /// The key of the values the wrapped module holds now: an adapter name, or "" (original).
  const std::string& live_values() const { return live_key_; }

  /// The names of the wrapped module's tensors (each once), as its `named_parameters()` and
  /// `named_buffers()` give them.
  std::vector<std::string> tensor_keys() const {
    std::vector<std::string> keys;
    for (const auto& entry : entries_) keys.push_back(entry.key);
    return keys;
  }
  /// Tensor `key` (see `tensor_keys`) of adapter `name`'s copy, or of the original values for
  /// "": the live tensor itself when those values are live.
  at::Tensor tensor(const std::string& name, const std::string& key) const {
    const Slot* held = &original_;
    if (!name.empty()) {
      const auto* copy = find(name);
      TORCH_CHECK(copy != nullptr, "lora::ModulesToSave: unknown adapter '", name, "' (adapters: ",
                  detail::join(adapter_names()), ")");
      held = &copy->slot;
    }
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (entries_[i].key == key) return held->tensors[i];
    }
    TORCH_CHECK(false, "lora::ModulesToSave: module ", module_->name(), " has no tensor '", key, "'");
    return {};
  }

  /// Training flags for a mixed-adapter batch (`lora::MixedBatch`): the copies of the routed
  /// adapters that are trainable train, nothing else, until `unroute()`.
  void route(const std::vector<std::string>& routed_adapters) {
    routed_ = true;
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (entries_[i].parameter) original_.tensors[i].requires_grad_(false);
    }
    for (auto& copy : copies_) {
      const bool routed = copy.trainable && enabled_ &&
                          std::find(routed_adapters.begin(), routed_adapters.end(), copy.name) != routed_adapters.end();
      for (size_t i = 0; i < entries_.size(); ++i) {
        if (entries_[i].parameter) copy.slot.tensors[i].requires_grad_(routed);
      }
    }
  }
  /// Back to the active adapter's training flags.
  void unroute() {
    routed_ = false;
    settle();
  }

  // AdapterLayer
  std::vector<std::string> adapter_names() const override {
    std::vector<std::string> names;
    for (const auto& copy : copies_) names.push_back(copy.name);
    return names;
  }
  bool has_adapter(const std::string& name) const override { return find(name) != nullptr; }

  void check_set_adapters(const std::vector<std::string>& names) const override {
    check_not_routed("change the active adapter");
    for (const auto& name : names) {
      TORCH_CHECK(has_adapter(name), "lora::ModulesToSave: cannot activate unknown adapter '", name,
                  "' (adapters: ", detail::join(adapter_names()), ")");
    }
    TORCH_CHECK(names.size() <= 1, "lora::ModulesToSave: only one saved copy can be active at a time (got ",
                detail::join(names), ")");
  }
  void set_adapters(const std::vector<std::string>& names) override {
    check_set_adapters(names);
    active_ = names;
    settle();
  }
  const std::vector<std::string>& active_adapters() const override { return active_; }

  void enable_adapters(bool enabled) override {
    check_not_routed(enabled ? "enable adapters" : "disable adapters");
    enabled_ = enabled;
    settle();
  }
  bool adapters_enabled() const override { return enabled_; }

  void check_delete_adapter(const std::string& name) const override {
    check_not_routed("delete an adapter");
    TORCH_CHECK(has_adapter(name), "lora::ModulesToSave: cannot delete unknown adapter '", name, "' (adapters: ",
                detail::join(adapter_names()), ")");
  }
  void delete_adapter(const std::string& name) override {
    check_delete_adapter(name);
    if (live_key_ == name) move_live_to("");
    copies_holder_->unregister_module(name);
    copies_.erase(std::find_if(copies_.begin(), copies_.end(), [&](const Copy& copy) { return copy.name == name; }));
    active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
    if (active_.empty() && !copies_.empty()) active_.push_back(copies_.front().name);
    settle();
  }

  /// The copy's tensors under the module's own names (`weight`, `bias`).
  std::vector<std::pair<std::string, at::Tensor>> adapter_state(const std::string& name) const override {
    const auto* copy = find(name);
    TORCH_CHECK(copy != nullptr, "lora::ModulesToSave: cannot read unknown adapter '", name, "' (adapters: ",
                detail::join(adapter_names()), ")");
    return named(copy->slot.tensors);
  }

  /// The original tensors under the module's own names.
  std::vector<std::pair<std::string, at::Tensor>> base_state() const override { return named(original_.tensors); }

  std::shared_ptr<const LoraConfig> adapter_config(const std::string& name) const override {
    const auto* copy = find(name);
    TORCH_CHECK(copy != nullptr, "lora::ModulesToSave: unknown adapter '", name, "'");
    return copy->config;
  }

  void set_adapter_config(const std::string& name, std::shared_ptr<const LoraConfig> config) override {
    TORCH_CHECK(has_adapter(name), "lora::ModulesToSave: unknown adapter '", name, "'");
    for (auto& copy : copies_) {
      if (copy.name == name) copy.config = std::move(config);
    }
  }

  void check_rename_adapter(const std::string& from, const std::string& to) const override {
    check_not_routed("rename an adapter");
    TORCH_CHECK(has_adapter(from), "lora::ModulesToSave: cannot rename unknown adapter '", from, "' (adapters: ",
                detail::join(adapter_names()), ")");
    TORCH_CHECK(!to.empty() && to.find('.') == std::string::npos,
                "lora::ModulesToSave: adapter name must be non-empty and contain no '.' (got '", to, "')");
    TORCH_CHECK(to == from || !has_adapter(to), "lora::ModulesToSave: cannot rename adapter '", from, "' to '", to,
                "', which exists already");
  }
  void rename_adapter(const std::string& from, const std::string& to) override {
    check_rename_adapter(from, to);
    if (from == to) return;
    // Re-registered in order, so that parameters() keeps its order (optimizers index by it).
    for (const auto& copy : copies_) copies_holder_->unregister_module(copy.name);
    for (auto& copy : copies_) {
      if (copy.name == from) copy.name = to;
      copies_holder_->register_module(copy.name, copy.slot.module);
    }
    std::replace(active_.begin(), active_.end(), from, to);
    if (live_key_ == from) live_key_ = to;
  }

  void set_trainable(const std::string& name, bool trainable) override {
    check_not_routed("freeze or unfreeze an adapter");
    TORCH_CHECK(has_adapter(name), "lora::ModulesToSave: cannot freeze unknown adapter '", name, "'");
    for (auto& copy : copies_) {
      if (copy.name == name) copy.trainable = trainable;
    }
    settle();
  }
  bool is_trainable(const std::string& name) const override {
    const auto* copy = find(name);
    TORCH_CHECK(copy != nullptr, "lora::ModulesToSave: unknown adapter '", name, "'");
    return copy->trainable;
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "lora::ModulesToSave(" << module_->name() << ", adapters=[" << detail::join(adapter_names())
           << "], active=[" << detail::join(active_) << "]" << (enabled_ ? "" : ", disabled") << ")";
  }

 private:
  struct Entry {
    std::string key;        ///< name inside the module (`base_layer.weight` for a LoRALinear)
    std::string base_name;  ///< name in the model without adapters (`weight`)
    bool parameter = true;
  };
  /// A set of values: the module registered under this slot's name and its tensors, in
  /// `entries_` order.
  struct Slot {
    std::shared_ptr<torch::nn::Module> module;
    std::vector<at::Tensor> tensors;
  };
  struct Copy {
    std::string name;
    Slot slot;
    std::shared_ptr<const LoraConfig> config;
    bool trainable = true;
  };

  void check_not_routed(const char* operation) const {
    TORCH_CHECK(!routed_, "lora::ModulesToSave: cannot ", operation,
                " while a mixed-adapter batch is routed through the module (a lora::MixedBatch lives)");
  }

  const Copy* find(const std::string& name) const {
    for (const auto& copy : copies_) {
      if (copy.name == name) return &copy;
    }
    return nullptr;
  }

  Slot& slot(const std::string& key) {
    if (key.empty()) return original_;
    for (auto& copy : copies_) {
      if (copy.name == key) return copy.slot;
    }
    TORCH_INTERNAL_ASSERT(false, "ModulesToSave: no slot '", key, "'");
    return original_;  // unreachable
  }

  std::vector<std::pair<std::string, at::Tensor>> named(const std::vector<at::Tensor>& tensors) const {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (size_t i = 0; i < entries_.size(); ++i) out.emplace_back(entries_[i].base_name, tensors[i]);
    return out;
  }

  /// A frozen module with the wrapped module's structure holding copies of `values`.
  std::shared_ptr<torch::nn::Module> shadow(const std::vector<at::Tensor>& values) const {
    auto root = std::make_shared<torch::nn::Module>(module_->name());
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < entries_.size(); ++i) {
      const auto [node, leaf] = detail::parent_for_path(*root, entries_[i].key);
      auto value = values[i].detach().clone();
      if (entries_[i].parameter) {
        node->register_parameter(leaf, value, /*requires_grad=*/false);
      } else {
        node->register_buffer(leaf, value);
      }
    }
    return root;
  }

  /// A shadow's tensors in `entries_` order.
  std::vector<at::Tensor> shadow_tensors(const torch::nn::Module& module) const {
    const auto parameters = module.named_parameters();
    const auto buffers = module.named_buffers();
    std::vector<at::Tensor> tensors;
    for (const auto& entry : entries_) tensors.push_back(entry.parameter ? parameters[entry.key] : buffers[entry.key]);
    return tensors;
  }

  /// The values the wrapped module should hold: the active copy's, or the original ones.
  std::string wanted() const { return enabled_ && !active_.empty() ? active_.front() : std::string(); }

  /// Moves the wrapped module to slot `key`: its tensors take that slot's values (storage
  /// exchanged, gradients too) and the module that held them takes the old slot.
  void move_live_to(const std::string& key) {
    if (key == live_key_) return;
    Slot& from = slot(live_key_);
    Slot& to = slot(key);
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < entries_.size(); ++i) {
        auto& live = from.tensors[i];
        auto& other = to.tensors[i];
        // The model may have moved since the other values were stored (a TorchScript module
        // moved on its own): bring them along first.
        if (other.device() != live.device() || other.scalar_type() != live.scalar_type()) {
          other.set_data(other.detach().to(live.device(), live.scalar_type()));
          if (entries_[i].parameter && other.grad().defined()) {
            other.mutable_grad() = other.grad().to(live.device(), live.scalar_type());
          }
        }
        const auto held = live.detach();
        live.set_data(other.detach());
        other.set_data(held);
        if (entries_[i].parameter) std::swap(live.mutable_grad(), other.mutable_grad());
      }
    }
    std::swap(from, to);
    register_slot(live_key_, from);
    register_slot(key, to);
    live_key_ = key;
  }

  void register_slot(const std::string& key, const Slot& slot) {
    if (key.empty()) {
      replace_module("original_module", slot.module);
    } else {
      copies_holder_->replace_module(key, slot.module);
    }
  }

  /// Puts the wanted values in the wrapped module; only an active, enabled copy trains.
  void settle() {
    move_live_to(wanted());
    auto freeze_unless_live = [&](Slot& held, bool live) {
      for (size_t i = 0; i < entries_.size(); ++i) {
        if (entries_[i].parameter) held.tensors[i].requires_grad_(live && !live_key_.empty());
      }
    };
    freeze_unless_live(original_, live_key_.empty());
    for (auto& copy : copies_) freeze_unless_live(copy.slot, copy.name == live_key_ && copy.trainable);
  }

  std::shared_ptr<torch::nn::Module> module_;
  std::vector<Entry> entries_;
  Slot original_;
  std::vector<Copy> copies_;
  std::shared_ptr<torch::nn::Module> copies_holder_;
  std::string live_key_;
  std::vector<std::string> active_;
  bool enabled_ = true;
  bool routed_ = false;  ///< a mixed-adapter batch holds handles to the copies' tensors
};

/// Module holder for `ModulesToSaveImpl`.
class ModulesToSave : public torch::nn::ModuleHolder<ModulesToSaveImpl> {
 public:
  using torch::nn::ModuleHolder<ModulesToSaveImpl>::ModuleHolder;
};

}  // namespace lora
