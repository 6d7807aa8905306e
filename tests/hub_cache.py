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
