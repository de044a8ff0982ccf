"""A small, readable Baichuan2-style causal LM, loaded as remote code through `auto_map`.

quantkit's tests, benchmarks and demo model need checkpoints that behave like a downloaded
Baichuan2 folder -- same weight names, same remote-code loading, same NormHead quirk --
without downloading one. This file is our own re-implementation of that architecture:

- `model.layers.N.self_attn.W_pack`: one Linear producing q, k and v (out = 3 * hidden).
- SiLU-gated MLP (`gate_proj`, `up_proj`, `down_proj`), RMSNorm everywhere.
- `lm_head` is a `NormHead`: its rows are L2-normalized before use (every call in
  training; once, in place, on the first call in eval mode).
- 7B layout: rotary position embeddings. 13B layout (config without
  `max_position_embeddings`): ALiBi attention bias and no rotary.

Decoder-layer call (what a layer-streaming quantizer captures once and replays):

    hidden_states = layer(hidden_states, attention_mask=bias, position_ids=positions,
                          past_key_values=cache)

- `hidden_states`: [batch, seq, hidden].
- `attention_mask`: additive float bias [batch or 1, heads or 1, seq, kv_len] in the
  hidden dtype: 0 where attention is allowed, the dtype's minimum where it is not (causal
  and padding mask), plus the ALiBi distance penalty in the 13B layout.
- `position_ids`: [batch or 1, seq] int64 rotary positions (ignored by the ALiBi layout).
- `past_key_values`: a transformers `Cache` (generation) or None.

A layer returns a plain tensor, the new hidden states.

The models' `forward` takes the cache as `past_key_values` (transformers < 5.24) or as
`cache` (5.24 renamed it, in `generate` and in model outputs); see `resolve_cache`.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_baichuan import BaichuanConfig

ROPE_BASE = 10000.0  # Baichuan2-7B's rotary base (its config does not store one)
# The model outputs' field for the KV cache: `cache` from transformers 5.24, `past_key_values`
# before. Writing the current name avoids the deprecation path on new versions.
CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
               else "past_key_values")


def resolve_cache(past_key_values, kwargs):
    """The KV cache under either of its names: `past_key_values`, or `cache` (transformers >= 5.24).

    Newer `generate` passes `cache=`; older versions and older callers pass
    `past_key_values=`. A forward that read only one name would silently run uncached (and,
    with left padding, emit different tokens) on the other side of the rename.
    """
    cache = kwargs.pop("cache", None)
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return past_key_values if past_key_values is not None else cache


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states):
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(hidden_states.dtype)


class NormHead(nn.Module):
    """Baichuan2's output head: a bias-free Linear whose rows are L2-normalized.

    Training normalizes on every forward (gradients flow through the normalization). Eval
    normalizes the stored weight once, in place, on the first call, and reuses it: after
    that first call the parameter itself holds unit-norm rows.
    """

    def __init__(self, hidden_size, vocab_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.first_flag = True

    def forward(self, hidden_states):
        if self.training:
            self.first_flag = True  # renormalize when switched back to eval
            weight = F.normalize(self.weight, dim=-1)
        else:
            if self.first_flag:
                self.first_flag = False
                with torch.no_grad():
                    self.weight.copy_(F.normalize(self.weight.float(), dim=-1))
            weight = self.weight
        return F.linear(hidden_states, weight)


class BaichuanMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q, k, position_ids):
    """Rotate q and k [batch, heads, seq, head_dim] by their positions, in float32."""
    head_dim = q.shape[-1]
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, device=q.device,
                                           dtype=torch.float32) / head_dim)
    angles = position_ids[:, None, :, None].float() * inv_freq  # [batch, 1, seq, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    q_out = q.float() * cos + rotate_half(q.float()) * sin
    k_out = k.float() * cos + rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def alibi_slopes(num_heads):
    """Per-head ALiBi slopes: a geometric series, interleaved when heads is not a power of 2."""
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * i / closest) for i in range(1, closest + 1)]
    if closest < num_heads:
        extra = [2 ** (-4 * i / closest) for i in range(1, 2 * (num_heads - closest), 2)]
        slopes += extra[: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def attention_bias(attention_mask, query_len, past_len, dtype, device, slopes=None):
    """The additive bias every layer adds to its attention scores.

    Causal and padding masking become the dtype's minimum; with `slopes` (ALiBi) allowed
    positions get `slope * (key_pos - query_pos)`. A query row with nothing to attend to
    (a left-padding position) is left unmasked so it stays finite; its output is unused.
    """
    kv_len = past_len + query_len
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, query, kv]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_len].to(device=device,
                                                                        dtype=torch.bool)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    if slopes is None:
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
    else:
        distance = (k_pos - q_pos).float()  # <= 0 where allowed
        bias = slopes.to(device)[None, :, None, None] * distance[None, None]
    return bias.masked_fill(~allowed, torch.finfo(dtype).min).to(dtype)


class BaichuanAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.uses_rope = not config.uses_alibi
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask, position_ids, past_key_values=None):
        batch, seq, _ = hidden_states.shape
        qkv = self.W_pack(hidden_states).view(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [batch, heads, seq, head_dim]
        if self.uses_rope:
            q, k = apply_rotary(q, k, position_ids)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class BaichuanDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None,
                past_key_values=None):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, position_ids, past_key_values)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BaichuanDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, NormHead)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            BaichuanDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and not self.training and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        seq = inputs_embeds.shape[1]
        device = inputs_embeds.device
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                # Count only real tokens, so a left-padded row gets the same positions
                # as the unpadded sequence.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = position_ids[:, -seq:].to(device)
            else:
                position_ids = torch.arange(past_len, past_len + seq, device=device)[None]
        slopes = alibi_slopes(self.config.num_attention_heads) if self.config.uses_alibi \
            else None
        bias = attention_bias(attention_mask, seq, past_len, inputs_embeds.dtype, device, slopes)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=bias, position_ids=position_ids,
                                  past_key_values=past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       **{CACHE_FIELD: past_key_values})


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
