// libFuzzer target: the TSV readers (GLUE, label<TAB>text, text<TAB>label; failing and
// skipping malformed rows) on arbitrary files.
#include <lora/data/tsv.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& path = lora::fuzz::scratch_file(data, size, ".tsv");
  for (const auto layout : {lora::data::Layout::kGlue, lora::data::Layout::kLabelText, lora::data::Layout::kTextLabel}) {
    for (const auto on_error : {lora::data::OnError::kFail, lora::data::OnError::kSkip}) {
      lora::fuzz::expect_only_library_errors("read_tsv", [&] { (void)lora::data::read_tsv(path, layout, 3, on_error); });
    }
  }
  return 0;
}
