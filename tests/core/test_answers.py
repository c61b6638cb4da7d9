import pytest

from service.core.answers import CODE_TABLE, Answer, Verdict, classify

RETRY_CODES = [
    40100,
    40132,
    61000,
    50000,
    50002,
    51000,
    51003,
    51010,
    51063,
    51099,
    52000,
    52204,
    60001,
    40202,
]
AUTH_CODES = [40101, 40102, 40104, 40105, 40107, 40113, 40130]
PERMISSION_CODES = [40001, 40003, 40118, 40125, 40300, 40301, 40302]
REJECTED_CODES = [40000, 40002, 40011, 40062]


@pytest.mark.parametrize("code", [0, 20001])
def test_success(code: int) -> None:
    assert classify(200, code) is Verdict.SUCCESS


@pytest.mark.parametrize("code", RETRY_CODES)
def test_retryable_codes(code: int) -> None:
    assert classify(200, code) is Verdict.RETRY


@pytest.mark.parametrize("code", AUTH_CODES)
def test_auth_codes(code: int) -> None:
    assert classify(200, code) is Verdict.AUTH


@pytest.mark.parametrize("code", PERMISSION_CODES)
def test_permission_codes(code: int) -> None:
    assert classify(200, code) is Verdict.PERMISSION


@pytest.mark.parametrize("code", REJECTED_CODES)
def test_payload_codes(code: int) -> None:
    assert classify(200, code) is Verdict.REJECTED


def test_batch_too_large_splits() -> None:
    assert classify(200, 40061) is Verdict.SPLIT
    assert classify(413, None) is Verdict.SPLIT


def test_customer_file_codes() -> None:
    assert classify(200, 40907) is Verdict.SPLIT  # FILE_TOO_LARGE: write smaller files
    assert [classify(200, c) for c in (40906, 40908, 40909)] == [Verdict.REJECTED] * 3
    assert [classify(200, c) for c in (40905, 40910)] == [Verdict.RETRY] * 2  # upload the file again
    assert Answer(Verdict.SPLIT, 200, 40907, "").code_label == "40907"


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_http(status: int) -> None:
    assert classify(status, None) is Verdict.RETRY


def test_transport_failure_retries() -> None:
    assert classify(None, None) is Verdict.RETRY


def test_2xx_without_envelope_is_not_tiktok_speaking() -> None:
    """A proxy's 200 page: nothing is known to be applied, and nothing is known about the rows either."""
    assert classify(200, None) is Verdict.ENDPOINT


def test_unknown_code_is_retried_within_the_budget() -> None:
    assert 49999 not in CODE_TABLE
    assert classify(200, 49999) is Verdict.RETRY


def test_other_4xx() -> None:
    assert classify(401, None) is Verdict.AUTH
    assert classify(403, 40001) is Verdict.PERMISSION
    assert classify(400, 40002) is Verdict.REJECTED
    assert classify(400, 40105) is Verdict.AUTH


@pytest.mark.parametrize("status", [400, 403, 404, 405, 410])
def test_a_page_that_is_not_tiktok_is_an_endpoint_problem_never_a_row_refusal(status: int) -> None:
    """A wrong TIKTOK_API_URL or a gateway answers an HTML 404/400: bisecting it into N letters was defect 4."""
    assert classify(status, None) is Verdict.ENDPOINT


def test_object_does_not_exist_is_its_own_verdict() -> None:
    """40007 was an unknown code, retried until every row of the advertiser was dead-lettered (defect 4)."""
    assert classify(200, 40007) is Verdict.NOT_FOUND


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (0, "0"),
        (40100, "40100"),
        (40002, "40002"),
        (51063, "51xxx"),
        (52204, "52xxx"),
        (49999, "other"),
        (None, "none"),
    ],
)
def test_code_label_is_bounded(code: int | None, label: str) -> None:
    answer = Answer(classify(200, code), 200, code, "")
    assert answer.code_label == label


def test_code_labels_have_bounded_cardinality() -> None:
    labels = {Answer(Verdict.RETRY, 200, c, "").code_label for c in range(0, 100_000, 7)}
    assert len(labels) <= len(CODE_TABLE) + 4, "one series per known code, never one per arbitrary code"
