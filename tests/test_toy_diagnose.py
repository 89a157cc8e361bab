"""Position classes of a teacher response, as the demo's per-class agreement counts them."""

from __future__ import annotations

from pkd.toy.diagnose import _classes


def _encode(text: str) -> list[str]:
    """Numbers as the toy tokenizer splits them: " 26" whole, " 31" as " 3" "1"."""
    return [text] if text in (" 26", " 11", " 5") else [text[:2], *text[2:]]


def test_computed_digits_are_checked_token_by_token_and_answer_digits_found() -> None:
    # "7 + 5 = 13. 13 - 2 = 11. 11 + 20 = 32. Answer: 32": 7 + 5 is 12 (slip), 11 + 20 is 31.
    pieces = ["7", " +", " 5", " =", " 1", "3", ".", " 1", "3", " -", " 2", " =", " 11", ".",
              " 11", " +", " 2", "0", " =", " 3", "2", ".", " Answer", ":", " 3", "2", "<eot>"]  # fmt: skip
    classes = _classes(pieces, _encode)
    assert classes[4] == ("computed_teacher_right", None)  # " 1" of 13 is also the " 1" of 12
    assert classes[5] == ("computed_teacher_slipped", "2")
    assert classes[12] == ("computed_teacher_right", None)
    assert classes[19] == ("computed_teacher_right", None) and classes[20] == ("computed_teacher_slipped", "1")
    assert classes[24] == classes[25] == ("answer", None)
    rest = {c for i, (c, _) in enumerate(classes) if i not in (4, 5, 12, 19, 20, 24, 25)}
    assert rest == {"other"}
