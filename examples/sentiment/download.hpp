#pragma once

// Downloads a model folder (config.json, model.safetensors and the tokenizer's files: vocab.txt,
// vocab.json + merges.txt, or tokenizer.json; tokenizer_config.json when there) from the Hugging Face hub
// URL layout, {endpoint}/{repo}/resolve/{revision}/{file}, with libcurl: HF_ENDPOINT and HF_HOME
// are honoured as huggingface_hub does, downloads resume from a partial file, sizes are checked.

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <curl/curl.h>
#include <unistd.h>

#include <c10/util/Exception.h>

namespace sentiment {

namespace detail {

struct Transfer {
  std::FILE* file = nullptr;
  std::string name;
  curl_off_t offset = 0;  // bytes already on disk when this transfer started
  bool tty = false;
};

inline size_t write_to_file(char* data, size_t size, size_t count, void* user) {
  return std::fwrite(data, size, count, static_cast<Transfer*>(user)->file) * size;
}

inline int show_progress(void* user, curl_off_t total, curl_off_t now, curl_off_t, curl_off_t) {
  const auto* transfer = static_cast<Transfer*>(user);
  if (!transfer->tty || total <= 0) return 0;
  const double done = static_cast<double>(transfer->offset + now), all = static_cast<double>(transfer->offset + total);
  const int width = 30, filled = static_cast<int>(width * done / all);
  std::fprintf(stderr, "\r  %-18s [%s%s] %5.1f%%  %.1f / %.1f MB", transfer->name.c_str(),
               std::string(static_cast<size_t>(filled), '#').c_str(),
               std::string(static_cast<size_t>(width - filled), ' ').c_str(), 100 * done / all, done / 1e6, all / 1e6);
  return 0;
}

/// Size announced by the server for `url` (after redirects), or -1 when it gives none.
inline curl_off_t remote_size(const std::string& url) {
  CURL* curl = curl_easy_init();
  TORCH_CHECK(curl != nullptr, "download: cannot initialise libcurl");
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(curl, CURLOPT_FAILONERROR, 1L);
  const auto code = curl_easy_perform(curl);
  long status = 0;
  curl_off_t size = -1;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &size);
  curl_easy_cleanup(curl);
  TORCH_CHECK(code == CURLE_OK, "download: ", url, " failed: ", curl_easy_strerror(code),
              status ? " (HTTP " + std::to_string(status) + ")" : std::string());
  return size;
}

/// The HTTP status of a HEAD request for `url` (after redirects); transport failures throw.
inline long http_status(const std::string& url) {
  CURL* curl = curl_easy_init();
  TORCH_CHECK(curl != nullptr, "download: cannot initialise libcurl");
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
  const auto code = curl_easy_perform(curl);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(curl);
  TORCH_CHECK(code == CURLE_OK, "download: ", url, " failed: ", curl_easy_strerror(code));
  return status;
}

/// Downloads `url` into `target`, resuming `target.incomplete` when present.
inline void fetch(const std::string& url, const std::filesystem::path& target) {
  namespace fs = std::filesystem;
  const curl_off_t expected = remote_size(url);
  const auto partial = target.string() + ".incomplete";
  curl_off_t have = fs::exists(partial) ? static_cast<curl_off_t>(fs::file_size(partial)) : 0;
  if (expected >= 0 && have > expected) {  // a stale partial file of something else
    fs::remove(partial);
    have = 0;
  }
  if (expected < 0 || have < expected) {
    Transfer transfer{std::fopen(partial.c_str(), "ab"), target.filename().string(), have, ::isatty(STDERR_FILENO) != 0};
    TORCH_CHECK(transfer.file != nullptr, "download: cannot write '", partial, "'");
    CURL* curl = curl_easy_init();
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(curl, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(curl, CURLOPT_RESUME_FROM_LARGE, have);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, write_to_file);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &transfer);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, show_progress);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &transfer);
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    const auto code = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(curl);
    std::fclose(transfer.file);
    if (transfer.tty) std::fprintf(stderr, "\n");
    TORCH_CHECK(code == CURLE_OK, "download: ", url, " failed: ", curl_easy_strerror(code),
                status ? " (HTTP " + std::to_string(status) + ")" : std::string(),
                "; run the command again to resume");
  }
  const auto size = static_cast<curl_off_t>(fs::file_size(partial));
  TORCH_CHECK(expected < 0 || size == expected, "download: ", url, " gave ", size, " bytes but the server announced ",
              expected, "; run the command again to resume");
  fs::rename(partial, target);
}

}  // namespace detail

/// The local folder of Hugging Face model `repo` (e.g. "bert-base-uncased"), downloaded when
/// missing: `$HF_HOME/lora/models--<repo with / as -->/<revision>/` (HF_HOME defaults to
/// ~/.cache/huggingface). `$HF_ENDPOINT` replaces https://huggingface.co.
inline std::string fetch_hf_model(const std::string& repo, const std::string& revision = "main") {
  namespace fs = std::filesystem;
  TORCH_CHECK(!repo.empty() && repo.find("..") == std::string::npos && repo.front() != '/',
              "--hf-model: '", repo, "' is not a model name like bert-base-uncased or org/name");
  const char* endpoint_env = std::getenv("HF_ENDPOINT");
  std::string endpoint = endpoint_env && *endpoint_env ? endpoint_env : "https://huggingface.co";
  while (!endpoint.empty() && endpoint.back() == '/') endpoint.pop_back();
  fs::path home;
  if (const char* value = std::getenv("HF_HOME")) {
    home = value;
  } else if (const char* value = std::getenv("HOME")) {
    home = fs::path(value) / ".cache" / "huggingface";
  } else {
    home = ".huggingface";
  }
  std::string flat = repo;
  for (size_t at = flat.find('/'); at != std::string::npos; at = flat.find('/', at + 2)) flat.replace(at, 1, "--");
  const auto folder = home / "lora" / ("models--" + flat) / revision;
  fs::create_directories(folder);
  static const bool initialised = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  TORCH_CHECK(initialised, "download: cannot initialise libcurl");
  auto url = [&](const std::string& file) { return endpoint + "/" + repo + "/resolve/" + revision + "/" + file; };
  auto have = [&](const std::string& file) { return fs::exists(folder / file); };
  auto get = [&](const std::string& file) {
    if (!have(file)) detail::fetch(url(file), folder / file);
  };
  auto offered = [&](const std::string& file) { return detail::http_status(url(file)) == 200; };
  get("config.json");
  // The tokenizer: BERT and DistilBERT ship vocab.txt, RoBERTa vocab.json + merges.txt; some
  // folders only tokenizer.json. A folder that has one set already needs no network for it;
  // tokenizer_config.json comes first, so that an interrupted download fetches it again.
  const bool tokenizer_cached =
      have("vocab.txt") || (have("vocab.json") && have("merges.txt")) || have("tokenizer.json");
  if (!tokenizer_cached) {
    if (offered("tokenizer_config.json")) get("tokenizer_config.json");
    if (offered("vocab.txt")) {
      get("vocab.txt");
    } else if (offered("vocab.json") && offered("merges.txt")) {
      get("vocab.json");
      get("merges.txt");
    } else {
      TORCH_CHECK(offered("tokenizer.json"), "download: ", repo,
                  " has no tokenizer files (vocab.txt, vocab.json + merges.txt or tokenizer.json)");
      get("tokenizer.json");
    }
  }
  if (!have("model.safetensors")) {
    TORCH_CHECK(offered("model.safetensors"), "download: ", repo, " has no model.safetensors at revision '", revision,
                "'", offered("pytorch_model.bin") ? " (only pytorch_model.bin, which LibTorch cannot read: convert it "
                                                    "to safetensors with Python, see docs/bert.md)"
                                                  : "");
    get("model.safetensors");
  }
  return folder.string();
}

}  // namespace sentiment
