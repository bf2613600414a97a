#pragma once

/// \file
/// Gradient synchronisation for data-parallel training of the trainable parameters only (for
/// LoRA, well under 1 % of the weights): gradients are packed into flat buckets, each bucket
/// all-reduced as soon as autograd has produced all of its gradients (so that communication
/// overlaps the rest of backward), and the results written back to `.grad`.
///
///     lora::distributed::GradientSynchronizer sync(group, trainable);
///     loss.backward();
///     sync.synchronize();          // every rank now holds the same (averaged) gradients
///     optimizer.step();
///
/// Every rank must construct it with the same parameters in the same order and call
/// `synchronize` the same number of times: the buckets' collectives are matched by order.

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <lora/distributed/process_group.hpp>

namespace lora::distributed {

struct GradientSyncOptions {
  /// Bytes per bucket at most (a parameter larger than that gets a bucket of its own). DDP's
  /// default, 25 MiB; LoRA's gradients usually fit in one.
  size_t bucket_bytes = size_t{25} << 20;
  /// Start each bucket's all-reduce from autograd hooks as soon as its gradients are ready.
  /// Off: `synchronize` packs and reduces everything after backward.
  bool overlap = true;
  /// Divide the sum by the world size, as DDP does. Off: the plain sum, for losses that each rank
  /// already scales by its share of the global batch (exact for uneven shards).
  bool average = true;
};

class GradientSynchronizer {
 public:
  GradientSynchronizer(ProcessGroup& group, std::vector<at::Tensor> parameters, GradientSyncOptions options = {})
      : group_(group), parameters_(std::move(parameters)), options_(options) {
    TORCH_CHECK(options_.bucket_bytes > 0, "GradientSynchronizer: bucket_bytes must be positive");
    slots_.resize(parameters_.size());
    // Reverse order: backward produces the last layers' gradients first.
    for (size_t k = parameters_.size(); k-- > 0;) {
      const auto& parameter = parameters_[k];
      TORCH_CHECK(parameter.defined() && parameter.requires_grad(), "GradientSynchronizer: parameter ", k,
                  " does not require grad; pass the trainable parameters only");
      TORCH_CHECK(!parameter.is_sparse(), "GradientSynchronizer: parameter ", k, " is sparse (not supported)");
      const size_t bytes = static_cast<size_t>(parameter.numel()) * parameter.element_size();
      const bool fits = !buckets_.empty() && buckets_.back().dtype == parameter.scalar_type() &&
                        buckets_.back().device == parameter.device() &&
                        buckets_.back().bytes + bytes <= options_.bucket_bytes;
      if (!fits) buckets_.emplace_back(parameter.scalar_type(), parameter.device());
      auto& bucket = buckets_.back();
      slots_[k] = Slot{buckets_.size() - 1, bucket.numel, parameter.numel(), false};
      bucket.members.push_back(k);
      bucket.numel += parameter.numel();
      bucket.bytes += bytes;
    }
    for (auto& bucket : buckets_) {
      bucket.flat = at::zeros({bucket.numel}, at::TensorOptions().dtype(bucket.dtype).device(bucket.device));
    }
    if (options_.overlap && group_.world_size() > 1) {
      for (size_t k = 0; k < parameters_.size(); ++k) {
        hooks_.push_back(parameters_[k].register_hook([this, k](const at::Tensor& gradient) { on_gradient(k, gradient); }));
      }
    }
  }

  ~GradientSynchronizer() {
    for (size_t k = 0; k < hooks_.size(); ++k) parameters_[k].remove_hook(hooks_[k]);
  }
  GradientSynchronizer(const GradientSynchronizer&) = delete;
  GradientSynchronizer& operator=(const GradientSynchronizer&) = delete;

  /// After backward: finishes every bucket's all-reduce (starting those whose gradients never
  /// came: a parameter without a gradient on some rank counts as zero there) and writes the
  /// results into `.grad`. A parameter without a gradient on every rank keeps none, as in one
  /// process (so that the optimizer skips it). After a failure (a peer died) the synchronizer is
  /// reset: nothing of the failed step is kept.
  void synchronize() {
    if (group_.world_size() == 1) return;
    std::lock_guard<std::mutex> lock(mutex_);
    struct Reset {  // on success and on failure alike
      GradientSynchronizer& owner;
      ~Reset() { owner.reset_step(); }
    } reset{*this};
    auto had_gradient = at::zeros({static_cast<int64_t>(parameters_.size())}, at::kFloat);
    auto* flags = had_gradient.data_ptr<float>();
    for (size_t k = 0; k < parameters_.size(); ++k) {
      if (slots_[k].ready || parameters_[k].grad().defined()) flags[k] = 1;
    }
    for (size_t b = next_launch_; b < buckets_.size(); ++b) {
      for (const auto k : buckets_[b].members) {
        if (slots_[k].ready) continue;
        const auto& gradient = parameters_[k].grad();
        if (gradient.defined()) {
          slice(k).copy_(gradient);
        } else {
          slice(k).zero_();
        }
        slots_[k].ready = true;
        ++buckets_[b].ready;
      }
    }
    launch_ready_buckets();
    const auto used = group_.start_all_reduce_sum(had_gradient);
    for (size_t b = 0; b < buckets_.size(); ++b) {
      const auto what = "gradient all-reduce (bucket " + std::to_string(b + 1) + " of " +
                        std::to_string(buckets_.size()) + ")";
      group_.wait(buckets_[b].work, what.c_str());
      buckets_[b].work.reset();
      if (options_.average) buckets_[b].flat.div_(group_.world_size());
    }
    group_.wait(used, "all-reduce of which parameters have gradients");
    for (size_t k = 0; k < parameters_.size(); ++k) {
      if (flags[k] == 0) continue;  // no rank has a gradient for it
      auto& gradient = parameters_[k].mutable_grad();
      if (gradient.defined()) {
        gradient.copy_(slice(k));
      } else {
        gradient = slice(k).clone();
      }
    }
  }

  /// While the returned guard lives, backward passes only accumulate locally (gradient
  /// accumulation: synchronise once, after the last micro-batch's backward).
  class NoSync {
   public:
    explicit NoSync(GradientSynchronizer& owner) : owner_(owner), was_(owner.enabled_) { owner_.enabled_ = false; }
    ~NoSync() { owner_.enabled_ = was_; }
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;

   private:
    GradientSynchronizer& owner_;
    bool was_;
  };
  [[nodiscard]] NoSync no_sync() { return NoSync(*this); }

  size_t num_buckets() const { return buckets_.size(); }
  /// What one `synchronize` all-reduces, in bytes (each rank sends and receives about twice
  /// that with Gloo's ring algorithm).
  size_t bytes_per_step() const {
    size_t total = 0;
    for (const auto& bucket : buckets_) total += bucket.bytes;
    return total;
  }

 private:
  struct Bucket {
    Bucket(c10::ScalarType dtype, c10::Device device) : dtype(dtype), device(device) {}
    c10::ScalarType dtype;
    c10::Device device;
    std::vector<size_t> members;
    int64_t numel = 0;
    size_t bytes = 0;
    at::Tensor flat;
    size_t ready = 0;
    c10::intrusive_ptr<::c10d::Work> work;
  };
  struct Slot {
    size_t bucket = 0;
    int64_t offset = 0;
    int64_t numel = 0;
    bool ready = false;
  };

  at::Tensor slice(size_t k) {
    const auto& slot = slots_[k];
    return buckets_[slot.bucket].flat.narrow(0, slot.offset, slot.numel).view(parameters_[k].sizes());
  }

  // Autograd calls this before accumulating `gradient` into .grad: the bucket gets the value
  // .grad will hold (the old value plus this one), so accumulation works as without hooks.
  void on_gradient(size_t k, const at::Tensor& gradient) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& slot = slots_[k];
    TORCH_CHECK(!slot.ready, "GradientSynchronizer: parameter ", k,
                " got a second gradient before synchronize(); run the backward passes of gradient accumulation "
                "but the last under no_sync(), and synchronize() after the last");
    if (!enabled_) return;
    at::NoGradGuard no_grad;
    const auto& old = parameters_[k].grad();
    auto destination = slice(k);
    if (old.defined()) {
      at::add_out(destination, old, gradient);
    } else {
      destination.copy_(gradient);
    }
    slot.ready = true;
    ++buckets_[slot.bucket].ready;
    launch_ready_buckets();
  }

  void reset_step() {
    for (auto& slot : slots_) slot.ready = false;
    for (auto& bucket : buckets_) {
      bucket.ready = 0;
      bucket.work.reset();
    }
    next_launch_ = 0;
  }

  // In bucket order only, so that every rank issues the same collectives in the same order.
  void launch_ready_buckets() {
    while (next_launch_ < buckets_.size() && buckets_[next_launch_].ready == buckets_[next_launch_].members.size()) {
      buckets_[next_launch_].work = group_.start_all_reduce_sum(buckets_[next_launch_].flat);
      ++next_launch_;
    }
  }

  ProcessGroup& group_;
  std::vector<at::Tensor> parameters_;
  GradientSyncOptions options_;
  std::vector<Bucket> buckets_;
  std::vector<Slot> slots_;
  std::vector<unsigned> hooks_;
  size_t next_launch_ = 0;
  bool enabled_ = true;
  std::mutex mutex_;
};

}  // namespace lora::distributed
