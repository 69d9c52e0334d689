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

// The major compute capability of `device` (8 and up compute bf16 natively); -1 when the runtime
// cannot tell (no such device), -2 when no CUDA runtime is loaded.
extern "C" int caption_cascade_cuda_capability_major(int device) {
  using GetAttribute = cudaError_t (*)(int*, cudaDeviceAttr, int);
  static const auto get = reinterpret_cast<GetAttribute>(dlsym(RTLD_DEFAULT, "cudaDeviceGetAttribute"));
  if (get == nullptr) {
    return -2;
  }
  int major = -1;
  if (get(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return -1;
  }
  return major;
}

// CUDA graphs of the row-wise parts of a decode step (see src/models/graphs.rs). A graph records
// what the calling thread's current stream runs between begin and end, and replays it there.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

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

namespace {
// One memory pool per executor thread, shared by every graph it captures (as vLLM shares one across
// its batch sizes): the graphs replay one at a time, in step order, on the executor's one stream,
// so the memory one piece uses in between is free for the next, and each output buffer stays
// owned by its graph. {0, 0}: none made yet on this thread.
thread_local at::cuda::MempoolId_t executor_pool{0, 0};
}  // namespace

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
    if (executor_pool.first == 0 && executor_pool.second == 0) {
      executor_pool = at::cuda::graph_pool_handle();
    }
    g.capture_begin(executor_pool, cudaStreamCaptureModeThreadLocal);
    return 0;
  });
}

// Ends a capture. When that fails, libtorch may leave the caching allocator routing this stream's
// allocations into the pool, and a graph whose capture did not end never gives its pool back:
// both are undone here, and the thread's next capture (if any) starts a new pool. The caller
// turns graphs off for the executor and frees its other graphs, which releases the rest.
extern "C" int caption_cascade_graph_end(void* graph) {
  int rc = on_graph(graph, [](at::cuda::CUDAGraph& g) {
    g.capture_end();
    return 0;
  });
  if (rc != 0) {
    auto device = c10::cuda::current_device();
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(device, executor_pool);
    } catch (...) {
    }
    try {
      c10::cuda::CUDACachingAllocator::releasePool(device, executor_pool);
    } catch (...) {
    }
    executor_pool = {0, 0};
  }
  return rc;
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
