"""LoRA adapters over a hub LM are saved in peft's own format and reloaded by peft from their
adapter_config.json: an adapter with a non-default alpha and target list, trained a few steps (so its
B matrices are not zero), reloads in a fresh process and gives the trained model's logits, which
differ from the base LM's. Its config and card name the hub base, never a folder of this machine."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.hub_cache import GPT2, write_hub_cache


@pytest.fixture(scope="module")
def hub(tmp_path_factory, scenes_dir):
    from unembed.data.splits import split_captions

    home = tmp_path_factory.mktemp("hf")
    write_hub_cache(home, split_captions(scenes_dir / "train"))
    return home


def _probe(decoder):
    """The LM's logits after a fixed prefix, for a fixed caption."""
    torch.manual_seed(0)
    vectors = torch.randn(2, decoder.config.embed_dim)
    with torch.no_grad():
        head, mask = decoder.lm_inputs(decoder.prefix(vectors), None)
        ids = torch.tensor([decoder.tokenizer.encode("a red circle")] * 2)
        embeds = torch.cat([head, decoder.lm.get_input_embeddings()(ids)], dim=1)
        return decoder.lm(inputs_embeds=embeds).logits


def test_a_peft_adapter_with_its_own_alpha_and_targets_reloads_in_a_fresh_process(hub, embedder, scenes_dir,
                                                                                 tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from unembed.data.splits import split_captions
    from unembed.decoders import decoder_class
    from unembed.tokenizers import encode_captions

    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = decoder_class("clipcap")
    decoder = cls(cls.config_class(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim,
                                   lm=GPT2, lm_mode="frozen", prefix_length=2))
    base_logits = _probe(decoder)
    # Not unembed's own LoRA settings (alpha 2r over c_attn and c_proj): peft's config must be what reloads.
    decoder.lm = get_peft_model(decoder.lm, LoraConfig(r=4, lora_alpha=3, target_modules=["c_attn"],
                                                       fan_in_fan_out=True, lora_dropout=0.0))
    decoder.config.lm_mode, decoder.config.lora_r = "lora", 4
    captions = split_captions(scenes_dir / "train")[:16]
    tokens, lengths = decoder.encode_captions(captions)
    vectors = embedder.embed_texts(captions)
    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-2)
    decoder.train()
    for _ in range(3):
        loss = decoder.caption_loss(vectors, tokens, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    assert any(v.abs().sum() > 0 for k, v in decoder.lm.state_dict().items() if "lora_B" in k)
    trained_logits = _probe(decoder)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)
    decoder.save(tmp_path / "decoder")

    adapter = tmp_path / "decoder" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["lora_alpha"], saved["r"], saved["target_modules"]) == (3, 4, ["c_attn"])
    assert saved["base_model_name_or_path"] == GPT2
    card = (adapter / "README.md").read_text()
    assert "base_model: gpt2" in card and str(hub) not in card and "snapshots" not in card
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())["config"]
    assert (config["lm"], config["lm_weights"]) == (GPT2, "referenced")
    torch.save({"trained": trained_logits, "base": base_logits}, tmp_path / "expected.pt")

    script = f"""
import torch
from tests.test_lora import _probe
from unembed.decoders import load_decoder
decoder = load_decoder({str(tmp_path / "decoder")!r}, device="cpu")
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
got = _probe(decoder)
torch.testing.assert_close(got, expected["trained"], rtol=1e-4, atol=1e-4)
assert not torch.allclose(got, expected["base"], atol=1e-4)
print("ok")
"""
    env = dict(os.environ, HF_HOME=str(hub), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(__import__("pathlib").Path(__file__).resolve().parents[1])]))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
