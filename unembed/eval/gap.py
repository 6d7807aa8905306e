"""The modality gap (Liang et al. 2022), measured before and after each bridge of bridges.py.

A text-only decoder reads image embeddings it never saw in training; how far apart the two
modalities sit, and how much each bridge brings them together, explains much of why one decoder
captions images better than another. For N matched image-text pairs [N, D] this reports the
distance between the modality means, the cosine of matched pairs against that of mismatched ones,
and image->text R@1, as the embedder gives them and after each bridge as the decoders apply it:
- none: both modalities as they are;
- noise (CapDec): the texts noised as in training, the images as they are;
- mean_shift (C^3): each modality minus its own mean, re-normalised;
- projection (DeCap): the images projected onto a memory of caption embeddings, the texts as they are.
"""
from __future__ import annotations

from pathlib import Path
import torch
import torch.nn.functional as F

from unembed.decoders.bridges import ModalityBridge, add_noise
from unembed.memory import TextMemory
from unembed.errors import BadInputError, MismatchError
from unembed.io import atomic_path, write_json

BRIDGES = ("none", "noise", "mean_shift", "projection")
PLOT_POINTS = 500   # per modality: more only hides the structure under overplotting
PLOT_PAIRS = 12     # matched pairs joined by a line


def modality_gap(image_vectors: torch.Tensor, text_vectors: torch.Tensor, memory_vectors: torch.Tensor | None = None,
                 noise_variance: float = 0.016, projection_tau: float = 0.01, seed: int = 0) -> dict:
    """The gap between N matched image and text embeddings ([N, D] each, row i of one describes row
    i of the other), before and after each bridge. `memory_vectors` [M, D] are the caption
    embeddings DeCap projects onto (default: the texts). Seeded, so reruns give the same numbers."""
    images, texts = _check_pairs(image_vectors, text_vectors)
    memory = texts if memory_vectors is None else F.normalize(memory_vectors.float().cpu(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    mismatch = _derangement(len(images), generator)
    gap = images.mean(0) - texts.mean(0)
    bridges = {name: _stats(*_bridged(name, images, texts, memory, noise_variance, projection_tau, generator), mismatch)
               for name in BRIDGES}
    base = bridges["none"]["centroid_distance"]
    for stats in bridges.values():
        stats["gap_closed"] = 1 - stats["centroid_distance"] / base if base > 0 else 0.0
    none = bridges["none"]
    return {"n_pairs": len(images), "dim": images.shape[1], "centroid_distance": none["centroid_distance"],
            "gap_vector": gap.tolist(), "matched_cosine": none["matched_cosine"],
            "random_cosine": none["random_cosine"], "noise_variance": noise_variance,
            "projection_tau": projection_tau, "bridges": bridges}


def _check_pairs(image_vectors: torch.Tensor, text_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both [N, D] with N >= 2 (a mismatched pair needs two), L2-normalised float32 on the CPU."""
    if image_vectors.ndim != 2 or image_vectors.shape != text_vectors.shape:
        raise MismatchError(f"need matched [N, D] image and text embeddings, got {tuple(image_vectors.shape)} "
                            f"and {tuple(text_vectors.shape)}")
    if len(image_vectors) < 2:
        raise BadInputError("embeddings", f"need at least 2 image-text pairs, got {len(image_vectors)}")
    return F.normalize(image_vectors.float().cpu(), dim=-1), F.normalize(text_vectors.float().cpu(), dim=-1)


def _derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """text index for each image with no image paired with its own text: a random cycle through all
    N (image order[k] takes text order[k+1]), so every pairing is a true mismatch."""
    order = torch.randperm(n, generator=generator)
    mismatch = torch.empty(n, dtype=torch.long)
    mismatch[order] = order.roll(-1)
    return mismatch


def _bridged(name: str, images: torch.Tensor, texts: torch.Tensor, memory: torch.Tensor, noise_variance: float,
             projection_tau: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, texts) as the decoder using bridge `name` sees them: images at inference, texts in training."""
    if name == "noise":
        return images, add_noise(texts, noise_variance, "gaussian", generator)
    if name == "mean_shift":
        bridge = ModalityBridge(images.shape[1], mean_shift=True)
        bridge.fit(texts, images)
        return bridge.for_inference(images, "image"), bridge.for_inference(texts, "text")
    if name == "projection":
        text_memory = TextMemory(0, images.shape[1])
        text_memory.fill([], memory)
        return text_memory.project(images, projection_tau), texts
    return images, texts


def _stats(images: torch.Tensor, texts: torch.Tensor, mismatch: torch.Tensor) -> dict:
    return {"centroid_distance": float((images.mean(0) - texts.mean(0)).norm()),
            "matched_cosine": float((images * texts).sum(-1).mean()),
            "random_cosine": float((images * texts[mismatch]).sum(-1).mean()),
            "retrieval_r1": _recall_at_1(images, texts)}


def _recall_at_1(images: torch.Tensor, texts: torch.Tensor, chunk: int = 1024) -> float:
    """Share of images whose most similar text, among all N, is their own (chunked: N x N can be large)."""
    hits = sum(int(((images[i:i + chunk] @ texts.T).argmax(1) == torch.arange(i, min(i + chunk, len(images)))).sum())
               for i in range(0, len(images), chunk))
    return hits / len(images)


# ---- plot ----------------------------------------------------------------------------------

def plot_gap(result: dict, image_vectors: torch.Tensor, text_vectors: torch.Tensor, path: str | Path) -> None:
    """A PNG: the two modalities on the gap plane (left: along the gap, and the main direction of the
    rest), and each bridge's centroid distance and matched-minus-random cosine (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images, texts = _check_pairs(image_vectors, text_vectors)
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=(1.1, 1))
    _plot_pca(left, images, texts)
    _plot_bridges(right, result["bridges"])
    fig.suptitle(f"Modality gap: {result['n_pairs']} pairs, D = {result['dim']}", fontsize=12)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def gap_plane(images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre [D], axes [D, 2]) of the plane that shows the gap: the first axis runs along the
    difference of the two means (image mean to text mean), the second along the main direction of
    what is left once each modality's mean is removed. A PCA of the union would hide the gap whenever
    it is smaller than the spread, and centring each modality alone would erase it."""
    centre = torch.cat([images, texts]).mean(0)
    gap = texts.mean(0) - images.mean(0)
    first = gap / gap.norm().clamp(min=1e-12)
    rest = torch.cat([images - images.mean(0), texts - texts.mean(0)])
    rest = rest - (rest @ first)[:, None] * first  # nothing of the gap direction left
    _, _, vh = torch.linalg.svd(rest, full_matrices=False)
    return centre, torch.stack([first, vh[0]], dim=1)


def _plot_pca(ax, images: torch.Tensor, texts: torch.Tensor) -> None:
    """Both modalities on the gap plane (gap_plane), a few matched pairs joined, means marked."""
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:PLOT_POINTS]
    centre, axes = gap_plane(images, texts)

    def to_plane(vectors: torch.Tensor) -> list[list[float]]:
        return ((vectors - centre) @ axes).T.tolist()

    img_x, img_y = to_plane(images[keep])
    txt_x, txt_y = to_plane(texts[keep])
    for k in range(min(PLOT_PAIRS, len(keep))):
        ax.plot([img_x[k], txt_x[k]], [img_y[k], txt_y[k]], color="0.55", linewidth=0.6, zorder=1)
    ax.scatter(img_x, img_y, s=8, alpha=0.5, color="tab:blue", label="images", zorder=2)
    ax.scatter(txt_x, txt_y, s=8, alpha=0.5, color="tab:orange", label="texts", zorder=2)
    for vectors, color, name in ((images, "navy", "image mean"), (texts, "darkred", "text mean")):
        (mx,), (my,) = to_plane(vectors.mean(0, keepdim=True))
        ax.scatter([mx], [my], s=160, marker="X", color=color, edgecolors="white", linewidths=1, label=name, zorder=3)
    ax.set_title("Embeddings on the gap plane")
    ax.set_xlabel(f"along the gap: image mean to text mean (distance {float((texts.mean(0) - images.mean(0)).norm()):.2f})")
    ax.set_ylabel("main direction of the rest")
    ax.legend(fontsize=8, loc="best", framealpha=0.8)


def _plot_bridges(ax, bridges: dict) -> None:
    width = 0.38
    x = range(len(BRIDGES))
    distance = [bridges[b]["centroid_distance"] for b in BRIDGES]
    margin = [bridges[b]["matched_cosine"] - bridges[b]["random_cosine"] for b in BRIDGES]
    for offset, values, label, color in ((-width / 2, distance, "centroid distance", "tab:purple"),
                                         (width / 2, margin, "matched - random cosine", "tab:green")):
        bars = ax.bar([i + offset for i in x], values, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(list(x), [b.replace("_", " ") for b in BRIDGES])
    ax.set_title("After each bridge")
    ax.set_xlabel("bridge (a smaller gap: lower distance, higher margin)")
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)


# ---- report --------------------------------------------------------------------------------

def gap_report(embedder, data_dir: str | Path, split: str = "test", out_dir: str | Path | None = None,
               max_pairs: int = 1000, memory_size: int = 5000, noise_variance: float = 0.016,
               projection_tau: float = 0.01) -> dict:
    """The gap of a caption split: each image (embeddings cached by embed_split) paired with its
    first caption, DeCap's memory taken from the train split's captions as the decoder's would be
    (the split's own texts when there is no train split). With `out_dir`, writes gap.json and gap.png."""
    from unembed.data.splits import has_split, load_split, split_captions
    from unembed.pipeline import embed_split

    data_dir = Path(data_dir)
    embedded = embed_split(embedder, data_dir / split)
    _, captions, ids = load_split(data_dir / split)
    if embedded.ids != [str(i) for i in ids]:
        raise MismatchError(f"{data_dir / split}: the cached image embeddings do not list the split's images in order")
    images = embedded.unit()[:max_pairs]
    texts = embedder.embed_texts([c[0] for c in captions[:max_pairs]])
    train = data_dir / "train"
    if has_split(data_dir, "train"):
        memory_split, memory = "train", embedder.embed_texts(list(dict.fromkeys(split_captions(train)))[:memory_size])
    else:
        memory_split, memory = split, texts
    result = modality_gap(images, texts, memory, noise_variance, projection_tau)
    result.update({"embedder": embedder.spec, "split": split, "data": str(data_dir),
                   "memory": {"split": memory_split, "size": len(memory)}})
    if out_dir is not None:
        out_dir = Path(out_dir)
        plot_gap(result, images, texts, out_dir / "gap.png")
        result["plot"] = "gap.png"
        write_json(out_dir / "gap.json", result)
    return result


def format_gap(result: dict) -> str:
    """A Markdown table of the gap under each bridge, below one line of the raw gap."""
    lines = [f"Modality gap over {result['n_pairs']} pairs (D = {result['dim']}): centroid distance "
             f"{result['centroid_distance']:.3f}, matched cosine {result['matched_cosine']:.3f}, "
             f"random cosine {result['random_cosine']:.3f}", "",
             "| bridge | centroid distance | matched cos | random cos | R@1 | gap closed |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in BRIDGES:
        b = result["bridges"][name]
        lines.append(f"| {name} | {b['centroid_distance']:.3f} | {b['matched_cosine']:.3f} | "
                     f"{b['random_cosine']:.3f} | {b['retrieval_r1']:.3f} | {b['gap_closed']:.3f} |")
    return "\n".join(lines)
