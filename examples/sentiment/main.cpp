// lora-sentiment: fine-tune BERT, DistilBERT or RoBERTa for binary sentiment with LoRA on query/value.
//
//   lora-sentiment                      the built-in demo: no downloads, a few minutes on 2 cores
//   lora-sentiment train --model DIR --data DIR --out DIR [options]      (--hf-model NAME downloads)
//                                       (data parallel: scripts/launch.sh N lora-sentiment train ..., or torchrun's variables)
//   lora-sentiment eval --model DIR [--adapter DIR] --data FILE
//   lora-sentiment predict --model DIR [--adapter DIR] [SENTENCE...]   (stdin when none)
//
// Run any command with --help for its options.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <lora/data/batcher.hpp>
#include <lora/data/tsv.hpp>
#include <lora/io/peft.hpp>
#include <lora/lora.hpp>
#include <lora/models/auto.hpp>
#include <lora/models/bert_checkpoint.hpp>
#include <lora/tokenizers/auto.hpp>
#include <lora/tokenizers/wordpiece.hpp>
#include <torch/torch.h>

#include "download.hpp"
#include "mlm.hpp"
#include "serve.hpp"
#include "synthetic.hpp"
#include "training.hpp"

namespace fs = std::filesystem;

namespace {

std::atomic<bool> interrupted{false};
extern "C" void on_interrupt(int) { interrupted.store(true); }

int default_threads() {
  if (const char* value = std::getenv("OMP_NUM_THREADS")) return std::max(1, std::atoi(value));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::string default_cache() {
  if (const char* value = std::getenv("LORA_CACHE")) return value;
  if (const char* value = std::getenv("XDG_CACHE_HOME")) return std::string(value) + "/lora";
  if (const char* value = std::getenv("HOME")) return std::string(value) + "/.cache/lora";
  return ".lora-cache";
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

struct LoraFlags {
  int64_t r = 8;
  double alpha = 16;
  double dropout = 0.1;
  std::string targets;  // empty: the family's query and value projections
  bool rslora = false;
  bool dora = false;
};

void add_lora_flags(CLI::App& app, LoraFlags& flags) {
  app.add_option("--r", flags.r, "LoRA rank")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--alpha", flags.alpha, "LoRA alpha (scaling alpha/r)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--dropout", flags.dropout, "dropout on the adapter input")->check(CLI::Range(0.0, 0.999))
      ->capture_default_str();
  app.add_option("--targets", flags.targets,
                 "comma-separated module names to adapt (default: query,value; DistilBERT: q_lin,v_lin)");
  app.add_flag("--rslora", flags.rslora, "scale by alpha/sqrt(r)");
  app.add_flag("--dora", flags.dora, "DoRA: learn a magnitude vector too");
}

lora::LoraConfig adapter_config(const LoraFlags& flags, const std::string& base,
                                const std::vector<std::string>& default_targets) {
  // SEQ_CLS: the classifier trains in full and is saved with the adapter, as in PEFT.
  return lora::LoraConfig(lora::LoRAOptions(flags.r)
                              .alpha(flags.alpha)
                              .dropout(flags.dropout)
                              .use_rslora(flags.rslora)
                              .use_dora(flags.dora))
      .target_modules(flags.targets.empty() ? default_targets : split_list(flags.targets))
      .task_type("SEQ_CLS")
      .base_model_name_or_path(base);
}

/// Loads a model folder of any supported family with its tokenizer, and checks that the
/// tokenizer and the model have the same vocabulary size (a wrong vocabulary file otherwise
/// goes unnoticed until its ids index the wrong embeddings).
std::pair<lora::models::SequenceClassifier, std::shared_ptr<lora::tokenizers::Tokenizer>> load_model(
    const std::string& folder) {
  TORCH_CHECK(fs::is_directory(folder), "model folder '", folder, "' does not exist");
  auto tokenizer = lora::tokenizers::load_tokenizer(folder);
  auto model = lora::models::load_sequence_classifier(folder);
  TORCH_CHECK(tokenizer->vocab_size() == model.vocab_size(), "the ", tokenizer->kind(), " tokenizer of '", folder,
              "' has ", tokenizer->vocab_size(), " tokens but the model's vocab_size is ", model.vocab_size());
  model.module().eval();
  return {model, tokenizer};
}

/// train and eval measure binary sentiment (label 0 negative, 1 positive); a model with other
/// labels (cardiffnlp's negative/neutral/positive) would be scored wrongly, so it is refused.
void require_binary(const lora::models::SequenceClassifier& model, const std::string& folder) {
  std::string names;
  for (const auto& [id, label] : model.id2label()) names += (names.empty() ? "" : ", ") + std::to_string(id) + " " + label;
  TORCH_CHECK(model.num_labels() == 2, "'", folder, "' classifies into ", model.num_labels(), " labels (", names,
              "); train and eval need a binary model (0 negative, 1 positive). predict works with any labels");
}

std::string folder_name(const std::string& path) {
  auto normal = fs::path(path).lexically_normal();
  if (normal.filename().empty()) normal = normal.parent_path();
  return normal.filename().string();
}

/// Attaches a saved adapter, refusing one made for another base model unless `force`.
/// `model_folder` is the model's folder or hub name, as `train` records it.
void attach_adapter(const lora::models::SequenceClassifier& model, const std::string& adapter,
                    const std::string& model_folder, bool force = false) {
  TORCH_CHECK(fs::is_directory(adapter), "adapter folder '", adapter, "' does not exist");
  const auto config = lora::io::read_adapter_config(adapter, "default", /*warn=*/nullptr);  // load_adapter warns
  const auto base = config.base_model_name_or_path();
  TORCH_CHECK(force || base.empty() || folder_name(base) == folder_name(model_folder), "the adapter in '", adapter,
              "' was trained on base model '", base, "', not on '", model_folder,
              "' (pass --force to load it anyway)");
  lora::io::load_adapter(model.module(), adapter);
  model.module().eval();
}

// ---- the built-in demo --------------------------------------------------------------------

struct DemoOptions {
  std::string cache = default_cache();
  uint64_t seed = 0;
  int64_t pretrain_steps = 4000;
  int64_t epochs = 8;
};

lora::models::BertConfig demo_config(int64_t vocab_size) {
  lora::models::BertConfig config;
  config.vocab_size = vocab_size;
  config.hidden_size = 64;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 4;
  config.intermediate_size = 128;
  config.max_position_embeddings = 48;
  config.hidden_dropout_prob = 0.1;
  config.attention_probs_dropout_prob = 0.1;
  return config;
}

/// The pretrained demo backbone: from the cache, or pretrained now and cached.
std::string demo_backbone(const DemoOptions& options) {
  const auto folder = fs::path(options.cache) / ("sentiment-demo-v4-seed" + std::to_string(options.seed));
  if (fs::exists(folder / "model.safetensors") && fs::exists(folder / "config.json") && fs::exists(folder / "vocab.txt")) {
    std::cout << "pretrained backbone: " << folder.string() << " (cached)\n";
    return folder.string();
  }
  std::cout << "pretraining a small BERT (masked language model + topic of the review) on generated reviews (cached in "
            << folder.string() << ")\n";
  fs::create_directories(folder);
  const auto vocab = sentiment::demo_vocabulary();
  const auto vocab_file = (folder / "vocab.tmp").string();
  {
    std::ofstream out(vocab_file);
    for (const auto& token : vocab) out << token << "\n";
  }
  lora::tokenizers::WordPieceTokenizer tokenizer(vocab);
  torch::manual_seed(options.seed);
  lora::models::BertForSequenceClassification model(demo_config(static_cast<int64_t>(vocab.size())));
  lora::models::init_bert_weights(*model);
  sentiment::Generator generator(options.seed + 101);
  std::vector<std::string> corpus;
  for (int i = 0; i < 20000; ++i) corpus.push_back(generator.document());
  sentiment::pretrain_mlm(model->bert, corpus, tokenizer, generator.lexicon().nouns, options.pretrain_steps, 64, 1e-3,
                          options.seed);
  lora::models::save_bert(*model, folder.string(), vocab_file);
  fs::remove(vocab_file);
  return folder.string();
}

int run_demo(const DemoOptions& options) {
  const auto started = std::chrono::steady_clock::now();
  const auto backbone = demo_backbone(options);
  const auto tokenizer_ptr = load_model(backbone).second;
  const auto& tokenizer = *tokenizer_ptr;

  sentiment::Generator train_generator(options.seed + 1), test_generator(options.seed + 2);
  const auto train_examples = train_generator.examples(3000);
  const auto dev_examples = train_generator.examples(500);
  const auto test_examples = test_generator.examples(2000);
  lora::data::BatcherOptions batching;
  batching.batch_size = 32;
  batching.max_length = 48;
  lora::data::Batcher dev(dev_examples, tokenizer, batching), test(test_examples, tokenizer, batching);
  batching.shuffle = true;
  batching.seed = options.seed;
  lora::data::Batcher train_set(train_examples, tokenizer, batching);
  std::cout << "task: generated reviews with negation (\"not bad\") and contrast (\"good , but boring\"); "
            << train_examples.size() << " training, " << test_examples.size() << " held-out sentences\n"
            << "  e.g. \"" << test_examples[0].text << "\" -> " << (test_examples[0].label ? "positive" : "negative")
            << "\n\n";

  struct Row {
    std::string name;
    lora::ParameterCount count;
    sentiment::Metrics test;
  };
  std::vector<Row> rows;
  for (const std::string mode : {"head", "lora"}) {
    auto [model, unused] = load_model(backbone);
    torch::manual_seed(options.seed + 7);
    // The head is BERT's: pooler and classifier, trained in full in both runs.
    if (mode == "head") {
      for (auto& parameter : model.module().parameters()) parameter.requires_grad_(false);
      lora::add_modules_to_save(model.module(), {"classifier", "pooler.dense"});
    } else {
      lora::inject(model.module(), lora::LoraConfig(lora::LoRAOptions(8).alpha(16))
                               .target_modules({"query", "value"})
                               .modules_to_save({"classifier", "pooler.dense"}));
    }
    const auto count = lora::count_parameters(model.module());
    std::cout << (mode == "head" ? "frozen backbone, trained head (pooler + classifier)" : "LoRA r=8 on query/value + head")
              << ": "
              << count.to_string() << "\n";
    sentiment::TrainOptions training;
    training.epochs = options.epochs;
    training.lr = 2e-3;
    training.weight_decay = 0.0;
    training.progress = std::getenv("LORA_DEMO_VERBOSE") != nullptr;
    const auto result = sentiment::train(model, train_set, dev, training);
    rows.push_back({mode, count, sentiment::evaluate(model, test)});
    std::cout << "  dev accuracy " << std::fixed << std::setprecision(3) << result.best.accuracy << ", "
              << std::setprecision(1) << result.seconds << " s\n"
              << std::defaultfloat;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::cout << "\nheld-out accuracy (" << test_examples.size() << " sentences):\n" << std::fixed;
  for (const auto& row : rows) {
    std::cout << "  " << std::left << std::setw(28)
              << (row.name == "head" ? "head only (frozen backbone)" : "LoRA (query/value) + head") << std::right
              << std::setprecision(3) << row.test.accuracy << "   trained " << std::setprecision(2)
              << row.count.trainable_percent() << "% of " << row.count.total << " parameters\n";
  }
  const double gain = rows[1].test.accuracy - rows[0].test.accuracy;
  std::cout << std::setprecision(1) << "LoRA gains " << 100 * gain << " accuracy points over head-only; total "
            << seconds << " s\n";
  return 0;
}

// ---- train / eval / predict -------------------------------------------------------------

struct TrainFlags {
  std::string model, hf_model, data, train_file, dev_file, out, mode = "lora";
  LoraFlags lora;
  int64_t epochs = 3, steps = 0, batch_size = 32, max_length = 128, eval_every = 0;
  double lr = 5e-4, weight_decay = 0.01, warmup_ratio = 0.06, clip = 1.0;
  uint64_t seed = 13;
  bool merge = false;
  bool resume = false;
  int64_t stop_after = 0;
  int64_t checkpoint_every = 0;
  bool skip_nonfinite = false;
  double model_dropout = -1;  // < 0: the model config's
  std::string batching = "buckets";
  bool distributed = false;
  bool int8_base = false;
};

lora::data::Examples read_split(const std::string& path) {
  const auto layout = fs::path(path).extension() == ".tsv" ? lora::data::Layout::kGlue : lora::data::Layout::kTextLabel;
  return lora::data::read_tsv(path, layout);
}

/// Sets the probability of every dropout layer of the model (not the adapters').
void set_model_dropout(torch::nn::Module& model, double p) {
  for (const auto& module : model.modules()) {
    if (auto* dropout = module->as<torch::nn::DropoutImpl>()) dropout->options.p(p);
  }
}

int run_train(const TrainFlags& flags) {
  // Data parallel when asked, or when launched as one rank of several (torchrun, scripts/launch.sh).
#ifdef LORA_SENTIMENT_DISTRIBUTED
  std::optional<lora::distributed::ProcessGroup> group;
  if (flags.distributed || lora::distributed::launched_distributed()) {
    group.emplace(lora::distributed::options_from_environment());
  }
  sentiment::Parallel parallel = group ? sentiment::Parallel(*group) : sentiment::Parallel();
#else
  TORCH_CHECK(!flags.distributed, "--distributed: this lora-sentiment was built without lora::distributed "
              "(configure with -DLORA_DISTRIBUTED=ON; Debian: libgloo-dev)");
  sentiment::Parallel parallel;
#endif
  std::ostream null_output(nullptr);  // ranks other than 0 print nothing
  std::ostream& out = parallel.is_main() ? std::cout : null_output;

  std::string train_path = flags.train_file, dev_path = flags.dev_file;
  if (!flags.data.empty()) {
    TORCH_CHECK(fs::is_directory(flags.data), "--data folder '", flags.data, "' does not exist");
    train_path = (fs::path(flags.data) / "train.tsv").string();
    dev_path = (fs::path(flags.data) / "dev.tsv").string();
  }
  TORCH_CHECK(!train_path.empty() && !dev_path.empty(), "give --data DIR, or both --train FILE and --dev FILE");
  auto [model, tokenizer_ptr] = load_model(flags.model);
  require_binary(model, flags.model);
  const auto& tokenizer = *tokenizer_ptr;
  const auto train_examples = read_split(train_path).examples;
  const auto dev_examples = read_split(dev_path).examples;
  out << "model " << flags.model << " (" << model.model_type() << ", " << tokenizer.kind() << " tokenizer): "
            << train_examples.size() << " training and " << dev_examples.size() << " dev sentences\n";

  torch::manual_seed(flags.seed);
  const auto config =
      adapter_config(flags.lora, flags.hf_model.empty() ? flags.model : flags.hf_model, model.default_targets());
  TORCH_CHECK(!flags.int8_base || flags.mode == "lora", "--int8-base: only --mode lora keeps the base frozen (got --mode ",
              flags.mode, ")");
  if (flags.mode == "lora") {
    lora::inject(model.module(), config);
    if (flags.int8_base) {
      const auto report = lora::quantize_base(model.module());
      out << "int8 base: " << report.layers.size() << " linear layers, " << report.fp32_bytes / 1000000 << " MB fp32 -> "
          << report.int8_bytes / 1000000 << " MB int8\n";
    }
  } else if (flags.mode == "head") {
    // The family's head (BERT: pooler and classifier, as in the demo; DistilBERT: pre_classifier
    // and classifier; RoBERTa: classifier) trains in place; the result is saved as a whole model.
    for (auto& parameter : model.module().parameters()) parameter.requires_grad_(false);
    for (const auto& item : model.module().named_modules()) {
      const auto& heads = model.head_modules();
      if (std::find(heads.begin(), heads.end(), item.key()) == heads.end()) continue;
      for (auto& parameter : item.value()->parameters()) parameter.requires_grad_(true);
    }
  } else {
    lora::mark_all_as_trainable(model.module());
  }
  out << "mode " << flags.mode << ": " << lora::count_parameters(model.module()).to_string() << "\n";

  if (flags.model_dropout >= 0) set_model_dropout(model.module(), flags.model_dropout);
  // Each rank its own dropout draws (rank 0 keeps the single-process stream).
  if (parallel.rank() > 0) torch::manual_seed(flags.seed + 1000003ULL * static_cast<uint64_t>(parallel.rank()));
  if (parallel.world_size() > 1) {
    out << "data parallel: " << parallel.world_size() << " processes, " << flags.batch_size
        << " rows per step in all (about " << flags.batch_size / parallel.world_size() << " each)\n";
  }

  lora::data::BatcherOptions batching;
  batching.batch_size = flags.batch_size;
  batching.max_length = std::min(flags.max_length, model.max_tokens());
  lora::data::Batcher dev(dev_examples, tokenizer, batching);
  batching.shuffle = true;
  batching.seed = flags.seed;
  batching.bucket = flags.batching == "buckets";
  if (flags.batching == "max-length") batching.padding = lora::tokenizers::Padding::kMaxLength;
  lora::data::Batcher train_set(train_examples, tokenizer, batching);
  out << "batching " << flags.batching << ": " << std::fixed << std::setprecision(1)
      << 100 * train_set.padding_ratio(0) << " padding tokens per 100 real ones (first epoch)\n";
  out.unsetf(std::ios::fixed);

  fs::create_directories(flags.out);
  sentiment::TrainOptions training;
  training.epochs = flags.epochs;
  training.steps = flags.steps;
  training.lr = flags.lr;
  training.weight_decay = flags.weight_decay;
  training.warmup_ratio = flags.warmup_ratio;
  training.clip = flags.clip;
  training.eval_every = flags.eval_every;
  training.metrics_path = (fs::path(flags.out) / "metrics.jsonl").string();
  training.checkpoint_dir = (fs::path(flags.out) / "checkpoint").string();
  training.resume = flags.resume;
  training.stop_after = flags.stop_after;
  training.checkpoint_every = flags.checkpoint_every;
  training.skip_nonfinite = flags.skip_nonfinite;
  training.interrupt = &interrupted;
  training.parallel = &parallel;
  std::signal(SIGINT, on_interrupt);
  std::signal(SIGTERM, on_interrupt);  // what job schedulers (and scripts/launch.sh) send
  auto save_best = [&](int64_t) {
    if (flags.mode != "lora") {
      model.save((fs::path(flags.out) / "best").string(), lora::models::tokenizer_files(flags.model));
    } else {
      lora::io::save_adapter(model.module(), (fs::path(flags.out) / "adapter").string());
    }
  };
  const auto result = sentiment::train(model, train_set, dev, training, save_best);
  if (parallel.world_size() > 1) {
    out << "gradient all-reduce: " << parallel.gradient_bytes() << " bytes per step\n";
  }
  if (result.interrupted) return 130;
  if (!parallel.is_main()) return 0;
  if (result.seconds > 0 && result.tokens > 0) {
    out << std::fixed << std::setprecision(0) << result.tokens / result.seconds << " real tokens/s ("
        << result.padded_tokens / result.seconds << " with padding) over " << std::setprecision(1) << result.seconds
        << " s, evaluation included\n";
  }  // rank 0 writes the chart and the merged model
  if (result.skipped > 0) out << result.skipped << " step(s) skipped for a non-finite loss or gradient\n";
  std::ofstream(fs::path(flags.out) / "learning_curve.svg")
      << sentiment::learning_curve_svg(result.history, "lora-sentiment: " + flags.mode);
  out << std::fixed << std::setprecision(4) << "best dev accuracy " << result.best.accuracy << " (F1 "
            << result.best.f1 << ") at step " << result.best_step << "; " << std::setprecision(1) << result.seconds
            << " s\nwrote " << flags.out << "/" << (flags.mode != "lora" ? "best" : "adapter")
            << ", metrics.jsonl, learning_curve.svg\n";
  if (flags.merge && flags.mode != "lora") out << "--merge ignored: --mode " << flags.mode << " saved a whole model\n";
  if (flags.merge && flags.mode == "lora") {
    auto [best, unused] = load_model(flags.model);
    attach_adapter(best, (fs::path(flags.out) / "adapter").string(), config.base_model_name_or_path());
    lora::merge_and_unload(best.module(), /*safe_merge=*/true);
    best.save((fs::path(flags.out) / "merged").string(), lora::models::tokenizer_files(flags.model));
    out << "wrote " << flags.out << "/merged (a plain Hugging Face " << best.model_type() << " folder)\n";
  }
  return 0;
}

int run_eval(const std::string& model_folder, const std::string& identity, const std::string& adapter,
             const std::string& data, int64_t batch, bool force, bool int8_base) {
  auto [model, tokenizer] = load_model(model_folder);
  require_binary(model, model_folder);
  if (!adapter.empty()) attach_adapter(model, adapter, identity, force);
  if (int8_base) {
    const auto report = lora::quantize_base(model.module());
    std::cout << "int8 base: " << report.layers.size() << " linear layers\n";
  }
  const auto start = std::chrono::steady_clock::now();
  const auto examples = read_split(data).examples;
  lora::data::BatcherOptions batching;
  batching.batch_size = batch;
  batching.max_length = std::min<int64_t>(batching.max_length, model.max_tokens());
  const auto m = sentiment::evaluate(model, lora::data::Batcher(examples, *tokenizer, batching));
  std::cout << std::fixed << std::setprecision(4) << "examples " << m.count() << "\naccuracy " << m.accuracy
            << "\nf1 " << m.f1 << "\nloss " << m.loss << "\nconfusion (rows: true 0/1, columns: predicted 0/1)\n  "
            << m.true_negative << " " << m.false_positive << "\n  " << m.false_negative << " " << m.true_positive
            << "\nseconds " << std::setprecision(2)
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << "\n";
  return 0;
}

int run_predict(const std::string& model_folder, const std::string& identity, const std::string& adapter,
                std::vector<std::string> sentences, const std::string& file, bool force) {
  auto [model, tokenizer] = load_model(model_folder);
  if (!adapter.empty()) attach_adapter(model, adapter, identity, force);
  if (!file.empty()) {
    std::ifstream in(file);
    TORCH_CHECK(in, "cannot open '", file, "'");
    for (std::string line; std::getline(in, line);) sentences.push_back(line);
  } else if (sentences.empty()) {
    for (std::string line; std::getline(std::cin, line);) sentences.push_back(line);
  }
  const auto& labels = model.id2label();
  torch::NoGradGuard no_grad;
  for (size_t start = 0; start < sentences.size(); start += 64) {
    const std::vector<std::string> chunk(sentences.begin() + static_cast<std::ptrdiff_t>(start),
                                         sentences.begin() + static_cast<std::ptrdiff_t>(std::min(sentences.size(), start + 64)));
    const auto batch = tokenizer->encode_batch(chunk, model.max_tokens());
    const auto probabilities = torch::softmax(model.forward(batch), -1);
    for (size_t i = 0; i < chunk.size(); ++i) {
      const auto label = probabilities[static_cast<int64_t>(i)].argmax().item<int64_t>();
      const auto name = labels.count(label) ? labels.at(label) : (label == 1 ? "positive" : "negative");
      std::cout << name << "\t" << std::fixed << std::setprecision(4)
                << probabilities[static_cast<int64_t>(i)][label].item<double>() << "\t" << chunk[i] << "\n";
    }
  }
  return 0;
}

struct ServeFlags {
  std::vector<std::string> adapters;  ///< NAME=FOLDER
  int port = -1;                      ///< -1: JSON lines on stdin/stdout
  std::string host = "127.0.0.1";
  int64_t max_batch = 32;
  double max_wait_ms = 5;
  size_t max_text_bytes = 8192;
};

volatile std::sig_atomic_t serve_stop_requested = 0;

int run_serve(const std::string& model_folder, const ServeFlags& flags) {
  auto [model, tokenizer] = load_model(model_folder);
  sentiment::ServerOptions options;
  options.max_batch = flags.max_batch;
  options.max_wait = std::chrono::microseconds(static_cast<int64_t>(flags.max_wait_ms * 1000));
  options.max_text_bytes = flags.max_text_bytes;
  sentiment::ClassifyServer server(model, tokenizer, options);
  for (const auto& item : flags.adapters) {
    const auto equals = item.find('=');
    TORCH_CHECK(equals != std::string::npos && equals > 0, "--adapter takes NAME=FOLDER (got '", item, "')");
    try {
      server.load(item.substr(0, equals), item.substr(equals + 1));
    } catch (const sentiment::RequestError& error) {
      TORCH_CHECK(false, "--adapter ", item, ": ", error.what());
    }
  }
  std::cerr << "serving " << model_folder << " with " << server.adapters().size() << " adapter(s); batches of up to "
            << flags.max_batch << ", waiting up to " << flags.max_wait_ms << " ms\n";
  if (flags.port < 0) {
    sentiment::serve_json_lines(server, std::cin, std::cout);
    return 0;
  }
  sentiment::HttpFrontEnd http(server);
  const int port = http.bind(flags.host, flags.port);
  std::cout << "listening on http://" << flags.host << ":" << port << std::endl;
  // Ctrl-C / SIGTERM: the handler only sets a flag; this thread stops the server.
  std::signal(SIGINT, [](int) { serve_stop_requested = 1; });
  std::signal(SIGTERM, [](int) { serve_stop_requested = 1; });
  std::atomic<bool> stopped{false};
  std::thread watcher([&] {
    // stop() only acts once the server runs: keep asking until run() has returned.
    while (!stopped) {
      if (serve_stop_requested) http.stop();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  http.run();
  stopped = true;
  watcher.join();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"lora-sentiment: fine-tune BERT, DistilBERT or RoBERTa for sentiment with LoRA (no arguments: the built-in demo)"};
  app.fallthrough();  // --threads also after a command
  int threads = default_threads();
  app.add_option("--threads", threads, "intra-op threads (default: all cores, or OMP_NUM_THREADS)")
      ->check(CLI::PositiveNumber);
  DemoOptions demo;
  app.add_option("--cache", demo.cache, "where the demo keeps its pretrained backbone")->capture_default_str();
  app.add_option("--seed", demo.seed, "demo seed")->capture_default_str();
  app.add_option("--pretrain-steps", demo.pretrain_steps, "demo pretraining steps")->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--epochs", demo.epochs, "demo fine-tuning epochs")->check(CLI::PositiveNumber)->capture_default_str();

  TrainFlags train;
  auto* train_cmd = app.add_subcommand("train", "fine-tune a Hugging Face BERT, DistilBERT or RoBERTa folder");
  train_cmd->add_option("--model", train.model,
                        "model folder: config.json, model.safetensors and vocab.txt, vocab.json + merges.txt, or tokenizer.json");
  train_cmd->add_option("--hf-model", train.hf_model,
                        "download a Hugging Face model instead (e.g. bert-base-uncased; HF_ENDPOINT, HF_HOME)");
  train_cmd->add_option("--data", train.data, "GLUE SST-2 folder with train.tsv and dev.tsv");
  train_cmd->add_option("--train", train.train_file, "training file (.tsv: GLUE layout; else text<TAB>label)");
  train_cmd->add_option("--dev", train.dev_file, "dev file");
  train_cmd->add_option("--out", train.out, "output folder")->required();
  train_cmd->add_option("--mode", train.mode, "lora, full or head")->check(CLI::IsMember({"lora", "full", "head"}))
      ->capture_default_str();
  add_lora_flags(*train_cmd, train.lora);
  train_cmd->add_option("--epochs", train.epochs, "epochs")->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--steps", train.steps, "optimizer steps (overrides --epochs)")->check(CLI::NonNegativeNumber);
  train_cmd->add_option("--batch-size", train.batch_size, "batch size")->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--lr", train.lr, "peak learning rate")->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--weight-decay", train.weight_decay, "AdamW weight decay")->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  train_cmd->add_option("--warmup-ratio", train.warmup_ratio, "share of steps with linear warmup")
      ->check(CLI::Range(0.0, 1.0))->capture_default_str();
  train_cmd->add_option("--clip", train.clip, "max gradient norm (0: off)")->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  train_cmd->add_option("--seed", train.seed, "seed")->capture_default_str();
  train_cmd->add_option("--max-length", train.max_length, "tokens per sentence")->check(CLI::Range(2, 512))
      ->capture_default_str();
  train_cmd->add_option("--eval-every", train.eval_every, "evaluate every N steps (0: each epoch)")
      ->check(CLI::NonNegativeNumber);
  train_cmd->add_flag("--merge", train.merge, "also write a merged Hugging Face folder (out/merged)");
  train_cmd->add_flag("--resume", train.resume,
                      "continue the run in --out from its last checkpoint (Ctrl-C, or --checkpoint-every before a kill)");
  train_cmd->add_option("--checkpoint-every", train.checkpoint_every,
                        "also write a checkpoint every N steps, so that a killed run resumes (0: only on Ctrl-C)")
      ->check(CLI::NonNegativeNumber);
  train_cmd->add_flag("--skip-nonfinite", train.skip_nonfinite,
                      "skip a step whose loss or gradient is NaN/Inf (default: stop with an error naming the step)");
  train_cmd->add_option("--batching", train.batching,
                         "buckets: batches of similar lengths, dynamically padded; random: shuffled rows, "
                         "dynamically padded; max-length: shuffled rows padded to --max-length")
      ->check(CLI::IsMember({"buckets", "random", "max-length"}))
      ->capture_default_str();
  train_cmd->add_option("--model-dropout", train.model_dropout,
                         "dropout probability of the model's own layers (default: its config's)")
      ->check(CLI::Range(0.0, 0.999));
  train_cmd->add_flag("--int8-base", train.int8_base,
                      "--mode lora over an int8 copy of the frozen linear weights (lora::quantize_base)");
  train_cmd->add_flag("--distributed", train.distributed,
                      "one rank of a data-parallel run: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets "
                      "them (implied when they are set); --batch-size is the global batch");
  train_cmd->add_option("--stop-after", train.stop_after, "stop as if interrupted after N steps (testing)")
      ->check(CLI::NonNegativeNumber)->group("");

  std::string model_folder, hf_model, adapter, data, file;
  int64_t batch = 64;
  bool force = false;
  std::vector<std::string> sentences;
  auto* eval_cmd = app.add_subcommand("eval", "accuracy, F1 and confusion matrix on a labelled file");
  eval_cmd->add_option("--model", model_folder, "model folder (or a merged one)");
  eval_cmd->add_option("--hf-model", hf_model, "download a Hugging Face model instead");
  eval_cmd->add_option("--adapter", adapter, "PEFT adapter folder");
  eval_cmd->add_option("--data", data, "labelled file (.tsv: GLUE layout; else text<TAB>label)")->required();
  eval_cmd->add_option("--batch-size", batch, "batch size")->check(CLI::PositiveNumber);
  eval_cmd->add_flag("--force", force, "load an adapter trained on another base model");
  bool int8_base = false;
  eval_cmd->add_flag("--int8-base", int8_base, "store the frozen linear weights int8 (lora::quantize_base)");
  auto* predict_cmd = app.add_subcommand("predict", "label and probability for each sentence (arguments, --file or stdin)");
  predict_cmd->add_option("--model", model_folder, "model folder (or a merged one)");
  predict_cmd->add_option("--hf-model", hf_model, "download a Hugging Face model instead");
  predict_cmd->add_option("--adapter", adapter, "PEFT adapter folder");
  predict_cmd->add_option("--file", file, "one sentence per line");
  predict_cmd->add_option("sentences", sentences, "sentences to classify");
  predict_cmd->add_flag("--force", force, "load an adapter trained on another base model");

  ServeFlags serve;
  auto* serve_cmd = app.add_subcommand(
      "serve", "classify requests for many adapters at once, batched together: JSON lines on stdin/stdout, or HTTP");
  serve_cmd->add_option("--model", model_folder, "model folder");
  serve_cmd->add_option("--hf-model", hf_model, "download a Hugging Face model instead");
  serve_cmd->add_option("--adapter", serve.adapters, "NAME=FOLDER: a PEFT adapter to serve as NAME (repeatable)");
  serve_cmd->add_option("--http", serve.port, "serve HTTP on this port (0: any free port) instead of JSON lines")
      ->check(CLI::Range(0, 65535));
  serve_cmd->add_option("--host", serve.host, "HTTP address to bind")->capture_default_str();
  serve_cmd->add_option("--max-batch", serve.max_batch, "requests per forward pass at most")->check(CLI::PositiveNumber)
      ->capture_default_str();
  serve_cmd->add_option("--max-wait-ms", serve.max_wait_ms, "how long a request waits for others to join its batch")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  serve_cmd->add_option("--max-text-bytes", serve.max_text_bytes, "longer texts are refused (413)")
      ->check(CLI::PositiveNumber)->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  torch::set_num_threads(threads);
  try {
    auto resolve = [](std::string& folder, const std::string& hub_name) {
      TORCH_CHECK(folder.empty() != hub_name.empty(), "give --model DIR or --hf-model NAME (one of them)");
      if (!hub_name.empty()) folder = sentiment::fetch_hf_model(hub_name);
    };
#ifdef LORA_SENTIMENT_DISTRIBUTED
    // Every rank would download into the same cache files at once.
    TORCH_CHECK(!*train_cmd || train.hf_model.empty() || !(train.distributed || lora::distributed::launched_distributed()),
                "--hf-model with several processes: download once first (lora-sentiment train --hf-model ", train.hf_model,
                " --steps 1 ..., or any command with --hf-model), then give every rank --model with the cached folder");
#endif
    if (*train_cmd) resolve(train.model, train.hf_model);
    if (*eval_cmd || *predict_cmd || *serve_cmd) resolve(model_folder, hf_model);
    const auto identity = hf_model.empty() ? model_folder : hf_model;  // what adapters record as their base
    if (*train_cmd) return run_train(train);
    if (*eval_cmd) return run_eval(model_folder, identity, adapter, data, batch, force, int8_base);
    if (*predict_cmd) return run_predict(model_folder, identity, adapter, sentences, file, force);
    if (*serve_cmd) return run_serve(model_folder, serve);
    return run_demo(demo);
  } catch (const c10::Error& error) {
    std::cerr << "lora-sentiment: " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "lora-sentiment: " << error.what() << "\n";
    return 1;
  }
}
