#pragma once

/// \file
/// `LoRAModuleImpl<Kind>`: a frozen base layer plus any number of named low-rank adapters,
/// y = base(x) + Σ_active s · B(A(dropout(x))), for every layer kind. What differs between
/// kinds (how the factors are built and applied, how the weight reads as a matrix) comes from
/// the `Kind` policy: `LinearKind<Base>` (<lora/linear.hpp>), `EmbeddingKind`
/// (<lora/embedding.hpp>), `ConvKind<D>` (<lora/conv.hpp>). Use the names those headers give:
/// `LoRALinear<>`, `LoRAEmbedding`, `LoRAConv1d`, `LoRAConv2d`.
///
/// Every kind reads its base weight W as a matrix [out, columns] (a view: W itself for a
/// Linear, Wᵀ for an Embedding, W flattened after the output channel for a convolution) and its
/// factors as matrices A [r, columns], B [out, r]; merging, DoRA norms and re-parametrisation
/// are then one piece of arithmetic, ΔW = s·B·A, for all of them.
///
/// A `Kind` provides (all static):
/// - `BaseModule`, `Options`, `Factor` (the module type of `lora_A` / `lora_B` entries, or void
///   when they are bare parameters, as PEFT's embedding factors are);
/// - `kind`, `layer_name` (for messages), `a_key` / `b_key` (PEFT's container names),
///   `uses_dropout`, `decomposable` (PiSSA / OLoRA allowed);
/// - `options`, `in_features`, `out_features`, `has_bias`, `weight`, `bias` of the base layer;
/// - `matrix(W)` and `unmatrix(M, W)`: the [out, columns] view and back;
/// - `make_factors(options, r)` (modules) or `factor_shapes(options, r)` (parameters),
///   `factor_matrix(F)`, `initialize(kind, A, B, r)`, `magnitude_shape(options)`;
/// - `check_input`, `base_forward`, `flatten` / `unflatten` (the input as the factors read it),
///   `cast_input`, `down(base, x, A)`, `up(h, B)`, `accumulate(result, h, B, s)`, `channel(v)`
///   (per-output values shaped to broadcast on an output), `base_without_bias(base, x)`;
/// - `describe(stream, options)` for `pretty_print`.

#include <cmath>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/pimpl.h>

#include <lora/detail/factor_table.hpp>
#include <lora/detail/int8_linear.hpp>
#include <lora/detail/magnitude.hpp>
#include <lora/layer.hpp>
#include <lora/options.hpp>

namespace lora {

namespace detail {

/// PEFT's initialisation of a down/up factor pair (Linear and convolution): `default`
/// Kaiming-uniform A (a = √5) and zero B, `gaussian` A ~ N(0, σ = 1/r) and zero B, `false`
/// keeps the factor modules' own draws.
inline void initialize_down_up(InitKind init, const at::Tensor& A, const at::Tensor& B, int64_t r) {
  if (init == InitKind::kDefault) {
    torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
    B.zero_();
  } else if (init == InitKind::kGaussian) {
    A.normal_(0.0, 1.0 / static_cast<double>(r));
    B.zero_();
  }
}

/// result + s·h·Bᵀ for rows h [N, r] and B [out, r]: one in-place addmm when the dtypes agree.
inline at::Tensor add_row_update(at::Tensor result, const at::Tensor& h, const at::Tensor& B, double s) {
  if (result.scalar_type() == h.scalar_type()) return result.addmm_(h, B.t(), /*beta=*/1, /*alpha=*/s);
  const auto dtype = at::promote_types(result.scalar_type(), h.scalar_type());
  return result.to(dtype).addmm_(h.to(dtype), B.t().to(dtype), 1, s).to(result.scalar_type());
}

}  // namespace detail

/// Checks an adapter for a layer whose weight reads as a matrix [out, columns], as
/// `add_adapter` does: a valid name, a floating-point weight, valid options, and a rank
/// PiSSA/OLoRA can decompose (only where the kind allows them). Throws naming the bad value;
/// `who` starts the message ("LoRALinear").
inline void check_adapter_options(const char* who, const std::string& name, const LoRAOptions& options,
                                  int64_t columns, int64_t out, c10::ScalarType dtype, bool decomposable);

/// For Linear-like layers of these sizes (`check_adapter_options` for a LoRALinear).
inline void check_linear_adapter(const std::string& name, const LoRAOptions& options, int64_t in_features,
                                 int64_t out_features, c10::ScalarType dtype) {
  check_adapter_options("LoRALinear", name, options, in_features, out_features, dtype, /*decomposable=*/true);
}

/// A frozen base layer (`base_layer`) with any number of named LoRA adapters; see the file
/// comment. Parameter names follow PEFT: `base_layer.weight`, `lora_A.<adapter>.weight`,
/// `lora_B.<adapter>.weight` (an Embedding's `lora_embedding_A.<adapter>`,
/// `lora_embedding_B.<adapter>`), and with DoRA `lora_magnitude_vector.<adapter>.weight`.
///
/// With no adapter (or adapters disabled) the layer computes exactly what the base layer does.
template <typename Kind>
class LoRAModuleImpl : public torch::nn::Cloneable<LoRAModuleImpl<Kind>>, public LoRALayer {
 public:
  using BaseModule = typename Kind::BaseModule;
  using BaseOptions = typename Kind::Options;
  using BaseHolder = torch::nn::ModuleHolder<BaseModule>;

  /// A new base layer built from `base_options`, without adapters.
  explicit LoRAModuleImpl(const BaseOptions& base_options);
  /// A new base layer with one adapter.
  LoRAModuleImpl(const BaseOptions& base_options, const LoRAOptions& options, const std::string& adapter = "default");
  /// Wraps an existing layer (its weights are shared, not copied, and frozen), without adapters.
  explicit LoRAModuleImpl(const BaseHolder& base);
  /// Wraps an existing layer and adds one adapter.
  LoRAModuleImpl(const BaseHolder& base, const LoRAOptions& options, const std::string& adapter = "default");

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
  void set_adapter_config(const std::string& name, std::shared_ptr<const LoraConfig> config) override;
  void rename_adapter(const std::string& from, const std::string& to) override;
  void check_rename_adapter(const std::string& from, const std::string& to) const override;

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
  at::Tensor base_weight() const override { return Kind::weight(*base_layer_); }
  at::Tensor base_bias() const override { return Kind::bias(*base_layer_); }
  int64_t in_features() const override { return Kind::in_features(base_options_); }
  int64_t out_features() const override { return Kind::out_features(base_options_); }
  LayerKind layer_kind() const override { return Kind::kind; }
  void route(std::shared_ptr<const detail::Routing> routing, std::vector<detail::RoutedBase> base_values = {}) override;
  void check_route(bool with_base_values) const override;
  void quantize_base(std::shared_ptr<const detail::Int8Weight> int8 = nullptr) override;
  void check_quantize_base() const override;
  bool base_is_int8() const override { return int8_base_ != nullptr; }

  /// The wrapped layer.
  BaseHolder base_layer() const { return base_layer_; }
  /// The factors as stored: `lora_A` [r, in] and `lora_B` [out, r] for a Linear; the conv
  /// weights [r, in, k...] and [out, r, 1...] for a convolution; for an Embedding
  /// `lora_embedding_A` [r, num_embeddings] and `lora_embedding_B` [embedding_dim, r].
  const at::Tensor& lora_A(const std::string& name) const;
  const at::Tensor& lora_B(const std::string& name) const;
  /// DoRA's `lora_magnitude_vector.<name>.weight`: [out] ([1, out, 1...] for a convolution).
  const at::Tensor& lora_magnitude_vector(const std::string& name) const;

 private:
  struct Adapter {
    std::string name;
    LoRAOptions options;
    std::shared_ptr<const LoraConfig> config;
    bool trainable = true;  ///< false: frozen even while active
  };
  static constexpr bool kParameterFactors = std::is_void_v<typename Kind::Factor>;
  using FactorHolder =
      std::conditional_t<kParameterFactors, detail::FactorTable, torch::nn::ModuleDict>;

  static BaseOptions checked_options(const BaseHolder& base);
  /// Throws while a mixed-adapter batch is routed: `operation` would change what it computes.
  void check_not_routed(const char* operation) const;
  void build(BaseHolder base);
  /// Removes an adapter's modules from the containers (not from `adapters_`).
  void drop_modules(const std::string& name);
  /// Rebuilds the containers with entry `from` dropped (`to` empty) or renamed `to`, in order.
  void rebuild_containers(const std::string& from, const std::string& to);
  void create_adapter(const std::string& name, const LoRAOptions& options);
  void initialize_adapter(const std::string& name, const LoRAOptions& options);
  void update_requires_grad();
  void check_adapter(const std::string& name, const char* operation) const;
  const Adapter& adapter(const std::string& name) const;
  bool is_merged(const std::string& name) const;
  void merge_each(const std::vector<std::string>& names, bool safe_merge);
  void unmerge_last();
  /// The base weight viewed as a matrix [out, columns].
  at::Tensor weight_matrix() const;
  /// s·B·A as [out, columns].
  at::Tensor delta_matrix(const std::string& name) const;
  /// The magnitude as [out].
  at::Tensor magnitude_vector(const std::string& name) const;
  const at::Tensor& factor(const FactorHolder& holder, const std::string& name) const;
  /// What adapter `name` adds to `base_output` for the flattened input rows `x`, as a new
  /// tensor (the unrouted plain path accumulates in place instead).
  at::Tensor adapter_term(const std::string& name, const at::Tensor& x, const at::Tensor& base_output,
                          bool dropout_active) const;
  static at::Tensor add_term(const at::Tensor& result, const at::Tensor& term);
  /// The base layer's output: its own forward, or the int8 product once quantised.
  at::Tensor base_forward(const at::Tensor& x);
  /// Throws when the base weight is int8: `operation` needs the fp32 weight.
  void check_fp32_base(const char* operation) const;
  /// `forward` for a mixed-adapter batch: the base once, each group's delta on its rows.
  at::Tensor forward_routed(const at::Tensor& input);

  BaseOptions base_options_;
  BaseHolder base_layer_{nullptr};
  FactorHolder lora_A_{nullptr};
  FactorHolder lora_B_{nullptr};
  torch::nn::ModuleDict lora_magnitude_vector_{nullptr};

  /// Adapters in insertion order: what `reset()` rebuilds from.
  std::vector<Adapter> adapters_;
  std::vector<std::string> active_;
  std::vector<std::string> merged_;
  /// ‖W + ΔW‖ at merge time, needed to undo a DoRA merge. Not a registered buffer (it comes and
  /// goes with merges): moved to the weight's device when used, its dtype kept.
  std::map<std::string, at::Tensor> dora_merge_norms_;
  bool enabled_ = true;
  /// Set while a mixed-adapter batch is routed (`route`).
  std::shared_ptr<const detail::Routing> routing_;
  std::vector<detail::RoutedBase> routed_base_;
  /// Set by `quantize_base`: the int8 weight that replaced the fp32 one.
  std::shared_ptr<const detail::Int8Weight> int8_base_;
};

/// Module holder for `LoRAModuleImpl<Kind>`, used like the base layer's holder.
template <typename Kind>
class LoRAModule : public torch::nn::ModuleHolder<LoRAModuleImpl<Kind>> {
 public:
  using torch::nn::ModuleHolder<LoRAModuleImpl<Kind>>::ModuleHolder;
  using Impl = LoRAModuleImpl<Kind>;
};

}  // namespace lora

#include <lora/detail/lora_module_impl.hpp>
