"""The embedded benchmarks (digits, shapes): a teacher, its Euler baselines and every distilled method, scored on
one prompt/noise set. ``python tools/benchmark.py --suite {digits,shapes} --out DIR`` runs one (docs/benchmarks.md).

* :mod:`.suites` — what differs between benchmarks: prompts, accuracy metric, Fréchet distances, the metric
  network's held-out accuracy, grid layout, training assets;
* :mod:`.settings` — ``configs/benchmarks/<suite>.yaml``: every number of a benchmark and its methods;
* :mod:`.evaluator` — sampling the teacher and the students on the shared set, FD-T to an independent reference;
* :mod:`.runner` — training the methods through their launchers, scoring every checkpoint, writing the results;
* :mod:`.report` — result rows, the markdown table, results.json, the FD-T plot and image grids.
"""

from senseflow.benchmark.evaluator import STUDENT_SAMPLERS, EvalSpec, Evaluator, recorded_guidance
from senseflow.benchmark.report import (
    MethodResult,
    comparison_grid,
    image_grid,
    plot_curves,
    results_markdown,
    write_results,
)
from senseflow.benchmark.settings import BenchmarkSettings, MethodSpec, Run, load_settings
from senseflow.benchmark.suites import SUITES, DigitsSuite, ShapesSuite, Suite, build_suite

__all__ = [
    "STUDENT_SAMPLERS",
    "SUITES",
    "BenchmarkSettings",
    "DigitsSuite",
    "EvalSpec",
    "Evaluator",
    "MethodResult",
    "MethodSpec",
    "Run",
    "ShapesSuite",
    "Suite",
    "build_suite",
    "comparison_grid",
    "image_grid",
    "load_settings",
    "plot_curves",
    "recorded_guidance",
    "results_markdown",
    "write_results",
]
