#pragma once

/// \file
/// A c10d process group for data-parallel training: its ranks found from torchrun's environment
/// (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or given explicitly, rendezvous
/// through a TCPStore (or a FileStore on one machine), collectives through Gloo, every wait
/// bounded by a timeout so that a dead peer ends the run with an error instead of a hang.
///
/// Opt-in: needs the CMake target `lora::distributed` (it defines USE_C10D_GLOO, which
/// LibTorch's c10d headers want, and needs the gloo headers: Debian `libgloo-dev`).
///
///     auto group = lora::distributed::ProcessGroup(lora::distributed::options_from_environment());
///     group.broadcast(trainable_parameters);            // every rank starts from rank 0's values
///     auto total = group.all_reduce_sum(local_counts);  // in place, returned for convenience

#ifndef USE_C10D_GLOO
#error "lora/distributed needs USE_C10D_GLOO: link the CMake target lora::distributed (Debian: libgloo-dev)"
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>

#include <lora/detail/strings.hpp>

namespace lora::distributed {

/// Where this process sits in the job and how it finds the others.
struct DistributedOptions {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;  ///< the rank on this machine (torchrun's LOCAL_RANK): picks a GPU
  /// Rank 0's address and port: rank 0 serves the TCPStore there, the others connect to it.
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  /// A file every rank can reach (one machine, or a shared file system): rendezvous through a
  /// c10d FileStore instead of TCP. Empty: TCPStore.
  std::string store_file;
  /// The network interface Gloo uses (GLOO_SOCKET_IFNAME, as in PyTorch). Empty: the interface
  /// of master_addr when it is a loopback address, otherwise the one this host's name resolves to.
  std::string interface;
  /// How long rendezvous and every collective may wait for the other ranks.
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
};

namespace detail {

inline std::optional<std::string> environment(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

inline int environment_integer(const char* name, int fallback, int64_t low, int64_t high) {
  const auto text = environment(name);
  if (!text) return fallback;
  const auto value = lora::detail::parse_integer(*text);
  TORCH_CHECK(value && *value >= low && *value <= high, "distributed: environment variable ", name, "='", *text,
              "' is not an integer in [", low, ", ", high, "]");
  return static_cast<int>(*value);
}

inline bool is_loopback(const std::string& address) {
  return address == "localhost" || address == "::1" || lora::detail::starts_with(address, "127.");
}

#if TORCH_VERSION_MAJOR >= 2
using Collectives = ::c10d::Backend;  // LibTorch 2.x: ProcessGroupGloo is a backend
#else
using Collectives = ::c10d::ProcessGroup;
#endif

}  // namespace detail

/// Options from torchrun's variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
/// plus GLOO_SOCKET_IFNAME and LORA_DIST_TIMEOUT_S (seconds). Unset variables keep `defaults`;
/// a set but malformed one is an error naming it.
inline DistributedOptions options_from_environment(DistributedOptions defaults = {}) {
  auto options = std::move(defaults);
  options.world_size = detail::environment_integer("WORLD_SIZE", options.world_size, 1, 1 << 20);
  options.rank = detail::environment_integer("RANK", options.rank, 0, options.world_size - 1);
  options.local_rank = detail::environment_integer("LOCAL_RANK", options.local_rank, 0, 1 << 20);
  options.master_addr = detail::environment("MASTER_ADDR").value_or(options.master_addr);
  options.master_port = detail::environment_integer("MASTER_PORT", options.master_port, 1, 65535);
  options.interface = detail::environment("GLOO_SOCKET_IFNAME").value_or(options.interface);
  const int timeout_s = detail::environment_integer(
      "LORA_DIST_TIMEOUT_S", static_cast<int>(std::chrono::duration_cast<std::chrono::seconds>(options.timeout).count()),
      1, 1 << 24);
  options.timeout = std::chrono::seconds(timeout_s);
  return options;
}

/// True when torchrun (or scripts/launch.sh) started this process as one rank of several.
inline bool launched_distributed() {
  return detail::environment("WORLD_SIZE").has_value() && detail::environment("RANK").has_value();
}

/// One process's membership in a group of `world_size` processes. A group of one needs no
/// network and makes every collective a no-op, so that training code need not branch.
class ProcessGroup {
 public:
  explicit ProcessGroup(DistributedOptions options) : options_(std::move(options)) {
    TORCH_CHECK(options_.world_size >= 1, "distributed: world_size must be at least 1, not ", options_.world_size);
    TORCH_CHECK(options_.rank >= 0 && options_.rank < options_.world_size, "distributed: rank ", options_.rank,
                " is outside [0, ", options_.world_size, ")");
    TORCH_CHECK(options_.master_port >= 1 && options_.master_port <= 65535, "distributed: master_port ",
                options_.master_port, " is not a port");
    TORCH_CHECK(options_.timeout.count() > 0, "distributed: the timeout must be positive");
    if (options_.world_size == 1) return;
    try {
      c10::intrusive_ptr<::c10d::Store> store;
      if (!options_.store_file.empty()) {
        store = c10::make_intrusive<::c10d::FileStore>(options_.store_file, options_.world_size);
      } else {
        ::c10d::TCPStoreOptions store_options;
        store_options.port = static_cast<uint16_t>(options_.master_port);
        store_options.isServer = options_.rank == 0;
        store_options.numWorkers = static_cast<size_t>(options_.world_size);
        store_options.waitWorkers = true;
        store_options.timeout = options_.timeout;
        store = c10::make_intrusive<::c10d::TCPStore>(options_.master_addr, store_options);
      }
      store->setTimeout(options_.timeout);
      auto gloo_options = ::c10d::ProcessGroupGloo::Options::create(options_.timeout);
      if (!options_.interface.empty()) {
        gloo_options->devices.push_back(::c10d::ProcessGroupGloo::createDeviceForInterface(options_.interface));
      } else if (detail::is_loopback(options_.master_addr)) {
        gloo_options->devices.push_back(::c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        gloo_options->devices.push_back(::c10d::ProcessGroupGloo::createDefaultDevice());
      }
      collectives_ = c10::make_intrusive<::c10d::ProcessGroupGloo>(
          c10::make_intrusive<::c10d::PrefixStore>("lora", store), options_.rank, options_.world_size, gloo_options);
    } catch (const std::exception& error) {  // c10::Error (store timeouts) included: say where and why
      TORCH_CHECK(false, "distributed: rank ", options_.rank, " of ", options_.world_size, " could not join the group at ",
                  where(), " within ", options_.timeout.count(), " ms: ", error.what());
    }
  }

  int rank() const { return options_.rank; }
  int world_size() const { return options_.world_size; }
  int local_rank() const { return options_.local_rank; }
  /// Rank 0: the one that prints, evaluates into files and writes checkpoints and adapters.
  bool is_main() const { return options_.rank == 0; }
  const DistributedOptions& options() const { return options_; }

  /// Sums `tensors` over all ranks, in place (each tensor separately); blocks until done.
  std::vector<at::Tensor>& all_reduce_sum(std::vector<at::Tensor>& tensors, const char* what = "all-reduce") {
    if (world_size() == 1 || tensors.empty()) return tensors;
    for (auto& tensor : tensors) {
      TORCH_CHECK(tensor.is_contiguous(), "distributed: ", what, " needs contiguous tensors (got strides ",
                  tensor.strides(), ")");
      ::c10d::AllreduceOptions options;
      options.reduceOp = ::c10d::ReduceOp::SUM;
      options.timeout = options_.timeout;
      std::vector<at::Tensor> one{tensor};
      wait(collectives_->allreduce(one, options), what);
    }
    return tensors;
  }
  at::Tensor all_reduce_sum(at::Tensor tensor, const char* what = "all-reduce") {
    std::vector<at::Tensor> one{std::move(tensor)};
    return all_reduce_sum(one, what).front();
  }

  /// Starts summing one contiguous tensor over all ranks; `wait` the result before reading it.
  /// Every rank must start the same collectives in the same order.
  c10::intrusive_ptr<::c10d::Work> start_all_reduce_sum(at::Tensor& tensor) {
    TORCH_CHECK(world_size() > 1, "distributed: start_all_reduce_sum needs more than one rank");
    TORCH_CHECK(tensor.is_contiguous(), "distributed: all-reduce needs a contiguous tensor");
    ::c10d::AllreduceOptions options;
    options.reduceOp = ::c10d::ReduceOp::SUM;
    options.timeout = options_.timeout;
    std::vector<at::Tensor> one{tensor};
    return collectives_->allreduce(one, options);
  }

  /// Waits for a collective, turning a peer's death or a timeout into an error that names this
  /// rank, the operation and the timeout.
  void wait(const c10::intrusive_ptr<::c10d::Work>& work, const char* what) const {
    try {
      work->wait(options_.timeout);
    } catch (const std::exception& error) {
      TORCH_CHECK(false, "distributed: rank ", options_.rank, " of ", options_.world_size, ": ", what,
                  " failed (another rank died, or did not take part within ", options_.timeout.count(), " ms): ",
                  error.what());
    }
  }

  /// Copies rank `root`'s values of `tensors` into every rank's (in place).
  void broadcast(const std::vector<at::Tensor>& tensors, int root = 0) {
    TORCH_CHECK(root >= 0 && root < world_size(), "distributed: broadcast root ", root, " is outside [0, ",
                world_size(), ")");
    if (world_size() == 1) return;
    for (const auto& tensor : tensors) {
      TORCH_CHECK(tensor.is_contiguous(), "distributed: broadcast needs contiguous tensors (got strides ",
                  tensor.strides(), ")");
      ::c10d::BroadcastOptions options;
      options.rootRank = root;
      options.timeout = options_.timeout;
      // In place on the tensor's data: parameters are leaves that require grad.
      std::vector<at::Tensor> one{tensor.detach()};
      wait(collectives_->broadcast(one, options), "broadcast");
    }
  }

  /// Every rank's `tensor` (same shape everywhere), in rank order.
  std::vector<at::Tensor> all_gather(const at::Tensor& tensor) {
    if (world_size() == 1) return {tensor.clone()};
    std::vector<std::vector<at::Tensor>> outputs(1);
    std::vector<at::Tensor> input{tensor.contiguous()};
    for (int r = 0; r < world_size(); ++r) outputs[0].push_back(at::empty(tensor.sizes(), tensor.options()));
    ::c10d::AllgatherOptions options;
    options.timeout = options_.timeout;
    wait(collectives_->allgather(outputs, input, options), "all-gather");
    return outputs[0];
  }

  /// Returns when every rank has called it.
  void barrier() {
    if (world_size() == 1) return;
    ::c10d::BarrierOptions options;
    options.timeout = options_.timeout;
    wait(collectives_->barrier(options), "barrier");
  }

 private:
  std::string where() const {
    return options_.store_file.empty() ? options_.master_addr + ":" + std::to_string(options_.master_port)
                                       : "file '" + options_.store_file + "'";
  }

  DistributedOptions options_;
  c10::intrusive_ptr<detail::Collectives> collectives_;
};

}  // namespace lora::distributed
