"""Push a verified artifact, with its model card, to the Hugging Face Hub or ModelScope.

Published quantized models go wrong in known ways: a file changed after quantization, a
`config.json` without its `quantization_config` (loaders then read packed int32 weights as
plain ones), missing tokenizer files, a ModelScope upload that hangs for many minutes when
the network is down. So a push is four steps, each of which can stop it cleanly:

1. verify the folder against its `quantkit.json` (sha256 of every file) and check that it
   is loadable as what it claims to be;
2. build the upload in a temporary staging folder: links to the verified files plus the
   generated README.md (and ModelScope's configuration.json). The artifact itself is never
   modified, so its manifest stays valid and it can be pushed again, to the other hub too;
3. check, within `timeout` seconds, that the endpoint answers and accepts the token, so a
   network problem and a token problem each get their own one-line answer;
4. create the repo (and branch) and upload the staging folder with the hub's own client, in
   a worker thread with a deadline.

Tokens travel only in request headers: they are never logged, printed or written to a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from quantkit import card
from quantkit.checkpoint import (
    MANIFEST_NAME,
    TOKENIZER_FILES,
    open_checkpoint,
    read_json,
    read_manifest,
    sha256_file,
)
from quantkit.errors import CheckpointError, ConfigError, HubError, QuantkitError, require

log = logging.getLogger(__name__)

HUBS = ("hf", "modelscope")
DEFAULT_ENDPOINTS = {"hf": "https://huggingface.co", "modelscope": "https://modelscope.cn"}
ENDPOINT_ENV = {"hf": "HF_ENDPOINT", "modelscope": "MODELSCOPE_ENDPOINT"}
TOKEN_ENV = {"hf": "HF_TOKEN", "modelscope": "MODELSCOPE_API_TOKEN"}
DEFAULT_BRANCH = {"hf": "main", "modelscope": "master"}
# The authenticated "who am I" route of each hub: answers 401 for a bad token, so one GET
# tells a dead network from a rejected token before anything is created.
_WHOAMI = {"hf": "/api/whoami-v2", "modelscope": "/openapi/v1/users/me"}
RETRIES = 2  # extra attempts of the access check after a network error or a 5xx
# The upload deadline assumes at least this average rate; slower than that counts as hung.
MIN_UPLOAD_RATE = 256 * 1024  # bytes per second
# Files that may sit in an artifact without being in quantkit.json: the card material.
UNLISTED_OK = ("README.md", "report.md")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# Tensor-name endings that only quantized checkpoints have.
_GPTQ_MARKERS = (".qweight", ".qzeros", ".g_idx")
_BNB_MARKERS = (".absmax", ".quant_map", ".SCB", ".weight_format", "quant_state.bitsandbytes__nf4",
                "quant_state.bitsandbytes__fp4", ".nested_absmax")


@dataclass(frozen=True)
class PushConfig:
    artifact: Path
    hub: str  # "hf" or "modelscope"
    repo: str  # ORG/NAME
    private: bool = False
    revision: str | None = None  # branch; default main (hf) / master (modelscope)
    commit_message: str | None = None
    endpoint: str | None = None
    token: str | None = field(default=None, repr=False)
    dry_run: bool = False
    timeout: float = 60.0
    report: Path | None = None
    license: str | None = None
    base_model: str | None = None


@dataclass
class Artifact:
    """A folder whose files all match its manifest."""

    path: Path
    config: dict
    manifest: dict
    files: dict[str, int]  # relative path -> bytes, every one verified
    quant_method: str | None


@dataclass
class PushPlan:
    """Exactly what would go up: verified files by link, generated files by content."""

    artifact: Artifact
    hub: str
    repo: str
    endpoint: str
    revision: str
    linked: dict[str, int]  # relative path in the artifact -> bytes
    generated: dict[str, bytes]  # README.md, configuration.json

    @property
    def files(self) -> dict[str, int]:
        sizes = dict(self.linked)
        sizes.update({name: len(data) for name, data in self.generated.items()})
        return dict(sorted(sizes.items()))

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


@dataclass
class PushResult:
    plan: PushPlan
    url: str | None  # commit or repo URL; None for a dry run
    dry_run: bool
    seconds: float = 0.0


# ---------------------------------------------------------------------------- verification


def verify_artifact(path: str | os.PathLike) -> Artifact:
    """Check every file against quantkit.json and that the folder is what it claims to be."""
    folder = Path(path)
    if folder.is_file():
        raise CheckpointError(f"{folder}: is a file; pass the artifact folder (the one "
                              f"holding {MANIFEST_NAME}) to push")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; pass the artifact folder to push")
    _check_no_links(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(
            f"{folder}: no {MANIFEST_NAME}; push uploads folders written by quantkit "
            "(gptq, bnb, convert) so that every file can be verified first")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise CheckpointError(f"{folder / MANIFEST_NAME}: has no \"files\" list; rebuild the "
                              "artifact with quantkit")
    _check_unlisted(folder, listed)
    files = _check_hashes(folder, listed)
    ckpt = open_checkpoint(folder)
    config = ckpt.config
    if not (config.get("model_type") or config.get("architectures")):
        raise CheckpointError(f"{folder / 'config.json'}: has neither model_type nor "
                              "architectures; transformers cannot load it")
    method = _check_quantization(folder, config, manifest, ckpt.tensor_names())
    _check_tokenizer(folder)
    return Artifact(path=folder, config=config, manifest=manifest, files=files,
                    quant_method=method)


def _check_no_links(folder: Path) -> None:
    """quantkit never writes symlinks; one in an artifact could upload any file of the user's."""
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            p = Path(root) / name
            if p.is_symlink():
                raise CheckpointError(f"{p}: a symlink (to {os.readlink(p)}); push uploads "
                                      "only files quantkit wrote, so replace it by the file "
                                      "or rebuild the artifact")


def _check_unlisted(folder: Path, listed: dict) -> None:
    extra = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if (not p.is_file() or rel in listed or rel == MANIFEST_NAME or rel in UNLISTED_OK
                or any(part.startswith(".") for part in p.relative_to(folder).parts)):
            continue
        extra.append(rel)
    if extra:
        raise CheckpointError(
            f"{folder}: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} not in "
            f"{MANIFEST_NAME}; remove them or rebuild the artifact (push uploads verified files "
            "only)")


def _check_hashes(folder: Path, listed: dict) -> dict[str, int]:
    from tqdm import tqdm

    sizes = {}
    for rel in listed:
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in {MANIFEST_NAME} but missing; rebuild the "
                                  "artifact or restore the file")
        sizes[rel] = p.stat().st_size
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="verify sha256",
              disable=None, leave=False) as bar:
        for rel, expected in listed.items():
            if sha256_file(folder / rel) != expected:
                raise CheckpointError(
                    f"{folder / rel}: sha256 does not match {MANIFEST_NAME} (changed after "
                    "quantkit wrote it); restore the file or rebuild the artifact")
            bar.update(sizes[rel])
    log.info("verified %d files (%s) against %s", len(sizes), card.format_size(sum(
        sizes.values())), MANIFEST_NAME)
    return sizes


def _check_quantization(folder: Path, config: dict, manifest: dict,
                        tensor_names: list[str]) -> str | None:
    """A quantized folder must say so in config.json, or loaders take int32 words for weights."""
    evidence = None
    if any(n.endswith(_GPTQ_MARKERS) for n in tensor_names):
        evidence = ("gptq", "its weights are GPTQ-packed (qweight tensors)")
    elif any(m in n for n in tensor_names for m in _BNB_MARKERS):
        evidence = ("bitsandbytes", "its weights are bitsandbytes-quantized")
    elif (folder / "quantize_config.json").is_file():
        evidence = (read_json(folder / "quantize_config.json").get("quant_method", "gptq"),
                    "it has quantize_config.json")
    elif any(manifest.get(k) for k in ("quantization", "gptq", "bnb", "bitsandbytes")):
        evidence = (None, f"{MANIFEST_NAME} records a quantization")
    qc = config.get("quantization_config")
    if evidence and not qc:
        raise CheckpointError(
            f"{folder / 'config.json'}: no quantization_config although {evidence[1]}; "
            "loaders would read it as unquantized: rebuild the artifact with quantkit")
    if not qc:
        return None
    method = qc.get("quant_method")
    if evidence and evidence[0] and method != evidence[0]:
        raise CheckpointError(
            f"{folder / 'config.json'}: quantization_config says {method!r} but {evidence[1]}; "
            "rebuild the artifact with quantkit")
    qfile = folder / "quantize_config.json"
    if method == "gptq" and qfile.is_file():
        qjson = read_json(qfile)
        for key in ("bits", "group_size", "sym", "desc_act"):
            if key in qjson and key in qc and qjson[key] != qc[key]:
                raise CheckpointError(
                    f"{qfile}: {key}={qjson[key]} but config.json says {qc[key]}; "
                    "rebuild the artifact with quantkit")
    return method


def _check_tokenizer(folder: Path) -> None:
    if any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return
    raise CheckpointError(
        f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy them from "
        "the source model and rebuild the artifact")


# ---------------------------------------------------------------------------- planning


def check_config(cfg: PushConfig) -> None:
    """Flag mistakes that need no file or network to spot."""
    if cfg.hub not in HUBS:
        raise ConfigError(f"--to {cfg.hub}: choose one of {', '.join(HUBS)}")
    if not _REPO_ID.fullmatch(cfg.repo or ""):
        raise ConfigError(f"--repo {cfg.repo}: use ORG/NAME (letters, digits, . _ -)")
    if cfg.base_model and not _REPO_ID.fullmatch(cfg.base_model):
        raise ConfigError(f"--base-model {cfg.base_model}: use ORG/NAME as on the hub")
    if cfg.endpoint and not re.match(r"https?://[^/\s]+", cfg.endpoint):
        raise ConfigError(f"--endpoint {cfg.endpoint}: use a URL such as "
                          f"{DEFAULT_ENDPOINTS[cfg.hub]}")
    if not cfg.timeout > 0:
        raise ConfigError(f"--timeout {cfg.timeout}: use a positive number of seconds")
    if cfg.report is not None and not Path(cfg.report).is_file():
        raise ConfigError(f"--report {cfg.report}: no such file; pass the report.md written "
                          "by `quantkit report`")


def resolve_endpoint(cfg: PushConfig) -> str:
    return (cfg.endpoint or os.environ.get(ENDPOINT_ENV[cfg.hub])
            or DEFAULT_ENDPOINTS[cfg.hub]).rstrip("/")


def plan_push(cfg: PushConfig, artifact: Artifact) -> PushPlan:
    """The staging folder's contents: verified files plus the card (and configuration.json)."""
    report_path = cfg.report or (artifact.path / "report.md")
    tables = []
    if Path(report_path).is_file():
        tables = card.report_tables(Path(report_path).read_text(encoding="utf-8"))
        if not tables:
            log.warning("%s: no table found; the card will have no evaluation section",
                        report_path)
    linked = {rel: size for rel, size in artifact.files.items() if rel != "README.md"}
    linked[MANIFEST_NAME] = (artifact.path / MANIFEST_NAME).stat().st_size
    generated: dict[str, bytes] = {}
    if cfg.hub == "modelscope" and "configuration.json" not in linked:
        generated["configuration.json"] = (json.dumps(
            card.modelscope_configuration(artifact.config), indent=2) + "\n").encode()
    source_card = artifact.path / "README.md"
    base_model = cfg.base_model or guess_base_model(artifact.manifest)
    if base_model is None:
        log.warning("base model unknown: pass --base-model ORG/NAME so the hub links the card "
                    "to it")
    inputs = card.CardInputs(
        repo=cfg.repo, hub=cfg.hub, config=artifact.config, manifest=artifact.manifest,
        files={**linked, **{name: len(data) for name, data in generated.items()}},
        source_card=source_card.read_text(encoding="utf-8") if source_card.is_file() else None,
        report_tables=tables, license=cfg.license, base_model=base_model)
    generated["README.md"] = card.build_card(inputs).encode("utf-8")
    return PushPlan(artifact=artifact, hub=cfg.hub, repo=cfg.repo,
                    endpoint=resolve_endpoint(cfg),
                    revision=cfg.revision or DEFAULT_BRANCH[cfg.hub],
                    linked=linked, generated=generated)


def guess_base_model(manifest: dict, depth: int = 5) -> str | None:
    """ORG/NAME of the model the artifact came from, when its source path tells.

    Hub caches name folders after the repo (`models--ORG--NAME/snapshots/...` for Hugging
    Face, `.../hub/models/ORG/NAME` for ModelScope); a quantkit folder in between (convert,
    then gptq) is followed through its own manifest.
    """
    source = (manifest.get("source") or {}).get("path")
    if not source:
        return None
    m = re.search(r"models--([^/]+?)--([^/]+)", source) or \
        re.search(r"modelscope/hub/(?:models/)?([^/]+)/([^/]+?)/?$", source)
    if m:
        return f"{m.group(1)}/{m.group(2)}".replace("___", ".")
    parent = read_manifest(source) if depth and Path(source).is_dir() else None
    return guess_base_model(parent, depth - 1) if parent else None


@contextlib.contextmanager
def staged(plan: PushPlan) -> Iterator[Path]:
    """A temporary folder holding the upload: hard links (or symlinks) plus generated files."""
    tmp = Path(tempfile.mkdtemp(prefix="quantkit-push-"))
    try:
        for rel in plan.linked:
            src, dst = (plan.artifact.path / rel).absolute(), tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another filesystem, or links not allowed
                os.symlink(src, dst)
        for name, data in plan.generated.items():
            (tmp / name).write_bytes(data)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- network


def resolve_token(cfg: PushConfig) -> str:
    token = cfg.token or os.environ.get(TOKEN_ENV[cfg.hub])
    if not token and cfg.hub == "hf":
        from huggingface_hub import get_token

        token = get_token()  # `hf auth login` stores one
    if not token:
        raise HubError(f"no token for {cfg.hub}: pass --token or set {TOKEN_ENV[cfg.hub]}")
    return token


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def check_access(hub: str, endpoint: str, token: str, timeout: float,
                 retries: int = RETRIES) -> dict:
    """GET the hub's who-am-I route: network trouble and token trouble each get one answer.

    Connection errors, timeouts and 5xx are retried (at most `retries` times, never past
    `timeout` seconds in all); 401/403 are final.
    """
    url = endpoint + _WHOAMI[hub]
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}",
                                                   "Accept": "application/json"})
    deadline = time.monotonic() + timeout
    last = ""
    for attempt in range(retries + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with _NO_REDIRECTS.open(request, timeout=remaining) as response:
                body = response.read()
            info = json.loads(body or b"{}")
            _check_role(hub, endpoint, info)
            return info
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise HubError(token_rejected(hub, endpoint)) from None
            if 300 <= exc.code < 400:
                raise HubError(f"{endpoint} redirects to {exc.headers.get('Location')}: pass "
                               "the final URL as --endpoint") from None
            if exc.code < 500:
                raise HubError(f"{endpoint} answered HTTP {exc.code} to {_WHOAMI[hub]}: is it a "
                               f"{_hub_name(hub)} endpoint? check --endpoint") from None
            last = f"HTTP {exc.code}"
        except OSError as exc:  # URLError, refused, reset, timed out
            last = str(getattr(exc, "reason", exc))
        except json.JSONDecodeError:
            raise HubError(f"{endpoint}{_WHOAMI[hub]} did not answer JSON: is it a "
                           f"{_hub_name(hub)} endpoint? check --endpoint") from None
        log.debug("access check %d/%d failed: %s", attempt + 1, retries + 1, last)
        if attempt < retries:
            time.sleep(max(0.0, min(0.5 * 2 ** attempt, deadline - time.monotonic())))
    raise HubError(f"{cannot_reach(endpoint, timeout)} (last error: {last})")


def _check_role(hub: str, endpoint: str, info: dict) -> None:
    role = (((info.get("auth") or {}).get("accessToken") or {}).get("role")
            if hub == "hf" else None)
    if role == "read":
        raise HubError(f"token for {endpoint} is read-only: create a write token and pass it "
                       f"with --token / {TOKEN_ENV[hub]}")


def token_rejected(hub: str, endpoint: str) -> str:
    return f"token rejected for {endpoint}: check --token / {TOKEN_ENV[hub]}"


def cannot_reach(endpoint: str, timeout: float) -> str:
    return f"cannot reach {endpoint} within {timeout:g}s: check the network or --endpoint"


def _hub_name(hub: str) -> str:
    return {"hf": "Hugging Face Hub", "modelscope": "ModelScope"}[hub]


def upload_deadline(total_bytes: int, timeout: float) -> float:
    """Seconds the whole upload may take before it counts as hung."""
    return timeout * (1 + RETRIES) + total_bytes / MIN_UPLOAD_RATE


class DeadlineExceeded(Exception):
    """The upload thread did not return in time (it may still be running)."""


def run_with_deadline(fn: Callable[[], str], seconds: float) -> str:
    """Run `fn` in a daemon thread; raise DeadlineExceeded if it has not returned in time.

    Hub clients retry on their own (ModelScope's for many minutes when the network is
    down) and cannot be cancelled; a daemon thread lets the command give up and exit.
    """
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="quantkit-push", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise DeadlineExceeded(seconds)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _upload_hf(folder: Path, plan: PushPlan, cfg: PushConfig, token: str,
               progress: Callable[[int], None]) -> str:
    """create_repo, create_branch, upload_folder; the client draws its own progress."""
    from huggingface_hub import HfApi

    from quantkit import __version__

    api = HfApi(endpoint=plan.endpoint, token=token, library_name="quantkit",
                library_version=__version__)
    api.create_repo(plan.repo, private=cfg.private or None, exist_ok=True)
    if plan.revision != DEFAULT_BRANCH["hf"]:
        api.create_branch(plan.repo, branch=plan.revision, exist_ok=True)
    info = api.upload_folder(repo_id=plan.repo, folder_path=folder, revision=plan.revision,
                             commit_message=_commit_message(cfg, plan))
    return str(info.commit_url)


def _upload_modelscope(folder: Path, plan: PushPlan, cfg: PushConfig, token: str,
                       progress: Callable[[int], None]) -> str:
    """create_repo (already there is fine), then upload_folder reporting committed bytes."""
    ms_api = require("modelscope_hub.api", "modelscope")
    ms_errors = require("modelscope_hub.errors", "modelscope")
    api = ms_api.HubApi(endpoint=plan.endpoint, token=token)
    license_id = (card.split_front_matter(plan.generated["README.md"].decode())[0]
                  .get("license"))
    try:
        api.create_repo(plan.repo, "model", visibility="private" if cfg.private else "public",
                        license=license_id)
    except ms_errors.AlreadyExistsError:
        log.info("%s already exists on %s; uploading into it", plan.repo, plan.endpoint)
    # use_cache=False: the resume cache would be written into the staging folder, which
    # is thrown away anyway.
    api.upload_folder(plan.repo, "model", folder, commit_message=_commit_message(cfg, plan),
                      revision=plan.revision, use_cache=False, disable_tqdm=True,
                      progress_callback=lambda event: progress(event.get("committed_bytes", 0)))
    return f"{plan.endpoint}/models/{plan.repo}"


_UPLOADERS = {"hf": _upload_hf, "modelscope": _upload_modelscope}


@contextlib.contextmanager
def _progress_bar(plan: PushPlan) -> Iterator[Callable[[int], None]]:
    """A bar owned by the calling thread, so it is closed even when the upload is abandoned.

    The Hugging Face client draws its own display; ModelScope's bars would be left half
    drawn by an abandoned worker, so its progress comes through this one instead.
    """
    if plan.hub == "hf":
        yield lambda done: None
        return
    from tqdm import tqdm

    with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="upload",
              disable=None) as bar:
        yield lambda done: bar.update(max(0, done - bar.n))


def _commit_message(cfg: PushConfig, plan: PushPlan) -> str:
    if cfg.commit_message:
        return cfg.commit_message
    from quantkit import __version__

    method = plan.artifact.quant_method or "unquantized"
    return f"Upload {method} artifact with quantkit {__version__}"


def explain_failure(exc: BaseException, plan: PushPlan, token: str, timeout: float) -> str:
    """One line that says whether the token, the network or the remote side is the problem."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        status = _status_code(e)
        if status in (401, 403):
            return token_rejected(plan.hub, plan.endpoint)
        if status == 404:
            return (f"{plan.endpoint}: repo {plan.repo} or branch {plan.revision} not found "
                    "(does the token's account own ORG?)")
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError)) or \
                type(e).__name__ in ("ConnectError", "ReadTimeout", "ConnectTimeout",
                                     "NetworkError", "RequestTimeoutError", "RemoteProtocolError",
                                     "WriteTimeout", "PoolTimeout", "ReadError", "WriteError"):
            return f"{cannot_reach(plan.endpoint, timeout)} (upload stopped: {_first_line(e)})"
    detail = _first_line(chain[0]).replace(token, "***") if token else _first_line(chain[0])
    return f"upload to {plan.endpoint} failed: {detail}"


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------- entry point


def push(cfg: PushConfig) -> PushResult:
    """Verify, stage, check access, upload. Nothing goes over the network on a dry run."""
    started = time.monotonic()
    check_config(cfg)
    artifact = verify_artifact(cfg.artifact)
    plan = plan_push(cfg, artifact)
    if cfg.dry_run:
        return PushResult(plan=plan, url=None, dry_run=True)
    token = resolve_token(cfg)
    if cfg.hub == "modelscope":
        require("modelscope_hub.api", "modelscope")
    else:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise HubError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it to push")
    check_access(cfg.hub, plan.endpoint, token, cfg.timeout)
    deadline = upload_deadline(plan.total_bytes, cfg.timeout)
    log.info("uploading %d files (%s) to %s:%s (branch %s)", len(plan.files),
             card.format_size(plan.total_bytes), cfg.hub, cfg.repo, plan.revision)
    with staged(plan) as folder, _progress_bar(plan) as progress:
        try:
            url = run_with_deadline(
                lambda: _UPLOADERS[cfg.hub](folder, plan, cfg, token, progress), deadline)
        except DeadlineExceeded:
            raise HubError(f"upload to {plan.endpoint} did not finish within {deadline:g}s: "
                           "check the network or --endpoint (a larger --timeout allows more)"
                           ) from None
        except QuantkitError:
            raise
        except Exception as exc:
            raise HubError(explain_failure(exc, plan, token, cfg.timeout)) from None
    return PushResult(plan=plan, url=url, dry_run=False, seconds=time.monotonic() - started)
