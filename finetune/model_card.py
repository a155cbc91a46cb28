"""The model card (README.md with Hub YAML metadata) that `dgemma-ft push` writes into the uploaded folder.

It says what the model is (adapter, merged or fully fine-tuned checkpoint of which base), how it was trained (the
recipe and the training figures), how well it does (the evaluation table), and how to run it with this kit and
with plain transformers / PEFT. The front matter is huggingface_hub's `ModelCardData`; the evaluation's solve rates
go into it as `EvalResult`s, so the Hub shows them as the card's model-index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from dgemma_ft.errors import DataError
from dgemma_ft.finetune.tiny import CHARACTERS, SPECIAL_TOKENS
from dgemma_ft.tasks.sources import parse_hf_source

KIT = "dgemma-ft"
_GEMMA_VOCAB = 262144  # the released DiffusionGemma tokenizer


@dataclass
class CardInfo:
    kind: str  # 'adapter' | 'merged' | 'full'
    repo: str
    base: str | None = None  # the base checkpoint (Hub id or local path)
    task: str | None = None
    recipe_text: str | None = None
    datasets: list[str] = field(default_factory=list)
    eval_report: dict | None = None
    eval_source: str | None = None  # where the evaluation was measured, when not on this folder itself
    train_summary: dict | None = None
    final_loss: float | None = None
    layout: str | None = None  # adapters and merges: 'shared' | 'separate'
    untied: bool = False
    license: str | None = None
    dtype: str | None = None


def is_hub_id(name: str | None) -> bool:
    if not name or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    return not Path(name).expanduser().exists()


def license_for(base: str | None, vocab_size: int | None) -> str | None:
    """Google's DiffusionGemma is under the Gemma terms; the kit's built-in tiny model is the kit's own
    (Apache-2.0). Anything else: unknown (the card then asks the reader to check the base's licence)."""
    if (base or "").lower().startswith("google/") or (vocab_size or 0) >= _GEMMA_VOCAB:
        return "gemma"
    if base == "tiny" or vocab_size == len(SPECIAL_TOKENS) + len(CHARACTERS):
        return "apache-2.0"
    return None


def _hub_dataset(source: str | None) -> tuple[str, str | None, str | None] | None:
    """(dataset id, config, split) of an `hf:owner/name[:config][@split]` source; None for anything else."""
    if not source or not source.startswith("hf:"):
        return None
    try:
        return parse_hf_source(source)
    except DataError:  # a report.json edited by hand; the card then names the source as written
        return None


def datasets_of(recipe) -> list[str]:
    """Hub datasets named by the recipe's task sources (`hf:owner/name[:config][@split]`)."""
    if recipe is None:
        return []
    sources = [spec.source for spec in (recipe.task.train, *recipe.task.train_also, recipe.task.eval)
               if spec is not None]
    found = []
    for source in [*sources, *recipe.task.exclude_sources]:
        hub = _hub_dataset(source)
        if hub and hub[0] not in found:
            found.append(hub[0])
    return found


def final_logged_loss(log: Path) -> float | None:
    if not log.exists():
        return None
    loss = None
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record.get("loss"), (int, float)):
            loss = float(record["loss"])
    return loss


# ------------------------------------------------------------------------------------------------- metadata
def eval_results(info: CardInfo) -> list[EvalResult]:
    """The report's solve rates for this model (not the base it was compared with), one per sampler setting, as
    the Hub's model-index holds them. A partial evaluation (`eval --limit 2`, other steps...) is left out: the Hub
    would show its figures as the model's score."""
    report = info.eval_report or {}
    if is_partial(report):
        return []
    task = report.get("task") or info.task
    dataset = _eval_dataset(report.get("data"), task)
    return [EvalResult(task_type="text-generation", task_name=task, **dataset, metric_type="accuracy",
                       metric_name=f"solve rate ({setting_words(row)})", metric_value=float(row["solve_rate"]))
            for row in report.get("results", [])
            if row.get("model") != "base" and isinstance(row.get("solve_rate"), (int, float))]


def _eval_dataset(source: str | None, task: str | None) -> dict:
    """The model-index's dataset fields for the report's eval source: a Hub dataset with its config and split, a
    local file (its stem as the type, the path as the name), or the task's generated examples."""
    hub = _hub_dataset(source)
    if hub:
        return dict(dataset_type=hub[0], dataset_name=hub[0], dataset_config=hub[1], dataset_split=hub[2])
    if source == "generate":
        return dict(dataset_type="generated", dataset_name=f"{task or 'task'} examples generated by {KIT}")
    if source:
        return dict(dataset_type=Path(source).stem or source, dataset_name=source)
    return dict(dataset_type="unknown", dataset_name="eval set")


def setting_words(row: dict) -> str:
    """One sampler setting of the report, as the metric's name says it."""
    return (f"{row.get('steps', '-')} denoising steps, pin {_on_off(row.get('pin'))}, "
            f"renoise {_on_off(row.get('renoise'))}")


def card_data(info: CardInfo) -> ModelCardData:
    """The card's YAML front matter: what the Hub filters, links and shows (model-index from `eval_results`)."""
    tags = ["diffusion", "block-diffusion", "diffusion_gemma", KIT]
    if info.task:
        tags.append(info.task)
    if info.kind == "adapter":
        tags.append("lora")
    elif info.kind == "merged":
        tags.append("merged-lora")
    results = eval_results(info)
    hub_base = is_hub_id(info.base)
    relation = {"adapter": "adapter", "merged": "merge", "full": "finetune"}[info.kind] if hub_base else None
    extra = {"base_model_relation": relation} if relation else {}
    return ModelCardData(base_model=info.base if hub_base else None,
                         library_name="peft" if info.kind == "adapter" else "transformers",
                         pipeline_tag="text-generation", license=info.license, tags=tags,
                         datasets=list(info.datasets) or None, eval_results=results or None,
                         model_name=info.repo.split("/")[-1] if results else None, **extra)


# ---------------------------------------------------------------------------------------------------- sections
def eval_table(report: dict) -> str:
    """A markdown table of the report's `results` (one row per model and sampler setting)."""
    rows = ["| model | denoising steps | pin | renoise | solved | solve rate | tokens/forward |",
            "|---|---:|:---:|:---:|---:|---:|---:|"]
    for r in report.get("results", []):
        rate = r.get("solve_rate")
        tpf = r.get("tokens_per_forward")
        rows.append(f"| {r.get('model', '-')} | {r.get('steps', '-')} | {_on_off(r.get('pin'))} | "
                    f"{_on_off(r.get('renoise'))} | {r.get('correct', '-')}/{r.get('examples', '-')} | "
                    f"{'-' if rate is None else f'{rate:.1%}'} | {'-' if tpf is None else f'{tpf:.2f}'} |")
    return "\n".join(rows)


def _on_off(value) -> str:
    return "-" if value is None else ("on" if value else "off")


def _what(info: CardInfo) -> str:
    base = f"`{info.base}`" if info.base else "a DiffusionGemma base"
    if info.kind == "adapter":
        text = (f"A LoRA adapter for {base} (DiffusionGemma, block diffusion), fine-tuned with {KIT}"
                + (f" on the `{info.task}` task." if info.task else "."))
        if info.layout == "separate":
            text += (" The encoder and decoder passes carry different adapters, so it cannot be folded into the "
                     "shared base weights (`dgemma-ft merge --untie` can save an untied model).")
        else:
            text += (" One adapter serves both the encoder and the decoder pass (they share their weights); it is "
                     "stored in the standard PEFT form with both paths listed, the decoder's tensors equal to the "
                     "encoder's, so plain PEFT computes the same function.")
        return text
    if info.kind == "merged":
        text = (f"{base} with a LoRA adapter fine-tuned by {KIT}"
                + (f" on the `{info.task}` task" if info.task else "") + " folded into its weights: a standard "
                "checkpoint, no PEFT needed.")
        if info.untied:
            text += (" The encoder and decoder carried different adapters, so their text weights are stored "
                     "separately here (`tie_word_embeddings: false`, which unties every DiffusionGemma tie); the "
                     "checkpoint is larger than the base.")
        return text
    return (f"{base} fully fine-tuned with {KIT}" + (f" on the `{info.task}` task." if info.task else "."))


def _evaluation(info: CardInfo) -> list[str]:
    report = info.eval_report
    if not report or not report.get("results"):
        return ["## Evaluation", "", "No evaluation report was found; run `dgemma-ft eval` on the run folder "
                                     "to measure it.", ""]
    where = f" on `{report['data']}`" if report.get("data") else ""
    count = f" ({report['examples']} examples" if report.get("examples") is not None else ""
    seed = f", sampling seed {report['seed']})" if report.get("seed") is not None else (")" if count else "")
    lines = ["## Evaluation", "", f"Task `{report.get('task', info.task)}`{where}{count}{seed}. A row per model "
             "and sampler setting: *denoising steps* is the most refinement passes per block, *pin* holds the "
             "task's known tokens, *renoise* sends tokens the task's validator flags back to noise.", ""]
    lines += [evaluation_line(report), ""]
    if info.eval_source:
        lines += [f"Measured with {KIT} on {info.eval_source}.", ""]
    lines += [eval_table(report), ""]
    if eval_results(info):
        lines += ["This model's solve rates (not the base's rows) are also in the card's metadata (model-index), so "
                  "the Hub lists them as its evaluation results.", ""]
    elif is_partial(report):
        lines += ["A partial evaluation stays out of the card's metadata (model-index), so the Hub does not show "
                  "it as the model's score.", ""]
    return lines


def is_partial(report: dict | None) -> bool:
    """Whether report.json says it is a partial evaluation (`eval --limit 2`, other steps, another --data...)."""
    return bool(report) and (report.get("evaluation") or {}).get("scope") == "partial"


def is_full_evaluation(report: dict | None) -> bool:
    """Whether report.json says it is the recipe's full evaluation (reports before the record count as unknown,
    not full)."""
    return bool(report) and (report.get("evaluation") or {}).get("scope") == "full"


def evaluation_line(report: dict) -> str:
    """Which evaluation the card shows, from report.json's own record, so a reader never mistakes a quick
    `eval --limit 2` for the model's score."""
    record = report.get("evaluation")
    if not record:
        return ("Evaluation: this report does not record whether it covers the recipe's full eval set (an older "
                f"{KIT} wrote it); run `{KIT} eval` on the run folder to measure the full set.")
    data = f"`{report['data']}`, " if report.get("data") else ""
    examples = record.get("examples", report.get("examples"))
    settings = (f"denoising steps {', '.join(str(s) for s in record.get('steps', []))}, pin "
                f"{_both_or(record.get('pin'))}, renoise {_both_or(record.get('renoise'))}, sampling seed "
                f"{record.get('seed')}")
    written = f"written by {record.get('written_by', KIT)}" + (f" on {record['date'][:10]}" if record.get("date")
                                                              else "")
    if record.get("scope") == "full":
        return f"Evaluation: the recipe's full eval set ({data}{examples} examples), {settings}; {written}."
    of_full = f" of {record['full_examples']}" if record.get("full_examples") else ""
    return (f"Evaluation: a partial evaluation ({', '.join(record.get('differences', []))}) on {data}{examples}"
            f"{of_full} examples, {settings}; {written}. It is not the recipe's full evaluation: run `{KIT} eval` "
            f"on the run folder to measure that.")


def _both_or(values) -> str:
    values = list(values or [])
    return "on and off" if len(values) > 1 else _on_off(values[0]) if values else "-"


def _training(info: CardInfo) -> list[str]:
    lines = ["## Training", ""]
    summary = info.train_summary or {}
    figures = []
    if summary.get("steps") is not None:
        figures.append(f"| steps | {summary['steps']} |")
    if summary.get("train_seconds") is not None:
        figures.append(f"| training time | {summary['train_seconds']} s |")
    if summary.get("examples_per_second") is not None:
        figures.append(f"| examples/s | {summary['examples_per_second']} |")
    if info.final_loss is not None:
        figures.append(f"| final logged loss | {info.final_loss:.4f} |")
    if summary.get("train_loss") is not None:
        figures.append(f"| mean training loss | {summary['train_loss']:.4f} |")
    if summary.get("train_examples") is not None:
        figures.append(f"| training examples | {summary['train_examples']} |")
    if summary.get("trainable_parameters") is not None:
        figures.append(f"| trainable / total parameters | {summary['trainable_parameters']:,} / "
                       f"{summary.get('total_parameters', 0):,} |")
    if figures:
        lines += ["| | |", "|---|---:|", *figures, ""]
    else:
        lines += ["No training summary was found.", ""]
    if info.recipe_text:
        lines += [f"The recipe ({KIT}), as resolved for the run:", "", "```yaml", info.recipe_text.rstrip(), "```",
                  ""]
    return lines


def _usage(info: CardInfo) -> list[str]:
    repo = info.repo
    folder = repo.split("/")[-1]
    dtype = "torch.bfloat16"
    lines = ["## How to use", "", f"### With {KIT}", "", "```bash", f"hf download {repo} --local-dir {folder}"]
    if info.kind == "adapter":
        base = info.base or "BASE"
        lines += [f"# recipe.yaml names the base in model.name: point it at your copy of {base}",
                  f"dgemma-ft eval {folder}/recipe.yaml --adapter {folder}",
                  f"dgemma-ft generate {folder}/recipe.yaml --adapter {folder} --prompt \"...\"", "```", ""]
    else:
        lines += [f"dgemma-ft eval {folder}            # recipe.yaml in the folder says which task and data",
                  f"dgemma-ft generate {folder} --example 0   # or --prompt \"...\"", "```", ""]
    lines += ["### With transformers" + (" and PEFT" if info.kind == "adapter" else ""), "", "```python",
              "import torch", "from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion"]
    if info.kind == "adapter":
        base = info.base if is_hub_id(info.base) else "PATH/TO/BASE"
        lines += ["from peft import PeftModel", "",
                  f"model = DiffusionGemmaForBlockDiffusion.from_pretrained(\"{base}\", dtype={dtype})",
                  f"model = PeftModel.from_pretrained(model, \"{repo}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")"]
    else:
        lines += ["", f"model = DiffusionGemmaForBlockDiffusion.from_pretrained(\"{repo}\", dtype={dtype})",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")"]
    lines += ["messages = [{\"role\": \"user\", \"content\": \"...\"}]",
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
              "                                       return_dict=True).to(model.device)",
              "out = model.generate(**inputs, max_new_tokens=256)",
              "print(tokenizer.decode(out.sequences[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
              "```", ""]
    if info.kind == "adapter":
        if info.layout == "separate":
            lines += ["The adapter has separate encoder and decoder weights; plain PEFT loads it as it is.", ""]
        else:
            lines += ["The adapter is stored in the standard two-path PEFT form (encoder and decoder modules both "
                      "listed, with equal tensors), so plain PEFT computes the same function as the kit's shared "
                      "adapter. Do not call PEFT's `merge_and_unload()` on it: encoder and decoder share their "
                      "weights, so it would add the update twice; `dgemma-ft merge` folds it exactly.", ""]
    return lines


def model_card(info: CardInfo) -> ModelCard:
    """The card: `card_data` as front matter, then what the model is, its evaluation, training and usage."""
    title = info.repo.split("/")[-1]
    parts = ["", f"# {title}", "", _what(info), ""]
    if not info.license:
        parts += ["Licence: this model inherits the licence of its base model; check it before use.", ""]
    parts += _evaluation(info) + _training(info) + _usage(info)
    parts += ["## About", "", f"Made with {KIT}, a fine-tuning kit for block-diffusion language models "
                              f"(DiffusionGemma).", ""]
    return ModelCard(f"---\n{card_data(info).to_yaml()}\n---\n" + "\n".join(parts))


def build_card(info: CardInfo) -> str:
    """The README.md text `push` uploads."""
    return str(model_card(info))
