"""serve-proxy's dashboard in a real headless browser: Debian's chromium, driven by Selenium through Debian's
chromedriver (given by path, and SE_OFFLINE set, so Selenium Manager never downloads a driver or a browser), in
front of a real llama-server.

The page draws on <canvas>; each canvas also says what it drew (data-points, data-last, data-sum per series), and
each headline figure carries its raw value (data-value). The tests assert that the charts change as real requests
go through the proxy, and that the figures shown are the ones the proxy's own /metrics reports.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

os.environ.setdefault("SE_OFFLINE", "true")  # before selenium is imported: never fetch a driver or a browser

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from stack import CLIENT_MODEL, http_json  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "e2e-dashboard-key"
# The page polls once a second and the proxy samples once a second: a figure shows within ~2 s.
UPDATE_S = 20
CHARTS = ("chart-gen", "chart-prefill", "chart-ttft", "chart-cache", "chart-requests")


@pytest.fixture(scope="module")
def browser():
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            pytest.fail(f"{path} is missing: `apt-get install {package}` (scripts/test-stack.sh installs it)", pytrace=False)
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--window-size=1400,1200"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(what: str, probe, timeout: float = UPDATE_S):
    """probe() until it returns something truthy; fail naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout}s; last seen: {last!r}", pytrace=False)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def drawn(driver, chart: str) -> dict:
    """What the chart says it drew: {attribute: {series: value}}."""
    raw = js(driver, "const d = document.getElementById(arguments[0]).dataset;"
                     "return [d.points || '{}', d.last || '{}', d.sum || '{}'];", chart)
    return {k: json.loads(v) for k, v in zip(("points", "last", "sum"), raw)}


def drawn_with(driver, chart: str, *series: str) -> dict | None:
    """What the chart drew, once each of `series` has at least one point."""
    d = drawn(driver, chart)
    return d if all(d["points"].get(s) for s in series) else None


def pixels(driver) -> dict[str, str]:
    return {c: js(driver, "return document.getElementById(arguments[0]).toDataURL();", c) for c in CHARTS}


def shown(driver, element_id: str) -> str | None:
    """A headline figure's raw value ('' when it has none), or None before the first render."""
    return js(driver, "const e = document.getElementById(arguments[0]);"
                      "return e.dataset.value === undefined ? null : e.dataset.value;", element_id)


def metrics(proxy: str, key: str | None) -> dict[str, float]:
    """The proxy's Prometheus text, summed per metric name (labels dropped)."""
    status, text = http_json("GET", f"{proxy}/metrics", key=key)
    assert status == 200, text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if m:
            # Token counts stay apart by kind; every other metric is summed over its labels.
            labels = m.group(2) or "" if m.group(1) == "llmctl_proxy_tokens_total" else ""
            name = m.group(1) + labels
            out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


def ask(proxy: str, key: str | None, text: str) -> dict:
    status, body = http_json("POST", f"{proxy}/v1/messages", key=key, body={
        "model": CLIENT_MODEL, "max_tokens": 24,
        "messages": [{"role": "user", "content": text}],
    })
    assert status == 200, body
    return body["usage"]


def test_dashboard_charts_what_the_proxy_serves(stack, browser):
    proxy = stack.proxy(stack.llama("metrics"), KEY)

    # The page and its assets are open; the figures need the key.
    for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
        status, _ = http_json("GET", proxy + path)
        assert status == 200, path
    status, body = http_json("GET", f"{proxy}/dashboard/data.json")
    assert status == 401, body

    browser.get(f"{proxy}/dashboard")
    wait_for("the key form", lambda: browser.find_element(By.ID, "key-form").is_displayed())
    assert js(browser, "return document.getElementById('status').dataset.state") == "locked"

    # A wrong key is refused and not kept; the right one is kept in this tab only.
    browser.find_element(By.ID, "key").send_keys("not-the-key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_for("the refusal of a wrong key", lambda: "refused" in browser.find_element(By.ID, "key-error").text)
    assert js(browser, "return sessionStorage.getItem('llmctl-proxy-key')") is None
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_for("the page to go live", lambda: js(browser, "return document.getElementById('status').dataset.state") == "live")
    assert js(browser, "return sessionStorage.getItem('llmctl-proxy-key')") == KEY
    assert KEY not in browser.page_source, "the key must never be shown"
    wait_for("llama-server's /metrics to be read",
             lambda: js(browser, "return document.getElementById('upstream-status').dataset.state") == "ok")
    before = pixels(browser)
    assert drawn(browser, "chart-gen")["points"] == {"proxy": 0, "upstream": 0}

    # Real requests: the same prompt three times (llama-server reuses its cached prefix), and one bad request.
    usages = [ask(proxy, KEY, "Name three colours.") for _ in range(3)]
    status, body = http_json("POST", f"{proxy}/v1/messages", key=KEY, body={"model": CLIENT_MODEL})
    assert status == 400, body
    output_tokens = sum(u["output_tokens"] for u in usages)
    assert output_tokens > 3, usages

    # The figures shown converge on the proxy's own /metrics (nothing else talks to this proxy now).
    m = metrics(proxy, KEY)
    requests = m["llmctl_proxy_requests_total"]
    wait_for(f"the page to show {requests:.0f} requests",
             lambda: shown(browser, "total-requests") == f"{requests:.0f}")
    wait_for("the requests chart to hold every request",
             lambda: drawn(browser, "chart-requests")["sum"].get("requests") == requests)
    assert shown(browser, "total-errors") == f"{m['llmctl_proxy_errors_total']:.0f}"
    assert drawn(browser, "chart-requests")["sum"]["errors"] == m["llmctl_proxy_errors_total"]
    assert m["llmctl_proxy_errors_total"] >= 3  # the page's and the test's 401s, the 400
    assert shown(browser, "total-output-tokens") == str(output_tokens)
    assert m['llmctl_proxy_tokens_total{kind="output"}'] == output_tokens
    assert float(shown(browser, "total-ttft")) == pytest.approx(
        1000 * m["llmctl_proxy_time_to_first_token_seconds_sum"] / m["llmctl_proxy_time_to_first_token_seconds_count"],
        rel=1e-6)
    assert float(shown(browser, "total-gen-tps")) == pytest.approx(
        m["llmctl_proxy_generation_tokens_total"] / m["llmctl_proxy_generation_seconds_total"], rel=1e-3)
    cached = m['llmctl_proxy_tokens_total{kind="cache_read"}']
    prompt = cached + m['llmctl_proxy_tokens_total{kind="input"}']
    assert cached > 0, "the second and third requests should reuse the first one's prompt"
    assert float(shown(browser, "total-cache-reuse")) == pytest.approx(cached / prompt, rel=1e-6)

    # Every chart drew new points, from the proxy and from llama-server.
    gen = wait_for("generation points from both sources", lambda: drawn_with(browser, "chart-gen", "proxy", "upstream"))
    assert gen["last"]["proxy"] > 0 and gen["last"]["upstream"] > 0, gen
    prefill = wait_for("prefill points", lambda: drawn_with(browser, "chart-prefill", "upstream"))
    assert prefill["last"]["upstream"] > 0, prefill
    ttft = drawn(browser, "chart-ttft")
    assert ttft["points"]["proxy"] >= 1 and ttft["last"]["proxy"] > 0, ttft
    cache = wait_for("cache-reuse points", lambda: drawn_with(browser, "chart-cache", "proxy", "upstream"))
    assert cache["points"]["proxy"] >= 1, cache
    assert 0 <= cache["last"]["proxy"] <= 100 and 0 <= cache["last"]["upstream"] <= 100, cache
    after = pixels(browser)
    unchanged = [c for c in CHARTS if before[c] == after[c]]
    assert not unchanged, f"these charts' pixels did not change: {unchanged}"

    # The data the page reads holds figures only: no prompt, no answer, no key.
    status, data = http_json("GET", f"{proxy}/dashboard/data.json", key=KEY)
    assert status == 200
    text = json.dumps(data)
    assert "colours" not in text and KEY not in text
    # Loading the page cost the proxy no 404 (a browser asks for /favicon.ico unless the page names an icon).
    assert "not_found_error" not in data["totals"]["errors_by_type"], data["totals"]


def test_without_upstream_metrics_the_page_says_so(stack, browser):
    # llama-server without --metrics (answers 501), and a proxy without a key: no form, straight to the figures.
    proxy = stack.proxy(stack.llama("text"))
    browser.get(f"{proxy}/dashboard")
    wait_for("the page to go live", lambda: js(browser, "return document.getElementById('status').dataset.state") == "live")
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    note = wait_for("the note that the upstream's figures are missing",
                    lambda: (e := browser.find_element(By.ID, "upstream-status")).get_attribute("data-state") == "unavailable" and e.text)
    assert "not available" in note and "--metrics" in note, note

    usage = ask(proxy, None, "Say hi.")
    wait_for("the request on the page", lambda: drawn_with(browser, "chart-gen", "proxy"))
    assert drawn(browser, "chart-gen")["points"]["upstream"] == 0
    assert drawn(browser, "chart-prefill")["points"] == {"upstream": 0}
    output = metrics(proxy, None)['llmctl_proxy_tokens_total{kind="output"}']
    assert output >= usage["output_tokens"] >= 1
    wait_for(f"the page to show {output:.0f} output tokens", lambda: shown(browser, "total-output-tokens") == f"{output:.0f}")
