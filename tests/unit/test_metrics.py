"""Extractors and metrics on hand-checked examples, edge cases included (empty, invalid JSON, no match)."""

import pytest

from tasks.core.config import EvaluateConfig
from tasks.core.errors import ConfigError
from tasks.evaluate.metrics import Extractor, check_metrics, first_json_object, score, score_items

NONE = Extractor()
JSON = Extractor("json")
ORDER = '{"customer": "Ada Lopez", "item": "desk lamp", "quantity": 2, "city": "Oslo"}'


def items(metric, answers, references, extractor=NONE):
    return score_items(metric, answers, references, extractor)


def test_gsm8k_extracts_the_number_after_the_hashes_without_commas():
    gsm8k = Extractor("gsm8k")
    assert gsm8k("so 3 + 4 = 7\n#### 1,250") == "1250"
    assert gsm8k("#### $12.50 dollars") == "12.5"
    assert gsm8k("#### -3") == "-3"
    assert gsm8k("the answer is 7") is None and gsm8k("") is None
    assert gsm8k.reference("1,000") == "1000"  # a bare reference number is still canonical
    assert items("accuracy", ["#### 1,250", "#### 12.50", "1250", ""], ["x\n#### 1250", "#### 12.5", "#### 1250",
                                                                        "#### 0"], gsm8k) == [1.0, 1.0, 0.0, 0.0]


def test_json_extracts_the_first_object_and_skips_broken_braces():
    assert first_json_object('Sure! {"a": 1} and {"b": 2}') == {"a": 1}
    assert first_json_object('{broken {"a": {"b": [1, 2]}} tail') == {"a": {"b": [1, 2]}}
    assert first_json_object('[{"a": 1}]') == {"a": 1}  # the first object, even inside a list
    assert first_json_object('{"a": 1') is None and first_json_object("") is None and first_json_object("[1]") is None


def test_regex_takes_the_first_group_or_the_whole_match():
    group = Extractor.from_config(EvaluateConfig(extractor="regex", pattern=r"Answer:\s*(\w+)"))
    assert group("blah Answer:  yes. Answer: no") == "yes" and group("no answer here") is None
    whole = Extractor("regex", r"\d+")
    assert whole("room 42, floor 3") == "42"
    with pytest.raises(ConfigError, match="evaluate.pattern"):
        Extractor.from_config(EvaluateConfig(extractor="regex", pattern="(unclosed"))


def test_label_is_the_earliest_whole_word_label_in_any_case():
    label = Extractor("label", labels=("positive", "negative", "very positive"))
    assert label("NEGATIVE, although parts were positive") == "negative"
    assert label("It is very positive.") == "very positive"  # the longer label wins the tie at the same place
    assert label("unpositive vibes") is None and label("") is None  # whole words only
    assert items("accuracy", ["Negative.", "I'd say positive", "no idea"], ["negative", "Positive", "positive"],
                 label) == [1.0, 1.0, 0.0]


def test_exact_match_ignores_case_and_whitespace_but_not_words():
    assert items("exact_match", ["  Paris\n", "The  CAT sat", "Paris.", ""], ["paris", "the cat sat", "Paris", ""]) \
        == [1.0, 1.0, 0.0, 1.0]


def test_exact_match_of_json_compares_objects_not_text():
    answers = ['{"quantity": 2, "city": "Oslo", "item": "desk lamp", "customer": "Ada Lopez"}',
               '{"customer": "ada lopez", "item": "desk lamp", "quantity": 2, "city": "Oslo"}', "not json"]
    assert items("exact_match", answers, [ORDER] * 3, JSON) == [1.0, 0.0, 0.0]


def test_token_f1_is_squad_overlap():
    # "the" is an article and dropped: pred [cat, sat, down], ref [cat, sat] -> P 2/3, R 1 -> F1 0.8
    assert items("token_f1", ["The cat sat down"], ["the cat sat."])[0] == pytest.approx(0.8)
    assert items("token_f1", ["", "dog", "a"], ["", "cat", "the"]) == [1.0, 0.0, 1.0]  # both empty after dropping
    assert items("token_f1", [""], ["cat"]) == [0.0]


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" = 5 of 6 tokens each side
    assert items("rouge_l", ["the cat sat on the mat"], ["the cat lay on the mat"])[0] == pytest.approx(5 / 6)
    assert items("rouge_l", ["same words", "", "abc"], ["same words", "x", "xyz"]) == [1.0, 0.0, 0.0]


def test_bleu_is_sacrebleu_on_a_zero_to_one_scale():
    assert items("bleu", ["the cat sat on the mat"], ["the cat sat on the mat"]) == [1.0]
    assert items("bleu", ["", "dog"], ["the cat", "a cat sat"]) == [0.0, 0.0]
    corpus, per_item = score(["bleu"], ["the cat sat on the mat", "a dog"], ["the cat sat on the mat", "a dog ran"],
                             NONE)["bleu"]
    assert 0 < corpus < 1 and per_item[0] == 1.0


def test_field_match_is_the_share_of_reference_fields_matched_exactly():
    answers = [ORDER,
               'Here: {"customer": "Ada Lopez", "item": "lamp", "quantity": "2", "city": "Oslo"} done',
               '{"customer": "Ada Lopez"',  # invalid JSON
               "",
               '{"customer": "Ada Lopez", "item": "desk lamp", "quantity": 2, "city": "Oslo", "extra": 1}']
    # second: customer and city right; "lamp" != "desk lamp"; "2" (a string) != 2
    assert items("field_match", answers, [ORDER] * 5, JSON) == [1.0, 0.5, 0.0, 0.0, 1.0]
    corpus, _ = score(["field_match"], answers, [ORDER] * 5, JSON)["field_match"]
    assert corpus == pytest.approx(2.5 / 5)


def test_json_valid_needs_the_whole_answer_to_be_one_object():
    answers = [ORDER, f"  {ORDER}\n", f"{ORDER} trailing", "[1, 2]", '{"a": ', "", '"text"']
    assert items("json_valid", answers, [ORDER] * 7, JSON) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_score_returns_every_metric_in_order_with_per_item_scores():
    scores = score(["field_match", "exact_match", "json_valid"], [ORDER, "nope"], [ORDER, ORDER], JSON)
    assert list(scores) == ["field_match", "exact_match", "json_valid"]
    assert scores["exact_match"] == (0.5, [1.0, 0.0]) and scores["json_valid"] == (0.5, [1.0, 0.0])
    assert score(["exact_match"], [], [], NONE) == {"exact_match": (0.0, [])}


def test_field_match_needs_the_json_extractor_and_object_references():
    check_metrics(["field_match"], JSON, [ORDER])
    check_metrics(["exact_match"], NONE, ["plain"])
    with pytest.raises(ConfigError, match="evaluate.extractor=json"):
        check_metrics(["field_match"], NONE, [ORDER])
    with pytest.raises(ConfigError, match="reference 1 is not a JSON object"):
        check_metrics(["field_match", "json_valid"], JSON, [ORDER, "42"])


def test_extracted_is_the_format_rate_right_or_wrong():
    gsm8k = Extractor("gsm8k")
    answers = ["so 7\n#### 7", "#### 12", "the answer is 7", "", "#### "]
    assert items("extracted", answers, ["#### 7"] * 5, gsm8k) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert items("accuracy", answers, ["#### 7"] * 5, gsm8k) == [1.0, 0.0, 0.0, 0.0, 0.0]  # format is not accuracy
    assert items("extracted", ['x {"a": 1}', "{broken"], [ORDER] * 2, JSON) == [1.0, 0.0]
    assert items("extracted", ["  text ", "   "], ["r", "r"]) == [1.0, 0.0]  # none: any text
    assert score(["extracted"], ["#### 3", "no"], ["#### 3", "#### 4"], gsm8k)["extracted"] == (0.5, [1.0, 0.0])
