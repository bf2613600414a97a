#pragma once

// What every fuzz target shares: the rule that hostile input may only ever raise c10::Error
// (a message for the user), and a scratch file on tmpfs for the readers that take a path.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <functional>
#include <string>

#include <unistd.h>

#include <c10/util/Exception.h>
#include <c10/util/Logging.h>

namespace lora::fuzz {

/// Runs `body`; a c10::Error is the expected refusal, anything else escaping is a bug: abort,
/// so that libFuzzer records the input.
inline void expect_only_library_errors(const char* what, const std::function<void()>& body) {
  try {
    body();
  } catch (const c10::Error&) {
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s: a non-library exception escaped: %s\n", what, error.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "%s: an unknown exception escaped\n", what);
    std::abort();
  }
}

/// A file holding `data`, rewritten for each input (in /dev/shm when it exists).
inline const std::string& scratch_file(const uint8_t* data, size_t size, const char* suffix) {
  static const std::string path = std::string(::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") +
                                  "/lora-fuzz-" + std::to_string(::getpid()) + suffix;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data),
                                                                 static_cast<std::streamsize>(size));
  return path;
}

/// c10::Error records a stack trace when it is made (milliseconds); refusing hostile input is
/// the common case here, so the fuzzers do without (it is a process-wide setting of c10).
inline void skip_stack_traces() {
  c10::SetStackTraceFetcher([] { return std::string(); });
}

}  // namespace lora::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  lora::fuzz::skip_stack_traces();
  return 0;
}
