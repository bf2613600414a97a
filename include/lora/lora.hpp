#pragma once

/// \file
/// Umbrella header: everything lora offers for native LibTorch modules. TorchScript support
/// is opt-in: include <lora/jit.hpp>.
///
///     #include <lora/lora.hpp>
///
///     torch::nn::Linear pretrained(768, 768);
///     lora::LoRALinear<> layer(pretrained, lora::LoRAOptions(8).alpha(16));
///     lora::print_trainable_parameters(*layer);

#include <lora/adaptable.hpp>
#include <lora/config.hpp>
#include <lora/conv.hpp>
#include <lora/dropout.hpp>
#include <lora/embedding.hpp>
#include <lora/functional.hpp>
#include <lora/init.hpp>
#include <lora/inject.hpp>
#include <lora/layer.hpp>
#include <lora/linear.hpp>
#include <lora/mixed_batch.hpp>
#include <lora/lora_module.hpp>
#include <lora/modules_to_save.hpp>
#include <lora/options.hpp>
#include <lora/plan.hpp>
#include <lora/quantize.hpp>
#include <lora/state_dict.hpp>
#include <lora/target.hpp>
#include <lora/trainable.hpp>
#include <lora/version.hpp>
#include <lora/weighted_adapter.hpp>
