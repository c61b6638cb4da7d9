"""`audience-sync audiences create | list | get`: manage TikTok audiences from the command line.

Operators use this to find or create the audience id a mappings entry needs, often from a laptop with no Kafka
in reach, so only TikTok settings are read (KAFKA_BOOTSTRAP_SERVERS is not required). Output is an aligned
table, or JSON with `--json`. Exit codes: 0 done, 1 TikTok refused or was unreachable, 2 bad arguments or
configuration. The access token is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.config import DEFAULT_TIKTOK_API_URL, ConfigError
from service.tiktok.audiences_api import (
    PAGE_SIZE_MAX,
    AudienceInfo,
    AudiencesApi,
    CreatedAudience,
    TikTokApiError,
    open_api,
)

PROG = "audience-sync audiences"


class TikTokSettings(BaseSettings):
    """The subset of `service.config.Settings` a TikTok-only tool needs, with the same names and rules."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_ignore_empty=True)

    tiktok_api_url: str = DEFAULT_TIKTOK_API_URL
    tiktok_access_token: SecretStr | None = None
    tiktok_access_token_file: Path | None = None
    tiktok_timeout_s: float = Field(10.0, gt=0)
    tiktok_control_qps: float = Field(1.0, gt=0)

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, *args: Any, **kw: Any) -> Any:
        return (init_settings,)  # the environment is handed over explicitly, as in `load_settings`

    @field_validator("tiktok_api_url")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    def token(self) -> str:
        """Read once: a command-line run is too short for token rotation to matter."""
        if self.tiktok_access_token_file is not None:
            try:
                text = self.tiktok_access_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"TIKTOK_ACCESS_TOKEN_FILE: cannot read {self.tiktok_access_token_file}: {exc.strerror or exc}"
                ) from None
            if not text:
                raise ConfigError(f"TIKTOK_ACCESS_TOKEN_FILE: {self.tiktok_access_token_file} is empty")
            return text
        if self.tiktok_access_token is not None and self.tiktok_access_token.get_secret_value().strip():
            return self.tiktok_access_token.get_secret_value().strip()
        raise ConfigError("TIKTOK_ACCESS_TOKEN or TIKTOK_ACCESS_TOKEN_FILE must be set")


def load_tiktok_settings(environ: Mapping[str, str]) -> TikTokSettings:
    fields = TikTokSettings.model_fields
    values = {k.lower(): v for k, v in environ.items() if k.lower() in fields and v != ""}
    try:
        return TikTokSettings.model_validate(values)
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = "_".join(str(x) for x in err["loc"]).upper()
            parts.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}")
        raise ConfigError("configuration error: " + "; ".join(parts)) from None


def _digits(value: str) -> str:
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"must be a TikTok id (digits), got {value!r}")
    return text


def _page_size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an integer") from None
    if not 1 <= n <= PAGE_SIZE_MAX:
        raise argparse.ArgumentTypeError(f"must be between 1 and {PAGE_SIZE_MAX}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--advertiser", required=True, type=_digits, metavar="ID", help="TikTok advertiser id")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    c = sub.add_parser("create", help="create a Partner audience (names over 70 characters are truncated)")
    common(c)
    c.add_argument("--name", required=True, help="audience name")
    ls = sub.add_parser("list", help="every audience of an advertiser (all pages)")
    common(ls)
    ls.add_argument("--page-size", type=_page_size, default=PAGE_SIZE_MAX, help=f"per request [{PAGE_SIZE_MAX}]")
    g = sub.add_parser("get", help="details of audiences by id (100 per request)")
    common(g)
    g.add_argument("audience_ids", nargs="+", type=_digits, metavar="AUDIENCE_ID")
    return p


COLUMNS: tuple[tuple[str, str], ...] = (
    ("AUDIENCE_ID", "audience_id"),
    ("NAME", "name"),
    ("MEMBERS", "cover_num"),
    ("VALID", "is_valid"),
    ("TYPE", "type"),
    ("CREATED", "create_time"),
    ("EXPIRES", "expired_time"),
)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("\n", " ")


def render_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """Aligned columns; the last column is not padded so lines carry no trailing spaces."""
    cells = [[title for title, _ in columns]] + [[_cell(r.get(key, "")) for _, key in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def render_created(created: CreatedAudience) -> str:
    text = f'created audience {created.audience_id} "{created.name}" for advertiser {created.advertiser_id}'
    if created.truncated:
        text += f'\nnote: the requested name has {len(created.requested_name)} characters; TikTok keeps 70 (67 + "...")'
    return text


def created_json(created: CreatedAudience) -> dict[str, Any]:
    return {
        "audience_id": created.audience_id,
        "advertiser_id": created.advertiser_id,
        "name": created.name,
        "requested_name": created.requested_name,
        "truncated": created.truncated,
    }


def audiences_json(advertiser_id: str, audiences: Sequence[AudienceInfo]) -> dict[str, Any]:
    return {"advertiser_id": advertiser_id, "count": len(audiences), "audiences": [a.to_json() for a in audiences]}


async def _execute(args: argparse.Namespace, api: AudiencesApi) -> str:
    if args.action == "create":
        created = await api.create_audience(args.advertiser, args.name)
        return _dump(created_json(created)) if args.json else render_created(created)
    if args.action == "list":
        found = await api.list_audiences(args.advertiser, page_size=args.page_size)
    else:
        found = await api.get_audiences(args.advertiser, args.audience_ids)
    if args.json:
        return _dump(audiences_json(args.advertiser, found))
    if not found:
        return f"no audiences for advertiser {args.advertiser}"
    return render_table([a.to_json() for a in found])


def _dump(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()


async def _run(args: argparse.Namespace, settings: TikTokSettings, token: str) -> str:
    async with open_api(
        settings.tiktok_api_url,
        lambda: token,
        timeout_s=settings.tiktok_timeout_s,
        control_qps=settings.tiktok_control_qps,
    ) as api:
        return await _execute(args, api)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "create" and not args.name.strip():
        print(f"{PROG}: --name must not be empty", file=sys.stderr)
        return 2
    try:
        settings = load_tiktok_settings(os.environ if environ is None else environ)
        token = settings.token()
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        out = asyncio.run(_run(args, settings, token))
    except TikTokApiError as exc:
        print(f"{PROG}: {exc.one_line()}", file=sys.stderr)
        return 1
    sys.stdout.write(out + "\n")
    return 0
