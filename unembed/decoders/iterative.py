"""Iterative CLIP-reranked decoding: MAGIC (Su et al. 2022, "Language Models Can See: Plugging Visual
Controls in Text Generation"), training-free.

A causal LM writes the caption one token at a time; at every step its top-k next tokens v are
re-ranked against the target embedding t (an image's, a caption's: any vector of the embedder's space):

    score(v) = (1 - alpha) * p_LM(v | x)                                 the LM's confidence
               - alpha * max_j cos(h_v, h_j)                             degeneration penalty (SimCTG)
               + beta * softmax_k(logit_scale * cos(t, text(x + v)))     the embedder's judgement

x is the caption so far, h_v the LM's last hidden state at v and h_j those of the context (start
token and prompt included). text(x + v) goes through the embedder's own text tower and holds only
the generated caption, as MAGIC scores only the continuation: the prompt is not part of it.
logit_scale is the embedder's learned temperature (CLIP's is 100). Defaults are the paper's: k=45,
alpha=0.1, beta=2.0, 16 tokens, greedy. With beams > 1 (an extension) partial captions compete by
their mean step score. MAGIC's LM is GPT-2 fine-tuned on caption text; `unembed.training.lm`
trains a small one from scratch.

Batched and cached. With N targets, B beams, R = N*B rows, k candidates, context length S, LM width
E, vocabulary V and embedding dim D, one step is:
    next-token logits [R, V] -> the top k ids and probabilities [R, k]
    one LM forward of the candidates [R*k, 1] over the KV cache repeated k times
        -> h_v [R, k, E] and every candidate's next-step logits [R*k, V]
    one text-tower call on the candidate texts of the unfinished rows [<= R*k] -> [<= R*k, D]
    scores [R, k] -> the kept candidates' cache rows, hidden states and logits carry on,
so no step re-runs the sequence. The three terms are `CandidateScorer`s summed with their weights
(`magic_scorers`), composed the way transformers composes its LogitsProcessors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from unembed import text_tower
from unembed.compat import import_transformers
from unembed.decoders.base import Decoder, DecoderConfig, register_decoder
from unembed.lm import LMWeights, build_lm
from unembed.tokenizers import make_tokenizer
from unembed.errors import MismatchError
from unembed.io import read_json

LM_METADATA = "unembed_lm.json"  # beside a trained LM's HF files: the tokenizer that goes with it


@dataclass
class IterativeConfig(DecoderConfig):
    lm: str = "gpt2"               # a Hugging Face causal LM id, a directory written by train_lm, or "scratch"
    lm_config: dict = field(default_factory=dict)  # the LM's HF config, recorded at creation
    lm_revision: str = ""          # the hub snapshot the LM resolved to: a hub LM is referenced, not copied
    lm_weights: str = ""           # recorded at save: "inside" (in model.safetensors) or "referenced" (hub id + revision)
    save_full_lm: bool = False     # keep a full copy of a hub LM instead (air-gapped use)
    tokenizer: str = ""            # "" = the LM's own; a train_lm directory names its own
    k: int = 45                    # candidates re-ranked per step
    alpha: float = 0.1             # weight of the degeneration penalty
    beta: float = 2.0              # weight of the embedder's score
    num_beams: int = 1
    max_length: int = 16           # new tokens
    prompt: str = ""               # text the LM continues (ZeroCap: "Image of a"); not part of the caption
    stop: str = "."                # a caption also ends with the token holding this text ("" = at EOS only)
    logit_scale: float = 0.0       # temperature of the embedder score's softmax; 0 = the embedder's own


# --- the re-ranking terms -----------------------------------------------------------------------

@dataclass
class Candidates:
    """The k continuations proposed for each of R partial captions at one step."""

    ids: torch.Tensor          # [R, k] token ids
    probs: torch.Tensor        # [R, k] p_LM(v | context), softmax over the whole vocabulary
    hidden: torch.Tensor       # [R, k, E] the LM's last hidden state at each candidate
    context: torch.Tensor      # [R, S, E] the LM's last hidden states of the context
    captions: list[list[int]]  # R token lists: each caption so far (no start token, no prompt)
    targets: torch.Tensor      # [R, D] L2-normalised target embedding of each row
    active: torch.Tensor       # [R] bool: rows still writing (finished ones need no score)


class CandidateScorer:
    """One term of the re-ranking score: Candidates -> [R, k]."""

    def __call__(self, c: Candidates) -> torch.Tensor:
        raise NotImplementedError


class LMProbability(CandidateScorer):
    def __call__(self, c: Candidates) -> torch.Tensor:
        return c.probs


class DegenerationPenalty(CandidateScorer):
    """SimCTG's max cosine between a candidate's hidden state and the context's: high for a token
    that would make the LM say again what it has said."""

    def __call__(self, c: Candidates) -> torch.Tensor:
        hidden, context = F.normalize(c.hidden.float(), dim=-1), F.normalize(c.context.float(), dim=-1)
        return torch.einsum("rke,rse->rks", hidden, context).amax(dim=-1)


class EmbedderScore(CandidateScorer):
    """softmax over each row's k candidates of logit_scale * cos(target, text embedding of caption + v),
    all candidate texts through the text tower in one call."""

    def __init__(self, embedder, tokenizer, logit_scale: float):
        self.embedder, self.tokenizer, self.logit_scale = embedder, tokenizer, logit_scale

    def __call__(self, c: Candidates) -> torch.Tensor:
        rows = c.active.nonzero().flatten().tolist()
        scores = torch.zeros(c.ids.shape, device=c.ids.device)
        if not rows:
            return scores
        eos, ids = self.tokenizer.eos_id, c.ids.tolist()
        # Choosing EOS ends the caption as it is, so that is the text judged.
        texts = [self.tokenizer.decode(c.captions[r] + ([v] if v != eos else [])) for r in rows for v in ids[r]]
        embedded = self.embed_texts(texts, group=c.ids.shape[1]).view(len(rows), c.ids.shape[1], -1)
        cosine = (embedded @ c.targets[rows].to(embedded)[:, :, None]).squeeze(-1)
        scores[rows] = (self.logit_scale * cosine).float().softmax(dim=-1).to(scores.device)  # fp32 under autocast too
        return scores

    def embed_texts(self, texts: list[str], group: int = 1) -> torch.Tensor:
        # One call for all texts, kept on the device. Each row's k candidates share their caption so
        # far: with open_clip's CLIP text tower that prefix runs once per row (text_tower).
        self.embedder.texts_embedded += len(texts)
        tokens = self.embedder.tokenizer(texts).to(self.embedder.device)
        return text_tower.encode_continuations(self.embedder.model, tokens, group).float()


def magic_scorers(embedder, tokenizer, alpha: float, beta: float,
                  logit_scale: float) -> list[tuple[float, CandidateScorer]]:
    """MAGIC's score as weighted terms; a zero weight drops its term (beta=0: plain contrastive search)."""
    terms = [(1 - alpha, LMProbability()), (-alpha, DegenerationPenalty()),
             (beta, EmbedderScore(embedder, tokenizer, logit_scale))]
    return [(weight, term) for weight, term in terms if weight]


# --- the search ---------------------------------------------------------------------------------

class Beams:
    """For each of N targets, its B best partial captions: summed step scores, lengths, finished flags
    and tokens. Rows are target-major (row = target * B + beam)."""

    def __init__(self, n: int, b: int, k: int, ends: "CaptionEnd"):
        self.n, self.b, self.k, self.ends = n, b, k, ends
        self.score = torch.zeros(n, b)
        self.length = torch.zeros(n, b)
        self.finished = torch.zeros(n, b, dtype=torch.bool)
        self.captions: list[list[int]] = [[] for _ in range(n * b)]
        self.started = False

    def advance(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Keep the B best of each target's B*k continuations; return their indices among the R*k
        candidates [R]. A finished caption competes unchanged, with its final mean score."""
        n, b, k = self.n, self.b, self.k
        scores, ids = scores.float().cpu().view(n, b * k), ids.cpu().view(n, b * k)
        total = ((self.score[..., None] + scores.view(n, b, k)) / (self.length[..., None] + 1))
        total = total.masked_fill(self.finished[..., None], float("-inf"))
        total[..., 0] = torch.where(self.finished, self.score / self.length.clamp(min=1), total[..., 0])
        if not self.started:  # every beam starts as the same empty caption: count it once
            total[:, 1:] = float("-inf")
            self.started = True
        choice = total.view(n, b * k).topk(b, dim=-1).indices  # [N, B] into each target's B*k
        parent = choice // k
        was_finished = self.finished.gather(1, parent)
        tokens = ids.gather(1, choice)
        self.score = self.score.gather(1, parent) + scores.gather(1, choice).masked_fill(was_finished, 0.0)
        self.length = self.length.gather(1, parent) + (~was_finished).float()
        ends = torch.tensor([[self.ends(t) for t in row] for row in tokens.tolist()], dtype=torch.bool)
        self.finished = was_finished | ends
        rows = parent + torch.arange(n)[:, None] * b  # parent rows among the R
        self.captions = [self.captions[row] if done or token == self.ends.eos else self.captions[row] + [token]
                         for row, token, done in zip(rows.flatten().tolist(), tokens.flatten().tolist(),
                                                     was_finished.flatten().tolist())]
        return (rows * k + choice % k).flatten()

    def best(self) -> list[list[int]]:
        beam = (self.score / self.length.clamp(min=1)).argmax(dim=1)
        return [self.captions[target * self.b + int(i)] for target, i in enumerate(beam)]


class CaptionEnd:
    """Whether a token ends a caption: EOS, or a token whose text holds the stop string."""

    def __init__(self, tokenizer, stop: str):
        self.tokenizer, self.stop, self.eos = tokenizer, stop, tokenizer.eos_id
        self._known: dict[int, bool] = {}

    def __call__(self, token: int) -> bool:
        if token not in self._known:
            self._known[token] = token == self.eos or bool(self.stop and self.stop in self.tokenizer.decode([token]))
        return self._known[token]


# --- the decoder --------------------------------------------------------------------------------

def lm_and_tokenizer(config: IterativeConfig, tokenizer=None, directory: Path | None = None,
                     captions: list[str] | None = None):
    """The LM and tokenizer a config names (see tokenizers.make_tokenizer for `directory` and `captions`).
    A hub LM is made before its tokenizer: offline, make_lm fails in seconds with one clear line where
    the tokenizer would retry for a minute."""
    lm = None if config.lm == "scratch" or tokenizer is not None else build_lm(config, None)
    tokenizer = tokenizer or make_tokenizer(config, directory, captions)
    return (lm if lm is not None else build_lm(config, tokenizer)), tokenizer


@register_decoder
class IterativeDecoder(LMWeights, Decoder):
    kind = "iterative"
    generation_options = ("k", "alpha", "beta", "num_beams", "max_length", "prompt", "stop", "logit_scale")
    config_class = IterativeConfig
    summary = "MAGIC: an LM proposes next tokens, the embedder re-ranks them (training-free)"
    text_only = True  # training-free; its LM, if trained here, learns from captions alone
    needs_embedder = True       # re-ranks with the embedder's text tower
    candidate_score = "mean MAGIC step score"
    # `unembed compare` trains a small scratch LM on the training captions, then packages it.
    compare_recipe = {"lm": "scratch", "tokenizer": "corpus:4000", "lm_config": {"n_layer": 4, "n_embd": 256},
                      "lr": 1e-3, "warmup_steps": 50, "batch_size": 64, "max_steps": 250}

    @classmethod
    def example(cls, embedder, captions, workdir) -> "IterativeDecoder":
        from unembed.tokenizers import CorpusTokenizer

        config = IterativeConfig(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim,
                                 lm="scratch", tokenizer="corpus:200", k=4, max_length=6,
                                 lm_config={"n_layer": 1, "n_head": 2, "n_embd": 32})
        decoder = cls(config, CorpusTokenizer.train(captions, 200))
        decoder.attach_embedder(embedder)
        return decoder

    def __init__(self, config: IterativeConfig, tokenizer=None):
        super().__init__(config)
        self.lm, self.tokenizer = lm_and_tokenizer(config, tokenizer)

    @classmethod
    def build(cls, embedder, lm: str = "gpt2", tokenizer: str = "", **options) -> "IterativeDecoder":
        """A decoder for `embedder` around an LM: a Hugging Face id, a directory written by `train_lm`
        (its tokenizer comes with it), or "scratch" (random weights, sized by lm_config). Options are
        IterativeConfig fields. The LM's weights become the decoder's; the embedder's stay its own."""
        directory = Path(lm)
        trained = (directory / LM_METADATA).is_file()
        if trained and not tokenizer:
            tokenizer = read_json(directory / LM_METADATA)["tokenizer"]
        config = IterativeConfig(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim,
                                 lm=str(lm), tokenizer=tokenizer, **options)
        decoder = cls(config, make_tokenizer(config, directory) if trained else None)
        decoder.attach_embedder(embedder)
        return decoder

    # inference

    @torch.no_grad()
    def write(self, embedded, **options) -> list[str]:
        """Captions for [N, D] embeddings, images' or not. Options (`generation_options`: the search's
        settings; it re-ranks deterministically, so no sampling) override the config for this call."""
        settings = self.settings(options)
        return [self.caption_text(ids, settings.stop) for ids in self.search(embedded.unit(), settings)]

    @torch.no_grad()
    def candidates(self, embedded, n: int, **options) -> list[list[tuple[str, float]]]:
        """The search's n beams per target (num_beams raised to n, k to at least n), each with its mean
        step score."""
        beams = max(n, options.get("num_beams") or self.config.num_beams)
        settings = self.settings({**options, "num_beams": beams, "k": max(beams, options.get("k") or self.config.k)})
        found = self.beams(embedded.unit(), settings)
        scores = (found.score / found.length.clamp(min=1)).tolist()
        return [sorted(((self.caption_text(found.captions[t * found.b + j], settings.stop), scores[t][j])
                        for j in range(found.b)), key=lambda c: -c[1]) for t in range(found.n)]

    def settings(self, options: dict) -> IterativeConfig:
        settings = dataclasses.replace(self.config, **options)
        positions = getattr(self.lm.config, "n_positions", None) or self.lm.config.max_position_embeddings
        start = 1 + len(self.tokenizer.encode(settings.prompt)) if settings.prompt else 1
        if not 1 <= settings.num_beams <= settings.k <= self.lm.config.vocab_size:
            raise MismatchError(f"need 1 <= num_beams ({settings.num_beams}) <= k ({settings.k}) <= the LM's "
                                f"vocabulary ({self.lm.config.vocab_size})")
        if not 1 <= settings.max_length <= positions - start:
            raise MismatchError(f"max_length {settings.max_length} does not fit: the LM reads at most {positions} "
                                f"positions and the start token and prompt take {start}")
        return settings

    def logit_scale(self, settings: IterativeConfig) -> float:
        from unembed.decoders.rerank import logit_scale

        return settings.logit_scale or logit_scale(self.embedder)

    @torch.no_grad()
    def search(self, targets: torch.Tensor, settings: IterativeConfig | None = None) -> list[list[int]]:
        """Token ids of the best caption for each target [N, D] (no start token, no prompt, no EOS)."""
        return self.beams(targets, settings).best()

    @torch.no_grad()
    def beams(self, targets: torch.Tensor, settings: IterativeConfig | None = None) -> "Beams":
        """The search's final beams for each target [N, D]."""
        settings = settings or self.settings({})
        self.eval()
        n, b, k = len(targets), settings.num_beams, settings.k
        scorers = magic_scorers(self.embedder, self.tokenizer, settings.alpha, settings.beta,
                                self.logit_scale(settings))
        targets = F.normalize(targets.float(), dim=-1).to(self.embedder.device).repeat_interleave(b, dim=0)
        prompt = self.tokenizer.encode(settings.prompt) if settings.prompt else []
        start = torch.tensor([[self.tokenizer.bos_id] + prompt], device=self.lm.device)
        # Every row starts from the same context: run it once, then repeat its cache for the R rows.
        out = self.lm(input_ids=start, past_key_values=import_transformers().DynamicCache(), use_cache=True,
                      output_hidden_states=True)
        cache, context, logits = out.past_key_values, out.hidden_states[-1], out.logits[:, -1]
        cache.batch_repeat_interleave(n * b)
        context, logits = context.expand(n * b, -1, -1), logits.expand(n * b, -1)
        beams = Beams(n, b, k, CaptionEnd(self.tokenizer, settings.stop))
        for _ in range(settings.max_length):
            probs, ids = logits.float().softmax(dim=-1).topk(k, dim=-1)  # [R, k]
            cache.batch_repeat_interleave(k)
            hidden, next_logits = self.candidate_states(ids.reshape(-1, 1), cache)  # [R*k, E]
            candidates = Candidates(ids, probs, hidden.view(n * b, k, -1), context, beams.captions, targets,
                                    ~beams.finished.flatten().to(ids.device))
            scores = sum(weight * term(candidates) for weight, term in scorers)
            kept = beams.advance(scores, ids).to(ids.device)
            cache.batch_select_indices(kept)
            context = torch.cat([context[kept // k], hidden[kept, None]], dim=1)
            logits = next_logits(kept)
            if beams.finished.all():
                break
        return beams

    def candidate_states(self, ids: torch.Tensor, cache):
        """The LM's last hidden state at each candidate token [R*k, 1] (over the cache, which it extends),
        and a function giving the next-step logits of the kept rows. GPT-2's logits are its LM head over
        that very hidden state, so only the kept rows pay for the vocabulary-wide head: one in k."""
        if type(self.lm).__name__ == "GPT2LMHeadModel":
            hidden = self.lm.transformer(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            return hidden, lambda kept: self.lm.lm_head(hidden[kept])
        out = self.lm(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
        return out.hidden_states[-1][:, -1], lambda kept: out.logits[kept, -1]

    def caption_text(self, ids: list[int], stop: str) -> str:
        text = self.tokenizer.decode(ids)
        if stop and stop in text:  # the stop string ends the caption even inside a longer token
            text = text[:text.index(stop) + len(stop)]
        return text.strip()

    # saving: the LM is in model.safetensors; the embedder is attached at load, never saved here

    def save_extra(self, path: Path) -> None:
        self.tokenizer.save(path)

    @classmethod
    def from_saved(cls, config: IterativeConfig, path: Path) -> "IterativeDecoder":
        return cls(config, make_tokenizer(config, path))
