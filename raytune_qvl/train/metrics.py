"""OCR and visual-QA metrics on strings (pure; edit distances from rapidfuzz).

* CER / WER: edit distance over characters / whitespace-separated words, divided by the
  reference length. Corpus values sum the distances and the reference lengths (micro average).
  Texts are NFC-normalised first, so composed and decomposed Hangul compare equal. Chinese and
  Japanese have no spaces between words: read their CER, not their WER.
* NED (formulas): edit distance over LaTeX tokens after `normalize_latex`, divided by the
  longer token sequence; 0 is identical, 1 shares nothing.
* ANLS (visual QA, DocVQA's definition): 1 - normalized Levenshtein distance on lower-cased,
  stripped strings, 0 when that distance is >= 0.5; the best over the reference answers.
* exact match: equal after collapsing whitespace.

An empty reference scores 0 errors against an empty prediction and 1 (CER/WER) otherwise.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

from rapidfuzz.distance import Levenshtein

__all__ = [
    "cer",
    "wer",
    "normalize_latex",
    "latex_tokens",
    "ned",
    "anls",
    "exact_match",
    "corpus_scores",
    "sample_error",
]


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _rate(distance: int, length: int, hyp_len: int) -> float:
    if length == 0:
        return 0.0 if hyp_len == 0 else 1.0
    return distance / length


def char_distance(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance, reference length) over characters."""
    ref, hyp = _nfc(ref), _nfc(hyp)
    return Levenshtein.distance(ref, hyp), len(ref)


def word_distance(ref: str, hyp: str) -> tuple[int, int]:
    ref_words, hyp_words = _nfc(ref).split(), _nfc(hyp).split()
    return Levenshtein.distance(ref_words, hyp_words), len(ref_words)


def cer(ref: str, hyp: str) -> float:
    """Character error rate: (substitutions + deletions + insertions) / len(ref).

    >>> cer("hello", "hallo")
    0.2
    """
    distance, length = char_distance(ref, hyp)
    return _rate(distance, length, len(hyp))


def wer(ref: str, hyp: str) -> float:
    """Word error rate over whitespace-separated words.

    >>> wer("the cat sat", "the cat sit")
    0.3333333333333333
    """
    distance, length = word_distance(ref, hyp)
    return _rate(distance, length, len(hyp.split()))


# ----------------------------------------------------------------------------- LaTeX

_TOKEN_RE = re.compile(r"\\[a-zA-Z]+\*?|\\.|\S")
_SPACING = {
    "\\,",
    "\\;",
    "\\:",
    "\\!",
    "\\ ",
    "\\quad",
    "\\qquad",
    "\\enspace",
    "\\thinspace",
    "\\displaystyle",
    "\\textstyle",
}
_DROP = {"\\left", "\\right", "\\big", "\\Big", "\\bigg", "\\Bigg", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr"}
_ALIASES = {
    "\\dfrac": "\\frac",
    "\\tfrac": "\\frac",
    "\\le": "\\leq",
    "\\ge": "\\geq",
    "\\ne": "\\neq",
    "\\to": "\\rightarrow",
}


def latex_tokens(text: str) -> list[str]:
    """Commands (\\frac), escaped symbols (\\{) and single characters; whitespace dropped."""
    return _TOKEN_RE.findall(_nfc(text))


def _strip_redundant_braces(tokens: list[str]) -> list[str]:
    """Remove braces around a single token (`x^{2}` -> `x^2`, `{a}` -> `a`), repeatedly."""
    changed = True
    while changed:
        changed = False
        out: list[str] = []
        i = 0
        while i < len(tokens):
            if tokens[i] == "{" and i + 2 < len(tokens) and tokens[i + 2] == "}" and tokens[i + 1] not in "{}":
                out.append(tokens[i + 1])
                i += 3
                changed = True
            elif tokens[i] == "{" and i + 1 < len(tokens) and tokens[i + 1] == "}":
                i += 2  # empty group
                changed = True
            else:
                out.append(tokens[i])
                i += 1
        tokens = out
    return tokens


def normalize_latex(text: str) -> list[str]:
    """LaTeX as a token list in a canonical form.

    Whitespace and spacing commands (\\, \\quad ...) are dropped; \\left, \\right and \\big
    sizes are dropped (their delimiters stay); \\dfrac/\\tfrac become \\frac, \\le becomes
    \\leq (and similar aliases); braces around a single token are removed.

    >>> normalize_latex(r"\\left( x^{2} \\right) + \\dfrac{a}{b}")
    ['(', 'x', '^', '2', ')', '+', '\\\\frac', 'a', 'b']
    """
    tokens = [_ALIASES.get(t, t) for t in latex_tokens(text) if t not in _SPACING and t not in _DROP]
    return _strip_redundant_braces(tokens)


def ned(ref: str, hyp: str) -> float:
    """Normalized edit distance between two formulas: token distance / the longer length."""
    a, b = normalize_latex(ref), normalize_latex(hyp)
    longest = max(len(a), len(b))
    return 0.0 if longest == 0 else Levenshtein.distance(a, b) / longest


# ----------------------------------------------------------------------------- visual QA


def anls(refs: str | Sequence[str], hyp: str, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA), best over refs.

    >>> anls(["blue"], "Blue")
    1.0
    """
    refs = [refs] if isinstance(refs, str) else list(refs)
    pred = " ".join(_nfc(hyp).lower().split())
    best = 0.0
    for ref in refs:
        gold = " ".join(_nfc(ref).lower().split())
        longest = max(len(gold), len(pred))
        nl = 0.0 if longest == 0 else Levenshtein.distance(gold, pred) / longest
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def exact_match(ref: str, hyp: str) -> float:
    return float(" ".join(_nfc(ref).split()) == " ".join(_nfc(hyp).split()))


# ----------------------------------------------------------------------------- corpus


def sample_error(task: str, ref: str, hyp: str) -> float:
    """One sample's error for the predictions table (lower is better): CER, NED or 1 - ANLS."""
    if task == "ocr_formula":
        return ned(ref, hyp)
    if task == "general_vqa":
        return 1.0 - anls(ref, hyp)
    return cer(ref, hyp)


def corpus_scores(task: str, pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """The task's eval metrics over (reference, prediction) pairs, keyed as the loop reports them."""
    pairs = list(pairs)
    if not pairs:
        return {}
    em = sum(exact_match(r, h) for r, h in pairs) / len(pairs)
    if task == "ocr_formula":
        return {"eval_ned": sum(ned(r, h) for r, h in pairs) / len(pairs), "eval_exact_match": em}
    if task == "general_vqa":
        return {"eval_anls": sum(anls(r, h) for r, h in pairs) / len(pairs), "eval_exact_match": em}
    chars = [char_distance(r, h) for r, h in pairs]
    words = [word_distance(r, h) for r, h in pairs]
    char_len = sum(n for _, n in chars)
    word_len = sum(n for _, n in words)
    hyp_chars = sum(len(h) for _, h in pairs)
    hyp_words = sum(len(h.split()) for _, h in pairs)
    return {
        "eval_cer": _rate(sum(d for d, _ in chars), char_len, hyp_chars),
        "eval_wer": _rate(sum(d for d, _ in words), word_len, hyp_words),
        "eval_exact_match": em,
    }
