//! Int8 linear layers (`--quantize int8`): the weight quantized once per output channel, each
//! input row quantized on the fly with a scale of its own, the product in int8 with exact int32
//! sums (libtorch's `_int_mm`), then scaled back to fp32.
//!
//! Per row rather than per tensor (PyTorch's `quantize_dynamic` takes one scale for the whole
//! input): a row's product then depends on that row alone, to the bit, whatever else is in the
//! batch, so int8 adds no dependence on batch mates (which would move a request's captions with
//! the load), and one row with large values does not coarsen its neighbours' grid. A decode step's
//! products are limited by reading their weights, and int8 weights are a quarter of fp32's:
//! docs/benchmark.md, Precision, has the speed and what it does to the captions.

use tch::{Device, Kind, Tensor};

use super::ModelError;

/// The largest magnitude on both grids: symmetric, so zero is exact and -128 is never used.
const LEVELS: f64 = 127.0;

/// Whether this libtorch computes int8 products on the CPU (every supported one does; kept as a
/// question so that startup can say so rather than fail on the first request).
pub fn available() -> bool {
    let a = Tensor::ones([1, 8], (Kind::Int8, Device::Cpu));
    let b = Tensor::ones([8, 8], (Kind::Int8, Device::Cpu));
    a.f_internal_int_mm(&b).is_ok()
}

/// Products of at most this many rows quantize and rescale in plain loops here: at a decode
/// step's few rows, a libtorch call per elementwise step costs more than the arithmetic.
const FEW_ROWS: usize = 64;
/// Larger products run in slices of this many rows, so their temporaries stay small (measured on
/// 4616 rows, BLIP's vision tower at 8 images: 3072→768 95 → 28 ms, 768→768 22 → 12 ms).
const SLICE_ROWS: i64 = 512;

/// A linear layer's weight in int8 with its per-output-channel scales, and its bias.
#[derive(Debug)]
pub struct Int8Weight {
    /// `[in, out]`: the transposed view of the `[out, in]` quantized weight.
    weight_t: Tensor,
    /// `[out]` fp32: the value of one step of each output channel's grid.
    scale: Tensor,
    bias: Option<Tensor>,
    /// The same scales and bias for the loops of few-row products.
    scale_values: Vec<f32>,
    bias_values: Option<Vec<f32>>,
}

impl Int8Weight {
    /// Quantizes `weight` (`[out, in]`, fp32 on the CPU): each output channel to integers in
    /// [-127, 127], its largest magnitude at 127.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self, ModelError> {
        if weight.device() != Device::Cpu || weight.kind() != Kind::Float {
            return Err(ModelError::Config("int8 linear layers take fp32 weights on the CPU".into()));
        }
        let scale = weight.abs().amax([1], true).clamp_min(f64::from(f32::MIN_POSITIVE)) / LEVELS;
        let quantized = (weight / &scale).round().to_kind(Kind::Int8);
        let scale = scale.squeeze_dim(1);
        let bias = bias.map(|b| b.to_kind(Kind::Float));
        Ok(Self {
            weight_t: quantized.tr(),
            scale_values: Vec::try_from(&scale)?,
            bias_values: bias.as_ref().map(Vec::try_from).transpose()?,
            scale,
            bias,
        })
    }

    /// `x·Wᵀ + b` for fp32 `x` of any leading dimensions, each row quantized on its own.
    ///
    /// Both paths below compute the same operations in the same order (the row's largest
    /// magnitude over 127, division, rounding half to even; then the exact int32 sums times the
    /// row's scale, times the channel's scale, plus the bias), so a row gets the same bits
    /// however many rows it comes with.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut size = x.size();
        let in_dim = *size.last().expect("1-d or more");
        let rows = x.reshape([-1, in_dim]).contiguous();
        let y = if rows.size()[0] as usize <= FEW_ROWS {
            self.few_rows(&rows)
        } else {
            Tensor::cat(&rows.split(SLICE_ROWS, 0).iter().map(|s| self.many_rows(s)).collect::<Vec<_>>(), 0)
        };
        *size.last_mut().expect("1-d or more") = y.size()[1];
        y.view(size.as_slice())
    }

    fn many_rows(&self, rows: &Tensor) -> Tensor {
        let row_scale = rows.abs().amax([1], true).clamp_min(f64::from(f32::MIN_POSITIVE)) / LEVELS;
        let quantized = (rows / &row_scale).round().to_kind(Kind::Int8);
        let mut y = quantized.internal_int_mm(&self.weight_t).to_kind(Kind::Float);
        let _ = y.g_mul_(&row_scale);
        let _ = y.g_mul_(&self.scale);
        if let Some(b) = &self.bias {
            let _ = y.g_add_(b);
        }
        y
    }

    fn few_rows(&self, rows: &Tensor) -> Tensor {
        let (m, k) = rows.size2().expect("rows are 2-d");
        let (m, k) = (m as usize, k as usize);
        let n = self.scale_values.len();
        let x = Vec::<f32>::try_from(rows.view(-1)).expect("fp32 rows");
        let mut quantized = vec![0i8; m * k];
        let mut row_scale = vec![0f32; m];
        for ((row, out), scale) in x.chunks_exact(k).zip(quantized.chunks_exact_mut(k)).zip(&mut row_scale) {
            let largest = row.iter().fold(0f32, |a, v| if v.abs() > a { v.abs() } else { a });
            *scale = largest.max(f32::MIN_POSITIVE) / LEVELS as f32;
            for (q, v) in out.iter_mut().zip(row) {
                *q = round_half_even(v / *scale) as i8;
            }
        }
        let sums = Tensor::from_slice(&quantized).view([m as i64, k as i64]).internal_int_mm(&self.weight_t);
        let sums = Vec::<i32>::try_from(sums.view(-1)).expect("int32 sums");
        let mut y = vec![0f32; m * n];
        for ((out, sums), row) in y.chunks_exact_mut(n).zip(sums.chunks_exact(n)).zip(&row_scale) {
            for ((o, s), channel) in out.iter_mut().zip(sums).zip(&self.scale_values) {
                *o = *s as f32 * row * channel;
            }
            if let Some(bias) = &self.bias_values {
                for (o, b) in out.iter_mut().zip(bias) {
                    *o += b;
                }
            }
        }
        Tensor::from_slice(&y).view([m as i64, n as i64])
    }
}

/// Rounds half to even (as libtorch's `round`) for |v| below 2²², in two additions the compiler
/// vectorizes: adding 1.5·2²³ leaves no fraction bits, so the sum is rounded in the FPU's
/// default mode, which is to nearest, ties to even. `f32::round_ties_even` is a call per value.
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random `[out, input]` weight of standard deviation `std`, and a random bias.
    fn random_layer(seed: i64, out: i64, input: i64, std: f64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let weight = Tensor::randn([out, input], (Kind::Float, Device::Cpu)) * std;
        (weight, Tensor::randn([out], (Kind::Float, Device::Cpu)))
    }

    /// Close to fp32's product: the weight on its per-channel grid, each row on its own.
    #[test]
    fn int8_products_are_close_to_fp32() {
        let (weight, bias) = random_layer(5, 300, 200, 0.05);
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

    /// Values already on both grids multiply exactly: integer weights whose row maximum is 127
    /// (scale 1) times inputs whose row maximum is 127.
    #[test]
    fn values_on_the_grids_multiply_exactly() {
        let weight = Tensor::from_slice(&[127f32, -3.0, 5.0, 0.0, -127.0, 64.0]).view([2, 3]);
        let x = Tensor::from_slice(&[1f32, 127.0, -2.0, 127.0, 0.0, 9.0]).view([2, 3]);
        let got = Int8Weight::new(&weight, None).unwrap().forward(&x);
        assert_eq!(got, x.linear::<Tensor>(&weight, None));
    }

    /// A row's result is the same bits whatever rows share its batch, even a row whose values
    /// are a thousand times larger (one scale per tensor would coarsen everyone's grid).
    #[test]
    fn a_row_computes_what_it_computes_alone() {
        let (weight, bias) = random_layer(6, 64, 32, 1.0);
        let layer = Int8Weight::new(&weight, Some(&bias)).unwrap();
        let row = Tensor::randn([1, 32], (Kind::Float, Device::Cpu));
        let loud = Tensor::randn([5, 32], (Kind::Float, Device::Cpu)) * 1000.0;
        let alone = layer.forward(&row);
        let batched = layer.forward(&Tensor::cat(&[&loud, &row, &loud], 0)).narrow(0, 5, 1);
        assert_eq!(alone, batched);
    }

    /// The loops for few rows and libtorch's passes for many give the same bits for a row.
    #[test]
    fn few_and_many_rows_agree_to_the_bit() {
        let (weight, bias) = random_layer(7, 96, 80, 0.1);
        for b in [None, Some(&bias)] {
            let layer = Int8Weight::new(&weight, b).unwrap();
            let x = Tensor::randn([600, 80], (Kind::Float, Device::Cpu)) * 3.0;
            let many = layer.forward(&x);
            for start in [0, 37, 511, 550] {
                let few = layer.forward(&x.narrow(0, start, 9));
                assert_eq!(few, many.narrow(0, start, 9), "rows {start}..{}", start + 9);
            }
        }
    }

    #[test]
    fn rounding_is_half_to_even() {
        for (v, want) in [(0.5f32, 0.0f32), (1.5, 2.0), (2.5, 2.0), (-0.5, -0.0), (-1.5, -2.0), (126.5, 126.0)] {
            assert_eq!(round_half_even(v), want, "{v}");
        }
        for i in -1270..=1270 {
            let v = i as f32 / 10.0 + 0.013;
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
    }

    #[test]
    fn only_fp32_cpu_weights_quantize() {
        let half = Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        assert!(Int8Weight::new(&half, None).is_err());
        assert!(available());
    }
}
