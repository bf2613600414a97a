#pragma once

/// \file
/// `LoRAOptions`: the configuration of one LoRA adapter, and its validation.

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>

namespace lora {

/// How an adapter's `lora_A` / `lora_B` start (PEFT's `init_lora_weights`).
enum class InitKind {
  kDefault,   ///< A Kaiming-uniform (a = √5), B zeros: the adapter starts as a no-op.
  kGaussian,  ///< A ~ N(0, σ = 1/r) (PEFT's choice of σ), B zeros.
  kPiSSA,     ///< A, B from the top-r SVD of W; W is replaced by its residual.
  kOLoRA,     ///< A, B from the QR decomposition of W; W is replaced by its residual.
  kRandom,    ///< PEFT's `init_lora_weights=False`: A and B both Kaiming-uniform (not a no-op).
};

/// A parsed `init` string.
struct InitSpec {
  InitKind kind = InitKind::kDefault;
  /// For "pissa_niter_<k>": subspace iterations of the randomized SVD; -1 means exact SVD.
  int64_t niter = -1;
};

/// Parses PEFT's spellings of `init_lora_weights`:
/// "default" (or "true"), "false", "gaussian", "pissa", "pissa_niter_<k>", "olora".
///
///     lora::parse_init("pissa_niter_4");  // {kPiSSA, 4}
inline InitSpec parse_init(const std::string& init) {
  if (init == "default" || init == "true") return {InitKind::kDefault, -1};
  if (init == "false") return {InitKind::kRandom, -1};
  if (init == "gaussian") return {InitKind::kGaussian, -1};
  if (init == "pissa") return {InitKind::kPiSSA, -1};
  if (init == "olora") return {InitKind::kOLoRA, -1};
  const std::string niter_prefix = "pissa_niter_";
  if (init.rfind(niter_prefix, 0) == 0) {
    const std::string digits = init.substr(niter_prefix.size());
    const bool all_digits = !digits.empty() && digits.size() <= 6 &&
        digits.find_first_not_of("0123456789") == std::string::npos;
    TORCH_CHECK(all_digits, "LoRAOptions: init '", init,
                "' needs a non-negative iteration count after 'pissa_niter_' (e.g. 'pissa_niter_4')");
    return {InitKind::kPiSSA, std::stoll(digits)};
  }
  TORCH_CHECK(init != "loftq", "LoRAOptions: init 'loftq' is not supported (it needs a quantized base model)");
  TORCH_CHECK(false, "LoRAOptions: unknown init '", init,
              "' (expected one of: default, true, false, gaussian, pissa, pissa_niter_<k>, olora)");
  return {};  // unreachable
}

/// The spelling `parse_init` accepts for an `InitSpec` (round-trips).
inline std::string to_string(const InitSpec& spec) {
  switch (spec.kind) {
    case InitKind::kDefault: return "default";
    case InitKind::kGaussian: return "gaussian";
    case InitKind::kRandom: return "false";
    case InitKind::kOLoRA: return "olora";
    case InitKind::kPiSSA:
      return spec.niter < 0 ? "pissa" : "pissa_niter_" + std::to_string(spec.niter);
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled InitKind");
  return {};  // unreachable
}

/// Options of one LoRA adapter: rank, scaling, dropout and variant.
///
/// Defaults follow PEFT's `LoraConfig` (r 8, lora_alpha 8, lora_dropout 0).
///
///     auto options = lora::LoRAOptions(16).alpha(32).dropout(0.1).use_rslora(true);
struct LoRAOptions {
  /* implicit */ LoRAOptions(int64_t r = 8) : r_(r) {}

  /// Rank r of the update: `lora_A` is r × in, `lora_B` is out × r.
  TORCH_ARG(int64_t, r);
  /// Scale numerator: the update is multiplied by alpha / r (alpha / √r with rsLoRA). Default 8.
  TORCH_ARG(double, alpha) = 8.0;
  /// Dropout probability applied to the adapter's input only, in training mode. Default 0
  /// (no dropout kernel runs).
  TORCH_ARG(double, dropout) = 0.0;
  /// rsLoRA: scale by alpha / √r instead of alpha / r. Default false.
  TORCH_ARG(bool, use_rslora) = false;
  /// DoRA: add a trainable per-output magnitude vector (`lora_magnitude_vector`). Default false.
  TORCH_ARG(bool, use_dora) = false;
  /// Initialisation, in PEFT's spelling (see `parse_init`). Default "default".
  TORCH_ARG(std::string, init) = "default";
  /// Keep the adapter's parameters in this dtype (e.g. float32 over a bfloat16 base layer).
  /// Default: the base weight's dtype.
  TORCH_ARG(std::optional<c10::ScalarType>, adapter_dtype) = std::nullopt;

  // TORCH_ARG leaves the access at private.
 public:
  /// The factor s the update B·A is multiplied by.
  double scaling() const {
    return use_rslora_ ? alpha_ / std::sqrt(static_cast<double>(r_)) : alpha_ / static_cast<double>(r_);
  }

  /// Checks every value that does not depend on the layer; throws naming the bad value.
  void validate() const {
    TORCH_CHECK(r_ > 0, "LoRAOptions: rank r must be > 0 (got ", r_, ")");
    TORCH_CHECK(std::isfinite(alpha_) && alpha_ > 0, "LoRAOptions: alpha must be finite and > 0 (got ", alpha_, ")");
    TORCH_CHECK(dropout_ >= 0.0 && dropout_ < 1.0, "LoRAOptions: dropout must be in [0, 1) (got ", dropout_, ")");
    if (adapter_dtype_) {
      TORCH_CHECK(c10::isFloatingType(*adapter_dtype_), "LoRAOptions: adapter_dtype must be a floating type (got ",
                  c10::toString(*adapter_dtype_), ")");
    }
    parse_init(init_);
  }
};

}  // namespace lora
