#include <sstream>

#include <lora/linear.hpp>
#include <lora/trainable.hpp>

#include "test_helpers.hpp"

using lora::BiasMode;
using lora::LoRAOptions;

namespace {

class TrainableTest : public lora::testing::SeededTest {};

/// Linear(8→16) → LoRALinear(16→16, r 2) → Linear(16→2, the head).
struct TinyModelImpl : torch::nn::Module {
  TinyModelImpl() {
    embed = register_module("embed", torch::nn::Linear(8, 16));
    proj = register_module("proj", lora::LoRALinear<>(torch::nn::LinearOptions(16, 16), LoRAOptions(2).alpha(4)));
    head = register_module("head", torch::nn::Linear(16, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::relu(proj(embed(x)))); }
  torch::nn::Linear embed{nullptr};
  lora::LoRALinear<> proj{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(TinyModel);

std::vector<std::string> trainable_names(const torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& item : model.named_parameters()) {
    if (item.value().requires_grad()) names.push_back(item.key());
  }
  return names;
}

}  // namespace

TEST_F(TrainableTest, OnlyLoRAParametersTrainByDefault) {
  TinyModel model;
  lora::mark_only_lora_as_trainable(*model);
  EXPECT_EQ(trainable_names(*model), (std::vector<std::string>{"proj.lora_A.default.weight", "proj.lora_B.default.weight"}));
}

TEST_F(TrainableTest, BiasModes) {
  TinyModel model;
  lora::mark_only_lora_as_trainable(*model, BiasMode::kAll);
  EXPECT_EQ(trainable_names(*model),
            (std::vector<std::string>{"embed.bias", "proj.base_layer.bias", "proj.lora_A.default.weight",
                                      "proj.lora_B.default.weight", "head.bias"}));
  lora::mark_only_lora_as_trainable(*model, BiasMode::kLoraOnly);
  EXPECT_EQ(trainable_names(*model), (std::vector<std::string>{"proj.base_layer.bias", "proj.lora_A.default.weight",
                                                               "proj.lora_B.default.weight"}));
  EXPECT_EQ(lora::parse_bias("lora_only"), BiasMode::kLoraOnly);
  EXPECT_EQ(lora::to_string(BiasMode::kAll), "all");
  LORA_EXPECT_THROWS_WITH(lora::parse_bias("some"), "unknown bias mode 'some' (expected one of: none, all, lora_only)");
}

TEST_F(TrainableTest, InactiveAdaptersStayFrozen) {
  TinyModel model;
  model->proj->add_adapter("other", LoRAOptions(2).alpha(3));
  lora::mark_only_lora_as_trainable(*model);
  EXPECT_EQ(trainable_names(*model), (std::vector<std::string>{"proj.lora_A.default.weight", "proj.lora_B.default.weight"}));
}

TEST_F(TrainableTest, CountsTrainableAndTotalParameters) {
  TinyModel model;
  lora::mark_only_lora_as_trainable(*model);
  const auto count = lora::count_parameters(*model);
  // embed 8·16+16, proj base 16·16+16, A 2·16, B 16·2, head 16·2+2
  EXPECT_EQ(count.total, 144 + 272 + 32 + 32 + 34);
  EXPECT_EQ(count.trainable, 64);
  EXPECT_EQ(count.to_string(), "trainable params: 64 || all params: 514 || trainable%: 12.4514");
  std::ostringstream out;
  lora::print_trainable_parameters(*model, out);
  EXPECT_EQ(out.str(), "trainable params: 64 || all params: 514 || trainable%: 12.4514\n");
}

TEST_F(TrainableTest, CountGroupsThousandsAndCountsSharedTensorsOnce) {
  torch::nn::Linear big(1000, 1234);
  torch::nn::Sequential shared(big, big);  // the same module twice
  EXPECT_EQ(lora::count_parameters(*shared).total, 1000 * 1234 + 1234);
  lora::ParameterCount count{8450, 4394628};
  EXPECT_EQ(count.to_string(), "trainable params: 8,450 || all params: 4,394,628 || trainable%: 0.1923");
  EXPECT_EQ(lora::ParameterCount{}.to_string(), "trainable params: 0 || all params: 0 || trainable%: 0.0000");
}

TEST_F(TrainableTest, FindsLoRALayersByQualifiedName) {
  TinyModel model;
  const auto layers = lora::lora_layers(*model);
  ASSERT_EQ(layers.size(), 1u);
  EXPECT_EQ(layers[0].first, "proj");
  EXPECT_EQ(layers[0].second->adapter_names(), std::vector<std::string>{"default"});
  // A LoRA layer passed directly reports itself under the empty name.
  const auto self = lora::lora_layers(*model->proj);
  ASSERT_EQ(self.size(), 1u);
  EXPECT_EQ(self[0].first, "");
}

TEST_F(TrainableTest, TrainingAModelLeavesFrozenWeightsUntouched) {
  TinyModel model;
  lora::mark_only_lora_as_trainable(*model, BiasMode::kLoraOnly);
  std::map<std::string, torch::Tensor> before;
  for (const auto& item : model->named_parameters()) before[item.key()] = item.value().detach().clone();
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  for (int step = 0; step < 5; ++step) {
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(model(torch::randn({16, 8})), torch::randint(0, 2, {16})).backward();
    optimizer.step();
  }
  for (const auto& item : model->named_parameters()) {
    const bool changed = !torch::equal(before[item.key()], item.value());
    EXPECT_EQ(changed, item.value().requires_grad()) << item.key();
  }
}

TEST_F(TrainableTest, MarkAllAsTrainableForFullFineTuningRefusesAdaptedModels) {
  lora::LoRALinear<> plain(torch::nn::LinearOptions(8, 4));  // no adapter: base frozen on construction
  EXPECT_FALSE(plain->base_weight().requires_grad());
  lora::mark_all_as_trainable(*plain);
  EXPECT_TRUE(plain->base_weight().requires_grad());
  EXPECT_EQ(lora::count_parameters(*plain).trainable, lora::count_parameters(*plain).total);
  TinyModel model;  // proj carries an adapter
  LORA_EXPECT_THROWS_WITH(lora::mark_all_as_trainable(*model),
                          "module 'proj' holds adapters (default); merge_and_unload or unload them");
}
