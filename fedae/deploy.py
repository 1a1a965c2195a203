"""Deployment: ``fedae superlink``, ``fedae supernode`` and ``fedae run`` as thin wrappers over Flower.

Each command builds the command line of one of Flower's own programs (``flower-superlink``,
``flower-supernode``, ``flwr``) with fedae's settings and runs it; plain Flower commands keep working on
the same files. The command lines are built by pure functions (tested without starting anything); the
rest starts the process, forwards SIGINT/SIGTERM to it and maps its end to the CLI's exit codes: 0 when it
succeeded or honoured a stop fedae passed on, 1 otherwise (with one line naming its code).

Flower 1.42 facts this relies on (read from its source, checked on this machine):

- ``flower-superlink`` serves its Fleet, Control and Runtime APIs on one HTTPS port (``--host``,
  ``--port``, default 127.0.0.1:8000). The Control API (``flwr run``, ``flwr supernode register``) has
  no authentication outside Flower's enterprise edition: whoever reaches the port and trusts the CA can
  submit a run, i.e. run code on the SuperLink host and on every site. Let only the sites and operators
  reach it (firewall); ``fedae superlink`` says so when it starts.
- ``flwr`` reads its SuperLink connections from ``$FLWR_HOME/config.toml`` (default ``~/.flwr``). fedae
  never edits the user's: it points ``FLWR_HOME`` at a folder of its own.
- SuperNodes and SuperLinks also install each run's app bundle (FAB) under ``$FLWR_HOME/apps``;
  ``flower-supernode`` never installs an app's dependencies unless ``--allow-runtime-dependency-installation``
  is given (it has no ``--disable-...`` flag), ``flower-superlink`` needs
  ``--disable-runtime-dependency-installation``.
- ``flwr run --stream`` exits 0 whether the run succeeded or failed; ``flwr ls --run-id N`` tells which
  (``finished:completed``, ``finished:failed``, ``finished:stopped``). ``flwr ... --format json``
  reports an error as ``{"success": false, "error-message": ...}`` with exit code 0.
- ``flwr pull`` needs an artifact provider (enterprise edition): a run's outputs stay where the
  ServerApp wrote them, on the SuperLink host.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fedae import certs
from shared.config import ConfigError

logger = logging.getLogger("fedae.deploy")

DEFAULT_PORT = 8000  # Flower 1.42's SuperLink port
CONNECTION = "fedae"  # the SuperLink connection's name in fedae's own flwr config.toml
PORT_WAIT_S = 60.0  # how long `fedae superlink` waits for the SuperLink to listen before registering keys
STOP_GRACE_S = 10.0  # how long a child gets to exit after SIGTERM before SIGKILL
SITE_RECORD = "site.json"  # in a SuperNode's state-dir: the site and id its ledger is filed under
ConfigValue = str | int | float | bool


# -- addresses -------------------------------------------------------------------------------------
def split_address(address: str, default_port: int | None = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` (IPv6 in brackets, ``[::1]:8000``) as ``(host, port)``."""
    text = address.strip()
    host, port_text = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"address must be HOST[:PORT], got {address!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"address needs a host, got {address!r}")
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"address must be HOST:PORT, got {address!r}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"port must be a number from 1 to 65535, got {port_text!r} in {address!r}")
    return host, int(port_text)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_address(host: str, port: int) -> str:
    """Where a process on the SuperLink host dials it: the loopback when it listens on every interface.

    Flower's own SuperExec does the same (``resolve_bind_address``); the certificate names the loopback.
    """
    dial = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return join_address(dial, port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it); another process could take it before use."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- values in Flower's key=value syntax -----------------------------------------------------------
def toml_value(value: ConfigValue) -> str:
    """One value as ``flwr``'s ``--node-config`` / ``--run-config`` parser reads it.

    Flower matches ``key=('...'|"..."|non-space)`` and parses each pair as TOML: strings must be quoted,
    a single-quoted (literal) string takes backslashes as they are, and neither quote may appear inside
    a string quoted with it.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"config values must be finite numbers, got {value}")
        return repr(value)
    text = str(value)
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text):
        raise ValueError(f"config strings cannot hold control characters (newlines), got {text!r}")
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return '"' + text.replace("\\", "\\\\") + '"'
    raise ValueError(f"a config string cannot hold both ' and \" for Flower's parser, got {text!r}")


def key_values(values: Mapping[str, ConfigValue]) -> str:
    """``key=value ...`` for ``--node-config`` / ``--run-config``."""
    for key in values:
        if not key or any(c.isspace() or c in "='\"" for c in key):
            raise ValueError(f"config keys cannot hold spaces, quotes or '=', got {key!r}")
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def flwr_config_toml(address: str, root_certificates: Path | None, insecure: bool) -> str:
    """``$FLWR_HOME/config.toml`` naming one SuperLink connection, the default for ``flwr`` commands."""
    lines = ["[superlink]", f"default = {toml_value(CONNECTION)}", "", f"[superlink.{CONNECTION}]"]
    lines.append(f"address = {toml_value(address)}")
    if insecure:
        lines.append("insecure = true")
    elif root_certificates is not None:
        lines.append(f"root-certificates = {toml_value(str(root_certificates))}")
    return "\n".join(lines) + "\n"


# -- executables and environment -------------------------------------------------------------------
def executable(name: str) -> str:
    """Flower's program ``name`` from this Python's environment (its bin folder), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found beside {sys.executable} or on PATH: is flwr installed here?")
    return found


def child_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process started by fedae.

    ``FLWR_HOME`` is fedae's own folder; this environment's bin folder comes first on PATH because
    Flower starts ``flower-superexec`` and the app processes by name. Flower's update check and
    telemetry phone home: off by default (sites are often offline), unless the caller set them.
    """
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def write_flwr_home(flwr_home: Path, address: str, root_certificates: Path | None, insecure: bool) -> Path:
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = flwr_home / "config.toml"
    config.write_text(flwr_config_toml(address, root_certificates, insecure))
    return config


# -- SuperLink -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuperLinkPlan:
    """Everything ``fedae superlink`` starts and registers, decided before anything runs."""

    command: list[str]
    host: str
    port: int
    state_dir: Path
    flwr_home: Path
    certs_dir: Path | None
    site_keys: dict[str, Path]  # site name -> public key file to register
    warnings: tuple[str, ...] = ()  # about the certificates folder, logged when the SuperLink starts

    @property
    def local_address(self) -> str:
        return local_address(self.host, self.port)


def plan_superlink(
    certs_dir: str | Path | None, address: str, state_dir: str | Path, insecure: bool = False
) -> SuperLinkPlan:
    """The ``flower-superlink`` command line: TLS from ``certs_dir``, SuperNode authentication, state on
    disk, no run-time dependency installation. ``insecure``: plaintext, no node authentication."""
    host, port = split_address(address)
    state = Path(state_dir).expanduser().resolve()
    command = [executable("flower-superlink"), "--host", host, "--port", str(port)]
    command += ["--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if insecure:
        return SuperLinkPlan([*command, "--insecure"], host, port, state, state / "flwr", None, {})
    if certs_dir is None:
        raise ConfigError("--certs DIR is required (made by `fedae certs`), or --insecure")
    folder = Path(certs_dir).expanduser().resolve()
    files = [folder / certs.CA_CERT, folder / certs.SERVER_CERT, folder / certs.SERVER_KEY]
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path}: file does not exist (make it with `fedae certs --out {folder}`)")
    warnings = tuple(certs.superlink_file_warnings(folder))  # ConfigError on files that cannot work
    command += ["--ssl-ca-certfile", str(files[0]), "--ssl-certfile", str(files[1])]
    command += ["--ssl-keyfile", str(files[2]), "--enable-supernode-auth"]
    keys = {site: certs.site_key_paths(folder, site)[1] for site in certs.sites_in(folder)}
    return SuperLinkPlan(command, host, port, state, state / "flwr", folder, keys, warnings)


def register_command(public_key: Path, site: str) -> list[str]:
    return [executable("flwr"), "supernode", "register", str(public_key), CONNECTION, "--name", site]


def _flwr_json(command: Sequence[str], env: Mapping[str, str], timeout: float = 120.0) -> dict[str, Any]:
    """Run a ``flwr`` command with ``--format json``; its JSON answer (errors included, see module doc)."""
    result = subprocess.run(
        [*command, "--format", "json"], env=dict(env), capture_output=True, text=True, timeout=timeout
    )
    try:
        answer = json.loads(result.stdout[result.stdout.find("{") :])
    except ValueError:
        answer = {"success": False, "error-message": (result.stdout + result.stderr).strip()[-2000:]}
    if result.returncode != 0 and answer.get("success"):
        answer = {"success": False, "error-message": result.stderr.strip()[-2000:]}
    return answer


def register_site(
    public_key: Path,
    site: str,
    env: Mapping[str, str],
    attempts: int = 5,
    alive: Callable[[], bool] = lambda: True,
) -> str:
    """Register one site's key; returns ``"registered as node N"`` or ``"already registered"`` (not an
    error: restarting the SuperLink re-registers every key in the folder). Raises ``RuntimeError``, also
    as soon as ``alive()`` (the SuperLink is running) turns false."""
    message = ""
    for attempt in range(attempts):
        if not alive():
            raise RuntimeError(f"the SuperLink stopped before site {site!r} was registered")
        answer = _flwr_json(register_command(public_key, site), env)
        if answer.get("success"):
            return f"registered as node {answer.get('node-id', '?')}"  # the NODE_ID to unregister it by
        message = str(answer.get("error-message", answer))
        if "already in use" in message:
            return "already registered"
        # Just after start-up the API may not answer yet: retry a few times before giving up.
        logger.debug("registering %s failed (attempt %d): %s", site, attempt + 1, message)
        time.sleep(1.0)
    raise RuntimeError(f"could not register site {site!r} ({public_key}): {message}")


def wait_for_port(address: str, process: subprocess.Popen, timeout: float = PORT_WAIT_S) -> None:
    """Return once something accepts TCP connections at ``address``; raise if ``process`` ends first."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {process.returncode} before it listened")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not listen on {address} within {timeout:.0f} s")


def run_superlink(plan: SuperLinkPlan) -> int:
    """Start the SuperLink, register every site key in the certificates folder, wait for it to exit."""
    plan.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_flwr_home(
        plan.flwr_home,
        plan.local_address,
        plan.certs_dir / certs.CA_CERT if plan.certs_dir else None,
        insecure=plan.certs_dir is None,
    )
    env = child_env(plan.flwr_home)

    def register_all(process: subprocess.Popen) -> None:
        wait_for_port(plan.local_address, process)
        if not plan.site_keys and plan.certs_dir is not None:
            logger.warning("no site keys in %s: no SuperNode can join", plan.certs_dir / certs.SITES_DIR)
        for site, public_key in plan.site_keys.items():
            outcome = register_site(public_key, site, env, alive=lambda: process.poll() is None)
            logger.info("site %s: %s", site, outcome)
        address = join_address(plan.host, plan.port)
        logger.info("SuperLink ready on %s with %d site key(s)", address, len(plan.site_keys))

    logger.info("SuperLink state (database, flwr config, app bundles): %s", plan.state_dir)
    logger.warning(
        "the SuperLink's Control API (flwr run) shares port %d and has no authentication in Flower 1.42: "
        "let only your sites and operators reach it",
        plan.port,
    )
    for warning in plan.warnings:
        logger.warning("%s", warning)
    return cli_exit_code("flower-superlink", run_forwarding(plan.command, env, on_start=register_all))


# -- SuperNode -------------------------------------------------------------------------------------
def site_node_config(
    partition_id: int, site: str, data_file: Path, state_dir: Path, target_epsilon: float | None = None
) -> dict[str, ConfigValue]:
    """The node config the ClientApp reads (``client/app.py``): these keys, these types."""
    values: dict[str, ConfigValue] = {
        "partition-id": int(partition_id),
        "site": site,
        "data-file": str(data_file),
        "state-dir": str(state_dir),
    }
    if target_epsilon is not None:
        values["target-epsilon"] = float(target_epsilon)
    return values


@dataclass(frozen=True)
class SuperNodePlan:
    command: list[str]
    node_config: dict[str, ConfigValue]
    state_dir: Path
    flwr_home: Path
    port: int


def plan_supernode(
    superlink: str,
    data: str | Path,
    *,
    ca: str | Path | None = None,
    key: str | Path | None = None,
    partition_id: int,
    site: str | None = None,
    state_dir: str | Path | None = None,
    target_epsilon: float | None = None,
    port: int | None = None,
    insecure: bool = False,
) -> SuperNodePlan:
    """The ``flower-supernode`` command line of one site; checks its files exist first."""
    superlink_host, superlink_port = split_address(superlink)
    data_file = _existing_file(data, "--data")
    if partition_id < 0:
        raise ConfigError(f"--id must be a non-negative integer, got {partition_id}")
    if target_epsilon is not None and not (0 <= target_epsilon < float("inf")):
        raise ConfigError(f"--target-epsilon must be a finite number >= 0, got {target_epsilon}")
    if site is None:
        site = data_file.stem
        try:
            certs.check_site_name(site)
        except ConfigError as err:
            raise ConfigError(f"the data file's name cannot be the site name ({err}): give --name") from err
    else:
        certs.check_site_name(site)
    state = Path(state_dir or Path("fedae-state") / site).expanduser().resolve()
    check_site_record(state, site, partition_id)
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port must be from 1 to 65535, got {port}")
    local_port = port if port is not None else free_port()
    command = [executable("flower-supernode"), "--superlink", join_address(superlink_host, superlink_port)]
    if insecure:
        command.append("--insecure")
    else:
        if ca is None or key is None:
            raise ConfigError("--ca FILE and --key FILE are required (from `fedae certs`), or --insecure")
        command += ["--root-certificates", str(_existing_file(ca, "--ca"))]
        key_file = _existing_file(key, "--key")
        certs.load_site_key(key_file)  # as flower-supernode loads it: a wrong file is exit 2 here
        command += ["--auth-supernode-private-key", str(key_file)]
    node_config = site_node_config(partition_id, site, data_file, state, target_epsilon)
    command += ["--node-config", key_values(node_config), "--host", "127.0.0.1", "--port", str(local_port)]
    return SuperNodePlan(command, node_config, state, state / "flwr", local_port)


def check_site_record(state_dir: Path, site: str, partition_id: int) -> None:
    """Refuse to start site ``site`` as ``--id partition_id`` on a state-dir kept for another site or id.

    The privacy ledger is filed by id (``STATE_DIR/client-<id>/``): another id would start a fresh ledger
    and lose the epsilon already spent. ``run_supernode`` records both in ``STATE_DIR/site.json`` on the
    first start; a state-dir from before that record is judged by the ledger folders it holds.
    """
    path = state_dir / SITE_RECORD
    if path.exists():
        try:
            record = json.loads(path.read_text())
            recorded = (str(record["site"]), int(record["id"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is not a site record written by fedae supernode ({err})") from err
        if recorded != (site, partition_id):
            raise ConfigError(
                f"--state-dir {state_dir} belongs to --name {recorded[0]} --id {recorded[1]} ({path}), "
                f"not --name {site} --id {partition_id}: the site's privacy ledger is filed under its id; "
                "start it with the recorded values, or give another --state-dir"
            )
        return
    ledgers = sorted(p.name for p in state_dir.glob("client-*") if p.is_dir())
    if ledgers and f"client-{partition_id}" not in ledgers:
        raise ConfigError(
            f"--state-dir {state_dir} holds the privacy ledger(s) {ledgers}, not client-{partition_id}: "
            f"--id {partition_id} would start a fresh ledger; start the site with its earlier --id"
        )


def _existing_file(path: str | Path, option: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(f"{option} {resolved}: file does not exist")
    return resolved


def run_supernode(plan: SuperNodePlan) -> int:
    plan.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = plan.state_dir / SITE_RECORD
    if not record.exists():
        site = {"site": plan.node_config["site"], "id": plan.node_config["partition-id"]}
        certs.write_atomic(record, (json.dumps(site) + "\n").encode(), replace=False)
    logger.info(
        "site %s (partition-id %s): state in %s, local API port %d",
        plan.node_config["site"],
        plan.node_config["partition-id"],
        plan.state_dir,
        plan.port,
    )
    return cli_exit_code("flower-supernode", run_forwarding(plan.command, child_env(plan.flwr_home)))


# -- run -------------------------------------------------------------------------------------------
def app_dir() -> Path:
    """The folder ``flwr run`` builds the app bundle from: the checkout holding fedae's pyproject.toml."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not (
        pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text() and (root / "server").is_dir()
    ):
        raise RuntimeError(
            f"no Flower app at {root} (pyproject.toml with [tool.flwr.app], server/, client/, shared/): "
            "`fedae run` submits the app from a source checkout of fedae; install it from one (uv sync)"
        )
    return root


def run_overrides(
    run_config: str = "",
    rounds: int | None = None,
    test_file: str | Path | None = None,
    out_dir: str | Path | None = None,
    now: float | None = None,
) -> dict[str, ConfigValue]:
    """The run config ``fedae run`` sends, validated here against fedae's own config first.

    ``out-dir`` (``out_dir``, else the run config's, else ``runs/<time>-deploy``) is made absolute here;
    it is a path on the SuperLink host, where the ServerApp runs.
    """
    from shared.config import FedaeConfig, parse_key_values

    overrides: dict[str, Any] = dict(parse_key_values(run_config))
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    if test_file is not None:
        if overrides.get("scenario", "files") != "files":
            raise ConfigError(
                f"--test runs the 'files' scenario; do not combine it with scenario={overrides['scenario']!r}"
            )
        test = Path(test_file).expanduser()
        if not test.is_absolute() and not test.is_file():
            raise ConfigError(f"--test {test.resolve()}: file does not exist")
        if not test.exists():
            logger.warning("--test %s is not on this machine: it must exist on the SuperLink host", test)
        overrides |= {"scenario": "files", "test-file": str(test.resolve())}
    configured = str(overrides.get("out-dir") or "") or None
    if out_dir is not None and configured is not None and _absolute(out_dir) != _absolute(configured):
        raise ConfigError(
            f"--out {_absolute(out_dir)} and run-config out-dir={configured!r} differ: give only one"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    overrides["out-dir"] = str(_absolute(out_dir or configured or Path("runs") / f"{stamp}-deploy"))
    typed = FedaeConfig().with_overrides(overrides).to_run_config()  # ConfigError on bad keys/values
    return {key: typed[key] for key in overrides}


def _absolute(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def flwr_run_command(app: Path, overrides: Mapping[str, ConfigValue]) -> list[str]:
    return [executable("flwr"), "run", str(app), CONNECTION, "--run-config", key_values(overrides)]


def flwr_log_command(run_id: int) -> list[str]:
    return [executable("flwr"), "log", str(run_id), CONNECTION, "--stream"]


def flwr_ls_command(run_id: int) -> list[str]:
    return [executable("flwr"), "ls", CONNECTION, "--run-id", str(run_id)]


@dataclass
class RunOutcome:
    run_id: int
    status: str  # Flower's: finished:completed, finished:failed, finished:stopped, ...
    details: str
    out_dir: Path

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"


@contextmanager
def temporary_flwr_home(address: str, ca: Path | None, insecure: bool) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fedae-flwr-") as folder:
        home = Path(folder)
        write_flwr_home(home, address, ca, insecure)
        yield home


def submit_run(
    superlink: str,
    overrides: Mapping[str, ConfigValue],
    *,
    ca: str | Path | None = None,
    insecure: bool = False,
    poll_s: float = 5.0,
) -> RunOutcome:
    """Submit the app, stream its log until it ends, and return Flower's verdict on it."""
    host, port = split_address(superlink)
    if insecure:
        root_certificates = None
    elif ca is None:
        raise ConfigError("--ca FILE is required (the federation's ca.crt), or --insecure")
    else:
        root_certificates = _existing_file(ca, "--ca")
    app = app_dir()
    with temporary_flwr_home(join_address(host, port), root_certificates, insecure) as home:
        env = child_env(home)
        answer = _flwr_json(flwr_run_command(app, overrides), env, timeout=600.0)
        if not answer.get("success"):
            raise RuntimeError(f"flwr run failed: {answer.get('error-message', answer)}")
        run_id = int(answer["run-id"])
        logger.info(
            "run %d submitted to %s; its outputs go to %s on the SuperLink host; streaming its log",
            run_id,
            join_address(host, port),
            overrides["out-dir"],
        )
        try:
            subprocess.run(flwr_log_command(run_id), env=env, check=False)
            return _wait_until_finished(run_id, env, poll_s, Path(str(overrides["out-dir"])))
        except KeyboardInterrupt:
            logger.warning(
                "stopped following run %d; it goes on on the SuperLink (flwr stop %d)", run_id, run_id
            )
            raise


def _wait_until_finished(run_id: int, env: Mapping[str, str], poll_s: float, out_dir: Path) -> RunOutcome:
    """Flower's status of the run, once it is finished (the log stream can end early on a network error)."""
    while True:
        answer = _flwr_json(flwr_ls_command(run_id), env)
        if answer.get("success") and answer.get("runs"):
            run = answer["runs"][0]
            if str(run["status"]).startswith("finished"):
                return RunOutcome(run_id, str(run["status"]), str(run.get("status-details", "")), out_dir)
            logger.info("run %d is %s; waiting", run_id, run["status"])
        else:
            logger.warning("could not read run %d's status: %s", run_id, answer.get("error-message", answer))
        time.sleep(poll_s)


# -- running a child -------------------------------------------------------------------------------
def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class ChildExit:
    """How a child run by ``run_forwarding`` ended."""

    code: int  # as a shell reports it (killed by signal N: 128 + N)
    stop_signal: int | None = None  # the first SIGINT/SIGTERM fedae received while the child ran

    @property
    def stopped_on_request(self) -> bool:
        """fedae was asked to stop, and the child ended as Flower ends on that: 0, or killed by it
        (``flower-superlink`` re-raises SIGTERM after a clean shutdown: 143)."""
        honoured = (0, *(128 + sig for sig in STOP_SIGNALS))
        return self.stop_signal is not None and self.code in honoured


def cli_exit_code(program: str, result: ChildExit) -> int:
    """The CLI's exit code for a child's end: 0 when it succeeded or honoured a stop fedae passed on;
    otherwise 1, with one line naming ``program`` and its code."""
    if result.stopped_on_request and result.stop_signal is not None:
        logger.info("%s stopped on %s", program, signal.Signals(result.stop_signal).name)
        return 0
    if result.code == 0:
        return 0
    killed = f" (killed by {signal.Signals(result.code - 128).name})" if _is_signal(result.code - 128) else ""
    logger.error("%s exited with code %d%s; its log above says why", program, result.code, killed)
    return 1


def _is_signal(number: int) -> bool:
    try:
        signal.Signals(number)
    except ValueError:
        return False
    return True


def _in_terminal_foreground() -> bool:
    """Whether a terminal's Ctrl-C reaches this process group (and so the child, which shares it)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def run_forwarding(
    command: Sequence[str],
    env: Mapping[str, str],
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> ChildExit:
    """Run ``command``, forwarding SIGINT and SIGTERM to it; return how it ended.

    The handlers are installed before the child starts: a signal that arrives while it is being started
    is passed on as soon as it exists, so no moment exists where a SIGTERM ends fedae and leaves the
    child running. The child stays in fedae's process group so that killing the group stops both. A
    terminal's Ctrl-C already reaches the whole group: forwarding it as well would deliver it twice, and
    Flower treats a second SIGINT as "exit now" (its graceful handler is gone after the first).
    ``on_start`` runs once the child is started (registering keys); if it raises, the child is stopped,
    unless a stop was asked for already (then its failure is that stop, and the child is waited for).
    """
    process: subprocess.Popen | None = None
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if process is None or process.poll() is not None:
            return  # not started yet: passed on once it is
        if signum == signal.SIGINT and _in_terminal_foreground():
            return
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        process = subprocess.Popen(list(command), env=dict(env))
        if received:  # it arrived before the child existed: the child has not seen it, terminal or not
            process.send_signal(received[0])
        if on_start is not None:
            try:
                on_start(process)
            except BaseException:
                if not received:
                    stop(process)
                    raise
                logger.debug("start-up cut short by %s", signal.Signals(received[0]).name, exc_info=True)
        code = exit_code(process.wait())
        return ChildExit(code, received[0] if received else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
