#pragma once

/// \file
/// What the transformer encoders (BERT, DistilBERT, RoBERTa) share: their output and the
/// attention-mask arithmetic transformers uses.

#include <limits>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <lora/dropout.hpp>

#include <lora/linear.hpp>

namespace lora::models {

/// What an encoder's `forward` returns (BERT adds its pooler output: `BertOutput`).
struct EncoderOutput {
  at::Tensor last_hidden_state;           ///< [batch, seq, hidden]
  std::vector<at::Tensor> hidden_states;  ///< embeddings then every layer's output, when asked for
};

namespace detail {

/// Every projection of our encoders is adaptable: a `LoRALinear` over `torch::nn::Linear`.
inline lora::LoRALinear<> projection(int64_t in, int64_t out) {
  return lora::LoRALinear<>(torch::nn::LinearOptions(in, out));
}

/// A model's `torch::nn::Dropout` member (its p and train/eval mode) applied through
/// `lora::dropout`, whose masks are drawn in parallel.
inline at::Tensor drop(const torch::nn::Dropout& module, const at::Tensor& x) {
  return lora::dropout(x, module->options.p(), module->is_training());
}

/// transformers' activations by config name: "gelu" (exact, erf), "gelu_new" /
/// "gelu_pytorch_tanh" (tanh approximation), "relu". Configs validate the name.
inline at::Tensor activation(const at::Tensor& x, const std::string& name) {
  if (name == "relu") return at::relu(x);
  if (name == "gelu") return at::gelu(x);
  return at::gelu(x, "tanh");
}

/// `torch.finfo(dtype).min`: what transformers puts on masked attention scores.
inline double lowest_value(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return std::numeric_limits<double>::lowest();
    case at::kHalf: return -65504.0;
    case at::kBFloat16: return -3.3895313892515355e38;
    default: return static_cast<double>(std::numeric_limits<float>::lowest());
  }
}

/// [batch, 1, 1, seq]: 0 for tokens, the dtype's minimum for padding (BERT's and RoBERTa's
/// extended mask, added to the scores).
inline at::Tensor additive_attention_mask(const at::Tensor& attention_mask, at::ScalarType dtype) {
  return (1.0 - attention_mask.to(dtype)).mul(lowest_value(dtype)).unsqueeze(1).unsqueeze(2);
}

/// The checks every encoder's forward makes on its inputs; `who` names the model.
inline void check_encoder_inputs(const char* who, const at::Tensor& input_ids, const at::Tensor& attention_mask,
                                 int64_t max_tokens) {
  TORCH_CHECK(input_ids.dim() == 2, who, ": input_ids must be [batch, seq] (got shape ", input_ids.sizes(), ")");
  TORCH_CHECK(input_ids.scalar_type() == at::kLong, who, ": input_ids must be int64 (got ",
              c10::toString(input_ids.scalar_type()), ")");
  TORCH_CHECK(input_ids.size(1) <= max_tokens, who, ": sequence length ", input_ids.size(1),
              " exceeds the model's ", max_tokens, " positions");
  TORCH_CHECK(!attention_mask.defined() || attention_mask.sizes() == input_ids.sizes(), who,
              ": attention_mask shape ", attention_mask.sizes(), " differs from input_ids shape ", input_ids.sizes());
}

}  // namespace detail

}  // namespace lora::models
