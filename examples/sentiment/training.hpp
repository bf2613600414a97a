#pragma once

// Fine-tuning and evaluation loops for any sequence classifier (BERT, DistilBERT, RoBERTa): LoRA, full or head-only,
// AdamW with linear warmup and decay, gradient clipping, periodic evaluation, metrics; on one
// process or as one rank of several (data parallel: each rank takes its share of every batch).

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <lora/data/batcher.hpp>
#include <lora/detail/atomic_file.hpp>
#include <lora/inject.hpp>
#include <lora/models/auto.hpp>
#include <torch/torch.h>

#include "parallel.hpp"

namespace sentiment {

struct Metrics {
  double accuracy = 0, f1 = 0, loss = 0;
  int64_t true_positive = 0, false_positive = 0, true_negative = 0, false_negative = 0;
  int64_t count() const { return true_positive + false_positive + true_negative + false_negative; }
};

/// Accuracy, F1 of the positive class, mean cross-entropy and the confusion matrix. With
/// `parallel`, each rank evaluates its share of every batch and all get the totals.
inline Metrics evaluate(const lora::models::SequenceClassifier& classifier, const lora::data::Batcher& batcher,
                        Parallel* parallel = nullptr) {
  auto& model = classifier.module();
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  Metrics m;
  double loss_sum = 0;
  Parallel single;
  auto& ranks = parallel ? *parallel : single;
  for (const auto& whole : batcher.epoch()) {
    const auto batch = ranks.share(whole);
    if (!batch) continue;
    const auto logits = classifier.forward(batch->inputs);
    loss_sum += torch::nn::functional::cross_entropy(logits, batch->labels,
                                                      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .item<double>();
    const auto predicted = logits.argmax(1);
    m.true_positive += (predicted.eq(1) & batch->labels.eq(1)).sum().item<int64_t>();
    m.false_positive += (predicted.eq(1) & batch->labels.eq(0)).sum().item<int64_t>();
    m.true_negative += (predicted.eq(0) & batch->labels.eq(0)).sum().item<int64_t>();
    m.false_negative += (predicted.eq(0) & batch->labels.eq(1)).sum().item<int64_t>();
  }
  if (ranks.world_size() > 1) {
    auto totals = torch::tensor({loss_sum, double(m.true_positive), double(m.false_positive), double(m.true_negative),
                                 double(m.false_negative)}, torch::kDouble);
    ranks.sum(totals);
    loss_sum = totals[0].item<double>();
    m.true_positive = totals[1].item<int64_t>();
    m.false_positive = totals[2].item<int64_t>();
    m.true_negative = totals[3].item<int64_t>();
    m.false_negative = totals[4].item<int64_t>();
  }
  const auto n = std::max<int64_t>(1, m.count());
  m.accuracy = static_cast<double>(m.true_positive + m.true_negative) / static_cast<double>(n);
  const double precision = m.true_positive + m.false_positive ? double(m.true_positive) / (m.true_positive + m.false_positive) : 0;
  const double recall = m.true_positive + m.false_negative ? double(m.true_positive) / (m.true_positive + m.false_negative) : 0;
  m.f1 = precision + recall > 0 ? 2 * precision * recall / (precision + recall) : 0;
  m.loss = loss_sum / static_cast<double>(n);
  model.train(was_training);
  return m;
}

struct TrainOptions {
  int64_t epochs = 3;
  int64_t steps = 0;  ///< overrides epochs when > 0
  double lr = 5e-4;
  double weight_decay = 0.01;
  double warmup_ratio = 0.06;
  double clip = 1.0;       ///< max gradient norm; 0: no clipping
  int64_t eval_every = 0;  ///< steps; 0: once per epoch
  bool progress = true;    ///< a live progress line on stderr
  std::string metrics_path;  ///< metrics.jsonl; empty: none
  /// Where an interrupted run leaves its state, and where `resume` finds it; empty: none.
  std::string checkpoint_dir;
  bool resume = false;
  /// Stop (as if interrupted) after this many steps in total; 0: never. For tests.
  int64_t stop_after = 0;
  /// Set asynchronously (Ctrl-C): the loop saves a checkpoint after the current step and stops.
  const std::atomic<bool>* interrupt = nullptr;
  /// Also write a checkpoint every this many steps (0: only when interrupted), so that a run
  /// killed outright (SIGKILL, power loss) resumes from the last one.
  int64_t checkpoint_every = 0;
  /// A step whose loss or gradient is not finite is skipped (with a notice) instead of
  /// stopping the run with an error naming the step.
  bool skip_nonfinite = false;
  /// This process's rank among several (data parallel); nullptr: one process.
  Parallel* parallel = nullptr;
};

/// One row of metrics.jsonl.
struct MetricRow {
  int64_t step;
  double epoch, train_loss, lr;
  Metrics dev;
};

struct TrainResult {
  Metrics best;
  int64_t best_step = 0;
  std::vector<MetricRow> history;
  double seconds = 0;
  bool interrupted = false;  ///< stopped early; a checkpoint was written
  int64_t steps = 0;         ///< steps done (in total, over resumed runs)
  int64_t skipped = 0;       ///< steps skipped for a non-finite loss or gradient (this run)
  int64_t tokens = 0;        ///< real (not padding) tokens trained on (this run)
  int64_t padded_tokens = 0; ///< tokens including padding (this run)
};

namespace detail {

inline nlohmann::json metrics_json(const Metrics& m) {
  return {{"accuracy", m.accuracy}, {"f1", m.f1}, {"loss", m.loss}, {"tp", m.true_positive},
          {"fp", m.false_positive}, {"tn", m.true_negative}, {"fn", m.false_negative}};
}

/// The 2-norm of all gradients together (what clip_grad_norm_ computes), without clipping.
inline double gradient_norm(const std::vector<torch::Tensor>& parameters) {
  auto total = torch::zeros({}, torch::kDouble);
  for (const auto& parameter : parameters) {
    if (parameter.grad().defined()) total += parameter.grad().norm().to(torch::kDouble).pow(2);  // no temporaries
  }
  return std::sqrt(total.item<double>());
}

inline Metrics metrics_from(const nlohmann::json& j) {
  Metrics m;
  m.accuracy = j.at("accuracy");
  m.f1 = j.at("f1");
  m.loss = j.at("loss");
  m.true_positive = j.at("tp");
  m.false_positive = j.at("fp");
  m.true_negative = j.at("tn");
  m.false_negative = j.at("fn");
  return m;
}

/// Everything a run needs to continue exactly: trainable tensors, optimizer moments, the
/// generator (dropout draws), step, running loss, best result and history. Written as one
/// folder, atomically (temporary folder, fsync, one rename): a run killed at any moment leaves
/// the previous checkpoint or the new one, complete.
struct Checkpoint {
  /// Collective: every rank calls it (each rank's generator is kept); rank 0 writes.
  static void save(const std::string& dir, const std::vector<torch::Tensor>& parameters,
                   torch::optim::Optimizer& optimizer, const TrainResult& result, int64_t step, double running_loss,
                   int64_t running_count, Parallel& parallel) {
    const auto generators = parallel.gather(at::detail::getDefaultCPUGenerator().get_state());
    if (!parallel.is_main()) return;
    std::vector<torch::Tensor> values;
    for (const auto& parameter : parameters) values.push_back(parameter.detach().clone());
    auto state = state_json(result, step, running_loss, running_count);
    state["world_size"] = parallel.world_size();
    lora::detail::replace_folder_atomically(
        dir,
        [&](const std::filesystem::path& folder) {
          torch::save(values, (folder / "trainable.pt").string());
          torch::save(optimizer, (folder / "optimizer.pt").string());
          for (size_t rank = 0; rank < generators.size(); ++rank) {
            torch::save(generators[rank], (folder / generator_file(static_cast<int>(rank))).string());
          }
          std::ofstream((folder / "state.json").string()) << state.dump(1);
        },
        "checkpoint", [](const std::string&) { return false; });
  }

  /// Rank 0's dropout generator in generator.pt, rank r's in generator-r.pt.
  static std::string generator_file(int rank) {
    return rank == 0 ? "generator.pt" : "generator-" + std::to_string(rank) + ".pt";
  }

  static nlohmann::json state_json(const TrainResult& result, int64_t step, double running_loss,
                                   int64_t running_count) {
    nlohmann::json state = {{"step", step},
                            {"running_loss", running_loss},
                            {"running_count", running_count},
                            {"best_step", result.best_step},
                            {"best", metrics_json(result.best)},
                            {"history", nlohmann::json::array()}};
    for (const auto& row : result.history) {
      state["history"].push_back({{"step", row.step}, {"epoch", row.epoch}, {"train_loss", row.train_loss},
                                  {"lr", row.lr}, {"dev", metrics_json(row.dev)}});
    }
    return state;
  }

  /// Every rank reads the folder rank 0 wrote (one machine, or a shared file system).
  static void load(const std::string& dir, const std::vector<torch::Tensor>& parameters,
                   torch::optim::Optimizer& optimizer, TrainResult& result, int64_t& step, double& running_loss,
                   int64_t& running_count, const Parallel& parallel) {
    TORCH_CHECK(std::filesystem::exists(dir + "/state.json"), "--resume: no checkpoint in '", dir, "'");
    std::ifstream in(dir + "/state.json");
    const auto state = nlohmann::json::parse(in);
    const int world_size = state.value("world_size", 1);
    TORCH_CHECK(world_size == parallel.world_size(), "--resume: the checkpoint in '", dir, "' was written by a run of ",
                world_size, " process(es); resume it with as many (this run has ", parallel.world_size(), ")");
    std::vector<torch::Tensor> values;
    torch::load(values, dir + "/trainable.pt");
    TORCH_CHECK(values.size() == parameters.size(), "--resume: the checkpoint in '", dir, "' holds ", values.size(),
                " trainable tensors but this run trains ", parameters.size(), " (different options?)");
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < values.size(); ++i) {
        TORCH_CHECK(values[i].sizes() == parameters[i].sizes(), "--resume: trainable tensor ", i, " has shape ",
                    values[i].sizes(), " in the checkpoint but ", parameters[i].sizes(), " here");
        parameters[i].copy_(values[i]);
      }
    }
    torch::load(optimizer, dir + "/optimizer.pt");
    torch::Tensor generator;
    torch::load(generator, dir + "/" + generator_file(parallel.rank()));
    auto default_generator = at::detail::getDefaultCPUGenerator();  // a handle: shares the generator
    default_generator.set_state(generator);
    step = state.at("step");
    running_loss = state.at("running_loss");
    running_count = state.at("running_count");
    result.best_step = state.at("best_step");
    result.best = metrics_from(state.at("best"));
    for (const auto& row : state.at("history")) {
      result.history.push_back({row.at("step"), row.at("epoch"), row.at("train_loss"), row.at("lr"),
                                metrics_from(row.at("dev"))});
    }
  }
};

}  // namespace detail

/// One line of metrics.jsonl (a non-finite value is written as null: JSON has no NaN).
inline std::string metrics_line(const MetricRow& row) {
  std::ostringstream out;
  auto number = [&](double value) -> std::ostream& { return std::isfinite(value) ? out << value : out << "null"; };
  out << "{\"step\": " << row.step << ", \"epoch\": " << row.epoch << ", \"train_loss\": ";
  number(row.train_loss) << ", \"lr\": ";
  number(row.lr) << ", \"dev_accuracy\": " << row.dev.accuracy << ", \"dev_f1\": " << row.dev.f1 << ", \"dev_loss\": ";
  number(row.dev.loss) << "}\n";
  return out.str();
}

inline std::string clock_time(double seconds) {
  const auto total = static_cast<int64_t>(std::max(0.0, seconds));
  std::ostringstream out;
  out << total / 60 << ":" << std::setw(2) << std::setfill('0') << total % 60;
  return out.str();
}

/// Trains every parameter that requires grad with AdamW (warmup, then linear decay to 0),
/// evaluating on `dev` periodically; `on_best(step)` runs when dev accuracy improves.
inline TrainResult train(const lora::models::SequenceClassifier& classifier, const lora::data::Batcher& train_set,
                         const lora::data::Batcher& dev, const TrainOptions& options,
                         const std::function<void(int64_t)>& on_best = {}) {
  auto& model = classifier.module();
  Parallel single;
  auto& parallel = options.parallel ? *options.parallel : single;
  const bool main = parallel.is_main();
  std::vector<torch::Tensor> parameters;
  for (const auto& parameter : model.parameters()) {
    if (parameter.requires_grad()) parameters.push_back(parameter);
  }
  TORCH_CHECK(!parameters.empty(), "train: nothing to train (every parameter is frozen)");
  torch::optim::AdamW optimizer(parameters,
                                torch::optim::AdamWOptions(options.lr).weight_decay(options.weight_decay));
  const auto per_epoch = static_cast<int64_t>(train_set.num_batches());
  const int64_t total = options.steps > 0 ? options.steps : options.epochs * per_epoch;
  const auto warmup = static_cast<int64_t>(std::round(options.warmup_ratio * static_cast<double>(total)));
  const int64_t eval_every = options.eval_every > 0 ? options.eval_every : per_epoch;
  const bool tty = options.progress && main && ::isatty(STDERR_FILENO);

  TrainResult result;
  result.best.accuracy = -1;
  const auto start = std::chrono::steady_clock::now();
  int64_t step = 0, examples = 0;
  double running_loss = 0;
  int64_t running_count = 0;
  if (options.resume) {
    detail::Checkpoint::load(options.checkpoint_dir, parameters, optimizer, result, step, running_loss, running_count,
                             parallel);
    if (main) std::fprintf(stderr, "resuming at step %lld of %lld\n", (long long)step, (long long)total);
  }
  parallel.train_together(parameters);  // rank 0's values everywhere, gradients summed from now on
  const int64_t first_step = step;
  std::ofstream metrics;
  if (!options.metrics_path.empty() && main) {
    // A resumed run rewrites the rows its checkpoint knows: rows a killed run wrote after its
    // last checkpoint are computed again (and identically) below.
    lora::detail::write_file_atomically(
        options.metrics_path, [&](std::ostream& out) { for (const auto& row : result.history) out << metrics_line(row); },
        "metrics.jsonl");
    metrics.open(options.metrics_path, std::ios::app);
  }
  model.train();
  bool interrupt_agreed = false;  // distributed: any rank's Ctrl-C, as of the last step
  for (int64_t epoch = step / per_epoch; step < total; ++epoch) {
    const auto batches = train_set.epoch(epoch);
    for (auto position = static_cast<size_t>(step - epoch * per_epoch); position < batches.size(); ++position) {
      const auto& batch = batches[position];
      if (step >= total) break;
      const bool interrupt_here = options.interrupt && options.interrupt->load();
      // Every rank must stop at the same step: with several, they agree through the last step's sums.
      const bool stop = (parallel.world_size() == 1 ? interrupt_here : interrupt_agreed) ||
                        (options.stop_after > 0 && step >= options.stop_after);
      if (stop && !options.checkpoint_dir.empty()) {
        detail::Checkpoint::save(options.checkpoint_dir, parameters, optimizer, result, step, running_loss,
                                 running_count, parallel);
        if (main) std::fprintf(stderr, "%sinterrupted at step %lld; checkpoint in %s (continue with --resume)\n",
                     tty ? "\n" : "", (long long)step, options.checkpoint_dir.c_str());
        result.interrupted = true;
        result.steps = step;
        model.eval();
        return result;
      }
      const double factor = step < warmup ? double(step + 1) / double(warmup)
                                          : double(total - step) / double(std::max<int64_t>(1, total - warmup));
      const double lr = options.lr * factor;
      for (auto& group : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
      optimizer.zero_grad();
      // The batch's mean loss, as each rank's summed loss over the global row count: summed over
      // ranks, losses and gradients are the single-process ones, however the rows are shared.
      const auto rows = batch.labels.size(0);
      double loss_value = 0;
      if (const auto share = parallel.share(batch)) {
        const auto logits = classifier.forward(share->inputs);
        const auto loss = torch::nn::functional::cross_entropy(
                              logits, share->labels,
                              torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
                          static_cast<double>(rows);
        loss_value = loss.item<double>();
        if (std::isfinite(loss_value)) loss.backward();
      }
      parallel.synchronize_gradients();
      if (parallel.world_size() > 1) {
        auto sums = torch::tensor({loss_value, interrupt_here ? 1.0 : 0.0}, torch::kDouble);
        parallel.sum(sums);
        loss_value = sums[0].item<double>();
        interrupt_agreed = sums[1].item<double>() > 0;
      }
      double gradient_norm = 0;
      if (std::isfinite(loss_value)) {  // the same gradients on every rank: the same decision
        gradient_norm = options.clip > 0 ? torch::nn::utils::clip_grad_norm_(parameters, options.clip)
                                         : detail::gradient_norm(parameters);
      }
      const bool finite = std::isfinite(loss_value) && std::isfinite(gradient_norm);
      if (!finite) {
        TORCH_CHECK(options.skip_nonfinite, "train: step ", step + 1, " has a non-finite ",
                    std::isfinite(loss_value) ? "gradient (norm " + std::to_string(gradient_norm) + ")"
                                              : "loss (" + std::to_string(loss_value) + ")",
                    "; the parameters are as after step ", step,
                    ". Lower the learning rate, or pass --skip-nonfinite to skip such steps");
        if (main) {
          std::fprintf(stderr, "%sstep %lld skipped: non-finite %s\n", tty ? "\n" : "", (long long)(step + 1),
                       std::isfinite(loss_value) ? "gradient" : "loss");
        }
        optimizer.zero_grad();
        ++result.skipped;
      } else {
        optimizer.step();
        examples += rows;
        result.tokens += batch.inputs.attention_mask.sum().item<int64_t>();
        result.padded_tokens += batch.inputs.attention_mask.numel();
        running_loss += loss_value;
        ++running_count;
      }
      ++step;
      // The mean training loss since the last evaluation (0 when every step since was skipped).
      const double mean_loss = running_count > 0 ? running_loss / static_cast<double>(running_count) : 0.0;

      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (tty) {
        const int filled = static_cast<int>(24 * step / total);
        std::fprintf(stderr, "\r  [%s%s] %lld/%lld  loss %.4f  lr %.2e  %.0f ex/s  ETA %s   ",
                     std::string(static_cast<size_t>(filled), '#').c_str(),
                     std::string(static_cast<size_t>(24 - filled), ' ').c_str(), (long long)step, (long long)total,
                     mean_loss, lr, examples / std::max(elapsed, 1e-9),
                     clock_time(elapsed / double(step - first_step) * double(total - step)).c_str());
      }
      if (step % eval_every == 0 || step == total) {
        MetricRow row{step, double(step) / per_epoch, mean_loss, lr, evaluate(classifier, dev, &parallel)};
        running_loss = 0;
        running_count = 0;
        result.history.push_back(row);
        if (metrics.is_open()) {
          metrics << metrics_line(row);
          metrics.flush();
        }
        if (options.progress && main) {
          std::fprintf(stderr, "%s  step %lld  train loss %.4f  dev accuracy %.4f  F1 %.4f  loss %.4f\n", tty ? "\r" : "",
                       (long long)step, row.train_loss, row.dev.accuracy, row.dev.f1, row.dev.loss);
        }
        if (row.dev.accuracy > result.best.accuracy) {
          result.best = row.dev;
          result.best_step = step;
          if (on_best && main) on_best(step);
        }
      }
      if (options.checkpoint_every > 0 && step % options.checkpoint_every == 0 && step < total &&
          !options.checkpoint_dir.empty()) {
        detail::Checkpoint::save(options.checkpoint_dir, parameters, optimizer, result, step, running_loss,
                                 running_count, parallel);
      }
    }
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.steps = step;
  if (!options.checkpoint_dir.empty() && main) std::filesystem::remove_all(options.checkpoint_dir);  // finished
  model.eval();
  return result;
}

/// A learning-curve chart: training loss and dev accuracy against steps, as a standalone SVG.
inline std::string learning_curve_svg(const std::vector<MetricRow>& history, const std::string& title) {
  const double width = 640, height = 360, left = 60, right = 60, top = 40, bottom = 50;
  std::ostringstream svg;
  svg << std::fixed << std::setprecision(1);
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << width / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">" << title << "</text>\n";
  if (history.empty()) return svg.str() + "</svg>\n";
  const double max_step = static_cast<double>(history.back().step);
  double max_loss = 1e-9;
  for (const auto& row : history) max_loss = std::max(max_loss, row.train_loss);
  auto x = [&](double step) { return left + (width - left - right) * step / std::max(1.0, max_step); };
  auto y = [&](double fraction) { return height - bottom - (height - top - bottom) * fraction; };
  svg << "<line x1=\"" << left << "\" y1=\"" << y(0) << "\" x2=\"" << width - right << "\" y2=\"" << y(0)
      << "\" stroke=\"black\"/>\n<line x1=\"" << left << "\" y1=\"" << y(0) << "\" x2=\"" << left << "\" y2=\"" << y(1)
      << "\" stroke=\"black\"/>\n<line x1=\"" << width - right << "\" y1=\"" << y(0) << "\" x2=\"" << width - right
      << "\" y2=\"" << y(1) << "\" stroke=\"black\"/>\n";
  for (int i = 0; i <= 4; ++i) {
    svg << "<text x=\"" << left - 6 << "\" y=\"" << y(i / 4.0) + 4 << "\" text-anchor=\"end\" fill=\"#c0392b\">"
        << std::setprecision(2) << max_loss * i / 4 << "</text>\n<text x=\"" << width - right + 6 << "\" y=\""
        << y(i / 4.0) + 4 << "\" fill=\"#2471a3\">" << i * 25 << "%</text>\n" << std::setprecision(1);
  }
  svg << "<text x=\"" << width / 2 << "\" y=\"" << height - 12 << "\" text-anchor=\"middle\">step (last "
      << history.back().step << ")</text>\n";
  auto polyline = [&](const char* color, const std::function<double(const MetricRow&)>& value) {
    svg << "<polyline fill=\"none\" stroke=\"" << color << "\" stroke-width=\"2\" points=\"";
    for (const auto& row : history) svg << x(static_cast<double>(row.step)) << "," << y(value(row)) << " ";
    svg << "\"/>\n";
  };
  polyline("#c0392b", [&](const MetricRow& row) { return row.train_loss / max_loss; });
  polyline("#2471a3", [](const MetricRow& row) { return row.dev.accuracy; });
  svg << "<text x=\"" << left + 10 << "\" y=\"" << top + 4 << "\" fill=\"#c0392b\">training loss</text>\n<text x=\""
      << left + 120 << "\" y=\"" << top + 4 << "\" fill=\"#2471a3\">dev accuracy</text>\n</svg>\n";
  return svg.str();
}

}  // namespace sentiment
