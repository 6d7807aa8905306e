"""The published checkpoints of ClipCap, CapDec and DeCap, turned into ordinary unembed decoders.

The releases are torch.save'd state dicts (PyTorch pickles). They are read ONLY with
`torch.load(weights_only=True)`, which builds nothing but tensors and plain containers, and then
accepted only as {name: tensor}; anything else is refused in one line and nothing is written.

Layouts (the projects' own model code):
- ClipCap (rmokady/CLIP_prefix_caption) and CapDec (DavidHuji/CapDec, ClipCap's code):
  `clip_project.model.0|2.*` (MLP: Linear -> Tanh -> Linear, hidden gpt_dim*k/2, out gpt_dim*k)
  or the transformer mapper (`clip_project.linear`, `clip_project.prefix_const` [k, gpt_dim],
  `clip_project.transformer.layers.N.{norm1, attn.to_queries, attn.to_keys_values, attn.project,
  norm2, mlp.fc1, mlp.fc2}`: pre-norm layers, 8 heads, q/kv without bias, MLP ratio 2, ReLU),
  and `gpt.*`, a GPT2LMHeadModel (absent when the LM was frozen and not saved: the base is then
  referenced). ClipCap feeds CLIP's embedding as it is; CapDec normalises it.
- DeCap (dhg-wei/DeCap): `decoder.*` (a GPT2LMHeadModel on CLIP's BPE, 4 heads) and
  `clip_project.model.0` (one Linear: a one-vector prefix); trained on captions that start with
  CLIP's start token; decodes greedily to the end token after projecting the image embedding onto
  a memory of caption embeddings (softmax of 100 x cosine).
What the file does not say is taken from flags: the embedder, the LM (whose config and tokenizer
give the rest), the number of heads.
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from unembed.errors import BadInputError, ModelLoadError, UnsafeFileError

KINDS = ("clipcap", "capdec", "decap")
DEFAULT_EMBEDDER = "ViT-B-32:openai"  # the CLIP all three papers used
STALE_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # older transformers saved these (ClipCap #76)
OFFICIAL_LENGTH = 67  # ClipCap's generate2: at most 67 tokens, greedy, until "."


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """A published checkpoint as {name: tensor}, loaded without running any of its code."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "no such file")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols; the line below says it all
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a planted object: torch's safe unpickler would not build it
        raise UnsafeFileError(f"{path}: refused: not a plain tensor checkpoint (it holds objects other than "
                              "tensors, which unpickling would construct or run)") from None
    except Exception as e:  # not a torch.save file at all, or a damaged one
        raise UnsafeFileError(f"{path}: refused: not a plain tensor checkpoint ({type(e).__name__})") from None
    for key in ("state_dict", "model"):  # some releases wrap the state dict
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not loaded or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise UnsafeFileError(f"{path}: refused: expected a state dict of named tensors")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def import_published(kind: str, file, out, embedder: str | None = None, lm: str | None = None,
                     prefix_length: int | None = None, mapper: str | None = None, heads: int | None = None,
                     memory_captions: list[str] | None = None, log=lambda message: None,
                     overwrite: bool = False) -> dict:
    """Write `file` (a published `kind` checkpoint) as a decoder directory `out`, which must be new,
    empty, or (with `overwrite`) a decoder it replaces; returns its config."""
    from unembed.decoders.base import DECODER_FORMAT
    from unembed.io import check_out_dir

    if kind not in KINDS:
        raise BadInputError(kind, f"is not a published format this imports ({', '.join(KINDS)})")
    check_out_dir(out, DECODER_FORMAT, overwrite)  # before the work: a refused --out costs nothing
    state = read_checkpoint(file)
    if kind == "decap":
        decoder = _decap(state, file, embedder or DEFAULT_EMBEDDER, heads, memory_captions, log)
    else:
        decoder = _clipcap(kind, state, file, embedder or DEFAULT_EMBEDDER, lm or "gpt2", prefix_length, mapper,
                           heads, log)
    decoder.save(out, replace=True)  # written beside `out`, renamed into place
    return decoder.config.to_dict()


def _embedder_identity(spec: str) -> tuple[str, str]:
    """(spec, id) without loading weights: a pretrained name is its own id; a directory says its id."""
    from unembed.io import read_json

    from unembed.embedders import canonical_embedder_id

    if Path(spec).is_dir():
        config = read_json(Path(spec) / "config.json")
        return str(spec), config.get("id", "")
    if not spec.startswith("hf-hub:"):  # a hub repo is built from its own config, as named
        spec = canonical_embedder_id(spec)  # "ViT-B-32:openai" is built as "ViT-B-32-quickgelu:openai"
    return spec, spec


def _load_into(decoder, tensors: dict, file, allowed_missing: tuple[str, ...]) -> None:
    result = decoder.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing)]
    if missing or result.unexpected_keys:
        raise BadInputError(file, f"does not fit the model its shapes describe (missing {missing[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]})")


def _gpt2_config(lm_state: dict, base: dict, heads: int | None) -> dict:
    """A GPT-2 config from the checkpoint's tensor shapes, the rest from `base` (the LM's own config)."""
    layers = {int(m.group(1)) for k in lm_state if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    vocab, width = lm_state["transformer.wte.weight"].shape
    config = {**base, "model_type": "gpt2", "vocab_size": vocab, "n_embd": width, "n_layer": max(layers) + 1,
              "n_positions": lm_state["transformer.wpe.weight"].shape[0]}
    config["n_head"] = heads or base.get("n_head") or max(1, width // 64)
    if width % config["n_head"]:
        raise BadInputError("--heads", f"{config['n_head']} heads do not divide the LM width {width}")
    return config


def _lm_part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k.endswith(STALE_GPT2_BUFFERS)}


def _clipcap(kind, state, file, embedder, lm, prefix_length, mapper, heads, log):
    from unembed.decoders import decoder_class
    from unembed.hub import TEXT_FILES, resolve, snapshot_revision
    from unembed.tokenizers import HFTokenizer

    project = {k[len("clip_project."):]: v for k, v in state.items() if k.startswith("clip_project.")}
    lm_state = _lm_part(state, "gpt.")
    if not project:
        raise BadInputError(file, "has no clip_project.* tensors: not a ClipCap/CapDec checkpoint")
    # its config and tokenizer say what the checkpoint does not (its weights are in the checkpoint)
    lm_path = resolve(lm, "LM", allow_patterns=TEXT_FILES)
    base = _json(lm_path / "config.json")
    found = "transformer" if "prefix_const" in project else "mlp"
    if mapper and mapper != found:
        raise BadInputError(file, f"holds a {found} mapper, not {mapper}")
    width = lm_state["transformer.wte.weight"].shape[1] if lm_state else base["n_embd"]
    mapped, options = _clipcap_mapper(project, width, prefix_length, file)
    spec, embedder_id = _embedder_identity(embedder)
    cls = decoder_class(kind)
    lm_options = (dict(lm_mode="full", lm_config=_gpt2_config(lm_state, base, heads)) if lm_state
                  else dict(lm_mode="frozen"))
    if not lm_state:
        log(f"{file} holds no gpt.* weights (a frozen LM): the decoder references {lm!r}")
    positions = lm_options.get("lm_config", base).get("n_positions", 1024)
    config = cls.config_class(embedder_spec=spec, embedder_id=embedder_id, embed_dim=options.pop("embed_dim"),
                              lm=lm, lm_revision=snapshot_revision(lm_path), tokenizer=lm,
                              normalize=kind == "capdec", noise_variance=0.0, num_beams=1, stop=".",
                              no_repeat_ngram_size=0,
                              max_length=min(OFFICIAL_LENGTH, positions - options["prefix_length"]),
                              **options, **lm_options)
    decoder = cls(config, HFTokenizer(str(lm_path)))
    tensors = {f"mapper.{k}": v for k, v in mapped.items()}
    tensors.update({f"lm.{k}": v for k, v in lm_state.items()})
    _load_into(decoder, tensors, file, ("bridge.",) + (("lm.",) if not lm_state else ("lm.lm_head.",)))
    return decoder


def _clipcap_mapper(project: dict, width: int, prefix_length: int | None, file) -> tuple[dict, dict]:
    """The mapper's tensors under unembed's names, and the config options its shapes give."""
    if "prefix_const" not in project:
        first, second = project.get("model.0.weight"), project.get("model.2.weight")
        if first is None or second is None:
            raise BadInputError(file, "has neither ClipCap's MLP (clip_project.model.0/2) nor its transformer mapper")
        k = second.shape[0] // width
        if prefix_length and prefix_length != k:
            raise BadInputError(file, f"its MLP makes {k} prefix tokens of width {width}, not {prefix_length}")
        mapped = {k2.replace("model.", "net.", 1): v for k2, v in project.items() if k2.startswith(("model.0.", "model.2."))}
        return mapped, dict(mapper="mlp", prefix_length=k, embed_dim=first.shape[1])
    constants, linear = project["prefix_const"], project["linear.weight"]
    k, mapper_length = constants.shape[0], linear.shape[0] // constants.shape[1]
    layers = sorted({int(m.group(1)) for key in project if (m := re.match(r"transformer\.layers\.(\d+)\.", key))})
    mapped = {"constants": constants, "linear.weight": linear, "linear.bias": project["linear.bias"]}
    for i in layers:
        p, q = f"transformer.layers.{i}.", f"transformer.layers.{i}."
        query, keys_values = project[p + "attn.to_queries.weight"], project[p + "attn.to_keys_values.weight"]
        bias = torch.cat([project.get(p + "attn.to_queries.bias", torch.zeros(query.shape[0])),
                          project.get(p + "attn.to_keys_values.bias", torch.zeros(keys_values.shape[0]))])
        mapped.update({q + "self_attn.in_proj_weight": torch.cat([query, keys_values]),
                       q + "self_attn.in_proj_bias": bias,
                       q + "self_attn.out_proj.weight": project[p + "attn.project.weight"],
                       q + "self_attn.out_proj.bias": project[p + "attn.project.bias"]})
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2")):
            mapped[q + ours + ".weight"], mapped[q + ours + ".bias"] = project[p + theirs + ".weight"], project[
                p + theirs + ".bias"]
    return mapped, dict(mapper="transformer", prefix_length=k, mapper_length=mapper_length,
                        mapper_layers=len(layers), embed_dim=linear.shape[1])


def _decap(state, file, embedder, heads, memory_captions, log):
    from unembed.decoders import decoder_class

    lm_state = _lm_part(state, "decoder.")
    project = state.get("clip_project.model.0.weight")
    if not lm_state or project is None:
        raise BadInputError(file, "has no decoder.* and clip_project.model.0 tensors: not a DeCap checkpoint")
    spec, embedder_id = _embedder_identity(embedder)
    lm_config = _gpt2_config(lm_state, {"n_head": 4}, heads)  # DeCap's decoder_config: 4 heads
    cls = decoder_class("decap")
    size = len(memory_captions or [])
    config = cls.config_class(embedder_spec=spec, embedder_id=embedder_id, embed_dim=project.shape[1],
                              lm="scratch", tokenizer="clip-bpe", lm_config=lm_config, start_token=True,
                              projection_size=size, max_length=30, num_beams=1, no_repeat_ngram_size=0)
    decoder = cls(config)
    tensors = {"mapper.net.weight": project, "mapper.net.bias": state["clip_project.model.0.bias"]}
    tensors.update({f"lm.{k}": v for k, v in lm_state.items()})
    _load_into(decoder, tensors, file, ("bridge.", "lm.lm_head."))
    if size:
        from unembed.embedders import load_embedder

        vectors = load_embedder(embedder, "cpu").embed_texts(memory_captions)
        decoder.bridge.fit(vectors, None, memory_captions, vectors)
    else:
        log("no --memory captions: the decoder decodes image embeddings without DeCap's projection onto a caption "
            "memory, which the published numbers use")
    return decoder


def _json(path: Path) -> dict:
    from unembed.io import read_json

    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: the LM's config")
    return read_json(path)
