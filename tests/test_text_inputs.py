"""Text read by `launcher tokenize`, TokenizedText and StreamedText: one reader, so one format per
suffix, and every bad row, empty file or full disk is one line naming the file (and line), exit 2,
with no partial output left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import launcher, worker_env
from hfkit import documents, make_tokenizer, write_jsonl
from launcher.checkpoint import step_dirs
from launcher.datasets.tokenized import StreamedText, TokenizedText
from launcher.errors import ArgumentError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def tokenize(tokenizer, out, *inputs, **kwargs):
    return launcher("tokenize", *inputs, "--tokenizer", tokenizer, "-o", out, **kwargs)


def last_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def test_json_lines_named_json_are_read_by_field_as_jsonl_is(tmp_path, tokenizer):
    docs = documents(20, seed=4)
    write_jsonl(tmp_path / "a.jsonl", docs)
    write_jsonl(tmp_path / "a.json", docs)
    assert tokenize(tokenizer, tmp_path / "l.bin", tmp_path / "a.jsonl").returncode == 0
    assert tokenize(tokenizer, tmp_path / "j.bin", tmp_path / "a.json").returncode == 0
    assert (tmp_path / "l.bin").read_bytes() == (tmp_path / "j.bin").read_bytes()


def test_json_lines_whose_other_fields_change_shape_are_read(tmp_path, tokenizer):
    """TokenizedText reads the text field alone: a later file (or a row past a file's first 10 MB)
    whose `meta` has other keys was datasets' cast error ("cannot read ...: DatasetGenerationError")."""
    docs = documents(8, seed=5)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"text": d, "meta": {"page": i}}) + "\n" for i, d in enumerate(docs[:4])))
    second.write_text("".join(json.dumps({"text": d, "meta": {"url": "x", "n": [1]}}) + "\n" for d in docs[4:]))
    data = TokenizedText(files=[str(first), str(second)], tokenizer=str(tokenizer), cache_dir=str(tmp_path / "c"))
    whole = write_jsonl(tmp_path / "whole.jsonl", docs)
    same = TokenizedText(files=str(whole), tokenizer=str(tokenizer), cache_dir=str(tmp_path / "c"))
    assert len(data) == len(same) == 8
    assert all(data[i]["input_ids"].tolist() == same[i]["input_ids"].tolist() for i in range(8))
    # a .json file holding one array of rows, as datasets reads it (and did for TokenizedText)
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": d} for d in docs], indent=1))
    read = TokenizedText(files=str(array), tokenizer=str(tokenizer), cache_dir=str(tmp_path / "c"))
    assert all(read[i]["input_ids"].tolist() == same[i]["input_ids"].tolist() for i in range(8))


BAD_ROWS = {
    "null": ('{"text": "w1 w2"}\n{"text": null}\n', "bad.jsonl:2: 'text' is None, not text"),
    "number": ('{"text": "w1"}\n\n{"text": 3}\n', "bad.jsonl:3: 'text' is 3, not text"),
    "missing": ('{"text": "w1"}\n{"body": "w2"}\n', "bad.jsonl:2: no 'text' field"),
    "broken": ('{"text": "w1"}\n{"text": "w2"\n', "bad.jsonl:2: not valid JSON lines"),
    "utf8": (b'{"text": "w1"}\n{"text": "w2 \xff"}\n', "bad.jsonl:2: not UTF-8 (byte 0xff"),
    "empty": ("", "bad.jsonl is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_or_an_empty_file_is_one_line_naming_file_and_line(tmp_path, tokenizer, case):
    content, expected = BAD_ROWS[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = last_line(tokenize(tokenizer, tmp_path / "out.bin", bad))
    assert expected in line, line
    assert not list(tmp_path.glob("*out.bin*"))  # no output, no temporary file
    with pytest.raises(ArgumentError, match="bad.jsonl"):
        TokenizedText(str(bad), str(tokenizer), max_length=8, cache_dir=str(tmp_path / "cache"))


def test_a_bad_row_deep_in_a_stream_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "stream.jsonl"
    write_jsonl(path, documents(400, seed=5))
    lines = path.read_text().splitlines()
    lines[299] = '{"text": 12}'
    path.write_text("\n".join(lines) + "\n")
    stream = StreamedText(str(path), str(tokenizer))  # the first document reads
    with pytest.raises(ArgumentError, match=r"stream.jsonl:300: 'text' is 12, not text"):
        list(stream)


def test_blank_lines_are_no_documents_in_text_files(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("w1 w2\n\n   \nw3 w4\n")
    rows = TokenizedText(str(tmp_path / "a.txt"), str(tokenizer), cache_dir=str(tmp_path / "cache"))
    assert len(rows) == 2


def test_documents_too_short_to_predict_anything_are_dropped_and_counted(tmp_path, tokenizer):
    """A document of one token (or none) gives a causal LM no position to predict: dropped at build
    time and counted in a note (the run's start and `launcher check` print it), not trained on."""
    docs = ["w1 w2 w3", "w4", "w5 w6", "", "w7", "w8 w9"]
    write_jsonl(tmp_path / "a.jsonl", docs)
    rows = TokenizedText(str(tmp_path / "a.jsonl"), str(tokenizer), cache_dir=str(tmp_path / "cache"))
    assert [rows[i]["input_ids"].numel() for i in range(len(rows))] == [3, 2, 2]
    assert rows.notes == ["3 of 6 documents have fewer than 2 tokens (nothing to predict) and are dropped"]
    cut = TokenizedText(str(tmp_path / "a.jsonl"), str(tokenizer), max_length=2, cache_dir=str(tmp_path / "cache"))
    assert len(cut) == 3 and cut.dropped == 3  # cut to 2 tokens, the longest document stays
    write_jsonl(tmp_path / "short.jsonl", ["w1", "w2"])
    with pytest.raises(ArgumentError, match=r"every document is dropped: 2 of 2 documents have fewer than 2"):
        TokenizedText(str(tmp_path / "short.jsonl"), str(tokenizer), cache_dir=str(tmp_path / "cache"))
    for key in ("max_length", "pack"):
        with pytest.raises(ArgumentError, match="1 leaves samples of one token") as e:
            TokenizedText(str(tmp_path / "a.jsonl"), str(tokenizer), **{key: 1})
        assert e.value.argument == key


@pytest.mark.parametrize("key, value", [("max_length", -3), ("max_length", 0), ("pack", 0), ("pack", -4)])
def test_every_length_is_checked_when_built(tmp_path, tokenizer, key, value):
    write_jsonl(tmp_path / "a.jsonl", documents(5))
    with pytest.raises(ArgumentError, match=f"{value} is not a length") as e:
        TokenizedText(str(tmp_path / "a.jsonl"), str(tokenizer), **{key: value})
    assert e.value.argument == key


def test_a_garbage_tokenizer_file_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("not json at all")
    (tmp_path / "a.txt").write_text("w1\n")
    line = last_line(tokenize(tmp_path / "tokenizer.json", tmp_path / "o.bin", tmp_path / "a.txt"))
    assert line.startswith("error: --tokenizer:") and "is not a tokenizer.json" in line


def test_two_tokenize_runs_to_one_output_leave_one_whole_file(tmp_path, tokenizer):
    """Each writes a temporary file of its own and renames it: the output is one run's, whole."""
    docs = documents(3000, seed=6)
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    assert tokenize(tokenizer, tmp_path / "one.bin", tmp_path / "a.txt").returncode == 0
    out = tmp_path / "out.bin"
    cmd = [sys.executable, "-m", "launcher", "tokenize", str(tmp_path / "a.txt"), "--tokenizer", str(tokenizer)]
    procs = [subprocess.Popen([*cmd, "-o", str(out), "--overwrite"], env=worker_env()) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert out.read_bytes() == (tmp_path / "one.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("w1 w2\n")
    dead = subprocess.run(["true"]).args and 2**22 + 12345  # above pid_max's default: no such process
    stale = tmp_path / f".out.bin.{dead}.abc.tmp"
    stale.write_bytes(b"partial")
    assert tokenize(tokenizer, tmp_path / "out.bin", tmp_path / "a.txt").returncode == 0
    assert not stale.exists()


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, tokenizer):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small filesystem")
    (tmp_path / "a.txt").write_text("\n".join(documents(4000, seed=7)) + "\n")
    mount = tmp_path / "small"
    mount.mkdir()
    cmd = f"{sys.executable} -m launcher tokenize {tmp_path / 'a.txt'} --tokenizer {tokenizer} -o {mount / 'o.bin'}"
    script = f"mount -t tmpfs -o size=16k tmpfs {mount} || exit 99; {cmd}; code=$?; ls -a {mount}; exit $code"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=worker_env(), capture_output=True, text=True)
    if proc.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    line = last_line(proc)
    assert line.startswith(f"error: --output: writing {mount / 'o.bin'} failed: no space left on {mount} ("), line
    assert "MiB free there" in line
    assert proc.stdout.split() == [".", ".."]  # neither the output nor a temporary file


def _slow_run(tmp_path, **data):
    from conftest import recipe_dict, write_recipe

    changes = {"data.train": {"_component_": "testkit.SlowToPrepare", **data}, "dist.timeout_s": 2}
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run"), **changes}))
    return launcher("run", "--nproc", "2", path)


def test_preparing_data_longer_than_the_collective_timeout_does_not_fail(tmp_path):
    """Local rank 0 tokenizes for 4 s; the others wait on the store, not in a 2 s collective."""
    proc = _slow_run(tmp_path, seconds=4)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_rank_dying_while_rank_0_prepares_data_is_not_blamed_on_the_data(tmp_path):
    proc = _slow_run(tmp_path, seconds=2, die_rank=1)
    assert proc.returncode not in (0, 2), proc.stderr[-3000:]
    assert "data.train" not in proc.stderr and "rank 1" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "in-a-loader-worker"])
def test_a_bad_row_met_while_training_is_one_line_after_saving_the_steps_before_it(tmp_path, workers):
    """One process, no periodic checkpoint: the 9 steps before the row's are saved, then exit 2.
    Read by a DataLoader worker, the row's error crosses into the training process as the same
    line, and the process exits (its workers ignore SIGTERM: it used to wait on them forever)."""
    from conftest import DELETE, changed, write_recipe
    from hfkit import lm_recipe

    stream = tmp_path / "s.jsonl"
    write_jsonl(stream, documents(300, seed=3))
    lines = stream.read_text().splitlines()
    lines[150] = '{"text": null}'  # sample 151: in step 10 at 16 samples a step
    stream.write_text("\n".join(lines) + "\n")
    changes = {"data.train._component_": "launcher.datasets.tokenized.StreamedText", "data.train.files": str(stream)}
    changes |= {"data.train.cache_dir": DELETE, "data.val": None, "train.epochs": None, "train.max_steps": 40}
    changes |= {"data.num_workers": workers}
    recipe = changed(lm_recipe(tmp_path, tmp_path / "run"), **changes)
    proc = launcher("run", write_recipe(tmp_path / "r.yaml", recipe), timeout=120)
    line = last_line(proc)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith(f"error: data.train.files: {stream}:151: 'text' is None, not text"), line
    assert line.endswith("(the 9 steps before it are saved: fix the row and run the same command)")
    assert [p.name for p in step_dirs.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000009"]


def test_a_killed_tokenizations_temporary_file_in_the_cache_is_removed(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", documents(5))
    cache = tmp_path / "cache"
    TokenizedText(str(tmp_path / "a.jsonl"), str(tokenizer), cache_dir=str(cache))
    where = next(cache.rglob("cache-*.arrow")).parent
    stale, fresh = where / "tmpdeadbeef", where / "tmplivewriter"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    os.utime(stale, (0, 0))  # untouched for long: its writer is gone
    TokenizedText(str(tmp_path / "a.jsonl"), str(tokenizer), max_length=4, cache_dir=str(cache))
    assert not stale.exists() and fresh.exists()  # a live writer's file stays


def test_tokenize_shows_progress_on_a_terminal(tmp_path, tokenizer):
    if shutil.which("script") is None:
        pytest.skip("needs script(1) for a terminal")
    (tmp_path / "a.txt").write_text("\n".join(documents(50)) + "\n")
    cmd = f"{sys.executable} -m launcher tokenize {tmp_path / 'a.txt'} --tokenizer {tokenizer} -o {tmp_path / 'o.bin'}"
    term = f"stty rows 40 cols 120; {cmd}"  # a terminal of some size: tqdm draws nothing at 0 columns
    proc = subprocess.run(["script", "-qec", term, "/dev/null"], env=worker_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert "tokenizing into o.bin" in proc.stdout and "50 docs" in proc.stdout, proc.stdout
