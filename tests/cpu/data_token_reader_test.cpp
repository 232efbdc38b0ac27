// TokenReader against an in-memory token stream: window contents across shard
// boundaries, seeded order, epochs, cursor restore (also onto another dp size),
// cp slices.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <vector>

#include "data/shard_writer.h"
#include "data/token_reader.h"

using namespace ssa::data;
namespace fs = std::filesystem;

namespace {

// A stream whose value at i is a known function of i, written in shards of
// `shard_tokens` (so windows cross shard boundaries).
std::vector<int32_t> make_dataset(const fs::path& dir, int64_t n_tokens, int64_t vocab, int64_t shard_tokens,
                                  int64_t token_bytes) {
  fs::remove_all(dir);
  std::vector<int32_t> stream(static_cast<size_t>(n_tokens));
  for (int64_t i = 0; i < n_tokens; ++i) stream[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919 + i / 5) % vocab);
  ShardWriterOptions options;
  options.dir = dir.string();
  options.shard_tokens = shard_tokens;
  options.chunk_tokens = 97;
  options.vocab_size = vocab;
  options.eos_id = 0;
  options.tokenizer = "test";
  options.token_bytes = token_bytes;
  ShardWriter writer(options);
  for (int32_t t : stream) writer.append(t);
  writer.finish();
  return stream;
}

fs::path test_dir(const std::string& name) { return fs::path(SSA_TEST_TMP) / "data_token_reader" / name; }

ReaderOptions options_for(const fs::path& dir, int64_t seq_len, int64_t global_batch, uint64_t seed) {
  ReaderOptions o;
  o.dir = dir.string();
  o.seq_len = seq_len;
  o.global_batch = global_batch;
  o.seed = seed;
  o.prefetch = 3;
  return o;
}

std::vector<Batch> read_steps(const ReaderOptions& options, int64_t steps, ReaderCursor cursor = {}) {
  TokenReader reader(options, cursor);
  std::vector<Batch> batches;
  for (int64_t s = 0; s < steps; ++s) batches.push_back(reader.next());
  EXPECT_EQ(reader.cursor().step, cursor.step + steps);
  return batches;
}

class TokenReaderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // 10007 tokens in shards of 1000: 625 samples of 16 + 1 tokens.
    stream_ = make_dataset(test_dir("u16"), 10007, 1000, 1000, 2);
  }
  static std::vector<int32_t> stream_;
};
std::vector<int32_t> TokenReaderTest::stream_;

}  // namespace

TEST_F(TokenReaderTest, WindowsMatchTheStreamAcrossShardBoundaries) {
  const int64_t seq_len = 16;
  ReaderOptions options = options_for(test_dir("u16"), seq_len, 25, 5);
  TokenReader reader(options);
  EXPECT_EQ(reader.total_tokens(), 10007);
  EXPECT_EQ(reader.samples_per_epoch(), 625);
  EXPECT_EQ(reader.vocab_size(), 1000);
  EXPECT_EQ(reader.eos_id(), 0);
  int crossings = 0;
  for (int step = 0; step < 30; ++step) {
    Batch batch = reader.next();
    ASSERT_EQ(batch.step, step);
    ASSERT_EQ(batch.rows, 25);
    ASSERT_EQ(batch.cols, seq_len);
    EXPECT_GE(batch.wait_seconds, 0);
    for (int64_t row = 0; row < batch.rows; ++row) {
      int64_t start = batch.sample_ids[static_cast<size_t>(row)] * seq_len;
      crossings += start / 1000 != (start + seq_len) / 1000;
      for (int64_t c = 0; c < batch.cols; ++c) {
        size_t at = static_cast<size_t>(row * batch.cols + c);
        ASSERT_EQ(batch.inputs[at], stream_[static_cast<size_t>(start + c)]);
        ASSERT_EQ(batch.labels[at], stream_[static_cast<size_t>(start + c + 1)]);
      }
    }
  }
  EXPECT_GT(crossings, 10);  // the check above covered reads that span two shards
}

TEST_F(TokenReaderTest, SeedDecidesTheOrderAndEpochsWrap) {
  auto ids = [](const std::vector<Batch>& batches) {
    std::vector<int64_t> all;
    for (const auto& b : batches) all.insert(all.end(), b.sample_ids.begin(), b.sample_ids.end());
    return all;
  };
  // 625 samples, 25 per step: steps 0-24 are epoch 0, 25-49 epoch 1.
  std::vector<int64_t> a = ids(read_steps(options_for(test_dir("u16"), 16, 25, 5), 50));
  std::vector<int64_t> b = ids(read_steps(options_for(test_dir("u16"), 16, 25, 5), 50));
  std::vector<int64_t> c = ids(read_steps(options_for(test_dir("u16"), 16, 25, 6), 50));
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::vector<int64_t> epoch0(a.begin(), a.begin() + 625), epoch1(a.begin() + 625, a.end());
  EXPECT_NE(epoch0, epoch1);
  std::sort(epoch0.begin(), epoch0.end());
  std::sort(epoch1.begin(), epoch1.end());
  for (int64_t i = 0; i < 625; ++i) {
    ASSERT_EQ(epoch0[static_cast<size_t>(i)], i);
    ASSERT_EQ(epoch1[static_cast<size_t>(i)], i);
  }
  std::vector<Batch> batches = read_steps(options_for(test_dir("u16"), 16, 25, 5), 26);
  EXPECT_EQ(batches[24].epoch, 0);
  EXPECT_EQ(batches[25].epoch, 1);
}

TEST_F(TokenReaderTest, RestoredMidEpochContinuesLikeAnUninterruptedRun) {
  // GB = 24 does not divide 625 samples: step 26 straddles epochs 0 and 1.
  ReaderOptions options = options_for(test_dir("u16"), 16, 24, 11);
  std::vector<Batch> whole = read_steps(options, 40);
  ReaderCursor cursor;
  {
    TokenReader first(options);
    for (int s = 0; s < 13; ++s) first.next();
    cursor = first.cursor();
  }
  ASSERT_EQ(cursor.step, 13);
  std::vector<Batch> resumed = read_steps(options, 27, cursor);
  for (size_t i = 0; i < resumed.size(); ++i) {
    EXPECT_EQ(resumed[i].step, whole[13 + i].step);
    EXPECT_EQ(resumed[i].sample_ids, whole[13 + i].sample_ids);
    EXPECT_EQ(resumed[i].inputs, whole[13 + i].inputs);
    EXPECT_EQ(resumed[i].labels, whole[13 + i].labels);
  }
}

TEST_F(TokenReaderTest, DpRanksSplitTheGlobalBatchAndRestoreOntoAnotherDpSize) {
  const int64_t gb = 8, steps = 12;
  std::vector<Batch> global = read_steps(options_for(test_dir("u16"), 16, gb, 3), steps);
  // Global batch t on dp ranks r = 0..dp-1, their rows concatenated in rank order.
  auto gathered = [&](int64_t dp, ReaderCursor cursor, int64_t n_steps) {
    std::vector<std::vector<int64_t>> ids(static_cast<size_t>(n_steps));
    std::vector<std::vector<int32_t>> inputs(static_cast<size_t>(n_steps));
    for (int64_t rank = 0; rank < dp; ++rank) {
      ReaderOptions o = options_for(test_dir("u16"), 16, gb, 3);
      o.dp_size = dp;
      o.dp_rank = rank;
      std::vector<Batch> mine = read_steps(o, n_steps, cursor);
      for (int64_t s = 0; s < n_steps; ++s) {
        EXPECT_EQ(mine[static_cast<size_t>(s)].rows, gb / dp);
        auto& b = mine[static_cast<size_t>(s)];
        ids[static_cast<size_t>(s)].insert(ids[static_cast<size_t>(s)].end(), b.sample_ids.begin(), b.sample_ids.end());
        inputs[static_cast<size_t>(s)].insert(inputs[static_cast<size_t>(s)].end(), b.inputs.begin(), b.inputs.end());
      }
    }
    return std::make_pair(ids, inputs);
  };
  auto [ids4, inputs4] = gathered(4, {}, 5);  // dp = 4 for steps 0..4
  for (int64_t s = 0; s < 5; ++s) {
    EXPECT_EQ(ids4[static_cast<size_t>(s)], global[static_cast<size_t>(s)].sample_ids);
    EXPECT_EQ(inputs4[static_cast<size_t>(s)], global[static_cast<size_t>(s)].inputs);
  }
  auto [ids2, inputs2] = gathered(2, ReaderCursor{5}, steps - 5);  // then dp = 2 from the saved cursor
  for (int64_t s = 5; s < steps; ++s) {
    EXPECT_EQ(ids2[static_cast<size_t>(s - 5)], global[static_cast<size_t>(s)].sample_ids);
    EXPECT_EQ(inputs2[static_cast<size_t>(s - 5)], global[static_cast<size_t>(s)].inputs);
  }
}

TEST_F(TokenReaderTest, CpSlicesReassembleTheSequence) {
  const int64_t seq_len = 32, gb = 4, steps = 6;
  std::vector<Batch> whole = read_steps(options_for(test_dir("u16"), seq_len, gb, 9), steps);
  for (int64_t cp : {2, 4}) {
    std::vector<std::vector<int32_t>> inputs(steps, std::vector<int32_t>(static_cast<size_t>(gb * seq_len), -1));
    std::vector<std::vector<int32_t>> labels = inputs;
    for (int64_t rank = 0; rank < cp; ++rank) {
      ReaderOptions o = options_for(test_dir("u16"), seq_len, gb, 9);
      o.cp_size = cp;
      o.cp_rank = rank;
      std::vector<Batch> mine = read_steps(o, steps);
      for (int64_t s = 0; s < steps; ++s) {
        const Batch& b = mine[static_cast<size_t>(s)];
        ASSERT_EQ(b.cols, seq_len / cp);
        EXPECT_EQ(b.positions, zigzag_positions(seq_len, cp, rank));
        EXPECT_EQ(b.sample_ids, whole[static_cast<size_t>(s)].sample_ids);
        for (int64_t row = 0; row < gb; ++row) {
          for (int64_t c = 0; c < b.cols; ++c) {
            size_t to = static_cast<size_t>(row * seq_len + b.positions[static_cast<size_t>(c)]);
            inputs[static_cast<size_t>(s)][to] = b.inputs[static_cast<size_t>(row * b.cols + c)];
            labels[static_cast<size_t>(s)][to] = b.labels[static_cast<size_t>(row * b.cols + c)];
          }
        }
      }
    }
    for (int64_t s = 0; s < steps; ++s) {
      EXPECT_EQ(inputs[static_cast<size_t>(s)], whole[static_cast<size_t>(s)].inputs) << "cp=" << cp;
      EXPECT_EQ(labels[static_cast<size_t>(s)], whole[static_cast<size_t>(s)].labels) << "cp=" << cp;
    }
  }
}

TEST(TokenReader, Uint32ShardsWithLargeIds) {
  fs::path dir = test_dir("u32");
  std::vector<int32_t> stream = make_dataset(dir, 3001, 100000, 700, 4);
  ASSERT_GT(*std::max_element(stream.begin(), stream.end()), 65535);
  ReaderOptions options = options_for(dir, 50, 6, 1);
  TokenReader reader(options);
  for (int step = 0; step < 20; ++step) {
    Batch batch = reader.next();
    for (int64_t row = 0; row < batch.rows; ++row) {
      int64_t start = batch.sample_ids[static_cast<size_t>(row)] * 50;
      for (int64_t c = 0; c < batch.cols; ++c) {
        ASSERT_EQ(batch.inputs[static_cast<size_t>(row * 50 + c)], stream[static_cast<size_t>(start + c)]);
        ASSERT_EQ(batch.labels[static_cast<size_t>(row * 50 + c)], stream[static_cast<size_t>(start + c + 1)]);
      }
    }
  }
}

TEST(TokenReader, RejectsBadOptions) {
  fs::path dir = test_dir("u16");  // made by the fixture when run in the same program; make sure here
  if (!fs::exists(dir / "shard-000000.h5")) make_dataset(dir, 10007, 1000, 1000, 2);
  auto make = [&](auto edit) {
    ReaderOptions o = options_for(dir, 16, 8, 0);
    edit(o);
    return TokenReader(o);
  };
  EXPECT_THROW(make([](ReaderOptions& o) { o.dp_size = 3; }), std::invalid_argument);   // 8 % 3
  EXPECT_THROW(make([](ReaderOptions& o) { o.dp_rank = 1; }), std::invalid_argument);   // dp_size 1
  EXPECT_THROW(make([](ReaderOptions& o) { o.cp_size = 3; }), std::invalid_argument);   // 16 % 6
  EXPECT_THROW(make([](ReaderOptions& o) { o.seq_len = 0; }), std::invalid_argument);
  EXPECT_THROW(make([](ReaderOptions& o) { o.prefetch = 0; }), std::invalid_argument);
  try {
    make([](ReaderOptions& o) { o.seq_len = 20000; });
    FAIL() << "a dataset shorter than one sample was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("fewer than one sample"), std::string::npos) << e.what();
  }
}
