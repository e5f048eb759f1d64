"""Hugging Face transformers models in recipes (the [hf] extra, imported only when a recipe names them).

    model:
      _component_: launcher.models.hf.causal_lm
      config: {_component_: transformers.GPT2Config, n_layer: 2, n_embd: 64, n_head: 2, vocab_size: 512}

or `pretrained:` a directory `save_pretrained` wrote, or a hub id (`Qwen/Qwen2.5-0.5B`, with an optional
`revision`), fetched once per node into the hub's cache (launcher/hub.py).
Given `labels`, such a model computes its own loss (the recipe then names no loss), the mean over
the labels that are not -100, shifted by one: the launcher's token counting follows it
(launcher/data/batches.py). At the end of a run the weights are also written with `save_pretrained`
(`export`), so `from_pretrained(run_dir / "hf")` loads them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher import hub
from launcher.errors import ArgumentError, TrainingError
from launcher.models import hf_weights
from launcher.recipe.components import require
from launcher.storage import write_failed


def causal_lm(
    config: Any = None, pretrained: str | None = None, revision: str | None = None, attn_implementation: str = "sdpa"
) -> nn.Module:
    """`AutoModelForCausalLM.from_config(config)`, or `.from_pretrained(pretrained)`: a local directory
    or a hub id (at `revision`), fetched once per node into the hub's cache (launcher/hub.py). On the
    meta device (`launcher check`) only the config is read: no weights are downloaded or loaded."""
    transformers = require("transformers", "launcher.models.hf.causal_lm")
    if (config is None) == (pretrained is None):
        raise ArgumentError(
            "config",
            "give either config (a transformers config component) or pretrained (a directory save_pretrained "
            "wrote, or a hub id)",
        )
    if pretrained is not None:
        model: Any = _pretrained(transformers, pretrained, revision, attn_implementation)
    else:
        if revision is not None:
            raise ArgumentError("revision", "a revision names a commit of pretrained's hub id; there is no pretrained")
        if not isinstance(config, transformers.PretrainedConfig):
            raise ArgumentError("config", f"expected a transformers config component, got a {type(config).__name__}")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if getattr(model, "loss_type", None) is None:
        # transformers guesses the loss from the class name, finds none in GPT2LMHeadModel's, and warns
        # `loss_type=None ... unrecognized` on every use; a causal LM's loss is the one it falls back to
        model.loss_type = "ForCausalLM"
    return model


def _pretrained(transformers: Any, spec: str, revision: str | None, attn_implementation: str) -> nn.Module:
    on_meta = torch.empty(()).device.type == "meta"
    what = "a local directory written by save_pretrained"
    _refuse_missing_run_export(spec)
    source = hub.resolve(
        spec, "pretrained", what=what, revision=revision, files=hub.CONFIG_FILES if on_meta else hub.MODEL_FILES
    )
    model = _load_pretrained(transformers, source, what, attn_implementation, on_meta)
    if source.hub_id is not None:
        # the hub id and commit, not this machine's cache path: what an exported adapter names as its base
        model.config._name_or_path = source.hub_id
        model.launcher_hub_revision = source.commit or revision
    return model


def _refuse_missing_run_export(spec: str) -> None:
    """A run's export (`runs/<name>/hf`) that is not there yet: the run that writes it comes first
    (recipes/sft_lora.yaml fine-tunes what recipes/hf_causal_lm.yaml exports)."""
    path = Path(spec).expanduser()
    if path.exists() or hub.is_hub_id(spec) or path.name not in ("hf", "hf-merged") or len(path.parts) < 2:
        return  # there, a hub id (org/hf is one), or no run's export
    run = path.parent.name
    raise ArgumentError(
        "pretrained",
        f"{spec} does not exist: it is the export of the run {run!r}, written when that run ends; "
        f"run its recipe first (launcher run recipes/{run}.yaml)",
    )


def _load_pretrained(transformers: Any, source: hub.Source, what: str, attn_implementation: str, on_meta: bool) -> Any:
    path = source.path
    if not (path / "config.json").is_file():
        raise ArgumentError("pretrained", f"{path} has no config.json: name {what}, or a hub id")
    if on_meta:  # the shapes only (check): from the config, weights neither read nor downloaded
        if source.hub_id is None and (damaged := damaged_weights(path)):
            raise ArgumentError(
                "pretrained", f"{damaged[0]} is damaged ({damaged[1]}): copy, download or save_pretrained it again"
            )
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        if source.hub_id is None and (unfit := hf_weights.header_error(path, model)):
            raise ArgumentError("pretrained", unfit)
        return model
    if not any(path.glob("*.safetensors")):
        if source.hub_id is not None:
            raise hub.lacks(source, "pretrained", "*.safetensors weights (the launcher loads no pickles)")
        raise ArgumentError(
            "pretrained", f"{path} holds no *.safetensors weights: the launcher loads safetensors only (no pickles)"
        )
    try:
        with _quiet(transformers):
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                path,
                local_files_only=True,
                attn_implementation=attn_implementation,
                dtype=torch.float32,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # weights of another shape are reported below, in one line
            )
    except Exception as e:
        # transformers names neither the file nor a way out; a damaged one is named here
        if damaged := damaged_weights(path):
            raise ArgumentError(
                "pretrained",
                f"{damaged[0]} is damaged ({damaged[1]}): copy, download or save_pretrained it again",
            ) from None
        raise e
    if unfit := hf_weights.load_error(path, model, info):
        # transformers would train what it could not load from random weights (another architecture's
        # config.json loads nothing), and exit 0
        raise ArgumentError("pretrained", unfit)
    return model


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' table of the weights that did not load: hf_weights says it in one line. A filter,
    not a level: transformers checks its tensor-parallel plan, and warns about it, when the level is set."""
    logger = transformers.utils.logging.get_logger("transformers.modeling_utils")

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger.addFilter(errors_only)
    try:
        yield
    finally:
        logger.removeFilter(errors_only)


def with_adapters(model: nn.Module, config: Any) -> nn.Module:
    """`peft.get_peft_model(model, config)` (model.peft: any peft config, e.g. LoraConfig): the base
    model frozen, only the adapters train."""
    peft = require("peft", "model.peft")
    if not isinstance(config, peft.PeftConfig):
        raise ArgumentError(
            "_component_", f"expected a peft config component (peft.LoraConfig, ...), got a {type(config).__name__}"
        )
    rank = getattr(config, "r", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:  # peft's own check fails on a string
        raise ArgumentError("r", f"the adapters' rank must be a positive whole number, got {rank!r}")
    if getattr(config, "revision", None) is None and (revision := getattr(model, "launcher_hub_revision", None)):
        config.revision = revision  # saved in adapter_config.json beside the hub id
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing: its noise, not the recipe's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # and corrects fan_in_fan_out for GPT-2's Conv1D layers itself, saying so once per layer
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
        # and that adapting a tied embedding or head complicates merging: merged() unties them
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`", category=UserWarning)
        try:
            return peft.get_peft_model(model, config)
        except Exception as e:  # peft's complaints about the config against this model, as one line
            raise _peft_error(model, config, e) from None


def _peft_error(model: nn.Module, config: Any, e: Exception) -> ArgumentError:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if type(e).__name__ == "NoMatchingPeftModuleError" or "target_modules" in message.lower():
        # what the model's layers are called: the names target_modules matches against
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _adaptable(m)})
        wanted = getattr(config, "target_modules", None)
        return ArgumentError(
            "target_modules",
            f"{wanted!r} matches no layer of the model; its layers are named {', '.join(names)} (or use all-linear)",
        )
    for field in ("r", "lora_alpha", "lora_dropout"):
        if f"`{field}`" in message or message.startswith(f"{field} "):
            return ArgumentError(field, message)
    return ArgumentError("", f"peft could not adapt the model: {type(e).__name__}: {message}")


def _adaptable(module: nn.Module) -> bool:
    """A layer LoRA can wrap: a Linear, or transformers' Conv1D (GPT-2's), an Embedding or a convolution."""
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)) or type(module).__name__ == "Conv1D"


def merged(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A peft model's adapters merged into its base, on the CPU, from the run's whole `weights`
    (the trained model may be sharded): the base rebuilt from its config, adapted alike, loaded,
    merged. It holds one more copy of the model in host memory, once, at the end."""
    transformers = require("transformers", "model.peft's merged export")
    base = model.get_base_model()  # type: ignore[operator]  # a PeftModel's
    config = copy.deepcopy(base.config)
    adapters: Any = copy.deepcopy(model.peft_config["default"])  # type: ignore[index]
    tied = _adapted_tied_embeddings(base)
    if tied:
        # merging into the one matrix an embedding and its head share changes the other too: the merged
        # model gets an embedding and a head of its own, each from the trained model's (its
        # config.json says tie_word_embeddings false)
        for each in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            each.tie_word_embeddings = False
        if getattr(adapters, "ensure_weight_tying", False):  # nothing tied is left to tie: the same layers
            adapters.ensure_weight_tying = False
            adapters.target_modules = sorted(_adapted_names(base))
    with torch.device("cpu"):
        fresh = transformers.AutoModelForCausalLM.from_config(config)
        if tied and fresh.get_input_embeddings().weight is fresh.get_output_embeddings().weight:
            raise RuntimeError(f"{type(fresh).__name__} ties {' and '.join(tied)} whatever its config says")
        adapted = with_adapters(fresh, adapters)
    adapted.load_state_dict(weights)
    return adapted.merge_and_unload()  # type: ignore[operator]  # a PeftModel's


def _adapted_names(base: nn.Module) -> set[str]:
    """The names of the layers that hold adapters (peft's tuner layers) in a peft model's base."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}


def _adapted_tied_embeddings(base: nn.Module) -> list[str]:
    """The embedding and head of a peft model's base, when they share one matrix (the config's
    tie_word_embeddings) and adapters wrap either; [] otherwise."""
    if not getattr(base.config.get_text_config(), "tie_word_embeddings", False):  # type: ignore[operator, union-attr]
        return []
    pair = {"embedding": base.get_input_embeddings(), "head": base.get_output_embeddings()}  # type: ignore[operator]
    names = {id(module): name for name, module in base.named_modules()}
    adapted = _adapted_names(base)
    if not any(names.get(id(module)) in adapted for module in pair.values()):
        return []
    return [f"the {what} {names.get(id(module), '?')}" for what, module in pair.items()]


def is_adapted(model: nn.Module) -> bool:
    """A peft model (adapters around a frozen base); checked without importing peft."""
    return hasattr(model, "peft_config") and callable(getattr(model, "merge_and_unload", None))


def damaged_weights(directory: Path) -> tuple[Path, str] | None:
    """The first safetensors file in `directory` whose header is unreadable or whose tensors run past
    its end (a truncated copy or download), with safetensors' reason; None if all are whole. It reads
    headers only. Bytes changed inside a tensor keep the file valid: safetensors holds no checksum."""
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as e:  # safetensors' SafetensorError, or an OSError reading it
            return file, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def is_pretrained(model: nn.Module) -> bool:
    """A transformers model (it has save_pretrained); checked without importing transformers."""
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def export(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    directory: Path,
    save_tokenizer: Callable[[Path], None] | None = None,
) -> None:
    """`save_pretrained` with the run's final (whole, CPU) weights: safetensors and config.json, and
    the data's tokenizer (`save_tokenizer`), so that from_pretrained and generate work at once;
    written into a temporary directory beside `directory` and renamed over it: a kill leaves the
    previous export or none, never a config.json without its weights. The files are made to
    behave like the base's (`portable`): generation stops at the chat template's end of turn, an
    adapter names its base by hub id, and nothing names this machine."""
    if directory.is_symlink():  # RunDir.problems refuses it at start; one made since is not written through
        raise TrainingError(
            f"{directory} is a symbolic link; the export replaces it and never writes through a link: remove the "
            "link (what it points to stays); the final weights are in model.pt beside it"
        )
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)  # type: ignore[operator]  # a PreTrainedModel's
        if save_tokenizer is not None:
            save_tokenizer(tmp)
        portable(tmp, model)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except OSError as e:  # a run directory made read-only, or full, since the run started
        raise write_failed(directory, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# what transformers writes into tokenizer_config.json about how this machine loaded it
_LOCAL_TOKENIZER_KEYS = ("local_files_only", "is_local", "cache_dir", "name_or_path", "_commit_hash", "token")


def portable(directory: Path, model: nn.Module) -> None:
    """An export's files made to load and generate elsewhere as the base does: no machine-local
    settings in tokenizer_config.json; generation_config.json stopping at the chat template's
    end-of-turn token as well as at eos; an adapter's base named by hub id (with its revision), or,
    for a base built from a config, a README note that the adapter needs that very base."""
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        settings = json.loads(tokenizer_config.read_text())
        kept = {k: v for k, v in settings.items() if k not in _LOCAL_TOKENIZER_KEYS}
        if kept != settings:
            tokenizer_config.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")
    generation_config = directory / "generation_config.json"
    if generation_config.is_file() and (stops := end_of_turn_ids(directory)):
        settings = json.loads(generation_config.read_text())
        eos = settings.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        settings["eos_token_id"] = eos + [i for i in stops if i not in eos]
        generation_config.write_text(json.dumps(settings, indent=2) + "\n")
    adapter_config = directory / "adapter_config.json"
    if adapter_config.is_file():
        settings = json.loads(adapter_config.read_text())
        base = model.get_base_model() if is_adapted(model) else model  # type: ignore[operator]
        name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        settings["base_model_name_or_path"] = name
        if isinstance(settings.get("target_modules"), list):  # peft keeps a set: its order varied per process
            settings["target_modules"] = sorted(settings["target_modules"])
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        if name is None:
            _note_unnamed_base(directory / "README.md")


def _note_unnamed_base(readme: Path) -> None:
    note = (
        "# An adapter for a base built from a config\n\n"
        "This LoRA adapter was trained on a base model built from a config (`model.config` in the recipe), "
        "not loaded from the hub or a directory, so `base_model_name_or_path` is null and no published model "
        "is its base: loaded over any other model of the same shapes (`PeftModel.from_pretrained(other, this "
        "directory)`), it gives garbage without an error. Use the merged model instead (`hf-merged/` beside a "
        "run's `hf/`, or `launcher export RUN OUT --merged`), which holds that base with the adapter in it.\n\n"
    )
    readme.write_text(note + (readme.read_text() if readme.is_file() else ""))


def end_of_turn_ids(directory: Path) -> list[int]:
    """The token(s) the tokenizer saved in `directory` ends an assistant's turn with, by its chat
    template (Qwen's <|im_end|>, Llama 3's <|eot_id|>): the first special or added token the template
    writes after an answer. [] without a tokenizer, a template, or such a token."""
    if not (directory / "tokenizer_config.json").is_file():
        return []
    transformers = require("transformers", "the export's generation config")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if not getattr(tok, "chat_template", None):
            return []
        answer = "LAUNCHERANSWER7c1e9b"
        text = str(
            tok.apply_chat_template(
                [{"role": "user", "content": "1"}, {"role": "assistant", "content": answer}], tokenize=False
            )
        )
    except Exception:  # a template that refuses this conversation (one that must open with a system turn)
        return []
    if answer not in text:
        return []
    after = tok(text[text.index(answer) + len(answer) :], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | {int(i) for i in getattr(tok, "added_tokens_decoder", {})}
    special -= {tok.unk_token_id, tok.pad_token_id}  # text the vocabulary lacks, or padding: no end of turn
    return next(([int(i)] for i in after if int(i) in special), [])
