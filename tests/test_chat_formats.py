"""Chat data as people have it (#34): OpenAI's fine-tuning files (a `weight` on assistant messages,
a `name` on some), ShareGPT's `{from, value}` layout, keys that differ from message to message and
from file to file; a broken line or a message without content named by file, row and message; and
templates with `{% generation %}` markers (TRL's training templates, which our prefix rule
refuses for Phi-3, DeepSeek, gpt-oss, Nemotron...), labelled exactly as TRL labels them. Real
files, datasets, transformers and TRL; a byte-level BPE tokenizer trained here."""

from __future__ import annotations

import importlib.resources
import json
import uuid

import pytest

from conftest import ROOT, launcher
from hfkit import byte_level_tokenizer, example_base
from hubkit import write_parquet

SYSTEM = "Marv is a factual chatbot that is also sarcastic."
# the multi-turn example of OpenAI's fine-tuning guide, as it shows it: the first answers are
# context (weight 0), the sarcastic ones are trained on (weight 1)
OPENAI = [
    {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": plain, "weight": 0},
            {"role": "user", "content": "Can you be more sarcastic?"},
            {"role": "assistant", "content": sarcastic, "weight": 1},
        ]
    }
    for question, plain, sarcastic in [
        ("What's the capital of France?", "Paris", "Paris, as if everyone doesn't know that already."),
        ("Who wrote 'Romeo and Juliet'?", "William Shakespeare", "Oh, just some guy named William Shakespeare."),
        ("How far is the Moon from Earth?", "384,400 kilometers", "Around 384,400 kilometers. Give or take a few."),
    ]
]
# a `name` on one message only, and no weight (every assistant message is trained on)
NAMED = {
    "messages": [
        {"role": "user", "content": "Hi, I am Alice.", "name": "alice"},
        {"role": "assistant", "content": "Hello Alice."},
    ]
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [m["content"] for row in [*OPENAI, NAMED] for m in row["messages"]] * 20
    texts += [_trl_template(name) for name in TRL_TEMPLATES]
    return str(byte_level_tokenizer(tmp_path_factory.mktemp("tokenizer"), texts))


def write_jsonl(tmp_path, rows, blank_after: int | None = None):
    lines = [json.dumps(r) + "\n" for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "\n")
    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("".join(lines))
    return path


def chat(tmp_path, tokenizer, files, **kwargs):
    from launcher.datasets.chat import ChatData

    files = [str(f) for f in files] if isinstance(files, list) else str(files)
    return ChatData(files=files, tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), **kwargs)


def answers(data, i):
    """The text of sample i's labelled tokens, a run of them per line."""
    sample = data[i]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    runs, last = [], -2
    for k, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label != -100:
            assert label == token
            if k == last + 1:
                runs[-1].append(token)
            else:
                runs.append([token])
            last = k
    return [data.tokenizer.tok.decode(run) for run in runs]


def test_openai_fine_tuning_files_train_the_answers_of_weight_1(tmp_path, tokenizer):
    """OpenAI's format as its guide writes it: weight 0 answers are context, weight 1 answers are
    trained on; a `name` on some messages only is ignored by a template that does not use it, and
    rendered by one that does; a file whose messages have other keys than the file before it reads
    (it was "holds numbers, lists or objects where text belongs", or datasets' cast error)."""
    plain = write_jsonl(
        tmp_path, [{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}]
    )
    data = chat(tmp_path, tokenizer, [plain, write_jsonl(tmp_path, [*OPENAI, NAMED])])
    assert len(data) == 5 and data.dropped == 0
    assert answers(data, 0) == ["Hello.<|end|>"]
    for i, row in enumerate(OPENAI, 1):
        assert answers(data, i) == [row["messages"][4]["content"] + "<|end|>"]
    assert answers(data, 4) == ["Hello Alice.<|end|>"]
    # the template's text holds the weight-0 answer, as context
    assert "<|assistant|>Paris<|end|>" in data.tokenizer.tok.decode(data[1]["input_ids"].tolist())

    # a template that renders `name`: where a message has none (Parquet gives it null), nothing is rendered
    named = (
        "{% for m in messages %}<|{{ m['role'] }}|>{% if m.name is defined %}{{ m.name }}: {% endif %}"
        "{{ m['content'] }}{% if m.weight is defined %}(weight {{ m.weight }}){% endif %}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    for files in (write_jsonl(tmp_path, [NAMED]), write_parquet(tmp_path / "named.parquet", [NAMED, *OPENAI])):
        data = chat(tmp_path, tokenizer, files, chat_template=named)
        text = data.tokenizer.tok.decode(data[0]["input_ids"].tolist())
        assert text == "<|user|>alice: Hi, I am Alice.<|end|><|assistant|>Hello Alice.<|end|>", text
        assert answers(data, 0) == ["Hello Alice.<|end|>"]
        # the weight is the launcher's, not the template's: never rendered
        assert not any("(weight" in data.tokenizer.tok.decode(data[i]["input_ids"].tolist()) for i in range(len(data)))


def test_sharegpt_rows_read_as_their_role_and_content(tmp_path, tokenizer):
    """ShareGPT's layout (`conversations` of `{from, value}`, roles human and gpt), in a .json file
    holding one array as such datasets are shipped: the same samples as the same conversations
    written with role and content."""
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    shared = [
        {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in row["messages"]]}
        for row in [NAMED, {"messages": OPENAI[0]["messages"][:2] + [{"role": "assistant", "content": "Paris."}]}]
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(shared, indent=2))
    data = chat(tmp_path, tokenizer, path, messages_key="conversations")
    same = chat(
        tmp_path,
        tokenizer,
        write_jsonl(
            tmp_path, [NAMED, {"messages": OPENAI[0]["messages"][:2] + [{"role": "assistant", "content": "Paris."}]}]
        ),
    )
    assert len(data) == len(same) == 2
    for i in range(2):
        assert data[i]["input_ids"].tolist() == same[i]["input_ids"].tolist()
        assert data[i]["labels"].tolist() == same[i]["labels"].tolist()
    assert answers(data, 1) == ["Paris.<|end|>"]
    from launcher.errors import ArgumentError

    with pytest.raises(
        ArgumentError, match=r"sharegpt.json: row 1: no 'messages' field .*set messages_key: conversations"
    ):
        chat(tmp_path, tokenizer, path)


def test_chat_rows_at_fault_are_named_by_file_row_and_message(tmp_path, tokenizer):
    """A message without content, a broken JSON line, a number where text belongs, a weight that is
    not 0 or 1: each one line naming the file, its line, the row and the message."""
    from launcher.errors import ArgumentError

    ok = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "3"}]}
    # a tool call without content (OpenAI's function-calling rows): said, not "numbers where text belongs"
    tool = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "tool_calls": [{"id": "1"}]}]}
    path = write_jsonl(tmp_path, [ok, tool], blank_after=1)
    with pytest.raises(ArgumentError) as e:
        chat(tmp_path, tokenizer, [write_jsonl(tmp_path, [ok]), path])
    assert e.value.argument == "messages_key"
    assert str(e.value) == (
        f"{path}:3: row 2: message 2 (assistant) has no 'content' (it has ['role', 'tool_calls']); "
        'give it one ("" for none)'
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ok) + "\n" + '{"messages": [{"role": "user", "content": "Hi."}\n')
    with pytest.raises(ArgumentError, match=rf"^{broken}:2: row 2: not valid JSON lines \(") as e:
        chat(tmp_path, tokenizer, broken)
    assert e.value.argument == "files"
    numbered = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "3"}]}
    with pytest.raises(ArgumentError, match=r"\.jsonl:2: row 2: message 1 \(user\): its content is 5, not text"):
        chat(tmp_path, tokenizer, write_jsonl(tmp_path, [ok, numbered]))
    weighted = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "3", "weight": 2}]}
    with pytest.raises(ArgumentError, match=r"row 1: message 2 \(assistant\): its weight is 2; give 0"):
        chat(tmp_path, tokenizer, write_jsonl(tmp_path, [weighted]))
    # a dataset read by `datasets` (a dataset directory of JSON lines) whose content mixes text and
    # numbers: datasets turns "3" into 3 in every row, so no row can be named; the field is refused
    directory = tmp_path / "mixed"
    directory.mkdir()
    mixed = write_jsonl(directory, [ok, numbered])
    from launcher.datasets.chat import ChatData

    with pytest.raises(ArgumentError, match=r"the 'messages' field holds numbers, lists or objects where text"):
        ChatData(dataset=str(directory), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    # ... and one whose messages only differ in their keys reads (datasets reads each message whole)
    mixed.unlink()
    write_jsonl(directory, [NAMED, *OPENAI])
    assert len(ChatData(dataset=str(directory), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))) == 4


def test_check_names_a_broken_chat_line_in_one_line(tmp_path, tokenizer):
    broken = tmp_path / "chat.jsonl"
    broken.write_text(
        '{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "3"}]}\n{"mess\n'
    )
    train = f"{{_component_: launcher.datasets.chat.ChatData, files: {broken}, tokenizer: {tokenizer}}}"
    example_base(tmp_path)  # the base sft_lora.yaml fine-tunes (recipes/hf_causal_lm.yaml's export)
    proc = launcher("check", ROOT / "recipes" / "sft_lora.yaml", f"data.train={train}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: data.train.files: {broken}:2: row 2: not valid JSON lines ("), lines[0]


# TRL's training templates, each with `{% generation %}` markers; the first four are refused by the
# prefix rule (they end a conversation with an end-of-text the next turn does not follow, or drop
# earlier turns' reasoning), the last one is not
TRL_TEMPLATES = [
    "phi3_training.jinja",
    "deepseekv3_training.jinja",
    "gptoss_training.jinja",
    "nemotron_3_nano_training.jinja",
    "qwen3_training.jinja",
]
CONVERSATIONS = [
    [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 3+4?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And 10+20?"},
        {"role": "assistant", "content": "It is 30."},
    ],
    [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "Say hi back."},
        {"role": "assistant", "content": "Hi back.", "reasoning_content": "Easy."},
    ],
]


def _trl_template(name):
    return (importlib.resources.files("trl") / "chat_templates" / name).read_text()


def trl_labels(tokenizer_dir, template, conversations, tmp_path):
    """TRL's own: SFTTrainer with assistant_only_loss over these conversations, its input ids and labels."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
    from trl import SFTConfig, SFTTrainer

    from datasets import Dataset

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = template
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=8, n_layer=1, n_head=1))
    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to=[], use_cpu=True)
    args.max_length = None  # whole conversations, as ChatData without max_length
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


@pytest.mark.parametrize("name", TRL_TEMPLATES)
def test_templates_with_generation_markers_label_what_trl_labels(tmp_path, tokenizer, name):
    """The labels are TRL's (assistant_only_loss), token for token, through ChatData from a file."""
    template = _trl_template(name)
    rows = [{"messages": c} for c in CONVERSATIONS]
    data = chat(tmp_path, tokenizer, write_jsonl(tmp_path, rows), chat_template=template)
    expected = trl_labels(tokenizer, template, CONVERSATIONS, tmp_path)
    assert len(data) == len(expected)
    for i, (ids, labels) in enumerate(expected):
        assert data[i]["input_ids"].tolist() == ids, i
        assert data[i]["labels"].tolist() == labels, i
        assert 0 < sum(label != -100 for label in labels) < len(labels)


def test_weight_0_and_empty_answers_under_generation_markers_are_not_labelled(tmp_path, tokenizer):
    """TRL labels every block the template marks; an assistant message of weight 0, or an empty one,
    is left out here (its block is context), and the others keep TRL's labels exactly."""
    from launcher.datasets.chat import ChatTokenizer

    template = _trl_template("phi3_training.jinja")
    tok = ChatTokenizer.load(tokenizer, None, template)
    first = CONVERSATIONS[0]
    for context in ({**first[2], "weight": 0}, {**first[2], "content": ""}):
        conversation = [*first[:2], context, *first[3:]]
        ((ids, labels),) = trl_labels(tokenizer, template, [conversation], tmp_path)
        runs = [k for k in range(len(labels)) if labels[k] != -100 and (k == 0 or labels[k - 1] == -100)]
        assert len(runs) == 2  # the two answers' blocks; the end-of-text after the last is in its block
        got = tok.encode(conversation)
        assert got.ids == ids
        assert got.labels == [-100] * runs[1] + labels[runs[1] :]
        assert tok.tok.decode([t for t in got.labels if t != -100]).startswith("It is 30.<|end|>")


def test_a_tool_call_with_empty_content_is_an_answer(tmp_path, tokenizer):
    """OpenAI's function-calling rows: an assistant message of empty content with `tool_calls` is
    trained on, as the template renders it; the tool's reply (with its `tool_call_id`) is not."""
    calls = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if m.tool_calls is defined %}{{ m.tool_calls[0].function.name }}(){% endif %}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    row = {
        "messages": [
            {"role": "user", "content": "What is 6*7?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "function": {"name": "multiply"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "assistant", "content": "It is 42."},
        ]
    }
    data = chat(tmp_path, tokenizer, write_jsonl(tmp_path, [row]), chat_template=calls)
    assert answers(data, 0) == ["multiply()<|end|>", "It is 42.<|end|>"]


def test_weight_0_where_the_blocks_cannot_be_told_apart_is_one_line(tmp_path, tokenizer):
    """Two answers' {% generation %} blocks that touch (nothing between them) make one run of marked
    tokens: which part is the weight-0 answer's cannot be said, so it is refused, naming the row;
    without weights the run is labelled whole."""
    from launcher.errors import ArgumentError

    whole = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}<|assistant|>{{ m['content'] }}"
        "{% if not loop.last and messages[loop.index0 + 1]['role'] == 'assistant' %} {% endif %}"
        "{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
    )
    two = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "3"},
        {"role": "assistant", "content": "4"},
    ]
    data = chat(tmp_path, tokenizer, write_jsonl(tmp_path, [{"messages": two}]), chat_template=whole)
    assert answers(data, 0) == ["<|assistant|>3 <|assistant|>4"]
    weighted = [*two[:2], {**two[2], "weight": 0}]
    path = write_jsonl(tmp_path, [{"messages": two}, {"messages": weighted}])
    with pytest.raises(
        ArgumentError, match=rf"^{path}:2: row 2: the chat template's {{% generation %}} blocks cannot"
    ) as e:
        chat(tmp_path, tokenizer, path, chat_template=whole)
    assert e.value.argument == "chat_template"
