"""The library alone: `pip install metaopt` without extras gives an optimizer that needs torch and
nothing of the experiment harness (Hydra, W&B, datasets, torchvision, timm, experiments/)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ("hydra", "omegaconf", "wandb", "datasets", "torchvision", "timm", "experiments")
# import metaopt and take a MetaOptimize step, then print the harness modules that got imported
STEP = f"""
import sys
import torch
import metaopt

model = torch.nn.Linear(4, 2)
optimizer = metaopt.MetaOptimize(model.parameters(), base="adamw", meta="lion", alpha0=1e-3)
model(torch.randn(8, 4)).pow(2).mean().backward()
optimizer.step()
assert list(optimizer.step_sizes()) == ["step_size"]
print(" ".join(name for name in {HARNESS!r} if name in sys.modules))
"""


def harness_modules_after(prelude: str = "") -> list[str]:
    """The harness modules in sys.modules after `prelude`, `import metaopt` and one step, in a fresh process."""
    result = subprocess.run([sys.executable, "-c", prelude + STEP], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=True)
    return result.stdout.split()


def test_the_library_imports_torch_and_nothing_of_the_harness():
    assert harness_modules_after() == []
    # the check sees a harness module that is imported in the process
    assert harness_modules_after("import omegaconf\n") == ["omegaconf"]


def test_the_library_depends_on_torch_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [dependency.split(">")[0] for dependency in project["dependencies"]] == ["torch"]
    assert set(project["optional-dependencies"]) == {"experiments", "dev"}
