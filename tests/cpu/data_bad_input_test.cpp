// Every kind of bad dataset gives an error that names the file and the
// problem, from the reader and from inspect. The bad files are made here with
// the HDF5 C API directly (not with our writer), byte tools, or both.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "data/dataset_inspect.h"
#include "data/shard_file.h"
#include "data/token_reader.h"

using namespace ssa::data;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::path(SSA_TEST_TMP) / "data_bad_input" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A shard written with plain HDF5 calls; each field can be made wrong.
struct RawShard {
  std::string format = "ssa-tokens";
  bool with_format = true;
  int64_t version = 1;
  int64_t vocab_size = 257;
  int64_t eos_id = 256;
  std::string tokenizer = "bytes";
  std::vector<uint16_t> tokens;
  std::vector<uint64_t> doc_offsets = {0};
  bool float_tokens = false;
  bool contiguous = false;    // h5py's default layout for create_dataset(data=...)
  bool vlen_strings = false;  // h5py's default for str attributes
};

void put_string(hid_t file, const char* name, const std::string& value, bool variable_length) {
  hid_t type = H5Tcopy(H5T_C_S1);
  H5Tset_size(type, variable_length ? H5T_VARIABLE : value.size());
  if (variable_length) H5Tset_cset(type, H5T_CSET_UTF8);
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(attr, 0);
  const char* text = value.c_str();
  ASSERT_GE(H5Awrite(attr, type, variable_length ? static_cast<const void*>(&text) : value.data()), 0);
  H5Aclose(attr);
  H5Sclose(space);
  H5Tclose(type);
}

void put_integer(hid_t file, const char* name, int64_t value) {
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t attr = H5Acreate2(file, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(attr, 0);
  ASSERT_GE(H5Awrite(attr, H5T_NATIVE_INT64, &value), 0);
  H5Aclose(attr);
  H5Sclose(space);
}

template <class T>
void put_vector(hid_t file, const char* name, hid_t file_type, hid_t memory_type, const std::vector<T>& values,
                bool contiguous) {
  hsize_t n = values.size(), chunk = std::max<hsize_t>(1, std::min<hsize_t>(n, 64));
  hid_t space = H5Screate_simple(1, &n, nullptr);
  hid_t create = H5Pcreate(H5P_DATASET_CREATE);
  if (!contiguous) H5Pset_chunk(create, 1, &chunk);
  hid_t dataset = H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, create, H5P_DEFAULT);
  ASSERT_GE(dataset, 0);
  if (n > 0) {
    ASSERT_GE(H5Dwrite(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), 0);
  }
  H5Dclose(dataset);
  H5Pclose(create);
  H5Sclose(space);
}

void write_raw(const fs::path& path, const RawShard& shard) {
  hid_t file = H5Fcreate(path.string().c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  if (shard.with_format) put_string(file, "format", shard.format, shard.vlen_strings);
  put_integer(file, "version", shard.version);
  put_integer(file, "vocab_size", shard.vocab_size);
  put_string(file, "tokenizer", shard.tokenizer, shard.vlen_strings);
  put_integer(file, "eos_id", shard.eos_id);
  if (shard.float_tokens) {
    std::vector<float> values(shard.tokens.begin(), shard.tokens.end());
    put_vector(file, "tokens", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, values, shard.contiguous);
  } else {
    put_vector(file, "tokens", H5T_STD_U16LE, H5T_NATIVE_UINT16, shard.tokens, shard.contiguous);
  }
  put_vector(file, "doc_offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, shard.doc_offsets, shard.contiguous);
  ASSERT_GE(H5Fclose(file), 0);
}

std::vector<uint16_t> text_tokens(size_t n) {
  std::vector<uint16_t> tokens(n);
  for (size_t i = 0; i < n; ++i) tokens[i] = static_cast<uint16_t>(i % 50 == 49 ? 256 : 'a' + i % 26);
  return tokens;
}

RawShard good_shard(size_t n = 5000) {
  RawShard shard;
  shard.tokens = text_tokens(n);
  shard.doc_offsets.clear();
  for (size_t i = 0; i < n; i += 50) shard.doc_offsets.push_back(i);
  return shard;
}

std::string reader_error(const fs::path& dir, int64_t steps = 50) {
  try {
    ReaderOptions options;
    options.dir = dir.string();
    options.seq_len = 64;
    options.global_batch = 8;
    TokenReader reader(options);
    for (int64_t s = 0; s < steps; ++s) reader.next();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

std::string inspect_error(const fs::path& dir) {
  InspectReport report = inspect_dataset(dir.string());
  return report.ok() ? "" : report.problems.front();
}

// Both the reader and inspect reject `dir` with a message that names `file`
// and contains `problem`.
void expect_rejected(const fs::path& dir, const fs::path& file, const std::string& problem) {
  for (const std::string& message : {reader_error(dir), inspect_error(dir)}) {
    EXPECT_FALSE(message.empty()) << "accepted: " << dir;
    EXPECT_NE(message.find(file.string()), std::string::npos) << "message does not name " << file << ": " << message;
    EXPECT_NE(message.find(problem), std::string::npos) << "message lacks \"" << problem << "\": " << message;
  }
}

}  // namespace

TEST(BadInput, AGoodRawShardIsAccepted) {
  // The control: the raw writer above makes valid shards, so the failures
  // below come from the one thing each test breaks.
  fs::path dir = fresh_dir("good");
  write_raw(dir / "a.h5", good_shard());
  write_raw(dir / "b.h5", good_shard());
  EXPECT_EQ(reader_error(dir), "");
  EXPECT_EQ(inspect_error(dir), "");
}

TEST(BadInput, ShardsWrittenTheWayH5pyWritesThemReadExactly) {
  // Contiguous /tokens (read directly at its file offset) and chunked /tokens
  // (read chunk by chunk), variable-length UTF-8 string attributes.
  fs::path dir = fresh_dir("h5py_style");
  RawShard a = good_shard(3000), b = good_shard(2000);
  a.contiguous = true;
  a.vlen_strings = true;
  b.vlen_strings = true;
  for (size_t i = 0; i < b.tokens.size(); ++i) b.tokens[i] = static_cast<uint16_t>((i * 31) % 257);
  write_raw(dir / "a.h5", a);
  write_raw(dir / "b.h5", b);
  EXPECT_EQ(inspect_error(dir), "");
  ShardFile contiguous((dir / "a.h5").string());
  EXPECT_EQ(contiguous.meta().chunk_tokens, 0);
  EXPECT_TRUE(contiguous.meta().direct_reads);
  EXPECT_EQ(contiguous.meta().tokenizer, "bytes");
  std::vector<uint16_t> stream = a.tokens;
  stream.insert(stream.end(), b.tokens.begin(), b.tokens.end());
  ReaderOptions options;
  options.dir = dir.string();
  options.seq_len = 100;
  options.global_batch = 7;
  TokenReader reader(options);
  for (int step = 0; step < 10; ++step) {
    Batch batch = reader.next();
    for (int64_t row = 0; row < batch.rows; ++row) {
      int64_t start = batch.sample_ids[static_cast<size_t>(row)] * 100;
      for (int64_t c = 0; c < 100; ++c) {
        ASSERT_EQ(batch.inputs[static_cast<size_t>(row * 100 + c)], stream[static_cast<size_t>(start + c)]);
        ASSERT_EQ(batch.labels[static_cast<size_t>(row * 100 + c)], stream[static_cast<size_t>(start + c + 1)]);
      }
    }
  }
}

TEST(BadInput, MissingFolderAndNoShards) {
  fs::path dir = fresh_dir("missing");
  expect_rejected(dir / "nope", dir / "nope", "no such folder");
  fs::create_directories(dir / "empty");
  std::ofstream(dir / "empty" / "notes.txt") << "not a shard";
  expect_rejected(dir / "empty", dir / "empty", "no shards");
}

TEST(BadInput, WrongOrMissingFormatAttribute) {
  fs::path dir = fresh_dir("format");
  RawShard shard = good_shard();
  shard.format = "numpy-tokens";
  write_raw(dir / "a.h5", shard);
  expect_rejected(dir, dir / "a.h5", "attribute format is \"numpy-tokens\", expected \"ssa-tokens\"");

  fs::path dir2 = fresh_dir("format_missing");
  shard.with_format = false;
  write_raw(dir2 / "a.h5", shard);
  expect_rejected(dir2, dir2 / "a.h5", "attribute 'format' is missing");

  fs::path dir3 = fresh_dir("version");
  shard = good_shard();
  shard.version = 7;
  write_raw(dir3 / "a.h5", shard);
  expect_rejected(dir3, dir3 / "a.h5", "format version 7 is not supported");
}

TEST(BadInput, ShardsOfDifferentVocabSizes) {
  fs::path dir = fresh_dir("mixed_vocab");
  write_raw(dir / "a.h5", good_shard());
  RawShard other = good_shard();
  other.vocab_size = 300;
  write_raw(dir / "b.h5", other);
  expect_rejected(dir, dir / "b.h5", "vocab_size is 300");
  EXPECT_NE(reader_error(dir).find((dir / "a.h5").string()), std::string::npos);  // names both files
}

TEST(BadInput, TokenIdAtOrAboveVocab) {
  fs::path dir = fresh_dir("big_id");
  RawShard shard = good_shard(20000);
  shard.tokens[12345] = 257;  // == vocab_size
  write_raw(dir / "a.h5", shard);
  // The reader meets it when a window covers it (50 steps x 8 samples of 64
  // cover most of the 312 samples); inspect scans every token.
  expect_rejected(dir, dir / "a.h5", "token id 257 at position 12345 is >= vocab_size 257");
}

TEST(BadInput, WrongTokenTypeAndEos) {
  fs::path dir = fresh_dir("float_tokens");
  RawShard shard = good_shard();
  shard.float_tokens = true;
  write_raw(dir / "a.h5", shard);
  expect_rejected(dir, dir / "a.h5", "/tokens must be uint16 or uint32");

  fs::path dir2 = fresh_dir("eos");
  shard = good_shard();
  shard.eos_id = 400;
  write_raw(dir2 / "a.h5", shard);
  expect_rejected(dir2, dir2 / "a.h5", "eos_id 400 is outside");
}

TEST(BadInput, DocOffsetsNotIncreasingIsFoundByInspect) {
  fs::path dir = fresh_dir("doc_offsets");
  RawShard shard = good_shard();
  shard.doc_offsets = {0, 50, 40, 100};
  write_raw(dir / "a.h5", shard);
  std::string message = inspect_error(dir);
  EXPECT_NE(message.find((dir / "a.h5").string()), std::string::npos) << message;
  EXPECT_NE(message.find("not strictly increasing: doc_offsets[2] = 40 after 50"), std::string::npos) << message;
  shard.doc_offsets = {0, 5000};  // == n_tokens
  write_raw(dir / "a.h5", shard);
  EXPECT_NE(inspect_error(dir).find("doc_offsets[1] = 5000 is not < n_tokens 5000"), std::string::npos);
}

TEST(BadInput, TruncatedFile) {
  fs::path dir = fresh_dir("truncated");
  write_raw(dir / "a.h5", good_shard(20000));
  fs::resize_file(dir / "a.h5", fs::file_size(dir / "a.h5") / 2);
  expect_rejected(dir, dir / "a.h5", "truncated");
}

TEST(BadInput, GarbageBytes) {
  fs::path dir = fresh_dir("garbage");
  std::mt19937 random(1);
  std::string bytes(10000, '\0');
  for (char& c : bytes) c = static_cast<char>(random());
  std::ofstream(dir / "a.h5", std::ios::binary) << bytes;
  expect_rejected(dir, dir / "a.h5", "not an HDF5 file");
  // A good shard beside it does not hide the bad one.
  write_raw(dir / "0-good.h5", good_shard());
  expect_rejected(dir, dir / "a.h5", "not an HDF5 file");
}

TEST(BadInput, DamagedMetadataInsideAValidHeader) {
  // Keep the superblock, overwrite everything after it with garbage: HDF5
  // itself fails somewhere inside; we must still name the file and not crash.
  fs::path dir = fresh_dir("damaged");
  write_raw(dir / "a.h5", good_shard(20000));
  {
    std::fstream file(dir / "a.h5", std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(96);
    std::mt19937 random(2);
    for (int i = 0; i < 4000; ++i) file.put(static_cast<char>(random()));
  }
  for (const std::string& message : {reader_error(dir), inspect_error(dir)}) {
    EXPECT_NE(message.find((dir / "a.h5").string()), std::string::npos) << message;
  }
}

TEST(BadInput, SilencesHdf5sOwnErrorPrinting) {
  fs::path dir = fresh_dir("quiet");
  write_raw(dir / "a.h5", good_shard(20000));
  fs::resize_file(dir / "a.h5", fs::file_size(dir / "a.h5") / 2);  // H5Fopen fails inside HDF5
  testing::internal::CaptureStderr();
  std::string message = reader_error(dir);
  std::string printed = testing::internal::GetCapturedStderr();
  EXPECT_FALSE(message.empty());
  EXPECT_EQ(printed, "");
}
