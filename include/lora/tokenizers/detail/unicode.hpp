#pragma once

// UTF-8 decoding/encoding, normalisation and the character classes BERT's tokenizer uses, on
// top of utf8proc (Debian libutf8proc-dev).

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <utf8proc.h>

namespace lora::tokenizers::detail {

constexpr char32_t kReplacement = 0xFFFD;

/// Code points of `text`; each byte of an invalid UTF-8 sequence becomes U+FFFD.
inline void decode_utf8(const std::string& text, std::vector<char32_t>& out) {
  out.clear();
  out.reserve(text.size());
  const auto* bytes = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
  const auto size = static_cast<utf8proc_ssize_t>(text.size());
  utf8proc_ssize_t i = 0;
  while (i < size) {
    if (bytes[i] < 0x80) {  // ASCII fast path
      out.push_back(bytes[i++]);
      continue;
    }
    utf8proc_int32_t cp = 0;
    const auto used = utf8proc_iterate(bytes + i, size - i, &cp);
    if (used <= 0) {
      out.push_back(kReplacement);
      ++i;
    } else {
      out.push_back(static_cast<char32_t>(cp));
      i += used;
    }
  }
}

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
    return;
  }
  utf8proc_uint8_t buffer[4];
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buffer);
  out.append(reinterpret_cast<const char*>(buffer), static_cast<size_t>(n));
}

inline utf8proc_category_t category(char32_t cp) { return utf8proc_category(static_cast<utf8proc_int32_t>(cp)); }

/// BERT's whitespace: space, \t, \n, \r and category Zs.
inline bool is_whitespace(char32_t cp) {
  return cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r' || category(cp) == UTF8PROC_CATEGORY_ZS;
}

/// BERT's control characters: category C* except \t, \n, \r.
inline bool is_control(char32_t cp) {
  if (cp == '\t' || cp == '\n' || cp == '\r') return false;
  const auto c = category(cp);
  return c == UTF8PROC_CATEGORY_CC || c == UTF8PROC_CATEGORY_CF || c == UTF8PROC_CATEGORY_CS ||
         c == UTF8PROC_CATEGORY_CO || c == UTF8PROC_CATEGORY_CN;
}

/// BERT's punctuation: the four ASCII symbol ranges and category P*.
inline bool is_punctuation(char32_t cp) {
  if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) || (cp >= 123 && cp <= 126)) {
    return true;
  }
  if (cp < 0x80) return false;
  const auto c = category(cp);
  return c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO;
}

/// CJK ideographs (the blocks BERT splits into single characters).
inline bool is_cjk(char32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF) ||
         (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

/// `\p{L}`: categories Lu, Ll, Lt, Lm, Lo.
inline bool is_letter(char32_t cp) {
  if (cp < 0x80) return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
  const auto c = category(cp);
  return c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO;
}

/// `\p{N}`: categories Nd, Nl, No.
inline bool is_number(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  const auto c = category(cp);
  return c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO;
}

/// `\s` of Python's `regex` module (GPT-2's pre-tokenizer): the Unicode White_Space property.
inline bool is_white_space(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

/// Python's `str.isspace()` (what `str.strip()` removes): White_Space plus U+001C..U+001F.
inline bool is_python_space(char32_t cp) { return is_white_space(cp) || (cp >= 0x1C && cp <= 0x1F); }

/// Characters Python's str.split() splits on that survive BERT's cleaning (line and paragraph
/// separators, categories Zl/Zp).
inline bool splits_words(char32_t cp) { return cp == ' ' || cp == 0x2028 || cp == 0x2029; }

/// Appends the lowercase of `cp` as Python's str.lower() does for a single character
/// (U+0130 İ becomes "i" + U+0307).
inline void append_lower(std::vector<char32_t>& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
  } else if (cp == 0x130) {
    out.push_back('i');
    out.push_back(0x307);
  } else {
    out.push_back(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp))));
  }
}

/// NFC (`compose`) or NFD of a code point sequence.
inline std::vector<char32_t> normalize(const std::vector<char32_t>& cps, bool compose) {
  std::string utf8;
  for (const auto cp : cps) append_utf8(utf8, cp);
  utf8proc_uint8_t* mapped = nullptr;
  const int options = UTF8PROC_STABLE | (compose ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE);
  const auto length = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(utf8.data()),
                                   static_cast<utf8proc_ssize_t>(utf8.size()), &mapped,
                                   static_cast<utf8proc_option_t>(options));
  TORCH_CHECK(length >= 0, "lora::tokenizers: Unicode normalisation failed: ", utf8proc_errmsg(length));
  std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> owner(mapped, &std::free);
  std::vector<char32_t> out;
  decode_utf8(std::string(reinterpret_cast<const char*>(mapped), static_cast<size_t>(length)), out);
  return out;
}

}  // namespace lora::tokenizers::detail
