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

// The CUDA runtime libtorch loaded, asked by attribute: reading cudaDeviceProp by its layout would
// take the headers' layout (this shim's CUDA) for the runtime's (libtorch's, possibly another major
// version). Looked up at run time so that the binary needs no link against one libcudart.
#include <dlfcn.h>

// The major compute capability of `device` (8 and up compute bf16 natively), or -1.
extern "C" int caption_cascade_cuda_capability_major(int device) {
  using GetAttribute = cudaError_t (*)(int*, cudaDeviceAttr, int);
  static const auto get = reinterpret_cast<GetAttribute>(dlsym(RTLD_DEFAULT, "cudaDeviceGetAttribute"));
  int major = -1;
  if (get == nullptr || get(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return -1;
  }
  return major;
}

// CUDA graphs of the row-wise parts of a decode step (see src/models/graphs.rs). A graph records
// what the calling thread's current stream runs between begin and end, and replays it there.
#include <ATen/cuda/CUDAGraph.h>

namespace {
// Runs `body` on the graph behind `graph`: 0, or -1 when libtorch threw (no C++ exception may
// cross into Rust).
template <typename F>
int on_graph(void* graph, F body) {
  try {
    return body(*static_cast<at::cuda::CUDAGraph*>(graph));
  } catch (...) {
    return -1;
  }
}
}  // namespace

extern "C" void* caption_cascade_graph_new() {
  try {
    return new at::cuda::CUDAGraph();
  } catch (...) {
    return nullptr;
  }
}

// Capture is thread-local: executors on other threads keep launching and allocating on their own
// streams meanwhile. Fails on the default stream, which cannot be captured.
extern "C" int caption_cascade_graph_begin(void* graph) {
  return on_graph(graph, [](at::cuda::CUDAGraph& g) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (stream == c10::cuda::getDefaultCUDAStream()) {
      return -2;
    }
    // As torch.cuda.graph does: nothing queued before the capture may still be running in it.
    stream.synchronize();
    g.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    return 0;
  });
}

extern "C" int caption_cascade_graph_end(void* graph) {
  return on_graph(graph, [](at::cuda::CUDAGraph& g) {
    g.capture_end();
    return 0;
  });
}

extern "C" int caption_cascade_graph_replay(void* graph) {
  return on_graph(graph, [](at::cuda::CUDAGraph& g) {
    g.replay();
    return 0;
  });
}

extern "C" void caption_cascade_graph_free(void* graph) {
  try {
    delete static_cast<at::cuda::CUDAGraph*>(graph);
  } catch (...) {
  }
}
