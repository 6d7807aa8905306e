"""open_clip's CLIP text tower without the padding: run it over the tokens a batch really has.

open_clip pads every text to the context length (77 for CLIP) and runs the transformer over all of
it. For the CLIP text tower this work is wasted: its attention is causal and it pools at the
end-of-text token (`text_pool_type` "argmax", "eos" or "first"), so no position at or before the
pooled one ever sees a padding column. Two exact shortcuts follow:

- `encode_text`: cut the batch to its longest real text (the last non-padding column) and slice the
  positional embedding and the causal mask to match. Same result, a fraction of the work: a
  5-word caption is 8 tokens, not 77.
- `encode_continuations`: texts that share a prefix (the iterative decoder's k candidates are one
  caption plus k different last tokens) run the prefix once, keep each layer's keys and values, and
  run only each text's own suffix against them, as an LM's KV cache does. Per row of k candidates the
  tower then reads P + k*S tokens instead of k*(P + S). Each group keeps its own prefix length.

Both hold only for open_clip's `CLIP` text tower with its standard residual blocks (`supported`);
anything else (CoCa's class token, a bidirectional tower, a Hugging Face text model) takes the
model's own `encode_text` over the padded batch. Tests check both against it
(tests/test_text_tower.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 0  # open_clip's tokenizers pad with 0


def supported(model) -> bool:
    """Whether the shortcuts are exact for `model`: open_clip's CLIP text tower, causal, pooled at the
    end token (or the first), built of plain residual attention blocks. Checked once per model."""
    known = getattr(model, "_unembed_text_tower", None)
    if known is None:
        known = _supported(model)
        model._unembed_text_tower = known
    return known


def _supported(model) -> bool:
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    mask = getattr(model, "attn_mask", None)
    if hasattr(model, "text") or blocks is None or mask is None or not hasattr(model, "positional_embedding"):
        return False
    if getattr(model, "text_pool_type", "argmax") not in ("argmax", "eos", "first"):
        return False
    causal = torch.full_like(mask, float("-inf")).triu(1)
    if not torch.equal(mask, causal):
        return False
    return all(isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) and not hasattr(b, "ln_1_kv")
               and b.attn._qkv_same_embed_dim and b.attn.bias_k is None and not b.attn.add_zero_attn
               for b in blocks)


def real_length(tokens: torch.Tensor) -> int:
    """The batch's longest text: one past its last non-padding column (at least 1)."""
    used = (tokens != PAD).any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


@torch.no_grad()
def encode_text(model, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """model.encode_text(tokens) over only the columns the batch uses (exact where `supported`)."""
    if not supported(model):
        return model.encode_text(tokens, normalize=normalize)
    tokens = tokens[:, :real_length(tokens)]
    x, _ = _run(model, _embed(model, tokens, torch.arange(tokens.shape[1], device=tokens.device)), None)
    return _pool(model, x, _pool_positions(model, tokens), normalize)


@torch.no_grad()
def encode_continuations(model, tokens: torch.Tensor, group: int, normalize: bool = True) -> torch.Tensor:
    """The embeddings of texts [G*group, T] (padded token ids, each run of `group` rows sharing a
    prefix, as the k candidates of one caption do). Each group's longest shared prefix runs once; the
    rest of each text runs against that prefix's keys and values. Groups keep their own prefix
    lengths: prefixes are padded at the end and those columns masked. Equals encode_text (where
    `supported`; elsewhere it is encode_text)."""
    if not supported(model) or group < 2:
        return encode_text(model, tokens, normalize)
    tokens = tokens[:, :real_length(tokens)]
    n, width = tokens.shape
    groups = tokens.view(-1, group, width)
    ends = _pool_positions(model, tokens)
    same = (groups == groups[:, :1]).all(dim=1).long()  # [G, T]: columns where the whole group agrees
    shared = torch.minimum(same.cumprod(dim=1).sum(dim=1), ends.view(-1, group).min(dim=1).values)  # [G]
    if int(shared.max()) == 0:
        return encode_text(model, tokens, normalize)
    longest = int(shared.max())
    _, past = _run(model, _embed(model, groups[:, 0, :longest], torch.arange(longest, device=tokens.device)), None)
    past = [(k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)) for k, v in past]
    start = shared.repeat_interleave(group)  # [N]: where each text's own part begins
    span = width - int(start.min())
    columns = start[:, None] + torch.arange(span, device=tokens.device)  # [N, S]
    suffix = tokens.gather(1, columns.clamp(max=width - 1)).masked_fill(columns >= width, PAD)
    positions = columns.clamp(max=model.positional_embedding.shape[0] - 1)
    seen = torch.arange(longest, device=tokens.device)[None, :] < start[:, None]  # [N, P] real prefix columns
    causal = torch.ones(span, span, dtype=torch.bool, device=tokens.device).tril()
    mask = torch.cat([seen[:, None, :].expand(-1, span, -1), causal.expand(n, -1, -1)], dim=2)[:, None]
    x, _ = _run(model, _embed(model, suffix, positions), past, mask)
    return _pool(model, x, ends - start, normalize)


def _embed(model, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token plus positional embeddings; `positions` is [S] or per row [B, S]."""
    cast = model.transformer.get_cast_dtype()
    return model.token_embedding(tokens).to(cast) + model.positional_embedding[positions].to(cast)


def _run(model, x: torch.Tensor, past: list | None, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """The residual blocks over x [B, S, W], attending also to `past` (each layer's keys and values
    [B, heads, P, W/heads] of earlier positions). `mask` [B, 1, S, P+S] says which keys each query sees
    (default: all of the past, and causally within x). Returns x and this run's keys and values."""
    kept = []
    for i, block in enumerate(model.transformer.resblocks):
        attn = block.attn
        heads, width = attn.num_heads, x.shape[-1]
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, width // heads)).transpose(1, 2) for t in (q, k, v))
        kept.append((k, v))
        seen = past[i][0].shape[2] if past else 0
        if past:
            k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
        if mask is None:
            n = x.shape[1]
            mask = torch.ones(n, seen + n, dtype=torch.bool, device=x.device).tril(seen)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        x = x + block.ls_1(attn.out_proj(out))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, kept


def _pool_positions(model, tokens: torch.Tensor) -> torch.Tensor:
    kind = getattr(model, "text_pool_type", "argmax")
    if kind == "first":
        return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    if kind == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def _pool(model, x: torch.Tensor, positions: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = model.ln_final(x)
    pooled = x[torch.arange(len(x), device=x.device), positions]
    if model.text_projection is not None:
        pooled = model.text_projection(pooled) if isinstance(model.text_projection, torch.nn.Linear) \
            else pooled @ model.text_projection
    return F.normalize(pooled, dim=-1) if normalize else pooled
