// Loading a bert-base-sized checkpoint (110 M parameters, ~440 MB of float32): the safetensors
// read alone (memory-mapped) and the whole Hugging Face folder into BertForSequenceClassification.
// The checkpoint is written once to a temporary folder; the timed loads find it in the page
// cache ("warm").
//
//   build/bench/lora-checkpoint-bench [--benchmark_repetitions=5 --benchmark_report_aggregates_only=true]
#include <filesystem>
#include <thread>

#include <benchmark/benchmark.h>
#include <lora/models/bert_checkpoint.hpp>
#include <torch/torch.h>

namespace {

const std::string& checkpoint() {
  static const std::string folder = [] {
    const auto dir = std::filesystem::temp_directory_path() / "lora-bench-bert-base";
    if (!std::filesystem::exists(dir / "model.safetensors")) {
      lora::models::BertConfig config;  // bert-base: 12 layers, hidden 768
      lora::models::BertForSequenceClassification model(config);
      lora::models::save_bert(*model, dir.string());
    }
    return dir.string();
  }();
  return folder;
}

void BM_ReadSafetensors(benchmark::State& state) {
  const auto file = checkpoint() + "/model.safetensors";
  for (auto _ : state) {
    auto tensors = lora::io::load_safetensors(file);
    benchmark::DoNotOptimize(tensors.tensors.size());
  }
}

void BM_ReadSafetensorsAndTouch(benchmark::State& state) {
  const auto file = checkpoint() + "/model.safetensors";
  for (auto _ : state) {
    auto tensors = lora::io::load_safetensors(file);
    double sum = 0;
    for (const auto& item : tensors.tensors) sum += item.value().sum().item<double>();
    benchmark::DoNotOptimize(sum);
  }
}

void BM_LoadBertFolder(benchmark::State& state) {
  const auto folder = checkpoint();
  lora::models::LoadOptions options;
  options.log = nullptr;
  for (auto _ : state) {
    auto model = lora::models::load_bert_for_sequence_classification(folder, options);
    benchmark::DoNotOptimize(model.ptr());
  }
}

}  // namespace

BENCHMARK(BM_ReadSafetensors)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ReadSafetensorsAndTouch)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoadBertFolder)->Unit(benchmark::kMillisecond)->UseRealTime();
