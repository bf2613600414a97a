#include <lora/linear.hpp>

#include "test_helpers.hpp"

using lora::LoRAOptions;
using lora::testing::max_abs_diff;

namespace {

class LoRALinearTest : public lora::testing::SeededTest {};

/// Gives an adapter a non-zero B so that its update is visible.
void randomize_B(lora::LoRALinear<>& layer, const std::string& name = "default") {
  torch::NoGradGuard no_grad;
  layer->lora_B(name).copy_(torch::randn_like(layer->lora_B(name)));
}

/// x Wᵀ + b + s · x Aᵀ Bᵀ in float64, written out independently of the library.
torch::Tensor reference_lora(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                             const torch::Tensor& A, const torch::Tensor& B, double s) {
  const auto xd = x.to(torch::kDouble);
  auto y = xd.matmul(W.to(torch::kDouble).t()) + s * xd.matmul(A.to(torch::kDouble).t()).matmul(B.to(torch::kDouble).t());
  return b.defined() ? y + b.to(torch::kDouble) : y;
}

}  // namespace

TEST_F(LoRALinearTest, WithoutAdaptersBehavesExactlyLikeTheBaseLayer) {
  lora::LoRALinear<> layer(torch::nn::LinearOptions(16, 8));
  const auto x = torch::randn({4, 16});
  EXPECT_TRUE(torch::equal(layer(x), layer->base_layer()(x)));
  EXPECT_TRUE(layer->adapter_names().empty());
  EXPECT_FALSE(layer->base_weight().requires_grad());
}

TEST_F(LoRALinearTest, ZeroInitOutputEqualsBaseBitForBit) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8).dropout(0.25));
  for (const auto& x : {torch::randn({3, 16}), torch::randn({2, 5, 16}), torch::randn({16})}) {
    layer->train();
    EXPECT_TRUE(torch::equal(layer(x), base(x))) << x.sizes();
    layer->eval();
    EXPECT_TRUE(torch::equal(layer(x), base(x))) << x.sizes();
  }
}

TEST_F(LoRALinearTest, ForwardMatchesIndependentComputation) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(6));  // s = 1.5
  randomize_B(layer);
  const auto x = torch::randn({2, 5, 16});
  const auto expected = reference_lora(x, base->weight, base->bias, layer->lora_A("default"), layer->lora_B("default"), 1.5);
  const auto y = layer(x);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, 8}));
  EXPECT_LT(max_abs_diff(y, expected), 1e-5);
  EXPECT_GT(max_abs_diff(y, base(x)), 1e-3);  // the update is really there
}

TEST_F(LoRALinearTest, WorksWithoutBaseBias) {
  torch::nn::Linear base(torch::nn::LinearOptions(16, 8).bias(false));
  lora::LoRALinear<> layer(base, LoRAOptions(2).alpha(5));
  randomize_B(layer);
  const auto x = torch::randn({3, 16});
  EXPECT_FALSE(layer->base_bias().defined());
  EXPECT_LT(max_abs_diff(layer(x), reference_lora(x, base->weight, {}, layer->lora_A("default"),
                                                  layer->lora_B("default"), 2.5)),
            1e-5);
}

TEST_F(LoRALinearTest, OnlyAdapterParametersReceiveGradients) {
  torch::nn::Linear base(16, 8);
  const auto W0 = base->weight.detach().clone();
  const auto b0 = base->bias.detach().clone();
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8));
  torch::optim::SGD optimizer(layer->parameters(), torch::optim::SGDOptions(0.5));
  for (int step = 0; step < 3; ++step) {
    optimizer.zero_grad();
    layer(torch::randn({6, 16})).pow(2).sum().backward();
    EXPECT_FALSE(base->weight.grad().defined());
    EXPECT_FALSE(base->bias.grad().defined());
    EXPECT_TRUE(layer->lora_A("default").grad().defined());
    EXPECT_GT(layer->lora_B("default").grad().abs().sum().item<double>(), 0.0);
    optimizer.step();
  }
  EXPECT_TRUE(torch::equal(base->weight, W0));
  EXPECT_TRUE(torch::equal(base->bias, b0));
  EXPECT_GT(layer->lora_A("default").grad().abs().sum().item<double>(), 0.0);  // B became non-zero
}

TEST_F(LoRALinearTest, GradientsMatchFiniteDifferences) {
  torch::nn::Linear base(torch::nn::LinearOptions(5, 4));
  base->to(torch::kDouble);
  lora::LoRALinear<> layer(base, LoRAOptions(3).alpha(5));
  randomize_B(layer);
  const auto x = torch::randn({7, 5}, torch::kDouble);
  const auto weights = torch::randn({7, 4}, torch::kDouble);
  auto loss = [&] { return (layer(x) * weights).sum(); };
  for (const auto& parameter : {layer->lora_A("default"), layer->lora_B("default")}) {
    lora::testing::expect_gradient_matches_finite_differences(loss, parameter, 1e-7);
  }
}

TEST_F(LoRALinearTest, InputGradientFlowsThroughBaseAndAdapter) {
  // Inside a network the input itself requires grad (earlier adapters train).
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(6));
  randomize_B(layer);
  const auto x = torch::randn({2, 3, 16}, torch::requires_grad());
  const auto weights = torch::randn({2, 3, 8});
  (layer(x) * weights).sum().backward();
  const auto& A = layer->lora_A("default");
  const auto& B = layer->lora_B("default");
  const auto expected = weights.matmul(base->weight) + 1.5 * weights.matmul(B).matmul(A);  // ∂/∂x of Σ w ⊙ y
  EXPECT_LT(max_abs_diff(x.grad(), expected), 1e-5);
}

TEST_F(LoRALinearTest, MergedForwardEqualsUnmergedForward) {
  torch::nn::Linear base(32, 24);
  const auto W0 = base->weight.detach().clone();
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(12));
  randomize_B(layer);
  const auto x = torch::randn({10, 32});
  const auto unmerged = layer(x).detach();

  layer->merge();
  EXPECT_TRUE(layer->merged());
  EXPECT_EQ(layer->merged_adapters(), std::vector<std::string>{"default"});
  const auto expected_W = W0 + 3.0 * layer->lora_B("default").mm(layer->lora_A("default"));
  EXPECT_LT(max_abs_diff(base->weight, expected_W), 1e-6);
  EXPECT_LT(max_abs_diff(layer(x), unmerged), 1e-5);
  EXPECT_LT(max_abs_diff(base(x), unmerged), 1e-5);  // the shared base layer carries the merge

  layer->merge();  // merging twice changes nothing
  EXPECT_LT(max_abs_diff(base->weight, expected_W), 1e-6);

  layer->unmerge();
  EXPECT_FALSE(layer->merged());
  EXPECT_LT(max_abs_diff(base->weight, W0), 1e-6);
  EXPECT_LT(max_abs_diff(layer(x), unmerged), 1e-5);
}

TEST_F(LoRALinearTest, SafeMergeRefusesNonFiniteWeightsAndLeavesTheLayerUnchanged) {
  torch::nn::Linear base(8, 4);
  lora::LoRALinear<> layer(base, LoRAOptions(2).alpha(3));
  {
    torch::NoGradGuard no_grad;
    layer->lora_B("default")[1][0] = std::numeric_limits<float>::quiet_NaN();
  }
  const auto W0 = base->weight.detach().clone();
  LORA_EXPECT_THROWS_WITH(layer->merge({}, /*safe_merge=*/true),
                          "merging adapter 'default' would write non-finite values (NaN or Inf) into the base weight");
  EXPECT_TRUE(torch::equal(base->weight, W0));
  EXPECT_FALSE(layer->merged());
  {
    torch::NoGradGuard no_grad;
    layer->lora_B("default").fill_(0.5);
  }
  layer->merge({}, /*safe_merge=*/true);
  EXPECT_TRUE(layer->merged());
}

TEST_F(LoRALinearTest, DisablingGivesTheBaseOutput) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(2));
  randomize_B(layer);
  const auto x = torch::randn({3, 16});
  const auto adapted = layer(x).detach();
  layer->enable_adapters(false);
  EXPECT_FALSE(layer->adapters_enabled());
  EXPECT_TRUE(torch::equal(layer(x), base(x)));
  layer->enable_adapters(true);
  EXPECT_TRUE(torch::equal(layer(x), adapted));

  // Disabling a merged layer unmerges it first.
  const auto W0 = base->weight.detach().clone();
  layer->merge();
  layer->enable_adapters(false);
  EXPECT_FALSE(layer->merged());
  EXPECT_LT(max_abs_diff(base->weight, W0), 1e-6);
}

TEST_F(LoRALinearTest, TwoActiveAdaptersSumTheirDeltas) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8));  // s = 2
  layer->add_adapter("other", LoRAOptions(2).alpha(3));     // s = 1.5
  randomize_B(layer, "default");
  randomize_B(layer, "other");
  const auto x = torch::randn({5, 16});
  const auto one = reference_lora(x, base->weight, base->bias, layer->lora_A("default"), layer->lora_B("default"), 2.0);
  const auto other_delta = 1.5 * x.matmul(layer->lora_A("other").t()).matmul(layer->lora_B("other").t());

  EXPECT_EQ(layer->active_adapters(), std::vector<std::string>{"default"});  // a later adapter starts inactive
  EXPECT_LT(max_abs_diff(layer(x), one), 1e-5);

  layer->set_adapters({"default", "other"});
  EXPECT_LT(max_abs_diff(layer(x), one + other_delta.to(torch::kDouble)), 1e-5);

  layer->merge();
  EXPECT_EQ(layer->merged_adapters(), (std::vector<std::string>{"default", "other"}));
  EXPECT_LT(max_abs_diff(layer(x), one + other_delta.to(torch::kDouble)), 1e-5);
  layer->unmerge();
  EXPECT_LT(max_abs_diff(layer(x), one + other_delta.to(torch::kDouble)), 1e-5);
}

TEST_F(LoRALinearTest, MergingSomeAdaptersKeepsTheOthersOnTheForwardPath) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8));
  layer->add_adapter("other", LoRAOptions(2).alpha(3));
  randomize_B(layer, "default");
  randomize_B(layer, "other");
  layer->set_adapters({"default", "other"});
  const auto x = torch::randn({5, 16});
  const auto both = layer(x).detach();
  layer->merge({"other"});
  EXPECT_EQ(layer->merged_adapters(), std::vector<std::string>{"other"});
  EXPECT_LT(max_abs_diff(layer(x), both), 1e-5);
}

TEST_F(LoRALinearTest, SetAdapterMovesTrainabilityToTheActiveAdapter) {
  lora::LoRALinear<> layer(torch::nn::LinearOptions(8, 8), LoRAOptions(2).alpha(4));
  layer->add_adapter("other", LoRAOptions(2).alpha(4));
  EXPECT_TRUE(layer->lora_A("default").requires_grad());
  EXPECT_FALSE(layer->lora_A("other").requires_grad());
  EXPECT_FALSE(layer->lora_B("other").requires_grad());
  layer->set_adapter("other");
  EXPECT_EQ(layer->active_adapters(), std::vector<std::string>{"other"});
  EXPECT_FALSE(layer->lora_A("default").requires_grad());
  EXPECT_TRUE(layer->lora_A("other").requires_grad());
  EXPECT_TRUE(layer->lora_B("other").requires_grad());
  EXPECT_FALSE(layer->base_weight().requires_grad());
}

TEST_F(LoRALinearTest, DeleteAdapterRemovesItsParameters) {
  lora::LoRALinear<> layer(torch::nn::LinearOptions(8, 8), LoRAOptions(2).alpha(4));
  layer->add_adapter("dora", LoRAOptions(2).alpha(3).use_dora(true));
  EXPECT_EQ(layer->named_parameters().size(), 7u);
  layer->delete_adapter("default");
  EXPECT_EQ(layer->adapter_names(), std::vector<std::string>{"dora"});
  EXPECT_EQ(layer->active_adapters(), std::vector<std::string>{"dora"});  // falls back to a remaining one
  std::vector<std::string> keys = layer->named_parameters().keys();
  EXPECT_EQ(keys, (std::vector<std::string>{"base_layer.weight", "base_layer.bias", "lora_A.dora.weight",
                                            "lora_B.dora.weight", "lora_magnitude_vector.dora.weight"}));
  EXPECT_TRUE(layer->lora_A("dora").requires_grad());

  layer->merge();
  LORA_EXPECT_THROWS_WITH(layer->delete_adapter("dora"), "cannot delete adapter 'dora' while it is merged");
  LORA_EXPECT_THROWS_WITH(layer->delete_adapter("default"), "cannot delete unknown adapter 'default' (adapters: dora)");
  layer->unmerge();
  layer->delete_adapter("dora");
  EXPECT_TRUE(layer->active_adapters().empty());
  EXPECT_EQ(layer->named_parameters().size(), 2u);
  const auto x = torch::randn({2, 8});
  EXPECT_TRUE(torch::equal(layer(x), layer->base_layer()(x)));
}

TEST_F(LoRALinearTest, ParameterNamesFollowPeft) {
  lora::LoRALinear<> layer(torch::nn::LinearOptions(16, 8), LoRAOptions(4).alpha(8).use_dora(true));
  std::vector<std::string> keys = layer->named_parameters().keys();
  EXPECT_EQ(keys, (std::vector<std::string>{"base_layer.weight", "base_layer.bias", "lora_A.default.weight",
                                            "lora_B.default.weight", "lora_magnitude_vector.default.weight"}));
  const auto parameters = layer->named_parameters();
  EXPECT_EQ(parameters["lora_A.default.weight"].sizes(), (std::vector<int64_t>{4, 16}));
  EXPECT_EQ(parameters["lora_B.default.weight"].sizes(), (std::vector<int64_t>{8, 4}));
  EXPECT_EQ(parameters["lora_magnitude_vector.default.weight"].sizes(), (std::vector<int64_t>{8}));
}

TEST_F(LoRALinearTest, CloneDeepCopiesAdaptersAndTrainability) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8));
  layer->add_adapter("other", LoRAOptions(2).alpha(3).use_dora(true).dropout(0.1));
  randomize_B(layer);
  auto copy = std::dynamic_pointer_cast<lora::LoRALinearImpl<>>(layer->clone());
  ASSERT_NE(copy, nullptr);

  const auto original = layer->named_parameters();
  const auto copied = copy->named_parameters();
  ASSERT_EQ(original.keys(), copied.keys());
  for (const auto& item : original) {
    const auto& twin = copied[item.key()];
    EXPECT_TRUE(torch::equal(item.value(), twin)) << item.key();
    EXPECT_NE(item.value().data_ptr(), twin.data_ptr()) << item.key() << " shares storage";
    EXPECT_EQ(item.value().requires_grad(), twin.requires_grad()) << item.key();
  }
  EXPECT_EQ(copy->adapter_names(), layer->adapter_names());
  EXPECT_EQ(copy->active_adapters(), layer->active_adapters());
  EXPECT_DOUBLE_EQ(copy->adapter_options("other").dropout(), 0.1);

  layer->eval();
  copy->eval();
  const auto x = torch::randn({3, 16});
  EXPECT_TRUE(torch::equal(copy->forward(x), layer(x)));
  {
    torch::NoGradGuard no_grad;
    copy->lora_B("default").add_(1.0);
  }
  EXPECT_FALSE(torch::equal(copy->lora_B("default"), layer->lora_B("default")));
  EXPECT_FALSE(torch::equal(copy->forward(x), layer(x)));
}

TEST_F(LoRALinearTest, CloneWorksInsideAParentModule) {
  torch::nn::Sequential model(torch::nn::Linear(8, 8),
                              lora::LoRALinear<>(torch::nn::LinearOptions(8, 4), LoRAOptions(2).alpha(3)));
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  ASSERT_NE(copy, nullptr);
  auto layer = copy->ptr(1)->as<lora::LoRALinearImpl<>>();
  ASSERT_NE(layer, nullptr);
  EXPECT_FALSE(layer->base_weight().requires_grad());
  EXPECT_TRUE(layer->lora_A("default").requires_grad());
  const auto x = torch::randn({2, 8});
  EXPECT_TRUE(torch::equal(copy->forward(x), model->forward(x)));
}

TEST_F(LoRALinearTest, DropoutOnlyTouchesTheAdapterInputInTraining) {
  torch::nn::Linear base(64, 32);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8).dropout(0.5));
  randomize_B(layer);
  const auto x = torch::randn({8, 64});
  const auto A = layer->lora_A("default");
  const auto B = layer->lora_B("default");
  layer->eval();
  EXPECT_LT(max_abs_diff(layer(x), reference_lora(x, base->weight, base->bias, A, B, 2.0)), 1e-5);
  layer->train();
  const auto first = layer(x).detach();
  const auto second = layer(x).detach();
  EXPECT_FALSE(torch::equal(first, second));
  // What differs from the base output is s·B·A applied to a dropped-out x: a rank-4 update.
  const auto singular = torch::linalg_svdvals((first - base(x)).to(torch::kDouble));
  EXPECT_GT(singular[3].item<double>(), 1e-3);
  EXPECT_LT(singular[4].item<double>(), 1e-6 * singular[0].item<double>());
}

TEST_F(LoRALinearTest, ZeroDropoutIsTheSameInTrainingAndEvaluation) {
  lora::LoRALinear<> layer(torch::nn::LinearOptions(16, 8), LoRAOptions(4).alpha(8));
  randomize_B(layer);
  const auto x = torch::randn({4, 16});
  layer->train();
  const auto training = layer(x).detach();
  layer->eval();
  EXPECT_TRUE(torch::equal(layer(x), training));
}

TEST_F(LoRALinearTest, SafeMergeOfSeveralAdaptersIsAllOrNothing) {
  torch::nn::Linear base(8, 4);
  const auto W0 = base->weight.detach().clone();
  lora::LoRALinear<> layer(base, LoRAOptions(2).alpha(3));
  layer->add_adapter("broken", LoRAOptions(2).alpha(3));
  randomize_B(layer);
  {
    torch::NoGradGuard no_grad;
    layer->lora_B("broken").fill_(std::numeric_limits<float>::infinity());
  }
  LORA_EXPECT_THROWS_WITH(layer->merge({"default", "broken"}, /*safe_merge=*/true), "merging adapter 'broken'");
  EXPECT_FALSE(layer->merged()) << "the merge of 'default' must be undone";
  EXPECT_TRUE(torch::equal(base->weight, W0)) << "bit for bit";
}

TEST_F(LoRALinearTest, SwitchingAwayFromAMergedAdapterUnmergesIt) {
  torch::nn::Linear base(8, 4);
  const auto W0 = base->weight.detach().clone();
  lora::LoRALinear<> layer(base, LoRAOptions(2).alpha(3));
  layer->add_adapter("other", LoRAOptions(2).alpha(3));
  randomize_B(layer, "default");
  randomize_B(layer, "other");
  const auto x = torch::randn({3, 8});
  layer->set_adapter("other");
  const auto only_other = layer(x).detach();
  layer->set_adapter("default");
  layer->merge();
  layer->set_adapter("other");  // "default" must leave the weight
  EXPECT_FALSE(layer->merged());
  EXPECT_LT(max_abs_diff(base->weight, W0), 1e-6);
  EXPECT_LT(max_abs_diff(layer(x), only_other), 1e-5);
  layer->enable_adapters(false);
  LORA_EXPECT_THROWS_WITH(layer->merge(), "cannot merge while adapters are disabled");
}

TEST_F(LoRALinearTest, CloneOfAMergedLayerStaysMerged) {
  torch::nn::Linear base(8, 4);
  lora::LoRALinear<> layer(base, LoRAOptions(2).alpha(3).use_dora(true));
  randomize_B(layer);
  const auto x = torch::randn({3, 8});
  const auto adapted = layer(x).detach();
  layer->merge();
  auto copy = std::dynamic_pointer_cast<lora::LoRALinearImpl<>>(layer->clone());
  EXPECT_EQ(copy->merged_adapters(), std::vector<std::string>{"default"});
  EXPECT_LT(max_abs_diff(copy->forward(x), adapted), 1e-5);
  copy->unmerge();
  EXPECT_LT(max_abs_diff(copy->forward(x), adapted), 1e-5);
  layer->unmerge();
  EXPECT_LT(max_abs_diff(copy->base_weight(), layer->base_weight()), 1e-5);
}
