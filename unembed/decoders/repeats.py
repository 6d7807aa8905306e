"""No repeated runs of n tokens in a caption (`no_repeat_ngram_size`), as one batched tensor step.

transformers' NoRepeatNGramLogitsProcessor bans the same tokens, but builds each hypothesis's n-gram
table in Python at every step: 32 beams for 1,000 images took 34 s instead of 24 with it (capdec,
benchmarks/repeats_consensus.py). Here every row's earlier (n-1)-token windows are compared with its
last one at once, and the token that followed each match is banned (tests/test_loop.py checks the
same scores as transformers' processor; the benchmark's `--speed` times both side by side).
"""
from __future__ import annotations

import torch


class NoRepeatNGram:
    """A logits processor (transformers' interface: (input_ids [B, L], scores [B, V]) -> scores) that
    sets to -inf every token that would complete an n-gram already in its row."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"no_repeat_ngram_size must be at least 1, got {n}")
        self.n = n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if length < self.n:  # no earlier n-gram can be complete yet
            return scores
        if self.n == 1:
            following, match = input_ids, torch.ones_like(input_ids, dtype=torch.bool)
        else:
            windows = input_ids.unfold(1, self.n - 1, 1)  # [B, L - n + 2, n - 1]; the last is the current one
            match = (windows[:, :-1] == windows[:, -1:]).all(-1)  # [B, L - n + 1]
            following = input_ids[:, self.n - 1:]  # the token after each earlier window
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(following)
        # Only the matches are written, in place: a GPT-2 vocabulary is 50,257 wide, and a mask or a copy
        # of it per hypothesis costs more than the bans (transformers' processor copies). Every caller
        # hands over scores of its own: transformers' generate a fresh copy of the step's logits (kept
        # unprocessed only for output_logits, which unembed never asks for), CoCa's search a log_softmax.
        return scores.index_put_((rows[match], following[match]),
                                 torch.tensor(-float("inf"), dtype=scores.dtype, device=scores.device))
