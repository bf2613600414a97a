#pragma once

// The training loop's view of data parallelism: this process's rank among the others, its share
// of every batch, and the sums that make all ranks agree. Without lora::distributed (or with one
// process) it is rank 0 of 1 and every operation is the identity.

#include <memory>
#include <optional>
#include <vector>

#include <lora/data/batcher.hpp>
#include <torch/torch.h>

#ifdef LORA_SENTIMENT_DISTRIBUTED
#include <lora/distributed.hpp>
#endif

namespace sentiment {

class Parallel {
 public:
  Parallel() = default;
#ifdef LORA_SENTIMENT_DISTRIBUTED
  explicit Parallel(lora::distributed::ProcessGroup& group) : group_(&group) {}
#endif

  int rank() const {
#ifdef LORA_SENTIMENT_DISTRIBUTED
    if (group_) return group_->rank();
#endif
    return 0;
  }
  int world_size() const {
#ifdef LORA_SENTIMENT_DISTRIBUTED
    if (group_) return group_->world_size();
#endif
    return 1;
  }
  /// Rank 0 prints, writes metrics, checkpoints and adapters.
  bool is_main() const { return rank() == 0; }

  /// This rank's rows of a (global) batch; nullopt when it gets none.
  std::optional<lora::data::Batch> share(const lora::data::Batch& batch) const {
#ifdef LORA_SENTIMENT_DISTRIBUTED
    if (group_) return lora::distributed::shard(batch, rank(), world_size());
#endif
    return batch;
  }

  /// Sums over all ranks, in place.
  void sum(torch::Tensor& tensor) {
#ifdef LORA_SENTIMENT_DISTRIBUTED
    if (group_) group_->all_reduce_sum(tensor, "metrics all-reduce");
#endif
    (void)tensor;
  }

  /// Every rank's `tensor`, in rank order.
  std::vector<torch::Tensor> gather(const torch::Tensor& tensor) {
#ifdef LORA_SENTIMENT_DISTRIBUTED
    if (group_) return group_->all_gather(tensor);
#endif
    return {tensor};
  }

  /// Rank 0's values everywhere, and gradient synchronisation of these parameters from now on
  /// (summed: each rank scales its loss by its share of the global batch).
  void train_together(const std::vector<torch::Tensor>& parameters) {
#ifdef LORA_SENTIMENT_DISTRIBUTED
    if (!group_ || world_size() == 1) return;
    group_->broadcast(parameters);
    lora::distributed::GradientSyncOptions options;
    options.average = false;
    sync_ = std::make_unique<lora::distributed::GradientSynchronizer>(*group_, parameters, options);
#endif
    (void)parameters;
  }

  /// After backward: every rank holds the global batch's gradients.
  void synchronize_gradients() {
#ifdef LORA_SENTIMENT_DISTRIBUTED
    if (sync_) sync_->synchronize();
#endif
  }

  /// Bytes one step's gradient synchronisation all-reduces (0 without one).
  size_t gradient_bytes() const {
#ifdef LORA_SENTIMENT_DISTRIBUTED
    if (sync_) return sync_->bytes_per_step();
#endif
    return 0;
  }

 private:
#ifdef LORA_SENTIMENT_DISTRIBUTED
  lora::distributed::ProcessGroup* group_ = nullptr;
  std::unique_ptr<lora::distributed::GradientSynchronizer> sync_;
#endif
};

}  // namespace sentiment
