"""CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models") as a decoder.

One open_clip model with two halves: the contrastive half is the joint embedder (image latent
[N, D]) and the captioning half is a text decoder that cross-attends to the image's token
embeddings [N, T, W] (coca_ViT-B-32: D = W = 512, T = 255). The decoder's weights ARE the
embedder's: this module holds no tensors, and `load_decoder` attaches the CoCa embedder its
config.json names. Captions are decoded from `Embedded.image_tokens`, which unembed's embed step computed
once; the image is never encoded again (the latent is not an input of CoCa's text decoder).

Generation runs one position at a time with a KV cache, reading open_clip's own parameters
(nn.MultiheadAttention.in_proj_weight, ResidualAttentionBlock norms, MLPs and layer scales):
- text tower, causal blocks over [start, y1 .. yt]: keys/values [B, H, L, W/H] per layer. open_clip
  appends a CLS token after the text for the contrastive embedding; it comes last, so under the
  causal mask no text position sees it and generation leaves it out;
- multimodal decoder, per layer causal self-attention (cached like the text tower) then
  cross-attention to the image tokens, whose keys/values [N, H, T, W/H] are computed once per image
  and shared by its beams; logits [B, V] (V = 49408) from the last position only.
A step costs O(t); open_clip's `generate` re-runs both towers over the whole prefix, re-projects the
image tokens and computes [B, t, V] logits at every step.

Search, batched over images: greedy, beam search (log-probabilities, length-normalised), nucleus
sampling; transformers' logits processors for minimum length, repetition penalty, temperature, top-p.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from unembed.decoders.base import Decoder, DecoderConfig, register_decoder
from unembed.embedders import OPENAI_MEAN, OPENAI_STD
from unembed.errors import BadInputError, MismatchError


def scenes_coca_config(image_size: int = 64, embed_dim: int = 128, patch_size: int = 8, vision_width: int = 128,
                       vision_layers: int = 4, text_layers: int = 2, decoder_layers: int = 2, image_tokens: int = 32,
                       context_length: int = 32, name: str = "scenes-coca") -> dict:
    """A small open_clip CoCa for the scenes world: ViT image tower with an attentional pooler
    (1 contrastive query + `image_tokens` queries the decoder reads), a causal text tower and a
    multimodal decoder. open_clip ties widths: image tokens, text and decoder are all `embed_dim` wide."""
    heads = max(1, embed_dim // 32)
    return {
        "name": name,
        "model_type": "coca",
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": vision_width,
                           "layers": vision_layers, "head_width": 32, "attentional_pool": True,
                           "attn_pooler_queries": image_tokens + 1, "attn_pooler_heads": heads,
                           "output_tokens": True},
            "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": embed_dim, "heads": heads,
                         "layers": text_layers, "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": context_length, "vocab_size": 49408, "width": embed_dim,
                               "heads": heads, "layers": decoder_layers, "attn_pooler_heads": heads},
        },
        "preprocess": {"image_size": image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
        "tokenizer": "clip-bpe",
    }


def init_decoder_projection(model, generator: torch.Generator | None = None) -> None:
    """open_clip leaves a new CoCa's vocabulary projection as torch.empty (MultimodalTransformer's
    init_parameters is never called), i.e. arbitrary memory; give it the init open_clip wrote for it."""
    projection = model.text_decoder.text_projection
    with torch.no_grad():
        projection.normal_(0.0, projection.shape[0] ** -0.5, generator=generator)


@dataclass
class CoCaConfig(DecoderConfig):
    # Generation defaults. open_clip's defaults for comparison: 6 beams in 3 groups without a diversity
    # penalty (three identical 2-beam searches, summing raw logits rather than log-probabilities),
    # seq_len 30 (= start + 28 tokens + end), min_seq_len 5 (= min_length 4).
    num_beams: int = 3
    max_length: int = 28          # caption tokens, the end token not counted
    min_length: int = 0           # caption tokens before the end token may be chosen
    length_penalty: float = 1.0   # beam scores: sum of log-probabilities / length ** length_penalty
    repetition_penalty: float = 1.0
    top_p: float = 0.9            # sampling
    temperature: float = 1.0


def coca_model(embedder):
    """The embedder's open_clip CoCa, refused unless the cached step can run it."""
    model = embedder.model
    if not all(hasattr(model, name) for name in ("text", "text_decoder", "_encode_image")):
        raise MismatchError(f"embedder {embedder.spec!r} is not a CoCa model; the coca decoder needs one "
                            "(e.g. coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k)")
    text = model.text
    blocks = [*getattr(getattr(text, "transformer", None), "resblocks", []), *model.text_decoder.resblocks,
              *model.text_decoder.cross_attn]
    if getattr(text, "cls_emb", None) is None or not all(_plain_block(b) for b in blocks):
        raise MismatchError(f"embedder {embedder.spec!r} is a CoCa variant whose text towers are not open_clip's "
                            "default transformer blocks, which the coca decoder's cached step reads")
    return model


def _plain_block(block) -> bool:
    attn = getattr(block, "attn", None)
    return (isinstance(attn, torch.nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.batch_first
            and hasattr(block, "ln_1") and hasattr(block, "mlp"))


# --- the cached step ----------------------------------------------------------------------------

def _heads(attn: torch.nn.MultiheadAttention, x: torch.Tensor, which: slice) -> torch.Tensor:
    """Project x [B, S, W] with the q/k/v rows `which` of in_proj -> [B, H, S, W/H]."""
    width = attn.embed_dim
    weight = attn.in_proj_weight[which.start * width:which.stop * width]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[which.start * width:which.stop * width]
    y = F.linear(x, weight, bias)
    return y.view(*x.shape[:2], -1, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).squeeze(0)


class CoCaStep:
    """open_clip CoCa's text tower + multimodal decoder, one position per call, with a KV cache.

    Rows are images x beams (row = image * beams + beam); `reorder` keeps beams within their image,
    which is why cross-attention keys/values exist once per image."""

    def __init__(self, model, image_tokens: torch.Tensor, beams: int, max_positions: int):
        self.text, self.decoder = model.text, model.text_decoder
        self.pad_id = self.text.pad_id
        self.beams = beams
        self.rows, self.position = image_tokens.shape[0] * beams, 0
        rows = self.rows
        blocks = [*self.text.transformer.resblocks, *self.decoder.resblocks]
        first = blocks[0].attn.in_proj_weight
        self.cache = [torch.zeros(2, rows, b.attn.num_heads, max_positions, b.attn.head_dim,
                                  dtype=first.dtype, device=first.device) for b in blocks]
        # open_clip's text tower masks pad-id keys (the CLIP BPE pads with 0, which is also "!"), and
        # in its legacy mode (correct_cls_mask=False, what its factory builds) one position late.
        self.keep = torch.ones(rows, max_positions, dtype=torch.bool, device=first.device)
        self.previous = torch.full((rows,), -1, dtype=torch.long, device=first.device)
        image_tokens = image_tokens.to(first.device, first.dtype)
        self.cross = [self._image_keys_values(block, image_tokens) for block in self.decoder.cross_attn]

    @staticmethod
    def _image_keys_values(block, image_tokens):
        kv_in = block.ln_1_kv(image_tokens)
        return _heads(block.attn, kv_in, slice(1, 2)), _heads(block.attn, kv_in, slice(2, 3))

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [rows] at the next position -> next-token logits [rows, V]."""
        t = self.position
        if t >= self.keep.shape[1]:
            raise BadInputError("max_length", f"generation ran past the {self.keep.shape[1]} positions it was given")
        key_token = tokens if getattr(self.text, "correct_cls_mask", False) else self.previous
        self.keep[:, t] = key_token != self.pad_id
        self.previous = tokens
        mask = self.keep[:, None, None, :t + 1]
        n_text = len(self.text.transformer.resblocks)

        x = self.text.token_embedding(tokens).to(self.cache[0].dtype) + self.text.positional_embedding[t]
        for block, cache in zip(self.text.transformer.resblocks, self.cache):
            x = x + block.ls_1(self._self_attention(block.attn, block.ln_1(x), cache, mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        for block, cross, cache, (k, v) in zip(self.decoder.resblocks, self.decoder.cross_attn,
                                               self.cache[n_text:], self.cross):
            x = x + block.ls_1(self._self_attention(block.attn, block.ln_1(x), cache, None))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            x = x + cross.ls_1(self._cross_attention(cross.attn, cross.ln_1(x), k, v))
            x = x + cross.ls_2(cross.mlp(cross.ln_2(x)))
        self.position += 1
        return self.decoder.ln_final(x) @ self.decoder.text_projection

    def _self_attention(self, attn, x: torch.Tensor, cache: torch.Tensor, mask) -> torch.Tensor:
        t = self.position
        q, k, v = _heads(attn, x[:, None], slice(0, 3))  # each [rows, H, 1, W/H]
        cache[0, :, :, t] = k[:, :, 0]
        cache[1, :, :, t] = v[:, :, 0]
        out = F.scaled_dot_product_attention(q, cache[0, :, :, :t + 1], cache[1, :, :, :t + 1], attn_mask=mask)
        return attn.out_proj(out.reshape(self.rows, -1))

    def _cross_attention(self, attn, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # An image's beams are its queries: [N, H, beams, W/H] against its keys [N, H, T, W/H].
        q = _heads(attn, x.view(-1, self.beams, x.shape[-1]), slice(0, 1))
        out = F.scaled_dot_product_attention(q, k, v)
        return attn.out_proj(out.transpose(1, 2).reshape(self.rows, -1))

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from row rows[i] (beam search); rows stay within their image."""
        used = self.position
        for cache in self.cache:
            cache[:, :, :, :used] = cache[:, rows, :, :used]
        self.keep[:, :used] = self.keep[rows, :used]
        self.previous = self.previous[rows]


# --- search -------------------------------------------------------------------------------------

def greedy_or_sample(step: CoCaStep, start: int, end: int, max_length: int, processors, warpers=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [rows, <= max_length] (finished rows padded with the end token)."""
    tokens = torch.full((step.rows, 1), start, dtype=torch.long, device=step.keep.device)
    finished = torch.zeros(step.rows, dtype=torch.bool, device=tokens.device)
    for _ in range(max_length):
        scores = processors(tokens, step(tokens[:, -1]).float())
        if warpers is None:
            chosen = scores.argmax(-1)
        else:
            chosen = torch.multinomial(warpers(tokens, scores).softmax(-1), 1, generator=generator)[:, 0]
        chosen = chosen.masked_fill(finished, end)
        tokens = torch.cat([tokens, chosen[:, None]], 1)
        finished |= chosen == end
        if finished.all():
            break
    return tokens[:, 1:]


def beam_search(step: CoCaStep, start: int, end: int, max_length: int, processors,
                length_penalty: float = 1.0) -> torch.Tensor:
    """The `step.beams` finished hypotheses per image, best first: scores [images, beams] and token ids
    [images, beams, max_length], end-padded.

    As transformers' beam scorer: each step keeps the k best continuations that do not end; an ending
    among the k best candidates becomes a finished hypothesis scored sum(log p) / length ** penalty
    (length counts the end token, not the start); an image is done once k hypotheses are finished and
    none is worse than its best live beam's score now (transformers' default stopping heuristic)."""
    k, device = step.beams, step.keep.device
    n = step.rows // k
    tokens = torch.full((n * k, 1), start, dtype=torch.long, device=device)
    alive = torch.zeros(n, k, device=device)
    alive[:, 1:] = -torch.inf  # all beams start identical: only one of them may grow at first
    best = torch.full((n, k), -torch.inf, device=device)
    best_ids = torch.full((n, k, max_length), end, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    first_row = torch.arange(n, device=device)[:, None] * k
    for t in range(max_length):
        scores = processors(tokens, step(tokens[:, -1]).float().log_softmax(-1))
        vocab = scores.shape[-1]
        cand, flat = (alive.view(-1, 1) + scores).view(n, k * vocab).topk(2 * k, dim=1)
        source, token = first_row + flat // vocab, flat % vocab
        grown = torch.cat([tokens[source.flatten()], token.view(-1, 1)], 1).view(n, 2 * k, t + 2)
        ended = token == end
        top_k = torch.arange(2 * k, device=device) < k
        finished = torch.where(ended & top_k & ~done[:, None], cand / (t + 1) ** length_penalty, -torch.inf)
        best, best_ids = _keep_best(best, best_ids, finished, _pad(grown[:, :, 1:], max_length, end))
        alive, pick = torch.where(ended, -torch.inf, cand).topk(k, dim=1)
        tokens = grown.gather(1, pick[..., None].expand(-1, -1, t + 2)).view(n * k, t + 2)
        step.reorder(source.gather(1, pick).flatten())
        done |= best[:, -1] >= alive[:, 0] / (t + 1) ** length_penalty
        if done.all():
            break
    unfinished = torch.where(done[:, None], -torch.inf, alive / (tokens.shape[1] - 1) ** length_penalty)
    best, best_ids = _keep_best(best, best_ids, unfinished, _pad(tokens[:, 1:].view(n, k, -1), max_length, end))
    return best, best_ids


def _pad(ids: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(ids, (0, length - ids.shape[-1]), value=value)


def _keep_best(scores, ids, new_scores, new_ids):
    """The k best of a pool of hypotheses (scores [n, k], ids [n, k, L]) and new ones."""
    top, index = torch.cat([scores, new_scores], 1).topk(scores.shape[1], dim=1)
    pool = torch.cat([ids, new_ids], 1)
    return top, pool.gather(1, index[..., None].expand(-1, -1, pool.shape[-1]))


# --- the decoder --------------------------------------------------------------------------------

@register_decoder
class CoCaDecoder(Decoder):
    kind = "coca"
    summary = "CoCa: contrastive + captioning from scratch, or caption fine-tuning (--init)"
    config_class = CoCaConfig
    needs_tokens = True
    needs_embedder = True
    candidate_score = "length-penalised beam score"
    generation_options = ("num_beams", "max_length", "min_length", "do_sample", "top_p", "temperature", "seed",
                          "repetition_penalty", "length_penalty", "no_repeat_ngram_size")
    compare_recipe = {"arch": {"embed_dim": 64}, "max_steps": 300, "batch_size": 32, "warmup_steps": 30}

    @classmethod
    def example(cls, embedder, captions, workdir: Path) -> "CoCaDecoder":
        """Its own tiny random CoCa (a CoCa decodes with its own towers), saved in workdir."""
        from unembed.embedders import Embedder

        arch = scenes_coca_config(image_size=32, embed_dim=32, vision_width=32, vision_layers=1, text_layers=1,
                                  decoder_layers=1, image_tokens=4, context_length=16, name="example-coca")
        model = Embedder.from_config(arch, device="cpu")
        init_decoder_projection(model.model, torch.Generator().manual_seed(0))
        model.save(workdir / "coca-embedder")
        return cls.for_embedder(Embedder.load(workdir / "coca-embedder", device="cpu"), num_beams=2, max_length=6)

    @classmethod
    def for_embedder(cls, embedder, embedder_spec: str | None = None, **generation) -> "CoCaDecoder":
        """A CoCa decoder over a CoCa embedder (pretrained spec or directory), attached and ready.
        `embedder_spec` overrides what config.json records (e.g. a path relative to the decoder)."""
        coca_model(embedder)
        config = CoCaConfig(embedder_spec=embedder_spec or embedder.spec, embedder_id=embedder.id,
                            embed_dim=embedder.dim, **generation)
        decoder = cls(config)
        decoder.attach_embedder(embedder)
        return decoder

    def attach_embedder(self, embedder) -> None:
        coca_model(embedder)
        super().attach_embedder(embedder)

    def write(self, embedded, **options) -> list[str]:
        """Captions for an `Embedded` with image tokens (see `generate` for the options)."""
        return [self.text(ids) for ids in self.generate(embedded, **options)]

    def candidates(self, embedded, n: int, **options) -> list[list[tuple[str, float]]]:
        """n beams per image (num_beams raised to n), each with its beam score (sum log p / length **
        length_penalty). Reranking reads beams: a sampled CoCa caption carries no score."""
        if options.get("do_sample"):
            raise BadInputError("option rerank", "the coca decoder reranks its beams; drop do_sample (--sample)")
        options["num_beams"] = max(n, options.get("num_beams") or self.config.num_beams)
        ids, scores = self.search(embedded, **options)
        return [[(self.text(i), s) for i, s in zip(row_ids, row_scores) if s > float("-inf")][:n]
                for row_ids, row_scores in zip(ids, scores)]

    def generate(self, embedded, **options) -> list[list[int]]:
        """Caption token ids per image (start and end tokens removed): greedy (num_beams=1), beam
        search, or nucleus sampling (do_sample, top_p, temperature, seed); options default to the config
        (see `search`)."""
        return [rows[0] for rows in self.search(embedded, **options)[0]]

    @torch.no_grad()
    def search(self, embedded, num_beams: int | None = None, max_length: int | None = None,
               min_length: int | None = None, do_sample: bool = False, top_p: float | None = None,
               temperature: float | None = None, repetition_penalty: float | None = None,
               length_penalty: float | None = None, seed: int | None = None, no_repeat_ngram_size: int = 0):
        """(token ids, scores) per image: every finished beam, best first, with its score; one row,
        scored 0, for greedy decoding and sampling."""
        cfg = self.config
        self.check_embedded(embedded)
        self.embedder.check(embedded)
        model = coca_model(self.embedder)
        start, end = self._special_ids()
        context = min(model.text.num_pos - 1, model.text_decoder.context_length)  # num_pos counts the CLS token
        max_length = min(cfg.max_length, context) if max_length is None else max_length
        self._check_tokens(embedded, model, max_length, context)
        beams = 1 if do_sample else (num_beams or cfg.num_beams)
        step = CoCaStep(model, embedded.image_tokens, beams, max_length)
        processors = self._processors(end, cfg.min_length if min_length is None else min_length,
                                      cfg.repetition_penalty if repetition_penalty is None else repetition_penalty,
                                      no_repeat_ngram_size)
        if beams > 1:
            scores, ids = beam_search(step, start, end, max_length, processors,
                                      cfg.length_penalty if length_penalty is None else length_penalty)
        else:
            if do_sample:
                generator = None if seed is None else torch.Generator(step.keep.device).manual_seed(seed)
                warpers = self._warpers(cfg.top_p if top_p is None else top_p,
                                        cfg.temperature if temperature is None else temperature)
                ids = greedy_or_sample(step, start, end, max_length, processors, warpers, generator)
            else:
                ids = greedy_or_sample(step, start, end, max_length, processors)
            scores, ids = torch.zeros(len(ids), 1), ids[:, None]
        return ([[self._until_end(row.tolist(), end) for row in rows] for rows in ids.cpu()],
                scores.float().cpu().tolist())

    def text(self, ids: list[int]) -> str:
        """open_clip's decode, start tokens dropped (as its README's cleanup does), whitespace trimmed."""
        start, _ = self._special_ids()
        return self.embedder.tokenizer.decode([i for i in ids if i != start]).strip()

    # helpers

    def _special_ids(self) -> tuple[int, int]:
        tokenizer = self.embedder.tokenizer
        if not hasattr(tokenizer, "sot_token_id"):
            raise MismatchError(f"embedder {self.embedder.spec!r} does not use open_clip's CLIP tokenizer, "
                                "which the coca decoder decodes with")
        return tokenizer.sot_token_id, tokenizer.eot_token_id

    @staticmethod
    def _check_tokens(embedded, model, max_length: int, context: int) -> None:
        width = model.text_decoder.width
        if embedded.image_tokens.ndim != 3 or embedded.image_tokens.shape[-1] != width:
            raise MismatchError(f"image tokens of shape {tuple(embedded.image_tokens.shape)} do not fit this CoCa, "
                                f"which cross-attends to [N, T, {width}] tokens")
        if not 1 <= max_length <= context:
            raise BadInputError("max_length", f"must be between 1 and this CoCa's context of {context} tokens, "
                                f"got {max_length}")

    @staticmethod
    def _processors(end: int, min_length: int, repetition_penalty: float, no_repeat_ngram_size: int = 0):
        from unembed.compat import import_transformers

        transformers = import_transformers()
        processors = transformers.LogitsProcessorList()
        if min_length:  # the start token is the prompt: lengths count caption tokens
            processors.append(transformers.MinNewTokensLengthLogitsProcessor(1, min_length, end))
        if repetition_penalty != 1.0:
            processors.append(transformers.RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if no_repeat_ngram_size:
            from unembed.decoders.repeats import NoRepeatNGram

            processors.append(NoRepeatNGram(no_repeat_ngram_size))
        return processors

    @staticmethod
    def _warpers(top_p: float, temperature: float):
        from unembed.compat import import_transformers

        transformers = import_transformers()
        warpers = transformers.LogitsProcessorList()
        if temperature != 1.0:
            warpers.append(transformers.TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(transformers.TopPLogitsWarper(top_p))
        return warpers

    @staticmethod
    def _until_end(ids: list[int], end: int) -> list[int]:
        return ids[:ids.index(end)] if end in ids else ids
