// Mixed-adapter batches (lora::MixedBatch): every example with its own adapter and head in one
// forward equals running it alone with that adapter; training several adapters in one batch
// equals training them one after the other.

#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <lora/lora.hpp>
#include <lora/models/bert.hpp>

#include "multi_adapter_fixtures.hpp"
#include "test_helpers.hpp"

namespace {

using lora::testing::Batch;
using lora::testing::max_abs_diff;
using lora::testing::padded_batch;
using lora::testing::randomize;
using lora::testing::throws_with;
using lora::testing::tiny_config;

/// Three adapters side by side with different ranks, targets and heads: "a" (r 2, query and
/// value, its own classifier), "b" (r 4, DoRA, every attention projection and the FFN, its own
/// classifier) and "c" (r 1, rsLoRA, value only, no head: the base classifier).
lora::models::BertForSequenceClassification adapted_bert() {
  torch::manual_seed(0);
  lora::models::BertForSequenceClassification model(tiny_config());
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(2).alpha(4)).target_modules({"query", "value"}).task_type("SEQ_CLS"),
               "a");
  lora::inject(*model,
               lora::LoraConfig(lora::LoRAOptions(4).alpha(8).use_dora(true))
                   .target_modules({"query", "key", "value", "intermediate.dense"})
                   .task_type("SEQ_CLS"),
               "b");
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(1).alpha(3).use_rslora(true)).target_modules({"value"}), "c");
  for (const auto* name : {"a", "b", "c"}) randomize(*model, name);
  model->eval();
  return model;
}

/// Example i alone, with its adapter active ("" : adapters disabled).
torch::Tensor one_by_one(lora::models::BertForSequenceClassification& model, const Batch& batch,
                         const std::vector<std::string>& adapters) {
  std::vector<torch::Tensor> rows;
  for (size_t i = 0; i < adapters.size(); ++i) {
    const auto index = static_cast<int64_t>(i);
    if (adapters[i].empty()) {
      lora::enable_adapters(*model, false);
    } else {
      lora::enable_adapters(*model, true);
      lora::set_adapter(*model, adapters[i]);
    }
    rows.push_back(model->forward(batch.ids.slice(0, index, index + 1), batch.mask.slice(0, index, index + 1)));
  }
  lora::enable_adapters(*model, true);
  lora::set_adapter(*model, "a");
  return torch::cat(rows);
}

TEST(MixedBatchTest, EveryExampleGetsItsOwnAdapterAndHead) {
  auto model = adapted_bert();
  const std::vector<std::string> adapters{"b", "a", "", "c", "a", "b", "", "c", "b"};
  const auto batch = padded_batch(static_cast<int64_t>(adapters.size()), 7, 1);
  torch::NoGradGuard no_grad;
  const auto expected = one_by_one(model, batch, adapters);

  torch::Tensor mixed;
  {
    lora::MixedBatch mix(*model, adapters);
    EXPECT_EQ(mix.adapters(), (std::vector<std::string>{"b", "a", "", "c"}));
    mixed = model->forward(batch.ids, batch.mask);
  }
  EXPECT_LT(max_abs_diff(mixed, expected), 1e-5);
  // Each adapter (and the base) gives different logits, so a row routed wrongly would show.
  for (int64_t i = 0; i < 4; ++i) EXPECT_GT(max_abs_diff(expected[i], expected[i + 4]), 1e-3) << i;

  // The guard gone, the model computes with its active adapter again.
  const auto after = model->forward(batch.ids, batch.mask);
  lora::MixedBatch all_a(*model, std::vector<std::string>(adapters.size(), "a"));
  EXPECT_LT(max_abs_diff(after, model->forward(batch.ids, batch.mask)), 1e-6);
}

TEST(MixedBatchTest, BaseOnlyAndSingleAdapterBatches) {
  auto model = adapted_bert();
  const auto batch = padded_batch(4, 5, 2);
  torch::NoGradGuard no_grad;
  lora::enable_adapters(*model, false);
  const auto base = model->forward(batch.ids, batch.mask);
  lora::enable_adapters(*model, true);
  lora::set_adapter(*model, "b");
  const auto with_b = model->forward(batch.ids, batch.mask);
  lora::set_adapter(*model, "a");
  {
    lora::MixedBatch mix(*model, {"", "", "", ""});
    EXPECT_LT(max_abs_diff(model->forward(batch.ids, batch.mask), base), 1e-6);
  }
  lora::MixedBatch mix(*model, {"b", "b", "b", "b"});
  EXPECT_LT(max_abs_diff(model->forward(batch.ids, batch.mask), with_b), 1e-5);
}

TEST(MixedBatchTest, EmbeddingAndConvolutionLayersRouteTheirRows) {
  torch::manual_seed(3);
  lora::LoRAEmbedding embedding(torch::nn::EmbeddingOptions(10, 4));
  embedding->add_adapter("x", lora::LoRAOptions(2).alpha(3));
  embedding->add_adapter("y", lora::LoRAOptions(3).alpha(2).use_dora(true));
  lora::LoRAConv2d conv(torch::nn::Conv2dOptions(3, 4, 3).padding(1));
  conv->add_adapter("x", lora::LoRAOptions(2).alpha(3));
  conv->add_adapter("y", lora::LoRAOptions(1).alpha(2).use_dora(true));
  for (auto* layer : std::vector<torch::nn::Module*>{embedding.ptr().get(), conv.ptr().get()}) {
    randomize(*layer, "x");
    randomize(*layer, "y");
  }
  const std::vector<std::string> adapters{"y", "", "x", "y"};
  const auto ids = torch::randint(0, 10, {4, 5}, torch::kLong);
  const auto images = torch::randn({4, 3, 6, 6});
  torch::NoGradGuard no_grad;
  auto alone = [&](auto& layer, const torch::Tensor& input) {
    std::vector<torch::Tensor> rows;
    for (int64_t i = 0; i < 4; ++i) {
      const auto& name = adapters[static_cast<size_t>(i)];
      layer->enable_adapters(!name.empty());
      if (!name.empty()) layer->set_adapter(name);
      rows.push_back(layer->forward(input.slice(0, i, i + 1)));
    }
    layer->enable_adapters(true);
    return torch::cat(rows);
  };
  const auto expected_embedding = alone(embedding, ids);
  const auto expected_conv = alone(conv, images);
  {
    lora::MixedBatch mix(*embedding, adapters);
    EXPECT_LT(max_abs_diff(embedding(ids), expected_embedding), 1e-5);
  }
  lora::MixedBatch mix(*conv, adapters);
  EXPECT_LT(max_abs_diff(conv(images), expected_conv), 1e-5);
}

/// The trainable tensors of adapter `name`: its factors and its saved head copy.
std::vector<torch::Tensor> parameters_of(torch::nn::Module& model, const std::string& name) {
  std::vector<torch::Tensor> parameters;
  for (const auto& [path, layer] : lora::adapter_layers(model)) {
    if (!layer->has_adapter(name)) continue;
    for (const auto& item : layer->adapter_state(name)) parameters.push_back(item.second);
  }
  return parameters;
}

TEST(MixedBatchTest, TrainingTwoAdaptersTogetherEqualsTrainingThemInTurn) {
  auto build = [] {
    torch::manual_seed(4);
    lora::models::BertForSequenceClassification model(tiny_config());
    lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(2).alpha(4)).target_modules({"query", "value"}).task_type("SEQ_CLS"),
                 "a");
    lora::inject(*model,
                 lora::LoraConfig(lora::LoRAOptions(3).alpha(3)).target_modules({"key", "output.dense"}).task_type("SEQ_CLS"),
                 "b");
    model->train();
    return model;
  };
  auto joint = build();
  auto sequential = build();
  const auto initial_a = parameters_of(*joint, "a");
  std::vector<torch::Tensor> initial;
  for (const auto& tensor : initial_a) initial.push_back(tensor.detach().clone());

  constexpr int64_t kSteps = 3;
  const auto data = padded_batch(4 * kSteps, 6, 5);
  const auto labels = torch::randint(0, 3, {4 * kSteps}, torch::kLong);
  // Step k: examples 4k..4k+3, routed a, b, a, b.
  const std::vector<std::string> routing{"a", "b", "a", "b"};
  auto rows_of = [](int64_t step, int64_t parity) { return torch::tensor({4 * step + parity, 4 * step + parity + 2}); };

  {
    torch::optim::Adam optimizer_a(parameters_of(*joint, "a"), torch::optim::AdamOptions(1e-2));
    torch::optim::Adam optimizer_b(parameters_of(*joint, "b"), torch::optim::AdamOptions(1e-2));
    for (int64_t step = 0; step < kSteps; ++step) {
      const auto slice = [&](const torch::Tensor& t) { return t.slice(0, 4 * step, 4 * step + 4); };
      optimizer_a.zero_grad();
      optimizer_b.zero_grad();
      lora::MixedBatch mix(*joint, routing);
      const auto logits = joint->forward(slice(data.ids), slice(data.mask));
      const auto own = [&](int64_t parity) {
        const auto rows = torch::tensor({parity, parity + 2});
        return torch::cross_entropy_loss(logits.index_select(0, rows), slice(labels).index_select(0, rows));
      };
      (own(0) + own(1)).backward();
      optimizer_a.step();
      optimizer_b.step();
    }
  }
  for (const auto& [name, parity] : std::vector<std::pair<std::string, int64_t>>{{"a", 0}, {"b", 1}}) {
    lora::set_adapter(*sequential, name);
    torch::optim::Adam optimizer(parameters_of(*sequential, name), torch::optim::AdamOptions(1e-2));
    for (int64_t step = 0; step < kSteps; ++step) {
      const auto rows = rows_of(step, parity);
      optimizer.zero_grad();
      const auto logits = sequential->forward(data.ids.index_select(0, rows), data.mask.index_select(0, rows));
      torch::cross_entropy_loss(logits, labels.index_select(0, rows)).backward();
      optimizer.step();
    }
  }
  lora::set_adapter(*sequential, "a");
  for (const auto* name : {"a", "b"}) {
    const auto trained_jointly = parameters_of(*joint, name);
    const auto trained_in_turn = parameters_of(*sequential, name);
    ASSERT_EQ(trained_jointly.size(), trained_in_turn.size());
    for (size_t i = 0; i < trained_jointly.size(); ++i) {
      EXPECT_LT(max_abs_diff(trained_jointly[i], trained_in_turn[i]), 1e-5) << name << " tensor " << i;
    }
  }
  double moved = 0;
  for (size_t i = 0; i < initial.size(); ++i) moved = std::max(moved, max_abs_diff(initial[i], initial_a[i]));
  EXPECT_GT(moved, 1e-3);  // the adapters did train
}

TEST(MixedBatchTest, OnlyTheRoutedTrainableAdaptersTrain) {
  auto model = adapted_bert();
  model->train();
  lora::set_adapter_trainable(*model, "c", false);  // loaded for inference, say
  const auto batch = padded_batch(3, 4, 6);
  auto flags = [&] {
    std::map<std::string, bool> requires;
    for (const auto& item : model->named_parameters()) requires[item.key()] = item.value().requires_grad();
    return requires;
  };
  const auto before = flags();
  {
    lora::MixedBatch mix(*model, {"b", "c", ""});
    model->forward(batch.ids, batch.mask).sum().backward();
  }
  EXPECT_EQ(flags(), before);  // restored
  for (const auto& item : model->named_parameters()) {
    const auto& key = item.key();
    if (key.find(".b.") != std::string::npos && key.find("lora_") != std::string::npos) {
      EXPECT_TRUE(item.value().grad().defined()) << key;
    } else if (key.find("modules_to_save.b.") != std::string::npos) {
      EXPECT_TRUE(item.value().grad().defined()) << key;
    } else {
      EXPECT_FALSE(item.value().grad().defined()) << key;
    }
  }
}

TEST(MixedBatchTest, RefusalsNameTheProblemAndRouteNothing) {
  auto model = adapted_bert();
  const auto batch = padded_batch(2, 4, 7);
  torch::NoGradGuard no_grad;
  lora::set_adapter(*model, "a");  // where "b" came first ("key"), it was active
  const auto reference = model->forward(batch.ids, batch.mask);
  auto unchanged = [&] { return max_abs_diff(model->forward(batch.ids, batch.mask), reference) == 0.0; };

  EXPECT_TRUE(throws_with([&] { lora::MixedBatch mix(*model, {"a", "zzz"}); }, "unknown adapter 'zzz' (adapters: a, b, c)"));
  EXPECT_TRUE(unchanged());
  EXPECT_TRUE(throws_with([&] { lora::MixedBatch mix(*model, {}); }, "the batch is empty"));
  {
    lora::MixedBatch mix(*model, {"a", "b", "c"});  // three names, two examples
    EXPECT_TRUE(throws_with([&] { model->forward(batch.ids, batch.mask); },
                            "a mixed-adapter batch of 3 examples needs inputs whose first dimension is the batch"));
    EXPECT_TRUE(throws_with([&] { lora::MixedBatch again(*model, {"a", "b"}); }, "routed through this layer already"));
  }
  EXPECT_TRUE(unchanged());
  {
    // While routed, nothing may change what the layers compute.
    lora::MixedBatch mix(*model, {"a", "b"});
    const auto mixed = model->forward(batch.ids, batch.mask);
    const auto* routed = "while a mixed-adapter batch is routed";
    EXPECT_TRUE(throws_with([&] { lora::set_adapter(*model, "b"); }, routed));
    EXPECT_TRUE(throws_with([&] { lora::merge(*model); }, routed));
    EXPECT_TRUE(throws_with([&] { lora::enable_adapters(*model, false); }, routed));
    EXPECT_TRUE(throws_with([&] { lora::delete_adapter(*model, "c"); }, routed));
    EXPECT_TRUE(throws_with([&] { lora::rename_adapter(*model, "c", "e"); }, routed));
    EXPECT_TRUE(throws_with([&] { lora::set_adapter_trainable(*model, "a", false); }, routed));
    EXPECT_TRUE(model->forward(batch.ids, batch.mask).equal(mixed));
  }
  EXPECT_TRUE(unchanged());

  lora::set_adapter(*model, "b");
  lora::merge(*model);
  EXPECT_TRUE(throws_with([&] { lora::MixedBatch mix(*model, {"a", "b"}); }, "while adapters are merged"));
  lora::unmerge(*model);
  lora::set_adapter(*model, "a");
  lora::enable_adapters(*model, false);
  EXPECT_TRUE(throws_with([&] { lora::MixedBatch mix(*model, {"a", "b"}); }, "adapters are disabled in"));
  lora::enable_adapters(*model, true);
  EXPECT_LT(max_abs_diff(model->forward(batch.ids, batch.mask), reference), 1e-6);

  // A saved module whose tensors are not all Linear layers' cannot take per-example values.
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(1)).target_modules({"query"}).modules_to_save({"embeddings.LayerNorm"}), "d");
  EXPECT_TRUE(throws_with([&] { lora::MixedBatch mix(*model, {"a", "d"}); }, "cannot give per-example values"));
}

}  // namespace
