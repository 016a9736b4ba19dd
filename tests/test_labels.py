"""Light supervision (training/labels.py, ModelConfig.action_classes): a fixed fraction of the train
pairs' recorded actions trains an action head on the codes; off by default."""
from __future__ import annotations

import json

import pytest
import torch

import train
from model import LatentActionModel, ModelConfig
from pipeline.pair_set import PairSet
from pipeline.shards import PAIRS_FORMAT, load_manifest, read_members, split_shards
from training.labels import NO_LABEL, ActionLabels, chosen

from test_train import error_line, rows, tiny_args


def train_metas(shards) -> dict[str, dict]:
    entries = split_shards(shards, load_manifest(shards, PAIRS_FORMAT), "train")
    return {key: json.loads(m["json"]) for key, m in read_members(entries, ("json",)).items()}


def test_the_labelled_pairs_are_a_fixed_fraction_with_their_recorded_actions(pair_shards):
    metas = train_metas(pair_shards)
    labels = ActionLabels.build(PairSet.open(pair_shards), 0.3, seed=0)
    assert labels.labels == ActionLabels.build(PairSet.open(pair_shards), 0.3, seed=0).labels          # the same every time
    assert labels.labels != ActionLabels.build(PairSet.open(pair_shards), 0.3, seed=1).labels          # another seed, others
    assert 0.15 < len(labels) / len(metas) < 0.45
    assert all(metas[key]["action"] == action for key, action in labels.labels.items())
    keys = sorted(metas)
    batch = labels(keys, torch.device("cpu"))
    assert [int(a) for a in batch] == [labels.labels.get(k, NO_LABEL) for k in keys]
    assert ActionLabels.build(PairSet.open(pair_shards), 0.0, seed=0) is None
    # the choice is per key: a bigger fraction keeps every pair a smaller one chose
    assert set(labels.labels) <= set(ActionLabels.build(PairSet.open(pair_shards), 0.6, seed=0).labels)
    assert chosen("00001_000003", 1.0, 0) and not chosen("00001_000003", 0.0, 0)


def test_the_action_loss_counts_labelled_pairs_only():
    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig(width=0.125, action_classes=4, action_weight=0.5)).eval()
    cur, nxt = torch.rand(3, 1, 210, 160), torch.rand(3, 1, 210, 160)
    none = model(cur, nxt, action=torch.full((3,), NO_LABEL))["action"]
    assert none.item() == 0
    one = model(cur, nxt, action=torch.tensor([2, NO_LABEL, NO_LABEL]))
    logits = model.action_head(model.quantizer(model.encoder(cur, nxt))[0].flatten(1))
    expected = 0.5 * torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2]))     # weighted
    torch.testing.assert_close(one["action"], expected)
    assert torch.isclose(one["loss"], one["recon"] + one["commitment"] + one["codebook"] + one["entropy"] + one["action"])
    assert float(LatentActionModel(ModelConfig(width=0.125))(cur, nxt, action=torch.tensor([2, 1, 0]))["action"]) == 0


def test_a_run_with_labels_trains_the_head_and_one_without_has_none(pair_shards, tmp_path):
    assert train.main(tiny_args(pair_shards, tmp_path / "with", 6, "--set", "action_fraction=1.0")) == 0
    logged = rows(tmp_path / "with" / "run")
    assert any(row["train/action"] > 0 for row in logged)
    state = torch.load(tmp_path / "with" / "ckpt" / "step-000006.pt", weights_only=True)
    assert state["config"]["model"]["action_classes"] == 4 and "action_head.weight" in state["model"]
    assert train.main(tiny_args(pair_shards, tmp_path / "without", 2)) == 0
    assert all(row["train/action"] == 0 for row in rows(tmp_path / "without" / "run"))


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_fraction_outside_zero_to_one_is_one_line(pair_shards, tmp_path, capsys, value):
    assert train.main(tiny_args(pair_shards, tmp_path, 2, "--set", f"action_fraction={value}")) == 2
    assert "action_fraction must be in [0, 1]" in error_line(capsys)
