#pragma once

// Fine-tuning and evaluation loops for BertForSequenceClassification: LoRA, full or head-only,
// AdamW with linear warmup and decay, gradient clipping, periodic evaluation, metrics.

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <lora/data/batcher.hpp>
#include <lora/inject.hpp>
#include <lora/models/bert.hpp>
#include <torch/torch.h>

namespace sentiment {

struct Metrics {
  double accuracy = 0, f1 = 0, loss = 0;
  int64_t true_positive = 0, false_positive = 0, true_negative = 0, false_negative = 0;
  int64_t count() const { return true_positive + false_positive + true_negative + false_negative; }
};

/// Accuracy, F1 of the positive class, mean cross-entropy and the confusion matrix.
inline Metrics evaluate(lora::models::BertForSequenceClassificationImpl& model, const lora::data::Batcher& batcher) {
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  Metrics m;
  double loss_sum = 0;
  for (const auto& batch : batcher.epoch()) {
    const auto logits = model.forward(batch.inputs.input_ids, batch.inputs.attention_mask, batch.inputs.token_type_ids);
    loss_sum += torch::nn::functional::cross_entropy(logits, batch.labels,
                                                      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .item<double>();
    const auto predicted = logits.argmax(1);
    m.true_positive += (predicted.eq(1) & batch.labels.eq(1)).sum().item<int64_t>();
    m.false_positive += (predicted.eq(1) & batch.labels.eq(0)).sum().item<int64_t>();
    m.true_negative += (predicted.eq(0) & batch.labels.eq(0)).sum().item<int64_t>();
    m.false_negative += (predicted.eq(0) & batch.labels.eq(1)).sum().item<int64_t>();
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
};

inline std::string clock_time(double seconds) {
  const auto total = static_cast<int64_t>(std::max(0.0, seconds));
  std::ostringstream out;
  out << total / 60 << ":" << std::setw(2) << std::setfill('0') << total % 60;
  return out.str();
}

/// Trains every parameter that requires grad with AdamW (warmup, then linear decay to 0),
/// evaluating on `dev` periodically; `on_best(step)` runs when dev accuracy improves.
inline TrainResult train(lora::models::BertForSequenceClassificationImpl& model, const lora::data::Batcher& train_set,
                         const lora::data::Batcher& dev, const TrainOptions& options,
                         const std::function<void(int64_t)>& on_best = {}) {
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
  std::ofstream metrics;
  if (!options.metrics_path.empty()) metrics.open(options.metrics_path, std::ios::trunc);
  const bool tty = options.progress && ::isatty(STDERR_FILENO);

  TrainResult result;
  result.best.accuracy = -1;
  const auto start = std::chrono::steady_clock::now();
  int64_t step = 0, examples = 0;
  double running_loss = 0;
  int64_t running_count = 0;
  model.train();
  for (int64_t epoch = 0; step < total; ++epoch) {
    for (const auto& batch : train_set.epoch(epoch)) {
      if (step >= total) break;
      const double factor = step < warmup ? double(step + 1) / double(warmup)
                                          : double(total - step) / double(std::max<int64_t>(1, total - warmup));
      const double lr = options.lr * factor;
      for (auto& group : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
      optimizer.zero_grad();
      const auto logits = model.forward(batch.inputs.input_ids, batch.inputs.attention_mask, batch.inputs.token_type_ids);
      const auto loss = torch::nn::functional::cross_entropy(logits, batch.labels);
      loss.backward();
      if (options.clip > 0) torch::nn::utils::clip_grad_norm_(parameters, options.clip);
      optimizer.step();
      ++step;
      examples += batch.labels.size(0);
      running_loss += loss.item<double>();
      ++running_count;

      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (tty) {
        std::fprintf(stderr, "\r  step %lld/%lld  loss %.4f  lr %.2e  %.0f ex/s  ETA %s   ", (long long)step,
                     (long long)total, running_loss / running_count, lr, examples / std::max(elapsed, 1e-9),
                     clock_time(elapsed / step * (total - step)).c_str());
      }
      if (step % eval_every == 0 || step == total) {
        MetricRow row{step, double(step) / per_epoch, running_loss / running_count, lr, evaluate(model, dev)};
        running_loss = 0;
        running_count = 0;
        result.history.push_back(row);
        if (metrics.is_open()) {
          metrics << "{\"step\": " << row.step << ", \"epoch\": " << row.epoch << ", \"train_loss\": " << row.train_loss
                  << ", \"lr\": " << row.lr << ", \"dev_accuracy\": " << row.dev.accuracy << ", \"dev_f1\": " << row.dev.f1
                  << ", \"dev_loss\": " << row.dev.loss << "}\n";
          metrics.flush();
        }
        if (options.progress) {
          std::fprintf(stderr, "%s  step %lld  train loss %.4f  dev accuracy %.4f  F1 %.4f  loss %.4f\n", tty ? "\r" : "",
                       (long long)step, row.train_loss, row.dev.accuracy, row.dev.f1, row.dev.loss);
        }
        if (row.dev.accuracy > result.best.accuracy) {
          result.best = row.dev;
          result.best_step = step;
          if (on_best) on_best(step);
        }
      }
    }
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
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
