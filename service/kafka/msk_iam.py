"""Amazon MSK IAM access control for librdkafka: SASL/OAUTHBEARER with a token from AWS's signer library.

librdkafka has no `AWS_MSK_IAM` mechanism. MSK also accepts OAUTHBEARER whose token is a SigV4-presigned
`kafka-cluster:Connect` URL; `aws-msk-iam-sasl-signer-python` builds it locally from the default AWS credential
chain (environment, web identity / IRSA, container or instance role), and confluent-kafka asks for a fresh one
through the `oauth_cb` callback before the old one expires. The signer is an optional extra, imported only when
`KAFKA_MSK_IAM_REGION` is set.
"""

from __future__ import annotations

import importlib
import logging
import re
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

SIGNER_MODULE = "aws_msk_iam_sasl_signer.MSKAuthTokenProvider"
INSTALL_HINT = "pip install 'tiktok-audience-sync[msk]'"

# librdkafka properties the region turns on (each overridable through KAFKA_<PROPERTY>).
SASL_DEFAULTS: dict[str, str] = {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}

# AWS access key ids, and long base64 runs (secret keys, session tokens, signatures): never in a log line.
_SECRET_SHAPES = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b|[A-Za-z0-9/+=_-]{40,}")


class SignerUnavailable(ImportError):
    """The optional signer library is not installed; the message says how to install it."""


def load_signer() -> ModuleType:
    try:
        return importlib.import_module(SIGNER_MODULE)
    except ImportError as exc:
        raise SignerUnavailable(
            f"KAFKA_MSK_IAM_REGION is set but the AWS MSK IAM signer is not installed ({exc.name or exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from None


def _redact(text: str) -> str:
    return _SECRET_SHAPES.sub("***", text)[:300]


class MskIamTokenProvider:
    """confluent-kafka's `oauth_cb`: `(sasl.oauthbearer.config) -> (token, expiry in epoch seconds)`.

    A signer failure is logged (type and message, secrets redacted, no token) and re-raised: confluent-kafka
    then marks the token refresh as failed and librdkafka reports a SASL authentication failure.
    """

    def __init__(self, region: str, signer: ModuleType | None = None) -> None:
        self.region = region
        self._signer = signer if signer is not None else load_signer()

    def __call__(self, _oauthbearer_config: Any = None) -> tuple[str, float]:
        try:
            token, expiry_ms = self._signer.generate_auth_token(self.region)
        except Exception as exc:
            log.error(
                "MSK IAM: cannot sign an auth token for region %s (are AWS credentials available: IRSA, instance "
                "or task role, AWS_* variables?): %s: %s",
                self.region,
                type(exc).__name__,
                _redact(str(exc)),
            )
            raise
        return str(token), int(expiry_ms) / 1000.0

    def __repr__(self) -> str:  # what the masked startup log shows as `oauth_cb`
        return f"<MSK IAM token provider region={self.region}>"
