"""The action probes' data: labelled train pairs with their codes (from the latent shards when this
checkpoint made them, encoded now otherwise), and the evaluated split's pairs, as ProbeSets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.errors import UserError
from evaluation.probes import ProbeSet, action_label, action_probes, move_label
from model.inference import CheckpointIdentity, autocast, codes_to_array
from pipeline.frames import to_model_input
from pipeline.pair_index import PreviousFrames, build_pair_index
from pipeline.png import decode_png
from pipeline.shards import LATENT_FORMAT, load_manifest, read_members, split_shards
from pipeline.stream import decode_codes


def read_metas(entries: Sequence[dict]) -> dict[str, dict]:
    """key -> the pair's json, for every pair of the shards (`split_shards` entries)."""
    return {key: json.loads(m["json"]) for key, m in read_members(entries, ("json",)).items()}


def latent_codes(latent_dir: Path | None, identity: CheckpointIdentity, keys: set[str]) -> dict[str, np.ndarray] | None:
    """Codes of `keys` from the train split's latent shards, if they were made by this checkpoint."""
    if latent_dir is None or not (latent_dir / "manifest.json").is_file():
        return None
    manifest = load_manifest(latent_dir, LATENT_FORMAT)
    if manifest.get("checkpoint", {}).get("sha256") != identity.sha256 or "train" not in manifest["splits"]:
        return None
    entries = split_shards(latent_dir, manifest, "train")
    members = read_members(entries, ("codes.npy",), keys)
    size, dtype = manifest["checkpoint"].get("codebook_size"), manifest.get("code_dtype")
    codes = {}
    for key, m in members.items():
        try:                                     # the stream's check: stored type, every code in the codebook
            codes[key] = decode_codes(m["codes.npy"], size, dtype).numpy()
        except ValueError as error:
            raise UserError(f"{latent_dir}: train sample {key}: {error}") from None
    return codes


def train_probe_set(shards: Path, manifest: dict, lam, identity: CheckpointIdentity, device: torch.device,
                    latent_dir: Path | None, limit: int, batch_size: int,
                    dtype: torch.dtype | None = None) -> tuple[ProbeSet, str] | None:
    """At most `limit` labelled train pairs (spread evenly over the split) for the probes, and where
    their codes came from (encoded now with autocast to `dtype`, None: fp32, where the latent shards
    are not this checkpoint's). None when the train split has no labels."""
    entries = split_shards(shards, manifest, "train")
    metas = read_metas(entries)
    chosen = [key for key, meta in metas.items() if move_label(meta) is not None or action_label(meta) is not None]
    if not chosen:
        return None
    chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, min(limit, len(chosen))).astype(int)]
    stored = latent_codes(latent_dir, identity, set(chosen))
    source = "latent shards" if stored is not None and len(stored) == len(chosen) else "encoded now"
    members = read_members(entries, ("cur.png", "next.png"), set(chosen))
    if source == "encoded now" and identity.context:          # frame t-1 sits in another pair's members
        previous = PreviousFrames(build_pair_index(shards, "train", manifest))
        for key in chosen:
            members[key]["prev.png"] = previous.png(key)[0]
        previous.close()
    gray = identity.color == "gray"

    def frames(keys: list[str], member: str) -> torch.Tensor:
        decoded = torch.stack([decode_png(members[key][member]) for key in keys])
        return to_model_input(decoded.to(device), grayscale=gray)

    def batches():
        for start in range(0, len(chosen), batch_size):
            keys = chosen[start:start + batch_size]
            cur, nxt = frames(keys, "cur.png"), frames(keys, "next.png")
            if source == "latent shards":
                codes = np.stack([stored[k] for k in keys])
            else:
                prev = frames(keys, "prev.png") if identity.context else None
                with torch.inference_mode(), autocast(device, dtype):
                    codes = codes_to_array(lam.encode(cur, nxt, prev), identity.codebook_size)
            yield codes, cur, nxt, [metas[k] for k in keys]

    return ProbeSet.collect(batches()), source


def actions_section(test: ProbeSet, train: tuple[ProbeSet, str] | None, codebook: np.ndarray, seed: int,
                    workers: int = 1) -> dict | None:
    """metrics.json's "actions": the probes fitted on `train`, scored on `test` (`workers` fits at once)."""
    if train is None:
        return None
    result = action_probes(train[0], test, codebook, seed, workers)
    return None if result is None else {**result, "train_codes_from": train[1]}
