//! The few layers both models are built from, as plain structs over checkpoint tensors.

use tch::{Kind, Tensor};

use super::{int8::Int8Weight, mkl::PackedWeight, weights::Weights, ModelError};

#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight and bias in oneDNN's own layout, for [`Linear::packed`] layers.
    onednn: Option<(Tensor, Option<Tensor>)>,
    /// The weight packed by MKL, for [`Linear::packed_for_few_rows`] layers.
    mkl: Option<PackedWeight>,
    /// The weight and bias in int8, for layers built from [`Weights::int8_linears`] views; every
    /// product then goes through it.
    int8: Option<Int8Weight>,
}

impl Linear {
    pub fn new(w: &Weights, in_dim: i64, out_dim: i64) -> Result<Self, ModelError> {
        Self::from_parts(w.get("weight", &[out_dim, in_dim])?, Some(w.get("bias", &[out_dim])?)).quantized_as(w)
    }

    pub fn no_bias(w: &Weights, in_dim: i64, out_dim: i64) -> Result<Self, ModelError> {
        Self::from_parts(w.get("weight", &[out_dim, in_dim])?, None).quantized_as(w)
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, onednn: None, mkl: None, int8: None }
    }

    /// This layer with int8 weights where `w` asks for them ([`Weights::int8_linears`]).
    pub fn quantized_as(mut self, w: &Weights) -> Result<Self, ModelError> {
        if w.int8_linears() {
            self.int8 = Some(Int8Weight::new(&self.weight, self.bias.as_ref())?);
            // Every product now reads the int8 copy; the fp32 one would only take memory. (A
            // weight tied to an embedding stays alive through the embedding.)
            self.weight = Tensor::new();
        }
        Ok(self)
    }

    /// This layer computing through oneDNN with its weight kept in oneDNN's layout, where that
    /// is the faster path: fp32 on the CPU. There libtorch's own path hands the product to MKL,
    /// which re-packs the whole weight on every call; with the few rows of a decode step that
    /// packing costs more than the product (measured on BLIP's LM head, 30524×768: 18 → 8 ms
    /// for 10 rows, 46 → 30 ms for 80). The same numbers to float rounding.
    pub fn packed(mut self) -> Self {
        if self.int8.is_none()
            && self.weight.device() == tch::Device::Cpu
            && self.weight.kind() == Kind::Float
            && tch::utils::has_mkldnn()
        {
            self.onednn = Some((self.weight.to_mkldnn(), self.bias.as_ref().map(|b| b.to_mkldnn())));
        }
        self
    }

    /// This layer computing products of at most [`super::mkl::MAX_ROWS`] rows (a decode step's)
    /// from a copy of its weight that MKL packed once, where MKL is there: fp32 on the CPU.
    /// Larger products keep the other paths. The same numbers to float rounding.
    pub fn packed_for_few_rows(mut self) -> Self {
        if self.int8.is_none() {
            self.mkl = PackedWeight::new(&self.weight);
        }
        self
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if let Some(int8) = &self.int8 {
            return int8.forward(x);
        }
        if let Some(mkl) = &self.mkl {
            let size = x.size();
            let in_dim = *size.last().expect("1-d or more");
            let rows = x.numel() as i64 / in_dim.max(1);
            if rows <= super::mkl::MAX_ROWS && x.kind() == Kind::Float {
                let y = mkl.matmul(&x.reshape([rows, in_dim]), self.bias.as_ref());
                let mut out_size = size;
                *out_size.last_mut().expect("1-d or more") = y.size()[1];
                return y.view(out_size.as_slice());
            }
        }
        match &self.onednn {
            Some((weight, bias)) => {
                let mut size = x.size();
                let rows = x.contiguous().view([-1, *size.last().expect("1-d or more")]);
                let y = rows.to_mkldnn().mkldnn_linear(weight, bias.as_ref()).to_dense(None, false);
                *size.last_mut().expect("1-d or more") = y.size()[1];
                y.view(size.as_slice())
            }
            None => x.linear(&self.weight, self.bias.as_ref()),
        }
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(w: &Weights, dim: i64, eps: f64) -> Result<Self, ModelError> {
        Ok(Self { weight: w.get("weight", &[dim])?, bias: w.get("bias", &[dim])?, eps, dim })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(w: &Weights, count: i64, dim: i64) -> Result<Self, ModelError> {
        Ok(Self { weight: w.get("weight", &[count, dim])? })
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// Activation functions named by `hidden_act` in Hugging Face configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    GeluTanh,
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "quick_gelu" => Ok(Self::QuickGelu),
            "relu" => Ok(Self::Relu),
            other => Err(ModelError::Config(format!("unsupported hidden_act {other:?}"))),
        }
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Relu => x.relu(),
        }
    }
}

/// Scaled dot-product attention over `[batch, heads, len, head_dim]` tensors with an optional
/// additive mask broadcastable to `[batch, heads, q_len, k_len]`: `softmax(q·kᵀ·scale + mask)·v`,
/// through libtorch's fused kernel (flash attention on CPU and GPU), which never materialises the
/// scores in memory and accumulates reduced-precision inputs in fp32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale, false)
}

/// `[batch, len, heads*head_dim]` → `[batch, heads, len, head_dim]`.
pub fn split_heads(x: &Tensor, heads: i64) -> Tensor {
    let (b, l, d) = x.size3().expect("hidden states are 3-d");
    x.view([b, l, heads, d / heads]).transpose(1, 2)
}

/// `[batch, heads, len, head_dim]` → `[batch, len, heads*head_dim]`.
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (b, h, l, hd) = x.size4().expect("attention output is 4-d");
    x.transpose(1, 2).contiguous().view([b, l, h * hd])
}

/// `[len, past + len]`, true where a new token at position `past + i` may not attend (keys after
/// it): the causal pattern both text towers use.
pub fn causal_blocked(len: i64, past: i64, device: tch::Device) -> Tensor {
    let q = Tensor::arange_start(past, past + len, (Kind::Int64, device)).unsqueeze(1);
    let k = Tensor::arange(past + len, (Kind::Int64, device)).unsqueeze(0);
    k.gt_tensor(&q)
}
