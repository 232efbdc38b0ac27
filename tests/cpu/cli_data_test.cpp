// `ssa data` as a user runs it: exit codes and messages of prepare, inspect
// and bench, good and bad.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace fs = std::filesystem;

namespace {

struct SsaRun {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

SsaRun run_ssa(const std::string& arguments) {
  const char* binary = std::getenv("SSA_BINARY");
  EXPECT_NE(binary, nullptr) << "SSA_BINARY is not set";
  SsaRun run;
  if (binary == nullptr) return run;
  std::string command = std::string(binary) + " " + arguments + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  EXPECT_NE(pipe, nullptr);
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) run.output.append(buffer.data(), n);
  int status = pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::path(SSA_TEST_TMP) / "cli_data" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

}  // namespace

TEST(CliData, PrepareInspectBench) {
  fs::path dir = fresh_dir("good");
  {
    std::ofstream text(dir / "corpus.txt");
    for (int i = 0; i < 400; ++i) text << "paragraph " << i << ": caf\xC3\xA9 and some words\nsecond line\n\n";
  }
  std::string out = (dir / "ds").string();
  SsaRun prepare = run_ssa("data prepare --input " + (dir / "corpus.txt").string() + " --output " + out +
                        " --split blank-lines --val-fraction 0.25 --shard-tokens 4000 --quiet");
  EXPECT_EQ(prepare.exit_code, 0) << prepare.output;
  EXPECT_TRUE(contains(prepare.output, "train: 300 documents")) << prepare.output;
  EXPECT_TRUE(contains(prepare.output, "val:   100 documents")) << prepare.output;

  SsaRun inspect = run_ssa("data inspect " + out + " " + out + "/val");
  EXPECT_EQ(inspect.exit_code, 0) << inspect.output;
  EXPECT_TRUE(contains(inspect.output, "valid:")) << inspect.output;
  EXPECT_TRUE(contains(inspect.output, "shard-000000.h5")) << inspect.output;

  SsaRun bench = run_ssa("data bench " + out + " --seq-len 16 --batch 4 --steps 20 --cp 2 --dp 2");
  EXPECT_EQ(bench.exit_code, 0) << bench.output;
  EXPECT_TRUE(contains(bench.output, "M tokens/s")) << bench.output;
  EXPECT_TRUE(contains(bench.output, "consumer waited")) << bench.output;

  // A second prepare into the same folder must not mix datasets.
  SsaRun again = run_ssa("data prepare --input " + (dir / "corpus.txt").string() + " --output " + out + " --quiet");
  EXPECT_EQ(again.exit_code, 1) << again.output;
  EXPECT_TRUE(contains(again.output, "--overwrite")) << again.output;
}

TEST(CliData, BadInputsExitNonZeroNamingTheProblem) {
  fs::path dir = fresh_dir("bad");
  SsaRun missing = run_ssa("data inspect " + (dir / "nope").string());
  EXPECT_EQ(missing.exit_code, 1) << missing.output;
  EXPECT_TRUE(contains(missing.output, (dir / "nope").string() + ": no such folder")) << missing.output;

  fs::create_directories(dir / "garbage");
  std::ofstream(dir / "garbage" / "x.h5") << "this is not an HDF5 file at all";
  std::string shard = (dir / "garbage" / "x.h5").string();
  SsaRun inspect = run_ssa("data inspect " + (dir / "garbage").string());
  EXPECT_EQ(inspect.exit_code, 1) << inspect.output;
  EXPECT_TRUE(contains(inspect.output, "shard " + shard + ": not an HDF5 file")) << inspect.output;
  EXPECT_TRUE(contains(inspect.output, "INVALID")) << inspect.output;

  SsaRun bench = run_ssa("data bench " + (dir / "garbage").string() + " --steps 2");
  EXPECT_EQ(bench.exit_code, 1) << bench.output;
  EXPECT_TRUE(contains(bench.output, "ssa: error: shard " + shard + ": not an HDF5 file")) << bench.output;
  EXPECT_FALSE(contains(bench.output, "HDF5-DIAG")) << "HDF5's own error stack leaked:\n" << bench.output;

  SsaRun no_input = run_ssa("data prepare --input " + (dir / "absent.txt").string() + " --output " +
                         (dir / "out").string());
  EXPECT_EQ(no_input.exit_code, 1) << no_input.output;
  EXPECT_TRUE(contains(no_input.output, (dir / "absent.txt").string() + ": no such file or folder")) << no_input.output;

  SsaRun bad_option = run_ssa("data prepare --input x --output y --split words");
  EXPECT_NE(bad_option.exit_code, 0) << bad_option.output;
  EXPECT_TRUE(contains(bad_option.output, "words")) << bad_option.output;
}
