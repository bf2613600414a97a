// Tokenizer throughput on the SST-2 training sentences, one thread: WordPiece with the
// bert-base-uncased vocabulary, byte-level BPE with the golden RoBERTa vocabulary (warm: the
// per-word cache filled by earlier passes, as in a long run; cold: a new tokenizer per pass).
// Needs ../shared (set LORA_SHARED_DIR, or pass --shared=DIR first).
//
//   LORA_SHARED_DIR=$(realpath ../shared) build/bench/lora-tokenizer-bench --benchmark_repetitions=5
#include <cstdlib>
#include <iostream>
#include <string>

#include <benchmark/benchmark.h>
#include <lora/data/tsv.hpp>
#include <lora/tokenizers/bpe.hpp>
#include <lora/tokenizers/wordpiece.hpp>

namespace {

std::string shared_dir;

void BM_TokenizeSst2Train(benchmark::State& state) {
  const auto tokenizer =
      lora::tokenizers::WordPieceTokenizer::from_file(shared_dir + "/data/vocab/bert-base-uncased.txt");
  const auto examples = lora::data::read_tsv(shared_dir + "/data/sst2/train.tsv", lora::data::Layout::kGlue).examples;
  int64_t tokens = 0, bytes = 0;
  for (auto _ : state) {
    for (const auto& example : examples) {
      tokens += static_cast<int64_t>(tokenizer.tokenize_ids(example.text).size());
      bytes += static_cast<int64_t>(example.text.size());
    }
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.counters["sentences"] = static_cast<double>(examples.size());
  state.SetBytesProcessed(bytes);
}

lora::tokenizers::ByteLevelBpeTokenizer golden_bpe() {
  const auto folder = shared_dir + "/golden/families/bpe/";
  return lora::tokenizers::ByteLevelBpeTokenizer::from_files(folder + "vocab.json", folder + "merges.txt");
}

void run_bpe(benchmark::State& state, bool cold) {
  const auto examples = lora::data::read_tsv(shared_dir + "/data/sst2/train.tsv", lora::data::Layout::kGlue).examples;
  auto tokenizer = golden_bpe();
  int64_t tokens = 0, bytes = 0;
  for (auto _ : state) {
    if (cold) {
      state.PauseTiming();
      tokenizer = golden_bpe();
      state.ResumeTiming();
    }
    for (const auto& example : examples) {
      tokens += static_cast<int64_t>(tokenizer.tokenize_ids(example.text).size());
      bytes += static_cast<int64_t>(example.text.size());
    }
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.SetBytesProcessed(bytes);
}

void BM_BpeSst2TrainWarm(benchmark::State& state) { run_bpe(state, false); }
void BM_BpeSst2TrainCold(benchmark::State& state) { run_bpe(state, true); }

}  // namespace

BENCHMARK(BM_TokenizeSst2Train)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_BpeSst2TrainWarm)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_BpeSst2TrainCold)->Unit(benchmark::kMillisecond)->UseRealTime();

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]).rfind("--shared=", 0) == 0) {
    shared_dir = std::string(argv[1]).substr(9);
    --argc;
    ++argv;
  } else if (const char* env = std::getenv("LORA_SHARED_DIR")) {
    shared_dir = env;
  }
  if (shared_dir.empty()) {
    std::cerr << "lora-tokenizer-bench: set LORA_SHARED_DIR (or pass --shared=DIR) to the folder holding data/sst2\n";
    return 2;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
