"""Issue 17: every common record shape is read, or refused in one line; nothing is dropped out of sight.

The fixtures copy the shapes the tools document: OpenAI chat with tool_calls, LLaMA-Factory ShareGPT (glaive tool
calls, DPO pairs, KTO tags, LLaVA-style images), LLaMA-Factory v1 typed parts, TRL's KTO and preference types.
"""

import json

import duckdb
import pytest

from tasks.core.config import CleanConfig, DataConfig
from tasks.core.errors import InputError
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tests.conftest import write_jsonl

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
OPENAI_TOOLS = {  # OpenAI chat fine-tuning: arguments as JSON text, parallel calls, tool messages with their id
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Paris\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, windy"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25C, sunny"},
        {"role": "assistant", "content": "Paris: 18C and windy. Rome: 25C and sunny."}],
    "tools": [WEATHER_TOOL]}
GLAIVE = {  # LLaMA-Factory's glaive_toolcall_en_demo (ShareGPT): tools as JSON text of bare definitions
    "conversations": [
        {"from": "human", "value": "I have chicken, bell peppers, and rice."},
        {"from": "function_call",
         "value": "{\"name\": \"search_recipes\", \"arguments\": {\"ingredients\": [\"chicken\", \"rice\"]}}"},
        {"from": "observation", "value": "{\"recipes\": [{\"name\": \"Chicken Stir Fry\"}]}"},
        {"from": "gpt", "value": "I found a recipe: Chicken Stir Fry."}],
    "tools": "[{\"name\": \"search_recipes\", \"description\": \"Search for recipes\", \"parameters\": "
             "{\"type\": \"object\", \"properties\": {\"ingredients\": {\"type\": \"array\"}}}}]"}
LF_V1 = {  # LLaMA-Factory v1 (reason_tool_use_demo): typed parts with `value`, reasoning and tool_call parts
    "messages": [
        {"role": "system", "content": [{"type": "text", "value": "You solve requests with tools."}]},
        {"role": "user", "content": [{"type": "text", "value": "Areas of circles of radius 1.5 and 3?"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "Two radii, so two calls."},
            {"type": "tool_call", "value": "{\"name\": \"circle_area\", \"arguments\": {\"radius\": 1.5}}"},
            {"type": "tool_call", "value": {"name": "circle_area", "arguments": "{\"radius\": 3}"}}]},
        {"role": "tool", "content": [{"type": "text", "value": "[7.07, 28.27]"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Report both."},
                                          {"type": "text", "value": "7.07 and 28.27."}]}],
    "tools": "[{\"type\": \"function\", \"function\": {\"name\": \"circle_area\", \"parameters\": {}}}]"}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def ingest(tmp_path, records, on_bad_rows="fail", name="data", **source):
    src = write_jsonl(tmp_path / f"{name}.jsonl", records)
    ingest_rows(DataConfig(sources=[{"path": str(src), **source}], on_bad_rows=on_bad_rows), tmp_path,
                tmp_path / "i.duckdb")
    with duckdb.connect(str(tmp_path / "i.duckdb"), read_only=True) as con:
        cur = con.execute("SELECT * FROM raw ORDER BY row_id")
        names = [d[0] for d in cur.description]
        return src, [dict(zip(names, r)) for r in cur.fetchall()]


def turns(row):
    """A row's turns with their null fields left out and tool calls parsed."""
    return [{k: json.loads(v) if k == "tool_calls" else v for k, v in m.items()
             if k in ("role", "content") or v is not None} for m in row["messages"]]


def clean(tmp_path, on_bad_rows="fail", **cfg):
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(**cfg), on_bad_rows)
    return counts, tmp_path / "c.duckdb"


def query(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_openai_tool_calls_become_one_assistant_turn_with_its_calls_and_tool_turns_keep_their_output(tmp_path):
    _, [row] = ingest(tmp_path, [OPENAI_TOOLS])
    assert row["system"] == "You are a weather bot." and row["problem_rule"] is None
    assert turns(row) == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_current_weather", location="Paris"),
                                                            call("get_current_weather", location="Rome")]},
        {"role": "tool", "content": "18C, windy"}, {"role": "tool", "content": "25C, sunny"},
        {"role": "assistant", "content": "Paris: 18C and windy. Rome: 25C and sunny."}]
    assert json.loads(row["tools"]) == [WEATHER_TOOL]


def test_sharegpt_function_call_and_observation_become_a_call_and_a_tool_turn_and_tools_text_is_normalised(tmp_path):
    _, [row] = ingest(tmp_path, [GLAIVE])
    assert turns(row) == [
        {"role": "user", "content": "I have chicken, bell peppers, and rice."},
        {"role": "assistant", "content": "", "tool_calls": [call("search_recipes", ingredients=["chicken", "rice"])]},
        {"role": "tool", "content": "{\"recipes\": [{\"name\": \"Chicken Stir Fry\"}]}"},
        {"role": "assistant", "content": "I found a recipe: Chicken Stir Fry."}]
    assert json.loads(row["tools"]) == [{"type": "function", "function": {
        "name": "search_recipes", "description": "Search for recipes",
        "parameters": {"type": "object", "properties": {"ingredients": {"type": "array"}}}}}]


def test_llamafactory_v1_reasoning_and_tool_call_parts_go_to_the_turns_reasoning_and_calls(tmp_path):
    _, [row] = ingest(tmp_path, [LF_V1])
    assert row["system"] == "You solve requests with tools."
    assert turns(row) == [
        {"role": "user", "content": "Areas of circles of radius 1.5 and 3?"},
        {"role": "assistant", "content": "", "reasoning": "Two radii, so two calls.",
         "tool_calls": [call("circle_area", radius=1.5), call("circle_area", radius=3)]},
        {"role": "tool", "content": "[7.07, 28.27]"},
        {"role": "assistant", "content": "7.07 and 28.27.", "reasoning": "Report both."}]
    assert json.loads(row["tools"]) == [{"type": "function", "function": {"name": "circle_area", "parameters": {}}}]


def test_tool_call_rows_pass_clean_with_empty_call_content_and_are_not_missing_or_empty(tmp_path):
    ingest(tmp_path, [OPENAI_TOOLS, GLAIVE, LF_V1])
    counts, db = clean(tmp_path)
    assert counts["rows_clean"] == 3 and counts["dropped_by_rule"] == {}
    (calls,) = query(db, "SELECT messages[2].tool_calls FROM clean WHERE row_id = 0")[0]
    assert json.loads(calls)[1] == call("get_current_weather", location="Rome")  # carried through every turn pass


@pytest.mark.parametrize("message, field, why", [
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}, "tool_calls",
     'a tool call needs a "name" and "arguments"'),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
     "tool_calls", "the arguments of tool call 'f' is not valid JSON"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}, "tool_calls",
     "the arguments of tool call 'f' must be a JSON object"),
    ({"role": "user", "content": [{"type": "tool_call", "value": {"name": "f", "arguments": {}}}]}, "messages",
     "a user turn has tool calls; only assistant turns call tools"),
])
def test_a_malformed_tool_call_fails_in_one_line_naming_file_line_and_field(tmp_path, message, field, why):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(InputError) as err:
        ingest(tmp_path, [good, {"messages": [{"role": "user", "content": "q"}, message]}])
    assert str(err.value).startswith(f"{tmp_path / 'data.jsonl'}:2: field '{field}': {why}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tools", ["{not json", [1, 2], [{"type": "function", "function": "f"}], 42])
def test_malformed_tools_are_a_malformed_row_naming_the_tools_field(tmp_path, tools):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": tools}
    with pytest.raises(InputError, match=r"data.jsonl:1: field 'tools': "):
        ingest(tmp_path, [record])
    _, [row] = ingest(tmp_path, [record], on_bad_rows="quarantine")
    assert (row["problem_rule"], row["messages"], json.loads(row["record"])["tools"]) == ("malformed", None, tools)


LLAVA = {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
    {"from": "gpt", "value": "The bus in the image is white and red."}]}
MLLM = {"messages": [{"content": "<image>Who are they?", "role": "user"},
                     {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"}],
        "images": ["mllm_demo_data/1.jpg"]}
AUDIO = {"messages": [{"content": "<audio>What's that sound?", "role": "user"},
                      {"content": "It is the sound of glass shattering.", "role": "assistant"}],
         "audios": ["mllm_demo_data/1.mp3"]}
VIDEO = {"messages": [{"content": "<video>Why is this video funny?", "role": "user"},
                      {"content": "Because a baby is reading.", "role": "assistant"}], "videos": ["1.mp4"]}


@pytest.mark.parametrize("record, field", [(LLAVA, "image"), (MLLM, "images"), (AUDIO, "audios"), (VIDEO, "videos")])
def test_media_columns_with_placeholders_are_multimodal_data_never_read_as_text(tmp_path, record, field):
    with pytest.raises(InputError) as err:
        ingest(tmp_path, [record])
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'data.jsonl'}:1: field '{field}': this is multimodal data, and sftflow "
                              "trains text-only models") and "\n" not in message
    _, [row] = ingest(tmp_path, [record], on_bad_rows="quarantine")
    assert (row["problem_rule"], row["messages"], json.loads(row["record"])) == ("unsupported_part", None, record)
    counts, _ = clean(tmp_path, on_bad_rows="quarantine")
    assert counts["dropped_by_rule"] == {"unsupported_part": 1}


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},  # OpenAI chat
    {"type": "input_image", "image_url": "https://example.com/cat.png"},  # OpenAI responses
    {"type": "input_audio", "input_audio": {"data": "UklGR…", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-abc"}},
    {"type": "image", "image": "cat.png"},  # HF multimodal chat templates
    {"type": "video_url", "value": "data/1.mp4"},  # LLaMA-Factory v1
])
def test_media_content_parts_are_unsupported_parts_named_as_multimodal(tmp_path, part):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
                           {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(InputError, match=rf"data.jsonl:1: field 'content': unsupported content part of type "
                                         rf"'{part['type']}'; this is multimodal data, and sftflow trains text-only"):
        ingest(tmp_path, [record])


def test_plain_text_rows_are_one_text_turn_that_clean_keeps_as_supervised_with_its_layout(tmp_path):
    doc = "def f():\n    return 1\n\n\nThe end.   \n"
    ingest(tmp_path, [{"text": doc}, {"text": "Another document, plain prose."}])
    counts, db = clean(tmp_path)
    assert counts["dropped_by_rule"] == {}
    assert query(db, "SELECT messages[1].role, messages[1].content FROM clean ORDER BY row_id") == [
        ("text", "def f():\n    return 1\n\n\nThe end."), ("text", "Another document, plain prose.")]


@pytest.mark.parametrize("record, field", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "text", "content": "t"}]}, "messages"),
    ({"text": "A document.", "system": "Be brief."}, "text"),
])
def test_a_text_turn_mixed_with_chat_turns_or_a_system_prompt_is_malformed(tmp_path, record, field):
    with pytest.raises(InputError, match=rf"data.jsonl:1: field '{field}': a plain text turn \(role text\) cannot be "
                                         "mixed with chat turns or a system prompt"):
        ingest(tmp_path, [record])


TRL_KTO = [{"prompt": "The sky is", "completion": " blue.", "label": True},
           {"prompt": "The sky is", "completion": " green.", "label": False},
           {"prompt": [{"role": "user", "content": "What color is the sky?"}],
            "completion": [{"role": "assistant", "content": "It is green."}], "label": False},
           {"prompt": "Grass is", "completion": " green.", "label": True}]


def test_trl_kto_rows_are_detected_and_undesirable_ones_are_quarantined_with_their_turns(tmp_path):
    _, rows = ingest(tmp_path, TRL_KTO)
    assert [r["problem_rule"] for r in rows] == [None, "undesirable", "undesirable", None]
    assert rows[1]["problem"] == "label is false: an undesirable example (KTO data)"
    assert turns(rows[2]) == [{"role": "user", "content": "What color is the sky?"},
                              {"role": "assistant", "content": "It is green."}]
    counts, db = clean(tmp_path)  # half the source is undesirable: the data's own choice, not a loss that stops
    assert counts["dropped_by_rule"] == {"undesirable": 2} and counts["rows_clean"] == 2
    assert counts["source_warnings"] == []
    assert query(db, "SELECT line_number, rule, messages[2].content FROM quarantine ORDER BY row_id") == [
        (2, "undesirable", " green."), (3, "undesirable", "It is green.")]


def test_llamafactory_kto_tags_and_messages_with_a_label_are_read_too(tmp_path):
    chat = [{"role": "user", "content": "Summarise: spyware."}, {"role": "assistant", "content": "D! Sci/Tech!"}]
    _, rows = ingest(tmp_path, [{"messages": chat, "label": False}, {"messages": chat, "label": True},
                                {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
                                 "kto_tag": False}])
    assert [(r["problem_rule"], r["problem"]) for r in rows] == [
        ("undesirable", "label is false: an undesirable example (KTO data)"), (None, None),
        ("undesirable", "kto_tag is false: an undesirable example (KTO data)")]


def test_a_source_whose_rows_are_all_undesirable_is_still_named(tmp_path):
    ingest(tmp_path, [{"prompt": f"p{i}", "completion": f"c{i}", "label": False} for i in range(3)], name="kto")
    with pytest.raises(InputError, match=r"source 'kto' lost all 3 rows to undesirable, e.g. .*kto.jsonl:1: label is "
                                         r"false"):
        clean(tmp_path)


@pytest.mark.parametrize("record, field", [
    ({"prompt": "p", "completion": "c", "label": "yes"}, "label"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "kto_tag": 1},
     "kto_tag")])
def test_a_kto_flag_that_is_not_a_boolean_is_malformed(tmp_path, record, field):
    with pytest.raises(InputError, match=rf"data.jsonl:1: field '{field}': expected true or false"):
        ingest(tmp_path, [record])


def test_a_label_column_of_other_data_is_just_another_column(tmp_path):
    _, [row] = ingest(tmp_path, [{"instruction": "Classify: great!", "output": "positive", "label": "positive"}])
    assert row["problem_rule"] is None


TRL_PAIR = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
TRL_IMPLICIT = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
TRL_CHAT_PAIR = {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                 "chosen": [{"role": "assistant", "content": "It is blue."}],
                 "rejected": [{"role": "assistant", "content": "It is green."}]}
ULTRAFEEDBACK = {  # HuggingFaceH4/ultrafeedback_binarized: the chosen conversation holds its own prompt
    "prompt": "Name a blue thing.", "prompt_id": "a1b2",
    "chosen": [{"role": "user", "content": "Name a blue thing."}, {"role": "assistant", "content": "The sky."}],
    "rejected": [{"role": "user", "content": "Name a blue thing."}, {"role": "assistant", "content": "Grass."}],
    "messages": [{"role": "user", "content": "Name a blue thing."}, {"role": "assistant", "content": "The sky."}],
    "score_chosen": 8.0, "score_rejected": 3.0}
LF_DPO = {"conversations": [{"from": "human", "value": "Write a haiku."}],  # LLaMA-Factory dpo_en_demo (ShareGPT)
          "chosen": {"from": "gpt", "value": "Old pond, a frog jumps."}, "rejected": {"from": "gpt", "value": "No."}}
LF_V1_DPO = {"chosen_messages": [  # LLaMA-Factory v1 v1_dpo_demo
    {"role": "system", "content": [{"type": "text", "value": "Translate."}], "loss_weight": 0.0},
    {"role": "user", "content": [{"type": "text", "value": "Bonjour"}], "loss_weight": 0.0},
    {"role": "assistant", "content": [{"type": "text", "value": "Hello"}], "loss_weight": 1.0}],
    "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "Bonjour"}]},
                          {"role": "assistant", "content": [{"type": "text", "value": "Goodbye"}]}]}


@pytest.mark.parametrize("record, pair, columns", [
    (TRL_PAIR, "chosen/rejected", "columns: {completion: chosen}"),
    (TRL_IMPLICIT, "chosen/rejected", "columns: {text: chosen}"),
    (TRL_CHAT_PAIR, "chosen/rejected", "columns: {completion: chosen}"),
    (ULTRAFEEDBACK, "chosen/rejected", "columns: {messages: chosen}"),
    (LF_DPO, "chosen/rejected", "(the prompt and the chosen answer become the conversation, rejected is ignored)"),
    (LF_V1_DPO, "chosen_messages/rejected_messages", "columns: {messages: chosen_messages}"),
])
def test_preference_pairs_stop_in_one_line_saying_how_to_train_sft_on_the_chosen_side(tmp_path, record, pair,
                                                                                       columns):
    for on_bad_rows in ("fail", "quarantine"):
        with pytest.raises(InputError) as err:
            ingest(tmp_path, [record], on_bad_rows=on_bad_rows)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / 'data.jsonl'}:1: this is preference data ({pair} pairs")
        assert "set format: chosen on this source" in message and message.endswith(columns)
        assert "\n" not in message and "max_source_loss" not in message


@pytest.mark.parametrize("record, system, expected", [
    (TRL_PAIR, None, [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": " blue."}]),
    (TRL_IMPLICIT, None, [{"role": "text", "content": "The sky is blue."}]),
    (TRL_CHAT_PAIR, None, [{"role": "user", "content": "What color is the sky?"},
                           {"role": "assistant", "content": "It is blue."}]),
    (ULTRAFEEDBACK, None, [{"role": "user", "content": "Name a blue thing."},
                           {"role": "assistant", "content": "The sky."}]),
    (LF_DPO, None, [{"role": "user", "content": "Write a haiku."},
                    {"role": "assistant", "content": "Old pond, a frog jumps."}]),
    (LF_V1_DPO, "Translate.", [{"role": "user", "content": "Bonjour", "weight": 0.0},
                               {"role": "assistant", "content": "Hello", "weight": 1.0}]),
])
def test_format_chosen_reads_the_prompt_and_the_chosen_side_and_ignores_rejected(tmp_path, record, system, expected):
    _, [row] = ingest(tmp_path, [record], format="chosen")
    assert (row["system"], turns(row), row["problem_rule"]) == (system, expected, None)


def test_format_chosen_without_a_chosen_answer_is_a_missing_field(tmp_path):
    _, [row] = ingest(tmp_path, [{"prompt": "p", "rejected": "r"}], format="chosen")
    assert (row["problem_rule"], row["problem"]) == ("missing_field", "missing field 'chosen'")


def test_the_columns_alternative_reads_a_pair_as_prompt_and_completion(tmp_path):
    _, [row] = ingest(tmp_path, [TRL_PAIR], columns={"completion": "chosen"})
    assert turns(row) == [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": " blue."}]


def test_a_quarantined_turn_that_only_calls_tools_is_previewed_with_its_calls():
    from tasks.data.clean import example_preview

    calls = json.dumps([call("f", x=1)])
    preview = example_preview(None, [{"role": "user", "content": "Weather?"},
                                     {"role": "assistant", "content": "", "tool_calls": calls}], None)
    assert preview == f"user: Weather? ⏎ assistant: (calls) {calls}"
