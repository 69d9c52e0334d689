//! Int8 linear layers (`--quantize int8`): the weight quantized once per output channel, each
//! input row quantized on the fly with a scale of its own, the product in int8 with exact int32
//! sums (libtorch's `_int_mm`), then scaled back to fp32.
//!
//! Per row rather than per tensor (PyTorch's `quantize_dynamic` takes one scale for the whole
//! input): a row's product then depends on that row alone, to the bit, whatever else is in the
//! batch, so int8 adds no dependence on batch mates (which would move a request's captions with
//! the load), and one row with large values does not coarsen its neighbours' grid. A decode step's
//! products are limited by reading their weights, and int8 weights are a quarter of fp32's:
//! README, Precision, has the speed and what it does to the captions.

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

/// A linear layer's weight in int8 with its per-output-channel scales, and its bias.
#[derive(Debug)]
pub struct Int8Weight {
    /// `[in, out]`: the transposed view of the `[out, in]` quantized weight.
    weight_t: Tensor,
    /// `[out]` fp32: the value of one step of each output channel's grid.
    scale: Tensor,
    bias: Option<Tensor>,
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
        Ok(Self { weight_t: quantized.tr(), scale: scale.squeeze_dim(1), bias: bias.map(|b| b.to_kind(Kind::Float)) })
    }

    /// `x·Wᵀ + b` for fp32 `x` of any leading dimensions, each row quantized on its own.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut size = x.size();
        let in_dim = *size.last().expect("1-d or more");
        let rows = x.reshape([-1, in_dim]);
        let row_scale = rows.abs().amax([1], true).clamp_min(f64::from(f32::MIN_POSITIVE)) / LEVELS;
        let quantized = (&rows / &row_scale).round().to_kind(Kind::Int8);
        let sums = quantized.internal_int_mm(&self.weight_t).to_kind(Kind::Float);
        let step = row_scale * &self.scale;
        let y = match &self.bias {
            Some(b) => b.addcmul(&sums, &step),
            None => sums * step,
        };
        *size.last_mut().expect("1-d or more") = y.size()[1];
        y.view(size.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Close to fp32's product: the weight on its per-channel grid, each row on its own.
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
        tch::manual_seed(6);
        let weight = Tensor::randn([64, 32], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([64], (Kind::Float, Device::Cpu));
        let layer = Int8Weight::new(&weight, Some(&bias)).unwrap();
        let row = Tensor::randn([1, 32], (Kind::Float, Device::Cpu));
        let loud = Tensor::randn([5, 32], (Kind::Float, Device::Cpu)) * 1000.0;
        let alone = layer.forward(&row);
        let batched = layer.forward(&Tensor::cat(&[&loud, &row, &loud], 0)).narrow(0, 5, 1);
        assert_eq!(alone, batched);
    }

    #[test]
    fn only_fp32_cpu_weights_quantize() {
        let half = Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        assert!(Int8Weight::new(&half, None).is_err());
        assert!(available());
    }
}
