//! MKL's packed-weight GEMM, found in the loaded libtorch at run time, for the few rows of a
//! decode step.
//!
//! libtorch hands `x·Wᵀ` to MKL's `sgemm`, which re-packs the whole weight into its kernel's
//! layout on every call. With the 10 rows of one image's candidates that packing costs as much as
//! the product. `cblas_sgemm_pack` does it once at load and `cblas_sgemm_compute` reuses it. The
//! packed copy is larger than the weight (MKL pads it to its blocks: 21 MB for a 768×3072 fp32
//! weight of 9.4 MB), so only the layers where it pays are packed.
//!
//! The functions are looked up with `dlsym` rather than linked: a libtorch built without MKL (or
//! not for x86) simply has none, and then nothing is packed.

use std::{ffi::c_void, sync::OnceLock};

use tch::{Device, Kind, Tensor};

// CBLAS enum values (mkl_cblas.h).
const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;
const PACKED: i32 = 151;
const B_MATRIX: i32 = 162;

type PackGetSize = unsafe extern "C" fn(identifier: i32, m: i32, n: i32, k: i32) -> usize;
#[allow(clippy::type_complexity)]
type Pack = unsafe extern "C" fn(
    layout: i32,
    identifier: i32,
    trans: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    src: *const f32,
    ld: i32,
    dest: *mut f32,
);
#[allow(clippy::type_complexity)]
type Compute = unsafe extern "C" fn(
    layout: i32,
    transa: i32,
    transb: i32,
    m: i32,
    n: i32,
    k: i32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

struct Mkl {
    get_size: PackGetSize,
    pack: Pack,
    compute: Compute,
}

fn mkl() -> Option<&'static Mkl> {
    static MKL: OnceLock<Option<Mkl>> = OnceLock::new();
    MKL.get_or_init(|| {
        let find = |name: &std::ffi::CStr| {
            // SAFETY: dlsym with RTLD_DEFAULT only searches the symbols already loaded.
            let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!f.is_null()).then_some(f)
        };
        let (get_size, pack, compute) =
            (find(c"cblas_sgemm_pack_get_size")?, find(c"cblas_sgemm_pack")?, find(c"cblas_sgemm_compute")?);
        // SAFETY: these are MKL's LP64 CBLAS entry points, whose signatures the types above copy.
        unsafe {
            Some(Mkl {
                get_size: std::mem::transmute::<*mut c_void, PackGetSize>(get_size),
                pack: std::mem::transmute::<*mut c_void, Pack>(pack),
                compute: std::mem::transmute::<*mut c_void, Compute>(compute),
            })
        }
    })
    .as_ref()
}

/// A `[out, in]` fp32 weight packed by MKL for `x·Wᵀ`.
#[derive(Debug)]
pub struct PackedWeight {
    /// MKL's buffer, owned as a byte tensor so it lives and dies with the layer. MKL's packed
    /// data must never move: a tensor's storage does not.
    buffer: Tensor,
    out_dim: i64,
    in_dim: i64,
}

/// The rows MKL packs for, and the most a product may have: MKL's contract ties the packed data
/// to the `m` of the packing call, so every product is padded to exactly this many rows. Beyond
/// it, plain `sgemm` is as fast (measured on 768×3072 and 3072×768 weights, 2 threads: packed
/// 1.8× faster at 10 rows, 1.2× at 16, 0.8–0.9× at 24 to 80).
pub const MAX_ROWS: i64 = 16;

impl PackedWeight {
    /// Packs `weight` (`[out, in]`, fp32, CPU); `None` where MKL is not in this libtorch or the
    /// weight is of another kind or device.
    pub fn new(weight: &Tensor) -> Option<Self> {
        let mkl = mkl()?;
        if weight.device() != Device::Cpu || weight.kind() != Kind::Float || weight.dim() != 2 {
            return None;
        }
        let (out_dim, in_dim) = weight.size2().ok()?;
        let (m, n, k) = (i32::try_from(MAX_ROWS).ok()?, i32::try_from(out_dim).ok()?, i32::try_from(in_dim).ok()?);
        let weight = weight.contiguous();
        // SAFETY: plain size query.
        let bytes = unsafe { (mkl.get_size)(B_MATRIX, m, n, k) };
        // f32 elements, so the buffer is aligned as MKL's float pointer needs.
        let buffer = Tensor::empty([(bytes as i64 + 3) / 4], (Kind::Float, Device::Cpu));
        // SAFETY: `weight` is a contiguous [n, k] fp32 matrix (B = Wᵀ, read transposed with ld = k)
        // and `buffer` holds the size MKL asked for.
        unsafe {
            (mkl.pack)(
                ROW_MAJOR,
                B_MATRIX,
                TRANS,
                m,
                n,
                k,
                1.0,
                weight.data_ptr() as *const f32,
                k,
                buffer.data_ptr() as *mut f32,
            );
        }
        Some(Self { buffer, out_dim, in_dim })
    }

    /// `rows·Wᵀ (+ bias)` for `rows` of `[m, in]` with `m ≤ MAX_ROWS`, fp32 on the CPU, padded
    /// with zero rows to `MAX_ROWS` (a memory-bound product: they cost next to nothing).
    pub fn matmul(&self, rows: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let mkl = mkl().expect("a PackedWeight exists only where MKL does");
        let m = rows.size()[0];
        assert!(m <= MAX_ROWS, "{m} rows for a weight packed for {MAX_ROWS}");
        let padded = MAX_ROWS;
        let a = if padded == m {
            rows.contiguous()
        } else {
            Tensor::cat(&[rows.contiguous(), Tensor::zeros([padded - m, self.in_dim], (Kind::Float, Device::Cpu))], 0)
        };
        let (out, beta) = match bias {
            Some(b) => (b.expand([padded, self.out_dim], false).contiguous(), 1.0),
            None => (Tensor::empty([padded, self.out_dim], (Kind::Float, Device::Cpu)), 0.0),
        };
        let (pm, n, k) = (padded as i32, self.out_dim as i32, self.in_dim as i32);
        // SAFETY: `a` is a contiguous [padded, k] fp32 matrix, `out` a contiguous [padded, n] one,
        // and `buffer` was packed for this n and k.
        unsafe {
            (mkl.compute)(
                ROW_MAJOR,
                NO_TRANS,
                PACKED,
                pm,
                n,
                k,
                a.data_ptr() as *const f32,
                k,
                self.buffer.data_ptr() as *const f32,
                n,
                beta,
                out.data_ptr() as *mut f32,
                n,
            );
        }
        if padded == m {
            out
        } else {
            out.narrow(0, 0, m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_products_equal_libtorch_linear() {
        if mkl().is_none() {
            eprintln!("this libtorch has no MKL: nothing is packed");
            return;
        }
        tch::manual_seed(3);
        let weight = Tensor::randn([300, 200], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([300], (Kind::Float, Device::Cpu));
        let packed = PackedWeight::new(&weight).expect("an fp32 CPU weight packs");
        for m in [1, 7, 10, MAX_ROWS] {
            let x = Tensor::randn([m, 200], (Kind::Float, Device::Cpu));
            for b in [None, Some(&bias)] {
                let want = x.linear(&weight, b);
                let got = packed.matmul(&x, b);
                assert_eq!(got.size(), want.size());
                let err = (got - &want).abs().max().double_value(&[]);
                assert!(err < 1e-4, "{m} rows, bias {}: max difference {err}", b.is_some());
            }
        }
    }

    #[test]
    fn only_fp32_cpu_weights_pack() {
        let half = Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        assert!(PackedWeight::new(&half).is_none());
    }
}
