#pragma once

// The front ends of `lora-sentiment serve` over a ClassifyServer: JSON lines on stdin/stdout,
// and HTTP (cpp-httplib) with
//   POST /v1/classify  {"text": "...", "adapter": "alice"}    -> label, probabilities, adapter, latency
//   GET  /v1/adapters                                         -> the loaded adapters
//   POST /v1/adapters  {"action": "load" | "unload" | "hotswap", "name": "...", "path": "..."}
// A request that fails (bad JSON, unknown adapter, oversized text) gets a 4xx with a message;
// the others go on.

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "server.hpp"

namespace sentiment {

inline nlohmann::json to_json(const Classification& result) {
  return {{"label", result.label_name},    {"label_id", result.label},     {"probabilities", result.probabilities},
          {"adapter", result.adapter},     {"latency_ms", result.latency_ms}, {"batch_size", result.batch_size}};
}

inline nlohmann::json to_json(const std::vector<AdapterInfo>& adapters) {
  auto list = nlohmann::json::array();
  for (const auto& info : adapters) {
    list.push_back({{"name", info.name}, {"path", info.folder}, {"r", info.r}, {"target_modules", info.target_modules}});
  }
  return {{"adapters", list}};
}

/// A JSON object from a request body, or a 400 naming what is wrong.
inline nlohmann::json parse_request(const std::string& body) {
  nlohmann::json request;
  try {
    request = nlohmann::json::parse(body);
  } catch (const nlohmann::json::exception& error) {
    throw RequestError(400, std::string("the body is not valid JSON: ") + error.what());
  }
  if (!request.is_object()) throw RequestError(400, "the body must be a JSON object");
  return request;
}

/// A string field; `required` false: "" when absent or null.
inline std::string string_field(const nlohmann::json& request, const char* key, bool required) {
  const auto found = request.find(key);
  if (found == request.end() || found->is_null()) {
    if (required) throw RequestError(400, std::string("missing '") + key + "'");
    return "";
  }
  if (!found->is_string()) throw RequestError(400, std::string("'") + key + "' must be a string (got " + found->dump() + ")");
  return found->get<std::string>();
}

/// Queues a classification request {"text", "adapter"}.
inline std::future<Classification> submit_json(ClassifyServer& server, const nlohmann::json& request) {
  return server.submit(string_field(request, "text", true), string_field(request, "adapter", false));
}

/// {"action": "load" | "unload" | "hotswap", "name", "path"} -> the adapters afterwards.
inline nlohmann::json administer_json(ClassifyServer& server, const nlohmann::json& request) {
  const auto action = string_field(request, "action", true);
  const auto name = string_field(request, "name", true);
  nlohmann::json reply;
  if (action == "load") {
    server.load(name, string_field(request, "path", true));
  } else if (action == "unload") {
    server.unload(name);
  } else if (action == "hotswap") {
    const auto kind = server.hotswap(name, string_field(request, "path", true));
    reply["swap"] = kind == lora::io::SwapKind::kInPlace ? "in_place" : "rebuilt";
  } else {
    throw RequestError(400, "unknown action '" + action + "' (load, unload or hotswap)");
  }
  reply.update(to_json(server.adapters()));
  return reply;
}

inline nlohmann::json error_json(int status, const std::string& message) {
  return {{"error", message}, {"status", status}};
}

/// JSON lines: each input line is a request, answered by one output line in input order:
/// {"text", "adapter", "id"} (classify; "id" is echoed) or {"action", ...} (administer).
/// Requests are submitted as they are read, so consecutive lines share forward passes; an
/// action waits until every line before it is answered.
inline void serve_json_lines(ClassifyServer& server, std::istream& in, std::ostream& out) {
  struct Answer {
    std::future<Classification> result;
    nlohmann::json ready;  // an error or an admin reply
    nlohmann::json id;
  };
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<Answer> answers;
  size_t unanswered = 0;  // queued or being written
  bool finished = false;
  std::thread writer([&] {
    for (;;) {
      Answer answer;
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return finished || !answers.empty(); });
        if (answers.empty()) return;
        answer = std::move(answers.front());
        answers.pop_front();
      }
      auto line = answer.ready;
      if (answer.result.valid()) {
        try {
          line = to_json(answer.result.get());
        } catch (const RequestError& error) {
          line = error_json(error.status(), error.what());
        } catch (const std::exception& error) {
          line = error_json(500, error.what());
        }
      }
      if (!answer.id.is_null()) line["id"] = answer.id;
      out << line.dump() << "\n" << std::flush;
      {
        std::lock_guard<std::mutex> lock(mutex);
        --unanswered;
      }
      changed.notify_all();
    }
  });
  for (std::string text; std::getline(in, text);) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    Answer answer;
    try {
      const auto request = parse_request(text);
      if (request.contains("id")) answer.id = request["id"];
      if (request.contains("action")) {
        // A barrier: the requests before it are answered first, with the adapters they named.
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return unanswered == 0; });
        lock.unlock();
        answer.ready = administer_json(server, request);
      } else {
        answer.result = submit_json(server, request);
      }
    } catch (const RequestError& error) {
      answer.ready = error_json(error.status(), error.what());
    } catch (const std::exception& error) {  // unexpected, but the stream goes on
      answer.ready = error_json(500, error.what());
    }
    {
      std::lock_guard<std::mutex> lock(mutex);
      answers.push_back(std::move(answer));
      ++unanswered;
    }
    changed.notify_all();
  }
  {
    std::lock_guard<std::mutex> lock(mutex);
    finished = true;
  }
  changed.notify_all();
  writer.join();
}

/// The HTTP front end. Bind, then run (blocks until stop() from another thread or a signal).
class HttpFrontEnd {
 public:
  HttpFrontEnd(ClassifyServer& server, size_t threads = 64) : server_(server) {
    // cpp-httplib's default pool has 8 threads: more concurrent clients would queue in it
    // instead of joining the batcher's forward passes.
    http_.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    http_.set_socket_options([this](socket_t socket) {
      httplib::default_socket_options(socket);
      listening_socket_ = socket;
    });
    http_.set_payload_max_length(1 << 20);
    http_.Post("/v1/classify", [this](const httplib::Request& request, httplib::Response& response) {
      respond(response, [&] { return to_json(submit_json(server_, parse_request(request.body)).get()); });
    });
    http_.Get("/v1/adapters", [this](const httplib::Request&, httplib::Response& response) {
      respond(response, [&] { return to_json(server_.adapters()); });
    });
    http_.Post("/v1/adapters", [this](const httplib::Request& request, httplib::Response& response) {
      respond(response, [&] { return administer_json(server_, parse_request(request.body)); });
    });
  }

  /// Binds `host`:`port` (0: any free port); returns the port.
  int bind(const std::string& host, int port) {
    const int bound = port == 0 ? http_.bind_to_any_port(host) : (http_.bind_to_port(host, port) ? port : -1);
    TORCH_CHECK(bound > 0, "serve: cannot listen on ", host, ":", port);
    // Debian's cpp-httplib listens with a backlog of 5: a burst of new connections overflows it
    // and the dropped ones retry a second later (measured: p99 latency > 1 s at 8 clients).
    // listen() again on the bound socket only raises the backlog.
    if (listening_socket_ != INVALID_SOCKET) ::listen(listening_socket_, SOMAXCONN);
    return bound;
  }
  void run() { http_.listen_after_bind(); }
  void stop() { http_.stop(); }

 private:
  static void respond(httplib::Response& response, const std::function<nlohmann::json()>& handle) {
    nlohmann::json body;
    try {
      body = handle();
      response.status = 200;
    } catch (const RequestError& error) {
      body = error_json(error.status(), error.what());
      response.status = error.status();
    } catch (const std::exception& error) {
      body = error_json(500, error.what());
      response.status = 500;
    }
    response.set_content(body.dump(), "application/json");
  }

  ClassifyServer& server_;
  httplib::Server http_;
  socket_t listening_socket_ = INVALID_SOCKET;
};

}  // namespace sentiment
