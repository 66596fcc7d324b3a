"""The work directory of a streamed run: what was done, and what identifies the run.

Layout::

    run.json          facts identifying the run (configuration, checkpoint, calibration, versions)
    progress.json     the last finished step (phase, next block, sequence names, report rows)
    lock              held (flock) while a process uses the directory
    acts/<name>/      calibration activations, one safetensors file per sample
    grads/block-NNNNN.safetensors   gradient statistics (additive parts) of one block
    model/            the output being built: one shard per pruned block, then the rest

Every file is written to a temporary sibling and renamed into place, and ``progress.json`` is
replaced last, after everything it names exists: a process killed at any moment leaves the
previous step's record intact, and ``--resume`` continues from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

from compresskit.cache import TMP_MARK, atomic_write
from compresskit.errors import CompressKitError

log = logging.getLogger(__name__)

FACTS = "run.json"
PROGRESS = "progress.json"


class ResumeError(CompressKitError):
    """A work directory that cannot be resumed (another run's, damaged, or in use)."""


class WorkDir:
    """Open (and lock) a work directory; :meth:`commit` records a finished step.

    Args:
        path: the directory (created if missing).
        facts: JSON-able facts identifying the run; compared with the recorded ones on resume.
        resume: continue from the recorded progress (a fresh start when there is none).
        owned: the directory was chosen by compresskit (not ``--work-dir``): without ``resume``
            earlier progress in it is discarded instead of refused, and it is deleted after the
            output is saved.
    """

    def __init__(self, path: str | os.PathLike, facts: dict[str, Any], resume: bool, owned: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.owned = owned
        if self.path.exists() and not self.path.is_dir():
            raise CompressKitError(f"work directory {self.path} is a file; choose a directory for --work-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.acts, self.grads, self.model = self.path / "acts", self.path / "grads", self.path / "model"
        recorded = _read(self.path / FACTS)
        self.progress: dict[str, Any] = _read(self.path / PROGRESS) or {}
        if recorded is not None and self.progress:
            if not resume:
                if not owned:
                    raise ResumeError(f"work directory {self.path} holds progress of an earlier run (step "
                                      f"{describe(self.progress)}); pass --resume to continue it, or delete the "
                                      "directory / choose another --work-dir to start over")
                log.info("discarding earlier progress in %s (no --resume)", self.path)
            else:
                changed = differences(recorded, facts)
                if changed:
                    raise ResumeError(f"cannot resume from {self.path}: the run changed since it was started ("
                                      + "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6
                                                                  else "")
                                      + "). Rerun the original command with --resume, or drop --resume and use a new "
                                        "--work-dir to start over")
                log.info("resuming from %s: %s", self.path, describe(self.progress))
        elif resume:
            log.info("nothing to resume in %s; starting from the beginning", self.path)
        if not (resume and self.progress):
            self.progress = {}
            for sub in (self.acts, self.grads, self.model, self.path / PROGRESS):
                if sub.is_dir():
                    shutil.rmtree(sub)
                elif sub.exists():
                    sub.unlink()
            self.write_json(FACTS, facts)
        self._clean_temporaries()
        for sub in (self.acts, self.grads, self.model):
            sub.mkdir(exist_ok=True)
        self.resumed = bool(self.progress)

    def _lock(self) -> None:
        import fcntl

        self._lock_file = open(self.path / "lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise ResumeError(f"work directory {self.path} is in use by another compresskit process; wait for it "
                              "or choose another --work-dir") from None

    def close(self) -> None:
        """Release the lock."""
        if not self._lock_file.closed:
            self._lock_file.close()

    def _clean_temporaries(self) -> None:
        for p in list(self.path.rglob(f"*{TMP_MARK}*")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def write_json(self, name: str, obj: Any) -> None:
        text = json.dumps(obj, indent=1, sort_keys=True, default=str)
        atomic_write(self.path / name, lambda tmp: tmp.write_text(text + "\n"))

    def commit(self, **progress: Any) -> None:
        """Record a finished step (replaces ``progress.json`` atomically)."""
        self.progress = {**progress, "resumes": self.progress.get("resumes", [])}
        self.write_json(PROGRESS, self.progress)

    def note_resume(self) -> None:
        """Remember that the run was resumed at the recorded step (for the manifest)."""
        if self.progress:
            self.progress.setdefault("resumes", []).append(describe(self.progress))

    def keep_only(self, names: set[str]) -> None:
        """Delete activation directories not in ``names`` (left by a superseded or interrupted step)."""
        for d in self.acts.iterdir():
            if d.name not in names:
                shutil.rmtree(d, ignore_errors=True)

    def remove(self) -> None:
        """Delete the whole directory (after the output is saved, for a directory compresskit chose)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def describe(progress: Mapping[str, Any]) -> str:
    phase, nxt = progress.get("phase"), progress.get("next")
    return {"forward": f"gradient forward, next block {nxt}", "backward": f"gradient backward, next block {nxt}",
            "prune": f"pruning, next block {nxt}", "done": "finished"}.get(phase, str(phase))


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested dicts."""
    a, b = dict(_flatten(old)), dict(_flatten(json.loads(json.dumps(new, default=str))))
    return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), obj


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:28] + "..." + s[-28:]


def _read(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path} is damaged ({exc}); delete the work directory and start over") from exc
