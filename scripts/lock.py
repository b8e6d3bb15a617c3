"""Write constraints.txt, the lock: every third-party package of the venv at one version, with its hash.

pip resolves the version ranges of the distributions (libs/common, services/*, tools/devtools, tools/cli) and
requirements-dev.txt (``pip install --dry-run --report``), keeping the versions the lock already has
where they still fit (``--upgrade``: the newest ones). Each line names what needs the package, so an
image installs only its service's share. Run it as ``make lock``; it needs the package index.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

# The copy inside pip: there wherever pip is, which does the resolving (even before `make setup`).
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
DEV = ROOT / "requirements-dev.txt"
# The distributions of this repository, by the name the lock's lines use for them.
PROJECTS = {
    "common": ROOT / "libs" / "common",
    **{path.name: path for path in sorted((ROOT / "services").iterdir()) if (path / "pyproject.toml").exists()},
    "devtools": ROOT / "tools" / "devtools",
    "cli": ROOT / "tools" / "cli",
}
HEADER = """\
# The lock: every third-party package that `make setup` installs into .venv, at one exact
# version, with the sha256 of the file pip picks on this kind of machine (CI's and the images'
# too): {platform}.
# Written by scripts/lock.py (`make lock`, or `make lock UPGRADE=1` for the newest versions the
# ranges allow) from the version ranges in the pyproject.toml files and requirements-dev.txt:
# change those, then run it; never edit this file by hand.
# "for:" names what needs the package: common (libs/common), a service, devtools, cli (the zmta
# command), dev (requirements-dev.txt) or setup (pip, and setuptools to build the editable installs).
# Installed with hash checking: `pip install --require-hashes -r constraints.txt` in
# scripts/setup.sh; the Dockerfile takes the lines of its service.
"""


def requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def setup_requirements() -> list[Requirement]:
    """pip itself, and the build backend the editable installs are built with (no build isolation)."""
    wanted = {"pip": Requirement("pip")}
    for project in PROJECTS.values():
        for line in tomllib.loads((project / "pyproject.toml").read_text())["build-system"]["requires"]:
            requirement = Requirement(line)
            wanted[canonicalize_name(requirement.name)] = requirement
    return list(wanted.values())


def current_pins() -> str:
    """The lock's name==version lines without hashes: as pip constraints they keep those versions."""
    if not LOCK.exists():
        return ""
    lines = (line.split("#", 1)[0].split() for line in LOCK.read_text().splitlines())
    return "".join(f"{words[0]}\n" for words in lines if words)


def resolve(upgrade: bool) -> list[dict[str, Any]]:
    """What pip would install into an empty venv: its installation report's entries."""
    with tempfile.TemporaryDirectory() as tmp:
        pins, report = Path(tmp) / "pins.txt", Path(tmp) / "report.json"
        pins.write_text("" if upgrade else current_pins())
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        command += ["--report", str(report), "-c", str(pins), "-r", str(DEV)]
        command += [str(path) for path in PROJECTS.values()] + [str(r) for r in setup_requirements()]
        subprocess.run(command, check=True)
        entries: list[dict[str, Any]] = json.loads(report.read_text())["install"]
        return entries


def closure(roots: list[Requirement], requires: dict[str, list[str]]) -> set[str]:
    """The names of ``roots`` and of everything they need, with their extras, on this platform."""
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [(canonicalize_name(r.name), frozenset(r.extras)) for r in roots if not r.marker or r.marker.evaluate()]
    while stack:
        name, extras = stack.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in requires[name]:
            dep = Requirement(line)
            if dep.marker and not any(dep.marker.evaluate({"extra": extra}) for extra in extras | {""}):
                continue
            stack.append((canonicalize_name(dep.name), frozenset(dep.extras)))
    return {name for name, _ in seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="the newest versions the ranges allow")
    upgrade = parser.parse_args().upgrade
    entries = resolve(upgrade)
    requires: dict[str, list[str]] = {
        canonicalize_name(e["metadata"]["name"]): e["metadata"].get("requires_dist", []) for e in entries
    }
    local = {canonicalize_name(e["metadata"]["name"]) for e in entries if "dir_info" in e["download_info"]}
    roots = {tag: [Requirement(f"zmta-{tag}")] for tag in PROJECTS}
    roots |= {"dev": requirements(DEV), "setup": setup_requirements()}
    needed_by: dict[str, list[str]] = {}
    for tag, tops in sorted(roots.items()):
        for name in closure(tops, requires):
            needed_by.setdefault(name, []).append(tag)
    lines = []
    for entry in sorted(entries, key=lambda e: canonicalize_name(e["metadata"]["name"])):
        name = canonicalize_name(entry["metadata"]["name"])
        if name in local:
            continue
        digest = entry["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if not digest:
            sys.exit(f"lock: pip gave no sha256 for {name} ({entry['download_info'].get('url')})")
        version = entry["metadata"]["version"]
        lines.append(f"{name}=={version} --hash=sha256:{digest}  # for: {' '.join(needed_by[name])}\n")
    where = f"{platform.python_implementation()} {sys.version_info.major}.{sys.version_info.minor}"
    where += f" on {platform.machine()} {platform.system()}"
    LOCK.write_text(HEADER.format(platform=where) + "\n" + "".join(lines))
    print(f"lock: {len(lines)} packages in {LOCK.name}")


if __name__ == "__main__":
    main()
