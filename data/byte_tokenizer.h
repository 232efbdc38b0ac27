#pragma once
// The byte-level tokenizer: token id b (0..255) is byte b, id 256 is the
// end-of-document token. No merges, no vocabulary file; UTF-8 text round-trips
// byte for byte.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ssa::data {

inline constexpr std::string_view kByteTokenizerName = "bytes";
inline constexpr int64_t kByteEosId = 256;
inline constexpr int64_t kByteVocabSize = 257;

// Bytes of `text` as token ids (no EOS).
inline std::vector<int32_t> byte_tokens(std::string_view text) {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

// Text of byte token ids; EOS becomes '\n' so a decoded stream stays readable.
// Throws on an id outside the byte vocabulary.
std::string byte_detokenize(const int32_t* ids, int64_t count);

}  // namespace ssa::data
