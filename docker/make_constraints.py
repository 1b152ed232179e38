"""Writes docker/constraints.txt: the images' pinned dependencies, from the environment it runs in.

    .venv/bin/python docker/make_constraints.py            # (re)write docker/constraints.txt
    .venv/bin/python docker/make_constraints.py --check    # exit 1 if a pin is missing, stale or conflicting
    .venv/bin/python docker/make_constraints.py --sizes    # installed size of each image's packages

Every runtime dependency of the edge image (`pip install .`) and of the coordinator image
(`pip install '.[coordinator,csip]'`) is pinned at the version installed here, where the tests run, with
its dependencies for CPython 3.11 on linux/amd64 and linux/arm64. The build backend (pyproject's
[build-system]) is pinned in BUILD_PINS, which also overrides a runtime pin (setuptools, below).

--check does not compare versions with this environment (a fresh install may resolve newer ones): it
fails if pyproject.toml needs a distribution the file does not pin, if a pin no image needs is left,
or if a pin breaks a requirement of pyproject.toml or of another pinned distribution (as far as the
installed metadata tells: for distributions installed at their pinned version).
"""

from __future__ import annotations

import argparse
import marshal
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docker" / "constraints.txt"
IMAGES = {"edge": (), "coordinator": ("coordinator", "csip")}  # image: the extras it installs
PACKAGES = ("p2pdoe", "edge_agent", "dso_coordinator", "meter_sim")
# The build backend, not installed in .venv (pinned at the newest release that builds the project).
# setuptools is also a runtime dependency (osqp requires it): the images get this one, not the 65.x
# of .venv (CVE-2024-6345, CVE-2025-47273).
BUILD_PINS = {"setuptools": "84.2.1", "wheel": "0.48.0"}
TARGETS = [  # marker environments of the images: CPython 3.11, glibc Linux, amd64 and arm64
    {
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "python_version": "3.11",
        "python_full_version": "3.11.0",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": machine,
    }
    for machine in ("x86_64", "aarch64")
]


def roots(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return [Requirement(s) for s in specs]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for env in TARGETS for e in ({""} | extras))


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def closure(reqs: list[Requirement], pins: dict[str, str] | None = None) -> dict[str, list[Requirement]]:
    """Every distribution `reqs` need (canonical name: the requirements on it to check), following the
    installed metadata. With `pins`, a distribution installed at another version than its pin (a
    newer release on a fresh install) is still followed, so what it needs counts as needed, but its
    requirements are not checked against the pins: they are those of another version."""
    needed: dict[str, list[Requirement]] = {}
    extras_of: dict[str, set[str]] = {}
    todo = [(r, True) for r in reqs if _applies(r, set())]
    while todo:
        req, checked = todo.pop()
        name = canonicalize_name(req.name)
        needed.setdefault(name, [])
        if checked:
            needed[name].append(req)
        wanted = set(req.extras)
        if name in extras_of and wanted <= extras_of[name]:
            continue
        extras_of.setdefault(name, set()).update(wanted)
        dist = _installed(name)
        if dist is None:
            if pins is None:
                sys.exit(f"{req.name} is required but not installed here: install the project first")
            continue
        exact = checked and (pins is None or dist.version == pins.get(name))
        subs = [sub for sub in map(Requirement, dist.requires or []) if _applies(sub, extras_of[name])]
        todo += [(sub, exact) for sub in subs]
    return needed


def render() -> str:
    used: dict[str, list[str]] = {}
    for image, extras in IMAGES.items():
        for name in closure(roots(extras)):
            used.setdefault(name, []).append(image)
    for name in BUILD_PINS:
        used.setdefault(canonicalize_name(name), []).append("build")
    lines = [
        "# The images' pinned dependencies (pip install -c): CPython 3.11, linux/amd64 and linux/arm64.",
        "# Generated from the tested environment by docker/make_constraints.py: do not edit. After a",
        "# dependency changes, reinstall .venv and run .venv/bin/python docker/make_constraints.py.",
        "# The comment says which image needs each one; build: pyproject's [build-system].",
    ]
    for name in sorted(used):
        version = BUILD_PINS.get(name) or metadata.version(name)
        lines.append(f"{name}=={version}  # {', '.join(used[name])}")
    return "\n".join(lines) + "\n"


def read_pins() -> dict[str, str]:
    pins = {}
    for line in OUT.read_text(encoding="utf-8").splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, _, version = spec.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def check() -> list[str]:
    pins = read_pins()
    problems, needed = [], set(BUILD_PINS)
    for name, version in BUILD_PINS.items():
        if pins.get(name) != version:
            problems.append(f"{name} must be pinned at {version} (BUILD_PINS)")
    for image, extras in IMAGES.items():
        for name, reqs in closure(roots(extras), pins).items():
            needed.add(name)
            if name not in pins:
                problems.append(f"the {image} image needs {name}, which is not pinned")
                continue
            for req in reqs:
                if not req.specifier.contains(pins[name], prereleases=True):
                    problems.append(f"{name}=={pins[name]} breaks the requirement {req}")
    problems += [f"{name} is pinned but no image needs it" for name in sorted(set(pins) - needed)]
    return list(dict.fromkeys(problems))


def _pruned(image: str) -> list[str]:
    """The packages whose test suites the image's Dockerfile deletes after installing."""
    text = (ROOT / "docker" / f"{image}.Dockerfile").read_text(encoding="utf-8")
    return re.findall(r"site-packages/(\w+)", text)


def _size(dist: metadata.Distribution, pruned: list[str]) -> int:
    total = 0
    for f in dist.files or []:
        path = Path(str(dist.locate_file(f)))
        parts = Path(str(f)).parts
        if parts[0] in pruned and "tests" in parts[1:-1]:
            continue
        if path.is_file():
            total += path.stat().st_size
    return total


def _own_size() -> int:
    """The project's own packages as a wheel installs them: sources, data, and bytecode."""
    total = 0
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            total += path.stat().st_size
            if path.suffix == ".py":
                total += 16 + len(marshal.dumps(compile(path.read_bytes(), str(path), "exec")))
    return total


def sizes() -> str:
    rows = []
    own = _own_size()
    for image, extras in IMAGES.items():
        names = sorted(closure(roots(extras)))
        each = {n: _size(metadata.distribution(n), _pruned(image)) for n in names}
        total = sum(each.values()) + own
        top = ", ".join(f"{n} {each[n] / 1e6:.1f}" for n in sorted(each, key=each.get, reverse=True)[:5])
        rows.append(
            f"{image}: {total / 1e6:.1f} MB installed ({len(names)} distributions + p2pdoe "
            f"{own / 1e6:.1f} MB); largest (MB): {top}"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true", help="exit 1 if a pin is missing, stale or conflicting")
    what.add_argument(
        "--sizes", action="store_true", help="each image's installed packages, in MB (estimate)"
    )
    args = p.parse_args()
    if args.sizes:
        print(sizes())
        return 0
    if args.check:
        problems = check()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("fix: reinstall .venv, then .venv/bin/python docker/make_constraints.py", file=sys.stderr)
        return 1 if problems else 0
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
