#pragma once
// The token shard file format (see data/README.md for the full description).
//
//   /tokens       1-D uint16 or uint32 [n_tokens], chunked, optional deflate
//   /doc_offsets  1-D uint64 [n_docs]: position in /tokens where each document
//                 that begins in this shard begins (strictly increasing, < n_tokens;
//                 a document may continue from the previous shard)
//   attributes on the root group:
//     format      string "ssa-tokens"
//     version     integer, kFormatVersion
//     vocab_size  integer: every token id is < vocab_size
//     tokenizer   string, e.g. "bytes"
//     eos_id      integer in [0, vocab_size), or -1 when the tokenizer has none
//
// A dataset is the sorted (by file name) list of *.h5 files of one folder; its
// token stream is the concatenation of the shards' /tokens.
#include <cstdint>
#include <string_view>

namespace ssa::data {

inline constexpr std::string_view kFormatName = "ssa-tokens";
inline constexpr int64_t kFormatVersion = 1;

inline constexpr const char* kTokensDataset = "tokens";
inline constexpr const char* kDocOffsetsDataset = "doc_offsets";
inline constexpr const char* kAttrFormat = "format";
inline constexpr const char* kAttrVersion = "version";
inline constexpr const char* kAttrVocabSize = "vocab_size";
inline constexpr const char* kAttrTokenizer = "tokenizer";
inline constexpr const char* kAttrEosId = "eos_id";

inline constexpr std::string_view kShardExtension = ".h5";

// Present in a dataset folder while `ssa data prepare` writes it, removed when
// the last shard is in place: shards of an interrupted run are complete files,
// but the dataset is not, and readers refuse it.
inline constexpr const char* kIncompleteMarker = ".prepare-incomplete";

// Tokens per HDF5 chunk: big enough that per-chunk overhead vanishes, small
// enough that a compressed chunk decodes in milliseconds.
inline constexpr int64_t kDefaultChunkTokens = int64_t{1} << 20;
// Tokens per shard written by `ssa data prepare` unless told otherwise.
inline constexpr int64_t kDefaultShardTokens = int64_t{1} << 24;

// Token ids of a uint16 shard fit when vocab_size <= this.
inline constexpr int64_t kMaxVocabUint16 = int64_t{1} << 16;
inline constexpr int64_t kMaxVocabUint32 = int64_t{1} << 32;

}  // namespace ssa::data
