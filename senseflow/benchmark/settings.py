"""A benchmark's settings: ``configs/benchmarks/<suite>.yaml`` (omegaconf) plus ``key=value`` overrides.

Schema (every number of a benchmark lives here; see configs/benchmarks/digits.yaml for a commented example)::

    suite:            # kind (digits | shapes) + that suite's settings (senseflow.benchmark.suites)
      kind: digits
      ...
    teacher: PATH     # teacher folder, relative to the repository root (the tool's --teacher overrides it)
    eval:
      seed: 0                 # shared initial noise of every method
      reference_seed: 10000   # independent noise of the FD-T reference (teacher_steps[0]-step samples)
      teacher_steps: [28, 4, 2]   # teacher Euler + CFG rows; the first is the FD-T reference
      teacher_guidance: null  # CFG scale s of the teacher rows (null: the teacher's record, recorded_guidance)
      student_steps: 4
      batch_size: 100
      resolution: 32
      t5_max_length: 77
    train:
      iterations: 1200        # per method (null: each config's own); stretches the cosine LR decay too
      save_every: 300         # checkpoint period = the FD-T curve's spacing
      parallel: 2             # training runs at once (one thread each)
      seeds: [0, 1]           # experiment.seed of every method; headline methods are repeated with each later one
    methods:                  # ordered: table row name → how to train it
      "SenseFlow (IDA+ISG+GAN)":
        trainer: sd35_senseflow                   # a trainer of senseflow.digits.demo.LAUNCHERS (its launcher)
        config: configs/SD35/digits_senseflow.yaml   # relative to the repository root
        overrides: []                             # key=value training overrides
        headline: true
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["MethodSpec", "Run", "BenchmarkSettings", "load_settings", "settings_path", "slug"]

_TOP = {"suite", "teacher", "eval", "train", "methods"}
_EVAL = {"seed", "reference_seed", "teacher_steps", "teacher_guidance", "student_steps", "batch_size", "resolution",
         "t5_max_length"}
_TRAIN = {"iterations", "save_every", "parallel", "seeds"}
_METHOD = {"trainer", "config", "overrides", "headline"}


@dataclass
class MethodSpec:
    """One method: trained by ``trainer``'s launcher with ``config`` and ``overrides``."""

    name: str
    trainer: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    headline: bool = False


@dataclass
class Run:
    """One training run: a method at one seed; ``name`` is its table row, ``slug`` its folder under work/."""

    name: str
    method: MethodSpec
    seed: int
    slug: str


@dataclass
class BenchmarkSettings:
    suite_kind: str
    suite: dict[str, Any]
    teacher: Path
    eval: dict[str, Any]
    iterations: int | None
    save_every: int
    parallel: int
    seeds: list[int]
    methods: dict[str, MethodSpec]
    #: the merged yaml as plain data (written to results.json)
    raw: dict[str, Any]

    @property
    def teacher_steps(self) -> list[int]:
        return [int(k) for k in self.eval["teacher_steps"]]

    def eval_spec(self):
        """The evaluator's :class:`~senseflow.benchmark.evaluator.EvalSpec` of the ``eval`` section."""
        from senseflow.benchmark.evaluator import EvalSpec

        e = dict(self.eval)
        steps = [int(k) for k in e.pop("teacher_steps")]
        g = e.pop("teacher_guidance")
        return EvalSpec(teacher_steps=steps[0], teacher_baselines=tuple(steps[1:]),
                        teacher_guidance=None if g is None else float(g), **{k: int(v) for k, v in e.items()})

    def runs(self, names: Sequence[str] | None = None) -> list[Run]:
        """Every method at ``seeds[0]`` (row = its name), then the headline ones at each later seed (row
        "<name> (seed s)"), restricted to ``names`` when given."""
        names = list(self.methods) if names is None else list(names)
        unknown = [n for n in names if n not in self.methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; the suite's methods: {', '.join(self.methods)}")
        runs = [Run(n, self.methods[n], self.seeds[0], slug(n)) for n in names]
        for s in self.seeds[1:]:
            runs += [Run(f"{n} (seed {s})", self.methods[n], s, f"{slug(n)}_seed{s}")
                     for n in names if self.methods[n].headline]
        slugs = [r.slug for r in runs]
        dup = sorted({s for s in slugs if slugs.count(s) > 1})
        if dup:
            raise ValueError(f"methods share the run folder(s) {dup}: rename them (folder = name before ' (')")
        return runs


def slug(name: str) -> str:
    """The run folder of a method: its name up to " (", lower case, non-alphanumerics as "_"."""
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_").lower()


def settings_path(suite: str | Path) -> Path:
    """``configs/benchmarks/<suite>.yaml`` of the checkout for a suite name, else the path itself."""
    from senseflow.digits.demo import repo_root

    p = Path(suite)
    if p.suffix in (".yaml", ".yml"):
        return p
    return repo_root() / "configs" / "benchmarks" / f"{suite}.yaml"


def _check(section: Any, known: set[str], where: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = sorted(known - set(section))
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    return section


def load_settings(suite: str | Path, overrides: Sequence[str] = ()) -> BenchmarkSettings:
    """Read the suite's yaml, apply ``key=value`` overrides (omegaconf dot-list), check every key."""
    from omegaconf import OmegaConf

    from senseflow.digits.demo import LAUNCHERS, repo_root

    path = settings_path(suite)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no benchmark settings (configs/benchmarks/<suite>.yaml)")
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    raw = _check(OmegaConf.to_container(cfg, resolve=True), _TOP, str(path))
    suite_cfg = dict(raw["suite"] or {})
    kind = suite_cfg.pop("kind", None)
    ev = _check(raw["eval"], _EVAL, "eval")
    if not ev["teacher_steps"]:
        raise ValueError("eval.teacher_steps: give at least the reference step count (e.g. [28, 4, 2])")
    tr = _check(raw["train"], _TRAIN, "train")
    seeds = [int(s) for s in tr["seeds"]]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"train.seeds must be distinct and non-empty, got {seeds}")
    if int(tr["parallel"]) < 1 or int(tr["save_every"]) < 1:
        raise ValueError(f"train.parallel and train.save_every must be ≥ 1, got {tr['parallel']}, {tr['save_every']}")
    root = repo_root()
    methods = {}
    for name, m in (raw["methods"] or {}).items():
        m = _check(dict(m), _METHOD, f"methods[{name!r}]")
        if m["trainer"] not in LAUNCHERS:
            raise ValueError(f"methods[{name!r}].trainer {m['trainer']!r} is not one of {', '.join(LAUNCHERS)}")
        methods[str(name)] = MethodSpec(str(name), m["trainer"], root / m["config"], [str(o) for o in m["overrides"]],
                                        bool(m["headline"]))
    if not methods:
        raise ValueError(f"{path}: no methods")
    return BenchmarkSettings(
        suite_kind=str(kind), suite=suite_cfg, teacher=root / raw["teacher"], eval=ev,
        iterations=None if tr["iterations"] is None else int(tr["iterations"]), save_every=int(tr["save_every"]),
        parallel=int(tr["parallel"]), seeds=seeds, methods=methods, raw=raw)
