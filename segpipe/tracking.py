"""Experiment tracking on rank 0: one Tracker sends params, scalars, pictures and artefacts to TensorBoard, MLflow
and Weights & Biases (train.tracker); MLflow and W&B are optional packages, imported only when asked for."""
from __future__ import annotations

import importlib
import netrc
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlparse

import torch

from segpipe.config import ConfigError

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # how a run ended, in MLflow's words
PIP = {"mlflow": "pip install mlflow", "wandb": "pip install wandb"}  # trackers that are optional packages


def tracker_names(value: str | list) -> list[str]:
    """train.tracker (a name or a list of names) as a list."""
    return [value] if isinstance(value, str) else list(value)


def require_packages(trackers: str | list) -> None:
    """Import the optional packages train.tracker asks for, so a missing one stops the run before it trains."""
    names = tracker_names(trackers)
    for name in names:
        if name in PIP:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ConfigError(f"train.tracker={trackers} needs the {name} package, which cannot be imported "
                                  f"({e}); {PIP[name]}, or leave {name} out of train.tracker") from None
    if "mlflow" in names:
        require_mlflow_store_packages()


def require_mlflow_store_packages() -> None:
    """MLflow's database stores, its default sqlite:///mlflow.db included, need SQLAlchemy and Alembic, which
    mlflow-skinny comes without (MLflow's own error for that speaks of the model registry)."""
    import mlflow
    uri = mlflow.get_tracking_uri()
    if urlparse(uri).scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql", "mssql"):
        return
    for package in ("sqlalchemy", "alembic"):
        try:
            importlib.import_module(package)
        except ImportError:
            raise ConfigError(f"MLflow's tracking store {uri} is a database, which needs the {package} package "
                              f"(mlflow-skinny comes without it): pip install mlflow, or set MLFLOW_TRACKING_URI "
                              f"to an MLflow server (http://HOST:PORT)") from None


def config_params(config: dict, prefix: str = "") -> dict:
    """A nested config as flat {dotted.key: value} params (values as MLflow shows them: str())."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            params.update(config_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)
    return params


class Tracker:
    """Rank 0's logging, sent to each backend of train.tracker; without backends (other ranks) it does nothing.

    A backend that fails while logging (a tracking server gone away) is reported once, marked FAILED if it
    still can be, and dropped: the training goes on, and its checkpoints are what matters.
    """

    def __init__(self, backends: Sequence = ()):
        self.backends = list(backends)
        self.closed = False

    def log_params(self, params: dict) -> None:
        """The run's settings (flat {name: str value}); once per run, again after a resume."""
        self._each("log_params", params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Scalars at this optimizer step."""
        self._each("log_metrics", metrics, step)

    def log_image(self, name: str, image: torch.Tensor, step: int) -> None:
        """A uint8 CHW picture at this optimizer step."""
        self._each("log_image", name, image, step)

    def log_artifact(self, path: str | Path) -> None:
        """Keep a copy of this file with the run (trackers that store files only)."""
        self._each("log_artifact", Path(path))

    def close(self, status: str = FINISHED) -> None:
        """End the run as FINISHED, FAILED or KILLED (stopped by a signal, to be resumed); later calls do nothing."""
        if not self.closed:
            self.closed = True
            self._each("close", status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        # An exception that escapes training ends the runs too; not closing them would leave them RUNNING forever.
        self.close(KILLED if kind is KeyboardInterrupt else FINISHED if kind is None else FAILED)

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001 (any failure of a tracker must not end the training)
                print(f"warning: {backend.name} logging stopped ({type(e).__name__}: {first_line(e)}); training "
                      f"goes on, checkpoints are unaffected", file=sys.stderr)
                self.backends.remove(backend)
                if method != "close":
                    try:
                        backend.close(FAILED)
                    except Exception:  # noqa: BLE001 (it is already reported and dropped)
                        pass


def first_line(error: BaseException) -> str:
    """An exception's message, first line only (MLflow's and W&B's run to several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_trackers(trackers: str | list, out_dir: Path, experiment: Optional[str], params: dict, resumed: bool,
                  log: Callable = print) -> Tracker:
    """The Tracker of train.tracker for a run writing to out_dir, with its params logged.

    resumed: the run continues from a checkpoint, so MLflow and W&B continue the run whose id is in
    out_dir (mlflow_run_id, wandb_run_id) instead of starting a new one.
    A store or service that cannot be used raises ConfigError (one line), before any training.
    """
    out_dir = Path(out_dir)
    experiment = experiment or out_dir.resolve().name
    backends = {"tensorboard": TensorBoardBackend, "mlflow": MLflowBackend, "wandb": WandbBackend}  # config.TRACKERS
    tracker = Tracker()
    try:
        for name in tracker_names(trackers):
            tracker.backends.append(backends[name].open(out_dir, experiment, resumed, log))
    except BaseException:
        tracker.close(FAILED)  # the backends opened so far
        raise
    tracker.log_params(params)
    return tracker


def previous_run_id(out_dir: Path, name: str, resumed: bool) -> Optional[str]:
    """The id a tracker stored in out_dir for this run, when the run resumes and has one."""
    path = out_dir / f"{name}_run_id"
    if not resumed or not path.is_file():
        return None
    return path.read_text().strip() or None


def store_run_id(out_dir: Path, name: str, run_id: str) -> None:
    """Remember the tracker's run id in out_dir (atomically), for a resume to continue the same run."""
    path = out_dir / f"{name}_run_id"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)


def safe_key(key: str) -> str:
    """A metric or image name MLflow accepts (class names may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


def hwc(image: torch.Tensor) -> Any:
    """uint8 CHW tensor -> HWC numpy array, what MLflow and W&B take."""
    return image.permute(1, 2, 0).contiguous().cpu().numpy()


class TensorBoardBackend:
    """SummaryWriter in OUTPUT_DIR/tb: scalars and pictures (the config is in OUTPUT_DIR/config.yaml)."""

    name = "tensorboard"

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, out_dir: Path, experiment: str, resumed: bool, log: Callable) -> "TensorBoardBackend":
        from torch.utils.tensorboard import SummaryWriter
        return cls(SummaryWriter(str(out_dir / "tb")))  # a resumed run adds an event file beside the old ones

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, name: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(name, image, step)

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowBackend:
    """One MLflow run: params, metrics, pictures by step, artefacts, and its end status.

    The store is MLflow's own choice: MLFLOW_TRACKING_URI when set, else MLflow's default (since MLflow 3.7
    sqlite:///mlflow.db with artefacts in ./mlruns, in the working folder), which `mlflow ui` started in the
    same folder shows.
    """

    name = "mlflow"

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.logged_params = client.get_run(run_id).data.params

    @classmethod
    def open(cls, out_dir: Path, experiment: str, resumed: bool, log: Callable) -> "MLflowBackend":
        import mlflow
        uri = mlflow.get_tracking_uri()
        try:
            client = mlflow.MlflowClient(uri)
            run_id = cls.continued_run(client, previous_run_id(out_dir, cls.name, resumed), log)
            if run_id is None:
                found = client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else client.create_experiment(experiment)
                run_id = client.create_run(experiment_id, run_name=out_dir.resolve().name,
                                           tags={"segpipe.output_dir": str(out_dir.resolve())}).info.run_id
                store_run_id(out_dir, cls.name, run_id)
            backend = cls(client, run_id)
        except Exception as e:  # noqa: BLE001 (stores fail in their own ways: MLflow, SQLAlchemy, HTTP, files)
            raise ConfigError(f"MLflow cannot use the tracking store {uri} ({type(e).__name__}: {first_line(e)}); "
                              f"set MLFLOW_TRACKING_URI to a store it can write (unset: sqlite:///mlflow.db in "
                              f"the working folder), or leave mlflow out of train.tracker") from None
        log(f"MLflow: run {run_id} of experiment {experiment!r} in {uri} (see it with `mlflow ui`)")
        return backend

    @staticmethod
    def continued_run(client, run_id: Optional[str], log: Callable) -> Optional[str]:
        """run_id set to RUNNING again, or None when there is none or this store does not have it."""
        from mlflow.exceptions import MlflowException
        if run_id is None:
            return None
        try:
            if client.get_run(run_id).info.lifecycle_stage != "active":
                raise MlflowException(f"run {run_id} was deleted")
        except MlflowException as e:
            log(f"MLflow: cannot continue run {run_id} ({first_line(e)}); starting a new run")
            return None
        client.update_run(run_id, status="RUNNING")
        return run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param, RunTag
        # Params cannot change once logged: a resumed run's new values (more epochs, train.resume) become tags.
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in self.logged_params]
        changed = [RunTag(f"resumed_with.{k}", v[:5000]) for k, v in params.items()
                   if k in self.logged_params and self.logged_params[k] != v[:6000]]
        for i in range(0, max(len(new), len(changed)), 100):  # MLflow takes at most 100 of each per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100], tags=changed[i:i + 100])
        self.logged_params.update({p.key: p.value for p in new})

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(safe_key(k), float(v), now, step)
                                                    for k, v in metrics.items()])

    def log_image(self, name: str, image: torch.Tensor, step: int) -> None:
        self.client.log_image(self.run_id, hwc(image), key=safe_key(name), step=step)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class WandbBackend:
    """One W&B run, in OUTPUT_DIR/wandb: offline (sync later with `wandb sync`) unless you are logged in or set
    WANDB_MODE yourself."""

    name = "wandb"

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, out_dir: Path, experiment: str, resumed: bool, log: Callable) -> "WandbBackend":
        import wandb
        run_id = previous_run_id(out_dir, cls.name, resumed)
        mode = None if os.environ.get("WANDB_MODE") else ("online" if wandb_logged_in() else "offline")
        try:
            run = wandb.init(project=experiment, name=out_dir.resolve().name, dir=str(out_dir), id=run_id,
                             resume="allow" if run_id else None, mode=mode)
        except Exception as e:  # noqa: BLE001 (wandb.init raises many kinds: auth, network, usage)
            raise ConfigError(f"W&B cannot start a run ({first_line(e)}); log in with `wandb login`, set "
                              f"WANDB_MODE=offline, or leave wandb out of train.tracker") from None
        store_run_id(out_dir, cls.name, run.id)
        log(f"W&B: run {run.id} of project {experiment!r}, {run.settings.mode} in {out_dir / 'wandb'}"
            + (" (upload it with `wandb sync`)" if run.settings.mode == "offline" else ""))
        return cls(run)

    def log_params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, name: str, image: torch.Tensor, step: int) -> None:
        import wandb
        self.run.log({name: wandb.Image(hwc(image))}, step=step)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, status: str) -> None:
        if status == KILLED:
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == FINISHED else 1)


def wandb_logged_in() -> bool:
    """True when W&B has an API key: WANDB_API_KEY, or what `wandb login` wrote into ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
