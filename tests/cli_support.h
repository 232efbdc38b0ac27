#pragma once
// Helpers for tests that run the `ssa` binary ($SSA_BINARY): run a command line,
// start one in the background, and build a small real dataset with `ssa data prepare`.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace ssa::test {

inline std::string ssa_binary() {
  const char* path = std::getenv("SSA_BINARY");
  return path ? path : "ssa";
}

// A fresh folder under the build's test tmp dir, named after the running test.
inline std::filesystem::path fresh_dir(const std::string& tag) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  auto dir = std::filesystem::path(SSA_TEST_TMP) / (std::string(info->test_suite_name()) + "." + info->name() + "." + tag);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

struct Result {
  int exit_code = -1;
  std::string output;  // stdout + stderr
};

// Runs `ssa <args>` through the shell, capturing output. env: "A=1 B=2 " prefix.
inline Result run_ssa(const std::string& args, const std::string& env = "") {
  const auto log = std::filesystem::path(SSA_TEST_TMP) / ("cmd-" + std::to_string(::getpid()) + ".log");
  std::filesystem::create_directories(log.parent_path());
  const std::string cmd = env + " " + ssa_binary() + " " + args + " > " + log.string() + " 2>&1";
  const int status = std::system(cmd.c_str());
  Result r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  r.output = text.str();
  return r;
}

// Starts `ssa <args>` in the background (its own process group); returns the pid.
inline pid_t spawn_ssa(const std::string& args, const std::string& env, const std::filesystem::path& log) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    const std::string cmd = "exec env " + env + " " + ssa_binary() + " " + args + " > " + log.string() + " 2>&1";
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// Deterministic English-like text: words from a small vocabulary with a Zipf-ish
// skew, sentences and paragraphs (blank lines), so byte-level models can learn.
inline std::string synthetic_text(size_t bytes, uint32_t seed) {
  static const char* words[] = {"the", "of", "and", "a", "to", "in", "is", "that", "for", "it", "as", "with",
                                "was", "on", "be", "by", "attention", "sparse", "block", "model", "token",
                                "query", "key", "value", "dictionary", "word", "meaning", "noun", "verb", "old"};
  std::mt19937 rng(seed);
  std::string out;
  while (out.size() < bytes) {
    const int sentence = 4 + static_cast<int>(rng() % 9);
    for (int i = 0; i < sentence; ++i) {
      const size_t idx = std::min<size_t>(rng() % 30, rng() % 30);
      out += words[idx];
      out += i + 1 < sentence ? " " : ". ";
    }
    if (rng() % 5 == 0) out += "\n\n";
  }
  return out;
}

// Writes text files and prepares train/val shards in dir/data; returns dir/data.
inline std::filesystem::path prepare_dataset(const std::filesystem::path& dir, size_t bytes = 200000) {
  const auto text = dir / "corpus.txt";
  std::ofstream(text) << synthetic_text(bytes, 11);
  const auto data = dir / "data";
  auto r = run_ssa("data prepare --input " + text.string() + " --output " + data.string() + " --split blank-lines --val-fraction 0.1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return data;
}

}  // namespace ssa::test
