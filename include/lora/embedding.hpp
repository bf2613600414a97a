#pragma once

/// \file
/// `LoRAEmbedding`: a frozen `torch::nn::Embedding` plus trainable low-rank adapters, PEFT's
/// `lora.Embedding`: y = E[ids] + s · A[:, ids]ᵀ Bᵀ, with `lora_embedding_A` [r, num_embeddings]
/// and `lora_embedding_B` [embedding_dim, r], ΔW = s·(B·A)ᵀ.
///
///     torch::nn::Embedding pretrained(30522, 768);
///     lora::LoRAEmbedding tokens(pretrained, lora::LoRAOptions(8).alpha(16));
///
/// As in PEFT: A starts at zero and B normal (so the adapted layer equals the base one), no
/// dropout is applied (the input is ids), and the factors are bare parameters
/// (`lora_embedding_A.<adapter>`, no `.weight`, in memory and in files).

#include <memory>
#include <ostream>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/modules/embedding.h>

#include <lora/init.hpp>
#include <lora/lora_module.hpp>

namespace lora {

/// The `LoRAModuleImpl` policy for `torch::nn::Embedding`: the weight [num_embeddings,
/// embedding_dim] reads as the matrix Wᵀ [embedding_dim, num_embeddings] (out × in, PEFT's
/// in_features = num_embeddings, out_features = embedding_dim).
struct EmbeddingKind {
  using BaseModule = torch::nn::EmbeddingImpl;
  using Options = torch::nn::EmbeddingOptions;
  using Factor = void;  // bare parameters
  static constexpr LayerKind kind = LayerKind::kEmbedding;
  static constexpr const char* layer_name = "LoRAEmbedding";
  static constexpr const char* a_key = "lora_embedding_A";
  static constexpr const char* b_key = "lora_embedding_B";
  static constexpr bool uses_dropout = false;
  static constexpr bool decomposable = false;

  static const Options& options(const BaseModule& layer) { return layer.options; }
  static void check_base(const Options& options) {
    // F.embedding with max_norm rescales rows of the weight it reads, in place: of A's
    // transpose here, which would change the adapter as a side effect of a forward.
    TORCH_CHECK(!options.max_norm().has_value(), "LoRAEmbedding: an Embedding with max_norm (",
                options.max_norm().value_or(0), ") renormalises its weight in place; adapters are not supported on it");
  }
  static int64_t in_features(const Options& options) { return options.num_embeddings(); }
  static int64_t out_features(const Options& options) { return options.embedding_dim(); }
  static const at::Tensor& weight(const BaseModule& layer) { return layer.weight; }
  static const at::Tensor& bias(const BaseModule&) {
    static const at::Tensor none;
    return none;
  }
  static at::Tensor matrix(const at::Tensor& weight) { return weight.t(); }
  static at::Tensor unmatrix(const at::Tensor& matrix, const at::Tensor& /*weight*/) { return matrix.t(); }

  static std::pair<std::vector<int64_t>, std::vector<int64_t>> factor_shapes(const Options& options, int64_t r) {
    return {{r, in_features(options)}, {out_features(options), r}};
  }
  static at::Tensor factor_matrix(const at::Tensor& factor) { return factor; }
  /// PEFT: A zero, B standard normal for every init but "false" (which keeps the randn draws
  /// of both): the roles of A and B are swapped against Linear's.
  static void initialize(InitKind init, const at::Tensor& A, const at::Tensor& B, int64_t /*r*/) {
    if (init == InitKind::kRandom) return;
    A.zero_();
    B.normal_();
  }
  static std::vector<int64_t> magnitude_shape(const Options& options) { return {out_features(options)}; }

  static void check_input(const Options& options, const at::Tensor& input) {
    TORCH_CHECK(input.scalar_type() == at::kLong || input.scalar_type() == at::kInt,
                "LoRAEmbedding: expected integer ids (Long or Int), got ", c10::toString(input.scalar_type()));
    (void)options;
  }
  static at::Tensor base_forward(BaseModule& layer, const at::Tensor& ids) { return layer.forward(ids); }
  static at::Tensor flatten(const Options&, const at::Tensor& ids) { return ids.reshape({-1}); }
  static at::Tensor unflatten(const at::Tensor& result, const at::Tensor& ids) {
    auto shape = ids.sizes().vec();
    shape.push_back(result.size(-1));
    return result.view(shape);
  }
  static at::Tensor cast_input(const at::Tensor& ids, c10::ScalarType) { return ids; }
  /// A's columns looked up by id, with the base layer's padding_idx (no gradient for it), as
  /// PEFT's `_embed` does.
  static at::Tensor down(const BaseModule& layer, const at::Tensor& ids, const at::Tensor& A) {
    const auto& options = layer.options;
    int64_t padding_idx = -1;
    if (options.padding_idx().has_value()) {
      padding_idx = *options.padding_idx();
      if (padding_idx < 0) padding_idx += options.num_embeddings();
    }
    return at::embedding(A.t(), ids, padding_idx, options.scale_grad_by_freq(), options.sparse());
  }
  static at::Tensor up(const at::Tensor& h, const at::Tensor& B) { return at::mm(h, B.t()); }
  static at::Tensor accumulate(at::Tensor result, const at::Tensor& h, const at::Tensor& B, double s) {
    return detail::add_row_update(std::move(result), h, B, s);
  }
  static at::Tensor channel(const at::Tensor& per_output) { return per_output; }
  static at::Tensor base_without_bias(const BaseModule& layer, const at::Tensor& ids) { return at::embedding(layer.weight, ids); }
  static void describe(std::ostream& stream, const Options& options) {
    stream << "LoRAEmbedding(num_embeddings=" << options.num_embeddings() << ", embedding_dim=" << options.embedding_dim();
    if (options.padding_idx()) stream << ", padding_idx=" << *options.padding_idx();
  }
};

using LoRAEmbeddingImpl = LoRAModuleImpl<EmbeddingKind>;
/// Module holder for `LoRAEmbeddingImpl`, used like `torch::nn::Embedding`.
using LoRAEmbedding = LoRAModule<EmbeddingKind>;

}  // namespace lora
