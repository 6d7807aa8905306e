"""The causal LMs decoders are built on: a GPT-2-architecture LM from scratch, or any Hugging Face
causal LM, and how it is trained (frozen, LoRA adapters through peft, or fully). Shared by the
prefix decoders, the iterative decoder and `training/lm.py`.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from unembed.compat import import_transformers
from unembed.errors import ModelLoadError
from unembed.hub import is_local, resolve, snapshot_revision

SCRATCH_LM = dict(model_type="gpt2", n_layer=4, n_head=4, n_embd=768, n_positions=96)


LM_INSIDE, LM_REFERENCED = "inside", "referenced"  # config.lm_weights: where a saved decoder's LM weights are


def lm_is_referenced(config) -> bool:
    """Whether a decoder keeps only a reference to its base LM (hub id + revision) instead of a copy.
    A saved decoder says so itself (`lm_weights`, recorded at save): never inferred from what exists on
    the loading machine. A decoder being created references a hub LM that is not fine-tuned (frozen,
    or LoRA whose adapter is saved as an adapter), unless `save_full_lm` asks for a self-contained
    directory; a local directory or a scratch LM is copied."""
    if getattr(config, "lm_weights", ""):
        return config.lm_weights == LM_REFERENCED
    return (config.lm != "scratch" and not is_local(config.lm) and getattr(config, "lm_mode", "frozen") != "full"
            and not getattr(config, "save_full_lm", False))


def names_a_folder(name: str) -> bool:
    return bool(name) and (is_local(name) or os.path.isabs(name) or name.startswith(("./", "../", "~")))


def record_lm(config) -> None:
    """What a saved config says of its LM: whether the weights are inside the decoder or referenced,
    and, for an LM read from a folder, what it is (its architecture, in lm_config) instead of where
    it lay on the machine that built the decoder: that folder exists nowhere else."""
    config.lm_weights = LM_REFERENCED if lm_is_referenced(config) else LM_INSIDE
    if config.lm_weights == LM_INSIDE and names_a_folder(config.lm):
        config.lm = f"local:{config.lm_config.get('model_type', 'lm')}"
    if names_a_folder(getattr(config, "tokenizer", "")):
        config.tokenizer = "saved"  # the tokenizer is saved inside the decoder (tokenizers.make_tokenizer reads it)


def saved_lm_weights(path: Path) -> str:
    """Whether a decoder saved before `lm_weights` was recorded holds its LM: read from its weights
    file (tensor names only), not from whether its LM's folder exists here."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return LM_INSIDE if any(k.startswith("lm.") for k in f.keys()) else LM_REFERENCED
    except Exception:  # noqa: BLE001 - a missing or damaged file is refused, in one line, when the weights load
        return ""


def pretrained_lm(name: str, revision: str | None = None) -> tuple[nn.Module, str]:
    """A hub or local causal LM with its weights, and the snapshot revision it resolved to."""
    path = resolve(name, "LM", revision)
    try:
        lm = import_transformers().AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load LM {name!r} from {path}: {str(e).splitlines()[0]}") from None
    return lm, snapshot_revision(path)


def build_lm(config, tokenizer) -> nn.Module:
    """The LM a config names, with its full HF config recorded back into `config.lm_config` (and a hub
    LM's revision into `config.lm_revision`). A new decoder's LM comes with its pretrained weights; a
    saved one is rebuilt from its recorded config (its weights are in the decoder's own file), or,
    when it only references its base, from the base at the recorded revision."""
    transformers = import_transformers()
    if config.lm == "scratch" and "vocab_size" not in config.lm_config:
        config.lm_config = scratch_lm_config(tokenizer, config.lm_config)
    if config.lm_config and not lm_is_referenced(config):
        lm = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config.lm_config))
    elif config.lm == "scratch":
        raise ModelLoadError("a scratch LM needs lm_config")
    else:
        lm, revision = pretrained_lm(config.lm, config.lm_revision or None)
        config.lm_revision = config.lm_revision or revision
    config.lm_config = {k: v for k, v in lm.config.to_diff_dict().items() if not k.startswith("_")}
    config.lm_config["model_type"] = lm.config.model_type
    return lm


def scratch_lm_config(tokenizer, overrides: dict | None = None) -> dict:
    cfg = dict(SCRATCH_LM, **(overrides or {}))
    return dict(cfg, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)


def apply_lm_mode(lm: nn.Module, mode: str, lora_r: int, adapter: Path | None = None) -> nn.Module:
    """The LM as it trains: whole, frozen, or with LoRA adapters; a saved adapter (peft's own
    directory) is loaded by peft from its adapter_config.json, with the rank, alpha and targets it
    was trained with."""
    if mode == "full":
        return lm
    if mode == "frozen":
        lm.requires_grad_(False)
        return lm
    if mode == "lora" and adapter is not None:
        return load_adapter(lm, adapter)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # GPT-2 stores its projections as Conv1D (weights transposed), which LoRA must be told.
        gpt2_like = getattr(lm.config, "model_type", "") == "gpt2"
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, fan_in_fan_out=gpt2_like,
                          target_modules=["c_attn", "c_proj"] if gpt2_like else None)
        return get_peft_model(lm, lora)
    raise ModelLoadError(f"unknown LM mode {mode!r} (frozen | lora | full)")


def load_adapter(lm: nn.Module, adapter: Path) -> nn.Module:
    from peft import PeftModel

    if not (adapter / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"{adapter} is missing its adapter_model.safetensors (this decoder's LoRA adapter)")
    try:
        return PeftModel.from_pretrained(lm, str(adapter), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{adapter}: peft cannot load this LoRA adapter onto the base LM "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def saved_adapter(path: Path | None) -> Path | None:
    """The peft adapter directory a saved decoder holds, if any."""
    return path / ADAPTER_DIR if path is not None and (path / ADAPTER_DIR / "adapter_config.json").is_file() else None


# --- what a decoder saves of its LM ----------------------------------------------------------------

ADAPTER_DIR = "adapter"  # peft's own format: adapter_config.json + adapter_model.safetensors


class LMWeights:
    """Mixin for decoders with an `lm` and a config with `lm`, `lm_weights`, `lm_revision`,
    `save_full_lm`: a decoder that references its base LM saves its own tensors (mapper, bridge)
    without the LM's; anything else is saved whole. A LoRA adapter is also saved in peft's own format
    (adapter_config.json naming the hub base and revision, never a folder of this machine) and
    reloaded by peft from it."""

    def save_weights(self, path: Path) -> None:
        from unembed.io import save_module, save_tensors

        record_lm(self.config)
        if hasattr(self.lm, "peft_config"):
            self._save_adapter(path / ADAPTER_DIR)
        if not lm_is_referenced(self.config):
            return save_module(path / "model.safetensors", self)
        own = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("lm.")}
        save_tensors(path / "model.safetensors", own, {"lm": self.config.lm, "lm_revision": self.config.lm_revision})

    def _save_adapter(self, adapter: Path) -> None:
        import shutil
        import tempfile

        peft_config = self.lm.peft_config["default"]
        referenced = lm_is_referenced(self.config)
        # A hub base is named with its revision; a base whose weights are inside the decoder is named by nothing.
        saved = (peft_config.base_model_name_or_path, peft_config.revision)
        peft_config.base_model_name_or_path = self.config.lm if referenced else None
        peft_config.revision = (self.config.lm_revision or None) if referenced else None
        adapter.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=adapter.parent, prefix=".adapter-"))
        try:
            self.lm.save_pretrained(staging, save_embedding_layers=False)  # the base keeps its own
            card = staging / "README.md"
            if card.is_file():  # peft's card names the base it read: a hub id, or nothing
                card.write_text(_adapter_card(self.config.lm if referenced else None))
            if adapter.exists():
                shutil.rmtree(adapter)
            staging.rename(adapter)
        finally:
            peft_config.base_model_name_or_path, peft_config.revision = saved
            shutil.rmtree(staging, ignore_errors=True)

    def load_weights(self, path: Path) -> None:
        from unembed.errors import BadInputError
        from unembed.io import load_module, load_tensors

        if not lm_is_referenced(self.config):
            return load_module(self, path / "model.safetensors")
        tensors, _ = load_tensors(path / "model.safetensors")
        expected = {k for k in self.state_dict() if not k.startswith("lm.")}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise BadInputError(path / "model.safetensors", f"does not match the model (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
        self.load_state_dict(tensors, strict=False)
        if getattr(self.config, "lm_mode", "") == "lora" and not hasattr(self.lm, "peft_config"):
            raise BadInputError(path / ADAPTER_DIR, "is missing: this decoder's LoRA adapter")

    @classmethod
    def upgrade_config(cls, config: dict, format_version: int, path: Path | None = None) -> dict:
        """Decoders saved before format 2 kept every LM whole; before format 3 they did not record
        where their LM's weights are, so their weights file says."""
        if format_version < 2 and "lm" in config:
            config = dict(config, save_full_lm=True)
        if format_version < 3 and "lm" in config and not config.get("lm_weights"):
            found = LM_INSIDE if config.get("save_full_lm") else saved_lm_weights(path) if path is not None else ""
            if found:  # else the weights file is missing or damaged, which loading reports
                config = dict(config, lm_weights=found)
        return config


def _adapter_card(base: str | None) -> str:
    lines = ["---", "library_name: peft"] + ([f"base_model: {base}"] if base else []) + ["---", "",
             "A LoRA adapter of an unembed decoder" + (f" over `{base}`." if base else
                                                       "; its base LM's weights are in the decoder's model.safetensors."), ""]
    return "\n".join(lines)
