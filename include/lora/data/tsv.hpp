#pragma once

/// \file
/// Labelled sentences from tab-separated files: GLUE SST-2 (`sentence<TAB>label` with a header,
/// test split `index<TAB>sentence`), and plain `label<TAB>text` / `text<TAB>label` files.

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

namespace lora::data {

/// One example. `label` is -1 when the file has none (GLUE's test split).
struct Example {
  std::string text;
  int64_t label = -1;
};

/// What to do with a malformed row.
enum class OnError {
  kFail,  ///< throw, naming the file and line (default)
  kSkip,  ///< leave the row out and record why in `Examples::skipped`
};

/// Examples read from a file, and the rows left out with `OnError::kSkip`.
struct Examples {
  std::vector<Example> examples;
  std::vector<std::string> skipped;  ///< "file:line: reason"
};

/// The row layouts this reader knows.
enum class Layout {
  kGlue,       ///< header `sentence<TAB>label` (or `index<TAB>sentence` for unlabelled test rows)
  kLabelText,  ///< `label<TAB>text`, no header
  kTextLabel,  ///< `text<TAB>label`, no header (e.g. UCI sentiment labelled sentences)
};

namespace detail {

inline bool parse_label(const std::string& field, int64_t num_labels, int64_t& label, std::string& why) {
  size_t used = 0;
  try {
    label = std::stoll(field, &used);
  } catch (...) {
    used = 0;
  }
  if (field.empty() || used != field.size()) {
    why = "label '" + field + "' is not an integer";
    return false;
  }
  if (label < 0 || label >= num_labels) {
    why = "label " + field + " is outside [0, " + std::to_string(num_labels) + ")";
    return false;
  }
  return true;
}

inline void rstrip_spaces(std::string& text) {
  while (!text.empty() && text.back() == ' ') text.pop_back();
}

}  // namespace detail

/// Reads a tab-separated file of labelled sentences. Lines are split on '\n' only (a CR before
/// it is dropped); each row must hold exactly one tab; trailing spaces of the text are
/// stripped (SST-2 writes "sentence \t0"); labels must be integers in [0, num_labels).
/// Malformed rows throw with file and line number, or are skipped with `OnError::kSkip`.
///
///     auto dev = lora::data::read_tsv("sst2/dev.tsv", lora::data::Layout::kGlue);
inline Examples read_tsv(const std::string& path, Layout layout, int64_t num_labels = 2,
                         OnError on_error = OnError::kFail) {
  TORCH_CHECK(num_labels > 0, "read_tsv: num_labels must be > 0 (got ", num_labels, ")");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "read_tsv: cannot open '", path, "'");
  Examples result;
  std::string line;
  int64_t number = 0;
  bool unlabelled = false;
  auto reject = [&](const std::string& why) {
    const auto message = path + ":" + std::to_string(number) + ": " + why;
    TORCH_CHECK(on_error == OnError::kSkip, "read_tsv: ", message);
    result.skipped.push_back(message);
  };
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (layout == Layout::kGlue && number == 1) {
      if (line == "index\tsentence") {
        unlabelled = true;
      } else {
        TORCH_CHECK(line == "sentence\tlabel", "read_tsv: ", path,
                    ":1: expected the GLUE header 'sentence<TAB>label' or 'index<TAB>sentence' (got '", line, "')");
      }
      continue;
    }
    if (line.empty()) continue;
    const auto tab = line.find('\t');
    if (tab == std::string::npos) {
      reject("expected one tab, found none");
      continue;
    }
    if (line.find('\t', tab + 1) != std::string::npos) {
      reject("expected one tab, found more");
      continue;
    }
    std::string left = line.substr(0, tab), right = line.substr(tab + 1);
    Example example;
    std::string why;
    if (layout == Layout::kGlue && unlabelled) {
      example.text = right;  // index<TAB>sentence
    } else if (layout == Layout::kLabelText) {
      if (!detail::parse_label(left, num_labels, example.label, why)) {
        reject(why);
        continue;
      }
      example.text = right;
    } else {  // text<TAB>label (GLUE train/dev too)
      if (!detail::parse_label(right, num_labels, example.label, why)) {
        reject(why);
        continue;
      }
      example.text = left;
    }
    detail::rstrip_spaces(example.text);
    result.examples.push_back(std::move(example));
  }
  return result;
}

}  // namespace lora::data
