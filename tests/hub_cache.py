"""A Hugging Face hub cache written in the hub's own on-disk layout, holding small models of the
real architectures under the real names the README uses, for running the README's "real
pretrained models" commands offline (HF_HOME pointing here, HF_HUB_OFFLINE=1):

    HF_HOME/hub/models--ORG--NAME/refs/main          the commit hash "main" points at
    HF_HOME/hub/models--ORG--NAME/blobs/SHA256       file contents
    HF_HOME/hub/models--ORG--NAME/snapshots/HASH/F   relative symlinks into blobs/

- "gpt2": a 2-layer GPT-2 (config.json, model.safetensors) with a byte-level BPE tokenizer trained
  on the given captions and saved by transformers (tokenizer.json, vocab.json, merges.txt);
- "laion/CLIP-ViT-B-32-laion2B-s34B-b79K": an open_clip ViT CLIP (open_clip_config.json +
  open_clip_model.safetensors), as open_clip's `hf-hub:` loader reads it;
- "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k": an open_clip CoCa, the same way.
The libraries (transformers, open_clip, huggingface_hub) do all the loading; nothing is mocked.
The weights are random: these test the path, not the quality.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

GPT2 = "gpt2"
CLIP = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
COCA = "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def add_repo(hub: Path, repo: str, files: Path, revision_seed: str = "") -> str:
    """Put the files of directory `files` into the cache as repo `repo` at a new commit; returns it."""
    root = hub / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1((repo + revision_seed).encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(p for p in files.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / f.relative_to(files)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return commit


def _gpt2(out: Path, captions: list[str]) -> None:
    from tokenizers import ByteLevelBPETokenizer

    from unembed.compat import import_transformers

    transformers = import_transformers()
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel
    GPT2TokenizerFast = transformers.GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=128)
    tokenizer.save_pretrained(out)
    eos = tokenizer.eos_token_id
    # Weights at 0.5, not GPT-2's 0.02: a random LM at its own init scale writes one caption whatever
    # prefix it is given, and tests of decoders over it need captions that depend on their input.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos, initializer_range=0.5)
    import torch

    torch.manual_seed(0)  # the same weights on every run, whatever drew from the global RNG before
    GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)


def _open_clip(out: Path, coca: bool) -> None:
    import torch

    from unembed.compat import import_open_clip

    open_clip = import_open_clip()
    from safetensors.torch import save_file

    width, image = 64, 32
    model_cfg = {"embed_dim": width,
                 "vision_cfg": {"image_size": image, "patch_size": 8, "width": width, "layers": 1, "head_width": 32},
                 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1}}
    if coca:
        model_cfg["custom_text"] = True
        model_cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=9, attn_pooler_heads=2,
                                       output_tokens=True)
        model_cfg["text_cfg"].update(embed_cls=True, output_tokens=True)
        model_cfg["multimodal_cfg"] = {"context_length": 32, "vocab_size": 49408, "width": width, "heads": 2,
                                       "layers": 1, "attn_pooler_heads": 2}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    arch = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    model = open_clip.CoCa(**arch) if coca else open_clip.CLIP(**arch, output_dict=True)
    if coca:  # open_clip leaves this projection uninitialised (torch.empty)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=width ** -0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))


def write_hub_cache(hf_home: Path, captions: list[str]) -> dict[str, str]:
    """Write the cache under hf_home/hub; returns {repo: commit}."""
    hub = Path(hf_home) / "hub"
    made = {}
    for repo, make in ((GPT2, lambda d: _gpt2(d, captions)), (CLIP, lambda d: _open_clip(d, coca=False)),
                       (COCA, lambda d: _open_clip(d, coca=True))):
        with tempfile.TemporaryDirectory() as staging:
            make(Path(staging))
            made[repo] = add_repo(hub, repo, Path(staging))
    return made


def add_decoder_repo(hf_home: Path, repo: str, decoder_dir: Path) -> str:
    """Publish a decoder directory into the cache, as `huggingface-cli upload` then a download would."""
    with tempfile.TemporaryDirectory() as staging:
        shutil.copytree(decoder_dir, Path(staging) / "d", symlinks=False)
        return add_repo(Path(hf_home) / "hub", repo, Path(staging) / "d")


OPENAI_VIT_B_32 = "timm/vit_base_patch32_clip_224.openai"  # where open_clip's "ViT-B-32:openai" weights live


def add_openai_vit_b_32(hf_home: Path, seed: int = 0) -> dict:
    """OpenAI's ViT-B/32 in the hub layout open_clip's "openai" tag downloads from: the repo
    OPENAI_VIT_B_32 holding open_clip_model.safetensors with the keys and shapes of open_clip's
    ViT-B-32-quickgelu, random fp16 values (~300 MB, a few seconds; made without building the model).
    Returns a few of the tensors, to tell that a load gave these weights."""
    import torch
    from safetensors.torch import save_file

    from unembed.compat import import_open_clip

    open_clip = import_open_clip()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in open_clip.create_model("ViT-B-32-quickgelu", device="meta").state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(shape, generator=generator) * 0.02).half() for k, shape in shapes.items()}
    with tempfile.TemporaryDirectory() as staging:
        save_file(state, str(Path(staging) / "open_clip_model.safetensors"))
        add_repo(Path(hf_home) / "hub", OPENAI_VIT_B_32, Path(staging))
    return {k: state[k] for k in ("visual.class_embedding", "logit_scale", "text_projection")}


# --- the pretrained zoo's sources (unembed/zoo.py) -------------------------------------------------------
# Each under its real repo id and file name, in its real key layout, with tiny random weights:
# - ClipCap's releases as the community mirrors hold them (`coco_weights.pt`, `conceptual_weights.pt`):
#   a torch.save'd state dict of ClipCaptionModel, `clip_project.model.0/2` (the MLP for k = 10 prefix
#   tokens over the LM's width) and `gpt.*` (a fine-tuned GPT2LMHeadModel, with the `attn.bias` (uint8)
#   and `attn.masked_bias` buffers the transformers of 2021 saved);
# - the CLIP they were trained on, OpenAI's ViT-B/32, as timm's open_clip repo holds it
#   (open_clip_config.json with quick_gelu, open_clip_model.safetensors);
# - open_clip's COCO-finetuned CoCas as LAION's repos hold them (open_clip_config.json,
#   open_clip_pytorch_model.bin written by torch.save).
# open_clip's own factory builds each model from the config written here, so the keys are the ones
# open_clip loads.

ZOO_CLIPCAP = {"akhaliq/CLIP-prefix-captioning-COCO-weights": "coco_weights.pt",
               "akhaliq/CLIP-prefix-captioning-conceptual-weights": "conceptual_weights.pt"}
ZOO_COCA = ("laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k",
            "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k")
ZOO_CLIP_DIM = 32
CLIPCAP_PREFIX = 10
ZOO_CAPTIONS = ["a red square on a white background.", "a blue circle next to a green triangle.",
                "two yellow squares in a row.", "a small black circle above a large red square.",
                "a green triangle on a striped background.", "three circles of different colours."]


def tiny_open_clip_repo(out: Path, coca: bool, weights: str, seed: int = 0) -> None:
    """A tiny open_clip model as an hf-hub repo holds it: open_clip_config.json ({"model_cfg",
    "preprocess_cfg"}, as open_clip's push_to_hf_hub writes it) and its weights as `weights`
    (a .safetensors file, or a .bin written by torch.save)."""
    import logging

    import torch
    from safetensors.torch import save_file

    from unembed.compat import import_open_clip

    open_clip = import_open_clip()
    width = ZOO_CLIP_DIM
    vision = {"image_size": 32, "layers": 1, "width": width, "patch_size": 8, "head_width": 16}
    text = {"context_length": 20 if coca else 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1}
    if coca:
        vision.update(attentional_pool=True, attn_pooler_queries=9, attn_pooler_heads=2, output_tokens=True)
        text.update(embed_cls=True, output_tokens=True)
        model_cfg = {"embed_dim": width, "vision_cfg": vision, "text_cfg": text,
                     "multimodal_cfg": {"context_length": 20, "vocab_size": 49408, "width": width, "heads": 2,
                                        "layers": 1, "attn_pooler_heads": 2}, "custom_text": True}
        preprocess = {}
    else:
        model_cfg = {"embed_dim": width, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}
        preprocess = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                          indent=2))
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip warns that the folder holds no weights yet
    try:
        model = open_clip.create_model(f"local-dir:{out}", device="cpu")
    finally:
        logging.disable(logging.NOTSET)
    if coca:  # open_clip leaves this projection uninitialised (torch.empty)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=width ** -0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, str(out / weights))
    else:
        torch.save(state, out / weights)


def clipcap_release(gpt2_dir: Path, seed: int) -> dict:
    """A ClipCap release's state dict: the MLP mapper (clip -> 10 * width / 2 -> 10 * width, Tanh
    between) and a fine-tuned GPT-2 of the base's config (its own weights, large enough for the prefix
    to steer the words), with the buffers the transformers of 2021 saved."""
    import torch

    from unembed.compat import import_transformers

    transformers = import_transformers()
    config = transformers.GPT2Config.from_pretrained(gpt2_dir)
    config.initializer_range = 0.5
    torch.manual_seed(seed)
    gpt = transformers.GPT2LMHeadModel(config)
    width, k, n = config.n_embd, CLIPCAP_PREFIX, config.n_positions
    generator = torch.Generator().manual_seed(seed)
    state = {"clip_project.model.0.weight": torch.randn(width * k // 2, ZOO_CLIP_DIM, generator=generator) * 0.3,
             "clip_project.model.0.bias": torch.randn(width * k // 2, generator=generator) * 0.1,
             "clip_project.model.2.weight": torch.randn(width * k, width * k // 2, generator=generator) * 0.3,
             "clip_project.model.2.bias": torch.randn(width * k, generator=generator) * 0.1}
    state.update({f"gpt.{key}": value for key, value in gpt.state_dict().items()})
    for i in range(config.n_layer):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def add_zoo_source(hf_home: Path, repo: str, seed: int = 0) -> str:
    """Put zoo source repo `repo` into the cache at a new commit (another `seed`: other bytes, as an
    upstream update would bring); returns the commit."""
    import torch

    hub = Path(hf_home) / "hub"
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        if repo in ZOO_CLIPCAP:
            gpt2 = next((hub / ("models--" + GPT2) / "snapshots").iterdir())
            torch.save(clipcap_release(gpt2, seed), staging / ZOO_CLIPCAP[repo])
        elif repo in ZOO_COCA:
            tiny_open_clip_repo(staging, coca=True, weights="open_clip_pytorch_model.bin", seed=seed)
        elif repo == OPENAI_VIT_B_32:
            tiny_open_clip_repo(staging, coca=False, weights="open_clip_model.safetensors", seed=seed)
        else:
            raise ValueError(f"no zoo source {repo}")
        return add_repo(hub, repo, staging, revision_seed=f"-{seed}" if seed else "")


def write_zoo_cache(hf_home: Path) -> dict[str, str]:
    """A hub cache holding every zoo entry's sources: GPT-2's config and tokenizer (the tiny "gpt2"),
    the ClipCap releases, the OpenAI ViT-B/32 repo they embed with, and the two CoCas; {repo: commit}."""
    hub = Path(hf_home) / "hub"
    made = {}
    with tempfile.TemporaryDirectory() as staging:
        _gpt2(Path(staging), ZOO_CAPTIONS)
        made[GPT2] = add_repo(hub, GPT2, Path(staging))
    for repo in (OPENAI_VIT_B_32, *ZOO_CLIPCAP, *ZOO_COCA):
        made[repo] = add_zoo_source(hf_home, repo)
    return made
