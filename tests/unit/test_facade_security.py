"""Issue 26 item 7, through the facade in-process (httpx.ASGITransport against api.app.create_app):
wrong keys limited per client, the Host allow-list, the prompt cache's counters off the public
/metrics, and a facade that refuses to start on a placeholder key."""

from __future__ import annotations

import asyncio
import logging
import secrets

import httpx
import pytest
from pydantic import SecretStr

from api.app import create_app
from api.auth_limit import FailedAuthLimiter, client_id
from api.host_check import HostCheckMiddleware, allowed_hosts, host_name
from api.settings import ApiSettings
from common.secret_strength import SecretConfigError
from contract.specs import PROMPT_CACHE_METRIC

KEY = secrets.token_urlsafe(24)
ORIGIN = "http://127.0.0.1:8080"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _jobs_in_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.delenv("FLUXSERVE_JOBS_REDIS_URL", raising=False)


def app_with(**settings):
    return create_app(ApiSettings(keys=f"ops:{KEY}", triton_metrics_url=None, **settings))


def call(app, method: str, path: str, client: str = "127.0.0.1", base: str = ORIGIN, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url=base) as http:
            return await http.request(method, path, **kwargs)

    return asyncio.run(go())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ----------------------------------------------------------------------------- failed key attempts


def test_wrong_keys_get_429_with_retry_after_after_the_burst(caplog) -> None:
    app = app_with(auth_failure_burst=3, auth_failure_refill_s=20)
    clock = Clock()
    app.state.fluxserve.auth_failures = FailedAuthLimiter(3, 20, clock=clock)
    caplog.clear()  # the start-up lines (which keys were loaded) are not about failures
    with caplog.at_level(logging.DEBUG):
        statuses = [
            call(app, "GET", "/train", headers=bearer("w" + secrets.token_hex(12))).status_code for _ in range(3)
        ]
        assert statuses == [401, 401, 401]
        limited = call(app, "GET", "/train", headers=bearer("w" + secrets.token_hex(12)))
        right_key = call(app, "GET", "/train", headers=bearer(KEY))  # not even looked at while limited
    assert limited.status_code == 429 and right_key.status_code == 429
    assert limited.headers["retry-after"] == "20"
    assert limited.json()["error"] == {
        "type": "too_many_requests",
        "message": "too many wrong operator keys from this client; try again in 20 s",
    }
    # No INFO line per failure; one WARNING when the client became limited.
    auth_lines = [r for r in caplog.records if r.name.startswith("api.auth")]
    assert not [r for r in auth_lines if r.levelno == logging.INFO]
    assert [r.levelno for r in auth_lines if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert KEY not in caplog.text
    # Another client is not limited by this one's guesses; this one gets one more try per refill.
    assert call(app, "GET", "/train", client="10.1.2.3", headers=bearer(KEY)).status_code == 200
    clock.now += 19.5
    assert call(app, "GET", "/train", headers=bearer(KEY)).headers["retry-after"] == "1"
    clock.now += 0.5
    assert call(app, "GET", "/train", headers=bearer(KEY)).status_code == 200


def test_missing_keys_are_not_counted_as_guesses() -> None:
    app = app_with(auth_failure_burst=2)
    for _ in range(5):
        assert call(app, "GET", "/train").status_code == 401
    assert call(app, "GET", "/train", headers=bearer(KEY)).status_code == 200


def test_limiter_forgets_refilled_clients_and_stays_bounded() -> None:
    clock = Clock()
    limiter = FailedAuthLimiter(burst=2, refill_s=1, max_clients=100, clock=clock)
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) <= 100
    limiter.failed("10.9.9.9")
    limiter.failed("10.9.9.9")
    assert limiter.retry_after("10.9.9.9") == pytest.approx(1.0)
    clock.now += 5  # every bucket refilled: the next newcomer finds room without evicting a limited one
    assert limiter.retry_after("10.9.9.9") is None


def test_ipv6_clients_are_limited_by_their_64() -> None:
    assert client_id("2001:db8::1") == client_id("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_id("2001:db8:0:1::1") != client_id("2001:db8::1")
    assert client_id("::ffff:10.0.0.1") == "10.0.0.1" and client_id("10.0.0.1") == "10.0.0.1"
    assert client_id(None) == "unknown"


# ----------------------------------------------------------------------------- Host allow-list


@pytest.mark.parametrize(
    "base", ["http://127.0.0.1:8080", "http://localhost:1", "http://LOCALHOST", "http://[::1]:8080", "http://127.0.0.1"]
)
def test_loopback_names_are_served(base: str) -> None:
    assert call(app_with(), "GET", "/healthz", base=base).status_code == 200


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8080",
        "127.0.0.1.evil.example",
        "localhost.evil.example",
        "localhost.",
        "localhost:8080:80",
        "localhost:x",
        "::1",  # an IPv6 address must be bracketed
        "[::1",
        "",
    ],
)
def test_other_hosts_get_a_400_envelope(host: str) -> None:
    app = app_with()
    for method, path in [("GET", "/healthz"), ("POST", "/classify"), ("GET", "/train")]:
        r = call(app, method, path, headers={"Host": host, **bearer(KEY)})
        assert r.status_code == 400, (host, path, r.text)
        assert r.json()["error"]["type"] == "invalid_host"
        assert "FLUXSERVE_API_ALLOWED_HOSTS" in r.json()["error"]["message"]


def test_allowed_hosts_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("FLUXSERVE_API_ALLOWED_HOSTS", "api, fluxserve-api.ml.svc ,127.0.0.1")
    settings = ApiSettings()
    assert settings.allowed_hosts == ("api", "fluxserve-api.ml.svc", "127.0.0.1")
    app = create_app(settings.model_copy(update={"keys": SecretStr(f"ops:{KEY}")}))
    assert call(app, "GET", "/healthz", base="http://api:8080").status_code == 200
    assert call(app, "GET", "/healthz", base="http://fluxserve-api.ml.svc").status_code == 200
    assert call(app, "GET", "/healthz", base="http://localhost:8080").status_code == 400  # not listed any more


def test_star_switches_the_check_off_and_a_single_bind_address_is_allowed() -> None:
    assert call(app_with(allowed_hosts=("*",)), "GET", "/healthz", base="http://anything").status_code == 200
    assert call(app_with(host="10.0.0.5"), "GET", "/healthz", base="http://10.0.0.5:8080").status_code == 200
    assert "0.0.0.0" not in allowed_hosts(("localhost",), "0.0.0.0")
    assert allowed_hosts(("::1", "Api"), "::") == {"[::1]", "api"}


def test_host_name_parsing() -> None:
    assert host_name("[::1]:8080") == "[::1]" and host_name("LocalHost:80") == "localhost"
    assert host_name("localhost:") == "localhost" and host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("a:b:c") is None and host_name("localhost:²") is None and host_name("[]") is None


def test_a_request_without_host_is_refused() -> None:
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:  # never reached
        raise AssertionError

    async def send(message: dict) -> None:
        sent.append(message)

    middleware = HostCheckMiddleware(app, allowed_hosts(("localhost",), "127.0.0.1"))
    asyncio.run(middleware({"type": "http", "headers": [], "method": "GET", "path": "/"}, None, send))
    assert sent[0]["status"] == 400 and b"Host header is required" in sent[1]["body"]


# ----------------------------------------------------------------------------- /metrics


def test_prompt_cache_counters_only_for_the_operator(triton_metrics_url: str) -> None:
    app = create_app(ApiSettings(keys=f"ops:{KEY}", triton_metrics_url=triton_metrics_url))
    public = call(app, "GET", "/metrics")
    assert public.status_code == 200 and "fluxserve_http_requests_total" in public.text
    assert PROMPT_CACHE_METRIC not in public.text and "prompt_cache" not in public.text
    operator = call(app, "GET", "/metrics", headers=bearer(KEY))
    assert f'{PROMPT_CACHE_METRIC}{{result="hit"}} 3' in operator.text
    wrong = call(app, "GET", "/metrics", headers=bearer("w" + secrets.token_hex(12)))
    assert wrong.status_code == 401 and PROMPT_CACHE_METRIC not in wrong.text


# ----------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("keys", ["operator:change-me-change-me", "ops:short", "ops:" + "a" * 32])
def test_facade_refuses_to_start_on_a_placeholder_or_weak_key(keys: str) -> None:
    with pytest.raises(SecretConfigError, match="^FLUXSERVE_API_KEYS"):
        create_app(ApiSettings(keys=keys))
