"""Install the three top-level source folders as one import package, ``planner``.

``planner/`` is the package itself; ``algorithms/`` and ``gpu/`` become ``planner.algorithms`` and
``planner.gpu`` through ``package_dir``, so nothing generic lands in site-packages.
"""
from setuptools import setup

setup(
    name="remat-planner",
    version="0.1.0",
    description="Plan PyTorch training under a memory budget: rematerialization, "
    "operator order and low-memory operator implementations.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["planner", "planner.algorithms", "planner.gpu"],
    package_dir={
        "planner": "planner",
        "planner.algorithms": "algorithms",
        "planner.gpu": "gpu",
    },
    # Capture relies on private AOT-autograd pieces (wrapped in planner/_aot.py) that were verified
    # on torch 2.14 only; widen the range when another release is tested.
    install_requires=[
        "torch>=2.14,<2.15",
        "torchvision>=0.29,<0.30",
        "numpy>=1.26",
        "scipy>=1.11",
        "highspy>=1.7",  # exact mode's MILP solver (MIP start, callbacks); SciPy's HiGHS is the fallback
        "numba>=0.60",
        "matplotlib>=3.8",  # the CLI's pictures
        "tqdm>=4.66",  # the CLI's progress bars
    ],
    extras_require={
        "gpu": ["cupy-cuda13x>=13.6"],
        # exact mode's optional MILP solvers (plan(mode="exact", solver=...); HiGHS stays the default)
        "cpsat": ["ortools>=9.12,<10"],
        "scip": ["pyscipopt>=5.5,<7"],
        # TrainingGraph.to_networkx, its only user
        "networkx": ["networkx>=3.2"],
        # Hugging Face models (tests/test_transformers.py, preset:gpt2, benchmarks/hf_transformers.py)
        "transformers": ["transformers>=5.20,<6"],
        # timm: the zoo of architectures in tests/test_zoo_fidelity.py (its tiny test_* models, verified on 1.0.31)
        # networkx: to_networkx's test; import-linter: the layer contracts (.importlinter, .ci/lint-layers);
        # ortools, pyscipopt: the optional solvers' tests (tests/test_solvers.py) run in CI, never skipped
        "test": ["pytest>=8", "hypothesis>=6.100", "transformers>=5.20,<6", "timm>=1.0.31,<2", "networkx>=3.2",
                 "import-linter>=2.17,<3", "ortools>=9.12,<10", "pyscipopt>=5.5,<7"],
    },
    entry_points={"console_scripts": ["planner=planner.cli:main"]},
)
