#pragma once

/// \file
/// A frozen linear weight stored int8 per output channel and multiplied by LibTorch's
/// dynamically quantised GEMM (`quantized::linear_dynamic`: the build's engine, FBGEMM, oneDNN
/// or QNNPACK), with a gradient for the input so that adapters above it still train.

#include <memory>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

namespace lora::detail {

/// The int8 copy of a [out, in] weight and the engine's packed form of it.
class Int8Weight {
 public:
  /// Symmetric per-row scales (max |w| / 127, zero point 0), as `torch.ao` dynamic
  /// quantisation picks for qint8 weights.
  explicit Int8Weight(const at::Tensor& weight) {
    TORCH_CHECK(weight.dim() == 2, "lora: an int8 base needs a [out, in] weight (got shape ", weight.sizes(), ")");
    TORCH_CHECK(weight.device().is_cpu(), "lora: an int8 base runs on the CPU only (the weight is on ",
                weight.device(), "); quantise before moving, or keep the fp32 base on this device");
    TORCH_CHECK(weight.scalar_type() == at::kFloat, "lora: an int8 base is made from a float32 weight (got ",
                c10::toString(weight.scalar_type()), ")");
    const auto w = weight.detach().contiguous();
    // An all-zero row still needs a positive scale.
    const auto scales = (w.abs().amax(1) / 127.0).clamp_min(1e-12).to(at::kDouble);
    quantized_ = at::quantize_per_channel(w, scales, at::zeros({w.size(0)}, at::kLong), 0, at::kQInt8);
    torch::jit::Stack stack{quantized_, c10::optional<at::Tensor>()};
    prepack_op().callBoxed(&stack);
    packed_ = std::move(stack[0]);
    // FBGEMM's int8 kernels on CPUs without VNNI saturate the 16-bit accumulations unless the
    // activations use 7 bits; oneDNN and QNNPACK take the full range.
    reduce_range_ = at::globalContext().qEngine() == at::QEngine::FBGEMM;
  }

  int64_t out_features() const { return quantized_.size(0); }
  int64_t in_features() const { return quantized_.size(1); }
  /// The int8 tensor (with its scales), what the backward pass dequantises.
  const at::Tensor& quantized() const { return quantized_; }
  /// Bytes held: the int8 tensor, its scales and the engine's packed copy (about its size).
  int64_t bytes() const { return 2 * quantized_.numel() + 16 * quantized_.size(0); }

  /// x Wᵀ for x [rows, in] float32 (no bias), activations quantised per call.
  at::Tensor multiply(const at::Tensor& x) const {
    torch::jit::Stack stack{x, packed_, reduce_range_};
    dynamic_op().callBoxed(&stack);
    return stack[0].toTensor();
  }

 private:
  static const c10::OperatorHandle& prepack_op() {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_prepack", "");
    return op;
  }
  static const c10::OperatorHandle& dynamic_op() {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
    return op;
  }

  at::Tensor quantized_;
  c10::IValue packed_;
  bool reduce_range_ = false;
};

/// y = x Wᵀ through the int8 weight; the input gradient is g·W with W dequantised for the
/// backward pass only (QLoRA's choice: memory over speed). W itself never gets a gradient.
struct Int8LinearFunction : torch::autograd::Function<Int8LinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& rows,
                            const std::shared_ptr<const Int8Weight>& weight) {
    ctx->saved_data["weight"] = weight->quantized();
    return weight->multiply(rows);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto weight = ctx->saved_data["weight"].toTensor().dequantize();
    return {at::mm(grads[0], weight), at::Tensor()};
  }
};

/// x Wᵀ + b for any leading dimensions of x.
inline at::Tensor int8_linear(const at::Tensor& x, const std::shared_ptr<const Int8Weight>& weight,
                              const at::Tensor& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "lora: an int8 base takes float32 inputs (got ",
              c10::toString(x.scalar_type()), ")");
  TORCH_CHECK(x.device().is_cpu(), "lora: an int8 base runs on the CPU only (input on ", x.device(), ")");
  auto shape = x.sizes().vec();
  shape.back() = weight->out_features();
  auto y = Int8LinearFunction::apply(x.reshape({-1, weight->in_features()}).contiguous(), weight);
  if (bias.defined()) y.add_(bias);  // the product is not saved for the backward pass: in place is safe
  return y.view(shape);
}

}  // namespace lora::detail
