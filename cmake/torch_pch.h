// The LibTorch headers every torch-using target needs, precompiled once.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>
#include <fmt/format.h>
#include <algorithm>
#include <string>
#include <vector>
