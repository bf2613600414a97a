#include <lora/inject.hpp>

#include "test_helpers.hpp"
#include "tiny_bert.hpp"

using lora::LoraConfig;
using lora::LoRAOptions;
using lora::testing::max_abs_diff;
using lora::testing::TinyBert;

namespace {

class InjectTest : public lora::testing::SeededTest {};

using lora::testing::query_value_config;

std::vector<std::string> trainable_names(const torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& item : model.named_parameters()) {
    if (item.value().requires_grad()) names.push_back(item.key());
  }
  return names;
}

std::vector<std::string> adapter_names_of(const torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& item : lora::lora_layers(model)) {
    for (const auto& name : item.second->adapter_names()) names.push_back(item.first + ":" + name);
  }
  return names;
}

const std::vector<std::string> kQueryValue = {
    "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
    "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"};

/// A model whose forward calls a plain torch::nn::Linear member: the trap.
struct PlainModelImpl : torch::nn::Module {
  PlainModelImpl() {
    query = register_module("query", torch::nn::Linear(8, 8));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})));
  }
  torch::Tensor forward(const torch::Tensor& x) { return norm(query(x)); }
  torch::nn::Linear query{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(PlainModel);

}  // namespace

TEST_F(InjectTest, InjectsQueryAndValueAndReportsThem) {
  TinyBert model;
  const auto report = lora::inject(*model, query_value_config());
  EXPECT_EQ(report.adapter_name, "default");
  EXPECT_EQ(report.adapted_modules(), kQueryValue);
  EXPECT_EQ(report.saved_modules(), std::vector<std::string>{"classifier"});
  EXPECT_EQ(report.entries[0].r, 4);
  EXPECT_DOUBLE_EQ(report.entries[0].alpha, 8.0);
  EXPECT_DOUBLE_EQ(report.entries[0].scaling, 2.0);
  const auto text = report.to_string();
  EXPECT_EQ(text.rfind("adapter 'default': 4 adapted, 1 saved\n", 0), 0u) << text;
  EXPECT_NE(text.find("  encoder.layer.0.attention.self.query: r=4 alpha=8 (scaling 2)\n"), std::string::npos) << text;
  EXPECT_NE(text.find("  classifier: trainable copy\n"), std::string::npos) << text;

  std::vector<std::string> expected;
  for (const auto& name : kQueryValue) {
    expected.push_back(name + ".lora_A.default.weight");
    expected.push_back(name + ".lora_B.default.weight");
  }
  expected.push_back("classifier.modules_to_save.default.weight");
  expected.push_back("classifier.modules_to_save.default.bias");
  auto trainable = trainable_names(*model);
  EXPECT_EQ(trainable, expected);
  const auto count = lora::count_parameters(*model);
  EXPECT_EQ(count.trainable, 4 * (4 * 16 + 16 * 4) + (2 * 16 + 2));
}

TEST_F(InjectTest, BiasModeChoosesWhichBiasesTrain) {
  TinyBert model;
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"}).bias(lora::BiasMode::kLoraOnly));
  EXPECT_EQ(trainable_names(*model),
            (std::vector<std::string>{"encoder.layer.0.attention.self.query.base_layer.bias",
                                      "encoder.layer.0.attention.self.query.lora_A.default.weight",
                                      "encoder.layer.0.attention.self.query.lora_B.default.weight",
                                      "encoder.layer.1.attention.self.query.base_layer.bias",
                                      "encoder.layer.1.attention.self.query.lora_A.default.weight",
                                      "encoder.layer.1.attention.self.query.lora_B.default.weight"}));
}

TEST_F(InjectTest, AdaptedModelStartsAsTheBaseModel) {
  TinyBert model;
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  const auto before = model(x).detach();
  lora::inject(*model, query_value_config());
  EXPECT_TRUE(torch::equal(model(x), before));
}

TEST_F(InjectTest, EveryInjectedLayerIsOnTheForwardPath) {
  // For each injected layer alone: train only its adapter for one step and watch the output move.
  for (const auto& target : kQueryValue) {
    torch::manual_seed(0);
    TinyBert model;
    lora::inject(*model, query_value_config());
    for (auto& parameter : model->parameters()) parameter.requires_grad_(false);
    auto layer = model->named_modules()[target]->as<lora::LoRALinearImpl<>>();
    ASSERT_NE(layer, nullptr) << target;
    std::vector<torch::Tensor> own{layer->lora_A("default"), layer->lora_B("default")};
    for (auto& parameter : own) parameter.requires_grad_(true);

    const auto x = torch::randn({4, 6, lora::testing::kHidden});
    const auto before = model(x).detach();
    torch::optim::SGD optimizer(own, torch::optim::SGDOptions(1.0));
    torch::nn::functional::cross_entropy(model(x), torch::tensor({0, 1, 1, 0})).backward();
    optimizer.step();
    EXPECT_GT(max_abs_diff(model(x), before), 1e-6) << target << " is not on the forward path";
  }
}

TEST_F(InjectTest, LossFallsOnALearnableTask) {
  TinyBert model;
  lora::inject(*model, query_value_config());
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(2e-2).weight_decay(0.0));
  auto batch = [] { return lora::testing::comparison_batch(); };
  torch::manual_seed(1);
  const auto [probe_x, probe_y] = batch();
  auto probe_loss = [&] {
    torch::NoGradGuard no_grad;
    return torch::nn::functional::cross_entropy(model(probe_x), probe_y).item<double>();
  };
  const double initial = probe_loss();
  for (int step = 0; step < 150; ++step) {
    const auto [x, y] = batch();
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(model(x), y).backward();
    optimizer.step();
  }
  const double final_loss = probe_loss();
  EXPECT_LT(final_loss, 0.7 * initial) << "initial " << initial << ", final " << final_loss;
}

TEST_F(InjectTest, MergeUnmergeAndMergeAndUnloadKeepTheAdaptedOutput) {
  TinyBert model;
  lora::inject(*model, query_value_config());
  {
    torch::NoGradGuard no_grad;  // pretend training happened
    for (auto& parameter : model->parameters()) {
      if (parameter.requires_grad()) parameter.add_(0.1 * torch::randn_like(parameter));
    }
  }
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  const auto adapted = model(x).detach();
  lora::merge(*model);
  EXPECT_LT(max_abs_diff(model(x), adapted), 1e-5);
  lora::unmerge(*model);
  EXPECT_LT(max_abs_diff(model(x), adapted), 1e-5);

  lora::merge_and_unload(*model);
  EXPECT_TRUE(adapter_names_of(*model).empty());
  EXPECT_LT(max_abs_diff(model(x), adapted), 1e-5);
  EXPECT_TRUE(trainable_names(*model).empty());  // no adapter left to train
  const auto state = lora::base_state_dict(*model);
  for (const auto& item : state) {
    EXPECT_EQ(item.key().find("base_layer"), std::string::npos) << item.key();
    EXPECT_EQ(item.key().find("lora_"), std::string::npos) << item.key();
    EXPECT_EQ(item.key().find("modules_to_save"), std::string::npos) << item.key();
  }
  EXPECT_NE(state.find("encoder.layer.0.attention.self.query.weight"), nullptr);
  EXPECT_NE(state.find("classifier.bias"), nullptr);
  EXPECT_EQ(state.size(), model->named_parameters().size());
}

TEST_F(InjectTest, UnloadRestoresTheBaseModel) {
  TinyBert model;
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  const auto base = model(x).detach();
  lora::inject(*model, query_value_config());
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : model->parameters()) {
      if (parameter.requires_grad()) parameter.add_(0.1 * torch::randn_like(parameter));
    }
  }
  EXPECT_GT(max_abs_diff(model(x), base), 1e-4);
  lora::unload(*model);
  EXPECT_TRUE(torch::equal(model(x), base));
}

TEST_F(InjectTest, ModelLevelAdapterSwitching) {
  TinyBert model;
  lora::inject(*model, LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query"}), "a");
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(3)).target_modules({"value"}), "b");
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  const auto base = model(x).detach();
  {
    torch::NoGradGuard no_grad;
    for (const auto& item : lora::lora_layers(*model)) {
      for (const auto& name : item.second->adapter_names()) {
        auto layer = std::dynamic_pointer_cast<lora::LoRALinearImpl<>>(item.second);
        layer->lora_B(name).normal_();
      }
    }
  }
  // "a" is active where it exists; "b" starts active in the value layers (their first adapter).
  const auto both = model(x).detach();
  lora::set_adapter(*model, "a");
  const auto only_a = model(x).detach();
  EXPECT_GT(max_abs_diff(only_a, both), 1e-5);
  EXPECT_EQ(trainable_names(*model).size(), 4u);  // A and B of the two query layers
  lora::enable_adapters(*model, false);
  EXPECT_TRUE(torch::equal(model(x), base));
  lora::enable_adapters(*model, true);
  EXPECT_TRUE(torch::equal(model(x), only_a));
  lora::set_adapters(*model, {"a", "b"});
  EXPECT_LT(max_abs_diff(model(x), both), 1e-6);
  lora::delete_adapter(*model, "b");
  EXPECT_TRUE(torch::equal(model(x), only_a));
  LORA_EXPECT_THROWS_WITH(lora::set_adapter(*model, "b"), "cannot activate unknown adapter 'b' (the model has: a)");
  LORA_EXPECT_THROWS_WITH(lora::delete_adapter(*model, "zzz"), "cannot delete unknown adapter 'zzz'");
}

TEST_F(InjectTest, AdapterStateDictUsesPeftKeys) {
  TinyBert model;
  lora::inject(*model, LoraConfig(LoRAOptions(4).alpha(8).use_dora(true))
                           .target_modules({"query", "value"})
                           .modules_to_save({"classifier"}));
  const auto state = lora::adapter_state_dict(*model);
  std::vector<std::string> expected;
  for (const auto& name : kQueryValue) {
    for (const auto* part : {".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"}) {
      expected.push_back("base_model.model." + name + part);
    }
  }
  expected.push_back("base_model.model.classifier.weight");
  expected.push_back("base_model.model.classifier.bias");
  EXPECT_EQ(state.keys(), expected);
  EXPECT_EQ(state["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"].sizes(),
            (std::vector<int64_t>{4, 16}));
  EXPECT_EQ(state["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"].sizes(),
            (std::vector<int64_t>{16, 4}));
  EXPECT_EQ(state["base_model.model.encoder.layer.1.attention.self.value.lora_magnitude_vector"].sizes(),
            (std::vector<int64_t>{16}));
  EXPECT_EQ(lora::adapter_state_dict(*model, "default", "").keys().front(),
            "encoder.layer.0.attention.self.query.lora_A.weight");
  LORA_EXPECT_THROWS_WITH(lora::adapter_state_dict(*model, "other"), "cannot save unknown adapter 'other'");
}

TEST_F(InjectTest, MatchingRules) {
  auto adapted = [](const LoraConfig& config) {
    torch::manual_seed(0);
    TinyBert model;
    return lora::inject(*model, config).adapted_modules();
  };
  const LoRAOptions options = LoRAOptions(2).alpha(4);
  // Suffix on whole name components only; exact names; a full-match regex.
  EXPECT_EQ(adapted(LoraConfig(options).target_modules({"dense"})),
            (std::vector<std::string>{"encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense",
                                      "encoder.layer.0.output.dense", "encoder.layer.1.attention.output.dense",
                                      "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense",
                                      "pooler.dense"}));
  EXPECT_EQ(adapted(LoraConfig(options).target_modules({"pooler.dense", "classifier"})),
            (std::vector<std::string>{"pooler.dense", "classifier"}));
  EXPECT_EQ(adapted(LoraConfig(options).target_regex(R"(encoder\.layer\.1\..*\.(query|key))")),
            (std::vector<std::string>{"encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"}));
  // A regex must match the whole name.
  LORA_EXPECT_THROWS_WITH(adapted(LoraConfig(options).target_regex("query")), "no module matches the targets (query)");
  // all-linear: every Linear but the output head.
  const auto all = adapted(LoraConfig(options).target_modules({"all-linear"}));
  EXPECT_EQ(all.size(), 2u * 6u + 1u);
  EXPECT_EQ(all.back(), "pooler.dense");
  // exclude_modules, layers_to_transform with and without layers_pattern.
  EXPECT_EQ(adapted(LoraConfig(options).target_modules({"query", "value"}).exclude_modules({"encoder.layer.0.attention.self.value"})),
            (std::vector<std::string>{"encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query",
                                      "encoder.layer.1.attention.self.value"}));
  EXPECT_EQ(adapted(LoraConfig(options).target_modules({"query"}).layers_to_transform({1}).layers_pattern({"layer"})),
            std::vector<std::string>{"encoder.layer.1.attention.self.query"});
  EXPECT_EQ(adapted(LoraConfig(options).target_modules({"query"}).layers_to_transform({0})),
            std::vector<std::string>{"encoder.layer.0.attention.self.query"});
}

TEST_F(InjectTest, RankAndAlphaPatterns) {
  TinyBert model;
  const auto report = lora::inject(*model, LoraConfig(LoRAOptions(4).alpha(8))
                                               .target_modules({"query", "value"})
                                               .rank_pattern({{"value", 2}, {"layer\\.1\\.attention\\.self\\.query", 6}})
                                               .alpha_pattern({{"query", 3.0}}));
  std::vector<std::pair<int64_t, double>> got;
  for (const auto& entry : report.entries) got.emplace_back(entry.r, entry.alpha);
  EXPECT_EQ(got, (std::vector<std::pair<int64_t, double>>{{4, 3.0}, {2, 8.0}, {6, 3.0}, {2, 8.0}}));
  auto layer = model->named_modules()["encoder.layer.1.attention.self.query"]->as<lora::LoRALinearImpl<>>();
  EXPECT_EQ(layer->lora_A("default").size(0), 6);
  EXPECT_DOUBLE_EQ(layer->adapter_options("default").scaling(), 0.5);
}

TEST_F(InjectTest, PlainLinearTargetIsRefusedAndNothingChanges) {
  PlainModel model;
  const auto before = model->named_parameters().keys();
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"query"})),
                          "module 'query' is a plain torch::nn::Linear. The model's forward calls it through its own "
                          "typed member");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"query"})),
                          "Declare it as lora::LoRALinear<>");
  EXPECT_EQ(model->named_parameters().keys(), before);
}

TEST_F(InjectTest, ErrorsNameWhatWasWrong) {
  TinyBert model;
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"LayerNorm"})),
                          "module 'encoder.layer.0.attention.output.LayerNorm' (torch::nn::LayerNormImpl) matches the "
                          "targets but is not a Linear layer");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"attention"})),
                          "module 'encoder.layer.0.attention' (lora::testing::AttentionImpl) matches the targets but "
                          "is not a Linear layer");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"qkv"})),
                          "no module matches the targets (qkv); linear modules in the model: "
                          "encoder.layer.0.attention.self.query, encoder.layer.0.attention.self.key");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2))), "LoraConfig: no target modules");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(0)).target_modules({"query"})),
                          "rank r must be > 0 (got 0)");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"query"}).target_regex("q")),
                          "set target_modules or target_regex, not both");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_regex("(unclosed")),
                          "target_regex '(unclosed' is not a valid regular expression");
  LORA_EXPECT_THROWS_WITH(
      lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"query"}).rank_pattern({{"query", 0}})),
      "rank_pattern['query'] must be > 0 (got 0)");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"all-linear", "query"})),
                          "'all-linear' must be the only entry");
  EXPECT_TRUE(adapter_names_of(*model).empty()) << "a failed inject must not change the model";

  lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"query"}));
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"query", "value"})),
                          "adapter 'default' is already attached to 'encoder.layer.0.attention.self.query'");
  EXPECT_EQ(adapter_names_of(*model).size(), 2u) << "the failed second inject attached nothing";
}

TEST_F(InjectTest, LayerChecksRunBeforeAnyLayerChanges) {
  TinyBert model;
  const auto state = lora::base_state_dict(*model);
  std::map<std::string, torch::Tensor> before;
  for (const auto& item : state) before[item.key()] = item.value().detach().clone();
  // PiSSA rewrites base weights; the classifier (2 outputs) cannot take rank 4: refuse first.
  LORA_EXPECT_THROWS_WITH(
      lora::inject(*model, LoraConfig(LoRAOptions(4).alpha(8).init("pissa")).target_modules({"query", "classifier"})),
      "module 'classifier': LoRALinear: rank 4 exceeds min(in_features, out_features) = 2");
  for (const auto& item : lora::base_state_dict(*model)) {
    EXPECT_TRUE(torch::equal(item.value(), before[item.key()])) << item.key() << " changed";
  }
  EXPECT_TRUE(adapter_names_of(*model).empty());
}

TEST_F(InjectTest, LoadingIntoAMergedAdapterIsRefused) {
  TinyBert model;
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"}));
  const auto state = lora::adapter_state_dict(*model);
  torch::OrderedDict<std::string, torch::Tensor> copy;
  for (const auto& item : state) copy.insert(item.key(), item.value().detach().clone());
  lora::merge(*model);
  LORA_EXPECT_THROWS_WITH(lora::load_adapter_state_dict(*model, copy),
                          "cannot load adapter 'default' while it is merged into 'encoder.layer.0.attention.self.query'");
  lora::unmerge(*model);
  EXPECT_NO_THROW(lora::load_adapter_state_dict(*model, copy));
}
