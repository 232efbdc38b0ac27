#pragma once
// The process-wide lock around HDF5 calls.
//
// HDF5 is built serial (not thread-safe) in general; Debian's build happens to
// serialise calls itself, others do not. Every HDF5 call in ssa_data holds this
// lock (the reader's I/O thread takes it per read), and any other code that calls
// HDF5 while a TokenReader is running (checkpoints) must hold it too. Not
// recursive: take it around a block of HDF5 calls, never around code that takes
// it again.
#include <mutex>

namespace ssa::data {

std::mutex& hdf5_mutex();

}  // namespace ssa::data
