//! Int8 linear layers (`--quantize int8`): the weight quantized once per output channel, each
//! input quantized on the fly, through libtorch's quantized CPU engine by way of the C++ shim
//! (`csrc/int8_linear.cpp`). The numbers are those of PyTorch's `quantize_dynamic` with its
//! per-channel weight observer.
//!
//! A decode step's products are limited by reading their weights, and int8 weights are a quarter
//! of fp32's: README, Precision, has the speed and what it does to the captions.

use tch::{Device, Kind, Tensor};

use super::ModelError;

/// Whether this build has the shim (libtorch's headers were found when it was compiled).
pub fn available() -> bool {
    cfg!(int8_linear)
}

/// A `[out, in]` weight and its bias, quantized and packed for the CPU's quantized engine.
#[derive(Debug)]
pub struct Int8Weight {
    #[cfg_attr(not(int8_linear), allow(dead_code))]
    packed: Packed,
}

#[derive(Debug)]
struct Packed(*mut std::ffi::c_void);

// SAFETY: the handle owns libtorch's packed parameters, which are read-only after packing;
// libtorch's quantized linear reads them from any thread (as quantized models served from
// several threads do), and the handle is freed once, by its owner.
unsafe impl Send for Packed {}
unsafe impl Sync for Packed {}

#[cfg(int8_linear)]
mod shim {
    use std::ffi::{c_char, c_void};

    // Tensors cross as `at::Tensor*`: what a tch tensor's pointer points at.
    extern "C" {
        pub fn caption_cascade_int8_pack(
            weight: *const c_void,
            bias: *const c_void,
            error: *mut c_char,
            capacity: usize,
        ) -> *mut c_void;
        pub fn caption_cascade_int8_linear(
            input: *const c_void,
            packed: *const c_void,
            error: *mut c_char,
            capacity: usize,
        ) -> *mut c_void;
        pub fn caption_cascade_int8_free(packed: *mut c_void);
    }
}

impl Drop for Packed {
    fn drop(&mut self) {
        #[cfg(int8_linear)]
        // SAFETY: the pointer came from caption_cascade_int8_pack and is freed only here.
        unsafe {
            shim::caption_cascade_int8_free(self.0)
        }
    }
}

const ERROR_CAPACITY: usize = 512;

fn message(buffer: &[u8]) -> String {
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).lines().next().unwrap_or_default().to_string()
}

impl Int8Weight {
    /// Quantizes and packs `weight` (`[out, in]`) and `bias` (`[out]`), both on the CPU.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self, ModelError> {
        if weight.device() != Device::Cpu {
            return Err(ModelError::Config("int8 linear layers run on the CPU only".into()));
        }
        #[cfg(int8_linear)]
        {
            let mut error = [0u8; ERROR_CAPACITY];
            let bias = bias.map(|b| b.shallow_clone());
            // SAFETY: tch's tensors point at `at::Tensor`s, which the shim reads and does not keep;
            // `error` holds ERROR_CAPACITY bytes.
            let handle = unsafe {
                shim::caption_cascade_int8_pack(
                    weight.as_ptr().cast(),
                    bias.as_ref().map_or(std::ptr::null(), |b| b.as_ptr().cast()),
                    error.as_mut_ptr().cast(),
                    ERROR_CAPACITY,
                )
            };
            if handle.is_null() {
                return Err(ModelError::Config(format!("cannot quantize a linear layer: {}", message(&error))));
            }
            Ok(Self { packed: Packed(handle) })
        }
        #[cfg(not(int8_linear))]
        {
            let _ = (bias, message(&[]));
            Err(ModelError::Config("this build has no int8 support (libtorch's headers were missing)".into()))
        }
    }

    /// `x·Wᵀ + b` for fp32 `x` of any leading dimensions.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        debug_assert_eq!(x.kind(), Kind::Float, "int8 layers take fp32 inputs");
        #[cfg(int8_linear)]
        {
            let mut error = [0u8; ERROR_CAPACITY];
            let x = x.contiguous();
            // SAFETY: as in `new`; the returned pointer is a new `at::Tensor` whose ownership
            // passes to the tch tensor.
            let out = unsafe {
                shim::caption_cascade_int8_linear(
                    x.as_ptr().cast(),
                    self.packed.0,
                    error.as_mut_ptr().cast(),
                    ERROR_CAPACITY,
                )
            };
            // Shapes and kinds were fixed at load, so a failure here is a broken invariant, as a
            // failing libtorch call is everywhere else in the models.
            assert!(!out.is_null(), "int8 linear failed: {}", message(&error));
            // SAFETY: see above.
            unsafe { Tensor::from_ptr(out.cast()) }
        }
        #[cfg(not(int8_linear))]
        {
            let _ = x;
            unreachable!("an Int8Weight exists only where the shim does")
        }
    }
}

#[cfg(all(test, int8_linear))]
mod tests {
    use super::*;

    /// The product is that of the weight rounded to its per-channel int8 grid and the input
    /// rounded to its per-tensor 7-bit grid: close to fp32's, and closer as rows get smoother.
    #[test]
    fn int8_products_are_close_to_fp32() {
        tch::manual_seed(5);
        let weight = Tensor::randn([300, 200], (Kind::Float, Device::Cpu)) * 0.05;
        let bias = Tensor::randn([300], (Kind::Float, Device::Cpu));
        for b in [None, Some(&bias)] {
            let layer = Int8Weight::new(&weight, b).unwrap();
            for shape in [vec![1, 200], vec![10, 200], vec![2, 7, 200]] {
                let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
                let want = x.linear(&weight, b);
                let got = layer.forward(&x);
                assert_eq!(got.size(), want.size());
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                assert!(err < 0.03 * scale, "{shape:?}: max difference {err} of {scale}");
                assert!(err > 0.0, "int8 products equal fp32 exactly: nothing was quantized");
            }
        }
    }

    #[test]
    fn gpu_weights_are_refused() {
        if !tch::Cuda::is_available() {
            return;
        }
        let w = Tensor::randn([4, 4], (Kind::Float, Device::Cuda(0)));
        assert!(Int8Weight::new(&w, None).is_err());
    }
}
