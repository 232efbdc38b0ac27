#pragma once
// main() of the MPI test programs (include once per program). The process grid
// initialises MPI (also as a singleton without a launcher) and stays alive for
// the whole program, so tests can create grids of other shapes. Ranks > 0 print
// only failures, prefixed with their rank. Tests must keep every collective
// unconditional (EXPECT_*, not ASSERT_*, around communication) so a failure on
// one rank cannot leave the others waiting.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <memory>

#include "parallel/process_grid.h"

namespace ssa::test {

inline parallel::ProcessGrid*& world_grid_slot() {
  static parallel::ProcessGrid* grid = nullptr;
  return grid;
}
// The grid of the whole world: dp = world size, cp = 1.
inline parallel::ProcessGrid& world_grid() { return *world_grid_slot(); }
inline int world_rank() { return static_cast<int>(world_grid().rank()); }
inline int world_size() { return static_cast<int>(world_grid().world_size()); }

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (result.failed()) {
      fmt::print(stderr, "[rank {}] {}:{}: failure\n{}\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.summary());
    }
  }

 private:
  int rank_;
};

}  // namespace ssa::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto grid = std::make_unique<ssa::parallel::ProcessGrid>(ssa::parallel::ProcessGrid::init(0, 1));
  ssa::test::world_grid_slot() = grid.get();
  if (grid->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new ssa::test::RankFailurePrinter(static_cast<int>(grid->rank())));
  }
  int status = RUN_ALL_TESTS();
  // The program fails when any rank failed.
  at::Tensor failed = at::full({1}, status != 0 ? 1 : 0, at::TensorOptions().dtype(at::kInt));
  grid->world().all_reduce(failed, ssa::parallel::ReduceOp::kMax);
  status = failed.item<int>();
  ssa::test::world_grid_slot() = nullptr;
  grid.reset();  // finalises MPI
  return status;
}
