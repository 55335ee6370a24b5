"""Final answers: extraction from completions, gold parsing, verification, calculator check.

Pruning keeps a trace only when its final answer is right, so every rule here errs towards
"no answer" rather than guessing: the last explicit answer marker counts, and the last-number
fallback is off unless asked for. Plain numbers are compared numerically in pure Python (fast,
~1M samples/min); only LaTeX-looking answers go to math-verify, which is slow, and its results
are cached per (gold, prediction) pair.
"""
from __future__ import annotations

import ast
import functools
import math
import operator
import re
import threading
import warnings
from typing import Hashable, Optional, Sequence

# ----------------------------------------------------------------------------- extraction

# Markers, all found in one pass; the one that starts last wins (slow path, see _markers).
_MARKER_RE = re.compile(
    r"####(?P<hash>[^\n]*)"
    r"|(?P<answer_is>\b(?:the\s+)?(?:final\s+)?answer\s+is\b\s*:?)"
    r"|(?:^|\n)[ \t]*[*#]*[ \t]*(?:A|(?:final[ \t]+)?answer)[ \t]*\**[ \t]*:\**(?P<a_colon>[^\n]*)"
    r"|(?P<boxed>\\(?:boxed|fbox)\s*(?:\{|[^\s{]))",
    re.IGNORECASE)
# After "the answer is": the first math span or number; otherwise the rest of the sentence.
_AFTER_IS_RE = re.compile(
    r"\s*(?:\$\$(?P<dd>.+?)\$\$|\$(?P<d>[^$\n]+?)\$(?!\d)|\\\((?P<p>.+?)\\\)|\\\[(?P<b>.+?)\\\]"
    r"|(?P<num>[-−]?\s*(?:\\?\$|[€£¥])?\s*[-−]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*\d+(?![\d,]))?\s*(?:%|\\%)?))",
    re.DOTALL)
_SENTENCE_RE = re.compile(r"[^\n]*?(?=\.\s|\.$|\n|$)")
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_LAST_NUMBER_RE = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|[-−]?\.\d+")


def _balanced(text: str, start: int) -> Optional[str]:
    """Content of the brace group opening at text[start] == '{', nested braces allowed."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} / \\fbox{...} (or `\\boxed 5`), or None."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)", text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _balanced(text, j)
            if got is not None:
                return got
        elif j > m.end():
            tail = re.match(r"[^\s$]+", text[j:])
            if tail:
                return tail.group(0)
    return None


def _after_answer_is(rest: str) -> Optional[str]:
    m = _AFTER_IS_RE.match(rest)
    if m:
        return next(g for g in m.groups() if g is not None)
    boxed = last_boxed(rest.split("\n", 1)[0])
    if boxed is not None:
        return boxed
    s = _SENTENCE_RE.match(rest)
    return s.group(0) if s else None


# The same markers as literal-prefixed patterns on lower-cased text: the regex engine then
# jumps between occurrences of "####", "answer", "\n", "\\" instead of trying every position.
_HASH_RE = re.compile(r"####([^\n]*)")
_IS_RE = re.compile(r"answer\s+is\b\s*:?")
_LINE_RE = re.compile(r"\n[ \t]*[*#]*[ \t]*(?:a|(?:final[ \t]+)?answer)[ \t]*\**[ \t]*:\**([^\n]*)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)")


def _markers(text: str) -> list[tuple[int, str, int, int]]:
    """(start, kind, raw start, raw end) of every answer marker, in text order."""
    low = text.lower()
    if len(low) != len(text):  # rare Unicode whose lower case changes length: slow path
        out = []
        for m in _MARKER_RE.finditer(text):
            g = m.lastgroup
            a, b = (m.end(), m.end()) if g == "answer_is" else m.span(g)
            out.append((m.start(g), g, a, b))
        return out
    out = []
    if "####" in text:
        out.extend((m.start(), "hash", m.start(1), m.end(1)) for m in _HASH_RE.finditer(text))
    if "answer" in low:
        out.extend((m.start(), "answer_is", m.end(), m.end()) for m in _IS_RE.finditer(low)
                   if m.start() == 0 or not low[m.start() - 1].isalnum())
    if ":" in low:
        out.extend((m.start(), "a_colon", m.start(1) - 1, m.end(1) - 1)
                   for m in _LINE_RE.finditer("\n" + low))
    if "\\" in text:
        out.extend((m.start(), "boxed", m.start(), m.end()) for m in _BOXED_RE.finditer(text))
    out.sort()
    return out


_TAIL = 300  # characters scanned first: the last marker is almost always near the end


def extract_answer(text: str, fallback: bool = False) -> Optional[str]:
    """The final answer in a completion, cleaned (see `clean_answer`), or None.

    Markers: `#### x`, `The answer is x`, a line `A: x` / `Answer: x`, `\\boxed{x}`; the last
    marker in the text counts. `fallback=True` also accepts the last number anywhere (off for
    pruning: a trace without an explicit answer is not evidence of a correct solution)."""
    if not text:
        return None
    # Scan the tail (from a line start) first; any marker there is later than all before it.
    cut = text.rfind("\n", 0, len(text) - _TAIL) + 1 if len(text) > _TAIL else 0
    if cut:
        got = _answer_from(text, _markers(text[cut:]), cut)
        if got:
            return got
    got = _answer_from(text, [m for m in _markers(text) if m[0] < cut] if cut else
                       _markers(text), 0)
    if got:
        return got
    if fallback:
        nums = _LAST_NUMBER_RE.findall(text)
        if nums:
            return clean_answer(nums[-1])
    return None


def _answer_from(text: str, markers: list, shift: int) -> Optional[str]:
    """The cleaned answer of the last marker that has one (offsets shifted by `shift`)."""
    for _, kind, a, b in reversed(markers):
        a, b = a + shift, b + shift
        if kind == "hash":
            raw = text[a:b]
        elif kind == "answer_is":
            raw = _after_answer_is(text[a:])
        elif kind == "a_colon":
            raw = text[a:b]
            if _markers(raw):
                raw = extract_answer(raw)  # "Final Answer: The final answer is $3$."
            else:
                got = clean_answer(raw) or ""
                if to_number(got) is None and _PROSE_RE.search(got):
                    continue  # "A: Natalia sold 48/2 = 24 ..." starts the reasoning
        else:
            raw = last_boxed(text[a:])
        got = clean_answer(raw) if raw is not None else None
        if got:
            return got
    return None


# ----------------------------------------------------------------------------- normalisation

_SIMPLE_NUM_RE = re.compile(r"\s*\$?\s*(-?)\s*\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\.?\s*")
_LATEX_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
_NUM_RE = re.compile(
    r"(?:[$€£¥]|usd|rs\.?)?\s*(?P<sign>[-+]?)\s*(?:[$€£¥]|usd|rs\.?)?\s*"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    r"(?P<rest>[^\d\\^_=+*()\[\]{}<>|]*)", re.IGNORECASE)
# Words after a number that change its value: "4 million" is not 4.
_MULTIPLIER_RE = re.compile(r"\b(?:hundred|thousand|million|billion|trillion)s?\b|^\s*/",
                            re.IGNORECASE)
_VARIABLE_RE = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")
_FRAC_RE = re.compile(r"(?P<sign>-?)\\[dt]?frac\s*(?:\{\s*(?P<a>\d+)\s*\}|(?P<a1>\d))\s*"
                      r"(?:\{\s*(?P<b>\d+)\s*\}|(?P<b1>\d))")


def clean_answer(raw: str) -> Optional[str]:
    """Strip what is not the answer: markdown bold, `$`/`\\(`/`\\[` wrappers, \\boxed, \\text,
    thousands commas, currency signs, trailing period. Numbers come back as written minus those
    (`$1,000.00` -> `1000.00`); other answers come back as trimmed LaTeX."""
    m = _SIMPLE_NUM_RE.fullmatch(raw)
    if m:  # the common case, "#### 1,234" or "$18.": skip the general clean-up
        return m.group(1) + m.group(2).replace(",", "")
    s = raw.strip().replace("−", "-").replace("**", "").strip()
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".").strip()
        if s.startswith("$$") and s.endswith("$$") and len(s) > 4:
            s = s[2:-2]
        elif s.startswith("$") and s.endswith("$") and len(s) > 2 and s.count("$") == 2:
            s = s[1:-1]
        if s.startswith(("\\(", "\\[")) and s.endswith(("\\)", "\\]")):
            s = s[2:-2]
        if s.startswith(("\\boxed", "\\fbox")):
            s = last_boxed(s) or s
        if s == before:
            break
    s = s.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", "")
    s = _LATEX_WRAP_RE.sub(r"\1", s).strip()
    if not s:
        return None
    s = _VARIABLE_RE.sub("", s)  # "x = 5" -> "5"
    m = _NUM_RE.fullmatch(s)
    if m and not _MULTIPLIER_RE.search(m.group("rest")):
        num = m.group("num").replace(",", "").rstrip(".")
        out = ("-" if m.group("sign") == "-" else "") + num
        return out + "/" + m.group("den") if m.group("den") else out
    return s.rstrip(".").strip() or None


@functools.lru_cache(maxsize=1 << 16)
def to_number(s: str) -> Optional[float]:
    """A cleaned answer as a float if it is a plain number, a/b, or \\frac{a}{b}; else None."""
    if not s:
        return None
    try:
        return float(s)
    except ValueError:
        pass
    if "/" in s and s.count("/") == 1:
        a, b = s.split("/")
        try:
            den = float(b)
            return float(a) / den if den else None
        except ValueError:
            return None
    m = _FRAC_RE.fullmatch(s)
    if m:
        a = int(m.group("a") or m.group("a1"))
        b = int(m.group("b") or m.group("b1"))
        if b:
            return (-a if m.group("sign") else a) / b
    return None


def numbers_equal(a: float, b: float) -> bool:
    """Equal up to float noise: relative 1e-9, absolute 1e-6 (1000000 != 1000001)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


_SPACE_RE = re.compile(r"\s+")


def normalize_math(s: str) -> str:
    """Cheap canonical form for string equality before falling back to math-verify."""
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac")
    s = s.replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    return _SPACE_RE.sub("", s).rstrip(".")


# ----------------------------------------------------------------------------- gold answers


def parse_gold(answer: str) -> Optional[str]:
    """Final answer of a dataset row: after the last `####` (GSM8K), inside the last \\boxed{}
    (MATH), or the whole field when it is a one-line final answer. None if unusable."""
    if not isinstance(answer, str) or not answer.strip():
        return None
    if "####" in answer:
        raw = answer.rsplit("####", 1)[1].split("\n", 1)[0]
    elif "\\boxed" in answer or "\\fbox" in answer:
        raw = last_boxed(answer)
    elif "\n" not in answer.strip() and len(answer) <= 300:
        raw = answer
    else:
        return None  # a worked solution without a final-answer marker
    return clean_answer(raw) if raw is not None else None


# ----------------------------------------------------------------------------- verification


@functools.lru_cache(maxsize=1 << 16)
def _math_verify(gold: str, pred: str) -> bool:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        from math_verify import parse, verify
        g = parse(f"${gold}$", parsing_timeout=limit)
        p = parse(f"${pred}$", parsing_timeout=limit)
        return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=limit))
    except Exception:  # math-verify gives up (timeouts, parse errors): not verified
        return False


def is_correct(pred: Optional[str], gold: str) -> bool:
    """Does a cleaned prediction match a cleaned gold answer?

    Both plain numbers: numeric comparison with tolerance. Gold a number, prediction words:
    wrong. Otherwise (MATH-style LaTeX): string equality after normalisation, then symbolic
    equivalence with math-verify."""
    if not pred:
        return False
    g = to_number(gold)
    p = to_number(pred)
    if g is not None and p is not None:
        return numbers_equal(g, p)
    if g is not None and "\\" not in pred and "^" not in pred:
        return False
    if normalize_math(pred) == normalize_math(gold):
        return True
    return _math_verify(gold, pred)


def answer_key(pred: Optional[str]) -> Optional[str]:
    """Key under which equal answers vote together in maj@k (numbers by value)."""
    if not pred:
        return None
    x = to_number(pred)
    return repr(round(x, 6)) if x is not None else normalize_math(pred)


# ----------------------------------------------------------------------------- calculator

ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow}


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
            raise ValueError("power too large")
        return _OPS[type(node.op)](a, b)
    raise ValueError("not arithmetic")


_CALC_CLEAN_RE = re.compile(r"(?<=\d),(?=\d{3})|[$€£\s]")


_BINARY_RE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([-+*/])\s*(\d+(?:\.\d+)?)\s*")
_BINARY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def safe_eval(expr: str) -> float:
    """Evaluate plain arithmetic (+ - * / // % ** and parentheses) without `eval`."""
    m = _BINARY_RE.fullmatch(expr)
    if m:  # most annotations are one operation: skip the parser
        return float(_BINARY_OPS[m.group(2)](float(m.group(1)), float(m.group(3))))
    e = _CALC_CLEAN_RE.sub("", expr).replace("×", "*").replace("÷", "/").replace("^", "**")
    e = re.sub(r"(\d)x(?=[\d(])", r"\1*", e)
    # Model text like `2if1` warns before its SyntaxError: keep `<unknown>:1: SyntaxWarning`
    # off stderr (annotation_ok counts it as wrong either way).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(e, mode="eval")
    return float(_eval_node(tree.body))


@functools.lru_cache(maxsize=1 << 17)
def annotation_ok(body: str) -> bool:
    """Is one `lhs=rhs` annotation arithmetically right? A result rounded or truncated to the
    decimals it shows is right (`10/3=3.33`, `7/2=3`), a different number is not (`10*3=31`)."""
    if "=" not in body:
        return False
    lhs, rhs = body.rsplit("=", 1)
    want = to_number(clean_answer(rhs) or "")
    if want is None:
        return False
    try:
        got = safe_eval(lhs)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError,
            RecursionError, MemoryError):
        return False
    if numbers_equal(got, want) or math.isclose(got, want, rel_tol=1e-6):
        return True
    digits = rhs.strip().rstrip(".")
    decimals = len(digits.split(".", 1)[1]) if "." in digits else 0
    scaled = got * 10.0 ** decimals
    shown = round(want * 10.0 ** decimals)
    return shown in (math.floor(scaled + 0.5), math.trunc(scaled), -math.floor(0.5 - scaled))


def calculator_errors(text: str) -> list[str]:
    """The `<<lhs=rhs>>` annotations in `text` that do not evaluate to their stated result."""
    if "<<" not in text:
        return []
    return [a for a in ANNOTATION_RE.findall(text) if not annotation_ok(a)]


def calculator_ok(text: str) -> bool:
    """True when every calculator annotation is right (vacuously true without annotations)."""
    return not calculator_errors(text)


# ----------------------------------------------------------------------------- dedup keys

_EQ_TEXT_RE = re.compile(
    r"(\(?\s*\$?\d[\d.,]*\)?(?:\s*[-+*/×x÷^]\s*\(?\s*\$?\d[\d.,]*\)?)+)\s*=\s*\$?(-?\d[\d,]*(?:\.\d+)?)")
_EQ_STRIP_RE = re.compile(r"[\s$,]")


def equations_key(text: str) -> tuple[str, ...]:
    """RFT's reasoning-path key: the sequence of equations, from `<<lhs=rhs>>` annotations if
    there are any, else from `a op b = c` spans in the prose."""
    ann = ANNOTATION_RE.findall(text) if "<<" in text else []
    if ann:
        return tuple(_EQ_STRIP_RE.sub("", a) for a in ann)
    return tuple(_EQ_STRIP_RE.sub("", f"{m.group(1)}={m.group(2)}")
                 for m in _EQ_TEXT_RE.finditer(text))


def text_key(text: str) -> str:
    """Normalised text for dedup and diversity: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def edit_distances(a: Sequence[Hashable], patterns: Sequence[Sequence[Hashable]]) -> list[int]:
    """Levenshtein distance from `a` (a string or token list) to each of `patterns`, in one pass.

    Bit-parallel (Myers 1999, Hyyro's formulation) on Python ints, with every pattern in its own
    lane of one big integer (a zero guard bit between lanes stops carries), so comparing one
    trace with all the others costs about as much as comparing it with one. The distance comes
    from the last column's vertical deltas: D(m, n) = n + #(+1 deltas) - #(-1 deltas)."""
    return distance_matrix([a], patterns)[0]


def distance_matrix(texts: Sequence[Sequence[Hashable]], patterns: Sequence[Sequence[Hashable]]
                    ) -> list[list[int]]:
    """`edit_distances` for several texts against the same patterns (lanes built once)."""
    peq: dict = {}
    lanes, low, valid, offset = [], 0, 0, 0
    for p in patterns:
        m = len(p)
        lanes.append((offset, (1 << m) - 1))
        if not m:
            continue
        for i, ch in enumerate(p):
            peq[ch] = peq.get(ch, 0) | (1 << (offset + i))
        low |= 1 << offset
        valid |= ((1 << m) - 1) << offset
        offset += m + 1
    get = peq.get
    out = []
    for a in texts:
        pv, mv = valid, 0
        for ch in a:  # every value below stays inside `valid`, so valid ^ x is "not x"
            eq = get(ch, 0)
            xv = eq | mv
            xh = ((((eq & pv) + pv) & valid) ^ pv) | eq
            ph = mv | (valid ^ (xh | pv))
            mh = pv & xh
            ph = ((ph << 1) & valid) | low
            mh = (mh << 1) & valid
            pv = mh | (valid ^ (xv | ph))
            mv = ph & xv
        n = len(a)
        out.append([n + ((pv >> off) & lane).bit_count() - ((mv >> off) & lane).bit_count()
                    for off, lane in lanes])
    return out


def edit_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Levenshtein distance between two strings or token lists (see `edit_distances`)."""
    if len(a) < len(b):
        a, b = b, a  # fewer bits per step
    return edit_distances(a, [b])[0]
