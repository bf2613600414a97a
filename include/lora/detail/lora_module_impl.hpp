#pragma once

// Inline definitions of LoRAModuleImpl<Kind>; included by <lora/lora_module.hpp>.

#include <algorithm>
#include <cmath>
#include <sstream>
#include <type_traits>

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <lora/detail/strings.hpp>
#include <lora/dropout.hpp>
#include <lora/functional.hpp>
#include <lora/init.hpp>

namespace lora {

inline void check_adapter_options(const char* who, const std::string& name, const LoRAOptions& options,
                                  int64_t columns, int64_t out, c10::ScalarType dtype, bool decomposable) {
  TORCH_CHECK(!name.empty() && name.find('.') == std::string::npos, who,
              ": adapter name must be non-empty and contain no '.' (got '", name, "')");
  TORCH_CHECK(c10::isFloatingType(dtype), who, ": the base weight must be floating point (got ", c10::toString(dtype),
              ")");
  options.validate();
  const auto kind = parse_init(options.init()).kind;
  if (kind == InitKind::kPiSSA || kind == InitKind::kOLoRA) {
    TORCH_CHECK(decomposable, who, ": init '", options.init(),
                "' is defined for Linear layers only (PEFT's PiSSA/OLoRA); use 'default', 'gaussian' or 'false'");
    const auto limit = std::min(columns, out);
    TORCH_CHECK(options.r() <= limit, who, ": rank ", options.r(), " exceeds min(in_features, out_features) = ", limit,
                ", which init '", options.init(), "' cannot decompose");
  }
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_not_routed(const char* operation) const {
  TORCH_CHECK(routing_ == nullptr, Kind::layer_name, ": cannot ", operation,
              " while a mixed-adapter batch is routed through the layer (a lora::MixedBatch lives)");
}

template <typename Kind>
LoRAModuleImpl<Kind>::LoRAModuleImpl(const BaseOptions& base_options) : base_options_(base_options) {
  build(BaseHolder(std::make_shared<BaseModule>(base_options_)));
}

template <typename Kind>
LoRAModuleImpl<Kind>::LoRAModuleImpl(const BaseOptions& base_options, const LoRAOptions& options,
                                     const std::string& adapter)
    : LoRAModuleImpl(base_options) {
  add_adapter(adapter, options);
}

template <typename Kind>
LoRAModuleImpl<Kind>::LoRAModuleImpl(const BaseHolder& base) : base_options_(checked_options(base)) {
  build(base);
}

template <typename Kind>
typename LoRAModuleImpl<Kind>::BaseOptions LoRAModuleImpl<Kind>::checked_options(const BaseHolder& base) {
  TORCH_CHECK(!base.is_empty(), Kind::layer_name, ": the base layer is empty (nullptr)");
  Kind::check_base(Kind::options(*base));
  return Kind::options(*base);
}

template <typename Kind>
LoRAModuleImpl<Kind>::LoRAModuleImpl(const BaseHolder& base, const LoRAOptions& options, const std::string& adapter)
    : LoRAModuleImpl(base) {
  add_adapter(adapter, options);
}

template <typename Kind>
void LoRAModuleImpl<Kind>::build(BaseHolder base) {
  base_layer_ = this->register_module("base_layer", std::move(base));
  for (auto& parameter : base_layer_->parameters()) parameter.requires_grad_(false);
  lora_A_ = this->register_module(Kind::a_key, FactorHolder());
  lora_B_ = this->register_module(Kind::b_key, FactorHolder());
  lora_magnitude_vector_ = this->register_module("lora_magnitude_vector", torch::nn::ModuleDict());
}

template <typename Kind>
void LoRAModuleImpl<Kind>::reset() {
  int8_base_ = nullptr;  // the fresh base is fp32
  merged_.clear();  // fresh weights hold no merge
  dora_merge_norms_.clear();
  build(BaseHolder(std::make_shared<BaseModule>(base_options_)));
  for (const auto& entry : adapters_) create_adapter(entry.name, entry.options);
  update_requires_grad();
}

template <typename Kind>
void LoRAModuleImpl<Kind>::reset_parameters() {
  TORCH_CHECK(merged_.empty(), Kind::layer_name, ": cannot re-initialise adapters while merged (merged: ",
              detail::join(merged_), "); call unmerge() first");
  for (const auto& entry : adapters_) initialize_adapter(entry.name, entry.options);
}

template <typename Kind>
std::shared_ptr<torch::nn::Module> LoRAModuleImpl<Kind>::clone(const c10::optional<torch::Device>& device) const {
  check_fp32_base("clone the layer");
  auto copy = torch::nn::Cloneable<LoRAModuleImpl<Kind>>::clone(device);
  auto copied = copy->named_parameters();
  for (const auto& parameter : this->named_parameters()) {
    copied[parameter.key()].requires_grad_(parameter.value().requires_grad());
  }
  // reset() cleared the merge state, but the copied weights are merged as ours are.
  auto& twin = *std::dynamic_pointer_cast<LoRAModuleImpl<Kind>>(copy);
  twin.merged_ = merged_;
  twin.routing_ = nullptr;  // a routing belongs to one batch of this model
  twin.routed_base_.clear();
  for (const auto& [name, norm] : dora_merge_norms_) twin.dora_merge_norms_[name] = device ? norm.to(*device) : norm.clone();
  return copy;
}

template <typename Kind>
void LoRAModuleImpl<Kind>::create_adapter(const std::string& name, const LoRAOptions& options) {
  const auto weight = base_weight();
  const auto dtype = options.adapter_dtype().value_or(weight.scalar_type());
  if constexpr (kParameterFactors) {
    // Drawn as PEFT's update_layer draws them (randn A, then randn B), so that a seeded
    // generator gives the same numbers for init "false".
    const auto [a_shape, b_shape] = Kind::factor_shapes(base_options_, options.r());
    const auto tensor_options = at::TensorOptions().dtype(dtype).device(weight.device());
    lora_A_->insert(name, at::randn(a_shape, at::TensorOptions().dtype(at::kFloat)).to(tensor_options));
    lora_B_->insert(name, at::randn(b_shape, at::TensorOptions().dtype(at::kFloat)).to(tensor_options));
  } else {
    // Built as bias-free modules, as PEFT does, so that a seeded generator draws the same
    // numbers in the same order as PEFT's `update_layer`.
    auto [A, B] = Kind::make_factors(base_options_, options.r());
    A->to(weight.device(), dtype);
    B->to(weight.device(), dtype);
    lora_A_->update({{name, A}});
    lora_B_->update({{name, B}});
  }
  if (options.use_dora()) {
    detail::Magnitude magnitude(Kind::magnitude_shape(base_options_));
    magnitude->to(weight.device(), dtype);
    lora_magnitude_vector_->update({{name, magnitude.ptr()}});
  }
  initialize_adapter(name, options);
}

template <typename Kind>
void LoRAModuleImpl<Kind>::initialize_adapter(const std::string& name, const LoRAOptions& options) {
  torch::NoGradGuard no_grad;
  const auto A = lora_A(name);
  const auto B = lora_B(name);
  const auto spec = parse_init(options.init());
  switch (spec.kind) {
    case InitKind::kDefault:
    case InitKind::kGaussian:
    case InitKind::kRandom:
      Kind::initialize(spec.kind, A, B, options.r());
      break;
    case InitKind::kPiSSA:
    case InitKind::kOLoRA: {
      auto weight = weight_matrix();
      const auto factors = spec.kind == InitKind::kPiSSA
                               ? init::pissa(weight, options.r(), options.scaling(), spec.niter)
                               : init::olora(weight, options.r(), options.scaling());
      Kind::factor_matrix(A).copy_(factors.lora_A);
      Kind::factor_matrix(B).copy_(factors.lora_B);
      weight.copy_(factors.residual);
      break;
    }
  }
  if (options.use_dora()) {
    const auto delta = functional::delta_weight(Kind::factor_matrix(A), Kind::factor_matrix(B), options.scaling());
    const auto norm = functional::dora_weight_norm(weight_matrix(), delta);
    const auto& magnitude = lora_magnitude_vector(name);
    magnitude.copy_(norm.view(magnitude.sizes()));
  }
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_add_adapter(const std::string& name, const LoRAOptions& options) const {
  check_not_routed("add an adapter");
  TORCH_CHECK(!has_adapter(name), Kind::layer_name, ": adapter '", name, "' already exists");
  TORCH_CHECK(merged_.empty(), Kind::layer_name, ": cannot add adapter '", name, "' while merged (merged: ",
              detail::join(merged_), "); call unmerge() first");
  if (int8_base_) {
    const auto init = parse_init(options.init()).kind;
    TORCH_CHECK(!options.use_dora() && init != InitKind::kPiSSA && init != InitKind::kOLoRA, Kind::layer_name,
                ": adapter '", name, "' ", options.use_dora() ? "uses DoRA" : "has init '" + options.init() + "'",
                ", which needs the fp32 base weight; this layer's base is int8 (lora::quantize_base)");
    check_adapter_options(Kind::layer_name, name, options, int8_base_->in_features(), int8_base_->out_features(),
                          at::kFloat, Kind::decomposable);
    return;
  }
  const auto weight = weight_matrix();
  check_adapter_options(Kind::layer_name, name, options, weight.size(1), weight.size(0), weight.scalar_type(),
                        Kind::decomposable);
}

template <typename Kind>
void LoRAModuleImpl<Kind>::add_adapter(const std::string& name, const LoRAOptions& options,
                                       std::shared_ptr<const LoraConfig> config) {
  check_add_adapter(name, options);
  try {
    create_adapter(name, options);
  } catch (...) {
    drop_modules(name);  // leave the layer as it was
    throw;
  }
  adapters_.push_back({name, options, std::move(config), true});
  if (active_.empty()) active_.push_back(name);
  update_requires_grad();
}

template <typename Kind>
std::shared_ptr<const LoraConfig> LoRAModuleImpl<Kind>::adapter_config(const std::string& name) const {
  return adapter(name).config;
}

template <typename Kind>
void LoRAModuleImpl<Kind>::set_trainable(const std::string& name, bool trainable) {
  check_not_routed("freeze or unfreeze an adapter");
  check_adapter(name, "freeze");
  for (auto& entry : adapters_) {
    if (entry.name == name) entry.trainable = trainable;
  }
  update_requires_grad();
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_delete_adapter(const std::string& name) const {
  check_not_routed("delete an adapter");
  check_adapter(name, "delete");
  TORCH_CHECK(!is_merged(name), Kind::layer_name, ": cannot delete adapter '", name,
              "' while it is merged; call unmerge() first");
}

template <typename Kind>
void LoRAModuleImpl<Kind>::delete_adapter(const std::string& name) {
  check_delete_adapter(name);
  drop_modules(name);
  adapters_.erase(std::find_if(adapters_.begin(), adapters_.end(), [&](const Adapter& item) { return item.name == name; }));
  active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
  if (active_.empty() && !adapters_.empty()) active_.push_back(adapters_.front().name);
  update_requires_grad();
}

template <typename Kind>
void LoRAModuleImpl<Kind>::drop_modules(const std::string& name) {
  rebuild_containers(name, "");
}

template <typename Kind>
void LoRAModuleImpl<Kind>::rebuild_containers(const std::string& from, const std::string& to) {
  // ModuleDict::pop keeps the child registered, so rebuild each container.
  const auto key_for = [&](const std::string& key) { return key == from ? to : key; };
  const auto rebuilt = [&](const torch::nn::ModuleDict& dict) {
    torch::nn::ModuleDict kept;
    for (const auto& item : *dict) {
      if (!key_for(item.key()).empty()) kept->update({{key_for(item.key()), item.value()}});
    }
    return kept;
  };
  if constexpr (kParameterFactors) {
    const auto rebuilt_table = [&](const detail::FactorTable& table) {
      detail::FactorTable kept;
      for (const auto& key : table->names()) {
        if (!key_for(key).empty()) kept->insert(key_for(key), table->get(key));
      }
      return kept;
    };
    lora_A_ = this->replace_module(Kind::a_key, rebuilt_table(lora_A_));
    lora_B_ = this->replace_module(Kind::b_key, rebuilt_table(lora_B_));
  } else {
    lora_A_ = this->replace_module(Kind::a_key, rebuilt(lora_A_));
    lora_B_ = this->replace_module(Kind::b_key, rebuilt(lora_B_));
  }
  lora_magnitude_vector_ = this->replace_module("lora_magnitude_vector", rebuilt(lora_magnitude_vector_));
}

template <typename Kind>
void LoRAModuleImpl<Kind>::set_adapter_config(const std::string& name, std::shared_ptr<const LoraConfig> config) {
  check_adapter(name, "configure");
  for (auto& entry : adapters_) {
    if (entry.name == name) entry.config = std::move(config);
  }
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_rename_adapter(const std::string& from, const std::string& to) const {
  check_not_routed("rename an adapter");
  check_adapter(from, "rename");
  TORCH_CHECK(!to.empty() && to.find('.') == std::string::npos, Kind::layer_name,
              ": adapter name must be non-empty and contain no '.' (got '", to, "')");
  TORCH_CHECK(to == from || !has_adapter(to), Kind::layer_name, ": cannot rename adapter '", from, "' to '", to,
              "', which exists already");
}

template <typename Kind>
void LoRAModuleImpl<Kind>::rename_adapter(const std::string& from, const std::string& to) {
  check_rename_adapter(from, to);
  if (from == to) return;
  rebuild_containers(from, to);
  for (auto& entry : adapters_) {
    if (entry.name == from) entry.name = to;
  }
  for (auto* names : {&active_, &merged_}) std::replace(names->begin(), names->end(), from, to);
  const auto norm = dora_merge_norms_.find(from);
  if (norm != dora_merge_norms_.end()) {
    dora_merge_norms_[to] = norm->second;
    dora_merge_norms_.erase(from);
  }
  update_requires_grad();
}

template <typename Kind>
std::vector<std::string> LoRAModuleImpl<Kind>::adapter_names() const {
  std::vector<std::string> names;
  names.reserve(adapters_.size());
  for (const auto& item : adapters_) names.push_back(item.name);
  return names;
}

template <typename Kind>
bool LoRAModuleImpl<Kind>::has_adapter(const std::string& name) const {
  return std::any_of(adapters_.begin(), adapters_.end(), [&](const Adapter& item) { return item.name == name; });
}

template <typename Kind>
const typename LoRAModuleImpl<Kind>::Adapter& LoRAModuleImpl<Kind>::adapter(const std::string& name) const {
  check_adapter(name, "read");
  return *std::find_if(adapters_.begin(), adapters_.end(), [&](const Adapter& item) { return item.name == name; });
}

template <typename Kind>
const LoRAOptions& LoRAModuleImpl<Kind>::adapter_options(const std::string& name) const {
  return adapter(name).options;
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_adapter(const std::string& name, const char* operation) const {
  TORCH_CHECK(has_adapter(name), Kind::layer_name, ": cannot ", operation, " unknown adapter '", name,
              "' (adapters: ", detail::join(adapter_names()), ")");
}

template <typename Kind>
bool LoRAModuleImpl<Kind>::is_merged(const std::string& name) const {
  return std::find(merged_.begin(), merged_.end(), name) != merged_.end();
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_set_adapters(const std::vector<std::string>& names) const {
  check_not_routed("change the active adapters");
  for (const auto& name : names) {
    check_adapter(name, "activate");
    TORCH_CHECK(std::count(names.begin(), names.end(), name) == 1, Kind::layer_name, ": adapter '", name,
                "' is listed more than once in set_adapters");
  }
}

template <typename Kind>
void LoRAModuleImpl<Kind>::set_adapters(const std::vector<std::string>& names) {
  check_set_adapters(names);
  // A merged adapter that stops being active must leave the weight (PEFT unmerges too).
  const bool stale = std::any_of(merged_.begin(), merged_.end(), [&](const std::string& name) {
    return std::find(names.begin(), names.end(), name) == names.end();
  });
  if (stale) unmerge();
  active_ = names;
  update_requires_grad();
}

template <typename Kind>
void LoRAModuleImpl<Kind>::update_requires_grad() {
  for (const auto& entry : adapters_) {
    const bool active =
        entry.trainable && std::find(active_.begin(), active_.end(), entry.name) != active_.end();
    lora_A(entry.name).requires_grad_(active);
    lora_B(entry.name).requires_grad_(active);
    if (entry.options.use_dora()) lora_magnitude_vector(entry.name).requires_grad_(active);
  }
}

template <typename Kind>
void LoRAModuleImpl<Kind>::enable_adapters(bool enabled) {
  check_not_routed(enabled ? "enable adapters" : "disable adapters");
  if (!enabled && merged()) unmerge();
  enabled_ = enabled;
}

template <typename Kind>
const at::Tensor& LoRAModuleImpl<Kind>::factor(const FactorHolder& holder, const std::string& name) const {
  if (!holder->contains(name)) check_adapter(name, "read");
  if constexpr (kParameterFactors) {
    return holder->get(name);
  } else {
    return holder->template at<typename Kind::Factor>(name).weight;
  }
}

template <typename Kind>
const at::Tensor& LoRAModuleImpl<Kind>::lora_A(const std::string& name) const {
  return factor(lora_A_, name);
}

template <typename Kind>
const at::Tensor& LoRAModuleImpl<Kind>::lora_B(const std::string& name) const {
  return factor(lora_B_, name);
}

template <typename Kind>
const at::Tensor& LoRAModuleImpl<Kind>::lora_magnitude_vector(const std::string& name) const {
  TORCH_CHECK(lora_magnitude_vector_->contains(name), Kind::layer_name, ": adapter '", name,
              "' has no lora_magnitude_vector (it is not a DoRA adapter)");
  return lora_magnitude_vector_->template at<detail::MagnitudeImpl>(name).weight;
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::magnitude_vector(const std::string& name) const {
  return lora_magnitude_vector(name).view({-1});
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::weight_matrix() const {
  check_fp32_base("read the base weight");
  return Kind::matrix(Kind::weight(*base_layer_));
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::delta_matrix(const std::string& name) const {
  return functional::delta_weight(Kind::factor_matrix(lora_A(name)), Kind::factor_matrix(lora_B(name)),
                                  adapter_options(name).scaling());
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::delta_weight(const std::string& name) const {
  return Kind::unmatrix(delta_matrix(name), base_weight());
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::adapted_weight() const {
  const auto weight = weight_matrix();
  auto adapted = weight;
  if (enabled_) {
    for (const auto& name : active_) {
      if (is_merged(name)) continue;
      const auto& entry = adapter(name);
      const auto delta = delta_matrix(name).to(weight.scalar_type());
      if (entry.options.use_dora()) {
        // y = base(x) + (g − 1)·(x Wᵀ) + g·(x ΔWᵀ), g = m / ‖W + ΔW‖ held constant.
        const auto magnitude = magnitude_vector(name);
        const auto norm = functional::dora_weight_norm(weight, delta.detach());
        const auto g = (magnitude / norm.to(magnitude.scalar_type())).to(weight.scalar_type()).unsqueeze(1);
        adapted = adapted + (g - 1) * weight + g * delta;
      } else {
        adapted = adapted + delta;
      }
    }
  }
  return Kind::unmatrix(adapted, base_weight());
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::forward(const at::Tensor& input) {
  Kind::check_input(base_options_, input);
  if (routing_) return forward_routed(input);
  const auto is_pending = [this](const std::string& name) { return !is_merged(name); };
  if (!enabled_ || std::none_of(active_.begin(), active_.end(), is_pending)) {
    return base_forward(input);
  }
  const auto x = Kind::flatten(base_options_, input);
  const auto base_output = base_forward(x);
  const bool dropout_active = Kind::uses_dropout && this->is_training();
  auto result = base_output;

  // DoRA adapters first: they read the pristine base output, which the plain adapters below
  // then update in place.
  for (const auto& name : active_) {
    if (!adapter_options(name).use_dora() || !is_pending(name)) continue;
    result = add_term(result, adapter_term(name, x, base_output, dropout_active));
  }
  for (const auto& name : active_) {
    const auto& options = adapter_options(name);
    if (options.use_dora() || !is_pending(name)) continue;
    const auto& A = lora_A(name);
    auto xa = Kind::cast_input(x, A.scalar_type());
    if (dropout_active && options.dropout() > 0.0) xa = lora::dropout(xa, options.dropout(), /*training=*/true);
    result = Kind::accumulate(result, Kind::down(*base_layer_, xa, A), lora_B(name), options.scaling());
  }
  return Kind::unflatten(result, input);
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::add_term(const at::Tensor& result, const at::Tensor& term) {
  return result.scalar_type() == term.scalar_type() ? result + term : (result + term).to(result.scalar_type());
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::adapter_term(const std::string& name, const at::Tensor& x,
                                              const at::Tensor& base_output, bool dropout_active) const {
  const auto& options = adapter_options(name);
  const auto& A = lora_A(name);
  const auto& B = lora_B(name);
  const double s = options.scaling();
  const bool dropped = dropout_active && options.dropout() > 0.0;
  auto xa = Kind::cast_input(x, A.scalar_type());
  if (dropped) xa = lora::dropout(xa, options.dropout(), /*training=*/true);
  const auto h = Kind::down(*base_layer_, xa, A);
  if (!options.use_dora()) return Kind::up(h, B) * s;

  const auto delta = functional::delta_weight(Kind::factor_matrix(A).detach(), Kind::factor_matrix(B).detach(), s);
  const auto norm = functional::dora_weight_norm(weight_matrix(), delta);
  const auto magnitude = magnitude_vector(name);
  // m / ‖W + s·B·A‖, the norm constant, shaped to broadcast on the output.
  const auto scale = Kind::channel(magnitude / norm.to(magnitude.scalar_type()));
  // W·x without bias: derived from the base output when no dropout altered x (PEFT does the same).
  at::Tensor base_term;
  if (dropped) {
    base_term = Kind::base_without_bias(*base_layer_, xa);
  } else {
    const auto bias = base_bias();
    base_term = (bias.defined() ? base_output - Kind::channel(bias) : base_output).to(h.scalar_type());
  }
  return (scale - 1) * base_term + scale * Kind::up(h, B) * s;
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::forward_routed(const at::Tensor& input) {
  const auto& routing = *routing_;
  const bool batched = input.dim() >= 2;
  TORCH_CHECK(batched ? input.size(0) == routing.batch_size() : routing.batch_size() == 1, Kind::layer_name,
              ": a mixed-adapter batch of ", routing.batch_size(), " examples needs inputs whose first dimension is "
              "the batch (got input of shape ", input.sizes(), ")");
  const auto x = Kind::flatten(base_options_, input);
  const int64_t rows = x.size(0);
  auto result = base_forward(x);
  const auto& live_weight = base_weight();
  for (size_t group = 0; group < routed_base_.size(); ++group) {
    const auto& values = routed_base_[group];
    if (!values.weight.defined() || values.weight.is_same(live_weight)) continue;
    const auto& group_rows = routing.rows(group, rows, x.device());
    if constexpr (Kind::kind == LayerKind::kLinear) {
      result.index_copy_(0, group_rows, at::linear(x.index_select(0, group_rows), Kind::matrix(values.weight), values.bias));
    }
  }
  const bool dropout_active = Kind::uses_dropout && this->is_training();
  const auto& groups = routing.groups();
  for (size_t group = 0; group < groups.size(); ++group) {
    if (groups[group].empty() || !has_adapter(groups[group])) continue;
    const auto& group_rows = routing.rows(group, rows, x.device());
    const auto term = adapter_term(groups[group], x.index_select(0, group_rows), result.index_select(0, group_rows),
                                   dropout_active);
    result.index_add_(0, group_rows, term.scalar_type() == result.scalar_type() ? term : term.to(result.scalar_type()));
  }
  return Kind::unflatten(result, input);
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_route(bool with_base_values) const {
  TORCH_CHECK(routing_ == nullptr, Kind::layer_name, ": a mixed-adapter batch is routed through this layer already");
  TORCH_CHECK(merged_.empty(), Kind::layer_name, ": cannot route a mixed-adapter batch while adapters are merged (merged: ",
              detail::join(merged_), "); call unmerge() first");
  TORCH_CHECK(enabled_, Kind::layer_name, ": cannot route a mixed-adapter batch while adapters are disabled");
  TORCH_CHECK(!with_base_values || Kind::kind == LayerKind::kLinear, Kind::layer_name,
              ": per-adapter base values (a saved module's copies) are routed through Linear layers only");
}

template <typename Kind>
void LoRAModuleImpl<Kind>::route(std::shared_ptr<const detail::Routing> routing,
                                 std::vector<detail::RoutedBase> base_values) {
  if (routing == nullptr) {
    routing_ = nullptr;
    routed_base_.clear();
    update_requires_grad();
    return;
  }
  const bool with_base_values = std::any_of(base_values.begin(), base_values.end(),
                                            [](const detail::RoutedBase& values) { return values.weight.defined(); });
  check_route(with_base_values);
  TORCH_CHECK(base_values.empty() || base_values.size() == routing->groups().size(), Kind::layer_name, ": ",
              base_values.size(), " base values for ", routing->groups().size(), " routing groups");
  const auto& groups = routing->groups();
  for (const auto& entry : adapters_) {
    const bool routed = entry.trainable && std::find(groups.begin(), groups.end(), entry.name) != groups.end();
    lora_A(entry.name).requires_grad_(routed);
    lora_B(entry.name).requires_grad_(routed);
    if (entry.options.use_dora()) lora_magnitude_vector(entry.name).requires_grad_(routed);
  }
  routing_ = std::move(routing);
  routed_base_ = std::move(base_values);
}

template <typename Kind>
at::Tensor LoRAModuleImpl<Kind>::base_forward(const at::Tensor& x) {
  if (int8_base_) return detail::int8_linear(x, int8_base_, Kind::bias(*base_layer_));
  return Kind::base_forward(*base_layer_, x);
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_fp32_base(const char* operation) const {
  TORCH_CHECK(!int8_base_, Kind::layer_name, ": cannot ", operation,
              ": the base weight is stored int8 (lora::quantize_base) and its fp32 values are gone");
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_quantize_base() const {
  constexpr bool linear = std::is_same_v<typename Kind::BaseModule, torch::nn::LinearImpl>;
  TORCH_CHECK(linear, Kind::layer_name, ": an int8 base is for Linear layers over torch::nn::Linear only");
  check_not_routed("quantise the base weight");
  TORCH_CHECK(!int8_base_, Kind::layer_name, ": the base weight is already int8");
  TORCH_CHECK(merged_.empty(), Kind::layer_name, ": cannot quantise the base weight while adapters are merged into it ",
              "(merged: ", detail::join(merged_), "); call unmerge() first");
  for (const auto& entry : adapters_) {
    TORCH_CHECK(!entry.options.use_dora(), Kind::layer_name, ": adapter '", entry.name,
                "' uses DoRA, whose weight norm needs the fp32 base weight; an int8 base takes plain LoRA adapters");
  }
  const auto weight = base_weight();
  TORCH_CHECK(!weight.requires_grad(), Kind::layer_name, ": the base weight is trainable; only a frozen base is stored int8");
  TORCH_CHECK(weight.device().is_cpu(), Kind::layer_name, ": an int8 base runs on the CPU only (the weight is on ",
              weight.device(), ")");
}

template <typename Kind>
void LoRAModuleImpl<Kind>::quantize_base(std::shared_ptr<const detail::Int8Weight> int8) {
  check_quantize_base();
  if constexpr (std::is_same_v<typename Kind::BaseModule, torch::nn::LinearImpl>) {
    auto& weight = base_layer_->weight;
    if (!int8) int8 = std::make_shared<const detail::Int8Weight>(weight);
    TORCH_CHECK(int8->out_features() == weight.size(0) && int8->in_features() == weight.size(1), Kind::layer_name,
                ": int8 weight of shape [", int8->out_features(), ", ", int8->in_features(),
                "] does not fit the base weight ", weight.sizes());
    torch::NoGradGuard no_grad;
    // The registered parameter keeps its name, dtype and device but no values: the memory goes.
    weight.set_data(at::empty({0}, weight.options()));
    int8_base_ = std::move(int8);
  }
}

template <typename Kind>
void LoRAModuleImpl<Kind>::check_merge(const std::vector<std::string>& adapter_names) const {
  check_not_routed("merge");
  check_fp32_base("merge");
  TORCH_CHECK(enabled_, Kind::layer_name, ": cannot merge while adapters are disabled; call enable_adapters(true) first");
  for (const auto& name : adapter_names) check_adapter(name, "merge");
}

template <typename Kind>
void LoRAModuleImpl<Kind>::merge(const std::vector<std::string>& adapter_names, bool safe_merge) {
  check_merge(adapter_names);
  const auto names = adapter_names.empty() ? active_ : adapter_names;
  if (std::all_of(names.begin(), names.end(), [&](const std::string& name) { return is_merged(name); })) return;
  const auto merged_before = merged_.size();
  const auto kept = base_weight().detach().clone();  // all or nothing, bit for bit
  try {
    merge_each(names, safe_merge);
  } catch (...) {
    rollback_merges(merged_before, kept);
    throw;
  }
}

template <typename Kind>
void LoRAModuleImpl<Kind>::rollback_merges(size_t count, const at::Tensor& weight) {
  TORCH_CHECK(count <= merged_.size(), Kind::layer_name, ": cannot roll back to ", count, " merges (", merged_.size(),
              " merged)");
  TORCH_CHECK(weight.sizes() == base_weight().sizes(), Kind::layer_name, ": rollback weight has shape ", weight.sizes(),
              " but the base weight ", base_weight().sizes());
  for (size_t i = count; i < merged_.size(); ++i) dora_merge_norms_.erase(merged_[i]);
  merged_.resize(count);
  torch::NoGradGuard no_grad;
  Kind::weight(*base_layer_).copy_(weight);
}

template <typename Kind>
void LoRAModuleImpl<Kind>::merge_each(const std::vector<std::string>& names, bool safe_merge) {
  torch::NoGradGuard no_grad;
  auto weight = weight_matrix();
  for (const auto& name : names) {
    if (is_merged(name)) continue;  // already in W
    const auto& options = adapter_options(name);
    const auto delta = delta_matrix(name);
    at::Tensor merged_weight;
    at::Tensor norm;
    if (options.use_dora()) {
      norm = functional::dora_weight_norm(weight, delta);
      const auto magnitude = magnitude_vector(name);
      merged_weight = (magnitude / norm).view({-1, 1}) * (weight + delta.to(weight.scalar_type()));
    } else if (safe_merge) {
      merged_weight = weight + delta.to(weight.scalar_type());
    }
    if (safe_merge) {
      TORCH_CHECK(at::isfinite(merged_weight).all().item<bool>(), Kind::layer_name, ": merging adapter '", name,
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

template <typename Kind>
void LoRAModuleImpl<Kind>::unmerge() {
  while (!merged_.empty()) unmerge_last();
}

template <typename Kind>
void LoRAModuleImpl<Kind>::unmerge_last() {
  torch::NoGradGuard no_grad;
  auto weight = weight_matrix();
  const auto name = merged_.back();
  const auto delta = delta_matrix(name).to(weight.scalar_type());
  if (adapter_options(name).use_dora()) {
    const auto magnitude = magnitude_vector(name);
    // The norm was stored at merge time; the layer may have moved since (module->to(...)).
    const auto stored = dora_merge_norms_.find(name);
    TORCH_INTERNAL_ASSERT(stored != dora_merge_norms_.end(), Kind::layer_name, ": no merge norm kept for DoRA adapter '",
                          name, "'");
    const auto norm = stored->second.to(magnitude.device());  // its dtype as at merge time: the same factor
    const auto factor = (magnitude / norm).view({-1, 1}).to(weight.scalar_type());
    weight.copy_(weight / factor - delta);
    dora_merge_norms_.erase(name);
  } else {
    weight.sub_(delta);
  }
  merged_.pop_back();
}

template <typename Kind>
void LoRAModuleImpl<Kind>::forget_adapters() {
  for (const auto& entry : adapters_) drop_modules(entry.name);
  adapters_.clear();
  active_.clear();
  merged_.clear();
  dora_merge_norms_.clear();
  enabled_ = true;
}

template <typename Kind>
void LoRAModuleImpl<Kind>::merge_and_unload(bool safe_merge) {
  merge({}, safe_merge);  // refused while disabled: forgetting would silently drop the adapters
  forget_adapters();
}

template <typename Kind>
void LoRAModuleImpl<Kind>::unload() {
  unmerge();
  forget_adapters();
}

template <typename Kind>
std::vector<std::pair<std::string, at::Tensor>> LoRAModuleImpl<Kind>::adapter_state(const std::string& name) const {
  std::vector<std::pair<std::string, at::Tensor>> state;
  const auto& entry = adapter(name);
  // PEFT's file names: a module factor keeps its `.weight`, a bare parameter has none.
  const std::string suffix = kParameterFactors ? "" : ".weight";
  state.emplace_back(std::string(Kind::a_key) + suffix, lora_A(name));
  state.emplace_back(std::string(Kind::b_key) + suffix, lora_B(name));
  if (entry.options.use_dora()) state.emplace_back("lora_magnitude_vector", lora_magnitude_vector(name));
  return state;
}

template <typename Kind>
std::vector<std::pair<std::string, at::Tensor>> LoRAModuleImpl<Kind>::base_state() const {
  check_fp32_base("read the base state");
  std::vector<std::pair<std::string, at::Tensor>> state;
  for (const auto& item : base_layer_->named_parameters()) state.emplace_back(item.key(), item.value());
  for (const auto& item : base_layer_->named_buffers()) state.emplace_back(item.key(), item.value());
  return state;
}

template <typename Kind>
void LoRAModuleImpl<Kind>::pretty_print(std::ostream& stream) const {
  stream << "lora::";
  Kind::describe(stream, base_options_);
  if (int8_base_) stream << ", base=int8";
  stream << ", adapters=[";
  for (size_t i = 0; i < adapters_.size(); ++i) {
    const auto& [name, options, config, trainable] = adapters_[i];
    stream << (i ? ", " : "") << name;
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
