"""Think with and without exact early stop (think.stop_when_selected), back to back in one
process, on the models that sampled rounds 1..3 of a finished CPU-default run (`tpt run
--output RUN`): decoded tokens, prefills, host checks and Think wall time per round (each
setting twice, in the order off, on, on, off), and whether Prune's training
examples are byte-identical to the run's rNN/train.jsonl.

    PYTHONPATH=. python docs/early_stop.py RUN
"""
import dataclasses
import json
import sys
import tempfile
import time

from tpt_jax import io
from tpt_jax.config import load_run_config, round_config
from tpt_jax.engine import programs
from tpt_jax.gemma import sharding, weights
from tpt_jax.loop import round_stages as st
from tpt_jax.loop.setup import setup
from tpt_jax.stages import prune, think


def think_once(s, rc, r, params, stop: bool, questions) -> dict:
    """One round's Think into a scratch folder -> its figures and Prune's examples."""
    cfg = dataclasses.replace(rc.think, stop_when_selected=stop)
    sampler = s.samplers.get(s.model, params, cfg)
    calls = []
    generate = sampler.generate
    sampler.generate = lambda *a, **k: (generate(*a, **k), calls.append(sampler.stats))[0]
    traces = sum(programs.TRACE_COUNT.values())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        recs = think.think(params, s.model, s.tokenizer, questions, cfg, d, s.mesh,
                           template=rc.prompt, shots=s.shots, source=st.self_name(s, r),
                           progress=False, sampler=sampler, prune=rc.prune)
        wall = time.perf_counter() - t0
        tokens = think.decoded_tokens(d)
    del sampler.generate
    kept, _ = prune.prune_records(questions, recs, rc.prune)
    return {"think_s": round(wall, 2), "tokens": tokens, "samples": len(recs),
            "prefills": sum(c.prefills for c in calls),
            "host_checks": sum(c.host_checks for c in calls),
            "decode_steps": sum(c.decode_steps for c in calls), "kept": kept,
            "compiles": sum(programs.TRACE_COUNT.values()) - traces}


def main(run: str) -> None:
    cfg = load_run_config(None, [])
    s = setup(cfg, progress=False)
    for r in range(1, cfg.rounds + 1):
        rc = round_config(cfg, r)
        params = weights.load_params(f"{run}/{st.tag(r - 1)}/params", s.model, s.mesh,
                                     sharding.TRAIN_RULES)
        if r == 1:  # compile both settings' programs before anything is timed
            for stop in (False, True):
                think_once(s, rc, r, params, stop, s.train_questions)
        off, on, on2, off2 = (think_once(s, rc, r, params, stop, s.train_questions)
                              for stop in (False, True, True, False))
        for a, b in ((off, off2), (on, on2)):
            a["think_s"] = [a["think_s"], b["think_s"]]
            a["compiles"] += b["compiles"]
        with tempfile.TemporaryDirectory() as d:
            io.write_jsonl_atomic(f"{d}/train.jsonl", on["kept"])
            same = (open(f"{d}/train.jsonl", "rb").read()
                    == open(f"{run}/{st.tag(r)}/train.jsonl", "rb").read())
        row = {"round": r, "train_jsonl_identical": same,
               "tokens_saved": round(1 - on["tokens"] / off["tokens"], 4),
               **{f"{k}_{name}": v[k] for name, v in (("off", off), ("on", on))
                  for k in ("tokens", "samples", "think_s", "prefills", "host_checks",
                            "decode_steps", "compiles")}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
