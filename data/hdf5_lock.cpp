#include "data/hdf5_lock.h"

namespace ssa::data {

std::mutex& hdf5_mutex() {
  static std::mutex mutex;
  return mutex;
}

}  // namespace ssa::data
