#pragma once

/// \file
/// Distributed sampling: every rank builds the same epoch (the batcher's seeded shuffle and
/// length buckets, global batches) and takes its own contiguous share of each batch. Summed
/// over ranks, losses scaled by `rows / global_rows` give exactly the single-process gradient,
/// whatever the split.

#include <cstdint>
#include <optional>
#include <utility>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <lora/data/batcher.hpp>

namespace lora::distributed {

/// The rows [first, last) of `rows` that `rank` of `world_size` takes: contiguous, sizes that
/// differ by one at most (a rank may get none when rows < world_size).
inline std::pair<int64_t, int64_t> shard_range(int64_t rows, int rank, int world_size) {
  TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "shard_range: rank ", rank,
              " is outside [0, ", world_size, ")");
  TORCH_CHECK(rows >= 0, "shard_range: negative row count ", rows);
  return {rows * rank / world_size, rows * (rank + 1) / world_size};
}

/// This rank's rows of `batch`, with the padding columns that no row of the share uses removed;
/// nullopt when the share is empty.
inline std::optional<data::Batch> shard(const data::Batch& batch, int rank, int world_size) {
  const auto rows = batch.inputs.input_ids.size(0);
  const auto range = shard_range(rows, rank, world_size);
  const int64_t first = range.first, last = range.second;  // not a structured binding: the lambda below captures them
  if (first == last) return std::nullopt;
  data::Batch part;
  const auto& mask = batch.inputs.attention_mask;
  int64_t width = batch.inputs.input_ids.size(1);
  if (mask.defined()) {
    const auto used = mask.narrow(0, first, last - first).ne(0).any(0);  // [length]: some row has a token there
    const auto positions = used.nonzero();
    width = positions.numel() == 0 ? 1 : positions.max().item<int64_t>() + 1;
  }
  const auto cut = [&](const at::Tensor& tensor) {
    return tensor.defined() ? tensor.narrow(0, first, last - first).narrow(1, 0, width) : tensor;
  };
  part.inputs.input_ids = cut(batch.inputs.input_ids);
  part.inputs.attention_mask = cut(batch.inputs.attention_mask);
  part.inputs.token_type_ids = cut(batch.inputs.token_type_ids);
  part.labels = batch.labels.defined() ? batch.labels.narrow(0, first, last - first) : batch.labels;
  if (static_cast<int64_t>(batch.indices.size()) == rows) {  // a hand-made batch may have none
    part.indices.assign(batch.indices.begin() + first, batch.indices.begin() + last);
  }
  return part;
}

}  // namespace lora::distributed
