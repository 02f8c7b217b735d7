"""OCR metrics on known pairs, empty strings and Unicode."""

from __future__ import annotations

import pytest

from raytune_qvl.train.metrics import anls, cer, corpus_scores, exact_match, ned, normalize_latex, sample_error, wer


@pytest.mark.parametrize(
    ("ref", "hyp", "expected"),
    [
        ("hello", "hello", 0.0),
        ("hello", "hallo", 0.2),  # one substitution in five
        ("hello", "helo", 0.2),  # one deletion
        ("hello", "helloo", 0.2),  # one insertion
        ("abc", "", 1.0),
        ("", "", 0.0),
        ("", "x", 1.0),
        ("안녕하세요", "안녕하세오", 0.2),  # Korean: one syllable of five
        ("你好世界", "你好世", 0.25),  # Chinese: one character deleted
    ],
)
def test_cer(ref: str, hyp: str, expected: float) -> None:
    assert cer(ref, hyp) == pytest.approx(expected)


def test_cer_normalizes_hangul() -> None:
    composed = "한국어"
    decomposed = "\u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165"  # the same text as jamo
    assert cer(composed, decomposed) == 0.0


def test_wer() -> None:
    assert wer("the cat sat on the mat", "the cat sat on the mat") == 0.0
    assert wer("the cat sat", "the cat sit") == pytest.approx(1 / 3)
    assert wer("the cat sat", "the sat") == pytest.approx(1 / 3)
    assert wer("a b", "a b c d") == pytest.approx(1.0)
    assert wer("", "") == 0.0 and wer("", "word") == 1.0
    assert wer("나는 학생 입니다", "나는 학생 입니까") == pytest.approx(1 / 3)


def test_latex_normalization_and_ned() -> None:
    assert normalize_latex(r"x^{2}") == normalize_latex("x^2")
    assert normalize_latex(r"\left( a \right)") == ["(", "a", ")"]
    assert normalize_latex(r"\dfrac{a}{b}") == normalize_latex(r"\frac{a}{b}")
    assert normalize_latex(r"a \, b \quad c") == ["a", "b", "c"]
    assert normalize_latex(r"{{x}}") == ["x"]
    assert ned(r"\frac{a}{b} = x^{2}", r"\frac {a}{b}=x^2") == 0.0
    assert ned(r"a + b", r"a - b") == pytest.approx(1 / 3)
    assert ned("", "") == 0.0 and ned("a", "") == 1.0
    assert 0.0 < ned(r"\sqrt{x}", r"\sqrt{y}") < 1.0


def test_anls_and_exact_match() -> None:
    assert anls("Blue", "blue") == 1.0
    assert anls("circle", "circles") == pytest.approx(1 - 1 / 7)
    assert anls("red", "green") == 0.0  # distance above the 0.5 threshold scores 0
    assert anls(["3", "three"], "three") == 1.0  # best over the references
    assert anls("", "") == 1.0
    assert exact_match("a  b", "a b") == 1.0 and exact_match("A", "a") == 0.0


def test_corpus_scores_are_micro_averaged() -> None:
    pairs = [("abcd", "abcd"), ("ab", "xy")]  # 0 + 2 errors over 4 + 2 characters
    scores = corpus_scores("ocr_doc", pairs)
    assert scores["eval_cer"] == pytest.approx(2 / 6)
    assert scores["eval_exact_match"] == 0.5
    assert set(corpus_scores("ocr_formula", pairs)) == {"eval_ned", "eval_exact_match"}
    assert corpus_scores("general_vqa", [("red", "red")])["eval_anls"] == 1.0
    assert sample_error("general_vqa", "red", "red") == 0.0 and sample_error("ocr_doc", "ab", "xy") == 1.0
    assert corpus_scores("ocr_doc", []) == {}


def test_nan_is_never_the_best() -> None:
    from raytune_qvl.train.evaluate import is_better

    assert is_better(0.5, None, higher_is_better=False)
    assert not is_better(float("nan"), None, higher_is_better=False)
    assert not is_better(float("nan"), 0.9, higher_is_better=True)
    assert is_better(0.4, 0.5, higher_is_better=False) and not is_better(0.4, 0.5, higher_is_better=True)
