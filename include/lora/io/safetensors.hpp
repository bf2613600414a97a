#pragma once

/// \file
/// safetensors files: read (memory-mapped, zero-copy where alignment allows, or copied) and write
/// (atomically), as Hugging Face's reference implementation defines them.
///
/// Layout: an 8-byte little-endian header length N, N bytes of JSON
/// `{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
///   "__metadata__": {"key": "value"}}`, then the raw little-endian tensor bytes. Offsets are
/// relative to the end of the header and must tile the data region exactly.

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/ordered_dict.h>

#include <lora/detail/atomic_file.hpp>

namespace lora::io {

/// The contents of a safetensors file: tensors in file order and the `__metadata__` strings.
struct Safetensors {
  torch::OrderedDict<std::string, at::Tensor> tensors{"tensor"};
  std::map<std::string, std::string> metadata;
};

/// How `load_safetensors` holds a file's bytes.
enum class FileAccess {
  /// Memory-mapped, private: no copy, pages read when first touched, released when the last
  /// tensor over them goes. The risk: if another process truncates the file while such tensors
  /// live, the next access to a page past the new end raises SIGBUS, which kills the process.
  kMap,
  /// Read into memory once (one allocation of the file's size): the tensors never depend on the
  /// file again, and a file that shrinks while it is read is an error, not a signal.
  kCopy,
};

struct SafetensorsReadOptions {
  /// Floating-point tensors are converted to it (integer and bool tensors are left as they are).
  std::optional<c10::ScalarType> dtype;
  FileAccess access = FileAccess::kMap;
};

namespace detail {

/// The reference implementation's ceiling for the JSON header.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

inline const std::vector<std::pair<std::string, c10::ScalarType>>& dtype_names() {
  static const std::vector<std::pair<std::string, c10::ScalarType>> names = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16}, {"I64", at::kLong},
      {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},   {"U8", at::kByte},       {"BOOL", at::kBool}};
  return names;
}

inline std::optional<c10::ScalarType> dtype_from_name(const std::string& name) {
  for (const auto& [key, dtype] : dtype_names()) {
    if (key == name) return dtype;
  }
  return std::nullopt;
}

inline std::string dtype_name(c10::ScalarType dtype) {
  for (const auto& [key, value] : dtype_names()) {
    if (value == dtype) return key;
  }
  TORCH_CHECK(false, "safetensors: cannot store dtype ", c10::toString(dtype),
              " (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
  return {};
}

inline bool little_endian() {
  const uint16_t probe = 1;
  uint8_t first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

/// A file's bytes, either memory-mapped (private, copy-on-write: tensors over it may be written
/// to without touching the file) or read into one aligned allocation.
class FileBytes {
 public:
  FileBytes(const std::string& path, FileAccess access) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    TORCH_CHECK(fd >= 0, "safetensors: cannot open '", path, "': ", std::strerror(errno));
    struct stat info {};
    if (::fstat(fd, &info) != 0) {
      const int error = errno;
      ::close(fd);
      TORCH_CHECK(false, "safetensors: cannot stat '", path, "': ", std::strerror(error));
    }
    size_ = static_cast<size_t>(info.st_size);
    if (size_ == 0) {
      ::close(fd);
      return;
    }
    if (access == FileAccess::kMap) {
      void* data = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
      const int error = errno;
      ::close(fd);
      TORCH_CHECK(data != MAP_FAILED, "safetensors: cannot map '", path, "': ", std::strerror(error));
      data_ = static_cast<uint8_t*>(data);
      mapped_ = true;
      return;
    }
    // 64-byte aligned (and a multiple of it, as aligned_alloc wants), so that tensors can view it.
    data_ = static_cast<uint8_t*>(std::aligned_alloc(64, (size_ + 63) / 64 * 64));
    if (data_ == nullptr) {
      ::close(fd);
      TORCH_CHECK(false, "safetensors: cannot allocate ", size_, " bytes to read '", path, "'");
    }
    size_t done = 0;
    while (done < size_) {
      const ssize_t got = ::read(fd, data_ + done, size_ - done);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        const int error = got < 0 ? errno : 0;
        ::close(fd);
        std::free(data_);
        data_ = nullptr;
        TORCH_CHECK(false, "safetensors: reading '", path, "' stopped at byte ", done, " of ", size_,
                    error != 0 ? ": " : " (the file shrank while it was read)", error != 0 ? std::strerror(error) : "");
      }
      done += static_cast<size_t>(got);
    }
    ::close(fd);
  }
  ~FileBytes() {
    if (data_ == nullptr) return;
    if (mapped_) {
      ::munmap(data_, size_);
    } else {
      std::free(data_);
    }
  }
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
};

/// Header entries, checked against each other and against the data size.
struct Entry {
  std::string name;
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

inline uint64_t read_u64_le(const uint8_t* bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

/// Parses and validates the header; every message names the file, the tensor and the numbers.
inline std::vector<Entry> parse_header(const uint8_t* bytes, size_t size, const std::string& where,
                                       std::map<std::string, std::string>& metadata) {
  TORCH_CHECK(size >= 8, "safetensors: '", where, "' is ", size, " bytes, too short for the 8-byte header length");
  const uint64_t header_size = read_u64_le(bytes);
  TORCH_CHECK(header_size <= kMaxHeaderBytes, "safetensors: header length ", header_size, " in '", where,
              "' exceeds the limit of ", kMaxHeaderBytes, " bytes");
  TORCH_CHECK(header_size <= size - 8, "safetensors: header length ", header_size, " in '", where,
              "' exceeds the file size (", size, " bytes)");
  const char* text = reinterpret_cast<const char*>(bytes + 8);

  // Duplicate names are invalid but JSON parsers keep one silently: watch the top-level keys.
  std::unordered_set<std::string> keys;
  std::string duplicate;
  nlohmann::json::parser_callback_t watch = [&](int depth, nlohmann::json::parse_event_t event,
                                                nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key) {
      const auto key = parsed.get<std::string>();
      if (!keys.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + header_size, watch);
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, "safetensors: invalid JSON header in '", where, "': ", error.what());
  }
  TORCH_CHECK(duplicate.empty(), "safetensors: tensor '", duplicate, "' is listed twice in '", where, "'");
  TORCH_CHECK(header.is_object(), "safetensors: the header of '", where, "' is not a JSON object");

  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      TORCH_CHECK(value.is_object(), "safetensors: __metadata__ in '", where, "' must be an object of strings");
      for (const auto& [key, item] : value.items()) {
        TORCH_CHECK(item.is_string(), "safetensors: __metadata__['", key, "'] in '", where, "' is not a string");
        metadata[key] = item.get<std::string>();
      }
      continue;
    }
    TORCH_CHECK(value.is_object() && value.contains("dtype") && value.contains("shape") &&
                    value.contains("data_offsets"),
                "safetensors: tensor '", name, "' in '", where, "' needs dtype, shape and data_offsets");
    const auto& dtype_value = value["dtype"];
    TORCH_CHECK(dtype_value.is_string(), "safetensors: tensor '", name, "' in '", where, "' has a non-string dtype");
    const auto dtype = dtype_from_name(dtype_value.get<std::string>());
    TORCH_CHECK(dtype.has_value(), "safetensors: tensor '", name, "' in '", where, "' has unknown dtype '",
                dtype_value.get<std::string>(), "' (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
    Entry entry{name, *dtype, {}, 0, 0};
    const auto& shape = value["shape"];
    TORCH_CHECK(shape.is_array(), "safetensors: tensor '", name, "' in '", where, "' has a shape that is not a list");
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& dim : shape) {
      TORCH_CHECK(dim.is_number_unsigned(), "safetensors: tensor '", name, "' in '", where,
                  "' has a dimension that is not a non-negative integer: ", dim.dump());
      const uint64_t extent = dim.get<uint64_t>();
      TORCH_CHECK(extent <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "safetensors: tensor '",
                  name, "' in '", where, "' has dimension ", extent, ", too large");
      entry.shape.push_back(static_cast<int64_t>(extent));
      if (extent != 0 && numel > std::numeric_limits<uint64_t>::max() / extent) overflow = true;
      numel *= extent;
    }
    const auto& offsets = value["data_offsets"];
    TORCH_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                    offsets[1].is_number_unsigned(),
                "safetensors: tensor '", name, "' in '", where, "' needs data_offsets [begin, end] (got ",
                offsets.dump(), ")");
    entry.begin = offsets[0].get<uint64_t>();
    entry.end = offsets[1].get<uint64_t>();
    TORCH_CHECK(entry.begin <= entry.end, "safetensors: tensor '", name, "' in '", where, "' has data_offsets [",
                entry.begin, ", ", entry.end, "] that end before they begin");
    const uint64_t itemsize = c10::elementSize(*dtype);
    TORCH_CHECK(!overflow && numel <= std::numeric_limits<uint64_t>::max() / itemsize &&
                    entry.end - entry.begin == numel * itemsize,
                "safetensors: tensor '", name, "' in '", where, "' has ", entry.end - entry.begin,
                " bytes but its dtype and shape need ", overflow ? std::string("more than 2^64") : std::to_string(numel * itemsize));
    entries.push_back(std::move(entry));
  }

  // The data must be tiled exactly: no gaps, no overlaps, nothing past the end.
  const uint64_t data_size = size - 8 - header_size;
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const Entry* previous = nullptr;
  for (const auto& entry : entries) {
    TORCH_CHECK(entry.end <= data_size, "safetensors: tensor '", entry.name, "' in '", where, "' ends at byte ",
                entry.end, " of a data section of ", data_size, " bytes");
    TORCH_CHECK(entry.begin >= expected, "safetensors: tensors '", previous ? previous->name : "", "' and '",
                entry.name, "' overlap in '", where, "' (bytes ", entry.begin, " < ", expected, ")");
    TORCH_CHECK(entry.begin == expected, "safetensors: gap before tensor '", entry.name, "' in '", where,
                "': its data starts at byte ", entry.begin, " but the previous tensor ends at ", expected);
    expected = entry.end;
    previous = &entry;
  }
  TORCH_CHECK(expected == data_size, "safetensors: the tensors of '", where, "' cover ", expected, " of ", data_size,
              " data bytes");
  return entries;
}

}  // namespace detail

/// Reads a safetensors file.
///
/// By default the file is memory-mapped (`FileAccess::kMap`); each tensor whose data is suitably
/// aligned is a view of the mapping (no copy; the mapping lives as long as any such tensor),
/// others are copied. The mapping is private: writing to a tensor never changes the file. With
/// `FileAccess::kCopy` the file is read into memory instead, for files another process may
/// rewrite or truncate while the tensors are in use. With `dtype`, floating-point tensors are
/// converted to it (integer and bool tensors are left as they are).
///
///     auto file = lora::io::load_safetensors("model.safetensors");
///     at::Tensor w = file.tensors["bert.embeddings.word_embeddings.weight"];
///     auto kept = lora::io::load_safetensors("adapter.safetensors", {at::kFloat, lora::io::FileAccess::kCopy});
inline Safetensors load_safetensors(const std::string& path, const SafetensorsReadOptions& options) {
  TORCH_CHECK(detail::little_endian(), "safetensors: reading needs a little-endian machine");
  auto bytes = std::make_shared<detail::FileBytes>(path, options.access);
  Safetensors result;
  const auto entries = detail::parse_header(bytes->data(), bytes->size(), path, result.metadata);
  uint8_t* data = bytes->data() == nullptr ? nullptr : bytes->data() + 8 + detail::read_u64_le(bytes->data());
  for (const auto& entry : entries) {
    const auto tensor_options = at::TensorOptions().dtype(entry.dtype);
    uint8_t* begin = data + entry.begin;
    at::Tensor tensor;
    const auto itemsize = c10::elementSize(entry.dtype);
    if (entry.dtype == at::kBool) {  // any byte but 0 and 1 would be an invalid bool
      const auto bad = std::find_if(begin, data + entry.end, [](uint8_t byte) { return byte > 1; });
      TORCH_CHECK(bad == data + entry.end, "safetensors: BOOL tensor '", entry.name, "' in '", path,
                  "' holds byte value ", static_cast<int>(bad == data + entry.end ? 0 : *bad), " at element ",
                  bad - begin, " (only 0 and 1 are valid)");
    }
    if (reinterpret_cast<uintptr_t>(begin) % itemsize == 0 && entry.end > entry.begin) {
      tensor = at::from_blob(begin, entry.shape, [bytes](void*) {}, tensor_options);
    } else {
      tensor = at::empty(entry.shape, tensor_options);
      if (entry.end > entry.begin) std::memcpy(tensor.data_ptr(), begin, entry.end - entry.begin);
    }
    if (options.dtype && at::isFloatingType(entry.dtype) && entry.dtype != *options.dtype) {
      tensor = tensor.to(*options.dtype);
    }
    result.tensors.insert(entry.name, std::move(tensor));
  }
  return result;
}

inline Safetensors load_safetensors(const std::string& path, std::optional<c10::ScalarType> dtype = std::nullopt) {
  return load_safetensors(path, SafetensorsReadOptions{dtype, FileAccess::kMap});
}

/// Writes tensors (and `__metadata__` strings) as a safetensors file that the reference
/// implementation reads: header padded with spaces to a multiple of 8 bytes, tensors stored
/// contiguous and little-endian, largest element size first so every tensor stays aligned.
///
/// The file is written to a temporary name beside `path` and renamed over it, so a failed
/// save never leaves a half-written file where a good one was.
inline void save_safetensors(const std::string& path, const torch::OrderedDict<std::string, at::Tensor>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  TORCH_CHECK(detail::little_endian(), "safetensors: writing needs a little-endian machine");
  struct Item {
    std::string name;
    at::Tensor data;
  };
  std::vector<Item> items;
  for (const auto& item : tensors) {
    TORCH_CHECK(item.key() != "__metadata__", "safetensors: '__metadata__' is reserved and cannot name a tensor");
    TORCH_CHECK(item.value().defined(), "safetensors: tensor '", item.key(), "' is undefined");
    detail::dtype_name(item.value().scalar_type());  // throws for unsupported dtypes
    items.push_back({item.key(), item.value().detach().to(at::kCPU).contiguous()});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    const auto sa = a.data.element_size(), sb = b.data.element_size();
    return sa != sb ? sa > sb : a.name < b.name;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& item : items) {
    const uint64_t bytes = static_cast<uint64_t>(item.data.numel()) * item.data.element_size();
    header[item.name] = {{"dtype", detail::dtype_name(item.data.scalar_type())},
                         {"shape", item.data.sizes().vec()},
                         {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  lora::detail::write_file_atomically(
      path,
      [&](std::ostream& out) {
        uint8_t length[8];
        for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
        out.write(reinterpret_cast<const char*>(length), 8);
        out.write(text.data(), static_cast<std::streamsize>(text.size()));
        for (const auto& item : items) {
          out.write(static_cast<const char*>(item.data.data_ptr()),
                    static_cast<std::streamsize>(item.data.numel() * item.data.element_size()));
        }
      },
      "safetensors");
}

}  // namespace lora::io
