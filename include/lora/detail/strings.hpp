#pragma once

// Small string helpers for error messages.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lora::detail {

inline bool starts_with(const std::string& text, const std::string& prefix) {
  return text.size() >= prefix.size() && text.compare(0, prefix.size(), prefix) == 0;
}

inline bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// True when the dotted module name `name` lies strictly inside `outer` ("a.b.c" inside "a.b").
inline bool is_inside(const std::string& name, const std::string& outer) {
  return name.size() > outer.size() && starts_with(name, outer) && name[outer.size()] == '.';
}

/// The integer `text` spells out in full (JSON object keys such as id2label's "0"), or nothing.
inline std::optional<int64_t> parse_integer(const std::string& text) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (...) {
    return std::nullopt;
  }
  if (text.empty() || used != text.size()) return std::nullopt;
  return value;
}

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
