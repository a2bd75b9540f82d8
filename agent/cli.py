"""Command line: run, status, validate, images, completion, version. One-line errors,
documented exit codes, and help that ends with real examples."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, interrupt, log, output
from agent.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, duration_seconds
from agent.errors import (
    EXIT_BAD_INPUT,
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_OK,
    BootstrapError,
    ConfigError,
)

if TYPE_CHECKING:
    from agent.step import StepReport


def parse_duration(text: str) -> float:
    """--timeout, read by the config's own duration parser."""
    try:
        return duration_seconds(text, positive=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # Usage errors exit 2 with one line, like every other bad input.
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


# Each command's help ends with these: a Talos node, a systemd host, a workstation.
EXAMPLES = {
    "run": """
  # Talos node: the extension service runs `alga-bootstrap run`; run it again with
  talosctl -n 10.0.0.10 service ext-alga-bootstrap restart
  # systemd host, by hand as root (the unit: systemctl restart alga-bootstrap)
  alga-bootstrap run --config /etc/alga-bootstrap/config.yaml \\
    --kubeconfig /etc/alga-bootstrap/kubeconfig
  # workstation: what would a re-run change on the appliance of context admin@site-a?
  alga-bootstrap run --config site.yaml --context admin@site-a --dry-run""",
    "status": """
  # Talos node, from a workstation: fetch its admin kubeconfig, follow the first boot
  talosctl -n 10.0.0.10 kubeconfig admin.kubeconfig
  alga-bootstrap status --config site.yaml --kubeconfig admin.kubeconfig --watch
  # systemd host
  alga-bootstrap status --config /etc/alga-bootstrap/config.yaml \\
    --kubeconfig /etc/alga-bootstrap/kubeconfig
  # workstation with several appliances in $KUBECONFIG: one of them, for a script
  alga-bootstrap status --config site.yaml --context admin@site-a -o json""",
    "validate": """
  # Talos node: check a site config before it goes into the ExtensionServiceConfig
  alga-bootstrap validate --config site.yaml
  # systemd host
  alga-bootstrap validate --config /etc/alga-bootstrap/config.yaml
  # workstation: a newer Flux bundle, before baking it (its sha256 goes in flux.sha256)
  alga-bootstrap validate --config site.yaml --flux-manifests gotk-components.yaml""",
    "images": """
  # Talos node: an image cache for an air-gapped site
  alga-bootstrap images --config site.yaml | \\
    talosctl images cache-create --image-cache-path image-cache.oci --images=-
  # systemd host (k3s): pull them ahead
  alga-bootstrap images --config /etc/alga-bootstrap/config.yaml | xargs -n1 k3s crictl pull
  # workstation: what the built-in Alga preset needs
  alga-bootstrap images""",
    "completion": """
  # bash, for everyone on a systemd host
  alga-bootstrap completion bash > /etc/bash_completion.d/alga-bootstrap
  # bash, this shell only (a workstation)
  source <(alga-bootstrap completion bash)
  # zsh: a file named _alga-bootstrap in a directory on $fpath
  alga-bootstrap completion zsh > ~/.zfunc/_alga-bootstrap""",
    "version": """
  # systemd host or workstation
  alga-bootstrap version
  # from a checkout of this repository
  python -m agent version""",
}


def _epilog(command: str) -> str:
    return f"{EXIT_CODES_HELP}\n\nexamples:{EXAMPLES[command]}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alga-bootstrap",
        description="First-boot agent: installs the bundled Flux and hands the appliance over "
        "to it.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    config_help = (
        f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}, else "
        "the built-in Alga preset)"
    )

    def command(name: str, help_text: str, cluster: bool = False) -> argparse.ArgumentParser:
        """A subcommand with --config, --kubeconfig if it talks to a cluster, and the output
        and log flags."""
        cmd = sub.add_parser(
            name,
            help=help_text,
            epilog=_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "completion":
            return cmd
        if name != "version":
            cmd.add_argument("--config", type=Path, help=config_help)
        if cluster:
            cmd.add_argument(
                "--kubeconfig",
                type=Path,
                help="one kubeconfig file (default: cluster credentials from the config, "
                "else $KUBECONFIG, a list of files merged as kubectl does, else ~/.kube/config)",
            )
            cmd.add_argument(
                "--context",
                help="the kubeconfig context to use (default: its current-context); "
                "implies kubeconfig credentials",
            )
        # As kubectl, flux and talosctl: the answer on stdout, logs on stderr.
        shown = cmd.add_argument_group("output and logs")
        if name in ("status", "version", "validate", "images"):
            shown.add_argument(
                "--output",
                "-o",
                choices=output.FORMATS,
                default="text",
                help="text, or a JSON or YAML document with stable keys (see the README)",
            )
        shown.add_argument(
            "--log-level",
            choices=log.LEVELS,
            help="the least important log lines shown, on stderr (default: info for run, "
            "warning for the other commands and for run --dry-run)",
        )
        shown.add_argument(
            "--log-format",
            choices=["json", "console"],
            help="default: console when stderr is a terminal, JSON lines otherwise",
        )
        shown.add_argument(
            "--no-color",
            action="store_true",
            help="no colours, even on a terminal (also: NO_COLOR set to anything)",
        )
        return cmd

    run = command("run", "bootstrap the cluster (what the boot service runs)", cluster=True)
    run.add_argument(
        "--flux-manifests",
        type=Path,
        help="Flux bundle (`flux install --export`), overriding flux.manifests; "
        "its sha256 must still match flux.sha256",
    )
    run.add_argument(
        "--timeout",
        type=parse_duration,
        default=parse_duration("30m"),
        help="give up after this long (default 30m)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="overrule a refusal (exit 3): take over a Flux managed by another "
        "tool, downgrade Flux, re-target an existing sync",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print what a run would create, change and leave alone (server-side dry run); "
        "write nothing",
    )

    validate = command("validate", "check a config and the files it names, without a cluster")
    validate.add_argument("--flux-manifests", type=Path, help="check this bundle instead")

    status = command("status", "where the bootstrap and Flux stand (reads only)", cluster=True)
    status.add_argument("--flux-manifests", type=Path, help="the bundled Flux to compare with")
    status.add_argument(
        "--watch",
        "-w",
        action="store_true",
        help="look again until ready or failed (Ctrl-C stops): redrawn on a terminal, "
        "otherwise printed when it changes",
    )
    status.add_argument(
        "--timeout",
        type=parse_duration,
        default=parse_duration("5s"),
        help="how long to wait for the API on each look (default 5s)",
    )

    command(
        "images",
        "list the container images the first boot needs, one per line (for "
        "`talosctl images cache-create --images=-`)",
    )

    completion = command("completion", "print a shell completion script")
    completion.add_argument("shell", choices=["bash", "zsh"])
    command("version", "print the agent version and the Flux version it pins")
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # --timeout counts from here, library imports included
    args = build_parser().parse_args(argv)
    interrupt.install()
    # Only `run` narrates; other commands (and a dry run) print their answer, log warnings.
    narrates = args.command == "run" and not args.dry_run
    log.configure(
        getattr(args, "log_format", None),
        getattr(args, "log_level", None) or ("info" if narrates else "warning"),
        getattr(args, "no_color", False),
    )
    try:
        return _dispatch(args, started)
    except BootstrapError as err:
        message = log.redact(str(err))
        # Bad input is the one line below and nothing else; a failed run logs it too, so
        # that its log (Talos's service log) ends with the exit code.
        if args.command == "run" and err.exit_code != EXIT_BAD_INPUT:
            log.get("run").error(
                "run failed",
                error=message,
                exit_code=err.exit_code,
                seconds=round(time.monotonic() - started, 2),
            )
        print(f"alga-bootstrap: error: {log.one_line(message)}", file=sys.stderr)
        return err.exit_code
    except interrupt.Interrupted as stop:
        if args.command == "run":
            log.get("run").error(
                "run stopped",
                signal=stop.signal_name,
                exit_code=stop.exit_code,
                seconds=round(time.monotonic() - started, 2),
            )
        print(f"alga-bootstrap: {stop}", file=sys.stderr)
        return stop.exit_code
    except Exception as err:  # a bug: still one line, never a traceback or a secret
        message = log.redact(f"{type(err).__name__}: {err}")
        print(
            f"alga-bootstrap: internal error: {message}; a re-run may succeed, please report it",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace, started: float) -> int:
    if args.command == "version":
        return _version(args.output)
    if args.command == "validate":
        return _validate(args)
    if args.command == "images":
        from agent import config as config_module
        from agent.image_list import first_boot_images

        images = first_boot_images(config_module.load(args.config))
        if args.output == "text":
            print("\n".join(images))
        else:
            print(output.document({"images": images}, args.output))
        return EXIT_OK
    if args.command == "completion":
        from agent.completion import script

        print(script(args.shell, build_parser()))
        return EXIT_OK
    from agent import config as config_module
    from agent.credentials import check_machined_socket

    # run and status: off a Talos node, say so before the Kubernetes client is imported.
    config = config_module.load(args.config)
    check_machined_socket(config, args.kubeconfig, args.context)
    if args.command == "status":
        from agent import status

        return status.main(
            config,
            args.kubeconfig,
            args.flux_manifests,
            args.output,
            args.context,
            args.timeout,
            args.watch,
            log.colour_wanted(sys.stdout, args.no_color),
        )
    from agent.run import RunOptions, run

    results = run(
        RunOptions(
            config,
            args.kubeconfig,
            args.flux_manifests,
            args.timeout,
            args.force,
            args.dry_run,
            args.context,
            started,
        )
    )
    if args.dry_run:
        _print_plan(results)
    return EXIT_OK


def _print_plan(reports: list[StepReport]) -> None:
    """The dry run's ChangeSets: what a real run would write, and what it would leave alone."""
    entries = [change for report in reports for change in report.changes]
    writes = sum(1 for change in entries if change.action.writes)
    print(
        f"dry run: {writes} to create or change, {len(entries) - writes} left alone; "
        "nothing was written"
    )
    for report in reports:
        for change in report.changes:
            print(f"  [{report.name}] {change}")


def _version(fmt: str) -> int:
    """The agent's version and the Flux the default config pins; never an error."""
    from agent import bundle as flux_bundle
    from agent import config as config_module

    flux: dict[str, Any] | None = None
    try:
        pinned = config_module.load(None).flux
    except ConfigError:
        pass
    else:
        try:
            version = flux_bundle.load(pinned.manifests, pinned.sha256).version
        except ConfigError:
            version = None  # the bundle is not readable here
        flux = {"version": version, "sha256": pinned.sha256}
    if fmt != "text":
        print(output.document({"version": __version__, "flux": flux}, fmt))
    elif flux is None:
        print(f"alga-bootstrap {__version__}")
    else:
        shown = flux["version"] or "bundle not readable here"
        print(f"alga-bootstrap {__version__} (Flux {shown}, bundle sha256 {flux['sha256'][:12]})")
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from agent import bundle as flux_bundle
    from agent import config as config_module
    from agent.desired import check_manifests

    config = config_module.load(args.config)
    bundle = flux_bundle.load(args.flux_manifests or config.flux.manifests, config.flux.sha256)
    check_manifests(config, bundle.kinds)
    sync = config.sync
    if args.output == "text":
        print(
            f"{config.source}: valid (Flux {bundle.version}, sync {sync.url} "
            f"{sync.ref.describe()} {sync.path})"
        )
        return EXIT_OK
    answer = {
        "config": config.source,
        "valid": True,
        "flux": {"version": bundle.version, "sha256": config.flux.sha256},
        "sync": {"url": sync.url, "ref": sync.ref.as_spec(), "path": sync.path},
    }
    print(output.document(answer, args.output))
    return EXIT_OK
