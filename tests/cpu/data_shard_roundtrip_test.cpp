// prepare -> shards -> read back: documents, EOS placement, shard boundaries,
// gzip input, val split, compression, inspect.
#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/byte_tokenizer.h"
#include "data/dataset_inspect.h"
#include "data/dataset_prepare.h"
#include "data/shard_set.h"

using namespace ssa::data;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::path(SSA_TEST_TMP) / "data_shard_roundtrip" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

void write_gzip(const fs::path& path, const std::string& text) {
  gzFile file = gzopen(path.string().c_str(), "wb");
  ASSERT_NE(file, nullptr);
  ASSERT_EQ(gzwrite(file, text.data(), static_cast<unsigned>(text.size())), static_cast<int>(text.size()));
  ASSERT_EQ(gzclose(file), Z_OK);
}

// The whole token stream and the global start of every document.
struct Stream {
  std::vector<int32_t> tokens;
  std::vector<int64_t> doc_starts;
};

Stream read_stream(const fs::path& dir) {
  ShardSet shards(dir.string());
  Stream stream;
  stream.tokens.resize(static_cast<size_t>(shards.total_tokens()));
  shards.read(0, shards.total_tokens(), stream.tokens.data());
  for (size_t i = 0; i < shards.shards().size(); ++i) {
    ShardFile& shard = shards.shards()[i];
    std::vector<uint64_t> offsets(static_cast<size_t>(shard.meta().n_docs));
    shard.read_doc_offsets(0, shard.meta().n_docs, offsets.data());
    for (uint64_t offset : offsets) stream.doc_starts.push_back(shards.starts()[i] + static_cast<int64_t>(offset));
  }
  return stream;
}

// Documents recovered from the stream: [start_i, start_{i+1}) without its final EOS.
std::vector<std::string> documents_of(const Stream& stream) {
  std::vector<std::string> docs;
  for (size_t i = 0; i < stream.doc_starts.size(); ++i) {
    int64_t begin = stream.doc_starts[i];
    int64_t end = i + 1 < stream.doc_starts.size() ? stream.doc_starts[i + 1]
                                                    : static_cast<int64_t>(stream.tokens.size());
    EXPECT_EQ(stream.tokens[static_cast<size_t>(end - 1)], kByteEosId) << "document " << i << " must end with EOS";
    std::string doc;
    for (int64_t t = begin; t < end - 1; ++t) {
      int32_t id = stream.tokens[static_cast<size_t>(t)];
      EXPECT_LT(id, 256) << "EOS inside document " << i;
      doc.push_back(static_cast<char>(id));
    }
    docs.push_back(doc);
  }
  return docs;
}

// The expected stream, built independently: bytes of each document, then EOS.
std::vector<int32_t> expected_tokens(const std::vector<std::string>& docs) {
  std::vector<int32_t> tokens;
  for (const auto& doc : docs) {
    for (unsigned char c : doc) tokens.push_back(c);
    tokens.push_back(static_cast<int32_t>(kByteEosId));
  }
  return tokens;
}

const std::string kUtf8 = "na\xC3\xAFve caf\xC3\xA9 \xE2\x80\x94 \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x8E\x89\n";

}  // namespace

TEST(Prepare, OneDocumentPerFileRoundTripsUtf8AndEmptyDocuments) {
  fs::path dir = fresh_dir("per_file");
  std::vector<std::string> docs = {kUtf8 + "second line\n", "", "plain ascii, no newline", "",
                                   std::string("\x00\xff\x7f", 3)};
  PrepareOptions options;
  for (size_t i = 0; i < docs.size(); ++i) {
    fs::path input = dir / "in" / ("doc" + std::to_string(i) + ".txt");
    fs::create_directories(input.parent_path());
    write_file(input, docs[i]);
  }
  options.inputs = {(dir / "in").string()};  // a folder: its files in name order
  options.output = (dir / "out").string();
  options.shard_tokens = 7;  // documents span shards
  options.chunk_tokens = 3;
  PrepareSummary summary = prepare_dataset(options);

  std::vector<int32_t> expected = expected_tokens(docs);
  EXPECT_EQ(summary.train_documents, static_cast<int64_t>(docs.size()));
  EXPECT_EQ(summary.train_tokens, static_cast<int64_t>(expected.size()));
  EXPECT_EQ(summary.train_shards.size(), (expected.size() + 6) / 7);
  Stream stream = read_stream(dir / "out");
  EXPECT_EQ(stream.tokens, expected);
  EXPECT_EQ(documents_of(stream), docs);
  // Every shard is complete and under its final name; no temporary is left.
  for (const auto& entry : fs::directory_iterator(dir / "out")) {
    EXPECT_EQ(entry.path().extension(), ".h5") << entry.path();
    EXPECT_NE(entry.path().filename().string()[0], '.') << entry.path();
  }
  ShardSet shards((dir / "out").string());
  EXPECT_EQ(shards.vocab_size(), 257);
  EXPECT_EQ(shards.eos_id(), 256);
  EXPECT_EQ(shards.tokenizer(), "bytes");
  EXPECT_EQ(shards.shards().front().meta().token_bytes, 2);
  EXPECT_EQ(shards.shards().front().meta().chunk_tokens, 3);
}

TEST(Prepare, BlankLineAndDictionarySplitting) {
  fs::path dir = fresh_dir("split");
  write_file(dir / "paras.txt", "\n\npara one, line 1\npara one, line 2\n\n \t\n\npara two\n\nlast para no newline");
  PrepareOptions options;
  options.inputs = {(dir / "paras.txt").string()};
  options.output = (dir / "paras").string();
  options.split = SplitMode::kBlankLines;
  prepare_dataset(options);
  EXPECT_EQ(documents_of(read_stream(dir / "paras")),
            (std::vector<std::string>{"para one, line 1\npara one, line 2\n", "para two\n", "last para no newline"}));

  // dictd layout: headword lines at column 0, indented bodies, blank lines
  // inside an entry kept, between entries dropped.
  std::string dict =
      "\n00-database-info\n   about this file\n\n"
      "Apple \\Ap\"ple\\, n.\n   1. A fruit.\n\n   Syn: pome\n\n"
      "Zebra \\Ze\"bra\\, n.\n   A striped animal; caf\xC3\xA9.\n\n\n";
  write_gzip(dir / "tiny.dict.dz", dict);
  options.inputs = {(dir / "tiny.dict.dz").string()};
  options.output = (dir / "dict").string();
  options.split = SplitMode::kAuto;  // *.dict.dz -> dict
  prepare_dataset(options);
  EXPECT_EQ(documents_of(read_stream(dir / "dict")),
            (std::vector<std::string>{"00-database-info\n   about this file\n",
                                      "Apple \\Ap\"ple\\, n.\n   1. A fruit.\n\n   Syn: pome\n",
                                      "Zebra \\Ze\"bra\\, n.\n   A striped animal; caf\xC3\xA9.\n"}));
}

TEST(Prepare, GzipInputGivesTheSameTokensAsPlain) {
  fs::path dir = fresh_dir("gzip");
  std::string text;
  for (int i = 0; i < 20000; ++i) text += "line " + std::to_string(i) + " " + kUtf8;  // > 1 MiB: several reads
  write_file(dir / "a.txt", text);
  write_gzip(dir / "a.txt.gz", text);
  PrepareOptions options;
  options.inputs = {(dir / "a.txt").string()};
  options.output = (dir / "plain").string();
  options.shard_tokens = 300000;
  prepare_dataset(options);
  options.inputs = {(dir / "a.txt.gz").string()};
  options.output = (dir / "gz").string();
  prepare_dataset(options);
  Stream plain = read_stream(dir / "plain"), gz = read_stream(dir / "gz");
  EXPECT_EQ(plain.tokens, expected_tokens({text}));
  EXPECT_EQ(gz.tokens, plain.tokens);

  // A cut gzip stream is an error naming the file, not a silently short dataset.
  std::string bytes;
  {
    std::ifstream in(dir / "a.txt.gz", std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  write_file(dir / "cut.txt.gz", bytes.substr(0, bytes.size() / 2));
  options.inputs = {(dir / "cut.txt.gz").string()};
  options.output = (dir / "cut").string();
  try {
    prepare_dataset(options);
    FAIL() << "a truncated gzip input was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cut.txt.gz"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

TEST(Prepare, AnInterruptedRunIsRefusedByReadersAndRedoneByTheNextPrepare) {
  fs::path dir = fresh_dir("interrupted");
  std::string text;
  for (int i = 0; i < 200; ++i) text += "some text " + std::to_string(i) + "\n";
  write_file(dir / "a.txt", text);
  std::string gzip_text(50000, 'x');
  write_gzip(dir / "b.txt.gz", gzip_text);
  fs::resize_file(dir / "b.txt.gz", fs::file_size(dir / "b.txt.gz") - 10);  // cut: prepare fails on it
  PrepareOptions options;
  options.inputs = {(dir / "a.txt").string(), (dir / "b.txt.gz").string()};
  options.output = (dir / "out").string();
  options.shard_tokens = 500;
  EXPECT_THROW(prepare_dataset(options), std::runtime_error);

  // Complete shards from a.txt are there under final names, the partial one
  // is not, and the dataset is marked incomplete.
  int shards = 0;
  for (const auto& entry : fs::directory_iterator(dir / "out")) {
    std::string name = entry.path().filename().string();
    EXPECT_FALSE(name.ends_with(".tmp")) << name;
    shards += name.ends_with(".h5");
  }
  EXPECT_GE(shards, 4);
  EXPECT_TRUE(fs::exists(dir / "out" / ".prepare-incomplete"));
  try {
    ShardSet incomplete((dir / "out").string());
    FAIL() << "an incomplete dataset was accepted";
  } catch (const ShardError& e) {
    EXPECT_NE(std::string(e.what()).find("incomplete"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(inspect_dataset((dir / "out").string()).ok());

  // The next prepare replaces the remains without --overwrite.
  options.inputs = {(dir / "a.txt").string()};
  prepare_dataset(options);
  EXPECT_FALSE(fs::exists(dir / "out" / ".prepare-incomplete"));
  EXPECT_EQ(read_stream(dir / "out").tokens, expected_tokens({text}));
}

TEST(Prepare, ValFractionHoldsOutTheLastDocuments) {
  fs::path dir = fresh_dir("val");
  std::string text;
  std::vector<std::string> docs;
  for (int i = 0; i < 10; ++i) {
    docs.push_back("document " + std::to_string(i) + "\n");
    text += docs.back() + "\n";
  }
  write_file(dir / "docs.txt", text);
  PrepareOptions options;
  options.inputs = {(dir / "docs.txt").string()};
  options.output = (dir / "out").string();
  options.split = SplitMode::kBlankLines;
  options.val_fraction = 0.2;
  PrepareSummary summary = prepare_dataset(options);
  EXPECT_EQ(summary.train_documents, 8);
  EXPECT_EQ(summary.val_documents, 2);
  EXPECT_EQ(documents_of(read_stream(dir / "out")), std::vector<std::string>(docs.begin(), docs.begin() + 8));
  EXPECT_EQ(documents_of(read_stream(dir / "out" / "val")), std::vector<std::string>(docs.begin() + 8, docs.end()));

  // A second run must not mix with (or silently replace) the first.
  EXPECT_THROW(prepare_dataset(options), std::runtime_error);
  options.overwrite = true;
  options.val_fraction = 0;
  summary = prepare_dataset(options);
  EXPECT_EQ(summary.train_documents, 10);
  EXPECT_FALSE(fs::exists(dir / "out" / "val" / "shard-000000.h5"));  // old val shards are gone too
  EXPECT_EQ(documents_of(read_stream(dir / "out")), docs);
}

TEST(Prepare, CompressedAndUint32ShardsReadTheSame) {
  fs::path dir = fresh_dir("variants");
  std::string text;
  for (int i = 0; i < 3000; ++i) text += kUtf8;
  write_file(dir / "t.txt", text);
  PrepareOptions options;
  options.inputs = {(dir / "t.txt").string()};
  options.shard_tokens = 50000;
  options.chunk_tokens = 4096;
  options.output = (dir / "deflate").string();
  options.deflate_level = 6;
  prepare_dataset(options);
  options.output = (dir / "u32").string();
  options.deflate_level = 0;
  options.token_bytes = 4;
  prepare_dataset(options);
  std::vector<int32_t> expected = expected_tokens({text});
  EXPECT_EQ(read_stream(dir / "deflate").tokens, expected);
  EXPECT_EQ(read_stream(dir / "u32").tokens, expected);
  ShardSet deflated((dir / "deflate").string()), wide((dir / "u32").string());
  // Uncompressed windows are read with pread at the chunk's file offset,
  // compressed ones through H5Dread: both paths are checked above.
  EXPECT_TRUE(wide.shards().front().meta().direct_reads);
  EXPECT_FALSE(deflated.shards().front().meta().direct_reads);
  EXPECT_TRUE(deflated.shards().front().meta().compressed);
  EXPECT_NE(deflated.shards().front().meta().filters.find("deflate(6)"), std::string::npos);
  EXPECT_EQ(wide.shards().front().meta().token_bytes, 4);
  EXPECT_LT(deflated.shards().front().meta().file_bytes, wide.shards().front().meta().file_bytes / 4);
}

TEST(Inspect, ReportsTotalsOfAGoodDataset) {
  fs::path dir = fresh_dir("inspect");
  write_file(dir / "a.txt", kUtf8);
  write_file(dir / "b.txt", "bb\n");
  PrepareOptions options;
  options.inputs = {(dir / "a.txt").string(), (dir / "b.txt").string()};
  options.output = (dir / "out").string();
  options.shard_tokens = 10;
  prepare_dataset(options);
  InspectReport report = inspect_dataset((dir / "out").string());
  EXPECT_TRUE(report.ok()) << (report.problems.empty() ? "" : report.problems.front());
  int64_t total = static_cast<int64_t>(kUtf8.size() + 1 + 4);
  EXPECT_EQ(report.total_tokens, total);
  EXPECT_EQ(report.total_documents, 2);
  EXPECT_EQ(static_cast<int64_t>(report.shards.size()), (total + 9) / 10);
  int64_t eos = 0;
  for (const auto& shard : report.shards) eos += shard.eos_tokens;
  EXPECT_EQ(eos, 2);
}

TEST(ByteTokenizer, DetokenizeInvertsTokenize) {
  std::vector<int32_t> ids = byte_tokens(kUtf8);
  EXPECT_EQ(byte_detokenize(ids.data(), static_cast<int64_t>(ids.size())), kUtf8);
  std::vector<int32_t> bad = {65, 257};
  EXPECT_THROW(byte_detokenize(bad.data(), 2), std::runtime_error);
}
