// Lets an executor thread run its libtorch work on a stream of its own: takes a stream from
// libtorch's pool for `device` and makes it current on the calling thread. Compiled only when the
// libtorch in use ships CUDA and its c10/cuda headers are found.
#include <c10/cuda/CUDAStream.h>

extern "C" int caption_cascade_use_pool_stream(int device) {
  try {
    auto stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, static_cast<c10::DeviceIndex>(device));
    c10::cuda::setCurrentCUDAStream(stream);
    return 0;
  } catch (...) {
    return -1;
  }
}
