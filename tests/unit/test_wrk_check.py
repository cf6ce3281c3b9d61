"""The wrk outside check: its script and the parsing of wrk's report."""

from __future__ import annotations

import json

from benchmarks.wrk_check import lua_script, parse_wrk

WRK_OUTPUT = """Running 15s test @ http://127.0.0.1:8000
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    57.10ms   20.11ms 210.42ms   71.23%
    Req/Sec   281.55     40.12   370.00     70.00%
  Latency Distribution
     50%   54.20ms
     75%   66.01ms
     90%   81.37ms
     99%  131.02ms
  8431 requests in 15.01s, 2.01MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:    561.70
Transfer/sec:    137.12KB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    r = parse_wrk(WRK_OUTPUT)
    # The rate is answered-200 only: (8431 - 5) / 15.01 s, not wrk's 561.70 (which counts refusals).
    assert r == {"rps": 561.36, "p50_ms": 54.2, "p99_ms": 131.02, "non_2xx": 5, "socket_errors": 3}
    assert parse_wrk(WRK_OUTPUT.replace("99%  131.02ms", "99%    1.20s"))["p99_ms"] == 1200.0


def test_lua_script_posts_every_text_as_json() -> None:
    texts = ['say "hi"', "can I see you in the kitchen?"]
    script = lua_script(texts)
    assert 'wrk.method = "POST"' in script and '"/classify"' in script
    for t in texts:
        assert json.dumps(json.dumps({"text": t})) in script


def test_goodput_counts_only_answered_200() -> None:
    from benchmarks.goodput import parse_wrk_counts

    counts = parse_wrk_counts(WRK_OUTPUT.replace("Non-2xx or 3xx responses: 5", "Non-2xx or 3xx responses: 8000"))
    assert counts["ok_rps"] == round(431 / 15.01, 2) and counts["non_2xx"] == 8000 and counts["socket_errors"] == 3


def test_goodput_wrk_script_posts_each_endpoint() -> None:
    from benchmarks.goodput import GoodputSettings, wrk_script

    s = GoodputSettings()
    assert '"/classify"' in wrk_script("classify", s, bodies=3)
    generate = wrk_script("generate", s, bodies=3)
    assert '"/generate"' in generate and '\\"steps\\": 4' in generate and '\\"width\\": 128' in generate
