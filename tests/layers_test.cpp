// LoRA over Embedding, Conv1d and Conv2d layers (PEFT's lora.Embedding / lora.Conv1d /
// lora.Conv2d): the same guarantees as LoRALinear, each against an independent computation.

#include <fstream>
#include <map>

#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/lora.hpp>

#include "test_helpers.hpp"

using lora::LoRAOptions;
using lora::testing::max_abs_diff;

namespace {

class LayerKindsTest : public lora::testing::SeededTest {};

namespace F = torch::nn::functional;

/// Replaces every factor of `layer`'s adapter by random values (of the base weight's order of
/// magnitude), so the update is visible.
template <typename Layer>
void randomize(Layer& layer, const std::string& name = "default") {
  torch::NoGradGuard no_grad;
  layer->lora_A(name).copy_(0.3 * torch::randn_like(layer->lora_A(name)));
  layer->lora_B(name).copy_(0.3 * torch::randn_like(layer->lora_B(name)));
}

/// PEFT's Embedding forward, written out: W[ids] + s · (Aᵀ)[ids] Bᵀ.
torch::Tensor reference_embedding(const torch::Tensor& ids, const torch::Tensor& W, const torch::Tensor& A,
                                  const torch::Tensor& B, double s) {
  const auto Wd = W.to(torch::kDouble), Ad = A.to(torch::kDouble), Bd = B.to(torch::kDouble);
  return Wd.index_select(0, ids.reshape(-1)).view({ids.size(0), ids.size(1), -1}) +
         s * Ad.t().index_select(0, ids.reshape(-1)).matmul(Bd.t()).view({ids.size(0), ids.size(1), -1});
}

/// PEFT's Conv2d forward, written out: conv(x, W, b) + s · conv_B(conv_A(x)).
torch::Tensor reference_conv2d(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                               const torch::Tensor& A, const torch::Tensor& B, double s, int64_t stride, int64_t padding) {
  const auto xd = x.to(torch::kDouble);
  const auto base = torch::conv2d(xd, W.to(torch::kDouble), b.to(torch::kDouble), stride, padding);
  const auto down = torch::conv2d(xd, A.to(torch::kDouble), {}, stride, padding);
  return base + s * torch::conv2d(down, B.to(torch::kDouble));
}

/// PEFT's get_delta_weight for a k×k convolution: conv2d(Aᵀ, B)ᵀ · s.
torch::Tensor peft_conv2d_delta(const torch::Tensor& A, const torch::Tensor& B, double s) {
  return torch::conv2d(A.to(torch::kDouble).transpose(0, 1), B.to(torch::kDouble)).transpose(0, 1) * s;
}

void expect_gradients_match(const std::function<torch::Tensor()>& loss, const torch::Tensor& parameter) {
  lora::testing::expect_gradient_matches_finite_differences(loss, parameter, 1e-6);
}

}  // namespace

// ---- Embedding ----

TEST_F(LayerKindsTest, EmbeddingStartsAsThePeftInitAndEqualsTheBase) {
  torch::nn::Embedding base(torch::nn::EmbeddingOptions(12, 5));
  lora::LoRAEmbedding layer(base, LoRAOptions(3).alpha(6));
  // PEFT: lora_embedding_A zero, lora_embedding_B normal; shapes [r, num], [dim, r].
  EXPECT_EQ(layer->lora_A("default").sizes(), (std::vector<int64_t>{3, 12}));
  EXPECT_EQ(layer->lora_B("default").sizes(), (std::vector<int64_t>{5, 3}));
  EXPECT_EQ(layer->lora_A("default").abs().sum().item<double>(), 0.0);
  EXPECT_GT(layer->lora_B("default").abs().sum().item<double>(), 0.0);
  const auto ids = torch::randint(12, {4, 7});
  EXPECT_TRUE(torch::equal(layer(ids), base(ids)));
  EXPECT_EQ(layer->in_features(), 12);
  EXPECT_EQ(layer->out_features(), 5);
  EXPECT_EQ(layer->layer_kind(), lora::LayerKind::kEmbedding);
}

TEST_F(LayerKindsTest, EmbeddingForwardMatchesIndependentComputation) {
  torch::nn::Embedding base(torch::nn::EmbeddingOptions(12, 5));
  lora::LoRAEmbedding layer(base, LoRAOptions(3).alpha(7));  // s = 7/3
  randomize(layer);
  const auto ids = torch::randint(12, {4, 7});
  const auto expected = reference_embedding(ids, base->weight, layer->lora_A("default"), layer->lora_B("default"), 7.0 / 3);
  EXPECT_LT(max_abs_diff(layer(ids), expected), 1e-5);
  // ΔW = s·(B·A)ᵀ, PEFT's get_delta_weight, shaped like the embedding table.
  const auto delta = (layer->lora_B("default").to(torch::kDouble).matmul(layer->lora_A("default").to(torch::kDouble))).t() * (7.0 / 3);
  EXPECT_LT(max_abs_diff(layer->delta_weight("default"), delta), 1e-5);
  // rsLoRA: s = alpha / √r.
  lora::LoRAEmbedding rs(base, LoRAOptions(4).alpha(6).use_rslora(true));
  randomize(rs);
  EXPECT_LT(max_abs_diff(rs(ids), reference_embedding(ids, base->weight, rs->lora_A("default"), rs->lora_B("default"), 3.0)),
            1e-5);
}

TEST_F(LayerKindsTest, EmbeddingGradientsMatchFiniteDifferencesAndSkipPaddingIdx) {
  torch::nn::Embedding base(torch::nn::EmbeddingOptions(6, 4).padding_idx(0));
  base->to(torch::kDouble);
  lora::LoRAEmbedding layer(base, LoRAOptions(2).alpha(3));
  randomize(layer);
  const auto ids = torch::tensor({{1, 2, 5}, {0, 3, 1}}, torch::kLong);
  const auto weights = torch::randn({2, 3, 4}, torch::kDouble);
  auto loss = [&] { return (layer(ids) * weights).sum(); };
  expect_gradients_match(loss, layer->lora_B("default"));
  // A's column for padding_idx gets no gradient (F.embedding's rule, which PEFT's _embed keeps).
  layer->lora_A("default").mutable_grad().zero_();
  loss().backward();
  EXPECT_EQ(layer->lora_A("default").grad().select(1, 0).abs().sum().item<double>(), 0.0);
  EXPECT_GT(layer->lora_A("default").grad().select(1, 1).abs().sum().item<double>(), 0.0);
  // and the other columns match finite differences
  torch::nn::Embedding plain(torch::nn::EmbeddingOptions(6, 4));
  plain->to(torch::kDouble);
  lora::LoRAEmbedding free_layer(plain, LoRAOptions(2).alpha(3));
  randomize(free_layer);
  expect_gradients_match([&] { return (free_layer(ids) * weights).sum(); }, free_layer->lora_A("default"));
  EXPECT_FALSE(free_layer->base_weight().requires_grad());
}

TEST_F(LayerKindsTest, EmbeddingMergeUnmergeRestoresTheTable) {
  torch::nn::Embedding base(torch::nn::EmbeddingOptions(9, 4));
  lora::LoRAEmbedding layer(base, LoRAOptions(2).alpha(5));
  randomize(layer);
  const auto original = base->weight.detach().clone();
  const auto ids = torch::randint(9, {3, 5});
  const auto unmerged = layer(ids).detach();
  layer->merge();
  EXPECT_LT(max_abs_diff(base->weight, original + layer->delta_weight("default")), 1e-6);
  EXPECT_LT(max_abs_diff(layer(ids), unmerged), 1e-5);
  EXPECT_LT(max_abs_diff(base(ids), unmerged), 1e-5);  // the plain table alone now computes it
  layer->unmerge();
  EXPECT_LT(max_abs_diff(base->weight, original), 1e-6);
  EXPECT_LT(max_abs_diff(layer(ids), unmerged), 1e-6);
}

TEST_F(LayerKindsTest, EmbeddingDoraMatchesPeftsFormula) {
  torch::nn::Embedding base(torch::nn::EmbeddingOptions(9, 4));
  lora::LoRAEmbedding layer(base, LoRAOptions(2).alpha(3).use_dora(true));
  randomize(layer);
  {
    torch::NoGradGuard no_grad;
    layer->lora_magnitude_vector("default").mul_(torch::rand({4}) + 0.5);
  }
  // PEFT: magnitude [embedding_dim]; norm over the vocabulary of Wᵀ + s·B·A; y = m/‖·‖ ⊙ (W[ids] + s·A[:, ids]ᵀBᵀ).
  EXPECT_EQ(layer->lora_magnitude_vector("default").sizes(), (std::vector<int64_t>{4}));
  const double s = 1.5;
  const auto W = base->weight.to(torch::kDouble);
  const auto A = layer->lora_A("default").to(torch::kDouble), B = layer->lora_B("default").to(torch::kDouble);
  const auto norm = (W.t() + s * B.matmul(A)).norm(2, {1});
  const auto scale = layer->lora_magnitude_vector("default").to(torch::kDouble) / norm;
  const auto ids = torch::randint(9, {2, 6});
  const auto expected = scale * reference_embedding(ids, base->weight, layer->lora_A("default"), layer->lora_B("default"), s);
  EXPECT_LT(max_abs_diff(layer(ids), expected), 1e-5);
  const auto unmerged = layer(ids).detach();
  const auto original = base->weight.detach().clone();
  layer->merge();
  EXPECT_LT(max_abs_diff(base(ids), unmerged), 1e-5);
  layer->unmerge();
  EXPECT_LT(max_abs_diff(base->weight, original), 1e-5);
}

TEST_F(LayerKindsTest, EmbeddingRandomInitKeepsPeftsNormalDrawsAndCloneIsDeep) {
  torch::nn::Embedding base(torch::nn::EmbeddingOptions(8, 3));
  lora::LoRAEmbedding layer(base, LoRAOptions(2).init("false"));
  EXPECT_GT(layer->lora_A("default").abs().sum().item<double>(), 0.0);  // randn, not zero
  auto copy = std::dynamic_pointer_cast<lora::LoRAEmbeddingImpl>(layer->clone());
  ASSERT_NE(copy, nullptr);
  EXPECT_TRUE(torch::equal(copy->lora_A("default"), layer->lora_A("default")));
  EXPECT_TRUE(copy->lora_A("default").requires_grad());
  EXPECT_FALSE(copy->base_weight().requires_grad());
  {
    torch::NoGradGuard no_grad;
    copy->lora_A("default").add_(1.0);
  }
  EXPECT_FALSE(torch::equal(copy->lora_A("default"), layer->lora_A("default")));
  const auto ids = torch::randint(8, {2, 2});
  EXPECT_FALSE(torch::equal(copy->forward(ids), layer(ids)));
}

TEST_F(LayerKindsTest, EmbeddingRefusesWhatItCannotAdapt) {
  LORA_EXPECT_THROWS_WITH(lora::LoRAEmbedding(torch::nn::Embedding(torch::nn::EmbeddingOptions(5, 3).max_norm(1.0))),
                          "LoRAEmbedding: an Embedding with max_norm (1) renormalises its weight in place");
  lora::LoRAEmbedding layer(torch::nn::EmbeddingOptions(5, 3), LoRAOptions(2));
  LORA_EXPECT_THROWS_WITH(layer(torch::randn({2, 3})), "LoRAEmbedding: expected integer ids (Long or Int), got Float");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("p", LoRAOptions(2).init("pissa")),
                          "LoRAEmbedding: init 'pissa' is defined for Linear layers only");
  LORA_EXPECT_THROWS_WITH(layer->lora_A("nope"), "LoRAEmbedding: cannot read unknown adapter 'nope' (adapters: default)");
  layer->delete_adapter("default");
  EXPECT_TRUE(layer->named_parameters().find("lora_embedding_A.default") == nullptr);
}

// ---- Conv2d / Conv1d ----

TEST_F(LayerKindsTest, Conv2dZeroInitEqualsTheBaseAndUsesPeftsShapes) {
  torch::nn::Conv2d base(torch::nn::Conv2dOptions(3, 6, 3).stride(2).padding(1));
  lora::LoRAConv2d layer(base, LoRAOptions(4).alpha(8));
  EXPECT_EQ(layer->lora_A("default").sizes(), (std::vector<int64_t>{4, 3, 3, 3}));
  EXPECT_EQ(layer->lora_B("default").sizes(), (std::vector<int64_t>{6, 4, 1, 1}));
  const auto x = torch::randn({2, 3, 9, 9});
  EXPECT_TRUE(torch::equal(layer(x), base(x)));
  EXPECT_EQ(layer->in_features(), 3);
  EXPECT_EQ(layer->out_features(), 6);
  EXPECT_EQ(layer->layer_kind(), lora::LayerKind::kConv);
}

TEST_F(LayerKindsTest, Conv2dForwardAndDeltaMatchIndependentComputations) {
  torch::nn::Conv2d base(torch::nn::Conv2dOptions(3, 5, 3).stride(2).padding(1));
  lora::LoRAConv2d layer(base, LoRAOptions(2).alpha(5));  // s = 2.5
  randomize(layer);
  const auto x = torch::randn({2, 3, 8, 8});
  const auto& A = layer->lora_A("default");
  const auto& B = layer->lora_B("default");
  EXPECT_LT(max_abs_diff(layer(x), reference_conv2d(x, base->weight, base->bias, A, B, 2.5, 2, 1)), 1e-5);
  EXPECT_LT(max_abs_diff(layer->delta_weight("default"), peft_conv2d_delta(A, B, 2.5)), 1e-5);
  // Unbatched input, as torch::nn::Conv2d takes it.
  EXPECT_LT(max_abs_diff(layer(x[0]), reference_conv2d(x.slice(0, 0, 1), base->weight, base->bias, A, B, 2.5, 2, 1)[0]),
            1e-5);
  // A 1×1 convolution: PEFT's other formula, (B·A) on the squeezed factors.
  torch::nn::Conv2d pointwise(torch::nn::Conv2dOptions(4, 3, 1));
  lora::LoRAConv2d point(pointwise, LoRAOptions(2).alpha(3));
  randomize(point);
  const auto squeezed = point->lora_B("default").flatten(1).to(torch::kDouble).matmul(point->lora_A("default").flatten(1).to(torch::kDouble));
  EXPECT_LT(max_abs_diff(point->delta_weight("default"), (squeezed * 1.5).view({3, 4, 1, 1})), 1e-6);
}

TEST_F(LayerKindsTest, Conv2dGradientsMatchFiniteDifferences) {
  torch::nn::Conv2d base(torch::nn::Conv2dOptions(2, 3, 3).padding(1));
  base->to(torch::kDouble);
  lora::LoRAConv2d layer(base, LoRAOptions(2).alpha(3));
  randomize(layer);
  const auto x = torch::randn({2, 2, 4, 4}, torch::kDouble);
  const auto weights = torch::randn({2, 3, 4, 4}, torch::kDouble);
  auto loss = [&] { return (layer(x) * weights).sum(); };
  expect_gradients_match(loss, layer->lora_A("default"));
  expect_gradients_match(loss, layer->lora_B("default"));
  EXPECT_FALSE(base->weight.grad().defined());
}

TEST_F(LayerKindsTest, Conv2dMergeUnmergeRestoresTheKernel) {
  torch::nn::Conv2d base(torch::nn::Conv2dOptions(3, 4, 3).padding(1));
  lora::LoRAConv2d layer(base, LoRAOptions(2).alpha(3));
  lora::LoRAOptions second(3);
  layer->add_adapter("second", second.alpha(2));
  randomize(layer);
  randomize(layer, "second");
  layer->set_adapters({"default", "second"});
  const auto original = base->weight.detach().clone();
  const auto x = torch::randn({2, 3, 6, 6});
  const auto unmerged = layer(x).detach();
  layer->merge({}, /*safe_merge=*/true);
  EXPECT_LT(max_abs_diff(base(x), unmerged), 1e-5);
  EXPECT_LT(max_abs_diff(layer(x), unmerged), 1e-5);
  layer->unmerge();
  EXPECT_LT(max_abs_diff(base->weight, original), 1e-6);
  EXPECT_LT(max_abs_diff(layer(x), unmerged), 1e-5);
  // merge_and_unload leaves a plain convolution computing the adapted output.
  layer->merge_and_unload();
  EXPECT_LT(max_abs_diff(base(x), unmerged), 1e-5);
  EXPECT_TRUE(layer->adapter_names().empty());
}

TEST_F(LayerKindsTest, Conv2dDoraMatchesPeftsFormula) {
  torch::nn::Conv2d base(torch::nn::Conv2dOptions(3, 4, 3).padding(1));
  lora::LoRAConv2d layer(base, LoRAOptions(2).alpha(3).use_dora(true));
  randomize(layer);
  {
    torch::NoGradGuard no_grad;
    layer->lora_magnitude_vector("default").mul_(torch::rand({1, 4, 1, 1}) + 0.5);
  }
  // PEFT: magnitude [1, out, 1, 1] = ‖W + s·ΔW‖ over all but the output channel;
  // y = base(x) + (m/‖·‖ − 1)·conv(x, W) + m/‖·‖ · s · conv_B(conv_A(x)).
  EXPECT_EQ(layer->lora_magnitude_vector("default").sizes(), (std::vector<int64_t>{1, 4, 1, 1}));
  const double s = 1.5;
  const auto& A = layer->lora_A("default");
  const auto& B = layer->lora_B("default");
  const auto W = base->weight.to(torch::kDouble) + peft_conv2d_delta(A, B, s);
  const auto norm = W.pow(2).sum({1, 2, 3}).sqrt().view({1, 4, 1, 1});
  const auto scale = layer->lora_magnitude_vector("default").to(torch::kDouble) / norm;
  const auto x = torch::randn({2, 3, 5, 5}).to(torch::kDouble);
  const auto plain = torch::conv2d(x, base->weight.to(torch::kDouble), {}, 1, 1);
  const auto lora_path = torch::conv2d(torch::conv2d(x, A.to(torch::kDouble), {}, 1, 1), B.to(torch::kDouble));
  const auto expected = plain + base->bias.to(torch::kDouble).view({1, 4, 1, 1}) + (scale - 1) * plain + scale * s * lora_path;
  EXPECT_LT(max_abs_diff(layer(x.to(torch::kFloat)), expected), 1e-5);
  const auto unmerged = layer(x.to(torch::kFloat)).detach();
  const auto original = base->weight.detach().clone();
  layer->merge();
  EXPECT_LT(max_abs_diff(base(x.to(torch::kFloat)), unmerged), 1e-5);
  layer->unmerge();
  EXPECT_LT(max_abs_diff(base->weight, original), 1e-5);
  // The re-parametrised weight computes the same output.
  EXPECT_LT(max_abs_diff(torch::conv2d(x.to(torch::kFloat), layer->adapted_weight(), base->bias, 1, 1), unmerged), 1e-5);
}

TEST_F(LayerKindsTest, Conv2dDropoutOnlyTouchesTheAdapterInput) {
  torch::nn::Conv2d base(torch::nn::Conv2dOptions(2, 3, 3).padding(1));
  lora::LoRAConv2d layer(base, LoRAOptions(2).alpha(2).dropout(0.5));
  randomize(layer);
  const auto x = torch::randn({1, 2, 5, 5});
  layer->eval();
  const auto evaluated = layer(x);
  layer->train();
  torch::manual_seed(7);
  const auto trained = layer(x);
  torch::manual_seed(7);
  const auto mask_input = lora::dropout(x, 0.5, true);  // the layer's draws: the same seed, the same mask
  const auto expected = reference_conv2d(x, base->weight, base->bias, layer->lora_A("default"), layer->lora_B("default"), 1.0, 1, 1)
                        - torch::conv2d(torch::conv2d(x, layer->lora_A("default"), {}, 1, 1), layer->lora_B("default")).to(torch::kDouble)
                        + torch::conv2d(torch::conv2d(mask_input, layer->lora_A("default"), {}, 1, 1), layer->lora_B("default")).to(torch::kDouble);
  EXPECT_LT(max_abs_diff(trained, expected), 1e-5);
  EXPECT_GT(max_abs_diff(trained, evaluated), 1e-3);
}

TEST_F(LayerKindsTest, Conv1dMatchesIndependentComputationAndMerges) {
  torch::nn::Conv1d base(torch::nn::Conv1dOptions(3, 4, 5).stride(2).padding(2).dilation(1));
  lora::LoRAConv1d layer(base, LoRAOptions(2).alpha(3));
  const auto x0 = torch::randn({2, 3, 11});
  EXPECT_TRUE(torch::equal(layer(x0), base(x0)));  // zero B: the base layer's output, bit for bit
  randomize(layer);
  EXPECT_EQ(layer->lora_A("default").sizes(), (std::vector<int64_t>{2, 3, 5}));
  EXPECT_EQ(layer->lora_B("default").sizes(), (std::vector<int64_t>{4, 2, 1}));
  const auto x = torch::randn({2, 3, 11});
  const auto xd = x.to(torch::kDouble);
  const auto& A = layer->lora_A("default");
  const auto& B = layer->lora_B("default");
  const auto expected = torch::conv1d(xd, base->weight.to(torch::kDouble), base->bias.to(torch::kDouble), 2, 2) +
                        1.5 * torch::conv1d(torch::conv1d(xd, A.to(torch::kDouble), {}, 2, 2), B.to(torch::kDouble));
  EXPECT_LT(max_abs_diff(layer(x), expected), 1e-5);
  // PEFT's general formula for Conv1d: conv1d(Aᵀ, B)ᵀ · s.
  const auto delta = torch::conv1d(A.to(torch::kDouble).transpose(0, 1), B.to(torch::kDouble)).transpose(0, 1) * 1.5;
  EXPECT_LT(max_abs_diff(layer->delta_weight("default"), delta), 1e-6);
  const auto original = base->weight.detach().clone();
  layer->merge();
  EXPECT_LT(max_abs_diff(base(x), expected), 1e-5);
  layer->unmerge();
  EXPECT_LT(max_abs_diff(base->weight, original), 1e-6);
}

TEST_F(LayerKindsTest, Conv1dGradientsMatchFiniteDifferences) {
  torch::nn::Conv1d base(torch::nn::Conv1dOptions(2, 3, 3).padding(1));
  base->to(torch::kDouble);
  lora::LoRAConv1d layer(base, LoRAOptions(2).alpha(5));
  randomize(layer);
  const auto x = torch::randn({2, 2, 5}, torch::kDouble);
  const auto weights = torch::randn({2, 3, 5}, torch::kDouble);
  auto loss = [&] { return (layer(x) * weights).sum(); };
  expect_gradients_match(loss, layer->lora_A("default"));
  expect_gradients_match(loss, layer->lora_B("default"));
}

TEST_F(LayerKindsTest, Conv1dDoraGradientsMatchFiniteDifferences) {
  torch::nn::Conv1d base(torch::nn::Conv1dOptions(2, 3, 3));
  base->to(torch::kDouble);
  lora::LoRAConv1d layer(base, LoRAOptions(2).alpha(3).use_dora(true));
  randomize(layer);
  EXPECT_EQ(layer->lora_magnitude_vector("default").sizes(), (std::vector<int64_t>{1, 3, 1}));
  const auto x = torch::randn({2, 2, 6}, torch::kDouble);
  const auto weights = torch::randn({2, 3, 4}, torch::kDouble);
  // DoRA holds the norm constant in backward (the paper's §4.3), so finite differences are
  // taken with the norm frozen at its current value: exact for the magnitude, and for B with
  // the norm recomputed we compare against the adapted weight's own graph instead.
  auto loss = [&] { return (layer(x) * weights).sum(); };
  expect_gradients_match(loss, layer->lora_magnitude_vector("default"));
  auto reparametrised = [&] {
    return (torch::conv1d(x, layer->adapted_weight(), base->bias) * weights).sum();
  };
  layer->lora_B("default").mutable_grad().zero_();
  loss().backward();
  const auto from_forward = layer->lora_B("default").grad().clone();
  layer->lora_B("default").mutable_grad().zero_();
  reparametrised().backward();
  EXPECT_LT(max_abs_diff(from_forward, layer->lora_B("default").grad()), 1e-9);
}

TEST_F(LayerKindsTest, ConvRefusesWhatItCannotAdapt) {
  LORA_EXPECT_THROWS_WITH(lora::LoRAConv2d(torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3).groups(2))),
                          "LoRAConv2d: the base convolution has groups=2; adapters need groups=1");
  LORA_EXPECT_THROWS_WITH(
      lora::LoRAConv2d(torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3).padding(1).padding_mode(torch::kReflect))),
      "LoRAConv2d: the base convolution pads with mode 'kReflect'; adapters support zero padding only");
  lora::LoRAConv2d layer(torch::nn::Conv2dOptions(3, 4, 3), LoRAOptions(2));
  LORA_EXPECT_THROWS_WITH(layer(torch::randn({1, 5, 6, 6})), "LoRAConv2d: expected an input [N, 3, ...]");
  LORA_EXPECT_THROWS_WITH(layer(torch::randn({6, 6})), "got [6, 6]");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("o", LoRAOptions(2).init("olora")),
                          "LoRAConv2d: init 'olora' is defined for Linear layers only");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("default", LoRAOptions(2)), "LoRAConv2d: adapter 'default' already exists");
}

TEST_F(LayerKindsTest, ConvCloneKeepsAdaptersMergesAndTrainability) {
  torch::nn::Conv2d base(torch::nn::Conv2dOptions(2, 3, 3));
  lora::LoRAConv2d layer(base, LoRAOptions(2).alpha(4).use_dora(true));
  randomize(layer);
  layer->merge();
  auto copy = std::dynamic_pointer_cast<lora::LoRAConv2dImpl>(layer->clone());
  ASSERT_NE(copy, nullptr);
  EXPECT_EQ(copy->merged_adapters(), std::vector<std::string>{"default"});
  EXPECT_TRUE(copy->lora_A("default").requires_grad());
  EXPECT_NE(copy->base_weight().data_ptr(), layer->base_weight().data_ptr());
  copy->unmerge();
  layer->unmerge();
  EXPECT_LT(max_abs_diff(copy->base_weight(), layer->base_weight()), 1e-7);
}

// ---- in a model: inject, all-linear, save and load ----

namespace {

struct VisionNetImpl : torch::nn::Module {
  VisionNetImpl() {
    tokens = register_module("tokens", lora::LoRAEmbedding(torch::nn::EmbeddingOptions(10, 4)));
    conv = register_module("conv", lora::LoRAConv2d(torch::nn::Conv2dOptions(4, 6, 3).padding(1)));
    proj = register_module("proj", lora::LoRALinear<>(torch::nn::LinearOptions(6, 5)));
    head = register_module("head", lora::LoRALinear<>(torch::nn::LinearOptions(5, 2)));
  }
  /// ids [N, 16] → a 4×4 "image" of embeddings → conv → pooled → proj → head.
  torch::Tensor forward(const torch::Tensor& ids) {
    auto image = tokens(ids).view({ids.size(0), 4, 4, 4}).permute({0, 3, 1, 2});
    auto features = torch::relu(conv(image)).mean({2, 3});
    return head(torch::relu(proj(features)));
  }
  lora::LoRAEmbedding tokens{nullptr};
  lora::LoRAConv2d conv{nullptr};
  lora::LoRALinear<> proj{nullptr}, head{nullptr};
};
TORCH_MODULE(VisionNet);

}  // namespace

TEST_F(LayerKindsTest, AllLinearSelectsOnlyLinearLayers) {
  VisionNet net;
  const auto report = lora::inject(*net, lora::LoraConfig(LoRAOptions(2)).target_modules({"all-linear"}));
  EXPECT_TRUE(net->tokens->adapter_names().empty());
  EXPECT_TRUE(net->conv->adapter_names().empty());
  EXPECT_EQ(net->proj->adapter_names(), std::vector<std::string>{"default"});
  EXPECT_TRUE(net->head->adapter_names().empty());  // the output head, as in PEFT
}

namespace {
class LayerKindsFileTest : public lora::testing::TempDirTest {};
}  // namespace

TEST_F(LayerKindsFileTest, SavedEmbeddingAndConvAdaptersHavePeftsKeysAndShapesAndLoadBack) {
  VisionNet net;
  const auto config = lora::LoraConfig(LoRAOptions(3).alpha(6)).target_modules({"tokens", "conv", "proj"});
  lora::inject(*net, config);
  for (const auto& [path, layer] : lora::lora_layers(*net)) {
    if (path == "head") continue;  // not targeted
    torch::NoGradGuard no_grad;
    for (auto& parameter : layer->adapter_state("default")) parameter.second.copy_(torch::randn_like(parameter.second));
  }
  const auto ids = torch::randint(10, {3, 16});
  net->eval();
  const auto expected = net->forward(ids).detach();
  lora::io::save_adapter(*net, config, path("adapter"), "default");

  const auto saved = lora::io::load_safetensors(path("adapter") + "/adapter_model.safetensors").tensors;
  // Exactly PEFT's keys (get_peft_model_state_dict): bare parameters for the embedding, the
  // conv modules' weights, nothing else.
  std::map<std::string, std::vector<int64_t>> keys;
  for (const auto& item : saved) keys[item.key()] = item.value().sizes().vec();
  const std::map<std::string, std::vector<int64_t>> peft_keys{
      {"base_model.model.tokens.lora_embedding_A", {3, 10}},
      {"base_model.model.tokens.lora_embedding_B", {4, 3}},
      {"base_model.model.conv.lora_A.weight", {3, 4, 3, 3}},
      {"base_model.model.conv.lora_B.weight", {6, 3, 1, 1}},
      {"base_model.model.proj.lora_A.weight", {3, 6}},
      {"base_model.model.proj.lora_B.weight", {5, 3}},
  };
  EXPECT_EQ(keys, peft_keys);

  torch::manual_seed(1);
  VisionNet fresh;
  torch::NoGradGuard no_grad;
  for (const auto& item : net->named_parameters()) {
    if (item.key().find("base_layer") != std::string::npos) fresh->named_parameters()[item.key()].copy_(item.value());
  }
  const auto loaded = lora::io::load_adapter(*fresh, path("adapter"));
  EXPECT_EQ(loaded.report.adapted_modules(), (std::vector<std::string>{"tokens", "conv", "proj"}));
  EXPECT_TRUE(torch::equal(fresh->forward(ids), expected));
  // A rank that disagrees with the config is named, for the conv's 4-D factor too.
  // (saving refuses a config that disagrees with the adapter, so the file's config is edited)
  lora::io::save_adapter(*net, config, path("wrong"), "default");
  auto json = lora::io::read_json_file(path("wrong") + "/adapter_config.json");
  json["r"] = 2;
  std::ofstream(path("wrong") + "/adapter_config.json") << json.dump(2);
  VisionNet other;
  LORA_EXPECT_THROWS_WITH(lora::io::load_adapter(*other, path("wrong")),
                          "has shape [3, 4, 3, 3], rank 3, but adapter_config.json gives module 'conv' r=2");
}

TEST_F(LayerKindsFileTest, ConvDoraMagnitudeIsSavedInPeftsShape) {
  VisionNet net;
  const auto config = lora::LoraConfig(LoRAOptions(2).use_dora(true)).target_modules({"conv"});
  lora::inject(*net, config);
  lora::io::save_adapter(*net, config, path("dora"), "default");
  const auto saved = lora::io::load_safetensors(path("dora") + "/adapter_model.safetensors").tensors;
  ASSERT_NE(saved.find("base_model.model.conv.lora_magnitude_vector"), nullptr);
  EXPECT_EQ(saved["base_model.model.conv.lora_magnitude_vector"].sizes(), (std::vector<int64_t>{1, 6, 1, 1}));
  EXPECT_EQ(saved.size(), 3u);
}
