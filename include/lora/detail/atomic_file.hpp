#pragma once

// Writing a file so that a failure never leaves a half-written file in its place.

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <ostream>
#include <string>

#include <unistd.h>

#include <c10/util/Exception.h>

namespace lora::detail {

/// Calls `write` on a temporary file beside `path`, then renames it over `path`. On any failure
/// the temporary file is removed, `path` keeps its previous contents, and the error names the
/// file, prefixed with `who` ("safetensors", "save_bert", ...).
inline void write_file_atomically(const std::string& path, const std::function<void(std::ostream&)>& write,
                                  const char* who) {
  const std::string temporary = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(out, who, ": cannot write '", temporary, "': ", std::strerror(errno));
    try {
      write(out);
      out.flush();
    } catch (...) {
      out.close();
      std::remove(temporary.c_str());
      throw;
    }
    if (!out) {
      out.close();
      std::remove(temporary.c_str());
      TORCH_CHECK(false, who, ": writing '", temporary, "' failed");
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    const int error = errno;
    std::remove(temporary.c_str());
    TORCH_CHECK(false, who, ": cannot replace '", path, "': ", std::strerror(error));
  }
}

}  // namespace lora::detail
