#pragma once

// Writing a file, or a folder of files, so that a failure never leaves a half-written file or
// a mismatched set of files in its place.

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <ostream>
#include <string>
#include <system_error>

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <c10/util/Exception.h>

namespace lora::detail {

/// Calls `write` on a temporary file beside `path`, then renames it over `path`. On any failure
/// the temporary file is removed, `path` keeps its previous contents, and the error names the
/// file, prefixed with `who` ("safetensors", "save_bert", ...).
inline void write_file_atomically(const std::string& path, const std::function<void(std::ostream&)>& write,
                                  const char* who) {
  const std::string temporary = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(out, who, ": cannot write '", temporary, "': ", std::strerror(errno));
    try {
      write(out);
      out.flush();
    } catch (...) {
      out.close();
      std::remove(temporary.c_str());
      throw;
    }
    if (!out) {
      out.close();
      std::remove(temporary.c_str());
      TORCH_CHECK(false, who, ": writing '", temporary, "' failed");
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    const int error = errno;
    std::remove(temporary.c_str());
    TORCH_CHECK(false, who, ": cannot replace '", path, "': ", std::strerror(error));
  }
}

/// A name beside `path` for a temporary file or folder, unique within this process.
inline std::filesystem::path temporary_sibling(const std::filesystem::path& path, const char* what) {
  static std::atomic<unsigned> counter{0};
  return path.parent_path() / ("." + path.filename().string() + "." + what + "-" + std::to_string(::getpid()) + "-" +
                               std::to_string(counter++));
}

/// Flushes a file or folder to the disk (best effort: a file system without fsync is fine).
inline void sync_path(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

/// Links (or, where the file system cannot, copies) every entry of `from` that `to` lacks
/// into `to`, folders recursively: the files the new folder keeps from the old one.
inline void carry_over(const std::filesystem::path& from, const std::filesystem::path& to,
                       const std::function<bool(const std::string&)>& keep, const char* who) {
  namespace fs = std::filesystem;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(from, error)) {
    const auto target = to / entry.path().filename();
    if (fs::exists(fs::symlink_status(target, error))) continue;  // written anew
    if (keep && !keep(entry.path().filename().string())) continue;
    if (entry.is_symlink(error)) {
      fs::copy_symlink(entry.path(), target, error);
    } else if (entry.is_directory(error)) {
      fs::create_directory(target, error);
      if (!error) carry_over(entry.path(), target, nullptr, who);
    } else {
      fs::create_hard_link(entry.path(), target, error);
      if (error) fs::copy_file(entry.path(), target, error);
    }
    TORCH_CHECK(!error, who, ": cannot keep '", entry.path().string(), "' in the new folder: ", error.message());
  }
  TORCH_CHECK(!error, who, ": cannot read folder '", from.string(), "': ", error.message());
}

/// Removes the temporary folders that earlier, killed processes left beside `target`.
inline void remove_stale_temporaries(const std::filesystem::path& target) {
  namespace fs = std::filesystem;
  std::error_code error;
  const std::string stem = "." + target.filename().string() + ".";
  for (const auto& entry : fs::directory_iterator(target.parent_path(), error)) {
    const auto name = entry.path().filename().string();
    if (name.compare(0, stem.size(), stem) != 0) continue;
    const auto rest = name.substr(stem.size());
    for (const std::string what : {"tmp-", "old-"}) {
      if (rest.compare(0, what.size(), what) != 0) continue;
      const auto digits = rest.substr(what.size(), rest.find('-', what.size()) - what.size());
      if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
      const auto pid = static_cast<pid_t>(std::stol(digits));
      if (pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH) fs::remove_all(entry.path(), error);
    }
  }
}

/// Writes a folder as one unit: `write` fills a fresh temporary folder beside `folder`, which
/// then replaces `folder` in a single rename (Linux: renameat2 RENAME_EXCHANGE), so that
/// readers see either the old files or the new ones, never a mix, and a failure or crash
/// before the rename leaves the old folder untouched. Entries of an existing folder that
/// `write` does not produce (sub-folders, a README) are kept, hard-linked into the new folder
/// before the exchange, unless `keep` (given an entry's name) says no. Temporary folders left
/// by killed processes are removed. Errors name the folder, prefixed with `who`.
inline void replace_folder_atomically(const std::string& folder,
                                      const std::function<void(const std::filesystem::path&)>& write, const char* who,
                                      const std::function<bool(const std::string&)>& keep = nullptr) {
  namespace fs = std::filesystem;
  std::error_code error;
  const fs::path destination = fs::absolute(fs::path(folder), error).lexically_normal();
  TORCH_CHECK(!error && !folder.empty(), who, ": invalid folder '", folder, "'");
  fs::path target = destination.has_filename() ? destination : destination.parent_path();
  fs::create_directories(target.parent_path(), error);
  TORCH_CHECK(!error, who, ": cannot create folder '", target.parent_path().string(), "': ", error.message());
  auto status = fs::symlink_status(target, error);
  TORCH_CHECK(!error || error == std::errc::no_such_file_or_directory, who, ": cannot read '", target.string(),
              "': ", error.message());
  error.clear();
  if (fs::is_symlink(status) && fs::is_directory(fs::status(target, error))) {
    target = fs::canonical(target, error);  // replace the folder the link points to; the link stays
    TORCH_CHECK(!error, who, ": cannot resolve '", destination.string(), "': ", error.message());
    status = fs::symlink_status(target, error);
  }
  error.clear();
  const bool exists = fs::exists(status);
  TORCH_CHECK(!exists || fs::is_directory(status), who, ": '", target.string(), "' exists and is not a folder");
  if (exists) {
    // Replacing the working directory (or a folder above it) would pull the ground from under
    // the process: refuse.
    const auto cwd = fs::weakly_canonical(fs::current_path(error), error);
    const auto relative = error ? fs::path("..") : cwd.lexically_relative(fs::weakly_canonical(target, error));
    TORCH_CHECK(error || relative.empty() || *relative.begin() == "..", who, ": will not replace '", target.string(),
                "': it is the working directory or holds it; save into a sub-folder");
    error.clear();
  }
  remove_stale_temporaries(target);
  const auto temporary = temporary_sibling(target, "tmp");
  fs::create_directory(temporary, error);
  TORCH_CHECK(!error, who, ": cannot create folder '", temporary.string(), "': ", error.message());
  try {
    write(temporary);
    if (exists) carry_over(target, temporary, keep, who);
    for (const auto& entry : fs::directory_iterator(temporary, error)) {
      if (entry.is_regular_file(error)) sync_path(entry.path());
    }
    sync_path(temporary);
  } catch (const fs::filesystem_error& failure) {
    fs::remove_all(temporary, error);
    TORCH_CHECK(false, who, ": writing '", target.string(), "' failed: ", failure.what());
  } catch (...) {
    fs::remove_all(temporary, error);
    throw;
  }
  auto fail = [&](const char* what, int code) {
    fs::remove_all(temporary, error);
    TORCH_CHECK(false, who, ": cannot ", what, " '", target.string(), "': ", std::strerror(code));
  };
  if (!exists) {
    if (std::rename(temporary.c_str(), target.c_str()) != 0) fail("create", errno);
  } else {
    bool exchanged = false;
#if defined(__linux__) && defined(RENAME_EXCHANGE)
    exchanged = ::renameat2(AT_FDCWD, temporary.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0;
    if (!exchanged && errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) fail("replace", errno);
#endif
    if (!exchanged) {
      // No atomic exchange here: move the old folder aside first. A crash in between leaves
      // the old folder beside, complete, never a mixed one.
      const auto old = temporary_sibling(target, "old");
      if (std::rename(target.c_str(), old.c_str()) != 0) fail("move aside", errno);
      if (std::rename(temporary.c_str(), target.c_str()) != 0) {
        const int code = errno;
        std::rename(old.c_str(), target.c_str());
        fail("replace", code);
      }
      fs::remove_all(old, error);
    } else {
      fs::remove_all(temporary, error);  // now the old folder
    }
  }
  sync_path(target.parent_path());
}

}  // namespace lora::detail
