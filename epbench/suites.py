"""YAML suites: a suite is a list of experiments; an experiment is a model spec, phase settings,
a task (``gdu`` or ``train``), the algorithms, a dataset and a number of trials.

Every mapping is validated by pydantic with unknown keys rejected; any problem becomes one
:class:`~epbench.errors.EpbenchError` line naming the file and the field.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from epbench.errors import EpbenchError
from epbench.spec import Algorithm, DType, ModelSpec, PhaseSettings, TrainSettings, check_alternation

#: what ``--quick`` does (documented in the README and recorded in every quick run's meta.json)
QUICK = {
    "trials": 1,
    "gdu_T": 200,  # T ≤ 200
    "gdu_K": 20,  # K ≤ 20
    "gdu_batch": 8,  # GDU batch ≤ 8
    "epochs": 1,
    "train_dataset": "mnist-5k",
    "max_train": 1000,  # at most 1000 training and 500 test samples
    "max_test": 500,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sweep(_Strict):
    """Cartesian sweep of a GDU experiment (Theorem-1 plots)."""

    beta: list[float] | None = None
    symmetric: list[bool] | None = None
    flavor: list[Literal["paper", "official-code"]] | None = None


class Experiment(_Strict):
    name: str
    task: Literal["gdu", "train"]
    model: ModelSpec
    phase: PhaseSettings
    train: TrainSettings | None = None
    algorithms: list[Algorithm] = Field(default_factory=lambda: ["ep", "bptt"])
    dataset: str = "mnist"
    trials: int = Field(default=1, ge=1)
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=20, ge=1, description="GDU mini-batch")
    heavy: bool = Field(default=False, description="skipped on CPU backends unless --include-heavy")
    sweep: Sweep | None = None
    n_train: int | None = Field(default=None, ge=1, description="use only the first n training samples")
    n_test: int | None = Field(default=None, ge=1, description="use only the first n test samples")
    process_units: int = Field(default=3, ge=0, description="units per layer sampled for process plots")

    @model_validator(mode="after")
    def _task_fields(self) -> "Experiment":
        if self.task == "train" and self.train is None:
            raise ValueError("a train experiment needs a 'train' section (lrs, epochs)")
        if self.task == "train" and len(self.train.lrs) != self.model.n_layers:
            raise ValueError(f"train.lrs: {self.model.kind} needs {self.model.n_layers} learning rates "
                             f"(input side first), got {len(self.train.lrs)}")
        if self.sweep is not None and self.task != "gdu":
            raise ValueError("sweep is for gdu experiments")
        check_alternation(self.model, self.phase, gdu=self.task != "train")
        return self

    @property
    def dtype(self) -> DType:
        return self.phase.dtype


class Suite(_Strict):
    name: str
    description: str = ""
    defaults: dict[str, Any] = Field(default_factory=dict)
    experiments: list[Experiment]


def _format_error(path: str, err: ValidationError, raw: dict) -> str:
    first = err.errors()[0]
    loc = list(first.get("loc", ()))
    where = []
    experiments = raw.get("experiments") if isinstance(raw, dict) else None
    for i, part in enumerate(loc):
        if part == "experiments" and i + 1 < len(loc) and isinstance(loc[i + 1], int) and isinstance(experiments, list):
            idx = loc[i + 1]
            name = experiments[idx].get("name") if idx < len(experiments) and isinstance(experiments[idx], dict) else None
            where.append(f"experiments[{idx}]" + (f" ({name})" if name else ""))
        elif isinstance(part, int) and i > 0 and loc[i - 1] == "experiments":
            continue
        else:
            where.append(str(part))
    field = ".".join(where) or "<suite>"
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key"
    return f"{path}: {field}: {msg}"


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise EpbenchError(f"--set {dotted}: '{part}' is not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise EpbenchError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise EpbenchError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_suite_file(path: str | os.PathLike) -> tuple[dict, bytes]:
    path = Path(path)
    if not path.is_file():
        raise EpbenchError(f"{path}: no such suite file ({missing_suite_hint(path)})")
    data = path.read_bytes()
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise EpbenchError(f"{path}: bad YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise EpbenchError(f"{path}: <suite>: expected a mapping with 'name' and 'experiments'")
    return raw, data


def build_suite(raw: dict, path: str, assignments: list[tuple[str, Any]] = ()) -> Suite:
    """Validate a raw suite mapping, merging ``defaults`` and ``--set`` assignments into every
    experiment (``NAME.key=value`` targets one experiment)."""
    raw = copy.deepcopy(raw)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise EpbenchError(f"{path}: defaults: expected a mapping")
    experiments = raw.get("experiments")
    if isinstance(experiments, list):
        merged = []
        names = {e.get("name") for e in experiments if isinstance(e, dict)}
        for exp in experiments:
            if not isinstance(exp, dict):
                merged.append(exp)
                continue
            exp = _deep_merge(defaults, exp)
            for key, value in assignments:
                head, _, rest = key.partition(".")
                if head in names and rest:
                    if exp.get("name") == head:
                        set_dotted(exp, rest, value)
                else:
                    set_dotted(exp, key, value)
            merged.append(exp)
        raw["experiments"] = merged
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        raise EpbenchError(_format_error(path, err, raw)) from None
    check_unique_names(suite, path)
    check_algorithms(suite, path)
    return suite


def check_algorithms(suite: Suite, path: str = "<suite>") -> None:
    """Every experiment's algorithms are registered (``epbench_algorithms`` hook), and those of
    a GDU experiment other than BPTT, the reference, have per-step processes to compare."""
    from epbench.plugins import algorithms, unknown_name_message

    known = algorithms()
    for position, exp in enumerate(suite.experiments):
        where = f"{path}: experiments[{position}] ({exp.name}): algorithms"
        for name in exp.algorithms:
            if name not in known:
                raise EpbenchError(f"{where}: {unknown_name_message('algorithm', name, known)}")
            if exp.task == "gdu" and name != "bptt" and not has_processes(known[name]):
                raise EpbenchError(f"{where}: algorithm '{name}' has no per-step processes for the GDU "
                                   "comparison (train experiments only)")


def has_processes(algorithm) -> bool:
    """Whether an algorithm overrides :meth:`epbench.algorithms.Algorithm.processes`."""
    from epbench.algorithms import Algorithm

    return getattr(type(algorithm), "processes", Algorithm.processes) is not Algorithm.processes


def check_unique_names(suite: Suite, path: str) -> None:
    """Every experiment needs its own name: results, report rows and ``--only`` go by name.
    Positions are counted from 1, as a reader counts the list."""
    first: dict[str, int] = {}
    for position, exp in enumerate(suite.experiments, start=1):
        if exp.name in first:
            raise EpbenchError(f"{path}: experiments {first[exp.name]} and {position} are both named "
                               f"'{exp.name}' (each experiment needs its own name)")
        first[exp.name] = position


def load_suite(path: str | os.PathLike, assignments: list[tuple[str, Any]] = ()) -> tuple[Suite, str]:
    """Read, merge and validate a suite file; returns (suite, sha256 of the file)."""
    raw, data = read_suite_file(path)
    suite = build_suite(raw, str(path), assignments)
    return suite, hashlib.sha256(data).hexdigest()


def expand_sweeps(experiments: list[Experiment]) -> list[Experiment]:
    """Replace every experiment that has a ``sweep`` by one experiment per combination."""
    out: list[Experiment] = []
    for exp in experiments:
        if exp.sweep is None:
            out.append(exp)
            continue
        betas = exp.sweep.beta or [exp.phase.beta]
        syms = exp.sweep.symmetric or [exp.phase.symmetric]
        flavors = exp.sweep.flavor or [exp.model.flavor]
        for beta, sym, flavor in itertools.product(betas, syms, flavors):
            out.append(exp.model_copy(update={
                "phase": exp.phase.model_copy(update={"beta": beta, "symmetric": sym}),
                "model": ModelSpec.model_validate({**exp.model.model_dump(), "flavor": flavor}),
                "sweep": None,
            }))
    return out


def bundled_suites_dir() -> Path | None:
    """The bundled suites: ``$EPBENCH_SUITES`` if set, else ``epbench/suites_data``, shipped in
    the wheel (in a checkout a link to the repository's ``suites/``, resolved so that paths read
    ``suites/NAME.yaml``)."""
    env = os.environ.get("EPBENCH_SUITES")
    candidate = Path(env) if env else (Path(__file__).parent / "suites_data").resolve()
    return candidate if candidate.is_dir() else None


def bundled_suite_names() -> list[str]:
    """The names of the bundled suites (``table3`` for ``table3.yaml``), sorted."""
    folder = bundled_suites_dir()
    return sorted({p.stem for p in folder.glob("*.y*ml")}) if folder is not None else []


def resolve_suite_path(name_or_path: str) -> Path:
    """A path as given, or the name of a bundled suite (``table3`` → the bundled table3.yaml)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        return path
    folder = bundled_suites_dir()
    if folder is not None:
        for suffix in (".yaml", ".yml"):
            if (folder / f"{name_or_path}{suffix}").is_file():
                return folder / f"{name_or_path}{suffix}"
    return path


def missing_suite_hint(path: Path) -> str:
    """What to say about a suite file that does not exist: the bundled suite of that name if
    there is one (``suites/table4.yaml`` outside a checkout → ``epbench run table4``), else
    the bundled names."""
    names = bundled_suite_names()
    if path.stem in names:
        return f"bundled suite '{path.stem}' is run by name: epbench run {path.stem}"
    return f"bundled suites: {', '.join(names)}" if names else "no bundled suites found"
