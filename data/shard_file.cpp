#include "data/shard_file.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "data/shard_format.h"

namespace ssa::data {

namespace {

using Lock = std::lock_guard<std::mutex>;

[[noreturn]] void fail(const std::string& path, const std::string& problem) {
  throw ShardError(fmt::format("shard {}: {}", path, problem));
}

bool has_attribute(hid_t file, const std::string& path, const char* name) {
  return SSA_H5_CHECK(H5Aexists(file, name), "shard {}: look up attribute '{}'", path, name) > 0;
}

H5Id open_scalar_attribute(hid_t file, const std::string& path, const char* name) {
  if (!has_attribute(file, path, name)) fail(path, fmt::format("attribute '{}' is missing", name));
  H5Id attr = SSA_H5_ATTR(H5Aopen(file, name, H5P_DEFAULT), "shard {}: open attribute '{}'", path, name);
  H5Id space = SSA_H5_SPACE(H5Aget_space(attr.get()), "shard {}: attribute '{}'", path, name);
  hssize_t points = SSA_H5_CHECK(H5Sget_simple_extent_npoints(space.get()), "shard {}: attribute '{}'", path, name);
  if (points != 1) fail(path, fmt::format("attribute '{}' holds {} values, expected one", name, points));
  return attr;
}

int64_t read_integer_attribute(hid_t file, const std::string& path, const char* name) {
  H5Id attr = open_scalar_attribute(file, path, name);
  H5Id type = SSA_H5_TYPE(H5Aget_type(attr.get()), "shard {}: attribute '{}'", path, name);
  H5T_class_t type_class = SSA_H5_CHECK(H5Tget_class(type.get()), "shard {}: attribute '{}'", path, name);
  if (type_class != H5T_INTEGER) fail(path, fmt::format("attribute '{}' is not an integer", name));
  int64_t value = 0;
  SSA_H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_INT64, &value), "shard {}: read attribute '{}'", path, name);
  return value;
}

// Fixed-length (as written here) and variable-length (as h5py writes str) both work.
std::string read_string_attribute(hid_t file, const std::string& path, const char* name) {
  H5Id attr = open_scalar_attribute(file, path, name);
  H5Id type = SSA_H5_TYPE(H5Aget_type(attr.get()), "shard {}: attribute '{}'", path, name);
  H5T_class_t type_class = SSA_H5_CHECK(H5Tget_class(type.get()), "shard {}: attribute '{}'", path, name);
  if (type_class != H5T_STRING) fail(path, fmt::format("attribute '{}' is not a string", name));
  H5Id memory_type = SSA_H5_TYPE(H5Tcopy(H5T_C_S1), "shard {}: attribute '{}'", path, name);
  H5T_cset_t cset = SSA_H5_CHECK(H5Tget_cset(type.get()), "shard {}: attribute '{}'", path, name);
  SSA_H5_CHECK(H5Tset_cset(memory_type.get(), cset), "shard {}: attribute '{}'", path, name);
  htri_t variable = SSA_H5_CHECK(H5Tis_variable_str(type.get()), "shard {}: attribute '{}'", path, name);
  if (variable > 0) {
    SSA_H5_CHECK(H5Tset_size(memory_type.get(), H5T_VARIABLE), "shard {}: attribute '{}'", path, name);
    char* text = nullptr;
    SSA_H5_CHECK(H5Aread(attr.get(), memory_type.get(), &text), "shard {}: read attribute '{}'", path, name);
    std::string value = text != nullptr ? text : "";
    SSA_H5_CHECK(H5free_memory(text), "shard {}: attribute '{}'", path, name);
    return value;
  }
  size_t size = H5Tget_size(type.get());  // 0 on failure
  if (size == 0) fail(path, fmt::format("attribute '{}': the size of its string type is unreadable or 0", name));
  // One byte more than stored: the memory type is NUL-terminated, and a stored
  // NUL- or space-padded string may use all `size` bytes.
  SSA_H5_CHECK(H5Tset_size(memory_type.get(), size + 1), "shard {}: attribute '{}'", path, name);
  std::string value(size + 1, '\0');
  SSA_H5_CHECK(H5Aread(attr.get(), memory_type.get(), value.data()), "shard {}: read attribute '{}'", path, name);
  value.resize(std::strlen(value.c_str()));
  while (!value.empty() && value.back() == ' ') value.pop_back();  // space-padded strings
  return value;
}

// Opens a 1-D dataset; returns it and its length.
H5Id open_vector(hid_t file, const std::string& path, const char* name, int64_t& length) {
  htri_t exists = SSA_H5_CHECK(H5Lexists(file, name, H5P_DEFAULT), "shard {}: look up /{}", path, name);
  if (exists <= 0) fail(path, fmt::format("dataset /{} is missing", name));
  H5Id dataset = SSA_H5_DATASET(H5Dopen2(file, name, H5P_DEFAULT), "shard {}: open /{}", path, name);
  H5Id space = SSA_H5_SPACE(H5Dget_space(dataset.get()), "shard {}: /{}", path, name);
  int rank = SSA_H5_CHECK(H5Sget_simple_extent_ndims(space.get()), "shard {}: /{}", path, name);
  if (rank != 1) fail(path, fmt::format("dataset /{} has {} dimensions, expected 1", name, rank));
  hsize_t dims = 0;
  SSA_H5_CHECK(H5Sget_simple_extent_dims(space.get(), &dims, nullptr), "shard {}: /{}", path, name);
  length = static_cast<int64_t>(dims);
  return dataset;
}

// Describes the filter pipeline of /tokens and refuses filters this HDF5 lacks
// (e.g. a blosc-compressed file written elsewhere), which would fail on read.
std::string describe_filters(hid_t plist, const std::string& path, bool& compressed) {
  int n = SSA_H5_CHECK(H5Pget_nfilters(plist), "shard {}: filters of /tokens", path);
  compressed = n > 0;
  if (n == 0) return "none";
  std::string text;
  for (int i = 0; i < n; ++i) {
    unsigned flags = 0, config = 0;
    size_t n_values = 4;
    unsigned values[4] = {0, 0, 0, 0};
    char name[64] = {0};
    H5Z_filter_t filter = SSA_H5_CHECK(H5Pget_filter2(plist, static_cast<unsigned>(i), &flags, &n_values, values,
                                                      sizeof(name), name, &config),
                                       "shard {}: filter {} of /tokens", path, i);
    htri_t available = SSA_H5_CHECK(H5Zfilter_avail(filter), "shard {}: filter {} of /tokens", path, filter);
    if (available <= 0) {
      fail(path, fmt::format("/tokens uses HDF5 filter {} ('{}'), which this HDF5 library does not have", filter,
                             name));
    }
    if (!text.empty()) text += "+";
    if (filter == H5Z_FILTER_DEFLATE && n_values >= 1) {
      text += fmt::format("deflate({})", values[0]);
    } else {
      text += name[0] != '\0' ? std::string(name) : fmt::format("filter{}", filter);
    }
  }
  return text;
}

}  // namespace

ShardFile::ShardFile(const std::string& path) {
  Lock lock(hdf5_mutex());
  hdf5_silence_errors();
  try {
    open_locked(path);
  } catch (...) {
    close_locked();  // members would otherwise be closed after the lock is gone
    throw;
  }
}

void ShardFile::open_locked(const std::string& path) {
  meta_.path = path;
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) fail(path, "no such file");
  meta_.file_bytes = static_cast<int64_t>(std::filesystem::file_size(path, error));

  htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 < 0) fail(path, fmt::format("cannot be read: {}", hdf5_error_detail()));
  if (is_hdf5 == 0) {
    fail(path, fmt::format("not an HDF5 file (no HDF5 signature in its {} bytes): garbage or wrong file",
                           meta_.file_bytes));
  }
  // No data sieve buffer: HDF5 would otherwise read 64 KiB around every window
  // of a few hundred tokens. Reads here are either whole 1M-token pieces
  // (inspect, baseline) or windows at random places; neither gains from it.
  H5Id access = SSA_H5_PLIST(H5Pcreate(H5P_FILE_ACCESS), "shard {}: file access list", path);
  SSA_H5_CHECK(H5Pset_sieve_buf_size(access.get(), 0), "shard {}: sieve buffer", path);
  hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, access.get());
  if (file < 0) {
    std::string detail = hdf5_error_detail();
    fail(path, fmt::format("cannot be opened as HDF5 (truncated or corrupt file): {}", detail));
  }
  file_ = H5Id(file, H5Fclose);

  try {
    if (!has_attribute(file, path, kAttrFormat)) {
      fail(path, fmt::format("attribute '{}' is missing: not a {} shard", kAttrFormat, kFormatName));
    }
    std::string format = read_string_attribute(file, path, kAttrFormat);
    if (format != kFormatName) {
      fail(path, fmt::format("attribute format is \"{}\", expected \"{}\"", format, kFormatName));
    }
    meta_.version = read_integer_attribute(file, path, kAttrVersion);
    if (meta_.version < 1 || meta_.version > kFormatVersion) {
      fail(path, fmt::format("format version {} is not supported (this build reads version 1 to {})", meta_.version,
                             kFormatVersion));
    }
    meta_.vocab_size = read_integer_attribute(file, path, kAttrVocabSize);
    if (meta_.vocab_size < 1 || meta_.vocab_size > kMaxVocabUint32) {
      fail(path, fmt::format("vocab_size {} is outside [1, 2^32]", meta_.vocab_size));
    }
    meta_.tokenizer = read_string_attribute(file, path, kAttrTokenizer);
    meta_.eos_id = read_integer_attribute(file, path, kAttrEosId);
    if (meta_.eos_id < -1 || meta_.eos_id >= meta_.vocab_size) {
      fail(path, fmt::format("eos_id {} is outside [0, vocab_size {}) and is not -1 (none)", meta_.eos_id,
                             meta_.vocab_size));
    }

    tokens_ = open_vector(file, path, kTokensDataset, meta_.n_tokens);
    H5Id type = SSA_H5_TYPE(H5Dget_type(tokens_.get()), "shard {}: type of /tokens", path);
    size_t type_size = H5Tget_size(type.get());  // 0 on failure: rejected below
    H5T_class_t type_class = SSA_H5_CHECK(H5Tget_class(type.get()), "shard {}: type of /tokens", path);
    H5T_sign_t sign = type_class == H5T_INTEGER
                          ? SSA_H5_CHECK(H5Tget_sign(type.get()), "shard {}: type of /tokens", path)
                          : H5T_SGN_NONE;
    if (type_class != H5T_INTEGER || sign != H5T_SGN_NONE || (type_size != 2 && type_size != 4)) {
      fail(path, fmt::format("/tokens must be uint16 or uint32, found a {}-byte {}", type_size,
                             type_class != H5T_INTEGER ? "non-integer" : "signed integer"));
    }
    meta_.token_bytes = static_cast<int64_t>(type_size);
    H5Id create = SSA_H5_PLIST(H5Dget_create_plist(tokens_.get()), "shard {}: layout of /tokens", path);
    H5D_layout_t layout = SSA_H5_CHECK(H5Pget_layout(create.get()), "shard {}: layout of /tokens", path);
    if (layout == H5D_CHUNKED) {
      hsize_t chunk = 0;
      SSA_H5_CHECK(H5Pget_chunk(create.get(), 1, &chunk), "shard {}: chunk of /tokens", path);
      meta_.chunk_tokens = static_cast<int64_t>(chunk);
      meta_.filters = describe_filters(create.get(), path, meta_.compressed);
    } else {
      meta_.filters = "none";
    }

    docs_ = open_vector(file, path, kDocOffsetsDataset, meta_.n_docs);
    H5Id docs_type = SSA_H5_TYPE(H5Dget_type(docs_.get()), "shard {}: type of /doc_offsets", path);
    H5T_class_t docs_class = SSA_H5_CHECK(H5Tget_class(docs_type.get()), "shard {}: type of /doc_offsets", path);
    if (docs_class != H5T_INTEGER) fail(path, "/doc_offsets is not an integer dataset");
    docs_space_ = SSA_H5_SPACE(H5Dget_space(docs_.get()), "shard {}: /doc_offsets", path);

    // Reopen /tokens with a chunk cache that suits random windows: a compressed
    // chunk is decoded whole, so keep a few decoded chunks for neighbouring
    // windows; uncompressed chunks are read straight from the file (no cache, so
    // no whole-chunk read for a window of a few hundred tokens).
    size_t cache_bytes =
        meta_.compressed ? static_cast<size_t>(std::max<int64_t>(meta_.chunk_tokens, 1) * meta_.token_bytes * 4) : 0;
    H5Id access = SSA_H5_PLIST(H5Pcreate(H5P_DATASET_ACCESS), "shard {}: access list", path);
    SSA_H5_CHECK(H5Pset_chunk_cache(access.get(), 521, cache_bytes, 1.0),
                 "shard {}: chunk cache", path);
    tokens_space_.reset();
    tokens_.reset();
    tokens_ = SSA_H5_DATASET(H5Dopen2(file, kTokensDataset, access.get()), "shard {}: open /tokens", path);
    tokens_space_ = SSA_H5_SPACE(H5Dget_space(tokens_.get()), "shard {}: /tokens", path);
    direct_ = ChunkFileMap::create(path, file, tokens_.get(), meta_.n_tokens, meta_.token_bytes, meta_.chunk_tokens);
    meta_.direct_reads = direct_ != nullptr;
  } catch (const Hdf5Error& e) {
    // An HDF5 failure past the open means the file's insides are damaged.
    throw ShardError(fmt::format("{} (corrupt file?)", e.what()));
  }
}

ShardFile::~ShardFile() {
  Lock lock(hdf5_mutex());
  close_locked();
}

void ShardFile::close_locked() noexcept {
  direct_.reset();
  docs_space_.reset();
  docs_.reset();
  memory_space_.reset();
  tokens_space_.reset();
  tokens_.reset();
  file_.reset();
}

ShardFile::ShardFile(ShardFile&&) noexcept = default;

void ShardFile::read(int64_t begin, int64_t count, int32_t* out) {
  if (begin < 0 || count < 0 || begin + count > meta_.n_tokens) {
    fail(meta_.path, fmt::format("read of tokens [{}, {}) is outside [0, {})", begin, begin + count, meta_.n_tokens));
  }
  if (count == 0) return;
  const std::string& path = meta_.path;
  raw_.resize(static_cast<size_t>(count * meta_.token_bytes));
  if (direct_) {
    direct_->read(begin, count, raw_.data());
  } else {
    Lock lock(hdf5_mutex());
    hdf5_silence_errors();
    try {
      if (count != memory_space_count_) {
        hsize_t dims = static_cast<hsize_t>(count);
        memory_space_ = SSA_H5_SPACE(H5Screate_simple(1, &dims, nullptr), "shard {}: memory space", path);
        memory_space_count_ = count;
      }
      hsize_t start = static_cast<hsize_t>(begin), length = static_cast<hsize_t>(count);
      SSA_H5_CHECK(H5Sselect_hyperslab(tokens_space_.get(), H5S_SELECT_SET, &start, nullptr, &length, nullptr),
                   "shard {}: select tokens [{}, {})", path, begin, begin + count);
      hid_t memory_type = meta_.token_bytes == 2 ? H5T_NATIVE_UINT16 : H5T_NATIVE_UINT32;
      SSA_H5_CHECK(H5Dread(tokens_.get(), memory_type, memory_space_.get(), tokens_space_.get(), H5P_DEFAULT,
                           raw_.data()),
                   "shard {}: read tokens [{}, {})", path, begin, begin + count);
    } catch (const Hdf5Error& e) {
      throw ShardError(fmt::format("{} (truncated or corrupt file?)", e.what()));
    }
  }
  // Widen to int32 and check the vocabulary in one pass; the bad id itself is
  // searched only after the fast pass found one.
  uint32_t largest = 0;
  if (meta_.token_bytes == 2) {
    const auto* in = reinterpret_cast<const uint16_t*>(raw_.data());
    uint16_t m = 0;
    for (int64_t i = 0; i < count; ++i) {
      out[i] = in[i];
      m = std::max(m, in[i]);
    }
    largest = m;
  } else {
    const auto* in = reinterpret_cast<const uint32_t*>(raw_.data());
    for (int64_t i = 0; i < count; ++i) {
      out[i] = static_cast<int32_t>(in[i]);
      largest = std::max(largest, in[i]);
    }
  }
  if (static_cast<int64_t>(largest) >= meta_.vocab_size) {
    for (int64_t i = 0; i < count; ++i) {
      uint32_t id = meta_.token_bytes == 2 ? reinterpret_cast<const uint16_t*>(raw_.data())[i]
                                           : reinterpret_cast<const uint32_t*>(raw_.data())[i];
      if (static_cast<int64_t>(id) >= meta_.vocab_size) {
        fail(path, fmt::format("token id {} at position {} is >= vocab_size {}", id, begin + i, meta_.vocab_size));
      }
    }
  }
}

void ShardFile::read_doc_offsets(int64_t begin, int64_t count, uint64_t* out) {
  if (begin < 0 || count < 0 || begin + count > meta_.n_docs) {
    fail(meta_.path, fmt::format("read of doc_offsets [{}, {}) is outside [0, {})", begin, begin + count,
                                 meta_.n_docs));
  }
  if (count == 0) return;
  const std::string& path = meta_.path;
  Lock lock(hdf5_mutex());
  hdf5_silence_errors();
  try {
    hsize_t start = static_cast<hsize_t>(begin), length = static_cast<hsize_t>(count);
    H5Id memory = SSA_H5_SPACE(H5Screate_simple(1, &length, nullptr), "shard {}: memory space", path);
    SSA_H5_CHECK(H5Sselect_hyperslab(docs_space_.get(), H5S_SELECT_SET, &start, nullptr, &length, nullptr),
                 "shard {}: select doc_offsets", path);
    SSA_H5_CHECK(H5Dread(docs_.get(), H5T_NATIVE_UINT64, memory.get(), docs_space_.get(), H5P_DEFAULT, out),
                 "shard {}: read doc_offsets [{}, {})", path, begin, begin + count);
  } catch (const Hdf5Error& e) {
    throw ShardError(fmt::format("{} (truncated or corrupt file?)", e.what()));
  }
}

void ShardFile::validate_doc_offsets() {
  constexpr int64_t kPiece = int64_t{1} << 20;
  std::vector<uint64_t> offsets;
  bool have_previous = false;
  uint64_t previous = 0;
  for (int64_t begin = 0; begin < meta_.n_docs; begin += kPiece) {
    int64_t count = std::min(kPiece, meta_.n_docs - begin);
    offsets.resize(static_cast<size_t>(count));
    read_doc_offsets(begin, count, offsets.data());
    for (int64_t i = 0; i < count; ++i) {
      uint64_t offset = offsets[static_cast<size_t>(i)];
      if (offset >= static_cast<uint64_t>(meta_.n_tokens)) {
        fail(meta_.path, fmt::format("doc_offsets[{}] = {} is not < n_tokens {}", begin + i, offset, meta_.n_tokens));
      }
      if (have_previous && offset <= previous) {
        fail(meta_.path, fmt::format("doc_offsets are not strictly increasing: doc_offsets[{}] = {} after {}",
                                     begin + i, offset, previous));
      }
      previous = offset;
      have_previous = true;
    }
  }
}

}  // namespace ssa::data
