"""Deployment: the command lines fedae builds for Flower, and real SuperLink/SuperNode processes.

The process tests run everything on 127.0.0.1 through the `fedae` command, as a user would: a SuperLink
with TLS and SuperNode authentication, SuperNodes with their own keys, and `fedae run`. Every process is
started in its own session, logs to a file under tmp_path, and is killed with its whole process group
(and any detached descendants, such as Flower's SuperExec) when the test ends, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from fedae import deploy
from fedae.certs import CA_CERT, CA_KEY, make_certs, site_key_paths
from shared.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# -- command lines (no process started) ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("fl.example.org", ("fl.example.org", 8000)),
        ("10.0.0.1:9092", ("10.0.0.1", 9092)),
        ("[::1]:8000", ("::1", 8000)),
        ("[2001:db8::1]", ("2001:db8::1", 8000)),
        ("0.0.0.0:18000", ("0.0.0.0", 18000)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert deploy.split_address(address) == expected


@pytest.mark.parametrize("address", ["host:port", "host:0", "host:70000", ":8000", "[::1]8000"])
def test_split_address_refuses_bad_addresses(address: str) -> None:
    with pytest.raises(ConfigError, match=r"address|port"):
        deploy.split_address(address)


def test_local_address_dials_the_loopback_for_a_wildcard_bind() -> None:
    assert deploy.local_address("0.0.0.0", 8000) == "127.0.0.1:8000"
    assert deploy.local_address("::", 8000) == "[::1]:8000"
    assert deploy.local_address("10.0.0.1", 8000) == "10.0.0.1:8000"


@pytest.mark.parametrize(
    "values",
    [
        {"partition-id": 3, "site": "north", "data-file": "/data/site north/x.csv", "state-dir": "/s"},
        {"site": "o'hara", "data-file": "C:\\data\\x.csv", "target-epsilon": 2.5},
        {"tiny": 1e-05, "flag": True, "zero": 0, "tab": "a\tb"},
    ],
)
def test_key_values_round_trip_through_flowers_own_parser(values: dict) -> None:
    from flwr.common.config import parse_config_args

    assert parse_config_args([deploy.key_values(values)]) == values


@pytest.mark.parametrize(
    ("value", "needle"),
    [("both ' and \"", "cannot hold both"), ("line\nbreak", "control characters"), (math.inf, "finite")],
)
def test_values_flowers_parser_cannot_take_are_refused(value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        deploy.key_values({"key": value})  # type: ignore[dict-item]


def test_flwr_config_is_read_by_flowers_own_reader(tmp_path: Path) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    ca = tmp_path / "it's here" / "ca.crt"
    deploy.write_flwr_home(tmp_path / "home", "127.0.0.1:18000", ca, insecure=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLWR_HOME", str(tmp_path / "home"))
        connection = read_superlink_connection(None)  # the default connection: fedae's
    assert (connection.name, connection.address, connection.root_certificates) == (
        deploy.CONNECTION,
        "127.0.0.1:18000",
        str(ca),
    )


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.fixture
def certs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "certs"
    make_certs(folder, ["127.0.0.1"], ["s0", "s1"])
    return folder


def test_superlink_command(certs_dir: Path, tmp_path: Path) -> None:
    plan = deploy.plan_superlink(certs_dir, "0.0.0.0:18000", tmp_path / "state")
    command = plan.command
    assert Path(command[0]).name == "flower-superlink"
    assert _flag(command, "--host") == "0.0.0.0" and _flag(command, "--port") == "18000"
    assert _flag(command, "--database") == str(tmp_path / "state" / "superlink.db")
    assert _flag(command, "--ssl-ca-certfile") == str(certs_dir / CA_CERT)
    assert _flag(command, "--ssl-certfile") == str(certs_dir / "superlink.crt")
    assert _flag(command, "--ssl-keyfile") == str(certs_dir / "superlink.key")
    assert "--enable-supernode-auth" in command and "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    assert plan.site_keys == {s: site_key_paths(certs_dir, s)[1] for s in ("s0", "s1")}
    assert plan.local_address == "127.0.0.1:18000" and plan.flwr_home == tmp_path / "state" / "flwr"
    (warning,) = plan.warnings  # the test folder holds every key: the SuperLink host should not
    assert str(certs_dir / CA_KEY) in warning and "do not belong on the SuperLink host" in warning
    insecure = deploy.plan_superlink(None, "127.0.0.1:18000", tmp_path / "state", insecure=True).command
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


@pytest.mark.parametrize(
    ("answer", "alive", "expected"),
    [
        ({"success": True, "node-id": 77}, True, "registered as node 77"),
        (
            {"success": False, "error-message": "[code: 23] Public key already in use"},
            True,
            "already registered",
        ),
        ({"success": True, "node-id": 77}, False, "stopped before site 'north' was registered"),
    ],
)
def test_register_site_names_the_node_or_gives_up_once_the_superlink_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: dict, alive: bool, expected: str
) -> None:
    monkeypatch.setattr(deploy, "_flwr_json", lambda *_, **__: answer)
    public_key = tmp_path / "north.pub"
    if alive:
        assert deploy.register_site(public_key, "north", {}, alive=lambda: True) == expected
    else:
        with pytest.raises(RuntimeError, match=expected):
            deploy.register_site(public_key, "north", {}, alive=lambda: False)


def test_superlink_needs_its_certificate_files(certs_dir: Path, tmp_path: Path) -> None:
    (certs_dir / "superlink.crt").write_text("not a certificate\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{certs_dir / 'superlink.crt'} is not a PEM certificate")
    ):
        deploy.plan_superlink(certs_dir, "0.0.0.0", tmp_path / "state")
    (certs_dir / "superlink.key").unlink()
    with pytest.raises(ConfigError, match=r"superlink.key: file does not exist"):
        deploy.plan_superlink(certs_dir, "0.0.0.0", tmp_path / "state")
    with pytest.raises(ConfigError, match="--certs DIR is required"):
        deploy.plan_superlink(None, "0.0.0.0", tmp_path / "state")


def test_supernode_command_and_node_config(certs_dir: Path, tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    data = tmp_path / "north site.csv"
    data.write_text("a,b\n1,2\n")
    key = site_key_paths(certs_dir, "s0")[0]
    plan = deploy.plan_supernode(
        "127.0.0.1:18000",
        data,
        ca=certs_dir / CA_CERT,
        key=key,
        partition_id=4,
        site="north",
        state_dir=tmp_path / "state",
        target_epsilon=2.0,
    )
    command = plan.command
    assert Path(command[0]).name == "flower-supernode"
    assert _flag(command, "--superlink") == "127.0.0.1:18000"
    assert _flag(command, "--root-certificates") == str(certs_dir / CA_CERT)
    assert _flag(command, "--auth-supernode-private-key") == str(key)
    assert _flag(command, "--host") == "127.0.0.1" and int(_flag(command, "--port")) == plan.port > 0
    assert parse_config_args([_flag(command, "--node-config")]) == {
        "partition-id": 4,
        "site": "north",
        "data-file": str(data),
        "state-dir": str(tmp_path / "state"),
        "target-epsilon": 2.0,
    }
    assert plan.flwr_home == tmp_path / "state" / "flwr"


def test_supernode_defaults_site_and_state_from_the_data_file(certs_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "plant-7.csv"
    data.write_text("a\n1\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        plan = deploy.plan_supernode(
            "h:1", data, ca=certs_dir / CA_CERT, key=site_key_paths(certs_dir, "s0")[0], partition_id=0
        )
    assert plan.node_config["site"] == "plant-7"
    assert plan.node_config["state-dir"] == str(tmp_path / "fedae-state" / "plant-7")
    assert "target-epsilon" not in plan.node_config


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no-data", "--data {tmp}/missing.csv: file does not exist"),
        ("no-ca", "--ca {tmp}/missing.crt: file does not exist"),
        ("no-key", "--ca FILE and --key FILE are required"),
        ("bad-id", "--id must be a non-negative integer, got -1"),
        ("bad-epsilon", "--target-epsilon must be a finite number >= 0, got -1.0"),
        ("bad-port", "--port must be from 1 to 65535, got 70000"),
    ],
)
def test_supernode_refuses_missing_files_and_bad_values(
    certs_dir: Path, tmp_path: Path, case: str, needle: str
) -> None:
    data = tmp_path / "site.csv"
    data.write_text("a\n1\n")
    kwargs = dict(ca=certs_dir / CA_CERT, key=site_key_paths(certs_dir, "s0")[0], partition_id=0)
    kwargs |= {
        "no-data": {},
        "no-ca": {"ca": tmp_path / "missing.crt"},
        "no-key": {"key": None},
        "bad-id": {"partition_id": -1},
        "bad-epsilon": {"target_epsilon": -1.0},
        "bad-port": {"port": 70000},
    }[case]
    if case == "no-data":
        data = tmp_path / "missing.csv"
    with pytest.raises(ConfigError) as error:
        deploy.plan_supernode("127.0.0.1:18000", data, **kwargs)  # type: ignore[arg-type]
    assert needle.format(tmp=tmp_path) in str(error.value)


def _plan_site(certs_dir: Path, tmp_path: Path, **kwargs: object) -> deploy.SuperNodePlan:
    data = tmp_path / "north.csv"
    data.write_text("a\n1\n")
    arguments: dict = dict(ca=certs_dir / CA_CERT, key=site_key_paths(certs_dir, "s0")[0], partition_id=0)
    arguments |= {"site": "north", "state_dir": tmp_path / "state", **kwargs}
    return deploy.plan_supernode("127.0.0.1:18000", data, **arguments)


def test_supernode_refuses_a_key_flower_cannot_load(certs_dir: Path, tmp_path: Path) -> None:
    public = site_key_paths(certs_dir, "s0")[1]  # the .pub given instead of the private key
    with pytest.raises(ConfigError, match=re.escape(f"{public} is not an unencrypted OpenSSH private key")):
        _plan_site(certs_dir, tmp_path, key=public)


def test_supernode_state_dir_stays_with_its_site_and_id(
    certs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deploy, "run_forwarding", lambda *_, **__: deploy.ChildExit(0))
    assert deploy.run_supernode(_plan_site(certs_dir, tmp_path)) == 0  # first start: records the site
    record = tmp_path / "state" / deploy.SITE_RECORD
    assert json.loads(record.read_text()) == {"site": "north", "id": 0}
    assert deploy.run_supernode(_plan_site(certs_dir, tmp_path)) == 0  # same site and id: fine
    with pytest.raises(ConfigError) as error:
        _plan_site(certs_dir, tmp_path, partition_id=3)
    assert "belongs to --name north --id 0" in str(error.value) and "not --name north --id 3" in str(
        error.value
    )
    with pytest.raises(ConfigError, match=r"belongs to --name north --id 0.*not --name south --id 0"):
        _plan_site(certs_dir, tmp_path, site="south")
    record.write_text("{broken")
    with pytest.raises(ConfigError, match=re.escape(f"{record} is not a site record")):
        _plan_site(certs_dir, tmp_path)


def test_supernode_state_dir_from_before_the_record_is_judged_by_its_ledger(
    certs_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "state" / "client-1").mkdir(parents=True)  # a ledger kept under --id 1
    with pytest.raises(
        ConfigError, match=re.escape("holds the privacy ledger(s) ['client-1'], not client-0")
    ):
        _plan_site(certs_dir, tmp_path, partition_id=0)
    assert _plan_site(certs_dir, tmp_path, partition_id=1).node_config["partition-id"] == 1


def test_supernode_cli_exits_2_naming_the_missing_file(certs_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fedae", "supernode", "--superlink", "127.0.0.1:1", "--id", "0"]
    command += ["--ca", str(certs_dir / CA_CERT), "--data", str(tmp_path / "nowhere.csv")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fedae: error: --data {tmp_path / 'nowhere.csv'}: file does not exist"


def test_run_overrides_are_validated_and_typed(tmp_path: Path) -> None:
    overrides = deploy.run_overrides(
        "scenario=fleet num-clients=3 noise-multiplier=1.1", rounds=2, out_dir=tmp_path / "r"
    )
    assert overrides == {
        "scenario": "fleet",
        "num-clients": 3,
        "noise-multiplier": 1.1,
        "num-server-rounds": 2,
        "out-dir": str(tmp_path / "r"),
    }
    command = deploy.flwr_run_command(deploy.app_dir(), overrides)
    assert command[1:4] == ["run", str(ROOT), deploy.CONNECTION]
    from flwr.common.config import parse_config_args

    assert parse_config_args([_flag(command, "--run-config")]) == overrides
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\) \['epochs'\]"):
        deploy.run_overrides("epochs=3")
    with pytest.raises(ConfigError, match="noise-multiplier must be a number"):
        deploy.run_overrides("noise-multiplier=lots")
    with pytest.raises(ConfigError, match=r"--test .*missing\.csv: file does not exist"):
        deploy.run_overrides("", test_file="missing.csv")  # relative: must be here (SuperLink host)
    with pytest.raises(ConfigError, match="do not combine it with scenario='fleet'"):
        deploy.run_overrides("scenario=fleet", test_file=tmp_path)


def test_run_with_a_test_file_is_the_files_scenario(tmp_path: Path) -> None:
    test = tmp_path / "test.csv"
    test.write_text("a,label\n1,0\n")
    overrides = deploy.run_overrides("", rounds=2, test_file=test, out_dir=tmp_path / "r")
    assert overrides["scenario"] == "files" and overrides["test-file"] == str(test)


def test_run_out_dir_defaults_to_an_absolute_timestamped_folder(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        out = deploy.run_overrides(now=0)["out-dir"]
    assert Path(str(out)).is_absolute() and Path(str(out)).parent == tmp_path / "runs"


def test_run_config_out_dir_is_honoured_and_a_different_out_refused(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert deploy.run_overrides("out-dir='runs/mine'")["out-dir"] == str(tmp_path / "runs" / "mine")
        same = deploy.run_overrides("out-dir='runs/mine'", out_dir=tmp_path / "runs" / "mine")
        assert same["out-dir"] == str(tmp_path / "runs" / "mine")
        with pytest.raises(ConfigError, match=r"--out .*other and run-config out-dir='runs/mine' differ"):
            deploy.run_overrides("out-dir='runs/mine'", out_dir="other")


def _fake_flwr(status: str) -> Callable[..., dict]:
    """`flwr run` and `flwr ls` answers without a SuperLink: the run is accepted, then has ``status``."""

    def answer(command: list[str], *_: object, **__: object) -> dict:
        if command[1] == "run":
            return {"success": True, "run-id": 42}
        return {"success": True, "runs": [{"status": status, "status-details": "ServerApp failed"}]}

    return answer


def test_submitting_a_run_says_where_its_outputs_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(deploy, "_flwr_json", _fake_flwr("finished:completed"))
    monkeypatch.setattr(deploy.subprocess, "run", lambda *_, **__: None)  # `flwr log --stream`
    overrides = deploy.run_overrides("", out_dir=tmp_path / "r1")
    with caplog.at_level(logging.INFO, logger="fedae.deploy"):
        outcome = deploy.submit_run("127.0.0.1:1", overrides, insecure=True)
    assert outcome.succeeded and outcome.out_dir == tmp_path / "r1"
    assert f"run 42 submitted to 127.0.0.1:1; its outputs go to {tmp_path / 'r1'} on the SuperLink host" in (
        caplog.text
    )


def test_a_failed_run_says_where_to_resume_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from fedae import cli

    fedae_logger = logging.getLogger("fedae")  # cli.main sets up logging: undone after the test
    monkeypatch.setattr(fedae_logger, "handlers", list(fedae_logger.handlers))
    monkeypatch.setattr(fedae_logger, "propagate", fedae_logger.propagate)
    monkeypatch.setattr(fedae_logger, "level", fedae_logger.level)
    monkeypatch.setattr(deploy, "_flwr_json", _fake_flwr("finished:failed"))
    monkeypatch.setattr(deploy.subprocess, "run", lambda *_, **__: None)
    out = tmp_path / "r1"
    code = cli.main(["run", "--superlink", "127.0.0.1:1", "--insecure", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "Run 42 finished:failed: ServerApp failed" in printed
    assert (
        f"its checkpoint (if any round completed) is in {out}; run again with --out {out} to resume"
        in printed
    )


def test_app_bundle_holds_the_apps_code_and_nothing_large() -> None:
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(deploy.app_dir())
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"server/app.py", "client/app.py", "shared/config.py", "fedae/deploy.py", "pyproject.toml"} <= set(
        names
    )
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/", ".venv/", "runs/"))]
    assert len(fab) < 1_000_000


def test_exit_code_reports_signals_as_a_shell_does() -> None:
    assert deploy.exit_code(0) == 0 and deploy.exit_code(1) == 1
    assert deploy.exit_code(-signal.SIGTERM) == 128 + signal.SIGTERM


@pytest.mark.parametrize(
    ("code", "stop_signal", "expected"),
    [
        (0, None, 0),
        (128 + signal.SIGTERM, signal.SIGTERM, 0),  # flower-superlink re-raises SIGTERM after shutting down
        (0, signal.SIGINT, 0),  # Flower's graceful exit
        (128 + signal.SIGINT, signal.SIGINT, 0),
        (1, None, 1),
        (7, signal.SIGTERM, 1),  # asked to stop, but it ended with an error
        (128 + signal.SIGTERM, None, 1),  # stopped by someone else, not through fedae
        (128 + signal.SIGKILL, signal.SIGTERM, 1),
    ],
)
def test_a_childs_end_maps_to_the_cli_contract(
    code: int, stop_signal: int | None, expected: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fedae.deploy"):
        assert deploy.cli_exit_code("flower-superlink", deploy.ChildExit(code, stop_signal)) == expected
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if expected == 1:
        (error,) = errors
        assert error.startswith(f"flower-superlink exited with code {code}")
        assert error.endswith("; its log above says why") and len(error.splitlines()) == 1
        assert ("killed by SIGKILL" in error) is (code == 128 + signal.SIGKILL)
    else:
        assert errors == []


def test_sigterm_is_forwarded_to_the_child_and_its_code_returned(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def send_sigterm_when_ready() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to fedae (this process), which must pass it on

    # Whatever handler this process had (another test's Ray or Flower may have set one) comes back.
    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=send_sigterm_when_ready, daemon=True).start()
    started = time.monotonic()
    result = deploy.run_forwarding([sys.executable, "-c", child], dict(os.environ))
    assert result == deploy.ChildExit(7, signal.SIGTERM)
    assert time.monotonic() - started < 30
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_a_sigterm_while_the_child_starts_still_reaches_it(tmp_path: Path) -> None:
    # The signal arrives after fedae's handlers are installed but before the child exists: the child must
    # still get it, and fedae must not die leaving it running. In a subprocess: a regression kills it.
    script = (
        "import os, signal, subprocess, sys, time\n"
        "from fedae import deploy\n"
        "real = subprocess.Popen\n"
        "def late_popen(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*args, **kwargs)\n"
        "deploy.subprocess.Popen = late_popen\n"
        "started = time.monotonic()\n"
        "child = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
        "result = deploy.run_forwarding(child, dict(os.environ))\n"
        "print(result.code, result.stop_signal, deploy.cli_exit_code('child', result), "
        "round(time.monotonic() - started))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    code, stop_signal, cli_code, seconds = map(int, done.stdout.split())
    assert (code, stop_signal, cli_code) == (128 + signal.SIGTERM, signal.SIGTERM, 0)
    assert seconds < 30  # the child was stopped, not waited out


# -- real processes ---------------------------------------------------------------------------------------
class Processes:
    """Processes started for one test, each in its own session with its log in a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: dict[str, subprocess.Popen] = {}

    def fedae(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``fedae ARGS`` as ``name``; ``env``: variables added to this process's environment."""
        log = (self.folder / f"{name}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "fedae", *args],
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        log.close()
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, lines: int = 25) -> str:
        parts = []
        for name, process in self.started.items():
            tail = "\n".join(self.log(name).splitlines()[-lines:])
            parts.append(f"--- {name} (pid {process.pid}, exit {process.poll()}) ---\n{tail}")
        return "\n".join(parts)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float, every: float = 0.5) -> float:
        """Seconds until ``check()`` holds; fails the test with every process's log tail if it never does."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if check():
                return time.monotonic() - started
            time.sleep(every)
        pytest.fail(f"{what}: not within {timeout:.0f} s\n{self.tails()}")

    def kill(self, name: str) -> None:
        """SIGKILL a process's whole group and every descendant, detached ones (new sessions) included."""
        process = self.started[name]
        try:
            descendants = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        process.wait(timeout=30)

    def kill_all(self) -> None:
        for name in list(self.started):
            self.kill(name)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


def _flwr_nodes(state: Path) -> list[dict]:
    """``flwr supernode list`` through the fedae-owned FLWR_HOME of the SuperLink (state/flwr)."""
    command = [deploy.executable("flwr"), "supernode", "list", deploy.CONNECTION, "--format", "json"]
    env = deploy.child_env(state / "flwr")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    try:
        answer = json.loads(result.stdout[result.stdout.find("{") :])
    except ValueError:
        return []
    return list(answer.get("nodes", [])) if answer.get("success") else []


def _online(state: Path) -> list[str]:
    return [n["node-id"] for n in _flwr_nodes(state) if n["status"] == "online"]


class Federation:
    """A SuperLink with TLS and SuperNode authentication, and SuperNodes, all through `fedae`."""

    def __init__(self, processes: Processes, folder: Path, sites: int) -> None:
        self.processes, self.folder = processes, folder
        self.sites = [f"site{i}" for i in range(sites)]
        self.certs = folder / "certs"
        self.state = folder / "superlink-state"
        self.port = deploy.free_port()
        self.address = f"127.0.0.1:{self.port}"
        make_certs(self.certs, ["127.0.0.1"], self.sites)

    def start_superlink(self, env: dict[str, str] | None = None) -> float:
        self.processes.fedae(
            "superlink", "superlink", "--certs", str(self.certs), "--address", self.address,
            "--state", str(self.state), env=env,
        )  # fmt: skip
        return self.processes.wait_for(
            "SuperLink up with every site key registered",
            lambda: "SuperLink ready on" in self.processes.log("superlink"),
            timeout=90,
        )

    def start_supernode(
        self,
        index: int,
        *,
        name: str | None = None,
        ca: Path | None = None,
        key: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        """Start site ``index`` (its key and CA from the federation unless given); returns its log name."""
        site = f"site{index}"
        name = name or f"supernode-{site}"
        data = self.folder / f"{site}.csv"
        if not data.exists():
            _site_file(data, seed=index)
        self.processes.fedae(
            name, "supernode", "--superlink", self.address, "--ca", str(ca or self.certs / CA_CERT),
            "--key", str(key or site_key_paths(self.certs, site)[0]), "--data", str(data),
            "--name", site, "--id", str(index), "--state-dir", str(self.folder / f"state-{name}"), env=env,
        )  # fmt: skip
        return name

    def wait_online(self, count: int, timeout: float = 120) -> float:
        return self.processes.wait_for(
            f"{count} SuperNode(s) online", lambda: len(_online(self.state)) >= count, timeout, every=1.0
        )

    def run(self, name: str, *args: str) -> subprocess.Popen:
        return self.processes.fedae(
            name, "run", "--superlink", self.address, "--ca", str(self.certs / CA_CERT), *args
        )


def _site_file(path: Path, seed: int, rows: int = 300) -> None:
    """A small numeric site file (8 sensor columns): what a site's --data looks like."""
    rng = np.random.default_rng(seed)
    pd.DataFrame(rng.normal(size=(rows, 8)), columns=[f"s{i}" for i in range(8)]).to_csv(path, index=False)


def _test_file(path: Path, rows: int = 200) -> None:
    rng = np.random.default_rng(99)
    frame = pd.DataFrame(rng.normal(size=(rows, 8)), columns=[f"s{i}" for i in range(8)])
    frame.loc[rows // 2 :, "s0"] += 6.0  # anomalies: one sensor far off
    frame["label"] = [0] * (rows // 2) + [1] * (rows - rows // 2)
    frame.to_csv(path, index=False)


# Each site trains on its own CSV file (--data), the server holds only the labelled test file (--test,
# which makes the run scenario "files"). No client-side evaluation round trip and no robustness evaluation
# (tests/test_evasion.py), to keep the tests short; 255-row sites pay about 2.5 epsilon a round.
FAST = "batch-size=64 fraction-evaluate=0.0 target-epsilon=20 robustness-rows=0"


def _data_args(folder: Path, sites: int, min_clients: int) -> list[str]:
    _test_file(folder / "test.csv")
    config = f"{FAST} num-clients={sites} min-available-clients={min_clients}"
    return ["--test", str(folder / "test.csv"), "--run-config", config]


@pytest.mark.slow
def test_three_authenticated_sites_train_two_dp_rounds(processes: Processes, tmp_path: Path) -> None:
    started = time.monotonic()
    federation = Federation(processes, tmp_path, sites=3)
    federation.start_superlink()
    for index in range(3):
        federation.start_supernode(index)
    federation.wait_online(3)
    ready = time.monotonic() - started
    out = tmp_path / "run"
    run = federation.run("run", "--rounds", "2", "--out", str(out), *_data_args(tmp_path, 3, min_clients=3))
    processes.wait_for("fedae run to finish", lambda: run.poll() is not None, timeout=600, every=1.0)
    assert run.returncode == 0, processes.tails()
    assert f"summary: {out / 'summary.json'}" in processes.log("run")

    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [sorted(r["clients"]) for r in summary["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    per_client = summary["privacy"]["sample_level"]["per_client"]
    assert sorted(per_client) == ["0", "1", "2"]
    assert all(math.isfinite(eps) and eps > 0 for eps in per_client.values()), per_client
    assert (out / "bundle" / "model.keras").exists() and (out / "bundle" / "metadata.json").exists()
    # Each site's ledger is in its own state folder (node config state-dir), not in the run's folder.
    assert (tmp_path / "state-supernode-site0" / "client-0" / "privacy-ledger.sqlite").exists()
    print(f"\nfederation ready in {ready:.1f} s; whole test {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_unregistered_key_and_foreign_ca_cannot_join(processes: Processes, tmp_path: Path) -> None:
    federation = Federation(processes, tmp_path, sites=1)
    federation.start_superlink()
    # Control: the registered site joins, so "not in the node list" below means refused, not slow.
    federation.start_supernode(0)
    federation.wait_online(1)
    (node_id,) = _online(federation.state)
    assert f"SuperNode ID: {node_id}" in processes.log("supernode-site0")

    stranger = make_certs(tmp_path / "stranger", ["127.0.0.1"], ["site1"])  # its own CA, key not registered
    rogue = federation.start_supernode(1, key=site_key_paths(stranger.out_dir, "site1")[0])
    # A registered key, but the SuperLink's certificate checked against another CA.
    foreign = federation.start_supernode(0, name="supernode-foreign-ca", ca=stranger.out_dir / CA_CERT)

    for name in (rogue, foreign):
        process = processes.started[name]
        seconds = processes.wait_for(f"{name} to give up", lambda p=process: p.poll() is not None, timeout=90)
        assert process.returncode == 1, processes.tails()
        print(f"\n{name} exited with {process.returncode} after {seconds:.1f} s")
    assert "Failed to activate SuperNode" in processes.log(rogue)
    assert "No SuperNode found with the given public key" in processes.log("superlink")
    assert "CERTIFICATE_VERIFY_FAILED" in processes.log(foreign)
    assert _online(federation.state) == [node_id]


@pytest.mark.slow
def test_sigterm_stops_the_superlink_and_a_restart_keeps_its_registrations(
    processes: Processes, tmp_path: Path
) -> None:
    federation = Federation(processes, tmp_path, sites=2)
    federation.start_superlink()
    fedae_superlink = processes.started["superlink"]
    flower = psutil.Process(fedae_superlink.pid).children()
    assert [Path(p.cmdline()[1]).name for p in flower] == ["flower-superlink"]
    os.kill(fedae_superlink.pid, signal.SIGTERM)  # to fedae only: it must pass it on
    processes.wait_for("fedae superlink to stop", lambda: fedae_superlink.poll() is not None, timeout=60)
    # flower-superlink shuts down cleanly, then (uvicorn) re-raises SIGTERM: 143. A stop fedae passed on
    # and the SuperLink honoured is a success for the CLI contract.
    assert fedae_superlink.returncode == 0, processes.tails()
    assert "flower-superlink stopped on SIGTERM" in processes.log("superlink")
    assert "Application shutdown complete" in processes.log("superlink")
    assert not psutil.pid_exists(flower[0].pid) or flower[0].status() == psutil.STATUS_ZOMBIE

    processes.started["superlink-first"] = processes.started.pop("superlink")
    (tmp_path / "superlink.log").rename(tmp_path / "superlink-first.log")
    federation.start_superlink()  # same state folder: the database remembers both keys
    log = processes.log("superlink")
    assert "site site0: already registered" in log and "site site1: already registered" in log
    assert len(_flwr_nodes(federation.state)) == 2


@pytest.mark.slow
def test_a_failed_run_makes_fedae_run_exit_1(processes: Processes, tmp_path: Path) -> None:
    # `flwr run --stream` exits 0 whatever happens to the run: fedae asks Flower for the run's status.
    federation = Federation(processes, tmp_path, sites=1)
    federation.start_superlink()
    missing = tmp_path / "no-such-folder"  # valid settings, but the ServerApp finds no MNIST file there
    run = federation.run("run", "--rounds", "1", "--run-config", f"scenario=mnist data-dir={missing}")
    processes.wait_for("fedae run to finish", lambda: run.poll() is not None, timeout=300, every=1.0)
    assert run.returncode == 1, processes.tails()
    assert "finished:failed" in processes.log("run")


@pytest.mark.slow
def test_a_site_killed_in_round_one_leaves_the_run_to_the_other_two(
    processes: Processes, tmp_path: Path
) -> None:
    federation = Federation(processes, tmp_path, sites=3)
    federation.start_superlink()
    victims = [federation.start_supernode(index) for index in range(3)]
    federation.wait_online(3)
    out = tmp_path / "run"
    run = federation.run("run", "--rounds", "2", "--out", str(out), *_data_args(tmp_path, 3, min_clients=2))
    processes.wait_for(
        "round 1 to send its training messages",
        lambda: "configure_train: Sampled 3 nodes" in processes.log("run"),
        timeout=300,
    )
    processes.kill(victims[2])  # SIGKILL: no goodbye to the SuperLink, only missed heartbeats
    killed = time.monotonic()
    noticed = processes.wait_for(
        "the SuperLink to give up on the killed site",
        lambda: "Received 2 results and 1 failures" in processes.log("run"),
        timeout=300,
    )
    processes.wait_for("fedae run to finish", lambda: run.poll() is not None, timeout=600, every=1.0)
    assert run.returncode == 0, processes.tails()
    summary = json.loads((out / "summary.json").read_text())
    assert [sorted(r["clients"]) for r in summary["rounds"]] == [[0, 1], [0, 1]]
    # The server logged who failed: the node the SuperLink gave up on, with Flower's reason.
    (failure,) = summary["rounds"][0]["failed"]
    assert "Node Unavailable" in failure["reason"] and failure["node"] not in (0, None)
    assert "failed, error" in processes.log("run")
    after = time.monotonic() - killed
    print(f"\nkilled site noticed after {noticed:.1f} s; run finished {after:.1f} s after the kill")
    # The dead site rejoins by starting again: same key, so the same node as before.
    processes.started[f"{victims[2]}-dead"] = processes.started.pop(victims[2])
    (tmp_path / f"{victims[2]}.log").rename(tmp_path / f"{victims[2]}-dead.log")
    federation.start_supernode(2)
    federation.wait_online(3)
    assert failure["node"] in [int(n) for n in _online(federation.state)]


def _ledger_rounds(state_dir: Path, client: int) -> list[tuple[str, int]]:
    from shared.ledger import PrivacyLedger, ledger_path

    with PrivacyLedger(ledger_path(state_dir, client), create=False) as ledger:
        return [(e.run_id, e.round) for e in ledger.events()]


@pytest.mark.slow
def test_a_crashed_server_resumes_after_a_superlink_restart_and_a_bad_update_is_rejected(
    processes: Processes, tmp_path: Path
) -> None:
    from shared.checkpoint import CHECKPOINT_FILE, load_checkpoint

    federation = Federation(processes, tmp_path, sites=3)
    # The ServerApp (a child of the SuperLink) dies right after checkpointing round 1; site 2 sends NaN.
    federation.start_superlink(env={"FEDAE_FAULT_INJECT": "server-exit@1"})
    for index in range(3):
        federation.start_supernode(index, env={"FEDAE_FAULT_INJECT": "nan-weights"} if index == 2 else None)
    federation.wait_online(3)
    out = tmp_path / "run"
    args = ["--rounds", "2", "--out", str(out), *_data_args(tmp_path, 3, min_clients=2)]
    first = federation.run("run-first", *args)
    processes.wait_for("the first run to fail", lambda: first.poll() is not None, timeout=600, every=1.0)
    assert first.returncode == 1 and "finished:failed" in processes.log("run-first"), processes.tails()
    checkpoint = load_checkpoint(out / CHECKPOINT_FILE)
    assert checkpoint is not None and checkpoint.completed_round == 1

    # The SuperLink host restarts (now without the fault); the sites reconnect by themselves.
    processes.kill("superlink")
    processes.started["superlink-first"] = processes.started.pop("superlink")
    (tmp_path / "superlink.log").rename(tmp_path / "superlink-first.log")
    federation.start_superlink()
    federation.wait_online(3, timeout=180)
    second = federation.run("run-second", *args)
    processes.wait_for("the resumed run to finish", lambda: second.poll() is not None, timeout=600, every=1.0)
    assert second.returncode == 0, processes.tails()
    assert "resuming run" in processes.log("run-second")

    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for row in summary["rounds"]:
        assert row["clients"] == [0, 1] and row["trained"] == [0, 1, 2]
        assert "non-finite" in row["rejected"]["2"]
    # Each site paid once per round, under the run's key, though Flower ran the app twice.
    for index in range(3):
        state = tmp_path / f"state-supernode-site{index}"
        assert _ledger_rounds(state, index) == [(checkpoint.run_key, 1), (checkpoint.run_key, 2)]
