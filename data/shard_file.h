#pragma once
// One token shard opened for reading, with its metadata validated on open.
//
// Every method holds hdf5_mutex() while it calls HDF5 (reads of uncompressed
// shards make no HDF5 call at all: see chunk_file_map.h). A ShardFile is still
// meant to live on one thread (the reader's I/O thread, or the thread running
// inspect): it keeps per-file scratch state.
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/chunk_file_map.h"
#include "data/hdf5_check.h"

namespace ssa::data {

// What is wrong with a shard file; the message starts with "shard PATH: ".
class ShardError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ShardMeta {
  std::string path;
  int64_t version = 0;
  int64_t vocab_size = 0;
  int64_t eos_id = -1;
  std::string tokenizer;
  int64_t n_tokens = 0;
  int64_t n_docs = 0;       // entries of /doc_offsets
  int64_t token_bytes = 0;  // 2 (uint16) or 4 (uint32)
  int64_t chunk_tokens = 0; // 0: /tokens is not chunked
  std::string filters;      // "none", or the filter pipeline, e.g. "deflate(4)"
  bool compressed = false;  // some filter that must decode whole chunks
  bool direct_reads = false;  // windows are read with pread (see chunk_file_map.h), not H5Dread
  int64_t file_bytes = 0;
};

class ShardFile {
 public:
  // Opens `path` and checks every attribute and dataset shape; throws ShardError
  // naming the file and the rule broken.
  explicit ShardFile(const std::string& path);
  ~ShardFile();
  ShardFile(ShardFile&&) noexcept;
  ShardFile& operator=(ShardFile&&) = delete;  // would close ids without the lock

  const ShardMeta& meta() const { return meta_; }

  // tokens[begin, begin + count) as int32 into out[count]. Throws ShardError when
  // the range is outside the shard or an id is >= vocab_size.
  void read(int64_t begin, int64_t count, int32_t* out);

  // /doc_offsets[begin, begin + count) into out[count].
  void read_doc_offsets(int64_t begin, int64_t count, uint64_t* out);

  // Reads all of /doc_offsets in pieces; throws ShardError unless they are
  // strictly increasing and < n_tokens.
  void validate_doc_offsets();

 private:
  void open_locked(const std::string& path);  // with hdf5_mutex() held
  void close_locked() noexcept;

  ShardMeta meta_;
  H5Id file_, tokens_, tokens_space_, memory_space_, docs_, docs_space_;
  int64_t memory_space_count_ = -1;
  std::unique_ptr<ChunkFileMap> direct_;  // null: read through HDF5
  std::vector<unsigned char> raw_;  // [count * token_bytes] as stored
};

}  // namespace ssa::data
