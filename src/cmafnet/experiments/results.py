"""A run's result file (``result_<evaluation>.json``), typed: the document, or why it cannot be read.

:func:`read_result` is the one reader. A file that is empty, cut short, not JSON, not an object or of
the wrong shape comes back as :class:`Invalid` with a one-line reason: its table row says
``invalid: ...`` and ``cmafnet experiment`` prints one line per such file (exit 4), never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError


def _metric(value: Any) -> Any:
    if isinstance(value, (str, bool)) or not isinstance(value, (int, float, list, dict, type(None))):
        raise ValueError("should be a number, null, a list or an object")
    return value


# a metric: a number, None (undefined), or a structure (confusion matrix, per-class recall, reasons)
Metrics = dict[str, Annotated[Any, AfterValidator(_metric)]]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Convergence(_Doc):
    """Table 7: the first epoch at 90 % of the final validation balanced accuracy, and its stability."""

    epoch: StrictInt | None = None
    stability: StrictFloat | StrictInt | None = None
    epochs: StrictInt | None = None
    column: str | None = None
    note: str | None = None


class ResultDoc(_Doc):
    """What ``experiments.execute`` writes for one run (evaluation or profile), plus its training cost."""

    spec: dict[str, Any] | None = None  # the RunSpec it was computed for (its fingerprint)
    metrics: Metrics = {}
    params_m: StrictFloat | StrictInt | None = None
    classes: list[str] | None = None
    by_magnification: dict[str, Metrics] = {}
    # zero-shot (Table 3): the diagnosis, and the same per test-time adaptation (by Adaptation.label())
    diagnosis: dict[str, Any] | None = None
    adapted: dict[str, dict[str, Any]] = {}
    trivial: dict[str, dict[str, Any]] = {}  # everything malignant / benign on the same images
    convergence: Convergence | None = None
    # profile runs (Table 8)
    device: str | None = None
    img_size: StrictInt | None = None
    batch: StrictInt | None = None
    bench: dict[str, Any] | None = None
    # not in the file: run.json's cost.total (training MACs, steps, ...), added by the runner
    cost: dict[str, Any] | None = None

    @property
    def fingerprint(self) -> str | None:
        return (self.spec or {}).get("fingerprint")


@dataclass(frozen=True)
class Invalid:
    """A result file that exists but cannot be used: where, and why (one line)."""

    path: Path
    reason: str

    @property
    def line(self) -> str:
        return f"{self.path}: {self.reason}"

    @property
    def short(self) -> str:
        """For a table cell: the run folder and the reason without its details."""
        return f"{self.path.parent.name}/{self.path.name} {self.reason.split(' (')[0]}"


def _validation_reason(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(x) for x in e["loc"]) or "<root>"
    if e["type"] == "extra_forbidden":
        return f"unexpected key '{key}'"
    got = repr(e.get("input"))
    return (
        f"{key}: {e['msg'].removeprefix('Value error, ')} (got {got if len(got) <= 60 else got[:57] + '...'})"
    )


def read_result(path: Path, cost: dict | None = None) -> ResultDoc | Invalid:
    """The typed result document at ``path`` (with ``cost`` attached), or :class:`Invalid`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        return Invalid(path, f"not readable ({str(err).splitlines()[0][:120]})")
    if not text.strip():
        return Invalid(path, f"is empty ({len(text)} bytes)")
    try:
        doc = json.loads(text)
    except ValueError as err:
        return Invalid(path, f"not readable JSON ({str(err).splitlines()[0][:120]}); cut short?")
    if not isinstance(doc, dict):
        return Invalid(path, f"not a JSON object (a {type(doc).__name__})")
    try:
        return ResultDoc.model_validate({**doc, "cost": cost})
    except ValidationError as err:
        return Invalid(path, f"malformed ({_validation_reason(err)})")
