"""Mutation testing of the pure and near-pure modules with mutmut; not part of CI.

Each target is one module (or some functions of it) and the fast tests that
should catch a change to it. Targets run one at a time, each with one mutmut
worker, in its own copy of the tree under .mutants/NAME (kept, so that
``cd .mutants/NAME && ../../.venv/bin/mutmut show MUTANT`` shows a survivor).
A new target is one entry in TARGETS.

Prints, per target, how many mutants were killed and how many survived, the
surviving rate, and each survivor's name; exits 1 if a rate is at or above
--goal (10% by default).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = ROOT / ".venv/bin/mutmut"


@dataclass(frozen=True)
class Target:
    module: str  # the file to mutate
    tests: tuple[str, ...]  # the test files (pytest selections) that run against each mutant
    # mutmut mutant-name globs: only these functions; () for the whole module.
    functions: tuple[str, ...] = ()


TARGETS = {
    "conf": Target("imageprov/mender/conf.py", ("tests/test_menderconf.py",)),
    "mbr": Target("imageprov/disk/mbr.py", ("tests/test_table_bytes.py",)),
    "gpt": Target("imageprov/disk/gpt.py", ("tests/test_table_bytes.py",)),
    "layout": Target("imageprov/disk/layout.py", ("tests/test_layout_roles.py",)),
    "bmap": Target("imageprov/disk/bmap.py", ("tests/test_bmap_ranges.py",)),
    # The debugfs script builder: path checks, quoting, the write plan's commands.
    "debugfs-script": Target(
        "imageprov/disk/ext4.py",
        ("tests/test_debugfs_script.py",),
        (
            "imageprov.disk.ext4.x_fs_path__mutmut_*",
            "imageprov.disk.ext4.x__q__mutmut_*",
            "imageprov.disk.ext4.xǁWritePlanǁcommands__mutmut_*",
        ),
    ),
}


@dataclass(frozen=True)
class Result:
    name: str
    statuses: dict[str, str]  # mutant name -> mutmut's status

    @property
    def killed(self) -> int:
        return sum(s in ("killed", "timeout", "caught by type check") for s in self.statuses.values())

    @property
    def survivors(self) -> list[str]:
        return sorted(m for m, s in self.statuses.items() if s == "survived")

    @property
    def untested(self) -> list[str]:
        return sorted(m for m, s in self.statuses.items() if s == "no tests")

    @property
    def rate(self) -> float:
        judged = self.killed + len(self.survivors) + len(self.untested)
        return (len(self.survivors) + len(self.untested)) / judged if judged else 0.0


def run_target(name: str, target: Target) -> Result:
    work = ROOT / ".mutants" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "imageprov", work / "imageprov", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "fixtures", work / "fixtures")
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths=imageprov\n"
        f"only_mutate={target.module}\n"
        "also_copy=fixtures\n"
        "pytest_add_cli_args_test_selection=\n" + "".join(f"    {t}\n" for t in target.tests) +
        # One process per mutant run; no xdist, no cache written into the tree.
        "pytest_add_cli_args=\n    -p\n    no:xdist\n    -p\n    no:cacheprovider\n"
    )  # fmt: skip
    log = work / "mutmut.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [str(MUTMUT), "run", "--max-children", "1", *target.functions], cwd=work, stdout=out, stderr=out
        )
    if proc.returncode != 0:
        raise SystemExit(f"mutants: mutmut failed on {name} (exit {proc.returncode}); see {log}")
    listing = subprocess.run(
        [str(MUTMUT), "results", "--all", "true"], cwd=work, capture_output=True, text=True, check=True
    ).stdout
    prefix = target.module.removesuffix(".py").replace("/", ".") + "."
    statuses = {}
    for line in listing.splitlines():
        mutant, _, status = line.strip().rpartition(": ")
        if not mutant.startswith(prefix):
            continue
        if target.functions and not any(_glob(mutant, f) for f in target.functions):
            continue
        statuses[mutant] = status
    return Result(name, statuses)


def _glob(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "targets", nargs="*", metavar="TARGET", help=f"targets to run (default: all): {', '.join(TARGETS)}"
    )
    parser.add_argument("--goal", type=float, default=0.10, help="the surviving rate at or above which to fail")
    parser.add_argument("--json", action="store_true", help="print one JSON object per target")
    args = parser.parse_args()
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target {', '.join(unknown)} (have: {', '.join(TARGETS)})")
    if not MUTMUT.exists():
        parser.error("mutmut is not installed: scripts/setup --test installs it")
    failed = False
    for name in args.targets or list(TARGETS):
        result = run_target(name, TARGETS[name])
        failed |= result.rate >= args.goal
        if args.json:
            print(json.dumps({"target": name, "killed": result.killed, "survived": result.survivors,
                              "no_tests": result.untested, "surviving_rate": round(result.rate, 4)}))  # fmt: skip
        else:
            total = result.killed + len(result.survivors) + len(result.untested)
            print(f"{name}: {len(result.survivors) + len(result.untested)} of {total} mutants survived "
                  f"({result.rate:.1%}); killed {result.killed}")  # fmt: skip
            for mutant in result.survivors + result.untested:
                print(f"  survived: {mutant}" if mutant in result.survivors else f"  no tests: {mutant}")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
