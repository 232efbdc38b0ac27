#include "data/byte_tokenizer.h"

#include <fmt/format.h>

#include <stdexcept>

namespace ssa::data {

std::string byte_detokenize(const int32_t* ids, int64_t count) {
  std::string text;
  text.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    int32_t id = ids[i];
    if (id == kByteEosId) {
      text.push_back('\n');
    } else if (id >= 0 && id < 256) {
      text.push_back(static_cast<char>(id));
    } else {
      throw std::runtime_error(fmt::format("byte tokenizer: token id {} at index {} is outside [0, {}]", id, i,
                                           kByteEosId));
    }
  }
  return text;
}

}  // namespace ssa::data
