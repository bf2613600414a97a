#pragma once

// An undo log: the inverse of each change made so far, run in reverse order when an operation
// fails halfway, so that the operation is all or nothing.

#include <exception>
#include <functional>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>

namespace lora::detail {

/// Record the inverse of each change as it is made; `commit()` when everything succeeded.
/// A log destroyed without `commit()` (an exception unwinding) undoes the changes, newest
/// first.
class UndoLog {
 public:
  UndoLog() = default;
  UndoLog(const UndoLog&) = delete;
  UndoLog& operator=(const UndoLog&) = delete;
  ~UndoLog() { rollback(); }

  void add(std::function<void()> undo) { undo_.push_back(std::move(undo)); }
  void commit() { undo_.clear(); }

  /// Undoes everything recorded, newest first. An undo step that fails is reported and
  /// skipped: the others still run.
  void rollback() noexcept {
    while (!undo_.empty()) {
      try {
        undo_.back()();
      } catch (const std::exception& error) {
        TORCH_WARN("lora: undoing a failed operation failed too: ", error.what());
      } catch (...) {
        TORCH_WARN("lora: undoing a failed operation failed too");
      }
      undo_.pop_back();
    }
  }

 private:
  std::vector<std::function<void()>> undo_;
};

}  // namespace lora::detail
