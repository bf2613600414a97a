// lora-serve-loadtest: the HTTP server of `lora-sentiment serve` under concurrent load, on
// loopback. It builds a BERT classifier with random weights, saves N adapters of different
// ranks, targets and kinds (LoRA, DoRA) with their own heads, loads them through the admin
// endpoint, then C clients send R requests each, spread over every adapter and the base model.
// Every answer is checked against the same text classified alone with its adapter active (to
// 1e-5); the refusals (unknown adapter, bad JSON, oversized text) are checked too. Prints
// requests/s and latency percentiles; exits non-zero on any wrong answer or past --timeout.
//
//   lora-serve-loadtest --clients 8 --requests 25 --adapters 8            (the ctest)
//   lora-serve-loadtest --size mini --clients 32 --requests 40 --no-check (benchmarks.md)

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <lora/io/peft.hpp>
#include <lora/lora.hpp>
#include <lora/models/auto.hpp>
#include <lora/models/bert.hpp>
#include <lora/tokenizers/wordpiece.hpp>

#include "serve.hpp"
#include "synthetic.hpp"

namespace fs = std::filesystem;

namespace {

struct Flags {
  int clients = 8;
  int requests = 25;  // per client
  int adapters = 8;
  std::string size = "tiny";
  int64_t max_batch = 32;
  double max_wait_ms = 5;
  bool check = true;
  double timeout_s = 120;
  int threads = 0;
};

lora::models::BertConfig config_for(const std::string& size, int64_t vocab_size) {
  lora::models::BertConfig config;
  config.vocab_size = vocab_size;
  config.max_position_embeddings = 64;
  if (size == "mini") {
    config.hidden_size = 256;
    config.num_hidden_layers = 4;
    config.num_attention_heads = 4;
    config.intermediate_size = 1024;
  } else {
    config.hidden_size = 32;
    config.num_hidden_layers = 2;
    config.num_attention_heads = 2;
    config.intermediate_size = 64;
  }
  return config;
}

lora::models::BertForSequenceClassification base_model(const lora::models::BertConfig& config) {
  torch::manual_seed(0);
  lora::models::BertForSequenceClassification model(config);
  model->eval();
  return model;
}

/// Adapter i: rank 2, 4 or 8; every third DoRA; every other one also adapts the FFN input.
lora::LoraConfig adapter_config(int i) {
  std::vector<std::string> targets{"query", "value"};
  if (i % 2 == 1) targets.push_back("intermediate.dense");
  const int64_t r = std::vector<int64_t>{2, 4, 8}[static_cast<size_t>(i % 3)];
  return lora::LoraConfig(lora::LoRAOptions(r).alpha(static_cast<double>(2 * r)).use_dora(i % 3 == 2))
      .target_modules(targets)
      .task_type("SEQ_CLS");
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const auto index = static_cast<size_t>(std::ceil(p * static_cast<double>(values.size()))) - 1;
  return values[std::min(index, values.size() - 1)];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"lora-serve-loadtest: concurrent requests over many adapters against lora-sentiment's HTTP server"};
  Flags flags;
  app.add_option("--clients", flags.clients, "concurrent clients")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--requests", flags.requests, "requests per client")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--adapters", flags.adapters, "adapters served")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--size", flags.size, "model shape: tiny (32 hidden, 2 layers) or mini (256 hidden, 4 layers)")
      ->check(CLI::IsMember({"tiny", "mini"}))->capture_default_str();
  app.add_option("--max-batch", flags.max_batch, "server: requests per forward pass")->capture_default_str();
  app.add_option("--max-wait-ms", flags.max_wait_ms, "server: batching wait")->capture_default_str();
  app.add_flag("!--no-check", flags.check, "skip the one-by-one reference (for timing runs)");
  app.add_option("--timeout", flags.timeout_s, "fail if the load takes longer (seconds)")->capture_default_str();
  app.add_option("--threads", flags.threads, "intra-op threads (default: all cores)");
  CLI11_PARSE(app, argc, argv);
  torch::set_num_threads(flags.threads > 0 ? flags.threads
                                           : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));

  try {
    const auto dir = fs::temp_directory_path() / ("lora-serve-loadtest-" + std::to_string(::getpid()));
    fs::create_directories(dir);
    struct Cleanup {
      fs::path dir;
      ~Cleanup() { fs::remove_all(dir); }
    } cleanup{dir};

    const auto vocab = sentiment::demo_vocabulary();
    const auto vocab_file = (dir / "vocab.txt").string();
    {
      std::ofstream out(vocab_file);
      for (const auto& token : vocab) out << token << "\n";
    }
    auto tokenizer = std::make_shared<lora::tokenizers::WordPieceTokenizer>(
        lora::tokenizers::WordPieceTokenizer::from_file(vocab_file));
    const auto config = config_for(flags.size, static_cast<int64_t>(vocab.size()));

    std::vector<std::string> names;
    for (int i = 0; i < flags.adapters; ++i) {
      names.push_back("a" + std::to_string(i));
      auto source = base_model(config);
      lora::inject(*source, adapter_config(i), names.back());
      torch::manual_seed(100 + static_cast<uint64_t>(i));
      torch::NoGradGuard no_grad;
      for (const auto& [path, layer] : lora::adapter_layers(*source)) {
        if (!layer->has_adapter(names.back())) continue;
        for (auto& item : layer->adapter_state(names.back())) {
          if (item.first == "lora_magnitude_vector") {
            item.second.uniform_(0.5, 1.5);
          } else {
            item.second.normal_(0.0, 0.2);
          }
        }
      }
      lora::io::save_adapter(*source, dir.string(), names.back());  // dir/<name>/
    }

    sentiment::Generator generator(7);
    std::vector<std::string> texts;
    for (int i = 0; i < 64; ++i) texts.push_back(generator.example().text);
    std::vector<std::string> routes = names;
    routes.push_back("");  // the base model too
    auto route_of = [&](int client, int j) { return routes[static_cast<size_t>(client * 7 + j) % routes.size()]; };
    auto text_of = [&](int client, int j) { return texts[static_cast<size_t>(client * 13 + j * 5) % texts.size()]; };

    // The reference: each (text, adapter) alone, with that adapter active.
    std::map<std::pair<std::string, std::string>, std::vector<double>> expected;
    if (flags.check) {
      auto reference = base_model(config);
      lora::io::LoadOptions quiet;
      quiet.warn = nullptr;
      for (const auto& name : names) lora::io::load_adapter(*reference, dir.string(), name, quiet);
      torch::NoGradGuard no_grad;
      for (int c = 0; c < flags.clients; ++c) {
        for (int j = 0; j < flags.requests; ++j) {
          const auto key = std::make_pair(text_of(c, j), route_of(c, j));
          if (expected.count(key)) continue;
          lora::enable_adapters(*reference, !key.second.empty());
          if (!key.second.empty()) lora::set_adapter(*reference, key.second);
          const auto encoded = tokenizer->encode_batch({key.first}, config.max_position_embeddings);
          const auto p = torch::softmax(reference->forward(encoded.input_ids, encoded.attention_mask, encoded.token_type_ids), -1)
                             .to(torch::kDouble)[0];
          expected[key] = std::vector<double>(p.data_ptr<double>(), p.data_ptr<double>() + p.numel());
        }
      }
    }

    sentiment::ServerOptions options;
    options.max_batch = flags.max_batch;
    options.max_wait = std::chrono::microseconds(static_cast<int64_t>(flags.max_wait_ms * 1000));
    options.max_text_bytes = 1000;
    sentiment::ClassifyServer server(lora::models::SequenceClassifier(base_model(config)), tokenizer, options);
    sentiment::HttpFrontEnd http(server);
    const int port = http.bind("127.0.0.1", 0);
    std::thread listener([&] { http.run(); });
    struct Stop {
      sentiment::HttpFrontEnd& http;
      std::thread& listener;
      ~Stop() {
        http.stop();
        listener.join();
      }
    } stop{http, listener};

    int failures = 0;
    auto fail = [&](const std::string& what) {
      ++failures;
      if (failures <= 10) std::cerr << "FAIL: " << what << "\n";
    };
    httplib::Client admin("127.0.0.1", port);
    admin.set_read_timeout(30, 0);
    for (const auto& name : names) {
      const auto reply = admin.Post("/v1/adapters", nlohmann::json{{"action", "load"}, {"name", name}, {"path", dir.string()}}.dump(),
                                    "application/json");
      if (!reply || reply->status != 200) fail("loading " + name + ": " + (reply ? reply->body : "no reply"));
    }
    {
      const auto listed = admin.Get("/v1/adapters");
      const auto count = listed ? nlohmann::json::parse(listed->body)["adapters"].size() : 0;
      if (count != names.size()) fail("GET /v1/adapters lists " + std::to_string(count) + " adapters");
    }
    // Refusals: each request alone gets its 4xx.
    const std::vector<std::pair<std::string, int>> refusals{
        {R"({"text": "good film", "adapter": "nobody"})", 404},
        {R"({"text": "good film", )", 400},
        {nlohmann::json{{"text", std::string(2000, 'a')}}.dump(), 413},
        {R"({"adapter": "a0"})", 400},
        {R"({"text": 5})", 400}};
    for (const auto& [body, status] : refusals) {
      const auto reply = admin.Post("/v1/classify", body, "application/json");
      if (!reply || reply->status != status) {
        fail("expected " + std::to_string(status) + " for " + body.substr(0, 60) + ", got " +
             (reply ? std::to_string(reply->status) + " " + reply->body : "no reply"));
      }
    }

    std::mutex mutex;
    std::vector<double> latencies;
    std::vector<double> batch_sizes;
    std::atomic<int> answered{0};
    double worst = 0;
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> clients;
    for (int c = 0; c < flags.clients; ++c) {
      clients.emplace_back([&, c] {
        httplib::Client client("127.0.0.1", port);
        client.set_read_timeout(static_cast<time_t>(flags.timeout_s), 0);
        for (int j = 0; j < flags.requests; ++j) {
          if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > flags.timeout_s) break;
          const auto text = text_of(c, j);
          const auto adapter = route_of(c, j);
          const auto sent = std::chrono::steady_clock::now();
          const auto reply = client.Post("/v1/classify", nlohmann::json{{"text", text}, {"adapter", adapter}}.dump(),
                                         "application/json");
          const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - sent).count();
          std::lock_guard<std::mutex> lock(mutex);
          if (!reply || reply->status != 200) {
            fail("request for '" + adapter + "': " + (reply ? std::to_string(reply->status) + " " + reply->body : "no reply"));
            continue;
          }
          const auto body = nlohmann::json::parse(reply->body);
          latencies.push_back(ms);
          batch_sizes.push_back(body["batch_size"].get<double>());
          ++answered;
          if (body["adapter"] != adapter) fail("answer names adapter " + body["adapter"].dump() + ", not '" + adapter + "'");
          if (!flags.check) continue;
          const auto& want = expected.at({text, adapter});
          const auto got = body["probabilities"].get<std::vector<double>>();
          double differs = 0;
          for (size_t k = 0; k < want.size() && k < got.size(); ++k) differs = std::max(differs, std::abs(got[k] - want[k]));
          worst = std::max(worst, differs);
          if (got.size() != want.size() || differs > 1e-5) {
            fail("'" + text + "' with '" + adapter + "': differs by " + std::to_string(differs));
          }
        }
      });
    }
    for (auto& client : clients) client.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const int total = flags.clients * flags.requests;
    if (answered != total) fail(std::to_string(answered.load()) + " of " + std::to_string(total) + " requests answered");

    double mean_batch = 0;
    for (const auto b : batch_sizes) mean_batch += b / static_cast<double>(std::max<size_t>(1, batch_sizes.size()));
    std::cout << std::fixed << std::setprecision(2) << "model " << flags.size << ", " << flags.adapters << " adapters + base, "
              << flags.clients << " clients x " << flags.requests << " requests, threads " << torch::get_num_threads()
              << "\nrequests/s " << static_cast<double>(answered) / seconds << "\nlatency ms p50 "
              << percentile(latencies, 0.5) << " p99 " << percentile(latencies, 0.99) << "\nmean batch " << mean_batch
              << "\n";
    if (flags.check) std::cout << std::scientific << std::setprecision(2) << "max |p - p_alone| " << worst << "\n";
    if (failures > 0) {
      std::cerr << failures << " failure(s)\n";
      return 1;
    }
    std::cout << "all answers match\n";
    return 0;
  } catch (const c10::Error& error) {
    std::cerr << "lora-serve-loadtest: " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "lora-serve-loadtest: " << error.what() << "\n";
    return 1;
  }
}
