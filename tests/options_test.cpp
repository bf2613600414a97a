#include <lora/options.hpp>

#include "test_helpers.hpp"

using lora::InitKind;
using lora::LoRAOptions;

TEST(LoRAOptionsTest, DefaultsFollowPeft) {
  const LoRAOptions options;
  EXPECT_EQ(options.r(), 8);
  EXPECT_EQ(options.alpha(), 8.0);
  EXPECT_EQ(options.dropout(), 0.0);
  EXPECT_FALSE(options.use_rslora());
  EXPECT_FALSE(options.use_dora());
  EXPECT_EQ(options.init(), "default");
  EXPECT_FALSE(options.adapter_dtype().has_value());
}

TEST(LoRAOptionsTest, SettersChain) {
  const auto options = LoRAOptions(16).alpha(32).dropout(0.1).use_rslora(true).use_dora(true).init("olora");
  EXPECT_EQ(options.r(), 16);
  EXPECT_EQ(options.alpha(), 32.0);
  EXPECT_EQ(options.dropout(), 0.1);
  EXPECT_TRUE(options.use_rslora());
  EXPECT_TRUE(options.use_dora());
  EXPECT_EQ(options.init(), "olora");
}

TEST(LoRAOptionsTest, ScalingIsAlphaOverRankOrOverRootRank) {
  EXPECT_DOUBLE_EQ(LoRAOptions(8).alpha(16).scaling(), 2.0);
  EXPECT_DOUBLE_EQ(LoRAOptions(4).alpha(6).scaling(), 1.5);
  EXPECT_DOUBLE_EQ(LoRAOptions(16).alpha(6).use_rslora(true).scaling(), 1.5);
  EXPECT_DOUBLE_EQ(LoRAOptions(9).alpha(5).use_rslora(true).scaling(), 5.0 / 3.0);
}

TEST(LoRAOptionsTest, ValidateRejectsEachBadValueByName) {
  LORA_EXPECT_THROWS_WITH(LoRAOptions(0).validate(), "rank r must be > 0 (got 0)");
  LORA_EXPECT_THROWS_WITH(LoRAOptions(-3).validate(), "rank r must be > 0 (got -3)");
  LORA_EXPECT_THROWS_WITH(LoRAOptions(4).alpha(0).validate(), "alpha must be finite and > 0 (got 0)");
  LORA_EXPECT_THROWS_WITH(LoRAOptions(4).alpha(-2).validate(), "alpha must be finite and > 0 (got -2)");
  LORA_EXPECT_THROWS_WITH(LoRAOptions(4).alpha(std::nan("")).validate(), "alpha must be finite and > 0 (got nan)");
  LORA_EXPECT_THROWS_WITH(LoRAOptions(4).dropout(1.0).validate(), "dropout must be in [0, 1) (got 1)");
  LORA_EXPECT_THROWS_WITH(LoRAOptions(4).dropout(-0.5).validate(), "dropout must be in [0, 1) (got -0.5)");
  LORA_EXPECT_THROWS_WITH(LoRAOptions(4).init("kaiming").validate(), "unknown init 'kaiming'");
  LORA_EXPECT_THROWS_WITH(LoRAOptions(4).adapter_dtype(torch::kInt).validate(),
                          "adapter_dtype must be a floating type (got Int)");
  EXPECT_NO_THROW(LoRAOptions(4).alpha(1e-3).dropout(0.999).init("pissa_niter_16").validate());
}

TEST(LoRAOptionsTest, ParseInitAcceptsPeftSpellings) {
  EXPECT_EQ(lora::parse_init("default").kind, InitKind::kDefault);
  EXPECT_EQ(lora::parse_init("true").kind, InitKind::kDefault);
  EXPECT_EQ(lora::parse_init("false").kind, InitKind::kRandom);
  EXPECT_EQ(lora::parse_init("gaussian").kind, InitKind::kGaussian);
  EXPECT_EQ(lora::parse_init("olora").kind, InitKind::kOLoRA);
  const auto exact = lora::parse_init("pissa");
  EXPECT_EQ(exact.kind, InitKind::kPiSSA);
  EXPECT_EQ(exact.niter, -1);
  const auto fast = lora::parse_init("pissa_niter_4");
  EXPECT_EQ(fast.kind, InitKind::kPiSSA);
  EXPECT_EQ(fast.niter, 4);
  for (const std::string spelling : {"default", "false", "gaussian", "pissa", "pissa_niter_0", "olora"}) {
    EXPECT_EQ(lora::to_string(lora::parse_init(spelling)), spelling);
  }
}

TEST(LoRAOptionsTest, ParseInitRejectsMalformedSpellings) {
  LORA_EXPECT_THROWS_WITH(lora::parse_init("pissa_niter_"), "init 'pissa_niter_' needs a non-negative iteration");
  LORA_EXPECT_THROWS_WITH(lora::parse_init("pissa_niter_x2"), "init 'pissa_niter_x2'");
  LORA_EXPECT_THROWS_WITH(lora::parse_init("pissa_niter_-1"), "init 'pissa_niter_-1'");
  LORA_EXPECT_THROWS_WITH(lora::parse_init("loftq"), "init 'loftq' is not supported");
  LORA_EXPECT_THROWS_WITH(lora::parse_init("Gaussian"),
                          "unknown init 'Gaussian' (expected one of: default, true, false, gaussian, pissa, "
                          "pissa_niter_<k>, olora)");
}
