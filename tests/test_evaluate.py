"""Evaluation: code analysis helpers, and evaluate.py end to end (metrics.json schema, figures, report
wording, the side-by-side summary, clear errors). The metric functions are in test_metrics.py."""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from evaluation.code_analysis import cell_nmi, one_hot_codes, visible_effect
from evaluation.events import Elements
from pipeline.frames import to_model_input
from pipeline.shards import iter_samples, sha256_file


def test_code_analysis_helpers():
    codes = np.zeros((40, 7, 5), np.int64)
    labels = np.array(["left", "right"] * 20)
    codes[:, 3, 2] = np.where(labels == "left", 7, 9)        # one cell determines the event
    nmi = cell_nmi(codes, labels)
    assert nmi[3, 2] == pytest.approx(1.0) and nmi.sum() == pytest.approx(1.0)
    hot = one_hot_codes(codes[:2], 256)
    assert hot.shape == (2, 35 * 256) and hot.sum() == 70 and hot[0, 17 * 256 + 7] == 1
    assert visible_effect({"paddle_x": 10, "next_paddle_x": 12, "ball_x": None, "next_ball_x": None})
    assert visible_effect({"paddle_x": 10, "next_paddle_x": 10, "ball_x": None, "next_ball_x": 80})
    assert not visible_effect({"paddle_x": 10, "next_paddle_x": 10, "ball_x": 5, "next_ball_x": 9})


# ----------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def reports(pair_shards, tiny_checkpoint, latent_dir, tmp_path_factory):
    """val and test evaluated into one reports/ folder that already holds the other tools' outputs,
    as `make controller rollout eval` leaves it (a controller's and a rollout's metrics.json beside
    the splits'): val takes the probe's train codes from the latent shards, test (no latent shards
    given, a small probe) encodes them. Returns (root, stdout of each split)."""
    import play
    from control import train as control_train

    latent = latent_dir
    root = tmp_path_factory.mktemp("reports")
    assert control_train.main(["--latent", str(latent), "--out", str(root / "controller"), "--steps", "2",
                               "--batch-size", "4", "--shuffle-buffer", "8", "--channels", "4", "8", "8", "8", "8",
                               "--hidden", "16", "--eval-batch-size", "16", "--log-every", "1"]) == 0
    assert play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller",
                      str(root / "controller" / "controller.pt"), "--latent", str(latent), "--out", str(root / "play"),
                      "--horizon", "2", "--starts", "2", "--gifs", "0", "--control-starts", "2", "--control-steps", "2",
                      "--batch-size", "2"]) == 0
    printed = {}
    for split, extra in (("val", ["--latent", str(latent)]),
                         ("test", ["--latent", str(root / "no-latents"), "--probe-limit", "40"])):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = evaluate.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--split", split,
                                  "--out", str(root / split), "--batch-size", "32", "--backend", "torch",
                                  "--no-progress", *extra])
        assert code == 0
        printed[split] = stdout.getvalue()
    return root, printed


def test_metrics_json_follows_the_schema(reports, pair_shards, tiny_checkpoint):
    metrics = json.loads((reports[0] / "val" / "metrics.json").read_text())
    manifest = json.loads((pair_shards / "manifest.json").read_text())
    assert {"split", "pairs", "color", "checkpoint", "model", "copy_baseline", "delta_psnr", "codebook",
            "elements"} <= set(metrics)
    assert metrics["split"] == "val" and metrics["pairs"] == manifest["splits"]["val"]["pairs"]
    assert metrics["color"] == "gray"
    assert metrics["checkpoint"] == {"sha256": sha256_file(tiny_checkpoint), "step": 20}
    for name in ("model", "copy_baseline"):
        assert set(metrics[name]) == {"psnr", "ssim", "l1", "l2", "psnr_changed"}
        assert all(isinstance(v, float) for v in metrics[name].values())
    assert metrics["delta_psnr"] == pytest.approx(metrics["model"]["psnr"] - metrics["random_codes"]["psnr"])
    book = metrics["codebook"]
    assert len(book["counts"]) == 256 and sum(book["counts"]) == metrics["pairs"] * 35
    assert book["used_fraction"] == pytest.approx(sum(c > 0 for c in book["counts"]) / 256)
    assert set(metrics["elements"]) == {"ball", "paddle", "bricks"}
    assert set(metrics["elements"]["ball"]) == {"model", "copy_baseline"}
    actions = metrics["actions"]                       # the recorder's pairs carry action labels
    assert actions["train_codes_from"] == "latent shards"
    for target in ("move", "action"):
        probe = actions[target]
        assert 0 < probe["transitions"] <= metrics["pairs"] and probe["train_transitions"] > 0
        assert sum(probe["classes"].values()) == probe["transitions"]
        for name in ("codes_linear", "codes_mlp", "frame_t", "pixel_diff", "majority"):
            assert probe[name] is None or 0.0 <= probe[name] <= 1.0
    assert set(actions["move"]["classes"]) <= {"left", "none", "right"}
    assert actions["move"]["transitions"] > actions["action"]["transitions"]     # every labelled pair vs visible effect


def test_copy_baseline_matches_a_hand_computation(reports, pair_shards):
    """Copying frame t, scored straight from the PNGs: the whole-split MSE convention, end to end."""
    manifest = json.loads((pair_shards / "manifest.json").read_text())
    squared, pixels, changed_squared, changed = 0.0, 0, 0.0, 0
    for shard in manifest["splits"]["test"]["shards"]:
        for _, members in iter_samples(pair_shards / shard["file"], pair_shards / shard["index"]):
            cur, nxt = (to_model_input(torch.from_numpy(np.array(Image.open(io.BytesIO(members[m])).convert("RGB"))))
                        for m in ("cur.png", "next.png"))
            error = (cur - nxt).double().pow(2)
            squared, pixels = squared + float(error.sum()), pixels + error.numel()
            changed_squared, changed = changed_squared + float(error[cur != nxt].sum()), changed + int((cur != nxt).sum())
    metrics = json.loads((reports[0] / "test" / "metrics.json").read_text())
    assert metrics["copy_baseline"]["l2"] == pytest.approx(squared / pixels, rel=1e-5)
    assert metrics["copy_baseline"]["psnr"] == pytest.approx(10 * math.log10(pixels / squared), rel=1e-5)
    assert metrics["copy_baseline"]["psnr_changed"] == pytest.approx(10 * math.log10(changed / changed_squared), rel=1e-5)


def test_figures_and_report_are_written(reports):
    out = reports[0] / "val"
    for name in ("codebook_histogram", "code_tsne", "reconstructions", "codes_by_event"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        assert f"({name}.png)" in (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    # a 20-step model cannot beat copying frame t, and the report must say so in plain words
    assert metrics["model"]["psnr"] < metrics["copy_baseline"]["psnr"]
    assert "The model does not beat copying frame t" in report.split("##")[0]
    assert "## Actions" in report and "majority class" in report


def test_each_report_reads_only_evaluations_beside_it(reports):
    """reports/ also holds a rollout's and a controller's metrics.json (the normal case after
    `make controller rollout eval`): the evaluations ran, and their report and summary list the
    evaluated splits only (the rollout's metrics were read as a split's: KeyError 'pairs')."""
    root, _ = reports
    assert {path.parent.name for path in root.glob("*/metrics.json")} == {"controller", "play", "val", "test"}
    assert table_rows((root / "summary.md").read_text()) == ["val", "test"]
    side_by_side = (root / "test" / "report.md").read_text().split("## Splits side by side")[1]
    assert table_rows(side_by_side.split("\n\n", 2)[1]) == ["val", "test"]


def table_rows(markdown: str) -> list[str]:
    """The first column of a markdown table's body rows."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    return [row.split("|")[1].strip() for row in rows]


def test_summary_puts_splits_side_by_side(reports):
    summary = (reports[0] / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| val") or line.startswith("| test")]
    assert len(rows) == 2
    assert "Across splits the model's PSNR varies by" in summary
    assert "## Splits side by side" in (reports[0] / "test" / "report.md").read_text()


def test_prints_report_path_and_headline(reports):
    root, printed = reports
    assert f"report: {root / 'test' / 'report.md'}" in printed["test"]
    assert "PSNR" in printed["test"] and "copy frame t" in printed["test"] and "ΔPSNR" in printed["test"]
    actions = json.loads((root / "test" / "metrics.json").read_text())["actions"]
    assert actions["train_codes_from"] == "encoded now" and actions["move"]["train_transitions"] <= 40


@pytest.mark.parametrize("problem", ["no_checkpoint", "no_shards", "bad_split"])
def test_clear_errors(problem, pair_shards, tiny_checkpoint, tmp_path, capsys):
    args = {"--shards": str(pair_shards), "--checkpoint": str(tiny_checkpoint), "--split": "val"}
    if problem == "no_checkpoint":
        args["--checkpoint"] = str(tmp_path / "nope.pt")
    elif problem == "no_shards":
        args["--shards"] = str(tmp_path / "nowhere")
    else:
        args["--split"] = "dev"
    argv = [part for item in args.items() for part in item] + ["--out", str(tmp_path / "out"), "--no-progress"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and (err.startswith("error: ") and len(err.splitlines()) == 1 or "invalid choice" in err)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_probes_find_an_action_written_into_one_cell(monkeypatch):
    """A code grid that spells the move in one cell is read by both code probes; frame t, which
    holds nothing of it, is not; the pixel difference, which shows it, is."""
    from evaluation.probes import MOVES, ProbeSet, action_probes

    rng = np.random.default_rng(0)
    def probe_set(n):
        moves = rng.integers(0, 3, n)
        codes = rng.integers(0, 256, (n, 7, 5)).astype(np.uint8)
        codes[:, 6, 2] = moves * 50                                  # the paddle row's cell says it
        diff = rng.normal(0, 0.01, (n, 16)) + (moves - 1)[:, None] * 0.05
        metas = [{"paddle_x": 50, "next_paddle_x": 50 + 3 * (m - 1), "action": 0, "ball_x": 1, "next_ball_x": 1}
                 for m in moves]
        return ProbeSet(codes, rng.normal(size=(n, 16)), diff, metas)
    codebook = np.random.default_rng(1).normal(size=(256, 8)).astype(np.float32)
    train, test = probe_set(300), probe_set(200)
    probes = action_probes(train, test, codebook)
    move = probes["move"]
    assert set(move["classes"]) == set(MOVES)
    assert move["codes_linear"] > 0.95 and move["codes_mlp"] > 0.7 and move["pixel_diff"] > 0.95
    assert move["frame_t"] < 0.55 and move["majority"] < 0.5
    # the fits side by side in processes (here from any number of pairs) score exactly what one after
    # the other does
    monkeypatch.setattr("evaluation.probes.POOL_FROM_PAIRS", 0)
    assert action_probes(train, test, codebook, workers=2) == probes


def test_a_context_model_is_evaluated_with_frame_t_minus_1(pair_shards, context_checkpoint, tmp_path, monkeypatch):
    """evaluate.py gives a context model the loader's prev in every encode and decode, and the
    action probe's train pairs (encoded now) their frame t-1 read from the shards."""
    from model import LatentActionModel

    calls = {"encode_both": [], "decode": []}
    for name in calls:
        original = getattr(LatentActionModel, name)

        def recording(self, cur, second, prev=None, *rest, _original=original, _name=name):
            calls[_name].append(None if prev is None else bool((prev != cur).any()))
            return _original(self, cur, second, prev, *rest)

        monkeypatch.setattr(LatentActionModel, name, recording)
    metrics, _ = evaluate.evaluate(evaluate.EvaluateConfig(pair_shards, context_checkpoint, "val", tmp_path / "val",
                                                           batch_size=32, latent=None, probe_limit=40,
                                                           backend="torch", progress=False, amp="off"))
    manifest = json.loads((pair_shards / "manifest.json").read_text())
    assert metrics["pairs"] == manifest["splits"]["val"]["pairs"]
    assert metrics["actions"]["train_codes_from"] == "encoded now"
    val_batches = -(-metrics["pairs"] // 32)
    # lam.encode (the probe's train pairs) goes through encode_both too
    assert len(calls["encode_both"]) == val_batches + -(-40 // 32) and len(calls["decode"]) == 2 * val_batches
    assert None not in calls["encode_both"] + calls["decode"] and any(calls["encode_both"][val_batches:])


def test_the_pass_scores_what_one_thread_with_the_plain_model_does(pair_shards, tiny_checkpoint):
    """The pass with its speed-ups (the model channels_last in a thread of its own, the scoring
    beside it) against the loop written out in one thread with the model as loaded: the same codes,
    elements and examples, and the meters within float rounding."""
    from evaluation.metrics import ReconstructionMeter
    from evaluation.split_pass import Share, collect_elements, evaluate_pass, random_codes
    from model import load_checkpoint
    from model.inference import inference_layout
    from pipeline.loader import in_order_loader

    cpu = torch.device("cpu")
    pairs = json.loads((pair_shards / "manifest.json").read_text())["splits"]["val"]["pairs"]
    random = random_codes(pairs, 256, seed=0)
    loader = lambda: in_order_loader(pair_shards, "val", 16, grayscale=True, backend="torch", device=cpu)  # noqa: E731
    fast = evaluate_pass(loader(), inference_layout(load_checkpoint(tiny_checkpoint, cpu), cpu), cpu, first=0,
                         random=random, progress=False, model_threads=1)

    lam = load_checkpoint(tiny_checkpoint, cpu)
    meters = {name: ReconstructionMeter(cpu, ssim=name != "random") for name in ("model", "copy", "random")}
    share, position = Share(), 0
    for batch in loader():
        cur, nxt = batch["cur"], batch["next"]
        stop = position + len(cur)
        codes = lam.encode(cur, nxt)
        pred = lam.decode(cur, codes).clamp(0, 1)
        meters["model"].update(pred, nxt, cur)
        meters["copy"].update(cur, nxt, cur)
        meters["random"].update(lam.decode(cur, torch.from_numpy(random[position:stop])).clamp(0, 1), nxt, cur)
        share.keys += batch["key"]
        share.codes.append(codes.numpy().astype(np.uint8))
        collect_elements(share, position, cur.numpy(), nxt.numpy(), pred.numpy(), batch["key"])
        position = stop

    assert fast.share.keys == share.keys and np.array_equal(fast.share.all_codes(), share.all_codes())
    for mine, theirs in zip(fast.share.cur_elements + fast.share.next_elements, share.cur_elements + share.next_elements):
        assert np.array_equal(mine.bricks, theirs.bricks) and replace(mine, bricks=None) == replace(theirs, bricks=None)
    assert fast.share.model_elements.compute() == share.model_elements.compute()
    assert [e.key for e in fast.share.examples.examples()] == [e.key for e in share.examples.examples()]
    for name, meter in (("model", fast.model), ("copy", fast.copy), ("random", fast.random)):
        got, want = meter.compute(), meters[name].compute()
        assert got.keys() == want.keys(), name
        for key in want:
            assert got[key] == (None if want[key] is None else pytest.approx(want[key], rel=1e-5, abs=1e-7)), (name, key)
