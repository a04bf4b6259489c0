"""Installable package: `pip install -e .` (dependencies pinned in requirements.txt)."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="senseflow",
    version="0.1.0",
    description="SenseFlow: distribution-matching distillation of SDXL, SD3.5 and FLUX into 4-step generators",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["senseflow", "senseflow.*"]),
    package_data={"senseflow": ["assets/*", "assets/**/*"]},
    install_requires=requirements,
    extras_require={"dev": ["pytest==9.2.0"], "8bit": ["bitsandbytes"]},
    entry_points={"console_scripts": ["senseflow=senseflow.cli:main"]},
)
