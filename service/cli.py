"""`audience-sync` command line: one subcommand per job (docs/design.md "Command line")."""

from __future__ import annotations

import argparse
import logging
import sys

from service.config import ConfigError, load_settings


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(_: argparse.Namespace) -> int:
    from service.commands.run import run

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"audience-sync: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
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
