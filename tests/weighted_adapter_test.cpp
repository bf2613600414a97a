// lora::add_weighted_adapter against PEFT's formulas, computed here from the source adapters'
// tensors: linear (√(w·s) on both factors), cat (w·s on A, concatenated), svd (truncated SVD of
// Σ w·s·ΔW, ΔW holding s).

#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <lora/lora.hpp>
#include <lora/models/bert.hpp>

#include "multi_adapter_fixtures.hpp"
#include "test_helpers.hpp"

namespace {

using lora::testing::max_abs_diff;
using lora::testing::randomize;
using lora::testing::throws_with;
using lora::testing::tiny_config;

/// "x" (r 2, alpha 4, query and value), "y" (r 2, alpha 6, query and key), "z" (r 3, alpha 3,
/// value), each with random values.
lora::models::BertForSequenceClassification three_adapters() {
  torch::manual_seed(0);
  lora::models::BertForSequenceClassification model(tiny_config());
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(2).alpha(4)).target_modules({"query", "value"}), "x");
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(2).alpha(6)).target_modules({"query", "key"}), "y");
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(3).alpha(3)).target_modules({"value"}), "z");
  for (const auto* name : {"x", "y", "z"}) randomize(*model, name);
  return model;
}

std::shared_ptr<lora::LoRALayer> layer_at(torch::nn::Module& model, const std::string& path) {
  for (const auto& [name, layer] : lora::lora_layers(model)) {
    if (name == path) return layer;
  }
  ADD_FAILURE() << "no LoRA layer " << path;
  return nullptr;
}

lora::WeightedAdapterOptions combine(lora::Combination combination, std::optional<int64_t> svd_rank = std::nullopt) {
  lora::WeightedAdapterOptions options;
  options.combination = combination;
  options.svd_rank = svd_rank;
  return options;
}

const std::string kQuery = "bert.encoder.layer.1.attention.self.query";  // x and y
const std::string kValue = "bert.encoder.layer.0.attention.self.value";  // x and z
const std::string kKey = "bert.encoder.layer.0.attention.self.key";      // y only

TEST(WeightedAdapterTest, LinearScalesBothFactorsBySquareRoots) {
  auto model = three_adapters();
  lora::add_weighted_adapter(*model, {"x", "y"}, {0.7, 0.5}, "xy", combine(lora::Combination::kLinear));
  const auto layer = layer_at(*model, kQuery);
  const auto& x = layer->adapter_state("x");
  const auto& y = layer->adapter_state("y");
  const auto& xy = layer->adapter_state("xy");
  const double cx = std::sqrt(0.7 * 2.0), cy = std::sqrt(0.5 * 3.0);  // scalings 4/2 and 6/2
  EXPECT_LT(max_abs_diff(xy[0].second, cx * x[0].second + cy * y[0].second), 1e-6);
  EXPECT_LT(max_abs_diff(xy[1].second, cx * x[1].second + cy * y[1].second), 1e-6);
  EXPECT_DOUBLE_EQ(layer->adapter_options("xy").scaling(), 1.0);
  // Where only y is, only y counts; the union of the targets gets the adapter.
  const auto key = layer_at(*model, kKey);
  EXPECT_LT(max_abs_diff(key->adapter_state("xy")[0].second, cy * key->adapter_state("y")[0].second), 1e-6);
  EXPECT_TRUE(layer_at(*model, kValue)->has_adapter("xy"));
  const auto config = lora::detail::model_adapter_config(*model, "xy");
  EXPECT_EQ(config->target_modules(), (std::vector<std::string>{"key", "query", "value"}));
  EXPECT_EQ(config->adapter().r(), 2);
  EXPECT_DOUBLE_EQ(config->adapter().alpha(), 2.0);
}

TEST(WeightedAdapterTest, CatIsTheExactWeightedSum) {
  auto model = three_adapters();
  lora::add_weighted_adapter(*model, {"x", "z"}, {0.7, -0.3}, "xz", combine(lora::Combination::kCat));
  for (const auto& path : {kValue, kQuery}) {
    const auto layer = layer_at(*model, path);
    auto expected = 0.7 * layer->delta_weight("x");
    if (layer->has_adapter("z")) expected = expected - 0.3 * layer->delta_weight("z");
    EXPECT_LT(max_abs_diff(layer->delta_weight("xz"), expected), 1e-6) << path;
  }
  const auto value = layer_at(*model, kValue);
  EXPECT_EQ(value->adapter_options("xz").r(), 5);
  // PEFT's layout: A = [w·s·A_x; w·s·A_z], B = [B_x, B_z].
  EXPECT_LT(max_abs_diff(value->adapter_state("xz")[0].second.slice(0, 0, 2), 0.7 * 2.0 * value->adapter_state("x")[0].second),
            1e-6);
  EXPECT_LT(max_abs_diff(value->adapter_state("xz")[1].second.slice(1, 2, 5), value->adapter_state("z")[1].second), 1e-6);
  // The query layer has x alone: its last three ranks stay zero.
  EXPECT_EQ(layer_at(*model, kQuery)->adapter_state("xz")[0].second.slice(0, 2, 5).abs().max().item<double>(), 0.0);
}

TEST(WeightedAdapterTest, SvdTruncatesPeftsDoublyScaledSum) {
  auto model = three_adapters();
  // Rank 5 holds Σ (w·s)·(s·B·A) of x (r 2) and z (r 3) exactly.
  lora::add_weighted_adapter(*model, {"x", "z"}, {0.7, 0.4}, "full", combine(lora::Combination::kSvd, 5));
  const auto value = layer_at(*model, kValue);
  const double sx = 2.0, sz = 1.0;
  const auto sum = 0.7 * sx * value->delta_weight("x") + 0.4 * sz * value->delta_weight("z");
  EXPECT_LT(max_abs_diff(value->delta_weight("full"), sum), 1e-5);
  // Rank 1: the best rank-1 approximation, whose error is the second singular value.
  lora::add_weighted_adapter(*model, {"x", "z"}, {0.7, 0.4}, "one", combine(lora::Combination::kSvd, 1));
  auto singular_values = [](const torch::Tensor& m) { return std::get<1>(at::linalg_svd(m.to(torch::kDouble), false)); };
  const auto singular = singular_values(sum);
  const auto error = singular_values(value->delta_weight("one") - sum)[0];
  EXPECT_NEAR(error.item<double>(), singular[1].item<double>(), 1e-5);
  EXPECT_EQ(value->adapter_options("one").r(), 1);
  // Default rank: the largest combined (3).
  lora::add_weighted_adapter(*model, {"x", "z"}, {0.7, 0.4}, "default_rank");
  EXPECT_EQ(value->adapter_options("default_rank").r(), 3);
}

TEST(WeightedAdapterTest, RefusalsChangeNothing) {
  auto model = three_adapters();
  const auto keys = model->named_parameters().keys();
  using lora::Combination;
  EXPECT_TRUE(throws_with([&] { lora::add_weighted_adapter(*model, {}, {}, "n"); }, "no adapters to combine"));
  EXPECT_TRUE(throws_with([&] { lora::add_weighted_adapter(*model, {"x", "y"}, {1.0}, "n"); }, "1 weights for 2 adapters"));
  EXPECT_TRUE(throws_with([&] { lora::add_weighted_adapter(*model, {"x", "w"}, {1.0, 1.0}, "n"); }, "unknown adapter 'w'"));
  EXPECT_TRUE(throws_with([&] { lora::add_weighted_adapter(*model, {"x"}, {1.0}, "y"); }, "adapter 'y' exists already"));
  EXPECT_TRUE(throws_with([&] { lora::add_weighted_adapter(*model, {"x", "z"}, {1.0, 1.0}, "n", combine(Combination::kLinear)); },
                          "linear needs equal ranks, but 'x' has r=2 and 'z' r=3"));
  EXPECT_TRUE(throws_with([&] { lora::add_weighted_adapter(*model, {"x", "y"}, {1.0, -1.0}, "n", combine(Combination::kLinear)); },
                          "adapter 'y' has weight -1"));
  EXPECT_TRUE(throws_with([&] { lora::add_weighted_adapter(*model, {"x"}, {1.0}, "n", combine(Combination::kSvd, 0)); },
                          "svd_rank must be positive"));
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(2).use_dora(true)).target_modules({"key"}), "d");
  EXPECT_TRUE(throws_with([&] { lora::add_weighted_adapter(*model, {"x", "d"}, {1.0, 1.0}, "n"); }, "is a DoRA adapter"));
  lora::delete_adapter(*model, "d");
  EXPECT_EQ(model->named_parameters().keys(), keys);
}

}  // namespace
