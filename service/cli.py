"""`audience-sync` command line: one subcommand per job (docs/design.md "Command line")."""

from __future__ import annotations

import argparse
import os
import sys

from service.config import ConfigError, load_settings
from service.logs import DEFAULT_FORMAT, LOG_FORMATS, setup_logging


def _setup_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """stderr, in LOG_FORMAT (text or json; README "Logs"). `run` passes its validated settings; for the other
    subcommands an unknown LOG_FORMAT falls back to text here (those that load the settings refuse it)."""
    if log_format is None:
        wanted = os.environ.get("LOG_FORMAT", "").strip().lower()
        log_format = wanted if wanted in LOG_FORMATS else DEFAULT_FORMAT
    setup_logging(level, log_format)


def cmd_run(_: argparse.Namespace) -> int:
    from service.commands.run import run

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"audience-sync: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level, settings.log_format)
    try:
        return run(settings)
    except ConfigError as exc:
        print(f"audience-sync: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="audience-sync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="the service: consume, sync to TikTok, dead-letter, serve /metrics").set_defaults(
        fn=cmd_run
    )
    # Subcommands with their own argument parsers take the rest of the line as is.
    passthrough = {
        "sandbox": ("a local TikTok Business API stand-in", "service.devtools.sandbox.server"),
        "produce-sample": ("publish realistic sample events", "service.devtools.sample"),
        "demo": ("broker + sandbox + service + sample traffic on this machine (make run)", "service.devtools.demo"),
        "replay": ("re-process or re-publish dead-lettered records", "service.commands.replay"),
        "dlq": ("inspect the dead-letter topic (`dlq inspect`)", "service.commands.dlq_inspect"),
        "audiences": ("create / list / get TikTok audiences", "service.commands.audiences"),
        "doctor": ("preflight: broker, topics, token, advertisers, audiences, mappings", "service.commands.doctor"),
        "refresh": ("replace a file audience's members with a snapshot (REPLACE)", "service.commands.refresh"),
    }
    for name, (help_text, _) in passthrough.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if argv and argv[0] in passthrough:
        import importlib

        _setup_logging()
        module = importlib.import_module(passthrough[argv[0]][1])
        rc: int = module.main(argv[1:])
        return rc
    args = parser.parse_args(argv)
    rc2: int = args.fn(args)
    return rc2
