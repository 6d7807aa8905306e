"""Does a moving average of the weights steady what keep-best chooses among? keep_best.py found the val
CIDEr of the main world's 1,800-step runs moving by up to 12 points between validations 100 steps apart,
even on all 1,000 val images: the checkpoints themselves differ at that learning rate. `unembed train ...
--ema DECAY` validates, keeps and saves an exponential moving average of the weights instead (Polyak
averaging; the raw weights train as before). Is the kept average better than the kept step, and does it
make viecap's lead over paired ClipCap hold at more seeds?

The same runs as keep_best.py (main world, the bundle's recipe, 1,800 steps validated every 100 on 200 val
images with --keep-best, seeds 0, 1, 2: plain capdec, the rate-2 entity-mask-0.2 viecap, paired ClipCap),
each with `--ema 0.999` (the common default; the decay's warm-up, min(0.999, (1 + n) / (10 + n)), makes
the average's span about n / 9 steps at step n, 200 at the last). Their raw weights are those of
keep_best.py's runs step for step (a function of seed and step; the average draws nothing), so the two
differ only in what is validated, kept and saved. Read as keep_best.py reads its kept steps: own captions
and `--rerank 32 --edits 1` for capdec and viecap, own captions for ClipCap, on the 1,000 test and 1,000
compositional images.

Answer (results/weight_average.json): the average halves the swings of the val curve, but it lowers its
peaks too; kept this way, viecap loses on both splits at every seed, own captions lose test CIDEr at eight
runs of nine, and the goals hold at no seed. `--ema` stays opt-in and off in every recipe.

    python benchmarks/weight_average.py --work bench-run/weight-average --loop bench-run/loop
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import keep_best
from entity_scenes import pairs_in_images
from keep_best import LOOP, SEEDS, VIECAP_OPTIONS, choice, goals, measured, met_at, missed, paired_kept, split_scores
from loop_scenes import eval_splits, write
from rerank_choice import RESULTS, ciders, mean_pair

DECAY = 0.999
KINDS = {"viecap": VIECAP_OPTIONS, "clipcap": [], "capdec": []}  # kind -> its options (keep_best.py's)


def runs(work: Path) -> dict:
    """name -> (kind, options, seed, directory): keep_best.py's runs (its options; the variant's flags apart)."""
    return {f"{kind}, seed {seed}": (kind, options, seed, work / f"{kind}-seed-{seed}")
            for seed in SEEDS for kind, options in KINDS.items()}


def measure(work: Path, loop: Path, result: dict, save, flags: list, unaveraged: Path | None = None) -> None:
    """Train each run of runs() with `flags` added and read it; `unaveraged`: keep_best.py's work directory,
    whose runs these must match weight for weight at the last step (when the flags change only what is kept)."""
    from unembed.decoders import load_decoder
    from unembed.embedders import load_embedder

    data = loop / "scenes"
    embedder = load_embedder(str(keep_best.BUNDLE / "embedder"), "cpu")
    splits = eval_splits(embedder, data, {"test": 1000, "compositional": 1000})
    in_image = pairs_in_images(data / "compositional")
    for name, (kind, options, seed, out) in runs(work).items():  # seed by seed: each seed's goals as it ends
        if "kept" in result.get(name, {}):
            continue
        keep_best.train(kind, [*options, *flags], seed, out, data)
        if kind == "clipcap":  # read as the bar was: its own captions, its own settings
            kept = {"own": split_scores(load_decoder(out, device="cpu", embedder=embedder), embedder, splits, in_image)}
        else:
            kept = measured(out, embedder, splits, in_image)
        result[name] = {**choice(out), "kept": kept}
        if unaveraged is not None:
            result[name]["raw_weights_as_keep_best"] = keep_best.same_weights(out, unaveraged / out.name)
        print(name, result[name]["kept_step"], {row: ciders(scores) for row, scores in kept.items()}, flush=True)
        save()


def as_keep_best(result: dict) -> dict:
    """The averaged runs in keep_best.json's shape (rows "{kind}, seed s" with "kept"; "paired" ClipCap
    with "own"), so that its goals() reads them."""
    out = {name: row for name, row in result.items() if name.startswith(("capdec", "viecap"))}
    out["paired"] = {name: {**row, "own": row["kept"]["own"]} for name, row in result.items()
                     if name.startswith("clipcap")}
    return out


def table(result: dict, kept: dict, label: str = "average") -> str:
    """Per decoder and seed, without and with the average (keep_best.json's run beside this benchmark's):
    the step kept and test / compositional CIDEr (x100, held-out pairs) of its own captions and, for capdec
    and viecap, with `--rerank 32 --edits 1`."""
    cell = lambda s: f"{100 * s['test']['CIDEr']:.1f} / {100 * s['compositional']['CIDEr']:.1f} " \
                     f"({s['compositional']['names_heldout_pair']})"
    lines = [f"| decoder, 1,800 steps | step kept | same, {label} | own captions | same, {label} | "
             f"`--rerank 32 --edits 1` | same, {label} |", "|---|---|---|---|---|---|---|"]
    for name, row in result.items():
        if not isinstance(row, dict) or "kept" not in row:
            continue
        clipcap = name.startswith("clipcap")
        before = kept["paired"][name] if clipcap else kept[name]
        own = before["own"] if clipcap else before["kept"]["own"]
        loop = "— | —" if clipcap else f"{cell(before['kept'][LOOP])} | {cell(row['kept'][LOOP])}"
        lines.append(f"| {name} | {before['kept_step']} | {row['kept_step']} | {cell(own)} | {cell(row['kept']['own'])} "
                     f"| {loop} |")
    return "\n".join(lines)


def kept_ciders(rows: dict, kind: str, read: str, seeds=SEEDS) -> list:
    """(test, compositional) CIDEr of `kind`'s kept step read as `read` at each of `seeds`, from rows in
    keep_best.json's shape (paired ClipCap under "paired", its own captions)."""
    return [ciders(rows["paired"][f"clipcap, seed {s}"]["own"] if kind == "clipcap"
                   else rows[f"{kind}, seed {s}"]["kept"][read]) for s in seeds]


def sentence(result: dict, kept: dict) -> str:
    """The README's account: means over seeds without and with the average, and the goals against bars
    trained the same way (paired ClipCap and capdec with the average, kept on val)."""
    averaged = as_keep_best(result)
    judged = lambda rows, kind: kept_ciders(rows, kind, LOOP if kind != "clipcap" else "own")
    fair = goals(averaged, compositional_bar=paired_kept(averaged))
    return (f"Mean test / compositional CIDEr over three seeds, kept step without and with `--ema {DECAY}`: "
            f"capdec (`--rerank 32 --edits 1`) {mean_pair(judged(kept, 'capdec'))} and {mean_pair(judged(averaged, 'capdec'))}; "
            f"viecap (same) {mean_pair(judged(kept, 'viecap'))} and {mean_pair(judged(averaged, 'viecap'))}; paired ClipCap "
            f"(own captions) {mean_pair(judged(kept, 'clipcap'))} and {mean_pair(judged(averaged, 'clipcap'))}. With the average everywhere, the "
            f"kept viecap meets all three goals at {met_at(fair)} (missed: {missed(fair) or 'nothing'}); without it, at "
            f"{met_at(goals(kept, compositional_bar=paired_kept(kept)))}.")


SETTLED = 300  # the first step kept by any run of keep_best.py: the curve's swings are read from here on


def curve_jitter(row: dict) -> float:
    """How much a run's val CIDEr moves from one validation to the next (mean absolute change, x100) from
    step SETTLED on: the swings, not the trend."""
    late = [v for step, v in sorted((int(step), v) for step, v in row["val_CIDEr"].items()) if step >= SETTLED]
    return 100 * sum(abs(b - a) for a, b in zip(late, late[1:])) / (len(late) - 1)


def spread_sentence(result: dict, kept: dict) -> str:
    """The README's account of the val curves: their swings from step SETTLED on, and their peaks, without and
    with the average."""
    averaged = as_keep_best(result)
    rows = lambda runs: [*(runs[n] for n in runs if n.startswith(("capdec", "viecap"))), *runs["paired"].values()]
    before, after = rows(kept), rows(averaged)
    mean = lambda values: sum(values) / len(values)
    peak = lambda row: 100 * max(row["val_CIDEr"].values())
    calmer = sum(curve_jitter(a) < curve_jitter(b) for a, b in zip(after, before))
    return (f"From step {SETTLED} on, val CIDEr moves by {mean([curve_jitter(r) for r in before]):.1f} points from one "
            f"validation to the next without the average and by {mean([curve_jitter(r) for r in after]):.1f} with it "
            f"(means over the {len(after)} runs; less at {calmer} of {len(after)}), but the best validation falls too: "
            f"{mean([peak(r) for r in before]):.1f} without, {mean([peak(r) for r in after]):.1f} with.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/weight-average")
    parser.add_argument("--loop", default="bench-run/loop")
    parser.add_argument("--keep-best-work", default="bench-run/keep-best", help="keep_best.py's --work")
    parser.add_argument("--out", default=str(RESULTS / "weight_average.json"))
    args = parser.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["recipe"] = {"ema": DECAY, "steps": keep_best.STEPS, "validate_every": keep_best.VALIDATE_EVERY,
                        "read_with": keep_best.RECIPE}
    measure(Path(args.work), Path(args.loop), result, lambda: write(str(out), result), ["--ema", str(DECAY)],
            Path(args.keep_best_work))
    kept = json.loads((RESULTS / "keep_best.json").read_text())
    print(table(result, kept))
    print(sentence(result, kept))
    print(spread_sentence(result, kept))


if __name__ == "__main__":
    main()
