// libFuzzer target: the safetensors reader (header JSON, offsets, dtypes, shapes, BOOL bytes)
// on arbitrary files, mapped and copied. Every byte of every tensor is read, so that a view
// outside the file's bytes (or a copy from outside them) faults or, for the copied file's heap
// buffer, is caught by AddressSanitizer.
#include <lora/io/safetensors.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& path = lora::fuzz::scratch_file(data, size, ".safetensors");
  for (const auto access : {lora::io::FileAccess::kMap, lora::io::FileAccess::kCopy}) {
    lora::fuzz::expect_only_library_errors("safetensors", [&] {
      const auto file = lora::io::load_safetensors(path, {std::nullopt, access});
      unsigned checksum = 0;
      for (const auto& item : file.tensors) {
        const auto* bytes = static_cast<const uint8_t*>(item.value().data_ptr());
        const auto count = static_cast<size_t>(item.value().numel()) * item.value().element_size();
        for (size_t i = 0; i < count; ++i) checksum += bytes[i];
      }
      volatile unsigned sink = checksum;
      (void)sink;
    });
  }
  return 0;
}
