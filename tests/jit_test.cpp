#include <cmath>
#include <map>

#include <lora/jit.hpp>

#include "test_helpers.hpp"
#include "tiny_bert.hpp"

using lora::JitAdapters;
using lora::LoraConfig;
using lora::LoRAOptions;
using lora::testing::max_abs_diff;
using lora::testing::TinyBert;

namespace {

class JitTest : public lora::testing::SeededTest {};

using lora::testing::query_value_config;

torch::Tensor run(torch::jit::Module& module, const torch::Tensor& x) { return module.forward({x}).toTensor(); }

torch::Tensor reload(torch::jit::Module& module, torch::jit::Module* out) {
  std::stringstream bytes;
  module.save(bytes);
  *out = torch::jit::load(bytes);
  return torch::Tensor();
}

torch::Tensor scripted_weight(const torch::jit::Module& module, const std::string& path) {
  for (const auto& item : module.named_parameters()) {
    if (item.name == path) return item.value;
  }
  return {};
}

}  // namespace

TEST_F(JitTest, TwinComputesWhatTheNativeModelComputes) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  EXPECT_LT(max_abs_diff(run(scripted, x), native(x)), 1e-5);
}

TEST_F(JitTest, InjectsTheSameLayersAsTheNativeInjector) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  torch::manual_seed(5);
  const auto native_report = lora::inject(*native, query_value_config());
  torch::manual_seed(5);
  auto adapters = JitAdapters::inject(scripted, query_value_config());
  EXPECT_EQ(adapters.target_names(), native_report.adapted_modules());
  // Same generator state and order: the same initial A matrices.
  const auto native_state = lora::adapter_state_dict(*native);
  const auto jit_state = adapters.adapter_state_dict();
  ASSERT_EQ(jit_state.keys(), native_state.keys());
  for (const auto& item : native_state) EXPECT_TRUE(torch::equal(item.value(), jit_state[item.key()])) << item.key();
  // Trainable: the adapters and the saved classifier, nothing of the scripted model besides.
  EXPECT_EQ(adapters.parameters().size(), 4u * 2u + 2u);
  for (const auto& item : scripted.named_parameters()) {
    const bool classifier = item.name.rfind("classifier.", 0) == 0;
    EXPECT_EQ(item.value.requires_grad(), classifier || item.name.find("attention.self.query.weight") != std::string::npos ||
                                              item.name.find("attention.self.value.weight") != std::string::npos)
        << item.name;  // re-parametrised weights carry the adapters' graph
  }
}

TEST_F(JitTest, TrainingMatchesTheNativeAdapterAndTheLossFalls) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  const auto W0 = scripted_weight(scripted, "encoder.layer.0.attention.self.query.weight").detach().clone();
  torch::manual_seed(5);
  lora::inject(*native, query_value_config());
  torch::manual_seed(5);
  auto adapters = JitAdapters::inject(scripted, query_value_config());

  auto batch = [] { return lora::testing::comparison_batch(); };
  torch::manual_seed(1);
  const auto [probe_x, probe_y] = batch();
  auto probe_loss = [&](const std::function<torch::Tensor(const torch::Tensor&)>& model) {
    torch::NoGradGuard no_grad;
    return torch::nn::functional::cross_entropy(model(probe_x), probe_y).item<double>();
  };
  auto jit_model = [&](const torch::Tensor& x) { return run(scripted, x); };
  auto native_model = [&](const torch::Tensor& x) { return native(x); };
  const double initial = probe_loss(native_model);
  EXPECT_NEAR(probe_loss(jit_model), initial, 1e-5);

  torch::optim::AdamW native_optimizer(native->parameters(), torch::optim::AdamWOptions(2e-2).weight_decay(0.0));
  torch::optim::AdamW jit_optimizer(adapters.parameters(), torch::optim::AdamWOptions(2e-2).weight_decay(0.0));
  double worst = 0;
  for (int step = 0; step < 150; ++step) {
    const auto [x, y] = batch();
    native_optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(native(x), y);
    loss.backward();
    native_optimizer.step();

    adapters.refresh();
    jit_optimizer.zero_grad();
    auto jit_loss = torch::nn::functional::cross_entropy(run(scripted, x), y);
    jit_loss.backward();
    jit_optimizer.step();
    worst = std::max(worst, std::abs(jit_loss.item<double>() - loss.item<double>()));
  }
  EXPECT_LT(worst, 1e-4) << "largest per-step loss difference between the native and the scripted model";
  adapters.refresh();
  const double native_final = probe_loss(native_model);
  EXPECT_LT(native_final, 0.7 * initial) << "initial " << initial << ", final " << native_final;
  EXPECT_NEAR(probe_loss(jit_model), native_final, 1e-4);
  EXPECT_LT(max_abs_diff(run(scripted, probe_x), native(probe_x)), 1e-4);
  // The scripted model's own weight never moved: the adapter lives beside it.
  const auto W = adapters.adapters()->named_parameters()["encoder.layer.0.attention.self.query.base_layer.weight"];
  EXPECT_TRUE(torch::equal(W, W0));
}

TEST_F(JitTest, MergeSavesAPlainModuleAndUnmergeRestores) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  const auto W0 = scripted_weight(scripted, "encoder.layer.1.attention.self.value.weight").detach().clone();
  auto adapters = JitAdapters::inject(scripted, query_value_config());
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : adapters.parameters()) parameter.add_(0.1 * torch::randn_like(parameter));
    adapters.refresh();
  }
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  const auto adapted = run(scripted, x).detach();

  adapters.merge(/*safe_merge=*/true);
  EXPECT_TRUE(adapters.merged());
  EXPECT_LT(max_abs_diff(run(scripted, x), adapted), 1e-5);
  const auto layer = adapters.adapters()->named_modules()["encoder.layer.1.attention.self.value"]
                         ->as<lora::LoRALinearImpl<>>();
  const auto merged_W = scripted_weight(scripted, "encoder.layer.1.attention.self.value.weight");
  EXPECT_FALSE(merged_W.requires_grad());
  EXPECT_LT(max_abs_diff(merged_W, W0 + layer->delta_weight("default")), 1e-6);

  torch::jit::Module reloaded;
  reload(scripted, &reloaded);
  EXPECT_LT(max_abs_diff(run(reloaded, x), adapted), 1e-5);
  EXPECT_EQ(reloaded.named_parameters().size(), scripted.named_parameters().size());

  adapters.unmerge();
  EXPECT_FALSE(adapters.merged());
  EXPECT_LT(max_abs_diff(layer->base_weight(), W0), 1e-6);  // the scripted model's own weight, restored
  EXPECT_LT(max_abs_diff(run(scripted, x), adapted), 1e-5);
}

TEST_F(JitTest, DisablingGivesTheOriginalOutput) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  const auto base = run(scripted, x).detach();
  auto adapters = JitAdapters::inject(scripted, query_value_config());
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : adapters.parameters()) parameter.add_(0.1 * torch::randn_like(parameter));
  }
  adapters.refresh();
  const auto adapted = run(scripted, x).detach();
  EXPECT_GT(max_abs_diff(adapted, base), 1e-4);
  adapters.enable_adapters(false);
  EXPECT_TRUE(torch::equal(run(scripted, x), base));
  adapters.enable_adapters(false);  // twice changes nothing
  EXPECT_TRUE(torch::equal(run(scripted, x), base));
  adapters.enable_adapters(true);
  EXPECT_TRUE(torch::equal(run(scripted, x), adapted));
}

TEST_F(JitTest, ForgettingRefreshFailsLoudly) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  auto adapters = JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"}));
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  run(scripted, x).sum().backward();
  // No refresh: the re-parametrised weight's graph was freed by the first backward.
  EXPECT_THROW(run(scripted, x).sum().backward(), c10::Error);
  adapters.refresh();
  EXPECT_NO_THROW(run(scripted, x).sum().backward());
}

TEST_F(JitTest, ErrorsNameWhatWasWrong) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  LORA_EXPECT_THROWS_WITH(JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2).dropout(0.1)).target_modules({"query"})),
                          "dropout must be 0 for TorchScript modules (got 0.1)");
  LORA_EXPECT_THROWS_WITH(JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2)).target_modules({"LayerNorm"})),
                          "module 'encoder.layer.0.attention.output.LayerNorm' (__torch__.");
  LORA_EXPECT_THROWS_WITH(JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2)).target_modules({"LayerNorm"})),
                          "LayerNorm) matches the targets but is not a Linear");
  LORA_EXPECT_THROWS_WITH(JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2)).target_modules({"qkv"})),
                          "no module matches the targets (qkv); Linear modules in the scripted module: "
                          "encoder.layer.0.attention.self.query");
  for (const auto& item : scripted.named_parameters()) {
    EXPECT_TRUE(item.value.is_leaf()) << item.name << ": a failed inject must leave the module alone";
  }
  auto adapters = JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2)).target_modules({"query"}));
  LORA_EXPECT_THROWS_WITH(adapters.add_adapter(LoraConfig(LoRAOptions(2)).target_modules({"query"}), "default"),
                          "adapter 'default' is already attached to 'encoder.layer.0.attention.self.query'");
  LORA_EXPECT_THROWS_WITH(adapters.set_adapter("other"), "cannot activate unknown adapter 'other'");
}

TEST_F(JitTest, SecondAdapterCanBeSelected) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  auto adapters = JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"}));
  adapters.add_adapter(LoraConfig(LoRAOptions(2).alpha(4).init("false")).target_modules({"query"}), "other");
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  const auto first = run(scripted, x).detach();  // B = 0: the base output
  adapters.set_adapter("other");
  EXPECT_GT(max_abs_diff(run(scripted, x), first), 1e-4);
  adapters.set_adapter("default");
  EXPECT_TRUE(torch::equal(run(scripted, x), first));
}

TEST_F(JitTest, DoRAAndRankPatternsMatchTheNativeModel) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  const auto config = LoraConfig(LoRAOptions(4).alpha(6).use_dora(true))
                          .target_modules({"query", "value", "dense"})
                          .rank_pattern({{"dense", 2}});
  torch::manual_seed(3);
  lora::inject(*native, config);
  torch::manual_seed(3);
  auto adapters = JitAdapters::inject(scripted, config);
  {
    torch::NoGradGuard no_grad;  // give both the same trained-looking adapters
    auto native_state = lora::adapter_state_dict(*native);
    auto jit_state = adapters.adapter_state_dict();
    ASSERT_EQ(native_state.keys(), jit_state.keys());
    for (auto& item : native_state) {
      const auto noise = 0.1 * torch::randn_like(item.value());
      item.value().add_(noise);
      jit_state[item.key()].add_(noise);
    }
  }
  adapters.refresh();
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  const auto expected = native(x);
  EXPECT_LT(max_abs_diff(run(scripted, x), expected), 1e-5);
  adapters.merge();
  EXPECT_LT(max_abs_diff(run(scripted, x), expected), 1e-5);
  EXPECT_EQ(adapters.adapter_state_dict()["base_model.model.pooler.dense.lora_A.weight"].size(0), 2);
}

TEST_F(JitTest, AFailedInjectionLeavesTheScriptedModuleAsItWas) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  std::map<std::string, torch::Tensor> before;
  for (const auto& item : scripted.named_parameters()) before[item.name] = item.value.detach().clone();
  auto unchanged = [&](const char* what) {
    for (const auto& item : scripted.named_parameters()) {
      EXPECT_TRUE(item.value.is_leaf()) << what << ": " << item.name;
      EXPECT_FALSE(item.value.requires_grad()) << what << ": " << item.name;
      EXPECT_TRUE(torch::equal(item.value, before.at(item.name))) << what << ": " << item.name << " changed";
    }
  };
  for (const auto& item : scripted.named_parameters()) item.value.requires_grad_(false);
  // Caught by the plan: the classifier (2 outputs) cannot take a PiSSA rank of 4.
  JitAdapters planned(scripted);
  LORA_EXPECT_THROWS_WITH(
      planned.add_adapter(LoraConfig(LoRAOptions(4).alpha(8).init("pissa")).target_modules({"query", "classifier"}), "default"),
      "module 'classifier': LoRALinear: rank 4 exceeds min(in_features, out_features) = 2");
  unchanged("plan refusal");
  EXPECT_TRUE(planned.target_names().empty());

  // A failure while applying, at target 3 of 4 (its SVD meets a NaN): the two targets already
  // decomposed get their weights back, bit for bit.
  {
    torch::NoGradGuard no_grad;
    for (const auto& item : scripted.named_parameters()) {
      if (item.name == "encoder.layer.1.attention.self.query.weight") item.value[0][0] = std::nan("");
    }
  }
  before["encoder.layer.1.attention.self.query.weight"] =
      scripted_weight(scripted, "encoder.layer.1.attention.self.query.weight").detach().clone();
  JitAdapters applied(scripted);
  LORA_EXPECT_THROWS_WITH(
      applied.add_adapter(LoraConfig(LoRAOptions(2).alpha(4).init("pissa")).target_modules({"query", "value"})
                              .modules_to_save({"classifier"}), "default"),
      "module 'encoder.layer.1.attention.self.query': ");
  for (const auto& item : scripted.named_parameters()) {
    if (item.name == "encoder.layer.1.attention.self.query.weight") continue;  // NaN != NaN
    EXPECT_TRUE(item.value.is_leaf()) << item.name;
    EXPECT_TRUE(torch::equal(item.value, before.at(item.name))) << item.name << " changed";
  }
  EXPECT_TRUE(applied.target_names().empty());
  EXPECT_TRUE(applied.adapters()->named_parameters().is_empty());
}

TEST_F(JitTest, AdaptersFollowTheScriptedModuleToAnotherDtype) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  const auto config = LoraConfig(LoRAOptions(4).alpha(8).use_dora(true)).target_modules({"query", "value"})
                          .modules_to_save({"classifier"});
  torch::manual_seed(5);
  lora::inject(*native, config);
  torch::manual_seed(5);
  auto adapters = JitAdapters::inject(scripted, config);
  {
    torch::NoGradGuard no_grad;
    auto native_state = lora::adapter_state_dict(*native);
    auto jit_state = adapters.adapter_state_dict();
    for (auto& item : native_state) {
      const auto noise = 0.1 * torch::randn_like(item.value());
      item.value().add_(noise);
      jit_state[item.key()].add_(noise);
    }
  }
  // Moved on its own, as a user would: the adapters follow at the next refresh.
  scripted.to(torch::kDouble);
  native->to(torch::kDouble);
  for (auto& item : native->named_parameters()) {  // the native twin keeps float32 adapters too
    if (item.key().find("lora_") != std::string::npos) item.value().set_data(item.value().to(torch::kFloat));
  }
  adapters.refresh();
  const auto x = torch::randn({3, 5, lora::testing::kHidden}, torch::kDouble);
  const auto expected = native(x).detach();
  const auto y = run(scripted, x);
  EXPECT_EQ(y.scalar_type(), torch::kDouble);
  EXPECT_LT(max_abs_diff(y, expected), 1e-6);
  y.sum().backward();
  // The adapters keep their own dtype (float32); the base and the saved classifier follow (its
  // stored original moves when it is used, below).
  for (const auto& item : adapters.adapters()->named_parameters()) {
    if (item.key().find("original_module") != std::string::npos) continue;
    const bool adapter = item.key().find("lora_") != std::string::npos;
    EXPECT_EQ(item.value().scalar_type(), adapter ? torch::kFloat : torch::kDouble) << item.key();
    if (item.value().requires_grad()) {
      EXPECT_TRUE(item.value().grad().defined()) << item.key();
    }
  }
  // A merge lands in the (moved) scripted weights; unmerge restores them.
  const auto W = adapters.adapters()->named_parameters()["encoder.layer.0.attention.self.query.base_layer.weight"];
  EXPECT_EQ(W.scalar_type(), torch::kDouble);
  const auto W0 = W.detach().clone();
  adapters.merge();
  EXPECT_LT(max_abs_diff(run(scripted, x), expected), 1e-6);
  const auto merged = scripted_weight(scripted, "encoder.layer.0.attention.self.query.weight");
  EXPECT_TRUE(merged.is_leaf());
  EXPECT_GT(max_abs_diff(merged, W0), 1e-4);
  adapters.unmerge();
  EXPECT_LT(max_abs_diff(W, W0), 1e-12);
  // Disabling restores the saved classifier's original values in the moved module.
  adapters.enable_adapters(false);
  lora::enable_adapters(*native, false);
  // (The twin's source writes √8 with 6 digits: 1e-6 is as close as the two models ever are.)
  EXPECT_LT(max_abs_diff(run(scripted, x), native(x)), 1e-6);
  // to() moves both at once.
  adapters.enable_adapters(true);
  lora::enable_adapters(*native, true);
  adapters.to(torch::kCPU, torch::kFloat);
  native->to(torch::kFloat);
  EXPECT_LT(max_abs_diff(run(scripted, x.to(torch::kFloat)), native(x.to(torch::kFloat))), 1e-5);
  if (torch::cuda::is_available()) {
    adapters.to(torch::kCUDA);
    native->to(torch::kCUDA);
    const auto on_gpu = x.to(torch::kFloat).to(torch::kCUDA);
    EXPECT_LT(max_abs_diff(run(scripted, on_gpu).cpu(), native(on_gpu).cpu()), 1e-4);
  }
}

TEST_F(JitTest, ASavedModuleCannotHoldATargetAndOneJitAdaptersPerModule) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  auto adapters = JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"dense"}));
  LORA_EXPECT_THROWS_WITH(adapters.add_adapter(LoraConfig(LoRAOptions(2)).target_modules({"query"}).modules_to_save({"pooler"}), "b"),
                          "module 'pooler' is to be saved in full but 'pooler.dense' inside it carries LoRA adapters");
  LORA_EXPECT_THROWS_WITH(JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2)).target_modules({"query"})),
                          "is re-parametrised by another JitAdapters");
  EXPECT_EQ(adapters.target_names().size(), 7u);
}

TEST_F(JitTest, SavedCopiesAndTheirGradientsFollowAMovedScriptedModule) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  auto adapters = JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2)).target_modules({"query"}).modules_to_save({"classifier"}));
  adapters.add_adapter(LoraConfig(LoRAOptions(2)).target_modules({"value"}).modules_to_save({"classifier"}), "b");
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  run(scripted, x).sum().backward();  // the classifier's copy for "default" gets a gradient
  adapters.set_adapter("b");          // which goes aside with its values (float32, in C++)
  scripted.to(torch::kDouble);        // the scripted module moves on its own
  adapters.set_adapter("default");    // its copy comes back, converted, gradient included
  for (const auto& item : scripted.named_parameters()) {
    if (item.name.rfind("classifier.", 0) != 0) continue;
    EXPECT_EQ(item.value.scalar_type(), torch::kDouble) << item.name;
    ASSERT_TRUE(item.value.grad().defined()) << item.name;
    EXPECT_EQ(item.value.grad().scalar_type(), torch::kDouble) << item.name;
  }
  run(scripted, x.to(torch::kDouble)).sum().backward();  // accumulates into the moved gradient
}

TEST_F(JitTest, SavedModulesDoNotNest) {
  TinyBert native;
  auto scripted = lora::testing::scripted_twin(native);
  auto adapters = JitAdapters::inject(scripted, LoraConfig(LoRAOptions(2)).target_modules({"query"}).modules_to_save({"pooler"}));
  LORA_EXPECT_THROWS_WITH(adapters.add_adapter(LoraConfig(LoRAOptions(2)).target_modules({"value"}).modules_to_save({"pooler.dense"}), "b"),
                          "module 'pooler.dense' cannot be saved: 'pooler' is saved already, for adapters (default)");
  LORA_EXPECT_THROWS_WITH(adapters.add_adapter(LoraConfig(LoRAOptions(2)).target_modules({"pooler.dense"}), "c"),
                          "module 'pooler.dense' matches the targets but is saved in full for adapter(s) default "
                          "(modules_to_save of 'pooler')");
  auto other = lora::testing::scripted_twin(native);
  auto reverse = JitAdapters::inject(other, LoraConfig(LoRAOptions(2)).target_modules({"query"}).modules_to_save({"pooler.dense"}));
  LORA_EXPECT_THROWS_WITH(reverse.add_adapter(LoraConfig(LoRAOptions(2)).target_modules({"value"}).modules_to_save({"pooler"}), "b"),
                          "module 'pooler' cannot be saved: 'pooler.dense' is saved already");
}
