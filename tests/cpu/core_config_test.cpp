#include <gtest/gtest.h>

#include "core/config.h"

TEST(Config, Placeholder) { ssa::core::Config c; c.validate(); }
