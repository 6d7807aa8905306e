"""The causal LMs decoders are built on: a GPT-2-architecture LM from scratch, or any Hugging Face
causal LM, and how it is trained (frozen, LoRA adapters through peft, or fully). Shared by the
prefix decoders, the iterative decoder and `training/lm.py`.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from unembed.compat import import_transformers
from unembed.errors import ModelLoadError

SCRATCH_LM = dict(model_type="gpt2", n_layer=4, n_head=4, n_embd=768, n_positions=96)


def make_lm(config, tokenizer) -> nn.Module:
    """Build the LM from its recorded config (no download); a hub LM's weights are fetched only when
    a new decoder is created, and saved with the decoder after that."""
    transformers = import_transformers()
    if config.lm_config:
        hf_config = transformers.AutoConfig.for_model(**config.lm_config)
        return transformers.AutoModelForCausalLM.from_config(hf_config)
    if config.lm == "scratch":
        raise ModelLoadError("a scratch LM needs lm_config")
    from unembed.embedders import hub_reachable

    if not Path(config.lm).is_dir() and not hub_reachable():
        raise ModelLoadError(f"cannot download LM {config.lm!r}: the Hugging Face hub is unreachable. Offline, use "
                             "--lm scratch (a GPT-2-architecture LM trained from scratch on your captions)")
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(config.lm)
    except OSError as e:
        raise ModelLoadError(f"cannot load LM {config.lm!r}: {str(e).splitlines()[0]}") from None


def build_lm(config, tokenizer) -> nn.Module:
    """The LM a config names, with its full HF config recorded back into `config.lm_config` so a saved
    decoder rebuilds it offline; a scratch LM's size overrides are completed from the tokenizer first."""
    if config.lm == "scratch" and "vocab_size" not in config.lm_config:
        config.lm_config = scratch_lm_config(tokenizer, config.lm_config)
    lm = make_lm(config, tokenizer)
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
