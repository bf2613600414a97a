#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <lora/io/peft.hpp>
#include <lora/io/peft_jit.hpp>
#include <lora/models/bert_checkpoint.hpp>

#include "test_helpers.hpp"
#include "tiny_bert.hpp"

namespace fs = std::filesystem;
using lora::LoraConfig;
using lora::LoRAOptions;
using lora::io::AdapterConfig;
using lora::testing::max_abs_diff;
using lora::testing::TinyBert;

namespace {

class PeftTest : public lora::testing::TempDirTest {
 protected:
  /// Two TinyBerts with the same base weights.
  static std::pair<TinyBert, TinyBert> twins() {
    torch::manual_seed(42);
    TinyBert a;
    torch::manual_seed(42);
    TinyBert b;
    return {a, b};
  }
};

void perturb_trainable(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& parameter : model.parameters()) {
    if (parameter.requires_grad()) parameter.add_(0.1 * torch::randn_like(parameter));
  }
}

AdapterConfig adapter_config(const LoraConfig& lora) {
  AdapterConfig config;
  config.lora = lora;
  config.base_model_name_or_path = "tiny";
  return config;
}

std::string read_all(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::vector<std::pair<std::string, bool>> flags(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, bool>> out;
  for (const auto& item : model.named_parameters()) out.emplace_back(item.key(), item.value().requires_grad());
  return out;
}

const char* shared_dir() { return std::getenv("LORA_SHARED_DIR"); }

nlohmann::json read_json(const fs::path& file) {
  std::ifstream in(file);
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_F(PeftTest, RoundTripsRsLoRADoRAAndRankPatterns) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(4).alpha(6).use_rslora(true).use_dora(true))
                        .target_modules({"query", "value", "dense"})
                        .rank_pattern({{"dense", 2}})
                        .alpha_pattern({{"value", 3}})
                        .modules_to_save({"classifier"});
  lora::inject(*model, lora);
  perturb_trainable(*model);
  lora::io::save_adapter(*model, adapter_config(lora), path("adapter"));
  EXPECT_TRUE(fs::exists(path("adapter/adapter_config.json")));
  const auto file = lora::io::load_safetensors(path("adapter/adapter_model.safetensors"));
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_NE(file.tensors.find("base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector"), nullptr);
  EXPECT_EQ(file.tensors["base_model.model.pooler.dense.lora_A.weight"].size(0), 2);

  const auto report = lora::io::load_adapter(*twin, path("adapter"));
  EXPECT_EQ(report.saved_modules(), std::vector<std::string>{"classifier"});
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  EXPECT_TRUE(torch::equal(twin(x), model(x)));

  const auto config = lora::io::read_adapter_config(path("adapter"));
  EXPECT_EQ(config.lora.adapter().r(), 4);
  EXPECT_TRUE(config.lora.adapter().use_rslora());
  EXPECT_TRUE(config.lora.adapter().use_dora());
  EXPECT_EQ(config.lora.rank_pattern(), (lora::RankPattern{{"dense", 2}}));
  EXPECT_EQ(config.lora.alpha_pattern(), (lora::AlphaPattern{{"value", 3.0}}));
  EXPECT_EQ(config.base_model_name_or_path, "tiny");
}

TEST_F(PeftTest, NamedAdaptersLiveInSubFolders) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"});
  lora::inject(*model, lora, "sst2");
  perturb_trainable(*model);
  lora::io::save_adapter(*model, adapter_config(lora), path("adapters"), "sst2");
  EXPECT_TRUE(fs::exists(path("adapters/sst2/adapter_model.safetensors")));
  EXPECT_FALSE(fs::exists(path("adapters/adapter_model.safetensors")));
  lora::io::load_adapter(*twin, path("adapters"), "sst2");
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  EXPECT_TRUE(torch::equal(twin(x), model(x)));
}

TEST_F(PeftTest, ConfigJsonHasPeftsKeysAndValues) {
  auto config = adapter_config(LoraConfig(LoRAOptions(8).alpha(16)).target_modules({"query", "value"}));
  const auto json = config.to_json();
  std::vector<std::string> keys;
  for (const auto& item : json.items()) keys.push_back(item.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias",
                                            "fan_in_fan_out", "inference_mode", "init_lora_weights",
                                            "layer_replication", "layers_pattern", "layers_to_transform",
                                            "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
                                            "megatron_core", "modules_to_save", "peft_type", "peft_version", "r",
                                            "rank_pattern", "revision", "target_modules", "task_type", "use_dora",
                                            "use_rslora"}));
  EXPECT_EQ(json["lora_alpha"].dump(), "16");
  EXPECT_EQ(json["init_lora_weights"], true);
  EXPECT_EQ(json["modules_to_save"], nullptr);
  config.lora.adapter(LoRAOptions(8).alpha(2.5).init("pissa_niter_4"));
  EXPECT_EQ(config.to_json()["lora_alpha"].dump(), "2.5");
  EXPECT_EQ(config.to_json()["init_lora_weights"], "pissa_niter_4");
}

TEST_F(PeftTest, BadFilesAreRefusedAndTheModelIsLeftAlone) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query", "value"});
  lora::inject(*model, lora);
  perturb_trainable(*model);
  lora::io::save_adapter(*model, adapter_config(lora), path("good"));
  const auto config_text = read_all(path("good/adapter_config.json"));
  const auto tensors = lora::io::load_safetensors(path("good/adapter_model.safetensors")).tensors;

  auto variant = [&](const std::string& name, const std::function<void(nlohmann::json&)>& edit_config,
                     const std::function<void(torch::OrderedDict<std::string, torch::Tensor>&)>& edit_tensors) {
    auto json = nlohmann::json::parse(config_text);
    edit_config(json);
    fs::create_directories(path(name));
    std::ofstream(path(name + "/adapter_config.json")) << json.dump();
    torch::OrderedDict<std::string, torch::Tensor> copy;
    for (const auto& item : tensors) copy.insert(item.key(), item.value());
    edit_tensors(copy);
    lora::io::save_safetensors(path(name + "/adapter_model.safetensors"), copy, {{"format", "pt"}});
    return path(name);
  };
  auto same = [](auto&) {};
  const auto before = flags(*twin);
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  const auto base_output = twin(x).detach();
  std::ostringstream warnings;
  auto load = [&](const std::string& dir) { return lora::io::load_adapter(*twin, dir, "default", &warnings); };

  LORA_EXPECT_THROWS_WITH(load(variant("ia3", [](auto& j) { j["peft_type"] = "IA3"; }, same)),
                          "unsupported peft_type \"IA3\" (only \"LORA\" is supported)");
  LORA_EXPECT_THROWS_WITH(load(variant("nopeft", [](auto& j) { j.erase("peft_type"); }, same)), "missing 'peft_type'");
  LORA_EXPECT_THROWS_WITH(load(variant("badr", [](auto& j) { j["r"] = "eight"; }, same)),
                          "'r' must be an integer (got \"eight\")");
  LORA_EXPECT_THROWS_WITH(load(variant("zeroalpha", [](auto& j) { j["lora_alpha"] = 0; }, same)),
                          "alpha must be finite and > 0 (got 0)");
  LORA_EXPECT_THROWS_WITH(load(variant("rank", [](auto& j) { j["r"] = 8; }, same)),
                          "'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight' in '");
  LORA_EXPECT_THROWS_WITH(load(variant("rank", [](auto& j) { j["r"] = 8; }, same)),
                          "has shape [4, 16], rank 4, but adapter_config.json gives module "
                          "'encoder.layer.0.attention.self.query' r=8");
  LORA_EXPECT_THROWS_WITH(
      load(variant("missing", same, [](auto& t) {
        torch::OrderedDict<std::string, torch::Tensor> kept;
        for (const auto& item : t) {
          if (item.key().find("layer.1.attention.self.value.lora_B") == std::string::npos) kept.insert(item.key(), item.value());
        }
        t = kept;
      })),
      "the adapter state lacks 1 tensor(s) of adapter 'default': "
      "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight");
  LORA_EXPECT_THROWS_WITH(
      load(variant("unknown", same,
                   [](auto& t) { t.insert("base_model.model.encoder.layer.7.attention.self.query.lora_A.weight", torch::zeros({4, 16})); })),
      "has 1 tensor(s) adapter 'default' does not: base_model.model.encoder.layer.7.attention.self.query.lora_A.weight");
  LORA_EXPECT_THROWS_WITH(
      load(variant("shape", same,
                   [](auto& t) { t["base_model.model.encoder.layer.0.attention.self.value.lora_B.weight"] = torch::zeros({8, 4}); })),
      "'base_model.model.encoder.layer.0.attention.self.value.lora_B.weight' has shape [8, 4] but adapter 'default' "
      "expects [16, 4]");
  LORA_EXPECT_THROWS_WITH(
      load(variant("prefix", same, [](auto& t) { t.insert("encoder.extra", torch::zeros({1})); })),
      "adapter tensor 'encoder.extra' in '");
  {
    fs::create_directories(path("json"));
    std::ofstream(path("json/adapter_config.json")) << "{\"peft_type\": ";
    LORA_EXPECT_THROWS_WITH(load(path("json")), "invalid JSON in '");
  }
  LORA_EXPECT_THROWS_WITH(load(path("nowhere")), "cannot open '");

  // After all those failures: no adapter, the same trainable flags, the same output.
  EXPECT_TRUE(lora::detail::all_adapter_names(*twin).empty());
  EXPECT_EQ(flags(*twin), before);
  EXPECT_TRUE(torch::equal(twin(x), base_output));

  // Unknown keys are tolerated with a warning.
  load(variant("newer", [](auto& j) { j["some_future_option"] = 1; }, same));
  EXPECT_NE(warnings.str().find("ignoring unknown key 'some_future_option'"), std::string::npos);
  EXPECT_TRUE(torch::equal(twin(x), model(x)));
}

TEST_F(PeftTest, PatternsKeepTheirFileOrderAndExclusionsRoundTrip) {
  fs::create_directories(path("ordered"));
  std::ofstream(path("ordered/adapter_config.json"))
      << R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"],
            "alpha_pattern": {"query": 32, "layer.0.attention.self.query": 8},
            "exclude_modules": ["encoder.layer.1.attention.self.query"]})";
  const auto config = lora::io::read_adapter_config(path("ordered"));
  EXPECT_EQ(config.lora.alpha_pattern(), (lora::AlphaPattern{{"query", 32.0}, {"layer.0.attention.self.query", 8.0}}));
  const lora::TargetMatcher matcher(config.lora);
  EXPECT_DOUBLE_EQ(matcher.options_for("encoder.layer.0.attention.self.query").alpha(), 32.0);  // first match wins
  EXPECT_TRUE(matcher.is_excluded("encoder.layer.1.attention.self.query"));
  const auto json = config.to_json();
  EXPECT_EQ(json["exclude_modules"], nlohmann::ordered_json({"encoder.layer.1.attention.self.query"}));
  EXPECT_EQ(json["alpha_pattern"].dump(), R"({"query":32.0,"layer.0.attention.self.query":8.0})");
}

TEST_F(PeftTest, PissaAdaptersAreNotLoadedOntoTheOriginalWeights) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(2).alpha(4).init("pissa")).target_modules({"query"});
  lora::inject(*model, lora);
  lora::io::save_adapter(*model, adapter_config(lora), path("pissa"));
  LORA_EXPECT_THROWS_WITH(lora::io::load_adapter(*twin, path("pissa")),
                          "was initialised with 'pissa', which trains against a residual base weight");
  EXPECT_TRUE(lora::detail::all_adapter_names(*twin).empty());
}

TEST_F(PeftTest, AFailedSaveKeepsThePreviousAdapter) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"});
  lora::inject(*model, lora);
  lora::io::save_adapter(*model, adapter_config(lora), path("kept"));
  const auto before = read_all(path("kept/adapter_model.safetensors"));
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, adapter_config(lora), path("kept"), "missing"),
                          "cannot save unknown adapter 'missing'");
  EXPECT_EQ(read_all(path("kept/adapter_model.safetensors")), before);
  EXPECT_FALSE(fs::exists(path("kept/missing")));
}

TEST_F(PeftTest, TorchScriptModulesSaveAndLoadTheSameFiles) {
  TinyBert native;
  const auto lora = LoraConfig(LoRAOptions(4).alpha(6).use_dora(true))
                        .target_modules({"query", "value"})
                        .rank_pattern({{"value", 2}})
                        .modules_to_save({"classifier"});
  lora::inject(*native, lora);
  perturb_trainable(*native);
  lora::io::save_adapter(*native, adapter_config(lora), path("native"));
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  const auto expected = native(x).detach();

  // native → TorchScript
  lora::unload(*native);
  auto scripted = lora::testing::scripted_twin(native);
  auto adapters = lora::io::load_jit_adapter(scripted, path("native"));
  EXPECT_LT(max_abs_diff(scripted.forward({x}).toTensor(), expected), 1e-5);
  EXPECT_EQ(adapters.parameters().size(), 4u * 3u + 2u);

  // TorchScript → files → native
  lora::io::save_adapter(adapters, adapter_config(lora), path("scripted"));
  const auto a = lora::io::load_safetensors(path("native/adapter_model.safetensors")).tensors;
  const auto b = lora::io::load_safetensors(path("scripted/adapter_model.safetensors")).tensors;
  ASSERT_EQ(a.size(), b.size());
  for (const auto& item : a) EXPECT_TRUE(torch::equal(item.value(), b[item.key()])) << item.key();
  lora::io::load_adapter(*native, path("scripted"));
  EXPECT_LT(max_abs_diff(native(x), expected), 1e-6);

  // A bad file changes nothing in a fresh scripted module.
  auto fresh = lora::testing::scripted_twin(native);
  const auto before = fresh.forward({x}).toTensor().detach();
  lora::JitAdapters empty(fresh);
  std::ofstream(path("scripted/adapter_config.json"), std::ios::trunc)
      << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 6, "use_dora": true, "target_modules": ["query", "value", "key"],
            "modules_to_save": ["classifier"], "task_type": "SEQ_CLS", "rank_pattern": {"value": 2}})";
  LORA_EXPECT_THROWS_WITH(lora::io::load_adapter(empty, path("scripted")),
                          "the adapter state lacks 6 tensor(s) of adapter 'default'");
  EXPECT_TRUE(empty.target_names().empty());
  for (const auto& item : fresh.named_parameters()) EXPECT_TRUE(item.value.is_leaf()) << item.name;
  EXPECT_TRUE(torch::equal(fresh.forward({x}).toTensor(), before));
}

TEST_F(PeftTest, LoadsPeftsAdapterAndReplaysItsTraining) {
  if (shared_dir() == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the PEFT training replay";
  const fs::path golden = fs::path(shared_dir()) / "golden" / "tiny";
  const auto log = read_json(golden / "adapter_r8_qv" / "peft_train.json");
  auto model = lora::models::load_bert_for_sequence_classification((golden / "model").string());
  const auto report = lora::io::load_adapter(*model, (golden / "adapter_r8_qv_init").string());
  EXPECT_EQ(report.adapted_modules().size(), 4u);
  EXPECT_EQ(report.saved_modules(), std::vector<std::string>{"classifier"});
  EXPECT_EQ(lora::count_parameters(*model).trainable, log["trainable_params"].get<int64_t>());
  EXPECT_EQ(lora::count_parameters(*model).total, log["all_params"].get<int64_t>());

  const auto& settings = log["optimizer"];
  std::vector<torch::Tensor> trainable;
  for (const auto& parameter : model->parameters()) {
    if (parameter.requires_grad()) trainable.push_back(parameter);
  }
  torch::optim::AdamW optimizer(
      trainable, torch::optim::AdamWOptions(settings["lr"].get<double>())
                     .betas({settings["betas"][0].get<double>(), settings["betas"][1].get<double>()})
                     .eps(settings["eps"].get<double>())
                     .weight_decay(settings["weight_decay"].get<double>()));
  model->train();
  double worst = 0;
  const auto& batches = log["train_batches"];
  for (size_t step = 0; step < batches.size(); ++step) {
    const auto& batch = batches[step];
    optimizer.zero_grad();
    const auto logits = model(lora::testing::json_tensor(batch["input_ids"], torch::kLong),
                              lora::testing::json_tensor(batch["attention_mask"], torch::kLong),
                              lora::testing::json_tensor(batch["token_type_ids"], torch::kLong));
    const auto loss = torch::nn::functional::cross_entropy(logits, lora::testing::json_tensor(batch["labels"], torch::kLong));
    loss.backward();
    optimizer.step();
    const double error = std::abs(loss.item<double>() - log["losses"][step].get<double>());
    worst = std::max(worst, error);
    EXPECT_LT(error, 1e-4) << "step " << step;
  }
  std::cout << "[golden] replayed " << batches.size() << " PEFT steps: max |loss - PEFT| = " << worst << "\n";
  model->eval();
  {
    torch::NoGradGuard no_grad;
    const auto& eval = log["eval_batch"];
    const auto logits = model(lora::testing::json_tensor(eval["input_ids"], torch::kLong), lora::testing::json_tensor(eval["attention_mask"], torch::kLong),
                              lora::testing::json_tensor(eval["token_type_ids"], torch::kLong));
    const double error = max_abs_diff(logits, lora::testing::json_tensor(log["eval_logits"], torch::kDouble));
    EXPECT_LT(error, 1e-4);
    std::cout << "[golden] eval logits after training: max |logits - PEFT| = " << error << "\n";
  }

  // Save what we trained: exactly PEFT's keys, shapes, dtypes, metadata and config fields.
  auto config = lora::io::read_adapter_config((golden / "adapter_r8_qv_init").string());
  lora::io::save_adapter(*model, config, path("ours"));
  const auto ours = lora::io::load_safetensors(path("ours/adapter_model.safetensors"));
  const auto peft = lora::io::load_safetensors((golden / "adapter_r8_qv" / "adapter_model.safetensors").string());
  EXPECT_EQ(ours.metadata, peft.metadata);
  auto sorted_keys = [](const lora::io::Safetensors& file) {
    auto keys = file.tensors.keys();
    std::sort(keys.begin(), keys.end());
    return keys;
  };
  ASSERT_EQ(sorted_keys(ours), sorted_keys(peft));
  double tensor_error = 0;
  for (const auto& item : peft.tensors) {
    const auto& mine = ours.tensors[item.key()];
    EXPECT_EQ(mine.sizes(), item.value().sizes()) << item.key();
    EXPECT_EQ(mine.scalar_type(), item.value().scalar_type()) << item.key();
    tensor_error = std::max(tensor_error, max_abs_diff(mine, item.value()));
  }
  EXPECT_LT(tensor_error, 1e-4);
  std::cout << "[golden] trained adapter tensors: max |ours - PEFT| = " << tensor_error << "\n";
  const auto our_config = read_json(path("ours/adapter_config.json"));
  const auto peft_config = read_json(golden / "adapter_r8_qv" / "adapter_config.json");
  for (const auto& [key, value] : peft_config.items()) {
    ASSERT_TRUE(our_config.contains(key)) << key;
    if (key == "target_modules") {
      auto a = value.get<std::vector<std::string>>(), b = our_config[key].get<std::vector<std::string>>();
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      EXPECT_EQ(a, b);
    } else {
      EXPECT_EQ(our_config[key], value) << key;
    }
  }
}
