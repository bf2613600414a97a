#pragma once

// Shared helpers for the unit tests.

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <unistd.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace lora::testing {

/// Runs `fn` and checks that it throws a c10::Error whose message contains `needle`.
inline ::testing::AssertionResult throws_with(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    if (message.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "message \"" << message << "\" lacks \"" << needle << "\"";
  }
  return ::testing::AssertionFailure() << "no exception thrown (expected one mentioning \"" << needle << "\")";
}

/// Largest absolute elementwise difference, compared in float64.
inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

/// Checks the gradient autograd gives `parameter` for `loss` (a float64 scalar) against central
/// finite differences, element by element, within `tolerance`.
inline void expect_gradient_matches_finite_differences(const std::function<torch::Tensor()>& loss,
                                                       const torch::Tensor& parameter, double tolerance) {
  if (parameter.grad().defined()) parameter.mutable_grad().zero_();
  loss().backward();
  const auto grad = parameter.grad().clone();
  auto flat = parameter.view({-1});
  const double eps = 1e-6;
  for (int64_t i = 0; i < flat.numel(); ++i) {
    torch::NoGradGuard no_grad;
    const double original = flat[i].item<double>();
    flat[i] = original + eps;
    const double plus = loss().item<double>();
    flat[i] = original - eps;
    const double minus = loss().item<double>();
    flat[i] = original;
    EXPECT_NEAR(grad.view({-1})[i].item<double>(), (plus - minus) / (2 * eps), tolerance) << "element " << i;
  }
}

/// A seeded fixture: every test starts from the same generator state.
class SeededTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
};

/// A seeded fixture with a fresh temporary folder per test, removed afterwards.
class TempDirTest : public SeededTest {
 protected:
  void SetUp() override {
    SeededTest::SetUp();
    dir_ = std::filesystem::temp_directory_path() /
           ("lora-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->test_suite_name() + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  std::filesystem::path dir_;
};

/// A nested JSON array of numbers as a tensor of `dtype` (golden files store tensors so).
template <typename Json>
torch::Tensor json_tensor(const Json& value, torch::Dtype dtype) {
  std::vector<int64_t> shape;
  const Json* level = &value;
  while (level->is_array() && !level->empty()) {
    shape.push_back(static_cast<int64_t>(level->size()));
    level = &(*level)[0];
  }
  std::vector<double> flat;
  std::function<void(const Json&)> walk = [&](const Json& node) {
    if (node.is_array()) {
      for (const auto& child : node) walk(child);
    } else {
      flat.push_back(node.template get<double>());
    }
  };
  walk(value);
  return torch::tensor(flat, torch::kDouble).view(shape).to(dtype);
}

}  // namespace lora::testing

#define LORA_EXPECT_THROWS_WITH(statement, needle) \
  EXPECT_TRUE(::lora::testing::throws_with([&] { statement; }, needle))
