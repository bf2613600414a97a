#pragma once

// Small string helpers for error messages.

#include <string>
#include <vector>

namespace lora::detail {

/// "a, b, c" (or "none" for an empty list).
inline std::string join(const std::vector<std::string>& items, const std::string& separator = ", ") {
  if (items.empty()) return "none";
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += separator;
    out += items[i];
  }
  return out;
}

}  // namespace lora::detail
