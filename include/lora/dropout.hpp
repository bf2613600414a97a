#pragma once

/// \file
/// `lora::dropout`: inverted dropout whose mask is drawn in parallel. LibTorch's CPU dropout
/// draws one Bernoulli variate at a time from a single Mersenne Twister (15 ns per element on
/// the reference machine, a quarter of a BERT training step); here each block of elements has
/// its own counter-based Philox stream, so threads draw at once and the result does not depend
/// on how many there are. Same distribution and scaling as `at::dropout`, different draws.

#include <cstdint>
#include <mutex>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/util/Exception.h>

namespace lora {

namespace detail {

/// Elements per Philox stream: large enough that starting a stream costs nothing, small enough
/// that two threads split a [32, 128, 256] activation evenly.
constexpr int64_t kDropoutBlock = 1 << 14;

/// A seed for one dropout call, taken from LibTorch's default CPU generator so that
/// `torch::manual_seed` makes training reproducible.
inline uint64_t dropout_seed() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(generator)->random64();
}

/// 1/(1-p) where a uniform 32-bit draw is at least p·2³², else 0.
template <typename T>
void fill_dropout_noise(T* noise, int64_t count, double p, uint64_t seed) {
  const auto threshold = static_cast<uint64_t>(p * 4294967296.0);
  const T keep = static_cast<T>(1.0 / (1.0 - p));
  const int64_t blocks = (count + kDropoutBlock - 1) / kDropoutBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      at::philox_engine draw(seed, static_cast<uint64_t>(block), 0);
      const int64_t begin = block * kDropoutBlock, end = std::min(count, begin + kDropoutBlock);
      for (int64_t i = begin; i < end; ++i) noise[i] = static_cast<uint64_t>(draw()) >= threshold ? keep : T(0);
    }
  });
}

}  // namespace detail

/// x with each element zeroed with probability `p` and the rest scaled by 1/(1-p) while
/// `training`; x itself otherwise (and at p = 0: no kernel runs). Differentiable in x. Float
/// and double CPU tensors take the parallel path; other devices and dtypes `at::dropout`.
inline at::Tensor dropout(const at::Tensor& x, double p, bool training) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "lora::dropout: probability must be in [0, 1] (got ", p, ")");
  if (!training || p == 0.0 || x.numel() == 0) return x;
  const auto dtype = x.scalar_type();
  if (!x.device().is_cpu() || (dtype != at::kFloat && dtype != at::kDouble) || p == 1.0) {
    return at::dropout(x, p, /*train=*/true);
  }
  auto noise = at::empty(x.sizes(), x.options().requires_grad(false));
  const auto seed = detail::dropout_seed();
  if (dtype == at::kFloat) {
    detail::fill_dropout_noise(noise.data_ptr<float>(), noise.numel(), p, seed);
  } else {
    detail::fill_dropout_noise(noise.data_ptr<double>(), noise.numel(), p, seed);
  }
  return x * noise;
}

}  // namespace lora
