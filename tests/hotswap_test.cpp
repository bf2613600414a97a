// Many adapters on one base: PEFT folders loaded side by side, hot-swapped (in place, or rebuilt
// for another structure), renamed and unloaded, each change reaching only its adapter.

#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <lora/io/hotswap.hpp>
#include <lora/lora.hpp>
#include <lora/models/bert.hpp>

#include "multi_adapter_fixtures.hpp"
#include "test_helpers.hpp"

namespace {

using lora::testing::max_abs_diff;
using lora::testing::padded_batch;
using lora::testing::randomize;
using lora::testing::throws_with;
using lora::testing::tiny_config;

lora::io::LoadOptions quiet() {
  lora::io::LoadOptions options;
  options.warn = nullptr;
  return options;
}

/// The base every adapter here is made for (the same seed, the same weights).
lora::models::BertForSequenceClassification base_model() {
  torch::manual_seed(0);
  return lora::models::BertForSequenceClassification(tiny_config());
}

const auto kAliceConfig =
    lora::LoraConfig(lora::LoRAOptions(2).alpha(4)).target_modules({"query", "value"}).task_type("SEQ_CLS");
const auto kBobConfig =
    lora::LoraConfig(lora::LoRAOptions(4).alpha(8).use_dora(true)).target_modules({"query", "key", "value"}).task_type("SEQ_CLS");
/// Another structure for "alice": other layers, another rank.
const auto kAliceOtherConfig =
    lora::LoraConfig(lora::LoRAOptions(3).alpha(3)).target_modules({"key", "output.dense"}).task_type("SEQ_CLS");

class HotswapTest : public lora::testing::TempDirTest {
 protected:
  /// Saves adapter `name` made with `config` and values drawn from `seed` under `root`/`name`.
  void make_adapter(const std::string& root, const std::string& name, const lora::LoraConfig& config, uint64_t seed) {
    auto model = base_model();
    lora::inject(*model, config, name);
    torch::manual_seed(seed);
    randomize(*model, name);
    lora::io::save_adapter(*model, path(root), name);
  }

  /// Logits of rows routed to `adapters` in one mixed batch.
  torch::Tensor mixed(lora::models::BertForSequenceClassification& model, const std::vector<std::string>& adapters) {
    torch::NoGradGuard no_grad;
    lora::MixedBatch mix(*model, adapters);
    return model->forward(batch_.ids, batch_.mask);
  }

  /// What a fresh base with only this adapter folder loaded gives for `rows` of the batch.
  torch::Tensor alone(const std::string& root, const std::string& name, int64_t rows) {
    auto model = base_model();
    lora::io::load_adapter(*model, path(root), name, quiet());
    torch::NoGradGuard no_grad;
    return model->forward(batch_.ids.slice(0, 0, rows), batch_.mask.slice(0, 0, rows));
  }

  lora::testing::Batch batch_ = padded_batch(3, 6, 11);
};

TEST_F(HotswapTest, AdaptersSideBySideSwapInPlaceAndRebuilt) {
  make_adapter("v1", "alice", kAliceConfig, 1);
  make_adapter("v1", "bob", kBobConfig, 2);
  make_adapter("v2", "alice", kAliceConfig, 3);
  make_adapter("v3", "alice", kAliceOtherConfig, 4);

  auto model = base_model();
  lora::io::load_adapter(*model, path("v1"), "alice", quiet());
  lora::io::load_adapter(*model, path("v1"), "bob", quiet());
  const std::vector<std::string> routing{"alice", "bob", ""};
  const auto before = mixed(model, routing);
  EXPECT_LT(max_abs_diff(before[0], alone("v1", "alice", 1)[0]), 1e-5);
  EXPECT_LT(max_abs_diff(before[1], alone("v1", "bob", 2)[1]), 1e-5);
  std::map<std::string, torch::Tensor> base_before;
  for (const auto& item : lora::base_state_dict(*model)) base_before[item.key()] = item.value().clone();

  // Same structure: copied into the tensors alice already has.
  const auto alice_A = model->bert->layers[0]->as<lora::models::BertLayerImpl>()->attention->self->query
                           ->lora_A("alice");
  const auto swapped = lora::io::hotswap_adapter(*model, path("v2"), "alice", quiet());
  EXPECT_EQ(swapped.kind, lora::io::SwapKind::kInPlace);
  const auto after_v2 = mixed(model, routing);
  EXPECT_LT(max_abs_diff(after_v2[0], alone("v2", "alice", 1)[0]), 1e-5);
  EXPECT_GT(max_abs_diff(after_v2[0], before[0]), 1e-3);
  EXPECT_TRUE(after_v2.slice(0, 1).equal(before.slice(0, 1)));  // bob and the base: bit for bit
  EXPECT_TRUE(alice_A.is_same(model->bert->layers[0]->as<lora::models::BertLayerImpl>()->attention->self->query
                                  ->lora_A("alice")));

  // Another structure (PEFT refuses this): rebuilt, under the same name.
  const auto rebuilt = lora::io::hotswap_adapter(*model, path("v3"), "alice", quiet());
  EXPECT_EQ(rebuilt.kind, lora::io::SwapKind::kRebuilt);
  EXPECT_EQ(rebuilt.config.adapter().r(), 3);
  const auto after_v3 = mixed(model, routing);
  EXPECT_LT(max_abs_diff(after_v3[0], alone("v3", "alice", 1)[0]), 1e-5);
  EXPECT_TRUE(after_v3.slice(0, 1).equal(before.slice(0, 1)));
  const auto names = lora::detail::all_adapter_names(*model);
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), (std::set<std::string>{"alice", "bob"}));
  const auto parameters = model->named_parameters();
  EXPECT_TRUE(parameters.contains("bert.encoder.layer.0.attention.self.key.lora_A.alice.weight"));
  EXPECT_FALSE(parameters.contains("bert.encoder.layer.0.attention.self.query.lora_A.alice.weight"));
  for (const auto& item : parameters) EXPECT_EQ(item.key().find("hotswap"), std::string::npos) << item.key();
  // The swapped adapter saves as what was loaded, and the base never moved.
  lora::io::save_adapter(*model, path("resaved"), "alice");
  EXPECT_EQ(lora::io::read_adapter_config(path("resaved"), "alice").target_modules(), kAliceOtherConfig.target_modules());
  const auto base_after = lora::base_state_dict(*model);
  EXPECT_EQ(base_after.size(), base_before.size());
  for (const auto& item : base_after) {
    ASSERT_TRUE(base_before.count(item.key())) << item.key();
    EXPECT_TRUE(item.value().equal(base_before[item.key()])) << item.key();
  }
}

TEST_F(HotswapTest, AFailedSwapKeepsTheOldAdapterServing) {
  make_adapter("v1", "alice", kAliceConfig, 1);
  make_adapter("v1", "bob", kBobConfig, 2);
  make_adapter("bad", "alice", kAliceOtherConfig, 5);
  // Shapes for another base: a wider model's adapter.
  auto config = tiny_config();
  config.hidden_size = 24;
  torch::manual_seed(0);
  lora::models::BertForSequenceClassification wide(config);
  lora::inject(*wide, kAliceConfig, "alice");
  lora::io::save_adapter(*wide, path("wide"), "alice");
  // A folder whose tensor file is cut short.
  std::filesystem::copy(path("bad"), path("cut"), std::filesystem::copy_options::recursive);
  const auto tensors = std::filesystem::path(path("cut")) / "alice" / "adapter_model.safetensors";
  std::filesystem::resize_file(tensors, std::filesystem::file_size(tensors) / 2);

  auto model = base_model();
  lora::io::load_adapter(*model, path("v1"), "alice", quiet());
  lora::io::load_adapter(*model, path("v1"), "bob", quiet());
  const std::vector<std::string> routing{"alice", "bob", ""};
  const auto before = mixed(model, routing);
  const auto keys_before = model->named_parameters().keys();

  EXPECT_TRUE(throws_with([&] { lora::io::hotswap_adapter(*model, path("wide"), "alice", quiet()); },
                          "has shape [2, 24]"));
  EXPECT_TRUE(throws_with([&] { lora::io::hotswap_adapter(*model, path("cut"), "alice", quiet()); },
                          "adapter_model.safetensors"));
  EXPECT_TRUE(throws_with([&] { lora::io::hotswap_adapter(*model, path("v1"), "carol", quiet()); },
                          "unknown adapter 'carol'"));
  EXPECT_TRUE(throws_with([&] { lora::io::load_adapter(*model, path("wide"), "alice", quiet()); },
                          "already"));
  auto as_carol = quiet();
  as_carol.saved_as = "alice";  // the folder's adapter, under a free name: made for another base
  EXPECT_TRUE(throws_with([&] { lora::io::load_adapter(*model, path("wide"), "carol", as_carol); }, "has shape [2, 24]"));
  EXPECT_EQ(model->named_parameters().keys(), keys_before);
  EXPECT_TRUE(mixed(model, routing).equal(before));
}

TEST_F(HotswapTest, UnloadFreesTheNameAndRenameKeepsTheValues) {
  make_adapter("v1", "alice", kAliceConfig, 1);
  make_adapter("v1", "bob", kBobConfig, 2);
  auto model = base_model();
  lora::io::load_adapter(*model, path("v1"), "alice", quiet());
  lora::io::load_adapter(*model, path("v1"), "bob", quiet());
  const auto before = mixed(model, {"alice", "bob", ""});

  lora::rename_adapter(*model, "bob", "carol");
  EXPECT_TRUE(mixed(model, {"alice", "carol", ""}).equal(before));
  EXPECT_TRUE(model->named_parameters().contains("classifier.modules_to_save.carol.base_layer.weight"));
  EXPECT_TRUE(throws_with([&] { lora::rename_adapter(*model, "carol", "alice"); }, "adapter 'alice' exists already"));
  EXPECT_TRUE(throws_with([&] { lora::rename_adapter(*model, "carol", "a.b"); }, "contain no '.'"));
  EXPECT_TRUE(mixed(model, {"alice", "carol", ""}).equal(before));

  lora::delete_adapter(*model, "carol");
  EXPECT_TRUE(throws_with([&] { mixed(model, {"alice", "carol", ""}); }, "unknown adapter 'carol' (adapters: alice)"));
  for (const auto& item : model->named_parameters()) EXPECT_EQ(item.key().find("carol"), std::string::npos) << item.key();
  lora::io::load_adapter(*model, path("v1"), "bob", quiet());  // the name is free again
  EXPECT_LT(max_abs_diff(mixed(model, {"alice", "bob", ""}), before), 1e-6);
}

TEST_F(HotswapTest, ARebuiltInactiveAdapterLeavesTheServingHeadAlone) {
  const auto plain = lora::LoraConfig(lora::LoRAOptions(2).alpha(4)).target_modules({"query", "value"});
  make_adapter("v1", "alice", plain, 1);  // no head
  make_adapter("v1", "bob", lora::LoraConfig(lora::LoRAOptions(3)).target_modules({"key"}), 2);
  make_adapter("v2", "alice", kAliceConfig, 3);  // with a classifier copy: a new saved module
  auto model = base_model();
  lora::io::load_adapter(*model, path("v1"), "alice", quiet());
  lora::io::load_adapter(*model, path("v1"), "bob", quiet());
  lora::set_adapter(*model, "bob");
  torch::NoGradGuard no_grad;
  const auto before = model->forward(batch_.ids, batch_.mask);
  EXPECT_EQ(lora::io::hotswap_adapter(*model, path("v2"), "alice", quiet()).kind, lora::io::SwapKind::kRebuilt);
  EXPECT_TRUE(model->forward(batch_.ids, batch_.mask).equal(before));  // bob's traffic: the original head
  EXPECT_LT(max_abs_diff(mixed(model, {"alice", "bob", ""})[0], alone("v2", "alice", 1)[0]), 1e-5);
}

TEST_F(HotswapTest, RenameKeepsEveryTrainingFlag) {
  lora::LoRAEmbedding embedding(torch::nn::EmbeddingOptions(10, 4));
  embedding->add_adapter("x", lora::LoRAOptions(2));
  embedding->add_adapter("y", lora::LoRAOptions(2));  // inactive: frozen
  auto flags = [&] {
    std::vector<bool> out;
    for (const auto& parameter : embedding->parameters()) out.push_back(parameter.requires_grad());
    return out;
  };
  const auto before = flags();
  embedding->rename_adapter("y", "z");
  EXPECT_EQ(flags(), before);
  EXPECT_FALSE(embedding->lora_A("z").requires_grad());
  EXPECT_TRUE(embedding->lora_A("x").requires_grad());
}

}  // namespace
