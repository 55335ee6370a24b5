"""Data sources: GSM8K files, hub/tfds code paths, JSONL skips, and the synthetic task."""
import json
import re
import sys
import types
from pathlib import Path

import pytest

from tpt_jax import io as tio
from tpt_jax.config import ConfigError, DataConfig, RunConfig, TptError, validate_run
from tpt_jax.data import load_seed, load_split, seed_examples, seed_solutions, synthetic_split
from tpt_jax.data import sources, synthetic

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared/data/gsm8k"


# ----------------------------------------------------------------------------- GSM8K


@pytest.fixture(scope="module")
def gsm8k():
    if not (GSM8K_DIR / "train.jsonl").is_file() or not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip(f"GSM8K files not found at {GSM8K_DIR} (shared data not mounted)")
    cfg = DataConfig(source="gsm8k", train_path=str(GSM8K_DIR / "train.jsonl"),
                     test_path=str(GSM8K_DIR / "test.jsonl"))
    return cfg, load_split(cfg, "train"), load_split(cfg, "test")


def test_gsm8k_local_files_load_with_stable_ids(gsm8k):
    cfg, train, test = gsm8k
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0]["id"] == "gsm8k-train-00000" and train[42]["id"] == "gsm8k-train-00042"
    assert test[-1]["id"] == "gsm8k-test-01318"
    assert train[0]["question"].startswith("Natalia sold clips")
    assert train[0]["answer"].endswith("#### 72")
    assert len({r["id"] for r in train}) == len(train)
    assert set(train[0]) == {"id", "question", "answer"}
    assert load_split(cfg, "train") == train  # same ids and order every time


def test_gsm8k_limit_takes_first_rows(gsm8k):
    cfg, train, _ = gsm8k
    cfg = DataConfig(source="gsm8k", train_path=cfg.train_path, train_limit=5)
    assert load_split(cfg, "train") == train[:5]


def test_gsm8k_hub_path_maps_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return [{"question": "Q1?", "answer": "x\n#### 1"}, {"question": "Q2?", "answer": "#### 2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    recs = load_split(DataConfig(source="gsm8k"), "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert recs == [{"id": "gsm8k-test-00000", "question": "Q1?", "answer": "x\n#### 1"},
                    {"id": "gsm8k-test-00001", "question": "Q2?", "answer": "#### 2"}]


def test_hub_failure_is_one_line_with_offline_hint(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TptError) as e:
        load_split(DataConfig(source="gsm8k"), "train")
    msg = str(e.value)
    assert "\n" not in msg and "openai/gsm8k" in msg and "train_path" in msg


# ----------------------------------------------------------------------------- JSONL, MATH, tfds


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_jsonl_bad_rows_are_counted_with_line_numbers(tmp_path, caplog):
    f = _write(tmp_path / "d.jsonl", [
        json.dumps({"q": "one plus one?", "a": "#### 2"}),  # line 1 ok
        "{not json",  # 2
        json.dumps({"q": "no answer"}),  # 3
        json.dumps({"q": "   ", "a": "#### 3"}),  # 4 empty question
        "[1, 2]",  # 5 not an object
        "",  # 6 blank: not a row
        json.dumps({"q": "numeric answer", "a": 7}),  # 7 ok
        json.dumps({"q": "empty answer", "a": ""}),  # 8
        json.dumps({"q": "list answer", "a": [1]}),  # 9
    ])
    cfg = DataConfig(source="jsonl", train_path=f, question_field="q", answer_field="a")
    skips = tio.Skips()
    recs = load_split(cfg, "train", skips=skips)
    assert recs == [{"id": "jsonl-train-00000", "question": "one plus one?", "answer": "#### 2"},
                    {"id": "jsonl-train-00006", "question": "numeric answer", "answer": "7"}]
    assert skips.by_reason == {
        "malformed JSON": [f"{f}:2"], "missing field 'a'": [f"{f}:3"],
        "empty question": [f"{f}:4"], "not a JSON object": [f"{f}:5"],
        "empty answer": [f"{f}:8"], "question/answer not text": [f"{f}:9"]}
    assert "skipped 6 unusable rows" in caplog.text


def test_jsonl_own_ids_kept_and_duplicates_skipped(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps({"id": "a", "question": "x?", "answer": "1"}),
                                      json.dumps({"id": "a", "question": "y?", "answer": "2"}),
                                      json.dumps({"id": 7, "question": "z?", "answer": "3"})])
    skips = tio.Skips()
    recs = load_split(DataConfig(source="jsonl", test_path=f), "test", skips=skips)
    assert [r["id"] for r in recs] == ["a", "7"]
    assert skips.by_reason == {"duplicate id": [f"{f}:2"]}


def test_wholly_unusable_source_is_one_line_error(tmp_path):
    f = _write(tmp_path / "bad.jsonl", ["nope", json.dumps({"question": ""})])
    with pytest.raises(TptError) as e:
        load_split(DataConfig(source="jsonl", train_path=f), "train")
    assert "\n" not in str(e.value) and "no usable records" in str(e.value)
    with pytest.raises(TptError, match="file not found"):
        load_split(DataConfig(source="jsonl", train_path=str(tmp_path / "missing.jsonl")), "train")
    with pytest.raises(TptError, match="test_path"):
        load_split(DataConfig(source="jsonl", train_path=f), "test")


def test_math_jsonl_maps_problem_and_solution(tmp_path):
    f = _write(tmp_path / "math.jsonl", [json.dumps({"problem": "1/2+0?", "solution": r"$\boxed{\frac12}$"})])
    recs = load_split(DataConfig(source="math", train_path=f, train_limit=3), "train")
    assert recs == [{"id": "math-train-00000", "question": "1/2+0?", "answer": r"$\boxed{\frac12}$"}]
    with pytest.raises(TptError, match="hf_name"):
        load_split(DataConfig(source="math"), "train")


def test_tfds_code_path_with_fake_module(monkeypatch):
    seen = {}

    def fake_load(name, split):
        seen["args"] = (name, split)
        return "dataset-object"

    def fake_as_numpy(ds):
        assert ds == "dataset-object"
        return iter([{"question": b"How many?", "answer": b"#### 4"}, {"question": b"", "answer": b"1"}])

    fake = types.SimpleNamespace(load=fake_load, as_numpy=fake_as_numpy)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    skips = tio.Skips()
    recs = load_split(DataConfig(source="tfds", tfds_name="my_math"), "train", skips=skips)
    assert seen["args"] == ("my_math", "train")
    assert recs == [{"id": "tfds-train-00000", "question": "How many?", "answer": "#### 4"}]
    assert skips.by_reason == {"empty question": ["tfds my_math[train] row 1"]}


def test_data_config_validation():
    with pytest.raises(ConfigError, match="data.source"):
        validate_run(RunConfig(data=DataConfig(source="csv")))
    with pytest.raises(ConfigError, match="tfds_name"):
        validate_run(RunConfig(data=DataConfig(source="tfds")))
    with pytest.raises(ConfigError, match="train_limit"):
        validate_run(RunConfig(data=DataConfig(train_limit=0)))
    with pytest.raises(ConfigError, match="unknown template"):
        validate_run(RunConfig(prompt="chat"))
    validate_run(RunConfig(prompt="few-shot:8"))


# ----------------------------------------------------------------------------- synthetic


def _recompute_from_question(question: str) -> int:
    """Independent reading of the question text (not the generator's code path)."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    value = int(re.fullmatch(r"\w+ has (\d+) \w+", sentences[0]).group(1))
    for s in sentences[1:]:
        s = re.sub(r"^Then ", "", s)
        if s.startswith("How many"):
            break
        if m := re.search(r"(?:buys|finds|gets) (\d+) more$", s):
            value += int(m.group(1))
        elif "gives half" in s:
            assert value % 2 == 0, question
            value //= 2
        elif m := re.search(r"(?:gives|loses|sells) (\d+)", s):
            value -= int(m.group(1))
        elif s.endswith("doubles them"):
            value *= 2
        elif s.endswith("triples them"):
            value *= 3
        else:
            raise AssertionError(f"unreadable sentence {s!r} in {question!r}")
        assert value >= 0, question
    return value


def _check_solution(rec: dict) -> None:
    lines = rec["answer"].split("\n")
    final = re.fullmatch(r"#### (\d+)", lines[-1])
    assert final, rec
    start = int(re.search(r"has (\d+)", rec["question"]).group(1))
    prev = start
    sentences = rec["question"].split(". ")
    assert len(sentences) == len(lines) + 1, rec
    for i, line in enumerate(lines[:-1]):
        assert sentences[i + 1].startswith(line.split(":")[0]), rec  # line i restates step i
        m = re.fullmatch(r"(?:Then |Later )?[A-Za-z ]+?(?: (\d+))?: <<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)",
                         line)
        assert m, line
        amount, a, op, b, res, shown = m.groups()
        assert int(a) == prev, rec  # each step continues from the previous result
        if amount is not None:
            assert amount == b, line
        exact = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                 "/": int(a) / int(b)}[op]
        assert exact == int(res) == int(shown), line  # the calculator annotation is right
        prev = int(res)
    assert int(final.group(1)) == prev == _recompute_from_question(rec["question"]), rec


def test_synthetic_is_deterministic_and_prefix_stable():
    a = synthetic_split("train", 300, seed=0)
    assert a == synthetic_split("train", 300, seed=0)
    assert synthetic_split("train", 50, seed=0) == a[:50]
    assert synthetic_split("train", 50, seed=1) != a[:50]
    assert a[7]["id"] == "synthetic-train-00007"
    assert len({r["question"] for r in a}) == 300


def test_synthetic_gold_answers_are_right():
    recs = synthetic_split("train", 500) + synthetic_split("test", 200) + seed_solutions(200)
    for r in recs:
        _check_solution(r)
    steps = {r["steps"] for r in recs}
    assert steps == set(range(1, synthetic.MAX_STEPS + 1))


def test_synthetic_splits_do_not_share_questions():
    train = {r["question"] for r in synthetic_split("train", 2000)}
    seed = {r["question"] for r in seed_solutions(200)}
    test = {r["question"] for r in synthetic_split("test", 500)}
    assert not (train & test) and not (seed & test)


def test_load_split_synthetic_and_seed_examples():
    cfg = DataConfig(synthetic_train=40, test_limit=7, seed_size=5)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train) == 40 and len(test) == 7
    assert set(train[0]) == {"id", "question", "answer"}
    assert train == [{k: r[k] for k in ("id", "question", "answer")}
                     for r in synthetic_split("train", 40)]
    seeds = load_seed(cfg)
    assert len(seeds) == 5 and seeds[0]["id"] == "synthetic-seed-00000"
    ex = seed_examples(cfg, "plain")
    assert ex[0]["prompt"] == f"Question: {seeds[0]['question']}\nAnswer:"
    assert ex[0]["completion"] == " " + seeds[0]["answer"]
    assert (ex[0]["sample"], ex[0]["source"]) == (0, "seed")
    assert load_seed(DataConfig(source="gsm8k")) == []


def test_seed_path_jsonl(tmp_path):
    f = _write(tmp_path / "seed.jsonl", [json.dumps({"question": "q?", "answer": "#### 1"}), "{"])
    skips = tio.Skips()
    assert load_seed(DataConfig(source="gsm8k", seed_path=f), skips) == [
        {"id": "seed-00000", "question": "q?", "answer": "#### 1"}]
    assert skips.counts() == {"malformed JSON": 1}
