"""Classes added to an embedding student by name (docs/ALGORITHM.md §4): the checks a name passes
before the teacher encodes it, and the new classifier.

The checks run before anything is encoded or registered, so a refused name costs nothing and the
registry is left as it was. Each error names the class it is about.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dfkd_assets.core.names import class_key, clean_class_name
from dfkd_assets.core.student import EmbeddingStudent, StudentClassifier
from dfkd_assets.core.teacher import Teacher, zero_shot_head


class ClassNameError(ValueError):
    """A class name that cannot be added: empty, a duplicate, or colliding with an existing class or output column."""


class NotAnEmbeddingStudent(ValueError):
    """Classes can only be added by name to a student whose classifier is the teacher's text head."""


def new_class_names(existing: Sequence[str], names: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    """`names` cleaned (whitespace collapsed), in order; ClassNameError naming the class when one is
    empty or has a control character, is given twice, has the key of an `existing` class
    (config.class_key: case, spacing and punctuation do not make two classes), or is a `reserved`
    name (the model's output columns)."""
    if not names:
        raise ClassNameError("no class names given: name at least one class to add")
    seen = {class_key(c): (c, True) for c in existing}
    out = []
    for raw in names:
        try:
            name = clean_class_name(str(raw))
        except ValueError as e:
            raise ClassNameError(str(e)) from None
        if name in reserved:
            raise ClassNameError(f"class {raw!r} collides with the model's output columns {list(reserved)}: choose another name")
        key = class_key(name)
        if key in seen:
            other, is_existing = seen[key]
            if is_existing:
                raise ClassNameError(f"class {raw!r} collides with the model's existing class {other!r} (both are {key!r}): it is already served")
            raise ClassNameError(f"class {raw!r} is given twice (as {other!r} and {raw!r}, both {key!r})")
        seen[key] = (raw, False)
        out.append(name)
    return out


def require_embedding_student(student: StudentClassifier, what: str) -> EmbeddingStudent:
    if not isinstance(student, EmbeddingStudent):
        raise NotAnEmbeddingStudent(
            f"{what} is a logit student (a fixed {len(student.classes)}-class head): classes can only be added by name to a student "
            "distilled with `student.head: embedding` (and distill.feature_weight > 0); re-distil with those settings first")
    return student


@torch.no_grad()
def head_for(student: StudentClassifier, teacher: Teacher, classes: Sequence[str], templates, what: str = "the student") -> EmbeddingStudent:
    """`student` (an embedding student of this teacher) with the teacher's zero-shot head for `classes`:
    the same weights, a classifier computed from the names alone (core/teacher.zero_shot_head, which
    refuses a name whose prompts the text tower cannot encode, naming it)."""
    student = require_embedding_student(student, what)
    if student.teacher_id != teacher.teacher_id:
        raise NotAnEmbeddingStudent(f"{what} was distilled from teacher {student.teacher_id!r}, not {teacher.teacher_id!r}: its embedding "
                                    "space is that teacher's, and a head from another text tower would not match it")
    head = zero_shot_head(teacher, list(classes), templates)
    return student.with_head(list(classes), head.cpu())
