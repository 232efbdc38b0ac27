#pragma once
// JSON form of the step and eval records, as written to the JSONL log: one flat
// object per record, keys named as the record's fields, plus "kind" ("step" |
// "eval") and "time" (Unix seconds when the line was made). A non-finite number
// (a NaN loss on a skipped step) is written as null, JSON having no NaN.
#include <nlohmann/json.hpp>

#include "monitoring/step_record.h"

namespace ssa::monitoring {

nlohmann::ordered_json to_json(const StepRecord& record);
nlohmann::ordered_json to_json(const EvalRecord& record);

}  // namespace ssa::monitoring
