// Whole-model cost of fine-tuning BERT with lora: training steps (LoRA r=8 on query/value with
// the classifier saved, and full fine-tuning), evaluation forwards, single-sentence latency
// (base, LoRA unmerged, LoRA merged), at a mini and at the bert-base shape. Every case of one
// run is measured interleaved (A B C … A B C …) and reported as a median, beside a 1024³ GEMM
// probe of the same run, so that shares and ratios compare like with like.
//
//   build/bench/lora-model-bench [--size mini|base|all] [--reps N] [--steps N] [--threads N]
//                                [--only SUBSTRING] [--rss]
//
// SST-2 lengths (the `*_sst2` cases) need ../shared: set LORA_SHARED_DIR. `--rss` measures the
// peak resident memory of each training mode in a process of its own.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <lora/data/tsv.hpp>
#include <lora/lora.hpp>
#include <lora/models/bert.hpp>
#include <lora/models/bert_checkpoint.hpp>
#include <lora/tokenizers/wordpiece.hpp>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include "bert_mini.hpp"
#include "sst2_lengths.hpp"

namespace {

using lora::models::BertConfig;
using lora::models::BertForSequenceClassification;

struct Size {
  std::string name;
  BertConfig config;
  int64_t latency_tokens = 0;  ///< the single-sentence case
};

Size mini_size() { return {"mini", bert_mini_config(), 16}; }

Size base_size() {
  Size size{"base", {}, 64};  // BertConfig's defaults are bert-base's
  return size;
}

struct Batch {
  torch::Tensor ids, mask, types, labels;
  int64_t tokens = 0;  ///< real tokens (not padding)
};

/// Rows of `lengths[i]` tokens ([CLS] words [SEP]), right-padded to the longest.
Batch make_batch(const std::vector<int64_t>& lengths, int64_t vocab, std::mt19937_64& random) {
  const auto rows = static_cast<int64_t>(lengths.size());
  const auto width = *std::max_element(lengths.begin(), lengths.end());
  Batch batch{torch::zeros({rows, width}, torch::kLong), torch::zeros({rows, width}, torch::kLong),
              torch::zeros({rows, width}, torch::kLong), torch::zeros({rows}, torch::kLong)};
  auto ids = batch.ids.accessor<int64_t, 2>();
  auto mask = batch.mask.accessor<int64_t, 2>();
  std::uniform_int_distribution<int64_t> word(1000, vocab - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const auto length = lengths[static_cast<size_t>(r)];
    for (int64_t c = 0; c < length; ++c) {
      ids[r][c] = c == 0 ? 101 : c == length - 1 ? 102 : word(random);
      mask[r][c] = 1;
    }
    batch.labels[r] = static_cast<int64_t>(random() % 2);
    batch.tokens += length;
  }
  return batch;
}

/// Multiply-adds ×2 of one forward pass: the linear layers, and attention's two batched products.
struct Flops {
  double linear = 0, attention = 0;
};

Flops forward_flops(const BertConfig& config, const std::vector<int64_t>& lengths) {
  const double H = static_cast<double>(config.hidden_size), I = static_cast<double>(config.intermediate_size);
  Flops flops;
  for (const auto length : lengths) {
    const double L = static_cast<double>(length);
    flops.linear += config.num_hidden_layers * L * 2 * (4 * H * H + 2 * H * I);
  }
  const double width = static_cast<double>(*std::max_element(lengths.begin(), lengths.end()));
  // Attention runs on the padded batch: QKᵀ and PV, each 2·L²·H per row.
  flops.attention = config.num_hidden_layers * static_cast<double>(lengths.size()) * 2 * 2 * width * width * H;
  // The padded positions go through the linear layers too.
  flops.linear *= width * static_cast<double>(lengths.size()) /
                  std::accumulate(lengths.begin(), lengths.end(), 0.0, [](double a, int64_t b) { return a + b; });
  return flops;
}

BertForSequenceClassification make_model(const BertConfig& config) {
  torch::manual_seed(0);
  BertForSequenceClassification model(config);
  lora::models::init_bert_weights(*model, 0.02, config.pad_token_id);
  return model;
}

lora::LoraConfig lora_config() {
  return lora::LoraConfig(lora::LoRAOptions(8).alpha(16)).target_modules({"query", "value"}).task_type("SEQ_CLS");
}

/// B ≠ 0, so that an unmerged adapter does its work and a merge changes the weights.
void randomize_adapters(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (const auto& item : model.named_parameters()) {
    if (item.key().find("lora_B") != std::string::npos) item.value().normal_(0.0, 0.02);
  }
}

/// One timed case: `run` does one step (or one forward).
struct Case {
  std::string name;
  std::function<void()> run;
  double flops = 0;      ///< per call, 0 when not counted
  double tokens = 0;     ///< real tokens per call
  std::vector<double> ms;
};

struct Trainer {
  BertForSequenceClassification model{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer;

  /// `int8`: the frozen base stored int8 (`lora::quantize_base`), LoRA only.
  Trainer(const BertConfig& config, bool full, bool int8 = false) : model(make_model(config)) {
    if (full) {
      lora::mark_all_as_trainable(*model);
    } else {
      lora::inject(*model, lora_config());
      if (int8) lora::quantize_base(*model);
    }
    std::vector<torch::Tensor> trainable;
    for (const auto& parameter : model->parameters()) {
      if (parameter.requires_grad()) trainable.push_back(parameter);
    }
    optimizer = std::make_unique<torch::optim::AdamW>(trainable, torch::optim::AdamWOptions(1e-4).weight_decay(0.0));
    model->train();
  }

  void step(const Batch& batch) {
    optimizer->zero_grad();
    const auto logits = model(batch.ids, batch.mask, batch.types);
    torch::nn::functional::cross_entropy(logits, batch.labels).backward();
    optimizer->step();
  }
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const auto n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

int64_t peak_rss_mb() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024;  // Linux: kilobytes
}

struct Options {
  std::vector<Size> sizes;
  int reps = 5, steps = 3, threads = 0;
  std::string only;
  bool rss = false;
  std::string profile;    ///< a case to run under LibTorch's profiler, printing its top operators
  std::string rss_child;  ///< "size:mode": run one training mode and print its peak RSS
};

/// Peak RSS of one training mode, in this process: a few steps, then the high-water mark.
int rss_child(const std::string& spec) {
  const auto colon = spec.find(':');
  const auto size = spec.substr(0, colon) == "base" ? base_size() : mini_size();
  const auto mode = spec.substr(colon + 1);
  std::mt19937_64 random(1);
  const auto batch = make_batch(std::vector<int64_t>(32, 128), size.config.vocab_size, random);
  if (mode == "eval" || mode == "eval-int8") {
    auto model = make_model(size.config);
    if (mode == "eval-int8") lora::quantize_base(*model);
    model->eval();
    torch::NoGradGuard no_grad;
    for (int i = 0; i < 3; ++i) model(batch.ids, batch.mask, batch.types);
  } else {
    Trainer trainer(size.config, mode == "full", mode == "lora-int8");
    for (int i = 0; i < 3; ++i) trainer.step(batch);
  }
  std::cout << "peak_rss_mb=" << peak_rss_mb() << "\n";
  return 0;
}

/// Runs `c` a few times under the profiler and prints the operators by self time (time not
/// spent in the operators they call), per call of the case.
void profile_case(Case& c, int calls) {
  std::stringstream trace;
  {
    torch::autograd::profiler::RecordProfile guard(trace);
    for (int i = 0; i < calls; ++i) c.run();
  }
  const auto events = nlohmann::json::parse(trace.str());
  struct Span {
    double start, end;
    std::string name;
  };
  std::map<int64_t, std::vector<Span>> by_thread;
  for (const auto& event : events) {
    if (!event.contains("dur")) continue;
    const double ts = event["ts"].get<double>(), dur = event["dur"].get<double>();
    by_thread[event.value("tid", int64_t{0})].push_back({ts, ts + dur, event["name"].get<std::string>()});
  }
  std::map<std::string, std::pair<double, int64_t>> self;  // name -> (self µs, count)
  for (auto& [thread, spans] : by_thread) {
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
      return a.start < b.start || (a.start == b.start && a.end > b.end);
    });
    std::vector<std::pair<const Span*, double>> stack;  // span, time of its children
    auto close = [&](double until) {
      while (!stack.empty() && stack.back().first->end <= until) {
        const auto [span, children] = stack.back();
        stack.pop_back();
        auto& entry = self[span->name];
        entry.first += (span->end - span->start) - children;
        entry.second += 1;
        if (!stack.empty()) stack.back().second += span->end - span->start;
      }
    };
    for (const auto& span : spans) {
      close(span.start);
      stack.emplace_back(&span, 0.0);
    }
    close(std::numeric_limits<double>::infinity());
  }
  std::vector<std::pair<std::string, std::pair<double, int64_t>>> rows(self.begin(), self.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  double total = 0;
  for (const auto& row : rows) total += row.second.first;
  std::cout << "profile of " << c.name << " (" << calls << " calls), self time per call:\n";
  for (size_t i = 0; i < std::min<size_t>(rows.size(), 25); ++i) {
    const auto& [name, value] = rows[i];
    std::cout << "  " << std::left << std::setw(44) << name << std::right << std::fixed << std::setprecision(2)
              << std::setw(10) << value.first / 1000.0 / calls << " ms" << std::setw(7) << std::setprecision(1)
              << 100 * value.first / total << "%" << std::setw(8) << value.second / calls << " calls\n";
  }
  std::cout << std::defaultfloat;
}

void report_rss(const Options& options) {
  std::cout << "\npeak resident memory, one process per mode (32 x 128, 3 steps; -int8: lora::quantize_base):\n";
  for (const auto& size : options.sizes) {
    for (const std::string mode : {"eval", "eval-int8", "lora", "lora-int8", "full"}) {
      char exe[4096] = {0};
      const auto length = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
      if (length <= 0) return;
      const std::string command = std::string(exe, static_cast<size_t>(length)) + " --threads " +
                                  std::to_string(options.threads) + " --rss-child " + size.name + ":" + mode;
      FILE* pipe = ::popen(command.c_str(), "r");
      std::string output;
      char buffer[256];
      while (pipe && std::fgets(buffer, sizeof buffer, pipe)) output += buffer;
      if (pipe) ::pclose(pipe);
      const auto at = output.find("peak_rss_mb=");
      std::cout << "  " << size.name << " " << std::left << std::setw(5) << mode << std::right << " "
                << (at == std::string::npos ? std::string("?") : output.substr(at + 12, output.find('\n', at) - at - 12))
                << " MB\n";
    }
  }
}

Options parse(int argc, char** argv) {
  Options options;
  std::string size = "all";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << arg << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--size") {
      size = value();
    } else if (arg == "--reps") {
      options.reps = std::stoi(value());
    } else if (arg == "--steps") {
      options.steps = std::stoi(value());
    } else if (arg == "--threads") {
      options.threads = std::stoi(value());
    } else if (arg == "--only") {
      options.only = value();
    } else if (arg == "--rss") {
      options.rss = true;
    } else if (arg == "--profile") {
      options.profile = value();
    } else if (arg == "--rss-child") {
      options.rss_child = value();
    } else {
      std::cerr << "unknown option " << arg << "\n";
      std::exit(2);
    }
  }
  if (size == "mini" || size == "all") options.sizes.push_back(mini_size());
  if (size == "base" || size == "all") options.sizes.push_back(base_size());
  if (options.threads <= 0) options.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  const auto options = parse(argc, argv);
  torch::set_num_threads(options.threads);
  if (!options.rss_child.empty()) return rss_child(options.rss_child);

  std::vector<Case> cases;
  std::vector<std::shared_ptr<void>> keep;  // the models and batches the cases use
  auto add = [&](const std::string& name, std::function<void()> run, double flops, double tokens) {
    if (options.only.empty() || name.find(options.only) != std::string::npos) cases.push_back({name, std::move(run), flops, tokens, {}});
  };

  // The GEMM probe: what this machine's BLAS does on a large, square fp32 product.
  auto a = std::make_shared<torch::Tensor>(torch::randn({1024, 1024}));
  auto b = std::make_shared<torch::Tensor>(torch::randn({1024, 1024}));
  keep.push_back(a);
  keep.push_back(b);
  add("gemm_1024", [a, b] { at::mm(*a, *b); }, 2.0 * 1024 * 1024 * 1024, 0);

  const auto sst2 = sst2_lengths();
  std::mt19937_64 random(7);
  for (const auto& size : options.sizes) {
    const auto& config = size.config;
    const std::vector<int64_t> fixed(32, 128);
    auto fixed_batch = std::make_shared<Batch>(make_batch(fixed, config.vocab_size, random));
    keep.push_back(fixed_batch);
    const auto fixed_flops = forward_flops(config, fixed);

    // One linear layer the way LibTorch's torch::nn::Linear computes it for 3-D input (matmul,
    // then a separate bias add) against at::linear (one addmm on the flattened input): forward,
    // and forward + backward to the input (a frozen weight, as in LoRA training).
    for (const int64_t out : {config.hidden_size, config.intermediate_size}) {
      auto x = std::make_shared<torch::Tensor>(torch::randn({32, 128, config.hidden_size}).requires_grad_(true));
      auto w = std::make_shared<torch::Tensor>(torch::randn({out, config.hidden_size}) * 0.02);
      auto bias = std::make_shared<torch::Tensor>(torch::zeros({out}));
      keep.push_back(x);
      keep.push_back(w);
      keep.push_back(bias);
      const double flops = 2.0 * 32 * 128 * static_cast<double>(config.hidden_size) * static_cast<double>(out);
      const auto shape = std::to_string(config.hidden_size) + "x" + std::to_string(out);
      add(size.name + "_op_nn_linear_" + shape, [x, w, bias] {
        torch::NoGradGuard no_grad;
        torch::nn::functional::linear(*x, *w, *bias);
      }, flops, 0);
      add(size.name + "_op_at_linear_" + shape, [x, w, bias] {
        torch::NoGradGuard no_grad;
        at::linear(*x, *w, *bias);
      }, flops, 0);
      add(size.name + "_op_nn_linear_bwd_" + shape, [x, w, bias] {
        torch::nn::functional::linear(*x, *w, *bias).sum().backward();
      }, 2 * flops, 0);
      add(size.name + "_op_at_linear_bwd_" + shape, [x, w, bias] { at::linear(*x, *w, *bias).sum().backward(); },
          2 * flops, 0);
    }
    const double fixed_tokens = static_cast<double>(fixed_batch->tokens);

    // Q, K and V as three products against one product with the weights stacked.
    {
      const auto H = config.hidden_size;
      auto x = std::make_shared<torch::Tensor>(torch::randn({32 * 128, H}));
      auto w = std::make_shared<torch::Tensor>(torch::randn({3 * H, H}) * 0.02);
      auto bias = std::make_shared<torch::Tensor>(torch::zeros({3 * H}));
      keep.push_back(x);
      keep.push_back(w);
      keep.push_back(bias);
      const double flops = 3 * 2.0 * 32 * 128 * static_cast<double>(H) * static_cast<double>(H);
      add(size.name + "_op_qkv_three", [x, w, bias, H] {
        torch::NoGradGuard no_grad;
        for (int64_t i = 0; i < 3; ++i) at::linear(*x, w->narrow(0, i * H, H), bias->narrow(0, i * H, H));
      }, flops, 0);
      add(size.name + "_op_qkv_fused", [x, w, bias] {
        torch::NoGradGuard no_grad;
        at::linear(*x, *w, *bias);
      }, flops, 0);
    }

    // Dropout on an activation: LibTorch's (one Mersenne Twister draw at a time) against
    // lora::dropout (Philox streams drawn in parallel), what every model dropout now calls.
    {
      auto x = std::make_shared<torch::Tensor>(torch::randn({32, 128, config.hidden_size}));
      keep.push_back(x);
      add(size.name + "_op_dropout_aten", [x] { at::dropout(*x, 0.1, true); }, 0, 0);
      add(size.name + "_op_dropout_lora", [x] { lora::dropout(*x, 0.1, true); }, 0, 0);
    }

    auto lora = std::make_shared<Trainer>(config, false);
    randomize_adapters(*lora->model);
    auto lora_int8 = std::make_shared<Trainer>(config, false, true);
    randomize_adapters(*lora_int8->model);
    keep.push_back(lora_int8);
    auto full = std::make_shared<Trainer>(config, true);
    keep.push_back(lora);
    keep.push_back(full);
    // LoRA step: forward, input gradients (no frozen weight gradients), attention backward.
    add(size.name + "_lora_step_32x128", [lora, fixed_batch] { lora->step(*fixed_batch); },
        2 * fixed_flops.linear + 3 * fixed_flops.attention, fixed_tokens);
    add(size.name + "_lora_int8_step_32x128", [lora_int8, fixed_batch] { lora_int8->step(*fixed_batch); },
        2 * fixed_flops.linear + 3 * fixed_flops.attention, fixed_tokens);
    add(size.name + "_full_step_32x128", [full, fixed_batch] { full->step(*fixed_batch); },
        3 * (fixed_flops.linear + fixed_flops.attention), fixed_tokens);
    auto plain = std::make_shared<BertForSequenceClassification>(make_model(config));
    (*plain)->eval();
    keep.push_back(plain);
    add(size.name + "_eval_32x128",
        [plain, fixed_batch] {
          torch::NoGradGuard no_grad;
          (*plain)(fixed_batch->ids, fixed_batch->mask, fixed_batch->types);
        },
        fixed_flops.linear + fixed_flops.attention, fixed_tokens);
    auto plain_int8 = std::make_shared<BertForSequenceClassification>(make_model(config));
    lora::quantize_base(**plain_int8);
    (*plain_int8)->eval();
    keep.push_back(plain_int8);
    add(size.name + "_eval_int8_32x128",
        [plain_int8, fixed_batch] {
          torch::NoGradGuard no_grad;
          (*plain_int8)(fixed_batch->ids, fixed_batch->mask, fixed_batch->types);
        },
        fixed_flops.linear + fixed_flops.attention, fixed_tokens);

    if (!sst2.empty()) {
      // A fresh batch of 32 SST-2 lengths per call (seeded), dynamic padding.
      auto batches = std::make_shared<std::vector<Batch>>();
      std::vector<double> flops;
      double tokens = 0;
      std::uniform_int_distribution<size_t> pick(0, sst2.size() - 1);
      for (int i = 0; i < 16; ++i) {
        std::vector<int64_t> lengths;
        for (int r = 0; r < 32; ++r) lengths.push_back(sst2[pick(random)]);
        batches->push_back(make_batch(lengths, config.vocab_size, random));
        const auto f = forward_flops(config, lengths);
        flops.push_back(2 * f.linear + 3 * f.attention);
        tokens += static_cast<double>(batches->back().tokens);
      }
      keep.push_back(batches);
      auto next = std::make_shared<size_t>(0);
      keep.push_back(next);
      add(size.name + "_lora_step_sst2",
          [lora, batches, next] { lora->step((*batches)[(*next)++ % batches->size()]); },
          std::accumulate(flops.begin(), flops.end(), 0.0) / static_cast<double>(flops.size()),
          tokens / static_cast<double>(batches->size()));
    }

    // Single sentence, evaluation: the base model, an unmerged r=8 adapter, the same merged.
    auto sentence = std::make_shared<Batch>(make_batch({size.latency_tokens}, config.vocab_size, random));
    keep.push_back(sentence);
    auto unmerged = std::make_shared<BertForSequenceClassification>(make_model(config));
    lora::inject(**unmerged, lora_config());
    randomize_adapters(**unmerged);
    (*unmerged)->eval();
    auto merged = std::make_shared<BertForSequenceClassification>(make_model(config));
    lora::inject(**merged, lora_config());
    randomize_adapters(**merged);
    lora::merge(**merged);
    (*merged)->eval();
    keep.push_back(unmerged);
    keep.push_back(merged);
    const auto one = forward_flops(config, {size.latency_tokens});
    for (const auto& [label, model] : std::vector<std::pair<std::string, std::shared_ptr<BertForSequenceClassification>>>{
             {"base", plain}, {"lora", unmerged}, {"merged", merged}, {"int8", plain_int8}}) {
      add(size.name + "_latency_" + std::to_string(size.latency_tokens) + "_" + label,
          [model = model, sentence] {
            torch::NoGradGuard no_grad;
            (*model)(sentence->ids, sentence->mask, sentence->types);
          },
          one.linear + one.attention, static_cast<double>(sentence->tokens));
    }
  }

  for (auto& c : cases) c.run();  // warm-up: allocator, OpenMP pool, first-touch
  if (!options.profile.empty()) {
    for (auto& c : cases) {
      if (c.name == options.profile) profile_case(c, options.steps);
    }
    return 0;
  }
  for (int rep = 0; rep < options.reps; ++rep) {
    for (auto& c : cases) {
      for (int step = 0; step < options.steps; ++step) {
        const auto start = std::chrono::steady_clock::now();
        c.run();
        c.ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
    }
  }

  double probe = 0;
  for (const auto& c : cases) {
    if (c.name == "gemm_1024") probe = c.flops / (median(c.ms) * 1e-3) / 1e9;
  }
  std::cout << "lora-model-bench: " << options.threads << " threads, " << options.reps << " interleaved repetitions x "
            << options.steps << " calls per case, medians" << (sst2.empty() ? " (no LORA_SHARED_DIR: no SST-2 cases)" : "")
            << "\n\n"
            << std::left << std::setw(30) << "case" << std::right << std::setw(11) << "median ms" << std::setw(10)
            << "min" << std::setw(10) << "max" << std::setw(12) << "tokens/s" << std::setw(10) << "GFLOP/s"
            << std::setw(10) << "of GEMM" << "\n";
  for (const auto& c : cases) {
    const double ms = median(c.ms);
    const double gflops = c.flops > 0 ? c.flops / (ms * 1e-3) / 1e9 : 0;
    std::cout << std::left << std::setw(30) << c.name << std::right << std::fixed << std::setprecision(2)
              << std::setw(11) << ms << std::setw(10) << *std::min_element(c.ms.begin(), c.ms.end()) << std::setw(10)
              << *std::max_element(c.ms.begin(), c.ms.end()) << std::setprecision(0) << std::setw(12)
              << (c.tokens > 0 ? c.tokens / (ms * 1e-3) : 0) << std::setprecision(1) << std::setw(10) << gflops
              << std::setw(9) << (probe > 0 && c.flops > 0 ? 100 * gflops / probe : 0) << "%\n";
  }
  std::cout << std::defaultfloat;
  if (options.rss) report_rss(options);
  return 0;
}
