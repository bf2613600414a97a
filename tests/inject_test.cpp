#include <limits>
#include <map>

#include <ATen/CPUGeneratorImpl.h>
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
  // PEFT's in-memory names: the live copy under modules_to_save.<adapter> (the classifier is a
  // LoRALinear, whence base_layer), the frozen original beside it.
  expected.push_back("classifier.modules_to_save.default.base_layer.weight");
  expected.push_back("classifier.modules_to_save.default.base_layer.bias");
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
                          "targets but is not a layer adapters attach to");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"attention"})),
                          "module 'encoder.layer.0.attention' (lora::testing::AttentionImpl) matches the targets but "
                          "is not a layer adapters attach to");
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

namespace {

/// A LoRALinear whose add_adapter or merge fails on demand: a failure injected at layer k of n.
struct FlakyLinearImpl : lora::LoRALinearImpl<> {
  using lora::LoRALinearImpl<>::LoRALinearImpl;
  void add_adapter(const std::string& name, const LoRAOptions& options,
                   std::shared_ptr<const LoraConfig> config = nullptr) override {
    TORCH_CHECK(!fail_add, "injected failure in add_adapter");
    lora::LoRALinearImpl<>::add_adapter(name, options, std::move(config));
  }
  void merge(const std::vector<std::string>& names = {}, bool safe_merge = false) override {
    TORCH_CHECK(!fail_merge, "injected failure in merge");
    lora::LoRALinearImpl<>::merge(names, safe_merge);
  }
  bool fail_add = false;
  bool fail_merge = false;
};

/// Four flaky projections in a row, then a head of any type.
struct ChainImpl : torch::nn::Module {
  ChainImpl() {
    // The norm first: an injection failing in a projection must unwrap it again.
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})));
    for (int i = 0; i < 4; ++i) {
      layers.push_back(register_module("proj" + std::to_string(i),
                                       std::make_shared<FlakyLinearImpl>(torch::nn::LinearOptions(8, 8))));
    }
    head = register_module("head", torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::Tanh(), torch::nn::Linear(8, 2)));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& layer : layers) x = torch::relu(layer->forward(x));
    return head->forward(norm(x));
  }
  std::vector<std::shared_ptr<FlakyLinearImpl>> layers;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Sequential head{nullptr};
};
TORCH_MODULE(Chain);

std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : model.named_parameters()) out[item.key()] = item.value().detach().clone();
  for (const auto& item : model.named_buffers()) out[item.key()] = item.value().detach().clone();
  return out;
}

std::map<std::string, bool> flags_of(const torch::nn::Module& model) {
  std::map<std::string, bool> out;
  for (const auto& item : model.named_parameters()) out[item.key()] = item.value().requires_grad();
  return out;
}

/// Same names, same values bit for bit.
::testing::AssertionResult same_state(const std::map<std::string, torch::Tensor>& a,
                                      const std::map<std::string, torch::Tensor>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << a.size() << " vs " << b.size() << " tensors";
  for (const auto& [key, tensor] : a) {
    const auto found = b.find(key);
    if (found == b.end()) return ::testing::AssertionFailure() << key << " is missing";
    if (!torch::equal(tensor, found->second)) return ::testing::AssertionFailure() << key << " differs";
  }
  return ::testing::AssertionSuccess();
}

}  // namespace

TEST_F(InjectTest, BiasModesKeepTheSavedModulesOriginalFrozen) {
  // PEFT: with bias "all" or "lora_only" the classifier's copy trains in full, its original stays frozen.
  const int64_t lora = 4 * (4 * 16 + 16 * 4), copy = 2 * 16 + 2;
  {
    TinyBert model;
    lora::inject(*model, query_value_config().bias(lora::BiasMode::kLoraOnly));
    for (const auto& name : trainable_names(*model)) {
      EXPECT_EQ(name.find("original_module"), std::string::npos) << name << " trains";
    }
    EXPECT_EQ(lora::count_parameters(*model).trainable, lora + copy + 4 * 16);  // + query/value biases
  }
  {
    TinyBert model;
    lora::inject(*model, query_value_config().bias(lora::BiasMode::kAll));
    for (const auto& name : trainable_names(*model)) {
      EXPECT_EQ(name.find("original_module"), std::string::npos) << name << " trains";
    }
    // + every bias outside the classifier: per layer seven of 16 and the intermediate's 32; the pooler's 16.
    EXPECT_EQ(lora::count_parameters(*model).trainable, lora + copy + 2 * (16 * 7 + 32) + 16);
  }
}

TEST_F(InjectTest, EntriesThatMatchNothingAreErrors) {
  TinyBert model;
  const auto base = LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query", "value"});
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(base).modules_to_save({"clasifier"})),
                          "modules_to_save entry 'clasifier' matches no module (a module matches when its name ends "
                          "with the entry); module names end with: 0, 1, LayerNorm, attention, classifier,");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(base).exclude_modules({"encoder.layer.9.attention.self.query"})),
                          "exclude_modules entry 'encoder.layer.9.attention.self.query' matches no module");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(base).rank_pattern({{"valeu", 4}})),
                          "rank_pattern key 'valeu' matches no adapted module; adapted: encoder.layer.0.attention.self.query");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(base).alpha_pattern({{"dense", 4}})),
                          "alpha_pattern key 'dense' matches no adapted module");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(base).layers_to_transform({0, 5})),
                          "layers_to_transform lists layer 5, which no targeted module is in; the targeted modules are "
                          "in layers: 0, 1");
  EXPECT_TRUE(adapter_names_of(*model).empty());
  EXPECT_TRUE(lora::adapter_layers(*model).size() == lora::lora_layers(*model).size()) << "no saved module was wrapped";
  // The sequence-classification heads PEFT adds may be absent ("score" here), listed or not.
  EXPECT_NO_THROW(lora::inject(*model, LoraConfig(base).task_type("SEQ_CLS").modules_to_save({"classifier", "score"})));
  TinyBert tokens;
  EXPECT_NO_THROW(lora::inject(*tokens, LoraConfig(base).task_type("TOKEN_CLS").modules_to_save({"classifier", "score"})));
}

TEST_F(InjectTest, AFailureAtLayerKOfNLeavesTheModelExactlyAsItWas) {
  for (int k = 0; k < 4; ++k) {
    torch::manual_seed(0);
    Chain model;
    const auto before = snapshot(*model);
    const auto flags = flags_of(*model);
    const auto names = model->named_parameters().keys();
    model->layers[static_cast<size_t>(k)]->fail_add = true;
    auto generator = at::detail::getDefaultCPUGenerator();
    const auto random_state = generator.get_state();
    // PiSSA rewrites each base weight it decomposes: the layers before k must get theirs back.
    LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4).init("pissa"))
                                                     .target_modules({"proj0", "proj1", "proj2", "proj3"})
                                                     .modules_to_save({"head", "norm"})),
                            "injected failure in add_adapter");
    EXPECT_TRUE(same_state(snapshot(*model), before)) << "k = " << k;
    EXPECT_EQ(flags_of(*model), flags) << "k = " << k;
    EXPECT_EQ(model->named_parameters().keys(), names) << "k = " << k << ": the saved modules were not unwrapped";
    EXPECT_TRUE(lora::detail::all_adapter_names(*model).empty());
    EXPECT_TRUE(torch::equal(generator.get_state(), random_state)) << "a failed inject moved the generator";
  }
}

TEST_F(InjectTest, ModelLevelOperationsAreAllOrNothing) {
  Chain model;
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"proj0", "proj1", "proj2", "proj3"})
                           .modules_to_save({"head"}));
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : model->parameters()) {
      if (parameter.requires_grad()) parameter.add_(0.1 * torch::randn_like(parameter));
    }
  }
  const auto x = torch::randn({3, 8});
  const auto adapted = model(x).detach();
  const auto state = snapshot(*model);
  const auto names = model->named_parameters().keys();
  auto unchanged = [&](const char* what) {
    EXPECT_TRUE(same_state(snapshot(*model), state)) << what;
    EXPECT_EQ(model->named_parameters().keys(), names) << what;
    EXPECT_TRUE(torch::equal(model(x), adapted)) << what;
    for (const auto& layer : model->layers) {
      EXPECT_FALSE(layer->merged()) << what;
      EXPECT_EQ(layer->adapter_names(), std::vector<std::string>{"default"}) << what;
    }
  };
  // A layer merged before the call keeps its merge, bit for bit.
  model->layers[0]->merge();
  const auto premerged = model->layers[0]->base_weight().detach().clone();
  model->layers[2]->fail_merge = true;
  LORA_EXPECT_THROWS_WITH(lora::merge(*model), "injected failure in merge");
  EXPECT_TRUE(torch::equal(model->layers[0]->base_weight(), premerged));
  EXPECT_EQ(model->layers[0]->merged_adapters(), std::vector<std::string>{"default"});
  EXPECT_FALSE(model->layers[1]->merged());
  model->layers[0]->unmerge();
  {
    torch::NoGradGuard no_grad;  // unmerging is exact only up to rounding: put the weight back
    model->layers[0]->base_weight().copy_(state.at("proj0.base_layer.weight"));
  }
  // A failure in the merge of layer 2 of 4: layers 0 and 1 are unmerged again, nothing unloaded.
  LORA_EXPECT_THROWS_WITH(lora::merge_and_unload(*model), "module 'proj2': injected failure in merge");
  unchanged("merge_and_unload failing at layer 2");
  LORA_EXPECT_THROWS_WITH(lora::merge(*model), "injected failure in merge");
  unchanged("merge failing at layer 2");
  model->layers[2]->fail_merge = false;
  // A non-finite weight in layer 3 under safe_merge: the same.
  {
    torch::NoGradGuard no_grad;
    model->layers[3]->lora_B("default").fill_(std::numeric_limits<float>::infinity());
  }
  const auto poisoned = snapshot(*model);
  LORA_EXPECT_THROWS_WITH(lora::merge_and_unload(*model, /*safe_merge=*/true), "would write non-finite values");
  EXPECT_TRUE(same_state(snapshot(*model), poisoned));
  EXPECT_EQ(model->named_parameters().keys(), names);
  {
    torch::NoGradGuard no_grad;
    model->layers[3]->lora_B("default").copy_(state.at("proj3.lora_B.default.weight"));
  }
  // While disabled: merge and merge_and_unload both refuse, and nothing is dropped.
  lora::enable_adapters(*model, false);
  LORA_EXPECT_THROWS_WITH(lora::merge_and_unload(*model), "cannot merge while adapters are disabled");
  LORA_EXPECT_THROWS_WITH(lora::merge(*model), "cannot merge while adapters are disabled");
  lora::enable_adapters(*model, true);
  unchanged("merge_and_unload while disabled");
  // delete_adapter while one layer has it merged: refused before any layer loses it.
  model->layers[1]->merge();
  LORA_EXPECT_THROWS_WITH(lora::delete_adapter(*model, "default"),
                          "module 'proj1': LoRALinear: cannot delete adapter 'default' while it is merged");
  for (const auto& layer : model->layers) EXPECT_EQ(layer->adapter_names(), std::vector<std::string>{"default"});
  EXPECT_EQ(model->named_parameters().keys(), names);
  model->layers[1]->unmerge();
  // And when nothing fails, merge_and_unload keeps the adapted output with no adapter structure.
  lora::merge_and_unload(*model);
  EXPECT_LT(max_abs_diff(model(x), adapted), 1e-5);
  EXPECT_TRUE(lora::detail::all_adapter_names(*model).empty());
  EXPECT_EQ(std::dynamic_pointer_cast<lora::ModulesToSaveImpl>(model->named_children()["head"]), nullptr);
  for (const auto& key : model->named_parameters().keys()) EXPECT_EQ(key.find("modules_to_save"), std::string::npos) << key;
}

TEST_F(InjectTest, AnyModuleTypeCanBeSaved) {
  Chain model;
  const auto x = torch::randn({5, 8});
  const auto base = model(x).detach();
  const auto original = snapshot(*model);
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"proj0"}).modules_to_save({"head", "norm"}));
  const auto trainable = trainable_names(*model);
  // PEFT's names: the copy trains under modules_to_save.<adapter>, the original is kept beside it.
  EXPECT_NE(std::find(trainable.begin(), trainable.end(), "head.modules_to_save.default.0.weight"), trainable.end());
  EXPECT_NE(std::find(trainable.begin(), trainable.end(), "norm.modules_to_save.default.weight"), trainable.end());
  EXPECT_EQ(model->named_parameters()["head.original_module.2.bias"].requires_grad(), false);
  EXPECT_TRUE(torch::equal(model(x), base)) << "copies start equal to the originals";

  // One optimizer step on the saved modules alone moves the output: they are on the forward path.
  std::vector<torch::Tensor> saved;
  for (const auto& item : model->named_parameters()) {
    if (item.value().requires_grad() && item.key().find("modules_to_save") != std::string::npos) saved.push_back(item.value());
  }
  ASSERT_EQ(saved.size(), 6u);  // head: two Linear layers' weight and bias; norm: weight and bias
  torch::optim::SGD optimizer(saved, torch::optim::SGDOptions(0.5));
  torch::nn::functional::cross_entropy(model(x), torch::tensor({0, 1, 1, 0, 1})).backward();
  optimizer.step();
  const auto trained = model(x).detach();
  EXPECT_GT(max_abs_diff(trained, base), 1e-4);

  // Disabled: the originals compute, bit for bit; enabled: the trained copies again.
  lora::enable_adapters(*model, false);
  EXPECT_TRUE(torch::equal(model(x), base));
  for (const auto& item : model->named_parameters()) {
    const bool saved = item.key().rfind("head.", 0) == 0 || item.key().rfind("norm.", 0) == 0;
    EXPECT_FALSE(saved && item.value().requires_grad()) << item.key() << " trains while disabled";
  }
  EXPECT_TRUE(torch::equal(model->named_parameters()["head.original_module.0.weight"], original.at("head.0.weight")));
  lora::enable_adapters(*model, true);
  EXPECT_TRUE(torch::equal(model(x), trained));

  // The adapter state names the module's own tensors; it loads into a fresh twin.
  const auto state = lora::adapter_state_dict(*model);
  EXPECT_NE(state.find("base_model.model.head.2.weight"), nullptr);
  EXPECT_NE(state.find("base_model.model.norm.bias"), nullptr);
  torch::manual_seed(0);
  Chain twin;
  lora::inject(*twin, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"proj0"}).modules_to_save({"head", "norm"}));
  lora::load_adapter_state_dict(*twin, state);
  EXPECT_TRUE(torch::equal(twin(x), trained));
  // base_state_dict reports the originals under the plain names; unload restores them.
  EXPECT_TRUE(torch::equal(lora::base_state_dict(*model)["head.0.weight"], original.at("head.0.weight")));
  lora::unload(*model);
  EXPECT_TRUE(torch::equal(model(x), base));
  EXPECT_TRUE(same_state(snapshot(*model), original));
}

TEST_F(InjectTest, TwoAdaptersWithTheirOwnSavedCopies) {
  Chain model;
  const auto x = torch::randn({3, 8});
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"proj0"}).modules_to_save({"head"}), "a");
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"proj1"}).modules_to_save({"head"}), "b");
  auto head = std::dynamic_pointer_cast<lora::ModulesToSaveImpl>(model->named_children()["head"]);
  ASSERT_NE(head, nullptr);
  EXPECT_EQ(head->adapter_names(), (std::vector<std::string>{"a", "b"}));
  auto bump = [&](double amount) {
    torch::NoGradGuard no_grad;
    for (auto& parameter : head->module()->parameters()) parameter.add_(amount);
  };
  const auto base = model(x).detach();
  bump(0.1);  // trains "a" (active)
  const auto with_a = model(x).detach();
  lora::set_adapter(*model, "b");
  EXPECT_EQ(head->live_values(), "b");
  bump(-0.2);  // trains "b"
  const auto with_b = model(x).detach();
  lora::set_adapter(*model, "a");
  EXPECT_TRUE(torch::equal(model(x), with_a)) << "a's copy was disturbed by training b";
  lora::set_adapter(*model, "b");
  EXPECT_TRUE(torch::equal(model(x), with_b));
  LORA_EXPECT_THROWS_WITH(lora::set_adapters(*model, {"a", "b"}), "module 'head': lora::ModulesToSave: only one saved copy");
  lora::delete_adapter(*model, "b");
  EXPECT_EQ(head->live_values(), "a");
  EXPECT_TRUE(torch::equal(model(x), with_a));
  (void)base;
}

TEST_F(InjectTest, SavedModulesDoNotNestAndRegexTargetsTakeNoLayerFilter) {
  TinyBert model;
  lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"query"}).modules_to_save({"pooler.dense"}), "a");
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"value"}).modules_to_save({"pooler"}), "b"),
                          "module 'pooler' cannot be saved: 'pooler.dense' is saved already, for adapters (a); saved "
                          "modules cannot nest");
  EXPECT_EQ(lora::detail::all_adapter_names(*model), std::vector<std::string>{"a"});
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"pooler.dense"}), "c"),
                          "module 'pooler.dense' matches the targets but is saved in full for adapter(s) a");
  // PEFT refuses a regular expression with layers_to_transform: so do we, before saving a file PEFT cannot read.
  LORA_EXPECT_THROWS_WITH(lora::inject(*model, LoraConfig(LoRAOptions(2)).target_regex(".*value").layers_to_transform({0}), "d"),
                          "layers_to_transform cannot be used with target_regex");
  // A head-only adapter must have a name of its own.
  LORA_EXPECT_THROWS_WITH(lora::add_modules_to_save(*model, {"classifier"}, "a"), "the model already has adapter 'a'");
  lora::add_modules_to_save(*model, {"classifier"}, "head");
  EXPECT_EQ(lora::detail::all_adapter_names(*model), (std::vector<std::string>{"a", "head"}));
}

TEST_F(InjectTest, MergeAndUnloadWhileDisabledKeepsSavedCopies) {
  // A head-only baseline (saved modules, no LoRA layer to refuse): disabled, merge_and_unload
  // would put the original head back and drop the trained copy.
  Chain model;
  lora::add_modules_to_save(*model, {"head"});
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : model->parameters()) {
      if (parameter.requires_grad()) parameter.add_(0.1);
    }
  }
  const auto x = torch::randn({2, 8});
  const auto trained = model(x).detach();
  lora::enable_adapters(*model, false);
  LORA_EXPECT_THROWS_WITH(lora::merge_and_unload(*model), "module 'head': cannot merge while adapters are disabled");
  lora::enable_adapters(*model, true);
  EXPECT_TRUE(torch::equal(model(x), trained));
  lora::merge_and_unload(*model);
  EXPECT_TRUE(torch::equal(model(x), trained));
  EXPECT_EQ(std::dynamic_pointer_cast<lora::ModulesToSaveImpl>(model->named_children()["head"]), nullptr);
}

TEST_F(InjectTest, SavedCopiesFollowTheModelToAnotherDtype) {
  Chain model;
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"proj0"}).modules_to_save({"head"}), "a");
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"proj1"}).modules_to_save({"head"}), "b");
  const auto x = torch::randn({3, 8});
  auto head = std::dynamic_pointer_cast<lora::ModulesToSaveImpl>(model->named_children()["head"]);
  {
    torch::NoGradGuard no_grad;  // a's copy differs from b's
    for (auto& parameter : head->module()->parameters()) parameter.add_(0.1);
  }
  const auto with_a = model(x).detach();
  lora::set_adapter(*model, "b");
  const auto with_b = model(x).detach();
  model->to(torch::kDouble);  // every copy is registered: all move
  lora::set_adapter(*model, "a");
  const auto y = model(x.to(torch::kDouble));
  EXPECT_EQ(y.scalar_type(), torch::kDouble);
  EXPECT_LT(max_abs_diff(y, with_a), 1e-6);
  for (const auto& item : model->named_parameters()) EXPECT_EQ(item.value().scalar_type(), torch::kDouble) << item.key();
  lora::set_adapter(*model, "b");
  EXPECT_LT(max_abs_diff(model(x.to(torch::kDouble)), with_b), 1e-6);
}
