#include "data/dataset_prepare.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>

#include "data/byte_tokenizer.h"
#include "data/shard_writer.h"

namespace ssa::data {

namespace fs = std::filesystem;

namespace {

constexpr const char* kValFolder = "val";
constexpr int64_t kProgressEveryBytes = int64_t{8} << 20;

class CountingSink : public DocumentSink {
 public:
  void begin_document() override { ++documents; }
  void text(const char*, size_t) override {}
  void end_document() override {}
  int64_t documents = 0;
};

// Sends documents [0, train_documents) to `train`, the rest to `val`; each
// document's bytes are followed by EOS.
class ShardSink : public DocumentSink {
 public:
  ShardSink(ShardWriter& train, ShardWriter* val, int64_t train_documents)
      : train_(train), val_(val), train_documents_(train_documents) {}
  void begin_document() override {
    current_ = (val_ != nullptr && index_ >= train_documents_) ? val_ : &train_;
    ++index_;
    current_->begin_document();
  }
  void text(const char* bytes, size_t count) override { current_->append_bytes(bytes, count); }
  void end_document() override { current_->append(kByteEosId); }
  int64_t documents() const { return index_; }

 private:
  ShardWriter& train_;
  ShardWriter* val_;
  int64_t train_documents_;
  int64_t index_ = 0;
  ShardWriter* current_ = nullptr;
};

// Shards already in `dir`, and temporary files an interrupted run left there.
void collect_existing(const fs::path& dir, std::vector<fs::path>& shards, std::vector<fs::path>& temporaries) {
  std::error_code error;
  if (!fs::is_directory(dir, error)) return;
  for (const auto& entry : fs::directory_iterator(dir, error)) {
    std::string name = entry.path().filename().string();
    if (name.size() > 4 && name[0] == '.' && name.ends_with(".h5.tmp")) {
      temporaries.push_back(entry.path());
    } else if (entry.path().extension() == kShardExtension) {
      shards.push_back(entry.path());
    }
  }
}

}  // namespace

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs) {
  if (inputs.empty()) throw std::invalid_argument("prepare: no --input given");
  std::vector<std::string> files;
  for (const auto& input : inputs) {
    std::error_code error;
    fs::file_status status = fs::status(input, error);
    if (!fs::exists(status)) throw std::runtime_error(fmt::format("input {}: no such file or folder", input));
    if (fs::is_directory(status)) {
      std::vector<std::string> found;
      for (auto it = fs::recursive_directory_iterator(input, error); it != fs::recursive_directory_iterator();
           it.increment(error)) {
        if (error) break;
        std::string name = it->path().filename().string();
        if (!name.empty() && name[0] == '.') {
          if (it->is_directory(error)) it.disable_recursion_pending();
          continue;
        }
        if (it->is_regular_file(error)) found.push_back(it->path().string());
      }
      if (error) throw std::runtime_error(fmt::format("input {}: cannot list the folder: {}", input, error.message()));
      if (found.empty()) throw std::runtime_error(fmt::format("input {}: the folder holds no files", input));
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else {
      files.push_back(input);
    }
  }
  return files;
}

PrepareSummary prepare_dataset(const PrepareOptions& options,
                               const std::function<void(const PrepareProgress&)>& progress) {
  auto started = std::chrono::steady_clock::now();
  if (options.output.empty()) throw std::invalid_argument("prepare: --output is empty");
  if (!(options.val_fraction >= 0 && options.val_fraction < 1)) {
    throw std::invalid_argument(fmt::format("prepare: --val-fraction {} is outside [0, 1)", options.val_fraction));
  }
  PrepareSummary summary;
  summary.files = expand_inputs(options.inputs);

  // Never mix a new dataset with an old one; --overwrite removes the old shards.
  fs::path output(options.output), val_output = output / kValFolder;
  std::vector<fs::path> existing, temporaries;
  collect_existing(output, existing, temporaries);
  collect_existing(val_output, existing, temporaries);
  // The remains of an interrupted prepare are ours to replace.
  std::error_code error;
  bool interrupted = fs::exists(output / kIncompleteMarker, error) || fs::exists(val_output / kIncompleteMarker, error);
  if (!existing.empty() && !options.overwrite && !interrupted) {
    throw std::runtime_error(fmt::format("output {}: already holds {} shard file(s), e.g. {}; pass --overwrite to "
                                         "replace them",
                                         options.output, existing.size(), existing.front().string()));
  }

  bool split_val = options.val_fraction > 0;
  PrepareProgress state;
  state.passes = split_val ? 2 : 1;
  int64_t since_report = 0;
  auto on_bytes = [&](int64_t n) {
    state.bytes += n;
    since_report += n;
    if (progress && since_report >= kProgressEveryBytes) {
      since_report = 0;
      progress(state);
    }
  };

  int64_t train_documents = INT64_MAX;
  if (split_val) {
    state.pass = 1;
    CountingSink counter;
    auto on_count_bytes = [&](int64_t n) {
      state.documents = counter.documents;
      on_bytes(n);
    };
    for (const auto& file : summary.files) split_documents(file, options.split, counter, on_count_bytes);
    if (counter.documents < 2) {
      throw std::runtime_error(fmt::format("prepare: --val-fraction needs at least 2 documents, the inputs hold {} "
                                           "(see --split)",
                                           counter.documents));
    }
    int64_t val_documents = static_cast<int64_t>(std::ceil(options.val_fraction * counter.documents));
    val_documents = std::clamp<int64_t>(val_documents, 1, counter.documents - 1);
    train_documents = counter.documents - val_documents;
    state.total_bytes = state.bytes;
    state.documents = counter.documents;
    if (progress) progress(state);
  }

  // Marks the datasets this run writes as incomplete until the end; a val
  // folder this run does not write loses its marker along with its shards.
  std::vector<fs::path> markers = {output / kIncompleteMarker};
  if (split_val) markers.push_back(val_output / kIncompleteMarker);
  if (!split_val) fs::remove(val_output / kIncompleteMarker, error);
  for (const auto& marker : markers) {
    fs::create_directories(marker.parent_path(), error);
    std::ofstream file(marker);
    file << "ssa data prepare is writing this dataset; if no prepare is running, it was interrupted\n";
    if (!file) throw std::runtime_error(fmt::format("output {}: cannot write {}", options.output, marker.string()));
  }
  for (const auto& path : existing) fs::remove(path, error);
  for (const auto& path : temporaries) fs::remove(path, error);

  ShardWriterOptions writer_options;
  writer_options.dir = options.output;
  writer_options.shard_tokens = options.shard_tokens;
  writer_options.chunk_tokens = options.chunk_tokens;
  writer_options.deflate_level = options.deflate_level;
  writer_options.token_bytes = options.token_bytes;
  writer_options.vocab_size = kByteVocabSize;
  writer_options.eos_id = kByteEosId;
  writer_options.tokenizer = std::string(kByteTokenizerName);
  ShardWriter train(writer_options);
  std::unique_ptr<ShardWriter> val;
  if (split_val) {
    writer_options.dir = val_output.string();
    val = std::make_unique<ShardWriter>(writer_options);
  }

  state.pass = state.passes;
  state.bytes = 0;
  since_report = 0;
  ShardSink sink(train, val.get(), train_documents);
  auto on_write_bytes = [&](int64_t n) {
    state.documents = sink.documents();
    state.tokens = train.tokens_written() + (val ? val->tokens_written() : 0);
    state.shards = static_cast<int64_t>(train.shard_paths().size() + (val ? val->shard_paths().size() : 0));
    on_bytes(n);
  };
  for (const auto& file : summary.files) split_documents(file, options.split, sink, on_write_bytes);
  train.finish();
  if (val) val->finish();
  for (const auto& marker : markers) {
    if (!fs::remove(marker, error)) {
      throw std::runtime_error(fmt::format("output {}: cannot remove {}: {}", options.output, marker.string(),
                                           error.message()));
    }
  }

  summary.input_bytes = state.bytes;
  summary.train_documents = train.documents();
  summary.train_tokens = train.tokens_written();
  summary.train_shards = train.shard_paths();
  if (val) {
    summary.val_documents = val->documents();
    summary.val_tokens = val->tokens_written();
    summary.val_shards = val->shard_paths();
  }
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (progress) {
    state.total_bytes = state.bytes;
    state.documents = summary.train_documents + summary.val_documents;
    state.tokens = summary.train_tokens + summary.val_tokens;
    state.shards = static_cast<int64_t>(summary.train_shards.size() + summary.val_shards.size());
    state.done = true;
    progress(state);
  }
  return summary;
}

}  // namespace ssa::data
