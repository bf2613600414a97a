// DistilBERT and RoBERTa: the models on generated fixtures (padding, positions, adapters, folders,
// PEFT files) and, with LORA_SHARED_DIR, against transformers' and PEFT's reference files.

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <lora/io/peft.hpp>
#include <lora/models/auto.hpp>

#include "test_helpers.hpp"

namespace fs = std::filesystem;
using lora::testing::max_abs_diff;
using lora::testing::json_tensor;
using namespace lora::models;

namespace {

const char* shared_dir() { return std::getenv("LORA_SHARED_DIR"); }

nlohmann::json read_json(const fs::path& file) {
  std::ifstream in(file);
  return nlohmann::json::parse(in);
}

DistilBertConfig tiny_distilbert() {
  DistilBertConfig config;
  config.vocab_size = 50;
  config.dim = 16;
  config.n_layers = 2;
  config.n_heads = 2;
  config.hidden_dim = 32;
  config.max_position_embeddings = 20;
  config.dropout = config.attention_dropout = config.seq_classif_dropout = 0.0;
  return config;
}

RobertaConfig tiny_roberta() {
  RobertaConfig config;
  config.vocab_size = 40;
  config.hidden_size = 16;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 2;
  config.intermediate_size = 32;
  config.max_position_embeddings = 22;
  config.type_vocab_size = 1;
  config.layer_norm_eps = 1e-5;
  config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0;
  return config;
}

SequenceClassifier random_distilbert() {
  DistilBertForSequenceClassification model(tiny_distilbert());
  init_distilbert_weights(*model);
  model->eval();
  return SequenceClassifier(model);
}

SequenceClassifier random_roberta() {
  RobertaForSequenceClassification model(tiny_roberta());
  init_encoder_weights(*model);
  model->eval();
  return SequenceClassifier(model);
}

/// Rows of different lengths, right-padded with `pad`; row 0 is full.
lora::tokenizers::BatchEncoding padded_rows(int64_t bos, int64_t eos, int64_t pad, int64_t vocab) {
  std::vector<lora::tokenizers::Encoding> rows;
  for (const int64_t length : {9, 4, 6}) {
    lora::tokenizers::Encoding row;
    row.input_ids.push_back(bos);
    for (int64_t i = 0; i < length - 2; ++i) row.input_ids.push_back(4 + (7 * i + length) % (vocab - 4));
    row.input_ids.push_back(eos);
    row.token_type_ids.assign(row.input_ids.size(), 0);
    row.attention_mask.assign(row.input_ids.size(), 1);
    rows.push_back(row);
  }
  return lora::tokenizers::pad_encodings(rows, pad);
}

/// Each row alone (no padding) gives the logits it gets inside the padded batch.
void expect_padding_invariant(const SequenceClassifier& model, const lora::tokenizers::BatchEncoding& batch) {
  torch::NoGradGuard no_grad;
  const auto together = model.forward(batch);
  for (int64_t r = 0; r < batch.input_ids.size(0); ++r) {
    const auto length = batch.attention_mask[r].sum().item<int64_t>();
    const auto ids = batch.input_ids[r].slice(0, 0, length).unsqueeze(0);
    const auto alone = model.forward(ids, torch::ones_like(ids));
    EXPECT_LT(max_abs_diff(alone[0], together[r]), 1e-6) << model.model_type() << " row " << r;
  }
}

std::vector<std::string> sorted_keys(const lora::io::Safetensors& file) {
  auto keys = file.tensors.keys();
  std::sort(keys.begin(), keys.end());
  return keys;
}

class FamiliesTest : public lora::testing::TempDirTest {};

}  // namespace

TEST_F(FamiliesTest, PaddedRowsGiveTheLogitsTheyGetAlone) {
  const auto distilbert = random_distilbert();
  expect_padding_invariant(distilbert, padded_rows(1, 2, 0, 50));
  const auto roberta = random_roberta();
  expect_padding_invariant(roberta, padded_rows(0, 2, 1, 40));
  // DistilBERT takes no token types: passing some changes nothing.
  const auto batch = padded_rows(1, 2, 0, 50);
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(distilbert.forward(batch.input_ids, batch.attention_mask, torch::ones_like(batch.input_ids)),
                           distilbert.forward(batch.input_ids, batch.attention_mask)));
}

TEST_F(FamiliesTest, RobertaPositionsCountFromThePaddingId) {
  const auto ids = torch::tensor({0, 7, 9, 2, 1, 1, 0, 5, 2, 1, 1, 1}, torch::kLong).view({2, 6});
  const auto expected = torch::tensor({2, 3, 4, 5, 1, 1, 2, 3, 4, 1, 1, 1}, torch::kLong).view({2, 6});
  EXPECT_TRUE(torch::equal(roberta_position_ids(ids, 1), expected));
  // The positions follow the ids, not the attention mask (as in transformers): masking a real
  // token out does not move the positions of the others.
  auto model = random_roberta();
  auto roberta = model.as<RobertaForSequenceClassificationImpl>();
  ASSERT_TRUE(roberta);
  EXPECT_EQ(model.max_tokens(), 22 - 1 - 1);
  const auto too_long = torch::full({1, 21}, 5, torch::kLong);
  LORA_EXPECT_THROWS_WITH(model.forward(too_long), "sequence length 21 exceeds the model's 20 positions");
  // The embedding rows of the padding id are zero after transformers' initialisation.
  EXPECT_EQ(roberta->roberta->embeddings->word_embeddings->weight[1].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(roberta->roberta->embeddings->position_embeddings->weight[1].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(model.default_targets(), (std::vector<std::string>{"query", "value"}));
  EXPECT_EQ(model.head_modules(), std::vector<std::string>{"classifier"});
}

TEST_F(FamiliesTest, DistilBertSinusoidalPositionsAreFixed) {
  auto config = tiny_distilbert();
  config.sinusoidal_pos_embds = true;
  DistilBertForSequenceClassification model(config);
  init_distilbert_weights(*model);
  const auto& weight = model->distilbert->embeddings->position_embeddings->weight;
  EXPECT_FALSE(weight.requires_grad());
  // Row p, columns 2j and 2j+1: sin and cos of p / 10000^(2j/dim).
  for (const int64_t p : {0, 3, 19}) {
    for (const int64_t j : {0, 5}) {
      const double angle = static_cast<double>(p) / std::pow(10000.0, 2.0 * static_cast<double>(j) / 16.0);
      EXPECT_NEAR(weight[p][2 * j].item<double>(), std::sin(angle), 1e-7);
      EXPECT_NEAR(weight[p][2 * j + 1].item<double>(), std::cos(angle), 1e-7);
    }
  }
  config.dim = 15;
  config.n_heads = 3;
  LORA_EXPECT_THROWS_WITH(DistilBertForSequenceClassification{config}, "sinusoidal_pos_embds needs an even dim (got 15)");
}

TEST_F(FamiliesTest, AdaptersStartAtTheBaseModelAndMergeBack) {
  for (auto model : {random_distilbert(), random_roberta()}) {
    const auto batch = model.model_type() == "roberta" ? padded_rows(0, 2, 1, 40) : padded_rows(1, 2, 0, 50);
    torch::NoGradGuard no_grad;
    const auto base = model.forward(batch);
    const auto report = lora::inject(model.module(), lora::LoraConfig(lora::LoRAOptions(4).alpha(12))
                                                         .target_modules(model.default_targets())
                                                         .task_type("SEQ_CLS"));
    EXPECT_EQ(report.adapted_modules().size(), 4u) << model.model_type();
    EXPECT_TRUE(torch::equal(model.forward(batch), base)) << model.model_type() << ": B = 0 must give the base model";
    // Train-like perturbation, then merge → unmerge restores the weights exactly enough.
    for (auto& parameter : model.module().parameters()) {
      if (parameter.requires_grad()) parameter.add_(0.05 * torch::randn_like(parameter));
    }
    const auto adapted = model.forward(batch);
    EXPECT_GT(max_abs_diff(adapted, base), 1e-4);
    std::vector<torch::Tensor> before;
    for (const auto& [name, layer] : lora::lora_layers(model.module())) before.push_back(layer->base_weight().clone());
    lora::merge(model.module());
    EXPECT_LT(max_abs_diff(model.forward(batch), adapted), 1e-5) << model.model_type();
    lora::unmerge(model.module());
    size_t i = 0;
    for (const auto& [name, layer] : lora::lora_layers(model.module())) {
      EXPECT_LT(max_abs_diff(layer->base_weight(), before[i++]), 1e-6) << name;
    }
  }
}

TEST_F(FamiliesTest, SavedFoldersLoadBackAsTheSameModel) {
  for (const auto& model : {random_distilbert(), random_roberta()}) {
    const auto folder = path(model.model_type());
    model.save(folder);
    const auto loaded = load_sequence_classifier(folder);
    EXPECT_EQ(loaded.model_type(), model.model_type());
    const auto batch = model.model_type() == "roberta" ? padded_rows(0, 2, 1, 40) : padded_rows(1, 2, 0, 50);
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(loaded.forward(batch), model.forward(batch))) << model.model_type();
    const auto config = read_json(fs::path(folder) / "config.json");
    EXPECT_EQ(config["model_type"], model.model_type());
    auto keys = std::vector<std::string>();
    for (const auto& item : config.items()) keys.push_back(item.key());
    EXPECT_TRUE(std::is_sorted(keys.begin(), keys.end())) << config.dump();  // as transformers writes it
  }
  const auto roberta_config = read_json(path("roberta/config.json"));
  EXPECT_EQ(roberta_config["architectures"], nlohmann::json::array({"RobertaForSequenceClassification"}));
  EXPECT_EQ(roberta_config["pad_token_id"], 1);
  EXPECT_EQ(roberta_config["bos_token_id"], 0);
  EXPECT_EQ(roberta_config["eos_token_id"], 2);
  EXPECT_EQ(RobertaConfig::from_file(path("roberta/config.json")).to_json().dump(), tiny_roberta().to_json().dump());
  EXPECT_EQ(DistilBertConfig::from_file(path("distilbert/config.json")).to_json().dump(),
            tiny_distilbert().to_json().dump());
}

TEST_F(FamiliesTest, CheckpointsOfOtherShapesAndFamiliesAreRefusedByName) {
  random_distilbert().save(path("distilbert"));
  random_roberta().save(path("roberta"));
  LORA_EXPECT_THROWS_WITH(load_bert_for_sequence_classification(path("distilbert")),
                          "holds a 'distilbert' model, not 'bert'");
  LORA_EXPECT_THROWS_WITH(load_distilbert_for_sequence_classification(path("roberta")),
                          "holds a 'roberta' model, not 'distilbert'");
  // An unknown family: the message lists what is supported.
  fs::create_directories(path("gpt2"));
  std::ofstream(path("gpt2/config.json")) << R"({"model_type": "gpt2"})";
  LORA_EXPECT_THROWS_WITH(load_sequence_classifier(path("gpt2")), "'gpt2' model; supported model types: bert, distilbert, roberta");
  // id2label decides the label count, as in transformers (which only warns about num_labels).
  auto json = nlohmann::json::parse(tiny_roberta().to_json().dump());
  json["id2label"] = {{"0", "negative"}, {"1", "neutral"}, {"2", "positive"}};
  json["num_labels"] = 2;
  EXPECT_EQ(RobertaConfig::from_json(json).num_labels, 3);
  json["id2label"] = {{"0", "negative"}, {"5", "positive"}};
  LORA_EXPECT_THROWS_WITH(RobertaConfig::from_json(json, "c.json"), "c.json: BertConfig: id2label has id 5 ('positive') outside [0, 2)");
  json.erase("id2label");
  json["initializer_range"] = -1;
  LORA_EXPECT_THROWS_WITH(RobertaConfig::from_json(json), "initializer_range must be > 0 (got -1)");
  // Tensors: a missing one and a wrong shape are named.
  const auto tensors = read_checkpoint_tensors(path("distilbert"));
  DistilBertForSequenceClassification fresh(tiny_distilbert());
  torch::OrderedDict<std::string, torch::Tensor> partial("tensor");
  for (const auto& item : tensors) {
    if (item.key() != "distilbert.transformer.layer.1.ffn.lin2.bias") partial.insert(item.key(), item.value());
  }
  LORA_EXPECT_THROWS_WITH(load_distilbert_state(*fresh, partial, {}, "c"),
                          "DistilBERT checkpoint c lacks 1 tensor(s): distilbert.transformer.layer.1.ffn.lin2.bias");
  auto reshaped = tensors;
  reshaped["pre_classifier.weight"] = torch::zeros({3, 3});
  LORA_EXPECT_THROWS_WITH(load_distilbert_state(*fresh, reshaped, {}, "c"), "'pre_classifier.weight' has shape [3, 3]");
  // What a masked-LM checkpoint has instead of the classifier: its head is skipped, ours initialised.
  torch::OrderedDict<std::string, torch::Tensor> mlm("tensor");
  for (const auto& item : tensors) {
    if (item.key().rfind("distilbert.", 0) == 0) mlm.insert(item.key(), item.value());
  }
  mlm.insert("vocab_projector.weight", torch::zeros({50, 16}));
  mlm.insert("vocab_layer_norm.weight", torch::zeros({16}));
  std::ostringstream log;
  const auto report = load_distilbert_state(*fresh, mlm, {true, &log, /*init_missing_classifier=*/true}, "mlm");
  EXPECT_EQ(report.ignored, (std::vector<std::string>{"vocab_projector.weight", "vocab_layer_norm.weight"}));
  EXPECT_EQ(report.initialized, (std::vector<std::string>{"pre_classifier.weight", "pre_classifier.bias",
                                                          "classifier.weight", "classifier.bias"}));
  EXPECT_NE(log.str().find("mlm has no classification head"), std::string::npos) << log.str();
  // A bare RobertaModel checkpoint (no "roberta." prefix, with a pooler) loads too.
  torch::OrderedDict<std::string, torch::Tensor> bare("tensor");
  for (const auto& item : read_checkpoint_tensors(path("roberta"))) {
    if (item.key().rfind("roberta.", 0) == 0) bare.insert(item.key().substr(8), item.value());
  }
  bare.insert("pooler.dense.weight", torch::zeros({16, 16}));
  RobertaForSequenceClassification roberta(tiny_roberta());
  const auto bare_report = load_roberta_state(*roberta, bare, {true, nullptr, true}, "bare");
  EXPECT_EQ(bare_report.ignored, std::vector<std::string>{"pooler.dense.weight"});
  EXPECT_EQ(bare_report.initialized.size(), 4u);
}

TEST_F(FamiliesTest, PeftFilesHoldTheFamilysKeysAndLoadBack) {
  // PEFT's SEQ_CLS head: every module whose name ends with "classifier" (DistilBERT's
  // pre_classifier too) or "score"; RoBERTa's classifier is a whole head of two layers.
  const std::map<std::string, std::vector<std::string>> heads{
      {"distilbert", {"classifier.bias", "classifier.weight", "pre_classifier.bias", "pre_classifier.weight"}},
      {"roberta",
       {"classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias", "classifier.out_proj.weight"}}};
  const std::map<std::string, std::string> prefix{{"distilbert", "distilbert.transformer.layer."},
                                                  {"roberta", "roberta.encoder.layer."}};
  for (auto model : {random_distilbert(), random_roberta()}) {
    const auto type = model.model_type();
    model.save(path(type + "-base"));
    torch::manual_seed(3);
    lora::inject(model.module(), lora::LoraConfig(lora::LoRAOptions(4).alpha(8))
                                     .target_modules(model.default_targets())
                                     .task_type("SEQ_CLS")
                                     .base_model_name_or_path(type));
    {
      torch::NoGradGuard no_grad;
      for (auto& parameter : model.module().parameters()) {
        if (parameter.requires_grad()) parameter.add_(0.05 * torch::randn_like(parameter));
      }
    }
    lora::io::save_adapter(model.module(), path(type + "-adapter"));
    const auto file = lora::io::load_safetensors(path(type + "-adapter/adapter_model.safetensors"));
    std::vector<std::string> expected;
    for (const auto& key : heads.at(type)) expected.push_back("base_model.model." + key);
    const std::string attention = type == "roberta" ? ".attention.self." : ".attention.";
    for (const int layer : {0, 1}) {
      for (const auto& target : model.default_targets()) {
        for (const auto* matrix : {"lora_A", "lora_B"}) {
          expected.push_back("base_model.model." + prefix.at(type) + std::to_string(layer) + attention + target + "." +
                             matrix + ".weight");
        }
      }
    }
    std::sort(expected.begin(), expected.end());
    EXPECT_EQ(sorted_keys(file), expected) << type;
    // Loaded onto a fresh copy of the same base, the adapter gives the same logits.
    auto fresh = load_sequence_classifier(path(type + "-base"));
    const auto loaded = lora::io::load_adapter(fresh.module(), path(type + "-adapter"));
    EXPECT_EQ(loaded.report.saved_modules().size(), type == "roberta" ? 1u : 2u) << type;
    const auto batch = type == "roberta" ? padded_rows(0, 2, 1, 40) : padded_rows(1, 2, 0, 50);
    torch::NoGradGuard no_grad;
    model.module().eval();
    fresh.module().eval();
    EXPECT_TRUE(torch::equal(fresh.forward(batch), model.forward(batch))) << type;
    // A model folder is a plain model: unmerged adapters are refused, merged ones are written.
    LORA_EXPECT_THROWS_WITH(model.save(path(type + "-merged")), "call lora::merge_and_unload(model) first");
    lora::merge_and_unload(model.module());
    model.save(path(type + "-merged"));
    EXPECT_LT(max_abs_diff(load_sequence_classifier(path(type + "-merged")).forward(batch), fresh.forward(batch)), 1e-5);
  }
}

// ---- against transformers 4.39 and PEFT 0.10 (../shared/golden/families) ---------------------

namespace {

const char* const kFamilies[] = {"distilbert-tiny", "roberta-tiny"};

fs::path family_dir(const std::string& family) { return fs::path(shared_dir()) / "golden" / "families" / family; }

/// The encoder's hidden states (embeddings, then each layer) for a batch of the id file.
std::vector<torch::Tensor> hidden_states(const SequenceClassifier& model, const torch::Tensor& ids,
                                         const torch::Tensor& mask) {
  if (auto distilbert = model.as<DistilBertForSequenceClassificationImpl>()) {
    return distilbert->distilbert->forward(ids, mask, true).hidden_states;
  }
  return model.as<RobertaForSequenceClassificationImpl>()->roberta->forward(ids, mask, {}, true).hidden_states;
}

}  // namespace

TEST(FamiliesGolden, LogitsAndHiddenStatesMatchTransformers) {
  if (shared_dir() == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the transformers comparison";
  for (const std::string family : kFamilies) {
    const auto model = load_sequence_classifier((family_dir(family) / "model").string());
    model.module().eval();
    const auto ids = read_json(family_dir(family) / "ids.json");
    const auto expected = read_json(family_dir(family) / "logits.json");
    double logit_error = 0, hidden_error = 0;
    torch::NoGradGuard no_grad;
    for (size_t b = 0; b < ids["batches"].size(); ++b) {
      const auto& batch = ids["batches"][b];
      const auto input_ids = json_tensor(batch["input_ids"], torch::kLong);
      const auto mask = json_tensor(batch["attention_mask"], torch::kLong);
      if (batch.contains("position_ids")) {  // informational in the file: what the model computes
        EXPECT_TRUE(torch::equal(roberta_position_ids(input_ids, 1), json_tensor(batch["position_ids"], torch::kLong)));
      }
      logit_error = std::max(logit_error, max_abs_diff(model.forward(input_ids, mask),
                                                       json_tensor(expected["batches"][b]["logits"], torch::kDouble)));
      const auto states = hidden_states(model, input_ids, mask);
      const auto& reference = expected["batches"][b]["hidden_states"];
      ASSERT_EQ(states.size(), reference.size()) << family;
      for (size_t layer = 0; layer < states.size(); ++layer) {
        hidden_error = std::max(hidden_error, max_abs_diff(states[layer], json_tensor(reference[layer], torch::kDouble)));
      }
      hidden_error = std::max(hidden_error, max_abs_diff(states.back(), json_tensor(expected["batches"][b]["last_hidden_state"], torch::kDouble)));
    }
    EXPECT_LT(logit_error, 1e-5) << family;
    EXPECT_LT(hidden_error, 1e-5) << family;
    std::cout << "[golden] " << family << ": max |logits - transformers| = " << logit_error
              << ", every hidden state " << hidden_error << "\n";
  }
}

TEST(FamiliesGolden, PeftAdaptersGivePeftsLogitsMergedAndUnmerged) {
  if (shared_dir() == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the PEFT comparison";
  for (const std::string family : kFamilies) {
    auto model = load_sequence_classifier((family_dir(family) / "model").string());
    const auto loaded = lora::io::load_adapter(model.module(), (family_dir(family) / "adapter_r8_qv").string());
    const auto expected = read_json(family_dir(family) / "adapter_r8_qv_apply.json");
    auto saved = loaded.report.saved_modules();
    std::vector<std::string> wrapped;  // PEFT's names: base_model.model.<module>
    for (const auto& name : expected["modules_to_save_wrapped"]) wrapped.push_back(name.get<std::string>().substr(17));
    std::sort(saved.begin(), saved.end());
    std::sort(wrapped.begin(), wrapped.end());
    EXPECT_EQ(saved, wrapped) << family;  // DistilBERT: pre_classifier and classifier, as PEFT wraps them
    model.module().eval();
    const auto ids = read_json(family_dir(family) / "ids.json");
    double unmerged = 0, merged = 0, base = 0;
    torch::NoGradGuard no_grad;
    auto each_batch = [&](const std::string& key, double& worst) {
      for (size_t b = 0; b < ids["batches"].size(); ++b) {
        const auto& batch = ids["batches"][b];
        const auto logits = model.forward(json_tensor(batch["input_ids"], torch::kLong),
                                          json_tensor(batch["attention_mask"], torch::kLong));
        worst = std::max(worst, max_abs_diff(logits, json_tensor(expected[key][b], torch::kDouble)));
      }
    };
    each_batch("adapter_logits", unmerged);
    lora::merge(model.module());
    each_batch("adapter_logits", merged);
    EXPECT_LT(max_abs_diff(json_tensor(expected["merged_logits"], torch::kDouble),
                           json_tensor(expected["adapter_logits"], torch::kDouble)), 1e-6);
    lora::unmerge(model.module());
    lora::enable_adapters(model.module(), false);
    each_batch("base_logits", base);
    EXPECT_LT(unmerged, 1e-5) << family;
    EXPECT_LT(merged, 1e-5) << family;
    EXPECT_LT(base, 1e-5) << family;
    std::cout << "[golden] " << family << " PEFT adapter: max |logits - PEFT| unmerged " << unmerged << ", merged "
              << merged << ", disabled vs base " << base << "\n";
  }
}

TEST(FamiliesGolden, ReplaysPeftsTrainingAndSavesPeftsFiles) {
  if (shared_dir() == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the PEFT training replay";
  for (const std::string family : kFamilies) {
    const auto golden = family_dir(family);
    const auto log = read_json(golden / "adapter_r8_qv" / "peft_train.json");
    auto model = load_sequence_classifier((golden / "model").string());
    lora::io::LoadOptions trainable;
    trainable.is_trainable = true;
    lora::io::load_adapter(model.module(), (golden / "adapter_r8_qv_init").string(), "default", trainable);
    EXPECT_EQ(lora::count_parameters(model.module()).trainable, log["trainable_params"].get<int64_t>()) << family;
    EXPECT_EQ(lora::count_parameters(model.module()).total, log["all_params"].get<int64_t>()) << family;
    std::vector<torch::Tensor> parameters;
    for (const auto& parameter : model.module().parameters()) {
      if (parameter.requires_grad()) parameters.push_back(parameter);
    }
    const auto& settings = log["optimizer"];
    torch::optim::AdamW optimizer(
        parameters, torch::optim::AdamWOptions(settings["lr"].get<double>())
                        .betas({settings["betas"][0].get<double>(), settings["betas"][1].get<double>()})
                        .eps(settings["eps"].get<double>())
                        .weight_decay(settings["weight_decay"].get<double>()));
    model.module().train();
    double loss_error = 0;
    for (size_t step = 0; step < log["train_batches"].size(); ++step) {
      const auto& batch = log["train_batches"][step];
      optimizer.zero_grad();
      const auto logits = model.forward(json_tensor(batch["input_ids"], torch::kLong),
                                        json_tensor(batch["attention_mask"], torch::kLong));
      const auto loss = torch::nn::functional::cross_entropy(logits, json_tensor(batch["labels"], torch::kLong));
      loss.backward();
      optimizer.step();
      loss_error = std::max(loss_error, std::abs(loss.item<double>() - log["losses"][step].get<double>()));
    }
    model.module().eval();
    double eval_error = 0;
    {
      torch::NoGradGuard no_grad;
      const auto& eval = log["eval_batch"];
      eval_error = max_abs_diff(model.forward(json_tensor(eval["input_ids"], torch::kLong),
                                              json_tensor(eval["attention_mask"], torch::kLong)),
                                json_tensor(log["eval_logits"], torch::kDouble));
    }
    EXPECT_LT(loss_error, 1e-5) << family;
    EXPECT_LT(eval_error, 1e-5) << family;

    // Our files for what we trained: PEFT's keys, shapes, dtypes, metadata and config, exactly.
    const auto out = fs::temp_directory_path() / ("lora-families-" + std::to_string(::getpid()) + "-" + family);
    lora::io::save_adapter(model.module(), out.string());
    const auto ours = lora::io::load_safetensors((out / "adapter_model.safetensors").string());
    const auto peft = lora::io::load_safetensors((golden / "adapter_r8_qv" / "adapter_model.safetensors").string());
    EXPECT_EQ(ours.metadata, peft.metadata) << family;
    ASSERT_EQ(sorted_keys(ours), sorted_keys(peft)) << family;
    double tensor_error = 0;
    for (const auto& item : peft.tensors) {
      EXPECT_EQ(ours.tensors[item.key()].sizes(), item.value().sizes()) << item.key();
      EXPECT_EQ(ours.tensors[item.key()].scalar_type(), item.value().scalar_type()) << item.key();
      tensor_error = std::max(tensor_error, max_abs_diff(ours.tensors[item.key()], item.value()));
    }
    EXPECT_LT(tensor_error, 1e-4) << family;
    // The same keys and values; target_modules is a set in PEFT (written in Python's hash order,
    // ["v_lin", "q_lin"] here), so both lists are compared sorted.
    auto sorted_targets = [](nlohmann::json config) {
      auto targets = config["target_modules"].get<std::vector<std::string>>();
      std::sort(targets.begin(), targets.end());
      config["target_modules"] = targets;
      return config;
    };
    EXPECT_EQ(sorted_targets(read_json(out / "adapter_config.json")),
              sorted_targets(read_json(golden / "adapter_r8_qv" / "adapter_config.json")))
        << family;
    fs::remove_all(out);
    std::cout << "[golden] " << family << ": replayed " << log["train_batches"].size()
              << " PEFT steps: max |loss - PEFT| = " << loss_error << ", eval logits " << eval_error
              << ", trained tensors " << tensor_error << "\n";
  }
}
