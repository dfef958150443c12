"""Training checkpoints: writing, verifying and resuming them.

A checkpoint holds the whole state of a run (weights, EMA, Adam, counters, every rank's RNG states,
the pool position, the options and the network constructor kwargs), so an interrupted run continues
with bit-identical weights. Each is written atomically and carries a SHA-256 of its contents, so a
damaged file is refused by name rather than trained on. Resuming compares every option but
`MAY_CHANGE_ON_RESUME`.
"""

import hashlib
import json
import re
import sys
from pathlib import Path

import torch

from aot_model import distributed
from aot_model.files import DamagedFileError, atomic_path, atomic_write, load_torch_file
from aot_model.networks import EDMPrecond

CHECKPOINT_PATTERN = re.compile(r"^training-state-(\d{9,})\.pt$")
STATS_FILE = "stats.jsonl"
# 2: options recorded from `training.TrainOptions` (class + kwargs pieces); 1: flat options. A
# format 1 checkpoint still loads (its weights sample and import alike) but cannot be resumed.
FORMAT_VERSION = 2
# Options that may change when a run resumes: the schedule and speed or rounding knobs, not the
# recipe; nor the pairing's solver (every solver finds the same optimum).
MAY_CHANGE_ON_RESUME = (
    "duration_kimg", "tick_kimg", "snapshot_ticks", "keep_snapshots", "prefetch", "precision",
    "channels_last", "compile", "tf32",
)  # fmt: skip
_CHECKPOINT_KEYS = (
    "net", "ema", "optimizer", "step", "cur_nimg", "cur_tick", "pool", "rng", "options",
    "network_kwargs",
)  # fmt: skip


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """``training-state-<nimg>.pt`` files in ``run_dir``, oldest (fewest images seen) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in run_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint with ``torch.load(weights_only=True)``: a dict of net, ema,
    optimizer (state dicts); step, cur_nimg, cur_tick (int); pool ({pool_index, offset}); rng (one
    dict per rank); options (dict of every training option); network_kwargs (EDMPrecond
    constructor kwargs); format (int)."""
    remedy = "use another checkpoint or restore this one from a backup"
    state = load_torch_file(
        path, what="training checkpoint", remedy=remedy, map_location=map_location
    )
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT_VERSION):
        raise DamagedFileError(
            f"{path} is not a training checkpoint of format 1 or {FORMAT_VERSION}"
        )
    missing = sorted(set(_CHECKPOINT_KEYS) - set(state))
    if missing:
        raise DamagedFileError(f"{path} lacks {missing}, so it is not a whole checkpoint; {remedy}")
    stored = state.pop("sha256", None)
    if stored is not None and stored != _state_digest(state):
        raise DamagedFileError(
            f"{path} is damaged: its contents no longer match the checksum stored in it; {remedy}"
        )
    return state


def _state_digest(state) -> str:
    """SHA-256 over every tensor's bytes and every other value's repr, in key order.

    Stored in each checkpoint: torch.load accepts a checkpoint with a changed byte inside a tensor,
    this does not.
    """
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, list | tuple):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    feed(state)
    return digest.hexdigest()


def build_network_from_checkpoint(
    path: str | Path, ema: bool = True, device: str | torch.device = "cpu"
) -> EDMPrecond:
    """Rebuild the trained denoiser from a ``training-state-*.pt`` file alone, in eval mode without
    gradients: its EMA weights (what EDM samples from), or its raw training weights if not ``ema``.
    """
    state = load_checkpoint(path)
    net = EDMPrecond(**state["network_kwargs"])
    net.load_state_dict(state["ema" if ema else "net"])
    return net.eval().requires_grad_(False).to(device)


def checkpoint_path(run_dir: Path, cur_nimg: int) -> Path:
    """``run_dir/training-state-<cur_nimg:09d>.pt``: unique per snapshot, sorts by images seen."""
    return run_dir / f"training-state-{cur_nimg:09d}.pt"


def save_checkpoint(path: Path, state: dict, keep: int) -> None:
    """Write a checkpoint atomically, then delete all but the newest ``keep`` in its directory.

    The state carries its own digest (`_state_digest`). A failed write (a full disk) leaves every
    existing checkpoint as it was and raises OSError naming the file and the newest one kept.
    """
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            _torch_save(state | {"sha256": _state_digest(state)}, f)
    except OSError as error:
        kept = find_checkpoints(path.parent)
        raise OSError(
            error.errno,
            f"could not write checkpoint {path} ({error.strerror or error}); nothing was "
            f"overwritten, the newest checkpoint is {kept[-1] if kept else 'none'}; free space "
            "and resume the run",
        ) from None
    for old in find_checkpoints(path.parent)[:-keep]:
        old.unlink()


def _torch_save(obj, file) -> None:
    """``torch.save`` to a binary file; a failed write (a full disk) raises its own OSError.

    Torch's zip writer turns a write error into ``RuntimeError: unexpected pos``, which says
    nothing about the disk; the OSError it hides is that RuntimeError's context.
    """
    try:
        torch.save(obj, file)
    except RuntimeError as error:
        if not isinstance(error.__context__, OSError):
            raise
        raise error.__context__ from None


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume from checkpoint state ``saved`` when an option of the run (``current``,
    recorded as the loop records them) differs beyond `MAY_CHANGE_ON_RESUME`, listing each one."""
    if saved["format"] != FORMAT_VERSION:
        raise ValueError(
            f"cannot resume from {path}: an earlier version wrote it (checkpoint format "
            f"{saved['format']}); its weights sample and import, but train in a new run_dir"
        )

    def defining(options: dict) -> dict:
        pairing = options.get("pairing") and {**options["pairing"], "solver": None}
        return {k: v for k, v in options.items() if k not in MAY_CHANGE_ON_RESUME} | {
            "pairing": pairing
        }

    was, now = defining(saved["options"]), defining(current)
    diffs = [
        f"{key}: checkpoint {was.get(key)!r}, now {now.get(key)!r}"
        for key in sorted(was.keys() | now.keys())
        if was.get(key) != now.get(key)
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: it was trained with a different configuration:\n  "
            + "\n  ".join(diffs)
            + "\nrestore these options or start a new run_dir"
        )


def resume_state(run_dir: Path, resume, rank: int) -> tuple[Path | None, dict | None]:
    """(checkpoint path, its state) to start from, or (None, None) for a fresh run.

    A fresh run is refused where it would overwrite one. ``"auto"`` takes the newest intact
    checkpoint: damaged newer ones are renamed ``*.damaged`` (kept, never deleted, and out of the
    way of the snapshot that will be written under the same name) and the fallback is reported;
    when none is intact, nothing is touched and `DamagedFileError` lists them.
    """
    if resume is None:
        if find_checkpoints(run_dir) or (run_dir / STATS_FILE).exists():
            raise ValueError(
                f"run_dir {run_dir} already holds a run (checkpoints or {STATS_FILE}); resume "
                "it, or choose another run_dir"
            )
        return None, None
    if resume != "auto":
        if not Path(resume).is_file():
            raise ValueError(
                f"resume must be None, 'auto' or an existing checkpoint file, got {resume!r}"
            )
        return Path(resume), load_checkpoint(resume)
    damaged = []
    for path in reversed(find_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except DamagedFileError as error:
            damaged.append((path, error))
            continue
        if damaged:
            # Every rank read the same files: the renames wait until all have finished reading
            # and are done before any rank goes on (nothing reads a file as it moves).
            distributed.barrier()
            if rank == 0:
                for bad, error in damaged:
                    bad.rename(bad.with_name(bad.name + ".damaged"))
                    print(f"warning: {error}; kept as {bad.name}.damaged", file=sys.stderr)
            distributed.barrier()
        return path, state
    if damaged:
        names = ", ".join(path.name for path, _ in damaged)
        raise DamagedFileError(
            f"no intact checkpoint to resume in {run_dir}: {names} all failed to load (newest: "
            f"{damaged[0][1]}); they were left as they are; restore one from a backup or start "
            "another run_dir"
        )
    return None, None


def last_tick(run_dir: Path) -> dict:
    """The last metrics line of ``stats.jsonl`` (after `drop_unsaved_progress`), or {} if none."""
    path = run_dir / STATS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def drop_unsaved_progress(run_dir: Path, step: int) -> None:
    """Remove what a run that died after its checkpoint at ``step`` left behind: half-written
    checkpoint files and the stats lines of later steps (a line cut short included)."""
    for leftover in run_dir.glob(".training-state-*.tmp"):
        leftover.unlink()
    path = run_dir / STATS_FILE
    if not path.exists():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except ValueError:  # a line cut short by a crash
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        atomic_write(path, lambda f: f.write("".join(kept).encode()))
