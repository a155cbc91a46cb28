"""`dgemma-ft push FOLDER --repo owner/name`: publish a run's adapter (or full weights) or a merged folder to the
Hugging Face Hub, with a model card.

What is pushed:
  - a LoRA run folder: the files of RUN/adapter, the run's recipe.yaml and a README.md card;
  - a full fine-tune run folder: the files of RUN/model, recipe.yaml and the card;
  - a merged folder (`dgemma-ft merge` output, or any folder with config.json): its files and the card;
    with `adapter_only`, the adapter of the run it was merged from instead.
The upload is staged in a temporary folder (links to the files, plus the generated card): the user's folders
are never modified.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.lora import adapter_layout
from dgemma_ft.finetune.merge import MERGE_RECORD, recorded_base
from dgemma_ft.finetune.model_card import (CardInfo, build_card, datasets_of, final_logged_loss, is_full_evaluation,
                                           license_for)
from dgemma_ft.finetune.model_loading import is_run_folder
from dgemma_ft.finetune.recipe import load_recipe

LOGIN_HELP = ("not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN to a token with write "
              "access, or pass --token), then push again; --dry-run shows what would be pushed without a token")


@dataclass
class PushPlan:
    kind: str  # 'adapter' | 'merged' | 'full'
    folder: Path  # what the user named, resolved to the run or merged folder
    sources: dict[str, Path]  # path in the repo -> local file
    card: str

    @property
    def files(self) -> list[tuple[str, int]]:
        """(path in the repo, bytes) for every file the upload holds, README.md included, sorted."""
        listed = [(name, path.stat().st_size) for name, path in self.sources.items()]
        listed.append(("README.md", len(self.card.encode("utf-8"))))
        return sorted(listed)


@dataclass
class PushResult:
    repo: str
    kind: str
    files: list[tuple[str, int]]
    card: str
    dry_run: bool
    url: str | None = None
    revision: str | None = None
    commit_url: str | None = None
    replaced: list[str] = field(default_factory=list)  # files the repo already held (pushed with force)


def check_repo_id(repo: str | None) -> str:
    """`owner/name` as the Hub accepts it, checked before anything is read or uploaded (the Hub would refuse it
    only after the card and the file list were built, or create a repo in the wrong namespace)."""
    fix = "give owner/name, e.g. --repo your-name/sudoku-dgemma"
    if not repo or repo.count("/") != 1:
        raise UserError(f"--repo {repo!r}: {fix} (exactly one '/', your user or organisation name first)")
    try:
        validate_repo_id(repo)
    except HFValidationError:  # its messages quote the id and break mid-rule; the rules themselves are short
        raise UserError(f"--repo {repo!r}: the Hub refuses this id; {fix}: letters, digits, '-', '_' "
                        f"and '.', not starting or ending with '-' or '.', no '--' or '..', at most 96 "
                        f"characters each") from None
    return repo


# -------------------------------------------------------------------------------------------------- planning
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _top_level_files(folder: Path) -> dict[str, Path]:
    """Regular top-level files (no hidden files, no README.md: the card replaces it; no sub-folders such as
    eval/)."""
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name != "README.md"}


def _vocab_size(config_file: Path) -> int | None:
    config = _read_json(config_file) or {}
    text = config.get("text_config") or {}
    return text.get("vocab_size") or config.get("vocab_size")


def _base_vocab_size(base: str | None, depth: int = 0) -> int | None:
    """The vocabulary size of a local base (a model folder or a run-folder chain), for the licence guess."""
    if not base or base == "tiny" or depth > 8:
        return None
    path = Path(base).expanduser()
    if (path / "config.json").is_file():
        return _vocab_size(path / "config.json")
    if (path / "model" / "config.json").is_file():
        return _vocab_size(path / "model" / "config.json")
    if (path / "recipe.yaml").is_file():
        try:
            name = load_recipe(path / "recipe.yaml").model.name
        except UserError:
            return None
        return None if name == "tiny" else _base_vocab_size(name, depth + 1)
    return None


def _root_base(name: str | None, depth: int = 0) -> str | None:
    """Follow run folders named as model.name down to the checkpoint at the root ('tiny', a Hub id, a folder)."""
    if not name or depth > 8 or not is_run_folder(name):
        return name
    try:
        return _root_base(load_recipe(Path(name) / "recipe.yaml").model.name, depth + 1) or name
    except UserError:
        return name


def _run_info(run: Path):
    recipe = load_recipe(run / "recipe.yaml")
    return (recipe, (run / "recipe.yaml").read_text(encoding="utf-8"), _read_json(run / "eval" / "report.json"),
            _read_json(run / "train_summary.json"), final_logged_loss(run / "logs" / "train_log.jsonl"))


def plan_push(folder: str | Path, repo: str, adapter_only: bool = False) -> PushPlan:
    """What `push` would upload, with its card; raises `UserError` for a folder it cannot push."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise UserError(f"push: '{folder}' does not exist; give a run folder or a merged model folder")
    if path.name in ("adapter", "model") and is_run_folder(path.parent):
        path = path.parent

    if is_run_folder(path):
        recipe, recipe_text, report, summary, loss = _run_info(path)
        if (path / "adapter").is_dir():
            content = path / "adapter"
            base = _root_base(recorded_base(content)) or _root_base(recipe.model.name)
            info = CardInfo(kind="adapter", repo=repo, base=base, layout=adapter_layout(content),
                            license=license_for(base, _base_vocab_size(base)))
        else:
            if adapter_only:
                raise UserError(f"push --adapter-only: '{path}' is a full fine-tune run (model/, no adapter/); "
                                f"drop --adapter-only to push its weights")
            content = path / "model"
            base = _root_base(recipe.model.name)
            info = CardInfo(kind="full", repo=repo, base=base,
                            license=license_for(base, _vocab_size(content / "config.json")))
        info.task, info.recipe_text, info.datasets = recipe.task.name, recipe_text, datasets_of(recipe)
        info.eval_report, info.train_summary, info.final_loss = report, summary, loss
        sources = _top_level_files(content)
        sources["recipe.yaml"] = path / "recipe.yaml"
        return PushPlan(info.kind, path, sources, build_card(info))

    if (path / "config.json").is_file():
        record = _read_json(path / MERGE_RECORD) or {}
        source = record.get("source")
        if adapter_only:
            if source and is_run_folder(source) and (Path(source) / "adapter").is_dir():
                return plan_push(source, repo, adapter_only=True)
            raise UserError(f"push --adapter-only: '{path}' is a merged folder whose run (with its adapter) is not "
                            f"known or no longer exists; push the run folder instead")
        layout = record.get("layout")
        kind = "merged" if layout in ("shared", "separate") else "full"
        base = _root_base(record.get("base"))
        info = CardInfo(kind=kind, repo=repo, base=base, layout=layout, untied=bool(record.get("untied")),
                        dtype=record.get("dtype"), license=license_for(base, _vocab_size(path / "config.json")))
        if (path / "recipe.yaml").is_file():
            recipe = load_recipe(path / "recipe.yaml")
            info.task, info.datasets = recipe.task.name, datasets_of(recipe)
            info.recipe_text = (path / "recipe.yaml").read_text(encoding="utf-8")
        info.eval_report = _read_json(path / "eval" / "report.json")
        if source and Path(source).is_dir():
            run = Path(source)
            info.train_summary = _read_json(run / "train_summary.json")
            info.final_loss = final_logged_loss(run / "logs" / "train_log.jsonl")
            run_report = _read_json(run / "eval" / "report.json")
            if _prefer_run_report(info.eval_report, run_report):
                info.eval_report = run_report
                info.eval_source = "the run before merging" + (
                    " (a shared adapter folds exactly, up to the saved precision)" if layout == "shared" else "")
        return PushPlan(kind, path, _top_level_files(path), build_card(info))

    if (path / "adapter_config.json").is_file():  # a bare PEFT adapter folder
        base = _root_base(recorded_base(path))
        info = CardInfo(kind="adapter", repo=repo, base=base, layout=adapter_layout(path),
                        license=license_for(base, _base_vocab_size(base)))
        return PushPlan("adapter", path, _top_level_files(path), build_card(info))

    raise UserError(f"push: '{folder}' is neither a run folder (recipe.yaml + adapter/ or model/), a model folder "
                    f"(config.json) nor an adapter folder (adapter_config.json)")


def _prefer_run_report(own: dict | None, run_report: dict | None) -> bool:
    """A merged folder's card shows its own report, unless there is none or it is partial while the run's is the
    full evaluation: a partial report never wins over a full one."""
    if run_report is None:
        return False
    return own is None or (is_full_evaluation(run_report) and not is_full_evaluation(own))


# -------------------------------------------------------------------------------------------------- uploading
@contextlib.contextmanager
def staged_folder(plan: PushPlan) -> Iterator[Path]:
    """A temporary folder holding links to the files to upload and the card (a real file)."""
    staging = Path(tempfile.mkdtemp(prefix="dgemma-ft-push-"))
    try:
        for name, source in plan.sources.items():
            target = staging / name
            try:
                os.symlink(source.resolve(), target)
            except OSError:
                shutil.copyfile(source, target)
        (staging / "README.md").write_text(plan.card, encoding="utf-8")
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def file_listing(files: list[tuple[str, int]]) -> str:
    width = max((len(name) for name, _ in files), default=4)
    lines = [f"  {name:<{width}}  {human_size(size):>10}" for name, size in files]
    lines.append(f"  {'total':<{width}}  {human_size(sum(size for _, size in files)):>10}")
    return "\n".join(lines)


def push(folder: str | Path, repo: str, private: bool = False, adapter_only: bool = False,
         revision: str | None = None, dry_run: bool = False, force: bool = False, token: str | None = None,
         endpoint: str | None = None, say: Callable[[str], None] | None = None) -> PushResult:
    """Upload `folder` (see the module docstring) with a model card to the Hub repo `repo`."""
    say = say or (lambda message: None)
    check_repo_id(repo)
    plan = plan_push(folder, repo, adapter_only)
    files = plan.files
    if dry_run:
        say(plan.card)
        say(f"dry run: would push {len(files)} files to {repo}"
            + (f" (branch {revision})" if revision else "") + ":\n" + file_listing(files))
        return PushResult(repo, plan.kind, files, plan.card, dry_run=True, revision=revision)

    token = token or huggingface_hub.get_token()
    if not token:
        raise UserError(f"push: {LOGIN_HELP}")
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(repo_url, "repo_id", None) or repo
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        existing = [f for f in api.list_repo_files(repo_id, revision=revision) if f != ".gitattributes"]
        if existing and not force:
            shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
            raise UserError(f"push: {repo_id} already holds {len(existing)} file(s) ({shown}); pass --force to "
                            f"upload over them, or choose another --repo or --revision")
        with staged_folder(plan) as staging:
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(staging), revision=revision,
                                       commit_message=f"Upload {plan.kind} with dgemma-ft")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub or network failure becomes one line
        raise UserError(_hub_error(exc, repo, api.endpoint)) from None
    url = str(repo_url).rstrip("/")
    if revision:
        url += f"/tree/{revision}"
    return PushResult(repo_id, plan.kind, files, plan.card, dry_run=False, url=url, revision=revision,
                      commit_url=getattr(commit, "commit_url", None), replaced=existing)


def _hub_error(exc: Exception, repo: str, endpoint: str) -> str:
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return ("push: the Hub rejected the token (401); log in again with `hf auth login` or set HF_TOKEN to "
                    "a token with write access")
        if status == 403:
            return (f"push: no write access to {repo} (403); use a repo in your namespace or an organisation you "
                    f"can write to, and a token with write access")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"push: the Hub answered {status} for {repo}: {first}"
    if type(exc).__module__.startswith(("httpx", "httpcore")) or isinstance(exc, (ConnectionError, TimeoutError)):
        return f"push: cannot reach {endpoint} ({type(exc).__name__}); check the network, proxy or HF_ENDPOINT"
    if isinstance(exc, ValueError) and "README.md" in str(exc):
        return f"push: the Hub refused the model card's metadata: {' '.join(str(exc).split())}"
    raise exc
