#pragma once

// Shared helpers for the unit tests.

#include <functional>
#include <string>

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

/// A seeded fixture: every test starts from the same generator state.
class SeededTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
};

}  // namespace lora::testing

#define LORA_EXPECT_THROWS_WITH(statement, needle) \
  EXPECT_TRUE(::lora::testing::throws_with([&] { statement; }, needle))
