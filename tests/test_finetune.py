"""Fine-tuning as people do it (#23): hub ids for models, tokenizers and datasets, read offline from
a hub cache the test lays out (hubkit: the real huggingface_hub code path with the network cut);
chat data with the prompt masked; the shipped fine-tuning recipes, run as they are. Real
processes, gloo, transformers, datasets and peft."""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid

import pytest
import torch

from conftest import ROOT, assert_close_rel, changed, launcher, load_weights, worker_env, write_recipe
from hfkit import assert_same_export, example_base
from hubkit import add_repo, write_parquet
from launcher.parallel.sharding import MIN_TORCH, torch_version

MODEL, SUMS, SUMS_TEXT = "tiny-org/sums-gpt2", "tiny-org/sums-chat", "tiny-org/sums-text"
OTHER_MODEL = "tiny-org/sums-gpt2-b"  # the same shapes, other weights
HF_TOKEN = "hf_NeverWrittenAnywhere0123456789"  # in every run's environment: no file of a run may hold it
LORA = {"_component_": "peft.LoraConfig", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache holding a tiny GPT-2 with a character tokenizer and its chat template, a chat
    dataset (Parquet, `messages`) and a text dataset (Parquet, `text`): the example sums."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from launcher.datasets import examples

    tmp = tmp_path_factory.mktemp("hub")
    model_dir = tmp / "model"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=2, eos_token_id=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    examples._tokenizer().save_pretrained(model_dir)
    other_dir = tmp / "other"
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(other_dir)
    examples._tokenizer().save_pretrained(other_dir)
    sums = examples._sums(64, seed=5)
    chats = [
        {"messages": [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
        for a, b in sums
    ]
    write_parquet(tmp / "chat" / "data" / "train-00000-of-00001.parquet", chats)
    write_parquet(
        tmp / "text" / "data" / "train-00000-of-00001.parquet", [{"text": f"{a}+{b}={a + b}"} for a, b in sums]
    )
    cache = tmp / "cache"
    add_repo(cache, MODEL, model_dir)
    add_repo(cache, OTHER_MODEL, other_dir)
    add_repo(cache, SUMS, tmp / "chat", repo_type="dataset")
    add_repo(cache, SUMS_TEXT, tmp / "text", repo_type="dataset")
    env = worker_env(HF_HUB_CACHE=str(cache), HF_DATASETS_CACHE=str(tmp / "datasets"), HF_TOKEN=HF_TOKEN)
    return {"cache": cache, "env": env}


def sft_recipe(run_dir, **changes) -> dict:
    """The hub model fine-tuned on the hub chat data (64 conversations, 4 steps of 16), SGD, no
    dropout; validated on the hub text data."""
    recipe = {
        "name": "sft",
        "seed": 0,
        "model": {"_component_": "launcher.models.hf.causal_lm", "pretrained": MODEL},
        "data": {
            "train": {"_component_": "launcher.datasets.chat.ChatData", "dataset": SUMS, "tokenizer": MODEL},
            "val": {
                "_component_": "launcher.datasets.tokenized.TokenizedText",
                "dataset": SUMS_TEXT,
                "tokenizer": MODEL,
            },
            "batch_size": 4,
            "collate": {"_component_": "launcher.collate.PadToLongest"},
        },
        "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1},
        "train": {"epochs": 1, "global_batch_size": 16},
        "log": {"every_n_steps": 1},
        "run": {"dir": str(run_dir)},
    }
    return changed(recipe, **changes)


def run(hub, tmp_path, name, *args, expect=0, **changes):
    path = write_recipe(tmp_path / f"{name}.yaml", sft_recipe(tmp_path / name, **changes))
    proc = launcher("run", *args, path, env=hub["env"], timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return tmp_path / name if expect == 0 else proc


def losses(run_dir, key="loss"):
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def one_process(hub, tmp_path_factory):
    """The reference: the whole global batch of 16 in one micro-batch of one process, eager."""
    return run(hub, tmp_path_factory.mktemp("one"), "one", **{"data.batch_size": 16})


def test_chat_sft_from_hub_ids_on_2_ranks_with_accumulation_equals_one_process(hub, tmp_path, one_process):
    """Model, tokenizer and both datasets named by hub id, read from the cache offline; 2 ranks x
    micro-batch 4 x accumulation 2 equal one process with the whole batch of 16: the loss is the
    mean over the step's answer tokens, however the conversations are spread."""
    one = one_process
    two = run(hub, tmp_path, "two", "--nproc", "2")
    assert_close_rel(load_weights(two), load_weights(one), rtol=1e-5)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert losses(two, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-5)
    assert losses(one)[-1] < losses(one)[0]
    for path in [*one.rglob("*"), *two.rglob("*")]:
        assert not path.is_file() or HF_TOKEN.encode() not in path.read_bytes(), path
    # the export carries the hub tokenizer with its chat template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(one / "hf")
    assert tok.apply_chat_template(
        [{"role": "user", "content": "What is 1+2?"}], tokenize=False, add_generation_prompt=True
    ) == ("<|user|>What is 1+2?<|end|><|assistant|>")


def test_a_compiled_transformers_model_trains_as_eager(hub, tmp_path, one_process):
    """train.compile on a transformers model: torch.compile over the model with its own loss inside
    (launcher/parallel/wrap.py), on the CPU, ends at the eager run's weights (SGD: 1e-5)."""
    compiled = run(hub, tmp_path, "compiled", **{"data.batch_size": 16, "train.compile": True})
    assert_close_rel(load_weights(compiled), load_weights(one_process), rtol=1e-5)
    assert losses(compiled) == pytest.approx(losses(one_process), rel=1e-5)


def test_check_says_where_hub_ids_came_from_without_reading_weights(hub, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", sft_recipe(tmp_path / "run"))
    # weights absent from the cache: check reads the config and tokenizer only
    snapshot = next((hub["cache"] / f"models--{MODEL.replace('/', '--')}" / "snapshots").iterdir())
    weights = snapshot / "model.safetensors"
    hidden = weights.with_name("hidden")
    weights.rename(hidden)
    try:
        proc = launcher("check", path, env=hub["env"])
    finally:
        hidden.rename(weights)
    assert proc.returncode == 0, proc.stderr
    for repo in (MODEL, SUMS, SUMS_TEXT):
        assert re.search(f"^from the hub +{repo} at commit [0-9a-f]{{12}}, cached in ", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize(
    "command,key,flag",
    [
        ("check", "model.pretrained", ""),
        ("run", "model.pretrained", ""),
        ("check", "data.train.tokenizer", ""),
        ("check", "data.val.dataset", " --repo-type dataset"),
    ],
)
def test_a_hub_id_missing_from_the_cache_offline_is_one_line(hub, tmp_path, command, key, flag):
    path = write_recipe(tmp_path / "r.yaml", sft_recipe(tmp_path / "run", **{key: "tiny-org/absent"}))
    proc = launcher(command, path, env=hub["env"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {key}: tiny-org/absent is neither a"), lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and f"`hf download tiny-org/absent{flag}`" in lines[0], lines[0]


def test_hf_datasets_offline_alone_keeps_datasets_to_the_cache(hub, monkeypatch):
    """HF_DATASETS_OFFLINE=1 without HF_HUB_OFFLINE: a dataset's id resolves from the cache, and one
    missing there is the one-line refusal naming that variable, with no attempt to reach the hub
    (huggingface_hub itself reads only HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    from launcher import hub as hub_ids
    from launcher.errors import ArgumentError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    found = hub_ids.resolve(SUMS, "dataset", what="a dataset directory", repo_type="dataset")
    assert (found.path / "data" / "train-00000-of-00001.parquet").is_file()
    with pytest.raises(ArgumentError, match=r"tiny-org/absent is neither .*off \(HF_DATASETS_OFFLINE=1\)"):
        hub_ids.resolve("tiny-org/absent", "dataset", what="a dataset directory", repo_type="dataset")


def test_revisions_name_a_cached_commit_and_an_uncached_one_is_one_line(hub, monkeypatch):
    """model.revision, tokenizer_revision and a dataset's revision pick that commit's snapshot; offline,
    a commit not in the cache is the one line with the download command for that revision."""
    from huggingface_hub import constants

    from launcher import hub as hub_ids
    from launcher.datasets.chat import ChatTokenizer
    from launcher.errors import ArgumentError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    for repo, kind in ((MODEL, "model"), (SUMS, "dataset")):
        (commit,) = [p.name for p in (hub["cache"] / f"{kind}s--{repo.replace('/', '--')}" / "snapshots").iterdir()]
        found = hub_ids.resolve(repo, "pretrained", what="a directory", repo_type=kind, revision=commit)
        assert (found.path.name, found.commit) == (commit, commit)
        assert (
            hub_ids.resolve(repo, "pretrained", what="a directory", repo_type=kind, revision="main").path == found.path
        )
    (commit,) = [p.name for p in (hub["cache"] / f"models--{MODEL.replace('/', '--')}" / "snapshots").iterdir()]
    assert ChatTokenizer.load(MODEL, commit, None).vocab_size == ChatTokenizer.load(MODEL, None, None).vocab_size
    absent = "0" * 40
    with pytest.raises(ArgumentError, match=f"`hf download {MODEL} --revision {absent}`"):
        hub_ids.resolve(MODEL, "pretrained", what="a directory", revision=absent)
    with pytest.raises(ArgumentError, match="is a local path: a revision names a commit of a hub id only") as e:
        hub_ids.resolve(str(hub["cache"]), "pretrained", what="a directory", revision=commit)
    assert e.value.argument == "revision"
    with pytest.raises(ArgumentError, match="is a local path") as e:  # a tokenizer's: its own key
        ChatTokenizer.load(str(hub["cache"]), commit, None)
    assert e.value.argument == "tokenizer_revision"


def test_a_model_only_partly_cached_offline_says_to_download_it(hub, tmp_path):
    """Online, `launcher check` fetches a hub model's config without its weights; a run offline later
    finds that part alone in the cache: the line names the id and the download (it blamed the snapshot
    directory for holding no safetensors)."""
    partial = tmp_path / "partial"
    partial.mkdir()
    snapshot = next((hub["cache"] / f"models--{MODEL.replace('/', '--')}" / "snapshots").iterdir())
    (partial / "config.json").write_bytes((snapshot / "config.json").read_bytes())
    add_repo(hub["cache"], "tiny-org/partial", partial)
    path = write_recipe(tmp_path / "r.yaml", sft_recipe(tmp_path / "run", **{"model.pretrained": "tiny-org/partial"}))
    proc = launcher("run", path, env=hub["env"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: model.pretrained: tiny-org/partial is only partly in the Hugging Face cache")
    assert "no *.safetensors weights" in lines[0] and "`hf download tiny-org/partial`" in lines[0]


def test_only_the_assistants_tokens_are_labelled(hub, monkeypatch):
    """Labels are the ids on each answer and its end marker, -100 on everything else (system, user,
    role markers), over multi-turn conversations too: a prompt token never counts in the loss."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    from launcher.datasets.chat import IGNORE, ChatTokenizer

    tok = ChatTokenizer.load(MODEL, None, None)
    messages = [
        {"role": "system", "content": "1+1=2"},
        {"role": "user", "content": "What is 3+4?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "What is 10+20?"},
        {"role": "assistant", "content": "30"},
    ]
    ids, labels = tok.encode(messages)[:2]
    assert len(ids) == len(labels)
    answered = [tok.tok.decode([i]) for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert answered == ["7", "<|end|>", "3", "0", "<|end|>"]
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels, strict=True))


# a default system prompt where the conversation has none, as Qwen2.5's template adds one
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|system|>1+1=2<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def answered_tokens(tok, ids, labels):
    return [tok.tok.decode([i]) for i, label in zip(ids, labels, strict=True) if label != -100]


def chat_data(tmp_path, rows, **kwargs):
    """ChatData over these rows, written to a JSON lines file of their own."""
    from launcher.datasets.chat import ChatData

    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ChatData(files=str(path), tokenizer=MODEL, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_a_conversation_opening_with_the_assistant_trains_on_its_answers_alone(hub, monkeypatch):
    """Before a first message the template renders a default system prompt and the assistant's
    header: none of that is the answer (it was all labelled)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    from launcher.datasets.chat import ChatTokenizer

    tok = ChatTokenizer.load(MODEL, None, DEFAULT_SYSTEM)
    messages = [
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "What is 1+2?"},
        {"role": "assistant", "content": "30"},
    ]
    ids, labels = tok.encode(messages)[:2]
    assert "".join(tok.tok.decode([i]) for i in ids[:12]) == "<|system|>1+1=2<|end|><|assistant|>3<|end|><|user|>W"
    assert answered_tokens(tok, ids, labels) == ["3", "<|end|>", "3", "0", "<|end|>"]
    # the plain template: only the assistant's header comes before the first answer
    plain = ChatTokenizer.load(MODEL, None, None)
    ids, labels = plain.encode(messages)[:2]
    assert answered_tokens(plain, ids, labels) == ["3", "<|end|>", "3", "0", "<|end|>"]


def test_empty_answers_train_nothing_and_conversations_of_only_those_are_dropped(hub, tmp_path, monkeypatch):
    """An empty (or blank) assistant turn labels nothing, not even its end-of-turn marker; a
    conversation whose answers are all empty has none and is dropped and counted as such."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    from launcher.errors import ArgumentError

    def conversation(*answers):
        return {
            "messages": [
                m
                for a in answers
                for m in ({"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": a})
            ]
        }

    with pytest.raises(ArgumentError, match=r"every conversation is dropped: 40 of 40 conversations have no assistant"):
        chat_data(tmp_path, [conversation("")] * 40)
    data = chat_data(tmp_path, [conversation("3"), conversation(""), conversation("", "3", " "), conversation(" ")])
    assert len(data) == 2 and data.dropped == 2
    assert data.notes == [
        "2 of 4 conversations have no assistant answer to train on and are dropped (no assistant turn, or empty ones)"
    ]
    decode = data.tokenizer.tok.decode
    for i in range(2):
        sample = data[i]
        answered = [
            decode([t]) for t, label in zip(sample["input_ids"], sample["labels"], strict=True) if label != -100
        ]
        assert answered == ["3", "<|end|>"], i


def test_a_long_conversation_is_not_rendered_past_max_length(hub, tmp_path, monkeypatch):
    """Each answer is found by rendering the conversation up to it: a conversation of 3,000 messages
    rendered every prefix (63 s); with max_length, the answers past the limit are not looked for."""
    from huggingface_hub import constants
    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    render = PreTrainedTokenizerBase.apply_chat_template
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return render(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", counted)
    turns = [
        m
        for a, b in examples_sums(1500)
        for m in ({"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)})
    ]
    long = chat_data(tmp_path, [{"messages": turns}], max_length=32)
    assert len(calls) <= 20, len(calls)  # 1 + 2 per answer within the limit (3,001 before)
    short = chat_data(tmp_path, [{"messages": turns[:10]}], max_length=32)  # renders every prefix
    assert long[0]["input_ids"].tolist() == short[0]["input_ids"].tolist()
    assert long[0]["labels"].tolist() == short[0]["labels"].tolist()
    assert (long[0]["labels"] != -100).sum() > 0


def examples_sums(n):
    from launcher.datasets import examples

    return examples._sums(n, seed=5)


def test_the_loss_counts_the_answers_alone(hub, tmp_path, monkeypatch):
    """The loss the launcher trains on, over a padded batch of real ChatData conversations, is the
    mean cross-entropy over the answers' targets, computed by hand here from the logits: a prompt
    token's target is not in it, whatever it is. Unmasking one prompt target changes the loss (so
    this would see a prompt token counting)."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    from launcher.collate import PadToLongest
    from launcher.datasets.chat import IGNORE, ChatData
    from launcher.parallel.wrap import TrainModule

    data = ChatData(dataset=SUMS, tokenizer=MODEL, cache_dir=str(tmp_path / "cache"))
    batch = PadToLongest()([data[i] for i in range(4)])
    snapshot = next((hub["cache"] / f"models--{MODEL.replace('/', '--')}" / "snapshots").iterdir())
    model = AutoModelForCausalLM.from_pretrained(snapshot).eval()
    with torch.no_grad():
        loss = TrainModule(model, None)(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    answers = targets != IGNORE
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][answers], targets[answers])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert 0 < answers.sum() < (batch["attention_mask"][:, 1:] == 1).sum() / 2  # the prompts are most tokens
    # a prompt position's target, were it counted, moves the loss
    prompt = ((targets == IGNORE) & (batch["attention_mask"][:, 1:] == 1)).nonzero()[0]
    unmasked = {**batch, "labels": batch["labels"].clone()}
    unmasked["labels"][prompt[0], prompt[1] + 1] = batch["input_ids"][prompt[0], prompt[1] + 1]
    with torch.no_grad():
        assert TrainModule(model, None)(unmasked).item() != pytest.approx(loss.item(), rel=1e-6)


def test_prompt_response_pairs_a_recipe_template_and_packing(hub, tmp_path, monkeypatch):
    """Prompt/response rows (with a system prompt), formatted by a chat template given in the recipe:
    the answer alone is labelled; packing joins whole conversations up to its length, labels kept."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    from launcher.datasets.chat import IGNORE, ChatData

    rows = [{"q": f"{a}+{b}?", "a": str(a + b)} for a, b in [(1, 2), (30, 4), (5, 60), (7, 8)]]
    files = str(write_parquet(tmp_path / "pairs.parquet", rows))
    template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )

    def pairs_of(**kwargs) -> ChatData:
        cache = str(tmp_path / "cache")
        return ChatData(
            files=files,
            tokenizer=MODEL,
            prompt_key="q",
            response_key="a",
            chat_template=template,
            cache_dir=cache,
            **kwargs,
        )

    pairs = pairs_of(system="1+1=2")
    decode = pairs.tokenizer.tok.decode
    first = pairs[0]
    text = "".join(decode([i]) for i in first["input_ids"].tolist())
    assert text == "<|system|>1+1=2<|end|><|user|>1+2?<|end|><|assistant|>3<|end|>"
    answered = [
        decode([i])
        for i, label in zip(first["input_ids"].tolist(), first["labels"].tolist(), strict=True)
        if label != IGNORE
    ]
    assert answered == ["3", "<|end|>"]

    packed, singles = pairs_of(pack=2 * len(first["input_ids"])), pairs_of()
    assert len(packed) < len(singles)
    joined = [t for i in range(len(packed)) for t in packed[i]["labels"].tolist()]
    assert joined == [t for i in range(len(singles)) for t in singles[i]["labels"].tolist()]
    assert all(len(packed[i]["input_ids"]) <= packed.pack for i in range(len(packed)))


def test_chat_data_mistakes_name_the_row_and_the_cause(hub, tmp_path, monkeypatch):
    """Each is one ArgumentError naming its argument, and the row (1-based) where a row is at fault."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    from launcher.datasets.chat import ChatData
    from launcher.errors import ArgumentError

    def chat(rows, **kwargs):
        path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ChatData(files=str(path), tokenizer=MODEL, cache_dir=str(tmp_path / "cache"), **kwargs), path

    ok = {"messages": [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "3"}]}
    asked = {"messages": [{"role": "user", "content": "What is 1+2?"}]}
    with pytest.raises(ArgumentError, match=r"row 3: the conversation is empty") as e:
        chat([ok, ok, {"messages": []}])
    assert e.value.argument == "messages_key"
    # one content a number: named by its row (local JSON is read line by line, not by datasets,
    # which reads such a field as JSON and turns row 1's "3" into 3; tests/test_chat_formats.py)
    numbered = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "3"}]}
    with pytest.raises(ArgumentError, match=r"row 2: message 1 \(user\): its content is 5, not text"):
        chat([ok, numbered])
    # no assistant turn anywhere: said as such (it was 'the training dataset is empty')
    with pytest.raises(ArgumentError, match=r"every conversation is dropped: 2 of 2 conversations have no assistant"):
        chat([asked, asked])
    long = {"messages": [{"role": "user", "content": "What is 1+2? " * 4}, {"role": "assistant", "content": "3"}]}
    some, _ = chat([ok, asked, long], max_length=20)
    assert len(some) == 1 and len(some.notes) == 2, some.notes  # one unanswered, one cut by max_length
    assert "1 of 3 conversations have no assistant answer" in some.notes[0] and "raise max_length" in some.notes[1]
    # prompt/response pairs: a missing response names response_key
    with pytest.raises(ArgumentError, match=r"row 2: its 'a' field is None, not text") as e:
        chat([{"q": "1+2?", "a": "3"}, {"q": "1+2?", "a": None}], prompt_key="q", response_key="a")
    assert e.value.argument == "response_key"
    with pytest.raises(ArgumentError, match=r"nosuch/t.jinja does not exist") as e:
        chat([ok], chat_template="nosuch/t.jinja")
    assert e.value.argument == "chat_template"
    # a template's raise_exception (roles must alternate) on a row: one line naming the row, not jinja's traceback
    alternate = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    )
    opening = {"messages": [{"role": "assistant", "content": "3"}, {"role": "user", "content": "What is 1+2?"}]}
    with pytest.raises(ArgumentError, match=r"row 2: the chat template refuses the conversation \(TemplateError: Conv"):
        chat([ok, opening], chat_template=alternate)
    # max_length is a cap, not a length: the longest real sample is what must fit the model
    capped, _ = chat([ok, ok], max_length=500)
    assert capped.max_sequence_length == len(capped[0]["input_ids"]) < 500


def test_a_streamed_hub_dataset_offline_reads_the_cached_snapshot_in_order(hub, monkeypatch):
    """Offline, StreamedText reads a hub id's cached snapshot (online it streams from the hub and
    fetches only the card: not exercised here, these machines have no hub)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    from launcher.datasets import examples
    from launcher.datasets.tokenized import StreamedText

    stream = StreamedText(dataset=SUMS_TEXT, tokenizer=MODEL)
    assert not stream.source.remote and stream.source.source.hub_id == SUMS_TEXT
    got = [sample["input_ids"].tolist() for sample in itertools.islice(iter(stream), 3)]
    assert got == stream.tokenizer.encode([f"{a}+{b}={a + b}" for a, b in examples._sums(64, seed=5)[:3]])


def test_conversations_cut_to_no_answer_are_dropped_and_named(tmp_path):
    """max_length 16 cuts the answer off the conversations whose prompt is 16 tokens or more
    (both numbers of two digits): they are dropped, counted, and named by check; the others stay."""
    example_base(tmp_path)  # the base sft_lora.yaml fine-tunes (recipes/hf_causal_lm.yaml's export)
    proc = launcher("check", ROOT / "recipes" / "sft_lora.yaml", "data.train.max_length=16", cwd=tmp_path, check=True)
    warning = [line for line in proc.stdout.splitlines() if "conversations have no answer token" in line]
    assert len(warning) == 1, proc.stdout
    dropped = int(warning[0].split("data.train: ")[1].split(" of ")[0])
    assert warning[0].startswith("warning: data.train: ") and 0 < dropped < 2000
    assert "raise max_length to keep them" in warning[0]
    assert f"train / val samples    {2000 - dropped} / 200" in proc.stdout


def test_the_two_shipped_steps_pretrain_then_fine_tune_a_model_that_answers_held_out_sums(tmp_path):
    """From a clean directory, offline, no overrides, README's two commands: recipes/hf_causal_lm.yaml
    pretrains a model that knows sums as text but answers almost none asked in the chat template;
    recipes/sft_lora.yaml fine-tunes it, and its export answers most held-out sums (greedy, through
    transformers and peft alone) and stops at the end of its turn; the tokenizer decodes without
    spaces between characters. hf/ (the adapter over its named base) and hf-merged/ load."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    launcher("run", ROOT / "recipes" / "hf_causal_lm.yaml", cwd=tmp_path, check=True)
    base_dir = tmp_path / "runs" / "hf_causal_lm" / "hf"
    val = losses(base_dir.parent, "val_loss")
    assert len(val) >= 3 and val[-1] < val[0], val
    proc = launcher("run", ROOT / "recipes" / "sft_lora.yaml", cwd=tmp_path, check=True)
    assert "UserWarning" not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr
    run_dir = tmp_path / "runs" / "sft_lora"
    assert losses(run_dir, "val_loss")[-1] < losses(run_dir)[0] - 0.5, run_dir.joinpath("metrics.jsonl").read_text()
    tok = AutoTokenizer.from_pretrained(run_dir / "hf-merged")
    assert tok.decode(tok("17+25=42")["input_ids"]) == "17+25=42"
    # the adapter names its base (the directory the recipe gave, relative to where it ran) and loads over it
    adapter = json.loads((run_dir / "hf" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "runs/hf_causal_lm/hf", adapter
    models = {
        "base": AutoModelForCausalLM.from_pretrained(base_dir),
        "merged": AutoModelForCausalLM.from_pretrained(run_dir / "hf-merged"),
        "adapted": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "hf"),
    }
    rows = (tmp_path / "data" / "arithmetic" / "chat_val.jsonl").read_text().splitlines()
    conversations = [json.loads(line)["messages"] for line in rows]
    said = {name: answers(model, tok, conversations) for name, model in models.items()}
    truth = [c[1]["content"] + "<|end|>" for c in conversations]
    right = {name: sum(a == t for a, t in zip(got, truth, strict=True)) for name, got in said.items()}
    assert right["base"] <= 0.1 * len(truth) and right["merged"] > 0.5 * len(truth), (right, said["merged"][:10])
    assert right["adapted"] > 0.5 * len(truth), right
    # generation stops at the template's end of turn (<|end|>), not only at eos (<|endoftext|>)
    assert all(a.endswith("<|end|>") and a.count("<|end|>") == 1 for a in said["merged"]), said["merged"][:10]
    assert AutoTokenizer.from_pretrained(run_dir / "hf").chat_template == tok.chat_template
    # nothing that names this machine's way of loading
    for export in ("hf", "hf-merged"):
        settings = json.loads((run_dir / export / "tokenizer_config.json").read_text())
        assert not {"local_files_only", "is_local"} & set(settings), settings
    # launcher export, as README says: the run's newest checkpoint is its own merged export
    proc = launcher("export", "runs/sft_lora", "sft_lora_merged", "--merged", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_export(tmp_path / "sft_lora_merged", run_dir / "hf-merged")


def test_an_adapter_over_a_base_built_from_a_config_names_none_and_says_why(tmp_path):
    """(The shipped sft_lora.yaml checked this while its base was built from a config.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    from launcher.models import hf

    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    hf.portable(tmp_path, model)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert "built from a config" in (tmp_path / "README.md").read_text().split("\n")[0]


def answers(model, tok, conversations, max_new_tokens=4):
    """Greedy answers to each conversation's first message, asked with the chat template: prompts of
    one length in one batch (no padding), each answer decoded up to its first end of turn."""
    model.eval()
    prompts = [tok.apply_chat_template(c[:1], add_generation_prompt=True) for c in conversations]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    out = [""] * len(prompts)
    for length in {len(p) for p in prompts}:
        batch = [i for i, p in enumerate(prompts) if len(p) == length]
        with torch.no_grad():
            ids = model.generate(
                torch.tensor([prompts[i] for i in batch]), max_new_tokens=max_new_tokens, do_sample=False
            )
        for i, row in zip(batch, ids[:, length:].tolist(), strict=True):
            text = tok.decode(row)
            out[i] = text[: text.index("<|end|>") + len("<|end|>")] if "<|end|>" in text else text
    return out


def test_the_fine_tune_before_its_base_is_one_line_naming_the_base_and_the_recipe_that_makes_it(
    tmp_path, monkeypatch, capsys
):
    """recipes/sft_lora.yaml run (or checked) before recipes/hf_causal_lm.yaml: exit 2, one line."""
    from launcher.commands import cli

    monkeypatch.chdir(tmp_path)
    for command in ("check", "run"):
        assert cli.main([command, str(ROOT / "recipes" / "sft_lora.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: model.pretrained: runs/hf_causal_lm/hf does not exist"), err
        assert err[0].endswith("run its recipe first (launcher run recipes/hf_causal_lm.yaml)"), err
    assert not (tmp_path / "runs" / "hf_causal_lm").exists()  # nothing made up in its place


def test_the_example_tokenizer_decodes_characters_without_spaces_and_replaces_an_older_one(tmp_path):
    """data/arithmetic/ written by an older launcher (its marker .written-v1, its tokenizer joining
    characters with spaces) is written again, not kept: the tokenizer then decodes as it encodes."""
    from transformers import AutoTokenizer

    from launcher.datasets import examples

    root = tmp_path / "arithmetic"
    old = examples._tokenizer()
    old.backend_tokenizer.decoder = None  # WordLevel's own decode: tokens joined with spaces
    old.save_pretrained(root / "tokenizer")
    assert AutoTokenizer.from_pretrained(root / "tokenizer").decode(old("17+25=42")["input_ids"]) == "1 7 + 2 5 = 4 2"
    (root / ".written-v1").touch()
    chat = examples.arithmetic_chat("val", directory=str(root))
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    for text in ("17+25=42", "What is 3+4? 7"):
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.decode(chat[0]["input_ids"]).startswith("<|user|>What is ")
    assert sorted(p.name for p in root.glob(".written-v*")) == [f".written-v{examples.VERSION}"]


def test_lora_killed_mid_run_resumes_bit_identical(hub, tmp_path):
    """LoRA on the hub model, checkpointing every step on 2 ranks: the launcher SIGKILLed once step
    2's checkpoint is complete, the same command again ends bit-identical to an uninterrupted run."""
    from runs import assert_identical, processes_with, start, wait_for

    # momentum: the adapters' optimizer state is in the checkpoint too, or the resume would drift
    changes = {"model.peft": LORA, "train.epochs": 3, "checkpoint.every_n_steps": 1, "optimizer.momentum": 0.9}
    whole = run(hub, tmp_path, "whole", "--nproc", "2", **changes)
    path = write_recipe(tmp_path / "killed.yaml", sft_recipe(tmp_path / "killed", **changes))
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    proc = start("run", "--nproc", "2", path, env={**hub["env"], marker: "1"})
    wait_for(tmp_path / "killed" / "checkpoints" / "step_00000002" / "COMPLETE", proc, limit_s=300)
    proc.kill()  # the launcher; its workers see their parent die and end (test_robustness pins that)
    proc.communicate()
    deadline = time.monotonic() + 60  # a limit, not a timing: the rerun must not meet a live worker
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_with(marker), "workers outlived their launcher"
    assert not (tmp_path / "killed" / "model.pt").exists(), "the run ended before the kill: nothing was tested"
    resumed = launcher("run", "--nproc", "2", path, env=hub["env"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resum" in resumed.stdout.lower(), resumed.stdout
    assert_identical(load_weights(tmp_path / "killed"), load_weights(whole))
    # the checkpoints hold the adapters only (and the base's fingerprint): a fraction of the model
    step = whole / "checkpoints" / "step_00000012"
    state = torch.load(step / "state.pt", weights_only=False)
    saved = state["model"]
    tensors = [k for k in saved if isinstance(saved[k], torch.Tensor)]
    assert tensors and all("lora_" in k for k in tensors), tensors
    buffers = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert len(buffers) == len(tensors) and all(b.abs().sum() > 0 for b in buffers)
    on_disk = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
    assert on_disk < 0.5 * (whole / "model.pt").stat().st_size


@pytest.mark.skipif(torch_version() < MIN_TORCH, reason="FSDP2 needs torch >= 2.6")
def test_a_sharded_lora_checkpoint_resumes_in_one_process_on_its_base_only(hub, tmp_path):
    """An fsdp LoRA run on 2 ranks (its checkpoint: adapter shards), continued for a second epoch in
    one process under ddp, equals 2 epochs at once in one process (1e-5); continued on another base
    of the same shapes, it is refused in one line before any step."""
    lora = {"model.peft": LORA, "dist.strategy": "fsdp", "dist.fsdp.units": ["GPT2Block"]}
    whole = run(hub, tmp_path, "whole", **lora, **{"train.epochs": 2})  # the same global batch, one process
    first = run(hub, tmp_path, "first", "--nproc", "2", **lora)
    assert list((first / "checkpoints" / "step_00000004" / "shards").glob("*.distcp"))
    recipe = sft_recipe(first, **{"model.peft": LORA, "train.epochs": 2})
    wrong = launcher(
        "run",
        write_recipe(tmp_path / "wrong.yaml", changed(recipe, **{"model.pretrained": OTHER_MODEL})),
        env=hub["env"],
    )
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and "was trained on another frozen base model" in lines[0], wrong.stderr
    # other adapters: another scale (same shapes) in a worker, another rank in the --nproc parent
    for args, change, key in (([], {"lora_alpha": 16}, "lora_alpha"), (["--nproc", "2"], {"r": 8}, "r")):
        other = changed(recipe, **{"model.peft": {**LORA, **change}})
        proc = launcher("run", *args, write_recipe(tmp_path / f"{key}.yaml", other), env=hub["env"])
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1, proc.stderr[-2000:]
        assert said[0].startswith(f"error: model.peft.{key}: ") and "holds adapters trained with" in said[0], said
    resumed = launcher("run", write_recipe(tmp_path / "same.yaml", recipe), env=hub["env"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close_rel(load_weights(first), load_weights(whole), rtol=1e-5)


def export(*args, env, expect=0):
    proc = launcher("export", *args, env=env)
    assert proc.returncode == expect, proc.stderr[-3000:]
    if expect:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        return lines[0]
    return proc


@pytest.mark.skipif(torch_version() < MIN_TORCH, reason="FSDP2 needs torch >= 2.6")
def test_launcher_export_writes_a_checkpoint_as_the_runs_own_export(hub, tmp_path):
    """A LoRA run on the hub model, fsdp on 2 ranks, a checkpoint every step: its adapter names the
    hub id and commit (not the cache's path); `launcher export` of the run directory equals its hf/,
    with --merged its hf-merged/; an earlier step's sharded checkpoint exports its own adapters."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launcher.checkpoint.reading import model_weights

    lora = {"model.peft": LORA, "dist.strategy": "fsdp", "dist.fsdp.units": ["GPT2Block"]}
    run_dir = run(hub, tmp_path, "lora", "--nproc", "2", **lora, **{"checkpoint.every_n_steps": 1})
    adapter = json.loads((run_dir / "hf" / "adapter_config.json").read_text())
    commit = next((hub["cache"] / f"models--{MODEL.replace('/', '--')}" / "snapshots").iterdir()).name
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (MODEL, commit), adapter
    env = hub["env"]
    export(run_dir, tmp_path / "adapter", env=env)
    assert_same_export(tmp_path / "adapter", run_dir / "hf")
    export(run_dir / "checkpoints", tmp_path / "merged", "--merged", env=env)
    assert_same_export(tmp_path / "merged", run_dir / "hf-merged")
    step = run_dir / "checkpoints" / "step_00000003"
    assert list((step / "shards").glob("*.distcp"))
    export(step, tmp_path / "step3", env=env)
    saved, partial = model_weights(step)
    exported = load_file(tmp_path / "step3" / "adapter_model.safetensors")
    assert partial and exported and len(exported) == len([k for k in saved if "lora_" in k])
    for name, tensor in exported.items():  # peft saves base_model.model.X.lora_A.weight for X.lora_A.default.weight
        assert torch.equal(tensor, saved[name.replace(".weight", ".default.weight")]), name
    final = load_file(run_dir / "hf" / "adapter_model.safetensors")
    assert any(not torch.equal(exported[k], final[k]) for k in final)
    base = AutoModelForCausalLM.from_pretrained(hub["cache"].parent / "model")
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "step3"), PeftModel)
    # refused in one line: an OUT that exists, --overwrite of what is no export, a SOURCE that is no checkpoint
    said = export(run_dir, tmp_path / "adapter", env=env, expect=2)
    assert "exists; pass --overwrite" in said, said
    (tmp_path / "mine").mkdir()
    said = export(run_dir, tmp_path / "mine", "--overwrite", env=env, expect=2)
    assert "is not an earlier export" in said, said
    said = export(tmp_path, tmp_path / "x", env=env, expect=2)
    assert said.startswith("error: SOURCE: ") and not (tmp_path / "x").exists(), said
    export(run_dir, tmp_path / "adapter", "--overwrite", env=env)


def test_launcher_export_of_a_full_fine_tune_equals_its_export_and_refuses_merged(hub, one_process, tmp_path):
    """A one-process (ddp) checkpoint of a full fine-tune: the whole model, as the run's hf/."""
    export(one_process, tmp_path / "out", env=hub["env"])
    assert_same_export(tmp_path / "out", one_process / "hf")
    said = export(one_process, tmp_path / "merged", "--merged", env=hub["env"], expect=2)
    assert "no adapters to merge" in said, said
