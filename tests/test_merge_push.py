"""`merge` folds adapters into standard checkpoints; `push` publishes them with a model card. The upload is tested
against a small Hub stand-in on 127.0.0.1 (create repo, branch, tree listing, YAML check, preupload, commit)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model

SPEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16, global_head_dim=16,
            moe_intermediate_size=16)
CANVAS = 32  # TinySpec's default canvas_length


# ------------------------------------------------------------------------------------------------ fixtures
def _save_base(folder: Path, seed: int, **overrides) -> None:
    model, tokenizer = build_tiny_model(TinySpec(**{**SPEC, **overrides, "seed": seed}))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _load(folder: Path):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(folder), dtype=torch.float32).eval()


def _write_recipe(run: Path, base: Path) -> None:
    from dgemma_ft.finetune.recipe import load_recipe

    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(base), "dtype": "float32"},
        "task": {"name": "sudoku", "options": {"box_rows": 2, "box_cols": 2},
                 "train": {"source": "hf:someone/sudoku-4x4", "size": 100}, "eval": {"source": "generate", "size": 8}},
        "finetune": "lora", "lora": {"r": 4, "alpha": 8},
        "train": {"steps": 10, "warmup_steps": 1, "output_dir": str(run)}}, sort_keys=False))
    load_recipe(run / "recipe.yaml")


def _randomise_lora_b(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _shared_run(run: Path, base: Path, adapter_base: Path, seed: int) -> None:
    """A LoRA run as `dgemma-ft train` leaves it: the kit's shared adapter, saved in the two-path form."""
    from transformers import AutoTokenizer

    from dgemma_ft.finetune.lora import attach_lora, save_adapter

    _write_recipe(run, base)
    model = attach_lora(_load(adapter_base), r=4, alpha=8, dropout=0.0)
    _randomise_lora_b(model, seed)
    save_adapter(model, run / "adapter", str(adapter_base))
    AutoTokenizer.from_pretrained(str(adapter_base)).save_pretrained(str(run / "adapter"))


def _separate_run(run: Path, base: Path, seed: int) -> None:
    """A LoRA run whose adapter is plain PEFT on both paths (as Unsloth or TRL train): two adapters per weight."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from dgemma_ft.finetune.lora import target_regex

    _write_recipe(run, base)
    model = get_peft_model(_load(base), LoraConfig(r=4, lora_alpha=8, target_modules=target_regex()))
    _randomise_lora_b(model, seed)
    model.save_pretrained(str(run / "adapter"))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(run / "adapter"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_push")
    _save_base(root / "base", seed=0)
    _save_base(root / "other_base", seed=1)  # same shapes, other weights
    _shared_run(root / "run_shared", root / "base", root / "base", seed=1)
    _separate_run(root / "run_separate", root / "base", seed=2)
    _shared_run(root / "run_wrong_base", root / "base", root / "other_base", seed=3)
    run = root / "run_shared"  # what training and evaluation leave beside the adapter
    (run / "train_summary.json").write_text(json.dumps({"steps": 10, "train_seconds": 12.5, "examples_per_second":
                                                        6.4, "train_loss": 0.8123, "train_examples": 100}))
    (run / "logs").mkdir()
    (run / "logs" / "train_log.jsonl").write_text('{"step": 5, "loss": 0.9}\n{"step": 10, "loss": 0.4321}\n')
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({
        "target": str(run), "task": "sudoku", "data": "generate", "examples": 8, "seed": 0,
        "results": [{"model": "adapter", "steps": 16, "pin": True, "renoise": False, "correct": 6, "examples": 8,
                     "solve_rate": 0.75, "tokens_per_forward": 3.25},
                    {"model": "base", "steps": 16, "pin": True, "renoise": False, "correct": 1, "examples": 8,
                     "solve_rate": 0.125, "tokens_per_forward": 2.5}]}))
    return root


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(6, 90, (2, 30), generator=generator), torch.randint(0, 90, (2, CANVAS), generator=generator)


def _logits(model, inputs):
    ids, canvas = inputs
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas).logits


def _plain_peft_logits(base: Path, adapter: Path, inputs):
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_load(base), str(adapter)).eval(), inputs)


def _same(a, b) -> bool:
    return a.data_ptr() == b.data_ptr()


# ---------------------------------------------------------------------------------------------------- merge
def test_merge_shared_adapter_is_exact_shared_and_no_larger(world, inputs):
    from dgemma_ft.finetune.merge import MERGE_RECORD, merge
    from dgemma_ft.inference.run_eval import resolve_target

    out = world / "merged"
    result = merge(world / "run_shared", out, dtype="float32")
    assert result.layout == "shared" and not result.untied
    merged = _load(out)
    expected = _plain_peft_logits(world / "base", world / "run_shared" / "adapter", inputs)
    assert (expected - _logits(_load(world / "base"), inputs)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-4, rtol=0)
    for i in range(2):  # still one set of text weights after a plain load
        enc, dec = merged.model.encoder.language_model.layers[i], merged.model.decoder.layers[i]
        assert _same(enc.self_attn.q_proj.weight, dec.self_attn.q_proj.weight)
        assert _same(enc.mlp.down_proj.weight, dec.mlp.down_proj.weight)
    assert _same(merged.lm_head.weight, merged.model.decoder.embed_tokens.weight)
    assert (out / "model.safetensors").stat().st_size <= (world / "base" / "model.safetensors").stat().st_size * 1.01
    for name in ("config.json", "generation_config.json", "tokenizer.json", "recipe.yaml", MERGE_RECORD):
        assert (out / name).is_file(), name
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["layout"] == "shared" and record["dtype"] == "float32" and record["base"] == str(world / "base")
    assert resolve_target(out).recipe.task.name == "sudoku"  # `dgemma-ft eval DIR` accepts it

    with pytest.raises(UserError, match="--force"):
        merge(world / "run_shared", out, dtype="float32")
    merge(world / "run_shared", out, dtype="bfloat16", force=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "model.safetensors").stat().st_size < (world / "base" / "model.safetensors").stat().st_size * 0.6
    assert not [p.name for p in world.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # atomic, no leftovers
    with pytest.raises(UserError, match="overwrite the run folder"):
        merge(world / "run_shared", world / "run_shared", force=True)


def test_separate_adapters_need_untie_and_then_reproduce_both_paths(world, inputs):
    from dgemma_ft.finetune.lora import adapter_layout
    from dgemma_ft.finetune.merge import merge

    run, out = world / "run_separate", world / "merged_untied"
    assert adapter_layout(run / "adapter") == "separate"
    with pytest.raises(UserError, match="--untie") as caught:
        merge(run, out, dtype="float32")
    assert "\n" not in str(caught.value) and str(run / "adapter") in str(caught.value)
    assert not out.exists()

    result = merge(run, out, dtype="float32", untie=True)
    assert result.layout == "separate" and result.untied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = _load(out)
    enc, dec = merged.model.encoder.language_model.layers[0], merged.model.decoder.layers[0]
    assert not _same(enc.self_attn.q_proj.weight, dec.self_attn.q_proj.weight)
    assert not torch.equal(enc.self_attn.q_proj.weight, dec.self_attn.q_proj.weight)  # each path its own delta
    expected = _plain_peft_logits(world / "base", run / "adapter", inputs)
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-4, rtol=0)


def test_adapter_of_another_base_is_refused(world, tmp_path):
    from dgemma_ft.finetune.merge import merge

    with pytest.raises(UserError, match="fingerprint") as caught:
        merge(world / "run_wrong_base", tmp_path / "out", dtype="float32")
    assert "recipe.yaml" in str(caught.value) and not (tmp_path / "out").exists()

    # a plain PEFT adapter (no base record) for a base of another width: the shapes say so
    _save_base(tmp_path / "wide", seed=0, hidden_size=48)
    _separate_run(tmp_path / "run_wide", tmp_path / "wide", seed=4)
    _write_recipe(tmp_path / "run_wide", world / "base")
    with pytest.raises(UserError, match="different base"):
        merge(tmp_path / "run_wide", tmp_path / "out2", dtype="float32", untie=True)
    with pytest.raises(UserError, match="not a run folder"):
        merge(world / "base", tmp_path / "out3")


def test_full_run_is_resaved_in_the_chosen_dtype(world, tmp_path, inputs):
    from dgemma_ft.finetune.merge import merge
    from dgemma_ft.finetune.push import push

    run = tmp_path / "run_full"
    _write_recipe(run, world / "base")
    recipe = (run / "recipe.yaml").read_text().replace("finetune: lora", "finetune: full")
    (run / "recipe.yaml").write_text(recipe)
    _save_base(run / "model", seed=0)
    result = merge(run, tmp_path / "full_out", dtype="float32")
    assert result.layout == "full"
    torch.testing.assert_close(_logits(_load(tmp_path / "full_out"), inputs), _logits(_load(world / "base"), inputs))
    card = push(run, "me/full", dry_run=True)
    assert card.kind == "full" and "library_name: transformers" in card.card
    assert "model.safetensors" in dict(card.files)
    with pytest.raises(UserError, match="full fine-tune"):
        push(run, "me/full", dry_run=True, adapter_only=True)


# --------------------------------------------------------------------------------------------- hub stand-in
class FakeHub:
    """Just enough of the Hub's HTTP API for `create_repo`, `create_branch`, `list_repo_files` and
    `upload_folder` (regular, non-LFS uploads), keeping the repos in memory."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> branch -> path -> content
        self.private: dict[str, bool] = {}
        self.tokens: set[str] = set()
        self.unknown: list[str] = []
        self.commits = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, payload, headers=None):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                hub.tokens.add(self.headers.get("Authorization", ""))
                self._route("GET", b"")

            def do_POST(self):
                hub.tokens.add(self.headers.get("Authorization", ""))
                self._route("POST", self._body())

            def _route(self, method, body):
                parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
                try:
                    status, payload, headers = hub.handle(method, parts, body, f"http://{self.headers['Host']}")
                except KeyError:
                    status, payload, headers = 404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"}
                self._reply(status, payload, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, method, parts, body, base):
        if method == "POST" and parts[:3] == ["api", "repos", "create"]:
            data = json.loads(body)
            repo = f"{data.get('organization') or 'me'}/{data['name']}"
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{base}/{repo}"}, None
            self.repos[repo] = {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}
            self.private[repo] = data.get("visibility") == "private"
            return 200, {"url": f"{base}/{repo}", "name": repo}, None
        if method == "POST" and parts[:2] == ["api", "validate-yaml"]:
            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except (yaml.YAMLError, IndexError):
                return 400, {"errors": [{"message": "invalid YAML"}], "warnings": []}, None
            return 200, {"errors": [], "warnings": []}, None
        if parts[:2] != ["api", "models"] or len(parts) < 6:
            self.unknown.append(f"{method} {'/'.join(parts)}")
            return 404, {"error": "unknown route"}, None
        repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
        branches = self.repos[repo]
        if method == "POST" and action == "branch":
            if revision in branches:
                return 409, {"error": "branch exists"}, None
            branches[revision] = dict(branches["main"])
            return 200, {}, None
        if revision not in branches:
            return 404, {"error": "revision not found"}, {"X-Error-Code": "RevisionNotFound"}
        files = branches[revision]
        if method == "GET" and action == "tree":
            return 200, [{"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                         for p, c in sorted(files.items())], None
        if method == "POST" and action == "preupload":
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in json.loads(body)["files"]]}, None
        if method == "POST" and action == "commit":
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return 400, {"error": f"unsupported commit item {item['key']}"}, None
            self.commits += 1
            oid = f"{self.commits:040x}"
            return 200, {"commitUrl": f"{base}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}, None
        self.unknown.append(f"{method} {'/'.join(parts)}")
        return 404, {"error": "unknown route"}, None


@pytest.fixture
def hub():
    server = FakeHub()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


# ------------------------------------------------------------------------------------------------------ push
def test_push_dry_run_shows_card_and_files_without_token(world, monkeypatch):
    from dgemma_ft.finetune.push import push

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    before = {p.name: p.read_bytes() for p in (world / "run_shared" / "adapter").iterdir()}
    printed: list[str] = []
    result = push(world / "run_shared", "me/tiny-sudoku", dry_run=True, say=printed.append)
    assert result.dry_run and result.kind == "adapter"
    card, listing = printed[0], printed[1]
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"diffusion", "block-diffusion", "dgemma-ft", "sudoku"} <= set(meta["tags"])
    assert meta["datasets"] == ["someone/sudoku-4x4"] and "base_model" not in meta  # a local base has no Hub id
    assert "| adapter | 16 | on | off | 6/8 | 75.0% | 3.25 |" in card
    assert "```yaml" in card and "hf:someone/sudoku-4x4" in card  # the recipe
    assert "| steps | 10 |" in card and "0.4321" in card and "6.4" in card  # training figures
    assert "PeftModel.from_pretrained" in card and "dgemma-ft eval" in card and "dgemma-ft generate" in card
    names = dict(result.files)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "recipe.yaml"} <= set(names)
    size = (world / "run_shared" / "adapter" / "adapter_model.safetensors").stat().st_size
    assert names["adapter_model.safetensors"] == size and "adapter_model.safetensors" in listing
    assert {p.name: p.read_bytes() for p in (world / "run_shared" / "adapter").iterdir()} == before

    merged = push(world / "merged", "me/tiny-sudoku-merged", dry_run=True)
    merged_meta = yaml.safe_load(merged.card.split("---")[1])
    assert merged.kind == "merged" and merged_meta["library_name"] == "transformers"
    assert "model.safetensors" in dict(merged.files) and "75.0%" in merged.card  # the run's eval, before merging


def test_pushed_cards_carry_the_run_report_as_model_index(world):
    """The card parses back with huggingface_hub; its eval results are the run's report (the adapter's rows), for
    the run folder and for the folder merged from it."""
    from huggingface_hub import ModelCard

    from dgemma_ft.finetune.push import push

    for folder, repo in ((world / "run_shared", "me/tiny-sudoku"), (world / "merged", "me/tiny-sudoku-merged")):
        data = ModelCard(push(folder, repo, dry_run=True).card).data
        assert data.model_name == repo.split("/")[1]
        assert [(r.metric_name, r.metric_value, r.dataset_type, r.task_name) for r in data.eval_results] == [
            ("solve rate (16 denoising steps, pin on, renoise off)", 0.75, "generated", "sudoku")]


def test_push_without_token_says_how_to_log_in(world, monkeypatch):
    from dgemma_ft.finetune.push import push

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UserError, match="hf auth login") as caught:
        push(world / "run_shared", "me/tiny-sudoku", endpoint="http://127.0.0.1:9")
    assert "HF_TOKEN" in str(caught.value) and "\n" not in str(caught.value)


def test_push_uploads_to_a_local_hub(world, hub):
    from dgemma_ft.finetune.push import push

    adapter = world / "run_shared" / "adapter"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}  # PEFT's own README.md included
    result = push(world / "run_shared", "me/tiny-sudoku", private=True, token="hf_test", endpoint=hub.endpoint)
    assert hub.unknown == [] and result.url == f"{hub.endpoint}/me/tiny-sudoku"
    files = hub.repos["me/tiny-sudoku"]["main"]
    assert hub.private["me/tiny-sudoku"] and "Bearer hf_test" in hub.tokens
    assert files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert {"adapter_config.json", "README.md", "recipe.yaml", "tokenizer.json"} <= set(files)
    assert files["README.md"].decode() == result.card and "75.0%" in result.card
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # the run folder is left alone

    with pytest.raises(UserError, match="--force"):
        push(world / "run_shared", "me/tiny-sudoku", token="hf_test", endpoint=hub.endpoint)
    again = push(world / "run_shared", "me/tiny-sudoku", token="hf_test", endpoint=hub.endpoint, force=True)
    assert "adapter_model.safetensors" in again.replaced and hub.commits == 2

    merged = push(world / "merged", "me/tiny-merged", token="hf_test", endpoint=hub.endpoint, revision="v1")
    assert merged.url.endswith("/me/tiny-merged/tree/v1")
    on_branch = hub.repos["me/tiny-merged"]["v1"]
    assert on_branch["model.safetensors"] == (world / "merged" / "model.safetensors").read_bytes()
    assert "recipe.yaml" in on_branch and set(hub.repos["me/tiny-merged"]["main"]) == {".gitattributes"}

    only = push(world / "merged", "me/tiny-adapter", token="hf_test", endpoint=hub.endpoint, adapter_only=True)
    assert only.kind == "adapter" and "adapter_model.safetensors" in hub.repos["me/tiny-adapter"]["main"]
    assert hub.unknown == []


def test_cli_commands_when_registered(world, tmp_path, capsys):
    """`dgemma-ft merge` / `push` once the commands are in dgemma_ft/cli.py."""
    from dgemma_ft import cli

    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    if not {"merge", "push"} <= names:
        pytest.skip("merge/push are not registered in dgemma_ft/cli.py yet")
    with pytest.raises(SystemExit) as caught:
        cli.main(["merge", str(world / "run_separate"), "--out", str(tmp_path / "m")])
    assert caught.value.code == 2 and "--untie" in capsys.readouterr().err
    cli.main(["push", str(world / "run_shared"), "--repo", "me/tiny", "--dry-run"])
    assert "adapter_model.safetensors" in capsys.readouterr().out
