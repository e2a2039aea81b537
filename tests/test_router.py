"""``edgeinfer router``: sglang-router in front of two real ``edgeinfer
serve --http`` processes on loopback, driven by the official ``openai``
client; and the checks ``edgeinfer router`` makes before it starts one."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from click.testing import CliRunner
from served import _launch, start_http

from edgeinfer import fleet
from edgeinfer.cli import cli
from edgeinfer.errors import ServerConfigError

TOKEN = "fleet-token-0123456789abcdef"
SYSTEM = "You answer questions about the shop's opening hours, returns and deliveries. " * 8


# -- before anything starts -------------------------------------------------------

@pytest.mark.parametrize("given, url", [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://pi1.local:8080/", "http://pi1.local:8080"),
    ("https://[::1]:8443", "https://[::1]:8443"),
])
def test_a_worker_is_a_scheme_a_host_and_a_port(given, url):
    assert fleet.worker_url(given) == url


@pytest.mark.parametrize("given, said", [
    ("pi1", "names no port"),
    ("http://pi1:8080/v1", "no path"),
    ("http://user:pw@pi1:8080", "no path, query or credentials"),
    ("ftp://pi1:21", "http or https"),
    ("http://pi1:notaport", "not a URL"),
])
def test_a_wrong_worker_says_what_to_give(given, said):
    with pytest.raises(ServerConfigError) as e:
        fleet.worker_url(given)
    assert said in str(e.value) and "--worker http://" in e.value.hint


def run_cli(*args):
    return CliRunner().invoke(cli, ["router", *args])


def test_what_the_router_refuses_to_start_with(tmp_path):
    r = run_cli()
    assert r.exit_code == 1 and "no workers given" in r.output and "--worker URL" in r.output
    r = run_cli("--worker", "http://127.0.0.1:8080", "--worker", "127.0.0.1:8080")
    assert r.exit_code == 1 and "given twice" in r.output
    # A box off loopback requires a token, so the router must carry it.
    r = run_cli("--worker", "http://192.0.2.7:8080")
    assert r.exit_code == 1 and "--token-file" in r.output
    r = run_cli("--worker", "http://127.0.0.1:8080", "--host", "0.0.0.0")
    assert r.exit_code == 1 and "without a token" in r.output


def test_settings_for_four_slot_boxes_are_ones_the_router_takes(tmp_path):
    """The settings edgeinfer gives are accepted by the installed router
    (its argument class and its own validation), and differ from its
    GPU-sized defaults where a 4-slot box needs them to."""
    from sglang_router.router_args import RouterArgs

    cfg = fleet.check(fleet.FleetConfig(workers=["127.0.0.1:9001", "127.0.0.1:9002"], port=9000, token=TOKEN))
    args = fleet.router_config(cfg)
    defaults = RouterArgs()
    assert (args["balance_abs_threshold"], defaults.balance_abs_threshold) == (2, 64)
    assert args["health_check_interval_secs"] < defaults.health_check_interval_secs
    assert args["health_check_endpoint"] == "/health" and args["policy"] == "cache_aware"
    assert (args["prometheus_host"], args["prometheus_port"]) == ("127.0.0.1", 9001)   # loopback, --port + 1
    assert args["api_key"] == TOKEN
    RouterArgs(**args)._validate_router_args()

    tf = tmp_path / "token"
    tf.write_text(TOKEN)
    tf.chmod(0o600)
    r = run_cli("--worker", "127.0.0.1:9001", "--token-file", str(tf), "--print-config")
    assert r.exit_code == 0, r.output
    assert "balance_abs_threshold = 2" in r.output and TOKEN not in r.output


def test_a_missing_router_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang_router.launch_router", None)   # import fails
    r = run_cli("--worker", "http://127.0.0.1:1")
    assert r.exit_code == 1
    assert "the router is not installed" in r.output and "pip install 'edgeinfer[fleet]'" in r.output


# -- two workers behind the router ----------------------------------------------

def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, ConnectionError, ValueError):
        return 0, {}


def healthy(router_port: int) -> int:
    status, body = _get(f"http://127.0.0.1:{router_port}/readiness")
    return body.get("healthy_workers", 0) if status in (200, 503) else 0


def wait_healthy(router_port: int, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while healthy(router_port) != n:
        assert time.monotonic() < deadline, f"the router never saw {n} healthy workers"
        time.sleep(0.2)


def chats_served(worker) -> float:
    """Chats a worker answered with 200, from its own /metrics."""
    status, _, data = worker.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    for line in data.decode().splitlines():
        if line.startswith('edgeinfer_requests_total{endpoint="/v1/chat/completions",status="200"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def fleet_of_two(tiny_model, tmp_path):
    tf = tmp_path / "token"
    tf.write_text(TOKEN)
    tf.chmod(0o600)
    common = ("--token-file", str(tf), "--parallel", "4")
    workers = [start_http(tiny_model, *common), start_http(tiny_model, *common)]
    router = None
    try:
        def where(line):
            m = re.search(r"^Routing http://127\.0\.0\.1:(\d+)", line)
            return (int(m.group(1)), None) if m else None

        router = _launch([sys.executable, "-m", "edgeinfer", "router", "--port", "0", "--token-file", str(tf),
                          "--health-interval", "1", *sum((["--worker", w.base] for w in workers), [])], None, where)
        wait_healthy(router.port, 2)
        yield router, workers, common
    finally:
        for s in ([router] if router else []) + workers:
            s.stop()


def ask(client, i: int, max_tokens: int = 24) -> dict:
    """One streamed chat; what happened to it, and when."""
    out = {"i": i, "start": time.monotonic()}
    try:
        stream = client.chat.completions.create(
            model="tiny.gguf", max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}])
        out["pieces"] = sum(1 for c in stream if c.choices and c.choices[0].delta.content)
        out["ok"] = True
    except openai.APIError as e:
        out["ok"], out["error"] = False, f"{type(e).__name__}: {e}"
    out["end"] = time.monotonic()
    return out


def test_two_workers_share_eight_clients_and_survive_losing_one(fleet_of_two, tiny_model):
    router, (a, b), common = fleet_of_two
    client = openai.OpenAI(base_url=router.base + "/v1", api_key=TOKEN, max_retries=0, timeout=120)

    # The router wants the token before it forwards anything.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router.base + "/v1", api_key="wrong-token-0123456789", max_retries=0).chat \
            .completions.create(model="tiny.gguf", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    # 8 concurrent clients, every answer whole, and both boxes took work.
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda i: ask(client, i), range(16)))
    assert all(r["ok"] and r["pieces"] > 0 for r in first), [r for r in first if not r["ok"]]
    assert chats_served(a) > 0 and chats_served(b) > 0, (chats_served(a), chats_served(b))

    # b dies (SIGKILL) while 8 clients keep asking: only requests already
    # running when it died may fail; every later one is answered by a.
    killed = threading.Event()
    kill_at = []

    def client_loop(k: int) -> list[dict]:
        out = []
        for j in range(6):
            out.append(ask(client, 100 + 10 * k + j, max_tokens=48))
            if k == 0 and j == 1 and not killed.is_set():
                kill_at.append(time.monotonic())
                b.proc.kill()
                killed.set()
        return out

    with ThreadPoolExecutor(8) as pool:
        second = [r for rs in pool.map(client_loop, range(8)) for r in rs]
    assert kill_at, "b was never killed"
    lost = [r for r in second if not r["ok"]]
    assert all(r["start"] < kill_at[0] for r in lost), lost
    assert len(lost) <= 8, lost
    assert sum(r["ok"] for r in second) >= len(second) - 8
    wait_healthy(router.port, 1, timeout=15)

    # b comes back on its port, the router finds it and gives it work.
    port_b = b.port
    b2 = start_http(tiny_model, *common, "--http", str(port_b))
    try:
        assert b2.port == port_b
        back = time.monotonic()
        wait_healthy(router.port, 2, timeout=30)
        # Until the router's circuit breaker closes again (10 s after b's
        # failures) a may still take everything; within it, b takes work.
        rounds = 0
        while chats_served(b2) == 0:
            assert time.monotonic() - back < 30, "the router never gave the restarted worker any work"
            with ThreadPoolExecutor(8) as pool:
                third = list(pool.map(lambda i: ask(client, 200 + i), range(8)))
            assert all(r["ok"] for r in third), [r for r in third if not r["ok"]]
            rounds += 1
        print(f"b took work again {time.monotonic() - back:.1f} s after it restarted ({rounds} rounds)")
    finally:
        b2.stop()
