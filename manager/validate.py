"""Checks of a ContainerConfig as the manager receives it (codes 200, 201, 302).

``normalize_config`` returns the ``InferenceSettings`` the registry stores; every refusal
names the attribute and what is wrong with it. Pure: any thread.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
from typing import Any

from infinibrain.errors import make_error

from .config import NAME_RE
from .restarts import policy_of
from .run_options import parse_run_option
from .settings import InferenceSettings, one_or_many

IMPLEMENTATION_TYPES = {"docker": "docker", "nvidia": "nvidia", "process": "process", "loop": "Loop", "other": "other"}
MAX_SEND_NUM_LIMIT = 1024

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(InferenceSettings))
MAX_BATCH_SIZE_LIMIT = 4096
MAX_QUEUE_SIZE_LIMIT = 1_000_000
MAX_RETRIES = 10
MAX_QUEUE_DELAY_LIMIT = 60_000  # ms


def param_error(detail: str) -> Exception:
    return make_error(302, detail=detail)


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise param_error(f"{what} must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, got {value!r}")
    return value


def normalize_config(raw: Any) -> InferenceSettings:
    """Validate one container configuration (a dict or JSON text)."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise make_error(200, detail=f"container_config: {exc}") from None
    if not isinstance(raw, dict):
        raise make_error(200, detail=f"container_config must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise param_error(f"unknown attribute {unknown[0]!r}")
    cfg = {key: raw.get(key) for key in CONFIG_KEYS}
    if not cfg["name"]:
        raise make_error(201, detail="name")
    check_name(cfg["name"], "name")

    kind = cfg["implementation_type"] or "docker"
    if not isinstance(kind, str) or kind.lower() not in IMPLEMENTATION_TYPES:
        raise param_error(f"implementation_type must be one of docker, nvidia, process, Loop, other; got {kind!r}")
    cfg["implementation_type"] = IMPLEMENTATION_TYPES[kind.lower()]

    for key in ("input", "output"):
        cfg[key] = _main_or_none(cfg[key], key)
    for key in ("send_timeout", "wait_queue_timeout"):
        cfg[key] = _optional_int(cfg[key], key, 1, 24 * 3600 * 1000)
    cfg["max_send_num"] = _optional_int(cfg["max_send_num"], "max_send_num", 1, MAX_SEND_NUM_LIMIT)
    cfg["ready_timeout"] = _optional_int(cfg["ready_timeout"], "ready_timeout", 1, 24 * 3600 * 1000)
    cfg["max_batch_size"] = _optional_int(cfg["max_batch_size"], "max_batch_size", 1, MAX_BATCH_SIZE_LIMIT)
    cfg["max_queue_delay"] = _optional_int(cfg["max_queue_delay"], "max_queue_delay", 0, MAX_QUEUE_DELAY_LIMIT)
    cfg["max_queue_size"] = _optional_int(cfg["max_queue_size"], "max_queue_size", 1, MAX_QUEUE_SIZE_LIMIT)
    cfg["retries"] = _optional_int(cfg["retries"], "retries", 0, MAX_RETRIES) or 0
    if cfg["max_queue_delay"] and (cfg["max_batch_size"] or 1) == 1:
        raise param_error("max_queue_delay holds requests back to form batches: set max_batch_size (2 or more) too, or leave it out")
    if not isinstance(cfg["force_update"], (bool, type(None))):
        raise param_error(f"force_update must be True or False, got {cfg['force_update']!r}")
    cfg["force_update"] = bool(cfg["force_update"])
    for key in ("script_path", "image_path", "image_filename", "image_tag", "run_command", "run_option"):
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise param_error(f"{key} must be a string, got {type(cfg[key]).__name__}")
        if cfg[key] == "":
            cfg[key] = None
    cfg["inference_modules"] = _modules(cfg["inference_modules"])
    cfg["copy"] = _copy_entries(cfg["copy"])
    cfg["warmup"] = _warmup(cfg["warmup"], cfg)
    if cfg["run_command"] is not None:
        try:
            if not shlex.split(cfg["run_command"]):
                raise ValueError("it is empty")
        except ValueError as exc:
            raise param_error(f"run_command cannot be parsed: {exc}") from None
    if cfg["implementation_type"] in ("docker", "nvidia"):
        _check_docker(cfg)
    policy_of(cfg["run_option"])  # --restart is read for every implementation type
    if cfg["script_path"] is not None:
        if not os.path.isabs(cfg["script_path"]):
            raise param_error(f"script_path must be an absolute path, got {cfg['script_path']!r}")
        if not os.path.isdir(cfg["script_path"]):
            raise param_error(f"script_path {cfg['script_path']!r} is not a directory on the main board")
    return InferenceSettings.from_dict(cfg)


def _check_docker(cfg: dict) -> None:
    """What a Docker container needs that can be checked without an engine."""
    if not cfg["image_tag"]:
        raise param_error(f"image_tag is required for implementation_type {cfg['implementation_type']!r}")
    parse_run_option(cfg["run_option"])
    if cfg["image_filename"] and cfg["image_path"] and not os.path.isabs(cfg["image_path"]):
        raise param_error(f"image_path must be an absolute path, got {cfg['image_path']!r}")


def _warmup(value: Any, cfg: dict) -> dict | None:
    """A warm-up: a sample input file on the main board (``.npy``: an image request, else
    bytes), or {"file", "param", "sub_inference_name"}; stored as that dict."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = {"file": value}
    if not isinstance(value, dict):
        raise param_error("warmup must be a file path or a dict {'file': ..., 'param': {...}, 'sub_inference_name': ...}")
    extra = sorted(set(value) - {"file", "param", "sub_inference_name"})
    if extra:
        raise param_error(f"warmup: unknown key {extra[0]!r} (file, param, sub_inference_name)")
    path, param, sub = value.get("file"), value.get("param") or {}, value.get("sub_inference_name") or None
    if not isinstance(path, str) or not os.path.isabs(path):
        raise param_error(f"warmup.file must be an absolute path on the main board, got {path!r}")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise param_error(f"warmup.file {path!r} cannot be read on the main board")
    if isinstance(param, str):
        try:
            param = json.loads(param)
        except ValueError as exc:
            raise param_error(f"warmup.param is not JSON: {exc}") from None
    if not isinstance(param, dict):
        raise param_error("warmup.param must be a dict")
    modules = [m["sub_inference_name"] for m in one_or_many(cfg["inference_modules"])] or [cfg["name"]]
    if sub is not None and sub not in modules:
        raise param_error(f"warmup.sub_inference_name {sub!r} is not a module of the inference (it has {', '.join(modules)})")
    return {"file": path, "param": param, "sub_inference_name": sub}


def _main_or_none(value: Any, key: str) -> str | None:
    if value is None or value == "None" or value == "":
        return None
    if isinstance(value, str) and value.lower() == "main":
        return "Main"
    raise param_error(f"{key} must be 'Main' or None, got {value!r}")


def _optional_int(value: Any, key: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise param_error(f"{key} must be an integer from {low} to {high}, got {value!r}")
    return value


def _modules(value: Any) -> Any:
    items = one_or_many(value)
    if not items:
        return None
    out, seen = [], set()
    for item in items:
        if not isinstance(item, dict):
            raise param_error("inference_modules must be an InferenceModulesConfig or a list of them")
        if not item.get("sub_inference_name"):
            raise make_error(201, detail="inference_modules.sub_inference_name")
        sub = check_name(item["sub_inference_name"], "inference_modules.sub_inference_name")
        if sub in seen:
            raise param_error(f"inference_modules: sub_inference_name {sub!r} is given twice")
        seen.add(sub)
        module = {
            "sub_inference_name": sub,
            "script_tag": item.get("script_tag"),
            "model_tag": item.get("model_tag"),
            "script": item.get("script"),
            "model": item.get("model"),
        }
        for key in ("script", "model"):
            files = module[key]
            if files is not None and not (
                isinstance(files, str) or (isinstance(files, list) and all(isinstance(f, str) for f in files))
            ):
                raise param_error(f"inference_modules.{key} must be a file name or a list of them")
        module.update(_runner_options(item))
        out.append(module)
    return out[0] if not isinstance(value, list) else out


def _runner_options(item: dict) -> dict:
    """The built-in runner's options of a module (ours; kept only when given, so the
    stored settings of modules without them stay as they were)."""
    out: dict[str, Any] = {}
    if item.get("hooks") is not None:
        if not isinstance(item["hooks"], str) or not item["hooks"].endswith(".py"):
            raise param_error(f"inference_modules.hooks must name a .py file of preprocess/postprocess functions, got {item['hooks']!r}")
        out["hooks"] = item["hooks"]
    if item.get("providers") is not None:
        providers = item["providers"]
        if isinstance(providers, str):
            providers = [providers]
        ok = isinstance(providers, list) and providers and all(
            isinstance(p, str) or (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict))
            for p in providers)
        if not ok:
            raise param_error("inference_modules.providers must be a list of ONNX Runtime execution providers: "
                              "names such as 'CPUExecutionProvider', or [name, {option: value}] pairs")
        out["providers"] = [p if isinstance(p, str) else [p[0], dict(p[1])] for p in providers]
    if item.get("threads") is not None:
        out["threads"] = _optional_int(item["threads"], "inference_modules.threads", 1, 1024)
    if out and item.get("script"):
        raise param_error(f"inference_modules: {', '.join(out)} set the built-in model runner, which serves a module "
                          "with a model and no script; leave them out, or the script")
    return out


def _copy_entries(value: Any) -> Any:
    if value is None:
        return None
    for item in one_or_many(value):
        if not isinstance(item, dict):
            raise param_error("copy must be a dict {'From': ..., 'To': ...} or a list of them")
        for key in ("From", "To"):
            if key not in item:
                raise make_error(201, detail=f"copy.{key}")
            if not isinstance(item[key], str) or not item[key]:
                raise param_error(f"copy.{key} must be a non-empty path")
        extra = sorted(set(item) - {"From", "To"})
        if extra:
            raise param_error(f"copy: unknown key {extra[0]!r}")
        if not os.path.exists(item["From"]):
            raise param_error(f"copy.From {item['From']!r} does not exist on the main board")
    return value
