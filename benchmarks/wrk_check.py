"""`fluxserve-bench wrk`: /classify through the facade vs the prototype architecture, driven by wrk.

The Python load generator of `fluxserve-bench run` shares this machine's cores with the servers it
measures, and at high request rates it is the bottleneck of both sides. wrk (C, Debian's `wrk`
package) costs far less per request, so its ratio is the outside check: 32 connections, the same
duration per side, the same chat messages (a Lua script cycles through them).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.goodput import parse_wrk_counts
from benchmarks.servers import CAPACITY_ENV, CLASSIFY_STACK, LOG_DIR, MODEL_REPOSITORY, baseline, facade, triton
from benchmarks.workload import chat_texts
from common.paths import CLASSIFIER_MODEL_DIR

log = logging.getLogger(__name__)

RESULT_FILE = Path(__file__).resolve().parent / "results" / "wrk.json"
UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class WrkSettings:
    connections: int = 32
    threads: int = 2
    duration_s: int = 15
    texts: int = 200
    out: Path = RESULT_FILE
    log_dir: Path = LOG_DIR


def lua_script(texts: list[str]) -> str:
    """A wrk script POSTing {"text": ...} bodies, one message after another."""
    bodies = ",\n".join(json.dumps(json.dumps({"text": t})) for t in texts)
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{bodies}\n}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        '  return wrk.format(nil, "/classify", nil, bodies[i])\n'
        "end\n"
    )


def _seconds(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(m.group(1)) * UNITS_S[m.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Answered-200 requests/s (`rps`: wrk's total rate less its non-2xx share; a refusal is not
    throughput), p50/p99 latency (ms, over every response) and error counts from `wrk --latency`."""
    counts = parse_wrk_counts(output)
    pct = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", output, re.MULTILINE))
    return {
        "rps": counts["ok_rps"],
        "p50_ms": round(_seconds(pct["50"]) * 1000, 2) if "50" in pct else None,
        "p99_ms": round(_seconds(pct["99"]) * 1000, 2) if "99" in pct else None,
        "non_2xx": counts["non_2xx"],
        "socket_errors": counts["socket_errors"],
    }


def run_wrk(url: str, script: Path, s: WrkSettings) -> dict[str, Any]:
    cmd = ["wrk", f"-t{s.threads}", f"-c{s.connections}", f"-d{s.duration_s}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=s.duration_s + 60).stdout
    return parse_wrk(out)


def wrk_check(s: WrkSettings | None = None) -> dict[str, Any]:
    s = s or WrkSettings()
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    result: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "classify.lua"
        script.write_text(lua_script(chat_texts()[: s.texts]))
        with triton(MODEL_REPOSITORY, CLASSIFY_STACK, s.log_dir, tag="wrk") as server:
            with facade(server.grpc_url, CLASSIFY_STACK[:1], s.log_dir, extra_env=CAPACITY_ENV) as api:
                result["facade"] = run_wrk(api.url, script, s)
        log.info("facade: %s", result["facade"])
        with baseline(CLASSIFIER_MODEL_DIR, False, s.log_dir) as base:
            result["baseline"] = run_wrk(base.url, script, s)
        log.info("baseline: %s", result["baseline"])
    result["speedup"] = round(result["facade"]["rps"] / result["baseline"]["rps"], 2)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps(result, indent=2))
    s.out.with_suffix(".md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    st = result["settings"]
    lines = [
        f"wrk, {st['connections']} connections, {st['duration_s']} s per side, POST /classify:",
        "",
        "| side | answered 200/s | p50 ms | p99 ms | non-2xx | socket errors |",
        "|---|---|---|---|---|---|",
    ]
    for side in ("facade", "baseline"):
        r = result[side]
        lines.append(f"| {side} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['non_2xx']} | {r['socket_errors']} |")
    lines.append(f"| **facade / baseline** | **{result['speedup']}x** | | | | |")
    return "\n".join(lines) + "\n"
