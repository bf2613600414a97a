#pragma once

/// \file
/// Hugging Face checkpoint folders for every model family: read the tensors (`model.safetensors`,
/// or shards), copy them into a model by transformers' names with a family's tolerances
/// (`CheckpointLayout`), initialise as transformers does, and save a model back as one unit.
/// The families' own entry points: bert_checkpoint.hpp, distilbert_checkpoint.hpp,
/// roberta_checkpoint.hpp; any of them by `model_type`: auto.hpp.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <lora/detail/atomic_file.hpp>
#include <lora/detail/strings.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/layer.hpp>
#include <lora/models/detail/config_json.hpp>
#include <lora/state_dict.hpp>

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
  /// When the checkpoint has no classification head, initialise it as transformers does (normal
  /// σ = initializer range, zero bias) instead of keeping the model's values. Default false;
  /// loading a folder into a fresh model (`load_*_for_sequence_classification`) sets it.
  bool init_missing_classifier = false;
  /// How the folder's safetensors files are read. The tensors are copied into the model, so a
  /// mapping lives only while the load runs; `io::FileAccess::kCopy` reads them into memory
  /// instead (transiently the files' size more), for folders another process may be rewriting.
  io::FileAccess file_access = io::FileAccess::kMap;
};

/// How one family's checkpoints name their tensors, and what a sequence-classification model
/// tolerates in them.
struct CheckpointLayout {
  std::string family;                           ///< "BERT": for messages
  std::string base_prefix;                      ///< "bert.": a bare encoder checkpoint lacks it
  std::vector<std::string> head_prefixes;       ///< the classification head: may be missing
  std::vector<std::string> ignored_prefixes;    ///< other heads (pretraining, pooler): skipped
  std::vector<std::string> ignored_substrings;  ///< buffers older transformers saved: skipped
  double initializer_range = 0.02;
};

namespace detail {

/// transformers' renames for old checkpoints: LayerNorm gamma/beta.
inline std::string modern_key(std::string key) {
  auto replace_suffix = [&](const std::string& from, const std::string& to) {
    if (lora::detail::ends_with(key, from)) key = key.substr(0, key.size() - from.size()) + to;
  };
  replace_suffix("LayerNorm.gamma", "LayerNorm.weight");
  replace_suffix("LayerNorm.beta", "LayerNorm.bias");
  return key;
}

inline bool has_any_prefix(const std::string& key, const std::vector<std::string>& prefixes) {
  return std::any_of(prefixes.begin(), prefixes.end(),
                     [&](const std::string& prefix) { return lora::detail::starts_with(key, prefix); });
}

/// The module that owns each base tensor of `model` (by its state-dict key), for initialisation.
inline std::map<std::string, std::shared_ptr<torch::nn::Module>> owners_by_key(torch::nn::Module& model) {
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) modules[item.key()] = item.value();
  std::map<std::string, std::shared_ptr<torch::nn::Module>> owners;
  for (const auto& item : lora::base_state_dict(model)) {
    const auto dot = item.key().rfind('.');
    const auto found = dot == std::string::npos ? modules.end() : modules.find(item.key().substr(0, dot));
    owners[item.key()] = found == modules.end() ? nullptr : found->second;
  }
  return owners;
}

}  // namespace detail

/// Initialises every base tensor of `model` as transformers' `_init_weights` does: LayerNorm 1
/// and 0; embeddings N(0, σ) with their padding row 0; other weights N(0, σ), biases 0.
/// Adapters are left alone. Draws from the default generator in state-dict order.
inline void init_encoder_weights(torch::nn::Module& model, double initializer_range = 0.02) {
  torch::NoGradGuard no_grad;
  const auto owners = detail::owners_by_key(model);
  for (auto& item : lora::base_state_dict(model)) {
    auto& tensor = item.value();
    const bool bias = lora::detail::ends_with(item.key(), "bias");
    const auto& owner = owners.at(item.key());
    if (owner && dynamic_cast<torch::nn::LayerNormImpl*>(owner.get())) {
      bias ? tensor.zero_() : tensor.fill_(1.0);
    } else if (bias) {
      tensor.zero_();
    } else {
      tensor.normal_(0.0, initializer_range);
      if (auto* embedding = owner ? dynamic_cast<torch::nn::EmbeddingImpl*>(owner.get()) : nullptr) {
        if (embedding->options.padding_idx()) tensor[*embedding->options.padding_idx()].zero_();
      }
    }
  }
}

/// Copies a Hugging Face state dict into `model` (all its base tensors, by transformers' names).
///
/// Accepted besides exact keys: a bare encoder checkpoint (keys without `layout.base_prefix`),
/// old `LayerNorm.gamma/beta` names, the layout's ignored heads and buffers (reported), and a
/// missing classification head (kept, or with `options.init_missing_classifier` initialised as
/// transformers does, with a notice). Anything else missing or unexpected is an error listing
/// the keys (unless `options.strict` is false: then only what the checkpoint has is copied); a
/// shape mismatch names the key and both shapes. Nothing is copied when a check fails.
inline LoadReport load_checkpoint_state(torch::nn::Module& model,
                                        const torch::OrderedDict<std::string, at::Tensor>& checkpoint,
                                        const CheckpointLayout& layout, const LoadOptions& options = {},
                                        const std::string& where = "checkpoint") {
  const auto who = layout.family + " checkpoint " + where;
  for (const auto& [name, layer] : lora::lora_layers(model)) {
    TORCH_CHECK(!layer->merged(), who, ": cannot load into '", name,
                "' while adapters are merged into it; unmerge first");
  }
  auto targets = lora::base_state_dict(model);
  const bool has_base_prefix = std::any_of(checkpoint.begin(), checkpoint.end(), [&](const auto& item) {
    return lora::detail::starts_with(item.key(), layout.base_prefix);
  });
  auto ignored = [&](const std::string& key) {
    return detail::has_any_prefix(key, layout.ignored_prefixes) ||
           std::any_of(layout.ignored_substrings.begin(), layout.ignored_substrings.end(),
                       [&](const std::string& part) { return key.find(part) != std::string::npos; });
  };
  LoadReport report;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (destination, source)
  std::set<std::string> found;
  std::vector<std::string> unexpected;
  for (const auto& item : checkpoint) {
    auto key = detail::modern_key(item.key());
    if (ignored(key)) {
      report.ignored.push_back(item.key());
      continue;
    }
    if (!has_base_prefix && !detail::has_any_prefix(key, layout.head_prefixes)) key = layout.base_prefix + key;
    if (ignored(key)) {
      report.ignored.push_back(item.key());
      continue;
    }
    const auto* target = targets.find(key);
    if (target == nullptr) {
      unexpected.push_back(item.key());
      continue;
    }
    TORCH_CHECK(target->sizes() == item.value().sizes(), who, ": '", item.key(), "' has shape ", item.value().sizes(),
                " but the model expects ", target->sizes());
    found.insert(key);
    copies.emplace_back(*target, item.value());
  }
  std::vector<std::string> missing, head;
  for (const auto& item : targets) {
    if (found.count(item.key())) continue;
    (detail::has_any_prefix(item.key(), layout.head_prefixes) ? head : missing).push_back(item.key());
  }
  if (options.strict) {
    TORCH_CHECK(missing.empty(), who, " lacks ", missing.size(), " tensor(s): ", lora::detail::join(missing));
    TORCH_CHECK(unexpected.empty(), who, " has ", unexpected.size(), " tensor(s) this model does not: ",
                lora::detail::join(unexpected));
  } else {
    report.kept = missing;
  }

  torch::NoGradGuard no_grad;
  for (auto& [destination, source] : copies) destination.copy_(source);
  if (head.empty()) return report;
  if (!options.init_missing_classifier) {
    report.kept.insert(report.kept.end(), head.begin(), head.end());
    return report;
  }
  for (const auto& key : head) {
    auto tensor = targets[key];
    lora::detail::ends_with(key, "bias") ? tensor.zero_() : tensor.normal_(0.0, layout.initializer_range);
  }
  report.initialized = head;
  if (options.log) {
    *options.log << "lora: " << where << " has no classification head; initialised " << lora::detail::join(head)
                 << " (train it, e.g. with modules_to_save)\n";
  }
  return report;
}

/// Reads every tensor of a checkpoint folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`. A folder with only `pytorch_model.bin` is refused with the
/// command that converts it.
inline torch::OrderedDict<std::string, at::Tensor> read_checkpoint_tensors(
    const std::string& folder, io::FileAccess access = io::FileAccess::kMap) {
  namespace fs = std::filesystem;
  const fs::path dir(folder);
  std::error_code error;
  TORCH_CHECK(fs::is_directory(dir, error), "checkpoint: '", folder, "' is not a folder");
  torch::OrderedDict<std::string, at::Tensor> tensors("checkpoint tensor");
  if (fs::exists(dir / "model.safetensors", error)) {
    return io::load_safetensors((dir / "model.safetensors").string(), {at::kFloat, access}).tensors;
  }
  if (fs::exists(dir / "model.safetensors.index.json", error)) {
    std::ifstream in(dir / "model.safetensors.index.json");
    nlohmann::json index;
    try {
      in >> index;
    } catch (const nlohmann::json::exception& error) {
      TORCH_CHECK(false, "checkpoint: invalid model.safetensors.index.json in '", folder, "': ", error.what());
    }
    TORCH_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
                "checkpoint: model.safetensors.index.json in '", folder, "' has no weight_map");
    std::set<std::string> shards;
    for (const auto& [name, file] : index["weight_map"].items()) {
      TORCH_CHECK(file.is_string(), "checkpoint: model.safetensors.index.json in '", folder, "' maps '", name, "' to ",
                  file.dump(), ", not a file name");
      shards.insert(file.get<std::string>());
    }
    for (const auto& shard : shards) {
      TORCH_CHECK(shard.find('/') == std::string::npos && shard.find("..") == std::string::npos,
                  "checkpoint: shard name '", shard, "' in '", folder, "' must be a plain file name");
      for (const auto& item : io::load_safetensors((dir / shard).string(), {at::kFloat, access}).tensors) {
        tensors.insert(item.key(), item.value());
      }
    }
    return tensors;
  }
  TORCH_CHECK(!fs::exists(dir / "pytorch_model.bin", error), "checkpoint: '", folder,
              "' has only pytorch_model.bin, which LibTorch cannot read (it is a pickled Python state dict). "
              "Convert it once with Python: python -c \"import torch; from safetensors.torch import save_file; "
              "save_file({k: v.contiguous() for k, v in torch.load('pytorch_model.bin', map_location='cpu').items()}, "
              "'model.safetensors', metadata={'format': 'pt'})\" (run inside the folder), or load it with "
              "transformers and call save_pretrained(folder, safe_serialization=True)");
  TORCH_CHECK(false, "checkpoint: '", folder, "' has no model.safetensors");
  return tensors;
}

/// `model_type` of a folder's config.json ("bert", "distilbert", "roberta", ...); empty when
/// the file has none.
inline std::string read_model_type(const std::string& folder) {
  namespace fs = std::filesystem;
  const auto path = (fs::path(folder) / "config.json").string();
  std::error_code error;
  TORCH_CHECK(fs::exists(path, error), "checkpoint: '", folder, "' has no config.json");
  const auto json = detail::read_config_file(path, "checkpoint");
  TORCH_CHECK(json.is_object(), "checkpoint: '", path, "' is not a JSON object");
  if (!json.contains("model_type")) return "";
  TORCH_CHECK(json["model_type"].is_string(), "checkpoint: 'model_type' in '", path, "' must be a string (got ",
              json["model_type"].dump(), ")");
  return json["model_type"].get<std::string>();
}

/// The path of a folder's config.json after checking that it describes `model_type` (a file
/// without `model_type` is accepted); the error names the loader for what it does describe.
inline std::string config_path_for(const std::string& folder, const std::string& model_type, const char* who) {
  const auto found = read_model_type(folder);
  TORCH_CHECK(found.empty() || found == model_type, who, ": '", folder, "' holds a '", found, "' model, not '",
              model_type, "' (lora::models::load_sequence_classifier opens any supported family)");
  return (std::filesystem::path(folder) / "config.json").string();
}

/// A file copied into a saved folder: (source path, name in the folder).
using FolderFile = std::pair<std::string, std::string>;

/// Writes `model` as a Hugging Face folder: `config.json` (`config_json`), `model.safetensors`
/// (float32, metadata {"format": "pt"}) and `files` (tokenizer files), as one unit. Other files
/// already there stay, except stale weights and, when tokenizer files are written, a
/// `tokenizer.json` that may no longer match them. Adapters must be merged away first
/// (`lora::merge_and_unload`) so that the folder is a plain model transformers loads.
inline void save_checkpoint_folder(torch::nn::Module& model, const std::string& folder,
                                   const nlohmann::ordered_json& config_json, const std::vector<FolderFile>& files,
                                   const char* who) {
  namespace fs = std::filesystem;
  for (const auto& [name, layer] : lora::adapter_layers(model)) {
    auto lora_layer = std::dynamic_pointer_cast<LoRALayer>(layer);
    for (const auto& adapter : layer->adapter_names()) {
      const bool merged = lora_layer != nullptr &&
                          std::find(lora_layer->merged_adapters().begin(), lora_layer->merged_adapters().end(),
                                    adapter) != lora_layer->merged_adapters().end();
      TORCH_CHECK(merged, who, ": ", lora_layer ? "layer '" : "saved module '", name, "' has ",
                  lora_layer ? "unmerged adapter '" : "a trained copy for adapter '", adapter,
                  "'; call lora::merge_and_unload(model) first (or save the adapter alone)");
    }
  }
  torch::OrderedDict<std::string, at::Tensor> tensors("tensor");
  for (const auto& item : lora::base_state_dict(model)) tensors.insert(item.key(), item.value().to(at::kFloat));
  std::string config_text;
  try {
    config_text = config_json.dump(2) + "\n";
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, who, ": cannot write config.json for '", folder, "': ", error.what());
  }
  lora::detail::replace_folder_atomically(
      folder,
      [&](const fs::path& temporary) {
        io::save_safetensors((temporary / "model.safetensors").string(), tensors, {{"format", "pt"}});
        lora::detail::write_file_atomically((temporary / "config.json").string(),
                                            [&](std::ostream& out) { out << config_text; }, who);
        for (const auto& [source, name] : files) {
          std::error_code error;
          fs::copy_file(source, temporary / name, fs::copy_options::overwrite_existing, error);
          TORCH_CHECK(!error, who, ": cannot copy '", source, "' as ", name, ": ", error.message());
        }
      },
      who,
      [&](const std::string& name) {
        const bool weights = name == "model.safetensors.index.json" || name.rfind("pytorch_model", 0) == 0 ||
                             (name.rfind("model-", 0) == 0 && lora::detail::ends_with(name, ".safetensors"));
        return !weights && !(name == "tokenizer.json" && !files.empty());
      });
}

}  // namespace lora::models
