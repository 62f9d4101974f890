//! The LLaMA forward pass, written top to bottom like the math (Hugging Face `LlamaForCausalLM`).
//!
//! Every op here carries gradients in candle (exp, sum, narrow, cat…, and the linear layers' product in
//! `linear.rs`), so the training code builds the very same graph on top of `Var`s. candle's fused `rms_norm`,
//! `softmax_last_dim` and `rope` kernels are faster but silently stop gradients: not used here.

use candle_core::{DType, Device, Tensor, D};
use vicuna_weights::LlamaConfig;

use crate::fused::{causal_attention, rms_norm, rotary, swiglu};
use crate::linear::linear;
use crate::{Error, Result};

/// One decoder layer's weights. Linear weights keep PyTorch's `[out, in]` layout.
pub struct Layer {
    pub input_layernorm: Tensor,
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
}

/// `LlamaForCausalLM`: token embeddings, a stack of decoder layers, a final norm and the lm_head.
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// Equal to `embed_tokens` when the config ties them.
    pub lm_head: Tensor,
    rope: Rope,
}

/// Keys and values of every position seen so far, per layer: `[batch, kv_heads, positions, head_dim]`,
/// in buffers that grow by doubling, so a decoding step writes one position in place instead of
/// copying the whole history. Writes are in place and carry no gradient: training runs full passes
/// without a cache.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &LlamaConfig) -> Self {
        KvCache { layers: vec![None; config.num_hidden_layers], len: 0 }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Bytes held by the buffers (for accounting).
    pub fn capacity_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }

    /// Write this step's keys/values after the cached positions of layer `i` and return all of
    /// them. The position count advances once the last layer has written.
    fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, kvh, seq, d) = k.dims4()?;
        let total = self.len + seq;
        let capacity = self.layers[i].as_ref().map_or(0, |(k, _)| k.dims()[2]);
        if total > capacity {
            let new_capacity = total.max(2 * capacity).max(64);
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, kvh, new_capacity, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let old = self.layers[i].take();
            self.layers[i] = Some((grow(old.as_ref().map(|(k, _)| k))?, grow(old.as_ref().map(|(_, v)| v))?));
        }
        let (kbuf, vbuf) = self.layers[i].as_ref().expect("allocated above");
        kbuf.slice_set(&k.contiguous()?, 2, self.len)?;
        vbuf.slice_set(&v.contiguous()?, 2, self.len)?;
        let out = (kbuf.narrow(2, 0, total)?, vbuf.narrow(2, 0, total)?);
        if i + 1 == self.layers.len() {
            self.len = total;
        }
        Ok(out)
    }
}

/// Rows of a batch that belong to one sequence: `len` new positions continuing after what its
/// cache holds (or starting at position 0 without a cache).
pub(crate) struct Segment<'a> {
    pub len: usize,
    pub cache: Option<&'a mut KvCache>,
}

/// Rotary position embedding tables in Hugging Face's rotate_half layout: dimension `i` is paired
/// with `i + head_dim/2`, and both halves share frequency `theta^(-2i/head_dim)`.
struct Rope {
    /// `[max_positions, head_dim]`
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(config: &LlamaConfig, device: &Device) -> Result<Self> {
        let head_dim = config.head_dim;
        let max_pos = config.max_position_embeddings;
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * head_dim);
        let mut sin = Vec::with_capacity(max_pos * head_dim);
        for pos in 0..max_pos {
            // transformers computes inv_freq and the angle in f32; f64 here then rounding once
            // agrees with it to ~1e-7 and removes any drift at long positions.
            let row: Vec<f64> = (0..half)
                .map(|i| {
                    let inv_freq = 1.0 / config.rope_theta.powf((2 * i) as f64 / head_dim as f64);
                    pos as f64 * inv_freq
                })
                .collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos() as f32));
                sin.extend(row.iter().map(|a| a.sin() as f32));
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_pos, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max_pos, head_dim), device)?,
        })
    }

    /// Rotate `x: [batch, heads, seq, head_dim]` whose first position is `offset`.
    fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        rotary(x, &self.cos.narrow(0, offset, seq)?, &self.sin.narrow(0, offset, seq)?)
    }
}

/// Softmax over the last dimension, built from differentiable ops (max-subtracted for stability).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

impl Llama {
    /// Build the model, asking `weight(name, shape)` for each tensor (a checkpoint, or training
    /// variables). The config's shapes are enforced here so a wrong tensor fails loudly.
    pub fn new(
        config: &LlamaConfig,
        device: &Device,
        mut weight: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        let h = config.hidden_size;
        let kv = config.num_key_value_heads * config.head_dim;
        let q = config.num_attention_heads * config.head_dim;
        let i = config.intermediate_size;
        let mut get = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = weight(&name, shape)?;
            if t.dims() != shape {
                return Err(Error::msg(format!(
                    "tensor {name} has shape {:?} but config.json implies {shape:?}",
                    t.dims()
                )));
            }
            Ok(t)
        };
        let embed_tokens = get("model.embed_tokens.weight".into(), &[config.vocab_size, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_layernorm: get(format!("{p}.input_layernorm.weight"), &[h])?,
                q_proj: get(format!("{p}.self_attn.q_proj.weight"), &[q, h])?,
                k_proj: get(format!("{p}.self_attn.k_proj.weight"), &[kv, h])?,
                v_proj: get(format!("{p}.self_attn.v_proj.weight"), &[kv, h])?,
                o_proj: get(format!("{p}.self_attn.o_proj.weight"), &[h, q])?,
                post_attention_layernorm: get(format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_proj: get(format!("{p}.mlp.gate_proj.weight"), &[i, h])?,
                up_proj: get(format!("{p}.mlp.up_proj.weight"), &[i, h])?,
                down_proj: get(format!("{p}.mlp.down_proj.weight"), &[h, i])?,
            });
        }
        let norm = get("model.norm.weight".into(), &[h])?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            get("lm_head.weight".into(), &[config.vocab_size, h])?
        };
        Ok(Llama { config: config.clone(), embed_tokens, layers, norm, lm_head, rope: Rope::new(config, device)? })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Final normalized hidden states `[batch, seq, hidden]` for `ids: [batch, seq]` (u32).
    /// With a cache, the positions continue after the cached ones and are added to it; without
    /// one, this is a full pass from position 0 whose every op carries gradients (training).
    pub fn forward_hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let x = self.embed_tokens.embedding(&ids.flatten_all()?)?.reshape((batch, seq, ()))?;
        self.decoder(x, &mut [Segment { len: seq, cache }])
    }

    /// Logits `[batch, seq, vocab]` from final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(hidden, &self.lm_head)
    }

    /// Logits for every new position: `forward_hidden` then `logits`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.logits(&self.forward_hidden(ids, cache)?)
    }

    /// Logits of the last position only, as a `Vec<f32>` (batch 1): the decoding step.
    pub fn next_token_logits(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let mut logits = self.forward_ragged(&mut [(ids, cache)])?;
        Ok(logits.pop().expect("one sequence in, one out"))
    }

    /// One step for several sequences at once, each with its own cache and any number of new
    /// tokens (a decoding step is 1, a prompt chunk more): the weights are read once for all
    /// rows, attention runs per sequence. Returns each sequence's last-position logits.
    pub fn forward_ragged(&self, sequences: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<Vec<f32>>> {
        let mut all_ids = Vec::new();
        for (ids, _) in sequences.iter() {
            self.check_ids(ids)?;
            all_ids.extend_from_slice(ids);
        }
        let input = Tensor::new(all_ids.as_slice(), self.device())?;
        let x = self.embed_tokens.embedding(&input)?.unsqueeze(0)?;
        let mut segments: Vec<Segment> =
            sequences.iter_mut().map(|(ids, cache)| Segment { len: ids.len(), cache: Some(&mut **cache) }).collect();
        let hidden = self.decoder(x, &mut segments)?;
        // Only each sequence's last row goes through the (large) lm_head.
        let mut last_rows = Vec::with_capacity(sequences.len());
        let mut end = 0;
        for (ids, _) in sequences.iter() {
            end += ids.len();
            last_rows.push(hidden.narrow(1, end - 1, 1)?);
        }
        let logits = self.logits(&Tensor::cat(&last_rows, 1)?)?.squeeze(0)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }

    /// Every id must index the embedding table; a bad id is the caller's input error.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        crate::check_ids(ids, self.config.vocab_size)
    }

    /// The decoder stack over `x: [batch, rows, hidden]`, whose rows are split into `segments`
    /// (one per sequence), then the final norm.
    fn decoder(&self, mut x: Tensor, segments: &mut [Segment]) -> Result<Tensor> {
        for segment in segments.iter() {
            let total = segment.cache.as_ref().map_or(0, |c| c.len()) + segment.len;
            if total > self.config.max_position_embeddings {
                return Err(Error::msg(format!(
                    "sequence of {total} tokens exceeds the model's context of {} (max_position_embeddings)",
                    self.config.max_position_embeddings
                )));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&x, &layer.input_layernorm, self.config.rms_norm_eps)?;
            x = (x + self.attention(i, layer, &normed, segments)?)?;
            let normed = rms_norm(&x, &layer.post_attention_layernorm, self.config.rms_norm_eps)?;
            x = (x + mlp(layer, &normed)?)?;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    fn attention(&self, index: usize, layer: &Layer, x: &Tensor, segments: &mut [Segment]) -> Result<Tensor> {
        let q_all = linear(x, &layer.q_proj)?;
        let k_all = linear(x, &layer.k_proj)?;
        let v_all = linear(x, &layer.v_proj)?;
        let mut outputs = Vec::with_capacity(segments.len());
        let mut start = 0;
        for segment in segments.iter_mut() {
            let rows = |t: &Tensor| t.narrow(1, start, segment.len);
            let out =
                self.attend(index, &rows(&q_all)?, &rows(&k_all)?, &rows(&v_all)?, segment.cache.as_deref_mut())?;
            outputs.push(out);
            start += segment.len;
        }
        let out = if outputs.len() == 1 { outputs.pop().expect("one segment") } else { Tensor::cat(&outputs, 1)? };
        linear(&out, &layer.o_proj)
    }

    /// Causal self-attention of one sequence's rows: `q, k, v: [batch, seq, heads * head_dim]`.
    fn attend(&self, index: usize, q: &Tensor, k: &Tensor, v: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq, _) = q.dims3()?;
        let head_dim = c.head_dim;
        let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, n, head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let q = self.rope.apply(&heads(q, c.num_attention_heads)?, offset)?;
        let k = self.rope.apply(&heads(k, c.num_key_value_heads)?, offset)?;
        let v = heads(v, c.num_key_value_heads)?;
        let cached = cache.is_some();
        let (k, v) = match cache {
            Some(cache) => cache.append(index, &k, &v)?,
            None => (k, v),
        };
        // Grouped-query attention: each key/value head serves `n_rep` query heads.
        let n_rep = c.num_attention_heads / c.num_key_value_heads;
        let k = repeat_kv(&k, n_rep)?.contiguous()?;
        let v = repeat_kv(&v, n_rep)?.contiguous()?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        if !cached && q.device().is_cpu() && q.dtype() == DType::F32 {
            // A full pass from position 0 (training): one op with its own gradient.
            let out = causal_attention(&q, &k, &v, scale)?;
            return Ok(out.transpose(1, 2)?.reshape((batch, seq, c.num_attention_heads * head_dim))?);
        }
        let scores = q.matmul(&k.t()?)?.affine(scale, 0.0)?;
        let scores = match causal_mask(seq, offset, q.device())? {
            Some(m) => scores.broadcast_add(&m)?,
            None => scores,
        };
        let out = softmax(&scores)?.matmul(&v)?;
        Ok(out.transpose(1, 2)?.reshape((batch, seq, c.num_attention_heads * head_dim))?)
    }
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`.
fn mlp(layer: &Layer, x: &Tensor) -> Result<Tensor> {
    let gate = swiglu(&linear(x, &layer.gate_proj)?, &linear(x, &layer.up_proj)?)?;
    linear(&gate, &layer.down_proj)
}

/// `[batch, kv_heads, t, d]` → `[batch, kv_heads * n_rep, t, d]`, each head repeated `n_rep` times
/// in a row (the order of transformers' `repeat_kv`).
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kvh, n_rep, t, d))?.reshape((b, kvh * n_rep, t, d))?)
}

/// Additive mask `[seq, offset + seq]`: new position `i` (absolute `offset + i`) sees keys up to
/// itself. None when a single new token sees everything anyway.
fn causal_mask(seq: usize, offset: usize, device: &Device) -> Result<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let total = offset + seq;
    let mask: Vec<f32> =
        (0..seq).flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), device)?))
}
