#include "data/shard_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <stdexcept>

namespace ssa::data {

namespace fs = std::filesystem;

namespace {

using Lock = std::lock_guard<std::mutex>;

void write_string_attribute(hid_t file, const std::string& path, const char* name, const std::string& value) {
  H5Id type = SSA_H5_TYPE(H5Tcopy(H5T_C_S1), "write {}: attribute '{}'", path, name);
  SSA_H5_CHECK(H5Tset_size(type.get(), std::max<size_t>(value.size(), 1)), "write {}: attribute '{}'", path, name);
  SSA_H5_CHECK(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), "write {}: attribute '{}'", path, name);
  H5Id space = SSA_H5_SPACE(H5Screate(H5S_SCALAR), "write {}: attribute '{}'", path, name);
  H5Id attr = SSA_H5_ATTR(H5Acreate2(file, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                          "write {}: create attribute '{}'", path, name);
  std::string padded = value;
  padded.resize(std::max<size_t>(value.size(), 1), '\0');
  SSA_H5_CHECK(H5Awrite(attr.get(), type.get(), padded.data()), "write {}: attribute '{}'", path, name);
}

void write_integer_attribute(hid_t file, const std::string& path, const char* name, int64_t value) {
  H5Id space = SSA_H5_SPACE(H5Screate(H5S_SCALAR), "write {}: attribute '{}'", path, name);
  H5Id attr = SSA_H5_ATTR(H5Acreate2(file, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                          "write {}: create attribute '{}'", path, name);
  SSA_H5_CHECK(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), "write {}: attribute '{}'", path, name);
}

// Makes the renamed file durable: its data must be on disk before its final
// name is.
void sync_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0 || ::fsync(fd) != 0) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error(fmt::format("write {}: fsync failed", path));
  }
  ::close(fd);
}

}  // namespace

ShardWriter::ShardWriter(ShardWriterOptions options) : options_(std::move(options)) {
  const auto& o = options_;
  auto bad = [](const std::string& message) { throw std::invalid_argument("shard writer: " + message); };
  if (o.dir.empty()) bad("output folder is empty");
  if (o.shard_tokens < 1) bad(fmt::format("shard_tokens {} must be >= 1", o.shard_tokens));
  if (o.chunk_tokens < 1) bad(fmt::format("chunk_tokens {} must be >= 1", o.chunk_tokens));
  if (o.deflate_level < 0 || o.deflate_level > 9) bad(fmt::format("deflate level {} is outside 0..9", o.deflate_level));
  if (o.vocab_size < 1 || o.vocab_size > kMaxVocabUint32) bad(fmt::format("vocab_size {} is outside [1, 2^32]", o.vocab_size));
  if (o.eos_id < -1 || o.eos_id >= o.vocab_size) bad(fmt::format("eos_id {} is outside [0, vocab_size) and not -1", o.eos_id));
  if (o.token_bytes == 0) options_.token_bytes = o.vocab_size <= kMaxVocabUint16 ? 2 : 4;
  if (o.token_bytes != 2 && o.token_bytes != 4) bad(fmt::format("token_bytes {} must be 2 or 4", o.token_bytes));
  if (o.token_bytes == 2 && o.vocab_size > kMaxVocabUint16) {
    bad(fmt::format("vocab_size {} does not fit uint16 tokens", o.vocab_size));
  }
  options_.chunk_tokens = std::min(o.chunk_tokens, o.shard_tokens);
  std::error_code error;
  fs::create_directories(o.dir, error);
  if (error) throw std::runtime_error(fmt::format("write {}: cannot create the folder: {}", o.dir, error.message()));
  chunk_.reserve(static_cast<size_t>(options_.chunk_tokens));
}

ShardWriter::~ShardWriter() {
  if (!file_) return;
  Lock lock(hdf5_mutex());
  tokens_.reset();
  file_.reset();
  std::error_code ignored;
  fs::remove(temp_path_, ignored);
}

void ShardWriter::open_shard() {
  Lock lock(hdf5_mutex());
  hdf5_silence_errors();
  std::string name = fmt::format("{}-{:06d}{}", options_.name_prefix, finished_.size(), kShardExtension);
  final_path_ = (fs::path(options_.dir) / name).string();
  temp_path_ = (fs::path(options_.dir) / ("." + name + ".tmp")).string();
  const std::string& path = temp_path_;
  file_ = SSA_H5_FILE(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), "write {}: create file", path);

  hsize_t dims = 0, max_dims = H5S_UNLIMITED, chunk = static_cast<hsize_t>(options_.chunk_tokens);
  H5Id space = SSA_H5_SPACE(H5Screate_simple(1, &dims, &max_dims), "write {}: /tokens space", path);
  H5Id create = SSA_H5_PLIST(H5Pcreate(H5P_DATASET_CREATE), "write {}: /tokens layout", path);
  SSA_H5_CHECK(H5Pset_chunk(create.get(), 1, &chunk), "write {}: chunk of /tokens", path);
  if (options_.deflate_level > 0) {
    // Byte shuffle first: the high bytes of byte-level ids are all zero, which
    // deflate then packs much better.
    SSA_H5_CHECK(H5Pset_shuffle(create.get()), "write {}: shuffle filter", path);
    SSA_H5_CHECK(H5Pset_deflate(create.get(), static_cast<unsigned>(options_.deflate_level)), "write {}: deflate", path);
  }
  hid_t file_type = options_.token_bytes == 2 ? H5T_STD_U16LE : H5T_STD_U32LE;
  tokens_ = SSA_H5_DATASET(H5Dcreate2(file_.get(), kTokensDataset, file_type, space.get(), H5P_DEFAULT, create.get(),
                                      H5P_DEFAULT),
                           "write {}: create /tokens", path);
  shard_fill_ = 0;
  shard_written_ = 0;
  doc_offsets_.clear();
}

void ShardWriter::flush_chunk() {
  if (chunk_.empty()) return;
  Lock lock(hdf5_mutex());
  const std::string& path = temp_path_;
  hsize_t start = static_cast<hsize_t>(shard_written_), count = chunk_.size(), size = start + count;
  SSA_H5_CHECK(H5Dset_extent(tokens_.get(), &size), "write {}: extend /tokens to {}", path, size);
  H5Id file_space = SSA_H5_SPACE(H5Dget_space(tokens_.get()), "write {}: /tokens space", path);
  SSA_H5_CHECK(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &start, nullptr, &count, nullptr),
               "write {}: select /tokens", path);
  H5Id memory_space = SSA_H5_SPACE(H5Screate_simple(1, &count, nullptr), "write {}: memory space", path);
  if (options_.token_bytes == 2) {
    std::vector<uint16_t> narrow(chunk_.begin(), chunk_.end());
    SSA_H5_CHECK(H5Dwrite(tokens_.get(), H5T_NATIVE_UINT16, memory_space.get(), file_space.get(), H5P_DEFAULT,
                          narrow.data()),
                 "write {}: /tokens [{}, {})", path, start, size);
  } else {
    SSA_H5_CHECK(H5Dwrite(tokens_.get(), H5T_NATIVE_UINT32, memory_space.get(), file_space.get(), H5P_DEFAULT,
                          chunk_.data()),
                 "write {}: /tokens [{}, {})", path, start, size);
  }
  shard_written_ += static_cast<int64_t>(count);
  chunk_.clear();
}

void ShardWriter::close_shard() {
  flush_chunk();
  Lock lock(hdf5_mutex());
  const std::string& path = temp_path_;
  hid_t file = file_.get();
  hsize_t n_docs = doc_offsets_.size();
  H5Id space = SSA_H5_SPACE(H5Screate_simple(1, &n_docs, nullptr), "write {}: /doc_offsets space", path);
  H5Id docs = SSA_H5_DATASET(H5Dcreate2(file, kDocOffsetsDataset, H5T_STD_U64LE, space.get(), H5P_DEFAULT,
                                        H5P_DEFAULT, H5P_DEFAULT),
                             "write {}: create /doc_offsets", path);
  if (n_docs > 0) {
    SSA_H5_CHECK(H5Dwrite(docs.get(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, doc_offsets_.data()),
                 "write {}: /doc_offsets", path);
  }
  docs.close(fmt::format("write {}: close /doc_offsets", path));
  write_string_attribute(file, path, kAttrFormat, std::string(kFormatName));
  write_integer_attribute(file, path, kAttrVersion, kFormatVersion);
  write_integer_attribute(file, path, kAttrVocabSize, options_.vocab_size);
  write_string_attribute(file, path, kAttrTokenizer, options_.tokenizer);
  write_integer_attribute(file, path, kAttrEosId, options_.eos_id);
  tokens_.close(fmt::format("write {}: close /tokens", path));
  file_.close(fmt::format("write {}: close file", path));
  sync_file(temp_path_);
  std::error_code error;
  fs::rename(temp_path_, final_path_, error);
  if (error) {
    throw std::runtime_error(fmt::format("write {}: cannot rename to {}: {}", temp_path_, final_path_, error.message()));
  }
  finished_.push_back(final_path_);
}

void ShardWriter::begin_document() { document_pending_ = true; }

void ShardWriter::append(int64_t token) {
  if (token < 0 || token >= options_.vocab_size) {
    throw std::invalid_argument(fmt::format("shard writer ({}): token id {} is outside [0, vocab_size {})",
                                            options_.dir, token, options_.vocab_size));
  }
  if (!file_) open_shard();
  if (document_pending_) {
    doc_offsets_.push_back(static_cast<uint64_t>(shard_fill_));
    document_pending_ = false;
    ++total_docs_;
  }
  chunk_.push_back(static_cast<uint32_t>(token));
  ++shard_fill_;
  ++total_tokens_;
  if (static_cast<int64_t>(chunk_.size()) == options_.chunk_tokens) flush_chunk();
  if (shard_fill_ == options_.shard_tokens) close_shard();
}

void ShardWriter::append_bytes(const char* bytes, size_t count) {
  if (options_.vocab_size < 256) {
    throw std::invalid_argument(fmt::format("shard writer ({}): byte tokens need vocab_size >= 256, not {}",
                                            options_.dir, options_.vocab_size));
  }
  while (count > 0) {
    if (!file_) open_shard();
    if (document_pending_) {
      doc_offsets_.push_back(static_cast<uint64_t>(shard_fill_));
      document_pending_ = false;
      ++total_docs_;
    }
    // As many bytes as fit both the chunk buffer and the shard.
    int64_t room = std::min(options_.chunk_tokens - static_cast<int64_t>(chunk_.size()),
                            options_.shard_tokens - shard_fill_);
    size_t take = std::min(count, static_cast<size_t>(room));
    for (size_t i = 0; i < take; ++i) chunk_.push_back(static_cast<unsigned char>(bytes[i]));
    bytes += take;
    count -= take;
    shard_fill_ += static_cast<int64_t>(take);
    total_tokens_ += static_cast<int64_t>(take);
    if (static_cast<int64_t>(chunk_.size()) == options_.chunk_tokens) flush_chunk();
    if (shard_fill_ == options_.shard_tokens) close_shard();
  }
}

void ShardWriter::finish() {
  if (finished_called_) return;
  finished_called_ = true;
  if (!file_ && finished_.empty()) open_shard();
  if (file_) close_shard();
}

}  // namespace ssa::data
