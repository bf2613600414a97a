#pragma once

/// \file
/// Data-parallel LoRA training on c10d (Gloo): process groups from torchrun's environment,
/// gradient synchronisation of the trainable parameters, distributed sampling. Opt-in: link
/// the CMake target `lora::distributed` (Debian: libgloo-dev); `lora/lora.hpp` does not include it.

#include <lora/distributed/gradient_sync.hpp>
#include <lora/distributed/process_group.hpp>
#include <lora/distributed/shard.hpp>
