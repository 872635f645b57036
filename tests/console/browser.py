#!/usr/bin/env python3
"""The operations console in a real browser (issue 18): headless Chromium
driven over WebDriver (selenium) against a real `rtpd dev` and a real
`rtpd mock-downstream`.

Starts both on free ports (data, logs and screenshots under --out), sends
payments the mock refuses for good once (`_mock.script: ["400", "ok"]`) or
fails until retries run out, then, as an operator would:

- a wrong token is refused at the login form (no cookie);
- logs in with the dev admin token; the overview counts them and refreshes
  live (a new payment shows up without a page load);
- finds a dead-lettered payment by id, reads its timeline: the attempt, the
  downstream's 400, the dead-letter reason, the payload with its IBAN
  redacted;
- replays it with a reason (dry run, reason, confirmation) and sees it
  reach `success` live, then on its timeline with the operator and reason;
- replays a dead-letter group after a dry-run count of 2;
- an action whose CSRF token was taken out of the form is refused (403)
  and changes nothing;
- the pages fit a phone's width, the skip link is the first stop of the
  keyboard, the browser reports no CSP violation or script error, and no
  URL the browser loaded nor any line rtpd logged holds the payload.

Screenshots (overview, timeline, dead letters, phone) go to --out;
--update-docs copies them to docs/console/. Prints one line per check and
ends with `N passed, M failed`; exits non-zero on any failure, and when
Chromium or chromedriver is missing (scripts/browser.sh installs them).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    sys.exit("browser.py: selenium is missing: pip install -r tests/requirements.txt")

IBAN = "DE89370400440532013000"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, within=30):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {within} s")


class Stack:
    """`rtpd mock-downstream` and `rtpd dev --no-mock` in front of it."""

    def __init__(self, rtpd, out):
        self.out = out
        self.procs = []
        mock_port, self.port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = out / "rtpd-dev.log"
        mock_log = open(out / "mock.log", "w")
        self.procs.append(
            subprocess.Popen(
                [rtpd, "mock-downstream", "--addr", f"127.0.0.1:{mock_port}", "--success-rate", "1"],
                stdout=mock_log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_http(f"http://127.0.0.1:{mock_port}/healthz")
        env = dict(os.environ)
        env.update(
            {
                "RTPD_DATA_DIR": str(out / "data"),
                "RTPD_HTTP_ADDR": f"127.0.0.1:{self.port}",
                "RTPD_DOWNSTREAM_URL": f"http://127.0.0.1:{mock_port}/process",
                # One retry, quickly: a 503 twice is dead-lettered as retries exhausted.
                "RTPD_MAX_RETRIES": "1",
                "RTPD_BACKOFF_BASE_SECS": "0.2",
                "RTPD_BACKOFF_MAX_SECS": "0.5",
                # A replay right after a failed attempt waits lock + timeout.
                "RTPD_LOCK_DURATION_SECS": "2",
                "RTPD_DOWNSTREAM_TIMEOUT_SECS": "2",
                "RTPD_RECONCILE_INTERVAL_SECS": "2",
                # Everything rtpd says, to search it for the payload.
                "RTPD_LOG_LEVEL": "debug",
                "RTPD_LOG_FORMAT": "json",
            }
        )
        log = open(self.log_path, "w")
        self.procs.append(
            subprocess.Popen(
                [rtpd, "dev", "--no-mock"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
        wait_http(f"{self.base}/healthz")
        creds = json.loads((out / "data" / "dev-credentials.json").read_text())
        self.api_key = creds["api_key"]
        self.admin_token = creds["admin_token"]
        self.vendor = creds["vendor"]

    def banner(self):
        """What `rtpd dev` printed for people (not its log lines)."""
        return "\n".join(l for l in self.log_path.read_text().splitlines() if not l.startswith("{"))

    def stop(self):
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def post(self, body):
        req = urllib.request.Request(
            f"{self.base}/v1/transactions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-Api-Key": self.api_key},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 202, r.status

    def state(self, tx):
        req = urllib.request.Request(
            f"{self.base}/v1/transactions/{tx}", headers={"X-Api-Key": self.api_key}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["status"]

    def wait_state(self, tx, want, within=30):
        deadline = time.time() + within
        while time.time() < deadline:
            if self.state(tx) == want:
                return
            time.sleep(0.2)
        raise AssertionError(f"{tx} is {self.state(tx)}, not {want}, after {within} s")


class Run:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        t0 = time.time()
        try:
            fn()
        except Exception:
            self.failed += 1
            print(f"FAIL  {name} ({time.time() - t0:.1f} s)")
            traceback.print_exc()
        else:
            self.passed += 1
            print(f"ok    {name} ({time.time() - t0:.1f} s)")


def browser(chromium, driver_bin, out):
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in [
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,800",
        "--force-device-scale-factor=1",
        f"--user-data-dir={out / 'chromium-profile'}",
    ]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_bin, log_output=str(out / "chromedriver.log"))
    d = webdriver.Chrome(options=opts, service=service)
    d.set_page_load_timeout(30)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtpd-bin", default=str(REPO / "target/debug/rtpd"))
    ap.add_argument("--out", default=str(REPO / "target/console-browser"))
    ap.add_argument("--update-docs", action="store_true", help="copy the screenshots to docs/console/")
    args = ap.parse_args()
    started = time.time()

    chromium = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium")
    driver_bin = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver")
    if not chromium or not driver_bin:
        sys.exit("browser.py: chromium or chromedriver is missing: run scripts/browser.sh (it installs them)")
    # Selenium Manager never downloads anything here: both paths are given.
    os.environ["SE_OFFLINE"] = "true"

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "screenshots").mkdir(parents=True)
    marker = f"MEMO-{uuid.uuid4().hex}"
    stack = Stack(args.rtpd_bin, out)
    d = None
    run = Run()
    visited = []
    session = {"id": "no session"}
    try:
        d = browser(chromium, driver_bin, out)
        wait = WebDriverWait(d, 30)

        def go(path):
            d.get(stack.base + path)
            visited.append(d.current_url)

        def shot(name, height=None):
            # 1280 wide; a taller page for the docs when it says more below the fold.
            if height:
                d.execute_cdp_cmd(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False},
                )
            d.save_screenshot(str(out / "screenshots" / name))
            if height:
                d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

        def text():
            return d.find_element(By.TAG_NAME, "main").text

        def submit_form_with(button_text):
            b = d.find_element(By.XPATH, f"//button[normalize-space()='{button_text}']")
            b.click()
            visited.append(d.current_url)

        def no_reload_mark():
            d.execute_script("window.__stillTheSamePage = true;")

        def still_same_page():
            return d.execute_script("return window.__stillTheSamePage === true;")

        # Payments: refused for good once, then ok; failing until retries run out; fine ones.
        def payments():
            for tx in ["BR-1", "BR-2", "BR-3"]:
                stack.post(
                    {
                        "transaction_id": tx,
                        "amount": "125.00",
                        "currency": "EUR",
                        "memo": marker,
                        "creditor": {"name": "ACME GmbH", "iban": IBAN},
                        "_mock": {"script": ["400", "ok"]},
                    }
                )
            stack.post({"transaction_id": "BR-4", "amount": "9.99", "_mock": {"script": ["503", "503", "ok"]}})
            for i in range(5):
                stack.post({"transaction_id": f"BR-OK-{i}", "amount": "1.00"})
            for tx in ["BR-1", "BR-2", "BR-3", "BR-4"]:
                stack.wait_state(tx, "dead_letter")
            for i in range(5):
                stack.wait_state(f"BR-OK-{i}", "success")

        run.check("payments dead-lettered by the downstream (400, and 503 until retries ran out)", payments)

        def banner():
            b = stack.banner()
            assert f"console          {stack.base}/console  (log in with the admin token above)" in b, b
            assert f"admin token      {stack.admin_token}" in b, b

        run.check("rtpd dev's banner prints the console's URL and how to log in", banner)

        def wrong_token():
            go("/console")
            assert d.current_url.endswith("/console/login"), d.current_url
            field = d.find_element(By.ID, "token")
            field.send_keys("not-an-admin-token")
            field.send_keys(Keys.ENTER)
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "p.error")))
            assert "not an admin token" in text(), text()
            assert d.get_cookies() == [], d.get_cookies()
            # The vendor's API key is no admin token either.
            d.find_element(By.ID, "token").send_keys(stack.api_key, Keys.ENTER)
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "p.error")))
            assert d.get_cookies() == [], d.get_cookies()

        run.check("a wrong token is refused at the login form, no cookie set", wrong_token)

        def login():
            go("/console/login")
            d.find_element(By.ID, "token").send_keys(stack.admin_token)
            submit_form_with("Log in")
            wait.until(EC.url_to_be(stack.base + "/console"))
            assert "Signed in as dev-admin" in d.find_element(By.CSS_SELECTOR, ".who").text
            cookies = d.get_cookies()
            assert len(cookies) == 1, cookies
            c = cookies[0]
            assert c["name"] == "rtpd_console" and c["httpOnly"] and c["sameSite"] == "Strict", c
            assert c["path"] == "/console", c
            assert stack.admin_token not in c["value"]
            session["id"] = c["value"]
            # Script cannot read it.
            assert "rtpd_console" not in d.execute_script("return document.cookie;")

        run.check("login with the admin token: an HttpOnly, SameSite=Strict session cookie", login)

        def overview_live():
            dead = d.find_element(By.CSS_SELECTOR, '[data-state="dead_letter"]')
            assert dead.text == "4", dead.text
            assert d.find_element(By.CSS_SELECTOR, '[data-state="success"]').text == "5"
            assert "4 messages" in d.find_element(By.ID, "dlq-count").text
            health = d.find_element(By.CSS_SELECTOR, "table.health").text
            for dep in ["wal", "ledger", "queue", "downstream"]:
                assert dep in health, health
            shot("overview.png", 1000)
            no_reload_mark()
            stack.post({"transaction_id": "BR-LIVE", "amount": "2.00"})
            wait.until(lambda _: d.find_element(By.CSS_SELECTOR, '[data-state="success"]').text == "6")
            assert still_same_page(), "the overview reloaded the page"

        run.check("the overview counts by state and refreshes live, without a page load", overview_live)

        def find_and_timeline():
            d.find_element(By.LINK_TEXT, "Find a payment").click()
            d.find_element(By.ID, "find-id").send_keys("BR-1", Keys.ENTER)
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "table.results")))
            visited.append(d.current_url)
            d.find_element(By.LINK_TEXT, "BR-1").click()
            wait.until(EC.presence_of_element_located((By.ID, "tx-events")))
            visited.append(d.current_url)
            t = text()
            assert "Payment BR-1" in t
            assert "Received, durable in the WAL" in t, t
            assert "Attempt 1: dead-lettered" in t, t
            assert "downstream answered 400" in t, t
            assert "Call took" in t, "the attempt's latency"
            assert "In the dead-letter queue" in t and "PermanentFailure" in t, t
            assert d.find_element(By.ID, "tx-status").get_attribute("data-state") == "dead_letter"
            payload = d.find_element(By.ID, "payload-text").text
            assert marker in payload and "[redacted]" in payload, payload
            assert IBAN not in d.page_source, "the IBAN is redacted"
            shot("timeline.png", 1500)

        run.check("find by id, the timeline: attempt, 400, dead-letter reason, payload redacted", find_and_timeline)

        def replay_one():
            timeline_url = d.current_url
            submit_form_with("Replay: dry run…")
            count = wait.until(EC.presence_of_element_located((By.ID, "dry-run-count")))
            assert count.get_attribute("data-count") == "1", count.text
            # The reason is required: the browser will not send the form without it.
            confirm = d.find_element(By.CSS_SELECTOR, "form.confirm button")
            confirm.click()
            assert d.find_element(By.ID, "why").get_attribute("validationMessage"), "reason required"
            assert "dry run" in d.title.lower() or "Dry run" in text()
            d.find_element(By.ID, "why").send_keys("vendor fixed the creditor account (browser test)")
            d.find_element(By.CSS_SELECTOR, "form.confirm button").click()
            wait.until(EC.presence_of_element_located((By.ID, "replayed-count")))
            visited.append(d.current_url)
            assert d.find_element(By.ID, "replayed-count").get_attribute("data-count") == "1"
            no_reload_mark()
            # Pending (its last call's window), then success: seen live.
            WebDriverWait(d, 30).until(
                lambda _: d.find_elements(By.CSS_SELECTOR, '.live [data-state="success"]')
            )
            assert still_same_page(), "the replay result reloaded the page"
            d.get(timeline_url)
            t = text()
            assert "Replayed by console:dev-admin" in t, t
            assert "vendor fixed the creditor account (browser test)" in t, t
            assert "Attempt 2: success" in t, t
            assert d.find_element(By.ID, "tx-status").get_attribute("data-state") == "success"
            assert "In the dead-letter queue" not in t, "its dead-lettered message was removed"
            shot("timeline-replayed.png", 1500)
            stack.wait_state("BR-1", "success", within=1)

        run.check("replay with a reason after a dry run; it reaches success live", replay_one)

        def dead_letter_groups():
            d.find_element(By.LINK_TEXT, "Dead letters").click()
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "section.group")))
            visited.append(d.current_url)
            groups = {
                g.find_element(By.CSS_SELECTOR, ".dl-reason").text: g.find_element(By.CSS_SELECTOR, ".count").text
                for g in d.find_elements(By.CSS_SELECTOR, "section.group")
            }
            assert groups.get("PermanentFailure") == "2", groups
            assert len(groups) == 2, groups
            shot("dead-letters.png", 900)
            group = next(
                g
                for g in d.find_elements(By.CSS_SELECTOR, "section.group")
                if g.find_element(By.CSS_SELECTOR, ".dl-reason").text == "PermanentFailure"
            )
            group.find_element(By.XPATH, ".//button[normalize-space()='Replay this group…']").click()
            count = wait.until(EC.presence_of_element_located((By.ID, "dry-run-count")))
            assert count.get_attribute("data-count") == "2", count.text
            shot("dry-run.png")
            assert stack.state("BR-2") == "dead_letter", "a dry run changes nothing"
            d.find_element(By.ID, "why").send_keys("bulk: the 400s were our config (browser test)")
            d.find_element(By.CSS_SELECTOR, "form.confirm button").click()
            wait.until(EC.presence_of_element_located((By.ID, "replayed-count")))
            assert d.find_element(By.ID, "replayed-count").get_attribute("data-count") == "2"
            assert "2 of 2 dead-lettered messages removed" in text(), text()
            WebDriverWait(d, 30).until(
                lambda _: len(d.find_elements(By.CSS_SELECTOR, '.live [data-state="success"]')) == 2
            )
            stack.wait_state("BR-2", "success", within=1)
            stack.wait_state("BR-3", "success", within=1)

        run.check("dead letters grouped by reason; a group replay after a dry-run count of 2", dead_letter_groups)

        def csrf_refused():
            go("/console/dlq")
            form = d.find_element(By.XPATH, "//section[contains(@class,'group')]//form")
            d.execute_script("arguments[0].querySelector('input[name=csrf]').remove();", form)
            form.find_element(By.TAG_NAME, "button").click()
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "p.error")))
            assert "CSRF" in text(), text()
            # And the confirmation itself, posted by script without the token.
            status = d.execute_async_script(
                """
                const done = arguments[arguments.length - 1];
                fetch('/console/replay', {method: 'POST', credentials: 'same-origin',
                  headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                  body: 'target=tx&keys=' + encodeURIComponent(arguments[0]) + '&seen=dead_letter&why=no+token'})
                  .then(r => done(r.status));
                """,
                f"{stack.vendor}/BR-4",
            )
            assert status == 403, status
            assert stack.state("BR-4") == "dead_letter", "nothing was replayed"

        run.check("an action without its CSRF token is refused (403) and changes nothing", csrf_refused)

        def time_range():
            go("/console/dlq")
            # Prefilled with the last hour: BR-4 is the one left.
            d.find_element(By.CSS_SELECTOR, "form.range button").click()
            count = wait.until(EC.presence_of_element_located((By.ID, "dry-run-count")))
            assert count.get_attribute("data-count") == "1", count.text
            assert f"{stack.vendor}/BR-4" in text(), text()
            assert stack.state("BR-4") == "dead_letter", "a dry run changes nothing"

        run.check("a time range's dry run counts the dead letters in it", time_range)

        def phone_and_keyboard():
            d.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
            )
            for path in ["/console", "/console/dlq", f"/console/tx?key={stack.vendor}%2FBR-1"]:
                go(path)
                overflow = d.execute_script(
                    "return document.documentElement.scrollWidth - document.documentElement.clientWidth;"
                )
                assert overflow <= 1, f"{path} is {overflow}px wider than a phone"
            go("/console")
            shot("overview-phone.png")
            d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
            go("/console")
            d.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
            first = d.switch_to.active_element
            assert first.text == "Skip to content", first.text
            first.send_keys(Keys.ENTER)
            assert d.switch_to.active_element.get_attribute("id") == "main"

        run.check("readable at phone width, keyboard: the skip link first", phone_and_keyboard)

        def wal_view():
            d.find_element(By.LINK_TEXT, "WAL").click()
            hour = d.find_elements(By.CSS_SELECTOR, "table.results a")
            assert hour, "an hour with segments"
            hour[-1].click()
            visited.append(d.current_url)
            assert "records" in text()
            d.find_element(By.CSS_SELECTOR, "table.results a.ref").click()
            visited.append(d.current_url)
            assert "WAL segment" in d.title
            d.find_element(By.CSS_SELECTOR, "ul.records a.ref").click()
            visited.append(d.current_url)
            assert "WAL record" in d.title
            assert "sha256" in text()

        run.check("the WAL by hour, a record opened by its ref", wal_view)

        def nothing_leaked():
            # The refusals this test provoked are the only failed loads.
            refused = ("/console/login - Failed to load resource: the server responded with a status of 401",
                       "/console/replay/preview - Failed to load resource: the server responded with a status of 403",
                       "/console/replay - Failed to load resource: the server responded with a status of 403")
            logs = d.get_log("browser")
            bad = [
                e for e in logs
                if "Content Security Policy" in e["message"]
                or (e["level"] == "SEVERE" and not any(r in e["message"] for r in refused))
            ]
            assert not bad, bad
            loaded = d.execute_script("return performance.getEntries().map(e => e.name);")
            for url in visited + loaded:
                assert marker not in url and IBAN not in url, url
            stack.stop()
            logged = stack.log_path.read_text()
            assert "console: logged in" in logged, "the log holds the console's lines"
            assert marker not in logged, "the payload reached rtpd's log"
            assert IBAN not in logged, "the IBAN reached rtpd's log"
            # The dev banner prints the admin token on purpose; no log line may.
            lines = [l for l in logged.splitlines() if l.startswith("{")]
            assert len(lines) > 10, "JSON log lines"
            for line in lines:
                assert stack.admin_token not in line, f"the admin token in a log line: {line}"
                assert session["id"] not in line, f"the session id in a log line: {line}"

        run.check("no CSP violation or script error; no payload in any URL or log line", nothing_leaked)
    finally:
        if d is not None:
            d.quit()
        stack.stop()

    if args.update_docs:
        docs = REPO / "docs" / "console"
        docs.mkdir(exist_ok=True)
        for name in [
            "overview.png",
            "timeline.png",
            "timeline-replayed.png",
            "dead-letters.png",
            "dry-run.png",
            "overview-phone.png",
        ]:
            src = out / "screenshots" / name
            if src.exists():
                shutil.copy(src, docs / name)
    print(f"screenshots in {out / 'screenshots'}; took {time.time() - started:.1f} s")
    print(f"{run.passed} passed, {run.failed} failed")
    sys.exit(1 if run.failed else 0)


if __name__ == "__main__":
    main()
