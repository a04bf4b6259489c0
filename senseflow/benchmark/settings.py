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
      t5_max_length: 77       # optional: the T5 length of SD3/FLUX teachers (absent: the family's default)
    train:
      iterations: 1200        # per method (null: each config's own); stretches the cosine LR decay too
      save_every: 300         # checkpoint period = the FD-T curve's spacing
      parallel: 2             # training runs at once (one thread each)
      seeds: [0, 1]           # experiment.seed of every method; headline methods are repeated with each later one
                              # (run folder: the method's slug, plus "_seed<s>" for every seed but 0)
    methods:                  # ordered: table row name → how to train it
      "SenseFlow (IDA+ISG+GAN)":
        trainer: sd35_senseflow                   # a trainer of senseflow.launch.LAUNCHERS (its launcher)
        config: configs/SD35/digits_senseflow.yaml   # relative to the repository root
        overrides: []                             # key=value training overrides
        headline: true

Every value is checked by :func:`load_settings` (a ValueError naming the yaml file and the dotted key), before a
benchmark writes anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from senseflow.launch import LAUNCHERS, repo_root

if TYPE_CHECKING:
    from senseflow.benchmark.evaluator import EvalSpec
    from senseflow.benchmark.suites import Suite

__all__ = ["MethodSpec", "Run", "BenchmarkSettings", "load_settings", "settings_path", "slug", "run_folder"]

_TOP = {"suite", "teacher", "eval", "train", "methods"}
_EVAL = {"seed", "reference_seed", "teacher_steps", "teacher_guidance", "student_steps", "batch_size", "resolution"}
#: optional ``eval`` keys (absent: the evaluator passes nothing and the teacher family uses its own default)
_EVAL_OPTIONAL = {"t5_max_length"}
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

    def make_suite(self, **changes: Any) -> Suite:
        """The suite of the ``suite`` section, with ``changes`` (e.g. the demo's ``per_digit``)."""
        from senseflow.benchmark.suites import build_suite

        return build_suite(self.suite_kind, {**self.suite, **changes})

    def eval_spec(self) -> EvalSpec:
        """The evaluator's :class:`~senseflow.benchmark.evaluator.EvalSpec` of the ``eval`` section."""
        from senseflow.benchmark.evaluator import EvalSpec

        e = dict(self.eval)
        steps = [int(k) for k in e.pop("teacher_steps")]
        g = e.pop("teacher_guidance")
        t5 = e.pop("t5_max_length", None)
        return EvalSpec(teacher_steps=steps[0], teacher_baselines=tuple(steps[1:]),
                        teacher_guidance=None if g is None else float(g),
                        t5_max_length=None if t5 is None else int(t5), **{k: int(v) for k, v in e.items()})

    def runs(self, names: Sequence[str] | None = None) -> list[Run]:
        """Every method at ``seeds[0]`` (row = its name), then the headline ones at each later seed (row
        "<name> (seed s)"), restricted to ``names`` when given."""
        names = list(self.methods) if names is None else list(names)
        unknown = [n for n in names if n not in self.methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; the suite's methods: {', '.join(self.methods)}")
        runs = [Run(n, self.methods[n], self.seeds[0], run_folder(n, self.seeds[0])) for n in names]
        for s in self.seeds[1:]:
            runs += [Run(f"{n} (seed {s})", self.methods[n], s, run_folder(n, s))
                     for n in names if self.methods[n].headline]
        slugs = [r.slug for r in runs]
        dup = sorted({s for s in slugs if slugs.count(s) > 1})
        if dup:
            raise ValueError(f"methods share the run folder(s) {dup}: rename them (folder = name before ' (')")
        return runs


def slug(name: str) -> str:
    """The run folder of a method: its name up to " (", lower case, non-alphanumerics as "_"."""
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_").lower()


def run_folder(name: str, seed: int) -> str:
    """The folder under work/ of a method's run at ``seed``: :func:`slug`, plus ``_seed<s>`` for every seed but 0
    (so runs at different seeds never share a folder, whichever seed a call lists first)."""
    return slug(name) + ("" if seed == 0 else f"_seed{seed}")


def settings_path(suite: str | Path) -> Path:
    """``configs/benchmarks/<suite>.yaml`` of the checkout for a suite name, else the path itself."""
    p = Path(suite)
    if p.suffix in (".yaml", ".yml"):
        return p
    return repo_root() / "configs" / "benchmarks" / f"{suite}.yaml"


def _check(section: Any, known: set[str], where: str,
           optional: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - known - optional)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known | optional))}")
    missing = sorted(known - set(section))
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    return section


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    """``value`` as an int (not a bool, float or string), ≥ ``minimum`` when given; else a ValueError at ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where} must be ≥ {minimum}, got {value}")
    return value


def _ints(value: Any, where: str, minimum: int | None = None) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of integers, got {value!r}")
    return [_int(v, f"{where}[{i}]", minimum) for i, v in enumerate(value)]


def load_settings(suite: str | Path, overrides: Sequence[str] = ()) -> BenchmarkSettings:
    """Read the suite's yaml, apply ``key=value`` overrides (omegaconf dot-list), check every key and value (a
    ValueError ``"<yaml>: <dotted key> …"``, FileNotFoundError for a missing file)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from senseflow.benchmark.suites import build_suite

    path = settings_path(suite)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no benchmark settings (configs/benchmarks/<suite>.yaml)")
    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ValueError(f"{path}: {str(exc).splitlines()[0]}") from None
    raw = _check(raw, _TOP, str(path))
    if not isinstance(raw["suite"], dict):
        raise ValueError(f"{path}: suite: expected a mapping with kind and the suite's settings")
    suite_cfg = dict(raw["suite"])
    kind = suite_cfg.pop("kind", None)
    try:
        build_suite(str(kind), suite_cfg)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None

    ev = _check(raw["eval"], _EVAL, f"{path}: eval", _EVAL_OPTIONAL)
    for key in ("seed", "reference_seed"):
        _int(ev[key], f"{path}: eval.{key}")
    _ints(ev["teacher_steps"], f"{path}: eval.teacher_steps", 1)
    g = ev["teacher_guidance"]
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0):
        raise ValueError(f"{path}: eval.teacher_guidance must be null (the teacher's record) or a number > 0, "
                         f"got {g!r}")
    for key in ("student_steps", "batch_size", "resolution", *(k for k in _EVAL_OPTIONAL if k in ev)):
        _int(ev[key], f"{path}: eval.{key}", 1)

    tr = _check(raw["train"], _TRAIN, f"{path}: train")
    if tr["iterations"] is not None:
        _int(tr["iterations"], f"{path}: train.iterations", 1)
    save_every = _int(tr["save_every"], f"{path}: train.save_every", 1)
    parallel = _int(tr["parallel"], f"{path}: train.parallel", 1)
    seeds = _ints(tr["seeds"], f"{path}: train.seeds", 0)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: train.seeds must be distinct, got {seeds}")

    root = repo_root()
    methods = {}
    if not isinstance(raw["methods"], dict) or not raw["methods"]:
        raise ValueError(f"{path}: methods: expected a non-empty mapping of row name → method")
    for name, m in raw["methods"].items():
        where = f"{path}: methods[{name!r}]"
        m = _check(m, _METHOD, where)
        if m["trainer"] not in LAUNCHERS:
            raise ValueError(f"{where}.trainer {m['trainer']!r} is not one of {', '.join(LAUNCHERS)}")
        if not isinstance(m["config"], str) or not (root / m["config"]).is_file():
            raise FileNotFoundError(f"{where}.config {m['config']!r}: no such training config under {root}")
        if not isinstance(m["overrides"], list) or not all(isinstance(o, str) and "=" in o for o in m["overrides"]):
            raise ValueError(f"{where}.overrides must be a list of key=value strings, got {m['overrides']!r}")
        if not isinstance(m["headline"], bool):
            raise ValueError(f"{where}.headline must be true or false, got {m['headline']!r}")
        methods[str(name)] = MethodSpec(str(name), m["trainer"], root / m["config"], list(m["overrides"]),
                                        m["headline"])
    if not isinstance(raw["teacher"], str):
        raise ValueError(f"{path}: teacher must be a folder path, got {raw['teacher']!r}")
    settings = BenchmarkSettings(
        suite_kind=str(kind), suite=suite_cfg, teacher=root / raw["teacher"], eval=ev,
        iterations=None if tr["iterations"] is None else int(tr["iterations"]), save_every=save_every,
        parallel=parallel, seeds=seeds, methods=methods, raw=raw)
    try:
        settings.eval_spec()
        settings.runs()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return settings
