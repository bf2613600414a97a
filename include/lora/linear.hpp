#pragma once

/// \file
/// `LoRALinear<Base>`: a frozen linear layer plus trainable low-rank adapters,
/// y = base(x) + Σ_active s · B(A(dropout(x))).

#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <lora/detail/magnitude.hpp>
#include <lora/layer.hpp>
#include <lora/options.hpp>

namespace lora {

/// How `LoRALinear<Base>` reads a Linear-like base layer: its options, sizes, weight, bias and
/// forward. Specialise it to adapt a layer type of your own (for instance a GPT-2 style
/// `Conv1D` whose weight is stored [in, out]: set `fan_in_fan_out = true`).
template <typename Base>
struct LinearTraits;

/// `torch::nn::Linear`: weight [out, in], optional bias.
template <>
struct LinearTraits<torch::nn::LinearImpl> {
  using Options = torch::nn::LinearOptions;
  /// Weight stored [in, out] instead of [out, in] (PEFT's `fan_in_fan_out`).
  static constexpr bool fan_in_fan_out = false;
  static constexpr const char* name = "Linear";

  static const Options& options(const torch::nn::LinearImpl& layer) { return layer.options; }
  static int64_t in_features(const Options& options) { return options.in_features(); }
  static int64_t out_features(const Options& options) { return options.out_features(); }
  static bool has_bias(const Options& options) { return options.bias(); }
  static const at::Tensor& weight(const torch::nn::LinearImpl& layer) { return layer.weight; }
  static const at::Tensor& bias(const torch::nn::LinearImpl& layer) { return layer.bias; }
  /// `at::linear`, not `LinearImpl::forward`: LibTorch's C++ Linear computes a 3-D input as a
  /// matmul plus a separate bias add, at::linear (what PyTorch's Python Linear calls) as one
  /// addmm on the flattened input. Measured in bench/model_bench.cpp (`op_*_linear`).
  static at::Tensor forward(torch::nn::LinearImpl& layer, const at::Tensor& x) {
    return at::linear(x, layer.weight, layer.bias);
  }
};

/// Checks an adapter for a Linear-like layer of these sizes and weight dtype, as
/// `LoRALinear::add_adapter` does: a valid name, a floating-point weight, valid options, and a
/// rank PiSSA/OLoRA can decompose. Throws naming the bad value.
inline void check_linear_adapter(const std::string& name, const LoRAOptions& options, int64_t in_features,
                                 int64_t out_features, c10::ScalarType dtype);

/// A frozen Linear-like layer (`base_layer`) with any number of named LoRA adapters.
///
/// The template parameter is the wrapped layer's module type (its `Impl`), read through
/// `LinearTraits<Base>`; `LoRALinear<>` wraps `torch::nn::Linear`. Parameter names follow
/// PEFT: `base_layer.weight`, `lora_A.<adapter>.weight` [r, in], `lora_B.<adapter>.weight`
/// [out, r], and with DoRA `lora_magnitude_vector.<adapter>.weight` [out].
///
/// With no adapter (or adapters disabled) the layer computes exactly what the base layer does.
///
///     torch::nn::Linear pretrained(768, 768);
///     lora::LoRALinear<> layer(pretrained, lora::LoRAOptions(8).alpha(16));
///     auto y = layer(x);  // pretrained(x) + 2 · B(A(x)); only A and B are trainable
///     layer->merge();     // W += 2·B·A: no extra cost at inference
template <typename Base = torch::nn::LinearImpl>
class LoRALinearImpl : public torch::nn::Cloneable<LoRALinearImpl<Base>>, public LoRALayer {
 public:
  using Traits = LinearTraits<Base>;
  using BaseOptions = typename Traits::Options;
  using BaseHolder = torch::nn::ModuleHolder<Base>;

  /// A new base layer built from `base_options`, without adapters.
  explicit LoRALinearImpl(const BaseOptions& base_options);
  /// A new base layer with one adapter.
  LoRALinearImpl(const BaseOptions& base_options, const LoRAOptions& options, const std::string& adapter = "default");
  /// Wraps an existing layer (its weights are shared, not copied, and frozen), without adapters.
  explicit LoRALinearImpl(const BaseHolder& base);
  /// Wraps an existing layer and adds one adapter.
  LoRALinearImpl(const BaseHolder& base, const LoRAOptions& options, const std::string& adapter = "default");

  /// Re-creates the base layer and every adapter with fresh parameters (LibTorch's contract,
  /// used by `clone()`): a wrapped pretrained weight is not kept.
  void reset() override;
  /// Re-initialises every adapter as its options say; the base layer is left alone.
  void reset_parameters();

  /// Deep copy, keeping each parameter's `requires_grad` (Cloneable alone would reset them).
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<torch::Device>& device = c10::nullopt) const override;

  /// base(x) + Σ over active, unmerged adapters of the scaled low-rank update.
  at::Tensor forward(const at::Tensor& input);

  void pretty_print(std::ostream& stream) const override;

  // AdapterLayer
  std::vector<std::string> adapter_names() const override;
  bool has_adapter(const std::string& name) const override;
  void set_adapters(const std::vector<std::string>& names) override;
  void check_set_adapters(const std::vector<std::string>& names) const override;
  const std::vector<std::string>& active_adapters() const override { return active_; }
  void enable_adapters(bool enabled) override;
  bool adapters_enabled() const override { return enabled_; }
  void delete_adapter(const std::string& name) override;
  void check_delete_adapter(const std::string& name) const override;
  std::vector<std::pair<std::string, at::Tensor>> adapter_state(const std::string& name) const override;
  std::vector<std::pair<std::string, at::Tensor>> base_state() const override;
  std::shared_ptr<const LoraConfig> adapter_config(const std::string& name) const override;
  void set_trainable(const std::string& name, bool trainable) override;
  bool is_trainable(const std::string& name) const override { return adapter(name).trainable; }

  // LoRALayer
  void add_adapter(const std::string& name, const LoRAOptions& options,
                   std::shared_ptr<const LoraConfig> config = nullptr) override;
  void check_add_adapter(const std::string& name, const LoRAOptions& options) const override;
  const LoRAOptions& adapter_options(const std::string& name) const override;
  void merge(const std::vector<std::string>& adapter_names = {}, bool safe_merge = false) override;
  void check_merge(const std::vector<std::string>& adapter_names = {}) const override;
  void unmerge() override;
  void rollback_merges(size_t count, const at::Tensor& weight) override;
  bool merged() const override { return !merged_.empty(); }
  const std::vector<std::string>& merged_adapters() const override { return merged_; }
  void merge_and_unload(bool safe_merge = false) override;
  void forget_adapters() override;
  void unload() override;
  at::Tensor adapted_weight() const override;
  at::Tensor delta_weight(const std::string& name) const override;
  at::Tensor base_weight() const override { return Traits::weight(*base_layer_); }
  at::Tensor base_bias() const override { return Traits::bias(*base_layer_); }
  int64_t in_features() const override { return Traits::in_features(base_options_); }
  int64_t out_features() const override { return Traits::out_features(base_options_); }

  /// The wrapped layer.
  BaseHolder base_layer() const { return base_layer_; }
  /// `lora_A.<name>.weight` [r, in], `lora_B.<name>.weight` [out, r] and, for DoRA,
  /// `lora_magnitude_vector.<name>.weight` [out].
  const at::Tensor& lora_A(const std::string& name) const;
  const at::Tensor& lora_B(const std::string& name) const;
  const at::Tensor& lora_magnitude_vector(const std::string& name) const;

 private:
  struct Adapter {
    std::string name;
    LoRAOptions options;
    std::shared_ptr<const LoraConfig> config;
    bool trainable = true;  ///< false: frozen even while active
  };

  static const BaseOptions& checked_options(const BaseHolder& base);
  void build(BaseHolder base);
  /// Removes an adapter's modules from the containers (not from `adapters_`).
  void drop_modules(const std::string& name);
  void create_adapter(const std::string& name, const LoRAOptions& options);
  void initialize_adapter(const std::string& name, const LoRAOptions& options);
  void update_requires_grad();
  void check_adapter(const std::string& name, const char* operation) const;
  const Adapter& adapter(const std::string& name) const;
  bool is_merged(const std::string& name) const;
  void merge_each(const std::vector<std::string>& names, bool safe_merge);
  void unmerge_last();
  /// The base weight viewed as [out, in] (a transposed view when fan_in_fan_out).
  at::Tensor weight_out_in() const;
  /// s·B·A as [out, in], whatever the base weight's layout.
  at::Tensor delta_out_in(const std::string& name) const;

  BaseOptions base_options_;
  BaseHolder base_layer_{nullptr};
  torch::nn::ModuleDict lora_A_{nullptr};
  torch::nn::ModuleDict lora_B_{nullptr};
  torch::nn::ModuleDict lora_magnitude_vector_{nullptr};

  /// Adapters in insertion order: what `reset()` rebuilds from.
  std::vector<Adapter> adapters_;
  std::vector<std::string> active_;
  std::vector<std::string> merged_;
  /// ‖W + ΔW‖ at merge time, needed to undo a DoRA merge. Not a registered buffer (it comes and
  /// goes with merges): moved to the weight's device when used, its dtype kept.
  std::map<std::string, at::Tensor> dora_merge_norms_;
  bool enabled_ = true;
};

/// Module holder for `LoRALinearImpl<Base>`, used like `torch::nn::Linear`.
template <typename Base = torch::nn::LinearImpl>
class LoRALinear : public torch::nn::ModuleHolder<LoRALinearImpl<Base>> {
 public:
  using torch::nn::ModuleHolder<LoRALinearImpl<Base>>::ModuleHolder;
  using Impl = LoRALinearImpl<Base>;
};

}  // namespace lora

#include <lora/detail/linear_impl.hpp>
