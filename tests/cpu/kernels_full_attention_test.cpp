// Full causal attention and the log-sum-exp merge against a dense fp64 reference
// and central differences.
#include <gtest/gtest.h>

#include <limits>
#include <stdexcept>

#include "kernels/attention.h"
#include "kernels_test_support.h"

namespace ssa::kernels {
namespace {

using test::causal_mask;
using test::dense_masked_attention;
using test::expect_close;
using test::randn;

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Case {
  int64_t sq, sk, q_start, k_start;
};

// Fused path (equal starts, Sq == Sk), past chunk (all keys before all queries),
// partial overlaps (matmul path), and q_start > k_start with Sq == Sk.
const Case kCases[] = {{37, 37, 0, 0}, {12, 20, 40, 0}, {10, 30, 20, 5}, {16, 16, 16, 8}, {8, 24, 0, 0}};

TEST(FullAttention, MatchesDenseReferenceFp64AndFp32) {
  at::manual_seed(1);
  for (const Case& c : kCases) {
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      const at::Tensor q = randn({2, c.sq, 4, 8}, dtype);
      const at::Tensor k = randn({2, c.sk, 2, 8}, dtype);
      const at::Tensor v = randn({2, c.sk, 2, 8}, dtype);
      const AttentionResult got = full_attention(q, k, v, c.q_start, c.k_start);
      const AttentionResult want = dense_masked_attention(q, k, v, causal_mask(2, c.sq, 4, c.sk, c.q_start, c.k_start));
      const double tol = dtype == at::kDouble ? 1e-10 : 2e-5;
      const std::string what = "sq " + std::to_string(c.sq) + " q_start " + std::to_string(c.q_start) + " k_start " +
                               std::to_string(c.k_start) + " " + c10::toString(dtype);
      EXPECT_EQ(got.out.scalar_type(), dtype) << what;
      EXPECT_EQ(got.lse.scalar_type(), dtype == at::kDouble ? at::kDouble : at::kFloat) << what;
      expect_close(got.out, want.out, tol, tol, what + " out");
      expect_close(got.lse, want.lse, tol, tol, what + " lse");
    }
  }
}

TEST(FullAttention, Bf16IsCloseToFp64) {
  at::manual_seed(2);
  const at::Tensor q = randn({1, 24, 4, 16}), k = randn({1, 24, 2, 16}), v = randn({1, 24, 2, 16});
  const AttentionResult got = full_attention(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16));
  const AttentionResult want = dense_masked_attention(q, k, v, causal_mask(1, 24, 4, 24, 0, 0));
  EXPECT_EQ(got.out.scalar_type(), at::kBFloat16);
  EXPECT_EQ(got.lse.scalar_type(), at::kFloat);
  expect_close(got.out, want.out, 3e-2, 3e-2, "bf16 out");
  expect_close(got.lse, want.lse, 3e-2, 1e-2, "bf16 lse");
}

TEST(FullAttention, RowsWithOnlyFutureKeysAreEmpty) {
  at::manual_seed(3);
  // Queries at [0, 6), keys at [4, 12): rows 0..3 see no key.
  const at::Tensor q = randn({1, 6, 2, 4}), k = randn({1, 8, 2, 4}), v = randn({1, 8, 2, 4});
  const AttentionResult got = full_attention(q, k, v, 0, 4);
  const AttentionResult want = dense_masked_attention(q, k, v, causal_mask(1, 6, 2, 8, 0, 4));
  expect_close(got.out, want.out, 1e-10, 1e-10, "out");
  expect_close(got.lse, want.lse, 1e-10, 1e-10, "lse");
  EXPECT_TRUE(at::isinf(got.lse.select(2, 0)).all().item<bool>());
  EXPECT_EQ(got.out.select(1, 0).abs().max().item<double>(), 0.0);
  // A chunk entirely in the future: all rows empty.
  const AttentionResult future = full_attention(q, k, v, 0, 10);
  EXPECT_TRUE((future.lse == -kInf).all().item<bool>());
  EXPECT_EQ(future.out.abs().max().item<double>(), 0.0);
}

TEST(FullAttention, GradientsMatchFiniteDifferences) {
  at::manual_seed(4);
  // GQA group 2 on each path; the lse enters the loss where it is differentiable
  // (matmul path), the fused paths are checked through out.
  const struct {
    Case c;
    bool use_lse;
  } cases[] = {{{5, 5, 0, 0}, false}, {{4, 3, 6, 0}, false}, {{4, 5, 3, 1}, true}, {{5, 5, 2, 0}, true}};
  for (const auto& [c, use_lse] : cases) {
    const at::Tensor q = randn({1, c.sq, 4, 3}), k = randn({1, c.sk, 2, 3}), v = randn({1, c.sk, 2, 3});
    const test::WeightedLoss weights = test::make_loss(q, use_lse);
    const int64_t qs = c.q_start, ks = c.k_start;
    test::expect_gradients_match_fd(
        [&](const std::vector<at::Tensor>& x) { return weights(full_attention(x[0], x[1], x[2], qs, ks)); }, {q, k, v},
        1e-6, "full q_start " + std::to_string(qs) + " k_start " + std::to_string(ks));
  }
}

TEST(FullAttention, KeyChunksMergedEqualConcatenatedKeys) {
  at::manual_seed(5);
  // A query chunk at [16, 32) against keys [0, 16) and [16, 32), in both orders.
  const at::Tensor q = randn({2, 16, 4, 8}), k = randn({2, 32, 2, 8}), v = randn({2, 32, 2, 8});
  const AttentionResult whole = full_attention(q, k, v, 16, 0);
  const AttentionResult past = full_attention(q, k.narrow(1, 0, 16), v.narrow(1, 0, 16), 16, 0);
  const AttentionResult diag = full_attention(q, k.narrow(1, 16, 16), v.narrow(1, 16, 16), 16, 16);
  for (const AttentionResult& merged : {merge_partials(past, diag), merge_partials(diag, past)}) {
    expect_close(merged.out, whole.out, 1e-10, 1e-10, "merged out");
    expect_close(merged.lse, whole.lse, 1e-10, 1e-10, "merged lse");
  }
  // The past chunk took the fused path, whose lse has no gradient: merging it
  // under autograd is refused rather than giving a wrong gradient.
  const at::Tensor qg = q.detach().clone().set_requires_grad(true);
  const AttentionResult past_grad = full_attention(qg, k.narrow(1, 0, 16), v.narrow(1, 0, 16), 16, 0);
  const AttentionResult diag_grad = full_attention(qg, k.narrow(1, 16, 16), v.narrow(1, 16, 16), 16, 16);
  EXPECT_THROW(merge_partials(past_grad, diag_grad), std::runtime_error);
  // Merging with an empty part (a chunk in the future) changes nothing.
  const AttentionResult future = full_attention(q, k.narrow(1, 0, 8), v.narrow(1, 0, 8), 16, 40);
  const AttentionResult same = merge_partials(whole, future);
  expect_close(same.out, whole.out, 1e-12, 1e-12, "merge with empty out");
  expect_close(same.lse, whole.lse, 1e-12, 1e-12, "merge with empty lse");
}

// merge_into: the in-place accumulator form of the same merge, on a row range of
// a larger buffer; rows outside stay as they were; bad shapes and dtypes refused.
TEST(MergePartials, IntoAccumulatorRowsEqualsMergePartials) {
  at::manual_seed(7);
  AttentionResult a{randn({2, 5, 3, 4}), randn({2, 3, 5})};
  const AttentionResult b{randn({2, 5, 3, 4}), randn({2, 3, 5})};
  a.lse[1][2][0] = -kInf;  // a row only b has
  a.out[1][0][2].zero_();
  at::Tensor out = randn({2, 9, 3, 4}), lse = randn({2, 3, 9});
  out.narrow(1, 2, 5).copy_(a.out);
  lse.narrow(2, 2, 5).copy_(a.lse);
  const at::Tensor out_before = out.clone(), lse_before = lse.clone();
  at::Tensor out_rows = out.narrow(1, 2, 5), lse_rows = lse.narrow(2, 2, 5);
  merge_into(out_rows, lse_rows, b);
  const AttentionResult want = merge_partials(a, b);
  expect_close(out.narrow(1, 2, 5), want.out, 1e-12, 1e-12, "out");
  expect_close(lse.narrow(2, 2, 5), want.lse, 1e-12, 1e-12, "lse");
  EXPECT_TRUE(at::equal(out.narrow(1, 0, 2), out_before.narrow(1, 0, 2)));
  EXPECT_TRUE(at::equal(lse.narrow(2, 7, 2), lse_before.narrow(2, 7, 2)));
  at::Tensor wrong = randn({2, 4, 3, 4});
  EXPECT_THROW(merge_into(wrong, lse_rows, b), std::runtime_error);
  at::Tensor half = out_rows.to(at::kBFloat16), half_lse = lse_rows.to(at::kBFloat16);
  EXPECT_THROW(merge_into(half, half_lse, b), std::runtime_error);
}

// merge_row_partials: parts on overlapping row ranges merged at once equal
// merging them pairwise; rows no part covers get out 0, lse -inf; the output
// dtype is the one asked for; bad parts are refused naming the part.
TEST(MergePartials, RowPartialsEqualPairwiseMerges) {
  at::manual_seed(8);
  const AttentionResult a{randn({2, 9, 3, 4}), randn({2, 3, 9})};  // rows [0, 9)
  const AttentionResult b{randn({2, 4, 3, 4}), randn({2, 3, 4})};  // rows [5, 9)
  const AttentionResult c{randn({2, 6, 3, 4}), randn({2, 3, 6})};  // rows [3, 9)
  const AttentionResult got = merge_row_partials(11, {{0, a}, {5, b}, {3, c}}, at::kDouble);
  ASSERT_EQ(got.out.sizes(), (at::IntArrayRef{2, 11, 3, 4}));
  ASSERT_EQ(got.lse.sizes(), (at::IntArrayRef{2, 3, 11}));
  expect_close(got.out.narrow(1, 0, 3), a.out.narrow(1, 0, 3), 1e-12, 1e-12, "rows of a alone");
  expect_close(got.lse.narrow(2, 0, 3), a.lse.narrow(2, 0, 3), 1e-12, 1e-12, "lse of a alone");
  auto rows = [](const AttentionResult& r, int64_t from, int64_t n) {
    return AttentionResult{r.out.narrow(1, from, n), r.lse.narrow(2, from, n)};
  };
  const AttentionResult ac = merge_partials(rows(a, 3, 2), rows(c, 0, 2));
  expect_close(got.out.narrow(1, 3, 2), ac.out, 1e-12, 1e-12, "rows of a and c");
  const AttentionResult abc = merge_partials(merge_partials(rows(a, 5, 4), b), rows(c, 2, 4));
  expect_close(got.out.narrow(1, 5, 4), abc.out, 1e-12, 1e-12, "rows of a, b and c");
  expect_close(got.lse.narrow(2, 5, 4), abc.lse, 1e-12, 1e-12, "lse of a, b and c");
  EXPECT_TRUE(at::equal(got.out.narrow(1, 9, 2), at::zeros({2, 2, 3, 4})));
  EXPECT_TRUE(at::all(got.lse.narrow(2, 9, 2) == -kInf).item<bool>());
  EXPECT_EQ(merge_row_partials(11, {{0, a}}, at::kBFloat16).out.scalar_type(), at::kBFloat16);
  EXPECT_THROW(merge_row_partials(8, {{0, a}}, at::kFloat), std::runtime_error);         // past the end
  EXPECT_THROW(merge_row_partials(11, {{-1, b}}, at::kFloat), std::runtime_error);       // before the start
  EXPECT_THROW(merge_row_partials(11, {{0, a}, {0, AttentionResult{randn({2, 4, 2, 4}), randn({2, 2, 4})}}},
                                  at::kFloat),
               std::runtime_error);  // heads differ
  EXPECT_THROW(merge_row_partials(11, {}, at::kFloat), std::runtime_error);
}

// add_row_terms: the base plus each term on its rows, in the dtype asked for.
TEST(MergePartials, RowTermsAddOnTheirRows) {
  at::manual_seed(9);
  const at::Tensor base = randn({2, 7, 3, 8});
  const at::Tensor t1 = randn({2, 7, 3, 8}), t2 = randn({2, 3, 3, 8});
  const at::Tensor got = add_row_terms(base, {{0, t1}, {4, t2}}, at::kDouble);
  at::Tensor want = base + t1;
  want.narrow(1, 4, 3).add_(t2);
  expect_close(got, want, 1e-12, 1e-12, "sum");
  EXPECT_TRUE(at::equal(add_row_terms(base, {}, at::kDouble), base));
  EXPECT_EQ(add_row_terms(base, {{4, t2}}, at::kBFloat16).scalar_type(), at::kBFloat16);
  EXPECT_THROW(add_row_terms(base, {{5, t2}}, at::kFloat), std::runtime_error);  // rows [5, 8) past 7
  EXPECT_THROW(add_row_terms(base, {{0, randn({2, 3, 3, 4})}}, at::kFloat), std::runtime_error);
  EXPECT_THROW(add_row_terms(base.to(at::kBFloat16), {{0, t2}}, at::kFloat), std::runtime_error);
}

TEST(MergePartials, MatchesClosedFormAndKeepsEmptyRows) {
  at::manual_seed(6);
  AttentionResult a{randn({1, 3, 2, 4}), randn({1, 2, 3})};
  AttentionResult b{randn({1, 3, 2, 4}), randn({1, 2, 3})};
  a.lse[0][0][1] = -kInf;  // row 1 of head 0 only in b
  a.lse[0][1][2] = -kInf;  // row 2 of head 1 in neither
  b.lse[0][1][2] = -kInf;
  a.out[0][2][1].zero_();
  b.out[0][2][1].zero_();
  const AttentionResult m = merge_partials(a, b);
  const at::Tensor want_lse = at::logaddexp(a.lse, b.lse);
  expect_close(m.lse, want_lse, 1e-12, 1e-12, "lse");
  const at::Tensor wa = (a.lse - want_lse).exp().nan_to_num(0.0).transpose(1, 2).unsqueeze(-1);
  const at::Tensor wb = (b.lse - want_lse).exp().nan_to_num(0.0).transpose(1, 2).unsqueeze(-1);
  expect_close(m.out, wa * a.out + wb * b.out, 1e-12, 1e-12, "out");
  EXPECT_EQ(m.out[0][2][1].abs().max().item<double>(), 0.0);
}

TEST(MergePartials, GradientsMatchFiniteDifferencesWithEmptyRows) {
  at::manual_seed(7);
  at::Tensor la = randn({1, 2, 3}), lb = randn({1, 2, 3});
  la[0][0][1] = -kInf;
  la[0][1][2] = -kInf;
  lb[0][1][2] = -kInf;
  const at::Tensor w_out = randn({1, 3, 2, 4}), w_lse = randn({1, 2, 3});
  test::expect_gradients_match_fd(
      [&](const std::vector<at::Tensor>& x) {
        const AttentionResult m = merge_partials({x[0], la + x[2]}, {x[1], lb + x[3]});
        const at::Tensor lse = at::where(at::isinf(m.lse), at::zeros_like(m.lse), m.lse);
        return (m.out * w_out).sum() + (lse * w_lse).sum();
      },
      {randn({1, 3, 2, 4}), randn({1, 3, 2, 4}), at::zeros({1, 2, 3}, at::kDouble), at::zeros({1, 2, 3}, at::kDouble)},
      1e-6, "merge_partials");
}

TEST(FullAttention, RejectsBadInputs) {
  const at::Tensor q = randn({1, 4, 4, 8}), k = randn({1, 4, 2, 8}), v = randn({1, 4, 2, 8});
  EXPECT_THROW(full_attention(q, randn({1, 4, 3, 8}), randn({1, 4, 3, 8})), std::runtime_error);  // 4 % 3
  EXPECT_THROW(full_attention(q, k, randn({1, 5, 2, 8})), std::runtime_error);                    // v != k
  EXPECT_THROW(full_attention(q, randn({1, 4, 2, 4}), randn({1, 4, 2, 4})), std::runtime_error);  // head dim
  EXPECT_THROW(full_attention(q.to(at::kFloat), k, v), std::runtime_error);                       // dtypes
  EXPECT_THROW(full_attention(q.view({4, 4, 8}), k, v), std::runtime_error);                      // rank
  EXPECT_THROW(full_attention(q, k, v, -1, 0), std::runtime_error);
  EXPECT_THROW(merge_partials({q, randn({1, 4, 4})}, {q, randn({1, 4, 3})}), std::runtime_error);
}

}  // namespace
}  // namespace ssa::kernels
