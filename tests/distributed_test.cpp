// lora::distributed: process groups, gradient synchronisation and sharding, with every rank a
// thread of this process (a real Gloo group over a FileStore or a TCPStore on 127.0.0.1).
// Processes, SIGKILL included, are tested end to end by tests/examples/sentiment_distributed_test.sh.
#include <chrono>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lora/distributed.hpp>
#include <lora/models/bert_checkpoint.hpp>

#include "test_helpers.hpp"

using lora::distributed::DistributedOptions;
using lora::distributed::GradientSynchronizer;
using lora::distributed::GradientSyncOptions;
using lora::distributed::ProcessGroup;

namespace {

class DistributedTest : public lora::testing::TempDirTest {
 protected:
  /// Runs `body(group)` on `world` threads, one rank each; returns each rank's error ("" if none).
  std::vector<std::string> run_ranks(int world, const std::function<void(ProcessGroup&)>& body,
                                     std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
    const auto store = path("store-" + std::to_string(++groups_));
    std::vector<std::string> errors(static_cast<size_t>(world));
    std::vector<std::thread> threads;
    for (int rank = 0; rank < world; ++rank) {
      threads.emplace_back([&, rank] {
        try {
          DistributedOptions options;
          options.rank = rank;
          options.world_size = world;
          options.store_file = store;
          options.timeout = timeout;
          ProcessGroup group(options);
          body(group);
        } catch (const std::exception& error) {
          errors[static_cast<size_t>(rank)] = error.what();
          if (errors[static_cast<size_t>(rank)].empty()) errors[static_cast<size_t>(rank)] = "(empty message)";
        }
      });
    }
    for (auto& thread : threads) thread.join();
    return errors;
  }
  int groups_ = 0;
};

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

lora::models::BertConfig tiny_config() {
  lora::models::BertConfig config;
  config.vocab_size = 40;
  config.hidden_size = 16;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 2;
  config.intermediate_size = 32;
  config.max_position_embeddings = 16;
  config.hidden_dropout_prob = 0.0;  // dropout draws would differ between one process and two
  config.attention_probs_dropout_prob = 0.0;
  return config;
}

/// The same model on every call: LoRA r4 on query/value, classifier trained, all values copied
/// from one seeded model built once (ranks are threads: they must not draw from the shared
/// generator for values that have to agree).
lora::models::BertForSequenceClassification adapted_model() {
  const auto make = [] {
    lora::models::BertForSequenceClassification model(tiny_config());
    lora::models::init_bert_weights(*model);
    lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(4).alpha(8)).target_modules({"query", "value"})
                             .modules_to_save({"classifier"}));
    return model;
  };
  static const auto reference = [&] {
    torch::manual_seed(5);
    auto model = make();
    // B = 0 would make A's gradients vanish at step 0: start B non-zero so that both train.
    torch::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      if (item.key().find("lora_B") != std::string::npos) item.value().normal_(0, 0.1);
    }
    return model;
  }();
  auto model = make();
  torch::NoGradGuard no_grad;
  const auto source = reference->named_parameters();
  for (auto& item : model->named_parameters()) item.value().copy_(source[item.key()]);
  return model;
}

std::vector<torch::Tensor> trainable(torch::nn::Module& model) {
  std::vector<torch::Tensor> parameters;
  for (const auto& parameter : model.parameters()) {
    if (parameter.requires_grad()) parameters.push_back(parameter);
  }
  return parameters;
}

/// Batches of 5 rows (uneven over 2 ranks) with different lengths, right-padded.
std::vector<lora::data::Batch> batches(int count) {
  torch::manual_seed(11);
  std::vector<lora::data::Batch> result;
  for (int b = 0; b < count; ++b) {
    const int64_t rows = 5, width = 9;
    lora::data::Batch batch;
    batch.inputs.input_ids = torch::randint(4, 40, {rows, width}, torch::kLong);
    batch.inputs.attention_mask = torch::ones({rows, width}, torch::kLong);
    for (int64_t r = 0; r < rows; ++r) {
      const auto length = 3 + (r * 2 + b) % 7;
      batch.inputs.attention_mask[r].narrow(0, length, width - length).zero_();
      batch.inputs.input_ids[r].narrow(0, length, width - length).zero_();
    }
    batch.inputs.token_type_ids = torch::zeros({rows, width}, torch::kLong);
    batch.labels = torch::randint(0, 2, {rows}, torch::kLong);
    for (int64_t r = 0; r < rows; ++r) batch.indices.push_back(b * rows + r);
    result.push_back(batch);
  }
  return result;
}

/// AdamW over `steps` batches; each rank's loss is its rows' summed cross-entropy divided by the
/// global row count, so the summed gradients are the combined batch's mean-loss gradient.
std::vector<torch::Tensor> train(ProcessGroup* group, const std::vector<lora::data::Batch>& data,
                                 GradientSyncOptions sync_options = {}) {
  auto model = adapted_model();
  model->train();
  auto parameters = trainable(*model);
  torch::optim::AdamW optimizer(parameters, torch::optim::AdamWOptions(1e-2));
  std::unique_ptr<GradientSynchronizer> sync;
  sync_options.average = false;
  if (group != nullptr) sync = std::make_unique<GradientSynchronizer>(*group, parameters, sync_options);
  for (const auto& batch : data) {
    optimizer.zero_grad();
    const auto rows = batch.labels.size(0);
    const auto part = group ? lora::distributed::shard(batch, group->rank(), group->world_size())
                            : std::optional<lora::data::Batch>(batch);
    if (part) {
      const auto logits = model->forward(part->inputs.input_ids, part->inputs.attention_mask, part->inputs.token_type_ids);
      const auto loss = torch::nn::functional::cross_entropy(
                            logits, part->labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
                        static_cast<double>(rows);
      loss.backward();
    }
    if (sync) sync->synchronize();
    optimizer.step();
  }
  std::vector<torch::Tensor> values;
  for (const auto& parameter : parameters) values.push_back(parameter.detach().clone());
  return values;
}

}  // namespace

TEST_F(DistributedTest, OptionsComeFromTorchrunsEnvironment) {
  const auto set = [](const char* name, const char* value) { ::setenv(name, value, 1); };
  const auto clear = [] {
    for (const auto* name : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
                             "LORA_DIST_TIMEOUT_S"}) {
      ::unsetenv(name);
    }
  };
  clear();
  EXPECT_FALSE(lora::distributed::launched_distributed());
  EXPECT_EQ(lora::distributed::options_from_environment().world_size, 1);
  set("RANK", "2");
  set("WORLD_SIZE", "4");
  set("LOCAL_RANK", "0");
  set("MASTER_ADDR", "10.0.0.7");
  set("MASTER_PORT", "29611");
  set("LORA_DIST_TIMEOUT_S", "12");
  EXPECT_TRUE(lora::distributed::launched_distributed());
  const auto options = lora::distributed::options_from_environment();
  EXPECT_EQ(options.rank, 2);
  EXPECT_EQ(options.world_size, 4);
  EXPECT_EQ(options.local_rank, 0);
  EXPECT_EQ(options.master_addr, "10.0.0.7");
  EXPECT_EQ(options.master_port, 29611);
  EXPECT_EQ(options.timeout, std::chrono::seconds(12));
  set("RANK", "4");
  LORA_EXPECT_THROWS_WITH(lora::distributed::options_from_environment(), "RANK='4' is not an integer in [0, 3]");
  set("RANK", "1");
  set("MASTER_PORT", "http");
  LORA_EXPECT_THROWS_WITH(lora::distributed::options_from_environment(), "MASTER_PORT='http'");
  clear();

  DistributedOptions bad;
  bad.rank = 3;
  bad.world_size = 2;
  LORA_EXPECT_THROWS_WITH(ProcessGroup{bad}, "rank 3 is outside [0, 2)");
}

TEST_F(DistributedTest, AGroupOfOneNeedsNoNetwork) {
  ProcessGroup group(DistributedOptions{});
  EXPECT_TRUE(group.is_main());
  auto value = torch::tensor({1.5, 2.0});
  EXPECT_TRUE(torch::equal(group.all_reduce_sum(value), torch::tensor({1.5, 2.0})));
  group.broadcast({value});
  group.barrier();
  ASSERT_EQ(group.all_gather(value).size(), 1u);
  auto weight = torch::ones({3}, torch::requires_grad());
  GradientSynchronizer sync(group, {weight});
  (weight * 2).sum().backward();
  sync.synchronize();
  EXPECT_TRUE(torch::equal(weight.grad(), torch::full({3}, 2.0f)));
}

TEST_F(DistributedTest, CollectivesSumBroadcastAndGatherAcrossRanks) {
  std::vector<torch::Tensor> sums(3), broadcasts(3);
  std::vector<std::vector<torch::Tensor>> gathered(3);
  const auto errors = run_ranks(3, [&](ProcessGroup& group) {
    const auto r = static_cast<size_t>(group.rank());
    sums[r] = group.all_reduce_sum(torch::full({2}, double(group.rank() + 1)));
    auto mine = torch::full({4}, float(10 * group.rank()));
    group.broadcast({mine}, 1);
    broadcasts[r] = mine;
    gathered[r] = group.all_gather(torch::tensor({int64_t(group.rank())}));
    group.barrier();
  });
  for (size_t r = 0; r < 3; ++r) {
    ASSERT_EQ(errors[r], "") << "rank " << r;
    EXPECT_TRUE(torch::equal(sums[r], torch::full({2}, 6.0))) << sums[r];
    EXPECT_TRUE(torch::equal(broadcasts[r], torch::full({4}, 10.0f))) << broadcasts[r];
    ASSERT_EQ(gathered[r].size(), 3u);
    for (int64_t k = 0; k < 3; ++k) EXPECT_EQ(gathered[r][static_cast<size_t>(k)].item<int64_t>(), k);
  }
}

TEST_F(DistributedTest, ShardsSplitEveryBatchAndDropUnusedPadding) {
  for (const int world : {1, 2, 3, 7}) {
    for (const int64_t rows : {0, 1, 5, 32, 33}) {
      int64_t covered = 0, smallest = rows, largest = 0;
      for (int rank = 0; rank < world; ++rank) {
        const auto [first, last] = lora::distributed::shard_range(rows, rank, world);
        EXPECT_EQ(first, covered) << rows << " rows, rank " << rank << " of " << world;
        covered = last;
        smallest = std::min(smallest, last - first);
        largest = std::max(largest, last - first);
      }
      EXPECT_EQ(covered, rows);
      EXPECT_LE(largest - smallest, 1);
    }
  }
  LORA_EXPECT_THROWS_WITH(lora::distributed::shard_range(4, 2, 2), "rank 2 is outside [0, 2)");

  const auto batch = batches(1).front();  // row lengths 3 5 7 9 4
  const auto first = lora::distributed::shard(batch, 0, 2);  // rows 0-1
  const auto second = lora::distributed::shard(batch, 1, 2);  // rows 2-4
  ASSERT_TRUE(first && second);
  EXPECT_EQ(first->inputs.input_ids.sizes(), (std::vector<int64_t>{2, 5}));
  EXPECT_EQ(second->inputs.input_ids.sizes(), (std::vector<int64_t>{3, 9}));
  EXPECT_TRUE(torch::equal(second->inputs.attention_mask, batch.inputs.attention_mask.narrow(0, 2, 3)));
  EXPECT_TRUE(torch::equal(first->labels, batch.labels.narrow(0, 0, 2)));
  EXPECT_EQ(second->indices, (std::vector<int64_t>{2, 3, 4}));
  EXPECT_FALSE(lora::distributed::shard(batch, 0, 6).has_value()) << "5 rows over 6 ranks: rank 0 gets none";
  for (int rank = 1; rank < 6; ++rank) EXPECT_EQ(lora::distributed::shard(batch, rank, 6)->labels.size(0), 1);
}

// The "done means": two ranks on combined batches equal one process, within 1e-5, for
// uneven shards, one bucket or many, overlapped with backward or not, TCP or file rendezvous.
TEST_F(DistributedTest, TwoRanksTrainLikeOneProcessOnTheCombinedBatches) {
  const auto data = batches(4);
  const auto initial = trainable(*adapted_model());
  const auto expected = train(nullptr, data);
  for (size_t k = 0; k < expected.size(); ++k) {
    EXPECT_FALSE(torch::equal(expected[k], initial[k])) << "parameter " << k << " never trained";
  }
  struct Case {
    const char* name;
    GradientSyncOptions options;
    bool tcp;
  };
  GradientSyncOptions many_buckets;
  many_buckets.bucket_bytes = 256;  // every parameter its own bucket, or nearly
  GradientSyncOptions after_backward;
  after_backward.overlap = false;
  for (const auto& c : {Case{"one bucket, overlapped", {}, false}, Case{"small buckets", many_buckets, false},
                        Case{"after backward", after_backward, false}, Case{"TCPStore", {}, true}}) {
    std::vector<std::vector<torch::Tensor>> results(2);
    std::vector<std::string> errors;
    if (c.tcp) {
      const int port = free_port();
      errors.assign(2, "");
      std::vector<std::thread> threads;
      for (int rank = 0; rank < 2; ++rank) {
        threads.emplace_back([&, rank] {
          try {
            DistributedOptions options;
            options.rank = rank;
            options.world_size = 2;
            options.master_port = port;
            options.timeout = std::chrono::seconds(30);
            ProcessGroup group(options);
            results[static_cast<size_t>(rank)] = train(&group, data, c.options);
          } catch (const std::exception& error) {
            errors[static_cast<size_t>(rank)] = error.what();
          }
        });
      }
      for (auto& thread : threads) thread.join();
    } else {
      errors = run_ranks(2, [&](ProcessGroup& group) {
        results[static_cast<size_t>(group.rank())] = train(&group, data, c.options);
      });
    }
    for (size_t rank = 0; rank < 2; ++rank) {
      ASSERT_EQ(errors[rank], "") << c.name << ", rank " << rank;
      ASSERT_EQ(results[rank].size(), expected.size());
      for (size_t k = 0; k < expected.size(); ++k) {
        EXPECT_LT(lora::testing::max_abs_diff(results[rank][k], expected[k]), 1e-5)
            << c.name << ", rank " << rank << ", parameter " << k;
      }
    }
  }
}

TEST_F(DistributedTest, BucketsFollowTheOptionsAndCountTheBytes) {
  adapted_model();  // the reference, built before the threads
  const auto errors = run_ranks(2, [&](ProcessGroup& group) {
    auto model = adapted_model();
    const auto parameters = trainable(*model);
    int64_t numel = 0;
    for (const auto& parameter : parameters) numel += parameter.numel();
    GradientSynchronizer one(group, parameters);
    EXPECT_EQ(one.num_buckets(), 1u);
    EXPECT_EQ(one.bytes_per_step(), static_cast<size_t>(numel) * sizeof(float));
    GradientSyncOptions small;
    small.bucket_bytes = 64;
    GradientSynchronizer many(group, parameters, small);
    EXPECT_EQ(many.num_buckets(), parameters.size()) << "every parameter is larger than 64 bytes";
  });
  EXPECT_EQ(errors, (std::vector<std::string>{"", ""}));
  auto frozen = torch::ones({2});
  ProcessGroup single(DistributedOptions{});
  LORA_EXPECT_THROWS_WITH(GradientSynchronizer(single, {frozen}), "parameter 0 does not require grad");
}

// A parameter unused on one rank counts as zero there (unused on all: no gradient at all); gradient accumulation under no_sync sums the
// micro-batches locally and synchronises once; a second backward without it is refused.
TEST_F(DistributedTest, UnusedParametersAndAccumulatedGradientsAreSummedCorrectly) {
  std::vector<torch::Tensor> a_grads(2), b_grads(2);
  std::vector<bool> c_has_grad(2, true);
  std::vector<std::string> refusals(2), quiet_refusals(2);
  const auto errors = run_ranks(2, [&](ProcessGroup& group) {
    const auto r = static_cast<size_t>(group.rank());
    auto a = torch::ones({3}, torch::requires_grad());
    auto b = torch::ones({2}, torch::requires_grad());
    auto c = torch::ones({2}, torch::requires_grad());  // used on no rank
    GradientSyncOptions options;
    options.average = false;
    GradientSynchronizer sync(group, {a, b, c}, options);
    {
      auto no_sync = sync.no_sync();
      (a * double(r + 1)).sum().backward();  // micro-batch 1: a only
    }
    auto loss = (a * 10.0).sum();
    if (r == 1) loss = loss + (b * 3.0).sum();  // b is used on rank 1 only
    loss.backward();
    sync.synchronize();
    a_grads[r] = a.grad().clone();
    b_grads[r] = b.grad().clone();
    c_has_grad[r] = c.grad().defined();
    // Both ranks refuse the same way, so their collectives stay matched.
    (a * 1.0).sum().backward();
    try {
      (a * 1.0).sum().backward();
    } catch (const c10::Error& error) {
      refusals[r] = error.what();
    }
    try {  // under no_sync too: that micro-batch would be lost
      auto no_sync = sync.no_sync();
      (a * 1.0).sum().backward();
    } catch (const c10::Error& error) {
      quiet_refusals[r] = error.what();
    }
    sync.synchronize();
  });
  for (size_t r = 0; r < 2; ++r) {
    ASSERT_EQ(errors[r], "") << "rank " << r;
    // a: (1 + 10) on rank 0 plus (2 + 10) on rank 1; b: 0 plus 3.
    EXPECT_TRUE(torch::equal(a_grads[r], torch::full({3}, 23.0f))) << a_grads[r];
    EXPECT_TRUE(torch::equal(b_grads[r], torch::full({2}, 3.0f))) << b_grads[r];
    EXPECT_NE(refusals[r].find("got a second gradient before synchronize()"), std::string::npos) << refusals[r];
    EXPECT_NE(quiet_refusals[r].find("got a second gradient"), std::string::npos) << quiet_refusals[r];
    EXPECT_FALSE(c_has_grad[r]) << "a parameter no rank used keeps no gradient, as in one process";
  }
}

TEST_F(DistributedTest, ARankThatStopsTakingPartEndsTheOthersWithinTheTimeout) {
  std::vector<double> seconds(2);
  const auto errors = run_ranks(
      2,
      [&](ProcessGroup& group) {
        if (group.rank() == 1) {
          std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // alive, but silent
          return;
        }
        const auto start = std::chrono::steady_clock::now();
        try {
          group.all_reduce_sum(torch::ones({4}), "loss all-reduce");
        } catch (...) {
          seconds[0] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          throw;
        }
      },
      std::chrono::milliseconds(1000));
  EXPECT_NE(errors[0].find("rank 0 of 2: loss all-reduce failed"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("within 1000 ms"), std::string::npos) << errors[0];
  EXPECT_GT(seconds[0], 0.5);
  EXPECT_LT(seconds[0], 2.4) << "the error should come at the timeout, before the silent rank returns";
}
