"""Prompt templates by name, the completion shape each expects, and its stop strings.

- `zero-shot`: TPT's set-up. The model's chat template around an instruction to work step by
  step and finish with `#### <answer>`; the model's turn is the completion. The turn markers
  are a `Chat`: Gemma's by default, else what the tokenizer's own chat template says
  (`gemma.tokenizer.HFTokenizer.chat`: Llama 3's headers, Qwen's `<|im_start|>`).
- `few-shot` (or `few-shot:K`): the compute-optimal sampling paper's set-up. K worked examples as
  `Question: ...\\nAnswer: ...` blocks, then the question; the completion continues after
  `Answer:`.
- `plain`: `Question: ...\\nAnswer:` with no examples; what a tiny model trained from scratch on
  the synthetic task sees.

Prompt + completion is the text the trainer learns from and the sampler reproduces, so the
split between them (the leading space belongs to the completion) is fixed here, in one place.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from tpt_jax.errors import ConfigError

INSTRUCTION = ("Solve the following math problem step by step. Show your work, and end your "
               "answer with a final line of the form \"#### <answer>\", where <answer> is the "
               "final number.")
DEFAULT_SHOTS = 4


@dataclasses.dataclass(frozen=True)
class Chat:
    """A chat template's turn markers around one user message: `user` opens the conversation
    (after BOS, which the tokenizer adds), `model` closes the user's turn and opens the
    model's, and `end` ends a turn (so it is the completion's stop string)."""

    user: str
    model: str
    end: str


GEMMA_CHAT = Chat("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n",
                  "<end_of_turn>")

TEMPLATES = ("zero-shot", "few-shot", "plain")
QA_STOPS = ["\nQuestion:"]  # few-shot and plain completions end where the next question starts


def chat_of(tokenizer) -> Chat:
    """The tokenizer's chat markers (`chat` attribute), Gemma's when it has none."""
    return getattr(tokenizer, "chat", None) or GEMMA_CHAT


def parse_template(name: str) -> tuple[str, int]:
    """'few-shot:8' -> ('few-shot', 8); other names -> (name, 0). Unknown names: ConfigError."""
    base, _, k = name.partition(":")
    if base not in TEMPLATES:
        raise ConfigError(f"prompt: unknown template {name!r}; known: {', '.join(TEMPLATES)} "
                          f"(few-shot takes an optional count, e.g. few-shot:8)")
    if base != "few-shot":
        if k:
            raise ConfigError(f"prompt: template {base!r} takes no count, got {name!r}")
        return base, 0
    if not k:
        return base, DEFAULT_SHOTS
    if not k.isdigit() or int(k) < 1:
        raise ConfigError(f"prompt: few-shot count must be a positive integer, got {name!r}")
    return base, int(k)


def num_shots(name: str) -> int:
    """How many worked examples the template wants (0 for zero-shot and plain)."""
    return parse_template(name)[1]


def _qa(question: str, answer: Optional[str] = None) -> str:
    text = f"Question: {question.strip()}\nAnswer:"
    return text if answer is None else f"{text} {answer.strip()}"


def format_prompt(template: str, question: str, shots: Optional[Sequence[dict]] = None,
                  chat: Chat = GEMMA_CHAT) -> str:
    """The prompt text for one question. `shots`: records with question/answer (worked
    solutions), required by few-shot; the first K of them are used. `chat`: the model's turn
    markers (zero-shot)."""
    base, k = parse_template(template)
    if base == "zero-shot":
        return f"{chat.user}{INSTRUCTION}\n\n{question.strip()}{chat.model}"
    if base == "plain":
        return _qa(question)
    shots = list(shots or [])
    if len(shots) < k:
        raise ConfigError(f"prompt: template {template!r} needs {k} worked examples, "
                          f"got {len(shots)}")
    blocks = [_qa(s["question"], s["answer"]) for s in shots[:k]]
    return "\n\n".join(blocks + [_qa(question)])


def format_completion(template: str, solution: str) -> str:
    """A worked solution shaped as the completion that follows `format_prompt` (for SFT on seed
    or gold solutions). The trainer appends EOS; the sampler stops at EOS or a stop string."""
    base, _ = parse_template(template)
    solution = solution.strip()
    return solution if base == "zero-shot" else " " + solution


def stop_strings(template: str, chat: Chat = GEMMA_CHAT) -> list[str]:
    """Strings that end a completion for this template (in addition to EOS)."""
    base = parse_template(template)[0]
    return [chat.end] if base == "zero-shot" else list(QA_STOPS)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def pick_shots(records: Sequence[dict], k: int) -> list[dict]:
    """The worked examples for few-shot prompts: the first K training records (deterministic,
    so every round and every host builds the same prompts)."""
    return [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in records[:k]]
