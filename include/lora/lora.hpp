#pragma once

/// \file
/// Umbrella header: everything lora offers for native LibTorch modules.
///
///     #include <lora/lora.hpp>
///
///     torch::nn::Linear pretrained(768, 768);
///     lora::LoRALinear<> layer(pretrained, lora::LoRAOptions(8).alpha(16));
///     lora::print_trainable_parameters(*layer);

#include <lora/functional.hpp>
#include <lora/init.hpp>
#include <lora/layer.hpp>
#include <lora/linear.hpp>
#include <lora/options.hpp>
#include <lora/trainable.hpp>
#include <lora/version.hpp>
