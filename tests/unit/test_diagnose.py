"""Curve diagnoses on synthetic histories: each one fires on its own pathology, and a healthy curve gives none."""

import base64
import json
import math

import pytest

from flows.cli import main
from tasks.train.diagnose import diagnose_history, diagnosis_markdown, diagnosis_tags, write_diagnoses


def history(train: list[float], evals: dict[int, float] | None = None, every: int = 5) -> list[dict]:
    """Return a trainer-style log history: a train record every `every` steps, eval records at the given steps."""
    records = [{"loss": v, "grad_norm": 1.0, "learning_rate": 1e-3, "step": (i + 1) * every}
               for i, v in enumerate(train)]
    records += [{"eval_loss": v, "step": s} for s, v in (evals or {}).items()]
    records.sort(key=lambda r: (r["step"], "eval_loss" in r))
    records.append({"train_runtime": 12.0, "train_loss": sum(train) / len(train), "step": len(train) * every})
    return records


HEALTHY_TRAIN = [2.5, 2.0, 1.6, 1.3, 1.1, 0.95, 0.85, 0.8, 0.76, 0.74]
HEALTHY_EVALS = {10: 2.1, 25: 1.2, 40: 0.95, 50: 0.9}


def names(records: list[dict]) -> list[str]:
    return [d["name"] for d in diagnose_history(records)]


def test_a_healthy_curve_gets_no_diagnosis_with_or_without_evals():
    assert diagnose_history(history(HEALTHY_TRAIN, HEALTHY_EVALS)) == []
    assert diagnose_history(history(HEALTHY_TRAIN)) == []


def test_eval_loss_rising_while_train_loss_falls_is_overfitting_from_the_best_eval():
    (found,) = diagnose_history(history(HEALTHY_TRAIN, {10: 2.1, 25: 1.0, 40: 1.15, 50: 1.3}))
    assert (found["name"], found["step"]) == ("overfitting", 25)
    assert "1.0000 -> 1.3000 (+30%)" in found["message"]


def test_a_small_eval_wobble_or_an_eval_rise_with_train_rising_too_is_not_overfitting():
    assert names(history(HEALTHY_TRAIN, {10: 2.1, 25: 1.0, 40: 1.05, 50: 1.08})) == []  # +8%: under 10%
    rising_train = [2.5, 2.0, 1.6, 1.3, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]
    assert "overfitting" not in names(history(rising_train, {10: 2.1, 25: 1.0, 40: 1.15, 50: 1.3}))


def test_a_flat_train_loss_is_underfitting():
    (found,) = diagnose_history(history([2.5, 2.45, 2.48, 2.4, 2.42, 2.39, 2.41, 2.38]))
    assert (found["name"], found["step"]) == ("underfitting", 40)
    # the same shape with a 10%+ drop is fine
    assert names(history([2.5, 2.45, 2.4, 2.3, 2.2, 2.1, 2.05, 2.0])) == []


def test_a_train_loss_near_zero_without_a_held_out_loss_as_low_is_memorisation():
    near_zero = [2.0, 1.0, 0.4, 0.1, 0.03, 0.01, 0.006, 0.004, 0.003, 0.002]
    (found,) = diagnose_history(history(near_zero))
    assert found["name"] == "memorisation" and "no held-out loss" in found["message"]
    assert names(history(near_zero, {25: 0.8, 50: 0.6})) == ["memorisation"]
    assert names(history(near_zero, {25: 0.05, 50: 0.005})) == []  # held-out rows are learned as well: generalises


def test_a_train_loss_far_below_the_eval_loss_is_memorisation():
    (found,) = diagnose_history(history(HEALTHY_TRAIN[:8] + [0.3, 0.25], {10: 2.1, 25: 1.5, 40: 1.45, 50: 1.45}))
    assert (found["name"], found["step"]) == ("memorisation", 50) and "far below" in found["message"]


def test_a_loss_jump_well_above_the_recent_median_is_a_spike_named_by_step():
    spiky = HEALTHY_TRAIN[:6] + [3.0] + HEALTHY_TRAIN[7:]
    (found,) = diagnose_history(history(spiky))
    assert (found["name"], found["step"]) == ("spikes", 35)
    # a tiny loss doubling is noise, not a spike
    small = [2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.04, 0.09, 0.04, 0.035]
    assert "spikes" not in names(history(small, {50: 0.04}))


def test_a_nan_or_inf_loss_or_a_stop_for_one_is_non_finite_at_its_step():
    (found,) = [d for d in diagnose_history(history(HEALTHY_TRAIN[:3] + [math.nan, 1.0])) if d["name"] == "non_finite"]
    assert found["step"] == 20 and "loss is nan" in found["message"]
    records = history(HEALTHY_TRAIN[:3]) + [{"step": 17, "diverged": "the trainable weights became nan/inf"}]
    assert diagnose_history(records)[0] == {"name": "non_finite", "step": 17,
                                            "message": "training stopped: the trainable weights became nan/inf"}
    grad = history(HEALTHY_TRAIN)
    grad[2]["grad_norm"] = math.inf
    assert names(grad) == ["non_finite"]


def test_diagnoses_are_written_with_a_curve_image_tags_and_a_self_contained_markdown(tmp_path):
    (tmp_path / "log_history.json").write_text(json.dumps(history(HEALTHY_TRAIN, {10: 2.1, 25: 1.0, 40: 1.15,
                                                                                   50: 1.3})))
    diagnoses, json_path, image = write_diagnoses(tmp_path)
    assert json.loads(json_path.read_text()) == diagnoses and [d["name"] for d in diagnoses] == ["overfitting"]
    assert image == tmp_path / "loss_curve.png" and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert diagnosis_tags(diagnoses) == {"diagnoses": "overfitting", "diagnosis.overfitting": diagnoses[0]["message"]}
    assert diagnosis_tags([]) == {"diagnoses": "none"}
    markdown = diagnosis_markdown("r1", diagnoses, image)
    assert "| overfitting | 25 |" in markdown
    embedded = markdown.split("data:image/png;base64,")[1].rstrip(")")
    assert base64.b64decode(embedded) == image.read_bytes()


def test_sftflow_diagnose_reports_a_saved_run_and_names_a_missing_history(tmp_path, capsys):
    train = tmp_path / "r1" / "train"
    train.mkdir(parents=True)
    (train / "log_history.json").write_text(json.dumps(history([2.5, 2.45, 2.48, 2.4, 2.42, 2.39, 2.41, 2.38])))
    assert main(["diagnose", "--run", "r1", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "run r1: 1 diagnosis" and out[1].startswith("underfitting (step 40): train loss went "
                                                                 "2.5000 -> 2.3800")
    assert json.loads((train / "diagnoses.json").read_text())[0]["name"] == "underfitting"
    assert (train / "loss_curve.png").is_file()
    assert main(["diagnose", "--run", "nope", "--runs-dir", str(tmp_path)]) == 2
    assert "no training history (has run nope trained?)" in capsys.readouterr().err


@pytest.mark.parametrize("train", [[1.0], [2.0, 1.5]])
def test_too_few_points_to_judge_a_trend_give_no_trend_diagnosis(train):
    assert names(history(train)) == []
