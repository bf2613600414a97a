// rsLoRA, DoRA, dtypes and devices, a custom base layer type, errors and printing.
#include <sstream>

#include <lora/linear.hpp>

#include "test_helpers.hpp"

using lora::LoRAOptions;
using lora::testing::max_abs_diff;

namespace {

class LoRAVariantsTest : public lora::testing::SeededTest {};

template <typename Layer>
void randomize(Layer& layer, const std::string& name = "default") {
  torch::NoGradGuard no_grad;
  layer->lora_B(name).copy_(torch::randn_like(layer->lora_B(name)));
  layer->lora_A(name).copy_(torch::randn_like(layer->lora_A(name)));
}

/// DoRA written out: (m / ‖W + s·B·A‖) ⊙ (x (W + s·B·A)ᵀ) + b, the norm held constant.
torch::Tensor reference_dora(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b,
                             const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& m, double s) {
  const auto adapted = W + s * B.matmul(A);
  const auto norm = adapted.detach().pow(2).sum(1).sqrt();
  return (m / norm) * x.matmul(adapted.t()) + b;
}

}  // namespace

TEST_F(LoRAVariantsTest, RsLoRAScalesByAlphaOverRootRank) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(6).use_rslora(true));  // s = 6 / 2 = 3
  randomize(layer);
  EXPECT_DOUBLE_EQ(layer->adapter_options("default").scaling(), 3.0);
  const auto x = torch::randn({5, 16});
  const auto& A = layer->lora_A("default");
  const auto& B = layer->lora_B("default");
  const auto expected = x.matmul(base->weight.t()) + base->bias + 3.0 * x.matmul(A.t()).matmul(B.t());
  EXPECT_LT(max_abs_diff(layer(x), expected), 1e-4);
  EXPECT_LT(max_abs_diff(layer->delta_weight("default"), 3.0 * B.mm(A)), 1e-5);
}

TEST_F(LoRAVariantsTest, DoRAStartsAsTheBaseLayerWithRowNormMagnitudes) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(6).use_dora(true));
  EXPECT_LT(max_abs_diff(layer->lora_magnitude_vector("default"), base->weight.norm(2, {1})), 1e-6);
  EXPECT_TRUE(layer->lora_magnitude_vector("default").requires_grad());
  const auto x = torch::randn({3, 16});
  EXPECT_TRUE(torch::equal(layer(x), base(x)));
}

TEST_F(LoRAVariantsTest, DoRAMatchesIndependentComputationAndGradients) {
  torch::nn::Linear base(12, 6);
  base->to(torch::kDouble);
  lora::LoRALinear<> layer(base, LoRAOptions(3).alpha(5).use_dora(true));
  randomize(layer);
  {
    torch::NoGradGuard no_grad;
    layer->lora_magnitude_vector("default").copy_(torch::rand({6}, torch::kDouble) + 0.5);
  }
  const double s = 5.0 / 3.0;
  const auto x = torch::randn({4, 12}, torch::kDouble);
  const auto weights = torch::randn({4, 6}, torch::kDouble);

  // Reference on detached copies, with its own autograd graph.
  auto A = layer->lora_A("default").detach().clone().requires_grad_(true);
  auto B = layer->lora_B("default").detach().clone().requires_grad_(true);
  auto m = layer->lora_magnitude_vector("default").detach().clone().requires_grad_(true);
  const auto expected = reference_dora(x, base->weight, base->bias, A, B, m, s);
  (expected * weights).sum().backward();

  const auto y = layer(x);
  (y * weights).sum().backward();
  EXPECT_LT(max_abs_diff(y, expected), 1e-12);
  EXPECT_LT(max_abs_diff(layer->lora_A("default").grad(), A.grad()), 1e-12);
  EXPECT_LT(max_abs_diff(layer->lora_B("default").grad(), B.grad()), 1e-12);
  EXPECT_LT(max_abs_diff(layer->lora_magnitude_vector("default").grad(), m.grad()), 1e-12);
  EXPECT_FALSE(base->weight.grad().defined());
}

TEST_F(LoRAVariantsTest, DoRAWithDropoutMatchesPeftFormula) {
  torch::nn::Linear base(12, 6);
  lora::LoRALinear<> layer(base, LoRAOptions(3).alpha(5).use_dora(true).dropout(0.3));
  randomize(layer);
  const auto x = torch::randn({4, 12});
  layer->train();
  torch::manual_seed(11);
  const auto y = layer(x);
  torch::manual_seed(11);
  const auto xd = lora::dropout(x, 0.3, true);  // the layer's draws: the same seed, the same mask
  const auto& A = layer->lora_A("default");
  const auto& B = layer->lora_B("default");
  const auto& m = layer->lora_magnitude_vector("default");
  const double s = 5.0 / 3.0;
  const auto scale = m / (base->weight + s * B.mm(A)).norm(2, {1});
  // PEFT: base(x) + (m/‖·‖ − 1) ⊙ (dropout(x) Wᵀ) + m/‖·‖ ⊙ s·B·A·dropout(x)
  const auto expected = base(x) + (scale - 1) * xd.matmul(base->weight.t()) + scale * s * xd.matmul(A.t()).matmul(B.t());
  EXPECT_LT(max_abs_diff(y, expected), 1e-5);
}

TEST_F(LoRAVariantsTest, DoRAMergeAndUnmerge) {
  torch::nn::Linear base(16, 8);
  const auto W0 = base->weight.detach().clone();
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(6).use_dora(true));
  randomize(layer);
  {
    torch::NoGradGuard no_grad;
    layer->lora_magnitude_vector("default").mul_(torch::rand({8}) + 0.5);
  }
  const auto x = torch::randn({5, 16});
  const auto unmerged = layer(x).detach();
  layer->merge({}, /*safe_merge=*/true);
  const auto adapted = W0 + 1.5 * layer->lora_B("default").mm(layer->lora_A("default"));
  const auto expected_W = (layer->lora_magnitude_vector("default") / adapted.norm(2, {1})).unsqueeze(1) * adapted;
  EXPECT_LT(max_abs_diff(base->weight, expected_W), 1e-5);
  EXPECT_LT(max_abs_diff(layer(x), unmerged), 1e-5);
  layer->unmerge();
  EXPECT_LT(max_abs_diff(base->weight, W0), 1e-5);
  EXPECT_LT(max_abs_diff(layer(x), unmerged), 1e-5);
}

TEST_F(LoRAVariantsTest, MergeStateFollowsTheLayerToAnotherDtypeAndDevice) {
  std::vector<torch::Device> devices{torch::kCPU};
  if (torch::cuda::is_available()) devices.emplace_back(torch::kCUDA);
  for (const auto& device : devices) {
    torch::nn::Linear base(16, 8);
    const auto W0 = base->weight.detach().to(torch::kDouble).clone();
    lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(6).use_dora(true));
    layer->add_adapter("plain", LoRAOptions(2).alpha(3));
    layer->set_adapters({"default", "plain"});
    randomize(layer);
    {
      torch::NoGradGuard no_grad;
      layer->lora_B("plain").normal_();
      layer->lora_magnitude_vector("default").mul_(torch::rand({8}) + 0.5);
    }
    const auto x = torch::randn({5, 16}, torch::kDouble);
    layer->merge();
    // Moved while merged: the DoRA norm stored at merge time must follow (or be moved at use).
    layer->to(device, torch::kDouble);
    const auto merged = layer(x.to(device)).detach();
    layer->unmerge();
    EXPECT_EQ(layer->base_weight().device(), device);
    // The merge ran in float32, the unmerge in float64: float32 rounding remains.
    EXPECT_LT(max_abs_diff(layer->base_weight().cpu(), W0), 1e-5) << device;
    EXPECT_LT(max_abs_diff(layer(x.to(device)).cpu(), merged.cpu()), 1e-5) << device;
  }
}

TEST_F(LoRAVariantsTest, DoRAMagnitudeGradientMatchesFiniteDifferences) {
  torch::nn::Linear base(5, 4);
  base->to(torch::kDouble);
  lora::LoRALinear<> layer(base, LoRAOptions(2).alpha(3).use_dora(true));
  randomize(layer);
  const auto x = torch::randn({6, 5}, torch::kDouble);
  auto loss = [&] { return layer(x).pow(2).sum(); };
  lora::testing::expect_gradient_matches_finite_differences(loss, layer->lora_magnitude_vector("default"), 1e-6);
}

TEST_F(LoRAVariantsTest, AdapterFollowsTheBaseDtype) {
  torch::nn::Linear base(8, 4);
  base->to(torch::kDouble);
  lora::LoRALinear<> layer(base, LoRAOptions(2).alpha(3));
  EXPECT_EQ(layer->lora_A("default").scalar_type(), torch::kDouble);
  EXPECT_EQ(layer(torch::randn({2, 8}, torch::kDouble)).scalar_type(), torch::kDouble);
}

TEST_F(LoRAVariantsTest, Float32AdapterOverABFloat16Base) {
  torch::nn::Linear base(32, 16);
  const auto W = base->weight.detach().clone();
  const auto b = base->bias.detach().clone();
  base->to(torch::kBFloat16);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8).adapter_dtype(torch::kFloat32));
  randomize(layer);
  EXPECT_EQ(layer->lora_A("default").scalar_type(), torch::kFloat32);
  EXPECT_EQ(layer->base_weight().scalar_type(), torch::kBFloat16);
  const auto x = torch::randn({4, 32});
  const auto y = layer(x.to(torch::kBFloat16));
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  const auto expected = x.matmul(W.t()) + b + 2.0 * x.matmul(layer->lora_A("default").t()).matmul(layer->lora_B("default").t());
  // bfloat16 keeps 8 bits of mantissa: compare relative to the output's scale.
  EXPECT_LT(max_abs_diff(y, expected) / expected.abs().max().item<double>(), 3e-2);

  y.to(torch::kFloat).sum().backward();
  EXPECT_EQ(layer->lora_B("default").grad().scalar_type(), torch::kFloat32);
  layer->merge();
  EXPECT_EQ(layer->base_weight().scalar_type(), torch::kBFloat16);
}

TEST_F(LoRAVariantsTest, RunsOnEveryAvailableDevice) {
  std::vector<torch::Device> devices{torch::kCPU};
  if (torch::cuda::is_available()) devices.emplace_back(torch::kCUDA);
  for (const auto& device : devices) {
    torch::nn::Linear base(16, 8);
    base->to(device);
    lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8).use_dora(true));
    EXPECT_EQ(layer->lora_A("default").device(), device);
    EXPECT_EQ(layer->lora_magnitude_vector("default").device(), device);
    const auto x = torch::randn({3, 16}, torch::TensorOptions().device(device));
    const auto y = layer(x);
    y.sum().backward();
    layer->merge({}, true);
    EXPECT_LT(max_abs_diff(layer(x).cpu(), y.detach().cpu()), 1e-5);
  }
}

TEST_F(LoRAVariantsTest, LossFallsWhenTrainingOnALowRankTarget) {
  // Teacher: the frozen weight plus a rank-2 change. The adapter must learn the change.
  torch::nn::Linear base(32, 16);
  const auto target_delta = 0.3 * torch::randn({16, 2}).mm(torch::randn({2, 32}));
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8));
  torch::optim::Adam optimizer(layer->parameters(), torch::optim::AdamOptions(1e-2));
  auto loss_on = [&](const torch::Tensor& x) {
    const auto target = base(x) + x.matmul(target_delta.t());
    return torch::mse_loss(layer(x), target.detach());
  };
  const auto probe = torch::randn({256, 32});
  const double initial = loss_on(probe).item<double>();
  for (int step = 0; step < 300; ++step) {
    optimizer.zero_grad();
    loss_on(torch::randn({64, 32})).backward();
    optimizer.step();
  }
  const double final_loss = loss_on(probe).item<double>();
  EXPECT_LT(final_loss, 0.01 * initial) << "initial " << initial << ", final " << final_loss;
  EXPECT_LT(max_abs_diff(layer->delta_weight("default"), target_delta), 0.05);
}

TEST_F(LoRAVariantsTest, ErrorsNameTheOffendingValue) {
  torch::nn::Linear base(16, 8);
  lora::LoRALinear<> layer(base, LoRAOptions(4).alpha(8));
  LORA_EXPECT_THROWS_WITH(layer(torch::randn({3, 7})),
                          "expected an input with 16 features in its last dimension (got input of shape [3, 7])");
  LORA_EXPECT_THROWS_WITH(layer(torch::randn({})), "expected an input with 16 features in its last dimension (got input of shape [])");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("default", LoRAOptions(2)), "adapter 'default' already exists");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("a.b", LoRAOptions(2)), "contain no '.' (got 'a.b')");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("", LoRAOptions(2)), "adapter name must be non-empty");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("x", LoRAOptions(0)), "rank r must be > 0 (got 0)");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("x", LoRAOptions(2).alpha(-1)), "alpha must be finite and > 0 (got -1)");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("x", LoRAOptions(2).dropout(1.5)), "dropout must be in [0, 1) (got 1.5)");
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("x", LoRAOptions(2).init("xavier")), "unknown init 'xavier'");
  LORA_EXPECT_THROWS_WITH(layer->set_adapter("missing"), "cannot activate unknown adapter 'missing' (adapters: default)");
  LORA_EXPECT_THROWS_WITH(layer->set_adapters({"default", "default"}), "adapter 'default' is listed more than once");
  LORA_EXPECT_THROWS_WITH(layer->merge({"nope"}), "cannot merge unknown adapter 'nope'");
  LORA_EXPECT_THROWS_WITH(layer->lora_A("nope"), "cannot read unknown adapter 'nope'");
  LORA_EXPECT_THROWS_WITH(layer->lora_magnitude_vector("default"),
                          "adapter 'default' has no lora_magnitude_vector (it is not a DoRA adapter)");
  LORA_EXPECT_THROWS_WITH(lora::LoRALinear<>(torch::nn::Linear(nullptr)), "the base layer is empty (nullptr)");
  layer->merge();
  LORA_EXPECT_THROWS_WITH(layer->add_adapter("late", LoRAOptions(2)),
                          "cannot add adapter 'late' while merged (merged: default); call unmerge() first");
  // A failed add leaves nothing behind.
  EXPECT_EQ(layer->adapter_names(), std::vector<std::string>{"default"});
  EXPECT_EQ(layer->named_parameters().size(), 4u);
}

TEST_F(LoRAVariantsTest, PrettyPrint) {
  lora::LoRALinear<> layer(torch::nn::LinearOptions(16, 8), LoRAOptions(4).alpha(8));
  layer->add_adapter("other", LoRAOptions(2).alpha(3.5).dropout(0.1).use_rslora(true).use_dora(true).init("gaussian"));
  std::ostringstream out;
  layer->pretty_print(out);
  EXPECT_EQ(out.str(),
            "lora::LoRALinear<Linear>(in_features=16, out_features=8, bias=true, adapters=[default(r=4, alpha=8), "
            "other(r=2, alpha=3.5, dropout=0.1, rslora, dora, init=gaussian)], active=[default])");
  layer->merge();
  layer->set_adapters({"default", "other"});
  layer->enable_adapters(false);
  out.str("");
  layer->pretty_print(out);
  EXPECT_EQ(out.str(),
            "lora::LoRALinear<Linear>(in_features=16, out_features=8, bias=true, adapters=[default(r=4, alpha=8), "
            "other(r=2, alpha=3.5, dropout=0.1, rslora, dora, init=gaussian)], active=[default, other], disabled)");
}

// ---- a custom base layer: weight stored [in, out] (GPT-2's Conv1D), via LinearTraits ------

struct TransposedLinearOptions {
  TransposedLinearOptions(int64_t in, int64_t out) : in_features_(in), out_features_(out) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
};

struct TransposedLinearImpl : torch::nn::Cloneable<TransposedLinearImpl> {
  explicit TransposedLinearImpl(const TransposedLinearOptions& options_) : options(options_) { reset(); }
  void reset() override {
    weight = register_parameter("weight", torch::randn({options.in_features(), options.out_features()}));
    bias = register_parameter("bias", torch::randn({options.out_features()}));
  }
  torch::Tensor forward(const torch::Tensor& x) { return torch::addmm(bias, x, weight); }
  TransposedLinearOptions options;
  torch::Tensor weight, bias;
};
TORCH_MODULE(TransposedLinear);

namespace lora {
template <>
struct LinearTraits<TransposedLinearImpl> {
  using Options = TransposedLinearOptions;
  static constexpr bool fan_in_fan_out = true;
  static constexpr const char* name = "TransposedLinear";
  static const Options& options(const TransposedLinearImpl& layer) { return layer.options; }
  static int64_t in_features(const Options& options) { return options.in_features(); }
  static int64_t out_features(const Options& options) { return options.out_features(); }
  static bool has_bias(const Options&) { return true; }
  static const at::Tensor& weight(const TransposedLinearImpl& layer) { return layer.weight; }
  static const at::Tensor& bias(const TransposedLinearImpl& layer) { return layer.bias; }
  static at::Tensor forward(TransposedLinearImpl& layer, const at::Tensor& x) { return layer.forward(x); }
};
}  // namespace lora

TEST_F(LoRAVariantsTest, CustomBaseLayerWithTransposedWeight) {
  TransposedLinear base(TransposedLinearOptions(12, 6));
  const auto W0 = base->weight.detach().clone();  // [in, out]
  lora::LoRALinear<TransposedLinearImpl> layer(base, LoRAOptions(3).alpha(4));
  randomize(layer);
  const auto x = torch::randn({5, 12});
  const auto& A = layer->lora_A("default");
  const auto& B = layer->lora_B("default");
  EXPECT_EQ(A.sizes(), (std::vector<int64_t>{3, 12}));
  EXPECT_EQ(B.sizes(), (std::vector<int64_t>{6, 3}));
  const double s = 4.0 / 3.0;
  const auto expected = x.mm(W0) + base->bias + s * x.mm(A.t()).mm(B.t());
  EXPECT_LT(max_abs_diff(layer(x), expected), 1e-5);
  EXPECT_EQ(layer->delta_weight("default").sizes(), (std::vector<int64_t>{12, 6}));  // shaped like W
  layer->merge();
  EXPECT_LT(max_abs_diff(base->weight, W0 + s * B.mm(A).t()), 1e-5);
  EXPECT_LT(max_abs_diff(base(x), expected), 1e-5);
  layer->unmerge();
  EXPECT_LT(max_abs_diff(base->weight, W0), 1e-6);
}
