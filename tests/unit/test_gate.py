"""The promotion gate as a pure decision over report.json: the paired bootstrap keeps noise from promoting, a missing
score is a refusal with its reason (never a crash), and a recorded champion score counts only under an equal
fingerprint."""

import pytest

from tasks.core.config import RegisterConfig
from tasks.registry.gate import GateDecision, bootstrap_lower_bound, decide_promotion, item_tags


def report(tuned: list[float], other: list[float], metric: str = "exact_match", against: str = "base",
           fingerprint: str = "set-1", loss_tokens: list[int] | None = None) -> dict:
    """A report whose tuned model and base (or champion v1) have these per-item scores on one held-out set."""
    mean = (lambda xs: sum(x * w for x, w in zip(xs, loss_tokens)) / sum(loss_tokens)) if loss_tokens else \
        (lambda xs: sum(xs) / len(xs))
    models = {"base": {metric: mean(other) if against == "base" else 9.0},
              "tuned": {metric: mean(tuned)}}
    items = {"base": {metric: other}, "tuned": {metric: tuned}}
    if against == "champion":
        models["champion"] = {metric: mean(other), "version": "1"}
        items["champion"] = {metric: other}
    return {"heldout_fingerprint": fingerprint, "models": models, "items": items, "item_tokens": loss_tokens}


def test_the_default_gate_runs_the_bootstrap_at_095():
    assert RegisterConfig().gate_confidence == 0.95 and RegisterConfig().gate_margin == 0.0


def test_one_differing_item_out_of_64_does_not_promote_at_margin_0_unless_the_bootstrap_is_off():
    base = [0.0] * 32 + [1.0] * 32
    tuned = [1.0] + base[1:]  # one item more right, none lost: a mean gain of 1/64
    noisy = decide_promotion(report(tuned, base), "exact_match", 0.0, None, confidence=0.95)
    assert not noisy.promoted and noisy.against == "base" and noisy.confidence == 0.95
    assert noisy.lower_bound == 0.0  # a third of the resamples do not draw the one item
    assert "inside the noise: the 0.95 paired-bootstrap lower bound of the gain over 64 items is +0" in noisy.reason
    assert decide_promotion(report(tuned, base), "exact_match", 0.0, None).promoted  # means only, as asked


def test_a_clear_win_passes_the_bootstrap_and_records_its_lower_bound():
    base = [0.0] * 40 + [1.0] * 24
    tuned = [1.0] * 12 + base[12:]  # twelve items won, none lost
    decision = decide_promotion(report(tuned, base, against="champion"), "exact_match", 0.05, ("1", {}), 0.95)
    assert decision.promoted and decision.against == "champion v1" and decision.lower_bound > 0.05
    assert decision.reason.startswith("exact_match 0.5625 beats champion v1's 0.375 by 0.1875 > margin 0.05; 0.95 "
                                      "paired-bootstrap lower bound")
    assert GateDecision.from_tags(decision.tags()) == decision  # recorded and read back whole


def test_three_items_won_and_none_lost_is_the_least_that_passes_at_095_with_64_items():
    base = [0.0] * 64
    lows = {k: bootstrap_lower_bound("exact_match", tuple([1.0] * k + [0.0] * (64 - k)), tuple(base), None, 0.95)
            for k in (1, 2, 3)}
    assert lows[1] == lows[2] == 0.0 < lows[3]


def test_wins_offset_by_losses_stay_inside_the_noise():
    base = [1.0, 0.0] * 32
    tuned = [0.0, 1.0] * 16 + [1.0, 1.0] * 3 + base[38:]  # 19 won, 16 lost: +3/64, not a win
    decision = decide_promotion(report(tuned, base), "exact_match", 0.0, None, 0.95)
    assert not decision.promoted and decision.lower_bound < 0


def test_an_eval_loss_gate_weighs_items_by_their_tokens_and_lower_is_better():
    tokens = [10, 200, 10, 10] * 8
    champion = [2.0, 2.0, 2.0, 2.0] * 8
    tuned = [1.5, 1.9, 1.5, 1.5] * 8  # lower on every item
    decision = decide_promotion(report(tuned, champion, "eval_loss", "champion", loss_tokens=tokens), "eval_loss",
                                0.01, ("1", {}), 0.95)
    assert decision.promoted and "(lower is better)" in decision.reason and decision.lower_bound > 0.01


def test_an_eval_loss_gate_against_a_champion_scored_without_loss_is_a_clear_refusal_not_a_crash():
    r = report([1.0] * 4, [1.0] * 4, "eval_loss", "champion", loss_tokens=[5] * 4)
    r["models"]["champion"]["eval_loss"] = None  # another vocabulary: evaluate scored it without loss
    del r["items"]["champion"]["eval_loss"]
    for confidence in (None, 0.95):
        decision = decide_promotion(r, "eval_loss", 0.0, ("1", {}), confidence)
        assert not decision.promoted and decision.against_score is None and decision.tuned == 1.0
        assert decision.reason.startswith("champion v1 was scored without eval_loss in this evaluate (its tokenizer's "
                                          "vocabulary differs") and "sftflow promote" in decision.reason
        assert GateDecision.from_tags(decision.tags()).against_score is None


def test_a_recorded_champion_score_counts_only_under_an_equal_fingerprint_with_its_items_for_the_bootstrap():
    r = report([1.0] * 8, [0.0] * 8, against="champion")  # evaluate scored v1; the champion is v2 now
    recorded = {"heldout_fingerprint": "set-1", "score.exact_match": "0.5", **item_tags(
        {"items": {"tuned": {"exact_match": [1.0, 0.0] * 4}}})}
    same = decide_promotion(r, "exact_match", 0.0, ("2", recorded), 0.95)
    assert same.promoted and same.against == "champion v2" and same.against_score == 0.5
    other_set = decide_promotion(r, "exact_match", 0.0, ("2", {**recorded, "heldout_fingerprint": "set-0"}), 0.95)
    assert not other_set.promoted and other_set.against_score is None
    assert "champion v2 has no exact_match on this held-out set under the same fingerprint" in other_set.reason
    assert "evaluate scored champion v1: the champion changed after evaluate ran" in other_set.reason
    no_items = {k: v for k, v in recorded.items() if not k.startswith("items.")}
    refused = decide_promotion(r, "exact_match", 0.0, ("2", no_items), 0.95)
    assert not refused.promoted and "no per-item exact_match of champion v2" in refused.reason
    assert decide_promotion(r, "exact_match", 0.0, ("2", no_items)).promoted  # means only: the tag's mean


@pytest.mark.parametrize("missing", ["tuned", "base"])
def test_a_score_missing_on_either_side_is_a_refusal_naming_it(missing):
    r = report([1.0] * 4, [0.0] * 4)
    r["models"][missing]["exact_match"] = None
    decision = decide_promotion(r, "exact_match", 0.0, None, 0.95)
    assert not decision.promoted and ("tuned model" if missing == "tuned" else "base") in decision.reason
