"""The embedded default: a tiny real SD3-family teacher of handwritten digits, its data and its metrics.

* :mod:`.data` — scikit-learn's 8×8 digits as 32×32 RGB images with captions, a seeded split, JSON export
  (docs/method.md §13.1) for the student's training set.
* :mod:`.teacher` — the shipped ``StableDiffusion3Pipeline`` folder ``senseflow/assets/digits_teacher`` (load it
  with :func:`load_teacher`), sampling and scoring of digits teachers of any family.
* :mod:`.classifier` — a small CNN shipped at ``senseflow/assets/digits_classifier.safetensors``.
* :mod:`.metrics` — prompt accuracy, Fréchet distance (FD to real digits, FD-T to reference samples).

Training a digits teacher of any family: ``python tools/train_digits_teacher.py --family sd3 --out DIR`` (the
digits set through ``senseflow teacher train``, then scored with the classifier).
"""
from senseflow.digits.classifier import DigitClassifier, default_classifier_path, load_classifier
from senseflow.digits.data import DigitsDataConfig, export_json_dataset, load_digits_data
from senseflow.digits.metrics import fd_between, fd_to_real, feature_stats, frechet_distance, prompt_accuracy
from senseflow.digits.teacher import default_teacher_path, generate_digits, load_teacher

__all__ = [
    "DigitClassifier",
    "DigitsDataConfig",
    "default_classifier_path",
    "default_teacher_path",
    "export_json_dataset",
    "fd_between",
    "fd_to_real",
    "feature_stats",
    "frechet_distance",
    "generate_digits",
    "load_classifier",
    "load_digits_data",
    "load_teacher",
    "prompt_accuracy",
]
