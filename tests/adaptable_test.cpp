// lora::make_adaptable: adapters on models whose layers are plain torch::nn::Linear /
// Embedding / Conv2d members, checked against the same model declaring LoRA layers.

#include <algorithm>

#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/lora.hpp>

#include "test_helpers.hpp"

using lora::LoraConfig;
using lora::LoRAOptions;
using lora::testing::max_abs_diff;

namespace {

/// The user's model, as written without this library: plain members, called directly.
struct PlainNetImpl : torch::nn::Module {
  PlainNetImpl() {
    tokens = register_module("tokens", torch::nn::Embedding(torch::nn::EmbeddingOptions(12, 4)));
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 6, 3).padding(1)));
    fc1 = register_module("fc1", torch::nn::Linear(6, 8));
    fc2 = register_module("fc2", torch::nn::Linear(8, 3));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto image = tokens->forward(ids).view({ids.size(0), 4, 4, 4}).permute({0, 3, 1, 2});
    auto features = torch::relu(conv->forward(image)).mean({2, 3});
    return fc2->forward(norm->forward(torch::relu(fc1->forward(features))));
  }
  torch::nn::Embedding tokens{nullptr};
  torch::nn::Conv2d conv{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(PlainNet);

/// The same model declaring LoRA layers.
struct DeclaredNetImpl : torch::nn::Module {
  DeclaredNetImpl() {
    tokens = register_module("tokens", lora::LoRAEmbedding(torch::nn::EmbeddingOptions(12, 4)));
    conv = register_module("conv", lora::LoRAConv2d(torch::nn::Conv2dOptions(4, 6, 3).padding(1)));
    fc1 = register_module("fc1", lora::LoRALinear<>(torch::nn::LinearOptions(6, 8)));
    fc2 = register_module("fc2", lora::LoRALinear<>(torch::nn::LinearOptions(8, 3)));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto image = tokens(ids).view({ids.size(0), 4, 4, 4}).permute({0, 3, 1, 2});
    auto features = torch::relu(conv(image)).mean({2, 3});
    return fc2(norm(torch::relu(fc1(features))));
  }
  lora::LoRAEmbedding tokens{nullptr};
  lora::LoRAConv2d conv{nullptr};
  lora::LoRALinear<> fc1{nullptr}, fc2{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(DeclaredNet);

/// Copies the plain model's weights into the declared one (the same pretrained model).
void copy_base(PlainNet& plain, DeclaredNet& declared) {
  torch::NoGradGuard no_grad;
  auto target = declared->named_parameters();
  for (const auto& item : lora::base_state_dict(*plain)) {
    const auto dot = item.key().rfind('.');
    const auto layered = item.key().substr(0, dot) + ".base_layer" + item.key().substr(dot);
    auto* found = target.find(layered);
    auto* same = target.find(item.key());
    TORCH_CHECK(found != nullptr || same != nullptr, "copy_base: no '", item.key(), "' or '", layered, "' in ",
                c10::Join(", ", target.keys()));
    (found ? *found : *same).copy_(item.value());
  }
}

std::vector<torch::Tensor> trainable(const torch::nn::Module& model) {
  std::vector<torch::Tensor> parameters;
  for (const auto& parameter : model.parameters()) {
    if (parameter.requires_grad()) parameters.push_back(parameter);
  }
  return parameters;
}

std::vector<std::string> names_of(const torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& item : model.named_parameters()) names.push_back(item.key());
  return names;
}

class AdaptableTest : public lora::testing::TempDirTest {};

const LoraConfig kConfig = LoraConfig(LoRAOptions(2).alpha(5)).target_modules({"tokens", "conv", "fc1", "fc2"});

}  // namespace

TEST_F(AdaptableTest, PlainModelTrainsLikeTheDeclaredOne) {
  PlainNet plain;
  DeclaredNet declared;
  copy_base(plain, declared);
  auto adaptable = lora::make_adaptable(*plain, kConfig);
  EXPECT_EQ(adaptable.targets().size(), 4u);
  torch::manual_seed(3);
  lora::inject(*plain, kConfig);
  torch::manual_seed(3);
  lora::inject(*declared, kConfig);
  // The same names as the declared model: PEFT's, so files and optimisers see one model.
  EXPECT_EQ(names_of(*plain), names_of(*declared));

  torch::optim::SGD plain_optimizer(trainable(*plain), torch::optim::SGDOptions(0.5));
  torch::optim::SGD declared_optimizer(trainable(*declared), torch::optim::SGDOptions(0.5));
  const auto targets = torch::randint(3, {8});
  for (int step = 0; step < 5; ++step) {
    const auto ids = torch::randint(12, {8, 16});
    auto plain_loss = adaptable.run([&] { return torch::cross_entropy_loss(plain->forward(ids), targets); });
    auto declared_loss = torch::cross_entropy_loss(declared->forward(ids), targets);
    EXPECT_NEAR(plain_loss.item<double>(), declared_loss.item<double>(), 1e-5) << "step " << step;
    plain_optimizer.zero_grad();
    declared_optimizer.zero_grad();
    plain_loss.backward();
    declared_loss.backward();
    plain_optimizer.step();
    declared_optimizer.step();
  }
  // Trained, and still equal parameter by parameter.
  auto declared_parameters = declared->named_parameters();
  double moved = 0;
  for (const auto& item : plain->named_parameters()) {
    EXPECT_LT(max_abs_diff(item.value(), declared_parameters[item.key()]), 1e-5) << item.key();
    if (item.key().find("lora_B") != std::string::npos || item.key().find("lora_embedding_A") != std::string::npos) {
      moved += item.value().abs().sum().item<double>();
    }
  }
  EXPECT_GT(moved, 0.0);
  // The frozen base never changed.
  const auto ids = torch::randint(12, {2, 16});
  lora::enable_adapters(*plain, false);
  lora::enable_adapters(*declared, false);
  EXPECT_LT(max_abs_diff(adaptable.run([&] { return plain->forward(ids); }), declared->forward(ids)), 1e-6);
}

TEST_F(AdaptableTest, AForwardOutsideAScopeFailsInsteadOfUsingStaleWeights) {
  PlainNet plain;
  auto adaptable = lora::make_adaptable(*plain, kConfig);
  lora::inject(*plain, kConfig);
  const auto ids = torch::randint(12, {2, 16});
  EXPECT_THROW(plain->forward(ids), c10::Error);
  {
    auto outer = adaptable.scope();
    EXPECT_TRUE(adaptable.in_scope());
    {
      auto inner = adaptable.scope();  // nested: the outer one still holds the weights after
    }
    EXPECT_NO_THROW(plain->forward(ids));
  }
  EXPECT_FALSE(adaptable.in_scope());
  EXPECT_THROW(plain->forward(ids), c10::Error);
  // An exception inside run() ends the scope too.
  EXPECT_THROW(adaptable.run([&]() -> torch::Tensor { throw std::runtime_error("boom"); }), std::runtime_error);
  EXPECT_FALSE(adaptable.in_scope());
  EXPECT_THROW(plain->forward(ids), c10::Error);
}

TEST_F(AdaptableTest, EachScopeSeesTheAdaptersAfterTheLastStep) {
  PlainNet plain;
  auto adaptable = lora::make_adaptable(*plain, kConfig);
  lora::inject(*plain, kConfig);
  const auto ids = torch::randint(12, {2, 16});
  const auto before = adaptable.run([&] { return plain->forward(ids); }).detach();
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : trainable(*plain)) parameter.add_(0.5);
  }
  const auto after = adaptable.run([&] { return plain->forward(ids); }).detach();
  EXPECT_GT(max_abs_diff(before, after), 1e-3);
}

TEST_F(AdaptableTest, DropoutIsRefusedWhileTrainingAndFineInEvaluation) {
  PlainNet plain;
  auto adaptable = lora::make_adaptable(*plain, kConfig);
  lora::inject(*plain, LoraConfig(LoRAOptions(2).dropout(0.1)).target_modules({"fc1"}));
  const auto ids = torch::randint(12, {2, 16});
  plain->train();
  LORA_EXPECT_THROWS_WITH(adaptable.run([&] { return plain->forward(ids); }),
                          "adapter 'default' of 'fc1' has dropout 0.1, which a re-parametrised weight cannot apply");
  EXPECT_FALSE(adaptable.in_scope());
  plain->eval();
  EXPECT_NO_THROW(adaptable.run([&] { return plain->forward(ids); }));
}

TEST_F(AdaptableTest, AdaptersSavedFromThePlainModelLoadOntoTheDeclaredOne) {
  PlainNet plain;
  auto adaptable = lora::make_adaptable(*plain, kConfig);
  lora::inject(*plain, kConfig);
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : trainable(*plain)) parameter.copy_(torch::randn_like(parameter));
  }
  lora::io::save_adapter(*plain, kConfig, path("adapter"), "default");
  DeclaredNet declared;
  copy_base(plain, declared);  // the base weights under their plain names
  lora::io::load_adapter(*declared, path("adapter"));
  const auto ids = torch::randint(12, {3, 16});
  plain->eval();
  EXPECT_LT(max_abs_diff(adaptable.run([&] { return plain->forward(ids); }), declared->forward(ids)), 1e-5);
  // and back: a fresh plain model made adaptable loads the file.
  PlainNet again;
  {
    torch::NoGradGuard no_grad;
    auto source = lora::base_state_dict(*plain);
    for (auto& item : again->named_parameters()) item.value().copy_(source[item.key()]);
  }
  auto again_adaptable = lora::make_adaptable(*again, kConfig);
  lora::io::load_adapter(*again, path("adapter"));
  EXPECT_LT(max_abs_diff(again_adaptable.run([&] { return again->forward(ids); }), declared->forward(ids)), 1e-5);
}

TEST_F(AdaptableTest, MergeAndUnloadThenReleaseGivesThePlainModelTheMergedWeights) {
  PlainNet plain;
  const auto plain_names = names_of(*plain);
  auto adaptable = lora::make_adaptable(*plain, kConfig);
  lora::inject(*plain, kConfig);
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : trainable(*plain)) parameter.copy_(torch::randn_like(parameter));
  }
  const auto ids = torch::randint(12, {3, 16});
  const auto adapted = adaptable.run([&] { return plain->forward(ids); }).detach();
  LORA_EXPECT_THROWS_WITH(adaptable.release(), "'tokens' still has adapters (default)");
  lora::merge_and_unload(*plain);
  adaptable.release();
  EXPECT_TRUE(adaptable.targets().empty());
  EXPECT_EQ(names_of(*plain), plain_names);
  EXPECT_LT(max_abs_diff(plain->forward(ids), adapted), 1e-5);  // no scope needed any more
  EXPECT_LT(max_abs_diff(plain->fc1->weight, plain->named_parameters()["fc1.weight"]), 0.0 + 1e-12);
}

TEST_F(AdaptableTest, UnsupportedTargetsLeaveTheModelUnchanged) {
  PlainNet plain;
  const auto names = names_of(*plain);
  LORA_EXPECT_THROWS_WITH(lora::make_adaptable(*plain, LoraConfig(LoRAOptions(2)).target_modules({"fc1", "norm"})),
                          "lora::make_adaptable: module 'norm' (torch::nn::LayerNormImpl) matches the targets but is not "
                          "a torch::nn::Linear, Embedding, Conv1d or Conv2d");
  EXPECT_EQ(names_of(*plain), names);
  const auto ids = torch::randint(12, {2, 16});
  EXPECT_NO_THROW(plain->forward(ids));  // fc1 untouched: no scope needed
  LORA_EXPECT_THROWS_WITH(lora::make_adaptable(*plain, LoraConfig(LoRAOptions(2)).target_modules({"missing"})),
                          "lora::make_adaptable: no module matches the targets (missing)");
  // inject on a plain member says what to do.
  LORA_EXPECT_THROWS_WITH(lora::inject(*plain, LoraConfig(LoRAOptions(2)).target_modules({"conv"})),
                          "make it adaptable in place with lora::make_adaptable");
}

TEST_F(AdaptableTest, TheBaseFollowsTheModelThroughDtypeMoves) {
  PlainNet plain;
  auto adaptable = lora::make_adaptable(*plain, kConfig);
  lora::inject(*plain, kConfig);
  plain->to(torch::kDouble);
  const auto ids = torch::randint(12, {2, 16});
  const auto y = adaptable.run([&] { return plain->forward(ids); });
  EXPECT_EQ(y.scalar_type(), torch::kDouble);
}

TEST_F(AdaptableTest, SavedModulesOfAnyTypeBesideInPlaceAdapters) {
  // An Embedding and a LayerNorm trained in full (modules_to_save), fc1 adapted in place.
  PlainNet plain;
  const auto config = LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"fc1"}).modules_to_save({"tokens", "norm"});
  auto adaptable = lora::make_adaptable(*plain, config);
  EXPECT_EQ(adaptable.targets().size(), 1u);  // the saved modules are not re-parametrised
  lora::inject(*plain, config);
  const auto ids = torch::randint(12, {4, 16});
  const auto before = adaptable.run([&] { return plain->forward(ids); }).detach();
  torch::optim::SGD optimizer(trainable(*plain), torch::optim::SGDOptions(0.5));
  adaptable.run([&] { return plain->forward(ids); }).pow(2).sum().backward();
  optimizer.step();
  const auto after = adaptable.run([&] { return plain->forward(ids); }).detach();
  EXPECT_GT(max_abs_diff(before, after), 1e-4);
  lora::io::save_adapter(*plain, config, path("saved"), "default");
  const auto saved = lora::io::load_safetensors(path("saved") + "/adapter_model.safetensors").tensors;
  std::vector<std::string> keys;
  for (const auto& item : saved) keys.push_back(item.key());
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight",
                                            "base_model.model.norm.bias", "base_model.model.norm.weight",
                                            "base_model.model.tokens.weight"}));
  // A fresh copy of the pretrained model with the file computes the trained output.
  PlainNet fresh;
  {
    torch::NoGradGuard no_grad;
    auto source = lora::base_state_dict(*plain);
    for (auto& item : fresh->named_parameters()) item.value().copy_(source[item.key()]);
  }
  auto fresh_adaptable = lora::make_adaptable(*fresh, config);
  lora::io::load_adapter(*fresh, path("saved"));
  plain->eval();
  EXPECT_LT(max_abs_diff(fresh_adaptable.run([&] { return fresh->forward(ids); }),
                         adaptable.run([&] { return plain->forward(ids); })),
            1e-6);
}
