"""Answer extraction, gold parsing, verification and the calculator check, on hand-checked cases."""
import random
import warnings

import pytest

from tpt_jax.stages import answers
from tpt_jax.stages.answers import (annotation_ok, calculator_errors, clean_answer, edit_distance,
                             equations_key, extract_answer, is_correct, parse_gold, text_key,
                             to_number)

# (completion, expected extracted answer); None = no answer.
EXTRACT = [
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("#### 72\nwait, I made a mistake.\n#### 73", "73"),  # two #### lines: the last counts
    ("The answer is 42 because 6*7 = 42 and more text follows.", "42"),
    ("The answer is 18. Then she also has 20 eggs left.", "18"),
    ("#### $1,000.00", "1000.00"),
    ("The answer is $1,000.", "1000"),
    ("#### -3", "-3"),
    ("The answer is −3.", "-3"),  # Unicode minus
    ("#### 3/4", "3/4"),
    ("So the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("First \\boxed{1}, then on reflection \\boxed{2}", "2"),
    ("The answer is 5.\nLet me double-check: 2 + 3 = 5. Yes.", "5"),  # only in an earlier line
    ("She has 5 apples and buys 3 more, so 8 apples.", None),  # no marker: no answer
    ("", None),
    ("#### 42 dollars", "42"),
    ("#### 42.", "42"),
    ("#### 42.0", "42.0"),
    ("#### 12.5%", "12.5"),
    ("The answer is 12.5%.", "12.5"),
    ("The answer is: 7", "7"),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("Final Answer: The final answer is $3$. I hope it is correct.", "3"),
    ("Q: How many?\nA: 17", "17"),
    ("A: Natalia sold 48/2 = 24 clips in May.", None),  # "A:" opening the reasoning
    ("**Answer:** 5", "5"),
    ("The answer is: **12**", "12"),
    ("The answer is \\(\\sqrt{2}\\).", "\\sqrt{2}"),
    ("The answer is 42, not 41.", "42"),
    ("#### 4 million", "4 million"),  # a multiplier word is not a unit
    ("#### x = 5", "5"),
    ("The answer is \\boxed{(1, 2)}.", "(1, 2)"),
    ("#### 1\n\\boxed{9}", "9"),  # different marker kinds: the last one in the text counts
    ("\\boxed{9}\nThe answer is 1", "1"),
    ("The answer is $18 and she keeps $20.", "18"),
    ("#### 0.50", "0.50"),
    ("The answer is .5", ".5"),
    ("İstanbul trip: the answer is 7", "7"),  # lower() changes length here: slow path
    ("#### \n", None),  # empty after the marker, nothing earlier
    ("The answer is unclear.", "unclear"),  # prose answer: extracted, and never matches a number
]


@pytest.mark.parametrize("text,want", EXTRACT)
def test_extract(text, want):
    assert extract_answer(text) == want


def test_last_number_fallback_is_off_by_default():
    text = "She has 5 apples and buys 3 more, so 8 apples."
    assert extract_answer(text) is None
    assert extract_answer(text, fallback=True) == "8"
    assert extract_answer("It costs $1,250 in total", fallback=True) == "1250"
    assert extract_answer("#### 7\nThat took 9 steps.", fallback=True) == "7"  # marker wins


# (prediction, gold, expected)
VERIFY = [
    ("72", "72", True),
    ("72.0", "72", True),
    ("72.", "72", True),
    ("1000.00", "1000", True),
    ("1000", "1,000", True),
    ("0.75", "3/4", True),
    ("3/4", "0.75", True),
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("-3", "-3", True),
    ("3", "-3", False),
    ("1000001", "1000000", False),  # tolerance is not relative 1e-6
    ("0.3333", "1/3", False),
    ("0.333333333333", "1/3", True),
    ("42 apples", "42", False),  # uncleaned prose never passes
    ("unclear", "7", False),
    (None, "7", False),
    ("", "7", False),
    ("\\sqrt{8}", "2\\sqrt{2}", True),  # symbolic, via math-verify
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt{3}", "2\\sqrt{2}", False),
    ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}", True),
    ("(1, 2)", "(1,2)", True),
    ("x^2+1", "1+x^2", True),
    ("\\frac{7}{2}", "3.5", True),
]


@pytest.mark.parametrize("pred,gold,want", VERIFY)
def test_is_correct(pred, gold, want):
    assert is_correct(pred, gold) is want


def test_extract_then_verify_end_to_end():
    assert is_correct(extract_answer("So the answer is \\boxed{\\frac{1}{2}}."), "0.5")
    assert is_correct(extract_answer("#### $1,000.00"), parse_gold("#### 1,000"))
    assert is_correct(extract_answer("The answer is 3/4."), "0.75")
    assert not is_correct(extract_answer("#### 72\n#### 73"), "72")


GOLD = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("Total: 80,000+50,000=<<80000+50000=130000>>130,000\n#### 1,080", "1080"),
    ("We get $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("So \\boxed{2} then \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)"),
    ("18", "18"),
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("", None),
    ("A worked solution\nwith no final-answer marker", None),
    (None, None),
]


@pytest.mark.parametrize("answer,want", GOLD)
def test_parse_gold(answer, want):
    assert parse_gold(answer) == want


@pytest.mark.parametrize("raw,want", [("$1,000.00", "1000.00"), ("  -$5. ", "-5"),
                                       ("\\$12", "12"), ("\\text{15 cm}", "15"),
                                       ("50\\%", "50"), ("\\boxed{7}", "7")])
def test_clean_answer(raw, want):
    assert clean_answer(raw) == want


@pytest.mark.parametrize("s,want", [("3/4", 0.75), ("-3", -3.0), ("\\frac{1}{2}", 0.5),
                                     ("-\\frac{3}{4}", -0.75), ("\\frac12", 0.5), ("1/0", None),
                                     ("\\sqrt{2}", None), ("abc", None)])
def test_to_number(s, want):
    assert to_number(s) == want


# Calculator annotations: (annotation body, expected)
CALC = [
    ("48/2=24", True),
    ("16-3-4=9", True),
    ("80000*1.5=120000", True),
    ("10/3=3.33", True),  # rounded to the shown decimals
    ("2/3=.67", True),
    ("2/3=0.66", True),  # truncated
    ("7/2=3", True),
    ("10/3=3.34", False),  # neither rounded nor truncated
    ("10*3=31", False),
    ("2*3=5", False),
    ("(3+4)*2=14", True),
    ("2^3=8", True),
    ("1,000*2=2,000", True),
    ("$5*3=$15", True),
    ("3/0=0", False),
    ("9**9**9=1", False),  # refused, not computed
    ("__import__('os')=0", False),
    ("5*2", False),  # no result stated
]


@pytest.mark.parametrize("body,want", CALC)
def test_annotation(body, want):
    assert annotation_ok(body) is want


def test_junk_annotation_is_wrong_and_quiet():
    """Model text such as `2 if 1` (a number run into a keyword once spaces go) is wrong, and
    no SyntaxWarning is printed on the way (Prune wrote `<unknown>:1: SyntaxWarning` to stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert annotation_ok("2 if 1=2") is False
    assert not [w for w in caught if issubclass(w.category, SyntaxWarning)]


def test_calculator_errors_lists_the_wrong_ones():
    text = "a <<2+2=4>>4 b <<3*3=10>>10 c <<1/4=.25>>.25"
    assert calculator_errors(text) == ["3*3=10"]
    assert answers.calculator_ok("no annotations at all")


def test_equations_key():
    assert equations_key("x <<2 + 2=4>>4 then <<4*3=12>>12") == ("2+2=4", "4*3=12")
    assert equations_key("She pays 3 * $4 = $12 and then 12 + 1 = 13.") == ("3*4=12", "12+1=13")
    assert equations_key("no arithmetic here = 5") == ()


def test_text_key():
    assert text_key("  Hello\n  World ") == text_key("hello world")


def _dp_levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_edit_distance_matches_dynamic_programming():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 90)))
        assert edit_distance(a, b) == _dp_levenshtein(a, b), (a, b)


def test_symbolic_check_works_off_the_main_thread():
    """math-verify's timeout needs the main thread; elsewhere it must still verify."""
    import threading
    answers._math_verify.cache_clear()
    got = []
    t = threading.Thread(target=lambda: got.append(is_correct("\\sqrt{12}", "2\\sqrt{3}")))
    t.start()
    t.join()
    assert got == [True]


def test_edit_distance_on_word_lists():
    assert edit_distance("the cat sat".split(), "the dog sat down".split()) == 2
    rng = random.Random(1)
    words = ["a", "bb", "c", "dd", "e"]
    for _ in range(100):
        a = [rng.choice(words) for _ in range(rng.randint(0, 40))]
        b = [rng.choice(words) for _ in range(rng.randint(0, 40))]
        assert edit_distance(a, b) == _dp_levenshtein(a, b)


def test_edit_distances_to_many_patterns_at_once():
    rng = random.Random(2)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        pats = ["".join(rng.choice("abcd") for _ in range(rng.randint(0, 30)))
                for _ in range(rng.randint(1, 5))]
        assert answers.edit_distances(a, pats) == [_dp_levenshtein(a, p) for p in pats]


def test_distance_matrix():
    texts, pats = ["abc", "", "xyz"], ["abd", "", "x"]
    assert answers.distance_matrix(texts, pats) == [[_dp_levenshtein(t, p) for p in pats]
                                                    for t in texts]


@pytest.mark.parametrize("pad", [0, 280, 299, 301, 2000])
def test_long_completions_scan_the_tail_first_but_keep_the_rule(pad):
    filler = ("x " * (pad // 2)).strip()
    assert extract_answer(f"The answer is 5.\n{filler}\nno marker here") == "5"
    assert extract_answer(f"#### 3\n{filler}\nThe answer is 4") == "4"
    assert extract_answer(f"#### 3\n{filler}\n#### 4") == "4"
    assert extract_answer(f"{filler}\nQ: hi\nA: 7") == "7"
    assert extract_answer(f"{filler} so A: 7") is None  # "A:" only at a line start
    assert extract_answer(f"#### 3\n{filler}\n#### ") == "3"  # empty last marker: earlier one
    assert extract_answer(f"\\\\boxed{{\\\\frac{{1}}{{2}}}} {filler}") == "\\\\frac{1}{2}"
