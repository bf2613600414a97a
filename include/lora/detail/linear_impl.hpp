#pragma once

// Inline definitions of LoRALinearImpl<Base>; included by <lora/linear.hpp>.

#include <algorithm>
#include <cmath>
#include <sstream>

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <lora/detail/strings.hpp>
#include <lora/functional.hpp>
#include <lora/init.hpp>

namespace lora {

template <typename Base>
LoRALinearImpl<Base>::LoRALinearImpl(const BaseOptions& base_options) : base_options_(base_options) {
  build(BaseHolder(std::make_shared<Base>(base_options_)));
}

template <typename Base>
LoRALinearImpl<Base>::LoRALinearImpl(const BaseOptions& base_options, const LoRAOptions& options,
                                     const std::string& adapter)
    : LoRALinearImpl(base_options) {
  add_adapter(adapter, options);
}

template <typename Base>
LoRALinearImpl<Base>::LoRALinearImpl(const BaseHolder& base) : base_options_(checked_options(base)) {
  build(base);
}

template <typename Base>
const typename LoRALinearImpl<Base>::BaseOptions& LoRALinearImpl<Base>::checked_options(const BaseHolder& base) {
  TORCH_CHECK(!base.is_empty(), "LoRALinear: the base layer is empty (nullptr)");
  return Traits::options(*base);
}

template <typename Base>
LoRALinearImpl<Base>::LoRALinearImpl(const BaseHolder& base, const LoRAOptions& options, const std::string& adapter)
    : LoRALinearImpl(base) {
  add_adapter(adapter, options);
}

template <typename Base>
void LoRALinearImpl<Base>::build(BaseHolder base) {
  base_layer_ = this->register_module("base_layer", std::move(base));
  for (auto& parameter : base_layer_->parameters()) parameter.requires_grad_(false);
  lora_A_ = this->register_module("lora_A", torch::nn::ModuleDict());
  lora_B_ = this->register_module("lora_B", torch::nn::ModuleDict());
  lora_magnitude_vector_ = this->register_module("lora_magnitude_vector", torch::nn::ModuleDict());
  modules_to_save_ = this->register_module("modules_to_save", torch::nn::ModuleDict());
}

template <typename Base>
void LoRALinearImpl<Base>::reset() {
  merged_.clear();  // fresh weights hold no merge
  dora_merge_norms_.clear();
  copy_merge_originals_.clear();
  build(BaseHolder(std::make_shared<Base>(base_options_)));
  for (const auto& entry : adapters_) {
    if (entry.trainable_copy) {
      modules_to_save_->update({{entry.name, std::make_shared<Base>(base_options_)}});
    } else {
      create_adapter(entry.name, entry.options);
    }
  }
  update_requires_grad();
}

template <typename Base>
void LoRALinearImpl<Base>::reset_parameters() {
  TORCH_CHECK(merged_.empty(), "LoRALinear: cannot re-initialise adapters while merged (merged: ",
              detail::join(merged_), "); call unmerge() first");
  for (const auto& entry : adapters_) {
    if (!entry.trainable_copy) initialize_adapter(entry.name, entry.options);
  }
}

template <typename Base>
std::shared_ptr<torch::nn::Module> LoRALinearImpl<Base>::clone(const c10::optional<torch::Device>& device) const {
  auto copy = torch::nn::Cloneable<LoRALinearImpl<Base>>::clone(device);
  auto copied = copy->named_parameters();
  for (const auto& parameter : this->named_parameters()) {
    copied[parameter.key()].requires_grad_(parameter.value().requires_grad());
  }
  // reset() cleared the merge state, but the copied weights are merged as ours are.
  auto& twin = *std::dynamic_pointer_cast<LoRALinearImpl<Base>>(copy);
  auto own = [&](const at::Tensor& tensor) { return device ? tensor.to(*device) : tensor.clone(); };
  twin.merged_ = merged_;
  for (const auto& [name, norm] : dora_merge_norms_) twin.dora_merge_norms_[name] = own(norm);
  for (const auto& [name, originals] : copy_merge_originals_) {
    for (const auto& original : originals) twin.copy_merge_originals_[name].push_back(own(original));
  }
  return copy;
}

template <typename Base>
void LoRALinearImpl<Base>::create_adapter(const std::string& name, const LoRAOptions& options) {
  const auto weight = base_weight();
  const auto dtype = options.adapter_dtype().value_or(weight.scalar_type());
  // Built as bias-free Linear layers, as PEFT does, so that a seeded generator draws the same
  // numbers in the same order as PEFT's `update_layer`.
  torch::nn::Linear A(torch::nn::LinearOptions(in_features(), options.r()).bias(false));
  torch::nn::Linear B(torch::nn::LinearOptions(options.r(), out_features()).bias(false));
  A->to(weight.device(), dtype);
  B->to(weight.device(), dtype);
  lora_A_->update({{name, A.ptr()}});
  lora_B_->update({{name, B.ptr()}});
  if (options.use_dora()) {
    detail::Magnitude magnitude(out_features());
    magnitude->to(weight.device(), dtype);
    lora_magnitude_vector_->update({{name, magnitude.ptr()}});
  }
  initialize_adapter(name, options);
}

template <typename Base>
void LoRALinearImpl<Base>::initialize_adapter(const std::string& name, const LoRAOptions& options) {
  torch::NoGradGuard no_grad;
  const auto A = lora_A(name);
  const auto B = lora_B(name);
  const auto spec = parse_init(options.init());
  switch (spec.kind) {
    case InitKind::kDefault:
      torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
      B.zero_();
      break;
    case InitKind::kGaussian:
      A.normal_(0.0, 1.0 / static_cast<double>(options.r()));
      B.zero_();
      break;
    case InitKind::kRandom:
      break;  // keep the Linear layers' own Kaiming-uniform draws, as PEFT does
    case InitKind::kPiSSA:
    case InitKind::kOLoRA: {
      auto weight = weight_out_in();
      const auto factors = spec.kind == InitKind::kPiSSA
                               ? init::pissa(weight, options.r(), options.scaling(), spec.niter)
                               : init::olora(weight, options.r(), options.scaling());
      A.copy_(factors.lora_A);
      B.copy_(factors.lora_B);
      weight.copy_(factors.residual);
      break;
    }
  }
  if (options.use_dora()) {
    const auto delta = functional::delta_weight(A, B, options.scaling());
    lora_magnitude_vector(name).copy_(functional::dora_weight_norm(weight_out_in(), delta));
  }
}

template <typename Base>
void LoRALinearImpl<Base>::check_new_adapter(const std::string& name) const {
  TORCH_CHECK(!name.empty() && name.find('.') == std::string::npos,
              "LoRALinear: adapter name must be non-empty and contain no '.' (got '", name, "')");
  TORCH_CHECK(!has_adapter(name), "LoRALinear: adapter '", name, "' already exists");
  TORCH_CHECK(merged_.empty(), "LoRALinear: cannot add adapter '", name, "' while merged (merged: ",
              detail::join(merged_), "); call unmerge() first");
  const auto dtype = base_weight().scalar_type();
  TORCH_CHECK(c10::isFloatingType(dtype), "LoRALinear: the base weight must be floating point (got ",
              c10::toString(dtype), ")");
}

template <typename Base>
void LoRALinearImpl<Base>::check_add_adapter(const std::string& name, const LoRAOptions& options) const {
  check_new_adapter(name);
  TORCH_CHECK(modules_to_save_->size() == 0, "LoRALinear: cannot add low-rank adapter '", name,
              "' to a layer that holds trainable copies (modules_to_save); a layer is adapted or saved, not both");
  options.validate();
  const auto kind = parse_init(options.init()).kind;
  if (kind == InitKind::kPiSSA || kind == InitKind::kOLoRA) {
    const auto limit = std::min(in_features(), out_features());
    TORCH_CHECK(options.r() <= limit, "LoRALinear: rank ", options.r(), " exceeds min(in_features, out_features) = ",
                limit, ", which init '", options.init(), "' cannot decompose");
  }
}

template <typename Base>
void LoRALinearImpl<Base>::check_add_trainable_copy(const std::string& name) const {
  check_new_adapter(name);
  TORCH_CHECK(lora_A_->size() == 0, "LoRALinear: cannot add trainable copy '", name,
              "' to a layer that holds low-rank adapters; a layer is adapted or saved, not both");
}

template <typename Base>
void LoRALinearImpl<Base>::add_adapter(const std::string& name, const LoRAOptions& options) {
  check_add_adapter(name, options);
  try {
    create_adapter(name, options);
  } catch (...) {
    drop_modules(name);  // leave the layer as it was
    throw;
  }
  adapters_.push_back({name, options, /*trainable_copy=*/false});
  if (active_.empty()) active_.push_back(name);
  update_requires_grad();
}

template <typename Base>
void LoRALinearImpl<Base>::add_trainable_copy(const std::string& name) {
  check_add_trainable_copy(name);
  auto copy = std::make_shared<Base>(base_options_);
  {
    torch::NoGradGuard no_grad;
    const auto source = base_layer_->named_parameters();
    for (auto& parameter : copy->named_parameters()) {
      parameter.value().set_data(source[parameter.key()].detach().clone());
    }
  }
  modules_to_save_->update({{name, copy}});
  adapters_.push_back({name, LoRAOptions(), /*trainable_copy=*/true});
  if (active_.empty()) active_.push_back(name);
  update_requires_grad();
}

template <typename Base>
bool LoRALinearImpl<Base>::is_trainable_copy(const std::string& name) const {
  return adapter(name).trainable_copy;
}

template <typename Base>
typename LoRALinearImpl<Base>::BaseHolder LoRALinearImpl<Base>::trainable_copy(const std::string& name) const {
  TORCH_CHECK(modules_to_save_->contains(name), "LoRALinear: adapter '", name, "' is not a trainable copy (adapters: ",
              detail::join(adapter_names()), ")");
  return BaseHolder(std::dynamic_pointer_cast<Base>((*modules_to_save_)[name]));
}

template <typename Base>
void LoRALinearImpl<Base>::delete_adapter(const std::string& name) {
  check_adapter(name, "delete");
  TORCH_CHECK(std::find(merged_.begin(), merged_.end(), name) == merged_.end(), "LoRALinear: cannot delete adapter '",
              name, "' while it is merged; call unmerge() first");
  drop_modules(name);
  adapters_.erase(std::find_if(adapters_.begin(), adapters_.end(), [&](const Adapter& item) { return item.name == name; }));
  active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
  if (active_.empty() && !adapters_.empty()) active_.push_back(adapters_.front().name);
  update_requires_grad();
}

template <typename Base>
void LoRALinearImpl<Base>::drop_modules(const std::string& name) {
  // ModuleDict::pop keeps the child registered, so rebuild each container without it.
  const auto without = [&](const torch::nn::ModuleDict& dict) {
    torch::nn::ModuleDict kept;
    for (const auto& item : *dict) {
      if (item.key() != name) kept->update({{item.key(), item.value()}});
    }
    return kept;
  };
  lora_A_ = this->replace_module("lora_A", without(lora_A_));
  lora_B_ = this->replace_module("lora_B", without(lora_B_));
  lora_magnitude_vector_ = this->replace_module("lora_magnitude_vector", without(lora_magnitude_vector_));
  modules_to_save_ = this->replace_module("modules_to_save", without(modules_to_save_));
}

template <typename Base>
std::vector<std::string> LoRALinearImpl<Base>::adapter_names() const {
  std::vector<std::string> names;
  names.reserve(adapters_.size());
  for (const auto& item : adapters_) names.push_back(item.name);
  return names;
}

template <typename Base>
bool LoRALinearImpl<Base>::has_adapter(const std::string& name) const {
  return std::any_of(adapters_.begin(), adapters_.end(), [&](const Adapter& item) { return item.name == name; });
}

template <typename Base>
const typename LoRALinearImpl<Base>::Adapter& LoRALinearImpl<Base>::adapter(const std::string& name) const {
  check_adapter(name, "read");
  return *std::find_if(adapters_.begin(), adapters_.end(), [&](const Adapter& item) { return item.name == name; });
}

template <typename Base>
const LoRAOptions& LoRALinearImpl<Base>::adapter_options(const std::string& name) const {
  return adapter(name).options;
}

template <typename Base>
void LoRALinearImpl<Base>::check_adapter(const std::string& name, const char* operation) const {
  TORCH_CHECK(has_adapter(name), "LoRALinear: cannot ", operation, " unknown adapter '", name,
              "' (adapters: ", detail::join(adapter_names()), ")");
}

template <typename Base>
void LoRALinearImpl<Base>::set_adapter(const std::string& name) {
  set_adapters({name});
}

template <typename Base>
void LoRALinearImpl<Base>::set_adapters(const std::vector<std::string>& names) {
  for (const auto& name : names) {
    check_adapter(name, "activate");
    TORCH_CHECK(std::count(names.begin(), names.end(), name) == 1, "LoRALinear: adapter '", name,
                "' is listed more than once in set_adapters");
  }
  const auto copies = std::count_if(names.begin(), names.end(), [&](const std::string& name) {
    return adapter(name).trainable_copy;
  });
  TORCH_CHECK(copies <= 1, "LoRALinear: only one trainable copy can be active at a time (got ", detail::join(names), ")");
  // A merged adapter that stops being active must leave the weight (PEFT unmerges too).
  const bool stale = std::any_of(merged_.begin(), merged_.end(), [&](const std::string& name) {
    return std::find(names.begin(), names.end(), name) == names.end();
  });
  if (stale) unmerge();
  active_ = names;
  update_requires_grad();
}

template <typename Base>
void LoRALinearImpl<Base>::update_requires_grad() {
  for (const auto& entry : adapters_) {
    const bool active = std::find(active_.begin(), active_.end(), entry.name) != active_.end();
    if (entry.trainable_copy) {
      for (auto& parameter : (*modules_to_save_)[entry.name]->parameters()) parameter.requires_grad_(active);
      continue;
    }
    lora_A(entry.name).requires_grad_(active);
    lora_B(entry.name).requires_grad_(active);
    if (entry.options.use_dora()) lora_magnitude_vector(entry.name).requires_grad_(active);
  }
}

template <typename Base>
void LoRALinearImpl<Base>::enable_adapters(bool enabled) {
  if (!enabled && merged()) unmerge();
  enabled_ = enabled;
}

template <typename Base>
const at::Tensor& LoRALinearImpl<Base>::lora_A(const std::string& name) const {
  if (!lora_A_->contains(name)) check_adapter(name, "read");
  return lora_A_->template at<torch::nn::LinearImpl>(name).weight;
}

template <typename Base>
const at::Tensor& LoRALinearImpl<Base>::lora_B(const std::string& name) const {
  if (!lora_B_->contains(name)) check_adapter(name, "read");
  return lora_B_->template at<torch::nn::LinearImpl>(name).weight;
}

template <typename Base>
const at::Tensor& LoRALinearImpl<Base>::lora_magnitude_vector(const std::string& name) const {
  TORCH_CHECK(lora_magnitude_vector_->contains(name), "LoRALinear: adapter '", name,
              "' has no lora_magnitude_vector (it is not a DoRA adapter)");
  return lora_magnitude_vector_->template at<detail::MagnitudeImpl>(name).weight;
}

template <typename Base>
at::Tensor LoRALinearImpl<Base>::weight_out_in() const {
  const auto& weight = Traits::weight(*base_layer_);
  return Traits::fan_in_fan_out ? weight.t() : weight;
}

template <typename Base>
at::Tensor LoRALinearImpl<Base>::delta_out_in(const std::string& name) const {
  return functional::delta_weight(lora_A(name), lora_B(name), adapter_options(name).scaling());
}

template <typename Base>
at::Tensor LoRALinearImpl<Base>::delta_weight(const std::string& name) const {
  const auto delta = delta_out_in(name);
  return Traits::fan_in_fan_out ? delta.t() : delta;
}

template <typename Base>
at::Tensor LoRALinearImpl<Base>::adapted_weight() const {
  const auto weight = weight_out_in();
  auto adapted = weight;
  if (enabled_) {
    for (const auto& name : active_) {
      if (std::find(merged_.begin(), merged_.end(), name) != merged_.end()) continue;
      const auto& entry = adapter(name);
      TORCH_CHECK(!entry.trainable_copy, "LoRALinear: adapted_weight is undefined while trainable copy '", name,
                  "' is active; use trainable_copy(\"", name, "\")");
      const auto delta = delta_out_in(name).to(weight.scalar_type());
      if (entry.options.use_dora()) {
        // y = base(x) + (g − 1)·(x Wᵀ) + g·(x ΔWᵀ), g = m / ‖W + ΔW‖ held constant.
        const auto& magnitude = lora_magnitude_vector(name);
        const auto norm = functional::dora_weight_norm(weight, delta.detach());
        const auto g = (magnitude / norm.to(magnitude.scalar_type())).to(weight.scalar_type()).unsqueeze(1);
        adapted = adapted + (g - 1) * weight + g * delta;
      } else {
        adapted = adapted + delta;
      }
    }
  }
  return Traits::fan_in_fan_out ? adapted.t() : adapted;
}

template <typename Base>
at::Tensor LoRALinearImpl<Base>::forward(const at::Tensor& input) {
  const int64_t in = in_features();
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == in, "LoRALinear: expected an input with ", in,
              " features in its last dimension (got input of shape ", input.sizes(), ")");
  const auto is_pending = [this](const std::string& name) {
    return std::find(merged_.begin(), merged_.end(), name) == merged_.end();
  };
  if (!enabled_ || std::none_of(active_.begin(), active_.end(), is_pending)) {
    return Traits::forward(*base_layer_, input);
  }
  for (const auto& name : active_) {  // a trainable copy replaces the base layer
    if (modules_to_save_->contains(name)) return Traits::forward(modules_to_save_->template at<Base>(name), input);
  }

  auto output_shape = input.sizes().vec();
  output_shape.back() = out_features();
  const auto x = input.reshape({-1, in});
  const auto base_output = Traits::forward(*base_layer_, x);
  const bool dropout_active = this->is_training();
  auto result = base_output;

  // DoRA adapters first: they read the pristine base output, which the plain adapters below
  // then update in place.
  for (const bool dora_pass : {true, false}) {
    for (const auto& name : active_) {
      const auto& options = adapter_options(name);
      if (options.use_dora() != dora_pass || !is_pending(name)) continue;
      const auto& A = lora_A(name);
      const auto& B = lora_B(name);
      const double s = options.scaling();
      const bool dropped = dropout_active && options.dropout() > 0.0;
      auto xa = x.scalar_type() == A.scalar_type() ? x : x.to(A.scalar_type());
      if (dropped) xa = at::dropout(xa, options.dropout(), /*train=*/true);
      const auto h = at::mm(xa, A.t());

      if (dora_pass) {
        const auto weight = weight_out_in();
        const auto norm = functional::dora_weight_norm(weight, functional::delta_weight(A.detach(), B.detach(), s));
        const auto& magnitude = lora_magnitude_vector(name);
        const auto scale = magnitude / norm.to(magnitude.scalar_type());  // m / ‖W + s·B·A‖, norm constant
        // W·x without bias: derived from the base output when no dropout altered x (PEFT does the same).
        at::Tensor base_term;
        if (dropped) {
          base_term = at::mm(xa, weight.to(xa.scalar_type()).t());
        } else {
          const auto bias = base_bias();
          base_term = (bias.defined() ? base_output - bias : base_output).to(xa.scalar_type());
        }
        const auto term = (scale - 1) * base_term + scale * at::mm(h, B.t()) * s;
        result = result.scalar_type() == term.scalar_type() ? result + term
                                                            : (result + term).to(result.scalar_type());
      } else if (result.scalar_type() == h.scalar_type()) {
        result.addmm_(h, B.t(), /*beta=*/1, /*alpha=*/s);
      } else {
        const auto dtype = at::promote_types(result.scalar_type(), h.scalar_type());
        result = result.to(dtype).addmm_(h.to(dtype), B.t().to(dtype), 1, s).to(base_output.scalar_type());
      }
    }
  }
  return result.view(output_shape);
}

template <typename Base>
void LoRALinearImpl<Base>::merge(const std::vector<std::string>& adapter_names, bool safe_merge) {
  TORCH_CHECK(enabled_, "LoRALinear: cannot merge while adapters are disabled; call enable_adapters(true) first");
  const auto names = adapter_names.empty() ? active_ : adapter_names;
  for (const auto& name : names) check_adapter(name, "merge");
  const auto merged_before = merged_.size();
  try {
    merge_each(names, safe_merge);
  } catch (...) {
    while (merged_.size() > merged_before) unmerge_last();  // all or nothing
    throw;
  }
}

template <typename Base>
void LoRALinearImpl<Base>::merge_each(const std::vector<std::string>& names, bool safe_merge) {
  torch::NoGradGuard no_grad;
  auto weight = weight_out_in();
  for (const auto& name : names) {
    if (std::find(merged_.begin(), merged_.end(), name) != merged_.end()) continue;  // already in W
    if (adapter(name).trainable_copy) {
      merge_trainable_copy(name, safe_merge);
      continue;
    }
    const auto& options = adapter_options(name);
    const auto delta = delta_out_in(name);
    at::Tensor merged_weight;
    at::Tensor norm;
    if (options.use_dora()) {
      norm = functional::dora_weight_norm(weight, delta);
      const auto& magnitude = lora_magnitude_vector(name);
      merged_weight = (magnitude / norm).view({-1, 1}) * (weight + delta.to(weight.scalar_type()));
    } else if (safe_merge) {
      merged_weight = weight + delta.to(weight.scalar_type());
    }
    if (safe_merge) {
      TORCH_CHECK(at::isfinite(merged_weight).all().item<bool>(), "LoRALinear: merging adapter '", name,
                  "' would write non-finite values (NaN or Inf) into the base weight; the layer is left unchanged");
    }
    if (merged_weight.defined()) {
      weight.copy_(merged_weight);
    } else {
      weight.add_(delta.to(weight.scalar_type()));
    }
    if (norm.defined()) dora_merge_norms_[name] = norm;
    merged_.push_back(name);
  }
}

template <typename Base>
void LoRALinearImpl<Base>::unmerge() {
  while (!merged_.empty()) unmerge_last();
}

template <typename Base>
void LoRALinearImpl<Base>::unmerge_last() {
  torch::NoGradGuard no_grad;
  auto weight = weight_out_in();
  const auto name = merged_.back();
  if (adapter(name).trainable_copy) {
    auto originals = copy_merge_originals_.at(name).begin();
    for (auto& parameter : base_layer_->parameters()) parameter.copy_(*originals++);
    copy_merge_originals_.erase(name);
    merged_.pop_back();
    return;
  }
  const auto delta = delta_out_in(name).to(weight.scalar_type());
  if (adapter_options(name).use_dora()) {
    const auto& magnitude = lora_magnitude_vector(name);
    const auto factor = (magnitude / dora_merge_norms_.at(name)).view({-1, 1});
    weight.copy_(weight / factor - delta);
    dora_merge_norms_.erase(name);
  } else {
    weight.sub_(delta);
  }
  merged_.pop_back();
}

template <typename Base>
void LoRALinearImpl<Base>::merge_trainable_copy(const std::string& name, bool safe_merge) {
  const std::vector<at::Tensor> copy = modules_to_save_->template at<Base>(name).parameters();
  if (safe_merge) {
    for (const at::Tensor& parameter : copy) {
      TORCH_CHECK(at::isfinite(parameter).all().item<bool>(), "LoRALinear: merging trainable copy '", name,
                  "' would write non-finite values (NaN or Inf) into the base layer; the layer is left unchanged");
    }
  }
  std::vector<at::Tensor> base = base_layer_->parameters();
  std::vector<at::Tensor> originals;
  for (size_t i = 0; i < base.size(); ++i) {
    originals.push_back(base[i].detach().clone());
    base[i].copy_(copy[i]);
  }
  copy_merge_originals_[name] = std::move(originals);
  merged_.push_back(name);
}

template <typename Base>
void LoRALinearImpl<Base>::forget_adapters() {
  for (const auto& entry : adapters_) drop_modules(entry.name);
  adapters_.clear();
  active_.clear();
  merged_.clear();
  dora_merge_norms_.clear();
  copy_merge_originals_.clear();
  enabled_ = true;
}

template <typename Base>
void LoRALinearImpl<Base>::merge_and_unload(bool safe_merge) {
  if (enabled_) merge({}, safe_merge);
  forget_adapters();
}

template <typename Base>
void LoRALinearImpl<Base>::unload() {
  unmerge();
  forget_adapters();
}

template <typename Base>
std::vector<std::pair<std::string, at::Tensor>> LoRALinearImpl<Base>::adapter_state(const std::string& name) const {
  std::vector<std::pair<std::string, at::Tensor>> state;
  const auto& entry = adapter(name);
  if (entry.trainable_copy) {
    for (const auto& item : (*modules_to_save_)[name]->named_parameters()) state.emplace_back(item.key(), item.value());
    return state;
  }
  state.emplace_back("lora_A.weight", lora_A(name));
  state.emplace_back("lora_B.weight", lora_B(name));
  if (entry.options.use_dora()) state.emplace_back("lora_magnitude_vector", lora_magnitude_vector(name));
  return state;
}

template <typename Base>
void LoRALinearImpl<Base>::pretty_print(std::ostream& stream) const {
  stream << "lora::LoRALinear<" << Traits::name << ">(in_features=" << in_features()
         << ", out_features=" << out_features() << ", bias=" << (Traits::has_bias(base_options_) ? "true" : "false")
         << ", adapters=[";
  for (size_t i = 0; i < adapters_.size(); ++i) {
    const auto& [name, options, copy] = adapters_[i];
    stream << (i ? ", " : "") << name;
    if (copy) {
      stream << "(trainable copy)";
      continue;
    }
    stream << "(r=" << options.r() << ", alpha=" << options.alpha();
    if (options.dropout() > 0) stream << ", dropout=" << options.dropout();
    if (options.use_rslora()) stream << ", rslora";
    if (options.use_dora()) stream << ", dora";
    if (options.init() != "default") stream << ", init=" << options.init();
    stream << ")";
  }
  stream << "], active=[" << detail::join(active_) << "]";
  if (!merged_.empty()) stream << ", merged=[" << detail::join(merged_) << "]";
  if (!enabled_) stream << ", disabled";
  stream << ")";
}

}  // namespace lora
