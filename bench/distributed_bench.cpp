// Data-parallel LoRA steps: one process with T threads against N processes (Gloo over
// 127.0.0.1) with T/N threads each, training on the same global batches (BERT, LoRA r 8 on
// query/value, classifier trained, AdamW), measured interleaved (1, N, 1, N, ...) and reported as
// medians, with the bytes each step all-reduces.
//
//   build/bench/lora-distributed-bench [--size mini|base] [--ranks N] [--threads T] [--batch B]
//                                      [--steps S] [--reps R]
//
// Row lengths are drawn from the SST-2 training sentences' token counts when LORA_SHARED_DIR is
// set, otherwise every row has 64 tokens.
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <lora/distributed.hpp>
#include <lora/lora.hpp>
#include <lora/models/bert_checkpoint.hpp>
#include <torch/torch.h>

#include "bert_mini.hpp"
#include "sst2_lengths.hpp"

namespace {

struct Options {
  std::string size = "mini";
  int ranks = 2, threads = 2, batch = 32, steps = 10, reps = 3;
  bool child = false;
};

lora::models::BertConfig config_for(const std::string& size) {
  if (size == "mini") return bert_mini_config();
  if (size != "base") {
    std::cerr << "--size: mini or base, not " << size << "\n";
    std::exit(2);
  }
  return {};  // BertConfig's defaults are bert-base's
}

/// The same global batches in every process: a seeded draw of row lengths, right-padded.
std::vector<lora::data::Batch> global_batches(int count, int rows, int64_t vocab) {
  auto lengths = sst2_lengths();
  if (lengths.empty()) lengths = {64};
  std::mt19937_64 random(42);
  std::vector<lora::data::Batch> batches;
  for (int b = 0; b < count; ++b) {
    std::vector<int64_t> row(static_cast<size_t>(rows));
    for (auto& length : row) length = lengths[random() % lengths.size()];
    const auto width = *std::max_element(row.begin(), row.end());
    lora::data::Batch batch;
    batch.inputs.input_ids = torch::zeros({rows, width}, torch::kLong);
    batch.inputs.attention_mask = torch::zeros({rows, width}, torch::kLong);
    batch.inputs.token_type_ids = torch::zeros({rows, width}, torch::kLong);
    batch.labels = torch::zeros({rows}, torch::kLong);
    for (int r = 0; r < rows; ++r) {
      const auto length = row[static_cast<size_t>(r)];
      batch.inputs.input_ids[r].narrow(0, 0, length).random_(1000, vocab);
      batch.inputs.attention_mask[r].narrow(0, 0, length).fill_(1);
      batch.labels[r] = static_cast<int64_t>(random() % 2);
      batch.indices.push_back(r);
    }
    batches.push_back(std::move(batch));
  }
  return batches;
}

/// One rank (or the single process): prints "median_ms bytes_per_step" on rank 0.
int run_child(const Options& options) {
  torch::manual_seed(7);
  lora::distributed::ProcessGroup group(lora::distributed::options_from_environment());
  const auto config = config_for(options.size);
  lora::models::BertForSequenceClassification model(config);
  lora::models::init_bert_weights(*model);
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(8).alpha(16).dropout(0.1))
                           .target_modules({"query", "value"})
                           .modules_to_save({"classifier"}));
  model->train();
  std::vector<torch::Tensor> parameters;
  for (const auto& parameter : model->parameters()) {
    if (parameter.requires_grad()) parameters.push_back(parameter);
  }
  group.broadcast(parameters);
  lora::distributed::GradientSyncOptions sync_options;
  sync_options.average = false;
  lora::distributed::GradientSynchronizer sync(group, parameters, sync_options);
  torch::optim::AdamW optimizer(parameters, torch::optim::AdamWOptions(1e-4));
  const int warmup = 2;
  const auto batches = global_batches(options.steps + warmup, options.batch, config.vocab_size);
  std::vector<double> milliseconds;
  for (size_t step = 0; step < batches.size(); ++step) {
    group.barrier();  // every rank starts the step together: the time is the slowest rank's
    const auto start = std::chrono::steady_clock::now();
    const auto& batch = batches[step];
    optimizer.zero_grad();
    if (const auto share = lora::distributed::shard(batch, group.rank(), group.world_size())) {
      const auto logits = model->forward(share->inputs.input_ids, share->inputs.attention_mask,
                                         share->inputs.token_type_ids);
      const auto loss = torch::nn::functional::cross_entropy(
                            logits, share->labels,
                            torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
                        static_cast<double>(batch.labels.size(0));
      loss.backward();
    }
    sync.synchronize();
    optimizer.step();
    if (step >= static_cast<size_t>(warmup)) {
      milliseconds.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
  }
  std::sort(milliseconds.begin(), milliseconds.end());
  if (group.is_main()) {
    const size_t bytes = group.world_size() > 1 ? sync.bytes_per_step() : 0;
    std::printf("%.3f %zu\n", milliseconds[milliseconds.size() / 2], bytes);
  }
  return 0;
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

/// Runs `world` processes of this program as ranks; returns rank 0's median and bytes.
std::pair<double, size_t> run_case(const Options& options, int world) {
  std::ostringstream command;
  const int port = free_port();
  const int threads = std::max(1, options.threads / world);
  const std::string self = "/proc/" + std::to_string(::getpid()) + "/exe";
  std::ostringstream args;
  args << " --child --size " << options.size << " --batch " << options.batch << " --steps " << options.steps;
  for (int rank = world - 1; rank >= 0; --rank) {
    command << "WORLD_SIZE=" << world << " RANK=" << rank << " MASTER_ADDR=127.0.0.1 MASTER_PORT=" << port
            << " OMP_NUM_THREADS=" << threads << " " << self << args.str() << " --threads " << threads
            << (rank > 0 ? " > /dev/null & " : "; wait");
  }
  FILE* pipe = ::popen(command.str().c_str(), "r");
  double median = 0;
  size_t bytes = 0;
  if (pipe == nullptr || std::fscanf(pipe, "%lf %zu", &median, &bytes) != 2) {
    std::cerr << "a run of " << world << " process(es) failed: " << command.str() << "\n";
    std::exit(1);
  }
  ::pclose(pipe);
  return {median, bytes};
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << arg << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--size") {
      options.size = value();
    } else if (arg == "--ranks") {
      options.ranks = std::stoi(value());
    } else if (arg == "--threads") {
      options.threads = std::stoi(value());
    } else if (arg == "--batch") {
      options.batch = std::stoi(value());
    } else if (arg == "--steps") {
      options.steps = std::stoi(value());
    } else if (arg == "--reps") {
      options.reps = std::stoi(value());
    } else if (arg == "--child") {
      options.child = true;
    } else {
      std::cerr << "unknown argument " << arg << " (see the comment at the top of bench/distributed_bench.cpp)\n";
      return 2;
    }
  }
  torch::set_num_threads(options.threads);
  if (options.child) return run_child(options);

  std::cout << "BERT " << options.size << ", LoRA r8 q,v + classifier, global batch " << options.batch << ", "
            << (std::getenv("LORA_SHARED_DIR") ? "SST-2 lengths" : "64 tokens per row") << ", " << options.threads
            << " threads in all; median of " << options.steps << " steps per run, " << options.reps
            << " interleaved runs\n";
  std::vector<double> ratios;
  for (int rep = 0; rep < options.reps; ++rep) {
    const auto one = run_case(options, 1);
    const auto many = run_case(options, options.ranks);
    ratios.push_back(one.first / many.first);
    std::printf("run %d: 1 process x %d threads %.1f ms/step | %d processes x %d threads %.1f ms/step "
                "(%zu bytes all-reduced per step) | 1/%d = %.2f\n",
                rep + 1, options.threads, one.first, options.ranks, std::max(1, options.threads / options.ranks),
                many.first, many.second, options.ranks, one.first / many.first);
  }
  std::sort(ratios.begin(), ratios.end());
  std::printf("median speed-up of %d processes over 1: %.2f\n", options.ranks, ratios[ratios.size() / 2]);
  return 0;
}
