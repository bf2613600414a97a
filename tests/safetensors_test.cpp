#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <sys/wait.h>
#include <unistd.h>

#include <lora/io/safetensors.hpp>

#include "test_helpers.hpp"

namespace fs = std::filesystem;
using lora::io::load_safetensors;
using lora::io::save_safetensors;

namespace {

class SafetensorsTest : public lora::testing::TempDirTest {
 protected:
  /// Writes a file from a JSON header text and raw data bytes, exactly as given.
  std::string raw_file(const std::string& header, const std::string& data, int64_t claimed = -1) const {
    const auto file = path("raw.safetensors");
    std::ofstream out(file, std::ios::binary);
    const uint64_t length = claimed < 0 ? header.size() : static_cast<uint64_t>(claimed);
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((length >> (8 * i)) & 0xff));
    out << header << data;
    return file;
  }
};

std::string bytes_of(const std::vector<float>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
}

std::string read_all(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST_F(SafetensorsTest, RoundTripsEveryDtypeBitForBit) {
  torch::OrderedDict<std::string, torch::Tensor> tensors;
  tensors.insert("f64", torch::randn({3, 2}, torch::kDouble));
  tensors.insert("f32", torch::randn({4, 5}));
  tensors.insert("f16", torch::randn({7}).to(torch::kHalf));
  tensors.insert("bf16", torch::randn({2, 3}).to(torch::kBFloat16));
  tensors.insert("i64", torch::randint(-1000000, 1000000, {5}, torch::kLong));
  tensors.insert("i32", torch::randint(-1000, 1000, {2, 2}, torch::kInt));
  tensors.insert("i16", torch::randint(-100, 100, {3}, torch::kShort));
  tensors.insert("i8", torch::randint(-100, 100, {3}, torch::kChar));
  tensors.insert("u8", torch::randint(0, 255, {9}, torch::kByte));
  tensors.insert("bool", torch::rand({6}) > 0.5);
  tensors.insert("scalar", torch::tensor(3.5));
  tensors.insert("empty", torch::zeros({0, 3}));
  tensors.insert("strided", torch::randn({4, 6}).t());  // not contiguous: stored contiguous
  save_safetensors(path("all.safetensors"), tensors, {{"format", "pt"}, {"note", "round trip"}});

  const auto file = load_safetensors(path("all.safetensors"));
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (const auto& item : tensors) {
    const auto* loaded = file.tensors.find(item.key());
    ASSERT_NE(loaded, nullptr) << item.key();
    EXPECT_EQ(loaded->scalar_type(), item.value().scalar_type()) << item.key();
    EXPECT_EQ(loaded->sizes(), item.value().sizes()) << item.key();
    EXPECT_TRUE(torch::equal(*loaded, item.value())) << item.key();
  }
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"format", "pt"}, {"note", "round trip"}}));
  EXPECT_FALSE(fs::exists(path("all.safetensors.tmp-" + std::to_string(::getpid()))));
}

TEST_F(SafetensorsTest, WritesTheReferenceLayout) {
  torch::OrderedDict<std::string, torch::Tensor> tensors;
  tensors.insert("b", torch::arange(3, torch::kFloat));
  tensors.insert("a", torch::arange(2, torch::kDouble));
  save_safetensors(path("layout.safetensors"), tensors, {{"format", "pt"}});
  const auto bytes = read_all(path("layout.safetensors"));
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ((8 + length) % 8, 0u);
  const auto header = bytes.substr(8, length);
  // Larger elements first (keeps alignment), metadata first, padding with spaces.
  const std::string expected =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F64","shape":[2],"data_offsets":[0,16]},)"
      R"("b":{"dtype":"F32","shape":[3],"data_offsets":[16,28]}})";
  EXPECT_EQ(header.substr(0, expected.size()), expected);
  EXPECT_EQ(header.find_first_not_of(' ', expected.size()), std::string::npos);
  EXPECT_EQ(bytes.size(), 8 + length + 28);
  float third;
  std::memcpy(&third, bytes.data() + 8 + length + 16 + 8, 4);
  EXPECT_EQ(third, 2.0f);
}

TEST_F(SafetensorsTest, ReadsAHandWrittenFile) {
  const std::string header = R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"k":"v"}})";
  const auto file = load_safetensors(raw_file(header, bytes_of({1, 2, 3, 4})));
  EXPECT_TRUE(torch::equal(file.tensors["x"], torch::tensor({{1.0f, 2.0f}, {3.0f, 4.0f}})));
  EXPECT_EQ(file.metadata.at("k"), "v");
}

TEST_F(SafetensorsTest, MapsAlignedTensorsWithoutCopyingAndCopiesMisalignedOnes) {
  torch::OrderedDict<std::string, torch::Tensor> tensors;
  tensors.insert("a", torch::randn({64}));
  tensors.insert("b", torch::randn({64}));
  save_safetensors(path("map.safetensors"), tensors);
  auto file = load_safetensors(path("map.safetensors"));
  const auto* a = static_cast<const char*>(file.tensors["a"].data_ptr());
  const auto* b = static_cast<const char*>(file.tensors["b"].data_ptr());
  EXPECT_EQ(b - a, 64 * 4) << "both tensors should be views of one mapping";
  // Writing to a mapped tensor leaves the file alone (private mapping).
  const auto before = read_all(path("map.safetensors"));
  file.tensors["a"].fill_(7);
  EXPECT_EQ(read_all(path("map.safetensors")), before);
  EXPECT_TRUE(torch::equal(load_safetensors(path("map.safetensors")).tensors["a"], tensors["a"]));

  // A 55-byte header puts the float data at an address that is not a multiple of 4: copied.
  const auto odd = load_safetensors(raw_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})" + std::string(1, ' '),
                                             bytes_of({1.5f, -2.0f})));
  EXPECT_TRUE(torch::equal(odd.tensors["x"], torch::tensor({1.5f, -2.0f})));
}

namespace {

/// Runs `body` in a forked child with SIGBUS turned into exit code 77 (so that a sanitizer's own
/// handler cannot hide it); returns the child's exit code.
int exit_code_in_child(const std::function<void()>& body) {
  const pid_t child = ::fork();
  if (child == 0) {
    std::signal(SIGBUS, [](int) { ::_exit(77); });
    try {
      body();
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

// What docs/robustness.md says of the default: a mapped file truncated while its tensors live
// raises SIGBUS on the next access; FileAccess::kCopy does not depend on the file after the read.
TEST_F(SafetensorsTest, CopiedFilesSurviveTruncationThatMappedOnesDoNot) {
  torch::OrderedDict<std::string, torch::Tensor> tensors;
  tensors.insert("w", torch::randn({64, 1024}));  // 256 KiB: many pages past the cut
  const auto file = path("shrinking.safetensors");
  const auto expected = tensors["w"].clone();
  const auto load_truncate_and_sum = [&](lora::io::FileAccess access) {
    return [&, access] {
      save_safetensors(file, tensors);
      const auto loaded = load_safetensors(file, {std::nullopt, access});
      fs::resize_file(file, 4096);
      const auto& w = loaded.tensors["w"];
      const auto* values = w.data_ptr<float>();
      volatile float sum = 0;
      for (int64_t i = 0; i < w.numel(); i += 1024) sum = sum + values[i];
      // memcmp, not torch ops: a forked child must not start OpenMP threads
      if (std::memcmp(values, expected.data_ptr<float>(), expected.numel() * sizeof(float)) != 0) ::_exit(3);
    };
  };
  EXPECT_EQ(exit_code_in_child(load_truncate_and_sum(lora::io::FileAccess::kMap)), 77) << "expected SIGBUS";
  EXPECT_EQ(exit_code_in_child(load_truncate_and_sum(lora::io::FileAccess::kCopy)), 0);

  // In this process too: the copy keeps its values after the file is cut and then rewritten.
  save_safetensors(file, tensors);
  const auto copied = load_safetensors(file, {torch::kDouble, lora::io::FileAccess::kCopy});
  fs::resize_file(file, 100);
  std::ofstream(file, std::ios::binary | std::ios::trunc) << "overwritten";
  EXPECT_EQ(copied.tensors["w"].scalar_type(), torch::kDouble);
  EXPECT_TRUE(torch::equal(copied.tensors["w"], tensors["w"].to(torch::kDouble)));
  const auto* data = static_cast<const char*>(copied.tensors["w"].data_ptr());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(data) % 8, 0u);
}

// A file that holds fewer bytes than its size says (as files under /sys do, and as a file cut
// while it is read would) is refused with the byte counts.
TEST_F(SafetensorsTest, FilesShorterThanTheirSizeAreRefusedWhenCopied) {
  const std::string sysfs = "/sys/kernel/mm/transparent_hugepage/enabled";
  std::error_code error;
  if (!fs::exists(sysfs, error) || fs::file_size(sysfs, error) <= read_all(sysfs).size()) {
    GTEST_SKIP() << sysfs << " is missing or holds as many bytes as its size says";
  }
  LORA_EXPECT_THROWS_WITH(load_safetensors(sysfs, {std::nullopt, lora::io::FileAccess::kCopy}),
                          "the file shrank while it was read");
}

TEST_F(SafetensorsTest, ConvertsFloatingTensorsOnRequest) {
  torch::OrderedDict<std::string, torch::Tensor> tensors;
  tensors.insert("w", torch::randn({3}).to(torch::kBFloat16));
  tensors.insert("ids", torch::arange(4));
  save_safetensors(path("convert.safetensors"), tensors);
  const auto file = load_safetensors(path("convert.safetensors"), torch::kFloat32);
  EXPECT_EQ(file.tensors["w"].scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(file.tensors["w"], tensors["w"].to(torch::kFloat32)));
  EXPECT_EQ(file.tensors["ids"].scalar_type(), torch::kLong);
}

TEST_F(SafetensorsTest, RejectsHostileFiles) {
  const std::string f32x2 = bytes_of({1, 2});
  auto load = [&](const std::string& header, const std::string& data, int64_t claimed = -1) {
    return load_safetensors(raw_file(header, data, claimed));
  };
  LORA_EXPECT_THROWS_WITH(load_safetensors(path("missing.safetensors")), "cannot open");
  {
    std::ofstream(path("short.safetensors"), std::ios::binary) << "abc";
    LORA_EXPECT_THROWS_WITH(load_safetensors(path("short.safetensors")), "is 3 bytes, too short");
  }
  LORA_EXPECT_THROWS_WITH(load("{}", "", 1000), "header length 1000 in '");
  LORA_EXPECT_THROWS_WITH(load("{}", "", 1000), "exceeds the file size (10 bytes)");
  LORA_EXPECT_THROWS_WITH(load("{}", "", int64_t(1) << 40), "header length 1099511627776 in '");
  LORA_EXPECT_THROWS_WITH(load("{}", "", int64_t(1) << 40), "exceeds the limit of 100000000 bytes");
  LORA_EXPECT_THROWS_WITH(load("{\"x\": ", ""), "invalid JSON header");
  LORA_EXPECT_THROWS_WITH(load("[1, 2]", ""), "is not a JSON object");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F8","shape":[2],"data_offsets":[0,8]}})", f32x2),
                          "tensor 'x' in '");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F8","shape":[2],"data_offsets":[0,8]}})", f32x2),
                          "has unknown dtype 'F8'");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[2]}})", f32x2),
                          "tensor 'x' in '");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[2]}})", f32x2), "needs dtype, shape and data_offsets");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f32x2),
                          "has a dimension that is not a non-negative integer: -2");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", f32x2),
                          "needs data_offsets [begin, end] (got [8])");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", f32x2),
                          "has data_offsets [8, 0] that end before they begin");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", f32x2),
                          "tensor 'x' in '");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", f32x2),
                          "has 8 bytes but its dtype and shape need 12");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", f32x2),
                          "tensor 'x' in '");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", f32x2),
                          "ends at byte 16 of a data section of 8 bytes");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                               f32x2),
                          "tensors 'x' and 'y' overlap in '");
  LORA_EXPECT_THROWS_WITH(load(R"({"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f32x2),
                          "gap before tensor 'y' in '");
  LORA_EXPECT_THROWS_WITH(load(R"({"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f32x2),
                          "its data starts at byte 4 but the previous tensor ends at 0");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", f32x2),
                          "cover 4 of 8 data bytes");
  LORA_EXPECT_THROWS_WITH(load(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                               R"("x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                               f32x2),
                          "tensor 'x' is listed twice");
  LORA_EXPECT_THROWS_WITH(load(R"({"__metadata__":{"format":1}})", ""), "__metadata__['format'] in '");
  LORA_EXPECT_THROWS_WITH(load(R"({"b":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", std::string("\x01\x07", 2)),
                          "BOOL tensor 'b' in '");
  LORA_EXPECT_THROWS_WITH(load(R"({"b":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", std::string("\x01\x07", 2)),
                          "holds byte value 7 at element 1");
}

TEST_F(SafetensorsTest, AFailedSaveLeavesThePreviousFileIntact) {
  torch::OrderedDict<std::string, torch::Tensor> good;
  good.insert("w", torch::randn({4}));
  save_safetensors(path("keep.safetensors"), good);
  const auto before = read_all(path("keep.safetensors"));

  torch::OrderedDict<std::string, torch::Tensor> bad;
  bad.insert("w", torch::randn({4}));
  bad.insert("z", torch::randn({2}, torch::kComplexFloat));
  LORA_EXPECT_THROWS_WITH(save_safetensors(path("keep.safetensors"), bad), "cannot store dtype ComplexFloat");
  torch::OrderedDict<std::string, torch::Tensor> undefined;
  undefined.insert("u", torch::Tensor());
  LORA_EXPECT_THROWS_WITH(save_safetensors(path("keep.safetensors"), undefined), "tensor 'u' is undefined");
  torch::OrderedDict<std::string, torch::Tensor> reserved;
  reserved.insert("__metadata__", torch::randn({1}));
  LORA_EXPECT_THROWS_WITH(save_safetensors(path("keep.safetensors"), reserved), "'__metadata__' is reserved");
  // The rename itself fails when the destination is a directory: the temporary file goes away.
  fs::create_directories(path("occupied.safetensors"));
  LORA_EXPECT_THROWS_WITH(save_safetensors(path("occupied.safetensors"), good), "cannot replace '");
  LORA_EXPECT_THROWS_WITH(save_safetensors(path("no/such/dir/x.safetensors"), good), "cannot write '");

  EXPECT_EQ(read_all(path("keep.safetensors")), before);
  std::vector<std::string> leftovers;
  for (const auto& entry : fs::directory_iterator(dir_)) leftovers.push_back(entry.path().filename().string());
  std::sort(leftovers.begin(), leftovers.end());
  EXPECT_EQ(leftovers, (std::vector<std::string>{"keep.safetensors", "occupied.safetensors"}));
}
