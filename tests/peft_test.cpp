#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <sys/wait.h>
#include <unistd.h>

#include <lora/io/peft.hpp>
#include <lora/io/peft_jit.hpp>
#include <lora/models/bert_checkpoint.hpp>

#include "test_helpers.hpp"
#include "tiny_bert.hpp"

namespace fs = std::filesystem;
using lora::LoraConfig;
using lora::LoRAOptions;
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

/// The config most tests save: `lora` with a base model name.
LoraConfig named(LoraConfig lora) { return lora.base_model_name_or_path("tiny"); }

/// Loads trainable (as a training run that resumes from the files would).
const lora::io::LoadOptions kTrainable{/*is_trainable=*/true};

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
  lora::inject(*model, named(lora));
  perturb_trainable(*model);
  lora::io::save_adapter(*model, path("adapter"));
  EXPECT_TRUE(fs::exists(path("adapter/adapter_config.json")));
  const auto file = lora::io::load_safetensors(path("adapter/adapter_model.safetensors"));
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_NE(file.tensors.find("base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector"), nullptr);
  EXPECT_EQ(file.tensors["base_model.model.pooler.dense.lora_A.weight"].size(0), 2);

  const auto report = lora::io::load_adapter(*twin, path("adapter")).report;
  EXPECT_EQ(report.saved_modules(), std::vector<std::string>{"classifier"});
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  EXPECT_TRUE(torch::equal(twin(x), model(x)));

  const auto config = lora::io::read_adapter_config(path("adapter"));
  EXPECT_EQ(config.adapter().r(), 4);
  EXPECT_TRUE(config.adapter().use_rslora());
  EXPECT_TRUE(config.adapter().use_dora());
  EXPECT_EQ(config.rank_pattern(), (lora::RankPattern{{"dense", 2}}));
  EXPECT_EQ(config.alpha_pattern(), (lora::AlphaPattern{{"value", 3.0}}));
  EXPECT_EQ(config.base_model_name_or_path(), "tiny");
}

TEST_F(PeftTest, NamedAdaptersLiveInSubFolders) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"});
  lora::inject(*model, lora, "sst2");
  perturb_trainable(*model);
  lora::io::save_adapter(*model, path("adapters"), "sst2");
  EXPECT_TRUE(fs::exists(path("adapters/sst2/adapter_model.safetensors")));
  EXPECT_FALSE(fs::exists(path("adapters/adapter_model.safetensors")));
  lora::io::load_adapter(*twin, path("adapters"), "sst2");
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  EXPECT_TRUE(torch::equal(twin(x), model(x)));
}

TEST_F(PeftTest, ConfigJsonHasExactlyThePeft010KeysEveryPeftReads) {
  auto config = named(LoraConfig(LoRAOptions(8).alpha(16)).target_modules({"query", "value"}).task_type("SEQ_CLS"));
  const auto json = lora::io::adapter_config_json(config);
  std::vector<std::string> keys;
  for (const auto& item : json.items()) keys.push_back(item.key());
  // PEFT 0.10.0's own file has exactly these 24 keys, sorted (no "peft_version": PEFT 0.10 to 0.13
  // raise TypeError on a key they do not know).
  EXPECT_EQ(keys, (std::vector<std::string>{"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias",
                                            "fan_in_fan_out", "inference_mode", "init_lora_weights",
                                            "layer_replication", "layers_pattern", "layers_to_transform",
                                            "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
                                            "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern",
                                            "revision", "target_modules", "task_type", "use_dora", "use_rslora"}));
  EXPECT_EQ(keys, lora::io::peft_0_10_keys());
  EXPECT_EQ(json["lora_alpha"].dump(), "16");
  EXPECT_EQ(json["init_lora_weights"], true);
  EXPECT_EQ(json["modules_to_save"], nullptr);
  EXPECT_EQ(json["task_type"], "SEQ_CLS");
  EXPECT_EQ(json["revision"], nullptr);
  config.adapter(LoRAOptions(8).alpha(2.5).init("pissa_niter_4"));
  EXPECT_EQ(lora::io::adapter_config_json(config)["lora_alpha"].dump(), "2.5");
  EXPECT_EQ(lora::io::adapter_config_json(config)["init_lora_weights"], "pissa_niter_4");
}

TEST_F(PeftTest, LaterKeysAreWrittenOnlyWhenNeededAndRefusedForAnOlderTarget) {
  auto config = LoraConfig(LoRAOptions(2)).target_modules({"query"}).exclude_modules({"encoder.layer.0.attention.self.query"});
  const auto json = lora::io::adapter_config_json(config);
  EXPECT_EQ(json.size(), lora::io::peft_0_10_keys().size() + 1);
  EXPECT_EQ(json["exclude_modules"], nlohmann::ordered_json({"encoder.layer.0.attention.self.query"}));
  lora::io::ConfigFormat old_peft;
  old_peft.min_peft_version = "0.10";
  LORA_EXPECT_THROWS_WITH(lora::io::adapter_config_json(config, old_peft),
                          "the adapter needs 'exclude_modules' = [\"encoder.layer.0.attention.self.query\"], which PEFT "
                          "reads from 0.14.0 on, but min_peft_version is 0.10.0");
  lora::io::ConfigFormat newer;
  newer.min_peft_version = "0.14.0";
  EXPECT_EQ(lora::io::adapter_config_json(config, newer), json);
  config.exclude_modules({});
  EXPECT_EQ(lora::io::adapter_config_json(config, old_peft).size(), lora::io::peft_0_10_keys().size());
  // Values, too: PiSSA came with PEFT 0.11, OLoRA with 0.12.
  config.adapter(LoRAOptions(2).init("pissa_niter_4"));
  LORA_EXPECT_THROWS_WITH(lora::io::adapter_config_json(config, old_peft),
                          "init_lora_weights \"pissa_niter_4\" needs PEFT 0.11.0 or later, but min_peft_version is 0.10.0");
  newer.min_peft_version = "0.11";
  EXPECT_NO_THROW(lora::io::adapter_config_json(config, newer));
  config.adapter(LoRAOptions(2).init("olora"));
  LORA_EXPECT_THROWS_WITH(lora::io::adapter_config_json(config, newer), "init_lora_weights \"olora\" needs PEFT 0.12.0");
  config.adapter(LoRAOptions(2));
  old_peft.min_peft_version = "0.9";
  LORA_EXPECT_THROWS_WITH(lora::io::adapter_config_json(config, old_peft), "min_peft_version 0.9 is older than 0.10.0");
  old_peft.min_peft_version = "ten";
  LORA_EXPECT_THROWS_WITH(lora::io::adapter_config_json(config, old_peft), "PEFT version 'ten' is not of the form");

  // Reading: later keys at their defaults are fine, unknown keys are ignored with a warning, a
  // later setting this library lacks is refused rather than silently dropped.
  auto base = nlohmann::ordered_json::parse(lora::io::adapter_config_json(config).dump());
  std::ostringstream warnings;
  auto with = [&](const char* key, const nlohmann::ordered_json& value) {
    auto edited = base;
    edited[key] = value;
    return lora::io::lora_config_from_json(edited, "cfg", &warnings);
  };
  EXPECT_NO_THROW(with("peft_version", "0.18.1"));
  EXPECT_NO_THROW(with("lora_bias", false));
  EXPECT_NO_THROW(with("trainable_token_indices", nullptr));
  EXPECT_EQ(with("exclude_modules", {"x"}).exclude_modules(), std::vector<std::string>{"x"});
  LORA_EXPECT_THROWS_WITH(with("lora_bias", true), "cfg: 'lora_bias' = true (PEFT 0.14.0) is not supported");
  LORA_EXPECT_THROWS_WITH(with("target_parameters", {"experts.weight"}), "'target_parameters' = [\"experts.weight\"]");
  LORA_EXPECT_THROWS_WITH(with("layer_replication", {{0, 2}}), "'layer_replication' = [[0,2]] is not supported");
  EXPECT_TRUE(warnings.str().empty()) << warnings.str();
  with("a_future_option", 1);
  EXPECT_NE(warnings.str().find("ignoring unknown key 'a_future_option'"), std::string::npos);
}

TEST_F(PeftTest, SavedConfigIsPeftsFileForTheSameAdapter) {
  if (shared_dir() == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the PEFT file comparison";
  // The config PEFT 0.10 wrote, read and written back: the same JSON, key for key and value for value.
  const fs::path golden = fs::path(shared_dir()) / "golden" / "tiny" / "adapter_r8_qv";
  const auto peft = read_json(golden / "adapter_config.json");
  const auto ours = nlohmann::json::parse(lora::io::adapter_config_json(lora::io::read_adapter_config(golden.string())).dump());
  EXPECT_EQ(ours, peft) << ours.dump(2);
  std::cout << "[golden] adapter_config.json written back: " << ours.size() << " keys, identical to PEFT 0.10's\n";
}

TEST_F(PeftTest, BadFilesAreRefusedAndTheModelIsLeftAlone) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query", "value"});
  lora::inject(*model, lora);
  perturb_trainable(*model);
  lora::io::save_adapter(*model, path("good"));
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
  auto load = [&](const std::string& dir) {
    return lora::io::load_adapter(*twin, dir, "default", {/*is_trainable=*/false, &warnings});
  };

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
  EXPECT_EQ(config.alpha_pattern(), (lora::AlphaPattern{{"query", 32.0}, {"layer.0.attention.self.query", 8.0}}));
  const lora::TargetMatcher matcher(config);
  EXPECT_DOUBLE_EQ(matcher.options_for("encoder.layer.0.attention.self.query").alpha(), 32.0);  // first match wins
  EXPECT_TRUE(matcher.is_excluded("encoder.layer.1.attention.self.query"));
  const auto json = lora::io::adapter_config_json(config);
  EXPECT_EQ(json["exclude_modules"], nlohmann::ordered_json({"encoder.layer.1.attention.self.query"}));
  EXPECT_EQ(json["alpha_pattern"].dump(), R"({"query":32.0,"layer.0.attention.self.query":8.0})");
}

TEST_F(PeftTest, PissaAdaptersAreNotLoadedOntoTheOriginalWeights) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(2).alpha(4).init("pissa")).target_modules({"query"});
  lora::inject(*model, lora);
  lora::io::save_adapter(*model, path("pissa"));
  LORA_EXPECT_THROWS_WITH(lora::io::load_adapter(*twin, path("pissa")),
                          "was initialised with 'pissa', which trains against a residual base weight");
  EXPECT_TRUE(lora::detail::all_adapter_names(*twin).empty());
}

TEST_F(PeftTest, AFailedSaveKeepsThePreviousAdapter) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"});
  lora::inject(*model, lora);
  lora::io::save_adapter(*model, path("kept"));
  const auto before = read_all(path("kept/adapter_model.safetensors"));
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, path("kept"), "missing"),
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
  lora::io::save_adapter(*native, path("native"));
  const auto x = torch::randn({3, 5, lora::testing::kHidden});
  const auto expected = native(x).detach();

  // native → TorchScript
  lora::unload(*native);
  auto scripted = lora::testing::scripted_twin(native);
  {
    auto frozen_twin = lora::testing::scripted_twin(native);
    auto frozen = lora::io::load_jit_adapter(frozen_twin, path("native"));  // for inference, as PEFT loads
    EXPECT_TRUE(frozen.parameters().empty());
    EXPECT_FALSE(frozen_twin.is_training());
    EXPECT_LT(max_abs_diff(frozen_twin.forward({x}).toTensor(), expected), 1e-5);
  }
  auto adapters = lora::io::load_jit_adapter(scripted, path("native"), "default", kTrainable);
  EXPECT_LT(max_abs_diff(scripted.forward({x}).toTensor(), expected), 1e-5);
  EXPECT_EQ(adapters.parameters().size(), 4u * 3u + 2u);

  // TorchScript → files → native
  lora::io::save_adapter(adapters, path("scripted"));
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
  const auto loaded = lora::io::load_adapter(*model, (golden / "adapter_r8_qv_init").string(), "default", kTrainable);
  const auto& report = loaded.report;
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

  // Save what we trained (the model remembers the config it loaded): exactly PEFT's keys, shapes,
  // dtypes, metadata and config.
  lora::io::save_adapter(*model, path("ours"));
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
  EXPECT_EQ(our_config, peft_config) << our_config.dump(2);  // the same key set, no extras, the same values
}

TEST_F(PeftTest, LoadedAdaptersAreFrozenForInferenceUnlessAskedAndSaveBackUnchanged) {
  auto [model, twin] = twins();
  lora::inject(*model, named(LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query", "value"}).task_type("SEQ_CLS")));
  perturb_trainable(*model);
  lora::io::save_adapter(*model, path("adapter"));
  const auto saved_config = read_all(path("adapter/adapter_config.json"));

  twin->train();
  const auto loaded = lora::io::load_adapter(*twin, path("adapter"));
  EXPECT_EQ(lora::count_parameters(*twin).trainable, 0) << "PEFT's from_pretrained loads for inference";
  EXPECT_FALSE(twin->is_training());
  EXPECT_EQ(loaded.config.task_type(), "SEQ_CLS");
  EXPECT_EQ(loaded.config.adapter().r(), 4);
  EXPECT_EQ(loaded.report.saved_modules(), std::vector<std::string>{"classifier"});
  // Still frozen after switching adapters around.
  lora::set_adapter(*twin, "default");
  EXPECT_EQ(lora::count_parameters(*twin).trainable, 0);
  const auto x = torch::randn({2, 4, lora::testing::kHidden});
  model->eval();
  EXPECT_TRUE(torch::equal(twin(x), model(x)));
  // The returned config is what the model remembers: saving needs no second read, and writes
  // the same file.
  lora::io::save_adapter(*twin, path("again"));
  EXPECT_EQ(read_all(path("again/adapter_config.json")), saved_config);
  EXPECT_EQ(read_all(path("again/adapter_model.safetensors")), read_all(path("adapter/adapter_model.safetensors")));

  // is_trainable: the adapter and the saved classifier train, as after inject.
  auto [fresh, unused] = twins();
  lora::io::load_adapter(*fresh, path("adapter"), "default", kTrainable);
  EXPECT_EQ(lora::count_parameters(*fresh).trainable, 4 * (4 * 16 + 16 * 4) + (2 * 16 + 2));
}

TEST_F(PeftTest, SavingRefusesAConfigThatDoesNotDescribeTheAdapter) {
  auto [model, twin] = twins();
  const auto lora = LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query", "value"}).rank_pattern({{"value", 2}});
  lora::inject(*model, lora);
  auto save_with = [&](const LoraConfig& config) { lora::io::save_adapter(*model, config, path("out")); };
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(LoRAOptions(8).alpha(8)).target_modules({"query", "value"}).rank_pattern({{"value", 2}})),
                          "module 'encoder.layer.0.attention.self.query': adapter 'default' has r=4 but the config gives r=8");
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(LoRAOptions(4).alpha(16)).target_modules({"query", "value"}).rank_pattern({{"value", 2}})),
                          "has lora_alpha=8 but the config gives lora_alpha=16");
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(LoRAOptions(4).alpha(8).use_rslora(true)).target_modules({"query", "value"}).rank_pattern({{"value", 2}})),
                          "has use_rslora=0 but the config gives use_rslora=1");
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query", "value"})),
                          "module 'encoder.layer.0.attention.self.value': adapter 'default' has r=2 but the config gives r=4");
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query"})),
                          "module 'encoder.layer.0.attention.self.value' holds adapter 'default' (LoRA) but the config does not select it");
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query", "value", "key"}).rank_pattern({{"value", 2}})),
                          "the config adapts module 'encoder.layer.0.attention.self.key' but it does not hold adapter 'default'");
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(LoRAOptions(4).alpha(8)).target_modules({"query", "value"}).rank_pattern({{"value", 2}}).modules_to_save({"classifier"})),
                          "the config saves module 'classifier' but it does not hold adapter 'default'");
  EXPECT_FALSE(fs::exists(path("out")));
  // A config that describes the adapter may change PEFT's bookkeeping fields.
  save_with(named(lora));
  EXPECT_EQ(lora::io::read_adapter_config(path("out")).base_model_name_or_path(), "tiny");

  // The remembered config is checked too: a layer changed by hand after inject is caught.
  model->named_modules()["encoder.layer.1.attention.self.query"]->as<lora::LoRALinearImpl<>>()->delete_adapter("default");
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, path("out2")),
                          "the config adapts module 'encoder.layer.1.attention.self.query' but it does not hold adapter");
  // The bias mode decides the biases in the file, and PiSSA the base weights: both must agree.
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(lora).bias(lora::BiasMode::kAll)),
                          "adapter 'default' was attached with bias 'none' but the config gives 'all'");
  LORA_EXPECT_THROWS_WITH(save_with(LoraConfig(lora).adapter(LoRAOptions(4).alpha(8).init("pissa"))),
                          "adapter 'default' was initialised with 'default' but the config says init_lora_weights 'pissa'");
  // A head-only adapter has no PEFT format.
  lora::add_modules_to_save(*twin, {"classifier"}, "head");
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*twin, path("head"), "head"), "has no low-rank part");
  // An adapter added to layers directly has no model-level config: saving asks for one.
  lora::LoRALinear<> layer(torch::nn::LinearOptions(4, 4), LoRAOptions(2));
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*layer, path("out3")),
                          "was not attached by lora::inject or load_adapter, so the model does not know its config");
}

TEST_F(PeftTest, TrainedBiasesAreSavedAndLoadedUnderPeftsKeys) {
  {
    auto [model, twin] = twins();
    lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"}).task_type("SEQ_CLS")
                             .bias(lora::BiasMode::kAll));
    perturb_trainable(*model);
    const auto state = lora::adapter_state_dict(*model);
    // bias="all": every bias, a LoRA layer's under base_layer (PEFT's name), the others under their own.
    EXPECT_NE(state.find("base_model.model.encoder.layer.0.attention.self.query.base_layer.bias"), nullptr);
    EXPECT_NE(state.find("base_model.model.encoder.layer.0.attention.self.key.bias"), nullptr);
    EXPECT_NE(state.find("base_model.model.encoder.layer.1.output.LayerNorm.bias"), nullptr);
    EXPECT_NE(state.find("base_model.model.pooler.dense.bias"), nullptr);
    EXPECT_NE(state.find("base_model.model.classifier.bias"), nullptr);  // the trained copy's
    for (const auto& item : state) {
      EXPECT_EQ(item.key().find("original_module"), std::string::npos) << item.key();
      EXPECT_EQ(item.key().find(".key.base_layer"), std::string::npos) << item.key();
    }
    // Per layer: query, key, value, attention.output.dense and LayerNorm, intermediate.dense,
    // output.dense and LayerNorm; then the pooler and the classifier's copy.
    int64_t biases = 0;
    for (const auto& item : state) biases += item.key().find("bias") != std::string::npos ? 1 : 0;
    EXPECT_EQ(biases, 2 * 8 + 1 + 1);
    lora::io::save_adapter(*model, path("all"));
    const auto file = lora::io::load_safetensors(path("all/adapter_model.safetensors")).tensors;
    EXPECT_EQ(file.size(), state.size());
    lora::io::load_adapter(*twin, path("all"));
    const auto x = torch::randn({2, 4, lora::testing::kHidden});
    model->eval();
    EXPECT_TRUE(torch::equal(twin(x), model(x))) << "the trained biases were not restored";
    // PEFT 0.10 also writes copies of the saved module's biases; they load (ignored, as PEFT does).
    auto peft_style = file;
    peft_style.insert("base_model.model.classifier.original_module.bias", torch::zeros({2}));
    peft_style.insert("base_model.model.classifier.modules_to_save.bias", torch::zeros({2}));
    fs::create_directories(path("peft-all"));
    fs::copy_file(path("all/adapter_config.json"), path("peft-all/adapter_config.json"));
    lora::io::save_safetensors(path("peft-all/adapter_model.safetensors"), peft_style, {{"format", "pt"}});
    auto [third, unused] = twins();
    lora::io::load_adapter(*third, path("peft-all"));
    EXPECT_TRUE(torch::equal(third(x), model(x)));
  }
  {
    auto [model, twin] = twins();
    lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"}).bias(lora::BiasMode::kLoraOnly));
    perturb_trainable(*model);
    std::vector<std::string> bias_keys;
    for (const auto& item : lora::adapter_state_dict(*model)) {
      if (item.key().find("bias") != std::string::npos) bias_keys.push_back(item.key());
    }
    EXPECT_EQ(bias_keys, (std::vector<std::string>{"base_model.model.encoder.layer.0.attention.self.query.base_layer.bias",
                                                   "base_model.model.encoder.layer.1.attention.self.query.base_layer.bias"}));
    lora::io::save_adapter(*model, path("lora_only"));
    lora::io::load_adapter(*twin, path("lora_only"));
    const auto x = torch::randn({2, 4, lora::testing::kHidden});
    model->eval();
    EXPECT_TRUE(torch::equal(twin(x), model(x)));
    // PEFT 0.10 drops lora_only biases from its files: such a file loads, the biases stay.
    auto without = lora::io::load_safetensors(path("lora_only/adapter_model.safetensors")).tensors;
    torch::OrderedDict<std::string, torch::Tensor> kept;
    for (const auto& item : without) {
      if (item.key().find("bias") == std::string::npos) kept.insert(item.key(), item.value());
    }
    lora::io::save_safetensors(path("lora_only/adapter_model.safetensors"), kept, {{"format", "pt"}});
    auto [third, unused] = twins();
    EXPECT_NO_THROW(lora::io::load_adapter(*third, path("lora_only")));
  }
}

TEST_F(PeftTest, AdapterFoldersAreReplacedAsAUnit) {
  auto [model, twin] = twins();
  lora::inject(*model, named(LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"})));
  lora::inject(*model, named(LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"value"})), "other");
  lora::io::save_adapter(*model, path("pair"), "other");  // pair/other/...
  lora::io::save_adapter(*model, path("pair"));
  std::ofstream(path("pair/README.md")) << "notes";
  const auto tensors_before = read_all(path("pair/adapter_model.safetensors"));
  const auto config_before = read_all(path("pair/adapter_config.json"));

  // A failure after the tensors are written (the config cannot be serialised: invalid UTF-8)
  // leaves the previous pair, and no temporary folder.
  perturb_trainable(*model);
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, named(LoraConfig(LoRAOptions(2).alpha(4)).target_modules({"query"}))
                                                                 .base_model_name_or_path("bad\xff"),
                                                 path("pair")),
                          "cannot write adapter_config.json");
  EXPECT_EQ(read_all(path("pair/adapter_model.safetensors")), tensors_before);
  EXPECT_EQ(read_all(path("pair/adapter_config.json")), config_before);
  for (const auto& entry : fs::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos) << entry.path();
  }

  // A process that dies after writing the new files but before the exchange leaves the old pair.
  const pid_t child = ::fork();
  if (child == 0) {
    lora::detail::replace_folder_atomically(path("pair"), [](const fs::path& folder) {
      std::ofstream(folder / "adapter_model.safetensors") << "new";
      std::ofstream(folder / "adapter_config.json") << "{}";
      ::_exit(0);  // killed before the rename
    }, "test");
    ::_exit(1);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(read_all(path("pair/adapter_model.safetensors")), tensors_before);
  EXPECT_EQ(read_all(path("pair/adapter_config.json")), config_before);
  auto temporaries = [&] {
    int count = 0;
    for (const auto& entry : fs::directory_iterator(dir_)) count += entry.path().filename().string().rfind(".pair.", 0) == 0;
    return count;
  };
  EXPECT_EQ(temporaries(), 1) << "the killed process left its temporary folder";

  // A successful save replaces both, keeps what else the folder held, and clears the dead
  // process's temporary folder.
  lora::io::save_adapter(*model, path("pair"));
  EXPECT_EQ(temporaries(), 0);
  EXPECT_NE(read_all(path("pair/adapter_model.safetensors")), tensors_before);
  EXPECT_EQ(read_all(path("pair/README.md")), "notes");
  EXPECT_TRUE(fs::exists(path("pair/other/adapter_model.safetensors")));
  lora::io::load_adapter(*twin, path("pair"));
  lora::io::load_adapter(*twin, path("pair"), "other");

  // Adapter names are folder names: a path is refused before anything is written.
  lora::inject(*model, LoraConfig(LoRAOptions(2)).target_modules({"key"}), "sub/x");
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, path("pair"), "sub/x"), "adapter name 'sub/x' cannot name a folder");
  LORA_EXPECT_THROWS_WITH(lora::io::load_adapter(*twin, path("pair"), "/etc"), "adapter name '/etc' cannot name a folder");
  // The working directory (or a folder above it) is never replaced.
  {
    const auto cwd = fs::current_path();
    fs::current_path(path("pair"));
    LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, "."), "it is the working directory or holds it");
    fs::current_path(cwd);
  }
  EXPECT_TRUE(fs::exists(path("pair/README.md")));
  // A symlinked adapter folder is followed: the link stays, the folder it names is replaced.
  fs::create_directory_symlink(path("pair"), path("link"));
  lora::io::save_adapter(*model, path("link"));
  EXPECT_TRUE(fs::is_symlink(path("link")));
  EXPECT_EQ(read_all(path("link/adapter_model.safetensors")), read_all(path("pair/adapter_model.safetensors")));
  // Saving below a plain file is a library error naming the folder, not a std::filesystem one.
  std::ofstream(path("plain")) << "x";
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, path("plain/adapter")), "cannot create folder");
}

TEST_F(PeftTest, PissaAdapterSavedAgainstItsInitialStateLoadsOntoTheOriginalModel) {
  auto [model, original] = twins();
  const auto config = LoraConfig(LoRAOptions(2).alpha(4).init("pissa")).target_modules({"query", "value"});
  lora::inject(*model, config);  // query/value weights are now residuals
  lora::io::save_adapter(*model, path("pissa-init"));
  perturb_trainable(*model);  // training
  lora::io::SaveOptions options;
  options.initial_adapter = path("pissa-init");
  lora::io::save_adapter(*model, path("as-lora"), "default", options);

  // PEFT's conversion: twice the rank and alpha (the same scale), a plain initialisation.
  const auto saved = lora::io::read_adapter_config(path("as-lora"));
  EXPECT_EQ(saved.adapter().r(), 4);
  EXPECT_EQ(saved.adapter().alpha(), 8.0);
  EXPECT_EQ(saved.adapter().init(), "default");
  EXPECT_EQ(lora::io::adapter_config_json(saved)["init_lora_weights"], true);
  const auto tensors = lora::io::load_safetensors(path("as-lora") + "/adapter_model.safetensors").tensors;
  const auto initial = lora::io::load_safetensors(path("pissa-init") + "/adapter_model.safetensors").tensors;
  const std::string A = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight";
  const std::string B = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight";
  EXPECT_EQ(tensors[A].sizes(), (std::vector<int64_t>{4, lora::testing::kHidden}));
  EXPECT_TRUE(torch::equal(tensors[A].slice(0, 2, 4), initial[A]));   // A' = [A; A₀]
  EXPECT_TRUE(torch::equal(tensors[B].slice(1, 2, 4), -initial[B]));  // B' = [B, −B₀]

  // The original (never decomposed) model with the converted adapter computes what the
  // trained residual model does.
  lora::io::load_adapter(*original, path("as-lora"));
  model->eval();
  const auto x = torch::randn({3, 6, lora::testing::kHidden});
  EXPECT_LT(max_abs_diff(original->forward(x), model->forward(x)), 1e-5);
}

TEST_F(PeftTest, PissaConversionRefusesAMismatchedInitialAdapter) {
  auto [model, other] = twins();
  lora::inject(*model, LoraConfig(LoRAOptions(2).alpha(4).init("olora")).target_modules({"query"}));
  lora::inject(*other, LoraConfig(LoRAOptions(3).alpha(4).init("olora")).target_modules({"query"}));
  lora::io::save_adapter(*other, path("other-init"));
  lora::io::SaveOptions options;
  options.initial_adapter = path("other-init");
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, path("out"), "default", options),
                          "the initial adapter in '" + path("other-init") + "' has r=3 but the trained one r=2");
  options.initial_adapter = path("missing");
  LORA_EXPECT_THROWS_WITH(lora::io::save_adapter(*model, path("out"), "default", options), "no initial adapter at");
  EXPECT_FALSE(fs::exists(path("out")));
}
