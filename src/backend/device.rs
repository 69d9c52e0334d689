//! Which libtorch device the models run on, and in what precision.

use tch::{Device, Kind};

use crate::models::{graphs::GraphMode, int8, Numerics};

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

/// The precision the models compute in (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// 32-bit floats: the reference's numbers.
    Fp32,
    /// bfloat16 weights and activations (fp32 range, 8-bit mantissa).
    Bf16,
    /// IEEE half precision (GPUs; most CPUs emulate it slowly).
    Fp16,
    /// bf16 where the device computes it natively (CUDA compute capability 8+, x86 CPUs with
    /// AVX512-BF16 or AMX), fp16 on older GPUs, fp32 elsewhere.
    Auto,
}

impl Precision {
    /// The tensor kind for `device`; `auto` logs what it chose and why.
    pub fn resolve(self, device: Device) -> Kind {
        match self {
            Self::Fp32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
            Self::Fp16 => Kind::Half,
            Self::Auto => {
                let (kind, why) = match device {
                    Device::Cuda(index) => match cuda_capability(index) {
                        Some(major) if major >= 8 => (Kind::BFloat16, "the GPU computes bf16 natively"),
                        Some(_) => (Kind::Half, "the GPU predates bf16; fp16 it computes natively"),
                        None => (Kind::BFloat16, "the GPU's compute capability is unknown to this build"),
                    },
                    _ if cpu_has_bf16() => (Kind::BFloat16, "the CPU has AVX512-BF16 or AMX"),
                    _ => (Kind::Float, "the CPU has no native bf16 instructions"),
                };
                tracing::info!(?kind, why, "--dtype auto");
                kind
            }
        }
    }
}

/// Whether linear layers hold int8 weights (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    /// Weights in the `--dtype` precision.
    None,
    /// Every linear layer of both models with int8 weights (per output channel) and each input
    /// row quantized on the fly: CPU and fp32 only.
    Int8,
}

impl Quantize {
    /// The models' numerics for `device` and `--dtype`, or why the two do not go together.
    pub fn numerics(self, device: Device, dtype: Precision) -> Result<Numerics, String> {
        let kind = dtype.resolve(device);
        match self {
            Self::None => Ok(kind.into()),
            Self::Int8 if device != Device::Cpu => {
                Err("--quantize int8 runs on the CPU only (use --device cpu)".into())
            }
            Self::Int8 if kind != Kind::Float => Err(format!(
                "--quantize int8 computes from fp32 activations, but --dtype gives {kind:?} (use --dtype fp32)"
            )),
            Self::Int8 if !int8::available() => {
                Err("--quantize int8: this libtorch computes no int8 products on the CPU".into())
            }
            Self::Int8 => Ok(Numerics { int8_linears: true, ..kind.into() }),
        }
    }
}

/// Whether the CPU has bf16 dot-product instructions (what oneDNN's bf16 GEMMs run on), as the
/// kernel reports them.
fn cpu_has_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|flags| flags.split_whitespace().any(|f| f == "avx512_bf16" || f == "amx_bf16"))
    })
}

/// What of BLIP's one-token decode steps is replayed from CUDA graphs (`--cuda-graphs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CudaGraphs {
    /// Every kernel launched as it comes.
    #[default]
    #[value(alias = "false")]
    Off,
    /// The row-wise pieces between attentions (projections, norms, feed-forward, LM head).
    #[value(alias = "true")]
    Pieces,
    /// The whole greedy or sampled step: attentions over fixed-capacity caches, LM head,
    /// logits processing and sampling; beam steps run as `pieces`.
    Whole,
}

/// How BLIP's decode steps launch on `device` (`--cuda-graphs`), or why they cannot. Graphs are
/// captured on each executor's own stream, which only a build with the CUDA shim gives.
pub fn graph_mode(device: Device, cuda_graphs: CudaGraphs) -> Result<GraphMode, String> {
    let cuda_graphs = cuda_graphs != CudaGraphs::Off;
    match (cuda_graphs, device) {
        (false, _) => Ok(GraphMode::Off),
        (true, Device::Cuda(_)) if cfg!(cuda_streams) => Ok(GraphMode::Cuda),
        (true, Device::Cuda(_)) => {
            Err("--cuda-graphs: this build has no CUDA shim (its libtorch lacked CUDA headers)".into())
        }
        (true, _) => Err(format!("--cuda-graphs needs a CUDA device, and the models run on {device:?}")),
    }
}

#[cfg(cuda_streams)]
extern "C" {
    fn caption_cascade_cuda_capability_major(device: i32) -> i32;
}

/// The major CUDA compute capability of the device, where this build can ask.
fn cuda_capability(index: usize) -> Option<i32> {
    #[cfg(cuda_streams)]
    {
        // SAFETY: the shim asks the CUDA runtime one attribute and touches nothing else.
        let major = unsafe { caption_cascade_cuda_capability_major(index as i32) };
        return (major > 0).then_some(major);
    }
    #[allow(unreachable_code)]
    {
        let _ = index;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim finds the CUDA runtime libtorch loaded (-2 would say it did not) and asks it;
    /// without a GPU the runtime answers that it cannot tell (-1).
    #[cfg(cuda_streams)]
    #[test]
    fn capability_comes_from_the_cuda_runtime() {
        // SAFETY: as in `cuda_capability`.
        let raw = unsafe { caption_cascade_cuda_capability_major(0) };
        if tch::Cuda::is_available() {
            assert!(raw >= 3, "{raw}");
        } else {
            assert_eq!(raw, -1, "-2: no cudaDeviceGetAttribute found in the process");
        }
    }

    #[test]
    fn int8_goes_with_fp32_on_the_cpu_only() {
        let cpu = Quantize::Int8.numerics(Device::Cpu, Precision::Fp32);
        if int8::available() {
            assert_eq!(cpu, Ok(Numerics { int8_linears: true, ..Kind::Float.into() }));
        } else {
            assert!(cpu.unwrap_err().contains("no int8 products"));
        }
        let bf16 = Quantize::Int8.numerics(Device::Cpu, Precision::Bf16).unwrap_err();
        assert!(bf16.contains("--dtype fp32"), "{bf16}");
        let gpu = Quantize::Int8.numerics(Device::Cuda(0), Precision::Fp32).unwrap_err();
        assert!(gpu.contains("CPU only"), "{gpu}");
        assert_eq!(Quantize::None.numerics(Device::Cpu, Precision::Bf16), Ok(Kind::BFloat16.into()));
    }

    #[test]
    fn cuda_graphs_go_with_a_cuda_device_only() {
        assert_eq!(graph_mode(Device::Cpu, CudaGraphs::Off), Ok(GraphMode::Off));
        assert_eq!(graph_mode(Device::Cuda(0), CudaGraphs::Off), Ok(GraphMode::Off));
        for graphs in [CudaGraphs::Pieces, CudaGraphs::Whole] {
            let cpu = graph_mode(Device::Cpu, graphs).unwrap_err();
            assert!(cpu.contains("needs a CUDA device"), "{cpu}");
            let gpu = graph_mode(Device::Cuda(0), graphs);
            if cfg!(cuda_streams) {
                assert_eq!(gpu, Ok(GraphMode::Cuda));
            } else {
                assert!(gpu.unwrap_err().contains("no CUDA shim"));
            }
        }
    }
}
