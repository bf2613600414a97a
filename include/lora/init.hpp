#pragma once

/// \file
/// Data-dependent initialisations: PiSSA (SVD) and OLoRA (QR). Each returns the adapter factors
/// and the residual weight that replaces W, such that residual + s·B·A = W.

#include <tuple>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lora::init {

/// Adapter factors and the residual base weight.
struct Factors {
  at::Tensor lora_A;    ///< r × in
  at::Tensor lora_B;    ///< out × r
  at::Tensor residual;  ///< out × in, W − s·B·A, in W's dtype
};

namespace detail {

inline at::Tensor float_weight(const at::Tensor& weight, const char* method) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, method,
              ": the base weight must be floating point (got ", c10::toString(dtype), ")");
  return dtype == at::kDouble ? weight.detach() : weight.detach().to(at::kFloat);
}

inline Factors finish(at::Tensor A, at::Tensor B, const at::Tensor& w, double scaling, const at::Tensor& weight) {
  auto residual = w - scaling * at::mm(B, A);
  return {A.contiguous(), B.contiguous(), residual.to(weight.scalar_type())};
}

/// Orthonormal basis Q (m × q) of an approximate range of W, by randomized subspace iteration
/// (Halko, Martinsson & Tropp 2011, alg. 4.4), as `torch.svd_lowrank` computes it.
inline at::Tensor approximate_range(const at::Tensor& w, int64_t q, int64_t niter) {
  auto Q = std::get<0>(at::linalg_qr(at::mm(w, at::randn({w.size(1), q}, w.options())), "reduced"));
  for (int64_t i = 0; i < niter; ++i) {
    Q = std::get<0>(at::linalg_qr(at::mm(w.t(), Q), "reduced"));
    Q = std::get<0>(at::linalg_qr(at::mm(w, Q), "reduced"));
  }
  return Q;
}

}  // namespace detail

/// PiSSA: W = U S Vᵀ; A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s); residual W − s·B·A.
///
/// `niter < 0` uses the exact SVD; `niter ≥ 0` a randomized SVD with that many subspace
/// iterations (PEFT's "pissa_niter_<k>", fast on large layers), drawn from torch's generator.
inline Factors pissa(const at::Tensor& weight, int64_t r, double scaling, int64_t niter = -1) {
  TORCH_CHECK(weight.dim() == 2, "lora::init::pissa: expected a 2-D weight (got shape ", weight.sizes(), ")");
  TORCH_CHECK(r >= 1 && r <= std::min(weight.size(0), weight.size(1)), "lora::init::pissa: rank ", r,
              " must be in [1, min(out, in) = ", std::min(weight.size(0), weight.size(1)), "]");
  at::NoGradGuard no_grad;
  const auto w = detail::float_weight(weight, "lora::init::pissa");
  at::Tensor U, S, Vh;
  if (niter < 0) {
    std::tie(U, S, Vh) = at::linalg_svd(w, /*full_matrices=*/false);
  } else {
    const auto Q = detail::approximate_range(w, r, niter);
    at::Tensor Ub;
    std::tie(Ub, S, Vh) = at::linalg_svd(at::mm(Q.t(), w), /*full_matrices=*/false);
    U = at::mm(Q, Ub);
  }
  const auto sqrt_s = (S.narrow(0, 0, r) / scaling).sqrt();
  auto A = sqrt_s.unsqueeze(1) * Vh.narrow(0, 0, r);  // diag(√S_r) · V_rᵀ
  auto B = U.narrow(1, 0, r) * sqrt_s.unsqueeze(0);   // U_r · diag(√S_r)
  return detail::finish(std::move(A), std::move(B), w, scaling, weight);
}

/// OLoRA: W = Q R; B = Q[:, :r], A = R[:r, :]; residual W − s·B·A.
inline Factors olora(const at::Tensor& weight, int64_t r, double scaling) {
  TORCH_CHECK(weight.dim() == 2, "lora::init::olora: expected a 2-D weight (got shape ", weight.sizes(), ")");
  TORCH_CHECK(r >= 1 && r <= std::min(weight.size(0), weight.size(1)), "lora::init::olora: rank ", r,
              " must be in [1, min(out, in) = ", std::min(weight.size(0), weight.size(1)), "]");
  at::NoGradGuard no_grad;
  const auto w = detail::float_weight(weight, "lora::init::olora");
  at::Tensor Q, R;
  std::tie(Q, R) = at::linalg_qr(w, "reduced");
  return detail::finish(R.narrow(0, 0, r), Q.narrow(1, 0, r), w, scaling, weight);
}

}  // namespace lora::init
