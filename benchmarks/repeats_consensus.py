"""Two ways to choose among a decoder's candidates on the scenes world: no repeated token runs in the
search (`--no-repeat-ngram-size`) and a consensus term in reranking (`--rerank-consensus`, minimum
Bayes risk). Does either lift the decoders nearest issue 27's goals at every seed?

The decoders are loop_scenes.py's (trained there, or here if missing, with its recipes): plain CapDec
at seeds 0, 1, 2 (the test goal's bar) and the entity-mask-0.2 rate-2 viecap at seeds 0, 1, 2, merged
(the text-only decoder nearest the compositional goals: at seed 2 it writes "a yellow circle and a
yellow circle" where references say "two yellow circles" or name a second shape).

1. Val (500 images): each decoder's 32 beams, without and with no_repeat_ngram_size NO_REPEAT, computed
   once each, then picked at every rerank weight of WEIGHTS and consensus of CONSENSUS; the base (its
   own beams, no rerank) with and without NO_REPEAT. The setting with the best mean val CIDEr over the
   six decoders is read on test, and so is the best over each kind's three.
2. Test and compositional (1,000 images each): base, base with NO_REPEAT, rerank 32 as before (weight
   0.05, no consensus), rerank 32 with NO_REPEAT, the val-chosen consensus setting, and each rerank row
   with one round of edits at the decoder's own margin. The beams of a split are generated once per
   NO_REPEAT setting and every rerank row picks from them (rerank.pick, as Decoder.decode does;
   tests/test_loop.py checks decode against the same rule by hand).
3. The shipped bundle's LM decoders (clipcap, capdec, decap, viecap), each as shipped (its own beams, no
   rerank), without and with NO_REPEAT on test and compositional: is no_repeat_ngram_size a default
   every kind can take?
4. With --speed: what blocking repeats costs. End to end, the shipped capdec and viecap caption the
   test split (1,000 images, 100 a batch, their own beams) without and with NO_REPEAT (best of 2 runs
   each); and the processor alone, unembed's batched NoRepeatNGram against transformers'
   NoRepeatNGramLogitsProcessor, side by side on the same token ids (500 hypotheses, as 100 inputs x
   5 beams, each step of a 20-token caption), at the shipped decoders' vocabulary and GPT-2's.
5. More candidates: the viecaps' MORE_CANDIDATES beams (NO_REPEAT) instead of 32, picked at the rerank
   default, with and without one round of edits, on val, test and compositional (`more_candidates`).

    python benchmarks/repeats_consensus.py --work bench-run/loop
    python benchmarks/repeats_consensus.py --work bench-run/loop --speed   # adds "speed" to the JSON
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from entity_scenes import pairs_in_images
from unembed.generation import RERANK_WEIGHT  # the default: also the val sweep's choice over all six
from loop_scenes import (LESS_MASKED, MERGED, SEEDS, candidate_rows, decoded, decoder_loader, eval_splits,
                         main_world_plan, scored, trained, training_summary, unembed, write)

NO_REPEAT = 3  # tokens: "a yellow circle" once (0.3% of the training captions repeat a 3-word run)
WEIGHTS = (0.05, 0.2)
CONSENSUS = (0.0, 1.0, 3.0, 10.0)
RERANK = 32
MORE_CANDIDATES = 64  # part 5, its rows named:
MORE_CANDIDATES_ROW = f"rerank {MORE_CANDIDATES}, no repeat {NO_REPEAT}, weight {RERANK_WEIGHT:g}"
GPT2_VOCABULARY = 50257  # a pretrained LM's width, for the processor's speed
SHIPPED = ("clipcap", "capdec", "decap", "viecap")
DECODERS = tuple(f"capdec, seed {s}" for s in SEEDS) + tuple(LESS_MASKED)


# no_repeat_ngram_size is passed even when 0: a decoder trained today defaults to NO_REPEAT.

def beams(decoder, embedded, no_repeat: int) -> tuple[list, float]:
    """The decoder's RERANK candidates for each input (candidate_rows) and the seconds taken."""
    start = time.perf_counter()
    rows = candidate_rows(decoder, embedded, RERANK, no_repeat_ngram_size=no_repeat)
    return rows, time.perf_counter() - start


def based(decoder, embedded, no_repeat: int) -> list[str]:
    """The decoder's own captions (its beams, no rerank)."""
    return decoded(decoder, embedded, no_repeat_ngram_size=no_repeat)


def base_rows(decoder, splits: dict, in_image: dict) -> dict:
    """split -> the decoder's own captions without and with NO_REPEAT, scored, on test and compositional."""
    rows = {}
    for split in ("test", "compositional"):
        embedded, references = splits[split]
        rows[split] = {f"no repeat {n}": scored(based(decoder, embedded, n), embedded, references,
                                                in_image if split == "compositional" else None) for n in (0, NO_REPEAT)}
    return rows


def picked(embedder, embedded, rows, cosines, weight: float, consensus: float) -> list[str]:
    from unembed.decoders.rerank import logit_scale, pick

    return pick(rows, cosines, weight, logit_scale(embedder), consensus)


def val_sweep(decoder, embedder, embedded, references) -> dict:
    """Val CIDEr of the base and of every (no-repeat, weight, consensus) pick from the same beams."""
    from unembed.decoders.rerank import row_cosines

    sweep = {}
    for no_repeat in (0, NO_REPEAT):
        sweep[f"base, no repeat {no_repeat}"] = scored(based(decoder, embedded, no_repeat), embedded, references, None)["CIDEr"]
        rows, _ = beams(decoder, embedded, no_repeat)
        cosines = row_cosines(embedder, embedded, rows)
        for weight in WEIGHTS:
            for consensus in CONSENSUS:
                captions = picked(embedder, embedded, rows, cosines, weight, consensus)
                sweep[setting(no_repeat, weight, consensus)] = scored(captions, embedded, references, None)["CIDEr"]
    return sweep


def setting(no_repeat: int, weight: float, consensus: float) -> str:
    return f"rerank {RERANK}, no repeat {no_repeat}, weight {weight:g}, consensus {consensus:g}"


def chosen(sweeps: dict) -> dict:
    """The rerank setting with the best mean val CIDEr over the decoders of `sweeps`, and every setting's
    mean (ties: the first swept, the simpler)."""
    names = [n for n in next(iter(sweeps.values())) if n.startswith("rerank")]
    means = {n: round(sum(s[n] for s in sweeps.values()) / len(sweeps), 4) for n in names}
    return {"setting": max(means, key=means.get), "mean_val_CIDEr": means}


def kind_of(name: str) -> str:
    return name.split()[0].rstrip(",")


def choices(sweeps: dict) -> dict:
    """The val-chosen settings: over every decoder ("all") and over each kind's."""
    kinds = {kind_of(name) for name in sweeps}
    return {"all": chosen(sweeps), **{k: chosen({n: s for n, s in sweeps.items() if kind_of(n) == k})
                                      for k in sorted(kinds)}}


def parse(name: str) -> tuple[int, float, float]:
    parts = dict(p.rsplit(" ", 1) for p in name.split(", ")[1:])
    return int(parts["no repeat"]), float(parts["weight"]), float(parts["consensus"])


def split_rows(decoder, embedder, embedded, references, in_image, chosen_settings: list) -> dict:
    """One split's rows for one decoder (see the module docstring): `chosen_settings`, (no repeat,
    weight, consensus) tuples chosen on val, besides rerank as before with and without NO_REPEAT."""
    from unembed.decoders.rerank import row_cosines

    rows = {f"base, no repeat {n}": scored(based(decoder, embedded, n), embedded, references, in_image)
            for n in (0, NO_REPEAT)}
    settings = {(0, 0.05, 0.0), (NO_REPEAT, 0.05, 0.0), *chosen_settings}
    for no_repeat in sorted({s[0] for s in settings}):
        candidates, seconds = beams(decoder, embedded, no_repeat)
        cosines = row_cosines(embedder, embedded, candidates)
        rows[f"beams, no repeat {no_repeat}, seconds"] = round(seconds, 1)
        for n, weight, consensus in sorted(s for s in settings if s[0] == no_repeat):
            name = setting(n, weight, consensus)
            rows[name], rows[f"{name}, edits 1 (its margin)"] = picked_and_edited(
                decoder, embedder, embedded, references, in_image, candidates, cosines, weight, consensus)
            print(name, json.dumps(rows[name]), json.dumps(rows[f"{name}, edits 1 (its margin)"]), flush=True)
    return rows


def picked_and_edited(decoder, embedder, embedded, references, in_image, candidates, cosines, weight: float,
                      consensus: float) -> tuple[dict, dict]:
    """The pick among `candidates` at (weight, consensus), scored, and the same after one round of edits
    at the decoder's own margin, scored."""
    from unembed.decoders.edits import edited

    captions = picked(embedder, embedded, candidates, cosines, weight, consensus)
    edited_captions = edited(embedder, embedded.unit(), captions, decoder.substitutes, 1, decoder.edit_margin)
    return scored(captions, embedded, references, in_image), scored(edited_captions, embedded, references, in_image)


def more_candidates(decoder, embedder, splits: dict, in_image: dict) -> dict:
    """Part 5: split -> MORE_CANDIDATES candidates (NO_REPEAT) picked at the rerank default, without and
    with one round of edits, and the seconds the candidates took."""
    from unembed.decoders.rerank import row_cosines

    rows = {}
    for split, (embedded, references) in splits.items():
        start = time.perf_counter()
        candidates = candidate_rows(decoder, embedded, MORE_CANDIDATES, no_repeat_ngram_size=NO_REPEAT)
        seconds = time.perf_counter() - start
        cosines = row_cosines(embedder, embedded, candidates)
        name = MORE_CANDIDATES_ROW
        rows[split] = dict(zip((name, f"{name}, edits 1 (its margin)"), picked_and_edited(
            decoder, embedder, embedded, references, in_image if split == "compositional" else None,
            candidates, cosines, RERANK_WEIGHT, 0.0)), seconds=round(seconds, 1))
        print(split, json.dumps(rows[split]), flush=True)
    return rows


COLUMNS = (("its beams", "base, no repeat 0"), ("`--no-repeat-ngram-size 3`", "base, no repeat 3"),
           ("`--rerank 32`", setting(0, 0.05, 0.0)),
           ("`--rerank 32 --no-repeat-ngram-size 3`", setting(NO_REPEAT, 0.05, 0.0)),
           ("same, `--edits 1`", setting(NO_REPEAT, 0.05, 0.0) + ", edits 1 (its margin)"))


def cell(rows: dict, name: str) -> str:
    test, comp = rows["test"][name], rows["compositional"][name]
    return f"{100 * test['CIDEr']:.1f} / {100 * comp['CIDEr']:.1f} ({comp['names_heldout_pair']})"


def table(result: dict) -> str:
    """The README's table: each decoder's test / compositional CIDEr (held-out pairs named) read each way."""
    lines = ["| decoder | " + " | ".join(title for title, _ in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, rows in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(cell(rows, key) for _, key in COLUMNS) + " |")
    return "\n".join(lines)


def more_candidates_sentence(result: dict) -> str:
    """README's sentence on part 5: val CIDEr at 32 and MORE_CANDIDATES candidates, and the cells with edits."""
    base = setting(NO_REPEAT, RERANK_WEIGHT, 0.0)
    more = MORE_CANDIDATES_ROW
    val = ", ".join(f"{100 * result['val_sweep'][name][base]:.1f} -> {100 * rows['val'][more]['CIDEr']:.1f}"
                    for name, rows in result["more_candidates"].items())
    cells = ", ".join(f"{100 * rows['test'][more + ', edits 1 (its margin)']['CIDEr']:.1f} / "
                      f"{100 * rows['compositional'][more + ', edits 1 (its margin)']['CIDEr']:.1f} / "
                      f"{rows['compositional'][more + ', edits 1 (its margin)']['names_heldout_pair']}"
                      for rows in result["more_candidates"].values())
    return (f"{MORE_CANDIDATES} candidates instead of {RERANK} (part 5, `more_candidates` in the JSON) raise the "
            f"viecaps' val CIDEr at every seed ({val}) and, with `--edits 1`, give {cells}")


def best_seconds(run, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def processor_speed(vocabulary: int, hypotheses: int = 500, length: int = 20) -> dict:
    """Seconds for every step of a `length`-token caption, each processor on the same ids and scores."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    from unembed.decoders.repeats import NoRepeatNGram

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (hypotheses, length), generator=generator)  # a caption's few dozen words
    scores = torch.randn(hypotheses, vocabulary, generator=generator)
    timed = {}
    for name, processor in (("transformers NoRepeatNGramLogitsProcessor", NoRepeatNGramLogitsProcessor(NO_REPEAT)),
                            ("unembed NoRepeatNGram", NoRepeatNGram(NO_REPEAT))):
        timed[name] = best_seconds(lambda: [processor(ids[:, :t], scores) for t in range(1, length + 1)])
    theirs, ours = timed.values()
    return {"hypotheses": hypotheses, "steps": length, "vocabulary": vocabulary,
            "seconds": {name: round(s, 5) for name, s in timed.items()}, "ratio": round(theirs / ours, 1)}


def speed(embedder, embedded) -> dict:
    """Part 4 (see the module docstring)."""
    from loop_scenes import BUNDLE
    from unembed.decoders import load_decoder

    out = {"images": len(embedded)}
    for kind in ("capdec", "viecap"):
        decoder = load_decoder(BUNDLE / kind, device="cpu", embedder=embedder)
        out[kind] = {f"no repeat {n}": round(best_seconds(lambda: based(decoder, embedded, n)), 2)
                     for n in (0, NO_REPEAT)}
    out["processor"] = processor_speed(decoder.tokenizer.vocab_size)
    out["processor, GPT-2's vocabulary"] = processor_speed(GPT2_VOCABULARY)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/loop")
    parser.add_argument("--out", default="benchmarks/results/repeats_consensus.json")
    parser.add_argument("--images", type=int, default=1000, help="images per split (test, compositional)")
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--speed", action="store_true", help="only part 4, added to --out's JSON")
    args = parser.parse_args()
    work = Path(args.work)
    data = work / "scenes"
    if not (data / "train" / "captions.json").is_file():
        unembed("data", "scenes", "--out", str(data), "--n", "20000", "--seed", "0")
    models = trained(main_world_plan(work, data), DECODERS)

    import torch

    from loop_scenes import BUNDLE
    from unembed.decoders import load_decoder
    from unembed.embedders import load_embedder

    torch.manual_seed(0)
    embedder = load_embedder(str(BUNDLE / "embedder"), "cpu")
    splits = eval_splits(embedder, data, {"val": args.val_images, "test": args.images, "compositional": args.images})
    in_image = pairs_in_images(data / "compositional")
    if args.speed:
        result = json.loads(Path(args.out).read_text())
        result["speed"] = speed(embedder, splits["test"][0])
        write(args.out, result)
        return print(json.dumps(result["speed"], indent=1))
    decoder_at = decoder_loader(embedder)
    decoders = {name: decoder_at(models[name], MERGED if name.startswith("viecap") else 0.0) for name in DECODERS}
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    if result.get("embedder_id") != embedder.id or result.get("images") != [args.val_images, args.images]:
        result = {}  # rows of another embedder or split size are not kept
    result.update({"embedder_id": embedder.id, "data": "scenes world, 20000 training images, seed 0",
                   "images": [args.val_images, args.images],
                   "no_repeat": NO_REPEAT, "rerank": RERANK,
                   "training": {name: training_summary(models[name]) for name in DECODERS}})
    sweeps = result.setdefault("val_sweep", {})
    for name, decoder in decoders.items():
        if name not in sweeps:
            sweeps[name] = val_sweep(decoder, embedder, *splits["val"])
            print("val", name, json.dumps(sweeps[name]), flush=True)
            write(args.out, result)
    result["val_chosen"] = choices(sweeps)
    rows = result.setdefault("rows", {})
    for name, decoder in decoders.items():
        settings = [result["val_chosen"][k]["setting"] for k in ("all", kind_of(name))]
        if rows.get(name, {}).get("settings") != settings:  # measured at another choice
            rows[name] = {"settings": settings}
        for split in ("test", "compositional"):
            if split not in rows[name]:
                rows[name][split] = split_rows(decoder, embedder, *splits[split],
                                               in_image if split == "compositional" else None,
                                               [parse(s) for s in settings])
                write(args.out, result)
    shipped = result.setdefault("shipped", {})
    for kind in SHIPPED:
        if kind not in shipped:
            decoder = load_decoder(BUNDLE / kind, device="cpu", embedder=embedder)
            shipped[kind] = base_rows(decoder, splits, in_image)
            print("shipped", kind, json.dumps(shipped[kind]), flush=True)
            write(args.out, result)
    more = result.setdefault("more_candidates", {})
    for name in LESS_MASKED:
        if name not in more:
            more[name] = more_candidates(decoders[name], embedder, splits, in_image)
            write(args.out, result)
    print(json.dumps({k: v["setting"] for k, v in result["val_chosen"].items()}, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
