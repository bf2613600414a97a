#pragma once

/// \file
/// `lora::add_weighted_adapter`: a new adapter combined from existing ones, PEFT's
/// `LoraModel.add_weighted_adapter` with its `linear`, `cat` and `svd` combinations and PEFT's
/// formulas (PEFT 0.10 - 0.13, `src/peft/tuners/lora/model.py`).

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <lora/config.hpp>
#include <lora/detail/strings.hpp>
#include <lora/inject.hpp>
#include <lora/layer.hpp>
#include <lora/modules_to_save.hpp>
#include <lora/state_dict.hpp>

namespace lora {

/// How `add_weighted_adapter` combines adapters (PEFT's `combination_type`).
enum class Combination {
  /// A = Σ √(wᵢsᵢ)·Aᵢ, B = Σ √(wᵢsᵢ)·Bᵢ (equal ranks only). B·A then holds cross terms
  /// BᵢAⱼ: an approximation of Σ wᵢΔWᵢ, as in PEFT.
  kLinear,
  /// A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁, B₂, ...], rank Σ rᵢ: B·A = Σ wᵢsᵢBᵢAᵢ exactly.
  kCat,
  /// The truncated SVD of Σ (wᵢsᵢ)·ΔWᵢ, where ΔWᵢ = sᵢBᵢAᵢ already holds sᵢ (PEFT scales twice
  /// here; pass wᵢ / sᵢ for Σ wᵢΔWᵢ): B = U·diag(S), A = Vᵀ at rank `svd_rank`.
  kSvd,
};

struct WeightedAdapterOptions {
  /// PEFT's default is svd.
  Combination combination = Combination::kSvd;
  /// The new rank for svd; unset: the largest rank combined.
  std::optional<int64_t> svd_rank;
  /// svd only: clamps A and B to ± this quantile of their absolute entries (PEFT's `svd_clamp`).
  std::optional<double> svd_clamp;
};

namespace detail {

/// The new adapter's configuration: the first adapter's, with rank and alpha the new rank
/// (scaling 1: the arithmetic holds the scales), the union of the targets, no rank or alpha
/// patterns, no rsLoRA (PEFT keeps the first's rsLoRA flag, which made the scaling √r until
/// PEFT fixed it), and the first's saved modules.
inline LoraConfig weighted_config(const std::vector<std::shared_ptr<const LoraConfig>>& configs, int64_t rank) {
  LoraConfig config = *configs.front();
  const bool regex = !configs.front()->target_regex().empty();
  std::vector<std::string> targets;
  std::string pattern;
  for (const auto& source : configs) {
    TORCH_CHECK(source->target_regex().empty() == !regex, "lora::add_weighted_adapter: the adapters mix target_modules "
                "given as a list and as a regular expression; PEFT cannot combine those either");
    if (regex) {
      pattern += (pattern.empty() ? "(" : "|(") + source->target_regex() + ")";
    } else {
      for (const auto& target : source->target_modules()) {
        if (std::find(targets.begin(), targets.end(), target) == targets.end()) targets.push_back(target);
      }
    }
  }
  std::sort(targets.begin(), targets.end());  // PEFT's set union, written sorted
  config.target_modules(targets).target_regex(pattern).rank_pattern({}).alpha_pattern({});
  config.adapter(LoRAOptions(config.adapter()).r(rank).alpha(static_cast<double>(rank)).use_rslora(false).init("default"));
  return config;
}

/// A factor's tensors as matrices: A [r, columns], B [out, r].
inline at::Tensor as_down_matrix(const at::Tensor& A) { return A.reshape({A.size(0), -1}); }
inline at::Tensor as_up_matrix(const at::Tensor& B) { return B.reshape({B.size(0), B.size(1)}); }

}  // namespace detail

/// Adds adapter `name` to `model`, combined from `adapters` with `weights` (see `Combination`).
/// It is attached where any of them is (the union of their targets), with fresh copies of
/// their saved modules' original values (as PEFT does: no head is combined). Like any added
/// adapter it is inactive (and so frozen) where the layer had an active adapter, until
/// `set_adapter(model, name)`.
///
/// Refused, changing nothing: an empty list, weights of another count, unknown adapters, a taken
/// name, DoRA adapters, adapters attached without a model-level config, several adapters
/// with a copy of one saved module (PEFT refuses too), `linear` over different ranks or with a
/// negative wᵢsᵢ, `linear` / `cat` over rank patterns.
///
///     lora::add_weighted_adapter(*model, {"sst2", "imdb"}, {0.6, 0.4}, "movies",
///                                {lora::Combination::kCat});
inline void add_weighted_adapter(torch::nn::Module& model, const std::vector<std::string>& adapters,
                                 const std::vector<double>& weights, const std::string& name,
                                 const WeightedAdapterOptions& options = {}) {
  const char* who = "lora::add_weighted_adapter";
  TORCH_CHECK(!adapters.empty(), who, ": no adapters to combine");
  TORCH_CHECK(weights.size() == adapters.size(), who, ": ", weights.size(), " weights for ", adapters.size(), " adapters");
  const auto names = detail::all_adapter_names(model);
  TORCH_CHECK(std::find(names.begin(), names.end(), name) == names.end(), who, ": adapter '", name,
              "' exists already (the model has: ", detail::join(names), ")");
  std::vector<std::shared_ptr<const LoraConfig>> configs;
  for (const auto& adapter : adapters) {
    detail::check_model_adapter(model, adapter, "combine");
    auto config = detail::model_adapter_config(model, adapter);
    TORCH_CHECK(config != nullptr, who, ": adapter '", adapter,
                "' was added to layers directly, without a model-level config to combine");
    TORCH_CHECK(!config->adapter().use_dora(), who, ": adapter '", adapter, "' is a DoRA adapter, which has no "
                "weighted combination (its magnitude does not add up)");
    configs.push_back(config);
  }
  const auto combination = options.combination;
  for (const auto& item : adapter_layers(model)) {
    const auto& saved = item.second;
    if (std::dynamic_pointer_cast<ModulesToSaveImpl>(saved) == nullptr) continue;
    const auto holding = std::count_if(adapters.begin(), adapters.end(), [&](const std::string& adapter) {
      return saved->has_adapter(adapter);
    });
    TORCH_CHECK(holding <= 1, who, ": ", holding, " of the adapters hold a copy of saved module '", item.first,
                "'; which one the combination should keep is undefined (PEFT refuses this too)");
  }
  int64_t rank = 0;
  for (size_t i = 0; i < adapters.size(); ++i) {
    const auto& config = *configs[i];
    const auto r = config.adapter().r();
    if (combination != Combination::kSvd) {
      TORCH_CHECK(config.rank_pattern().empty() && config.alpha_pattern().empty(), who, ": adapter '", adapters[i],
                  "' has per-layer rank or alpha patterns; combine it with svd (one rank everywhere)");
    }
    if (combination == Combination::kLinear) {
      TORCH_CHECK(i == 0 || r == rank, who, ": linear needs equal ranks, but '", adapters[0], "' has r=", rank, " and '",
                  adapters[i], "' r=", r, "; use cat or svd");
      rank = r;
    } else if (combination == Combination::kCat) {
      rank += r;
    } else {
      rank = std::max(rank, r);
    }
  }
  if (combination == Combination::kSvd && options.svd_rank) {
    TORCH_CHECK(*options.svd_rank > 0, who, ": svd_rank must be positive (got ", *options.svd_rank, ")");
    rank = *options.svd_rank;
  }
  TORCH_CHECK(!options.svd_clamp || (*options.svd_clamp > 0 && *options.svd_clamp <= 1), who,
              ": svd_clamp is a quantile in (0, 1] (got ", options.svd_clamp.value_or(0), ")");
  const auto config = detail::weighted_config(configs, rank);

  // Check every layer's arithmetic before attaching anything.
  struct Source {
    at::Tensor A, B;
    double weight, scaling;
  };
  std::vector<std::pair<std::string, std::vector<Source>>> sources;
  for (const auto& [path, layer] : lora_layers(model)) {
    std::vector<Source> present;
    for (size_t i = 0; i < adapters.size(); ++i) {
      if (!layer->has_adapter(adapters[i])) continue;
      const auto state = layer->adapter_state(adapters[i]);  // A, then B
      const double scaling = layer->adapter_options(adapters[i]).scaling();
      if (combination == Combination::kLinear) {
        TORCH_CHECK(weights[i] * scaling >= 0, who, ": linear takes √(weight · scaling), but adapter '", adapters[i],
                    "' has weight ", weights[i], " (scaling ", scaling, ") in '", path, "'");
      }
      present.push_back({state[0].second, state[1].second, weights[i], scaling});
    }
    if (!present.empty()) sources.emplace_back(path, std::move(present));
  }

  inject(model, config, name);  // all or nothing; layers no adapter reaches get a zero update
  try {
    torch::NoGradGuard no_grad;
    for (const auto& item : lora_layers(model)) {
      const auto& layer = item.second;
      if (!layer->has_adapter(name)) continue;
      const auto state = layer->adapter_state(name);
      auto& A = state[0].second;
      auto& B = state[1].second;
      auto down = at::zeros({A.size(0), A.numel() / A.size(0)}, at::TensorOptions().dtype(at::kFloat).device(A.device()));
      auto up = at::zeros({B.size(0), B.size(1)}, down.options());
      const auto found = std::find_if(sources.begin(), sources.end(), [&](const auto& entry) { return entry.first == item.first; });
      const std::vector<Source> none;
      const auto& present = found == sources.end() ? none : found->second;
      if (combination == Combination::kLinear) {
        for (const auto& source : present) {
          const double c = std::sqrt(source.weight * source.scaling);
          down.add_(detail::as_down_matrix(source.A).to(at::kFloat), c);
          up.add_(detail::as_up_matrix(source.B).to(at::kFloat), c);
        }
      } else if (combination == Combination::kCat) {
        int64_t offset = 0;
        for (const auto& source : present) {
          const auto r = source.A.size(0);
          down.narrow(0, offset, r).copy_(detail::as_down_matrix(source.A) * (source.weight * source.scaling));
          up.narrow(1, offset, r).copy_(detail::as_up_matrix(source.B));
          offset += r;
        }
      } else if (!present.empty()) {
        at::Tensor delta;
        for (const auto& source : present) {
          // PEFT: (wᵢ·sᵢ) times get_delta_weight, which is sᵢ·Bᵢ·Aᵢ.
          const auto term = at::mm(detail::as_up_matrix(source.B).to(at::kFloat), detail::as_down_matrix(source.A).to(at::kFloat)) *
                            (source.scaling * source.weight * source.scaling);
          delta = delta.defined() ? delta + term : term;
        }
        const auto [U, S, Vh] = at::linalg_svd(delta, /*full_matrices=*/false);
        const auto r = std::min<int64_t>(rank, S.size(0));
        auto u = U.narrow(1, 0, r) * S.narrow(0, 0, r).unsqueeze(0);
        auto vh = Vh.narrow(0, 0, r);
        if (options.svd_clamp) {
          const auto high = at::quantile(at::cat({u.flatten(), vh.flatten()}), *options.svd_clamp).item<double>();
          u = u.clamp(-high, high);
          vh = vh.clamp(-high, high);
        }
        up.narrow(1, 0, r).copy_(u);
        down.narrow(0, 0, r).copy_(vh);
      }
      A.copy_(down.reshape(A.sizes()));
      B.copy_(up.reshape(B.sizes()));
    }
  } catch (...) {
    delete_adapter(model, name);
    throw;
  }
}

}  // namespace lora
