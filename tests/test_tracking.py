"""Experiment tracking (train.tracker): real in-process training runs read back from MLflow's local store and
W&B's offline run files; bad names, missing packages and unusable stores stop the run with one line."""
import json
import os
import signal
import struct
import sys

import pytest
import torch

from conftest import REPO
from segpipe import training
from segpipe.checkpoint import load_checkpoint
from segpipe.config import load_config
from segpipe.metrics import ConfusionMatrix
from segpipe.tracking import FAILED, Tracker, config_params

mlflow = pytest.importorskip("mlflow")

TINY = ["model.name=lraspp_mobilenet_v3_large", "data.crop_size=[32,32]", "train.batch_size=2", "data.num_workers=0",
        "train.amp=none", "train.warmup_steps=1", "train.log_every=1", "train.num_vis=1", "data.classes=[a,b,c]"]


def config(root, out, *extra):
    return load_config(REPO / "configs/default.yaml", TINY + [f"data.root={root}", f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """One MLflow store for the module: creating its database takes seconds."""
    return tmp_path_factory.mktemp("mlflow_store")


@pytest.fixture
def client(store_dir, monkeypatch):
    """MLflow as a user has it: no MLFLOW_TRACKING_URI, so sqlite:///mlflow.db and ./mlruns in the working folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(store_dir)
    return mlflow.MlflowClient(f"sqlite:///{store_dir / 'mlflow.db'}")


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """train() installs its own SIGTERM/SIGINT handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def only_run(client, out):
    """The one MLflow run of the experiment named after the output folder."""
    experiment = client.get_experiment_by_name(out.name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == (out / "mlflow_run_id").read_text().strip()
    return runs[0]


def test_mlflow_run_holds_config_metrics_and_artefacts(make_dataset, tmp_path, client):
    root, out = make_dataset(n_train=4, n_valid=3), tmp_path / "tracked"
    assert training.train(config(root, out, "train.epochs=2", "train.tracker=[tensorboard,mlflow]")) == 0
    run = only_run(client, out)
    best = load_checkpoint(out / "best.pt")
    assert run.info.status == "FINISHED"
    assert run.data.params == config_params(best["config"]) and run.data.params["train.epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "val/miou")
    assert [m.step for m in history] == [2, 4]  # one value per validated epoch
    assert max(m.value for m in history) == best["best_miou"]
    assert {"train/loss", "val/pixel_accuracy", "val_iou/a"} <= set(run.data.metrics)
    assert any(out.joinpath("tb").iterdir())  # TensorBoard as well
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"best.pt", "config.yaml", "best_confusion_matrix.json", "best_confusion_matrix.png", "images"} <= names
    copy = load_checkpoint(client.download_artifacts(run.info.run_id, "best.pt", str(tmp_path)))
    assert all(torch.equal(copy["model"][k], v) for k, v in best["model"].items())
    record = json.loads((out / "best_confusion_matrix.json").read_text())
    cm = ConfusionMatrix(3, 255)
    cm.matrix = torch.tensor(record["matrix"])
    assert cm.matrix.sum() == 3 * 40 * 56 and cm.compute()["miou"] == best["best_miou"] == record["miou"]


def test_resumed_run_continues_the_same_mlflow_run(make_dataset, tmp_path, client, monkeypatch):
    root, out = make_dataset(n_train=6, n_valid=2), tmp_path / "resumed"
    args = ["train.epochs=2", "train.tracker=mlflow"]  # 3 steps per epoch
    sent = []

    def sigterm_after_step_4(run, state, best_miou):  # as a preempted job gets it; the loop stops after step 5
        if state.step == 4 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
    with monkeypatch.context() as patch:
        patch.setattr(training, "save_periodically", sigterm_after_step_4)
        assert training.train(config(root, out, *args)) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 5
    assert only_run(client, out).info.status == "KILLED"
    assert training.train(config(root, out, *args, "train.resume=auto")) == 0
    run = only_run(client, out)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [3, 6]
    assert run.data.params["train.resume"] == "None" and run.data.tags["resumed_with.train.resume"] == "auto"


def test_unknown_tracker_is_a_one_line_config_error():
    with pytest.raises(SystemExit) as stop:
        training.read_config(str(REPO / "configs/default.yaml"), ["train.tracker=[tensorboard,mlfow]"])
    message = str(stop.value.code)
    assert message.startswith("config error: train.tracker=") and "'mlfow' is not one of tensorboard, mlflow, " \
        "wandb" in message and "\n" not in message


@pytest.mark.parametrize("hidden, tracker", [("mlflow", "mlflow"), ("wandb", "wandb"), ("sqlalchemy", "mlflow")])
def test_missing_package_stops_before_training_with_the_pip_command(make_dataset, tmp_path, client, monkeypatch,
                                                                    hidden, tracker):
    monkeypatch.setitem(sys.modules, hidden, None)  # what `import hidden` does when it is not installed
    out = tmp_path / "missing"
    with pytest.raises(SystemExit) as stop:
        training.train(config(make_dataset(), out, f"train.tracker=[tensorboard,{tracker}]"))
    message = str(stop.value.code)
    assert message.startswith("config error: ") and f"pip install {tracker}" in message and "\n" not in message
    assert not out.exists()  # stopped before anything was built or written


def test_unusable_mlflow_store_is_a_one_line_config_error(make_dataset, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a database")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a_file'}")
    out = tmp_path / "unusable"
    with pytest.raises(SystemExit) as stop:
        training.train(config(make_dataset(), out, "train.tracker=[tensorboard,mlflow]"))
    message = str(stop.value.code)
    assert message.startswith(f"config error: MLflow cannot use the tracking store sqlite:///{tmp_path / 'a_file'}")
    assert "\n" not in message and not (out / "last.pt").exists()


class Recorder:
    """A tracker backend that keeps what it is given (and can be told to break, as a vanished server does)."""

    name = "recorder"

    def __init__(self, broken=False):
        self.broken, self.metrics, self.status = broken, [], None  # status: how it was closed

    def log_metrics(self, metrics, step):
        if self.broken:
            raise ConnectionError("server went away\nsecond line")
        self.metrics.append((step, metrics))

    def close(self, status):
        self.status = status


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_others_go_on(capsys):
    broken, working = Recorder(broken=True), Recorder()
    with pytest.raises(ValueError):
        with Tracker([broken, working]) as tracker:
            tracker.log_metrics({"train/loss": 1.0}, 1)
            tracker.log_metrics({"train/loss": 0.5}, 2)
            raise ValueError("training crashed")
    assert working.metrics == [(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5})] and working.status == FAILED
    assert broken.status == FAILED and tracker.backends == [working]
    assert capsys.readouterr().err.splitlines() == [
        "warning: recorder logging stopped (ConnectionError: server went away); training goes on, checkpoints are "
        "unaffected"]


def wandb_records(run_dir):
    """The records of an offline W&B run (its .wandb file: W&B's 7-byte header, then LevelDB's log format)."""
    from wandb.proto import wandb_internal_pb2
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_logs_offline_without_a_login(make_dataset, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    root, out = make_dataset(n_train=4, n_valid=2), tmp_path / "wandb_run"
    assert training.train(config(root, out, "train.epochs=1", "train.tracker=wandb")) == 0
    wandb.teardown()  # W&B's service process may still be writing the run's file; at exit it would be done
    run_id = (out / "wandb_run_id").read_text().strip()
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    records = wandb_records(run_dir)
    history = [(r.history.step.num, {item.key or "/".join(item.nested_key): item.value_json  # "a/b": nested
                                      for item in r.history.item}) for r in records if r.HasField("history")]
    miou = [(step, float(row["val/miou"])) for step, row in history if "val/miou" in row]
    assert miou == [(2, load_checkpoint(out / "best.pt")["best_miou"])]
    config_keys = {item.key for r in records if r.HasField("config") for item in r.config.update}
    assert "train.tracker" in config_keys
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]
    assert (run_dir / "files" / "best.pt").is_file() and (run_dir / "files" / "best_confusion_matrix.json").is_file()
