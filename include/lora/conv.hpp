#pragma once

/// \file
/// `LoRAConv1d`, `LoRAConv2d`: a frozen convolution plus trainable low-rank adapters, PEFT's
/// `lora.Conv1d` / `lora.Conv2d`: y = conv(x) + s · conv_B(conv_A(dropout(x))), where `lora_A` is
/// a convolution with the base layer's kernel, stride, padding and dilation and r output
/// channels, and `lora_B` a 1×1 convolution to the base layer's output channels.
/// ΔW[o, i, k...] = s · Σ_r B[o, r] · A[r, i, k...] (PEFT's `get_delta_weight`).
///
///     torch::nn::Conv2d pretrained(torch::nn::Conv2dOptions(64, 128, 3).padding(1));
///     lora::LoRAConv2d conv(pretrained, lora::LoRAOptions(8).alpha(16));
///
/// Grouped convolutions and padding modes other than zeros are refused: PEFT cannot merge the
/// former and computes the latter differently merged and unmerged.

#include <memory>
#include <ostream>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/functional/conv.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/conv.h>

#include <lora/init.hpp>
#include <lora/lora_module.hpp>

namespace lora {

/// The `LoRAModuleImpl` policy for `torch::nn::Conv1d` (D = 1) and `Conv2d` (D = 2): the
/// weight [out, in, k...] reads as the matrix [out, in·k...], A [r, in, k...] as [r, in·k...],
/// B [out, r, 1...] as [out, r].
template <size_t D, typename Module>
struct ConvKind {
  using BaseModule = Module;
  using Options = torch::nn::ConvOptions<D>;
  using Factor = Module;
  static constexpr LayerKind kind = LayerKind::kConv;
  static constexpr const char* layer_name = D == 1 ? "LoRAConv1d" : "LoRAConv2d";
  static constexpr const char* a_key = "lora_A";
  static constexpr const char* b_key = "lora_B";
  static constexpr bool uses_dropout = true;
  static constexpr bool decomposable = false;

  static Options options(const BaseModule& layer) {
    const auto& o = layer.options;
    return Options(o.in_channels(), o.out_channels(), o.kernel_size())
        .stride(o.stride())
        .padding(o.padding())
        .dilation(o.dilation())
        .groups(o.groups())
        .bias(o.bias())
        .padding_mode(o.padding_mode());
  }
  static void check_base(const Options& options) {
    TORCH_CHECK(options.groups() == 1, layer_name, ": the base convolution has groups=", options.groups(),
                "; adapters need groups=1 (PEFT cannot merge grouped convolutions either)");
    TORCH_CHECK(c10::get_if<torch::enumtype::kZeros>(&options.padding_mode()) != nullptr, layer_name,
                ": the base convolution pads with mode '", torch::enumtype::get_enum_name(options.padding_mode()),
                "'; adapters support zero padding only (PEFT's lora_A pads with zeros, so its merged and unmerged "
                "outputs would differ)");
  }
  static int64_t in_features(const Options& options) { return options.in_channels(); }
  static int64_t out_features(const Options& options) { return options.out_channels(); }
  static const at::Tensor& weight(const BaseModule& layer) { return layer.weight; }
  static const at::Tensor& bias(const BaseModule& layer) { return layer.bias; }
  static at::Tensor matrix(const at::Tensor& weight) { return weight.view({weight.size(0), -1}); }
  static at::Tensor unmatrix(const at::Tensor& matrix, const at::Tensor& weight) { return matrix.reshape(weight.sizes()); }

  static std::pair<std::shared_ptr<Factor>, std::shared_ptr<Factor>> make_factors(const Options& options, int64_t r) {
    auto down = Options(options.in_channels(), r, options.kernel_size())
                    .stride(options.stride())
                    .padding(options.padding())
                    .dilation(options.dilation())
                    .bias(false);
    return {std::make_shared<Factor>(down), std::make_shared<Factor>(Options(r, options.out_channels(), 1).bias(false))};
  }
  static at::Tensor factor_matrix(const at::Tensor& factor) { return factor.view({factor.size(0), -1}); }
  static void initialize(InitKind init, const at::Tensor& A, const at::Tensor& B, int64_t r) {
    detail::initialize_down_up(init, A, B, r);
  }
  /// PEFT keeps a convolution's magnitude as [1, out, 1...].
  static std::vector<int64_t> magnitude_shape(const Options& options) {
    std::vector<int64_t> shape(D + 2, 1);
    shape[1] = options.out_channels();
    return shape;
  }

  static void check_input(const Options& options, const at::Tensor& input) {
    const auto channels = input.dim() == static_cast<int64_t>(D) + 2 ? input.size(1)
                          : input.dim() == static_cast<int64_t>(D) + 1 ? input.size(0)
                                                                       : -1;
    TORCH_CHECK(channels == options.in_channels(), layer_name, ": expected an input [N, ", options.in_channels(),
                ", ...] (or unbatched [", options.in_channels(), ", ...]) with ", D, " spatial dimension(s), got ",
                input.sizes());
  }
  static at::Tensor base_forward(BaseModule& layer, const at::Tensor& x) { return layer.forward(x); }
  static at::Tensor flatten(const Options&, const at::Tensor& x) { return x; }
  static at::Tensor unflatten(const at::Tensor& result, const at::Tensor&) { return result; }
  static at::Tensor cast_input(const at::Tensor& x, c10::ScalarType dtype) {
    return x.scalar_type() == dtype ? x : x.to(dtype);
  }
  static at::Tensor convolve(const at::Tensor& x, const at::Tensor& weight, const torch::nn::functional::ConvFuncOptions<D>& options) {
    if constexpr (D == 1) {
      return torch::nn::functional::conv1d(x, weight, options);
    } else {
      return torch::nn::functional::conv2d(x, weight, options);
    }
  }
  static at::Tensor down(const BaseModule& layer, const at::Tensor& x, const at::Tensor& A) {
    const auto& o = layer.options;
    return convolve(x, A, torch::nn::functional::ConvFuncOptions<D>().stride(o.stride()).padding(o.padding()).dilation(o.dilation()));
  }
  static at::Tensor up(const at::Tensor& h, const at::Tensor& B) { return convolve(h, B, torch::nn::functional::ConvFuncOptions<D>()); }
  static at::Tensor accumulate(at::Tensor result, const at::Tensor& h, const at::Tensor& B, double s) {
    if (result.scalar_type() == h.scalar_type()) return result.add_(up(h, B), s);
    const auto dtype = at::promote_types(result.scalar_type(), h.scalar_type());
    return result.to(dtype).add_(up(h.to(dtype), B.to(dtype)), s).to(result.scalar_type());
  }
  /// [out] → [out, 1...]: broadcasts on [N, out, ...] and on an unbatched [out, ...].
  static at::Tensor channel(const at::Tensor& per_output) {
    std::vector<int64_t> shape(D + 1, 1);
    shape[0] = -1;
    return per_output.reshape(shape);
  }
  static at::Tensor base_without_bias(const BaseModule& layer, const at::Tensor& x) {
    const auto& o = layer.options;
    return convolve(x, layer.weight.to(x.scalar_type()),
                    torch::nn::functional::ConvFuncOptions<D>().stride(o.stride()).padding(o.padding()).dilation(o.dilation()));
  }
  static void describe(std::ostream& stream, const Options& options) {
    stream << layer_name << "(" << options.in_channels() << ", " << options.out_channels()
           << ", kernel_size=" << options.kernel_size() << ", stride=" << options.stride()
           << ", bias=" << (options.bias() ? "true" : "false");
  }
};

using LoRAConv1dImpl = LoRAModuleImpl<ConvKind<1, torch::nn::Conv1dImpl>>;
using LoRAConv2dImpl = LoRAModuleImpl<ConvKind<2, torch::nn::Conv2dImpl>>;
/// Module holders, used like `torch::nn::Conv1d` / `torch::nn::Conv2d`.
using LoRAConv1d = LoRAModule<ConvKind<1, torch::nn::Conv1dImpl>>;
using LoRAConv2d = LoRAModule<ConvKind<2, torch::nn::Conv2dImpl>>;

}  // namespace lora
