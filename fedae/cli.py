"""The ``fedae`` command: thin sub-commands over ``simulations`` and ``shared``.

Exit codes: 0 success, 2 bad input or configuration, 1 anything else. This is the one place that turns
exceptions into messages and exit codes.
"""

from __future__ import annotations

import shared.tfenv  # noqa: F401  (import-time switches before TensorFlow: keep first)

# isort: split

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
logger = logging.getLogger("fedae")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a simulated federation and export the detector")
    sim.add_argument("--scenario", help="a named scenario (see `fedae scenarios`); default fleet")
    sim.add_argument("--data", metavar="DIR", help="one CSV/Parquet/NPZ file per site (files sorted by name)")
    sim.add_argument("--test", metavar="FILE", help="labelled test file for --data (1 = anomaly)")
    sim.add_argument("--label-column", help="label column of the test file (default: label)")
    sim.add_argument("--clients", type=int, metavar="N", help="number of simulated clients")
    sim.add_argument("--rounds", type=int, metavar="N", help="number of federated rounds")
    sim.add_argument(
        "--run-config",
        metavar="'key=value ...'",
        default="",
        help="overrides with the keys of [tool.flwr.app.config], as for `flwr run --run-config`",
    )
    sim.add_argument("--out", metavar="RUN_DIR", help="output folder (default runs/<timestamp>-<scenario>)")
    sim.add_argument(
        "--cpus-per-client",
        type=int,
        help="CPUs per simulation worker (default: one worker per core, fewer if memory or the GPU share "
        "allows fewer)",
    )
    sim.add_argument("--gpus-per-client", type=float, help="GPU share per worker (default 0.25 with a GPU)")
    sim.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the central reference models (they pool every client's data: slow for many clients)",
    )
    sim.add_argument("--json", action="store_true", help="print the summary as JSON")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and TensorFlow's own logs")

    sub.add_parser("scenarios", help="list the named scenarios")

    robust = sub.add_parser("robustness", help="attack a run's (or a bundle's) detector: evasion figures")
    robust.add_argument(
        "target", metavar="RUN_DIR|BUNDLE", help="a run folder, or a bundle folder with --test"
    )
    robust.add_argument("--test", metavar="FILE", help="labelled test file for a bundle (1 = anomaly)")
    robust.add_argument("--label-column", default="label", help="label column of --test (default: label)")
    robust.add_argument(
        "--run-config",
        metavar="'key=value ...'",
        default="",
        help="robustness-rows, robustness-linf-epsilons, robustness-l2-epsilons, robustness-queries",
    )
    robust.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    robust.add_argument("--verbose", action="store_true", help="show TensorFlow's own logs")

    bundle = sub.add_parser(
        "bundle", help="inspect, pack or add exports to a detector bundle"
    ).add_subparsers(dest="bundle_command", required=True)
    inspect = bundle.add_parser("inspect", help="check a bundle's files and print what it holds")
    inspect.add_argument("bundle", metavar="BUNDLE", help="a bundle folder or .tar.gz")
    inspect.add_argument("--json", action="store_true", help="print it as JSON")
    pack = bundle.add_parser("pack", help="check a bundle folder and write it as one .tar.gz")
    pack.add_argument("bundle", metavar="BUNDLE")
    pack.add_argument("--out", metavar="FILE", help="the archive (default: BUNDLE.tar.gz beside it)")
    export = bundle.add_parser(
        "export",
        help="add serving exports (SavedModel, TFLite) to a checked bundle; its manifest is rewritten",
    )
    export.add_argument("bundle", metavar="BUNDLE")
    export.add_argument(
        "--formats",
        required=True,
        help="comma-separated: savedmodel, tflite-float16, tflite-int8 (replaces the bundle's exports)",
    )
    export.add_argument(
        "--representative",
        metavar="FILE",
        help="CSV/Parquet/NPZ rows in the bundle's schema that set the int8 ranges (public data or your own; "
        "never a client's); default: synthetic rows",
    )
    export.add_argument("--verbose", action="store_true", help="show TensorFlow's own logs")
    _add_detect_parser(sub)

    privacy = sub.add_parser("privacy", help="privacy accounting of a run").add_subparsers(
        dest="privacy_command", required=True
    )
    audit = privacy.add_parser("audit", help="recompute every client's epsilon from its ledger")
    audit.add_argument("run_dir", metavar="RUN_DIR")
    audit.add_argument("--json", action="store_true", help="print the audit as JSON")
    audit.add_argument(
        "--empirical",
        action="store_true",
        help="also attack the run (membership inference, one-run canaries) for LOWER bounds on epsilon; "
        "writes RUN_DIR/privacy-audit.json and a section of report.md",
    )
    audit.add_argument("--canaries", type=int, default=1000, metavar="M", help="canaries (default 1000)")
    audit.add_argument("--guesses", type=int, default=100, metavar="K", help="canary guesses (default 100)")
    audit.add_argument("--verbose", action="store_true", help="show TensorFlow's own logs")
    _add_deployment_parsers(sub)
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub: Any) -> None:
    from fedae.instances import DEFAULT_DRIFT_WINDOW, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INSTANCES

    serve = sub.add_parser(
        "serve", help="score over HTTP with an exported detector bundle (docs/DETECTOR.md)"
    )
    serve.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (RUN_DIR/bundle)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument(
        "--max-instances",
        type=int,
        default=DEFAULT_MAX_INSTANCES,
        metavar="N",
        help=f"most instances in one request (default {DEFAULT_MAX_INSTANCES})",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES}, 16 MiB)",
    )
    serve.add_argument(
        "--drift-window",
        type=int,
        default=DEFAULT_DRIFT_WINDOW,
        metavar="N",
        help=f"recent scores the drift statistics and anomaly rate cover (default {DEFAULT_DRIFT_WINDOW})",
    )
    serve.add_argument("--verbose", action="store_true", help="uvicorn's access log and debug logging")


DETECT_DESCRIPTION = """\
Score every row of INPUT (CSV, Parquet, or NPZ; images only as NPZ) with the detector in BUNDLE, reading
it in chunks, so files larger than memory work. Columns are matched to the bundle's features by name
(their order does not matter); a column named id (any case), or --id-column, is carried to the output;
the label column (--label-column; default the training run's, else 'label') is ignored, so labelled
test files can be scored as they are. Any other column, a missing one, or an image of another shape
stops the run. A cell that is not a finite number stops it too (--on-invalid fail, the default), naming
the column and the 1-based data row, or its row is skipped, counted and reported (--on-invalid skip).
--out FILE (.csv or .parquet) gets one line per scored row: the id column (without one: row, the data
row number), score, and anomaly (1 if score > threshold); it is written beside FILE and renamed only
when the run succeeds. Without --out, only the summary is printed.

Exit codes: 0 scored, 2 bad input (file, column, row, bundle that fails its checks, options), 1 other."""


def _add_detect_parser(sub: Any) -> None:
    from shared.batch_scoring import DEFAULT_CHUNK_ROWS, DRIFT_WINDOW_CAP

    detect = sub.add_parser(
        "detect",
        help="score a CSV/Parquet/NPZ file with an exported bundle, in chunks (batch scoring)",
        description=DETECT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    detect.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (RUN_DIR/bundle) or .tar.gz")
    detect.add_argument("input", metavar="INPUT", help="the file to score: .csv, .parquet/.pq or .npz")
    detect.add_argument(
        "--out", metavar="FILE", help="per-row scores: .csv or .parquet/.pq (default: summary only)"
    )
    detect.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    detect.add_argument(
        "--on-invalid",
        choices=("fail", "skip"),
        default="fail",
        help="a row with a bad cell: stop with exit 2 (fail, the default) or leave it out and report it "
        "(skip); column problems always stop the run",
    )
    detect.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        metavar="N",
        help=f"rows read and scored at a time (default {DEFAULT_CHUNK_ROWS})",
    )
    detect.add_argument(
        "--drift",
        action="store_true",
        help="judge the scores' drift against the bundle's calibration scores (PSI and KS over the "
        f"file's last {DRIFT_WINDOW_CAP} scores at most; exit 2 if the bundle has no drift reference)",
    )
    detect.add_argument("--id-column", metavar="NAME", help="the id column (default: one named id, any case)")
    detect.add_argument(
        "--label-column",
        metavar="NAME",
        help="a label column to ignore (default: the training run's label column, else 'label')",
    )
    detect.add_argument("--verbose", action="store_true", help="show TensorFlow's own logs")


def _add_deployment_parsers(sub: Any) -> None:
    """``certs``, ``superlink``, ``supernode``, ``run``: thin wrappers over Flower's own processes."""
    certs = sub.add_parser(
        "certs", help="make the federation's CA, the SuperLink's TLS certificate, site keys"
    )
    certs.add_argument("--out", required=True, metavar="DIR", help="folder for the files (reused if present)")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a name or IP address sites use to reach the SuperLink (repeat for several); the loopback is "
        "always included",
    )
    certs.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME",
        help="a site to make a key for; its --id is fixed in DIR/sites.json",
    )
    certs.add_argument(
        "--days",
        type=int,
        default=365,
        metavar="N",
        help="validity of a new SuperLink certificate, 1 to 3650 (default 365)",
    )
    certs.add_argument(
        "--force",
        action="store_true",
        help="reissue the SuperLink certificate (with --host) and make new keys for the --site(s) named",
    )

    link = sub.add_parser("superlink", help="start the SuperLink (flower-superlink) with TLS and site keys")
    link.add_argument("--certs", metavar="DIR", help="the folder made by `fedae certs`")
    link.add_argument(
        "--address",
        default="0.0.0.0:8000",
        metavar="HOST[:PORT]",
        help="where to listen (default 0.0.0.0:8000)",
    )
    link.add_argument(
        "--state",
        metavar="DIR",
        default="superlink-state",
        help="database and flwr config (./superlink-state)",
    )
    link.add_argument(
        "--insecure", action="store_true", help="plaintext and no site authentication: tests only"
    )
    link.add_argument("--verbose", action="store_true", help="debug logging")

    node = sub.add_parser("supernode", help="start this site's SuperNode (flower-supernode)")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    node.add_argument("--ca", metavar="FILE", help="the federation's ca.crt")
    node.add_argument("--data", required=True, metavar="FILE", help="this site's data file")
    node.add_argument("--name", metavar="SITE", help="the site's name (default: the data file's name)")
    node.add_argument(
        "--key", metavar="FILE", help="the site's private key (sites/SITE.key from `fedae certs`)"
    )
    node.add_argument(
        "--id",
        type=int,
        required=True,
        metavar="N",
        help="the site's number as `fedae certs` printed it (sites.json); its ledger is filed under it",
    )
    node.add_argument("--state-dir", metavar="DIR", help="privacy ledger and app files (./fedae-state/SITE)")
    node.add_argument("--target-epsilon", type=float, metavar="E", help="this site's own privacy budget")
    node.add_argument(
        "--port", type=int, metavar="P", help="local port for Flower's app runtime (default: free)"
    )
    node.add_argument("--insecure", action="store_true", help="plaintext, no authentication: tests only")
    node.add_argument("--verbose", action="store_true", help="debug logging")

    run = sub.add_parser("run", help="submit a federated run to a SuperLink and follow it")
    run.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    run.add_argument("--ca", metavar="FILE", help="the federation's ca.crt")
    run.add_argument("--rounds", type=int, metavar="N", help="number of federated rounds")
    run.add_argument(
        "--run-config", metavar="'key=value ...'", default="", help="keys of [tool.flwr.app.config]"
    )
    run.add_argument("--test", metavar="FILE", help="labelled test file, on the SuperLink host (1 = anomaly)")
    run.add_argument(
        "--out",
        metavar="RUN_DIR",
        help="output folder on the SuperLink host (default: the run config's out-dir, else "
        "runs/<time>-deploy)",
    )
    run.add_argument("--insecure", action="store_true", help="plaintext connection: tests only")
    run.add_argument("--verbose", action="store_true", help="debug logging")


def config_from_args(args: argparse.Namespace) -> Any:
    from shared.config import ConfigError, FedaeConfig, parse_key_values
    from simulations import scenarios

    if args.data and args.scenario and args.scenario != "files":
        raise ConfigError("--data runs on your own files; do not combine it with --scenario")
    if args.test and not args.data:
        raise ConfigError("--test goes with --data (the embedded scenarios have their own test split)")
    overrides: dict[str, Any] = {}
    if args.data:
        overrides |= {"scenario": "files", "data-dir": args.data, "partition": "natural"}
        if not args.test:
            raise ConfigError("--data needs --test FILE: a labelled file (1 = anomaly) to evaluate on")
        overrides["test-file"] = args.test
    else:
        overrides |= scenarios.overrides(args.scenario or "fleet")
    if args.label_column:
        overrides["label-column"] = args.label_column
    if args.clients is not None:
        overrides["num-clients"] = args.clients
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.out:
        overrides["out-dir"] = args.out
    overrides |= parse_key_values(args.run_config)
    return FedaeConfig().with_overrides(overrides)


def _simulate(args: argparse.Namespace) -> int:
    import json

    from simulations.runner import simulate

    summary = simulate(
        config_from_args(args),
        cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client,
        verbose=args.verbose,
        compare_baselines=not args.no_baselines,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    out = summary["run_config"]["out-dir"]
    d, p = summary["detector"], summary["privacy"]
    print(f"\nRun finished in {summary['wall_time_s']} s: {out}")
    print(
        f"  detector: test ROC-AUC {d['test_auc']:.4f}, precision {d['precision']:.3f}, "
        f"recall {d['recall']:.3f} "
        f"at threshold {d['threshold']:.5g} ({d['threshold_rule']})"
    )
    if p["dp"]:
        worst = p["sample_level"]["max_epsilon"]
        shown = "none reported" if worst is None else f"{worst:.3f}"
        print(f"  privacy: worst client's epsilon {shown}; {p['statement']}")
        if p["budget"]["stopped_early"]:
            print(f"  stopped early: {p['budget']['stopped_early']}")
    else:
        print("  privacy: no DP-SGD (noise-multiplier 0, no clipping): no sample-level guarantee")
    client_level = p.get("client_level") or {}
    if client_level.get("enabled"):
        print(f"  client-level epsilon {client_level['epsilon']:.3f}; {client_level['statement']}")
    for name, auc in summary["comparison"].items():
        print(f"  {name}: ROC-AUC {auc:.4f}")
    print(f"  bundle: {out}/{summary['bundle']}   report: {out}/{summary['report']}")
    return EXIT_OK


def _privacy(args: argparse.Namespace) -> int:
    import json

    from shared.audit import audit_run, format_audit

    if not args.empirical:
        audit = audit_run(args.run_dir)
        print(json.dumps(audit, indent=2) if args.json else format_audit(audit))
        return EXIT_OK if audit["matches_run"] and audit["all_within_budget"] else EXIT_FAILURE

    from shared.audit import check_empirical_inputs, format_empirical, save_audit, with_empirical
    from shared.config import ConfigError

    if not 1 <= args.guesses <= args.canaries:
        raise ConfigError(f"--guesses must be between 1 and --canaries ({args.canaries}), got {args.guesses}")
    check_empirical_inputs(args.run_dir)  # before the ledgers are read and TensorFlow is loaded
    audit = audit_run(args.run_dir)
    from shared.empirical import empirical_audit

    audit = with_empirical(
        audit, empirical_audit(args.run_dir, audit, canaries=args.canaries, guesses=args.guesses)
    )
    path = save_audit(args.run_dir, audit)
    print(json.dumps(audit, indent=2) if args.json else f"{format_audit(audit)}\n{format_empirical(audit)}")
    if not args.json:
        print(f"\nwritten: {path} and a privacy-audit section in report.md")
    return EXIT_OK if audit["audit_passed"] else EXIT_FAILURE


def _certs(args: argparse.Namespace) -> int:
    from fedae.certs import make_certs, next_steps

    report = make_certs(args.out, args.host, args.site, days=args.days, force=args.force)
    for path in report.written:
        print(f"written: {path}")
    for path in report.kept:
        print(f"kept:    {path}")
    print(f"\n{next_steps(report)}")
    return EXIT_OK


def _superlink(args: argparse.Namespace) -> int:
    from fedae.deploy import plan_superlink, run_superlink

    if args.insecure:
        logger.warning(
            "INSECURE: plaintext traffic and no SuperNode authentication; any machine that reaches this "
            "port can join the federation or submit runs. Never use --insecure across sites."
        )
    return run_superlink(plan_superlink(args.certs, args.address, args.state, insecure=args.insecure))


def _supernode(args: argparse.Namespace) -> int:
    from fedae.deploy import plan_supernode, run_supernode

    if args.insecure:
        logger.warning("INSECURE: plaintext traffic, and this site does not check who the SuperLink is")
    plan = plan_supernode(
        args.superlink,
        args.data,
        ca=args.ca,
        key=args.key,
        partition_id=args.id,
        site=args.name,
        state_dir=args.state_dir,
        target_epsilon=args.target_epsilon,
        port=args.port,
        insecure=args.insecure,
    )
    return run_supernode(plan)


def _run(args: argparse.Namespace) -> int:
    from fedae.deploy import run_overrides, submit_run

    if args.insecure:
        logger.warning("INSECURE: the run and its settings travel in plaintext")
    overrides = run_overrides(args.run_config, args.rounds, args.test, args.out)
    outcome = submit_run(args.superlink, overrides, ca=args.ca, insecure=args.insecure)
    out = outcome.out_dir
    if not outcome.succeeded:
        print(f"\nRun {outcome.run_id} {outcome.status}: {outcome.details or 'see the log above'}")
        print(f"  its checkpoint (if any round completed) is in {out}; run again with --out {out} to resume")
        return EXIT_FAILURE
    print(f"\nRun {outcome.run_id} {outcome.status}. On the SuperLink host:")
    print(f"  summary: {out / 'summary.json'}\n  bundle:  {out / 'bundle'}\n  report:  {out / 'report.md'}")
    return EXIT_OK


def _robustness(args: argparse.Namespace) -> int:
    import json

    from shared.config import ConfigError, parse_key_values

    overrides = parse_key_values(args.run_config)
    unknown = sorted(k for k in overrides if not k.startswith("robustness-"))
    if unknown:
        raise ConfigError(f"--run-config takes robustness-* keys here, got {unknown}")
    from shared.robustness import evaluate_saved, format_section

    section = evaluate_saved(args.target, args.test, args.label_column, overrides)
    print(json.dumps(section, indent=2) if args.json else format_section(section))
    return EXIT_OK


def _bundle(args: argparse.Namespace) -> int:
    import json

    from shared.data.errors import DataError
    from shared.detector import BundleError, export_bundle, pack_bundle

    if args.bundle_command == "inspect":
        from shared.bundle_info import describe_bundle, format_bundle

        info = describe_bundle(args.bundle)
        print(json.dumps(info, indent=2) if args.json else format_bundle(info))
    elif args.bundle_command == "pack":
        print(pack_bundle(args.bundle, args.out))
    else:
        from shared.export import parse_exports

        try:
            kinds = parse_exports(args.formats)
        except ValueError as err:
            raise BundleError(f"--formats: {err}") from err

        def representative(detector: Any) -> Any:
            """The --representative file's rows in the checked bundle's schema (None without one)."""
            if not args.representative:
                return None
            from shared.data.files import align_columns, read_table
            from shared.export import Representative

            table = read_table(args.representative)
            names = tuple(detector.metadata.get("input_schema", {}).get("feature_names") or ())
            rows = align_columns(table, names) if names else table.x
            if rows.shape[1:] != detector.scaler.input_shape:
                raise DataError(
                    f"rows of shape {rows.shape[1:]}, the bundle takes {detector.scaler.input_shape}",
                    path=args.representative,
                )
            return Representative.from_rows(rows, f"rows of {args.representative}")

        # export_bundle checks every file (on a private copy) before anything is written, so the new
        # manifest vouches only for files that matched the old one.
        export_bundle(args.bundle, kinds, representative)
        print(f"{args.bundle}: exports {', '.join(kinds) or 'none'}; manifest rewritten")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from shared.config import ConfigError

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    for flag in ("max_instances", "max_body_bytes", "drift_window"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    from fedae.serve import bind_socket, create_app, run_server
    from shared.detector import load_bundle

    detector = load_bundle(args.bundle)  # checks every file against the manifest first (BundleError: exit 2)
    app = create_app(
        detector,
        max_instances=args.max_instances,
        max_body_bytes=args.max_body_bytes,
        drift_window=args.drift_window,
    )
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from err
    uvicorn_logger = logging.getLogger("uvicorn")  # its start-up, shutdown and error lines, like fedae's
    uvicorn_logger.handlers = list(logger.handlers)
    uvicorn_logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    uvicorn_logger.propagate = False
    host = f"[{args.host}]" if ":" in args.host else args.host
    logger.info(
        "serving %s (%s, %s model) on http://%s:%d; Ctrl+C stops it",
        args.bundle,
        detector.bundle_id,
        detector.spec.kind,
        host,
        args.port,
    )
    run_server(app, sock, access_log=args.verbose)
    logger.info("stopped")
    return EXIT_OK


# A progress bar (on stderr, when it is a terminal) for inputs at least this large.
PROGRESS_MIN_BYTES = 16 * 2**20


def _detect(args: argparse.Namespace) -> int:
    import json

    from shared.batch_scoring import check_request, format_summary, score_file
    from shared.detector import load_bundle

    check_request(args.input, args.out, args.chunk_rows, args.on_invalid)  # before TensorFlow loads
    detector = load_bundle(args.bundle)  # checks every file against the manifest first (BundleError: exit 2)
    with _progress_bar(args.input) as on_progress:
        summary = score_file(
            detector,
            args.input,
            args.out,
            chunk_rows=args.chunk_rows,
            on_invalid=args.on_invalid,
            label_column=args.label_column,
            id_column=args.id_column,
            drift=args.drift,
            on_progress=on_progress,
        )
    summary = {"bundle": args.bundle, **summary}
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return EXIT_OK


@contextlib.contextmanager
def _progress_bar(path: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr for a large input, when stderr is a terminal (never on stdout)."""
    if not sys.stderr.isatty() or os.path.getsize(path) < PROGRESS_MIN_BYTES:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(f"scoring {os.path.basename(path)}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("scoring", total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _scenarios(_: argparse.Namespace) -> int:
    from simulations import scenarios

    for name, description in scenarios.available().items():
        print(f"{name:10s} {description}")
    return EXIT_OK


def _setup_logging(verbose: bool) -> None:
    """fedae's progress at INFO on stderr; other libraries only at WARNING (all with --verbose)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    fedae_logger = logging.getLogger("fedae")
    fedae_logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    fedae_logger.addHandler(handler)
    fedae_logger.propagate = False
    if not verbose:
        # dp-accounting's RDP logs every Renyi order it drops as not converging; dropping an order only
        # loosens the bound, so these lines are not for the user.
        logging.getLogger("absl").setLevel(logging.ERROR)
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # before TensorFlow is first imported


def main(argv: list[str] | None = None) -> int:
    from shared.config import ConfigError
    from shared.data.errors import DataError

    args = _parser().parse_args(argv)
    _setup_logging(verbose=getattr(args, "verbose", False))
    handlers = {
        "simulate": _simulate,
        "scenarios": _scenarios,
        "privacy": _privacy,
        "robustness": _robustness,
        "bundle": _bundle,
        "detect": _detect,
        "certs": _certs,
        "superlink": _superlink,
        "supernode": _supernode,
        "run": _run,
        "serve": _serve,
    }
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError) as err:
        print(f"fedae: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fedae: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # the last line of defence: a message, not a traceback
        logger.debug("unexpected error", exc_info=True)
        print(
            f"fedae: failed: {type(err).__name__}: {err} (rerun with --verbose for details)", file=sys.stderr
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
