"""`quantkit push`: the real huggingface_hub / modelscope_hub clients against local servers.

tests/hub_server.py stands in for each hub on 127.0.0.1 and stores what arrives, so these
tests compare the uploaded bytes with the artifact's, read the card that was committed and
check which requests were made (none at all when verification fails or on a dry run).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from quantkit import card, hub
from quantkit.checkpoint import open_checkpoint, read_manifest, sha256_file, write_checkpoint
from tests.helpers import assert_one_line_error, run_cli
from tests.hub_server import HubServer, new_token

SOURCE_CARD = """---
license: apache-2.0
language: [en, zh]
tags: [llama]
---
# Tiny Llama

The original card's own text.
"""

REPORT = """# quantkit report

## Quality

| model | wikitext2 ppl | KLD vs base | C-Eval |
|---|---|---|---|
| base | 12.31 | 0 | 41.2 |
| gptq-int4 | 12.87 | 0.0213 | 40.1 |

Some prose that is not a table.
"""

GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
               "sym": True, "true_sequential": True, "damp_percent": 0.01,
               "static_groups": False, "checkpoint_format": "gptq"}


def _gptq_tensors(ckpt):
    """The checkpoint's tensors with every q_proj stored as GPTQ-packed int4 (random codes)."""
    gen = torch.Generator().manual_seed(0)
    for name, tensor in ckpt.iter_tensors():
        if not name.endswith("q_proj.weight"):
            yield name, tensor
            continue
        out_f, in_f = tensor.shape
        prefix = name[: -len("weight")]
        yield prefix + "qweight", torch.randint(-2**31, 2**31 - 1, (in_f // 8, out_f),
                                                 generator=gen, dtype=torch.int32)
        yield prefix + "qzeros", torch.randint(-2**31, 2**31 - 1, (in_f // 128, out_f // 8),
                                                generator=gen, dtype=torch.int32)
        yield prefix + "scales", torch.rand(in_f // 128, out_f, generator=gen).half()
        yield prefix + "g_idx", torch.arange(in_f, dtype=torch.int32) // 128


@pytest.fixture(scope="session")
def artifacts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A GPTQ-looking artifact and a plain one, both written by write_checkpoint."""
    root = tmp_path_factory.mktemp("push")
    source = root / "source"
    shutil.copytree(tiny_model("llama"), source)
    (source / "README.md").write_text(SOURCE_CARD, encoding="utf-8")
    ckpt = open_checkpoint(source)
    config = dict(ckpt.config, quantization_config=GPTQ_CONFIG)
    gptq = write_checkpoint(root / "gptq", _gptq_tensors(ckpt), source=ckpt, config=config,
                            extra_files={"quantize_config.json": GPTQ_CONFIG},
                            manifest_extra={"quantization": {"method": "gptq", "bits": 4,
                                                             "calibration_samples": 128}})
    plain = write_checkpoint(root / "plain", ckpt.iter_tensors(), source=ckpt)
    (root / "report.md").write_text(REPORT, encoding="utf-8")
    return {"gptq": gptq, "plain": plain, "report": root / "report.md", "source": source}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No stray credentials, offline mode lifted for 127.0.0.1, HOME and temp under tmp_path."""
    import huggingface_hub.constants as hf_constants

    for name in ("HF_TOKEN", "MODELSCOPE_API_TOKEN", "HF_ENDPOINT", "MODELSCOPE_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    from modelscope_hub.config import set_default_config

    set_default_config(None)  # its process-wide config (paths under HOME) is built anew
    return tmp_path


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _front_matter(text: str) -> dict:
    meta, _ = card.split_front_matter(text)
    return meta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- Hugging Face


def test_push_hf_files_identical_and_card(artifacts, env, capsys, monkeypatch):
    art = artifacts["gptq"]
    before = _digests(art)
    token = new_token("hf")
    monkeypatch.setenv("HF_TOKEN", token)
    # Like the Hub: weights as LFS files, which the client (hf_xet installed) sends via Xet.
    with HubServer("hf", tokens={token: "write"}, lfs_suffixes=(".safetensors",)) as server:
        result = run_cli(capsys, "push", art, "--to", "hf", "--repo", "acme/tiny-gptq",
                         "--endpoint", server.url, "--report", artifacts["report"],
                         "--base-model", "acme/tiny-llama", "--timeout", "10")
        assert result.code == 0, result.err
        files = server.state.files("acme/tiny-gptq")
        paths = [p for _, p in server.state.requests]
    manifest = read_manifest(art)
    assert set(files) == set(manifest["files"]) | {"quantkit.json"}
    for rel in manifest["files"]:
        if rel != "README.md":
            assert files[rel] == (art / rel).read_bytes(), rel
    assert files["quantkit.json"] == (art / "quantkit.json").read_bytes()
    assert "/cas/v1/shards" in paths  # the weights came through Xet, rebuilt from chunks
    assert any(p.startswith("/cas/v1/xorbs/") for p in paths)

    readme = files["README.md"].decode()
    meta = _front_matter(readme)
    assert meta["license"] == "apache-2.0"  # from the source card
    assert meta["base_model"] == "acme/tiny-llama"
    assert meta["base_model_relation"] == "quantized"
    assert {"gptq", "4-bit", "quantkit", "llama"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "| bits | 4 |" in readme and "| group_size | 128 |" in readme
    assert "| quantization.calibration_samples | 128 |" in readme
    assert "| gptq-int4 | 12.87 | 0.0213 | 40.1 |" in readme
    assert "vllm serve acme/tiny-gptq --quantization gptq_marlin" in readme
    assert "## Original model card" in readme and "The original card's own text." in readme
    # The artifact is untouched: same bytes, still verifiable, README still the source card.
    assert _digests(art) == before
    hub.verify_artifact(art)
    assert "pushed" in result.out and "acme/tiny-gptq" in result.out


def test_push_hf_lfs_path_private_branch(artifacts, env, capsys, monkeypatch):
    """With xet off, weights go through the git-LFS batch API and a PUT, onto a new branch."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    art = artifacts["plain"]
    token = new_token("hf")
    with HubServer("hf", tokens={token: "write"}, lfs_suffixes=(".safetensors",)) as server:
        result = run_cli(capsys, "push", art, "--to", "hf", "--repo", "acme/tiny", "--private",
                         "--revision", "v2", "--commit-message", "first upload",
                         "--endpoint", server.url, "--token", token)
        assert result.code == 0, result.err
        repo = server.state.repos["acme/tiny"]
        puts = [p for m, p in server.state.requests if m == "PUT"]
    weights = art / "model.safetensors"
    assert puts == [f"/lfs-storage/{sha256_file(weights)}"]
    assert repo.private
    assert repo.branches["v2"]["model.safetensors"] == weights.read_bytes()
    assert repo.branches["main"] == {}  # nothing committed to main
    assert repo.commits[-1]["summary"] == "first upload"
    meta = _front_matter(repo.branches["v2"]["README.md"].decode())
    assert "gptq" not in meta["tags"] and "base_model" not in meta


def test_push_hf_rejected_token(artifacts, env, capsys):
    with HubServer("hf", tokens={new_token("hf"): "write"}) as server:
        result = run_cli(capsys, "push", artifacts["gptq"], "--to", "hf", "--repo", "acme/x",
                         "--endpoint", server.url, "--token", new_token("hf"))
        assert server.state.upload_requests() == []
    assert_one_line_error(result, f"token rejected for {server.url}", "HF_TOKEN")


def test_push_hf_read_only_token(artifacts, env, capsys):
    token = new_token("hf")
    with HubServer("hf", tokens={token: "read"}) as server:
        result = run_cli(capsys, "push", artifacts["gptq"], "--to", "hf", "--repo", "acme/x",
                         "--endpoint", server.url, "--token", token)
        assert server.state.upload_requests() == []
    assert_one_line_error(result, "read-only", "write token")


def test_push_refuses_redirect_that_would_carry_the_token(artifacts, env, capsys):
    token = new_token("hf")
    with HubServer("hf", tokens={token: "write"}) as elsewhere, \
            HubServer("hf", tokens={}, redirect_to=elsewhere.url) as server:
        result = run_cli(capsys, "push", artifacts["gptq"], "--to", "hf", "--repo", "acme/x",
                         "--endpoint", server.url, "--token", token)
        assert elsewhere.state.requests == []
    assert_one_line_error(result, f"{server.url} redirects to {elsewhere.url}/api/whoami-v2")


@pytest.mark.parametrize("hub_kind", ["hf", "modelscope"])
def test_push_unreachable_endpoint_fails_within_timeout(artifacts, env, capsys, hub_kind):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    result = run_cli(capsys, "push", artifacts["gptq"], "--to", hub_kind, "--repo", "acme/x",
                     "--endpoint", endpoint, "--token", "t0k", "--timeout", "3")
    elapsed = time.monotonic() - start
    assert_one_line_error(result, f"cannot reach {endpoint} within 3s", "--endpoint")
    assert elapsed < 3 + 2


def test_push_silent_endpoint_fails_within_timeout(artifacts, env, capsys):
    """A host that accepts the connection but never answers: the timeout still holds."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        result = run_cli(capsys, "push", artifacts["gptq"], "--to", "hf", "--repo", "acme/x",
                         "--endpoint", endpoint, "--token", "t0k", "--timeout", "2")
        elapsed = time.monotonic() - start
    assert_one_line_error(result, f"cannot reach {endpoint} within 2s")
    assert 2 - 0.5 < elapsed < 2 + 2


@pytest.mark.parametrize("hub_kind", ["hf", "modelscope"])
def test_push_hung_upload_hits_deadline(artifacts, env, capsys, monkeypatch, hub_kind):
    """The hub answers the token check, then hangs on the commit: the deadline ends it."""
    monkeypatch.setattr(hub, "MIN_UPLOAD_RATE", 10**12)  # deadline = timeout * (1 + RETRIES)
    token = new_token("t")
    with HubServer(hub_kind, tokens={token: "write"}, stall=("commit",)) as server:
        start = time.monotonic()
        result = run_cli(capsys, "push", artifacts["plain"], "--to", hub_kind, "--repo",
                         "acme/x", "--endpoint", server.url, "--token", token, "--timeout", "1")
        elapsed = time.monotonic() - start
    deadline = 1 * (1 + hub.RETRIES)
    assert_one_line_error(result, f"upload to {server.url} did not finish within {deadline}s")
    assert deadline - 0.5 < elapsed < deadline + 3
    # The abandoned client thread gets its answer (an error) once the server is released.
    for thread in threading.enumerate():
        if thread.name == "quantkit-push":
            thread.join(timeout=30)


def test_push_tampered_file_stops_before_any_request(artifacts, env, capsys, tmp_path):
    art = tmp_path / "tampered"
    shutil.copytree(artifacts["gptq"], art)
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    weights.write_bytes(bytes(data))
    token = new_token("hf")
    with HubServer("hf", tokens={token: "write"}) as server:
        result = run_cli(capsys, "push", art, "--to", "hf", "--repo", "acme/x",
                         "--endpoint", server.url, "--token", token)
        assert server.state.requests == []
    assert_one_line_error(result, str(weights), "sha256 does not match")


@pytest.mark.parametrize("damage,fragment", [
    ("drop_quant_config", "no quantization_config although its weights are GPTQ-packed"),
    ("drop_tokenizer", "no tokenizer files"),
    ("extra_file", "stray.bin not in quantkit.json"),
    ("no_manifest", "no quantkit.json"),
    ("quantize_config_mismatch", "bits=8 but config.json says 4"),
])
def test_push_refuses_broken_artifacts(artifacts, env, capsys, tmp_path, damage, fragment):
    from quantkit.checkpoint import write_manifest

    art = tmp_path / "art"
    shutil.copytree(artifacts["gptq"], art)
    if damage == "drop_quant_config":
        config = json.loads((art / "config.json").read_text())
        del config["quantization_config"]
        (art / "config.json").write_text(json.dumps(config))
        (art / "quantize_config.json").unlink()
    elif damage == "drop_tokenizer":
        (art / "tokenizer.json").unlink()
    elif damage == "extra_file":
        (art / "stray.bin").write_bytes(b"\0" * 16)
    elif damage == "no_manifest":
        (art / "quantkit.json").unlink()
    elif damage == "quantize_config_mismatch":
        (art / "quantize_config.json").write_text(json.dumps(dict(GPTQ_CONFIG, bits=8)))
    if damage in ("drop_quant_config", "drop_tokenizer", "quantize_config_mismatch"):
        write_manifest(art, source=None)  # the damage is recorded: only the check can catch it
    result = run_cli(capsys, "push", art, "--to", "hf", "--repo", "acme/x", "--dry-run")
    assert_one_line_error(result, fragment)


def test_push_dry_run_lists_files_and_uploads_nothing(artifacts, env, capsys):
    art = artifacts["gptq"]
    with HubServer("hf", tokens={}) as server:
        result = run_cli(capsys, "push", art, "--to", "modelscope", "--repo", "acme/x",
                         "--dry-run", "--endpoint", server.url)  # no token needed
        assert server.state.requests == []
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    weights = next(line for line in lines if "model.safetensors" in line)
    assert card.format_size((art / "model.safetensors").stat().st_size) in weights
    assert any("configuration.json" in line and "(generated)" in line for line in lines)
    assert any("README.md" in line and "(generated)" in line for line in lines)
    assert "nothing uploaded" in lines[-1]


def test_token_never_leaks(artifacts, env, capsys, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    token = new_token("hf_leakcheck")
    monkeypatch.setenv("HF_TOKEN", token)
    outputs = []
    with HubServer("hf", tokens={token: "write"}, lfs_suffixes=(".safetensors",)) as server:
        outputs.append(run_cli(capsys, "-v", "push", artifacts["gptq"], "--to", "hf",
                               "--repo", "acme/leak", "--endpoint", server.url))
    with HubServer("hf", tokens={}) as server:  # rejected
        outputs.append(run_cli(capsys, "-v", "push", artifacts["gptq"], "--to", "hf",
                               "--repo", "acme/leak", "--endpoint", server.url))
    with HubServer("modelscope", tokens={token: "write"}) as server:
        outputs.append(run_cli(capsys, "-v", "push", artifacts["gptq"], "--to", "modelscope",
                               "--repo", "acme/leak", "--endpoint", server.url,
                               "--token", token))
    assert [r.code for r in outputs] == [0, 2, 0]
    for r in outputs:
        assert token not in r.out and token not in r.err
    assert token not in caplog.text
    hf_home = Path(os.environ["HF_HOME"])  # hf_xet's cache and logs live there
    written = [p for folder in (env, artifacts["gptq"], hf_home)
               for p in folder.rglob("*") if p.is_file()]
    assert written
    for p in written:
        assert token.encode() not in p.read_bytes(), p
    assert token not in repr(hub.PushConfig(artifact=Path("."), hub="hf", repo="a/b",
                                            token=token))


# --------------------------------------------------------------------------- ModelScope


def test_push_modelscope_files_identical_and_configuration(artifacts, env, capsys, tmp_path):
    art = tmp_path / "gptq"
    shutil.copytree(artifacts["gptq"], art)
    shutil.copy(artifacts["report"], art / "report.md")  # picked up without --report
    token = new_token("ms")
    with HubServer("modelscope", tokens={token: "write"}, default_branch="master") as server:
        result = run_cli(capsys, "push", art, "--to", "modelscope", "--repo", "acme/tiny-gptq",
                         "--endpoint", server.url, "--token", token, "--private")
        assert result.code == 0, result.err
        repo = server.state.repos["acme/tiny-gptq"]
        files = server.state.files("acme/tiny-gptq")
        puts = [p for m, p in server.state.requests if m == "PUT"]
    manifest = read_manifest(art)
    for rel in manifest["files"]:
        if rel != "README.md":
            assert files[rel] == (art / rel).read_bytes(), rel
    assert "report.md" not in files
    assert puts == [f"/ms-lfs/{sha256_file(art / 'model.safetensors')}"]
    assert repo.private and repo.commits[0]["license"] == "apache-2.0"
    assert json.loads(files["configuration.json"]) == {
        "framework": "pytorch", "task": "text-generation", "allow_remote": False}
    readme = files["README.md"].decode()
    meta = _front_matter(readme)
    assert meta["frameworks"] == ["pytorch"] and meta["tasks"] == ["text-generation"]
    assert "| gptq-int4 | 12.87 | 0.0213 | 40.1 |" in readme
    assert "snapshot_download(\"acme/tiny-gptq\")" in readme
    assert not (art / "configuration.json").exists()  # staged, not written into the artifact


def test_push_modelscope_rejected_token(artifacts, env, capsys):
    with HubServer("modelscope", tokens={new_token("ms"): "write"}) as server:
        result = run_cli(capsys, "push", artifacts["gptq"], "--to", "modelscope",
                         "--repo", "acme/x", "--endpoint", server.url, "--token", "wrong")
        assert server.state.upload_requests() == []
    assert_one_line_error(result, f"token rejected for {server.url}", "MODELSCOPE_API_TOKEN")


def test_push_without_token_says_which_variable(artifacts, env, capsys):
    result = run_cli(capsys, "push", artifacts["gptq"], "--to", "modelscope", "--repo", "a/b")
    assert_one_line_error(result, "no token for modelscope", "MODELSCOPE_API_TOKEN")


# --------------------------------------------------------------------------- card


def test_card_replaces_its_own_section_and_keeps_the_rest(artifacts):
    art = hub.verify_artifact(artifacts["gptq"])
    inputs = card.CardInputs(repo="acme/m", hub="hf", config=art.config, manifest=art.manifest,
                             files=art.files, source_card=SOURCE_CARD, license="mit")
    first = card.build_card(inputs)
    second = card.build_card(card.CardInputs(**{**inputs.__dict__, "source_card": first}))
    assert second.count(card.CARD_START) == 1 and second.count("## Original model card") == 1
    assert _front_matter(second)["license"] == "mit"  # --license wins over the source card
    assert second.count("The original card's own text.") == 1


@pytest.mark.parametrize("qc,tags,text", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
      "bnb_4bit_use_double_quant": True}, ["bitsandbytes", "4-bit", "nf4"],
     "bitsandbytes 4-bit NF4 with double quantization"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, ["bitsandbytes", "8-bit", "int8"],
     "bitsandbytes 8-bit (LLM.int8)"),
    (GPTQ_CONFIG, ["gptq", "4-bit"], "GPTQ 4-bit (group size 128)"),
])
def test_quantization_summary_tags(qc, tags, text):
    summary, got_tags, rows = card.quantization_summary({"quantization_config": qc})
    assert (summary, got_tags) == (text, tags)
    assert rows and all(k in qc for k, _ in rows)


def test_license_free_text_becomes_other_with_name():
    meta = yaml.safe_load(card.build_card(card.CardInputs(
        repo="a/b", hub="hf", config={"model_type": "llama"}, manifest={}, files={},
        source_card="---\nlicense: Baichuan2 Community License\n---\nbody\n")).split("---")[1])
    assert meta["license"] == "other" and meta["license_name"] == "baichuan2-community-license"


def test_guess_base_model_from_hub_cache_paths(tmp_path):
    hf = {"source": {"path": "/x/hub/models--baichuan-inc--Baichuan2-7B-Chat/snapshots/abc"}}
    ms = {"source": {"path": "/x/.cache/modelscope/hub/models/qwen/Qwen-7B-Chat"}}
    assert hub.guess_base_model(hf) == "baichuan-inc/Baichuan2-7B-Chat"
    assert hub.guess_base_model(ms) == "qwen/Qwen-7B-Chat"
    middle = tmp_path / "converted"
    middle.mkdir()
    (middle / "quantkit.json").write_text(json.dumps(hf))
    assert hub.guess_base_model({"source": {"path": str(middle)}}) == \
        "baichuan-inc/Baichuan2-7B-Chat"


# --------------------------------------------------------------------------- real artifact


@pytest.mark.slow
def test_push_real_bnb_artifact(tiny_model, env, capsys, tmp_path):
    """`quantkit bnb --nf4` output goes up whole; without its quantization_config it cannot."""
    from quantkit.checkpoint import write_manifest

    art = tmp_path / "nf4"
    made = run_cli(capsys, "bnb", tiny_model("llama"), "--out", art, "--nf4", "--device", "cpu")
    assert made.code == 0, made.err
    token = new_token("hf")
    with HubServer("hf", tokens={token: "write"}, lfs_suffixes=(".safetensors",)) as server:
        result = run_cli(capsys, "push", art, "--to", "hf", "--repo", "acme/tiny-nf4",
                         "--endpoint", server.url, "--token", token)
        assert result.code == 0, result.err
        files = server.state.files("acme/tiny-nf4")
    for rel in read_manifest(art)["files"]:
        if rel != "README.md":
            assert files[rel] == (art / rel).read_bytes(), rel
    readme = files["README.md"].decode()
    assert {"bitsandbytes", "4-bit", "nf4"} <= set(_front_matter(readme)["tags"])
    assert "| bnb_4bit_quant_type | nf4 |" in readme and "| bnb.mode | nf4 |" in readme
    assert "--quantization bitsandbytes" in readme

    config = json.loads((art / "config.json").read_text())
    del config["quantization_config"]
    (art / "config.json").write_text(json.dumps(config))
    write_manifest(art, source=None)
    refused = run_cli(capsys, "push", art, "--to", "hf", "--repo", "acme/x", "--dry-run")
    assert_one_line_error(refused, "no quantization_config although its weights are "
                                   "bitsandbytes-quantized")
