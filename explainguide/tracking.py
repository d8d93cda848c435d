"""The single place a run's results go: local files always, W&B when asked.

`RunRecorder` is used as a context manager, one per Hydra job::

    with RunRecorder(output_dir, config, wandb_cfg={"mode": "offline"}) as rec:
        rec.log({"train/loss": 0.3}, step=1)
        rec.summary({"test/acc1": 0.71})

Files written under ``output_dir``:

* ``metrics.jsonl`` - one JSON object per `log` call (``step`` + metrics), flushed at once;
* ``metrics.json`` - ``status`` (running | ok | failed), ``error`` when failed, and the final values;
* ``summary.md`` - title, metadata lines, final values and every `table` as Markdown;
* ``<table>.csv`` for each table, ``images/<name>[_<step>].png`` for each image;
* ``wandb_run.json`` - id, url, mode, dir of the W&B run (not in ``disabled`` mode).

metrics.json, summary.md, CSVs and PNGs are replaced atomically (tmp + rename),
so a killed job leaves the previous complete version, never a torn file.

W&B is best effort: any exception from it (no network, no API key, a bad
value) becomes one logged warning, W&B is off for the rest of the run, and
the local files stay complete. Callers pass the output dir and metadata in;
this module never reads Hydra's global state.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from explainguide.viz import to_uint8_hwc

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")
_WANDB_KEYS = frozenset({"mode", "project", "entity"})
_RESERVED_KEYS = frozenset({"status", "error"})


class RunRecorder:
    """Records one run's metrics, tables and images to ``output_dir`` and, optionally, W&B.

    config: the plain, resolved config dict (``OmegaConf.to_container(cfg, resolve=True)``),
    sent to W&B as the run config. wandb_cfg: None for no W&B at all, else a dict with
    ``mode`` (offline | online | disabled; default offline), ``project``, ``entity``.
    group / name / tags / job_type are passed to ``wandb.init`` and shown in summary.md.
    """

    def __init__(
        self,
        output_dir: str | Path,
        config: dict,
        wandb_cfg: Mapping[str, Any] | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        job_type: str = "run",
    ) -> None:
        if not isinstance(config, dict):
            # A DictConfig shows up wrong in the W&B dashboard and is not JSON-able.
            raise TypeError(
                f"RunRecorder: config must be a plain dict, got {type(config).__name__}; "
                "pass OmegaConf.to_container(cfg, resolve=True)"
            )
        self._dir = Path(output_dir)
        self._config = config
        self._wandb_cfg = _check_wandb_cfg(wandb_cfg)
        self._group, self._name, self._tags, self._job_type = group, name, list(tags), job_type
        self._status = "created"
        self._error: str | None = None
        self._finals: dict[str, Any] = {}
        self._tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
        self._jsonl: io.TextIOWrapper | None = None
        self._wandb: Any = None  # the wandb module, imported only when W&B is asked for
        self._run: Any = None  # the live W&B run; None once W&B is off or finished
        self._run_info: dict[str, Any] | None = None

    @property
    def output_dir(self) -> Path:
        return self._dir

    @property
    def status(self) -> str:
        """created | running | ok | failed."""
        return self._status

    def __enter__(self) -> RunRecorder:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self._dir / "metrics.jsonl", "w", encoding="utf-8")
        self._status = "running"
        if self._wandb_cfg is not None:
            self._start_wandb()
        # Written now so a job killed before the end still shows status "running".
        self._write_finals()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._status = "ok" if exc is None else "failed"
        self._error = None if exc is None else _error_line(exc)
        try:
            self._jsonl.close()
            self._write_finals()
        finally:
            # Always end the W&B run, or the next job of a multirun logs into it.
            if self._run is not None:
                run, self._run = self._run, None
                try:
                    run.finish(exit_code=0 if exc is None else 1)
                except Exception as err:
                    log.warning(
                        "W&B finish failed (%s); local files in %s are complete", _error_line(err), self._dir
                    )
        return False  # re-raise the body's exception

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append one row of metrics at ``step`` (e.g. ``{"train/loss": 0.3}``)."""
        if self._jsonl is None or self._jsonl.closed:
            raise RuntimeError("RunRecorder.log: use the recorder inside `with RunRecorder(...) as rec:`")
        row = {key: _plain(value) for key, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **row}, default=_json_default) + "\n")
        self._jsonl.flush()
        self._wandb_call("log", lambda: self._run.log(row, step=step))

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set final values (e.g. ``{"test/acc1": 0.71}``); later calls update earlier ones."""
        clash = _RESERVED_KEYS.intersection(values)
        if clash:
            raise ValueError(f"RunRecorder.summary: {sorted(clash)} are reserved in metrics.json; rename them")
        plain = {key: _plain(value) for key, value in values.items()}
        self._finals.update(plain)
        self._write_finals()
        self._wandb_call("summary", lambda: self._run.summary.update(plain))

    def set_final(self, key: str, value: Any) -> None:
        """Set one final value; same as ``summary({key: value})``."""
        self.summary({key: value})

    def table(self, name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
        """Save a table as ``<name>.csv``, a Markdown table in summary.md and a W&B Table.

        Adding a table under an existing name replaces it. Returns the CSV path.
        """
        columns = list(columns)
        rows = [[_plain(cell) for cell in row] for row in rows]
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(
                    f"RunRecorder.table {name!r}: row {i} has {len(row)} cells for {len(columns)} columns"
                )
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        path = self._dir / f"{_file_name(name)}.csv"
        _atomic_write(path, buffer.getvalue().encode("utf-8"))
        self._tables[name] = (columns, rows)
        self._write_finals()
        # commit=False attaches to the current step, so later explicit steps are not dropped.
        self._wandb_call(
            "table", lambda: self._run.log({name: self._wandb.Table(columns=columns, data=rows)}, commit=False)
        )
        return path

    def image(self, name: str, image: Any, step: int | None = None, caption: str | None = None) -> Path:
        """Save an image as ``images/<name>[_<step>].png`` and log it to W&B.

        image: PIL image, or tensor/array (H, W), (H, W, C) or (C, H, W); floats in
        [0, 1], integers in [0, 255]. Returns the PNG path.
        """
        pixels = to_uint8_hwc(image)
        stem = _file_name(name) if step is None else f"{_file_name(name)}_{step:06d}"
        path = self._dir / "images" / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        if caption is not None:
            info.add_text("Caption", caption)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
        _atomic_write(path, buffer.getvalue())
        when = {"commit": False} if step is None else {"step": step}
        self._wandb_call(
            "image", lambda: self._run.log({name: self._wandb.Image(pixels, caption=caption)}, **when)
        )
        return path

    def status_line(self) -> str:
        """One line for the job log: status, error, output dir and where the W&B run is."""
        line = f"run {self._status}"
        if self._error:
            line += f" ({self._error})"
        line += f": {self._dir}"
        info = self._run_info
        if info is not None and info["mode"] == "offline":
            line += f"; W&B offline run {info['id']}, upload with `wandb sync {info['dir']}`"
        elif info is not None:
            line += f"; W&B {info['url']}"
        return line

    # -- W&B ---------------------------------------------------------------

    def _start_wandb(self) -> None:
        cfg = self._wandb_cfg
        try:
            import wandb

            self._wandb = wandb
            self._run = wandb.init(
                project=cfg.get("project"),
                entity=cfg.get("entity"),
                config=self._config,
                group=self._group,
                name=self._name,
                tags=self._tags or None,
                dir=str(self._dir),
                job_type=self._job_type,
                mode=cfg["mode"],
                reinit=_reinit_arg(wandb),
            )
        except Exception as err:
            self._wandb_off("init", err)
            return
        if cfg["mode"] != "disabled":
            self._run_info = {
                "id": self._run.id,
                "url": self._run.url,
                "mode": cfg["mode"],
                "dir": self._run.settings.sync_dir,
            }
            _atomic_write(self._dir / "wandb_run.json", _json_bytes(self._run_info))

    def _wandb_call(self, what: str, call) -> None:
        if self._run is None:
            return
        try:
            call()
        except Exception as err:
            self._wandb_off(what, err)

    def _wandb_off(self, what: str, err: Exception) -> None:
        # logging, not warnings.warn: the latter shows once per process, and each
        # job of a multirun should say why its W&B run is missing.
        log.warning(
            "W&B %s failed (%s); W&B is off for this run, local files in %s are complete",
            what, _error_line(err), self._dir,
        )
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass  # already reported that W&B is broken; the local files matter

    # -- local files ---------------------------------------------------------

    def _write_finals(self) -> None:
        finals = {"status": self._status}
        if self._error is not None:
            finals["error"] = self._error
        _atomic_write(self._dir / "metrics.json", _json_bytes({**finals, **self._finals}))
        _atomic_write(self._dir / "summary.md", self._markdown().encode("utf-8"))

    def _markdown(self) -> str:
        lines = [f"# {self._name or self._dir.name}", "", f"- status: {self._status}"]
        if self._error is not None:
            lines.append(f"- error: `{self._error}`")
        lines.append(f"- job_type: {self._job_type}")
        if self._group:
            lines.append(f"- group: {self._group}")
        if self._tags:
            lines.append(f"- tags: {', '.join(self._tags)}")
        lines.append(f"- output_dir: `{self._dir}`")
        if self._run_info is not None:
            where = self._run_info["url"] or f"`{self._run_info['dir']}`"
            lines.append(f"- wandb: {self._run_info['mode']} run {self._run_info['id']}, {where}")
        if self._finals:
            lines += ["", "## Final values", "", *_markdown_table(["metric", "value"], self._finals.items())]
        for name, (columns, rows) in self._tables.items():
            lines += ["", f"## {name}", "", *_markdown_table(columns, rows)]
        return "\n".join(lines) + "\n"


REFUSED_FILE = "refused.json"  # a failed later attempt in a folder that holds a finished run


def record_failure(output_dir: str | Path, err: BaseException) -> None:
    """Mark the run in `output_dir` failed with `err`'s line, e.g. when it failed before its recorder opened (a
    config error, unreadable data), so sweeps and tables show it as failed, not unfinished. A finished earlier
    run's record (status ok) is kept: this attempt's error goes to REFUSED_FILE beside it, where `runs_not_ok`
    still finds it. Any other record (the recorder's own, an earlier failure) is updated in place."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _read_record(path)
    if record.get("status") == "ok":
        _atomic_write(path.with_name(REFUSED_FILE), _json_bytes({"error": _error_line(err)}))
    else:
        _atomic_write(path, _json_bytes({**record, "status": "failed", "error": _error_line(err)}))


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def runs_not_ok(root: str | Path, since: float) -> list[Path]:
    """Run dirs under `root` whose attempt at or after time `since` did not finish: a metrics.json written since
    then that says anything but ok, or a REFUSED_FILE written since then."""
    root = Path(root)
    failed = {path.parent for path in root.rglob("metrics.json")
              if path.stat().st_mtime >= since and _read_record(path).get("status") != "ok"}
    failed |= {path.parent for path in root.rglob(REFUSED_FILE) if path.stat().st_mtime >= since}
    return sorted(failed)


def _check_wandb_cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if cfg is None:
        return None
    unknown = set(cfg) - _WANDB_KEYS
    if unknown:
        raise ValueError(
            f"RunRecorder: unknown wandb_cfg keys {sorted(unknown)}; allowed: {sorted(_WANDB_KEYS)}"
        )
    cfg = {"mode": "offline", **cfg}
    if cfg["mode"] not in WANDB_MODES:
        raise ValueError(f"RunRecorder: wandb mode must be one of {WANDB_MODES}, got {cfg['mode']!r}")
    return cfg


def _reinit_arg(wandb) -> str | bool:
    # wandb >= 0.19.10 has reinit="create_new": our run lives beside any other and
    # we finish it ourselves. Older versions only know True (finish the previous run).
    param = inspect.signature(wandb.init).parameters.get("reinit")
    return "create_new" if param is not None and "create_new" in str(param.annotation) else True


def _error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _plain(value: Any) -> Any:
    """0-d tensors and numpy scalars -> Python numbers, so JSON, CSV and W&B agree."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, default=_json_default) + "\n").encode("utf-8")


def _file_name(name: str) -> str:
    """A metric-style name ("val/heatmap") -> a safe file stem ("val_heatmap")."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    if not stem:
        raise ValueError(f"RunRecorder: {name!r} gives no usable file name; use letters, digits, _ . -")
    return stem


def _markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def _atomic_write(path: Path, data: bytes) -> None:
    # Same-folder tmp file + os.replace: readers see the old or the new file, never half of one.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
