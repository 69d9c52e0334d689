// The int8 shim: linear layers with int8 weights and dynamically quantized activations, through
// libtorch's own `quantized::linear_prepack` / `quantized::linear_dynamic` operators (the ones
// torch.ao.quantization.quantize_dynamic installs). They are registered with the dispatcher
// rather than exported as functions, so they are called boxed, by name.
//
// Tensors cross as `at::Tensor*`, which is what tch's tensors point at.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstring>
#include <exception>
#include <limits>

namespace {

void report(char* error, size_t capacity, const char* what) {
  if (error != nullptr && capacity > 0) {
    std::strncpy(error, what, capacity - 1);
    error[capacity - 1] = '\0';
  }
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

// Quantizes `weight` ([out, in], fp32) per output channel, symmetric, as PyTorch's
// per-channel-symmetric weight observer does (scale = max |w| of the row / 127.5, at least
// float32's epsilon, zero point 0), and packs it with `bias` (may be null) for the CPU's
// quantized engine. Returns an owned handle, or null with `error` filled.
extern "C" void* caption_cascade_int8_pack(const at::Tensor* weight, const at::Tensor* bias, char* error,
                                           size_t capacity) {
  try {
    at::NoGradGuard no_grad;
    at::Tensor w = weight->contiguous().to(at::kFloat);
    at::Tensor scales = (w.abs().amax({1}) / 127.5).clamp_min(std::numeric_limits<float>::epsilon());
    at::Tensor zero_points = at::zeros({w.size(0)}, at::kLong);
    at::Tensor quantized = at::quantize_per_channel(w, scales.to(at::kDouble), zero_points, 0, at::kQInt8);
    torch::jit::Stack stack{quantized, bias != nullptr ? c10::IValue(bias->to(at::kFloat)) : c10::IValue()};
    static const c10::OperatorHandle prepack = op("quantized::linear_prepack");
    prepack.callBoxed(&stack);
    return new c10::IValue(std::move(stack.at(0)));
  } catch (const std::exception& e) {
    report(error, capacity, e.what());
    return nullptr;
  }
}

// `input`·Wᵀ + b for a handle from `caption_cascade_int8_pack`: the input (fp32, any leading
// dimensions) is quantized per tensor on the fly, with the reduced range the x86 engines use,
// as quantize_dynamic's layers call it. Returns a new owned tensor, or null with `error` filled.
extern "C" at::Tensor* caption_cascade_int8_linear(const at::Tensor* input, const void* packed, char* error,
                                                   size_t capacity) {
  try {
    at::NoGradGuard no_grad;
    const auto& params = *static_cast<const c10::IValue*>(packed);
    torch::jit::Stack stack{*input, params, c10::IValue(true)};
    static const c10::OperatorHandle linear = op("quantized::linear_dynamic");
    linear.callBoxed(&stack);
    return new at::Tensor(stack.at(0).toTensor());
  } catch (const std::exception& e) {
    report(error, capacity, e.what());
    return nullptr;
  }
}

extern "C" void caption_cascade_int8_free(void* packed) {
  delete static_cast<c10::IValue*>(packed);
}
