// libFuzzer target: adapter_config.json (PEFT) and config.json (BERT, DistilBERT, RoBERTa)
// readers on arbitrary JSON documents. Inputs that are not JSON at all are left to nlohmann
// (the harness parses them); what our readers do with any JSON value is under test.
#include <sstream>

#include <lora/io/peft_config.hpp>
#include <lora/models/distilbert_config.hpp>
#include <lora/models/roberta_config.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto ordered = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (ordered.is_discarded()) return 0;
  const auto json = nlohmann::json::parse(text, nullptr, false);
  std::ostringstream warnings;
  lora::fuzz::expect_only_library_errors("adapter_config", [&] {
    const auto config = lora::io::lora_config_from_json(ordered, "fuzz", &warnings);
    (void)lora::io::adapter_config_json(config);  // and written back
  });
  lora::fuzz::expect_only_library_errors("BertConfig", [&] { (void)lora::models::BertConfig::from_json(json).to_json(); });
  lora::fuzz::expect_only_library_errors("DistilBertConfig",
                                         [&] { (void)lora::models::DistilBertConfig::from_json(json).to_json(); });
  lora::fuzz::expect_only_library_errors("RobertaConfig",
                                         [&] { (void)lora::models::RobertaConfig::from_json(json).to_json(); });
  return 0;
}
