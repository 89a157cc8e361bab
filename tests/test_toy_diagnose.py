"""Position classes of a teacher response, as the demo's per-class agreement counts them."""

from __future__ import annotations

from pkd.toy.diagnose import _classes


def test_digits_after_equals_are_computed_and_checked_digits_after_answer_are_the_answer() -> None:
    # "7 + 5 = 13. 13 - 2 = 11. Answer: 11" tokenised into numbers, signs and punctuation.
    pieces = ["7", " +", " 5", " =", " 13", ".", " 13", " -", " 2", " =", " 11", ".", " Answer", ":", " 11", "<eot>"]
    classes = _classes(pieces)
    assert classes[4] == ("computed_teacher_slipped", 12)  # 7 + 5 is 12, the teacher wrote 13
    assert classes[10] == ("computed_teacher_right", 11)
    assert classes[14] == ("answer", None)
    assert {c for i, (c, _) in enumerate(classes) if i not in (4, 10, 14)} == {"other"}
