"""The causal LMs decoders are built on: a GPT-2-architecture LM from scratch, or any Hugging Face
causal LM, and how it is trained (frozen, LoRA adapters through peft, or fully). Shared by the
prefix decoders, the iterative decoder and `training/lm.py`.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from unembed.compat import import_transformers
from unembed.errors import ModelLoadError
from unembed.hub import is_local, resolve, snapshot_revision

SCRATCH_LM = dict(model_type="gpt2", n_layer=4, n_head=4, n_embd=768, n_positions=96)


def lm_is_referenced(config) -> bool:
    """Whether a decoder keeps only a reference to its base LM (hub id + revision) instead of a copy:
    a hub LM that is not fine-tuned (frozen, or LoRA whose adapter is saved as an adapter), unless
    `save_full_lm` asks for a self-contained directory. A local directory or a scratch LM is copied."""
    return (config.lm != "scratch" and not is_local(config.lm) and getattr(config, "lm_mode", "frozen") != "full"
            and not getattr(config, "save_full_lm", False))


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


def apply_lm_mode(lm: nn.Module, mode: str, lora_r: int) -> nn.Module:
    if mode == "full":
        return lm
    if mode == "frozen":
        lm.requires_grad_(False)
        return lm
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # GPT-2 stores its projections as Conv1D (weights transposed), which LoRA must be told.
        gpt2_like = getattr(lm.config, "model_type", "") == "gpt2"
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, fan_in_fan_out=gpt2_like,
                          target_modules=["c_attn", "c_proj"] if gpt2_like else None)
        return get_peft_model(lm, lora)
    raise ModelLoadError(f"unknown LM mode {mode!r} (frozen | lora | full)")


# --- what a decoder saves of its LM ----------------------------------------------------------------

ADAPTER_DIR = "adapter"  # peft's own format: adapter_config.json + adapter_model.safetensors


class LMWeights:
    """Mixin for decoders with an `lm` and a config with `lm`, `lm_revision`, `save_full_lm`: a
    decoder that references its base LM saves its own tensors (mapper, bridge) without the LM's,
    plus a LoRA adapter in peft's format naming the base and revision; anything else is saved whole."""

    def save_weights(self, path: Path) -> None:
        from unembed.io import save_module, save_tensors

        if not lm_is_referenced(self.config):
            return save_module(path / "model.safetensors", self)
        own = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("lm.")}
        save_tensors(path / "model.safetensors", own, {"lm": self.config.lm, "lm_revision": self.config.lm_revision})
        if hasattr(self.lm, "peft_config"):
            peft_config = self.lm.peft_config["default"]
            peft_config.base_model_name_or_path, peft_config.revision = self.config.lm, self.config.lm_revision or None
            self.lm.save_pretrained(path / ADAPTER_DIR, save_embedding_layers=False)  # the base keeps its own

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
        if hasattr(self.lm, "peft_config"):
            self._load_adapter(path / ADAPTER_DIR)

    def _load_adapter(self, adapter: Path) -> None:
        from peft import set_peft_model_state_dict

        from unembed.errors import BadInputError
        from unembed.io import load_tensors

        weights = adapter / "adapter_model.safetensors"
        if not weights.is_file():
            raise BadInputError(adapter, "is missing its adapter_model.safetensors (this decoder's LoRA adapter)")
        tensors, _ = load_tensors(weights)
        result = set_peft_model_state_dict(self.lm, tensors)
        if getattr(result, "unexpected_keys", None):
            raise BadInputError(weights, f"does not fit the base LM {self.config.lm!r}: unexpected "
                                f"{sorted(result.unexpected_keys)[:3]}")

    @classmethod
    def upgrade_config(cls, config: dict, format_version: int) -> dict:
        """Decoders saved before format 2 kept every LM whole."""
        if format_version < 2 and "lm" in config:
            config = dict(config, save_full_lm=True)
        return config
