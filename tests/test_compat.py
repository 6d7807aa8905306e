import subprocess
import sys


def test_open_clip_imports_and_builds_a_model():
    from unembed.compat import import_open_clip

    open_clip = import_open_clip()
    model = open_clip.create_model("RN50", pretrained=None)  # pulls in torchvision's transforms and ops modules
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_patch_applies_only_when_the_plain_import_fails():
    # In a fresh interpreter: is plain torchvision importable? The patch must be used iff it is not.
    code = ("import importlib, sys\n"
            "try:\n    import torchvision; plain_ok = True\nexcept RuntimeError:\n    plain_ok = False\n"
            "for m in [m for m in sys.modules if m.startswith('torchvision')]: del sys.modules[m]\n"
            "from unembed.compat import import_open_clip, torchvision_was_patched\n"
            "import_open_clip()\n"
            "print(plain_ok, torchvision_was_patched())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    plain_ok, patched = out[-2] == "True", out[-1] == "True"
    assert patched == (not plain_ok)
