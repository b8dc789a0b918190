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
    # Tests of those files left out (pytest --deselect node ids), each for a reason given where it is named.
    deselect: tuple[str, ...] = ()


# Left out of every target below, whatever they import: tests that run imageprov
# in a subprocess (the CLI, `edge serve`: test_edge_service, test_verify, most of
# test_pki, test_hardening), whose hits mutmut cannot see, so that they never run
# against a mutant and only slow the first, mapping run; and tests that need
# nginx, a Mender client or PostgreSQL (test_edge_e2e, test_edge_registry,
# test_registry_stations, test_hsm), which take minutes.


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
    # The edge's decisions (issue 20, item 3); its HTTP layer is mutated apart.
    "edge-checks": Target(
        "imageprov/edge/checks.py", ("tests/test_edge_checks.py", "tests/test_security_decisions.py")
    ),
    "revocation": Target(
        "imageprov/edge/revocation.py", ("tests/test_edge_checks.py", "tests/test_revocation_sources.py")
    ),
    # The service's decision path, in this process (tests/test_edge_decisions.py):
    # what is accepted, refused, cut off or answered 503. The rest of http.py is
    # plumbing (metrics, logging, start-up) that the subprocess tests cover.
    "edge-http": Target(
        "imageprov/edge/http.py",
        ("tests/test_edge_decisions.py",),
        tuple(
            f"imageprov.edge.http.x_{name}__mutmut_*"
            for name in ("_decide", "_standing", "_checked", "_answer", "check", "cut_off_revoked", "_cut")
        ),
    ),
    "standing": Target(
        "imageprov/edge/standing.py", ("tests/test_edge_decisions.py", "tests/test_revocation_sources.py")
    ),
    "identity": Target("imageprov/edge/identity.py", ("tests/test_edge_decisions.py",)),
    # What `verify` and `ca import` refuse, which the edge's checks also ask. Of
    # test_pki.py, the tests that call it in this process.
    "chain": Target(
        "imageprov/pki/chain.py",
        (
            "tests/test_security_decisions.py",
            "tests/test_edge_checks.py",
            "tests/test_revocation_sources.py",
            "tests/test_pki.py::test_chain_checks_are_openssls",
            "tests/test_pki.py::test_server_certificate_needs_a_ca_that_may_issue_them",
        ),
    ),
    # Flashing targets on loop devices (root, losetup): a second or two in all.
    # Left out: the CLI's refusals (imageprov flash in a subprocess), and the
    # system disk's, asked in a chrooted child where mutmut's own code is not.
    "blockdev": Target(
        "imageprov/disk/blockdev.py",
        ("tests/test_flash_safety.py", "tests/test_security_decisions.py"),
        deselect=(
            "tests/test_flash_safety.py::test_refuses_the_disk_holding_root",
            "tests/test_flash_safety.py::test_cli_refuses_mounted_partition_and_golden_loop_but_flashes_the_good_card",
            "tests/test_flash_safety.py::test_cli_refuses_a_plain_file_and_the_same_disk_twice",
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
        "".join(f"    --deselect\n    {t}\n" for t in target.deselect) +
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
