"""Text tokenizers, one interface (encode / decode / save, vocab_size, bos_id, eos_id) for every
LM a decoder or trainer uses:
- "clip-bpe": open_clip's bundled CLIP BPE (offline; DeCap's choice);
- "corpus:N": a BPE of at most N tokens learned from the training captions;
- any Hugging Face tokenizer id or directory (the LM's own by default).
Used by the prefix decoders, the iterative decoder and `training/lm.py`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from unembed.compat import clip_bpe, import_transformers
from unembed.errors import ModelLoadError


class ClipBpeTokenizer:
    """open_clip's CLIP BPE (bundled, works offline); DeCap's choice. Lower-cases, as CLIP does."""

    name = "clip-bpe"

    def __init__(self):
        self._bpe = clip_bpe(77)  # open_clip's default; decoders never use its padding
        self.vocab_size = len(self._bpe.encoder)
        self.bos_id = self._bpe.all_special_ids[0]
        self.eos_id = self._bpe.all_special_ids[1]

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text)

    def encode_piece(self, text: str) -> list[int]:
        """Ids of `text` as it would stand inside a caption (a stop string such as ".")."""
        return self._bpe.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._bpe.decode(ids).strip()

    def save(self, path: Path) -> None:
        """Nothing to write: the BPE ships inside open_clip."""


class HFTokenizer:
    def __init__(self, name_or_path: str):
        from unembed.hub import resolve

        transformers = import_transformers()
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(resolve(name_or_path, "tokenizer"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from None
        self.name = name_or_path
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(" " + text.strip(), add_special_tokens=False)

    def encode_piece(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True).strip()

    def save(self, path: Path) -> None:
        self._tok.save_pretrained(path / "tokenizer")


class CorpusTokenizer:
    """A BPE vocabulary learned from the training captions (`tokenizers`): for an LM trained from
    scratch on one domain, a few thousand tokens instead of CLIP's 49,408 make the output layer,
    which dominates a small LM's cost, ~20x cheaper. Spec "corpus:N" learns at most N tokens."""

    FILE = "tokenizer.json"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.name = "corpus"
        self.vocab_size = tokenizer.get_vocab_size()
        self.bos_id, self.eos_id = tokenizer.token_to_id("[BOS]"), tokenizer.token_to_id("[EOS]")

    @classmethod
    def train(cls, captions: list[str], vocab_size: int) -> "CorpusTokenizer":
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        specials = ["[UNK]", "[BOS]", "[EOS]"]
        tok.train_from_iterator(captions, trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>",
                                                              special_tokens=specials))
        return cls(Tokenizer.from_str(cls._canonical_ids(tok.to_str(), specials)))

    @staticmethod
    def _canonical_ids(serialised: str, specials: list[str]) -> str:
        """The trainer learns the same merges every run but numbers the initial alphabet in hash
        order, which differs per process: renumber (specials, sorted alphabet, merges in order) so a
        run is reproducible and every process of a distributed run gets the same token ids."""
        import json

        spec = json.loads(serialised)
        model = spec["model"]
        merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]]
        alphabet = sorted(set(model["vocab"]) - set(specials) - set(merged))
        order = specials + alphabet + [t for t in dict.fromkeys(merged) if t not in specials]
        model["vocab"] = {token: i for i, token in enumerate(order)}
        for added in spec.get("added_tokens", []):
            added["id"] = model["vocab"][added["content"]]
        return json.dumps(spec)

    @classmethod
    def load(cls, directory: Path) -> "CorpusTokenizer":
        from tokenizers import Tokenizer

        if not (directory / cls.FILE).is_file():
            raise ModelLoadError(f"{directory / cls.FILE} is missing: this decoder's tokenizer")
        return cls(Tokenizer.from_file(str(directory / cls.FILE)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_piece(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids).strip()

    def save(self, path: Path) -> None:
        from unembed.io import atomic_path

        with atomic_path(path / self.FILE) as tmp:
            self._tok.save(str(tmp))


def make_tokenizer(config, directory: Path | None = None, captions: list[str] | None = None):
    """The tokenizer a config names; "corpus:N" is learned from `captions` or read from `directory`."""
    name = config.tokenizer or ("clip-bpe" if config.lm == "scratch" else config.lm)
    if name == "clip-bpe":
        return ClipBpeTokenizer()
    if name.startswith("corpus"):
        if directory is not None:
            return CorpusTokenizer.load(directory)
        if not captions:
            raise ModelLoadError(f"tokenizer {name!r} is learned from training captions; none were given")
        return CorpusTokenizer.train(captions, int(name.partition(":")[2] or 4000))
    if directory is not None and (directory / "tokenizer").is_dir():
        return HFTokenizer(str(directory / "tokenizer"))
    return HFTokenizer(name)


def encode_captions(tokenizer, captions: list[str], limit: int,
                    start: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, T] (the start token if asked, the caption cut to fit `limit`, the end token;
    right-padded with the end token) and lengths [N]: padding is told apart by length, not by value."""
    eos, head = tokenizer.eos_id, [tokenizer.bos_id] if start else []
    return pad_right([head + tokenizer.encode(c)[:limit - 1 - len(head)] + [eos] for c in captions], eos)


def pad_right(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists as one tensor [N, longest] right-padded with `value`, and their lengths [N]."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    tokens = torch.full((len(rows), max(map(len, rows), default=0)), value, dtype=torch.long)
    for row, seq in enumerate(rows):
        tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, lengths
