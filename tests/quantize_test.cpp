// The int8 frozen base (lora::quantize_base), lora::dropout's parallel masks, and the folded
// attention every encoder now runs, each against an independent computation.

#include <limits>

#include <lora/models/bert.hpp>
#include <lora/models/bert_checkpoint.hpp>
#include <lora/models/detail/attention.hpp>
#include <lora/quantize.hpp>

#include "test_helpers.hpp"

using lora::LoraConfig;
using lora::LoRAOptions;
using lora::models::BertConfig;
using lora::models::BertForSequenceClassification;
using lora::testing::max_abs_diff;

namespace {

class QuantizeTest : public lora::testing::SeededTest {};

double relative_error(const torch::Tensor& value, const torch::Tensor& reference) {
  return ((value - reference).norm() / reference.norm()).item<double>();
}

BertConfig small_config() {
  BertConfig config;
  config.vocab_size = 60;
  config.hidden_size = 64;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 4;
  config.intermediate_size = 128;
  config.max_position_embeddings = 16;
  config.hidden_dropout_prob = 0.0;
  config.attention_probs_dropout_prob = 0.0;
  return config;
}

BertForSequenceClassification adapted_bert() {
  BertForSequenceClassification model(small_config());
  lora::models::init_bert_weights(*model);
  lora::inject(*model, LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query", "value"}).task_type("SEQ_CLS"));
  // B starts at zero: give the adapters something to add.
  torch::NoGradGuard no_grad;
  for (const auto& [name, layer] : lora::lora_layers(*model)) {
    if (layer->has_adapter("default")) layer->adapter_state("default")[1].second.normal_(0.0, 0.05);
  }
  return model;
}

torch::Tensor token_ids() { return torch::randint(1, 60, {3, 10}, torch::kLong); }

torch::Tensor padding_mask() {
  auto mask = torch::ones({3, 10}, torch::kLong);
  mask.index_put_({1, torch::indexing::Slice(6)}, 0);
  mask.index_put_({2, torch::indexing::Slice(3)}, 0);
  return mask;
}

// ---- one layer -----------------------------------------------------------------------------

TEST_F(QuantizeTest, Int8LayerIsCloseToFp32AndItsInputGradientUsesTheDequantisedWeight) {
  torch::nn::Linear base(48, 40);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8));
  const auto weight = base->weight.detach().clone();
  const auto x = torch::randn({2, 7, 48});
  const auto fp32 = layer(x).detach();
  layer->quantize_base();
  EXPECT_TRUE(layer->base_is_int8());
  EXPECT_EQ(layer->base_weight().numel(), 0);  // the fp32 values are released
  const auto input = x.clone().requires_grad_(true);
  const auto y = layer(input);
  EXPECT_EQ(y.sizes(), fp32.sizes());
  const double error = relative_error(y.detach(), fp32);
  EXPECT_LT(error, 2e-2);
  EXPECT_GT(error, 0.0);  // really the int8 product, not the old weight

  // dL/dx = g·W_q, W_q = round(W / s)·s with the per-row scale s = max|w| / 127.
  const auto grad = torch::randn_like(y);
  y.backward(grad);
  const auto scale = weight.abs().amax(1, true) / 127.0;
  const auto dequantised = (weight / scale).round().clamp(-128, 127) * scale;
  EXPECT_LT(max_abs_diff(input.grad(), grad.reshape({-1, 40}).mm(dequantised).view({2, 7, 48})), 1e-5);
}

TEST_F(QuantizeTest, AdapterGradientsThroughAnInt8BaseEqualThoseThroughFp32) {
  // With a loss linear in y, dL/dy does not depend on the base, so A's and B's gradients
  // must be the fp32 layer's exactly.
  torch::nn::Linear fp32_base(32, 24);
  torch::nn::Linear int8_base(32, 24);
  {
    torch::NoGradGuard no_grad;
    int8_base->weight.copy_(fp32_base->weight);
    int8_base->bias.copy_(fp32_base->bias);
  }
  lora::LoRALinear<> fp32(fp32_base, LoRAOptions(3).alpha(6));
  lora::LoRALinear<> int8(int8_base, LoRAOptions(3).alpha(6));
  {
    torch::NoGradGuard no_grad;
    fp32->adapter_state("default")[1].second.normal_();  // B: nonzero, so that A gets a gradient
    for (size_t i = 0; i < 2; ++i) int8->adapter_state("default")[i].second.copy_(fp32->adapter_state("default")[i].second);
  }
  int8->quantize_base();
  const auto x = torch::randn({5, 32});
  const auto g = torch::randn({5, 24});
  (fp32(x) * g).sum().backward();
  (int8(x) * g).sum().backward();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(torch::equal(fp32->adapter_state("default")[i].second.grad(), int8->adapter_state("default")[i].second.grad()))
        << fp32->adapter_state("default")[i].first;
  }
  EXPECT_FALSE(int8_base->bias.grad().defined());  // the base stays frozen
}

TEST_F(QuantizeTest, AnInt8BaseRefusesWhatNeedsTheFp32Weight) {
  lora::LoRALinear<> layer(torch::nn::LinearOptions(16, 8), LoRAOptions(2).alpha(4));
  layer->quantize_base();
  LORA_EXPECT_THROWS_WITH(layer->merge(), "cannot merge: the base weight is stored int8");
  LORA_EXPECT_THROWS_WITH(layer->merge_and_unload(), "cannot merge: the base weight is stored int8");
  LORA_EXPECT_THROWS_WITH(layer->adapted_weight(), "cannot read the base weight: the base weight is stored int8");
  LORA_EXPECT_THROWS_WITH(layer->clone(), "cannot clone the layer");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("dora", LoRAOptions(2).use_dora(true)),
                          "adapter 'dora' uses DoRA, which needs the fp32 base weight");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("pissa", LoRAOptions(2).init("pissa")), "has init 'pissa'");
  LORA_EXPECT_THROWS_WITH(layer->quantize_base(), "already int8");
  EXPECT_EQ(layer->adapter_names(), std::vector<std::string>{"default"});
  layer->add_adapter("second", LoRAOptions(3).alpha(3));  // plain adapters are welcome
  EXPECT_EQ(layer->lora_A("second").sizes(), (std::vector<int64_t>{3, 16}));
  std::ostringstream printed;
  layer->pretty_print(printed);
  EXPECT_NE(printed.str().find("base=int8"), std::string::npos) << printed.str();
}

TEST_F(QuantizeTest, LayersThatCannotBeInt8AreRefusedByName) {
  lora::LoRALinear<> merged(torch::nn::LinearOptions(16, 8), LoRAOptions(2).alpha(4));
  merged->merge();
  LORA_EXPECT_THROWS_WITH(merged->quantize_base(), "while adapters are merged into it (merged: default)");
  lora::LoRALinear<> dora(torch::nn::LinearOptions(16, 8), LoRAOptions(2).use_dora(true));
  LORA_EXPECT_THROWS_WITH(dora->quantize_base(), "adapter 'default' uses DoRA");
  lora::LoRAEmbedding embedding(torch::nn::EmbeddingOptions(10, 4), LoRAOptions(2));
  LORA_EXPECT_THROWS_WITH(embedding->quantize_base(), "for Linear layers over torch::nn::Linear only");
  lora::LoRALinear<> trainable(torch::nn::LinearOptions(16, 8));
  trainable->base_weight().requires_grad_(true);
  LORA_EXPECT_THROWS_WITH(trainable->quantize_base(), "the base weight is trainable");
  lora::LoRALinear<> wide(torch::nn::LinearOptions(16, 8));
  wide->to(torch::kDouble);
  LORA_EXPECT_THROWS_WITH(wide->quantize_base(), "made from a float32 weight (got Double)");
  for (auto* layer : {&merged, &dora, &trainable, &wide}) EXPECT_FALSE((*layer)->base_is_int8());
  EXPECT_EQ(wide->base_weight().numel(), 16 * 8);
}

// ---- a whole model -------------------------------------------------------------------------

TEST_F(QuantizeTest, ModelKeepsItsHeadFp32AndItsLogitsClose) {
  auto model = adapted_bert();
  model->eval();
  const auto ids = token_ids();
  const auto mask = padding_mask();
  torch::NoGradGuard no_grad;
  const auto fp32 = model(ids, mask);
  const auto report = lora::quantize_base(*model);
  // 2 layers × 6 projections + the pooler; the saved classifier is not among them.
  EXPECT_EQ(report.layers.size(), 13u);
  EXPECT_EQ(lora::int8_layer_count(*model), 13u);
  EXPECT_EQ(std::count(report.layers.begin(), report.layers.end(), "classifier"), 0);
  const int64_t projections = 2 * (3 * 64 * 64 + 64 * 64 + 2 * 64 * 128) + 64 * 64;
  EXPECT_EQ(report.fp32_bytes, 4 * projections);
  EXPECT_LT(report.int8_bytes, 0.6 * static_cast<double>(report.fp32_bytes));
  const auto int8 = model(ids, mask);
  EXPECT_LT(relative_error(int8, fp32), 5e-2);
  EXPECT_GT(max_abs_diff(int8, fp32), 0.0);
  EXPECT_EQ(lora::quantize_base(*model).layers.size(), 0u);  // nothing left to do
}

TEST_F(QuantizeTest, AFailureHalfwayChangesNoLayer) {
  auto model = adapted_bert();
  // The last projection cannot be int8 (double weights): found after the others' copies exist.
  auto& last = model->bert->pooler->dense;
  last->to(torch::kDouble);
  const auto first_weight = model->bert->layers[0]->as<lora::models::BertLayerImpl>()->attention->self->key->base_weight().clone();
  LORA_EXPECT_THROWS_WITH(lora::quantize_base(*model), "layer 'bert.pooler.dense'");
  EXPECT_EQ(lora::int8_layer_count(*model), 0u);
  const auto key = model->bert->layers[0]->as<lora::models::BertLayerImpl>()->attention->self->key;
  EXPECT_TRUE(torch::equal(key->base_weight(), first_weight));
  // A refusal found by the checks (a DoRA adapter) changes nothing either.
  auto other = adapted_bert();
  lora::inject(*other, LoraConfig(LoRAOptions(2).use_dora(true)).target_modules({"intermediate.dense"}), "dora");
  LORA_EXPECT_THROWS_WITH(lora::quantize_base(*other), "uses DoRA");
  EXPECT_EQ(lora::int8_layer_count(*other), 0u);
}

TEST_F(QuantizeTest, AdaptersTrainOnAnInt8ModelAsOnFp32AndOnlyThey) {
  // The same model and adapters twice, one with an int8 base: the losses of a few AdamW steps
  // follow each other within the int8 rounding, and only adapters and the saved head train.
  torch::manual_seed(5);
  auto fp32 = adapted_bert();
  torch::manual_seed(5);
  auto int8 = adapted_bert();
  lora::quantize_base(*int8);
  const auto ids = token_ids();
  const auto labels = torch::tensor({0, 1, 1}, torch::kLong);
  std::vector<std::vector<double>> losses(2);
  for (size_t which = 0; which < 2; ++which) {
    auto& model = which == 0 ? fp32 : int8;
    model->train();
    std::vector<torch::Tensor> trainable;
    for (const auto& parameter : model->parameters()) {
      if (parameter.requires_grad()) trainable.push_back(parameter);
    }
    torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(1e-2));
    for (int step = 0; step < 6; ++step) {
      optimizer.zero_grad();
      const auto loss = torch::nn::functional::cross_entropy(model(ids, padding_mask()), labels);
      loss.backward();
      optimizer.step();
      losses[which].push_back(loss.item<double>());
    }
  }
  EXPECT_LT(losses[1].back(), 0.9 * losses[1].front());  // it learns
  for (size_t step = 0; step < losses[0].size(); ++step) EXPECT_NEAR(losses[1][step], losses[0][step], 0.02) << step;
  for (const auto& item : int8->named_parameters()) {
    const bool adapter = item.key().find("lora_") != std::string::npos;
    const bool head = item.key().find("classifier.modules_to_save") != std::string::npos;
    EXPECT_EQ(item.value().grad().defined(), adapter || head) << item.key();
  }
}

// ---- lora::dropout ---------------------------------------------------------------------------

TEST_F(QuantizeTest, DropoutKeepsOneMinusPScaledAndReproducesUnderASeed) {
  const auto x = torch::randn({64, 1000});
  torch::manual_seed(7);
  const auto first = lora::dropout(x, 0.3, true);
  torch::manual_seed(7);
  const auto second = lora::dropout(x, 0.3, true);
  EXPECT_TRUE(torch::equal(first, second));
  const auto kept = first != 0;
  // 64,000 draws: the kept share is 0.7 within 5 standard deviations (0.0018 each).
  EXPECT_NEAR(kept.to(torch::kDouble).mean().item<double>(), 0.7, 0.01);
  EXPECT_TRUE(torch::allclose(first.masked_select(kept), (x / 0.7).masked_select(kept), 1e-6, 0));
  // Every element is kept or dropped independently: neighbours agree as often as chance says.
  const auto agree = (kept.flatten().slice(0, 1) == kept.flatten().slice(0, 0, -1)).to(torch::kDouble).mean().item<double>();
  EXPECT_NEAR(agree, 0.7 * 0.7 + 0.3 * 0.3, 0.01);
  EXPECT_FALSE(torch::equal(first, lora::dropout(x, 0.3, true)));  // the next call draws anew
}

TEST_F(QuantizeTest, DropoutDoesNotDependOnTheThreadCount) {
  const auto x = torch::randn({3, 50000});
  const auto threads = at::get_num_threads();
  torch::manual_seed(3);
  const auto many = lora::dropout(x, 0.1, true);
  at::set_num_threads(1);
  torch::manual_seed(3);
  const auto one = lora::dropout(x, 0.1, true);
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(many, one));
}

TEST_F(QuantizeTest, DropoutGradientIsTheMaskAndEvaluationIsIdentity) {
  const auto x = torch::randn({40, 30}, torch::requires_grad());
  const auto y = lora::dropout(x, 0.25, true);
  y.sum().backward();
  EXPECT_TRUE(torch::equal(x.grad(), (y.detach() != 0).to(torch::kFloat) / 0.75));
  EXPECT_TRUE(lora::dropout(x, 0.25, false).is_same(x));
  EXPECT_TRUE(lora::dropout(x, 0.0, true).is_same(x));  // p = 0 runs no kernel
  EXPECT_TRUE(torch::equal(lora::dropout(x, 1.0, true), torch::zeros_like(x)));
  LORA_EXPECT_THROWS_WITH(lora::dropout(x, 1.5, true), "probability must be in [0, 1] (got 1.5)");
}

// ---- attention -------------------------------------------------------------------------------

TEST_F(QuantizeTest, FoldedAttentionEqualsTransformersEagerFormula) {
  const int64_t batch = 3, seq = 7, heads = 4, head_size = 16;
  const auto q = torch::randn({batch, seq, heads * head_size}, torch::requires_grad());
  const auto k = torch::randn({batch, seq, heads * head_size}, torch::requires_grad());
  const auto v = torch::randn({batch, seq, heads * head_size}, torch::requires_grad());
  auto mask = torch::ones({batch, seq});
  mask.index_put_({1, torch::indexing::Slice(4)}, 0);
  const auto additive = lora::models::detail::additive_attention_mask(mask, torch::kFloat);
  auto split = [&](const torch::Tensor& t) { return t.view({batch, seq, heads, head_size}).permute({0, 2, 1, 3}); };
  const auto scores = torch::matmul(split(q), split(k).transpose(-1, -2)) / std::sqrt(16.0) + additive;
  const auto expected = torch::matmul(torch::softmax(scores, -1), split(v)).permute({0, 2, 1, 3}).reshape({batch, seq, -1});
  const auto got = lora::models::detail::multi_head_attention(q, k, v, heads, additive, 0.1, /*training=*/false);
  EXPECT_LT(max_abs_diff(got, expected), 1e-6);
  const auto g = torch::randn_like(got);
  const auto want = torch::autograd::grad({expected}, {q, k, v}, {g});
  const auto have = torch::autograd::grad({got}, {q, k, v}, {g});
  for (size_t i = 0; i < 3; ++i) EXPECT_LT(max_abs_diff(have[i], want[i]), 1e-5) << i;
  {
    torch::NoGradGuard no_grad;  // the in-place softmax path
    EXPECT_LT(max_abs_diff(lora::models::detail::multi_head_attention(q, k, v, heads, additive, 0.1, false), expected), 1e-6);
    const auto unmasked = torch::matmul(torch::softmax(torch::matmul(split(q), split(k).transpose(-1, -2)) / 4.0, -1), split(v));
    EXPECT_LT(max_abs_diff(lora::models::detail::multi_head_attention(q, k, v, heads, {}, 0.0, true),
                           unmasked.permute({0, 2, 1, 3}).reshape({batch, seq, -1})),
              1e-6);
  }
}

}  // namespace
