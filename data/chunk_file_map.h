#pragma once
// Direct reads of an uncompressed /tokens dataset: the file position of every
// chunk is looked up once through HDF5, then a window is one pread() of exactly
// its bytes, with no HDF5 call (and no HDF5 lock) per read.
//
// Why: a random window of a few hundred tokens through H5Dread costs several
// microseconds of HDF5 bookkeeping (ids, selections, chunk index lookup), which
// caps the reader near 50M tokens/s at seq_len 256; pread alone is ~1 us.
// Only used where it is exact: no filters, little-endian ids on a little-endian
// host, no user block, every chunk allocated. The first and last chunk are
// checked against H5Dread when the map is built; anything else falls back to
// H5Dread.
#include <hdf5.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ssa::data {

class ChunkFileMap {
 public:
  // Null when the dataset does not qualify. Call with hdf5_mutex() held.
  static std::unique_ptr<ChunkFileMap> create(const std::string& path, hid_t file, hid_t tokens, int64_t n_tokens,
                                              int64_t token_bytes, int64_t chunk_tokens);
  ~ChunkFileMap();
  ChunkFileMap(const ChunkFileMap&) = delete;
  ChunkFileMap& operator=(const ChunkFileMap&) = delete;

  // Raw (stored) bytes of tokens [begin, begin + count) into out[count * token_bytes].
  // Throws ShardError naming the file on a failed or short read.
  void read(int64_t begin, int64_t count, unsigned char* out) const;

 private:
  ChunkFileMap(std::string path, int fd, int64_t token_bytes, int64_t chunk_tokens, std::vector<uint64_t> addresses);

  std::string path_;
  int fd_ = -1;
  int64_t token_bytes_ = 0;
  int64_t chunk_tokens_ = 0;        // tokens per chunk (n_tokens for a contiguous dataset)
  std::vector<uint64_t> addresses_; // [n_chunks] file offset of each chunk's first byte
};

}  // namespace ssa::data
