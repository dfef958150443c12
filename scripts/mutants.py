"""Mutation testing of the core modules with mutmut 3 (``make mutants``; not part of CI).

Each module is mutated on its own, in a scratch copy of the repository under ``.mutants/<module>``,
against a fast test selection (the tests that guard it, without slow/integration ones). mutmut
reads one configuration per directory, so this script writes a ``setup.cfg`` per module there.
Results (killed / survived / timeout / ... per module) print at the end and go to
``.mutants/summary.json``; docs/mutation.md records a run and classifies the survivors.

    python scripts/mutants.py                 # every module
    python scripts/mutants.py loss sampling   # some
    python scripts/mutants.py --jobs 2 loss   # mutmut's --max-children
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".mutants"
FAST = "not slow and not integration"

# module -> the tests that guard it (mutmut runs, per mutant, those of them that reach the mutated
# function).
SELECTION = {
    "loss": ["tests/test_loss.py"],
    "sampling": ["tests/test_sampling.py"],
    "metrics": ["tests/test_metrics.py"],
    "pairing": ["tests/test_pairing.py"],
    "sweep": ["tests/test_sweep.py"],
    "networks": ["tests/test_networks.py", "tests/test_network_regression.py"],
    "training": [
        "tests/test_training.py",
        "tests/test_training_helpers.py",
        "tests/test_checkpoints.py",
    ],
    "checkpoints": [
        "tests/test_checkpoints.py",
        "tests/test_training.py",
        "tests/test_training_helpers.py",
    ],
}


def run_module(module: str, jobs: int) -> dict:
    """Mutate ``aot_model/<module>.py`` in a scratch copy; return mutmut's counts."""
    work = SCRATCH / module
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("aot_model", "tests"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    # mutmut prefers [tool.mutmut] in pyproject.toml; the copy has none, so setup.cfg rules.
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    selection = "\n    ".join([*SELECTION[module], "-m", FAST, "-p", "no:cacheprovider"])
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths = aot_model\n"
        f"only_mutate = aot_model/{module}.py\n"
        f"pytest_add_cli_args_test_selection =\n    {selection}\n"
    )
    mutmut = Path(sys.executable).with_name("mutmut")
    subprocess.run([str(mutmut), "run", "--max-children", str(jobs)], cwd=work, check=False)
    results = subprocess.run(
        [str(mutmut), "results", "--all", "true"],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    counts: dict[str, int] = {}
    survivors = []
    for line in results.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            counts[status] = counts.get(status, 0) + 1
            if status == "survived":
                survivors.append(name)
    killed, total = counts.get("killed", 0), sum(counts.values())
    return {
        "counts": counts,
        "kill_rate": killed / total if total else None,
        "survivors": survivors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Checked below, not with choices=: argparse refuses an empty list (no modules) against them.
    parser.add_argument("modules", nargs="*", help=f"some of {', '.join(SELECTION)} (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel mutants (mutmut)")
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(SELECTION))
    if unknown:
        parser.error(f"modules must be among {list(SELECTION)}, got {unknown}")
    summary_path = SCRATCH / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for module in args.modules or list(SELECTION):
        summary[module] = run_module(module, args.jobs)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    for module, result in summary.items():
        print(f"{module:10s} kill rate {result['kill_rate']}  {result['counts']}")


if __name__ == "__main__":
    main()
