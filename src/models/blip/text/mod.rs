//! BLIP's text decoder (`text_decoder.*`): a post-LN BERT whose every layer runs causal
//! self-attention, then cross-attention to the image, then the feed-forward block; and the LM head.
//!
//! The model holds no decode state. Callers own a [`SelfAttnCache`] per decode batch and a
//! [`CrossAttnCache`] per set of images. Cross-attention keys and values depend only on the image,
//! so they are computed once per image and shared by every candidate row of that image: rows are
//! grouped by image (`rows_per_image`), and each group's queries attend to one copy of its image's
//! keys and values.

mod cache;
mod cross;
mod whole;

use tch::{Kind, Tensor};

use cache::write_positions;
pub use cache::{CrossAttnCache, SelfAttnCache};
use cross::{grouped_cross_attention, ImageGroups};

pub use whole::{column, COLUMNS};

use super::{
    arena::{Arena, Capacity, DecoderShape},
    config::BlipTextConfig,
    slots::{SlotBuffers, StepSlots},
};
use crate::models::{
    graphs::{self, Body, GraphMode, Owner, WholeStep},
    nn::{attention, causal_blocked, merge_heads, split_heads, Activation, Embedding, LayerNorm, Linear},
    weights::Weights,
    ModelError,
};

#[derive(Debug)]
pub struct BlipTextDecoder {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<DecoderLayer>,
    head: LmHead,
    max_positions: i64,
    /// Width of the image features cross-attention reads.
    encoder_width: i64,
    graphs: GraphMode,
    /// The most rows a step may hold: [`capture_graphs`](Self::capture_graphs) covers them all.
    graph_rows: i64,
    /// What a whole-step graph's buffers hold, when one-token steps are captured whole.
    whole_step: Option<Capacity>,
    owner: Owner,
}

/// Graph pieces of a one-token step: the embeddings, three per layer, the LM head.
const EMBED_PIECE: u32 = 0;
const HEAD_PIECE: u32 = 1;
/// Runs a layer's piece `part` (0, 1, 2) on its inputs.
type Launch<'a> = &'a dyn Fn(u32, &[&Tensor], Body) -> Vec<Tensor>;

fn layer_piece(layer: usize, part: u32) -> u32 {
    2 + 3 * layer as u32 + part
}

#[derive(Debug)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: i64,
    scale: f64,
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: Attention,
    cross_attn: Attention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
}

#[derive(Debug)]
struct LmHead {
    transform: Linear,
    transform_norm: LayerNorm,
    act: Activation,
    decoder: Linear,
}

impl BlipTextDecoder {
    pub fn new(cfg: &BlipTextConfig, w: &Weights) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        if h % cfg.num_attention_heads != 0 {
            return Err(ModelError::Config(format!(
                "text_config: hidden_size {h} is not a multiple of num_attention_heads {}",
                cfg.num_attention_heads
            )));
        }
        let eps = cfg.layer_norm_eps;
        let act = Activation::from_name(&cfg.hidden_act)?;
        let bert = w.pp("bert");
        let emb = bert.pp("embeddings");
        let word_embeddings = Embedding::new(&emb.pp("word_embeddings"), cfg.vocab_size, h)?;
        let position_embeddings = Embedding::new(&emb.pp("position_embeddings"), cfg.max_position_embeddings, h)?;
        let embed_norm = LayerNorm::new(&emb.pp("LayerNorm"), h, eps)?;
        let scale = ((h / cfg.num_attention_heads) as f64).powf(-0.5);
        // Every product a decode step makes (a few rows each) reads its weight packed once;
        // cross-attention keys and values are computed once per image over all its patches.
        let few_rows = |l: Linear| l.packed_for_few_rows();
        let attn = |a: &Weights, kv_dim: i64, per_step_kv: bool| -> Result<Attention, ModelError> {
            let kv = |l: Linear| if per_step_kv { few_rows(l) } else { l };
            Ok(Attention {
                query: few_rows(Linear::new(&a.pp("self.query"), h, h)?),
                key: kv(Linear::new(&a.pp("self.key"), kv_dim, h)?),
                value: kv(Linear::new(&a.pp("self.value"), kv_dim, h)?),
                dense: few_rows(Linear::new(&a.pp("output.dense"), h, h)?),
                norm: LayerNorm::new(&a.pp("output.LayerNorm"), h, eps)?,
                heads: cfg.num_attention_heads,
                scale,
            })
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = bert.pp("encoder.layer").pp(i);
                Ok(DecoderLayer {
                    self_attn: attn(&l.pp("attention"), h, true)?,
                    cross_attn: attn(&l.pp("crossattention"), cfg.encoder_hidden_size, false)?,
                    intermediate: few_rows(Linear::new(&l.pp("intermediate.dense"), h, cfg.intermediate_size)?),
                    output: few_rows(Linear::new(&l.pp("output.dense"), cfg.intermediate_size, h)?),
                    output_norm: LayerNorm::new(&l.pp("output.LayerNorm"), h, eps)?,
                    act,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let p = w.pp("cls.predictions");
        // Published checkpoints tie the output projection to the word embeddings and often leave it
        // out of the file; its bias lives at `cls.predictions.bias`.
        let decoder_weight = if p.contains("decoder.weight") {
            p.pp("decoder").get("weight", &[cfg.vocab_size, h])?
        } else {
            word_embeddings.weight.shallow_clone()
        };
        let decoder_bias = if p.contains("bias") {
            p.get("bias", &[cfg.vocab_size])?
        } else {
            p.pp("decoder").get("bias", &[cfg.vocab_size])?
        };
        let head = LmHead {
            transform: few_rows(Linear::new(&p.pp("transform.dense"), h, h)?),
            transform_norm: LayerNorm::new(&p.pp("transform.LayerNorm"), h, eps)?,
            act,
            decoder: Linear::from_parts(decoder_weight, Some(decoder_bias))
                .quantized_as(&p)?
                .packed()
                .packed_for_few_rows(),
        };
        Ok(Self {
            word_embeddings,
            position_embeddings,
            embed_norm,
            layers,
            head,
            max_positions: cfg.max_position_embeddings,
            encoder_width: cfg.encoder_hidden_size,
            graphs: GraphMode::Off,
            graph_rows: graphs::MAX_ROWS,
            whole_step: None,
            owner: Owner::new(),
        })
    }

    /// How one-token decode steps launch their row-wise pieces (see [`graphs`]).
    pub fn set_graph_mode(&mut self, mode: GraphMode) {
        self.graphs = mode;
    }

    pub fn graph_mode(&self) -> GraphMode {
        self.graphs
    }

    /// The most rows a decode step may hold (`--generate-max-batch` × `--max-candidates`).
    pub fn set_graph_rows(&mut self, rows: i64) {
        self.graph_rows = rows;
    }

    /// Captures greedy and sampled one-token steps whole, over buffers made for `limits` with
    /// `patches` image patches per image and the rows [`set_graph_rows`](Self::set_graph_rows)
    /// gave (so it is set first); `None`: piece by piece.
    pub fn set_whole_step(&mut self, limits: Option<WholeStep>, patches: i64) {
        self.whole_step = limits.map(|l| Capacity::new(self.graph_rows, l, patches, self.max_positions));
    }

    /// What a whole step's buffers hold, when steps are captured whole and graphs are on.
    pub fn whole_step(&self) -> Option<Capacity> {
        self.whole_step.filter(|_| self.graphs != GraphMode::Off)
    }

    /// This model's identity among the graphs and arenas of an executor.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Empty whole-step buffers for `capacity`.
    pub fn new_arena(&self, capacity: Capacity) -> Arena {
        let heads = self.layers[0].self_attn.heads;
        let weight = &self.word_embeddings.weight;
        let shape = DecoderShape {
            layers: self.layers.len(),
            heads,
            head_dim: weight.size()[1] / heads,
            vocab: self.vocab_size(),
            kind: self.kind(),
            device: weight.device(),
        };
        Arena::new(capacity, shape)
    }

    /// Captures every piece of a one-token step at every row bucket up to the most rows a step
    /// may hold, on this executor, so serving never stops for a capture; returns the buckets
    /// covered. It runs one step of padding rows per bucket: a graph depends only on its shapes,
    /// never on its inputs' values. A capture that fails turns graphs off for the executor, as in
    /// serving ([`graphs::run`]).
    pub fn capture_graphs(&self) -> usize {
        if self.graphs == GraphMode::Off {
            return 0;
        }
        let _no_grad = tch::no_grad_guard();
        let (kind, device) = (self.kind(), self.word_embeddings.weight.device());
        let cross = self.cross_attn_cache(&Tensor::zeros([1, 1, self.encoder_width], (kind, device)));
        let buckets = graphs::buckets_up_to(self.graph_rows);
        for &rows in &buckets {
            let zeros = Tensor::zeros([rows, 1], (Kind::Int64, device));
            let hidden = self.forward_at(&zeros, &zeros, &mut SelfAttnCache::default(), &cross, &[rows], None);
            let _ = self.next_token_logits(&hidden);
        }
        buckets.len()
    }

    /// The graph mode of a step that runs `len` tokens per row: prompts of every length arrive
    /// in first steps, and only one-token steps repeat their shapes.
    fn graph_mode_for(&self, len: i64) -> GraphMode {
        if len == 1 {
            self.graphs
        } else {
            GraphMode::Off
        }
    }

    pub fn max_positions(&self) -> i64 {
        self.max_positions
    }

    pub fn kind(&self) -> Kind {
        self.word_embeddings.weight.kind()
    }

    pub fn vocab_size(&self) -> i64 {
        self.word_embeddings.weight.size()[0]
    }

    /// Cross-attention keys and values of each layer for `image_embeds` `[images, patches, width]`.
    pub fn cross_attn_cache(&self, image_embeds: &Tensor) -> CrossAttnCache {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.cross_attn;
                (
                    split_heads(&a.key.forward(image_embeds), a.heads),
                    split_heads(&a.value.forward(image_embeds), a.heads),
                )
            })
            .collect();
        CrossAttnCache { layers }
    }

    /// Runs `ids` `[rows, len]` that follow `cache.past_len()` earlier tokens in every row; appends
    /// their keys and values to `cache` and returns the last layer's hidden states `[rows, len, hidden]`.
    ///
    /// Rows are grouped by image: the first `rows_per_image[0]` rows belong to image 0 of `cross`,
    /// and so on. `self_mask`, when given, is an additive mask `[rows, 1, len, past + len]`;
    /// without it a causal mask is used.
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: &mut SelfAttnCache,
        cross: &CrossAttnCache,
        rows_per_image: &[i64],
        self_mask: Option<&Tensor>,
    ) -> Tensor {
        let (rows, len) = ids.size2().expect("ids are [rows, len]");
        let past = cache.past_len();
        let positions =
            Tensor::arange_start(past, past + len, (Kind::Int64, ids.device())).unsqueeze(0).expand([rows, len], false);
        self.forward_at(ids, &positions, cache, cross, rows_per_image, self_mask)
    }

    /// As [`forward`](Self::forward), with explicit position ids `[rows, len]`: rows whose caches
    /// are left-padded (they joined a running batch later) are at positions of their own.
    pub fn forward_at(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &mut SelfAttnCache,
        cross: &CrossAttnCache,
        rows_per_image: &[i64],
        self_mask: Option<&Tensor>,
    ) -> Tensor {
        let (_, len) = ids.size2().expect("ids are [rows, len]");
        let past = cache.past_len();
        let mode = self.graph_mode_for(len);
        let piece = |id: u32, inputs: &[&Tensor], f: Body| graphs::run(mode, self.owner, id, inputs, f);
        let mut x = piece(EMBED_PIECE, &[ids, positions], &|t| vec![self.embed(t[0], t[1])]).remove(0);
        let causal;
        let mask = match self_mask {
            Some(m) => Some(m),
            None if len > 1 => {
                causal = causal_mask(len, past, x.kind(), x.device());
                Some(&causal)
            }
            None => None,
        };
        if cache.layers.is_empty() {
            cache.layers = self.layers.iter().map(|_| (Tensor::new(), Tensor::new())).collect();
        }
        let groups = ImageGroups::new(rows_per_image, x.device());
        let reserve = cache.reserve;
        for (i, layer) in self.layers.iter().enumerate() {
            let (k_past, v_past) = &mut cache.layers[i];
            let (ck, cv) = &cross.layers[i];
            let part = |p: u32, inputs: &[&Tensor], f: Body| piece(layer_piece(i, p), inputs, f);
            let mut self_attend = |q: &Tensor, k: &Tensor, v: &Tensor, scale: f64| {
                let k = write_positions(k_past, past, k, reserve);
                let v = write_positions(v_past, past, v, reserve);
                attention(q, &k, &v, mask, scale)
            };
            let cross_attend = |q: &Tensor, scale: f64| grouped_cross_attention(q, ck, cv, &groups, scale);
            x = layer.forward(&x, &mut self_attend, &cross_attend, &part);
        }
        cache.len = past + len;
        x
    }

    /// A one-token step of a batch held in slots (see [`slots`](super::slots)): `ids` and
    /// `positions` `[rows, 1]` of its live rows; writes each row's keys and values at its slot
    /// and position in `cache` and returns the last layer's hidden states `[rows, 1, hidden]`.
    /// The row-wise pieces run on the live rows alone; the attentions read the slots `slots`
    /// names, dead ones masked.
    pub fn forward_slots(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &mut SlotBuffers,
        cross: &SlotBuffers,
        slots: &StepSlots,
    ) -> Tensor {
        let mode = self.graph_mode_for(1);
        let piece = |id: u32, inputs: &[&Tensor], f: Body| graphs::run(mode, self.owner, id, inputs, f);
        let mut x = piece(EMBED_PIECE, &[ids, positions], &|t| vec![self.embed(t[0], t[1])]).remove(0);
        let groups = ImageGroups {
            images: slots.images_used,
            widest: slots.widest,
            slots: slots.cross_slots.as_ref().map(Tensor::shallow_clone),
        };
        let at = [Some(&slots.write_slots), None, Some(&slots.write_positions)];
        for (i, layer) in self.layers.iter().enumerate() {
            let (k_buf, v_buf) = &mut cache.layers_mut()[i];
            let (ck, cv) = &cross.layers()[i];
            let (ck, cv) = (ck.narrow(0, 0, slots.images_used), cv.narrow(0, 0, slots.images_used));
            let part = |p: u32, inputs: &[&Tensor], f: Body| piece(layer_piece(i, p), inputs, f);
            let mut self_attend = |q: &Tensor, k: &Tensor, v: &Tensor, scale: f64| {
                let _ = k_buf.index_put_(&at, &k.squeeze_dim(2), false);
                let _ = v_buf.index_put_(&at, &v.squeeze_dim(2), false);
                let used = slots.rows_used;
                let k = k_buf.narrow(0, 0, used).narrow(2, 0, slots.width);
                let v = v_buf.narrow(0, 0, used).narrow(2, 0, slots.width);
                match &slots.row_slots {
                    None => attention(q, &k, &v, slots.mask.as_ref(), scale),
                    Some(idx) => {
                        // Live queries at their slots, zeros at dead ones: the cache is read in
                        // place, never gathered per row.
                        let mut size = q.size();
                        size[0] = used;
                        let padded = q.new_zeros(size.as_slice(), (q.kind(), q.device())).index_copy(0, idx, q);
                        attention(&padded, &k, &v, slots.mask.as_ref(), scale).index_select(0, idx)
                    }
                }
            };
            let cross_attend = |q: &Tensor, scale: f64| grouped_cross_attention(q, &ck, &cv, &groups, scale);
            x = layer.forward(&x, &mut self_attend, &cross_attend, &part);
        }
        x
    }

    /// Normalised token and position embeddings of `ids` at `positions` (both `[rows, len]`).
    fn embed(&self, ids: &Tensor, positions: &Tensor) -> Tensor {
        self.embed_norm.forward(&(self.word_embeddings.forward(ids) + self.position_embeddings.forward(positions)))
    }

    /// Logits `[rows, vocab]` from hidden states `[rows, hidden]`.
    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        let head = &self.head;
        head.decoder.forward(&head.transform_norm.forward(&head.act.forward(&head.transform.forward(hidden))))
    }

    /// Next-token logits `[rows, vocab]` from the hidden state of each row's last position.
    pub fn next_token_logits(&self, hidden: &Tensor) -> Tensor {
        let len = hidden.size()[1];
        let last = hidden.select(1, len - 1);
        graphs::run(self.graph_mode_for(len), self.owner, HEAD_PIECE, &[&last], &|t| vec![self.lm_head(t[0])]).remove(0)
    }
}

/// A layer's self-attention: queries, the step's new keys and values, and the scale give the
/// attention output, the cache updated on the way.
type SelfAttend<'a> = &'a mut dyn FnMut(&Tensor, &Tensor, &Tensor, f64) -> Tensor;
/// A layer's cross-attention: queries and the scale give the attention output.
type CrossAttend<'a> = &'a dyn Fn(&Tensor, f64) -> Tensor;

impl DecoderLayer {
    fn forward(&self, x: &Tensor, self_attend: SelfAttend, cross_attend: CrossAttend, piece: Launch) -> Tensor {
        // Three row-wise pieces, with the two attentions (whose shapes follow the cache and the
        // image groups) between them.
        let (a, c) = (&self.self_attn, &self.cross_attn);
        let qkv = piece(0, &[x], &|t| vec![a.query.forward(t[0]), a.key.forward(t[0]), a.value.forward(t[0])]);
        let split = |t: &Tensor| split_heads(t, a.heads);
        let ctx = self_attend(&split(&qkv[0]), &split(&qkv[1]), &split(&qkv[2]), a.scale);

        let after_self = piece(1, &[&ctx, x], &|t| {
            let x = a.norm.forward(&(a.dense.forward(&merge_heads(t[0])) + t[1]));
            vec![c.query.forward(&x), x]
        });
        let ctx = cross_attend(&split_heads(&after_self[0], c.heads), c.scale);

        piece(2, &[&ctx, &after_self[1]], &|t| {
            let x = c.norm.forward(&(c.dense.forward(&merge_heads(t[0])) + t[1]));
            let h = self.output.forward(&self.act.forward(&self.intermediate.forward(&x)));
            vec![self.output_norm.forward(&(h + &x))]
        })
        .remove(0)
    }
}

/// Additive causal mask `[1, 1, len, past + len]` for new tokens that follow `past` cached ones.
fn causal_mask(len: i64, past: i64, kind: Kind, device: tch::Device) -> Tensor {
    let blocked = causal_blocked(len, past, device);
    Tensor::zeros([len, past + len], (kind, device)).masked_fill(&blocked, f64::NEG_INFINITY).view([
        1,
        1,
        len,
        past + len,
    ])
}
