// Cost of a LoRA adapter on one BERT-base projection (768 → 768, 32 × 128 tokens, r = 8):
// forward in evaluation, forward + backward in training, merged, and against the textbook
// out-of-place formulation (what PEFT writes: result + B(A(x)) · s), and the re-parametrised
// weight the TorchScript path trains through.
//
//   build/bench/lora-bench [--benchmark_repetitions=5 --benchmark_report_aggregates_only=true]
#include <benchmark/benchmark.h>
#include <lora/lora.hpp>
#include <torch/torch.h>

namespace {

constexpr int64_t kTokens = 32 * 128;
constexpr int64_t kHidden = 768;
constexpr int64_t kRank = 8;

struct Setup {
  Setup() {
    torch::manual_seed(0);
    base = torch::nn::Linear(kHidden, kHidden);
    layer = lora::LoRALinear<>(base, lora::LoRAOptions(kRank).alpha(16));
    torch::NoGradGuard no_grad;
    layer->lora_B("default").normal_();
    x = torch::randn({32, 128, kHidden});
  }
  torch::nn::Linear base{nullptr};
  lora::LoRALinear<> layer{nullptr};
  torch::Tensor x;
};

void BM_LinearForward(benchmark::State& state) {
  Setup s;
  torch::NoGradGuard no_grad;
  for (auto _ : state) benchmark::DoNotOptimize(s.base(s.x));
}

void BM_LoRAForward(benchmark::State& state) {
  Setup s;
  torch::NoGradGuard no_grad;
  s.layer->eval();
  for (auto _ : state) benchmark::DoNotOptimize(s.layer(s.x));
}

void BM_LoRAForwardOutOfPlace(benchmark::State& state) {
  Setup s;
  torch::NoGradGuard no_grad;
  const auto& A = s.layer->lora_A("default");
  const auto& B = s.layer->lora_B("default");
  for (auto _ : state) {
    benchmark::DoNotOptimize(s.base(s.x) + torch::linear(torch::linear(s.x, A), B) * 2.0);
  }
}

void BM_LoRAMergedForward(benchmark::State& state) {
  Setup s;
  torch::NoGradGuard no_grad;
  s.layer->merge();
  for (auto _ : state) benchmark::DoNotOptimize(s.layer(s.x));
}

void BM_LoRATrainStep(benchmark::State& state) {
  Setup s;
  s.layer->train();
  for (auto _ : state) {
    s.layer(s.x).sum().backward();
  }
}

void BM_LoRATrainStepOutOfPlace(benchmark::State& state) {
  Setup s;
  const auto& A = s.layer->lora_A("default");
  const auto& B = s.layer->lora_B("default");
  for (auto _ : state) {
    (s.base(s.x) + torch::linear(torch::linear(s.x, A), B) * 2.0).sum().backward();
  }
}

// The TorchScript path: the layer runs as a plain linear with W + s·B·A re-built each step, so
// backward forms a full-size weight gradient before reducing it to A and B.
void BM_ReparametrizedTrainStep(benchmark::State& state) {
  Setup s;
  s.layer->train();
  for (auto _ : state) {
    torch::linear(s.x, s.layer->adapted_weight(), s.base->bias).sum().backward();
  }
}

}  // namespace

BENCHMARK(BM_LinearForward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoRAForward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoRAForwardOutOfPlace)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoRAMergedForward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoRATrainStep)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoRATrainStepOutOfPlace)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ReparametrizedTrainStep)->Unit(benchmark::kMillisecond)->UseRealTime();

int main(int argc, char** argv) {
  torch::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
