"""Prune: strategies, pooling, stats, bad input, the CLI, and the real GSM8K gold solutions."""
import json
from pathlib import Path

import pytest

from tpt_jax import cli
from tpt_jax.stages.answers import calculator_errors, parse_gold, to_number
from tpt_jax.config import ConfigError, PruneConfig
from tpt_jax.bench.prune import bench_prune
from tpt_jax.stages.prune import (DROP_REASONS, dedup_equations, prune_files,
                           prune_records)

GSM8K = Path(__file__).parents[2] / "shared/data/gsm8k"

DATASET = [{"id": "q1", "question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
           {"id": "q2", "question": "half?", "answer": "\\boxed{\\frac{1}{2}}"},
           {"id": "q3", "question": "1000?", "answer": "1,000"}]


def _s(qid, sample, completion, source="m", finish="stop", **extra):
    return {"id": qid, "sample": sample, "source": source, "prompt": f"P {qid}",
            "completion": completion, "finish": finish, **extra}


def _cfg(strategy="all-correct", **kw):
    return PruneConfig(strategy=strategy, max_examples=kw.pop("max_examples", None), **kw)


def _accounted(stats):
    """Every sample record is kept, dropped for a reason, or reported as bad input."""
    c = stats["counts"]
    bad_samples = sum(v["count"] for k, v in stats["bad_input"].items() if k.startswith("sample"))
    no_gold = c["dropped"].get("question has no gold answer", 0)
    assert c["sample_records"] == c["samples"] + bad_samples + no_gold
    assert c["samples"] == c["kept"] + sum(v for k, v in c["dropped"].items()
                                           if k != "question has no gold answer")


def test_first_correct_keeps_lowest_sample_index_whatever_the_order():
    samples = [_s("q1", 3, "2+2=<<2+2=4>>4\n#### 4"), _s("q1", 0, "#### 5"),
               _s("q1", 1, "The answer is 4."), _s("q2", 0, "\\boxed{0.5}"),
               _s("q3", 0, "#### $1,000.00"), _s("q3", 1, "#### 1000")]
    kept, stats = prune_records(DATASET, samples, _cfg("first-correct"))
    assert [(k["id"], k["sample"]) for k in kept] == [("q1", 1), ("q2", 0), ("q3", 0)]
    ex = kept[0]
    assert ex == {"id": "q1", "sample": 1, "source": "m", "prompt": "P q1",
                  "completion": "The answer is 4.", "extracted": "4", "correct": True}
    assert stats["counts"]["dropped"] == {"wrong answer": 1, "over max per question": 2}
    _accounted(stats)


def test_all_correct_and_max_k():
    samples = [_s("q1", i, f"step {i}\n#### 4") for i in range(5)] + [_s("q1", 5, "#### 3")]
    kept, _ = prune_records(DATASET, samples, _cfg("all-correct"))
    assert [k["sample"] for k in kept] == [0, 1, 2, 3, 4]
    kept, stats = prune_records(DATASET, samples, _cfg("max-k", max_per_question=2))
    assert [k["sample"] for k in kept] == [0, 1]
    assert stats["counts"]["dropped"]["over max per question"] == 3
    with pytest.raises(ConfigError):
        prune_records(DATASET, samples, _cfg("max-k"))
    with pytest.raises(ConfigError):
        prune_records(DATASET, samples, _cfg("best-of-n"))


def test_unfinished_and_unanswered_are_never_kept():
    samples = [_s("q1", 0, "#### 4", finish="length"), _s("q1", 1, "four, I think"),
               _s("q1", 2, "so it is 4", tokens=3)]
    kept, stats = prune_records(DATASET, samples, _cfg())
    assert kept == []
    assert stats["counts"]["dropped"] == {"unfinished": 1, "no answer": 2}
    kept, _ = prune_records(DATASET, samples, _cfg(answer_fallback=True))
    assert [k["sample"] for k in kept] == [2]  # the fallback, only when asked for
    _accounted(stats)


def test_calculator_check_and_false_positive_rate():
    samples = [_s("q1", 0, "2+2=<<2+2=5>>5, oops\n#### 4"), _s("q1", 1, "<<2+2=4>>4\n#### 4"),
               _s("q1", 2, "just 4\n#### 4")]
    kept, stats = prune_records(DATASET, samples, _cfg())
    assert len(kept) == 3
    assert stats["false_positive"] == {"correct": 3, "with_annotations": 2,
                                       "calculator_wrong": 1, "rate": pytest.approx(1 / 3)}
    kept, stats = prune_records(DATASET, samples, _cfg(calculator_check=True))
    assert [k["sample"] for k in kept] == [1, 2]
    assert stats["counts"]["dropped"] == {"calculator check failed": 1}
    kept, _ = prune_records(DATASET, samples, _cfg("calculator"))
    assert [k["sample"] for k in kept] == [1, 2]


def test_dedup_text_and_length_limits():
    samples = [_s("q1", 0, "Two plus two.\n#### 4"), _s("q1", 1, "two  PLUS two.\n####  4"),
               _s("q1", 2, "Two plus two.\n#### 4"), _s("q1", 3, "x" * 50 + "\n#### 4")]
    # normalised text: case and whitespace do not make a trace different
    kept, stats = prune_records(DATASET, samples, _cfg("all-correct+dedup-text"))
    assert [k["sample"] for k in kept] == [0, 3]
    assert stats["counts"]["dropped"] == {"duplicate text": 2}
    kept, stats = prune_records(DATASET, samples, _cfg("dedup-text", max_per_question=1))
    assert [k["sample"] for k in kept] == [0]
    assert stats["counts"]["dropped"] == {"duplicate text": 2, "over max per question": 1}
    kept, stats = prune_records(DATASET, samples, _cfg(max_chars=40, min_chars=5))
    assert [k["sample"] for k in kept] == [0, 1, 2]
    assert stats["counts"]["dropped"] == {"too long": 1}
    kept, stats = prune_records(DATASET, samples, _cfg(min_chars=30))
    assert [k["sample"] for k in kept] == [3]
    assert stats["counts"]["dropped"] == {"too short": 3}
    toks = [_s("q1", i, "#### 4", tokens=t) for i, t in enumerate([10, 99])] + [_s("q1", 2, "#### 4")]
    kept, stats = prune_records(DATASET, toks, _cfg(max_tokens=50))
    assert [(k["sample"], k.get("tokens")) for k in kept] == [(0, 10), (2, None)]
    assert stats["counts"]["max_tokens_unchecked"] == 1


def test_rft_dedup_keeps_the_most_different_path():
    a = "Add: <<2+2=4>>4. Short.\n#### 4"
    b = "Different route: 1+3 is 4, written very differently here.\n#### 4"
    a2 = "Add them, and this text is long and unlike anything else: <<2+2=4>>4\n#### 4"
    samples = [_s("q1", 0, a), _s("q1", 1, b), _s("q1", 2, a2), _s("q1", 3, a)]
    kept, stats = prune_records(DATASET, samples, _cfg("dedup-equations"))
    got = {k["sample"] for k in kept}
    assert 1 in got and len(got) == 2  # one per equation sequence: (2+2=4) and ()
    from tpt_jax.stages.answers import edit_distance
    winner = 0 if edit_distance(a.split(), b.split()) >= edit_distance(a2.split(), b.split()) else 2
    assert got == {1, winner}
    assert stats["counts"]["dropped"] == {"duplicate equations": 2}
    # rft = calculator + dedup-equations
    bad = _s("q1", 4, "<<1+1=3>>3 and <<3+1=4>>4\n#### 4")
    kept, stats = prune_records(DATASET, samples + [bad], _cfg("rft"))
    assert 4 not in {k["sample"] for k in kept}
    assert stats["plan"]["calculator"] and stats["plan"]["dedup_equations"]


def test_dedup_equations_function():
    items = ["<<1+1=2>> short", "<<1+1=2>> a much longer and more different text", "no eq"]
    out = dedup_equations(items)
    assert out == ["<<1+1=2>> a much longer and more different text", "no eq"]


def test_pooling_sources_keeps_source_and_breaks_down_stats():
    samples = [_s("q1", 0, "#### 4", "small"), _s("q1", 1, "#### 5", "small"),
               _s("q1", 0, "#### 4", "big"), _s("q2", 0, "#### 0.5", "big"),
               _s("q2", 0, "#### 2", "small"), _s("q2", 1, "#### 1/2", "small")]
    kept, stats = prune_records(DATASET, samples, _cfg("first-correct"))
    # equal sample index: the source seen first wins
    assert [(k["id"], k["sample"], k["source"]) for k in kept] == [("q1", 0, "small"),
                                                                  ("q2", 0, "big")]
    bs = stats["by_source"]
    assert set(bs) == {"small", "big"}
    assert bs["small"]["samples"] == 4 and bs["small"]["correct"] == 2 and bs["small"]["kept"] == 1
    assert bs["small"]["metrics"]["pass@k"]["1"] == pytest.approx(0.5)
    assert bs["big"]["metrics"]["pass@k"]["1"] == 1.0
    assert stats["metrics"]["pass@k"]["1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert stats["metrics"]["pass@k"]["2"] == pytest.approx(1.0)
    assert stats["counts"]["questions_with_correct"] == 2


def test_max_examples_is_a_seeded_random_subset():
    ds = [{"id": f"q{i}", "answer": str(i)} for i in range(50)]
    samples = [_s(f"q{i}", 0, f"#### {i}") for i in range(50)]
    a, stats = prune_records(ds, samples, _cfg("first-correct", max_examples=10, seed=1))
    b, _ = prune_records(ds, samples, _cfg("first-correct", max_examples=10, seed=1))
    c, _ = prune_records(ds, samples, _cfg("first-correct", max_examples=10, seed=2))
    assert a == b and len(a) == 10 and a != c
    assert [int(x["id"][1:]) for x in a] == sorted(int(x["id"][1:]) for x in a)
    assert stats["counts"]["dropped"] == {"over max examples": 40}


def test_bad_input_is_counted_with_line_numbers(tmp_path):
    ds = tmp_path / "d.jsonl"
    ds.write_text("\n".join([json.dumps(DATASET[0]), "{not json",
                             json.dumps({"id": "q9", "answer": "a long\nworked solution"}),
                             json.dumps({"id": "q1", "answer": "#### 1"}),
                             json.dumps({"question": "no id"})]) + "\n")
    sp = tmp_path / "s.jsonl"
    sp.write_text("\n".join([json.dumps(_s("q1", 0, "#### 4")), "[1, 2]",
                             json.dumps(_s("nope", 0, "#### 4")),
                             json.dumps(_s("q9", 0, "#### 4")),
                             json.dumps(_s("q1", 0, "#### 4")),
                             json.dumps(_s("q1", "one", "#### 4")),
                             json.dumps({"id": "q1", "sample": 2}), "{oops"]) + "\n")
    kept, stats = prune_files(str(ds), [str(sp)], _cfg(), str(tmp_path / "o.jsonl"),
                              str(tmp_path / "st.json"))
    assert len(kept) == 1
    bad = stats["bad_input"]
    assert bad["malformed JSON"]["where"] == [f"{ds}:2", f"{sp}:8"]
    assert bad["dataset: no usable gold answer"]["where"] == [f"{ds}:3"]
    assert bad["dataset: duplicate id"]["where"] == [f"{ds}:4"]
    assert bad["missing field 'id'"]["where"] == [f"{ds}:5"]
    assert bad["not a JSON object"]["where"] == [f"{sp}:2"]
    assert bad["sample: unknown id"]["where"] == [f"{sp}:3"]
    assert bad["sample: duplicate (id, source, sample)"]["where"] == [f"{sp}:5"]
    assert bad["sample: bad field 'sample'"]["where"] == [f"{sp}:6"]
    assert bad["missing field 'prompt'"]["where"] == [f"{sp}:7"]
    assert stats["counts"]["dropped"] == {"question has no gold answer": 1}
    assert json.loads((tmp_path / "st.json").read_text())["counts"]["kept"] == 1
    assert [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()] == kept


def test_cli_pools_files_and_reports(tmp_path, capsys):
    ds = tmp_path / "d.jsonl"
    ds.write_text("".join(json.dumps(r) + "\n" for r in DATASET))
    s1, s2 = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    rec = _s("q1", 0, "#### 4")
    del rec["source"]  # takes the file name
    s1.write_text(json.dumps(rec) + "\n" + json.dumps(_s("q3", 0, "#### 1,000")) + "\n")
    s2.write_text(json.dumps(_s("q1", 0, "#### 4", source="big")) + "\n")
    out, st = tmp_path / "out.jsonl", tmp_path / "stats.json"
    rc = cli.main(["prune", "--dataset", str(ds), "--samples", str(s1), str(s2), "--strategy",
                   "all-correct", "--out", str(out), "--stats", str(st), "--k", "1"])
    assert rc == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(g["id"], g["source"]) for g in got] == [("q1", "small"), ("q1", "big"), ("q3", "m")]
    stats = json.loads(st.read_text())
    assert stats["inputs"]["samples"] == [str(s1), str(s2)]
    assert set(stats["by_source"]) == {"small", "m", "big"}
    assert cli.main(["prune", "--dataset", str(tmp_path / "missing.jsonl"), "--samples", str(s1),
                     "--out", str(out), "--stats", str(st)]) == 2
    assert "file not found" in capsys.readouterr().err


def test_bench_prune_prints_one_json_line(capsys):
    import argparse
    args = argparse.Namespace(records=3000, per_question=8, strategy="rft", max_per_question=None,
                              workdir=None)
    assert bench_prune(args) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["records"] == 3000 and line["records_per_s"] > 0 and line["kept"] > 0


def test_drop_reasons_are_declared():
    assert len(set(DROP_REASONS)) == len(DROP_REASONS)


# ----------------------------------------------------------------------------- real GSM8K


def _gsm8k(split):
    path = GSM8K / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"GSM8K not found at {path} (expected ../shared/data/gsm8k from the repo)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"id": f"{split}-{i}", **r} for i, r in enumerate(rows)]


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_gold_solutions_are_kept_and_calculator_checked(split, capsys):
    ds = _gsm8k(split)
    golds = [parse_gold(r["answer"]) for r in ds]
    assert all(g is not None and to_number(g) is not None for g in golds), \
        [r["answer"][-40:] for r, g in zip(ds, golds) if g is None or to_number(g) is None][:5]
    samples = [{"id": r["id"], "sample": 0, "source": "gold", "prompt": r["question"],
                "completion": r["answer"]} for r in ds]
    kept, stats = prune_records(ds, samples, _cfg("all-correct"))
    assert len(kept) == len(ds) == stats["counts"]["correct"]
    assert stats["bad_input"] == {}
    failures = [(r["id"], calculator_errors(r["answer"])) for r in ds
                if calculator_errors(r["answer"])]
    with capsys.disabled():
        print(f"\nGSM8K {split}: {len(ds)} gold solutions, calculator check failed on "
              f"{len(failures)}: {failures[:50]}")
    assert len(failures) <= 0.01 * len(ds)
    assert stats["false_positive"]["calculator_wrong"] == len(failures)


def test_stop_rule_waits_for_every_earlier_sample():
    """Think's early stop: a question is settled once samples 0..m-1 have all finished with k
    candidates among them, whatever order they finish in; no gold answer, no stop."""
    from tpt_jax.stages.prune import StopRule, stop_cap
    rule = StopRule(PruneConfig(strategy="max-k", max_per_question=2), 2, ["1", None])
    ok = {"completion": "So the answer is 1.", "finish": "stop", "tokens": 5}
    wrong, cut = {**ok, "completion": "So the answer is 2."}, {**ok, "finish": "length"}
    assert rule.needed(0, 3, ok) is None  # samples 0..2 have not finished
    assert rule.needed(0, 0, ok) is None
    assert rule.needed(0, 2, cut) is None  # unfinished: not a candidate; sample 1 missing
    assert rule.needed(0, 1, wrong) == 4
    assert rule.needed(1, 0, ok) is None
    assert stop_cap(PruneConfig(strategy="first-correct+dedup-text"))[0] is None
    assert stop_cap(PruneConfig(strategy="all-correct", max_per_question=3))[0] == 3
