"""Closing the loop (issue 27): rerank for every decoder kind, the corrector, and inversion as a task.

Rerank is checked against a hand computation from the same candidates: each candidate embedded alone,
its cosine with the input, and the decoder's own score plus weight x logit scale x cosine. Every registered kind
is run from its own `example`; the CLI path goes from an image file."""
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unembed.data.splits import split_captions
from unembed.decoders import decoder_class, list_decoders, load_decoder
from unembed.errors import BadInputError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "scene-0.png"


def benchmark(name: str):
    """A module of benchmarks/ (they import each other by name, as run from there)."""
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def images(scenes_dir, embedder, with_tokens=False, n=3):
    from PIL import Image

    paths = sorted((scenes_dir / "test" / "images").glob("*.png"))[:n]
    return embedder.embed([Image.open(p).convert("RGB") for p in paths], [p.stem for p in paths], with_tokens=with_tokens)


def by_hand(embedder, embedded, candidates, weight, consensus=0.0):
    """The caption rerank must pick, each candidate embedded on its own: the decoder's score plus weight
    x the embedder's temperature x cosine, plus `consensus` x the candidate's likeness to the others,
    weighted by the softmax of those totals."""
    scale = float(embedder.model.logit_scale.detach().exp())
    picked = []
    for row, target in zip(candidates, F.normalize(embedded.vectors.float(), dim=-1)):
        texts = list(dict.fromkeys(c for c, _ in row))
        own = [max(s for c, s in row if c == t) for t in texts]
        cos = [float(F.normalize(embedder.embed_texts([t]).float(), dim=-1)[0] @ target) for t in texts]
        totals = [o + weight * scale * c for o, c in zip(own, cos)]
        if consensus and len(texts) > 1:
            shares = [math.exp(t - max(totals)) for t in totals]
            shares = [s / sum(shares) for s in shares]
            totals = [t + consensus * sum(p * likeness_by_hand(a, b) for b, p in zip(texts, shares))
                      for t, a in zip(totals, texts)]
        picked.append(texts[totals.index(max(totals))])
    return picked


def likeness_by_hand(a: str, b: str) -> float:
    """The mean over n = 1..4 of the cosine between the two texts' n-gram counts."""
    def counts(text, n):
        words = text.lower().split()
        return Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))

    total = 0.0
    for n in range(1, 5):
        x, y = counts(a, n), counts(b, n)
        norms = math.sqrt(sum(v * v for v in x.values())) * math.sqrt(sum(v * v for v in y.values()))
        total += sum(v * y[g] for g, v in x.items()) / norms if norms else 0.0
    return total / 4


@pytest.mark.parametrize("kind", [k for k in list_decoders() if k != "corrector"])
def test_rerank_picks_what_the_embedder_and_the_decoder_agree_on(kind, embedder, scenes_dir, tmp_path):
    cls = decoder_class(kind)
    torch.manual_seed(0)
    decoder = cls.example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    own = decoder.embedder if cls.needs_embedder else embedder
    decoder.attach_embedder(own)
    embedded = images(scenes_dir, own, cls.needs_tokens)
    candidates = decoder.candidates(embedded, 3)
    most = 3 * len(decoder.members) if kind == "ensemble" else 3  # an ensemble: 3 from each member
    assert len(candidates) == 3 and all(1 <= len(row) <= most for row in candidates)
    scores = [s for row in candidates for _, s in row]
    assert all(isinstance(s, float) for s in scores)
    for weight in (0.0, 0.05, 100.0):
        assert decoder.decode(embedded, rerank=3, rerank_weight=weight) == by_hand(own, embedded, candidates, weight)
    for weight, consensus in ((0.05, 3.0), (0.0, 100.0)):
        assert decoder.decode(embedded, rerank=3, rerank_weight=weight, rerank_consensus=consensus) == by_hand(
            own, embedded, candidates, weight, consensus)
    # weight 0 trusts the decoder alone: its own best of the candidates
    assert decoder.decode(embedded, rerank=3, rerank_weight=0.0) == [
        max(row, key=lambda c: c[1])[0] for row in candidates]


def test_consensus_prefers_what_the_candidates_share():
    from unembed.decoders.rerank import likeness, pick

    texts = ["a yellow circle and a yellow circle", "two yellow circles", "a yellow circle and a green circle",
             "a yellow circle and a green square"]
    got = likeness(texts)
    assert got.flatten().tolist() == pytest.approx([likeness_by_hand(a, b) for a in texts for b in texts], abs=1e-6)
    assert got[0, 0] == pytest.approx(1.0) and got[1, 1] == pytest.approx(0.75)  # three words: no 4-gram
    assert likeness(["two yellow circles", "a red square"]).tolist() == [[0.75, 0.0], [0.0, 0.75]]
    # The embedder slightly prefers the repeated object; the other candidates share "a green": with
    # consensus the pick moves to the one most alike to the rest.
    row = [(t, -0.5) for t in texts]
    cosines = [0.80, 0.78, 0.79, 0.77]
    assert pick([row], cosines, 0.05, 100.0) == [texts[0]]
    assert pick([row], cosines, 0.05, 100.0, consensus=10.0) == [texts[2]]
    assert pick([row[:1]], cosines[:1], 0.05, 100.0, consensus=10.0) == [texts[0]]  # one candidate: itself
    assert likeness(["", "a"]).tolist() == [[0.0, 0.0], [0.0, 0.25]]  # no words: alike to nothing


def test_no_repeat_ngram_size_keeps_every_run_of_tokens_once(embedder, scenes_dir, tmp_path):
    decoder = decoder_class("capdec").example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    embedded = images(scenes_dir, embedder, n=6)
    free = decoder.generate(embedded, {"num_beams": 3, "max_length": 20, "no_repeat_ngram_size": 0})
    blocked = decoder.generate(embedded, {"num_beams": 3, "max_length": 20, "no_repeat_ngram_size": 2})

    def repeats(row):
        ids = row.tolist()
        pairs = [tuple(ids[i:i + 2]) for i in range(len(ids) - 1) if decoder.tokenizer.eos_id not in ids[i:i + 2]]
        return len(pairs) - len(set(pairs))
    assert any(repeats(r) for r in free)  # the random example LM repeats itself: the test can fail
    assert not any(repeats(r) for r in blocked)
    assert decoder.decode(embedded, no_repeat_ngram_size=2) == [decoder.text_of(r) for r in decoder.generate(
        embedded, {"no_repeat_ngram_size": 2})]


def test_text_only_decoders_block_repeats_by_default_and_older_ones_keep_their_captions(embedder, scenes_dir,
                                                                                         tmp_path):
    decoder = decoder_class("capdec").example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    decoder.config.num_beams, decoder.config.max_length = 3, 20
    embedded = images(scenes_dir, embedder, n=6)
    blocked, free = (decoder.decode(embedded, no_repeat_ngram_size=n) for n in (3, 0))
    assert blocked != free  # the example LM repeats itself: the default is seen
    assert decoder.config.no_repeat_ngram_size == 3 and decoder.decode(embedded) == blocked
    decoder.save(tmp_path / "new")
    assert load_decoder(tmp_path / "new", device="cpu").decode(embedded) == blocked
    saved = json.loads((tmp_path / "new" / "config.json").read_text())  # as unembed wrote it before format 4
    del saved["config"]["no_repeat_ngram_size"]
    (tmp_path / "new" / "config.json").write_text(json.dumps({**saved, "format_version": 3}))
    older = load_decoder(tmp_path / "new", device="cpu")
    assert older.config.no_repeat_ngram_size == 0 and older.decode(embedded) == free
    from unembed.errors import ModelLoadError

    for bad in (-1, 2.5, "3"):  # a hand-edited config: refused when loaded, in one line naming it
        (tmp_path / "new" / "config.json").write_text(json.dumps({**saved, "config": {
            **saved["config"], "no_repeat_ngram_size": bad}}))
        with pytest.raises(ModelLoadError) as caught:
            load_decoder(tmp_path / "new", device="cpu")
        assert str(caught.value) == (f"{tmp_path / 'new'}/config.json describes no buildable capdec decoder "
                                     f"(ValueError: no_repeat_ngram_size must be a whole number from 0 (off), "
                                     f"not {bad!r})")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_the_batched_no_repeat_processor_bans_what_transformers_bans(n):
    from transformers import NoRepeatNGramLogitsProcessor

    from unembed.decoders.repeats import NoRepeatNGram

    generator, banned = torch.Generator().manual_seed(n), 0
    for length in range(0, 12):
        ids = torch.randint(0, 4, (6, length), generator=generator)  # 4 tokens: many repeats
        scores = torch.randn(6, 7, generator=generator)
        ours = NoRepeatNGram(n)(ids, scores.clone())
        assert torch.equal(ours, NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())), (n, length)
        banned += int(torch.isinf(ours).sum())
        if length < n:
            assert torch.equal(ours, scores)  # no n-gram is complete yet
    assert banned > 0


def test_no_repeat_ngram_size_in_coca_search(embedder, scenes_dir, tmp_path):
    decoder = decoder_class("coca").example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    embedded = images(scenes_dir, decoder.embedder, with_tokens=True, n=4)

    def repeats(ids):
        pairs = [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]
        return len(pairs) - len(set(pairs))
    free = decoder.generate(embedded, num_beams=2, max_length=12)
    blocked = decoder.generate(embedded, num_beams=2, max_length=12, no_repeat_ngram_size=2)
    assert any(repeats(ids) for ids in free)  # the random CoCa repeats itself: the test can fail
    assert not any(repeats(ids) for ids in blocked)


def test_rerank_weight_without_rerank_is_refused_in_one_line(embedder, scenes_dir, tmp_path):
    decoder = decoder_class("capdec").example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    with pytest.raises(BadInputError) as caught:
        decoder.decode(images(scenes_dir, embedder), rerank_weight=0.5)
    assert str(caught.value) == ("option rerank_weight: the capdec decoder uses it only with rerank above 1 "
                                 "(--rerank N; rerank=N)")


def test_a_decoder_without_an_embedder_loads_its_own_to_rerank(embedder, scenes_dir, tmp_path):
    decoder = decoder_class("capdec").example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    decoder.save(tmp_path / "capdec")
    alone = load_decoder(tmp_path / "capdec", device="cpu")  # capdec decodes without its embedder
    embedded = images(scenes_dir, embedder)
    assert alone._embedder is None
    decoder.attach_embedder(embedder)
    assert alone.decode(embedded, rerank=3) == decoder.decode(embedded, rerank=3)
    assert alone._embedder is not None and alone._embedder.id == embedder.id


def test_caption_rerank_from_an_image_file_through_the_cli(tmp_path):
    from tests.test_zoo import unembed as run

    out = run("caption", EXAMPLE, "--decoder", "capdec", "--device", "cpu", "--rerank", "4", "--rerank-weight", "0.5")
    assert out.code == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[0])["caption"]
    from unembed.bundle import bundled_decoder
    from unembed.embedders import load_embedder

    embedder = load_embedder(str(bundled_decoder("capdec").parent / "embedder"), "cpu")
    decoder = load_decoder(bundled_decoder("capdec"), device="cpu", embedder=embedder)
    from PIL import Image

    embedded = embedder.embed([Image.open(EXAMPLE).convert("RGB")], ["scene-0"])
    assert got == by_hand(embedder, embedded, decoder.candidates(embedded, 4), 0.5)[0]
    refused = run("caption", EXAMPLE, "--decoder", "capdec", "--rerank-weight", "0.5")
    assert refused.code == 2 and refused.stderr.strip().splitlines()[-1] == (
        "unembed: option rerank_weight: the capdec decoder uses it only with rerank above 1 (--rerank N; rerank=N)")


# --- the corrector --------------------------------------------------------------------------------

def test_each_correction_step_keeps_the_closest_caption(embedder, scenes_dir, tmp_path):
    from unembed.decoders.corrector import CorrectorDecoder

    torch.manual_seed(0)
    corrector = CorrectorDecoder.example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    embedded = images(scenes_dir, embedder, n=4)

    def cosines(captions):
        vectors = F.normalize(embedder.embed_texts(captions).float(), dim=-1)
        return (vectors * F.normalize(embedded.vectors.float(), dim=-1)).sum(-1)

    base = corrector.decode(embedded, correct=0, edits=0)
    assert base == corrector.base.decode(embedded)  # K = 0, no edits: the base's caption
    previous = cosines(base)
    for k in (1, 2, 4):
        now = cosines(corrector.decode(embedded, correct=k, margin=0.0, edits=0))
        assert (now >= previous - 1e-6).all()  # a step can only bring the caption closer
        previous = now
    calls = embedder.texts_embedded
    corrector.decode(embedded, correct=2, rerank=2, edits=0)
    assert 0 < embedder.texts_embedded - calls <= 4 * 2 * 3  # N per row for the base and for each step


def test_train_corrector_refuses_a_missing_base_before_loading_anything(scenes_dir, tmp_path):
    from tests.test_zoo import unembed as run

    refused = run("train", "corrector", "--base", tmp_path / "nowhere", "--data", scenes_dir, "--out", tmp_path / "x")
    assert refused.code == 2 and str(tmp_path / "nowhere") in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_the_corrector_is_not_trained_like_a_plain_prefix_decoder(embedder, scenes_dir, tmp_path):
    from unembed.training.loop import TrainConfig
    from unembed.training.prefix import train_prefix

    with pytest.raises(BadInputError, match="unembed train corrector --base DIR"):
        train_prefix("corrector", embedder, tmp_path / "c", TrainConfig(max_steps=1), data_dir=scenes_dir)
    assert not (tmp_path / "c").exists()


def test_substitutes_are_words_seen_in_the_same_places():
    from unembed.decoders.edits import substitutes

    captions = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("star", "circle", "heart")
                for p in ("left", "right")] + ["a red star and a blue heart"]
    table = substitutes(captions)
    assert set(table["red"]) == {"blue", "green"} and set(table["star"]) == {"circle", "heart"}
    # "left" and "right" share one context ("the", end), "a" none: under three, so no substitutes
    assert "left" not in table and "a" not in table


def test_an_edit_is_kept_only_when_the_embedder_prefers_it_by_the_margin(embedder, scenes_dir, tmp_path):
    from unembed.decoders.corrector import CorrectorDecoder
    from unembed.decoders.edits import substituted, substitutes
    from unembed.decoders.rerank import logit_scale

    torch.manual_seed(0)
    captions = split_captions(scenes_dir / "train")
    corrector = CorrectorDecoder.example(embedder, captions, tmp_path)
    assert corrector.substitutes == substitutes(captions)  # learned from its training captions
    embedded = images(scenes_dir, embedder, n=4)
    base = corrector.decode(embedded, correct=0, edits=0)
    targets = F.normalize(embedded.vectors.float(), dim=-1)

    def cosine(caption, i):
        return float(F.normalize(embedder.embed_texts([caption]).float(), dim=-1)[0] @ targets[i])

    scale = logit_scale(embedder)
    for margin in (0.0, 0.5):
        edited = corrector.decode(embedded, correct=0, edits=1, margin=margin)
        for i, (before, after) in enumerate(zip(base, edited)):
            options = substituted(before, corrector.substitutes)
            best = max(options, key=lambda c: cosine(c, i)) if options else before
            gain = scale * (cosine(best, i) - cosine(before, i)) if options else 0.0
            assert after == (best if gain > margin + 1e-6 else before), (margin, before, after)


# --- inversion ---------------------------------------------------------------------------------------

def test_invert_scores_exact_matches_bleu_cosine_and_calls(embedder, retrieval_dir, scenes_dir):
    from unembed.eval.inversion import held_out_captions, invert

    decoder = load_decoder(retrieval_dir, device="cpu", embedder=embedder)
    train = split_captions(scenes_dir / "train")
    memorised = [c for c in dict.fromkeys(train)][:6]  # in the retrieval memory: they come back exactly
    scores = invert(decoder, embedder, memorised)
    assert scores["exact_match"] == 1.0 and scores["BLEU-4"] > 0.99 and scores["cosine"] > 0.999
    assert scores["embedder_calls_per_caption"] == 0 and scores["misses"] == []
    reranked = invert(decoder, embedder, memorised, rerank=3)
    from unembed.data.vectors import Embedded

    targets = Embedded(embedder.embed_texts(memorised), [str(i) for i in range(6)], embedder.id, embedder.spec, "text")
    distinct = {c for row in decoder.candidates(targets, 3) for c, _ in row}
    # each distinct candidate text of the batch is embedded once
    assert reranked["embedder_calls_per_caption"] == round(len(distinct) / 6, 2) and len(distinct) > 6
    held_out = held_out_captions(scenes_dir / "test", 5)
    assert len(held_out) == 5 and set(held_out) <= set(split_captions(scenes_dir / "test"))



def test_rerank_stop_embeds_candidates_best_first_until_one_reaches_it(embedder, retrieval_dir, scenes_dir):
    """rerank_stop: each row's candidates are embedded one per round, in the decoder's order, until one's
    cosine reaches the stop; the pick is rerank's over those embedded."""
    from unembed.data.vectors import Embedded

    decoder = load_decoder(retrieval_dir, device="cpu", embedder=embedder)
    memorised = [c for c in dict.fromkeys(split_captions(scenes_dir / "train"))][:6]
    targets = Embedded(embedder.embed_texts(memorised), [str(i) for i in range(6)], embedder.id, embedder.spec, "text")
    assert [row[0][0] for row in decoder.candidates(targets, 3)] == memorised  # the nearest is the text itself
    before = embedder.texts_embedded
    assert decoder.decode(targets, rerank=3, rerank_weight=100.0, rerank_stop=0.9999) == memorised
    assert embedder.texts_embedded - before == 6  # one call each, not 3
    embedded = images(scenes_dir, embedder, n=4)
    candidates = [[(c, max(s for t, s in row if t == c)) for c in dict.fromkeys(t for t, _ in row)]
                  for row in decoder.candidates(embedded, 3)]  # each text once, at its best score
    cosines = [[float(F.normalize(embedder.embed_texts([c]).float(), dim=-1)[0] @ F.normalize(v.float(), dim=-1))
                for c, _ in row] for row, v in zip(candidates, embedded.vectors)]
    firsts = sorted(row[0] for row in cosines)
    for stop in (0.9999, (firsts[1] + firsts[2]) / 2):  # none stops; then two rows stop at their first
        kept = [row[:next((k + 1 for k, c in enumerate(cos) if c >= stop), len(row))]
                for row, cos in zip(candidates, cosines)]
        embedded_texts = {c for row in kept for c, _ in row}  # each text once, in whichever turn first
        expected, before = by_hand(embedder, embedded, kept, 0.5), embedder.texts_embedded
        assert decoder.decode(embedded, rerank=3, rerank_weight=0.5, rerank_stop=stop, rerank_guide=0.0) == expected
        assert embedder.texts_embedded - before == len(embedded_texts)
    assert sum(len(row) for row in kept) < sum(len(row) for row in candidates)



def ridge_by_hand(texts: list[str], seen: dict[int, float], ridge: float) -> list[float]:
    """Each text's cosine predicted from the seen ones: ridge regression on word and word-pair
    indicators (with start and end marks), the seen mean as an unpenalised intercept, solved in the
    primal (one weight per word or pair)."""
    def grams(text):
        words = ["<s>", *text.lower().replace(",", " ,").split(), "</s>"]
        return set(words) | {a + " " + b for a, b in zip(words, words[1:])}

    vocab = sorted(set().union(*(grams(t) for t in texts)))
    X = torch.tensor([[float(g in grams(t)) for g in vocab] for t in texts], dtype=torch.float64)
    index, y = list(seen), torch.tensor(list(seen.values()), dtype=torch.float64)
    w = torch.linalg.solve(X[index].T @ X[index] + ridge * torch.eye(len(vocab), dtype=torch.float64),
                           X[index].T @ (y - y.mean()))
    return (X @ w + y.mean()).tolist()


def test_rerank_guide_embeds_next_the_candidate_the_seen_cosines_point_to():
    from unembed.decoders.rerank import RIDGE, next_candidate, predicted_cosines, shared_grams

    row = [("a red circle above a blue square", -0.10), ("a red circle below a blue square", -0.20),
           ("a green circle below a blue square", -0.30), ("a green circle above a blue square", -0.35)]
    texts, seen = [t for t, _ in row], {0: 0.90, 1: 0.80}  # "above" brought the embedding nearer
    shared = shared_grams(texts)
    predicted = predicted_cosines(shared, list(seen), list(seen.values())).tolist()
    assert predicted == pytest.approx(ridge_by_hand(texts, seen, RIDGE), abs=1e-9)
    assert predicted[3] > predicted[2]
    assert next_candidate(row, seen, shared, 0.0) == 2  # no guide: the decoder's order
    assert next_candidate(row, seen, shared, 100.0) == 3  # the guide: the "above" one
    assert next_candidate(row, {0: 0.90}, shared, 100.0) == 1  # one cosine seen predicts all alike


def test_rerank_calls_embed_at_most_that_many_in_the_guided_order(embedder, retrieval_dir, scenes_dir):
    from unembed.decoders.rerank import RIDGE, dedupe, embed_in_turns
    from unembed.generation import RERANK_GUIDE

    decoder = load_decoder(retrieval_dir, device="cpu", embedder=embedder)
    embedded = images(scenes_dir, embedder, n=4)
    scale = float(embedder.model.logit_scale.detach().exp())
    candidates = decoder.candidates(embedded, 4)
    assert all(len(dict(row)) == 4 for row in candidates)
    sets = []
    for guide in (0.0, RERANK_GUIDE):
        kept, turns = [], []
        for row, vector in zip(candidates, F.normalize(embedded.vectors.float(), dim=-1)):
            def cosine(j):
                return float(F.normalize(embedder.embed_texts([row[j][0]]).float(), dim=-1)[0] @ vector)
            seen = {0: cosine(0)}
            while len(seen) < 3:
                predicted = ridge_by_hand([t for t, _ in row], seen, RIDGE)
                rest = [j for j in range(4) if j not in seen]
                j = max(rest, key=lambda j: row[j][1] + guide * scale * predicted[j])
                seen[j] = cosine(j)
            kept.append([row[j] for j in sorted(seen)])
            turns.append([row[j][0] for j in seen])  # in the order embedded
        options = {} if guide == RERANK_GUIDE else {"rerank_guide": guide}
        expected, before = by_hand(embedder, embedded, kept, 0.5), embedder.texts_embedded
        assert decoder.decode(embedded, rerank=4, rerank_weight=0.5, rerank_calls=3, **options) == expected
        # each turn embeds one candidate of each open row; a text is embedded once in all the turns
        assert embedder.texts_embedded - before == len({t for texts in turns for t in texts})
        chosen = embed_in_turns(embedder, [dedupe(row) for row in candidates], embedded.unit(), None, 3,
                                guide * scale)
        assert [sorted(c) for c in chosen] == [[j for j in range(4) if row[j][0] in texts]
                                             for row, texts in zip(candidates, turns)]
        sets.append([sorted(c) for c in chosen])
        # consensus among the candidates embedded: the same turns, the pick by_hand makes among them
        assert decoder.decode(embedded, rerank=4, rerank_weight=0.5, rerank_calls=3, rerank_consensus=100.0,
                              **options) == by_hand(embedder, embedded, kept, 0.5, 100.0)
    assert sets[0] != sets[1]  # here the guide embeds another third candidate than the decoder's order
    with pytest.raises(BadInputError) as caught:
        decoder.decode(embedded, rerank=4, rerank_guide=5.0)
    assert str(caught.value) == ("option rerank_guide: the retrieval decoder uses it only with rerank_stop or "
                                 "rerank_calls (--rerank-stop C, --rerank-calls K)")


def test_eval_invert_through_the_cli(retrieval_dir, scenes_dir, embedder_dir, tmp_path):
    from tests.test_zoo import unembed as run

    out = run("eval", "--invert", "--decoder", retrieval_dir, "--data", scenes_dir, "--max-captions", "6",
              "--out", tmp_path / "inv.json", "--device", "cpu")
    assert out.code == 0, out.stderr
    saved = json.loads((tmp_path / "inv.json").read_text())["inversion"]
    assert saved["captions"] == 6 and f"| {Path(retrieval_dir).name} | 6 | {100 * saved['exact_match']:.1f}% |" in out.stdout
    missing = run("eval", "--invert", "--decoder", retrieval_dir, "--data", tmp_path / "none")
    assert missing.code == 2 and missing.stderr.strip().splitlines()[-1] == (
        f"unembed: {tmp_path / 'none' / 'test'}: no captions.json: not a split of a data directory")
    loose = run("eval", "--invert", "--decoder", retrieval_dir, "--data", scenes_dir, "--rerank-stop", "0.9999")
    assert loose.code == 2 and loose.stderr.strip().splitlines()[-1] == (
        "unembed: option rerank_stop: the retrieval decoder uses it only with rerank above 1 (--rerank N; rerank=N)")
    neither = run("eval")
    assert neither.code == 2 and "needs --results FILE and --refs FILE" in neither.stderr


def test_compare_decodes_a_variant_of_an_entry_with_its_own_options(retrieval_dir, scenes_dir, embedder_dir,
                                                                    embedder, tmp_path):
    from tests.test_zoo import unembed as run
    from unembed.data.splits import load_split
    from unembed.pipeline import embed_split

    config = json.dumps({"near3": {"rerank": 3, "rerank_weight": 1.0}})  # a variant: the same model, reranked
    out = run("compare", "--data", scenes_dir, "--decoders", f"plain={retrieval_dir},near3=@plain", "--embedder",
              embedder_dir, "--out", tmp_path / "run", "--config", config, "--no-spice", "--no-meteor", "--no-gap",
              "--device", "cpu")
    assert out.code == 0, out.stderr
    rows = {d["name"]: d for d in json.loads((tmp_path / "run" / "compare.json").read_text())["decoders"]}
    assert rows["near3"]["generation"] == {"rerank": 3, "rerank_weight": 1.0} and "generation" not in rows["plain"]
    decoder = load_decoder(retrieval_dir, device="cpu", embedder=embedder)
    embedded = embed_split(embedder, scenes_dir / "test")
    _, _, ids = load_split(scenes_dir / "test")
    got = [json.loads(line)["caption"] for line in (tmp_path / "run" / "captions" / "near3.jsonl").read_text().splitlines()]
    assert got == decoder.decode(embedded, rerank=3, rerank_weight=1.0) and len(got) == len(ids)
    bad = run("compare", "--data", scenes_dir, "--decoders", f"plain={retrieval_dir},x=@plain", "--out",
              tmp_path / "bad", "--config", json.dumps({"x": {"num_beams": 2}}), "--embedder", embedder_dir)
    assert bad.code == 2 and bad.stderr.strip().splitlines()[-1] == (
        "unembed: --config x: option num_beams: the retrieval decoder does not take it (it takes rerank, rerank_weight, "
        "rerank_consensus, rerank_stop, rerank_calls, rerank_guide, edits, margin)")
    assert not (tmp_path / "bad").exists()  # refused before any work
    unedited = run("compare", "--data", scenes_dir, "--decoders", f"plain={retrieval_dir},x=@plain", "--out",
                   tmp_path / "unedited", "--config", json.dumps({"x": {"edits": 1}}), "--embedder", embedder_dir)
    assert unedited.code == 2 and unedited.stderr.strip().splitlines()[-1] == (
        "unembed: --config x: option edits: x (a retrieval decoder) has no word substitutes (substitutes.json, "
        "which unembed writes when it trains capdec, clipcap, decap, viecap on captions)")
    assert not (tmp_path / "unedited").exists()
    orphan = run("compare", "--data", scenes_dir, "--decoders", "x=@plain", "--out", tmp_path / "orphan")
    assert orphan.code == 2 and "x=@plain: is a variant of 'plain', which no earlier entry names" in orphan.stderr


def test_the_readme_loop_tables_are_the_benchmark_json():
    """Each row of the README's loop tables (captioning, then inversion) is a row of
    benchmarks/results/loop_scenes.json."""
    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "results" / "loop_scenes.json").read_text())
    captioned = {(f"{100 * r['test']['CIDEr']:.1f}", f"{100 * r['compositional']['CIDEr']:.1f}",
                  str(r["compositional"]["names_heldout_pair"])) for r in result["captioning"].values()}
    inverted = {(f"{100 * r['exact_match']:.1f}%", f"{100 * r['BLEU-4']:.1f}", f"{r['cosine']:.3f}",
                 f"{r['embedder_calls_per_caption']:.1f}") for r in result["inversion"].values()}
    section = (root / "README.md").read_text().split("## Closing the loop")[1].split("\n## ")[0]
    tables = [t for t in section.split("\n\n") if t.startswith("| ")]
    assert [t.split(" |")[0] for t in tables] == ["| decoder", "| decoder", "| world, decoder",
                                                  "| decoder, 1,800 steps", "| decoder, 1,800 steps",
                                                  "| decoder, 1,800 steps", "| ensemble of seeds 0-2", "| inversion",
                                                  "| world: decoder"]
    tables = [tables[0], tables[7]]  # the repeats, rerank choice, keep-best, weight-average, lower-lr, ensemble
    # and margin tables have their own tests
    for table, measured, columns, least in ((tables[0], captioned, slice(2, 5), 10), (tables[1], inverted, slice(2, 6), 4)):
        rows = [line.split("|")[columns] for line in table.splitlines()[2:]]
        assert len(rows) >= least
        for row in rows:
            assert tuple(cell.strip() for cell in row) in measured, row


def test_the_readme_repeats_table_is_the_benchmark_json_and_its_choice_is_val_s():
    """README's table of no_repeat_ngram_size and consensus (benchmarks/repeats_consensus.py) is its JSON,
    the settings it read on test are the best on val, and the text-only kinds default to the one measured."""
    from unembed.decoders.capdec import CapDecConfig
    from unembed.decoders.clipcap import ClipCapConfig
    from unembed.decoders.decap import DeCapConfig
    from unembed.decoders.viecap import ViECapConfig

    bench = benchmark("repeats_consensus")
    result = json.loads((ROOT / "benchmarks" / "results" / "repeats_consensus.json").read_text())
    rows = bench.table(result).splitlines()
    assert len(rows) == 2 + 6 and all(row in (ROOT / "README.md").read_text() for row in rows)
    assert result["val_chosen"] == bench.choices(result["val_sweep"])
    assert bench.NO_REPEAT == result["no_repeat"]
    speed, readme = result["speed"], " ".join((ROOT / "README.md").read_text().split())
    mean = {(kind, n): sum(rows[split][f"beams, no repeat {n}, seconds"] for split in ("test", "compositional")
                           for name, rows in result["rows"].items() if name.startswith(kind)) / 6
            for kind in ("capdec", "viecap") for n in (0, 3)}
    assert (f"took {mean['capdec', 3]:.1f} s instead of {mean['capdec', 0]:.1f} s for capdec, {mean['viecap', 3]:.1f} s "
            f"instead of {mean['viecap', 0]:.1f} s for viecap") in readme
    small, wide = speed["processor"], speed["processor, GPT-2's vocabulary"]
    assert (f"{small['ratio']:.0f}x faster for 500 beams at the shipped decoders' {small['vocabulary']} tokens, "
            f"{wide['ratio']:.0f}x at GPT-2's 50,257") in readme
    assert (f"in {speed['capdec']['no repeat 3']:.2f} s with it against {speed['capdec']['no repeat 0']:.2f} s without "
            f"(viecap {speed['viecap']['no repeat 3']:.2f} s and {speed['viecap']['no repeat 0']:.2f} s;") in readme
    assert [c().no_repeat_ngram_size for c in (CapDecConfig, ViECapConfig, DeCapConfig, ClipCapConfig)] == [
        bench.NO_REPEAT] * 3 + [0]
    assert bench.more_candidates_sentence(result) in readme
    more = bench.MORE_CANDIDATES_ROW
    assert all(rows["val"][more]["CIDEr"] > result["val_sweep"][name][bench.setting(bench.NO_REPEAT, bench.RERANK_WEIGHT, 0.0)]
               for name, rows in result["more_candidates"].items())  # "raise ... at every seed"
    seconds_64 = [rows[split]["seconds"] for rows in result["more_candidates"].values() for split in ("test", "compositional")]
    seconds_32 = [rows[split]["beams, no repeat 3, seconds"] for name, rows in result["rows"].items()
                  if name in result["more_candidates"] for split in ("test", "compositional")]
    assert f"({sum(seconds_64) / 6:.0f} s against {sum(seconds_32) / 6:.0f} s a 1,000 images here)" in readme


def choice_by_hand(by_image: dict, z: float):
    """rerank_choice.chosen_weight's rule written out: of the weights whose mean per-image CIDEr gain over
    the decoder's own captions ("off") exceeds z standard errors of the mean, the best; else "off"."""
    import statistics

    kept = {}
    for weight, scores in by_image.items():
        if weight != "off":
            gains = [scores[i] - by_image["off"][i] for i in by_image["off"]]
            if statistics.mean(gains) > z * statistics.stdev(gains) / math.sqrt(len(gains)):
                kept[weight] = statistics.mean(gains)
    return max(sorted(kept), key=kept.get) if kept else "off"  # sorted: a tie goes to the smaller weight


def test_a_val_chosen_rerank_weight_is_kept_only_where_its_gain_is_beyond_chance():
    """rerank_choice.chosen_weight keeps the best of the weights that beat the decoder's own captions by
    more than TRUST_Z standard errors, paired image by image: a weight with the best mean but a gain
    chance could give loses to a smaller, steady one, and where no weight is steady the choice is "off"."""
    bench = benchmark("rerank_choice")
    off = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    steady = {"a": 1.2, "b": 1.3, "c": 1.2, "d": 1.3}        # +0.25, every image
    noisy = {"a": 2.9, "b": 0.2, "c": 2.5, "d": 0.1}         # +0.425 on average, two images worse
    for by_image, expected in (({"off": off, 0.05: steady, 0.5: noisy}, 0.05), ({"off": off, 0.5: noisy}, "off")):
        assert bench.chosen_weight(by_image)[0] == choice_by_hand(by_image, bench.TRUST_Z) == expected
    choice, evidence = bench.chosen_weight({"off": off, 0.05: steady, 0.1: dict(steady)})
    assert choice == 0.05 and evidence["gain"] == {"0.05": 0.25, "0.1": 0.25}  # a tie: the smaller weight
    assert evidence["standard_error"]["0.05"] == pytest.approx(0.0289, abs=1e-4)  # sd 0.0577 over 4 images


def test_the_readme_rerank_choice_table_is_the_benchmark_json_and_what_it_says_holds():
    """README's table and sentence on choosing the rerank weight per decoder are rerank_choice.py's JSON;
    each recorded choice follows chosen_weight's rule from the recorded gains and errors; and what the
    sentence says holds: every small-world choice "off", every main-world one a weight, and the choices'
    mean CIDEr under the default weight's on both splits in both worlds."""
    bench = benchmark("rerank_choice")
    result = json.loads((ROOT / "benchmarks" / "results" / "rerank_choice.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert bench.table(result) in readme
    assert " ".join(bench.sentence(result).split()) in " ".join(readme.split())
    for row in [*result["small"].values(), *result["main"].values()]:
        choice = row["choice"]
        kept = [w for w in choice["gain"] if choice["gain"][w] > bench.TRUST_Z * choice["standard_error"][w]]
        best = max(kept, key=lambda w: (choice["gain"][w], -float(w))) if kept else None
        assert choice["weight"] == ("off" if best is None else float(best))
    assert all(row["choice"]["weight"] == "off" for row in result["small"].values())
    assert all(row["choice"]["weight"] != "off" for row in result["main"].values())
    earlier = bench.earlier_rows()
    for world, names in (("main", list(result["main"])), ("small", [n for n in result["small"] if n.startswith("viecap")])):
        for k, split in enumerate(("test", "compositional")):
            assert sum(result[world][n][split]["CIDEr"] for n in names) < sum(earlier[world][n]["0.05"][k] for n in names)


def test_the_readme_margin_table_is_the_margin_sweep_and_its_choice_is_trainings():
    """Each row of the README's table of margins chosen on val is the benchmark's sweep
    (benchmarks/loop_scenes.py --margin-sweep), and each chosen margin is the one training would
    choose from the same val scores (edits.chosen_margin)."""
    import math

    from unembed.decoders.edits import chosen_margin

    root = ROOT
    margin_table = benchmark("loop_scenes").margin_table
    result = json.loads((root / "benchmarks" / "results" / "loop_scenes.json").read_text())
    rows = margin_table(result).splitlines()[2:]
    readme = (root / "README.md").read_text()
    assert len(rows) >= 5 and all(row in readme for row in rows)
    for world in result["margin_sweep"].values():
        for row in world.values():
            val = {(math.inf if m == "off" else float(m)): r["CIDEr"] for m, r in row["val"].items()}
            chosen = chosen_margin(val)
            assert row["val_chosen"]["margin"] == ("off" if chosen == math.inf else f"{chosen:g}")


def test_the_readme_keep_best_table_is_the_benchmark_json_and_what_it_says_holds():
    """README's table and sentence on keeping the best val checkpoint are keep_best.py's JSON; each kept step
    is the first best of its recorded val curve, as --keep-best keeps it (the last step's when it ties);
    the last-step decoders measured beside it are the same runs (identical weights at the last step);
    and the goals the sentence counts are recomputed from the rows."""
    bench = benchmark("keep_best")
    result = json.loads((ROOT / "benchmarks" / "results" / "keep_best.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert bench.table(result) in readme
    assert " ".join(bench.sentence(result).split()) in " ".join(readme.split())
    rows = dict(bench.runs_in(result))
    assert len(rows) == 6 and len(result["paired"]) == 3
    for row in [*rows.values(), *result["paired"].values()]:
        curve = {int(step): score for step, score in row["val_CIDEr"].items()}
        last, best = max(curve), max(curve.values())
        assert sorted(curve) == list(range(bench.VALIDATE_EVERY, last + 1, bench.VALIDATE_EVERY))
        assert row["kept_step"] == (last if curve[last] == best else min(s for s, v in curve.items() if v == best))
    assert all(row["last_step_weights_identical"] is True for row in rows.values())
    # "ClipCap's own captions, kept the same way, gain 3 to 7 compositional CIDEr over the bundle's"
    gains = [100 * (c["own"]["compositional"]["CIDEr"] - bench.paired_clipcap()) for c in result["paired"].values()]
    assert round(min(gains)) == 3 and round(max(gains)) == 7
    assert "gain 3 to 7 compositional CIDEr over the bundle's 600-step ClipCap" in " ".join(readme.split())
    # what the paragraph after the sentence says: the kept step beats the last everywhere, and the 600-step
    # decoders on test at all six, on compositional at the three viecaps and one capdec
    earlier = benchmark("rerank_choice").earlier_rows()["main"]
    for name, row in rows.items():
        for read in ("own", bench.LOOP):
            for split in ("test", "compositional"):
                assert row["kept"][read][split]["CIDEr"] > row["last"][read][split]["CIDEr"], (name, read, split)
        assert row["kept"][bench.LOOP]["test"]["CIDEr"] > earlier[name]["0.05"][0]
    capdecs = [row["val_CIDEr"] for n, row in rows.items() if n.startswith("capdec")]
    for step, said in (("400", 182), ("1800", 162)):  # "falls from 182 at step 400 to 162 at step 1,800"
        assert round(100 * sum(c[step] for c in capdecs) / len(capdecs)) == said
    assert "from 182 at step 400 to 162 at step 1,800" in " ".join(readme.split())
    above = [n for n, row in rows.items() if row["kept"][bench.LOOP]["compositional"]["CIDEr"] > earlier[n]["0.05"][1]]
    assert sorted(above) == ["capdec, seed 0", "viecap, seed 0", "viecap, seed 1", "viecap, seed 2"]
    fair = bench.goals(result, compositional_bar=bench.paired_kept(result))
    for seed, met in bench.goals(result).items():
        viecap = rows[f"viecap, seed {seed}"]["kept"][bench.LOOP]
        capdec = rows[f"capdec, seed {seed}"]["kept"]["own"]
        clipcap = result["paired"][f"clipcap, seed {seed}"]["own"]
        assert met == {"heldout": viecap["compositional"]["names_heldout_pair"] >= 600,
                       "compositional": viecap["compositional"]["CIDEr"] > bench.paired_clipcap(),
                       "test": viecap["test"]["CIDEr"] >= capdec["test"]["CIDEr"]}
        assert fair[seed] == {**met, "compositional": viecap["compositional"]["CIDEr"] > clipcap["compositional"]["CIDEr"]}
    assert [s for s, g in fair.items() if all(g.values())] == [1]  # "at one seed of three (seed 1)"
    # the viecaps chosen on the whole val split
    assert " ".join(bench.surer_sentence(result).split()) in " ".join(readme.split())
    surer = result[f"chosen on {bench.MORE_VAL_IMAGES} val images"]
    assert [surer[f"viecap, seed {s}"]["kept_step"] == rows[f"viecap, seed {s}"]["kept_step"] for s in (0, 1, 2)] == [
        True, True, False]  # "Seeds 0 and 1 keep the same step"
    new, old = surer["viecap, seed 2"]["kept"][bench.LOOP], rows["viecap, seed 2"]["kept"][bench.LOOP]
    assert (round(100 * (old["compositional"]["CIDEr"] - new["compositional"]["CIDEr"]), 1),
            round(100 * (new["test"]["CIDEr"] - old["test"]["CIDEr"]), 1),
            new["compositional"]["names_heldout_pair"] - old["compositional"]["names_heldout_pair"]) == (1.4, 3.8, 37)
    for s in (0, 1, 2):
        curve = {int(step): v for step, v in surer[f"viecap, seed {s}"]["val_CIDEr"].items()}
        assert max(curve, key=lambda step: (curve[step], -step)) == surer[f"viecap, seed {s}"]["kept_step"]
    late = [v for step, v in surer["viecap, seed 0"]["val_CIDEr"].items() if int(step) >= 300]
    assert (f"{100 * min(late):.1f}", f"{100 * max(late):.1f}") == ("172.5", "184.5")
    assert "(seed 0: 172.5 to 184.5)" in readme


def test_the_readme_weight_average_table_is_the_benchmark_json_and_what_it_says_holds():
    """README's table and sentences on `--ema` are weight_average.py's JSON beside keep_best.py's; every
    averaged run trained the same raw weights as keep_best.py's (identical at the last step); each kept step
    is the first best of its recorded val curve; and the goals the sentence counts are recomputed."""
    bench = benchmark("weight_average")
    result = json.loads((ROOT / "benchmarks" / "results" / "weight_average.json").read_text())
    kept = json.loads((ROOT / "benchmarks" / "results" / "keep_best.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert bench.table(result, kept) in (ROOT / "README.md").read_text()
    for said in (bench.sentence(result, kept), bench.spread_sentence(result, kept)):
        assert " ".join(said.split()) in readme
    rows = {name: row for name, row in result.items() if name != "recipe"}
    assert sorted(rows) == sorted(f"{kind}, seed {s}" for kind in ("capdec", "viecap", "clipcap") for s in (0, 1, 2))
    assert result["recipe"]["ema"] == bench.DECAY
    for row in rows.values():
        assert row["raw_weights_as_keep_best"] is True
        curve = {int(step): score for step, score in row["val_CIDEr"].items()}
        last, best = max(curve), max(curve.values())
        assert row["kept_step"] == (last if curve[last] == best else min(s for s, v in curve.items() if v == best))
    averaged = bench.as_keep_best(result)
    fair = bench.goals(averaged, compositional_bar=bench.paired_kept(averaged))
    for seed, met in fair.items():
        viecap = rows[f"viecap, seed {seed}"]["kept"][bench.LOOP]
        assert met == {"heldout": viecap["compositional"]["names_heldout_pair"] >= 600,
                       "compositional": viecap["compositional"]["CIDEr"] >
                       rows[f"clipcap, seed {seed}"]["kept"]["own"]["compositional"]["CIDEr"],
                       "test": viecap["test"]["CIDEr"] >= rows[f"capdec, seed {seed}"]["kept"]["own"]["test"]["CIDEr"]}
    # the curve's swings, by hand for one run: the mean absolute change between validations from step 300 on
    late = [rows["viecap, seed 0"]["val_CIDEr"][str(step)] for step in range(300, 1801, 100)]
    assert bench.curve_jitter(rows["viecap, seed 0"]) == pytest.approx(
        100 * sum(abs(late[i + 1] - late[i]) for i in range(len(late) - 1)) / (len(late) - 1))
    # what the paragraph after the sentences says
    assert [s for s, g in fair.items() if all(g.values())] == []  # "the goals hold at no seed"
    before = lambda name: kept["paired"][name]["own"] if name.startswith("clipcap") else kept[name]["kept"]["own"]
    lower_test = [n for n, row in rows.items() if row["kept"]["own"]["test"]["CIDEr"] < before(n)["test"]["CIDEr"]]
    assert len(lower_test) == 8  # "own captions lose test CIDEr at eight runs of nine"
    for seed in (0, 1, 2):  # "viecap ... loses on both splits at every seed, with and without the loop"
        name = f"viecap, seed {seed}"
        for read in ("own", bench.LOOP):
            for split in ("test", "compositional"):
                assert rows[name]["kept"][read][split]["CIDEr"] < kept[name]["kept"][read][split]["CIDEr"]
    assert ("own captions lose test CIDEr at eight runs of nine, and viecap, the decoder nearest the goals, loses on "
            "both splits at every seed, with and without the loop") in readme


def test_the_readme_lower_lr_table_is_the_benchmark_json_and_what_it_says_holds():
    """README's table and sentence on a lower peak learning rate are lower_lr.py's JSON beside keep_best.py's;
    each kept step is the first best of its recorded val curve; the goals the sentence counts are recomputed."""
    bench = benchmark("lower_lr")
    result = json.loads((ROOT / "benchmarks" / "results" / "lower_lr.json").read_text())
    kept = json.loads((ROOT / "benchmarks" / "results" / "keep_best.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert bench.table(result, kept, f"lr {bench.LR}") in (ROOT / "README.md").read_text()
    assert " ".join(bench.sentence(result, kept).split()) in readme
    seeds = bench.seeds_in(result)
    assert seeds and seeds == sorted(seeds) and result["recipe"]["lr"] == 5e-4
    for name, row in result.items():
        if name == "recipe":
            continue
        curve = {int(step): score for step, score in row["val_CIDEr"].items()}
        last, best = max(curve), max(curve.values())
        assert row["kept_step"] == (last if curve[last] == best else min(s for s, v in curve.items() if v == best))
    for seed in seeds:
        viecap = result[f"viecap, seed {seed}"]["kept"]["rerank 32, edits 1"]
        lowered = bench.as_keep_best(result)
        assert bench.goals(lowered, compositional_bar=bench.paired_kept(lowered), seeds=[seed])[seed] == {
            "heldout": viecap["compositional"]["names_heldout_pair"] >= 600,
            "compositional": viecap["compositional"]["CIDEr"] >
            result[f"clipcap, seed {seed}"]["kept"]["own"]["compositional"]["CIDEr"],
            "test": viecap["test"]["CIDEr"] >= result[f"capdec, seed {seed}"]["kept"]["own"]["test"]["CIDEr"]}
    # what the paragraph after the sentence says
    before = lambda name: kept["paired"][name]["own"] if name.startswith("clipcap") else kept[name]["kept"]["own"]
    change = lambda name, split, what="CIDEr": (result[name]["kept"]["own"][split][what] - before(name)[split][what])
    capdec = [f"capdec, seed {s}" for s in seeds]
    assert (round(100 * min(change(n, "compositional") for n in capdec), 1),
            round(100 * max(change(n, "compositional") for n in capdec), 1)) == (7.3, 12.0)
    pairs = [change(n, "compositional", "names_heldout_pair") for n in capdec]
    assert (min(pairs), max(pairs)) == (105, 145)
    assert all(abs(100 * change(n, "test")) < 5 for n in capdec)  # "at level test CIDEr"
    clipcap = [round(100 * change(f"clipcap, seed {s}", "compositional"), 1) for s in seeds]
    assert (min(clipcap), max(clipcap)) == (0.9, 4.8)
    viecap = [round(100 * change(f"viecap, seed {s}", "compositional"), 1) for s in seeds]
    assert (min(viecap), max(viecap)) == (-22.1, 0.7)
    lowered = bench.as_keep_best(result)
    assert not any(all(g.values()) for g in bench.goals(lowered, compositional_bar=bench.paired_kept(lowered),
                                                         seeds=seeds).values())
    assert ("capdec's own captions gain compositional CIDEr at every seed (+7.3 to +12.0) and name the held-out "
            "pair in 105 to 145 more captions, at level test CIDEr, and paired ClipCap gains 0.9 to 4.8") in readme
    assert "(its own captions: -22.1 to +0.7 compositional CIDEr)" in readme


def test_the_readme_ensemble_table_is_the_benchmark_json_and_what_it_says_holds():
    """README's table and sentences on ensembles are ensemble_scenes.py's JSON beside the members' own rows
    (keep_best.json, entity_merge_small.json); the goals the sentences count are recomputed from them."""
    bench = benchmark("ensemble_scenes")
    result = json.loads((ROOT / "benchmarks" / "results" / "ensemble_scenes.json").read_text())
    kept = json.loads((ROOT / "benchmarks" / "results" / "keep_best.json").read_text())
    small = json.loads((ROOT / "benchmarks" / "results" / "entity_merge_small.json").read_text())["seeds"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert bench.table(result) in (ROOT / "README.md").read_text()
    for said in (bench.sentence(result), bench.small_sentence(result), bench.bundled_sentence(result),
                 bench.more_candidates_sentence(result)):
        assert " ".join(said.split()) in readme
    assert sorted(result["main"]) == sorted(bench.MAIN_KINDS) and sorted(result["small"]) == sorted(bench.SMALL_KINDS)
    loop, test, comp = "rerank 32, edits 1", "test", "compositional"
    viecap = result["main"]["viecap"][loop]
    cider = lambda scores, split: scores[split]["CIDEr"]
    clipcaps = [kept["paired"][f"clipcap, seed {s}"]["own"] for s in (0, 1, 2)]
    capdecs = [kept[f"capdec, seed {s}"]["kept"]["own"] for s in (0, 1, 2)]
    heldout = viecap[comp]["names_heldout_pair"] >= 600
    met = bench.goals(result)
    assert met["main"]["each seed"] == {"heldout": heldout,
                                        "compositional": cider(viecap, comp) > max(cider(c, comp) for c in clipcaps),
                                        "test": cider(viecap, test) >= max(cider(c, test) for c in capdecs)}
    assert met["main"]["alike"] == {"heldout": heldout,
                                    "compositional": cider(viecap, comp) > cider(result["main"]["clipcap"]["own"], comp),
                                    "test": cider(viecap, test) >= cider(result["main"]["capdec"]["own"], test)}
    checked, capdec_small = result["small"]["viecap checked"][loop], result["small"]["capdec"]["own"]
    assert met["small"]["alike"] == {split: cider(checked, split) >= cider(capdec_small, split) for split in (test, comp)}
    assert met["small"]["each seed"] == {split: all(cider(checked, split) >= cider(small[f"seed {s}"]["capdec"], split)
                                                    for s in (0, 1, 2)) for split in (test, comp)}
    # what the paragraph after the table says
    for world, rows in (("main", result["main"]), ("small", result["small"])):
        for kind, row in rows.items():
            for read in ("own", loop):
                seeds = [m.get(read) for m in bench.members(world, kind)]
                if all(seeds):  # "the ensemble beats its seeds' mean on both splits, every kind and reading"
                    for split in (test, comp):
                        assert cider(row[read], split) > sum(cider(s, split) for s in seeds) / 3, (world, kind, read)
    # the README's example lands between its members: "above capdec on compositional CIDEr and above viecap
    # on test, the best of neither, read either way"
    bundled = result["bundled"]
    for read in ("own", "rerank 8, edits 1"):
        both, capdec, viecap = (bundled[name][read] for name in ("capdec + viecap", "capdec", "viecap"))
        assert cider(capdec, comp) < cider(both, comp) < cider(viecap, comp)
        assert cider(viecap, test) < cider(both, test) < cider(capdec, test)
    assert "above capdec on compositional CIDEr and above viecap on test, the best of neither, read either way" in readme
    # the hand-written gains, the seeds' own captions: "main viecap +5.9 / +4.5, capdec +7.2 / +3.2, paired
    # ClipCap +7.8 / +9.7; small checked viecap +2.9 / +1.8, capdec +0.2 / +1.8"
    gain = lambda world, kind: " / ".join(
        f"{100 * (cider(result[world][kind]['own'], split) - sum(cider(m['own'], split) for m in bench.members(world, kind)) / 3):+.1f}"
        for split in (test, comp))
    assert [gain("main", k) for k in ("viecap", "capdec", "clipcap")] == ["+5.9 / +4.5", "+7.2 / +3.2", "+7.8 / +9.7"]
    assert [gain("small", k) for k in ("viecap checked", "capdec")] == ["+2.9 / +1.8", "+0.2 / +1.8"]
    calls = [result["main"][k]["own"][test]["embedder_calls_per_caption"] for k in bench.MAIN_KINDS]
    assert (min(calls), max(calls)) == (2.11, 2.5)  # "2.1 to 2.5 embedder calls per test caption"
    assert ("main viecap +5.9 / +4.5, capdec +7.2 / +3.2, paired ClipCap +7.8 / +9.7; small checked viecap +2.9 / "
            "+1.8, capdec +0.2 / +1.8") in readme and "cost 2.1 to 2.5 embedder calls per test caption" in readme
    # "the ensemble beats one seed's 64 on both splits" (the seeds' mean)
    more = [result["viecap alone, rerank 64, edits 1"][f"seed {s}"] for s in (0, 1, 2)]
    for split in (test, comp):
        assert cider(result["main"]["viecap"][loop], split) > sum(cider(m, split) for m in more) / 3
    assert "the ensemble beats one seed's 64 on both splits" in readme
