"""The text tower over real token length (unembed/text_tower.py) equals open_clip's padded forward."""
import pytest
import torch

from unembed import text_tower
from unembed.embedders import Embedder, scenes_config

TEXTS = ["a red circle", "a red circle at the top left and a small blue square", "", "two stars.",
         "a big green heart next to a purple cross"]


@pytest.fixture(scope="module", params=["scenes", "ViT-B-32 text (2 layers)"])
def model_and_tokenizer(request):
    torch.manual_seed(0)
    if request.param == "scenes":
        embedder = Embedder.from_config(scenes_config(text_layers=2), "", "cpu")
    else:  # ViT-B-32's text tower shape (width 512, 8 heads, 77 positions), fewer layers to stay quick
        config = scenes_config(embed_dim=512, text_width=512, text_layers=2, context_length=77)
        embedder = Embedder.from_config(config, "", "cpu")
    return embedder.model.eval(), embedder.tokenizer


def test_real_length_equals_the_padded_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert text_tower.supported(model)
    tokens = tokenizer(TEXTS)
    assert text_tower.real_length(tokens) < tokens.shape[1]
    padded = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(text_tower.encode_text(model, tokens), padded, atol=2e-6, rtol=1e-5)


def test_shared_prefix_continuations_equal_the_padded_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # the groups share prefixes of different lengths, and "s" re-tokenizes the caption's last word
    captions, ends = ["a red circle at the", "two small", "x"], ["top", " left", "s", ".", "", "bigger things"]
    texts = [c + e for c in captions for e in ends]
    tokens = tokenizer(texts)
    padded = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(text_tower.encode_continuations(model, tokens, len(ends)), padded, atol=2e-6, rtol=1e-5)


def test_other_towers_take_their_own_forward():
    config = scenes_config()
    config["model_type"] = "coca"
    config["model_cfg"]["multimodal_cfg"] = {"width": 128, "layers": 1, "heads": 4, "context_length": 32}
    model = Embedder.from_config(config, "", "cpu").model.eval()
    assert not text_tower.supported(model)
