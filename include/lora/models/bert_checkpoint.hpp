#pragma once

/// \file
/// Hugging Face BERT checkpoint folders (`config.json` + `model.safetensors`, optionally
/// sharded): load them into `BertForSequenceClassification`, save a model back, import weights
/// (TorchScript weight import: <lora/models/bert_torchscript.hpp>).

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/nn/init.h>

#include <lora/detail/strings.hpp>
#include <lora/detail/atomic_file.hpp>
#include <lora/inject.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/models/bert.hpp>

namespace lora::models {

/// What a checkpoint load did besides copying matching tensors.
struct LoadReport {
  std::vector<std::string> initialized;  ///< model tensors the checkpoint lacked and that were initialised
  std::vector<std::string> kept;         ///< model tensors the checkpoint lacked, left as they were
  std::vector<std::string> ignored;      ///< checkpoint tensors known not to belong here (pretraining heads)
};

/// How strict a load is.
struct LoadOptions {
  /// Refuse missing or unexpected keys (other than the tolerated ones). Default true. A
  /// non-strict load copies what the checkpoint has and leaves every other tensor as it is.
  bool strict = true;
  /// Where notices go (initialised classifier, ignored pretraining heads); nullptr: silent.
  std::ostream* log = &std::cerr;
  /// When the checkpoint has no classifier, initialise it as transformers does (normal σ 0.02,
  /// zero bias) instead of keeping the model's values. Default false; loading a folder into a
  /// fresh model (`load_bert_for_sequence_classification`) sets it.
  bool init_missing_classifier = false;
};

/// Initialises weights as transformers' `BertPreTrainedModel._init_weights` does: linear and
/// embedding weights N(0, σ), biases 0, LayerNorm 1 and 0, the padding embedding row 0.
inline void init_bert_weights(torch::nn::Module& model, double initializer_range = 0.02,
                              int64_t pad_token_id = 0) {
  torch::NoGradGuard no_grad;
  for (auto& item : lora::base_state_dict(model)) {
    const auto& key = item.key();
    auto& tensor = item.value();
    const bool norm = key.find("LayerNorm.") != std::string::npos;
    const bool bias = lora::detail::ends_with(key, "bias");
    if (norm) {
      bias ? tensor.zero_() : tensor.fill_(1.0);
    } else if (bias) {
      tensor.zero_();
    } else {
      tensor.normal_(0.0, initializer_range);
      if (key.find("word_embeddings.weight") != std::string::npos) tensor[pad_token_id].zero_();
    }
  }
}

namespace detail {

/// transformers' renames for old checkpoints: LayerNorm gamma/beta.
inline std::string modern_key(std::string key) {
  auto replace_suffix = [&](const std::string& from, const std::string& to) {
    if (lora::detail::ends_with(key, from)) {
      key = key.substr(0, key.size() - from.size()) + to;
    }
  };
  replace_suffix("LayerNorm.gamma", "LayerNorm.weight");
  replace_suffix("LayerNorm.beta", "LayerNorm.bias");
  return key;
}

}  // namespace detail

/// Copies a Hugging Face BERT state dict into `model` (all its tensors, by transformers' names).
///
/// Accepted besides exact keys: a checkpoint of a plain `BertModel` (keys without `bert.`),
/// old `LayerNorm.gamma/beta` names, pretraining heads (`cls.*`) and `position_ids` (ignored),
/// and a missing `classifier` (kept, or with `options.init_missing_classifier` initialised as
/// transformers does, with a notice). Anything else missing or unexpected is an error listing
/// the keys (unless `options.strict` is false: then only what the checkpoint has is copied); a
/// shape mismatch names the key and both shapes. Nothing is copied when a check fails.
inline LoadReport load_bert_state(BertForSequenceClassificationImpl& model,
                                  const torch::OrderedDict<std::string, at::Tensor>& checkpoint,
                                  const LoadOptions& options = {}, const std::string& where = "checkpoint") {
  for (const auto& [name, layer] : lora::lora_layers(model)) {
    TORCH_CHECK(!layer->merged(), "BERT checkpoint ", where, ": cannot load into '", name,
                "' while adapters are merged into it; unmerge first");
  }
  auto targets = lora::base_state_dict(model);
  const bool has_bert_prefix = std::any_of(checkpoint.begin(), checkpoint.end(), [](const auto& item) {
    return lora::detail::starts_with(item.key(), "bert.");
  });
  LoadReport report;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (destination, source)
  std::set<std::string> found;
  std::vector<std::string> unexpected;
  for (const auto& item : checkpoint) {
    auto key = detail::modern_key(item.key());
    if (!has_bert_prefix && !lora::detail::starts_with(key, "classifier.")) key = "bert." + key;
    if (lora::detail::starts_with(key, "cls.") || lora::detail::starts_with(key, "bert.cls.") ||
        key.find("embeddings.position_ids") != std::string::npos) {
      report.ignored.push_back(item.key());
      continue;
    }
    const auto* target = targets.find(key);
    if (target == nullptr) {
      unexpected.push_back(item.key());
      continue;
    }
    TORCH_CHECK(target->sizes() == item.value().sizes(), "BERT checkpoint ", where, ": '", item.key(), "' has shape ",
                item.value().sizes(), " but the model expects ", target->sizes());
    found.insert(key);
    copies.emplace_back(*target, item.value());
  }
  std::vector<std::string> missing;
  for (const auto& item : targets) {
    if (found.count(item.key())) continue;
    if (lora::detail::starts_with(item.key(), "classifier.")) {
      report.initialized.push_back(item.key());
    } else {
      missing.push_back(item.key());
    }
  }
  if (!options.strict) report.kept.insert(report.kept.end(), missing.begin(), missing.end());
  if (options.strict) {
    TORCH_CHECK(missing.empty(), "BERT checkpoint ", where, " lacks ", missing.size(), " tensor(s): ",
                lora::detail::join(missing));
    TORCH_CHECK(unexpected.empty(), "BERT checkpoint ", where, " has ", unexpected.size(),
                " tensor(s) this model does not: ", lora::detail::join(unexpected));
  }

  torch::NoGradGuard no_grad;
  for (auto& [destination, source] : copies) destination.copy_(source);
  if (!report.initialized.empty()) {
    if (!options.init_missing_classifier) {
      report.kept.insert(report.kept.end(), report.initialized.begin(), report.initialized.end());
      report.initialized.clear();
      return report;
    }
    for (const auto& key : report.initialized) {
      auto tensor = targets[key];
      lora::detail::ends_with(key, "bias") ? tensor.zero_() : tensor.normal_(0.0, 0.02);
    }
    if (options.log) {
      *options.log << "lora: " << where << " has no classifier; initialised " << lora::detail::join(report.initialized)
                   << " (train it, e.g. with modules_to_save {\"classifier\"})\n";
    }
  }
  return report;
}

/// Reads every tensor of a checkpoint folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`. A folder with only `pytorch_model.bin` is refused with the
/// command that converts it.
inline torch::OrderedDict<std::string, at::Tensor> read_checkpoint_tensors(const std::string& folder) {
  namespace fs = std::filesystem;
  const fs::path dir(folder);
  std::error_code error;
  TORCH_CHECK(fs::is_directory(dir, error), "BERT checkpoint: '", folder, "' is not a folder");
  torch::OrderedDict<std::string, at::Tensor> tensors("checkpoint tensor");
  if (fs::exists(dir / "model.safetensors", error)) {
    return io::load_safetensors((dir / "model.safetensors").string(), at::kFloat).tensors;
  }
  if (fs::exists(dir / "model.safetensors.index.json", error)) {
    std::ifstream in(dir / "model.safetensors.index.json");
    nlohmann::json index;
    try {
      in >> index;
    } catch (const nlohmann::json::exception& error) {
      TORCH_CHECK(false, "BERT checkpoint: invalid model.safetensors.index.json in '", folder, "': ", error.what());
    }
    TORCH_CHECK(index.contains("weight_map") && index["weight_map"].is_object(),
                "BERT checkpoint: model.safetensors.index.json in '", folder, "' has no weight_map");
    std::set<std::string> shards;
    for (const auto& [name, file] : index["weight_map"].items()) {
      TORCH_CHECK(file.is_string(), "BERT checkpoint: model.safetensors.index.json in '", folder, "' maps '", name,
                  "' to ", file.dump(), ", not a file name");
      shards.insert(file.get<std::string>());
    }
    for (const auto& shard : shards) {
      TORCH_CHECK(shard.find('/') == std::string::npos && shard.find("..") == std::string::npos,
                  "BERT checkpoint: shard name '", shard, "' in '", folder, "' must be a plain file name");
      for (const auto& item : io::load_safetensors((dir / shard).string(), at::kFloat).tensors) {
        tensors.insert(item.key(), item.value());
      }
    }
    return tensors;
  }
  TORCH_CHECK(!fs::exists(dir / "pytorch_model.bin", error), "BERT checkpoint: '", folder,
              "' has only pytorch_model.bin, which LibTorch cannot read (it is a pickled Python state dict). "
              "Convert it once with Python: python -c \"import torch; from safetensors.torch import save_file; "
              "save_file({k: v.contiguous() for k, v in torch.load('pytorch_model.bin', map_location='cpu').items()}, "
              "'model.safetensors', metadata={'format': 'pt'})\" (run inside the folder), or load it with "
              "transformers and call save_pretrained(folder, safe_serialization=True)");
  TORCH_CHECK(false, "BERT checkpoint: '", folder, "' has no model.safetensors");
  return tensors;
}

/// Loads a Hugging Face BERT folder (config.json + model.safetensors) as
/// `BertForSequenceClassification`, in float32 on the CPU (move it with `->to(device)`).
///
///     auto model = lora::models::load_bert_for_sequence_classification("bert-base-uncased");
inline BertForSequenceClassification load_bert_for_sequence_classification(const std::string& folder,
                                                                           const LoadOptions& options = {}) {
  namespace fs = std::filesystem;
  const auto config_path = fs::path(folder) / "config.json";
  std::error_code error;
  TORCH_CHECK(fs::exists(config_path, error), "BERT checkpoint: '", folder, "' has no config.json");
  BertForSequenceClassification model(BertConfig::from_file(config_path.string()));
  auto fresh = options;
  fresh.init_missing_classifier = true;  // a new model: transformers' initialisation, not LibTorch's
  load_bert_state(*model, read_checkpoint_tensors(folder), fresh, "'" + folder + "'");
  return model;
}

/// Writes `model` as a Hugging Face folder: config.json and model.safetensors (float32,
/// metadata {"format": "pt"}), plus vocab.txt when `vocab_file` is given. Adapters must be
/// merged away first (`lora::merge_and_unload`) so that the folder is a plain model that
/// transformers loads. Files are written atomically.
inline void save_bert(BertForSequenceClassificationImpl& model, const std::string& folder,
                      const std::string& vocab_file = "") {
  namespace fs = std::filesystem;
  for (const auto& [name, layer] : lora::adapter_layers(model)) {
    auto lora_layer = std::dynamic_pointer_cast<LoRALayer>(layer);
    for (const auto& adapter : layer->adapter_names()) {
      const bool merged = lora_layer != nullptr &&
                          std::find(lora_layer->merged_adapters().begin(), lora_layer->merged_adapters().end(),
                                    adapter) != lora_layer->merged_adapters().end();
      TORCH_CHECK(merged, "save_bert: ", lora_layer ? "layer '" : "saved module '", name, "' has ",
                  lora_layer ? "unmerged adapter '" : "a trained copy for adapter '", adapter,
                  "'; call lora::merge_and_unload(model) first (or save the adapter alone)");
    }
  }
  torch::OrderedDict<std::string, at::Tensor> tensors("tensor");
  for (const auto& item : lora::base_state_dict(model)) tensors.insert(item.key(), item.value().to(at::kFloat));
  std::string config_text;
  try {
    config_text = model.config.to_json().dump(2) + "\n";
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, "save_bert: cannot write config.json for '", folder, "': ", error.what());
  }
  // One unit: weights, config and vocabulary always match (other files in the folder are kept).
  lora::detail::replace_folder_atomically(
      folder,
      [&](const fs::path& temporary) {
        io::save_safetensors((temporary / "model.safetensors").string(), tensors, {{"format", "pt"}});
        lora::detail::write_file_atomically((temporary / "config.json").string(),
                                            [&](std::ostream& out) { out << config_text; }, "save_bert");
        if (!vocab_file.empty()) {
          std::error_code error;
          fs::copy_file(vocab_file, temporary / "vocab.txt", error);
          TORCH_CHECK(!error, "save_bert: cannot copy vocabulary '", vocab_file, "': ", error.message());
        }
      },
      "save_bert",
      // Other files stay (tokenizer_config.json, a README); stale weights and a tokenizer.json
      // that no longer matches the vocabulary do not.
      [&](const std::string& name) {
        const bool weights = name == "model.safetensors.index.json" || name.rfind("pytorch_model", 0) == 0 ||
                             (name.rfind("model-", 0) == 0 && lora::detail::ends_with(name, ".safetensors"));
        return !weights && !(name == "tokenizer.json" && !vocab_file.empty());
      });
}

}  // namespace lora::models
