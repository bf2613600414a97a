#pragma once

// Building native module trees by dotted path ("bert.encoder.layer.0.query").

#include <memory>
#include <string>
#include <utility>

#include <torch/nn/module.h>

namespace lora::detail {

/// The module that holds the last component of `path` below `root` (plain modules are created
/// for the missing components on the way), and that last component.
inline std::pair<torch::nn::Module*, std::string> parent_for_path(torch::nn::Module& root, const std::string& path) {
  torch::nn::Module* node = &root;
  size_t start = 0;
  for (auto dot = path.find('.'); dot != std::string::npos; dot = path.find('.', start)) {
    const auto part = path.substr(start, dot - start);
    const auto children = node->named_children();
    const auto* child = children.find(part);
    node = child ? child->get() : node->register_module(part, std::make_shared<torch::nn::Module>()).get();
    start = dot + 1;
  }
  return {node, path.substr(start)};
}

}  // namespace lora::detail
