#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <lora/models/bert_checkpoint.hpp>
#include <lora/models/bert_torchscript.hpp>

#include "test_helpers.hpp"

namespace fs = std::filesystem;
using lora::models::BertConfig;
using lora::models::BertForSequenceClassification;
using lora::testing::max_abs_diff;

namespace {

BertConfig tiny_config() {
  BertConfig config;
  config.vocab_size = 50;
  config.hidden_size = 16;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 2;
  config.intermediate_size = 32;
  config.max_position_embeddings = 12;
  config.hidden_dropout_prob = 0.0;
  config.attention_probs_dropout_prob = 0.0;
  return config;
}

class BertTest : public lora::testing::TempDirTest {
 protected:
  BertForSequenceClassification random_model() {
    BertForSequenceClassification model(tiny_config());
    lora::models::init_bert_weights(*model);
    model->eval();
    return model;
  }
};

std::vector<std::string> hf_keys(int64_t layers) {
  std::vector<std::string> keys = {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                                   "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                                   "bert.embeddings.LayerNorm.bias"};
  for (int64_t i = 0; i < layers; ++i) {
    const auto p = "bert.encoder.layer." + std::to_string(i) + ".";
    for (const auto* name : {"attention.self.query", "attention.self.key", "attention.self.value",
                             "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                             "output.dense", "output.LayerNorm"}) {
      keys.push_back(p + name + ".weight");
      keys.push_back(p + name + ".bias");
    }
  }
  for (const auto* name : {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}) {
    keys.push_back(name);
  }
  return keys;
}

torch::Tensor tokens() { return torch::tensor({{2, 7, 9, 11, 3, 0}, {2, 5, 3, 0, 0, 0}}, torch::kLong); }
torch::Tensor mask() { return torch::tensor({{1, 1, 1, 1, 1, 0}, {1, 1, 1, 0, 0, 0}}, torch::kLong); }

const char* shared_dir() { return std::getenv("LORA_SHARED_DIR"); }

nlohmann::json read_json(const fs::path& file) {
  std::ifstream in(file);
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_F(BertTest, ConfigReadsTransformersJsonAndRejectsBadFields) {
  const auto json = nlohmann::json::parse(R"({"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 3,
      "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu", "classifier_dropout": null,
      "layer_norm_eps": 1e-12, "id2label": {"0": "negative", "1": "positive", "2": "neutral"}})");
  const auto config = BertConfig::from_json(json);
  EXPECT_EQ(config.hidden_size, 32);
  EXPECT_EQ(config.num_labels, 3);
  EXPECT_EQ(config.id2label.at(2), "neutral");
  EXPECT_FALSE(config.classifier_dropout.has_value());
  const auto again = BertConfig::from_json(nlohmann::json::parse(config.to_json().dump()));
  EXPECT_EQ(again.num_labels, 3);
  EXPECT_EQ(again.intermediate_size, 64);
  EXPECT_EQ(again.id2label, config.id2label);

  auto with = [&](const std::string& key, const nlohmann::json& value) {
    auto copy = json;
    copy[key] = value;
    return copy;
  };
  auto without = [&](const std::string& key) {
    auto copy = json;
    copy.erase(key);
    return copy;
  };
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(without("hidden_size")), "config.json: missing 'hidden_size'");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(with("num_attention_heads", 5)),
                          "hidden_size 32 is not a multiple of num_attention_heads 5");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(with("hidden_act", "swish")), "unsupported hidden_act 'swish'");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(with("hidden_size", "32")), "'hidden_size' must be an integer (got \"32\")");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(with("num_hidden_layers", 0)), "num_hidden_layers must be > 0 (got 0)");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(with("hidden_dropout_prob", 1.5)),
                          "hidden_dropout_prob must be in [0, 1) (got 1.5)");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(with("position_embedding_type", "relative_key")),
                          "only position_embedding_type 'absolute' is supported");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(with("id2label", nlohmann::json{{"x", "a"}})),
                          "id2label key 'x' is not an integer");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_json(with("pad_token_id", 100)), "pad_token_id 100 is outside the vocabulary");
  LORA_EXPECT_THROWS_WITH(BertConfig::from_file(path("nope.json")), "cannot open");
}

TEST_F(BertTest, ParameterNamesAreTransformersNames) {
  auto model = random_model();
  EXPECT_EQ(lora::base_state_dict(*model).keys(), hf_keys(2));
  // Every projection is adaptable in place.
  EXPECT_EQ(lora::lora_layers(*model).size(), 2u * 6u + 2u);
}

TEST_F(BertTest, SaveAndLoadRoundTripBitForBit) {
  auto model = random_model();
  lora::models::save_bert(*model, path("model"));
  EXPECT_TRUE(fs::exists(path("model/config.json")));
  const auto file = lora::io::load_safetensors(path("model/model.safetensors"));
  EXPECT_EQ(file.metadata.at("format"), "pt");
  EXPECT_EQ(file.tensors.size(), hf_keys(2).size());

  std::ostringstream log;
  auto loaded = lora::models::load_bert_for_sequence_classification(path("model"), {true, &log});
  loaded->eval();
  EXPECT_EQ(log.str(), "");
  const auto original = lora::base_state_dict(*model);
  for (const auto& item : lora::base_state_dict(*loaded)) {
    EXPECT_TRUE(torch::equal(item.value(), original[item.key()])) << item.key();
  }
  EXPECT_TRUE(torch::equal(loaded(tokens(), mask()), model(tokens(), mask())));
}

TEST_F(BertTest, PaddingDoesNotChangeTheRealTokens) {
  auto model = random_model();
  const auto padded = model(tokens(), mask());
  const auto first = model(torch::tensor({{2, 7, 9, 11, 3}}, torch::kLong));
  const auto second = model(torch::tensor({{2, 5, 3}}, torch::kLong));
  EXPECT_LT(max_abs_diff(padded[0], first[0]), 1e-6);
  EXPECT_LT(max_abs_diff(padded[1], second[0]), 1e-6);
  // token_type_ids default to 0.
  EXPECT_TRUE(torch::equal(model(tokens(), mask()), model(tokens(), mask(), torch::zeros({2, 6}, torch::kLong))));
}

TEST_F(BertTest, LoadToleratesBertModelCheckpointsOldNamesAndPretrainingHeads) {
  auto model = random_model();
  torch::OrderedDict<std::string, torch::Tensor> plain;  // a BertModel checkpoint, 2019 style
  for (const auto& item : lora::base_state_dict(*model)) {
    if (item.key().rfind("classifier.", 0) == 0) continue;
    auto key = item.key().substr(5);  // drop "bert."
    if (key.size() > 16 && key.compare(key.size() - 16, 16, "LayerNorm.weight") == 0) {
      key = key.substr(0, key.size() - 6) + "gamma";
    }
    plain.insert(key, item.value());
  }
  plain.insert("cls.predictions.bias", torch::zeros({50}));
  plain.insert("embeddings.position_ids", torch::arange(12).unsqueeze(0));
  BertForSequenceClassification fresh(tiny_config());
  std::ostringstream log;
  const auto report = lora::models::load_bert_state(*fresh, plain, {true, &log, /*init_missing_classifier=*/true}, "plain");
  EXPECT_EQ(report.initialized, (std::vector<std::string>{"classifier.weight", "classifier.bias"}));
  EXPECT_EQ(report.ignored, (std::vector<std::string>{"cls.predictions.bias", "embeddings.position_ids"}));
  EXPECT_NE(log.str().find("plain has no classification head; initialised classifier.weight, classifier.bias"), std::string::npos);
  fresh->eval();
  EXPECT_TRUE(torch::equal(fresh->bert->forward(tokens(), mask()).last_hidden_state,
                           model->bert->forward(tokens(), mask()).last_hidden_state));
}

TEST_F(BertTest, StrictLoadNamesMissingUnexpectedAndMisshapenKeys) {
  auto model = random_model();
  const auto state = lora::base_state_dict(*model);
  auto edited = [&](const std::string& drop, const std::string& add, torch::Tensor replacement = {}) {
    torch::OrderedDict<std::string, torch::Tensor> copy;
    for (const auto& item : state) {
      if (item.key() == drop) continue;
      copy.insert(item.key(), replacement.defined() && item.key() == add ? replacement : item.value());
    }
    if (!add.empty() && !copy.contains(add)) copy.insert(add, torch::zeros({1}));
    return copy;
  };
  BertForSequenceClassification fresh(tiny_config());
  const auto before = fresh->bert->embeddings->word_embeddings->weight.detach().clone();
  LORA_EXPECT_THROWS_WITH(lora::models::load_bert_state(*fresh, edited("bert.pooler.dense.bias", ""), {}, "c"),
                          "BERT checkpoint c lacks 1 tensor(s): bert.pooler.dense.bias");
  LORA_EXPECT_THROWS_WITH(lora::models::load_bert_state(*fresh, edited("", "bert.extra.weight"), {}, "c"),
                          "BERT checkpoint c has 1 tensor(s) this model does not: bert.extra.weight");
  LORA_EXPECT_THROWS_WITH(
      lora::models::load_bert_state(*fresh, edited("", "bert.pooler.dense.weight", torch::zeros({16, 8})), {}, "c"),
      "'bert.pooler.dense.weight' has shape [16, 8] but the model expects [16, 16]");
  EXPECT_TRUE(torch::equal(fresh->bert->embeddings->word_embeddings->weight, before)) << "a failed load copied";
  lora::models::LoadOptions lenient;
  lenient.strict = false;
  lenient.log = nullptr;
  EXPECT_NO_THROW(lora::models::load_bert_state(*fresh, edited("bert.pooler.dense.bias", "bert.extra.weight"), lenient));
}

TEST_F(BertTest, NonStrictPartialLoadLeavesWhatTheCheckpointLacks) {
  // A checkpoint of the encoder only, loaded non-strictly into a model whose classifier is trained.
  auto source = random_model();
  auto model = random_model();
  torch::OrderedDict<std::string, torch::Tensor> encoder;
  for (const auto& item : lora::base_state_dict(*source)) {
    if (item.key().rfind("bert.encoder.", 0) == 0) encoder.insert(item.key(), item.value());
  }
  const auto classifier = model->classifier->base_weight().detach().clone();
  const auto pooler = model->bert->pooler->dense->base_weight().detach().clone();
  lora::models::LoadOptions lenient;
  lenient.strict = false;
  lenient.log = nullptr;
  const auto report = lora::models::load_bert_state(*model, encoder, lenient);
  EXPECT_TRUE(torch::equal(model->classifier->base_weight(), classifier)) << "the classifier was re-initialised";
  EXPECT_TRUE(torch::equal(model->bert->pooler->dense->base_weight(), pooler));
  EXPECT_TRUE(report.initialized.empty());
  EXPECT_NE(std::find(report.kept.begin(), report.kept.end(), "classifier.weight"), report.kept.end());
  EXPECT_NE(std::find(report.kept.begin(), report.kept.end(), "bert.pooler.dense.bias"), report.kept.end());
  EXPECT_TRUE(torch::equal(model->bert->layers[0]->as<lora::models::BertLayerImpl>()->output->dense->base_weight(),
                           source->bert->layers[0]->as<lora::models::BertLayerImpl>()->output->dense->base_weight()));
}

TEST_F(BertTest, FilesystemAndJsonFailuresAreLibraryErrors) {
  // A shard index whose map holds a number: nlohmann would throw its own type_error.
  fs::create_directories(path("sharded"));
  lora::models::save_bert(*random_model(), path("sharded"));
  fs::remove(path("sharded/model.safetensors"));
  std::ofstream(path("sharded/model.safetensors.index.json")) << R"({"weight_map": {"classifier.weight": 7}})";
  LORA_EXPECT_THROWS_WITH(lora::models::load_bert_for_sequence_classification(path("sharded")),
                          "maps 'classifier.weight' to 7, not a file name");
  // Saving below a plain file: std::filesystem would throw filesystem_error.
  std::ofstream(path("plain-file")) << "x";
  LORA_EXPECT_THROWS_WITH(lora::models::save_bert(*random_model(), path("plain-file/model")), "save_bert: cannot create folder");
  // A vocabulary that does not exist: the folder is not written at all.
  LORA_EXPECT_THROWS_WITH(lora::models::save_bert(*random_model(), path("novocab"), path("missing-vocab.txt")),
                          "save_bert: cannot copy");
  EXPECT_FALSE(fs::exists(path("novocab")));
}

TEST_F(BertTest, FolderErrors) {
  LORA_EXPECT_THROWS_WITH(lora::models::load_bert_for_sequence_classification(path("missing")), "has no config.json");
  fs::create_directories(path("bin"));
  lora::models::save_bert(*random_model(), path("bin"));
  fs::remove(path("bin/model.safetensors"));
  std::ofstream(path("bin/pytorch_model.bin")) << "pickle";
  LORA_EXPECT_THROWS_WITH(lora::models::load_bert_for_sequence_classification(path("bin")),
                          "has only pytorch_model.bin, which LibTorch cannot read");
  LORA_EXPECT_THROWS_WITH(lora::models::load_bert_for_sequence_classification(path("bin")), "save_file(");
  fs::remove(path("bin/pytorch_model.bin"));
  LORA_EXPECT_THROWS_WITH(lora::models::load_bert_for_sequence_classification(path("bin")), "has no model.safetensors");
}

TEST_F(BertTest, SaveRefusesUnmergedAdaptersAndSavesMergedOnes) {
  auto model = random_model();
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(2).alpha(4)).target_modules({"query", "value"}));
  {
    torch::NoGradGuard no_grad;
    for (auto& parameter : model->parameters()) {
      if (parameter.requires_grad()) parameter.add_(0.05 * torch::randn_like(parameter));
    }
  }
  LORA_EXPECT_THROWS_WITH(lora::models::save_bert(*model, path("adapted")),
                          "layer 'bert.encoder.layer.0.attention.self.query' has unmerged adapter 'default'");
  const auto adapted = model(tokens(), mask()).detach();
  lora::merge_and_unload(*model);
  lora::models::save_bert(*model, path("merged"));
  auto reloaded = lora::models::load_bert_for_sequence_classification(path("merged"));
  reloaded->eval();
  EXPECT_LT(max_abs_diff(reloaded(tokens(), mask()), adapted), 1e-5);
}

TEST_F(BertTest, ImportsWeightsFromATorchScriptModuleByName) {
  auto model = random_model();
  torch::jit::Module scripted("BertForSequenceClassification");
  for (const auto& item : lora::base_state_dict(*model)) {  // nested submodules named like transformers'
    auto node = scripted;
    std::string key = item.key();
    size_t dot;
    while ((dot = key.find('.')) != std::string::npos) {
      const auto part = key.substr(0, dot);
      if (!node.hasattr(part)) node.register_module(part, torch::jit::Module("Sub" + std::to_string(key.size())));
      node = node.attr(part).toModule();
      key = key.substr(dot + 1);
    }
    node.register_parameter(key, item.value().detach().clone(), false);
  }
  BertForSequenceClassification fresh(tiny_config());
  lora::models::load_bert_state_from_torchscript(*fresh, scripted);
  fresh->eval();
  EXPECT_TRUE(torch::equal(fresh(tokens(), mask()), model(tokens(), mask())));
}

TEST_F(BertTest, MatchesTransformersOnTheGoldenCheckpoint) {
  if (shared_dir() == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the Hugging Face parity test";
  const fs::path golden = fs::path(shared_dir()) / "golden" / "tiny";
  std::ostringstream log;
  auto model = lora::models::load_bert_for_sequence_classification((golden / "model").string(), {true, &log});
  model->eval();
  EXPECT_EQ(model->config.hidden_size, 128);
  const auto ids = read_json(golden / "ids.json");
  const auto expected = read_json(golden / "logits.json");
  ASSERT_EQ(ids["batches"].size(), expected["batches"].size());
  torch::NoGradGuard no_grad;
  for (size_t b = 0; b < ids["batches"].size(); ++b) {
    const auto& batch = ids["batches"][b];
    const auto input_ids = lora::testing::json_tensor(batch["input_ids"], torch::kLong);
    const auto attention = lora::testing::json_tensor(batch["attention_mask"], torch::kLong);
    const auto types = lora::testing::json_tensor(batch["token_type_ids"], torch::kLong);
    const auto out = model->bert->forward(input_ids, attention, types, /*output_hidden_states=*/true);
    const auto logits = model->classifier(model->dropout(out.pooler_output));
    const auto& want = expected["batches"][b];
    const double logit_error = max_abs_diff(logits, lora::testing::json_tensor(want["logits"], torch::kDouble));
    EXPECT_LT(logit_error, 1e-5) << "batch " << b;
    std::cout << "[golden] batch " << b << ": max |logits - transformers| = " << logit_error
              << ", last hidden state " << max_abs_diff(out.last_hidden_state, lora::testing::json_tensor(want["last_hidden_state"], torch::kDouble))
              << "\n";
    EXPECT_LT(max_abs_diff(out.last_hidden_state, lora::testing::json_tensor(want["last_hidden_state"], torch::kDouble)), 1e-5);
    ASSERT_EQ(out.hidden_states.size(), want["hidden_states"].size());
    for (size_t i = 0; i < out.hidden_states.size(); ++i) {
      EXPECT_LT(max_abs_diff(out.hidden_states[i], lora::testing::json_tensor(want["hidden_states"][i], torch::kDouble)), 1e-5)
          << "batch " << b << ", hidden state " << i;
    }
  }
}

TEST_F(BertTest, PeftAdapterMatchesPeftLogitsUnmergedAndMerged) {
  if (shared_dir() == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the PEFT parity test";
  const fs::path golden = fs::path(shared_dir()) / "golden" / "tiny";
  auto model = lora::models::load_bert_for_sequence_classification((golden / "model").string());
  model->eval();
  // adapter_config.json: r 8, lora_alpha 16, target_modules query/value, SEQ_CLS saves the classifier.
  lora::inject(*model, lora::LoraConfig(lora::LoRAOptions(8).alpha(16))
                           .target_modules({"query", "value"})
                           .modules_to_save({"classifier"}));
  const auto adapter = lora::io::load_safetensors((golden / "adapter_r8_qv" / "adapter_model.safetensors").string());
  EXPECT_EQ(adapter.metadata.at("format"), "pt");
  lora::load_adapter_state_dict(*model, adapter.tensors);

  const auto ids = read_json(golden / "ids.json");
  const auto expected = read_json(golden / "adapter_r8_qv_apply.json");
  torch::NoGradGuard no_grad;
  auto logits_of = [&](size_t b) {
    const auto& batch = ids["batches"][b];
    return model(lora::testing::json_tensor(batch["input_ids"], torch::kLong), lora::testing::json_tensor(batch["attention_mask"], torch::kLong),
                 lora::testing::json_tensor(batch["token_type_ids"], torch::kLong));
  };
  for (size_t b = 0; b < ids["batches"].size(); ++b) {
    const double error = max_abs_diff(logits_of(b), lora::testing::json_tensor(expected["adapter_logits"][b], torch::kDouble));
    EXPECT_LT(error, 1e-5) << "batch " << b;
    std::cout << "[golden] adapter batch " << b << ": max |logits - PEFT| = " << error << "\n";
  }
  lora::merge(*model);
  for (size_t b = 0; b < ids["batches"].size(); ++b) {
    const double error = max_abs_diff(logits_of(b), lora::testing::json_tensor(expected["merged_logits"][b], torch::kDouble));
    EXPECT_LT(error, 1e-5) << "batch " << b;
    std::cout << "[golden] merged batch " << b << ": max |logits - PEFT| = " << error << "\n";
  }
  lora::enable_adapters(*model, false);
  for (size_t b = 0; b < ids["batches"].size(); ++b) {
    EXPECT_LT(max_abs_diff(logits_of(b), lora::testing::json_tensor(expected["base_logits"][b], torch::kDouble)), 1e-5);
  }
}
