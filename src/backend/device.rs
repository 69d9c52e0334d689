//! Which libtorch device the models run on.

use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    Auto,
    Cpu,
    /// The first CUDA device; fails when none is available.
    Cuda,
}

impl DeviceChoice {
    pub fn resolve(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(Device::cuda_if_available()),
            Self::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            Self::Cuda => Err("--device cuda was asked for but libtorch sees no CUDA device".into()),
        }
    }
}

#[cfg(cuda_streams)]
extern "C" {
    fn caption_cascade_use_pool_stream(device: i32) -> i32;
}

/// Makes a CUDA stream from libtorch's pool current on the calling executor thread, so executors
/// run their batches concurrently instead of queueing on the default stream. Returns whether it
/// did; a build without the CUDA shim, or a CPU device, leaves the thread as it is.
pub fn use_own_stream(device: Device) -> bool {
    #[cfg(cuda_streams)]
    if let Device::Cuda(index) = device {
        // SAFETY: the shim takes a device index and only touches libtorch's thread-local stream.
        return unsafe { caption_cascade_use_pool_stream(index as i32) } == 0;
    }
    let _ = device;
    false
}

/// What each executor thread does before it takes work: takes its share of libtorch's CPU
/// threads and, on CUDA, binds its own stream, once for both models.
pub fn executor_init(device: Device, intra_op_threads: Option<i32>) -> impl Fn() + Send + Sync + 'static {
    move || {
        if let Some(n) = intra_op_threads {
            tch::set_num_threads(n);
        }
        if use_own_stream(device) {
            tracing::debug!(thread = ?std::thread::current().name(), "executor runs on its own CUDA stream");
        }
    }
}

/// Waits until weights copied to the GPU have landed, before executors on other streams read them.
pub fn settle(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}
