"""Picking a long evaluation part up where a stopped run left it.

The adaptive-selection study (evaluation/adaptive_study.py) takes one to two hours per model on two
cores, most of it in pieces that do not depend on each other once made: per statistics source, the
fit, then one scored row per (chat-template variant, length bucket). :class:`StudyCheckpoint` keeps
each piece as soon as it exists (the fit as a statistics file, safetensors; the rows as JSON) in a
folder named by a digest of everything that decides them: the model's weights, the statistics, the
study's settings, this package's code (its Python sources but the report writers, prompt data and
C++ core), torch's version, the thread count and the C++ core's ISA path. A later run for which all
of these are the same continues from there; anything different gives a new folder and a fresh
start, so a resumed result is the one an uninterrupted run would have given.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

__all__ = ["StudyCheckpoint", "code_id", "stats_digest"]

_CODE_SUFFIXES = (".py", ".json", ".so", ".pyd", ".dll", ".dylib")


def code_id() -> str:
    """A digest of the installed glass_kernels package: every Python source, packaged data file and
    the compiled C++ core (a change to any of them may change a result), except the report writers
    (``*report.py``), which only format the saved pieces and run again on every resumed run."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _CODE_SUFFIXES
                       and "__pycache__" not in p.parts and not p.name.endswith("report.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def stats_digest(stats) -> str:
    """A digest of a GlobalStats' content (its tensors, token count and metadata; not its fit)."""
    h = hashlib.sha256()
    for t in list(stats.activation) + list(stats.impact):
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(str(stats.num_tokens).encode())
    h.update(json.dumps(stats.meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


class StudyCheckpoint:
    """The saved pieces of one statistics source's study (see the module docstring).

    ``key``: a JSON-serialisable dict of everything that decides the results; its digest names the
    folder under ``root``, and it is written beside the pieces (``key.json``) for whoever looks."""

    def __init__(self, root: str | os.PathLike, name: str, key: dict):
        text = json.dumps(key, sort_keys=True, default=str)
        self.path = Path(root) / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "key.json").exists():
            _write_json(self.path / "key.json", key)
        state = self.path / "progress.json"
        self._state = _read_json(state) if state.exists() else {"rows": [], "seconds": 0.0}
        if not isinstance(self._state, dict) or not isinstance(self._state.get("rows"), list) \
                 or not isinstance(self._state.get("seconds"), (int, float)):
            raise ValueError(f"{state} is not a study checkpoint's progress file; delete {self.path} to start over")
        self.resumed_rows = len(self._state["rows"])

    @property
    def _fit_file(self) -> Path:
        return self.path / "fit.safetensors"

    def load_fit(self, model):
        """The fitted statistics a previous run saved (checked against ``model``), or None."""
        from ..stats import GlobalStats

        if not self._fit_file.exists():
            return None
        fitted = GlobalStats.load(self._fit_file, model=model)  # names a corrupt file in its error
        if fitted.fit is None:
            raise ValueError(f"{self._fit_file} holds no selection fit; delete {self.path} to start over")
        return fitted

    def save_fit(self, fitted) -> None:
        fitted.save(self._fit_file)

    def row(self, variant: str, context_tokens: int) -> dict | None:
        """The scored row of this variant and bucket, if a previous run finished it."""
        for r in self._state["rows"]:
            if r["variant"] == variant and r["context_tokens"] == context_tokens:
                return r
        return None

    def add_row(self, row: dict, seconds: float) -> None:
        """Keep a finished row and the seconds spent on it (and, before the first row, on the fit)."""
        self._state["rows"].append(row)
        self.add_seconds(seconds)

    def add_seconds(self, seconds: float) -> None:
        self._state["seconds"] = round(self._state["seconds"] + seconds, 1)
        _write_json(self.path / "progress.json", self._state)

    @property
    def seconds(self) -> float:
        """Seconds spent on the saved pieces, over every run that made them."""
        return self._state["seconds"]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); delete {path.parent} to start over") from None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
