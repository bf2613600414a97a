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
}

template <typename Base>
void LoRALinearImpl<Base>::reset() {
  merged_.clear();  // fresh weights hold no merge
  dora_merge_norms_.clear();
  build(BaseHolder(std::make_shared<Base>(base_options_)));
  for (const auto& entry : adapters_) create_adapter(entry.name, entry.options);
  update_requires_grad();
}

template <typename Base>
void LoRALinearImpl<Base>::reset_parameters() {
  TORCH_CHECK(merged_.empty(), "LoRALinear: cannot re-initialise adapters while merged (merged: ",
              detail::join(merged_), "); call unmerge() first");
  for (const auto& entry : adapters_) initialize_adapter(entry.name, entry.options);
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
  twin.merged_ = merged_;
  for (const auto& [name, norm] : dora_merge_norms_) twin.dora_merge_norms_[name] = device ? norm.to(*device) : norm.clone();
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

inline void check_linear_adapter(const std::string& name, const LoRAOptions& options, int64_t in_features,
                                 int64_t out_features, c10::ScalarType dtype) {
  TORCH_CHECK(!name.empty() && name.find('.') == std::string::npos,
              "LoRALinear: adapter name must be non-empty and contain no '.' (got '", name, "')");
  TORCH_CHECK(c10::isFloatingType(dtype), "LoRALinear: the base weight must be floating point (got ",
              c10::toString(dtype), ")");
  options.validate();
  const auto kind = parse_init(options.init()).kind;
  if (kind == InitKind::kPiSSA || kind == InitKind::kOLoRA) {
    const auto limit = std::min(in_features, out_features);
    TORCH_CHECK(options.r() <= limit, "LoRALinear: rank ", options.r(), " exceeds min(in_features, out_features) = ",
                limit, ", which init '", options.init(), "' cannot decompose");
  }
}

template <typename Base>
void LoRALinearImpl<Base>::check_add_adapter(const std::string& name, const LoRAOptions& options) const {
  TORCH_CHECK(!has_adapter(name), "LoRALinear: adapter '", name, "' already exists");
  TORCH_CHECK(merged_.empty(), "LoRALinear: cannot add adapter '", name, "' while merged (merged: ",
              detail::join(merged_), "); call unmerge() first");
  check_linear_adapter(name, options, in_features(), out_features(), base_weight().scalar_type());
}

template <typename Base>
void LoRALinearImpl<Base>::add_adapter(const std::string& name, const LoRAOptions& options,
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

template <typename Base>
std::shared_ptr<const LoraConfig> LoRALinearImpl<Base>::adapter_config(const std::string& name) const {
  return adapter(name).config;
}

template <typename Base>
void LoRALinearImpl<Base>::set_trainable(const std::string& name, bool trainable) {
  check_adapter(name, "freeze");
  for (auto& entry : adapters_) {
    if (entry.name == name) entry.trainable = trainable;
  }
  update_requires_grad();
}

template <typename Base>
void LoRALinearImpl<Base>::check_delete_adapter(const std::string& name) const {
  check_adapter(name, "delete");
  TORCH_CHECK(!is_merged(name), "LoRALinear: cannot delete adapter '", name, "' while it is merged; call unmerge() first");
}

template <typename Base>
void LoRALinearImpl<Base>::delete_adapter(const std::string& name) {
  check_delete_adapter(name);
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
bool LoRALinearImpl<Base>::is_merged(const std::string& name) const {
  return std::find(merged_.begin(), merged_.end(), name) != merged_.end();
}

template <typename Base>
void LoRALinearImpl<Base>::check_set_adapters(const std::vector<std::string>& names) const {
  for (const auto& name : names) {
    check_adapter(name, "activate");
    TORCH_CHECK(std::count(names.begin(), names.end(), name) == 1, "LoRALinear: adapter '", name,
                "' is listed more than once in set_adapters");
  }
}

template <typename Base>
void LoRALinearImpl<Base>::set_adapters(const std::vector<std::string>& names) {
  check_set_adapters(names);
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
    const bool active =
        entry.trainable && std::find(active_.begin(), active_.end(), entry.name) != active_.end();
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
      if (is_merged(name)) continue;
      const auto& entry = adapter(name);
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
void LoRALinearImpl<Base>::check_merge(const std::vector<std::string>& adapter_names) const {
  TORCH_CHECK(enabled_, "LoRALinear: cannot merge while adapters are disabled; call enable_adapters(true) first");
  for (const auto& name : adapter_names) check_adapter(name, "merge");
}

template <typename Base>
void LoRALinearImpl<Base>::merge(const std::vector<std::string>& adapter_names, bool safe_merge) {
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

template <typename Base>
void LoRALinearImpl<Base>::rollback_merges(size_t count, const at::Tensor& weight) {
  TORCH_CHECK(count <= merged_.size(), "LoRALinear: cannot roll back to ", count, " merges (", merged_.size(),
              " merged)");
  TORCH_CHECK(weight.sizes() == base_weight().sizes(), "LoRALinear: rollback weight has shape ", weight.sizes(),
              " but the base weight ", base_weight().sizes());
  for (size_t i = count; i < merged_.size(); ++i) dora_merge_norms_.erase(merged_[i]);
  merged_.resize(count);
  torch::NoGradGuard no_grad;
  Traits::weight(*base_layer_).copy_(weight);
}

template <typename Base>
void LoRALinearImpl<Base>::merge_each(const std::vector<std::string>& names, bool safe_merge) {
  torch::NoGradGuard no_grad;
  auto weight = weight_out_in();
  for (const auto& name : names) {
    if (is_merged(name)) continue;  // already in W
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
  const auto delta = delta_out_in(name).to(weight.scalar_type());
  if (adapter_options(name).use_dora()) {
    const auto& magnitude = lora_magnitude_vector(name);
    // The norm was stored at merge time; the layer may have moved since (module->to(...)).
    const auto stored = dora_merge_norms_.find(name);
    TORCH_INTERNAL_ASSERT(stored != dora_merge_norms_.end(), "LoRALinear: no merge norm kept for DoRA adapter '", name, "'");
    const auto norm = stored->second.to(magnitude.device());  // its dtype as at merge time: the same factor
    const auto factor = (magnitude / norm).view({-1, 1}).to(weight.scalar_type());
    weight.copy_(weight / factor - delta);
    dora_merge_norms_.erase(name);
  } else {
    weight.sub_(delta);
  }
  merged_.pop_back();
}

template <typename Base>
void LoRALinearImpl<Base>::forget_adapters() {
  for (const auto& entry : adapters_) drop_modules(entry.name);
  adapters_.clear();
  active_.clear();
  merged_.clear();
  dora_merge_norms_.clear();
  enabled_ = true;
}

template <typename Base>
void LoRALinearImpl<Base>::merge_and_unload(bool safe_merge) {
  merge({}, safe_merge);  // refused while disabled: forgetting would silently drop the adapters
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
  state.emplace_back("lora_A.weight", lora_A(name));
  state.emplace_back("lora_B.weight", lora_B(name));
  if (entry.options.use_dora()) state.emplace_back("lora_magnitude_vector", lora_magnitude_vector(name));
  return state;
}

template <typename Base>
std::vector<std::pair<std::string, at::Tensor>> LoRALinearImpl<Base>::base_state() const {
  std::vector<std::pair<std::string, at::Tensor>> state;
  for (const auto& item : base_layer_->named_parameters()) state.emplace_back(item.key(), item.value());
  for (const auto& item : base_layer_->named_buffers()) state.emplace_back(item.key(), item.value());
  return state;
}

template <typename Base>
void LoRALinearImpl<Base>::pretty_print(std::ostream& stream) const {
  stream << "lora::LoRALinear<" << Traits::name << ">(in_features=" << in_features()
         << ", out_features=" << out_features() << ", bias=" << (Traits::has_bias(base_options_) ? "true" : "false")
         << ", adapters=[";
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
