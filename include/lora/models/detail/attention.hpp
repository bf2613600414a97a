#pragma once

/// \file
/// Multi-head scaled dot-product attention as transformers' eager BERT computes it,
/// softmax(q kᵀ / √d + mask) v with dropout on the probabilities, with fewer passes over the
/// [batch, heads, seq, seq] scores: the scale and the mask are folded into one `baddbmm_`, and
/// the softmax runs in place when nothing needs its input. On LibTorch 2.x the fused
/// `scaled_dot_product_attention` does the same without the head-first copies.

#include <cmath>

#include <ATen/ATen.h>
#include <torch/version.h>

namespace lora::models::detail {

/// `q`, `k`, `v` are the projections [batch, seq, hidden]; `additive_mask` is [batch, 1, 1, seq]
/// (0 for tokens, the dtype's minimum for padding) or undefined. Returns [batch, seq, hidden].
inline at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                       const at::Tensor& additive_mask, double dropout_p, bool training) {
  const auto batch = q.size(0), seq = q.size(1), hidden = q.size(2), head_size = hidden / heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_size));
  auto heads_first = [&](const at::Tensor& t) { return t.view({batch, seq, heads, head_size}).transpose(1, 2); };
  const bool dropping = training && dropout_p > 0.0;
#if TORCH_VERSION_MAJOR >= 2
  // The fused kernel reads the strided views as they are and never materialises the scores
  // on the paths that allow it; the default scale is 1/√d, as here.
  const auto context = at::scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), additive_mask,
                                                        dropping ? dropout_p : 0.0, false);
  return context.transpose(1, 2).reshape({batch, seq, hidden});
#else
  const auto batch_heads = batch * heads;
  const auto q3 = heads_first(q).reshape({batch_heads, seq, head_size});
  const auto k3 = heads_first(k).reshape({batch_heads, seq, head_size});
  const auto v3 = heads_first(v).reshape({batch_heads, seq, head_size});
  at::Tensor scores;
  if (additive_mask.defined()) {
    // One write of the broadcast mask, then the product accumulates onto it, scaled: the same
    // sums as (q kᵀ)/√d + mask (exactly so when √d is a power of two, as in every BERT size).
    scores = additive_mask.to(q.scalar_type()).expand({batch, heads, seq, seq}).contiguous().view({batch_heads, seq, seq});
    scores.baddbmm_(q3, k3.transpose(1, 2), /*beta=*/1.0, /*alpha=*/scale);
  } else {
    scores = at::bmm(q3, k3.transpose(1, 2)).mul_(scale);
  }
  // Autograd keeps the softmax's output, not its input: in place is safe unless the scores
  // themselves are recorded for a gradient (then the out-of-place op keeps the graph simple).
  const auto probs = scores.requires_grad() ? at::softmax(scores, -1) : at::_softmax_out(scores, scores, -1, false);
  const auto dropped = dropping ? at::dropout(probs, dropout_p, true) : probs;
  return at::bmm(dropped, v3).view({batch, heads, seq, head_size}).transpose(1, 2).reshape({batch, seq, hidden});
#endif
}

}  // namespace lora::models::detail
