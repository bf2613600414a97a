// Cost of a LoRA adapter on one BERT-base projection (768 → 768, 32 × 128 tokens, r = 8):
// forward in evaluation, forward + backward in training, merged, and against the textbook
// out-of-place formulation (what PEFT writes: result + B(A(x)) · s), and the re-parametrised
// weight the TorchScript path trains through; then the same through lora::make_adaptable (a plain
// torch::nn::Linear member re-parametrised in place) and for a 3×3 convolution (LoRAConv2d
// against the plain Conv2d and its in-place adaptation).
//
//   build/bench/lora-bench --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true \
//       --benchmark_report_aggregates_only=true
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

// A user's module with a plain Linear member, adapted by lora::make_adaptable.
struct HolderImpl : torch::nn::Module {
  HolderImpl() { proj = register_module("proj", torch::nn::Linear(kHidden, kHidden)); }
  torch::Tensor forward(const torch::Tensor& x) { return proj->forward(x); }
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Holder);

struct InPlaceSetup {
  InPlaceSetup() {
    torch::manual_seed(0);
    const auto config = lora::LoraConfig(lora::LoRAOptions(kRank).alpha(16)).target_modules({"proj"});
    adaptable = lora::make_adaptable(*holder, config);
    lora::inject(*holder, config);
    torch::NoGradGuard no_grad;
    for (const auto& [path, layer] : lora::lora_layers(*holder)) {
      for (auto& item : layer->adapter_state("default")) item.second.normal_();
    }
    x = torch::randn({32, 128, kHidden});
  }
  Holder holder;
  lora::AdaptableLayers adaptable;
  torch::Tensor x;
};

void BM_InPlaceForward(benchmark::State& state) {
  InPlaceSetup s;
  torch::NoGradGuard no_grad;
  s.holder->eval();
  for (auto _ : state) benchmark::DoNotOptimize(s.adaptable.run([&] { return s.holder->forward(s.x); }));
}

void BM_InPlaceTrainStep(benchmark::State& state) {
  InPlaceSetup s;
  for (auto _ : state) {
    s.adaptable.run([&] { return s.holder->forward(s.x); }).sum().backward();
  }
}

// 3×3 convolution, 64 → 64 channels, 16 images of 32×32, r = 8.
struct ConvSetup {
  ConvSetup() {
    torch::manual_seed(0);
    base = torch::nn::Conv2d(torch::nn::Conv2dOptions(64, 64, 3).padding(1));
    layer = lora::LoRAConv2d(base, lora::LoRAOptions(kRank).alpha(16));
    torch::NoGradGuard no_grad;
    layer->lora_B("default").normal_();
    x = torch::randn({16, 64, 32, 32});
  }
  torch::nn::Conv2d base{nullptr};
  lora::LoRAConv2d layer{nullptr};
  torch::Tensor x;
};

void BM_Conv2dForward(benchmark::State& state) {
  ConvSetup s;
  torch::NoGradGuard no_grad;
  for (auto _ : state) benchmark::DoNotOptimize(s.base(s.x));
}

void BM_LoRAConv2dForward(benchmark::State& state) {
  ConvSetup s;
  torch::NoGradGuard no_grad;
  s.layer->eval();
  for (auto _ : state) benchmark::DoNotOptimize(s.layer(s.x));
}

void BM_LoRAConv2dTrainStep(benchmark::State& state) {
  ConvSetup s;
  s.layer->train();
  for (auto _ : state) s.layer(s.x).sum().backward();
}

void BM_ReparametrizedConv2dTrainStep(benchmark::State& state) {
  ConvSetup s;
  for (auto _ : state) {
    torch::conv2d(s.x, s.layer->adapted_weight(), s.base->bias, 1, 1).sum().backward();
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

BENCHMARK(BM_InPlaceForward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_InPlaceTrainStep)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Conv2dForward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoRAConv2dForward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoRAConv2dTrainStep)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ReparametrizedConv2dTrainStep)->Unit(benchmark::kMillisecond)->UseRealTime();
