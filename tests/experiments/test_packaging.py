"""The library alone: `pip install metaoptimize` (import name metaopt) gives an optimizer that needs torch
and nothing of the experiment harness (Hydra, W&B, datasets, torchvision, timm, experiments/); its wheel
puts metaopt alone into site-packages. The repository's own install (`make install`) adds the harness."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
    # the one extra is the tests' packages; the harness's are in requirements/experiments.txt, not on PyPI's page
    assert set(project["optional-dependencies"]) == {"dev"}
    assert project["name"] == "metaoptimize"  # "metaopt" on PyPI is an unrelated 2014 project


def build_wheel(tmp_path: Path) -> Path:
    """The library's wheel, built offline from a copy of the files it is made of (no build/ in the clone)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "metaopt", source / "metaopt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)],
                   cwd=tmp_path, check=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    return wheel


def test_the_wheel_holds_metaopt_alone(tmp_path):
    wheel = build_wheel(tmp_path)
    assert wheel.name == "metaoptimize-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_bytes(archive.read("metaoptimize-0.1.0.dist-info/METADATA"))
    assert {name.split("/")[0] for name in names} == {"metaopt", "metaoptimize-0.1.0.dist-info"}
    assert {"metaopt/__init__.py", "metaopt/py.typed", "metaoptimize-0.1.0.dist-info/licenses/LICENSE"} <= set(names)
    # torch, and the tests' packages under the dev extra
    assert [requirement for requirement in metadata.get_all("Requires-Dist") if "extra ==" not in requirement] \
        == ["torch>=2.6"]
    assert metadata["Name"] == "metaoptimize"


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_steps_outside_the_clone(tmp_path):
    """pip install of the wheel (and torch 2.14.1, which pip takes from its cache: 40-60 s and 5.4 GB
    on the development machine) into a new venv; a MetaOptimize step run from a directory outside the clone."""
    wheel = build_wheel(tmp_path)
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], cwd=elsewhere, check=True, timeout=300)
        python = venv / "bin" / "python"
        subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel), "torch==2.14.1"], cwd=elsewhere,
                       check=True, timeout=1200)
        print(f"venv and install: {time.monotonic() - start:.0f} s")
        site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                            cwd=elsewhere, capture_output=True, text=True, check=True).stdout.strip())
        assert site_packages.is_relative_to(venv)
        assert (site_packages / "metaopt" / "py.typed").is_file()
        assert not (site_packages / "experiments").exists() and not (site_packages / "hydra_plugins").exists()
        installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], cwd=elsewhere,
                                   capture_output=True, text=True, check=True).stdout.lower()
        assert "metaoptimize==0.1.0" in installed.split()
        assert not {"hydra-core", "omegaconf", "wandb", "torchvision"} & {line.split("==")[0] for line in installed.split()}
        # the step, and the harness's modules nowhere to be imported, from outside the clone
        step = subprocess.run([python, "-c", STEP], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                              check=True)
        assert step.stdout.split() == []
        where = subprocess.run([python, "-c", "import importlib.util as u, metaopt; print(metaopt.__file__); print("
                                "[u.find_spec(name) is None for name in ('experiments', 'hydra_plugins', 'hydra')])"],
                               cwd=elsewhere, capture_output=True, text=True, timeout=300, check=True).stdout.split("\n")
        assert Path(where[0]).is_relative_to(site_packages)
        assert where[1] == "[True, True, True]"
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # 5.4 GB; pytest keeps the last runs' tmp_path


def test_the_repository_venv_imports_the_harness_from_anywhere(tmp_path):
    """`make install`'s .venv: experiments and the sweeper plugin from any directory (scripts, submitit jobs)."""
    discovered = subprocess.run(
        [sys.executable, "-c", "import experiments.train\n"
         "from hydra.core.plugins import Plugins\nfrom hydra.plugins.sweeper import Sweeper\n"
         "print(' '.join(plugin.__name__ for plugin in Plugins.instance().discover(Sweeper)))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True)
    assert "GridsSweeper" in discovered.stdout.split()
