#pragma once

/// \file
/// Library version (kept equal to `project(lora VERSION ...)` in CMakeLists.txt; a test checks).

#define LORA_VERSION_MAJOR 0
#define LORA_VERSION_MINOR 1
#define LORA_VERSION_PATCH 0

namespace lora {
/// "major.minor.patch"
inline constexpr const char* version = "0.1.0";
}  // namespace lora
