"""service/kafka/msk_iam.py and its wiring in service/config.py: MSK IAM through SASL/OAUTHBEARER, without AWS.

The signer presigns a URL locally from the credentials in the environment; the `no_network` fixture proves that no
socket is opened while a token is made.
"""

from __future__ import annotations

import base64
import logging
import socket
import sys
import time
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from service.commands.doctor import admin_config
from service.config import (
    ConfigError,
    client_config,
    consumer_config,
    kafka_passthrough,
    load_settings,
    mask,
    producer_config,
)
from service.kafka import msk_iam
from service.kafka.dlq_reader import reader_config
from service.kafka.msk_iam import INSTALL_HINT, MskIamTokenProvider

ROOT = Path(__file__).resolve().parents[2]
ACCESS_KEY = "AKIAFAKEFAKEFAKE1234"
SECRET_KEY = "fakeSecretKeyFakeSecretKeyFakeSecretKey0"  # 40 characters, like a real one
REGION = "eu-west-1"
BASE = {"KAFKA_BOOTSTRAP_SERVERS": "b-1.msk.example:9098", "TIKTOK_ACCESS_TOKEN": "tok-123"}
MSK = {**BASE, "KAFKA_MSK_IAM_REGION": REGION}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake static credentials only: no profile, role, container or instance-metadata source is consulted."""
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _decode(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


# -- the token callback ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("aws_env", "no_network")
def test_oauth_cb_returns_a_locally_signed_token_and_an_expiry_in_epoch_seconds() -> None:
    before = time.time()
    token, expiry = MskIamTokenProvider(REGION)("sasl.oauthbearer.config value, unused")

    assert token
    url = _decode(token)
    assert url.startswith(f"https://kafka.{REGION}.amazonaws.com/?Action=kafka-cluster%3AConnect")
    assert f"X-Amz-Credential={ACCESS_KEY}%2F" in url and f"%2F{REGION}%2Fkafka-cluster%2Faws4_request" in url
    assert "X-Amz-Signature=" in url and SECRET_KEY not in url
    assert isinstance(expiry, float)
    # seconds, not milliseconds: the signer's tokens live 900 s (the signing time is truncated to the second)
    assert before < expiry <= time.time() + 900 + 1


@pytest.mark.usefixtures("no_network")
def test_signer_failure_is_logged_without_secrets_and_re_raised(caplog: pytest.LogCaptureFixture) -> None:
    def generate_auth_token(region: str) -> tuple[str, int]:
        raise ValueError(f"signing failed with key {ACCESS_KEY} and secret {SECRET_KEY}")

    signer = types.ModuleType("fake_signer")
    signer.generate_auth_token = generate_auth_token  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger=msk_iam.__name__), pytest.raises(ValueError):
        MskIamTokenProvider(REGION, signer)(None)

    assert f"region {REGION}" in caplog.text and "ValueError" in caplog.text
    assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text
    assert all(r.exc_info is None for r in caplog.records), "one line, no traceback"


@pytest.mark.usefixtures("aws_env", "no_network")
def test_missing_credentials_raise_from_the_callback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with caplog.at_level(logging.ERROR, logger=msk_iam.__name__), pytest.raises(Exception):  # noqa: B017
        MskIamTokenProvider(REGION)(None)
    assert "cannot sign an auth token" in caplog.text


@pytest.mark.usefixtures("aws_env")
def test_confluent_kafka_accepts_the_callback_and_calls_it_at_creation() -> None:
    """The real client: it asks for the first token in its constructor (no poll needed); a bad tuple would fail."""
    conf = producer_config(load_settings(MSK), MSK)
    calls: list[float] = []
    provider = conf["oauth_cb"]

    def counting(cfg: Any) -> tuple[str, float]:
        token, expiry = provider(cfg)
        calls.append(expiry)
        return token, expiry

    conf.update({"oauth_cb": counting, "bootstrap.servers": "127.0.0.1:9", "log_level": "0"})
    p = Producer(conf)
    try:
        assert len(calls) == 1
    finally:
        p.flush(0)


# -- config builders ---------------------------------------------------------------------------------------------


def _all_configs(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every kind of client config the service builds (the audience store gets client_config)."""
    s = load_settings(environ)
    return {
        "consumer": consumer_config(s, environ),
        "client": client_config(s, environ),
        "producer": producer_config(s, environ),
        "doctor admin": admin_config(s, environ),
        "tool reader": reader_config(s, environ, None),
    }


def test_no_region_no_sasl_and_no_callback() -> None:
    for name, conf in _all_configs(dict(BASE)).items():
        assert not {"oauth_cb", "security.protocol", "sasl.mechanism"} & set(conf), name


@pytest.mark.usefixtures("aws_env")
def test_region_adds_sasl_oauthbearer_and_the_callback_to_every_client() -> None:
    assert load_settings(MSK).kafka_msk_iam_region == REGION
    for name, conf in _all_configs(dict(MSK)).items():
        assert conf["security.protocol"] == "SASL_SSL", name
        assert conf["sasl.mechanism"] == "OAUTHBEARER", name
        assert isinstance(conf["oauth_cb"], MskIamTokenProvider) and conf["oauth_cb"].region == REGION, name
        assert not any("msk" in key for key in conf if key != "oauth_cb"), name
    assert kafka_passthrough(MSK) == {}, "KAFKA_MSK_IAM_REGION is a setting, not a librdkafka property"


@pytest.mark.usefixtures("aws_env")
def test_explicit_passthrough_wins_over_the_msk_defaults() -> None:
    environ = {**MSK, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "oauthbearer"}
    for name, conf in _all_configs(environ).items():
        assert conf["security.protocol"] == "SASL_PLAINTEXT", name
        assert conf["sasl.mechanism"] == "oauthbearer", name
        assert isinstance(conf["oauth_cb"], MskIamTokenProvider), name


def test_another_sasl_mechanism_with_the_region_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**MSK, "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"})
    assert "KAFKA_MSK_IAM_REGION" in str(info.value) and "KAFKA_SASL_MECHANISM" in str(info.value)


@pytest.mark.parametrize("region", ["eu west 1", "EU-WEST-1", "https://kafka.eu-west-1.amazonaws.com"])
def test_malformed_region_is_a_config_error(region: str) -> None:
    with pytest.raises(ConfigError, match="KAFKA_MSK_IAM_REGION"):
        load_settings({**BASE, "KAFKA_MSK_IAM_REGION": region})


@pytest.mark.usefixtures("aws_env", "no_network")
def test_token_never_appears_in_the_logged_effective_config(caplog: pytest.LogCaptureFixture) -> None:
    conf: dict[str, object] = dict(consumer_config(load_settings(MSK), MSK))
    token, _ = conf["oauth_cb"](None)  # type: ignore[operator]
    with caplog.at_level(logging.INFO):
        logging.getLogger("service.commands.run").info("starting: kafka=%s", mask(conf))  # as app.serve logs it
    assert token not in caplog.text and token[:40] not in caplog.text
    assert SECRET_KEY not in caplog.text and ACCESS_KEY not in caplog.text
    assert f"<MSK IAM token provider region={REGION}>" in caplog.text


# -- the optional extra ------------------------------------------------------------------------------------------


def test_missing_signer_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", None)
    monkeypatch.setitem(sys.modules, msk_iam.SIGNER_MODULE, None)
    with pytest.raises(ConfigError) as info:
        load_settings(MSK)
    msg = str(info.value)
    assert "KAFKA_MSK_IAM_REGION" in msg and INSTALL_HINT in msg and "\n" not in msg
    # without the region nothing is imported, so the package stays optional
    assert load_settings(BASE).kafka_msk_iam_region is None
    assert "oauth_cb" not in producer_config(load_settings(BASE), BASE)


def test_install_hint_matches_the_project_and_its_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"pip install '{project['name']}[msk]'" == INSTALL_HINT
    signer = [d for d in project["optional-dependencies"]["msk"] if d.startswith("aws-msk-iam-sasl-signer-python")]
    assert signer and signer[0] in project["optional-dependencies"]["dev"]
