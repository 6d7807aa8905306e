"""unembed.eval.metrics checked value by value (written against the mutants `make mutation` found
surviving the rest of the suite): the result's keys and per-image scores, SPICE's run driven through a
stand-in for its Java process (no CoreNLP download here), the Markdown table, CLIPScore's edge cases, and
the input files' exact errors. Fast: Java only for the PTB tokenizer, METEOR stubbed."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from unembed.errors import BadInputError, MismatchError, UnembedError
from unembed.eval import metrics

TWO = {1: ["a black cat sleeps on a red sofa", "a cat on a sofa"], 2: ["three boats float near a wooden pier"]}


@pytest.fixture
def no_meteor(monkeypatch):
    monkeypatch.setattr(metrics, "_meteor_score", lambda gts, res: 0.0)


# --- the COCO caption evaluation ------------------------------------------------------------------

def test_result_keys_and_per_image_scores(no_meteor):
    result = metrics.coco_caption_metrics({2: TWO[2][0], 1: "a cat on a red sofa", 7: "unreferenced"}, TWO,
                                          spice=False, meteor=False)
    assert list(result) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "unavailable", "per_image",
                            "skipped"]
    assert result["unavailable"] == {} and result["skipped"] == [7]
    assert list(result["per_image"]) == ["CIDEr"] and list(result["per_image"]["CIDEr"]) == [2, 1]
    assert all(isinstance(result[k], float) for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"))
    assert result["BLEU-1"] == pytest.approx(1.0) and 0 < result["BLEU-4"] <= result["BLEU-1"]
    assert 0 < result["ROUGE-L"] <= 1 and result["CIDEr"] > 0


def test_meteor_is_scored_when_asked(monkeypatch):
    monkeypatch.setattr(metrics, "_meteor_score", lambda gts, res: 0.25)
    result = metrics.coco_caption_metrics({1: "a cat on a red sofa"}, TWO, spice=False)
    assert result["METEOR"] == 0.25 and list(result).index("METEOR") == 4  # after BLEU-4, as the table reads


def test_spice_reason_is_reported_under_unavailable(no_meteor, monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "_spice_score", lambda gts, res, d: calls.append((gts, res, d)) or (None, "no jars"))
    result = metrics.coco_caption_metrics({1: "A cat."}, TWO)
    assert result["SPICE"] is None and result["unavailable"] == {"SPICE": "no jars"}
    # SPICE scores the tokenized captions, with the spice folder of pycocoevalcap's package
    assert calls == [({1: ["a black cat sleeps on a red sofa", "a cat on a sofa"]}, {1: ["a cat"]},
                      metrics._pycocoevalcap_dir() / "spice")]
    monkeypatch.setattr(metrics, "_spice_score", lambda gts, res, d: (0.5, None))
    result = metrics.coco_caption_metrics({1: "a cat"}, TWO)
    assert result["SPICE"] == 0.5 and result["unavailable"] == {}


def test_pair_keeps_referenced_predictions_in_pycocoevalcaps_form():
    res, gts, skipped = metrics._pair({1: "a  cat\non a sofa", 5: "x", 2: "boats"}, {**TWO, 5: []})
    assert res == {1: [{"caption": "a cat on a sofa"}], 2: [{"caption": "boats"}]}
    assert gts == {1: [{"caption": c} for c in TWO[1]], 2: [{"caption": TWO[2][0]}]}
    assert skipped == [5]


def test_pair_errors_name_what_is_wrong():
    with pytest.raises(BadInputError, match=r"^references of image 1: must be a list of captions, got one string$"):
        metrics._pair({1: "a cat"}, {1: "a cat"})
    with pytest.raises(BadInputError, match=r"prediction for image 1.*caption must be a string, got int"):
        metrics._pair({1: 3}, TWO)
    with pytest.raises(BadInputError, match=r"a reference of image 1.*caption must be a string, got NoneType"):
        metrics._pair({1: "a cat"}, {1: ["a cat", None]})
    with pytest.raises(UnembedError, match=r"^none of the 2 predicted images has reference captions \(e\.g\. "
                                           r"predicted id 'a', reference id 1\)$"):
        metrics._pair({"a": "x", "b": "y"}, TWO)
    with pytest.raises(UnembedError, match=r"^none of the 0 predicted images has reference captions$"):
        metrics._pair({}, TWO)


def test_one_line_joins_every_kind_of_line_break():
    assert metrics._one_line(" a\u2028cat\r\non\x0ca\tsofa  ", "it") == "a cat on a sofa"


def test_tokenize_keeps_every_image(no_meteor):
    tokenized = metrics._tokenize({1: [{"caption": "A Cat, on a sofa!"}], 2: [{"caption": "x"}, {"caption": "y"}]})
    assert tokenized == {1: ["a cat on a sofa"], 2: ["x", "y"]}


def test_a_short_tokenizer_output_is_an_error(monkeypatch):
    from pycocoevalcap.tokenizer import ptbtokenizer

    monkeypatch.setattr(ptbtokenizer.PTBTokenizer, "tokenize", lambda self, captions: {1: ["a cat"]})
    with pytest.raises(UnembedError, match=r"^the PTB tokenizer \(Java\) returned fewer lines than captions; see its "
                                           r"messages above$"):
        metrics._tokenize({1: [{"caption": "a cat"}], 2: [{"caption": "a dog"}]})
    with pytest.raises(UnembedError, match="returned fewer lines"):
        metrics._tokenize({1: [{"caption": "a cat"}, {"caption": "a dog"}]})


def test_pycocoevalcap_dir_is_the_package_folder():
    directory = metrics._pycocoevalcap_dir()
    assert directory.name == "pycocoevalcap" and (directory / "tokenizer" / "ptbtokenizer.py").is_file()
    assert metrics._check_writable(directory / "tokenizer") is None


def test_unwritable_folder_error_says_why(tmp_path):
    with pytest.raises(UnembedError, match=r"pycocoevalcap's PTB tokenizer writes temporary files into .*missing, "
                                           r"which is not writable \(No such file or directory\); install"):
        metrics._check_writable(tmp_path / "missing")


# --- SPICE, its Java process stood in for -----------------------------------------------------------

def spice_dir(tmp_path, jars=metrics.CORENLP_JARS):
    for jar in jars:
        (tmp_path / "lib").mkdir(exist_ok=True)
        (tmp_path / "lib" / jar).write_bytes(b"")
    return tmp_path


def fake_spice(monkeypatch, f_scores=None, returncode=0, stderr="", stdout=""):
    calls = []

    def run(cmd, **kwargs):
        records = json.loads(Path(cmd[4]).read_text(encoding="utf-8"))
        calls.append({"cmd": cmd, "records": records, **kwargs})
        if returncode == 0:
            out = [{"image_id": r["image_id"], "scores": {"All": {"f": f}}} for r, f in zip(records, f_scores)]
            Path(cmd[6]).write_text(json.dumps(out), encoding="utf-8")
        return SimpleNamespace(returncode=returncode, stderr=stderr, stdout=stdout)

    monkeypatch.setattr(metrics.subprocess, "run", run)
    return calls


GTS = {"x": ["a cat on a sofa", "a cat"], "y": ["three boats"]}
RES = {"x": ["a cat"], "y": ["two boats"]}


def test_spice_runs_its_jar_on_every_pair_and_averages_the_f_scores(monkeypatch, tmp_path):
    calls = fake_spice(monkeypatch, [0.5, 0.25])
    assert metrics._spice_score(GTS, RES, spice_dir(tmp_path)) == (0.375, None)
    (call,) = calls
    cmd = call["cmd"]
    assert cmd[:4] == ["java", "-jar", "-Xmx8G", "spice-1.0.jar"] and cmd[5] == "-out" and cmd[7:] == ["-subset", "-silent"]
    assert Path(cmd[4]).name == "in.json" and Path(cmd[6]).name == "out.json"
    assert Path(cmd[6]).parent == Path(cmd[4]).parent and Path(cmd[4]).is_absolute()  # never in SPICE's cwd
    assert not Path(cmd[4]).parent.exists()  # its temporary folder is gone
    assert call["cwd"] == tmp_path and call["capture_output"] and call["text"] and call["errors"] == "replace"
    assert call["records"] == [{"image_id": 0, "test": "a cat", "refs": ["a cat on a sofa", "a cat"]},
                               {"image_id": 1, "test": "two boats", "refs": ["three boats"]}]


def test_an_undefined_spice_f_score_makes_the_mean_nan(monkeypatch, tmp_path):
    fake_spice(monkeypatch, [0.5, None])
    value, reason = metrics._spice_score(GTS, RES, spice_dir(tmp_path))
    assert math.isnan(value) and reason is None


@pytest.mark.parametrize("stderr, stdout, reason", [
    ("Exception in thread main\nat spice", "", "SPICE failed: Exception in thread main"),
    ("", "  out of memory\nmore", "SPICE failed: out of memory"),
    ("", "", "SPICE failed: exit status 3"),
])
def test_a_failed_spice_run_reports_its_first_line(monkeypatch, tmp_path, stderr, stdout, reason):
    fake_spice(monkeypatch, returncode=3, stderr=stderr, stdout=stdout)
    assert metrics._spice_score(GTS, RES, spice_dir(tmp_path)) == (None, reason)


def test_spice_without_both_corenlp_jars_says_so(monkeypatch, tmp_path):
    calls = fake_spice(monkeypatch, [1.0, 1.0])
    directory = spice_dir(tmp_path, metrics.CORENLP_JARS[:1])
    assert metrics._spice_score(GTS, RES, directory) == (
        None, f"Stanford CoreNLP 3.6.0 jars missing in {directory / 'lib'}; SPICE downloads them on first use, "
              "which needs network")
    assert calls == []


# --- the Markdown table and CLIPScore ---------------------------------------------------------------

def test_format_table_columns_follow_the_papers_order():
    table = metrics.format_table({"a": {"CIDEr": 1.0, "BLEU-4": 0.5, "other": 3.0}, "b": {"METEOR": 0.25}})
    assert table == ("| System | BLEU-4 | METEOR | CIDEr |\n|---|---:|---:|---:|\n"
                     "| a | 50.0 | n/a | 100.0 |\n| b | n/a | 25.0 | n/a |\n")
    assert metrics.format_table({"x": {}}) == "| System |  |\n|---|\n| x |  |\n"


def test_clip_score_weight_and_shape_checks():
    images, captions = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert metrics.clip_score(images, captions, w=1.0).tolist() == pytest.approx([2 ** -0.5])
    with pytest.raises(MismatchError, match=r"^1 image vectors of size 2 vs 3 caption vectors of size 4$"):
        metrics.clip_score(images, torch.ones(3, 4))


def test_ref_clip_score_weight_and_count_checks():
    images, captions = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    refs = [torch.tensor([[1.0, 1.0], [0.0, 1.0]])]
    # CLIP-S = w * 1 = 2; reference cosine max(0.707, 0) = 0.707; harmonic mean 2 * 2 * 0.707 / 2.707
    assert metrics.ref_clip_score(images, captions, refs, w=2.0).tolist() == pytest.approx(
        [2 * 2 * 2 ** -0.5 / (2 + 2 ** -0.5)])
    # both parts small (their sum under 1): CLIP-S 0.5 * 1, reference cosine 0.6; harmonic mean 2 * 0.5 * 0.6 / 1.1
    near = [torch.tensor([[0.6, 0.8]])]
    assert metrics.ref_clip_score(images, captions, near, w=0.5).tolist() == pytest.approx([0.6 / 1.1])
    opposite = [torch.tensor([[-1.0, 0.0]])]  # reference cosine -1: clipped to 0, so the mean is 0
    assert metrics.ref_clip_score(images, captions, opposite).tolist() == [0.0]
    with pytest.raises(MismatchError, match=r"^1 captions but reference vectors for 2 images$"):
        metrics.ref_clip_score(images, captions, refs * 2)


class WordEmbedder:
    WORDS = {"dog": [1.0, 0.0], "cat": [0.0, 1.0]}

    def embed_texts(self, texts):
        return torch.tensor([next(v for w, v in self.WORDS.items() if w in t) for t in texts])


def test_clip_scores_ids_default_to_positions_and_must_match():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    result = metrics.clip_scores(WordEmbedder(), images, ["a dog", "a cat"])
    assert result == {"CLIPScore": pytest.approx(1.25), "per_image": {"CLIPScore": {0: 2.5, 1: 0.0}}}
    with pytest.raises(MismatchError, match=r"^3 image ids for 2 captions$"):
        metrics.clip_scores(WordEmbedder(), images, ["a dog", "a cat"], image_ids=[1, 2, 3])
    with pytest.raises(MismatchError, match=r"RefCLIPScore needs at least one reference for each of the 2 captions"):
        metrics.clip_scores(WordEmbedder(), images, ["a dog", "a cat"], [["dog"]])


# --- input files ------------------------------------------------------------------------------------

def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, text, message", [
    ("obj.json", '{"image_id": 1}', 'expected a list of {"image_id", "caption"} records (COCO results format); '
                                    "JSON Lines files need the .jsonl suffix"),
    ("empty.json", "[]", "has no captions"),
    ("empty.jsonl", "\n\n", "has no captions"),
    ("list.json", '[["a"]]', "record 0: expected an object, got list"),
    ("bool.json", '[{"image_id": true, "caption": "a"}]', "record 0: missing or invalid 'image_id' or 'id' "
                                                          "(an integer or string)"),
    ("float.jsonl", '{"id": 1.5, "caption": "a"}', "line 1: missing or invalid 'image_id' or 'id' (an integer or "
                                                   "string)"),
    ("bad.jsonl", '{"id": 1, "caption": "a"}\n\n{"id": 2,', "line 3: malformed JSON (Expecting property name "
                                                           "enclosed in double quotes)"),
    ("nocaption.jsonl", '{"id": 1}', "line 1: missing or non-string 'caption'"),
    ("dup.json", '[{"id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]',
     "record 1: duplicate image_id 1 (first in record 0)"),
])
def test_load_results_errors_say_exactly_what_is_wrong(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(BadInputError) as caught:
        metrics.load_results(path)
    assert caught.value.item == str(path) and caught.value.reason.startswith(message)
    assert caught.value.reason == message or name == "bad.jsonl"  # there the JSON error's position follows


def test_load_results_prefers_image_id_to_id(tmp_path):
    path = write(tmp_path / "r.jsonl", '{"image_id": "a", "id": 9, "caption": "x"}\n{"id": 0, "caption": "y"}')
    assert metrics.load_results(path) == {"a": "x", 0: "y"}


def test_load_results_of_unreadable_jsonl_says_so(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(BadInputError, match=r"cannot read as UTF-8 text \(") as caught:
        metrics.load_results(path)
    assert caught.value.item == str(path)
    with pytest.raises(BadInputError, match=r"cannot read as UTF-8 text \("):
        metrics.load_results(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("data, message", [
    ({"annotations": {}}, 'expected a COCO caption annotation file: an object with an "annotations" list'),
    ({"annotations": [{"caption": "a"}]}, "annotation 0: missing or invalid 'image_id' (an integer or string)"),
    ({"annotations": [{"image_id": 1, "id": 5, "caption": ""}]}, "annotation 0: empty reference caption"),
    ({"annotations": [{"image_id": 1, "caption": "a"}], "images": [{"id": 1}, {"id": 2}, {"id": 3}, "junk"]},
     "2 images have no captions, e.g. image 2"),
    ({"images": [], "annotations": []}, "has no annotations (no reference captions)"),
])
def test_load_references_errors_say_exactly_what_is_wrong(tmp_path, data, message):
    path = write(tmp_path / "refs.json", json.dumps(data))
    with pytest.raises(BadInputError) as caught:
        metrics.load_references(path)
    assert caught.value.item == str(path) and caught.value.reason == message


def test_load_references_needs_no_image_list(tmp_path):
    path = write(tmp_path / "refs.json", json.dumps({"annotations": [{"image_id": 1, "caption": "a"}]}))
    assert metrics.load_references(path) == {1: ["a"]}


def test_load_references_ignores_image_records_it_cannot_read(tmp_path):
    data = {"annotations": [{"image_id": 1, "caption": "a"}, {"image_id": "x", "caption": "b"}],
            "images": [{"id": 1}, "junk", {"id": "x"}]}
    assert metrics.load_references(write(tmp_path / "refs.json", json.dumps(data))) == {1: ["a"], "x": ["b"]}


# --- METEOR's JVM, stood in for -----------------------------------------------------------------------

class FakeStream:
    def __init__(self, data=b""):
        self.data, self.closed = data, False

    def read(self):
        return self.data

    def close(self):
        if self.data == b"broken pipe":
            raise BrokenPipeError
        self.closed = True


class FakeProcess:
    def __init__(self, stderr=b""):
        self.returncode, self.stdin, self.stderr, self.calls = None, FakeStream(), FakeStream(stderr), []

    def poll(self):
        return self.returncode

    def kill(self):
        self.calls.append("kill")
        self.returncode = -9

    def wait(self):
        self.calls.append("wait")
        return self.returncode


@pytest.fixture
def fake_meteor(monkeypatch):
    """pycocoevalcap's Meteor replaced by a stand-in recording its instances and what is registered at exit."""
    import threading

    from pycocoevalcap.meteor import meteor as meteor_module

    made, at_exit = [], []

    class Meteor:
        failure, stderr = None, b""

        def __init__(self):
            self.meteor_p, self.lock, self.scored = FakeProcess(self.stderr), threading.Lock(), []
            made.append(self)

        def compute_score(self, gts, res):
            if self.failure:
                self.lock.acquire()  # as the real one holds it when its JVM dies mid-score
                raise self.failure
            self.scored.append((gts, res))
            return 0.375, [0.375]

    monkeypatch.setattr(meteor_module, "Meteor", Meteor)
    monkeypatch.setattr(metrics, "_METEOR", None)
    monkeypatch.setattr(metrics.atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    return Meteor, made, at_exit


def test_meteor_jvm_is_started_once_and_reused(fake_meteor):
    _, made, at_exit = fake_meteor
    assert metrics._meteor_score({1: ["a"]}, {1: ["a"]}) == 0.375
    assert metrics._meteor_score({2: ["b"]}, {2: ["b"]}) == 0.375
    assert len(made) == 1 and made[0].scored == [({1: ["a"]}, {1: ["a"]}), ({2: ["b"]}, {2: ["b"]})]
    assert at_exit == [(metrics._stop_meteor, (made[0],))] and metrics._METEOR is made[0]


def test_a_dead_meteor_jvm_is_replaced(fake_meteor):
    _, made, at_exit = fake_meteor
    metrics._meteor_score({1: ["a"]}, {1: ["a"]})
    made[0].meteor_p.returncode = 1  # it died between two scorings
    metrics._meteor_score({1: ["a"]}, {1: ["a"]})
    assert len(made) == 2 and metrics._METEOR is made[1] and len(at_exit) == 2


@pytest.mark.parametrize("failure", [ValueError("empty line"), BrokenPipeError()])
@pytest.mark.parametrize("stderr, shown", [(b"Error: no jar\nat Meteor", "Error: no jar"), (b"  ", "no message"),
                                           (b"\xffError", "\ufffdError")])  # undecodable bytes are replaced
def test_a_failing_meteor_jvm_is_stopped_and_reported(fake_meteor, failure, stderr, shown):
    Meteor, made, _ = fake_meteor
    Meteor.failure, Meteor.stderr = failure, stderr
    with pytest.raises(UnembedError, match=rf"^METEOR's Java process failed: {shown}$"):
        metrics._meteor_score({1: ["a"]}, {1: ["a"]})
    process = made[0].meteor_p
    assert process.calls == ["kill", "wait"] and process.stdin.closed and not made[0].lock.locked()
    assert metrics._METEOR is None


def test_stopping_a_stopped_meteor_does_nothing():
    meteor = SimpleNamespace(meteor_p=FakeProcess(), lock=None)
    meteor.meteor_p.returncode, meteor.meteor_p.stdin.closed = 0, True
    metrics._stop_meteor(meteor)
    assert meteor.meteor_p.calls == []


def test_stopping_meteor_kills_its_jvm_and_tolerates_a_broken_pipe():
    import threading

    meteor = SimpleNamespace(meteor_p=FakeProcess(), lock=threading.Lock())
    metrics._stop_meteor(meteor)  # an unheld lock is left alone (releasing it would raise)
    assert meteor.meteor_p.calls == ["kill", "wait"] and meteor.meteor_p.stdin.closed
    exited = SimpleNamespace(meteor_p=FakeProcess(), lock=threading.Lock())
    exited.meteor_p.returncode, exited.meteor_p.stdin = 0, FakeStream(b"broken pipe")
    metrics._stop_meteor(exited)  # exited but its input still open: closed now, a broken pipe ignored
    assert exited.meteor_p.calls == ["kill", "wait"]


# --- what is refused before anything runs, and what is printed --------------------------------------

def test_java_missing_is_refused_with_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UnembedError, match=r"^pycocoevalcap needs Java \(java not found on PATH\); install a Java "
                                           r"runtime, e\.g\. apt-get install default-jre$"):
        metrics.coco_caption_metrics({1: "a cat"}, TWO)


def test_an_unwritable_tokenizer_folder_is_refused_before_tokenizing(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_pycocoevalcap_dir", lambda: tmp_path)  # no tokenizer/ folder in it
    with pytest.raises(UnembedError, match="not writable"):
        metrics.coco_caption_metrics({1: "a cat"}, TWO, spice=False, meteor=False)


def test_scoring_prints_nothing(no_meteor, capsys):
    metrics.coco_caption_metrics({1: "a cat on a sofa"}, TWO, spice=False)
    assert capsys.readouterr().out == ""  # pycocoevalcap's BLEU prints its totals unless told not to


def test_pycocoevalcap_missing_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocoevalcap.tokenizer", None)  # importing it now raises ImportError
    with pytest.raises(UnembedError, match=r"^COCO caption metrics need pycocoevalcap \(pip install pycocoevalcap\)$"):
        metrics._pycocoevalcap_dir()


def test_the_evaluate_module_is_the_packaged_script(monkeypatch):
    import sys

    calls = []
    fake = SimpleNamespace(load=lambda path, **kwargs: calls.append((path, kwargs)) or "loaded")
    monkeypatch.setitem(sys.modules, "evaluate", fake)  # evaluate itself takes seconds to import
    assert metrics.load_coco_caption_metric(keep_in_memory=True) == "loaded"
    assert calls == [(metrics.COCO_METRIC_PATH, {"keep_in_memory": True})]
    assert (Path(metrics.COCO_METRIC_PATH) / "coco_caption.py").is_file()


def test_clip_scores_follow_the_image_vectors_device():
    # image vectors on an accelerator, text vectors from a CPU embedder: the scores are computed where the
    # images are ("meta" stands in for an accelerator on a CPU-only machine)
    images, captions = torch.ones(2, 3, device="meta"), torch.ones(2, 3)
    assert metrics.clip_score(images, captions).device.type == "meta"
    references = [torch.ones(2, 3), torch.ones(1, 3)]
    assert metrics.ref_clip_score(images, captions, references).device.type == "meta"
