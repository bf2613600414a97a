#include <cmath>

#include <lora/init.hpp>
#include <lora/linear.hpp>

#include "test_helpers.hpp"

using lora::LoRAOptions;
using lora::testing::max_abs_diff;

namespace {

class InitTest : public lora::testing::SeededTest {};

torch::Tensor low_rank_plus_noise(int64_t out, int64_t in, int64_t rank) {
  auto w = torch::randn({out, rank}).mm(torch::randn({rank, in}));
  return w + 0.01 * torch::randn({out, in});
}

}  // namespace

TEST_F(InitTest, DefaultDrawsKaimingUniformAInPeftOrder) {
  // PEFT builds lora_A = Linear(in, r) and lora_B = Linear(r, out) (each drawing its default
  // Kaiming-uniform weight), then redraws A with Kaiming-uniform (a = √5) and zeroes B.
  const int64_t in = 12, out = 6, r = 3;
  torch::manual_seed(7);
  torch::nn::Linear base(in, out);
  lora::LoRALinear<> layer(base, LoRAOptions(r).alpha(5));

  torch::manual_seed(7);
  torch::nn::Linear reference_base(in, out);  // same draws as `base`
  auto kaiming = [](int64_t rows, int64_t cols) {
    auto t = torch::empty({rows, cols});
    torch::nn::init::kaiming_uniform_(t, std::sqrt(5.0));
    return t;
  };
  kaiming(r, in);   // Linear(in, r)
  kaiming(out, r);  // Linear(r, out)
  const auto expected_A = kaiming(r, in);

  EXPECT_TRUE(torch::equal(layer->lora_A("default"), expected_A));
  EXPECT_TRUE(torch::equal(layer->lora_B("default"), torch::zeros({out, r})));
}

TEST_F(InitTest, GaussianDrawsAWithStdOneOverRank) {
  torch::nn::Linear base(4096, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(2).init("gaussian"));
  const auto A = layer->lora_A("default");
  EXPECT_NEAR(A.mean().item<double>(), 0.0, 0.01);
  EXPECT_NEAR(A.std().item<double>(), 0.25, 0.25 * 0.03);  // 16,384 draws: ~0.6 % standard error
  EXPECT_TRUE(torch::equal(layer->lora_B("default"), torch::zeros({8, 4})));
}

TEST_F(InitTest, FalseDrawsBothFactorsSoTheAdapterIsNotANoOp) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(2).init("false"));
  EXPECT_GT(layer->lora_B("default").abs().max().item<double>(), 0.0);
  const auto x = torch::randn({3, 16});
  EXPECT_GT(max_abs_diff(layer(x), base(x)), 1e-4);
}

TEST_F(InitTest, PiSSAFactorsAreTheTopSingularTriplets) {
  const auto w = torch::randn({20, 12});
  const int64_t r = 3;
  const double s = 2.5;
  const auto factors = lora::init::pissa(w, r, s);
  // s·B·A is the best rank-r approximation; the residual holds the rest.
  auto [U, S, Vh] = torch::linalg_svd(w, false);
  const auto best = U.narrow(1, 0, r).mm(torch::diag(S.narrow(0, 0, r))).mm(Vh.narrow(0, 0, r));
  EXPECT_LT(max_abs_diff(s * factors.lora_B.mm(factors.lora_A), best), 1e-5);
  EXPECT_LT(max_abs_diff(factors.residual + s * factors.lora_B.mm(factors.lora_A), w), 1e-5);
  const auto residual_singular = torch::linalg_svdvals(factors.residual);
  EXPECT_NEAR(residual_singular[0].item<double>(), S[r].item<double>(), 1e-4);
  // A and B carry √(S/s) each.
  EXPECT_LT(max_abs_diff(factors.lora_A.norm(2, {1}), (S.narrow(0, 0, r) / s).sqrt()), 1e-5);
}

TEST_F(InitTest, FastPiSSAApproximatesExactOnNearlyLowRankWeights) {
  const auto w = low_rank_plus_noise(64, 48, 4);
  const auto exact = lora::init::pissa(w, 4, 2.0);
  const auto fast = lora::init::pissa(w, 4, 2.0, /*niter=*/4);
  const auto exact_delta = exact.lora_B.mm(exact.lora_A);
  const auto fast_delta = fast.lora_B.mm(fast.lora_A);
  EXPECT_LT(max_abs_diff(fast_delta, exact_delta) / exact_delta.abs().max().item<double>(), 1e-3);
  EXPECT_LT(max_abs_diff(fast.residual + 2.0 * fast_delta, w), 1e-4);
}

TEST_F(InitTest, OLoRAFactorsComeFromQR) {
  const auto w = torch::randn({10, 14});
  const auto factors = lora::init::olora(w, 4, 0.5);
  EXPECT_LT(max_abs_diff(factors.lora_B.t().mm(factors.lora_B), torch::eye(4)), 1e-5);  // orthonormal columns
  EXPECT_LT(max_abs_diff(torch::triu(factors.lora_A), factors.lora_A), 1e-7);           // rows of R
  EXPECT_LT(max_abs_diff(factors.residual + 0.5 * factors.lora_B.mm(factors.lora_A), w), 1e-5);
}

TEST_F(InitTest, DataDrivenInitsKeepTheLayerOutputAndRewriteTheBaseWeight) {
  for (const std::string init : {"pissa", "pissa_niter_2", "olora"}) {
    torch::nn::Linear base(24, 16);
    const auto original = base->weight.detach().clone();
    const auto x = torch::randn({5, 24});
    const auto expected = base(x).detach();
    lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8).init(init));
    EXPECT_GT(max_abs_diff(base->weight, original), 1e-3) << init << ": W was not replaced by its residual";
    EXPECT_LT(max_abs_diff(layer(x), expected), 1e-5) << init;
    EXPECT_LT(max_abs_diff(base->weight + layer->delta_weight("default"), original), 1e-5) << init;
  }
}

TEST_F(InitTest, DataDrivenInitsRejectRanksAboveTheWeightRank) {
  LORA_EXPECT_THROWS_WITH(lora::init::pissa(torch::randn({4, 6}), 5, 1.0), "rank 5 must be in [1, min(out, in) = 4]");
  LORA_EXPECT_THROWS_WITH(lora::init::olora(torch::randn({4, 6}), 0, 1.0), "rank 0 must be in [1, min(out, in) = 4]");
  LORA_EXPECT_THROWS_WITH(lora::init::pissa(torch::randn({4}), 1, 1.0), "expected a 2-D weight (got shape [4])");
  LORA_EXPECT_THROWS_WITH(lora::init::olora(torch::ones({4, 6}, torch::kLong), 2, 1.0),
                          "the base weight must be floating point (got Long)");
  torch::nn::Linear base(6, 4);
  LORA_EXPECT_THROWS_WITH(lora::LoRALinear<>(base, LoRAOptions(5).alpha(2).init("pissa")),
                          "rank 5 exceeds min(in_features, out_features) = 4, which init 'pissa' cannot decompose");
  // Plain LoRA may use any rank, as PEFT allows.
  EXPECT_NO_THROW(lora::LoRALinear<>(base, LoRAOptions(5).alpha(2)));
}

TEST_F(InitTest, SeededInitIsReproducible) {
  auto make = [] {
    torch::manual_seed(123);
    return lora::LoRALinear<>(torch::nn::LinearOptions(8, 8), LoRAOptions(2).alpha(4).init("gaussian"));
  };
  const auto a = make();
  const auto b = make();
  EXPECT_TRUE(torch::equal(a->lora_A("default"), b->lora_A("default")));
  EXPECT_TRUE(torch::equal(a->base_weight(), b->base_weight()));
}
