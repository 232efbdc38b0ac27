#pragma once
// `ssa data prepare`: text files -> byte-level token shards.
//
// Every document is written as its bytes followed by one EOS token, into
// OUTPUT/shard-NNNNNN.h5. With val_fraction F > 0 the last ceil(F * documents)
// documents go to OUTPUT/val/shard-NNNNNN.h5 instead (held out for eval); that
// needs the document count first, so the inputs are read twice (a quick
// counting pass, then the writing pass).
//
// While it runs, each dataset folder it writes holds kIncompleteMarker, so an
// interrupted run (whose finished shards look valid one by one) is refused by
// readers; the next prepare into that folder replaces the remains by itself.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/document_splitter.h"
#include "data/shard_format.h"

namespace ssa::data {

struct PrepareOptions {
  std::vector<std::string> inputs;  // files (plain or gzip) or folders (every file below, sorted)
  std::string output;               // dataset folder; created if missing
  SplitMode split = SplitMode::kAuto;
  double val_fraction = 0;          // in [0, 1): share of documents held out (the last ones)
  int64_t shard_tokens = kDefaultShardTokens;
  int64_t chunk_tokens = kDefaultChunkTokens;
  int deflate_level = 0;            // 0: none, 1..9
  int64_t token_bytes = 0;          // 0: uint16 (fits the byte vocabulary); 4: uint32
  bool overwrite = false;           // replace shards already in output (else refuse, unless
                                    // they are the remains of an interrupted prepare)
};

struct PrepareProgress {
  int pass = 0, passes = 0;         // 1-based; passes is 2 with a val split, else 1
  int64_t bytes = 0;                // uncompressed input bytes read in this pass
  int64_t total_bytes = 0;          // of all inputs, once known (after the counting pass), else 0
  int64_t documents = 0, tokens = 0, shards = 0;
  bool done = false;
};

struct PrepareSummary {
  std::vector<std::string> files;   // the inputs, expanded, in the order read
  int64_t input_bytes = 0;          // uncompressed
  int64_t train_documents = 0, val_documents = 0;
  int64_t train_tokens = 0, val_tokens = 0;
  std::vector<std::string> train_shards, val_shards;
  double seconds = 0;
};

// Files named by `inputs`: a file as is, a folder as all regular files below it
// (sorted by path, hidden ones skipped). Throws naming a missing input.
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs);

// Throws std::runtime_error / std::invalid_argument naming the input, option or
// output file at fault. `progress` is called every few MB and when done.
PrepareSummary prepare_dataset(const PrepareOptions& options,
                               const std::function<void(const PrepareProgress&)>& progress = {});

}  // namespace ssa::data
