#pragma once

// lora-sentiment serve: one frozen model, many adapters, requests for any of them batched
// together. `ClassifyServer` is the transport-free core (a dynamic batcher over lora::MixedBatch
// plus adapter loading, unloading and hot-swap at run time); serve.hpp puts JSON lines and HTTP
// in front of it.

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <lora/io/hotswap.hpp>
#include <lora/io/peft.hpp>
#include <lora/lora.hpp>
#include <lora/models/auto.hpp>
#include <lora/tokenizers/tokenizer.hpp>

namespace sentiment {

/// A request refused on its own (the others go on), with the HTTP status that says why.
class RequestError : public std::runtime_error {
 public:
  RequestError(int status, const std::string& message) : std::runtime_error(message), status_(status) {}
  int status() const { return status_; }

 private:
  int status_;
};

struct ServerOptions {
  /// Requests in one forward pass at most.
  int64_t max_batch = 32;
  /// How long the first request of a batch waits for others to join it.
  std::chrono::microseconds max_wait{std::chrono::milliseconds(5)};
  /// Longer texts are refused (413): they would be cut to the model's positions anyway.
  size_t max_text_bytes = 8192;
};

struct Classification {
  int64_t label = 0;
  std::string label_name;
  std::vector<double> probabilities;
  std::string adapter;  ///< "" for the base model
  double latency_ms = 0;
  int64_t batch_size = 0;  ///< requests in the forward pass that answered this one
};

struct AdapterInfo {
  std::string name;
  std::string folder;
  int64_t r = 0;
  std::vector<std::string> target_modules;
};

class ClassifyServer {
 public:
  ClassifyServer(lora::models::SequenceClassifier model, std::shared_ptr<lora::tokenizers::Tokenizer> tokenizer,
                 ServerOptions options = {})
      : model_(std::move(model)), tokenizer_(std::move(tokenizer)), options_(options) {
    TORCH_CHECK(options_.max_batch > 0, "serve: max batch must be positive (got ", options_.max_batch, ")");
    model_.module().eval();
    worker_ = std::thread([this] { run(); });
  }

  ~ClassifyServer() {
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      stopping_ = true;
    }
    queue_changed_.notify_all();
    worker_.join();
  }

  ClassifyServer(const ClassifyServer&) = delete;
  ClassifyServer& operator=(const ClassifyServer&) = delete;

  /// Queues one text for `adapter` ("" : the base model). Throws RequestError at once for an
  /// unknown adapter (404), an empty or oversized text (400, 413).
  std::future<Classification> submit(std::string text, std::string adapter) {
    const auto arrived = std::chrono::steady_clock::now();
    if (text.empty()) throw RequestError(400, "'text' is empty");
    if (text.size() > options_.max_text_bytes) {
      throw RequestError(413, "'text' has " + std::to_string(text.size()) + " bytes; at most " +
                                  std::to_string(options_.max_text_bytes) + " are accepted");
    }
    // Not under the model's lock: a request must not wait for the forward pass in progress to queue.
    if (!adapter.empty() && !serves(adapter)) throw unknown(adapter);
    Pending pending{std::move(text), std::move(adapter), arrived, {}};
    auto future = pending.promise.get_future();
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      queue_.push_back(std::move(pending));
    }
    queue_changed_.notify_all();
    return future;
  }

  Classification classify(std::string text, std::string adapter) {
    return submit(std::move(text), std::move(adapter)).get();
  }

  std::vector<AdapterInfo> adapters() const {
    std::lock_guard<std::mutex> lock(adapters_mutex_);
    std::vector<AdapterInfo> list;
    for (const auto& [name, info] : adapters_) list.push_back(info);
    return list;
  }

  /// Loads a PEFT folder as adapter `name` (all or nothing). 409 if the name is taken.
  AdapterInfo load(const std::string& name, const std::string& folder) {
    check_name(name);
    std::lock_guard<std::mutex> lock(model_mutex_);
    if (serves(name)) throw RequestError(409, "adapter '" + name + "' is loaded already; hot-swap or unload it");
    const auto loaded = guarded([&] { return lora::io::load_adapter(model_.module(), folder, name, load_options(folder, name)); });
    model_.module().eval();
    const AdapterInfo info{name, folder, loaded.config.adapter().r(), loaded.config.target_modules()};
    std::lock_guard<std::mutex> adapters_lock(adapters_mutex_);
    return adapters_[name] = info;
  }

  /// Replaces adapter `name`'s values with a folder's; the others are untouched (all or nothing).
  lora::io::SwapKind hotswap(const std::string& name, const std::string& folder) {
    std::lock_guard<std::mutex> lock(model_mutex_);
    if (!serves(name)) throw unknown(name);
    const auto swapped =
        guarded([&] { return lora::io::hotswap_adapter(model_.module(), folder, name, load_options(folder, name)); });
    model_.module().eval();
    std::lock_guard<std::mutex> adapters_lock(adapters_mutex_);
    adapters_[name] = {name, folder, swapped.config.adapter().r(), swapped.config.target_modules()};
    return swapped.kind;
  }

  void unload(const std::string& name) {
    std::lock_guard<std::mutex> lock(model_mutex_);
    if (!serves(name)) throw unknown(name);
    guarded([&] { lora::delete_adapter(model_.module(), name); });
    std::lock_guard<std::mutex> adapters_lock(adapters_mutex_);
    adapters_.erase(name);
  }

  const lora::models::SequenceClassifier& model() const { return model_; }

 private:
  struct Pending {
    std::string text;
    std::string adapter;
    std::chrono::steady_clock::time_point arrived;
    std::promise<Classification> promise;
  };

  /// The model's name for a label; without `id2label`, a binary model's are SST-2's (as
  /// `lora-sentiment predict` prints them), others' their number.
  std::string label_name(int64_t label) const {
    const auto& names = model_.id2label();
    if (names.count(label)) return names.at(label);
    if (model_.num_labels() == 2) return label == 1 ? "positive" : "negative";
    return std::to_string(label);
  }

  /// `folder` is the adapter's own folder (adapter_config.json in it), or a PEFT folder of
  /// several adapters with this one in `folder/name`.
  static lora::io::LoadOptions load_options(const std::string& folder, const std::string& name) {
    lora::io::LoadOptions options;
    options.warn = nullptr;
    options.saved_as = std::filesystem::exists(std::filesystem::path(folder) / "adapter_config.json") ? "default" : name;
    return options;
  }

  static void check_name(const std::string& name) {
    if (name.empty() || name.find_first_of("./\\") != std::string::npos) {
      throw RequestError(400, "adapter name '" + name + "' must be non-empty and contain no '.', '/' or '\\'");
    }
  }

  /// Runs a library call, turning its refusal (bad folder, shapes for another base) into a 400.
  template <typename F>
  static auto guarded(F&& f) -> decltype(f()) {
    try {
      return f();
    } catch (const c10::Error& error) {
      throw RequestError(400, error.what_without_backtrace());
    }
  }

  bool serves(const std::string& name) const {
    std::lock_guard<std::mutex> lock(adapters_mutex_);
    return adapters_.count(name) > 0;
  }

  /// The 404 for `name`, listing the loaded adapters.
  RequestError unknown(const std::string& name) const {
    std::lock_guard<std::mutex> lock(adapters_mutex_);
    std::string names;
    for (const auto& item : adapters_) names += (names.empty() ? "" : ", ") + item.first;
    return RequestError(404, "unknown adapter '" + name + "' (loaded: " + (names.empty() ? "none" : names) + ")");
  }

  /// The batcher: waits for a first request, gives others `max_wait` to join (or until
  /// `max_batch` are there), answers them with one mixed forward pass.
  void run() {
    for (;;) {
      std::vector<Pending> batch;
      {
        std::unique_lock<std::mutex> lock(queue_mutex_);
        queue_changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, nothing left
        const auto deadline = queue_.front().arrived + options_.max_wait;
        queue_changed_.wait_until(lock, deadline, [&] {
          return stopping_ || static_cast<int64_t>(queue_.size()) >= options_.max_batch;
        });
        while (!queue_.empty() && static_cast<int64_t>(batch.size()) < options_.max_batch) {
          batch.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
      }
      answer(batch);
    }
  }

  void answer(std::vector<Pending>& batch) {
    std::lock_guard<std::mutex> lock(model_mutex_);
    // An adapter unloaded since its request arrived: that request fails, the others go on.
    std::vector<Pending*> ready;
    for (auto& pending : batch) {
      if (pending.adapter.empty() || serves(pending.adapter)) {
        ready.push_back(&pending);
      } else {
        pending.promise.set_exception(std::make_exception_ptr(
            RequestError(404, "adapter '" + pending.adapter + "' was unloaded before the request ran")));
      }
    }
    if (ready.empty()) return;
    try {
      std::vector<std::string> texts, routing;
      for (const auto* pending : ready) {
        texts.push_back(pending->text);
        routing.push_back(pending->adapter);
      }
      torch::NoGradGuard no_grad;
      const auto encoded = tokenizer_->encode_batch(texts, model_.max_tokens());
      at::Tensor probabilities;
      {
        lora::MixedBatch mix(model_.module(), routing);
        probabilities = torch::softmax(model_.forward(encoded), -1).to(torch::kDouble).cpu().contiguous();
      }
      const auto done = std::chrono::steady_clock::now();
      const auto* values = probabilities.data_ptr<double>();
      const auto labels = probabilities.size(1);
      for (size_t i = 0; i < ready.size(); ++i) {
        Classification result;
        result.probabilities.assign(values + static_cast<int64_t>(i) * labels, values + (static_cast<int64_t>(i) + 1) * labels);
        result.label = std::max_element(result.probabilities.begin(), result.probabilities.end()) - result.probabilities.begin();
        result.label_name = label_name(result.label);
        result.adapter = ready[i]->adapter;
        result.latency_ms = std::chrono::duration<double, std::milli>(done - ready[i]->arrived).count();
        result.batch_size = static_cast<int64_t>(ready.size());
        ready[i]->promise.set_value(std::move(result));
      }
    } catch (...) {
      for (auto* pending : ready) {
        try {
          pending->promise.set_exception(std::current_exception());
        } catch (const std::future_error&) {  // answered before the failure
        }
      }
    }
  }

  lora::models::SequenceClassifier model_;
  std::shared_ptr<lora::tokenizers::Tokenizer> tokenizer_;
  ServerOptions options_;

  std::mutex model_mutex_;  // the model: one forward pass or adapter change at a time
  // What is served, under its own short-held lock (taken after model_mutex_ where both are).
  mutable std::mutex adapters_mutex_;
  std::map<std::string, AdapterInfo> adapters_;

  std::mutex queue_mutex_;
  std::condition_variable queue_changed_;
  std::deque<Pending> queue_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace sentiment
