"""Per-peer checkpoints: every round's state on disk, written atomically, and the resume point.

A checkpoint or progress file that cannot be used on resume (empty, truncated, garbage, another
model's) is a :class:`~dimat.files.BadFileError` naming the file: one error line, exit code 2.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from dimat.atomic import atomic_write
from dimat.files import BadFileError, describe
from dimat.metrics import write_text_atomic
from dimat.methods import Method
from dimat.peer import Peer


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`dimat.atomic.atomic_write`: never a half-written checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


class Checkpointer:
    """Per-peer, per-round checkpoints under ``<run>/checkpoints/peer_XXX/round_XXXX.pt``.

    ``progress[_tag].json`` records the last round whose checkpoints are *all* on disk; it is
    written last, so a crash mid-round resumes from the previous finished round.
    """

    def __init__(self, run_dir: Path, keep_last: int | None = None, tag: str | None = None) -> None:
        """``keep_last``: rounds kept per peer when saving (``checkpoint.keep_last``); None keeps all."""
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = None if keep_last is None else max(int(keep_last), 1)
        self.progress = self.root / (f"progress_{tag}.json" if tag else "progress.json")

    def path(self, peer_id: int, round_idx: int) -> Path:
        return self.root / f"peer_{peer_id:03d}" / f"round_{round_idx:04d}.pt"

    def save(self, round_idx: int, peers: Mapping[int, Peer], method: Method | None = None) -> None:
        """Write every peer's checkpoint of ``round_idx`` (with ``method``'s per-peer state), then the progress marker."""
        for pid, peer in peers.items():
            ckpt = peer.checkpoint()
            if method is not None:
                ckpt["method"] = method.checkpoint(peer)
            ckpt["round"] = round_idx
            ckpt["torch_rng"] = torch.get_rng_state()
            atomic_torch_save(ckpt, self.path(pid, round_idx))
        write_text_atomic(self.progress, json.dumps({"last_round": round_idx, "peers": sorted(peers)}))
        for pid in peers if self.keep_last is not None else ():
            for old in sorted(self.path(pid, 0).parent.glob("round_*.pt"))[: -self.keep_last]:
                old.unlink(missing_ok=True)

    def last_round(self) -> int | None:
        """The last round recorded in the progress file; None without one."""
        if not self.progress.exists():
            return None
        try:
            data = json.loads(self.progress.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise BadFileError(self.progress, f"not a readable progress file ({describe(exc)})") from None
        last = data.get("last_round") if isinstance(data, dict) else None
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise BadFileError(self.progress, f"expected {{\"last_round\": <round >= 0>, ...}}, found {str(data)[:80]}")
        return last

    def remove_partial_writes(self, peers: Mapping[int, Peer]) -> int:
        """Delete temporary files a killed process left mid-write (they were never renamed into place)."""
        removed = 0
        for pid in peers:
            for tmp in self.path(pid, 0).parent.glob(".round_*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def restore(self, round_idx: int, peers: Mapping[int, Peer], method: Method | None = None) -> None:
        self.remove_partial_writes(peers)
        rng = None
        for pid, peer in peers.items():
            p = self.path(pid, round_idx)
            if not p.exists():
                raise FileNotFoundError(f"checkpoint {p} is missing; cannot resume round {round_idx}")
            try:
                ckpt = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # empty, truncated, garbage, or objects weights_only refuses
                raise BadFileError(p, f"not a readable checkpoint ({describe(exc)})") from None
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("round"), int):
                raise BadFileError(p, f"not a dimat checkpoint (no round number; found {type(ckpt).__name__})")
            if ckpt["round"] != round_idx:
                raise BadFileError(p, f"checkpoint is for round {ckpt['round']}, expected {round_idx}")
            try:
                peer.restore(ckpt)
                if method is not None:
                    method.restore(peer, ckpt.get("method") or {})
            except Exception as exc:  # missing keys, another model's shapes
                raise BadFileError(p, f"does not fit peer {pid} ({describe(exc)})") from None
            rng = ckpt.get("torch_rng", rng)
        if rng is not None:
            torch.set_rng_state(rng)
