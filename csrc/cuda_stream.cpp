// The CUDA shim: lets an executor thread run its libtorch work on a stream of its own, and tells
// `--dtype auto` what the GPU computes natively. Compiled only when the libtorch in use ships CUDA
// and its c10/cuda headers are found.
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

extern "C" int caption_cascade_use_pool_stream(int device) {
  try {
    auto stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, static_cast<c10::DeviceIndex>(device));
    c10::cuda::setCurrentCUDAStream(stream);
    return 0;
  } catch (...) {
    return -1;
  }
}

// ATen's own cached device properties; declared here rather than through ATen/cuda/CUDAContext.h,
// which also wants the cuBLAS, cuSPARSE and cuSOLVER headers.
namespace at {
namespace cuda {
cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
}  // namespace cuda
}  // namespace at

// The major compute capability of `device` (8 and up compute bf16 natively), or -1.
extern "C" int caption_cascade_cuda_capability_major(int device) {
  try {
    return at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device))->major;
  } catch (...) {
    return -1;
  }
}
