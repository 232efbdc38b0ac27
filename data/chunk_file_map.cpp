#include "data/chunk_file_map.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>

#include "data/hdf5_check.h"
#include "data/shard_file.h"

namespace ssa::data {

ChunkFileMap::ChunkFileMap(std::string path, int fd, int64_t token_bytes, int64_t chunk_tokens,
                           std::vector<uint64_t> addresses)
    : path_(std::move(path)),
      fd_(fd),
      token_bytes_(token_bytes),
      chunk_tokens_(chunk_tokens),
      addresses_(std::move(addresses)) {}

ChunkFileMap::~ChunkFileMap() {
  if (fd_ >= 0) ::close(fd_);
}

std::unique_ptr<ChunkFileMap> ChunkFileMap::create(const std::string& path, hid_t file, hid_t tokens,
                                                   int64_t n_tokens, int64_t token_bytes, int64_t chunk_tokens) {
  if (n_tokens == 0 || std::endian::native != std::endian::little) return nullptr;
  H5Id type = SSA_H5_TYPE(H5Dget_type(tokens), "shard {}: type of /tokens", path);
  H5T_order_t order = SSA_H5_CHECK(H5Tget_order(type.get()), "shard {}: byte order of /tokens", path);
  if (order != H5T_ORDER_LE) return nullptr;
  // HDF5 addresses are relative to the end of a user block; require none.
  H5Id file_create = SSA_H5_PLIST(H5Fget_create_plist(file), "shard {}: file creation list", path);
  hsize_t user_block = 0;
  SSA_H5_CHECK(H5Pget_userblock(file_create.get(), &user_block), "shard {}: user block", path);
  if (user_block != 0) return nullptr;

  H5Id create = SSA_H5_PLIST(H5Dget_create_plist(tokens), "shard {}: layout of /tokens", path);
  H5D_layout_t layout = SSA_H5_CHECK(H5Pget_layout(create.get()), "shard {}: layout of /tokens", path);
  std::vector<uint64_t> addresses;
  if (layout == H5D_CONTIGUOUS) {
    haddr_t address = H5Dget_offset(tokens);  // HADDR_UNDEF: no storage yet, or an error
    if (address == HADDR_UNDEF) {
      hdf5_error_detail();  // clears the stack if it was an error
      return nullptr;
    }
    addresses.push_back(address);
    chunk_tokens = n_tokens;
  } else if (layout == H5D_CHUNKED) {
    if (SSA_H5_CHECK(H5Pget_nfilters(create.get()), "shard {}: filters of /tokens", path) != 0) return nullptr;
    int64_t n_chunks = (n_tokens + chunk_tokens - 1) / chunk_tokens;
    addresses.reserve(static_cast<size_t>(n_chunks));
    for (int64_t c = 0; c < n_chunks; ++c) {
      hsize_t offset = static_cast<hsize_t>(c * chunk_tokens), size = 0;
      unsigned filter_mask = 0;
      haddr_t address = HADDR_UNDEF;
      SSA_H5_CHECK(H5Dget_chunk_info_by_coord(tokens, &offset, &filter_mask, &address, &size),
                   "shard {}: position of /tokens chunk {}", path, c);
      if (address == HADDR_UNDEF || filter_mask != 0 || size < static_cast<hsize_t>(chunk_tokens * token_bytes)) {
        return nullptr;
      }
      addresses.push_back(address);
    }
  } else {
    return nullptr;
  }

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw ShardError(fmt::format("shard {}: cannot open for reading: {}", path, std::strerror(errno)));
  std::unique_ptr<ChunkFileMap> map(new ChunkFileMap(path, fd, token_bytes, chunk_tokens, std::move(addresses)));

  // Trust, but check: the head of the first and of the last chunk must read the
  // same through HDF5 and directly.
  H5Id file_space = SSA_H5_SPACE(H5Dget_space(tokens), "shard {}: /tokens", path);
  hid_t memory_type = token_bytes == 2 ? H5T_NATIVE_UINT16 : H5T_NATIVE_UINT32;
  int64_t last_chunk = static_cast<int64_t>(map->addresses_.size()) - 1;
  for (int64_t begin : {int64_t{0}, last_chunk * chunk_tokens}) {
    hsize_t start = static_cast<hsize_t>(begin), count = static_cast<hsize_t>(std::min<int64_t>(64, n_tokens - begin));
    std::vector<unsigned char> direct(count * static_cast<size_t>(token_bytes));
    std::vector<unsigned char> through_hdf5(direct.size());
    map->read(begin, static_cast<int64_t>(count), direct.data());
    H5Id memory_space = SSA_H5_SPACE(H5Screate_simple(1, &count, nullptr), "shard {}: memory space", path);
    SSA_H5_CHECK(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &start, nullptr, &count, nullptr),
                 "shard {}: select tokens", path);
    SSA_H5_CHECK(H5Dread(tokens, memory_type, memory_space.get(), file_space.get(), H5P_DEFAULT, through_hdf5.data()),
                 "shard {}: read tokens [{}, {})", path, start, start + count);
    if (direct != through_hdf5) return nullptr;
  }
  return map;
}

void ChunkFileMap::read(int64_t begin, int64_t count, unsigned char* out) const {
  while (count > 0) {
    int64_t chunk = begin / chunk_tokens_, within = begin % chunk_tokens_;
    int64_t take = std::min(count, chunk_tokens_ - within);
    size_t bytes = static_cast<size_t>(take * token_bytes_);
    off_t position = static_cast<off_t>(addresses_[static_cast<size_t>(chunk)] + within * token_bytes_);
    size_t done = 0;
    while (done < bytes) {
      ssize_t n = ::pread(fd_, out + done, bytes - done, position + static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        throw ShardError(fmt::format("shard {}: reading tokens [{}, {}) at byte {} failed: {}", path_, begin,
                                     begin + take, position, n < 0 ? std::strerror(errno) : "file ends early (truncated?)"));
      }
      done += static_cast<size_t>(n);
    }
    out += bytes;
    begin += take;
    count -= take;
  }
}

}  // namespace ssa::data
