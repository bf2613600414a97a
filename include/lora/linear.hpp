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

#include <ATen/ATen.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/linear.h>

#include <lora/init.hpp>
#include <lora/lora_module.hpp>

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

/// The `LoRAModuleImpl` policy for Linear-like layers (see <lora/lora_module.hpp>): the weight
/// is the matrix (transposed when `fan_in_fan_out`), A and B are bias-free Linear modules.
template <typename Base>
struct LinearKind {
  using Traits = LinearTraits<Base>;
  using BaseModule = Base;
  using Options = typename Traits::Options;
  using Factor = torch::nn::LinearImpl;
  static constexpr LayerKind kind = LayerKind::kLinear;
  static constexpr const char* layer_name = "LoRALinear";
  static constexpr const char* a_key = "lora_A";
  static constexpr const char* b_key = "lora_B";
  static constexpr bool uses_dropout = true;
  static constexpr bool decomposable = true;

  static const Options& options(const Base& layer) { return Traits::options(layer); }
  static void check_base(const Options&) {}
  static int64_t in_features(const Options& options) { return Traits::in_features(options); }
  static int64_t out_features(const Options& options) { return Traits::out_features(options); }
  static const at::Tensor& weight(const Base& layer) { return Traits::weight(layer); }
  static const at::Tensor& bias(const Base& layer) { return Traits::bias(layer); }
  static at::Tensor matrix(const at::Tensor& weight) { return Traits::fan_in_fan_out ? weight.t() : weight; }
  static at::Tensor unmatrix(const at::Tensor& matrix, const at::Tensor& /*weight*/) {
    return Traits::fan_in_fan_out ? matrix.t() : matrix;
  }

  static std::pair<std::shared_ptr<Factor>, std::shared_ptr<Factor>> make_factors(const Options& options, int64_t r) {
    return {std::make_shared<Factor>(torch::nn::LinearOptions(in_features(options), r).bias(false)),
            std::make_shared<Factor>(torch::nn::LinearOptions(r, out_features(options)).bias(false))};
  }
  static at::Tensor factor_matrix(const at::Tensor& factor) { return factor; }
  static void initialize(InitKind init, const at::Tensor& A, const at::Tensor& B, int64_t r) {
    detail::initialize_down_up(init, A, B, r);
  }
  static std::vector<int64_t> magnitude_shape(const Options& options) { return {out_features(options)}; }

  static void check_input(const Options& options, const at::Tensor& input) {
    const int64_t in = in_features(options);
    TORCH_CHECK(input.dim() >= 1 && input.size(-1) == in, "LoRALinear: expected an input with ", in,
                " features in its last dimension (got input of shape ", input.sizes(), ")");
  }
  static at::Tensor base_forward(Base& layer, const at::Tensor& x) { return Traits::forward(layer, x); }
  /// The factors read rows of features: any leading dimensions become one.
  static at::Tensor flatten(const Options& options, const at::Tensor& input) {
    return input.reshape({-1, in_features(options)});
  }
  static at::Tensor unflatten(const at::Tensor& result, const at::Tensor& input) {
    auto shape = input.sizes().vec();
    shape.back() = result.size(-1);
    return result.view(shape);
  }
  static at::Tensor cast_input(const at::Tensor& x, c10::ScalarType dtype) {
    return x.scalar_type() == dtype ? x : x.to(dtype);
  }
  static at::Tensor down(const Base&, const at::Tensor& x, const at::Tensor& A) { return at::mm(x, A.t()); }
  static at::Tensor up(const at::Tensor& h, const at::Tensor& B) { return at::mm(h, B.t()); }
  /// result + s·h·Bᵀ, in place (one addmm) when the dtypes agree.
  static at::Tensor accumulate(at::Tensor result, const at::Tensor& h, const at::Tensor& B, double s) {
    return detail::add_row_update(std::move(result), h, B, s);
  }
  static at::Tensor channel(const at::Tensor& per_output) { return per_output; }
  static at::Tensor base_without_bias(const Base& layer, const at::Tensor& x) {
    return at::mm(x, matrix(weight(layer)).to(x.scalar_type()).t());
  }
  static void describe(std::ostream& stream, const Options& options) {
    stream << "LoRALinear<" << Traits::name << ">(in_features=" << in_features(options)
           << ", out_features=" << out_features(options) << ", bias=" << (Traits::has_bias(options) ? "true" : "false");
  }
};

/// A frozen Linear-like layer (`base_layer`) with any number of named LoRA adapters.
///
/// The template parameter is the wrapped layer's module type (its `Impl`), read through
/// `LinearTraits<Base>`; `LoRALinear<>` wraps `torch::nn::Linear`. Parameter names follow
/// PEFT: `base_layer.weight`, `lora_A.<adapter>.weight` [r, in], `lora_B.<adapter>.weight`
/// [out, r], and with DoRA `lora_magnitude_vector.<adapter>.weight` [out].
///
///     torch::nn::Linear pretrained(768, 768);
///     lora::LoRALinear<> layer(pretrained, lora::LoRAOptions(8).alpha(16));
///     auto y = layer(x);  // pretrained(x) + 2 · B(A(x)); only A and B are trainable
///     layer->merge();     // W += 2·B·A: no extra cost at inference
template <typename Base = torch::nn::LinearImpl>
using LoRALinearImpl = LoRAModuleImpl<LinearKind<Base>>;

/// Module holder for `LoRALinearImpl<Base>`, used like `torch::nn::Linear`.
template <typename Base = torch::nn::LinearImpl>
using LoRALinear = LoRAModule<LinearKind<Base>>;

}  // namespace lora

