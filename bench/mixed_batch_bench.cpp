// Serving many adapters on one base: a batch of 32 sentences whose examples use N different
// adapters (round robin), three ways, on a BERT-mini shape (256 hidden, 4 layers, r = 8 on
// query and value, a classifier head per adapter), 48 tokens, eval, no grad:
// - BM_MixedBatch: one forward with lora::MixedBatch (the base once, each adapter's rows added);
// - BM_LoopedSubBatches: one forward per adapter over its examples (PEFT's adapter_names=);
// - BM_MergePerRequest: per example, merge its adapter, forward, unmerge;
// against BM_OneAdapter: the same batch with one adapter active and no routing.
//
//   build/bench/lora-mixed-bench --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true \
//       --benchmark_report_aggregates_only=true

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <lora/lora.hpp>
#include <lora/models/bert.hpp>

#include "bert_mini.hpp"

namespace {

constexpr int64_t kBatch = 32;
constexpr int64_t kLength = 48;

/// One model holding `adapters` adapters ("a0", "a1", ...), each with its own values and head.
struct Served {
  explicit Served(int64_t adapters) : model(bert_mini_config()) {
    torch::manual_seed(0);
    const auto config =
        lora::LoraConfig(lora::LoRAOptions(8).alpha(16)).target_modules({"query", "value"}).task_type("SEQ_CLS");
    for (int64_t i = 0; i < adapters; ++i) {
      names.push_back("a" + std::to_string(i));
      lora::inject(*model, config, names.back());
      torch::NoGradGuard no_grad;
      for (const auto& [path, layer] : lora::adapter_layers(*model)) {
        if (!layer->has_adapter(names.back())) continue;
        for (auto& item : layer->adapter_state(names.back())) item.second.normal_(0.0, 0.02);
      }
    }
    for (int64_t i = 0; i < kBatch; ++i) per_example.push_back(names[static_cast<size_t>(i) % names.size()]);
    ids = torch::randint(1000, 30000, {kBatch, kLength}, torch::kLong);
    mask = torch::ones({kBatch, kLength}, torch::kLong);
    for (int64_t i = 0; i < kBatch; ++i) mask[i].slice(0, kLength - (i * 7) % 24).zero_();  // some padding
    model->eval();
  }
  lora::models::BertForSequenceClassification model;
  std::vector<std::string> names;
  std::vector<std::string> per_example;
  torch::Tensor ids;
  torch::Tensor mask;
};

/// Built once per adapter count: injecting 64 adapters is not what is measured.
Served& served(int64_t adapters) {
  static std::map<int64_t, std::unique_ptr<Served>> cache;
  auto& entry = cache[adapters];
  if (!entry) entry = std::make_unique<Served>(adapters);
  return *entry;
}

void BM_OneAdapter(benchmark::State& state) {
  auto& s = served(state.range(0));
  torch::NoGradGuard no_grad;
  lora::set_adapter(*s.model, s.names.front());
  for (auto _ : state) benchmark::DoNotOptimize(s.model->forward(s.ids, s.mask));
}

void BM_MixedBatch(benchmark::State& state) {
  auto& s = served(state.range(0));
  torch::NoGradGuard no_grad;
  for (auto _ : state) {
    lora::MixedBatch mix(*s.model, s.per_example);
    benchmark::DoNotOptimize(s.model->forward(s.ids, s.mask));
  }
}

void BM_LoopedSubBatches(benchmark::State& state) {
  auto& s = served(state.range(0));
  torch::NoGradGuard no_grad;
  // Row indices per adapter, as a caller grouping its requests would hold them.
  std::vector<torch::Tensor> rows;
  for (size_t a = 0; a < s.names.size(); ++a) {
    std::vector<int64_t> mine;
    for (int64_t i = 0; i < kBatch; ++i) {
      if (s.per_example[static_cast<size_t>(i)] == s.names[a]) mine.push_back(i);
    }
    rows.push_back(torch::tensor(mine, torch::kLong));
  }
  for (auto _ : state) {
    auto logits = torch::empty({kBatch, bert_mini_config().num_labels});
    for (size_t a = 0; a < s.names.size(); ++a) {
      if (rows[a].numel() == 0) continue;
      lora::set_adapter(*s.model, s.names[a]);
      logits.index_copy_(0, rows[a], s.model->forward(s.ids.index_select(0, rows[a]), s.mask.index_select(0, rows[a])));
    }
    benchmark::DoNotOptimize(logits);
  }
}

void BM_MergePerRequest(benchmark::State& state) {
  auto& s = served(state.range(0));
  torch::NoGradGuard no_grad;
  for (auto _ : state) {
    auto logits = torch::empty({kBatch, bert_mini_config().num_labels});
    for (int64_t i = 0; i < kBatch; ++i) {
      lora::set_adapter(*s.model, s.per_example[static_cast<size_t>(i)]);
      lora::merge(*s.model);
      logits[i].copy_(s.model->forward(s.ids.slice(0, i, i + 1), s.mask.slice(0, i, i + 1))[0]);
      lora::unmerge(*s.model);
    }
    benchmark::DoNotOptimize(logits);
  }
}

}  // namespace

BENCHMARK(BM_OneAdapter)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_MixedBatch)->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoopedSubBatches)->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_MergePerRequest)->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
